//! Signed envelopes: every message between nodes travels in one.
//!
//! Wire layout (fixed, little-endian), then the payload to the end of the frame:
//!
//! ```text
//! version: u16 | kind: u16 | signer: [u8; 32] | signature: [u8; 64] | payload …
//! ```
//!
//! The signature covers `DOMAIN_TAG ‖ version ‖ kind ‖ payload`, so a
//! signature made for one kind or version can never be replayed as another, nor
//! confused with a signature made for anything else with the same key.
//!
//! Opening an envelope checks, in order: the version is known, the kind is
//! known and the one expected, the payload is within the kind's size limit, the
//! signature verifies — and only then is the payload decoded (exactly, with no
//! trailing bytes), checked to name its signer, and checked to be within its
//! validity window. Replay protection is stateful and lives in
//! [`replay`](crate::replay).

use crate::codec::{self, DecodeError, EncodeError};
use crate::ids::{NodeId, Signature};
use crate::keys::{self, Identity, VerifyError};
use crate::messages::Message;
use crate::time::UnixMillis;

/// Protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u16 = 1;
/// Prefix of every signed byte string, binding signatures to this protocol.
pub const DOMAIN_TAG: &[u8] = b"commons/envelope";
/// Bytes before the payload.
pub const HEADER_LEN: usize = 2 + 2 + 32 + 64;
/// How far in the future a message's issue time may lie, for clock skew.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

/// What an envelope carries. The numbers are part of the protocol and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
#[non_exhaustive]
pub enum MessageKind {
    /// [`CapacityAdvert`](crate::messages::CapacityAdvert).
    CapacityAdvert = 1,
    /// [`WorkUnit`](crate::messages::WorkUnit).
    WorkUnit = 2,
    /// [`WorkResult`](crate::messages::WorkResult).
    WorkResult = 3,
    /// [`CoalitionCharter`](crate::messages::CoalitionCharter).
    CoalitionCharter = 4,
    /// [`ErrorReply`](crate::messages::ErrorReply).
    ErrorReply = 5,
    /// [`Leave`](crate::messages::Leave).
    Leave = 6,
    /// [`JobRequest`](crate::messages::JobRequest).
    JobRequest = 7,
    /// [`JobReport`](crate::messages::JobReport).
    JobReport = 8,
}

impl MessageKind {
    /// The kind with wire number `n`.
    #[must_use]
    pub fn from_u16(n: u16) -> Option<Self> {
        Some(match n {
            1 => Self::CapacityAdvert,
            2 => Self::WorkUnit,
            3 => Self::WorkResult,
            4 => Self::CoalitionCharter,
            5 => Self::ErrorReply,
            6 => Self::Leave,
            7 => Self::JobRequest,
            8 => Self::JobReport,
            _ => return None,
        })
    }

    /// Most payload bytes for this kind.
    #[must_use]
    pub fn limit(self) -> usize {
        use crate::messages::{
            CapacityAdvert, CoalitionCharter, ErrorReply, JobReport, JobRequest, Leave, WorkResult,
            WorkUnit,
        };
        match self {
            Self::CapacityAdvert => CapacityAdvert::LIMIT.bytes(),
            Self::WorkUnit => WorkUnit::LIMIT.bytes(),
            Self::WorkResult => WorkResult::LIMIT.bytes(),
            Self::CoalitionCharter => CoalitionCharter::LIMIT.bytes(),
            Self::ErrorReply => ErrorReply::LIMIT.bytes(),
            Self::Leave => Leave::LIMIT.bytes(),
            Self::JobRequest => JobRequest::LIMIT.bytes(),
            Self::JobReport => JobReport::LIMIT.bytes(),
        }
    }

    /// Most bytes of an envelope of this kind, header included.
    #[must_use]
    pub fn envelope_limit(self) -> usize {
        HEADER_LEN + self.limit()
    }
}

