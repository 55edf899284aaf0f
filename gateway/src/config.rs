//! The gateway's settings: a TOML file, overridden key by key, with defaults that run
//! a complete development gateway on loopback.
//!
//! Every setting has a key (`section.name`) usable in the file and as an override
//! (`--set section.name=value`). Durations are integers in milliseconds (`_ms`) or
//! seconds (`_s`), named so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::AuthConfig;
use crate::registry::RegistryLimits;
use crate::ring::RingLimits;
use crate::session::SessionConfig;

/// The largest `transport.ack_eliciting_threshold`: a sender's congestion window
/// waits on the acknowledgements asked for, so a slip of the keyboard must not ask
/// clients to hold them back for thousands of packets.
pub const MAX_ACK_ELICITING_THRESHOLD: u32 = 64;

/// Why the configuration cannot be used. The operator's fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (shown in the message, so not a separate error source).
        error: std::io::Error,
    },
    /// The file or an override is not valid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// All settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where development files go: the generated certificate, demo accounts and their
    /// client keys.
    pub dev_dir: PathBuf,
    /// TLS certificate chain and key (PEM). Both unset: a self-signed development
    /// certificate for `localhost` is generated in `dev_dir` (or reused).
    pub tls: TlsSettings,
    /// Accounts file (TOML, see the `auth` module). Unset: demo accounts are
    /// generated in `dev_dir` (or reused) with their client keys beside them.
    pub accounts_file: Option<PathBuf>,
    /// Number of demo accounts generated when no accounts file is given.
    pub demo_accounts: u32,
    /// File holding the token HMAC key in hex (at least 32 bytes). Unset: one is
    /// generated in `dev_dir` (`token-key.hex`) or reused from there.
    pub token_key_file: Option<PathBuf>,
    /// Transport settings.
    pub transport: TransportSettings,
    /// Session settings.
    pub session: SessionSettings,
    /// Login settings.
    pub auth: AuthSettings,
    /// The matching engine.
    pub engine: EngineSettings,
    /// Logging.
    pub log: LogSettings,
    /// The operators' HTTP listener: metrics, health, admin operations.
    pub admin: AdminSettings,
    /// Where the session core's inputs are put in order: in this process, or on a
    /// NATS JetStream stream that outlives it (crash-safe mode).
    pub sequencer: SequencerSettings,
}

/// How the session core's inputs are sequenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SequencerMode {
    /// The core takes each input as it arrives, in this process; sessions, their
    /// unacknowledged messages and the book live and die with it. No external
    /// service; the fastest.
    Embedded,
    /// Each input (logins, resumes, requests, acks, lost connections, timer ticks)
    /// is first appended to a JetStream stream, and the core applies them in the
    /// stream's order. A gateway started again rebuilds every session, its
    /// unacknowledged messages and the book from the stream, and clients resume
    /// with their tokens.
    Jetstream,
}

