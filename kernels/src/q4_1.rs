//! A faster Q4_1 matmul for candle's CPU backend, bit-identical to candle's own.
//!
//! candle 0.11 runs Q4_1 weights through a scalar loop. This module plugs a
//! SIMD kernel in through candle's public `QuantizedType` extension point: the
//! weights keep their GGUF block layout, `QMatMul` calls our `matmul_t`.
//!
//! The result is bit-identical to candle's scalar kernel on every CPU, so
//! a node's determinism class does not depend on which path it runs:
//! - activations are quantized to Q8_1 exactly as candle does (same f32 and
//!   f16 operations in the same order);
//! - the integer dot product of a block is exact whatever the SIMD order;
//! - each block's float term, `sumi·d_x·d_y + m_x·s_y`, is computed with the
//!   same IEEE operations (lane-wise, no fused multiply-add), and the terms
//!   are summed in block order, as the scalar loop does.
//!
//! The tests compare against candle's kernel bit for bit.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Result};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;

/// One Q4_1 block in GGUF layout: scale, minimum (f16 bits), 32 four-bit values.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct BlockQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// Q4_1 weights `(n, k)` with a SIMD matmul.
#[derive(Debug)]
pub struct FastQ4_1 {
    blocks: Vec<BlockQ4_1>,
    /// Copies of each block's scale and minimum (f16 bits), contiguous so that
    /// the kernel loads eight at once.
    d: Vec<u16>,
    m: Vec<u16>,
}

/// One weight row: its blocks and their scales and minimums.
#[derive(Clone, Copy)]
struct Row<'a> {
    blocks: &'a [BlockQ4_1],
    d: &'a [u16],
    m: &'a [u16],
}

impl FastQ4_1 {
    fn new(blocks: Vec<BlockQ4_1>) -> Self {
        let d = blocks.iter().map(|b| b.d).collect();
        let m = blocks.iter().map(|b| b.m).collect();
        Self { blocks, d, m }
    }

    fn row(&self, c: usize, kb: usize) -> Row<'_> {
        let r = c * kb..(c + 1) * kb;
        Row {
            blocks: &self.blocks[r.clone()],
            d: &self.d[r.clone()],
            m: &self.m[r],
        }
    }
}

/// Replaces a CPU Q4_1 tensor's storage with [`FastQ4_1`]; other tensors are returned as they are.
pub fn accelerate(t: QTensor) -> Result<QTensor> {
    if t.dtype() != GgmlDType::Q4_1 || !t.device().is_cpu() || t.rank() != 2 {
        return Ok(t);
    }
    let data = t.data()?;
    let blocks = data
        .chunks_exact(20)
        .map(|b| {
            let mut qs = [0u8; QK / 2];
            qs.copy_from_slice(&b[4..20]);
            BlockQ4_1 {
                d: u16::from_le_bytes([b[0], b[1]]),
                m: u16::from_le_bytes([b[2], b[3]]),
                qs,
            }
        })
        .collect();
    let shape = t.shape().clone();
    QTensor::new(QStorage::Cpu(Box::new(FastQ4_1::new(blocks))), shape)
}

