//! Several gateways on one stream (crash-safe mode, a real `nats-server` started
//! here): each applies the whole stream, so a session resumes on whichever gateway
//! its client reaches, and answers reach the gateway the session is attached to.
//! Gateways run as processes behind the load tester's UDP balancer, and are killed
//! (SIGKILL), paused (SIGSTOP) and drained (SIGTERM).

use std::time::Duration;

use e2e::{retained, NatsServer, TestGateway};
use gateway_client::{Client, ClientConfig, Event, OrderParams};
use loadtest::balancer::{Backend, Balancer};
use loadtest::crash::{CrashSafe, GatewayProcess};
use proto::Frame;

/// How long the tests wait for an answer.
const PATIENCE: Duration = Duration::from_secs(10);

/// The next frame of a kind, within [`PATIENCE`].
async fn next_frame(
    events: &mut tokio::sync::mpsc::Receiver<Event>,
    want: fn(&Frame) -> bool,
) -> Frame {
    e2e::next_frame(events, PATIENCE, want).await
}

/// The quantity of the next fill.
async fn next_fill(events: &mut tokio::sync::mpsc::Receiver<Event>) -> u64 {
    match next_frame(events, |f| matches!(f, Frame::Fill(_))).await {
        Frame::Fill(fill) => fill.quantity,
        _ => unreachable!(),
    }
}