/// Sequencer settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SequencerSettings {
    /// `embedded` or `jetstream`. `jetstream` needs `engine.mode = "inline"` (the
    /// engine is part of the core the stream rebuilds) or `"external"` (engines in
    /// their own processes, on the log: ENGINE.md).
    pub mode: SequencerMode,
    /// The NATS server (jetstream mode); the servers of a cluster separated by
    /// commas, `nats://10.0.0.1:4222,nats://10.0.0.2:4222`.
    pub nats_url: String,
    /// The JetStream stream of the core's inputs, created (file storage) if missing;
    /// its subject is `<stream>.in`. One stream per venue: every record in it is
    /// applied again when a gateway starts.
    pub stream: String,
    /// How long the gateway waits for NATS at start and for each append's
    /// acknowledgement before it gives up.
    pub timeout_ms: u64,
    /// NATS user the gateway connects as (with `password_file`). Whoever may
    /// publish on the stream's subject controls the core: give the gateway its own
    /// NATS user, and nobody else that subject.
    pub user: Option<String>,
    /// File holding that user's password (one line).
    pub password_file: Option<PathBuf>,
    /// File holding a NATS token to connect with, instead of a user.
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that the NATS servers' certificates are checked
    /// against; set, the connection must use TLS. Unset: TLS only if the server
    /// asks, checked against the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that verify clients (`verify:
    /// true`), with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// Records applied between two snapshots of the core, stored in the object
    /// store `<stream>_snapshots`: a gateway starting again restores the latest and
    /// applies only the records after it. 0: no snapshots (every start applies the
    /// whole stream).
    pub snapshot_every: u64,
    /// Whether, once a snapshot is stored, the records the one it replaces covered
    /// are purged from the stream, so that the stream stays bounded (a gateway
    /// starting from the replaced one still finds the records after it). Off keeps
    /// the whole stream (an audit trail).
    pub purge_after_snapshot: bool,
    /// This gateway's name among the gateways sharing the stream: each needs its
    /// own. A gateway started again under the same name replaces its earlier run at
    /// once (that run's connections are gone); under a new name, the earlier run's
    /// connections are declared gone after its `gateway_timeout_ms`. Unset: the
    /// host's name and the `listen` port (`edge-1-4433`), which differs between
    /// hosts and stays the same across restarts ([`Config::gateway_name`]).
    pub gateway_name: Option<String>,
    /// How long the gateway may stay silent on the stream before the others
    /// declare its connections gone (their sessions detached, cancel-on-disconnect
    /// started) and fence off its later records. It appends a heartbeat every
    /// quarter of this when it has nothing else to append. A gateway declared gone
    /// has been silent for this and a tenth more while others were heard: an
    /// outage of the whole stream (a NATS leader election) counts against no one.
    /// A gateway cut off from the stream alone for that long stops, and its
    /// clients resume elsewhere.
    pub gateway_timeout_ms: u64,
    /// Copies JetStream keeps of the stream and the snapshots: 1 on a single NATS
    /// server, 3 on a cluster of three or more (losing one server then loses
    /// nothing acknowledged). Applies when the stream is created.
    pub replicas: usize,
    /// On SIGTERM, how long the gateway reports itself not ready (`/readyz` 503,
    /// new logins refused) before it closes its connections with `ShuttingDown`:
    /// time for a load balancer's health check to send reconnecting clients to
    /// another gateway, where they resume.
    pub drain_notice_ms: u64,
    /// Most records in one message of the stream. The gateway's records travel in
    /// batches, one at a time: a batch leaves as soon as the one before it is
    /// stored, with every record that arrived meanwhile (up to this many, and up
    /// to 1 MiB), so a record never waits for a timer, and under load one message
    /// and one acknowledgement carry many.
    pub batch_max_records: usize,
    /// How long a batch the stream did not take (NATS restarting, a stream leader
    /// being elected) is sent again, under the same message id, so that it is
    /// stored once and in order, before its records are given up and their
    /// connections closed. Keep it above a NATS cluster's election time (seconds)
    /// and below the stream's duplicate window (2 minutes).
    pub append_patience_ms: u64,
}

/// The stream's duplicate window, milliseconds: a batch sent again within it under
/// the same message id is stored once (`sequencer.append_patience_ms` stays below).
pub const DUPLICATE_WINDOW_MS: u64 = 120_000;

impl Default for SequencerSettings {
    fn default() -> Self {
        SequencerSettings {
            mode: SequencerMode::Embedded,
            nats_url: "nats://127.0.0.1:4222".into(),
            stream: "GATEWAY_IN".into(),
            timeout_ms: 5_000,
            user: None,
            password_file: None,
            token_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            snapshot_every: 100_000,
            purge_after_snapshot: true,
            gateway_name: None,
            gateway_timeout_ms: 10_000,
            replicas: 1,
            drain_notice_ms: 500,
            batch_max_records: 1_000,
            append_patience_ms: 30_000,
        }
    }
}

