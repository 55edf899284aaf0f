//! Full login: API keys, signature, clock skew, nonce replay, failure rate limiting.
//! No IO; time is passed in.
//!
//! The accounts file (TOML) lists each account with its Ed25519 API keys:
//!
//! ```toml
//! [[account]]
//! id = 1
//! max_sessions = 4            # optional; the gateway-wide per-account limit otherwise
//!
//! [[account.keys]]
//! id = 1001                   # the api_key_id a client puts in Login
//! public_key = "3b6a27bc..."  # 32 bytes, hex
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use proto::{Login, ReasonCode};
use ring::signature::{UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// One API key of an account, as written in the accounts file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyEntry {
    /// The `api_key_id` clients send.
    pub id: u64,
    /// Ed25519 public key, 32 bytes in hex.
    pub public_key: String,
}

/// One account, as written in the accounts file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountEntry {
    /// Account id.
    pub id: u64,
    /// Most sessions this account may hold (overrides the gateway default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,
    /// The account's API keys.
    pub keys: Vec<ApiKeyEntry>,
}

/// The accounts file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AccountsFile {
    /// Every account.
    #[serde(rename = "account", default)]
    pub accounts: Vec<AccountEntry>,
}

/// Why an accounts file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountsError {
    /// Not valid TOML of the expected shape.
    #[error("accounts file is not valid: {0}")]
    Parse(String),
    /// A public key is not 64 hex digits.
    #[error("API key {key_id}: public key must be 32 bytes of hex")]
    BadPublicKey {
        /// The key.
        key_id: u64,
    },
    /// Two keys share an id.
    #[error("API key id {0} is listed twice")]
    DuplicateKeyId(u64),
}

/// What a verified login grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The account.
    pub account: u64,
    /// The account's own session limit, if it has one.
    pub max_sessions: Option<usize>,
}

struct ApiKey {
    account: u64,
    max_sessions: Option<usize>,
    public_key: [u8; 32],
}

/// Settings of the authenticator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthConfig {
    /// Largest accepted difference between the client's timestamp and our clock.
    pub max_clock_skew: Duration,
    /// Most nonces remembered; when full, logins are refused (`RateLimited`) until old
    /// ones expire, rather than forgetting a nonce that could then be replayed.
    pub max_remembered_nonces: usize,
    /// Failed logins an address may make per window before it is refused.
    pub failures_per_window: u32,
    /// The failure counting window.
    pub failure_window: Duration,
    /// Most addresses tracked for failures.
    pub max_tracked_addresses: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            max_clock_skew: Duration::from_secs(30),
            max_remembered_nonces: 1_000_000,
            failures_per_window: 20,
            failure_window: Duration::from_secs(10),
            max_tracked_addresses: 100_000,
        }
    }
}

/// A refused login: the reason and, for `RateLimited`, when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("login refused: {reason:?}")]
pub struct LoginRefused {
    /// Why.
    pub reason: ReasonCode,
    /// Milliseconds to wait before retrying (0 unless rate limited).
    pub retry_after_ms: u32,
}

impl LoginRefused {
    const fn because(reason: ReasonCode) -> Self {
        LoginRefused {
            reason,
            retry_after_ms: 0,
        }
    }
}

/// Failed attempts of one address in the current window.
#[derive(Debug, Clone, Copy)]
struct Failures {
    window_start: Timestamp,
    count: u32,
}

/// Checks logins. Not thread-safe by itself; the IO layer wraps it in a lock.
pub struct Authenticator {
    keys: HashMap<u64, ApiKey>,
    config: AuthConfig,
    nonces: HashMap<(u64, [u8; 16]), Timestamp>,
    nonce_expiry: VecDeque<(Timestamp, u64, [u8; 16])>,
    failures: HashMap<IpAddr, Failures>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_keys", &self.keys.len())
            .field("remembered_nonces", &self.nonces.len())
            .finish_non_exhaustive()
    }
}

impl AccountsFile {
    /// Parses an accounts file.
    pub fn parse(text: &str) -> Result<Self, AccountsError> {
        toml::from_str(text).map_err(|e| AccountsError::Parse(e.to_string()))
    }

    /// The file as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

impl Authenticator {
    /// An authenticator for the accounts in `file`.
    pub fn new(file: &AccountsFile, config: AuthConfig) -> Result<Self, AccountsError> {
        let mut keys = HashMap::new();
        for account in &file.accounts {
            for key in &account.keys {
                let mut public_key = [0u8; 32];
                hex::decode_to_slice(key.public_key.trim(), &mut public_key)
                    .map_err(|_| AccountsError::BadPublicKey { key_id: key.id })?;
                let entry = ApiKey {
                    account: account.id,
                    max_sessions: account.max_sessions,
                    public_key,
                };
                if keys.insert(key.id, entry).is_some() {
                    return Err(AccountsError::DuplicateKeyId(key.id));
                }
            }
        }
        Ok(Authenticator {
            keys,
            config,
            nonces: HashMap::new(),
            nonce_expiry: VecDeque::new(),
            failures: HashMap::new(),
        })
    }

