//! End-to-end tests over real QUIC on loopback: a gateway in this process, clients
//! through the client library or frame by frame, and a relay that makes connections
//! vanish.

use std::collections::HashSet;
use std::time::Duration;

use e2e::{http, Raw, Relay, TestGateway};
use gateway_client::{Client, Event, OrderParams};
use proto::{CancelOnDisconnect, CancelReason, Frame, ReasonCode, Side};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// Everything a client received, and checks on it.
#[derive(Default)]
struct Seen {
    messages: Vec<Frame>,
    snapshots: Vec<(u64, Vec<proto::OrderState>)>,
    resumes: usize,
    ended: Option<ReasonCode>,
}

impl Seen {
    fn record(&mut self, event: Event) {
        match event {
            Event::Message(frame) => self.messages.push(frame),
            Event::Snapshot {
                as_of_server_seq,
                orders,
            } => self.snapshots.push((as_of_server_seq, orders)),
            Event::Resumed { .. } => self.resumes += 1,
            Event::Reconnecting { .. } => {}
            Event::Ended(reason) => self.ended = Some(reason),
        }
    }

    fn fills(&self) -> Vec<proto::Fill> {
        self.messages
            .iter()
            .filter_map(|f| match f {
                Frame::Fill(fill) => Some(*fill),
                _ => None,
            })
            .collect()
    }

    fn acked_client_seqs(&self) -> Vec<u64> {
        self.messages
            .iter()
            .filter_map(|f| match f {
                Frame::OrderAck(ack) => Some(ack.client_seq),
                _ => None,
            })
            .collect()
    }

    /// Server sequences must be 1, 2, 3, ... after the last snapshot's as-of.
    fn assert_gap_free(&self) {
        let seqs: Vec<u64> = self.messages.iter().filter_map(Frame::server_seq).collect();
        let start = self.snapshots.first().map_or(0, |(as_of, _)| *as_of);
        let expected: Vec<u64> = (start + 1..=start + seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "server sequence gap or duplicate");
    }
}

/// Receives events into `seen` until `done` holds; panics after [`WAIT`].
async fn until(events: &mut mpsc::Receiver<Event>, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    let result = tokio::time::timeout(WAIT, async {
        while !done(seen) {
            match events.recv().await {
                Some(event) => seen.record(event),
                None => return,
            }
        }
    })
    .await;
    assert!(
        result.is_ok() && done(seen),
        "timed out; got {} messages, ended {:?}",
        seen.messages.len(),
        seen.ended
    );
}

/// The session's first order is acknowledged: it is alive and trading.
async fn assert_still_trades(client: &Client, events: &mut mpsc::Receiver<Event>, seen: &mut Seen) {
    client
        .new_order(OrderParams::limit_buy(1, 1, 100, 1))
        .expect("send");
    until(events, seen, |s| s.acked_client_seqs() == [1]).await;
}

async fn connect(gateway: &TestGateway, account: u64) -> (Client, mpsc::Receiver<Event>, Seen) {
    let (client, events) = Client::connect(gateway.client_config(account, gateway.addr))
        .await
        .expect("login");
    (client, events, Seen::default())
}

#[tokio::test]
async fn login_order_and_fill_on_both_sides() {
    let gateway = TestGateway::start(2, |_| {});
    let (seller, mut seller_events, mut seller_seen) = connect(&gateway, 1).await;
    let (buyer, mut buyer_events, mut buyer_seen) = connect(&gateway, 2).await;

    seller
        .new_order(OrderParams::limit_sell(1, 10, 100, 5))
        .expect("send");
    until(&mut seller_events, &mut seller_seen, |s| {
        !s.messages.is_empty()
    })
    .await;
    buyer
        .new_order(OrderParams::limit_buy(1, 20, 100, 5))
        .expect("send");
    until(&mut buyer_events, &mut buyer_seen, |s| s.fills().len() == 1).await;
    until(&mut seller_events, &mut seller_seen, |s| {
        s.fills().len() == 1
    })
    .await;

    let (buy, sell) = (buyer_seen.fills()[0], seller_seen.fills()[0]);
    assert_eq!(buy.trade_id, sell.trade_id);
    assert_eq!((buy.side, sell.side), (Side::Buy, Side::Sell));
    assert_eq!((buy.price, buy.quantity, sell.leaves_quantity), (100, 5, 0));
    assert_eq!(
        buyer_seen.snapshots,
        [(0, Vec::new())],
        "login snapshot first"
    );
    seller_seen.assert_gap_free();
    buyer_seen.assert_gap_free();
    gateway.gateway.shutdown().await;
}

/// Logs in frame by frame; returns the connection (snapshot consumed), the token
/// and the snapshot's orders.
async fn raw_login(
    gateway: &TestGateway,
    account: u64,
    cod: CancelOnDisconnect,
    grace_ms: u64,
) -> (Raw, proto::SessionToken, Vec<proto::OrderState>) {
    let config = gateway.client_config(account, gateway.addr);
    let (mut raw, accepted) = Raw::log_in(&config, cod, Duration::from_millis(grace_ms)).await;
    let orders = read_snapshot(&mut raw).await;
    (raw, accepted.token, orders)
}

async fn read_snapshot(raw: &mut Raw) -> Vec<proto::OrderState> {
    assert!(matches!(raw.recv().await, Some(Frame::SnapshotBegin(_))));
    let mut orders = Vec::new();
    loop {
        match raw.recv().await {
            Some(Frame::OrderState(order)) => orders.push(order),
            Some(Frame::SnapshotEnd(_)) => return orders,
            other => panic!("inside a snapshot: {other:?}"),
        }
    }
}

/// Resumes frame by frame with `token`; returns the connection and the first answer.
async fn raw_resume(
    gateway: &TestGateway,
    account: u64,
    token: proto::SessionToken,
    last_acked: u64,
) -> (Raw, Frame) {
    let config = gateway.client_config(account, gateway.addr);
    let mut raw = Raw::open(&config).await;
    raw.send(&[proto::Resume {
        token,
        last_acked_server_seq: last_acked,
        next_client_seq: 1,
    }
    .into()])
        .await;
    let answer = raw.recv().await.expect("an answer");
    (raw, answer)
}

fn new_order(client_seq: u64, side: Side, price: i64, quantity: u64) -> Frame {
    proto::NewOrder {
        client_seq,
        client_order_id: client_seq,
        instrument_id: 1,
        side,
        order_type: proto::OrderType::Limit,
        time_in_force: proto::TimeInForce::Gtc,
        price,
        quantity,
    }
    .into()
}

