//! Load and chaos client for the session gateway, with an exactly-once verifier and a
//! bare-QUIC baseline measured in the same run.
//!
//! [`run`] starts (or targets) a gateway, logs in one session per account, sends an
//! open-loop order flow in which sessions cross each other, optionally breaks
//! connections on purpose (clean close, abrupt drop, blackhole), checks every
//! message against the promises, and reports latency and throughput, with ratios to
//! bare QUIC when asked.
//!
//! # Layout
//!
//! - [`verify`]: the exactly-once verifier.
//! - [`baseline`]: the bare-QUIC echo and handshake baseline.
//! - [`relay`]: the UDP relay that makes connections vanish.
//! - [`balancer`]: the UDP balancer in front of several gateways.
//! - [`crash`]: crash-safe gateways as child processes, alone or several on a stream.
//! - [`nats`]: `nats-server` processes, alone or as a cluster.

pub mod balancer;
pub mod baseline;
pub mod cluster;
pub mod crash;
pub mod html;
pub mod nats;
pub mod process;
pub mod relay;
pub mod verify;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::auth::{AccountEntry, AccountsFile, ApiKeyEntry};
use gateway::config::Config;
use gateway::server::{Gateway, Setup};
use gateway_client::{Client, ClientConfig, ClientError, Credentials, Event, OrderParams};
use hdrhistogram::Histogram;
use proto::{Frame, OrderType, ReasonCode, Side, TimeInForce};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustc_hash::{FxHashMap, FxHashSet};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::Notify;

use crate::baseline::{BaselineOptions, BaselineReport};
use crate::relay::Relay;
use crate::verify::{Checks, Verifier};

/// Why a run could not be carried out (as opposed to violations it found).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The gateway, accounts or sockets could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// A client could not log in (the error's own text follows, once).
    #[error("a client could not log in")]
    Client(#[from] ClientError),
}

/// A gateway run elsewhere.
#[derive(Debug, Clone)]
pub struct RemoteGateway {
    /// Its address.
    pub addr: SocketAddr,
    /// Its certificate.
    pub cert: CertificateDer<'static>,
    /// Credentials per account, as in a dev gateway's `client-keys.toml`.
    pub keys: Vec<(u64, Credentials)>,
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// A gateway to target; `None` starts one in this process on loopback.
    pub remote: Option<RemoteGateway>,
    /// Sessions, one per account.
    pub sessions: usize,
    /// Orders per second in total; 0 sends as fast as `window` allows.
    pub rate: u64,
    /// Unanswered requests per session at most.
    pub window: usize,
    /// How long to send.
    pub duration: Duration,
    /// Break a random session's connection this often.
    pub chaos_interval: Option<Duration>,
    /// Also run the bare-QUIC baseline.
    pub baseline: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Seed of the order flow and chaos choices.
    pub seed: u64,
    /// Messages to replay in the replay measurement (0 skips it).
    pub replay_messages: u64,
    /// Where the in-process gateway runs its engine.
    pub engine_mode: gateway::config::EngineMode,
    /// During the second half of the run, flood the gateway with bad logins from
    /// this address, and compare the established sessions' latency of both halves.
    pub flood: bool,
    /// Loss and delay on every session's path (through a relay each). The quiet
    /// measurements and the baseline stay unimpaired.
    pub path: relay::Impairment,
    /// Initial round-trip estimate of the load clients and of the in-process
    /// gateway; `None` keeps their defaults.
    pub initial_rtt: Option<Duration>,
    /// The process id of the gateway being measured (on this machine), to report its
    /// CPU time and context switches per order. With it, the baseline's echo server
    /// runs in its own process too.
    pub gateway_pid: Option<i32>,
    /// The core the baseline's separate echo server runs on (`taskset`), as the
    /// gateway's was pinned.
    pub server_core: Option<usize>,
    /// Run a crash-safe gateway as a child process (instead of one in this process),
    /// and kill it and start it again as this says.
    pub crash_safe: Option<crash::CrashSafe>,
    /// Run a cluster (NATS servers, several gateways on one stream, a balancer) and
    /// inflict faults on it as this says.
    pub cluster: Option<cluster::ClusterOptions>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            remote: None,
            sessions: 50,
            rate: 20_000,
            window: 4_096,
            duration: Duration::from_secs(10),
            chaos_interval: None,
            baseline: false,
            progress: false,
            seed: 1,
            replay_messages: 1_000,
            engine_mode: gateway::config::EngineMode::Inline,
            flood: false,
            path: relay::Impairment::default(),
            initial_rtt: None,
            gateway_pid: None,
            server_core: None,
            crash_safe: None,
            cluster: None,
        }
    }
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
    /// Samples.
    pub count: u64,
}

impl Percentiles {
    /// The percentiles of a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let at = |q| histogram.value_at_quantile(q) as f64;
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: histogram.max() as f64,
            count: histogram.len(),
        }
    }
}

/// Where a latency distribution stands at each of [`CURVE_QUANTILES`], for the
/// percentile curve of the HTML report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// The quantile (0.5 is the median).
    pub quantile: f64,
    /// Latency at it, microseconds.
    pub us: f64,
}

/// Quantiles of the percentile curves: denser towards the tail.
pub const CURVE_QUANTILES: [f64; 12] = [
    0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0,
];

/// The percentile curve of a histogram of microseconds.
pub fn curve(histogram: &Histogram<u64>) -> Vec<CurvePoint> {
    if histogram.is_empty() {
        return Vec::new();
    }
    CURVE_QUANTILES
        .iter()
        .map(|&quantile| CurvePoint {
            quantile,
            us: histogram.value_at_quantile(quantile) as f64,
        })
        .collect()
}

/// Latency of the requests intended within one slice of the run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// Start of the slice, seconds from the run's start.
    pub t_s: f64,
    /// Requests answered.
    pub count: u64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
}

/// A forced disconnect, or a fault of a process (a gateway kill, a cluster fault).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChaosEvent {
    /// When, seconds from the run's start.
    pub t_s: f64,
    /// `clean`, `abrupt` or `blackhole`; `gateway_kill`; `gateway`, `zombie` or
    /// `nats`.
    pub mode: &'static str,
}

/// Width of a timeline slice.
const TIMELINE_SLICE: Duration = Duration::from_millis(250);

/// Slices kept (an hour's worth); later requests count in the last.
const MAX_TIMELINE_SLICES: usize = 14_400;

/// A slice's histogram: two significant digits are plenty for a plot.
fn slice_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid")
}

/// A histogram of microseconds up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// Records a duration in microseconds (at least 1).
pub fn record(histogram: &mut Histogram<u64>, duration: Duration) {
    let micros = u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

/// Client endpoints for `connections` connections, 50 per UDP socket, as separate
/// client processes would have.
pub fn shared_endpoints(
    config: &ClientConfig,
    connections: usize,
) -> Result<Vec<quinn::Endpoint>, ClientError> {
    (0..connections.div_ceil(50).max(1))
        .map(|_| gateway_client::client_endpoint(config))
        .collect()
}

/// The send times of one connection.
#[derive(Debug)]
pub enum Ticks {
    /// Open loop: times from the schedule thread, fixed in advance, so a stall shows
    /// up as latency (measured from the intended time) instead of hiding it.
    Scheduled(tokio::sync::mpsc::UnboundedReceiver<Instant>),
    /// As fast as the window allows, until the deadline; the intended time is now.
    Unpaced {
        /// When to stop.
        deadline: Instant,
    },
}

impl Ticks {
    /// The next intended send time; `None` when the run is over.
    pub async fn next(&mut self) -> Option<Instant> {
        match self {
            Ticks::Scheduled(times) => times.recv().await,
            Ticks::Unpaced { deadline } => {
                let now = Instant::now();
                (now < *deadline).then_some(now)
            }
        }
    }
}

/// Send times for `connections` connections sharing `rate` per second from `start`
/// to `deadline` (0: unpaced).
///
/// The open-loop schedule runs on its own OS thread: `std::thread::sleep` wakes within
/// tens of microseconds, where tokio's timer rounds to a millisecond, which would show
/// up as a millisecond of latency on every message. Connections take turns, so each
/// sends at `rate / connections`.
pub fn schedule(rate: u64, connections: usize, start: Instant, deadline: Instant) -> Vec<Ticks> {
    if rate == 0 {
        return (0..connections)
            .map(|_| Ticks::Unpaced { deadline })
            .collect();
    }
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..connections)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let spawned = std::thread::Builder::new()
        .name("loadtest-schedule".into())
        .spawn(move || {
            for tick in 0u32.. {
                let intended = start + interval * tick;
                if intended >= deadline {
                    return;
                }
                if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let connection = tick as usize % senders.len();
                // A connection that stopped listening has ended its run.
                let _ = senders[connection].send(intended);
            }
        });
    if spawned.is_err() {
        return (0..connections)
            .map(|_| Ticks::Unpaced { deadline })
            .collect();
    }
    receivers.into_iter().map(Ticks::Scheduled).collect()
}

/// Kills the crash-safe gateway every `interval` until `deadline` and starts it
/// again; returns it with how long each restart took to be ready.
async fn kill_loop(
    mut process: crash::GatewayProcess,
    interval: Duration,
    deadline: Instant,
    shared: Shared,
) -> Result<(crash::GatewayProcess, Vec<Duration>), RunError> {
    let mut ready_after = Vec::new();
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            return Ok((process, ready_after));
        }
        let killed = Instant::now();
        {
            let mut tally = lock(&shared);
            let t_s = killed
                .saturating_duration_since(tally.started)
                .as_secs_f64();
            tally.chaos_events.push(ChaosEvent {
                t_s,
                mode: "gateway_kill",
            });
            for book in &mut tally.books {
                book.gateway_killed = Some(killed);
            }
        }
        process.kill_and_restart()?;
        process.wait_ready().await?;
        ready_after.push(killed.elapsed());
    }
}

