//! Running an engine on its own thread behind a bounded request queue.
//!
//! The engine thread takes requests in submission order, handles them in batches of
//! whatever is queued (up to [`MAX_BATCH`]), and hands each batch's events to an
//! [`EventSink`] in one call, so the sink's cost (a channel send, a wake-up) is paid
//! per batch rather than per event.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::api::{Event, MatchingEngine, Request};

/// Most requests handled before the sink is called.
pub const MAX_BATCH: usize = 256;

/// Receives the engine's events, on the engine thread.
pub trait EventSink: Send + 'static {
    /// Takes the events of one batch; leave `events` empty or drain it, it is cleared
    /// afterwards.
    fn deliver(&mut self, events: &mut Vec<Event>);
}

impl<F: FnMut(&mut Vec<Event>) + Send + 'static> EventSink for F {
    fn deliver(&mut self, events: &mut Vec<Event>) {
        self(events)
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; the request is handed back.
    #[error("engine queue is full")]
    Full(Request),
    /// The engine thread has stopped.
    #[error("engine has stopped")]
    Stopped(Request),
}

enum Message {
    Request(Request),
    Stop,
}

/// A cloneable handle that submits requests to a running engine thread.
#[derive(Clone)]
pub struct EngineSender {
    queue: SyncSender<Message>,
    queued: Arc<AtomicUsize>,
}

impl EngineSender {
    /// Queues a request without waiting; fails when the queue is full.
    pub fn try_submit(&self, request: Request) -> Result<(), SubmitError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.queue
            .try_send(Message::Request(request))
            .inspect_err(|_| {
                self.queued.fetch_sub(1, Ordering::Relaxed);
            })
            .map_err(|error| match error {
                TrySendError::Full(Message::Request(r)) => SubmitError::Full(r),
                TrySendError::Disconnected(Message::Request(r)) => SubmitError::Stopped(r),
                TrySendError::Full(Message::Stop) | TrySendError::Disconnected(Message::Stop) => {
                    unreachable!("only requests are sent through try_submit")
                }
            })
    }

    /// Queues a request, waiting while the queue is full.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.queue.send(Message::Request(request)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            SubmitError::Stopped(request)
        })
    }

    /// Requests queued and not yet taken by the engine thread (for metrics).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// An engine running on its own thread.
pub struct EngineThread<E> {
    sender: EngineSender,
    thread: JoinHandle<E>,
}

impl<E: MatchingEngine> EngineThread<E> {
    /// Starts `engine` on a new thread with a queue of `capacity` requests.
    pub fn spawn(engine: E, capacity: usize, sink: impl EventSink) -> std::io::Result<Self> {
        let (queue, requests) = mpsc::sync_channel(capacity);
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = Arc::clone(&queued);
        let thread = thread::Builder::new()
            .name("matching-engine".into())
            .spawn(move || run(engine, &requests, &taken, sink))?;
        Ok(EngineThread {
            sender: EngineSender { queue, queued },
            thread,
        })
    }

    /// A handle for submitting requests.
    pub fn sender(&self) -> EngineSender {
        self.sender.clone()
    }

    /// Handles everything queued before this call, stops the thread and returns the
    /// engine. Requests submitted through other handles afterwards fail with
    /// [`SubmitError::Stopped`].
    pub fn shutdown(self) -> thread::Result<E> {
        // A send failure means the thread already ended; join reports why.
        let _ = self.sender.queue.send(Message::Stop);
        self.thread.join()
    }
}

fn run<E: MatchingEngine>(
    mut engine: E,
    requests: &Receiver<Message>,
    queued: &AtomicUsize,
    mut sink: impl EventSink,
) -> E {
    let mut events = Vec::with_capacity(MAX_BATCH * 4);
    while let Ok(first) = requests.recv() {
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(message) = next.take() {
            match message {
                Message::Request(request) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    engine.handle(request, &mut events);
                }
                Message::Stop => {
                    sink.deliver(&mut events);
                    return engine;
                }
            }
            handled += 1;
            // Take another queued request only if this batch has room for it: a
            // request taken off the queue is always handled.
            if handled < MAX_BATCH {
                next = requests.try_recv().ok();
            }
        }
        sink.deliver(&mut events);
        events.clear();
    }
    engine
}
