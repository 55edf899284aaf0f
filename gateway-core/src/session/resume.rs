//! A session's resume: the token's generation, the acknowledgement it carries, and
//! the replay or snapshot that brings the client up to date.

use super::*;

impl Session {
    /// Resumes the session on `conn` for a client presenting a verified token of
    /// `claim.generation` (see [`ResumeClaim`]).
    ///
    /// `mint` makes the rotated token for a generation and expiry; `account_orders`
    /// gives the account's orders now, if the engine can say at once (needed only
    /// when the login snapshot was too large to keep and the client may not have
    /// it; without them the session's own orders are sent). On success the
    /// `ResumeAccepted` and, if needed, a snapshot are queued on `conn`, the replay
    /// cursor is set, and an older connection is closed as taken over.
    pub fn resume(
        &mut self,
        conn: ConnectionId,
        claim: ResumeClaim,
        request: &proto::Resume,
        now: Timestamp,
        (mint, account_orders): (
            impl FnOnce(u32, Timestamp) -> SessionToken,
            impl FnOnce() -> Option<Vec<engine::OrderView>>,
        ),
        out: &mut Vec<Action>,
    ) -> Result<Resumed, ResumeRefused> {
        let ResumeClaim {
            generation,
            sent_here,
        } = claim;
        if let Some(reason) = self.closed_reason() {
            return Err(ResumeRefused(match reason {
                ReasonCode::Revoked | ReasonCode::TokenSuperseded => reason,
                _ => ReasonCode::SessionNotFound,
            }));
        }
        if generation > self.token_issued {
            return Err(ResumeRefused(ReasonCode::TokenForged));
        }
        if generation != self.token_issued && generation != self.token_used {
            // Only two tokens are good: the newest minted, and the one presented in
            // the latest resume (whose answer, carrying the newest, may have been
            // lost). Anything else means two parties hold tokens of this session:
            // one of them stole it. End the session.
            self.end(ReasonCode::TokenSuperseded, out);
            return Err(ResumeRefused(ReasonCode::TokenSuperseded));
        }
        let ack_limit = match sent_here {
            Some(sent) if run_of(self.last_conn) == run_of(conn) => sent.min(self.ring.last_seq()),
            _ => self.ack_limit(),
        };
        if request.last_acked_server_seq > ack_limit {
            return Err(ResumeRefused(ReasonCode::AckBeyondSent));
        }
        let next_generation = self
            .token_issued
            .checked_add(1)
            .ok_or(ResumeRefused(ReasonCode::TokenExpired))?;
        let token = mint(next_generation, now.plus(self.config.token_ttl));
        self.token_issued = next_generation;
        self.token_used = generation;
        if run_of(self.last_conn) != run_of(conn) {
            // Moving to another gateway run: the one it leaves may have sent
            // everything assigned so far, and the client may acknowledge it here.
            self.sent_by_predecessor();
        }
        self.last_conn = conn;

        self.acknowledge(request.last_acked_server_seq, false);
        let wanted = request.last_acked_server_seq + 1;
        let mut oldest_available = self.ring.oldest_seq();
        let (replay_from, snapshot, gap) = match self.ring.replay_start(wanted) {
            ReplayStart::Released { .. } => {
                let orders = self.orders.snapshot();
                (self.release_for_snapshot(), Some(orders), true)
            }
            ReplayStart::Retained => match &self.login_snapshot {
                LoginSnapshot::Confirmed => (wanted, None, false),
                // The client never showed it got its login snapshot: send it again,
                // as of 0, before the replay from 1.
                LoginSnapshot::Kept(login) => (wanted, Some(login.clone()), false),
                // Not kept: the account's orders now stand for it and for the
                // messages after it, which count as released.
                LoginSnapshot::TooLarge => {
                    oldest_available = self.ring.next_seq();
                    self.login_snapshot = LoginSnapshot::Confirmed;
                    let orders = account_orders()
                        .map(|orders| orders.iter().map(convert::order_state).collect())
                        .unwrap_or_else(|| self.orders.snapshot());
                    (self.release_for_snapshot(), Some(orders), true)
                }
            },
        };
        let snapshot_follows = snapshot.is_some();
        let mut control = VecDeque::new();
        control.push_back(
            Frame::from(proto::ResumeAccepted {
                token,
                last_processed_client_seq: self.last_processed_client_seq,
                replay_from,
                oldest_available,
                snapshot_follows,
            })
            .to_bytes(),
        );
        if let Some(orders) = snapshot {
            queue_snapshot(&mut control, replay_from - 1, &orders);
        }
        let previous = std::mem::replace(
            &mut self.link,
            Link::Attached(Attachment::new(conn, replay_from, control)),
        );
        if let Link::Attached(old) = previous {
            if old.conn != conn {
                out.push(Action::CloseConnection {
                    conn: old.conn,
                    reason: ReasonCode::TakenOver,
                });
            }
        }
        self.cod_deadline = None;
        Ok(Resumed {
            replayed: self.ring.next_seq() - replay_from,
            gap,
        })
    }

    /// Releases every retained message, which a snapshot about to be sent
    /// supersedes, so that they do not count against the window of the live
    /// traffic that follows; returns the sequence the stream goes on from.
    pub(super) fn release_for_snapshot(&mut self) -> u64 {
        self.ring.ack(self.ring.last_seq());
        self.ring.next_seq()
    }
}
