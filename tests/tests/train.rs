//! Training over a swarm of real processes on loopback: three nodes that
//! train (`commons node join --train`, one of them slow) and `commons train
//! submit` coordinating the run. Synchronous data-parallel rounds must give
//! the parameters of single-process training on the same global batches and
//! seed (relative 1e-5 over the whole parameter vector; see the doc comment
//! of `synchronous_data_parallel_equals_single_process` in
//! `train/tests/training.rs` for why not element-wise), though the
//! coordinator is killed and restarted (it resumes from its last snapshot)
//! and the slow node is killed while it holds a share; then DiLoCo rounds on
//! the two nodes left must equal the same rounds computed in one process.
//! Pipeline-parallel rounds (three stages, one per node, micro-batches) must
//! give the same parameters as single-process training, though a stage's
//! node is killed mid-round.
#![allow(clippy::unwrap_used)] // helpers of tests may fail loudly

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use commons_tests::commons;
use commons_tests::node::{Node, Transports};
use commons_train::params::flatten;
use commons_train::{
    AdamW, AdamWConfig, CharTokenizer, Checkpoint, Corpus, DilocoWorker, Model, ModelConfig,
    OuterNesterov, OuterNesterovConfig, Shard, gradients,
};

const SEED: u64 = 42;
const ROUNDS: u64 = 5;
const BATCH: usize = 6;
const SEQ: usize = 16;
const SHARES: u32 = 3;
const SHARD_TOKENS: usize = 1_000;

/// Text from a tiny grammar: learnable, yet not periodic.
fn corpus_text() -> String {
    const SUBJECTS: [&str; 4] = ["the cat", "a dog", "my bird", "one fox"];
    const VERBS: [&str; 4] = ["sees", "likes", "bites", "finds"];
    const OBJECTS: [&str; 4] = ["the mat", "a hat", "my bed", "one box"];
    let mut x = 7u64;
    let mut pick = |n: u64| {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((x >> 33) % n) as usize
    };
    let mut text = String::new();
    while text.len() < 6_000 {
        text.push_str(SUBJECTS[pick(4)]);
        text.push(' ');
        text.push_str(VERBS[pick(4)]);
        text.push(' ');
        text.push_str(OBJECTS[pick(4)]);
        text.push_str(if pick(5) == 0 { ".\n" } else { ". " });
    }
    text
}

/// Training nodes on loopback under `h`, one per (name, extra flags), each
/// with `--train`, the first the bootstrap of the others; and each one's
/// first address.
fn trainers<const N: usize>(h: &Path, nodes: [(&str, &[&str]); N]) -> ([Node; N], [String; N]) {
    let mut started: Vec<Node> = Vec::with_capacity(N);
    for (name, extra) in nodes {
        let boot: Vec<String> = started
            .first()
            .map(|n| n.addrs[0].clone())
            .into_iter()
            .collect();
        let flags: Vec<&str> = std::iter::once("--train")
            .chain(extra.iter().copied())
            .collect();
        started.push(Node::start_with(
            h,
            &h.join(name),
            &boot,
            Transports::Tcp,
            6,
            &flags,
        ));
    }
    let addrs = std::array::from_fn(|i| started[i].addrs[0].clone());
    let nodes = started
        .try_into()
        .unwrap_or_else(|_| unreachable!("one node per entry"));
    (nodes, addrs)
}

fn write_config(dir: &Path, name: &str, mode: &str, rounds: u64, extra: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"
[data]
path = "corpus.txt"
validation_fraction = 0.05
shard_tokens = {SHARD_TOKENS}

[train]
mode = "{mode}"
rounds = {rounds}
batch_size = {BATCH}
seq_len = {SEQ}
shares = {SHARES}
seed = {SEED}
share_timeout_secs = 20
bench_secs = 1
{extra}

[swarm]
min_nodes = 0
wait_secs = 30
mdns = false
advert_ttl_secs = 6
"#
        ),
    )
    .unwrap();
    path
}