/// The operators' HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// TCP address for `/metrics`, `/healthz`, `/readyz` and `/admin/*`; empty turns
    /// the listener off. Keep it on loopback or a private network: metrics and
    /// health need no credentials.
    pub listen: String,
    /// File holding the bearer token that `/admin/*` requires. Unset: one is
    /// generated in `dev_dir` (`admin-token`) or reused from there.
    pub token_file: Option<PathBuf>,
    /// Host names the listener answers to besides IP addresses and `localhost`
    /// (the `Host` header, port aside, case aside): a request naming any other host
    /// is refused (421), so a web page cannot read `/metrics` or `/readyz` by
    /// rebinding its own name to this address. Add the names monitoring uses.
    pub allowed_hosts: Vec<String>,
    /// Most connections open at once; more are closed as they come.
    pub max_connections: usize,
    /// Most connections open at once from one address (IPv6: one /64), so that
    /// one peer cannot hold every connection.
    pub max_connections_per_address: usize,
    /// Time a connection has to send a request's headers, and to start its next
    /// request: a connection slower than that, or idle that long, is closed.
    pub header_timeout_ms: u64,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: "127.0.0.1:9433".into(),
            token_file: None,
            allowed_hosts: Vec::new(),
            max_connections: 64,
            max_connections_per_address: 8,
            header_timeout_ms: 5_000,
        }
    }
}

impl AdminSettings {
    /// The address to listen on, `None` when turned off.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "admin.listen {listen:?} is not an address like 127.0.0.1:9433 (empty turns it off)"
            ))
        })
    }

    /// Where the admin token is read from.
    pub fn token_path(&self, dev_dir: &std::path::Path) -> PathBuf {
        self.token_file
            .clone()
            .unwrap_or_else(|| dev_dir.join("admin-token"))
    }
}

/// TLS files and session resumption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// Certificate chain, PEM.
    pub cert: Option<PathBuf>,
    /// Private key, PEM.
    pub key: Option<PathBuf>,
    /// TLS sessions remembered so that reconnecting clients skip the certificate
    /// exchange and send their `Resume` as 0-RTT data (each connection leaves two
    /// single-use tickets; a few hundred bytes each). 0 turns both off; a client whose
    /// ticket was forgotten simply does a full handshake.
    pub resumption_cache: usize,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cert: None,
            key: None,
            resumption_cache: 16_384,
        }
    }
}

/// QUIC transport settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSettings {
    /// A connection silent this long is dead.
    pub idle_timeout_ms: u64,
    /// Gateway-side keep-alive interval; 0 leaves keep-alives to clients.
    pub keep_alive_ms: u64,
    /// Time a new connection has to send `Login` or `Resume`.
    pub handshake_timeout_ms: u64,
    /// Round-trip time assumed before a connection has measured one: a lost handshake
    /// packet is sent again after about three times this. The default is QUIC's
    /// recommendation for the open internet (RFC 9002); set it near the clients' real
    /// round trip (a few ms in a colocation hall) and a resume over a lossy path
    /// recovers that much sooner.
    pub initial_rtt_ms: u64,
    /// Packets carrying data a client may receive before it must acknowledge them,
    /// asked of clients through the QUIC acknowledgement-frequency extension (quinn
    /// clients take it; others ignore it). An acknowledgement then mostly rides on the
    /// client's next order instead of a packet of its own, and comes within
    /// [`ACK_DELAY`](crate::server::ACK_DELAY) otherwise: 10-15% more orders per core
    /// at full load, but a replay after a resume, paced by those acknowledgements,
    /// takes longer (8.7 ms instead of 6.7 for 10,000 messages, BENCHMARKS.md). 1 keeps
    /// QUIC's own rule (every other packet).
    pub ack_eliciting_threshold: u32,
    /// Most simultaneous connections; more are refused at the QUIC level.
    pub max_connections: usize,
    /// Connections kept for resumes of existing sessions: a login is refused
    /// (`TooManySessions`) once fewer than this many connection slots are free.
    pub resume_reserved_connections: usize,
    /// Most connections that have not yet logged in or resumed. From half of it on,
    /// a client whose address QUIC has not validated is asked to (a Retry round
    /// trip; clients holding a token from an earlier connection skip it); at the
    /// limit, new connections are refused.
    pub max_handshaking: usize,
    /// Most connections from one address (IPv6: one /64) that have not yet logged
    /// in or resumed; more are refused.
    pub max_handshaking_per_address: usize,
    /// UDP socket send and receive buffer size asked of the kernel (which may cap
    /// it, e.g. at `net.core.rmem_max`). Large buffers absorb bursts such as many
    /// clients reconnecting at once.
    pub socket_buffer_bytes: usize,
}

