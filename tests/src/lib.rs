//! Support for end-to-end tests over real QUIC on loopback: an in-process gateway
//! with test accounts, clients for it, and raw frame exchange. The UDP relay that
//! makes connections vanish is the load tester's, re-exported here.
//!
//! The tests themselves are in `tests/`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use gateway::auth::{AccountEntry, AccountsFile, ApiKeyEntry};
use gateway::config::Config;
use gateway::server::{Gateway, Setup};
use gateway::token::TokenKeyRing;
use gateway_client::{ClientConfig, Credentials, Event, Link};
use proto::Frame;

pub use loadtest::relay::Relay;

use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::CertificateDer;

/// Seed of an account's test key: deterministic, test-only.
fn seed(account: u64) -> [u8; 32] {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&account.to_le_bytes());
    seed
}

/// A gateway running in this process on an ephemeral loopback port.
pub struct TestGateway {
    /// The gateway.
    pub gateway: Gateway,
    /// Its address.
    pub addr: SocketAddr,
    /// Its certificate, for clients to trust.
    pub cert: CertificateDer<'static>,
    /// Its certificate chain and key, for a gateway started in its place.
    identity: gateway::dev::TlsIdentity,
}

/// The bearer token of every test gateway's admin listener.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

impl TestGateway {
    /// Starts a gateway with accounts `1..=accounts` and settings changed by `adjust`.
    pub fn start(accounts: u64, adjust: impl FnOnce(&mut Config)) -> TestGateway {
        let token_keys = gateway::dev::fresh_token_keys().expect("token key");
        let identity = gateway::dev::self_signed().expect("certificate");
        let (setup, cert) = test_setup(accounts, token_keys, &identity, adjust);
        let gateway = Gateway::start(setup).expect("gateway starts");
        Self::running(gateway, cert, identity)
    }

    /// Starts a gateway in either sequencer mode (`Gateway::launch`), with its token
    /// key from `token_secret`: gateways started one after another on one stream
    /// verify each other's tokens.
    pub async fn launch(
        accounts: u64,
        token_secret: &[u8; 32],
        adjust: impl FnOnce(&mut Config),
    ) -> TestGateway {
        let identity = gateway::dev::self_signed().expect("certificate");
        Self::launch_as(accounts, token_secret, identity, adjust).await
    }

    /// [`Self::launch`] with this certificate chain and key (another gateway's,
    /// [`Self::identity`], so that its clients trust this one).
    pub async fn launch_as(
        accounts: u64,
        token_secret: &[u8; 32],
        identity: gateway::dev::TlsIdentity,
        adjust: impl FnOnce(&mut Config),
    ) -> TestGateway {
        let token_keys = TokenKeyRing::new(1, token_secret).expect("token key");
        let (setup, cert) = test_setup(accounts, token_keys, &identity, adjust);
        let gateway = Gateway::launch(setup).await.expect("gateway starts");
        Self::running(gateway, cert, identity)
    }

    /// This gateway's certificate chain and key.
    pub fn identity(&self) -> gateway::dev::TlsIdentity {
        (self.identity.0.clone(), self.identity.1.clone_key())
    }

    fn running(
        gateway: Gateway,
        cert: CertificateDer<'static>,
        identity: gateway::dev::TlsIdentity,
    ) -> TestGateway {
        let addr = gateway.local_addr().expect("bound");
        TestGateway {
            gateway,
            addr,
            cert,
            identity,
        }
    }

    /// This gateway as `loadtest` targets a gateway elsewhere, with `accounts`'
    /// credentials.
    pub fn as_remote(&self, accounts: u64) -> loadtest::RemoteGateway {
        loadtest::RemoteGateway {
            addr: self.addr,
            cert: self.cert.clone(),
            keys: (1..=accounts)
                .map(|account| {
                    let credentials = Credentials::from_seed(1_000 + account, &seed(account))
                        .expect("credentials");
                    (account, credentials)
                })
                .collect(),
        }
    }

    /// Client settings for `account`, connecting to `addr` (the gateway or a relay).
    pub fn client_config(&self, account: u64, addr: SocketAddr) -> ClientConfig {
        let credentials =
            Credentials::from_seed(1_000 + account, &seed(account)).expect("credentials");
        let mut config = ClientConfig::development(addr, self.cert.clone(), credentials);
        config.idle_timeout = Duration::from_millis(1_000);
        config.keep_alive = Duration::from_millis(200);
        config
    }
}

