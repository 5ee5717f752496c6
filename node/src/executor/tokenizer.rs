//! Tokenizers: from a `tokenizer.json`, or rebuilt from GGUF metadata
//! (byte-level BPE from `tokenizer.ggml.tokens` / `merges` / `token_type`),
//! plus the model's chat template. No Python, no network.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// A tokenizer that could not be built or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The metadata lacks a key the tokenizer needs, or has it with the wrong type.
    #[error("tokenizer metadata {key} is missing or invalid")]
    Metadata {
        /// The key.
        key: String,
    },
    /// A tokenizer model this build cannot rebuild from GGUF.
    #[error("unsupported GGUF tokenizer model {model:?} (supported: gpt2-style byte-level BPE)")]
    Unsupported {
        /// `tokenizer.ggml.model`.
        model: String,
    },
    /// The tokenizers library refused the vocabulary, a file or an input.
    #[error("tokenizer: {0}")]
    Library(String),
    /// The model has no tokenizer.
    #[error("the model has no tokenizer (expected tokenizer.json in {0})")]
    Missing(String),
    /// The model has no chat template.
    #[error("the model has no chat template (tokenizer.chat_template); run without --chat")]
    NoChatTemplate,
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
}

fn lib(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(e.to_string())
}

/// One message of a chat.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A GPT-2 style byte-level BPE over `tokens` (ids in order) and `merges`,
/// with the tokens marked in `special` as special tokens; `digits` splits
/// every digit into its own token first (SmolLM's pre-tokenizer).
pub(crate) fn byte_level_bpe(
    tokens: &[String],
    merges: Vec<(String, String)>,
    special: &[bool],
    digits: bool,
    add_prefix_space: bool,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(lib)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(add_prefix_space, true, true);
    if digits {
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])));
    } else {
        inner.with_pre_tokenizer(Some(byte_level));
    }
    inner.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(special)
        .filter(|(_, s)| **s)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    inner.add_special_tokens(specials).map_err(lib)?;
    Ok(inner)
}

/// A tokenizer with the special tokens and chat template of its model.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// Let the tokenizer's own post-processor add special tokens (tokenizer.json models).
    post_process: bool,
    stop_tokens: Vec<u32>,
    chat_template: Option<String>,
}

fn md_str<'a>(m: &'a HashMap<String, Value>, key: &str) -> Option<&'a String> {
    m.get(key).and_then(|v| v.to_string().ok())
}

fn md_u32(m: &HashMap<String, Value>, key: &str) -> Option<u32> {
    m.get(key)
        .and_then(|v| v.to_u64().ok())
        .and_then(|v| u32::try_from(v).ok())
}

fn md_strings(m: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, TokenizerError> {
    let err = || TokenizerError::Metadata {
        key: key.to_owned(),
    };
    m.get(key)
        .ok_or_else(err)?
        .to_vec()
        .map_err(|_| err())?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| err()))
        .collect()
}

