//! A UDP relay on loopback that can make connections vanish without a trace.
//!
//! Each client address gets its own upstream socket (a flow). [`Relay::blackhole`]
//! silently drops every packet of the flows seen so far, in both directions, so both
//! ends see a connection that just went quiet (no close, no reset), while new
//! connections pass, even from a client port the kernel handed out again: a QUIC
//! Initial packet from a blackholed address starts a fresh flow.
//!
//! A relay can also impair its path as a WAN would ([`Impairment`]): random loss and a
//! fixed delay in each direction, in user space, so no privileges are needed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What a relay does to every packet it passes, in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Share of packets dropped at random, 0 to 1.
    pub loss: f64,
    /// Added one-way delay (timer resolution: about a millisecond).
    pub delay: Duration,
}

impl Impairment {
    /// Whether it changes anything.
    pub fn is_active(&self) -> bool {
        self.loss > 0.0 || !self.delay.is_zero()
    }
}

/// A packet waiting out the path's delay.
struct Delayed {
    due: Instant,
    socket: Arc<UdpSocket>,
    packet: Vec<u8>,
    to: SocketAddr,
}

/// Sends packets through the relay's impairment: dropped, delayed or passed on.
#[derive(Clone)]
struct Path {
    loss: f64,
    delay: Duration,
    delayed: Option<mpsc::UnboundedSender<Delayed>>,
}

impl Path {
    /// The path, and the task that releases delayed packets in order (a fixed delay
    /// keeps them in order).
    fn new(impairment: Impairment) -> (Path, Option<JoinHandle<()>>) {
        let (delayed, task) = if impairment.delay.is_zero() {
            (None, None)
        } else {
            let (sender, mut queue) = mpsc::unbounded_channel::<Delayed>();
            let task = tokio::spawn(async move {
                while let Some(packet) = queue.recv().await {
                    tokio::time::sleep_until(packet.due).await;
                    let _ = packet.socket.send_to(&packet.packet, packet.to).await;
                }
            });
            (Some(sender), Some(task))
        };
        let path = Path {
            loss: impairment.loss,
            delay: impairment.delay,
            delayed,
        };
        (path, task)
    }

    async fn send(&self, socket: &Arc<UdpSocket>, packet: &[u8], to: SocketAddr) {
        if self.loss > 0.0 && rand::random::<f64>() < self.loss {
            return;
        }
        match &self.delayed {
            Some(delayed) => {
                let _ = delayed.send(Delayed {
                    due: Instant::now() + self.delay,
                    socket: Arc::clone(socket),
                    packet: packet.to_vec(),
                    to,
                });
            }
            None => {
                let _ = socket.send_to(packet, to).await;
            }
        }
    }
}

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
    delay_task: Option<JoinHandle<()>>,
}

/// Most flows a relay keeps; older ones are not evicted, new ones are dropped.
const MAX_FLOWS: usize = 10_000;

impl Relay {
    /// Starts a relay to `upstream` that passes packets as they come.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        Self::start_impaired(upstream, Impairment::default()).await
    }

    /// Starts a relay to `upstream` that impairs its path.
    pub async fn start_impaired(
        upstream: SocketAddr,
        impairment: Impairment,
    ) -> std::io::Result<Relay> {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = socket.local_addr()?;
        let flows: Arc<Mutex<HashMap<SocketAddr, Flow>>> = Arc::new(Mutex::new(HashMap::new()));
        let (path, delay_task) = Path::new(impairment);
        let task = tokio::spawn(forward(socket, upstream, Arc::clone(&flows), path));
        Ok(Relay {
            addr,
            flows,
            task,
            delay_task,
        })
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
        if let Some(task) = &self.delay_task {
            task.abort();
        }
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
    path: Path,
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
                if let Some(flow) = open_flow(&socket, client, path.clone()) {
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
            path.send(&upstream_socket, &packet[..len], upstream).await;
        }
    }
}

/// A QUIC version 1 Initial packet: long header (bit 7) with packet type 0 (bits 4-5).
fn is_quic_initial(packet: &[u8]) -> bool {
    packet
        .first()
        .is_some_and(|first| first & 0x80 != 0 && first & 0x30 == 0)
}

/// A socket on a free loopback port for one client's flow to its upstream, bound
/// without awaiting (flows are opened under a lock).
pub(crate) fn flow_socket() -> Option<Arc<UdpSocket>> {
    let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    std_socket.set_nonblocking(true).ok()?;
    Some(Arc::new(UdpSocket::from_std(std_socket).ok()?))
}

fn open_flow(socket: &Arc<UdpSocket>, client: SocketAddr, path: Path) -> Option<Flow> {
    let upstream = flow_socket()?;
    let blackholed = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(backward(
        Arc::clone(&upstream),
        Arc::clone(socket),
        client,
        Arc::clone(&blackholed),
        path,
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
    path: Path,
) {
    let mut packet = vec![0u8; 65_536];
    while let Ok(len) = upstream.recv(&mut packet).await {
        if !blackholed.load(Ordering::Relaxed) {
            path.send(&socket, &packet[..len], client).await;
        }
    }
}
