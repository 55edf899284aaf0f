//! The load tester's own cluster on loopback: NATS servers (three make a JetStream
//! cluster whose streams keep three replicas), several crash-safe gateways on one
//! stream, and the UDP balancer in front of them; and the faults it inflicts under
//! load: a gateway SIGKILLed, a gateway paused (SIGSTOP, the zombie) past its
//! timeout and let go, the stream's leader NATS server SIGKILLed, or restarted
//! through lame duck mode (a planned restart).
//!
//! Faults begin on a fixed schedule, half an interval into the run and then one
//! every interval, each kind in turn, and may overlap: a zombie is still paused when
//! the next fault begins. A gateway fault takes the busiest gateway of those
//! serving, and waits while fewer than two serve (one must stay); NATS faults come
//! one at a time, each after the streams have a full set of caught-up replicas
//! again. A fault that cannot begin before the run ends is not inflicted. A
//! supervisor starts again every gateway that stops by itself, as systemd's
//! `Restart=` would.
//!
//! Every process is started and stopped by its process id, on loopback only, and
//! every wait is bounded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

use crate::balancer::{Backend, Balancer};
use crate::crash::{CrashSafe, GatewayProcess};
use crate::engines::{EngineCommand, EngineProcess};
use crate::nats::{NatsServer, LAME_DUCK_DURATION};
use crate::{lock, ChaosEvent, RemoteGateway, RunError, Shared};

/// How long a killed gateway stays down before it is started again: long enough
/// for its clients to notice and resume on another gateway.
const GATEWAY_DOWN: Duration = Duration::from_millis(1_500);

/// How long a killed engine stays down before it is started again.
const ENGINE_DOWN: Duration = Duration::from_millis(1_500);

/// How long a killed NATS server stays down.
const NATS_DOWN: Duration = Duration::from_millis(500);

/// How long a restarted NATS server may take to catch up.
const NATS_CATCH_UP: Duration = Duration::from_secs(30);

/// How long a NATS server in lame duck mode may take to stop by itself.
const LAME_DUCK_EXIT: Duration = Duration::from_secs(LAME_DUCK_DURATION.as_secs() + 15);

/// How long a woken zombie may take to notice its run ended and stop.
const ZOMBIE_EXIT: Duration = Duration::from_secs(10);

/// How much longer than the gateways' timeout a zombie stays paused.
const ZOMBIE_OVERSTAY: Duration = Duration::from_secs(2);

/// How much longer still a zombie stays paused, at most, waiting for another
/// gateway to declare it gone.
const ZOMBIE_FENCE_WAIT: Duration = Duration::from_secs(30);

/// How often the supervisor looks for gateways that stopped by themselves.
const SUPERVISION: Duration = Duration::from_millis(200);

/// How long after the run's end the faults under way may take to finish, and the
/// stopped gateways to be started again. Past it the run fails: the cluster did not
/// recover.
pub const WIND_DOWN: Duration = Duration::from_secs(90);

/// How often the NATS servers' logs are read for the stream's new leader after its
/// leader's loss (the election's time is known to this much).
const LEADER_POLL: Duration = Duration::from_millis(50);

/// A fault the cluster run inflicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL the busiest gateway; start it again 1.5 s later.
    Gateway,
    /// SIGSTOP the busiest gateway until 2 s past its timeout, then SIGCONT: the
    /// others have declared it gone and fence off what it appends, and it stops; it
    /// is started again.
    Zombie,
    /// SIGKILL the NATS server that leads the gateways' stream; start it again
    /// 0.5 s later on its storage.
    Nats,
    /// Restart the NATS server that leads the gateways' stream the planned way:
    /// lame duck mode (it hands its leaderships over, then closes its clients over
    /// 30 s and exits), then start it again on its storage.
    NatsLdm,
    /// SIGKILL an engine on the log (`--engines`), the next in turn; start it
    /// again 1.5 s later from its checkpoint.
    Engine,
}

impl Fault {
    /// The fault's name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Gateway => "gateway",
            Fault::Zombie => "zombie",
            Fault::Nats => "nats",
            Fault::NatsLdm => "nats-ldm",
            Fault::Engine => "engine",
        }
    }

    /// Whether the fault takes a gateway away (its sessions fail over).
    fn of_a_gateway(self) -> bool {
        matches!(self, Fault::Gateway | Fault::Zombie)
    }
}