impl Tokenizer {
    /// Rebuilds the tokenizer from GGUF metadata.
    pub fn from_gguf_metadata(m: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let model = md_str(m, "tokenizer.ggml.model").ok_or_else(|| TokenizerError::Metadata {
            key: "tokenizer.ggml.model".into(),
        })?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported {
                model: model.clone(),
            });
        }
        let tokens = md_strings(m, "tokenizer.ggml.tokens")?;
        let merges = md_strings(m, "tokenizer.ggml.merges")?;
        let types_key = "tokenizer.ggml.token_type";
        let types: Vec<i32> = match m.get(types_key) {
            None => vec![1; tokens.len()],
            Some(v) => v
                .to_vec()
                .map_err(|_| TokenizerError::Metadata {
                    key: types_key.into(),
                })?
                .iter()
                .map(|t| {
                    t.to_i32().map_err(|_| TokenizerError::Metadata {
                        key: types_key.into(),
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        if types.len() != tokens.len() {
            return Err(TokenizerError::Metadata {
                key: types_key.into(),
            });
        }
        let merges = merges
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| TokenizerError::Metadata {
                key: "tokenizer.ggml.merges".into(),
            })?;
        let add_prefix_space = matches!(
            m.get("tokenizer.ggml.add_space_prefix"),
            Some(Value::Bool(true))
        );
        let special: Vec<bool> = types.iter().map(|t| matches!(*t, 2..=5)).collect();
        let pre = md_str(m, "tokenizer.ggml.pre")
            .map(String::as_str)
            .unwrap_or("default");
        let inner = match pre {
            // SmolLM: every digit is its own token, then GPT-2's byte-level split.
            "smollm" => byte_level_bpe(&tokens, merges, &special, true, add_prefix_space)?,
            "gpt2" | "default" => {
                byte_level_bpe(&tokens, merges, &special, false, add_prefix_space)?
            }
            // Pre-tokenizers with their own split regex: candle knows them.
            other => {
                use candle_core::quantized::tokenizer::TokenizerFromGguf as _;
                let content = candle_core::quantized::gguf_file::Content {
                    magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
                    metadata: m.clone(),
                    tensor_infos: HashMap::new(),
                    tensor_data_offset: 0,
                };
                tokenizers::Tokenizer::from_gguf(&content)
                    .map_err(|e| TokenizerError::Library(format!("pre-tokenizer {other:?}: {e}")))?
            }
        };

        let bos = md_u32(m, "tokenizer.ggml.bos_token_id");
        let eos = md_u32(m, "tokenizer.ggml.eos_token_id");
        let add_bos = matches!(
            m.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        let chat_template = md_str(m, "tokenizer.chat_template").cloned();
        let mut stop_tokens: Vec<u32> = eos.into_iter().collect();
        if let Some(eot) = md_u32(m, "tokenizer.ggml.eot_token_id") {
            stop_tokens.push(eot);
        }
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            post_process: false,
            stop_tokens,
            chat_template,
        })
    }

    /// The tokenizer of an opened model: rebuilt from GGUF metadata, or read
    /// from a Hugging Face folder's `tokenizer.json` and `tokenizer_config.json`.
    pub fn for_model(model: &super::ModelFile) -> Result<Self, TokenizerError> {
        if let Some(metadata) = model.metadata() {
            return Self::from_gguf_metadata(metadata);
        }
        let dir = model.path();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing(dir.display().to_string()));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(lib)?;
        #[derive(serde::Deserialize, Default)]
        struct TokenizerConfig {
            chat_template: Option<serde_json::Value>,
            bos_token: Option<serde_json::Value>,
            eos_token: Option<serde_json::Value>,
        }
        let tc: TokenizerConfig = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TokenizerError::Library(format!("tokenizer_config.json: {e}")))?,
            Err(_) => TokenizerConfig::default(),
        };
        // A token is given as a string or as {"content": "..."}.
        let token_id = |v: &Option<serde_json::Value>| {
            v.as_ref()
                .and_then(|v| v.as_str().or_else(|| v["content"].as_str()))
                .and_then(|t| inner.token_to_id(t))
        };
        let config_ids = |v: Option<&serde_json::Value>| -> Vec<u32> {
            match v {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().map(|n| n as u32).into_iter().collect()
                }
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|n| n.as_u64().map(|n| n as u32))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let hf = model.hf();
        let bos = token_id(&tc.bos_token).or_else(|| {
            config_ids(hf.and_then(|h| h.config.bos_token_id.as_ref()))
                .first()
                .copied()
        });
        let mut stop_tokens = config_ids(hf.and_then(|h| h.config.eos_token_id.as_ref()));
        let eos = token_id(&tc.eos_token).or_else(|| stop_tokens.first().copied());
        if let Some(e) = eos
            && !stop_tokens.contains(&e)
        {
            stop_tokens.insert(0, e);
        }
        let chat_template = match tc.chat_template {
            Some(serde_json::Value::String(t)) => Some(t),
            // A list of named templates: take the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or_else(|| list.first())
                .and_then(|t| t["template"].as_str().map(str::to_owned)),
            _ => None,
        };
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos: false,
            post_process: true,
            stop_tokens,
            chat_template,
        })
    }

    /// Token ids of plain text, with the BOS token when the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, self.post_process).map_err(lib)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of token ids; special tokens are dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(lib)
    }

    /// Text of token ids, special tokens included.
    pub fn decode_with_specials(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(lib)
    }

    /// Tokens that end generation.
    #[must_use]
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The end-of-sequence token.
    #[must_use]
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Vocabulary size, special tokens included.
    #[must_use]
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` through the model's chat template, ready for the
    /// assistant's answer. The template comes from the model file, so it runs
    /// with a bounded amount of fuel.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(1_000_000));
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let token = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => token(self.bos),
            eos_token => token(self.eos),
        })
        .map_err(|e| TokenizerError::Template(e.to_string()))
    }

    /// A decoder that turns a stream of token ids into text pieces as soon as
    /// they form complete characters.
    #[must_use]
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            inner: self.inner.decode_stream(true),
        }
    }
}

/// Incremental detokenisation: text is emitted once it is stable.
pub struct TokenStream<'a> {
    inner: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl std::fmt::Debug for TokenStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream").finish_non_exhaustive()
    }
}

impl TokenStream<'_> {
    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.inner.step(id).map_err(lib)
    }
}
