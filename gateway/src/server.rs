//! The QUIC server: thin glue between quinn and the sans-IO session core. The
//! endpoint's settings are in the `quic` submodule, one connection's tasks in
//! `connection`, its first frame (login or resume) in `handshake`, the operator's
//! calls in `operations`, the engine on its own thread in `engine_thread`.
//!
//! Per connection: one task reads the first frame (`Login` or `Resume`), then loops
//! decoding frames into the session; one writer task drains the session's transmit
//! path (control frames, then the ring from the cursor) whenever it is woken. The
//! engine runs on its own thread; its events are routed into sessions from that
//! thread and wake the writers. A timer task fires cancel-on-disconnect and expiry.
//!
//! Closing is bounded: once the gateway decides to close a connection, what is left
//! to send (a `Close`, or an ending session's last messages) must go within
//! [`CLOSE_DEADLINE`], whatever the peer does; then the QUIC connection is closed
//! with the reason as its error code.
//!
//! The tasks never change the core themselves: they append records to the log
//! ([`crate::log`]), and the core applies them ([`gateway_core::Core::apply`]). In
//! embedded mode the log is in memory and applies each record at once; in crash-safe
//! mode (`sequencer.mode = "jetstream"`) it is the stream, and the `follower`
//! submodule applies it. What the core asks of the edge after each input is carried
//! out in the `core_inputs` submodule.
//!
//! Before a connection has logged in or resumed it holds a *handshaking* slot
//! (`admission`): bounded in all and per address, and under load only for
//! addresses QUIC has validated (a Retry round trip for the others).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use gateway_core::engine_link::{EngineLink, InProcess};
use gateway_core::external::External;
use gateway_core::snapshot::EngineImage;
use gateway_core::Core;
use matching_stub::{self as engine, EngineConfig, EngineThread, Instrument, OrderBookEngine};
use proto::{Frame, ReasonCode};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn, Instrument as _};

use crate::admin::{Operations, Pending};
use crate::auth::{address_key, AccountsFile, Authenticator};
use crate::clock;
use crate::config::{Config, EngineMode, SequencerMode};
use crate::convert;
use crate::dev::{SetupError, TlsIdentity};
use crate::log::{Log, MemoryLog};
use crate::metrics::{Metrics, ReasonLabel, Snapshot, LATENCY_SAMPLE_EVERY};
use crate::registry::{lock, IdMap, Registry, SessionHandle, SessionInfo};
use crate::sequencer::{JetStreamLog, LogError, Outcome, Record};
use crate::session::{AckBound, ConnectionId};
use crate::snapshot::CoreImage;
use crate::token::TokenKeyRing;

mod admission;
mod connection;
mod core_inputs;
mod engine_thread;
mod follower;
mod handshake;
mod operations;
mod quic;

use admission::{Admission, HandshakeSlot};
use connection::{serve_connection, Conn};
use engine_thread::EngineOnThread;
use follower::follow_log;
pub use quic::{ack_frequency, bind_udp, close_code, quic_crypto, ACK_DELAY};
use quic::{lasting_endpoint_config, server_config};

/// Once a connection is to be closed, how long what is left to send may take before
/// the QUIC connection is closed anyway.
pub const CLOSE_DEADLINE: Duration = Duration::from_millis(500);
/// How often timers are checked.
const TIMER_TICK: Duration = Duration::from_millis(50);

/// Most new orders waiting for their answer to be timed (see [`LATENCY_SAMPLE_EVERY`]).
const MAX_LATENCY_SAMPLES: usize = 4_096;

/// How long a sampled order waits for its answer before its stamp is dropped.
const LATENCY_SAMPLE_TTL: Duration = Duration::from_secs(10);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificates, keys or accounts could not be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The TLS or QUIC configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A socket could not be bound.
    #[error("cannot listen on {addr} ({setting}): {error}")]
    Bind {
        /// The setting that names the address.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why (shown in the message, so not a separate error source).
        error: std::io::Error,
    },
    /// The engine could not be configured or started.
    #[error("engine: {0}")]
    Engine(String),
    /// A setting is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The crash-safe mode's stream could not be used.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The core stopped while it was being rebuilt from the stream (the reason says
    /// which setting, if any, is at fault).
    #[error("rebuilding the core from the stream: {0}")]
    Rebuild(String),
}

