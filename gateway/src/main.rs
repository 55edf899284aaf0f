//! The gateway binary: parses settings, prepares certificates and accounts, runs the
//! server until SIGINT or SIGTERM.
//!
//! With no arguments it runs a complete development gateway on 127.0.0.1:4433: a
//! generated certificate, demo accounts with their client keys, and the bundled
//! matching engine, all under `.gateway-dev/`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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
    /// Before or after a subcommand (`gateway admin --config F sessions`).
    #[arg(short, long, env = "GATEWAY_CONFIG", global = true)]
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
    #[arg(short, long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    /// Print the effective configuration as TOML, every setting described and unset
    /// ones commented out, and exit.
    #[arg(long)]
    print_config: bool,
    /// Print the settings reference (SETTINGS.md: every setting, default and
    /// description) and exit.
    #[arg(long)]
    settings_reference: bool,
    /// Allow the development certificate and demo accounts on an address beyond
    /// loopback (refused otherwise, so they never reach production by mistake).
    #[arg(long, env = "GATEWAY_DEV")]
    dev: bool,
    /// Instead of running a gateway, operate a running one.
    #[command(subcommand)]
    command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Operate a running gateway through its admin listener (`admin.listen`), with
    /// the bearer token from `admin.token_file` (the same settings as the gateway).
    Admin {
        /// The operation.
        #[command(subcommand)]
        operation: AdminOperation,
        /// The listener's address, if not the configured `admin.listen`.
        #[arg(long)]
        address: Option<String>,
        /// Send the bearer token to an address beyond this host although the admin
        /// listener speaks plain HTTP (anyone on the path can read it). Without it
        /// only a loopback address (or `localhost`) is accepted; reach a remote
        /// gateway through an SSH tunnel instead.
        #[arg(long)]
        insecure_plain_http: bool,
    },
    /// Make production credentials, each secret in a new file only its owner may
    /// read (0600; an existing file is never overwritten), and print what goes where.
    Keys {
        /// What to make.
        #[command(subcommand)]
        what: KeysCommand,
    },
}

