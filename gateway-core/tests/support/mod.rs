//! A deterministic harness for the sans-IO session core: the registry, a real
//! matching engine driven synchronously, a clock moved by hand, and simulated clients
//! whose in-flight frames in each direction sit in queues a test can deliver or lose.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::registry::{lock, Registry, RegistryLimits, SessionHandle};
use gateway_core::session::{Action, CodPolicy, ConnectionId, SessionConfig, Transmit};
use gateway_core::snapshot::CoreImage;
use gateway_core::time::Timestamp;
use gateway_core::token::{TokenEntropy, TokenKeyRing, RANDOM_LEN};
use matching_stub::{self as engine, EngineConfig, Instrument, MatchingEngine, OrderBookEngine};
use proto::{CancelOnDisconnect, Frame, OrderState, ReasonCode, SessionToken};

pub const INSTRUMENT: u32 = 1;
pub const START: Timestamp = Timestamp::from_millis(1_700_000_000_000);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway side: registry plus engine, and what went to the engine.
pub struct Sim {
    pub registry: Registry,
    pub engine: OrderBookEngine,
    pub now: Timestamp,
    next_conn: ConnectionId,
    /// The simulated gateway run (the high half of its connection ids); a
    /// restart begins the next.
    run: u64,
    /// Every request submitted to the engine, in order.
    pub engine_log: Vec<engine::Request>,
    /// Connections the gateway closed, with the reason.
    pub closed: Vec<(ConnectionId, ReasonCode)>,
    /// Every engine event, in the order it was routed: the reference for what each
    /// session's stream must contain.
    pub routed: Vec<engine::Event>,
    /// Every session ever attached, as a connection's writer holds it: an ended
    /// session leaves the registry but still says goodbye on its connection.
    pub writers: HashMap<u64, SessionHandle>,
    /// Tokens minted so far: each mint's random part is drawn from this count, as
    /// the edge would draw it from the system's generator.
    minted: u64,
}

impl Sim {
    pub fn new(config: SessionConfig) -> Self {
        Self::with_limits(config, RegistryLimits::default())
    }

    pub fn with_limits(config: SessionConfig, limits: RegistryLimits) -> Self {
        let keys = TokenKeyRing::new(1, &[42u8; 32]).expect("valid key");
        Sim {
            registry: Registry::new(keys, config, limits),
            engine: OrderBookEngine::new(EngineConfig::with_instruments(vec![Instrument {
                id: INSTRUMENT,
                tick_size: 1,
                lot_size: 1,
            }]))
            .expect("valid engine config"),
            now: START,
            next_conn: 0,
            run: 0,
            engine_log: Vec::new(),
            closed: Vec::new(),
            routed: Vec::new(),
            writers: HashMap::new(),
            minted: 0,
        }
    }

    /// The random part of the next token to be minted: distinct for every mint.
    pub fn entropy(&mut self) -> TokenEntropy {
        self.minted += 1;
        let mut entropy = [0; RANDOM_LEN];
        entropy[..8].copy_from_slice(&self.minted.to_le_bytes());
        entropy
    }

    pub fn new_conn(&mut self) -> ConnectionId {
        self.next_conn += 1;
        self.run << 32 | self.next_conn
    }

