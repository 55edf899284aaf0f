//! Files a gateway needs that development can generate: a self-signed certificate
//! and demo accounts with their client keys. Generated once into the dev directory
//! and reused afterwards, so clients keep working across restarts.
//!
//! Files in the dev directory:
//!
//! - `cert.der`, `cert.pem`: the certificate clients must trust (names `localhost`,
//!   `127.0.0.1`, `::1`); `key.der`: its private key.
//! - `accounts.toml`: the demo accounts and their public keys (gateway side).
//! - `client-keys.toml`: the matching private keys (client side): a list of
//!   `[[key]]` tables with `account`, `key_id` and `seed` (the 32-byte Ed25519 seed in
//!   hex). Development only: anyone with this file can trade on these accounts.
//! - `token-key.hex`: the HMAC key of session tokens (32 random bytes in hex), so a
//!   restarted development gateway still recognises its own tokens (their sessions
//!   are gone, so a resume gets `SessionNotFound`, not `TokenForged`).

use std::fs;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::auth::{AccountEntry, AccountsError, AccountsFile, ApiKeyEntry};
use crate::token::{KeyError, TokenKeyRing};

/// Why setting up files failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why (shown in the message, so not a separate error source).
        error: std::io::Error,
    },
    /// A certificate or key is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The accounts file is unusable.
    #[error(transparent)]
    Accounts(#[from] AccountsError),
    /// A setting or file content is unusable (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// A token key file is unusable.
    #[error("{path}: {why}")]
    TokenKey {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// The token key ring from a file holding one HMAC key in hex (id 1).
pub fn token_key_file(path: &Path) -> Result<TokenKeyRing, SetupError> {
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    let bad = |why: String| SetupError::TokenKey {
        path: path.to_path_buf(),
        why,
    };
    let secret = hex::decode(text.trim()).map_err(|_| bad("not hex".into()))?;
    TokenKeyRing::new(1, &secret).map_err(|e: KeyError| bad(e.to_string()))
}

/// The development token key in `dir`, generated (32 random bytes) on first use.
pub fn dev_token_key(dir: &Path) -> Result<TokenKeyRing, SetupError> {
    let path = dir.join("token-key.hex");
    if !path.exists() {
        write_secret(&path)?;
    }
    token_key_file(&path)
}

/// Writes 32 fresh random bytes, in hex, to `path`, readable by its owner only: a
/// token key or an admin token.
pub(crate) fn write_secret(path: &Path) -> Result<(), SetupError> {
    let secret: [u8; 32] = random()?;
    write(path, format!("{}\n", hex::encode(secret)).as_bytes(), true)
}

/// A new Ed25519 API key for `account` under `key_id`: the accounts file entry
/// with its public half, and the private half as a client key file holds it.
pub(crate) fn new_key_pair(
    account: u64,
    key_id: u64,
) -> Result<(AccountEntry, DevKey), SetupError> {
    let seed: [u8; 32] = random()?;
    let pair =
        Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| SetupError::Tls(e.to_string()))?;
    let entry = AccountEntry {
        id: account,
        max_sessions: None,
        keys: vec![ApiKeyEntry {
            id: key_id,
            public_key: hex::encode(pair.public_key().as_ref()),
        }],
    };
    let key = DevKey {
        account,
        key_id,
        seed: hex::encode(seed),
    };
    Ok((entry, key))
}

/// A token key ring with a fresh random 256-bit key, id 1: tokens die with the
/// process (tests and the load tester's in-process gateway).
pub fn fresh_token_keys() -> Result<TokenKeyRing, SetupError> {
    let secret: [u8; 32] = random()?;
    TokenKeyRing::new(1, &secret).map_err(|error| SetupError::Invalid(error.to_string()))
}

/// `N` bytes from the system's random generator.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], SetupError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SetupError::Tls("system random generator failed".into()))?;
    Ok(bytes)
}

/// The admin bearer token in `path`, generated there (random, private) if the file
/// does not exist and `generate` allows it.
pub fn admin_token(path: &Path, generate: bool) -> Result<String, SetupError> {
    if !path.exists() && generate {
        write_secret(path)?;
    }
    let token = fs::read_to_string(path).map_err(io_error(path))?;
    let token = token.trim();
    if token.len() < 16 {
        return Err(SetupError::Invalid(format!(
            "{}: an admin token must be at least 16 characters",
            path.display()
        )));
    }
    Ok(token.to_string())
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |error| SetupError::Io {
        path: path.to_path_buf(),
        error,
    }
}

pub(crate) fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), SetupError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    fs::write(path, contents).map_err(io_error(path))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_error(path))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

/// A certificate chain and its key.
pub type TlsIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A fresh self-signed certificate for `localhost`, `127.0.0.1` and `::1`.
pub fn self_signed() -> Result<TlsIdentity, SetupError> {
    generate_self_signed().map(|(identity, _pem)| identity)
}

