//! `commons run`: generate on this machine alone, streaming tokens, then
//! report prefill and decode speed.

use std::io::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use candle_core::Device;
use clap::Args;

use crate::executor::{
    ChatMessage, ModelFile, Pipeline, Sampler, SamplingConfig, Stage, StopReason, Tokenizer,
    model_id,
};

/// Environment variable naming the default model file.
pub const ENV_MODEL: &str = "COMMONS_MODEL";
/// The bundled default model, fetched by `scripts/fetch-model.sh`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The bundled model in this source tree (for tests and benches), or
/// `$COMMONS_MODEL`; an error that says how to fetch it when it is missing.
pub fn bundled_model() -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::var_os(ENV_MODEL)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(DEFAULT_MODEL)
        });
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        path.display()
    );
    Ok(path)
}

/// Arguments of `commons run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model: a GGUF file, a Hugging Face llama folder, or a checkpoint of
    /// `commons train` (exported beside it as `<name>.model/` on first use).
    /// Default: the bundled SmolLM2-135M-Instruct.
    #[arg(long, env = ENV_MODEL, default_value = DEFAULT_MODEL, value_name = "PATH")]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_tokens: usize,
    /// Split the model into in-process stages, e.g. `0..10,10..20,20..30`
    /// (default: one stage with every layer). The ranges must cover the model.
    #[arg(long, value_name = "A..B[,B..C…]", value_parser = parse_ranges)]
    pub layers: Option<LayerSplit>,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Penalty for repeating recent tokens (1.0: none).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Print one JSON object (text, tokens, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

/// Layer ranges of in-process stages, as given by `--layers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSplit(pub Vec<Range<usize>>);

/// Parses `A..B[,B..C…]`.
pub fn parse_ranges(s: &str) -> Result<LayerSplit, String> {
    s.split(',')
        .map(|part| {
            let (a, b) = part
                .trim()
                .split_once("..")
                .ok_or_else(|| format!("{part:?} is not a range A..B"))?;
            let a: usize = a
                .trim()
                .parse()
                .map_err(|_| format!("{a:?} is not a layer number"))?;
            let b: usize = b
                .trim()
                .parse()
                .map_err(|_| format!("{b:?} is not a layer number"))?;
            if a >= b {
                return Err(format!("{a}..{b} is empty"));
            }
            Ok(a..b)
        })
        .collect::<Result<_, _>>()
        .map(LayerSplit)
}

/// Runs `commons run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    if !args.model.exists() {
        bail!(
            "model file {} not found (fetch the bundled model with scripts/fetch-model.sh, or pass --model)",
            args.model.display()
        );
    }
    // A training checkpoint runs as the model folder it exports to.
    let path = crate::train_export::resolve(&args.model)?;
    let model = ModelFile::open(&path)?;
    let cfg = model.config().clone();
    let id = model_id(&path)?;
    let tokenizer = Tokenizer::for_model(&model)?;
    let text = if args.chat {
        tokenizer.apply_chat_template(&[ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        }])?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&text)?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if prompt.len() >= cfg.context_length {
        bail!(
            "the prompt is {} tokens; the model's context length is {}",
            prompt.len(),
            cfg.context_length
        );
    }
    let sampler = Sampler::new(SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
        ..SamplingConfig::default()
    });
    let mut sampler = sampler?;
    let ranges = args
        .layers
        .clone()
        .map_or_else(|| vec![0..cfg.n_layer], |l| l.0);
    let device = Device::Cpu;
    let stages = ranges
        .iter()
        .map(|r| Stage::load(&model, r.clone(), &device))
        .collect::<Result<Vec<_>, _>>()?;
    let pipeline = Pipeline::new(stages)?;
    tracing::info!(model = %id, arch = %cfg.architecture, layers = cfg.n_layer, stages = ?ranges, "model loaded");

    let mut stream = tokenizer.stream();
    let mut stdout = std::io::stdout().lock();
    let mut stream_err = None;
    let (tokens, reason, stats) = pipeline
        .generate(
            &prompt,
            args.max_tokens,
            &mut sampler,
            tokenizer.stop_tokens(),
            |token| {
                if args.json || stream_err.is_some() {
                    return;
                }
                match stream.push(token) {
                    Ok(Some(piece)) => {
                        let _ = stdout
                            .write_all(piece.as_bytes())
                            .and_then(|()| stdout.flush());
                    }
                    Ok(None) => {}
                    Err(e) => stream_err = Some(e),
                }
            },
        )
        .context("generation failed")?;
    if let Some(e) = stream_err {
        return Err(e).context("cannot decode the generated tokens");
    }
    let text = tokenizer.decode(&tokens)?;
    let reason = match reason {
        StopReason::StopToken => "stop_token",
        StopReason::MaxTokens => "max_tokens",
    };
    if args.json {
        let value = serde_json::json!({
            "model": id.to_string(),
            "prompt_tokens": stats.prompt_tokens,
            "tokens": tokens,
            "text": text,
            "finish_reason": reason,
            "stages": ranges.iter().map(|r| format!("{}..{}", r.start, r.end)).collect::<Vec<_>>(),
            "prefill_seconds": stats.prefill.as_secs_f64(),
            "decode_seconds": stats.decode.as_secs_f64(),
            "prefill_tokens_per_sec": stats.prefill_tokens_per_sec(),
            "decode_tokens_per_sec": stats.decode_tokens_per_sec(),
        });
        writeln!(stdout, "{value}")?;
    } else {
        writeln!(stdout)?;
        drop(stdout);
        eprintln!(
            "prefill: {} tokens in {:.3} s ({:.1} tok/s); decode: {} tokens in {:.3} s ({:.1} tok/s); finished: {reason}",
            stats.prompt_tokens,
            stats.prefill.as_secs_f64(),
            stats.prefill_tokens_per_sec(),
            stats.generated_tokens,
            stats.decode.as_secs_f64(),
            stats.decode_tokens_per_sec(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(
            parse_ranges("0..10,10..20").unwrap(),
            LayerSplit(vec![0..10, 10..20])
        );
        assert!(parse_ranges("3..3").is_err());
        assert!(parse_ranges("a..b").is_err());
        assert!(parse_ranges("5").is_err());
    }
}
