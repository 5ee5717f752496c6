//! `commons train submit --config train.toml`: a training run driven over the
//! swarm.
//!
//! The process joins the swarm as a peer and coordinates the run itself: it
//! builds the corpus and its shards from the configured text, shares every
//! shard's tokens and each round's parameters (a content-addressed
//! checkpoint) over `/commons/blob/1.0.0`, and drives the pure state machine
//! [`commons_coordinator::train::Training`] with the nodes whose adverts say
//! they train (`commons node join --train`): it signs a [`GradientUnit`] for
//! every share the state machine sends, checks every signed result
//! (signature, commitment, shape), and when a round's shares are all in,
//! averages them and takes the optimiser step (AdamW for synchronous
//! data-parallel, DiLoCo's outer Nesterov step for DiLoCo) with
//! `commons-train`.
//!
//! # The data, round by round
//!
//! The text (a file, or the files of a folder ending in `suffix`, in name
//! order, `\r\n` read as `\n`) gives a character tokenizer and a corpus; its
//! last `validation_fraction` is held out, the rest is cut into shards of
//! `shard_tokens` (shards shorter than one row are left out).
//!
//! - Synchronous: round `r` draws its global batch of `batch_size` rows from
//!   shard `r mod shards` with `(seed, step r)`; share `i` of `shares` is the
//!   `i`-th equal slice of its rows. The average of the shares' gradients is
//!   the gradient of the whole batch, so the run follows single-process
//!   training on the same batches up to f32 rounding.
//! - DiLoCo: share `i` of round `r` runs `inner_steps` AdamW steps on
//!   batches of `batch_size` rows from shard `(r × shares + i) mod shards`,
//!   seed `seed + i`, steps `r × inner_steps …`.
//! - Pipeline: the rows of a synchronous round, micro-batch `i` being share
//!   `i`'s rows, run through the model cut into `stages` on different nodes
//!   (see [`crate::train_pipe`]).
//!
//! # Files
//!
//! In the output folder: `checkpoints/` (every round's parameters, named by
//! their blake3), `optimizer/` (the optimiser's state at each snapshot),
//! `blobs/` (the shards' tokens), `state.json` (the last snapshot: a run
//! started again with the same configuration and output folder resumes
//! from it), `loss.csv` and `loss.svg` (the loss curve), `receipts.jsonl`
//! (the signed receipt of every result taken) and `final.safetensors`.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use candle_core::Device;
use clap::{Args, Subcommand};
use commons_coordinator::train::{Output, ShareResult, Snapshot, Taken, Ticket, Training};
use commons_protocol::envelope::Envelope;
use commons_protocol::messages::DeterminismClass;
use commons_protocol::messages::{
    AdamWParams, DataShardRef, GradientEncoding, GradientMode, GradientUnit, ParamsRef, Receipt,
    WorkBody, WorkUnit,
};
use commons_protocol::{CoalitionId, Hash, Identity, JobId, ModelId, NodeId, UnixMillis};
use commons_train::data::token_bytes;
use commons_train::{AdamW, CharTokenizer, Checkpoint, Model, OuterNesterov, Params};
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::network::{Command, EventLoop, NetworkConfig};
use crate::settings::Settings;
use crate::train_config::{Dataset, ModeName, RunConfig};

/// `commons train …`.
#[derive(Debug, Subcommand)]
pub enum TrainCommand {
    /// Run a training run over the swarm's training nodes (`commons node
    /// join --train`), configured by the TOML file given with `--config`
    /// (for this command `--config` names the run, not the node's
    /// settings). Shows a progress bar; writes checkpoints, the loss curve
    /// (CSV and SVG) and a snapshot to resume from.
    Submit(SubmitArgs),
    /// Write a checkpoint of a run (`final.safetensors`, or any round's) as
    /// a Hugging Face llama folder that `commons run --model`, `commons node
    /// join --model` and the swarm's jobs serve like any other model.
    Export(ExportArgs),
}