/// How a chaos event breaks a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChaosMode {
    /// The client closes the connection properly.
    Clean,
    /// The client's connection vanishes (nothing more reaches the gateway, not even a
    /// close) and the client reconnects at once.
    Abrupt,
    /// Packets are silently dropped both ways; the client notices by its idle
    /// timeout, and the gateway still holds a half-open connection it must hand over.
    Blackhole,
}

/// Disconnects by mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DisconnectCounts {
    /// Clean closes.
    pub clean: u64,
    /// Abrupt drops.
    pub abrupt: u64,
    /// Blackholes.
    pub blackhole: u64,
}

/// The replay measurement: messages a detached session missed, replayed on resume.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Messages replayed.
    pub messages: u64,
    /// With a crash-safe gateway: from killing it (after the maker missed the
    /// messages) to the restarted gateway being ready; the reconnect starts then.
    pub restart_ms: Option<f64>,
    /// Reconnect start to the handshake completing, with `Resume` sent (as 0-RTT
    /// data when a ticket allowed it).
    pub connect_ms: f64,
    /// Reconnect start to `ResumeAccepted`.
    pub resume_ms: f64,
    /// Reconnect start to the first replayed message.
    pub first_message_ms: f64,
    /// Reconnect start to the last replayed message.
    pub complete_ms: f64,
}

/// Full logins and resumes timed one after the other on a quiet gateway, so that the
/// two compare like for like.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CycleReport {
    /// Login-then-resume cycles run.
    pub cycles: u64,
    /// A new client's login: new endpoint, full TLS handshake, `Login` →
    /// `LoginAccepted`.
    pub login_us: Percentiles,
    /// The same client's resume after a clean close: TLS resumption with the `Resume`
    /// in 0-RTT data → `ResumeAccepted`.
    pub resume_us: Percentiles,
}

/// Established sessions' latency without and with a bad-login flood, in one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FloodReport {
    /// Login attempts the flood made.
    pub attempts: u64,
    /// Attempts refused before the TLS handshake (address rate limited).
    pub refused_before_handshake: u64,
    /// Attempts answered `RateLimited`.
    pub rate_limited: u64,
    /// Attempts answered `BadSignature`.
    pub bad_signature: u64,
    /// Order-to-answer latency in the first half (no flood).
    pub quiet_us: Percentiles,
    /// Order-to-answer latency in the second half (flood).
    pub flood_us: Percentiles,
    /// p99 with the flood ÷ p99 without.
    pub p99_ratio: f64,
}

/// Gateway ÷ bare QUIC. The latency ratios are `None` for a run with forced
/// disconnects or faults: the echo has none, so they would compare unlike things.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ratios {
    /// Order-to-ack p50 ÷ echo p50.
    pub ack_p50: Option<f64>,
    /// Order-to-ack p90 ÷ echo p90: the body of the tail, below the few-ms stalls of
    /// a shared machine that decide a short run's p99.
    pub ack_p90: Option<f64>,
    /// Order-to-ack p99 ÷ echo p99.
    pub ack_p99: Option<f64>,
    /// Order throughput ÷ echo throughput.
    pub throughput: f64,
    /// Resume p50 ÷ (handshake p50 + echo p50).
    pub resume_vs_handshake_plus_rtt: f64,
    /// Login p50 ÷ resume p50.
    pub login_vs_resume: f64,
    /// Gateway CPU per order ÷ echo server CPU per message, both in their own
    /// process.
    pub cpu_per_order_vs_echo_msg: Option<f64>,
}

/// What a run found and measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The loadtest's version.
    pub version: &'static str,
    /// When the run started, Unix milliseconds.
    pub started_unix_ms: u64,
    /// The gateway: `in-process` or its address.
    pub target: String,
    /// Sessions.
    pub sessions: usize,
    /// Unanswered requests per session at most.
    pub window: usize,
    /// Seed of the order flow and chaos choices.
    pub seed: u64,
    /// Forced disconnect interval, milliseconds (0: no chaos).
    pub chaos_interval_ms: u64,
    /// Working orders the accounts had from before the run, cancelled first.
    pub leftover_orders_cancelled: u64,
    /// Offered orders per second (0: window-limited).
    pub rate: u64,
    /// Sending time, seconds.
    pub duration_s: f64,
    /// New orders sent.
    pub orders_sent: u64,
    /// Cancels sent.
    pub cancels_sent: u64,
    /// `OrderAck`s received.
    pub acks: u64,
    /// `Reject`s received.
    pub rejects: u64,
    /// `Reject`s by reason.
    pub rejects_by_reason: BTreeMap<String, u64>,
    /// `Fill`s received (both sides counted).
    pub fills: u64,
    /// `Cancelled`s received.
    pub cancelled: u64,
    /// Forced disconnects.
    pub disconnects: u64,
    /// Forced disconnects by mode.
    pub disconnects_by_mode: DisconnectCounts,
    /// Resumes the clients completed.
    pub resumes: u64,
    /// Messages the gateway replayed on resumes (an in-process gateway's count; 0
    /// for another process: its `/metrics` has it).
    pub messages_replayed: u64,
    /// Resumes that found messages the client needed released (a snapshot replaced
    /// them: PROTOCOL.md section 4, "Retention"); in-process only, like
    /// `messages_replayed`.
    pub snapshot_resumes: u64,
    /// Connections the gateway closed with a reason, by reason (`SlowConsumer`, ...):
    /// closes the load client did not force. Each was followed by a resume.
    pub closed_by_gateway: BTreeMap<String, u64>,
    /// Promise violations found; any is a failure.
    pub violations: u64,
    /// The first violations, described.
    pub violation_samples: Vec<String>,
    /// What the verifier checked.
    pub checks: Checks,
    /// Order (and cancel) to answer, from the intended send time.
    pub ack_latency_us: Percentiles,
    /// The same as a percentile curve.
    pub ack_latency_curve: Vec<CurvePoint>,
    /// The same over the run, in slices of 250 ms by intended send time.
    pub timeline: Vec<TimelinePoint>,
    /// The forced disconnects, gateway kills (`gateway_kill`) and cluster faults
    /// (`gateway`, `zombie`, `nats`), in order.
    pub chaos_events: Vec<ChaosEvent>,
    /// Times the gateway process was killed (SIGKILL) and started again.
    pub gateway_restarts: u64,
    /// Cluster runs: the cluster, its faults and failovers.
    pub cluster: Option<cluster::ClusterReport>,
    /// From a kill to the restarted gateway being ready (its core rebuilt from its
    /// stream), microseconds.
    pub restart_ready_us: Percentiles,
    /// From a kill to each session's resume on the restarted gateway (includes the
    /// client noticing its connection is gone), microseconds.
    pub restart_resume_us: Percentiles,
    /// Answers per second over the run.
    pub throughput_orders_per_s: f64,
    /// The gateway process's CPU time per answered request (`--gateway-pid`).
    pub gateway_cpu_us_per_order: Option<f64>,
    /// Share of the cores this load client may use that it used while sending and
    /// waiting for the answers (1.0: saturated, so throughput and latency measure the
    /// client as much as the gateway). Includes an in-process gateway.
    pub load_client_cpu_share: Option<f64>,
    /// Its context switches per answered request, likewise.
    pub gateway_context_switches_per_order: Option<f64>,
    /// Median full login (connect, handshake, login, accepted).
    pub login_ms: f64,
    /// Login distribution, microseconds.
    pub login_us: Percentiles,
    /// Median resume after a clean or abrupt disconnect (disconnect to
    /// `ResumeAccepted`, which arrives in the same flight as the first replayed
    /// message).
    pub resume_ms: f64,
    /// Resume distribution, microseconds.
    pub resume_us: Percentiles,
    /// Median blackhole recovery (includes the client's idle-timeout detection).
    pub blackhole_recovery_ms: f64,
    /// The replay measurement, if run.
    pub replay: Option<ReplayReport>,
    /// The quiet login and resume cycles, if run (with the replay measurement).
    pub cycles: Option<CycleReport>,
    /// The flood comparison, if run.
    pub flood: Option<FloodReport>,
    /// The bare-QUIC baseline, if run.
    pub baseline: Option<BaselineReport>,
    /// Ratios to the baseline, if run.
    pub ratios: Option<Ratios>,
}

/// Where the sessions connect, with what.
struct Target {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    keys: Vec<(u64, Credentials)>,
    gateway: Option<Gateway>,
    initial_rtt: Option<Duration>,
}

