//! Deterministic scenarios for the session core, one per promise it keeps, fed
//! through `Core::apply` as the gateway's log feeds it (see `support`).

mod support;

use std::time::Duration;

use gateway_core::input::{Outcome, Record};
use gateway_core::registry::{lock, RegistryLimits};
use gateway_core::ring::RingLimits;
use gateway_core::session::SessionConfig;
use gateway_core::token::TokenKeyRing;
use proto::{CancelReason, Frame, OrderStatus, ReasonCode, Side};
use support::*;

fn sim() -> Sim {
    Sim::new(SessionConfig::default())
}

/// A login straight on the registry (no simulated client); returns the session id.
fn try_login(
    sim: &mut Sim,
    account: u64,
    account_limit: Option<usize>,
    cod: gateway_core::session::CodPolicy,
) -> Result<u64, ReasonCode> {
    let conn = sim.new_conn();
    let entropy = sim.entropy();
    sim.registry()
        .login(
            account,
            account_limit,
            cod,
            conn,
            &[],
            IDLE_TIMEOUT,
            (sim.now, &entropy),
            &mut Vec::new(),
        )
        .map(|new| new.session_id)
}

/// A limit buy of 1 at 90 (below the book), with client sequence and order id `seq`.
fn buy_one_at_90(seq: u64) -> proto::NewOrder {
    proto::NewOrder {
        client_seq: seq,
        client_order_id: seq,
        instrument_id: INSTRUMENT,
        side: Side::Buy,
        order_type: proto::OrderType::Limit,
        time_in_force: proto::TimeInForce::Gtc,
        price: 90,
        quantity: 1,
    }
}

fn fills(client: &Client) -> Vec<proto::Fill> {
    client
        .received
        .iter()
        .filter_map(|f| match f {
            Frame::Fill(fill) => Some(*fill),
            _ => None,
        })
        .collect()
}

#[test]
fn login_answers_with_the_token_then_an_account_snapshot() {
    let mut sim = sim();
    let client = sim.login(7, NO_COD);
    assert!(
        matches!(client.control[0], Frame::LoginAccepted(a) if a.next_client_seq == 1 && a.next_server_seq == 1)
    );
    assert_eq!(client.snapshot, Some((0, Vec::new())));
}

#[test]
fn an_order_is_acknowledged_and_fills_reach_both_sides() {
    let mut sim = sim();
    let mut seller = sim.login(1, NO_COD);
    let mut buyer = sim.login(2, NO_COD);
    seller.new_order(10, Side::Sell, 100, 5);
    sim.settle(&mut seller);
    buyer.new_order(20, Side::Buy, 100, 5);
    sim.settle(&mut buyer);
    sim.settle(&mut seller);

    assert!(
        matches!(buyer.received[0], Frame::OrderAck(a) if a.client_seq == 1 && a.client_order_id == 20)
    );
    let (buy_fill, sell_fill) = (fills(&buyer), fills(&seller));
    assert_eq!((buy_fill.len(), sell_fill.len()), (1, 1));
    assert_eq!(buy_fill[0].trade_id, sell_fill[0].trade_id);
    assert_eq!(
        (
            sell_fill[0].server_seq,
            sell_fill[0].quantity,
            sell_fill[0].leaves_quantity
        ),
        (2, 5, 0)
    );
}

#[test]
fn a_login_snapshot_lists_the_accounts_working_orders() {
    let mut sim = sim();
    let mut first = sim.login(1, NO_COD);
    first.new_order(10, Side::Buy, 99, 3);
    sim.settle(&mut first);
    let second = sim.login(1, NO_COD);
    let (as_of, orders) = second.snapshot.expect("snapshot");
    assert_eq!(as_of, 0);
    assert_eq!(orders.len(), 1);
    assert_eq!(
        (orders[0].client_order_id, orders[0].status),
        (10, OrderStatus::New)
    );
}

#[test]
fn a_lost_ack_only_means_a_longer_replay() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    for id in 1..=3 {
        client.new_order(id, Side::Buy, 90, 1);
    }
    sim.settle(&mut client);
    assert_eq!(client.last_server_seq, 3);
    client.ack();
    // The ack never arrives: the connection dies with it in flight.
    sim.drop_connection(&mut client);
    assert_eq!(
        lock(&sim.session(&client)).ring().len(),
        3,
        "nothing was released"
    );

    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client);
    assert_eq!(
        client.received.len(),
        3,
        "nothing replayed twice: the resume carried the ack"
    );
    assert_eq!(
        lock(&sim.session(&client)).ring().len(),
        0,
        "the resume's ack released everything"
    );
}

#[test]
fn orders_in_flight_when_the_connection_dies_execute_exactly_once() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    for id in 1..=4 {
        client.new_order(id, Side::Buy, 90, 1);
    }
    sim.deliver_to_gateway(&mut client, 2); // seq 1 and 2 arrive, 3 and 4 are lost
    sim.transmit(&mut client, usize::MAX); // acks for 1 and 2 are sent but lost too
    sim.drop_connection(&mut client);

    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client);
    let resumed = client.control.iter().find_map(|f| match f {
        Frame::ResumeAccepted(r) => Some(*r),
        _ => None,
    });
    assert_eq!(
        resumed.map(|r| (r.last_processed_client_seq, r.replay_from)),
        Some((2, 1))
    );
    for seq in 1..=4 {
        assert_eq!(
            times_executed(&sim, client.session_id, seq),
            1,
            "client seq {seq}"
        );
    }
    let acked: Vec<u64> = client
        .received
        .iter()
        .map(|f| match f {
            Frame::OrderAck(a) => a.client_seq,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(acked, [1, 2, 3, 4]);
    assert!(client.unanswered().is_empty());
}

#[test]
fn fills_while_detached_are_replayed_in_order_on_resume() {
    let mut sim = sim();
    let mut resting = sim.login(1, NO_COD);
    resting.new_order(10, Side::Sell, 100, 4);
    sim.settle(&mut resting);
    sim.drop_connection(&mut resting);

    let mut taker = sim.login(2, NO_COD);
    for id in 1..=4 {
        taker.new_order(id, Side::Buy, 100, 1);
    }
    sim.settle(&mut taker);

    sim.resume(&mut resting).expect("resume");
    sim.settle(&mut resting);
    let leaves: Vec<u64> = fills(&resting).iter().map(|f| f.leaves_quantity).collect();
    assert_eq!(leaves, [3, 2, 1, 0]);
    assert_eq!(resting.last_server_seq, 5);
}

#[test]
fn a_resume_older_than_the_window_gets_the_gap_and_a_snapshot() {
    let config = SessionConfig {
        ring: RingLimits {
            max_messages: 4,
            max_bytes: 1 << 20,
        },
        ..SessionConfig::default()
    };
    let mut sim = Sim::new(config);
    let mut client = sim.login(1, NO_COD);
    for (id, price) in [(10, 100), (11, 105)] {
        client.new_order(id, Side::Sell, price, 10);
        sim.settle(&mut client);
        client.ack(); // room in its small ring for the next answer
    }
    sim.settle(&mut client);
    sim.drop_connection(&mut client);

    let mut taker = sim.login(2, NO_COD);
    for id in 1..=6 {
        taker.new_order(id, Side::Buy, 100, 1);
        sim.settle(&mut taker);
        taker.ack(); // the taker keeps up, so its own small ring never overflows
    }

    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client);
    let resumed = client
        .control
        .iter()
        .find_map(|f| match f {
            Frame::ResumeAccepted(r) => Some(*r),
            _ => None,
        })
        .expect("ResumeAccepted");
    assert!(resumed.snapshot_follows);
    assert_eq!((resumed.replay_from, resumed.oldest_available), (9, 5));
    let (as_of, orders) = client.snapshot.clone().expect("snapshot");
    assert_eq!(as_of, 8);
    let states: Vec<(u64, u64, u64)> = orders
        .iter()
        .map(|o| (o.client_order_id, o.filled_quantity, o.leaves_quantity))
        .collect();
    assert_eq!(states, [(10, 6, 4), (11, 0, 10)]);

    // Live traffic continues right after the snapshot.
    taker.new_order(7, Side::Buy, 100, 1);
    sim.settle(&mut taker);
    assert!(taker.conn.is_some(), "the taker was never cut off");
    sim.settle(&mut client);
    assert!(
        matches!(client.received.last(), Some(Frame::Fill(f)) if f.server_seq == 9 && f.leaves_quantity == 3)
    );
    assert!(
        client.conn.is_some(),
        "messages covered by the snapshot do not count against the window"
    );
}