/// Session settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// Unacknowledged messages retained per session for replay.
    pub replay_window: usize,
    /// Bytes of unacknowledged messages retained per session.
    pub replay_window_bytes: usize,
    /// Token lifetime.
    pub token_ttl_s: u64,
    /// How long a detached session lives.
    pub detached_ttl_s: u64,
    /// Longest cancel-on-disconnect grace period a client may ask for.
    pub max_cod_grace_ms: u64,
    /// Most open orders per session.
    pub max_open_orders: usize,
    /// Sequenced client messages per second per session (bursts up to one second's
    /// worth); beyond, requests are rejected with `RateExceeded`.
    pub max_messages_per_second: u32,
    /// Requests that may wait, unprocessed, for acks to free room in the ring for
    /// their answers (PROTOCOL.md section 4, "Flow control"); one more closes the
    /// connection as a slow consumer.
    pub max_waiting_requests: usize,
    /// Finished orders kept per session for snapshots.
    pub finished_orders_retained: usize,
    /// Most sessions on the gateway.
    pub max_sessions: usize,
    /// Most sessions per account (an account's own limit may be lower).
    pub max_sessions_per_account: usize,
    /// Fills and cancels of orders whose session ended (without cancel-on-disconnect)
    /// kept per account while the account has no live session, for its next login
    /// (beyond, the oldest go; the login snapshot still shows every order's end
    /// state). Capped at `replay_window`, so a login's backlog fits its replay ring.
    pub unclaimed_events_per_account: usize,
}

/// Login settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// This gateway's venue id (ASCII, at most 64 bytes), part of every login's
    /// signed message: give test and production gateways different ids so that a
    /// login captured at one is refused by the other. Clients must be told it.
    pub venue: String,
    /// Largest accepted client clock difference.
    pub max_clock_skew_ms: u64,
    /// Failed authentications (unknown API key, bad signature, forged token) per
    /// address (IPv6: per /64) and window before its logins are answered
    /// `RateLimited` with a `retry_after_ms`. Resumes of live sessions are never
    /// refused for it.
    pub failures_per_window: u32,
    /// The failure counting window.
    pub failure_window_ms: u64,
}

/// One instrument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstrumentSettings {
    /// Id used in orders.
    pub id: u32,
    /// Prices are multiples of this.
    pub tick_size: i64,
    /// Quantities are multiples of this.
    pub lot_size: u64,
}

/// Where the matching engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineMode {
    /// On its own thread behind a bounded queue: for engines that may block.
    Thread,
    /// In place, under a lock, in the connection task that has the request: no thread
    /// hop; for engines that never block, like the bundled one. The default: with the
    /// gateway measured in its own process (BENCHMARKS.md), it costs about a quarter
    /// less CPU and a fifth of the context switches per order.
    Inline,
    /// In processes of their own, in any language, on the log (crash-safe mode
    /// only): the gateways publish the requests to `<stream>_requests`, engines
    /// append their answers to `<stream>.answers` (ENGINE.md); the first answer to
    /// each batch of requests counts, later ones are compared with it.
    External,
}

