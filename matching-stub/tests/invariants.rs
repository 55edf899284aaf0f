//! Property tests: random request streams keep the book's invariants.

use std::collections::HashMap;

use matching_stub::*;
use proptest::prelude::*;

const INSTRUMENT: InstrumentId = 1;

fn engine() -> OrderBookEngine {
    OrderBookEngine::new(EngineConfig {
        instruments: vec![Instrument {
            id: INSTRUMENT,
            tick_size: 5,
            lot_size: 10,
        }],
        finished_orders_per_account: usize::MAX,
        max_working_orders_per_account: usize::MAX,
    })
    .expect("valid config")
}

fn owner(account: AccountId) -> Owner {
    Owner {
        account,
        session: account,
    }
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Buy), Just(Side::Sell)]
}

/// Requests over a narrow price band so that orders cross often.
fn request() -> impl Strategy<Value = Request> {
    let account = 1..4u64;
    let id = 0..12u64;
    let price = (18..=22i64).prop_map(|p| p * 5);
    let quantity = (1..6u64).prop_map(|q| q * 10);
    let tif = prop_oneof![4 => Just(TimeInForce::Gtc), 1 => Just(TimeInForce::Ioc), 1 => Just(TimeInForce::Fok)];
    prop_oneof![
        6 => (account.clone(), id.clone(), side(), price.clone(), quantity.clone(), tif.clone(), any::<bool>())
            .prop_map(|(account, id, side, price, quantity, time_in_force, market)| {
                let (order_type, price, time_in_force) = if market && time_in_force != TimeInForce::Gtc {
                    (OrderType::Market, 0, time_in_force)
                } else {
                    (OrderType::Limit, price, time_in_force)
                };
                Request::New(NewOrder {
                    owner: owner(account), tag: id, client_order_id: id, instrument: INSTRUMENT,
                    side, order_type, time_in_force, price, quantity,
                })
            }),
        2 => (account.clone(), id.clone()).prop_map(|(account, id)| Request::Cancel {
            owner: owner(account), tag: id, client_order_id: id,
        }),
        2 => (account.clone(), id, price, quantity).prop_map(|(account, id, price, quantity)| Request::Replace {
            owner: owner(account), tag: id, client_order_id: id, price, quantity,
        }),
        1 => account.prop_map(|account| Request::MassCancel {
            scope: MassCancelScope::Account(account), reason: CancelReason::SessionEnded,
        }),
    ]
}

fn run_all(requests: &[Request]) -> (OrderBookEngine, Vec<Event>) {
    let mut engine = engine();
    let mut events = Vec::new();
    for request in requests {
        engine.handle(*request, &mut events);
    }
    (engine, events)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_book_is_never_crossed_at_rest(requests in proptest::collection::vec(request(), 1..200)) {
        let mut engine = engine();
        let mut events = Vec::new();
        for request in requests {
            engine.handle(request, &mut events);
            if let Some((Some(bid), Some(ask))) = engine.best_prices(INSTRUMENT) {
                prop_assert!(bid < ask, "crossed book: bid {} ask {} after {:?}", bid, ask, request);
            }
        }
    }

    #[test]
    fn every_trade_has_one_fill_on_each_side(requests in proptest::collection::vec(request(), 1..200)) {
        let (_, events) = run_all(&requests);
        let mut trades: HashMap<TradeId, Vec<Fill>> = HashMap::new();
        for event in &events {
            if let Event::Fill(fill) = event {
                trades.entry(fill.trade_id).or_default().push(*fill);
            }
        }
        for (trade_id, fills) in trades {
            prop_assert_eq!(fills.len(), 2, "trade {}", trade_id);
            let (a, b) = (fills[0], fills[1]);
            prop_assert_eq!(a.side, b.side.opposite());
            prop_assert_eq!((a.price, a.quantity, a.instrument), (b.price, b.quantity, b.instrument));
            prop_assert_ne!(a.order_id, b.order_id);
        }
    }

    #[test]
    fn quantities_are_conserved_for_every_order(requests in proptest::collection::vec(request(), 1..200)) {
        let (engine, events) = run_all(&requests);
        let mut filled: HashMap<OrderId, Quantity> = HashMap::new();
        let mut cancelled: HashMap<OrderId, Quantity> = HashMap::new();
        for event in &events {
            match event {
                Event::Fill(fill) => *filled.entry(fill.order_id).or_default() += fill.quantity,
                Event::Cancelled { order_id, cancelled_quantity, .. } => {
                    prop_assert!(cancelled.insert(*order_id, *cancelled_quantity).is_none(), "cancelled twice");
                }
                _ => {}
            }
        }
        for account in 1..4 {
            for view in engine.orders_of(account) {
                let fills = filled.get(&view.order_id).copied().unwrap_or(0);
                prop_assert_eq!(view.filled, fills, "{:?}", view);
                match view.status {
                    OrderStatus::New | OrderStatus::PartiallyFilled => {
                        prop_assert_eq!(view.filled + view.leaves, view.quantity, "{:?}", view);
                        prop_assert!(view.leaves > 0);
                    }
                    OrderStatus::Filled => prop_assert_eq!(view.filled, view.quantity, "{:?}", view),
                    OrderStatus::Cancelled => {
                        let gone = cancelled.get(&view.order_id).copied().unwrap_or(0);
                        prop_assert_eq!(view.filled + gone, view.quantity, "{:?}", view);
                    }
                }
            }
        }
    }

    #[test]
    fn the_same_requests_give_the_same_events(requests in proptest::collection::vec(request(), 1..200)) {
        prop_assert_eq!(run_all(&requests).1, run_all(&requests).1);
    }
}
