//! The simulated executor: a stand-in model whose outputs depend on a
//! session's whole history, as a transformer's do through its KV cache.
//!
//! Each layer keeps one 64-bit state per session. A position's value enters
//! layer `l`, is mixed into that layer's state, and the layer's output (a
//! 16-bit integer, exact in `f32`) goes on to layer `l + 1`. The last
//! layer's output at the last position, modulo [`VOCAB`], is the next token.
//! Layers compose exactly: running `a..b` then `b..c` gives what `a..c`
//! gives, so any chain of honest nodes, and any replay of a hop's recorded
//! inputs, yields the text of [`reference()`]. A node that skipped or lost a
//! step, or was fed a wrong input, drifts away from it for good.
//!
//! Corruption alters what a node returns, never its session state
//! ([`corrupt`]).

use commons_protocol::Tensor;
use commons_protocol::messages::LayerRange;

/// Tokens of the stand-in model.
pub const VOCAB: u32 = 32_000;

/// Hidden values are 16-bit integers (exact in `f32`).
const HIDDEN: u64 = 1 << 16;

/// One session on one node: where it stands and its layers' states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Tokens run so far (the next unit's `start_pos`).
    pub pos: u32,
    state: Vec<u64>,
}

impl Session {
    /// A fresh session over `layers`.
    #[must_use]
    pub fn new(layers: LayerRange) -> Self {
        Self {
            pos: 0,
            state: vec![0; layers.len() as usize],
        }
    }
}

/// Mixes input `x` into a layer's `state` (a multiply–xorshift step: cheap,
/// and every bit of the history reaches the output).
fn mix(state: u64, x: u64, layer: u32) -> u64 {
    let z = (state ^ x ^ (u64::from(layer) << 48))
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 29)
}

/// Runs `values` (one per position) through `layers` in `session`; the
/// outputs of the last layer, one per position.
fn forward(session: &mut Session, layers: LayerRange, values: &[u64]) -> Vec<u64> {
    values
        .iter()
        .map(|&v| {
            let mut x = v;
            for (s, l) in session.state.iter_mut().zip(layers.start..layers.end) {
                *s = mix(*s, x, l);
                x = *s >> 48;
            }
            x
        })
        .collect()
}

/// Runs a unit's `input` (token ids or hidden states of shape `(1, n, 1)`)
/// through `layers` of an `n_layers` model: hidden states of shape
/// `(1, n, 1)`, or the next token when `layers` ends the model. `None` when
/// the input is neither.
#[must_use]
pub fn run(
    session: &mut Session,
    layers: LayerRange,
    n_layers: u32,
    input: &Tensor,
) -> Option<Tensor> {
    let values: Vec<u64> = match input.to_u32() {
        Some(tokens) => tokens.into_iter().map(u64::from).collect(),
        None => input.to_f32()?.into_iter().map(|v| v as u64).collect(),
    };
    let out = forward(session, layers, &values);
    session.pos += values.len() as u32;
    if layers.end == n_layers {
        let last = *out.last()?;
        Tensor::from_u32(&[1], &[(last % u64::from(VOCAB)) as u32]).ok()
    } else {
        let hidden: Vec<f32> = out.iter().map(|&x| x as f32).collect();
        Tensor::from_f32(&[1, hidden.len() as u64, 1], &hidden).ok()
    }
}

/// The text honest nodes generate from `prompt`: `max_tokens` greedy tokens.
#[must_use]
pub fn reference(prompt: &[u32], max_tokens: u32, n_layers: u32) -> Vec<u32> {
    let whole = LayerRange {
        start: 0,
        end: n_layers,
    };
    let mut session = Session::new(whole);
    let mut input: Vec<u64> = prompt.iter().map(|&t| u64::from(t)).collect();
    let mut tokens = Vec::with_capacity(max_tokens as usize);
    for _ in 0..max_tokens {
        let out = forward(&mut session, whole, &input);
        let token = out.last().map_or(0, |x| (x % u64::from(VOCAB)) as u32);
        tokens.push(token);
        input = vec![u64::from(token)];
    }
    tokens
}

/// A prompt of `len` tokens for job number `job`.
#[must_use]
pub fn prompt(job: u64, len: u32) -> Vec<u32> {
    (0..len)
        .map(|i| 1 + (mix(job, u64::from(i), 0) >> 32) as u32 % (VOCAB - 1))
        .collect()
}