    /// Whether `source` may attempt a login now; refused with `RateLimited` after too
    /// many failures in the window.
    pub fn admit(&mut self, source: IpAddr, now: Timestamp) -> Result<(), LoginRefused> {
        let Some(failures) = self.failures.get(&source) else {
            return Ok(());
        };
        let window_end = failures.window_start.plus(self.config.failure_window);
        if now >= window_end || failures.count < self.config.failures_per_window {
            return Ok(());
        }
        let retry_after = window_end.as_millis().saturating_sub(now.as_millis());
        Err(LoginRefused {
            reason: ReasonCode::RateLimited,
            retry_after_ms: u32::try_from(retry_after).unwrap_or(u32::MAX),
        })
    }

    /// Counts a failed login or resume of `source`.
    pub fn record_failure(&mut self, source: IpAddr, now: Timestamp) {
        let window = self.config.failure_window;
        if !self.failures.contains_key(&source)
            && self.failures.len() >= self.config.max_tracked_addresses
        {
            self.failures
                .retain(|_, f| now < f.window_start.plus(window));
            if self.failures.len() >= self.config.max_tracked_addresses {
                return;
            }
        }
        let failures = self.failures.entry(source).or_insert(Failures {
            window_start: now,
            count: 0,
        });
        if now >= failures.window_start.plus(window) {
            *failures = Failures {
                window_start: now,
                count: 0,
            };
        }
        failures.count = failures.count.saturating_add(1);
    }

    /// Verifies a `Login`: key, signature, timestamp, nonce. A success remembers the
    /// nonce.
    pub fn verify(&mut self, login: &Login, now: Timestamp) -> Result<Grant, LoginRefused> {
        let key = self
            .keys
            .get(&login.api_key_id)
            .ok_or(LoginRefused::because(ReasonCode::UnknownApiKey))?;
        UnparsedPublicKey::new(&ED25519, &key.public_key)
            .verify(&login.signing_message(), &login.signature.0)
            .map_err(|_| LoginRefused::because(ReasonCode::BadSignature))?;
        let grant = Grant {
            account: key.account,
            max_sessions: key.max_sessions,
        };
        let skew_ms = u64::try_from(self.config.max_clock_skew.as_millis()).unwrap_or(u64::MAX);
        let client_ms = login.timestamp_ns / 1_000_000;
        if client_ms.abs_diff(now.as_millis()) > skew_ms {
            return Err(LoginRefused::because(ReasonCode::ClockSkew));
        }
        self.expire_nonces(now);
        let nonce_key = (login.api_key_id, login.nonce.0);
        if self.nonces.contains_key(&nonce_key) {
            return Err(LoginRefused::because(ReasonCode::NonceReused));
        }
        if self.nonces.len() >= self.config.max_remembered_nonces {
            return Err(LoginRefused {
                reason: ReasonCode::RateLimited,
                retry_after_ms: 1_000,
            });
        }
        // A nonce is only dangerous while its timestamp is acceptable: remember it
        // until the client's timestamp plus the skew has passed.
        let forget_at = Timestamp::from_millis(client_ms.saturating_add(skew_ms)).max(now);
        self.nonces.insert(nonce_key, forget_at);
        self.nonce_expiry
            .push_back((forget_at, nonce_key.0, nonce_key.1));
        Ok(grant)
    }

    fn expire_nonces(&mut self, now: Timestamp) {
        while let Some(&(at, key_id, nonce)) = self.nonce_expiry.front() {
            // Entries are pushed roughly in time order; an out-of-order later entry
            // only delays forgetting, never forgets early.
            if at > now {
                break;
            }
            self.nonce_expiry.pop_front();
            self.nonces.remove(&(key_id, nonce));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{CancelOnDisconnect, Nonce, Signature};
    use ring::signature::{Ed25519KeyPair, KeyPair};

    const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);
    const SEED: [u8; 32] = [5u8; 32];

    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&SEED).expect("seed")
    }

    fn authenticator() -> Authenticator {
        let file = AccountsFile {
            accounts: vec![AccountEntry {
                id: 9,
                max_sessions: Some(2),
                keys: vec![ApiKeyEntry {
                    id: 1001,
                    public_key: hex::encode(key().public_key().as_ref()),
                }],
            }],
        };
        let parsed = AccountsFile::parse(&file.to_toml()).expect("round trip");
        Authenticator::new(&parsed, AuthConfig::default()).expect("valid")
    }

    fn login(nonce: u8, at: Timestamp) -> Login {
        let mut login = Login {
            api_key_id: 1001,
            timestamp_ns: at.as_millis() * 1_000_000,
            nonce: Nonce([nonce; 16]),
            cancel_on_disconnect: CancelOnDisconnect::Off,
            cod_grace_ms: 0,
            signature: Signature([0; 64]),
        };
        sign_login(&key(), &mut login);
        login
    }