#[tokio::test]
async fn an_abrupt_loss_mid_flow_executes_every_order_once_and_delivers_every_fill_once() {
    let gateway = TestGateway::start(2, |_| {});
    let relay = Relay::start(gateway.addr).await.expect("relay");
    let (maker, mut maker_events) = Client::connect(gateway.client_config(1, relay.addr))
        .await
        .expect("maker login");
    let mut maker_seen = Seen::default();
    let (taker, mut taker_events, mut taker_seen) = connect(&gateway, 2).await;

    // Orders and fills in flight both ways when the maker's connection vanishes.
    for id in 1..=100 {
        maker
            .new_order(OrderParams::limit_sell(1, id, 100, 1))
            .expect("send");
    }
    until(&mut maker_events, &mut maker_seen, |s| {
        s.messages.len() >= 20
    })
    .await;
    for id in 1..=60 {
        taker
            .new_order(OrderParams::limit_buy(1, id, 100, 1))
            .expect("send");
    }
    relay.blackhole();
    for id in 101..=200 {
        maker
            .new_order(OrderParams::limit_sell(1, id, 100, 1))
            .expect("send");
    }
    for id in 61..=200 {
        taker
            .new_order(OrderParams::limit_buy(1, id, 100, 1))
            .expect("send");
    }

    until(&mut maker_events, &mut maker_seen, |s| {
        s.acked_client_seqs().len() == 200 && s.fills().len() == 200
    })
    .await;
    until(&mut taker_events, &mut taker_seen, |s| {
        s.fills().len() == 200
    })
    .await;

    assert!(maker_seen.resumes >= 1, "the maker resumed");
    let mut acked = maker_seen.acked_client_seqs();
    acked.sort_unstable();
    assert_eq!(
        acked,
        (1..=200).collect::<Vec<_>>(),
        "every order acknowledged exactly once"
    );
    let maker_trades: HashSet<u64> = maker_seen.fills().iter().map(|f| f.trade_id).collect();
    let taker_trades: HashSet<u64> = taker_seen.fills().iter().map(|f| f.trade_id).collect();
    assert_eq!(maker_trades.len(), 200, "no fill delivered twice");
    assert_eq!(maker_trades, taker_trades, "every fill reached both sides");
    maker_seen.assert_gap_free();
    taker_seen.assert_gap_free();
    assert_eq!(maker.unprocessed(), 0);
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn a_resume_takes_over_a_half_open_connection() {
    // The gateway would notice the dead connection only after 30 s; the resume comes
    // within about a second and must not wait for that.
    let gateway = TestGateway::start(1, |c| c.transport.idle_timeout_ms = 30_000);
    let relay = Relay::start(gateway.addr).await.expect("relay");
    let (client, mut events) = Client::connect(gateway.client_config(1, relay.addr))
        .await
        .expect("login");
    let mut seen = Seen::default();
    let session = client.session_id().expect("session id");
    relay.blackhole();
    let started = std::time::Instant::now();
    until(&mut events, &mut seen, |s| s.resumes == 1).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took over without waiting for the idle timeout"
    );
    tokio::time::timeout(WAIT, async {
        while gateway.gateway.connection_count() > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the half-open connection was closed");
    assert_still_trades(&client, &mut events, &mut seen).await;
    assert_eq!(gateway.gateway.registry().len(), 1);
    assert!(gateway.gateway.registry().get(session).is_some());
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn forged_superseded_and_reused_tokens_get_their_reason_codes() {
    let gateway = TestGateway::start(1, |_| {});
    let (raw, token0, _) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    raw.close();

    let mut forged = token0;
    forged.0[70] ^= 0x40;
    let (raw, answer) = raw_resume(&gateway, 1, forged, 0).await;
    assert_eq!(
        answer,
        Frame::ResumeRejected(proto::ResumeRejected {
            reason: ReasonCode::TokenForged
        })
    );
    assert_eq!(raw.close_code().await, Some(202));

    // Presenting the same token again before its successor is used is allowed (the
    // client may have lost the answer).
    let (raw, first) = raw_resume(&gateway, 1, token0, 0).await;
    assert!(matches!(first, Frame::ResumeAccepted(_)));
    raw.close();
    let (raw, again) = raw_resume(&gateway, 1, token0, 0).await;
    let Frame::ResumeAccepted(accepted) = again else {
        panic!("{again:?}")
    };
    raw.close();
    let (raw, used) = raw_resume(&gateway, 1, accepted.token, 0).await;
    assert!(matches!(used, Frame::ResumeAccepted(_)));
    raw.close();

    // Now the old token is stale: theft. The session ends for everyone.
    let (raw, stale) = raw_resume(&gateway, 1, token0, 0).await;
    assert_eq!(
        stale,
        Frame::ResumeRejected(proto::ResumeRejected {
            reason: ReasonCode::TokenSuperseded
        })
    );
    assert_eq!(raw.close_code().await, Some(204));
    let (_, after) = raw_resume(&gateway, 1, accepted.token, 0).await;
    assert_eq!(
        after,
        Frame::ResumeRejected(proto::ResumeRejected {
            reason: ReasonCode::TokenSuperseded
        })
    );
    assert!(gateway.gateway.registry().is_empty());
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let gateway = TestGateway::start(1, |c| c.session.token_ttl_s = 1);
    let (raw, token, _) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    raw.close();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (raw, answer) = raw_resume(&gateway, 1, token, 0).await;
    assert_eq!(
        answer,
        Frame::ResumeRejected(proto::ResumeRejected {
            reason: ReasonCode::TokenExpired
        })
    );
    assert_eq!(raw.close_code().await, Some(203));
    gateway.gateway.shutdown().await;
}

/// Logs in with cancel-on-disconnect after 1 s, rests a buy of 3, and closes the
/// connection; returns the token.
async fn rest_one_order_and_disconnect(gateway: &TestGateway) -> proto::SessionToken {
    let (mut raw, token, _) = raw_login(gateway, 1, CancelOnDisconnect::CancelAll, 1_000).await;
    raw.send(&[new_order(1, Side::Buy, 90, 3)]).await;
    assert!(matches!(raw.recv().await, Some(Frame::OrderAck(_))));
    raw.close();
    token
}

#[tokio::test]
async fn cancel_on_disconnect_fires_after_the_grace_period_and_not_before() {
    let gateway = TestGateway::start(1, |_| {});
    let token = rest_one_order_and_disconnect(&gateway).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (observer, _, orders) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    assert_eq!(
        orders.iter().map(|o| o.status).collect::<Vec<_>>(),
        [proto::OrderStatus::New],
        "not yet"
    );
    observer.close();

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (mut raw, answer) = raw_resume(&gateway, 1, token, 1).await;
    assert!(matches!(answer, Frame::ResumeAccepted(_)));
    let cancelled = raw.recv().await;
    assert!(
        matches!(cancelled, Some(Frame::Cancelled(c)) if c.reason == CancelReason::CancelOnDisconnect && c.cancelled_quantity == 3),
        "{cancelled:?}"
    );
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn a_resume_within_the_grace_period_cancels_nothing() {
    let gateway = TestGateway::start(1, |_| {});
    let token = rest_one_order_and_disconnect(&gateway).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_resumed, answer) = raw_resume(&gateway, 1, token, 1).await;
    assert!(matches!(answer, Frame::ResumeAccepted(_)));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (_observer, _, orders) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    assert_eq!(
        orders.iter().map(|o| o.status).collect::<Vec<_>>(),
        [proto::OrderStatus::New]
    );
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn a_resume_beyond_the_window_gets_the_gap_and_a_snapshot() {
    let gateway = TestGateway::start(2, |c| c.session.replay_window = 4);
    let (mut maker, token, _) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    // With a 4-message window the second order waits for room until the first
    // answer is acknowledged (PROTOCOL.md section 4, "Flow control").
    for (seq, price) in [(1, 100), (2, 105)] {
        maker.send(&[new_order(seq, Side::Sell, price, 10)]).await;
        assert!(matches!(maker.recv().await, Some(Frame::OrderAck(_))));
        maker.send(&[proto::Ack { server_seq: seq }.into()]).await;
    }
    maker.close();

    let (mut taker, _, _) = raw_login(&gateway, 2, CancelOnDisconnect::Off, 0).await;
    for seq in 1..=6 {
        taker.send(&[new_order(seq, Side::Buy, 100, 1)]).await;
        assert!(matches!(taker.recv().await, Some(Frame::OrderAck(_))));
        assert!(matches!(taker.recv().await, Some(Frame::Fill(_))));
        taker
            .send(&[proto::Ack {
                server_seq: seq * 2,
            }
            .into()])
            .await;
    }

    let (mut maker, answer) = raw_resume(&gateway, 1, token, 2).await;
    let Frame::ResumeAccepted(accepted) = answer else {
        panic!("{answer:?}")
    };
    assert!(accepted.snapshot_follows);
    assert_eq!((accepted.replay_from, accepted.oldest_available), (9, 5));
    let orders = read_snapshot(&mut maker).await;
    let states: Vec<(u64, u64, u64)> = orders
        .iter()
        .map(|o| (o.client_order_id, o.filled_quantity, o.leaves_quantity))
        .collect();
    assert_eq!(states, [(1, 6, 4), (2, 0, 10)]);
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn a_malformed_first_frame_gets_a_typed_error_and_other_sessions_carry_on() {
    let gateway = TestGateway::start(1, |_| {});
    let (client, mut events, mut seen) = connect(&gateway, 1).await;
    let config = gateway.client_config(1, gateway.addr);
    for (bytes, reason) in [
        (vec![0x60, 0x00, 0x02, 0x07], ReasonCode::UnsupportedVersion),
        (vec![0xff, 0xff, 0x02, 0x01], ReasonCode::FrameTooLarge),
        (vec![0x00, 0x00, 0x7e, 0x01], ReasonCode::UnknownFrameType),
        (
            vec![0x03, 0x00, 0x02, 0x01, 1, 2, 3],
            ReasonCode::MalformedFrame,
        ),
    ] {
        let mut raw = Raw::open(&config).await;
        raw.send_bytes(&bytes).await;
        assert_eq!(
            raw.recv_all().await,
            [Frame::Close(proto::Close { reason })]
        );
        assert_eq!(raw.close_code().await, Some(u64::from(reason.to_wire())));
    }
    let mut raw = Raw::open(&config).await;
    raw.send(&[proto::Ack { server_seq: 0 }.into()]).await;
    assert_eq!(
        raw.recv_all().await,
        [Frame::Close(proto::Close {
            reason: ReasonCode::UnexpectedFrame
        })]
    );

    assert_still_trades(&client, &mut events, &mut seen).await;
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn bad_logins_are_refused_with_their_reason() {
    let gateway = TestGateway::start(1, |_| {});
    let config = gateway.client_config(1, gateway.addr);
    let mut login = config
        .credentials
        .signed_login(&config.venue, CancelOnDisconnect::Off, Duration::ZERO)
        .expect("sign");
    login.api_key_id = 4242;
    let mut raw = Raw::open(&config).await;
    raw.send(&[login.into()]).await;
    assert_eq!(
        raw.recv_all().await,
        [Frame::LoginRejected(proto::LoginRejected {
            reason: ReasonCode::UnknownApiKey,
            retry_after_ms: 0
        })]
    );

    let mut tampered = config
        .credentials
        .signed_login(&config.venue, CancelOnDisconnect::Off, Duration::ZERO)
        .expect("sign");
    tampered.timestamp_ns += 1;
    let mut raw = Raw::open(&config).await;
    raw.send(&[tampered.into()]).await;
    assert_eq!(
        raw.recv_all().await,
        [Frame::LoginRejected(proto::LoginRejected {
            reason: ReasonCode::BadSignature,
            retry_after_ms: 0
        })]
    );
    assert_eq!(raw.close_code().await, Some(101));
    gateway.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sessions_log_in_concurrently() {
    // All from 127.0.0.1, like a firm behind one NAT logging everything in at once.
    const SESSIONS: u64 = 1_000;
    let gateway = TestGateway::start(10, |c| c.transport.max_handshaking_per_address = 1_000);
    // A thousand simultaneous handshakes on two cores take a while: no 1 s timeout.
    let patient = |account| {
        let mut config = gateway.client_config(account, gateway.addr);
        config.idle_timeout = Duration::from_secs(30);
        config.keep_alive = Duration::from_secs(10);
        config
    };
    // Clients on 20 sockets of 50 connections each, as 20 client processes would be.
    let endpoints: Vec<quinn::Endpoint> = (0..20)
        .map(|_| gateway_client::client_endpoint(&patient(1)).expect("endpoint"))
        .collect();
    let mut logins = tokio::task::JoinSet::new();
    for index in 0..SESSIONS {
        let config = patient(index % 10 + 1);
        let endpoint = endpoints[usize::try_from(index).expect("small") % endpoints.len()].clone();
        logins.spawn(async move {
            let link = gateway_client::open_on(endpoint, &config)
                .await
                .expect("connect");
            let mut raw = Raw::from_link(link);
            let login = config
                .credentials
                .signed_login(&config.venue, CancelOnDisconnect::Off, Duration::ZERO)
                .expect("sign");
            raw.send(&[login.into()]).await;
            // A thousand signature checks at once take a while on a busy machine:
            // this asserts that every login is answered, not how fast.
            match raw.recv_within(Duration::from_secs(60)).await {
                Some(Frame::LoginAccepted(accepted)) => (accepted.session_id, raw),
                other => panic!("login {index}: {other:?}"),
            }
        });
    }
    let mut sessions = HashSet::new();
    let mut connections = Vec::new();
    while let Some(result) = logins.join_next().await {
        let (session_id, raw) = result.expect("login task");
        assert!(sessions.insert(session_id), "session ids are unique");
        connections.push(raw);
    }
    assert_eq!(sessions.len() as u64, SESSIONS);
    assert_eq!(gateway.gateway.registry().len() as u64, SESSIONS);
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn an_address_over_its_failure_limit_is_told_rate_limited_and_its_resumes_still_work() {
    let gateway = TestGateway::start(1, |c| c.auth.failures_per_window = 5);
    let (client, mut events, mut seen) = connect(&gateway, 1).await;
    let mut config = gateway.client_config(1, gateway.addr);
    config.credentials = gateway_client::Credentials::from_seed(1_001, &[0x5a; 32]).expect("key");
    for _ in 0..5 {
        let login = config
            .credentials
            .signed_login(&config.venue, CancelOnDisconnect::Off, Duration::ZERO)
            .expect("sign");
        let mut raw = Raw::open(&config).await;
        raw.send(&[login.into()]).await;
        assert!(matches!(
            raw.recv_all().await.as_slice(),
            [Frame::LoginRejected(r)] if r.reason == ReasonCode::BadSignature
        ));
    }
    // Over the limit, even a correct login is answered in the protocol, with when to
    // come back: a client can tell this from a broken gateway.
    let good = gateway.client_config(1, gateway.addr);
    let login = good
        .credentials
        .signed_login(&good.venue, CancelOnDisconnect::Off, Duration::ZERO)
        .expect("sign");
    let mut raw = Raw::open(&good).await;
    raw.send(&[login.into()]).await;
    let answer = raw.recv_all().await;
    assert!(
        matches!(answer.as_slice(), [Frame::LoginRejected(r)]
            if r.reason == ReasonCode::RateLimited && r.retry_after_ms > 0),
        "{answer:?}"
    );
    assert_eq!(raw.close_code().await, Some(104));

    // The established session, from the same address, loses its connection and
    // resumes: resumes of live sessions are never refused for the address's failures.
    client.drop_connection();
    until(&mut events, &mut seen, |s| s.resumes == 1).await;
    assert_still_trades(&client, &mut events, &mut seen).await;
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn rotating_the_token_key_keeps_live_sessions_resumable_and_revocation_ends_them() {
    let gateway = TestGateway::start(2, |_| {});
    let (raw, old_key_token, _) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    raw.close();
    gateway
        .gateway
        .registry()
        .with_keys(|keys| keys.rotate(2, &[0x77; 32]))
        .expect("rotate");

    // A token minted under the old key still resumes; its successor uses the new key.
    let (resumed, answer) = raw_resume(&gateway, 1, old_key_token, 0).await;
    let Frame::ResumeAccepted(accepted) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(
        accepted.token.0[..4],
        2u32.to_le_bytes(),
        "new tokens use the new key"
    );
    resumed.close();
    // New logins get new-key tokens straight away.
    let (other, new_login_token, _) = raw_login(&gateway, 2, CancelOnDisconnect::Off, 0).await;
    assert_eq!(new_login_token.0[..4], 2u32.to_le_bytes());
    other.close();

    // Revocation ends the session, and its token with it.
    let (mut live, answer) = raw_resume(&gateway, 1, accepted.token, 0).await;
    let Frame::ResumeAccepted(latest) = answer else {
        panic!("{answer:?}")
    };
    let session_id = u64::from_le_bytes(latest.token.0[4..12].try_into().expect("8 bytes"));
    assert!(gateway.gateway.revoke(session_id).await.expect("revoked"));
    // The client never acknowledged anything, so each resume sent the login snapshot
    // again (as of 0) before the revocation's `Close`.
    assert!(matches!(
        live.recv_all().await.as_slice(),
        [
            Frame::SnapshotBegin(_),
            Frame::SnapshotEnd(_),
            Frame::Close(proto::Close {
                reason: ReasonCode::Revoked
            })
        ]
    ));
    assert_eq!(live.close_code().await, Some(405));
    let (_, after) = raw_resume(&gateway, 1, latest.token, 0).await;
    assert_eq!(
        after,
        Frame::ResumeRejected(proto::ResumeRejected {
            reason: ReasonCode::Revoked
        })
    );
    gateway.gateway.shutdown().await;
}

/// The next frame that `pick` accepts, skipping others.
async fn next_matching<T>(raw: &mut Raw, pick: impl Fn(&Frame) -> Option<T>) -> T {
    loop {
        let frame = raw.recv().await.expect("a frame");
        if let Some(found) = pick(&frame) {
            return found;
        }
    }
}

#[tokio::test]
async fn a_fill_after_logout_reaches_the_accounts_next_login() {
    let gateway = TestGateway::start(2, |_| {});
    let (mut maker, _, _) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    maker.send(&[new_order(1, Side::Sell, 100, 5)]).await;
    next_matching(&mut maker, |f| {
        matches!(f, Frame::OrderAck(_)).then_some(())
    })
    .await;
    maker.send(&[proto::Logout {}.into()]).await;
    next_matching(&mut maker, |f| matches!(f, Frame::Close(_)).then_some(())).await;

    // Account 2 trades against the order while account 1 has no session.
    let (mut taker, _, _) = raw_login(&gateway, 2, CancelOnDisconnect::Off, 0).await;
    taker.send(&[new_order(1, Side::Buy, 100, 5)]).await;
    let taker_fill = next_matching(&mut taker, |f| {
        if let Frame::Fill(fill) = f {
            Some(*fill)
        } else {
            None
        }
    })
    .await;

    let (mut later, _, snapshot) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    assert_eq!(
        snapshot
            .iter()
            .map(|o| (o.client_order_id, o.filled_quantity))
            .collect::<Vec<_>>(),
        vec![(1, 5)]
    );
    let Some(Frame::Fill(fill)) = later.recv().await else {
        panic!("the fill follows the snapshot");
    };
    assert_eq!(
        (
            fill.server_seq,
            fill.client_order_id,
            fill.trade_id,
            fill.price,
            fill.quantity
        ),
        (1, 1, taker_fill.trade_id, 100, 5)
    );
    gateway.gateway.shutdown().await;
}

// TLS resumption and 0-RTT resume.

/// Logs in on a new client endpoint, which keeps the TLS session tickets that follow
/// the handshake; returns the endpoint and the session token.
async fn login_keeping_tickets(
    config: &gateway_client::ClientConfig,
) -> (quinn::Endpoint, proto::SessionToken) {
    let endpoint = gateway_client::client_endpoint(config).expect("endpoint");
    let login = config
        .credentials
        .signed_login(&config.venue, CancelOnDisconnect::Off, Duration::ZERO)
        .expect("sign");
    let link = gateway_client::open_sending(endpoint.clone(), config, &login.into())
        .await
        .expect("connect");
    assert!(
        !link.early_data_accepted,
        "a first connection has no ticket"
    );
    let mut raw = Raw::from_link(link);
    let Some(Frame::LoginAccepted(accepted)) = raw.recv().await else {
        panic!("login refused");
    };
    read_snapshot(&mut raw).await;
    // The tickets come in the gateway's first flight after the handshake; give a slow
    // machine time to process them.
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.close();
    (endpoint, accepted.token)
}

/// Resumes on `endpoint`; returns the connection, whether the `Resume` went as 0-RTT
/// data, and the first answer.
async fn resume_on(
    endpoint: quinn::Endpoint,
    config: &gateway_client::ClientConfig,
    token: proto::SessionToken,
) -> (Raw, bool, Frame) {
    let resume = proto::Resume {
        token,
        last_acked_server_seq: 0,
        next_client_seq: 1,
    };
    let link = gateway_client::open_sending(endpoint, config, &resume.into())
        .await
        .expect("reconnect");
    let early = link.early_data_accepted;
    let mut raw = Raw::from_link(link);
    let answer = raw.recv().await.expect("an answer");
    (raw, early, answer)
}

/// Sends one order on a raw session and expects its `OrderAck`.
async fn assert_raw_session_trades(raw: &mut Raw, client_seq: u64) {
    raw.send(&[new_order(client_seq, Side::Buy, 90, 1)]).await;
    loop {
        match raw.recv().await {
            Some(Frame::OrderAck(ack)) => return assert_eq!(ack.client_seq, client_seq),
            Some(_) => {}
            None => panic!("no OrderAck"),
        }
    }
}

#[tokio::test]
async fn a_resume_rides_in_0rtt_data_and_falls_back_when_the_gateway_declines() {
    for (cache, expect_early) in [(16_384, true), (0, false)] {
        let gateway = TestGateway::start(1, |c| c.tls.resumption_cache = cache);
        let config = gateway.client_config(1, gateway.addr);
        let (endpoint, token) = login_keeping_tickets(&config).await;
        let (mut raw, early, answer) = resume_on(endpoint, &config, token).await;
        assert_eq!(early, expect_early, "resumption cache {cache}");
        assert!(matches!(answer, Frame::ResumeAccepted(_)), "{answer:?}");
        assert_raw_session_trades(&mut raw, 1).await;
        gateway.gateway.shutdown().await;
    }
}

/// A UDP forwarder for one client that keeps a copy of every datagram the client sent.
struct Recorder {
    addr: std::net::SocketAddr,
    sent: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(upstream: std::net::SocketAddr) -> Recorder {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        back.connect(upstream).await.expect("connect");
        let addr = front.local_addr().expect("address");
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = std::sync::Arc::clone(&sent);
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((len, from)) = front.recv_from(&mut up) => {
                        record.lock().expect("record").push(up[..len].to_vec());
                        client = Some(from);
                        let _ = back.send(&up[..len]).await;
                    }
                    Ok(len) = back.recv(&mut down) => {
                        if let Some(client) = client {
                            let _ = front.send_to(&down[..len], client).await;
                        }
                    }
                }
            }
        });
        Recorder { addr, sent, task }
    }

    /// How many datagrams the client has sent so far.
    fn mark(&self) -> usize {
        self.sent.lock().expect("record").len()
    }

    /// The datagrams sent since `mark` that carry QUIC Initial or 0-RTT packets: the
    /// first flight of a connection.
    fn first_flight_since(&self, mark: usize) -> Vec<Vec<u8>> {
        self.sent.lock().expect("record")[mark..]
            .iter()
            .filter(|datagram| {
                datagram
                    .first()
                    .is_some_and(|b| b & 0x80 != 0 && b & 0x20 == 0)
            })
            .cloned()
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_replayed_0rtt_resume_flight_changes_nothing() {
    let gateway = TestGateway::start(1, |_| {});
    let recorder = Recorder::start(gateway.addr).await;
    let config = gateway.client_config(1, recorder.addr);
    let (endpoint, token) = login_keeping_tickets(&config).await;
    let mark = recorder.mark();
    let (raw, early, answer) = resume_on(endpoint.clone(), &config, token).await;
    assert!(early, "the resume went as 0-RTT data");
    let Frame::ResumeAccepted(accepted) = answer else {
        panic!("resume refused: {answer:?}");
    };
    // Let the new tickets arrive, then leave; wait until the gateway has forgotten
    // the connection (a live one would swallow the replay as a duplicate).
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.close();
    tokio::time::timeout(WAIT, async {
        while gateway.gateway.connection_count() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway let the connection go");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // An attacker on the path replays the captured flight. Acted on, its `Resume`
    // (with a token since superseded) would end the session as stolen.
    let flight = recorder.first_flight_since(mark);
    assert!(!flight.is_empty(), "the first flight was captured");
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    for datagram in &flight {
        attacker
            .send_to(datagram, gateway.addr)
            .await
            .expect("replay");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The ticket was single use: the early data was discarded unread.
    assert_eq!(gateway.gateway.registry().stats().resumes, 1);
    assert_eq!(gateway.gateway.registry().len(), 1, "the session lives");
    let (mut raw, _, answer) = resume_on(endpoint, &config, accepted.token).await;
    assert!(matches!(answer, Frame::ResumeAccepted(_)), "{answer:?}");
    assert_raw_session_trades(&mut raw, 1).await;
    gateway.gateway.shutdown().await;
}

/// A connection whose client reads at most `window` bytes of the session stream and
/// then stops reading: the gateway's writer blocks on flow control.
async fn non_reading_link(
    gateway: &TestGateway,
    account: u64,
    window: u32,
) -> gateway_client::Link {
    let config = gateway.client_config(account, gateway.addr);
    let mut quic = gateway_client::quic_config(&config).expect("quic config");
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(window.into())
        .receive_window(quinn::VarInt::from_u32(window * 4))
        .keep_alive_interval(Some(Duration::from_millis(200)));
    quic.transport_config(std::sync::Arc::new(transport));
    let endpoint = gateway_client::endpoint_with(&config, quic).expect("endpoint");
    gateway_client::open_on(endpoint, &config)
        .await
        .expect("connect")
}

/// Waits until the gateway has `count` connections; false after 5 s.
async fn connections_settle_at(gateway: &TestGateway, count: usize) -> bool {
    for _ in 0..100 {
        if gateway.gateway.connection_count() == count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_taken_over_connection_closes_within_a_bound_even_if_its_client_stops_reading() {
    let gateway = TestGateway::start(1, |_| {});
    let config = gateway.client_config(1, gateway.addr);
    let mut stalled = non_reading_link(&gateway, 1, 1_024).await;
    let login = config
        .credentials
        .signed_login(&config.venue, CancelOnDisconnect::Off, Duration::ZERO)
        .expect("sign");
    let mut token = None;
    let mut buf = bytes::BytesMut::new();
    stalled
        .send
        .write_all(&Frame::from(login).to_bytes())
        .await
        .expect("send");
    while token.is_none() {
        let chunk = stalled
            .recv
            .read_chunk(256, true)
            .await
            .expect("read")
            .expect("open");
        buf.extend_from_slice(&chunk.bytes);
        if let Ok(Some(Frame::LoginAccepted(accepted))) = proto::decode_buf(&mut buf) {
            token = Some(accepted.token);
        }
    }
    // Two hundred answers (about 11 kB) against a 1 kB window: the writer blocks.
    let orders: Vec<u8> = (1..=200)
        .flat_map(|seq| new_order(seq, Side::Buy, 90, 1).to_bytes())
        .collect();
    stalled.send.write_all(&orders).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gateway.gateway.connection_count(), 1);

    // Resumes on fresh connections, again and again: each takes the session over,
    // and the stalled connections must not pile up.
    let mut token = token.expect("token");
    for _ in 0..3 {
        let (resumed, answer) = raw_resume(&gateway, 1, token, 0).await;
        let Frame::ResumeAccepted(accepted) = answer else {
            panic!("{answer:?}")
        };
        token = accepted.token;
        drop(resumed);
    }
    assert!(
        connections_settle_at(&gateway, 1).await,
        "taken-over connections closed; {} open",
        gateway.gateway.connection_count()
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), stalled.connection.closed()).await;
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::ApplicationClosed(ref c)) if c.error_code.into_inner() == 401),
        "{closed:?}"
    );
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn connections_that_never_log_in_are_capped_per_address_and_time_out_with_a_reason() {
    let gateway = TestGateway::start(1, |c| {
        c.transport.max_handshaking_per_address = 2;
        c.transport.handshake_timeout_ms = 500;
    });
    let config = gateway.client_config(1, gateway.addr);
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::open(&config).await;
        // Half a header: the stream exists at the gateway, but no frame arrives.
        raw.send_bytes(&[0x65, 0x00]).await;
        silent.push(raw);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        gateway_client::open(&config).await.is_err(),
        "a third connection from the address is refused while two handshake"
    );
    for raw in &mut silent {
        assert_eq!(
            raw.recv_all().await,
            [Frame::Close(proto::Close {
                reason: ReasonCode::HandshakeTimeout
            })]
        );
        assert_eq!(raw.close_code().await, Some(7));
    }
    // Their slots are free again.
    let (client, mut events, mut seen) = connect(&gateway, 1).await;
    assert_still_trades(&client, &mut events, &mut seen).await;
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn under_load_unvalidated_addresses_are_retried_and_still_log_in() {
    // From one connection handshaking on, new addresses must validate (QUIC Retry).
    let gateway = TestGateway::start(1, |c| c.transport.max_handshaking = 2);
    let config = gateway.client_config(1, gateway.addr);
    let mut idle = Raw::open(&config).await;
    idle.send_bytes(&[0x65]).await;
    let (client, mut events, mut seen) = connect(&gateway, 1).await;
    assert_still_trades(&client, &mut events, &mut seen).await;
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn the_last_connection_slots_are_kept_for_resumes() {
    let gateway = TestGateway::start(3, |c| {
        c.transport.max_connections = 3;
        c.transport.resume_reserved_connections = 1;
    });
    let (first, mut first_events, mut first_seen) = connect(&gateway, 1).await;
    let (_second, _second_events, _) = connect(&gateway, 2).await;
    let refused = Client::connect(gateway.client_config(3, gateway.addr)).await;
    assert!(
        matches!(
            refused,
            Err(gateway_client::ClientError::Refused(
                ReasonCode::TooManySessions
            ))
        ),
        "a login may not take the reserved slot"
    );
    first.drop_connection();
    until(&mut first_events, &mut first_seen, |s| s.resumes == 1).await;
    assert_still_trades(&first, &mut first_events, &mut first_seen).await;
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn a_second_stream_is_refused_with_unexpected_frame() {
    let gateway = TestGateway::start(1, |_| {});
    let (raw, _, _) = raw_login(&gateway, 1, CancelOnDisconnect::Off, 0).await;
    let (mut send, mut recv) = raw.connection().open_bi().await.expect("open");
    send.write_all(&[0x00, 0x00, 0x04, 0x01])
        .await
        .expect("write");
    let read = tokio::time::timeout(Duration::from_secs(5), recv.read_chunk(64, true)).await;
    assert!(
        matches!(read, Ok(Err(quinn::ReadError::Reset(code))) if code.into_inner() == 5),
        "{read:?}"
    );
    gateway.gateway.shutdown().await;
}

#[tokio::test]
async fn shutdown_runs_cancel_on_disconnect_and_says_so_before_closing() {
    let gateway = TestGateway::start(1, |_| {});
    let (mut raw, _, _) = raw_login(&gateway, 1, CancelOnDisconnect::CancelAll, 1_000).await;
    raw.send(&[new_order(1, Side::Buy, 90, 1)]).await;
    assert!(matches!(raw.recv().await, Some(Frame::OrderAck(_))));
    gateway.gateway.shutdown().await;
    let rest = raw.recv_all().await;
    assert!(
        matches!(rest.as_slice(), [Frame::Cancelled(c), Frame::Close(close)]
            if c.reason == CancelReason::SessionEnded && close.reason == ReasonCode::ShuttingDown),
        "{rest:?}"
    );
}

#[tokio::test]
async fn a_burst_larger_than_the_replay_window_gets_every_answer_without_a_reconnect() {
    // 10,000 orders that each trade yield 20,000 answers: more than a session
    // retains. The taker acknowledges only every 100 ms, so taking the whole burst at
    // once would overflow its ring long before the first ack.
    const ORDERS: usize = 10_000;
    let gateway = TestGateway::start(2, |_| {});
    let (maker, mut maker_events, mut maker_seen) = connect(&gateway, 1).await;
    maker
        .new_order(OrderParams::limit_sell(1, 1, 100, ORDERS as u64))
        .expect("send");
    until(&mut maker_events, &mut maker_seen, |s| {
        s.acked_client_seqs() == [1]
    })
    .await;

    let mut config = gateway.client_config(2, gateway.addr);
    config.ack_interval = Duration::from_millis(100);
    let (taker, mut taker_events) = Client::connect(config).await.expect("login");
    let mut taker_seen = Seen::default();
    for id in 1..=ORDERS as u64 {
        taker
            .new_order(OrderParams::limit_buy(1, id, 100, 1))
            .expect("send");
    }
    until(&mut taker_events, &mut taker_seen, |s| {
        s.fills().len() == ORDERS
    })
    .await;
    assert_eq!(taker_seen.resumes, 0, "the connection was never cut");
    assert_eq!(taker_seen.snapshots.len(), 1, "only the login snapshot");
    taker_seen.assert_gap_free();
    let answered: HashSet<u64> = taker_seen.acked_client_seqs().into_iter().collect();
    assert_eq!(answered.len(), ORDERS, "every order answered once");
    until(&mut maker_events, &mut maker_seen, |s| {
        s.fills().len() == ORDERS
    })
    .await;
}

/// The value of the metric line starting with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(prefix) && line[prefix.len()..].starts_with(' '))
        .and_then(|line| line[prefix.len()..].trim().parse().ok())
}

#[tokio::test]
async fn metrics_count_a_login_and_an_order_and_health_answers() {
    let gateway = TestGateway::start(1, |_| {});
    let (client, mut events, mut seen) = connect(&gateway, 1).await;
    assert_still_trades(&client, &mut events, &mut seen).await;

    let (status, text) = http(&gateway, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    for (name, value) in [
        ("gateway_logins_total{outcome=\"accepted\"}", 1.0),
        ("gateway_orders_total", 1.0),
        ("gateway_order_acks_total", 1.0),
        ("gateway_sessions{state=\"attached\"}", 1.0),
        ("gateway_sessions{state=\"detached\"}", 0.0),
        ("gateway_connections", 1.0),
    ] {
        assert_eq!(metric(&text, name), Some(value), "{name} in\n{text}");
    }
    assert!(
        metric(&text, "process_cpu_seconds_total").is_some(),
        "{text}"
    );
    assert!(metric(&text, "process_resident_memory_bytes").is_some_and(|rss| rss > 0.0));
    assert!(text.contains("gateway_order_ack_latency_seconds_bucket"));
    assert!(
        !text.contains("# EOF"),
        "the Prometheus text format unless OpenMetrics is asked for"
    );
    assert_eq!(http(&gateway, "GET", "/healthz", None).await.0, 200);
    assert_eq!(
        http(&gateway, "GET", "/readyz", None).await,
        (200, "ready\n".into())
    );
}

#[tokio::test]
async fn the_admin_api_needs_its_token_revokes_a_live_session_and_drains() {
    let gateway = TestGateway::start(2, |_| {});
    let (client, mut events, mut seen) = connect(&gateway, 1).await;
    assert_still_trades(&client, &mut events, &mut seen).await;
    let session = client.session_id().expect("logged in");

    assert_eq!(http(&gateway, "GET", "/admin/sessions", None).await.0, 401);
    assert_eq!(
        http(&gateway, "GET", "/admin/sessions", Some("wrong"))
            .await
            .0,
        401
    );
    let (status, list) = http(&gateway, "GET", "/admin/sessions", Some(e2e::ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    assert!(list.contains(&format!("\"session\":{session}")), "{list}");

    let path = format!("/admin/revoke?session={session}");
    let (status, body) = http(&gateway, "POST", &path, Some(e2e::ADMIN_TOKEN)).await;
    assert_eq!(
        (status, body),
        (200, format!("{{\"sessions\":[{session}]}}"))
    );
    until(&mut events, &mut seen, |s| s.ended.is_some()).await;
    assert_eq!(seen.ended, Some(ReasonCode::Revoked));
    let (status, _) = http(&gateway, "POST", &path, Some(e2e::ADMIN_TOKEN)).await;
    assert_eq!(status, 404, "already ended");

    let (status, _) = http(&gateway, "POST", "/admin/drain", Some(e2e::ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(http(&gateway, "GET", "/readyz", None).await.0, 503);
    let refused = Client::connect(gateway.client_config(2, gateway.addr)).await;
    assert!(
        matches!(
            refused,
            Err(gateway_client::ClientError::Refused(
                ReasonCode::ShuttingDown
            ))
        ),
        "{:?}",
        refused.err()
    );
}

/// Sends `request` to the admin listener at `addr` from `from` and reads the answer
/// until the listener closes the connection.
async fn raw_http(from: &str, addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(from.parse().expect("address")).expect("bind");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer));
    read.await.expect("answered").expect("read");
    answer
}

#[tokio::test]
async fn one_peer_holding_half_sent_requests_cannot_take_the_admin_listener_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gateway = TestGateway::start(1, |config| {
        config.admin.max_connections_per_address = 4;
        config.admin.header_timeout_ms = 300;
    });
    let addr = gateway.gateway.admin_addr().expect("admin listener on");
    // One peer (from a loopback address of its own) opens connections and sends
    // half a request line on each.
    let mut held = Vec::new();
    for _ in 0..12 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("address"))
            .expect("bind");
        let mut stream = socket.connect(addr).await.expect("connect");
        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHo").await;
        held.push(stream);
    }
    // A health check from elsewhere is answered all the while.
    let health = raw_http(
        "127.0.0.1:0",
        addr,
        "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(health.await.starts_with("HTTP/1.1 200"));
    // Beyond its share its connections are closed at once, the rest when the
    // header timeout passes: none is left holding a descriptor.
    for (nth, stream) in held.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "connection {nth} still open: {read:?}"
        );
    }
}

#[tokio::test]
async fn metrics_come_in_the_format_the_scraper_asks_for() {
    let gateway = TestGateway::start(1, |_| {});
    let addr = gateway.gateway.admin_addr().expect("admin listener on");
    let scrape = |accept: &str| {
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        );
        async move { raw_http("127.0.0.1:0", addr, &request).await }
    };
    let text = scrape("text/plain;version=0.0.4").await;
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    assert!(
        text.contains("\n# TYPE gateway_orders_total counter\n"),
        "{text}"
    );
    assert!(!text.contains("# EOF"));
    let open = scrape("application/openmetrics-text;version=1.0.0,text/plain;q=0.5").await;
    assert!(open.contains("application/openmetrics-text"), "{open}");
    assert!(open.contains("\n# TYPE gateway_orders counter\n"), "{open}");
    assert!(open.trim_end().ends_with("# EOF"), "{open}");
}

#[tokio::test]
async fn the_admin_listener_answers_only_hosts_that_name_it() {
    let gateway = TestGateway::start(1, |config| {
        config.admin.allowed_hosts = vec!["metrics.venue.example".into()];
    });
    let addr = gateway.gateway.admin_addr().expect("admin listener on");
    let get = |host: String| {
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        async move { raw_http("127.0.0.1:0", addr, &request).await }
    };
    let port = addr.port();
    // A page on another site that rebinds its name to this address is refused.
    let rebound = get(format!("attacker.example:{port}")).await;
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    assert!(rebound.contains("admin.allowed_hosts"), "{rebound}");
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "METRICS.venue.example".to_string(),
        format!("[::1]:{port}"),
    ] {
        let answer = get(host.clone()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
}

#[test]
fn the_admin_command_line_refuses_to_send_its_token_in_the_clear_beyond_this_host() {
    // Refused before anything is sent: no packet leaves for the address.
    let output = std::process::Command::new(e2e::gateway_binary())
        .args(["admin", "--address", "192.0.2.7:9433", "sessions"])
        .output()
        .expect("gateway admin runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--insecure-plain-http"), "{stderr}");
}

#[tokio::test]
async fn the_admin_command_line_revokes_a_live_session() {
    let gateway = TestGateway::start(1, |_| {});
    let (client, mut events, mut seen) = connect(&gateway, 1).await;
    assert_still_trades(&client, &mut events, &mut seen).await;
    let session = client.session_id().expect("logged in");

    let dir = std::env::temp_dir().join(format!("gateway-admin-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, e2e::ADMIN_TOKEN).expect("token file");
    let address = gateway.gateway.admin_addr().expect("admin listener on");
    let token_setting = format!("admin.token_file={:?}", token_file.display().to_string());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(e2e::gateway_binary())
            .args(["--set", &token_setting, "admin", "--address"])
            .arg(address.to_string())
            .args(["revoke", "--session", &session.to_string()])
            .output()
    })
    .await
    .expect("command task")
    .expect("gateway admin runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("{{\"sessions\":[{session}]}}")
    );
    until(&mut events, &mut seen, |s| s.ended.is_some()).await;
    assert_eq!(seen.ended, Some(ReasonCode::Revoked));
}

#[tokio::test]
async fn the_engine_on_its_own_thread_answers_every_request_and_fills_both_sides() {
    // Inline is the default; the thread mode serves engines that may block.
    let gateway = TestGateway::start(2, |c| {
        c.engine.mode = gateway::config::EngineMode::Thread;
    });
    let (seller, mut seller_events, mut seller_seen) = connect(&gateway, 1).await;
    let (buyer, mut buyer_events, mut buyer_seen) = connect(&gateway, 2).await;
    for id in 1..=50 {
        seller
            .new_order(OrderParams::limit_sell(1, id, 100, 1))
            .expect("send");
        buyer
            .new_order(OrderParams::limit_buy(1, id, 100, 1))
            .expect("send");
    }
    until(&mut seller_events, &mut seller_seen, |s| {
        s.fills().len() == 50
    })
    .await;
    until(&mut buyer_events, &mut buyer_seen, |s| {
        s.fills().len() == 50
    })
    .await;
    seller_seen.assert_gap_free();
    buyer_seen.assert_gap_free();
}

#[tokio::test]
async fn the_kill_switch_cancels_every_working_order_of_the_account_and_ends_its_sessions() {
    let gateway = TestGateway::start(2, |_| {});
    // Cancel-on-disconnect off: only the kill switch cancels these.
    let (client, mut events, mut seen) = connect(&gateway, 1).await;
    for id in 1..=3 {
        client
            .new_order(OrderParams::limit_sell(1, id, 200 + id as i64, 1))
            .expect("send");
    }
    until(&mut events, &mut seen, |s| s.acked_client_seqs().len() == 3).await;
    let (bystander, mut bystander_events, mut bystander_seen) = connect(&gateway, 2).await;
    assert_still_trades(&bystander, &mut bystander_events, &mut bystander_seen).await;

    // An account the gateway does not know is an error, not a silent success.
    let (status, body) = http(
        &gateway,
        "POST",
        "/admin/kill-switch?account=99",
        Some(e2e::ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no account 99"), "{body}");

    let session = client.session_id().expect("logged in");
    let (status, body) = http(
        &gateway,
        "POST",
        "/admin/kill-switch?account=1",
        Some(e2e::ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, format!("{{\"sessions\":[{session}]}}"))
    );
    until(&mut events, &mut seen, |s| s.ended.is_some()).await;
    assert_eq!(seen.ended, Some(ReasonCode::Revoked));
    let cancelled = seen
        .messages
        .iter()
        .filter(|f| matches!(f, Frame::Cancelled(c) if c.reason == CancelReason::KillSwitch))
        .count();
    assert_eq!(
        cancelled, 3,
        "the session's stream carried its cancels, as the kill switch's, before Close"
    );

    // The account's next login sees no working order; the other account carries on.
    let (_later, mut later_events) = Client::connect(gateway.client_config(1, gateway.addr))
        .await
        .expect("login");
    let mut later_seen = Seen::default();
    until(&mut later_events, &mut later_seen, |s| {
        !s.snapshots.is_empty()
    })
    .await;
    let working = later_seen.snapshots[0]
        .1
        .iter()
        .filter(|order| order.leaves_quantity > 0)
        .count();
    assert_eq!(working, 0, "{:?}", later_seen.snapshots[0].1);
    assert!(bystander_seen.ended.is_none());
    bystander
        .new_order(OrderParams::limit_buy(1, 2, 100, 1))
        .expect("the other account still trades");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_config_made_with_the_key_commands_writes_no_file_and_trades() {
    let dir = std::env::temp_dir().join(format!("gateway-keys-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let run = |args: &[&str]| {
        std::process::Command::new(e2e::gateway_binary())
            .current_dir(&dir)
            .args(args)
            .output()
            .expect("gateway runs")
    };
    let account = run(&[
        "keys",
        "new-account",
        "--account",
        "7",
        "--out",
        "firm.toml",
    ]);
    assert!(account.status.success(), "{account:?}");
    std::fs::write(dir.join("accounts.toml"), &account.stdout).expect("accounts file");
    for (what, file) in [
        ("token-key", "token-key.hex"),
        ("admin-token", "admin-token"),
    ] {
        assert!(run(&["keys", what, "--out", file]).status.success());
        let again = run(&["keys", what, "--out", file]);
        assert!(!again.status.success(), "{what} overwritten");
    }
    #[cfg(unix)]
    for file in ["firm.toml", "token-key.hex", "admin-token"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(file))
            .expect("made")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }

    // The venue's certificate (a real one comes from its CA; see README).
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).expect("key");

    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("a free port")
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    // DEPLOYMENT.md "A production configuration", on loopback; dev_dir cannot be
    // written (not even by root), so any file the gateway would generate fails.
    let config = DEPLOYMENT
        .split("```toml\n# /etc/session-gateway/gateway.toml")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("DEPLOYMENT.md shows the production configuration")
        .replace("/etc/session-gateway/", &format!("{}/", dir.display()))
        .replace("0.0.0.0:4433", &addr.to_string());
    std::fs::write(dir.join("gateway.toml"), config).expect("config");
    let mut gateway = std::process::Command::new(e2e::gateway_binary())
        .current_dir(&dir)
        .args([
            "--config",
            "gateway.toml",
            "--set",
            "dev_dir=\"/dev/null/gateway-dev\"",
        ])
        .args(["--set", "admin.listen=\"127.0.0.1:0\""])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the gateway starts");
    let mut keys = gateway_client::Credentials::load_dev_keys(&dir.join("firm.toml"))
        .expect("the firm's key file loads");
    let (account, credentials) = keys.pop().expect("one key");
    assert_eq!(account, 7);
    let connected = async {
        loop {
            let config = gateway_client::ClientConfig::new(
                addr,
                "localhost",
                "XMPL-PROD",
                certified.cert.der().clone(),
                credentials.clone(),
            );
            if let Ok(connected) = Client::connect(config).await {
                return connected;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (client, mut events) = tokio::time::timeout(Duration::from_secs(20), connected)
        .await
        .expect("logged in with the generated key");
    client
        .new_order(OrderParams::limit_buy(1, 1, 100, 1))
        .expect("send");
    let acked = e2e::next_frame(&mut events, Duration::from_secs(10), |f| {
        matches!(f, Frame::OrderAck(_))
    })
    .await;
    assert!(matches!(acked, Frame::OrderAck(_)));

    // A certificate rotation: new files, SIGHUP. The session carries on; new
    // connections get the new certificate.
    let next =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    std::fs::write(dir.join("cert.pem"), next.cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), next.signing_key.serialize_pem()).expect("key");
    let hangup = std::process::Command::new("kill")
        .args(["-HUP", &gateway.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(hangup.success());
    let rotated = async {
        loop {
            let config = gateway_client::ClientConfig::new(
                addr,
                "localhost",
                "XMPL-PROD",
                next.cert.der().clone(),
                credentials.clone(),
            );
            if Client::connect(config).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), rotated)
        .await
        .expect("the new certificate serves after SIGHUP");
    client
        .new_order(OrderParams::limit_buy(1, 2, 100, 1))
        .expect("send");
    let again = e2e::next_frame(&mut events, Duration::from_secs(10), |f| {
        matches!(f, Frame::OrderAck(_))
    })
    .await;
    assert!(matches!(again, Frame::OrderAck(a) if a.client_order_id == 2));
    let _ = gateway.kill();
    let output = gateway.wait_with_output().expect("stopped");
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!log.contains("development"), "{log}");
}

const DEPLOYMENT: &str = include_str!("../../DEPLOYMENT.md");

#[tokio::test]
async fn a_certificate_reload_serves_new_connections_and_keeps_open_sessions() {
    let dir = std::env::temp_dir().join(format!("gateway-reload-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    // The gateway starts with the test certificate; the files hold the next one.
    let next =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    std::fs::write(&cert_path, next.cert.pem()).expect("cert");
    std::fs::write(&key_path, next.signing_key.serialize_pem()).expect("key");
    let gateway = TestGateway::start(2, |config| {
        config.tls.cert = Some(cert_path.clone());
        config.tls.key = Some(key_path.clone());
    });
    let (client, mut events, mut seen) = connect(&gateway, 1).await;

    let (status, body) = http(
        &gateway,
        "POST",
        "/admin/reload-tls",
        Some(e2e::ADMIN_TOKEN),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "{\"reloaded\":true}"));
    // The open session carries on, on its connection.
    assert_still_trades(&client, &mut events, &mut seen).await;
    assert_eq!((seen.resumes, seen.ended), (0, None), "not cut");
    // New connections get the new certificate: a client pinning the old one is
    // refused, one pinning the new one logs in.
    let old = Client::connect(gateway.client_config(2, gateway.addr)).await;
    assert!(old.is_err(), "the old certificate still served");
    let mut config = gateway.client_config(2, gateway.addr);
    config.trusted_certs = vec![next.cert.der().clone()];
    Client::connect(config)
        .await
        .expect("the new certificate serves");

    // A broken file leaves the serving certificate in place, with the reason.
    std::fs::write(&cert_path, "not a certificate").expect("write");
    let (status, body) = http(
        &gateway,
        "POST",
        "/admin/reload-tls",
        Some(e2e::ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("tls.cert"), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_login_signed_for_another_venue_says_which_venue_and_key_it_signed_for() {
    let gateway = TestGateway::start(1, |_| {});
    let mut config = gateway.client_config(1, gateway.addr);
    config.venue = "XMPL-PROD".into();
    let refused = Client::connect(config).await.err().expect("refused");
    assert!(
        matches!(&refused, gateway_client::ClientError::BadSignature { api_key_id: 1001, venue } if venue == "XMPL-PROD"),
        "{refused:?}"
    );
    let said = refused.to_string();
    assert!(
        said.contains("\"XMPL-PROD\"") && said.contains("auth.venue"),
        "{said}"
    );
}
