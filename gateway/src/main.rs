//! The gateway binary. The QUIC server is not wired up yet; this says so plainly
//! instead of pretending to listen.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "gateway {}: the QUIC server is not implemented yet (see the open \
         \"Gateway server over QUIC\" issue). The wire format (proto), the matching \
         engine (matching-stub) and the session core (gateway library) are usable \
         and tested: run `cargo test --workspace`.",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::FAILURE
}