/// How the load tester runs its cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `gateway` program.
    pub program: PathBuf,
    /// Gateways on the stream.
    pub gateways: usize,
    /// NATS servers: 1, or 3 for a cluster with three replicas.
    pub nats_servers: usize,
    /// The faults, inflicted in turn.
    pub faults: Vec<Fault>,
    /// Time from one fault's start to the next's.
    pub fault_interval: Duration,
    /// The gateways' `sequencer.gateway_timeout_ms`: their silence before the
    /// others declare them gone. Above what a NATS leader election costs (seconds).
    pub gateway_timeout: Duration,
    /// More gateway settings, `key=value`.
    pub gateway_settings: Vec<String>,
    /// Engines on the log (`engine.mode = "external"`): 0 runs the engine inside
    /// every gateway.
    pub engines: usize,
    /// How the engines are started.
    pub engine: EngineCommand,
}

/// What the cluster run did and saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterReport {
    /// Gateways on the stream.
    pub gateways: usize,
    /// NATS servers (3: streams with three replicas).
    pub nats_servers: usize,
    /// Engines on the log (0: the engine runs inside every gateway).
    pub engines: usize,
    /// Faults inflicted, by kind (`gateway`, `zombie`, `nats`, `nats-ldm`).
    pub kills: BTreeMap<&'static str, u64>,
    /// Client connections the balancer moved to another gateway because theirs was
    /// unhealthy: sessions that resumed on another gateway.
    pub cross_gateway_resumes: usize,
    /// Records of ended gateway runs (zombies) fenced off, as the gateways alive at
    /// the end counted them (the most any one counted).
    pub fenced_stale_records: u64,
    /// From a gateway fault to each of its sessions' resume elsewhere, milliseconds.
    pub failover_ms: Failover,
    /// The same by fault (`gateway`, `zombie`).
    pub failover_ms_by_fault: BTreeMap<&'static str, Failover>,
    /// How long restarted gateways took to be ready, milliseconds (median).
    pub gateway_ready_ms: f64,
    /// Gateways that stopped outside a fault of theirs (their run declared gone
    /// while NATS was failing over, say), found and started again.
    pub gateways_stopped_by_themselves: u64,
    /// Gateways not running at the end (must be 0: every one that stopped was
    /// started again and served).
    pub gateways_left_stopped: usize,
    /// Each SIGKILL of the stream's leader NATS server, in turn: NATS's own
    /// election, and how long answers stopped.
    pub nats_kills: Vec<NatsKill>,
    /// Each SIGKILL of an engine, in turn: how long answers stopped (with a second
    /// engine answering, about none).
    pub engine_kills: Vec<EngineKill>,
    /// Engines that exited outside a fault of theirs, found and started again.
    pub engines_stopped_by_themselves: u64,
    /// Engines not running at the end (must be 0).
    pub engines_left_stopped: usize,
    /// Later answers to a batch found equal to the first (a second engine's, a
    /// restarted one's), as the gateways alive at the end counted them (the most
    /// any one counted).
    pub engine_answers_same: u64,
    /// Later answers that differed from the first: engines that disagree (must be
    /// 0 for engines of one program).
    pub engine_answers_differed: u64,
    /// The latency while each kind of fault was the latest begun (from its start to
    /// the next fault's), worst over the faults of the kind.
    pub stall_ms_by_fault: BTreeMap<&'static str, Stall>,
    /// Client connections the gateways cut (the client resumed with a reason from
    /// the gateway, `InternalError`, say) while each kind of fault was the latest
    /// begun; `none` before the first fault. A gateway that stops says
    /// `ShuttingDown` to its clients, which resume elsewhere: a handover, counted in
    /// the run's `closed_by_gateway`, not here.
    pub connections_cut_by_fault: BTreeMap<&'static str, u64>,
}

/// One SIGKILL of an engine on the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EngineKill {
    /// The longest time without an answer from the kill to the next fault,
    /// milliseconds: the engine failover time.
    pub no_answers_ms: f64,
}

/// One SIGKILL of the stream's leader NATS server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct NatsKill {
    /// From the kill until a NATS server said in its log that it leads the stream
    /// (to 50 ms), milliseconds.
    pub election_ms: f64,
    /// The longest time without any answer beginning while this fault was the
    /// latest begun, milliseconds: the election, and what the gateways add to it.
    pub no_answers_ms: f64,
}

/// How much a fault held answers up, from the run's latency timeline (slices of
/// 250 ms of intended send time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stall {
    /// The longest time without any answer to any session, beginning while the
    /// fault was the latest begun, milliseconds: how long answers stopped flowing.
    pub no_answers_ms: f64,
    /// The worst slice's p99, milliseconds: that, and the backlog of an open-loop
    /// load behind it.
    pub worst_p99_ms: f64,
    /// Time in slices whose p99 was above 100 ms, milliseconds.
    pub above_100ms_ms: f64,
}

/// Failover times, milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Failover {
    /// Median.
    pub p50: f64,
    /// Slowest.
    pub max: f64,
    /// Sessions that resumed after a gateway fault.
    pub count: u64,
}

