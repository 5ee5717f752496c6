//! CPU kernels for candle that Commons runs faster than candle 0.11 does, each
//! bit-identical to candle's own so that no node's results depend on which
//! one it runs. Plugged in through candle's public extension points.
//!
//! This crate is the only place in the workspace with `unsafe` code (SIMD
//! intrinsics), and it is built optimised even in dev builds.

pub mod q4_1;
