//! A peer's identity: its iroh secret key, kept in its data dir.
//!
//! Every Outpost peer (cloud bridge or edge node) is known to the others by
//! the public half of this key only. The key is created on first start and
//! read on every later one; a key file that exists but cannot be read is an
//! error, never a reason to make a new identity silently.

use std::io::Write;
use std::path::{Path, PathBuf};

use iroh::SecretKey;

/// The file name of the secret key inside a data dir.
pub const KEY_FILE: &str = "peer.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The data dir or the key file could not be read or written.
    #[error("cannot access the peer key {path}: {source}")]
    Io {
        /// The file or dir involved.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The key file exists but does not hold a key.
    #[error(
        "the peer key {path} is corrupt ({len} bytes, expected 32); restore it from a backup, or remove it to give this peer a new identity (it must then be admitted again)"
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

/// Loads the secret key from `data_dir/peer.key`, creating the dir and a new
/// key (file mode 0600) when there is none.
pub fn load_or_create(data_dir: &Path) -> Result<SecretKey, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes: [u8; 32] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| IdentityError::Corrupt {
                        path: path.clone(),
                        len: bytes.len(),
                    })?;
            Ok(SecretKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(|source| IdentityError::Io {
                path: data_dir.to_path_buf(),
                source,
            })?;
            let key = SecretKey::generate();
            let tmp = path.with_extension("key.tmp");
            let mut file = open_private(&tmp).map_err(io)?;
            file.write_all(&key.to_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_survives_restart_and_corruption_is_reported() {
        let dir = std::env::temp_dir().join(format!("outpost-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = load_or_create(&dir).expect("create");
        let again = load_or_create(&dir).expect("load");
        assert_eq!(first.public(), again.public());

        std::fs::write(dir.join(KEY_FILE), b"short").expect("write");
        let err = load_or_create(&dir).expect_err("corrupt key");
        assert!(
            matches!(err, IdentityError::Corrupt { len: 5, .. }),
            "{err}"
        );
        // The corrupt file is left for the operator, not replaced.
        assert_eq!(std::fs::read(dir.join(KEY_FILE)).expect("read"), b"short");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
