//! A short chaos run against an in-process gateway: every promise holds. Asserts
//! correctness only, never timings.

use std::time::Duration;

use loadtest::{run, Options, Report};

/// Runs `options` and checks that the verifier found nothing wrong.
async fn run_without_violations(options: Options) -> Report {
    let report = run(options).await.expect("the run completes");
    assert_eq!(report.violations, 0, "{:#?}", report.violation_samples);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chaos_run_has_no_violations() {
    let report = run_without_violations(Options {
        sessions: 6,
        rate: 1_500,
        duration: Duration::from_secs(3),
        chaos_interval: Some(Duration::from_millis(150)),
        replay_messages: 100,
        ..Options::default()
    })
    .await;

    assert!(
        report.disconnects >= 6,
        "chaos happened: {}",
        report.disconnects
    );
    assert!(
        report.disconnects_by_mode.clean > 0
            && report.disconnects_by_mode.abrupt > 0
            && report.disconnects_by_mode.blackhole > 0
    );
    assert_eq!(
        report.resumes, report.disconnects,
        "every forced disconnect ended in a resume"
    );
    assert!(
        report.fills > 0 && report.checks.trades > 0,
        "orders crossed"
    );
    assert_eq!(
        report.checks.answers,
        report.orders_sent + report.cancels_sent
    );
    assert_eq!(report.replay.map(|r| r.messages), Some(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_with_the_engine_inline_has_no_violations() {
    let report = run_without_violations(Options {
        sessions: 4,
        rate: 1_000,
        duration: Duration::from_secs(2),
        chaos_interval: Some(Duration::from_millis(200)),
        replay_messages: 300,
        engine_mode: gateway::config::EngineMode::Inline,
        ..Options::default()
    })
    .await;

    assert!(report.fills > 0 && report.resumes > 0);
    assert_eq!(report.replay.map(|r| r.messages), Some(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chaos_run_over_a_lossy_slow_path_has_no_violations() {
    let report = run_without_violations(Options {
        sessions: 4,
        rate: 800,
        duration: Duration::from_secs(3),
        chaos_interval: Some(Duration::from_millis(250)),
        replay_messages: 0,
        path: loadtest::relay::Impairment {
            loss: 0.02,
            delay: Duration::from_millis(1),
        },
        // Lost handshake packets come again after ~60 ms instead of ~1 s.
        initial_rtt: Some(Duration::from_millis(20)),
        ..Options::default()
    })
    .await;

    assert_eq!(report.resumes, report.disconnects);
    assert!(report.fills > 0 && report.resumes > 0);
}