/// Why an envelope was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Shorter than the fixed header.
    #[error("envelope of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// A protocol version this node does not speak.
    #[error("unknown protocol version {version} (this node speaks {PROTOCOL_VERSION})")]
    UnknownVersion {
        /// Version received.
        version: u16,
    },
    /// A kind number this version does not know.
    #[error("unknown message kind {kind}")]
    UnknownKind {
        /// Kind number received.
        kind: u16,
    },
    /// A known kind, but not the one expected here.
    #[error("expected a {expected:?} envelope, got {actual:?}")]
    WrongKind {
        /// Kind expected.
        expected: MessageKind,
        /// Kind received.
        actual: MessageKind,
    },
    /// The payload exceeds the limit of its kind.
    #[error("{kind:?} payload of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The kind.
        kind: MessageKind,
        /// Payload bytes.
        len: usize,
        /// The kind's limit.
        limit: usize,
    },
    /// The signature does not verify against the signer's key.
    #[error("bad signature from {signer}")]
    BadSignature {
        /// Claimed signer.
        signer: NodeId,
        /// Why.
        #[source]
        source: VerifyError,
    },
    /// The payload was decoded but bytes were left after it.
    #[error("{extra} trailing bytes after the payload")]
    TrailingBytes {
        /// Bytes left.
        extra: usize,
    },
    /// The payload is not a valid encoding of its kind.
    #[error("malformed payload")]
    Malformed(#[source] DecodeError),
    /// The message names someone other than the signer.
    #[error("{signer} may not sign this message")]
    SignerMismatch {
        /// Who signed.
        signer: NodeId,
    },
    /// The validity window has passed.
    #[error("expired at {expires_at} (now {now})")]
    Expired {
        /// End of validity.
        expires_at: UnixMillis,
        /// The time it was opened.
        now: UnixMillis,
    },
    /// Issued further in the future than clock skew explains.
    #[error("issued at {issued_at}, in the future (now {now})")]
    NotYetValid {
        /// Claimed issue time.
        issued_at: UnixMillis,
        /// The time it was opened.
        now: UnixMillis,
    },
}

/// A message could not be sealed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// Encoding failed.
    #[error("could not encode the payload")]
    Encode(#[source] EncodeError),
    /// The encoded message exceeds its kind's limit.
    #[error("{kind:?} payload of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The kind.
        kind: MessageKind,
        /// Payload bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The sealing key is not one the message allows.
    #[error("{signer} may not sign this message")]
    SignerMismatch {
        /// The key.
        signer: NodeId,
    },
}

/// A signed message whose signature has not been checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    version: u16,
    kind: MessageKind,
    signer: NodeId,
    signature: Signature,
    payload: Vec<u8>,
}

