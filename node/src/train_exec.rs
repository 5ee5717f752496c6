//! Gradient work units on a node that trains (`commons node join --train`).
//!
//! A unit names its parameters and data by content (see
//! [`GradientUnit`]): the event loop fetches both from the unit's issuer
//! over `/commons/blob/1.0.0`, every block checked against the file's blake3
//! id, and keeps recent files in memory, so a node fetches each round's
//! parameters once and a data shard once per run. The computation runs on
//! the trainer's own thread ([`Trainer`]), never on the async runtime's
//! workers; candle fans it out onto its compute pool from there. The thread
//! keeps the models of the last few checkpoints, so the shares of one round
//! load their parameters once.
//!
//! The result is a pure function of the unit: the loss and the gradient (or
//! the pseudo-gradient of local AdamW steps, DiLoCo) of the rows the unit
//! names, flattened in the parameters' canonical order into one vector.
//! Nodes of one determinism class return the same bits.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use commons_protocol::envelope::Envelope;
use commons_protocol::messages::{
    ErrorCode, ExecMetrics, GradientEncoding, GradientMode, GradientUnit, StagePass, WorkResult,
};
use commons_protocol::{Hash, Identity, JobId, NodeId, UnitId, UnixMillis};
use commons_train::data::{DataError, sample_batch, shard_id, tokens_from_bytes};
use commons_train::params::CheckpointError;
use commons_train::{
    AdamWConfig, Batch, DilocoWorker, ErrorFeedback, Model, Stage, Upstream, gradients,
};
use tokio::sync::{mpsc, oneshot};

use crate::executor::serve::{Refusal, UnitAnswer};

/// A file fetched for a unit, shared between the units that need it.
pub type Blob = Arc<Vec<u8>>;

/// How long results and refusals stay valid.
const REPLY_TTL_MS: u64 = 60_000;
/// Units waiting for the trainer's thread; past this a unit is refused as
/// `overloaded`.
const QUEUE: usize = 16;
/// Models (one per checkpoint) the thread keeps loaded.
const MODELS_KEPT: usize = 2;
/// Pipeline stages (one per checkpoint) the thread keeps loaded: a node may
/// hold a second stage after a failover, over two rounds.
const STAGES_KEPT: usize = 4;
/// Error-feedback residuals (one per issuer and run) the thread keeps.
const RESIDUALS_KEPT: usize = 4;
/// Most local steps a unit may ask for.
const MAX_STEPS: u32 = 100_000;
/// Most tokens one batch of a unit may hold.
const MAX_BATCH_TOKENS: u64 = 1 << 24;

/// Why a gradient unit could not be computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// The parameters' file is not a checkpoint of a model.
    #[error("the parameters do not load")]
    Checkpoint(#[source] CheckpointError),
    /// The parameters are not the ones the unit names.
    #[error("the parameters' root is {actual}, the unit names {expected}")]
    Root {
        /// Named by the unit.
        expected: Hash,
        /// Computed from the file.
        actual: Hash,
    },
    /// The data file is not a list of `u32` tokens.
    #[error("the data file is not a list of little-endian u32 tokens")]
    DataFormat,
    /// The data is not the shard the unit names.
    #[error("the data's shard id is {actual}, the unit names {expected}")]
    Shard {
        /// Named by the unit.
        expected: Hash,
        /// Computed from the tokens.
        actual: Hash,
    },
    /// A token the model cannot embed.
    #[error("token {id} is past the model's vocabulary of {vocab_size}")]
    Vocab {
        /// The token.
        id: u32,
        /// The model's vocabulary.
        vocab_size: usize,
    },
    /// Rows, lengths or steps the unit cannot have.
    #[error("the unit's batch cannot be drawn: {reason}")]
    Shape {
        /// What is wrong.
        reason: String,
    },
    /// The batch cannot be drawn from the shard.
    #[error("the batch cannot be drawn")]
    Batch(#[source] DataError),
    /// A mode this node does not know.
    #[error("this node does not compute that kind of gradient unit")]
    Mode,
    /// The computation failed.
    #[error("the computation failed")]
    Compute(#[source] commons_train::Error),
    /// The trainer's thread has stopped.
    #[error("the trainer has stopped")]
    Stopped,
}

impl ShareError {
    /// The stable code a refusal carries.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Compute(_) => ErrorCode::INTERNAL,
            Self::Stopped => ErrorCode::SHUTTING_DOWN,
            _ => ErrorCode::BAD_REQUEST,
        }
    }

    /// The message with its causes.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// The batches a unit computes on, in order (one for a gradient, one per
/// local step), drawn from the shard's `tokens`.
///
/// # Errors
/// [`ShareError::Shard`] when the tokens are not the unit's shard;
/// [`ShareError::Shape`] or [`ShareError::Batch`] for rows that cannot be
/// drawn.
pub fn batches(tokens: &[u32], unit: &GradientUnit) -> Result<Vec<Batch>, ShareError> {
    let shard = Hash(*shard_id(tokens).as_bytes());
    if shard != unit.data.shard {
        return Err(ShareError::Shard {
            expected: unit.data.shard,
            actual: shard,
        });
    }
    let b = unit.batch;
    let steps = match unit.mode {
        GradientMode::Gradient | GradientMode::Stage { .. } => 1,
        GradientMode::LocalSteps { steps, .. } => steps,
        _ => return Err(ShareError::Mode),
    };
    let shape = |reason: String| Err(ShareError::Shape { reason });
    if steps == 0 || steps > MAX_STEPS {
        return shape(format!("{steps} steps (1 to {MAX_STEPS})"));
    }
    if u64::from(b.batch_size) * u64::from(b.seq_len) > MAX_BATCH_TOKENS {
        return shape(format!("{} rows of {}", b.batch_size, b.seq_len));
    }
    if b.rows_start >= b.rows_end || b.rows_end > b.batch_size {
        return shape(format!(
            "rows {}..{} of {}",
            b.rows_start, b.rows_end, b.batch_size
        ));
    }
    let id = shard_id(tokens);
    (0..u64::from(steps))
        .map(|k| {
            sample_batch(
                tokens,
                &id,
                b.seed,
                b.step.wrapping_add(k),
                b.batch_size as usize,
                b.seq_len as usize,
            )
            .and_then(|batch| batch.rows(b.rows_start as usize..b.rows_end as usize))
            .map_err(ShareError::Batch)
        })
        .collect()
}

/// The mean loss and the values (gradient, or pseudo-gradient of the local
/// steps) of `unit` for `model`, whose parameters are the unit's, on the
/// shard's `tokens`; the values in the parameters' canonical order.
///
/// # Errors
/// As [`batches`]; [`ShareError::Vocab`] for tokens the model cannot
/// embed; [`ShareError::Compute`] when candle fails.
pub fn compute(
    model: &Model,
    tokens: &[u32],
    unit: &GradientUnit,
) -> Result<(f32, Vec<Tensor>), ShareError> {
    let vocab_size = model.config().vocab_size;
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(ShareError::Vocab { id, vocab_size });
    }
    if unit.batch.seq_len as usize > model.config().max_seq_len {
        return Err(ShareError::Shape {
            reason: format!(
                "rows of {} tokens exceed the model's {}",
                unit.batch.seq_len,
                model.config().max_seq_len
            ),
        });
    }
    let batches = batches(tokens, unit)?;
    match unit.mode {
        GradientMode::Gradient => gradients(model, &batches[0]).map_err(ShareError::Compute),
        GradientMode::LocalSteps { optimizer, .. } => {
            let config = AdamWConfig {
                lr: optimizer.lr,
                beta1: optimizer.beta1,
                beta2: optimizer.beta2,
                eps: optimizer.eps,
                weight_decay: optimizer.weight_decay,
            };
            let start = model.params().snapshot().map_err(ShareError::Compute)?;
            let mut worker = DilocoWorker::new(model, config).map_err(ShareError::Compute)?;
            let (delta, loss) = worker
                .round(&start, &batches)
                .map_err(ShareError::Compute)?;
            Ok((loss, delta))
        }
        _ => Err(ShareError::Mode),
    }
}