impl Failover {
    /// The failover figures of a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Failover::default();
        }
        Failover {
            p50: histogram.value_at_quantile(0.5) as f64 / 1e3,
            max: histogram.max() as f64 / 1e3,
            count: histogram.len(),
        }
    }
}

/// The stall of each kind of fault: for each fault of `events` (in order), the
/// `timeline` slices (start seconds, p99 microseconds; `slice_s` long) from the one
/// before its start (orders in flight when it began) to the one before the next
/// fault's start, and the times without answers (`gaps`: start seconds, length
/// milliseconds) beginning then; worst over the faults of a kind. A stall longer
/// than the time between faults is charged to the next fault too.
pub fn stalls(
    (timeline, slice_s): (&[(f64, f64)], f64),
    gaps: &[(f64, f64)],
    events: &[ChaosEvent],
) -> BTreeMap<&'static str, Stall> {
    let mut stalls: BTreeMap<&'static str, Stall> = BTreeMap::new();
    for (event, stall) in events
        .iter()
        .zip(each_stall((timeline, slice_s), gaps, events))
    {
        let worst = stalls.entry(event.mode).or_default();
        worst.no_answers_ms = worst.no_answers_ms.max(stall.no_answers_ms);
        worst.worst_p99_ms = worst.worst_p99_ms.max(stall.worst_p99_ms);
        worst.above_100ms_ms = worst.above_100ms_ms.max(stall.above_100ms_ms);
    }
    stalls
}

/// The stall of each fault of `events`, in order (see [`stalls`]).
pub fn each_stall(
    (timeline, slice_s): (&[(f64, f64)], f64),
    gaps: &[(f64, f64)],
    events: &[ChaosEvent],
) -> Vec<Stall> {
    let mut each = Vec::with_capacity(events.len());
    for (nth, event) in events.iter().enumerate() {
        let from = event.t_s - slice_s;
        let until = events
            .get(nth + 1)
            .map_or(f64::INFINITY, |next| next.t_s - slice_s);
        let mut stall = Stall::default();
        for &(t_s, p99_us) in timeline {
            if t_s < from || t_s >= until {
                continue;
            }
            stall.worst_p99_ms = stall.worst_p99_ms.max(p99_us / 1e3);
            if p99_us > 100e3 {
                stall.above_100ms_ms += slice_s * 1e3;
            }
        }
        for &(t_s, gap_ms) in gaps {
            if t_s >= from && t_s < until {
                stall.no_answers_ms = stall.no_answers_ms.max(gap_ms);
            }
        }
        each.push(stall);
    }
    each
}

/// The cluster's processes, shared by the faults under way and the supervisor. A
/// process a fault (or a restart) is working on is out of its slot meanwhile.
struct Fleet {
    gateways: Mutex<Vec<Option<GatewayProcess>>>,
    engines: Mutex<Vec<Option<EngineProcess>>>,
    /// Which engine the next engine fault kills.
    engine_turn: AtomicU64,
    engines_stopped_by_themselves: AtomicU64,
    nats: Mutex<Vec<Option<NatsServer>>>,
    /// Held by the NATS fault under way: one at a time.
    nats_fault: tokio::sync::Mutex<()>,
    balancer: Balancer,
    /// The gateways' stream.
    stream: String,
    gateway_timeout: Duration,
    ready: Mutex<Histogram<u64>>,
    stopped_by_themselves: AtomicU64,
    elections_ms: Mutex<Vec<f64>>,
    /// Faults inflicted, by kind.
    kills: Mutex<BTreeMap<&'static str, u64>>,
}

/// The running cluster.
pub struct Cluster {
    fleet: Arc<Fleet>,
    report: ClusterReport,
}

