//! The seam between the edge and the core: every input of the core is a [`Record`]
//! appended to a log, and the core applies it from there
//! ([`gateway_core::Core::apply`]).
//!
//! Embedded mode's log is in memory: it applies each record at once, in the task
//! that appends it, and forgets it. Crash-safe mode's is the JetStream stream
//! ([`crate::sequencer`]): the follower task applies it in the stream's order, and
//! the appender waits for the outcome if it needs one. The edge appends the same
//! records the same way in both; the mode is which log it was given.
//!
//! The methods that append take `apply`, how the edge applies a record now; only
//! the memory log calls it (the stream's follower applies the stream's records).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::clock;
use crate::sequencer::{Entry, JetStreamLog, LogError, Outcome, Record, Stored};
use crate::time::Timestamp;

/// Where the core's inputs go.
pub enum Log {
    /// Embedded mode: applied at once, kept nowhere.
    Memory(MemoryLog),
    /// Crash-safe mode: a JetStream stream that outlives the gateway.
    JetStream(Arc<JetStreamLog>),
}

/// How the edge applies a record now: the entry and its log position in, the
/// core's outcome out.
pub trait Apply: FnOnce(Entry, u64) -> Outcome {}
impl<F: FnOnce(Entry, u64) -> Outcome> Apply for F {}

/// A record on its way to the stream, confirmed by [`Log::confirm`].
pub type Pending = Stored;

impl Log {
    /// This gateway's run on the log: the position of its `Started` record, the
    /// high half of its connection ids and tickets.
    pub fn run(&self) -> u64 {
        match self {
            Log::Memory(memory) => memory.run,
            Log::JetStream(stream) => stream.run(),
        }
    }

    /// A fresh ticket (also used as a connection id: both are unique to the run).
    pub fn ticket(&self) -> u64 {
        match self {
            Log::Memory(memory) => memory.next_ticket.fetch_add(1, Ordering::Relaxed) + 1,
            Log::JetStream(stream) => stream.ticket(),
        }
    }

    /// Whether the log, and with it every session, outlives this process: then
    /// a stop drains and leaves the sessions to resume elsewhere; otherwise they end
    /// with the gateway.
    pub fn outlives_the_process(&self) -> bool {
        matches!(self, Log::JetStream(_))
    }

    /// Appends `record` and waits until it is applied; returns its outcome. The
    /// stream is given `ticket` to answer on.
    pub async fn call(
        &self,
        record: Record,
        ticket: u64,
        apply: impl Apply,
    ) -> Result<Outcome, LogError> {
        match self {
            Log::Memory(memory) => Ok(memory.apply(record, apply)),
            Log::JetStream(stream) => stream.call(record, ticket).await,
        }
    }

    /// Appends `record`, after every record appended before it. Applied already if
    /// it returns `None`; otherwise it is queued for the stream, and
    /// [`Log::confirm`] says when the stream has stored it.
    pub async fn send(
        &self,
        record: Record,
        apply: impl Apply,
    ) -> Result<Option<Pending>, LogError> {
        match self {
            Log::Memory(memory) => {
                memory.apply(record, apply);
                Ok(None)
            }
            Log::JetStream(stream) => stream.send(&stream.entry(record, 0)).map(Some),
        }
    }

    /// Waits until a record [`Log::send`] handed to the stream is stored.
    pub async fn confirm(&self, pending: Pending) -> Result<(), LogError> {
        match self {
            Log::Memory(_) => Ok(()),
            Log::JetStream(stream) => stream.stored(pending).await.map(drop),
        }
    }

    /// Appends a record nobody waits on; a failure is logged (the core then never
    /// sees it). For records whose loss the next one makes good (timer ticks).
    pub async fn append(&self, record: Record, apply: impl Apply) {
        match self {
            Log::Memory(memory) => {
                memory.apply(record, apply);
            }
            Log::JetStream(stream) => {
                if let Err(error) = stream.append(&stream.entry(record, 0)).await {
                    warn!(%error, "a record was not stored");
                }
            }
        }
    }

    /// Appends a record the core must see, trying again while the stream does not
    /// store it (NATS away). For records that applied twice do nothing more.
    pub async fn append_until_stored(&self, record: Record, apply: impl Apply) {
        match self {
            Log::Memory(memory) => {
                memory.apply(record, apply);
            }
            Log::JetStream(stream) => stream.append_until_stored(record).await,
        }
    }

    /// [`Log::append_until_stored`] from a thread outside the async runtime (the
    /// engine's): the stream's append runs on `runtime` while the thread waits.
    pub fn append_from_thread(
        &self,
        record: Record,
        runtime: &tokio::runtime::Handle,
        apply: impl Apply,
    ) {
        match self {
            Log::Memory(memory) => {
                memory.apply(record, apply);
            }
            Log::JetStream(stream) => runtime.block_on(stream.append_until_stored(record)),
        }
    }

    /// Whether this gateway should tell the others it is alive (a heartbeat
    /// `Tick`): it has been silent on the stream for `after`. Never on the memory
    /// log, which no other gateway reads.
    pub fn heartbeat_due(&self, now: Timestamp, after: Duration) -> bool {
        match self {
            Log::Memory(_) => false,
            Log::JetStream(stream) => stream.silent_for(now) >= after,
        }
    }

    /// Appends the stream refused or did not acknowledge in time, so far.
    pub fn append_failures(&self) -> u64 {
        match self {
            Log::Memory(_) => 0,
            Log::JetStream(stream) => stream.append_failures(),
        }
    }

    /// Ends this gateway's run on the stream, waiting at most `patience` (see
    /// [`JetStreamLog::end_run`]); nothing to end on the memory log.
    pub async fn end_run(&self, patience: Duration) {
        if let Log::JetStream(stream) = self {
            stream.end_run(patience).await;
        }
    }
}

/// Embedded mode's log: a position counter; each record is applied as it comes.
pub struct MemoryLog {
    run: u64,
    next_position: AtomicU64,
    next_ticket: AtomicU64,
}

impl MemoryLog {
    /// The position of the memory log's `Started` record (its first).
    pub const RUN: u64 = 1;

    /// An empty log whose run starts with `started` ([`Record::Started`]), applied
    /// with `apply`.
    pub fn start(started: Record, apply: impl Apply) -> Self {
        let entry = Entry {
            from: 0,
            time_ms: clock::now().as_millis(),
            reply: 0,
            record: started,
        };
        apply(entry, Self::RUN);
        MemoryLog {
            run: Self::RUN,
            next_position: AtomicU64::new(Self::RUN + 1),
            next_ticket: AtomicU64::new(Self::RUN << 32),
        }
    }

    /// Applies `record` now, stamped with this run and the clock.
    fn apply(&self, record: Record, apply: impl Apply) -> Outcome {
        let position = self.next_position.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            from: self.run,
            time_ms: clock::now().as_millis(),
            reply: 0,
            record,
        };
        apply(entry, position)
    }
}