/// Everything a gateway needs to start, resolved from [`Config`] (files read).
pub struct Setup {
    /// The settings.
    pub config: Config,
    /// TLS certificate chain and key.
    pub tls: TlsIdentity,
    /// The accounts.
    pub accounts: AccountsFile,
    /// Token keys.
    pub token_keys: TokenKeyRing,
    /// The file the accounts came from, read again on a reload (SIGHUP, or
    /// `gateway admin reload-accounts`); `None` when they cannot be reloaded.
    pub accounts_path: Option<PathBuf>,
    /// The bearer token admin operations require; `None` refuses them all.
    pub admin_token: Option<String>,
}

/// What a reload of the certificate needs: its files (`tls.cert`, `tls.key`), the
/// settings the QUIC server configuration is made with, and the endpoint taking it.
struct TlsReload {
    cert: PathBuf,
    key: PathBuf,
    config: Config,
    endpoint: quinn::Endpoint,
}

/// State shared by all tasks and the engine thread.
pub(crate) struct Shared {
    /// Every session and the engine link: changed only by the records of `log`.
    pub(crate) core: Core,
    /// Where every input of the core goes.
    log: Log,
    /// The engine's thread, when it runs on one: asked for an account's orders
    /// before a login's record is appended.
    engine_thread: Option<engine::EngineSender>,
    conns: IdMap<ConnectionId, Arc<Conn>>,
    auth: Mutex<Authenticator>,
    /// Order queries waiting for the engine's answer, by tag: the account asked
    /// about, and who waits.
    queries: IdMap<u64, (u64, oneshot::Sender<Vec<engine::OrderView>>)>,
    next_query: AtomicU64,
    handshake_timeout: Duration,
    /// Connection limits (`transport.*`).
    max_connections: usize,
    resume_reserved_connections: usize,
    max_handshaking: usize,
    max_handshaking_per_address: usize,
    /// Connections that have not logged in or resumed yet, in all and by address.
    handshaking: std::sync::atomic::AtomicUsize,
    handshaking_by_address: DashMap<IpAddr, usize>,
    runtime: tokio::runtime::Handle,
    metrics: Metrics,
    /// Arrival times of the new orders sampled for the latency histogram, by
    /// (session, client sequence); swept of answers that never came.
    latency_samples: IdMap<(u64, u64), Instant>,
    /// Set while draining: new logins are refused, sessions carry on.
    draining: AtomicBool,
    /// Where the accounts are read again from on a reload.
    accounts_path: Option<PathBuf>,
    /// Where the certificate and key are read again from on a reload.
    tls_reload: Option<TlsReload>,
    /// Crash-safe mode: how long this gateway may stay silent on the stream before
    /// the others declare it gone (`sequencer.gateway_timeout_ms`); it appends a
    /// heartbeat after a quarter of that.
    gateway_timeout: Duration,
    /// Crash-safe mode: how long a shutdown drains before it closes connections.
    drain_notice: Duration,
    /// Engines on the log: where the core's batches of requests are published.
    requests: OnceLock<crate::requests_stream::RequestsStream>,
    /// Crash-safe mode: position of the latest core snapshot stored or restored.
    snapshot_position: AtomicU64,
    /// Crash-safe mode: core snapshots that could not be stored.
    snapshot_failures: AtomicU64,

    /// Set when the gateway cannot go on (crash-safe mode): why.
    failed: watch::Sender<Option<String>>,
    /// Whether connections are accepted yet (in crash-safe mode, once the core is
    /// rebuilt).
    accepting: watch::Sender<bool>,
}

