//! The smallest complete client: two demo accounts of a development gateway trade
//! with each other, and the program exits after its first fill.
//!
//! Start a development gateway in one terminal (`cargo run --release -p gateway`),
//! then, from the same directory, in another:
//!
//! ```sh
//! cargo run -p gateway-client --example hello
//! ```
//!
//! It reads the gateway's certificate and the demo accounts' keys from `.gateway-dev/`
//! (another directory: `GATEWAY_DEV_DIR`) and connects to `127.0.0.1:4433` (another
//! address: `GATEWAY_ADDR`).

use std::path::PathBuf;
use std::time::Duration;

use gateway_client::{Client, ClientConfig, Credentials, Event, OrderParams};
use proto::Frame;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev_dir =
        PathBuf::from(std::env::var("GATEWAY_DEV_DIR").unwrap_or_else(|_| ".gateway-dev".into()));
    let addr = std::env::var("GATEWAY_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:4433".into())
        .parse()?;
    // The certificate the development gateway generated (a real venue publishes its
    // own, or clients trust its certificate authority).
    let cert = std::fs::read(dev_dir.join("cert.der")).map_err(|e| {
        format!(
            "{}/cert.der: {e} (is a development gateway running here?)",
            dev_dir.display()
        )
    })?;
    let mut keys = Credentials::load_dev_keys(&dev_dir.join("client-keys.toml"))?.into_iter();
    let (Some((seller_account, seller_key)), Some((buyer_account, buyer_key))) =
        (keys.next(), keys.next())
    else {
        return Err("client-keys.toml needs two demo accounts".into());
    };

    // Log in both (each gets a session and a resumable token).
    let (seller, mut seller_events) = Client::connect(ClientConfig::development(
        addr,
        cert.clone().into(),
        seller_key,
    ))
    .await?;
    let (buyer, mut buyer_events) =
        Client::connect(ClientConfig::development(addr, cert.into(), buyer_key)).await?;
    println!(
        "logged in: account {seller_account} (session {:?}) and account {buyer_account} (session {:?})",
        seller.session_id(),
        buyer.session_id()
    );

    // A client order id unique enough for repeated runs against one gateway.
    let order_id = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    // Instrument 1 of the development gateway: tick 1, lot 1.
    seller.new_order(OrderParams::limit_sell(1, order_id, 100, 10))?;
    buyer.new_order(OrderParams::limit_buy(1, order_id, 100, 10))?;

    let first_fill = async {
        while let Some(event) = buyer_events.recv().await {
            match event {
                Event::Message(Frame::Fill(fill)) => return Ok(fill),
                Event::Message(frame) => println!("buyer got {frame:?}"),
                Event::Snapshot { orders, .. } => println!("buyer's open orders: {}", orders.len()),
                Event::Reconnecting {
                    attempt,
                    attempts,
                    error,
                } => {
                    println!("reconnecting: attempt {attempt} of {attempts} failed: {error}")
                }
                Event::Resumed { lost } => println!("connection lost ({lost:?}) and resumed"),
                Event::Ended(reason) => return Err(format!("session ended: {reason:?}")),
            }
        }
        Err("the client stopped".to_string())
    };
    let fill = tokio::time::timeout(Duration::from_secs(10), first_fill)
        .await
        .map_err(|_| "no fill within 10 s")??;
    println!(
        "filled: {} at {} (trade {}), {} left",
        fill.quantity, fill.price, fill.trade_id, fill.leaves_quantity
    );
    // The seller's side of the same trade.
    while let Some(event) = seller_events.recv().await {
        if let Event::Message(Frame::Fill(fill)) = event {
            println!("seller filled too: trade {}", fill.trade_id);
            break;
        }
    }
    // Log out and wait for the gateway's goodbye, so the sessions end now rather
    // than wait, detached, for a resume that will not come.
    for (client, events) in [(&seller, &mut seller_events), (&buyer, &mut buyer_events)] {
        client.logout()?;
        let ended = async {
            while let Some(event) = events.recv().await {
                if let Event::Ended(reason) = event {
                    return Some(reason);
                }
            }
            None
        };
        let reason = tokio::time::timeout(Duration::from_secs(5), ended).await?;
        println!("session ended: {reason:?}");
    }
    Ok(())
}