/// What a pipeline stage's unit computed (see [`StagePass`]).
#[derive(Debug)]
pub enum StageOutput {
    /// The stage's output hidden states.
    Forward(Tensor),
    /// The micro-batch's gradients.
    Backward {
        /// The mean loss (last stage only).
        loss: Option<f32>,
        /// The stage's parameter gradients, canonical order.
        params: Vec<Tensor>,
        /// The gradient with respect to the input hidden states (none for
        /// the first stage).
        input: Option<Tensor>,
    },
}

/// A hidden-state tensor as it travels (f32).
///
/// # Errors
/// When candle cannot read it.
pub fn to_wire(t: &Tensor) -> Result<commons_protocol::Tensor, String> {
    let dims: Vec<u64> = t.dims().iter().map(|&d| d as u64).collect();
    let values = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())?;
    commons_protocol::Tensor::from_f32(&dims, &values).map_err(|e| e.to_string())
}

/// An f32 tensor from the wire, which must have `dims`.
///
/// # Errors
/// For another dtype or shape.
pub fn from_wire(
    t: &commons_protocol::Tensor,
    dims: &[usize],
    what: &str,
) -> Result<Tensor, ShareError> {
    let shape = |reason: String| ShareError::Shape { reason };
    if t.shape()
        .iter()
        .map(|&d| d as usize)
        .ne(dims.iter().copied())
    {
        return Err(shape(format!(
            "{what} of shape {:?}, expected {dims:?}",
            t.shape()
        )));
    }
    let values = t
        .to_f32()
        .ok_or_else(|| shape(format!("{what} must be f32")))?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(shape(format!("{what} holds values that are not finite")));
    }
    Tensor::from_vec(values, dims, &Device::Cpu).map_err(|e| ShareError::Compute(e.into()))
}

