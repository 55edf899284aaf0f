//! The load tester's own cluster on loopback: NATS servers (three make a JetStream
//! cluster whose streams keep three replicas), several crash-safe gateways on one
//! stream, and the UDP balancer in front of them; and the faults it inflicts under
//! load, one at a time in turn: a gateway SIGKILLed, a gateway paused (SIGSTOP, the
//! zombie) past its timeout and let go, a NATS server SIGKILLed and started again.
//!
//! Every process is started and stopped by its process id, on loopback only, and
//! every wait is bounded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::balancer::{Backend, Balancer};
use crate::crash::{CrashSafe, GatewayProcess};
use crate::nats::NatsServer;
use crate::{lock, ChaosEvent, RemoteGateway, RunError, Shared};

/// How long a killed gateway stays down before it is started again: long enough
/// for its clients to notice and resume on another gateway.
const GATEWAY_DOWN: Duration = Duration::from_millis(1_500);

/// How long a killed NATS server stays down.
const NATS_DOWN: Duration = Duration::from_millis(500);

/// How long a restarted NATS server may take to catch up.
const NATS_CATCH_UP: Duration = Duration::from_secs(30);

/// How long a woken zombie may take to notice its run ended and stop.
const ZOMBIE_EXIT: Duration = Duration::from_secs(10);

/// How much longer than the gateways' timeout a zombie stays paused.
const ZOMBIE_OVERSTAY: Duration = Duration::from_secs(2);

/// A fault the cluster run inflicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// SIGKILL the gateway with the most clients; start it again 1.5 s later.
    Gateway,
    /// SIGSTOP the gateway with the most clients until 2 s past its timeout, then
    /// SIGCONT: the others have declared it gone and fence off what it appends, and
    /// it stops; it is started again.
    Zombie,
    /// SIGKILL a NATS server (each in turn); start it again 0.5 s later on its
    /// storage.
    Nats,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Gateway => "gateway",
            Fault::Zombie => "zombie",
            Fault::Nats => "nats",
        }
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
    /// others declare them gone. Above what a NATS server's loss costs (seconds).
    pub gateway_timeout: Duration,
    /// More gateway settings, `key=value`.
    pub gateway_settings: Vec<String>,
}

/// What the cluster run did and saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClusterReport {
    /// Gateways on the stream.
    pub gateways: usize,
    /// NATS servers (3: streams with three replicas).
    pub nats_servers: usize,
    /// Faults inflicted, by kind (`gateway`, `zombie`, `nats`).
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

