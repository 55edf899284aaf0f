//! The client side of a session, with no IO: sequence numbers, the token, the
//! messages the gateway has not yet processed, and the checks on what arrives.

use std::collections::BTreeMap;

use bytes::Bytes;
use proto::{Frame, OrderState, OrderStatus, ReasonCode, SessionToken};
use rustc_hash::FxHashMap;

/// A protocol violation by the gateway, seen by the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A sequenced message did not carry the next server sequence number.
    #[error("expected server sequence {expected}, got {got}")]
    ServerSeq {
        /// What was due.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// A frame arrived where it is not allowed.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
}

/// What a received frame means for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A sequenced message, new and in order.
    Message(Frame),
    /// A complete order-state snapshot.
    Snapshot {
        /// It reflects every server message up to this sequence.
        as_of_server_seq: u64,
        /// The orders.
        orders: Vec<OrderState>,
    },
    /// The handshake succeeded; the listed messages must be (re)sent.
    Established {
        /// Client messages to send now, in order.
        resend: Vec<Bytes>,
    },
    /// The gateway is closing the connection.
    Closing(ReasonCode),
    /// Nothing for the application (for example a `Duplicate` notice).
    Nothing,
}

/// A session as the client sees it.
#[derive(Debug, Default)]
pub struct ClientState {
    /// The session id, once logged in.
    pub session_id: Option<u64>,
    token: Option<SessionToken>,
    next_client_seq: u64,
    last_server_seq: u64,
    last_acked: u64,
    /// Sent client messages not yet known to be processed, by client sequence.
    unprocessed: BTreeMap<u64, Bytes>,
    /// The orders that may be working, by client order id: sent and not known to
    /// be finished or refused, or known working from the gateway. The value is the
    /// client sequence of the `NewOrder` that opened the entry (0 when the gateway
    /// told of the order), so a refusal closes only the entry its own request opened.
    /// FxHash: the keys are this client's own ids, and it runs once or twice an order.
    open_orders: FxHashMap<u64, u64>,
    /// Where sequenced messages are encoded, many to one allocation.
    encoder: proto::FrameEncoder,
    snapshot: Option<(u64, u32, Vec<OrderState>)>,
    /// A snapshot arrived whole since the last `Ack`: the next one confirms it,
    /// even of a sequence already acknowledged (the gateway keeps a login snapshot
    /// until it is confirmed).
    snapshot_unconfirmed: bool,
    /// The application asked to log out: the `Logout` goes again after a resume
    /// (the connection it left on may have died first), and a resume refused
    /// because the session is gone means the logout took effect.
    logging_out: bool,
}

impl ClientState {
    /// A state before login.
    pub fn new() -> Self {
        ClientState {
            next_client_seq: 1,
            ..ClientState::default()
        }
    }

    /// The token to resume with, once logged in.
    pub fn token(&self) -> Option<SessionToken> {
        self.token
    }

    /// Highest server sequence received.
    pub fn last_server_seq(&self) -> u64 {
        self.last_server_seq
    }

    /// Number of client messages not yet known to be processed.
    pub fn unprocessed(&self) -> usize {
        self.unprocessed.len()
    }

