//! The configuration of a training run (`train.toml`) and the data it
//! describes: which text, which model, how rounds are cut into shares, and
//! where each share's rows come from (see [`crate::train_cli`]).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use commons_coordinator::train::pipeline::PipelineConfig;
use commons_coordinator::train::{Mode, TrainConfig};
use commons_protocol::messages::{BatchSpec, GradientEncoding};
use commons_train::data::{eval_batches, read_text_dir};
use commons_train::{AdamWConfig, Batch, CharTokenizer, Corpus, ModelConfig, OuterNesterovConfig};
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// A training run's configuration (`train.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The text.
    pub data: DataConfig,
    /// The model's shape.
    #[serde(default)]
    pub model: ModelSection,
    /// Rounds, batches, optimisers.
    pub train: TrainSection,
    /// How to reach the training nodes.
    #[serde(default)]
    pub swarm: SwarmSection,
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A text file, or a folder of them (relative paths are taken from the
    /// configuration file's folder).
    pub path: PathBuf,
    /// In a folder, the files whose names end so.
    #[serde(default = "default_suffix")]
    pub suffix: String,
    /// The held-out share of the tokens, from the end.
    #[serde(default = "default_validation")]
    pub validation_fraction: f64,
    /// Tokens per shard.
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: usize,
}

fn default_suffix() -> String {
    ".txt".into()
}
fn default_validation() -> f64 {
    0.05
}
fn default_shard_tokens() -> usize {
    1 << 20
}

/// A model preset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// [`ModelConfig::tiny`]: 2 layers, width 32.
    #[default]
    Tiny,
    /// [`ModelConfig::small`]: 6 layers, width 320, about 7.4M parameters.
    Small,
}

/// `[model]`: a preset and any field of it changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The starting point.
    #[serde(default)]
    pub preset: Preset,
    /// Width of the residual stream.
    pub dim: Option<usize>,
    /// Transformer blocks.
    pub n_layers: Option<usize>,
    /// Attention heads.
    pub n_heads: Option<usize>,
    /// SwiGLU hidden width.
    pub hidden_dim: Option<usize>,
    /// Longest sequence.
    pub max_seq_len: Option<usize>,
    /// Output head tied to the embeddings.
    pub tie_embeddings: Option<bool>,
}

impl ModelSection {
    /// The model for a vocabulary of `vocab_size`.
    #[must_use]
    pub fn config(&self, vocab_size: usize) -> ModelConfig {
        let base = match self.preset {
            Preset::Tiny => ModelConfig::tiny(vocab_size),
            Preset::Small => ModelConfig::small(vocab_size),
        };
        ModelConfig {
            dim: self.dim.unwrap_or(base.dim),
            n_layers: self.n_layers.unwrap_or(base.n_layers),
            n_heads: self.n_heads.unwrap_or(base.n_heads),
            hidden_dim: self.hidden_dim.unwrap_or(base.hidden_dim),
            max_seq_len: self.max_seq_len.unwrap_or(base.max_seq_len),
            tie_embeddings: self.tie_embeddings.unwrap_or(base.tie_embeddings),
            ..base
        }
    }
}

/// How shares are computed and combined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    /// Synchronous data-parallel.
    #[default]
    Sync,
    /// DiLoCo.
    Diloco,
    /// Pipeline-parallel: the model cut into `stages`, each round's batch
    /// into `shares` micro-batches (GPipe).
    Pipeline,
}

/// How values travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingName {
    /// f32.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// Top-k with error feedback on the nodes: the `top_k` fraction of each
    /// tensor's entries (index and f32 value) per share.
    #[serde(rename = "topk")]
    TopK,
}

/// `[train.adamw]`: AdamW (the optimiser in synchronous mode, the inner one
/// in DiLoCo); PyTorch's defaults.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWSection {
    /// Learning rate.
    pub lr: f64,
    /// First moment decay.
    pub beta1: f64,
    /// Second moment decay.
    pub beta2: f64,
    /// Epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWSection {
    fn default() -> Self {
        let d = AdamWConfig::default();
        Self {
            lr: d.lr,
            beta1: d.beta1,
            beta2: d.beta2,
            eps: d.eps,
            weight_decay: d.weight_decay,
        }
    }
}

