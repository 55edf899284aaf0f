//! Engines on the log for a cluster run (`--engines M`): matching engines in their
//! own processes (ENGINE.md), the bundled `matching-stub` or any program that takes
//! its arguments, each with a checkpoint file of its own, killed and started again
//! by the `engine` fault.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::RunError;

/// How the cluster starts its engines.
#[derive(Debug, Clone)]
pub struct EngineCommand {
    /// The program, and the arguments that come before the engine's own (for a
    /// script: `python3` and the script's path).
    pub command: Vec<String>,
}

impl EngineCommand {
    /// The bundled `matching-stub` beside this executable (or one level up, from a
    /// test's `deps`).
    pub fn matching_stub() -> EngineCommand {
        let program = crate::crash::program_beside("matching-stub");
        EngineCommand {
            command: vec![program.display().to_string()],
        }
    }
}

/// One engine process on a cluster's log.
#[derive(Debug)]
pub struct EngineProcess {
    command: Vec<String>,
    args: Vec<String>,
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl EngineProcess {
    /// An engine named `name` on the log `stream` of the NATS servers `nats_url`,
    /// keeping its checkpoint and log in `dir`; not started.
    pub fn new(
        command: &EngineCommand,
        (nats_url, stream): (&str, &str),
        name: &str,
        dir: &Path,
    ) -> Result<EngineProcess, RunError> {
        let Some(program) = command.command.first() else {
            return Err(RunError::Setup("no engine program".into()));
        };
        if program.contains('/') && !Path::new(program).exists() {
            return Err(RunError::Setup(format!(
                "{program} is missing: build the engine (cargo build --release -p matching-stub-process)"
            )));
        }
        let checkpoint = dir.join(format!("{name}.checkpoint"));
        Ok(EngineProcess {
            command: command.command.clone(),
            args: vec![
                "--nats".into(),
                nats_url.to_owned(),
                "--stream".into(),
                stream.to_owned(),
                "--name".into(),
                name.to_owned(),
                "--checkpoint".into(),
                checkpoint.display().to_string(),
                // Often, so that restarts start from one.
                "--checkpoint-every".into(),
                "500".into(),
            ],
            name: name.to_owned(),
            log: dir.join(format!("{name}.log")),
            child: None,
        })
    }

    /// The engine's name in its answers.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts it (again, after a kill).
    pub fn spawn(&mut self) -> Result<(), RunError> {
        let log_error = |e: std::io::Error| RunError::Setup(format!("{}: {e}", self.log.display()));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(log_error)?;
        let err = log.try_clone().map_err(log_error)?;
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| RunError::Setup(format!("{}: {e}", self.command[0])))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILLs it and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it has exited (and is reaped), or was never started.
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

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
