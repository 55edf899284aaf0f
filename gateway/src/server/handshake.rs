//! A connection's first frame: a `Login` checked at the edge (signature, nonce,
//! failure limits) and opened in the core, or a `Resume` of the session its token
//! names; both go onto the log and wait for their outcome.

use super::*;
use crate::token::TokenEntropy;

/// A login's or resume's outcome from the core, as the handshake needs it.
pub(super) fn session_outcome(
    outcome: Result<Outcome, LogError>,
) -> Result<SessionHandle, ReasonCode> {
    match outcome {
        Ok(Outcome::Session(result)) => result,
        // This gateway's run ended and it is stopping.
        Ok(Outcome::Fenced) => Err(ReasonCode::ShuttingDown),
        Ok(_) => Err(ReasonCode::InternalError),
        Err(error) => {
            warn!(%error, "the core did not answer");
            Err(ReasonCode::InternalError)
        }
    }
}

impl Shared {
    /// Appends a login's or resume's record and waits for the session it opens.
    /// Without an outcome (the stream or the core did not answer in time) the
    /// connection is refused, and the core is told to detach whatever it attaches
    /// to it later.
    async fn handshake(
        self: &Arc<Self>,
        record: Record,
        conn_id: ConnectionId,
    ) -> Result<SessionHandle, ReasonCode> {
        let outcome = self.call(record, conn_id).await;
        if outcome.is_err() {
            // In the background: the refusal need not wait for NATS to come back.
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                let apply = |entry, position| shared.apply(entry, position);
                let abandoned = Record::Abandoned { conn: conn_id };
                shared.log.append_until_stored(abandoned, apply).await;
            });
        }
        session_outcome(outcome)
    }

    pub(super) async fn login(
        self: &Arc<Self>,
        conn_id: ConnectionId,
        source: IpAddr,
        login: &proto::Login,
    ) -> Result<SessionHandle, Frame> {
        let now = clock::now();
        let rejected = |reason, retry_after_ms| {
            Frame::from(proto::LoginRejected {
                reason,
                retry_after_ms,
            })
        };
        if self.is_draining() {
            return Err(rejected(ReasonCode::ShuttingDown, 0));
        }
        let verified = {
            let mut auth = self.auth.lock().unwrap_or_else(PoisonError::into_inner);
            // The login's timestamp is the client's wall clock: compare with ours.
            auth.admit(source, now)
                .and_then(|()| auth.verify(login, clock::wall_now()))
                .inspect_err(|refused| {
                    // Only failed authentication counts; a skewed clock, a reused
                    // nonce or a limit is not an attack on a key.
                    if matches!(
                        refused.reason,
                        ReasonCode::UnknownApiKey | ReasonCode::BadSignature
                    ) {
                        auth.record_failure(source, now);
                    }
                })
        };
        let grant = verified.map_err(|refused| rejected(refused.reason, refused.retry_after_ms))?;
        let created = self.create_session(conn_id, login, grant).await;
        if created.is_err() {
            self.auth
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .release_nonce(login);
        }
        created.map_err(|reason| rejected(reason, 0))
    }

    /// The session of an authenticated login, unless a limit refuses it.
    pub(super) async fn create_session(
        self: &Arc<Self>,
        conn_id: ConnectionId,
        login: &proto::Login,
        grant: crate::auth::Grant,
    ) -> Result<SessionHandle, ReasonCode> {
        // The last connection slots are kept for resumes of existing sessions.
        if self.conns.len() + self.resume_reserved_connections > self.max_connections {
            return Err(ReasonCode::TooManySessions);
        }
        let entropy = token_entropy()?;
        // An engine out of process is asked here, so that the record carries them.
        let account_orders = if self.core.engine_answers_at_once() {
            None
        } else {
            let orders = self.query_orders(grant.account).await;
            Some(orders.ok_or(ReasonCode::InternalError)?)
        };
        let record = Record::Login {
            conn: conn_id,
            account: grant.account,
            max_sessions: grant.max_sessions.map(|m| m as u64),
            login: Frame::from(*login).to_bytes().into(),
            entropy,
            account_orders,
        };
        self.handshake(record, conn_id).await
    }

    pub(super) async fn resume(
        self: &Arc<Self>,
        conn_id: ConnectionId,
        source: IpAddr,
        resume: &proto::Resume,
    ) -> Result<SessionHandle, Frame> {
        // Never refused for its address's failed logins: a resume of a live session
        // is what keeps a firm's orders safe, and its neighbours' too.
        let now = clock::now();
        let rejected = |reason| Frame::from(proto::ResumeRejected { reason });
        let entropy = token_entropy().map_err(rejected)?;
        // What this gateway sent is known here, not in the core: the record says
        // it, and the core checks the resume's ack against it if the session was
        // last on this gateway's run when the core applies it (a copy of the core
        // following a stream may not have applied a move elsewhere yet).
        let record = Record::Resume {
            conn: conn_id,
            resume: Frame::from(*resume).to_bytes().into(),
            sent_here: self.sent_here(resume, self.log.run()),
            entropy,
        };
        let result = self.handshake(record, conn_id).await;
        match result {
            Ok(session) => {
                info!(session = lock(&session).id(), %source, "resume");
                Ok(session)
            }
            Err(reason) => {
                // An expired or unknown session is routine (an outage outlived it);
                // only a token that is not ours counts as an attack.
                if reason == ReasonCode::TokenForged {
                    self.auth
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .record_failure(source, now);
                }
                Err(rejected(reason))
            }
        }
    }

    /// What this gateway's run (`here`) sent the session a resume
    /// names, if that session was last on this run as far as this copy of the core
    /// knows; carried in the `Resume` record for the core's check of its ack.
    pub(super) fn sent_here(&self, resume: &proto::Resume, here: u64) -> Option<u64> {
        self.core
            .registry()
            .session_of_token(&resume.token.0)
            .and_then(|session| lock(&session).sent_by_run(here))
    }
}

/// The random part of a token the input about to be made will mint, from the
/// operating system's generator: the edge draws it, the core only uses it.
fn token_entropy() -> Result<TokenEntropy, ReasonCode> {
    crate::dev::random().map_err(|_| ReasonCode::InternalError)
}