/// What `gateway keys` makes.
#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// A firm's API key pair: the private key to `--out` (hand it to the firm),
    /// the accounts file entry to standard output (add it to `accounts_file`).
    NewAccount {
        /// The account id.
        #[arg(long)]
        account: u64,
        /// The API key id, unique in the accounts file (default: account × 1000 + 1).
        #[arg(long)]
        key_id: Option<u64>,
        /// Where the private key goes.
        #[arg(long)]
        out: PathBuf,
    },
    /// The session token HMAC key (`token_key_file`): the same file on every
    /// gateway of a venue.
    TokenKey {
        /// Where it goes.
        #[arg(long)]
        out: PathBuf,
    },
    /// The admin listener's bearer token (`admin.token_file`).
    AdminToken {
        /// Where it goes.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Makes the credentials `what` asks for and says where each goes.
fn keys(what: &KeysCommand) -> anyhow::Result<()> {
    match what {
        KeysCommand::NewAccount {
            account,
            key_id,
            out,
        } => {
            let key_id = key_id.unwrap_or(account.saturating_mul(1_000).saturating_add(1));
            let entry = gateway::keys::new_api_key(*account, key_id, out)?;
            print!("{}", entry.to_toml());
            eprintln!(
                "API key {key_id} of account {account}: private key in {} (hand it to the firm, \
                 privately; its client loads it with Credentials::load_dev_keys). Add the \
                 entry above to the accounts file, then reload: gateway admin reload-accounts \
                 (or SIGHUP).",
                out.display()
            );
        }
        KeysCommand::TokenKey { out } => {
            gateway::keys::new_secret(out)?;
            eprintln!(
                "token key in {}: set token_key_file to it, the same file on every gateway of \
                 the venue (crash-safe mode needs it to rebuild sessions); keep it private.",
                out.display()
            );
        }
        KeysCommand::AdminToken { out } => {
            gateway::keys::new_secret(out)?;
            eprintln!(
                "admin token in {}: set admin.token_file to it; gateway admin reads it from \
                 there too.",
                out.display()
            );
        }
    }
    Ok(())
}

/// What `gateway admin` can do.
#[derive(Debug, clap::Subcommand)]
enum AdminOperation {
    /// List the live sessions (JSON).
    Sessions,
    /// End sessions: one, or every session of an account (`Revoked`).
    Revoke {
        /// The session.
        #[arg(long, conflicts_with = "account", required_unless_present = "account")]
        session: Option<u64>,
        /// The account.
        #[arg(long)]
        account: Option<u64>,
    },
    /// Cancel every working order of an account and end its sessions.
    KillSwitch {
        /// The account.
        #[arg(long)]
        account: u64,
    },
    /// Mint tokens with a new random key; tokens of older keys still verify.
    RotateKey,
    /// Stop accepting tokens of a key.
    RetireKey {
        /// The key's id (see the `rotate-key` answer).
        id: u32,
    },
    /// Read the accounts file again (as SIGHUP does).
    ReloadAccounts,
    /// Read the certificate and key again (as SIGHUP does): new connections get
    /// them, open ones and their sessions carry on.
    ReloadTls,
    /// Refuse new logins from now on; sessions carry on. `/readyz` turns 503.
    Drain,
}

impl AdminOperation {
    /// The HTTP method and path with query.
    fn request(&self) -> (&'static str, String) {
        match self {
            AdminOperation::Sessions => ("GET", "/admin/sessions".into()),
            AdminOperation::Revoke {
                session: Some(session),
                ..
            } => ("POST", format!("/admin/revoke?session={session}")),
            AdminOperation::Revoke { account, .. } => (
                "POST",
                format!("/admin/revoke?account={}", account.unwrap_or_default()),
            ),
            AdminOperation::KillSwitch { account } => {
                ("POST", format!("/admin/kill-switch?account={account}"))
            }
            AdminOperation::RotateKey => ("POST", "/admin/rotate-key".into()),
            AdminOperation::RetireKey { id } => ("POST", format!("/admin/retire-key?id={id}")),
            AdminOperation::ReloadAccounts => ("POST", "/admin/reload-accounts".into()),
            AdminOperation::ReloadTls => ("POST", "/admin/reload-tls".into()),
            AdminOperation::Drain => ("POST", "/admin/drain".into()),
        }
    }
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
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Refuses to expose development credentials: a gateway listening beyond loopback
/// with the generated certificate or the demo accounts, unless `--dev` allows it.
fn check_exposure(config: &Config, dev: bool) -> anyhow::Result<()> {
    let mut development = Vec::new();
    if config.tls.cert.is_none() {
        development.push("the development certificate (set tls.cert and tls.key)");
    }
    if config.accounts_file.is_none() {
        development
            .push("the demo accounts, whose private keys sit in dev_dir (set accounts_file)");
    }
    if config.listen.ip().is_loopback() || development.is_empty() || dev {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {} (beyond loopback) with {}; pass --dev to allow it anyway",
        config.listen,
        development.join(" and ")
    )
}

/// Reads the files the configuration names, then generates the development ones it
/// leaves out (so a bad file stops the start before anything is written).
fn prepare(config: Config, dev: bool) -> anyhow::Result<Setup> {
    check_exposure(&config, dev)?;
    let given_tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => Some(dev::pem_identity(cert, key)?),
        _ => None,
    };
    let given_accounts = match &config.accounts_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("accounts_file {}", path.display()))?;
            let accounts = gateway::auth::AccountsFile::parse(&text)
                .with_context(|| format!("accounts_file {}", path.display()))?;
            tracing::info!(accounts = accounts.accounts.len(), file = %path.display(), "loaded accounts");
            Some((accounts, path.clone()))
        }
        None => None,
    };
    let given_token_keys = match &config.token_key_file {
        Some(path) => Some(dev::token_key_file(path).context("token_key_file")?),
        None => None,
    };
    let admin_on = config.admin.listen_addr()?.is_some();
    let admin_token_path = config.admin.token_path(&config.dev_dir);
    let given_admin_token = match &config.admin.token_file {
        Some(path) if admin_on => Some(dev::admin_token(path, false).context("admin.token_file")?),
        _ => None,
    };

    // What is generated for a setting left unset says so when it cannot be made.
    let generated = |what: &str, settings: &str| {
        format!(
            "{settings} unset, so {what} is generated in dev_dir ({}); set {settings} (the \
             production configuration in DEPLOYMENT.md sets them all), or a dev_dir this \
             user may write",
            config.dev_dir.display()
        )
    };
    let tls = match given_tls {
        Some(identity) => identity,
        None => {
            let identity = dev::dev_certificate(&config.dev_dir)
                .with_context(|| generated("a development certificate", "tls.cert and tls.key"))?;
            tracing::info!(cert = %config.dev_dir.join("cert.pem").display(), "using the development certificate");
            identity
        }
    };
    let (accounts, accounts_path) = match given_accounts {
        Some(given) => given,
        None => {
            let accounts = dev::demo_accounts(&config.dev_dir, config.demo_accounts)
                .with_context(|| generated("demo accounts", "accounts_file"))?;
            tracing::info!(
                accounts = accounts.accounts.len(),
                client_keys = %config.dev_dir.join("client-keys.toml").display(),
                "using demo accounts"
            );
            (accounts, config.dev_dir.join("accounts.toml"))
        }
    };
    let token_keys = match given_token_keys {
        Some(keys) => keys,
        None => dev::dev_token_key(&config.dev_dir)
            .with_context(|| generated("a token key", "token_key_file"))?,
    };
    let admin_token = match given_admin_token {
        Some(token) => Some(token),
        None if admin_on => Some(
            dev::admin_token(&admin_token_path, true)
                .with_context(|| generated("an admin token", "admin.token_file"))?,
        ),
        None => None,
    };
    if admin_on {
        tracing::info!(token_file = %admin_token_path.display(), "admin operations need the bearer token in this file");
    }
    Ok(Setup {
        config,
        tls,
        accounts,
        token_keys,
        accounts_path: Some(accounts_path),
        admin_token,
    })
}

