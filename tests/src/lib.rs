//! End-to-end tests of the gateway over real QUIC on loopback live in this crate's
//! `tests/` folder once the QUIC server exists.