/// Engines on the log: opens the requests stream of the log `log` (whose last
/// record is `last`), refusing one that holds batches a new log never made.
async fn open_requests_stream(
    log: &JetStreamLog,
    config: &Config,
    last: u64,
) -> Result<crate::requests_stream::RequestsStream, StartError> {
    let requests =
        crate::requests_stream::RequestsStream::open(log.context(), &config.sequencer).await?;
    let batches = requests.stored_through();
    if last == 0 && batches > 0 {
        return Err(StartError::Rebuild(format!(
            "the engine requests stream {} holds {batches} batches, but the log {} is new: \
             it belongs to a log deleted since; delete it too (or restore the log)",
            crate::requests_stream::requests_stream_name(&config.sequencer.stream),
            config.sequencer.stream
        )));
    }
    Ok(requests)
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    /// The engine thread, in thread mode.
    engine: Option<EngineThread<OrderBookEngine>>,
    tasks: tokio::task::JoinSet<()>,
    /// Where the operators' HTTP listener listens, if it is on.
    admin_addr: Option<SocketAddr>,
}

impl Gateway {
    /// Starts a gateway in either sequencer mode (`sequencer.mode`): in crash-safe
    /// mode it connects to NATS, applies the stream of the core's inputs from the
    /// beginning (rebuilding every session and the book), and only then accepts
    /// connections.
    pub async fn launch(setup: Setup) -> Result<Gateway, StartError> {
        if setup.config.sequencer.mode == SequencerMode::Embedded {
            return Self::start(setup);
        }
        let began = Instant::now();
        let log = Arc::new(JetStreamLog::connect(&setup.config.sequencer).await?);
        let image = match log.load_snapshot().await? {
            Some(bytes) => Some(
                CoreImage::decode(&bytes)
                    .map_err(|error| StartError::Rebuild(format!("the core snapshot: {error}")))?,
            ),
            None => None,
        };
        let after = image.as_ref().map_or(0, |image| image.position);
        let last = log.last_position().await?;
        if after > last {
            return Err(StartError::Rebuild(format!(
                "the core snapshot (after record {after}) is ahead of the stream (last record \
                 {last}): the stream was deleted or replaced but not its snapshots; delete \
                 the object store {} too, or restore the stream",
                crate::sequencer::snapshot_bucket(&setup.config.sequencer)
            )));
        }
        let settings = setup.config.core_fingerprint();
        let requests = match setup.config.engine.mode {
            EngineMode::External => Some(open_requests_stream(&log, &setup.config, last).await?),
            EngineMode::Inline | EngineMode::Thread => None,
        };
        let position = log
            .append(&log.entry(run_started(&setup.config), 0))
            .await?;
        log.set_start(position);
        let (caught_up, replayed) = oneshot::channel();
        let snapshot_every = setup.config.sequencer.snapshot_every;
        let stream = Log::JetStream(Arc::clone(&log));
        let gateway = Self::start_with(setup, |_| stream, image)?;
        let restored_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        let shared = Arc::clone(&gateway.shared);
        if let Some(requests) = requests {
            // Batches a snapshot left unanswered go out again before any new one.
            requests.offer(shared.core.engine_unanswered(), true);
            let _ = shared.requests.set(requests);
        }
        tokio::spawn(follow_log(
            shared,
            Arc::clone(&log),
            (after, position, snapshot_every),
            caught_up,
        ));
        tokio::select! {
            _ = replayed => {}
            why = gateway.failed() => return Err(StartError::Rebuild(why)),
        }
        let differing = gateway
            .shared
            .core
            .members()
            .other_settings(position, settings)
            .map(str::to_owned);
        if let Some(other) = differing {
            // End the run now, so that it does not stand in the way of gateways
            // started after it with the right settings.
            log.end_run(CLOSE_DEADLINE * 2).await;
            let why = format!(
                "session.*, engine.* or transport.idle_timeout_ms differ from those of gateway \
                 {other:?}, running on the same stream: every gateway of a stream applies it \
                 with the same ones (to change them, stop every gateway, then start them with \
                 the new ones)"
            );
            return Err(StartError::Config(crate::config::ConfigError::Invalid(why)));
        }
        info!(
            snapshot = after,
            records = position - after,
            sessions = gateway.shared.core.registry().len(),
            restored_ms,
            elapsed_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
            "core rebuilt from the stream"
        );
        // The counters say what this process did, not what its predecessors did.
        gateway.shared.core.registry().reset_stats();
        gateway.shared.accepting.send_replace(true);
        Ok(gateway)
    }

