//! A model file on disk: GGUF (quantized, llama family), its validated
//! configuration, and its content id.
//!
//! Everything read from the file is checked before it is used: metadata types
//! and ranges, every tensor's presence, dtype and shape against the
//! configuration. A truncated, corrupt or foreign file is a [`ModelError`],
//! never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use commons_protocol::{Hash, ModelId};

use super::hf::HfFiles;

/// Architectures whose GGUF layout and forward pass the stage implements.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// A model that could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The file could not be read.
    #[error("cannot read model file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a readable GGUF (truncated, corrupt, or another format).
    #[error("{path} is not a valid GGUF file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        reason: String,
    },
    /// An architecture the stage does not implement.
    #[error("unsupported model architecture {arch:?} (supported: {})", SUPPORTED_ARCHITECTURES.join(", "))]
    UnsupportedArchitecture {
        /// `general.architecture`.
        arch: String,
    },
    /// A required metadata key is absent.
    #[error("model metadata lacks {key}")]
    MissingMetadata {
        /// The key.
        key: String,
    },
    /// A metadata value has the wrong type or an impossible value.
    #[error("model metadata {key} is invalid: {reason}")]
    BadMetadata {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A tensor the configuration needs is absent.
    #[error("model lacks tensor {name}")]
    MissingTensor {
        /// The tensor.
        name: String,
    },
    /// A tensor has a shape other than the configuration implies.
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape in the file.
        actual: Vec<usize>,
    },
    /// Reading a tensor's data failed.
    #[error("cannot read tensor {name}: {reason}")]
    TensorData {
        /// The tensor.
        name: String,
        /// Why.
        reason: String,
    },
}

/// The configuration of a llama-family model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture`.
    pub architecture: String,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP inner size.
    pub ffn: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_head: usize,
    /// Per-head size.
    pub head_dim: usize,
    /// RMS norm epsilon.
    pub rms_eps: f64,
    /// Rotary embedding base.
    pub rope_theta: f32,
    /// Rotary pairs are adjacent (llama) or split in halves (NeoX/Qwen2).
    pub rope_neox: bool,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// Attention q/k/v projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// The lm head is the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
}

/// An opened model (a GGUF file or a Hugging Face folder): its configuration
/// and tensor index, not its weights.
pub struct ModelFile {
    path: PathBuf,
    format: Format,
    config: LlamaConfig,
}

enum Format {
    Gguf(Content),
    Hf(Box<HfFiles>),
}

/// One tensor as stored: quantized (GGUF) or dense (safetensors, as f32).
#[derive(Debug)]
pub enum Weight {
    /// GGUF blocks.
    Quantized(QTensor),
    /// A dense f32 tensor.
    Dense(Tensor),
}

impl Weight {
    /// Bytes held.
    #[must_use]
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Quantized(q) => q.storage_size_in_bytes(),
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// The values as a dense f32 tensor.
    pub fn into_f32(self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Weight::Quantized(q) => q.dequantize(device),
            Weight::Dense(t) => Ok(t),
        }
    }
}

/// Reads tensors of one model; keeps its files open between reads.
pub struct WeightReader<'a> {
    model: &'a ModelFile,
    gguf: Option<BufReader<File>>,
    shards: HashMap<usize, File>,
}

impl std::fmt::Debug for WeightReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightReader")
            .field("model", &self.model.path)
            .finish_non_exhaustive()
    }
}

impl WeightReader<'_> {
    /// Reads the tensor named `name` (GGUF naming, whatever the format).
    pub fn load(&mut self, name: &str, device: &Device) -> Result<Weight, ModelError> {
        match &self.model.format {
            Format::Gguf(content) => {
                if !content.tensor_infos.contains_key(name) {
                    return Err(ModelError::MissingTensor {
                        name: name.to_owned(),
                    });
                }
                let reader = match &mut self.gguf {
                    Some(r) => r,
                    None => {
                        self.gguf
                            .insert(File::open(&self.model.path).map(BufReader::new).map_err(
                                |source| ModelError::Io {
                                    path: self.model.path.clone(),
                                    source,
                                },
                            )?)
                    }
                };
                content
                    .tensor(reader, name, device)
                    .map(Weight::Quantized)
                    .map_err(|e| ModelError::TensorData {
                        name: name.to_owned(),
                        reason: reason(&e),
                    })
            }
            Format::Hf(files) => files
                .read(&mut self.shards, name, device)
                .map(Weight::Dense),
        }
    }
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// candle's error text without the backtrace it attaches when `RUST_BACKTRACE` is set.
pub(crate) fn reason(err: &candle_core::Error) -> String {
    let text = err.to_string();
    text.lines().next().unwrap_or_default().trim().to_owned()
}