#[test]
fn a_duplicate_client_sequence_is_answered_and_never_executed_again() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    client.new_order(1, Side::Buy, 90, 1);
    sim.settle(&mut client);
    let replayed = client
        .outbox
        .get(&1)
        .copied()
        .unwrap_or(Frame::NewOrder(buy_one_at_90(1)));
    let conn = client.conn.expect("attached");
    assert!(
        !lock(&sim.session(&client)).has_output_for(conn),
        "all sent"
    );
    client.to_gateway.push_back(replayed);
    sim.deliver_to_gateway(&mut client, 1);
    assert!(
        lock(&sim.session(&client)).has_output_for(conn),
        "the Duplicate answer waits for the writer"
    );
    sim.settle(&mut client);
    assert_eq!(times_executed(&sim, client.session_id, 1), 1);
    assert!(client.control.iter().any(|f| matches!(f, Frame::Duplicate(d) if d.client_seq == 1 && d.last_processed_client_seq == 1)));
    assert_eq!(client.received.len(), 1);
}

#[test]
fn a_client_sequence_gap_closes_the_connection_but_keeps_the_session() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    client.new_order(1, Side::Buy, 90, 1);
    client.to_gateway.clear(); // seq 1 lost on the way
    client.new_order(2, Side::Buy, 90, 1);
    let conn = client.conn.expect("attached");
    sim.deliver_to_gateway(&mut client, 1);
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::ClientSeqGap));
    assert_eq!(times_executed(&sim, client.session_id, 2), 0);

    sim.drop_connection(&mut client);
    sim.resume(&mut client).expect("the session survived");
    sim.settle(&mut client);
    assert_eq!(
        (
            times_executed(&sim, client.session_id, 1),
            times_executed(&sim, client.session_id, 2)
        ),
        (1, 1)
    );
}

#[test]
fn forged_tampered_and_foreign_tokens_are_rejected() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    let token = client.token.expect("token");
    sim.drop_connection(&mut client);

    let mut tampered = token;
    tampered.0[60] ^= 1;
    assert_eq!(
        sim.resume_with(&mut client, tampered),
        Err(ReasonCode::TokenForged)
    );
    let mut other_session = token;
    other_session.0[4] ^= 1;
    assert_eq!(
        sim.resume_with(&mut client, other_session),
        Err(ReasonCode::TokenForged)
    );
    let session_id = client.session_id;
    let mint_with = |key_id, secret: [u8; 32]| {
        TokenKeyRing::new(key_id, &secret).expect("key").mint(
            session_id,
            1,
            0,
            START.plus(Duration::from_secs(60)),
            &[3; 16],
        )
    };
    let foreign = mint_with(9, [1u8; 32]);
    assert_eq!(
        sim.resume_with(&mut client, foreign),
        Err(ReasonCode::TokenUnknownKey)
    );
    let same_id_other_key = mint_with(1, [1u8; 32]);
    assert_eq!(
        sim.resume_with(&mut client, same_id_other_key),
        Err(ReasonCode::TokenForged)
    );
    sim.resume(&mut client)
        .expect("the genuine token still works");
}

#[test]
fn an_expired_token_is_rejected() {
    let mut sim = Sim::new(SessionConfig {
        token_ttl: Duration::from_secs(60),
        ..SessionConfig::default()
    });
    let mut client = sim.login(1, NO_COD);
    sim.drop_connection(&mut client);
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.resume(&mut client), Err(ReasonCode::TokenExpired));
}

#[test]
fn a_client_that_lost_its_rotated_token_may_resume_with_the_old_one() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    let login_token = client.token.expect("token");
    sim.drop_connection(&mut client);
    sim.resume(&mut client).expect("first resume");
    // ResumeAccepted (with the rotated token) is lost with the connection.
    sim.drop_connection(&mut client);
    assert_eq!(client.token, Some(login_token));
    sim.resume(&mut client)
        .expect("the old token still works: its successor was never used");
    sim.settle(&mut client);
    assert_ne!(client.token, Some(login_token));
}

#[test]
fn a_superseded_token_used_after_its_successor_ends_the_session() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    let stolen = client.token.expect("token");
    sim.drop_connection(&mut client);
    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client); // receives generation 1
    sim.drop_connection(&mut client);
    sim.resume(&mut client).expect("generation 1 is used");
    sim.settle(&mut client);
    let conn = client.conn.expect("attached");

    let mut thief = Client::new(client.session_id, 0);
    assert_eq!(
        sim.resume_with(&mut thief, stolen),
        Err(ReasonCode::TokenSuperseded)
    );
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::TokenSuperseded));
    assert!(sim.registry().get(client.session_id).is_none());
    sim.drop_connection(&mut client);
    assert_eq!(
        sim.resume(&mut client),
        Err(ReasonCode::TokenSuperseded),
        "every later resume is refused"
    );
}

