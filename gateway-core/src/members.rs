//! Which gateways share the stream (crash-safe mode), and the core's time: the core's
//! record of every gateway run, kept from the stream alone so that every gateway's
//! copy of the core agrees on it.
//!
//! A run begins with its `Started` record and is named by that record's stream
//! position (the high half of its connection ids). It ends when a run of the same
//! gateway name starts (a restart), when it says it stops, or when the core has heard
//! nothing from it for longer than the timeout it announced, in core time: killed,
//! cut off from NATS, or paused. The connections of a run that ended are gone, and its
//! later records are fenced off, so a paused gateway that wakes up changes nothing.
//!
//! **Silence after an outage of the stream.** While the stream takes no records (a
//! NATS leader election), no gateway is heard and the core's time stands still;
//! when it takes them again, the first gateway's batch moves the core's time past
//! the outage, and the others' batches land a moment later. So a run is declared
//! gone only once it has been silent for its timeout *and* for a further tenth of
//! it (its grace) since it was first found overdue: a live gateway's batch lands
//! within the grace, however long the outage was; a dead gateway's run ends a
//! tenth of its timeout later than the timeout alone would end it.
//!
//! **Time.** Every record carries its gateway's monotonic clock at the append. The
//! core's time is read off the live runs' clocks, each shifted to meet the core's time
//! at the run's `Started` record: a record of a run moves the core's time to that
//! run's clock (shifted), if that is later. So the core's time advances as fast as the
//! fastest live gateway's monotonic clock and no faster; a stepped wall clock, of a
//! NATS server or of a gateway, moves nothing; a record of a run that ended moves
//! nothing either. While no gateway runs, the core's time stands still. Being a
//! function of the records alone, it is the same in every replica.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// One live gateway run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Run {
    /// The gateway's name (`sequencer.gateway_name`).
    name: String,
    /// How long it may stay silent, milliseconds of core time.
    timeout_ms: u64,
    /// The fingerprint of its core settings.
    settings: u64,
    /// The core's time at its latest record.
    last_heard_ms: u64,
    /// The core's time when it was first found silent for longer than its timeout,
    /// since its latest record.
    overdue_since_ms: Option<u64>,
    /// Its gateway's clock at its `Started` record, and the core's time then: its
    /// later records read the core's time as `core_at_start + (sent - sent_at_start)`.
    sent_at_start_ms: u64,
    core_at_start_ms: u64,
}

impl Run {
    /// How long an overdue run may stay silent before it is declared gone: a tenth
    /// of its timeout.
    fn grace_ms(&self) -> u64 {
        self.timeout_ms / 10
    }

    /// The core's time by this run's clock, for a record it sent at `sent_ms`.
    fn core_time_at(&self, sent_ms: u64) -> u64 {
        self.core_at_start_ms
            .saturating_add(sent_ms.saturating_sub(self.sent_at_start_ms))
    }
}

/// The live gateway runs on the stream, by start position, and the core's time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    runs: BTreeMap<u64, Run>,
    /// The core's time, Unix milliseconds (0 before the first record).
    now_ms: u64,
}

