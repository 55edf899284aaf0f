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
#[serde(deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// The `api_key_id` clients send.
    pub id: u64,
    /// Ed25519 public key, 32 bytes in hex.
    pub public_key: String,
}

/// One account, as written in the accounts file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
    #[error("API key {key_id}: public_key must be 32 bytes in hex (64 hex digits)")]
    BadPublicKey {
        /// The key.
        key_id: u64,
    },
    /// Two keys share an id.
    #[error("API key id {0} is listed twice")]
    DuplicateKeyId(u64),
    /// No account is listed: nobody could log in.
    #[error("no accounts: add [[account]] tables, each with [[account.keys]]")]
    Empty,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// This gateway's venue id, part of every login's signed message so that a login
    /// signed for one venue or environment (say, a test gateway sharing keys with
    /// production) is refused by every other.
    pub venue: String,
    /// Largest accepted difference between the client's timestamp and our clock.
    pub max_clock_skew: Duration,
    /// Most nonces remembered per API key; when full, that key's logins are refused
    /// (`RateLimited`) until old ones expire, rather than forgetting a nonce that
    /// could then be replayed. Other keys are not affected.
    pub max_remembered_nonces_per_key: usize,
    /// Failed authentications an address may make per window before its logins are
    /// refused (`RateLimited`) for the rest of the window.
    pub failures_per_window: u32,
    /// The failure counting window.
    pub failure_window: Duration,
    /// Most addresses tracked for failures; beyond, the longest-tracked is forgotten.
    pub max_tracked_addresses: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            venue: proto::DEFAULT_VENUE.to_string(),
            max_clock_skew: Duration::from_secs(30),
            max_remembered_nonces_per_key: 100_000,
            failures_per_window: 20,
            failure_window: Duration::from_secs(10),
            max_tracked_addresses: 100_000,
        }
    }
}

/// The key an address is rate limited under: an IPv4 address itself (also when
/// written IPv4-mapped), an IPv6 address's /64, which one subscriber usually holds
/// whole.
pub fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                v6.to_bits() & !((1u128 << 64) - 1),
            )),
        },
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

/// Nonces one API key used recently, with when each may be forgotten.
#[derive(Debug, Default)]
struct KeyNonces {
    seen: HashMap<[u8; 16], Timestamp>,
    expiry: VecDeque<(Timestamp, [u8; 16])>,
}

impl KeyNonces {
    fn expire(&mut self, now: Timestamp) {
        while let Some(&(at, nonce)) = self.expiry.front() {
            // Entries are pushed roughly in time order; an out-of-order later entry
            // only delays forgetting, never forgets early.
            if at > now {
                break;
            }
            self.expiry.pop_front();
            self.seen.remove(&nonce);
        }
    }
}

/// Checks logins. Not thread-safe by itself; the IO layer wraps it in a lock.
pub struct Authenticator {
    keys: HashMap<u64, ApiKey>,
    config: AuthConfig,
    nonces: HashMap<u64, KeyNonces>,
    failures: HashMap<IpAddr, Failures>,
    /// Tracked addresses, oldest first, for forgetting when the table is full.
    failure_order: VecDeque<IpAddr>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("api_keys", &self.keys.len())
            .field(
                "remembered_nonces",
                &self.nonces.values().map(|n| n.seen.len()).sum::<usize>(),
            )
            .finish_non_exhaustive()
    }
}

impl AccountsFile {
    /// Parses an accounts file.
    pub fn parse(text: &str) -> Result<Self, AccountsError> {
        let file: AccountsFile =
            toml::from_str(text).map_err(|e| AccountsError::Parse(e.to_string()))?;
        if file.accounts.is_empty() {
            return Err(AccountsError::Empty);
        }
        file.api_keys()?;
        Ok(file)
    }

