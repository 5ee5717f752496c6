//! A faster Q8_0 matmul for candle's CPU backend, bit-identical to candle's own
//! (the lm head of models whose embeddings are Q8_0, tied or not).
//!
//! On x86 CPUs with AVX2 and FMA, candle 0.11 multiplies Q8_0 weights by
//! quantizing the activations to Q8_0 and running one row at a time through
//! `vec_dot_q8_0_q8_0`: eight f32 lanes per row, lane `l` accumulating, block
//! by block, `fma(d_x·d_y, Σ x[4l..4l+4]·y[4l..4l+4], acc_l)`, then the lanes
//! summed as `((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7))`. This module keeps those
//! sixty-four accumulators of eight rows in eight registers (register `l`
//! holds lane `l` of the eight rows), so every row sees the very same
//! operations in the same order, and one weight load serves eight rows.
//!
//! Layout: rows in groups of eight; for each block position a group holds the
//! rows' quants interleaved in four-byte runs (`qs[4l..4l+4]` of rows 0..8,
//! for l = 0..8) stored as `q + 128` (unsigned), then the eight scales: 272
//! bytes, the size of eight GGUF blocks. The last group is padded with zero
//! rows when the row count is not a multiple of eight. The GGUF bytes are
//! rebuilt on demand for `data()`.
//!
//! Only applied where candle itself would take that path: on CPUs with AVX2
//! and FMA (elsewhere candle runs a scalar loop with other rounding) and for
//! widths that are not a multiple of 256 (candle repacks those for AVX-512).
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
/// Bytes of one GGUF Q8_0 block.
const BLOCK_BYTES: usize = 34;

/// The blocks at one position of eight consecutive rows, interleaved (see the
/// module docs).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(16))]
struct Group {
    /// Quants plus 128.
    qs: [u8; ROWS * QK],
    d: [u16; ROWS],
}
const _: () = assert!(std::mem::size_of::<Group>() == ROWS * BLOCK_BYTES);

impl Group {
    /// Interleaves up to eight rows' blocks (GGUF bytes); missing rows are zero.
    fn new(blocks: &[&[u8]]) -> Self {
        let mut g = Self {
            qs: [0x80; ROWS * QK],
            d: [0; ROWS],
        };
        for (r, b) in blocks.iter().enumerate() {
            g.d[r] = u16::from_le_bytes([b[0], b[1]]);
            for l in 0..QK / 4 {
                for j in 0..4 {
                    g.qs[l * 4 * ROWS + r * 4 + j] = b[2 + 4 * l + j] ^ 0x80;
                }
            }
        }
        g
    }

    /// Row `r`'s block in GGUF bytes.
    fn write_block(&self, r: usize, out: &mut [u8]) {
        out[0..2].copy_from_slice(&self.d[r].to_le_bytes());
        for l in 0..QK / 4 {
            for j in 0..4 {
                out[2 + 4 * l + j] = self.qs[l * 4 * ROWS + r * 4 + j] ^ 0x80;
            }
        }
    }
}

/// Q8_0 weights `(n, k)` with a SIMD matmul.
pub struct FastQ8_0 {
    rows: usize,
    /// Blocks per row.
    kb: usize,
    /// `rows.div_ceil(8)` groups of rows, each `kb` [`Group`]s in block order.
    groups: Pages<Group>,
    /// The GGUF bytes, built when first asked for.
    gguf: OnceLock<Vec<u8>>,
}

impl std::fmt::Debug for FastQ8_0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastQ8_0")
            .field("rows", &self.rows)
            .field("blocks_per_row", &self.kb)
            .finish_non_exhaustive()
    }
}

impl FastQ8_0 {
    /// Lays out `data`, `rows` rows of `kb` GGUF blocks.
    fn new(data: &[u8], rows: usize, kb: usize) -> Self {
        let block = |row: usize, b: usize| {
            let at = (row * kb + b) * BLOCK_BYTES;
            &data[at..at + BLOCK_BYTES]
        };
        let groups = Pages::from_fn(rows.div_ceil(ROWS) * kb, |i| {
            let (g, b) = (i / kb, i % kb);
            let blocks: Vec<&[u8]> = (g * ROWS..rows.min((g + 1) * ROWS))
                .map(|r| block(r, b))
                .collect();
            Group::new(&blocks)
        });
        Self {
            rows,
            kb,
            groups,
            gguf: OnceLock::new(),
        }
    }

    fn n_blocks(&self) -> usize {
        self.rows * self.kb
    }

    /// Row `row`, block `b`, in GGUF bytes.
    fn write_block(&self, row: usize, b: usize, out: &mut [u8]) {
        self.groups[(row / ROWS) * self.kb + b].write_block(row % ROWS, out);
    }

