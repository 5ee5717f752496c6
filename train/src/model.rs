//! A llama-architecture decoder for training from scratch: token embeddings,
//! blocks of RMSNorm → causal multi-head attention with rotary embeddings →
//! residual → RMSNorm → SwiGLU MLP → residual, a final RMSNorm and an output
//! head (tied to the embeddings or not).
//!
//! Every operation is built from candle's differentiable primitives (no fused
//! kernels without a backward pass), so `Tensor::backward` reaches every
//! parameter. A [`Stage`] is the part of the model that one pipeline stage
//! holds: a range of layers, plus the embeddings on the first stage and the
//! final norm and head on the last. A [`Model`] is the stage that holds
//! everything.
//!
//! Parameter names follow Meta's llama checkpoints:
//! `tok_embeddings.weight`, `layers.{i}.attention.{wq,wk,wv,wo}.weight`,
//! `layers.{i}.attention_norm.weight`,
//! `layers.{i}.feed_forward.{w1,w2,w3}.weight` (gate, down, up),
//! `layers.{i}.ffn_norm.weight`, `norm.weight` and `output.weight`.
//! Linear weights are `(out, in)`.

use std::ops::Range;

use candle_core::{D, DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::data::Batch;
use crate::params::{Checkpoint, CheckpointError, Params};
use crate::tokenizer::CharTokenizer;
use crate::{Error, Result};

const INIT_DOMAIN: &str = "commons train init v1";

/// The shape of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub dim: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Attention heads; `dim / n_heads` must be even.
    pub n_heads: usize,
    /// Width of the SwiGLU hidden layer.
    pub hidden_dim: usize,
    /// Longest sequence the model takes.
    pub max_seq_len: usize,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f64,
    /// Added to the mean square in RMSNorm.
    pub norm_eps: f64,
    /// Whether the output head reuses the token embeddings.
    pub tie_embeddings: bool,
    /// Standard deviation of the initial weights (the residual projections
    /// `wo` and `w2` get it divided by `sqrt(2 * n_layers)`).
    pub init_std: f64,
}

