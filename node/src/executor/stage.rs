//! A pipeline stage: layers `[a, b)` of a llama-family model, plus the token
//! embedding on the first stage and the final norm and lm head on the last.
//!
//! Follows candle's model convention (config, `load`, `forward(x, pos, cache)`)
//! but reads only the tensors of its range from the file, so its memory is
//! proportional to the range. Its arithmetic is candle's quantized llama op for
//! op (same kernels, same order), so a model split into stages gives logits
//! bit-identical to the whole model in one stage, and to candle-transformers'
//! `quantized_llama` on the same kernel path.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, IndexOp, Module, Tensor};

use super::model::{LlamaConfig, ModelError, ModelFile, Weight};

/// A stage that could not be loaded or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// The model file is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The layer range is empty or reaches past the model.
    #[error("layer range {start}..{end} is not within the model's {n_layer} layers")]
    LayerRange {
        /// First layer asked for.
        start: usize,
        /// One past the last.
        end: usize,
        /// Layers in the model.
        n_layer: usize,
    },
    /// The sequence would exceed the context length.
    #[error("{needed} tokens exceed the context length of {max}")]
    ContextOverflow {
        /// Positions the step needs.
        needed: usize,
        /// The model's (or session's) limit.
        max: usize,
    },
    /// The input does not fit this stage (token ids on a later stage, a wrong width…).
    #[error("bad stage input: {0}")]
    Input(String),
    /// A kernel failed.
    #[error("compute failed")]
    Compute(#[from] candle_core::Error),
}

/// What a stage consumes.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// Token ids, on the first stage.
    Tokens(Vec<u32>),
    /// Hidden states `(1, seq, hidden)` f32, from the previous stage.
    Hidden(Tensor),
}

/// What a stage produces.
#[derive(Debug, Clone)]
pub enum StageOutput {
    /// Hidden states `(1, seq, hidden)` f32, for the next stage.
    Hidden(Tensor),
    /// Logits of the last position `(vocab,)` f32, from the last stage.
    Logits(Tensor),
}

/// The key/value cache of one session on one stage.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions cached.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cached keys and values.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Drops everything cached.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

/// RMS norm with an f32 weight, through the same candle op as
/// candle-transformers' quantized models.
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// The token embedding table.
enum Embedding {
    /// GGUF blocks: only the rows looked up are dequantized.
    Quantized(Arc<QTensor>),
    /// A dense f32 table.
    Dense(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Dense(t) => {
                let (b, seq) = ids.dims2()?;
                let hidden = t.dim(1)?;
                t.index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, seq, hidden))
            }
        }
    }
}

struct Block {
    attn_norm: RmsNorm,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    bias: Option<(Tensor, Tensor, Tensor)>,
    ffn_norm: RmsNorm,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

struct Head {
    norm: RmsNorm,
    output: QMatMul,
}

/// Which CPU kernels run the quantized matmuls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// Commons' SIMD kernels where they exist (Q4_1), candle's elsewhere.
    /// Bit-identical to [`Kernels::Candle`].
    #[default]
    Fast,
    /// candle's own kernels only.
    Candle,
    /// Quantized weights expanded to f32 at load and multiplied densely, as
    /// accelerators often do: another determinism class, a few times the
    /// memory. Results differ from the quantized paths within
    /// [`commons_coordinator::verify::DEFAULT_TOLERANCE`].
    Dequantized,
}

/// Layers `[a, b)` of a model, ready to run.
pub struct Stage {
    config: LlamaConfig,
    layers: Range<usize>,
    embed: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<Head>,
    cos: Tensor,
    sin: Tensor,
    neg_inf: Tensor,
    device: Device,
    weight_bytes: usize,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("layers", &self.layers)
            .field("first", &self.is_first())
            .field("last", &self.is_last())
            .field("weight_bytes", &self.weight_bytes)
            .finish_non_exhaustive()
    }
}