    /// Carries out actions, feeding engine events back through the registry.
    pub fn apply(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Engine(request) => {
                    self.engine_log.push(request);
                    let mut events = Vec::new();
                    self.engine.handle(request, &mut events);
                    let mut more = Vec::new();
                    for event in &events {
                        self.registry
                            .route(event, self.now, &mut more, &mut Vec::new());
                    }
                    self.routed.extend(events);
                    queue.extend(more);
                }
                Action::CloseConnection { conn, reason } => self.closed.push((conn, reason)),
                Action::Ended { .. } => {}
            }
        }
    }

    pub fn is_closed(&self, conn: ConnectionId) -> Option<ReasonCode> {
        self.closed
            .iter()
            .find(|(c, _)| *c == conn)
            .map(|(_, r)| *r)
    }

    /// Logs in and delivers everything the gateway sends at once.
    pub fn login(&mut self, account: u64, cod: CodPolicy) -> Client {
        let mut client = self.login_unsent(account, None, cod);
        self.transmit(&mut client, usize::MAX);
        self.deliver_to_client(&mut client, usize::MAX);
        assert!(client.token.is_some(), "LoginAccepted received");
        client
    }

    /// Logs in under the account's own session limit `account_limit`; nothing the
    /// gateway queued for the client (LoginAccepted, snapshot) is on the wire yet.
    pub fn login_unsent(
        &mut self,
        account: u64,
        account_limit: Option<usize>,
        cod: CodPolicy,
    ) -> Client {
        let conn = self.new_conn();
        let orders = self.engine.orders_of(account);
        let entropy = self.entropy();
        let mut out = Vec::new();
        let new = self
            .registry
            .login(
                account,
                account_limit,
                cod,
                conn,
                &orders,
                IDLE_TIMEOUT,
                (self.now, &entropy),
                &mut out,
            )
            .expect("login accepted");
        self.apply(out);
        self.writers.insert(new.session_id, new.session);
        Client::new(new.session_id, conn)
    }

    pub fn session(&self, client: &Client) -> SessionHandle {
        self.registry
            .get(client.session_id)
            .expect("session is live")
    }

    /// The size of a core snapshot now: what the core holds, encoded.
    pub fn core_snapshot_len(&self) -> usize {
        core_image(&self.registry, &self.engine).encode().len()
    }

    /// The whole core (registry and engine) as its snapshot encodes it.
    pub fn core_bytes(&self) -> Vec<u8> {
        core_image(&self.registry, &self.engine).encode().to_vec()
    }

    /// Replaces the core (registry and engine) with the one its snapshot restores,
    /// checking that the restored core snapshots to the same bytes. With `restart`,
    /// the gateway restarted as well: every connection is gone, and the writers
    /// with them.
    pub fn restore_from_snapshot(&mut self, clients: &mut [Client], restart: bool) {
        let bytes = core_image(&self.registry, &self.engine).encode();
        let restored = CoreImage::decode(&bytes).expect("a snapshot decodes");
        let registry = Registry::from_image(
            restored.registry,
            self.registry.config().clone(),
            self.registry.limits(),
        )
        .expect("a snapshot restores");
        assert!(
            core_image(&registry, &restored.engine).encode() == bytes,
            "the restored core snapshots to other bytes"
        );
        self.registry = registry;
        self.engine = restored.engine;
        if restart {
            self.writers.clear();
            self.registry.run_ended(self.run, self.now);
            self.run += 1;
            for client in clients {
                self.drop_connection(client);
            }
        } else {
            for (session_id, writer) in &mut self.writers {
                if let Some(session) = self.registry.get(*session_id) {
                    *writer = session;
                }
            }
        }
    }

    /// Moves the clock and fires due timers.
    pub fn advance(&mut self, by: Duration) {
        self.now = self.now.plus(by);
        let mut out = Vec::new();
        self.registry.handle_timeouts(self.now, &mut out);
        self.apply(out);
    }

    /// Delivers up to `n` in-flight client frames to the gateway.
    pub fn deliver_to_gateway(&mut self, client: &mut Client, n: usize) {
        let Some(conn) = client.conn else { return };
        for _ in 0..n {
            let Some(frame) = client.to_gateway.pop_front() else {
                break;
            };
            let Some(session) = self.registry.get(client.session_id) else {
                return;
            };
            let mut out = Vec::new();
            lock(&session).handle_frame(conn, &frame, self.now, &mut out);
            for action in &out {
                if let Action::Ended { session_id, reason } = action {
                    self.registry.remove(*session_id, *reason);
                }
            }
            self.apply(out);
        }
    }

    /// Moves up to `max` frames the gateway has for the client onto the wire.
    pub fn transmit(&mut self, client: &mut Client, max: usize) -> Transmit {
        let Some(conn) = client.conn else {
            return Transmit::NotAttached;
        };
        let Some(session) = self.writers.get(&client.session_id) else {
            return Transmit::NotAttached;
        };
        let mut frames = Vec::new();
        let result = lock(session).poll_transmit(conn, &mut frames, max);
        client.to_client.extend(frames);
        result
    }

    /// Delivers up to `n` frames on the wire to the client.
    pub fn deliver_to_client(&mut self, client: &mut Client, n: usize) {
        for _ in 0..n {
            let Some(bytes) = client.to_client.pop_front() else {
                break;
            };
            let (frame, used) = proto::decode(&bytes)
                .expect("valid frame")
                .expect("whole frame");
            assert_eq!(used, bytes.len());
            client.on_frame(frame);
        }
    }

    /// Sends, transmits and delivers until nothing moves (or the connection is gone).
    pub fn settle(&mut self, client: &mut Client) {
        while client.conn.is_some() {
            let before = (
                client.to_gateway.len(),
                client.to_client.len(),
                client.received.len(),
            );
            self.deliver_to_gateway(client, usize::MAX);
            self.transmit(client, usize::MAX);
            self.deliver_to_client(client, usize::MAX);
            if client.conn.is_some_and(|c| self.is_closed(c).is_some()) {
                // An ending session's connection still gets the rest of its stream.
                self.transmit(client, usize::MAX);
                self.deliver_to_client(client, usize::MAX);
                self.drop_connection(client);
                return;
            }
            if before
                == (
                    client.to_gateway.len(),
                    client.to_client.len(),
                    client.received.len(),
                )
                && client.to_gateway.is_empty()
                && client.to_client.is_empty()
            {
                return;
            }
        }
    }

    /// The client's connection dies: everything in flight is lost.
    pub fn drop_connection(&mut self, client: &mut Client) {
        client.to_gateway.clear();
        client.to_client.clear();
        if let Some(conn) = client.conn.take() {
            if let Some(session) = self.registry.get(client.session_id) {
                self.registry.connection_lost(&session, conn, self.now);
            }
        }
    }

    /// Opens a new connection and resumes with the client's current token.
    pub fn resume(&mut self, client: &mut Client) -> Result<(), ReasonCode> {
        let token = client.token.expect("client has a token");
        self.resume_with(client, token)
    }

    /// Opens a new connection and resumes with `token`.
    pub fn resume_with(
        &mut self,
        client: &mut Client,
        token: SessionToken,
    ) -> Result<(), ReasonCode> {
        let conn = self.new_conn();
        let request = proto::Resume {
            token,
            last_acked_server_seq: client.last_server_seq,
            next_client_seq: client.next_client_seq,
        };
        let entropy = self.entropy();
        let mut out = Vec::new();
        let engine = &self.engine;
        let result = self.registry.resume(
            conn,
            &request,
            None,
            (self.now, &entropy),
            |account| Some(engine.orders_of(account)),
            &mut out,
        );
        self.apply(out);
        let session = result?;
        self.writers.insert(client.session_id, session);
        client.to_gateway.clear();
        client.to_client.clear();
        client.conn = Some(conn);
        Ok(())
    }
}