/// A fresh self-signed identity and its certificate in PEM.
fn generate_self_signed() -> Result<(TlsIdentity, String), SetupError> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| SetupError::Tls(e.to_string()))?;
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let pem = certified.cert.pem();
    Ok(((vec![certified.cert.der().clone()], key.into()), pem))
}

/// The development certificate in `dir`, generated there first if missing.
pub fn dev_certificate(dir: &Path) -> Result<TlsIdentity, SetupError> {
    let cert_path = dir.join("cert.der");
    let key_path = dir.join("key.der");
    if cert_path.exists() && key_path.exists() {
        let cert = fs::read(&cert_path).map_err(io_error(&cert_path))?;
        let key = fs::read(&key_path).map_err(io_error(&key_path))?;
        let key = PrivateKeyDer::try_from(key)
            .map_err(|e| SetupError::Tls(format!("{}: {e}", key_path.display())))?;
        return Ok((vec![CertificateDer::from(cert)], key));
    }
    let ((certs, key), pem) = generate_self_signed()?;
    write(&cert_path, &certs[0], false)?;
    write(&dir.join("cert.pem"), pem.as_bytes(), false)?;
    write(&key_path, key.secret_der(), true)?;
    Ok((certs, key))
}

/// Certificate chain and key from PEM files.
pub fn pem_identity(cert: &Path, key: &Path) -> Result<TlsIdentity, SetupError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| SetupError::Tls(format!("tls.cert {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(SetupError::Tls(format!(
            "tls.cert {}: no certificate in it (a PEM \"CERTIFICATE\" block is needed)",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        let why = match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key in it (a PEM \"PRIVATE KEY\" block is needed; is this the certificate?)"
                    .to_string()
            }
            other => other.to_string(),
        };
        SetupError::Tls(format!("tls.key {}: {why}", key.display()))
    })?;
    check_usable(cert, &certs)?;
    Ok((certs, key))
}

