//! Parameters in canonical order, their hashes, and content-addressed
//! checkpoints.
//!
//! The canonical order of a parameter set is the byte order of the
//! parameters' names. Gradients, optimiser states and pseudo-gradients are
//! lists in that order, so two parties that agree on the names agree on what
//! every position means.
//!
//! Hashes (all blake3 with a derived key, so no digest of one kind can pass for
//! another):
//! - a tensor list ([`tensors_digest`], domain `commons train tensors v1`):
//!   the count, then for each tensor its dtype, rank, dimensions and
//!   little-endian bytes: the commitment to a gradient;
//! - a parameter ([`Params::param_hashes`], domain `commons train param v1`):
//!   its name, then the tensor as above;
//! - the params root ([`Params::root`], domain `commons train params v1`): the
//!   count and the parameter hashes in canonical order. Changing one parameter
//!   changes its own hash and the root, so a node can tell which parameters it
//!   must fetch.
//!
//! A [`Checkpoint`] is the safetensors file of a parameter set (tensors sorted
//! by name, one metadata entry), named by the plain blake3 of its bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Hash, Result};

const TENSORS_DOMAIN: &str = "commons train tensors v1";
const PARAM_DOMAIN: &str = "commons train param v1";
const ROOT_DOMAIN: &str = "commons train params v1";

/// The safetensors metadata key under which a checkpoint keeps its
/// description (a JSON document chosen by the writer).
pub const METADATA_KEY: &str = "commons.train";

/// A named set of parameters held in a candle-nn [`VarMap`], listed in
/// canonical (sorted-name) order.
///
/// Cloning shares the variables (an update through one clone is seen by all);
/// [`Params::deep_clone`] makes an independent copy.
#[derive(Clone)]
pub struct Params {
    varmap: VarMap,
    names: Vec<String>,
    vars: Vec<Var>,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Params")
            .field("names", &self.names)
            .field("elements", &self.num_elements())
            .finish_non_exhaustive()
    }
}

