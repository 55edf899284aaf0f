//! The core as one state machine: [`Core::apply`] takes one input (an [`Entry`] of
//! the log, at the core's time for it) and changes sessions, the book, the timers
//! and the gateway runs; what the edge must do about it comes back in [`Effects`]
//! (writers to wake, connections to close, engine events to count) and in the
//! returned [`Outcome`] (for whoever waits on the input: a handshake, an operator).
//!
//! Both logs feed this one method: embedded mode's in-memory log applies each input
//! as it is appended, crash-safe mode's follower applies the stream in order. The
//! core reads no clock (the time is the record's, through [`Members`]), no random
//! generator (a token's random part is in its input) and no socket, so a core fed the
//! same inputs ends the same, in every gateway of a stream and after a restart.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use matching_stub as engine;
use proto::{Frame, ReasonCode};
use tracing::{debug, info, warn};

use crate::engine_link::{EngineLink, Refused};
use crate::external::{AnswerCounts, AnswerVerdict, OutgoingBatch};
use crate::input::{Entry, Outcome, Record};
use crate::members::Members;
use crate::registry::{lock, Registry, SessionHandle};
use crate::session::{Action, CodPolicy, ConnectionId};
use crate::snapshot::CoreImage;
use crate::time::Timestamp;
use crate::token::TokenEntropy;

/// What applying an input asks of the edge, beyond its outcome.
#[derive(Debug, Default)]
pub struct Effects {
    /// Connections whose session has frames to send (may repeat).
    pub wake: Vec<ConnectionId>,
    /// Connections to close, and why (a connection may be asked more than once).
    pub close: Vec<(ConnectionId, ReasonCode)>,
    /// The engine's events routed, in order, and its answers to order queries
    /// (`OrderStates`, not routed): for the edge's counters and waiting queries.
    pub events: Vec<engine::Event>,
    /// Batches of requests for engines on the log, to publish to the requests
    /// stream ([`Core::end_of_input`]).
    pub requests: Vec<OutgoingBatch>,
}

/// Every session, the engine link and the gateway runs on the log.
pub struct Core {
    registry: Registry,
    engine: Box<dyn EngineLink>,
    members: Mutex<Members>,
    idle_timeout: Duration,
    fenced_records: AtomicU64,
    applied_position: AtomicU64,
}

impl Core {
    /// A core of `registry` and `engine`, its gateway runs `members` (empty for a
    /// new log), after the log's record at `position`; sessions expire after
    /// `idle_timeout` without a connection's sign of life (`transport.idle_timeout_ms`).
    pub fn new(
        registry: Registry,
        engine: Box<dyn EngineLink>,
        members: Members,
        position: u64,
        idle_timeout: Duration,
    ) -> Self {
        Core {
            registry,
            engine,
            members: Mutex::new(members),
            idle_timeout,
            fenced_records: AtomicU64::new(0),
            applied_position: AtomicU64::new(position),
        }
    }

