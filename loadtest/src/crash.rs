//! A crash-safe gateway run by the load tester as a child process on loopback, so
//! that it can be killed (SIGKILL) and started again under load: the chaos that
//! proves a gateway can die and lose nothing.
//!
//! The gateway runs in `jetstream` sequencer mode against a NATS server the caller
//! names, on a stream of its own (named after this process and the time), with
//! development certificate and demo accounts in a temporary directory. Its output
//! goes to `<name>.log` there; the directory is removed when the gateway is
//! stopped. [`GatewayProcess::start_cluster`] starts several on one stream, sharing
//! the directory (and so the certificate, accounts and token key), each under its
//! own `sequencer.gateway_name`.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway_client::Credentials;

use crate::{RemoteGateway, RunError};

/// How long a start (including the core's rebuild from its stream) may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How the load tester runs a crash-safe gateway.
#[derive(Debug, Clone)]
pub struct CrashSafe {
    /// The `gateway` program.
    pub program: PathBuf,
    /// The NATS server with JetStream, e.g. `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// Kill the gateway this often and start it again; `None` never does.
    pub kill_interval: Option<Duration>,
    /// More gateway settings, `key=value` (as its `--set` takes them), after the
    /// load tester's own: `sequencer.snapshot_every=5000`, say.
    pub gateway_settings: Vec<String>,
}

impl CrashSafe {
    /// The `gateway` program beside this executable (`target/<profile>/gateway`
    /// next to `target/<profile>/loadtest`, or one level up from a test's `deps`).
    pub fn program_beside_this_one() -> PathBuf {
        program_beside("gateway")
    }
}

/// The program `name` beside this executable (`target/<profile>/NAME` next to
/// `target/<profile>/loadtest`, or one level up from a test's `deps`).
pub fn program_beside(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let name = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let beside = exe.with_file_name(&name);
    if beside.exists() {
        return beside;
    }
    exe.parent()
        .and_then(std::path::Path::parent)
        .map_or(beside, |dir| dir.join(name))
}

/// A crash-safe gateway process.
#[derive(Debug)]
pub struct GatewayProcess {
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    name: String,
    addr: SocketAddr,
    admin: SocketAddr,
    child: Option<Child>,
    nats_url: String,
    stream: String,
    /// Whether stopping it deletes the stream and the directory (the first of a
    /// cluster does; the others share them).
    owns_stream: bool,
}

impl GatewayProcess {
    /// Starts the gateway with `accounts` demo accounts and waits until it serves.
    pub async fn start(settings: &CrashSafe, accounts: usize) -> Result<Self, RunError> {
        let mut process = Self::first(settings, accounts, "gateway")?;
        process.spawn()?;
        process.wait_ready().await?;
        Ok(process)
    }

    /// Starts `count` gateways on one stream, named `gw-1`, `gw-2`, ..., one after
    /// the other (the first writes the shared certificate and keys), and waits
    /// until each serves.
    pub async fn start_cluster(
        settings: &CrashSafe,
        accounts: usize,
        count: usize,
    ) -> Result<Vec<Self>, RunError> {
        let first = Self::first(settings, accounts, "gw-1")?;
        let mut cluster = Vec::with_capacity(count);
        for nth in 2..=count {
            cluster.push(first.another(&format!("gw-{nth}"))?);
        }
        cluster.insert(0, first);
        for process in &mut cluster {
            process.spawn()?;
            process.wait_ready().await?;
        }
        Ok(cluster)
    }

