//! Order round trips from the Rust client, the twin of
//! `python/bench/roundtrip.py`: closed loop (one order in flight) and a window of 64,
//! against a running development gateway; prints one JSON line. Run by
//! `scripts/bench-python.sh`.
//!
//! `roundtrip [HOST:PORT] [ORDERS]`; it reads `.gateway-dev/` in the current directory.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gateway_client::{Client, ClientConfig, Credentials, Event, OrderParams};
use proto::{Frame, TimeInForce};
use tokio::sync::mpsc::Receiver;

/// p50, p99 (µs) and orders per second of `orders` orders, `window` in flight.
async fn run(
    client: &Client,
    events: &mut Receiver<Event>,
    orders: usize,
    window: usize,
    first_id: u64,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let mut samples: Vec<Duration> = Vec::with_capacity(orders);
    let mut next_id = first_id;
    let started = Instant::now();
    while samples.len() < orders {
        while sent_at.len() < window && next_id < first_id + orders as u64 {
            sent_at.insert(next_id, Instant::now());
            let mut order = OrderParams::limit_buy(1, next_id, 1, 1);
            order.time_in_force = TimeInForce::Ioc;
            client.new_order(order)?;
            next_id += 1;
        }
        match events.recv().await {
            Some(Event::Message(Frame::OrderAck(ack))) => {
                let sent = sent_at.remove(&ack.client_order_id).ok_or("unknown ack")?;
                samples.push(sent.elapsed());
            }
            Some(Event::Message(Frame::Reject(reject))) => {
                return Err(format!("order rejected: {:?}", reject.reason).into())
            }
            Some(Event::Ended(reason)) => return Err(format!("ended: {reason:?}").into()),
            Some(_) => {}
            None => return Err("events ended".into()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    samples.sort();
    let at = |percent: usize| samples[(samples.len() * percent / 100).min(samples.len() - 1)];
    Ok(format!(
        r#"{{"p50_us": {:.1}, "p99_us": {:.1}, "orders_per_s": {:.0}}}"#,
        at(50).as_secs_f64() * 1e6,
        at(99).as_secs_f64() * 1e6,
        orders as f64 / elapsed
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:4433".into())
        .parse()?;
    let orders: usize = args.next().map_or(Ok(5000), |n| n.parse())?;
    let cert = std::fs::read(".gateway-dev/cert.der")?;
    let (_account, credentials) =
        Credentials::load_dev_keys(".gateway-dev/client-keys.toml".as_ref())?
            .into_iter()
            .nth(1)
            .ok_or("a demo account")?;
    let (client, mut events) =
        Client::connect(ClientConfig::development(addr, cert.into(), credentials)).await?;
    let base = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros(),
    )?;
    run(&client, &mut events, 1000, 1, base).await?;
    let closed = run(&client, &mut events, orders, 1, base + 1_000_000).await?;
    let windowed = run(&client, &mut events, orders * 4, 64, base + 2_000_000).await?;
    println!(r#"{{"client": "rust", "closed_loop": {closed}, "window_64": {windowed}}}"#);
    Ok(())
}
