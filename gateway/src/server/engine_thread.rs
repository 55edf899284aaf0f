//! The engine on its own thread (`engine.mode = "thread"`): the core's requests go
//! onto the thread's bounded queue, and its answers come back as a record of their
//! own ([`Record::EngineEvents`]), appended from the thread in the engine's order.

use std::sync::atomic::Ordering;

use gateway_core::engine_link::{EngineLink, Refused};
use matching_stub::{self as engine, SubmitError};
use proto::ReasonCode;
use tokio::sync::oneshot;
use tracing::warn;

use super::Shared;
use crate::sequencer::Record;

/// The core's link to the engine thread.
pub(super) struct EngineOnThread {
    sender: engine::EngineSender,
    runtime: tokio::runtime::Handle,
}

impl EngineOnThread {
    /// The link through `sender`; a cancel that finds the queue full waits for room
    /// on `runtime`'s blocking threads.
    pub(super) fn new(sender: engine::EngineSender, runtime: tokio::runtime::Handle) -> Self {
        EngineOnThread { sender, runtime }
    }
}

impl EngineLink for EngineOnThread {
    fn submit(
        &self,
        request: engine::Request,
        _answered_later: &mut dyn FnMut(&mut Vec<engine::Event>),
    ) -> Result<(), Refused> {
        match self.sender.try_submit(request) {
            Ok(()) => Ok(()),
            Err(SubmitError::Full(request @ engine::Request::MassCancel { .. })) => {
                // Cancels must not be lost: wait for room off the async threads.
                let engine = self.sender.clone();
                self.runtime.spawn_blocking(move || engine.submit(request));
                Ok(())
            }
            Err(SubmitError::Full(request)) => {
                warn!("engine queue full; refusing request");
                Err(Refused {
                    request,
                    reason: ReasonCode::EngineBusy,
                })
            }
            Err(SubmitError::Stopped(request)) => {
                warn!("engine stopped; refusing request");
                Err(Refused {
                    request,
                    reason: ReasonCode::InternalError,
                })
            }
        }
    }

    fn answers_at_once(&self) -> bool {
        false
    }

    fn orders_of(&self, _account: u64) -> Option<Vec<engine::OrderView>> {
        None
    }

    fn image(&self) -> Option<gateway_core::snapshot::EngineImage> {
        None
    }

    fn queued(&self) -> usize {
        self.sender.queued()
    }
}

impl Shared {
    /// On the engine's thread: its events go to the core as one record.
    pub(super) fn engine_answered(&self, events: Vec<engine::Event>) {
        let apply = |entry, position| self.apply(entry, position);
        self.log
            .append_from_thread(Record::EngineEvents { events }, &self.runtime, apply);
    }

    /// The account's orders, asked of the engine (at once if it is in process;
    /// through the log for engines on it).
    pub(super) async fn query_orders(&self, account: u64) -> Option<Vec<engine::OrderView>> {
        if self.requests.get().is_some() {
            return self.query_orders_on_the_log(account).await;
        }
        let Some(sender) = &self.engine_thread else {
            return self.core.orders_of(account);
        };
        let tag = self.next_query.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.queries.insert(tag, (account, answer));
        let request = engine::Request::QueryOrders { account, tag };
        let submitted = match sender.try_submit(request) {
            Err(SubmitError::Full(request)) => {
                let engine = sender.clone();
                tokio::task::spawn_blocking(move || engine.submit(request))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            other => other.ok(),
        };
        if submitted.is_none() {
            self.queries.remove(&tag);
            return None;
        }
        answered.await.ok()
    }

    /// Engines on the log: appends the query ([`Record::QueryOrders`], tagged with a
    /// ticket only this gateway run uses) and waits for the engine's answer to come
    /// through the log, for at most the handshake timeout.
    async fn query_orders_on_the_log(&self, account: u64) -> Option<Vec<engine::OrderView>> {
        let tag = self.log.ticket();
        let (answer, answered) = oneshot::channel();
        self.queries.insert(tag, (account, answer));
        let record = Record::QueryOrders { account, tag };
        let answer = async {
            let apply = |entry, position| self.apply(entry, position);
            self.log.send(record, apply).await.ok()?;
            answered.await.ok()
        };
        let orders = tokio::time::timeout(self.handshake_timeout, answer)
            .await
            .ok()
            .flatten();
        if orders.is_none() {
            self.queries.remove(&tag);
            warn!(
                account,
                "no engine answered an order query in time (transport.handshake_timeout_ms)"
            );
        }
        orders
    }

    /// Hands an engine's answer to an order query to whoever waits for it: the
    /// orders of the account it asked about, no other's. (An engine on the log is
    /// another process: an answer about another account, or listing its orders,
    /// is its mistake, and no login shows them.)
    pub(super) fn answer_query(&self, tag: u64, account: u64, orders: Vec<engine::OrderView>) {
        let Some((_, (asked, answer))) = self.queries.remove(&tag) else {
            return;
        };
        if account != asked {
            warn!(
                tag,
                asked,
                answered = account,
                "the engine answered an order query about another account: no answer"
            );
            return;
        }
        let listed = orders.len();
        let orders: Vec<_> = orders
            .into_iter()
            .filter(|order| order.owner.account == asked)
            .collect();
        if orders.len() != listed {
            warn!(
                tag,
                account,
                left_out = listed - orders.len(),
                "the engine listed other accounts' orders in an account's order states: left out"
            );
        }
        let _ = answer.send(orders);
    }
}