    /// Another gateway on this one's stream and directory, named `name`.
    fn another(&self, name: &str) -> Result<Self, RunError> {
        let setup = |what: &str, e: &dyn std::fmt::Display| RunError::Setup(format!("{what}: {e}"));
        let addr = free_udp_port().map_err(|e| setup("a free UDP port", &e))?;
        let admin = free_tcp_port().map_err(|e| setup("a free TCP port", &e))?;
        let replaced = |arg: &String| {
            if arg.starts_with("listen=") {
                format!("listen={addr}")
            } else if arg.starts_with("admin.listen=") {
                format!("admin.listen={admin}")
            } else if arg.starts_with("sequencer.gateway_name=") {
                format!("sequencer.gateway_name={name}")
            } else {
                arg.clone()
            }
        };
        Ok(GatewayProcess {
            program: self.program.clone(),
            args: self.args.iter().map(replaced).collect(),
            dir: self.dir.clone(),
            name: name.to_owned(),
            addr,
            admin,
            child: None,
            nats_url: self.nats_url.clone(),
            stream: self.stream.clone(),
            owns_stream: false,
        })
    }

    /// The settings of a first gateway named `name` on a new stream; not started.
    fn first(settings: &CrashSafe, accounts: usize, name: &str) -> Result<Self, RunError> {
        let setup = |what: &str, e: &dyn std::fmt::Display| RunError::Setup(format!("{what}: {e}"));
        if !settings.program.exists() {
            return Err(RunError::Setup(format!(
                "{} is missing: build the gateway (cargo build --release -p gateway)",
                settings.program.display()
            )));
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        // Unique among the gateways of this process too (tests start several at once).
        static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nth = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stream = format!("LOADTEST_{}_{stamp}_{nth}", std::process::id());
        let dir = std::env::temp_dir().join(stream.to_lowercase());
        std::fs::create_dir_all(&dir).map_err(|e| setup("temporary directory", &e))?;
        let addr = free_udp_port().map_err(|e| setup("a free UDP port", &e))?;
        let admin = free_tcp_port().map_err(|e| setup("a free TCP port", &e))?;
        let args = [
            format!("listen={addr}"),
            format!("dev_dir={}", dir.display()),
            format!("demo_accounts={}", accounts.max(2)),
            format!("admin.listen={admin}"),
            "session.max_sessions_per_account=64".into(),
            "sequencer.mode=jetstream".into(),
            format!("sequencer.nats_url={}", settings.nats_url),
            format!("sequencer.stream={stream}"),
            format!("sequencer.gateway_name={name}"),
        ]
        .into_iter()
        .chain(settings.gateway_settings.iter().cloned())
        .collect();
        Ok(GatewayProcess {
            program: settings.program.clone(),
            args,
            dir,
            name: name.to_owned(),
            addr,
            admin,
            child: None,
            nats_url: settings.nats_url.clone(),
            stream,
            owns_stream: true,
        })
    }

    /// The directory of its certificate, keys and log (a cluster's, shared).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The stream the gateway appends to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The gateway's name on its stream.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its QUIC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its admin listener (`/readyz`, `/metrics`).
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The log file of this gateway.
    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// Starts the program (again, after a kill) with its settings; [`Self::wait_ready`]
    /// says when it serves.
    pub fn spawn(&mut self) -> Result<(), RunError> {
        let path = self.log_path();
        let log_error = |e: std::io::Error| RunError::Setup(format!("{}: {e}", path.display()));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(log_error)?;
        let err = log.try_clone().map_err(log_error)?;
        let child = Command::new(&self.program)
            .args(self.args.iter().flat_map(|set| ["--set", set]))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| RunError::Setup(format!("{}: {e}", self.program.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the gateway says it is ready (`/readyz`: its core rebuilt).
    pub async fn wait_ready(&mut self) -> Result<Duration, RunError> {
        let started = Instant::now();
        let url = format!("http://{}/readyz", self.admin);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(RunError::Setup(format!(
                    "the gateway exited ({status}); its log:\n{}",
                    self.log_tail()
                )));
            }
            let probe = url.clone();
            let ready = tokio::task::spawn_blocking(move || {
                ureq::get(&probe)
                    .config()
                    .timeout_global(Some(Duration::from_millis(500)))
                    .build()
                    .call()
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            if ready {
                return Ok(started.elapsed());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(RunError::Setup(format!(
                    "the gateway was not ready within {START_TIMEOUT:?}; its log:\n{}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the gateway (no goodbye to anyone) and starts it again at once.
    pub fn kill_and_restart(&mut self) -> Result<(), RunError> {
        self.kill();
        self.spawn()
    }

    /// SIGKILLs the gateway and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Pauses the gateway (SIGSTOP) or lets it carry on (SIGCONT): a paused gateway
    /// is the zombie that wakes up after the others moved on.
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused { "-STOP" } else { "-CONT" };
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
        }
    }

    /// Whether the process has exited (and is reaped), or was never started.
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => false,
            Some(_) => {
                self.child = None;
                true
            }
            None => true,
        }
    }

    /// Waits up to `within` for the process to exit by itself; says whether it did.
    pub async fn wait_exit(&mut self, within: Duration) -> bool {
        let began = Instant::now();
        while !self.has_exited() {
            if began.elapsed() >= within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops a cluster's gateways ([`Self::start_cluster`]), the first, which owns
    /// the stream and the directory, last.
    pub async fn stop_all(gateways: Vec<Self>, keep_log: bool) {
        for gateway in gateways.into_iter().rev() {
            gateway.stop(keep_log).await;
        }
    }

    /// Where clients connect, with the certificate and keys it generated.
    pub fn remote(&self) -> Result<RemoteGateway, RunError> {
        let read = |name: &str| {
            std::fs::read(self.dir.join(name))
                .map_err(|e| RunError::Setup(format!("{}: {e}", self.dir.join(name).display())))
        };
        let cert = read("cert.der")?;
        let keys = Credentials::load_dev_keys(&self.dir.join("client-keys.toml"))
            .map_err(|e| RunError::Setup(e.to_string()))?;
        Ok(RemoteGateway {
            addr: self.addr,
            cert: cert.into(),
            keys,
        })
    }

    /// The gateway's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of the gateway's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERMs the gateway (it drains: its clients resume on other gateways) and
    /// waits for it to exit, SIGKILLing it after 5 s.
    pub async fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the gateway (SIGTERM, then SIGKILL after a while); the first of a
    /// cluster also deletes the stream, and its directory unless `keep_log` (then
    /// says where it is).
    pub async fn stop(mut self, keep_log: bool) {
        self.terminate().await;
        if !self.owns_stream {
            return;
        }
        let settings = gateway::config::SequencerSettings {
            mode: gateway::config::SequencerMode::Jetstream,
            nats_url: self.nats_url.clone(),
            stream: self.stream.clone(),
            ..Default::default()
        };
        if let Err(error) = gateway::sequencer::JetStreamLog::delete_stream(&settings).await {
            eprintln!("loadtest: could not delete stream {}: {error}", self.stream);
        }
        if keep_log {
            eprintln!("loadtest: the gateways' logs are in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback UDP address no one uses now, for a server ([`free_port`]).
fn free_udp_port() -> std::io::Result<SocketAddr> {
    free_port(|port| UdpSocket::bind(("127.0.0.1", port))?.local_addr())
}

/// A loopback TCP address no one listens on now, for a server ([`free_port`]).
pub(crate) fn free_tcp_port() -> std::io::Result<SocketAddr> {
    free_port(|port| TcpListener::bind(("127.0.0.1", port))?.local_addr())
}

/// A port `bind` takes, below the kernel's range of ephemeral ports, so that no
/// client socket is given it while the server it is for is down between a kill
/// and its restart (a gateway's, taken by a client's, could not start again).
fn free_port(bind: impl Fn(u16) -> std::io::Result<SocketAddr>) -> std::io::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let low = 10_000.min(ephemeral_low / 2);
    let span = ephemeral_low.saturating_sub(low).max(1);
    let seed = std::process::id().wrapping_mul(7_919);
    for _ in 0..1_000 {
        let nth = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + seed.wrapping_add(nth.wrapping_mul(104_729)) % span;
        if let Ok(addr) = bind(u16::try_from(port).unwrap_or(0)) {
            return Ok(addr);
        }
    }
    bind(0)
}