/// The running cluster.
pub struct Cluster {
    nats: Vec<NatsServer>,
    gateways: Vec<GatewayProcess>,
    balancer: Balancer,
    report: ClusterReport,
    ready: Histogram<u64>,
    gateway_timeout: Duration,
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
        Ok(Cluster {
            report: ClusterReport {
                gateways: options.gateways,
                nats_servers: options.nats_servers,
                kills: options.faults.iter().map(|f| (f.name(), 0)).collect(),
                ..ClusterReport::default()
            },
            nats,
            gateways,
            balancer,
            ready: crate::histogram(),
            gateway_timeout: options.gateway_timeout,
        })
    }

    /// Where clients connect (the balancer), with the certificate and keys.
    pub fn remote(&self) -> Result<RemoteGateway, RunError> {
        let mut remote = self.gateways[0].remote()?;
        remote.addr = self.balancer.addr;
        Ok(remote)
    }

    /// Inflicts `faults` in turn, one every `interval`, until `deadline`; returns
    /// the cluster.
    pub(crate) async fn inflict(
        mut self,
        faults: Vec<Fault>,
        interval: Duration,
        deadline: Instant,
        shared: Shared,
    ) -> Result<Cluster, RunError> {
        let mut turn = 0usize;
        loop {
            let next = Instant::now() + interval;
            tokio::time::sleep_until(next.into()).await;
            if Instant::now() >= deadline || faults.is_empty() {
                return Ok(self);
            }
            // As a supervisor (systemd's Restart=on-failure) would: a gateway
            // that stopped by itself (cut off from NATS for longer than its
            // timeout, its run declared gone) is started again.
            for index in 0..self.gateways.len() {
                if self.gateways[index].has_exited() {
                    self.report.gateways_stopped_by_themselves += 1;
                    self.restart(index).await?;
                }
            }
            let fault = faults[turn % faults.len()];
            turn += 1;
            let at = Instant::now();
            {
                let mut tally = lock(&shared);
                let t_s = at.saturating_duration_since(tally.started).as_secs_f64();
                tally.chaos_events.push(ChaosEvent {
                    t_s,
                    mode: fault.name(),
                });
                // Resumes until the next fault are this one's failovers.
                tally.gateway_fault = (fault != Fault::Nats).then_some((at, fault));
            }
            *self.report.kills.entry(fault.name()).or_default() += 1;
            match fault {
                Fault::Gateway => {
                    let index = self.balancer.busiest();
                    self.gateways[index].kill();
                    tokio::time::sleep(GATEWAY_DOWN).await;
                    self.restart(index).await?;
                }
                Fault::Zombie => {
                    let index = self.balancer.busiest();
                    self.gateways[index].pause(true);
                    tokio::time::sleep(self.gateway_timeout + ZOMBIE_OVERSTAY).await;
                    self.gateways[index].pause(false);
                    if !self.gateways[index].wait_exit(ZOMBIE_EXIT).await {
                        return Err(RunError::Setup(format!(
                            "gateway {} went on after its run ended; its log:\n{}",
                            self.gateways[index].name(),
                            self.gateways[index].log_tail()
                        )));
                    }
                    self.restart(index).await?;
                }
                Fault::Nats => {
                    let index = (turn / faults.len()) % self.nats.len();
                    self.nats[index].kill();
                    tokio::time::sleep(NATS_DOWN).await;
                    // Starting it waits for it (JetStream recovers first): off the
                    // runtime, which carries the load.
                    let mut server = self.nats.remove(index);
                    let server = tokio::task::spawn_blocking(move || {
                        server.spawn()?;
                        server.wait_healthy()?;
                        Ok::<_, RunError>(server)
                    })
                    .await
                    .map_err(|e| RunError::Setup(format!("starting NATS again: {e}")))??;
                    self.nats.insert(index, server);
                    // Losing a second server before the first has caught up would
                    // leave the streams without a majority: the run's faults are
                    // one at a time, as the cluster is built to survive.
                    self.wait_replicated().await?;
                }
            }
        }
    }

    /// With three NATS servers: waits until every stream has a leader and its
    /// replicas are caught up.
    async fn wait_replicated(&self) -> Result<(), RunError> {
        if self.nats.len() < 3 {
            return Ok(());
        }
        let began = Instant::now();
        loop {
            let reports: Vec<String> = self.nats.iter().map(NatsServer::jsz_url).collect();
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

    /// Starts gateway `index` again and waits until it serves.
    async fn restart(&mut self, index: usize) -> Result<(), RunError> {
        let gateway = &mut self.gateways[index];
        gateway.kill();
        gateway.spawn()?;
        let ready = gateway.wait_ready().await?;
        crate::record(&mut self.ready, ready);
        Ok(())
    }

    /// The report, with what the balancer and the gateways counted; `failover` is
    /// the run's failover histogram.
    pub(crate) async fn report(&self, failover: &BTreeMap<Fault, Histogram<u64>>) -> ClusterReport {
        let mut all = crate::histogram();
        for histogram in failover.values() {
            let _ = all.add(histogram);
        }
        let admins: Vec<_> = self.gateways.iter().map(GatewayProcess::admin).collect();
        let fenced = tokio::task::spawn_blocking(move || {
            admins.into_iter().filter_map(fenced_records).max()
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(0);
        ClusterReport {
            cross_gateway_resumes: self.balancer.flows_moved(),
            fenced_stale_records: fenced,
            failover_ms: Failover::of(&all),
            failover_ms_by_fault: failover
                .iter()
                .map(|(fault, histogram)| (fault.name(), Failover::of(histogram)))
                .collect(),
            gateway_ready_ms: if self.ready.is_empty() {
                0.0
            } else {
                self.ready.value_at_quantile(0.5) as f64 / 1e3
            },
            ..self.report.clone()
        }
    }

    /// Stops the gateways (the first, which owns the stream, last) and the NATS
    /// servers; keeps the gateways' logs if `keep_logs`.
    pub async fn stop(self, keep_logs: bool) {
        drop(self.balancer);
        GatewayProcess::stop_all(self.gateways, keep_logs).await;
        drop(self.nats);
    }
}

/// A gateway's count of records of ended runs it fenced off, from the metrics on
/// its admin listener `admin`.
pub fn fenced_records(admin: std::net::SocketAddr) -> Option<u64> {
    let text = ureq::get(&format!("http://{admin}/metrics"))
        .config()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    text.lines()
        .find(|line| line.starts_with("gateway_fenced_records_total"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}