/// Starts a gateway in this process with `accounts` fresh accounts.
fn start_gateway(options: &Options) -> Result<Target, RunError> {
    let accounts = options.sessions.max(2);
    let setup = |e: &dyn std::fmt::Display| RunError::Setup(e.to_string());
    let random = SystemRandom::new();
    let mut file = AccountsFile::default();
    let mut keys = Vec::new();
    for index in 1..=accounts as u64 {
        let mut seed = [0u8; 32];
        random
            .fill(&mut seed)
            .map_err(|_| RunError::Setup("random generator failed".into()))?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| setup(&e))?;
        file.accounts.push(AccountEntry {
            id: index,
            max_sessions: None,
            keys: vec![ApiKeyEntry {
                id: 1_000 + index,
                public_key: hex::encode(pair.public_key().as_ref()),
            }],
        });
        keys.push((index, Credentials::from_seed(1_000 + index, &seed)?));
    }
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    config.session.max_sessions_per_account = 64;
    config.admin.listen = String::new();
    config.engine.mode = options.engine_mode;
    if let Some(rtt) = options.initial_rtt {
        config.transport.initial_rtt_ms = u64::try_from(rtt.as_millis()).unwrap_or(u64::MAX).max(1);
    }
    // A short failure window, so that the address the flood shares with the load
    // sessions is admitted again soon after the flood ends.
    config.auth.failure_window_ms = 500;
    let (certs, key) = gateway::dev::self_signed().map_err(|e| setup(&e))?;
    let cert = certs[0].clone();
    let gateway = Gateway::start(Setup {
        config,
        tls: (certs, key),
        accounts: file,
        token_keys: gateway::token::TokenKeyRing::generate(1).map_err(|e| setup(&e))?,
        accounts_path: None,
        admin_token: None,
    })
    .map_err(|e| setup(&e))?;
    let addr = gateway.local_addr().map_err(|e| setup(&e))?;
    Ok(Target {
        addr,
        cert,
        keys,
        gateway: Some(gateway),
        initial_rtt: options.initial_rtt,
    })
}

/// Per-session bookkeeping shared by its sender and receiver.
#[derive(Default)]
struct SessionBook {
    /// Intended send time of each unanswered request, by client sequence.
    intended: FxHashMap<u64, Instant>,
    /// Working orders of this session, oldest first (cancel candidates).
    working: VecDeque<u64>,
    /// Orders known to be done, skipped when picking a cancel target.
    done: FxHashSet<u64>,
    /// A forced disconnect waiting for its resume.
    chaos: Option<(Instant, ChaosMode)>,
    /// When the gateway process was last killed, until this session resumed.
    gateway_killed: Option<Instant>,
}

impl SessionBook {
    /// The oldest order still working, as far as this session knows.
    fn next_cancel_target(&mut self) -> Option<u64> {
        while let Some(id) = self.working.pop_front() {
            if !self.done.remove(&id) {
                return Some(id);
            }
        }
        None
    }
}

/// Counters and histograms of the run.
struct Tally {
    /// When sending started.
    started: Instant,
    /// Latency by slice of intended send time ([`TIMELINE_SLICE`]).
    timeline: Vec<Histogram<u64>>,
    /// Forced disconnects.
    chaos_events: Vec<ChaosEvent>,
    /// Cluster runs: when the latest fault of a gateway began, until the next
    /// fault; resumes meanwhile are its sessions' failovers.
    gateway_fault: Option<(Instant, cluster::Fault)>,
    /// Cluster runs: from a gateway fault to each resume after it, by fault.
    failover: BTreeMap<cluster::Fault, Histogram<u64>>,
    /// Set when the run logs its sessions out: their end is expected.
    logging_out: bool,
    verifier: Verifier,
    books: Vec<SessionBook>,
    ack_latency: Histogram<u64>,
    /// With `--flood`: latency of requests intended before and after the flood began.
    phase_latency: Option<(Instant, Histogram<u64>, Histogram<u64>)>,
    /// When the latest answer arrived.
    last_answer: Option<Instant>,
    resume: Histogram<u64>,
    blackhole: Histogram<u64>,
    /// Gateway kill to each session's resume.
    restart_resume: Histogram<u64>,
    /// The latest failed reconnect attempt of a session still reconnecting, for the
    /// progress line: the session, the attempt, of how many, and why it failed.
    reconnecting: Option<(usize, u32, u32, String)>,
    counts: Counts,
}

#[derive(Default)]
struct Counts {
    orders_sent: u64,
    cancels_sent: u64,
    acks: u64,
    rejects: u64,
    rejects_by_reason: BTreeMap<String, u64>,
    fills: u64,
    cancelled: u64,
    resumes: u64,
    disconnects: DisconnectCounts,
    closed_by_gateway: BTreeMap<String, u64>,
}

type Shared = Arc<parking_lot::Mutex<Tally>>;

fn lock(shared: &Shared) -> parking_lot::MutexGuard<'_, Tally> {
    shared.lock()
}

fn client_config(target: &Target, credentials: Credentials, addr: SocketAddr) -> ClientConfig {
    let mut config = ClientConfig::development(addr, target.cert.clone(), credentials);
    config.idle_timeout = Duration::from_millis(1_000);
    config.keep_alive = Duration::from_millis(200);
    if let Some(rtt) = target.initial_rtt {
        config.initial_rtt = rtt;
    }
    config
}