/// Refuses a certificate every client would refuse whatever it trusts: one that is a
/// CA's (`basicConstraints CA:TRUE`, what a bare `openssl req -x509` makes), or one
/// expired or not yet valid. It is checked as a client that pins it checks it.
fn check_usable(path: &Path, certs: &[CertificateDer<'static>]) -> Result<(), SetupError> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::CertificateError;
    let refused = |why: &str| SetupError::Tls(format!("tls.cert {}: {why}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(certs[0].clone()).is_err() {
        // Not usable as its own anchor (a CA-issued chain): the clients take the CA.
        return Ok(());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .map_err(|e| refused(&e.to_string()))?;
    let name =
        rustls_pki_types::ServerName::try_from("localhost").map_err(|e| refused(&e.to_string()))?;
    let now = rustls_pki_types::UnixTime::now();
    let Err(rustls::Error::InvalidCertificate(error)) =
        verifier.verify_server_cert(&certs[0], &certs[1..], &name, &[], now)
    else {
        return Ok(());
    };
    match error {
        CertificateError::Other(other) if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            Err(refused(
                "it is a CA certificate (basicConstraints CA:TRUE), which clients refuse as a \
                 server's (CaUsedAsEndEntity). Make a server certificate: openssl req -x509 \
                 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out \
                 cert.pem -days 365 -subj /CN=gateway.example -addext \
                 \"subjectAltName=DNS:gateway.example\" -addext \"basicConstraints=critical,CA:FALSE\" \
                 -addext \"keyUsage=digitalSignature\" -addext \"extendedKeyUsage=serverAuth\", or \
                 have your CA issue one",
            ))
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => Err(refused(&format!(
            "it is not valid now ({error}): clients refuse it"
        ))),
        _ => Ok(()),
    }
}

/// One development API key, as written to `client-keys.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevKey {
    /// The account.
    pub account: u64,
    /// The API key id.
    pub key_id: u64,
    /// The Ed25519 seed, hex.
    pub seed: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct DevKeysFile {
    #[serde(rename = "key", default)]
    pub(crate) keys: Vec<DevKey>,
}

/// The demo accounts in `dir` (`accounts.toml`), generated there with their client
/// keys (`client-keys.toml`) first if missing. With fewer than `count` there, the
/// missing ones are added (those there keep their keys, so their clients keep
/// working); with more, all are kept.
pub fn demo_accounts(dir: &Path, count: u32) -> Result<AccountsFile, SetupError> {
    let accounts_path = dir.join("accounts.toml");
    let keys_path = dir.join("client-keys.toml");
    let (mut accounts, mut keys) = if accounts_path.exists() {
        let text = fs::read_to_string(&accounts_path).map_err(io_error(&accounts_path))?;
        let accounts = AccountsFile::parse(&text)?;
        if accounts.accounts.len() >= usize::try_from(count).unwrap_or(usize::MAX) {
            return Ok(accounts);
        }
        let text = fs::read_to_string(&keys_path).map_err(io_error(&keys_path))?;
        let keys: DevKeysFile = toml::from_str(&text)
            .map_err(|e| SetupError::Tls(format!("{}: {e}", keys_path.display())))?;
        info!(
            from = accounts.accounts.len(),
            to = count,
            "adding demo accounts (demo_accounts)"
        );
        (accounts, keys)
    } else {
        (AccountsFile::default(), DevKeysFile::default())
    };
    let first = accounts.accounts.iter().map(|a| a.id).max().unwrap_or(0) + 1;
    let missing = u64::from(count).saturating_sub(accounts.accounts.len() as u64);
    for index in first..first + missing {
        let (entry, key) = new_key_pair(index, 1_000 + index)?;
        accounts.accounts.push(entry);
        keys.keys.push(key);
    }
    let client_keys = toml::to_string_pretty(&keys).map_err(|e| SetupError::Tls(e.to_string()))?;
    let header = "# Development API keys of the demo accounts. Anyone holding this file can trade on them.\n";
    write(
        &keys_path,
        format!("{header}{client_keys}").as_bytes(),
        true,
    )?;
    write(&accounts_path, accounts.to_toml().as_bytes(), false)?;
    Ok(accounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a self-signed certificate made from `params` and its key; their paths.
    fn certificate_files(
        dir: &Path,
        name: &str,
        params: rcgen::CertificateParams,
    ) -> (PathBuf, PathBuf) {
        fs::create_dir_all(dir).expect("dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("certificate");
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        fs::write(&cert_path, cert.pem()).expect("write");
        fs::write(&key_path, key.serialize_pem()).expect("write");
        (cert_path, key_path)
    }

    #[test]
    fn a_certificate_clients_would_refuse_is_refused_at_start_saying_how_to_make_one() {
        let dir = std::env::temp_dir().join(format!("gateway-cert-test-{}", std::process::id()));
        let params =
            || rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let (cert, key) = certificate_files(&dir, "server", params());
        assert!(
            pem_identity(&cert, &key).is_ok(),
            "a server certificate is taken"
        );

        let mut ca = params();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let (cert, key) = certificate_files(&dir, "ca", ca);
        let refused = pem_identity(&cert, &key).expect_err("a CA certificate");
        let refused = refused.to_string();
        assert!(
            refused.contains("CA certificate") && refused.contains("openssl req"),
            "{refused}"
        );

        let mut expired = params();
        expired.not_before = rcgen::date_time_ymd(2001, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2002, 1, 1);
        let (cert, key) = certificate_files(&dir, "expired", expired);
        let refused = pem_identity(&cert, &key).expect_err("expired").to_string();
        assert!(refused.contains("not valid now"), "{refused}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn generated_files_are_reused_on_the_next_start() {
        let dir = std::env::temp_dir().join(format!("gateway-dev-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (certs, _) = dev_certificate(&dir).expect("generate");
        let (again, _) = dev_certificate(&dir).expect("reuse");
        assert_eq!(certs, again);
        let accounts = demo_accounts(&dir, 3).expect("generate");
        assert_eq!(accounts.accounts.len(), 3);
        assert_eq!(demo_accounts(&dir, 3).expect("reuse"), accounts);
        let keys: DevKeysFile =
            toml::from_str(&fs::read_to_string(dir.join("client-keys.toml")).expect("written"))
                .expect("parse");
        assert_eq!(keys.keys.len(), 3);
        // Asking for more adds them; those there keep their keys.
        let more = demo_accounts(&dir, 5).expect("extend");
        assert_eq!(more.accounts.len(), 5);
        assert_eq!(more.accounts[..3], accounts.accounts[..]);
        assert_eq!(more.accounts[4].id, 5);
        let more_keys: DevKeysFile =
            toml::from_str(&fs::read_to_string(dir.join("client-keys.toml")).expect("written"))
                .expect("parse");
        assert_eq!(more_keys.keys.len(), 5);
        assert_eq!(more_keys.keys[..3], keys.keys[..]);
        assert_eq!(demo_accounts(&dir, 2).expect("fewer"), more, "all are kept");
        let pem_certs = pem_identity(&dir.join("cert.pem"), &dir.join("cert.pem"));
        assert!(
            matches!(pem_certs, Err(SetupError::Tls(_))),
            "a certificate is not a key"
        );
        let parsed: Vec<_> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
            .expect("pem")
            .collect::<Result<_, _>>()
            .expect("certs");
        assert_eq!(parsed, certs, "cert.pem holds the same certificate");
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn the_dev_token_key_survives_a_restart_so_old_tokens_are_not_called_forged() {
        let dir = std::env::temp_dir().join(format!("gateway-dev-key-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let now = crate::time::Timestamp::from_millis(1_000);
        let later = crate::time::Timestamp::from_millis(1_000_000);
        let token = dev_token_key(&dir)
            .expect("generate")
            .mint(7, 1, 0, later, &[1; 16]);
        let restarted = dev_token_key(&dir).expect("reuse");
        assert_eq!(restarted.verify(&token.0, now).map(|c| c.session_id), Ok(7));
        fs::write(dir.join("token-key.hex"), "zz").expect("write");
        let error = dev_token_key(&dir).err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("token-key.hex") && e.contains("not hex")),
            "{error:?}"
        );
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
