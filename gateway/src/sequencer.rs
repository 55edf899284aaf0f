//! Crash-safe mode: the session core's inputs, in one order, on a NATS JetStream
//! stream that outlives the gateway.
//!
//! The *edge* (QUIC, TLS, decoding, authentication, what was sent on which
//! connection) turns everything that changes the *core* (sessions, their
//! exactly-once state, rings, tokens, timers, the book) into a [`Record`] and
//! appends it to the stream, in batches: one stream message carries every record the
//! gateway appended while the batch before it was being stored (the batcher). One
//! task reads the stream back, in order, and applies
//! each record to the core at the time the record carries ([`crate::members`]). The
//! core never reads a clock, a random generator or the edge's state, so a gateway
//! started again rebuilds every session, its unacknowledged messages and the book
//! by applying the stream from the beginning, and its clients resume with their
//! tokens.
//!
//! Several gateways can share one stream: each applies all of it, so each holds the
//! same core (every session, the book) and serves its own connections from it; a
//! client resumes on any of them. There is no leader to elect or lose: the order of
//! the stream is the only agreement needed, and which gateway runs are alive is
//! itself decided by records on the stream ([`crate::members`]).
//!
//! What stays at the edge and is not rebuilt: which connection wrote which message
//! (the edge checks acks against what it sent before they reach the stream), login
//! nonces and failed-login counters, latency samples, metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, object_store, stream};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::clock;
use crate::config::{SequencerSettings, DUPLICATE_WINDOW_MS};
use crate::time::Timestamp;
use gateway_core::input::{decode_batch, encode_batch, BATCH_HEADER, BATCH_OVERHEAD};
pub use gateway_core::input::{Entry, EntryError, Outcome, Record, MAX_RECORD_LEN};

/// Longest wait for one attempt at storing a batch.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Least wait for a batch's acknowledgement before the batch is sent again (the
/// earlier attempts still count): after a stream leader election, the next attempt
/// finds the new leader this soon at most. The wait is four times the recent
/// acknowledgement time if that is longer, so a busy stream is not sent
/// duplicates it would have stored anyway.
const RESEND_AFTER_MIN: Duration = Duration::from_millis(200);

/// Attempts at storing one batch whose acknowledgements are awaited at once; an
/// older one is given up on.
const ATTEMPTS_AWAITED: usize = 8;

/// How long a batch is sent again on one NATS connection before the gateway
/// connects to another server of the cluster. After a stream leader's loss, a
/// server has been seen answering "no responders" for the stream for 18 s while
/// the other survivor stored records from its own clients at once; a new
/// connection is cheap, and a leader election that simply takes long costs a
/// reconnection every few seconds.
const MOVE_AFTER: Duration = Duration::from_secs(3);

/// Why the stream could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// NATS or JetStream refused or did not answer.
    #[error("{what} (sequencer.nats_url = {url}): {error}")]
    Nats {
        /// What was being done.
        what: &'static str,
        /// The server.
        url: String,
        /// What went wrong.
        error: String,
    },
}

/// The stream of the core's inputs on JetStream.
pub struct JetStreamLog {
    stream: stream::Stream,
    /// The NATS connection's JetStream context (the requests stream's, too).
    context: jetstream::Context,
    subject: String,
    /// Where engines on the log append their answers (`<stream>.answers`).
    answers_subject: String,
    url: String,
    timeout: Duration,
    /// This gateway's start position (its `Started` record's).
    start: AtomicU64,
    /// Tickets for outcomes; the high half is this gateway's start position.
    next_ticket: AtomicU64,
    /// Batches the stream did not take within `sequencer.append_patience_ms`.
    failures: Arc<AtomicU64>,
    /// When this gateway last handed a record to NATS, Unix milliseconds: a
    /// gateway with nothing to say appends a heartbeat before the others think it
    /// gone.
    last_sent_ms: AtomicU64,
    waiting: dashmap::DashMap<u64, oneshot::Sender<Outcome>>,
    /// Where records queue for the [`Batcher`], which sends them to the stream.
    queue: mpsc::UnboundedSender<Queued>,
    /// Counts the times the connection to NATS came back after a loss: a NATS
    /// server that restarted has forgotten the read's consumer, so the read starts
    /// again, and the batch in flight is sent again at once.
    reconnections: watch::Sender<u64>,
    /// Where the core's snapshots are kept (the object store
    /// `<stream>_snapshots`); `None` when snapshots are off and none were taken.
    snapshots: Option<object_store::ObjectStore>,
    /// Whether storing a snapshot purges the records the one it replaces covered.
    purge_after_snapshot: bool,
}

impl std::fmt::Debug for JetStreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamLog")
            .field("subject", &self.subject)
            .field("url", &self.url)
            .field("start", &self.start)
            .field("snapshots", &self.snapshots.is_some())
            .finish_non_exhaustive()
    }
}

