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
/// Tags the bytes an executor signs: `RECEIPT_TAG ‖ unit id ‖ commitment ‖
/// metrics` (v1 covered the commitment alone).
const RECEIPT_TAG: &[u8] = b"commons/result-receipt/v2";

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

impl WorkBody {
    /// The coalition the work is for (`None`: open work).
    #[must_use]
    pub fn coalition(&self) -> Option<CoalitionId> {
        match self {
            Self::Inference(unit) => unit.coalition,
            Self::Gradient(unit) => unit.coalition,
        }
    }
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
    /// Token ids (first stage) or hidden states (later stages); empty when
    /// the input comes from another node ([`InferenceOptions::input_from`]).
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
    /// The input is not in the unit: it is the output of another node's
    /// unit, which that node sends here directly ([`Forwarded`]). The unit
    /// waits for it, runs only where its session's cache ends exactly at
    /// `start_pos`, and its result commits to the input it ran on
    /// ([`WorkResult::input`]).
    pub input_from: Option<Upstream>,
    /// Besides returning the output, send it straight to the node that runs
    /// the next hop ([`Forwarded`]).
    pub forward_to: Option<Downstream>,
    /// The issuer's count of units sent, increasing: a unit never runs in
    /// its session after one issued later for the same or an earlier
    /// position (it was superseded, [`ErrorCode::SUPERSEDED`]).
    ///
    /// [`ErrorCode::SUPERSEDED`]: crate::messages::ErrorCode::SUPERSEDED
    pub order: u64,
}

/// Where a unit's input comes from: the node that sends it, and the link
/// (chosen by the issuer, who names the same link in the sending unit's
/// [`Downstream`]) it comes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Upstream {
    /// The node that runs the unit before, and sends its output.
    pub executor: NodeId,
    /// The link between the two units.
    pub link: u64,
}

/// Where a unit's output goes besides its issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downstream {
    /// The node running the next hop.
    pub node: NodeId,
    /// The link the next unit waits on ([`Upstream::link`]).
    pub link: u64,
    /// Tokens not to send on (they end the job): a last hop that samples
    /// one of these returns it to its issuer alone.
    pub unless: BoundedVec<u32, 16>,
}

/// The output of a unit, sent by its executor to the node that runs the
/// next hop. Unsigned: the connection authenticates the sender, whom the
/// receiving unit names ([`Upstream::executor`]); the receiver's result
/// commits to what it received, which the issuer checks against the
/// sender's own signed result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forwarded {
    /// The unit whose output this is.
    pub unit: UnitId,
    /// The link it goes by ([`Downstream::link`]).
    pub link: u64,
    /// What that unit's result commits to as its own input, if it ran on
    /// a forwarded one ([`WorkResult::input`]).
    pub input: Option<Hash>,
    /// Its output (the same tensor its result carries).
    pub output: Tensor,
}

impl Forwarded {
    /// The most bytes a forwarded output's encoding may take.
    pub const LIMIT: Limit = Limit::M64;

    /// The commitment of the unit's result to this output (and to its own
    /// input): what the receiver's result names as its input.
    #[must_use]
    pub fn commitment(&self) -> Hash {
        commitment_to(
            &self.unit,
            self.input.as_ref(),
            std::slice::from_ref(&self.output),
        )
    }
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

/// Compute, for one share of a training round, the gradient of a model's
/// loss on rows of a data shard, or the pseudo-gradient of a few local
/// optimiser steps (DiLoCo).
///
/// Everything the executor needs is named by content: the parameters by the
/// checkpoint file that holds them (and their params root, which the
/// executor checks), the data by the file of its tokens (and the shard's
/// content id, which seeds batch sampling). Both are fetched from the issuer
/// and verified block by block. The result is a pure function of the unit,
/// so any node of a determinism class computes the same bits.
///
/// The result's outputs are, in order:
/// 1. the mean training loss, an f32 tensor of shape `[1]`;
/// 2. the gradient (or pseudo-gradient) of every parameter, flattened and
///    concatenated in the parameters' canonical (sorted-name) order, as one
///    tensor of shape `[n]` in the requested [`GradientEncoding`] (a result
///    carries at most 16 tensors, so one vector serves any model; within a
///    result's 256 MiB that is up to about 67 million parameters in f32, 134
///    million in bf16).
///
/// A pipeline stage's unit ([`GradientMode::Stage`]) names a checkpoint of
/// the stage's parameters alone, and its outputs are those of its
/// [`StagePass`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradientUnit {
    /// The training run.
    pub job: JobId,
    /// The round within the run.
    pub round: u64,
    /// The share within the round.
    pub share: u32,
    /// The parameters to start from.
    pub params: ParamsRef,
    /// The data.
    pub data: DataShardRef,
    /// Which rows of which batches.
    pub batch: BatchSpec,
    /// A gradient, or local steps.
    pub mode: GradientMode,
    /// How the values are sent back.
    pub encoding: GradientEncoding,
    /// The coalition the work is for (`None`: open work), as for inference.
    pub coalition: Option<CoalitionId>,
    /// A pipeline stage's activations (f32): the hidden states that enter a
    /// stage after the first, then, for the backward pass of a stage before
    /// the last, the gradient of the loss with respect to its output. Empty
    /// for every other mode.
    pub inputs: Vec<Tensor>,
}