impl Params {
    /// Parameters holding copies of these tensors, under these names.
    ///
    /// # Errors
    /// [`Error::Config`] for a repeated name; [`Error::Tensor`] when a copy
    /// cannot be made.
    pub fn from_tensors<I>(named: I) -> Result<Self>
    where
        I: IntoIterator<Item = (String, Tensor)>,
    {
        let mut sorted = BTreeMap::new();
        for (name, tensor) in named {
            // `detach` drops any graph, and a detached tensor always becomes a
            // fresh variable with its own storage.
            let var = Var::from_tensor(&tensor.detach())?;
            if sorted.insert(name.clone(), var).is_some() {
                return Err(Error::Config {
                    reason: format!("parameter {name} given twice"),
                });
            }
        }
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (name, var) in &sorted {
                data.insert(name.clone(), var.clone());
            }
        }
        let (names, vars) = sorted.into_iter().unzip();
        Ok(Self {
            varmap,
            names,
            vars,
        })
    }

    /// The parameters of an existing `VarMap`, sharing its variables.
    #[must_use]
    pub fn from_varmap(varmap: VarMap) -> Self {
        let sorted: BTreeMap<String, Var> = varmap
            .data()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        let (names, vars) = sorted.into_iter().unzip();
        Self {
            varmap,
            names,
            vars,
        }
    }

    /// The `VarMap` holding the variables.
    #[must_use]
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The names, in canonical order.
    #[must_use]
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The variables, in canonical order.
    #[must_use]
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// How many parameter tensors there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// How many scalars there are in all.
    #[must_use]
    pub fn num_elements(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// The variable named `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.names
            .binary_search_by(|n| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.vars[i])
    }

    /// The variable named `name`, or [`Error::MissingParam`].
    ///
    /// # Errors
    /// [`Error::MissingParam`] when there is no such parameter.
    pub fn require(&self, name: &str) -> Result<&Var> {
        self.get(name).ok_or_else(|| Error::MissingParam {
            name: name.to_owned(),
        })
    }

    /// The current values, in canonical order, as tensors that share the
    /// variables' storage: they change when the parameters are updated. Use
    /// [`Params::snapshot`] to keep values.
    #[must_use]
    pub fn tensors(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().clone()).collect()
    }

    /// Copies of the current values, in canonical order, that later updates
    /// do not change.
    ///
    /// # Errors
    /// When candle cannot copy a tensor.
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        self.vars
            .iter()
            .map(|v| Ok(v.as_tensor().detach().copy()?))
            .collect()
    }

    /// An independent copy: same names and values, separate storage.
    ///
    /// # Errors
    /// When candle cannot copy a tensor.
    pub fn deep_clone(&self) -> Result<Self> {
        Self::from_tensors(self.names.iter().cloned().zip(self.tensors()))
    }

    /// Sets every parameter to the value at its position in `values`
    /// (canonical order), converting to the parameter's dtype.
    ///
    /// # Errors
    /// [`Error::CountMismatch`] or [`Error::ShapeMismatch`] when `values`
    /// does not match; nothing is changed then.
    pub fn set(&self, values: &[Tensor]) -> Result<()> {
        self.check_shapes("parameter values", values)?;
        for (var, value) in self.vars.iter().zip(values) {
            var.set(&value.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Checks that `tensors` has one tensor per parameter with its shape.
    ///
    /// # Errors
    /// [`Error::CountMismatch`] or [`Error::ShapeMismatch`].
    pub fn check_shapes(&self, what: &'static str, tensors: &[Tensor]) -> Result<()> {
        if tensors.len() != self.vars.len() {
            return Err(Error::CountMismatch {
                what,
                expected: self.vars.len(),
                actual: tensors.len(),
            });
        }
        for ((name, var), t) in self.names.iter().zip(&self.vars).zip(tensors) {
            if var.dims() != t.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// All values as one `f32` vector, in canonical order.
    ///
    /// # Errors
    /// When candle cannot read a tensor.
    pub fn flatten(&self) -> Result<Vec<f32>> {
        flatten(&self.tensors())
    }

    /// `values` (every element of every parameter, in canonical order, as
    /// [`Params::flatten`] gives them) cut into tensors shaped like the
    /// parameters, on their device.
    ///
    /// # Errors
    /// [`Error::CountMismatch`] when the number of values is not
    /// [`Params::num_elements`]; [`Error::Tensor`].
    pub fn unflatten(&self, values: &[f32]) -> Result<Vec<Tensor>> {
        if values.len() != self.num_elements() {
            return Err(Error::CountMismatch {
                what: "values of the parameters",
                expected: self.num_elements(),
                actual: values.len(),
            });
        }
        let mut offset = 0;
        self.vars
            .iter()
            .map(|var| {
                let n = var.elem_count();
                let t = Tensor::from_slice(&values[offset..offset + n], var.shape(), var.device())?;
                offset += n;
                Ok(t)
            })
            .collect()
    }

    /// The hash of every parameter, in canonical order (see the module docs).
    ///
    /// # Errors
    /// When candle cannot read a tensor.
    pub fn param_hashes(&self) -> Result<Vec<Hash>> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(name, var)| {
                let mut hasher = blake3::Hasher::new_derive_key(PARAM_DOMAIN);
                hasher.update(&(name.len() as u64).to_le_bytes());
                hasher.update(name.as_bytes());
                hash_tensor(&mut hasher, var.as_tensor())?;
                Ok(hasher.finalize())
            })
            .collect()
    }

    /// The params root (see the module docs).
    ///
    /// # Errors
    /// When candle cannot read a tensor.
    pub fn root(&self) -> Result<Hash> {
        let mut hasher = blake3::Hasher::new_derive_key(ROOT_DOMAIN);
        hasher.update(&(self.vars.len() as u64).to_le_bytes());
        for hash in self.param_hashes()? {
            hasher.update(hash.as_bytes());
        }
        Ok(hasher.finalize())
    }
}

/// The little-endian bytes of a tensor's elements in row-major order.
///
/// # Errors
/// When candle cannot read the tensor.
pub fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let flat = tensor.flatten_all()?;
    Ok(match tensor.dtype() {
        DType::F32 => le_bytes(flat.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::BF16 => le_bytes(flat.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        DType::F16 => le_bytes(flat.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        DType::F64 => le_bytes(flat.to_vec1::<f64>()?, f64::to_le_bytes),
        DType::U32 => le_bytes(flat.to_vec1::<u32>()?, u32::to_le_bytes),
        DType::I64 => le_bytes(flat.to_vec1::<i64>()?, i64::to_le_bytes),
        DType::U8 => flat.to_vec1::<u8>()?,
        // Formats without a host type here are encoded by their f32 values;
        // the digest still tells them apart by their dtype tag.
        _ => le_bytes(
            flat.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            f32::to_le_bytes,
        ),
    })
}

fn le_bytes<T: Copy, const N: usize>(values: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(f).collect()
}

fn dtype_tag(dtype: DType) -> &'static str {
    dtype.as_str()
}

fn hash_tensor(hasher: &mut blake3::Hasher, tensor: &Tensor) -> Result<()> {
    let tag = dtype_tag(tensor.dtype());
    hasher.update(&(tag.len() as u64).to_le_bytes());
    hasher.update(tag.as_bytes());
    hasher.update(&(tensor.rank() as u64).to_le_bytes());
    for &d in tensor.dims() {
        hasher.update(&(d as u64).to_le_bytes());
    }
    let bytes = tensor_bytes(tensor)?;
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(&bytes);
    Ok(())
}

/// The commitment to a list of tensors (a gradient, a pseudo-gradient): see
/// the module docs. Equal digests mean bit-identical tensors.
///
/// # Errors
/// When candle cannot read a tensor.
pub fn tensors_digest(tensors: &[Tensor]) -> Result<Hash> {
    let mut hasher = blake3::Hasher::new_derive_key(TENSORS_DOMAIN);
    hasher.update(&(tensors.len() as u64).to_le_bytes());
    for t in tensors {
        hash_tensor(&mut hasher, t)?;
    }
    Ok(hasher.finalize())
}

/// All elements of `tensors` as one `f32` vector, in order.
///
/// # Errors
/// When candle cannot read or convert a tensor.
pub fn flatten(tensors: &[Tensor]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(tensors.iter().map(Tensor::elem_count).sum());
    for t in tensors {
        out.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// A checkpoint that cannot be written, read or applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The file cannot be written or read.
    #[error("checkpoint file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a safetensors file.
    #[error("not a safetensors file")]
    Format(#[source] safetensors::SafeTensorError),
    /// The bytes do not hash to the id they were fetched by.
    #[error("checkpoint bytes hash to {actual}, not {expected}")]
    IdMismatch {
        /// The id asked for.
        expected: Hash,
        /// The bytes' hash.
        actual: Hash,
    },
    /// The tensors do not match the parameters they are loaded into.
    #[error("checkpoint does not match the parameters")]
    Params(#[source] Error),
    /// The metadata is missing or does not parse.
    #[error("checkpoint metadata")]
    Metadata(#[source] serde_json::Error),
}

impl From<candle_core::Error> for CheckpointError {
    fn from(e: candle_core::Error) -> Self {
        Self::Params(Error::Tensor(e))
    }
}

/// A safetensors file of a parameter set, identified by the blake3 hash of its
/// bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    bytes: Vec<u8>,
    id: Hash,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("id", &self.id.to_hex())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl Checkpoint {
    /// The checkpoint of `params`, with `metadata` (a JSON document, say) kept
    /// under [`METADATA_KEY`]. The same parameters and metadata always give
    /// the same bytes.
    ///
    /// # Errors
    /// [`CheckpointError::Format`] when safetensors cannot serialise them.
    pub fn from_params(
        params: &Params,
        metadata: Option<&str>,
    ) -> std::result::Result<Self, CheckpointError> {
        let info = metadata.map(|m| [(METADATA_KEY.to_owned(), m.to_owned())].into());
        let tensors = params
            .names
            .iter()
            .zip(params.vars.iter().map(Var::as_tensor));
        let bytes = safetensors::serialize(tensors, info).map_err(CheckpointError::Format)?;
        Ok(Self::from_bytes(bytes))
    }

    /// A checkpoint of these bytes (checked when they are read).
    #[must_use]
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let id = blake3::hash(&bytes);
        Self { bytes, id }
    }

    /// The id: blake3 of the bytes.
    #[must_use]
    pub fn id(&self) -> Hash {
        self.id
    }

    /// The safetensors bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The file name it is stored under: `<id in hex>.safetensors`.
    #[must_use]
    pub fn file_name(&self) -> String {
        file_name(&self.id)
    }

    /// Writes it to `dir` under [`Checkpoint::file_name`] (through a
    /// temporary file and a rename, so a reader never sees half a file) and
    /// returns the path.
    ///
    /// # Errors
    /// [`CheckpointError::Io`].
    pub fn save_in(&self, dir: &Path) -> std::result::Result<PathBuf, CheckpointError> {
        let path = dir.join(self.file_name());
        let part = dir.join(format!("{}.part", self.file_name()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { path, source }
        };
        std::fs::write(&part, &self.bytes).map_err(io(&part))?;
        std::fs::rename(&part, &path).map_err(io(&path))?;
        Ok(path)
    }

    /// Reads the checkpoint `id` from `dir` and checks its hash.
    ///
    /// # Errors
    /// [`CheckpointError::Io`] or [`CheckpointError::IdMismatch`].
    pub fn open(dir: &Path, id: &Hash) -> std::result::Result<Self, CheckpointError> {
        let path = dir.join(file_name(id));
        let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Io { path, source })?;
        let checkpoint = Self::from_bytes(bytes);
        if checkpoint.id != *id {
            return Err(CheckpointError::IdMismatch {
                expected: *id,
                actual: checkpoint.id,
            });
        }
        Ok(checkpoint)
    }

    /// The metadata under [`METADATA_KEY`], if any.
    ///
    /// # Errors
    /// [`CheckpointError::Format`] when the bytes are not safetensors.
    pub fn metadata(&self) -> std::result::Result<Option<String>, CheckpointError> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(&self.bytes)
            .map_err(CheckpointError::Format)?;
        Ok(meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY).cloned()))
    }

    /// New parameters holding the checkpoint's tensors, on `device`.
    ///
    /// # Errors
    /// [`CheckpointError::Format`] for bytes that are not safetensors.
    pub fn to_params(&self, device: &Device) -> std::result::Result<Params, CheckpointError> {
        let tensors = candle_core::safetensors::load_buffer(&self.bytes, device)?;
        Params::from_tensors(tensors).map_err(CheckpointError::Params)
    }

    /// Sets `params` to the checkpoint's values. The checkpoint must hold
    /// exactly the same names and shapes.
    ///
    /// # Errors
    /// [`CheckpointError::Params`] when names or shapes differ; nothing is
    /// changed then.
    pub fn load_into(&self, params: &Params) -> std::result::Result<(), CheckpointError> {
        let device = params
            .vars
            .first()
            .map_or(Device::Cpu, |v| v.device().clone());
        let loaded = self.to_params(&device)?;
        if loaded.names != params.names {
            let missing = params
                .names
                .iter()
                .find(|n| loaded.get(n).is_none())
                .or_else(|| loaded.names.iter().find(|n| params.get(n).is_none()));
            return Err(CheckpointError::Params(Error::MissingParam {
                name: missing.cloned().unwrap_or_default(),
            }));
        }
        params
            .set(&loaded.tensors())
            .map_err(CheckpointError::Params)
    }
}

fn file_name(id: &Hash) -> String {
    format!("{}.safetensors", id.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        let d = Device::Cpu;
        Params::from_tensors([
            (
                "b.weight".to_owned(),
                Tensor::new(&[[1f32, 2.], [3., 4.]], &d).unwrap(),
            ),
            (
                "a.bias".to_owned(),
                Tensor::new(&[0.5f32, -1.], &d).unwrap(),
            ),
        ])
        .unwrap()
    }

    #[test]
    fn canonical_order_is_sorted_names() {
        let p = params();
        assert_eq!(p.names(), &["a.bias", "b.weight"]);
        assert_eq!(p.flatten().unwrap(), vec![0.5, -1., 1., 2., 3., 4.]);
        assert_eq!(p.num_elements(), 6);
        assert!(p.get("b.weight").is_some());
        assert!(p.get("c").is_none());
        assert_eq!(p.varmap().all_vars().len(), 2);
        // Flat values cut back into the parameters' shapes.
        let back = p.unflatten(&p.flatten().unwrap()).unwrap();
        assert_eq!(back[1].dims(), &[2, 2]);
        assert_eq!(
            tensors_digest(&back).unwrap(),
            tensors_digest(&p.tensors()).unwrap()
        );
        assert!(p.unflatten(&[1.0; 5]).is_err());
    }

    #[test]
    fn an_existing_varmap_is_shared_not_copied() {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        vb.get_with_hints(3, "z", candle_nn::Init::Const(1.0))
            .unwrap();
        vb.get_with_hints((2, 2), "y", candle_nn::Init::Const(2.0))
            .unwrap();
        let p = Params::from_varmap(varmap.clone());
        assert_eq!(p.names(), &["y", "z"]);
        p.set(&[
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        ])
        .unwrap();
        let all: f32 = varmap
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .sum();
        assert_eq!(all, 0.0, "the VarMap sees the update");
        let copy = p.deep_clone().unwrap();
        copy.set(&[
            Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap(),
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        ])
        .unwrap();
        assert_eq!(
            p.flatten().unwrap(),
            vec![0.0; 7],
            "a deep clone is separate"
        );
    }

    #[test]
    fn root_tracks_every_parameter() {
        let p = params();
        let root = p.root().unwrap();
        let hashes = p.param_hashes().unwrap();
        assert_eq!(root, params().root().unwrap());
        let mut values = p.snapshot().unwrap();
        values[1] = Tensor::new(&[[1f32, 2.], [3., 4.0001]], &Device::Cpu).unwrap();
        p.set(&values).unwrap();
        let changed = p.param_hashes().unwrap();
        assert_eq!(changed[0], hashes[0]);
        assert_ne!(changed[1], hashes[1]);
        assert_ne!(p.root().unwrap(), root);
        // A renamed parameter with the same values hashes differently.
        let renamed = Params::from_tensors([
            ("a.bias".to_owned(), p.tensors()[0].clone()),
            ("c.weight".to_owned(), p.tensors()[1].clone()),
        ])
        .unwrap();
        assert_ne!(renamed.param_hashes().unwrap()[1], changed[1]);
    }

    #[test]
    fn snapshot_survives_updates_and_tensors_follow_them() {
        let p = params();
        let live = p.tensors();
        let kept = p.snapshot().unwrap();
        let zeros: Vec<Tensor> = live.iter().map(|t| t.zeros_like().unwrap()).collect();
        p.set(&zeros).unwrap();
        assert_eq!(flatten(&live).unwrap(), vec![0.; 6]);
        assert_eq!(flatten(&kept).unwrap(), vec![0.5, -1., 1., 2., 3., 4.]);
        assert!(matches!(
            p.set(&zeros[..1]),
            Err(Error::CountMismatch {
                expected: 2,
                actual: 1,
                ..
            })
        ));
        let wrong = [zeros[1].clone(), zeros[0].clone()];
        assert!(matches!(p.set(&wrong), Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn digest_sees_dtype_shape_and_bits() {
        let d = Device::Cpu;
        let a = Tensor::new(&[1f32, 2., 3., 4.], &d).unwrap();
        let base = tensors_digest(std::slice::from_ref(&a)).unwrap();
        assert_eq!(base, tensors_digest(&[a.copy().unwrap()]).unwrap());
        assert_ne!(base, tensors_digest(&[a.reshape((2, 2)).unwrap()]).unwrap());
        assert_ne!(
            base,
            tensors_digest(&[a.to_dtype(DType::BF16).unwrap()]).unwrap()
        );
        let nudged = Tensor::new(&[1f32, 2., 3., f32::from_bits(4f32.to_bits() + 1)], &d).unwrap();
        assert_ne!(base, tensors_digest(&[nudged]).unwrap());
    }

    #[test]
    fn checkpoint_roundtrip_keeps_the_root() {
        let p = params();
        let ckpt = Checkpoint::from_params(&p, Some(r#"{"step":3}"#)).unwrap();
        assert_eq!(ckpt.id(), blake3::hash(ckpt.bytes()));
        assert_eq!(
            ckpt,
            Checkpoint::from_params(&params(), Some(r#"{"step":3}"#)).unwrap(),
            "same parameters, same bytes"
        );
        assert_eq!(ckpt.metadata().unwrap().as_deref(), Some(r#"{"step":3}"#));

        let dir = tempfile::tempdir().unwrap();
        let path = ckpt.save_in(dir.path()).unwrap();
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            ckpt.file_name()
        );
        let back = Checkpoint::open(dir.path(), &ckpt.id()).unwrap();
        assert_eq!(
            back.to_params(&Device::Cpu).unwrap().root().unwrap(),
            p.root().unwrap()
        );

        // Loading into live parameters restores them after an update.
        let root = p.root().unwrap();
        p.set(
            &p.snapshot()
                .unwrap()
                .iter()
                .map(|t| (t * 2.).unwrap())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_ne!(p.root().unwrap(), root);
        back.load_into(&p).unwrap();
        assert_eq!(p.root().unwrap(), root);

        // A file that rotted on disk is refused.
        let mut bytes = ckpt.bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Checkpoint::open(dir.path(), &ckpt.id()),
            Err(CheckpointError::IdMismatch { .. })
        ));

        // Parameters with other names are not overwritten.
        let other =
            Params::from_tensors([("x".to_owned(), Tensor::new(&[1f32], &Device::Cpu).unwrap())])
                .unwrap();
        assert!(ckpt.load_into(&other).is_err());
    }
}