impl AdamWSection {
    /// As the optimiser takes it.
    #[must_use]
    pub fn config(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// `[train.outer]`: DiLoCo's outer Nesterov step.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OuterSection {
    /// Outer learning rate.
    pub lr: f64,
    /// Nesterov momentum.
    pub momentum: f64,
}

impl OuterSection {
    /// As the optimiser takes it.
    #[must_use]
    pub fn config(&self) -> OuterNesterovConfig {
        OuterNesterovConfig {
            lr: self.lr,
            momentum: self.momentum,
        }
    }
}

impl Default for OuterSection {
    fn default() -> Self {
        let d = OuterNesterovConfig::default();
        Self {
            lr: d.lr,
            momentum: d.momentum,
        }
    }
}

/// `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// `sync`, `diloco` or `pipeline`.
    #[serde(default)]
    pub mode: ModeName,
    /// Rounds (optimiser steps in sync mode, outer steps in DiLoCo).
    pub rounds: u64,
    /// Sync: rows of each round's global batch. DiLoCo: rows of each local
    /// step of each share.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Shares per round (sync: must divide `batch_size`); in pipeline mode,
    /// the micro-batches each round's batch is cut into (must divide it).
    pub shares: u32,
    /// Pipeline mode: stages the model's layers are cut into (each on its
    /// own node while there are enough nodes).
    #[serde(default = "default_stages")]
    pub stages: u32,
    /// DiLoCo: local steps per share.
    #[serde(default = "default_inner_steps")]
    pub inner_steps: u32,
    /// Seed of the initial weights and of batch sampling.
    #[serde(default)]
    pub seed: u64,
    /// How values travel: `f32`, `bf16` or `topk`.
    #[serde(default)]
    pub encoding: EncodingName,
    /// With `encoding = "topk"`: the fraction of each tensor's entries a
    /// share sends (the rest waits in the node's residual).
    #[serde(default = "default_top_k")]
    pub top_k: f64,
    /// A share's deadline; after it the share goes to another node.
    #[serde(default = "default_timeout")]
    pub share_timeout_secs: f64,
    /// How long a node that failed or missed a deadline gets no work.
    #[serde(default = "default_bench")]
    pub bench_secs: f64,
    /// Rounds between validation passes (0: only at the end).
    #[serde(default = "default_one")]
    pub eval_every: u64,
    /// Batches of `batch_size` rows in a validation pass.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Rounds between snapshots to resume from.
    #[serde(default = "default_one")]
    pub persist_every: u64,
    /// AdamW.
    #[serde(default)]
    pub adamw: AdamWSection,
    /// DiLoCo's outer step.
    #[serde(default)]
    pub outer: OuterSection,
    /// Spot checks of the shares' results.
    #[serde(default)]
    pub verify: VerifySection,
    /// The coalition the run is for (its id, 64 hex digits): only nodes
    /// serving it are given shares, and they accept them only if the
    /// submitter is one of its members. Default: open work.
    #[serde(default)]
    pub coalition: Option<String>,
}

impl TrainSection {
    /// The coalition the run is for.
    ///
    /// # Errors
    /// When `coalition` is not 64 hex digits.
    pub fn coalition(&self) -> anyhow::Result<Option<commons_protocol::CoalitionId>> {
        self.coalition
            .as_deref()
            .map(|c| {
                c.parse().map_err(|_| {
                    anyhow::anyhow!("coalition {c:?} is not a coalition id (64 hex digits)")
                })
            })
            .transpose()
    }
}

/// `[train.verify]`: spot checks of shares by re-execution on another
/// operator's node of the same determinism class (see
/// `commons_coordinator::train`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifySection {
    /// Checks on.
    pub enabled: bool,
    /// Consecutive confirmed results before a node is checked less than always.
    pub probation: u32,
    /// The lowest check probability.
    pub p_min: f64,
}