/// Runs a pipeline stage's unit on `stage` (whose parameters are the
/// unit's) for the micro-batch of rows the unit names in the shard's
/// `tokens`: the stage's forward pass, or its backward pass recomputed from
/// the input it is sent.
///
/// # Errors
/// As [`batches`]; [`ShareError::Shape`] for a unit whose layers are not the
/// stage's, a forward unit for the last stage, or inputs that are missing or
/// misshapen; [`ShareError::Compute`] when candle fails.
pub fn compute_stage(
    stage: &Stage,
    tokens: &[u32],
    unit: &GradientUnit,
) -> Result<StageOutput, ShareError> {
    let GradientMode::Stage { layers, pass } = unit.mode else {
        return Err(ShareError::Mode);
    };
    let shape = |reason: String| Err(ShareError::Shape { reason });
    let held = stage.layers();
    if held != (layers.start as usize..layers.end as usize) {
        return shape(format!("layers {layers} for a stage over {held:?}"));
    }
    let config = stage.config();
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(ShareError::Vocab {
            id,
            vocab_size: config.vocab_size,
        });
    }
    if unit.batch.seq_len as usize > config.max_seq_len {
        return shape(format!(
            "rows of {} tokens exceed the model's {}",
            unit.batch.seq_len, config.max_seq_len
        ));
    }
    let batch = batches(tokens, unit)?.remove(0);
    let (inputs, targets) = batch
        .to_tensors(&Device::Cpu)
        .map_err(|e| ShareError::Compute(e.into()))?;
    let hidden_dims = [batch.batch_size(), batch.seq_len(), config.dim];
    let mut given = unit.inputs.iter();
    let input = if stage.is_first() {
        inputs
    } else {
        let Some(t) = given.next() else {
            return shape("a stage after the first needs its input hidden states".into());
        };
        from_wire(t, &hidden_dims, "the input")?
    };
    let compute = ShareError::Compute;
    match pass {
        StagePass::Forward => {
            if stage.is_last() {
                return shape("the last stage runs its forward pass in its backward unit".into());
            }
            if given.next().is_some() {
                return shape("a forward unit takes its input alone".into());
            }
            let out = stage.forward(&input).map_err(compute)?;
            Ok(StageOutput::Forward(out))
        }
        StagePass::Backward => {
            let grad = if stage.is_last() {
                None
            } else {
                let Some(t) = given.next() else {
                    return shape(
                        "a stage before the last needs the gradient of its output".into(),
                    );
                };
                Some(from_wire(t, &hidden_dims, "the output gradient")?)
            };
            if given.next().is_some() {
                return shape("too many inputs for a backward unit".into());
            }
            let trace = stage.forward_train(&input).map_err(compute)?;
            let upstream = match &grad {
                None => Upstream::Targets {
                    targets: &targets,
                    scale: 1.0,
                },
                Some(g) => Upstream::Grad(g),
            };
            let out = stage.backward(&trace, upstream).map_err(compute)?;
            Ok(StageOutput::Backward {
                loss: out.loss,
                params: out.params,
                input: out.input,
            })
        }
        _ => Err(ShareError::Mode),
    }
}

/// `values` as they travel: one vector, every tensor flattened in order, in
/// `encoding`.
///
/// # Errors
/// When candle cannot convert or read a tensor.
pub fn encode_values(
    values: &[Tensor],
    encoding: GradientEncoding,
) -> Result<commons_protocol::Tensor, String> {
    let (dtype, wire) = match encoding {
        GradientEncoding::Bf16 => (DType::BF16, commons_protocol::DType::BF16),
        _ => (DType::F32, commons_protocol::DType::F32),
    };
    let converted = commons_train::grad::to_dtype(values, dtype).map_err(|e| e.to_string())?;
    let bytes = commons_train::grad::encode(&converted).map_err(|e| e.to_string())?;
    let n = converted.iter().map(Tensor::elem_count).sum::<usize>() as u64;
    commons_protocol::Tensor::new(wire, &[n], bytes).map_err(|e| e.to_string())
}

/// The f32 values of a vector sent by [`encode_values`], which must hold
/// `expected` of them in `encoding`.
///
/// # Errors
/// For another dtype, shape or length.
pub fn decode_values(
    t: &commons_protocol::Tensor,
    encoding: GradientEncoding,
    expected: usize,
) -> Result<Vec<f32>, String> {
    if t.shape() != [expected as u64] {
        return Err(format!(
            "values of shape {:?}, expected [{expected}]",
            t.shape()
        ));
    }
    match (encoding, t.dtype()) {
        (GradientEncoding::F32, commons_protocol::DType::F32) => {
            t.to_f32().ok_or_else(|| "not f32".to_owned())
        }
        (GradientEncoding::Bf16, commons_protocol::DType::BF16) => Ok(t
            .data()
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect()),
        (_, dtype) => Err(format!("values in {dtype:?}, not the {encoding:?} asked")),
    }
}

/// What the trainer's thread computed.
#[derive(Debug)]
pub struct Computed {
    /// The values.
    pub output: Produced,
    /// Time waiting for the thread.
    pub queued: Duration,
    /// Time loading and computing.
    pub compute: Duration,
}

/// The values a unit computed.
#[derive(Debug)]
pub enum Produced {
    /// A share of a round: the mean training loss and the gradient or
    /// pseudo-gradient, canonical order.
    Share {
        /// Mean training loss.
        loss: f32,
        /// Gradient or pseudo-gradient.
        values: Vec<Tensor>,
    },
    /// A share sent as its top-k entries (error feedback): the mean training
    /// loss, and the kept entries of the flattened vector.
    Sparse {
        /// Mean training loss.
        loss: f32,
        /// Flat indices, increasing.
        indices: Vec<u32>,
        /// Their values.
        values: Vec<f32>,
    },
    /// A pipeline stage's pass.
    Stage(StageOutput),
}

