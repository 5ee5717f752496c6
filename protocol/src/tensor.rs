//! Tensors on the wire: dtype, shape, little-endian bytes, and a blake3 digest
//! over all three. Conversion to and from candle tensors lives in the node.

use serde::{Deserialize, Serialize};

use crate::bounded::BoundedVec;
use crate::ids::Hash;

/// Most dimensions a wire tensor may have.
pub const MAX_RANK: usize = 8;

const TENSOR_DOMAIN: &str = "commons tensor v1";

/// Element types that cross the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Unsigned 32-bit integers (token ids).
    U32,
    /// Signed 64-bit integers.
    I64,
    /// Bytes.
    U8,
}

impl DType {
    /// Bytes per element.
    #[must_use]
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    const fn tag(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::U32 => 3,
            DType::I64 => 4,
            DType::U8 => 5,
        }
    }
}

/// A tensor that is not what it claims to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// More dimensions than [`MAX_RANK`].
    #[error("rank {rank} exceeds the maximum of {MAX_RANK}")]
    RankTooHigh {
        /// The rank given.
        rank: usize,
    },
    /// The shape's element count overflows.
    #[error("shape {shape:?} has too many elements")]
    ShapeOverflow {
        /// The shape.
        shape: Vec<u64>,
    },
    /// The data length does not match dtype and shape.
    #[error("{dtype:?} tensor of shape {shape:?} needs {expected} bytes, has {actual}")]
    LengthMismatch {
        /// Element type.
        dtype: DType,
        /// Shape.
        shape: Vec<u64>,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The digest does not match the contents.
    #[error("tensor digest mismatch: claims {claimed}, contents hash to {actual}")]
    DigestMismatch {
        /// Digest carried.
        claimed: Hash,
        /// Digest of the contents.
        actual: Hash,
    },
}

/// A dense tensor in row-major order with little-endian elements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tensor {
    dtype: DType,
    shape: BoundedVec<u64, MAX_RANK>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    digest: Hash,
}

impl Tensor {
    /// A tensor of `dtype` and `shape` over `data` (little-endian, row-major).
    pub fn new(dtype: DType, shape: &[u64], data: Vec<u8>) -> Result<Self, TensorError> {
        let shape_vec = BoundedVec::try_from_vec(shape.to_vec())
            .map_err(|_| TensorError::RankTooHigh { rank: shape.len() })?;
        check_len(dtype, shape, data.len())?;
        let digest = digest(dtype, shape, &data);
        Ok(Self {
            dtype,
            shape: shape_vec,
            data,
            digest,
        })
    }

    /// An f32 tensor.
    pub fn from_f32(shape: &[u64], values: &[f32]) -> Result<Self, TensorError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(DType::F32, shape, data)
    }

    /// A u32 tensor (token ids).
    pub fn from_u32(shape: &[u64], values: &[u32]) -> Result<Self, TensorError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(DType::U32, shape, data)
    }

    /// Element type.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dimensions.
    #[must_use]
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Little-endian, row-major contents.
    #[must_use]
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The digest carried with the tensor: blake3 over dtype, shape and data.
    #[must_use]
    pub fn digest(&self) -> Hash {
        self.digest
    }

    /// Number of elements.
    #[must_use]
    pub fn elem_count(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Checks that the data length fits dtype and shape and that the digest
    /// matches the contents. Call on every tensor that came off the wire.
    pub fn verify(&self) -> Result<(), TensorError> {
        check_len(self.dtype, &self.shape, self.data.len())?;
        let actual = digest(self.dtype, &self.shape, &self.data);
        if actual != self.digest {
            return Err(TensorError::DigestMismatch {
                claimed: self.digest,
                actual,
            });
        }
        Ok(())
    }

    /// The f32 values, if this is an f32 tensor.
    #[must_use]
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// The u32 values, if this is a u32 tensor.
    #[must_use]
    pub fn to_u32(&self) -> Option<Vec<u32>> {
        (self.dtype == DType::U32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// Gives back the raw data.
    #[must_use]
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

fn check_len(dtype: DType, shape: &[u64], actual: usize) -> Result<(), TensorError> {
    if shape.len() > MAX_RANK {
        return Err(TensorError::RankTooHigh { rank: shape.len() });
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| TensorError::ShapeOverflow {
            shape: shape.to_vec(),
        })?;
    if expected != actual as u64 {
        return Err(TensorError::LengthMismatch {
            dtype,
            shape: shape.to_vec(),
            expected,
            actual: actual as u64,
        });
    }
    Ok(())
}

fn digest(dtype: DType, shape: &[u64], data: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new_derive_key(TENSOR_DOMAIN);
    hasher.update(&[dtype.tag(), shape.len() as u8]);
    for d in shape {
        hasher.update(&d.to_le_bytes());
    }
    hasher.update(data);
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_covers_dtype_shape_and_data() {
        let a = Tensor::from_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let b = Tensor::from_f32(&[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let c = Tensor::new(DType::U32, &[2, 2], a.data().to_vec()).unwrap();
        assert_ne!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        a.verify().unwrap();
        assert_eq!(a.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn bad_tensors_are_refused() {
        assert!(matches!(
            Tensor::from_f32(&[3], &[1.0, 2.0]),
            Err(TensorError::LengthMismatch {
                expected: 12,
                actual: 8,
                ..
            })
        ));
        assert!(matches!(
            Tensor::new(DType::U8, &[1; 9], vec![0]),
            Err(TensorError::RankTooHigh { rank: 9 })
        ));
        assert!(matches!(
            Tensor::new(DType::F32, &[u64::MAX, 2], vec![]),
            Err(TensorError::ShapeOverflow { .. })
        ));
        let mut t = Tensor::from_u32(&[2], &[1, 2]).unwrap();
        t.data[0] ^= 1;
        assert!(matches!(
            t.verify(),
            Err(TensorError::DigestMismatch { .. })
        ));
    }
}
