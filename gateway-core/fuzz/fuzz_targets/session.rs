//! Drives one session through arbitrary operations — decoded client frames, lost
//! connections, resumes with arbitrary generations and acks, clock jumps, engine
//! events, transmits — and checks it never panics, stays within its bounds, and only
//! ever transmits valid frames.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use gateway_core::ring::RingLimits;
use gateway_core::session::{Action, CodPolicy, LoginGrant, ResumeClaim, Session, SessionConfig};
use gateway_core::time::Timestamp;
use libfuzzer_sys::fuzz_target;
use matching_stub as engine;
use proto::{CancelOnDisconnect, SessionToken};

const MAX_MESSAGES: usize = 8;

fn byte(data: &mut &[u8]) -> u8 {
    let Some((&first, rest)) = data.split_first() else {
        return 0;
    };
    *data = rest;
    first
}

fn owner() -> engine::Owner {
    engine::Owner {
        account: 1,
        session: 1,
    }
}

fn view(id: u8, leaves: u64) -> engine::OrderView {
    engine::OrderView {
        order_id: u64::from(id),
        client_order_id: u64::from(id % 8),
        owner: owner(),
        instrument: 1,
        side: engine::Side::Buy,
        price: 100,
        quantity: 10,
        filled: 10 - leaves.min(10),
        leaves,
        status: engine::OrderStatus::New,
    }
}

fn event(kind: u8, id: u8) -> engine::Event {
    match kind % 4 {
        0 => engine::Event::Accepted {
            owner: owner(),
            tag: u64::from(id),
            order: view(id, 10),
        },
        1 => engine::Event::Fill(engine::Fill {
            owner: owner(),
            order_id: u64::from(id),
            client_order_id: u64::from(id % 8),
            trade_id: u64::from(id),
            instrument: 1,
            side: engine::Side::Buy,
            price: 100,
            quantity: 1,
            leaves_quantity: u64::from(id % 3),
        }),
        2 => engine::Event::Cancelled {
            owner: owner(),
            requester: owner(),
            tag: None,
            order_id: u64::from(id),
            client_order_id: u64::from(id % 8),
            cancelled_quantity: 1,
            reason: engine::CancelReason::Requested,
        },
        _ => engine::Event::Rejected {
            owner: owner(),
            tag: u64::from(id),
            client_order_id: u64::from(id),
            reason: engine::RejectReason::UnknownOrder,
        },
    }
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let config = Arc::new(SessionConfig {
        ring: RingLimits {
            max_messages: MAX_MESSAGES,
            max_bytes: 400,
        },
        max_messages_per_second: 20,
        max_open_orders: 4,
        max_queued_duplicates: 4,
        ..SessionConfig::default()
    });
    let grant = LoginGrant {
        session_id: 1,
        account: 1,
        cod: CodPolicy {
            mode: CancelOnDisconnect::CancelAll,
            grace: Duration::from_millis(500),
        },
    };
    let mut now = Timestamp::from_millis(1_000_000);
    let mut conn = 1;
    let mut session = Session::login(
        grant,
        conn,
        SessionToken([0; 80]),
        &[],
        Duration::from_secs(5),
        Arc::clone(&config),
        now,
    );
    let mut actions = Vec::new();
    let mut sent = Vec::new();
    while !data.is_empty() {
        match byte(&mut data) % 6 {
            0 => {
                let len = usize::from(byte(&mut data));
                let take = len.min(data.len());
                if let Ok(Some((frame, _))) = proto::decode(&data[..take]) {
                    session.handle_frame(conn, &frame, now, &mut actions);
                }
                data = &data[take..];
            }
            1 => session.connection_lost(conn, now),
            2 => {
                conn += 1;
                let generation = u32::from(byte(&mut data) % 4);
                let resume = proto::Resume {
                    token: SessionToken([0; 80]),
                    last_acked_server_seq: u64::from(byte(&mut data)),
                    next_client_seq: u64::from(byte(&mut data)),
                };
                let claim = ResumeClaim {
                    generation,
                    sent_here: None,
                };
                let mint_and_orders = (|_, _| SessionToken([1; 80]), || None);
                let _ = session.resume(conn, claim, &resume, now, mint_and_orders, &mut actions);
            }
            3 => {
                now = now.plus(Duration::from_millis(u64::from(byte(&mut data)) * 50));
                session.handle_timeout(now, &mut actions);
            }
            4 => {
                let kind = byte(&mut data);
                let id = byte(&mut data);
                session.on_engine_event(&event(kind, id), now, &mut actions);
            }
            _ => {
                sent.clear();
                session.poll_transmit(conn, &mut sent, usize::from(byte(&mut data)));
                for bytes in &sent {
                    let decoded = proto::decode(bytes);
                    assert!(
                        matches!(decoded, Ok(Some((_, used))) if used == bytes.len()),
                        "sent an invalid frame"
                    );
                }
            }
        }
        assert!(session.ring().len() <= MAX_MESSAGES);
        assert!(session.ring().retained_bytes() <= 400 || session.ring().len() == 1);
        // Ended sessions stay ended.
        if actions.iter().any(|a| matches!(a, Action::Ended { .. })) {
            assert!(session.closed_reason().is_some());
        }
        actions.clear();
    }
});