impl Default for VerifySection {
    fn default() -> Self {
        let d = commons_coordinator::verify::VerifyConfig::default();
        Self {
            enabled: d.enabled,
            probation: d.probation,
            p_min: d.p_min,
        }
    }
}

impl VerifySection {
    /// As the ledger takes it.
    #[must_use]
    pub fn config(&self) -> commons_coordinator::verify::VerifyConfig {
        commons_coordinator::verify::VerifyConfig {
            enabled: self.enabled,
            probation: self.probation,
            p_min: self.p_min,
            ..commons_coordinator::verify::VerifyConfig::default()
        }
    }
}

fn default_top_k() -> f64 {
    0.01
}

fn default_stages() -> u32 {
    2
}

fn default_inner_steps() -> u32 {
    10
}
fn default_timeout() -> f64 {
    30.0
}
fn default_bench() -> f64 {
    10.0
}
fn default_one() -> u64 {
    1
}
fn default_eval_batches() -> usize {
    4
}

/// `[swarm]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwarmSection {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through.
    pub bootstrap: Vec<Multiaddr>,
    /// Training nodes to wait for before the first round.
    pub min_nodes: usize,
    /// Longest wait for them.
    pub wait_secs: u64,
    /// Discover peers on the local network.
    pub mdns: bool,
    /// Seconds this process's adverts stay valid.
    pub advert_ttl_secs: u64,
}

impl Default for SwarmSection {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            min_nodes: 1,
            wait_secs: 120,
            mdns: true,
            advert_ttl_secs: 30,
        }
    }
}

impl RunConfig {
    /// Reads and checks a configuration file; relative data paths are taken
    /// from its folder.
    ///
    /// # Errors
    /// When the file cannot be read or parsed, or asks for something that
    /// cannot work.
    pub fn load(path: &Path) -> anyhow::Result<(Self, String)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut config: Self =
            toml::from_str(&text).with_context(|| format!("{} does not parse", path.display()))?;
        if config.data.path.is_relative()
            && let Some(dir) = path.parent()
        {
            config.data.path = dir.join(&config.data.path);
        }
        config.check()?;
        Ok((config, text))
    }

    fn check(&self) -> anyhow::Result<()> {
        let t = &self.train;
        anyhow::ensure!(
            t.batch_size > 0 && t.seq_len > 0,
            "batch_size and seq_len must be positive"
        );
        anyhow::ensure!(t.shares > 0, "a round needs at least one share");
        if t.mode != ModeName::Diloco {
            anyhow::ensure!(
                t.batch_size.is_multiple_of(t.shares as usize),
                "in {} mode the shares ({}) must divide batch_size ({})",
                if t.mode == ModeName::Sync {
                    "sync"
                } else {
                    "pipeline"
                },
                t.shares,
                t.batch_size
            );
        }
        if t.mode == ModeName::Pipeline {
            self.pipeline_machine().validate()?;
        }
        if t.encoding == EncodingName::TopK {
            anyhow::ensure!(
                t.top_k > 0.0 && t.top_k <= 1.0,
                "top_k must be within (0, 1]"
            );
            anyhow::ensure!(
                t.mode != ModeName::Pipeline,
                "pipeline stage units travel dense: encoding = \"topk\" is for sync and diloco runs"
            );
            anyhow::ensure!(
                !t.verify.enabled,
                "top-k with error feedback keeps a residual on each node, so a share's result \
                 cannot be re-executed elsewhere: set enabled = false under [train.verify] \
                 (or use encoding = \"bf16\" with spot checks)"
            );
        }
        anyhow::ensure!(
            t.share_timeout_secs > 0.0 && t.share_timeout_secs <= 540.0,
            "share_timeout_secs must be within (0, 540]: nodes refuse units valid for longer than ten minutes"
        );
        anyhow::ensure!(t.bench_secs >= 0.0, "bench_secs must not be negative");
        t.coalition()?;
        anyhow::ensure!(
            (0.0..=1.0).contains(&t.verify.p_min),
            "verify.p_min must be within [0, 1]"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.data.validation_fraction),
            "validation_fraction must be within [0, 1)"
        );
        anyhow::ensure!(
            self.data.shard_tokens > t.seq_len,
            "shard_tokens must exceed seq_len"
        );
        self.state_machine().validate()?;
        Ok(())
    }

    fn mode(&self) -> Mode {
        match self.train.mode {
            // Pipeline runs use `pipeline_machine`; rows are cut as in sync.
            ModeName::Sync | ModeName::Pipeline => Mode::Sync,
            ModeName::Diloco => Mode::Diloco {
                inner_steps: self.train.inner_steps,
            },
        }
    }

    /// The state machine's configuration.
    #[must_use]
    pub fn state_machine(&self) -> TrainConfig {
        let t = &self.train;
        TrainConfig {
            mode: self.mode(),
            rounds: t.rounds,
            shares_per_round: t.shares,
            share_timeout_ms: (t.share_timeout_secs * 1e3) as u64,
            max_in_flight_per_node: 1,
            bench_ms: (t.bench_secs * 1e3) as u64,
            persist_every: t.persist_every,
        }
    }

    /// The pipeline state machine's configuration.
    #[must_use]
    pub fn pipeline_machine(&self) -> PipelineConfig {
        let t = &self.train;
        PipelineConfig {
            rounds: t.rounds,
            stages: t.stages,
            micro_batches: t.shares,
            unit_timeout_ms: (t.share_timeout_secs * 1e3) as u64,
            max_in_flight_per_node: 4,
            bench_ms: (t.bench_secs * 1e3) as u64,
            persist_every: t.persist_every,
        }
    }

    /// How values travel.
    #[must_use]
    pub fn encoding(&self) -> GradientEncoding {
        match self.train.encoding {
            EncodingName::F32 => GradientEncoding::F32,
            EncodingName::Bf16 => GradientEncoding::Bf16,
            EncodingName::TopK => GradientEncoding::TopK {
                keep_ppm: ((self.train.top_k * 1e6).round() as u32).clamp(1, 1_000_000),
            },
        }
    }
}

