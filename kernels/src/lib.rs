//! CPU kernels for candle that Commons runs faster than candle 0.11 does, each
//! bit-identical to candle's own so that no node's results depend on which
//! one it runs. Plugged in through candle's public extension points.
//!
//! This crate is the only place in the workspace with `unsafe` code (SIMD
//! intrinsics, and the writes of work items that share one output buffer),
//! and it is built optimised even in dev builds.

pub mod attention;
pub mod ops;
mod pages;
mod par;
pub mod q4_1;
pub mod q8_0;
mod quant;

use candle_core::quantized::QTensor;

pub use par::solo;

/// Replaces a CPU tensor's storage with this crate's kernel for its type
/// where one applies (Q4_1, Q8_0); other tensors are returned as they are.
pub fn accelerate(t: QTensor) -> candle_core::Result<QTensor> {
    q8_0::accelerate(q4_1::accelerate(t)?)
}
