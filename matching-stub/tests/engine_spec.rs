//! Keeps ENGINE.md and the code in step: its worked examples are decoded here and
//! must be what the text says they are, byte for byte.

use matching_stub::wire::{self, Answers, BatchAnswer, RequestBatch};
use matching_stub::*;

const SPEC: &str = include_str!("../../ENGINE.md");

/// The contents of the fenced block with the given info string.
fn fenced(info: &str) -> &'static str {
    let open = format!("```{info}\n");
    let start = SPEC
        .find(&open)
        .unwrap_or_else(|| panic!("ENGINE.md has no ```{info} block"))
        + open.len();
    let len = SPEC[start..].find("```").expect("block is closed");
    &SPEC[start..start + len]
}

fn hex_bytes(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|pair| u8::from_str_radix(pair, 16).expect("hex byte"))
        .collect()
}

const TAKER: Owner = Owner {
    account: 1001,
    session: 5,
};
const MAKER: Owner = Owner {
    account: 1002,
    session: 6,
};

fn example_batch() -> RequestBatch {
    RequestBatch {
        first_request: 7,
        requests: vec![
            Request::New(NewOrder {
                owner: TAKER,
                tag: 12,
                client_order_id: 42,
                instrument: 1,
                side: Side::Buy,
                order_type: OrderType::Limit,
                time_in_force: TimeInForce::Gtc,
                price: 100,
                quantity: 10,
            }),
            Request::Cancel {
                owner: TAKER,
                tag: 13,
                client_order_id: 41,
            },
        ],
    }
}

fn example_answers() -> Answers {
    let accepted = OrderView {
        order_id: 8,
        client_order_id: 42,
        owner: TAKER,
        instrument: 1,
        side: Side::Buy,
        price: 100,
        quantity: 10,
        filled: 0,
        leaves: 10,
        status: OrderStatus::New,
    };
    let fill = |owner, order_id, client_order_id, side| {
        Event::Fill(Fill {
            owner,
            order_id,
            client_order_id,
            trade_id: 4,
            instrument: 1,
            side,
            price: 100,
            quantity: 10,
            leaves_quantity: 0,
        })
    };
    Answers {
        engine: "engine-a".into(),
        batches: vec![BatchAnswer {
            batch: 3,
            first_request: 7,
            events: vec![
                vec![
                    Event::Accepted {
                        owner: TAKER,
                        tag: 12,
                        order: accepted,
                    },
                    fill(TAKER, 8, 42, Side::Buy),
                    fill(MAKER, 7, 7, Side::Sell),
                ],
                vec![Event::Rejected {
                    owner: TAKER,
                    tag: 13,
                    client_order_id: 41,
                    reason: RejectReason::UnknownOrder,
                }],
            ],
        }],
    }
}

/// Prints a value's bytes as ENGINE.md shows them (`cargo test -- --nocapture`).
fn show(bytes: &[u8]) {
    for line in bytes.chunks(16) {
        let pairs: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        println!("{}", pairs.join(" "));
    }
}

#[test]
fn the_requests_example_is_the_batch_the_text_describes() {
    let encoded = example_batch().encode();
    show(&encoded);
    let spec = hex_bytes(fenced("hex requests-example"));
    assert_eq!(spec, encoded);
    assert_eq!(RequestBatch::decode(&spec), Ok(example_batch()));
}

#[test]
fn the_answers_example_is_the_answer_the_text_describes() {
    let encoded = example_answers().encode();
    show(&encoded);
    let spec = hex_bytes(fenced("hex answers-example"));
    assert_eq!(spec, encoded);
    assert_eq!(Answers::decode(&spec), Ok(example_answers()));
}

#[test]
fn the_example_answer_is_what_the_bundled_book_answers() {
    let mut book = OrderBookEngine::new(EngineConfig::with_instruments(vec![Instrument {
        id: 1,
        tick_size: 1,
        lot_size: 1,
    }]))
    .expect("book");
    // Six orders that traded in three trades, then the maker's seventh, resting at
    // 100: the taker's order is the eighth, its trade the fourth.
    let mut ignored = Vec::new();
    let mut next = 1;
    while next <= 6 {
        for (owner, side) in [(MAKER, Side::Sell), (TAKER, Side::Buy)] {
            book.handle(
                Request::New(NewOrder {
                    owner,
                    tag: 0,
                    client_order_id: 100 + next,
                    instrument: 1,
                    side,
                    order_type: OrderType::Limit,
                    time_in_force: TimeInForce::Gtc,
                    price: 50,
                    quantity: 1,
                }),
                &mut ignored,
            );
        }
        next += 2;
    }
    book.handle(
        Request::New(NewOrder {
            owner: MAKER,
            tag: 0,
            client_order_id: 7,
            instrument: 1,
            side: Side::Sell,
            order_type: OrderType::Limit,
            time_in_force: TimeInForce::Gtc,
            price: 100,
            quantity: 10,
        }),
        &mut ignored,
    );
    let events: Vec<Vec<Event>> = example_batch()
        .requests
        .into_iter()
        .map(|request| {
            let mut caused = Vec::new();
            book.handle(request, &mut caused);
            caused
        })
        .collect();
    assert_eq!(events, example_answers().batches[0].events);
}

#[test]
fn the_request_table_gives_each_request_its_encoded_size() {
    // `| 1 | `New` | ... (55 bytes) |`: the type byte, then that many.
    let sizes: Vec<(u8, usize)> = SPEC
        .lines()
        .filter(|line| line.starts_with("| ") && line.ends_with(" bytes) |"))
        .filter_map(|line| {
            let kind = line.split('|').nth(1)?.trim().parse().ok()?;
            let (_, tail) = line.rsplit_once('(')?;
            let bytes = tail.split_whitespace().next()?.parse().ok()?;
            Some((kind, bytes))
        })
        .collect();
    let mut requests = example_batch().requests;
    requests.push(Request::Replace {
        owner: TAKER,
        tag: 1,
        client_order_id: 2,
        price: 3,
        quantity: 4,
    });
    requests.push(Request::MassCancel {
        scope: MassCancelScope::Account(1001),
        reason: CancelReason::KillSwitch,
    });
    requests.push(Request::QueryOrders {
        account: 1001,
        tag: 5,
    });
    assert_eq!(sizes.len(), 5, "{sizes:?}");
    for request in requests {
        let encoded = RequestBatch {
            first_request: 1,
            requests: vec![request],
        }
        .encode();
        let kind = encoded[wire::REQUESTS_HEADER_LEN];
        let table = sizes
            .iter()
            .find(|(k, _)| *k == kind)
            .unwrap_or_else(|| panic!("request type {kind} in the table"));
        assert_eq!(wire::request_len(&request), 1 + table.1, "type {kind}");
    }
}
