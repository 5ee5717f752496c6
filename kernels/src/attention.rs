//! Attention of one new position against a key/value cache, bit-identical to
//! the candle ops candle-transformers' `quantized_llama` runs for it:
//!
//! ```text
//! k, v = repeat_kv(k, v)                        (each head reads its group's cache)
//! att  = q.matmul(k.t()) / sqrt(head_dim)       (gemm, then an affine op)
//! att  = softmax_last_dim(att)
//! y    = att.matmul(v)                          (gemm)
//! ```
//!
//! candle's CPU matmul is the `gemm` crate, whose result depends on the path
//! it picks for a shape: with one query row, `q·kᵀ` goes through its
//! "horizontal" kernel (eight-lane fused multiply-add chains, then a fixed
//! reduction) while `m·n ≤ 256`, and through its row-major gemv (eight
//! accumulators of eight lanes, a tree, then the lanes in order) beyond;
//! `att·v` goes through its column-major gemv (one fused multiply-add chain
//! per output over the positions), or its `k ≤ 2` kernel (unfused) for one
//! or two positions. The softmax is candle's: a sequential max, `exp`, its
//! AVX sum (four eight-lane accumulators and a fixed reduction), a division.
//! This module computes each of those with the same operations in the same
//! order, on x86 CPUs where `gemm` uses its FMA kernels (with AVX2 for
//! candle's sum); elsewhere [`available`] is false and callers use candle.
//! The tests compare with candle's ops for every cache length up to 600.
#![allow(unsafe_code)]

use std::ops::Range;

use crate::par;

/// Whether [`attend_one`] can run on this CPU (and so gives candle's bits).
#[must_use]
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The shape of a decode attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`n_head` is a multiple).
    pub n_kv_head: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// Attention of one position: `q` holds `n_head · head_dim` values (after the
