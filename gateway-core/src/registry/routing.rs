//! Engine events to sessions: the session an event belongs to, or (for an order that
//! outlived its session) the account's newest live session, or a queue for the next login.

use super::*;

/// What the owner of an order is told when another session of its account cancelled
/// or replaced it: the same change, unsolicited (`client_seq` 0).
pub(super) fn notice(event: &engine::Event) -> engine::Event {
    match *event {
        engine::Event::Cancelled {
            owner,
            order_id,
            client_order_id,
            cancelled_quantity,
            reason,
            ..
        } => engine::Event::Cancelled {
            owner,
            requester: owner,
            tag: None,
            order_id,
            client_order_id,
            cancelled_quantity,
            reason,
        },
        engine::Event::Replaced { owner, order, .. } => engine::Event::Replaced {
            owner,
            requester: owner,
            tag: 0,
            order,
        },
        ref other => other.clone(),
    }
}

impl Registry {
    /// Routes an engine event into the streams it belongs in, and pushes the
    /// connections whose writers have new frames onto `wake`.
    ///
    /// An answer goes to the session that asked. When that is not the order's owner
    /// (another session of the account cancelled or replaced it), the owner gets the
    /// change as an unsolicited message. Events about orders of an ended session go
    /// to a live session of the account, or wait for its next login; answers to an
    /// ended session's requests are not handed on.
    pub fn route(
        &self,
        event: &engine::Event,
        now: Timestamp,
        out: &mut Vec<Action>,
        wake: &mut Vec<ConnectionId>,
    ) {
        let Some(owner) = event.owner() else {
            return;
        };
        match event.requester() {
            Some(requester) if requester.session != owner.session => {
                if let Some(Some(conn)) = self.deliver(requester.session, event, now, out) {
                    wake.push(conn);
                }
                // If the owner has ended, the requester (a live session of the
                // account) already has the news: nothing to hand on.
                if let Some(Some(conn)) = self.deliver(owner.session, &notice(event), now, out) {
                    wake.push(conn);
                }
            }
            _ => {
                let delivered = match self.deliver(owner.session, event, now, out) {
                    Some(delivered) => delivered,
                    None => self.rehome(owner.account, event, now, out),
                };
                wake.extend(delivered);
            }
        }
    }

    /// Puts an event into a session's stream if it takes events; `None` if it does
    /// not (ended or gone), else the connection to wake, if any.
    pub(super) fn deliver(
        &self,
        session_id: u64,
        event: &engine::Event,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) -> Option<Option<ConnectionId>> {
        let session = self.get(session_id)?;
        let start = out.len();
        let mut guard = lock(&session);
        if !guard.takes_events() {
            return None;
        }
        let wake = guard.on_engine_event(event, now, out);
        drop(guard);
        self.settle(session_id, &out[start..]);
        Some(wake)
    }

    /// An event about an order whose session has ended: to the account's newest
    /// session if it is live, else queued for the account's next login. Answers to
    /// the ended session's own requests are not handed on (no other session asked);
    /// a cancel it had asked for goes on as an unsolicited one.
    pub(super) fn rehome(
        &self,
        account: u64,
        event: &engine::Event,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) -> Option<ConnectionId> {
        let event = match event {
            engine::Event::Fill(_) | engine::Event::Cancelled { .. } => notice(event),
            _ => return None,
        };
        let mut unclaimed = self
            .unclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let members: Vec<u64> = self
            .per_account
            .get(&account)
            .map(|sessions| sessions.iter().rev().copied().collect())
            .unwrap_or_default();
        for heir in members {
            let Some(session) = self.get(heir) else {
                continue;
            };
            let start = out.len();
            let mut guard = lock(&session);
            if guard.closed_reason().is_none() {
                let wake = guard.on_engine_event(&event, now, out);
                drop(guard);
                drop(unclaimed);
                self.events_rehomed.fetch_add(1, Ordering::Relaxed);
                self.settle(heir, &out[start..]);
                return wake;
            }
        }
        let limit = self.limits.unclaimed_events_per_account;
        if limit == 0 {
            self.unclaimed_dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let queue = unclaimed.entry(account).or_default();
        if queue.len() >= limit {
            queue.pop_front();
            self.unclaimed_dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(event);
        None
    }
}
