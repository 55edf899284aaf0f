//! Load and chaos client for the session gateway, with an exactly-once verifier and a
//! bare-QUIC baseline measured in the same run.
//!
//! [`run()`] starts (or targets) a gateway, logs in one session per account, sends an
//! open-loop order flow in which sessions cross each other, optionally breaks
//! connections on purpose (clean close, abrupt drop, blackhole), checks every
//! message against the promises, and reports latency and throughput, with ratios to
//! bare QUIC when asked.
//!
//! # Layout
//!
//! - `run`: a run end to end ([`run()`]), the rate sweep, sessions held open.
//! - `traffic`: one session's order flow: the schedule, sending, receiving, checking.
//! - [`report`]: what a run reports ([`Report`]) and the sweep's knee.
//! - [`chaos`]: connections broken on purpose, gateways killed, bad-login floods.
//! - [`measure`]: quiet login and resume cycles, and the replay of missed messages.
//! - [`verify`]: the exactly-once verifier.
//! - [`baseline`]: the bare-QUIC echo and handshake baseline.
//! - [`relay`]: the UDP relay that makes connections vanish.
//! - [`balancer`]: the UDP balancer in front of several gateways.
//! - [`crash`]: crash-safe gateways as child processes, alone or several on a stream.
//! - [`nats`]: `nats-server` processes, alone or as a cluster.

pub mod balancer;
pub mod baseline;
pub mod chaos;
pub mod cluster;
pub mod crash;
pub mod engines;
pub mod html;
pub mod measure;
pub mod nats;
pub mod process;
pub mod relay;
pub mod report;
mod run;
mod traffic;
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
use tokio::sync::Notify;

use crate::baseline::BaselineOptions;
use crate::relay::Relay;
use crate::verify::Verifier;
pub use chaos::ChaosMode;
use chaos::{chaos_loop, flood_config, flood_logins, kill_loop};
use measure::{
    measure_cycles, measure_replay, read_until, replay_limit, send_frame, RESUME_CYCLES,
};
pub use report::*;
pub use run::{hold_sessions, run, sweep};
use traffic::*;
pub use traffic::{schedule, shared_endpoints, Ticks};

/// How long past `--duration` a run may take to wind down (the last answers and
/// resumes, the final order states, a cluster's faults under way and its
/// restarts) before it fails: it stops by itself whatever happens.
pub const RUN_MARGIN: Duration = Duration::from_secs(180);

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
        token_keys: gateway::dev::fresh_token_keys().map_err(|e| setup(&e))?,
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

fn client_config(target: &Target, credentials: Credentials, addr: SocketAddr) -> ClientConfig {
    let mut config = ClientConfig::development(addr, target.cert.clone(), credentials);
    config.idle_timeout = Duration::from_millis(1_000);
    config.keep_alive = Duration::from_millis(200);
    if let Some(rtt) = target.initial_rtt {
        config.initial_rtt = rtt;
    }
    config
}