impl JetStreamLog {
    /// Connects to NATS and opens (creating if missing) the stream.
    pub async fn connect(settings: &SequencerSettings) -> Result<JetStreamLog, LogError> {
        let url = redacted(&settings.nats_url);
        let timeout = Duration::from_millis(settings.timeout_ms);
        let reconnections = watch::Sender::new(0);
        let (context, last_error) =
            jetstream_context(settings, Some(reconnections.clone())).await?;
        let subject = format!("{}.in", settings.stream);
        let answers_subject = answers_subject(&settings.stream);
        let config = stream::Config {
            name: settings.stream.clone(),
            subjects: vec![subject.clone(), answers_subject.clone()],
            storage: stream::StorageType::File,
            max_message_size: i32::try_from(MAX_RECORD_LEN).unwrap_or(i32::MAX),
            num_replicas: settings.replicas,
            duplicate_window: Duration::from_millis(DUPLICATE_WINDOW_MS),
            ..Default::default()
        };
        // A stream electing its leader does not answer its connected clients: a
        // gateway started then waits for it, as its appends would, rather than
        // give up. A NATS that cannot be reached fails the start at once.
        let patience = Duration::from_millis(settings.append_patience_ms);
        let began = Instant::now();
        let connected =
            || context.client().connection_state() == async_nats::connection::State::Connected;
        let opened = loop {
            let opened = context.get_or_create_stream(config.clone()).await;
            match &opened {
                Err(error)
                    if error.kind() == jetstream::context::CreateStreamErrorKind::TimedOut
                        && connected()
                        && began.elapsed() < patience =>
                {
                    warn!(%error, "the stream does not answer yet; asking again");
                }
                _ => break opened,
            }
        };
        let stream = opened.map_err(|error| {
            let connected = connected();
            let last = last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let hint = match error.kind() {
                _ if !connected => format!(
                    ": NATS is not reachable or refused the connection (is nats-server \
                         running? are sequencer.user and password_file, or token_file, \
                         right?){}",
                    last.map(|last| format!("; last error: {last}"))
                        .unwrap_or_default()
                ),
                jetstream::context::CreateStreamErrorKind::JetStreamUnavailable => {
                    ": this NATS server runs without JetStream (start it with -js)".into()
                }
                _ => String::new(),
            };
            settings_error(
                settings,
                "opening the JetStream stream",
                &format!("{error}{hint}"),
            )
        })?;
        let mut stream = stream;
        if !stream
            .cached_info()
            .config
            .subjects
            .contains(&answers_subject)
        {
            // A stream made before engines could answer on it takes their subject.
            let mut config = stream.cached_info().config.clone();
            config.subjects.push(answers_subject.clone());
            context.update_stream(config).await.map_err(|error| {
                settings_error(
                    settings,
                    "adding the engines' answers subject to the stream",
                    &error,
                )
            })?;
            stream = context
                .get_stream(&settings.stream)
                .await
                .map_err(|error| {
                    settings_error(settings, "opening the JetStream stream", &error)
                })?;
        }
        let snapshots = snapshot_store(&context, settings)
            .await
            .map_err(|error| settings_error(settings, "opening the snapshot store", &error))?;
        let failures = Arc::new(AtomicU64::new(0));
        let (queue, queued) = mpsc::unbounded_channel();
        let batcher = Batcher {
            context: context.clone(),
            subject: subject.clone(),
            url: url.clone(),
            id_prefix: message_id_prefix()?,
            max_records: settings.batch_max_records,
            patience: Duration::from_millis(settings.append_patience_ms),
            attempt_timeout: timeout.min(ATTEMPT_TIMEOUT),
            failures: Arc::clone(&failures),
            reconnections: reconnections.subscribe(),
            ack_time: RESEND_AFTER_MIN / 4,
        };
        tokio::spawn(batcher.run(queued));
        Ok(JetStreamLog {
            snapshots,
            purge_after_snapshot: settings.purge_after_snapshot,
            stream,
            context,
            subject,
            answers_subject,
            url,
            timeout,
            start: AtomicU64::new(0),
            next_ticket: AtomicU64::new(0),
            failures,
            queue,
            last_sent_ms: AtomicU64::new(0),
            waiting: dashmap::DashMap::new(),
            reconnections,
        })
    }

    /// Appends a record nobody waits on but the core must see, trying again while
    /// the stream does not store it (NATS away). For records that stored twice do
    /// nothing more (a lost connection).
    pub async fn append_until_stored(&self, record: Record) {
        let entry = self.entry(record, 0);
        let mut backoff = APPEND_BACKOFF_MIN;
        while let Err(error) = self.append(&entry).await {
            warn!(%error, "a record the core must see was not stored; trying again");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(APPEND_BACKOFF_MAX);
        }
    }

