//! Hugging Face model folders: `config.json`, `model.safetensors` (or shards
//! with `model.safetensors.index.json`), `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! Safetensors headers are parsed with serde and checked (offsets inside the
//! file, sizes matching dtype and shape) before any tensor is read; a tensor is
//! read on its own, so a stage loads only the bytes of its layers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::model::{LlamaConfig, ModelError};

/// Largest safetensors header accepted (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The parts of a Hugging Face `config.json` a llama-family stage needs.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    attention_bias: Option<bool>,
    head_dim: Option<usize>,
    pub(crate) bos_token_id: Option<serde_json::Value>,
    pub(crate) eos_token_id: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: u64,
}

/// The index of a model folder.
#[derive(Debug, Clone)]
pub(crate) struct HfFiles {
    pub(crate) config: HfConfig,
    files: Vec<PathBuf>,
    tensors: HashMap<String, Entry>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Corrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The safetensors name of a tensor named as in GGUF.
pub(crate) fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some((layer, rest)) = gguf.strip_prefix("blk.").and_then(|r| r.split_once('.')) else {
        return gguf.to_owned();
    };
    let (part, kind) = rest.split_once('.').unwrap_or((rest, "weight"));
    let mapped = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => other,
    };
    format!("model.layers.{layer}.{mapped}.{kind}")
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        _ => return None,
    })
}

/// Reads and checks one safetensors header.
fn read_header(
    path: &Path,
    file: usize,
    out: &mut HashMap<String, Entry>,
) -> Result<(), ModelError> {
    let mut f = File::open(path).map_err(io(path))?;
    let file_len = f.metadata().map_err(io(path))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| corrupt(path, "shorter than a safetensors header"))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(corrupt(
            path,
            format!("header length {n} does not fit the file"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io(path))?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| corrupt(path, format!("header is not JSON: {e}")))?;
    let data_start = 8 + n;
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: &str| corrupt(path, format!("tensor {name}: {why}"));
        let dtype_name = info["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let dtype = parse_dtype(dtype_name)
            .ok_or_else(|| bad(&format!("unsupported dtype {dtype_name}")))?;
        let shape: Vec<usize> =
            serde_json::from_value(info["shape"].clone()).map_err(|_| bad("bad shape"))?;
        let offsets: [u64; 2] = serde_json::from_value(info["data_offsets"].clone())
            .map_err(|_| bad("bad data_offsets"))?;
        let elems = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad("shape overflows"))?;
        let len = offsets[1]
            .checked_sub(offsets[0])
            .ok_or_else(|| bad("offsets run backwards"))?;
        if Some(len) != elems.checked_mul(dtype.size_in_bytes() as u64) {
            return Err(bad("data length does not match dtype and shape"));
        }
        if data_start
            .checked_add(offsets[1])
            .is_none_or(|end| end > file_len)
        {
            return Err(bad("data lies past the end of the file"));
        }
        out.insert(
            name,
            Entry {
                file,
                dtype,
                shape,
                start: data_start + offsets[0],
                len,
            },
        );
    }
    Ok(())
}

