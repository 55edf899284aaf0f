//! The core's side of the server: what an input does to sessions, the book and the
//! timers. In embedded mode the connection tasks, the timer and the admin calls run
//! these as inputs arrive; in crash-safe mode only the task following the stream
//! does, record by record, at the core's time for each ([`crate::members`]), so a
//! gateway started again on the stream does exactly the same.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use matching_stub::{self as engine, SubmitError};
use proto::{Frame, ReasonCode};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::{EngineLink, Shared};
use crate::registry::{lock, SessionHandle};
use crate::sequencer::{Entry, JetStreamLog, Outcome, Record};
use crate::session::{Action, CodPolicy, ConnectionId};
use crate::snapshot::CoreImage;
use crate::time::Timestamp;
use crate::token::TokenEntropy;

/// Crash-safe mode: applies the stream to the core, in order, from the record after
/// `after` (the restored snapshot's, or 0) for as long as the gateway runs; says when
/// the record at `start` (this gateway's `Started`) is applied. Every
/// `snapshot_every` records the earliest live gateway run snapshots the core and
/// stores the snapshot in the background. The gateway has failed if its stream lost
/// records the core needs, or when its own run has ended (another gateway started
/// under its name, or it was silent too long and the others moved on).
pub(super) async fn follow_log(
    shared: Arc<Shared>,
    log: Arc<JetStreamLog>,
    after: u64,
    start: u64,
    caught_up: oneshot::Sender<()>,
) {
    let mut caught_up = Some(caught_up);
    let mut snapshots = Snapshots::new(after, shared.snapshot_every);
    // Set once this run's own `Stopped` record is applied: the gateway is stopping.
    let mut stopped = false;
    let error = log
        .follow(after, |entry, position| {
            if stopped {
                return;
            }
            stopped = entry.from == start && matches!(entry.record, Record::Stopped);
            shared.apply(entry, position, &log);
            if position < start || stopped {
                return;
            }
            if let Some(caught_up) = caught_up.take() {
                let _ = caught_up.send(());
            }
            let members = shared
                .members
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !members.is_live(start) {
                // Its records are fenced off and its connections declared gone:
                // this gateway must not answer for any session any more.
                drop(members);
                if shared.failed.borrow().is_none() {
                    let why = format!(
                        "this gateway's run (started at position {start}) ended at position \
                         {position}: another gateway started under its sequencer.gateway_name, \
                         or it was silent on the stream for longer than \
                         sequencer.gateway_timeout_ms"
                    );
                    tracing::error!("{why}: the gateway stops");
                    shared.failed.send_replace(Some(why));
                }
                return;
            }
            let takes_snapshots = members.snapshot_taker() == Some(start);
            drop(members);
            if takes_snapshots {
                snapshots.after(position, &shared, &log);
            }
        })
        .await;
    tracing::error!(%error, "the core cannot go on with its stream: the gateway stops");
    shared.failed.send_replace(Some(error.to_string()));
}

/// When the core is snapshotted, and whether a snapshot is still being stored.
struct Snapshots {
    every: u64,
    next_at: u64,
    storing: Arc<AtomicBool>,
}