    /// Ends this gateway's run on the stream ([`Record::Stopped`]), waiting at most
    /// `patience` for the stream to store it. Without it the other gateways
    /// declare the run gone after `sequencer.gateway_timeout_ms`.
    pub async fn end_run(&self, patience: Duration) {
        let entry = self.entry(Record::Stopped, 0);
        let stored = tokio::time::timeout(patience, self.append(&entry)).await;
        if !matches!(stored, Ok(Ok(_))) {
            warn!("the stream did not take this run's end in time: the other gateways will declare it gone after sequencer.gateway_timeout_ms");
        }
    }

    /// Deletes the stream named in `settings` and its snapshots (for tools that
    /// make one per run).
    pub async fn delete_stream(settings: &SequencerSettings) -> Result<(), LogError> {
        let (context, _) = jetstream_context(settings, None).await?;
        // A run without snapshots (or without engines on the log) has none to delete.
        let _ = context.delete_object_store(snapshot_bucket(settings)).await;
        let requests = crate::requests_stream::requests_stream_name(&settings.stream);
        let _ = context.delete_stream(&requests).await;
        context
            .delete_stream(&settings.stream)
            .await
            .map(drop)
            .map_err(|error| settings_error(settings, "deleting the stream", &error))
    }

    /// Deletes the snapshots of the stream named in `settings`, so that the next
    /// gateway applies the whole stream (which must not have been purged): after
    /// an upgrade that reads snapshots of another format, say.
    pub async fn delete_snapshots(settings: &SequencerSettings) -> Result<(), LogError> {
        jetstream_context(settings, None)
            .await?
            .0
            .delete_object_store(snapshot_bucket(settings))
            .await
            .map_err(|error| settings_error(settings, "deleting the snapshots", &error))
    }