/// Runs a load test.
pub async fn run(options: Options) -> Result<Report, RunError> {
    let most = replay_limit();
    if options.remote.is_none() && options.replay_messages > most {
        return Err(RunError::Setup(format!(
            "replay measurement: {} messages is more than one measurement can make: at \
             most {most} (the taker's orders must fit its burst allowance, \
             session.max_messages_per_second, and the maker's fills its retention bound, \
             or the resume takes the snapshot path of PROTOCOL.md section 4)",
            options.replay_messages
        )));
    }
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
    let started_processes = options.crash_safe.is_some() || options.cluster.is_some();
    if started_processes && options.remote.is_some() {
        return Err(RunError::Setup(
            "the load tester starts the crash-safe gateways itself: name no other".into(),
        ));
    }
    let mut cluster = match &options.cluster {
        Some(settings) => Some(cluster::Cluster::start(settings, options.sessions).await?),
        None => None,
    };
    let mut crash_safe = match (&options.crash_safe, &options.remote) {
        (Some(_), Some(_)) => unreachable!("refused above"),
        (Some(settings), None) => {
            Some(crash::GatewayProcess::start(settings, options.sessions).await?)
        }
        (None, _) => None,
    };
    let remote = match (&crash_safe, &cluster) {
        (Some(process), _) => Some(process.remote()?),
        (None, Some(cluster)) => Some(cluster.remote()?),
        (None, None) => options.remote.clone(),
    };
    let target = match remote.clone() {
        Some(remote) => Target {
            addr: remote.addr,
            cert: remote.cert,
            keys: remote.keys,
            gateway: None,
            initial_rtt: options.initial_rtt,
        },
        None => start_gateway(&options)?,
    };
    if target.keys.len() < options.sessions {
        return Err(RunError::Setup(format!(
            "{} sessions need as many accounts; the gateway has keys for {}",
            options.sessions,
            target.keys.len()
        )));
    }

    // Log in sequentially so the login time is not a measure of contention.
    let mut login = histogram();
    let mut sessions = Vec::with_capacity(options.sessions);
    for (index, (account, credentials)) in target.keys.iter().take(options.sessions).enumerate() {
        let relay = if options.chaos_interval.is_some() || options.path.is_active() {
            Some(
                Relay::start_impaired(target.addr, options.path)
                    .await
                    .map_err(|e| RunError::Setup(e.to_string()))?,
            )
        } else {
            None
        };
        let addr = relay.as_ref().map_or(target.addr, |r| r.addr);
        let mut config = client_config(&target, credentials.clone(), addr);
        // Logging out at the end cancels what the session still has working, so the
        // next run against the same gateway starts from a clean book.
        config.cancel_on_disconnect = proto::CancelOnDisconnect::CancelAll;
        config.cod_grace = LOAD_SESSION_COD_GRACE;
        let started = Instant::now();
        let (client, mut events) = Client::connect(config).await?;
        record(&mut login, started.elapsed());
        let start = clean_start(&client, &mut events).await?;
        sessions.push((index, *account, Arc::new(client), events, relay, start));
    }
    let run_order_ids = run_order_ids(started_unix_ms);

    let mut verifier = Verifier::new(options.sessions);
    let mut leftover_orders_cancelled = 0;
    for (index, _, _, _, _, start) in &sessions {
        verifier.start_after(*index, start.last_server_seq);
        leftover_orders_cancelled += start.cancelled;
    }
    let shared: Shared = Arc::new(parking_lot::Mutex::new(Tally {
        started: Instant::now(),
        timeline: Vec::new(),
        chaos_events: Vec::new(),
        gateway_fault: None,
        failover: BTreeMap::new(),
        verifier,
        books: (0..options.sessions)
            .map(|_| SessionBook::default())
            .collect(),
        ack_latency: histogram(),
        phase_latency: None,
        last_answer: None,
        resume: histogram(),
        blackhole: histogram(),
        restart_resume: histogram(),
        reconnecting: None,
        counts: Counts::default(),
        logging_out: false,
    }));
    let progress = progress_bar(&options);
    let gateway_counters = || {
        options
            .gateway_pid
            .and_then(|pid| process::ProcessCounters::read(pid).ok())
    };
    let gateway_before = gateway_counters();
    let client_before =
        process::ProcessCounters::read(std::process::id().try_into().unwrap_or(0)).ok();
    let started = Instant::now();
    lock(&shared).started = started;
    let deadline = started + options.duration;
    let midpoint = started + options.duration / 2;
    lock(&shared).phase_latency = options.flood.then(|| (midpoint, histogram(), histogram()));
    let flood = options.flood.then(|| {
        let config = flood_config(&target);
        tokio::spawn(async move {
            tokio::time::sleep_until(midpoint.into()).await;
            flood_logins(config, deadline).await
        })
    });
    let mut ticks = schedule(options.rate, options.sessions, started, deadline).into_iter();
    let mut senders = tokio::task::JoinSet::new();
    let mut receivers = tokio::task::JoinSet::new();
    let mut clients = Vec::new();
    let mut relays = Vec::new();
    for (index, account, client, events, relay, _) in sessions {
        let Some(ticks) = ticks.next() else { break };
        let rng = StdRng::seed_from_u64(
            options
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(index as u64),
        );
        let answered = Arc::new(Notify::new());
        senders.spawn(send_orders(
            index,
            Arc::clone(&client),
            Arc::clone(&shared),
            ticks,
            SendLimits {
                deadline,
                window: options.window,
                first_order_id: run_order_ids,
                answered: Arc::clone(&answered),
            },
            rng,
        ));
        receivers.spawn(receive_events(index, events, Arc::clone(&shared), answered));
        clients.push((account, client));
        relays.push(relay);
    }
    // The relays live until the end of the run: clients recovering from the last
    // chaos events reconnect through them after the chaos loop has stopped.
    let relays = Arc::new(relays);
    let chaos = options.chaos_interval.map(|interval| {
        let clients: Vec<Arc<Client>> = clients.iter().map(|(_, c)| Arc::clone(c)).collect();
        let relays = Arc::clone(&relays);
        let shared = Arc::clone(&shared);
        let seed = options.seed;
        tokio::spawn(
            async move { chaos_loop(clients, relays, shared, interval, deadline, seed).await },
        )
    });
    let faults = match (cluster.take(), &options.cluster) {
        (Some(running), Some(settings)) => Some(tokio::spawn(running.inflict(
            settings.faults.clone(),
            settings.fault_interval,
            deadline,
            Arc::clone(&shared),
        ))),
        _ => None,
    };
    let kill_interval = options.crash_safe.as_ref().and_then(|c| c.kill_interval);
    let killer = match (crash_safe.take(), kill_interval) {
        (Some(process), Some(interval)) => Some(tokio::spawn(kill_loop(
            process,
            interval,
            deadline,
            Arc::clone(&shared),
        ))),
        (process, _) => {
            crash_safe = process;
            None
        }
    };
    let ticker = progress.clone().map(|bar| {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let tally = lock(&shared);
                bar.set_position(started.elapsed().as_secs().min(bar.length().unwrap_or(0)));
                let reconnecting = match &tally.reconnecting {
                    Some((session, attempt, attempts, error)) => format!(
                        "; session {session} reconnecting, attempt {attempt} of {attempts} failed: {error}"
                    ),
                    None => String::new(),
                };
                bar.set_message(format!(
                    "sent {} acks {} fills {} resumes {} violations {}{reconnecting}",
                    tally.counts.orders_sent + tally.counts.cancels_sent,
                    tally.counts.acks,
                    tally.counts.fills,
                    tally.counts.resumes,
                    tally.verifier.violations()
                ));
            }
        })
    });

    while senders.join_next().await.is_some() {}
    let send_elapsed = started.elapsed();
    let flood_counts = match flood {
        Some(flood) => flood.await.ok(),
        None => None,
    };
    if let Some(chaos) = chaos {
        let _ = chaos.await;
    }
    let mut restart_ready = histogram();
    if let Some(killer) = killer {
        let (process, ready) = killer
            .await
            .map_err(|e| RunError::Setup(format!("the gateway killer failed: {e}")))??;
        for after in ready {
            record(&mut restart_ready, after);
        }
        crash_safe = Some(process);
    }
    if let Some(faults) = faults {
        cluster = Some(
            faults
                .await
                .map_err(|e| RunError::Setup(format!("the cluster's faults failed: {e}")))??,
        );
    }
    if let Some(ticker) = ticker {
        let _ = ticker.await;
    }
    status(
        &progress,
        "sending done; waiting for the last answers and resumes",
    );
    // Wait for every answer (and the clients' resumes after the last chaos events).
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let waiting = {
                let tally = lock(&shared);
                (0..options.sessions)
                    .map(|i| tally.verifier.unanswered(i))
                    .sum::<usize>()
                    + tally
                        .books
                        .iter()
                        .filter(|b| b.chaos.is_some() || b.gateway_killed.is_some())
                        .count()
            };
            if waiting == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let gateway_after = gateway_counters();
    let client_after =
        process::ProcessCounters::read(std::process::id().try_into().unwrap_or(0)).ok();
    let measured_for = started.elapsed();
    // Let fills triggered by the last orders reach their resting sides.
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock(&shared).verifier.finish();

    if options.flood {
        // The flood's address is this one: wait for its failure window to pass.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    status(&progress, "comparing final order states with the engine's");
    // The engine's view of every account, from a fresh login's snapshot.
    for (index, (account, _)) in clients.iter().enumerate() {
        let credentials = target
            .keys
            .iter()
            .find(|(a, _)| a == account)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| RunError::Setup("account vanished".into()))?;
        let (observer, mut events) =
            Client::connect(client_config(&target, credentials, target.addr)).await?;
        if let Ok(Some(Event::Snapshot { orders, .. })) =
            tokio::time::timeout(Duration::from_secs(5), events.recv()).await
        {
            lock(&shared).verifier.compare_final(index, &orders);
        }
        log_out(&observer, &mut events).await;
    }
    status(&progress, "logging the sessions out");
    // Log the load sessions out: cancel-on-disconnect cancels what they have working,
    // and no session is left waiting for a resume.
    lock(&shared).logging_out = true;
    for (_, client) in &clients {
        let _ = client.logout();
    }
    let logged_out = tokio::time::timeout(Duration::from_secs(10), async {
        while receivers.join_next().await.is_some() {}
    })
    .await;
    if logged_out.is_err() {
        lock(&shared)
            .verifier
            .violation("sessions still live 10 s after logging out".into());
    }
    drop(clients);
    drop(relays);
    receivers.abort_all();
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }

    let measuring = target.gateway.is_some() && options.replay_messages > 0;
    if crash_safe.is_some() && options.replay_messages > 0 && options.progress {
        eprintln!(
            "measuring the replay of {} missed messages after a gateway restart",
            options.replay_messages
        );
    }
    if measuring && options.progress {
        eprintln!(
            "measuring the replay of {} missed messages, then 50 quiet login/resume cycles",
            options.replay_messages
        );
    }

    let (replay, cycles) = match (
        &target.gateway,
        crash_safe.as_mut(),
        options.replay_messages,
    ) {
        (Some(_), _, messages) if messages > 0 => (
            Some(measure_replay(&target, messages, None).await?),
            Some(measure_cycles(&target, RESUME_CYCLES).await?),
        ),
        // The maker misses the fills, then the gateway is killed and started again
        // before the maker resumes.
        (None, Some(process), messages) if messages > 0 => (
            Some(measure_replay(&target, messages, Some(process)).await?),
            None,
        ),
        _ => (None, None),
    };
    let failed = lock(&shared).verifier.violations() > 0 || drained.is_err();
    if let Some(process) = crash_safe {
        process.stop(failed).await;
    }
    let cluster_report = match cluster {
        Some(cluster) => {
            let failover = lock(&shared).failover.clone();
            let report = cluster.report(&failover).await;
            cluster.stop(failed).await;
            Some(report)
        }
        None => None,
    };
    let (messages_replayed, snapshot_resumes) = target.gateway.as_ref().map_or((0, 0), |g| {
        let stats = g.registry().stats();
        (stats.messages_replayed, stats.snapshot_resumes)
    });
    if let Some(gateway) = target.gateway {
        gateway.shutdown().await;
    }

    let flood_report = flood_counts.and_then(|counts| {
        let tally = lock(&shared);
        let (_, quiet, flooded) = tally.phase_latency.as_ref()?;
        let (quiet_us, flood_us) = (Percentiles::of(quiet), Percentiles::of(flooded));
        Some(FloodReport {
            attempts: counts.attempts,
            refused_before_handshake: counts.refused,
            rate_limited: counts.rate_limited,
            bad_signature: counts.bad_signature,
            quiet_us,
            flood_us,
            p99_ratio: flood_us.p99 / quiet_us.p99.max(1.0),
        })
    });
    let mut report = {
        let tally = lock(&shared);
        let answers = tally.verifier.checks().answers;
        let gateway_cost = gateway_before
            .zip(gateway_after)
            .map(|(before, after)| after.per_unit_since(&before, answers));
        Report {
            version: env!("CARGO_PKG_VERSION"),
            started_unix_ms,
            target: match (&remote, &options.crash_safe) {
                (Some(remote), _) if cluster_report.is_some() => format!(
                    "cluster of crash-safe gateway processes behind a balancer at {}",
                    remote.addr
                ),
                (Some(remote), Some(_)) => format!("crash-safe gateway process at {}", remote.addr),
                (Some(remote), None) => remote.addr.to_string(),
                (None, _) => "in-process".to_string(),
            },
            sessions: options.sessions,
            window: options.window,
            seed: options.seed,
            chaos_interval_ms: options
                .chaos_interval
                .map_or(0, |i| u64::try_from(i.as_millis()).unwrap_or(u64::MAX)),
            leftover_orders_cancelled,
            rate: options.rate,
            duration_s: send_elapsed.as_secs_f64(),
            orders_sent: tally.counts.orders_sent,
            cancels_sent: tally.counts.cancels_sent,
            acks: tally.counts.acks,
            rejects: tally.counts.rejects,
            rejects_by_reason: tally.counts.rejects_by_reason.clone(),
            fills: tally.counts.fills,
            cancelled: tally.counts.cancelled,
            disconnects: tally.counts.disconnects.clean
                + tally.counts.disconnects.abrupt
                + tally.counts.disconnects.blackhole,
            disconnects_by_mode: tally.counts.disconnects.clone(),
            resumes: tally.counts.resumes,
            messages_replayed,
            snapshot_resumes,
            closed_by_gateway: tally.counts.closed_by_gateway.clone(),
            violations: tally.verifier.violations() + u64::from(drained.is_err()),
            violation_samples: tally.verifier.samples().to_vec(),
            checks: tally.verifier.checks().clone(),
            ack_latency_us: Percentiles::of(&tally.ack_latency),
            ack_latency_curve: curve(&tally.ack_latency),
            gateway_cpu_us_per_order: gateway_cost.map(|c| c.cpu_us),
            load_client_cpu_share: client_before.zip(client_after).map(|(before, after)| {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                #[allow(clippy::cast_precision_loss)]
                let used = after.cpu_us.saturating_sub(before.cpu_us) as f64;
                #[allow(clippy::cast_precision_loss)]
                let share = used / (measured_for.as_micros().max(1) as f64 * cores as f64);
                share
            }),
            gateway_context_switches_per_order: gateway_cost.map(|c| c.context_switches),
            timeline: tally
                .timeline
                .iter()
                .enumerate()
                .filter(|(_, slice)| !slice.is_empty())
                .map(|(index, slice)| TimelinePoint {
                    t_s: index as f64 * TIMELINE_SLICE.as_secs_f64(),
                    count: slice.len(),
                    p50_us: slice.value_at_quantile(0.5) as f64,
                    p99_us: slice.value_at_quantile(0.99) as f64,
                })
                .collect(),
            chaos_events: tally.chaos_events.clone(),
            gateway_restarts: restart_ready.len(),
            cluster: cluster_report,
            restart_ready_us: Percentiles::of(&restart_ready),
            restart_resume_us: Percentiles::of(&tally.restart_resume),
            throughput_orders_per_s: answers as f64
                / tally
                    .last_answer
                    .map_or(send_elapsed, |at| at.saturating_duration_since(started))
                    .as_secs_f64()
                    .max(1e-3),
            login_ms: login.value_at_quantile(0.5) as f64 / 1_000.0,
            login_us: Percentiles::of(&login),
            resume_ms: tally.resume.value_at_quantile(0.5) as f64 / 1_000.0,
            resume_us: Percentiles::of(&tally.resume),
            blackhole_recovery_ms: tally.blackhole.value_at_quantile(0.5) as f64 / 1_000.0,
            replay,
            cycles,
            flood: flood_report,
            baseline: None,
            ratios: None,
        }
    };
    if drained.is_err() {
        report
            .violation_samples
            .push("requests still unanswered 30 s after the run".into());
    }

    if options.baseline {
        if options.progress {
            eprintln!("running the bare-QUIC echo baseline with the same settings");
        }
        let baseline = baseline::run(BaselineOptions {
            connections: options.sessions,
            rate: options.rate,
            window: options.window,
            duration: options.duration,
            payload: proto::HEADER_LEN + proto::NewOrder::BODY_LEN,
            handshakes: 50,
            separate_process: options.gateway_pid.map(|_| options.server_core),
        })
        .await?;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        // The quiet cycles when run (login and resume measured alike), else the
        // chaos resumes against the sessions' logins.
        let (login_ms, resume_ms) = match &report.cycles {
            Some(cycles) => (cycles.login_us.p50 / 1e3, cycles.resume_us.p50 / 1e3),
            None => (report.login_ms, report.resume_ms),
        };
        let latency =
            |gateway: f64, echo: f64| report.chaos_events.is_empty().then(|| ratio(gateway, echo));
        report.ratios = Some(Ratios {
            ack_p50: latency(report.ack_latency_us.p50, baseline.echo_rtt_us.p50),
            ack_p90: latency(report.ack_latency_us.p90, baseline.echo_rtt_us.p90),
            ack_p99: latency(report.ack_latency_us.p99, baseline.echo_rtt_us.p99),
            throughput: ratio(
                report.throughput_orders_per_s,
                baseline.echo_throughput_per_s,
            ),
            resume_vs_handshake_plus_rtt: ratio(
                resume_ms,
                baseline.handshake_ms + baseline.echo_rtt_us.p50 / 1_000.0,
            ),
            login_vs_resume: ratio(login_ms, resume_ms),
            cpu_per_order_vs_echo_msg: report
                .gateway_cpu_us_per_order
                .zip(baseline.echo_server_cpu_us_per_msg)
                .map(|(gateway, echo)| ratio(gateway, echo)),
        });
        report.baseline = Some(baseline);
    }
    Ok(report)
}