/// The data as the run cuts it: the corpus and its shards longer than a row.
fn dataset() -> (Corpus, Vec<Shard>) {
    let text = corpus_text();
    let tokenizer = CharTokenizer::from_text(&text);
    let corpus = Corpus::from_text(&text, &tokenizer).unwrap();
    let split = corpus.split(0.05).unwrap();
    let shards = corpus
        .shards(split.train, SHARD_TOKENS)
        .unwrap()
        .into_iter()
        .filter(|s| s.range().len() > SEQ)
        .collect();
    (corpus, shards)
}

/// `‖a − b‖ / ‖b‖` over every parameter.
fn relative(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    num.sqrt() / den.sqrt()
}

/// A `commons train submit --json` process and the events it prints.
struct Run {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Run {
    fn start(
        home: &Path,
        config: &Path,
        out: &Path,
        bootstrap: &[String],
        min_nodes: usize,
    ) -> Self {
        let mut cmd = commons(home);
        cmd.arg("--data-dir")
            .arg(home.join("coordinator"))
            .args(["train", "submit", "--json", "--config"])
            .arg(config)
            .arg("--out")
            .arg(out)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--min-nodes"])
            .arg(min_nodes.to_string());
        for b in bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next event that satisfies `want`, within `limit`.
    fn until(
        &mut self,
        limit: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if want(&v) {
                        return v;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the run ended early: {:#?}",
                        &self.seen[self.seen.len().saturating_sub(8)..]
                    )
                }
            }
        }
        panic!(
            "no such event within {limit:?}: {:#?}",
            &self.seen[self.seen.len().saturating_sub(8)..]
        );
    }