    /// Stores a snapshot of the core after the record at `position` (unless a later
    /// one is stored: an ended gateway run's late snapshot must not replace its
    /// successor's), then (`sequencer.purge_after_snapshot`) purges the records the
    /// snapshot it replaces covered from the stream. The records between the two
    /// stay: a gateway that is starting from the replaced snapshot still finds the
    /// records after it. Says whether it stored the snapshot.
    pub async fn save_snapshot(&self, position: u64, snapshot: &[u8]) -> Result<bool, LogError> {
        match self.snapshot_to_replace(position).await? {
            Some(replaced) => {
                self.store_snapshot(replaced, position, snapshot).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The first step of [`Self::save_snapshot`]: the position of the snapshot a
    /// new one at `position` replaces (0: none), or `None` if a stored one is not
    /// older (or snapshots are off).
    pub async fn snapshot_to_replace(&self, position: u64) -> Result<Option<u64>, LogError> {
        let Some(store) = &self.snapshots else {
            return Ok(None);
        };
        let stored = self.stored_snapshots(store).await?;
        let replaced = stored.last().map_or(0, |(stored, _)| *stored);
        Ok((replaced < position).then_some(replaced))
    }

    /// The second step of [`Self::save_snapshot`]: stores the snapshot at
    /// `position` under a name of its own, purges what the one at `replaced`
    /// covered, and deletes the snapshots before that one. A taker paused between
    /// the two steps may call it late, after its successor stored a later snapshot:
    /// its own is stored beside that one and never read, since a start reads the
    /// latest, and it deletes nothing the latest needs.
    pub async fn store_snapshot(
        &self,
        replaced: u64,
        position: u64,
        snapshot: &[u8],
    ) -> Result<(), LogError> {
        let Some(store) = &self.snapshots else {
            return Ok(());
        };
        let failed = |error: &dyn std::fmt::Display| self.error("storing a snapshot", error);
        let metadata = object_store::ObjectMetadata {
            name: snapshot_name(position),
            metadata: [
                (POSITION_KEY.to_owned(), position.to_string()),
                (STREAM_KEY.to_owned(), self.stream_id()),
            ]
            .into(),
            ..Default::default()
        };
        store
            .put(metadata, &mut &snapshot[..])
            .await
            .map_err(|e| failed(&e))?;
        if self.purge_after_snapshot && replaced > 0 {
            self.stream
                .purge()
                .sequence(replaced + 1)
                .await
                .map_err(|e| failed(&e))?;
        }
        for (older, name) in self.stored_snapshots(store).await? {
            if older >= replaced {
                break;
            }
            if let Err(error) = store.delete(&name).await {
                warn!(%error, snapshot = older, "an old core snapshot was not deleted");
            }
        }
        Ok(())
    }

    /// The snapshots in `store`: their positions and object names, earliest first.
    async fn stored_snapshots(
        &self,
        store: &object_store::ObjectStore,
    ) -> Result<Vec<(u64, String)>, LogError> {
        let failed = |error: &dyn std::fmt::Display| self.error("listing the snapshots", error);
        let mut listing = store.list().await.map_err(|e| failed(&e))?;
        let mut stored = Vec::new();
        while let Some(info) = listing.next().await {
            let info = info.map_err(|e| failed(&e))?;
            if let (false, Some(position)) = (info.deleted, snapshot_position(&info.metadata)) {
                stored.push((position, info.name));
            }
        }
        stored.sort_unstable();
        Ok(stored)
    }

    /// What names this stream among any others of its name: when it was created. A
    /// stream deleted and made again, or restored from another backup, has another.
    fn stream_id(&self) -> String {
        self.stream
            .cached_info()
            .created
            .unix_timestamp_nanos()
            .to_string()
    }

    /// The NATS connection's JetStream context.
    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    /// The position of the stream's last record (0 when it has none).
    pub async fn last_position(&self) -> Result<u64, LogError> {
        self.stream
            .get_info()
            .await
            .map(|info| info.state.last_sequence)
            .map_err(|error| self.error("reading the stream's state", &error))
    }

    /// The latest snapshot stored, if any. A read that does not finish within three
    /// times `sequencer.timeout_ms` (the snapshot was deleted meanwhile and its
    /// chunks with it) is tried again with the latest then. A snapshot taken of
    /// another stream of the same name (deleted and made again, or restored from
    /// another backup) is refused: its core does not belong to these records.
    pub async fn load_snapshot(&self) -> Result<Option<Vec<u8>>, LogError> {
        let Some(store) = &self.snapshots else {
            return Ok(None);
        };
        let failed = |error: &dyn std::fmt::Display| self.error("reading the snapshot", error);
        let read = || async {
            let Some((_, name)) = self.stored_snapshots(store).await?.pop() else {
                return Ok(None);
            };
            let mut object = match store.get(&name).await {
                Ok(object) => object,
                Err(error) if error.kind() == object_store::GetErrorKind::NotFound => {
                    return Ok(None)
                }
                Err(error) => return Err(failed(&error)),
            };
            let taken_of = object.info().metadata.get(STREAM_KEY).cloned();
            if taken_of
                .as_ref()
                .is_some_and(|taken_of| *taken_of != self.stream_id())
            {
                return Err(failed(&format!(
                    "the snapshot {name} was taken of another stream of this name (the stream \
                     was deleted and made again, or restored from another backup): delete \
                     the object store {}_snapshots, or restore the stream it belongs to",
                    self.stream.cached_info().config.name
                )));
            }
            let mut bytes = Vec::with_capacity(object.info().size);
            tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes)
                .await
                .map_err(|e| failed(&e))?;
            Ok(Some(bytes))
        };
        let patience = self.timeout * SNAPSHOT_READ_ATTEMPTS;
        for _ in 1..SNAPSHOT_READ_ATTEMPTS {
            match tokio::time::timeout(patience, read()).await {
                Ok(read) => return read,
                Err(_) => warn!("reading the core snapshot is taking too long; reading it again"),
            }
        }
        tokio::time::timeout(patience, read())
            .await
            .map_err(|e| failed(&e))?
    }

    /// Appends `entry` and waits for the stream to store it; returns the position
    /// of the message (batch) that holds it.
    pub async fn append(&self, entry: &Entry) -> Result<u64, LogError> {
        let stored = self.send(entry)?;
        self.stored(stored).await
    }

    /// Queues `entry` for the stream: entries are stored in the order they are
    /// queued, whoever queues them. The returned receiver says when the stream has
    /// stored it (or gave up after `sequencer.append_patience_ms`).
    pub fn send(&self, entry: &Entry) -> Result<Stored, LogError> {
        self.last_sent_ms
            .fetch_max(entry.time_ms, Ordering::Relaxed);
        let (done, stored) = oneshot::channel();
        let queued = Queued {
            bytes: entry.encode(),
            done,
        };
        self.queue
            .send(queued)
            .map_err(|_| self.batcher_stopped())?;
        Ok(stored)
    }

    /// Waits for the stream to store an entry [`Self::send`] queued; returns the
    /// position of its batch.
    pub async fn stored(&self, stored: Stored) -> Result<u64, LogError> {
        match stored.await {
            Ok(result) => result,
            Err(_) => Err(self.batcher_stopped()),
        }
    }

    /// How long since this gateway last appended anything, at `now`.
    pub fn silent_for(&self, now: Timestamp) -> Duration {
        let last = self.last_sent_ms.load(Ordering::Relaxed);
        Duration::from_millis(now.as_millis().saturating_sub(last))
    }

    /// Batches the stream did not take within `sequencer.append_patience_ms`, so
    /// far.
    pub fn append_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The batcher task is gone (the runtime is shutting down).
    fn batcher_stopped(&self) -> LogError {
        self.error("appending to the stream", &"the batcher stopped")
    }

    fn error(&self, what: &'static str, error: &dyn std::fmt::Display) -> LogError {
        LogError::Nats {
            what,
            url: self.url.clone(),
            error: error.to_string(),
        }
    }

    /// Makes ticket numbers unique to this gateway's run, which started at
    /// `position` of the stream.
    pub fn set_start(&self, position: u64) {
        self.start.store(position, Ordering::Release);
        self.next_ticket.store(position << 32, Ordering::Release);
    }

    /// This gateway's run on the stream: its `Started` record's position.
    pub fn run(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    /// An entry of this gateway, stamped now.
    pub fn entry(&self, record: Record, reply: u64) -> Entry {
        Entry {
            from: self.start.load(Ordering::Acquire),
            time_ms: clock::now().as_millis(),
            reply,
            record,
        }
    }

    /// A fresh ticket (also used as a connection id: both are unique to the run).
    pub fn ticket(&self) -> u64 {
        self.next_ticket.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Appends `record` with a ticket and waits for its outcome once applied.
    pub async fn call(&self, record: Record, ticket: u64) -> Result<Outcome, LogError> {
        let (answer, outcome) = oneshot::channel();
        self.waiting.insert(ticket, answer);
        let appended = self.append(&self.entry(record, ticket)).await;
        let outcome = match appended {
            Ok(_) => tokio::time::timeout(self.timeout, outcome)
                .await
                .map_err(|e| self.error("waiting for the core", &e))
                .and_then(|answer| answer.map_err(|e| self.error("waiting for the core", &e))),
            Err(error) => Err(error),
        };
        self.waiting.remove(&ticket);
        outcome
    }

    /// Hands an applied record's outcome to whoever waits on its ticket.
    pub fn answer(&self, ticket: u64, outcome: Outcome) {
        if let Some((_, answer)) = self.waiting.remove(&ticket) {
            let _ = answer.send(outcome);
        }
    }

    /// Reads the stream from the message after `after` (0: from the beginning), in
    /// order, calling `apply` with each message's entries (a batch) and its stream
    /// position. A
    /// read that fails (NATS restarted and forgot the consumer, the connection
    /// dropped) goes on after the last record applied, retrying for as long as NATS
    /// is away. Returns only if records the core has not applied are gone from the
    /// stream: it cannot go on deterministically.
    pub async fn follow(&self, after: u64, mut apply: impl FnMut(Vec<Entry>, u64)) -> LogError {
        let started = Instant::now();
        let mut last_position = after;
        let mut reconnections = self.reconnections.subscribe();
        loop {
            reconnections.mark_unchanged();
            let mut messages = self.start_read(last_position + 1).await;
            // A connection that comes back ends this read at once; the next read
            // starts after the last record applied. So does a read that stalled:
            // quiet for a whole check with records on the stream, at its start,
            // after the last one applied (its consumer went with a NATS server of a
            // cluster; the client library would notice only after 30 s). A record
            // appended just before a check is not yet a stall.
            let mut stall_check = tokio::time::interval(READ_STALL);
            stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut read_since_check = true;
            // The stream's last position at the previous check, if the read was
            // behind it then.
            let mut behind: Option<u64> = None;
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = reconnections.changed() => {
                        info!(after = last_position, "NATS is back: reading the stream on");
                        break;
                    }
                    _ = stall_check.tick() => {
                        if std::mem::take(&mut read_since_check) {
                            behind = None;
                            continue;
                        }
                        if behind.is_some_and(|last| last > last_position) {
                            warn!(after = last_position, last = behind, "the read of the stream stalled; reading it again");
                            break;
                        }
                        // A stream that does not answer (electing its leader) is
                        // asked again at the next check.
                        let last = self.last_position();
                        behind = match tokio::time::timeout(STALL_CHECK_PATIENCE, last).await {
                            Ok(Ok(last)) if last > last_position => Some(last),
                            _ => None,
                        };
                        continue;
                    }
                };
                read_since_check = true;
                let Some(message) = message else { break };
                let message = match message {
                    Ok(message) => message,
                    Err(error) => {
                        warn!(%error, after = last_position, "reading the stream failed; reading on");
                        break;
                    }
                };
                let position = match message.info() {
                    Ok(info) => info.stream_sequence,
                    Err(error) => {
                        warn!(%error, after = last_position, "a record without its position; reading on");
                        break;
                    }
                };
                if position <= last_position {
                    // Read again after a restarted read: applied already.
                    continue;
                }
                if position != last_position + 1 {
                    let missing =
                        format!("records {} to {} are gone", last_position + 1, position - 1);
                    return self.error("reading the stream", &missing);
                }
                last_position = position;
                if message.subject.as_str() == self.answers_subject {
                    let answer = Record::EngineAnswer {
                        answer: message.payload.to_vec(),
                    };
                    let entry = Entry {
                        from: 0,
                        time_ms: 0,
                        reply: 0,
                        record: answer,
                    };
                    apply(vec![entry], position);
                    continue;
                }
                match decode_batch(&message.payload) {
                    Ok(entries) => apply(entries, position),
                    Err(error) => {
                        warn!(position, %error, "skipping an unreadable batch of records")
                    }
                }
                if position % 100_000 == 0 {
                    info!(
                        applied = position,
                        elapsed_ms =
                            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "applying the stream"
                    );
                }
            }
        }
    }

    /// Starts an ordered read of the stream from `position` on, asking again every
    /// [`READ_RETRY`] while no attempt has answered and keeping the earlier
    /// attempts (at most [`READ_ATTEMPTS`]): the first to answer is the read. A
    /// stream electing its leader answers no attempt; one lost in the election is
    /// not waited for once the stream answers again.
    async fn start_read(&self, position: u64) -> consumer::pull::Ordered {
        use futures_util::stream::FuturesUnordered;
        let mut attempts = FuturesUnordered::new();
        let mut retry = tokio::time::interval(READ_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = retry.tick(), if attempts.len() < READ_ATTEMPTS => {
                    attempts.push(self.read_from(position));
                }
                Some(read) = attempts.next(), if !attempts.is_empty() => match read {
                    Ok(messages) => return messages,
                    Err(error) => {
                        // Said once, then every few seconds of a long outage.
                        if failures % 16 == 0 {
                            warn!(%error, after = position - 1, "cannot read the stream; retrying");
                        }
                        failures += 1;
                    }
                },
            }
        }
    }

    /// An ordered read of the stream from `position` on.
    async fn read_from(&self, position: u64) -> Result<consumer::pull::Ordered, LogError> {
        let deliver_policy = if position <= 1 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: position,
            }
        };
        let consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|error| self.error("reading the stream", &error))?;
        consumer
            .messages()
            .await
            .map_err(|error| self.error("reading the stream", &error))
    }
}

