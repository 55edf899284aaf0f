//! Async Rust client for the session gateway.
//!
//! It logs in once, keeps the session token, and when the connection drops it
//! reconnects and resumes on its own: the gateway says which client messages it
//! processed and the client re-sends exactly the others; the gateway replays what the
//! client did not acknowledge. The application sees each server message once, in
//! order, whatever happened to the connection.
//!
//! ```no_run
//! # async fn example() -> Result<(), gateway_client::ClientError> {
//! use gateway_client::{Client, ClientConfig, Credentials, Event, OrderParams};
//!
//! let cert = std::fs::read(".gateway-dev/cert.der").expect("dev certificate");
//! let keys = Credentials::load_dev_keys(".gateway-dev/client-keys.toml".as_ref())?;
//! let (_account, credentials) = keys.into_iter().next().expect("a demo account");
//! let addr = "127.0.0.1:4433".parse().unwrap();
//! // A development gateway; production: ClientConfig::new(addr, name, venue, cert, keys).
//! let config = ClientConfig::development(addr, cert.into(), credentials);
//! let (client, mut events) = Client::connect(config).await?;
//! client.new_order(OrderParams::limit_buy(1, 42, 100, 10))?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(frame) = event {
//!         println!("{frame:?}");
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`state`]: the session as the client sees it, with no IO (sequences, the
//!   token, what to re-send, the orders that may be working).
//! - `credentials`: [`Credentials`], the API key that signs logins.
//! - `link`: one QUIC connection with its session stream ([`open`], [`Link`]).
//! - this module: [`Client`], which drives the connection, reconnects and resumes.

mod credentials;
mod link;
pub mod state;

pub use credentials::Credentials;
use link::fresh_socket;
pub use link::{client_endpoint, endpoint_with, open, open_on, open_sending, quic_config, Link};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::{CancelOnDisconnect, Frame, OrderState, OrderType, ReasonCode, Side, TimeInForce};
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::state::{ClientState, Received};

/// Why the client failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway refused the login or resume, or ended the session.
    #[error("refused by the gateway: {0:?}")]
    Refused(ReasonCode),
    /// The gateway refused the login's signature (`BadSignature`): the API key is not
    /// the one the gateway holds for its id, or the login was signed for another
    /// venue id than the gateway's (the two look the same to the gateway).
    #[error(
        "refused by the gateway: BadSignature: the login signed with API key {api_key_id} for \
         venue {venue:?} did not verify; check first that {venue:?} is the gateway's venue id \
         (its auth.venue; case matters), then the key"
    )]
    BadSignature {
        /// The API key id the login named.
        api_key_id: u64,
        /// The venue id it was signed for (`ClientConfig::venue`).
        venue: String,
    },
    /// The connection could not be made or broke during the handshake.
    #[error("connection: {0}")]
    Connection(String),
    /// The gateway broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(#[from] state::Violation),
    /// Too many client messages are waiting to be processed.
    #[error("too many unprocessed messages; wait for answers")]
    Backpressure,
    /// The session is over; nothing more can be sent.
    #[error("the session has ended")]
    Ended,
    /// Keys or certificates could not be loaded.
    #[error("configuration: {0}")]
    Config(String),
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The gateway's address.
    pub server: SocketAddr,
    /// The name in the gateway's certificate.
    pub server_name: String,
    /// Certificates to trust (the gateway's own, or its CA).
    pub trusted_certs: Vec<CertificateDer<'static>>,
    /// The API key.
    pub credentials: Credentials,
    /// The gateway's venue id, part of the signed login (the venue publishes it).
    pub venue: String,
    /// Cancel-on-disconnect policy for the session.
    pub cancel_on_disconnect: CancelOnDisconnect,
    /// Its grace period.
    pub cod_grace: Duration,
    /// A silent connection is considered dead after this long.
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// Round-trip time assumed before a connection has measured one; a lost handshake
    /// packet is sent again after about three times this. Set it near the real round
    /// trip to the gateway to reconnect faster over a lossy path.
    pub initial_rtt: Duration,
    /// Acknowledge received messages at least this often.
    pub ack_interval: Duration,
    /// QUIC packets carrying data the gateway may receive before it must acknowledge
    /// them (asked through the acknowledgement-frequency extension; the gateway then
    /// acknowledges on its answers, within 2 ms, or at once for a packet out of
    /// order). 1 keeps QUIC's own rule, every other packet.
    pub ack_eliciting_threshold: u32,
    /// Reconnect attempts after a loss before giving up (the session then ends with
    /// `Ended(InternalError)`; [`Self::give_up_after`] says how long that takes).
    pub reconnect_attempts: u32,
    /// Delay after a failed reconnect attempt; doubles up to one second. The first
    /// attempt is immediate.
    pub reconnect_backoff: Duration,
    /// Most client messages awaiting an answer before sends are refused. The gateway
    /// lets at most 10,000 requests wait for room for their answers (PROTOCOL.md
    /// section 4, "Flow control"); staying at or below that, a burst never costs the
    /// connection.
    pub max_unprocessed: usize,
    /// Capacity of the event channel to the application.
    pub event_capacity: usize,
}

