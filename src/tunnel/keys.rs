//! SSH keys for the agents: a pod's host key and a machine's identity key, loaded from an
//! OpenSSH key file, created there when it is missing, or generated for one run.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};

pub type Result<T, E = KeyError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: russh::keys::Error,
    },
    #[error("cannot generate an ed25519 key")]
    Generate(#[source] russh::keys::ssh_key::Error),
    #[error("cannot write the new key to {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the key in OpenSSH form")]
    Encode(#[source] russh::keys::ssh_key::Error),
    #[error("not an OpenSSH public key (`<type> <base64> [comment]`)")]
    ParsePublic(#[source] russh::keys::ssh_key::Error),
}

/// The key in `path`, created there (mode 0600) if the file does not exist; without a path, a
/// new key for this run only.
pub fn load_or_create(path: Option<&Path>) -> Result<PrivateKey> {
    let Some(path) = path else {
        return generate();
    };
    if path.exists() {
        return russh::keys::load_secret_key(path, None).map_err(|source| KeyError::Load {
            path: path.to_owned(),
            source,
        });
    }
    let key = generate()?;
    let text = key.to_openssh(LineEnding::LF).map_err(KeyError::Encode)?;
    let write_error = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600) // a private key: readable by its owner only
        .open(path)
        .map_err(write_error)?;
    file.write_all(text.as_bytes()).map_err(write_error)?;
    tracing::info!(path = %path.display(), fingerprint = %fingerprint(key.public_key()), "created a new SSH key");
    Ok(key)
}

/// A new ed25519 key.
pub fn generate() -> Result<PrivateKey> {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(KeyError::Generate)
}

/// `SHA256:<base64>`, as `ssh-keygen -l` and OpenSSH's host-key prompts print it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The one-line OpenSSH form without a comment, which meeting points record.
pub fn canonical(key: &PublicKey) -> Result<String> {
    let mut key = key.clone();
    key.set_comment("");
    key.to_openssh().map_err(KeyError::Encode)
}

/// Parses a one-line OpenSSH public key (`ssh-ed25519 AAAA... comment`).
pub fn parse_public(text: &str) -> Result<PublicKey> {
    PublicKey::from_openssh(text.trim()).map_err(KeyError::ParsePublic)
}

/// Whether two public keys are the same key, whatever their comments.
pub fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_is_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host_key");
        let created = load_or_create(Some(&path)).unwrap();
        let loaded = load_or_create(Some(&path)).unwrap();
        assert!(same_key(created.public_key(), loaded.public_key()));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn canonical_form_drops_the_comment_and_parses_back() {
        let key = generate().unwrap();
        let text = canonical(key.public_key()).unwrap();
        assert!(text.starts_with("ssh-ed25519 "));
        assert_eq!(text.split(' ').count(), 2);
        let parsed = parse_public(&format!("{text} machine@lab")).unwrap();
        assert!(same_key(&parsed, key.public_key()));
        assert!(fingerprint(&parsed).starts_with("SHA256:"));
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 AAAA",
            "hello world",
            "ssh-ed25519 !!!",
        ] {
            assert!(parse_public(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_garbage_key_file_is_a_load_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            load_or_create(Some(&path)),
            Err(KeyError::Load { .. })
        ));
    }
}