    fn events(&self, name: &str) -> Vec<&serde_json::Value> {
        self.seen.iter().filter(|v| v["event"] == name).collect()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Synchronous training in one process for `rounds` rounds, on each round's
/// whole global batch: the initial and final parameters.
fn sync_reference(rounds: u64) -> (Vec<f32>, Vec<f32>) {
    sync_reference_of(ModelConfig::tiny, rounds)
}

/// As [`sync_reference`], for the model `config` gives for the vocabulary.
fn sync_reference_of(config: fn(usize) -> ModelConfig, rounds: u64) -> (Vec<f32>, Vec<f32>) {
    let (corpus, shards) = dataset();
    let reference = Model::new(config(corpus.vocab_size()), SEED, &Device::Cpu).unwrap();
    let initial = reference.params().flatten().unwrap();
    let mut opt = AdamW::new(reference.params(), AdamWConfig::default()).unwrap();
    for round in 0..rounds {
        let shard = &shards[(round % shards.len() as u64) as usize];
        let batch = shard
            .sample_batch(&corpus, SEED, round, BATCH, SEQ)
            .unwrap();
        let (_, g) = gradients(&reference, &batch).unwrap();
        opt.step(reference.params(), &g).unwrap();
    }
    (initial, reference.params().flatten().unwrap())
}

fn final_params(done: &serde_json::Value) -> Vec<f32> {
    let bytes = std::fs::read(done["path"].as_str().unwrap()).unwrap();
    let checkpoint = Checkpoint::from_bytes(bytes);
    assert_eq!(
        checkpoint.id().to_hex().to_string(),
        done["checkpoint"].as_str().unwrap()
    );
    let (model, tokenizer) = Model::from_checkpoint(&checkpoint, &Device::Cpu).unwrap();
    assert!(tokenizer.is_some(), "the checkpoint carries its tokenizer");
    model.params().flatten().unwrap()
}

#[test]
fn data_parallel_rounds_over_three_nodes_equal_one_process_and_survive_a_kill() {
    let started = Instant::now();
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("corpus.txt"), corpus_text()).unwrap();
    // The slow node holds each share two seconds: killed while it holds one.
    let ([a, b, mut slow], all) = trainers(
        h,
        [
            ("a", &[]),
            ("b", &[]),
            ("slow", &["--train-delay-ms", "2000"]),
        ],
    );

    // Synchronous data-parallel over the three. The coordinator is killed
    // once round 1 is persisted, and started again: it resumes from there.
    let config = write_config(h, "sync.toml", "sync", ROUNDS, "");
    let mut first = Run::start(h, &config, &h.join("sync"), &all, 3);
    let started_run = first.until(Duration::from_secs(30), |v| v["event"] == "run");
    assert_eq!(started_run["resumed_at"], 0);
    first.until(Duration::from_secs(30), |v| {
        v["event"] == "persisted" && v["round"] == 1
    });
    drop(first);
    let mut run = Run::start(h, &config, &h.join("sync"), &all, 3);
    let resumed = run.until(Duration::from_secs(30), |v| v["event"] == "run");
    assert_eq!(resumed["resumed_at"], 1, "{resumed}");
    // The slow node is killed while it holds a share.
    let sent = run.until(Duration::from_secs(30), |v| {
        v["event"] == "sent" && v["node"] == slow.peer_id.as_str()
    });
    slow.kill();
    let killed_at = Instant::now();
    let (round, share) = (sent["round"].clone(), sent["share"].clone());
    let lost = run.until(Duration::from_secs(30), |v| {
        v["event"] == "reassigned" && v["round"] == round && v["share"] == share
    });
    assert_eq!(lost["node"], slow.peer_id.as_str());
    let done = run.until(Duration::from_secs(60), |v| v["event"] == "done");
    let recovered = killed_at.elapsed();
    assert_eq!(done["rounds"], ROUNDS);
    // The round of the kill was completed by the others, its lost share sent again.
    let rounds = run.events("round");
    assert_eq!(
        rounds.len() as u64,
        ROUNDS - 1,
        "rounds 2 to {ROUNDS} after the restart"
    );
    let killed_round = rounds
        .iter()
        .find(|r| r["round"].as_u64() == round.as_u64().map(|r| r + 1))
        .unwrap();
    assert!(
        killed_round["reassigned"].as_u64().unwrap() >= 1,
        "{killed_round}"
    );
    // Every result is checked here (all nodes are on probation): each share
    // has one result taken, and its check's held beside it.
    let results: Vec<&serde_json::Value> = run
        .events("result")
        .into_iter()
        .filter(|v| v["taken"] == "accepted" || v["taken"] == "late")
        .collect();
    assert_eq!(
        results.len() as u32,
        (ROUNDS as u32 - 1) * SHARES,
        "every share once"
    );

    // The same rounds in one process, on each round's whole global batch.
    let (corpus, shards) = dataset();
    let (initial, expected) = sync_reference(ROUNDS);
    let got = final_params(&done);
    let err = relative(&got, &expected);
    let moved = relative(&expected, &initial);
    println!(
        "sync data-parallel, 3 nodes, {ROUNDS} rounds: ‖Δθ‖/‖θ‖ = {err:.3e} against one process \
         (training moved θ by {moved:.3e}), through a coordinator restart and a node killed \
         in round {round}; the run done {recovered:.2?} after the kill"
    );
    assert!(moved > 1e-3, "training must move the parameters: {moved}");
    assert!(err < 1e-5, "{err}");
    for file in ["loss.csv", "loss.svg", "state.json", "receipts.jsonl"] {
        assert!(h.join("sync").join(file).is_file(), "{file}");
    }
    let csv = std::fs::read_to_string(h.join("sync/loss.csv")).unwrap();
    assert_eq!(csv.lines().count() as u64, ROUNDS + 1, "{csv}");
    drop(run);

    // DiLoCo on the two nodes left: each share is 4 local AdamW steps.
    let config = write_config(
        h,
        "diloco.toml",
        "diloco",
        3,
        "inner_steps = 4\n[train.adamw]\nlr = 0.003\nweight_decay = 0.0\n",
    );
    let mut run = Run::start(h, &config, &h.join("diloco"), &all[..2], 2);
    let done = run.until(Duration::from_secs(60), |v| v["event"] == "done");
    let got = final_params(&done);
    let global = Model::new(ModelConfig::tiny(corpus.vocab_size()), SEED, &Device::Cpu).unwrap();
    let mut outer = OuterNesterov::new(global.params(), OuterNesterovConfig::default()).unwrap();
    let inner = AdamWConfig {
        lr: 0.003,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let n = shards.len() as u64;
    for round in 0..3u64 {
        let start = global.params().snapshot().unwrap();
        let mut deltas: Vec<Vec<Tensor>> = Vec::new();
        for share in 0..u64::from(SHARES) {
            let shard = &shards[((round * u64::from(SHARES) + share) % n) as usize];
            let batches: Vec<_> = (0..4)
                .map(|k| {
                    shard
                        .sample_batch(&corpus, SEED + share, round * 4 + k, BATCH, SEQ)
                        .unwrap()
                })
                .collect();
            let mut worker = DilocoWorker::new(&global, inner).unwrap();
            deltas.push(worker.round(&start, &batches).unwrap().0);
        }
        let averaged = commons_train::grad::average(&deltas).unwrap();
        outer.step(global.params(), &averaged).unwrap();
    }
    let expected = flatten(&global.params().tensors()).unwrap();
    let err = relative(&got, &expected);
    let losses: Vec<f64> = run
        .events("round")
        .iter()
        .map(|v| v["val_loss"].as_f64().unwrap())
        .collect();
    println!(
        "DiLoCo, 2 nodes, 3 rounds of 4 local steps: ‖Δθ‖/‖θ‖ = {err:.3e}; validation loss {losses:?}"
    );
    assert!(err < 1e-5, "{err}");
    assert!(losses[2] < losses[0], "{losses:?}");
    println!("whole test: {:.2?}", started.elapsed());
    drop((a, b));
}

#[test]
fn the_training_demo_trains_over_local_nodes_and_samples_from_the_result() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("corpus.txt"), corpus_text()).unwrap();
    let config = write_config(h, "demo.toml", "sync", 12, "eval_every = 4");
    let out = h.join("out");
    let result = commons(&h.join("home"))
        .args([
            "demo",
            "--nodes",
            "2",
            "--max-tokens",
            "40",
            "--prompt",
            "the cat",
        ])
        .arg("--train")
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(result.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.matches("training node ").count(), 2, "{err}");
    let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
    let (_, after) = stdout.split_once("trained 12 rounds").expect(&stdout);
    // The run's files, and the trained model as a folder the executor opens.
    for file in [
        "loss.csv",
        "loss.svg",
        "final.safetensors",
        "final.model/config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let curve = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    let losses: Vec<f64> = curve
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.parse().ok())
        .collect();
    assert_eq!(losses.len(), 12, "{curve}");
    assert!(losses[11] < losses[0], "{curve}");
    // The sample, printed after the run's last line, continues the prompt
    // in the corpus's characters only.
    let sample = after
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with('{'))
        .collect::<Vec<_>>()
        .join("\n");
    let alphabet = CharTokenizer::from_text(&corpus_text());
    assert!(sample.trim().len() >= 10, "{stdout}");
    assert!(alphabet.encode(&sample).is_ok(), "{stdout}");
}

