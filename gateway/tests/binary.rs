//! The `gateway` binary's command line, run as an operator runs it. (Building this
//! test also builds the binary, which the end-to-end tests in `tests/` start.)

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
}

#[test]
fn it_prints_the_settings_reference() {
    let out = gateway()
        .arg("--settings-reference")
        .output()
        .expect("gateway runs");
    assert!(out.status.success());
    // That SETTINGS.md is this reference is the settings module's own test.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        gateway::settings::reference()
    );
}

#[test]
fn an_unknown_setting_stops_it_before_it_binds_and_names_the_setting() {
    let dir = std::env::temp_dir().join(format!("gateway-binary-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = gateway()
        .current_dir(&dir)
        .args(["--set", "sesion.replay_window=5", "--listen", "127.0.0.1:0"])
        .output()
        .expect("gateway runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid configuration"), "{stderr}");
    assert!(stderr.contains("sesion"), "{stderr}");
}