    /// Dequantizes row `row` as candle does: `q · d`.
    fn row_to_f32(&self, row: usize, out: &mut [f32]) {
        let mut bytes = [0u8; BLOCK_BYTES];
        for (b, chunk) in out.chunks_exact_mut(QK).enumerate() {
            self.write_block(row, b, &mut bytes);
            let d = f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32();
            for (o, &q) in chunk.iter_mut().zip(&bytes[2..]) {
                *o = q as i8 as f32 * d;
            }
        }
    }
}

/// The instruction sets a matmul may use, detected at run time. Both give
/// candle's AVX2 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Level {
    /// `None` where candle does not run its AVX2 kernel: the weights then stay candle's.
    fn detect() -> Option<Self> {
        static LEVEL: OnceLock<Option<Level>> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") && has!("f16c") {
                    if has!("avx512vnni") && has!("avx512vl") {
                        return Some(Level::Vnni);
                    }
                    return Some(Level::Avx2);
                }
            }
            None
        })
    }
}

impl FastQ8_0 {
    /// A CPU Q8_0 matrix in this layout, where that gives candle's bits (see
    /// the module docs); `None` otherwise.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q8_0
            || !t.device().is_cpu()
            || t.rank() != 2
            || Level::detect().is_none()
        {
            return Ok(None);
        }
        let (rows, k) = t.shape().dims2()?;
        if !k.is_multiple_of(QK) || k.is_multiple_of(256) {
            return Ok(None);
        }
        let data = t.data()?;
        if data.len() != rows * (k / QK) * BLOCK_BYTES {
            candle_core::bail!("q8_0: {} bytes for a ({rows}, {k}) tensor", data.len());
        }
        Ok(Some(Self::new(&data, rows, k / QK)))
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
        self.matmul_t((m, self.cols(), self.rows), lhs, dst)
    }

    /// Row `row` dequantized as candle does (its embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows || out.len() != self.cols() {
            candle_core::bail!("q8_0: row {row} of {} into {} values", self.rows, out.len());
        }
        self.row_to_f32(row, out);
        Ok(())
    }
}

/// Replaces a CPU Q8_0 tensor's storage with [`FastQ8_0`] where that gives
/// candle's bits (see the module docs); other tensors are returned as they are.
pub fn accelerate(t: QTensor) -> Result<QTensor> {
    match FastQ8_0::from_qtensor(&t)? {
        Some(fast) => {
            let shape = t.shape().clone();
            QTensor::new(QStorage::Cpu(Box::new(fast)), shape)
        }
        None => Ok(t),
    }
}

/// Activations quantized to Q8_0 as candle does, with what the kernel needs
/// per block: the scale as f32, and `-128 ·` the sum of each four quants.
struct Q8_0Rows {
    qs: Vec<[i8; QK]>,
    d: Vec<f32>,
    neg_sums: Vec<[i32; QK / 4]>,
}