#[test]
fn a_node_that_corrupts_its_gradients_is_caught_and_the_run_stays_exact() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("corpus.txt"), corpus_text()).unwrap();
    // The liar signs a gradient it altered, every time.
    let ([_a, _b, _c, liar], all) = trainers(
        h,
        [
            ("a", &[]),
            ("b", &[]),
            ("c", &[]),
            ("liar", &["--fault", "corrupt:1"]),
        ],
    );
    let config = write_config(h, "checked.toml", "sync", ROUNDS, "");
    let mut run = Run::start(h, &config, &h.join("checked"), &all, 4);
    let excluded = run.until(Duration::from_secs(60), |v| v["event"] == "excluded");
    assert_eq!(excluded["node"], liar.peer_id.as_str(), "{excluded}");
    let done = run.until(Duration::from_secs(90), |v| v["event"] == "done");
    // Its results were never taken, and no honest node was excluded.
    let liar_taken = run
        .events("result")
        .into_iter()
        .filter(|v| v["node"] == liar.peer_id.as_str())
        .filter(|v| v["taken"] == "accepted" || v["taken"] == "late")
        .count();
    assert_eq!(liar_taken, 0);
    assert_eq!(run.events("excluded").len(), 1);
    // Nothing it sent reached the parameters.
    let (_, expected) = sync_reference(ROUNDS);
    let err = relative(&final_params(&done), &expected);
    let checks = run
        .events("sent")
        .into_iter()
        .filter(|v| v["check"] == true)
        .count();
    println!(
        "a corrupting node among 4, {ROUNDS} sync rounds: excluded in round {}, {checks} check sends; \
         ‖Δθ‖/‖θ‖ = {err:.3e} against one process",
        excluded["round"]
    );
    assert!(err < 1e-5, "{err}");
}

