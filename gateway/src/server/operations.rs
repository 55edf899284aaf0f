//! The operator's calls (revoke, kill switch, token keys, reloads, drain) and the
//! gateway's state for `/metrics` and `/readyz`, which the admin listener reaches
//! through [`Operations`].

use super::*;

/// The admin listener's calls, answered by the gateway's own operations.
impl Operations for Shared {
    fn metrics_text(&self) -> String {
        Shared::metrics_text(self)
    }
    fn is_draining(&self) -> bool {
        Shared::is_draining(self)
    }
    fn is_accepting(&self) -> bool {
        Shared::is_accepting(self)
    }
    fn engines_disagree(&self) -> Option<String> {
        let counts = self.core.engine_answer_counts();
        (counts.differed > 0).then(|| {
            format!(
                "engines disagree: {} later answers differed from the first (latest: batch {}); the first answers are applied",
                counts.differed, counts.latest_difference
            )
        })
    }
    fn start_draining(&self) {
        Shared::start_draining(self);
    }
    fn sessions_info(&self) -> Vec<SessionInfo> {
        self.core.registry().sessions_info()
    }
    fn sessions_of(&self, account: u64) -> Vec<u64> {
        self.core.registry().sessions_of(account)
    }
    fn revoke_sessions<'a>(&'a self, ids: &'a [u64]) -> Pending<'a, Result<Vec<u64>, String>> {
        Box::pin(Shared::revoke_sessions(self, ids))
    }
    fn knows_account(&self, account: u64) -> Pending<'_, bool> {
        Box::pin(Shared::knows_account(self, account))
    }
    fn kill_switch(&self, account: u64) -> Pending<'_, Result<Vec<u64>, String>> {
        Box::pin(Shared::kill_switch(self, account))
    }
    fn rotate_token_key(&self) -> Pending<'_, Result<u32, String>> {
        Box::pin(Shared::rotate_token_key(self))
    }
    fn retire_token_key(&self, key_id: u32) -> Pending<'_, Result<bool, String>> {
        Box::pin(Shared::retire_token_key(self, key_id))
    }
    fn reload_accounts(&self) -> Result<usize, String> {
        Shared::reload_accounts(self)
    }
    fn reload_tls(&self) -> Result<(), String> {
        Shared::reload_tls(self)
    }
}

/// Why an operation on a gateway whose run ended did nothing.
pub(super) const SUPERSEDED: &str =
    "this gateway's run on the stream has ended (replaced by a restart under its name, or silent too long); it is stopping";

/// The sessions an operation ended, from the core.
pub(super) fn ended_outcome(outcome: Result<Outcome, LogError>) -> Result<Vec<u64>, String> {
    match outcome {
        Ok(Outcome::Ended(sessions)) => Ok(sessions),
        Ok(Outcome::Fenced) => Err(SUPERSEDED.into()),
        Ok(_) => Err("the core gave an unexpected answer".into()),
        Err(error) => Err(error.to_string()),
    }
}

impl Shared {
    /// The metrics in the OpenMetrics text format.
    pub(crate) fn metrics_text(&self) -> String {
        self.metrics.render(&self.metrics_snapshot())
    }

    /// Whether connections are accepted (in crash-safe mode, once the core is
    /// rebuilt from its stream).
    pub(crate) fn is_accepting(&self) -> bool {
        *self.accepting.borrow()
    }

    /// Whether new logins are refused.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Refuses new logins from now on (`ShuttingDown`); sessions carry on, resumes
    /// are served, `/readyz` says 503.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Ends these sessions (`Revoked`); returns those that were live.
    pub(crate) async fn revoke_sessions(&self, ids: &[u64]) -> Result<Vec<u64>, String> {
        let record = Record::Revoke {
            sessions: ids.to_vec(),
        };
        ended_outcome(self.call(record, self.log.ticket()).await)
    }

    /// Cancels every working order of `account` (whichever session placed it) and
    /// ends its sessions; returns the sessions ended. The cancels go first, so a
    /// connected session's stream carries them before its `Close` (with the engine
    /// inline; on its thread they may come after, to the account's next session).
    pub(crate) async fn kill_switch(&self, account: u64) -> Result<Vec<u64>, String> {
        let record = Record::KillSwitch { account };
        ended_outcome(self.call(record, self.log.ticket()).await)
    }