/// Arguments of `commons train export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The checkpoint (a `.safetensors` file written by `commons train`).
    #[arg(value_name = "CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// The folder to write. Default: `<CHECKPOINT without .safetensors>.model`.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Arguments of `commons train submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Where the run's files go. Default: `train-out` in the current folder.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Peer to join through (repeatable; added to the configuration's).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Address to listen on (repeatable; replaces the configuration's).
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// Start once this many training nodes are connected.
    #[arg(long, value_name = "N")]
    pub min_nodes: Option<usize>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Print JSON lines (every share sent, reassigned and taken, every
    /// round) instead of a progress bar.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn now() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

pub(crate) fn hash(h: &commons_train::Hash) -> Hash {
    Hash(*h.as_bytes())
}

/// The optimiser of a run.
#[derive(Debug)]
enum Optimizer {
    AdamW(AdamW),
    Outer(OuterNesterov),
}

/// The coordinator's copy of the model and its optimiser: what aggregation
/// changes.
#[derive(Debug)]
pub(crate) struct Learner {
    pub(crate) model: Model,
    optimizer: Optimizer,
    tokenizer: CharTokenizer,
    pub(crate) checkpoints: PathBuf,
    optimizer_dir: PathBuf,
}

impl Learner {
    /// Averages the shares' values (in share order) and takes the step.
    fn step(&mut self, values: &[Vec<f32>]) -> anyhow::Result<()> {
        let params = self.model.params();
        let lists = values
            .iter()
            .map(|v| params.unflatten(v))
            .collect::<Result<Vec<_>, _>>()?;
        let averaged = commons_train::grad::average(&lists)?;
        self.step_tensors(&averaged)
    }

    /// Takes the optimiser step with gradients in the model's canonical
    /// order (pipeline runs, whose stages' gradients are merged first).
    pub(crate) fn step_tensors(&mut self, grads: &[candle_core::Tensor]) -> anyhow::Result<()> {
        let params = self.model.params();
        match &mut self.optimizer {
            Optimizer::AdamW(o) => o.step(params, grads)?,
            Optimizer::Outer(o) => o.step(params, grads)?,
        }
        Ok(())
    }

    /// Writes a checkpoint of each stage's parameters over `ranges`; returns
    /// each stage's reference, file and size.
    pub(crate) fn publish_stages(
        &self,
        ranges: &[std::ops::Range<usize>],
    ) -> anyhow::Result<Vec<(ParamsRef, PathBuf, u64)>> {
        self.model
            .split(ranges)?
            .iter()
            .map(|stage| {
                let checkpoint = stage.checkpoint()?;
                let path = checkpoint.save_in(&self.checkpoints)?;
                let root = stage.params().root()?;
                let size = checkpoint.bytes().len() as u64;
                Ok((
                    ParamsRef {
                        root: hash(&root),
                        checkpoint: hash(&checkpoint.id()),
                    },
                    path,
                    size,
                ))
            })
            .collect()
    }

    /// Writes the parameters as a checkpoint (with the model's shape and
    /// tokenizer) and names them.
    pub(crate) fn publish(&self) -> anyhow::Result<(ParamsRef, PathBuf)> {
        let checkpoint = self.model.checkpoint(Some(&self.tokenizer))?;
        let path = checkpoint.save_in(&self.checkpoints)?;
        let root = self.model.params().root()?;
        Ok((
            ParamsRef {
                root: hash(&root),
                checkpoint: hash(&checkpoint.id()),
            },
            path,
        ))
    }

    /// Writes the optimiser's state; returns its file's id.
    pub(crate) fn save_optimizer(&self) -> anyhow::Result<Hash> {
        let names = self.model.params().names();
        let (tensors, meta): (Vec<(String, candle_core::Tensor)>, _) = match &self.optimizer {
            Optimizer::AdamW(o) => {
                let (m, v) = o.moments();
                let named = names
                    .iter()
                    .zip(m)
                    .map(|(n, t)| (format!("m/{n}"), t.clone()))
                    .chain(
                        names
                            .iter()
                            .zip(v)
                            .map(|(n, t)| (format!("v/{n}"), t.clone())),
                    )
                    .collect();
                (
                    named,
                    serde_json::json!({ "kind": "adamw", "steps": o.steps() }),
                )
            }
            Optimizer::Outer(o) => (
                names
                    .iter()
                    .zip(o.momentum())
                    .map(|(n, t)| (format!("momentum/{n}"), t.clone()))
                    .collect(),
                serde_json::json!({ "kind": "outer" }),
            ),
        };
        let state = Params::from_tensors(tensors)?;
        let checkpoint = Checkpoint::from_params(&state, Some(&meta.to_string()))?;
        checkpoint.save_in(&self.optimizer_dir)?;
        Ok(hash(&checkpoint.id()))
    }

    /// Restores the optimiser's state saved as `id`.
    fn load_optimizer(&mut self, id: &Hash, config: &RunConfig) -> anyhow::Result<()> {
        let checkpoint = Checkpoint::open(&self.optimizer_dir, &blake3::Hash::from(id.0))?;
        let meta: serde_json::Value =
            serde_json::from_str(&checkpoint.metadata()?.unwrap_or_default())?;
        let state = checkpoint.to_params(&Device::Cpu)?;
        let params = self.model.params();
        let get = |prefix: &str| -> anyhow::Result<Vec<candle_core::Tensor>> {
            params
                .names()
                .iter()
                .map(|n| Ok(state.require(&format!("{prefix}/{n}"))?.as_tensor().clone()))
                .collect()
        };
        self.optimizer = match config.train.mode {
            ModeName::Sync | ModeName::Pipeline => Optimizer::AdamW(AdamW::from_state(
                params,
                config.train.adamw.config(),
                meta["steps"].as_u64().unwrap_or(0),
                get("m")?,
                get("v")?,
            )?),
            ModeName::Diloco => Optimizer::Outer(OuterNesterov::from_state(
                params,
                config.train.outer.config(),
                get("momentum")?,
            )?),
        };
        Ok(())
    }
}

/// One completed round, as the loss curve records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Rounds done.
    pub round: u64,
    /// Mean training loss of the round's shares (at its starting parameters).
    pub train_loss: f32,
    /// Validation loss after the round, when measured.
    pub val_loss: Option<f32>,
    /// Seconds since the run started.
    pub seconds: f64,
    /// Training nodes in the set.
    pub nodes: usize,
    /// Bytes of the answers received in the round (every copy: resends
    /// and checks included).
    #[serde(default)]
    pub bytes_up: u64,
    /// Bytes of parameters the round's nodes fetched, at most: the
    /// checkpoint's size for each node given work (a node fetches each
    /// checkpoint once, and only the 1 MiB blocks that differ from a
    /// checkpoint it holds; in a pipeline run, its stage's checkpoint for each
    /// stage it worked on).
    #[serde(default)]
    pub bytes_params: u64,
    /// Bytes of the units sent in the round (activations, in a pipeline
    /// run; a few hundred bytes per unit otherwise).
    #[serde(default)]
    pub bytes_down: u64,
    /// Shares sent, resends included.
    pub sends: u32,
    /// Shares taken from a node and sent again.
    pub reassigned: u32,
}