/// The model of the pipeline test: three layers (one per stage) and tied
/// embeddings, whose gradient the first and last stage share.
fn three_layers(vocab: usize) -> ModelConfig {
    ModelConfig {
        n_layers: 3,
        tie_embeddings: true,
        ..ModelConfig::tiny(vocab)
    }
}

#[test]
fn pipeline_stages_on_three_nodes_equal_one_process_and_survive_a_kill() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("corpus.txt"), corpus_text()).unwrap();
    // The slow node holds each unit a second: killed while it holds one.
    let ([a, b, mut slow], all) = trainers(
        h,
        [
            ("a", &[]),
            ("b", &[]),
            ("slow", &["--train-delay-ms", "1000"]),
        ],
    );
    let rounds = 4;
    let config = write_config(
        h,
        "pipeline.toml",
        "pipeline",
        rounds,
        "stages = 3\n[model]\nn_layers = 3\ntie_embeddings = true\n",
    );
    let mut run = Run::start(h, &config, &h.join("pipeline"), &all, 3);
    // Each stage on its own node at first.
    let pipeline = run.until(Duration::from_secs(30), |v| v["event"] == "pipeline");
    assert_eq!(
        pipeline["stages"],
        serde_json::json!(["0..1", "1..2", "2..3"])
    );
    let mut holders = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let moved = run.until(Duration::from_secs(30), |v| v["event"] == "moved");
        assert!(moved["from"].is_null(), "{moved}");
        holders.insert(moved["node"].as_str().unwrap().to_owned());
    }
    assert_eq!(holders.len(), 3, "{holders:?}");
    // The slow node is killed while it holds a unit of round 1.
    let sent = run.until(Duration::from_secs(60), |v| {
        v["event"] == "sent"
            && v["node"] == slow.peer_id.as_str()
            && v["round"] == 1
            && v["check"] == false
    });
    slow.kill();
    let stage = sent["stage"].clone();
    let moved = run.until(Duration::from_secs(30), |v| {
        v["event"] == "moved" && v["from"] == slow.peer_id.as_str()
    });
    assert_eq!(moved["stage"], stage, "{moved}");
    assert_ne!(moved["node"], slow.peer_id.as_str());
    let done = run.until(Duration::from_secs(90), |v| v["event"] == "done");
    assert_eq!(done["rounds"], rounds);
    assert!(done["reassigned"].as_u64().unwrap() >= 1, "{done}");

    // The same rounds in one process, on each round's whole global batch.
    let (initial, expected) = sync_reference_of(three_layers, rounds);
    let got = final_params(&done);
    let err = relative(&got, &expected);
    let moved_by = relative(&expected, &initial);
    // Units per round: (stages − 1) forward and `stages` backward per micro-batch.
    let sends: Vec<u64> = run
        .events("round")
        .iter()
        .map(|r| r["sends"].as_u64().unwrap())
        .collect();
    println!(
        "pipeline, 3 stages on 3 nodes, {SHARES} micro-batches, {rounds} rounds: ‖Δθ‖/‖θ‖ = {err:.3e} \
         against one process (training moved θ by {moved_by:.3e}); stage {stage} moved after a kill; \
         units per round {sends:?}"
    );
    assert!(
        moved_by > 1e-3,
        "training must move the parameters: {moved_by}"
    );
    assert!(err < 1e-5, "{err}");
    assert!(sends.iter().all(|&n| n >= 15), "{sends:?}");
    let csv = std::fs::read_to_string(h.join("pipeline/loss.csv")).unwrap();
    assert_eq!(csv.lines().count() as u64, rounds + 1, "{csv}");
    drop((a, b));
}

