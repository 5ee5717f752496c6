//! Commons wire protocol: identities, signed envelopes, work units, results and
//! commitments.
//!
//! This crate is pure: it performs no I/O, reads no clock and draws no
//! randomness. Time ([`UnixMillis`]) and nonces ([`Nonce`]) are arguments, so
//! the node, the coordinator and the simulator all drive exactly the same code.
//!
//! The layers, bottom up:
//! - [`ids`]: node ids (ed25519 public keys, printed as libp2p PeerIds), hashes,
//!   job and session ids, signatures.
//! - [`keys`]: a node's signing identity and its key-file format.
//! - [`codec`]: the one place where bytes are encoded and decoded, with an
//!   explicit byte limit per message kind, and length-prefixed stream framing.
//! - [`envelope`]: signed envelopes; verify first, then decode.
//! - [`messages`]: capacity adverts, work units, work results and their
//!   signed receipts, coalition charters and error replies.
//! - [`tensor`]: dtype, shape and little-endian bytes, content-addressed by blake3.
//! - [`replay`]: a bounded, time-windowed nonce cache.

pub mod blob;
pub mod bounded;
pub mod codec;
pub mod envelope;
pub mod ids;
pub mod keys;
pub mod messages;
pub mod replay;
pub mod tensor;
pub mod time;

pub use bounded::BoundedVec;
pub use envelope::{Envelope, MessageKind, OpenError, PROTOCOL_VERSION};
pub use ids::{CoalitionId, Hash, JobId, ModelId, NodeId, Nonce, SessionId, Signature, UnitId};
pub use keys::Identity;
pub use messages::Message;
pub use tensor::{DType, Tensor};
pub use time::UnixMillis;
