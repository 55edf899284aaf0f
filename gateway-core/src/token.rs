//! Session tokens: minting, constant-time verification, key rotation.
//!
//! A token is 80 bytes (PROTOCOL.md section 6):
//!
//! | offset | field | width |
//! |---|---|---|
//! | 0 | `key_id` | 4 |
//! | 4 | `session_id` | 8 |
//! | 12 | `account_id` | 8 |
//! | 20 | `generation` | 4 |
//! | 24 | `expires_at_ms` | 8 |
//! | 32 | `random` | 16 |
//! | 48 | `tag` = HMAC-SHA256(key `key_id`, bytes 0..48) | 32 |
//!
//! Entropy: 128 bits in every token, drawn by the gateway's edge from the operating
//! system CSPRNG for each login and resume and handed in with that input (the core
//! reads no random generator, so a core rebuilt from its inputs mints the same
//! tokens), so two tokens never collide and none can be guessed from another;
//! forging one needs the 256-bit HMAC key. Tags are checked with `ring::hmac::verify`,
//! which compares in constant time. Generation rules (which of a session's tokens
//! are still good) belong to the session, not to this module.

use proto::SessionToken;
use ring::hmac;

use crate::time::Timestamp;

/// Bytes covered by the tag.
const SIGNED_LEN: usize = 48;
/// Bytes of fresh randomness in each token.
pub const RANDOM_LEN: usize = 16;
/// The fresh random part of a token, drawn by the edge for the input that mints it.
pub type TokenEntropy = [u8; RANDOM_LEN];
/// Smallest accepted HMAC key.
pub const MIN_KEY_LEN: usize = 32;
/// Keys kept besides the current one, so tokens minted before a rotation stay valid.
pub const MAX_PREVIOUS_KEYS: usize = 3;

/// Why a token is refused. Every variant is the presenter's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not 80 bytes.
    #[error("token is malformed")]
    Malformed,
    /// Tagged with a key this gateway does not hold (retired, or never ours).
    #[error("token key is unknown")]
    UnknownKey,
    /// The tag does not verify: forged or altered.
    #[error("token tag does not verify")]
    BadTag,
    /// Past its expiry.
    #[error("token has expired")]
    Expired,
}

impl TokenError {
    /// The reason code sent to the client.
    pub const fn reason(self) -> proto::ReasonCode {
        match self {
            TokenError::Malformed => proto::ReasonCode::TokenMalformed,
            TokenError::UnknownKey => proto::ReasonCode::TokenUnknownKey,
            TokenError::BadTag => proto::ReasonCode::TokenForged,
            TokenError::Expired => proto::ReasonCode::TokenExpired,
        }
    }
}

/// Why a key ring operation failed. The operator's fault or the platform's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Key material shorter than [`MIN_KEY_LEN`].
    #[error("HMAC key must be at least {MIN_KEY_LEN} bytes")]
    KeyTooShort,
    /// A key with this id is already in the ring.
    #[error("key id {0} is already in use")]
    DuplicateKeyId(u32),
    /// A key ring without a key (a damaged snapshot).
    #[error("the key ring has no key")]
    Empty,
}

/// What a verified token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenClaims {
    /// Key that tagged it.
    pub key_id: u32,
    /// The session.
    pub session_id: u64,
    /// The account.
    pub account_id: u64,
    /// 0 at login, +1 per resume.
    pub generation: u32,
    /// Expiry.
    pub expires_at: Timestamp,
}

struct TokenKey {
    id: u32,
    key: hmac::Key,
    /// Kept for the core's snapshots (crash-safe mode), which carry the key ring.
    secret: Vec<u8>,
}

/// A key ring's ids and secrets, current key first, as a core snapshot carries them
/// (as secret as the key file).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRingImage {
    keys: Vec<(u32, Vec<u8>)>,
}