fn signed_bytes(version: u16, kind: MessageKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN_TAG.len() + 4 + payload.len());
    out.extend_from_slice(DOMAIN_TAG);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Encodes `message` and signs it with `identity`.
    pub fn seal<M: Message>(identity: &Identity, message: &M) -> Result<Self, SealError> {
        let signer = identity.node_id();
        if !message.signed_by(&signer) {
            return Err(SealError::SignerMismatch { signer });
        }
        let payload = codec::encode(message).map_err(SealError::Encode)?;
        if payload.len() > M::LIMIT.bytes() {
            return Err(SealError::TooLarge {
                kind: M::KIND,
                len: payload.len(),
                limit: M::LIMIT.bytes(),
            });
        }
        let signature = identity.sign(&signed_bytes(PROTOCOL_VERSION, M::KIND, &payload));
        Ok(Self {
            version: PROTOCOL_VERSION,
            kind: M::KIND,
            signer,
            signature,
            payload,
        })
    }

    /// Signs already-encoded payload bytes as an envelope of `kind`. Prefer
    /// [`Envelope::seal`]; this exists for relays, tests and fuzzing, and checks
    /// nothing about the payload but its size.
    pub fn seal_payload(
        identity: &Identity,
        kind: MessageKind,
        payload: Vec<u8>,
    ) -> Result<Self, SealError> {
        if payload.len() > kind.limit() {
            return Err(SealError::TooLarge {
                kind,
                len: payload.len(),
                limit: kind.limit(),
            });
        }
        let signature = identity.sign(&signed_bytes(PROTOCOL_VERSION, kind, &payload));
        Ok(Self {
            version: PROTOCOL_VERSION,
            kind,
            signer: identity.node_id(),
            signature,
            payload,
        })
    }

    /// The payload bytes.
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The wire bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.kind as u16).to_le_bytes());
        out.extend_from_slice(&self.signer.0);
        out.extend_from_slice(&self.signature.0);
        out.extend_from_slice(&self.payload);
        out
    }

    /// Parses the header of wire bytes and checks version, kind and size; the
    /// signature is checked by [`Envelope::open`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OpenError> {
        if bytes.len() < HEADER_LEN {
            return Err(OpenError::Truncated { len: bytes.len() });
        }
        let (header, payload) = bytes.split_at(HEADER_LEN);
        let version = u16::from_le_bytes([header[0], header[1]]);
        if version != PROTOCOL_VERSION {
            return Err(OpenError::UnknownVersion { version });
        }
        let kind_n = u16::from_le_bytes([header[2], header[3]]);
        let kind = MessageKind::from_u16(kind_n).ok_or(OpenError::UnknownKind { kind: kind_n })?;
        if payload.len() > kind.limit() {
            return Err(OpenError::TooLarge {
                kind,
                len: payload.len(),
                limit: kind.limit(),
            });
        }
        let mut signer = [0u8; 32];
        signer.copy_from_slice(&header[4..36]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&header[36..100]);
        Ok(Self {
            version,
            kind,
            signer: NodeId(signer),
            signature: Signature(signature),
            payload: payload.to_vec(),
        })
    }

    /// The kind carried.
    #[must_use]
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The claimed signer (verified by [`Envelope::open`]).
    #[must_use]
    pub fn signer(&self) -> NodeId {
        self.signer
    }

    /// Verifies the signature, then decodes and checks the message at time `now`.
    pub fn open<M: Message>(&self, now: UnixMillis) -> Result<M, OpenError> {
        if self.kind != M::KIND {
            return Err(OpenError::WrongKind {
                expected: M::KIND,
                actual: self.kind,
            });
        }
        if self.payload.len() > M::LIMIT.bytes() {
            return Err(OpenError::TooLarge {
                kind: self.kind,
                len: self.payload.len(),
                limit: M::LIMIT.bytes(),
            });
        }
        keys::verify(
            &self.signer,
            &signed_bytes(self.version, self.kind, &self.payload),
            &self.signature,
        )
        .map_err(|source| OpenError::BadSignature {
            signer: self.signer,
            source,
        })?;
        let message: M = codec::decode(&self.payload, M::LIMIT).map_err(|e| match e {
            DecodeError::TrailingBytes { extra } => OpenError::TrailingBytes { extra },
            DecodeError::TooLarge { len, limit } => OpenError::TooLarge {
                kind: self.kind,
                len,
                limit,
            },
            other => OpenError::Malformed(other),
        })?;
        if !message.signed_by(&self.signer) {
            return Err(OpenError::SignerMismatch {
                signer: self.signer,
            });
        }
        let (issued_at, expires_at) = message.validity();
        if now >= expires_at || expires_at < issued_at {
            return Err(OpenError::Expired { expires_at, now });
        }
        if issued_at > now.plus_millis(MAX_CLOCK_SKEW_MS) {
            return Err(OpenError::NotYetValid { issued_at, now });
        }
        Ok(message)
    }

    /// Verifies and decodes a message kept for the record, as of its own
    /// issue time: a signed report stays evidence after it expires.
    pub fn open_archived<M: Message>(&self) -> Result<M, OpenError> {
        let issued_at =
            codec::decode::<M>(&self.payload, M::LIMIT).map_or(UnixMillis(0), |m| m.validity().0);
        self.open(issued_at)
    }

    /// Parses, verifies and decodes wire bytes in one step.
    pub fn open_bytes<M: Message>(bytes: &[u8], now: UnixMillis) -> Result<M, OpenError> {
        Self::from_bytes(bytes)?.open(now)
    }
}