/// A simulated trading client that checks the gateway's promises as frames arrive.
#[derive(Debug)]
pub struct Client {
    pub session_id: u64,
    pub conn: Option<ConnectionId>,
    pub token: Option<SessionToken>,
    pub next_client_seq: u64,
    pub last_server_seq: u64,
    /// Sent sequenced messages not yet known to be processed.
    pub outbox: BTreeMap<u64, Frame>,
    /// Every sequenced server frame received, in order.
    pub received: Vec<Frame>,
    /// Unsequenced frames received.
    pub control: Vec<Frame>,
    /// The latest snapshot received, if any.
    pub snapshot: Option<(u64, Vec<OrderState>)>,
    pending_snapshot: Option<(u64, u32, Vec<OrderState>)>,
    pub to_gateway: VecDeque<Frame>,
    pub to_client: VecDeque<Bytes>,
}

impl Client {
    pub fn new(session_id: u64, conn: ConnectionId) -> Self {
        Client {
            session_id,
            conn: Some(conn),
            token: None,
            next_client_seq: 1,
            last_server_seq: 0,
            outbox: BTreeMap::new(),
            received: Vec::new(),
            control: Vec::new(),
            snapshot: None,
            pending_snapshot: None,
            to_gateway: VecDeque::new(),
            to_client: VecDeque::new(),
        }
    }

    /// Sends a new limit order; returns its client sequence.
    pub fn new_order(
        &mut self,
        client_order_id: u64,
        side: proto::Side,
        price: i64,
        quantity: u64,
    ) -> u64 {
        let seq = self.next_client_seq;
        self.send(
            proto::NewOrder {
                client_seq: seq,
                client_order_id,
                instrument_id: INSTRUMENT,
                side,
                order_type: proto::OrderType::Limit,
                time_in_force: proto::TimeInForce::Gtc,
                price,
                quantity,
            }
            .into(),
        );
        seq
    }

    /// Sends a cancel; returns its client sequence.
    pub fn cancel(&mut self, client_order_id: u64) -> u64 {
        let seq = self.next_client_seq;
        self.send(
            proto::Cancel {
                client_seq: seq,
                client_order_id,
            }
            .into(),
        );
        seq
    }

