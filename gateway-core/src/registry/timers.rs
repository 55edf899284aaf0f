//! Detached sessions and their timers: cancel-on-disconnect and expiry deadlines,
//! connections declared gone with their gateway run, and the sweep that fires what is due.

use super::*;

/// How often [`Registry::handle_timeouts`] also checks every session, in case a timer
/// was armed by a path that did not schedule it.
pub(super) const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Sessions' next deadlines, soonest first, at most one live entry per session (a
/// replaced later entry stays in the heap as stale until it comes up).
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Timestamp, u64)>>,
    /// Each session's live deadline (what a core snapshot keeps).
    pub(super) pending: HashMap<u64, Timestamp>,
}

impl Timers {
    /// Makes sure the session is looked at by `at`.
    pub(super) fn schedule(&mut self, session_id: u64, at: Timestamp) {
        if self.pending.get(&session_id).is_some_and(|&due| due <= at) {
            return;
        }
        self.pending.insert(session_id, at);
        self.heap.push(Reverse((at, session_id)));
    }

    /// Takes the sessions due by `now` into `due`.
    pub(super) fn take_due(&mut self, now: Timestamp, due: &mut Vec<u64>) {
        while let Some(&Reverse((at, session_id))) = self.heap.peek() {
            if at > now {
                return;
            }
            self.heap.pop();
            if self.pending.get(&session_id) == Some(&at) {
                self.pending.remove(&session_id);
                due.push(session_id);
            }
        }
    }
}

impl Registry {
    /// A gateway run ended (crash-safe mode: replaced by a restart, or silent too
    /// long): every connection it accepted is gone. Sessions attached to one are
    /// detached, starting their cancel-on-disconnect and expiry clocks.
    pub fn run_ended(&self, run: u64, now: Timestamp) {
        self.detach_where(now, |session| {
            session
                .attached_to()
                .is_some_and(|conn| crate::connection::run_of(conn) == run)
        });
    }

    /// Detaches the session attached to `conn`, if any (a connection the IO layer
    /// knows no session of; rare, so every session is looked at).
    pub fn connection_abandoned(&self, conn: ConnectionId, now: Timestamp) {
        self.detach_where(now, |session| session.attached_to() == Some(conn));
    }

    /// Detaches, in session order (a core rebuilt from a log does the same), every
    /// attached session for which `gone`, shown each session under its lock, says
    /// its connection is gone.
    pub(super) fn detach_where(&self, now: Timestamp, mut gone: impl FnMut(&mut Session) -> bool) {
        for session_id in self.session_ids() {
            let Some(session) = self.get(session_id) else {
                continue;
            };
            let attached = {
                let mut guard = lock(&session);
                let gone = gone(&mut guard);
                guard.attached_to().filter(|_| gone)
            };
            if let Some(conn) = attached {
                self.connection_lost(&session, conn, now);
            }
        }
    }

    /// Whether [`Self::handle_timeouts`] has anything to do at `now`: a timer is
    /// due, or the once-a-second check of every session.
    pub fn timers_due(&self, now: Timestamp) -> bool {
        let next = self
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .heap
            .peek()
            .map(|Reverse((at, _))| *at);
        if next.is_some_and(|at| at <= now) {
            return true;
        }
        !self.is_empty()
            && self
                .last_full_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none_or(|at| now >= at.plus(FULL_SWEEP_EVERY))
    }

    /// Tells the session its connection `conn` is gone (it detaches if that was its
    /// connection) and schedules the timers that arms.
    pub fn connection_lost(&self, session: &SessionHandle, conn: ConnectionId, now: Timestamp) {
        let mut guard = lock(session);
        guard.connection_lost(conn, now);
        if let Some(at) = guard.next_timeout() {
            self.schedule(guard.id(), at);
        }
    }

    pub(super) fn schedule(&self, session_id: u64, at: Timestamp) {
        self.timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .schedule(session_id, at);
    }

    /// Fires due cancel-on-disconnect and expiry timers: those scheduled, and, once
    /// a second, any other session's.
    pub fn handle_timeouts(&self, now: Timestamp, out: &mut Vec<Action>) {
        let mut due = Vec::new();
        self.timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_due(now, &mut due);
        let sweep = {
            let mut last = self
                .last_full_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let sweep = last.is_none_or(|at| now >= at.plus(FULL_SWEEP_EVERY));
            if sweep {
                *last = Some(now);
            }
            sweep
        };
        if sweep {
            due.extend(self.sessions.iter().map(|entry| *entry.key()));
        }
        // In session order, not the map's: a core rebuilt from a log must do the
        // same things in the same order.
        due.sort_unstable();
        due.dedup();
        for session_id in due {
            let Some(session) = self.get(session_id) else {
                continue;
            };
            let start = out.len();
            {
                let mut guard = lock(&session);
                if guard.next_timeout().is_some_and(|at| at <= now) {
                    guard.handle_timeout(now, out);
                }
                if let Some(at) = guard.next_timeout() {
                    self.schedule(session_id, at);
                }
            }
            self.settle(session_id, &out[start..]);
        }
    }
}
