//! A node's signing identity and the text format of its key file.
//!
//! One ed25519 keypair per node. The same 32-byte secret gives both the
//! ed25519-dalek signing key used for envelopes and the libp2p identity
//! (`Keypair::ed25519_from_bytes`), so a node's [`NodeId`] and its PeerId are
//! one and the same.
//!
//! The key file is two lines of text: a header naming the format and the secret
//! in hex. Reading and writing the file (and its 0600 permissions) is the
//! node's business; this module only turns bytes into an [`Identity`] and back.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::ids::{NodeId, Signature};

/// First line of a key file.
pub const KEY_FILE_HEADER: &str = "commons-ed25519-secret-key-v1";

/// A node's signing key.
pub struct Identity {
    signing: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id())
            .finish_non_exhaustive()
    }
}

/// Why a key file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file does not start with [`KEY_FILE_HEADER`].
    #[error("not a commons key file (expected a first line of {KEY_FILE_HEADER:?})")]
    NotAKeyFile,
    /// The secret line is not hex.
    #[error("the secret key is not hex")]
    NotHex,
    /// The secret has the wrong length.
    #[error("the secret key is {len} bytes, expected 32")]
    WrongLength {
        /// Bytes found.
        len: usize,
    },
    /// Something follows the secret line.
    #[error("unexpected content after the secret key")]
    TrailingContent,
}

/// A signature that does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The signer's public key is not a valid ed25519 point.
    #[error("the signer's public key is not a valid ed25519 key")]
    BadPublicKey,
    /// The signature does not match the message and key.
    #[error("signature does not verify")]
    BadSignature,
}

impl Identity {
    /// The identity whose secret is `secret` (32 bytes, e.g. from the OS RNG).
    #[must_use]
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = Zeroizing::new(secret);
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// The secret, to persist or to derive the libp2p keypair from.
    #[must_use]
    pub fn secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// This node's id (its public key).
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        NodeId(self.signing.verifying_key().to_bytes())
    }

    /// Signs `message`.
    #[must_use]
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.signing.sign(message).to_bytes())
    }

    /// The key file contents for this identity.
    #[must_use]
    pub fn to_key_file(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{KEY_FILE_HEADER}\n{}\n",
            hex::encode(*self.secret())
        ))
    }

    /// Parses key file contents.
    pub fn from_key_file(contents: &[u8]) -> Result<Self, KeyFileError> {
        let text = std::str::from_utf8(contents).map_err(|_| KeyFileError::NotAKeyFile)?;
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(KEY_FILE_HEADER) {
            return Err(KeyFileError::NotAKeyFile);
        }
        let secret_hex = Zeroizing::new(lines.next().unwrap_or("").trim().to_owned());
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(KeyFileError::TrailingContent);
        }
        let bytes =
            Zeroizing::new(hex::decode(secret_hex.as_bytes()).map_err(|_| KeyFileError::NotHex)?);
        let secret: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyFileError::WrongLength { len: bytes.len() })?;
        Ok(Self::from_secret(secret))
    }
}

/// Checks `signature` over `message` by `signer`, in ed25519's strict mode
/// (no malleable or small-order signatures).
pub fn verify(signer: &NodeId, message: &[u8], signature: &Signature) -> Result<(), VerifyError> {
    let key = VerifyingKey::from_bytes(&signer.0).map_err(|_| VerifyError::BadPublicKey)?;
    let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
    key.verify_strict(message, &sig)
        .map_err(|_| VerifyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_roundtrips_and_id_is_stable() {
        let id = Identity::from_secret([42u8; 32]);
        let file = id.to_key_file();
        let back = Identity::from_key_file(file.as_bytes()).unwrap();
        assert_eq!(back.node_id(), id.node_id());
        assert_eq!(Identity::from_secret([42u8; 32]).node_id(), id.node_id());
    }

    #[test]
    fn bad_key_files_have_their_own_errors() {
        assert_eq!(
            Identity::from_key_file(b"").unwrap_err(),
            KeyFileError::NotAKeyFile
        );
        assert_eq!(
            Identity::from_key_file(&[0xff, 0xfe, 0x00]).unwrap_err(),
            KeyFileError::NotAKeyFile
        );
        let short = format!("{KEY_FILE_HEADER}\nabcd\n");
        assert_eq!(
            Identity::from_key_file(short.as_bytes()).unwrap_err(),
            KeyFileError::WrongLength { len: 2 }
        );
        let not_hex = format!("{KEY_FILE_HEADER}\nzz\n");
        assert_eq!(
            Identity::from_key_file(not_hex.as_bytes()).unwrap_err(),
            KeyFileError::NotHex
        );
        let trailing = format!("{KEY_FILE_HEADER}\n{}\nmore\n", "00".repeat(32));
        assert_eq!(
            Identity::from_key_file(trailing.as_bytes()).unwrap_err(),
            KeyFileError::TrailingContent
        );
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let id = Identity::from_secret([1u8; 32]);
        let sig = id.sign(b"hello");
        verify(&id.node_id(), b"hello", &sig).unwrap();
        assert_eq!(
            verify(&id.node_id(), b"hellO", &sig),
            Err(VerifyError::BadSignature)
        );
        let other = Identity::from_secret([2u8; 32]);
        assert_eq!(
            verify(&other.node_id(), b"hello", &sig),
            Err(VerifyError::BadSignature)
        );
    }
}
