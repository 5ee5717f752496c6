//! A pipeline stage: layers `[a, b)` of a llama-family model, plus the token
//! embedding on the first stage and the final norm and lm head on the last.
//!
//! Follows candle's model convention (config, `load`, `forward(x, pos, cache)`)
//! but reads only the tensors of its range from the file, so its memory is
//! proportional to the range. Its arithmetic is candle's quantized llama op for
//! op (the same operations in the same order), so a model split into stages
//! gives logits bit-identical to the whole model in one stage, and to
//! candle-transformers' `quantized_llama` on the same file.
//!
//! A layer runs on plain `f32` rows rather than on a tensor per op: the
//! per-element ops (RMS norm, rotary embedding, SwiGLU, residual sums) and the
//! attention of a single position come from `commons_kernels`, each a replica
//! of candle's arithmetic tested against candle bit for bit; the q/k/v and the
//! gate/up projections each run as one matmul over stacked weights (every
//! output row is still its own dot product); the key/value cache grows in
//! place. Prompt attention (several positions at once) runs through candle's
//! own ops, as `quantized_llama` does.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};
use commons_kernels::attention::{self, Heads};
use commons_kernels::ops;
use commons_kernels::q4_1::FastQ4_1;
use commons_kernels::q8_0::FastQ8_0;

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

/// The keys and values of one layer: for each key/value head, `head_dim`
/// values per position (keys after the rotary embedding), so that a head's
/// attention reads one contiguous stream.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The key/value cache of one session on one stage.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    /// The layers the session runs, once it has run a step.
    range: Option<Range<usize>>,
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
            .flat_map(|l| l.k.iter().chain(&l.v))
            .map(|h| h.len() * std::mem::size_of::<f32>())
            .sum()
    }

    /// Drops everything cached (and frees its memory).
    pub fn clear(&mut self) {
        for h in self
            .layers
            .iter_mut()
            .flat_map(|l| l.k.iter_mut().chain(&mut l.v))
        {
            *h = Vec::new();
        }
        self.len = 0;
        self.range = None;
    }

    /// Forgets positions from `len` on, so that the next step starts there.
    pub fn rewind(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let old = self.len;
        for h in self
            .layers
            .iter_mut()
            .flat_map(|l| l.k.iter_mut().chain(&mut l.v))
        {
            // Every head holds the same number of values per position.
            let per_position = h.len() / old;
            h.truncate(len * per_position);
        }
        self.len = len;
    }

    /// Forgets positions from `len` on (after a step that failed half-way).
    fn truncate(&mut self, len: usize, head_dim: usize) {
        for h in self
            .layers
            .iter_mut()
            .flat_map(|l| l.k.iter_mut().chain(&mut l.v))
        {
            h.truncate(len * head_dim);
        }
        self.len = len;
    }
}

/// One projection `x · Wᵀ` of rows of activations.
enum Linear {
    /// Commons' Q4_1 kernel.
    Q4_1(Arc<FastQ4_1>),
    /// Commons' Q8_0 kernel.
    Q8_0(Arc<FastQ8_0>),
    /// candle's own kernels (quantized or dense), `n` outputs.
    Candle { w: QMatMul, n: usize },
}

impl Linear {
    fn outputs(&self) -> usize {
        match self {
            Linear::Q4_1(w) => w.rows(),
            Linear::Q8_0(w) => w.rows(),
            Linear::Candle { n, .. } => *n,
        }
    }

    /// `out` (`m · outputs`) = `x` (`m` rows) · Wᵀ.
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) -> candle_core::Result<()> {
        match self {
            Linear::Q4_1(w) => w.forward(x, m, out),
            Linear::Q8_0(w) => w.forward(x, m, out),
            Linear::Candle { w, .. } => {
                let t = Tensor::from_slice(x, (1, m, x.len() / m.max(1)), &Device::Cpu)?;
                let y = w.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
                Ok(())
            }
        }
    }
}

/// Projections of the same input whose outputs sit side by side in each row
/// (q ‖ k ‖ v, gate ‖ up): one matmul when the kernels allow it.
struct Projection {
    parts: Vec<Linear>,
    width: usize,
}