    fn sign_login(key: &Ed25519KeyPair, login: &mut Login) {
        let signature = key.sign(&login.signing_message());
        login.signature = Signature(signature.as_ref().try_into().expect("64-byte signature"));
    }

    fn refused(reason: ReasonCode) -> Result<Grant, LoginRefused> {
        Err(LoginRefused::because(reason))
    }

    #[test]
    fn a_correctly_signed_login_is_granted() {
        let grant = authenticator().verify(&login(1, NOW), NOW);
        assert_eq!(
            grant,
            Ok(Grant {
                account: 9,
                max_sessions: Some(2)
            })
        );
    }

    #[test]
    fn unknown_keys_and_bad_signatures_are_refused() {
        let mut auth = authenticator();
        let mut unknown = login(1, NOW);
        unknown.api_key_id = 7;
        assert_eq!(
            auth.verify(&unknown, NOW),
            refused(ReasonCode::UnknownApiKey)
        );
        let mut altered = login(2, NOW);
        altered.cod_grace_ms = 5; // signed fields changed after signing
        assert_eq!(
            auth.verify(&altered, NOW),
            refused(ReasonCode::BadSignature)
        );
        let mut wrong_key = login(3, NOW);
        sign_login(
            &Ed25519KeyPair::from_seed_unchecked(&[6u8; 32]).expect("seed"),
            &mut wrong_key,
        );
        assert_eq!(
            auth.verify(&wrong_key, NOW),
            refused(ReasonCode::BadSignature)
        );
    }

    #[test]
    fn timestamps_beyond_the_skew_are_refused() {
        let mut auth = authenticator();
        let skew = Duration::from_secs(31);
        assert_eq!(
            auth.verify(&login(1, NOW.plus(skew)), NOW),
            refused(ReasonCode::ClockSkew)
        );
        let past = Timestamp::from_millis(NOW.as_millis() - 31_000);
        assert_eq!(
            auth.verify(&login(2, past), NOW),
            refused(ReasonCode::ClockSkew)
        );
        assert!(auth
            .verify(&login(3, NOW.plus(Duration::from_secs(29))), NOW)
            .is_ok());
    }

    #[test]
    fn a_replayed_nonce_is_refused_while_its_timestamp_is_acceptable() {
        let mut auth = authenticator();
        let first = login(1, NOW);
        assert!(auth.verify(&first, NOW).is_ok());
        assert_eq!(
            auth.verify(&first, NOW.plus(Duration::from_secs(5))),
            refused(ReasonCode::NonceReused)
        );
        // Once the nonce is forgotten its timestamp is too old to pass anyway.
        assert_eq!(
            auth.verify(&first, NOW.plus(Duration::from_secs(31))),
            refused(ReasonCode::ClockSkew)
        );
    }

    #[test]
    fn a_full_nonce_memory_refuses_rather_than_forgets() {
        let mut auth = authenticator();
        auth.config.max_remembered_nonces = 2;
        assert!(auth.verify(&login(1, NOW), NOW).is_ok());
        assert!(auth.verify(&login(2, NOW), NOW).is_ok());
        let third = auth.verify(&login(3, NOW), NOW);
        assert_eq!(third.map_err(|e| e.reason), Err(ReasonCode::RateLimited));
        assert!(auth
            .verify(
                &login(3, NOW.plus(Duration::from_secs(31))),
                NOW.plus(Duration::from_secs(31))
            )
            .is_ok());
    }

    #[test]
    fn repeated_failures_from_one_address_are_rate_limited_for_the_window() {
        let mut auth = authenticator();
        let attacker: IpAddr = [10, 0, 0, 1].into();
        let bystander: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..20 {
            assert!(auth.admit(attacker, NOW).is_ok());
            auth.record_failure(attacker, NOW);
        }
        let later = NOW.plus(Duration::from_secs(4));
        assert_eq!(
            auth.admit(attacker, later),
            Err(LoginRefused {
                reason: ReasonCode::RateLimited,
                retry_after_ms: 6_000
            })
        );
        assert!(auth.admit(bystander, later).is_ok());
        assert!(auth
            .admit(attacker, NOW.plus(Duration::from_secs(10)))
            .is_ok());
    }

    #[test]
    fn bad_accounts_files_are_refused_with_a_reason() {
        assert!(matches!(
            AccountsFile::parse("[[account]]\nid = \"x\""),
            Err(AccountsError::Parse(_))
        ));
        let bad_key = AccountsFile::parse(
            "[[account]]\nid = 1\n[[account.keys]]\nid = 5\npublic_key = \"abc\"",
        )
        .expect("parses");
        assert_eq!(
            Authenticator::new(&bad_key, AuthConfig::default()).err(),
            Some(AccountsError::BadPublicKey { key_id: 5 })
        );
    }
}