/// The corpus of a run and where its rows come from: see the module docs.
#[derive(Debug)]
pub struct Dataset {
    /// The tokenizer.
    pub tokenizer: CharTokenizer,
    /// Every token.
    pub corpus: Corpus,
    /// The training shards long enough for a row, in order.
    pub shards: Vec<commons_train::Shard>,
    /// The validation batches (none when the held-out tail is too short).
    pub validation: Vec<Batch>,
}

impl Dataset {
    /// Reads and cuts the configured text.
    ///
    /// # Errors
    /// When the text cannot be read, or yields no shard long enough.
    pub fn load(config: &RunConfig) -> anyhow::Result<Self> {
        let d = &config.data;
        let text = if d.path.is_dir() {
            read_text_dir(&d.path, &d.suffix)?
        } else {
            std::fs::read_to_string(&d.path)
                .with_context(|| format!("cannot read {}", d.path.display()))?
                .replace("\r\n", "\n")
        };
        let tokenizer = CharTokenizer::from_text(&text);
        let corpus = Corpus::from_text(&text, &tokenizer)?;
        let split = corpus.split(d.validation_fraction)?;
        let seq_len = config.train.seq_len;
        let shards: Vec<_> = corpus
            .shards(split.train, d.shard_tokens)?
            .into_iter()
            .filter(|s| s.range().len() > seq_len)
            .collect();
        if shards.is_empty() {
            bail!(
                "the text ({} tokens) has no training shard longer than a row of {seq_len}",
                corpus.len()
            );
        }
        let validation = eval_batches(
            &corpus.tokens()[split.validation],
            config.train.batch_size,
            seq_len,
            config.train.eval_batches,
        )
        .unwrap_or_default();
        Ok(Self {
            tokenizer,
            corpus,
            shards,
            validation,
        })
    }