impl Projection {
    fn new(parts: Vec<Linear>) -> Self {
        let width = parts.iter().map(Linear::outputs).sum();
        Self { parts, width }
    }

    /// `out` = `m` rows of `width` values.
    fn forward(&self, x: &[f32], m: usize, out: &mut Vec<f32>) -> candle_core::Result<()> {
        out.clear();
        out.resize(m * self.width, 0.0);
        if let [only] = self.parts.as_slice() {
            return only.forward(x, m, out);
        }
        let mut col = 0;
        let mut part = Vec::new();
        for p in &self.parts {
            let n = p.outputs();
            part.clear();
            part.resize(m * n, 0.0);
            p.forward(x, m, &mut part)?;
            for (row, src) in out.chunks_exact_mut(self.width).zip(part.chunks_exact(n)) {
                row[col..col + n].copy_from_slice(src);
            }
            col += n;
        }
        Ok(())
    }
}

/// The token embedding table.
enum Embedding {
    Q4_1(Arc<FastQ4_1>),
    Q8_0(Arc<FastQ8_0>),
    /// GGUF blocks in candle's storage: only the rows looked up are dequantized.
    Quantized(Arc<QTensor>),
    /// A dense f32 table.
    Dense(Tensor),
}

impl Embedding {
    /// The rows of `ids`, `hidden` values each.
    fn lookup(&self, ids: &[u32], hidden: usize) -> candle_core::Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * hidden];
        match self {
            Embedding::Q4_1(e) => {
                for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
                    e.dequantize_row(id as usize, row)?;
                }
            }
            Embedding::Q8_0(e) => {
                for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
                    e.dequantize_row(id as usize, row)?;
                }
            }
            Embedding::Quantized(q) => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                out = q.embedding(&ids)?.flatten_all()?.to_vec1()?;
            }
            Embedding::Dense(t) => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                out = t.index_select(&ids, 0)?.flatten_all()?.to_vec1()?;
            }
        }
        Ok(out)
    }
}

struct Block {
    attn_norm: Vec<f32>,
    /// q ‖ k ‖ v.
    qkv: Projection,
    /// q ‖ k ‖ v biases (Qwen2).
    bias: Option<Vec<f32>>,
    wo: Projection,
    ffn_norm: Vec<f32>,
    /// gate ‖ up.
    gate_up: Projection,
    down: Projection,
}

struct Head {
    norm: Vec<f32>,
    output: Projection,
}

/// Which CPU kernels run the quantized matmuls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kernels {
    /// Commons' SIMD kernels where they exist (Q4_1 and Q8_0 matmuls, the
    /// attention of a single position), candle's elsewhere.
    /// Bit-identical to [`Kernels::Candle`].
    #[default]
    Fast,
    /// candle's own matmul kernels and attention ops.
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
    /// Rotary tables, `head_dim / 2` values per position.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Single positions attend through `commons_kernels::attention`.
    fast_attention: bool,
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

/// The layer rows of one session in a step: rows `rows` of the step, at
/// positions from `pos`.
struct Segment {
    rows: Range<usize>,
    pos: usize,
}

