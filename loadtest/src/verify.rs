//! The exactly-once verifier: checks every message the load sessions receive against
//! what they sent, and fails loudly on any violation.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;

use proto::{Fill, Frame, OrderState, OrderStatus, Side};
use serde::Serialize;

/// How many violation descriptions a report keeps.
const MAX_SAMPLES: usize = 20;

/// What the verifier counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Checks {
    /// Client requests whose single answer was checked.
    pub answers: u64,
    /// Server sequence numbers checked for gaps and duplicates.
    pub server_seqs: u64,
    /// Trades checked for exactly one fill on each side.
    pub trades: u64,
    /// Orders whose final state was compared with the engine's.
    pub final_states: u64,
    /// Fills and cancels of orders this run did not place (an account's orders from
    /// before the run): not checked.
    pub foreign: u64,
}

/// One client order as the load client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Order {
    quantity: u64,
    filled: u64,
    leaves: u64,
    done: bool,
}

/// A set of client sequences, one bit each: a session numbers its requests from 1
/// on, so the set is dense and a lookup is one memory access instead of a hash probe
/// (the verifier checks every message at full load, in the load client's budget).
/// It grows only with what this client sends; a sequence far beyond is simply absent.
#[derive(Debug, Default)]
struct SeqSet {
    words: Vec<u64>,
    len: usize,
}

impl SeqSet {
    fn contains(&self, seq: u64) -> bool {
        let (word, bit) = Self::place(seq);
        self.words.get(word).is_some_and(|w| w & bit != 0)
    }

    /// Adds `seq`; false if it was there already.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = Self::place(seq);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let fresh = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.len += usize::from(fresh);
        fresh
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The members of `self` that `other` lacks, in order.
    fn missing_from<'a>(&'a self, other: &'a SeqSet) -> impl Iterator<Item = u64> + 'a {
        self.words
            .iter()
            .enumerate()
            .flat_map(move |(index, &word)| {
                let absent = word & !other.words.get(index).copied().unwrap_or(0);
                (0..64)
                    .filter(move |bit| absent & (1 << bit) != 0)
                    .map(move |bit| (index as u64) * 64 + bit)
            })
    }

    fn place(seq: u64) -> (usize, u64) {
        let word = usize::try_from(seq / 64).unwrap_or(usize::MAX);
        (word, 1 << (seq % 64))
    }
}

/// One session's view.
#[derive(Debug, Default)]
struct SessionView {
    sent: SeqSet,
    answered: SeqSet,
    /// Client sequences of new orders.
    new_orders: SeqSet,
    last_server_seq: u64,
    orders: BTreeMap<u64, Order>,
}

/// One side of a trade, as reported to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TradeSide {
    session: usize,
    side: Side,
    price: i64,
    quantity: u64,
}

/// The fills of one trade seen so far: two expected, kept without an allocation;
/// any more are a violation.
#[derive(Debug, Default)]
struct TradeSides {
    two: [Option<TradeSide>; 2],
    more: Vec<TradeSide>,
}

impl TradeSides {
    fn push(&mut self, side: TradeSide) {
        match self.two.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(side),
            None => self.more.push(side),
        }
    }

    /// Exactly two fills, on opposite sides, at one price and quantity.
    fn consistent(&self) -> bool {
        matches!((self.two, self.more.is_empty()), ([Some(a), Some(b)], true)
            if a.side != b.side && a.price == b.price && a.quantity == b.quantity)
    }

    fn all(&self) -> Vec<TradeSide> {
        self.two
            .iter()
            .flatten()
            .chain(&self.more)
            .copied()
            .collect()
    }
}

/// Verifies all sessions of a run.
#[derive(Debug, Default)]
pub struct Verifier {
    sessions: Vec<SessionView>,
    trades: FxHashMap<u64, TradeSides>,
    violations: u64,
    samples: Vec<String>,
    checks: Checks,
}

impl Verifier {
    /// A verifier for `sessions` sessions.
    pub fn new(sessions: usize) -> Self {
        Verifier {
            sessions: (0..sessions).map(|_| SessionView::default()).collect(),
            ..Verifier::default()
        }
    }

