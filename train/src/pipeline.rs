//! Pipeline-parallel training, GPipe style: a model cut into stages by layer
//! ranges, activations sent forward stage to stage, gradients with respect to
//! those activations sent backward, and every micro-batch's parameter
//! gradients accumulated in each stage.
//!
//! A stage keeps one [`StageTrace`] per micro-batch between its forward and
//! backward pass (the graph candle's autograd walks). A non-first stage takes
//! its input as a fresh variable, so its backward pass yields the gradient to
//! send upstream. The last stage starts the backward pass from the loss
//! ([`Upstream::Targets`]); the others from the gradient they received, by
//! differentiating `sum(output ⊙ grad_out)`, whose gradient with respect to
//! `output` is exactly `grad_out` ([`Upstream::Grad`]).

use candle_core::{Tensor, Var};

use crate::data::Batch;
use crate::grad::collect;
use crate::model::{Stage, cross_entropy};
use crate::{Error, Result};

/// What a stage's forward pass keeps for its backward pass.
#[derive(Debug, Clone)]
pub struct StageTrace {
    input: Option<Var>,
    output: Tensor,
}

impl StageTrace {
    /// The output to send to the next stage (detached from this stage's
    /// graph): hidden states, or logits from the last stage.
    #[must_use]
    pub fn output(&self) -> Tensor {
        self.output.detach()
    }
}

/// Where a stage's backward pass starts.
#[derive(Debug, Clone, Copy)]
pub enum Upstream<'a> {
    /// The last stage: the loss against these `(batch, seq)` `u32` targets,
    /// scaled by `scale` (the micro-batch's share of the tokens, so that the
    /// accumulated gradients are those of the mean over the whole batch).
    Targets {
        /// The target tokens.
        targets: &'a Tensor,
        /// The factor applied to the micro-batch's mean loss.
        scale: f64,
    },
    /// Any other stage: the gradient of the objective with respect to this
    /// stage's output, as received from the next stage.
    Grad(&'a Tensor),
}

/// What a stage's backward pass yields.
#[derive(Debug, Clone)]
pub struct StageGradients {
    /// The micro-batch's mean loss, unscaled (last stage only).
    pub loss: Option<f32>,
    /// Gradients of the stage's parameters, in its canonical order.
    pub params: Vec<Tensor>,
    /// The gradient with respect to the stage's input, to send to the
    /// previous stage (none for the first stage).
    pub input: Option<Tensor>,
}

impl Stage {
    /// Runs the stage on `input` (tokens for the first stage, the previous
    /// stage's [`StageTrace::output`] for the others), keeping the graph.
    ///
    /// # Errors
    /// As [`Stage::forward`].
    pub fn forward_train(&self, input: &Tensor) -> Result<StageTrace> {
        if self.is_first() {
            return Ok(StageTrace {
                input: None,
                output: self.forward(input)?,
            });
        }
        let input = Var::from_tensor(&input.detach())?;
        let output = self.forward(input.as_tensor())?;
        Ok(StageTrace {
            input: Some(input),
            output,
        })
    }

    /// The backward pass of one micro-batch.
    ///
    /// # Errors
    /// [`Error::Batch`] when `upstream` is targets on a stage that is not the
    /// last, a gradient on the last stage, or a gradient shaped unlike the
    /// output; [`Error::Tensor`].
    pub fn backward(&self, trace: &StageTrace, upstream: Upstream<'_>) -> Result<StageGradients> {
        let (objective, loss) = match upstream {
            Upstream::Targets { targets, scale } if self.is_last() => {
                let loss = cross_entropy(&trace.output, targets)?;
                let value = loss.to_scalar::<f32>()?;
                ((loss * scale)?, Some(value))
            }
            Upstream::Grad(grad) if !self.is_last() => {
                if grad.dims() != trace.output.dims() {
                    return Err(Error::Batch {
                        reason: format!(
                            "gradient of shape {:?} for an output of shape {:?}",
                            grad.dims(),
                            trace.output.dims()
                        ),
                    });
                }
                ((&trace.output * grad.detach())?.sum_all()?, None)
            }
            _ => {
                return Err(Error::Batch {
                    reason: format!(
                        "the last stage starts from targets, the others from a gradient (stage {:?})",
                        self.layers()
                    ),
                });
            }
        };
        let store = objective.backward()?;
        let params = collect(self.params(), &store)?;
        let input = match &trace.input {
            Some(var) => Some(match store.get(var.as_tensor()) {
                Some(g) => g.detach(),
                None => var.as_tensor().zeros_like()?,
            }),
            None => None,
        };
        Ok(StageGradients {
            loss,
            params,
            input,
        })
    }
}

