//! A deterministic harness for the sans-IO session core: a [`Core`] fed its inputs
//! through [`Core::apply`] as the gateway's log feeds them (a real matching engine in
//! process, a clock moved by hand), and simulated clients whose in-flight frames in
//! each direction sit in queues a test can deliver or lose.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::engine_link::{EngineLink, InProcess, Refused};
use gateway_core::input::{Entry, Outcome, Record};
use gateway_core::members::Members;
use gateway_core::registry::{lock, Registry, RegistryLimits, SessionHandle};
use gateway_core::session::{CodPolicy, ConnectionId, SessionConfig, Transmit};
use gateway_core::snapshot::{CoreImage, EngineImage};
use gateway_core::time::Timestamp;
use gateway_core::token::{TokenEntropy, TokenKeyRing, RANDOM_LEN};
use gateway_core::{Core, Effects};
use matching_stub::{self as engine, EngineConfig, Instrument, OrderBookEngine};
use proto::{CancelOnDisconnect, Frame, OrderState, ReasonCode, SessionToken};

pub const INSTRUMENT: u32 = 1;
pub const START: Timestamp = Timestamp::from_millis(1_700_000_000_000);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The simulated gateway's name on the log: a restart starts a run of the same
/// name, which ends the one before.
const GATEWAY: &str = "sim";

/// Every request the engine was handed, in order, kept across restores.
type Requests = Arc<Mutex<Vec<engine::Request>>>;

/// The bundled book in process, noting every request it is handed.
struct Recording {
    book: InProcess,
    requests: Requests,
}

impl EngineLink for Recording {
    fn submit(
        &self,
        request: engine::Request,
        route: &mut dyn FnMut(&mut Vec<engine::Event>),
    ) -> Result<(), Refused> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
        self.book.submit(request, route)
    }
    fn answers_at_once(&self) -> bool {
        true
    }
    fn orders_of(&self, account: u64) -> Option<Vec<engine::OrderView>> {
        self.book.orders_of(account)
    }
    fn image(&self) -> Option<EngineImage> {
        self.book.image()
    }
}

/// The gateway side: the core, fed through its one `apply`, and what it did.
pub struct Sim {
    core: Core,
    pub now: Timestamp,
    next_conn: ConnectionId,
    /// The simulated gateway run on the log (its `Started` record's position, the
    /// high half of its connection ids); a restart begins the next.
    run: u64,
    /// The log position of the latest input.
    position: u64,
    /// Every request submitted to the engine, in order.
    requests: Requests,
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

fn book() -> OrderBookEngine {
    OrderBookEngine::new(EngineConfig::with_instruments(vec![Instrument {
        id: INSTRUMENT,
        tick_size: 1,
        lot_size: 1,
    }]))
    .expect("valid engine config")
}

impl Sim {
    pub fn new(config: SessionConfig) -> Self {
        Self::with_limits(config, RegistryLimits::default())
    }

    pub fn with_limits(config: SessionConfig, limits: RegistryLimits) -> Self {
        let keys = TokenKeyRing::new(1, &[42u8; 32]).expect("valid key");
        let requests = Requests::default();
        let link = Recording {
            book: InProcess::new(book()),
            requests: Arc::clone(&requests),
        };
        let registry = Registry::new(keys, config, limits);
        let core = Core::new(
            registry,
            Box::new(link),
            Members::default(),
            0,
            IDLE_TIMEOUT,
        );
        let mut sim = Sim {
            core,
            now: START,
            next_conn: 0,
            run: 0,
            position: 0,
            requests,
            closed: Vec::new(),
            routed: Vec::new(),
            writers: HashMap::new(),
            minted: 0,
        };
        sim.start_run();
        sim
    }

    /// The gateway (re)starts: its `Started` record begins a run on the log.
    fn start_run(&mut self) {
        let started = Record::Started {
            gateway: GATEWAY.into(),
            timeout_ms: u64::MAX / 2,
            settings: 0,
        };
        let (from, position) = (0, self.position + 1);
        self.input_from(from, started);
        self.run = position;
        self.next_conn = 0;
    }

    /// Applies `record` from the simulated gateway's run at the clock's time.
    pub fn input(&mut self, record: Record) -> Outcome {
        self.input_from(self.run, record)
    }

    /// Applies `record` as the gateway run `from` appended it, at the clock's time.
    pub fn input_from(&mut self, from: u64, record: Record) -> Outcome {
        self.position += 1;
        let entry = Entry {
            from,
            time_ms: self.now.as_millis(),
            reply: 0,
            record,
        };
        let mut effects = Effects::default();
        let outcome = self.core.apply(entry, self.position, &mut effects);
        self.closed.extend(effects.close);
        self.routed.extend(
            effects
                .events
                .into_iter()
                .filter(|event| !matches!(event, engine::Event::OrderStates { .. })),
        );
        outcome
    }

