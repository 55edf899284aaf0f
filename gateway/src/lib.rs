//! The session gateway: resumable trading sessions in front of a matching engine.
//!
//! The session core is sans-IO and lives in its own crate, `gateway-core`
//! (re-exported here under the same module names): plain state machines and data
//! structures with no sockets, so every scenario is tested deterministically. This
//! crate is the edge around it, kept thin.
//!
//! # Layout
//!
//! - [`server`]: the QUIC server, the core's inputs and the engine thread.
//! - [`log`]: the seam to the core: every input on a log, in memory or on the
//!   stream.
//! - [`auth`]: API keys, login signatures, nonces and failure limits.
//! - [`admin`] and [`metrics`]: the operator's HTTP listener and `/metrics`.
//! - [`config`] and [`settings`]: the configuration file and its reference.
//! - [`sequencer`]: crash-safe mode, the core's inputs on a NATS JetStream stream.
//! - [`requests_stream`]: engines on the log, the stream of their requests.
//! - [`keys`]: production credentials (`gateway keys ...`); [`dev`]: the
//!   development files.

pub mod admin;
pub mod auth;
pub mod clock;
pub mod config;
pub mod dev;
pub mod keys;
pub mod log;
pub mod metrics;
pub mod requests_stream;
pub mod sequencer;
pub mod server;
pub mod settings;

pub use gateway_core::{convert, members, orders, registry, ring, session, snapshot, time, token};