    /// Sends a replace; returns its client sequence.
    pub fn replace(&mut self, client_order_id: u64, price: i64, quantity: u64) -> u64 {
        let seq = self.next_client_seq;
        self.send(
            proto::Replace {
                client_seq: seq,
                client_order_id,
                price,
                quantity,
            }
            .into(),
        );
        seq
    }

    fn send(&mut self, frame: Frame) {
        let seq = frame.client_seq().expect("sequenced");
        assert_eq!(seq, self.next_client_seq);
        self.next_client_seq += 1;
        self.outbox.insert(seq, frame);
        self.to_gateway.push_back(frame);
    }

    /// Queues a cumulative ack of everything received, unless a snapshot is still
    /// arriving: an `Ack` also says the login snapshot arrived whole (PROTOCOL.md
    /// section 4).
    pub fn ack(&mut self) {
        if self.pending_snapshot.is_some() {
            return;
        }
        self.to_gateway.push_back(
            proto::Ack {
                server_seq: self.last_server_seq,
            }
            .into(),
        );
    }

    fn on_frame(&mut self, frame: Frame) {
        if let Some(seq) = frame.server_seq() {
            assert!(
                self.pending_snapshot.is_none(),
                "sequenced frame inside a snapshot"
            );
            assert_eq!(
                seq,
                self.last_server_seq + 1,
                "server sequence gap or duplicate: {frame:?}"
            );
            self.last_server_seq = seq;
            if let Some(client_seq) = frame.answered_client_seq() {
                self.outbox.remove(&client_seq);
            }
            self.received.push(frame);
            return;
        }
        match frame {
            Frame::LoginAccepted(f) => self.token = Some(f.token),
            Frame::ResumeAccepted(f) => {
                // A new connection: a snapshot the old one cut short is void.
                self.pending_snapshot = None;
                self.token = Some(f.token);
                if !f.snapshot_follows {
                    assert_eq!(
                        f.replay_from,
                        self.last_server_seq + 1,
                        "replay starts after the last ack"
                    );
                }
                self.outbox
                    .retain(|seq, _| *seq > f.last_processed_client_seq);
                self.to_gateway.extend(self.outbox.values().copied());
            }
            Frame::SnapshotBegin(f) => {
                self.pending_snapshot = Some((f.as_of_server_seq, f.order_count, Vec::new()))
            }
            Frame::OrderState(f) => self
                .pending_snapshot
                .as_mut()
                .expect("inside a snapshot")
                .2
                .push(f),
            Frame::SnapshotEnd(f) => {
                let (as_of, count, orders) =
                    self.pending_snapshot.take().expect("inside a snapshot");
                assert_eq!(as_of, f.as_of_server_seq);
                assert_eq!(count as usize, orders.len());
                self.last_server_seq = as_of;
                self.snapshot = Some((as_of, orders));
            }
            _ => {}
        }
        self.control.push(frame);
    }

    /// Ids of the client messages whose outcome has not arrived yet.
    pub fn unanswered(&self) -> HashSet<u64> {
        self.outbox.keys().copied().collect()
    }
}

/// A core snapshot of `registry` and `engine`.
fn core_image(registry: &Registry, engine: &OrderBookEngine) -> CoreImage {
    CoreImage {
        position: 7,
        members: gateway_core::members::Members::default(),
        registry: registry.image(),
        engine: engine.clone(),
    }
}

/// Cancel-on-disconnect off.
pub const NO_COD: CodPolicy = CodPolicy {
    mode: CancelOnDisconnect::Off,
    grace: Duration::ZERO,
};

/// Cancel-on-disconnect on with `grace`.
pub fn cod(grace: Duration) -> CodPolicy {
    CodPolicy {
        mode: CancelOnDisconnect::CancelAll,
        grace,
    }
}

/// How often the engine saw a request with this session and tag.
pub fn times_executed(sim: &Sim, session: u64, tag: u64) -> usize {
    sim.engine_log
        .iter()
        .filter(|r| match r {
            engine::Request::New(o) => o.owner.session == session && o.tag == tag,
            engine::Request::Cancel { owner, tag: t, .. }
            | engine::Request::Replace { owner, tag: t, .. } => {
                owner.session == session && *t == tag
            }
            _ => false,
        })
        .count()
}
