//! The engine process refuses bad arguments with a clear message before it
//! connects anywhere. (Its work on the log is tested end to end in
//! `tests/tests/engines.rs`, which runs this binary.)

use std::process::Command;

/// Runs `matching-stub` with `args`; it must fail: its standard error.
fn refused(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_matching-stub"))
        .args(args)
        .output()
        .expect("the engine runs");
    assert!(!output.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_names_and_instruments_are_refused() {
    let name = refused(&["--name", "two words"]);
    assert!(name.contains("--name must be 1 to 64"), "{name}");
    let long = "x".repeat(65);
    assert!(refused(&["--name", &long]).contains("--name must be"));
    let instrument = refused(&["--instrument", "1:five:1"]);
    assert!(instrument.contains("five"), "{instrument}");
    let shape = refused(&["--instrument", "1:5"]);
    assert!(shape.contains("ID:TICK_SIZE:LOT_SIZE"), "{shape}");
    let grid = refused(&["--instrument", "1:0:1"]);
    assert!(grid.contains("the instruments"), "{grid}");
}
