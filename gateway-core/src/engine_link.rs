//! How the core reaches its matching engine.
//!
//! In process ([`InProcess`], the bundled book): called in place under a lock, and
//! its answers routed before the lock is let go, so every session gets them in the
//! engine's order whichever task applied the input. Elsewhere (the gateway's engine
//! thread): a request goes out, and the answers come back later as an input of their
//! own ([`crate::input::Record::EngineEvents`]).

use std::sync::{Mutex, PoisonError};

use matching_stub::{self as engine, MatchingEngine, OrderBookEngine};
use proto::ReasonCode;

/// A request the engine did not take, and why: its session answers it with a
/// `Reject` of that reason.
#[derive(Debug)]
pub struct Refused {
    /// The request.
    pub request: engine::Request,
    /// Why it was not taken (`EngineBusy`, `InternalError`).
    pub reason: ReasonCode,
}

/// The core's side of its matching engine.
pub trait EngineLink: Send + Sync {
    /// Hands `request` to the engine. An engine in process answers at once:
    /// `route` gets its events before any other request reaches the engine. An
    /// engine elsewhere answers later, with an input.
    fn submit(
        &self,
        request: engine::Request,
        route: &mut dyn FnMut(&mut Vec<engine::Event>),
    ) -> Result<(), Refused>;

    /// Whether the engine answers at once (in process): then the core reads an
    /// account's orders from it when a session opens.
    fn answers_at_once(&self) -> bool;

    /// The account's orders now, if the engine answers at once.
    fn orders_of(&self, account: u64) -> Option<Vec<engine::OrderView>>;

    /// A copy of the book, for a core snapshot, if the engine is in process.
    fn book(&self) -> Option<OrderBookEngine>;

    /// Requests waiting for the engine (0 for one that answers at once).
    fn queued(&self) -> usize {
        0
    }
}

/// The bundled book, in process.
#[derive(Debug)]
pub struct InProcess {
    book: Mutex<OrderBookEngine>,
}

impl InProcess {
    /// The link to `book`.
    pub fn new(book: OrderBookEngine) -> Self {
        InProcess {
            book: Mutex::new(book),
        }
    }
}

impl EngineLink for InProcess {
    fn submit(
        &self,
        request: engine::Request,
        route: &mut dyn FnMut(&mut Vec<engine::Event>),
    ) -> Result<(), Refused> {
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        let mut events = Vec::new();
        book.handle(request, &mut events);
        route(&mut events);
        Ok(())
    }

    fn answers_at_once(&self) -> bool {
        true
    }

    fn orders_of(&self, account: u64) -> Option<Vec<engine::OrderView>> {
        Some(
            self.book
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .orders_of(account),
        )
    }

    fn book(&self) -> Option<OrderBookEngine> {
        Some(
            self.book
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}
