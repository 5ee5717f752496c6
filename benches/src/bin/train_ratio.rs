//! Prints, from one run on this machine, what training over the swarm
//! costs and saves, with the release `commons` binary on 127.0.0.1
//! (`commons demo --train`: local training nodes plus `commons train
//! submit`), on the Shakespeare corpus (`scripts/fetch-shakespeare.sh`):
//!
//! 1. samples/s of synchronous data-parallel training over 3 node processes
//!    against 1, same model, global batch and rounds (spot checks off, so
//!    that only the split is measured), and over 3 with spot checks on;
//! 2. bytes per round, and over the whole compute budget, of synchronous
//!    data-parallel training against DiLoCo with H = 10 and H = 50 local
//!    steps: answers received plus parameters fetched, from each run's
//!    `loss.csv`;
//! 3. the validation loss each mode reaches within one compute budget: the
//!    same number of rows through the model (sync: rounds × global batch;
//!    DiLoCo: rounds × shares × H × batch);
//! 4. pipeline-parallel training (the model cut into 3 stages on 3 nodes,
//!    3 micro-batches per round) against synchronous data-parallel on 3
//!    nodes: samples/s and bytes;
//! 5. top-k (1% of each tensor, error feedback on the nodes) against bf16:
//!    answer bytes and the validation loss reached.
//!
//! Build first: `cargo build --release -p commons-node --bin commons`, then
//! `cargo run --release -p commons-benches --bin train-ratio`. The `commons`
//! binary is `$COMMONS_BIN`, else `target/release/commons`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};
use commons_benches::{commons_bin, machine};

/// Rows through the model in each mode's budget.
const BUDGET_ROWS: u64 = 2_400;
/// Rows per share per step.
const ROWS: u64 = 8;
/// Shares per round.
const SHARES: u64 = 3;

/// One training run's configuration.
struct Spec {
    name: String,
    nodes: usize,
    mode: &'static str,
    inner_steps: u64,
    rounds: u64,
    checks: bool,
    /// Lines added to `[train]`.
    extra: &'static str,
}

