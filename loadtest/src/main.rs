//! The load and chaos client. Not implemented yet: it needs the QUIC gateway.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("loadtest: not implemented yet; it needs the QUIC gateway server first.");
    ExitCode::FAILURE
}
