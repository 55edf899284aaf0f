//! The load tester: `loadtest --sessions 50 --rate 20000 --duration 10s`, against an
//! in-process gateway unless `--gateway` says otherwise. Exits non-zero on any
//! violation of the gateway's promises.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gateway_client::Credentials;
use loadtest::cluster::{ClusterOptions, Fault};
use loadtest::{Options, RemoteGateway, Report};

/// Load, chaos and exactly-once verification for the session gateway.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Gateway address; absent: a gateway is started in this process on loopback.
    #[arg(long, requires_all = ["cert", "keys"])]
    gateway: Option<std::net::SocketAddr>,
    /// The gateway's certificate (DER), e.g. .gateway-dev/cert.der.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client keys of its accounts, e.g. .gateway-dev/client-keys.toml.
    #[arg(long)]
    keys: Option<PathBuf>,
    /// The gateway's process id (same machine): report its CPU time and context
    /// switches per order, and run the baseline's echo server in its own process too.
    #[arg(long, requires = "gateway")]
    gateway_pid: Option<i32>,
    /// Core to pin the baseline's own-process echo server to (as `taskset -c N`
    /// pinned the gateway); run this load client with `taskset` on another core.
    #[arg(long, requires = "gateway_pid")]
    server_core: Option<usize>,
    /// Run the gateway and the bare echo at each of these offered rates (orders per
    /// second, comma-separated) and report where each one's p99 passes twice its p99
    /// at the lowest rate.
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<u64>,
    /// Run only the bare-QUIC echo server on loopback, printing `ADDRESS CERT-HEX`,
    /// until standard input closes (what the baseline starts as its own process).
    #[arg(long, hide = true)]
    echo_server: bool,
    /// Start a crash-safe gateway (sequencer.mode = jetstream) as a child process on
    /// loopback against this NATS server with JetStream, e.g. nats://127.0.0.1:4222,
    /// on a stream of its own that is deleted after the run.
    #[arg(long, conflicts_with = "gateway")]
    nats: Option<String>,
    /// With --nats: SIGKILL the gateway this often and start it again at once, e.g.
    /// 5s; the verifier checks nothing was lost or done twice across the restarts.
    #[arg(long, requires = "nats", value_parser = humantime::parse_duration)]
    kill_gateway_interval: Option<Duration>,
    /// With --nats or --cluster: the gateway program (default: `gateway` beside
    /// this program).
    #[arg(long)]
    gateway_program: Option<PathBuf>,
    /// With --nats or --cluster: a setting of the gateways, `key=value` as their
    /// `--set` takes it (repeatable), e.g. `sequencer.snapshot_every=5000`.
    #[arg(long = "gateway-set", value_name = "KEY=VALUE")]
    gateway_settings: Vec<String>,
    /// Start a cluster on loopback and run the load through it: --nats-servers
    /// NATS servers, this many crash-safe gateways sharing one stream, and a UDP
    /// balancer in front of them that the sessions connect to.
    #[arg(long, value_name = "GATEWAYS", conflicts_with_all = ["gateway", "nats"])]
    cluster: Option<usize>,
    /// With --cluster: NATS servers, 3 (a JetStream cluster; the stream keeps three
    /// replicas) or 1.
    #[arg(long, requires = "cluster", default_value_t = 3)]
    nats_servers: usize,
    /// With --cluster: the faults to inflict in turn, e.g. gateway,zombie,nats:
    /// SIGKILL a gateway (started again 1.5 s later), pause one past its timeout
    /// (SIGSTOP, then SIGCONT: it must stop by itself; started again), SIGKILL a
    /// NATS server (started again 0.5 s later).
    #[arg(long, requires = "cluster", value_enum, value_delimiter = ',')]
    kill: Vec<FaultArg>,
    /// With --cluster: matching engines in their own processes on the log
    /// (the gateways run with engine.mode = external, ENGINE.md); 0 runs the
    /// engine inside every gateway.
    #[arg(long, requires = "cluster", default_value_t = 0)]
    engines: usize,
    /// With --engines: the engine's command, split at spaces, to which each
    /// engine's --nats, --stream, --name and --checkpoint are added (default:
    /// `matching-stub` beside this program), e.g. `python3 examples/python-engine/engine.py`.
    #[arg(long, requires = "engines")]
    engine_command: Option<String>,
    /// With --cluster: time from one fault to the next.
    #[arg(long, requires = "cluster", default_value = "5s", value_parser = humantime::parse_duration)]
    kill_interval: Duration,
    /// With --cluster: the gateways' silence before the others declare them gone
    /// (sequencer.gateway_timeout_ms); a zombie is paused 2 s longer.
    #[arg(long, requires = "cluster", default_value = "10s", value_parser = humantime::parse_duration)]
    gateway_timeout: Duration,
    /// Sessions, one per account.
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Orders per second in total (open loop); 0: as fast as --window allows.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Unanswered requests per session at most.
    #[arg(long, default_value_t = 4_096)]
    window: usize,
    /// How long to send, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Break a random session's connection this often (clean, abrupt, blackhole in
    /// turn), e.g. 200ms. Off when absent.
    #[arg(long, value_parser = humantime::parse_duration)]
    chaos_interval: Option<Duration>,
    /// Drop this percentage of the sessions' packets at random, in each direction
    /// (through a relay per session), e.g. 1.5.
    #[arg(long, default_value_t = 0.0, value_parser = parse_loss)]
    loss: f64,
    /// Delay each of the sessions' packets this long, in each direction, e.g. 5ms.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Round-trip time the load clients and the in-process gateway assume before
    /// measuring one (default QUIC's 333 ms); near the path's real round trip, lost
    /// handshake packets are re-sent sooner, e.g. 20ms with --delay 2ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    initial_rtt: Option<Duration>,
    /// Also run a bare-QUIC echo with the same settings and report ratios.
    #[arg(long)]
    baseline: bool,
    /// Messages in the replay measurement (in-process or --nats gateway only, the
    /// latter killed and started again before the resume; 0 skips it; at most
    /// 10,000: one session's burst allowance).
    #[arg(long, default_value_t = 1_000)]
    replay: u64,
    /// Where the in-process gateway runs its engine: its own thread, or inline in
    /// the connection tasks.
    #[arg(long, value_enum, default_value = "inline")]
    engine: EngineArg,
    /// Flood the gateway with bad logins during the second half of the run and
    /// compare the established sessions' latency of both halves.
    #[arg(long)]
    flood: bool,
    /// Instead of a load run: log in this many sessions to --gateway, hold them
    /// attached for --hold, then detached for --hold, to measure the gateway's
    /// memory per session.
    #[arg(long, requires = "gateway")]
    memory: Option<usize>,
    /// With --memory: close each connection right after its login, so only detached
    /// sessions accumulate.
    #[arg(long, requires = "memory")]
    detach_at_once: bool,
    /// How long --memory holds each phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Seed of the order flow and chaos choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report as a self-contained HTML page here (charts of the latency
    /// percentiles and of latency over the run, counters).
    #[arg(long)]
    html: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Log filter for diagnostics, e.g. `gateway_client=debug,gateway=debug`.
    #[arg(long, env = "LOADTEST_LOG")]
    log: Option<String>,
}