/// How often a read of the stream that brings nothing asks the stream whether it
/// has records the read missed; one check later, with those still not read, the
/// read stalled (its consumer went with the stream's leader): a read resumes this
/// soon after a leader election, twice this at most.
const READ_STALL: Duration = Duration::from_millis(100);

/// Longest wait for the stream's last position when a read is quiet: a stream
/// busy with the backlog after an election may take a while to answer, one
/// electing its leader does not answer at all.
const STALL_CHECK_PATIENCE: Duration = Duration::from_millis(300);

/// First wait before a record the core must see is appended again after its
/// append failed; it doubles up to [`APPEND_BACKOFF_MAX`].
const APPEND_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between attempts at appending a record the core must see.
const APPEND_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// How often the start of a read of the stream is asked for again while no
/// attempt has answered: a read starts this soon after a leader election at most.
/// (Waiting out the request timeout, 2–5 s, for a request the election lost added
/// seconds to a stall.)
const READ_RETRY: Duration = Duration::from_millis(200);

/// Most attempts at starting a read awaited at once.
const READ_ATTEMPTS: usize = 8;

/// Says when the stream stored a queued entry: the position of its batch.
pub type Stored = oneshot::Receiver<Result<u64, LogError>>;

/// An encoded entry waiting for the batcher.
struct Queued {
    bytes: bytes::Bytes,
    done: oneshot::Sender<Result<u64, LogError>>,
}