/// What a run's `loss.csv` says.
#[derive(Debug)]
struct Measured {
    rounds: u64,
    seconds: f64,
    val_loss: f64,
    bytes_up: u64,
    bytes_params: u64,
    bytes_down: u64,
    wall: f64,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config(spec: &Spec, data: &Path) -> String {
    let batch = if spec.mode != "diloco" {
        ROWS * SHARES
    } else {
        ROWS
    };
    format!(
        r#"
[data]
path = "{data}"
suffix = "_gut.txt"
validation_fraction = 0.05
shard_tokens = 262144

[model]
preset = "tiny"
dim = 128
n_layers = 4
n_heads = 4
hidden_dim = 384
max_seq_len = 64

[train]
mode = "{mode}"
rounds = {rounds}
batch_size = {batch}
seq_len = 64
shares = {SHARES}
inner_steps = {inner}
seed = 3
{extra}
share_timeout_secs = 120
eval_every = 0
eval_batches = 16

[train.adamw]
lr = 0.003

[train.verify]
enabled = {checks}

[swarm]
min_nodes = {nodes}
wait_secs = 120
"#,
        data = data.display(),
        mode = spec.mode,
        rounds = spec.rounds,
        inner = spec.inner_steps.max(1),
        checks = spec.checks,
        nodes = spec.nodes,
        extra = if spec.extra.is_empty() {
            "encoding = \"bf16\""
        } else {
            spec.extra
        },
    )
}

fn measure(bin: &Path, dir: &Path, spec: &Spec, data: &Path) -> anyhow::Result<Measured> {
    let cfg = dir.join(format!("{}.toml", spec.name));
    std::fs::write(&cfg, config(spec, data))?;
    let out = dir.join(&spec.name);
    let started = Instant::now();
    let status = Command::new(bin)
        .arg("--data-dir")
        .arg(dir.join(format!("{}-home", spec.name)))
        .args(["demo", "--max-tokens", "1", "--nodes"])
        .arg(spec.nodes.to_string())
        .arg("--train")
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .env("COMMONS_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot start commons demo --train")?;
    if !status.success() {
        bail!("{}: the run failed ({status})", spec.name);
    }
    let wall = started.elapsed().as_secs_f64();
    let csv = std::fs::read_to_string(out.join("loss.csv"))?;
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let col =
        |r: &Vec<&str>, i: usize| -> f64 { r.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    let last = rows.last().context("empty loss.csv")?;
    Ok(Measured {
        rounds: rows.len() as u64,
        seconds: col(last, 3),
        val_loss: col(last, 2),
        bytes_up: rows.iter().map(|r| col(r, 7) as u64).sum(),
        bytes_params: rows.iter().map(|r| col(r, 8) as u64).sum(),
        bytes_down: rows.iter().map(|r| col(r, 9) as u64).sum(),
        wall,
    })
}

fn run() -> anyhow::Result<()> {
    let bin = commons_bin()?;
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare");
    if !data.is_dir() {
        bail!(
            "{} is missing: run scripts/fetch-shakespeare.sh first",
            data.display()
        );
    }
    let data = data.canonicalize()?;
    let dir = tempfile::tempdir()?;
    println!("machine: {}", machine());
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!(
        "model:   llama, 4 layers, width 128, hidden 384, character vocabulary (about 0.87M parameters); \
         rows of 64 characters; budget {BUDGET_ROWS} rows per mode; bf16 on the wire"
    );
    println!();

    let sync_rounds = BUDGET_ROWS / (ROWS * SHARES);
    let spec = |name: &str, nodes, mode, inner_steps: u64, checks, extra| Spec {
        name: name.to_owned(),
        nodes,
        mode,
        inner_steps,
        rounds: if mode == "diloco" {
            (BUDGET_ROWS / (ROWS * SHARES * inner_steps)).max(1)
        } else {
            sync_rounds
        },
        checks,
        extra,
    };
    let runs = [
        spec("sync-1", 1, "sync", 1, false, ""),
        spec("sync-3", 3, "sync", 1, false, ""),
        spec("sync-3-checked", 3, "sync", 1, true, ""),
        spec("diloco-10", 3, "diloco", 10, false, ""),
        spec("diloco-50", 3, "diloco", 50, false, ""),
        spec(
            "pipeline-3",
            3,
            "pipeline",
            1,
            false,
            "encoding = \"bf16\"\nstages = 3",
        ),
        spec(
            "sync-3-topk",
            3,
            "sync",
            1,
            false,
            "encoding = \"topk\"\ntop_k = 0.01",
        ),
    ];
    let mut results = Vec::new();
    for s in &runs {
        eprintln!(
            "running {} ({} rounds on {} nodes)…",
            s.name, s.rounds, s.nodes
        );
        let m = measure(&bin, dir.path(), s, &data)?;
        results.push(m);
    }
    println!(
        "{:<16} {:>5} {:>7} {:>10} {:>12} {:>14} {:>14} {:>10}",
        "run", "nodes", "rounds", "samples/s", "val loss", "bytes/round", "bytes total", "wall s"
    );
    for (s, m) in runs.iter().zip(&results) {
        let rows = if s.mode == "diloco" {
            m.rounds * ROWS * SHARES * s.inner_steps
        } else {
            m.rounds * ROWS * SHARES
        };
        let total = m.bytes_up + m.bytes_params + m.bytes_down;
        println!(
            "{:<16} {:>5} {:>7} {:>10.1} {:>12.4} {:>14} {:>14} {:>10.1}",
            s.name,
            s.nodes,
            m.rounds,
            rows as f64 / m.seconds.max(1e-9),
            m.val_loss,
            total / m.rounds.max(1),
            total,
            m.wall
        );
    }
    let rate = |i: usize| {
        let s = &runs[i];
        let m = &results[i];
        let rows = if s.mode == "diloco" {
            m.rounds * ROWS * SHARES * s.inner_steps
        } else {
            m.rounds * ROWS * SHARES
        };
        rows as f64 / m.seconds.max(1e-9)
    };
    let bytes =
        |i: usize| (results[i].bytes_up + results[i].bytes_params + results[i].bytes_down) as f64;
    println!();
    println!(
        "samples/s, 3 nodes / 1 node (sync, checks off): {:.2}x; with spot checks on: {:.2}x",
        rate(1) / rate(0),
        rate(2) / rate(0)
    );
    println!(
        "bytes over the budget, sync / DiLoCo H=10: {:.1}x; sync / DiLoCo H=50: {:.1}x",
        bytes(1) / bytes(3),
        bytes(1) / bytes(4)
    );
    println!(
        "validation loss within the budget: sync {:.4}, DiLoCo H=10 {:.4}, DiLoCo H=50 {:.4}",
        results[1].val_loss, results[3].val_loss, results[4].val_loss
    );
    println!(
        "pipeline, 3 stages on 3 nodes / sync on 3 nodes: samples/s {:.2}x, bytes {:.2}x \
         (activations down {} B, answers up {} B)",
        rate(5) / rate(1),
        bytes(5) / bytes(1),
        results[5].bytes_down,
        results[5].bytes_up
    );
    println!(
        "top-k 1% / bf16 (sync, 3 nodes): answer bytes {:.3}x; validation loss {:.4} vs {:.4}",
        results[6].bytes_up as f64 / results[1].bytes_up as f64,
        results[6].val_loss,
        results[1].val_loss
    );
    Ok(())
}