/// A set of parameters, by content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParamsRef {
    /// blake3 root over every parameter (name, dtype, shape, bytes) in
    /// canonical order.
    pub root: Hash,
    /// blake3 of the checkpoint file (safetensors, with the model's shape in
    /// its metadata) that holds them: the file to fetch.
    pub checkpoint: Hash,
}

/// A data shard, by content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataShardRef {
    /// blake3 of the shard's file: its token ids as little-endian `u32`.
    pub blob: Hash,
    /// The shard's content id, which seeds batch sampling (checked against
    /// the tokens).
    pub shard: Hash,
}

/// The rows a share computes on.
///
/// Batch `k` is `batch_size` windows of `seq_len + 1` tokens drawn from the
/// shard by a generator seeded from (`seed`, shard id, `step + k`); the share
/// takes rows `rows` of it. A gradient uses batch 0; `LocalSteps` use
/// batches `0..steps`, one per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSpec {
    /// Seed of batch sampling.
    pub seed: u64,
    /// The first batch's step.
    pub step: u64,
    /// Rows drawn per batch.
    pub batch_size: u32,
    /// Tokens per row.
    pub seq_len: u32,
    /// First row taken.
    pub rows_start: u32,
    /// One past the last row taken.
    pub rows_end: u32,
}

/// What a gradient unit computes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GradientMode {
    /// The gradient of the mean loss on the rows, at the parameters.
    Gradient,
    /// `steps` AdamW steps from the parameters (optimiser state starting at
    /// zero), returning the pseudo-gradient `before − after`.
    LocalSteps {
        /// Local steps.
        steps: u32,
        /// The local optimiser.
        optimizer: AdamWParams,
    },
    /// One micro-batch (the unit's rows) through one stage of a model cut
    /// into pipeline stages by layer ranges, GPipe style.
    Stage {
        /// The stage's layers; the first stage holds the embeddings, the
        /// last the final norm and the head.
        layers: LayerRange,
        /// Forward or backward.
        pass: StagePass,
    },
}

/// The pass a pipeline stage's unit runs.
///
/// Units are stateless: a backward pass recomputes the stage's forward pass
/// from the input it is sent (GPipe's re-materialisation), so any node of the
/// stage's determinism class can take any unit, and a lost node costs only
/// its units in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StagePass {
    /// The stage's output for the micro-batch: outputs are the hidden states
    /// `[rows, seq_len, dim]` (f32). The last stage has no forward unit: its
    /// backward unit starts from its input.
    Forward,
    /// The gradients of the micro-batch's mean loss: outputs are the loss
    /// (`[1]` from the last stage, `[0]` from the others), the stage's
    /// parameter gradients as one vector in its canonical order and the
    /// unit's [`GradientEncoding`], and the gradient with respect to the
    /// stage's input hidden states (`[rows, seq_len, dim]`, f32; `[0]` from
    /// the first stage, whose input is tokens).
    Backward,
}

/// AdamW's hyper-parameters, as a unit carries them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay (matrices and embeddings only).
    pub weight_decay: f64,
}

