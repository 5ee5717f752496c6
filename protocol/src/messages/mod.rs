//! The messages that travel inside signed [`Envelope`](crate::Envelope)s.
//!
//! Every message names its signer and its validity window; [`Envelope::open`](crate::Envelope::open)
//! checks both against the envelope, so a message can never be re-signed by
//! someone it does not name, nor used outside its window.

mod advert;
mod charter;
mod error;
mod job;
mod work;

pub use advert::{
    CapacityAdvert, CpuInfo, DeterminismClass, GpuBackend, GpuInfo, HeldModel, Leave,
};
pub use charter::{AdminSignature, CharterError, CoalitionCharter, MAX_NAME_BYTES};
pub use error::{ErrorCode, ErrorReply};
pub use job::{
    AuditAnchor, ChatTurn, JobInput, JobOp, JobReport, JobRequest, JobSpec, JobState, RouteHop,
};
pub use work::{
    AdamWParams, BatchSpec, DataShardRef, Downstream, ExecMetrics, Forwarded, GradientEncoding,
    GradientMode, GradientUnit, InferenceOptions, InferenceUnit, LayerRange, ParamsRef, Receipt,
    ResultError, SamplingParams, StagePass, Upstream, WorkBody, WorkResult, WorkUnit, commitment,
    commitment_to,
};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::Limit;
use crate::envelope::MessageKind;
use crate::ids::NodeId;
use crate::time::UnixMillis;

/// A message that travels in a signed envelope.
pub trait Message: Serialize + DeserializeOwned {
    /// The kind tag bound into the signature.
    const KIND: MessageKind;
    /// The most bytes its encoding may take.
    const LIMIT: Limit;

    /// Whether `signer` may sign this message (e.g. an advert only by the node it describes).
    fn signed_by(&self, signer: &NodeId) -> bool;

    /// When the message was issued and when it stops being valid.
    fn validity(&self) -> (UnixMillis, UnixMillis);
}
