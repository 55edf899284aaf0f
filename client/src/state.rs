//! The client side of a session, with no IO: sequence numbers, the token, the
//! messages the gateway has not yet processed, and the checks on what arrives.

use std::collections::BTreeMap;

use bytes::Bytes;
use proto::{Frame, OrderState, ReasonCode, SessionToken};

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
    /// Where sequenced messages are encoded, many to one allocation.
    encoder: proto::FrameEncoder,
    snapshot: Option<(u64, u32, Vec<OrderState>)>,
    /// A snapshot arrived whole since the last `Ack`: the next one confirms it,
    /// even of a sequence already acknowledged (the gateway keeps a login snapshot
    /// until it is confirmed).
    snapshot_unconfirmed: bool,
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
        let bytes = self.encoder.encode(&make(seq));
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
                Received::Snapshot {
                    as_of_server_seq: as_of,
                    orders,
                }
            }
            Frame::Close(close) => Received::Closing(close.reason),
            Frame::LoginRejected(rejected) => Received::Closing(rejected.reason),
            Frame::ResumeRejected(rejected) => Received::Closing(rejected.reason),
            Frame::Duplicate(_) => Received::Nothing,
            other => return Err(Violation::Unexpected(other.name())),
        })
    }

    fn established(&mut self, last_processed: u64) -> Received {
        self.unprocessed = self.unprocessed.split_off(&(last_processed + 1));
        Received::Established {
            resend: self.unprocessed.values().cloned().collect(),
        }
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
}
