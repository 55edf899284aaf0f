//! Production credentials, made by `gateway keys ...`: a firm's API key pair, the
//! session token key and the admin bearer token. Each secret goes to a new file
//! readable by its owner only (0600); an existing file is never overwritten (a new
//! token key would void every session token, a new API key lock a firm out).
//!
//! A firm's private key file has the format the client library reads
//! (`Credentials::load_dev_keys`: `[[key]]` tables of `account`, `key_id` and the
//! Ed25519 `seed` in hex); the public half goes into the gateway's accounts file.

use std::path::Path;

use crate::auth::AccountsFile;
use crate::dev::{new_key_pair, write, write_secret, DevKeysFile, SetupError};

/// A new API key pair for `account` under `key_id`: its private key written to
/// `private_path`, and the accounts file entry that lets it log in.
pub fn new_api_key(
    account: u64,
    key_id: u64,
    private_path: &Path,
) -> Result<AccountsFile, SetupError> {
    refuse_existing(private_path)?;
    let (entry, key) = new_key_pair(account, key_id)?;
    let private = DevKeysFile { keys: vec![key] };
    let text = toml::to_string_pretty(&private).map_err(|e| SetupError::Invalid(e.to_string()))?;
    let header = format!(
        "# API key {key_id} of account {account}: the firm's private key. Anyone holding this \
         file can trade as the account; hand it over privately, then delete this copy.\n"
    );
    write(private_path, format!("{header}{text}").as_bytes(), true)?;
    Ok(AccountsFile {
        accounts: vec![entry],
    })
}

/// A new secret of 32 random bytes, in hex, written to `path`: the session token
/// key (`token_key_file`) or the admin bearer token (`admin.token_file`).
pub fn new_secret(path: &Path) -> Result<(), SetupError> {
    refuse_existing(path)?;
    write_secret(path)
}

fn refuse_existing(path: &Path) -> Result<(), SetupError> {
    if path.exists() {
        return Err(SetupError::Invalid(format!(
            "{} exists: not overwritten (move it away first if you mean to replace it)",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("gateway-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("written")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn an_api_key_s_private_half_is_private_and_its_public_half_an_accounts_entry() {
        let dir = dir("api");
        let path = dir.join("firm.toml");
        let entry = new_api_key(7, 7001, &path).expect("made");
        let accounts = AccountsFile::parse(&entry.to_toml()).expect("an accounts file");
        assert_eq!(accounts.accounts[0].id, 7);
        assert_eq!(accounts.accounts[0].keys[0].id, 7001);
        let private: DevKeysFile =
            toml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("parse");
        let mut seed = [0u8; 32];
        hex::decode_to_slice(&private.keys[0].seed, &mut seed).expect("hex seed");
        let public = Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed");
        assert_eq!(
            hex::encode(public.public_key().as_ref()),
            accounts.accounts[0].keys[0].public_key
        );
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        let again = new_api_key(7, 7001, &path).expect_err("not overwritten");
        assert!(again.to_string().contains("not overwritten"), "{again}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_secret_is_32_random_bytes_in_a_private_file_never_overwritten() {
        let dir = dir("secret");
        let (one, two) = (dir.join("token-key.hex"), dir.join("admin-token"));
        new_secret(&one).expect("made");
        new_secret(&two).expect("made");
        let read = |path: &Path| std::fs::read_to_string(path).expect("read");
        assert_eq!(hex::decode(read(&one).trim()).expect("hex").len(), 32);
        assert_ne!(read(&one), read(&two));
        #[cfg(unix)]
        assert_eq!(mode(&one), 0o600);
        assert!(
            crate::dev::token_key_file(&one).is_ok(),
            "a token key the gateway reads"
        );
        assert!(new_secret(&one).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
