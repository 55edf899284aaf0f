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
use crate::token::{TokenClaims, TokenEntropy, TokenError, TokenKeyRing};
use proto::CancelOnDisconnect;

mod image;
mod routing;
mod timers;

pub use image::{RegistryImage, RestoreError};
use timers::Timers;

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
        random: &TokenEntropy,
    ) -> SessionToken {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .mint(session_id, account, generation, expires_at, random)
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
    /// live session. `(now, entropy)`: the input's time, and the random part of the
    /// token it mints (drawn by the edge, carried by the input).
    #[allow(clippy::too_many_arguments)]
    pub fn login(
        &self,
        account: u64,
        account_limit: Option<usize>,
        cod: CodPolicy,
        conn: ConnectionId,
        account_orders: &[engine::OrderView],
        idle_timeout: Duration,
        (now, entropy): (Timestamp, &TokenEntropy),
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
        let expires_at = now.plus(self.config.token_ttl);
        let token = self.mint(session_id, account, 0, expires_at, entropy);
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
    /// once (see [`crate::session::Session::resume`]); `(now, entropy)` as for
    /// [`Registry::login`].
    pub fn resume(
        &self,
        conn: ConnectionId,
        request: &proto::Resume,
        sent_here: Option<u64>,
        (now, entropy): (Timestamp, &TokenEntropy),
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
                        let (session, account) = (claims.session_id, claims.account_id);
                        self.mint(session, account, generation, expires_at, entropy)
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
