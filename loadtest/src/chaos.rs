//! Faults on purpose: connections broken in turn (clean close, abrupt drop,
//! blackhole), crash-safe gateways killed, and a flood of bad logins.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_client::{Client, ClientConfig, Credentials};
use proto::Frame;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::measure::{read_until, send_frame};
use crate::relay::Relay;
use crate::report::ChaosEvent;
use crate::{client_config, crash, lock, RunError, Shared, Target};

/// Kills the crash-safe gateway every `interval` until `deadline` and starts it
/// again; returns it with how long each restart took to be ready.
pub(crate) async fn kill_loop(
    mut process: crash::GatewayProcess,
    interval: Duration,
    deadline: Instant,
    shared: Shared,
) -> Result<(crash::GatewayProcess, Vec<Duration>), RunError> {
    let mut ready_after = Vec::new();
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            return Ok((process, ready_after));
        }
        let killed = Instant::now();
        {
            let mut tally = lock(&shared);
            let t_s = killed
                .saturating_duration_since(tally.started)
                .as_secs_f64();
            tally.chaos_events.push(ChaosEvent {
                t_s,
                mode: "gateway_kill",
            });
            for book in &mut tally.books {
                book.gateway_killed = Some(killed);
            }
        }
        process.kill_and_restart()?;
        process.wait_ready().await?;
        ready_after.push(killed.elapsed());
    }
}

/// How a chaos event breaks a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChaosMode {
    /// The client closes the connection properly.
    Clean,
    /// The client's connection vanishes (nothing more reaches the gateway, not even a
    /// close) and the client reconnects at once.
    Abrupt,
    /// Packets are silently dropped both ways; the client notices by its idle
    /// timeout, and the gateway still holds a half-open connection it must hand over.
    Blackhole,
}

/// Breaks a random idle session's connection every `interval`, cycling the modes.
pub(crate) async fn chaos_loop(
    clients: Vec<Arc<Client>>,
    relays: Arc<Vec<Option<Relay>>>,
    shared: Shared,
    interval: Duration,
    deadline: Instant,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc4a05);
    let modes = [ChaosMode::Clean, ChaosMode::Abrupt, ChaosMode::Blackhole];
    let mut turn = 0usize;
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    while Instant::now() < deadline {
        tick.tick().await;
        let index = rng.gen_range(0..clients.len());
        let mode = modes[turn % modes.len()];
        {
            let mut tally = lock(&shared);
            if tally.books[index].chaos.is_some() {
                continue;
            }
            tally.books[index].chaos = Some((Instant::now(), mode));
            let t_s = tally.started.elapsed().as_secs_f64();
            tally.chaos_events.push(ChaosEvent {
                t_s,
                mode: match mode {
                    ChaosMode::Clean => "clean",
                    ChaosMode::Abrupt => "abrupt",
                    ChaosMode::Blackhole => "blackhole",
                },
            });
            let counts = &mut tally.counts.disconnects;
            match mode {
                ChaosMode::Clean => counts.clean += 1,
                ChaosMode::Abrupt => counts.abrupt += 1,
                ChaosMode::Blackhole => counts.blackhole += 1,
            }
        }
        turn += 1;
        let relay = relays.get(index).and_then(Option::as_ref);
        match mode {
            ChaosMode::Clean => clients[index].drop_connection(),
            ChaosMode::Abrupt => {
                if let Some(relay) = relay {
                    relay.blackhole();
                }
                clients[index].drop_connection();
            }
            ChaosMode::Blackhole => {
                if let Some(relay) = relay {
                    relay.blackhole();
                }
            }
        }
    }
}

/// What the flood saw.
#[derive(Debug, Default)]
pub(crate) struct FloodCounts {
    pub(crate) attempts: u64,
    pub(crate) refused: u64,
    pub(crate) rate_limited: u64,
    pub(crate) bad_signature: u64,
}

/// Client settings with a key id the gateway knows and a key it does not: every
/// login signed with them fails the signature check.
pub(crate) fn flood_config(target: &Target) -> Option<ClientConfig> {
    let key_id = target.keys.first().map(|(_, c)| c.api_key_id())?;
    let wrong_key = Credentials::from_seed(key_id, &[0x5a; 32]).ok()?;
    let mut config = client_config(target, wrong_key, target.addr);
    config.idle_timeout = Duration::from_millis(500);
    Some(config)
}

/// Bad logins from this address, 8 at a time, until `deadline`.
pub(crate) async fn flood_logins(config: Option<ClientConfig>, deadline: Instant) -> FloodCounts {
    let Some(config) = config else {
        return FloodCounts::default();
    };
    let config = Arc::new(config);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let config = Arc::clone(&config);
        workers.spawn(async move {
            let mut counts = FloodCounts::default();
            while Instant::now() < deadline {
                // About 1,600 attempts a second in all: a flood, not a benchmark of
                // the attacker's own CPU, which shares this machine.
                tokio::time::sleep(Duration::from_millis(5)).await;
                counts.attempts += 1;
                let Ok(mut link) = gateway_client::open(&config).await else {
                    counts.refused += 1;
                    continue;
                };
                let Ok(login) = config.credentials.signed_login(
                    &config.venue,
                    proto::CancelOnDisconnect::Off,
                    Duration::ZERO,
                ) else {
                    break;
                };
                if send_frame(&mut link, login.into()).await.is_err() {
                    continue;
                }
                let mut buf = bytes::BytesMut::new();
                if let Some(Frame::LoginRejected(rejected)) =
                    read_until(&mut link, &mut buf, |_| true).await
                {
                    match rejected.reason {
                        proto::ReasonCode::RateLimited => counts.rate_limited += 1,
                        proto::ReasonCode::BadSignature => counts.bad_signature += 1,
                        _ => {}
                    }
                }
            }
            counts
        });
    }
    let mut total = FloodCounts::default();
    while let Some(Ok(counts)) = workers.join_next().await {
        total.attempts += counts.attempts;
        total.refused += counts.refused;
        total.rate_limited += counts.rate_limited;
        total.bad_signature += counts.bad_signature;
    }
    total
}