impl Cluster {
    /// Starts the NATS servers, the gateways (with `accounts` demo accounts) and
    /// the balancer, and waits until every gateway serves.
    pub async fn start(options: &ClusterOptions, accounts: usize) -> Result<Cluster, RunError> {
        if options.gateways < 2 {
            return Err(RunError::Setup(
                "a cluster needs two gateways or more".into(),
            ));
        }
        let nats = match options.nats_servers {
            1 => vec![NatsServer::start(&[])?],
            3 => tokio::task::spawn_blocking(|| NatsServer::start_cluster(3))
                .await
                .map_err(|e| RunError::Setup(format!("starting NATS: {e}")))??,
            n => {
                return Err(RunError::Setup(format!(
                    "{n} NATS servers: run 1, or 3 for replicated streams"
                )))
            }
        };
        let mut settings = vec![
            format!("sequencer.replicas={}", options.nats_servers),
            format!(
                "sequencer.gateway_timeout_ms={}",
                options.gateway_timeout.as_millis()
            ),
            "sequencer.drain_notice_ms=300".into(),
            // Quicker retries of what a NATS server's loss interrupts.
            "sequencer.timeout_ms=2000".into(),
        ];
        if options.engines > 0 {
            settings.push("engine.mode=external".into());
        }
        settings.extend(options.gateway_settings.iter().cloned());
        let crash_safe = CrashSafe {
            program: options.program.clone(),
            nats_url: NatsServer::urls(&nats),
            kill_interval: None,
            gateway_settings: settings,
        };
        let gateways =
            GatewayProcess::start_cluster(&crash_safe, accounts, options.gateways).await?;
        let backends = gateways
            .iter()
            .map(|gateway| Backend {
                addr: gateway.addr(),
                admin: gateway.admin(),
            })
            .collect();
        let balancer =
            Balancer::start(backends).map_err(|e| RunError::Setup(format!("the balancer: {e}")))?;
        let stream = gateways[0].stream().to_owned();
        let mut engines = Vec::with_capacity(options.engines);
        for nth in 1..=options.engines {
            let nats_url = NatsServer::urls(&nats);
            let mut engine = EngineProcess::new(
                &options.engine,
                (&nats_url, &stream),
                &format!("engine-{nth}"),
                gateways[0].dir(),
            )?;
            engine.spawn()?;
            engines.push(Some(engine));
        }
        Ok(Cluster {
            report: ClusterReport {
                gateways: options.gateways,
                nats_servers: options.nats_servers,
                engines: options.engines,
                connections_cut_by_fault: options.faults.iter().map(|f| (f.name(), 0)).collect(),
                ..ClusterReport::default()
            },
            fleet: Arc::new(Fleet {
                gateways: Mutex::new(gateways.into_iter().map(Some).collect()),
                engines: Mutex::new(engines),
                engine_turn: AtomicU64::new(0),
                engines_stopped_by_themselves: AtomicU64::new(0),
                nats: Mutex::new(nats.into_iter().map(Some).collect()),
                nats_fault: tokio::sync::Mutex::new(()),
                balancer,
                stream,
                gateway_timeout: options.gateway_timeout,
                ready: Mutex::new(crate::histogram()),
                stopped_by_themselves: AtomicU64::new(0),
                elections_ms: Mutex::new(Vec::new()),
                kills: Mutex::new(options.faults.iter().map(|f| (f.name(), 0)).collect()),
            }),
        })
    }

    /// Where clients connect (the balancer), with the certificate and keys.
    pub fn remote(&self) -> Result<RemoteGateway, RunError> {
        let gateways = self.fleet.gateways.lock();
        let first = gateways
            .iter()
            .flatten()
            .next()
            .ok_or_else(|| RunError::Setup("no gateway".into()))?;
        let mut remote = first.remote()?;
        remote.addr = self.fleet.balancer.addr;
        Ok(remote)
    }

