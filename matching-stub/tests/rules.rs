//! One test per matching rule.

use matching_stub::*;

const INSTRUMENT: InstrumentId = 1;

fn engine() -> OrderBookEngine {
    engine_with_account_limit(1_000)
}

fn engine_with_account_limit(max_working_orders_per_account: usize) -> OrderBookEngine {
    OrderBookEngine::new(EngineConfig {
        instruments: vec![Instrument {
            id: INSTRUMENT,
            tick_size: 5,
            lot_size: 10,
        }],
        finished_orders_per_account: 3,
        max_working_orders_per_account,
    })
    .expect("valid config")
}

fn owner(account: AccountId) -> Owner {
    Owner {
        account,
        session: account * 100,
    }
}

fn limit(account: AccountId, id: u64, side: Side, price: Price, quantity: Quantity) -> Request {
    order(
        account,
        id,
        side,
        OrderType::Limit,
        TimeInForce::Gtc,
        price,
        quantity,
    )
}

fn order(
    account: AccountId,
    id: u64,
    side: Side,
    order_type: OrderType,
    time_in_force: TimeInForce,
    price: Price,
    quantity: Quantity,
) -> Request {
    Request::New(NewOrder {
        owner: owner(account),
        tag: id,
        client_order_id: id,
        instrument: INSTRUMENT,
        side,
        order_type,
        time_in_force,
        price,
        quantity,
    })
}

fn run(engine: &mut OrderBookEngine, request: Request) -> Vec<Event> {
    let mut events = Vec::new();
    engine.handle(request, &mut events);
    events
}

fn fills(events: &[Event]) -> Vec<Fill> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Fill(fill) => Some(*fill),
            _ => None,
        })
        .collect()
}

fn rejection(events: &[Event]) -> Option<RejectReason> {
    match events {
        [Event::Rejected { reason, .. }] => Some(*reason),
        _ => None,
    }
}

fn cancel_reason(events: &[Event]) -> Option<(CancelReason, Quantity)> {
    events.iter().find_map(|e| match e {
        Event::Cancelled {
            reason,
            cancelled_quantity,
            ..
        } => Some((*reason, *cancelled_quantity)),
        _ => None,
    })
}

#[test]
fn non_crossing_orders_rest_and_set_the_best_prices() {
    let mut engine = engine();
    let events = run(&mut engine, limit(1, 1, Side::Buy, 100, 10));
    assert!(
        matches!(events.as_slice(), [Event::Accepted { order, tag: 1, .. }] if order.order_id == 1)
    );
    run(&mut engine, limit(2, 1, Side::Sell, 105, 10));
    assert_eq!(engine.best_prices(INSTRUMENT), Some((Some(100), Some(105))));
    assert_eq!(engine.working_order_count(), 2);
}

#[test]
fn a_crossing_order_fills_both_sides_at_the_resting_price() {
    let mut engine = engine();
    run(&mut engine, limit(1, 11, Side::Sell, 100, 30));
    let events = run(&mut engine, limit(2, 22, Side::Buy, 110, 30));
    let fills = fills(&events);
    assert_eq!(fills.len(), 2);
    let (aggressor, resting) = (fills[0], fills[1]);
    assert_eq!(aggressor.trade_id, resting.trade_id);
    assert_eq!(
        (aggressor.owner, aggressor.client_order_id, aggressor.side),
        (owner(2), 22, Side::Buy)
    );
    assert_eq!(
        (resting.owner, resting.client_order_id, resting.side),
        (owner(1), 11, Side::Sell)
    );
    for fill in fills {
        assert_eq!(
            (fill.price, fill.quantity, fill.leaves_quantity),
            (100, 30, 0)
        );
    }
    assert_eq!(engine.working_order_count(), 0);
    assert_eq!(engine.best_prices(INSTRUMENT), Some((None, None)));
}

#[test]
fn better_price_trades_first_then_earlier_time() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Sell, 105, 10));
    run(&mut engine, limit(1, 2, Side::Sell, 100, 10));
    run(&mut engine, limit(1, 3, Side::Sell, 100, 10));
    let events = run(&mut engine, limit(2, 9, Side::Buy, 105, 30));
    let resting: Vec<(u64, Price)> = fills(&events)
        .iter()
        .filter(|f| f.side == Side::Sell)
        .map(|f| (f.client_order_id, f.price))
        .collect();
    assert_eq!(resting, [(2, 100), (3, 100), (1, 105)]);
}