/// Quantizes rows of `k` floats to Q8_0 exactly as candle's
/// `BlockQ8_0::from_float` does on x86.
fn quantize_q8_0(xs: &[f32]) -> Q8_0Rows {
    let blocks = crate::quant::quantize(xs);
    let neg_sums = blocks
        .qs
        .iter()
        .map(|q| {
            std::array::from_fn(|l| {
                -128 * q[4 * l..4 * l + 4].iter().map(|&v| v as i32).sum::<i32>()
            })
        })
        .collect();
    Q8_0Rows {
        d: blocks.d.iter().map(|d| d.to_f32()).collect(),
        qs: blocks.qs,
        neg_sums,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Group, Q8_0Rows, QK, ROWS};

    /// Four consecutive activation quants, as one 32-bit lane.
    #[inline(always)]
    fn quad(q: &[i8; QK], l: usize) -> i32 {
        i32::from_le_bytes([
            q[4 * l] as u8,
            q[4 * l + 1] as u8,
            q[4 * l + 2] as u8,
            q[4 * l + 3] as u8,
        ])
    }

    /// Lane `r`: the exact dot product of row `r`'s quants `4l..4l + 4` with
    /// the activations', as candle's `maddubs` sequence computes it.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn lane_sums_avx2(w: __m256i, y: &[i8; QK], _neg_sum: i32, l: usize) -> __m256i {
        let x = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        let yv = _mm256_set1_epi32(quad(y, l));
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(yv, x);
        _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy))
    }

    /// [`lane_sums_avx2`] with AVX-512 VNNI: `Σ (q + 128)·y - 128·Σ y`.
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    #[inline]
    fn lane_sums_vnni(w: __m256i, y: &[i8; QK], neg_sum: i32, l: usize) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_set1_epi32(neg_sum), w, _mm256_set1_epi32(quad(y, l)))
    }

    macro_rules! group_dot {
        ($name:ident, $features:literal, $sums:ident) => {
            /// The dot products of a group's eight rows with the activation
            /// row starting at block `y0`, lane `r` for row `r`.
            /// Callers must have checked the CPU features.
            #[target_feature(enable = $features)]
            pub(super) fn $name(group: &[Group], y: &Q8_0Rows, y0: usize) -> [f32; ROWS] {
                let kb = group.len();
                let (yq, yd, yn) = (
                    &y.qs[y0..y0 + kb],
                    &y.d[y0..y0 + kb],
                    &y.neg_sums[y0..y0 + kb],
                );
                let mut acc = [_mm256_setzero_ps(); QK / 4];
                for (b, g) in group.iter().enumerate() {
                    // SAFETY: `g.d` is 8 u16 (16 bytes); unaligned load.
                    let xd = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(g.d.as_ptr().cast()) });
                    // d_x · d_y, as candle multiplies them before broadcasting.
                    let d = _mm256_mul_ps(xd, _mm256_set1_ps(yd[b]));
                    for (l, a) in acc.iter_mut().enumerate() {
                        // SAFETY: `g.qs` is 256 bytes; bytes 32l..32l + 32 are
                        // in bounds for l < 8 (unaligned load).
                        let w = unsafe { _mm256_loadu_si256(g.qs.as_ptr().add(32 * l).cast()) };
                        let q = _mm256_cvtepi32_ps($sums(w, &yq[b], yn[b][l], l));
                        *a = _mm256_fmadd_ps(d, q, *a);
                    }
                }
                // candle's `hsum_float_8`, for eight rows at once.
                let s = _mm256_add_ps(
                    _mm256_add_ps(_mm256_add_ps(acc[4], acc[0]), _mm256_add_ps(acc[6], acc[2])),
                    _mm256_add_ps(_mm256_add_ps(acc[5], acc[1]), _mm256_add_ps(acc[7], acc[3])),
                );
                let mut out = [0f32; ROWS];
                // SAFETY: `out` holds 8 f32; unaligned store.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
                out
            }
        };
    }

    group_dot!(group_dot_avx2, "avx2,fma,f16c", lane_sums_avx2);
    group_dot!(
        group_dot_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        lane_sums_vnni
    );
}

fn group_dot(level: Level, group: &[Group], y: &Q8_0Rows, y0: usize) -> [f32; ROWS] {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::Avx2` is only chosen when AVX2, FMA and F16C were detected at run time.
        Level::Avx2 => unsafe { x86::group_dot_avx2(group, y, y0) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::Vnni` is only chosen when AVX2, FMA, F16C, AVX-512
        // VNNI and AVX-512 VL were detected at run time.
        Level::Vnni => unsafe { x86::group_dot_vnni(group, y, y0) },
    }
}

/// Below this many block dot products a matmul runs on the calling thread.
const PARALLEL_MIN_BLOCK_DOTS: usize = 4 * 1024;

impl FastQ8_0 {
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
                "q8_0 matmul: ({m}, {k}, {n}) does not fit {} rows of {} blocks",
                self.rows,
                kb
            );
        }
        let y = quantize_q8_0(lhs);
        let groups = n.div_ceil(ROWS);
        let out = SharedOut::new(dst);
        // Work items: (group, activation row), group-major.
        let item = |it: usize| {
            let (g, i) = (it / m, it % m);
            let v = group_dot(level, &self.groups[g * kb..(g + 1) * kb], &y, i * kb);
            let cols = ROWS.min(n - g * ROWS);
            // SAFETY: item (g, i) alone writes columns 8g..8g + 8 of row i.
            unsafe { out.write(i * n + g * ROWS, &v[..cols]) };
        };
        par::run(groups * m, m * n * kb >= PARALLEL_MIN_BLOCK_DOTS, |range| {
            range.for_each(item)
        });
        Ok(())
    }
}

impl QuantizedType for FastQ8_0 {
    fn dtype(&self) -> GgmlDType {
        GgmlDType::Q8_0
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        let Some(level) = Level::detect() else {
            candle_core::bail!("q8_0: this CPU cannot run the accelerated kernel");
        };
        self.matmul(mkn, lhs, dst, level)
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
            candle_core::bail!("q8_0 embedding: {rows} x {hidden} does not match the weights");
        }
        let mut out = vec![0f32; ids.len() * hidden];
        for (row_out, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            let id = id as usize;
            if id >= rows {
                candle_core::bail!("q8_0 embedding: id {id} out of {rows} rows");
            }
            self.row_to_f32(id, row_out);
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        if elem_count != self.n_blocks() * QK {
            candle_core::bail!(
                "q8_0 dequantize: {elem_count} elements, {} blocks",
                self.n_blocks()
            );
        }
        let mut out = vec![0f32; elem_count];
        for (row, chunk) in out.chunks_exact_mut(self.kb * QK).enumerate() {
            self.row_to_f32(row, chunk);
        }
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.n_blocks() * BLOCK_BYTES
    }