/// `--kill` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FaultArg {
    /// SIGKILL a gateway.
    Gateway,
    /// SIGSTOP a gateway past its timeout, then SIGCONT.
    Zombie,
    /// SIGKILL the NATS server that leads the gateways' stream.
    Nats,
    /// Restart the NATS server that leads the gateways' stream through lame duck
    /// mode (a planned restart).
    NatsLdm,
    /// SIGKILL an engine on the log (--engines), start it again 1.5 s later.
    Engine,
}

/// `--engine` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum EngineArg {
    /// The engine's own thread.
    Thread,
    /// Inline in the connection tasks.
    Inline,
}

fn remote(cli: &Cli) -> anyhow::Result<Option<RemoteGateway>> {
    let (Some(addr), Some(cert), Some(keys)) = (cli.gateway, &cli.cert, &cli.keys) else {
        return Ok(None);
    };
    let cert = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let keys: Vec<(u64, Credentials)> = Credentials::load_dev_keys(keys)?;
    Ok(Some(RemoteGateway {
        addr,
        cert: cert.into(),
        keys,
    }))
}

/// A duration given in microseconds, in the unit that reads best.
fn time(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 10e3 {
        format!("{:.0} ms", us / 1e3)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.0} µs")
    }
}

/// The sweep as a table, then the knees.
fn print_sweep(sweep: &loadtest::SweepReport) {
    println!("offered/s   gateway p50 / p99 (answered/s, CPU/order)   echo p50 / p99 (echoed/s, CPU/msg)");
    let cpu = |value: Option<f64>| value.map_or_else(String::new, |v| format!(", {v:.1} µs"));
    for p in &sweep.points {
        println!(
            "{:>9}   {} / {} ({:.0}{})   {} / {} ({:.0}{}){}",
            p.rate,
            time(p.gateway_us.p50),
            time(p.gateway_us.p99),
            p.gateway_throughput_per_s,
            cpu(p.gateway_cpu_us_per_order),
            time(p.echo_us.p50),
            time(p.echo_us.p99),
            p.echo_throughput_per_s,
            cpu(p.echo_cpu_us_per_msg),
            if p.violations > 0 {
                format!("   VIOLATIONS: {}", p.violations)
            } else {
                String::new()
            }
        );
    }
    let knee = |k: Option<u64>| {
        k.map_or_else(
            || "beyond the rates swept".to_string(),
            |r| format!("{r}/s"),
        )
    };
    println!(
        "knee (p99 above twice the low-load p99 from this rate on): gateway {}, echo {}",
        knee(sweep.gateway_knee),
        knee(sweep.echo_knee)
    );
}

