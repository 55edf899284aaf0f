//! All live sessions of a gateway, shared between connection tasks.
//!
//! Sessions sit in a `DashMap<SessionId, Arc<Mutex<Session>>>`: lookups clone the
//! `Arc` and release the map's shard lock before locking the session, so no map
//! guard is ever held while a session is worked on (or across an `.await` in the IO
//! layer). Limits on total sessions and sessions per account are enforced at login.
//!
//! Methods here carry out [`Action::Ended`] themselves (the session is removed).
//! When the IO layer calls a [`Session`] method directly and gets `Ended`, it calls
//! [`Registry::remove`].
//!
//! Answers go to the session that asked. Any session of an account may cancel or
//! replace the account's orders: the answer goes to the requester, and the order's
//! owner gets the change as an unsolicited message (`client_seq` 0).
//!
//! Orders outlive their session when it ends without cancel-on-disconnect. What then
//! happens to them (fills, unsolicited cancels) goes to the account's newest live
//! session, else waits, bounded per account, for the account's next login, whose
//! stream carries it right after the login snapshot: no fill is ever dropped for want
//! of a session.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use matching_stub as engine;
use proto::{ReasonCode, SessionToken};

use crate::session::{
    Action, CodPolicy, ConnectionId, LoginGrant, ResumeClaim, Session, SessionConfig,
};
use crate::time::Timestamp;
use crate::token::{KeyError, TokenClaims, TokenError, TokenKeyRing};
use proto::CancelOnDisconnect;

mod image;
pub use image::{RegistryImage, RestoreError};

/// A shared, lockable session.
pub type SessionHandle = Arc<Mutex<Session>>;

/// Locks a session, recovering it if a panicking thread poisoned the lock (its
/// state machine methods leave it consistent between calls).
pub fn lock(session: &SessionHandle) -> MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Limits on how many sessions exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    /// Most sessions (attached and detached) on this gateway.
    pub max_sessions: usize,
    /// Most sessions of one account.
    pub max_sessions_per_account: usize,
    /// How many ended sessions are remembered, to tell a late resume why.
    pub remembered_endings: usize,
    /// Events about orders of ended sessions kept per account for its next login;
    /// beyond, the oldest are dropped (the login snapshot still shows every working
    /// order's filled quantity).
    pub unclaimed_events_per_account: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_sessions: 100_000,
            max_sessions_per_account: 16,
            remembered_endings: 65_536,
            unclaimed_events_per_account: 4_096,
        }
    }
}

/// A new session and what its client must be told.
#[derive(Debug)]
pub struct NewSession {
    /// The session id.
    pub session_id: u64,
    /// The session.
    pub session: SessionHandle,
}

/// Counters of what the registry has done, for reports and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegistryStats {
    /// Successful resumes.
    pub resumes: u64,
    /// Messages queued for replay by resumes.
    pub messages_replayed: u64,
    /// Resumes that found messages the client needed released (the gap path: a
    /// snapshot replaced them).
    pub snapshot_resumes: u64,
    /// Events about orders of ended sessions handed to another session of the account.
    pub events_rehomed: u64,
    /// Such events dropped because their account's queue was full.
    pub unclaimed_dropped: u64,
    /// Detached sessions ended to make room for a login of their account.
    pub evicted: u64,
}

/// Sessions by state and what their rings hold, counted at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Census {
    /// Sessions attached to a connection.
    pub attached: u64,
    /// Sessions waiting for a resume.
    pub detached: u64,
    /// Unacknowledged messages retained, all sessions.
    pub ring_messages: u64,
    /// Bytes of those, with the login snapshots kept until confirmed.
    pub ring_bytes: u64,
}

/// One session as operators see it (`gateway admin sessions`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionInfo {
    /// The session id.
    pub session: u64,
    /// Its account.
    pub account: u64,
    /// `attached` or `detached`.
    pub state: &'static str,
    /// Since when it has been detached (Unix milliseconds), if it is.
    pub detached_since_ms: Option<u64>,
    /// Unacknowledged messages its ring retains.
    pub unacked_messages: usize,
    /// Highest client sequence processed.
    pub last_processed_client_seq: u64,
    /// Generation of its newest token.
    pub token_generation: u32,
}