/// Sends a gateway's queued entries to the stream in batches, one batch at a time:
/// a batch leaves as soon as the one before it is stored, with what queued
/// meanwhile. A batch the stream does not take (NATS away, a leader election) is
/// sent again under the same message id until it is stored or
/// `sequencer.append_patience_ms` has passed; JetStream stores a message id once
/// within its duplicate window, and with one batch in flight a later batch never
/// overtakes one sent again, so records are stored once and in order.
struct Batcher {
    context: jetstream::Context,
    subject: String,
    url: String,
    /// Random, so that message ids differ between gateways and runs.
    id_prefix: String,
    max_records: usize,
    patience: Duration,
    attempt_timeout: Duration,
    failures: Arc<AtomicU64>,
    /// The connection's reconnections ([`JetStreamLog::reconnections`]).
    reconnections: watch::Receiver<u64>,
    /// The recent time from a batch's first attempt to its acknowledgement.
    ack_time: Duration,
}

impl Batcher {
    async fn run(mut self, mut queued: mpsc::UnboundedReceiver<Queued>) {
        let mut next: Option<Queued> = None;
        for batch_number in 1u64.. {
            let first = match next.take() {
                Some(first) => first,
                None => match queued.recv().await {
                    Some(first) => first,
                    None => return,
                },
            };
            let mut size = BATCH_HEADER + first.bytes.len() + BATCH_OVERHEAD;
            let mut batch = vec![first];
            while batch.len() < self.max_records {
                let Ok(more) = queued.try_recv() else { break };
                size += more.bytes.len() + BATCH_OVERHEAD;
                if size > MAX_RECORD_LEN {
                    next = Some(more);
                    break;
                }
                batch.push(more);
            }
            let (bytes, done): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|q| (q.bytes, q.done)).unzip();
            let id = format!("{}-{batch_number}", self.id_prefix);
            let batch = encode_batch(clock::now().as_millis(), &bytes);
            let result = self.store(&id, batch).await;
            for done in done {
                let _ = done.send(result.clone());
            }
        }
    }

    /// Stores one batch, sending it again under the same message id while the
    /// stream does not take it, for up to the patience: after [`Self::resend_after`]
    /// without an acknowledgement, and at once when the connection to NATS is back.
    /// Every attempt's acknowledgement counts (a duplicate's names the position of
    /// the one stored).
    async fn store(&mut self, id: &str, payload: bytes::Bytes) -> Result<u64, LogError> {
        use futures_util::stream::FuturesUnordered;
        let began = Instant::now();
        let mut acks = FuturesUnordered::new();
        let mut error = String::new();
        let mut attempts = 0u32;
        // Since the connection this batch is sent on came up (or the batch's
        // first attempt).
        let mut on_this_connection = began;
        loop {
            attempts += 1;
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(id);
            let sent = Instant::now();
            match self
                .context
                .send_publish(self.subject.clone(), publish)
                .await
            {
                Ok(ack) => {
                    if acks.len() >= ATTEMPTS_AWAITED {
                        acks = FuturesUnordered::new();
                    }
                    acks.push(tokio::time::timeout(
                        self.attempt_timeout,
                        std::future::IntoFuture::into_future(ack),
                    ));
                }
                Err(failed) => error = failed.to_string(),
            }
            self.reconnections.mark_unchanged();
            let resend = tokio::time::sleep(self.resend_after());
            tokio::pin!(resend);
            loop {
                tokio::select! {
                    Some(acked) = acks.next(), if !acks.is_empty() => match acked {
                        Ok(Ok(ack)) => {
                            if attempts == 1 {
                                self.ack_time = (self.ack_time * 7 + sent.elapsed()) / 8;
                            }
                            return Ok(ack.sequence);
                        }
                        Ok(Err(failed)) => error = failed.to_string(),
                        Err(elapsed) => error = elapsed.to_string(),
                    },
                    () = &mut resend => break,
                    _ = self.reconnections.changed() => {
                        on_this_connection = Instant::now();
                        break;
                    }
                }
            }
            if began.elapsed() >= self.patience {
                self.failures.fetch_add(1, Ordering::Relaxed);
                return Err(LogError::Nats {
                    what: "appending to the stream (for sequencer.append_patience_ms)",
                    url: self.url.clone(),
                    error,
                });
            }
            // Said once, then every few seconds of a long outage.
            if attempts % 16 == 1 {
                warn!(%error, batch = id, attempts, "the stream did not take a batch yet; sending it again");
            }
            if on_this_connection.elapsed() >= MOVE_AFTER {
                warn!(%error, batch = id, "the stream took nothing on this NATS connection for {MOVE_AFTER:?}: connecting again, to another server if there is one");
                let _ = self.context.client().force_reconnect().await;
                on_this_connection = Instant::now();
            }
        }
    }

    /// How long an attempt waits for its acknowledgement before the batch is sent
    /// again: [`RESEND_AFTER_MIN`], or four times the recent acknowledgement time,
    /// within the attempt timeout.
    fn resend_after(&self) -> Duration {
        (self.ack_time * 4).clamp(RESEND_AFTER_MIN, self.attempt_timeout.max(RESEND_AFTER_MIN))
    }
}

