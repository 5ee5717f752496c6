//! The node's key file on disk: created with 0600 permissions, refused when
//! anyone but its owner could read it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use commons_protocol::Identity;
use commons_protocol::keys::KeyFileError;

/// A key file that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyStoreError {
    /// The file could not be read.
    #[error("cannot read key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("cannot write key file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may access the file.
    #[error(
        "key file {path} has permissions {mode:04o}; it must be readable by its owner only (chmod 600 {path})"
    )]
    LoosePermissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The file exists and overwriting was not asked for.
    #[error(
        "key file {path} already exists; pass --force to replace it (the node's identity changes)"
    )]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The contents are not a key.
    #[error("key file {path} is invalid")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: KeyFileError,
    },
}

/// Generates a fresh identity from the operating system's random source.
pub fn generate() -> Result<Identity, getrandom::Error> {
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(secret.as_mut())?;
    Ok(Identity::from_secret(*secret))
}

/// Reads the identity at `path`, refusing files others can access.
pub fn load(path: &Path) -> Result<Identity, KeyStoreError> {
    let read_err = |source| KeyStoreError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyStoreError::LoosePermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    if meta.len() > 4096 {
        return Err(KeyStoreError::Invalid {
            path: path.to_owned(),
            source: KeyFileError::NotAKeyFile,
        });
    }
    let bytes = zeroize::Zeroizing::new(fs::read(path).map_err(read_err)?);
    Identity::from_key_file(&bytes).map_err(|source| KeyStoreError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Writes `identity` to `path` with 0600 permissions. An existing file is
/// replaced only with `overwrite`, atomically (write beside, then rename).
pub fn store(identity: &Identity, path: &Path, overwrite: bool) -> Result<(), KeyStoreError> {
    let write_err = |source| KeyStoreError::Write {
        path: path.to_owned(),
        source,
    };
    if path.exists() && !overwrite {
        return Err(KeyStoreError::Exists {
            path: path.to_owned(),
        });
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(write_err)?;
    }
    // A name of our own: two processes creating the same key file at once
    // must not write into each other's temporary file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("key.tmp.{}.{n}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(write_err)?;
    file.write_all(identity.to_key_file().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    if overwrite {
        return fs::rename(&tmp, path).map_err(write_err);
    }
    // Without overwrite, a link refuses to replace a key another process just wrote.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(KeyStoreError::Exists {
            path: path.to_owned(),
        }),
        Err(e) => Err(write_err(e)),
    }
}

/// Loads the identity at `path`, creating one there first if there is none.
pub fn load_or_create(path: &Path) -> anyhow::Result<(Identity, bool)> {
    if path.exists() {
        return Ok((load(path)?, false));
    }
    let identity = generate().map_err(|e| anyhow::anyhow!("no randomness for a new key: {e}"))?;
    match store(&identity, path, false) {
        Ok(()) => Ok((identity, true)),
        // Another process created it first: use theirs.
        Err(KeyStoreError::Exists { .. }) => Ok((load(path)?, false)),
        Err(e) => Err(e.into()),
    }
}

/// The libp2p keypair of `identity`: the same secret, so the same PeerId.
pub fn libp2p_keypair(identity: &Identity) -> libp2p::identity::Keypair {
    let mut secret = identity.secret();
    // `ed25519_from_bytes` zeroes the buffer it is given; it cannot fail on 32 bytes.
    libp2p::identity::Keypair::ed25519_from_bytes(secret.as_mut())
        .expect("32 bytes are always an ed25519 secret")
}

#[cfg(test)]
mod tests {
    #[test]
    fn concurrent_first_use_gives_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("node.key");
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        super::load_or_create(&path)
                            .unwrap()
                            .0
                            .node_id()
                            .to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    }

    use super::*;

    #[test]
    fn node_id_is_the_libp2p_peer_id() {
        for seed in 0u8..8 {
            let identity = Identity::from_secret([seed; 32]);
            let peer_id = libp2p_keypair(&identity).public().to_peer_id();
            assert_eq!(peer_id.to_string(), identity.node_id().to_string());
            assert_eq!(peer_id.to_bytes(), identity.node_id().peer_id_bytes());
        }
    }

    #[test]
    fn store_then_load_gives_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let identity = generate().unwrap();
        store(&identity, &path, false).unwrap();
        assert_eq!(load(&path).unwrap().node_id(), identity.node_id());
        assert!(matches!(
            store(&identity, &path, false),
            Err(KeyStoreError::Exists { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn loose_permissions_and_garbage_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        store(&generate().unwrap(), &path, false).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load(&path),
            Err(KeyStoreError::LoosePermissions { mode: 0o644, .. })
        ));
        fs::write(&path, b"garbage").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load(&path),
            Err(KeyStoreError::Invalid {
                source: KeyFileError::NotAKeyFile,
                ..
            })
        ));
    }
}

/// Nonces for what this process signs: a random 8-byte prefix chosen once,
/// then a counter, so that no two of its messages share one (the replay key
/// is the signer and the nonce).
#[derive(Debug, Clone)]
pub struct Nonces {
    seed: [u8; 8],
    counter: u64,
}

impl Nonces {
    /// Nonces under `seed`.
    #[must_use]
    pub fn new(seed: [u8; 8]) -> Self {
        Self { seed, counter: 0 }
    }

    /// Nonces under a random seed.
    ///
    /// # Errors
    /// When the system has no randomness.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed)?;
        Ok(Self::new(seed))
    }

    /// The next nonce.
    pub fn take(&mut self) -> commons_protocol::Nonce {
        self.counter += 1;
        let mut n = [0u8; 16];
        n[..8].copy_from_slice(&self.seed);
        n[8..].copy_from_slice(&self.counter.to_le_bytes());
        commons_protocol::Nonce(n)
    }
}
