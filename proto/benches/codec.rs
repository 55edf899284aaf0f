//! Encode and decode cost of the two hottest frames: `NewOrder` in, `Fill` out.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proto::{decode, Fill, Frame, NewOrder, OrderType, Side, TimeInForce};

fn frames() -> [(&'static str, Frame); 2] {
    [
        (
            "NewOrder",
            NewOrder {
                client_seq: 7,
                client_order_id: 42,
                instrument_id: 1,
                side: Side::Buy,
                order_type: OrderType::Limit,
                time_in_force: TimeInForce::Gtc,
                price: 10_050,
                quantity: 100,
            }
            .into(),
        ),
        (
            "Fill",
            Fill {
                server_seq: 44,
                client_order_id: 42,
                order_id: 9001,
                trade_id: 500,
                instrument_id: 1,
                side: Side::Buy,
                price: 10_050,
                quantity: 30,
                leaves_quantity: 70,
            }
            .into(),
        ),
    ]
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    for (name, frame) in frames() {
        let bytes = frame.to_bytes();
        let mut buf = BytesMut::with_capacity(1024);
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                black_box(&frame).encode(&mut buf);
                black_box(buf.len())
            })
        });
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| decode(black_box(&bytes)))
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