/// Activations quantized to Q8_1: values, and the scale and sum terms as f32
/// (each the f32 value of the f16 candle stores).
struct Q8_1Rows {
    qs: Vec<[i8; QK]>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// Quantizes rows of `k` floats to Q8_1 exactly as candle's `BlockQ8_1::from_float` does.
fn quantize_q8_1(xs: &[f32]) -> Q8_1Rows {
    let nb = xs.len() / QK;
    let mut out = Q8_1Rows {
        qs: vec![[0i8; QK]; nb],
        d: vec![0.0; nb],
        s: vec![0.0; nb],
    };
    for (i, block) in xs.chunks_exact(QK).enumerate() {
        let mut amax = 0f32;
        for &x in block {
            amax = amax.max(x.abs());
        }
        let d = amax / ((1 << 7) - 1) as f32;
        let id = if d != 0f32 { 1. / d } else { 0. };
        let d16 = f16::from_f32(d);
        let q = &mut out.qs[i];
        let mut sum = 0i32;
        for j in 0..QK / 2 {
            let v0 = block[j] * id;
            let v1 = block[j + QK / 2] * id;
            q[j] = f32::round(v0) as i8;
            q[j + QK / 2] = f32::round(v1) as i8;
            sum += q[j] as i32 + q[j + QK / 2] as i32;
        }
        out.d[i] = d16.to_f32();
        out.s[i] = (f16::from_f32(sum as f32) * d16).to_f32();
    }
    out
}

/// The exact integer dot product of one block.
fn block_sumi(x: &BlockQ4_1, y: &[i8; QK]) -> i32 {
    let mut sumi = 0i32;
    for j in 0..QK / 2 {
        let v0 = (x.qs[j] & 0x0F) as i32;
        let v1 = (x.qs[j] >> 4) as i32;
        sumi += v0 * y[j] as i32 + v1 * y[j + QK / 2] as i32;
    }
    sumi
}

/// A block's float term, in candle's order of operations.
#[inline(always)]
fn block_term(sumi: i32, x: &BlockQ4_1, yd: f32, ys: f32) -> f32 {
    sumi as f32 * f16::from_bits(x.d).to_f32() * yd + f16::from_bits(x.m).to_f32() * ys
}

/// Portable kernel: the reference the SIMD one must equal.
fn dot_scalar(row: Row<'_>, y: &Q8_1Rows, y0: usize) -> f32 {
    let mut sumf = 0f32;
    for (b, xb) in row.blocks.iter().enumerate() {
        sumf += block_term(block_sumi(xb, &y.qs[y0 + b]), xb, y.d[y0 + b], y.s[y0 + b]);
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BlockQ4_1, Q8_1Rows, QK, Row, block_term};

    /// The 8 i32 partial sums of one block's products.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn block_products(x: &BlockQ4_1, y: &[i8; QK]) -> __m256i {
        // SAFETY: `x.qs` is 16 bytes and `y` 32 bytes: both loads stay in bounds (unaligned loads).
        let (q, yv) = unsafe {
            (
                _mm_loadu_si128(x.qs.as_ptr().cast()),
                _mm256_loadu_si256(y.as_ptr().cast()),
            )
        };
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let xv = _mm256_set_m128i(hi, lo);
        // u8 (0..15) times i8, pairs summed: at most 2·15·128, no saturation.
        let p16 = _mm256_maddubs_epi16(xv, yv);
        _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
        _mm_cvtsi128_si32(s)
    }

