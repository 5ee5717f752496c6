//! A faster Q4_1 matmul for candle's CPU backend, bit-identical to candle's own.
//!
//! candle 0.11 runs Q4_1 weights through a scalar loop. This module plugs a
//! SIMD kernel in through candle's public `QuantizedType` extension point:
//! `QMatMul` calls our `matmul_t`.
//!
//! The weights are laid out again at load, with the same bytes: rows go in
//! groups of eight, and for each block position a group holds the eight rows'
//! blocks interleaved (160 bytes, the size of eight GGUF blocks), so that
//! SIMD lane `r` computes row `r`: the four-byte runs of the rows' quants
//! alternate (`qs[4t..4t + 4]` of rows 0..8, for t = 0..4), then come the
//! rows' eight scales and eight minimums. One pass over a group's blocks
//! gives eight dot products with no horizontal sums, and each weight block
//! read serves every activation row of a tile. The last group is padded with
//! zero rows when the row count is not a multiple of eight. The GGUF bytes
//! are rebuilt on demand for `data()`.
//!
//! The result is bit-identical to candle's scalar kernel on every CPU, so
//! a node's determinism class does not depend on which path it runs:
//! - activations are quantized to Q8_1 exactly as candle does (same f32 and
//!   f16 operations in the same order);
//! - the integer dot product of a block is exact whatever the SIMD order;
//! - each block's float term, `sumi·d_x·d_y + m_x·s_y`, is computed with the
//!   same IEEE operations (lane-wise, no fused multiply-add), and each row's
//!   terms are summed in block order, as the scalar loop does;
//! - which thread computes a row does not change how it is computed.
//!
//! The tests compare against candle's kernel bit for bit.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Result};
use half::f16;

use crate::pages::Pages;
use crate::par::{self, SharedOut};

const QK: usize = 32;
/// Rows per interleaved group.
const ROWS: usize = 8;
/// Activation rows computed per pass over a group's weights.
const TILE: usize = 4;

/// One Q4_1 block in GGUF layout: scale, minimum (f16 bits), 32 four-bit values.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct BlockQ4_1 {
    d: u16,
    m: u16,
    qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

impl BlockQ4_1 {
    fn from_bytes(b: &[u8]) -> Self {
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[4..20]);
        Self {
            d: u16::from_le_bytes([b[0], b[1]]),
            m: u16::from_le_bytes([b[2], b[3]]),
            qs,
        }
    }

    fn write_bytes(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d.to_le_bytes());
        out[2..4].copy_from_slice(&self.m.to_le_bytes());
        out[4..20].copy_from_slice(&self.qs);
    }
}

/// The blocks at one position of eight consecutive rows, interleaved (see
/// the module docs). Aligned so that no 32-byte load crosses a cache line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct Group {
    qs: [u8; ROWS * QK / 2],
    d: [u16; ROWS],
    m: [u16; ROWS],
}
const _: () = assert!(std::mem::size_of::<Group>() == ROWS * 20);

impl Group {
    fn new(blocks: &[BlockQ4_1; ROWS]) -> Self {
        let mut g = Self {
            qs: [0; ROWS * QK / 2],
            d: [0; ROWS],
            m: [0; ROWS],
        };
        for (r, b) in blocks.iter().enumerate() {
            for t in 0..4 {
                let at = t * 4 * ROWS + r * 4;
                g.qs[at..at + 4].copy_from_slice(&b.qs[4 * t..4 * t + 4]);
            }
            g.d[r] = b.d;
            g.m[r] = b.m;
        }
        g
    }

    /// Row `r`'s block.
    fn block(&self, r: usize) -> BlockQ4_1 {
        let mut qs = [0u8; QK / 2];
        for t in 0..4 {
            let at = t * 4 * ROWS + r * 4;
            qs[4 * t..4 * t + 4].copy_from_slice(&self.qs[at..at + 4]);
        }
        BlockQ4_1 {
            d: self.d[r],
            m: self.m[r],
            qs,
        }
    }
}

/// Q4_1 weights `(n, k)` with a SIMD matmul.
pub struct FastQ4_1 {
    rows: usize,
    /// Blocks per row.
    kb: usize,
    /// `rows.div_ceil(8)` groups of rows, each `kb` [`Group`]s in block order.
    groups: Pages<Group>,
    /// The GGUF bytes, built when first asked for.
    gguf: OnceLock<Vec<u8>>,
}

