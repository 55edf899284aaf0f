//! One session's state machine, with no IO.
//!
//! The calling contract, in the style of quinn-proto: the IO layer feeds inputs
//! (`handle_frame`, `on_engine_event`, `resume`, `connection_lost`,
//! `handle_timeout`), each with the current time, and carries out the [`Action`]s
//! they push (submit to the engine, close a connection, drop the session). The
//! connection's writer calls [`Session::poll_transmit`] to get the next encoded
//! frames to send: first unsequenced control frames (handshake answers, snapshots,
//! `Duplicate`), then the outbound ring from the connection's cursor. Replay after a
//! resume and live traffic are the same path: the cursor just starts further back.
//!
//! States: `Attached` to one connection, `Detached` (no connection; engine events
//! still accumulate in the ring), `Closed` (ended for good). A session that ends
//! while attached says goodbye on its connection: its own cancel-on-disconnect
//! cancels and whatever else its stream still holds go out first, then `Close`
//! ([`Transmit::Finished`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use matching_stub as engine;
use proto::{CancelOnDisconnect, Frame, ReasonCode, SessionToken};

use crate::connection::run_of;
pub use crate::connection::ConnectionId;
use crate::convert;
use crate::orders::OrderTracker;
use crate::ring::{OutboundRing, ReplayStart, RingLimits};
use crate::time::Timestamp;

mod requests;
mod resume;

use requests::WaitingRequest;

/// Settings shared by all sessions of a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Limits of each session's outbound ring.
    pub ring: RingLimits,
    /// Lifetime of a token from its minting.
    pub token_ttl: Duration,
    /// How long a session may stay detached before it is ended.
    pub detached_ttl: Duration,
    /// Longest cancel-on-disconnect grace period a client may ask for.
    pub max_cod_grace: Duration,
    /// Most working orders (plus new orders awaiting the engine) per session.
    pub max_open_orders: usize,
    /// Finished orders each session keeps for snapshots.
    pub finished_orders_retained: usize,
    /// Most `Duplicate` answers queued for an attached connection before it is
    /// closed as a slow consumer.
    pub max_queued_duplicates: usize,
    /// Most client requests that may wait, unprocessed, for room in the ring for
    /// their answers; one more closes the connection as a slow consumer.
    pub max_waiting_requests: usize,
    /// Sequenced client messages per second a session may send on average; it may
    /// burst up to one second's worth. Beyond, requests are answered with a `Reject`
    /// (`RateExceeded`) and not executed.
    pub max_messages_per_second: u32,
    /// What a client's acknowledgement may not exceed.
    pub ack_bound: AckBound,
}

/// What the session checks a client's acknowledgement against (`AckBeyondSent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckBound {
    /// What this process's writers sent: the session sees its transmit path
    /// (embedded mode).
    #[default]
    Sent,
    /// What the session assigned. When the session is rebuilt from a log, it has
    /// never seen what was sent; the edge checks acks against what it sent before
    /// they reach the log, so the session only refuses acks of messages that do not
    /// exist.
    Assigned,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            ring: RingLimits::default(),
            token_ttl: Duration::from_secs(24 * 3600),
            detached_ttl: Duration::from_secs(3600),
            max_cod_grace: Duration::from_secs(60),
            max_open_orders: 10_000,
            finished_orders_retained: 256,
            max_queued_duplicates: 1_024,
            max_waiting_requests: 10_000,
            max_messages_per_second: 10_000,
            ack_bound: AckBound::Sent,
        }
    }
}

/// Something the IO layer must do on the session's behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Submit this request to the matching engine.
    Engine(engine::Request),
    /// Send `Close { reason }` on this connection, then close it with `reason` as the
    /// QUIC application error code.
    CloseConnection {
        /// The connection.
        conn: ConnectionId,
        /// Why.
        reason: ReasonCode,
    },
    /// The session has ended and nothing more will enter its stream; remove it from
    /// the registry. (A connection it was attached to still gets the rest of the
    /// stream and `Close` through [`Session::poll_transmit`].)
    Ended {
        /// The session.
        session_id: u64,
        /// Why.
        reason: ReasonCode,
    },
}

/// Cancel-on-disconnect choice made at login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodPolicy {
    /// Off or cancel-all.
    pub mode: CancelOnDisconnect,
    /// How long after losing its connection the session's orders are cancelled.
    pub grace: Duration,
}

