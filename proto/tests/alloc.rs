//! Decoding must not touch the heap: a hostile peer cannot make the decoder allocate,
//! and the hot path stays allocation-free.
//!
//! The allocator counts every thread's allocations, so this runs without the test
//! harness (`harness = false`), whose own threads would allocate beside the count.

use proto::{decode, Fill, Frame, NewOrder, OrderType, Side, TimeInForce};

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn main() {
    decoding_a_new_order_or_a_fill_allocates_nothing();
    println!("decoding_a_new_order_or_a_fill_allocates_nothing ... ok");
}

fn decoding_a_new_order_or_a_fill_allocates_nothing() {
    let order = Frame::from(NewOrder {
        client_seq: 1,
        client_order_id: 2,
        instrument_id: 3,
        side: Side::Sell,
        order_type: OrderType::Limit,
        time_in_force: TimeInForce::Ioc,
        price: 100,
        quantity: 5,
    })
    .to_bytes();
    let fill = Frame::from(Fill {
        server_seq: 1,
        client_order_id: 2,
        order_id: 3,
        trade_id: 4,
        instrument_id: 5,
        side: Side::Buy,
        price: 100,
        quantity: 5,
        leaves_quantity: 0,
    })
    .to_bytes();
    let hostile = [0xff_u8, 0xff, 0x10, 1, 0, 0, 0];

    let _profiler = dhat::Profiler::builder().testing().build();
    let before = dhat::HeapStats::get();
    for _ in 0..1_000 {
        assert!(matches!(decode(&order), Ok(Some((Frame::NewOrder(_), _)))));
        assert!(matches!(decode(&fill), Ok(Some((Frame::Fill(_), _)))));
        assert!(decode(&hostile).is_err());
    }
    let after = dhat::HeapStats::get();
    dhat::assert_eq!(after.total_blocks, before.total_blocks);
}