/// The kept entries of `values` (each tensor's residual added) under
/// `feedback`, as indices into the flattened concatenation.
fn sparsify(
    feedback: &mut ErrorFeedback,
    values: &[Tensor],
    keep_ppm: u32,
) -> Result<(Vec<u32>, Vec<f32>), ShareError> {
    if keep_ppm == 0 || keep_ppm > 1_000_000 {
        return Err(ShareError::Shape {
            reason: format!("top-k keeps {keep_ppm} per million (1 to 1000000)"),
        });
    }
    let sparse = feedback
        .compress(values, f64::from(keep_ppm) / 1e6)
        .map_err(ShareError::Compute)?;
    let (mut indices, mut kept) = (Vec::new(), Vec::new());
    let mut offset = 0u32;
    for (t, s) in values.iter().zip(&sparse) {
        indices.extend(s.indices().iter().map(|&i| offset + i));
        kept.extend_from_slice(s.values());
        offset += t.elem_count() as u32;
    }
    Ok((indices, kept))
}

struct Job {
    unit: GradientUnit,
    issuer: NodeId,
    params: Blob,
    data: Blob,
    queued: Instant,
    reply: oneshot::Sender<Result<Computed, ShareError>>,
}

/// The thread that computes gradient units, fed by a bounded channel.
#[derive(Debug, Clone)]
pub struct Trainer {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("round", &self.unit.round)
            .field("share", &self.unit.share)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// Starts the thread. `delay` holds every unit back that long before it
    /// is computed (test builds use it to make a node slow; zero otherwise).
    ///
    /// # Errors
    /// When the thread cannot start.
    pub fn spawn(delay: Duration) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || work(rx, delay))?;
        Ok(Self { tx })
    }

    /// Computes `unit` of `issuer` with its fetched parameters and data
    /// (a top-k unit adds, and updates, the residual of that issuer's run).
    ///
    /// # Errors
    /// [`ShareError::Stopped`] when the thread is gone; what the computation
    /// gives otherwise.
    pub async fn compute(
        &self,
        unit: GradientUnit,
        issuer: NodeId,
        params: Blob,
        data: Blob,
    ) -> Result<Computed, ShareError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            unit,
            issuer,
            params,
            data,
            queued: Instant::now(),
            reply,
        };
        self.tx.send(job).await.map_err(|_| ShareError::Stopped)?;
        rx.await.map_err(|_| ShareError::Stopped)?
    }

    /// Whether a unit would wait for room in the queue.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.tx.capacity() == 0
    }
}

fn work(mut rx: mpsc::Receiver<Job>, delay: Duration) {
    let mut models: VecDeque<(Hash, Arc<Model>)> = VecDeque::new();
    let mut stages: VecDeque<(Hash, Arc<Stage>)> = VecDeque::new();
    let mut residuals: VecDeque<((NodeId, JobId), ErrorFeedback)> = VecDeque::new();
    let mut tokens: Option<(Blob, Arc<Vec<u32>>)> = None;
    while let Some(job) = rx.blocking_recv() {
        let queued = job.queued.elapsed();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let started = Instant::now();
        let outcome = (|| {
            let toks = match &tokens {
                Some((blob, t)) if Arc::ptr_eq(blob, &job.data) => t.clone(),
                _ => {
                    let t = Arc::new(tokens_from_bytes(&job.data).ok_or(ShareError::DataFormat)?);
                    tokens = Some((job.data.clone(), t.clone()));
                    t
                }
            };
            let top_k = match job.unit.encoding {
                GradientEncoding::TopK { keep_ppm } => Some(keep_ppm),
                _ => None,
            };
            if matches!(job.unit.mode, GradientMode::Stage { .. }) {
                if top_k.is_some() {
                    return Err(ShareError::Shape {
                        reason: "stage units travel dense; top-k is for shares".into(),
                    });
                }
                let stage = stage_for(&mut stages, &job.unit, &job.params)?;
                return compute_stage(&stage, &toks, &job.unit).map(Produced::Stage);
            }
            let model = model_for(&mut models, &job.unit, &job.params)?;
            let (loss, values) = compute(&model, &toks, &job.unit)?;
            let Some(keep_ppm) = top_k else {
                return Ok(Produced::Share { loss, values });
            };
            let key = (job.issuer, job.unit.job);
            let at = match residuals.iter().position(|(k, _)| *k == key) {
                Some(i) => i,
                None => {
                    if residuals.len() == RESIDUALS_KEPT {
                        residuals.pop_front();
                    }
                    residuals.push_back((key, ErrorFeedback::new(model.params())));
                    residuals.len() - 1
                }
            };
            let feedback = &mut residuals[at].1;
            let (indices, values) = match sparsify(feedback, &values, keep_ppm) {
                // A run whose model changed shape starts a new residual.
                Err(ShareError::Compute(_)) => {
                    *feedback = ErrorFeedback::new(model.params());
                    sparsify(feedback, &values, keep_ppm)?
                }
                other => other?,
            };
            Ok(Produced::Sparse {
                loss,
                indices,
                values,
            })
        })();
        let _ = job.reply.send(outcome.map(|output| Computed {
            output,
            queued,
            compute: started.elapsed(),
        }));
    }
}

