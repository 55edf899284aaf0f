//! A session's inbound requests: the exactly-once rule as each arrives, flow control
//! (a request waits while the ring has no room for its answers), the rate limit,
//! and `Duplicate` answers.

use super::*;

/// Messages reserved in the ring for the answers of each request the session
/// processes: an `OrderAck`, a `Fill` and a `Cancelled` for an IOC remainder.
pub(super) const RESERVED_MESSAGES_PER_REQUEST: usize = 3;

/// Bytes reserved per request: three frames the size of a `Fill`, the largest answer.
pub(super) const RESERVED_BYTES_PER_REQUEST: usize =
    RESERVED_MESSAGES_PER_REQUEST * (proto::HEADER_LEN + proto::Fill::BODY_LEN);

/// A request kept until there is room for its answers: the client frames that can
/// wait, stored at their own size rather than the largest frame's.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(super) enum WaitingRequest {
    New(proto::NewOrder),
    Cancel(proto::Cancel),
    Replace(proto::Replace),
    Logout,
}

impl WaitingRequest {
    /// The request of a frame that may wait.
    pub(super) fn of(frame: &Frame) -> Option<Self> {
        match *frame {
            Frame::NewOrder(order) => Some(WaitingRequest::New(order)),
            Frame::Cancel(cancel) => Some(WaitingRequest::Cancel(cancel)),
            Frame::Replace(replace) => Some(WaitingRequest::Replace(replace)),
            Frame::Logout(_) => Some(WaitingRequest::Logout),
            _ => None,
        }
    }

    /// Its client sequence (none for `Logout`).
    pub(super) fn client_seq(&self) -> Option<u64> {
        match self {
            WaitingRequest::New(order) => Some(order.client_seq),
            WaitingRequest::Cancel(cancel) => Some(cancel.client_seq),
            WaitingRequest::Replace(replace) => Some(replace.client_seq),
            WaitingRequest::Logout => None,
        }
    }

    /// The frame again.
    pub(super) fn frame(self) -> Frame {
        match self {
            WaitingRequest::New(order) => order.into(),
            WaitingRequest::Cancel(cancel) => cancel.into(),
            WaitingRequest::Replace(replace) => replace.into(),
            WaitingRequest::Logout => proto::Logout {}.into(),
        }
    }
}

/// The client order id a sequenced client message is about.
pub(super) fn client_order_id_of(frame: &Frame) -> u64 {
    match frame {
        Frame::NewOrder(order) => order.client_order_id,
        Frame::Cancel(cancel) => cancel.client_order_id,
        Frame::Replace(replace) => replace.client_order_id,
        _ => 0,
    }
}

impl Session {
    /// Handles a frame that arrived from the client on `conn` after the handshake.
    pub fn handle_frame(
        &mut self,
        conn: ConnectionId,
        frame: &Frame,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        if self.attached_to() != Some(conn) {
            if self.farewell_to() == Some(conn) {
                // Saying goodbye on this connection already; nothing more is taken.
                return;
            }
            // A connection that lost the session (taken over, or already closed).
            let reason = self.closed_reason().unwrap_or(ReasonCode::TakenOver);
            out.push(Action::CloseConnection { conn, reason });
            return;
        }
        match frame {
            Frame::Ack(ack) => {
                if ack.server_seq > self.ack_limit() {
                    return self.drop_connection(ReasonCode::AckBeyondSent, now, out);
                }
                self.acknowledge(ack.server_seq, true);
                self.process_waiting(now, out);
            }
            Frame::NewOrder(_) | Frame::Cancel(_) | Frame::Replace(_) | Frame::Logout(_) => {
                self.take_request(frame, now, out);
            }
            _ => self.drop_connection(ReasonCode::UnexpectedFrame, now, out),
        }
    }

    /// Applies the exactly-once rule to a request (or `Logout`) as it arrives, then
    /// processes it, or queues it behind others waiting for room for their answers.
    pub(super) fn take_request(&mut self, frame: &Frame, now: Timestamp, out: &mut Vec<Action>) {
        let room = self.has_room_for(matches!(frame, Frame::Logout(_)));
        let last_processed = self.last_processed_client_seq;
        let limit = self.config.max_waiting_requests;
        let Link::Attached(attachment) = &mut self.link else {
            return;
        };
        if let Some(seq) = frame.client_seq() {
            let last_taken = attachment
                .waiting
                .iter()
                .rev()
                .find_map(WaitingRequest::client_seq)
                .unwrap_or(last_processed);
            if seq <= last_taken {
                return self.answer_duplicate(seq, now, out);
            }
            if seq > last_taken + 1 {
                return self.drop_connection(ReasonCode::ClientSeqGap, now, out);
            }
        }
        if attachment.waiting.is_empty() && room {
            return self.process_request(frame, now, out);
        }
        if matches!(attachment.waiting.back(), Some(WaitingRequest::Logout)) {
            // The session ends at that `Logout`: nothing after it would be processed.
            return;
        }
        // The limit counts requests: a `Logout` behind `limit` of them still waits
        // (a client with at most that many unanswered cannot reach it).
        if !matches!(frame, Frame::Logout(_)) && attachment.waiting.len() >= limit {
            return self.drop_connection(ReasonCode::SlowConsumer, now, out);
        }
        if let Some(request) = WaitingRequest::of(frame) {
            attachment.waiting.push_back(request);
        }
    }

