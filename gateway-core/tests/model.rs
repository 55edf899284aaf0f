//! Model-based property test: random interleavings of client sends, partial
//! deliveries both ways, acks, dropped connections (losing whatever was in flight),
//! resumes and takeovers, checked against a simple reference model.
//!
//! The model: session `s` must receive exactly the engine events about its orders,
//! in the order the engine produced them, numbered 1, 2, 3, ...; and every client
//! sequence number reaches the engine exactly once. The simulated client asserts
//! gap-free, duplicate-free delivery on every frame it receives. The same holds when
//! the core is replaced, now and then, by what its snapshot restores.

mod support;

use gateway_core::convert::event_to_wire;
use gateway_core::ring::RingLimits;
use gateway_core::session::SessionConfig;
use proptest::prelude::*;
use proto::Side;
use support::*;

#[derive(Debug, Clone)]
enum Op {
    Order {
        client: usize,
        buy: bool,
        price: i64,
        quantity: u64,
    },
    Cancel {
        client: usize,
        back: u64,
    },
    DeliverToGateway {
        client: usize,
        n: usize,
    },
    Transmit {
        client: usize,
        max: usize,
    },
    DeliverToClient {
        client: usize,
        n: usize,
    },
    Ack {
        client: usize,
    },
    DropConnection {
        client: usize,
    },
    Resume {
        client: usize,
    },
    /// The core is replaced by what its snapshot restores; with `restart`, the
    /// gateway restarted too (every connection gone).
    Restore {
        restart: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0..2usize;
    prop_oneof![
        4 => (client.clone(), any::<bool>(), 98..=102i64, 1..4u64)
            .prop_map(|(client, buy, price, quantity)| Op::Order { client, buy, price, quantity }),
        1 => (client.clone(), 1..6u64).prop_map(|(client, back)| Op::Cancel { client, back }),
        4 => (client.clone(), 1..4usize).prop_map(|(client, n)| Op::DeliverToGateway { client, n }),
        4 => (client.clone(), 1..8usize).prop_map(|(client, max)| Op::Transmit { client, max }),
        4 => (client.clone(), 1..8usize).prop_map(|(client, n)| Op::DeliverToClient { client, n }),
        2 => client.clone().prop_map(|client| Op::Ack { client }),
        1 => client.clone().prop_map(|client| Op::DropConnection { client }),
        1 => client.prop_map(|client| Op::Resume { client }),
    ]
}

/// [`op`], and now and then a restore of the core from its snapshot.
fn op_or_restore() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => op(),
        1 => any::<bool>().prop_map(|restart| Op::Restore { restart }),
    ]
}

/// Applies one op to the simulated gateway and its two clients.
fn apply(
    sim: &mut Sim,
    clients: &mut [Client; 2],
    next_order_id: &mut [u64; 2],
    op: &Op,
) -> Result<(), TestCaseError> {
    match *op {
        Op::Order {
            client,
            buy,
            price,
            quantity,
        } => {
            let side = if buy { Side::Buy } else { Side::Sell };
            clients[client].new_order(next_order_id[client], side, price, quantity);
            next_order_id[client] += 1;
        }
        Op::Cancel { client, back } => {
            let target = next_order_id[client].saturating_sub(back).max(1);
            clients[client].cancel(target);
        }
        Op::DeliverToGateway { client, n } => sim.deliver_to_gateway(&mut clients[client], n),
        Op::Transmit { client, max } => {
            sim.transmit(&mut clients[client], max);
        }
        Op::DeliverToClient { client, n } => sim.deliver_to_client(&mut clients[client], n),
        Op::Ack { client } => clients[client].ack(),
        Op::DropConnection { client } => sim.drop_connection(&mut clients[client]),
        // With the connection still up this is a takeover of a half-open one.
        Op::Resume { client } => sim
            .resume(&mut clients[client])
            .map_err(|reason| TestCaseError::fail(format!("resume refused: {reason:?}")))?,
        Op::Restore { restart } => sim.restore_from_snapshot(clients, restart),
    }
    // A connection the gateway closed is dead for the client too.
    for client in clients.iter_mut() {
        if client.conn.is_some_and(|c| sim.is_closed(c).is_some()) {
            sim.drop_connection(client);
        }
    }
    Ok(())
}