    /// Inflicts `faults` in turn on their schedule (see the module's doc) until
    /// `deadline`, supervising the gateways meanwhile; then waits for the faults
    /// under way and for every gateway to serve again, for up to [`WIND_DOWN`].
    /// Returns the cluster, or why it did not recover.
    pub(crate) async fn inflict(
        self,
        faults: Vec<Fault>,
        interval: Duration,
        deadline: Instant,
        shared: Shared,
    ) -> Result<Cluster, RunError> {
        let supervisor = tokio::spawn(Arc::clone(&self.fleet).supervise());
        let mut under_way = tokio::task::JoinSet::new();
        let first = Instant::now() + interval / 2;
        for (turn, fault) in faults.iter().cycle().enumerate() {
            let at = first + interval * u32::try_from(turn).unwrap_or(u32::MAX);
            if at >= deadline {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            let fleet = Arc::clone(&self.fleet);
            under_way.spawn(fleet.inflict(*fault, deadline, Arc::clone(&shared)));
        }
        let wound_down = tokio::time::timeout_at((deadline + WIND_DOWN).into(), async {
            let mut failed = None;
            while let Some(done) = under_way.join_next().await {
                let outcome =
                    done.unwrap_or_else(|e| Err(RunError::Setup(format!("a fault: {e}"))));
                if let Err(error) = outcome {
                    failed.get_or_insert(error);
                }
            }
            if let Some(error) = failed {
                return Err(error);
            }
            self.fleet.all_serving().await;
            Ok(())
        })
        .await;
        supervisor.abort();
        match wound_down {
            Ok(Ok(())) => Ok(self),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(RunError::Setup(format!(
                "the cluster did not recover within {WIND_DOWN:?} of the run's end: {}",
                self.fleet.state()
            ))),
        }
    }

    /// The report, with what the balancer and the gateways counted; `failover` is
    /// the run's failover histogram by fault, `cuts` the client connections the
    /// gateways closed by fault, `stalls` the latency by fault ([`stalls`]).
    pub(crate) async fn report(
        &self,
        failover: &BTreeMap<Fault, Histogram<u64>>,
        cuts: &BTreeMap<&'static str, u64>,
        (stalls, nats_kill_stalls, engine_kill_stalls): (
            BTreeMap<&'static str, Stall>,
            Vec<Stall>,
            Vec<Stall>,
        ),
    ) -> ClusterReport {
        let mut all = crate::histogram();
        for histogram in failover.values() {
            let _ = all.add(histogram);
        }
        let (admins, left_stopped) = {
            let admins = self.fleet.admins();
            let stopped = self
                .fleet
                .gateways
                .lock()
                .iter_mut()
                .map(|slot| slot.as_mut().is_none_or(GatewayProcess::has_exited))
                .filter(|stopped| *stopped)
                .count();
            (admins, stopped)
        };
        let engines_left_stopped = self
            .fleet
            .engines
            .lock()
            .iter_mut()
            .map(|slot| slot.as_mut().is_none_or(EngineProcess::has_exited))
            .filter(|stopped| *stopped)
            .count();
        let (fenced, compared) = tokio::task::spawn_blocking(move || {
            let fenced = admins.iter().copied().filter_map(fenced_records).max();
            let compared = admins
                .into_iter()
                .filter_map(compared_answers)
                .fold((0, 0), |(same, differed), (s, d)| {
                    (same.max(s), differed.max(d))
                });
            (fenced.unwrap_or(0), compared)
        })
        .await
        .unwrap_or_default();
        let ready = self.fleet.ready.lock();
        let mut connections_cut_by_fault = self.report.connections_cut_by_fault.clone();
        for (fault, count) in cuts {
            *connections_cut_by_fault.entry(fault).or_default() += count;
        }
        ClusterReport {
            cross_gateway_resumes: self.fleet.balancer.flows_moved(),
            fenced_stale_records: fenced,
            failover_ms: Failover::of(&all),
            failover_ms_by_fault: failover
                .iter()
                .map(|(fault, histogram)| (fault.name(), Failover::of(histogram)))
                .collect(),
            gateway_ready_ms: if ready.is_empty() {
                0.0
            } else {
                ready.value_at_quantile(0.5) as f64 / 1e3
            },
            gateways_stopped_by_themselves: self
                .fleet
                .stopped_by_themselves
                .load(Ordering::Relaxed),
            gateways_left_stopped: left_stopped,
            nats_kills: self
                .fleet
                .elections_ms
                .lock()
                .iter()
                .zip(nats_kill_stalls)
                .map(|(&election_ms, stall)| NatsKill {
                    election_ms,
                    no_answers_ms: stall.no_answers_ms,
                })
                .collect(),
            engine_kills: engine_kill_stalls
                .into_iter()
                .map(|stall| EngineKill {
                    no_answers_ms: stall.no_answers_ms,
                })
                .collect(),
            engines_stopped_by_themselves: self
                .fleet
                .engines_stopped_by_themselves
                .load(Ordering::Relaxed),
            engines_left_stopped,
            engine_answers_same: compared.0,
            engine_answers_differed: compared.1,
            stall_ms_by_fault: stalls,
            connections_cut_by_fault,
            kills: self.fleet.kills.lock().clone(),
            ..self.report.clone()
        }
    }

    /// Stops the gateways (the first, which owns the stream, last) and the NATS
    /// servers; keeps the gateways' logs if `keep_logs`.
    pub async fn stop(self, keep_logs: bool) {
        let fleet = match Arc::try_unwrap(self.fleet) {
            Ok(fleet) => fleet,
            // A fault still holds it (the run failed): its processes die with it.
            Err(_) => return,
        };
        drop(fleet.balancer);
        drop(fleet.engines);
        let gateways = fleet.gateways.into_inner().into_iter().flatten().collect();
        GatewayProcess::stop_all(gateways, keep_logs).await;
        drop(fleet.nats);
    }
}

impl Fleet {
    /// Inflicts one `fault`, once it can begin before `deadline`, and notes it in
    /// `shared` and the counts when it does.
    async fn inflict(
        self: Arc<Self>,
        fault: Fault,
        deadline: Instant,
        shared: Shared,
    ) -> Result<(), RunError> {
        let begun = || {
            let at = Instant::now();
            *self.kills.lock().entry(fault.name()).or_default() += 1;
            let mut tally = lock(&shared);
            let t_s = at.saturating_duration_since(tally.started).as_secs_f64();
            tally.chaos_events.push(ChaosEvent {
                t_s,
                mode: fault.name(),
            });
            if fault.of_a_gateway() {
                // Resumes until the next gateway fault are this one's failovers.
                tally.gateway_fault = Some((at, fault));
            }
        };
        if fault == Fault::Engine {
            let Some((index, mut engine)) = self.take_engine() else {
                return Ok(());
            };
            begun();
            engine.kill();
            tokio::time::sleep(ENGINE_DOWN).await;
            let started = engine.spawn();
            self.engines.lock()[index] = Some(engine);
            return started;
        }
        if fault.of_a_gateway() {
            let Some((index, mut gateway)) = self.take_busiest(deadline).await else {
                return Ok(());
            };
            begun();
            let outcome = self.gateway_fault(fault, &mut gateway).await;
            if outcome.is_ok() {
                if let Err(error) = self.restart(&mut gateway).await {
                    // Back in its slot stopped: the supervisor starts it again.
                    eprintln!(
                        "loadtest: gateway {} did not start again: {error}",
                        gateway.name()
                    );
                }
            }
            self.gateways.lock()[index] = Some(gateway);
            return outcome;
        }
        let Ok(_one_at_a_time) =
            tokio::time::timeout_at(deadline.into(), self.nats_fault.lock()).await
        else {
            return Ok(());
        };
        let fleet = Arc::clone(&self);
        let taken = tokio::task::spawn_blocking(move || fleet.take_leader(deadline))
            .await
            .map_err(|e| RunError::Setup(format!("finding the stream's leader: {e}")))?;
        let Some((index, mut server)) = taken else {
            return Ok(());
        };
        begun();
        let fleet = Arc::clone(&self);
        let outcome = tokio::task::spawn_blocking(move || {
            let outcome = fleet.nats_fault(fault, &mut server);
            fleet.nats.lock()[index] = Some(server);
            outcome
        })
        .await
        .map_err(|e| RunError::Setup(format!("the NATS fault: {e}")))?;
        outcome?;
        self.wait_replicated().await
    }