#[test]
fn a_pipeline_stage_that_corrupts_its_outputs_is_caught_and_the_run_stays_exact() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("corpus.txt"), corpus_text()).unwrap();
    // The liar signs outputs it altered, every time; its id is drawn, so it
    // may hold any stage or none.
    let ([a, b, c, liar], all) = trainers(
        h,
        [
            ("a", &[]),
            ("b", &[]),
            ("c", &[]),
            ("liar", &["--fault", "corrupt:1"]),
        ],
    );
    let rounds = 3;
    let config = write_config(
        h,
        "pipeline-checked.toml",
        "pipeline",
        rounds,
        "stages = 3\n[model]\nn_layers = 3\ntie_embeddings = true\n",
    );
    let mut run = Run::start(h, &config, &h.join("pipeline-checked"), &all, 4);
    let done = run.until(Duration::from_secs(120), |v| v["event"] == "done");
    // Every node is on probation: the liar's first result is checked, and
    // whether or not it held a stage, it is caught once it answers.
    let liar_sent = run
        .events("sent")
        .into_iter()
        .filter(|v| v["node"] == liar.peer_id.as_str())
        .count();
    let excluded = run.events("excluded");
    if liar_sent > 0 {
        assert_eq!(excluded.len(), 1, "{excluded:?}");
        assert_eq!(excluded[0]["node"], liar.peer_id.as_str());
    }
    let liar_taken = run
        .events("result")
        .into_iter()
        .filter(|v| v["node"] == liar.peer_id.as_str())
        .filter(|v| v["taken"] == "accepted" || v["taken"] == "late")
        .count();
    assert_eq!(liar_taken, 0, "no result of the liar is used");
    let checks = run
        .events("sent")
        .into_iter()
        .filter(|v| v["check"] == true)
        .count();
    assert!(checks > 0, "results are checked");
    let (_, expected) = sync_reference_of(three_layers, rounds);
    let err = relative(&final_params(&done), &expected);
    println!(
        "pipeline with a corrupting node among 4: {liar_sent} units sent to it, excluded: {}, \
         {checks} check sends; ‖Δθ‖/‖θ‖ = {err:.3e} against one process",
        !excluded.is_empty()
    );
    assert!(err < 1e-5, "{err}");
    assert!(
        liar_sent > 0,
        "the liar was given work (it holds a stage or checks)"
    );
    drop((a, b, c, liar));
}