#[test]
fn reusing_the_current_token_takes_the_session_over() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    let old_conn = client.conn.expect("attached");
    client.new_order(1, Side::Buy, 90, 1);
    sim.settle(&mut client);
    // The old connection looks alive to the gateway (half-open); the client resumes.
    let token = client.token.expect("token");
    sim.resume_with(&mut client, token).expect("takeover");
    assert_eq!(sim.is_closed(old_conn), Some(ReasonCode::TakenOver));
    sim.settle(&mut client);
    assert_eq!(lock(&sim.session(&client)).attached_to(), client.conn);

    // Whatever the old connection still sends is refused, never executed.
    let mut out = Vec::new();
    let stale = buy_one_at_90(2);
    lock(&sim.session(&client)).handle_frame(old_conn, &stale.into(), sim.now, &mut out);
    assert_eq!(
        out,
        [gateway_core::session::Action::CloseConnection {
            conn: old_conn,
            reason: ReasonCode::TakenOver
        }]
    );
    assert_eq!(times_executed(&sim, client.session_id, 2), 0);
}

#[test]
fn cancel_on_disconnect_fires_after_the_grace_period_and_not_before() {
    let mut sim = sim();
    let mut client = sim.login(1, cod(Duration::from_secs(5)));
    client.new_order(1, Side::Buy, 90, 3);
    sim.settle(&mut client);
    sim.drop_connection(&mut client);

    sim.advance(Duration::from_millis(4_999));
    assert_eq!(sim.working_order_count(), 1);
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.working_order_count(), 0);

    sim.resume(&mut client).expect("session kept");
    sim.settle(&mut client);
    assert!(matches!(
        client.received.last(),
        Some(Frame::Cancelled(c)) if c.reason == CancelReason::CancelOnDisconnect && c.client_seq == 0 && c.cancelled_quantity == 3
    ));
}

#[test]
fn cancel_on_disconnect_does_not_fire_when_the_resume_is_in_time() {
    let mut sim = sim();
    let mut client = sim.login(1, cod(Duration::from_secs(5)));
    client.new_order(1, Side::Buy, 90, 3);
    sim.settle(&mut client);
    sim.drop_connection(&mut client);
    sim.advance(Duration::from_secs(4));
    sim.resume(&mut client).expect("resume");
    sim.advance(Duration::from_secs(10));
    assert_eq!(sim.working_order_count(), 1);
}

#[test]
fn a_detached_session_expires_and_cannot_be_resumed() {
    let mut sim = Sim::new(SessionConfig {
        detached_ttl: Duration::from_secs(30),
        ..SessionConfig::default()
    });
    let mut client = sim.login(1, cod(Duration::from_secs(60)));
    client.new_order(1, Side::Buy, 90, 3);
    sim.settle(&mut client);
    sim.drop_connection(&mut client);
    sim.advance(Duration::from_secs(30));
    assert!(sim.registry().get(client.session_id).is_none());
    assert_eq!(
        sim.working_order_count(),
        0,
        "cancel-on-disconnect orders go with the session"
    );
    assert_eq!(sim.resume(&mut client), Err(ReasonCode::SessionNotFound));
    assert!(sim.registry().is_empty());
}

#[test]
fn logout_ends_the_session_and_cancels_with_cancel_on_disconnect() {
    let mut sim = sim();
    let mut client = sim.login(1, cod(Duration::from_secs(1)));
    client.new_order(1, Side::Buy, 90, 3);
    client.to_gateway.push_back(proto::Logout {}.into());
    let conn = client.conn.expect("attached");
    sim.deliver_to_gateway(&mut client, usize::MAX);
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::LoggedOut));
    assert_eq!(sim.working_order_count(), 0);
    assert!(sim.registry().get(client.session_id).is_none());
}

#[test]
fn revoked_sessions_say_so_on_resume() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    let conn = client.conn.expect("attached");
    let revoked = sim.input(Record::Revoke {
        sessions: vec![client.session_id],
    });
    assert!(matches!(revoked, Outcome::Ended(ended) if ended == [client.session_id]));
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::Revoked));
    sim.drop_connection(&mut client);
    assert_eq!(sim.resume(&mut client), Err(ReasonCode::Revoked));
}

#[test]
fn session_limits_are_enforced_per_gateway_and_per_account() {
    let limits = RegistryLimits {
        max_sessions: 3,
        max_sessions_per_account: 2,
        remembered_endings: 10,
        ..RegistryLimits::default()
    };
    let mut sim = Sim::with_limits(SessionConfig::default(), limits);
    let login = |sim: &mut Sim, account| try_login(sim, account, None, NO_COD);
    let first = login(&mut sim, 1).expect("first");
    login(&mut sim, 1).expect("second");
    assert_eq!(
        login(&mut sim, 1).err(),
        Some(ReasonCode::TooManyAccountSessions)
    );
    login(&mut sim, 2).expect("third");
    assert_eq!(login(&mut sim, 3).err(), Some(ReasonCode::TooManySessions));
    sim.registry().remove(first, ReasonCode::LoggedOut);
    login(&mut sim, 3).expect("a slot was freed");
    assert_eq!(sim.registry().len(), 3);
}

#[test]
fn an_over_long_cancel_on_disconnect_grace_is_refused() {
    let mut sim = sim();
    let result = try_login(&mut sim, 1, None, cod(Duration::from_secs(61)));
    assert_eq!(result.err(), Some(ReasonCode::InvalidLoginParameter));
    assert!(sim.registry().is_empty());
}

#[test]
fn the_open_order_limit_rejects_without_reaching_the_engine() {
    let mut sim = Sim::new(SessionConfig {
        max_open_orders: 2,
        ..SessionConfig::default()
    });
    let mut client = sim.login(1, NO_COD);
    for id in 1..=3 {
        client.new_order(id, Side::Buy, 90, 1);
    }
    sim.settle(&mut client);
    assert!(
        matches!(client.received[2], Frame::Reject(r) if r.client_seq == 3 && r.reason == ReasonCode::TooManyOpenOrders)
    );
    assert_eq!(times_executed(&sim, client.session_id, 3), 0);
    client.cancel(1);
    client.new_order(4, Side::Buy, 90, 1);
    sim.settle(&mut client);
    assert!(matches!(client.received.last(), Some(Frame::OrderAck(a)) if a.client_order_id == 4));
}

#[test]
fn an_ack_beyond_what_was_sent_closes_the_connection() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    let conn = client.conn.expect("attached");
    client
        .to_gateway
        .push_back(proto::Ack { server_seq: 5 }.into());
    sim.deliver_to_gateway(&mut client, 1);
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::AckBeyondSent));
    sim.drop_connection(&mut client);
    client.last_server_seq = 5;
    assert_eq!(sim.resume(&mut client), Err(ReasonCode::AckBeyondSent));
}

#[test]
fn a_handshake_frame_after_the_handshake_is_unexpected() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    let conn = client.conn.expect("attached");
    client
        .to_gateway
        .push_back(proto::Ack { server_seq: 0 }.into());
    client.to_gateway.push_back(
        proto::Resume {
            token: client.token.expect("token"),
            last_acked_server_seq: 0,
            next_client_seq: 1,
        }
        .into(),
    );
    sim.deliver_to_gateway(&mut client, usize::MAX);
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::UnexpectedFrame));
    assert!(sim.registry().get(client.session_id).is_some());
}

