//! Choosing the next token: greedy, temperature, top-k, top-p, repetition
//! penalty, seeded, with stop tokens.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 (or below 1e-7) means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0: all).
    pub top_p: f64,
    /// Divide positive logits (multiply negative ones) of tokens already seen (1.0: off).
    pub repetition_penalty: f32,
    /// Tokens looked back at for the penalty.
    pub repeat_last_n: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

/// Sampling settings that make no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SamplingError {
    /// Temperature is negative or not finite.
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f64),
    /// top-p outside (0, 1].
    #[error("top-p must be in (0, 1], got {0}")]
    TopP(f64),
    /// Repetition penalty not positive.
    #[error("repetition penalty must be > 0, got {0}")]
    RepetitionPenalty(f32),
}

/// Picks tokens from logits.
pub struct Sampler {
    config: SamplingConfig,
    processor: LogitsProcessor,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler for `config`.
    pub fn new(config: SamplingConfig) -> Result<Self, SamplingError> {
        if !config.temperature.is_finite() || config.temperature < 0.0 {
            return Err(SamplingError::Temperature(config.temperature));
        }
        if !(config.top_p > 0.0 && config.top_p <= 1.0) {
            return Err(SamplingError::TopP(config.top_p));
        }
        if !(config.repetition_penalty.is_finite() && config.repetition_penalty > 0.0) {
            return Err(SamplingError::RepetitionPenalty(config.repetition_penalty));
        }
        let t = config.temperature;
        let sampling = if t < 1e-7 {
            Sampling::ArgMax
        } else {
            match (config.top_k, config.top_p < 1.0) {
                (0, false) => Sampling::All { temperature: t },
                (0, true) => Sampling::TopP {
                    p: config.top_p,
                    temperature: t,
                },
                (k, false) => Sampling::TopK { k, temperature: t },
                (k, true) => Sampling::TopKThenTopP {
                    k,
                    p: config.top_p,
                    temperature: t,
                },
            }
        };
        let processor = LogitsProcessor::from_sampling(config.seed, sampling);
        Ok(Self { config, processor })
    }

    /// The next token given `logits` `(vocab,)` and the tokens so far.
    pub fn sample(&mut self, logits: &Tensor, history: &[u32]) -> candle_core::Result<u32> {
        let logits = if (self.config.repetition_penalty - 1.0).abs() > f32::EPSILON {
            let start = history.len().saturating_sub(self.config.repeat_last_n);
            candle_transformers::utils::apply_repeat_penalty(
                logits,
                self.config.repetition_penalty,
                &history[start..],
            )?
        } else {
            logits.clone()
        };
        self.processor.sample(&logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn greedy_picks_the_largest_and_penalty_changes_it() {
        let logits = Tensor::new(&[0.1f32, 2.0, 1.9, -1.0], &Device::Cpu).unwrap();
        let mut greedy = Sampler::new(SamplingConfig::default()).unwrap();
        assert_eq!(greedy.sample(&logits, &[]).unwrap(), 1);
        let mut penalised = Sampler::new(SamplingConfig {
            repetition_penalty: 1.5,
            ..SamplingConfig::default()
        })
        .unwrap();
        assert_eq!(penalised.sample(&logits, &[1]).unwrap(), 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = Tensor::new(&[1.0f32, 1.1, 0.9, 1.05, 0.95], &Device::Cpu).unwrap();
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: 4,
            top_p: 0.9,
            seed: 7,
            ..SamplingConfig::default()
        };
        let draw = |cfg: &SamplingConfig| {
            let mut s = Sampler::new(cfg.clone()).unwrap();
            (0..32)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&cfg), draw(&cfg));
        assert_ne!(
            draw(&cfg),
            draw(&SamplingConfig {
                seed: 8,
                ..cfg.clone()
            })
        );
        // top-k 1 is greedy whatever the temperature.
        let one = draw(&SamplingConfig {
            top_k: 1,
            top_p: 1.0,
            ..cfg
        });
        assert!(one.iter().all(|&t| t == 1));
    }

    #[test]
    fn nonsense_settings_are_refused() {
        assert!(
            Sampler::new(SamplingConfig {
                temperature: -1.0,
                ..SamplingConfig::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingConfig {
                top_p: 0.0,
                ..SamplingConfig::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingConfig {
                repetition_penalty: 0.0,
                ..SamplingConfig::default()
            })
            .is_err()
        );
    }
}