/// One GPipe step over `stages` (in order, tiling the model's layers) on
/// `batch` cut into `micro_batches` equal parts: every micro-batch forward
/// through every stage, then every micro-batch backward (last first) through
/// the stages in reverse, each stage accumulating its parameter gradients.
///
/// Returns the mean loss over the batch and each stage's accumulated
/// gradients (its canonical order): those of the mean loss over the whole
/// batch, as [`crate::gradients`] gives for the unsplit model, up to
/// floating-point rounding.
///
/// # Errors
/// [`Error::Config`] for stages that do not chain; as [`Batch::split`],
/// [`Stage::forward_train`] and [`Stage::backward`].
pub fn pipeline_gradients(
    stages: &[Stage],
    batch: &Batch,
    micro_batches: usize,
) -> Result<(f32, Vec<Vec<Tensor>>)> {
    check_chain(stages)?;
    let device = stages[0].device();
    let parts = batch.split(micro_batches).map_err(|e| Error::Batch {
        reason: e.to_string(),
    })?;
    let scale = 1.0 / micro_batches as f64;

    // Forward: micro-batch by micro-batch, stage by stage.
    let mut traces: Vec<Vec<StageTrace>> = Vec::with_capacity(parts.len());
    let mut targets = Vec::with_capacity(parts.len());
    for part in &parts {
        let (inputs, t) = part.to_tensors(device)?;
        targets.push(t);
        let mut x = inputs;
        let mut per_stage = Vec::with_capacity(stages.len());
        for stage in stages {
            let trace = stage.forward_train(&x)?;
            x = trace.output();
            per_stage.push(trace);
        }
        traces.push(per_stage);
    }

    // Backward: last micro-batch first, last stage first.
    let mut acc: Vec<Option<Vec<Tensor>>> = vec![None; stages.len()];
    let mut loss = 0.0f64;
    for (m, per_stage) in traces.iter().enumerate().rev() {
        let mut grad_out: Option<Tensor> = None;
        for (s, stage) in stages.iter().enumerate().rev() {
            let upstream = match &grad_out {
                None => Upstream::Targets {
                    targets: &targets[m],
                    scale,
                },
                Some(g) => Upstream::Grad(g),
            };
            let out = stage.backward(&per_stage[s], upstream)?;
            if let Some(l) = out.loss {
                loss += f64::from(l) * scale;
            }
            acc[s] = Some(match acc[s].take() {
                None => out.params,
                Some(sum) => sum
                    .iter()
                    .zip(&out.params)
                    .map(|(a, g)| Ok((a + g)?))
                    .collect::<Result<_>>()?,
            });
            grad_out = out.input;
        }
    }
    let grads = acc.into_iter().map(Option::unwrap_or_default).collect();
    Ok((loss as f32, grads))
}

/// `n_layers` cut into `stages` contiguous ranges whose lengths differ by
/// at most one (the earlier stages take the extra layers: the last stage
/// also holds the head).
///
/// # Errors
/// [`Error::Config`] for no stage or more stages than layers.
pub fn even_ranges(n_layers: usize, stages: usize) -> Result<Vec<std::ops::Range<usize>>> {
    if stages == 0 || stages > n_layers {
        return Err(Error::Config {
            reason: format!("{stages} stages for {n_layers} layers (1 to {n_layers})"),
        });
    }
    let (base, extra) = (n_layers / stages, n_layers % stages);
    let mut start = 0;
    Ok((0..stages)
        .map(|s| {
            let len = base + usize::from(s < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect())
}

fn check_chain(stages: &[Stage]) -> Result<()> {
    let fail = |reason: String| Err(Error::Config { reason });
    let (Some(first), Some(last)) = (stages.first(), stages.last()) else {
        return fail("a pipeline needs at least one stage".to_owned());
    };
    if !first.is_first() || !last.is_last() {
        return fail("the stages must start at layer 0 and end at the last layer".to_owned());
    }
    for pair in stages.windows(2) {
        if pair[0].layers().end != pair[1].layers().start || pair[0].config() != pair[1].config() {
            return fail(format!(
                "stages {:?} and {:?} do not chain",
                pair[0].layers(),
                pair[1].layers()
            ));
        }
    }
    Ok(())
}
