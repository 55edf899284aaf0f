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
pub mod html;
pub mod measure;
pub mod nats;
pub mod process;
pub mod relay;
pub mod report;
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
