//! The per-element operations of a llama layer on plain `f32` slices, each
//! with exactly the arithmetic of the candle op it replaces (same operations
//! in the same order, no fused multiply-add where candle has none), so that a
//! layer built from them gives candle's bits without a tensor, an allocation
//! or a thread-pool round trip per op. The tests compare each with candle's.
#![allow(unsafe_code)] // disjoint writes of row-parallel loops (see `par::SharedOut`)

use std::ops::Range;

use crate::par;

/// Rows below which the row-wise ops run on the calling thread.
const PARALLEL_MIN_ROWS: usize = 32;

/// `candle_nn::ops::rms_norm` over rows of `w.len()` values: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    assert!(
        n > 0 && x.len() == out.len() && x.len().is_multiple_of(n),
        "rms_norm: {} values in rows of {n}",
        x.len()
    );
    let row = |src: &[f32], dst: &mut [f32]| {
        let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((d, &s), &a) in dst.iter_mut().zip(src).zip(w) {
            *d = s / m * a;
        }
    };
    for_rows(x, out, n, row);
}

/// Runs `f(src_row, dst_row)` over rows, on the pool when there are many.
fn for_rows(src: &[f32], dst: &mut [f32], n: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    let rows = src.len() / n;
    if rows < PARALLEL_MIN_ROWS {
        for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
            f(s, d);
        }
        return;
    }
    let out = par::SharedOut::new(dst);
    par::run(rows, true, |range: Range<usize>| {
        let mut buf = vec![0f32; n];
        for r in range {
            f(&src[r * n..(r + 1) * n], &mut buf);
            // SAFETY: row `r` is written by this item alone.
            unsafe { out.write(r * n, &buf) };
        }
    });
}

/// Rotary embedding in place, as `candle_nn::rotary_emb::rope_i` (pairs of
/// adjacent values, GGUF's layout) or `rope` (`neox`: halves of each head).
///
/// `x` holds `positions.len()` rows of `heads · head_dim` values; `cos` and
/// `sin` hold `head_dim / 2` values per position from 0.
pub fn rope(
    x: &mut [f32],
    head_dim: usize,
    positions: Range<usize>,
    cos: &[f32],
    sin: &[f32],
    neox: bool,
) {
    let half = head_dim / 2;
    let width = x.len() / positions.len().max(1);
    assert!(
        head_dim > 0
            && head_dim.is_multiple_of(2)
            && width.is_multiple_of(head_dim)
            && width * positions.len() == x.len()
            && cos.len() >= positions.end * half
            && sin.len() >= positions.end * half,
        "rope: shapes do not fit"
    );
    for (row, pos) in x.chunks_exact_mut(width).zip(positions) {
        let (cos, sin) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// `silu(gate) · up` as candle computes `silu(&gate)? * up`, where `gate_up`
/// holds rows of `2 · n` values (the gate's `n`, then the up projection's).
pub fn silu_mul(gate_up: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        n > 0 && gate_up.len().is_multiple_of(2 * n) && out.len() * 2 == gate_up.len(),
        "silu_mul: shapes do not fit"
    );
    let rows = out.len() / n;
    let row = |r: usize, dst: &mut [f32]| {
        let (gate, up) = gate_up[r * 2 * n..(r + 1) * 2 * n].split_at(n);
        for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *d = g / (1.0 + (-g).exp()) * u;
        }
    };
    if rows * n < 4096 {
        for (r, dst) in out.chunks_exact_mut(n).enumerate() {
            row(r, dst);
        }
        return;
    }
    // Split long rows too: a decode step has one row of ~1.5k exponentials.
    let pieces = n.div_ceil(256);
    let shared = par::SharedOut::new(out);
    par::run(rows * pieces, true, |range: Range<usize>| {
        let mut buf = [0f32; 256];
        for item in range {
            let (r, p) = (item / pieces, item % pieces);
            let cols = p * 256..n.min((p + 1) * 256);
            let gate = &gate_up[r * 2 * n + cols.start..r * 2 * n + cols.end];
            let up = &gate_up[r * 2 * n + n + cols.start..r * 2 * n + n + cols.end];
            let dst = &mut buf[..cols.len()];
            for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
                *d = g / (1.0 + (-g).exp()) * u;
            }
            // SAFETY: this piece of this row is written by this item alone.
            unsafe { shared.write(r * n + cols.start, dst) };
        }
    });
}

/// `a += b`, as candle's `(a + b)` (the sum is commutative to the bit).
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "add: lengths differ");
    for (x, &y) in a.iter_mut().zip(b) {
        *x += y;
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
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn tensor_bits(t: &Tensor) -> Vec<u32> {
        bits(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    }

    #[test]
    fn rms_norm_equals_candle() {
        for rows in [1, 3, 40] {
            let (x, w) = (values(rows * 576, rows as u64), values(576, 9));
            let mut out = vec![0f32; x.len()];
            rms_norm(&x, &w, 1e-5, &mut out);
            let reference = candle_nn::ops::rms_norm(
                &Tensor::from_slice(&x, (1, rows, 576), &Device::Cpu).unwrap(),
                &Tensor::from_slice(&w, 576, &Device::Cpu).unwrap(),
                1e-5,
            )
            .unwrap();
            assert_eq!(bits(&out), tensor_bits(&reference), "rows={rows}");
        }
    }

    #[test]
    fn rope_equals_candle() {
        let (heads, hd, seq, start) = (3, 64, 5, 7);
        let x = values(seq * heads * hd, 1);
        let table = |seed| values((start + seq) * hd / 2, seed);
        let (cos, sin) = (table(2), table(3));
        for neox in [false, true] {
            let mut ours = x.clone();
            rope(&mut ours, hd, start..start + seq, &cos, &sin, neox);
            let t = Tensor::from_slice(&x, (1, seq, heads, hd), &Device::Cpu)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let c = Tensor::from_slice(&cos, (start + seq, hd / 2), &Device::Cpu)
                .unwrap()
                .narrow(0, start, seq)
                .unwrap();
            let s = Tensor::from_slice(&sin, (start + seq, hd / 2), &Device::Cpu)
                .unwrap()
                .narrow(0, start, seq)
                .unwrap();
            let reference = if neox {
                candle_nn::rotary_emb::rope(&t, &c, &s)
            } else {
                candle_nn::rotary_emb::rope_i(&t, &c, &s)
            }
            .unwrap()
            .transpose(1, 2)
            .unwrap();
            assert_eq!(bits(&ours), tensor_bits(&reference), "neox={neox}");
        }
    }

    #[test]
    fn silu_mul_equals_candle() {
        for rows in [1, 4] {
            let n = 1536;
            let gu = values(rows * 2 * n, 5);
            let mut out = vec![0f32; rows * n];
            silu_mul(&gu, n, &mut out);
            let t = Tensor::from_slice(&gu, (rows, 2 * n), &Device::Cpu).unwrap();
            let gate = t.narrow(1, 0, n).unwrap();
            let up = t.narrow(1, n, n).unwrap();
            let reference = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
            assert_eq!(bits(&out), tensor_bits(&reference), "rows={rows}");
        }
    }
}