    /// Kills or pauses `gateway` as `fault` says, until it is to be started again.
    async fn gateway_fault(
        &self,
        fault: Fault,
        gateway: &mut GatewayProcess,
    ) -> Result<(), RunError> {
        if fault == Fault::Gateway {
            gateway.kill();
            tokio::time::sleep(GATEWAY_DOWN).await;
            return Ok(());
        }
        gateway.pause(true);
        tokio::time::sleep(self.gateway_timeout + ZOMBIE_OVERSTAY).await;
        // A NATS outage meanwhile stops the core's time (no gateway is heard): the
        // pause lasts until another gateway has declared this one gone.
        let began = Instant::now();
        while !self.declared_gone(gateway.name()).await {
            if began.elapsed() > ZOMBIE_FENCE_WAIT {
                gateway.pause(false);
                eprintln!(
                    "loadtest: no gateway declared the paused {} gone within {ZOMBIE_FENCE_WAIT:?} more; woken",
                    gateway.name()
                );
                return Ok(());
            }
            tokio::time::sleep(SUPERVISION).await;
        }
        gateway.pause(false);
        if gateway.wait_exit(ZOMBIE_EXIT).await {
            return Ok(());
        }
        Err(RunError::Setup(format!(
            "gateway {} went on for {ZOMBIE_EXIT:?} after its run ended; its log:\n{}",
            gateway.name(),
            gateway.log_tail()
        )))
    }

    /// Takes the next running engine in turn out of its slot.
    fn take_engine(&self) -> Option<(usize, EngineProcess)> {
        let mut engines = self.engines.lock();
        let count = engines.len();
        for _ in 0..count {
            let index = usize::try_from(self.engine_turn.fetch_add(1, Ordering::Relaxed))
                .unwrap_or(0)
                % count;
            if engines[index].as_mut().is_some_and(|e| !e.has_exited()) {
                return engines[index].take().map(|engine| (index, engine));
            }
        }
        None
    }

    /// The admin listeners of the gateways in their slots.
    fn admins(&self) -> Vec<std::net::SocketAddr> {
        self.gateways
            .lock()
            .iter()
            .flatten()
            .map(GatewayProcess::admin)
            .collect()
    }

    /// Whether a gateway in its slot says (in its metrics) that the gateway named
    /// `name` is no longer live on the stream.
    async fn declared_gone(&self, name: &str) -> bool {
        let admins = self.admins();
        let live = format!("gateway_sequencer_live_gateway{{gateway=\"{name}\"}}");
        tokio::task::spawn_blocking(move || {
            admins.into_iter().any(|admin| {
                metrics(admin).is_some_and(|text| {
                    text.contains("gateway_sequencer_live_gateways") && !text.contains(&live)
                })
            })
        })
        .await
        .unwrap_or(false)
    }

