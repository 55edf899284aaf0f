//! The bare-QUIC baseline: an echo server and clients with the same TLS setup,
//! payload size, connection count and send schedule as the gateway run, plus plain
//! handshake timing, so the report can print ratios that survive a noisy machine.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls_pki_types::CertificateDer;
use serde::Serialize;

use crate::{Percentiles, RunError, Ticks};

/// What the baseline measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BaselineReport {
    /// Echo round trip from the intended send time.
    pub echo_rtt_us: Percentiles,
    /// The same as a percentile curve.
    pub echo_rtt_curve: Vec<crate::CurvePoint>,
    /// Echoes completed per second.
    pub echo_throughput_per_s: f64,
    /// Median time to complete a QUIC handshake (connect to established).
    pub handshake_ms: f64,
    /// Handshake distribution, microseconds.
    pub handshake_us: Percentiles,
    /// The echo server's CPU time per echoed message, when it ran in its own process.
    pub echo_server_cpu_us_per_msg: Option<f64>,
    /// Its context switches per echoed message, likewise.
    pub echo_server_context_switches_per_msg: Option<f64>,
}

/// Settings of one baseline run.
#[derive(Debug, Clone, Copy)]
pub struct BaselineOptions {
    /// Connections, as many as gateway sessions.
    pub connections: usize,
    /// Messages per second in total; 0 for as fast as the window allows.
    pub rate: u64,
    /// Unanswered messages per connection at most.
    pub window: usize,
    /// How long to send.
    pub duration: Duration,
    /// Bytes per message, as a `NewOrder` frame.
    pub payload: usize,
    /// Sequential handshakes to time.
    pub handshakes: usize,
    /// Run the echo server in its own process (as a gateway measured from outside
    /// runs), on this core if given; `None` runs it in this process.
    pub separate_process: Option<Option<usize>>,
}