impl ClientConfig {
    /// Settings for the gateway of venue `venue` (its venue id, which the venue
    /// gives with the API key) at `server`, whose certificate names `server_name` and
    /// is `cert` (pinned: the only one trusted; or push the CA's to
    /// [`Self::trusted_certs`] instead), with sensible defaults for the rest.
    pub fn new(
        server: SocketAddr,
        server_name: &str,
        venue: &str,
        cert: CertificateDer<'static>,
        credentials: Credentials,
    ) -> Self {
        ClientConfig {
            server,
            server_name: server_name.into(),
            trusted_certs: vec![cert],
            credentials,
            venue: venue.into(),
            cancel_on_disconnect: CancelOnDisconnect::Off,
            cod_grace: Duration::ZERO,
            idle_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            initial_rtt: Duration::from_millis(333),
            ack_interval: Duration::from_millis(10),
            ack_eliciting_threshold: 8,
            reconnect_attempts: 20,
            reconnect_backoff: Duration::from_millis(10),
            max_unprocessed: 10_000,
            event_capacity: 65_536,
        }
    }

    /// [`Self::new`] for a development gateway: its certificate names `localhost`
    /// and its venue id is `dev` ([`proto::DEFAULT_VENUE`]). A production gateway
    /// refuses such a login (`BadSignature`).
    pub fn development(
        server: SocketAddr,
        cert: CertificateDer<'static>,
        credentials: Credentials,
    ) -> Self {
        Self::new(server, "localhost", proto::DEFAULT_VENUE, cert, credentials)
    }

    /// The longest a client keeps trying to reconnect after a loss before it gives
    /// up: each attempt waits at most `idle_timeout` for the gateway's handshake,
    /// then `reconnect_backoff`, doubling up to a second. About two minutes with the
    /// defaults (20 attempts of 5 s).
    pub fn give_up_after(&self) -> Duration {
        let mut backoff = self.reconnect_backoff;
        let mut total = Duration::ZERO;
        for _ in 0..self.reconnect_attempts {
            total += self.idle_timeout + backoff;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        total
    }

    /// What a refusal of this client's login means, with what it signed.
    fn login_refused(&self, reason: ReasonCode) -> ClientError {
        match reason {
            ReasonCode::BadSignature => ClientError::BadSignature {
                api_key_id: self.credentials.api_key_id(),
                venue: self.venue.clone(),
            },
            reason => ClientError::Refused(reason),
        }
    }
}

/// Something the application learns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A sequenced server message: each exactly once, in order.
    Message(Frame),
    /// The authoritative state of the session's orders (after login, or after a
    /// resume that needed more than the gateway retained).
    Snapshot {
        /// It reflects every server message up to this sequence.
        as_of_server_seq: u64,
        /// The orders.
        orders: Vec<OrderState>,
    },
    /// The connection was lost and an attempt to reconnect failed; the client tries
    /// again, `attempts` times in all ([`ClientConfig::give_up_after`]). Progress to
    /// show while the gateway is away.
    Reconnecting {
        /// This attempt, from 1.
        attempt: u32,
        /// Attempts in all before the session ends.
        attempts: u32,
        /// Why this one failed.
        error: String,
    },
    /// The connection was lost and the session resumed on a new one.
    Resumed {
        /// Why the lost connection ended: the gateway's reason if it gave one (for
        /// example `SlowConsumer`), `None` for a network failure or a timeout.
        lost: Option<ReasonCode>,
    },
    /// The session is over.
    Ended(ReasonCode),
}