fn md<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value, ModelError> {
    metadata
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata {
            key: key.to_owned(),
        })
}

fn md_usize(metadata: &HashMap<String, Value>, key: &str) -> Result<usize, ModelError> {
    let bad = |reason: String| ModelError::BadMetadata {
        key: key.to_owned(),
        reason,
    };
    let v = md(metadata, key)?.to_u64().map_err(|e| bad(reason(&e)))?;
    usize::try_from(v).map_err(|_| bad(format!("{v} does not fit")))
}

fn md_f32(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<f32>, ModelError> {
    match metadata.get(key) {
        None => Ok(None),
        Some(Value::F32(v)) => Ok(Some(*v)),
        Some(Value::F64(v)) => Ok(Some(*v as f32)),
        Some(other) => Err(ModelError::BadMetadata {
            key: key.to_owned(),
            reason: format!("expected a float, found {:?}", other.value_type()),
        }),
    }
}

/// Reads the GGUF header. candle's reader returns errors for truncated and
/// malformed files, but divides by a zero `general.alignment`; that panic is
/// caught here and reported as corruption.
fn read_content(path: &Path) -> Result<Content, ModelError> {
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let corrupt = |reason: String| ModelError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader))) {
        Ok(Ok(content)) => Ok(content),
        Ok(Err(err)) => Err(corrupt(reason(&err))),
        Err(_) => Err(corrupt(
            "the GGUF header is inconsistent (the reader gave up)".to_owned(),
        )),
    }
}

