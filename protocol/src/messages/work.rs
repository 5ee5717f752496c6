use serde::{Deserialize, Serialize};

use super::Message;
use crate::bounded::BoundedVec;
use crate::codec::{self, Limit};
use crate::envelope::MessageKind;
use crate::ids::{CoalitionId, Hash, JobId, ModelId, NodeId, Nonce, SessionId, Signature, UnitId};
use crate::keys::{self, Identity, VerifyError};
use crate::tensor::{Tensor, TensorError};
use crate::time::UnixMillis;

const UNIT_DOMAIN: &str = "commons work unit v1";
const COMMITMENT_DOMAIN: &str = "commons result commitment v1";
const RECEIPT_TAG: &[u8] = b"commons/result-receipt/v1";

/// Layers `[start, end)` of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    /// First layer held.
    pub start: u32,
    /// One past the last layer held.
    pub end: u32,
}

impl LayerRange {
    /// Number of layers.
    #[must_use]
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// True when the range holds no layer.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl std::fmt::Display for LayerRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// A unit of work, signed by its issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkUnit {
    /// Who asks (a coordinator or a member).
    pub issuer: NodeId,
    /// Random per unit; with the issuer, the replay key.
    pub nonce: Nonce,
    /// Issue time.
    pub issued_at: UnixMillis,
    /// After this instant the unit must not be run.
    pub expires_at: UnixMillis,
    /// What to do.
    pub body: WorkBody,
}

/// The two kinds of work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum WorkBody {
    /// A forward step through a layer range of a model.
    Inference(InferenceUnit),
    /// A gradient computation on a data shard.
    Gradient(GradientUnit),
}

/// One pipeline step: run `input` through `layers` of `model` in `session`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceUnit {
    /// The job this step belongs to.
    pub job: JobId,
    /// blake3 of the model file(s).
    pub model: ModelId,
    /// Layers to run.
    pub layers: LayerRange,
    /// KV-cache session on the executing node.
    pub session: SessionId,
    /// Step number within the session, starting at 0; steps run in order.
    pub step: u64,
    /// Token ids (first stage) or hidden states (later stages).
    pub input: Tensor,
    /// How to run it.
    pub options: InferenceOptions,
    /// The coalition the work is for (`None`: open work). A node serves a
    /// coalition's units only when it serves that coalition and the issuer is
    /// one of its members.
    pub coalition: Option<CoalitionId>,
}

/// Options of an inference step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceOptions {
    /// Position of the input's first token in the sequence.
    pub start_pos: u32,
    /// Most tokens the session's KV cache may hold.
    pub max_session_tokens: u32,
    /// On the last stage: sample the next token instead of returning logits.
    pub sampling: Option<SamplingParams>,
    /// Drop the session after this step.
    pub close_session: bool,
}

/// Token sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: u32,
    /// Keep the smallest set whose probability reaches p (1.0: all).
    pub top_p: f32,
    /// Penalty for tokens already present (1.0: none).
    pub repetition_penalty: f32,
    /// RNG seed for this step.
    pub seed: u64,
}

/// Compute a gradient of the loss at `params_root` on a shard of data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradientUnit {
    /// The training job.
    pub job: JobId,
    /// Root hash of the parameters to differentiate at.
    pub params_root: Hash,
    /// The data.
    pub shard: DataShardRef,
    /// Hyper-parameters.
    pub hyper: HyperParams,
}

/// A slice of a content-addressed data set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataShardRef {
    /// blake3 of the data set.
    pub dataset: Hash,
    /// Index of the shard.
    pub index: u64,
    /// Shards in the data set.
    pub count: u64,
}

/// Training hyper-parameters of one gradient unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HyperParams {
    /// Learning rate of the inner optimiser.
    pub learning_rate: f32,
    /// Sequences per batch.
    pub batch_size: u32,
    /// Tokens per sequence.
    pub seq_len: u32,
    /// Optimiser steps before the result is returned (1: a plain gradient; >1: DiLoCo inner steps).
    pub inner_steps: u32,
    /// Seed for data order and dropout.
    pub seed: u64,
}

impl WorkUnit {
    /// The unit's id: blake3 over its canonical encoding.
    pub fn id(&self) -> Result<UnitId, codec::EncodeError> {
        Ok(UnitId(Hash::of_parts(
            UNIT_DOMAIN,
            &[&codec::encode(self)?],
        )))
    }
}

impl Message for WorkUnit {
    const KIND: MessageKind = MessageKind::WorkUnit;
    const LIMIT: Limit = Limit::M64;

