//! Engines on the log (`engine.mode = "external"`, ENGINE.md): the requests
//! stream, `<stream>_requests`, where the gateways publish the core's batches of
//! engine requests for engines in their own processes to read.
//!
//! Batch `m` must be message `m` of the stream, so that an engine reads the
//! requests in one order, without a gap or a duplicate, and restarts from any
//! batch. Every gateway applying the log makes the same batches and publishes
//! each one it does not know to be stored, with `Nats-Expected-Last-Sequence:
//! m - 1`: the stream stores the first copy and refuses the others (and any batch
//! whose predecessor is not stored yet). No gateway leads: a batch is published as
//! long as one gateway is alive.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    queue: mpsc::UnboundedSender<OutgoingBatch>,
    stored_through: Arc<AtomicU64>,
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
        let published = Arc::new(AtomicU64::new(0));
        let (queue, queued) = mpsc::unbounded_channel();
        let publisher = Publisher {
            context: context.clone(),
            stream: stream.clone(),
            subject,
            stored_through: Arc::clone(&stored_through),
            published: Arc::clone(&published),
        };
        tokio::spawn(publisher.run(queued));
        Ok(RequestsStream {
            queue,
            stored_through,
            published,
            stream,
        })
    }

    /// Queues batches for the stream, in the core's order.
    pub fn offer(&self, batches: Vec<OutgoingBatch>) {
        for batch in batches {
            let _ = self.queue.send(batch);
        }
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

/// Publishes queued batches in order; skips those the stream holds.
struct Publisher {
    context: jetstream::Context,
    stream: stream::Stream,
    subject: String,
    stored_through: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
}

impl Publisher {
    async fn run(self, mut queued: mpsc::UnboundedReceiver<OutgoingBatch>) {
        let mut pending: VecDeque<OutgoingBatch> = VecDeque::new();
        // Rounds in a row in which a batch's predecessor was missing.
        let mut missing_rounds = 0u32;
        loop {
            if pending.is_empty() {
                match queued.recv().await {
                    Some(batch) => pending.push_back(batch),
                    None => return,
                }
            }
            while let Ok(batch) = queued.try_recv() {
                pending.push_back(batch);
            }
            let stored = self.stored_through.load(Ordering::Relaxed);
            while pending.front().is_some_and(|batch| batch.number <= stored) {
                pending.pop_front();
            }
            let Some(first) = pending.front().map(|batch| batch.number) else {
                continue;
            };
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
            if !self.publish_round(&pending).await {
                // Taken elsewhere, or not at all: the stream's state says which.
                self.refresh().await;
                if self.stored_through.load(Ordering::Relaxed) < first {
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    /// Publishes up to [`WINDOW`] batches from the front of `pending`, pipelined;
    /// whether the stream took them all.
    async fn publish_round(&self, pending: &VecDeque<OutgoingBatch>) -> bool {
        let mut acks = Vec::with_capacity(WINDOW);
        for batch in pending.iter().take(WINDOW) {
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