#[test]
fn rotating_the_key_keeps_live_tokens_working() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    sim.registry()
        .with_keys(|keys| keys.rotate(2, &[43u8; 32]))
        .expect("rotate");
    sim.drop_connection(&mut client);
    sim.resume(&mut client)
        .expect("old-key token still resumes");
    sim.settle(&mut client);
    let token = client.token.expect("rotated token");
    assert_eq!(
        u32::from_le_bytes(token.0[..4].try_into().expect("4 bytes")),
        2,
        "new tokens use the new key"
    );
}

#[test]
fn an_accounts_own_session_limit_applies_when_lower() {
    let mut sim = sim();
    assert!(try_login(&mut sim, 5, Some(1), NO_COD).is_ok());
    assert_eq!(
        try_login(&mut sim, 5, Some(1), NO_COD).err(),
        Some(ReasonCode::TooManyAccountSessions)
    );
}

#[test]
fn a_session_over_its_message_rate_is_refused_without_reaching_the_engine() {
    let mut sim = Sim::new(SessionConfig {
        max_messages_per_second: 5,
        ..SessionConfig::default()
    });
    let mut client = sim.login(1, NO_COD);
    for id in 1..=7 {
        client.new_order(id, Side::Buy, 90, 1);
    }
    sim.settle(&mut client);
    let reasons: Vec<Option<ReasonCode>> = client
        .received
        .iter()
        .map(|f| match f {
            Frame::Reject(r) => Some(r.reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            None,
            None,
            None,
            None,
            None,
            Some(ReasonCode::RateExceeded),
            Some(ReasonCode::RateExceeded)
        ]
    );
    assert_eq!(times_executed(&sim, client.session_id, 6), 0);
    assert_eq!(
        client.unanswered().len(),
        0,
        "every request was answered once"
    );

    // The allowance comes back with time, at the configured rate.
    sim.advance(Duration::from_millis(400));
    for id in 8..=10 {
        client.new_order(id, Side::Buy, 90, 1);
    }
    sim.settle(&mut client);
    let last: Vec<bool> = client.received[7..]
        .iter()
        .map(|f| matches!(f, Frame::OrderAck(_)))
        .collect();
    assert_eq!(last, [true, true, false], "400 ms earn two messages at 5/s");
}

#[test]
fn a_burst_larger_than_the_ring_waits_for_acks_and_every_answer_arrives() {
    // 10,000 orders that each trade yield 20,000 answers: more than the ring's
    // 16,384 messages and 1 MiB. Sent at once, with acks only as the client reads.
    const ORDERS: usize = 10_000;
    let mut sim = sim();
    let mut maker = sim.login(1, NO_COD);
    maker.new_order(1, Side::Sell, 100, ORDERS as u64);
    sim.settle(&mut maker);
    maker.ack();
    sim.settle(&mut maker);

    let mut taker = sim.login(2, NO_COD);
    let conn = taker.conn.expect("attached");
    for id in 1..=ORDERS as u64 {
        taker.new_order(id, Side::Buy, 100, 1);
    }
    sim.deliver_to_gateway(&mut taker, usize::MAX);
    let session = sim.session(&taker);
    let limits = SessionConfig::default().ring;
    let mut rounds = 0;
    while taker.received.len() < 2 * ORDERS && rounds < 1_000 {
        rounds += 1;
        let ring = lock(&session).ring().len();
        assert!(ring <= limits.max_messages / 2, "ring at {ring}");
        sim.transmit(&mut taker, usize::MAX);
        sim.deliver_to_client(&mut taker, usize::MAX);
        taker.ack();
        sim.deliver_to_gateway(&mut taker, usize::MAX);
        maker.ack();
        sim.settle(&mut maker);
    }
    assert_eq!(sim.is_closed(conn), None, "never cut off");
    assert!(rounds > 2, "the burst had to wait for acks");
    assert!(taker.unanswered().is_empty(), "every request answered");
    let acks = taker
        .received
        .iter()
        .filter(|f| matches!(f, Frame::OrderAck(_)))
        .count();
    assert_eq!((acks, fills(&taker).len()), (ORDERS, ORDERS));
    assert_eq!(fills(&maker).len(), ORDERS);
    for seq in [1, ORDERS as u64 / 2, ORDERS as u64] {
        assert_eq!(times_executed(&sim, taker.session_id, seq), 1);
    }
}

/// A session whose ring has room for the answers of one request at a time and that
/// lets two wait, with three orders sent (not yet delivered).
fn three_orders_behind_a_waiting_limit_of_two() -> (Sim, Client, gateway_core::session::ConnectionId)
{
    let mut sim = Sim::new(SessionConfig {
        ring: RingLimits {
            max_messages: 3,
            max_bytes: 1 << 20,
        },
        max_waiting_requests: 2,
        ..SessionConfig::default()
    });
    let mut client = sim.login(1, NO_COD);
    let conn = client.conn.expect("attached");
    for id in 1..=3 {
        client.new_order(id, Side::Buy, 90, 1);
    }
    (sim, client, conn)
}

#[test]
fn requests_past_the_waiting_limit_cut_the_connection_and_are_sent_again_after_resume() {
    let (mut sim, mut client, conn) = three_orders_behind_a_waiting_limit_of_two();
    sim.deliver_to_gateway(&mut client, usize::MAX);
    sim.transmit(&mut client, usize::MAX);
    sim.deliver_to_client(&mut client, usize::MAX);
    assert_eq!(client.last_server_seq, 1, "the first answer arrived");
    assert_eq!(sim.is_closed(conn), None, "two requests wait for an ack");
    assert_eq!(times_executed(&sim, client.session_id, 2), 0);
    client.new_order(4, Side::Buy, 90, 1);
    sim.deliver_to_gateway(&mut client, usize::MAX);
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::SlowConsumer));
    let session = sim.session(&client);
    assert_eq!(lock(&session).attached_to(), None, "detached, not ended");
    assert_eq!(lock(&session).last_processed_client_seq(), 1);
    drop(session);

    // The waiting requests were never processed: the client sends them again.
    sim.drop_connection(&mut client);
    sim.resume(&mut client).expect("the session is kept");
    for _ in 0..10 {
        sim.settle(&mut client);
        client.ack();
    }
    sim.settle(&mut client);
    assert!(client.unanswered().is_empty(), "every request answered");
    for seq in 1..=4 {
        assert_eq!(times_executed(&sim, client.session_id, seq), 1, "seq {seq}");
    }
}