/// What a restarted run continues from (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) run: String,
    pub(crate) round: u64,
    pub(crate) params_root: String,
    pub(crate) checkpoint: String,
    pub(crate) optimizer: String,
    pub(crate) rows: Vec<Row>,
}

impl State {
    /// Writes `state.json` in `out`, atomically.
    pub(crate) fn save(&self, out: &Path) -> anyhow::Result<()> {
        let path = out.join("state.json");
        let part = out.join("state.json.part");
        std::fs::write(&part, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&part, &path)?;
        Ok(())
    }
}

/// Writes the optimiser's state, `state.json` (snapshot `snapshot` with the
/// loss curve so far) and the curve's files in `out`; returns the state.
pub(crate) fn save_snapshot(
    learner: &Learner,
    run: JobId,
    snapshot: Snapshot,
    rows: &[Row],
    out: &Path,
) -> anyhow::Result<State> {
    let optimizer = learner.save_optimizer()?;
    let state = State {
        run: run.to_string(),
        round: snapshot.round,
        params_root: snapshot.params.root.to_string(),
        checkpoint: snapshot.params.checkpoint.to_string(),
        optimizer: optimizer.to_string(),
        rows: rows.to_vec(),
    };
    state.save(out)?;
    write_curve(out, rows, run)?;
    Ok(state)
}

/// Each training node as its own operator (a node key is a member's key),
/// with its determinism class: the verification ledger's profiles.
pub(crate) fn profiles(
    nodes: &[(NodeId, DeterminismClass)],
) -> std::collections::BTreeMap<NodeId, commons_coordinator::verify::Profile> {
    nodes
        .iter()
        .map(|(node, class)| {
            let profile = commons_coordinator::verify::Profile {
                operator: *node,
                class: class.clone(),
            };
            (*node, profile)
        })
        .collect()
}

/// A uniform draw that decides whether a result is checked. Without
/// randomness, 0 (check): a predictable draw would let a node learn which
/// results go unchecked.
pub(crate) fn check_draw() -> u64 {
    let mut draw = [0u8; 8];
    match getrandom::fill(&mut draw) {
        Ok(()) => u64::from_le_bytes(draw),
        Err(_) => 0,
    }
}

/// Appends a taken result's signed receipt to `receipts.jsonl`.
pub(crate) fn append_receipt(file: &mut std::fs::File, receipt: &Receipt) {
    let line = serde_json::json!({
        "unit": receipt.unit.to_string(),
        "executor": receipt.executor.to_string(),
        "commitment": receipt.commitment.to_string(),
        "compute_micros": receipt.metrics.compute_micros,
        "tokens": receipt.metrics.tokens,
        "signature": hex::encode(receipt.signature.0),
    });
    if let Err(e) = writeln!(file, "{line}") {
        tracing::warn!(%e, "cannot append to receipts.jsonl");
    }
}

/// blake3, under `domain`, over the digests of a result's `outputs` alone
/// (the receipt's commitment also binds the unit, whose nonce differs
/// between copies): equal for the same unit on nodes of one class.
pub(crate) fn outputs_digest<'a>(
    domain: &str,
    outputs: impl IntoIterator<Item = &'a commons_protocol::Tensor>,
) -> Hash {
    let digests: Vec<[u8; 32]> = outputs.into_iter().map(|t| t.digest().0).collect();
    let parts: Vec<&[u8]> = digests.iter().map(<[u8; 32]>::as_slice).collect();
    Hash::of_parts(domain, &parts)
}

/// A share's checked result.
#[derive(Debug)]
struct ShareOutcome {
    loss: f32,
    values: Vec<f32>,
    receipt: Receipt,
    /// Bytes of the answer.
    bytes: u64,
    /// blake3 over the outputs alone (the receipt's commitment also binds
    /// the unit, whose nonce differs between copies of a share).
    digest: Hash,
}

/// A shard shared with the swarm.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShardFile {
    pub(crate) blob: Hash,
    pub(crate) shard: Hash,
}

struct Driver {
    config: RunConfig,
    dataset: Arc<Dataset>,
    run: JobId,
    out: PathBuf,
    identity: Arc<Identity>,
    commands: mpsc::Sender<Command>,
    training: Training<ShareOutcome>,
    learner: Option<Learner>,
    shard_files: Vec<ShardFile>,
    shared: VecDeque<Hash>,
    results_tx: mpsc::Sender<(Ticket, Result<ShareOutcome, String>)>,
    results_rx: mpsc::Receiver<(Ticket, Result<ShareOutcome, String>)>,
    rows: Vec<Row>,
    nonces: crate::identity::Nonces,
    json: bool,
    bar: indicatif::ProgressBar,
    started: Instant,
    /// Answer bytes received in the current round.
    round_bytes_up: u64,
    /// Unit bytes sent in the current round.
    round_bytes_down: u64,
    /// Nodes given work in the current round.
    round_nodes: std::collections::BTreeSet<NodeId>,
    /// Size of the current parameters' checkpoint file.
    checkpoint_bytes: u64,
    receipts: std::fs::File,
    nodes: usize,
    num_elements: usize,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("run", &self.run)
            .finish_non_exhaustive()
    }
}