    /// SIGKILLs `server` (timing the stream's next leader election) or restarts it
    /// through lame duck mode, and starts it again. Blocking.
    fn nats_fault(&self, fault: Fault, server: &mut NatsServer) -> Result<(), RunError> {
        if fault == Fault::Nats {
            let won = |server: &NatsServer| {
                server.leaderships_won(&self.stream)
                    + self
                        .nats
                        .lock()
                        .iter()
                        .flatten()
                        .map(|s| s.leaderships_won(&self.stream))
                        .sum::<usize>()
            };
            let before = won(server);
            let killed = Instant::now();
            server.kill();
            let restart_at = killed + NATS_DOWN;
            let mut restarted = false;
            // Until a server says in its log that it leads the stream now; the
            // killed one is started again meanwhile, and may win.
            while won(server) == before {
                if !restarted && Instant::now() >= restart_at {
                    server.spawn()?;
                    restarted = true;
                }
                if killed.elapsed() > NATS_CATCH_UP {
                    return Err(RunError::Setup(format!(
                        "no NATS server led stream {} within {NATS_CATCH_UP:?} of its leader's SIGKILL",
                        self.stream
                    )));
                }
                std::thread::sleep(LEADER_POLL);
            }
            self.elections_ms
                .lock()
                .push(killed.elapsed().as_secs_f64() * 1e3);
            if !restarted {
                std::thread::sleep(restart_at.saturating_duration_since(Instant::now()));
                server.spawn()?;
            }
        } else {
            server.lame_duck()?;
            if !server.wait_exit(LAME_DUCK_EXIT) {
                return Err(RunError::Setup(format!(
                    "a NATS server in lame duck mode did not stop within {LAME_DUCK_EXIT:?}"
                )));
            }
            server.spawn()?;
        }
        server.wait_healthy()
    }

