//! Activations quantized to eight bits per value in blocks of 32, as candle's
//! `BlockQ8_0::from_float` and `BlockQ8_1::from_float` do on x86: the block's
//! largest magnitude sets the scale `d = amax / 127` (stored as f16), and each
//! value becomes `round(x · (1 / d))` (half away from zero, saturated to i8,
//! NaN to 0). The SIMD version gives the same bits: the maximum is exact in
//! any order, the products are the same IEEE operations, and the rounding is
//! computed exactly (the fraction `y - trunc(y)` of a float is exact).
#![allow(unsafe_code)]

use half::f16;

pub(crate) const QK: usize = 32;

/// Quants and f16 scales of `xs.len() / 32` blocks.
pub(crate) struct Blocks {
    pub(crate) qs: Vec<[i8; QK]>,
    pub(crate) d: Vec<f16>,
}

/// Quantizes `xs` (a multiple of 32 values) block by block.
pub(crate) fn quantize(xs: &[f32]) -> Blocks {
    let nb = xs.len() / QK;
    let mut out = Blocks {
        qs: vec![[0i8; QK]; nb],
        d: vec![f16::ZERO; nb],
    };
    #[cfg(target_arch = "x86_64")]
    if simd() {
        for ((x, q), d) in xs.chunks_exact(QK).zip(&mut out.qs).zip(&mut out.d) {
            // SAFETY: `simd()` checked that the CPU has AVX2; `x` holds 32 values.
            *d = unsafe { x86::block(x, q) };
        }
        return out;
    }
    for ((x, q), d) in xs.chunks_exact(QK).zip(&mut out.qs).zip(&mut out.d) {
        *d = block_scalar(x, q);
    }
    out
}

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    use std::sync::OnceLock;
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}

/// candle's loop, the reference.
fn block_scalar(x: &[f32], q: &mut [i8; QK]) -> f16 {
    let mut amax = 0f32;
    for &v in x {
        amax = amax.max(v.abs());
    }
    let d = amax / ((1 << 7) - 1) as f32;
    let id = if d != 0f32 { 1. / d } else { 0. };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = f32::round(v * id) as i8;
    }
    f16::from_f32(d)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::QK;

    /// One block; returns its f16 scale.
    #[target_feature(enable = "avx2")]
    pub(super) fn block(x: &[f32], q: &mut [i8; QK]) -> f16 {
        assert!(x.len() >= QK);
        let sign = _mm256_set1_ps(-0.0);
        // SAFETY: `x` holds at least 32 f32 (asserted): four unaligned loads.
        let v: [__m256; 4] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
        // `max(|v|, m)` returns `m` when `|v|` is NaN, as `f32::max` ignores NaN.
        let mut m = _mm256_setzero_ps();
        for &vi in &v {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, vi), m);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32; unaligned store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
        let d = amax / ((1 << 7) - 1) as f32;
        let id = if d != 0f32 { 1. / d } else { 0. };
        let (idv, half, one) = (_mm256_set1_ps(id), _mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let mut rounded = [0f32; QK];
        for (i, &vi) in v.iter().enumerate() {
            let y = _mm256_mul_ps(vi, idv);
            // round(y), half away from zero: trunc(y) ± 1 when |y - trunc(y)| ≥ 0.5.
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            let step = _mm256_or_ps(_mm256_and_ps(y, sign), one);
            let r = _mm256_add_ps(t, _mm256_and_ps(up, step));
            // SAFETY: `rounded` holds 32 f32; lanes 8i..8i + 8 are in bounds.
            unsafe { _mm256_storeu_ps(rounded.as_mut_ptr().add(8 * i), r) };
        }
        for (q, &r) in q.iter_mut().zip(&rounded) {
            // Saturating, NaN to 0: as candle's `f32::round(..) as i8`.
            *q = r as i8;
        }
        f16::from_f32(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_equals_candles_loop() {
        let mut blocks: Vec<[f32; QK]> = Vec::new();
        // Halves on both sides of zero (scale 1: the block's largest value is 127).
        blocks.push(std::array::from_fn(|j| match j {
            0 => 127.0,
            _ => (j as f32 - 16.0) + 0.5,
        }));
        blocks.push(std::array::from_fn(|j| -(j as f32) * 0.5 - 0.25));
        // Infinities, NaN, zeros, tiny values.
        blocks.push(std::array::from_fn(|j| match j % 5 {
            0 => f32::NAN,
            1 => -0.0,
            2 => 1e-30,
            3 => -3.0,
            _ => 7.5,
        }));
        blocks.push(std::array::from_fn(|j| {
            if j == 3 { f32::INFINITY } else { j as f32 }
        }));
        blocks.push([f32::NAN; QK]);
        blocks.push([0.0; QK]);
        let mut s = 7u64;
        for _ in 0..200 {
            blocks.push(std::array::from_fn(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 20.0
            }));
        }
        let xs: Vec<f32> = blocks.iter().flatten().copied().collect();
        let fast = quantize(&xs);
        for (i, x) in xs.chunks_exact(QK).enumerate() {
            let mut q = [0i8; QK];
            let d = block_scalar(x, &mut q);
            assert_eq!(
                (fast.qs[i], fast.d[i].to_bits()),
                (q, d.to_bits()),
                "block {i}"
            );
        }
    }
}