/// Bounded memory of why recent sessions ended.
#[derive(Debug, Default)]
struct Endings {
    reasons: HashMap<u64, ReasonCode>,
    order: VecDeque<u64>,
}

/// A concurrent map keyed by ids the gateway assigns itself (sessions, connections,
/// accounts from its own configuration): hashed with FxHash, several times cheaper per
/// lookup than the default SipHash, whose flooding resistance keys the peer cannot
/// choose do not need. Every order looks such maps up several times.
pub type IdMap<K, V> = DashMap<K, V, rustc_hash::FxBuildHasher>;

/// The gateway's sessions.
#[derive(Debug)]
pub struct Registry {
    sessions: IdMap<u64, SessionHandle>,
    /// Each account's sessions, by id (so by login order).
    per_account: IdMap<u64, BTreeSet<u64>>,
    session_count: AtomicUsize,
    next_session_id: AtomicU64,
    endings: Mutex<Endings>,
    keys: RwLock<TokenKeyRing>,
    config: Arc<SessionConfig>,
    limits: RegistryLimits,
    resumes: AtomicU64,
    messages_replayed: AtomicU64,
    snapshot_resumes: AtomicU64,
    /// Per account, events of ended sessions waiting for a live heir.
    unclaimed: Mutex<HashMap<u64, VecDeque<engine::Event>>>,
    events_rehomed: AtomicU64,
    unclaimed_dropped: AtomicU64,
    evicted: AtomicU64,
    /// When sessions' timers (cancel-on-disconnect, detached expiry) come due.
    timers: Mutex<Timers>,
    /// When every session was last checked for due timers, as a backstop.
    last_full_sweep: Mutex<Option<Timestamp>>,
}

/// How often [`Registry::handle_timeouts`] also checks every session, in case a timer
/// was armed by a path that did not schedule it.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Sessions' next deadlines, soonest first, at most one live entry per session (a
/// replaced later entry stays in the heap as stale until it comes up).
#[derive(Debug, Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Timestamp, u64)>>,
    pending: HashMap<u64, Timestamp>,
}

impl Timers {
    /// Makes sure the session is looked at by `at`.
    fn schedule(&mut self, session_id: u64, at: Timestamp) {
        if self.pending.get(&session_id).is_some_and(|&due| due <= at) {
            return;
        }
        self.pending.insert(session_id, at);
        self.heap.push(Reverse((at, session_id)));
    }

    /// Takes the sessions due by `now` into `due`.
    fn take_due(&mut self, now: Timestamp, due: &mut Vec<u64>) {
        while let Some(&Reverse((at, session_id))) = self.heap.peek() {
            if at > now {
                return;
            }
            self.heap.pop();
            if self.pending.get(&session_id) == Some(&at) {
                self.pending.remove(&session_id);
                due.push(session_id);
            }
        }
    }
}

impl Registry {
    /// An empty registry minting tokens with `keys`.
    pub fn new(keys: TokenKeyRing, config: SessionConfig, limits: RegistryLimits) -> Self {
        Registry {
            sessions: IdMap::default(),
            per_account: IdMap::default(),
            session_count: AtomicUsize::new(0),
            next_session_id: AtomicU64::new(1),
            endings: Mutex::new(Endings::default()),
            keys: RwLock::new(keys),
            config: Arc::new(config),
            limits,
            resumes: AtomicU64::new(0),
            messages_replayed: AtomicU64::new(0),
            snapshot_resumes: AtomicU64::new(0),
            unclaimed: Mutex::new(HashMap::new()),
            events_rehomed: AtomicU64::new(0),
            unclaimed_dropped: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            timers: Mutex::new(Timers::default()),
            last_full_sweep: Mutex::new(None),
        }
    }