impl std::fmt::Debug for FastQ4_1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastQ4_1")
            .field("rows", &self.rows)
            .field("blocks_per_row", &self.kb)
            .finish_non_exhaustive()
    }
}

impl FastQ4_1 {
    /// Lays out `blocks`, `rows` rows of `kb` blocks in GGUF order.
    fn new(blocks: &[BlockQ4_1], rows: usize, kb: usize) -> Self {
        debug_assert_eq!(blocks.len(), rows * kb);
        let groups = Pages::from_fn(rows.div_ceil(ROWS) * kb, |i| {
            let (g, b) = (i / kb, i % kb);
            Group::new(&std::array::from_fn(|r| {
                let row = g * ROWS + r;
                if row < rows {
                    blocks[row * kb + b]
                } else {
                    BlockQ4_1::default()
                }
            }))
        });
        Self {
            rows,
            kb,
            groups,
            gguf: OnceLock::new(),
        }
    }

    /// Block `b` of row `row`.
    fn block(&self, row: usize, b: usize) -> BlockQ4_1 {
        self.groups[(row / ROWS) * self.kb + b].block(row % ROWS)
    }

    fn blocks(&self) -> impl Iterator<Item = BlockQ4_1> + '_ {
        (0..self.rows).flat_map(move |r| (0..self.kb).map(move |b| self.block(r, b)))
    }

    fn n_blocks(&self) -> usize {
        self.rows * self.kb
    }
}

impl FastQ4_1 {
    /// The rows of `parts`, stacked in order (one matrix for several
    /// projections of the same input); `None` unless every part is a CPU
    /// Q4_1 matrix of the same width.
    pub fn from_qtensors(parts: &[&QTensor]) -> Result<Option<Self>> {
        let mut width = None;
        let mut blocks = Vec::new();
        let mut rows = 0;
        for t in parts {
            if t.dtype() != GgmlDType::Q4_1 || !t.device().is_cpu() || t.rank() != 2 {
                return Ok(None);
            }
            let (n, k) = t.shape().dims2()?;
            if !k.is_multiple_of(QK) || width.is_some_and(|w| w != k) {
                return Ok(None);
            }
            width = Some(k);
            let data = t.data()?;
            if data.len() != n * (k / QK) * 20 {
                candle_core::bail!("q4_1: {} bytes for a ({n}, {k}) tensor", data.len());
            }
            blocks.extend(data.chunks_exact(20).map(BlockQ4_1::from_bytes));
            rows += n;
        }
        Ok(width.map(|k| Self::new(&blocks, rows, k / QK)))
    }

    /// Output rows (`n`).
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width (`k`).
    #[must_use]
    pub fn cols(&self) -> usize {
        self.kb * QK
    }

    /// `dst = lhs · selfᵀ` for `m` rows of `lhs`, bit-identical to candle's
    /// `QMatMul` on the same weights.
    pub fn forward(&self, lhs: &[f32], m: usize, dst: &mut [f32]) -> Result<()> {
        self.matmul((m, self.cols(), self.rows), lhs, dst, Level::detect())
    }

    /// Row `row` dequantized as candle does (its embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows || out.len() != self.cols() {
            candle_core::bail!("q4_1: row {row} of {} into {} values", self.rows, out.len());
        }
        for (b, chunk) in out.chunks_exact_mut(QK).enumerate() {
            block_to_f32(&self.block(row, b), chunk);
        }
        Ok(())
    }
}

/// Replaces a CPU Q4_1 tensor's storage with [`FastQ4_1`]; other tensors are returned as they are.
pub fn accelerate(t: QTensor) -> Result<QTensor> {
    match FastQ4_1::from_qtensors(&[&t])? {
        Some(fast) => {
            let shape = t.shape().clone();
            QTensor::new(QStorage::Cpu(Box::new(fast)), shape)
        }
        None => Ok(t),
    }
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
    let blocks = crate::quant::quantize(xs);
    let s = blocks
        .qs
        .iter()
        .zip(&blocks.d)
        .map(|(q, &d16)| {
            let sum: i32 = q.iter().map(|&v| v as i32).sum();
            (f16::from_f32(sum as f32) * d16).to_f32()
        })
        .collect();
    Q8_1Rows {
        d: blocks.d.iter().map(|d| d.to_f32()).collect(),
        qs: blocks.qs,
        s,
    }
}