/// A test gateway's setup: accounts `1..=accounts` with their test keys, a fresh
/// certificate, settings changed by `adjust`.
fn test_setup(
    accounts: u64,
    token_keys: TokenKeyRing,
    (certs, key): &gateway::dev::TlsIdentity,
    adjust: impl FnOnce(&mut Config),
) -> (Setup, CertificateDer<'static>) {
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    config.session.max_sessions_per_account = 2_000;
    config.admin.listen = "127.0.0.1:0".into();
    adjust(&mut config);
    config.validate().expect("valid test config");
    let cert = certs[0].clone();
    let accounts = AccountsFile {
        accounts: (1..=accounts)
            .map(|id| AccountEntry {
                id,
                max_sessions: None,
                keys: vec![ApiKeyEntry {
                    id: 1_000 + id,
                    public_key: hex::encode(
                        Ed25519KeyPair::from_seed_unchecked(&seed(id))
                            .expect("seed")
                            .public_key()
                            .as_ref(),
                    ),
                }],
            })
            .collect(),
    };
    let setup = Setup {
        config,
        tls: (certs.clone(), key.clone_key()),
        accounts,
        token_keys,
        accounts_path: None,
        admin_token: Some(ADMIN_TOKEN.into()),
    };
    (setup, cert)
}

/// A connection speaking the protocol frame by frame.
pub struct Raw {
    link: Link,
    buf: BytesMut,
}

impl Raw {
    /// Opens a connection and its session stream (nothing sent yet).
    pub async fn open(config: &ClientConfig) -> Raw {
        Self::from_link(gateway_client::open(config).await.expect("connect"))
    }

    /// Opens a connection and logs in with `config`'s credentials and this
    /// cancel-on-disconnect policy; the gateway's `LoginAccepted` (its snapshot
    /// follows, unread). Panics if the login is refused.
    pub async fn log_in(
        config: &ClientConfig,
        cod: proto::CancelOnDisconnect,
        grace: Duration,
    ) -> (Raw, proto::LoginAccepted) {
        let login = config
            .credentials
            .signed_login(&config.venue, cod, grace)
            .expect("sign");
        let mut raw = Raw::open(config).await;
        raw.send(&[login.into()]).await;
        let Some(Frame::LoginAccepted(accepted)) = raw.recv().await else {
            panic!("login refused");
        };
        (raw, accepted)
    }

    /// Wraps an opened link.
    pub fn from_link(link: Link) -> Raw {
        Raw {
            link,
            buf: BytesMut::new(),
        }
    }

    /// Sends frames.
    pub async fn send(&mut self, frames: &[Frame]) {
        for frame in frames {
            self.send_bytes(&frame.to_bytes()).await;
        }
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.link.send.write_all(bytes).await.expect("send");
    }

    /// The next frame, or `None` when the stream ends or nothing comes for 5 s.
    pub async fn recv(&mut self) -> Option<Frame> {
        self.recv_within(Duration::from_secs(5)).await
    }

