//! Gradients by candle autograd, and what is done to them before they travel:
//! averaging, bf16 conversion, byte encoding for commitments, and top-k
//! sparsification with error feedback.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::data::Batch;
use crate::model::Model;
use crate::params::{Params, tensor_bytes};
use crate::{Error, Result};

/// The mean loss of `model` on `batch` and the gradient of that loss for
/// every parameter, in canonical order (f32, shaped like the parameters).
///
/// On one CPU determinism class the result is bit-identical for the same
/// parameters and batch.
///
/// # Errors
/// As [`Model::loss`].
pub fn gradients(model: &Model, batch: &Batch) -> Result<(f32, Vec<Tensor>)> {
    let loss = model.loss(batch)?;
    let store = loss.backward()?;
    let value = loss.to_scalar::<f32>()?;
    Ok((value, collect(model.params(), &store)?))
}

/// The gradients in `store` for `params`, in canonical order; zeros for a
/// parameter the loss did not reach.
pub(crate) fn collect(params: &Params, store: &GradStore) -> Result<Vec<Tensor>> {
    params
        .vars()
        .iter()
        .map(|var| match store.get(var.as_tensor()) {
            Some(g) => Ok(g.detach()),
            None => Ok(var.as_tensor().zeros_like()?),
        })
        .collect()
}

/// The element-wise mean of several gradient lists (one per worker), in
/// worker order.
///
/// # Errors
/// [`Error::CountMismatch`] for no lists or lists of different lengths;
/// [`Error::Tensor`] for shapes that differ.
pub fn average(lists: &[Vec<Tensor>]) -> Result<Vec<Tensor>> {
    let Some(first) = lists.first() else {
        return Err(Error::CountMismatch {
            what: "gradient lists to average",
            expected: 1,
            actual: 0,
        });
    };
    if let Some(other) = lists.iter().find(|l| l.len() != first.len()) {
        return Err(Error::CountMismatch {
            what: "gradients per worker",
            expected: first.len(),
            actual: other.len(),
        });
    }
    let scale = 1.0 / lists.len() as f64;
    (0..first.len())
        .map(|i| {
            let mut sum = first[i].to_dtype(DType::F32)?;
            for list in &lists[1..] {
                sum = (sum + list[i].to_dtype(DType::F32)?)?;
            }
            Ok((sum * scale)?)
        })
        .collect()
}

/// Gradients converted to `dtype` (bf16 halves what is sent; [`average`]
/// and the optimisers take either and compute in f32).
///
/// # Errors
/// When candle cannot convert a tensor.
pub fn to_dtype(tensors: &[Tensor], dtype: DType) -> Result<Vec<Tensor>> {
    tensors.iter().map(|t| Ok(t.to_dtype(dtype)?)).collect()
}

/// The payload bytes of `tensors` as sent: their elements' little-endian
/// bytes, concatenated in order.
///
/// # Errors
/// When candle cannot read a tensor.
pub fn encode(tensors: &[Tensor]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded_len(tensors));
    for t in tensors {
        out.extend(tensor_bytes(t)?);
    }
    Ok(out)
}

/// The length of [`encode`]'s output, without encoding.
#[must_use]
pub fn encoded_len(tensors: &[Tensor]) -> usize {
    tensors
        .iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
}

/// A tensor reduced to its largest entries: flat row-major indices in
/// increasing order and their values.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseTensor {
    shape: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f32>,
}

impl SparseTensor {
    /// The dense tensor's shape.
    #[must_use]
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Flat indices of the kept entries, increasing.
    #[must_use]
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// The kept entries' values.
    #[must_use]
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Bytes it takes to send: a `u32` index and an `f32` value per entry.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        self.indices.len() * 8
    }

    /// The dense tensor, zeros where nothing was kept.
    ///
    /// # Errors
    /// When candle cannot allocate it.
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        let mut dense = vec![0f32; self.shape.iter().product()];
        for (&i, &v) in self.indices.iter().zip(&self.values) {
            if let Some(slot) = dense.get_mut(i as usize) {
                *slot = v;
            }
        }
        Ok(Tensor::from_vec(dense, self.shape.clone(), device)?)
    }
}

/// Top-k sparsification with error feedback: what a step does not send is
/// kept in a residual per parameter and added to the next step's gradient,
/// so nothing is lost, only delayed. At every step, sent + new residual =
/// gradient + old residual, exactly.
#[derive(Debug, Clone)]
pub struct ErrorFeedback {
    shapes: Vec<Vec<usize>>,
    residuals: Vec<Vec<f32>>,
}

impl ErrorFeedback {
    /// Zero residuals for the parameters of `params`.
    #[must_use]
    pub fn new(params: &Params) -> Self {
        let shapes: Vec<Vec<usize>> = params.vars().iter().map(|v| v.dims().to_vec()).collect();
        let residuals = shapes
            .iter()
            .map(|s| vec![0.0; s.iter().product()])
            .collect();
        Self { shapes, residuals }
    }

