//! Prints, from one run on this machine: prefill and decode tokens/s of our
//! stages vs candle-transformers' quantized llama (and llama.cpp's
//! `llama-bench` when it is on PATH) on the bundled model, candle's f32 matmul
//! GFLOP/s against the machine's estimated peak, and the peak RSS of a
//! one-third stage against the whole model.
//!
//! Decode is timed twice: after the prompt (positions 256 to 384, the harder
//! case: attention reads the whole cache), and from a one-token context, as
//! `llama-bench`'s generation test runs (it clears the cache first).
//!
//! Run it with `scripts/bench-executor.sh` (release build).

use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context as _;
use candle_core::{Device, Tensor};
use commons_benches::{
    CandleQuantizedLlama, Commons, Engine, machine, median, model_path, prompt, time_run,
};

struct Opts {
    runs: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
}

fn main() -> ExitCode {
    // The same thread setting for every engine measured (see the function's docs).
    commons_node::pin_compute_threads();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(range) = arg_value(&args, "--rss") {
        return rss_child(&range);
    }
    let parse = |name: &str, default: usize| -> anyhow::Result<usize> {
        arg_value(&args, name).map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name} {v}"))
        })
    };
    let opts = Opts {
        runs: parse("--runs", 3)?,
        prompt_tokens: parse("--prompt-tokens", 256)?,
        decode_tokens: parse("--decode-tokens", 128)?,
    };
    let path = model_path()?;

    println!("machine: {}", machine());
    println!(
        "threads: RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
    );
    println!("command: {}", args.join(" "));
    println!(
        "model:   {} ({} prompt tokens, {} greedy decode tokens, median of {} runs)",
        path.display(),
        opts.prompt_tokens,
        opts.decode_tokens,
        opts.runs
    );
    println!();

    let p = prompt(opts.prompt_tokens);
    // (name, prefill, decode after the prompt, decode from an empty context).
    let mut rows: Vec<(String, f64, Option<f64>, f64)> = Vec::new();
    let mut engines: Vec<(&str, Box<dyn Engine>)> = vec![
        (
            "commons (1 stage)",
            Box::new(Commons::load(&path, &[0..30])?),
        ),
        (
            "commons (3 stages, one process)",
            Box::new(Commons::load(&path, &[0..10, 10..20, 20..30])?),
        ),
        (
            "candle quantized_llama",
            Box::new(CandleQuantizedLlama::load(&path)?),
        ),
    ];
    for (name, engine) in &mut engines {
        time_run(engine.as_mut(), &p[..16], 4)?; // warm-up
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        let mut decode_empty = Vec::new();
        for _ in 0..opts.runs {
            let r = time_run(engine.as_mut(), &p, opts.decode_tokens)?;
            prefill.push(opts.prompt_tokens as f64 / r.prefill.as_secs_f64());
            decode.push(opts.decode_tokens as f64 / r.decode.as_secs_f64());
            // As llama-bench's generation test: from a one-token context.
            let r = time_run(engine.as_mut(), &p[..1], opts.decode_tokens)?;
            decode_empty.push(opts.decode_tokens as f64 / r.decode.as_secs_f64());
        }
        rows.push((
            (*name).to_owned(),
            median(prefill),
            Some(median(decode)),
            median(decode_empty),
        ));
    }
    if let Some((pp, tg)) = llama_bench(&path, &opts) {
        rows.push(("llama.cpp llama-bench".to_owned(), pp, None, tg));
    }
    println!(
        "{:<34} {:>14} {:>20} {:>20}",
        "system", "prefill tok/s", "decode tok/s", "decode tok/s"
    );
    println!(
        "{:<34} {:>14} {:>20} {:>20}",
        "", "", "(after the prompt)", "(empty context)"
    );
    for (name, pp, tg, tg0) in &rows {
        let tg = tg.map_or("-".to_owned(), |v| format!("{v:.1}"));
        println!("{name:<34} {pp:>14.1} {tg:>20} {tg0:>20.1}");
    }
    println!();
    let ours = &rows[0];
    for other in &rows[2..] {
        let after = match (ours.2, other.2) {
            (Some(a), Some(b)) => format!(", decode after the prompt {:.2}x", a / b),
            _ => String::new(),
        };
        println!(
            "ratio commons / {}: prefill {:.2}x{after}, decode from an empty context {:.2}x",
            other.0,
            ours.1 / other.1,
            ours.3 / other.3
        );
    }
    if rows.len() < 4 {
        println!(
            "(llama.cpp not measured: put llama-bench on PATH, e.g. build llama.cpp from its source release, to add it)"
        );
    }

    println!();
    let (gflops, peak, how) = matmul_vs_peak()?;
    println!(
        "candle f32 matmul 1024x1024x1024: {gflops:.1} GFLOP/s; estimated peak {peak:.1} GFLOP/s ({how}); ratio {:.2}",
        gflops / peak
    );

    println!();
    let exe = std::env::current_exe()?;
    let third = rss_of(&exe, "10..20")?;
    let whole = rss_of(&exe, "0..30")?;
    println!(
        "peak RSS: stage 10..20 {:.1} MiB, whole model 0..30 {:.1} MiB; ratio {:.2}",
        third / 1024.0,
        whole / 1024.0,
        third / whole
    );
    Ok(())
}