/// Shows what the run is doing on the progress bar's message line.
fn status(progress: &Option<indicatif::ProgressBar>, what: &'static str) {
    if let Some(bar) = progress {
        bar.set_message(what);
    }
}

fn progress_bar(options: &Options) -> Option<indicatif::ProgressBar> {
    options.progress.then(|| {
        let bar = indicatif::ProgressBar::new(options.duration.as_secs().max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

/// One session's open-loop order flow: mostly new orders around one price so that
/// sessions cross each other, some cancels of its own working orders.
async fn send_orders(
    index: usize,
    client: Arc<Client>,
    shared: Shared,
    mut ticks: Ticks,
    limits: SendLimits,
    mut rng: StdRng,
) {
    let SendLimits {
        deadline,
        window,
        first_order_id,
        answered,
    } = limits;
    let mut next_order_id = first_order_id;
    while let Some(intended) = ticks.next().await {
        // Window-limited mode: wait for answers rather than queue without bound,
        // woken by each answer as the echo baseline's sender is.
        while lock(&shared).verifier.unanswered(index) >= window {
            tokio::select! {
                () = answered.notified() => {}
                () = tokio::time::sleep_until(deadline.into()) => return,
            }
        }
        let mut tally = lock(&shared);
        let cancel_target = (rng.gen_range(0..10) == 0)
            .then(|| tally.books[index].next_cancel_target())
            .flatten();
        let sent = match cancel_target {
            Some(client_order_id) => client.cancel(client_order_id).inspect(|&seq| {
                tally.verifier.sent(index, seq);
                tally.counts.cancels_sent += 1;
            }),
            None => {
                let client_order_id = next_order_id;
                next_order_id += 1;
                let quantity = rng.gen_range(1..=3);
                let order = OrderParams {
                    instrument_id: 1,
                    client_order_id,
                    side: if rng.gen() { Side::Buy } else { Side::Sell },
                    order_type: OrderType::Limit,
                    time_in_force: if rng.gen_range(0..4) == 0 {
                        TimeInForce::Ioc
                    } else {
                        TimeInForce::Gtc
                    },
                    price: 100 + rng.gen_range(0..=1),
                    quantity,
                };
                client.new_order(order).inspect(|&seq| {
                    tally
                        .verifier
                        .sent_order(index, seq, client_order_id, quantity);
                    tally.counts.orders_sent += 1;
                })
            }
        };
        match sent {
            Ok(seq) => {
                tally.books[index].intended.insert(seq, intended);
            }
            Err(ClientError::Backpressure) => {}
            Err(_) => return,
        }
    }
}

/// Events a session's receiver takes from its channel at a time.
const EVENT_BATCH: usize = 64;

/// One session's events: verified, counted, timed.
async fn receive_events(
    index: usize,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    shared: Shared,
    answered: Arc<Notify>,
) {
    // Whatever is queued is taken at once: one lock and one clock read per batch.
    let mut batch = Vec::with_capacity(EVENT_BATCH);
    while events.recv_many(&mut batch, EVENT_BATCH).await > 0 {
        let now = Instant::now();
        let mut tally = lock(&shared);
        let tally = &mut *tally;
        for event in batch.drain(..) {
            match event {
                Event::Message(frame) => {
                    match frame {
                        Frame::OrderAck(ack) => {
                            tally.counts.acks += 1;
                            tally.books[index].working.push_back(ack.client_order_id);
                        }
                        Frame::Reject(reject) => {
                            tally.counts.rejects += 1;
                            *tally
                                .counts
                                .rejects_by_reason
                                .entry(reject.reason.name().to_string())
                                .or_default() += 1;
                        }
                        Frame::Fill(fill) => {
                            tally.counts.fills += 1;
                            if fill.leaves_quantity == 0 {
                                tally.books[index].done.insert(fill.client_order_id);
                            }
                        }
                        Frame::Cancelled(cancelled) => {
                            tally.counts.cancelled += 1;
                            tally.books[index].done.insert(cancelled.client_order_id);
                        }
                        _ => {}
                    }
                    if let Some(seq) = tally.verifier.message(index, &frame) {
                        if let Some(intended) = tally.books[index].intended.remove(&seq) {
                            let latency = now.saturating_duration_since(intended);
                            record(&mut tally.ack_latency, latency);
                            let slice = usize::try_from(
                                intended
                                    .saturating_duration_since(tally.started)
                                    .as_millis()
                                    / TIMELINE_SLICE.as_millis(),
                            )
                            .unwrap_or(usize::MAX)
                            .min(MAX_TIMELINE_SLICES);
                            if tally.timeline.len() <= slice {
                                tally.timeline.resize_with(slice + 1, slice_histogram);
                            }
                            record(&mut tally.timeline[slice], latency);
                            if let Some((midpoint, quiet, flooded)) = &mut tally.phase_latency {
                                record(if intended < *midpoint { quiet } else { flooded }, latency);
                            }
                        }
                        tally.last_answer = Some(now);
                        answered.notify_one();
                    }
                }
                Event::Snapshot {
                    as_of_server_seq,
                    orders,
                } => tally.verifier.snapshot(index, as_of_server_seq, &orders),
                Event::Reconnecting {
                    attempt,
                    attempts,
                    error,
                } => tally.reconnecting = Some((index, attempt, attempts, error)),
                Event::Resumed { lost } => {
                    if tally.reconnecting.as_ref().is_some_and(|r| r.0 == index) {
                        tally.reconnecting = None;
                    }
                    tally.counts.resumes += 1;
                    if let Some(reason) = lost {
                        *tally
                            .counts
                            .closed_by_gateway
                            .entry(format!("{reason:?}"))
                            .or_default() += 1;
                    }
                    if let Some((at, mode)) = tally.books[index].chaos.take() {
                        let histogram = match mode {
                            ChaosMode::Blackhole => &mut tally.blackhole,
                            ChaosMode::Clean | ChaosMode::Abrupt => &mut tally.resume,
                        };
                        record(histogram, now.saturating_duration_since(at));
                    }
                    if let Some(at) = tally.books[index].gateway_killed.take() {
                        record(&mut tally.restart_resume, now.saturating_duration_since(at));
                    }
                    if let Some((at, fault)) = tally.gateway_fault {
                        let failover = tally.failover.entry(fault).or_insert_with(histogram);
                        record(failover, now.saturating_duration_since(at));
                    }
                }
                Event::Ended(ReasonCode::LoggedOut) if tally.logging_out => return,
                Event::Ended(reason) => {
                    tally
                        .verifier
                        .violation(format!("session {index} ended: {reason:?}"));
                    return;
                }
            }
        }
    }
}

/// Breaks a random idle session's connection every `interval`, cycling the modes.
async fn chaos_loop(
    clients: Vec<Arc<Client>>,
    relays: Arc<Vec<Option<Relay>>>,
    shared: Shared,
    interval: Duration,
    deadline: Instant,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc4a05);
    let modes = [ChaosMode::Clean, ChaosMode::Abrupt, ChaosMode::Blackhole];
    let mut turn = 0usize;
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    while Instant::now() < deadline {
        tick.tick().await;
        let index = rng.gen_range(0..clients.len());
        let mode = modes[turn % modes.len()];
        {
            let mut tally = lock(&shared);
            if tally.books[index].chaos.is_some() {
                continue;
            }
            tally.books[index].chaos = Some((Instant::now(), mode));
            let t_s = tally.started.elapsed().as_secs_f64();
            tally.chaos_events.push(ChaosEvent {
                t_s,
                mode: match mode {
                    ChaosMode::Clean => "clean",
                    ChaosMode::Abrupt => "abrupt",
                    ChaosMode::Blackhole => "blackhole",
                },
            });
            let counts = &mut tally.counts.disconnects;
            match mode {
                ChaosMode::Clean => counts.clean += 1,
                ChaosMode::Abrupt => counts.abrupt += 1,
                ChaosMode::Blackhole => counts.blackhole += 1,
            }
        }
        turn += 1;
        let relay = relays.get(index).and_then(Option::as_ref);
        match mode {
            ChaosMode::Clean => clients[index].drop_connection(),
            ChaosMode::Abrupt => {
                if let Some(relay) = relay {
                    relay.blackhole();
                }
                clients[index].drop_connection();
            }
            ChaosMode::Blackhole => {
                if let Some(relay) = relay {
                    relay.blackhole();
                }
            }
        }
    }
}

/// Client order ids of the replay measurement, clear of the load sessions' own
/// (see [`run_order_ids`]).
const REPLAY_ORDER_IDS: u64 = 1 << 62;

/// How long a load session may stay disconnected before its orders are cancelled:
/// longer than any outage the chaos makes, so only the final logout cancels.
const LOAD_SESSION_COD_GRACE: Duration = Duration::from_secs(10);

/// The first client order id of the load sessions of a run started at
/// `started_unix_ms`: different for every run, so a run never reuses an id an
/// earlier run's order may still hold.
fn run_order_ids(started_unix_ms: u64) -> u64 {
    // 2^28 runs' worth of distinct prefixes, each leaving 2^32 ids.
    let prefix = started_unix_ms % ((1 << 28) - 1) + 1;
    prefix << 32
}

/// Where a session's sending stops and where its order ids start.
struct SendLimits {
    deadline: Instant,
    window: usize,
    first_order_id: u64,
    /// Told of each answer: room in the window.
    answered: Arc<Notify>,
}

/// Where a session's own checks start, after [`clean_start`].
struct CleanStart {
    /// The last server sequence the set-up consumed.
    last_server_seq: u64,
    /// Working orders left from before the run, cancelled.
    cancelled: u64,
}

/// Cancels the working orders the session's account still has from before the run
/// (an earlier run that did not finish, say), as its login snapshot lists them, and
/// waits for the answers.
async fn clean_start(
    client: &Client,
    events: &mut tokio::sync::mpsc::Receiver<Event>,
) -> Result<CleanStart, RunError> {
    let failed = |what: String| RunError::Setup(format!("clearing earlier orders: {what}"));
    let wait = Duration::from_secs(10);
    let orders = match tokio::time::timeout(wait, events.recv()).await {
        Ok(Some(Event::Snapshot { orders, .. })) => orders,
        other => {
            return Err(failed(format!(
                "expected the login snapshot, got {other:?}"
            )))
        }
    };
    let mut waiting = HashSet::new();
    for order in orders.iter().filter(|order| order.leaves_quantity > 0) {
        waiting.insert(client.cancel(order.client_order_id)?);
    }
    let cancelled = waiting.len() as u64;
    let mut last_server_seq = 0;
    while !waiting.is_empty() {
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(Some(Event::Message(frame))) => {
                last_server_seq = frame.server_seq().unwrap_or(last_server_seq);
                if let Some(client_seq) = frame.answered_client_seq() {
                    waiting.remove(&client_seq);
                }
            }
            Ok(Some(Event::Ended(reason))) => {
                return Err(failed(format!("the session ended: {reason:?}")))
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                return Err(failed(format!("{} cancels unanswered", waiting.len())))
            }
        }
    }
    Ok(CleanStart {
        last_server_seq,
        cancelled,
    })
}

/// Logs a client out and waits (briefly) for the gateway's goodbye.
async fn log_out(client: &Client, events: &mut tokio::sync::mpsc::Receiver<Event>) {
    if client.logout().is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.recv().await {
            if matches!(event, Event::Ended(_)) {
                return;
            }
        }
    })
    .await;
}