/// Runs `commons train …`; `config` is the run's file (the global `--config`).
pub fn run(
    settings: &Settings,
    config: Option<PathBuf>,
    command: TrainCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        TrainCommand::Submit(args) => {
            let Some(config) = config else {
                bail!("commons train submit needs the run's configuration: --config train.toml");
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(submit(settings, &config, args))
        }
        TrainCommand::Export(args) => {
            if !crate::train_export::is_training_checkpoint(&args.checkpoint) {
                bail!(
                    "{} is not a checkpoint written by commons train",
                    args.checkpoint.display()
                );
            }
            let out = args.out.unwrap_or_else(|| {
                let stem = args
                    .checkpoint
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("checkpoint");
                args.checkpoint.with_file_name(format!("{stem}.model"))
            });
            let id = crate::train_export::export(&args.checkpoint, &out)?;
            println!(
                "checkpoint {id} written as a model folder: {}",
                out.display()
            );
            println!(
                "run it: commons run --model {} --prompt TEXT",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints an event: a JSON line with `--json`; otherwise a line for people
/// for the events worth one (the progress bar shows the rest).
pub(crate) fn event(json: bool, bar: &indicatif::ProgressBar, value: &serde_json::Value) {
    if json {
        println!("{value}");
        return;
    }
    let num = |k: &str| value[k].as_f64().unwrap_or(f64::NAN);
    let text = |k: &str| value[k].as_str().unwrap_or("?").to_owned();
    let line = match value["event"].as_str() {
        Some("run") => format!(
            "run {}: {} parameters, {} tokens in {} shards{}",
            text("run"),
            value["parameters"],
            value["tokens"],
            value["shards"],
            match value["resumed_at"].as_u64() {
                Some(0) | None => String::new(),
                Some(r) => format!(", resumed after round {r}"),
            }
        ),
        Some("round") if value["val_loss"].is_number() => format!(
            "round {}: train loss {:.4}, validation loss {:.4}",
            value["round"],
            num("train_loss"),
            num("val_loss")
        ),
        Some("reassigned") => format!(
            "round {}: share {} taken from {} and sent again ({})",
            value["round"],
            value["share"],
            text("node"),
            text("reason")
        ),
        Some("moved") if value["from"].is_string() => format!(
            "round {}: stage {} (layers {}) moved from {} to {} ({})",
            value["round"],
            value["stage"],
            text("layers"),
            text("from"),
            text("node"),
            text("reason")
        ),
        Some("pipeline") => format!(
            "pipeline: stages {} with {} micro-batches per round",
            value["stages"], value["micro_batches"]
        ),
        Some("done") => format!(
            "trained {} rounds in {:.1} s: train loss {:.4}, validation loss {:.4}; \
             final parameters {} (params root {}); {} shares sent, {} reassigned",
            value["rounds"],
            num("seconds"),
            num("train_loss"),
            num("val_loss"),
            text("path"),
            text("params_root"),
            value["sent"],
            value["reassigned"]
        ),
        _ => return,
    };
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

async fn submit(
    settings: &Settings,
    config_path: &Path,
    args: SubmitArgs,
) -> anyhow::Result<ExitCode> {
    let (mut config, config_text) = RunConfig::load(config_path)?;
    if !args.listen.is_empty() {
        config.swarm.listen.clone_from(&args.listen);
    }
    config
        .swarm
        .bootstrap
        .extend(args.bootstrap.iter().cloned());
    if let Some(n) = args.min_nodes {
        config.swarm.min_nodes = n;
    }
    if args.no_mdns {
        config.swarm.mdns = false;
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("train-out"));
    for dir in ["checkpoints", "optimizer", "blobs"] {
        std::fs::create_dir_all(out.join(dir))
            .with_context(|| format!("cannot create {}", out.join(dir).display()))?;
    }
    let dataset = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Dataset::load(&config)).await??
    };
    let run = {
        let mut h = blake3::Hasher::new_derive_key("commons train run v1");
        h.update(config_text.as_bytes());
        h.update(dataset.corpus.id().as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        JobId(id)
    };

    // The shards' tokens, as files to share.
    let mut shard_files = Vec::new();
    for shard in &dataset.shards {
        let bytes = token_bytes(shard.tokens(&dataset.corpus));
        let blob = Hash(*blake3::hash(&bytes).as_bytes());
        let path = out.join("blobs").join(format!("{blob}.tokens"));
        if !path.is_file() {
            std::fs::write(&path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        shard_files.push((
            ShardFile {
                blob,
                shard: hash(&shard.id()),
            },
            path,
        ));
    }

    // The model: from the last snapshot of this very run, or new.
    let model_config = config.model.config(dataset.tokenizer.vocab_size());
    let state_path = out.join("state.json");
    let previous: Option<State> = std::fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|s: &State| s.run == run.to_string());
    let (learner, snapshot, rows) = {
        let (config, tokenizer, out) = (config.clone(), dataset.tokenizer.clone(), out.clone());
        let previous = previous.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let checkpoints = out.join("checkpoints");
            let optimizer_dir = out.join("optimizer");
            let fresh_optimizer = |model: &Model| -> anyhow::Result<Optimizer> {
                Ok(match config.train.mode {
                    ModeName::Sync | ModeName::Pipeline => {
                        Optimizer::AdamW(AdamW::new(model.params(), config.train.adamw.config())?)
                    }
                    ModeName::Diloco => Optimizer::Outer(OuterNesterov::new(
                        model.params(),
                        config.train.outer.config(),
                    )?),
                })
            };
            match previous {
                Some(state) => {
                    let id: Hash = state.checkpoint.parse()?;
                    let checkpoint = Checkpoint::open(&checkpoints, &blake3::Hash::from(id.0))?;
                    let (model, _) = Model::from_checkpoint(&checkpoint, &Device::Cpu)?;
                    let optimizer = fresh_optimizer(&model)?;
                    let mut learner = Learner {
                        model,
                        optimizer,
                        tokenizer,
                        checkpoints,
                        optimizer_dir,
                    };
                    learner.load_optimizer(&state.optimizer.parse()?, &config)?;
                    let snapshot = Snapshot {
                        round: state.round,
                        params: ParamsRef {
                            root: state.params_root.parse()?,
                            checkpoint: id,
                        },
                    };
                    Ok((learner, snapshot, state.rows))
                }
                None => {
                    let model = Model::new(model_config, config.train.seed, &Device::Cpu)?;
                    let optimizer = fresh_optimizer(&model)?;
                    let learner = Learner {
                        model,
                        optimizer,
                        tokenizer,
                        checkpoints,
                        optimizer_dir,
                    };
                    let (params, _) = learner.publish()?;
                    Ok((learner, Snapshot { round: 0, params }, Vec::new()))
                }
            }
        })
        .await??
    };
    let num_elements = learner.model.params().num_elements();

    // The network.
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot use the data directory {}",
            settings.data_dir.display()
        )
    })?;
    let (identity, _) = crate::identity::load_or_create(&settings.key)?;
    let identity = Arc::new(identity);
    let capacity = crate::capacity::measure(&settings.data_dir, false)?;
    let listen = if config.swarm.listen.is_empty() {
        vec!["/ip4/0.0.0.0/tcp/0".parse()?]
    } else {
        config.swarm.listen.clone()
    };
    let network = NetworkConfig {
        listen,
        bootstrap: config.swarm.bootstrap.clone(),
        mdns: config.swarm.mdns,
        advert_ttl: Duration::from_secs(config.swarm.advert_ttl_secs.max(3)),
    };
    let (commands, commands_rx) = mpsc::channel(256);
    let event_loop = EventLoop::new(identity.clone(), capacity, network, commands_rx, None, None)?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let network_task = {
        let stop = stop.clone();
        tokio::spawn(event_loop.run(async move { stop.notified().await }))
    };
    for (file, path) in &shard_files {
        commands
            .send(Command::ShareFile {
                id: ModelId(file.blob),
                path: path.clone(),
            })
            .await?;
    }
    let first_checkpoint = learner
        .checkpoints
        .join(format!("{}.safetensors", snapshot.params.checkpoint));
    let checkpoint_bytes = std::fs::metadata(&first_checkpoint).map_or(0, |m| m.len());
    commands
        .send(Command::ShareFile {
            id: ModelId(snapshot.params.checkpoint),
            path: first_checkpoint,
        })
        .await?;
    event(
        args.json,
        &indicatif::ProgressBar::hidden(),
        &serde_json::json!({
            "event": "run",
            "run": run.to_string(),
            "peer_id": identity.node_id().to_string(),
            "parameters": num_elements,
            "shards": shard_files.len(),
            "tokens": dataset.corpus.len(),
            "vocab": dataset.tokenizer.vocab_size(),
            "resumed_at": snapshot.round,
        }),
    );

    // Wait for the training nodes (unless there is nothing left to do).
    let coalition = config.train.coalition()?;
    if snapshot.round < config.train.rounds
        && let Err(e) = wait_for_trainers(&commands, &config.swarm, coalition).await
    {
        stop.notify_one();
        return Err(e);
    }

    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(config.train.rounds).with_style(
            indicatif::ProgressStyle::with_template(
                "training {bar:30} {pos}/{len} rounds {msg} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(snapshot.round);
        bar
    };
    let receipts = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("receipts.jsonl"))
        .context("cannot open receipts.jsonl")?;
    let nonces =
        crate::identity::Nonces::random().map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let shard_files: Vec<ShardFile> = shard_files.into_iter().map(|(f, _)| f).collect();
    let started = Instant::now();
    let (outcome, rows, rounds, stats) = if config.train.mode == ModeName::Pipeline {
        let setup = crate::train_pipe::Setup {
            config,
            dataset: Arc::new(dataset),
            run,
            out: out.clone(),
            identity,
            commands: commands.clone(),
            learner,
            shard_files,
            rows,
            nonces,
            json: args.json,
            bar,
            receipts,
            snapshot,
            started,
        };
        let mut driver = match crate::train_pipe::Driver::start(setup).await {
            Ok(d) => d,
            Err(e) => {
                stop.notify_one();
                return Err(e);
            }
        };
        let outcome = driver.drive().await;
        driver.finish();
        let (rows, rounds, stats) = driver.into_report();
        (outcome, rows, rounds, stats)
    } else {
        let ledger = commons_coordinator::verify::Ledger::new(config.train.verify.config());
        let training = Training::resume(config.state_machine(), snapshot, now())?
            .with_checks(ledger, coalition);
        let (results_tx, results_rx) = mpsc::channel(256);
        let mut driver = Driver {
            config,
            dataset: Arc::new(dataset),
            run,
            out: out.clone(),
            identity,
            commands: commands.clone(),
            training,
            learner: Some(learner),
            shard_files,
            shared: VecDeque::from([snapshot.params.checkpoint]),
            results_tx,
            results_rx,
            rows,
            nonces,
            json: args.json,
            bar,
            started,
            round_bytes_up: 0,
            round_bytes_down: 0,
            round_nodes: std::collections::BTreeSet::new(),
            checkpoint_bytes,
            receipts,
            nodes: 0,
            num_elements,
        };
        let outcome = driver.drive().await;
        driver.bar.finish_and_clear();
        let stats = driver.training.stats();
        let stats = serde_json::json!({
            "sent": stats.sent,
            "accepted": stats.accepted,
            "late": stats.late,
            "dropped": stats.dropped,
            "failures": stats.failures,
            "deadlines": stats.deadlines,
            "reassigned": stats.reassigned,
        });
        (outcome, driver.rows, driver.training.round(), stats)
    };
    stop.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(5), network_task).await;
    let params = outcome?;
    let final_path = out.join("final.safetensors");
    std::fs::copy(
        out.join("checkpoints")
            .join(format!("{}.safetensors", params.checkpoint)),
        &final_path,
    )
    .context("cannot write final.safetensors")?;
    let model_dir = out.join("final.model");
    crate::train_export::export(&final_path, &model_dir)?;
    write_curve(&out, &rows, run)?;
    let last = rows.last();
    let mut done = serde_json::json!({
        "event": "done",
        "run": run.to_string(),
        "rounds": rounds,
        "params_root": params.root.to_string(),
        "checkpoint": params.checkpoint.to_string(),
        "path": final_path.display().to_string(),
        "model": model_dir.display().to_string(),
        "train_loss": last.map(|r| r.train_loss),
        "val_loss": last.and_then(|r| r.val_loss),
        "seconds": started.elapsed().as_secs_f64(),
    });
    if let (Some(done), Some(stats)) = (done.as_object_mut(), stats.as_object()) {
        done.extend(stats.clone());
    }
    event(args.json, &indicatif::ProgressBar::hidden(), &done);
    Ok(ExitCode::SUCCESS)
}