    /// Whether `account` is one the gateway knows: in the accounts file, or with
    /// sessions or orders in the core (an account just removed from the file may
    /// still have both, and a kill switch must reach them).
    pub(crate) async fn knows_account(&self, account: u64) -> bool {
        let in_file = self
            .auth
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .has_account(account);
        in_file
            || !self.core.registry().sessions_of(account).is_empty()
            || self
                .query_orders(account)
                .await
                .is_some_and(|orders| !orders.is_empty())
    }

    /// Installs a new random token key for minting; tokens of older keys still
    /// verify until retired. Returns the new key's id.
    pub(crate) async fn rotate_token_key(&self) -> Result<u32, String> {
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| "the system random generator failed".to_string())?;
        let key_id = self
            .core
            .registry()
            .with_keys(|keys| keys.current_key_id().wrapping_add(1));
        let record = Record::RotateKey {
            key_id,
            secret: secret.to_vec(),
        };
        match self.call(record, self.log.ticket()).await {
            Ok(Outcome::Done(true)) => Ok(key_id),
            Ok(Outcome::Fenced) => Err(SUPERSEDED.into()),
            Ok(_) => Err(format!("key {key_id} was not installed")),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Retires a token key (not the one minting); returns whether it was retired.
    pub(crate) async fn retire_token_key(&self, key_id: u32) -> Result<bool, String> {
        match self
            .call(Record::RetireKey { key_id }, self.log.ticket())
            .await
        {
            Ok(Outcome::Done(retired)) => Ok(retired),
            Ok(Outcome::Fenced) => Err(SUPERSEDED.into()),
            Ok(_) => Ok(false),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Reads `tls.cert` and `tls.key` again, checks them as at start, and serves new
    /// connections with them; open connections and their sessions carry on (they
    /// keep the certificate they were made with). TLS session tickets issued before
    /// are forgotten: each client's next connection makes a full handshake.
    pub(crate) fn reload_tls(&self) -> Result<(), String> {
        let Some(reload) = &self.tls_reload else {
            return Err(
                "tls.cert and tls.key are unset: the development certificate is not reloaded"
                    .into(),
            );
        };
        let identity =
            crate::dev::pem_identity(&reload.cert, &reload.key).map_err(|e| e.to_string())?;
        let server = server_config(&reload.config, identity).map_err(|e| e.to_string())?;
        reload.endpoint.set_server_config(Some(server));
        info!(cert = %reload.cert.display(), "certificate reloaded");
        Ok(())
    }

    /// Reads the accounts file again; on any error the old accounts stay.
    pub(crate) fn reload_accounts(&self) -> Result<usize, String> {
        let Some(path) = &self.accounts_path else {
            return Err("this gateway's accounts were not read from a file".into());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("reading {}: {error}", path.display()))?;
        let file =
            AccountsFile::parse(&text).map_err(|error| format!("{}: {error}", path.display()))?;
        self.auth
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reload(&file)
            .map_err(|error| format!("{}: {error}", path.display()))
    }

    /// The values the metrics read at scrape time.
    pub(super) fn metrics_snapshot(&self) -> Snapshot {
        let registry = self.core.registry();
        let (census, stats) = (registry.census(), registry.stats());
        Snapshot {
            sessions_attached: census.attached,
            sessions_detached: census.detached,
            connections: self.conns.len() as u64,
            handshaking: self.handshaking.load(Ordering::Relaxed) as u64,
            ring_messages: census.ring_messages,
            ring_bytes: census.ring_bytes,
            engine_queue: self.core.engine_queued() as u64,
            resumes: stats.resumes,
            messages_replayed: stats.messages_replayed,
            snapshot_resumes: stats.snapshot_resumes,
            sessions_evicted: stats.evicted,
            fenced_records: self.core.fenced_records(),
            live_gateways: self
                .core
                .members()
                .live()
                .map(|(name, _)| name.to_owned())
                .collect(),
            applied_position: self.core.applied_position(),
            append_failures: self.log.append_failures(),
            core_snapshot_position: self.snapshot_position.load(Ordering::Relaxed),
            core_snapshot_failures: self.snapshot_failures.load(Ordering::Relaxed),
            draining: self.draining.load(Ordering::Relaxed),
            engine_answers: self.core.engine_answer_counts(),
            engine_unanswered_batches: self.core.engine_unanswered_count() as u64,
            engine_batches_published: self
                .requests
                .get()
                .map_or(0, crate::requests_stream::RequestsStream::published),
        }
    }
}