/// `output` altered by `key`: a token moves to another token, and every
/// hidden value to another value. Different keys give different outputs.
#[must_use]
pub fn corrupt(output: &Tensor, key: u64) -> Option<Tensor> {
    if let Some(tokens) = output.to_u32() {
        let shift = 1 + key % u64::from(VOCAB - 1);
        let wrong: Vec<u32> = tokens
            .iter()
            .map(|&t| ((u64::from(t) + shift) % u64::from(VOCAB)) as u32)
            .collect();
        return Tensor::from_u32(output.shape(), &wrong).ok();
    }
    let shift = 1 + key % (HIDDEN - 1);
    let wrong: Vec<f32> = output
        .to_f32()?
        .iter()
        .map(|&v| ((v as u64 + shift) % HIDDEN) as f32)
        .collect();
    Tensor::from_f32(output.shape(), &wrong).ok()
}

/// A 64-bit digest of `parts`, for draws that must be the same wherever the
/// same unit is run (colluders) and keys of corrupted outputs.
#[must_use]
pub fn draw(domain: &str, parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(domain.as_bytes());
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Whether a uniform 64-bit `draw` falls below probability `p`.
#[must_use]
pub fn below(draw: u64, p: f64) -> bool {
    p >= 1.0 || (draw as f64) < p * 18_446_744_073_709_551_616.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u32, end: u32) -> LayerRange {
        LayerRange { start, end }
    }

    /// Runs a whole job through a chain cut at `cuts`.
    fn chain(prompt: &[u32], max_tokens: u32, cuts: &[u32]) -> Vec<u32> {
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(30);
        let mut sessions: Vec<Session> = bounds
            .windows(2)
            .map(|w| Session::new(range(w[0], w[1])))
            .collect();
        let mut input = Tensor::from_u32(&[1, prompt.len() as u64], prompt).unwrap();
        let mut tokens = Vec::new();
        while tokens.len() < max_tokens as usize {
            let mut x = input.clone();
            for (s, w) in sessions.iter_mut().zip(bounds.windows(2)) {
                x = run(s, range(w[0], w[1]), 30, &x).unwrap();
            }
            let t = x.to_u32().unwrap()[0];
            tokens.push(t);
            input = Tensor::from_u32(&[1, 1], &[t]).unwrap();
        }
        tokens
    }

    #[test]
    fn any_chain_of_honest_hops_gives_the_reference_text() {
        let p = prompt(3, 12);
        let expected = reference(&p, 20, 30);
        assert_eq!(chain(&p, 20, &[]), expected);
        assert_eq!(chain(&p, 20, &[10, 20]), expected);
        assert_eq!(chain(&p, 20, &[1, 2, 17, 29]), expected);
        assert_ne!(reference(&prompt(4, 12), 20, 30), expected);
        let distinct: std::collections::BTreeSet<u32> = expected.iter().copied().collect();
        assert!(distinct.len() > 15, "{expected:?}");
    }

    #[test]
    fn outputs_depend_on_the_session_history() {
        let x = Tensor::from_u32(&[1, 1], &[5]).unwrap();
        let mut a = Session::new(range(0, 10));
        let mut b = Session::new(range(0, 10));
        let first = run(&mut a, range(0, 10), 30, &x).unwrap();
        assert_eq!(run(&mut b, range(0, 10), 30, &x).unwrap(), first);
        // Same input again: a different output, since the state moved on.
        assert_ne!(run(&mut a, range(0, 10), 30, &x).unwrap(), first);
        assert_eq!(a.pos, 2);
    }

    #[test]
    fn corruption_changes_every_value_and_keys_give_different_lies() {
        let t = Tensor::from_u32(&[1], &[31_999]).unwrap();
        let h = Tensor::from_f32(&[1, 3, 1], &[0.0, 7.0, 65_535.0]).unwrap();
        for out in [&t, &h] {
            let a = corrupt(out, 1).unwrap();
            let b = corrupt(out, 2).unwrap();
            assert_ne!(&a, out);
            assert_ne!(a, b);
            assert_eq!(corrupt(out, 1).unwrap(), a);
            assert_eq!(a.shape(), out.shape());
        }
        let wrong = corrupt(&h, 0).unwrap().to_f32().unwrap();
        assert!(wrong.iter().zip([0.0, 7.0, 65_535.0]).all(|(w, v)| *w != v));
    }
}