impl ModelConfig {
    /// A model for tests: 2 layers, width 32, 4 heads, hidden 64, sequences
    /// up to 64, untied head.
    #[must_use]
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            dim: 32,
            n_layers: 2,
            n_heads: 4,
            hidden_dim: 64,
            max_seq_len: 64,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: false,
            init_std: 0.02,
        }
    }

    /// About 7.4 million parameters for a character vocabulary: 6 layers,
    /// width 320, 8 heads, hidden 864, sequences up to 256, tied embeddings.
    #[must_use]
    pub fn small(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            dim: 320,
            n_layers: 6,
            n_heads: 8,
            hidden_dim: 864,
            max_seq_len: 256,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            init_std: 0.02,
        }
    }

    /// Width of one attention head.
    #[must_use]
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads.max(1)
    }

    /// Checks that the shape is one the model can take.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        let fail = |reason: &str| {
            Err(Error::Config {
                reason: reason.to_owned(),
            })
        };
        if self.vocab_size == 0 || self.dim == 0 || self.hidden_dim == 0 {
            return fail("vocabulary, width and hidden width must be positive");
        }
        if self.n_layers == 0 || self.max_seq_len == 0 {
            return fail("layers and sequence length must be positive");
        }
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return fail("the width must divide into the heads");
        }
        if !self.head_dim().is_multiple_of(2) {
            return fail("rotary embeddings need an even head width");
        }
        if !(self.rope_theta > 0.0 && self.norm_eps > 0.0 && self.init_std > 0.0) {
            return fail("rope theta, norm epsilon and init std must be positive");
        }
        Ok(())
    }

    /// Names and shapes of the parameters a stage over `layers` holds, in
    /// canonical order (the whole model for `0..n_layers`).
    #[must_use]
    pub fn stage_params(&self, layers: Range<usize>) -> Vec<(String, Vec<usize>)> {
        let (d, h, v) = (self.dim, self.hidden_dim, self.vocab_size);
        let mut out = Vec::new();
        let first = layers.start == 0;
        let last = layers.end == self.n_layers;
        if first || (last && self.tie_embeddings) {
            out.push(("tok_embeddings.weight".to_owned(), vec![v, d]));
        }
        for i in layers {
            let p = format!("layers.{i}");
            for w in ["wq", "wk", "wv", "wo"] {
                out.push((format!("{p}.attention.{w}.weight"), vec![d, d]));
            }
            out.push((format!("{p}.attention_norm.weight"), vec![d]));
            out.push((format!("{p}.feed_forward.w1.weight"), vec![h, d]));
            out.push((format!("{p}.feed_forward.w2.weight"), vec![d, h]));
            out.push((format!("{p}.feed_forward.w3.weight"), vec![h, d]));
            out.push((format!("{p}.ffn_norm.weight"), vec![d]));
        }
        if last {
            out.push(("norm.weight".to_owned(), vec![d]));
            if !self.tie_embeddings {
                out.push(("output.weight".to_owned(), vec![v, d]));
            }
        }
        out.sort();
        out
    }

    /// Parameters of the whole model.
    #[must_use]
    pub fn num_params(&self) -> usize {
        self.stage_params(0..self.n_layers)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// Fresh parameters for the stage over `layers`, drawn deterministically:
    /// each parameter from its own ChaCha8 stream keyed by blake3 (domain
    /// `commons train init v1`) of `seed` and its name, so that a stage's
    /// parameters equal the same parameters of the whole model. Norm weights
    /// start at one, everything else normal with [`ModelConfig::init_std`].
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid shape or range.
    pub fn init_params(&self, layers: Range<usize>, seed: u64, device: &Device) -> Result<Params> {
        self.validate()?;
        self.check_range(&layers)?;
        let residual_std = self.init_std / ((2 * self.n_layers) as f64).sqrt();
        let tensors = self
            .stage_params(layers)
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = if name.ends_with("norm.weight") {
                    vec![1.0; n]
                } else {
                    let std = if name.ends_with(".wo.weight") || name.ends_with(".w2.weight") {
                        residual_std
                    } else {
                        self.init_std
                    };
                    let mut hasher = blake3::Hasher::new_derive_key(INIT_DOMAIN);
                    hasher.update(&seed.to_le_bytes());
                    hasher.update(name.as_bytes());
                    let mut rng = ChaCha8Rng::from_seed(*hasher.finalize().as_bytes());
                    (0..n)
                        .map(|_| (rng.sample::<f64, _>(StandardNormal) * std) as f32)
                        .collect()
                };
                Ok((name, Tensor::from_vec(values, shape, device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Params::from_tensors(tensors)
    }

    fn check_range(&self, layers: &Range<usize>) -> Result<()> {
        if layers.start >= layers.end || layers.end > self.n_layers {
            return Err(Error::Config {
                reason: format!(
                    "layer range {}..{} is empty or past the {} layers",
                    layers.start, layers.end, self.n_layers
                ),
            });
        }
        Ok(())
    }
}

/// One transformer block's weights (tensors sharing the variables' storage
/// and identity, so gradients reach the variables).
#[derive(Debug, Clone)]
struct Block {
    attention_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
}

/// The part of a model that one pipeline stage holds: a range of layers, the
/// embeddings if it is the first, the final norm and head if it is the last.
///
/// With tied embeddings the first and last stages each hold a copy of
/// `tok_embeddings.weight`; their gradients for it must be summed (as
/// [`Model::merge_stage_gradients`] does) before either is updated.
///
/// Cloning shares the parameters.
#[derive(Debug, Clone)]
pub struct Stage {
    config: ModelConfig,
    layers: Range<usize>,
    params: Params,
    embeddings: Option<Tensor>,
    blocks: Vec<Block>,
    head: Option<(Tensor, Tensor)>,
    cos: Tensor,
    sin: Tensor,
}

impl Stage {
    /// The stage over `layers` with these parameters, which must be exactly
    /// those [`ModelConfig::stage_params`] lists, with those shapes and dtype
    /// f32.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad shape or range, or parameters that are not
    /// the stage's; [`Error::MissingParam`], [`Error::ShapeMismatch`].
    pub fn new(config: ModelConfig, layers: Range<usize>, params: Params) -> Result<Self> {
        config.validate()?;
        config.check_range(&layers)?;
        let expected = config.stage_params(layers.clone());
        for (name, shape) in &expected {
            let var = params.require(name)?;
            if var.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: shape.clone(),
                    actual: var.dims().to_vec(),
                });
            }
            if var.dtype() != DType::F32 {
                return Err(Error::Config {
                    reason: format!("{name} is {:?}, parameters must be f32", var.dtype()),
                });
            }
        }
        if params.len() != expected.len() {
            let extra = params
                .names()
                .iter()
                .find(|n| !expected.iter().any(|(e, _)| e == *n))
                .cloned()
                .unwrap_or_default();
            return Err(Error::Config {
                reason: format!("parameter {extra} does not belong to layers {layers:?}"),
            });
        }
        let get = |name: &str| -> Result<Tensor> { Ok(params.require(name)?.as_tensor().clone()) };
        let first = layers.start == 0;
        let last = layers.end == config.n_layers;
        let embeddings = if first {
            Some(get("tok_embeddings.weight")?)
        } else {
            None
        };
        let blocks = layers
            .clone()
            .map(|i| {
                let p = format!("layers.{i}");
                Ok(Block {
                    attention_norm: get(&format!("{p}.attention_norm.weight"))?,
                    wq: get(&format!("{p}.attention.wq.weight"))?,
                    wk: get(&format!("{p}.attention.wk.weight"))?,
                    wv: get(&format!("{p}.attention.wv.weight"))?,
                    wo: get(&format!("{p}.attention.wo.weight"))?,
                    ffn_norm: get(&format!("{p}.ffn_norm.weight"))?,
                    w1: get(&format!("{p}.feed_forward.w1.weight"))?,
                    w2: get(&format!("{p}.feed_forward.w2.weight"))?,
                    w3: get(&format!("{p}.feed_forward.w3.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = if last {
            let output = if config.tie_embeddings {
                get("tok_embeddings.weight")?
            } else {
                get("output.weight")?
            };
            Some((get("norm.weight")?, output))
        } else {
            None
        };
        let device = params
            .vars()
            .first()
            .map_or(Device::Cpu, |v| v.device().clone());
        let (cos, sin) = rope_tables(&config, &device)?;
        Ok(Self {
            config,
            layers,
            params,
            embeddings,
            blocks,
            head,
            cos,
            sin,
        })
    }

    /// The model's shape.
    #[must_use]
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The layers this stage computes.
    #[must_use]
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Whether it takes tokens (holds the embeddings).
    #[must_use]
    pub fn is_first(&self) -> bool {
        self.embeddings.is_some()
    }

    /// Whether it returns logits (holds the final norm and head).
    #[must_use]
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// Its parameters.
    #[must_use]
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The device its parameters are on.
    #[must_use]
    pub fn device(&self) -> &Device {
        self.cos.device()
    }

    /// Runs the stage. The first stage takes `(batch, seq)` `u32` tokens,
    /// the others `(batch, seq, dim)` hidden states; the last returns
    /// `(batch, seq, vocab)` logits, the others hidden states.
    ///
    /// # Errors
    /// [`Error::Batch`] for an input of the wrong kind or a sequence longer
    /// than the model takes; [`Error::Tensor`].
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let mut x = match &self.embeddings {
            Some(emb) => {
                let (b, t) = input.dims2().map_err(|_| Error::Batch {
                    reason: format!(
                        "the first stage takes (batch, seq) tokens, got {:?}",
                        input.dims()
                    ),
                })?;
                emb.index_select(&input.flatten_all()?, 0)?
                    .reshape((b, t, self.config.dim))?
            }
            None => {
                let ok = matches!(input.dims(), &[_, _, d] if d == self.config.dim);
                if !ok || input.dtype() != DType::F32 {
                    return Err(Error::Batch {
                        reason: format!(
                            "stage {:?} takes (batch, seq, {}) f32 hidden states, got {:?} {:?}",
                            self.layers,
                            self.config.dim,
                            input.dims(),
                            input.dtype()
                        ),
                    });
                }
                input.clone()
            }
        };
        let t = x.dim(1)?;
        if t == 0 || t > self.config.max_seq_len {
            return Err(Error::Batch {
                reason: format!(
                    "sequence of {t} where 1..={} is allowed",
                    self.config.max_seq_len
                ),
            });
        }
        let mask = causal_mask(t, x.device())?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        for block in &self.blocks {
            x = self.block_forward(block, &x, &mask, &cos, &sin)?;
        }
        if let Some((norm, output)) = &self.head {
            let x = rms_norm(&x, norm, self.config.norm_eps)?;
            return linear(&x, output);
        }
        Ok(x)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let heads = self.config.n_heads;
        let hd = self.config.head_dim();
        let h = rms_norm(x, &block.attention_norm, self.config.norm_eps)?;
        let split_heads = |w: &Tensor| -> Result<Tensor> {
            Ok(linear(&h, w)?
                .reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rope(&split_heads(&block.wq)?, cos, sin)?;
        let k = rope(&split_heads(&block.wk)?, cos, sin)?;
        let v = split_heads(&block.wv)?;
        let scores =
            (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?;
        let attn = softmax_last_dim(&scores)?.matmul(&v)?;
        let attn = attn.transpose(1, 2)?.contiguous()?.reshape((b, t, d))?;
        let x = (x + linear(&attn, &block.wo)?)?;
        let h = rms_norm(&x, &block.ffn_norm, self.config.norm_eps)?;
        let gate = linear(&h, &block.w1)?.silu()?;
        let up = linear(&h, &block.w3)?;
        let mlp = linear(&(gate * up)?, &block.w2)?;
        Ok((x + mlp)?)
    }
}

/// A whole model: the stage over all layers. Cloning shares the parameters.
#[derive(Debug, Clone)]
pub struct Model {
    stage: Stage,
}

/// The description a model's checkpoint carries in its metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointMeta {
    config: ModelConfig,
    tokenizer: Option<CharTokenizer>,
    /// The layers of a pipeline stage's checkpoint (`[start, end)`); absent
    /// for a whole model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layers: Option<(usize, usize)>,
}

impl Stage {
    /// A checkpoint of the stage's parameters whose metadata records the
    /// config and the layers, so that [`Stage::from_checkpoint`] needs
    /// nothing else.
    ///
    /// # Errors
    /// As [`Checkpoint::from_params`].
    pub fn checkpoint(&self) -> std::result::Result<Checkpoint, CheckpointError> {
        let meta = CheckpointMeta {
            config: self.config().clone(),
            tokenizer: None,
            layers: Some((self.layers.start, self.layers.end)),
        };
        let json = serde_json::to_string(&meta).map_err(CheckpointError::Metadata)?;
        Checkpoint::from_params(self.params(), Some(&json))
    }

    /// The stage of a checkpoint written by [`Stage::checkpoint`] (or the
    /// whole model, as the stage over every layer, for one written by
    /// [`Model::checkpoint`]).
    ///
    /// # Errors
    /// [`CheckpointError::Metadata`] when the description is missing or does
    /// not parse; [`CheckpointError::Params`] when the tensors do not fit it.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        device: &Device,
    ) -> std::result::Result<Self, CheckpointError> {
        let json = checkpoint.metadata()?.unwrap_or_default();
        let meta: CheckpointMeta =
            serde_json::from_str(&json).map_err(CheckpointError::Metadata)?;
        let layers = meta
            .layers
            .map_or(0..meta.config.n_layers, |(start, end)| start..end);
        let params = checkpoint.to_params(device)?;
        Self::new(meta.config, layers, params).map_err(CheckpointError::Params)
    }
}

impl Model {
    /// A freshly initialised model (see [`ModelConfig::init_params`]).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid shape; [`Error::Tensor`].
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let params = config.init_params(0..config.n_layers, seed, device)?;
        Self::from_params(config, params)
    }

    /// The model with these parameters.
    ///
    /// # Errors
    /// As [`Stage::new`].
    pub fn from_params(config: ModelConfig, params: Params) -> Result<Self> {
        let layers = 0..config.n_layers;
        Ok(Self {
            stage: Stage::new(config, layers, params)?,
        })
    }

    /// The model's shape.
    #[must_use]
    pub fn config(&self) -> &ModelConfig {
        &self.stage.config
    }

    /// Its parameters.
    #[must_use]
    pub fn params(&self) -> &Params {
        &self.stage.params
    }

    /// The device its parameters are on.
    #[must_use]
    pub fn device(&self) -> &Device {
        self.stage.device()
    }

    /// `(batch, seq, vocab)` logits of `(batch, seq)` `u32` tokens.
    ///
    /// # Errors
    /// As [`Stage::forward`].
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        self.stage.forward(tokens)
    }

    /// The mean next-token cross-entropy over every position of `batch`, as
    /// a scalar tensor that can be differentiated.
    ///
    /// # Errors
    /// As [`Stage::forward`].
    pub fn loss(&self, batch: &Batch) -> Result<Tensor> {
        let (inputs, targets) = batch.to_tensors(self.device())?;
        cross_entropy(&self.forward(&inputs)?, &targets)
    }

    /// The mean loss over `batches` (each weighted by its token count), with
    /// no gradients kept.
    ///
    /// # Errors
    /// [`Error::Batch`] for no batches; as [`Stage::forward`].
    pub fn eval_loss(&self, batches: &[Batch]) -> Result<f32> {
        let mut total = 0.0f64;
        let mut tokens = 0usize;
        for batch in batches {
            let n = batch.batch_size() * batch.seq_len();
            total += f64::from(self.loss(batch)?.detach().to_scalar::<f32>()?) * n as f64;
            tokens += n;
        }
        if tokens == 0 {
            return Err(Error::Batch {
                reason: "no evaluation batches".to_owned(),
            });
        }
        Ok((total / tokens as f64) as f32)
    }

    /// Copies of the model's parameters cut into stages over `ranges`, which
    /// must cover `0..n_layers` in order without gaps.
    ///
    /// # Errors
    /// [`Error::Config`] for ranges that do not tile the layers.
    pub fn split(&self, ranges: &[Range<usize>]) -> Result<Vec<Stage>> {
        let n = self.config().n_layers;
        let mut next = 0;
        for r in ranges {
            if r.start != next || r.end <= r.start {
                return Err(Error::Config {
                    reason: format!("stage ranges {ranges:?} do not tile layers 0..{n}"),
                });
            }
            next = r.end;
        }
        if next != n {
            return Err(Error::Config {
                reason: format!("stage ranges {ranges:?} do not tile layers 0..{n}"),
            });
        }
        ranges
            .iter()
            .map(|r| {
                let names = self.config().stage_params(r.clone());
                let tensors = names
                    .into_iter()
                    .map(|(name, _)| {
                        let t = self.params().require(&name)?.as_tensor().clone();
                        Ok((name, t))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Stage::new(
                    self.config().clone(),
                    r.clone(),
                    Params::from_tensors(tensors)?,
                )
            })
            .collect()
    }

    /// Stage gradients (each in its stage's canonical order) gathered into
    /// the model's canonical order; a parameter that several stages hold (tied
    /// embeddings) gets the sum of their gradients.
    ///
    /// # Errors
    /// [`Error::CountMismatch`] when a stage's list does not match it;
    /// [`Error::MissingParam`] when a parameter has no gradient from any
    /// stage.
    pub fn merge_stage_gradients(
        &self,
        stages: &[Stage],
        grads: &[Vec<Tensor>],
    ) -> Result<Vec<Tensor>> {
        if stages.len() != grads.len() {
            return Err(Error::CountMismatch {
                what: "stage gradient lists",
                expected: stages.len(),
                actual: grads.len(),
            });
        }
        let names = self.params().names();
        let mut merged: Vec<Option<Tensor>> = vec![None; names.len()];
        for (stage, grads) in stages.iter().zip(grads) {
            stage.params().check_shapes("stage gradients", grads)?;
            for (name, g) in stage.params().names().iter().zip(grads) {
                let i = names
                    .binary_search(name)
                    .map_err(|_| Error::MissingParam { name: name.clone() })?;
                merged[i] = Some(match merged[i].take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        merged
            .into_iter()
            .zip(names)
            .map(|(g, name)| g.ok_or_else(|| Error::MissingParam { name: name.clone() }))
            .collect()
    }

    /// A checkpoint of the parameters whose metadata records the config and,
    /// if given, the tokenizer, so that [`Model::from_checkpoint`] needs
    /// nothing else.
    ///
    /// # Errors
    /// As [`Checkpoint::from_params`].
    pub fn checkpoint(
        &self,
        tokenizer: Option<&CharTokenizer>,
    ) -> std::result::Result<Checkpoint, CheckpointError> {
        let meta = CheckpointMeta {
            config: self.config().clone(),
            tokenizer: tokenizer.cloned(),
            layers: None,
        };
        let json = serde_json::to_string(&meta).map_err(CheckpointError::Metadata)?;
        Checkpoint::from_params(self.params(), Some(&json))
    }

    /// The model (and tokenizer, if recorded) of a checkpoint written by
    /// [`Model::checkpoint`].
    ///
    /// # Errors
    /// [`CheckpointError::Metadata`] when the description is missing or does
    /// not parse; [`CheckpointError::Params`] when the tensors do not fit it.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        device: &Device,
    ) -> std::result::Result<(Self, Option<CharTokenizer>), CheckpointError> {
        let json = checkpoint.metadata()?.unwrap_or_default();
        let meta: CheckpointMeta =
            serde_json::from_str(&json).map_err(CheckpointError::Metadata)?;
        if let Some((start, end)) = meta.layers {
            return Err(CheckpointError::Params(Error::Config {
                reason: format!(
                    "the checkpoint holds pipeline stage {start}..{end}, not a whole model"
                ),
            }));
        }
        let params = checkpoint.to_params(device)?;
        let model = Self::from_params(meta.config, params).map_err(CheckpointError::Params)?;
        Ok((model, meta.tokenizer))
    }

    /// Continues `prompt` by `count` tokens, each drawn from the softmax of
    /// the last logits divided by `temperature` (greedy at 0) with a ChaCha8
    /// generator seeded by `seed`. The context is the last
    /// [`ModelConfig::max_seq_len`] tokens.
    ///
    /// # Errors
    /// [`Error::Batch`] for an empty prompt; [`Error::Tensor`].
    pub fn generate(
        &self,
        prompt: &[u32],
        count: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::Batch {
                reason: "generation needs a prompt".to_owned(),
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tokens = prompt.to_vec();
        for _ in 0..count {
            let start = tokens.len().saturating_sub(self.config().max_seq_len);
            let context = &tokens[start..];
            let input = Tensor::from_slice(context, (1, context.len()), self.device())?;
            let logits = self
                .forward(&input)?
                .detach()
                .narrow(1, context.len() - 1, 1)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            let next = if temperature <= 0.0 {
                argmax(&logits)
            } else {
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = logits
                    .iter()
                    .map(|l| ((l - max) / temperature).exp())
                    .collect();
                let mut draw = rng.random::<f64>() * weights.iter().sum::<f64>();
                let mut pick = weights.len() - 1;
                for (i, w) in weights.iter().enumerate() {
                    if draw < *w {
                        pick = i;
                        break;
                    }
                    draw -= w;
                }
                pick
            };
            tokens.push(next as u32);
        }
        Ok(tokens.split_off(prompt.len()))
    }
}

fn argmax(values: &[f64]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// Mean cross-entropy of `(…, vocab)` logits against `(…)` `u32` targets, as
/// a scalar tensor. The log-softmax subtracts the row maximum, detached (it
/// cancels in the value, so the gradient is unchanged).
///
/// # Errors
/// [`Error::Tensor`] when the shapes do not agree.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), vocab))?;
    let targets = targets.flatten_all()?;
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum_exp)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
}

/// `x · wᵀ` over the last dimension, for `(…, in)` inputs and `(out, in)`
/// weights.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let features = dims.pop().unwrap_or(0);
    let rows: usize = dims.iter().product();
    let y = x.reshape((rows, features))?.matmul(&w.t()?)?;
    dims.push(w.dim(0)?);
    Ok(y.reshape(dims)?)
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean_square + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `(t, t)` additive mask: 0 on and below the diagonal, −∞ above.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (t, t), device)?)
}

/// `(max_seq_len, head_dim)` cosines and sines of the rotary angles, each
/// half repeated, for the rotate-half formulation.
fn rope_tables(config: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = config.head_dim();
    let half = hd / 2;
    let mut cos = Vec::with_capacity(config.max_seq_len * hd);
    let mut sin = Vec::with_capacity(config.max_seq_len * hd);
    for pos in 0..config.max_seq_len {
        let angles: Vec<f64> = (0..half)
            .map(|i| pos as f64 / config.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        for _ in 0..2 {
            cos.extend(angles.iter().map(|a| a.cos() as f32));
            sin.extend(angles.iter().map(|a| a.sin() as f32));
        }
    }
    let shape = (config.max_seq_len, hd);
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

/// Rotary embedding of `(b, heads, t, hd)` by `(t, hd)` tables.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_matches_the_formula() {
        let c = ModelConfig::tiny(10);
        let (d, h, v, l) = (32, 64, 10, 2);
        let per_layer = 4 * d * d + 3 * d * h + 2 * d;
        assert_eq!(c.num_params(), 2 * v * d + l * per_layer + d);
        let small = ModelConfig::small(84);
        assert!(
            (5_000_000..20_000_000).contains(&small.num_params()),
            "{}",
            small.num_params()
        );
        let model = Model::new(c.clone(), 0, &Device::Cpu).unwrap();
        assert_eq!(model.params().num_elements(), c.num_params());
    }

    #[test]
    fn invalid_configs_are_refused() {
        let mut c = ModelConfig::tiny(10);
        c.n_heads = 3;
        assert!(c.validate().is_err());
        let mut c = ModelConfig::tiny(10);
        c.n_heads = 32; // head width 1: odd
        assert!(c.validate().is_err());
        let c = ModelConfig::tiny(10);
        assert!(c.init_params(1..1, 0, &Device::Cpu).is_err());
        assert!(c.init_params(0..3, 0, &Device::Cpu).is_err());
    }

    #[test]
    fn init_is_deterministic_and_stage_consistent() {
        let c = ModelConfig::tiny(10);
        let a = c.init_params(0..2, 5, &Device::Cpu).unwrap();
        let b = c.init_params(0..2, 5, &Device::Cpu).unwrap();
        assert_eq!(a.root().unwrap(), b.root().unwrap());
        assert_ne!(
            a.root().unwrap(),
            c.init_params(0..2, 6, &Device::Cpu)
                .unwrap()
                .root()
                .unwrap()
        );
        let stage = c.init_params(1..2, 5, &Device::Cpu).unwrap();
        let w = "layers.1.attention.wq.weight";
        let x = a
            .require(w)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = stage
            .require(w)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(x, y);
        assert!(stage.get("tok_embeddings.weight").is_none());
        assert!(stage.get("output.weight").is_some());
    }

    #[test]
    fn attention_is_causal() {
        let model = Model::new(ModelConfig::tiny(10), 1, &Device::Cpu).unwrap();
        let a = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1u32, 2, 3, 9, 0]], &Device::Cpu).unwrap();
        let la = model.forward(&a).unwrap().narrow(1, 0, 3).unwrap();
        let lb = model.forward(&b).unwrap().narrow(1, 0, 3).unwrap();
        assert_eq!(
            la.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            lb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "changing later tokens must not change earlier logits"
        );
        let la = model.forward(&a).unwrap().narrow(1, 3, 1).unwrap();
        let lb = model.forward(&b).unwrap().narrow(1, 3, 1).unwrap();
        assert_ne!(
            la.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            lb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn rotary_embedding_depends_on_relative_position() {
        // Scores q·k of rotated vectors depend only on the distance between
        // positions: shifting both by 3 keeps them.
        let c = ModelConfig::tiny(10);
        let (cos, sin) = rope_tables(&c, &Device::Cpu).unwrap();
        let hd = c.head_dim();
        let q = Tensor::arange(0f32, hd as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, hd))
            .unwrap();
        let k = (Tensor::ones((1, 1, 1, hd), DType::F32, &Device::Cpu).unwrap() * 0.5).unwrap();
        let at = |t: &Tensor, pos: usize| {
            rope(
                t,
                &cos.narrow(0, pos, 1).unwrap(),
                &sin.narrow(0, pos, 1).unwrap(),
            )
            .unwrap()
        };
        let score = |pq, pk| {
            (at(&q, pq) * at(&k, pk))
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((score(5, 2) - score(8, 5)).abs() < 1e-4);
        assert!((score(5, 2) - score(5, 4)).abs() > 1e-3);
    }

    #[test]
    fn cross_entropy_matches_a_hand_computation() {
        // Logits [0, ln 3] and target 1: p = 3/4, loss = ln(4/3).
        let logits = Tensor::new(&[[[0f32, 3f32.ln()]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[1u32]], &Device::Cpu).unwrap();
        let loss = cross_entropy(&logits, &targets)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((loss - (4f32 / 3.).ln()).abs() < 1e-6);
    }

    #[test]
    fn untrained_loss_is_near_uniform() {
        let model = Model::new(ModelConfig::tiny(16), 3, &Device::Cpu).unwrap();
        let batch = Batch::new(1, 8, (0..8).collect(), (1..9).collect()).unwrap();
        let loss = model.loss(&batch).unwrap().to_scalar::<f32>().unwrap();
        assert!((loss - 16f32.ln()).abs() < 0.1, "{loss}");
    }

    #[test]
    fn checkpoint_restores_the_model_and_tokenizer() {
        let tokenizer = CharTokenizer::from_text("abcdefghij");
        let mut c = ModelConfig::tiny(tokenizer.vocab_size());
        c.tie_embeddings = true;
        let model = Model::new(c, 4, &Device::Cpu).unwrap();
        let ckpt = model.checkpoint(Some(&tokenizer)).unwrap();
        let (back, tok) = Model::from_checkpoint(&ckpt, &Device::Cpu).unwrap();
        assert_eq!(
            back.params().root().unwrap(),
            model.params().root().unwrap()
        );
        assert_eq!(back.config(), model.config());
        assert_eq!(tok, Some(tokenizer));
        assert!(back.params().get("output.weight").is_none());
    }

    #[test]
    fn stages_refuse_foreign_parameters_and_bad_splits() {
        let c = ModelConfig::tiny(10);
        let model = Model::new(c.clone(), 0, &Device::Cpu).unwrap();
        assert!(Stage::new(c.clone(), 0..1, model.params().clone()).is_err());
        assert!(model.split(&[0..1, 2..2]).is_err());
        assert!(model.split(&[0..1]).is_err());
        assert!(model.split(&[1..2, 0..1]).is_err());
        let stages = model.split(&[0..1, 1..2]).unwrap();
        assert!(stages[0].is_first() && !stages[0].is_last());
        assert!(!stages[1].is_first() && stages[1].is_last());
        let tokens = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
        assert!(
            stages[1].forward(&tokens).is_err(),
            "the second stage takes hidden states"
        );
        let too_long = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
        assert!(model.forward(&too_long).is_err());
    }

    #[test]
    fn greedy_generation_is_deterministic() {
        let model = Model::new(ModelConfig::tiny(10), 2, &Device::Cpu).unwrap();
        let a = model.generate(&[1, 2, 3], 5, 0.0, 0).unwrap();
        assert_eq!(a.len(), 5);
        assert_eq!(a, model.generate(&[1, 2, 3], 5, 0.0, 9).unwrap());
        let s = model.generate(&[1, 2, 3], 5, 1.0, 7).unwrap();
        assert_eq!(s, model.generate(&[1, 2, 3], 5, 1.0, 7).unwrap());
        assert!(s.iter().all(|&t| t < 10));
    }
}