#[test]
fn partial_fills_leave_the_remainder_working() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Buy, 100, 50));
    let events = run(&mut engine, limit(2, 1, Side::Sell, 100, 20));
    let resting = fills(&events)[1];
    assert_eq!((resting.quantity, resting.leaves_quantity), (20, 30));
    let views = engine.orders_of(1);
    assert_eq!(
        (views[0].filled, views[0].leaves, views[0].status),
        (20, 30, OrderStatus::PartiallyFilled)
    );
}

#[test]
fn market_orders_sweep_levels_and_cancel_the_rest() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Sell, 100, 10));
    run(&mut engine, limit(1, 2, Side::Sell, 120, 10));
    let events = run(
        &mut engine,
        order(2, 1, Side::Buy, OrderType::Market, TimeInForce::Ioc, 0, 30),
    );
    let prices: Vec<Price> = fills(&events)
        .iter()
        .filter(|f| f.side == Side::Buy)
        .map(|f| f.price)
        .collect();
    assert_eq!(prices, [100, 120]);
    assert_eq!(
        cancel_reason(&events),
        Some((CancelReason::ImmediateRemainder, 10))
    );
}

#[test]
fn market_orders_must_be_immediate_and_unpriced() {
    let mut engine = engine();
    let gtc = run(
        &mut engine,
        order(2, 1, Side::Buy, OrderType::Market, TimeInForce::Gtc, 0, 10),
    );
    assert_eq!(rejection(&gtc), Some(RejectReason::InvalidTimeInForce));
    let priced = run(
        &mut engine,
        order(
            2,
            1,
            Side::Buy,
            OrderType::Market,
            TimeInForce::Ioc,
            100,
            10,
        ),
    );
    assert_eq!(rejection(&priced), Some(RejectReason::InvalidPrice));
}

#[test]
fn ioc_limit_cancels_what_does_not_fill_at_its_price() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Sell, 100, 10));
    run(&mut engine, limit(1, 2, Side::Sell, 110, 10));
    let events = run(
        &mut engine,
        order(2, 1, Side::Buy, OrderType::Limit, TimeInForce::Ioc, 105, 30),
    );
    assert_eq!(fills(&events).len(), 2);
    assert_eq!(
        cancel_reason(&events),
        Some((CancelReason::ImmediateRemainder, 20))
    );
    assert_eq!(engine.best_prices(INSTRUMENT), Some((None, Some(110))));
}

#[test]
fn fok_fills_completely_or_not_at_all() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Sell, 100, 10));
    run(&mut engine, limit(1, 2, Side::Sell, 105, 10));
    let killed = run(
        &mut engine,
        order(2, 1, Side::Buy, OrderType::Limit, TimeInForce::Fok, 105, 30),
    );
    assert!(fills(&killed).is_empty());
    assert_eq!(cancel_reason(&killed), Some((CancelReason::FillOrKill, 30)));
    assert_eq!(engine.working_order_count(), 2);

    let filled = run(
        &mut engine,
        order(2, 2, Side::Buy, OrderType::Limit, TimeInForce::Fok, 105, 20),
    );
    assert_eq!(fills(&filled).len(), 4);
    assert_eq!(cancel_reason(&filled), None);
}

#[test]
fn cancel_removes_a_working_order_of_the_same_account_only() {
    let mut engine = engine();
    run(&mut engine, limit(1, 7, Side::Buy, 100, 10));
    let other_account = run(
        &mut engine,
        Request::Cancel {
            owner: owner(2),
            tag: 5,
            client_order_id: 7,
        },
    );
    assert_eq!(rejection(&other_account), Some(RejectReason::UnknownOrder));

    let events = run(
        &mut engine,
        Request::Cancel {
            owner: owner(1),
            tag: 6,
            client_order_id: 7,
        },
    );
    assert!(matches!(
        events.as_slice(),
        [Event::Cancelled {
            tag: Some(6),
            cancelled_quantity: 10,
            reason: CancelReason::Requested,
            ..
        }]
    ));
    assert_eq!(engine.best_prices(INSTRUMENT), Some((None, None)));
    let again = run(
        &mut engine,
        Request::Cancel {
            owner: owner(1),
            tag: 8,
            client_order_id: 7,
        },
    );
    assert_eq!(rejection(&again), Some(RejectReason::UnknownOrder));
}

fn replace(account: AccountId, id: u64, price: Price, quantity: Quantity) -> Request {
    Request::Replace {
        owner: owner(account),
        tag: 99,
        client_order_id: id,
        price,
        quantity,
    }
}

/// Which resting sell trades first against a buy of 10 at 100.
fn first_to_trade(engine: &mut OrderBookEngine) -> u64 {
    let events = run(engine, limit(9, 1000, Side::Buy, 100, 10));
    fills(&events)
        .iter()
        .find(|f| f.side == Side::Sell)
        .expect("a trade")
        .client_order_id
}