/// Waits until `swarm.min_nodes` training nodes are connected, at most
/// `swarm.wait_secs`.
async fn wait_for_trainers(
    commands: &mpsc::Sender<Command>,
    swarm: &crate::train_config::SwarmSection,
    coalition: Option<CoalitionId>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let nodes = trainers(commands, coalition).await;
        if nodes.len() >= swarm.min_nodes {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(swarm.wait_secs) {
            bail!(
                "{} training node(s){} after {} s, {} wanted (start them with `commons node join --train{}`)",
                nodes.len(),
                coalition.map_or(String::new(), |c| format!(" serving coalition {c}")),
                swarm.wait_secs,
                swarm.min_nodes,
                coalition.map_or(String::new(), |c| format!(" --coalition {c}")),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn trainers(
    commands: &mpsc::Sender<Command>,
    coalition: Option<CoalitionId>,
) -> Vec<(NodeId, DeterminismClass)> {
    let (reply, rx) = oneshot::channel();
    if commands
        .send(Command::Trainers { coalition, reply })
        .await
        .is_err()
    {
        return Vec::new();
    }
    rx.await.unwrap_or_default()
}

/// Opens and checks the answer to `unit` from `node`: a signed result whose
/// outputs are a loss and `n` values in `encoding`.
fn open_answer(
    unit: commons_protocol::UnitId,
    node: NodeId,
    bytes: &[u8],
    encoding: GradientEncoding,
    n: usize,
) -> Result<ShareOutcome, String> {
    let (result, receipt) =
        crate::coordinate::check_response(unit, node, bytes, now()).map_err(|e| e.describe())?;
    let (loss_tensor, values, value_tensors) = match (encoding, &result.outputs[..]) {
        (GradientEncoding::TopK { .. }, [loss, indices, kept]) => {
            let values = densify(indices, kept, n)?;
            (loss, values, vec![indices, kept])
        }
        (GradientEncoding::TopK { .. }, outputs) => {
            return Err(format!("{} outputs, expected 3", outputs.len()));
        }
        (_, [loss, values]) => (
            loss,
            crate::train_exec::decode_values(values, encoding, n)?,
            vec![values],
        ),
        (_, outputs) => return Err(format!("{} outputs, expected 2", outputs.len())),
    };
    let loss = match loss_tensor.to_f32().as_deref() {
        Some(&[l]) if l.is_finite() => l,
        _ => return Err("the loss is not one finite f32".into()),
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err("the values are not all finite".into());
    }
    let digest = outputs_digest(
        "commons share outputs v1",
        std::iter::once(loss_tensor).chain(value_tensors),
    );
    Ok(ShareOutcome {
        loss,
        values,
        receipt,
        bytes: bytes.len() as u64,
        digest,
    })
}

/// The dense vector of `n` values a top-k answer sends as increasing
/// `indices` (u32) and their `kept` values (f32); zeros elsewhere.
fn densify(
    indices: &commons_protocol::Tensor,
    kept: &commons_protocol::Tensor,
    n: usize,
) -> Result<Vec<f32>, String> {
    let (Some(indices), Some(kept)) = (indices.to_u32(), kept.to_f32()) else {
        return Err("top-k values must be u32 indices and f32 values".into());
    };
    if indices.len() != kept.len() || indices.len() > n {
        return Err(format!(
            "{} indices and {} values for {n} parameters",
            indices.len(),
            kept.len()
        ));
    }
    if indices.windows(2).any(|w| w[0] >= w[1]) || indices.last().is_some_and(|&i| i as usize >= n)
    {
        return Err("top-k indices must increase and stay below the parameter count".into());
    }
    let mut dense = vec![0.0f32; n];
    for (&i, &v) in indices.iter().zip(&kept) {
        dense[i as usize] = v;
    }
    Ok(dense)
}

impl Driver {
    /// Runs the rounds to the end; returns the final parameters.
    async fn drive(&mut self) -> anyhow::Result<ParamsRef> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.update_nodes().await;
        loop {
            while let Some(out) = self.training.poll_output() {
                match out {
                    Output::Send {
                        ticket,
                        node,
                        round,
                        share,
                        params,
                        deadline,
                        attempt,
                        check,
                    } => {
                        self.send(ticket, node, round, share, params, deadline, attempt, check)
                            .await?;
                    }
                    Output::Excluded { round, share, node } => {
                        tracing::warn!(round, share, %node, "a node's result was contradicted by two others: excluded from the run");
                        self.event(serde_json::json!({
                            "event": "excluded", "round": round, "share": share,
                            "node": node.to_string(),
                        }));
                    }
                    Output::Undecided {
                        round,
                        share,
                        nodes,
                    } => {
                        tracing::warn!(
                            round,
                            share,
                            "results disagree and no third operator's node can referee: the share waits for one"
                        );
                        self.event(serde_json::json!({
                            "event": "undecided", "round": round, "share": share,
                            "nodes": nodes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        }));
                    }
                    Output::Reassign {
                        round,
                        share,
                        node,
                        reason,
                    } => {
                        let reason = match reason {
                            commons_coordinator::train::Lost::Failed(m) => format!("failed: {m}"),
                            commons_coordinator::train::Lost::Deadline => "deadline".into(),
                            commons_coordinator::train::Lost::Left => "left".into(),
                        };
                        tracing::info!(round, share, %node, %reason, "share reassigned");
                        self.event(serde_json::json!({
                            "event": "reassigned", "round": round, "share": share,
                            "node": node.to_string(), "reason": reason,
                        }));
                    }
                    Output::Aggregate { round, results, .. } => {
                        self.aggregate(round, results).await?;
                    }
                    Output::Persist(snapshot) => self.persist(snapshot)?,
                    Output::Finished { params, .. } => return Ok(params),
                }
            }
            tokio::select! {
                Some((ticket, outcome)) = self.results_rx.recv() => self.on_outcome(ticket, outcome),
                _ = tick.tick() => {
                    self.update_nodes().await;
                    self.training.tick(now());
                }
            }
        }
    }

    fn event(&self, value: serde_json::Value) {
        event(self.json, &self.bar, &value);
    }

    async fn update_nodes(&mut self) {
        let coalition = self.training_coalition();
        let nodes = trainers(&self.commands, coalition).await;
        if nodes.len() != self.nodes {
            self.nodes = nodes.len();
            self.event(serde_json::json!({
                "event": "nodes",
                "nodes": nodes.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>(),
            }));
        }
        self.training.ledger_mut().set_profiles(profiles(&nodes));
        self.training
            .set_nodes(now(), nodes.into_iter().map(|(node, _)| node));
    }

    fn training_coalition(&self) -> Option<CoalitionId> {
        self.config.train.coalition().ok().flatten()
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        ticket: Ticket,
        node: NodeId,
        round: u64,
        share: u32,
        params: ParamsRef,
        deadline: UnixMillis,
        attempt: u32,
        check: bool,
    ) -> anyhow::Result<()> {
        let (shard, batch) = self.dataset.share(&self.config, round, share);
        let file = self.shard_files[shard];
        let t = &self.config.train;
        let mode = match t.mode {
            ModeName::Sync => GradientMode::Gradient,
            ModeName::Pipeline => bail!("pipeline runs send stage units"),
            ModeName::Diloco => GradientMode::LocalSteps {
                steps: t.inner_steps,
                optimizer: AdamWParams {
                    lr: t.adamw.lr,
                    beta1: t.adamw.beta1,
                    beta2: t.adamw.beta2,
                    eps: t.adamw.eps,
                    weight_decay: t.adamw.weight_decay,
                },
            },
        };
        let encoding = self.config.encoding();
        let unit = WorkUnit {
            issuer: self.identity.node_id(),
            nonce: self.nonces.take(),
            issued_at: now(),
            expires_at: deadline,
            body: WorkBody::Gradient(GradientUnit {
                job: self.run,
                round,
                share,
                params,
                data: DataShardRef {
                    blob: file.blob,
                    shard: file.shard,
                },
                batch,
                mode,
                encoding,
                coalition: self.training_coalition(),
                inputs: Vec::new(),
            }),
        };
        let id = unit.id()?;
        self.round_nodes.insert(node);
        let bytes = Envelope::seal(&self.identity, &unit)?.to_bytes();
        self.round_bytes_down += bytes.len() as u64;
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::SendUnit { node, bytes, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the network stopped"))?;
        self.event(serde_json::json!({
            "event": "sent", "round": round, "share": share, "attempt": attempt,
            "node": node.to_string(), "unit": id.to_string(), "check": check,
        }));
        let (results, n) = (self.results_tx.clone(), self.num_elements);
        tokio::spawn(async move {
            let outcome = match rx.await {
                Ok(Ok(bytes)) => {
                    tokio::task::spawn_blocking(move || open_answer(id, node, &bytes, encoding, n))
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                }
                Ok(Err(e)) => Err(format!("unreachable: {e}")),
                Err(_) => Err("the network stopped".into()),
            };
            let _ = results.send((ticket, outcome)).await;
        });
        Ok(())
    }

    fn on_outcome(&mut self, ticket: Ticket, outcome: Result<ShareOutcome, String>) {
        match outcome {
            Ok(share) => {
                self.round_bytes_up += share.bytes;
                let receipt = share.receipt.clone();
                let loss = share.loss;
                let digest = share.digest;
                let taken =
                    self.training
                        .handle_checked(now(), ticket, share, digest, check_draw());
                if taken != Taken::Dropped {
                    append_receipt(&mut self.receipts, &receipt);
                }
                self.event(serde_json::json!({
                    "event": "result", "unit": receipt.unit.to_string(),
                    "node": receipt.executor.to_string(), "loss": loss, "taken": taken.name(),
                }));
            }
            Err(reason) => {
                let wanted = self.training.handle_failure(now(), ticket, &reason);
                tracing::info!(%reason, wanted, "a share failed");
                self.event(serde_json::json!({
                    "event": "share_failed", "reason": reason, "wanted": wanted,
                }));
            }
        }
    }

    async fn aggregate(
        &mut self,
        round: u64,
        results: Vec<ShareResult<ShareOutcome>>,
    ) -> anyhow::Result<()> {
        let Some(mut learner) = self.learner.take() else {
            bail!("the model is missing");
        };
        let losses: Vec<f32> = results.iter().map(|r| r.result.loss).collect();
        let train_loss =
            (losses.iter().map(|&l| f64::from(l)).sum::<f64>() / losses.len() as f64) as f32;
        let values: Vec<Vec<f32>> = results.into_iter().map(|r| r.result.values).collect();
        let t = &self.config.train;
        let last = round + 1 >= t.rounds;
        let evaluate = !self.dataset.validation.is_empty()
            && (last || (t.eval_every > 0 && (round + 1).is_multiple_of(t.eval_every)));
        let dataset = self.dataset.clone();
        let (learner, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = (|| -> anyhow::Result<_> {
                learner.step(&values)?;
                let (next, path) = learner.publish()?;
                let val = if evaluate {
                    Some(learner.model.eval_loss(&dataset.validation)?)
                } else {
                    None
                };
                Ok((next, path, val))
            })();
            (learner, outcome)
        })
        .await?;
        self.learner = Some(learner);
        let (next, path, val_loss) = outcome?;
        let next_bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        // Nodes fetch the new parameters from here; the oldest stop being served.
        self.commands
            .send(Command::ShareFile {
                id: ModelId(next.checkpoint),
                path,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the network stopped"))?;
        self.shared.push_back(next.checkpoint);
        while self.shared.len() > 3 {
            if let Some(old) = self.shared.pop_front() {
                let _ = self.commands.send(Command::UnshareFile(ModelId(old))).await;
            }
        }
        let record = self.training.history().last().copied();
        self.training.handle_aggregated(now(), round, next)?;
        let record = self.training.history().last().copied().or(record);
        let row = Row {
            round: round + 1,
            train_loss,
            val_loss,
            seconds: self.started.elapsed().as_secs_f64(),
            nodes: self.nodes,
            bytes_up: std::mem::take(&mut self.round_bytes_up),
            bytes_params: self.checkpoint_bytes
                * std::mem::take(&mut self.round_nodes).len() as u64,
            bytes_down: std::mem::take(&mut self.round_bytes_down),
            sends: record.map_or(0, |r| r.sends),
            reassigned: record.map_or(0, |r| r.reassigned),
        };
        self.checkpoint_bytes = next_bytes;
        self.bar.set_position(round + 1);
        self.bar.set_message(format!(
            "loss {train_loss:.4}{} on {} nodes",
            val_loss.map_or(String::new(), |v| format!(" (validation {v:.4})")),
            self.nodes
        ));
        self.event(serde_json::json!({
            "event": "round", "round": row.round, "train_loss": row.train_loss,
            "val_loss": row.val_loss, "seconds": row.seconds, "nodes": row.nodes,
            "sends": row.sends, "reassigned": row.reassigned,
            "bytes_up": row.bytes_up, "bytes_params": row.bytes_params,
            "params_root": next.root.to_string(), "checkpoint": next.checkpoint.to_string(),
        }));
        self.rows.push(row);
        Ok(())
    }

    /// Writes the snapshot, the optimiser's state and the loss curve.
    fn persist(&mut self, snapshot: Snapshot) -> anyhow::Result<()> {
        let Some(learner) = &self.learner else {
            bail!("the model is missing");
        };
        let state = save_snapshot(learner, self.run, snapshot, &self.rows, &self.out)?;
        self.event(serde_json::json!({
            "event": "persisted", "round": snapshot.round,
            "checkpoint": state.checkpoint, "optimizer": state.optimizer,
        }));
        Ok(())
    }
}

/// Writes `loss.csv` and `loss.svg` in `out`.
pub(crate) fn write_curve(out: &Path, rows: &[Row], run: JobId) -> anyhow::Result<()> {
    let mut csv = String::from(
        "round,train_loss,val_loss,seconds,nodes,sends,reassigned,bytes_up,bytes_params,bytes_down\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{:.3},{},{},{},{},{},{}\n",
            r.round,
            r.train_loss,
            r.val_loss.map_or(String::new(), |v| v.to_string()),
            r.seconds,
            r.nodes,
            r.sends,
            r.reassigned,
            r.bytes_up,
            r.bytes_params,
            r.bytes_down
        ));
    }
    std::fs::write(out.join("loss.csv"), csv)?;
    plot(&out.join("loss.svg"), rows, &run.to_string())
        .map_err(|e| anyhow::anyhow!("cannot draw loss.svg: {e}"))
}

/// Draws the training and validation loss over rounds.
fn plot(path: &Path, rows: &[Row], run: &str) -> Result<(), String> {
    use plotters::prelude::*;
    let train: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.round as f64, f64::from(r.train_loss)))
        .collect();
    let val: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| r.val_loss.map(|v| (r.round as f64, f64::from(v))))
        .collect();
    let x_max = rows.last().map_or(1.0, |r| r.round as f64).max(1.0);
    let y_max = train
        .iter()
        .chain(&val)
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.05;
    let root = SVGBackend::new(path, (800, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("loss, run {}", &run[..run.len().min(12)]),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("cross-entropy")
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, points, color) in [("train", train, BLUE), ("validation", val, RED)] {
        chart
            .draw_series(LineSeries::new(points, &color))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
