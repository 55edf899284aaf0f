//! The session gateway's core: every session's state machine and the data
//! structures behind it, with no IO.
//!
//! Nothing here opens a socket, spawns a task or reads the network: the gateway's
//! edge (`gateway`: QUIC, the log follower, the admin listener, metrics) appends
//! every input to a log, and [`machine::Core::apply`] applies each at the time the
//! input carries ([`time::Timestamp`]), handing back what the edge must do
//! ([`machine::Effects`]: writers to wake, connections to close).
//! So every scenario is tested deterministically, and crash-safe mode rebuilds the
//! same core by applying the same inputs again.
//!
//! # Layout
//!
//! - [`machine`]: the core as one state machine, [`machine::Core::apply`] taking
//!   each input of the log.
//! - [`input`]: the core's input type ([`input::Record`]) as the log carries it.
//! - [`engine_link`]: the matching engine, in process or elsewhere.
//! - [`external`]: engines in their own processes, on the log: requests in
//!   numbered batches, the first answer to each applied, later ones compared.
//! - [`session`]: one session's state machine (exactly-once inbound, acks, resume,
//!   takeover, cancel-on-disconnect, expiry) and the writer's transmit path.
//! - [`registry`]: all sessions in a concurrent map, with limits and event routing.
//! - [`ring`]: the per-session outbound ring of encoded messages, for replay.
//! - [`orders`]: the per-session order view behind snapshots.
//! - [`token`]: session tokens (HMAC-SHA256 with a rotating key ring).
//! - [`members`]: crash-safe mode's gateway runs on one stream and the core's time.
//! - [`snapshot`]: the whole core as one encodable image.
//! - [`connection`]: connection ids and the gateway run in them.
//! - [`convert`]: wire types ↔ engine types.
//! - [`time`]: the injected clock's instant type.

pub mod connection;
pub mod convert;
pub mod engine_link;
pub mod external;
pub mod input;
pub mod machine;
pub mod members;
pub mod orders;
pub mod registry;
pub mod ring;
pub mod session;
pub mod snapshot;
pub mod time;
pub mod token;

pub use machine::{Core, Effects};