/// An order to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderParams {
    /// Instrument.
    pub instrument_id: u32,
    /// The client's id for the order.
    pub client_order_id: u64,
    /// Buy or sell.
    pub side: Side,
    /// Limit or market.
    pub order_type: OrderType,
    /// GTC, IOC or FOK.
    pub time_in_force: TimeInForce,
    /// Limit price (0 for market).
    pub price: i64,
    /// Quantity.
    pub quantity: u64,
}

impl OrderParams {
    /// A GTC limit buy.
    pub fn limit_buy(instrument_id: u32, client_order_id: u64, price: i64, quantity: u64) -> Self {
        Self::limit(instrument_id, client_order_id, Side::Buy, price, quantity)
    }

    /// A GTC limit sell.
    pub fn limit_sell(instrument_id: u32, client_order_id: u64, price: i64, quantity: u64) -> Self {
        Self::limit(instrument_id, client_order_id, Side::Sell, price, quantity)
    }

    fn limit(
        instrument_id: u32,
        client_order_id: u64,
        side: Side,
        price: i64,
        quantity: u64,
    ) -> Self {
        OrderParams {
            instrument_id,
            client_order_id,
            side,
            order_type: OrderType::Limit,
            time_in_force: TimeInForce::Gtc,
            price,
            quantity,
        }
    }
}

/// State shared by the application handle and the connection driver.
struct Shared {
    state: ClientState,
    /// The live connection's outgoing queue; `None` while reconnecting.
    out: Option<mpsc::UnboundedSender<Bytes>>,
    /// The live connection, to drop it on request.
    connection: Option<quinn::Connection>,
    ended: bool,
}

impl Shared {
    /// Numbers a sequenced message and sends it on the live connection, if any.
    fn send_sequenced(&mut self, make: impl FnOnce(u64) -> Frame) -> u64 {
        let (seq, bytes) = self.state.sequence(make);
        if let Some(out) = &self.out {
            // A closed queue means the connection just died; the message stays in the
            // unprocessed set and is re-sent after the resume.
            let _ = out.send(bytes);
        }
        seq
    }
}

/// The `Cancel` of an order, numbered when it is sent.
fn cancel_of(client_order_id: u64) -> impl FnOnce(u64) -> Frame {
    move |client_seq| {
        proto::Cancel {
            client_seq,
            client_order_id,
        }
        .into()
    }
}

/// A connected client. Dropping it ends the connection without logging out.
pub struct Client {
    shared: Arc<Mutex<Shared>>,
    config: Arc<ClientConfig>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
        if let Some(connection) = self.lock().connection.take() {
            connection.close(0u32.into(), b"client dropped");
        }
    }
}

