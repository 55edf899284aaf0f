//! The gateway binary: parses settings, prepares certificates and accounts, runs the
//! server until SIGINT or SIGTERM.
//!
//! With no arguments it runs a complete development gateway on 127.0.0.1:4433: a
//! generated certificate, demo accounts with their client keys, and the bundled
//! matching engine, all under `.gateway-dev/`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use gateway::config::{Config, LogFormat};
use gateway::dev;
use gateway::server::{Gateway, Setup};

/// Exchange-side session gateway with resumable sessions.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TOML configuration file; every key in it can also be given with --set.
    #[arg(short, long, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// UDP address to listen on (key `listen`).
    #[arg(long, env = "GATEWAY_LISTEN")]
    listen: Option<String>,
    /// Accounts file (key `accounts_file`); demo accounts when absent.
    #[arg(long, env = "GATEWAY_ACCOUNTS")]
    accounts: Option<PathBuf>,
    /// TLS certificate chain, PEM (key `tls.cert`); a dev certificate when absent.
    #[arg(long, env = "GATEWAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key, PEM (key `tls.key`).
    #[arg(long, env = "GATEWAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Directory for generated development files (key `dev_dir`).
    #[arg(long, env = "GATEWAY_DEV_DIR")]
    dev_dir: Option<PathBuf>,
    /// File with the token HMAC key in hex (key `token_key_file`).
    #[arg(long, env = "GATEWAY_TOKEN_KEY_FILE")]
    token_key_file: Option<PathBuf>,
    /// Log format (key `log.format`).
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `gateway=debug` (key `log.filter`).
    #[arg(long, env = "GATEWAY_LOG")]
    log: Option<String>,
    /// Any setting as `key=value`, e.g. `--set session.replay_window=4096`;
    /// repeatable. Also read, `;`-separated, from GATEWAY_SET.
    #[arg(short, long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

impl Cli {
    /// The explicit flags as overrides, after the environment's GATEWAY_SET and
    /// before `--set`, so the most specific wins.
    fn overrides(&self) -> Vec<String> {
        let quoted = |value: &std::path::Path| format!("{:?}", value.display().to_string());
        let mut overrides: Vec<String> = std::env::var("GATEWAY_SET")
            .map(|all| {
                all.split(';')
                    .filter(|s| !s.trim().is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let flags = [
            self.listen.as_ref().map(|v| format!("listen={v:?}")),
            self.accounts
                .as_deref()
                .map(|v| format!("accounts_file={}", quoted(v))),
            self.tls_cert
                .as_deref()
                .map(|v| format!("tls.cert={}", quoted(v))),
            self.tls_key
                .as_deref()
                .map(|v| format!("tls.key={}", quoted(v))),
            self.dev_dir
                .as_deref()
                .map(|v| format!("dev_dir={}", quoted(v))),
            self.token_key_file
                .as_deref()
                .map(|v| format!("token_key_file={}", quoted(v))),
            self.log_format
                .map(|v| format!("log.format={:?}", format!("{v:?}").to_lowercase())),
            self.log.as_ref().map(|v| format!("log.filter={v:?}")),
        ];
        overrides.extend(flags.into_iter().flatten());
        overrides.extend(self.set.iter().cloned());
        overrides
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.filter)
        .with_context(|| format!("invalid log filter {:?}", config.log.filter))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Reads or generates everything the configuration points at.
fn prepare(config: Config) -> anyhow::Result<Setup> {
    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => dev::pem_identity(cert, key)?,
        _ => {
            let identity = dev::dev_certificate(&config.dev_dir)?;
            tracing::info!(cert = %config.dev_dir.join("cert.pem").display(), "using the development certificate");
            identity
        }
    };
    let accounts = match &config.accounts_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            gateway::auth::AccountsFile::parse(&text).with_context(|| path.display().to_string())?
        }
        None => {
            let accounts = dev::demo_accounts(&config.dev_dir, config.demo_accounts)?;
            tracing::info!(
                accounts = accounts.accounts.len(),
                client_keys = %config.dev_dir.join("client-keys.toml").display(),
                "using demo accounts"
            );
            accounts
        }
    };
    let token_keys = match &config.token_key_file {
        Some(path) => dev::token_key_file(path)?,
        None => dev::dev_token_key(&config.dev_dir)?,
    };
    Ok(Setup {
        config,
        tls,
        accounts,
        token_keys,
    })
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref(), &cli.overrides())?;
    if cli.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    init_logging(&config)?;
    let setup = prepare(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let gateway = Gateway::start(setup)?;
        gateway.run_until(shutdown_signal()).await;
        anyhow::Ok(())
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}