    /// Whether the next in line can be processed now: a request when the ring has
    /// room for its answers, a `Logout` once the answers to the requests before it
    /// are in the stream it says goodbye with.
    pub(super) fn has_room_for(&self, logout: bool) -> bool {
        if logout {
            self.requests_at_engine == 0
        } else {
            self.has_room_for_answers()
        }
    }

    /// Whether the ring can take the answers of one more request: the unacknowledged
    /// messages plus the room reserved for requests at the engine stay within half
    /// of each ring limit. The other half is headroom for what the session does not
    /// ask for (fills of its resting orders, unsolicited cancels). A session with
    /// nothing outstanding may always process one request, whatever its limits.
    pub(super) fn has_room_for_answers(&self) -> bool {
        if self.ring.is_empty() && self.requests_at_engine == 0 {
            return true;
        }
        let reserved = self.requests_at_engine + 1;
        let limits = self.config.ring;
        let retained_bytes = self.retained_bytes();
        self.ring.len() + reserved * RESERVED_MESSAGES_PER_REQUEST <= limits.max_messages / 2
            && retained_bytes + reserved * RESERVED_BYTES_PER_REQUEST <= limits.max_bytes / 2
    }

    /// Processes waiting requests, oldest first, while the ring has room for their
    /// answers (a `Logout` waits for the answers before it instead).
    pub(super) fn process_waiting(&mut self, now: Timestamp, out: &mut Vec<Action>) {
        loop {
            let Link::Attached(attachment) = &self.link else {
                return;
            };
            match attachment.waiting.front() {
                Some(next) if self.has_room_for(matches!(next, WaitingRequest::Logout)) => {}
                _ => return,
            }
            let Link::Attached(attachment) = &mut self.link else {
                return;
            };
            let Some(next) = attachment.waiting.pop_front() else {
                return;
            };
            self.process_request(&next.frame(), now, out);
        }
    }

    /// Executes a request (already checked to be the next in sequence) or a `Logout`.
    pub(super) fn process_request(&mut self, frame: &Frame, now: Timestamp, out: &mut Vec<Action>) {
        let Some(seq) = frame.client_seq() else {
            return self.end(ReasonCode::LoggedOut, out);
        };
        self.last_processed_client_seq = seq;
        let refusal = if !self.take_rate_allowance(now) {
            Some(ReasonCode::RateExceeded)
        } else if matches!(frame, Frame::NewOrder(_))
            && self.orders.working_count() + self.pending_new_orders.len()
                >= self.config.max_open_orders
        {
            Some(ReasonCode::TooManyOpenOrders)
        } else {
            None
        };
        if let Some(reason) = refusal {
            let reject = Frame::from(proto::Reject {
                server_seq: self.ring.next_seq(),
                client_seq: seq,
                client_order_id: client_order_id_of(frame),
                reason,
            });
            return self.append(&reject, now, out);
        }
        if matches!(frame, Frame::NewOrder(_)) {
            self.pending_new_orders.push_back(seq);
        }
        if let Some(request) = convert::request_to_engine(frame, self.owner()) {
            self.requests_at_engine += 1;
            out.push(Action::Engine(request));
        }
    }

    /// Takes one message from the rate allowance, topping it up for the time passed.
    pub(super) fn take_rate_allowance(&mut self, now: Timestamp) -> bool {
        let rate = u64::from(self.config.max_messages_per_second);
        let elapsed = now
            .as_millis()
            .saturating_sub(self.rate_checked_at.as_millis());
        let earned = elapsed.saturating_mul(rate) / 1_000;
        if earned > 0 {
            let topped = u64::from(self.rate_allowance)
                .saturating_add(earned)
                .min(rate);
            self.rate_allowance = u32::try_from(topped).unwrap_or(u32::MAX);
            self.rate_checked_at = now;
        }
        if self.rate_allowance == 0 {
            return false;
        }
        self.rate_allowance -= 1;
        true
    }

    pub(super) fn answer_duplicate(&mut self, seq: u64, now: Timestamp, out: &mut Vec<Action>) {
        let last = self.last_processed_client_seq;
        let limit = self.config.max_queued_duplicates;
        let Link::Attached(attachment) = &mut self.link else {
            return;
        };
        if attachment.queued_duplicates >= limit {
            return self.drop_connection(ReasonCode::SlowConsumer, now, out);
        }
        attachment.queued_duplicates += 1;
        attachment.control.push_back(
            Frame::from(proto::Duplicate {
                client_seq: seq,
                last_processed_client_seq: last,
            })
            .to_bytes(),
        );
    }
}