    /// Starts a gateway in embedded mode: binds the endpoint, starts the engine
    /// thread and the accept and timer tasks on the current tokio runtime.
    pub fn start(setup: Setup) -> Result<Gateway, StartError> {
        if setup.config.sequencer.mode != SequencerMode::Embedded {
            return Err(StartError::Config(crate::config::ConfigError::Invalid(
                "sequencer.mode = \"jetstream\" starts with Gateway::launch".into(),
            )));
        }
        let started = run_started(&setup.config);
        let memory = |core: &Core| {
            Log::Memory(MemoryLog::start(started, |entry, position| {
                core.apply(entry, position, &mut gateway_core::Effects::default())
            }))
        };
        let gateway = Self::start_with(setup, memory, None)?;
        gateway.shared.accepting.send_replace(true);
        Ok(gateway)
    }

    /// Starts the gateway's tasks, with the core from `image` (a snapshot) if there
    /// is one, on the log `log` makes for it.
    fn start_with(
        setup: Setup,
        log: impl FnOnce(&Core) -> Log,
        image: Option<CoreImage>,
    ) -> Result<Gateway, StartError> {
        let Setup {
            config,
            tls,
            accounts,
            token_keys,
            accounts_path,
            admin_token,
        } = setup;
        let admin_listener = match config.admin.listen_addr()? {
            Some(addr) => Some(bind_tcp(addr)?),
            None => None,
        };
        let endpoint_config = server_config(&config, tls)?;
        let bind_error = |error| StartError::Bind {
            setting: "listen",
            addr: config.listen,
            error,
        };
        let socket =
            bind_udp(config.listen, config.transport.socket_buffer_bytes).map_err(bind_error)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_error(std::io::Error::other("no async runtime for quinn")))?;
        let endpoint = quinn::Endpoint::new(
            lasting_endpoint_config(&token_keys),
            Some(endpoint_config),
            socket,
            runtime,
        )
        .map_err(bind_error)?;

        let instruments = config
            .engine
            .instruments
            .iter()
            .map(|i| Instrument {
                id: i.id,
                tick_size: i.tick_size,
                lot_size: i.lot_size,
            })
            .collect();
        let engine_config = EngineConfig {
            instruments,
            finished_orders_per_account: config.engine.finished_orders_per_account,
            max_working_orders_per_account: config.engine.max_working_orders_per_account,
        };
        let mut session_config = config.session_config();
        // Applied from a log, sessions need not see what was sent (a core rebuilt
        // from the stream never does): the edge checks acks against that before
        // they reach the log.
        session_config.ack_bound = AckBound::Assigned;
        let new_book = || {
            OrderBookEngine::new(engine_config.clone())
                .map_err(|e| StartError::Engine(e.to_string()))
        };
        let (registry, engine_image, restored) = match image {
            None => (
                Registry::new(token_keys, session_config, config.registry_limits()),
                None,
                None,
            ),
            Some(image) => {
                let position = image.position;
                let snapshot_error = move |error: &dyn std::fmt::Display| {
                    StartError::Rebuild(format!(
                        "the core snapshot at position {position}: {error}"
                    ))
                };
                let registry =
                    Registry::from_image(image.registry, session_config, config.registry_limits())
                        .map_err(|e| snapshot_error(&e))?;
                let restored = (image.position, image.members);
                (
                    registry,
                    Some((image.engine, snapshot_error)),
                    Some(restored),
                )
            }
        };
        let routed_to: Arc<OnceLock<Arc<Shared>>> = Arc::new(OnceLock::new());
        let runtime = tokio::runtime::Handle::current();
        let mode = config.engine.mode;
        let (engine_link, engine): (Box<dyn EngineLink>, _) = match (mode, engine_image) {
            (EngineMode::External, None) => (Box::new(External::new()), None),
            (EngineMode::External, Some((EngineImage::External(image), _))) => {
                (Box::new(External::from_image(image)), None)
            }
            (EngineMode::Inline | EngineMode::Thread, image) => {
                let book = match image {
                    None => new_book()?,
                    Some((EngineImage::Book(mut book), snapshot_error)) => {
                        book.reconfigure(&engine_config)
                            .map_err(|e| snapshot_error(&format!("engine.instruments: {e}")))?;
                        book
                    }
                    Some((EngineImage::External(_), snapshot_error)) => {
                        return Err(snapshot_error(
                            &"it was taken with engine.mode = \"external\" (no book in it)",
                        ))
                    }
                };
                if mode == EngineMode::Inline {
                    (Box::new(InProcess::new(book)), None)
                } else {
                    let sink_target = Arc::clone(&routed_to);
                    let thread = EngineThread::spawn(
                        book,
                        config.engine.queue_capacity,
                        move |events: &mut Vec<engine::Event>| {
                            if let Some(shared) = sink_target.get() {
                                shared.engine_answered(std::mem::take(events));
                            }
                        },
                    )
                    .map_err(|e| StartError::Engine(e.to_string()))?;
                    let link = EngineOnThread::new(thread.sender(), runtime.clone());
                    (Box::new(link), Some(thread))
                }
            }
            (EngineMode::External, Some((EngineImage::Book(_), snapshot_error))) => {
                return Err(snapshot_error(
                    &"it was taken with the engine in the gateway (engine.mode = \"inline\"); \
                      engines on the log start from a new stream",
                ))
            }
        };