/// What a successful login establishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginGrant {
    /// The new session's id.
    pub session_id: u64,
    /// Its account.
    pub account: u64,
    /// Cancel-on-disconnect policy.
    pub cod: CodPolicy,
}

/// What a successful resume did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// Retained messages queued for replay.
    pub replayed: u64,
    /// Whether messages the client needed had been released, so a snapshot
    /// replaced them (not counting a login snapshot sent again).
    pub gap: bool,
}

/// Why a resume is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("resume refused: {0:?}")]
pub struct ResumeRefused(pub ReasonCode);

/// The connection a session is attached to, and what it still has to send.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Attachment {
    conn: ConnectionId,
    /// Next server sequence to send from the ring.
    cursor: u64,
    /// Unsequenced frames to send before anything else.
    control: VecDeque<Bytes>,
    /// How many of `control` are `Duplicate` answers (bounded).
    queued_duplicates: usize,
    /// Requests (and a `Logout` behind them) read from this connection but not yet
    /// processed, in arrival order: the ring had no room for their answers. They
    /// belong to the connection: if it goes, they were never processed, and the
    /// client sends them again after its resume.
    waiting: VecDeque<WaitingRequest>,
}

impl Attachment {
    fn new(conn: ConnectionId, cursor: u64, control: VecDeque<Bytes>) -> Self {
        Attachment {
            conn,
            cursor,
            control,
            queued_duplicates: 0,
            waiting: VecDeque::new(),
        }
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum Link {
    Attached(Attachment),
    Detached {
        since: Timestamp,
    },
    /// Ended for `reason`. `farewell` is the connection it was attached to, which
    /// still gets the rest of the stream (its own cancels among it), then `Close`.
    Closed {
        reason: ReasonCode,
        farewell: Option<Attachment>,
    },
}

/// What [`Session::poll_transmit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit {
    /// Frames were added to the output (possibly none: nothing to send right now).
    Ready,
    /// The connection is no longer this session's; its writer should stop.
    NotAttached,
    /// The session ended: the frames added are the last for this connection and end
    /// with `Close { reason }`; send them, then close the connection with `reason`.
    Finished(ReasonCode),
}

/// What a resume brings besides its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeClaim {
    /// The generation of the verified token presented.
    pub generation: u32,
    /// Crash-safe mode: what the gateway run of the resuming connection says it
    /// sent the session. If the session was last on that run, it bounds what the
    /// client can acknowledge; else anything assigned may have been sent.
    pub sent_here: Option<u64>,
}

/// What a session holds of its login snapshot.
///
/// It is kept until the client shows it has it (any `Ack`, or a `Resume` that
/// acknowledges server sequence 1 or later), so that a resume can send it again if
/// the first connection dropped before it arrived; within half of the ring's byte
/// limit, and counted against it, so that what a session holds stays bounded by its
/// ring whatever the client does.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum LoginSnapshot {
    /// The client has it.
    Confirmed,
    /// Not confirmed yet, kept to send again.
    Kept(Vec<proto::OrderState>),
    /// Not confirmed yet, and too large to keep: a resume that needs it gets the
    /// account's orders as they are now, and the messages before as released.
    TooLarge,
}

impl LoginSnapshot {
    /// What it holds, in bytes.
    fn retained_bytes(&self) -> usize {
        match self {
            LoginSnapshot::Kept(orders) => orders.len() * std::mem::size_of::<proto::OrderState>(),
            LoginSnapshot::Confirmed | LoginSnapshot::TooLarge => 0,
        }
    }
}

/// One session: sequence numbers, retained output, order view, connection state.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Session {
    id: u64,
    account: u64,
    cod: CodPolicy,
    /// The gateway's settings: not part of a snapshot, set again on restore.
    #[serde(skip)]
    config: Arc<SessionConfig>,
    link: Link,
    last_processed_client_seq: u64,
    ring: OutboundRing,
    /// Where sequenced frames are encoded, many to one allocation.
    #[serde(skip)]
    encoder: proto::FrameEncoder,
    orders: OrderTracker,
    /// Client sequences of `NewOrder`s sent to the engine and not yet answered, in
    /// order (the engine answers in submission order).
    pending_new_orders: VecDeque<u64>,
    /// Client requests handed to the engine whose answer has not come back: the
    /// ring keeps room for their answers.
    requests_at_engine: usize,
    /// Generation of the newest token minted.
    token_issued: u32,
    /// Generation presented in the latest successful resume (0 before any): its
    /// holder may present it again if that resume's answer was lost.
    token_used: u32,
    /// Highest server sequence handed to any connection's writer: the most a client
    /// can acknowledge.
    highest_sent: u64,
    /// The connection the session was last attached to (by its login or latest
    /// resume): which gateway run may have sent its messages.
    last_conn: ConnectionId,
    /// Mass cancels this session asked of the engine whose completion has not come
    /// back: an ended session stays routable until they are in its stream.
    pending_mass_cancels: u32,
    /// The login snapshot, until the client shows it has it.
    login_snapshot: LoginSnapshot,
    /// When cancel-on-disconnect fires, while detached with it on.
    cod_deadline: Option<Timestamp>,
    /// Message rate allowance (a token bucket) and when it was last topped up.
    rate_allowance: u32,
    rate_checked_at: Timestamp,
}