    /// Records a violation found outside the verifier's own checks.
    pub fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(what);
        }
    }

    /// Violations so far.
    pub fn violations(&self) -> u64 {
        self.violations
    }

    /// Descriptions of the first violations.
    pub fn samples(&self) -> &[String] {
        &self.samples
    }

    /// What was checked.
    pub fn checks(&self) -> &Checks {
        &self.checks
    }

    /// Session `session` sent a request with `client_seq`.
    pub fn sent(&mut self, session: usize, client_seq: u64) {
        self.sessions[session].sent.insert(client_seq);
    }

    /// Session `session` sent a new order.
    pub fn sent_order(
        &mut self,
        session: usize,
        client_seq: u64,
        client_order_id: u64,
        quantity: u64,
    ) {
        self.sent(session, client_seq);
        self.sessions[session].new_orders.insert(client_seq);
        self.sessions[session].orders.insert(
            client_order_id,
            Order {
                quantity,
                filled: 0,
                leaves: quantity,
                done: false,
            },
        );
    }

    /// A sequenced message reached session `session`; returns the client sequence it
    /// answers, if it is an answer.
    pub fn message(&mut self, session: usize, frame: &Frame) -> Option<u64> {
        if let Some(seq) = frame.server_seq() {
            self.checks.server_seqs += 1;
            let expected = self.sessions[session].last_server_seq + 1;
            if seq != expected {
                self.violation(format!(
                    "session {session}: server seq {seq}, expected {expected}"
                ));
            }
            self.sessions[session].last_server_seq = seq;
        }
        match *frame {
            Frame::Reject(reject) => {
                // A rejected new order never existed; a rejected cancel changes nothing.
                let view = &mut self.sessions[session];
                if view.new_orders.contains(reject.client_seq) {
                    if let Some(order) = view.orders.get_mut(&reject.client_order_id) {
                        order.leaves = 0;
                        order.done = true;
                    }
                }
            }
            Frame::Fill(fill) => self.fill(session, &fill),
            Frame::Cancelled(cancelled) => {
                if let Some(order) = self.sessions[session]
                    .orders
                    .get_mut(&cancelled.client_order_id)
                {
                    order.leaves = 0;
                    order.done = true;
                }
            }
            _ => {}
        }
        let answered = frame.answered_client_seq();
        if let Some(client_seq) = answered {
            self.checks.answers += 1;
            let view = &mut self.sessions[session];
            if !view.sent.contains(client_seq) {
                self.violation(format!(
                    "session {session}: answer for client seq {client_seq} never sent"
                ));
            } else if !view.answered.insert(client_seq) {
                self.violation(format!(
                    "session {session}: client seq {client_seq} answered twice (executed twice)"
                ));
            }
        }
        answered
    }

    fn fill(&mut self, session: usize, fill: &Fill) {
        let Some(order) = self.sessions[session].orders.get_mut(&fill.client_order_id) else {
            // Not an order of this run: its other side may be anyone's.
            self.checks.foreign += 1;
            return;
        };
        order.filled += fill.quantity;
        order.leaves = fill.leaves_quantity;
        order.done = fill.leaves_quantity == 0;
        let sides = self.trades.entry(fill.trade_id).or_default();
        sides.push(TradeSide {
            session,
            side: fill.side,
            price: fill.price,
            quantity: fill.quantity,
        });
        // A settled trade leaves the map, which so holds only the trades in flight:
        // a fill of it seen again starts a new entry, one-sided and so a violation
        // at the end.
        if sides.consistent() {
            self.trades.remove(&fill.trade_id);
            self.checks.trades += 1;
        }
    }

    /// Messages of session `session` up to `server_seq` were the run's set-up: checks
    /// start after them.
    pub fn start_after(&mut self, session: usize, server_seq: u64) {
        self.sessions[session].last_server_seq = server_seq;
    }

    /// A snapshot replaced the session's order state (beyond the replay window).
    pub fn snapshot(&mut self, session: usize, as_of_server_seq: u64, orders: &[OrderState]) {
        let view = &mut self.sessions[session];
        view.last_server_seq = view.last_server_seq.max(as_of_server_seq);
        for state in orders {
            view.orders.insert(
                state.client_order_id,
                Order {
                    quantity: state.quantity,
                    filled: state.filled_quantity,
                    leaves: state.leaves_quantity,
                    done: matches!(state.status, OrderStatus::Filled | OrderStatus::Cancelled),
                },
            );
        }
    }

    /// Requests of `session` still waiting for an answer.
    pub fn unanswered(&self, session: usize) -> usize {
        let view = &self.sessions[session];
        view.sent.len().saturating_sub(view.answered.len())
    }

    /// End-of-run checks: every request answered, every trade seen once on each side
    /// (a trade still open here had one fill, or fills that do not match).
    pub fn finish(&mut self) {
        for session in 0..self.sessions.len() {
            let view = &self.sessions[session];
            let missing: Vec<u64> = view.sent.missing_from(&view.answered).take(5).collect();
            if !missing.is_empty() {
                self.violation(format!(
                    "session {session}: client seqs never answered, e.g. {missing:?}"
                ));
            }
        }
        let trades = std::mem::take(&mut self.trades);
        for (trade_id, sides) in &trades {
            self.checks.trades += 1;
            self.violation(format!("trade {trade_id}: fills {:?}", sides.all()));
        }
        self.trades = trades;
    }

    /// Compares the session's working orders with the engine's (from a fresh login
    /// snapshot of the account).
    pub fn compare_final(&mut self, session: usize, engine_orders: &[OrderState]) {
        let engine: HashMap<u64, &OrderState> = engine_orders
            .iter()
            .map(|o| (o.client_order_id, o))
            .collect();
        let ours: Vec<(u64, Order)> = self.sessions[session]
            .orders
            .iter()
            .map(|(id, o)| (*id, *o))
            .collect();
        for (client_order_id, order) in ours {
            self.checks.final_states += 1;
            let theirs = engine.get(&client_order_id);
            let working_here = !order.done && order.leaves > 0;
            let working_there = theirs.is_some_and(|o| o.leaves_quantity > 0);
            if working_here != working_there {
                self.violation(format!(
                    "session {session} order {client_order_id}: working here {working_here}, in the engine {working_there}"
                ));
            } else if let (true, Some(theirs)) = (working_here, theirs) {
                if (theirs.filled_quantity, theirs.leaves_quantity) != (order.filled, order.leaves)
                {
                    self.violation(format!(
                        "session {session} order {client_order_id}: filled/leaves {}/{} here, {}/{} in the engine",
                        order.filled, order.leaves, theirs.filled_quantity, theirs.leaves_quantity
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(server_seq: u64, client_seq: u64) -> Frame {
        proto::OrderAck {
            server_seq,
            client_seq,
            client_order_id: client_seq,
            order_id: client_seq,
            instrument_id: 1,
            side: Side::Buy,
            price: 100,
            quantity: 1,
        }
        .into()
    }

    fn fill(server_seq: u64, trade_id: u64, side: Side) -> Frame {
        proto::Fill {
            server_seq,
            client_order_id: 1,
            order_id: 1,
            trade_id,
            instrument_id: 1,
            side,
            price: 100,
            quantity: 1,
            leaves_quantity: 0,
        }
        .into()
    }

    /// Two sessions, each with order 1 sent and acknowledged (server sequence 1).
    fn two_sessions_with_an_acknowledged_order() -> Verifier {
        let mut verifier = Verifier::new(2);
        for session in 0..2 {
            verifier.sent_order(session, 1, 1, 1);
            verifier.message(session, &ack(1, 1));
        }
        verifier
    }

    #[test]
    fn a_clean_run_has_no_violations() {
        let mut verifier = two_sessions_with_an_acknowledged_order();
        verifier.message(0, &fill(2, 9, Side::Buy));
        verifier.message(1, &fill(2, 9, Side::Sell));
        verifier.finish();
        assert_eq!(verifier.violations(), 0, "{:?}", verifier.samples());
        assert_eq!(verifier.checks().trades, 1);
    }

    #[test]
    fn duplicates_gaps_missing_answers_and_one_sided_trades_are_violations() {
        let mut verifier = Verifier::new(1);
        verifier.sent_order(0, 1, 1, 1);
        verifier.sent_order(0, 2, 2, 1);
        verifier.message(0, &ack(1, 1));
        verifier.message(0, &ack(2, 1)); // answered twice
        verifier.message(0, &ack(4, 7)); // gap, and never sent
        verifier.message(0, &fill(5, 3, Side::Buy)); // no other side
        verifier.finish(); // seq 2 never answered
        assert_eq!(verifier.violations(), 5, "{:?}", verifier.samples());
    }

    #[test]
    fn a_trade_filled_again_after_it_settled_or_filled_twice_on_one_side_is_a_violation() {
        let mut verifier = two_sessions_with_an_acknowledged_order();
        verifier.message(0, &fill(2, 9, Side::Buy));
        verifier.message(1, &fill(2, 9, Side::Sell));
        verifier.message(1, &fill(3, 9, Side::Sell)); // the settled trade again
        verifier.message(0, &fill(3, 10, Side::Buy));
        verifier.message(1, &fill(4, 10, Side::Buy)); // both sides buy
        verifier.finish();
        assert_eq!(verifier.violations(), 2, "{:?}", verifier.samples());
        assert!(verifier.samples().iter().any(|s| s.starts_with("trade 9:")));
        assert!(verifier
            .samples()
            .iter()
            .any(|s| s.starts_with("trade 10:")));
    }

    #[test]
    fn requests_never_answered_are_named_and_far_sequences_are_absent() {
        let mut sent = SeqSet::default();
        let mut answered = SeqSet::default();
        for seq in 1..=200 {
            assert!(sent.insert(seq));
        }
        assert!(!sent.insert(7));
        for seq in (1..=200).filter(|seq| ![3, 64, 130].contains(seq)) {
            answered.insert(seq);
        }
        assert_eq!(sent.len(), 200);
        assert_eq!(
            sent.missing_from(&answered).collect::<Vec<_>>(),
            [3, 64, 130]
        );
        assert!(!sent.contains(u64::MAX));
        assert!(!sent.contains(201));
    }
}