/// What the flood saw.
#[derive(Debug, Default)]
struct FloodCounts {
    attempts: u64,
    refused: u64,
    rate_limited: u64,
    bad_signature: u64,
}

/// Client settings with a key id the gateway knows and a key it does not: every
/// login signed with them fails the signature check.
fn flood_config(target: &Target) -> Option<ClientConfig> {
    let key_id = target.keys.first().map(|(_, c)| c.api_key_id())?;
    let wrong_key = Credentials::from_seed(key_id, &[0x5a; 32]).ok()?;
    let mut config = client_config(target, wrong_key, target.addr);
    config.idle_timeout = Duration::from_millis(500);
    Some(config)
}

/// Bad logins from this address, 8 at a time, until `deadline`.
async fn flood_logins(config: Option<ClientConfig>, deadline: Instant) -> FloodCounts {
    let Some(config) = config else {
        return FloodCounts::default();
    };
    let config = Arc::new(config);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let config = Arc::clone(&config);
        workers.spawn(async move {
            let mut counts = FloodCounts::default();
            while Instant::now() < deadline {
                // About 1,600 attempts a second in all: a flood, not a benchmark of
                // the attacker's own CPU, which shares this machine.
                tokio::time::sleep(Duration::from_millis(5)).await;
                counts.attempts += 1;
                let Ok(mut link) = gateway_client::open(&config).await else {
                    counts.refused += 1;
                    continue;
                };
                let Ok(login) = config.credentials.signed_login(
                    &config.venue,
                    proto::CancelOnDisconnect::Off,
                    Duration::ZERO,
                ) else {
                    break;
                };
                if send_frame(&mut link, login.into()).await.is_err() {
                    continue;
                }
                let mut buf = bytes::BytesMut::new();
                if let Some(Frame::LoginRejected(rejected)) =
                    read_until(&mut link, &mut buf, |_| true).await
                {
                    match rejected.reason {
                        proto::ReasonCode::RateLimited => counts.rate_limited += 1,
                        proto::ReasonCode::BadSignature => counts.bad_signature += 1,
                        _ => {}
                    }
                }
            }
            counts
        });
    }
    let mut total = FloodCounts::default();
    while let Some(Ok(counts)) = workers.join_next().await {
        total.attempts += counts.attempts;
        total.refused += counts.refused;
        total.rate_limited += counts.rate_limited;
        total.bad_signature += counts.bad_signature;
    }
    total
}