    fn signed_by(&self, signer: &NodeId) -> bool {
        &self.issuer == signer
    }

    fn validity(&self) -> (UnixMillis, UnixMillis) {
        (self.issued_at, self.expires_at)
    }
}

/// How a unit ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecMetrics {
    /// Time waiting for the executor.
    pub queue_micros: u64,
    /// Time computing.
    pub compute_micros: u64,
    /// Tokens processed.
    pub tokens: u32,
    /// Peak memory of the work, when known.
    pub peak_memory_bytes: u64,
}

/// The outcome of a work unit, committed by blake3 and signed by its executor.
///
/// The signature is over the commitment alone, so a result's receipt
/// (unit, commitment, executor, signature) can be checked and forwarded
/// without the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkResult {
    /// The unit answered.
    pub unit: UnitId,
    /// Outputs: hidden states, logits, a sampled token, or gradients.
    pub outputs: BoundedVec<Tensor, 16>,
    /// blake3 over the unit id and the outputs' canonical bytes.
    pub commitment: Hash,
    /// How it ran (not committed: it varies run to run).
    pub metrics: ExecMetrics,
    /// Who ran it.
    pub executor: NodeId,
    /// The executor's signature over the commitment.
    pub signature: Signature,
    /// Issue time.
    pub issued_at: UnixMillis,
    /// After this instant the result may be discarded.
    pub expires_at: UnixMillis,
}

/// A result that does not hold together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResultError {
    /// An output tensor is malformed or its digest is wrong.
    #[error("output {index} is invalid")]
    Output {
        /// Which output.
        index: usize,
        /// Why.
        #[source]
        source: TensorError,
    },
    /// The commitment does not match the outputs.
    #[error("commitment {claimed} does not match the outputs ({actual})")]
    CommitmentMismatch {
        /// Carried.
        claimed: Hash,
        /// Recomputed.
        actual: Hash,
    },
    /// The executor's signature over the commitment does not verify.
    #[error("executor signature does not verify")]
    Signature(#[source] VerifyError),
    /// More outputs than a result may carry.
    #[error("{count} outputs exceed the maximum of 16")]
    TooManyOutputs {
        /// Outputs offered.
        count: usize,
    },
}

/// The commitment to `outputs` as the answer to `unit`: blake3 over the unit id
/// and each output's dtype, shape and little-endian bytes.
#[must_use]
pub fn commitment(unit: &UnitId, outputs: &[Tensor]) -> Hash {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(outputs.len() + 1);
    parts.push(&unit.0.0);
    let digests: Vec<[u8; 32]> = outputs.iter().map(|t| t.digest().0).collect();
    parts.extend(digests.iter().map(|d| d.as_slice()));
    Hash::of_parts(COMMITMENT_DOMAIN, &parts)
}

fn receipt_bytes(commitment: &Hash) -> Vec<u8> {
    [RECEIPT_TAG, commitment.0.as_slice()].concat()
}

impl WorkResult {
    /// Builds and signs the result of `unit`.
    pub fn sign(
        executor: &Identity,
        unit: UnitId,
        outputs: Vec<Tensor>,
        metrics: ExecMetrics,
        issued_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<Self, ResultError> {
        let count = outputs.len();
        let outputs =
            BoundedVec::try_from_vec(outputs).map_err(|_| ResultError::TooManyOutputs { count })?;
        let commitment = commitment(&unit, &outputs);
        let signature = executor.sign(&receipt_bytes(&commitment));
        Ok(Self {
            unit,
            outputs,
            commitment,
            metrics,
            executor: executor.node_id(),
            signature,
            issued_at,
            expires_at,
        })
    }

    /// Checks every output tensor, the commitment and the executor's signature.
    pub fn verify(&self) -> Result<(), ResultError> {
        for (index, output) in self.outputs.iter().enumerate() {
            output
                .verify()
                .map_err(|source| ResultError::Output { index, source })?;
        }
        let actual = commitment(&self.unit, &self.outputs);
        if actual != self.commitment {
            return Err(ResultError::CommitmentMismatch {
                claimed: self.commitment,
                actual,
            });
        }
        keys::verify(
            &self.executor,
            &receipt_bytes(&self.commitment),
            &self.signature,
        )
        .map_err(ResultError::Signature)
    }
}

impl Message for WorkResult {
    const KIND: MessageKind = MessageKind::WorkResult;
    const LIMIT: Limit = Limit::M256;

    fn signed_by(&self, signer: &NodeId) -> bool {
        &self.executor == signer
    }

    fn validity(&self) -> (UnixMillis, UnixMillis) {
        (self.issued_at, self.expires_at)
    }
}