/// The model of the unit's checkpoint: kept from an earlier unit, or loaded
/// and checked against the unit's params root.
fn model_for(
    models: &mut VecDeque<(Hash, Arc<Model>)>,
    unit: &GradientUnit,
    params: &Blob,
) -> Result<Arc<Model>, ShareError> {
    let id = unit.params.checkpoint;
    if let Some((_, m)) = models.iter().find(|(k, _)| *k == id) {
        let m = m.clone();
        check_root(&m, unit)?;
        return Ok(m);
    }
    let checkpoint = commons_train::Checkpoint::from_bytes(params.to_vec());
    let (model, _) =
        Model::from_checkpoint(&checkpoint, &Device::Cpu).map_err(ShareError::Checkpoint)?;
    let model = Arc::new(model);
    check_root(&model, unit)?;
    if models.len() == MODELS_KEPT {
        models.pop_front();
    }
    models.push_back((id, model.clone()));
    Ok(model)
}

/// The pipeline stage of the unit's checkpoint: kept from an earlier unit,
/// or loaded and checked against the unit's params root.
fn stage_for(
    stages: &mut VecDeque<(Hash, Arc<Stage>)>,
    unit: &GradientUnit,
    params: &Blob,
) -> Result<Arc<Stage>, ShareError> {
    let id = unit.params.checkpoint;
    if let Some((_, s)) = stages.iter().find(|(k, _)| *k == id) {
        let s = s.clone();
        check_params(s.params(), unit)?;
        return Ok(s);
    }
    let checkpoint = commons_train::Checkpoint::from_bytes(params.to_vec());
    let stage =
        Stage::from_checkpoint(&checkpoint, &Device::Cpu).map_err(ShareError::Checkpoint)?;
    let stage = Arc::new(stage);
    check_params(stage.params(), unit)?;
    if stages.len() == STAGES_KEPT {
        stages.pop_front();
    }
    stages.push_back((id, stage.clone()));
    Ok(stage)
}

fn check_root(model: &Model, unit: &GradientUnit) -> Result<(), ShareError> {
    check_params(model.params(), unit)
}

fn check_params(params: &commons_train::Params, unit: &GradientUnit) -> Result<(), ShareError> {
    let root = params.root().map_err(ShareError::Compute)?;
    let actual = Hash(*root.as_bytes());
    if actual != unit.params.root {
        return Err(ShareError::Root {
            expected: unit.params.root,
            actual,
        });
    }
    Ok(())
}