/// Logs in `sessions` sessions (round robin over the accounts), holds them attached
/// for `hold`, then drops every connection so they are detached and waits `hold`
/// again: the gateway's memory can be read in each phase. Prints the phases.
///
/// With `detach_at_once`, each connection is closed right after its login, so only
/// detached sessions accumulate (freed connection memory stays in the gateway's
/// allocator, so detaching after holding all attached does not show in its RSS).
pub async fn hold_sessions(
    remote: RemoteGateway,
    sessions: usize,
    hold: Duration,
    detach_at_once: bool,
) -> Result<(), RunError> {
    let target = Target {
        addr: remote.addr,
        cert: remote.cert,
        keys: remote.keys,
        gateway: None,
        initial_rtt: None,
    };
    let first = target
        .keys
        .first()
        .ok_or_else(|| RunError::Setup("no accounts".into()))?;
    let mut config = client_config(&target, first.1.clone(), target.addr);
    config.idle_timeout = Duration::from_secs(60);
    config.keep_alive = Duration::from_secs(20);
    let endpoints = shared_endpoints(&config, sessions)?;
    let started = Instant::now();
    let mut links = Vec::with_capacity(sessions);
    let mut logins = tokio::task::JoinSet::new();
    for index in 0..sessions {
        let mut config = config.clone();
        config.credentials = target.keys[index % target.keys.len()].1.clone();
        let endpoint = endpoints[index % endpoints.len()].clone();
        logins.spawn(async move {
            let mut link = gateway_client::open_on(endpoint, &config).await?;
            let login = config.credentials.signed_login(
                &config.venue,
                proto::CancelOnDisconnect::Off,
                Duration::ZERO,
            )?;
            send_frame(&mut link, login.into()).await?;
            let mut buf = bytes::BytesMut::new();
            match read_until(&mut link, &mut buf, |f| matches!(f, Frame::SnapshotEnd(_))).await {
                Some(_) if detach_at_once => {
                    link.connection.close(0u32.into(), b"");
                    Ok(None)
                }
                Some(_) => Ok(Some(link)),
                None => Err(RunError::Setup("login not answered".into())),
            }
        });
        // At most 64 logins in flight.
        while logins.len() >= 64 {
            if let Some(done) = logins.join_next().await {
                links.extend(done.map_err(|e| RunError::Setup(e.to_string()))??);
            }
        }
    }
    while let Some(done) = logins.join_next().await {
        links.extend(done.map_err(|e| RunError::Setup(e.to_string()))??);
    }
    println!(
        "attached: {sessions} sessions logged in in {:.1} s ({} still attached); holding {hold:?}",
        started.elapsed().as_secs_f64(),
        links.len()
    );
    tokio::time::sleep(hold).await;
    for link in &links {
        link.connection.close(0u32.into(), b"");
    }
    drop(links);
    println!("detached: connections closed; holding {hold:?}");
    tokio::time::sleep(hold).await;
    println!("done");
    Ok(())
}

/// Login-then-resume cycles in the quiet measurement.
const RESUME_CYCLES: usize = 50;

/// Times `cycles` full logins, each followed by a clean close and a resume from the
/// same client endpoint, as the client library does it.
async fn measure_cycles(target: &Target, cycles: usize) -> Result<CycleReport, RunError> {
    let stalled = |what: &str| RunError::Setup(format!("resume cycles: {what}"));
    let (_, credentials) = target
        .keys
        .first()
        .ok_or_else(|| stalled("needs an account"))?;
    let config = client_config(target, credentials.clone(), target.addr);
    let (mut logins, mut resumes) = (histogram(), histogram());
    for _ in 0..cycles {
        let login = config.credentials.signed_login(
            &config.venue,
            proto::CancelOnDisconnect::Off,
            Duration::ZERO,
        )?;
        let started = Instant::now();
        let endpoint = gateway_client::client_endpoint(&config)?;
        let mut link =
            gateway_client::open_sending(endpoint.clone(), &config, &login.into()).await?;
        let mut buf = bytes::BytesMut::new();
        let Some(Frame::LoginAccepted(accepted)) = read_until(&mut link, &mut buf, |frame| {
            matches!(frame, Frame::LoginAccepted(_) | Frame::LoginRejected(_))
        })
        .await
        else {
            return Err(stalled("login not accepted"));
        };
        record(&mut logins, started.elapsed());
        // Let the TLS session tickets that follow the handshake arrive, as they would
        // on any connection that lived a little.
        tokio::time::sleep(Duration::from_millis(5)).await;
        link.connection.close(0u32.into(), b"");

        let resume = proto::Resume {
            token: accepted.token,
            last_acked_server_seq: 0,
            next_client_seq: 1,
        };
        let started = Instant::now();
        let mut link = gateway_client::open_sending(endpoint, &config, &resume.into()).await?;
        let mut buf = bytes::BytesMut::new();
        if !matches!(
            read_until(&mut link, &mut buf, |frame| matches!(
                frame,
                Frame::ResumeAccepted(_) | Frame::ResumeRejected(_)
            ))
            .await,
            Some(Frame::ResumeAccepted(_))
        ) {
            return Err(stalled("resume not accepted"));
        }
        record(&mut resumes, started.elapsed());
        send_frame(&mut link, proto::Logout {}.into()).await?;
        let _ = read_until(&mut link, &mut buf, |frame| {
            matches!(frame, Frame::Close(_))
        })
        .await;
        link.connection.close(0u32.into(), b"");
    }
    Ok(CycleReport {
        cycles: cycles as u64,
        login_us: Percentiles::of(&logins),
        resume_us: Percentiles::of(&resumes),
    })
}