#[test]
fn replace_keeps_priority_on_a_quantity_decrease() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Sell, 100, 30));
    run(&mut engine, limit(1, 2, Side::Sell, 100, 30));
    let events = run(&mut engine, replace(1, 1, 100, 20));
    assert!(matches!(events.as_slice(), [Event::Replaced { order, .. }] if order.leaves == 20));
    assert_eq!(first_to_trade(&mut engine), 1);
}

#[test]
fn replace_loses_priority_on_a_quantity_increase_or_price_change() {
    for (price, quantity) in [(100, 40), (105, 30)] {
        let mut engine = engine();
        run(&mut engine, limit(1, 1, Side::Sell, 100, 30));
        run(&mut engine, limit(1, 2, Side::Sell, 100, 30));
        run(&mut engine, replace(1, 1, price, quantity));
        run(&mut engine, replace(1, 1, 100, 30));
        assert_eq!(
            first_to_trade(&mut engine),
            2,
            "after replace to {price}/{quantity}"
        );
    }
}

#[test]
fn replace_to_a_crossing_price_trades() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Buy, 100, 10));
    run(&mut engine, limit(2, 1, Side::Sell, 110, 10));
    let events = run(&mut engine, replace(2, 1, 100, 10));
    assert!(matches!(events[0], Event::Replaced { .. }));
    assert_eq!(fills(&events).len(), 2);
    assert_eq!(engine.working_order_count(), 0);
}

#[test]
fn replace_below_the_filled_quantity_is_rejected() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Buy, 100, 50));
    run(&mut engine, limit(2, 1, Side::Sell, 100, 30));
    let events = run(&mut engine, replace(1, 1, 100, 30));
    assert_eq!(rejection(&events), Some(RejectReason::InvalidQuantity));
    let events = run(&mut engine, replace(1, 1, 100, 40));
    assert!(matches!(events.as_slice(), [Event::Replaced { order, .. }] if order.leaves == 10));
}

#[test]
fn invalid_orders_are_rejected_with_their_reason() {
    let mut engine = engine();
    let unknown = Request::New(NewOrder {
        instrument: 77,
        ..match limit(1, 1, Side::Buy, 100, 10) {
            Request::New(order) => order,
            _ => unreachable!(),
        }
    });
    assert_eq!(
        rejection(&run(&mut engine, unknown)),
        Some(RejectReason::UnknownInstrument)
    );
    let cases = [
        (limit(1, 1, Side::Buy, 102, 10), RejectReason::PriceOffTick),
        (limit(1, 1, Side::Buy, 0, 10), RejectReason::InvalidPrice),
        (limit(1, 1, Side::Buy, -5, 10), RejectReason::InvalidPrice),
        (
            limit(1, 1, Side::Buy, 100, 0),
            RejectReason::InvalidQuantity,
        ),
        (
            limit(1, 1, Side::Buy, 100, 15),
            RejectReason::InvalidQuantity,
        ),
    ];
    for (request, reason) in cases {
        assert_eq!(
            rejection(&run(&mut engine, request)),
            Some(reason),
            "{request:?}"
        );
    }
    assert_eq!(engine.working_order_count(), 0);
}

#[test]
fn a_client_order_id_is_unique_among_working_orders_and_reusable_after() {
    let mut engine = engine();
    run(&mut engine, limit(1, 5, Side::Buy, 100, 10));
    let duplicate = run(&mut engine, limit(1, 5, Side::Buy, 95, 10));
    assert_eq!(
        rejection(&duplicate),
        Some(RejectReason::DuplicateClientOrderId)
    );
    let other_account = run(&mut engine, limit(2, 5, Side::Buy, 95, 10));
    assert!(matches!(other_account[0], Event::Accepted { .. }));
    run(
        &mut engine,
        Request::Cancel {
            owner: owner(1),
            tag: 0,
            client_order_id: 5,
        },
    );
    assert!(matches!(
        run(&mut engine, limit(1, 5, Side::Buy, 95, 10))[0],
        Event::Accepted { .. }
    ));
}