/// A block's float term, in candle's order of operations.
#[inline(always)]
fn block_term(sumi: i32, d: u16, m: u16, yd: f32, ys: f32) -> f32 {
    sumi as f32 * f16::from_bits(d).to_f32() * yd + f16::from_bits(m).to_f32() * ys
}

/// Portable kernel for one group: candle's scalar loop (`vec_dot_q4_1_q8_1`)
/// on each of its eight rows, read from the interleaved layout.
fn group_dot_scalar(group: &[Group], y: &Q8_1Rows, y0: usize) -> [f32; ROWS] {
    let mut sumf = [0f32; ROWS];
    for (b, g) in group.iter().enumerate() {
        let yq = &y.qs[y0 + b];
        for (r, acc) in sumf.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for t in 0..4 {
                for j in 0..4 {
                    let q = g.qs[t * 4 * ROWS + r * 4 + j];
                    let e = 4 * t + j;
                    sumi += (q & 0x0F) as i32 * yq[e] as i32 + (q >> 4) as i32 * yq[e + 16] as i32;
                }
            }
            *acc += block_term(sumi, g.d[r], g.m[r], y.d[y0 + b], y.s[y0 + b]);
        }
    }
    sumf
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Group, Q8_1Rows, QK, ROWS};

    /// Four consecutive activation quants, repeated in every 32-bit lane.
    #[inline(always)]
    fn quad(yq: &[i8; QK], at: usize) -> i32 {
        i32::from_le_bytes([
            yq[at] as u8,
            yq[at + 1] as u8,
            yq[at + 2] as u8,
            yq[at + 3] as u8,
        ])
    }

    /// The low and high four-bit values of a block position of a group: lane
    /// `r` of `lo[t]` holds row `r`'s values `4t..4t + 4`, of `hi[t]` values
    /// `16 + 4t..16 + 4t + 4`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn unpack(g: &Group) -> ([__m256i; 4], [__m256i; 4]) {
        let mask = _mm256_set1_epi8(0x0F);
        // SAFETY: `g.qs` is 128 bytes: four 32-byte loads in bounds (unaligned loads).
        let w: [__m256i; 4] = std::array::from_fn(|t| unsafe {
            _mm256_loadu_si256(g.qs.as_ptr().add(32 * t).cast())
        });
        (
            w.map(|v| _mm256_and_si256(v, mask)),
            w.map(|v| _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)),
        )
    }

    /// Eight f16 values (as bits) widened to f32.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn widen8(h: &[u16; 8]) -> __m256 {
        // SAFETY: `h` is 8 u16 (16 bytes); unaligned load.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr().cast()) })
    }

    /// Lane `r`: the exact integer dot product of row `r`'s block with `yq`.
    /// Each `maddubs` lane is at most 2·15·128 in magnitude, so eight of them
    /// summed in 16 bits (30 720) cannot overflow.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn sums_avx2(lo: &[__m256i; 4], hi: &[__m256i; 4], yq: &[i8; QK]) -> __m256i {
        let mut p = _mm256_setzero_si256();
        for t in 0..4 {
            let a = _mm256_maddubs_epi16(lo[t], _mm256_set1_epi32(quad(yq, 4 * t)));
            let b = _mm256_maddubs_epi16(hi[t], _mm256_set1_epi32(quad(yq, 16 + 4 * t)));
            p = _mm256_add_epi16(p, _mm256_add_epi16(a, b));
        }
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// [`sums_avx2`] with AVX-512 VNNI: four products summed into each lane at once.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    #[inline]
    fn sums_vnni(lo: &[__m256i; 4], hi: &[__m256i; 4], yq: &[i8; QK]) -> __m256i {
        let mut a = _mm256_setzero_si256();
        let mut b = _mm256_setzero_si256();
        for t in 0..4 {
            a = _mm256_dpbusd_epi32(a, lo[t], _mm256_set1_epi32(quad(yq, 4 * t)));
            b = _mm256_dpbusd_epi32(b, hi[t], _mm256_set1_epi32(quad(yq, 16 + 4 * t)));
        }
        _mm256_add_epi32(a, b)
    }

    /// `((sumi · d_x) · d_y) + (m_x · s_y)` lane by lane, as the scalar code.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn term(sumi: __m256i, xd: __m256, xm: __m256, yd: f32, ys: f32) -> __m256 {
        _mm256_add_ps(
            _mm256_mul_ps(
                _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), xd),
                _mm256_set1_ps(yd),
            ),
            _mm256_mul_ps(xm, _mm256_set1_ps(ys)),
        )
    }

    macro_rules! group_dots {
        ($name:ident, $features:literal, $sums:ident) => {
            /// The dot products of a group's eight rows with `M` activation
            /// rows (starting at blocks `y0[i]`): row `r` of activation `i`
            /// in lane `r` of the `i`-th result, summed in block order.
            /// Callers must have checked the CPU features.
            #[target_feature(enable = $features)]
            pub(super) fn $name<const M: usize>(
                group: &[Group],
                y: &Q8_1Rows,
                y0: [usize; M],
            ) -> [[f32; ROWS]; M] {
                let kb = group.len();
                let yq: [&[[i8; QK]]; M] = y0.map(|s| &y.qs[s..s + kb]);
                let yd: [&[f32]; M] = y0.map(|s| &y.d[s..s + kb]);
                let ys: [&[f32]; M] = y0.map(|s| &y.s[s..s + kb]);
                let mut acc = [_mm256_setzero_ps(); M];
                for (b, g) in group.iter().enumerate() {
                    let (lo, hi) = unpack(g);
                    let xd = widen8(&g.d);
                    let xm = widen8(&g.m);
                    for i in 0..M {
                        let sumi = $sums(&lo, &hi, &yq[i][b]);
                        acc[i] = _mm256_add_ps(acc[i], term(sumi, xd, xm, yd[i][b], ys[i][b]));
                    }
                }
                acc.map(|a| {
                    let mut out = [0f32; ROWS];
                    // SAFETY: `out` holds 8 f32; unaligned store.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), a) };
                    out
                })
            }
        };
    }

    group_dots!(group_dots_avx2, "avx2,f16c", sums_avx2);
    group_dots!(group_dots_vnni, "avx2,f16c,avx512vnni,avx512vl", sums_vnni);
}

