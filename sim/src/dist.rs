//! Distributions of durations and node properties, as scenarios name them,
//! with their sampling, CDF and mean (the self-validation tests compare the
//! simulation against the latter two).

use rand::Rng;
use rand_distr::Distribution as _;
use serde::{Deserialize, Serialize};

/// A distribution of non-negative values (seconds, tokens/s, layers…).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum Dist {
    /// Always `value`.
    Constant {
        /// The value.
        value: f64,
    },
    /// Uniform on `[low, high)`.
    Uniform {
        /// Lower bound.
        low: f64,
        /// Upper bound.
        high: f64,
    },
    /// Exponential with the given mean.
    Exponential {
        /// Mean.
        mean: f64,
    },
    /// Weibull: CDF `1 - exp(-(x/scale)^shape)`.
    Weibull {
        /// Shape k (below 1: heavy-tailed sessions, as measured in P2P swarms).
        shape: f64,
        /// Scale λ.
        scale: f64,
    },
    /// Log-normal: `ln X ~ N(mu, sigma²)`.
    LogNormal {
        /// Mean of ln X.
        mu: f64,
        /// Standard deviation of ln X.
        sigma: f64,
    },
    /// Pareto: CDF `1 - (scale/x)^shape` for `x ≥ scale`.
    Pareto {
        /// Minimum value.
        scale: f64,
        /// Tail index α.
        shape: f64,
    },
    /// A mixture: each part drawn with probability proportional to its weight
    /// (e.g. a stable core plus fast turnover).
    Mixture {
        /// Weighted parts.
        parts: Vec<Part>,
    },
}

/// A weighted part of a mixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// Relative weight.
    pub weight: f64,
    /// The distribution.
    #[serde(flatten)]
    pub dist: Dist,
}

/// A distribution whose parameters make no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DistError(pub String);

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 through erf; |error| < 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    let erf = if x >= 0.0 { erf } else { -erf };
    0.5 * (1.0 + erf)
}

fn gamma(x: f64) -> f64 {
    // Lanczos approximation (g = 7, n = 9), good to ~1e-13 for x > 0.5.
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a
}

impl Dist {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), DistError> {
        let bad = |m: &str| Err(DistError(m.to_owned()));
        let pos = |v: f64| v.is_finite() && v > 0.0;
        match self {
            Self::Constant { value } if !(value.is_finite() && *value >= 0.0) => {
                bad("constant: value must be finite and ≥ 0")
            }
            Self::Uniform { low, high } if !(low.is_finite() && high > low && *low >= 0.0) => {
                bad("uniform: need 0 ≤ low < high")
            }
            Self::Exponential { mean } if !pos(*mean) => bad("exponential: mean must be > 0"),
            Self::Weibull { shape, scale } if !(pos(*shape) && pos(*scale)) => {
                bad("weibull: shape and scale must be > 0")
            }
            Self::LogNormal { mu, sigma } if !(mu.is_finite() && pos(*sigma)) => {
                bad("lognormal: sigma must be > 0")
            }
            Self::Pareto { scale, shape } if !(pos(*scale) && pos(*shape)) => {
                bad("pareto: scale and shape must be > 0")
            }
            Self::Mixture { parts } => {
                if parts.is_empty() || parts.iter().any(|p| !pos(p.weight)) {
                    return bad("mixture: needs parts with weights > 0");
                }
                parts.iter().try_for_each(|p| p.dist.validate())
            }
            _ => Ok(()),
        }
    }

    /// One draw.
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        match self {
            Self::Constant { value } => *value,
            Self::Uniform { low, high } => rng.random_range(*low..*high),
            Self::Exponential { mean } => {
                rand_distr::Exp::new(1.0 / mean).map_or(*mean, |d| d.sample(rng))
            }
            Self::Weibull { shape, scale } => {
                rand_distr::Weibull::new(*scale, *shape).map_or(*scale, |d| d.sample(rng))
            }
            Self::LogNormal { mu, sigma } => {
                rand_distr::LogNormal::new(*mu, *sigma).map_or(mu.exp(), |d| d.sample(rng))
            }
            Self::Pareto { scale, shape } => {
                rand_distr::Pareto::new(*scale, *shape).map_or(*scale, |d| d.sample(rng))
            }
            Self::Mixture { parts } => {
                let total: f64 = parts.iter().map(|p| p.weight).sum();
                let mut u = rng.random_range(0.0..total);
                for p in parts {
                    if u < p.weight {
                        return p.dist.sample(rng);
                    }
                    u -= p.weight;
                }
                parts.last().map_or(0.0, |p| p.dist.sample(rng))
            }
        }
    }

    /// P(X ≤ x).
    #[must_use]
    pub fn cdf(&self, x: f64) -> f64 {
        match self {
            Self::Constant { value } => f64::from(u8::from(x >= *value)),
            Self::Uniform { low, high } => ((x - low) / (high - low)).clamp(0.0, 1.0),
            Self::Exponential { mean } => {
                if x <= 0.0 {
                    0.0
                } else {
                    1.0 - (-x / mean).exp()
                }
            }
            Self::Weibull { shape, scale } => {
                if x <= 0.0 {
                    0.0
                } else {
                    1.0 - (-(x / scale).powf(*shape)).exp()
                }
            }
            Self::LogNormal { mu, sigma } => {
                if x <= 0.0 {
                    0.0
                } else {
                    normal_cdf((x.ln() - mu) / sigma)
                }
            }
            Self::Pareto { scale, shape } => {
                if x < *scale {
                    0.0
                } else {
                    1.0 - (scale / x).powf(*shape)
                }
            }
            Self::Mixture { parts } => {
                let total: f64 = parts.iter().map(|p| p.weight).sum();
                parts.iter().map(|p| p.weight / total * p.dist.cdf(x)).sum()
            }
        }
    }

    /// The mean, `E[X]` (infinite for a Pareto with shape ≤ 1).
    #[must_use]
    pub fn mean(&self) -> f64 {
        match self {
            Self::Constant { value } => *value,
            Self::Uniform { low, high } => (low + high) / 2.0,
            Self::Exponential { mean } => *mean,
            Self::Weibull { shape, scale } => scale * gamma(1.0 + 1.0 / shape),
            Self::LogNormal { mu, sigma } => (mu + sigma * sigma / 2.0).exp(),
            Self::Pareto { scale, shape } => {
                if *shape <= 1.0 {
                    f64::INFINITY
                } else {
                    shape * scale / (shape - 1.0)
                }
            }
            Self::Mixture { parts } => {
                let total: f64 = parts.iter().map(|p| p.weight).sum();
                parts.iter().map(|p| p.weight / total * p.dist.mean()).sum()
            }
        }
    }
}