impl Session {
    /// A session a core snapshot carried, under the gateway's settings now.
    pub fn restored(mut self, config: Arc<SessionConfig>) -> Self {
        self.config = config;
        self
    }

    /// A new session attached to `conn`, with `LoginAccepted` and the account's
    /// order-state snapshot (as of server sequence 0) queued to send.
    pub fn login(
        grant: LoginGrant,
        conn: ConnectionId,
        token: SessionToken,
        account_orders: &[engine::OrderView],
        idle_timeout: Duration,
        config: Arc<SessionConfig>,
        now: Timestamp,
    ) -> Self {
        let ring = OutboundRing::new(config.ring);
        let mut control = VecDeque::new();
        control.push_back(
            Frame::from(proto::LoginAccepted {
                session_id: grant.session_id,
                token,
                next_client_seq: 1,
                next_server_seq: ring.next_seq(),
                replay_window: u32::try_from(config.ring.max_messages).unwrap_or(u32::MAX),
                idle_timeout_ms: u32::try_from(idle_timeout.as_millis()).unwrap_or(u32::MAX),
            })
            .to_bytes(),
        );
        let snapshot: Vec<proto::OrderState> =
            account_orders.iter().map(convert::order_state).collect();
        queue_snapshot(&mut control, ring.last_seq(), &snapshot);
        let login_snapshot = LoginSnapshot::Kept(snapshot);
        let login_snapshot = if login_snapshot.retained_bytes() <= config.ring.max_bytes / 2 {
            login_snapshot
        } else {
            LoginSnapshot::TooLarge
        };
        Session {
            id: grant.session_id,
            account: grant.account,
            cod: grant.cod,
            link: Link::Attached(Attachment::new(conn, ring.next_seq(), control)),
            last_processed_client_seq: 0,
            orders: OrderTracker::new(config.finished_orders_retained),
            ring,
            encoder: proto::FrameEncoder::default(),
            pending_new_orders: VecDeque::new(),
            requests_at_engine: 0,
            token_issued: 0,
            token_used: 0,
            highest_sent: 0,
            last_conn: conn,
            pending_mass_cancels: 0,
            login_snapshot,
            cod_deadline: None,
            rate_allowance: config.max_messages_per_second,
            rate_checked_at: now,
            config,
        }
    }

    /// The session id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The account id.
    pub fn account(&self) -> u64 {
        self.account
    }

    /// The connection the session is attached to, if any.
    pub fn attached_to(&self) -> Option<ConnectionId> {
        match &self.link {
            Link::Attached(attachment) => Some(attachment.conn),
            _ => None,
        }
    }