        let (position, members) = restored.unwrap_or_default();
        let idle_timeout = Duration::from_millis(config.transport.idle_timeout_ms);
        let core = Core::new(registry, engine_link, members, position, idle_timeout);
        let log = log(&core);
        let shared = Arc::new(Shared {
            core,
            log,
            engine_thread: engine.as_ref().map(EngineThread::sender),
            conns: IdMap::default(),
            auth: Mutex::new(
                Authenticator::new(&accounts, config.auth_config()).map_err(SetupError::from)?,
            ),
            queries: IdMap::default(),
            next_query: AtomicU64::new(1),
            handshake_timeout: Duration::from_millis(config.transport.handshake_timeout_ms),
            max_connections: config.transport.max_connections,
            resume_reserved_connections: config.transport.resume_reserved_connections,
            max_handshaking: config.transport.max_handshaking,
            max_handshaking_per_address: config.transport.max_handshaking_per_address,
            handshaking: std::sync::atomic::AtomicUsize::new(0),
            handshaking_by_address: DashMap::new(),
            runtime,
            metrics: Metrics::new(),
            latency_samples: IdMap::default(),
            draining: AtomicBool::new(false),
            accounts_path,
            tls_reload: match (&config.tls.cert, &config.tls.key) {
                (Some(cert), Some(key)) => Some(TlsReload {
                    cert: cert.clone(),
                    key: key.clone(),
                    config: config.clone(),
                    endpoint: endpoint.clone(),
                }),
                _ => None,
            },
            gateway_timeout: Duration::from_millis(config.sequencer.gateway_timeout_ms),
            drain_notice: Duration::from_millis(config.sequencer.drain_notice_ms),
            requests: OnceLock::new(),
            snapshot_position: AtomicU64::new(position),
            snapshot_failures: AtomicU64::new(0),
            failed: watch::Sender::new(None),
            accepting: watch::Sender::new(false),
        });
        let _ = routed_to.set(Arc::clone(&shared));

        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(accept_loop(Arc::clone(&shared), endpoint.clone()));
        tasks.spawn(timer_loop(Arc::clone(&shared)));
        let admin_addr = match admin_listener {
            Some(listener) => {
                let addr = listener.local_addr().ok();
                tasks.spawn(crate::admin::serve(
                    listener,
                    Arc::clone(&shared) as Arc<dyn Operations>,
                    admin_token,
                    config.admin.clone(),
                ));
                if let Some(addr) = addr {
                    info!(listen = %addr, "admin listener up: /metrics, /healthz, /readyz, /admin");
                }
                addr
            }
            None => None,
        };
        info!(listen = %endpoint.local_addr().map_or(config.listen, |a| a), "gateway listening");
        Ok(Gateway {
            shared,
            endpoint,
            engine,
            tasks,
            admin_addr,
        })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The session registry, for inspection and operations (revoke, key rotation).
    pub fn registry(&self) -> &Registry {
        self.shared.core.registry()
    }