impl Snapshots {
    fn new(after: u64, every: u64) -> Self {
        Snapshots {
            every,
            next_at: after.saturating_add(every),
            storing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// After the record at `position`: snapshots the core if one is due and the
    /// last one is stored (a slow store delays the next snapshot, never the core),
    /// and stores it in the background.
    fn after(&mut self, position: u64, shared: &Arc<Shared>, log: &Arc<JetStreamLog>) {
        if self.every == 0 || position < self.next_at || self.storing.load(Ordering::Acquire) {
            return;
        }
        let taken = Instant::now();
        let Some(image) = shared.core_image(position) else {
            return;
        };
        let bytes = image.encode();
        let encode_us = u64::try_from(taken.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.next_at = position.saturating_add(self.every);
        self.storing.store(true, Ordering::Release);
        let (storing, shared, log) = (
            Arc::clone(&self.storing),
            Arc::clone(shared),
            Arc::clone(log),
        );
        tokio::spawn(async move {
            match log.save_snapshot(position, &bytes).await {
                // A later snapshot is stored already (a successor's).
                Ok(false) => {}
                Ok(true) => {
                    info!(
                        position,
                        bytes = bytes.len(),
                        encode_us,
                        store_ms = u64::try_from(taken.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "core snapshot stored"
                    );
                    shared.snapshot_position.store(position, Ordering::Relaxed);
                }
                Err(error) => {
                    warn!(
                        position,
                        %error,
                        "a core snapshot was not stored; the next is due sequencer.snapshot_every records on"
                    );
                    shared.snapshot_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            storing.store(false, Ordering::Release);
        });
    }
}

impl Shared {
    /// Crash-safe mode: the core after the record at `position`, for a snapshot
    /// (`None` with the engine on its own thread, which crash-safe mode refuses).
    fn core_image(&self, position: u64) -> Option<CoreImage> {
        let EngineLink::Inline(book) = &self.engine else {
            return None;
        };
        let engine = book.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Some(CoreImage {
            position,
            members: self
                .members
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            registry: self.registry.image(),
            engine,
        })
    }

    /// Core: a frame from the client of `session` on `conn` after the handshake.
    pub(super) fn take_frame(
        &self,
        session: &SessionHandle,
        conn_id: ConnectionId,
        frame: &Frame,
        now: Timestamp,
    ) {
        let mut actions = Vec::new();
        let queued = {
            let mut session = lock(session);
            session.handle_frame(conn_id, frame, now, &mut actions);
            // Duplicates and gateway-side rejects; engine answers wake it when routed.
            session.has_output_for(conn_id)
        };
        if queued {
            self.wake(conn_id);
        }
        self.execute(actions, now);
    }

    /// Crash-safe mode: applies the record at `position` of the stream to the core,
    /// at the core's time for it ([`crate::members`]), and hands the outcome to the
    /// gateway waiting for it. Records of gateway runs that ended are not applied.
    pub(super) fn apply(&self, entry: Entry, position: u64, log: &JetStreamLog) {
        self.applied_position.store(position, Ordering::Relaxed);
        let Some(now) = self.admit_record(&entry, position) else {
            self.fenced_records.fetch_add(1, Ordering::Relaxed);
            debug!(
                position,
                from = entry.from,
                "fenced off the record of a gateway run that ended"
            );
            if entry.reply != 0 {
                log.answer(entry.reply, Outcome::Fenced);
            }
            return;
        };
        let decoded = |bytes: &[u8]| match proto::decode(bytes) {
            Ok(Some((frame, _))) => Some(frame),
            _ => None,
        };
        let outcome = match entry.record {
            // Taken by `admit_record`.
            Record::Started { .. } | Record::Stopped => None,
            Record::Login {
                conn,
                account,
                max_sessions,
                login,
                entropy,
            } => {
                let created = match decoded(&login) {
                    Some(Frame::Login(login)) => {
                        let orders = self.orders_now(account).unwrap_or_default();
                        let max_sessions = max_sessions.and_then(|m| usize::try_from(m).ok());
                        let input = (now, &entropy);
                        self.open_session(conn, account, max_sessions, &login, &orders, input)
                    }
                    _ => Err(ReasonCode::InternalError),
                };
                Some(Outcome::Session(created))
            }
            Record::Resume {
                conn,
                resume,
                sent_here,
                entropy,
            } => Some(Outcome::Session(match decoded(&resume) {
                Some(Frame::Resume(resume)) => {
                    self.resume_session(conn, &resume, sent_here, (now, &entropy))
                }
                _ => Err(ReasonCode::InternalError),
            })),
            Record::Frame {
                session,
                conn,
                frame,
            } => {
                if let (Some(session), Some(frame)) = (self.registry.get(session), decoded(&frame))
                {
                    self.take_frame(&session, conn, &frame, now);
                }
                None
            }
            Record::Abandoned { conn } => {
                self.registry.connection_abandoned(conn, now);
                None
            }
            Record::ConnectionLost { session, conn } => {
                if let Some(session) = self.registry.get(session) {
                    self.registry.connection_lost(&session, conn, now);
                }
                None
            }
            Record::Tick => {
                let mut actions = Vec::new();
                self.registry.handle_timeouts(now, &mut actions);
                self.execute(actions, now);
                None
            }
            Record::Revoke { sessions } => Some(Outcome::Ended(self.end_sessions(&sessions, now))),
            Record::KillSwitch { account } => {
                Some(Outcome::Ended(self.cancel_and_end_account(account, now)))
            }
            Record::RotateKey { key_id, secret } => Some(Outcome::Done(
                self.registry
                    .with_keys(|keys| keys.rotate(key_id, &secret))
                    .is_ok(),
            )),
            Record::RetireKey { key_id } => Some(Outcome::Done(
                self.registry.with_keys(|keys| keys.retire(key_id)),
            )),
        };
        if let Some(outcome) = outcome.filter(|_| entry.reply != 0) {
            log.answer(entry.reply, outcome);
        }
    }

    /// Crash-safe mode: whether a record's gateway run is live (`Started` begins
    /// one); if it is, notes the run heard and returns the core's time for the
    /// record, after ending the runs that it replaces, that said they stop, or that
    /// have been silent too long (their connections are gone).
    fn admit_record(&self, entry: &Entry, position: u64) -> Option<Timestamp> {
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ended = Vec::new();
        let now = match &entry.record {
            Record::Started {
                gateway,
                timeout_ms,
                settings,
            } => {
                info!(
                    gateway,
                    run = position,
                    "a gateway run started on the stream"
                );
                let (now, replaced) =
                    members.started(gateway, position, (*timeout_ms, *settings), entry.time_ms);
                ended.extend(replaced);
                if let Some(other) = members.other_settings(position, *settings) {
                    warn!(
                        gateway,
                        other,
                        "a gateway started on the stream with other core settings than a running one; it will refuse to serve"
                    );
                }
                now
            }
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

    /// Core: ends these sessions (`Revoked`); returns those that were live.
    pub(super) fn end_sessions(&self, ids: &[u64], now: Timestamp) -> Vec<u64> {
        let mut actions = Vec::new();
        let ended = ids
            .iter()
            .copied()
            .filter(|id| self.registry.revoke(*id, &mut actions))
            .collect();
        self.execute(actions, now);
        ended
    }

    /// Core: the kill switch.
    pub(super) fn cancel_and_end_account(&self, account: u64, now: Timestamp) -> Vec<u64> {
        let cancel = engine::Request::MassCancel {
            scope: engine::MassCancelScope::Account(account),
            reason: engine::CancelReason::KillSwitch,
        };
        self.execute(vec![Action::Engine(cancel)], now);
        self.end_sessions(&self.registry.sessions_of(account), now)
    }

    /// Core: opens a session for an authenticated login, unless a limit refuses it;
    /// `(now, entropy)`: the input's time and its token's random part.
    pub(super) fn open_session(
        &self,
        conn_id: ConnectionId,
        account: u64,
        max_sessions: Option<usize>,
        login: &proto::Login,
        orders: &[engine::OrderView],
        (now, entropy): (Timestamp, &TokenEntropy),
    ) -> Result<SessionHandle, ReasonCode> {
        let cod = CodPolicy {
            mode: login.cancel_on_disconnect,
            grace: Duration::from_millis(u64::from(login.cod_grace_ms)),
        };
        let mut actions = Vec::new();
        let new = self.registry.login(
            account,
            max_sessions,
            cod,
            conn_id,
            orders,
            self.idle_timeout,
            (now, entropy),
            &mut actions,
        );
        self.execute(actions, now);
        Ok(new?.session)
    }

    /// Core: resumes the session a token names on `conn_id`; `sent_here` is what the
    /// gateway run of `conn_id` says it sent the session (crash-safe mode).
    pub(super) fn resume_session(
        &self,
        conn_id: ConnectionId,
        resume: &proto::Resume,
        sent_here: Option<u64>,
        (now, entropy): (Timestamp, &TokenEntropy),
    ) -> Result<SessionHandle, ReasonCode> {
        let mut actions = Vec::new();
        let result = self.registry.resume(
            conn_id,
            resume,
            sent_here,
            (now, entropy),
            |account| self.orders_now(account),
            &mut actions,
        );
        self.execute(actions, now);
        result
    }

    /// Routes a batch of engine events into their sessions and wakes their writers;
    /// returns what the sessions asked for in turn.
    pub(super) fn route_events(
        &self,
        events: &mut Vec<engine::Event>,
        now: Timestamp,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut wake = Vec::new();
        for event in events.drain(..) {
            if let engine::Event::OrderStates { tag, orders, .. } = event {
                if let Some((_, answer)) = self.queries.remove(&tag) {
                    let _ = answer.send(orders);
                }
                continue;
            }
            // A core being rebuilt routes again what earlier processes counted.
            if self.is_accepting() {
                self.count_event(&event);
            }
            self.registry.route(&event, now, &mut actions, &mut wake);
        }
        wake.sort_unstable();
        wake.dedup();
        for conn_id in wake {
            self.wake(conn_id);
        }
        actions
    }

    /// Carries out what the session core asked for, and what that asks for in turn
    /// (an inline engine's answers can release a session's waiting requests), in a
    /// loop rather than by recursion.
    pub(super) fn execute(&self, actions: Vec<Action>, now: Timestamp) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Engine(request) => queue.extend(self.submit(request, now)),
                Action::CloseConnection { conn, reason } => {
                    // Said once per connection of this gateway (a connection's late
                    // frames, or a core rebuilding, ask again).
                    if let Some(conn_handle) = self.conns.get(&conn) {
                        if conn_handle.closing().is_none() {
                            info!(conn, reason = reason.name(), "closing connection");
                        }
                        conn_handle.close(reason);
                    }
                }
                Action::Ended { session_id, reason } => {
                    info!(session = session_id, ?reason, "session ended");
                    self.registry.remove(session_id, reason);
                }
            }
        }
    }

    /// Hands a request to the engine; returns what the sessions ask for in turn.
    pub(super) fn submit(&self, request: engine::Request, now: Timestamp) -> Vec<Action> {
        let sender = match &self.engine {
            EngineLink::Inline(book) => {
                let mut book = book.lock().unwrap_or_else(PoisonError::into_inner);
                let mut events = Vec::new();
                engine::MatchingEngine::handle(&mut *book, request, &mut events);
                return self.route_events(&mut events, now);
            }
            EngineLink::Thread(sender) => sender,
        };
        match sender.try_submit(request) {
            Ok(()) => Vec::new(),
            Err(SubmitError::Full(request @ engine::Request::MassCancel { .. })) => {
                // Cancels must not be lost: wait for room off the async threads.
                let engine = sender.clone();
                self.runtime.spawn_blocking(move || engine.submit(request));
                Vec::new()
            }
            Err(SubmitError::Full(request)) => {
                warn!("engine queue full; refusing request");
                self.refuse(&request, ReasonCode::EngineBusy, now)
            }
            Err(SubmitError::Stopped(request)) => {
                warn!("engine stopped; refusing request");
                self.refuse(&request, ReasonCode::InternalError, now)
            }
        }
    }

    /// Answers a request the engine did not take with a `Reject`.
    pub(super) fn refuse(
        &self,
        request: &engine::Request,
        reason: ReasonCode,
        now: Timestamp,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(session) = request.owner().and_then(|o| self.registry.get(o.session)) {
            let wake = lock(&session).refuse_request(request, reason, now, &mut actions);
            if let Some(conn_id) = wake {
                self.wake(conn_id);
            }
        }
        actions
    }
}