/// How gradient values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GradientEncoding {
    /// f32, as computed.
    F32,
    /// bfloat16: half the bytes.
    Bf16,
    /// Top-k sparsification with error feedback: of each parameter tensor
    /// only the `ceil(keep_ppm / 10⁶ × n)` entries of largest magnitude of
    /// (gradient + the node's residual) travel; the rest stays in the node's
    /// residual for this issuer and run and is added to its next share.
    /// The values output is then two tensors: the kept entries' indices into
    /// the flattened vector (`u32`, increasing) and their values (f32).
    ///
    /// The residual is the node's own state, so a result is not a pure
    /// function of its unit and cannot be spot-checked by re-execution.
    TopK {
        /// Entries kept per million of each tensor (1 to 1,000,000).
        keep_ppm: u32,
    },
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

impl ExecMetrics {
    /// Bytes of the canonical form, as signed in a [`Receipt`].
    pub const CANONICAL_LEN: usize = 8 + 8 + 4 + 8;

    /// The canonical bytes a receipt signs: every field in declaration order,
    /// fixed width, little-endian. Independent of the wire codec, so a
    /// receipt verifies whatever format carried it.
    #[must_use]
    pub fn canonical_bytes(&self) -> [u8; Self::CANONICAL_LEN] {
        // Destructured so that a new field cannot be left out of the signature.
        let Self {
            queue_micros,
            compute_micros,
            tokens,
            peak_memory_bytes,
        } = self;
        let mut out = [0u8; Self::CANONICAL_LEN];
        out[..8].copy_from_slice(&queue_micros.to_le_bytes());
        out[8..16].copy_from_slice(&compute_micros.to_le_bytes());
        out[16..20].copy_from_slice(&tokens.to_le_bytes());
        out[20..].copy_from_slice(&peak_memory_bytes.to_le_bytes());
        out
    }
}

/// What an executor vouches for about one result, without its tensors: the
/// unit, the commitment to the outputs, how the unit ran, and the executor's
/// signature over all three. Receipts are what an audit log keeps; anyone can
/// check one with [`Receipt::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The unit answered.
    pub unit: UnitId,
    /// blake3 over the unit id and the outputs' canonical bytes.
    pub commitment: Hash,
    /// How it ran.
    pub metrics: ExecMetrics,
    /// Who ran it.
    pub executor: NodeId,
    /// The executor's signature over (unit id ‖ commitment ‖ metrics).
    pub signature: Signature,
}

impl Receipt {
    /// The bytes the executor signs: a domain tag, the unit id, the
    /// commitment and [`ExecMetrics::canonical_bytes`], all of fixed length.
    #[must_use]
    pub fn signed_bytes(unit: &UnitId, commitment: &Hash, metrics: &ExecMetrics) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECEIPT_TAG.len() + 64 + ExecMetrics::CANONICAL_LEN);
        out.extend_from_slice(RECEIPT_TAG);
        out.extend_from_slice(&unit.0.0);
        out.extend_from_slice(&commitment.0);
        out.extend_from_slice(&metrics.canonical_bytes());
        out
    }

    /// Checks the executor's signature over the unit id, the commitment and
    /// the metrics: changing any of them, or naming another executor, fails.
    pub fn verify(&self) -> Result<(), VerifyError> {
        keys::verify(
            &self.executor,
            &Self::signed_bytes(&self.unit, &self.commitment, &self.metrics),
            &self.signature,
        )
    }
}

/// The outcome of a work unit, committed by blake3 and signed by its executor.
///
/// The signature is over (unit id ‖ commitment ‖ metrics), not the tensors,
/// so a result's [`Receipt`] can be checked and kept without them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkResult {
    /// The unit answered.
    pub unit: UnitId,
    /// Outputs: hidden states, logits, a sampled token, or gradients.
    pub outputs: BoundedVec<Tensor, 16>,
    /// blake3 over the unit id and the outputs' canonical bytes.
    pub commitment: Hash,
    /// How it ran (signed, not committed: it varies run to run).
    pub metrics: ExecMetrics,
    /// Who ran it.
    pub executor: NodeId,
    /// The executor's signature over (unit id ‖ commitment ‖ metrics).
    pub signature: Signature,
    /// For a unit whose input came from another node: the commitment of
    /// that node's result to the output received (covered by this result's
    /// commitment).
    pub input: Option<Hash>,
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
    /// The executor's signature over the receipt (unit id, commitment,
    /// metrics) does not verify: the result is forged or was altered.
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
    commitment_to(unit, None, outputs)
}

