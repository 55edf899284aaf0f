//! Crash-safe mode: the gateway as its own process on a JetStream stream (a real
//! `nats-server` started here), killed with SIGKILL under load and started again.

use std::time::Duration;

use e2e::{http, next_frame, retained, NatsServer, TestGateway};
use gateway::sequencer::{JetStreamLog, Record};
use gateway_client::{Client, ClientConfig, ClientError, Credentials, Event, OrderParams};
use loadtest::crash::{CrashSafe, GatewayProcess};
use proto::{Frame, ReasonCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_load_loses_nothing_and_does_nothing_twice() {
    let nats = NatsServer::start();
    // Then a session misses 500 fills, the gateway is killed and started again, and
    // the session resumes: the fills come from the rebuilt core, once each. The
    // core is snapshotted every 1,000 records and the stream purged behind: kills
    // land while a snapshot is stored, and restarts restore one.
    let report = load(
        &nats.url,
        Some(Duration::from_millis(1_200)),
        500,
        &["sequencer.snapshot_every=1000"],
    )
    .await;
    assert!(
        report.gateway_restarts >= 2,
        "{} restarts",
        report.gateway_restarts
    );
    assert!(report.checks.trades > 0, "traded");
    let replay = report.replay.as_ref().expect("replay measured");
    assert_eq!(replay.messages, 500);
    assert!(replay.restart_ms.is_some());
    assert!(
        report.resumes >= 4 * report.gateway_restarts,
        "every session resumed after every restart: {} resumes",
        report.resumes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_load_loses_nothing_and_does_nothing_twice() {
    let mut nats = NatsServer::start();
    let nats_url = nats.url.clone();
    // NATS dies (SIGKILL) mid-run and is back half a second later, with its store.
    let outage = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(2_000));
        nats.restart(Duration::from_millis(500));
        nats
    });
    let report = load(&nats_url, None, 0, &[]).await;
    let _nats = outage.await.expect("restarted");
    assert!(report.checks.trades > 0, "traded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_stall_shorter_than_the_append_patience_cuts_no_connection() {
    let nats = NatsServer::start();
    let nats_url = nats.url.clone();
    // NATS answers nothing for 2.5 s mid-run (SIGSTOP): longer than each attempt at
    // storing a batch waits (sequencer.timeout_ms, 1 s here), shorter than
    // sequencer.append_patience_ms. The batches are sent again under their message
    // ids and stored once each, in order.
    let stall = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(1_500));
        nats.pause();
        std::thread::sleep(Duration::from_millis(2_500));
        nats.carry_on();
        nats
    });
    let report = load(&nats_url, None, 0, &["sequencer.timeout_ms=1000"]).await;
    let _nats = stall.await.expect("carried on");
    assert!(report.checks.trades > 0, "traded");
    assert!(
        report.closed_by_gateway.is_empty(),
        "the gateway closed connections: {:?}",
        report.closed_by_gateway
    );
    assert_eq!(report.resumes, 0, "no client had to resume");
}

/// Four sessions' load for 4 s against a crash-safe gateway process on `nats_url`
/// (with these settings besides the load tester's), killed every `kill_interval`,
/// then the replay measurement of `replay` messages; the verifier found no
/// violation.
async fn load(
    nats_url: &str,
    kill_interval: Option<Duration>,
    replay: u64,
    settings: &[&str],
) -> loadtest::Report {
    let report = loadtest::run(loadtest::Options {
        crash_safe: Some(CrashSafe {
            program: e2e::gateway_binary(),
            nats_url: nats_url.to_owned(),
            kill_interval,
            gateway_settings: settings.iter().map(|set| (*set).to_owned()).collect(),
        }),
        sessions: 4,
        rate: 400,
        duration: Duration::from_secs(4),
        replay_messages: replay,
        ..loadtest::Options::default()
    })
    .await
    .expect("run completes");
    assert_eq!(report.violations, 0, "{:?}", report.violation_samples);
    report
}