    /// The simulated gateway's current run on the log.
    pub fn run(&self) -> u64 {
        self.run
    }

    /// The sessions.
    pub fn registry(&self) -> &Registry {
        self.core.registry()
    }

    /// Orders working in the book.
    pub fn working_order_count(&self) -> usize {
        match self.core.image(0).expect("the engine is in process").engine {
            EngineImage::Book(book) => book.working_order_count(),
            EngineImage::External(_) => unreachable!("the engine is in process"),
        }
    }

    /// Every request the engine was handed so far, in order.
    pub fn engine_log(&self) -> Vec<engine::Request> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
        let login = proto::Login {
            api_key_id: account,
            timestamp_ns: 0,
            nonce: proto::Nonce([0; 16]),
            cancel_on_disconnect: cod.mode,
            cod_grace_ms: u32::try_from(cod.grace.as_millis()).expect("a short grace"),
            signature: proto::Signature([0; 64]),
        };
        let record = Record::Login {
            conn,
            account,
            max_sessions: account_limit.map(|limit| limit as u64),
            login: Frame::from(login).to_bytes().to_vec(),
            entropy: self.entropy(),
            account_orders: None,
        };
        let Outcome::Session(session) = self.input(record) else {
            panic!("a login's outcome is a session");
        };
        let session = session.expect("login accepted");
        let session_id = lock(&session).id();
        self.writers.insert(session_id, session);
        Client::new(session_id, conn)
    }

    pub fn session(&self, client: &Client) -> SessionHandle {
        self.registry()
            .get(client.session_id)
            .expect("session is live")
    }

    /// The size of a core snapshot now: what the core holds, encoded.
    pub fn core_snapshot_len(&self) -> usize {
        self.core_bytes().len()
    }

    /// The whole core (registry, engine, gateway runs) as its snapshot encodes it,
    /// but for the log position.
    pub fn core_bytes(&self) -> Vec<u8> {
        let image = self.core.image(0).expect("the engine is in process");
        image.encode().to_vec()
    }

    fn image(&self) -> CoreImage {
        self.core
            .image(self.position)
            .expect("the engine is in process")
    }

    /// Replaces the core with the one its snapshot restores, checking that the
    /// restored core snapshots to the same bytes. With `restart`, the gateway
    /// restarted as well: a new run starts on the log, every connection is gone, and
    /// the writers with them.
    pub fn restore_from_snapshot(&mut self, clients: &mut [Client], restart: bool) {
        let bytes = self.image().encode();
        let restored = CoreImage::decode(&bytes).expect("a snapshot decodes");
        let registry = Registry::from_image(
            restored.registry,
            self.registry().config().clone(),
            self.registry().limits(),
        )
        .expect("a snapshot restores");
        let link = Recording {
            book: InProcess::new(match restored.engine {
                EngineImage::Book(book) => book,
                EngineImage::External(_) => unreachable!("the engine is in process"),
            }),
            requests: Arc::clone(&self.requests),
        };
        let core = Core::new(
            registry,
            Box::new(link),
            restored.members,
            restored.position,
            IDLE_TIMEOUT,
        );
        self.core = core;
        assert!(
            self.image().encode() == bytes,
            "the restored core snapshots to other bytes"
        );
        if restart {
            self.writers.clear();
            for client in clients.iter_mut() {
                client.to_gateway.clear();
                client.to_client.clear();
                client.conn = None;
            }
            self.start_run();
        } else {
            for (session_id, writer) in &mut self.writers {
                if let Some(session) = self.core.registry().get(*session_id) {
                    *writer = session;
                }
            }
        }
    }

    /// Moves the clock and fires due timers.
    pub fn advance(&mut self, by: Duration) {
        self.now = self.now.plus(by);
        self.input(Record::Tick);
    }

    /// Delivers up to `n` in-flight client frames to the gateway.
    pub fn deliver_to_gateway(&mut self, client: &mut Client, n: usize) {
        let Some(conn) = client.conn else { return };
        for _ in 0..n {
            let Some(frame) = client.to_gateway.pop_front() else {
                break;
            };
            self.input(Record::Frame {
                session: client.session_id,
                conn,
                frame: frame.to_bytes().to_vec(),
            });
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
            self.input(Record::ConnectionLost {
                session: client.session_id,
                conn,
            });
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
        let record = Record::Resume {
            conn,
            resume: Frame::from(request).to_bytes().to_vec(),
            sent_here: None,
            entropy: self.entropy(),
        };
        let Outcome::Session(result) = self.input(record) else {
            panic!("a resume's outcome is a session");
        };
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
    sim.engine_log()
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
