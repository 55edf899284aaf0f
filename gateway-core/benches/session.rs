//! Costs of the session core's hot paths: token mint and verify, ring append with
//! ack-trim, and one inbound order through the session state machine.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gateway_core::ring::{OutboundRing, RingLimits};
use gateway_core::session::{CodPolicy, LoginGrant, Session, SessionConfig};
use gateway_core::time::Timestamp;
use gateway_core::token::TokenKeyRing;
use proto::{CancelOnDisconnect, Frame, NewOrder, OrderType, Side, TimeInForce};

const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn tokens(c: &mut Criterion) {
    let keys = TokenKeyRing::new(1, &[7u8; 32]).expect("key");
    let expires = NOW.plus(Duration::from_secs(3600));
    let token = keys.mint(42, 7, 3, expires, &[9; 16]);
    let mut group = c.benchmark_group("token");
    group.bench_function("mint", |b| {
        b.iter(|| keys.mint(black_box(42), 7, 3, expires, &[9; 16]))
    });
    group.bench_function("verify", |b| {
        b.iter(|| keys.verify(black_box(&token.0), NOW))
    });
    group.finish();
}

fn ring(c: &mut Criterion) {
    let frame = Bytes::from_static(&[0u8; 65]);
    let mut ring = OutboundRing::new(RingLimits::default());
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    // Steady state: each append is acknowledged 64 messages later, as a client
    // acking in batches would.
    group.bench_function("append_and_ack_trim", |b| {
        b.iter(|| {
            ring.append(black_box(frame.clone()));
            ring.ack(ring.last_seq().saturating_sub(64));
        })
    });
    group.finish();
}

fn inbound_order(c: &mut Criterion) {
    let config = Arc::new(SessionConfig::default());
    let grant = LoginGrant {
        session_id: 1,
        account: 1,
        cod: CodPolicy {
            mode: CancelOnDisconnect::Off,
            grace: Duration::ZERO,
        },
    };
    let token = TokenKeyRing::new(1, &[7u8; 32])
        .expect("key")
        .mint(1, 1, 0, NOW, &[9; 16]);
    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Elements(1_000));
    // 1,000 NewOrders decoded-as-frames through the exactly-once check and turned
    // into engine requests, each answered by an engine ack appended to the ring and
    // transmitted.
    group.bench_function("inbound_order_to_engine_request_and_ack_out", |b| {
        b.iter_batched_ref(
            || {
                Session::login(
                    grant,
                    1,
                    token,
                    &[],
                    Duration::from_secs(10),
                    Arc::clone(&config),
                    NOW,
                )
            },
            |session| {
                let mut actions = Vec::with_capacity(4);
                let mut frames = Vec::with_capacity(4);
                for seq in 1..=1_000u64 {
                    let order = Frame::from(NewOrder {
                        client_seq: seq,
                        client_order_id: seq,
                        instrument_id: 1,
                        side: Side::Buy,
                        order_type: OrderType::Limit,
                        time_in_force: TimeInForce::Gtc,
                        price: 100,
                        quantity: 1,
                    });
                    session.handle_frame(1, &order, NOW, &mut actions);
                    let Some(gateway_core::session::Action::Engine(matching_stub::Request::New(
                        new,
                    ))) = actions.pop()
                    else {
                        panic!("order was not forwarded");
                    };
                    let accepted = matching_stub::Event::Accepted {
                        owner: new.owner,
                        tag: new.tag,
                        order: matching_stub::OrderView {
                            order_id: seq,
                            client_order_id: new.client_order_id,
                            owner: new.owner,
                            instrument: new.instrument,
                            side: new.side,
                            price: new.price,
                            quantity: new.quantity,
                            filled: 0,
                            leaves: new.quantity,
                            status: matching_stub::OrderStatus::New,
                        },
                    };
                    session.on_engine_event(&accepted, NOW, &mut actions);
                    frames.clear();
                    session.poll_transmit(1, &mut frames, 8);
                    session.handle_frame(
                        1,
                        &Frame::from(proto::Ack { server_seq: seq }),
                        NOW,
                        &mut actions,
                    );
                }
                black_box(session.last_processed_client_seq())
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, tokens, ring, inbound_order);
criterion_main!(benches);
