//! Servers measured in their own process: CPU time and context switches from
//! `/proc`, and the bare-QUIC echo server run as a child process (optionally pinned
//! to a core with `taskset`), so the gateway and the echo are measured alike.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use rustls_pki_types::CertificateDer;

use crate::RunError;

/// A process's CPU time and context switches so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessCounters {
    /// User and system CPU time, microseconds.
    pub cpu_us: u64,
    /// Voluntary and involuntary context switches of its live threads.
    pub context_switches: u64,
}

impl ProcessCounters {
    /// Reads them for `pid` from `/proc/PID/stat` (the whole process's CPU time) and
    /// `/proc/PID/task/*/status` (context switches are counted per thread).
    pub fn read(pid: i32) -> Result<Self, String> {
        let process =
            procfs::process::Process::new(pid).map_err(|e| format!("process {pid}: {e}"))?;
        let stat = process.stat().map_err(|e| format!("process {pid}: {e}"))?;
        let ticks = procfs::ticks_per_second().max(1);
        let cpu_us = (stat.utime + stat.stime).saturating_mul(1_000_000) / ticks;
        let mut context_switches = 0;
        let tasks = process.tasks().map_err(|e| format!("process {pid}: {e}"))?;
        for task in tasks.flatten() {
            if let Ok(status) = task.status() {
                context_switches += status.voluntary_ctxt_switches.unwrap_or(0)
                    + status.nonvoluntary_ctxt_switches.unwrap_or(0);
            }
        }
        Ok(ProcessCounters {
            cpu_us,
            context_switches,
        })
    }

    /// CPU microseconds and context switches per unit of work since `earlier`.
    pub fn per_unit_since(&self, earlier: &ProcessCounters, units: u64) -> PerUnit {
        #[allow(clippy::cast_precision_loss)]
        let units = units.max(1) as f64;
        #[allow(clippy::cast_precision_loss)]
        PerUnit {
            cpu_us: self.cpu_us.saturating_sub(earlier.cpu_us) as f64 / units,
            context_switches: self
                .context_switches
                .saturating_sub(earlier.context_switches) as f64
                / units,
        }
    }
}

/// Process cost of one unit of work (an order, an echoed message).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerUnit {
    /// CPU microseconds.
    pub cpu_us: f64,
    /// Context switches.
    pub context_switches: f64,
}

/// The echo server in a child process; killed when dropped.
pub struct EchoProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its certificate.
    pub cert: CertificateDer<'static>,
}

/// The line an echo server process prints first: `ADDRESS CERT-DER-HEX`.
pub fn announce(addr: SocketAddr, cert: &CertificateDer<'_>) -> String {
    format!("{addr} {}", hex::encode(cert.as_ref()))
}

impl EchoProcess {
    /// Starts `loadtest --echo-server` (this executable), on core `core` if given
    /// (through `taskset`), and waits for it to listen.
    pub fn spawn(core: Option<usize>) -> Result<Self, RunError> {
        let failed = |what: String| RunError::Setup(format!("echo server process: {what}"));
        let exe = std::env::current_exe().map_err(|e| failed(e.to_string()))?;
        let mut command = match core {
            Some(core) => {
                let mut taskset = Command::new("taskset");
                taskset.args(["-c", &core.to_string()]).arg(exe);
                taskset
            }
            None => Command::new(exe),
        };
        let mut child = command
            .arg("--echo-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot start it: {e}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| failed("no stdout".into()))?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| failed(e.to_string()))?;
        let (addr, cert) = line
            .trim()
            .split_once(' ')
            .ok_or_else(|| failed(format!("unexpected first line {line:?}")))?;
        let addr = addr
            .parse()
            .map_err(|_| failed(format!("bad address {addr:?}")))?;
        let cert = hex::decode(cert).map_err(|_| failed("bad certificate".into()))?;
        Ok(EchoProcess {
            child,
            addr,
            cert: cert.into(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
