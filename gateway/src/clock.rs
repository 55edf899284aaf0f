//! The gateway's clock: the time it hands the core with every input.
//!
//! It is monotonic: cancel-on-disconnect grace periods, detached expiry and
//! message-rate buckets must not jump when the system clock is stepped (NTP, an
//! operator). It starts at the wall clock when the process first reads it and then
//! advances with the monotonic clock, so it stays close to Unix time (token expiries
//! travel inside tokens as Unix milliseconds). Only checks against a *client's* wall
//! clock (the login timestamp) use [`wall_now`].

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::time::Timestamp;

/// A monotonic clock expressed in Unix milliseconds: the wall clock at `started`,
/// advanced by the monotonic time since.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    started: Instant,
    wall_at_start: Timestamp,
}

impl MonotonicClock {
    /// A clock reading `wall_at_start` at the instant `started`.
    pub const fn new(started: Instant, wall_at_start: Timestamp) -> Self {
        MonotonicClock {
            started,
            wall_at_start,
        }
    }

    /// The time at `instant` (never before the start).
    pub fn at(&self, instant: Instant) -> Timestamp {
        self.wall_at_start
            .plus(instant.saturating_duration_since(self.started))
    }
}

/// Now, on the process's monotonic clock.
pub fn now() -> Timestamp {
    static CLOCK: OnceLock<MonotonicClock> = OnceLock::new();
    CLOCK
        .get_or_init(|| MonotonicClock::new(Instant::now(), wall_now()))
        .at(Instant::now())
}

/// The system's wall clock now, for comparing with a client's clock.
pub fn wall_now() -> Timestamp {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Timestamp::from_millis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_advances_with_monotonic_time_whatever_the_wall_clock_does() {
        let started = Instant::now();
        let clock = MonotonicClock::new(started, Timestamp::from_millis(1_000_000));
        let later = started + Duration::from_millis(2_500);
        assert_eq!(clock.at(later), Timestamp::from_millis(1_002_500));
        // An instant before the start (another thread's older reading) is the start.
        assert_eq!(
            clock.at(started
                .checked_sub(Duration::from_millis(5))
                .unwrap_or(started)),
            Timestamp::from_millis(1_000_000)
        );
    }

    #[test]
    fn now_never_goes_back_and_starts_at_the_wall_clock() {
        let first = now();
        let second = now();
        assert!(second >= first);
        let wall = wall_now().as_millis();
        assert!(first.as_millis().abs_diff(wall) < 60_000);
    }
}