/// An echo server on loopback; returns it and the certificate to trust. The
/// `--echo-server` mode of the binary runs one as its own process.
pub fn echo_server(
    socket_buffer: usize,
) -> Result<(quinn::Endpoint, CertificateDer<'static>), RunError> {
    let setup = |e: &dyn std::fmt::Display| RunError::Setup(format!("echo server: {e}"));
    let (certs, key) = gateway::dev::self_signed().map_err(|e| setup(&e))?;
    let cert = certs[0].clone();
    let crypto = gateway::server::quic_crypto(
        (certs, key),
        gateway::config::TlsSettings::default().resumption_cache,
    )
    .map_err(|e| setup(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // The gateway's own acknowledgement rule, so the two compare like for like.
    let mut transport = quinn::TransportConfig::default();
    transport.ack_frequency_config(gateway::server::ack_frequency(
        gateway::config::TransportSettings::default().ack_eliciting_threshold,
    ));
    server.transport_config(Arc::new(transport));
    let socket = gateway::server::bind_udp(SocketAddr::from(([127, 0, 0, 1], 0)), socket_buffer)
        .map_err(|e| setup(&e))?;
    let runtime = quinn::default_runtime().ok_or_else(|| RunError::Setup("no runtime".into()))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
    .map_err(|e| setup(&e))?;
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    tokio::spawn(async move {
                        while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
                            if send.write_chunk(chunk.bytes).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
    });
    Ok((endpoint, cert))
}

fn client_config(
    server: SocketAddr,
    cert: CertificateDer<'static>,
) -> Result<gateway_client::ClientConfig, RunError> {
    // The echo server checks no credentials; the client settings need some.
    let credentials = gateway_client::Credentials::from_seed(0, &[1u8; 32])
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let mut config = gateway_client::ClientConfig::development(server, cert, credentials);
    config.idle_timeout = Duration::from_secs(30);
    Ok(config)
}

/// Runs the baseline.
pub async fn run(options: BaselineOptions) -> Result<BaselineReport, RunError> {
    let connect_error = |e: &dyn std::fmt::Display| RunError::Setup(format!("echo client: {e}"));
    let (in_process, process) = match options.separate_process {
        Some(core) => (None, Some(crate::process::EchoProcess::spawn(core)?)),
        None => (Some(echo_server(4 << 20)?), None),
    };
    let (addr, cert) = match (&in_process, &process) {
        (Some((server, cert)), _) => (
            server.local_addr().map_err(|e| connect_error(&e))?,
            cert.clone(),
        ),
        (None, Some(process)) => (process.addr, process.cert.clone()),
        (None, None) => unreachable!("one of the two is set"),
    };
    let config = client_config(addr, cert)?;

    let endpoint = gateway_client::client_endpoint(&config).map_err(|e| connect_error(&e))?;
    let mut handshakes = crate::histogram();
    for _ in 0..options.handshakes {
        let started = Instant::now();
        let connection = endpoint
            .connect(addr, &config.server_name)
            .map_err(|e| connect_error(&e))?
            .await
            .map_err(|e| connect_error(&e))?;
        crate::record(&mut handshakes, started.elapsed());
        connection.close(0u32.into(), b"");
    }

    let histogram = Arc::new(Mutex::new(crate::histogram()));
    let endpoints =
        crate::shared_endpoints(&config, options.connections).map_err(|e| connect_error(&e))?;
    let mut links = Vec::with_capacity(options.connections);
    for index in 0..options.connections {
        let link = gateway_client::open_on(endpoints[index % endpoints.len()].clone(), &config)
            .await
            .map_err(|e| connect_error(&e))?;
        links.push(link);
    }
    let counters = |process: &Option<crate::process::EchoProcess>| {
        process
            .as_ref()
            .and_then(|p| crate::process::ProcessCounters::read(p.pid()).ok())
    };
    let before = counters(&process);
    let started = Instant::now();
    let deadline = started + options.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (link, ticks) in links.into_iter().zip(crate::schedule(
        options.rate,
        options.connections,
        started,
        deadline,
    )) {
        tasks.spawn(echo_connection(
            link,
            ticks,
            options.window,
            options.payload,
            Arc::clone(&histogram),
        ));
    }
    let mut completed = 0;
    while let Some(done) = tasks.join_next().await {
        completed += done.unwrap_or(0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cost = match (before, counters(&process)) {
        (Some(before), Some(after)) => Some(after.per_unit_since(&before, completed)),
        _ => None,
    };
    if let Some((server, _)) = &in_process {
        server.close(0u32.into(), b"done");
    }
    drop(process);
    let histogram = histogram.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(BaselineReport {
        echo_server_cpu_us_per_msg: cost.map(|c| c.cpu_us),
        echo_server_context_switches_per_msg: cost.map(|c| c.context_switches),
        echo_rtt_us: Percentiles::of(&histogram),
        echo_rtt_curve: crate::curve(&histogram),
        echo_throughput_per_s: completed as f64 / elapsed,
        handshake_ms: handshakes.value_at_quantile(0.5) as f64 / 1_000.0,
        handshake_us: Percentiles::of(&handshakes),
    })
}

/// One echo connection driven by `ticks`; records round trips into `histogram`.
async fn echo_connection(
    link: gateway_client::Link,
    mut ticks: Ticks,
    window: usize,
    payload: usize,
    histogram: Arc<Mutex<Histogram<u64>>>,
) -> u64 {
    let gateway_client::Link {
        endpoint: _endpoint,
        connection: _connection,
        mut send,
        mut recv,
        ..
    } = link;
    let in_flight: Arc<Mutex<VecDeque<Instant>>> = Arc::new(Mutex::new(VecDeque::new()));
    let room = Arc::new(tokio::sync::Semaphore::new(window));
    let sender_in_flight = Arc::clone(&in_flight);
    let sender_room = Arc::clone(&room);
    let message = vec![0x5au8; payload];
    let sender = tokio::spawn(async move {
        loop {
            let Ok(permit) = sender_room.acquire().await else {
                return;
            };
            permit.forget();
            let Some(intended) = ticks.next().await else {
                break;
            };
            sender_in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back(intended);
            if send.write_all(&message).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    let mut completed = 0u64;
    let mut pending = 0usize;
    while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
        pending += chunk.bytes.len();
        while pending >= payload {
            pending -= payload;
            let intended = in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            if let Some(intended) = intended {
                let micros = u64::try_from(intended.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = histogram
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(micros.max(1));
                completed += 1;
            }
            room.add_permits(1);
        }
    }
    let _ = sender.await;
    completed
}