/// Buffers reused by the layers of one step.
#[derive(Default)]
struct Scratch {
    h: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    y: Vec<f32>,
    o: Vec<f32>,
    act: Vec<f32>,
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
        if !device.is_cpu() {
            return Err(StageError::Input(
                "stages run on the CPU device only".into(),
            ));
        }
        let mut reader = model.weights();
        let mut weight_bytes = 0usize;
        let mut load = |name: &str| -> Result<Weight, StageError> {
            let w = reader.load(name, device)?;
            weight_bytes += w.bytes();
            Ok(w)
        };
        let linear = |w: Weight| -> candle_core::Result<Linear> {
            Ok(match (w, kernels) {
                (Weight::Quantized(q), Kernels::Fast) => {
                    if let Some(f) = FastQ4_1::from_qtensors(&[&q])? {
                        Linear::Q4_1(Arc::new(f))
                    } else if let Some(f) = FastQ8_0::from_qtensor(&q)? {
                        Linear::Q8_0(Arc::new(f))
                    } else {
                        let n = q.shape().dims2()?.0;
                        Linear::Candle {
                            w: QMatMul::from_qtensor(q)?,
                            n,
                        }
                    }
                }
                (Weight::Quantized(q), Kernels::Candle) => {
                    let n = q.shape().dims2()?.0;
                    Linear::Candle {
                        w: QMatMul::from_qtensor(q)?,
                        n,
                    }
                }
                (Weight::Quantized(q), Kernels::Dequantized) => {
                    let t = q.dequantize(device)?;
                    Linear::Candle {
                        n: t.dims2()?.0,
                        w: QMatMul::Tensor(t),
                    }
                }
                (Weight::Dense(t), _) => Linear::Candle {
                    n: t.dims2()?.0,
                    w: QMatMul::Tensor(t),
                },
            })
        };
        // Several projections of one input: a single Q4_1 matmul over their
        // stacked rows when the fast kernels take them all.
        let project = |ws: Vec<Weight>| -> candle_core::Result<Projection> {
            if kernels == Kernels::Fast {
                let qs: Option<Vec<&QTensor>> = ws
                    .iter()
                    .map(|w| match w {
                        Weight::Quantized(q) => Some(q),
                        Weight::Dense(_) => None,
                    })
                    .collect();
                if let Some(qs) = qs
                    && let Some(f) = FastQ4_1::from_qtensors(&qs)?
                {
                    return Ok(Projection::new(vec![Linear::Q4_1(Arc::new(f))]));
                }
            }
            Ok(Projection::new(
                ws.into_iter()
                    .map(linear)
                    .collect::<candle_core::Result<_>>()?,
            ))
        };
        let vector = |w: Weight| -> candle_core::Result<Vec<f32>> {
            w.into_f32(device)?.flatten_all()?.to_vec1::<f32>()
        };
        let first = layers.start == 0;
        let last = layers.end == cfg.n_layer;
        let embed = if first || (last && cfg.tied_embeddings) {
            Some(match load("token_embd.weight")? {
                Weight::Quantized(q) if kernels == Kernels::Fast => {
                    if let Some(f) = FastQ8_0::from_qtensor(&q)? {
                        Embedding::Q8_0(Arc::new(f))
                    } else if let Some(f) = FastQ4_1::from_qtensors(&[&q])? {
                        Embedding::Q4_1(Arc::new(f))
                    } else {
                        Embedding::Quantized(Arc::new(q))
                    }
                }
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
                let mut b = vector(load(&p("attn_q.bias"))?)?;
                b.extend(vector(load(&p("attn_k.bias"))?)?);
                b.extend(vector(load(&p("attn_v.bias"))?)?);
                Some(b)
            } else {
                None
            };
            let attn_norm = vector(load(&p("attn_norm.weight"))?)?;
            let qkv = project(vec![
                load(&p("attn_q.weight"))?,
                load(&p("attn_k.weight"))?,
                load(&p("attn_v.weight"))?,
            ])?;
            let wo = project(vec![load(&p("attn_output.weight"))?])?;
            let ffn_norm = vector(load(&p("ffn_norm.weight"))?)?;
            let gate_up = project(vec![
                load(&p("ffn_gate.weight"))?,
                load(&p("ffn_up.weight"))?,
            ])?;
            let down = project(vec![load(&p("ffn_down.weight"))?])?;
            blocks.push(Block {
                attn_norm,
                qkv,
                bias,
                wo,
                ffn_norm,
                gate_up,
                down,
            });
        }

        let head = if last {
            let norm = vector(load("output_norm.weight")?)?;
            let output = match (&embed, cfg.tied_embeddings) {
                (Some(Embedding::Q8_0(e)), true) => Linear::Q8_0(Arc::clone(e)),
                (Some(Embedding::Q4_1(e)), true) => Linear::Q4_1(Arc::clone(e)),
                (Some(Embedding::Quantized(e)), true) => Linear::Candle {
                    n: e.shape().dims2()?.0,
                    w: QMatMul::from_arc(Arc::clone(e))?,
                },
                (Some(Embedding::Dense(e)), true) => Linear::Candle {
                    n: e.dims2()?.0,
                    w: QMatMul::Tensor(e.clone()),
                },
                _ => linear(load("output.weight")?)?,
            };
            Some(Head {
                norm,
                output: Projection::new(vec![output]),
            })
        } else {
            None
        };
        // The embedding table is only needed on the first stage; a last stage
        // with tied embeddings keeps it through its lm head.
        let embed = if first { embed } else { None };
        let (cos, sin) = rope_tables(&cfg, cfg.context_length, device)?;
        Ok(Self {
            config: cfg,
            layers,
            embed,
            blocks,
            head,
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            fast_attention: kernels != Kernels::Candle && attention::available(),
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
        let heads = vec![Vec::new(); self.config.n_kv_head];
        KvCache {
            layers: vec![
                LayerCache {
                    k: heads.clone(),
                    v: heads,
                };
                self.blocks.len()
            ],
            len: 0,
            range: None,
        }
    }

    fn kv_width(&self) -> usize {
        self.config.n_kv_head * self.config.head_dim
    }

    /// Runs one step of a session: the input's positions follow those in `cache`.
    pub fn forward(
        &self,
        input: StageInput,
        cache: &mut KvCache,
    ) -> Result<StageOutput, StageError> {
        self.forward_range(input, cache, self.layers.clone())
    }

    /// Runs one step of a session over `layers`, a part of this stage's
    /// (a node checking another's hop runs just that hop's layers): token ids
    /// in when it starts at layer 0, logits out when it ends at the last,
    /// hidden states otherwise. Each layer computes as it does in a whole
    /// stage, so the output equals that of a stage holding exactly `layers`.
    /// A session keeps the range of its first step.
    pub fn forward_range(
        &self,
        input: StageInput,
        cache: &mut KvCache,
        layers: Range<usize>,
    ) -> Result<StageOutput, StageError> {
        if cache.layers.len() != self.blocks.len() {
            return Err(StageError::Input(
                "the cache belongs to another stage".into(),
            ));
        }
        if layers.start >= layers.end
            || layers.start < self.layers.start
            || layers.end > self.layers.end
        {
            return Err(StageError::Input(format!(
                "layers {}..{} are not within this stage's {}..{}",
                layers.start, layers.end, self.layers.start, self.layers.end
            )));
        }
        if let Some(r) = cache.range.as_ref().filter(|r| **r != layers) {
            return Err(StageError::Input(format!(
                "the session runs layers {}..{}, not {}..{}",
                r.start, r.end, layers.start, layers.end
            )));
        }
        let index_pos = cache.len;
        let mut x = match input {
            StageInput::Tokens(ids) if layers.start == 0 => self.embed_tokens(&ids)?,
            StageInput::Tokens(_) => {
                return Err(StageError::Input(format!(
                    "token ids given for layers {}..{}, which do not start at the first",
                    layers.start, layers.end
                )));
            }
            StageInput::Hidden(_) if layers.start == 0 => {
                return Err(StageError::Input(
                    "hidden states given to the first layer".into(),
                ));
            }
            StageInput::Hidden(h) => self.hidden_input(h)?,
        };
        let hidden = self.config.hidden;
        let seq_len = x.len() / hidden;
        let needed = index_pos + seq_len;
        if needed > self.config.context_length {
            return Err(StageError::ContextOverflow {
                needed,
                max: self.config.context_length,
            });
        }
        let segments = [Segment {
            rows: 0..seq_len,
            pos: index_pos,
        }];
        let mut scratch = Scratch::default();
        let first = layers.start - self.layers.start;
        for li in first..first + layers.len() {
            let kv = std::slice::from_mut(&mut cache.layers[li]);
            if let Err(e) = self.block_forward(li, &mut x, &segments, kv, &mut scratch) {
                cache.truncate(index_pos, self.config.head_dim);
                return Err(e.into());
            }
        }
        cache.len = needed;
        cache.range = Some(layers.clone());
        let head = self.head.as_ref().filter(|_| layers.end == self.layers.end);
        match head {
            None => Ok(StageOutput::Hidden(Tensor::from_vec(
                x,
                (1, seq_len, hidden),
                &self.device,
            )?)),
            Some(head) => {
                let last = &x[(seq_len - 1) * hidden..];
                let logits = self.logits(head, last, 1)?;
                let vocab = logits.len();
                Ok(StageOutput::Logits(Tensor::from_vec(
                    logits,
                    vocab,
                    &self.device,
                )?))
            }
        }
    }

    /// The logits of `rows` rows of hidden states.
    fn logits(&self, head: &Head, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let mut h = vec![0f32; x.len()];
        ops::rms_norm(x, &head.norm, self.config.rms_eps as f32, &mut h);
        let mut logits = Vec::new();
        head.output.forward(&h, rows, &mut logits)?;
        Ok(logits)
    }

    /// One layer over the rows of a step, in place; `kvs` holds each
    /// segment's cache of this layer.
    fn block_forward(
        &self,
        li: usize,
        x: &mut [f32],
        segments: &[Segment],
        kvs: &mut [LayerCache],
        s: &mut Scratch,
    ) -> candle_core::Result<()> {
        let cfg = &self.config;
        let b = &self.blocks[li];
        let (hidden, hd) = (cfg.hidden, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.n_head * hd, self.kv_width());
        let m = x.len() / hidden;
        let eps = cfg.rms_eps as f32;

        s.h.resize(x.len(), 0.0);
        ops::rms_norm(x, &b.attn_norm, eps, &mut s.h);
        b.qkv.forward(&s.h, m, &mut s.qkv)?;
        let width = q_dim + 2 * kv_dim;
        if let Some(bias) = &b.bias {
            for row in s.qkv.chunks_exact_mut(width) {
                ops::add_assign(row, bias);
            }
        }
        s.y.clear();
        s.y.resize(m * q_dim, 0.0);
        for (seg, kv) in segments.iter().zip(kvs.iter_mut()) {
            let n = seg.rows.len();
            let positions = seg.pos..seg.pos + n;
            s.q.clear();
            s.k.clear();
            for r in seg.rows.clone() {
                let row = &s.qkv[r * width..(r + 1) * width];
                s.q.extend_from_slice(&row[..q_dim]);
                s.k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
            }
            ops::rope(
                &mut s.q,
                hd,
                positions.clone(),
                &self.cos,
                &self.sin,
                cfg.rope_neox,
            );
            ops::rope(&mut s.k, hd, positions, &self.cos, &self.sin, cfg.rope_neox);
            for (i, r) in seg.rows.clone().enumerate() {
                let keys = &s.k[i * kv_dim..(i + 1) * kv_dim];
                let values = &s.qkv[r * width + q_dim + kv_dim..(r + 1) * width];
                for (h, (kh, vh)) in kv.k.iter_mut().zip(kv.v.iter_mut()).enumerate() {
                    kh.extend_from_slice(&keys[h * hd..(h + 1) * hd]);
                    vh.extend_from_slice(&values[h * hd..(h + 1) * hd]);
                }
            }
            let y = &mut s.y[seg.rows.start * q_dim..seg.rows.end * q_dim];
            let len = seg.pos + n;
            if n == 1 && self.fast_attention {
                let heads = Heads {
                    n_head: cfg.n_head,
                    n_kv_head: cfg.n_kv_head,
                    head_dim: hd,
                };
                attention::attend_one(&s.q, &kv.k, &kv.v, len, heads, y);
            } else {
                y.copy_from_slice(&self.attend_candle(&s.q, kv, n, seg.pos)?);
            }
        }
        b.wo.forward(&s.y, m, &mut s.o)?;
        ops::add_assign(x, &s.o);

        ops::rms_norm(x, &b.ffn_norm, eps, &mut s.h);
        b.gate_up.forward(&s.h, m, &mut s.qkv)?;
        s.act.resize(m * cfg.ffn, 0.0);
        ops::silu_mul(&s.qkv, cfg.ffn, &mut s.act);
        b.down.forward(&s.act, m, &mut s.o)?;
        ops::add_assign(x, &s.o);
        Ok(())
    }

    /// Attention of `seq` new positions from `pos` (queries `q`, `seq` rows
    /// after the rotary embedding; keys and values already in `kv`) through
    /// candle's ops, exactly as `quantized_llama` runs them.
    fn attend_candle(
        &self,
        q: &[f32],
        kv: &LayerCache,
        seq: usize,
        pos: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let cfg = &self.config;
        let (hd, len) = (cfg.head_dim, pos + seq);
        let dev = &self.device;
        let q = Tensor::from_slice(q, (1, seq, cfg.n_head, hd), dev)?
            .transpose(1, 2)?
            .contiguous()?;
        let cached = |heads: &[Vec<f32>]| -> candle_core::Result<Tensor> {
            let mut all = Vec::with_capacity(cfg.n_kv_head * len * hd);
            for h in heads {
                all.extend_from_slice(&h[..len * hd]);
            }
            Tensor::from_vec(all, (1, cfg.n_kv_head, len, hd), dev)
        };
        let groups = cfg.n_head / cfg.n_kv_head;
        let k = candle_transformers::utils::repeat_kv(cached(&kv.k)?, groups)?;
        let v = candle_transformers::utils::repeat_kv(cached(&kv.v)?, groups)?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = if seq == 1 {
            att
        } else {
            let mask = candle_transformers::utils::build_causal_mask(seq, pos, dev)?
                .broadcast_as(att.shape())?;
            let neg_inf = Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as(mask.shape().dims())?;
            mask.where_cond(&neg_inf, &att)?
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .flatten_all()?
            .to_vec1()
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
        let hidden = self.config.hidden;
        let mut x = Vec::with_capacity(n * hidden);
        let mut caches = Vec::with_capacity(n);
        for (input, cache) in steps {
            if cache.layers.len() != self.blocks.len() {
                return Err(StageError::Input(
                    "the cache belongs to another stage".into(),
                ));
            }
            if cache.range.as_ref().is_some_and(|r| *r != self.layers) {
                return Err(StageError::Input(
                    "a session over part of the stage's layers is not batched".into(),
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
            x.extend_from_slice(&row);
            caches.push(cache);
        }
        let segments: Vec<Segment> = caches
            .iter()
            .enumerate()
            .map(|(i, c)| Segment {
                rows: i..i + 1,
                pos: c.len,
            })
            .collect();
        let mut scratch = Scratch::default();
        let mut kvs: Vec<LayerCache> = Vec::with_capacity(n);
        for li in 0..self.blocks.len() {
            kvs.clear();
            kvs.extend(caches.iter_mut().map(|c| std::mem::take(&mut c.layers[li])));
            let result = self.block_forward(li, &mut x, &segments, &mut kvs, &mut scratch);
            for (c, kv) in caches.iter_mut().zip(kvs.drain(..)) {
                c.layers[li] = kv;
            }
            if let Err(e) = result {
                for (c, seg) in caches.iter_mut().zip(&segments) {
                    c.truncate(seg.pos, self.config.head_dim);
                }
                return Err(e.into());
            }
        }
        for cache in &mut caches {
            cache.len += 1;
            cache.range = Some(self.layers.clone());
        }
        match &self.head {
            None => x
                .chunks_exact(hidden)
                .map(|row| {
                    Ok(StageOutput::Hidden(Tensor::from_slice(
                        row,
                        (1, 1, hidden),
                        &self.device,
                    )?))
                })
                .collect(),
            Some(head) => {
                let logits = self.logits(head, &x, n)?;
                let vocab = head.output.width;
                logits
                    .chunks_exact(vocab)
                    .map(|l| {
                        Ok(StageOutput::Logits(Tensor::from_slice(
                            l,
                            vocab,
                            &self.device,
                        )?))
                    })
                    .collect()
            }
        }
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Vec<f32>, StageError> {
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
        Ok(embed.lookup(ids, self.config.hidden)?)
    }

    fn check_hidden(&self, h: Tensor) -> Result<Vec<f32>, StageError> {
        if self.is_first() {
            return Err(StageError::Input(
                "hidden states given to the first stage".into(),
            ));
        }
        self.hidden_input(h)
    }

    /// Hidden states in, as f32 values, whatever layer they enter.
    fn hidden_input(&self, h: Tensor) -> Result<Vec<f32>, StageError> {
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
        Ok(h.to_device(&self.device)?.flatten_all()?.to_vec1()?)
    }
}

/// The greedy token of `logits` (ties go to the lowest id).
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