/// Reads the accounts file again on every SIGHUP, and the certificate and key if
/// they come from files.
async fn reload_on_hangup(gateway: Arc<Gateway>, tls_from_files: bool) {
    #[cfg(unix)]
    {
        let kind = tokio::signal::unix::SignalKind::hangup();
        let Ok(mut hangups) = tokio::signal::unix::signal(kind) else {
            return;
        };
        while hangups.recv().await.is_some() {
            match gateway.reload_accounts() {
                Ok(accounts) => tracing::info!(accounts, "SIGHUP: accounts reloaded"),
                Err(error) => tracing::warn!(%error, "SIGHUP: accounts not reloaded"),
            }
            if tls_from_files {
                match gateway.reload_tls() {
                    Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                    Err(error) => {
                        tracing::warn!(%error, "SIGHUP: certificate not reloaded; the old one serves")
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = gateway;
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

/// Sends one admin operation to a running gateway and prints its answer.
fn admin(
    config: &Config,
    operation: &AdminOperation,
    address: Option<&str>,
    insecure_plain_http: bool,
) -> anyhow::Result<()> {
    let address = match address {
        Some(address) => address.to_string(),
        None => config
            .admin
            .listen_addr()?
            .context("admin.listen is empty: the gateway has no admin listener")?
            .to_string(),
    };
    if !insecure_plain_http && !stays_on_this_host(&address) {
        anyhow::bail!(
            "{address} is beyond this host, and the admin listener speaks plain HTTP: the \
             bearer token would cross the network unencrypted. Run the command on the \
             gateway's host, or through an SSH tunnel (ssh -L 9433:127.0.0.1:9433 host), \
             or give --insecure-plain-http to send it anyway"
        );
    }
    let token_path = config.admin.token_path(&config.dev_dir);
    let token = dev::admin_token(&token_path, false)
        .with_context(|| format!("reading the admin token ({})", token_path.display()))?;
    let (method, path) = operation.request();
    let url = format!("http://{address}{path}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let authorization = format!("Bearer {token}");
    let response = match method {
        "GET" => agent
            .get(&url)
            .header("Authorization", &authorization)
            .call(),
        _ => agent
            .post(&url)
            .header("Authorization", &authorization)
            .send_empty(),
    }
    .with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .read_to_string()
        .with_context(|| format!("{method} {url}: reading the answer"))?;
    if !status.is_success() {
        anyhow::bail!("{method} {url}: {status}: {}", body.trim());
    }
    println!("{}", body.trim());
    Ok(())
}

/// Whether an admin address (`ip:port`, `[ip]:port` or `localhost:port`) is on this
/// host: a loopback address, the unspecified one (which reaches this host), or
/// `localhost`.
fn stays_on_this_host(address: &str) -> bool {
    match address.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr.ip().is_loopback() || addr.ip().is_unspecified(),
        Err(_) => address
            .rsplit_once(':')
            .is_some_and(|(host, _port)| host.eq_ignore_ascii_case("localhost")),
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if let Some(Command::Keys { what }) = &cli.command {
        return keys(what);
    }
    let config = Config::load(cli.config.as_deref(), &cli.overrides())?;
    if let Some(Command::Admin {
        operation,
        address,
        insecure_plain_http,
    }) = &cli.command
    {
        return admin(&config, operation, address.as_deref(), *insecure_plain_http);
    }
    if cli.print_config {
        print!("{}", gateway::settings::commented_toml(&config));
        return Ok(());
    }
    if cli.settings_reference {
        print!("{}", gateway::settings::reference());
        return Ok(());
    }
    init_logging(&config)?;
    let tls_from_files = config.tls.cert.is_some();
    let setup = prepare(config, cli.dev)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let gateway = Arc::new(Gateway::launch(setup).await?);
        let reloads = tokio::spawn(reload_on_hangup(Arc::clone(&gateway), tls_from_files));
        let failed = tokio::select! {
            () = shutdown_signal() => None,
            why = gateway.failed() => Some(why),
        };
        reloads.abort();
        let _ = reloads.await;
        let gateway = Arc::into_inner(gateway).context("gateway still in use at shutdown")?;
        gateway.shutdown().await;
        match failed {
            // Sessions stay in the stream: a gateway started again resumes them.
            Some(why) => Err(anyhow::anyhow!("stopped: {why}")),
            None => anyhow::Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_set_go_before_or_after_the_admin_subcommand() {
        for args in [
            &[
                "gateway", "--config", "g.toml", "--set", "a=1", "admin", "sessions",
            ][..],
            &[
                "gateway", "admin", "--config", "g.toml", "--set", "a=1", "sessions",
            ][..],
            &[
                "gateway", "admin", "sessions", "--config", "g.toml", "--set", "a=1",
            ][..],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("g.toml")));
            assert_eq!(cli.set, ["a=1"]);
        }
    }

    #[test]
    fn the_admin_command_sends_its_token_only_to_this_host() {
        for address in [
            "127.0.0.1:9433",
            "[::1]:9433",
            "0.0.0.0:9433",
            "localhost:9433",
        ] {
            assert!(stays_on_this_host(address), "{address}");
        }
        for address in [
            "192.0.2.7:9433",
            "[2001:db8::1]:9433",
            "admin.venue:9433",
            "x",
        ] {
            assert!(!stays_on_this_host(address), "{address}");
        }
    }
}