fn summary(report: &Report) {
    let l = &report.ack_latency_us;
    println!(
        "{} sessions against {}, offered {}, {:.1} s",
        report.sessions,
        report.target,
        if report.rate == 0 {
            format!("as fast as {} unanswered per session allow", report.window)
        } else {
            format!("{}/s", report.rate)
        },
        report.duration_s
    );
    if report.leftover_orders_cancelled > 0 {
        println!(
            "cancelled {} working orders the accounts had from before the run",
            report.leftover_orders_cancelled
        );
    }
    let rejects = if report.rejects_by_reason.is_empty() {
        String::new()
    } else {
        let reasons: Vec<String> = report
            .rejects_by_reason
            .iter()
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect();
        format!(" ({})", reasons.join(", "))
    };
    println!(
        "sent {} orders, {} cancels; received {} acks, {} rejects{rejects}, {} fills, {} cancelled",
        report.orders_sent,
        report.cancels_sent,
        report.acks,
        report.rejects,
        report.fills,
        report.cancelled
    );
    println!(
        "order→answer: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}   throughput {:.0}/s",
        time(l.p50),
        time(l.p90),
        time(l.p99),
        time(l.p999),
        time(l.max),
        report.throughput_orders_per_s
    );
    if let Some(share) = report.load_client_cpu_share.filter(|share| *share > 0.9) {
        println!(
            "WARNING: this load client used {:.0}% of the cores it may use: throughput and latency are limited by the client too, not only the gateway (the gateway's CPU per order, with --gateway-pid, says what the gateway itself costs)",
            share * 100.0
        );
    }
    #[allow(clippy::cast_precision_loss)]
    let offered = report.rate as f64;
    if report.rate > 0 && report.throughput_orders_per_s < 0.95 * offered {
        println!(
            "WARNING: offered {}/s but answered {:.0}/s: the gateway or this load client was saturated, and the latency above includes the queueing",
            report.rate, report.throughput_orders_per_s
        );
    }
    println!(
        "login {} (p50 of {})",
        time(report.login_us.p50),
        report.login_us.count
    );
    if let (Some(cpu), Some(switches)) = (
        report.gateway_cpu_us_per_order,
        report.gateway_context_switches_per_order,
    ) {
        println!(
            "gateway process: {cpu:.1} µs of CPU and {switches:.2} context switches per order"
        );
    }
    if report.disconnects > 0 {
        // The gateway's own counts are known of an in-process gateway only.
        let replayed = if report.target == "in-process" {
            format!(
                ", replayed {} messages, {} snapshot resumes",
                report.messages_replayed, report.snapshot_resumes
            )
        } else {
            String::new()
        };
        println!(
            "disconnects {} (clean {}, abrupt {}, blackhole {}), resumes {}{replayed}",
            report.disconnects,
            report.disconnects_by_mode.clean,
            report.disconnects_by_mode.abrupt,
            report.disconnects_by_mode.blackhole,
            report.resumes,
        );
    }
    if report.resume_us.count > 0 {
        println!(
            "resume after a clean or abrupt disconnect: {} (p50 of {})",
            time(report.resume_us.p50),
            report.resume_us.count
        );
    }
    if report.disconnects_by_mode.blackhole > 0 {
        println!(
            "blackhole recovery: {} (p50; the path goes silent, so this includes the client's idle timeout before it reconnects)",
            time(report.blackhole_recovery_ms * 1e3)
        );
    }
    if report.gateway_restarts > 0 {
        println!(
            "gateway killed and restarted {} times: ready again after {} (p50, max {}), sessions resumed after {} (p50, max {})",
            report.gateway_restarts,
            time(report.restart_ready_us.p50),
            time(report.restart_ready_us.max),
            time(report.restart_resume_us.p50),
            time(report.restart_resume_us.max)
        );
    }
    if let Some(cluster) = &report.cluster {
        let kills: Vec<String> = cluster
            .kills
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        println!(
            "cluster of {} gateways, {} NATS servers: faults {}; {} sessions resumed on another gateway, {} of them after their gateway failed (all faults: {} p50, max {}{}); {} records of ended gateway runs fenced off",
            cluster.gateways,
            cluster.nats_servers,
            kills.join(", "),
            cluster.cross_gateway_resumes,
            cluster.failover_ms.count,
            time(cluster.failover_ms.p50 * 1e3),
            time(cluster.failover_ms.max * 1e3),
            cluster
                .failover_ms_by_fault
                .iter()
                .map(|(fault, f)| format!("; {fault}: {} p50, max {}", time(f.p50 * 1e3), time(f.max * 1e3)))
                .collect::<String>(),
            cluster.fenced_stale_records
        );
        let stalls: Vec<String> = cluster
            .stall_ms_by_fault
            .iter()
            .map(|(fault, stall)| {
                format!(
                    "{fault} no answers for {}, p99 {} (above 100 ms for {})",
                    time(stall.no_answers_ms * 1e3),
                    time(stall.worst_p99_ms * 1e3),
                    time(stall.above_100ms_ms * 1e3)
                )
            })
            .collect();
        let cuts: Vec<String> = cluster
            .connections_cut_by_fault
            .iter()
            .map(|(fault, count)| format!("{fault} {count}"))
            .collect();
        println!(
            "stalls by fault: {}; client connections the gateways cut, by fault: {}; NATS leader SIGKILLs (NATS's election / no answers): {}; gateways that stopped by themselves {}, left stopped {}",
            stalls.join(", "),
            cuts.join(", "),
            cluster
                .nats_kills
                .iter()
                .map(|kill| format!("{} / {}", time(kill.election_ms * 1e3), time(kill.no_answers_ms * 1e3)))
                .collect::<Vec<_>>()
                .join(", "),
            cluster.gateways_stopped_by_themselves,
            cluster.gateways_left_stopped
        );
        if cluster.engines > 0 {
            println!(
                "{} engines on the log; later answers equal to the first {}, different {}; engine SIGKILLs (no answers): {}; engines that stopped by themselves {}, left stopped {}",
                cluster.engines,
                cluster.engine_answers_same,
                cluster.engine_answers_differed,
                cluster
                    .engine_kills
                    .iter()
                    .map(|kill| time(kill.no_answers_ms * 1e3))
                    .collect::<Vec<_>>()
                    .join(", "),
                cluster.engines_stopped_by_themselves,
                cluster.engines_left_stopped
            );
        }
    }
    if !report.closed_by_gateway.is_empty() {
        let closes: Vec<String> = report
            .closed_by_gateway
            .iter()
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect();
        println!("connections the gateway closed: {}", closes.join(", "));
    }
    if let Some(replay) = &report.replay {
        if let Some(restart_ms) = replay.restart_ms {
            println!(
                "gateway killed after the maker missed {} messages: ready again after {restart_ms:.1} ms, the last replayed message {:.1} ms after the kill",
                replay.messages,
                restart_ms + replay.complete_ms
            );
        }
        println!(
            "replay of {} missed messages: connected {:.2} ms, ResumeAccepted {:.2} ms, first {:.2} ms, complete {:.2} ms",
            replay.messages, replay.connect_ms, replay.resume_ms, replay.first_message_ms, replay.complete_ms
        );
    }
    if let Some(cycles) = &report.cycles {
        println!(
            "quiet, {} cycles: login {:.2} ms, resume {:.2} ms (p50; p99 {:.2} / {:.2} ms)",
            cycles.cycles,
            cycles.login_us.p50 / 1e3,
            cycles.resume_us.p50 / 1e3,
            cycles.login_us.p99 / 1e3,
            cycles.resume_us.p99 / 1e3
        );
    }
    if let (Some(baseline), Some(ratios)) = (&report.baseline, &report.ratios) {
        println!(
            "bare QUIC: echo µs p50 {:.0} p99 {:.0}, {:.0}/s, handshake {:.2} ms",
            baseline.echo_rtt_us.p50,
            baseline.echo_rtt_us.p99,
            baseline.echo_throughput_per_s,
            baseline.handshake_ms
        );
        if let (Some(cpu), Some(switches)) = (
            baseline.echo_server_cpu_us_per_msg,
            baseline.echo_server_context_switches_per_msg,
        ) {
            println!(
                "echo server process: {cpu:.1} µs of CPU and {switches:.2} context switches per message{}",
                ratios
                    .cpu_per_order_vs_echo_msg
                    .map_or_else(String::new, |r| format!("; gateway CPU per order {r:.2}× that"))
            );
        }
        // Resume ratios exist only where resumes were timed (in-process runs, chaos).
        let resumes = if ratios.resume_vs_handshake_plus_rtt.is_finite()
            && ratios.resume_vs_handshake_plus_rtt > 0.0
        {
            format!(
                "  resume/(handshake+rtt) {:.2}×  login/resume {:.2}×",
                ratios.resume_vs_handshake_plus_rtt, ratios.login_vs_resume
            )
        } else {
            String::new()
        };
        let latency = match (ratios.ack_p50, ratios.ack_p90, ratios.ack_p99) {
            (Some(p50), Some(p90), Some(p99)) => {
                format!("ack p50 {p50:.2}×  p90 {p90:.2}×  p99 {p99:.2}×  ")
            }
            _ => format!(
                "ack latency not compared (the run had {} forced disconnects and faults, \
                 the echo none)  ",
                report.chaos_events.len()
            ),
        };
        println!(
            "ratios: {latency}throughput {:.0}%{resumes}",
            ratios.throughput * 100.0,
        );
    }
    if let Some(flood) = &report.flood {
        println!(
            "flood: {} bad logins ({} refused before the handshake, {} rate limited, {} bad signature); established p99 {:.0} µs quiet, {:.0} µs flooded: {:.2}×",
            flood.attempts,
            flood.refused_before_handshake,
            flood.rate_limited,
            flood.bad_signature,
            flood.quiet_us.p99,
            flood.flood_us.p99,
            flood.p99_ratio
        );
    }
    let c = &report.checks;
    println!(
        "verified: {} answers, {} server sequences, {} trades, {} final order states",
        c.answers, c.server_seqs, c.trades, c.final_states
    );
    if report.violations == 0 {
        println!("violations: 0");
    } else {
        println!("VIOLATIONS: {}", report.violations);
        for sample in &report.violation_samples {
            println!("  {sample}");
        }
    }
}