/// Reads frames from a raw link until `stop` says so; `None` on silence or close.
async fn read_until(
    link: &mut gateway_client::Link,
    buf: &mut bytes::BytesMut,
    mut stop: impl FnMut(&Frame) -> bool,
) -> Option<Frame> {
    let read = async {
        loop {
            while let Ok(Some(frame)) = proto::decode_buf(buf) {
                if stop(&frame) {
                    return Some(frame);
                }
            }
            match link.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                _ => return None,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}

async fn send_frame(link: &mut gateway_client::Link, frame: Frame) -> Result<(), RunError> {
    link.send
        .write_all(&frame.to_bytes())
        .await
        .map_err(|e| RunError::Setup(e.to_string()))
}

/// Detaches a session, makes `messages` fills happen to it, and times its resume and
/// replay frame by frame (connect to `ResumeAccepted`, to the first and to the last
/// replayed message).
///
/// Both sides are checked like the main run: every order answered once, every trade
/// seen once on each side, no sequence gap. A snapshot on either side (messages
/// released beyond the retention bound) fails the measurement with its cause.
/// With `restart`, the gateway is killed and started again after the maker missed
/// the fills, and before it resumes: the replay comes from the rebuilt core.
async fn measure_replay(
    target: &Target,
    messages: u64,
    restart: Option<&mut crash::GatewayProcess>,
) -> Result<ReplayReport, RunError> {
    const TAKER: usize = 0;
    const MAKER: usize = 1;
    let failed = |what: String| RunError::Setup(format!("replay measurement: {what}"));
    let credentials = |index: usize| {
        target
            .keys
            .get(index)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| failed("needs two accounts".into()))
    };
    let maker_config = client_config(target, credentials(0)?, target.addr);
    let mut verifier = Verifier::new(2);

    // The maker logs in and rests one large order, then its connection closes. It
    // keeps its endpoint (and TLS session tickets) for the resume, as the client
    // library does.
    let endpoint = gateway_client::client_endpoint(&maker_config)?;
    let login = maker_config.credentials.signed_login(
        &maker_config.venue,
        proto::CancelOnDisconnect::Off,
        Duration::ZERO,
    )?;
    let mut link =
        gateway_client::open_sending(endpoint.clone(), &maker_config, &login.into()).await?;
    let mut buf = bytes::BytesMut::new();
    let resting = proto::NewOrder {
        client_seq: 1,
        client_order_id: REPLAY_ORDER_IDS,
        instrument_id: 2,
        side: Side::Sell,
        order_type: OrderType::Limit,
        time_in_force: TimeInForce::Gtc,
        price: 1_000_000,
        quantity: 10 * messages,
    };
    verifier.sent_order(MAKER, 1, resting.client_order_id, resting.quantity);
    send_frame(&mut link, resting.into()).await?;
    let mut token = None;
    let acked = read_until(&mut link, &mut buf, |frame| {
        if let Frame::LoginAccepted(accepted) = frame {
            token = Some(accepted.token);
        }
        matches!(frame, Frame::OrderAck(_) | Frame::Reject(_))
    })
    .await
    .ok_or_else(|| failed("the maker's order got no answer".into()))?;
    verifier.message(MAKER, &acked);
    if let Frame::Reject(reject) = acked {
        return Err(failed(format!(
            "the maker's order was rejected: {:?}",
            reject.reason
        )));
    }
    let token = token.ok_or_else(|| failed("no LoginAccepted".into()))?;
    link.connection.close(0u32.into(), b"");
    drop(link);

    // The taker trades against it, one lot per order, while it is detached.
    taker_burst(target, credentials(1)?, messages, &mut verifier, TAKER)
        .await
        .map_err(failed)?;

    let mut restart_ms = None;
    if let Some(process) = restart {
        let killed = Instant::now();
        process.kill_and_restart()?;
        process.wait_ready().await?;
        restart_ms = Some(killed.elapsed().as_secs_f64() * 1e3);
    }

    // The maker resumes, its Resume in 0-RTT data: one flight brings the answer and
    // the replay.
    let resume = proto::Resume {
        token,
        last_acked_server_seq: 1,
        next_client_seq: 2,
    };
    let started = Instant::now();
    let mut link = gateway_client::open_sending(endpoint, &maker_config, &resume.into()).await?;
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut buf = bytes::BytesMut::new();
    let answer = read_until(&mut link, &mut buf, |_| true).await;
    let resume_ms = started.elapsed().as_secs_f64() * 1e3;
    match answer {
        Some(Frame::ResumeAccepted(accepted)) if accepted.snapshot_follows => {
            return Err(failed(format!(
                "the maker's resume took a snapshot: the gateway had released messages {} to {} \
                 of the {messages} fills it missed (retention bound, PROTOCOL.md section 4); \
                 measure fewer messages",
                resume.last_acked_server_seq + 1,
                accepted.oldest_available - 1,
            )))
        }
        Some(Frame::ResumeAccepted(_)) => {}
        other => return Err(failed(format!("the maker's resume answered {other:?}"))),
    }
    let mut replayed = 0;
    let mut first_message_ms = 0.0;
    read_until(&mut link, &mut buf, |frame| {
        if frame.server_seq().is_some() {
            verifier.message(MAKER, frame);
            replayed += 1;
            if replayed == 1 {
                first_message_ms = started.elapsed().as_secs_f64() * 1e3;
            }
        }
        replayed == messages
    })
    .await
    .ok_or_else(|| {
        failed(format!(
            "the maker's replay stopped after {replayed} of {messages} messages"
        ))
    })?;
    let complete_ms = started.elapsed().as_secs_f64() * 1e3;
    link.connection.close(0u32.into(), b"");
    verifier.finish();
    if verifier.violations() > 0 {
        return Err(failed(format!(
            "{} violations: {}",
            verifier.violations(),
            verifier.samples().join("; ")
        )));
    }
    Ok(ReplayReport {
        messages: replayed,
        restart_ms,
        connect_ms,
        resume_ms,
        first_message_ms,
        complete_ms,
    })
}

/// Most messages the replay measurement can make with the in-process gateway's
/// settings: the taker's orders within one second's rate allowance, and the maker's
/// fills (after its `OrderAck`) within its ring's bounds.
fn replay_limit() -> u64 {
    let settings = gateway::config::SessionSettings::default();
    let fill = proto::HEADER_LEN + proto::Fill::BODY_LEN;
    let ack = proto::HEADER_LEN + proto::OrderAck::BODY_LEN;
    let retained =
        (settings.replay_window - 1).min(settings.replay_window_bytes.saturating_sub(ack) / fill);
    u64::from(settings.max_messages_per_second).min(retained as u64)
}

/// The taker's side of the replay measurement: `orders` one-lot IOC buys sent as
/// fast as the client library takes them, each answered and filled exactly once.
/// Fails with the cause if a fill could not arrive as a fill (the connection was
/// closed and the resume took a snapshot) or the burst stalls.
async fn taker_burst(
    target: &Target,
    credentials: Credentials,
    orders: u64,
    verifier: &mut Verifier,
    session: usize,
) -> Result<(), String> {
    let (taker, mut events) = Client::connect(client_config(target, credentials, target.addr))
        .await
        .map_err(|e| format!("the taker's login failed: {e}"))?;
    let mut next = 1;
    let mut fills = 0;
    let mut lost_connections = Vec::new();
    while fills < orders || verifier.unanswered(session) > 0 {
        while next <= orders {
            let order = OrderParams {
                instrument_id: 2,
                client_order_id: REPLAY_ORDER_IDS + next,
                side: Side::Buy,
                order_type: OrderType::Limit,
                time_in_force: TimeInForce::Ioc,
                price: 1_000_000,
                quantity: 10,
            };
            match taker.new_order(order) {
                Ok(client_seq) => {
                    verifier.sent_order(session, client_seq, order.client_order_id, 10);
                    next += 1;
                }
                Err(ClientError::Backpressure) => break,
                Err(e) => return Err(format!("the taker could not send: {e}")),
            }
        }
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
        match event {
            Ok(Some(Event::Message(frame))) => {
                verifier.message(session, &frame);
                match frame {
                    Frame::Fill(_) => fills += 1,
                    Frame::Reject(reject) => {
                        return Err(format!("a taker order was rejected: {:?}", reject.reason))
                    }
                    _ => {}
                }
            }
            Ok(Some(Event::Snapshot {
                as_of_server_seq, ..
            })) if as_of_server_seq > 0 => {
                return Err(format!(
                    "the taker's connection was lost ({}) and its resume took a snapshot \
                     as of server sequence {as_of_server_seq}: it covered {} fills the \
                     taker never got as fills (retention bound, PROTOCOL.md section 4)",
                    describe_losses(&lost_connections),
                    orders.saturating_sub(fills),
                ))
            }
            Ok(Some(Event::Resumed { lost })) => lost_connections.push(lost),
            Ok(Some(Event::Snapshot { .. } | Event::Reconnecting { .. })) => {}
            Ok(Some(Event::Ended(reason))) => {
                return Err(format!("the taker's session ended: {reason:?}"))
            }
            Ok(None) | Err(_) => {
                return Err(format!(
                    "the taker stalled with {fills} of {orders} fills and {} orders \
                     unanswered; connections lost: {}",
                    verifier.unanswered(session),
                    describe_losses(&lost_connections),
                ))
            }
        }
    }
    let _ = taker.logout();
    Ok(())
}

/// Why connections were lost, for a failure message.
fn describe_losses(lost: &[Option<proto::ReasonCode>]) -> String {
    if lost.is_empty() {
        return "none".into();
    }
    lost.iter()
        .map(|reason| reason.map_or("network".into(), |r| format!("{r:?}")))
        .collect::<Vec<String>>()
        .join(", ")
}

/// One offered rate of a sweep: the gateway and the bare echo, same run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    /// Offered rate, per second.
    pub rate: u64,
    /// Gateway order→answer latency, microseconds.
    pub gateway_us: Percentiles,
    /// Echo round trip, microseconds.
    pub echo_us: Percentiles,
    /// Answers per second.
    pub gateway_throughput_per_s: f64,
    /// Echoes per second.
    pub echo_throughput_per_s: f64,
    /// Gateway CPU per order, when measured in its own process.
    pub gateway_cpu_us_per_order: Option<f64>,
    /// Echo server CPU per message, likewise.
    pub echo_cpu_us_per_msg: Option<f64>,
    /// Violations the run found.
    pub violations: u64,
}

/// A sweep over offered rates, and where each side's tail gives way.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepReport {
    /// Each rate, in the order run.
    pub points: Vec<SweepPoint>,
    /// The gateway's knee (see [`knee`]); `None` if it has none within the rates.
    pub gateway_knee: Option<u64>,
    /// The same for the echo.
    pub echo_knee: Option<u64>,
}

/// The knee of a rate sweep: the lowest rate from which on every p99 stays above
/// twice the low-load p99, the lower p99 of the two lowest rates. On a shared machine
/// one short run's p99 can land on a stall (here a few ms about once a second on a
/// core), so neither one noisy low-rate p99 sets the bar nor one spike in the middle
/// counts as the knee.
pub fn knee(points: &[(u64, f64)]) -> Option<u64> {
    let mut points = points.to_vec();
    points.sort_by_key(|(rate, _)| *rate);
    let base = points
        .iter()
        .take(2)
        .map(|(_, p99)| *p99)
        .reduce(f64::min)?;
    let sustained_from = points
        .iter()
        .rposition(|(_, p99)| *p99 <= 2.0 * base)
        .map_or(0, |last_below| last_below + 1);
    points.get(sustained_from).map(|(rate, _)| *rate)
}

/// Runs the gateway and the bare echo at each of `rates` (with `options`' other
/// settings and the baseline on), lowest first.
pub async fn sweep(options: Options, rates: &[u64]) -> Result<SweepReport, RunError> {
    let mut rates = rates.to_vec();
    rates.sort_unstable();
    let mut points = Vec::with_capacity(rates.len());
    for rate in rates {
        let report = run(Options {
            rate,
            baseline: true,
            replay_messages: 0,
            ..options.clone()
        })
        .await?;
        let baseline = report
            .baseline
            .as_ref()
            .ok_or_else(|| RunError::Setup("the sweep needs the baseline".into()))?;
        points.push(SweepPoint {
            rate,
            gateway_us: report.ack_latency_us,
            echo_us: baseline.echo_rtt_us,
            gateway_throughput_per_s: report.throughput_orders_per_s,
            echo_throughput_per_s: baseline.echo_throughput_per_s,
            gateway_cpu_us_per_order: report.gateway_cpu_us_per_order,
            echo_cpu_us_per_msg: baseline.echo_server_cpu_us_per_msg,
            violations: report.violations,
        });
    }
    let series = |pick: fn(&SweepPoint) -> f64| -> Vec<(u64, f64)> {
        points.iter().map(|p| (p.rate, pick(p))).collect()
    };
    Ok(SweepReport {
        gateway_knee: knee(&series(|p| p.gateway_us.p99)),
        echo_knee: knee(&series(|p| p.echo_us.p99)),
        points,
    })
}

#[cfg(test)]
mod sweep_tests {
    use super::knee;

    #[test]
    fn the_knee_is_where_the_p99_stays_past_twice_the_low_load_p99() {
        let points = [
            (5_000, 200.0),
            (10_000, 250.0),
            (20_000, 450.0),
            (40_000, 9_000.0),
        ];
        assert_eq!(knee(&points), Some(20_000));
        assert_eq!(knee(&points[..2]), None);
        assert_eq!(knee(&[]), None);
    }

    #[test]
    fn one_noisy_low_rate_or_one_spike_in_the_middle_does_not_move_the_knee() {
        let points = [
            (40_000, 300.0),
            (5_000, 700.0), // a stall in the lowest rate's run
            (10_000, 250.0),
            (20_000, 900.0), // a stall in the middle
            (80_000, 1_200.0),
            (160_000, 3_000.0),
        ];
        assert_eq!(knee(&points), Some(80_000));
    }
}