    /// Eight blocks' integer sums, in block order.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn sums8(p: [__m256i; 8]) -> __m256i {
        let s01 = _mm256_hadd_epi32(p[0], p[1]);
        let s23 = _mm256_hadd_epi32(p[2], p[3]);
        let s45 = _mm256_hadd_epi32(p[4], p[5]);
        let s67 = _mm256_hadd_epi32(p[6], p[7]);
        let s0123 = _mm256_hadd_epi32(s01, s23);
        let s4567 = _mm256_hadd_epi32(s45, s67);
        let lo = _mm256_permute2x128_si256(s0123, s4567, 0x20);
        let hi = _mm256_permute2x128_si256(s0123, s4567, 0x31);
        _mm256_add_epi32(lo, hi)
    }

    /// Eight f16 values (as bits) widened to f32.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn widen8(h: &[u16]) -> __m256 {
        assert!(h.len() >= 8);
        // SAFETY: `h` holds at least 8 u16 (16 bytes); unaligned load.
        let v = unsafe { _mm_loadu_si128(h.as_ptr().cast()) };
        _mm256_cvtph_ps(v)
    }

    /// The dot product of a row of Q4_1 blocks with Q8_1 activations from block `y0`.
    /// Callers must have checked that the CPU has AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn dot(row: Row<'_>, y: &Q8_1Rows, y0: usize) -> f32 {
        let x = row.blocks;
        let nb = x.len();
        let (yq, yd, ys) = (&y.qs[y0..y0 + nb], &y.d[y0..y0 + nb], &y.s[y0..y0 + nb]);
        let mut sumf = 0f32;
        let mut b = 0;
        while b + 8 <= nb {
            let xs = &x[b..b + 8];
            let p: [__m256i; 8] = std::array::from_fn(|t| block_products(&xs[t], &yq[b + t]));
            let sumi = _mm256_cvtepi32_ps(sums8(p));
            let xd = widen8(&row.d[b..b + 8]);
            let xm = widen8(&row.m[b..b + 8]);
            let (ydv, ysv) = (&yd[b..b + 8], &ys[b..b + 8]);
            // SAFETY: both slices hold exactly 8 f32; unaligned loads.
            let (ydv, ysv) =
                unsafe { (_mm256_loadu_ps(ydv.as_ptr()), _mm256_loadu_ps(ysv.as_ptr())) };
            // ((sumi · d_x) · d_y) + (m_x · s_y), lane by lane, as the scalar code.
            let terms = _mm256_add_ps(
                _mm256_mul_ps(_mm256_mul_ps(sumi, xd), ydv),
                _mm256_mul_ps(xm, ysv),
            );
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 f32; unaligned store.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), terms) };
            for term in lanes {
                sumf += term;
            }
            b += 8;
        }
        for t in b..nb {
            sumf += block_term(hsum(block_products(&x[t], &yq[t])), &x[t], yd[t], ys[t]);
        }
        sumf
    }

    /// The dot products of four rows of Q4_1 blocks with the same activations:
    /// each exactly as [`dot`] computes it, but the four running sums are
    /// independent, so their additions overlap instead of waiting on each other.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn dot4(rows: [Row<'_>; 4], y: &Q8_1Rows, y0: usize) -> [f32; 4] {
        let x = rows.map(|r| r.blocks);
        let nb = x[0].len();
        let (yq, yd, ys) = (&y.qs[y0..y0 + nb], &y.d[y0..y0 + nb], &y.s[y0..y0 + nb]);
        let mut sumf = [0f32; 4];
        let mut b = 0;
        while b + 8 <= nb {
            // SAFETY: both slices hold exactly 8 f32; unaligned loads.
            let (ydv, ysv) = unsafe {
                (
                    _mm256_loadu_ps(yd[b..b + 8].as_ptr()),
                    _mm256_loadu_ps(ys[b..b + 8].as_ptr()),
                )
            };
            let mut lanes = [[0f32; 8]; 4];
            for (c, out) in lanes.iter_mut().enumerate() {
                let xs = &x[c][b..b + 8];
                let p: [__m256i; 8] = std::array::from_fn(|t| block_products(&xs[t], &yq[b + t]));
                let sumi = _mm256_cvtepi32_ps(sums8(p));
                let xd = widen8(&rows[c].d[b..b + 8]);
                let xm = widen8(&rows[c].m[b..b + 8]);
                let terms = _mm256_add_ps(
                    _mm256_mul_ps(_mm256_mul_ps(sumi, xd), ydv),
                    _mm256_mul_ps(xm, ysv),
                );
                // SAFETY: `out` holds 8 f32; unaligned store.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), terms) };
            }
            // Block order within each row; the four rows interleave.
            #[allow(clippy::needless_range_loop)]
            for lane in 0..8 {
                for c in 0..4 {
                    sumf[c] += lanes[c][lane];
                }
            }
            b += 8;
        }
        for t in b..nb {
            for c in 0..4 {
                sumf[c] += block_term(
                    hsum(block_products(&x[c][t], &yq[t])),
                    &x[c][t],
                    yd[t],
                    ys[t],
                );
            }
        }
        sumf
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dot(simd: bool, x: Row<'_>, y: &Q8_1Rows, y0: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2 and F16C were detected at run time.
        return unsafe { avx2::dot(x, y, y0) };
    }
    let _ = simd;
    dot_scalar(x, y, y0)
}

/// Four dot products against the same activations (see [`avx2::dot4`]).
fn dot4(simd: bool, x: [Row<'_>; 4], y: &Q8_1Rows, y0: usize) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2 and F16C were detected at run time.
        return unsafe { avx2::dot4(x, y, y0) };
    }
    x.map(|x| dot(simd, x, y, y0))
}

/// Columns per task: enough work to pay for scheduling, few enough to share out.
const COLS_PER_TASK: usize = 32;

/// Below this many block dot products a matmul runs on the calling thread.
/// Measured on 2 cores: a decode step's projections (m = 1, at most ~28k block
/// products) ran 10-20% faster on one thread than split over rayon's pool,
/// whose wake-up latency outweighs the work.
const PARALLEL_MIN_BLOCK_DOTS: usize = 64 * 1024;