    /// The client order ids of every order that may still be working, in order:
    /// the session's orders sent and not known to be finished (filled, cancelled)
    /// or refused, and the working orders of the latest snapshot (which include
    /// orders of the account's ended sessions handed to this one).
    pub fn open_orders(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.open_orders.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The `Resume` frame for a reconnect.
    pub fn resume_frame(&self) -> Option<Frame> {
        Some(Frame::from(proto::Resume {
            token: self.token?,
            last_acked_server_seq: self.last_server_seq,
            next_client_seq: self.next_client_seq,
        }))
    }

    /// Numbers a sequenced client message (built by `make` from its sequence) and
    /// keeps it until the gateway has processed it. Returns the sequence and bytes.
    pub fn sequence(&mut self, make: impl FnOnce(u64) -> Frame) -> (u64, Bytes) {
        let seq = self.next_client_seq;
        self.next_client_seq += 1;
        let frame = make(seq);
        if let Frame::NewOrder(order) = frame {
            self.open_orders.entry(order.client_order_id).or_insert(seq);
        }
        let bytes = self.encoder.encode(&frame);
        self.unprocessed.insert(seq, bytes.clone());
        (seq, bytes)
    }

    /// An `Ack` if anything was received since the last one (a whole snapshot
    /// counts).
    pub fn take_ack(&mut self) -> Option<Frame> {
        let due = self.last_server_seq > self.last_acked || self.snapshot_unconfirmed;
        due.then(|| {
            self.last_acked = self.last_server_seq;
            self.snapshot_unconfirmed = false;
            Frame::from(proto::Ack {
                server_seq: self.last_server_seq,
            })
        })
    }

    /// The connection was lost: anything acknowledged on it may not have arrived, and
    /// a snapshot it cut short is void (the gateway sends it again on resume).
    pub fn connection_lost(&mut self) {
        self.last_acked = 0;
        self.snapshot = None;
    }

    /// Handles one frame from the gateway.
    pub fn receive(&mut self, frame: Frame) -> Result<Received, Violation> {
        if let Some(seq) = frame.server_seq() {
            if self.snapshot.is_some() {
                return Err(Violation::Unexpected(frame.name()));
            }
            if seq != self.last_server_seq + 1 {
                return Err(Violation::ServerSeq {
                    expected: self.last_server_seq + 1,
                    got: seq,
                });
            }
            self.last_server_seq = seq;
            if let Some(answered) = frame.answered_client_seq() {
                self.unprocessed.remove(&answered);
            }
            self.track_open_order(&frame);
            return Ok(Received::Message(frame));
        }
        Ok(match frame {
            Frame::LoginAccepted(accepted) => {
                self.session_id = Some(accepted.session_id);
                self.token = Some(accepted.token);
                self.established(0)
            }
            Frame::ResumeAccepted(accepted) => {
                self.token = Some(accepted.token);
                if !accepted.snapshot_follows && accepted.replay_from != self.last_server_seq + 1 {
                    return Err(Violation::ServerSeq {
                        expected: self.last_server_seq + 1,
                        got: accepted.replay_from,
                    });
                }
                self.established(accepted.last_processed_client_seq)
            }
            Frame::SnapshotBegin(begin) => {
                self.snapshot = Some((begin.as_of_server_seq, begin.order_count, Vec::new()));
                Received::Nothing
            }
            Frame::OrderState(order) => {
                let (_, _, orders) = self
                    .snapshot
                    .as_mut()
                    .ok_or(Violation::Unexpected("OrderState"))?;
                orders.push(order);
                Received::Nothing
            }
            Frame::SnapshotEnd(end) => {
                let (as_of, count, orders) = self
                    .snapshot
                    .take()
                    .ok_or(Violation::Unexpected("SnapshotEnd"))?;
                if as_of != end.as_of_server_seq || orders.len() != count as usize {
                    return Err(Violation::Unexpected("SnapshotEnd"));
                }
                self.last_server_seq = as_of;
                self.snapshot_unconfirmed = true;
                self.open_orders_from_snapshot(&orders);
                Received::Snapshot {
                    as_of_server_seq: as_of,
                    orders,
                }
            }
            Frame::Close(close) => Received::Closing(close.reason),
            Frame::LoginRejected(rejected) => Received::Closing(rejected.reason),
            Frame::ResumeRejected(rejected) => Received::Closing(match rejected.reason {
                // The connection died after the `Logout` reached the gateway
                // but before its `Close` came back.
                ReasonCode::SessionNotFound if self.logging_out => ReasonCode::LoggedOut,
                reason => reason,
            }),
            Frame::Duplicate(_) => Received::Nothing,
            other => return Err(Violation::Unexpected(other.name())),
        })
    }

    /// Keeps the open orders up to date with a sequenced message.
    fn track_open_order(&mut self, frame: &Frame) {
        match frame {
            Frame::OrderAck(ack) => {
                // Already open since it was sent (its answer can no longer be a
                // refusal); inserted for an order this client did not send.
                self.open_orders.entry(ack.client_order_id).or_insert(0);
            }
            Frame::Replaced(replaced) => {
                self.open_orders.insert(replaced.client_order_id, 0);
            }
            Frame::Fill(fill) if fill.leaves_quantity == 0 => {
                self.open_orders.remove(&fill.client_order_id);
            }
            Frame::Cancelled(cancelled) => {
                self.open_orders.remove(&cancelled.client_order_id);
            }
            Frame::Reject(reject) => {
                let id = reject.client_order_id;
                let Some(&opener) = self.open_orders.get(&id) else {
                    return;
                };
                // A refused `NewOrder` that opened the entry, or a cancel or replace
                // of an order no longer working (unless a `NewOrder` sent after it
                // reused the id). A refused `NewOrder` that reused the id of a
                // working order leaves that order open.
                let refused_order = opener == reject.client_seq;
                let gone = reject.reason == ReasonCode::UnknownOrder && opener < reject.client_seq;
                if refused_order || gone {
                    self.open_orders.remove(&id);
                }
            }
            _ => {}
        }
    }

    /// After a snapshot the open orders are its working ones, and the orders sent
    /// but not yet answered (their answers follow the snapshot).
    fn open_orders_from_snapshot(&mut self, orders: &[OrderState]) {
        let working = orders
            .iter()
            .filter(|order| {
                matches!(
                    order.status,
                    OrderStatus::New | OrderStatus::PartiallyFilled
                )
            })
            .map(|order| (order.client_order_id, 0));
        let unanswered =
            self.unprocessed
                .iter()
                .filter_map(|(&seq, bytes)| match proto::decode(bytes) {
                    Ok(Some((Frame::NewOrder(order), _))) => Some((order.client_order_id, seq)),
                    _ => None,
                });
        // An id both working and in an unanswered `NewOrder` stays open when the
        // gateway refuses that order as a duplicate: the working entry goes last.
        self.open_orders = unanswered.chain(working).collect();
    }

    fn established(&mut self, last_processed: u64) -> Received {
        self.unprocessed = self.unprocessed.split_off(&(last_processed + 1));
        let mut resend: Vec<Bytes> = self.unprocessed.values().cloned().collect();
        if self.logging_out {
            resend.push(Self::logout_frame());
        }
        Received::Established { resend }
    }

    /// The application logs out: the `Logout` to send now, and again after any
    /// resume until the session has ended.
    pub fn logout(&mut self) -> Bytes {
        self.logging_out = true;
        Self::logout_frame()
    }

    fn logout_frame() -> Bytes {
        Frame::from(proto::Logout {}).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel(seq: u64) -> Frame {
        proto::Cancel {
            client_seq: seq,
            client_order_id: seq,
        }
        .into()
    }

    fn ack_for(seq: u64, server_seq: u64) -> Frame {
        proto::Reject {
            server_seq,
            client_seq: seq,
            client_order_id: seq,
            reason: ReasonCode::UnknownOrder,
        }
        .into()
    }

    fn resumed(last_processed: u64, replay_from: u64) -> Frame {
        proto::ResumeAccepted {
            token: SessionToken([1; 80]),
            last_processed_client_seq: last_processed,
            replay_from,
            oldest_available: replay_from,
            snapshot_follows: false,
        }
        .into()
    }

    #[test]
    fn a_logout_goes_again_after_a_resume_and_a_gone_session_means_it_took_effect() {
        let mut state = ClientState::new();
        state.sequence(cancel);
        let logout = state.logout();
        state.connection_lost();
        let Ok(Received::Established { resend }) = state.receive(resumed(0, 1)) else {
            panic!("not established");
        };
        assert_eq!(resend, vec![cancel(1).to_bytes(), logout]);

        state.connection_lost();
        assert_eq!(
            state.receive(refused(ReasonCode::SessionNotFound)),
            Ok(Received::Closing(ReasonCode::LoggedOut))
        );
        assert_eq!(
            state.receive(refused(ReasonCode::Revoked)),
            Ok(Received::Closing(ReasonCode::Revoked))
        );
    }

    #[test]
    fn a_gone_session_without_a_logout_is_not_found() {
        let mut state = ClientState::new();
        assert_eq!(
            state.receive(refused(ReasonCode::SessionNotFound)),
            Ok(Received::Closing(ReasonCode::SessionNotFound))
        );
    }

    fn refused(reason: ReasonCode) -> Frame {
        proto::ResumeRejected { reason }.into()
    }

    #[test]
    fn a_resume_resends_exactly_what_was_not_processed() {
        let mut state = ClientState::new();
        for _ in 0..4 {
            state.sequence(cancel);
        }
        assert_eq!(
            state.receive(ack_for(1, 1)),
            Ok(Received::Message(ack_for(1, 1)))
        );
        state.connection_lost();
        let Ok(Received::Established { resend }) = state.receive(resumed(2, 2)) else {
            panic!("not established");
        };
        assert_eq!(resend, vec![cancel(3).to_bytes(), cancel(4).to_bytes()]);
        assert_eq!(state.unprocessed(), 2);
    }

    #[test]
    fn gaps_and_repeats_in_server_sequences_are_violations() {
        let mut state = ClientState::new();
        assert!(state.receive(ack_for(1, 1)).is_ok());
        assert_eq!(
            state.receive(ack_for(1, 1)),
            Err(Violation::ServerSeq {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            state.receive(ack_for(1, 3)),
            Err(Violation::ServerSeq {
                expected: 2,
                got: 3
            })
        );
        assert_eq!(
            state.receive(resumed(0, 5)),
            Err(Violation::ServerSeq {
                expected: 2,
                got: 5
            })
        );
    }

    #[test]
    fn a_snapshot_cut_by_a_lost_connection_does_not_block_later_traffic() {
        let mut state = ClientState::new();
        let begin = proto::SnapshotBegin {
            as_of_server_seq: 0,
            order_count: 1,
        };
        assert_eq!(state.receive(begin.into()), Ok(Received::Nothing));
        state.connection_lost();
        assert!(state.receive(resumed(0, 1)).is_ok());
        assert_eq!(
            state.receive(ack_for(1, 1)),
            Ok(Received::Message(ack_for(1, 1))),
            "the half snapshot is gone, not waiting for an end that never comes"
        );
    }

    #[test]
    fn a_whole_login_snapshot_is_confirmed_by_an_ack_of_0() {
        let mut state = ClientState::new();
        let begin = proto::SnapshotBegin {
            as_of_server_seq: 0,
            order_count: 0,
        };
        assert_eq!(state.receive(begin.into()), Ok(Received::Nothing));
        assert_eq!(state.take_ack(), None, "not before it is whole");
        let end = proto::SnapshotEnd {
            as_of_server_seq: 0,
        };
        assert!(matches!(
            state.receive(end.into()),
            Ok(Received::Snapshot { .. })
        ));
        assert_eq!(state.take_ack(), Some(proto::Ack { server_seq: 0 }.into()));
        assert_eq!(state.take_ack(), None);
    }

    #[test]
    fn acks_are_sent_once_per_progress_and_again_after_a_reconnect() {
        let mut state = ClientState::new();
        assert_eq!(state.take_ack(), None);
        state.receive(ack_for(1, 1)).expect("in order");
        assert_eq!(state.take_ack(), Some(proto::Ack { server_seq: 1 }.into()));
        assert_eq!(state.take_ack(), None);
        state.connection_lost();
        assert_eq!(state.take_ack(), Some(proto::Ack { server_seq: 1 }.into()));
    }

    fn new_order(client_order_id: u64) -> impl FnOnce(u64) -> Frame {
        move |client_seq| {
            proto::NewOrder {
                client_seq,
                client_order_id,
                instrument_id: 1,
                side: proto::Side::Buy,
                order_type: proto::OrderType::Limit,
                time_in_force: proto::TimeInForce::Gtc,
                price: 100,
                quantity: 10,
            }
            .into()
        }
    }

    fn reject(server_seq: u64, client_seq: u64, id: u64, reason: ReasonCode) -> Frame {
        proto::Reject {
            server_seq,
            client_seq,
            client_order_id: id,
            reason,
        }
        .into()
    }

    fn order_ack(server_seq: u64, client_seq: u64, id: u64) -> Frame {
        proto::OrderAck {
            server_seq,
            client_seq,
            client_order_id: id,
            order_id: id,
            instrument_id: 1,
            side: proto::Side::Buy,
            price: 100,
            quantity: 10,
        }
        .into()
    }

    #[test]
    fn orders_stay_open_until_filled_cancelled_or_refused() {
        let mut state = ClientState::new();
        for id in [10, 11, 12, 13] {
            state.sequence(new_order(id));
        }
        assert_eq!(state.open_orders(), vec![10, 11, 12, 13], "open once sent");
        let fill = |server_seq, id, leaves_quantity| {
            Frame::from(proto::Fill {
                server_seq,
                client_order_id: id,
                order_id: id,
                trade_id: server_seq,
                instrument_id: 1,
                side: proto::Side::Buy,
                price: 100,
                quantity: 5,
                leaves_quantity,
            })
        };
        let frames = [
            order_ack(1, 1, 10),
            fill(2, 10, 5),
            order_ack(3, 2, 11),
            fill(4, 11, 0),
            reject(5, 3, 12, ReasonCode::PriceOffTick),
            order_ack(6, 4, 13),
            proto::Cancelled {
                server_seq: 7,
                client_seq: 0,
                client_order_id: 13,
                order_id: 13,
                cancelled_quantity: 10,
                reason: proto::CancelReason::CancelOnDisconnect,
            }
            .into(),
        ];
        for frame in frames {
            state.receive(frame).expect("in order");
        }
        assert_eq!(state.open_orders(), vec![10], "partly filled is still open");
        state.sequence(cancel);
        state
            .receive(reject(8, 5, 10, ReasonCode::UnknownOrder))
            .expect("in order");
        assert_eq!(
            state.open_orders(),
            Vec::<u64>::new(),
            "unknown: not working"
        );
    }

    #[test]
    fn a_refused_reuse_of_a_working_id_leaves_the_working_order_open() {
        let mut state = ClientState::new();
        state.sequence(new_order(7));
        state.receive(order_ack(1, 1, 7)).expect("in order");
        state.sequence(new_order(7));
        state
            .receive(reject(2, 2, 7, ReasonCode::DuplicateClientOrderId))
            .expect("in order");
        assert_eq!(state.open_orders(), vec![7]);
        // An id only another session's working order holds is not this one's.
        state.sequence(new_order(8));
        state
            .receive(reject(3, 3, 8, ReasonCode::DuplicateClientOrderId))
            .expect("in order");
        assert_eq!(state.open_orders(), vec![7]);
    }

    #[test]
    fn an_id_reused_right_after_a_refused_cancel_stays_open() {
        let mut state = ClientState::new();
        let cancel_of = |client_order_id| {
            move |client_seq| {
                Frame::from(proto::Cancel {
                    client_seq,
                    client_order_id,
                })
            }
        };
        state.sequence(cancel_of(7));
        state.sequence(new_order(7));
        state
            .receive(reject(1, 1, 7, ReasonCode::UnknownOrder))
            .expect("in order");
        assert_eq!(
            state.open_orders(),
            vec![7],
            "the new order is still in flight"
        );
        state.receive(order_ack(2, 2, 7)).expect("in order");
        assert_eq!(state.open_orders(), vec![7]);
    }

    #[test]
    fn a_snapshot_replaces_open_orders_keeping_unanswered_new_orders() {
        let mut state = ClientState::new();
        state.sequence(new_order(1));
        state.sequence(new_order(2));
        let order = |client_order_id, status| proto::OrderState {
            client_order_id,
            order_id: client_order_id,
            instrument_id: 1,
            side: proto::Side::Sell,
            price: 100,
            quantity: 10,
            filled_quantity: 0,
            leaves_quantity: 10,
            status,
        };
        let snapshot = [
            order(1, OrderStatus::Filled),
            order(5, OrderStatus::PartiallyFilled),
            order(6, OrderStatus::Cancelled),
            order(9, OrderStatus::New),
        ];
        // The gateway processed the first `NewOrder` (its answer is in the snapshot).
        let resumed = proto::ResumeAccepted {
            token: SessionToken([1; 80]),
            last_processed_client_seq: 1,
            replay_from: 4,
            oldest_available: 4,
            snapshot_follows: true,
        };
        state.receive(resumed.into()).expect("established");
        let begin = proto::SnapshotBegin {
            as_of_server_seq: 3,
            order_count: 4,
        };
        state.receive(begin.into()).expect("begin");
        for order in snapshot {
            state.receive(order.into()).expect("order");
        }
        let end = proto::SnapshotEnd {
            as_of_server_seq: 3,
        };
        state.receive(end.into()).expect("end");
        assert_eq!(state.open_orders(), vec![2, 5, 9]);
    }
}
