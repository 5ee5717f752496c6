//! Tiny llama-family models with random weights, generated from a seed, for
//! fast tests that need no download: a real GGUF file (quantized like the
//! bundled model) with a small byte-level BPE tokenizer in its metadata.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The shape of a tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    /// `general.architecture`: `llama`, or `qwen2` (q/k/v biases, NeoX rotary).
    pub architecture: String,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size (a multiple of 32 for quantized weights).
    pub hidden: usize,
    /// MLP inner size (a multiple of 32).
    pub ffn: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Context length.
    pub context_length: usize,
    /// Storage type of the block matrices.
    pub dtype: GgmlDType,
    /// Storage type of the token embedding (the lm head when tied).
    pub embedding_dtype: GgmlDType,
    /// Write a separate `output.weight` instead of tying it to the embedding.
    pub untied_head: bool,
    /// Tensors to leave out (to test incomplete files).
    pub omit: Vec<String>,
    /// RNG seed.
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            architecture: "llama".into(),
            n_layer: 6,
            hidden: 64,
            ffn: 128,
            n_head: 4,
            n_kv_head: 2,
            context_length: 256,
            dtype: GgmlDType::Q4_1,
            embedding_dtype: GgmlDType::Q8_0,
            untied_head: false,
            omit: Vec::new(),
            seed: 1,
        }
    }
}

/// Special tokens of the tiny vocabulary.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A few merges so that the BPE has something to merge.
const MERGES: [(&str, &str); 6] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
];

/// GPT-2's reversible map from bytes to printable characters.
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?')
            }
        })
        .collect()
}

/// The tiny vocabulary: specials, the 256 byte characters, then the merges.
#[must_use]
pub fn tiny_vocab() -> Vec<String> {
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| (*s).to_owned()).collect();
    tokens.extend(byte_chars().into_iter().map(String::from));
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens
}

/// A small deterministic generator (SplitMix64), so a seed gives the same model everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-scale, scale).
    fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }
}

fn random(rng: &mut SplitMix, shape: &[usize], scale: f32) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.uniform(scale)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

fn norm_weight(rng: &mut SplitMix, n: usize) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..n).map(|_| 1.0 + rng.uniform(0.1)).collect();
    Tensor::from_vec(values, n, &Device::Cpu)
}

/// Kind of a tiny model's tensor, which decides its storage type.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Matrix,
    Embedding,
    Vector,
}

/// The tiny model's tensors in Hugging Face layout (q/k not permuted), named as in GGUF.
fn tiny_tensors(spec: &TinySpec) -> candle_core::Result<Vec<(String, Tensor, Kind)>> {
    let mut rng = SplitMix(spec.seed);
    let n_vocab = tiny_vocab().len();
    let head_dim = spec.hidden / spec.n_head;
    let (q_out, kv_out) = (spec.n_head * head_dim, spec.n_kv_head * head_dim);
    let scale = 1.0 / (spec.hidden as f32).sqrt();
    let mut out = Vec::new();
    out.push((
        "token_embd.weight".into(),
        random(&mut rng, &[n_vocab, spec.hidden], 1.0)?,
        Kind::Embedding,
    ));
    for i in 0..spec.n_layer {
        let p = |t: &str| format!("blk.{i}.{t}");
        out.push((
            p("attn_norm.weight"),
            norm_weight(&mut rng, spec.hidden)?,
            Kind::Vector,
        ));
        out.push((
            p("attn_q.weight"),
            random(&mut rng, &[q_out, spec.hidden], scale)?,
            Kind::Matrix,
        ));
        out.push((
            p("attn_k.weight"),
            random(&mut rng, &[kv_out, spec.hidden], scale)?,
            Kind::Matrix,
        ));
        out.push((
            p("attn_v.weight"),
            random(&mut rng, &[kv_out, spec.hidden], scale)?,
            Kind::Matrix,
        ));
        out.push((
            p("attn_output.weight"),
            random(&mut rng, &[spec.hidden, q_out], scale)?,
            Kind::Matrix,
        ));
        if spec.architecture == "qwen2" {
            out.push((
                p("attn_q.bias"),
                random(&mut rng, &[q_out], 0.1)?,
                Kind::Vector,
            ));
            out.push((
                p("attn_k.bias"),
                random(&mut rng, &[kv_out], 0.1)?,
                Kind::Vector,
            ));
            out.push((
                p("attn_v.bias"),
                random(&mut rng, &[kv_out], 0.1)?,
                Kind::Vector,
            ));
        }
        out.push((
            p("ffn_norm.weight"),
            norm_weight(&mut rng, spec.hidden)?,
            Kind::Vector,
        ));
        out.push((
            p("ffn_gate.weight"),
            random(&mut rng, &[spec.ffn, spec.hidden], scale)?,
            Kind::Matrix,
        ));
        out.push((
            p("ffn_up.weight"),
            random(&mut rng, &[spec.ffn, spec.hidden], scale)?,
            Kind::Matrix,
        ));
        out.push((
            p("ffn_down.weight"),
            random(
                &mut rng,
                &[spec.hidden, spec.ffn],
                1.0 / (spec.ffn as f32).sqrt(),
            )?,
            Kind::Matrix,
        ));
    }
    out.push((
        "output_norm.weight".into(),
        norm_weight(&mut rng, spec.hidden)?,
        Kind::Vector,
    ));
    if spec.untied_head {
        out.push((
            "output.weight".into(),
            random(&mut rng, &[n_vocab, spec.hidden], scale)?,
            Kind::Embedding,
        ));
    }
    out.retain(|(name, _, _)| !spec.omit.contains(name));
    Ok(out)
}