impl Client {
    /// Connects and logs in. Returns once the login is accepted, with the stream of
    /// events; the client keeps the session alive across connection losses.
    pub async fn connect(
        config: ClientConfig,
    ) -> Result<(Client, mpsc::Receiver<Event>), ClientError> {
        let config = Arc::new(config);
        let shared = Arc::new(Mutex::new(Shared {
            state: ClientState::new(),
            out: None,
            connection: None,
            ended: false,
        }));
        let (events, receiver) = mpsc::channel(config.event_capacity);
        let quic = quic_config(&config)?;
        let login = config.credentials.signed_login(
            &config.venue,
            config.cancel_on_disconnect,
            config.cod_grace,
        )?;
        let link = open_sending(endpoint_with(&config, quic)?, &config, &login.into()).await?;
        let (established, on_established) = oneshot::channel();
        let driver = tokio::spawn(drive(
            Arc::clone(&shared),
            Arc::clone(&config),
            events,
            link,
            established,
        ));
        match on_established.await {
            Ok(Ok(())) => Ok((
                Client {
                    shared,
                    config,
                    driver,
                },
                receiver,
            )),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ClientError::Connection(
                "connection lost during login".into(),
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session id.
    pub fn session_id(&self) -> Option<u64> {
        self.lock().state.session_id
    }

    /// Highest server sequence received.
    pub fn last_server_seq(&self) -> u64 {
        self.lock().state.last_server_seq()
    }

    /// Client messages sent and not yet known to be processed.
    pub fn unprocessed(&self) -> usize {
        self.lock().state.unprocessed()
    }

    fn send_sequenced(&self, make: impl FnOnce(u64) -> Frame) -> Result<u64, ClientError> {
        let mut shared = self.lock();
        self.admit(&shared, 1)?;
        Ok(shared.send_sequenced(make))
    }

    /// Whether `count` more sequenced messages may be sent now.
    fn admit(&self, shared: &Shared, count: usize) -> Result<(), ClientError> {
        if shared.ended {
            return Err(ClientError::Ended);
        }
        if shared.state.unprocessed() + count > self.config.max_unprocessed {
            return Err(ClientError::Backpressure);
        }
        Ok(())
    }

    /// Sends an order; returns its client sequence number.
    pub fn new_order(&self, order: OrderParams) -> Result<u64, ClientError> {
        self.send_sequenced(|client_seq| {
            proto::NewOrder {
                client_seq,
                client_order_id: order.client_order_id,
                instrument_id: order.instrument_id,
                side: order.side,
                order_type: order.order_type,
                time_in_force: order.time_in_force,
                price: order.price,
                quantity: order.quantity,
            }
            .into()
        })
    }

    /// Cancels a working order; returns the request's client sequence number.
    pub fn cancel(&self, client_order_id: u64) -> Result<u64, ClientError> {
        self.send_sequenced(cancel_of(client_order_id))
    }

    /// Cancels every order that may still be working: one `Cancel` per entry of
    /// [`Client::open_orders`], sent at once and in order. Returns their client
    /// sequence numbers (none when nothing is open).
    ///
    /// Protocol version 1 has no single mass-cancel request, so this is the
    /// client's own: each order gets its own answer, `Cancelled`, or `Reject` with
    /// `UnknownOrder` if it finished first. Orders are cancelled by client order id
    /// and the gateway processes a session's requests in order, so an order sent
    /// before the call is covered even if its `OrderAck` has not come back. Either
    /// every cancel is sent or, with [`ClientError::Backpressure`], none.
    pub fn mass_cancel(&self) -> Result<Vec<u64>, ClientError> {
        let mut shared = self.lock();
        let ids = shared.state.open_orders();
        self.admit(&shared, ids.len())?;
        Ok(ids
            .into_iter()
            .map(|client_order_id| shared.send_sequenced(cancel_of(client_order_id)))
            .collect())
    }

    /// The client order ids of the orders that may still be working, in order:
    /// those this session sent and has not seen finish (fill, cancel) or refused,
    /// and the working orders of the latest snapshot (orders of the account's ended
    /// sessions included, whose news this session receives).
    pub fn open_orders(&self) -> Vec<u64> {
        self.lock().state.open_orders()
    }

    /// Changes a working order's price and total quantity.
    pub fn replace(
        &self,
        client_order_id: u64,
        price: i64,
        quantity: u64,
    ) -> Result<u64, ClientError> {
        self.send_sequenced(|client_seq| {
            proto::Replace {
                client_seq,
                client_order_id,
                price,
                quantity,
            }
            .into()
        })
    }

    /// Ends the session for good. While the client is reconnecting, or if the
    /// connection dies before the gateway's `Close` arrives, the `Logout` goes again
    /// after the resume; a resume refused because the session is gone then ends
    /// with `LoggedOut`.
    pub fn logout(&self) -> Result<(), ClientError> {
        let mut shared = self.lock();
        if shared.ended {
            return Err(ClientError::Ended);
        }
        let logout = shared.state.logout();
        if let Some(out) = &shared.out {
            // A closed queue means the connection just died: the resume sends it.
            let _ = out.send(logout);
        }
        Ok(())
    }

    /// Drops the current connection (as a network failure would); the client
    /// reconnects and resumes by itself.
    pub fn drop_connection(&self) {
        if let Some(connection) = self.lock().connection.take() {
            connection.close(0u32.into(), b"reconnecting");
        }
    }
}

/// Most queued frames sent in one stream write.
const WRITE_BATCH: usize = 64;

/// Reasons after which resuming is pointless.
const fn ends_session(reason: ReasonCode) -> bool {
    !matches!(
        reason,
        ReasonCode::ShuttingDown
            | ReasonCode::SlowConsumer
            | ReasonCode::InternalError
            | ReasonCode::ClientSeqGap
            | ReasonCode::RateLimited
            | ReasonCode::HandshakeTimeout
    )
}

/// Runs connections until the session ends: the first (whose login is sent), then
/// resumes on the same endpoint.
async fn drive(
    shared: Arc<Mutex<Shared>>,
    config: Arc<ClientConfig>,
    events: mpsc::Sender<Event>,
    mut link: Link,
    established: oneshot::Sender<Result<(), ClientError>>,
) {
    let endpoint = link.endpoint.clone();
    let mut established = Some(established);
    // Once resuming: why the previous connection ended.
    let mut resuming: Option<Option<ReasonCode>> = None;
    // Whether the last connection was taken over and this client resumed to contest.
    let mut contesting = false;
    loop {
        let outcome =
            run_connection(&shared, &config, &events, link, resuming, &mut established).await;
        {
            let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
            guard.out = None;
            guard.connection = None;
            guard.state.connection_lost();
        }
        // This client runs one connection at a time, so a takeover is someone else's
        // resume: a half-open path of ours the gateway still saw, or a thief with a
        // copy of the token. Resume once to take the session back; if the gateway
        // sees two holders it ends the session as stolen (`TokenSuperseded`), and if
        // it is taken over again the application is told (`Ended(TakenOver)`).
        let taken_over = outcome == Some(ReasonCode::TakenOver);
        if taken_over && !contesting {
            contesting = true;
        } else if let Some(reason) = outcome.filter(|reason| ends_session(*reason)) {
            finish(&config, &shared, &events, established.take(), reason).await;
            return;
        } else {
            contesting = false;
        }
        if let Some(waiting) = established.take() {
            // The login never completed: the gateway's reason if it gave one (for
            // example `RateLimited`, or `ShuttingDown` from a draining gateway).
            let _ = waiting.send(Err(match outcome {
                Some(reason) => config.login_refused(reason),
                None => ClientError::Connection("connection lost during login".into()),
            }));
            return;
        }
        let resume = shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state
            .resume_frame();
        let Some(resume) = resume else { return };
        match reconnect(&config, &endpoint, &resume, &events).await {
            Some(next) => {
                link = next;
                resuming = Some(outcome);
            }
            None => {
                finish(&config, &shared, &events, None, ReasonCode::InternalError).await;
                return;
            }
        }
    }
}

async fn finish(
    config: &ClientConfig,
    shared: &Mutex<Shared>,
    events: &mpsc::Sender<Event>,
    established: Option<oneshot::Sender<Result<(), ClientError>>>,
    reason: ReasonCode,
) {
    shared.lock().unwrap_or_else(PoisonError::into_inner).ended = true;
    match established {
        Some(waiting) => {
            let _ = waiting.send(Err(config.login_refused(reason)));
        }
        None => {
            let _ = events.send(Event::Ended(reason)).await;
        }
    }
}

/// A new connection that sends `resume` first, on the same endpoint (so it shares
/// the TLS session cache and skips setting up a socket); from the second attempt on,
/// the endpoint moves to a fresh UDP socket, as the old path may be what failed.
async fn reconnect(
    config: &ClientConfig,
    endpoint: &quinn::Endpoint,
    resume: &Frame,
    events: &mpsc::Sender<Event>,
) -> Option<Link> {
    let mut backoff = config.reconnect_backoff;
    for attempt in 1..=config.reconnect_attempts {
        if attempt > 1 {
            if let Err(error) = fresh_socket(config).and_then(|socket| endpoint.rebind(socket)) {
                debug!(attempt, %error, "no fresh socket for a reconnect");
            }
        }
        match open_sending(endpoint.clone(), config, resume).await {
            Ok(link) => return Some(link),
            Err(error) => {
                let attempts = config.reconnect_attempts;
                warn!(attempt, attempts, %error, "reconnecting to the gateway failed; trying again");
                let error = error.to_string();
                let _ = events.try_send(Event::Reconnecting {
                    attempt,
                    attempts,
                    error,
                });
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    None
}

/// Runs one connection until it ends; returns the gateway's reason if it gave one.
async fn run_connection(
    shared: &Arc<Mutex<Shared>>,
    config: &ClientConfig,
    events: &mpsc::Sender<Event>,
    link: Link,
    resuming: Option<Option<ReasonCode>>,
    established: &mut Option<oneshot::Sender<Result<(), ClientError>>>,
) -> Option<ReasonCode> {
    let Link {
        connection,
        mut send,
        mut recv,
        ..
    } = link;
    let (out, mut outgoing) = mpsc::unbounded_channel::<Bytes>();
    shared
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .connection = Some(connection.clone());

    let writer_shared = Arc::clone(shared);
    let ack_interval = config.ack_interval;
    let writer = async move {
        let mut tick = tokio::time::interval(ack_interval);
        let mut batch: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
        loop {
            tokio::select! {
                bytes = outgoing.recv() => {
                    let Some(bytes) = bytes else { return };
                    // Whatever else is already queued goes out in the same write.
                    batch.push(bytes);
                    while batch.len() < WRITE_BATCH {
                        match outgoing.try_recv() {
                            Ok(more) => batch.push(more),
                            Err(_) => break,
                        }
                    }
                    let written = send.write_all_chunks(&mut batch).await;
                    batch.clear();
                    if written.is_err() { return; }
                }
                _ = tick.tick() => {
                    let ack = writer_shared.lock().unwrap_or_else(PoisonError::into_inner).state.take_ack();
                    if let Some(ack) = ack {
                        if send.write_all(&ack.to_bytes()).await.is_err() { return; }
                    }
                }
            }
        }
    };

    let reader = async {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            let frame = match proto::decode_buf(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => match recv.read_chunk(16 * 1024, true).await {
                    Ok(Some(chunk)) => {
                        buf.extend_from_slice(&chunk.bytes);
                        continue;
                    }
                    Ok(None) | Err(_) => return closed_reason(&connection),
                },
                Err(error) => {
                    connection.close(
                        u32::from(error.reason().to_wire()).into(),
                        b"malformed frame",
                    );
                    return None;
                }
            };
            let received = {
                let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
                let received = guard.state.receive(frame);
                if let Ok(Received::Established { resend }) = &received {
                    // Under the lock, so no new send can slip in between the re-sent
                    // messages or be sent twice.
                    for bytes in resend {
                        let _ = out.send(bytes.clone());
                    }
                    guard.out = Some(out.clone());
                }
                received
            };
            let event = match received {
                Ok(Received::Message(frame)) => Event::Message(frame),
                Ok(Received::Snapshot {
                    as_of_server_seq,
                    orders,
                }) => Event::Snapshot {
                    as_of_server_seq,
                    orders,
                },
                Ok(Received::Established { .. }) => {
                    if let Some(waiting) = established.take() {
                        let _ = waiting.send(Ok(()));
                    }
                    let Some(lost) = resuming else {
                        continue;
                    };
                    Event::Resumed { lost }
                }
                Ok(Received::Closing(reason)) => return Some(reason),
                Ok(Received::Nothing) => continue,
                Err(violation) => {
                    debug!(%violation, "gateway broke the protocol; reconnecting");
                    connection.close(
                        u32::from(ReasonCode::MalformedFrame.to_wire()).into(),
                        b"violation",
                    );
                    return None;
                }
            };
            // Without waiting while the channel has room (most of the time): cheaper
            // than a send future per message.
            let delivered = match events.try_send(event) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(event)) => events.send(event).await.is_ok(),
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
            if !delivered {
                // The application stopped listening.
                return Some(ReasonCode::LoggedOut);
            }
        }
    };

    tokio::select! {
        reason = reader => {
            connection.close(0u32.into(), b"");
            reason
        }
        () = writer => closed_reason(&connection),
    }
}

/// The gateway's reason, if it closed the connection with one.
fn closed_reason(connection: &quinn::Connection) -> Option<ReasonCode> {
    match connection.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            u16::try_from(close.error_code.into_inner())
                .ok()
                .and_then(ReasonCode::from_wire)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gives_up_reconnecting_after_its_attempts_and_their_backoff() {
        let credentials = Credentials::from_seed(1, &[7; 32]).expect("credentials");
        let mut config = ClientConfig::development(
            "127.0.0.1:4433".parse().expect("address"),
            CertificateDer::from(vec![0u8; 4]),
            credentials,
        );
        // 20 attempts of 5 s, then 10 ms doubling to 1 s: 1,270 ms over seven
        // attempts, 13 s over the other thirteen.
        assert_eq!(config.give_up_after(), Duration::from_millis(114_270));
        config.reconnect_attempts = 2;
        config.idle_timeout = Duration::from_millis(500);
        assert_eq!(config.give_up_after(), Duration::from_millis(1_030));
    }
}
