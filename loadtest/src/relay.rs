//! A UDP relay on loopback that can make connections vanish without a trace.
//!
//! Each client address gets its own upstream socket (a flow). [`Relay::blackhole`]
//! silently drops every packet of the flows seen so far, in both directions, so both
//! ends see a connection that just went quiet (no close, no reset), while new
//! connections pass, even from a client port the kernel handed out again: a QUIC
//! Initial packet from a blackholed address starts a fresh flow.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// One client address's path through the relay.
struct Flow {
    upstream: Arc<UdpSocket>,
    blackholed: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// A UDP relay on loopback in front of the gateway.
pub struct Relay {
    /// The address clients connect to.
    pub addr: SocketAddr,
    flows: Arc<Mutex<HashMap<SocketAddr, Flow>>>,
    task: JoinHandle<()>,
}

/// Most flows a relay keeps; older ones are not evicted, new ones are dropped.
const MAX_FLOWS: usize = 10_000;

impl Relay {
    /// Starts a relay to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = socket.local_addr()?;
        let flows: Arc<Mutex<HashMap<SocketAddr, Flow>>> = Arc::new(Mutex::new(HashMap::new()));
        let task = tokio::spawn(forward(socket, upstream, Arc::clone(&flows)));
        Ok(Relay { addr, flows, task })
    }

    /// Silently drops, from now on, every packet of the connections seen so far.
    pub fn blackhole(&self) {
        for flow in self
            .flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            flow.blackholed.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        for flow in self
            .flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            flow.task.abort();
        }
    }
}

/// Client → gateway: one upstream socket per client address.
async fn forward(
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    flows: Arc<Mutex<HashMap<SocketAddr, Flow>>>,
) {
    let mut packet = vec![0u8; 65_536];
    while let Ok((len, client)) = socket.recv_from(&mut packet).await {
        let route = {
            let mut flows = flows.lock().unwrap_or_else(PoisonError::into_inner);
            let restarts = is_quic_initial(&packet[..len])
                && flows
                    .get(&client)
                    .is_some_and(|flow| flow.blackholed.load(Ordering::Relaxed));
            if restarts {
                if let Some(old) = flows.remove(&client) {
                    old.task.abort();
                }
            }
            if !flows.contains_key(&client) && flows.len() < MAX_FLOWS {
                if let Some(flow) = open_flow(&socket, client) {
                    flows.insert(client, flow);
                }
            }
            flows.get(&client).map(|flow| {
                (
                    Arc::clone(&flow.upstream),
                    flow.blackholed.load(Ordering::Relaxed),
                )
            })
        };
        if let Some((upstream_socket, false)) = route {
            let _ = upstream_socket.send_to(&packet[..len], upstream).await;
        }
    }
}

/// A QUIC version 1 Initial packet: long header (bit 7) with packet type 0 (bits 4-5).
fn is_quic_initial(packet: &[u8]) -> bool {
    packet
        .first()
        .is_some_and(|first| first & 0x80 != 0 && first & 0x30 == 0)
}

fn open_flow(socket: &Arc<UdpSocket>, client: SocketAddr) -> Option<Flow> {
    let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    std_socket.set_nonblocking(true).ok()?;
    let upstream = Arc::new(UdpSocket::from_std(std_socket).ok()?);
    let blackholed = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(backward(
        Arc::clone(&upstream),
        Arc::clone(socket),
        client,
        Arc::clone(&blackholed),
    ));
    Some(Flow {
        upstream,
        blackholed,
        task,
    })
}

/// Gateway → client for one flow.
async fn backward(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    blackholed: Arc<AtomicBool>,
) {
    let mut packet = vec![0u8; 65_536];
    while let Ok(len) = upstream.recv(&mut packet).await {
        if !blackholed.load(Ordering::Relaxed) {
            let _ = socket.send_to(&packet[..len], client).await;
        }
    }
}