#[test]
fn a_logout_behind_waiting_requests_ends_the_session_after_they_are_answered() {
    let mut sim = Sim::new(SessionConfig {
        ring: RingLimits {
            max_messages: 2,
            max_bytes: 1 << 20,
        },
        ..SessionConfig::default()
    });
    let mut client = sim.login(1, NO_COD);
    client.new_order(1, Side::Buy, 90, 1);
    client.new_order(2, Side::Buy, 91, 1);
    let resend = client.outbox[&2]; // a resend of a waiting request
    client.to_gateway.push_back(resend);
    client.to_gateway.push_back(proto::Logout {}.into());
    sim.deliver_to_gateway(&mut client, usize::MAX);
    assert!(
        sim.registry().get(client.session_id).is_some(),
        "logout waits"
    );
    sim.transmit(&mut client, usize::MAX);
    sim.deliver_to_client(&mut client, usize::MAX);
    assert!(
        client
            .control
            .iter()
            .any(|f| matches!(f, Frame::Duplicate(d) if d.client_seq == 2)),
        "the resend is answered as a duplicate"
    );
    client.ack();
    sim.settle(&mut client);
    assert!(
        sim.registry().get(client.session_id).is_none(),
        "logged out"
    );
    assert!(client.unanswered().is_empty(), "both orders answered first");
    assert_eq!(times_executed(&sim, client.session_id, 2), 1);
    assert!(matches!(
        client.control.last(),
        Some(Frame::Close(c)) if c.reason == ReasonCode::LoggedOut
    ));
}

#[test]
fn a_logout_behind_exactly_the_waiting_limit_is_taken_not_cut_as_a_slow_consumer() {
    // PROTOCOL.md section 4: a client with at most max_waiting_requests unanswered
    // requests cannot reach the limit; the Logout behind them is not a request.
    let (mut sim, mut client, conn) = three_orders_behind_a_waiting_limit_of_two();
    client.to_gateway.push_back(proto::Logout {}.into());
    client.to_gateway.push_back(proto::Logout {}.into());
    sim.deliver_to_gateway(&mut client, usize::MAX);
    assert_eq!(
        sim.is_closed(conn),
        None,
        "two requests and the logout wait"
    );
    for _ in 0..10 {
        sim.settle(&mut client);
        client.ack();
    }
    assert!(client.unanswered().is_empty(), "every request answered");
    assert!(
        sim.registry().get(client.session_id).is_none(),
        "logged out"
    );
    assert!(matches!(
        client.control.last(),
        Some(Frame::Close(c)) if c.reason == ReasonCode::LoggedOut
    ));
}

#[test]
fn a_maker_that_never_acknowledges_its_fills_is_cut_as_a_slow_consumer_and_keeps_its_session() {
    // Fills of resting orders are not answers the session waited room for: when
    // they overflow the ring, the connection is closed and a resume takes the
    // snapshot path.
    let mut sim = Sim::new(SessionConfig {
        ring: RingLimits {
            max_messages: 4,
            max_bytes: 1 << 20,
        },
        ..SessionConfig::default()
    });
    let mut maker = sim.login(1, NO_COD);
    let conn = maker.conn.expect("attached");
    maker.new_order(1, Side::Sell, 100, 10);
    sim.settle(&mut maker);
    let mut taker = sim.login(2, NO_COD);
    for id in 1..=6 {
        taker.new_order(id, Side::Buy, 100, 1);
        sim.settle(&mut taker);
        taker.ack();
    }
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::SlowConsumer));
    let session = sim.session(&maker);
    assert_eq!(
        lock(&session).ring().len(),
        4,
        "memory stays within the window"
    );
    assert_eq!(lock(&session).attached_to(), None, "detached, not ended");
    drop(session);

    sim.drop_connection(&mut maker);
    sim.resume(&mut maker).expect("the session is kept");
    sim.settle(&mut maker);
    let resumed = maker.control.iter().find_map(|f| match f {
        Frame::ResumeAccepted(r) => Some(*r),
        _ => None,
    });
    assert!(
        resumed.is_some_and(|r| r.snapshot_follows),
        "beyond the window: the snapshot path"
    );
    let (_, orders) = maker.snapshot.clone().expect("snapshot");
    assert_eq!(
        orders
            .iter()
            .map(|o| (o.filled_quantity, o.leaves_quantity))
            .collect::<Vec<_>>(),
        [(6, 4)]
    );
}

/// Logs a simulated client out; its session ends, its orders stay in the book.
fn log_out(sim: &mut Sim, client: &mut Client) {
    client.to_gateway.push_back(proto::Logout {}.into());
    sim.deliver_to_gateway(client, usize::MAX);
    assert!(sim.registry().get(client.session_id).is_none());
}

/// A taker on account 2 buys `quantity` at 100.
fn take(sim: &mut Sim, client_order_id: u64, quantity: u64) {
    let mut taker = sim.login(2, NO_COD);
    taker.new_order(client_order_id, Side::Buy, 100, quantity);
    sim.settle(&mut taker);
}

#[test]
fn fills_of_an_ended_sessions_orders_wait_for_the_accounts_next_login() {
    let mut sim = sim();
    let mut maker = sim.login(1, NO_COD);
    maker.new_order(10, Side::Sell, 100, 5);
    sim.settle(&mut maker);
    log_out(&mut sim, &mut maker);
    assert_eq!(sim.working_order_count(), 1, "no cancel-on-disconnect");

    take(&mut sim, 20, 5);
    let later = sim.login(1, NO_COD);
    let (_, snapshot) = later.snapshot.clone().expect("a login snapshot");
    assert_eq!(
        snapshot
            .iter()
            .map(|o| (o.client_order_id, o.status))
            .collect::<Vec<_>>(),
        vec![(10, OrderStatus::Filled)],
        "the snapshot shows the end state"
    );
    let fill = fills(&later);
    assert_eq!(fill.len(), 1, "the fill follows the snapshot");
    assert_eq!(
        (
            fill[0].server_seq,
            fill[0].client_order_id,
            fill[0].quantity,
            fill[0].leaves_quantity
        ),
        (1, 10, 5, 0)
    );
    assert_eq!(sim.registry().stats().events_rehomed, 1);
}

#[test]
fn fills_of_an_ended_sessions_orders_go_to_the_accounts_newest_live_session() {
    let mut sim = sim();
    let mut maker = sim.login(1, NO_COD);
    maker.new_order(10, Side::Sell, 100, 5);
    sim.settle(&mut maker);
    let mut heir = sim.login(1, NO_COD);
    log_out(&mut sim, &mut maker);

    take(&mut sim, 20, 2);
    sim.settle(&mut heir);
    let fill = fills(&heir);
    assert_eq!(fill.len(), 1);
    assert_eq!(
        (
            fill[0].client_order_id,
            fill[0].quantity,
            fill[0].leaves_quantity
        ),
        (10, 2, 3)
    );
}

#[test]
fn events_waiting_for_a_login_are_bounded_per_account() {
    let limits = RegistryLimits {
        unclaimed_events_per_account: 2,
        ..RegistryLimits::default()
    };
    let mut sim = Sim::with_limits(SessionConfig::default(), limits);
    let mut maker = sim.login(1, NO_COD);
    for id in 1..=3 {
        maker.new_order(id, Side::Sell, 100, 1);
    }
    sim.settle(&mut maker);
    log_out(&mut sim, &mut maker);

    take(&mut sim, 20, 3);
    let later = sim.login(1, NO_COD);
    let ids: Vec<u64> = fills(&later).iter().map(|f| f.client_order_id).collect();
    assert_eq!(ids, vec![2, 3], "the oldest was dropped");
    let stats = sim.registry().stats();
    assert_eq!((stats.events_rehomed, stats.unclaimed_dropped), (2, 1));
}