    /// Every API key by id, with its decoded public key; fails on a malformed key or
    /// a repeated id.
    fn api_keys(&self) -> Result<HashMap<u64, ApiKey>, AccountsError> {
        let mut keys = HashMap::new();
        for account in &self.accounts {
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
        Ok(keys)
    }

    /// The file as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

impl Authenticator {
    /// An authenticator for the accounts in `file`.
    pub fn new(file: &AccountsFile, config: AuthConfig) -> Result<Self, AccountsError> {
        Ok(Authenticator {
            keys: file.api_keys()?,
            config,
            nonces: HashMap::new(),
            failures: HashMap::new(),
            failure_order: VecDeque::new(),
        })
    }

    /// Replaces the accounts and their API keys with those in `file` (a reload).
    /// Nonce and failure memories are kept. On error nothing changes. Returns how
    /// many accounts there are now.
    pub fn reload(&mut self, file: &AccountsFile) -> Result<usize, AccountsError> {
        let fresh = Authenticator::new(file, self.config.clone())?;
        self.keys = fresh.keys;
        Ok(file.accounts.len())
    }

    /// Whether the accounts file has `account` (with at least one API key).
    pub fn has_account(&self, account: u64) -> bool {
        self.keys.values().any(|key| key.account == account)
    }

    /// Whether `source` may attempt a login now; refused with `RateLimited` after too
    /// many failures in the window.
    pub fn admit(&mut self, source: IpAddr, now: Timestamp) -> Result<(), LoginRefused> {
        let Some(failures) = self.failures.get(&address_key(source)) else {
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

    /// Counts a failed authentication (a bad signature or key, a forged token) of
    /// `source`. When the table is full, the longest-tracked address is forgotten:
    /// the limiter never stops counting.
    pub fn record_failure(&mut self, source: IpAddr, now: Timestamp) {
        let source = address_key(source);
        let window = self.config.failure_window;
        if !self.failures.contains_key(&source) {
            while self.failures.len() >= self.config.max_tracked_addresses.max(1) {
                let Some(oldest) = self.failure_order.pop_front() else {
                    break;
                };
                self.failures.remove(&oldest);
            }
            self.failure_order.push_back(source);
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

    /// Verifies a `Login`: key, signature (over this gateway's venue id), timestamp,
    /// nonce. A success reserves the nonce; if the login is then refused for another
    /// reason, [`Authenticator::release_nonce`] gives it back, so only logins that
    /// succeed fill the key's nonce memory.
    pub fn verify(&mut self, login: &Login, now: Timestamp) -> Result<Grant, LoginRefused> {
        let key = self
            .keys
            .get(&login.api_key_id)
            .ok_or(LoginRefused::because(ReasonCode::UnknownApiKey))?;
        UnparsedPublicKey::new(&ED25519, &key.public_key)
            .verify(
                &login.signing_message(&self.config.venue),
                &login.signature.0,
            )
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
        let limit = self.config.max_remembered_nonces_per_key;
        let nonces = self.nonces.entry(login.api_key_id).or_default();
        nonces.expire(now);
        if nonces.seen.contains_key(&login.nonce.0) {
            return Err(LoginRefused::because(ReasonCode::NonceReused));
        }
        if nonces.seen.len() >= limit {
            let retry_after = nonces.expiry.front().map_or(1_000, |&(at, _)| {
                at.as_millis().saturating_sub(now.as_millis()).max(1)
            });
            return Err(LoginRefused {
                reason: ReasonCode::RateLimited,
                retry_after_ms: u32::try_from(retry_after).unwrap_or(u32::MAX),
            });
        }
        // A nonce is only dangerous while its timestamp is acceptable: remember it
        // until the client's timestamp plus the skew has passed.
        let forget_at = Timestamp::from_millis(client_ms.saturating_add(skew_ms)).max(now);
        nonces.seen.insert(login.nonce.0, forget_at);
        nonces.expiry.push_back((forget_at, login.nonce.0));
        Ok(grant)
    }

    /// Forgets the nonce of a verified login that was then refused (session limits,
    /// parameters), so refused logins cannot fill the key's nonce memory.
    pub fn release_nonce(&mut self, login: &Login) {
        if let Some(nonces) = self.nonces.get_mut(&login.api_key_id) {
            // Its expiry entry stays queued and finds nothing to remove later.
            nonces.seen.remove(&login.nonce.0);
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
        let signature = key.sign(&login.signing_message(proto::DEFAULT_VENUE));
        login.signature = Signature(signature.as_ref().try_into().expect("64-byte signature"));
    }

    fn refused(reason: ReasonCode) -> Result<Grant, LoginRefused> {
        Err(LoginRefused::because(reason))
    }

    #[test]
    fn an_accounts_file_with_a_misspelt_or_no_account_is_refused() {
        let misspelt_table = "[[acount]]\nid = 1\nkeys = []\n";
        let misspelt_key = "[[account]]\nid = 1\nmax_sesions = 2\nkeys = []\n";
        for text in [misspelt_table, misspelt_key] {
            let error = AccountsFile::parse(text).expect_err("unknown field");
            assert!(error.to_string().contains("unknown field"), "{error}");
        }
        assert_eq!(AccountsFile::parse(""), Err(AccountsError::Empty));
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
        auth.config.max_remembered_nonces_per_key = 2;
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
        assert_eq!(
            AccountsFile::parse(
                "[[account]]\nid = 1\n[[account.keys]]\nid = 5\npublic_key = \"abc\"",
            ),
            Err(AccountsError::BadPublicKey { key_id: 5 })
        );
    }
}

#[cfg(test)]
mod hostile {
    //! What a hostile key holder or address can and cannot do to others.

    use super::*;
    use proto::{CancelOnDisconnect, Nonce, Signature};
    use ring::signature::{Ed25519KeyPair, KeyPair};

    const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("seed")
    }

    /// Two accounts, one key each: 1001 (seed 1) and 2002 (seed 2).
    fn authenticator(config: AuthConfig) -> Authenticator {
        let account = |id, key_id, seed| AccountEntry {
            id,
            max_sessions: None,
            keys: vec![ApiKeyEntry {
                id: key_id,
                public_key: hex::encode(key(seed).public_key().as_ref()),
            }],
        };
        let file = AccountsFile {
            accounts: vec![account(1, 1001, 1), account(2, 2002, 2)],
        };
        Authenticator::new(&file, config).expect("valid")
    }

    fn login(key_id: u64, seed: u8, nonce: u8, venue: &str) -> Login {
        let mut login = Login {
            api_key_id: key_id,
            timestamp_ns: NOW.as_millis() * 1_000_000,
            nonce: Nonce([nonce; 16]),
            cancel_on_disconnect: CancelOnDisconnect::Off,
            cod_grace_ms: 0,
            signature: Signature([0; 64]),
        };
        let signature = key(seed).sign(&login.signing_message(venue));
        login.signature = Signature(signature.as_ref().try_into().expect("64 bytes"));
        login
    }

    #[test]
    fn one_keys_logins_cannot_fill_another_keys_nonce_memory() {
        let mut auth = authenticator(AuthConfig {
            max_remembered_nonces_per_key: 3,
            ..AuthConfig::default()
        });
        for nonce in 0..3 {
            assert!(auth.verify(&login(1001, 1, nonce, "dev"), NOW).is_ok());
        }
        let refused = auth.verify(&login(1001, 1, 9, "dev"), NOW);
        assert_eq!(refused.map_err(|r| r.reason), Err(ReasonCode::RateLimited));
        assert!(auth.verify(&login(2002, 2, 9, "dev"), NOW).is_ok());
    }

    #[test]
    fn a_login_refused_after_verification_gives_its_nonce_back() {
        let mut auth = authenticator(AuthConfig {
            max_remembered_nonces_per_key: 1,
            ..AuthConfig::default()
        });
        let refused_later = login(1001, 1, 1, "dev");
        assert!(auth.verify(&refused_later, NOW).is_ok());
        auth.release_nonce(&refused_later);
        assert!(auth.verify(&login(1001, 1, 2, "dev"), NOW).is_ok());
    }

    #[test]
    fn a_login_signed_for_another_venue_is_refused() {
        let mut auth = authenticator(AuthConfig {
            venue: "XMPL-PROD".into(),
            ..AuthConfig::default()
        });
        let for_test = login(1001, 1, 1, "XMPL-TEST");
        assert_eq!(
            auth.verify(&for_test, NOW).map_err(|r| r.reason),
            Err(ReasonCode::BadSignature)
        );
        assert!(auth.verify(&login(1001, 1, 2, "XMPL-PROD"), NOW).is_ok());
    }

    #[test]
    fn a_full_failure_table_forgets_the_oldest_address_and_keeps_counting() {
        let mut auth = authenticator(AuthConfig {
            max_tracked_addresses: 2,
            failures_per_window: 1,
            ..AuthConfig::default()
        });
        let first: IpAddr = [10, 0, 0, 1].into();
        let second: IpAddr = [10, 0, 0, 2].into();
        let third: IpAddr = [10, 0, 0, 3].into();
        for address in [first, second, third] {
            auth.record_failure(address, NOW);
        }
        assert!(auth.admit(first, NOW).is_ok(), "the oldest was forgotten");
        assert!(auth.admit(second, NOW).is_err());
        assert!(auth.admit(third, NOW).is_err(), "a new address is counted");
    }

    #[test]
    fn ipv6_addresses_are_limited_per_64() {
        let mut auth = authenticator(AuthConfig {
            failures_per_window: 2,
            ..AuthConfig::default()
        });
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("address");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("address");
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().expect("address");
        auth.record_failure(a, NOW);
        auth.record_failure(b, NOW);
        assert!(auth.admit(a, NOW).is_err());
        assert!(auth.admit(b, NOW).is_err());
        assert!(auth.admit(elsewhere, NOW).is_ok());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("address");
        assert_eq!(address_key(mapped), IpAddr::from([10, 0, 0, 1]));
    }
}