#[test]
fn mass_cancel_by_session_spares_other_sessions_of_the_account() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Buy, 100, 10));
    let other_session = Owner {
        account: 1,
        session: 555,
    };
    engine.handle(
        Request::New(NewOrder {
            owner: other_session,
            tag: 2,
            client_order_id: 2,
            instrument: INSTRUMENT,
            side: Side::Buy,
            order_type: OrderType::Limit,
            time_in_force: TimeInForce::Gtc,
            price: 95,
            quantity: 10,
        }),
        &mut Vec::new(),
    );
    let events = run(
        &mut engine,
        Request::MassCancel {
            scope: MassCancelScope::Session(owner(1)),
            reason: CancelReason::CancelOnDisconnect,
        },
    );
    assert_eq!(events.len(), 2);
    assert_eq!(
        cancel_reason(&events),
        Some((CancelReason::CancelOnDisconnect, 10))
    );
    assert_eq!(
        events[1],
        Event::MassCancelDone {
            scope: MassCancelScope::Session(owner(1))
        }
    );
    let events = run(
        &mut engine,
        Request::MassCancel {
            scope: MassCancelScope::Account(1),
            reason: CancelReason::SessionEnded,
        },
    );
    assert!(
        matches!(events.as_slice(), [Event::Cancelled { owner, .. }, Event::MassCancelDone { .. }] if *owner == other_session)
    );
    assert_eq!(engine.working_order_count(), 0);
}

#[test]
fn query_reports_working_orders_then_bounded_finished_history() {
    let mut engine = engine();
    for id in 1..=5 {
        run(&mut engine, limit(1, id, Side::Buy, 100, 10));
        run(
            &mut engine,
            Request::Cancel {
                owner: owner(1),
                tag: 0,
                client_order_id: id,
            },
        );
    }
    run(&mut engine, limit(1, 6, Side::Buy, 100, 10));
    let events = run(&mut engine, Request::QueryOrders { account: 1, tag: 4 });
    let [Event::OrderStates {
        account: 1,
        tag: 4,
        orders,
    }] = events.as_slice()
    else {
        panic!("expected one OrderStates, got {events:?}");
    };
    let summary: Vec<(u64, OrderStatus)> = orders
        .iter()
        .map(|o| (o.client_order_id, o.status))
        .collect();
    assert_eq!(
        summary,
        [
            (6, OrderStatus::New),
            (3, OrderStatus::Cancelled),
            (4, OrderStatus::Cancelled),
            (5, OrderStatus::Cancelled)
        ]
    );
}

#[test]
fn bad_instrument_config_is_refused() {
    let bad = |tick_size, lot_size| {
        OrderBookEngine::new(EngineConfig::with_instruments(vec![Instrument {
            id: 3,
            tick_size,
            lot_size,
        }]))
        .err()
    };
    assert_eq!(bad(0, 1), Some(ConfigError::InvalidGrid(3)));
    assert_eq!(bad(1, 0), Some(ConfigError::InvalidGrid(3)));
    let twice = Instrument {
        id: 4,
        tick_size: 1,
        lot_size: 1,
    };
    let err = OrderBookEngine::new(EngineConfig::with_instruments(vec![twice, twice])).err();
    assert_eq!(err, Some(ConfigError::DuplicateInstrument(4)));
}

#[test]
fn an_account_at_its_working_order_limit_is_refused_whichever_session_asks() {
    let mut engine = engine_with_account_limit(4);
    for id in 1..=4 {
        let mut order = limit(1, id, Side::Buy, 100, 10);
        if let Request::New(new) = &mut order {
            new.owner.session = 100 + id;
        }
        assert!(matches!(
            run(&mut engine, order).as_slice(),
            [Event::Accepted { .. }]
        ));
    }
    let events = run(&mut engine, limit(1, 5, Side::Buy, 100, 10));
    assert!(matches!(
        events.as_slice(),
        [Event::Rejected {
            reason: RejectReason::TooManyOpenOrders,
            ..
        }]
    ));
    run(
        &mut engine,
        Request::Cancel {
            owner: owner(1),
            tag: 9,
            client_order_id: 1,
        },
    );
    let events = run(&mut engine, limit(1, 5, Side::Buy, 100, 10));
    assert!(matches!(events.as_slice(), [Event::Accepted { .. }]));
}

#[test]
fn a_cancel_or_replace_from_another_session_names_both_owner_and_requester() {
    let mut engine = engine();
    run(&mut engine, limit(1, 1, Side::Buy, 100, 20));
    let other = Owner {
        account: 1,
        session: 7,
    };
    let events = run(
        &mut engine,
        Request::Replace {
            owner: other,
            tag: 3,
            client_order_id: 1,
            price: 100,
            quantity: 10,
        },
    );
    assert!(matches!(
        events.as_slice(),
        [Event::Replaced { owner: o, requester, tag: 3, .. }] if *o == owner(1) && *requester == other
    ));
    assert_eq!(events[0].requester(), Some(other));
    let events = run(
        &mut engine,
        Request::Cancel {
            owner: other,
            tag: 4,
            client_order_id: 1,
        },
    );
    assert!(matches!(
        events.as_slice(),
        [Event::Cancelled { owner: o, requester, tag: Some(4), .. }] if *o == owner(1) && *requester == other
    ));
    assert_eq!(events[0].owner(), Some(owner(1)));
}