impl std::fmt::Debug for KeyRingImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRingImage")
            .field(
                "key_ids",
                &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The gateway's token keys: one current key that mints, and up to
/// [`MAX_PREVIOUS_KEYS`] older ones that still verify.
pub struct TokenKeyRing {
    current: TokenKey,
    previous: Vec<TokenKey>,
}

impl std::fmt::Debug for TokenKeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeyRing")
            .field("current_key_id", &self.current.id)
            .field(
                "previous_key_ids",
                &self.previous.iter().map(|k| k.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl TokenKeyRing {
    /// A ring whose current key is `secret`, with id `key_id`.
    pub fn new(key_id: u32, secret: &[u8]) -> Result<Self, KeyError> {
        Ok(TokenKeyRing {
            current: token_key(key_id, secret)?,
            previous: Vec::new(),
        })
    }

    /// The ring's keys, for a core snapshot.
    pub fn image(&self) -> KeyRingImage {
        KeyRingImage {
            keys: std::iter::once(&self.current)
                .chain(&self.previous)
                .map(|key| (key.id, key.secret.clone()))
                .collect(),
        }
    }

    /// The ring a snapshot carried.
    pub fn from_image(image: &KeyRingImage) -> Result<Self, KeyError> {
        let mut keys = image.keys.iter().map(|(id, secret)| token_key(*id, secret));
        let current = keys.next().ok_or(KeyError::Empty)??;
        Ok(TokenKeyRing {
            current,
            previous: keys.collect::<Result<_, _>>()?,
        })
    }

    /// Makes `secret` the minting key; the old current key keeps verifying. The
    /// oldest previous key is dropped beyond [`MAX_PREVIOUS_KEYS`].
    pub fn rotate(&mut self, key_id: u32, secret: &[u8]) -> Result<(), KeyError> {
        if self.key(key_id).is_some() {
            return Err(KeyError::DuplicateKeyId(key_id));
        }
        let old = std::mem::replace(&mut self.current, token_key(key_id, secret)?);
        self.previous.insert(0, old);
        self.previous.truncate(MAX_PREVIOUS_KEYS);
        Ok(())
    }

    /// Stops accepting tokens of a previous key. The current key cannot be retired;
    /// rotate first. Returns whether a key was removed.
    pub fn retire(&mut self, key_id: u32) -> bool {
        let before = self.previous.len();
        self.previous.retain(|k| k.id != key_id);
        self.previous.len() != before
    }

    /// A key for another purpose, derived from the current token key and `label`
    /// (HMAC-SHA256), so that it lasts as long as the token key does: a gateway
    /// started again with the same key file derives the same one.
    pub fn derive_key(&self, label: &[u8]) -> hmac::Key {
        let derived = hmac::sign(&self.current.key, label);
        hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
    }

    /// Id of the key that mints.
    pub fn current_key_id(&self) -> u32 {
        self.current.id
    }

    fn key(&self, key_id: u32) -> Option<&TokenKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == key_id)
    }

    /// Mints a token under the current key, with `random` as its random part.
    pub fn mint(
        &self,
        session_id: u64,
        account_id: u64,
        generation: u32,
        expires_at: Timestamp,
        random: &TokenEntropy,
    ) -> SessionToken {
        let mut bytes = [0u8; SessionToken::LEN];
        bytes[0..4].copy_from_slice(&self.current.id.to_le_bytes());
        bytes[4..12].copy_from_slice(&session_id.to_le_bytes());
        bytes[12..20].copy_from_slice(&account_id.to_le_bytes());
        bytes[20..24].copy_from_slice(&generation.to_le_bytes());
        bytes[24..32].copy_from_slice(&expires_at.as_millis().to_le_bytes());
        bytes[32..SIGNED_LEN].copy_from_slice(random);
        let tag = hmac::sign(&self.current.key, &bytes[..SIGNED_LEN]);
        bytes[SIGNED_LEN..].copy_from_slice(tag.as_ref());
        SessionToken(bytes)
    }

    /// Verifies a presented token: length, key, tag (constant time), then expiry.
    pub fn verify(&self, token: &[u8], now: Timestamp) -> Result<TokenClaims, TokenError> {
        let claims = self.verify_tag(token)?;
        if now >= claims.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Verifies a presented token's length, key and tag (constant time), leaving its
    /// expiry to the caller: a live session renews its tokens' lifetime from its last
    /// detach (see the registry).
    pub fn verify_tag(&self, token: &[u8]) -> Result<TokenClaims, TokenError> {
        let token: &[u8; SessionToken::LEN] =
            token.try_into().map_err(|_| TokenError::Malformed)?;
        let (signed, tag) = token.split_at(SIGNED_LEN);
        let field = |range: std::ops::Range<usize>| &signed[range];
        let key_id = u32::from_le_bytes(le(field(0..4)));
        let key = self.key(key_id).ok_or(TokenError::UnknownKey)?;
        hmac::verify(&key.key, signed, tag).map_err(|_| TokenError::BadTag)?;
        let claims = TokenClaims {
            key_id,
            session_id: u64::from_le_bytes(le(field(4..12))),
            account_id: u64::from_le_bytes(le(field(12..20))),
            generation: u32::from_le_bytes(le(field(20..24))),
            expires_at: Timestamp::from_millis(u64::from_le_bytes(le(field(24..32)))),
        };
        Ok(claims)
    }
}

fn token_key(id: u32, secret: &[u8]) -> Result<TokenKey, KeyError> {
    if secret.len() < MIN_KEY_LEN {
        return Err(KeyError::KeyTooShort);
    }
    Ok(TokenKey {
        id,
        key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        secret: secret.to_vec(),
    })
}

/// Copies a slice of known length into an array; the callers' ranges are constant.
fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);
    const LATER: Timestamp = Timestamp::from_millis(2_000_000);

    fn ring() -> TokenKeyRing {
        TokenKeyRing::new(1, &[7u8; 32]).expect("valid key")
    }

    #[test]
    fn a_minted_token_verifies_to_its_claims() {
        let ring = ring();
        let token = ring.mint(42, 9, 3, LATER, &[5; RANDOM_LEN]);
        let claims = ring.verify(&token.0, NOW).expect("valid");
        assert_eq!(
            claims,
            TokenClaims {
                key_id: 1,
                session_id: 42,
                account_id: 9,
                generation: 3,
                expires_at: LATER
            }
        );
    }

    #[test]
    fn tokens_for_the_same_claims_differ_in_their_random_part_alone() {
        let ring = ring();
        let a = ring.mint(42, 9, 0, LATER, &[5; RANDOM_LEN]);
        let b = ring.mint(42, 9, 0, LATER, &[6; RANDOM_LEN]);
        assert_eq!(a.0[32..48], [5; RANDOM_LEN]);
        assert_ne!(a, b);
        assert_eq!(ring.verify(&a.0, NOW), ring.verify(&b.0, NOW));
        // The same input mints the same token: a core rebuilt from it agrees.
        assert_eq!(ring.mint(42, 9, 0, LATER, &[5; RANDOM_LEN]), a);
    }

    #[test]
    fn rejects_every_single_bit_flip_as_forged_or_unknown_key() {
        let ring = ring();
        let token = ring.mint(42, 9, 0, LATER, &[5; RANDOM_LEN]);
        for bit in 0..SessionToken::LEN * 8 {
            let mut tampered = token.0;
            tampered[bit / 8] ^= 1 << (bit % 8);
            let expected = if bit < 32 {
                TokenError::UnknownKey
            } else {
                TokenError::BadTag
            };
            assert_eq!(ring.verify(&tampered, NOW), Err(expected), "bit {bit}");
        }
    }

    #[test]
    fn rejects_a_token_from_another_gateway_key() {
        let other = TokenKeyRing::new(1, &[8u8; 32]).expect("valid key");
        let token = other.mint(42, 9, 0, LATER, &[5; RANDOM_LEN]);
        assert_eq!(ring().verify(&token.0, NOW), Err(TokenError::BadTag));
    }

    #[test]
    fn rejects_wrong_lengths_as_malformed() {
        let token = ring().mint(42, 9, 0, LATER, &[5; RANDOM_LEN]);
        assert_eq!(
            ring().verify(&token.0[..79], NOW),
            Err(TokenError::Malformed)
        );
        assert_eq!(ring().verify(&[0u8; 81], NOW), Err(TokenError::Malformed));
        assert_eq!(ring().verify(&[], NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn rejects_expired_tokens_at_and_after_expiry() {
        let ring = ring();
        let token = ring.mint(42, 9, 0, NOW, &[5; RANDOM_LEN]);
        assert_eq!(ring.verify(&token.0, NOW), Err(TokenError::Expired));
        assert_eq!(ring.verify(&token.0, LATER), Err(TokenError::Expired));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_their_key_is_retired() {
        let mut ring = ring();
        let old = ring.mint(1, 1, 0, LATER, &[5; RANDOM_LEN]);
        ring.rotate(2, &[9u8; 32]).expect("rotate");
        let new = ring.mint(1, 1, 0, LATER, &[5; RANDOM_LEN]);
        assert_eq!(ring.verify(&old.0, NOW).map(|c| c.key_id), Ok(1));
        assert_eq!(ring.verify(&new.0, NOW).map(|c| c.key_id), Ok(2));
        assert!(ring.retire(1));
        assert_eq!(ring.verify(&old.0, NOW), Err(TokenError::UnknownKey));
        assert!(!ring.retire(2), "the current key cannot be retired");
    }

    #[test]
    fn rotation_refuses_short_keys_and_reused_ids() {
        let mut ring = ring();
        assert_eq!(
            ring.rotate(2, &[1u8; 31]).err(),
            Some(KeyError::KeyTooShort)
        );
        assert_eq!(
            ring.rotate(1, &[1u8; 32]).err(),
            Some(KeyError::DuplicateKeyId(1))
        );
    }

    #[test]
    fn debug_output_shows_no_secret_and_tokens_are_redacted() {
        let ring = ring();
        let token = ring.mint(1, 1, 0, LATER, &[5; RANDOM_LEN]);
        assert_eq!(format!("{token:?}"), "SessionToken(<redacted>)");
        assert!(!format!("{ring:?}").contains("07"));
    }
}
