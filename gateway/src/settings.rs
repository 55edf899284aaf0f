//! Every setting with a one-line description: what `--print-config` prints beside
//! each key, and what `SETTINGS.md` is generated from. A test checks this list
//! against [`Config`], so it cannot drift from the code.

use crate::config::Config;

/// Every setting (`section.key`, or `key` at the top), in print order, with its
/// description.
pub const SETTINGS: &[(&str, &str)] = &[
    ("listen", "UDP address clients connect to (QUIC)"),
    ("dev_dir", "where development files go: certificate, demo accounts and client keys, token key, admin token"),
    ("accounts_file", "accounts and their API public keys (TOML); unset: demo accounts in dev_dir"),
    ("demo_accounts", "how many demo accounts to generate when accounts_file is unset"),
    ("token_key_file", "session token HMAC key in hex (at least 32 bytes); unset: generated in dev_dir"),
    ("tls.cert", "certificate chain, PEM; unset (with tls.key): a development certificate in dev_dir"),
    ("tls.key", "private key, PEM"),
    ("tls.resumption_cache", "TLS sessions remembered for resumption and 0-RTT resumes; 0 turns both off"),
    ("transport.idle_timeout_ms", "QUIC idle timeout announced to clients"),
    ("transport.keep_alive_ms", "gateway-side keep-alive interval; 0: clients keep connections alive"),
    ("transport.handshake_timeout_ms", "time to send Login or Resume after connecting"),
    ("transport.initial_rtt_ms", "round-trip estimate before the first measurement"),
    ("transport.ack_eliciting_threshold", "packets a client may take before it must acknowledge them; 1: every other packet"),
    ("transport.max_connections", "most open connections"),
    ("transport.resume_reserved_connections", "connection slots only resumes may take"),
    ("transport.max_handshaking", "most connections not yet logged in or resumed; from half on, QUIC Retry"),
    ("transport.max_handshaking_per_address", "the same, per address (IPv6: per /64)"),
    ("transport.socket_buffer_bytes", "UDP receive and send buffer asked of the kernel"),
    ("session.replay_window", "unacknowledged messages retained per session (announced as replay_window)"),
    ("session.replay_window_bytes", "bytes of unacknowledged messages retained per session"),
    ("session.token_ttl_s", "token lifetime, from minting or from the session's last disconnect"),
    ("session.detached_ttl_s", "how long a session waits for a resume"),
    ("session.max_cod_grace_ms", "longest cancel-on-disconnect grace a client may ask for"),
    ("session.max_open_orders", "working orders per session"),
    ("session.max_messages_per_second", "requests per second per session (bursts of one second's worth)"),
    ("session.max_waiting_requests", "requests that may wait for acks to free room for their answers"),
    ("session.finished_orders_retained", "finished orders per session kept for resume snapshots"),
    ("session.max_sessions", "sessions per gateway"),
    ("session.max_sessions_per_account", "sessions per account (an account may set a lower limit)"),
    ("session.unclaimed_events_per_account", "events of ended sessions' orders kept for the account's next login"),
    ("auth.venue", "venue id every login signs (different for test and production)"),
    ("auth.max_clock_skew_ms", "largest accepted difference of a login's timestamp from the gateway clock"),
    ("auth.failures_per_window", "failed authentications per address before RateLimited"),
    ("auth.failure_window_ms", "the window those are counted in"),
    ("engine.mode", "inline (in the connection tasks; for engines that never block), thread (own thread, bounded queue) or external (own processes on the log, crash-safe mode: ENGINE.md)"),
    ("engine.queue_capacity", "requests queued for the engine thread; beyond, EngineBusy"),
    ("engine.finished_orders_per_account", "finished orders per account kept for login snapshots"),
    ("engine.max_working_orders_per_account", "working orders per account, all sessions together"),
    ("engine.instruments", "instruments: id, tick_size, lot_size"),
    ("log.format", "human or json"),
    ("log.filter", "tracing filter, e.g. info or gateway=debug"),
    ("admin.listen", "TCP address of /metrics, /healthz, /readyz and /admin; empty: off"),
    ("admin.token_file", "bearer token /admin needs; unset: generated in dev_dir/admin-token"),
    ("admin.allowed_hosts", "Host names answered besides IP addresses and localhost; others get 421"),
    ("admin.max_connections", "most admin connections open at once"),
    ("admin.max_connections_per_address", "the same, per address (IPv6: per /64)"),
    ("admin.header_timeout_ms", "time to send a request's headers, or to start the next one"),
    ("sequencer.mode", "embedded (in this process) or jetstream (crash-safe: inputs on a NATS JetStream stream)"),
    ("sequencer.nats_url", "NATS server of jetstream mode; a cluster's, comma-separated"),
    ("sequencer.stream", "JetStream stream of the core's inputs (subject <stream>.in), created if missing"),
    ("sequencer.timeout_ms", "wait for NATS at start and for each append's acknowledgement"),
    ("sequencer.user", "NATS user to connect as (with password_file); unset: none"),
    ("sequencer.password_file", "file holding that user's password"),
    ("sequencer.token_file", "file holding a NATS token, instead of a user"),
    ("sequencer.tls_ca_file", "CA certificate (PEM) NATS servers are checked against; set: TLS required"),
    ("sequencer.tls_cert_file", "client certificate (PEM) for NATS servers that verify clients"),
    ("sequencer.tls_key_file", "its private key (PEM)"),
    ("sequencer.snapshot_every", "records between core snapshots (object store <stream>_snapshots); 0: none"),
    ("sequencer.purge_after_snapshot", "purge the records the replaced snapshot covered from the stream"),
    ("sequencer.gateway_name", "this gateway's name among those sharing the stream; each its own; unset: <host name>-<listen port>"),
    ("sequencer.gateway_timeout_ms", "silence after which the others declare this gateway's connections gone"),
    ("sequencer.replicas", "copies of the stream and snapshots JetStream keeps: 1, or 3 on a cluster"),
    ("sequencer.drain_notice_ms", "on SIGTERM, time not ready before connections are closed"),
    ("sequencer.batch_max_records", "most records in one stream message (a batch leaves when the one before is stored)"),
    ("sequencer.append_patience_ms", "how long a batch the stream did not take is sent again before its connections are closed"),
];