fn matmul_vs_peak() -> anyhow::Result<(f64, f64, String)> {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu)?;
    a.matmul(&b)?;
    let mut rates = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        a.matmul(&b)?;
        rates.push(2.0 * 1024f64.powi(3) / t.elapsed().as_secs_f64() / 1e9);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let flops_per_cycle = if cpuinfo.contains(" fma") && cpuinfo.contains(" avx2") {
        32.0
    } else {
        8.0
    };
    let how = format!(
        "{cores} cores x {mhz:.0} MHz x {flops_per_cycle} f32 FLOP/cycle (two 8-wide FMA pipes)"
    );
    Ok((median(rates), cores * mhz / 1e3 * flops_per_cycle, how))
}

fn rss_of(exe: &std::path::Path, range: &str) -> anyhow::Result<f64> {
    let out = Command::new(exe).args(["--rss", range]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "rss child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .context("rss child output")
}

fn rss_child(range: &str) -> anyhow::Result<()> {
    let (a, b) = range.split_once("..").context("--rss A..B")?;
    let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
    let model = commons_node::executor::ModelFile::open(&model_path()?)?;
    let stage = commons_node::executor::Stage::load(&model, a..b, &Device::Cpu)?;
    let hidden = stage.config().hidden;
    // Run a step so that working memory counts too.
    let mut cache = stage.new_cache();
    let input = if stage.is_first() {
        commons_node::executor::StageInput::Tokens(prompt(64))
    } else {
        commons_node::executor::StageInput::Hidden(Tensor::zeros(
            (1, 64, hidden),
            candle_core::DType::F32,
            &Device::Cpu,
        )?)
    };
    stage.forward(input, &mut cache)?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no VmHWM")?;
    println!("{hwm}");
    Ok(())
}

fn llama_bench(path: &std::path::Path, opts: &Opts) -> Option<(f64, f64)> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let out = Command::new("llama-bench")
        .args(["-m"])
        .arg(path)
        .args([
            "-p",
            &opts.prompt_tokens.to_string(),
            "-n",
            &opts.decode_tokens.to_string(),
            "-t",
            &threads,
            "-r",
            &opts.runs.to_string(),
            "-o",
            "json",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // llama-bench -o json prints an array with one object per test.
    let tests: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    let rate = |prompt: bool| {
        tests
            .iter()
            .find(|t| (t["n_prompt"].as_u64().unwrap_or(0) > 0) == prompt)
            .and_then(|t| t["avg_ts"].as_f64())
    };
    Some((rate(true)?, rate(false)?))
}