    /// Why the session ended, once it has.
    pub fn closed_reason(&self) -> Option<ReasonCode> {
        match self.link {
            Link::Closed { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// When the session lost its connection, while it is detached.
    pub fn detached_since(&self) -> Option<Timestamp> {
        match self.link {
            Link::Detached { since } => Some(since),
            _ => None,
        }
    }

    /// Whether engine events about its orders belong in this session's stream: it is
    /// live, or it ended on a connection that still gets its own cancels, which are
    /// on their way. (A session that ended detached has nobody to tell: its orders'
    /// events go to another session of the account.)
    pub fn takes_events(&self) -> bool {
        match self.link {
            Link::Closed {
                farewell: Some(_), ..
            } => self.pending_mass_cancels > 0,
            Link::Closed { farewell: None, .. } => false,
            _ => true,
        }
    }

    /// Whether a token of this session that expires at `expires_at` is still good:
    /// a token lives `token_ttl` from its minting or from the session's last detach,
    /// whichever is later, so a session connected for longer than `token_ttl` can
    /// still resume after it drops.
    pub fn token_valid(&self, expires_at: Timestamp, now: Timestamp) -> bool {
        match self.link {
            _ if now < expires_at => true,
            Link::Attached(_) => true,
            Link::Detached { since } => now < since.plus(self.config.token_ttl),
            Link::Closed { .. } => false,
        }
    }

    /// Highest client sequence processed.
    pub fn last_processed_client_seq(&self) -> u64 {
        self.last_processed_client_seq
    }

    /// The outbound ring (read-only), for inspection and metrics.
    pub fn ring(&self) -> &OutboundRing {
        &self.ring
    }

    /// Bytes the session holds to send again: its ring, and its login snapshot while
    /// the client has not confirmed it.
    pub fn retained_bytes(&self) -> usize {
        self.ring.retained_bytes() + self.login_snapshot.retained_bytes()
    }

    /// Generation of the newest token minted for this session.
    pub fn token_generation(&self) -> u32 {
        self.token_issued
    }

    /// The connection getting the ended session's last frames, if any.
    fn farewell_to(&self) -> Option<ConnectionId> {
        match &self.link {
            Link::Closed {
                farewell: Some(attachment),
                ..
            } => Some(attachment.conn),
            _ => None,
        }
    }

    /// The highest server sequence a client may acknowledge (see [`AckBound`]).
    fn ack_limit(&self) -> u64 {
        match self.config.ack_bound {
            AckBound::Sent => self.highest_sent,
            AckBound::Assigned => self.ring.last_seq(),
        }
    }

    /// Whether an `Ack` of `seq` goes beyond what may have been sent: the edge's
    /// check of acks before they reach a log, made by the gateway run `here`
    /// (crash-safe mode; 0 in embedded mode). What this run sent, it knows; while
    /// the session is (or was last) attached to another run's connection, any
    /// message assigned may have been sent there.
    pub fn ack_beyond_sent(&self, seq: u64, here: u64) -> bool {
        seq > self
            .sent_by_run(here)
            .unwrap_or_else(|| self.ring.last_seq())
    }

    /// The highest server sequence the gateway run `here` sent, if the session was
    /// last attached to that run (as far as this copy of the core has applied).
    pub fn sent_by_run(&self, here: u64) -> Option<u64> {
        (run_of(self.last_conn) == here).then_some(self.highest_sent)
    }

    /// Another gateway run may have sent every message assigned so far: the edge
    /// accepts acks up to there.
    fn sent_by_predecessor(&mut self) {
        self.highest_sent = self.highest_sent.max(self.ring.last_seq());
    }

    /// The client has every server message up to `seq`, and (`snapshot_too`) its
    /// login snapshot: an `Ack` says so whatever its sequence, and any acknowledged
    /// sequenced message followed the login snapshot in the stream.
    fn acknowledge(&mut self, seq: u64, snapshot_too: bool) {
        self.ring.ack(seq);
        if snapshot_too || seq > 0 {
            self.login_snapshot = LoginSnapshot::Confirmed;
        }
    }

    fn owner(&self) -> engine::Owner {
        engine::Owner {
            account: self.account,
            session: self.id,
        }
    }

    /// Puts an engine event about this session's orders into its outbound stream.
    ///
    /// Returns the connection whose writer has new frames to send, if attached.
    pub fn on_engine_event(
        &mut self,
        event: &engine::Event,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) -> Option<ConnectionId> {
        if !self.takes_events() {
            return None;
        }
        if answers_request(event) {
            self.requests_at_engine = self.requests_at_engine.saturating_sub(1);
        }
        match event {
            engine::Event::Accepted { tag, .. } | engine::Event::Rejected { tag, .. }
                if self.pending_new_orders.front() == Some(tag) =>
            {
                self.pending_new_orders.pop_front();
            }
            engine::Event::MassCancelDone { .. } => {
                self.pending_mass_cancels = self.pending_mass_cancels.saturating_sub(1);
                if self.pending_mass_cancels == 0 {
                    if let Link::Closed {
                        reason,
                        farewell: Some(_),
                    } = self.link
                    {
                        out.push(Action::Ended {
                            session_id: self.id,
                            reason,
                        });
                    }
                }
                return self.writer();
            }
            _ => {}
        }
        let frame = convert::event_to_wire(event, self.ring.next_seq())?;
        self.append(&frame, now, out);
        self.process_waiting(now, out);
        self.writer()
    }

    /// The connection whose writer sends this session's stream: the attached one, or
    /// the one an ended session says goodbye on.
    fn writer(&self) -> Option<ConnectionId> {
        self.attached_to().or_else(|| self.farewell_to())
    }

    /// Asks the engine to cancel every working order of the session.
    fn cancel_all(&mut self, reason: engine::CancelReason, out: &mut Vec<Action>) {
        self.pending_mass_cancels += 1;
        out.push(Action::Engine(engine::Request::MassCancel {
            scope: engine::MassCancelScope::Session(self.owner()),
            reason,
        }));
    }

    /// Answers a client request that could not be handed to the engine with a
    /// sequenced `Reject`: the client sequence stays processed exactly once, and the
    /// client learns to retry under a new one. Returns the connection to wake.
    pub fn refuse_request(
        &mut self,
        request: &engine::Request,
        reason: ReasonCode,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) -> Option<ConnectionId> {
        let (tag, client_order_id) = match *request {
            engine::Request::New(order) => {
                if self.pending_new_orders.back() == Some(&order.tag) {
                    self.pending_new_orders.pop_back();
                }
                (order.tag, order.client_order_id)
            }
            engine::Request::Cancel {
                tag,
                client_order_id,
                ..
            }
            | engine::Request::Replace {
                tag,
                client_order_id,
                ..
            } => (tag, client_order_id),
            engine::Request::MassCancel { .. } | engine::Request::QueryOrders { .. } => {
                return None
            }
        };
        self.requests_at_engine = self.requests_at_engine.saturating_sub(1);
        if !self.takes_events() {
            return None;
        }
        let reject = Frame::from(proto::Reject {
            server_seq: self.ring.next_seq(),
            client_seq: tag,
            client_order_id,
            reason,
        });
        self.append(&reject, now, out);
        self.writer()
    }

    /// Appends a sequenced frame to the ring and the order view.
    fn append(&mut self, frame: &Frame, now: Timestamp, out: &mut Vec<Action>) {
        self.orders.apply(frame);
        let released = self.ring.append(self.encoder.encode(frame));
        if released > 0 && self.attached_to().is_some() {
            self.drop_connection(ReasonCode::SlowConsumer, now, out);
        }
    }

    /// Moves up to `max` frames to send on `conn` into `out`: control frames first,
    /// then the ring from the connection's cursor.
    ///
    /// On a connection an ended session says goodbye on, the rest of the stream goes
    /// out the same way; once it is all out (the session's own cancels included), the
    /// `Close` frame follows and [`Transmit::Finished`] says so.
    pub fn poll_transmit(
        &mut self,
        conn: ConnectionId,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Transmit {
        let (attachment, ending) = match &mut self.link {
            Link::Attached(attachment) if attachment.conn == conn => (attachment, None),
            Link::Closed {
                reason,
                farewell: Some(attachment),
            } if attachment.conn == conn => (attachment, Some(*reason)),
            _ => return Transmit::NotAttached,
        };
        let control = max.min(attachment.control.len());
        out.extend(attachment.control.drain(..control));
        if attachment.control.is_empty() {
            attachment.queued_duplicates = 0;
        }
        let before = out.len();
        out.extend(
            self.ring
                .replay_from(attachment.cursor)
                .take(max - control)
                .cloned(),
        );
        attachment.cursor += (out.len() - before) as u64;
        self.highest_sent = self.highest_sent.max(attachment.cursor - 1);
        let drained = attachment.control.is_empty() && attachment.cursor == self.ring.next_seq();
        match ending {
            Some(reason) if drained && self.pending_mass_cancels == 0 => {
                out.push(Frame::from(proto::Close { reason }).to_bytes());
                if let Link::Closed { farewell, .. } = &mut self.link {
                    *farewell = None;
                }
                Transmit::Finished(reason)
            }
            _ => Transmit::Ready,
        }
    }

    /// Whether [`Session::poll_transmit`] has something for `conn` right now.
    pub fn has_output_for(&self, conn: ConnectionId) -> bool {
        match &self.link {
            Link::Attached(attachment) if attachment.conn == conn => {
                !attachment.control.is_empty() || attachment.cursor < self.ring.next_seq()
            }
            Link::Closed {
                farewell: Some(attachment),
                ..
            } => attachment.conn == conn,
            _ => false,
        }
    }

    /// The connection `conn` is gone (closed, timed out, reset). Detaches the session
    /// if it was attached to it and starts the cancel-on-disconnect and expiry clocks.
    pub fn connection_lost(&mut self, conn: ConnectionId, now: Timestamp) {
        if self.attached_to() == Some(conn) {
            self.detach(now);
        }
    }

    fn detach(&mut self, now: Timestamp) {
        self.link = Link::Detached { since: now };
        if self.cod.mode == CancelOnDisconnect::CancelAll {
            self.cod_deadline = Some(now.plus(self.cod.grace));
        }
        if self.ring.is_empty() {
            self.ring.shrink_to_fit();
        }
        // An idle session keeps no spare encoding room.
        self.encoder.release();
        self.orders.shrink_to_fit();
    }

    /// Closes the attached connection for `reason`; the session survives, detached.
    fn drop_connection(&mut self, reason: ReasonCode, now: Timestamp, out: &mut Vec<Action>) {
        if let Some(conn) = self.attached_to() {
            out.push(Action::CloseConnection { conn, reason });
            self.detach(now);
        }
    }

    /// Ends the session for good: cancels its orders if cancel-on-disconnect is on,
    /// closes its connection, and asks the registry to drop it.
    pub fn end(&mut self, reason: ReasonCode, out: &mut Vec<Action>) {
        if self.closed_reason().is_some() {
            return;
        }
        if self.cod.mode == CancelOnDisconnect::CancelAll {
            self.cancel_all(engine::CancelReason::SessionEnded, out);
        }
        let previous = std::mem::replace(
            &mut self.link,
            Link::Closed {
                reason,
                farewell: None,
            },
        );
        if let Link::Attached(mut attachment) = previous {
            // The connection gets the rest of the stream (these cancels among it),
            // then `Close`; the IO layer bounds how long that may take. Requests
            // still waiting are never processed.
            attachment.waiting.clear();
            out.push(Action::CloseConnection {
                conn: attachment.conn,
                reason,
            });
            self.link = Link::Closed {
                reason,
                farewell: Some(attachment),
            };
        }
        self.cod_deadline = None;
        if self.pending_mass_cancels == 0 || self.farewell_to().is_none() {
            out.push(Action::Ended {
                session_id: self.id,
                reason,
            });
        }
    }

    /// The next instant [`Session::handle_timeout`] has something to do, if any.
    pub fn next_timeout(&self) -> Option<Timestamp> {
        let expiry = match self.link {
            Link::Detached { since } => Some(since.plus(self.config.detached_ttl)),
            _ => None,
        };
        match (self.cod_deadline, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires the cancel-on-disconnect and detached-expiry timers that are due.
    pub fn handle_timeout(&mut self, now: Timestamp, out: &mut Vec<Action>) {
        if self.cod_deadline.is_some_and(|deadline| now >= deadline) {
            self.cod_deadline = None;
            self.cancel_all(engine::CancelReason::CancelOnDisconnect, out);
        }
        if let Link::Detached { since } = self.link {
            if now >= since.plus(self.config.detached_ttl) {
                self.end(ReasonCode::SessionExpired, out);
            }
        }
    }
}

/// Whether an engine event is the answer to one of the receiving session's requests
/// (as opposed to a consequence of it, or something it did not ask for).
fn answers_request(event: &engine::Event) -> bool {
    match event {
        engine::Event::Accepted { .. } | engine::Event::Rejected { .. } => true,
        engine::Event::Cancelled { tag, .. } => tag.is_some(),
        // A `Replaced` told to the order's owner, not its requester, carries tag 0.
        engine::Event::Replaced { tag, .. } => *tag != 0,
        engine::Event::Fill(_)
        | engine::Event::MassCancelDone { .. }
        | engine::Event::OrderStates { .. } => false,
    }
}

/// Queues `SnapshotBegin`, one `OrderState` per order, and `SnapshotEnd`.
fn queue_snapshot(
    control: &mut VecDeque<Bytes>,
    as_of_server_seq: u64,
    orders: &[proto::OrderState],
) {
    control.push_back(
        Frame::from(proto::SnapshotBegin {
            as_of_server_seq,
            order_count: u32::try_from(orders.len()).unwrap_or(u32::MAX),
        })
        .to_bytes(),
    );
    control.extend(orders.iter().map(|order| Frame::from(*order).to_bytes()));
    control.push_back(Frame::from(proto::SnapshotEnd { as_of_server_seq }).to_bytes());
}
