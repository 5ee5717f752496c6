//! Local generation through a chain of stages in one process: the
//! single-node baseline that the swarm is measured against.

use std::time::{Duration, Instant};

use super::sampling::Sampler;
use super::stage::{KvCache, Stage, StageError, StageInput, StageOutput};

/// A chain of stages covering a model's layers in order.
#[derive(Debug)]
pub struct Pipeline {
    stages: Vec<Stage>,
}

/// Timings of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time to process the prompt (and produce the first token).
    pub prefill: Duration,
    /// Time for the tokens after the first.
    pub decode: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second.
    #[must_use]
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first.
    #[must_use]
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced.
    StopToken,
    /// The token budget was used.
    MaxTokens,
}

impl Pipeline {
    /// Chains `stages`, which must cover the model's layers contiguously from 0 to the end.
    pub fn new(stages: Vec<Stage>) -> Result<Self, StageError> {
        let Some(first) = stages.first() else {
            return Err(StageError::Input(
                "a pipeline needs at least one stage".into(),
            ));
        };
        let n_layer = first.config().n_layer;
        let mut next = 0;
        for stage in &stages {
            let r = stage.layers();
            if r.start != next {
                return Err(StageError::Input(format!(
                    "stages leave a gap or overlap at layer {next} (next stage starts at {})",
                    r.start
                )));
            }
            next = r.end;
        }
        if next != n_layer {
            return Err(StageError::Input(format!(
                "stages end at layer {next}, the model has {n_layer}"
            )));
        }
        Ok(Self { stages })
    }

    /// The stages.
    #[must_use]
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// Fresh caches, one per stage.
    #[must_use]
    pub fn new_caches(&self) -> Vec<KvCache> {
        self.stages.iter().map(Stage::new_cache).collect()
    }

    /// Runs `tokens` through every stage and returns the logits of the last position.
    pub fn forward(
        &self,
        tokens: &[u32],
        caches: &mut [KvCache],
    ) -> Result<candle_core::Tensor, StageError> {
        let mut input = StageInput::Tokens(tokens.to_vec());
        for (stage, cache) in self.stages.iter().zip(caches.iter_mut()) {
            match stage.forward(input, cache)? {
                StageOutput::Hidden(h) => input = StageInput::Hidden(h),
                StageOutput::Logits(l) => return Ok(l),
            }
        }
        Err(StageError::Input(
            "the last stage returned no logits".into(),
        ))
    }

    /// Generates up to `max_tokens` after `prompt`, calling `on_token` with each
    /// new token as soon as it is chosen.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop_tokens: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<(Vec<u32>, StopReason, GenerationStats), StageError> {
        let context = self.stages[0].config().context_length;
        if prompt.is_empty() {
            return Err(StageError::Input("empty prompt".into()));
        }
        if prompt.len() > context {
            return Err(StageError::ContextOverflow {
                needed: prompt.len(),
                max: context,
            });
        }
        let mut caches = self.new_caches();
        let mut history = prompt.to_vec();
        let mut out = Vec::new();
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            ..GenerationStats::default()
        };
        let start = Instant::now();
        let mut next_input = prompt.to_vec();
        let mut reason = StopReason::MaxTokens;
        let mut decode_start = None;
        while out.len() < max_tokens && history.len() < context {
            let logits = self.forward(&next_input, &mut caches)?;
            let token = sampler.sample(&logits, &history)?;
            if decode_start.is_none() {
                stats.prefill = start.elapsed();
                decode_start = Some(Instant::now());
            }
            history.push(token);
            out.push(token);
            on_token(token);
            if stop_tokens.contains(&token) {
                reason = StopReason::StopToken;
                break;
            }
            next_input = vec![token];
        }
        stats.generated_tokens = out.len();
        stats.decode = decode_start.map(|t| t.elapsed()).unwrap_or_default();
        Ok((out, reason, stats))
    }
}