/// llama.cpp's reordering of q/k rows for its interleaved rotary embedding:
/// `(heads, 2, hd/2, in)` → `(heads, hd/2, 2, in)`.
fn permute_for_gguf(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))
}

/// Writes a tiny model to `path` (GGUF).
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> candle_core::Result<()> {
    let vocab = tiny_vocab();
    let n_vocab = vocab.len();
    let head_dim = spec.hidden / spec.n_head;
    let arch = spec.architecture.as_str();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t, kind) in tiny_tensors(spec)? {
        // GGUF llama models carry q/k permuted for the interleaved rotary embedding.
        let t = match (arch, name.rsplit('.').nth(1)) {
            ("llama", Some("attn_q")) if name.ends_with(".weight") => {
                permute_for_gguf(&t, spec.n_head)?
            }
            ("llama", Some("attn_k")) if name.ends_with(".weight") => {
                permute_for_gguf(&t, spec.n_kv_head)?
            }
            _ => t,
        };
        let dtype = match kind {
            Kind::Matrix => spec.dtype,
            Kind::Embedding => spec.embedding_dtype,
            Kind::Vector => GgmlDType::F32,
        };
        tensors.push((name, QTensor::quantize(&t, dtype)?));
    }

    let k = |s: &str| format!("{arch}.{s}");
    let u32v = |v: usize| Value::U32(v as u32);
    let mut token_types = vec![Value::I32(3); TINY_SPECIALS.len()];
    token_types.resize(n_vocab, Value::I32(1));
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(format!("tiny-{arch}-{}", spec.seed)),
        ),
        (k("block_count"), u32v(spec.n_layer)),
        (k("context_length"), u32v(spec.context_length)),
        (k("embedding_length"), u32v(spec.hidden)),
        (k("feed_forward_length"), u32v(spec.ffn)),
        (k("attention.head_count"), u32v(spec.n_head)),
        (k("attention.head_count_kv"), u32v(spec.n_kv_head)),
        (k("rope.dimension_count"), u32v(head_dim)),
        (k("rope.freq_base"), Value::F32(10_000.0)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("vocab_size"), u32v(n_vocab)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(vocab.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(token_types),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                MERGES
                    .iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    candle_core::quantized::gguf_file::write(&mut file, &md_refs, &tensor_refs)?;
    use std::io::Write as _;
    file.flush()?;
    Ok(())
}

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes the same tiny model as a Hugging Face folder in `dir`: `config.json`,
/// `model.safetensors` (f32, weights as Hugging Face lays them out),
/// `tokenizer.json` and `tokenizer_config.json`.
pub fn write_tiny_hf(dir: &Path, spec: &TinySpec) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let architecture = match spec.architecture.as_str() {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        other => other,
    };
    let vocab = tiny_vocab();
    let config = serde_json::json!({
        "architectures": [architecture],
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_attention_heads": spec.n_head,
        "num_key_value_heads": spec.n_kv_head,
        "num_hidden_layers": spec.n_layer,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab.len(),
        "max_position_embeddings": spec.context_length,
        "tie_word_embeddings": !spec.untied_head,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let tensors: std::collections::HashMap<String, Tensor> = tiny_tensors(spec)?
        .into_iter()
        .map(|(name, t, _)| (super::hf::hf_name(&name), t))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let special: Vec<bool> = (0..vocab.len()).map(|i| i < TINY_SPECIALS.len()).collect();
    let merges = MERGES
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    let tokenizer = super::tokenizer::byte_level_bpe(&vocab, merges, &special, false, false)?;
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let tokenizer_config = serde_json::json!({
        "bos_token": TINY_SPECIALS[1],
        "eos_token": TINY_SPECIALS[2],
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tokenizer_config)?,
    )?;
    Ok(())
}
