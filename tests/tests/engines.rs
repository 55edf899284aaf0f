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

use async_nats::jetstream::{self, consumer};
use e2e::{http, NatsServer, TestGateway};
use futures_util::StreamExt;
use gateway_client::{Client, Event, OrderParams};
use loadtest::cluster::{ClusterOptions, ClusterReport, Fault};
use loadtest::engines::EngineCommand;
use matching_stub::wire::{Answers, BatchAnswer, RequestBatch};
use matching_stub::{
    EngineConfig, Event as EngineEvent, Instrument, MatchingEngine, OrderBookEngine, OrderStatus,
    OrderView, Owner, Request, Side,
};
use proto::Frame;

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

/// The engine protocol by hand, as a venue's engine would speak it: the test reads
/// the requests stream and answers through the log with the bundled book, then
/// appends a second answer that differs from the first and bytes that are no
/// answer. The first answer is what the clients get; the others change nothing and
/// are counted, and `/readyz` says that the engines disagree. Order states about
/// another account than the one asked about never reach a login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_differing_or_hostile_answer_is_counted_and_changes_nothing() {
    let nats = NatsServer::start();
    let gateway = TestGateway::launch(2, &[21u8; 32], |config| {
        nats.serve(config, "HAND");
        config.engine.mode = gateway::config::EngineMode::External;
    })
    .await;
    let context = jetstream::new(async_nats::connect(&nats.url).await.expect("NATS"));
    let requests = context.get_stream("HAND_requests").await.expect("made");
    let mut messages = requests
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .expect("consumer")
        .messages()
        .await
        .expect("read");
    let engine_context = context.clone();
    let (answered_tx, mut answered) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut book = OrderBookEngine::new(EngineConfig::with_instruments(vec![Instrument {
            id: 1,
            tick_size: 1,
            lot_size: 1,
        }]))
        .expect("book");
        let mut queries = 0;
        while let Some(Ok(message)) = messages.next().await {
            let number = message.info().expect("info").stream_sequence;
            let batch = RequestBatch::decode(&message.payload).expect("a batch");
            let events = batch
                .requests
                .iter()
                .map(|request| {
                    let mut caused = Vec::new();
                    book.handle(*request, &mut caused);
                    if let Request::QueryOrders { account, .. } = request {
                        // A mistaken engine: its first answer about the account's
                        // orders is about another account, its second lists
                        // another account's order among them.
                        queries += 1;
                        if let Some(EngineEvent::OrderStates {
                            account: answered,
                            orders,
                            ..
                        }) = caused.last_mut()
                        {
                            match queries {
                                1 => *answered = account + 1,
                                2 => orders.push(foreign_order(account + 1)),
                                _ => {}
                            }
                        }
                    }
                    caused
                })
                .collect();
            let answer = BatchAnswer {
                batch: number,
                first_request: batch.first_request,
                events,
            };
            let answers = Answers {
                engine: "by-hand".into(),
                batches: vec![answer.clone()],
            };
            engine_context
                .publish("HAND.answers", answers.encode().into())
                .await
                .expect("sent")
                .await
                .expect("stored");
            let _ = answered_tx.send(answer);
        }
    });

    // A login's snapshot is an order query through the log: batch 1. Its answer
    // is about another account: the login fails rather than show it.
    let refused = Client::connect(gateway.client_config(1, gateway.addr)).await;
    assert!(refused.is_err(), "a login answered about another account");
    // Batch 2's answer lists another account's order: it is left out.
    let (client, mut events) = Client::connect(gateway.client_config(1, gateway.addr))
        .await
        .expect("login answered by the engine");
    let snapshot = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Some(Event::Snapshot { orders, .. }) => return orders,
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    })
    .await
    .expect("a login snapshot");
    assert!(snapshot.is_empty(), "{snapshot:?}");
    client
        .new_order(OrderParams::limit_buy(1, 42, 100, 10))
        .expect("sent");
    let ack = next_ack(&mut events).await;
    assert_eq!(ack.client_order_id, 42);
    let first = answered.recv().await.expect("batch 1 answered");
    assert_eq!(first.batch, 1);

    // Batch 1 again, other events: a disagreeing engine.
    let mut differing = first.clone();
    differing.events = vec![vec![]];
    let forged = Answers {
        engine: "rogue".into(),
        batches: vec![differing],
    };
    for bytes in [forged.encode(), vec![1, 2, 3], vec![0xff; 64]] {
        context
            .publish("HAND.answers", bytes.into())
            .await
            .expect("sent")
            .await
            .expect("stored");
    }
    let counted = |kind: &str| {
        let line = format!("gateway_engine_answers_total{{kind=\"{kind}\"}} ");
        gateway
            .gateway
            .metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let began = std::time::Instant::now();
    while counted("differed") < 1 || counted("unexpected") < 2 {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{}",
            gateway.gateway.metrics_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = http(&gateway, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("engines disagree"), "{body}");
    // The session carries on, answered by the first engine's answers.
    client
        .new_order(OrderParams::limit_buy(1, 43, 100, 10))
        .expect("sent");
    let ack = next_ack(&mut events).await;
    assert_eq!(ack.client_order_id, 43);
}

/// A working order of `account`, as an engine's order states list it.
fn foreign_order(account: u64) -> OrderView {
    OrderView {
        order_id: 99,
        client_order_id: 99,
        owner: Owner {
            account,
            session: 1,
        },
        instrument: 1,
        side: Side::Sell,
        price: 100,
        quantity: 1,
        filled: 0,
        leaves: 1,
        status: OrderStatus::New,
    }
}

/// The next `OrderAck`, within 10 s: the engine's answer reached the client.
async fn next_ack(events: &mut tokio::sync::mpsc::Receiver<Event>) -> proto::OrderAck {
    match e2e::next_frame(events, Duration::from_secs(10), |f| {
        matches!(f, Frame::OrderAck(_))
    })
    .await
    {
        Frame::OrderAck(ack) => ack,
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_log_refuses_a_requests_stream_a_deleted_log_left_behind() {
    let nats = NatsServer::start();
    let context = jetstream::new(async_nats::connect(&nats.url).await.expect("NATS"));
    context
        .create_stream(jetstream::stream::Config {
            name: "STALE_requests".into(),
            subjects: vec!["STALE.requests".into()],
            ..Default::default()
        })
        .await
        .expect("made");
    context
        .publish("STALE.requests", vec![1u8].into())
        .await
        .expect("sent")
        .await
        .expect("stored");
    let url = format!("sequencer.nats_url={}", nats.url);
    let error = tokio::task::spawn_blocking(move || {
        e2e::failed_start(&["sequencer.stream=STALE", &url, "engine.mode=external"])
    })
    .await
    .expect("ran");
    assert!(
        error.contains("STALE_requests") && error.contains("delete it too"),
        "{error}"
    );
}