    fn as_ptr(&self) -> *const u8 {
        self.gguf
            .get_or_init(|| {
                let mut bytes = vec![0u8; self.storage_size_in_bytes()];
                for (i, out) in bytes.chunks_exact_mut(BLOCK_BYTES).enumerate() {
                    self.write_block(i / self.kb, i % self.kb, out);
                }
                bytes
            })
            .as_ptr()
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        let y = quantize_q8_0(xs);
        let nb = y.qs.len();
        let mut bytes = vec![0u8; nb * BLOCK_BYTES];
        for (i, out) in bytes.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            out[0..2].copy_from_slice(&f16::from_f32(y.d[i]).to_bits().to_le_bytes());
            for (o, &q) in out[2..].iter_mut().zip(&y.qs[i]) {
                *o = q as u8;
            }
        }
        let kb = if self.kb > 0 && nb.is_multiple_of(self.kb) {
            self.kb
        } else {
            nb
        };
        let rows = nb.checked_div(kb).unwrap_or(0);
        *self = Self::new(&bytes, rows, kb);
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

    fn both(w: &Tensor) -> (QMatMul, QMatMul) {
        let q = || QTensor::quantize(w, GgmlDType::Q8_0).unwrap();
        (
            QMatMul::from_qtensor(q()).unwrap(),
            QMatMul::from_qtensor(accelerate(q()).unwrap()).unwrap(),
        )
    }

    #[test]
    fn equals_candles_kernel_bit_for_bit() {
        // Tails past the last group of eight, widths of one block and many;
        // one activation row (decode), several (batched decode, prefill).
        for (n, k) in [(40, 576), (64, 32), (33, 1536 + 32), (7, 64), (200, 96)] {
            let w = weights(n, k, (n * k) as u64);
            let (reference, fast) = both(&w);
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
    fn both_instruction_sets_give_the_same_bits() {
        let Some(best) = Level::detect() else {
            return;
        };
        let (n, k) = (24, 320);
        let q = QTensor::quantize(&weights(n, k, 3), GgmlDType::Q8_0).unwrap();
        let w = FastQ8_0::new(&q.data().unwrap(), n, k / QK);
        let x = weights(2, k, 9)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut reference = vec![0f32; 2 * n];
        w.matmul((2, k, n), &x, &mut reference, Level::Avx2)
            .unwrap();
        let mut out = vec![0f32; 2 * n];
        w.matmul((2, k, n), &x, &mut out, best).unwrap();
        assert_eq!(
            reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn extreme_weights_give_candles_bits() {
        // Raw GGUF blocks with quants of -128 and 127 (which candle's own
        // quantizer never writes) and activations at both ends.
        let (n, k) = (16, 64);
        let mut data = Vec::new();
        for i in 0..n * k / QK {
            data.extend_from_slice(&f16::from_f32(0.01 * (i + 1) as f32).to_bits().to_le_bytes());
            data.extend((0..QK).map(|j| if (i + j) % 3 == 0 { 0x80u8 } else { 0x7F }));
        }
        let raw = || {
            candle_core::quantized::ggml_file::qtensor_from_ggml(
                GgmlDType::Q8_0,
                &data,
                vec![n, k],
                &Device::Cpu,
            )
            .unwrap()
        };
        let (q, fast) = (raw(), accelerate(raw()).unwrap());
        assert_eq!(q.data().unwrap(), fast.data().unwrap());
        let (a, b) = (
            QMatMul::from_qtensor(q).unwrap(),
            QMatMul::from_qtensor(fast).unwrap(),
        );
        for sign in [1f32, -1.0] {
            let x = Tensor::from_vec(
                (0..2 * k)
                    .map(|i| sign * (1.0 + (i % 5) as f32))
                    .collect::<Vec<_>>(),
                (1, 2, k),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(bits(&a.forward(&x).unwrap()), bits(&b.forward(&x).unwrap()));
        }
    }

    #[test]
    fn dequantize_embedding_and_data_keep_the_gguf_layout() {
        for n in [8, 13] {
            let w = weights(n, 64 + 32, 5);
            let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let fast = accelerate(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
            assert_eq!(q.data().unwrap(), fast.data().unwrap());
            assert_eq!(
                bits(&q.dequantize(&Device::Cpu).unwrap()),
                bits(&fast.dequantize(&Device::Cpu).unwrap())
            );
            let ids = Tensor::new(&[0u32, (n - 1) as u32, 3], &Device::Cpu).unwrap();
            assert_eq!(
                bits(&q.embedding(&ids).unwrap()),
                bits(&fast.embedding(&ids).unwrap())
            );
        }
    }
}