#[test]
fn a_timer_armed_by_a_lost_connection_fires_on_time_between_full_sweeps() {
    let mut sim = sim();
    let mut client = sim.login(1, cod(Duration::from_millis(300)));
    client.new_order(1, Side::Buy, 90, 3);
    sim.settle(&mut client);
    // A full sweep of every session happens now; the next one is a second away.
    sim.advance(Duration::ZERO);
    sim.drop_connection(&mut client);

    sim.advance(Duration::from_millis(299));
    assert_eq!(sim.working_order_count(), 1);
    sim.advance(Duration::from_millis(1));
    assert_eq!(
        sim.working_order_count(),
        0,
        "fired from its schedule, not from a sweep"
    );
}

// Findings of the adversarial review and the independent client, one scenario each.

#[test]
fn a_cancel_of_another_sessions_order_answers_the_requester_and_tells_the_owner() {
    let mut sim = sim();
    let mut owner = sim.login(1, NO_COD);
    let mut other = sim.login(1, NO_COD);
    owner.new_order(10, Side::Sell, 100, 5);
    sim.settle(&mut owner);
    // The owner's next request is still in flight when the other session cancels.
    let in_flight = owner.new_order(11, Side::Sell, 101, 5);
    let cancel = other.cancel(10);
    sim.settle(&mut other);

    let answer = other.received.last().copied();
    assert!(
        matches!(answer, Some(Frame::Cancelled(c)) if c.client_seq == cancel && c.client_order_id == 10),
        "the requester gets the answer: {answer:?}"
    );
    sim.transmit(&mut owner, usize::MAX);
    sim.deliver_to_client(&mut owner, usize::MAX);
    let notice = owner.received.last().copied();
    assert!(
        matches!(notice, Some(Frame::Cancelled(c)) if c.client_seq == 0 && c.client_order_id == 10),
        "the owner is told, unsolicited: {notice:?}"
    );
    assert_eq!(
        owner.unanswered(),
        [in_flight].into(),
        "the owner's own request is still awaited"
    );
    sim.settle(&mut owner);
    assert_eq!(times_executed(&sim, owner.session_id, in_flight), 1);
    assert!(owner.unanswered().is_empty());
}

#[test]
fn a_replace_of_another_sessions_order_answers_the_requester_even_after_the_owner_ended() {
    let mut sim = sim();
    let mut owner = sim.login(1, NO_COD);
    let mut other = sim.login(1, NO_COD);
    owner.new_order(10, Side::Sell, 100, 5);
    sim.settle(&mut owner);
    let replace = other.replace(10, 105, 5);
    sim.settle(&mut other);
    sim.settle(&mut owner);
    assert!(
        matches!(other.received.last(), Some(Frame::Replaced(r)) if r.client_seq == replace && r.price == 105)
    );
    assert!(
        matches!(owner.received.last(), Some(Frame::Replaced(r)) if r.client_seq == 0 && r.price == 105)
    );

    log_out(&mut sim, &mut owner);
    let replace = other.replace(10, 110, 5);
    let cancel = other.cancel(10);
    sim.settle(&mut other);
    let answers: Vec<(u64, u64)> = other
        .received
        .iter()
        .filter_map(|f| match f {
            Frame::Replaced(r) => Some((r.client_seq, r.client_order_id)),
            Frame::Cancelled(c) => Some((c.client_seq, c.client_order_id)),
            _ => None,
        })
        .collect();
    assert_eq!(
        answers,
        [(1, 10), (replace, 10), (cancel, 10)],
        "each answered once, nothing duplicated as unsolicited"
    );
    assert!(other.unanswered().is_empty());
}

#[test]
fn an_owner_and_a_thief_taking_turns_with_tokens_are_caught() {
    let mut sim = sim();
    let mut owner = sim.login(1, NO_COD);
    let stolen = owner.token.expect("token");
    let owner_conn = owner.conn.expect("attached");
    let mut thief = Client::new(owner.session_id, 0);
    sim.resume_with(&mut thief, stolen)
        .expect("the thief resumes first");
    sim.settle(&mut thief);
    assert_eq!(sim.is_closed(owner_conn), Some(ReasonCode::TakenOver));
    sim.drop_connection(&mut owner);
    // The owner contests with the token it holds: that is indistinguishable from a
    // lost `ResumeAccepted`, so it is accepted once...
    sim.resume(&mut owner).expect("the owner contests");
    sim.settle(&mut owner);
    // ...and the thief's newer token is now neither the newest nor the last presented.
    sim.drop_connection(&mut thief);
    assert_eq!(sim.resume(&mut thief), Err(ReasonCode::TokenSuperseded));
    assert!(
        sim.registry().get(owner.session_id).is_none(),
        "session ended as stolen"
    );
}

#[test]
fn a_thief_replaying_the_stolen_token_is_caught_when_the_owner_comes_back() {
    let mut sim = sim();
    let mut owner = sim.login(1, NO_COD);
    let stolen = owner.token.expect("token");
    let mut thief = Client::new(owner.session_id, 0);
    sim.resume_with(&mut thief, stolen).expect("thief");
    sim.drop_connection(&mut owner);
    sim.resume(&mut owner)
        .expect("owner contests with the same token");
    sim.settle(&mut owner);
    sim.drop_connection(&mut thief);
    sim.resume_with(&mut thief, stolen)
        .expect("the last presented token, again");
    // The owner's token (the one minted for its contest) is now stale: caught.
    sim.drop_connection(&mut owner);
    assert_eq!(sim.resume(&mut owner), Err(ReasonCode::TokenSuperseded));
    assert!(sim.registry().get(owner.session_id).is_none());
}