fn run(ops: &[Op], config: SessionConfig) -> Result<(), TestCaseError> {
    let mut sim = Sim::new(config);
    let mut clients = [sim.login(1, NO_COD), sim.login(2, NO_COD)];
    let mut next_order_id = [1u64, 1u64];

    for op in ops {
        apply(&mut sim, &mut clients, &mut next_order_id, op)?;
        for client in &clients {
            for seq in 1..client.next_client_seq {
                prop_assert!(
                    times_executed(&sim, client.session_id, seq) <= 1,
                    "seq {} executed twice",
                    seq
                );
            }
        }
    }

    // Reconnect everyone and let everything drain, acknowledging as a client must
    // (requests wait for acks to free room for their answers).
    for _ in 0..64 {
        for client in &mut clients {
            if client.conn.is_none() {
                sim.resume(client)
                    .map_err(|reason| TestCaseError::fail(format!("final resume: {reason:?}")))?;
            }
            sim.settle(client);
            client.ack();
            sim.settle(client);
        }
    }
    for client in &clients {
        prop_assert!(
            client.unanswered().is_empty(),
            "unanswered: {:?}",
            client.unanswered()
        );
        for seq in 1..client.next_client_seq {
            prop_assert_eq!(
                times_executed(&sim, client.session_id, seq),
                1,
                "client seq {}",
                seq
            );
        }
        let expected: Vec<proto::Frame> = sim
            .routed
            .iter()
            .filter(|event| {
                event
                    .owner()
                    .is_some_and(|owner| owner.session == client.session_id)
            })
            .enumerate()
            .filter_map(|(index, event)| event_to_wire(event, index as u64 + 1))
            .collect();
        // Every message arrives once, in order; only a snapshot (a resume beyond the
        // window) may stand in for some of them.
        let covered = client.snapshot.as_ref().map_or(0, |(as_of, _)| *as_of);
        let mut next = 1u64;
        for frame in &client.received {
            let seq = frame.server_seq().expect("sequenced");
            prop_assert!(seq >= next, "seq {} after {}", seq, next - 1);
            prop_assert!(
                seq == next || seq - 1 <= covered,
                "a gap before seq {}",
                seq
            );
            let index = usize::try_from(seq - 1).expect("small");
            prop_assert_eq!(Some(frame), expected.get(index));
            next = seq + 1;
        }
        prop_assert_eq!(
            (next - 1).max(covered),
            expected.len() as u64,
            "nothing missing"
        );
    }
    Ok(())
}

/// The core after `ops`, as its snapshot encodes it, and what each client received
/// (handshake answers, tokens included, and sequenced messages).
fn outcome(
    ops: &[Op],
    config: SessionConfig,
) -> Result<(Vec<u8>, Vec<Vec<proto::Frame>>), TestCaseError> {
    let mut sim = Sim::new(config);
    let mut clients = [sim.login(1, NO_COD), sim.login(2, NO_COD)];
    let mut next_order_id = [1u64, 1u64];
    for op in ops {
        apply(&mut sim, &mut clients, &mut next_order_id, op)?;
    }
    let streams = clients
        .iter()
        .map(|client| [client.control.clone(), client.received.clone()].concat())
        .collect();
    Ok((sim.core_bytes(), streams))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The core is deterministic: two cores fed the same inputs (time and token
    /// entropy included) end byte-identical and tell their clients the same, which is
    /// what lets every gateway on a stream hold the same core.
    #[test]
    fn two_cores_fed_the_same_inputs_end_byte_identical(ops in proptest::collection::vec(op_or_restore(), 1..120)) {
        let config = SessionConfig {
            ring: RingLimits { max_messages: 6, max_bytes: 1 << 20 },
            ..SessionConfig::default()
        };
        let first = outcome(&ops, config.clone())?;
        let second = outcome(&ops, config)?;
        prop_assert!(first.0 == second.0, "the cores differ");
        prop_assert_eq!(first.1, second.1);
    }

    #[test]
    fn both_directions_are_exactly_once_across_any_disconnects(ops in proptest::collection::vec(op(), 1..120)) {
        run(&ops, SessionConfig::default())?;
    }

    /// With a ring this small, requests regularly wait for acks, fills of resting
    /// orders overflow it, and resumes take the snapshot path.
    #[test]
    fn waiting_requests_and_small_rings_keep_exactly_once(ops in proptest::collection::vec(op(), 1..120)) {
        run(&ops, SessionConfig {
            ring: RingLimits { max_messages: 6, max_bytes: 1 << 20 },
            ..SessionConfig::default()
        })?;
    }

    /// A core restored from its snapshot carries on as the original would: in
    /// place, or after a gateway restart that took every connection with it.
    #[test]
    fn a_core_restored_from_its_snapshot_keeps_exactly_once(ops in proptest::collection::vec(op_or_restore(), 1..120)) {
        run(&ops, SessionConfig {
            ring: RingLimits { max_messages: 6, max_bytes: 1 << 20 },
            ..SessionConfig::default()
        })?;
    }
}
