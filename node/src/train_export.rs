//! Trained checkpoints as models the executor serves.
//!
//! A checkpoint written by a training run (`final.safetensors`, or any
//! round's checkpoint) holds the parameters under Meta's llama names plus,
//! in its metadata, the model's shape and its character tokenizer. This
//! module writes it out as a Hugging Face llama folder (`config.json`,
//! `model.safetensors` in f32 under Hugging Face names, `tokenizer.json`,
//! `tokenizer_config.json`), which [`crate::executor::ModelFile`] opens like
//! any other model: `commons run`, `commons node join --model` and the swarm's
//! pipelined jobs then run the trained model on the same engine, with KV-cache
//! sessions and layer ranges.
//!
//! The training model rotates query and key halves (as Hugging Face's llama
//! does), so its attention weights go over unchanged. The character
//! vocabulary becomes a BPE model with no merges (every character is a
//! token) and a decoder that joins tokens without separators.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use candle_core::{Device, Tensor};
use commons_train::params::METADATA_KEY;
use commons_train::{CharTokenizer, Checkpoint, Model};
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::BPE;

/// File in an exported folder naming the checkpoint it came from.
const SOURCE_FILE: &str = "commons-checkpoint";

/// Whether `path` is a file holding a training checkpoint: safetensors
/// whose metadata has the training description.
#[must_use]
pub fn is_training_checkpoint(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    use std::io::Read as _;
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return false;
    }
    let len = u64::from_le_bytes(len);
    if len == 0 || len > 100_000_000 {
        return false;
    }
    let mut header = vec![0u8; len as usize];
    if file.read_exact(&mut header).is_err() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&header)
        .ok()
        .and_then(|h| h.get("__metadata__")?.get(METADATA_KEY).cloned())
        .is_some()
}

/// The Hugging Face name of a training parameter.
fn hf_name(name: &str) -> Option<String> {
    Some(match name {
        "tok_embeddings.weight" => "model.embed_tokens.weight".to_owned(),
        "norm.weight" => "model.norm.weight".to_owned(),
        "output.weight" => "lm_head.weight".to_owned(),
        _ => {
            let rest = name.strip_prefix("layers.")?;
            let (layer, part) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let mapped = match part {
                "attention.wq.weight" => "self_attn.q_proj.weight",
                "attention.wk.weight" => "self_attn.k_proj.weight",
                "attention.wv.weight" => "self_attn.v_proj.weight",
                "attention.wo.weight" => "self_attn.o_proj.weight",
                "attention_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "feed_forward.w1.weight" => "mlp.gate_proj.weight",
                "feed_forward.w2.weight" => "mlp.down_proj.weight",
                "feed_forward.w3.weight" => "mlp.up_proj.weight",
                _ => return None,
            };
            format!("model.layers.{layer}.{mapped}")
        }
    })
}

/// A tokenizer where every character of `chars` is a token, in order.
fn char_tokenizer(chars: &CharTokenizer) -> anyhow::Result<tokenizers::Tokenizer> {
    let vocab: tokenizers::models::bpe::Vocab = chars
        .chars()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| anyhow::anyhow!("character vocabulary: {e}"))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_decoder(Some(Fuse::new()));
    Ok(tokenizer)
}