/// Matching engine settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// Where the engine runs.
    pub mode: EngineMode,
    /// Requests queued for the engine before new orders are refused with `EngineBusy`.
    pub queue_capacity: usize,
    /// Finished orders kept per account for login snapshots.
    pub finished_orders_per_account: usize,
    /// Most working orders of one account across all its sessions, ended ones
    /// included; beyond, new orders are rejected with `TooManyOpenOrders`.
    pub max_working_orders_per_account: usize,
    /// The tradable instruments.
    pub instruments: Vec<InstrumentSettings>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `gateway=debug`.
    pub filter: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            dev_dir: PathBuf::from(".gateway-dev"),
            tls: TlsSettings::default(),
            accounts_file: None,
            demo_accounts: 8,
            token_key_file: None,
            transport: TransportSettings::default(),
            session: SessionSettings::default(),
            auth: AuthSettings::default(),
            engine: EngineSettings::default(),
            log: LogSettings::default(),
            admin: AdminSettings::default(),
            sequencer: SequencerSettings::default(),
        }
    }
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            idle_timeout_ms: 10_000,
            keep_alive_ms: 0,
            handshake_timeout_ms: 5_000,
            initial_rtt_ms: 333,
            ack_eliciting_threshold: 8,
            max_connections: 20_000,
            resume_reserved_connections: 2_000,
            max_handshaking: 2_048,
            max_handshaking_per_address: 64,
            socket_buffer_bytes: 4 << 20,
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        let session = SessionConfig::default();
        let limits = RegistryLimits::default();
        SessionSettings {
            replay_window: session.ring.max_messages,
            replay_window_bytes: session.ring.max_bytes,
            token_ttl_s: session.token_ttl.as_secs(),
            detached_ttl_s: session.detached_ttl.as_secs(),
            max_cod_grace_ms: millis(session.max_cod_grace),
            max_open_orders: session.max_open_orders,
            max_messages_per_second: session.max_messages_per_second,
            max_waiting_requests: session.max_waiting_requests,
            finished_orders_retained: session.finished_orders_retained,
            max_sessions: limits.max_sessions,
            max_sessions_per_account: limits.max_sessions_per_account,
            unclaimed_events_per_account: limits.unclaimed_events_per_account,
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        let auth = AuthConfig::default();
        AuthSettings {
            venue: auth.venue,
            max_clock_skew_ms: millis(auth.max_clock_skew),
            failures_per_window: auth.failures_per_window,
            failure_window_ms: millis(auth.failure_window),
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            mode: EngineMode::Inline,
            queue_capacity: 65_536,
            finished_orders_per_account: 1_024,
            max_working_orders_per_account: 50_000,
            instruments: vec![
                InstrumentSettings {
                    id: 1,
                    tick_size: 1,
                    lot_size: 1,
                },
                InstrumentSettings {
                    id: 2,
                    tick_size: 5,
                    lot_size: 10,
                },
            ],
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            filter: "info".into(),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Config {
    /// Reads `file` (if any) and applies `overrides` (`section.key=value`, value in
    /// TOML syntax, bare words taken as strings), then validates.
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.to_path_buf(),
                    error,
                })?;
                // Read as settings first, so that a wrong key or value is reported
                // with its file, line and column; the overrides go on the table.
                let in_file = |e: toml::de::Error| {
                    ConfigError::Invalid(format!("--config {}: {e}", path.display()))
                };
                toml::from_str::<Config>(&text).map_err(in_file)?;
                text.parse::<toml::Table>().map_err(in_file)?
            }
            None => toml::Table::new(),
        };
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
        }
        if let Some(toml::Value::String(listen)) = table.get("listen") {
            if listen.parse::<SocketAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "listen {listen:?} is not an address like 127.0.0.1:4433 or [::]:4433"
                )));
            }
        }
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: &str| Err(ConfigError::Invalid(what.to_string()));
        self.admin.listen_addr()?;
        if self.admin.max_connections == 0
            || !(1..=self.admin.max_connections).contains(&self.admin.max_connections_per_address)
        {
            return invalid(
                "admin.max_connections must be positive, and admin.max_connections_per_address from 1 to it",
            );
        }
        if self.admin.header_timeout_ms == 0 {
            return invalid("admin.header_timeout_ms must be positive");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid("tls.cert and tls.key must be given together");
        }
        if self.transport.idle_timeout_ms == 0
            || self.transport.handshake_timeout_ms == 0
            || self.transport.initial_rtt_ms == 0
        {
            return invalid("transport timeouts and initial_rtt_ms must be positive");
        }
        if !(1..=MAX_ACK_ELICITING_THRESHOLD).contains(&self.transport.ack_eliciting_threshold) {
            return invalid(&format!(
                "transport.ack_eliciting_threshold must be from 1 to {MAX_ACK_ELICITING_THRESHOLD}"
            ));
        }
        if self.transport.resume_reserved_connections >= self.transport.max_connections {
            return invalid("transport.resume_reserved_connections must be below max_connections");
        }
        if self.transport.max_handshaking == 0 || self.transport.max_handshaking_per_address == 0 {
            return invalid(
                "transport.max_handshaking and max_handshaking_per_address must be positive",
            );
        }
        if self.session.replay_window == 0
            || self.session.replay_window_bytes < proto::MAX_FRAME_LEN
        {
            return invalid(
                "session.replay_window must be positive and replay_window_bytes at least one frame",
            );
        }
        if self.auth.venue.is_empty()
            || self.auth.venue.len() > proto::MAX_VENUE_LEN
            || !self.auth.venue.bytes().all(|b| b.is_ascii_graphic())
        {
            return invalid("auth.venue must be 1 to 64 printable ASCII characters, no spaces");
        }
        if self.engine.queue_capacity == 0 {
            return invalid("engine.queue_capacity must be positive");
        }
        if self.engine.instruments.is_empty() {
            return invalid("engine.instruments must list at least one instrument");
        }
        if self.engine.mode == EngineMode::External
            && self.sequencer.mode != SequencerMode::Jetstream
        {
            return invalid(
                "engine.mode = \"external\" needs sequencer.mode = \"jetstream\": engines on the log read their requests from the stream",
            );
        }
        if self.sequencer.mode == SequencerMode::Jetstream {
            if self.engine.mode == EngineMode::Thread {
                return invalid(
                    "sequencer.mode = \"jetstream\" needs engine.mode = \"inline\" or \"external\"",
                );
            }
            let stream = &self.sequencer.stream;
            if stream.is_empty()
                || !stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return invalid("sequencer.stream must be letters, digits, '_' or '-'");
            }
            if self.sequencer.timeout_ms == 0 {
                return invalid("sequencer.timeout_ms must be positive");
            }
            let name = self.gateway_name();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                return invalid(
                    "sequencer.gateway_name must be 1 to 64 letters, digits, '_', '-' or '.'",
                );
            }
            if self.sequencer.gateway_timeout_ms < 200 {
                return invalid("sequencer.gateway_timeout_ms must be at least 200");
            }
            if !(1..=5).contains(&self.sequencer.replicas) {
                return invalid("sequencer.replicas must be 1 to 5");
            }
            if self.sequencer.batch_max_records == 0 {
                return invalid("sequencer.batch_max_records must be at least 1");
            }
            if self.sequencer.append_patience_ms >= DUPLICATE_WINDOW_MS {
                return invalid(
                    "sequencer.append_patience_ms must be below the stream's duplicate \
                     window (120000): a batch sent again after it could be stored twice",
                );
            }
            if self.sequencer.user.is_some() && self.sequencer.token_file.is_some() {
                return invalid(
                    "sequencer.user (with password_file) and token_file are two ways to \
                     authenticate to NATS: give one",
                );
            }
            if self.sequencer.tls_cert_file.is_some() != self.sequencer.tls_key_file.is_some() {
                return invalid("sequencer.tls_cert_file and tls_key_file must be given together");
            }
            if self.sequencer.user.is_some() != self.sequencer.password_file.is_some() {
                return invalid("sequencer.user and sequencer.password_file go together");
            }
            if self.sequencer.user.is_some() && self.sequencer.token_file.is_some() {
                return invalid("give sequencer.user or sequencer.token_file, not both");
            }
        }
        if self.accounts_file.is_none() && self.demo_accounts == 0 {
            return invalid("give an accounts_file or a positive demo_accounts");
        }
        Ok(())
    }

    /// The session core's settings.
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            ring: RingLimits {
                max_messages: self.session.replay_window,
                max_bytes: self.session.replay_window_bytes,
            },
            token_ttl: Duration::from_secs(self.session.token_ttl_s),
            detached_ttl: Duration::from_secs(self.session.detached_ttl_s),
            max_cod_grace: Duration::from_millis(self.session.max_cod_grace_ms),
            max_open_orders: self.session.max_open_orders,
            max_messages_per_second: self.session.max_messages_per_second,
            max_waiting_requests: self.session.max_waiting_requests,
            finished_orders_retained: self.session.finished_orders_retained,
            ..SessionConfig::default()
        }
    }

    /// This gateway's name on the stream: `sequencer.gateway_name`, else the host's
    /// name (from the kernel, cut to the characters a name may have) and the
    /// `listen` port, so that gateways on different hosts started with the same
    /// settings do not end each other's runs.
    pub fn gateway_name(&self) -> String {
        if let Some(name) = &self.sequencer.gateway_name {
            return name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .take(50)
            .collect();
        let host = if host.is_empty() { "gateway" } else { &host };
        format!("{host}-{}", self.listen.port())
    }

    /// A fingerprint of the settings the session core applies the stream with
    /// (`session.*`, `engine.*` but its mode and queue, and
    /// `transport.idle_timeout_ms`): gateways that share a stream must agree on it,
    /// or their copies of the core would differ.
    pub fn core_fingerprint(&self) -> u64 {
        // Where the engine runs is no matter to the core, but for engines on the log:
        // then the core holds requests and answers, not a book.
        let mode = match self.engine.mode {
            EngineMode::External => EngineMode::External,
            EngineMode::Inline | EngineMode::Thread => EngineMode::Inline,
        };
        let engine = EngineSettings {
            mode,
            queue_capacity: 0,
            ..self.engine.clone()
        };
        let core = (&self.session, &engine, self.transport.idle_timeout_ms);
        // Serializing plain settings into a vector cannot fail.
        let bytes = postcard::to_stdvec(&core).unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_le_bytes(first)
    }

    /// The registry's limits.
    pub fn registry_limits(&self) -> RegistryLimits {
        RegistryLimits {
            max_sessions: self.session.max_sessions,
            max_sessions_per_account: self.session.max_sessions_per_account,
            unclaimed_events_per_account: self
                .session
                .unclaimed_events_per_account
                .min(self.session.replay_window),
            ..RegistryLimits::default()
        }
    }

    /// The authenticator's settings.
    pub fn auth_config(&self) -> AuthConfig {
        AuthConfig {
            venue: self.auth.venue.clone(),
            max_clock_skew: Duration::from_millis(self.auth.max_clock_skew_ms),
            failures_per_window: self.auth.failures_per_window,
            failure_window: Duration::from_millis(self.auth.failure_window_ms),
            ..AuthConfig::default()
        }
    }
}

/// Sets `a.b.c=value` in `table`.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| ConfigError::Invalid(format!("override {assignment:?} is not key=value")))?;
    let value = parse_value(raw.trim());
    let mut path: Vec<&str> = key.trim().split('.').collect();
    let last = path
        .pop()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ConfigError::Invalid(format!("override {assignment:?} has no key")))?;
    let mut current = table;
    for part in path {
        current = current
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| ConfigError::Invalid(format!("{key}: {part} is not a section")))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// A TOML value, or the text itself as a string.
fn parse_value(raw: &str) -> toml::Value {
    format!("value = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("value"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests;