    /// Takes the busiest serving gateway out of its slot, once at least two serve
    /// (one stays), waiting until `deadline` at most.
    async fn take_busiest(&self, deadline: Instant) -> Option<(usize, GatewayProcess)> {
        loop {
            {
                let mut gateways = self.gateways.lock();
                let flows = self.balancer.flows();
                let serving: Vec<usize> = (0..gateways.len())
                    .filter(|&i| gateways[i].is_some() && self.balancer.is_healthy(i))
                    .collect();
                if serving.len() >= 2 {
                    let index = serving
                        .into_iter()
                        .max_by_key(|&i| (flows[i], std::cmp::Reverse(i)))?;
                    return gateways[index].take().map(|gateway| (index, gateway));
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(SUPERVISION).await;
        }
    }

    /// Takes the NATS server that leads the gateways' stream out of its slot,
    /// waiting until `deadline` at most for one to lead. Blocking.
    fn take_leader(&self, deadline: Instant) -> Option<(usize, NatsServer)> {
        loop {
            let mut nats = self.nats.lock();
            if let Some(index) =
                (0..nats.len()).find(|&i| nats[i].as_ref().is_some_and(|s| s.leads(&self.stream)))
            {
                return nats[index].take().map(|server| (index, server));
            }
            drop(nats);
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(SUPERVISION);
        }
    }

    /// With three NATS servers: waits until every stream has a leader and its
    /// replicas are caught up.
    async fn wait_replicated(&self) -> Result<(), RunError> {
        let reports: Vec<String> = self
            .nats
            .lock()
            .iter()
            .flatten()
            .map(NatsServer::jsz_url)
            .collect();
        if reports.len() < 3 {
            return Ok(());
        }
        let began = Instant::now();
        loop {
            let reports = reports.clone();
            let replicated =
                tokio::task::spawn_blocking(move || crate::nats::streams_replicated(&reports, 3))
                    .await
                    .unwrap_or(false);
            if replicated {
                return Ok(());
            }
            if began.elapsed() > NATS_CATCH_UP {
                return Err(RunError::Setup(format!(
                    "the NATS streams were not replicated again within {NATS_CATCH_UP:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts `gateway` again and waits until it serves.
    async fn restart(&self, gateway: &mut GatewayProcess) -> Result<(), RunError> {
        gateway.kill();
        gateway.spawn()?;
        let ready = gateway.wait_ready().await?;
        crate::record(&mut self.ready.lock(), ready);
        Ok(())
    }

    /// Starts again, for as long as the run lasts, every gateway in its slot that
    /// stopped by itself (cut off from NATS for longer than its timeout, say, its
    /// run declared gone).
    async fn supervise(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SUPERVISION).await;
            let mut stopped = Vec::new();
            for (index, slot) in self.gateways.lock().iter_mut().enumerate() {
                if slot.as_mut().is_some_and(GatewayProcess::has_exited) {
                    stopped.extend(slot.take().map(|gateway| (index, gateway)));
                }
            }
            for slot in self.engines.lock().iter_mut().flatten() {
                if slot.has_exited() {
                    self.engines_stopped_by_themselves
                        .fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "loadtest: engine {} stopped by itself; its log:\n{}",
                        slot.name(),
                        slot.log_tail()
                    );
                    if let Err(error) = slot.spawn() {
                        eprintln!(
                            "loadtest: engine {} did not start again: {error}",
                            slot.name()
                        );
                    }
                }
            }
            for (index, mut gateway) in stopped {
                self.stopped_by_themselves.fetch_add(1, Ordering::Relaxed);
                let fleet = Arc::clone(&self);
                tokio::spawn(async move {
                    if let Err(error) = fleet.restart(&mut gateway).await {
                        // Put back stopped: the next round tries again.
                        eprintln!(
                            "loadtest: gateway {} did not start again: {error}",
                            gateway.name()
                        );
                    }
                    fleet.gateways.lock()[index] = Some(gateway);
                });
            }
        }
    }

    /// Waits until every gateway is in its slot, running, and healthy at the
    /// balancer.
    async fn all_serving(&self) {
        loop {
            let serving = {
                let mut gateways = self.gateways.lock();
                (0..gateways.len()).all(|i| {
                    gateways[i].as_mut().is_some_and(|g| !g.has_exited())
                        && self.balancer.is_healthy(i)
                })
            };
            if serving {
                return;
            }
            tokio::time::sleep(SUPERVISION).await;
        }
    }

    /// Which gateways and NATS servers run, for an error.
    fn state(&self) -> String {
        let gateways: Vec<String> = self
            .gateways
            .lock()
            .iter_mut()
            .enumerate()
            .map(|(i, slot)| match slot {
                None => format!("gateway {} in a fault or restarting", i + 1),
                Some(g) => {
                    let state = if g.has_exited() { "stopped" } else { "running" };
                    format!("{} {state}", g.name())
                }
            })
            .collect();
        gateways.join(", ")
    }
}

/// A gateway's count of records of ended runs it fenced off, from the metrics on
/// its admin listener `admin`.
pub fn fenced_records(admin: std::net::SocketAddr) -> Option<u64> {
    counter(&metrics(admin)?, "gateway_fenced_records_total")
}

/// Engines on the log: the answers the gateway whose admin listener is `admin`
/// compared with the first and found the same, and found different.
pub fn compared_answers(admin: std::net::SocketAddr) -> Option<(u64, u64)> {
    let text = metrics(admin)?;
    let kind = |kind: &str| {
        counter(
            &text,
            &format!("gateway_engine_answers_total{{kind=\"{kind}\"}}"),
        )
    };
    Some((kind("same")?, kind("differed")?))
}

/// The value of the metric line that starts with `name`.
fn counter(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// The metrics text of the gateway whose admin listener is `admin`, if it answers.
fn metrics(admin: std::net::SocketAddr) -> Option<String> {
    ureq::get(&format!("http://{admin}/metrics"))
        .config()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fault_is_charged_the_slices_until_the_next_one_and_a_kind_its_worst() {
        let timeline: Vec<(f64, f64)> = (0..40)
            .map(|slice| {
                let t_s = f64::from(slice) * 0.25;
                // A 1 s stall from 1.75 s (orders in flight at the fault), a 0.5 s
                // one of 150 ms from 7.0 s.
                let p99_us = match t_s {
                    t if (1.75..2.75).contains(&t) => 900e3,
                    t if (7.0..7.5).contains(&t) => 150e3,
                    _ => 5e3,
                };
                (t_s, p99_us)
            })
            .collect();
        let events = [
            ChaosEvent {
                t_s: 1.9,
                mode: "nats",
            },
            ChaosEvent {
                t_s: 4.0,
                mode: "gateway",
            },
            ChaosEvent {
                t_s: 6.9,
                mode: "nats",
            },
        ];
        let gaps = [(1.95, 850.0), (4.5, 30.0), (7.0, 120.0)];
        let stalls = stalls((&timeline, 0.25), &gaps, &events);
        assert_eq!(
            stalls["nats"],
            Stall {
                no_answers_ms: 850.0,
                worst_p99_ms: 900.0,
                above_100ms_ms: 1_000.0
            }
        );
        assert_eq!(
            stalls["gateway"],
            Stall {
                no_answers_ms: 30.0,
                worst_p99_ms: 5.0,
                above_100ms_ms: 0.0
            }
        );
    }
}