/// [`commitment`] of a result that also commits to the input it ran on
/// (the commitment of the result it came from), when there is one.
#[must_use]
pub fn commitment_to(unit: &UnitId, input: Option<&Hash>, outputs: &[Tensor]) -> Hash {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(outputs.len() + 3);
    parts.push(&unit.0.0);
    if let Some(input) = input {
        parts.push(INPUT_TAG);
        parts.push(&input.0);
    }
    let digests: Vec<[u8; 32]> = outputs.iter().map(|t| t.digest().0).collect();
    parts.extend(digests.iter().map(|d| d.as_slice()));
    Hash::of_parts(COMMITMENT_DOMAIN, &parts)
}

/// Marks the input's commitment among a result commitment's parts (an
/// output digest is never these 5 bytes: digests are 32).
const INPUT_TAG: &[u8] = b"input";

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
        Self::sign_with_input(
            executor, unit, None, outputs, metrics, issued_at, expires_at,
        )
    }

    /// [`WorkResult::sign`] for a unit that ran on a forwarded input, whose
    /// commitment `input` the result commits to.
    pub fn sign_with_input(
        executor: &Identity,
        unit: UnitId,
        input: Option<Hash>,
        outputs: Vec<Tensor>,
        metrics: ExecMetrics,
        issued_at: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<Self, ResultError> {
        let count = outputs.len();
        let outputs =
            BoundedVec::try_from_vec(outputs).map_err(|_| ResultError::TooManyOutputs { count })?;
        let commitment = commitment_to(&unit, input.as_ref(), &outputs);
        let signature = executor.sign(&Receipt::signed_bytes(&unit, &commitment, &metrics));
        Ok(Self {
            unit,
            outputs,
            commitment,
            metrics,
            executor: executor.node_id(),
            signature,
            input,
            issued_at,
            expires_at,
        })
    }

    /// The result's receipt: everything but the tensors and the validity window.
    #[must_use]
    pub fn receipt(&self) -> Receipt {
        Receipt {
            unit: self.unit,
            commitment: self.commitment,
            metrics: self.metrics.clone(),
            executor: self.executor,
            signature: self.signature,
        }
    }

    /// Checks the executor's signature over the receipt first (so that a
    /// result altered after signing is a [`ResultError::Signature`]), then
    /// every output tensor and the commitment to them.
    pub fn verify(&self) -> Result<(), ResultError> {
        keys::verify(
            &self.executor,
            &Receipt::signed_bytes(&self.unit, &self.commitment, &self.metrics),
            &self.signature,
        )
        .map_err(ResultError::Signature)?;
        for (index, output) in self.outputs.iter().enumerate() {
            output
                .verify()
                .map_err(|source| ResultError::Output { index, source })?;
        }
        let actual = commitment_to(&self.unit, self.input.as_ref(), &self.outputs);
        if actual != self.commitment {
            return Err(ResultError::CommitmentMismatch {
                claimed: self.commitment,
                actual,
            });
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn signed() -> WorkResult {
        let executor = Identity::from_secret([3; 32]);
        let output = Tensor::from_f32(&[1, 2], &[0.5, -1.0]).expect("a valid tensor");
        WorkResult::sign(
            &executor,
            UnitId(Hash::of(b"unit")),
            vec![output],
            ExecMetrics {
                queue_micros: 10,
                compute_micros: 2_000,
                tokens: 1,
                peak_memory_bytes: 4096,
            },
            UnixMillis(1),
            UnixMillis(2),
        )
        .expect("one output")
    }

    fn is_signature_error(r: Result<(), VerifyError>) -> bool {
        matches!(
            r,
            Err(VerifyError::BadSignature | VerifyError::BadPublicKey)
        )
    }

    #[test]
    fn a_signed_result_and_its_receipt_verify() {
        let result = signed();
        result.verify().expect("verifies");
        let receipt = result.receipt();
        receipt.verify().expect("verifies");
        assert_eq!(receipt.unit, result.unit);
        assert_eq!(receipt.commitment, result.commitment);
        assert_eq!(receipt.metrics, result.metrics);
        assert_eq!(receipt.executor, result.executor);
        assert_eq!(receipt.signature, result.signature);
        assert_eq!(result.outputs[0].dtype(), DType::F32);
    }

    #[test]
    fn a_receipt_with_altered_metrics_fails_its_signature() {
        let receipt = signed().receipt();
        let alterations: [fn(&mut ExecMetrics); 4] = [
            |m| m.queue_micros += 1,
            |m| m.compute_micros -= 1,
            |m| m.tokens += 1,
            |m| m.peak_memory_bytes = 0,
        ];
        for alter in alterations {
            let mut r = receipt.clone();
            alter(&mut r.metrics);
            assert!(is_signature_error(r.verify()), "{:?}", r.metrics);
        }
    }

    #[test]
    fn a_receipt_with_altered_commitment_unit_or_executor_fails_its_signature() {
        let receipt = signed().receipt();
        let mut r = receipt.clone();
        r.commitment.0[0] ^= 1;
        assert!(is_signature_error(r.verify()));
        let mut r = receipt.clone();
        r.unit.0.0[31] ^= 0x80;
        assert!(is_signature_error(r.verify()));
        let mut r = receipt.clone();
        r.executor = Identity::from_secret([4; 32]).node_id();
        assert_eq!(r.verify(), Err(VerifyError::BadSignature));
        let mut r = receipt;
        r.signature.0[5] ^= 1;
        assert!(is_signature_error(r.verify()));
    }

    #[test]
    fn a_result_with_altered_metrics_is_a_signature_error() {
        let mut result = signed();
        result.metrics.compute_micros = 1;
        assert!(matches!(result.verify(), Err(ResultError::Signature(_))));
        // A commitment altered after signing is a signature error too…
        let mut result = signed();
        result.commitment.0[0] ^= 1;
        assert!(matches!(result.verify(), Err(ResultError::Signature(_))));
        // …while an executor signing a commitment its outputs do not have is caught by the commitment.
        let executor = Identity::from_secret([3; 32]);
        let mut result = signed();
        result.commitment.0[0] ^= 1;
        result.signature = executor.sign(&Receipt::signed_bytes(
            &result.unit,
            &result.commitment,
            &result.metrics,
        ));
        assert!(matches!(
            result.verify(),
            Err(ResultError::CommitmentMismatch { .. })
        ));
    }

    #[test]
    fn a_signature_over_the_commitment_alone_no_longer_verifies() {
        let executor = Identity::from_secret([3; 32]);
        let mut result = signed();
        let v1 = [
            b"commons/result-receipt/v1".as_slice(),
            result.commitment.0.as_slice(),
        ]
        .concat();
        result.signature = executor.sign(&v1);
        assert!(matches!(result.verify(), Err(ResultError::Signature(_))));
    }

    #[test]
    fn a_result_commits_to_the_input_it_ran_on() {
        let executor = Identity::from_secret([3; 32]);
        let output = Tensor::from_f32(&[1, 2], &[0.5, -1.0]).expect("a valid tensor");
        let unit = UnitId(Hash::of(b"unit"));
        let input = Hash::of(b"the upstream result's commitment");
        let sign = |input| {
            WorkResult::sign_with_input(
                &executor,
                unit,
                input,
                vec![output.clone()],
                ExecMetrics::default(),
                UnixMillis(1),
                UnixMillis(2),
            )
            .expect("one output")
        };
        let with = sign(Some(input));
        with.verify().expect("verifies");
        let without = sign(None);
        assert_eq!(
            without.commitment,
            commitment(&unit, std::slice::from_ref(&output))
        );
        assert_ne!(with.commitment, without.commitment);
        // Claiming another input afterwards breaks the commitment.
        let mut claimed = with.clone();
        claimed.input = Some(Hash::of(b"another input"));
        assert!(matches!(
            claimed.verify(),
            Err(ResultError::CommitmentMismatch { .. })
        ));
        let mut dropped = with;
        dropped.input = None;
        assert!(matches!(
            dropped.verify(),
            Err(ResultError::CommitmentMismatch { .. })
        ));
    }

    #[test]
    fn canonical_metrics_are_fixed_width_little_endian() {
        let m = ExecMetrics {
            queue_micros: 1,
            compute_micros: 2,
            tokens: 3,
            peak_memory_bytes: 4,
        };
        let b = m.canonical_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(b[8], 2);
        assert_eq!(b[16], 3);
        assert_eq!(b[20], 4);
        assert_eq!(
            b.iter().filter(|&&x| x != 0).count(),
            4,
            "one non-zero byte per field"
        );
    }
}