impl FastQ4_1 {
    fn matmul(
        &self,
        (m, k, n): (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
        simd: bool,
    ) -> Result<()> {
        if !k.is_multiple_of(QK) {
            candle_core::bail!("q4_1 matmul: k = {k} is not a multiple of {QK}");
        }
        let kb = k / QK;
        if self.blocks.len() != n * kb || lhs.len() != m * k || dst.len() != m * n {
            candle_core::bail!("q4_1 matmul: shapes do not match ({m}, {k}, {n})");
        }
        let y = quantize_q8_1(lhs);
        // Small products (a decode step's projections) cost less than waking
        // another thread: run them here.
        if m * n * kb < PARALLEL_MIN_BLOCK_DOTS {
            for row in 0..m {
                self.row_dots(
                    simd,
                    &y,
                    row * kb,
                    kb,
                    0..n,
                    &mut dst[row * n..(row + 1) * n],
                );
            }
            return Ok(());
        }
        let chunks: Vec<Vec<f32>> = (0..n.div_ceil(COLS_PER_TASK))
            .into_par_iter()
            .map(|c| {
                let cols = c * COLS_PER_TASK..((c + 1) * COLS_PER_TASK).min(n);
                let width = cols.len();
                let mut out = vec![0f32; m * width];
                for row in 0..m {
                    self.row_dots(
                        simd,
                        &y,
                        row * kb,
                        kb,
                        cols.clone(),
                        &mut out[row * width..(row + 1) * width],
                    );
                }
                out
            })
            .collect();
        for (c, chunk) in chunks.iter().enumerate() {
            let start = c * COLS_PER_TASK;
            let width = chunk.len() / m.max(1);
            for row in 0..m {
                dst[row * n + start..row * n + start + width]
                    .copy_from_slice(&chunk[row * width..(row + 1) * width]);
            }
        }
        Ok(())
    }

    /// `out[i]` = dot of weight row `cols.start + i` with activation row at block `y0`.
    fn row_dots(
        &self,
        simd: bool,
        y: &Q8_1Rows,
        y0: usize,
        kb: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let row = |c: usize| self.row(c, kb);
        let mut c = cols.start;
        let mut i = 0;
        while c + 4 <= cols.end {
            out[i..i + 4].copy_from_slice(&dot4(
                simd,
                [row(c), row(c + 1), row(c + 2), row(c + 3)],
                y,
                y0,
            ));
            c += 4;
            i += 4;
        }
        while c < cols.end {
            out[i] = dot(simd, row(c), y, y0);
            c += 1;
            i += 1;
        }
    }
}

/// Dequantizes blocks as candle does: `q · d + m`.
fn blocks_to_f32(blocks: &[BlockQ4_1], out: &mut [f32]) {
    for (b, chunk) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        let d = f16::from_bits(b.d).to_f32();
        let m = f16::from_bits(b.m).to_f32();
        for j in 0..QK / 2 {
            chunk[j] = (b.qs[j] & 0x0F) as f32 * d + m;
            chunk[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

impl QuantizedType for FastQ4_1 {
    fn dtype(&self) -> GgmlDType {
        GgmlDType::Q4_1
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        self.matmul(mkn, lhs, dst, has_avx2())
    }

    fn matmul_t_f16(&self, mkn: (usize, usize, usize), lhs: &[f16], dst: &mut [f16]) -> Result<()> {
        let lhs: Vec<f32> = lhs.iter().map(|v| v.to_f32()).collect();
        let mut out = vec![0f32; dst.len()];
        self.matmul_t(mkn, &lhs, &mut out)?;
        for (d, v) in dst.iter_mut().zip(out) {
            *d = f16::from_f32(v);
        }
        Ok(())
    }

    fn embedding(&self, ids: &[u32], rows: usize, hidden: usize) -> Result<CpuStorage> {
        if !hidden.is_multiple_of(QK) || self.blocks.len() != rows * (hidden / QK) {
            candle_core::bail!("q4_1 embedding: {rows} x {hidden} does not match the weights");
        }
        let kb = hidden / QK;
        let mut out = vec![0f32; ids.len() * hidden];
        for (row_out, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("q4_1 embedding: id {id} out of {rows} rows");
            }
            blocks_to_f32(&self.blocks[id * kb..(id + 1) * kb], row_out);
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        if elem_count != self.blocks.len() * QK {
            candle_core::bail!(
                "q4_1 dequantize: {elem_count} elements, {} blocks",
                self.blocks.len()
            );
        }
        let mut out = vec![0f32; elem_count];
        blocks_to_f32(&self.blocks, &mut out);
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<BlockQ4_1>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.blocks.as_ptr().cast()
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        // quantize_row_q4_1, as candle and ggml do it.
        for (b, block) in self.blocks.iter_mut().zip(xs.chunks_exact(QK)) {
            let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
            for &x in block {
                min = f32::min(x, min);
                max = f32::max(x, max);
            }
            let d = (max - min) / ((1 << 4) - 1) as f32;
            let id = if d != 0f32 { 1. / d } else { 0. };
            b.d = f16::from_f32(d).to_bits();
            b.m = f16::from_f32(min).to_bits();
            for j in 0..QK / 2 {
                let x0 = u8::min(15, ((block[j] - min) * id + 0.5) as u8);
                let x1 = u8::min(15, ((block[QK / 2 + j] - min) * id + 0.5) as u8);
                b.qs[j] = x0 | (x1 << 4);
            }
        }
        self.d = self.blocks.iter().map(|b| b.d).collect();
        self.m = self.blocks.iter().map(|b| b.m).collect();
    }

    fn from_float_imatrix(&mut self, xs: &[f32], _imatrix_weights: &[f32], _n_per_row: usize) {
        self.from_float(xs);
    }

    fn size(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    fn weights(n: usize, k: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let values: Vec<f32> = (0..n * k)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    #[test]
    fn equals_candles_kernel_bit_for_bit() {
        // Block counts with and without a tail of fewer than 8 blocks, odd ones
        // included; one row (decode) and many (prefill).
        for (n, k) in [(40, 576), (64, 32), (33, 1536), (96, 256 + 32)] {
            let w = weights(n, k, (n * k) as u64);
            let reference =
                QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
            let fast = QMatMul::from_qtensor(
                accelerate(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap(),
            )
            .unwrap();
            for m in [1, 3, 17] {
                let x = (weights(m, k, 7 + m as u64) * 10.0)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let a = reference.forward(&x).unwrap();
                let b = fast.forward(&x).unwrap();
                assert_eq!(bits(&a), bits(&b), "n={n} k={k} m={m}");
            }
        }
    }

    #[test]
    fn scalar_and_simd_paths_agree() {
        let (n, k) = (20, 800);
        let q = QTensor::quantize(&weights(n, k, 3), GgmlDType::Q4_1).unwrap();
        let fast = match accelerate(q).unwrap().data() {
            Ok(bytes) => bytes
                .chunks_exact(20)
                .map(|b| BlockQ4_1 {
                    d: u16::from_le_bytes([b[0], b[1]]),
                    m: u16::from_le_bytes([b[2], b[3]]),
                    qs: b[4..20].try_into().unwrap(),
                })
                .collect::<Vec<_>>(),
            Err(e) => panic!("{e}"),
        };
        let w = FastQ4_1::new(fast);
        let x = weights(5, k, 9)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (mut a, mut b) = (vec![0f32; 5 * n], vec![0f32; 5 * n]);
        w.matmul((5, k, n), &x, &mut a, false).unwrap();
        w.matmul((5, k, n), &x, &mut b, has_avx2()).unwrap();
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn dequantize_and_data_keep_the_gguf_layout() {
        let q = QTensor::quantize(&weights(8, 64, 5), GgmlDType::Q4_1).unwrap();
        let fast =
            accelerate(QTensor::quantize(&weights(8, 64, 5), GgmlDType::Q4_1).unwrap()).unwrap();
        assert_eq!(q.data().unwrap(), fast.data().unwrap());
        assert_eq!(
            bits(&q.dequantize(&Device::Cpu).unwrap()),
            bits(&fast.dequantize(&Device::Cpu).unwrap())
        );
    }
}