/// A loss percentage from 0 to 50 (beyond, QUIC hardly gets anything through).
fn parse_loss(text: &str) -> Result<f64, String> {
    let percent: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=50.0).contains(&percent) {
        Ok(percent)
    } else {
        Err(format!("{percent} is not a percentage from 0 to 50"))
    }
}

/// The `--echo-server` mode: serve echoes until standard input closes.
fn echo_server() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (endpoint, cert) = loadtest::baseline::echo_server(4 << 20)?;
        let addr = endpoint.local_addr()?;
        println!("{}", loadtest::process::announce(addr, &cert));
        std::io::Write::flush(&mut std::io::stdout())?;
        // The parent holds our standard input: its end is ours.
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await??;
        endpoint.close(0u32.into(), b"done");
        anyhow::Ok(())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.echo_server {
        return match echo_server() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("loadtest echo server: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(filter) = &cli.log {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let run = || -> anyhow::Result<Report> {
        if !cli.gateway_settings.is_empty() && cli.nats.is_none() && cli.cluster.is_none() {
            anyhow::bail!("--gateway-set is for the gateways --nats or --cluster starts");
        }
        let program = cli
            .gateway_program
            .clone()
            .unwrap_or_else(loadtest::crash::CrashSafe::program_beside_this_one);
        let options = Options {
            remote: remote(&cli)?,
            sessions: cli.sessions,
            rate: cli.rate,
            window: cli.window.max(1),
            duration: cli.duration,
            chaos_interval: cli.chaos_interval,
            initial_rtt: cli.initial_rtt,
            path: loadtest::relay::Impairment {
                loss: cli.loss / 100.0,
                delay: cli.delay,
            },
            baseline: cli.baseline,
            progress: !cli.quiet,
            seed: cli.seed,
            replay_messages: cli.replay,
            flood: cli.flood,
            engine_mode: match cli.engine {
                EngineArg::Thread => gateway::config::EngineMode::Thread,
                EngineArg::Inline => gateway::config::EngineMode::Inline,
            },
            gateway_pid: cli.gateway_pid,
            server_core: cli.server_core,
            crash_safe: cli.nats.clone().map(|nats_url| loadtest::crash::CrashSafe {
                program: program.clone(),
                nats_url,
                kill_interval: cli.kill_gateway_interval,
                gateway_settings: cli.gateway_settings.clone(),
            }),
            cluster: cli.cluster.map(|gateways| ClusterOptions {
                program: program.clone(),
                gateways,
                nats_servers: cli.nats_servers,
                faults: cli
                    .kill
                    .iter()
                    .map(|fault| match fault {
                        FaultArg::Gateway => Fault::Gateway,
                        FaultArg::Zombie => Fault::Zombie,
                        FaultArg::Nats => Fault::Nats,
                        FaultArg::NatsLdm => Fault::NatsLdm,
                        FaultArg::Engine => Fault::Engine,
                    })
                    .collect(),
                fault_interval: cli.kill_interval,
                gateway_timeout: cli.gateway_timeout,
                gateway_settings: cli.gateway_settings.clone(),
                engines: cli.engines,
                engine: cli.engine_command.as_ref().map_or_else(
                    loadtest::engines::EngineCommand::matching_stub,
                    |command| loadtest::engines::EngineCommand {
                        command: command.split_whitespace().map(str::to_owned).collect(),
                    },
                ),
            }),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        if let (Some(sessions), Some(remote)) = (cli.memory, options.remote.clone()) {
            runtime.block_on(loadtest::hold_sessions(
                remote,
                sessions,
                cli.hold,
                cli.detach_at_once,
            ))?;
            std::process::exit(0);
        }
        if !cli.sweep.is_empty() {
            let sweep = runtime.block_on(loadtest::sweep(options, &cli.sweep))?;
            if let Some(path) = &cli.json {
                std::fs::write(path, serde_json::to_string_pretty(&sweep)?)
                    .with_context(|| path.display().to_string())?;
            }
            print_sweep(&sweep);
            let violations = sweep.points.iter().map(|p| p.violations).sum::<u64>();
            std::process::exit(if violations == 0 { 0 } else { 1 });
        }
        // Whatever happens, the run ends by itself: past its bound it fails, and
        // the processes it started are killed as the runtime drops them.
        let bound = options.duration + loadtest::RUN_MARGIN;
        let report = match runtime
            .block_on(async { tokio::time::timeout(bound, loadtest::run(options)).await })
        {
            Ok(report) => report?,
            Err(_) => {
                runtime.shutdown_timeout(Duration::from_secs(5));
                anyhow::bail!(
                    "the run did not end within --duration + {:?}: the gateways (or the cluster) never recovered",
                    loadtest::RUN_MARGIN
                );
            }
        };
        if let Some(path) = &cli.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .with_context(|| path.display().to_string())?;
        }
        if let Some(path) = &cli.html {
            std::fs::write(path, loadtest::html::page(&report))
                .with_context(|| path.display().to_string())?;
        }
        Ok(report)
    };
    match run() {
        Ok(report) => {
            summary(&report);
            if report.violations == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("loadtest: {error:#}");
            ExitCode::from(2)
        }
    }
}
