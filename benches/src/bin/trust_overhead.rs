//! Prints, from one run on this machine, what verification costs:
//!
//! 1. Committing a result (the output tensor's blake3 digest, the commitment
//!    over the unit id and the digests) and signing its receipt with ed25519,
//!    as a fraction of the time to compute it, for a decode step and a
//!    prefill step of a middle span (layers 10..20) of the bundled model.
//!    The goal is under 1%.
//! 2. The extra compute of spot checks once every node has left probation:
//!    the real scheduler drives many jobs over a stand-in swarm (three nodes
//!    per span, every result honest), and the tokens its checkers process are
//!    counted against the tokens of the jobs' own chains.
//!
//! Run: `cargo run --release -p commons-benches --bin trust-overhead`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Device;
use commons_benches::{machine, median, model_path};
use commons_coordinator::job::{
    Lane, NewJob, Output, Scheduler, SchedulerConfig, StepFailure, StepResult,
};
use commons_coordinator::routing::SpanOffer;
use commons_coordinator::verify::{Profile, Sampling, VerifyConfig};
use commons_node::executor::{ModelFile, Stage, StageInput, StageOutput};
use commons_protocol::messages::{
    DeterminismClass, ExecMetrics, InferenceUnit, LayerRange, SamplingParams, WorkResult,
};
use commons_protocol::{Hash, Identity, JobId, ModelId, NodeId, Tensor, UnitId, UnixMillis};

fn main() -> ExitCode {
    commons_node::pin_compute_threads();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    println!("machine: {}", machine());
    println!("command: {}", args.join(" "));
    println!();
    commitment_share()?;
    println!();
    spot_check_share();
    Ok(())
}

/// Median seconds of `f` over `runs`.
fn time(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

fn commitment_share() -> anyhow::Result<()> {
    let path = model_path()?;
    let model = ModelFile::open(&path)?;
    let stage = Stage::load(&model, 10..20, &Device::Cpu)?;
    let hidden = stage.config().hidden;
    let identity = Identity::from_secret([42; 32]);
    println!(
        "1. commitment + receipt signature vs compute, layers 10..20 of {}",
        path.display()
    );
    println!(
        "   {:<22} {:>12} {:>14} {:>10}",
        "step", "compute ms", "commit+sign ms", "share"
    );
    for (name, n) in [("decode (1 token)", 1usize), ("prefill (128 tokens)", 128)] {
        let input = candle_core::Tensor::randn(0f32, 1.0, (1, n, hidden), &Device::Cpu)?;
        // Each run: a cache warmed with 64 positions, as mid-generation, then
        // the step alone is timed.
        let (mut steps, mut out) = (Vec::new(), None);
        for _ in 0..9 {
            let mut cache = stage.new_cache();
            let warm = candle_core::Tensor::randn(0f32, 1.0, (1, 64, hidden), &Device::Cpu)?;
            stage.forward(StageInput::Hidden(warm), &mut cache)?;
            let s = Instant::now();
            out = Some(stage.forward(StageInput::Hidden(input.clone()), &mut cache)?);
            steps.push(s.elapsed().as_secs_f64());
        }
        let compute = median(steps);
        let Some(StageOutput::Hidden(h)) = out else {
            anyhow::bail!("a middle span returns hidden states");
        };
        let values = h.flatten_all()?.to_vec1::<f32>()?;
        let shape: Vec<u64> = h.dims().iter().map(|&d| d as u64).collect();
        let unit = UnitId(Hash([7; 32]));
        let commit = time(51, || {
            // The digest is taken when the wire tensor is built.
            let t = Tensor::from_f32(&shape, &values)?;
            let r = WorkResult::sign(
                &identity,
                unit,
                vec![t],
                ExecMetrics::default(),
                UnixMillis(1),
                UnixMillis(2),
            )?;
            std::hint::black_box(r);
            Ok(())
        })?;
        println!(
            "   {:<22} {:>12.2} {:>14.3} {:>9.2}%",
            name,
            compute * 1e3,
            commit * 1e3,
            100.0 * commit / compute
        );
    }
    Ok(())
}

const MODEL: ModelId = ModelId(Hash([9; 32]));

fn node(n: u8) -> NodeId {
    NodeId([n; 32])
}

/// A stand-in executor whose outputs depend on the session's whole history.
#[derive(Default)]
struct Fake {
    sessions: BTreeMap<(NodeId, [u8; 16]), u64>,
}

impl Fake {
    fn run(&mut self, to: NodeId, unit: &InferenceUnit) -> Result<StepResult, StepFailure> {
        let values: Vec<u64> = match unit.input.to_u32() {
            Some(t) => t.into_iter().map(u64::from).collect(),
            None => unit
                .input
                .to_f32()
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as u64)
                .collect(),
        };
        let state = self.sessions.entry((to, unit.session.0)).or_insert(0);
        let mut outs = Vec::new();
        for v in values {
            *state = (*state * 31 + v + u64::from(unit.layers.start)) % 65_521;
            outs.push(*state as f32);
        }
        let output = if unit.layers.end == 30 {
            Tensor::from_u32(&[1], &[(*state % 50) as u32 + 1])
        } else {
            Tensor::from_f32(&[1, outs.len() as u64, 1], &outs)
        }
        .map_err(|e| StepFailure::Invalid(e.to_string()))?;
        Ok(StepResult {
            executor: to,
            commitment: output.digest(),
            outputs: vec![output],
            input: None,
        })
    }
}