    /// Adds each residual to its gradient, keeps the `ceil(fraction × n)`
    /// entries of largest magnitude of each tensor of `n` entries (ties to
    /// the lower index) to send, and keeps the rest as the new residual.
    ///
    /// # Errors
    /// [`Error::Config`] for a fraction outside `(0, 1]`;
    /// [`Error::CountMismatch`] or [`Error::ShapeMismatch`] for gradients
    /// that are not the parameters'.
    pub fn compress(&mut self, grads: &[Tensor], fraction: f64) -> Result<Vec<SparseTensor>> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(Error::Config {
                reason: format!("top-k fraction {fraction} is outside (0, 1]"),
            });
        }
        if grads.len() != self.shapes.len() {
            return Err(Error::CountMismatch {
                what: "gradients to compress",
                expected: self.shapes.len(),
                actual: grads.len(),
            });
        }
        for (i, (g, shape)) in grads.iter().zip(&self.shapes).enumerate() {
            if g.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name: format!("gradient {i}"),
                    expected: shape.clone(),
                    actual: g.dims().to_vec(),
                });
            }
        }
        let mut out = Vec::with_capacity(grads.len());
        for ((g, shape), residual) in grads.iter().zip(&self.shapes).zip(&mut self.residuals) {
            let g = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for (r, x) in residual.iter_mut().zip(&g) {
                *r += x;
            }
            let n = residual.len();
            let k = ((fraction * n as f64).ceil() as usize).clamp(usize::from(n > 0), n);
            let mut order: Vec<u32> = (0..n as u32).collect();
            let by_magnitude = |a: &u32, b: &u32| {
                let (x, y) = (residual[*a as usize].abs(), residual[*b as usize].abs());
                y.total_cmp(&x).then(a.cmp(b))
            };
            if k < n {
                order.select_nth_unstable_by(k, by_magnitude);
            }
            let mut indices = order[..k].to_vec();
            indices.sort_unstable();
            let values = indices
                .iter()
                .map(|&i| std::mem::take(&mut residual[i as usize]))
                .collect();
            out.push(SparseTensor {
                shape: shape.clone(),
                indices,
                values,
            });
        }
        Ok(out)
    }

    /// The residuals as tensors, in canonical order.
    ///
    /// # Errors
    /// When candle cannot allocate them.
    pub fn residuals(&self, device: &Device) -> Result<Vec<Tensor>> {
        self.residuals
            .iter()
            .zip(&self.shapes)
            .map(|(r, s)| Ok(Tensor::from_slice(r, s.clone(), device)?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::flatten;

    fn params() -> Params {
        Params::from_tensors([
            (
                "a".to_owned(),
                Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "b".to_owned(),
                Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            ),
        ])
        .unwrap()
    }

    #[test]
    fn top_k_keeps_the_largest_and_feeds_back_the_rest() {
        let d = Device::Cpu;
        let mut ef = ErrorFeedback::new(&params());
        let g1 = vec![
            Tensor::new(&[[0.1f32, -3., 0.2], [2., -0.05, 0.]], &d).unwrap(),
            Tensor::new(&[1f32, -1., 0.5, 0.25], &d).unwrap(),
        ];
        let sent = ef.compress(&g1, 0.34).unwrap();
        // ceil(0.34 × 6) = 3 of the first tensor, ceil(0.34 × 4) = 2 of the
        // second; indices come back in increasing order.
        assert_eq!(sent[0].indices(), &[1, 2, 3]);
        assert_eq!(sent[0].values(), &[-3., 0.2, 2.]);
        assert_eq!(sent[1].indices(), &[0, 1]);
        assert_eq!(sent[1].values(), &[1., -1.]);
        let r = flatten(&ef.residuals(&d).unwrap()).unwrap();
        assert_eq!(r, vec![0.1, 0., 0., 0., -0.05, 0., 0., 0., 0.5, 0.25]);
        // A small entry that keeps coming builds up until it is sent.
        let g2 = vec![
            Tensor::new(&[[0.1f32, 0., 0.], [0., 0., 0.]], &d).unwrap(),
            Tensor::new(&[0f32, 0., 0.5, 0.], &d).unwrap(),
        ];
        let sent = ef.compress(&g2, 0.01).unwrap();
        assert_eq!(sent[0].indices(), &[0]);
        assert_eq!(sent[0].values(), &[0.2]);
        assert_eq!(sent[1].indices(), &[2]);
        assert_eq!(sent[1].values(), &[1.0]);
        assert_eq!(sent[0].encoded_len(), 8);
        assert!(ef.compress(&g2, 0.0).is_err());
        assert!(ef.compress(&g2[..1], 0.5).is_err());
    }

    #[test]
    fn average_and_encoding() {
        let d = Device::Cpu;
        let a = vec![Tensor::new(&[1f32, 2.], &d).unwrap()];
        let b = vec![Tensor::new(&[3f32, 6.], &d).unwrap()];
        let avg = average(&[a.clone(), b]).unwrap();
        assert_eq!(flatten(&avg).unwrap(), vec![2., 4.]);
        assert!(average(&[]).is_err());
        assert_eq!(
            encode(&a).unwrap(),
            [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat()
        );
        let half = to_dtype(&a, DType::BF16).unwrap();
        assert_eq!(encoded_len(&half), 4);
        assert_eq!(encode(&half).unwrap().len(), 4);
        assert_eq!(
            SparseTensor {
                shape: vec![2, 2],
                indices: vec![1, 2],
                values: vec![5., 6.]
            }
            .to_dense(&d)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
            vec![0., 5., 6., 0.]
        );
    }
}