#[test]
fn logout_with_cancel_on_disconnect_sends_the_cancels_before_close() {
    let mut sim = sim();
    let mut client = sim.login(1, cod(Duration::from_secs(1)));
    client.new_order(1, Side::Buy, 90, 3);
    client.new_order(2, Side::Buy, 91, 3);
    sim.settle(&mut client);
    client.to_gateway.push_back(proto::Logout {}.into());
    sim.settle(&mut client);
    let cancelled: Vec<(u64, CancelReason)> = client
        .received
        .iter()
        .filter_map(|f| match f {
            Frame::Cancelled(c) => Some((c.client_order_id, c.reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        cancelled,
        [
            (1, CancelReason::SessionEnded),
            (2, CancelReason::SessionEnded)
        ]
    );
    assert_eq!(
        client.control.last(),
        Some(&Frame::from(proto::Close {
            reason: ReasonCode::LoggedOut
        })),
        "Close comes last, after the cancels"
    );
    assert!(sim.registry().get(client.session_id).is_none());
    // Nothing waits for the account's next login.
    let next = sim.login(1, NO_COD);
    assert!(next.received.is_empty());
}

#[test]
fn a_theft_ending_sends_the_sessions_cancels_to_its_connection_before_close() {
    let mut sim = sim();
    let mut client = sim.login(1, cod(Duration::from_secs(1)));
    let first = client.token.expect("token");
    client.new_order(1, Side::Buy, 90, 3);
    sim.settle(&mut client);
    sim.drop_connection(&mut client);
    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client);
    sim.drop_connection(&mut client);
    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client);
    let mut thief = Client::new(client.session_id, 0);
    assert_eq!(
        sim.resume_with(&mut thief, first),
        Err(ReasonCode::TokenSuperseded)
    );
    sim.settle(&mut client);
    assert!(
        matches!(client.received.last(), Some(Frame::Cancelled(c)) if c.reason == CancelReason::SessionEnded)
    );
    assert_eq!(
        client.control.last(),
        Some(&Frame::from(proto::Close {
            reason: ReasonCode::TokenSuperseded
        }))
    );
}

#[test]
fn a_login_snapshot_cut_by_a_disconnect_is_sent_again_on_resume() {
    let mut sim = sim();
    let mut maker = sim.login(1, NO_COD);
    maker.new_order(7, Side::Sell, 100, 5);
    sim.settle(&mut maker);

    let mut client = sim.login_unsent(1, None, NO_COD);
    // Only LoginAccepted and SnapshotBegin get through before the connection drops.
    sim.transmit(&mut client, 2);
    sim.deliver_to_client(&mut client, 2);
    sim.drop_connection(&mut client);
    assert!(client.snapshot.is_none());

    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client);
    let (as_of, orders) = client.snapshot.clone().expect("the snapshot, again");
    assert_eq!(as_of, 0);
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].client_order_id, 7);

    // Once the client acknowledges a sequenced message, it has the snapshot.
    client.new_order(8, Side::Buy, 90, 1);
    sim.settle(&mut client);
    client.ack();
    sim.settle(&mut client);
    sim.drop_connection(&mut client);
    let snapshots_before = client
        .control
        .iter()
        .filter(|f| matches!(f, Frame::SnapshotBegin(_)))
        .count();
    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client);
    let snapshots_after = client
        .control
        .iter()
        .filter(|f| matches!(f, Frame::SnapshotBegin(_)))
        .count();
    assert_eq!(snapshots_before, snapshots_after, "not sent a third time");
}

#[test]
fn any_ack_confirms_the_login_snapshot_so_it_is_not_kept_nor_sent_again() {
    let mut sim = sim();
    let mut maker = sim.login(1, NO_COD);
    maker.new_order(7, Side::Sell, 100, 5);
    sim.settle(&mut maker);
    let mut client = sim.login(1, NO_COD);
    assert!(client.snapshot.is_some());
    assert!(
        lock(&sim.session(&client)).retained_bytes() > 0,
        "kept until confirmed"
    );
    // Nothing sequenced has come: the client acknowledges 0 after SnapshotEnd.
    assert_eq!(client.last_server_seq, 0);
    client.ack();
    sim.settle(&mut client);
    assert_eq!(lock(&sim.session(&client)).retained_bytes(), 0, "released");
    sim.drop_connection(&mut client);
    sim.resume(&mut client).expect("resume");
    sim.settle(&mut client);
    let snapshots = client
        .control
        .iter()
        .filter(|f| matches!(f, Frame::SnapshotBegin(_)))
        .count();
    assert_eq!(snapshots, 1, "the login snapshot is not sent again");
}

#[test]
fn a_login_snapshot_never_confirmed_is_kept_only_within_the_ring_and_a_resume_gets_the_account_now()
{
    // DEPLOYMENT.md "Memory": a session holds at most its ring, whatever its client
    // does; a large account's login snapshot does not fit half of it.
    const ORDERS: u64 = 200;
    let ring = RingLimits {
        max_messages: 1_000,
        max_bytes: 4_096,
    };
    let mut sim = Sim::new(SessionConfig {
        ring,
        ..SessionConfig::default()
    });
    let mut maker = sim.login(1, NO_COD);
    for id in 1..=ORDERS {
        maker.new_order(id, Side::Sell, 100 + i64::try_from(id).expect("small"), 1);
        sim.settle(&mut maker);
        maker.ack();
    }
    sim.settle(&mut maker);
    let core_before = sim.core_snapshot_len();

    // A client that logs in to the account and never acknowledges anything.
    let mut idle = sim.login_unsent(1, None, NO_COD);
    sim.transmit(&mut idle, 3);
    sim.deliver_to_client(&mut idle, 3);
    sim.drop_connection(&mut idle);
    let core_after = sim.core_snapshot_len();
    assert!(
        core_after - core_before <= ring.max_bytes / 2,
        "the idle session holds {} bytes",
        core_after - core_before
    );
    assert!(lock(&sim.session(&idle)).retained_bytes() <= ring.max_bytes / 2);

    // The maker cancels one of its orders meanwhile; the idle client resumes
    // without its login snapshot and gets the account's orders as they are now.
    maker.cancel(1);
    sim.settle(&mut maker);
    sim.resume(&mut idle).expect("resume");
    sim.settle(&mut idle);
    let accepted = idle.control.iter().find_map(|f| match f {
        Frame::ResumeAccepted(r) => Some(*r),
        _ => None,
    });
    assert!(accepted.is_some_and(|r| r.snapshot_follows));
    let (_, orders) = idle.snapshot.clone().expect("a snapshot");
    assert_eq!(orders.len(), usize::try_from(ORDERS).expect("small"));
    let cancelled = orders.iter().find(|o| o.client_order_id == 1);
    assert_eq!(cancelled.map(|o| o.status), Some(OrderStatus::Cancelled));
}

#[test]
fn fills_of_an_ended_sessions_orders_go_to_any_live_session_of_the_account() {
    let mut sim = sim();
    let mut oldest = sim.login(1, NO_COD);
    let mut maker = sim.login(1, NO_COD);
    maker.new_order(10, Side::Sell, 100, 5);
    sim.settle(&mut maker);
    log_out(&mut sim, &mut maker);
    let mut newest = sim.login(1, NO_COD);
    log_out(&mut sim, &mut newest);
    take(&mut sim, 1, 5);
    sim.settle(&mut oldest);
    assert_eq!(
        fills(&oldest).len(),
        1,
        "the older live session gets the fill"
    );
    assert_eq!(fills(&oldest)[0].client_order_id, 10);
}

#[test]
fn a_session_connected_longer_than_the_token_lifetime_can_still_resume() {
    let mut sim = Sim::new(SessionConfig {
        token_ttl: Duration::from_secs(3600),
        detached_ttl: Duration::from_secs(3 * 3600),
        ..SessionConfig::default()
    });
    let mut client = sim.login(1, NO_COD);
    sim.advance(Duration::from_secs(2 * 3600));
    sim.drop_connection(&mut client);
    sim.resume(&mut client)
        .expect("the lifetime counts from the drop");
    sim.settle(&mut client);
    // Detached for longer than the token lifetime, it has expired.
    sim.drop_connection(&mut client);
    sim.advance(Duration::from_secs(3601));
    assert_eq!(sim.resume(&mut client), Err(ReasonCode::TokenExpired));
}