/// rotary embedding); `k[h]` and `v[h]` hold key/value head `h`'s `head_dim`
/// values for each of positions `0..len` (the new one last); `out` receives
/// `n_head · head_dim`.
///
/// # Panics
/// When [`available`] is false or the shapes do not fit.
pub fn attend_one(
    q: &[f32],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    len: usize,
    heads: Heads,
    out: &mut [f32],
) {
    let Heads {
        n_head,
        n_kv_head,
        head_dim: hd,
    } = heads;
    assert!(available(), "attention: this CPU has no FMA/AVX2 kernels");
    assert!(
        len > 0
            && n_kv_head > 0
            && n_head.is_multiple_of(n_kv_head)
            && q.len() == n_head * hd
            && out.len() == n_head * hd
            && k.len() == n_kv_head
            && v.len() == n_kv_head
            && k.iter().chain(v).all(|h| h.len() >= len * hd),
        "attention: shapes do not fit"
    );
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let shared = par::SharedOut::new(out);
    let head = |h: usize, scores: &mut Vec<f32>, y: &mut Vec<f32>| {
        let kv = h / (n_head / n_kv_head);
        let q = &q[h * hd..(h + 1) * hd];
        let (k, v) = (&k[kv][..], &v[kv][..]);
        let (stride, off) = (hd, 0);
        y.clear();
        y.resize(hd, 0.0);
        #[cfg(target_arch = "x86_64")]
        // SAFETY (each call): `available()` (asserted above) means AVX2 and FMA.
        match hd {
            32 => unsafe { x86::head::<4>(q, k, v, len, stride, off, scale, scores, y) },
            64 => unsafe { x86::head::<8>(q, k, v, len, stride, off, scale, scores, y) },
            80 => unsafe { x86::head::<10>(q, k, v, len, stride, off, scale, scores, y) },
            96 => unsafe { x86::head::<12>(q, k, v, len, stride, off, scale, scores, y) },
            128 => unsafe { x86::head::<16>(q, k, v, len, stride, off, scale, scores, y) },
            _ => {
                let row = |p: usize| p * stride + off..p * stride + off + hd;
                scores.clear();
                unsafe { x86::scores(q, len, |p| &k[row(p)], scale, scores) };
                unsafe { x86::softmax(scores) };
                unsafe { x86::weighted_sum(scores, |p| &v[row(p)], y) };
            }
        }
        // SAFETY: head `h`'s outputs are written by this item alone.
        unsafe { shared.write(h * hd, y) };
    };
    let run = |range: Range<usize>| {
        let (mut scores, mut y) = (Vec::with_capacity(len), Vec::new());
        for h in range {
            head(h, &mut scores, &mut y);
        }
    };
    par::run(n_head, n_head * len * hd >= 16 * 1024, run);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Up to eight values, zero beyond the slice (gemm's masked partial load).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load(x: &[f32]) -> __m256 {
        if x.len() >= 8 {
            // SAFETY: at least 8 f32 readable; unaligned load.
            unsafe { _mm256_loadu_ps(x.as_ptr()) }
        } else {
            let mut buf = [0f32; 8];
            buf[..x.len()].copy_from_slice(x);
            // SAFETY: `buf` holds 8 f32; unaligned load.
            unsafe { _mm256_loadu_ps(buf.as_ptr()) }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn lanes(v: __m256) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 f32; unaligned store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    /// gemm's horizontal kernel for one output (`m·n ≤ 256`), before its
    /// reduction: an eight-lane fused chain over the depth (a partial last
    /// chunk reads zeros, as gemm's masked load does).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn chain_horizontal(q: &[f32], k: &[f32]) -> __m256 {
        let mut acc = _mm256_setzero_ps();
        for (a, b) in q.chunks(8).zip(k.chunks(8)) {
            acc = _mm256_fmadd_ps(load(a), load(b), acc);
        }
        acc
    }

    /// gemm's horizontal reduction: `((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7))`,
    /// of lane vectors `t[l]` (one output per lane).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn reduce_horizontal(t: &[__m256; 8]) -> __m256 {
        _mm256_add_ps(
            _mm256_add_ps(_mm256_add_ps(t[0], t[4]), _mm256_add_ps(t[2], t[6])),
            _mm256_add_ps(_mm256_add_ps(t[1], t[5]), _mm256_add_ps(t[3], t[7])),
        )
    }

    /// gemm's row-major gemv for one output, before its lane sum: eight
    /// accumulators over blocks of 64 summed as a tree, then eight-lane
    /// steps into the first. Returns the vector and the depth reached.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn chain_gemv(q: &[f32], k: &[f32]) -> (__m256, usize) {
        let n = q.len();
        let (n64, n8) = (n / 64 * 64, n / 8 * 8);
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut depth = 0;
        while depth < n64 {
            for (j, a) in acc.iter_mut().enumerate() {
                let at = depth + 8 * j;
                *a = _mm256_fmadd_ps(load(&k[at..at + 8]), load(&q[at..at + 8]), *a);
            }
            depth += 64;
        }
        let a01 = _mm256_add_ps(acc[0], acc[1]);
        let a23 = _mm256_add_ps(acc[2], acc[3]);
        let a45 = _mm256_add_ps(acc[4], acc[5]);
        let a67 = _mm256_add_ps(acc[6], acc[7]);
        let mut a0 = _mm256_add_ps(_mm256_add_ps(a01, a23), _mm256_add_ps(a45, a67));
        while depth < n8 {
            a0 = _mm256_fmadd_ps(load(&k[depth..depth + 8]), load(&q[depth..depth + 8]), a0);
            depth += 8;
        }
        (a0, depth)
    }

    /// gemm's lane sum of the gemv, lanes in order, of lane vectors `t[l]`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn reduce_gemv(t: &[__m256; 8]) -> __m256 {
        let mut s = t[0];
        for &x in &t[1..] {
            s = _mm256_add_ps(s, x);
        }
        s
    }

    /// `v[i]` lane `l` becomes `t[l]` lane `i`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn transpose(v: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(v[0], v[1]);
        let t1 = _mm256_unpackhi_ps(v[0], v[1]);
        let t2 = _mm256_unpacklo_ps(v[2], v[3]);
        let t3 = _mm256_unpackhi_ps(v[2], v[3]);
        let t4 = _mm256_unpacklo_ps(v[4], v[5]);
        let t5 = _mm256_unpackhi_ps(v[4], v[5]);
        let t6 = _mm256_unpacklo_ps(v[6], v[7]);
        let t7 = _mm256_unpackhi_ps(v[6], v[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// The scaled scores of one head against `len` cached keys, eight
    /// positions at a time (each position's arithmetic is its own).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scores<'a>(
        q: &[f32],
        len: usize,
        key: impl Fn(usize) -> &'a [f32],
        scale: f32,
        out: &mut Vec<f32>,
    ) {
        // gemm takes its horizontal kernel while m·n = len ≤ 16·16.
        let horizontal = len <= 256;
        out.resize(len, 0.0);
        let (scale_v, zero) = (_mm256_set1_ps(scale), _mm256_setzero_ps());
        for (p0, chunk) in out.chunks_mut(8).enumerate() {
            let p0 = p0 * 8;
            let n = chunk.len();
            let mut vecs = [_mm256_setzero_ps(); 8];
            let mut depth = q.len();
            for (i, v) in vecs.iter_mut().enumerate().take(n) {
                *v = if horizontal {
                    chain_horizontal(q, key(p0 + i))
                } else {
                    let (v, d) = chain_gemv(q, key(p0 + i));
                    depth = d;
                    v
                };
            }
            let t = transpose(vecs);
            let s = if horizontal {
                reduce_horizontal(&t)
            } else {
                reduce_gemv(&t)
            };
            let mut sums = lanes(s);
            if !horizontal {
                // The gemv's scalar tail (fused), then its multiply by beta = 1.
                for (i, sum) in sums.iter_mut().enumerate().take(n) {
                    let k = key(p0 + i);
                    for d in depth..q.len() {
                        *sum = k[d].mul_add(q[d], *sum);
                    }
                    *sum *= 1.0;
                }
            }
            // candle's affine op: `x · mul + add`.
            let scaled = lanes(_mm256_add_ps(_mm256_mul_ps(load(&sums), scale_v), zero));
            chunk.copy_from_slice(&scaled[..n]);
        }
    }

    /// `att·v` for one head, as gemm computes a one-row product: its `k ≤ 2`
    /// kernel (plain multiplies and adds) for one or two positions, its
    /// column-major gemv beyond (per output, the first product, then a fused
    /// multiply-add chain over the positions in order).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weighted_sum<'a>(att: &[f32], v: impl Fn(usize) -> &'a [f32], y: &mut [f32]) {
        match att.len() {
            1 => {
                for (o, &x) in y.iter_mut().zip(v(0)) {
                    *o = att[0] * x;
                }
            }
            2 => {
                for ((o, &x0), &x1) in y.iter_mut().zip(v(0)).zip(v(1)) {
                    *o = att[1] * x1 + att[0] * x0;
                }
            }
            _ => {
                // Sixty-four outputs at a time in eight registers.
                for (g, out) in y.chunks_mut(64).enumerate() {
                    let cols = g * 64..g * 64 + out.len();
                    let lanes8 = out.len() / 8;
                    let mut acc = [_mm256_setzero_ps(); 8];
                    let first = _mm256_set1_ps(att[0]);
                    let v0 = &v(0)[cols.clone()];
                    for (i, a) in acc.iter_mut().enumerate().take(lanes8) {
                        *a = _mm256_mul_ps(load(&v0[8 * i..8 * i + 8]), first);
                    }
                    for o in lanes8 * 8..out.len() {
                        out[o] = v0[o] * att[0];
                    }
                    for (p, &w) in att.iter().enumerate().skip(1) {
                        let vp = &v(p)[cols.clone()];
                        let wv = _mm256_set1_ps(w);
                        for (i, a) in acc.iter_mut().enumerate().take(lanes8) {
                            *a = _mm256_fmadd_ps(load(&vp[8 * i..8 * i + 8]), wv, *a);
                        }
                        for o in lanes8 * 8..out.len() {
                            out[o] = vp[o].mul_add(w, out[o]);
                        }
                    }
                    for (i, a) in acc.iter().enumerate().take(lanes8) {
                        out[8 * i..8 * i + 8].copy_from_slice(&lanes(*a));
                    }
                }
            }
        }
    }

    /// Eight f32 from an array (no bounds to check).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load8(x: &[f32; 8]) -> __m256 {
        // SAFETY: `x` is 8 f32; unaligned load.
        unsafe { _mm256_loadu_ps(x.as_ptr()) }
    }

    /// The `8 · NV` values at `at` as eight-value chunks.
    #[inline]
    fn row<const NV: usize>(x: &[f32], at: usize) -> &[[f32; 8]; NV] {
        let (chunks, _) = x[at..at + 8 * NV].as_chunks::<8>();
        match chunks.try_into() {
            Ok(row) => row,
            Err(_) => unreachable!("a row of {NV} chunks"),
        }
    }

    /// One head's attention for `head_dim = 8 · NV`: the same arithmetic as
    /// [`scores`], [`softmax`] and [`weighted_sum`], with the rows read in
    /// place (keys and values of this head at `off` in rows of `stride`).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn head<const NV: usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        len: usize,
        stride: usize,
        off: usize,
        scale: f32,
        scores: &mut Vec<f32>,
        y: &mut [f32],
    ) {
        let q: &[[f32; 8]; NV] = row(q, 0);
        let qv: [__m256; NV] = std::array::from_fn(|j| load8(&q[j]));
        scores.clear();
        scores.resize(len, 0.0);
        let horizontal = len <= 256;
        let (scale_v, zero) = (_mm256_set1_ps(scale), _mm256_setzero_ps());
        for (c, chunk) in scores.chunks_mut(8).enumerate() {
            let mut vecs = [zero; 8];
            for (i, out) in vecs.iter_mut().enumerate().take(chunk.len()) {
                let kr: &[[f32; 8]; NV] = row(k, (c * 8 + i) * stride + off);
                *out = if horizontal {
                    let mut acc = zero;
                    for j in 0..NV {
                        acc = _mm256_fmadd_ps(qv[j], load8(&kr[j]), acc);
                    }
                    acc
                } else {
                    let mut acc = [zero; 8];
                    for b in 0..NV / 8 {
                        for (j, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(load8(&kr[8 * b + j]), qv[8 * b + j], *a);
                        }
                    }
                    let a01 = _mm256_add_ps(acc[0], acc[1]);
                    let a23 = _mm256_add_ps(acc[2], acc[3]);
                    let a45 = _mm256_add_ps(acc[4], acc[5]);
                    let a67 = _mm256_add_ps(acc[6], acc[7]);
                    let mut a0 = _mm256_add_ps(_mm256_add_ps(a01, a23), _mm256_add_ps(a45, a67));
                    for j in NV / 8 * 8..NV {
                        a0 = _mm256_fmadd_ps(load8(&kr[j]), qv[j], a0);
                    }
                    a0
                };
            }
            let t = transpose(vecs);
            let s = if horizontal {
                reduce_horizontal(&t)
            } else {
                // The lanes in order, then the gemv's multiply by beta = 1.
                _mm256_mul_ps(reduce_gemv(&t), _mm256_set1_ps(1.0))
            };
            let scaled = lanes(_mm256_add_ps(_mm256_mul_ps(s, scale_v), zero));
            chunk.copy_from_slice(&scaled[..chunk.len()]);
        }
        softmax(scores);
        let att = &scores[..];
        let out: &mut [[f32; 8]] = y.as_chunks_mut::<8>().0;
        match len {
            1 => {
                let (a0, v0) = (_mm256_set1_ps(att[0]), row::<NV>(v, off));
                for (o, x) in out.iter_mut().zip(v0) {
                    *o = lanes(_mm256_mul_ps(a0, load8(x)));
                }
            }
            2 => {
                let (a0, v0) = (_mm256_set1_ps(att[0]), row::<NV>(v, off));
                let (a1, v1) = (_mm256_set1_ps(att[1]), row::<NV>(v, stride + off));
                for ((o, x0), x1) in out.iter_mut().zip(v0).zip(v1) {
                    let p1 = _mm256_mul_ps(a1, load8(x1));
                    *o = lanes(_mm256_add_ps(p1, _mm256_mul_ps(a0, load8(x0))));
                }
            }
            _ => {
                let v0 = row::<NV>(v, off);
                let a0 = _mm256_set1_ps(att[0]);
                let mut acc: [__m256; NV] =
                    std::array::from_fn(|j| _mm256_mul_ps(load8(&v0[j]), a0));
                for (p, &w) in att.iter().enumerate().skip(1) {
                    let vp = row::<NV>(v, p * stride + off);
                    let wv = _mm256_set1_ps(w);
                    for (a, x) in acc.iter_mut().zip(vp) {
                        *a = _mm256_fmadd_ps(load8(x), wv, *a);
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = lanes(a);
                }
            }
        }
    }

    /// candle's CPU softmax of one row, in place.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax(x: &mut [f32]) {
        let mut max = x[0];
        for &v in &x[1..] {
            max = max.max(v);
        }
        for v in x.iter_mut() {
            *v = (*v - max).exp();
        }
        let sum = vec_sum(x);
        for v in x.iter_mut() {
            *v /= sum;
        }
    }

    /// candle's AVX `vec_sum`: four eight-lane accumulators over steps of 32,
    /// reduced in a fixed order, then the tail in order.
    #[target_feature(enable = "avx2,fma")]
    fn vec_sum(x: &[f32]) -> f32 {
        let np = x.len() & !31;
        let mut acc = [_mm256_setzero_ps(); 4];
        for chunk in x[..np].chunks_exact(32) {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, load(&chunk[8 * j..8 * j + 8]));
            }
        }
        let x0 = _mm256_add_ps(acc[0], acc[1]);
        let x2 = _mm256_add_ps(acc[2], acc[3]);
        let x0 = _mm256_add_ps(x0, x2);
        let t0 = _mm_add_ps(_mm256_castps256_ps128(x0), _mm256_extractf128_ps(x0, 1));
        let t1 = _mm_hadd_ps(t0, t0);
        let mut s = _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
        for &v in &x[np..] {
            s += v;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// quantized_llama's ops for one position.
    fn reference(q: &[f32], k: &[f32], v: &[f32], len: usize, h: Heads) -> Vec<f32> {
        let dev = Device::Cpu;
        let rep = h.n_head / h.n_kv_head;
        let q = Tensor::from_slice(q, (1, 1, h.n_head, h.head_dim), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let kv = |x: &[f32]| {
            let t = Tensor::from_slice(
                &x[..len * h.n_kv_head * h.head_dim],
                (1, len, h.n_kv_head, h.head_dim),
                &dev,
            )
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
            Tensor::cat(&vec![&t; rep], 2)
                .unwrap()
                .reshape((1, h.n_head, len, h.head_dim))
                .unwrap()
        };
        let (k, v) = (kv(k), kv(v));
        let att = (q.matmul(&k.t().unwrap()).unwrap() / (h.head_dim as f64).sqrt()).unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
        att.matmul(&v.contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn equals_candles_ops_at_every_length() {
        if !available() {
            return;
        }
        for heads in [
            Heads {
                n_head: 9,
                n_kv_head: 3,
                head_dim: 64,
            },
            Heads {
                n_head: 4,
                n_kv_head: 4,
                head_dim: 36,
            },
            Heads {
                n_head: 4,
                n_kv_head: 2,
                head_dim: 128,
            },
            Heads {
                n_head: 2,
                n_kv_head: 1,
                head_dim: 96,
            },
            Heads {
                n_head: 2,
                n_kv_head: 2,
                head_dim: 32,
            },
        ] {
            let max = 600;
            let width = heads.n_kv_head * heads.head_dim;
            let (k, v) = (values(max * width, 1), values(max * width, 2));
            let lengths = (1..=40).chain((250..=262).chain([300, 513, 600]));
            for len in lengths {
                let q = values(heads.n_head * heads.head_dim, len as u64);
                let mut out = vec![0f32; q.len()];
                let by_head = |x: &[f32]| -> Vec<Vec<f32>> {
                    (0..heads.n_kv_head)
                        .map(|h| {
                            x.chunks_exact(width)
                                .flat_map(|row| &row[h * heads.head_dim..(h + 1) * heads.head_dim])
                                .copied()
                                .collect()
                        })
                        .collect()
                };
                attend_one(&q, &by_head(&k), &by_head(&v), len, heads, &mut out);
                let expect = reference(&q, &k, &v, len, heads);
                assert_eq!(
                    out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    expect.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{heads:?} len={len}"
                );
            }
        }
    }
}