    /// What the registry has done so far.
    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            resumes: self.resumes.load(Ordering::Relaxed),
            messages_replayed: self.messages_replayed.load(Ordering::Relaxed),
            snapshot_resumes: self.snapshot_resumes.load(Ordering::Relaxed),
            events_rehomed: self.events_rehomed.load(Ordering::Relaxed),
            unclaimed_dropped: self.unclaimed_dropped.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }

    /// Starts [`Self::stats`] from zero: a registry rebuilt from a log has counted
    /// what the processes before it did.
    pub fn reset_stats(&self) {
        for counter in [
            &self.resumes,
            &self.messages_replayed,
            &self.snapshot_resumes,
            &self.events_rehomed,
            &self.unclaimed_dropped,
            &self.evicted,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.session_count.load(Ordering::Relaxed)
    }

    /// True when there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The limits on sessions.
    pub fn limits(&self) -> RegistryLimits {
        self.limits
    }

    /// The session settings.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// A live session by id.
    pub fn get(&self, session_id: u64) -> Option<SessionHandle> {
        self.sessions
            .get(&session_id)
            .map(|entry| Arc::clone(&entry))
    }

    /// The live session a token names, if its tag verifies (no other check).
    pub fn session_of_token(&self, token: &[u8]) -> Option<SessionHandle> {
        self.get(self.verify_tag(token).ok()?.session_id)
    }

    /// The claims of a token whose tag verifies under the key ring.
    fn verify_tag(&self, token: &[u8]) -> Result<TokenClaims, TokenError> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .verify_tag(token)
    }

    /// Runs `change` on the token key ring (rotate, retire).
    pub fn with_keys<T>(&self, change: impl FnOnce(&mut TokenKeyRing) -> T) -> T {
        change(&mut self.keys.write().unwrap_or_else(PoisonError::into_inner))
    }

    fn mint(
        &self,
        session_id: u64,
        account: u64,
        generation: u32,
        expires_at: Timestamp,
    ) -> Result<SessionToken, KeyError> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .mint(session_id, account, generation, expires_at)
    }

    /// Creates a session for an authenticated client on `conn`.
    ///
    /// `account_orders` are the account's orders for the login snapshot;
    /// `account_limit` is the account's own session limit, if it has one (the lower of
    /// it and the gateway's per-account limit applies). At that limit, the account's
    /// longest-detached session is ended (as expired) to make room; only when every
    /// session of the account is attached is the login refused. Events of the
    /// account's ended sessions that were waiting follow the snapshot in the new
    /// session's stream, and later ones come to it while it is the account's newest
    /// live session.
    #[allow(clippy::too_many_arguments)]
    pub fn login(
        &self,
        account: u64,
        account_limit: Option<usize>,
        cod: CodPolicy,
        conn: ConnectionId,
        account_orders: &[engine::OrderView],
        idle_timeout: Duration,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) -> Result<NewSession, ReasonCode> {
        if cod.mode == CancelOnDisconnect::CancelAll && cod.grace > self.config.max_cod_grace {
            return Err(ReasonCode::InvalidLoginParameter);
        }
        if self.session_count.fetch_add(1, Ordering::AcqRel) >= self.limits.max_sessions {
            self.session_count.fetch_sub(1, Ordering::AcqRel);
            return Err(ReasonCode::TooManySessions);
        }
        let limit = account_limit.map_or(self.limits.max_sessions_per_account, |own| {
            own.min(self.limits.max_sessions_per_account)
        });
        let session_id = self.next_session_id.fetch_add(1, Ordering::Relaxed);
        if !self.claim_account_slot(account, session_id, limit, out) {
            self.session_count.fetch_sub(1, Ordering::AcqRel);
            return Err(ReasonCode::TooManyAccountSessions);
        }
        let token = match self.mint(session_id, account, 0, now.plus(self.config.token_ttl)) {
            Ok(token) => token,
            Err(_) => {
                self.release_slot(account, session_id);
                return Err(ReasonCode::InternalError);
            }
        };
        let grant = LoginGrant {
            session_id,
            account,
            cod,
        };
        let session = Arc::new(Mutex::new(Session::login(
            grant,
            conn,
            token,
            account_orders,
            idle_timeout,
            Arc::clone(&self.config),
            now,
        )));
        self.sessions.insert(session_id, Arc::clone(&session));
        {
            // Under the queue's lock, so no event can be queued after the drain yet
            // before this session becomes the heir.
            let mut unclaimed = self
                .unclaimed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(events) = unclaimed.remove(&account) {
                let mut guard = lock(&session);
                for event in &events {
                    guard.on_engine_event(event, now, out);
                }
                self.events_rehomed
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(NewSession {
            session_id,
            session,
        })
    }

    /// Adds `session_id` to the account's sessions if it is under `limit`, first
    /// ending its longest-detached session if it is at the limit. False when every
    /// session of the account is attached (or ending).
    fn claim_account_slot(
        &self,
        account: u64,
        session_id: u64,
        limit: usize,
        out: &mut Vec<Action>,
    ) -> bool {
        loop {
            let members: Vec<u64> = {
                let mut sessions = self.per_account.entry(account).or_default();
                if sessions.len() < limit {
                    sessions.insert(session_id);
                    return true;
                }
                sessions.iter().copied().collect()
            };
            // Sessions are locked only after the map's guard is gone.
            let oldest_detached = members
                .into_iter()
                .filter_map(|id| {
                    let since = lock(&self.get(id)?).detached_since()?;
                    Some((since, id))
                })
                .min();
            let Some((_, victim)) = oldest_detached else {
                return false;
            };
            let Some(session) = self.get(victim) else {
                continue;
            };
            let start = out.len();
            lock(&session).end(ReasonCode::SessionExpired, out);
            self.evicted.fetch_add(1, Ordering::Relaxed);
            // Its slot is free once it is out of the map; with cancels still on their
            // way it stays routable, so take it out of the account's count now.
            self.settle(victim, &out[start..]);
            self.release_member(account, victim);
        }
    }

    /// Resumes the session a token names on `conn`; no signature check, no account
    /// load. Takeover and theft detection happen in the session.
    ///
    /// `account_orders` gives an account's orders now, if the engine can say at
    /// once (see [`crate::session::Session::resume`]).
    pub fn resume(
        &self,
        conn: ConnectionId,
        request: &proto::Resume,
        sent_here: Option<u64>,
        now: Timestamp,
        account_orders: impl FnOnce(u64) -> Option<Vec<engine::OrderView>>,
        out: &mut Vec<Action>,
    ) -> Result<SessionHandle, ReasonCode> {
        let claims = self
            .verify_tag(&request.token.0)
            .map_err(|error| error.reason())?;
        let Some(session) = self.get(claims.session_id) else {
            return Err(self.ending_of(claims.session_id));
        };
        let start = out.len();
        let result = {
            let mut guard = lock(&session);
            if guard.account() != claims.account_id {
                return Err(ReasonCode::TokenForged);
            }
            if !guard.token_valid(claims.expires_at, now) {
                return Err(ReasonCode::TokenExpired);
            }
            guard.resume(
                conn,
                ResumeClaim {
                    generation: claims.generation,
                    sent_here,
                },
                request,
                now,
                (
                    |generation, expires_at| {
                        self.mint(claims.session_id, claims.account_id, generation, expires_at)
                            .ok()
                    },
                    || account_orders(claims.account_id),
                ),
                out,
            )
        };
        self.settle(claims.session_id, &out[start..]);
        let resumed = result.map_err(|refused| refused.0)?;
        self.resumes.fetch_add(1, Ordering::Relaxed);
        self.messages_replayed
            .fetch_add(resumed.replayed, Ordering::Relaxed);
        self.snapshot_resumes
            .fetch_add(u64::from(resumed.gap), Ordering::Relaxed);
        Ok(session)
    }

    /// Routes an engine event into the streams it belongs in, and pushes the
    /// connections whose writers have new frames onto `wake`.
    ///
    /// An answer goes to the session that asked. When that is not the order's owner
    /// (another session of the account cancelled or replaced it), the owner gets the
    /// change as an unsolicited message. Events about orders of an ended session go
    /// to a live session of the account, or wait for its next login; answers to an
    /// ended session's requests are not handed on.
    pub fn route(
        &self,
        event: &engine::Event,
        now: Timestamp,
        out: &mut Vec<Action>,
        wake: &mut Vec<ConnectionId>,
    ) {
        let Some(owner) = event.owner() else {
            return;
        };
        match event.requester() {
            Some(requester) if requester.session != owner.session => {
                if let Some(Some(conn)) = self.deliver(requester.session, event, now, out) {
                    wake.push(conn);
                }
                // If the owner has ended, the requester (a live session of the
                // account) already has the news: nothing to hand on.
                if let Some(Some(conn)) = self.deliver(owner.session, &notice(event), now, out) {
                    wake.push(conn);
                }
            }
            _ => {
                let delivered = match self.deliver(owner.session, event, now, out) {
                    Some(delivered) => delivered,
                    None => self.rehome(owner.account, event, now, out),
                };
                wake.extend(delivered);
            }
        }
    }

    /// Puts an event into a session's stream if it takes events; `None` if it does
    /// not (ended or gone), else the connection to wake, if any.
    fn deliver(
        &self,
        session_id: u64,
        event: &engine::Event,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) -> Option<Option<ConnectionId>> {
        let session = self.get(session_id)?;
        let start = out.len();
        let mut guard = lock(&session);
        if !guard.takes_events() {
            return None;
        }
        let wake = guard.on_engine_event(event, now, out);
        drop(guard);
        self.settle(session_id, &out[start..]);
        Some(wake)
    }

    /// An event about an order whose session has ended: to the account's newest
    /// session if it is live, else queued for the account's next login. Answers to
    /// the ended session's own requests are not handed on (no other session asked);
    /// a cancel it had asked for goes on as an unsolicited one.
    fn rehome(
        &self,
        account: u64,
        event: &engine::Event,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) -> Option<ConnectionId> {
        let event = match event {
            engine::Event::Fill(_) | engine::Event::Cancelled { .. } => notice(event),
            _ => return None,
        };
        let mut unclaimed = self
            .unclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let members: Vec<u64> = self
            .per_account
            .get(&account)
            .map(|sessions| sessions.iter().rev().copied().collect())
            .unwrap_or_default();
        for heir in members {
            let Some(session) = self.get(heir) else {
                continue;
            };
            let start = out.len();
            let mut guard = lock(&session);
            if guard.closed_reason().is_none() {
                let wake = guard.on_engine_event(&event, now, out);
                drop(guard);
                drop(unclaimed);
                self.events_rehomed.fetch_add(1, Ordering::Relaxed);
                self.settle(heir, &out[start..]);
                return wake;
            }
        }
        let limit = self.limits.unclaimed_events_per_account;
        if limit == 0 {
            self.unclaimed_dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let queue = unclaimed.entry(account).or_default();
        if queue.len() >= limit {
            queue.pop_front();
            self.unclaimed_dropped.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(event);
        None
    }

    /// Ends a session on an operator's request. Returns whether it existed.
    pub fn revoke(&self, session_id: u64, out: &mut Vec<Action>) -> bool {
        let Some(session) = self.get(session_id) else {
            return false;
        };
        let start = out.len();
        lock(&session).end(ReasonCode::Revoked, out);
        self.settle(session_id, &out[start..]);
        true
    }

    /// Every live session, by id.
    pub fn sessions_info(&self) -> Vec<SessionInfo> {
        let mut all: Vec<SessionInfo> = self
            .sessions
            .iter()
            .map(|entry| {
                let session = lock(entry.value());
                let detached_since = session.detached_since();
                SessionInfo {
                    session: session.id(),
                    account: session.account(),
                    state: if session.attached_to().is_some() {
                        "attached"
                    } else {
                        "detached"
                    },
                    detached_since_ms: detached_since.map(Timestamp::as_millis),
                    unacked_messages: session.ring().len(),
                    last_processed_client_seq: session.last_processed_client_seq(),
                    token_generation: session.token_generation(),
                }
            })
            .collect();
        all.sort_by_key(|info| info.session);
        all
    }

    /// The live sessions of `account`, oldest first.
    pub fn sessions_of(&self, account: u64) -> Vec<u64> {
        self.per_account
            .get(&account)
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Counts sessions by state and what their rings retain (locks each session in
    /// turn: for metrics scrapes, not for the hot path).
    pub fn census(&self) -> Census {
        let mut census = Census::default();
        for entry in &self.sessions {
            let session = lock(entry.value());
            if session.attached_to().is_some() {
                census.attached += 1;
            } else if session.detached_since().is_some() {
                census.detached += 1;
            }
            census.ring_messages += session.ring().len() as u64;
            census.ring_bytes += session.retained_bytes() as u64;
        }
        census
    }

    /// Ends every session for `reason` (a gateway shutting down): each one's
    /// cancel-on-disconnect runs, and a connected client gets the rest of its stream
    /// and `Close`.
    pub fn end_all(&self, reason: ReasonCode, out: &mut Vec<Action>) {
        for session_id in self.session_ids() {
            let Some(session) = self.get(session_id) else {
                continue;
            };
            let start = out.len();
            lock(&session).end(reason, out);
            self.settle(session_id, &out[start..]);
        }
    }

    /// Every live session's id, in order.
    fn session_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.sessions.iter().map(|entry| *entry.key()).collect();
        ids.sort_unstable();
        ids
    }

    /// A gateway run ended (crash-safe mode: replaced by a restart, or silent too
    /// long): every connection it accepted is gone. Sessions attached to one are
    /// detached, starting their cancel-on-disconnect and expiry clocks.
    pub fn run_ended(&self, run: u64, now: Timestamp) {
        self.detach_where(now, |session| {
            session
                .attached_to()
                .is_some_and(|conn| crate::connection::run_of(conn) == run)
        });
    }

    /// Detaches the session attached to `conn`, if any (a connection the IO layer
    /// knows no session of; rare, so every session is looked at).
    pub fn connection_abandoned(&self, conn: ConnectionId, now: Timestamp) {
        self.detach_where(now, |session| session.attached_to() == Some(conn));
    }

    /// Detaches, in session order (a core rebuilt from a log does the same), every
    /// attached session for which `gone`, shown each session under its lock, says
    /// its connection is gone.
    fn detach_where(&self, now: Timestamp, mut gone: impl FnMut(&mut Session) -> bool) {
        for session_id in self.session_ids() {
            let Some(session) = self.get(session_id) else {
                continue;
            };
            let attached = {
                let mut guard = lock(&session);
                let gone = gone(&mut guard);
                guard.attached_to().filter(|_| gone)
            };
            if let Some(conn) = attached {
                self.connection_lost(&session, conn, now);
            }
        }
    }

    /// Whether [`Self::handle_timeouts`] has anything to do at `now`: a timer is
    /// due, or the once-a-second check of every session.
    pub fn timers_due(&self, now: Timestamp) -> bool {
        let next = self
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .heap
            .peek()
            .map(|Reverse((at, _))| *at);
        if next.is_some_and(|at| at <= now) {
            return true;
        }
        !self.is_empty()
            && self
                .last_full_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none_or(|at| now >= at.plus(FULL_SWEEP_EVERY))
    }

    /// Tells the session its connection `conn` is gone (it detaches if that was its
    /// connection) and schedules the timers that arms.
    pub fn connection_lost(&self, session: &SessionHandle, conn: ConnectionId, now: Timestamp) {
        let mut guard = lock(session);
        guard.connection_lost(conn, now);
        if let Some(at) = guard.next_timeout() {
            self.schedule(guard.id(), at);
        }
    }

    fn schedule(&self, session_id: u64, at: Timestamp) {
        self.timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .schedule(session_id, at);
    }

    /// Fires due cancel-on-disconnect and expiry timers: those scheduled, and, once
    /// a second, any other session's.
    pub fn handle_timeouts(&self, now: Timestamp, out: &mut Vec<Action>) {
        let mut due = Vec::new();
        self.timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_due(now, &mut due);
        let sweep = {
            let mut last = self
                .last_full_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let sweep = last.is_none_or(|at| now >= at.plus(FULL_SWEEP_EVERY));
            if sweep {
                *last = Some(now);
            }
            sweep
        };
        if sweep {
            due.extend(self.sessions.iter().map(|entry| *entry.key()));
        }
        // In session order, not the map's: a core rebuilt from a log must do the
        // same things in the same order.
        due.sort_unstable();
        due.dedup();
        for session_id in due {
            let Some(session) = self.get(session_id) else {
                continue;
            };
            let start = out.len();
            {
                let mut guard = lock(&session);
                if guard.next_timeout().is_some_and(|at| at <= now) {
                    guard.handle_timeout(now, out);
                }
                if let Some(at) = guard.next_timeout() {
                    self.schedule(session_id, at);
                }
            }
            self.settle(session_id, &out[start..]);
        }
    }

    /// Removes an ended session and remembers why.
    pub fn remove(&self, session_id: u64, reason: ReasonCode) {
        let Some((_, session)) = self.sessions.remove(&session_id) else {
            return;
        };
        let account = lock(&session).account();
        self.release_slot(account, session_id);
        let mut endings = self.endings.lock().unwrap_or_else(PoisonError::into_inner);
        if self.limits.remembered_endings == 0 {
            return;
        }
        if endings.order.len() >= self.limits.remembered_endings {
            if let Some(oldest) = endings.order.pop_front() {
                endings.reasons.remove(&oldest);
            }
        }
        endings.order.push_back(session_id);
        endings.reasons.insert(session_id, reason);
    }

    /// Removes the session if the actions one of its calls added say it ended.
    fn settle(&self, session_id: u64, added: &[Action]) {
        let ended = added.iter().find_map(|action| match action {
            Action::Ended { reason, .. } => Some(*reason),
            _ => None,
        });
        if let Some(reason) = ended {
            self.remove(session_id, reason);
        }
    }

    fn release_slot(&self, account: u64, session_id: u64) {
        self.session_count.fetch_sub(1, Ordering::AcqRel);
        self.release_member(account, session_id);
    }

    /// Takes a session out of its account's sessions (idempotent).
    fn release_member(&self, account: u64, session_id: u64) {
        self.per_account.remove_if_mut(&account, |_, sessions| {
            sessions.remove(&session_id);
            sessions.is_empty()
        });
    }

    /// What a resume for a session that is not live is told.
    fn ending_of(&self, session_id: u64) -> ReasonCode {
        let endings = self.endings.lock().unwrap_or_else(PoisonError::into_inner);
        match endings.reasons.get(&session_id) {
            Some(reason @ (ReasonCode::Revoked | ReasonCode::TokenSuperseded)) => *reason,
            _ => ReasonCode::SessionNotFound,
        }
    }
}

/// What the owner of an order is told when another session of its account cancelled
/// or replaced it: the same change, unsolicited (`client_seq` 0).
fn notice(event: &engine::Event) -> engine::Event {
    match *event {
        engine::Event::Cancelled {
            owner,
            order_id,
            client_order_id,
            cancelled_quantity,
            reason,
            ..
        } => engine::Event::Cancelled {
            owner,
            requester: owner,
            tag: None,
            order_id,
            client_order_id,
            cancelled_quantity,
            reason,
        },
        engine::Event::Replaced { owner, order, .. } => engine::Event::Replaced {
            owner,
            requester: owner,
            tag: 0,
            order,
        },
        ref other => other.clone(),
    }
}