    /// The gateway's metrics in the OpenMetrics text format (what `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_text()
    }

    /// Where the operators' HTTP listener listens, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Reads the accounts file again (what SIGHUP does); returns how many accounts
    /// there are now.
    pub fn reload_accounts(&self) -> Result<usize, String> {
        self.shared.reload_accounts()
    }

    /// Reads the certificate and key again (SIGHUP, `gateway admin reload-tls`).
    pub fn reload_tls(&self) -> Result<(), String> {
        self.shared.reload_tls()
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.shared.conns.len()
    }

    /// Ends a session on an operator's request; whether it was live.
    pub async fn revoke(&self, session_id: u64) -> Result<bool, String> {
        let ended = self.shared.revoke_sessions(&[session_id]).await?;
        Ok(!ended.is_empty())
    }

    /// Resolves when the gateway cannot go on, with why: in crash-safe mode, when
    /// its stream lost records its core needs or its run on the stream ended
    /// (another gateway started under its name, or it was silent too long); never
    /// in embedded mode.
    pub async fn failed(&self) -> String {
        let mut failed = self.shared.failed.subscribe();
        let why = failed
            .wait_for(Option::is_some)
            .await
            .map(|why| why.clone().unwrap_or_default());
        match why {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    }

    /// Runs until `signal` completes, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// Embedded mode: stops accepting and ends every session (sessions live in this
    /// process's memory only): each one's cancel-on-disconnect runs, its connection
    /// gets the rest of its stream and `Close` with `ShuttingDown`.
    ///
    /// Crash-safe mode: drains. The gateway reports itself not ready and refuses new
    /// logins for `sequencer.drain_notice_ms` (a balancer's health check moves new
    /// connections elsewhere), then closes its connections with `ShuttingDown`:
    /// sessions live on in the stream, and their clients resume on another gateway.
    ///
    /// Then closes the endpoint and stops the engine after it has handled what was
    /// queued.
    pub async fn shutdown(mut self) {
        info!(connections = self.shared.conns.len(), "shutting down");
        let sessions_live_on = self.shared.log.outlives_the_process();
        let failed = self.shared.failed.borrow().is_some();
        if sessions_live_on && !failed {
            self.shared.start_draining();
            tokio::time::sleep(self.shared.drain_notice).await;
        }
        self.tasks.abort_all();
        if !sessions_live_on {
            let ticket = self.shared.log.ticket();
            let _ = self.shared.call(Record::EndAll, ticket).await;
        }
        for conn in self.shared.conns.iter() {
            conn.close(ReasonCode::ShuttingDown);
        }
        let deadline = tokio::time::Instant::now() + CLOSE_DEADLINE * 2;
        while !self.shared.conns.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !failed {
            // The run ends now rather than after sequencer.gateway_timeout_ms of
            // silence: its sessions still attached are detached (and resume
            // elsewhere), and the next run takes snapshots.
            self.shared.log.end_run(CLOSE_DEADLINE * 2).await;
        }
        self.endpoint
            .close(close_code(ReasonCode::ShuttingDown), b"ShuttingDown");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Some(engine) = self.engine {
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        }
        info!("gateway stopped");
    }
}

/// The record that begins this gateway's run on its log.
fn run_started(config: &Config) -> Record {
    Record::Started {
        gateway: config.gateway_name(),
        timeout_ms: config.sequencer.gateway_timeout_ms,
        settings: config.core_fingerprint(),
    }
}