impl HfFiles {
    /// Opens a model folder and reads its configuration and tensor index.
    pub(crate) fn open(dir: &Path) -> Result<(LlamaConfig, Self), ModelError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let config: HfConfig =
            serde_json::from_str(&text).map_err(|e| corrupt(&config_path, e.to_string()))?;

        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            #[derive(Deserialize)]
            struct Index {
                weight_map: HashMap<String, String>,
            }
            let index_json: Index =
                serde_json::from_str(&text).map_err(|e| corrupt(&index, e.to_string()))?;
            let mut names: Vec<String> = index_json.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            if names.iter().any(|n| n.contains('/') || n.contains("..")) {
                return Err(corrupt(&index, "shard names must be plain file names"));
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            read_header(f, i, &mut tensors)?;
        }
        let files = Self {
            config,
            files,
            tensors,
        };
        let llama = files.llama_config()?;
        Ok((llama, files))
    }

    fn llama_config(&self) -> Result<LlamaConfig, ModelError> {
        let c = &self.config;
        let arch_name = c.architectures.first().map(String::as_str).unwrap_or("");
        let architecture = match arch_name {
            "LlamaForCausalLM" => "llama",
            "MistralForCausalLM" => "mistral",
            "Qwen2ForCausalLM" => "qwen2",
            other => {
                return Err(ModelError::UnsupportedArchitecture {
                    arch: other.to_owned(),
                });
            }
        };
        let bad = |key: &str, reason: String| ModelError::BadMetadata {
            key: key.to_owned(),
            reason,
        };
        if c.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad(
                "rope_scaling",
                "scaled rotary embeddings are not supported".into(),
            ));
        }
        let n_kv_head = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
        for (key, v) in [
            ("num_hidden_layers", c.num_hidden_layers),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", n_kv_head),
            ("vocab_size", c.vocab_size),
        ] {
            if v == 0 {
                return Err(bad(key, "must be positive".into()));
            }
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads)
            || !c.num_attention_heads.is_multiple_of(n_kv_head)
        {
            return Err(bad(
                "num_attention_heads",
                "heads must divide the hidden size and be a multiple of the key/value heads".into(),
            ));
        }
        let head_dim = c.hidden_size / c.num_attention_heads;
        if c.head_dim.is_some_and(|h| h != head_dim) {
            return Err(bad(
                "head_dim",
                "a head size other than hidden_size / num_attention_heads is not supported".into(),
            ));
        }
        let mut context_length = c.max_position_embeddings.unwrap_or(4096);
        // Within its window, sliding-window attention is plain attention.
        if let Some(w) = c.sliding_window.filter(|&w| w > 0) {
            context_length = context_length.min(w);
        }
        Ok(LlamaConfig {
            architecture: architecture.to_owned(),
            n_layer: c.num_hidden_layers,
            hidden: c.hidden_size,
            ffn: c.intermediate_size,
            n_head: c.num_attention_heads,
            n_kv_head,
            head_dim,
            rms_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            // Hugging Face weights are not permuted: rotate halves.
            rope_neox: true,
            vocab: c.vocab_size,
            context_length,
            qkv_bias: architecture == "qwen2" || c.attention_bias.unwrap_or(false),
            tied_embeddings: c.tie_word_embeddings.unwrap_or(false)
                || !self.tensors.contains_key("lm_head.weight"),
        })
    }

    /// Shape of a tensor (named as in GGUF).
    pub(crate) fn shape(&self, gguf_name: &str) -> Option<Vec<usize>> {
        self.tensors
            .get(&hf_name(gguf_name))
            .map(|e| e.shape.clone())
    }

    /// Bytes a tensor occupies in its file.
    pub(crate) fn bytes(&self, gguf_name: &str) -> Option<usize> {
        self.tensors
            .get(&hf_name(gguf_name))
            .map(|e| e.len as usize)
    }

    /// Reads one tensor (named as in GGUF) as f32.
    pub(crate) fn read(
        &self,
        open: &mut HashMap<usize, File>,
        gguf_name: &str,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let name = hf_name(gguf_name);
        let entry = self
            .tensors
            .get(&name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
        let path = &self.files[entry.file];
        let f = match open.entry(entry.file) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(path).map_err(io(path))?)
            }
        };
        let data_err = |reason: String| ModelError::TensorData {
            name: name.clone(),
            reason,
        };
        f.seek(SeekFrom::Start(entry.start))
            .map_err(|e| data_err(e.to_string()))?;
        let mut bytes = vec![0u8; entry.len as usize];
        f.read_exact(&mut bytes)
            .map_err(|e| data_err(e.to_string()))?;
        let t = Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, device)
            .map_err(|e| data_err(super::model::reason(&e)))?;
        t.to_dtype(DType::F32)
            .map_err(|e| data_err(super::model::reason(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight"),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias"),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.12.ffn_norm.weight"),
            "model.layers.12.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
    }
}