/// How long the tests wait for an answer.
const PATIENCE: Duration = Duration::from_secs(10);

/// One session of a crash-safe gateway's demo account. Its idle timeout is longer
/// than the tests wait: it learns that its connection died with the gateway from the
/// restarted gateway's stateless reset.
async fn connect(
    gateway: &GatewayProcess,
    index: usize,
) -> (Client, tokio::sync::mpsc::Receiver<Event>) {
    let remote = gateway.remote().expect("dev files");
    let (_, credentials): &(u64, Credentials) = &remote.keys[index];
    let mut config =
        ClientConfig::development(remote.addr, remote.cert.clone(), credentials.clone());
    config.idle_timeout = Duration::from_secs(60);
    config.keep_alive = Duration::from_millis(200);
    Client::connect(config).await.expect("login")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_made_while_the_maker_was_away_is_replayed_after_the_gateway_restarts() {
    let nats = NatsServer::start();
    let mut gateway = GatewayProcess::start(
        &CrashSafe {
            program: e2e::gateway_binary(),
            nats_url: nats.url.clone(),
            kill_interval: None,
            gateway_settings: Vec::new(),
        },
        2,
    )
    .await
    .expect("gateway starts");

    // The maker rests an order, then the gateway dies without a word to anyone.
    let (maker, mut maker_events) = connect(&gateway, 0).await;
    maker
        .new_order(OrderParams::limit_sell(1, 11, 100, 5))
        .expect("send");
    next_frame(&mut maker_events, PATIENCE, |f| {
        matches!(f, Frame::OrderAck(_))
    })
    .await;
    gateway.kill_and_restart().expect("restart");
    gateway.wait_ready().await.expect("ready again");

    // The book came back from the stream: a taker logging in to the new process
    // trades against the order.
    let (taker, mut taker_events) = connect(&gateway, 1).await;
    taker
        .new_order(OrderParams::limit_buy(1, 21, 100, 5))
        .expect("send");
    let Frame::Fill(taker_fill) =
        next_frame(&mut taker_events, PATIENCE, |f| matches!(f, Frame::Fill(_))).await
    else {
        unreachable!()
    };
    assert_eq!(taker_fill.quantity, 5);

    // The maker resumes its session (no new login) and gets its side of the trade. It
    // learns that its connection is gone from the restarted gateway's stateless
    // reset, in a fraction of a second; without it, only the gateway's idle timeout
    // (10 s) would tell.
    let Frame::Fill(maker_fill) = next_frame(&mut maker_events, Duration::from_secs(5), |f| {
        matches!(f, Frame::Fill(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(maker_fill.trade_id, taker_fill.trade_id);
    assert_eq!(maker_fill.client_order_id, 11);
    drop((maker, taker));
    gateway.stop(false).await;
}

/// Each session's exactly-once and token state.
fn progress(gateway: &gateway::server::Gateway) -> Vec<(u64, u64, u32)> {
    gateway
        .registry()
        .sessions_info()
        .iter()
        .map(|info| {
            (
                info.session,
                info.last_processed_client_seq,
                info.token_generation,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_that_apply_one_stream_hold_byte_identical_messages() {
    let nats = NatsServer::start();
    let secret = [9u8; 32];
    // A snapshot every few records, the stream kept whole: a gateway can start from
    // the latest snapshot and the records after it, or from the whole stream.
    let nats = &nats;
    let snapshots_every = |every: u64| {
        move |config: &mut gateway::config::Config| {
            nats.serve(config, "DETERMINISM");
            config.sequencer.snapshot_every = every;
            config.sequencer.purge_after_snapshot = false;
        }
    };
    let first = TestGateway::launch(2, &secret, snapshots_every(5)).await;

    // Two sessions that acknowledge nothing, so their rings keep every message:
    // orders that rest, trade, are cancelled; a duplicate; a resume in between.
    let client = |account| {
        let mut config = first.client_config(account, first.addr);
        config.ack_interval = Duration::from_secs(3_600);
        config.cancel_on_disconnect = proto::CancelOnDisconnect::Off;
        config
    };
    let (maker, mut maker_events) = Client::connect(client(1)).await.expect("login");
    let (taker, mut taker_events) = Client::connect(client(2)).await.expect("login");
    for id in 1..=20 {
        maker
            .new_order(OrderParams::limit_sell(
                1,
                id,
                100 + i64::try_from(id % 3).expect("small"),
                10,
            ))
            .expect("send");
    }
    for _ in 0..20 {
        next_frame(&mut maker_events, PATIENCE, |f| {
            matches!(f, Frame::OrderAck(_))
        })
        .await;
    }
    maker.drop_connection();
    for id in 1..=5 {
        taker
            .new_order(OrderParams::limit_buy(1, 100 + id, 101, 15))
            .expect("send");
    }
    for _ in 0..5 {
        next_frame(&mut taker_events, PATIENCE, |f| {
            matches!(f, Frame::OrderAck(_))
        })
        .await;
    }
    maker.cancel(20).expect("send");
    next_frame(&mut maker_events, PATIENCE, |f| {
        matches!(f, Frame::Cancelled(_))
    })
    .await;

    // The clients go; once the core has applied their lost connections, it has
    // applied everything they sent (a connection's records are in order).
    drop((maker, taker));
    let detached = async {
        while first
            .gateway
            .registry()
            .sessions_info()
            .iter()
            .any(|info| info.state != "detached")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, detached)
        .await
        .expect("both sessions detached");
    let live = retained(&first.gateway);
    let live_progress = progress(&first.gateway);
    assert_eq!(live.len(), 2);
    // Something to compare: the taker, which never resumed, still holds at least its
    // five order acks and their fills (the maker's resume acknowledged what it had).
    let messages: usize = live.values().map(Vec::len).sum();
    assert!(messages >= 10, "{messages} messages retained");

    let stored = async {
        while snapshot_position(&first.gateway) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, stored)
        .await
        .expect("the first gateway stored a snapshot");
    first.gateway.shutdown().await;

    // Two more gateways, one after the other, rebuild the core: the first from the
    // latest snapshot and the records after it, the second (snapshots deleted) from
    // the whole stream. Both hold the same messages, byte for byte, as the gateway
    // that served the clients.
    for from_snapshot in [true, false] {
        let every = if from_snapshot {
            5
        } else {
            let mut settings = gateway::config::Config::default();
            snapshots_every(0)(&mut settings);
            JetStreamLog::delete_snapshots(&settings.sequencer)
                .await
                .expect("snapshots deleted");
            0
        };
        let rebuilt = TestGateway::launch(2, &secret, snapshots_every(every)).await;
        assert_eq!(snapshot_position(&rebuilt.gateway) > 0, from_snapshot);
        assert_eq!(retained(&rebuilt.gateway), live);
        assert_eq!(progress(&rebuilt.gateway), live_progress);
        // Its counters start from zero: the rebuild is not counted as its work.
        assert_eq!(rebuilt.gateway.registry().stats().resumes, 0);
        let metrics = rebuilt.gateway.metrics_text();
        let fills = metrics
            .lines()
            .find(|line| line.contains("fills_total"))
            .unwrap_or_default();
        assert!(fills.ends_with(" 0"), "{fills}");
        rebuilt.gateway.shutdown().await;
    }
}

/// The stream position of the latest core snapshot the gateway stored or restored.
fn snapshot_position(gateway: &gateway::server::Gateway) -> u64 {
    metric(gateway, "gateway_sequencer_snapshot_position")
}

/// The value of a metric without labels (0 if absent).
fn metric(gateway: &gateway::server::Gateway, name: &str) -> u64 {
    gateway
        .metrics_text()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarts_from_its_snapshot_once_the_stream_is_purged() {
    let nats = NatsServer::start();
    let secret = [6u8; 32];
    let snapshots = |config: &mut gateway::config::Config| {
        nats.serve(config, "PURGED");
        config.sequencer.snapshot_every = 3;
    };
    let first = TestGateway::launch(2, &secret, snapshots).await;
    let (maker, mut maker_events) = Client::connect(first.client_config(1, first.addr))
        .await
        .expect("login");
    let (taker, mut taker_events) = Client::connect(first.client_config(2, first.addr))
        .await
        .expect("login");
    maker
        .new_order(OrderParams::limit_sell(1, 11, 100, 10))
        .expect("send");
    next_frame(&mut maker_events, PATIENCE, |f| {
        matches!(f, Frame::OrderAck(_))
    })
    .await;
    taker
        .new_order(OrderParams::limit_buy(1, 21, 100, 4))
        .expect("send");
    next_frame(&mut maker_events, PATIENCE, |f| matches!(f, Frame::Fill(_))).await;

    // Once a snapshot covers the trade, the records the one before it covered are
    // purged.
    let applied = metric(&first.gateway, "gateway_sequencer_applied_position");
    let covered = async {
        while snapshot_position(&first.gateway) < applied {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, covered)
        .await
        .expect("a snapshot covers the trade");
    let (addr, identity) = (first.addr, first.identity());
    first.gateway.shutdown().await;

    // A gateway started where the clients look for it restores the snapshot: the
    // maker resumes and cancels what is left of its order, 6 of 10.
    let rebuilt = TestGateway::launch_as(2, &secret, identity, |config| {
        snapshots(config);
        config.listen = addr;
    })
    .await;
    assert!(snapshot_position(&rebuilt.gateway) >= applied);
    next_event(&mut maker_events, |e| matches!(e, Event::Resumed { .. })).await;
    maker.cancel(11).expect("send");
    let Frame::Cancelled(cancelled) = next_frame(&mut maker_events, PATIENCE, |f| {
        matches!(f, Frame::Cancelled(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (cancelled.client_order_id, cancelled.cancelled_quantity),
        (11, 6)
    );
    next_event(&mut taker_events, |e| matches!(e, Event::Resumed { .. })).await;
    drop((maker, taker));
    rebuilt.gateway.shutdown().await;

    // Without the snapshots, the purged stream cannot rebuild the core, and a
    // gateway says so rather than start with sessions and orders missing.
    let mut settings = gateway::config::Config::default();
    snapshots(&mut settings);
    JetStreamLog::delete_snapshots(&settings.sequencer)
        .await
        .expect("snapshots deleted");
    let stream = "sequencer.stream=PURGED".to_string();
    let url = format!("sequencer.nats_url={}", nats.url);
    let error = e2e::failed_start(&[&stream, &url, "sequencer.snapshot_every=0"]);
    assert!(error.contains("are gone"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_again_under_its_name_ends_the_earlier_run() {
    let nats = NatsServer::start();
    let secret = [3u8; 32];
    let crash_safe = |config: &mut gateway::config::Config| nats.serve(config, "TWO_GATEWAYS");
    let first = TestGateway::launch(1, &secret, crash_safe).await;
    let second = TestGateway::launch(1, &secret, crash_safe).await;
    let why = tokio::time::timeout(PATIENCE, first.gateway.failed())
        .await
        .expect("the first gateway gives up");
    assert!(
        why.contains("another gateway started under its sequencer.gateway_name"),
        "{why}"
    );

    // Until it has stopped, what it appends is fenced off: a login there is refused
    // (its own core fenced the record before answering), and the gateway that took
    // over has no session for it.
    let login = Client::connect(first.client_config(1, first.addr)).await;
    assert!(
        matches!(login, Err(ClientError::Refused(ReasonCode::ShuttingDown))),
        "{:?}",
        login.err()
    );
    assert!(second.gateway.registry().is_empty());
    let fenced = first
        .gateway
        .metrics_text()
        .lines()
        .find(|line| line.contains("fenced_records_total"))
        .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(fenced >= Some(1), "{fenced:?}");
    second.gateway.shutdown().await;
    first.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_go_through_the_stream_and_outlive_the_gateway() {
    let nats = NatsServer::start();
    let secret = [5u8; 32];
    let first = TestGateway::launch(2, &secret, |c| nats.serve(c, "ADMIN")).await;
    let (one, mut one_events) = Client::connect(first.client_config(1, first.addr))
        .await
        .expect("login");
    let (two, mut two_events) = Client::connect(first.client_config(2, first.addr))
        .await
        .expect("login");
    let one_id = one.session_id().expect("session");
    let two_id = two.session_id().expect("session");

    // A new token key; the second session resumes and so holds a token of it; the
    // old key is retired; the first session is revoked.
    let admin = |method, path: String| {
        let first = &first;
        async move { http(first, method, &path, Some(e2e::ADMIN_TOKEN)).await }
    };
    let (status, body) = admin("POST", "/admin/rotate-key".into()).await;
    assert_eq!(
        (status, body.contains("\"key_id\":2")),
        (200, true),
        "{body}"
    );
    two.drop_connection();
    next_event(&mut two_events, |e| matches!(e, Event::Resumed { .. })).await;
    let (status, body) = admin("POST", "/admin/retire-key?id=1".into()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin("POST", format!("/admin/revoke?session={one_id}")).await;
    assert_eq!(status, 200, "{body}");
    next_event(&mut one_events, |e| {
        matches!(e, Event::Ended(ReasonCode::Revoked))
    })
    .await;

    // A gateway rebuilt from the stream, where the clients look for it, has it all:
    // no revoked session, the new key (and not the old), the second session, which
    // resumes there with its token of the new key and trades on.
    let addr = first.addr;
    let identity = first.identity();
    first.gateway.shutdown().await;
    let rebuilt = TestGateway::launch_as(2, &secret, identity, |c| {
        nats.serve(c, "ADMIN");
        c.listen = addr;
    })
    .await;
    assert!(rebuilt.gateway.registry().get(one_id).is_none());
    assert_eq!(
        rebuilt.gateway.registry().with_keys(|k| k.current_key_id()),
        2
    );
    assert!(
        !rebuilt.gateway.registry().with_keys(|k| k.retire(1)),
        "key 1 retired already"
    );
    next_event(&mut two_events, |e| matches!(e, Event::Resumed { .. })).await;
    assert_eq!(two.session_id(), Some(two_id));
    two.new_order(OrderParams::limit_buy(1, 5, 90, 1))
        .expect("send");
    next_frame(&mut two_events, PATIENCE, |f| {
        matches!(f, Frame::OrderAck(_))
    })
    .await;
    drop((one, two));
    rebuilt.gateway.shutdown().await;
}

/// The next event that `want` picks, within [`PATIENCE`].
async fn next_event(events: &mut tokio::sync::mpsc::Receiver<Event>, want: fn(&Event) -> bool) {
    let wait = async {
        while let Some(event) = events.recv().await {
            if want(&event) {
                return;
            }
        }
        panic!("events ended");
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the event in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_acknowledges_messages_never_sent_is_refused() {
    let nats = NatsServer::start();
    let gateway = TestGateway::launch(1, &[7u8; 32], |c| nats.serve(c, "ACKS")).await;
    let config = gateway.client_config(1, gateway.addr);
    let off = proto::CancelOnDisconnect::Off;
    let (raw, accepted) = e2e::Raw::log_in(&config, off, Duration::ZERO).await;
    raw.close();

    let mut raw = e2e::Raw::open(&config).await;
    let resume = proto::Resume {
        token: accepted.token,
        last_acked_server_seq: 3,
        next_client_seq: 1,
    };
    raw.send(&[resume.into()]).await;
    assert_eq!(
        raw.recv().await,
        Some(Frame::ResumeRejected(proto::ResumeRejected {
            reason: ReasonCode::AckBeyondSent
        }))
    );
    gateway.gateway.shutdown().await;
}

#[test]
fn a_healthy_crash_safe_gateway_logs_no_warning() {
    let nats = NatsServer::start();
    let dir = std::env::temp_dir().join(format!("gateway-healthy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = format!("sequencer.nats_url={:?}", nats.url);
    // A heartbeat every 2.5 s: a record that lands just before the read's stall
    // check must not look like a stall.
    let gateway = std::process::Command::new(e2e::gateway_binary())
        .current_dir(&dir)
        .args(["--listen", "127.0.0.1:0", "--set", "admin.listen=\"\""])
        .args(["--set", "sequencer.mode=jetstream", "--set", &url])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the gateway starts");
    std::thread::sleep(Duration::from_secs(6));
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &gateway.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    let output = gateway.wait_with_output().expect("the gateway stops");
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("core rebuilt from the stream"), "{log}");
    assert!(!log.contains("NATS is back"), "it never went away:\n{log}");
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

#[test]
fn a_gateway_without_its_nats_server_says_so_and_exits() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let stderr = e2e::failed_start(&[&format!(
        "sequencer.nats_url=nats://127.0.0.1:{closed_port}"
    )]);
    assert!(
        stderr.contains("sequencer.nats_url") && stderr.contains("NATS is not reachable"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_nats_stalls_still_detaches_its_session() {
    let nats = NatsServer::start();
    let gateway = TestGateway::launch(1, &[4u8; 32], |c| {
        nats.serve(c, "LOST");
        c.sequencer.timeout_ms = 1_000;
    })
    .await;
    let (client, _events) = Client::connect(gateway.client_config(1, gateway.addr))
        .await
        .expect("login");
    // The client goes while NATS stalls for longer than an append may take: the
    // lost connection's record is stored late (or, had the NATS connection broken,
    // appended again), and the core detaches the session all the same.
    nats.pause();
    drop(client);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    nats.carry_on();
    wait_for_one_detached_session(&gateway).await;
    gateway.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_says_shutting_down_and_ends_its_run_at_once() {
    let nats = NatsServer::start();
    let named = |name: &'static str| {
        let nats = &nats;
        move |config: &mut gateway::config::Config| {
            nats.serve(config, "GRACEFUL");
            config.sequencer.gateway_name = Some(name.into());
            // Far longer than the test waits: only the run's own end can detach
            // its sessions in time.
            config.sequencer.gateway_timeout_ms = 60_000;
        }
    };
    let leaving = TestGateway::launch(1, &[13u8; 32], named("leaving")).await;
    let staying = TestGateway::launch(1, &[13u8; 32], named("staying")).await;
    let config = leaving.client_config(1, leaving.addr);
    let off = proto::CancelOnDisconnect::Off;
    let (mut raw, _) = e2e::Raw::log_in(&config, off, Duration::ZERO).await;

    let stopping = tokio::spawn(leaving.gateway.shutdown());
    let frames = raw.recv_all().await;
    assert_eq!(
        frames.last(),
        Some(&Frame::Close(proto::Close {
            reason: ReasonCode::ShuttingDown
        })),
        "{frames:?}"
    );
    assert_eq!(
        raw.close_code().await,
        Some(u64::from(ReasonCode::ShuttingDown.to_wire()))
    );
    stopping.await.expect("stopped");
    // Its run ended with it: the other gateway's core detached the session at once.
    wait_for_one_detached_session(&staying).await;
    staying.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taker_paused_before_its_put_cannot_replace_its_successors_snapshot() {
    let nats = NatsServer::start();
    let mut settings = gateway::config::Config::default();
    nats.serve(&mut settings, "STALE_TAKER");
    let log = JetStreamLog::connect(&settings.sequencer)
        .await
        .expect("connects");
    append_ticks(&log, 12).await;
    assert!(log.save_snapshot(5, b"at 5").await.expect("stored"));
    // The snapshot taker reads what its snapshot at 8 replaces, then pauses.
    let stale = log.snapshot_to_replace(8).await.expect("read");
    assert_eq!(stale, Some(5));
    // Its successor snapshots twice meanwhile, purging the records up to 10.
    assert!(log.save_snapshot(10, b"at 10").await.expect("stored"));
    assert!(log.save_snapshot(12, b"at 12").await.expect("stored"));
    // The paused taker wakes up and stores its own: the successor's stays the one
    // a restart reads.
    log.store_snapshot(5, 8, b"at 8").await.expect("stored");
    assert_eq!(
        log.load_snapshot().await.expect("read").as_deref(),
        Some(&b"at 12"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_stream_deleted_and_made_again_is_refused() {
    let nats = NatsServer::start();
    let mut settings = gateway::config::Config::default();
    nats.serve(&mut settings, "REMADE");
    let log = JetStreamLog::connect(&settings.sequencer)
        .await
        .expect("connects");
    append_ticks(&log, 5).await;
    assert!(log.save_snapshot(5, b"at 5").await.expect("stored"));
    drop(log);
    // The stream is deleted (its snapshots are not) and made again with more
    // records than the snapshot covers: the snapshot's core is not theirs.
    let client = async_nats::connect(nats.url.as_str())
        .await
        .expect("connects");
    async_nats::jetstream::new(client)
        .delete_stream("REMADE")
        .await
        .expect("deleted");
    let log = JetStreamLog::connect(&settings.sequencer)
        .await
        .expect("connects");
    append_ticks(&log, 8).await;
    let refused = log.load_snapshot().await.expect_err("another stream's");
    assert!(
        refused.to_string().contains("taken of another stream"),
        "{refused}"
    );
}

/// Appends `records` ticks of no gateway run (the core fences them off).
async fn append_ticks(log: &JetStreamLog, records: usize) {
    for _ in 0..records {
        log.append(&log.entry(Record::Tick, 0))
            .await
            .expect("stored");
    }
}

/// Waits until the gateway's core has exactly one session, detached.
async fn wait_for_one_detached_session(gateway: &TestGateway) {
    let registry = gateway.gateway.registry();
    let settled = async {
        loop {
            let sessions = registry.sessions_info();
            if sessions.len() == 1 && sessions[0].state == "detached" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, settled)
        .await
        .unwrap_or_else(|_| panic!("{:?}", registry.sessions_info()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_the_core_answers_too_late_leaves_no_session_attached_to_nothing() {
    let nats = NatsServer::start();
    let gateway = TestGateway::launch(1, &[8u8; 32], |c| {
        nats.serve(c, "LATE");
        c.sequencer.timeout_ms = 1_000;
    })
    .await;
    // NATS stalls: the login is refused after the timeout, though its record is
    // stored (and applied) once NATS carries on.
    nats.pause();
    let login = Client::connect(gateway.client_config(1, gateway.addr)).await;
    assert!(
        matches!(login, Err(ClientError::Refused(ReasonCode::InternalError))),
        "{:?}",
        login.err()
    );
    nats.carry_on();
    wait_for_one_detached_session(&gateway).await;
    gateway.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_connects_to_nats_over_tls_as_its_user_and_refuses_an_unknown_certificate() {
    let dir = std::env::temp_dir().join(format!("gateway-nats-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("certificate");
    let (cert, key, password) = (dir.join("nats.pem"), dir.join("nats.key"), dir.join("pass"));
    std::fs::write(&cert, certified.cert.pem()).expect("cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key");
    std::fs::write(&password, "s3cret\n").expect("password file");
    // DEPLOYMENT.md's NATS configuration, with the test's files and password (the
    // address, port and store directory come from the test's command line).
    let documented = include_str!("../../DEPLOYMENT.md")
        .split("# /etc/nats/nats-server.conf\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("DEPLOYMENT.md shows the NATS configuration")
        .replace("/etc/nats/server.pem", &cert.display().to_string())
        .replace("/etc/nats/server.key", &key.display().to_string())
        .replace("$2a$11$REPLACE.WITH.A.BCRYPT.HASH", "s3cret")
        .replace("GATEWAY_IN", "TLS")
        .replace("store_dir: /var/lib/nats", "");
    let conf = dir.join("nats-server.conf");
    std::fs::write(&conf, documented).expect("nats configuration");
    let conf_arg = conf.display().to_string();
    let nats = NatsServer::start_with(&["-c", &conf_arg]);
    let over_tls = |config: &mut gateway::config::Config| {
        nats.serve(config, "TLS");
        config.sequencer.snapshot_every = 3;
        config.sequencer.user = Some("gateway".into());
        config.sequencer.password_file = Some(password.clone());
        config.sequencer.tls_ca_file = Some(cert.clone());
    };
    let gateway = TestGateway::launch(2, &[14u8; 32], over_tls).await;
    let (maker, mut maker_events) = Client::connect(gateway.client_config(1, gateway.addr))
        .await
        .expect("login over a stream on TLS");
    maker
        .new_order(OrderParams::limit_sell(1, 1, 100, 1))
        .expect("send");
    next_frame(&mut maker_events, PATIENCE, |f| {
        matches!(f, Frame::OrderAck(_))
    })
    .await;
    // The user's permissions cover the snapshots too.
    let snapshotted = async {
        while snapshot_position(&gateway.gateway) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, snapshotted)
        .await
        .expect("a snapshot stored");
    assert_eq!(
        metric(
            &gateway.gateway,
            "gateway_sequencer_snapshot_failures_total"
        ),
        0
    );
    gateway.gateway.shutdown().await;

    // A server certificate the gateway was not told to trust is refused.
    let other =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
    let other_path = dir.join("other.pem");
    std::fs::write(&other_path, other.cert.pem()).expect("cert");
    let stderr = e2e::failed_start(&[
        &format!("sequencer.nats_url={:?}", nats.url),
        "sequencer.user=\"gateway\"",
        &format!(
            "sequencer.password_file={:?}",
            password.display().to_string()
        ),
        &format!(
            "sequencer.tls_ca_file={:?}",
            other_path.display().to_string()
        ),
    ]);
    assert!(stderr.contains("sequencer.nats_url"), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_connects_to_nats_as_its_user_and_is_refused_with_a_wrong_password() {
    let nats = NatsServer::start_with(&["--user", "gateway", "--pass", "s3cret"]);
    let dir = std::env::temp_dir().join(format!("gateway-nats-user-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (right, wrong) = (dir.join("right"), dir.join("wrong"));
    std::fs::write(&right, "s3cret\n").expect("password file");
    std::fs::write(&wrong, "guess\n").expect("password file");
    let as_user = |password: &std::path::Path| {
        let password = password.to_owned();
        let url = nats.url.clone();
        move |config: &mut gateway::config::Config| {
            config.sequencer.mode = gateway::config::SequencerMode::Jetstream;
            config.sequencer.nats_url = url;
            config.sequencer.user = Some("gateway".into());
            config.sequencer.password_file = Some(password);
        }
    };
    let gateway = TestGateway::launch(1, &[6u8; 32], as_user(&right)).await;
    gateway.gateway.shutdown().await;

    let stderr = e2e::failed_start(&[
        &format!("sequencer.nats_url={}", nats.url),
        "sequencer.user=gateway",
        &format!("sequencer.password_file={}", wrong.display()),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stderr.contains("authorization violation"), "{stderr}");
}