/// The instruction sets a matmul may use, detected at run time. Every level
/// gives the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Level {
    fn detect() -> Self {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("f16c") {
                    if has!("avx512vnni") && has!("avx512vl") {
                        return Level::Vnni;
                    }
                    return Level::Avx2;
                }
            }
            Level::Scalar
        })
    }

    /// All levels this CPU can run, for tests.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let best = Self::detect();
            if best != Level::Scalar {
                all.push(Level::Avx2);
            }
            if best == Level::Vnni {
                all.push(Level::Vnni);
            }
        }
        all
    }
}

/// [`group_dots`] for `M` activation rows.
fn group_dots<const M: usize>(
    level: Level,
    group: &[Group],
    y: &Q8_1Rows,
    y0: [usize; M],
) -> [[f32; ROWS]; M] {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::Avx2` is only chosen when AVX2 and F16C were detected at run time.
        Level::Avx2 => unsafe { x86::group_dots_avx2(group, y, y0) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::Vnni` is only chosen when AVX2, F16C, AVX-512 VNNI
        // and AVX-512 VL were detected at run time.
        Level::Vnni => unsafe { x86::group_dots_vnni(group, y, y0) },
        Level::Scalar => y0.map(|s| group_dot_scalar(group, y, s)),
    }
}

/// Below this many block dot products a matmul runs on the calling thread:
/// waking the pool costs more than it saves.
const PARALLEL_MIN_BLOCK_DOTS: usize = 4 * 1024;