/// The Kolmogorov–Smirnov statistic of `samples` against `dist`.
#[must_use]
pub fn ks_statistic(samples: &mut [f64], dist: &Dist) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len() as f64;
    samples
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = dist.cdf(x);
            (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    fn all() -> Vec<Dist> {
        vec![
            Dist::Uniform {
                low: 1.0,
                high: 5.0,
            },
            Dist::Exponential { mean: 30.0 },
            // Stutzbach & Rejaie's BitTorrent session fits have shapes 0.34–0.59.
            Dist::Weibull {
                shape: 0.34,
                scale: 600.0,
            },
            Dist::Weibull {
                shape: 0.59,
                scale: 1800.0,
            },
            Dist::LogNormal {
                mu: 3.0,
                sigma: 1.2,
            },
            Dist::Pareto {
                scale: 10.0,
                shape: 2.5,
            },
            Dist::Mixture {
                parts: vec![
                    Part {
                        weight: 0.2,
                        dist: Dist::Exponential { mean: 10_000.0 },
                    },
                    Part {
                        weight: 0.8,
                        dist: Dist::Weibull {
                            shape: 0.5,
                            scale: 300.0,
                        },
                    },
                ],
            },
        ]
    }

    #[test]
    fn samples_follow_their_cdf_kolmogorov_smirnov() {
        for d in all() {
            d.validate().unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let mut xs: Vec<f64> = (0..20_000).map(|_| d.sample(&mut rng)).collect();
            let ks = ks_statistic(&mut xs, &d);
            // The 1% critical value for n = 20 000 is 1.63/sqrt(n) ≈ 0.0115.
            assert!(ks < 0.0115, "{d:?}: D = {ks}");
        }
    }

    #[test]
    fn means_match_the_sample_means() {
        for d in all() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
            let n = 200_000;
            let m: f64 = (0..n).map(|_| d.sample(&mut rng)).sum::<f64>() / f64::from(n);
            let rel = (m - d.mean()).abs() / d.mean();
            // Heavy tails converge slowly; 5% is ample for these shapes.
            assert!(rel < 0.05, "{d:?}: sample mean {m}, mean {}", d.mean());
        }
    }

    #[test]
    fn nonsense_parameters_are_refused() {
        for d in [
            Dist::Exponential { mean: 0.0 },
            Dist::Weibull {
                shape: -1.0,
                scale: 1.0,
            },
            Dist::Uniform {
                low: 3.0,
                high: 2.0,
            },
            Dist::Mixture { parts: vec![] },
        ] {
            assert!(d.validate().is_err(), "{d:?}");
        }
    }
}