/// Runs an admitted gradient unit: fetches its parameters and data with
/// `fetch` (by blake3 id, from the issuer), computes it on `trainer`, and
/// returns the signed result or a signed refusal.
#[allow(clippy::too_many_arguments)]
pub async fn serve<F, Fut>(
    trainer: &Trainer,
    identity: &Identity,
    id: UnitId,
    issuer: NodeId,
    unit: GradientUnit,
    fetch: F,
    now: impl Fn() -> UnixMillis,
) -> UnitAnswer
where
    F: Fn(Hash) -> Fut,
    Fut: std::future::Future<Output = Result<Blob, String>>,
{
    let outcome = async {
        let fetched = |what: &'static str| {
            move |e: String| {
                Refusal::new(
                    ErrorCode::MODEL_NOT_HELD,
                    format!("cannot fetch the {what} from the issuer: {e}"),
                    Some(id),
                )
            }
        };
        let params = fetch(unit.params.checkpoint)
            .await
            .map_err(fetched("parameters"))?;
        let data = fetch(unit.data.blob).await.map_err(fetched("data"))?;
        let encoding = unit.encoding;
        let b = unit.batch;
        let steps = match unit.mode {
            GradientMode::LocalSteps { steps, .. } => steps,
            _ => 1,
        };
        let computed = trainer
            .compute(unit, issuer, params, data)
            .await
            .map_err(|e| Refusal::new(e.code(), e.describe(), Some(id)))?;
        let internal = |m: String| Refusal::new(ErrorCode::INTERNAL, m, Some(id));
        let scalar = |values: &[f32]| {
            commons_protocol::Tensor::from_f32(&[values.len() as u64], values)
                .map_err(|e| internal(e.to_string()))
        };
        let mut outputs = match &computed.output {
            Produced::Share { loss, values } => vec![
                scalar(&[*loss])?,
                encode_values(values, encoding).map_err(internal)?,
            ],
            Produced::Sparse {
                loss,
                indices,
                values,
            } => vec![
                scalar(&[*loss])?,
                commons_protocol::Tensor::from_u32(&[indices.len() as u64], indices)
                    .map_err(|e| internal(e.to_string()))?,
                scalar(values)?,
            ],
            Produced::Stage(StageOutput::Forward(hidden)) => {
                vec![to_wire(hidden).map_err(internal)?]
            }
            Produced::Stage(StageOutput::Backward {
                loss,
                params,
                input,
            }) => vec![
                scalar(loss.as_slice())?,
                encode_values(params, encoding).map_err(internal)?,
                match input {
                    Some(g) => to_wire(g).map_err(internal)?,
                    None => scalar(&[])?,
                },
            ],
        };
        if crate::fault::corrupt(&mut outputs) {
            tracing::warn!(unit = %id, "fault: corrupted the result");
        }
        let rows = u64::from(b.rows_end.saturating_sub(b.rows_start));
        let tokens = rows * u64::from(b.seq_len) * u64::from(steps);
        let metrics = ExecMetrics {
            queue_micros: computed.queued.as_micros() as u64,
            compute_micros: computed.compute.as_micros() as u64,
            tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
            peak_memory_bytes: 0,
        };
        let t = now();
        WorkResult::sign(
            identity,
            id,
            outputs,
            metrics,
            t,
            t.plus_millis(REPLY_TTL_MS),
        )
        .map_err(|e| internal(e.to_string()))
    }
    .await;
    match outcome.and_then(|result| {
        Envelope::seal(identity, &result)
            .map_err(|e| Refusal::new(ErrorCode::TOO_LARGE, e.to_string(), Some(id)))
    }) {
        Ok(envelope) => UnitAnswer {
            bytes: envelope.to_bytes(),
            refused: None,
        },
        Err(refusal) => UnitAnswer::refusal(identity, &refusal, now()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commons_protocol::messages::{AdamWParams, BatchSpec, DataShardRef, ParamsRef};
    use commons_protocol::{CoalitionId, JobId};
    use commons_train::data::token_bytes;
    use commons_train::{CharTokenizer, Corpus, ModelConfig};

    fn corpus() -> Corpus {
        let text = "the cat sees the mat. a dog finds my hat. one fox likes the box. ".repeat(40);
        let tokenizer = CharTokenizer::from_text(&text);
        Corpus::from_text(&text, &tokenizer).unwrap()
    }

    fn model(vocab: usize) -> Model {
        let config = ModelConfig {
            n_layers: 1,
            ..ModelConfig::tiny(vocab)
        };
        Model::new(config, 5, &Device::Cpu).unwrap()
    }

    fn unit(model: &Model, tokens: &[u32], mode: GradientMode) -> GradientUnit {
        let checkpoint = model.checkpoint(None).unwrap();
        GradientUnit {
            job: JobId([1; 16]),
            round: 0,
            share: 1,
            params: ParamsRef {
                root: Hash(*model.params().root().unwrap().as_bytes()),
                checkpoint: Hash(*checkpoint.id().as_bytes()),
            },
            data: DataShardRef {
                blob: Hash(*blake3::hash(&token_bytes(tokens)).as_bytes()),
                shard: Hash(*shard_id(tokens).as_bytes()),
            },
            batch: BatchSpec {
                seed: 3,
                step: 7,
                batch_size: 6,
                seq_len: 16,
                rows_start: 2,
                rows_end: 4,
            },
            mode,
            encoding: GradientEncoding::F32,
            coalition: None::<CoalitionId>,
            inputs: Vec::new(),
        }
    }

    #[test]
    fn a_share_is_the_gradient_of_its_rows_and_travels_exactly() {
        let c = corpus();
        let m = model(c.vocab_size());
        let tokens = c.tokens();
        let u = unit(&m, tokens, GradientMode::Gradient);
        let (loss, values) = compute(&m, tokens, &u).unwrap();
        // By hand: rows 2..4 of batch step 7 drawn with seed 3.
        let batch = sample_batch(tokens, &shard_id(tokens), 3, 7, 6, 16)
            .unwrap()
            .rows(2..4)
            .unwrap();
        let (l, g) = gradients(&m, &batch).unwrap();
        assert_eq!(loss.to_bits(), l.to_bits());
        let flat = commons_train::params::flatten(&g).unwrap();
        let wire = encode_values(&values, GradientEncoding::F32).unwrap();
        assert_eq!(wire.elem_count() as usize, m.params().num_elements());
        let back = decode_values(&wire, GradientEncoding::F32, flat.len()).unwrap();
        assert_eq!(back, flat, "f32 values arrive bit for bit");
        // bf16 halves the bytes and keeps about three digits.
        let half = encode_values(&values, GradientEncoding::Bf16).unwrap();
        assert_eq!(half.data().len() * 2, wire.data().len());
        let approx = decode_values(&half, GradientEncoding::Bf16, flat.len()).unwrap();
        for (a, b) in approx.iter().zip(&flat) {
            assert!((a - b).abs() <= b.abs() / 128.0, "{a} vs {b}");
        }
        assert!(decode_values(&half, GradientEncoding::F32, flat.len()).is_err());
        assert!(decode_values(&wire, GradientEncoding::F32, flat.len() + 1).is_err());
    }

    #[test]
    fn local_steps_are_a_fresh_diloco_round() {
        let c = corpus();
        let m = model(c.vocab_size());
        let tokens = c.tokens();
        let optimizer = AdamWParams {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let u = unit(
            &m,
            tokens,
            GradientMode::LocalSteps {
                steps: 3,
                optimizer,
            },
        );
        let (loss, delta) = compute(&m, tokens, &u).unwrap();
        let config = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut worker = DilocoWorker::new(&m, config).unwrap();
        let (expected, l) = worker
            .round(
                &m.params().snapshot().unwrap(),
                &batches(tokens, &u).unwrap(),
            )
            .unwrap();
        assert_eq!(loss.to_bits(), l.to_bits());
        assert_eq!(
            commons_train::params::tensors_digest(&delta).unwrap(),
            commons_train::params::tensors_digest(&expected).unwrap()
        );
        // The unit's model is untouched: a second computation gives the same bits.
        let (_, again) = compute(&m, tokens, &u).unwrap();
        assert_eq!(
            commons_train::params::tensors_digest(&again).unwrap(),
            commons_train::params::tensors_digest(&delta).unwrap()
        );
    }

    #[test]
    fn units_that_do_not_fit_their_data_are_refused() {
        let c = corpus();
        let m = model(c.vocab_size());
        let tokens = c.tokens();
        let mut u = unit(&m, tokens, GradientMode::Gradient);
        u.data.shard.0[0] ^= 1;
        assert!(matches!(
            compute(&m, tokens, &u),
            Err(ShareError::Shard { .. })
        ));
        let mut u = unit(&m, tokens, GradientMode::Gradient);
        u.batch.rows_end = 7;
        assert!(matches!(
            compute(&m, tokens, &u),
            Err(ShareError::Shape { .. })
        ));
        u.batch.rows_end = 4;
        u.batch.seq_len = 1_000;
        assert!(matches!(
            compute(&m, tokens, &u),
            Err(ShareError::Shape { .. })
        ));
        let small = model(3);
        let u = unit(&small, tokens, GradientMode::Gradient);
        assert!(matches!(
            compute(&small, tokens, &u),
            Err(ShareError::Vocab { .. })
        ));
        let e = ShareError::Vocab {
            id: 5,
            vocab_size: 3,
        };
        assert_eq!(e.code(), ErrorCode::BAD_REQUEST);
    }

    #[test]
    fn stage_units_chained_give_the_whole_models_gradient() {
        let c = corpus();
        let tokens = c.tokens();
        let config = ModelConfig {
            n_layers: 3,
            ..ModelConfig::tiny(c.vocab_size())
        };
        let m = Model::new(config, 5, &Device::Cpu).unwrap();
        let ranges = commons_train::even_ranges(3, 3).unwrap();
        let stages = m.split(&ranges).unwrap();
        let stage_unit = |s: usize, pass: StagePass, inputs: Vec<commons_protocol::Tensor>| {
            let stage = &stages[s];
            let mut u = unit(&m, tokens, GradientMode::Gradient);
            u.params = ParamsRef {
                root: Hash(*stage.params().root().unwrap().as_bytes()),
                checkpoint: Hash(*stage.checkpoint().unwrap().id().as_bytes()),
            };
            u.mode = GradientMode::Stage {
                layers: commons_protocol::messages::LayerRange {
                    start: ranges[s].start as u32,
                    end: ranges[s].end as u32,
                },
                pass,
            };
            u.inputs = inputs;
            u
        };
        let forward = |s: usize, inputs| match compute_stage(
            &stages[s],
            tokens,
            &stage_unit(s, StagePass::Forward, inputs),
        )
        .unwrap()
        {
            StageOutput::Forward(h) => to_wire(&h).unwrap(),
            StageOutput::Backward { .. } => panic!("a forward unit gives hidden states"),
        };
        let backward = |s: usize, inputs| match compute_stage(
            &stages[s],
            tokens,
            &stage_unit(s, StagePass::Backward, inputs),
        )
        .unwrap()
        {
            StageOutput::Backward {
                loss,
                params,
                input,
            } => (loss, params, input.map(|g| to_wire(&g).unwrap())),
            StageOutput::Forward(_) => panic!("a backward unit gives gradients"),
        };
        let h0 = forward(0, vec![]);
        let h1 = forward(1, vec![h0.clone()]);
        let (loss, g2, d1) = backward(2, vec![h1.clone()]);
        let d1 = d1.unwrap();
        let (none, g1, d0) = backward(1, vec![h0.clone(), d1]);
        let (_, g0, first) = backward(0, vec![d0.unwrap()]);
        assert!(none.is_none() && first.is_none());
        let merged = m.merge_stage_gradients(&stages, &[g0, g1, g2]).unwrap();
        // Rows 2..4 of batch step 7, as the unit names them.
        let batch = sample_batch(tokens, &shard_id(tokens), 3, 7, 6, 16)
            .unwrap()
            .rows(2..4)
            .unwrap();
        let (l, reference) = gradients(&m, &batch).unwrap();
        assert!((loss.unwrap() - l).abs() <= 1e-6 * l.abs());
        let a = commons_train::params::flatten(&merged).unwrap();
        let b = commons_train::params::flatten(&reference).unwrap();
        let norm = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        assert!(err <= 1e-5 * norm, "‖Δg‖ {err} for ‖g‖ {norm}");

        // Units that do not fit the stage are refused.
        let refused = |s: usize, pass, inputs| {
            compute_stage(&stages[s], tokens, &stage_unit(s, pass, inputs)).unwrap_err()
        };
        assert!(matches!(
            refused(2, StagePass::Forward, vec![h1.clone()]),
            ShareError::Shape { .. }
        ));
        assert!(matches!(
            refused(1, StagePass::Forward, vec![]),
            ShareError::Shape { .. }
        ));
        assert!(matches!(
            refused(1, StagePass::Backward, vec![h0.clone()]),
            ShareError::Shape { .. }
        ));
        assert!(matches!(
            refused(0, StagePass::Forward, vec![h0.clone()]),
            ShareError::Shape { .. }
        ));
        let short = commons_protocol::Tensor::from_f32(&[1], &[0.0]).unwrap();
        assert!(matches!(
            refused(1, StagePass::Forward, vec![short]),
            ShareError::Shape { .. }
        ));
        let mut wrong = stage_unit(1, StagePass::Forward, vec![h0]);
        wrong.mode = GradientMode::Stage {
            layers: commons_protocol::messages::LayerRange { start: 0, end: 2 },
            pass: StagePass::Forward,
        };
        assert!(matches!(
            compute_stage(&stages[1], tokens, &wrong),
            Err(ShareError::Shape { .. })
        ));
    }

    #[tokio::test]
    async fn top_k_units_carry_each_issuers_residual_into_the_next() {
        let c = corpus();
        let m = model(c.vocab_size());
        let tokens = c.tokens();
        let mut u = unit(&m, tokens, GradientMode::Gradient);
        u.encoding = GradientEncoding::TopK { keep_ppm: 50_000 };
        let params: Blob = Arc::new(m.checkpoint(None).unwrap().bytes().to_vec());
        let data: Blob = Arc::new(token_bytes(tokens));
        let trainer = Trainer::spawn(Duration::ZERO).unwrap();
        let sparse = |computed: Computed| match computed.output {
            Produced::Sparse {
                indices, values, ..
            } => (indices, values),
            other => panic!("a top-k unit gives a sparse share, not {other:?}"),
        };
        let (alice, bob) = (NodeId([1; 32]), NodeId([2; 32]));
        let run = |issuer| {
            let (u, p, d) = (u.clone(), params.clone(), data.clone());
            let trainer = trainer.clone();
            async move { sparse(trainer.compute(u, issuer, p, d).await.unwrap()) }
        };
        let first = run(alice).await;
        let second = run(alice).await;
        let other = run(bob).await;
        // The same error feedback, by hand.
        let (_, g) = compute(&m, tokens, &u).unwrap();
        let mut feedback = ErrorFeedback::new(m.params());
        let expected_first = sparsify(&mut feedback, &g, 50_000).unwrap();
        let expected_second = sparsify(&mut feedback, &g, 50_000).unwrap();
        assert_eq!(first, expected_first);
        assert_eq!(second, expected_second);
        assert_ne!(first, second, "the residual enters the second share");
        assert_eq!(other, first, "another issuer has its own residual");
        let n = m.params().num_elements();
        assert!(first.0.len() < n / 10, "{} of {n} entries", first.0.len());
        assert!(first.0.windows(2).all(|w| w[0] < w[1]));
        // Sent over both shares plus what is left equals both gradients.
        let residual =
            commons_train::params::flatten(&feedback.residuals(&Device::Cpu).unwrap()).unwrap();
        let flat = commons_train::params::flatten(&g).unwrap();
        let mut total = residual.clone();
        for (indices, values) in [&first, &second] {
            for (&i, &v) in indices.iter().zip(values) {
                total[i as usize] += v;
            }
        }
        for (t, x) in total.iter().zip(&flat) {
            assert!(
                (t - 2.0 * x).abs() <= 1e-6 * (1.0 + x.abs()),
                "{t} vs {}",
                2.0 * x
            );
        }
        // A fraction out of range is refused.
        let mut bad = u.clone();
        bad.encoding = GradientEncoding::TopK { keep_ppm: 0 };
        assert!(matches!(
            trainer
                .compute(bad, alice, params.clone(), data.clone())
                .await,
            Err(ShareError::Shape { .. })
        ));
    }

    #[tokio::test]
    async fn the_thread_computes_checks_the_root_and_signs() {
        let c = corpus();
        let m = model(c.vocab_size());
        let tokens = c.tokens();
        let u = unit(&m, tokens, GradientMode::Gradient);
        let params: Blob = Arc::new(m.checkpoint(None).unwrap().bytes().to_vec());
        let data: Blob = Arc::new(token_bytes(tokens));
        let trainer = Trainer::spawn(Duration::ZERO).unwrap();
        let done = trainer
            .compute(u.clone(), NodeId([1; 32]), params.clone(), data.clone())
            .await
            .unwrap();
        let (loss, _) = compute(&m, tokens, &u).unwrap();
        let Produced::Share { loss: got, .. } = done.output else {
            panic!("a share's unit gives a share");
        };
        assert_eq!(got.to_bits(), loss.to_bits());
        // Parameters that are not the ones named.
        let mut wrong = u.clone();
        wrong.params.root.0[3] ^= 1;
        assert!(matches!(
            trainer
                .compute(wrong, NodeId([1; 32]), params.clone(), data.clone())
                .await,
            Err(ShareError::Root { .. })
        ));
        // Signed and committed, through `serve`.
        let identity = Identity::from_secret([9; 32]);
        let (p, d) = (params.clone(), data.clone());
        let fetch = move |h: Hash| {
            let blob = if h == u.params.checkpoint {
                Ok(p.clone())
            } else if h == u.data.blob {
                Ok(d.clone())
            } else {
                Err("unknown".to_owned())
            };
            async move { blob }
        };
        let id = UnitId(Hash([4; 32]));
        let answer = serve(
            &trainer,
            &identity,
            id,
            NodeId([1; 32]),
            unit(&m, tokens, GradientMode::Gradient),
            &fetch,
            || UnixMillis(10),
        )
        .await;
        assert!(answer.refused.is_none());
        let result: WorkResult = Envelope::open_bytes(&answer.bytes, UnixMillis(10)).unwrap();
        result.verify().unwrap();
        assert_eq!(result.unit, id);
        assert_eq!(result.outputs.len(), 2);
        assert_eq!(result.outputs[0].to_f32().unwrap(), vec![loss]);
        // A file the issuer does not have: refused, not computed.
        let mut lost = unit(&m, tokens, GradientMode::Gradient);
        lost.data.blob.0[0] ^= 1;
        let answer = serve(
            &trainer,
            &identity,
            id,
            NodeId([1; 32]),
            lost,
            &fetch,
            || UnixMillis(10),
        )
        .await;
        assert_eq!(answer.refused, Some(ErrorCode::MODEL_NOT_HELD));
    }
}
