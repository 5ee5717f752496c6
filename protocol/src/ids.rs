//! Identifiers: node ids, content hashes, job and session ids, nonces and signatures.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Multihash code of the identity "hash" (the key itself).
const MULTIHASH_IDENTITY: u8 = 0x00;
/// Protobuf prefix of a libp2p `PublicKey { Type: Ed25519, Data: <32 bytes> }`.
const LIBP2P_ED25519_PROTOBUF_PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];

/// A node's identity: its ed25519 public key.
///
/// Displayed as the libp2p PeerId of the same key (`12D3KooW…`), so the id a
/// node prints is the id its peers see on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 32]);

/// A string that is not the PeerId of an ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseNodeIdError {
    /// Not base58btc.
    #[error("not base58: {0}")]
    Base58(String),
    /// Decoded to something other than an identity multihash of an ed25519 key.
    #[error("not the PeerId of an ed25519 key ({len} bytes)")]
    NotEd25519 {
        /// Decoded length.
        len: usize,
    },
}

impl NodeId {
    /// The bytes of the libp2p PeerId: an identity multihash of the protobuf-encoded key.
    #[must_use]
    pub fn peer_id_bytes(&self) -> [u8; 38] {
        let mut out = [0u8; 38];
        out[0] = MULTIHASH_IDENTITY;
        out[1] = 36;
        out[2..6].copy_from_slice(&LIBP2P_ED25519_PROTOBUF_PREFIX);
        out[6..].copy_from_slice(&self.0);
        out
    }

    /// Parses the bytes of a PeerId made from an ed25519 key.
    pub fn from_peer_id_bytes(bytes: &[u8]) -> Result<Self, ParseNodeIdError> {
        let not_ed25519 = ParseNodeIdError::NotEd25519 { len: bytes.len() };
        if bytes.len() != 38
            || bytes[0] != MULTIHASH_IDENTITY
            || bytes[1] != 36
            || bytes[2..6] != LIBP2P_ED25519_PROTOBUF_PREFIX
        {
            return Err(not_ed25519);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[6..]);
        Ok(Self(key))
    }

    /// The public key as lowercase hex.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.peer_id_bytes()).into_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = bs58::decode(s)
            .into_vec()
            .map_err(|e| ParseNodeIdError::Base58(e.to_string()))?;
        Self::from_peer_id_bytes(&bytes)
    }
}

/// A blake3 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// blake3 of `bytes`.
    #[must_use]
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// blake3 of `parts`, each preceded by its length, under a domain tag, so
    /// that no two different part lists hash the same.
    #[must_use]
    pub fn of_parts(domain: &str, parts: &[&[u8]]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(domain);
        for part in parts {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        Self(*hasher.finalize().as_bytes())
    }

    /// Lowercase hex.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", &self.to_hex()[..16])
    }
}

/// A hex string that is not a 32-byte hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a 64-digit hex hash: {0:?}")]
pub struct ParseHashError(pub String);

impl FromStr for Hash {
    type Err = ParseHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseHashError(s.to_owned()))?;
        Ok(Self(out))
    }
}

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub Hash);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.0.to_hex()[..16])
            }
        }

        impl FromStr for $name {
            type Err = ParseHashError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }
    };
}

hash_id!(
    /// A model: blake3 of the model file(s).
    ModelId
);
hash_id!(
    /// A work unit: blake3 of its canonical encoding.
    UnitId
);
hash_id!(
    /// A coalition: fixed at its first charter.
    CoalitionId
);

macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 16]);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), hex::encode(self.0))
            }
        }

        impl FromStr for $name {
            type Err = ParseHashError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 16];
                hex::decode_to_slice(s, &mut out).map_err(|_| ParseHashError(s.to_owned()))?;
                Ok(Self(out))
            }
        }
    };
}

random_id!(
    /// A job, chosen at random by its submitter.
    JobId
);
random_id!(
    /// An inference session (one KV cache per stage), chosen at random by the coordinator.
    SessionId
);
random_id!(
    /// A message nonce for replay protection, chosen at random by the sender.
    Nonce
);

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "serde_bytes")] pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_string_roundtrips() {
        let id = NodeId([7u8; 32]);
        let text = id.to_string();
        assert!(text.starts_with("12D3KooW"), "{text}");
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
    }

    #[test]
    fn bad_peer_ids_are_errors() {
        assert!(matches!(
            "0OIl".parse::<NodeId>(),
            Err(ParseNodeIdError::Base58(_))
        ));
        // A valid base58 string that is not an identity multihash of an ed25519 key.
        let sha256_style = bs58::encode(
            [0x12u8, 0x20]
                .iter()
                .chain([0u8; 32].iter())
                .copied()
                .collect::<Vec<_>>(),
        )
        .into_string();
        assert!(matches!(
            sha256_style.parse::<NodeId>(),
            Err(ParseNodeIdError::NotEd25519 { len: 34 })
        ));
    }

    #[test]
    fn hash_parts_are_length_delimited() {
        assert_ne!(
            Hash::of_parts("t", &[b"ab", b"c"]),
            Hash::of_parts("t", &[b"a", b"bc"])
        );
        assert_ne!(Hash::of_parts("t", &[b"ab"]), Hash::of_parts("u", &[b"ab"]));
    }

    #[test]
    fn hash_hex_roundtrips() {
        let h = Hash::of(b"commons");
        assert_eq!(h.to_string().parse::<Hash>().unwrap(), h);
        assert!("xyz".parse::<Hash>().is_err());
    }
}