#[test]
fn top_k_shares_send_a_fraction_of_the_bytes_and_still_train() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("corpus.txt"), corpus_text()).unwrap();
    let ([a, b], all) = trainers(h, [("a", &[]), ("b", &[])]);
    let rounds = 6;
    let dense = write_config(
        h,
        "dense.toml",
        "sync",
        rounds,
        "[train.adamw]\nlr = 0.01\n[train.verify]\nenabled = false\n",
    );
    let sparse = write_config(
        h,
        "topk.toml",
        "sync",
        rounds,
        "encoding = \"topk\"\ntop_k = 0.05\n[train.adamw]\nlr = 0.01\n[train.verify]\nenabled = false\n",
    );
    let mut summary = Vec::new();
    for (name, config) in [("dense", &dense), ("topk", &sparse)] {
        let mut run = Run::start(h, config, &h.join(name), &all, 2);
        let done = run.until(Duration::from_secs(90), |v| v["event"] == "done");
        let rounds_seen = run.events("round");
        let up: u64 = rounds_seen
            .iter()
            .map(|r| r["bytes_up"].as_u64().unwrap())
            .sum();
        let losses: Vec<f64> = rounds_seen
            .iter()
            .map(|r| r["val_loss"].as_f64().unwrap())
            .collect();
        assert_eq!(done["rounds"], rounds);
        summary.push((up, losses));
    }
    let (dense_up, dense_loss) = &summary[0];
    let (topk_up, topk_loss) = &summary[1];
    println!(
        "{rounds} sync rounds on 2 nodes: answers {dense_up} B in f32, {topk_up} B with top-k 5% \
         ({:.1}x fewer); validation loss f32 {dense_loss:?}, top-k {topk_loss:?}",
        *dense_up as f64 / *topk_up as f64
    );
    // An index and a value per kept entry: about a tenth of the f32 bytes.
    assert!(*topk_up * 5 < *dense_up, "{topk_up} vs {dense_up}");
    assert!(
        topk_loss[rounds as usize - 1] < topk_loss[0],
        "{topk_loss:?}"
    );

    // Spot checks cannot re-execute a share that carries a node's residual:
    // such a run is refused before it starts.
    let checked = write_config(
        h,
        "topk-checked.toml",
        "sync",
        rounds,
        "encoding = \"topk\"\n",
    );
    let out = commons(h)
        .arg("--data-dir")
        .arg(h.join("refused"))
        .args(["train", "submit", "--config"])
        .arg(&checked)
        .arg("--out")
        .arg(h.join("refused-out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("enabled = false"), "{err}");
    drop((a, b));
}

/// A new key in `dir`; returns its PeerId.
fn key(home: &Path, dir: &Path) -> String {
    let out = commons(home)
        .arg("--data-dir")
        .arg(dir)
        .args(["keys", "generate", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["peer_id"].as_str().unwrap().to_owned()
}

#[test]
fn a_coalitions_run_uses_only_its_nodes_and_only_its_members_may_submit() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("corpus.txt"), corpus_text()).unwrap();
    // The submitter (`Run` keeps its key in `coordinator/`) is a member.
    let submitter = key(h, &h.join("coordinator"));
    key(h, &h.join("admin"));
    let charter = h.join("riverside.charter");
    let out = commons(h)
        .arg("--data-dir")
        .arg(h.join("admin"))
        .args([
            "coalition",
            "create",
            "riverside",
            "--json",
            "--member",
            &submitter,
        ])
        .arg("--out")
        .arg(&charter)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let serve = ["--train", "--coalition", charter.to_str().unwrap()];
    let a = Node::start_with(h, &h.join("a"), &[], Transports::Tcp, 6, &serve);
    let boot = vec![a.addrs[0].clone()];
    let b = Node::start_with(h, &h.join("b"), &boot, Transports::Tcp, 6, &serve);
    let open = Node::start_with(h, &h.join("open"), &boot, Transports::Tcp, 6, &["--train"]);
    let all = [
        a.addrs[0].clone(),
        b.addrs[0].clone(),
        open.addrs[0].clone(),
    ];
    let extra = format!("coalition = \"{id}\"");
    let config = write_config(h, "coalition.toml", "sync", 3, &extra);
    let mut run = Run::start(h, &config, &h.join("coalition"), &all, 2);
    let done = run.until(Duration::from_secs(60), |v| v["event"] == "done");
    let sent = run.events("sent");
    assert!(!sent.is_empty());
    for s in &sent {
        assert!(
            s["node"] == a.peer_id.as_str() || s["node"] == b.peer_id.as_str(),
            "a share went outside the coalition: {s}"
        );
    }
    let (_, expected) = sync_reference(3);
    assert!(relative(&final_params(&done), &expected) < 1e-5);
    drop(run);

    // Someone else's run for the coalition is refused by its nodes.
    let outsider = h.join("outsider");
    key(h, &outsider.join("coordinator"));
    let mut refused = Run::start(&outsider, &config, &outsider.join("out"), &all, 2);
    let failed = refused.until(Duration::from_secs(60), |v| v["event"] == "share_failed");
    let reason = failed["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        reason.contains("member") || reason.contains("unauthori"),
        "{failed}"
    );
    assert!(refused.events("result").is_empty());
}
