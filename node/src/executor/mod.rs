//! The node's compute engine: models, tokenizers, pipeline stages with
//! KV-cache sessions, and sampling, on candle kernels.

pub mod engine;
pub mod generate;
mod hf;
pub mod model;
pub mod sampling;
pub mod serve;
pub mod session;
pub mod stage;
pub mod tiny;
pub mod tokenizer;

pub use generate::{GenerationStats, Pipeline, StopReason};
pub use model::{LlamaConfig, ModelError, ModelFile, Weight, model_id};
pub use sampling::{Sampler, SamplingConfig};
pub use stage::{Kernels, KvCache, Stage, StageError, StageInput, StageOutput};
pub use tokenizer::{ChatMessage, Tokenizer};