    /// The shard and rows of share `share` of round `round`.
    #[must_use]
    pub fn share(&self, config: &RunConfig, round: u64, share: u32) -> (usize, BatchSpec) {
        let t = &config.train;
        let n = self.shards.len() as u64;
        match t.mode {
            ModeName::Sync | ModeName::Pipeline => {
                let rows = (t.batch_size / t.shares as usize) as u32;
                (
                    (round % n) as usize,
                    BatchSpec {
                        seed: t.seed,
                        step: round,
                        batch_size: t.batch_size as u32,
                        seq_len: t.seq_len as u32,
                        rows_start: share * rows,
                        rows_end: (share + 1) * rows,
                    },
                )
            }
            ModeName::Diloco => (
                ((round * u64::from(t.shares) + u64::from(share)) % n) as usize,
                BatchSpec {
                    seed: t.seed.wrapping_add(u64::from(share)),
                    step: round * u64::from(t.inner_steps),
                    batch_size: t.batch_size as u32,
                    seq_len: t.seq_len as u32,
                    rows_start: 0,
                    rows_end: t.batch_size as u32,
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> RunConfig {
        let c: RunConfig = toml::from_str(text).unwrap();
        c.check().unwrap();
        c
    }

    #[test]
    fn configurations_parse_with_defaults_and_bad_ones_are_refused() {
        let c = config(
            r#"
            [data]
            path = "corpus.txt"
            shard_tokens = 500
            [train]
            rounds = 3
            batch_size = 6
            seq_len = 16
            shares = 3
            [train.adamw]
            lr = 0.01
            "#,
        );
        assert_eq!(c.train.mode, ModeName::Sync);
        assert_eq!(c.train.adamw.lr, 0.01);
        assert_eq!(c.train.adamw.beta2, 0.999);
        assert_eq!(c.model.config(20), ModelConfig::tiny(20));
        assert_eq!(c.swarm.min_nodes, 1);
        assert_eq!(c.state_machine().share_timeout_ms, 30_000);
        for bad in [
            "[data]\npath = \"x\"\n[train]\nrounds = 1\nbatch_size = 5\nseq_len = 4\nshares = 2\n",
            "[data]\npath = \"x\"\n[train]\nrounds = 0\nbatch_size = 4\nseq_len = 4\nshares = 2\n",
            "[data]\npath = \"x\"\nbogus = 1\n[train]\nrounds = 1\nbatch_size = 4\nseq_len = 4\nshares = 2\n",
            "[data]\npath = \"x\"\n[train]\nrounds = 1\nbatch_size = 4\nseq_len = 4\nshares = 2\nshare_timeout_secs = 900\n",
        ] {
            let parsed: Result<RunConfig, _> = toml::from_str(bad);
            assert!(parsed.is_err() || parsed.unwrap().check().is_err(), "{bad}");
        }
    }

    #[test]
    fn shares_cut_the_global_batch_or_spread_over_shards() {
        let dir = tempfile::tempdir().unwrap();
        let text = "the cat sees the mat. a dog finds my hat. ".repeat(100);
        std::fs::write(dir.path().join("c.txt"), &text).unwrap();
        let mut c = config(&format!(
            "[data]\npath = {:?}\nshard_tokens = 1000\n[train]\nrounds = 4\nbatch_size = 6\nseq_len = 8\nshares = 3\n",
            dir.path().join("c.txt")
        ));
        let d = Dataset::load(&c).unwrap();
        assert_eq!(
            d.shards.len(),
            4,
            "3,990 training tokens in shards of 1,000"
        );
        let rows: Vec<(u32, u32)> = (0..3)
            .map(|i| {
                let (shard, b) = d.share(&c, 5, i);
                assert_eq!((shard, b.step, b.batch_size), (1, 5, 6));
                (b.rows_start, b.rows_end)
            })
            .collect();
        assert_eq!(rows, vec![(0, 2), (2, 4), (4, 6)]);
        c.train.mode = ModeName::Diloco;
        c.train.inner_steps = 10;
        let (shard, b) = d.share(&c, 1, 2);
        assert_eq!(
            (shard, b.seed, b.step, b.rows_start, b.rows_end),
            (1, 2, 10, 0, 6)
        );
    }
}
