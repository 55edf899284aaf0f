//! How the core reaches its matching engine.
//!
//! In process ([`InProcess`], the bundled book): called in place under a lock, and
//! its answers routed before the lock is let go, so every session gets them in the
//! engine's order whichever task applied the input. Elsewhere (the gateway's engine
//! thread): a request goes out, and the answers come back later as an input of their
//! own ([`crate::input::Record::EngineEvents`]). In its own process, on the log
//! ([`crate::external::External`]): requests go out in numbered batches and the
//! engines' answers come back through the log ([`crate::input::Record::EngineAnswer`]).

use std::sync::{Mutex, PoisonError};

use matching_stub::{self as engine, MatchingEngine, OrderBookEngine};
use proto::ReasonCode;

use crate::external::{AnswerCounts, AnswerVerdict, OutgoingBatch};
use crate::snapshot::EngineImage;

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

    /// The engine's part of a core snapshot, if the core holds it (not for an
    /// engine on the gateway's own thread, whose book the core does not hold).
    fn image(&self) -> Option<EngineImage>;

    /// Requests waiting for the engine (0 for one that answers at once).
    fn queued(&self) -> usize {
        0
    }

    /// After each input of the log: the batches of requests it made, for the
    /// requests stream (an engine on the log).
    fn end_of_input(&self) -> Vec<OutgoingBatch> {
        Vec::new()
    }

    /// Every batch made and not yet answered (an engine on the log), for a gateway
    /// that starts to publish them.
    fn unanswered(&self) -> Vec<OutgoingBatch> {
        Vec::new()
    }

    /// The highest batch answered (an engine on the log): batches are answered in
    /// order.
    fn answered_through(&self) -> u64 {
        0
    }

    /// How many batches wait for an answer (an engine on the log).
    fn unanswered_count(&self) -> usize {
        0
    }

    /// An engine's answers message read from the log (an engine on the log): the
    /// verdict on each batch it answers.
    fn answer(&self, _answers: &[u8]) -> Vec<AnswerVerdict> {
        vec![AnswerVerdict::Unexpected {
            why: "an engine answer on the log, but engine.mode is not \"external\"".into(),
        }]
    }

    /// The answers counted so far (an engine on the log).
    fn answer_counts(&self) -> AnswerCounts {
        AnswerCounts::default()
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

    fn image(&self) -> Option<EngineImage> {
        Some(EngineImage::Book(
            self.book
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        ))
    }
}
