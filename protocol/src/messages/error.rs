use serde::{Deserialize, Serialize};

use super::Message;
use crate::codec::Limit;
use crate::envelope::MessageKind;
use crate::ids::{NodeId, UnitId};
use crate::time::UnixMillis;

/// A stable numeric error code. Codes never change meaning; unknown codes from
/// newer peers are carried as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The request could not be decoded or is invalid.
    pub const BAD_REQUEST: Self = Self(1);
    /// The signer is not allowed to ask for this (e.g. not in a served coalition).
    pub const UNAUTHORIZED: Self = Self(2);
    /// The message's validity window has passed.
    pub const EXPIRED: Self = Self(3);
    /// The nonce was seen before.
    pub const REPLAYED: Self = Self(4);
    /// The node does not hold the model or layer range asked for.
    pub const MODEL_NOT_HELD: Self = Self(5);
    /// The session is unknown or was evicted.
    pub const UNKNOWN_SESSION: Self = Self(6);
    /// The node is at capacity; try another.
    pub const OVERLOADED: Self = Self(7);
    /// The input exceeds a limit (context length, tensor size).
    pub const TOO_LARGE: Self = Self(8);
    /// The node is shutting down.
    pub const SHUTTING_DOWN: Self = Self(9);
    /// The job is unknown.
    pub const UNKNOWN_JOB: Self = Self(10);
    /// No node (or no usable chain of nodes) serves what was asked.
    pub const NO_ROUTE: Self = Self(11);
    /// The work did not finish in time.
    pub const TIMEOUT: Self = Self(12);
    /// The coordinator restarted and could not resume the job.
    pub const LOST: Self = Self(13);
    /// A unit issued later for the same session and an earlier (or the
    /// same) position took this one's place.
    pub const SUPERSEDED: Self = Self(14);
    /// A unit's input, to come from another node, did not come in time.
    pub const NO_INPUT: Self = Self(15);
    /// The work failed on the node.
    pub const INTERNAL: Self = Self(100);

    /// A short stable name for the code, `unknown` for codes this version does not know.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::BAD_REQUEST => "bad_request",
            Self::UNAUTHORIZED => "unauthorized",
            Self::EXPIRED => "expired",
            Self::REPLAYED => "replayed",
            Self::MODEL_NOT_HELD => "model_not_held",
            Self::UNKNOWN_SESSION => "unknown_session",
            Self::OVERLOADED => "overloaded",
            Self::TOO_LARGE => "too_large",
            Self::SHUTTING_DOWN => "shutting_down",
            Self::UNKNOWN_JOB => "unknown_job",
            Self::NO_ROUTE => "no_route",
            Self::TIMEOUT => "timeout",
            Self::LOST => "lost",
            Self::SUPERSEDED => "superseded",
            Self::NO_INPUT => "no_input",
            Self::INTERNAL => "internal",
            _ => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// A refusal or failure, answered in place of a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
    /// The unit this answers, when there is one.
    pub regarding: Option<UnitId>,
    /// The node answering.
    pub responder: NodeId,
    /// Issue time.
    pub issued_at: UnixMillis,
    /// After this instant the reply means nothing.
    pub expires_at: UnixMillis,
}

impl Message for ErrorReply {
    const KIND: MessageKind = MessageKind::ErrorReply;
    const LIMIT: Limit = Limit::K4;

    fn signed_by(&self, signer: &NodeId) -> bool {
        &self.responder == signer
    }

    fn validity(&self) -> (UnixMillis, UnixMillis) {
        (self.issued_at, self.expires_at)
    }
}