/// Drives `jobs` jobs one after another; returns the tokens processed by the
/// jobs' chains and by their checkers, after the first `warmup` jobs, and the
/// mean check probability at the end.
fn drive(config: VerifyConfig, jobs: u32, warmup: u32, max_tokens: u32) -> (u64, u64, f64) {
    let spans = [
        (1, 0, 10),
        (2, 0, 10),
        (3, 0, 10),
        (4, 10, 20),
        (5, 10, 20),
        (6, 10, 20),
        (7, 20, 30),
        (8, 20, 30),
        (9, 20, 30),
    ];
    let mut s = Scheduler::new(
        SchedulerConfig {
            verify: config,
            ..SchedulerConfig::default()
        },
        1,
    );
    let offers = spans
        .iter()
        .map(|&(n, a, b)| SpanOffer {
            node: node(n),
            layers: LayerRange { start: a, end: b },
            ms_per_layer: 1.0 + f64::from(n) / 100.0,
            rtt_ms: 1.0,
            queue_ms: 0.0,
        })
        .collect();
    s.set_offers(MODEL, 30, 4096, offers);
    let class = DeterminismClass {
        kernel: "cpu".into(),
        build: "bench".into(),
    };
    s.set_profiles(
        spans
            .iter()
            .map(|&(n, ..)| {
                (
                    node(n),
                    Profile {
                        operator: node(n),
                        class: class.clone(),
                    },
                )
            })
            .collect(),
    );
    let mut fake = Fake::default();
    let (mut chain, mut checks) = (0u64, 0u64);
    let mut now = 1_000u64;
    for j in 0..jobs {
        let id = JobId([
            j as u8,
            (j >> 8) as u8,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            9,
            10,
            11,
            12,
            13,
            14,
        ]);
        let prompt: Vec<u32> = (0..16).map(|i| 1 + (i * 7 + j) % 40).collect();
        s.submit(
            UnixMillis(now),
            NewJob {
                id,
                submitter: node(100),
                model: MODEL,
                prompt,
                max_tokens,
                stop_tokens: Vec::new(),
                sampling: SamplingParams {
                    temperature: 0.0,
                    top_k: 0,
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    seed: 0,
                },
            },
        )
        .expect("a route exists");
        let (mut chain_tokens, mut check_tokens) = (0u64, 0u64);
        while let Some(out) = s.poll_output() {
            now += 1;
            if let Output::Send {
                ticket,
                node,
                unit,
                lane,
                ..
            } = out
            {
                let tokens = unit.input.shape().get(1).copied().unwrap_or(1);
                match lane {
                    Lane::Chain => chain_tokens += tokens,
                    Lane::Check | Lane::Referee => check_tokens += tokens,
                }
                let r = fake.run(node, &unit);
                s.handle_result(UnixMillis(now), ticket, r);
            }
        }
        if j >= warmup {
            chain += chain_tokens;
            checks += check_tokens;
        }
    }
    // Over the nodes that served the jobs' chains (the fastest of each span).
    let mean_p = [1, 4, 7]
        .iter()
        .map(|&n| s.ledger().probability(&node(n)))
        .sum::<f64>()
        / 3.0;
    (chain, checks, mean_p)
}

fn spot_check_share() {
    const JOBS: u32 = 300;
    const WARMUP: u32 = 50;
    const TOKENS: u32 = 32;
    println!(
        "2. spot checks at steady state: {JOBS} jobs of {TOKENS} tokens over 3 nodes per span, the first {WARMUP} not counted"
    );
    println!(
        "   {:<36} {:>10} {:>14} {:>14}",
        "policy", "p at end", "check tokens", "extra compute"
    );
    for (name, config) in [
        ("p_min 0.05, compare replays", VerifyConfig::default()),
        (
            "p_min 0.05, whole sessions",
            VerifyConfig {
                sampling: Sampling::Session,
                ..VerifyConfig::default()
            },
        ),
        (
            "p_min 0.01, compare replays",
            VerifyConfig {
                p_min: 0.01,
                ..VerifyConfig::default()
            },
        ),
    ] {
        let (chain, checks, p) = drive(config, JOBS, WARMUP, TOKENS);
        println!(
            "   {:<36} {:>10.3} {:>14} {:>13.1}%",
            name,
            p,
            checks,
            100.0 * checks as f64 / chain.max(1) as f64
        );
    }
    println!(
        "   (a check replays the hop's steps up to the sampled one in a session of its own, so its cost is that prefix, not one unit)"
    );
}
