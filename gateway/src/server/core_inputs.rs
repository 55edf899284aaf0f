//! The edge's side of each input: [`Shared::apply`] applies a record to the core
//! and carries out what the core asks for (writers to wake, connections to close),
//! counts the engine's answers and hands order queries their answer. The memory log
//! calls it as records are appended; crash-safe mode's follower, as it reads the
//! stream.

use gateway_core::Effects;
use matching_stub as engine;
use tracing::info;

use super::Shared;
use crate::sequencer::{Entry, LogError, Outcome, Record};

impl Shared {
    /// Applies the log's record at `position` to the core; returns its outcome.
    pub(super) fn apply(&self, entry: Entry, position: u64) -> Outcome {
        let mut effects = Effects::default();
        let outcome = self.core.apply(entry, position, &mut effects);
        self.carry_out(effects);
        outcome
    }

    /// After the last record of one message of the log: publishes the batch of
    /// engine requests its records made (engines on the log).
    pub(super) fn end_of_input(&self) {
        let mut effects = Effects::default();
        self.core.end_of_input(&mut effects);
        if let Some(stream) = self.requests.get() {
            stream.answered_through(self.core.engine_answered_through());
        }
        self.carry_out(effects);
    }

    /// Appends `record` to the log and waits for its outcome (`ticket`: what the
    /// stream answers on).
    pub(super) async fn call(&self, record: Record, ticket: u64) -> Result<Outcome, LogError> {
        let apply = |entry, position| self.apply(entry, position);
        self.log.call(record, ticket, apply).await
    }

    /// Does what applying an input asked of the edge.
    fn carry_out(&self, effects: Effects) {
        let Effects {
            mut wake,
            close,
            events,
            requests,
        } = effects;
        if let Some(stream) = self.requests.get() {
            if !requests.is_empty() {
                // The gateway that takes the snapshots publishes; the others stand by.
                let publishes = self.core.members().snapshot_taker() == Some(self.log.run());
                stream.offer(requests, publishes);
            }
        }
        // A core being rebuilt applies again what earlier processes counted.
        let counting = self.is_accepting();
        for event in events {
            match event {
                engine::Event::OrderStates {
                    account,
                    tag,
                    orders,
                } => self.answer_query(tag, account, orders),
                event if counting => self.count_event(&event),
                _ => {}
            }
        }
        if wake.len() > 1 {
            wake.sort_unstable();
            wake.dedup();
        }
        for conn_id in wake {
            self.wake(conn_id);
        }
        for (conn, reason) in close {
            // Said once per connection of this gateway (a connection's late frames,
            // or a core rebuilding, ask again).
            if let Some(conn_handle) = self.conns.get(&conn) {
                if conn_handle.closing().is_none() {
                    info!(conn, reason = reason.name(), "closing connection");
                }
                conn_handle.close(reason);
            }
        }
    }
}