    /// The next frame, or `None` when the stream ends or nothing comes in `patience`.
    pub async fn recv_within(&mut self, patience: Duration) -> Option<Frame> {
        let read = async {
            loop {
                if let Some(frame) =
                    proto::decode_buf(&mut self.buf).expect("gateway frames decode")
                {
                    return Some(frame);
                }
                match self.link.recv.read_chunk(4096, true).await {
                    Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(patience, read).await.ok().flatten()
    }

    /// Frames until the stream ends (or 5 s of silence).
    pub async fn recv_all(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.recv().await {
            frames.push(frame);
        }
        frames
    }

    /// The QUIC application error code the gateway closed with, waiting up to 5 s.
    pub async fn close_code(&self) -> Option<u64> {
        let closed =
            tokio::time::timeout(Duration::from_secs(5), self.link.connection.closed()).await;
        match closed.ok()? {
            quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
            _ => None,
        }
    }

    /// The QUIC connection, to open more streams on it.
    pub fn connection(&self) -> &quinn::Connection {
        &self.link.connection
    }

    /// Closes the connection from the client side.
    pub fn close(&self) {
        self.link.connection.close(0u32.into(), b"");
    }
}

/// A `nats-server` with JetStream on a free loopback port, storing in a directory of
/// its own; stopped by its process id, and its directory removed, when dropped.
/// Panics (the test fails, it is not skipped) when there is no `nats-server`.
pub struct NatsServer {
    server: loadtest::nats::NatsServer,
    /// Where clients connect, `nats://127.0.0.1:PORT`.
    pub url: String,
}

impl NatsServer {
    /// Starts one and waits until it takes connections.
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// [`Self::start`] with further `nats-server` arguments, e.g. a user and password.
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let server = loadtest::nats::NatsServer::start(extra).expect("nats-server starts");
        let url = server.url.clone();
        NatsServer { server, url }
    }

    /// Stops the server in its tracks (SIGSTOP): connections stay open, nothing is
    /// answered, until [`Self::carry_on`].
    pub fn pause(&self) {
        self.server.signal("-STOP").expect("paused");
    }

    /// Lets a paused server carry on (SIGCONT).
    pub fn carry_on(&self) {
        self.server.signal("-CONT").expect("carries on");
    }

    /// Kills the server (SIGKILL), waits `down`, and starts it again on the same
    /// port and storage.
    pub fn restart(&mut self, down: Duration) {
        self.server.kill();
        std::thread::sleep(down);
        self.server.spawn().expect("nats-server starts again");
    }

    /// Sets `config` to crash-safe mode on this server's stream `stream`.
    pub fn serve(&self, config: &mut Config, stream: &str) {
        config.sequencer.mode = gateway::config::SequencerMode::Jetstream;
        config.sequencer.nats_url = self.url.clone();
        config.sequencer.stream = stream.into();
    }
}

/// Runs the gateway binary in crash-safe mode (a 1 s timeout) with these further
/// settings, in a directory of its own; it must fail to start: its standard error.
pub fn failed_start(settings: &[&str]) -> String {
    static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nth = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("gateway-failed-start-{}-{nth}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut command = std::process::Command::new(gateway_binary());
    command
        .current_dir(&dir)
        .args(["--listen", "127.0.0.1:0", "--set", "admin.listen=\"\""])
        .args(["--set", "sequencer.mode=jetstream"])
        .args(["--set", "sequencer.timeout_ms=1000"]);
    for setting in settings {
        command.args(["--set", setting]);
    }
    let output = command.output().expect("the gateway runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!output.status.success(), "the gateway started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The next sequenced frame that `want` picks, within `within`; other events pass,
/// an ended session or a closed channel fails the test.
pub async fn next_frame(
    events: &mut tokio::sync::mpsc::Receiver<Event>,
    within: Duration,
    want: fn(&Frame) -> bool,
) -> Frame {
    let wait = async {
        loop {
            match events.recv().await {
                Some(Event::Message(frame)) if want(&frame) => return frame,
                Some(Event::Ended(reason)) => panic!("session ended: {reason:?}"),
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .expect("the frame in time")
}

/// Every live session's retained messages (what it would replay), by session id.
pub fn retained(
    gateway: &gateway::server::Gateway,
) -> std::collections::BTreeMap<u64, Vec<bytes::Bytes>> {
    let registry = gateway.registry();
    registry
        .sessions_info()
        .iter()
        .map(|info| {
            let session = registry.get(info.session).expect("live session");
            let session = gateway::registry::lock(&session);
            let ring = session.ring();
            let messages = ring.replay_from(ring.oldest_seq()).cloned().collect();
            (info.session, messages)
        })
        .collect()
}

/// The `gateway` binary of this build (`cargo test --workspace` builds it).
pub fn gateway_binary() -> std::path::PathBuf {
    built("gateway")
}

/// The `hello` example of the client library (`cargo test --workspace` builds it).
pub fn hello_example() -> std::path::PathBuf {
    built("examples/hello")
}

/// A program of this build, by its path under the target profile directory (the
/// parent of the test executables' `deps`).
fn built(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target directory");
    let program = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        program.exists(),
        "{} is missing: build the workspace's binaries and examples (cargo test --workspace does)",
        program.display()
    );
    program
}

/// One request to a test gateway's admin listener: the status and the body.
pub async fn http(
    gateway: &TestGateway,
    method: &'static str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let addr = gateway.gateway.admin_addr().expect("admin listener on");
    let url = format!("http://{addr}{path}");
    let authorization = token.map(|token| format!("Bearer {token}"));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut request = match method {
            "GET" => agent.get(&url).force_send_body(),
            _ => agent.post(&url),
        };
        if let Some(authorization) = &authorization {
            request = request.header("Authorization", authorization);
        }
        let response = request.send_empty().expect("admin listener answers");
        let status = response.status().as_u16();
        let body = response.into_body().read_to_string().expect("body");
        (status, body)
    })
    .await
    .expect("request task")
}