/// The subject of the log `stream` on which engines append their answers.
pub fn answers_subject(stream: &str) -> String {
    format!("{stream}.answers")
}

/// A message id prefix no other gateway run uses.
fn message_id_prefix() -> Result<String, LogError> {
    let random: [u8; 8] = crate::dev::random().map_err(|error| LogError::Nats {
        what: "drawing the batches' message ids",
        url: String::new(),
        error: error.to_string(),
    })?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

/// What went wrong doing `what` with the NATS server of `settings`.
fn settings_error(
    settings: &SequencerSettings,
    what: &'static str,
    error: &dyn std::fmt::Display,
) -> LogError {
    LogError::Nats {
        what,
        url: redacted(&settings.nats_url),
        error: error.to_string(),
    }
}

/// The object store of a stream's snapshots: `<stream>_snapshots`.
pub fn snapshot_bucket(settings: &SequencerSettings) -> String {
    format!("{}_snapshots", settings.stream)
}

/// A snapshot's name in its store: `core-` and its position, zero-padded.
fn snapshot_name(position: u64) -> String {
    format!("core-{position:020}")
}

/// The object metadata key holding the snapshot's stream position.
const POSITION_KEY: &str = "position";
/// The object metadata key naming the stream the snapshot was taken of (its
/// creation time, nanoseconds since the epoch).
const STREAM_KEY: &str = "stream";
/// Reads of the snapshot at start before the gateway gives up.
const SNAPSHOT_READ_ATTEMPTS: u32 = 3;

/// The position a stored snapshot's metadata carries.
fn snapshot_position(metadata: &std::collections::HashMap<String, String>) -> Option<u64> {
    metadata.get(POSITION_KEY)?.parse().ok()
}

/// The snapshot store of `settings`' stream: opened if it exists, created (file
/// storage) if snapshots are on; `None` if they are off and none were ever taken.
async fn snapshot_store(
    context: &jetstream::Context,
    settings: &SequencerSettings,
) -> Result<Option<object_store::ObjectStore>, String> {
    let bucket = snapshot_bucket(settings);
    if let Ok(store) = context.get_object_store(&bucket).await {
        return Ok(Some(store));
    }
    if settings.snapshot_every == 0 {
        return Ok(None);
    }
    context
        .create_object_store(object_store::Config {
            bucket,
            description: Some("snapshots of the gateway's core".into()),
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            ..Default::default()
        })
        .await
        .map(Some)
        .map_err(|error| error.to_string())
}

/// The servers of `sequencer.nats_url`: one URL, or several separated by commas
/// (the servers of a cluster; the client tries them in turn and learns the others
/// from the cluster itself).
fn server_urls(nats_url: &str) -> Vec<&str> {
    nats_url
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// The last error the NATS server or the connection to it reported, if any.
type LastNatsError = Arc<std::sync::Mutex<Option<String>>>;

/// `url` without the user and password it may carry, for messages and logs.
pub(crate) fn redacted(url: &str) -> String {
    let one = |url: &str| match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    };
    server_urls(url)
        .into_iter()
        .map(one)
        .collect::<Vec<_>>()
        .join(",")
}

/// A JetStream context on a new connection to the NATS server of `settings`;
/// `reconnections` counts the times the connection is back after a loss. Also
/// returns where the connection's last error is kept.
async fn jetstream_context(
    settings: &SequencerSettings,
    reconnections: Option<watch::Sender<u64>>,
) -> Result<(jetstream::Context, LastNatsError), LogError> {
    let timeout = Duration::from_millis(settings.timeout_ms);
    let failed =
        |error: &dyn std::fmt::Display| settings_error(settings, "connecting to NATS", error);
    let secret = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_owned())
            .map_err(|error| {
                let error = format!("{}: {error}", path.display());
                settings_error(settings, "reading the NATS credentials", &error)
            })
    };
    let last_error = LastNatsError::default();
    let mut options = async_nats::ConnectOptions::new();
    if let (Some(user), Some(path)) = (&settings.user, &settings.password_file) {
        options = options.user_and_password(user.clone(), secret(path)?);
    }
    if let Some(path) = &settings.token_file {
        options = options.token(secret(path)?);
    }
    let readable = |setting: &str, path: &std::path::Path| {
        std::fs::metadata(path).map(drop).map_err(|error| {
            let error = format!("{}: {error}", path.display());
            settings_error(
                settings,
                "reading the NATS TLS files",
                &format!("{setting} {error}"),
            )
        })
    };
    if let Some(path) = &settings.tls_ca_file {
        readable("sequencer.tls_ca_file", path)?;
        options = options
            .add_root_certificates(path.clone())
            .require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) {
        readable("sequencer.tls_cert_file", cert)?;
        readable("sequencer.tls_key_file", key)?;
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let client = options
        .connection_timeout(timeout)
        .request_timeout(Some(timeout))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback({
            let last_error = Arc::clone(&last_error);
            // The first connection is no reconnection: nothing to read again.
            let connected_before = Arc::new(std::sync::atomic::AtomicBool::new(false));
            move |event| {
                let reconnections = reconnections.clone();
                let last_error = Arc::clone(&last_error);
                let connected_before = Arc::clone(&connected_before);
                async move {
                    let error = match &event {
                        async_nats::Event::Connected => {
                            let again = connected_before.swap(true, Ordering::Relaxed);
                            if let (true, Some(reconnections)) = (again, reconnections) {
                                reconnections.send_modify(|count| *count += 1);
                            }
                            return;
                        }
                        async_nats::Event::ServerError(error) => error.to_string(),
                        async_nats::Event::ClientError(error) => error.to_string(),
                        _ => return,
                    };
                    *last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
                }
            }
        })
        .connect(server_urls(&settings.nats_url));
    let client = tokio::time::timeout(timeout, client)
        .await
        .map_err(|e| failed(&e))?
        .map_err(|e| failed(&e))?;
    Ok((jetstream::new(client), last_error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_lists_its_servers_and_messages_hide_their_credentials() {
        let urls = "nats://a:1, nats://u:secret@b:2,";
        assert_eq!(server_urls(urls), ["nats://a:1", "nats://u:secret@b:2"]);
        assert_eq!(redacted(urls), "nats://a:1,nats://…@b:2");
    }
}