/// The value of `key` (`section.key`) in `table`, if set.
fn lookup<'t>(table: &'t toml::Table, key: &str) -> Option<&'t toml::Value> {
    match key.split_once('.') {
        Some((section, rest)) => table.get(section)?.as_table()?.get(rest),
        None => table.get(key),
    }
}

/// `config` as TOML with every setting described, unset ones commented out. It reads
/// back as the same configuration.
pub fn commented_toml(config: &Config) -> String {
    let table = toml::Table::try_from(config).unwrap_or_default();
    let mut text = String::new();
    let mut section = "";
    for (key, description) in SETTINGS {
        let (this_section, name) = key.split_once('.').unwrap_or(("", key));
        if this_section != section {
            section = this_section;
            text.push_str(&format!("\n[{section}]\n"));
        }
        text.push_str(&format!("# {description}\n"));
        match lookup(&table, key) {
            Some(value) => text.push_str(&format!("{name} = {value}\n")),
            None => text.push_str(&format!("# {name} =\n")),
        }
    }
    text
}

/// `SETTINGS.md`: every setting, its default and its description.
pub fn reference() -> String {
    let table = toml::Table::try_from(Config::default()).unwrap_or_default();
    let mut text = String::from(
        "# Gateway settings\n\n\
         Generated from `gateway/src/settings.rs` (`cargo run -p gateway -- --settings-reference`);\n\
         a test fails when this file and the code disagree. Set them in a TOML file\n\
         (`--config`), with `--set key=value`, or in `GATEWAY_SET`; `--print-config` shows\n\
         the values in effect.\n\n\
         | setting | default | what |\n|---|---|---|\n",
    );
    for (key, description) in SETTINGS {
        let default = lookup(&table, key).map_or_else(
            || "unset".to_string(),
            |value| format!("`{}`", value.to_string().replace('|', "\\|")),
        );
        text.push_str(&format!("| `{key}` | {default} | {description} |\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use super::*;

    /// Every key of a configuration with every optional setting set.
    fn keys_of_the_code() -> BTreeSet<String> {
        let mut config = Config::default();
        config.tls.cert = Some(PathBuf::from("c"));
        config.tls.key = Some(PathBuf::from("k"));
        config.accounts_file = Some(PathBuf::from("a"));
        config.token_key_file = Some(PathBuf::from("t"));
        config.admin.token_file = Some(PathBuf::from("t"));
        config.sequencer.user = Some("u".into());
        config.sequencer.password_file = Some(PathBuf::from("p"));
        config.sequencer.token_file = Some(PathBuf::from("t"));
        config.sequencer.tls_ca_file = Some(PathBuf::from("ca"));
        config.sequencer.tls_cert_file = Some(PathBuf::from("c"));
        config.sequencer.tls_key_file = Some(PathBuf::from("k"));
        config.sequencer.gateway_name = Some("g".into());
        let table = toml::Table::try_from(config).expect("serializes");
        let mut keys = BTreeSet::new();
        for (key, value) in &table {
            match value.as_table() {
                Some(section) => keys.extend(section.keys().map(|k| format!("{key}.{k}"))),
                None => {
                    keys.insert(key.clone());
                }
            }
        }
        keys
    }

    #[test]
    fn every_setting_of_the_code_is_described_and_nothing_else() {
        let described: BTreeSet<String> = SETTINGS.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(described, keys_of_the_code());
    }

    #[test]
    fn the_commented_configuration_reads_back_the_same() {
        let mut config = Config {
            accounts_file: Some(PathBuf::from("/etc/gateway/accounts.toml")),
            ..Config::default()
        };
        config.session.replay_window = 4_096;
        let text = commented_toml(&config);
        assert!(
            text.contains("# cert =\n"),
            "unset keys are commented out:\n{text}"
        );
        let path = std::env::temp_dir().join(format!("settings-{}.toml", std::process::id()));
        std::fs::write(&path, &text).expect("write");
        let loaded = Config::load(Some(&path), &[]);
        let _ = std::fs::remove_file(&path);
        assert_eq!(loaded.expect("reads back"), config);
    }

    #[test]
    fn settings_md_is_the_generated_reference() {
        assert!(
            include_str!("../../SETTINGS.md") == reference(),
            "SETTINGS.md is stale: cargo run -p gateway -- --settings-reference > SETTINGS.md"
        );
    }
}
