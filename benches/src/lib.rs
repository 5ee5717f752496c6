//! Shared pieces of the Commons benchmarks: criterion benches live in
//! `benches/`, binaries that print ratios measured in one run in `src/bin/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use commons_node::executor::{KvCache, ModelFile, Pipeline, Stage};

/// The bundled model (scripts/fetch-model.sh), or `$COMMONS_MODEL`.
pub fn model_path() -> anyhow::Result<PathBuf> {
    commons_node::run_local::bundled_model()
}

/// Environment variable naming the `commons` binary a bench measures.
pub const ENV_BIN: &str = "COMMONS_BIN";

/// The `commons` binary: `$COMMONS_BIN`, else the release build beside this
/// program (which is `target/<profile>/<bench>`).
///
/// # Errors
/// When there is no such file.
pub fn commons_bin() -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    if let Some(path) = std::env::var_os(ENV_BIN) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(std::path::Path::parent)
        .context("cannot find the target directory")?
        .join("release")
        .join(format!("commons{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: run `cargo build --release -p commons-node --bin commons` or set {ENV_BIN}",
        path.display()
    );
    Ok(path)
}

/// A prompt of `n` ordinary tokens.
#[must_use]
pub fn prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1000 + (i as u32 * 37) % 20_000).collect()
}

/// Something that can prefill a prompt and then decode greedily.
pub trait Engine {
    /// Processes the prompt from position 0; returns the next token.
    fn prefill(&mut self, tokens: &[u32]) -> anyhow::Result<u32>;
    /// Processes one token; returns the next.
    fn decode(&mut self, token: u32) -> anyhow::Result<u32>;
}

/// Our pipeline of stages.
#[derive(Debug)]
pub struct Commons {
    pipeline: Pipeline,
    caches: Vec<KvCache>,
}

impl Commons {
    /// Loads `path` as stages over `ranges`.
    pub fn load(path: &std::path::Path, ranges: &[std::ops::Range<usize>]) -> anyhow::Result<Self> {
        let model = ModelFile::open(path)?;
        let stages = ranges
            .iter()
            .map(|r| Stage::load(&model, r.clone(), &Device::Cpu))
            .collect::<Result<Vec<_>, _>>()?;
        let pipeline = Pipeline::new(stages)?;
        let caches = pipeline.new_caches();
        Ok(Self { pipeline, caches })
    }
}

impl Engine for Commons {
    fn prefill(&mut self, tokens: &[u32]) -> anyhow::Result<u32> {
        self.caches = self.pipeline.new_caches();
        let logits = self.pipeline.forward(tokens, &mut self.caches)?;
        Ok(commons_node::executor::stage::argmax(&logits)?)
    }

    fn decode(&mut self, token: u32) -> anyhow::Result<u32> {
        let logits = self.pipeline.forward(&[token], &mut self.caches)?;
        Ok(commons_node::executor::stage::argmax(&logits)?)
    }
}

/// candle-transformers' `quantized_llama` on the same file.
#[derive(Debug)]
pub struct CandleQuantizedLlama {
    model: quantized_llama::ModelWeights,
    pos: usize,
}

impl CandleQuantizedLlama {
    /// Loads `path`.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
        Ok(Self {
            model: quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?,
            pos: 0,
        })
    }

    fn step(&mut self, tokens: &[u32]) -> anyhow::Result<u32> {
        let x = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let logits = self.model.forward(&x, self.pos)?.squeeze(0)?;
        self.pos += tokens.len();
        Ok(commons_node::executor::stage::argmax(&logits)?)
    }
}

impl Engine for CandleQuantizedLlama {
    fn prefill(&mut self, tokens: &[u32]) -> anyhow::Result<u32> {
        self.pos = 0;
        self.step(tokens)
    }

    fn decode(&mut self, token: u32) -> anyhow::Result<u32> {
        self.step(&[token])
    }
}

/// Prefill and decode times of one run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Time to process the prompt.
    pub prefill: Duration,
    /// Time for the decode steps.
    pub decode: Duration,
}

/// Times a prefill of `prompt` then `steps` greedy decode steps.
pub fn time_run(engine: &mut dyn Engine, prompt: &[u32], steps: usize) -> anyhow::Result<Run> {
    let t = Instant::now();
    let mut token = engine.prefill(prompt)?;
    let prefill = t.elapsed();
    let t = Instant::now();
    for _ in 0..steps {
        token = engine.decode(token)?;
    }
    Ok(Run {
        prefill,
        decode: t.elapsed(),
    })
}

/// The median of `xs`.
#[must_use]
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() {
        f64::NAN
    } else {
        xs[xs.len() / 2]
    }
}

/// This machine in one line: CPU model, threads, memory, OS and architecture.
#[must_use]
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown cpu")
        .trim()
        .to_owned();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(
            || "?".to_owned(),
            |kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0),
        );
    format!(
        "{model}, {threads} threads, {mem} RAM, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}