/// Waits for the next `Resumed` event, failing on anything but messages.
async fn resumed(events: &mut tokio::sync::mpsc::Receiver<Event>) -> Vec<Frame> {
    let mut before = Vec::new();
    let wait = async {
        loop {
            match events.recv().await {
                Some(Event::Resumed { .. }) => return,
                Some(Event::Message(frame)) => before.push(frame),
                Some(other) => panic!("{other:?} before the resume"),
                None => panic!("events ended"),
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("resumed in time");
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_one_stream_hold_the_same_core_and_route_answers_to_the_sessions_gateway() {
    let nats = NatsServer::start();
    let secret = [11u8; 32];
    let named = |name: &'static str| {
        let nats = &nats;
        move |config: &mut gateway::config::Config| {
            nats.serve(config, "TWO_EDGES");
            config.sequencer.gateway_name = Some(name.into());
        }
    };
    let a = TestGateway::launch(2, &secret, named("a")).await;
    let b = TestGateway::launch_as(2, &secret, a.identity(), named("b")).await;

    // The maker on one gateway, the taker on the other: the trade's fills reach
    // each on its own gateway.
    let mut maker = Client::connect(a.client_config(1, a.addr))
        .await
        .expect("login on a");
    let mut taker = Client::connect(a.client_config(2, b.addr))
        .await
        .expect("login on b");
    trade(&mut maker, &mut taker).await;

    // Both gateways applied the same stream: the same sessions, with the same
    // retained messages, byte for byte, and each serves only its own connections.
    let same = async {
        loop {
            let (on_a, on_b) = (retained(&a.gateway), retained(&b.gateway));
            if on_a.len() == 2 && on_a == on_b {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, same)
        .await
        .expect("both gateways hold the same sessions and messages");
    assert_eq!(
        (a.gateway.connection_count(), b.gateway.connection_count()),
        (1, 1)
    );
    let live = |gateway: &TestGateway| {
        gateway
            .gateway
            .metrics_text()
            .lines()
            .find(|line| line.starts_with("gateway_sequencer_live_gateways"))
            .map(str::to_owned)
    };
    assert_eq!(
        live(&a).as_deref(),
        Some("gateway_sequencer_live_gateways 2")
    );
    assert_eq!(live(&b), live(&a));
    drop((maker, taker));
    b.gateway.shutdown().await;
    a.gateway.shutdown().await;
}

/// Two gateway processes on one stream behind a balancer, each declared gone after
/// a second of silence.
async fn two_gateway_processes(nats: &NatsServer) -> (Vec<GatewayProcess>, Balancer) {
    let settings = CrashSafe {
        program: e2e::gateway_binary(),
        nats_url: nats.url.clone(),
        kill_interval: None,
        gateway_settings: vec![
            "sequencer.gateway_timeout_ms=1000".into(),
            "sequencer.drain_notice_ms=300".into(),
        ],
    };
    let gateways = GatewayProcess::start_cluster(&settings, 2, 2)
        .await
        .expect("gateways start");
    let balancer = Balancer::start(
        gateways
            .iter()
            .map(|g| Backend {
                addr: g.addr(),
                admin: g.admin(),
            })
            .collect(),
    )
    .expect("balancer starts");
    (gateways, balancer)
}

/// A client of demo account `index` through the balancer, quick to notice a dead
/// path.
fn through(gateways: &[GatewayProcess], balancer: &Balancer, index: usize) -> ClientConfig {
    let remote = gateways[0].remote().expect("dev files");
    let (_, credentials) = &remote.keys[index];
    let mut config =
        ClientConfig::development(balancer.addr, remote.cert.clone(), credentials.clone());
    config.idle_timeout = Duration::from_millis(1_000);
    config.keep_alive = Duration::from_millis(200);
    config
}

/// A client and its events.
type Connected = (Client, tokio::sync::mpsc::Receiver<Event>);

/// The maker rests a sell of 10; the taker buys 4 of it: each gets its fill.
async fn trade((maker, maker_events): &mut Connected, (taker, taker_events): &mut Connected) {
    maker
        .new_order(OrderParams::limit_sell(1, 1, 100, 10))
        .expect("send");
    next_frame(maker_events, |f| matches!(f, Frame::OrderAck(_))).await;
    taker
        .new_order(OrderParams::limit_buy(1, 2, 100, 4))
        .expect("send");
    assert_eq!(next_fill(taker_events).await, 4);
    assert_eq!(next_fill(maker_events).await, 4);
}

/// The maker rests a sell of 10 on one gateway; the taker, on the other (the
/// balancer takes gateways in turn), buys 4 of it. Also returns the maker's gateway.
async fn trade_across(
    gateways: &[GatewayProcess],
    balancer: &Balancer,
) -> (Connected, Connected, usize) {
    let mut maker = Client::connect(through(gateways, balancer, 0))
        .await
        .expect("maker logs in");
    let on = balancer.flows();
    let makers = on.iter().position(|flows| *flows == 1).expect("one flow");
    let mut taker = Client::connect(through(gateways, balancer, 1))
        .await
        .expect("taker logs in");
    assert_eq!(balancer.flows(), [1, 1], "one client on each gateway");
    trade(&mut maker, &mut taker).await;
    (maker, taker, makers)
}

/// Two gateway processes behind a balancer with a trade across them.
struct Across {
    /// Kept for the gateways' stream until the end.
    _nats: NatsServer,
    gateways: Vec<GatewayProcess>,
    balancer: Balancer,
    maker: Connected,
    taker: Connected,
    /// The maker's gateway.
    makers: usize,
}

impl Across {
    /// Starts NATS, two gateway processes and the balancer, and trades across them
    /// ([`trade_across`]).
    async fn start() -> Across {
        let nats = NatsServer::start();
        let (gateways, balancer) = two_gateway_processes(&nats).await;
        let (maker, taker, makers) = trade_across(&gateways, &balancer).await;
        Across {
            _nats: nats,
            gateways,
            balancer,
            maker,
            taker,
            makers,
        }
    }

    /// After its gateway went away, the maker resumes on the other one: it gets the
    /// fill of 3 made meanwhile exactly once (before its connection closed, or
    /// replayed after the resume), and its order's rest of 3 is still there to cancel.
    async fn maker_resumes_elsewhere_with_nothing_lost(&mut self) {
        let ((maker, maker_events), (taker, taker_events)) = (&mut self.maker, &mut self.taker);
        taker
            .new_order(OrderParams::limit_buy(1, 3, 100, 3))
            .expect("send");
        assert_eq!(next_fill(taker_events).await, 3);
        let before = resumed(maker_events).await;
        let filled_before: u64 = before
            .iter()
            .map(|f| match f {
                Frame::Fill(fill) => fill.quantity,
                _ => 0,
            })
            .sum();
        if filled_before == 0 {
            assert_eq!(next_fill(maker_events).await, 3);
        } else {
            assert_eq!(filled_before, 3, "{before:?}");
        }
        maker.cancel(1).expect("send");
        match next_frame(maker_events, |f| {
            matches!(f, Frame::Cancelled(_) | Frame::Fill(_))
        })
        .await
        {
            Frame::Cancelled(cancelled) => assert_eq!(cancelled.client_order_id, 1),
            fill => panic!("a fill delivered twice: {fill:?}"),
        }
    }

    /// Closes the clients, then stops the gateways (NATS last, when dropped).
    async fn stop(self) {
        drop((self.maker, self.taker));
        GatewayProcess::stop_all(self.gateways, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_gateway_is_killed_resumes_on_another_with_nothing_lost() {
    let mut across = Across::start().await;

    across.gateways[across.makers].kill();
    across.maker_resumes_elsewhere_with_nothing_lost().await;
    assert!(across.balancer.flows_moved() >= 1, "the maker's flow moved");
    across.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_gateway_is_declared_gone_and_stops_when_it_wakes_up() {
    let mut across = Across::start().await;
    let makers = across.makers;

    // The zombie: paused past its timeout, while its client resumes elsewhere.
    across.gateways[makers].pause(true);
    across.maker_resumes_elsewhere_with_nothing_lost().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    across.gateways[makers].pause(false);
    assert!(
        across.gateways[makers].wait_exit(PATIENCE).await,
        "the woken gateway stops"
    );
    let log = across.gateways[makers].log_tail();
    assert!(log.contains("run (started at position"), "{log}");

    // What it appended on waking was fenced off by the gateway that carried on.
    let fenced = loadtest::cluster::fenced_records(across.gateways[1 - makers].admin());
    assert!(fenced >= Some(1), "{fenced:?}");
    across.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_gateway_sends_its_sessions_to_another() {
    let mut across = Across::start().await;
    let makers = across.makers;

    // SIGTERM: not ready, then `ShuttingDown` to its clients, which resume on the
    // other gateway by themselves.
    let mut drained = across.gateways.remove(makers);
    let drained = tokio::spawn(async move {
        drained.terminate().await;
        drained
    });
    across.maker_resumes_elsewhere_with_nothing_lost().await;
    across
        .gateways
        .insert(makers, drained.await.expect("drained"));
    assert!(across.balancer.flows_moved() >= 1, "the maker's flow moved");
    across.stop().await;
}

/// 20 s of load (6 sessions, 400 orders/s) through the load tester's own cluster,
/// checked to have found no violation: the run's report and the cluster's.
async fn cluster_run(
    cluster: loadtest::cluster::ClusterOptions,
) -> (loadtest::Report, loadtest::cluster::ClusterReport) {
    let report = loadtest::run(loadtest::Options {
        cluster: Some(cluster),
        sessions: 6,
        rate: 400,
        duration: Duration::from_secs(20),
        replay_messages: 0,
        ..loadtest::Options::default()
    })
    .await
    .expect("run completes");
    assert_eq!(report.violations, 0, "{:?}", report.violation_samples);
    let cluster = report.cluster.clone().expect("a cluster run");
    (report, cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_under_load_survives_a_killed_gateway_a_zombie_and_a_lost_nats_server() {
    use loadtest::cluster::{ClusterOptions, Fault};
    // The load tester's cluster chaos, small: three NATS servers (streams with
    // three replicas), three gateways behind the balancer, one fault of each kind.
    let (report, cluster) = cluster_run(ClusterOptions {
        program: e2e::gateway_binary(),
        gateways: 3,
        nats_servers: 3,
        faults: vec![Fault::Gateway, Fault::Zombie, Fault::Nats],
        fault_interval: Duration::from_secs(3),
        gateway_timeout: Duration::from_secs(3),
        gateway_settings: Vec::new(),
        engines: 0,
        engine: loadtest::engines::EngineCommand::matching_stub(),
    })
    .await;
    for kind in ["gateway", "zombie", "nats"] {
        assert!(cluster.kills.get(kind) >= Some(&1), "{:?}", cluster.kills);
    }
    assert!(cluster.cross_gateway_resumes >= 1, "{cluster:?}");
    assert!(cluster.fenced_stale_records >= 1, "{cluster:?}");
    assert_eq!(cluster.gateways_left_stopped, 0, "{cluster:?}");
    assert!(report.checks.trades > 0, "traded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_leaders_nats_server_killed_then_restarted_through_lame_duck_cuts_no_client() {
    use loadtest::cluster::{ClusterOptions, Fault};
    // Under load, the NATS server leading the stream is SIGKILLed (a leader
    // election of seconds), then, once the streams are replicated again, the new
    // leader's server is restarted the planned way (lame duck mode). The
    // gateways' appends ride through both: no client connection is cut, nothing
    // is lost or repeated.
    let (report, cluster) = cluster_run(ClusterOptions {
        program: e2e::gateway_binary(),
        gateways: 2,
        nats_servers: 3,
        faults: vec![Fault::Nats, Fault::NatsLdm],
        fault_interval: Duration::from_secs(4),
        gateway_timeout: Duration::from_secs(10),
        gateway_settings: Vec::new(),
        engines: 0,
        engine: loadtest::engines::EngineCommand::matching_stub(),
    })
    .await;
    let kills = |kind| cluster.kills.get(kind).copied().unwrap_or(0);
    assert!(
        kills("nats") >= 1 && kills("nats-ldm") >= 1,
        "{:?}",
        cluster.kills
    );
    assert_eq!(
        cluster.nats_kills.len() as u64,
        kills("nats"),
        "{cluster:?}"
    );
    assert!(
        cluster
            .connections_cut_by_fault
            .values()
            .all(|&cut| cut == 0),
        "{cluster:?}"
    );
    assert!(
        report.closed_by_gateway.is_empty(),
        "{:?}",
        report.closed_by_gateway
    );
    assert_eq!(cluster.gateways_stopped_by_themselves, 0, "{cluster:?}");
    assert_eq!(cluster.gateways_left_stopped, 0, "{cluster:?}");
    assert!(report.checks.trades > 0, "traded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_other_core_settings_refuses_to_join_a_stream_and_blocks_no_one() {
    let nats = NatsServer::start();
    let named = |name: &'static str| {
        let nats = &nats;
        move |config: &mut gateway::config::Config| {
            nats.serve(config, "MIXED");
            config.sequencer.gateway_name = Some(name.into());
        }
    };
    let running = TestGateway::launch(2, &[12u8; 32], named("a")).await;
    let second = TestGateway::launch(2, &[12u8; 32], named("c")).await;
    // Its copy of the core would differ from the running gateway's.
    let url = format!("sequencer.nats_url={}", nats.url);
    let error = e2e::failed_start(&[
        "sequencer.stream=MIXED",
        &url,
        "sequencer.gateway_name=b",
        "session.replay_window=7",
    ]);
    assert!(
        error.contains("differ from those of gateway \"a\""),
        "{error}"
    );
    // The refused gateway ended its run: a gateway restarted with the right
    // settings right after it is not refused because of it.
    second.gateway.shutdown().await;
    let second = TestGateway::launch(2, &[12u8; 32], named("c")).await;
    second.gateway.shutdown().await;
    running.gateway.shutdown().await;
}
