//! Training compute for Commons: everything a node or a coordinator needs to
//! train a model together, with no networking in it.
//!
//! - [`tokenizer`]: a character-level tokenizer built deterministically from a
//!   corpus.
//! - [`data`]: a tokenized corpus with a content id, a held-out validation
//!   tail, content-addressed shards and deterministic batch sampling from
//!   `(seed, shard, step)`.
//! - [`model`]: a llama-architecture decoder (RMSNorm, rotary embeddings,
//!   causal multi-head attention, SwiGLU) whose parameters live in a candle-nn
//!   `VarMap`, split into pipeline [`Stage`]s by layer ranges.
//! - [`params`]: parameters in canonical (sorted-name) order, their blake3
//!   root, and content-addressed safetensors checkpoints.
//! - [`grad`]: gradients by candle autograd, their commitments, bf16 and top-k
//!   compression with error feedback, averaging.
//! - [`optim`]: AdamW applied to supplied gradients and DiLoCo's outer
//!   Nesterov step.
//! - [`pipeline`]: GPipe-style stage-by-stage forward and backward over
//!   micro-batches.
//!
//! Everything is deterministic given its inputs: on one CPU determinism class,
//! the same parameters and batch give bit-identical gradients.

pub mod data;
pub mod grad;
pub mod model;
pub mod optim;
pub mod params;
pub mod pipeline;
pub mod tokenizer;

pub use data::{Batch, Corpus, Shard, Split};
pub use grad::{ErrorFeedback, SparseTensor, gradients};
pub use model::{Model, ModelConfig, Stage};
pub use optim::{AdamW, AdamWConfig, DilocoWorker, OuterNesterov, OuterNesterovConfig};
pub use params::{Checkpoint, Params};
pub use pipeline::{StageGradients, StageTrace, Upstream, even_ranges, pipeline_gradients};
pub use tokenizer::CharTokenizer;

/// A 32-byte blake3 digest: dataset, shard, parameter and checkpoint ids.
pub type Hash = blake3::Hash;

/// A compute operation of this crate that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed in candle.
    #[error("tensor operation failed")]
    Tensor(#[from] candle_core::Error),
    /// Two lists that must match one to one have different lengths.
    #[error("{what}: expected {expected} entries, got {actual}")]
    CountMismatch {
        /// What was being matched.
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length supplied.
        actual: usize,
    },
    /// A tensor's shape is not the one its parameter has.
    #[error("{name}: shape {actual:?} where {expected:?} is required")]
    ShapeMismatch {
        /// The parameter's name.
        name: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The shape supplied.
        actual: Vec<usize>,
    },
    /// A parameter that the model needs is missing.
    #[error("missing parameter {name}")]
    MissingParam {
        /// The parameter's name.
        name: String,
    },
    /// A model configuration or a split that cannot work.
    #[error("invalid configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// A batch whose shape does not fit the operation.
    #[error("invalid batch: {reason}")]
    Batch {
        /// What is wrong.
        reason: String,
    },
}

/// The result of this crate's compute operations.
pub type Result<T> = std::result::Result<T, Error>;