impl ModelFile {
    /// Opens `path`, reads its header and validates its configuration and tensor index.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let (format, config) = if path.is_dir() {
            let (config, files) = HfFiles::open(path)?;
            (Format::Hf(Box::new(files)), config)
        } else {
            let content = read_content(path)?;
            let config = LlamaConfig::from_metadata(&content)?;
            (Format::Gguf(content), config)
        };
        let model = Self {
            path: path.to_owned(),
            format,
            config,
        };
        model.validate_index()?;
        Ok(model)
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated configuration.
    #[must_use]
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The GGUF metadata (tokenizer, chat template…); `None` for a Hugging Face folder.
    #[must_use]
    pub fn metadata(&self) -> Option<&HashMap<String, Value>> {
        match &self.format {
            Format::Gguf(c) => Some(&c.metadata),
            Format::Hf(_) => None,
        }
    }

    /// The Hugging Face folder's files, for a folder model.
    pub(crate) fn hf(&self) -> Option<&HfFiles> {
        match &self.format {
            Format::Hf(files) => Some(files),
            Format::Gguf(_) => None,
        }
    }

    /// Shape of a tensor (GGUF naming), in candle's (rows, cols) order.
    #[must_use]
    pub fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.format {
            Format::Gguf(c) => c.tensor_infos.get(name).map(|i| i.shape.dims().to_vec()),
            Format::Hf(f) => f.shape(name),
        }
    }

    /// A reader for this model's tensors.
    #[must_use]
    pub fn weights(&self) -> WeightReader<'_> {
        WeightReader {
            model: self,
            gguf: None,
            shards: HashMap::new(),
        }
    }

    /// The shape each named tensor must have, in candle's (rows, cols) order.
    fn expected_shape(&self, name: &str) -> Option<Vec<usize>> {
        let c = &self.config;
        let (q_out, kv_out) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let short = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .map(|(_, t)| t)
            .unwrap_or(name);
        Some(match short {
            "token_embd.weight" | "output.weight" => vec![c.vocab, c.hidden],
            "output_norm.weight" | "attn_norm.weight" | "ffn_norm.weight" => vec![c.hidden],
            "attn_q.weight" => vec![q_out, c.hidden],
            "attn_k.weight" | "attn_v.weight" => vec![kv_out, c.hidden],
            "attn_output.weight" => vec![c.hidden, q_out],
            "attn_q.bias" => vec![q_out],
            "attn_k.bias" | "attn_v.bias" => vec![kv_out],
            "ffn_gate.weight" | "ffn_up.weight" => vec![c.ffn, c.hidden],
            "ffn_down.weight" => vec![c.hidden, c.ffn],
            _ => return None,
        })
    }

    /// Names of the tensors of block `layer`.
    #[must_use]
    pub fn layer_tensor_names(&self, layer: usize) -> Vec<String> {
        let mut names: Vec<String> = [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ]
        .iter()
        .map(|t| format!("blk.{layer}.{t}.weight"))
        .collect();
        if self.config.qkv_bias {
            names.extend(
                ["attn_q", "attn_k", "attn_v"]
                    .iter()
                    .map(|t| format!("blk.{layer}.{t}.bias")),
            );
        }
        names
    }

    /// Checks that every tensor the configuration needs is present with the right shape.
    fn validate_index(&self) -> Result<(), ModelError> {
        let mut names = vec![
            "token_embd.weight".to_owned(),
            "output_norm.weight".to_owned(),
        ];
        if !self.config.tied_embeddings {
            names.push("output.weight".to_owned());
        }
        for layer in 0..self.config.n_layer {
            names.extend(self.layer_tensor_names(layer));
        }
        for name in &names {
            let missing = || ModelError::MissingTensor { name: name.clone() };
            let actual = self.tensor_shape(name).ok_or_else(missing)?;
            let expected = self.expected_shape(name).unwrap_or_else(|| actual.clone());
            let block = match &self.format {
                Format::Gguf(c) => c
                    .tensor_infos
                    .get(name)
                    .map_or(1, |i| i.ggml_dtype.block_size()),
                Format::Hf(_) => 1,
            };
            if actual != expected || !actual.last().copied().unwrap_or(0).is_multiple_of(block) {
                return Err(ModelError::TensorShape {
                    name: name.clone(),
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// The GGUF storage type of a tensor (`None` for dense safetensors weights).
    #[must_use]
    pub fn tensor_dtype(&self, name: &str) -> Option<GgmlDType> {
        match &self.format {
            Format::Gguf(c) => c.tensor_infos.get(name).map(|i| i.ggml_dtype),
            Format::Hf(_) => None,
        }
    }

    /// Bytes a tensor occupies in the file.
    #[must_use]
    pub fn tensor_bytes(&self, name: &str) -> Option<usize> {
        match &self.format {
            Format::Gguf(c) => {
                let info = c.tensor_infos.get(name)?;
                Some(
                    info.shape.elem_count() / info.ggml_dtype.block_size()
                        * info.ggml_dtype.type_size(),
                )
            }
            Format::Hf(f) => f.bytes(name),
        }
    }
}

impl LlamaConfig {
    /// Reads and validates the configuration from GGUF metadata.
    pub fn from_metadata(content: &Content) -> Result<Self, ModelError> {
        let m = &content.metadata;
        let arch_key = "general.architecture";
        let arch = md(m, arch_key)?
            .to_string()
            .map_err(|e| ModelError::BadMetadata {
                key: arch_key.into(),
                reason: reason(&e),
            })?
            .clone();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture { arch });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = md_usize(m, &key("block_count"))?;
        let hidden = md_usize(m, &key("embedding_length"))?;
        let ffn = md_usize(m, &key("feed_forward_length"))?;
        let n_head = md_usize(m, &key("attention.head_count"))?;
        let n_kv_head = md_usize(m, &key("attention.head_count_kv")).or_else(|e| match e {
            ModelError::MissingMetadata { .. } => Ok(n_head),
            other => Err(other),
        })?;
        let positive = |k: &str, v: usize| {
            if v == 0 {
                Err(ModelError::BadMetadata {
                    key: key(k),
                    reason: "must be positive".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("block_count", n_layer)?;
        positive("embedding_length", hidden)?;
        positive("feed_forward_length", ffn)?;
        positive("attention.head_count", n_head)?;
        positive("attention.head_count_kv", n_kv_head)?;
        if !hidden.is_multiple_of(n_head) {
            return Err(ModelError::BadMetadata {
                key: key("attention.head_count"),
                reason: format!("{n_head} heads do not divide {hidden}"),
            });
        }
        if !n_head.is_multiple_of(n_kv_head) {
            return Err(ModelError::BadMetadata {
                key: key("attention.head_count_kv"),
                reason: format!("{n_kv_head} does not divide {n_head} heads"),
            });
        }
        let head_dim = hidden / n_head;
        if let Ok(rope_dim) = md_usize(m, &key("rope.dimension_count"))
            && rope_dim != head_dim
        {
            return Err(ModelError::BadMetadata {
                key: key("rope.dimension_count"),
                reason: format!("partial rotary ({rope_dim} of {head_dim}) is not supported"),
            });
        }
        let rms_eps = md_f32(m, &key("attention.layer_norm_rms_epsilon"))?.ok_or_else(|| {
            ModelError::MissingMetadata {
                key: key("attention.layer_norm_rms_epsilon"),
            }
        })? as f64;
        let rope_theta = md_f32(m, &key("rope.freq_base"))?.unwrap_or(10_000.0);
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor {
                name: "token_embd.weight".into(),
            })?;
        let vocab = match md_usize(m, &key("vocab_size")) {
            Ok(v) => v,
            Err(_) => *embd.shape.dims().first().unwrap_or(&0),
        };
        positive("vocab_size", vocab)?;
        let context_length = md_usize(m, &key("context_length")).unwrap_or(4096);
        positive("context_length", context_length)?;
        let qkv_bias = content.tensor_infos.contains_key("blk.0.attn_q.bias");
        let tied_embeddings = !content.tensor_infos.contains_key("output.weight");
        Ok(Self {
            rope_neox: arch == "qwen2",
            architecture: arch,
            n_layer,
            hidden,
            ffn,
            n_head,
            n_kv_head,
            head_dim,
            rms_eps,
            rope_theta,
            vocab,
            context_length,
            qkv_bias,
            tied_embeddings,
        })
    }
}

/// The model's content id: for a file, blake3 of its bytes (what `b3sum`
/// prints); for a Hugging Face folder, blake3 (in derive-key mode) over the
/// name, length and bytes of each of its files in name order. Streamed, and
/// cached beside the model (`<file>.blake3`, or `.blake3` in the folder), keyed
/// by sizes and modification times, so that it is computed once per version.
pub fn model_id(path: &Path) -> Result<ModelId, ModelError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| ModelError::Io { path: p, source }
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                p.is_file()
                    && (name.ends_with(".safetensors")
                        || matches!(
                            name,
                            "config.json"
                                | "model.safetensors.index.json"
                                | "tokenizer.json"
                                | "tokenizer_config.json"
                        ))
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut stamp = String::new();
    for f in &files {
        let meta = std::fs::metadata(f).map_err(io(f))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        stamp.push_str(&format!("{name}:{}:{mtime};", meta.len()));
    }
    let cache = if path.is_dir() {
        path.join(".blake3")
    } else {
        cache_path(path)
    };
    if let Ok(text) = std::fs::read_to_string(&cache)
        && let Some((cached_stamp, digest)) = text.trim().rsplit_once(' ')
        && cached_stamp == stamp
        && let Ok(hash) = digest.parse::<Hash>()
    {
        return Ok(ModelId(hash));
    }
    let mut hasher = if path.is_dir() {
        blake3::Hasher::new_derive_key("commons model folder v1")
    } else {
        blake3::Hasher::new()
    };
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let mut file = File::open(f).map_err(io(f))?;
        if path.is_dir() {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let len = file.metadata().map_err(io(f))?.len();
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(&len.to_le_bytes());
        }
        loop {
            let n = file.read(&mut buf).map_err(io(f))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let hash = Hash::from(hasher.finalize());
    // Best effort: a read-only model directory just means hashing again next time.
    if let Err(err) = std::fs::write(&cache, format!("{stamp} {hash}\n")) {
        tracing::debug!(%err, path = %cache.display(), "cannot cache the model id");
    }
    Ok(ModelId(hash))
}

fn cache_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".blake3");
    path.with_file_name(name)
}