/// Writes the training checkpoint at `checkpoint` as a Hugging Face llama
/// folder in `dir` (created; its model files are replaced). Returns the
/// checkpoint's id.
///
/// # Errors
/// When the file is not a training checkpoint, lacks its tokenizer, or the
/// folder cannot be written.
pub fn export(checkpoint: &Path, dir: &Path) -> anyhow::Result<commons_train::Hash> {
    let bytes = std::fs::read(checkpoint)
        .with_context(|| format!("cannot read checkpoint {}", checkpoint.display()))?;
    let checkpoint_file = Checkpoint::from_bytes(bytes);
    let (model, tokenizer) =
        Model::from_checkpoint(&checkpoint_file, &Device::Cpu).with_context(|| {
            format!(
                "{} is not a training checkpoint of this version",
                checkpoint.display()
            )
        })?;
    let Some(tokenizer) = tokenizer else {
        bail!(
            "checkpoint {} records no tokenizer, so its tokens cannot be read as text",
            checkpoint.display()
        );
    };
    let c = model.config();
    if tokenizer.vocab_size() != c.vocab_size {
        bail!(
            "checkpoint {}: tokenizer of {} characters for a vocabulary of {}",
            checkpoint.display(),
            tokenizer.vocab_size(),
            c.vocab_size
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: String| -> anyhow::Result<()> {
        let path = dir.join(name);
        let part = dir.join(format!("{name}.part"));
        std::fs::write(&part, text).with_context(|| format!("cannot write {}", part.display()))?;
        std::fs::rename(&part, &path).with_context(|| format!("cannot write {}", path.display()))
    };
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_heads,
        "num_hidden_layers": c.n_layers,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    write("config.json", serde_json::to_string_pretty(&config)?)?;
    let tensors: HashMap<String, Tensor> = model
        .params()
        .names()
        .iter()
        .zip(model.params().tensors())
        .map(|(name, t)| {
            let hf = hf_name(name)
                .with_context(|| format!("parameter {name} has no Hugging Face name"))?;
            Ok((hf, t))
        })
        .collect::<anyhow::Result<_>>()?;
    let part = dir.join("model.safetensors.part");
    candle_core::safetensors::save(&tensors, &part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    std::fs::rename(&part, dir.join("model.safetensors"))
        .with_context(|| format!("cannot write {}", dir.display()))?;
    let tokenizer_json = char_tokenizer(&tokenizer)?
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    write("tokenizer.json", tokenizer_json)?;
    write("tokenizer_config.json", "{}".to_owned())?;
    write(SOURCE_FILE, format!("{}\n", checkpoint_file.id()))?;
    Ok(checkpoint_file.id())
}

/// The model folder to load for `path`: `path` itself, unless it is a
/// training checkpoint; then the folder it was exported to, beside it
/// (`<name>.model/`, or under the system's temporary folder when that
/// cannot be written), exporting it first unless that folder already holds
/// this checkpoint.
///
/// # Errors
/// As [`export`].
pub fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    if !is_training_checkpoint(path) {
        return Ok(path.to_owned());
    }
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let id = blake3::hash(&bytes).to_string();
    drop(bytes);
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("checkpoint");
    let beside = path.with_file_name(format!("{stem}.model"));
    let elsewhere = std::env::temp_dir()
        .join("commons-models")
        .join(format!("{}.model", &id[..16]));
    for dir in [&beside, &elsewhere] {
        let current = std::fs::read_to_string(dir.join(SOURCE_FILE))
            .is_ok_and(|s| s.trim() == id && dir.join("model.safetensors").is_file());
        if current {
            return Ok(dir.clone());
        }
    }
    match export(path, &beside) {
        Ok(_) => Ok(beside),
        Err(first) => {
            tracing::debug!(error = %format!("{first:#}"), "export beside the checkpoint failed");
            export(path, &elsewhere)?;
            Ok(elsewhere)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_training_parameter_has_a_hugging_face_name() {
        let c = commons_train::ModelConfig::tiny(5);
        for tie in [false, true] {
            let c = commons_train::ModelConfig {
                tie_embeddings: tie,
                ..c.clone()
            };
            let names: Vec<String> = c
                .stage_params(0..c.n_layers)
                .into_iter()
                .map(|(n, _)| hf_name(&n).expect(&n))
                .collect();
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), names.len());
        }
        assert_eq!(hf_name("layers.x.attention.wq.weight"), None);
        assert_eq!(hf_name("layers.0.attention.wz.weight"), None);
    }

    #[test]
    fn the_character_tokenizer_round_trips() {
        let text = "First Citizen:\nBefore we proceed, hear me speak.\n";
        let chars = CharTokenizer::from_text(text);
        let tokenizer = char_tokenizer(&chars).unwrap();
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, chars.encode(text).unwrap());
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), text);
    }
}
