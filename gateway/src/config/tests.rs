//! The configuration's loading, overrides and checks.

use super::*;

#[test]
fn defaults_are_valid_and_round_trip_through_toml() {
    let config = Config::default();
    config.validate().expect("defaults are valid");
    let text = toml::to_string(&config).expect("serialize");
    let again: Config = toml::from_str(&text).expect("parse");
    assert_eq!(again, config);
}

#[test]
fn overrides_reach_nested_settings_with_typed_values() {
    let config = Config::load(
        None,
        &[
            "listen=127.0.0.1:9000".into(),
            "session.replay_window=100".into(),
            "log.format=json".into(),
            "engine.instruments=[{id=7, tick_size=1, lot_size=1}]".into(),
        ],
    )
    .expect("valid");
    assert_eq!(config.listen.port(), 9000);
    assert_eq!(config.session.replay_window, 100);
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.engine.instruments[0].id, 7);
}

#[test]
fn unknown_keys_and_bad_values_are_refused_with_a_message() {
    let unknown = Config::load(None, &["session.replay_windw=5".into()]).expect_err("typo");
    assert!(unknown.to_string().contains("replay_windw"), "{unknown}");
    assert!(Config::load(None, &["listen=nowhere".into()]).is_err());
    assert!(Config::load(None, &["novalue".into()]).is_err());
    let half_tls = Config::load(None, &["tls.cert=/x.pem".into()]).expect_err("half tls");
    assert!(half_tls.to_string().contains("together"));
    let zero_rtt =
        Config::load(None, &["transport.initial_rtt_ms=0".into()]).expect_err("zero rtt");
    assert!(
        zero_rtt.to_string().contains("initial_rtt_ms"),
        "{zero_rtt}"
    );
    for threshold in ["0", "65"] {
        let refused = Config::load(
            None,
            &[format!("transport.ack_eliciting_threshold={threshold}")],
        )
        .expect_err("threshold out of range");
        assert!(
            refused.to_string().contains("ack_eliciting_threshold"),
            "{refused}"
        );
    }
    let quic_rule = Config::load(None, &["transport.ack_eliciting_threshold=1".into()]);
    assert_eq!(
        quic_rule
            .expect("1 is QUIC's own rule")
            .transport
            .ack_eliciting_threshold,
        1
    );
}

#[test]
fn crash_safe_settings_are_checked_together() {
    let jetstream =
        |more: &str| Config::load(None, &["sequencer.mode=jetstream".into(), more.to_string()]);
    let loaded = jetstream("sequencer.stream=VENUE_1").expect("valid");
    assert_eq!(loaded.sequencer.mode, SequencerMode::Jetstream);
    let thread = jetstream("engine.mode=thread").expect_err("engine on its thread");
    assert!(thread.to_string().contains("engine.mode"), "{thread}");
    let external = jetstream("engine.mode=external").expect("engines on the log");
    assert_eq!(external.engine.mode, EngineMode::External);
    let embedded = Config::load(None, &["engine.mode=external".into()])
        .expect_err("engines on the log need the log");
    assert!(
        embedded.to_string().contains("sequencer.mode"),
        "{embedded}"
    );
    for bad in [
        "sequencer.stream=a.b",
        "sequencer.stream=\"\"",
        "sequencer.stream=\"a b\"",
    ] {
        let refused = jetstream(bad).expect_err(bad);
        assert!(
            refused.to_string().contains("sequencer.stream"),
            "{refused}"
        );
    }
    let no_wait = jetstream("sequencer.timeout_ms=0").expect_err("zero timeout");
    assert!(no_wait.to_string().contains("timeout_ms"), "{no_wait}");
    let half_user = jetstream("sequencer.user=gateway").expect_err("user alone");
    assert!(
        half_user.to_string().contains("password_file"),
        "{half_user}"
    );
    let unknown = Config::load(None, &["sequencer.mode=kafka".into()]).expect_err("mode");
    assert!(unknown.to_string().contains("kafka"), "{unknown}");
    for (bad, named) in [
        ("sequencer.gateway_name=\"\"", "gateway_name"),
        ("sequencer.gateway_name=\"a b\"", "gateway_name"),
        ("sequencer.gateway_timeout_ms=10", "gateway_timeout_ms"),
        ("sequencer.replicas=0", "replicas"),
        ("sequencer.replicas=7", "replicas"),
        ("sequencer.batch_max_records=0", "batch_max_records"),
        ("sequencer.append_patience_ms=120000", "append_patience_ms"),
    ] {
        let refused = jetstream(bad).expect_err(bad);
        assert!(refused.to_string().contains(named), "{refused}");
    }
    assert!(jetstream("sequencer.gateway_name=\"edge-2.venue\"").is_ok());
}

#[test]
fn a_config_file_error_names_the_file_the_line_and_the_key() {
    let path = std::env::temp_dir().join(format!("config-typo-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:4433\"\n\n[session]\nreplay_windw = 5\n",
    )
    .expect("write");
    let error = Config::load(Some(&path), &[]).expect_err("a typo");
    let _ = std::fs::remove_file(&path);
    let error = error.to_string();
    for named in [
        &path.display().to_string(),
        "line 4",
        "replay_windw",
        "replay_window",
    ] {
        assert!(error.contains(named), "{named} missing in {error}");
    }
}

#[test]
fn the_default_gateway_name_is_the_host_and_port_and_valid() {
    let config = Config::load(None, &["listen=\"127.0.0.1:4555\"".into()]).expect("valid");
    let name = config.gateway_name();
    assert!(name.ends_with("-4555"), "{name}");
    assert!(
        name.len() > "-4555".len(),
        "{name}: the host's name comes first"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert!(
        name.starts_with(host.trim().split('.').next().unwrap_or("")),
        "{name}"
    );
    let mut named = config;
    named.sequencer.gateway_name = Some("edge-1".into());
    assert_eq!(named.gateway_name(), "edge-1");
}

#[test]
fn the_core_fingerprint_follows_the_settings_the_core_applies() {
    let load = |set: &str| Config::load(None, &[set.into()]).expect("valid");
    let base = load("demo_accounts=2").core_fingerprint();
    assert_eq!(load("engine.mode=thread").core_fingerprint(), base);
    let external = Config::load(
        None,
        &[
            "demo_accounts=2".into(),
            "sequencer.mode=jetstream".into(),
            "engine.mode=external".into(),
        ],
    )
    .expect("valid");
    assert_ne!(external.core_fingerprint(), base, "a core without a book");
    assert_eq!(load("sequencer.gateway_name=x").core_fingerprint(), base);
    assert_ne!(load("session.replay_window=7").core_fingerprint(), base);
    assert_ne!(
        load("transport.idle_timeout_ms=999").core_fingerprint(),
        base
    );
}