#[test]
fn a_login_at_the_account_limit_ends_its_longest_detached_session() {
    let mut sim = sim();
    let mut first = sim.login(1, NO_COD);
    let mut second = sim.login(1, NO_COD);
    sim.drop_connection(&mut first);
    sim.advance(Duration::from_secs(1));
    sim.drop_connection(&mut second);
    assert!(try_login(&mut sim, 1, Some(2), NO_COD).is_ok());
    assert_eq!(sim.resume(&mut first), Err(ReasonCode::SessionNotFound));
    assert!(
        sim.resume(&mut second).is_ok(),
        "the newer detached one stays"
    );
    // With every session attached, the limit holds.
    assert_eq!(
        try_login(&mut sim, 1, Some(2), NO_COD),
        Err(ReasonCode::TooManyAccountSessions)
    );
    assert_eq!(sim.registry().stats().evicted, 1);
}

#[test]
fn an_ack_of_a_message_not_yet_sent_closes_the_connection() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    client.new_order(1, Side::Buy, 90, 1);
    // The OrderAck is in the ring but the writer has not sent it.
    sim.deliver_to_gateway(&mut client, usize::MAX);
    let conn = client.conn.expect("attached");
    client
        .to_gateway
        .push_back(proto::Ack { server_seq: 1 }.into());
    sim.deliver_to_gateway(&mut client, usize::MAX);
    assert_eq!(sim.is_closed(conn), Some(ReasonCode::AckBeyondSent));
}

#[test]
fn a_grace_period_is_ignored_when_cancel_on_disconnect_is_off() {
    let mut sim = sim();
    let off = gateway_core::session::CodPolicy {
        mode: proto::CancelOnDisconnect::Off,
        grace: Duration::from_millis(60_001),
    };
    assert!(try_login(&mut sim, 1, None, off).is_ok());
    assert_eq!(
        try_login(&mut sim, 2, None, cod(Duration::from_millis(60_001))),
        Err(ReasonCode::InvalidLoginParameter)
    );
}

#[test]
fn ending_every_session_runs_each_ones_cancel_on_disconnect() {
    let mut sim = sim();
    let mut cancelling = sim.login(1, cod(Duration::from_secs(5)));
    let mut keeping = sim.login(2, NO_COD);
    cancelling.new_order(1, Side::Buy, 90, 1);
    keeping.new_order(2, Side::Sell, 110, 1);
    sim.settle(&mut cancelling);
    sim.settle(&mut keeping);
    sim.input(Record::EndAll);
    sim.settle(&mut cancelling);
    assert!(
        matches!(cancelling.received.last(), Some(Frame::Cancelled(c)) if c.reason == CancelReason::SessionEnded)
    );
    assert_eq!(
        sim.working_order_count(),
        1,
        "only the COD session's order is cancelled"
    );
    assert!(sim.registry().is_empty());
}

#[test]
fn the_cancels_of_a_session_evicted_while_detached_reach_the_accounts_live_session() {
    let mut sim = sim();
    let mut evicted = sim.login(1, cod(Duration::from_secs(60)));
    evicted.new_order(5, Side::Buy, 90, 1);
    sim.settle(&mut evicted);
    sim.drop_connection(&mut evicted);
    // The login evicts the detached session.
    let mut heir = sim.login_unsent(1, Some(1), NO_COD);
    sim.settle(&mut heir);
    assert!(
        matches!(heir.received.as_slice(), [Frame::Cancelled(c)]
            if c.client_order_id == 5 && c.client_seq == 0 && c.reason == CancelReason::SessionEnded),
        "{:?}",
        heir.received
    );
    assert!(sim.registry().get(evicted.session_id).is_none());
}

#[test]
fn a_resume_is_checked_against_what_the_gateway_run_it_left_may_have_sent() {
    // Crash-safe mode's core: a resume's ack is bounded by what was assigned, and
    // by what the resuming connection's gateway run says it sent if the session was
    // last on that run when the core applies the resume.
    let mut sim = Sim::new(SessionConfig {
        ack_bound: gateway_core::session::AckBound::Assigned,
        ..SessionConfig::default()
    });
    let mut client = sim.login(1, NO_COD);
    for id in 1..=3 {
        client.new_order(id, Side::Buy, 90, 1);
    }
    sim.settle(&mut client);
    assert_eq!(client.last_server_seq, 3);
    sim.drop_connection(&mut client);
    let resume = proto::Resume {
        token: client.token.expect("token"),
        last_acked_server_seq: 3,
        next_client_seq: client.next_client_seq,
    };
    let mut out = Vec::new();

    // Gateway run 7's copy of the core had not applied the session's latest moves
    // and believed the session was last on run 7, which sent it nothing; the core
    // knows it was last on run 0, which may have sent all three.
    let on_run_7 = 7 << 32 | 1;
    let resumed = sim.registry().resume(
        on_run_7,
        &resume,
        Some(0),
        (sim.now, &[1; 16]),
        |_| None,
        &mut out,
    );
    assert!(resumed.is_ok(), "{:?}", resumed.err());

    // Now it is on run 7: what run 7 says it sent bounds the next resume there.
    let again_on_run_7 = 7 << 32 | 2;
    let refused = sim.registry().resume(
        again_on_run_7,
        &resume,
        Some(2),
        (sim.now, &[2; 16]),
        |_| None,
        &mut out,
    );
    assert_eq!(refused.err(), Some(ReasonCode::AckBeyondSent));
    let resumed = sim.registry().resume(
        again_on_run_7,
        &resume,
        Some(3),
        (sim.now, &[3; 16]),
        |_| None,
        &mut out,
    );
    assert!(resumed.is_ok(), "{:?}", resumed.err());
}

#[test]
fn records_of_a_gateway_run_that_ended_are_fenced_off_and_change_nothing() {
    let mut sim = sim();
    let mut client = sim.login(1, NO_COD);
    let (old_run, old_conn) = (sim.run(), client.conn.expect("attached"));
    // The gateway restarts under the same name: its new run ends the old one.
    sim.restore_from_snapshot(std::slice::from_mut(&mut client), true);
    assert_ne!(sim.run(), old_run);
    let before = sim.core_bytes();
    let late = buy_one_at_90(1);
    let outcome = sim.input_from(
        old_run,
        Record::Frame {
            session: client.session_id,
            conn: old_conn,
            frame: Frame::from(late).to_bytes().to_vec(),
        },
    );
    assert!(matches!(outcome, Outcome::Fenced));
    assert_eq!(times_executed(&sim, client.session_id, 1), 0);
    assert!(sim.core_bytes() == before, "the core changed");
    sim.resume(&mut client).expect("the session lives on");
}
