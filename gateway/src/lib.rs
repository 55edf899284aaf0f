//! The session gateway: resumable trading sessions in front of a matching engine.
//!
//! The session core is sans-IO: plain state machines and data structures with no
//! sockets and no clock of their own (time is a [`time::Timestamp`] argument), so
//! every scenario is tested deterministically. The QUIC layer around it stays thin.
//!
//! # Layout
//!
//! - [`token`]: session tokens (HMAC-SHA256 with a rotating key ring).
//! - [`ring`]: the per-session outbound ring of encoded messages, for replay.
//! - [`orders`]: the per-session order view behind snapshots.
//! - [`session`]: one session's state machine (exactly-once inbound, acks, resume,
//!   takeover, cancel-on-disconnect, expiry) and the writer's transmit path.
//! - [`registry`]: all sessions in a concurrent map, with limits and event routing.
//! - [`convert`]: wire types ↔ engine types.
//! - [`time`]: the injected clock's instant type.
//! - [`sequencer`]: crash-safe mode, the core's inputs on a NATS JetStream stream.
//! - [`keys`]: production credentials (`gateway keys ...`); [`dev`]: the
//!   development files.

pub mod admin;
pub mod auth;
pub mod config;
pub mod convert;
pub mod dev;
pub mod keys;
pub mod members;
pub mod metrics;
pub mod orders;
pub mod registry;
pub mod ring;
pub mod sequencer;
pub mod server;
pub mod session;
pub mod settings;
pub mod snapshot;
pub mod time;
pub mod token;
