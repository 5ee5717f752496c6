use serde::{Deserialize, Serialize};

use super::{LayerRange, Message};
use crate::bounded::BoundedVec;
use crate::codec::Limit;
use crate::envelope::MessageKind;
use crate::ids::{CoalitionId, ModelId, NodeId};
use crate::time::UnixMillis;

/// What a node offers to the swarm, published at join, periodically and on change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityAdvert {
    /// The node described (and the only key that may sign this advert).
    pub node: NodeId,
    /// Increases with every advert the node publishes; receivers keep the highest.
    pub sequence: u64,
    /// Processor.
    pub cpu: CpuInfo,
    /// Physical memory in bytes.
    pub ram_bytes: u64,
    /// Accelerators.
    pub gpus: BoundedVec<GpuInfo, 16>,
    /// Measured f32 matmul throughput in MFLOP/s (integer, so adverts compare exactly).
    pub matmul_mflops: u64,
    /// Estimated bandwidth in bytes per second.
    pub bandwidth_bytes_per_sec: u64,
    /// Models and layer ranges held and ready to serve.
    pub models: BoundedVec<HeldModel, 64>,
    /// Which nodes produce bit-identical results to this one.
    pub determinism: DeterminismClass,
    /// Coalitions this node serves.
    pub coalitions: BoundedVec<CoalitionId, 64>,
    /// Whether the node runs gradient work units (`commons node join --train`).
    pub trains: bool,
    /// Software version, e.g. `commons/0.1.0`.
    pub software: String,
    /// Issue time.
    pub issued_at: UnixMillis,
    /// After this instant the advert must be dropped.
    pub expires_at: UnixMillis,
}

/// A processor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// Logical cores available to the node.
    pub cores: u32,
    /// Model name as the OS reports it.
    pub model: String,
}

/// An accelerator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Backend that drives it.
    pub backend: GpuBackend,
    /// Device name.
    pub name: String,
    /// Device memory in bytes.
    pub memory_bytes: u64,
}

/// Accelerator backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GpuBackend {
    /// NVIDIA CUDA.
    Cuda,
    /// Apple Metal.
    Metal,
}

/// A model's layer range that a node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldModel {
    /// The model.
    pub model: ModelId,
    /// Layers held.
    pub layers: LayerRange,
    /// Layers in the whole model.
    pub total_layers: u32,
}

/// The kernel path and build that decide whether two nodes produce
/// bit-identical results: equal classes promise equal bits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeterminismClass {
    /// Device and kernel family, e.g. `cpu-x86_64-avx2-fma` or `cuda-sm90`.
    pub kernel: String,
    /// Build identity: crate versions and compile-time features that change numerics.
    pub build: String,
}

impl Message for CapacityAdvert {
    const KIND: MessageKind = MessageKind::CapacityAdvert;
    const LIMIT: Limit = Limit::K16;

    fn signed_by(&self, signer: &NodeId) -> bool {
        &self.node == signer
    }

    fn validity(&self) -> (UnixMillis, UnixMillis) {
        (self.issued_at, self.expires_at)
    }
}

/// A node announcing that it leaves the swarm now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    /// The node leaving.
    pub node: NodeId,
    /// Issue time.
    pub issued_at: UnixMillis,
    /// After this instant the notice means nothing.
    pub expires_at: UnixMillis,
}

impl Message for Leave {
    const KIND: MessageKind = MessageKind::Leave;
    const LIMIT: Limit = Limit::K4;

    fn signed_by(&self, signer: &NodeId) -> bool {
        &self.node == signer
    }

    fn validity(&self) -> (UnixMillis, UnixMillis) {
        (self.issued_at, self.expires_at)
    }
}
