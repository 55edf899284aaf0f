//! Engines on the log (`engine.mode = "external"`, ENGINE.md): matching engines in
//! their own processes read the gateways' requests from the requests stream and
//! append their answers to the gateways' log, hot-hot. Crash-safe gateway
//! processes behind the load tester's balancer, a real `nats-server`, engines
//! killed (SIGKILL) mid-flow and started again from their checkpoints; the load
//! tester's verifier checks that every request was answered once, that every fill
//! reached both sides, that nothing was executed twice, and every order's final
//! state against the engine's (an order query through the log).

use std::path::PathBuf;
use std::time::Duration;

use loadtest::cluster::{ClusterOptions, ClusterReport, Fault};
use loadtest::engines::EngineCommand;

/// Load through two crash-safe gateways and two engines of `engine` on one NATS
/// server; an engine is SIGKILLed mid-flow, then a gateway, then the other engine.
async fn trade_through_engines_killed_mid_flow(engine: EngineCommand) -> ClusterReport {
    let report = loadtest::run(loadtest::Options {
        cluster: Some(ClusterOptions {
            program: e2e::gateway_binary(),
            gateways: 2,
            nats_servers: 1,
            faults: vec![Fault::Engine, Fault::Gateway, Fault::Engine],
            fault_interval: Duration::from_secs(4),
            gateway_timeout: Duration::from_secs(5),
            gateway_settings: Vec::new(),
            engines: 2,
            engine,
        }),
        sessions: 6,
        rate: 300,
        duration: Duration::from_secs(14),
        replay_messages: 0,
        ..loadtest::Options::default()
    })
    .await
    .expect("run completes");
    assert_eq!(report.violations, 0, "{:?}", report.violation_samples);
    assert!(report.checks.trades > 0, "traded");
    assert!(report.checks.final_states > 0, "final states compared");
    assert_eq!(
        report.checks.answers,
        report.orders_sent + report.cancels_sent,
        "every request answered once: {report:?}"
    );
    let cluster = report.cluster.expect("a cluster run");
    assert_eq!(cluster.kills.get("engine"), Some(&2), "{:?}", cluster.kills);
    assert_eq!(
        cluster.kills.get("gateway"),
        Some(&1),
        "{:?}",
        cluster.kills
    );
    assert_eq!(cluster.engine_kills.len(), 2, "{cluster:?}");
    assert_eq!(cluster.engines_left_stopped, 0, "{cluster:?}");
    assert_eq!(cluster.engines_stopped_by_themselves, 0, "{cluster:?}");
    assert_eq!(cluster.gateways_left_stopped, 0, "{cluster:?}");
    assert!(cluster.cross_gateway_resumes >= 1, "{cluster:?}");
    assert!(
        cluster.engine_answers_same > 0,
        "the second engine's answers were compared: {cluster:?}"
    );
    assert_eq!(cluster.engine_answers_differed, 0, "{cluster:?}");
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_matching_stub_processes_answer_hot_hot_through_engine_and_gateway_kills() {
    let cluster = trade_through_engines_killed_mid_flow(EngineCommand::matching_stub()).await;
    assert_eq!(cluster.engines, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_engine_trades_through_the_same_kills() {
    let python = python_with_nats();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/python-engine/engine.py")
        .canonicalize()
        .expect("examples/python-engine/engine.py");
    let engine = EngineCommand {
        command: vec![python.display().to_string(), script.display().to_string()],
    };
    trade_through_engines_killed_mid_flow(engine).await;
}

/// The Python of the test virtual environment (`scripts/test.sh` makes it under
/// the target directory, with nats-py from PyPI), or `ENGINE_PYTHON`. The test
/// fails, it is not skipped, without it.
fn python_with_nats() -> PathBuf {
    let python = std::env::var_os("ENGINE_PYTHON").map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
                PathBuf::from,
            );
            target.join("python/bin/python")
        },
        PathBuf::from,
    );
    let has_nats = std::process::Command::new(&python)
        .args(["-c", "import nats"])
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        has_nats,
        "{} with nats-py is missing: run scripts/test.sh, which makes it (python3 -m venv, pip install nats-py), or set ENGINE_PYTHON",
        python.display()
    );
    python
}