    /// The sessions, for the edge's writers (each session's transmit path), its
    /// reads (census, session list, tokens) and its timer checks.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The gateway runs on the log and the core's time.
    pub fn members(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the engine answers at once (see [`EngineLink::answers_at_once`]).
    pub fn engine_answers_at_once(&self) -> bool {
        self.engine.answers_at_once()
    }

    /// The account's orders now, if the engine answers at once.
    pub fn orders_of(&self, account: u64) -> Option<Vec<engine::OrderView>> {
        self.engine.orders_of(account)
    }

    /// Requests waiting for the engine.
    pub fn engine_queued(&self) -> usize {
        self.engine.queued()
    }

    /// Every batch of requests made and not yet answered (engines on the log): a
    /// gateway starting from a snapshot offers them to the requests stream again.
    pub fn engine_unanswered(&self) -> Vec<OutgoingBatch> {
        self.engine.unanswered()
    }

    /// The highest batch of requests answered (engines on the log).
    pub fn engine_answered_through(&self) -> u64 {
        self.engine.answered_through()
    }

    /// How many batches of requests wait for an answer (engines on the log).
    pub fn engine_unanswered_count(&self) -> usize {
        self.engine.unanswered_count()
    }

    /// The engines' answers counted by this process (engines on the log).
    pub fn engine_answer_counts(&self) -> AnswerCounts {
        self.engine.answer_counts()
    }

    /// After the last record of one message of the log: the requests the message's
    /// records made become a batch for the engines on the log (`out.requests`). A
    /// follower calls it after each message, so batches are made alike in every
    /// gateway applying the log.
    pub fn end_of_input(&self, out: &mut Effects) {
        out.requests.extend(self.engine.end_of_input());
    }

    /// Records not applied because their gateway run had ended.
    pub fn fenced_records(&self) -> u64 {
        self.fenced_records.load(Ordering::Relaxed)
    }

    /// The log position of the latest record applied.
    pub fn applied_position(&self) -> u64 {
        self.applied_position.load(Ordering::Relaxed)
    }

    /// The whole core after the record at `position`, for a snapshot (`None` with
    /// the engine out of process: its book is not the core's).
    pub fn image(&self, position: u64) -> Option<CoreImage> {
        let engine = self.engine.image()?;
        Some(CoreImage {
            position,
            members: self.members().clone(),
            registry: self.registry.image(),
            engine,
        })
    }

    /// Applies the log's record at `position`: at the core's time for it, unless its
    /// gateway run has ended (then nothing changes and the outcome is
    /// [`Outcome::Fenced`]).
    pub fn apply(&self, entry: Entry, position: u64, out: &mut Effects) -> Outcome {
        self.applied_position.store(position, Ordering::Relaxed);
        let Some(now) = self.admit(&entry, position) else {
            self.fenced_records.fetch_add(1, Ordering::Relaxed);
            debug!(
                position,
                from = entry.from,
                "fenced off the record of a gateway run that ended"
            );
            return Outcome::Fenced;
        };
        let mut actions = Vec::new();
        let outcome = match entry.record {
            // Taken by `admit`.
            Record::Started { .. } | Record::Stopped => Outcome::Applied,
            Record::Login {
                conn,
                account,
                max_sessions,
                login,
                entropy,
                account_orders,
            } => Outcome::Session(match decoded(&login) {
                Some(Frame::Login(login)) => {
                    let orders = account_orders
                        .or_else(|| self.engine.orders_of(account))
                        .unwrap_or_default();
                    let max_sessions = max_sessions.and_then(|m| usize::try_from(m).ok());
                    let login = NewLogin {
                        conn,
                        account,
                        max_sessions,
                        login: &login,
                        orders: &orders,
                    };
                    self.open_session(login, (now, &entropy), &mut actions)
                }
                _ => Err(ReasonCode::InternalError),
            }),
            Record::Resume {
                conn,
                resume,
                sent_here,
                entropy,
            } => Outcome::Session(match decoded(&resume) {
                Some(Frame::Resume(resume)) => self.registry.resume(
                    conn,
                    &resume,
                    sent_here,
                    (now, &entropy),
                    |account| self.engine.orders_of(account),
                    &mut actions,
                ),
                _ => Err(ReasonCode::InternalError),
            }),
            Record::Frame {
                session,
                conn,
                frame,
            } => {
                if let (Some(session), Some(frame)) = (self.registry.get(session), decoded(&frame))
                {
                    let mut session = lock(&session);
                    session.handle_frame(conn, &frame, now, &mut actions);
                    // Duplicates and gateway-side rejects; the engine's answers
                    // wake it when routed.
                    if session.has_output_for(conn) {
                        out.wake.push(conn);
                    }
                }
                Outcome::Applied
            }
            Record::EngineEvents { mut events } => {
                self.route_events(&mut events, now, &mut actions, out);
                Outcome::Applied
            }
            Record::EngineAnswer { answer } => {
                for verdict in self.engine.answer(&answer) {
                    match verdict {
                        AnswerVerdict::First {
                            mut events, batch, ..
                        } => {
                            debug!(batch, "an engine answered a batch first");
                            self.route_events(&mut events, now, &mut actions, out);
                        }
                        AnswerVerdict::Again {
                            batch,
                            engine,
                            same: Some(false),
                        } => warn!(
                            batch,
                            engine,
                            "an engine's answer differs from the first answer to its batch: the engines disagree"
                        ),
                        AnswerVerdict::Again { .. } => {}
                        AnswerVerdict::Unexpected { why } => {
                            warn!(position, "an engine answer was ignored: {why}")
                        }
                    }
                }
                Outcome::Applied
            }
            Record::QueryOrders { account, tag } => {
                let query = engine::Request::QueryOrders { account, tag };
                self.execute(vec![Action::Engine(query)], now, out);
                Outcome::Applied
            }
            Record::Abandoned { conn } => {
                self.registry.connection_abandoned(conn, now);
                Outcome::Applied
            }
            Record::ConnectionLost { session, conn } => {
                if let Some(session) = self.registry.get(session) {
                    self.registry.connection_lost(&session, conn, now);
                }
                Outcome::Applied
            }
            Record::Tick => {
                self.registry.handle_timeouts(now, &mut actions);
                Outcome::Applied
            }
            Record::Revoke { sessions } => {
                Outcome::Ended(self.end_sessions(&sessions, now, &mut actions, out))
            }
            Record::KillSwitch { account } => {
                // The cancels first: a connected session's stream carries them
                // before its `Close` (with the engine in process).
                let cancel = engine::Request::MassCancel {
                    scope: engine::MassCancelScope::Account(account),
                    reason: engine::CancelReason::KillSwitch,
                };
                self.execute(vec![Action::Engine(cancel)], now, out);
                let sessions = self.registry.sessions_of(account);
                Outcome::Ended(self.end_sessions(&sessions, now, &mut actions, out))
            }
            Record::EndAll => {
                self.registry
                    .end_all(ReasonCode::ShuttingDown, &mut actions);
                Outcome::Applied
            }
            Record::RotateKey { key_id, secret } => Outcome::Done(
                self.registry
                    .with_keys(|keys| keys.rotate(key_id, &secret))
                    .is_ok(),
            ),
            Record::RetireKey { key_id } => {
                Outcome::Done(self.registry.with_keys(|keys| keys.retire(key_id)))
            }
        };
        self.execute(actions, now, out);
        outcome
    }

    /// Whether a record's gateway run is live (`Started` begins one); if it is,
    /// notes the run heard and returns the core's time for the record, after ending
    /// the runs that it replaces, that said they stop, or that have been silent too
    /// long (their connections are gone).
    fn admit(&self, entry: &Entry, position: u64) -> Option<Timestamp> {
        let mut members = self.members();
        let mut ended = Vec::new();
        let now = match &entry.record {
            Record::Started {
                gateway,
                timeout_ms,
                settings,
            } => {
                info!(gateway, run = position, "a gateway run started on the log");
                let (now, replaced) =
                    members.started(gateway, position, (*timeout_ms, *settings), entry.time_ms);
                ended.extend(replaced);
                if let Some(other) = members.other_settings(position, *settings) {
                    warn!(
                        gateway,
                        other,
                        "a gateway started on the log with other core settings than a running one; it will refuse to serve"
                    );
                }
                now
            }
            // Engines are not gateway runs: their answers count at the core's time.
            Record::EngineAnswer { .. } => return Some(members.now()),
            _ => members.heard(entry.from, entry.time_ms)?,
        };
        if matches!(entry.record, Record::Stopped) && members.stopped(entry.from) {
            ended.push(entry.from);
        }
        ended.extend(members.expire());
        drop(members);
        for run in ended {
            info!(
                run,
                position, "a gateway run ended: its connections are gone"
            );
            self.registry.run_ended(run, now);
        }
        Some(now)
    }

    /// Opens a session for an authenticated login, unless a limit refuses it.
    fn open_session(
        &self,
        login: NewLogin<'_>,
        (now, entropy): (Timestamp, &TokenEntropy),
        actions: &mut Vec<Action>,
    ) -> Result<SessionHandle, ReasonCode> {
        let cod = CodPolicy {
            mode: login.login.cancel_on_disconnect,
            grace: Duration::from_millis(u64::from(login.login.cod_grace_ms)),
        };
        let new = self.registry.login(
            login.account,
            login.max_sessions,
            cod,
            login.conn,
            login.orders,
            self.idle_timeout,
            (now, entropy),
            actions,
        )?;
        Ok(new.session)
    }

    /// Ends these sessions (`Revoked`); returns those that were live.
    fn end_sessions(
        &self,
        ids: &[u64],
        now: Timestamp,
        actions: &mut Vec<Action>,
        out: &mut Effects,
    ) -> Vec<u64> {
        let ended = ids
            .iter()
            .copied()
            .filter(|id| self.registry.revoke(*id, actions))
            .collect();
        self.execute(std::mem::take(actions), now, out);
        ended
    }

    /// Routes engine events into their sessions; what the sessions ask for in turn
    /// goes into `actions`.
    fn route_events(
        &self,
        events: &mut Vec<engine::Event>,
        now: Timestamp,
        actions: &mut Vec<Action>,
        out: &mut Effects,
    ) {
        for event in events.drain(..) {
            if !matches!(event, engine::Event::OrderStates { .. }) {
                self.registry.route(&event, now, actions, &mut out.wake);
            }
            out.events.push(event);
        }
    }

    /// Carries out what the sessions asked for, and what that asks for in turn (the
    /// engine's answers can release a session's waiting requests), in a loop rather
    /// than by recursion.
    fn execute(&self, actions: Vec<Action>, now: Timestamp, out: &mut Effects) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Engine(request) => {
                    let mut more = Vec::new();
                    let submitted = self.engine.submit(request, &mut |events| {
                        self.route_events(events, now, &mut more, out);
                    });
                    if let Err(refused) = submitted {
                        self.refuse(&refused, now, &mut more, out);
                    }
                    queue.extend(more);
                }
                Action::CloseConnection { conn, reason } => out.close.push((conn, reason)),
                Action::Ended { session_id, reason } => {
                    info!(session = session_id, ?reason, "session ended");
                    self.registry.remove(session_id, reason);
                }
            }
        }
    }

    /// Answers a request the engine did not take with a `Reject`.
    fn refuse(
        &self,
        refused: &Refused,
        now: Timestamp,
        actions: &mut Vec<Action>,
        out: &mut Effects,
    ) {
        let owner = refused.request.owner();
        if let Some(session) = owner.and_then(|owner| self.registry.get(owner.session)) {
            let wake =
                lock(&session).refuse_request(&refused.request, refused.reason, now, actions);
            out.wake.extend(wake);
        }
    }
}

/// A login the edge authenticated, as the core opens its session.
struct NewLogin<'a> {
    conn: ConnectionId,
    account: u64,
    max_sessions: Option<usize>,
    login: &'a proto::Login,
    orders: &'a [engine::OrderView],
}

/// The frame a record carries, if it is one.
fn decoded(bytes: &[u8]) -> Option<Frame> {
    match proto::decode(bytes) {
        Ok(Some((frame, _))) => Some(frame),
        _ => None,
    }
}
