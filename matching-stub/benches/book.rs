//! Mixed workload over a deep book: adds near the touch, cancels of live orders,
//! replaces, and crossing orders that trade, against thousands of resting orders.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use matching_stub::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const INSTRUMENT: InstrumentId = 1;
const MID: Price = 100_000;
const RESTING: usize = 5_000;
const STREAM: usize = 20_000;

fn new_order(
    id: u64,
    side: Side,
    time_in_force: TimeInForce,
    price: Price,
    quantity: Quantity,
) -> Request {
    let account = id % 64;
    Request::New(NewOrder {
        owner: Owner {
            account,
            session: account,
        },
        tag: id,
        client_order_id: id,
        instrument: INSTRUMENT,
        side,
        order_type: OrderType::Limit,
        time_in_force,
        price,
        quantity,
    })
}

fn owner_of(id: u64) -> Owner {
    Owner {
        account: id % 64,
        session: id % 64,
    }
}

/// A passive price on `side`, 1 to 50 ticks behind the mid.
fn passive_price(rng: &mut StdRng, side: Side) -> Price {
    let ticks = rng.gen_range(1..=50);
    match side {
        Side::Buy => MID - ticks,
        Side::Sell => MID + ticks,
    }
}

/// A GTC order on a random side that rests without trading.
fn passive_order(rng: &mut StdRng, id: u64) -> Request {
    let side = if rng.gen() { Side::Buy } else { Side::Sell };
    let price = passive_price(rng, side);
    new_order(
        id,
        side,
        TimeInForce::Gtc,
        price,
        rng.gen_range(1..=10) * 10,
    )
}

/// A book with `RESTING` orders, and a seeded request stream to run on it.
fn workload() -> (OrderBookEngine, Vec<Request>) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut engine = OrderBookEngine::new(EngineConfig::with_instruments(vec![Instrument {
        id: INSTRUMENT,
        tick_size: 1,
        lot_size: 1,
    }]))
    .expect("valid config");
    let mut live: Vec<u64> = Vec::new();
    let mut next_id = 1u64;
    let mut events = Vec::new();
    for _ in 0..RESTING {
        engine.handle(passive_order(&mut rng, next_id), &mut events);
        live.push(next_id);
        next_id += 1;
    }

    let mut stream = Vec::with_capacity(STREAM);
    while stream.len() < STREAM {
        let side = if rng.gen() { Side::Buy } else { Side::Sell };
        let roll = rng.gen_range(0..100);
        let request = if roll < 45 {
            live.push(next_id);
            passive_order(&mut rng, next_id)
        } else if roll < 85 && !live.is_empty() {
            let id = live.swap_remove(rng.gen_range(0..live.len()));
            Request::Cancel {
                owner: owner_of(id),
                tag: id,
                client_order_id: id,
            }
        } else if roll < 90 && !live.is_empty() {
            let id = live[rng.gen_range(0..live.len())];
            let replace_side = if rng.gen() { Side::Buy } else { Side::Sell };
            Request::Replace {
                owner: owner_of(id),
                tag: id,
                client_order_id: id,
                price: passive_price(&mut rng, replace_side),
                quantity: rng.gen_range(1..=10) * 10,
            }
        } else {
            // Aggressive: crosses a few ticks into the other side.
            let ticks = rng.gen_range(0..=5);
            let price = match side {
                Side::Buy => MID + ticks,
                Side::Sell => MID - ticks,
            };
            new_order(
                next_id,
                side,
                TimeInForce::Ioc,
                price,
                rng.gen_range(1..=20) * 10,
            )
        };
        next_id += 1;
        stream.push(request);
    }
    (engine, stream)
}

fn mixed(c: &mut Criterion) {
    let (engine, stream) = workload();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(stream.len() as u64));
    group.bench_function("mixed_20k_ops_over_5k_resting", |b| {
        let mut events = Vec::with_capacity(1024);
        b.iter_batched_ref(
            || engine.clone(),
            |engine| {
                for request in &stream {
                    engine.handle(*request, &mut events);
                    events.clear();
                }
                black_box(engine.working_order_count())
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, mixed);
criterion_main!(benches);
