//! Optimisers applied to gradients that come from elsewhere (averaged over
//! workers, merged over stages): AdamW, and DiLoCo's outer Nesterov step on
//! pseudo-gradients, with a worker that runs DiLoCo's inner loop.
//!
//! Both keep their state as f32 tensors in the parameters' canonical order
//! and compute in f32 with f64 scalars, whatever dtype the gradients arrive
//! in.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::Batch;
use crate::grad::gradients;
use crate::model::Model;
use crate::params::Params;
use crate::{Error, Result};

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay, applied to parameters of rank 2 or more
    /// (matrices, embeddings), not to norm weights.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, decay 0.01.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW (Loshchilov and Hutter) with bias correction. Step `t` (from 1), for
/// each parameter θ with gradient g:
///
/// ```text
/// θ ← θ · (1 − lr·λ)                      (decoupled decay, rank ≥ 2 only)
/// m ← β₁·m + (1 − β₁)·g
/// v ← β₂·v + (1 − β₂)·g²
/// θ ← θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
/// ```
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments for `params`.
    ///
    /// # Errors
    /// When candle cannot allocate them.
    pub fn new(params: &Params, config: AdamWConfig) -> Result<Self> {
        let zeros = || -> Result<Vec<Tensor>> {
            params
                .vars()
                .iter()
                .map(|v| Ok(Tensor::zeros(v.shape(), DType::F32, v.device())?))
                .collect()
        };
        Ok(Self {
            config,
            step: 0,
            m: zeros()?,
            v: zeros()?,
        })
    }

    /// AdamW resumed from a saved state: `steps` taken and the moments
    /// ([`AdamW::moments`]), for `params`.
    ///
    /// # Errors
    /// [`Error::CountMismatch`] or [`Error::ShapeMismatch`] when the moments
    /// are not shaped like the parameters.
    pub fn from_state(
        params: &Params,
        config: AdamWConfig,
        steps: u64,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
    ) -> Result<Self> {
        params.check_shapes("AdamW first moments", &m)?;
        params.check_shapes("AdamW second moments", &v)?;
        Ok(Self {
            config,
            step: steps,
            m: to_f32(m)?,
            v: to_f32(v)?,
        })
    }

    /// The hyper-parameters.
    #[must_use]
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Changes the learning rate (for a schedule).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Steps taken so far.
    #[must_use]
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The first and second moments, in canonical order.
    #[must_use]
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Applies one step with `grads` (canonical order, any float dtype).
    ///
    /// # Errors
    /// [`Error::CountMismatch`] or [`Error::ShapeMismatch`] for gradients that
    /// are not the parameters'; nothing is changed then.
    pub fn step(&mut self, params: &Params, grads: &[Tensor]) -> Result<()> {
        params.check_shapes("AdamW gradients", grads)?;
        if self.m.len() != grads.len() {
            return Err(Error::CountMismatch {
                what: "AdamW state",
                expected: self.m.len(),
                actual: grads.len(),
            });
        }
        self.step += 1;
        let c = self.config;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let correction1 = 1.0 - c.beta1.powi(t);
        let correction2 = 1.0 - c.beta2.powi(t);
        for (i, (var, g)) in params.vars().iter().zip(grads).enumerate() {
            let g = g.to_dtype(DType::F32)?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / correction1)?;
            let v_hat = (&v / correction2)?;
            let theta = var.as_tensor().detach();
            let theta = if var.rank() >= 2 {
                (theta * (1.0 - c.lr * c.weight_decay))?
            } else {
                theta
            };
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            var.set(&(theta - (update * c.lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// The hyper-parameters of DiLoCo's outer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OuterNesterovConfig {
    /// Outer learning rate.
    pub lr: f64,
    /// Nesterov momentum.
    pub momentum: f64,
}

impl Default for OuterNesterovConfig {
    /// DiLoCo's: lr 0.7, momentum 0.9.
    fn default() -> Self {
        Self {
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

/// DiLoCo's outer optimiser: SGD with Nesterov momentum on the averaged
/// pseudo-gradient Δ (see [`pseudo_gradient`]), as PyTorch's `SGD(nesterov=True)`:
///
/// ```text
/// b ← μ·b + Δ           (b starts at zero)
/// θ ← θ − lr · (Δ + μ·b)
/// ```
#[derive(Debug, Clone)]
pub struct OuterNesterov {
    config: OuterNesterovConfig,
    momentum: Vec<Tensor>,
}

impl OuterNesterov {
    /// A zero momentum buffer for `params`.
    ///
    /// # Errors
    /// When candle cannot allocate it.
    pub fn new(params: &Params, config: OuterNesterovConfig) -> Result<Self> {
        let momentum = params
            .vars()
            .iter()
            .map(|v| Ok(Tensor::zeros(v.shape(), DType::F32, v.device())?))
            .collect::<Result<_>>()?;
        Ok(Self { config, momentum })
    }

    /// The outer optimiser resumed from a saved momentum buffer
    /// ([`OuterNesterov::momentum`]), for `params`.
    ///
    /// # Errors
    /// [`Error::CountMismatch`] or [`Error::ShapeMismatch`] when the buffer
    /// is not shaped like the parameters.
    pub fn from_state(
        params: &Params,
        config: OuterNesterovConfig,
        momentum: Vec<Tensor>,
    ) -> Result<Self> {
        params.check_shapes("outer momentum", &momentum)?;
        Ok(Self {
            config,
            momentum: to_f32(momentum)?,
        })
    }

    /// The hyper-parameters.
    #[must_use]
    pub fn config(&self) -> &OuterNesterovConfig {
        &self.config
    }

    /// The momentum buffer, in canonical order.
    #[must_use]
    pub fn momentum(&self) -> &[Tensor] {
        &self.momentum
    }

    /// Applies one outer step to `params` with the averaged pseudo-gradient.
    ///
    /// # Errors
    /// [`Error::CountMismatch`] or [`Error::ShapeMismatch`]; nothing is
    /// changed then.
    pub fn step(&mut self, params: &Params, pseudo_grads: &[Tensor]) -> Result<()> {
        params.check_shapes("pseudo-gradients", pseudo_grads)?;
        let OuterNesterovConfig { lr, momentum: mu } = self.config;
        for (i, (var, delta)) in params.vars().iter().zip(pseudo_grads).enumerate() {
            let delta = delta.to_dtype(DType::F32)?;
            let buf = ((&self.momentum[i] * mu)? + &delta)?;
            let update = (delta + (&buf * mu)?)?;
            var.set(&(var.as_tensor().detach() - (update * lr)?)?)?;
            self.momentum[i] = buf;
        }
        Ok(())
    }
}

fn to_f32(tensors: Vec<Tensor>) -> Result<Vec<Tensor>> {
    tensors
        .into_iter()
        .map(|t| Ok(t.to_dtype(DType::F32)?.detach()))
        .collect()
}

/// DiLoCo's pseudo-gradient: `before − after`, the parameters at the start of
/// a round minus those after the inner steps.
///
/// # Errors
/// [`Error::CountMismatch`] for lists of different lengths; [`Error::Tensor`]
/// for shapes that differ.
pub fn pseudo_gradient(before: &[Tensor], after: &[Tensor]) -> Result<Vec<Tensor>> {
    if before.len() != after.len() {
        return Err(Error::CountMismatch {
            what: "parameters after the inner steps",
            expected: before.len(),
            actual: after.len(),
        });
    }
    before
        .iter()
        .zip(after)
        .map(|(b, a)| Ok((b - a)?))
        .collect()
}

/// A DiLoCo worker: a model copy and its inner AdamW, whose state persists
/// from round to round.
#[derive(Debug, Clone)]
pub struct DilocoWorker {
    model: Model,
    inner: AdamW,
}

impl DilocoWorker {
    /// A worker training its own copy of `model`'s parameters.
    ///
    /// # Errors
    /// When the copy cannot be made.
    pub fn new(model: &Model, inner: AdamWConfig) -> Result<Self> {
        let model = Model::from_params(model.config().clone(), model.params().deep_clone()?)?;
        let inner = AdamW::new(model.params(), inner)?;
        Ok(Self { model, inner })
    }

    /// The worker's model.
    #[must_use]
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// One round: starts from the `global` parameters (canonical order),
    /// takes one AdamW step on each of `batches`, and returns the
    /// pseudo-gradient and the mean training loss of the steps.
    ///
    /// # Errors
    /// [`Error::Batch`] for no batches; as [`Params::set`] and [`gradients`].
    pub fn round(&mut self, global: &[Tensor], batches: &[Batch]) -> Result<(Vec<Tensor>, f32)> {
        if batches.is_empty() {
            return Err(Error::Batch {
                reason: "a round needs at least one inner step".to_owned(),
            });
        }
        self.model.params().set(global)?;
        let mut loss = 0.0;
        for batch in batches {
            let (l, grads) = gradients(&self.model, batch)?;
            self.inner.step(self.model.params(), &grads)?;
            loss += l;
        }
        let after = self.model.params().tensors();
        Ok((
            pseudo_gradient(global, &after)?,
            loss / batches.len() as f32,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar_params(value: f32) -> Params {
        // One 1×1 matrix (decayed) and one vector (not decayed).
        Params::from_tensors([
            (
                "m".to_owned(),
                Tensor::new(&[[value]], &Device::Cpu).unwrap(),
            ),
            ("v".to_owned(), Tensor::new(&[value], &Device::Cpu).unwrap()),
        ])
        .unwrap()
    }

    fn values(p: &Params) -> Vec<f32> {
        p.flatten().unwrap()
    }

    fn grads(g: f32) -> Vec<Tensor> {
        vec![
            Tensor::new(&[[g]], &Device::Cpu).unwrap(),
            Tensor::new(&[g], &Device::Cpu).unwrap(),
        ]
    }

    #[test]
    fn adamw_matches_a_hand_computation() {
        // lr 0.1, betas (0.9, 0.999), eps 1e-8, decay 0.01, θ₀ = 1.
        // Step 1, g = 0.5: m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25,
        //   update = 0.5 / (0.5 + 1e-8) ≈ 1 − 2e-8.
        //   matrix: θ = 1·(1 − 0.001) − 0.1·update = 0.899000002
        //   vector: θ = 1 − 0.1·update             = 0.900000002
        // Step 2, g = −0.25: m = 0.045 − 0.025 = 0.02, m̂ = 0.02 / 0.19 = 0.1052631579,
        //   v = 0.00024975 + 0.0000625 = 0.00031225, v̂ = 0.00031225 / 0.001999 = 0.1562031016,
        //   √v̂ = 0.3952253807, update = 0.2663371179.
        //   matrix: θ = 0.899000002·0.999 − 0.02663371179 = 0.8714672988
        //   vector: θ = 0.900000002 − 0.02663371179      = 0.8733662902
        let p = scalar_params(1.0);
        let config = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut opt = AdamW::new(&p, config).unwrap();
        opt.step(&p, &grads(0.5)).unwrap();
        let v = values(&p);
        assert!((f64::from(v[0]) - 0.899_000_002).abs() < 1e-6, "{v:?}");
        assert!((f64::from(v[1]) - 0.900_000_002).abs() < 1e-6, "{v:?}");
        opt.step(&p, &grads(-0.25)).unwrap();
        let v = values(&p);
        assert!((f64::from(v[0]) - 0.871_467_298_8).abs() < 1e-6, "{v:?}");
        assert!((f64::from(v[1]) - 0.873_366_290_2).abs() < 1e-6, "{v:?}");
        assert_eq!(opt.steps(), 2);
        let (m, _) = opt.moments();
        assert!((m[0].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] - 0.02).abs() < 1e-8);
        // bf16 gradients are taken as their f32 values.
        let q = scalar_params(1.0);
        let mut opt = AdamW::new(&q, config).unwrap();
        let g = grads(0.5)
            .iter()
            .map(|t| t.to_dtype(DType::BF16).unwrap())
            .collect::<Vec<_>>();
        opt.step(&q, &g).unwrap();
        assert!((f64::from(values(&q)[0]) - 0.899_000_002).abs() < 1e-6);
        assert!(opt.step(&q, &g[..1]).is_err());
    }

    #[test]
    fn outer_nesterov_matches_a_hand_computation() {
        // lr 0.7, μ 0.9, θ₀ = 1.
        // Round 1, Δ = 0.2:  b = 0.2,  update = 0.2 + 0.18 = 0.38,    θ = 1 − 0.266 = 0.734
        // Round 2, Δ = −0.1: b = 0.08, update = −0.1 + 0.072 = −0.028, θ = 0.734 + 0.0196 = 0.7536
        let p = scalar_params(1.0);
        let mut opt = OuterNesterov::new(&p, OuterNesterovConfig::default()).unwrap();
        opt.step(&p, &grads(0.2)).unwrap();
        for x in values(&p) {
            assert!((x - 0.734).abs() < 1e-6, "{x}");
        }
        opt.step(&p, &grads(-0.1)).unwrap();
        for x in values(&p) {
            assert!((x - 0.7536).abs() < 1e-6, "{x}");
        }
        let b = opt.momentum()[1].to_vec1::<f32>().unwrap()[0];
        assert!((b - 0.08).abs() < 1e-7);
    }

    #[test]
    fn optimisers_resume_from_their_saved_state() {
        let config = AdamWConfig::default();
        let (a, b) = (scalar_params(1.0), scalar_params(1.0));
        let mut opt = AdamW::new(&a, config).unwrap();
        opt.step(&a, &grads(0.5)).unwrap();
        let (m, v) = (opt.moments().0.to_vec(), opt.moments().1.to_vec());
        let mut resumed = AdamW::from_state(&a, config, opt.steps(), m.clone(), v.clone()).unwrap();
        // The same next step from the resumed state as from the original.
        b.set(&a.snapshot().unwrap()).unwrap();
        opt.step(&a, &grads(-0.25)).unwrap();
        resumed.step(&b, &grads(-0.25)).unwrap();
        assert_eq!(values(&a), values(&b));
        assert!(AdamW::from_state(&a, config, 1, m[..1].to_vec(), v).is_err());

        let mut outer = OuterNesterov::new(&a, OuterNesterovConfig::default()).unwrap();
        outer.step(&a, &grads(0.2)).unwrap();
        let mut back =
            OuterNesterov::from_state(&a, *outer.config(), outer.momentum().to_vec()).unwrap();
        b.set(&a.snapshot().unwrap()).unwrap();
        outer.step(&a, &grads(-0.1)).unwrap();
        back.step(&b, &grads(-0.1)).unwrap();
        assert_eq!(values(&a), values(&b));
    }

    #[test]
    fn pseudo_gradient_is_before_minus_after() {
        let before = grads(1.0);
        let after = grads(0.25);
        let delta = pseudo_gradient(&before, &after).unwrap();
        assert_eq!(delta[1].to_vec1::<f32>().unwrap(), vec![0.75]);
        assert!(pseudo_gradient(&before, &after[..1]).is_err());
    }
}