impl Members {
    /// The core's time: where the latest record applied left it.
    pub fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.now_ms)
    }

    /// A gateway named `name` started a run at `position` with core `settings`,
    /// to be declared gone after `timeout_ms` of silence, its gateway's clock reading
    /// `sent_ms`. Returns the core's time (unchanged, but for the first record of a
    /// stream, which sets it to `sent_ms`) and the run of the same name it replaces,
    /// which has ended.
    pub fn started(
        &mut self,
        name: &str,
        position: u64,
        (timeout_ms, settings): (u64, u64),
        sent_ms: u64,
    ) -> (Timestamp, Option<u64>) {
        if self.now_ms == 0 {
            self.now_ms = sent_ms;
        }
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
                last_heard_ms: self.now_ms,
                overdue_since_ms: None,
                sent_at_start_ms: sent_ms,
                core_at_start_ms: self.now_ms,
            },
        );
        (self.now(), replaced)
    }

    /// A record of the run that started at `from`, sent when its gateway's clock read
    /// `sent_ms`: if that run is live (its record takes effect), advances the core's
    /// time by the run's clock, notes the run heard, and returns the core's time.
    pub fn heard(&mut self, from: u64, sent_ms: u64) -> Option<Timestamp> {
        let run = self.runs.get_mut(&from)?;
        self.now_ms = self.now_ms.max(run.core_time_at(sent_ms));
        run.last_heard_ms = self.now_ms;
        run.overdue_since_ms = None;
        Some(Timestamp::from_millis(self.now_ms))
    }

    /// The run that started at `from` said it stops: it ends now. Returns whether it
    /// was live.
    pub fn stopped(&mut self, from: u64) -> bool {
        self.runs.remove(&from).is_some()
    }

    /// Notes the runs silent for longer than their timeout now as overdue, and
    /// ends those overdue for longer than their grace; returns the ended ones.
    pub fn expire(&mut self) -> Vec<u64> {
        let now = self.now_ms;
        let mut silent = Vec::new();
        for (start, run) in &mut self.runs {
            if now.saturating_sub(run.last_heard_ms) <= run.timeout_ms {
                continue;
            }
            let overdue_since = *run.overdue_since_ms.get_or_insert(now);
            if now.saturating_sub(overdue_since) > run.grace_ms() {
                silent.push(*start);
            }
        }
        for start in &silent {
            self.runs.remove(start);
        }
        silent
    }

    /// Whether the run that started at `start` is live.
    pub fn is_live(&self, start: u64) -> bool {
        self.runs.contains_key(&start)
    }

    /// The earliest started live run other than `start`, if its core settings are
    /// not `settings`: its gateway's name. The earliest run is the one the others
    /// agreed with; a later one that was refused (and has not ended yet) does not
    /// stand in the way of a gateway with the right settings.
    pub fn other_settings(&self, start: u64, settings: u64) -> Option<&str> {
        self.runs
            .iter()
            .find(|(other, _)| **other != start)
            .filter(|(_, run)| run.settings != settings)
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

    const SECOND: u64 = 1_000;
    /// A gateway clock's reading some time after the epoch.
    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn a_restart_under_the_same_name_ends_the_earlier_run_only() {
        let mut members = Members::default();
        assert_eq!(members.started("a", 1, (1_000, 0), T0).1, None);
        assert_eq!(members.started("b", 5, (1_000, 0), T0).1, None);
        assert_eq!(members.started("a", 9, (1_000, 0), T0 + 10).1, Some(1));
        assert!(!members.is_live(1));
        assert!(members.is_live(5) && members.is_live(9));
        assert_eq!(
            members.heard(1, T0 + 20),
            None,
            "the ended run's records are fenced"
        );
        assert_eq!(members.snapshot_taker(), Some(5));
    }

    #[test]
    fn a_run_silent_past_its_timeout_ends_and_stays_ended() {
        let mut members = Members::default();
        members.started("a", 1, (1_000, 0), T0);
        members.started("b", 2, (3_000, 7), T0);
        assert!(members.heard(1, T0 + 900).is_some());
        assert!(members.heard(2, T0 + 1_900).is_some());
        assert!(members.expire().is_empty());
        assert_eq!(members.other_settings(2, 7), Some("a"));
        assert_eq!(members.other_settings(1, 0), Some("b"));
        assert!(members.heard(2, T0 + 1_901).is_some());
        assert!(members.expire().is_empty(), "overdue, within its grace");
        assert!(members.heard(2, T0 + 2_001).is_some());
        assert!(members.expire().is_empty(), "a tenth of its timeout");
        assert!(members.heard(2, T0 + 2_002).is_some());
        assert_eq!(members.expire(), vec![1]);
        assert_eq!(members.other_settings(2, 7), None);
        assert_eq!(
            members.heard(1, T0 + 2_050),
            None,
            "a paused run that wakes up is fenced"
        );
        assert_eq!(members.now(), Timestamp::from_millis(T0 + 2_002));
        // Only a record moves the core's time: b's own next one, 3 s later.
        assert!(members.heard(2, T0 + 5_000).is_some());
        assert_eq!(members.expire(), Vec::<u64>::new());
        assert!(members.stopped(2));
        assert_eq!(members.snapshot_taker(), None);
    }

    #[test]
    fn settings_are_checked_against_the_earliest_run_not_a_refused_later_one() {
        let mut members = Members::default();
        members.started("a", 1, (10_000, 5), T0);
        members.started("b", 2, (10_000, 5), T0);
        members.started("c", 3, (10_000, 6), T0);
        assert_eq!(members.other_settings(3, 6), Some("a"), "c is refused");
        // b restarts with the settings of a while c's run is still live.
        members.started("b", 4, (10_000, 5), T0);
        assert_eq!(members.other_settings(4, 5), None);
    }

    #[test]
    fn a_run_that_says_it_stops_ends_at_once_and_is_fenced() {
        let mut members = Members::default();
        members.started("a", 1, (10_000, 0), T0);
        members.started("b", 2, (10_000, 0), T0);
        assert!(members.stopped(1));
        assert!(!members.stopped(1), "once");
        assert_eq!(members.heard(1, T0 + 1), None);
        assert_eq!(members.snapshot_taker(), Some(2), "b takes snapshots now");
    }

    #[test]
    fn the_core_time_follows_the_gateways_clocks_each_shifted_at_its_start() {
        let mut members = Members::default();
        // The stream's first record sets the epoch.
        assert_eq!(members.started("a", 1, (10_000, 0), T0).0.as_millis(), T0);
        // b's wall clock was an hour ahead when its process started: it does not
        // matter, its clock is read from where the core's time was at its start.
        let b0 = T0 + 3_600 * SECOND;
        members.heard(1, T0 + 2 * SECOND);
        assert_eq!(
            members.started("b", 2, (10_000, 0), b0).0.as_millis(),
            T0 + 2 * SECOND
        );
        assert_eq!(
            members.heard(2, b0 + SECOND).map(Timestamp::as_millis),
            Some(T0 + 3 * SECOND)
        );
        // A record that a's gateway sent earlier but the stream stored later does
        // not take the time back.
        assert_eq!(
            members.heard(1, T0 + 2_500).map(Timestamp::as_millis),
            Some(T0 + 3 * SECOND)
        );
        assert_eq!(
            members.heard(1, T0 + 4 * SECOND).map(Timestamp::as_millis),
            Some(T0 + 4 * SECOND)
        );
    }

    /// The core's time over a sequence of records of one run, one every `step_ms` by
    /// its gateway's clock, starting at `T0`.
    fn core_times(members: &mut Members, run: u64, records: u64, step_ms: u64) -> Vec<u64> {
        (1..=records)
            .filter_map(|i| members.heard(run, T0 + i * step_ms))
            .map(Timestamp::as_millis)
            .collect()
    }

    #[test]
    fn no_wall_clock_step_of_either_sign_moves_the_core_time_or_ends_a_run() {
        // Two gateways, a record every 100 ms each, while the NATS leader's clock (or
        // any gateway's wall clock) steps 60 s forward, then 120 s back: the records'
        // monotonic send times do not see the steps, and nor does the core.
        let mut members = Members::default();
        members.started("a", 1, (1_000, 0), T0);
        members.started("b", 2, (1_000, 0), T0);
        for i in 1..=200u64 {
            let sent = T0 + i * 100;
            assert_eq!(
                members.heard(1 + i % 2, sent).map(Timestamp::as_millis),
                Some(sent)
            );
            assert!(members.expire().is_empty(), "record {i}: no run ends");
        }
        // A silent run still ends after its timeout in core time, no sooner.
        let last = T0 + 200 * 100;
        assert!(members.heard(1, last + 800).is_some());
        assert!(members.expire().is_empty());
        assert!(members.heard(1, last + 901).is_some());
        assert!(members.expire().is_empty(), "overdue, within its grace");
        assert!(members.heard(1, last + 1_002).is_some());
        assert_eq!(members.expire(), vec![2]);
    }

    #[test]
    fn an_outage_of_the_stream_longer_than_the_timeout_ends_no_run_whose_batch_lands_soon_after() {
        // Two gateways, a record every 100 ms each; then the stream takes nothing
        // for 30 s (three timeouts). a's batch lands first, its records stamped
        // when the batch left: the core's time moves 30 s on, and b is overdue.
        let mut members = Members::default();
        members.started("a", 1, (10_000, 0), T0);
        members.started("b", 2, (10_000, 0), T0);
        for i in 1..=10u64 {
            members.heard(1 + i % 2, T0 + i * 100);
        }
        let back = T0 + 31_000;
        for sent in [back, back, back + 5, back + 400] {
            assert!(members.heard(1, sent).is_some());
            assert!(members.expire().is_empty(), "b is overdue, not gone");
        }
        // b's batch, sent again a moment after the stream came back, lands within
        // b's grace (a tenth of its timeout).
        assert!(members.heard(2, back + 200).is_some());
        assert!(members.expire().is_empty());
        assert!(members.is_live(1) && members.is_live(2));
        // A gateway that stays silent ends after its timeout and grace.
        assert!(members.heard(1, back + 400 + 10_001).is_some());
        assert!(members.expire().is_empty());
        assert!(members.heard(1, back + 400 + 11_002).is_some());
        assert_eq!(members.expire(), vec![2]);
        // Had b's batch come later than the grace, b would have ended.
        let mut late = Members::default();
        late.started("a", 1, (10_000, 0), T0);
        late.started("b", 2, (10_000, 0), T0);
        late.heard(1, back);
        assert!(late.expire().is_empty());
        late.heard(1, back + 1_001);
        assert_eq!(late.expire(), vec![2]);
    }

    #[test]
    fn the_core_time_advances_as_fast_as_the_gateways_clocks_and_no_faster() {
        let mut members = Members::default();
        members.started("a", 1, (60_000, 0), T0);
        let times = core_times(&mut members, 1, 50, 100);
        assert_eq!(times, (1..=50).map(|i| T0 + i * 100).collect::<Vec<_>>());
        // A gateway paused for 30 s (a zombie) reads the time it really was.
        assert_eq!(
            members.heard(1, T0 + 35 * SECOND).map(Timestamp::as_millis),
            Some(T0 + 35 * SECOND)
        );
    }

    #[test]
    fn while_no_gateway_runs_the_core_time_stands_still() {
        let mut members = Members::default();
        members.started("a", 1, (1_000, 0), T0);
        members.heard(1, T0 + 500);
        assert!(members.stopped(1));
        // Its successor starts ten minutes later by its own clock.
        let later = T0 + 600 * SECOND;
        assert_eq!(
            members.started("a", 2, (1_000, 0), later).0.as_millis(),
            T0 + 500
        );
        assert_eq!(
            members.heard(2, later + 200).map(Timestamp::as_millis),
            Some(T0 + 700)
        );
    }
}