/// Rotary tables as candle's quantized llama builds them (so values match bit for bit).
fn rope_tables(
    cfg: &LlamaConfig,
    positions: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim;
    let theta: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / hd as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx_theta = Tensor::arange(0, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((idx_theta.cos()?, idx_theta.sin()?))
}

impl Stage {
    /// Loads layers `layers` of `model` onto `device`, with the embedding if
    /// the range starts at 0 and the head if it ends at the last layer.
    pub fn load(
        model: &ModelFile,
        layers: Range<usize>,
        device: &Device,
    ) -> Result<Self, StageError> {
        Self::load_with(model, layers, device, Kernels::default())
    }

    /// [`Stage::load`] with a choice of kernels.
    pub fn load_with(
        model: &ModelFile,
        layers: Range<usize>,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self, StageError> {
        let cfg = model.config().clone();
        if layers.start >= layers.end || layers.end > cfg.n_layer {
            return Err(StageError::LayerRange {
                start: layers.start,
                end: layers.end,
                n_layer: cfg.n_layer,
            });
        }
        let mut reader = model.weights();
        let mut weight_bytes = 0usize;
        let mut load = |name: &str| -> Result<Weight, StageError> {
            let w = reader.load(name, device)?;
            weight_bytes += w.bytes();
            Ok(w)
        };
        let matmul = |w: Weight| -> candle_core::Result<QMatMul> {
            match (w, kernels) {
                (Weight::Quantized(q), Kernels::Fast) => {
                    QMatMul::from_qtensor(commons_kernels::q4_1::accelerate(q)?)
                }
                (Weight::Quantized(q), Kernels::Candle) => QMatMul::from_qtensor(q),
                (Weight::Quantized(q), Kernels::Dequantized) => {
                    Ok(QMatMul::Tensor(q.dequantize(device)?))
                }
                (Weight::Dense(t), _) => Ok(QMatMul::Tensor(t)),
            }
        };
        let norm = |w: Weight| -> candle_core::Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.into_f32(device)?,
                eps: cfg.rms_eps as f32,
            })
        };
        let first = layers.start == 0;
        let last = layers.end == cfg.n_layer;
        let embed = if first || (last && cfg.tied_embeddings) {
            Some(match load("token_embd.weight")? {
                Weight::Quantized(q) => Embedding::Quantized(Arc::new(q)),
                Weight::Dense(t) => Embedding::Dense(t),
            })
        } else {
            None
        };

        let mut blocks = Vec::with_capacity(layers.len());
        for i in layers.clone() {
            let p = |t: &str| format!("blk.{i}.{t}");
            let bias = if cfg.qkv_bias {
                Some((
                    load(&p("attn_q.bias"))?.into_f32(device)?,
                    load(&p("attn_k.bias"))?.into_f32(device)?,
                    load(&p("attn_v.bias"))?.into_f32(device)?,
                ))
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: norm(load(&p("attn_norm.weight"))?)?,
                wq: matmul(load(&p("attn_q.weight"))?)?,
                wk: matmul(load(&p("attn_k.weight"))?)?,
                wv: matmul(load(&p("attn_v.weight"))?)?,
                wo: matmul(load(&p("attn_output.weight"))?)?,
                bias,
                ffn_norm: norm(load(&p("ffn_norm.weight"))?)?,
                w_gate: matmul(load(&p("ffn_gate.weight"))?)?,
                w_up: matmul(load(&p("ffn_up.weight"))?)?,
                w_down: matmul(load(&p("ffn_down.weight"))?)?,
            });
        }

        let head = if last {
            let norm = norm(load("output_norm.weight")?)?;
            let output = match (&embed, cfg.tied_embeddings) {
                (Some(Embedding::Quantized(e)), true) => QMatMul::from_arc(Arc::clone(e))?,
                (Some(Embedding::Dense(e)), true) => QMatMul::Tensor(e.clone()),
                _ => matmul(load("output.weight")?)?,
            };
            Some(Head { norm, output })
        } else {
            None
        };
        // The embedding table is only needed on the first stage; a last stage
        // with tied embeddings keeps it through its lm head.
        let embed = if first { embed } else { None };
        let (cos, sin) = rope_tables(&cfg, cfg.context_length, device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?;
        Ok(Self {
            config: cfg,
            layers,
            embed,
            blocks,
            head,
            cos,
            sin,
            neg_inf,
            device: device.clone(),
            weight_bytes,
        })
    }

    /// The model's configuration.
    #[must_use]
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Layers held.
    #[must_use]
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Holds the token embedding and takes token ids.
    #[must_use]
    pub fn is_first(&self) -> bool {
        self.layers.start == 0
    }

    /// Holds the head and returns logits.
    #[must_use]
    pub fn is_last(&self) -> bool {
        self.layers.end == self.config.n_layer
    }

    /// Bytes of weights loaded.
    #[must_use]
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The device computed on.
    #[must_use]
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for a new session on this stage.
    #[must_use]
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.blocks.len()],
            len: 0,
        }
    }

    /// Runs one step of a session: the input's positions follow those in `cache`.
    pub fn forward(
        &self,
        input: StageInput,
        cache: &mut KvCache,
    ) -> Result<StageOutput, StageError> {
        if cache.layers.len() != self.blocks.len() {
            return Err(StageError::Input(
                "the cache belongs to another stage".into(),
            ));
        }
        let index_pos = cache.len;
        let mut x = match input {
            StageInput::Tokens(ids) => self.embed_tokens(&ids)?,
            StageInput::Hidden(h) => self.check_hidden(h)?,
        };
        let seq_len = x.dim(1)?;
        let needed = index_pos + seq_len;
        if needed > self.config.context_length {
            return Err(StageError::ContextOverflow {
                needed,
                max: self.config.context_length,
            });
        }
        let mask = if seq_len == 1 {
            None
        } else {
            Some(candle_transformers::utils::build_causal_mask(
                seq_len,
                index_pos,
                &self.device,
            )?)
        };
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = self.block_forward(block, &x, mask.as_ref(), index_pos, kv)?;
        }
        cache.len = needed;
        match &self.head {
            None => Ok(StageOutput::Hidden(x)),
            Some(head) => {
                let x = head.norm.forward(&x)?;
                let x = x.i((.., seq_len - 1, ..))?.contiguous()?;
                Ok(StageOutput::Logits(head.output.forward(&x)?.squeeze(0)?))
            }
        }
    }

    fn rope(&self, x: &Tensor, index_pos: usize) -> candle_core::Result<Tensor> {
        let (_b, _h, seq_len, _d) = x.dims4()?;
        let cos = self.cos.narrow(0, index_pos, seq_len)?;
        let sin = self.sin.narrow(0, index_pos, seq_len)?;
        let x = x.contiguous()?;
        if self.config.rope_neox {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        }
    }

    /// q, k, v projections of normed input `h` `(b, seq, hidden)`.
    fn qkv(&self, b: &Block, h: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (mut q, mut k, mut v) = (b.wq.forward(h)?, b.wk.forward(h)?, b.wv.forward(h)?);
        if let Some((bq, bk, bv)) = &b.bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        Ok((q, k, v))
    }

    /// Attention of one session: q, k, v `(1, seq, heads·hd)` at `index_pos`,
    /// appending to its cache; returns `(1, seq, hidden)` before the output projection.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        index_pos: usize,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b_sz, seq_len, _) = q.dims3()?;
        let q = q
            .reshape((b_sz, seq_len, cfg.n_head, cfg.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((b_sz, seq_len, cfg.n_kv_head, cfg.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((b_sz, seq_len, cfg.n_kv_head, cfg.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.rope(&q, index_pos)?;
        let k = self.rope(&k, index_pos)?;
        let (k, v) = match kv.as_ref() {
            Some((kc, vc)) if index_pos > 0 => {
                (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?)
            }
            _ => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let groups = cfg.n_head / cfg.n_kv_head;
        if seq_len == 1 && groups > 1 {
            // One position: the heads sharing a key/value head form one
            // (groups × hd) query block, so the cache is used as it is instead
            // of being copied `groups` times.
            let q = q.reshape((b_sz, cfg.n_kv_head, groups, cfg.head_dim))?;
            let att = (q.matmul(&k.t()?)? / (cfg.head_dim as f64).sqrt())?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v)?;
            return y.reshape((b_sz, 1, cfg.n_head * cfg.head_dim));
        }
        let k = candle_transformers::utils::repeat_kv(k, groups)?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?;
        let att = (q.matmul(&k.t()?)? / (cfg.head_dim as f64).sqrt())?;
        let att = match mask {
            None => att,
            Some(mask) => {
                let mask = mask.broadcast_as(att.shape())?;
                mask.where_cond(&self.neg_inf.broadcast_as(mask.shape().dims())?, &att)?
            }
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?;
        y.transpose(1, 2)?
            .reshape(&[b_sz, seq_len, cfg.n_head * cfg.head_dim])
    }

    /// Output projection, residual and MLP.
    fn finish_block(
        &self,
        b: &Block,
        y: &Tensor,
        residual: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let x = (b.wo.forward(y)? + residual)?;
        let residual = &x;
        let h = b.ffn_norm.forward(&x)?;
        let gate = b.w_gate.forward(&h)?;
        let up = b.w_up.forward(&h)?;
        let y = b.w_down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?;
        y + residual
    }

    fn block_forward(
        &self,
        b: &Block,
        x: &Tensor,
        mask: Option<&Tensor>,
        index_pos: usize,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let h = b.attn_norm.forward(x)?;
        let (q, k, v) = self.qkv(b, &h)?;
        let y = self.attend(&q, &k, &v, mask, index_pos, kv)?;
        self.finish_block(b, &y, x)
    }

    /// One decode step (a single position) for each of several sessions, in
    /// one forward: the projections and the MLP run over all sessions at once,
    /// attention runs per session against its own cache. The result of each
    /// session is bit-identical to stepping it alone.
    pub fn forward_batch(
        &self,
        steps: Vec<(StageInput, &mut KvCache)>,
    ) -> Result<Vec<StageOutput>, StageError> {
        let n = steps.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut rows = Vec::with_capacity(n);
        let mut caches = Vec::with_capacity(n);
        for (input, cache) in steps {
            if cache.layers.len() != self.blocks.len() {
                return Err(StageError::Input(
                    "the cache belongs to another stage".into(),
                ));
            }
            if cache.len + 1 > self.config.context_length {
                return Err(StageError::ContextOverflow {
                    needed: cache.len + 1,
                    max: self.config.context_length,
                });
            }
            let row = match input {
                StageInput::Tokens(ids) if ids.len() == 1 => self.embed_tokens(&ids)?,
                StageInput::Hidden(h) if h.dims().get(1) == Some(&1) => self.check_hidden(h)?,
                _ => {
                    return Err(StageError::Input(
                        "a batched step takes exactly one position per session".into(),
                    ));
                }
            };
            rows.push(row);
            caches.push(cache);
        }
        let mut x = Tensor::cat(&rows, 0)?;
        for (li, block) in self.blocks.iter().enumerate() {
            let h = block.attn_norm.forward(&x)?;
            let (q, k, v) = self.qkv(block, &h)?;
            let mut ys = Vec::with_capacity(n);
            for (i, cache) in caches.iter_mut().enumerate() {
                let (qi, ki, vi) = (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?);
                ys.push(self.attend(&qi, &ki, &vi, None, cache.len, &mut cache.layers[li])?);
            }
            let y = Tensor::cat(&ys, 0)?;
            x = self.finish_block(block, &y, &x)?;
        }
        for cache in &mut caches {
            cache.len += 1;
        }
        match &self.head {
            None => (0..n)
                .map(|i| Ok(StageOutput::Hidden(x.narrow(0, i, 1)?)))
                .collect(),
            Some(head) => {
                let x = head.norm.forward(&x)?.squeeze(1)?.contiguous()?;
                let logits = head.output.forward(&x)?;
                (0..n)
                    .map(|i| Ok(StageOutput::Logits(logits.get(i)?)))
                    .collect()
            }
        }
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor, StageError> {
        let embed = self.embed.as_ref().ok_or_else(|| {
            StageError::Input("token ids given to a stage that is not the first".into())
        })?;
        if ids.is_empty() {
            return Err(StageError::Input("no tokens".into()));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab) {
            return Err(StageError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(embed.lookup(&ids)?)
    }

    fn check_hidden(&self, h: Tensor) -> Result<Tensor, StageError> {
        if self.is_first() {
            return Err(StageError::Input(
                "hidden states given to the first stage".into(),
            ));
        }
        let dims = h.dims();
        if dims.len() != 3
            || dims[0] != 1
            || dims[1] == 0
            || dims[2] != self.config.hidden
            || h.dtype() != DType::F32
        {
            return Err(StageError::Input(format!(
                "expected f32 hidden states (1, seq, {}), got {:?} {dims:?}",
                self.config.hidden,
                h.dtype()
            )));
        }
        Ok(h.to_device(&self.device)?)
    }
}

/// The greedy token of `logits` (ties go to the lowest id).
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
