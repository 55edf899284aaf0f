//! A real price-time-priority matching engine, and the trait a venue implements to put
//! its own engine behind the gateway.
//!
//! It is called a stub only because venues replace it: orders really match, and fills
//! go to both sides.
//!
//! ```
//! use matching_stub::*;
//!
//! let mut engine = OrderBookEngine::new(EngineConfig::with_instruments(vec![Instrument {
//!     id: 1,
//!     tick_size: 5,
//!     lot_size: 10,
//! }]))
//! .unwrap();
//! let order = |account, side| NewOrder {
//!     owner: Owner { account, session: account },
//!     tag: 1,
//!     client_order_id: 1,
//!     instrument: 1,
//!     side,
//!     order_type: OrderType::Limit,
//!     time_in_force: TimeInForce::Gtc,
//!     price: 100,
//!     quantity: 30,
//! };
//! let mut events = Vec::new();
//! engine.handle(Request::New(order(7, Side::Sell)), &mut events);
//! engine.handle(Request::New(order(8, Side::Buy)), &mut events);
//! let fills = events.iter().filter(|e| matches!(e, Event::Fill(_))).count();
//! assert_eq!(fills, 2); // one for each side of the trade
//! ```
//!
//! # Layout
//!
//! - [`api`]: requests, events, the [`MatchingEngine`] trait and its contract.
//! - [`book`]: [`OrderBookEngine`], the bundled engine.
//! - [`thread`]: [`EngineThread`], running any engine on its own thread behind a
//!   bounded queue.
//! - [`wire`]: the engine protocol's encodings (ENGINE.md), for an engine in its
//!   own process reading the gateways' requests from the log.

pub mod api;
pub mod book;
pub mod thread;
pub mod wire;

pub use api::*;
pub use book::{ConfigError, EngineConfig, OrderBookEngine};
pub use thread::{EngineSender, EngineThread, EventSink, SubmitError};
