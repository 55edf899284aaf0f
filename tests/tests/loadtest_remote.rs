//! `loadtest` against a gateway it did not start, as an operator runs it: twice in a
//! row against the same gateway, both runs clean.

use std::time::Duration;

use e2e::TestGateway;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_in_a_row_against_one_gateway_both_verify_clean() {
    const SESSIONS: usize = 4;
    let gateway = TestGateway::start(SESSIONS as u64, |c| {
        // As a deployed gateway: an account's sessions are few.
        c.session.max_sessions_per_account = 2;
    });
    for run in 1..=2 {
        let options = loadtest::Options {
            remote: Some(gateway.as_remote(SESSIONS as u64)),
            sessions: SESSIONS,
            rate: 400,
            duration: Duration::from_millis(1_500),
            replay_messages: 0,
            seed: run,
            ..loadtest::Options::default()
        };
        let report = loadtest::run(options).await.expect("run completes");
        assert_eq!(
            report.violations, 0,
            "run {run}: {:?}",
            report.violation_samples
        );
        assert!(report.checks.trades > 0, "run {run} traded");
        assert!(report.fills > 0);
    }
    assert_eq!(
        gateway.gateway.registry().len(),
        0,
        "every run logged its sessions out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_left_by_an_earlier_client_are_cancelled_before_the_run_and_not_flagged() {
    const SESSIONS: usize = 2;
    let gateway = TestGateway::start(SESSIONS as u64, |_| {});
    // A client that rests an order and leaves without cancelling it (its
    // cancel-on-disconnect is off): the order stays in the book.
    let (client, mut events) =
        gateway_client::Client::connect(gateway.client_config(1, gateway.addr))
            .await
            .expect("login");
    client
        .new_order(gateway_client::OrderParams::limit_sell(1, 7, 100, 50))
        .expect("send");
    loop {
        match events.recv().await {
            Some(gateway_client::Event::Message(proto::Frame::OrderAck(_))) => break,
            Some(_) => {}
            None => panic!("no answer"),
        }
    }
    client.logout().expect("logout");
    while !matches!(
        events.recv().await,
        Some(gateway_client::Event::Ended(_)) | None
    ) {}

    let report = loadtest::run(loadtest::Options {
        remote: Some(gateway.as_remote(SESSIONS as u64)),
        sessions: SESSIONS,
        rate: 400,
        duration: Duration::from_millis(1_000),
        replay_messages: 0,
        ..loadtest::Options::default()
    })
    .await
    .expect("run completes");
    assert_eq!(report.leftover_orders_cancelled, 1);
    assert_eq!(report.violations, 0, "{:?}", report.violation_samples);
}