/// The operators' TCP listener, bound now so that a taken port fails the start.
fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    let bind_error = |error| StartError::Bind {
        setting: "admin.listen",
        addr,
        error,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    tokio::net::TcpListener::from_std(listener).map_err(bind_error)
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    // In crash-safe mode, not before the core is rebuilt.
    if shared
        .accepting
        .subscribe()
        .wait_for(|on| *on)
        .await
        .is_err()
    {
        return;
    }
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let slot = match shared.admit(&endpoint, &incoming) {
            Admission::Accept(slot) => slot,
            Admission::Retry => {
                if let Err(error) = incoming.retry() {
                    debug!(%remote, %error, "retry failed");
                }
                continue;
            }
            Admission::Refuse(why) => {
                info!(%remote, why, "connection refused before the handshake");
                shared.metrics.refused(why);
                incoming.refuse();
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let conn_id = shared.new_conn_id();
        tokio::spawn(
            async move {
                // Served from the client's first flight on: a resuming client's
                // `Resume` may be 0-RTT data, answered before the handshake ends (see
                // `quic_crypto` for why that is safe). Others' first frame arrives
                // once their handshake completes.
                let connection = match incoming.accept().map(quinn::Connecting::into_0rtt) {
                    Ok(Ok((connection, _handshake_done))) => connection,
                    Ok(Err(connecting)) => match connecting.await {
                        Ok(connection) => connection,
                        Err(error) => return debug!(%error, "handshake failed"),
                    },
                    Err(error) => return debug!(%error, "handshake failed"),
                };
                serve_connection(shared, conn_id, connection, slot).await;
            }
            .instrument(tracing::debug_span!("conn", id = conn_id, %remote)),
        );
    }
}

async fn timer_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    let mut swept = Instant::now();
    loop {
        tick.tick().await;
        if swept.elapsed() >= LATENCY_SAMPLE_TTL {
            // Orders answered by the gateway itself (rate limit, duplicates) or lost
            // with their connection never meet an engine answer.
            shared
                .latency_samples
                .retain(|_, arrived| arrived.elapsed() < LATENCY_SAMPLE_TTL);
            swept = Instant::now();
        }
        let now = clock::now();
        // A tick fires due timers; with nothing else to append, it also tells the
        // other gateways on the stream that this one is alive.
        let heartbeat_due = shared.log.heartbeat_due(now, shared.gateway_timeout / 4);
        if shared.core.registry().timers_due(now) || heartbeat_due {
            // Not waited for: a slow acknowledgement (NATS failing over) must not
            // hold the next tick back.
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let apply = |entry, position| shared.apply(entry, position);
                shared.log.append(Record::Tick, apply).await;
            });
        }
    }
}

impl Shared {
    fn forget(&self, conn_id: ConnectionId) {
        self.conns.remove(&conn_id);
    }

    /// A connection id never used before, unique across the gateway's runs on the
    /// log too (the run's position is its high half).
    fn new_conn_id(&self) -> ConnectionId {
        self.log.ticket()
    }

    /// Counts a request as it arrives, and stamps one new order in
    /// [`LATENCY_SAMPLE_EVERY`] for the latency histogram.
    fn count_request(&self, session_id: u64, frame: &Frame) {
        match frame {
            Frame::NewOrder(order) => {
                self.metrics.orders.inc();
                if order.client_seq % LATENCY_SAMPLE_EVERY == 0
                    && self.latency_samples.len() < MAX_LATENCY_SAMPLES
                {
                    self.latency_samples
                        .insert((session_id, order.client_seq), Instant::now());
                }
            }
            Frame::Cancel(_) => {
                self.metrics.cancels.inc();
            }
            Frame::Replace(_) => {
                self.metrics.replaces.inc();
            }
            _ => {}
        }
    }

    /// Counts an engine event, and times a sampled order's answer.
    fn count_event(&self, event: &engine::Event) {
        let metrics = &self.metrics;
        let answered = match event {
            engine::Event::Accepted { owner, tag, .. } => {
                metrics.order_acks.inc();
                Some((owner.session, *tag))
            }
            engine::Event::Rejected {
                owner, tag, reason, ..
            } => {
                let reason = convert::reject_reason_to_wire(*reason).name();
                metrics.rejects.get_or_create(&ReasonLabel { reason }).inc();
                Some((owner.session, *tag))
            }
            engine::Event::Fill(_) => {
                metrics.fills.inc();
                None
            }
            engine::Event::Cancelled { reason, .. } => {
                let reason = convert::cancel_reason_to_wire(*reason).name();
                metrics
                    .cancelled
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                None
            }
            _ => None,
        };
        if let Some(key) = answered.filter(|(_, tag)| tag % LATENCY_SAMPLE_EVERY == 0) {
            if let Some((_, arrived)) = self.latency_samples.remove(&key) {
                metrics.order_answered_after(arrived.elapsed());
            }
        }
    }

    /// Tells a connection's writer that its session has frames to send.
    fn wake(&self, conn_id: ConnectionId) {
        if let Some(conn) = self.conns.get(&conn_id) {
            conn.wake.notify_one();
        }
    }
}
