//! Which gateways share the stream (crash-safe mode): the core's record of every
//! gateway run, kept from the stream alone so that every gateway's copy of the core
//! agrees on it.
//!
//! A run begins with its `Started` record and is named by that record's stream
//! position (the high half of its connection ids). It ends when a run of the same
//! gateway name starts (a restart), or when the core has heard nothing from it for
//! longer than the timeout it announced, in log time: killed, cut off from NATS, or
//! paused. The connections of a run that ended are gone, and its later records are
//! fenced off, so a paused gateway that wakes up changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::session::ConnectionId;
use crate::time::Timestamp;

/// The gateway run that accepted a connection: the high half of its id (the
/// position of the run's `Started` record; 0 in embedded mode).
pub fn run_of(conn: ConnectionId) -> u64 {
    conn >> 32
}

/// One live gateway run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Run {
    /// The gateway's name (`sequencer.gateway_name`).
    name: String,
    /// How long it may stay silent, milliseconds of log time.
    timeout_ms: u64,
    /// The fingerprint of its core settings.
    settings: u64,
    /// The log time of its latest record.
    last_heard_ms: u64,
}

/// The live gateway runs on the stream, by start position.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    runs: BTreeMap<u64, Run>,
}

impl Members {
    /// A gateway named `name` started a run at `position` with core `settings`,
    /// to be declared gone after `timeout_ms` of silence. Returns the run of the
    /// same name it replaces, which has ended.
    pub fn started(
        &mut self,
        name: &str,
        position: u64,
        (timeout_ms, settings): (u64, u64),
        now: Timestamp,
    ) -> Option<u64> {
        let replaced = self
            .runs
            .iter()
            .find_map(|(start, run)| (run.name == name).then_some(*start));
        if let Some(replaced) = replaced {
            self.runs.remove(&replaced);
        }
        self.runs.insert(
            position,
            Run {
                name: name.to_owned(),
                timeout_ms,
                settings,
                last_heard_ms: now.as_millis(),
            },
        );
        replaced
    }

    /// A record of the run that started at `from` was applied at `now`: says
    /// whether that run is live (its record takes effect), and if so notes it.
    pub fn heard(&mut self, from: u64, now: Timestamp) -> bool {
        match self.runs.get_mut(&from) {
            Some(run) => {
                run.last_heard_ms = run.last_heard_ms.max(now.as_millis());
                true
            }
            None => false,
        }
    }

    /// Ends the runs silent for longer than their timeout at `now`; returns them.
    pub fn expire(&mut self, now: Timestamp) -> Vec<u64> {
        let now = now.as_millis();
        let silent: Vec<u64> = self
            .runs
            .iter()
            .filter(|(_, run)| now.saturating_sub(run.last_heard_ms) > run.timeout_ms)
            .map(|(start, _)| *start)
            .collect();
        for start in &silent {
            self.runs.remove(start);
        }
        silent
    }

    /// Whether the run that started at `start` is live.
    pub fn is_live(&self, start: u64) -> bool {
        self.runs.contains_key(&start)
    }

    /// A live run, other than `start`, whose core settings are not `settings`:
    /// its gateway's name.
    pub fn other_settings(&self, start: u64, settings: u64) -> Option<&str> {
        self.runs
            .iter()
            .find(|(other, run)| **other != start && run.settings != settings)
            .map(|(_, run)| run.name.as_str())
    }

    /// The live run that snapshots the core for everyone: the earliest started.
    pub fn snapshot_taker(&self) -> Option<u64> {
        self.runs.keys().next().copied()
    }

    /// The live runs' names and start positions, earliest first.
    pub fn live(&self) -> impl Iterator<Item = (&str, u64)> {
        self.runs
            .iter()
            .map(|(start, run)| (run.name.as_str(), *start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn a_restart_under_the_same_name_ends_the_earlier_run_only() {
        let mut members = Members::default();
        assert_eq!(members.started("a", 1, (1_000, 0), at(0)), None);
        assert_eq!(members.started("b", 5, (1_000, 0), at(0)), None);
        assert_eq!(members.started("a", 9, (1_000, 0), at(10)), Some(1));
        assert!(!members.is_live(1));
        assert!(members.is_live(5) && members.is_live(9));
        assert!(
            !members.heard(1, at(20)),
            "the ended run's records are fenced"
        );
        assert_eq!(members.snapshot_taker(), Some(5));
    }

    #[test]
    fn a_run_silent_past_its_timeout_ends_and_stays_ended() {
        let mut members = Members::default();
        members.started("a", 1, (1_000, 0), at(0));
        members.started("b", 2, (3_000, 7), at(0));
        assert!(members.heard(1, at(900)));
        assert!(members.expire(at(1_900)).is_empty());
        assert_eq!(members.other_settings(2, 7), Some("a"));
        assert_eq!(members.other_settings(1, 0), Some("b"));
        assert_eq!(members.expire(at(1_901)), vec![1]);
        assert_eq!(members.other_settings(2, 7), None);
        assert!(
            !members.heard(1, at(1_950)),
            "a paused run that wakes up is fenced"
        );
        assert_eq!(members.expire(at(3_001)), vec![2]);
        assert_eq!(members.snapshot_taker(), None);
    }

    #[test]
    fn the_run_of_a_connection_is_the_high_half_of_its_id() {
        assert_eq!(run_of(7 << 32 | 3), 7);
        assert_eq!(run_of(3), 0);
    }
}