impl FastQ4_1 {
    fn matmul(
        &self,
        (m, k, n): (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
        level: Level,
    ) -> Result<()> {
        let kb = self.kb;
        if k != kb * QK || n != self.rows || lhs.len() != m * k || dst.len() != m * n {
            candle_core::bail!(
                "q4_1 matmul: ({m}, {k}, {n}) does not fit {} rows of {} blocks",
                self.rows,
                kb
            );
        }
        let y = quantize_q8_1(lhs);
        let groups = n.div_ceil(ROWS);
        // Work items: (group, tile of activation rows), group-major, so that a
        // run of items reads one group's weights for several tiles.
        let tiles = m.div_ceil(TILE);
        let out = SharedOut::new(dst);
        let item = |it: usize| {
            let (g, tile) = (it / tiles, it % tiles);
            let w = &self.groups[g * kb..(g + 1) * kb];
            let rows = tile * TILE..m.min((tile + 1) * TILE);
            let cols = ROWS.min(n - g * ROWS);
            let write = |i: usize, v: &[f32; ROWS]| {
                // SAFETY: item (g, tile) alone writes columns 8g..8g + 8 of its
                // tile's rows.
                unsafe { out.write(i * n + g * ROWS, &v[..cols]) }
            };
            if rows.len() == TILE {
                let y0 = std::array::from_fn(|j| (rows.start + j) * kb);
                for (j, v) in group_dots::<TILE>(level, w, &y, y0).iter().enumerate() {
                    write(rows.start + j, v);
                }
            } else {
                for i in rows {
                    write(i, &group_dots::<1>(level, w, &y, [i * kb])[0]);
                }
            }
        };
        par::run(
            groups * tiles,
            m * n * kb >= PARALLEL_MIN_BLOCK_DOTS,
            |range| range.for_each(item),
        );
        Ok(())
    }
}

/// Dequantizes a block as candle does: `q · d + m`.
fn block_to_f32(b: &BlockQ4_1, out: &mut [f32]) {
    let d = f16::from_bits(b.d).to_f32();
    let m = f16::from_bits(b.m).to_f32();
    for j in 0..QK / 2 {
        out[j] = (b.qs[j] & 0x0F) as f32 * d + m;
        out[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
    }
}

/// Quantizes blocks as candle and ggml do (`quantize_row_q4_1`).
fn quantize_q4_1(xs: &[f32]) -> Vec<BlockQ4_1> {
    xs.chunks_exact(QK)
        .map(|block| {
            let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
            for &x in block {
                min = f32::min(x, min);
                max = f32::max(x, max);
            }
            let d = (max - min) / ((1 << 4) - 1) as f32;
            let id = if d != 0f32 { 1. / d } else { 0. };
            let mut b = BlockQ4_1 {
                d: f16::from_f32(d).to_bits(),
                m: f16::from_f32(min).to_bits(),
                qs: [0; QK / 2],
            };
            for j in 0..QK / 2 {
                let x0 = u8::min(15, ((block[j] - min) * id + 0.5) as u8);
                let x1 = u8::min(15, ((block[QK / 2 + j] - min) * id + 0.5) as u8);
                b.qs[j] = x0 | (x1 << 4);
            }
            b
        })
        .collect()
}

impl QuantizedType for FastQ4_1 {
    fn dtype(&self) -> GgmlDType {
        GgmlDType::Q4_1
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        self.matmul(mkn, lhs, dst, Level::detect())
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
        if rows != self.rows || hidden != self.kb * QK {
            candle_core::bail!("q4_1 embedding: {rows} x {hidden} does not match the weights");
        }
        let mut out = vec![0f32; ids.len() * hidden];
        for (row_out, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("q4_1 embedding: id {id} out of {rows} rows");
            }
            for (b, chunk) in row_out.chunks_exact_mut(QK).enumerate() {
                block_to_f32(&self.block(id, b), chunk);
            }
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        if elem_count != self.n_blocks() * QK {
            candle_core::bail!(
                "q4_1 dequantize: {elem_count} elements, {} blocks",
                self.n_blocks()
            );
        }
        let mut out = vec![0f32; elem_count];
        for (b, chunk) in self.blocks().zip(out.chunks_exact_mut(QK)) {
            block_to_f32(&b, chunk);
        }
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.n_blocks() * std::mem::size_of::<BlockQ4_1>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.gguf
            .get_or_init(|| {
                let mut bytes = vec![0u8; self.storage_size_in_bytes()];
                for (b, out) in self.blocks().zip(bytes.chunks_exact_mut(20)) {
                    b.write_bytes(out);
                }
                bytes
            })
            .as_ptr()
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        let blocks = quantize_q4_1(xs);
        let kb = if self.kb > 0 && blocks.len().is_multiple_of(self.kb) {
            self.kb
        } else {
            blocks.len()
        };
        let rows = blocks.len().checked_div(kb).unwrap_or(0);
        *self = Self::new(&blocks, rows, kb);
    }

    fn from_float_imatrix(&mut self, xs: &[f32], _imatrix_weights: &[f32], _n_per_row: usize) {
        self.from_float(xs);
    }

    fn size(&self) -> usize {
        self.n_blocks()
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

    fn fast(w: &Tensor) -> FastQ4_1 {
        let (n, k) = w.dims2().unwrap();
        let q = QTensor::quantize(w, GgmlDType::Q4_1).unwrap();
        let blocks: Vec<BlockQ4_1> = q
            .data()
            .unwrap()
            .chunks_exact(20)
            .map(BlockQ4_1::from_bytes)
            .collect();
        FastQ4_1::new(&blocks, n, k / QK)
    }

    #[test]
    fn equals_candles_kernel_bit_for_bit() {
        // Row counts with and without a tail past the last group of eight;
        // one activation row (decode), a tile and a remainder, many (prefill,
        // which runs on the pool).
        for (n, k) in [(40, 576), (64, 32), (33, 1536), (96, 256 + 32), (7, 64)] {
            let w = weights(n, k, (n * k) as u64);
            let reference =
                QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
            let fast = QMatMul::from_qtensor(
                accelerate(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap(),
            )
            .unwrap();
            for m in [1, 3, 4, 17, 70] {
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
    fn every_instruction_set_gives_the_same_bits() {
        let (n, k) = (20, 800);
        let w = fast(&weights(n, k, 3));
        let x = weights(5, k, 9)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut reference = vec![0f32; 5 * n];
        w.matmul((5, k, n), &x, &mut reference, Level::Scalar)
            .unwrap();
        for level in Level::available() {
            let mut out = vec![0f32; 5 * n];
            w.matmul((5, k, n), &x, &mut out, level).unwrap();
            assert_eq!(
                reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{level:?}"
            );
        }
    }

    #[test]
    fn the_split_between_threads_never_changes_the_bits() {
        // The pool runs a loop size alone or split, as its timings say, and
        // probes the other way every few hundred loops: 1,200 runs of the
        // same product cover both, and each must give the same bits.
        let (n, k, m) = (512, 576, 4);
        let w = fast(&weights(n, k, 5));
        let x = weights(m, k, 6)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut first = vec![0f32; m * n];
        w.forward(&x, m, &mut first).unwrap();
        let mut out = vec![0f32; m * n];
        for _ in 0..1_200 {
            w.forward(&x, m, &mut out).unwrap();
            assert!(
                first
                    .iter()
                    .zip(&out)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    #[test]
    fn extreme_activations_do_not_overflow() {
        // All-15 weights against ±127 activations: the largest block sums.
        let (n, k) = (16, 64);
        let w = Tensor::from_vec(
            (0..n * k)
                .map(|i| if i % 7 == 0 { 0.0 } else { 1.0 })
                .collect::<Vec<f32>>(),
            (n, k),
            &Device::Cpu,
        )
        .unwrap();
        let reference =
            QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let fast = QMatMul::from_qtensor(
            accelerate(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap(),
        )
        .unwrap();
        for sign in [1f32, -1.0] {
            let x = Tensor::from_vec(vec![sign; 2 * k], (1, 2, k), &Device::Cpu).unwrap();
            assert_eq!(
                bits(&reference.forward(&x).unwrap()),
                bits(&fast.forward(&x).unwrap())
            );
        }
    }

    #[test]
    fn dequantize_embedding_and_data_keep_the_gguf_layout() {
        for n in [8, 13] {
            let w = weights(n, 64, 5);
            let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
            let fast = accelerate(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
            assert_eq!(q.data().unwrap(), fast.data().unwrap());
            assert_eq!(
                bits(&q.dequantize(&Device::Cpu).unwrap()),
                bits(&fast.dequantize(&Device::Cpu).unwrap())
            );
            let ids = Tensor::new(&[0u32, (n - 1) as u32, 3], &Device::Cpu).unwrap();
            let a = candle_core::quantized::QTensor::embedding(&q, &ids).unwrap();
            let b = fast.embedding(&ids).unwrap();
            assert_eq!(bits(&a), bits(&b));
        }
    }
}
