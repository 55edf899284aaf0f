//! Engines on the log (`engine.mode = "external"`, ENGINE.md): the requests
//! stream, `<stream>_requests`, where the gateways publish the core's batches of
//! engine requests for engines in their own processes to read.
//!
//! Batch `m` must be message `m` of the stream, so that an engine reads the
//! requests in one order, without a gap or a duplicate, and restarts from any
//! batch. Every gateway applying the log makes the same batches, and any may
//! publish any of them, with `Nats-Expected-Last-Sequence: m - 1`: the stream
//! stores the first copy and refuses the others (and any batch whose predecessor
//! is not stored yet).
//!
//! So that the stream is not sent every batch once per gateway, the gateway that
//! takes the core's snapshots (the earliest live run, the same for all) publishes
//! at once, and the others *stand by*: each publishes a batch only if, 50 ms after
//! it made it, the batch is neither answered nor known to be stored. One that had
//! to (the publishing gateway is gone, and not yet declared gone) publishes at once
//! for as long as its copies are the ones stored. No gateway leads: a batch is
//! published as long as one gateway is alive.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use gateway_core::external::OutgoingBatch;
use tokio::sync::mpsc;
use tracing::{error, warn};

use crate::config::SequencerSettings;
use crate::sequencer::LogError;

/// Batches published at once before their acknowledgements are awaited.
const WINDOW: usize = 64;

/// Longest wait for one batch's acknowledgement.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Wait after a round in which nothing was stored (NATS away, an election).
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// How long a standing-by gateway waits for a batch it made to be stored by the
/// publishing gateway (or answered) before it publishes it itself.
const STAND_BY: Duration = Duration::from_millis(50);

/// How long a standing-by gateway publishes at once after its copy of a batch was
/// the one stored (each such copy makes it longer).
const EAGER_FOR: Duration = Duration::from_secs(3);

/// The requests stream's name for the log `stream`.
pub fn requests_stream_name(stream: &str) -> String {
    format!("{stream}_requests")
}

/// The subject of the requests stream for the log `stream`.
pub fn requests_subject(stream: &str) -> String {
    format!("{stream}.requests")
}

/// Where the gateway's batches go: a task publishing them in order.
#[derive(Debug)]
pub struct RequestsStream {
    queue: mpsc::UnboundedSender<Offered>,
    stored_through: Arc<AtomicU64>,
    /// The highest batch the core has applied an answer to (so it is stored).
    answered_through: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
    stream: stream::Stream,
}

impl RequestsStream {
    /// Opens (creating if missing) the requests stream of the log in `settings` on
    /// `context`, and starts publishing.
    pub async fn open(
        context: &jetstream::Context,
        settings: &SequencerSettings,
    ) -> Result<RequestsStream, LogError> {
        let name = requests_stream_name(&settings.stream);
        let subject = requests_subject(&settings.stream);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            max_message_size: i32::try_from(matching_stub::wire::MAX_MESSAGE_LEN)
                .unwrap_or(i32::MAX),
            num_replicas: settings.replicas,
            duplicate_window: Duration::from_secs(10),
            ..Default::default()
        };
        let failed = |error: &dyn std::fmt::Display| LogError::Nats {
            what: "opening the engine requests stream",
            url: crate::sequencer::redacted(&settings.nats_url),
            error: error.to_string(),
        };
        let mut stream = context
            .get_or_create_stream(config)
            .await
            .map_err(|e| failed(&e))?;
        let last = stream
            .info()
            .await
            .map_err(|e| failed(&e))?
            .state
            .last_sequence;
        let stored_through = Arc::new(AtomicU64::new(last));
        let answered_through = Arc::new(AtomicU64::new(0));
        let published = Arc::new(AtomicU64::new(0));
        let (queue, queued) = mpsc::unbounded_channel();
        let publisher = Publisher {
            context: context.clone(),
            stream: stream.clone(),
            subject,
            stored_through: Arc::clone(&stored_through),
            answered_through: Arc::clone(&answered_through),
            published: Arc::clone(&published),
            eager_until: None,
        };
        tokio::spawn(publisher.run(queued));
        Ok(RequestsStream {
            queue,
            stored_through,
            answered_through,
            published,
            stream,
        })
    }

    /// Queues batches for the stream, in the core's order: at once if this gateway
    /// is the one that publishes (`publishes`), standing by otherwise.
    pub fn offer(&self, batches: Vec<OutgoingBatch>, publishes: bool) {
        let offered_at = Instant::now();
        for batch in batches {
            let _ = self.queue.send(Offered {
                batch,
                offered_at,
                publishes,
            });
        }
    }

    /// Says that the core has applied the answers up to batch `batch`: those are
    /// stored, and no gateway need publish them.
    pub fn answered_through(&self, batch: u64) {
        self.answered_through.fetch_max(batch, Ordering::Relaxed);
    }

    /// The number of the last batch the stream is known to hold.
    pub fn stored_through(&self) -> u64 {
        self.stored_through.load(Ordering::Relaxed)
    }

    /// Batches this gateway stored (the first copy of each).
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// The stream's last message, asked of NATS now.
    pub async fn last_batch(&self) -> Result<u64, String> {
        let mut stream = self.stream.clone();
        stream
            .info()
            .await
            .map(|info| info.state.last_sequence)
            .map_err(|e| e.to_string())
    }
}

/// A batch handed to the publisher.
#[derive(Debug)]
struct Offered {
    batch: OutgoingBatch,
    offered_at: Instant,
    /// Whether this gateway was the publishing one when the batch was made.
    publishes: bool,
}

