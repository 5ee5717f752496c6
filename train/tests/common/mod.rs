//! Shared fixtures: a small synthetic corpus and comparison helpers.

#![allow(dead_code, unreachable_pub)]

use candle_core::Tensor;
use commons_train::params::flatten;
use commons_train::{CharTokenizer, Corpus};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Text drawn from a tiny grammar: learnable by a tiny model in a few dozen
/// steps, yet not periodic.
pub fn synthetic_text(chars: usize, seed: u64) -> String {
    const SUBJECTS: [&str; 4] = ["the cat", "a dog", "my bird", "one fox"];
    const VERBS: [&str; 4] = ["sees", "likes", "bites", "finds"];
    const OBJECTS: [&str; 4] = ["the mat", "a hat", "my bed", "one box"];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut text = String::with_capacity(chars + 32);
    while text.len() < chars {
        let pick = |rng: &mut ChaCha8Rng, words: &[&'static str; 4]| words[rng.random_range(0..4)];
        text.push_str(pick(&mut rng, &SUBJECTS));
        text.push(' ');
        text.push_str(pick(&mut rng, &VERBS));
        text.push(' ');
        text.push_str(pick(&mut rng, &OBJECTS));
        text.push_str(if rng.random_bool(0.2) { ".\n" } else { ". " });
    }
    text
}

/// The tokenizer and corpus of [`synthetic_text`].
pub fn synthetic_corpus(chars: usize, seed: u64) -> (CharTokenizer, Corpus) {
    let text = synthetic_text(chars, seed);
    let tokenizer = CharTokenizer::from_text(&text);
    let corpus = Corpus::from_text(&text, &tokenizer).expect("the text tokenizes");
    (tokenizer, corpus)
}

/// Differences between two tensor lists, flattened.
#[derive(Debug, Clone, Copy)]
pub struct Diff {
    /// `max |a − b|`.
    pub max_abs: f64,
    /// `max |a − b|` over `max |b|`.
    pub max_abs_over_max: f64,
    /// `‖a − b‖₂ / ‖b‖₂`.
    pub norm_rel: f64,
    /// `max |a − b| / |b|` over entries with `|b| ≥ floor`.
    pub max_rel: f64,
}

/// Compares `a` against the reference `b`.
pub fn diff(a: &[Tensor], b: &[Tensor], floor: f64) -> Diff {
    let a = flatten(a).expect("readable");
    let b = flatten(b).expect("readable");
    assert_eq!(a.len(), b.len(), "same number of elements");
    let mut d = Diff {
        max_abs: 0.0,
        max_abs_over_max: 0.0,
        norm_rel: 0.0,
        max_rel: 0.0,
    };
    let (mut num, mut den, mut max_b) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(&b) {
        let (x, y) = (f64::from(x), f64::from(y));
        let e = (x - y).abs();
        d.max_abs = d.max_abs.max(e);
        max_b = max_b.max(y.abs());
        num += e * e;
        den += y * y;
        if y.abs() >= floor {
            d.max_rel = d.max_rel.max(e / y.abs());
        }
    }
    d.max_abs_over_max = d.max_abs / max_b.max(f64::MIN_POSITIVE);
    d.norm_rel = num.sqrt() / den.sqrt().max(f64::MIN_POSITIVE);
    d
}
