//! A UDP load balancer on loopback in front of several gateways: one address for
//! clients, as a venue's L4 balancer gives them.
//!
//! It does what a real one must do for QUIC, and no more: it forwards UDP datagrams
//! without terminating QUIC, keeps each client address on one backend (a flow),
//! and sends new connections only to healthy backends. Health is each backend's
//! `GET /readyz` on its admin listener, checked every [`HEALTH_INTERVAL`]; two
//! failures in a row (a gateway killed, paused or draining) make a backend
//! unhealthy, one success healthy again.
//!
//! The next packet of a flow whose backend is unhealthy moves the flow to a healthy
//! backend. If the packet belongs to the old connection, the gateway it lands on
//! does not know that connection and answers with a QUIC stateless reset, which the
//! client accepts (every gateway of a stream derives its reset key from the shared
//! token key): the client learns at once that its connection is gone, without
//! waiting for its idle timeout, and its next connection (from the same port: the
//! gateway client keeps its endpoint) resumes there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// How often each backend's health is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(100);

/// How long a health check may take before the backend counts as unhealthy.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(300);

/// Most flows kept; new clients beyond are dropped.
const MAX_FLOWS: usize = 10_000;

/// One gateway behind the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its admin listener, for `GET /readyz`.
    pub admin: SocketAddr,
}

/// One client address's path to its backend.
struct Flow {
    backend: usize,
    upstream: Arc<UdpSocket>,
    task: JoinHandle<()>,
}

/// State shared by the balancer's tasks.
struct Shared {
    backends: Vec<Backend>,
    healthy: Vec<AtomicBool>,
    flows: Mutex<HashMap<SocketAddr, Flow>>,
    next: AtomicUsize,
    /// Flows that moved to another backend because theirs was unhealthy.
    moved: AtomicUsize,
}

impl Shared {
    /// A healthy backend for a new flow, taken in turn; `None` if none is.
    fn pick(&self) -> Option<usize> {
        let count = self.backends.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| (first + offset) % count)
            .find(|&index| self.healthy[index].load(Ordering::Relaxed))
    }
}

/// The balancer, on a thread of its own (as a balancer is a box of its own: the
/// load it carries is not delayed by the tasks of whoever started it); dropping it
/// stops it.
pub struct Balancer {
    /// The address clients connect to.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Balancer {
    /// Starts a balancer on a free loopback port in front of `backends`, all
    /// counted healthy until their first check says otherwise.
    pub fn start(backends: Vec<Backend>) -> std::io::Result<Balancer> {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        std_socket.set_nonblocking(true)?;
        let addr = std_socket.local_addr()?;
        let shared = Arc::new(Shared {
            healthy: backends.iter().map(|_| AtomicBool::new(true)).collect(),
            backends,
            flows: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            moved: AtomicUsize::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("balancer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(socket) = UdpSocket::from_std(std_socket) else {
                        return;
                    };
                    tokio::spawn(forward(Arc::new(socket), Arc::clone(&serving)));
                    for index in 0..serving.backends.len() {
                        tokio::spawn(check_health(Arc::clone(&serving), index));
                    }
                    // Its flows' tasks end with the runtime, dropped with this thread.
                    let _ = stopped.await;
                });
            })?;
        Ok(Balancer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Whether backend `index` passed its latest health check.
    pub fn is_healthy(&self, index: usize) -> bool {
        self.shared.healthy[index].load(Ordering::Relaxed)
    }

    /// Client flows on each backend, in backend order.
    pub fn flows(&self) -> Vec<usize> {
        let flows = self
            .shared
            .flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut counts = vec![0usize; self.shared.backends.len()];
        for flow in flows.values() {
            counts[flow.backend] += 1;
        }
        counts
    }

    /// The healthy backend with the most client flows (the first if none has
    /// any): where a fault hurts most.
    pub fn busiest(&self) -> usize {
        let counts = self.flows();
        (0..counts.len())
            .filter(|&index| self.is_healthy(index))
            .max_by_key(|&index| (counts[index], std::cmp::Reverse(index)))
            .unwrap_or(0)
    }

    /// Flows moved off an unhealthy backend so far.
    pub fn flows_moved(&self) -> usize {
        self.shared.moved.load(Ordering::Relaxed)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Client → gateway: each client address's packets to its flow's backend.
async fn forward(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut packet = vec![0u8; 65_536];
    while let Ok((len, client)) = socket.recv_from(&mut packet).await {
        let route = {
            let mut flows = shared.flows.lock().unwrap_or_else(PoisonError::into_inner);
            let stale = flows
                .get(&client)
                .is_some_and(|flow| !shared.healthy[flow.backend].load(Ordering::Relaxed));
            if stale {
                if let Some(old) = flows.remove(&client) {
                    old.task.abort();
                    shared.moved.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !flows.contains_key(&client) && flows.len() < MAX_FLOWS {
                if let Some(flow) = shared
                    .pick()
                    .and_then(|backend| open_flow(&socket, client, backend))
                {
                    flows.insert(client, flow);
                }
            }
            flows
                .get(&client)
                .map(|flow| (Arc::clone(&flow.upstream), flow.backend))
        };
        if let Some((upstream, backend)) = route {
            let _ = upstream
                .send_to(&packet[..len], shared.backends[backend].addr)
                .await;
        }
    }
}

fn open_flow(socket: &Arc<UdpSocket>, client: SocketAddr, backend: usize) -> Option<Flow> {
    let upstream = crate::relay::flow_socket()?;
    let task = tokio::spawn(backward(Arc::clone(&upstream), Arc::clone(socket), client));
    Some(Flow {
        backend,
        upstream,
        task,
    })
}

/// Gateway → client for one flow.
async fn backward(upstream: Arc<UdpSocket>, socket: Arc<UdpSocket>, client: SocketAddr) {
    let mut packet = vec![0u8; 65_536];
    loop {
        match upstream.recv(&mut packet).await {
            Ok(len) => {
                let _ = socket.send_to(&packet[..len], client).await;
            }
            // A backend that went away answers with ICMP, reported here: the flow
            // stays, and the client's next connection attempt moves it.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(_) => return,
        }
    }
}

/// Checks backend `index`'s `/readyz` every [`HEALTH_INTERVAL`]: two failures in
/// a row make it unhealthy (one slow answer on a busy machine does not), one
/// success healthy.
async fn check_health(shared: Arc<Shared>, index: usize) {
    let admin = shared.backends[index].admin;
    let mut interval = tokio::time::interval(HEALTH_INTERVAL);
    let mut failed_before = false;
    loop {
        interval.tick().await;
        let ready = tokio::time::timeout(HEALTH_TIMEOUT, is_ready(admin))
            .await
            .unwrap_or(false);
        if ready || failed_before {
            shared.healthy[index].store(ready, Ordering::Relaxed);
        }
        failed_before = !ready;
    }
}

/// Whether `GET /readyz` at `admin` answers 200.
async fn is_ready(admin: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(admin).await else {
        return false;
    };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).await.is_ok() && status.ends_with(b" 200")
}