/// Publishes queued batches in order; skips those the stream holds.
struct Publisher {
    context: jetstream::Context,
    stream: stream::Stream,
    subject: String,
    stored_through: Arc<AtomicU64>,
    answered_through: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
    /// Until when this standing-by gateway publishes at once.
    eager_until: Option<Instant>,
}

impl Publisher {
    /// The last batch known to be stored: by the stream's answers to this
    /// gateway, or answered.
    fn stored(&self) -> u64 {
        self.stored_through
            .load(Ordering::Relaxed)
            .max(self.answered_through.load(Ordering::Relaxed))
    }

    /// When the batch is to be published by this gateway.
    fn due(&self, offered: &Offered) -> Instant {
        let eager = self.eager_until.is_some_and(|until| Instant::now() < until);
        if offered.publishes || eager {
            offered.offered_at
        } else {
            offered.offered_at + STAND_BY
        }
    }

    async fn run(mut self, mut queued: mpsc::UnboundedReceiver<Offered>) {
        let mut pending: VecDeque<Offered> = VecDeque::new();
        // Rounds in a row in which a batch's predecessor was missing.
        let mut missing_rounds = 0u32;
        loop {
            if pending.is_empty() {
                match queued.recv().await {
                    Some(offered) => pending.push_back(offered),
                    None => return,
                }
            }
            while let Ok(offered) = queued.try_recv() {
                pending.push_back(offered);
            }
            let stored = self.stored();
            while pending
                .front()
                .is_some_and(|offered| offered.batch.number <= stored)
            {
                pending.pop_front();
            }
            let Some(front) = pending.front() else {
                continue;
            };
            let due = self.due(front);
            if due > Instant::now() {
                // Standing by: woken by the deadline or by more batches.
                tokio::select! {
                    () = tokio::time::sleep_until(due.into()) => {
                        // Stored meanwhile, by the publishing gateway? Asked once
                        // for every batch due now.
                        self.refresh().await;
                    }
                    more = queued.recv() => match more {
                        Some(offered) => pending.push_back(offered),
                        None => return,
                    },
                }
                continue;
            }
            let first = front.batch.number;
            if first > stored + 1 {
                // The batches between were made before this gateway's snapshot and
                // answered, or are another gateway's to publish; they must be in
                // the stream soon, or it is not this log's.
                missing_rounds += 1;
                if missing_rounds % 50 == 1 {
                    warn!(
                        stored_through = stored,
                        next = first,
                        "the engine requests stream lacks the batches before this gateway's next one; waiting for them"
                    );
                }
                tokio::time::sleep(RETRY_AFTER).await;
                self.refresh().await;
                continue;
            }
            missing_rounds = 0;
            let now = Instant::now();
            let due = pending
                .iter()
                .take_while(|offered| self.due(offered) <= now)
                .count();
            if !self
                .publish_round(pending.iter().take(due), !pending[0].publishes)
                .await
            {
                // Taken elsewhere, or not at all: the stream's state says which.
                self.refresh().await;
                if self.stored_through.load(Ordering::Relaxed) < first {
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    /// Publishes up to [`WINDOW`] of `batches`, pipelined; whether the stream took
    /// them all. A standing-by gateway (`standing_by`) whose copy is the one stored
    /// publishes at once for a while: the publishing gateway is gone.
    async fn publish_round<'a>(
        &mut self,
        batches: impl Iterator<Item = &'a Offered>,
        standing_by: bool,
    ) -> bool {
        let mut acks = Vec::with_capacity(WINDOW);
        for Offered { batch, .. } in batches.take(WINDOW) {
            let publish = jetstream::message::PublishMessage::build()
                .payload(batch.bytes.clone())
                .message_id(batch.number.to_string())
                .expected_last_sequence(batch.number - 1);
            match self
                .context
                .send_publish(self.subject.clone(), publish)
                .await
            {
                Ok(ack) => acks.push((batch.number, ack)),
                Err(_) => break,
            }
        }
        let mut all = !acks.is_empty();
        for (number, ack) in acks {
            let acked =
                tokio::time::timeout(ATTEMPT_TIMEOUT, std::future::IntoFuture::into_future(ack))
                    .await;
            match acked {
                Ok(Ok(ack)) => {
                    if ack.sequence != number {
                        error!(
                            batch = number,
                            stored_at = ack.sequence,
                            "the engine requests stream stored a batch out of place: it is not this log's"
                        );
                    }
                    if !ack.duplicate {
                        self.published.fetch_add(1, Ordering::Relaxed);
                        if standing_by {
                            self.eager_until = Some(Instant::now() + EAGER_FOR);
                        }
                    }
                    self.stored_through.fetch_max(number, Ordering::Relaxed);
                }
                // Another gateway stored it (or the one before is missing): the
                // refusal names the stream's last message.
                Ok(Err(error)) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    match stream_last(&error) {
                        Some(last) => {
                            self.stored_through.fetch_max(last, Ordering::Relaxed);
                            all &= last >= number;
                        }
                        None => all = false,
                    }
                }
                Ok(Err(_)) | Err(_) => all = false,
            }
        }
        all
    }

    /// Reads the stream's last message number, with a bound on the wait.
    async fn refresh(&self) {
        let mut stream = self.stream.clone();
        if let Ok(Ok(info)) = tokio::time::timeout(ATTEMPT_TIMEOUT, stream.info()).await {
            self.stored_through
                .fetch_max(info.state.last_sequence, Ordering::Relaxed);
        }
    }
}

/// The stream's last message as a refusal for a wrong last sequence names it
/// ("wrong last sequence: N").
fn stream_last(error: &async_nats::jetstream::context::PublishError) -> Option<u64> {
    let text = std::error::Error::source(error)?.to_string();
    let (_, after) = text.split_once("wrong last sequence: ")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
