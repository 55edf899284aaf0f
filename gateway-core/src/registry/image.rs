//! The registry's part of a core snapshot (crash-safe mode): every session, the
//! account index, remembered endings, unclaimed events, timers and the token keys,
//! in an order that does not depend on the maps' iteration order.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, PoisonError};

use matching_stub as engine;
use proto::ReasonCode;
use serde::{Deserialize, Serialize};

use super::{lock, Endings, IdMap, Registry, RegistryLimits, Timers};
use crate::session::{Session, SessionConfig};
use crate::time::Timestamp;
use crate::token::{KeyError, KeyRingImage, TokenKeyRing};

/// The registry's state as a core snapshot carries it. Counters of what was done
/// (resumes, replays) are not in it: a restored gateway counts from zero.
#[derive(Debug, Serialize, Deserialize)]
pub struct RegistryImage {
    /// Each session, encoded, by session id.
    sessions: Vec<(u64, Vec<u8>)>,
    /// Each account's sessions (those of ended sessions still routable included).
    per_account: Vec<(u64, Vec<u64>)>,
    session_count: usize,
    next_session_id: u64,
    /// Why recent sessions ended, oldest first.
    endings: Vec<(u64, ReasonCode)>,
    keys: KeyRingImage,
    /// Per account, events of ended sessions waiting for a live heir.
    unclaimed: Vec<(u64, Vec<engine::Event>)>,
    /// Each session's next timer.
    timers: Vec<(u64, Timestamp)>,
    last_full_sweep: Option<Timestamp>,
}

/// Why a snapshot's registry cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A session did not decode.
    #[error("session {0} does not decode: {1}")]
    Session(u64, postcard::Error),
    /// The key ring is unusable.
    #[error("token keys: {0}")]
    Keys(#[from] KeyError),
}

impl Registry {
    /// The registry's state, for a core snapshot. Each session is locked in turn;
    /// the caller makes sure no input is applied meanwhile (the core's task takes
    /// the snapshot between two records).
    pub fn image(&self) -> RegistryImage {
        let sessions = self
            .session_ids()
            .into_iter()
            .filter_map(|id| {
                let session = self.get(id)?;
                // Serializing plain data into a vector cannot fail.
                let bytes = postcard::to_stdvec(&*lock(&session)).unwrap_or_default();
                Some((id, bytes))
            })
            .collect();
        let mut per_account: Vec<(u64, Vec<u64>)> = self
            .per_account
            .iter()
            .map(|entry| (*entry.key(), entry.value().iter().copied().collect()))
            .collect();
        per_account.sort_unstable();
        let endings = {
            let endings = self.endings.lock().unwrap_or_else(PoisonError::into_inner);
            endings
                .order
                .iter()
                .filter_map(|id| Some((*id, *endings.reasons.get(id)?)))
                .collect()
        };
        let mut unclaimed: Vec<(u64, Vec<engine::Event>)> = self
            .unclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(account, events)| (*account, events.iter().cloned().collect()))
            .collect();
        unclaimed.sort_unstable_by_key(|(account, _)| *account);
        let mut timers: Vec<(u64, Timestamp)> = self
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pending
            .iter()
            .map(|(id, at)| (*id, *at))
            .collect();
        timers.sort_unstable();
        RegistryImage {
            sessions,
            per_account,
            session_count: self.len(),
            next_session_id: self
                .next_session_id
                .load(std::sync::atomic::Ordering::Acquire),
            endings,
            keys: self
                .keys
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .image(),
            unclaimed,
            timers,
            last_full_sweep: *self
                .last_full_sweep
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// The registry a snapshot carried, under this gateway's settings (which apply
    /// as they are now, as they would to a registry rebuilt from the whole stream).
    pub fn from_image(
        image: RegistryImage,
        config: SessionConfig,
        limits: RegistryLimits,
    ) -> Result<Registry, RestoreError> {
        let mut registry = Registry::new(TokenKeyRing::from_image(&image.keys)?, config, limits);
        let sessions =
            IdMap::with_capacity_and_hasher(image.sessions.len(), rustc_hash::FxBuildHasher);
        for (id, bytes) in image.sessions {
            let session: Session =
                postcard::from_bytes(&bytes).map_err(|error| RestoreError::Session(id, error))?;
            let session = session.restored(Arc::clone(&registry.config));
            sessions.insert(id, Arc::new(Mutex::new(session)));
        }
        registry.sessions = sessions;
        registry.per_account = image
            .per_account
            .into_iter()
            .map(|(account, ids)| (account, ids.into_iter().collect::<BTreeSet<u64>>()))
            .collect();
        registry.session_count = AtomicUsize::new(image.session_count);
        registry.next_session_id = AtomicU64::new(image.next_session_id);
        registry.endings = Mutex::new(Endings {
            reasons: image.endings.iter().copied().collect(),
            order: image.endings.iter().map(|(id, _)| *id).collect(),
        });
        let mut timers = Timers::default();
        for (id, at) in image.timers {
            timers.schedule(id, at);
        }
        registry.timers = Mutex::new(timers);
        registry.unclaimed = Mutex::new(
            image
                .unclaimed
                .into_iter()
                .map(|(account, events)| (account, events.into()))
                .collect::<HashMap<u64, _>>(),
        );
        registry.last_full_sweep = Mutex::new(image.last_full_sweep);
        Ok(registry)
    }
}
