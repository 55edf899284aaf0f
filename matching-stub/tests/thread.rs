//! The engine on its own thread: ordering, delivery, back-pressure and shutdown.

use std::sync::mpsc;

use matching_stub::*;

fn engine() -> OrderBookEngine {
    OrderBookEngine::new(EngineConfig::with_instruments(vec![Instrument {
        id: 1,
        tick_size: 1,
        lot_size: 1,
    }]))
    .expect("valid config")
}

/// The tags of the `Accepted` events received, in order; any other event fails.
fn accepted_tags(rx: &mpsc::Receiver<Event>) -> Vec<u64> {
    rx.iter()
        .map(|event| match event {
            Event::Accepted { tag, .. } => tag,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

fn buy(id: u64) -> Request {
    Request::New(NewOrder {
        owner: Owner {
            account: 1,
            session: 1,
        },
        tag: id,
        client_order_id: id,
        instrument: 1,
        side: Side::Buy,
        order_type: OrderType::Limit,
        time_in_force: TimeInForce::Gtc,
        price: 10,
        quantity: 1,
    })
}

#[test]
fn events_arrive_in_submission_order_and_shutdown_returns_the_engine() {
    let (tx, rx) = mpsc::channel();
    let thread = EngineThread::spawn(engine(), 16, move |events: &mut Vec<Event>| {
        for event in events.drain(..) {
            tx.send(event).expect("test receiver alive");
        }
    })
    .expect("spawn");
    let sender = thread.sender();
    for id in 1..=100 {
        sender.submit(buy(id)).expect("running");
    }
    let engine = thread.shutdown().expect("engine thread did not panic");
    assert_eq!(engine.working_order_count(), 100);
    let tags = accepted_tags(&rx);
    assert_eq!(tags, (1..=100).collect::<Vec<_>>());
    assert!(matches!(
        sender.try_submit(buy(101)),
        Err(SubmitError::Stopped(_))
    ));
}

#[test]
fn a_full_queue_hands_the_request_back() {
    let (release, wait) = mpsc::channel::<()>();
    let (delivered, deliveries) = mpsc::channel::<()>();
    // The sink blocks until released, so the engine stops draining the queue.
    let thread = EngineThread::spawn(engine(), 1, move |_: &mut Vec<Event>| {
        delivered.send(()).expect("test alive");
        let _ = wait.recv();
    })
    .expect("spawn");
    let sender = thread.sender();
    sender.submit(buy(1)).expect("queued");
    deliveries.recv().expect("first batch delivered"); // engine now blocked in the sink
    sender.submit(buy(2)).expect("fills the one queue slot");
    assert_eq!(sender.try_submit(buy(3)), Err(SubmitError::Full(buy(3))));
    drop(release);
    assert_eq!(
        thread.shutdown().expect("no panic").working_order_count(),
        2
    );
}

#[test]
fn a_backlog_larger_than_a_batch_is_handled_completely_and_in_order() {
    let (release, wait) = mpsc::channel::<()>();
    let (tx, rx) = mpsc::channel();
    let mut first_batch = true;
    // The sink holds the engine on its first batch while a backlog of several
    // batches builds up in the queue.
    let thread = EngineThread::spawn(engine(), 4_096, move |events: &mut Vec<Event>| {
        if std::mem::take(&mut first_batch) {
            let _ = wait.recv();
        }
        for event in events.drain(..) {
            tx.send(event).expect("test receiver alive");
        }
    })
    .expect("spawn");
    let sender = thread.sender();
    let total = 3 * matching_stub::thread::MAX_BATCH as u64 + 17;
    for id in 1..=total {
        sender.submit(buy(id)).expect("queued");
    }
    drop(release);
    let engine = thread.shutdown().expect("no panic");
    assert_eq!(
        engine.working_order_count() as u64,
        total,
        "no request was dropped"
    );
    let tags = accepted_tags(&rx);
    assert_eq!(tags, (1..=total).collect::<Vec<_>>());
}
