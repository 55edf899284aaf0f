//! Crash-safe mode's log follower: applies the stream to the core in order, says
//! when the gateway's own `Started` record is applied (the core is rebuilt), stops
//! the gateway when its run has ended, and has the earliest live gateway store core
//! snapshots.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::Shared;
use crate::sequencer::{JetStreamLog, Record};

/// Crash-safe mode: applies the stream to the core, in order, from the record after
/// `after` (the restored snapshot's, or 0) for as long as the gateway runs; says when
/// the record at `start` (this gateway's `Started`) is applied. Every
/// `snapshot_every` records the earliest live gateway run snapshots the core and
/// stores the snapshot in the background. The gateway has failed if its stream lost
/// records the core needs, or when its own run has ended (another gateway started
/// under its name, or it was silent too long and the others moved on).
pub(super) async fn follow_log(
    shared: Arc<Shared>,
    log: Arc<JetStreamLog>,
    (after, start, snapshot_every): (u64, u64, u64),
    caught_up: oneshot::Sender<()>,
) {
    let mut caught_up = Some(caught_up);
    let mut snapshots = Snapshots::new(snapshot_every);
    // Set once this run's own `Stopped` record is applied: the gateway is stopping.
    let mut stopped = false;
    let error = log
        .follow(after, |entries, position| {
            snapshots.applied(entries.len());
            for entry in entries {
                if stopped {
                    return;
                }
                stopped = entry.from == start && matches!(entry.record, Record::Stopped);
                let reply = entry.reply;
                let outcome = shared.apply(entry, position);
                if reply != 0 {
                    log.answer(reply, outcome);
                }
            }
            shared.end_of_input();
            if position < start || stopped {
                return;
            }
            if let Some(caught_up) = caught_up.take() {
                let _ = caught_up.send(());
            }
            let members = shared.core.members();
            if !members.is_live(start) {
                // Its records are fenced off and its connections declared gone:
                // this gateway must not answer for any session any more.
                drop(members);
                if shared.failed.borrow().is_none() {
                    let why = format!(
                        "this gateway's run (started at position {start}) ended at position \
                         {position}: another gateway started under its sequencer.gateway_name, \
                         or it was silent on the stream for longer than \
                         sequencer.gateway_timeout_ms"
                    );
                    tracing::error!("{why}: the gateway stops");
                    shared.failed.send_replace(Some(why));
                }
                return;
            }
            let takes_snapshots = members.snapshot_taker() == Some(start);
            drop(members);
            if takes_snapshots {
                snapshots.after(position, &shared, &log);
            }
        })
        .await;
    tracing::error!(%error, "the core cannot go on with its stream: the gateway stops");
    shared.failed.send_replace(Some(error.to_string()));
}

/// When the core is snapshotted, and whether a snapshot is still being stored.
struct Snapshots {
    every: u64,
    /// Records applied since the latest snapshot (or the start).
    since: u64,
    storing: Arc<AtomicBool>,
}

impl Snapshots {
    fn new(every: u64) -> Self {
        Snapshots {
            every,
            since: 0,
            storing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts records applied.
    fn applied(&mut self, records: usize) {
        self.since = self.since.saturating_add(records as u64);
    }

    /// After the batch at `position`: snapshots the core if one is due and the last
    /// one is stored (a slow store delays the next snapshot, never the core), and
    /// stores it in the background.
    fn after(&mut self, position: u64, shared: &Arc<Shared>, log: &Arc<JetStreamLog>) {
        if self.every == 0 || self.since < self.every || self.storing.load(Ordering::Acquire) {
            return;
        }
        let taken = Instant::now();
        let Some(image) = shared.core.image(position) else {
            return;
        };
        let bytes = image.encode();
        let encode_us = u64::try_from(taken.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.since = 0;
        self.storing.store(true, Ordering::Release);
        let (storing, shared, log) = (
            Arc::clone(&self.storing),
            Arc::clone(shared),
            Arc::clone(log),
        );
        tokio::spawn(async move {
            match log.save_snapshot(position, &bytes).await {
                // A later snapshot is stored already (a successor's).
                Ok(false) => {}
                Ok(true) => {
                    info!(
                        position,
                        bytes = bytes.len(),
                        encode_us,
                        store_ms = u64::try_from(taken.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "core snapshot stored"
                    );
                    shared.snapshot_position.store(position, Ordering::Relaxed);
                }
                Err(error) => {
                    warn!(
                        position,
                        %error,
                        "a core snapshot was not stored; the next is due sequencer.snapshot_every records on"
                    );
                    shared.snapshot_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            storing.store(false, Ordering::Release);
        });
    }
}
