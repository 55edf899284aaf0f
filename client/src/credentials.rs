//! An account's API key: the Ed25519 key that signs logins, loaded from a seed or from
//! a development gateway's key file.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::CancelOnDisconnect;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::Ed25519KeyPair;
use serde::Deserialize;

use crate::ClientError;

/// An API key: its id and the Ed25519 key pair.
#[derive(Clone)]
pub struct Credentials {
    api_key_id: u64,
    key: Arc<Ed25519KeyPair>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("api_key_id", &self.api_key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct DevKeysFile {
    #[serde(rename = "key", default)]
    keys: Vec<DevKey>,
}

#[derive(Deserialize)]
struct DevKey {
    account: u64,
    key_id: u64,
    seed: String,
}

impl Credentials {
    /// The API key id.
    pub fn api_key_id(&self) -> u64 {
        self.api_key_id
    }

    /// Credentials from an Ed25519 seed.
    pub fn from_seed(api_key_id: u64, seed: &[u8; 32]) -> Result<Self, ClientError> {
        let key = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Credentials {
            api_key_id,
            key: Arc::new(key),
        })
    }

    /// The demo accounts' credentials from a development gateway's `client-keys.toml`,
    /// as `(account, credentials)`.
    pub fn load_dev_keys(path: &Path) -> Result<Vec<(u64, Credentials)>, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        let file: DevKeysFile = toml::from_str(&text)
            .map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))?;
        file.keys
            .iter()
            .map(|key| {
                let mut seed = [0u8; 32];
                hex_decode(&key.seed, &mut seed)
                    .ok_or_else(|| ClientError::Config(format!("key {}: bad seed", key.key_id)))?;
                Ok((key.account, Credentials::from_seed(key.key_id, &seed)?))
            })
            .collect()
    }

    /// A signed `Login` for the gateway of `venue` (its venue id, which the venue
    /// publishes; [`proto::DEFAULT_VENUE`] for a development gateway) with a fresh
    /// nonce and the current time.
    pub fn signed_login(
        &self,
        venue: &str,
        cancel_on_disconnect: CancelOnDisconnect,
        cod_grace: Duration,
    ) -> Result<proto::Login, ClientError> {
        let mut nonce = [0u8; 16];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ClientError::Config("system random generator failed".into()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let mut login = proto::Login {
            api_key_id: self.api_key_id,
            timestamp_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
            nonce: proto::Nonce(nonce),
            cancel_on_disconnect,
            cod_grace_ms: u32::try_from(cod_grace.as_millis()).unwrap_or(u32::MAX),
            signature: proto::Signature([0; 64]),
        };
        let signature = self.key.sign(&login.signing_message(venue));
        login.signature.0.copy_from_slice(signature.as_ref());
        Ok(login)
    }
}

fn hex_decode(text: &str, out: &mut [u8]) -> Option<()> {
    proto::wire::from_hex_into(text, out).ok()
}
