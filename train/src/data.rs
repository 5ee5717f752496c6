//! Training data: a tokenized corpus with a content id, a train/validation
//! split that holds out the tail, content-addressed shards of fixed token
//! ranges, and batches sampled deterministically from `(seed, shard, step)`.
//!
//! Sampling depends only on the seed, the shard's content id and the step, so
//! any node holding a shard draws exactly the batch the coordinator expects.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Hash;
use crate::tokenizer::{CharTokenizer, TokenizeError};

const CORPUS_DOMAIN: &str = "commons train corpus v1";
const SHARD_DOMAIN: &str = "commons train shard v1";
const BATCH_DOMAIN: &str = "commons train batch v1";

/// Data that cannot be read, split, sharded or sampled as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The text does not tokenize.
    #[error("the corpus does not tokenize")]
    Tokenize(#[from] TokenizeError),
    /// A token id past the vocabulary.
    #[error("token {id} at position {position} is past the vocabulary of {vocab_size}")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Its position in the corpus.
        position: usize,
        /// The vocabulary's size.
        vocab_size: usize,
    },
    /// A validation fraction outside `[0, 1)`.
    #[error("validation fraction {fraction} is outside [0, 1)")]
    Fraction {
        /// The fraction asked for.
        fraction: f64,
    },
    /// Too few tokens for what was asked.
    #[error("{what} needs {needed} tokens, {available} available")]
    TooShort {
        /// What needed them.
        what: &'static str,
        /// Tokens needed.
        needed: usize,
        /// Tokens available.
        available: usize,
    },
    /// A range outside the corpus, or an empty shard length.
    #[error(
        "token range {start}..{end} with shard length {shard_len} does not fit a corpus of {len}"
    )]
    Range {
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
        /// The shard length asked for.
        shard_len: usize,
        /// The corpus's length.
        len: usize,
    },
    /// A batch whose rows do not divide or match as asked.
    #[error("batch of {batch_size} rows of {seq_len}: {reason}")]
    Shape {
        /// Rows in the batch.
        batch_size: usize,
        /// Tokens per row.
        seq_len: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A text file that cannot be read.
    #[error("cannot read {path}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A tokenized corpus and its content id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    tokens: Vec<u32>,
    vocab_size: usize,
    id: Hash,
}

impl Corpus {
    /// A corpus of these tokens over a vocabulary of `vocab_size`.
    ///
    /// # Errors
    /// [`DataError::TokenOutOfRange`] for a token id `>= vocab_size`.
    pub fn new(tokens: Vec<u32>, vocab_size: usize) -> Result<Self, DataError> {
        if let Some((position, &id)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= vocab_size)
        {
            return Err(DataError::TokenOutOfRange {
                id,
                position,
                vocab_size,
            });
        }
        let mut hasher = blake3::Hasher::new_derive_key(CORPUS_DOMAIN);
        hasher.update(&(vocab_size as u64).to_le_bytes());
        hasher.update(&(tokens.len() as u64).to_le_bytes());
        hasher.update(&token_bytes(&tokens));
        let id = hasher.finalize();
        Ok(Self {
            tokens,
            vocab_size,
            id,
        })
    }

    /// The corpus of `text` tokenized by `tokenizer`.
    ///
    /// # Errors
    /// [`DataError::Tokenize`] for a character outside the vocabulary.
    pub fn from_text(text: &str, tokenizer: &CharTokenizer) -> Result<Self, DataError> {
        Self::new(tokenizer.encode(text)?, tokenizer.vocab_size())
    }

    /// The content id: blake3 (domain `commons train corpus v1`) of the
    /// vocabulary size, the length and the tokens as little-endian `u32`.
    #[must_use]
    pub fn id(&self) -> Hash {
        self.id
    }

    /// All the tokens.
    #[must_use]
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many tokens there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are no tokens.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The vocabulary's size.
    #[must_use]
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Splits off the last `validation_fraction` of the tokens (rounded up) as
    /// the held-out validation set; the rest is for training.
    ///
    /// # Errors
    /// [`DataError::Fraction`] outside `[0, 1)`.
    pub fn split(&self, validation_fraction: f64) -> Result<Split, DataError> {
        if !(0.0..1.0).contains(&validation_fraction) {
            return Err(DataError::Fraction {
                fraction: validation_fraction,
            });
        }
        let len = self.tokens.len();
        let validation = ((len as f64) * validation_fraction).ceil() as usize;
        let cut = len - validation.min(len);
        Ok(Split {
            train: 0..cut,
            validation: cut..len,
        })
    }

    /// Cuts `range` into shards of `shard_len` tokens, numbered from 0; the
    /// last one holds what remains and may be shorter.
    ///
    /// # Errors
    /// [`DataError::Range`] for a range outside the corpus or a zero length.
    pub fn shards(&self, range: Range<usize>, shard_len: usize) -> Result<Vec<Shard>, DataError> {
        if shard_len == 0 || range.start > range.end || range.end > self.tokens.len() {
            return Err(DataError::Range {
                start: range.start,
                end: range.end,
                shard_len,
                len: self.tokens.len(),
            });
        }
        Ok(range
            .clone()
            .step_by(shard_len)
            .enumerate()
            .map(|(index, start)| {
                let end = (start + shard_len).min(range.end);
                Shard::new(index as u32, start..end, &self.tokens[start..end])
            })
            .collect())
    }
}

/// Where a corpus's training and validation tokens lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The training tokens: everything before the validation tail.
    pub train: Range<usize>,
    /// The held-out tail.
    pub validation: Range<usize>,
}

/// A fixed token range of a corpus, named by its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    range: Range<usize>,
    id: Hash,
}

impl Shard {
    fn new(index: u32, range: Range<usize>, tokens: &[u32]) -> Self {
        Self {
            index,
            range,
            id: shard_id(tokens),
        }
    }

    /// The shard's number within its split.
    #[must_use]
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The token range it covers in the corpus.
    #[must_use]
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The content id: blake3 (domain `commons train shard v1`) of the length
    /// and the tokens as little-endian `u32`.
    #[must_use]
    pub fn id(&self) -> Hash {
        self.id
    }

    /// The shard's tokens in `corpus` (empty if the corpus is not the one it
    /// was cut from and is too short).
    #[must_use]
    pub fn tokens<'a>(&self, corpus: &'a Corpus) -> &'a [u32] {
        corpus.tokens.get(self.range.clone()).unwrap_or_default()
    }

    /// The batch of step `step` for `seed`: see [`sample_batch`].
    ///
    /// # Errors
    /// As [`sample_batch`].
    pub fn sample_batch(
        &self,
        corpus: &Corpus,
        seed: u64,
        step: u64,
        batch_size: usize,
        seq_len: usize,
    ) -> Result<Batch, DataError> {
        sample_batch(
            self.tokens(corpus),
            &self.id,
            seed,
            step,
            batch_size,
            seq_len,
        )
    }
}

/// Draws `batch_size` windows of `seq_len + 1` tokens from `tokens` at offsets
/// chosen uniformly by a ChaCha8 generator seeded with blake3 (domain
/// `commons train batch v1`) of `seed`, `shard_id` and `step`. Inputs are the
/// first `seq_len` tokens of each window, targets the last `seq_len`.
///
/// # Errors
/// [`DataError::TooShort`] when `tokens` has fewer than `seq_len + 1` tokens;
/// [`DataError::Shape`] for zero rows or a zero length.
pub fn sample_batch(
    tokens: &[u32],
    shard_id: &Hash,
    seed: u64,
    step: u64,
    batch_size: usize,
    seq_len: usize,
) -> Result<Batch, DataError> {
    if batch_size == 0 || seq_len == 0 {
        return Err(DataError::Shape {
            batch_size,
            seq_len,
            reason: "rows and length must be positive",
        });
    }
    if tokens.len() < seq_len + 1 {
        return Err(DataError::TooShort {
            what: "a training window",
            needed: seq_len + 1,
            available: tokens.len(),
        });
    }
    let mut hasher = blake3::Hasher::new_derive_key(BATCH_DOMAIN);
    hasher.update(&seed.to_le_bytes());
    hasher.update(shard_id.as_bytes());
    hasher.update(&step.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(*hasher.finalize().as_bytes());
    let last_offset = (tokens.len() - seq_len - 1) as u64;
    let mut inputs = Vec::with_capacity(batch_size * seq_len);
    let mut targets = Vec::with_capacity(batch_size * seq_len);
    for _ in 0..batch_size {
        let offset = rng.random_range(0..=last_offset) as usize;
        inputs.extend_from_slice(&tokens[offset..offset + seq_len]);
        targets.extend_from_slice(&tokens[offset + 1..offset + seq_len + 1]);
    }
    Batch::new(batch_size, seq_len, inputs, targets)
}

/// Consecutive non-overlapping windows of `tokens`, `batch_size` rows of
/// `seq_len` per batch, at most `max_batches` batches: a deterministic
/// evaluation set (a short last batch is dropped).
///
/// # Errors
/// [`DataError::TooShort`] when not even one batch fits; [`DataError::Shape`]
/// for zero rows or a zero length.
pub fn eval_batches(
    tokens: &[u32],
    batch_size: usize,
    seq_len: usize,
    max_batches: usize,
) -> Result<Vec<Batch>, DataError> {
    if batch_size == 0 || seq_len == 0 {
        return Err(DataError::Shape {
            batch_size,
            seq_len,
            reason: "rows and length must be positive",
        });
    }
    let windows = tokens.len().saturating_sub(1) / seq_len;
    let batches = (windows / batch_size).min(max_batches);
    if batches == 0 {
        return Err(DataError::TooShort {
            what: "one evaluation batch",
            needed: batch_size * seq_len + 1,
            available: tokens.len(),
        });
    }
    (0..batches)
        .map(|b| {
            let mut inputs = Vec::with_capacity(batch_size * seq_len);
            let mut targets = Vec::with_capacity(batch_size * seq_len);
            for row in 0..batch_size {
                let offset = (b * batch_size + row) * seq_len;
                inputs.extend_from_slice(&tokens[offset..offset + seq_len]);
                targets.extend_from_slice(&tokens[offset + 1..offset + seq_len + 1]);
            }
            Batch::new(batch_size, seq_len, inputs, targets)
        })
        .collect()
}

/// Rows of input tokens and the tokens that follow each of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    batch_size: usize,
    seq_len: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl Batch {
    /// A batch of `batch_size` rows of `seq_len` tokens, row-major.
    ///
    /// # Errors
    /// [`DataError::Shape`] when the lengths are not `batch_size * seq_len`
    /// or either is zero.
    pub fn new(
        batch_size: usize,
        seq_len: usize,
        inputs: Vec<u32>,
        targets: Vec<u32>,
    ) -> Result<Self, DataError> {
        let shape = |reason| DataError::Shape {
            batch_size,
            seq_len,
            reason,
        };
        if batch_size == 0 || seq_len == 0 {
            return Err(shape("rows and length must be positive"));
        }
        if inputs.len() != batch_size * seq_len || targets.len() != batch_size * seq_len {
            return Err(shape("inputs and targets must hold rows × length tokens"));
        }
        Ok(Self {
            batch_size,
            seq_len,
            inputs,
            targets,
        })
    }

    /// Rows.
    #[must_use]
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Tokens per row.
    #[must_use]
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The input tokens, row-major.
    #[must_use]
    pub fn inputs(&self) -> &[u32] {
        &self.inputs
    }

    /// The target tokens, row-major.
    #[must_use]
    pub fn targets(&self) -> &[u32] {
        &self.targets
    }

    /// The batch of rows `rows`.
    ///
    /// # Errors
    /// [`DataError::Shape`] for an empty range or one past the last row.
    pub fn rows(&self, rows: Range<usize>) -> Result<Self, DataError> {
        if rows.start >= rows.end || rows.end > self.batch_size {
            return Err(DataError::Shape {
                batch_size: self.batch_size,
                seq_len: self.seq_len,
                reason: "row range is empty or past the last row",
            });
        }
        let span = rows.start * self.seq_len..rows.end * self.seq_len;
        Self::new(
            rows.len(),
            self.seq_len,
            self.inputs[span.clone()].to_vec(),
            self.targets[span].to_vec(),
        )
    }

    /// The batch cut into `parts` batches of equal rows, in order.
    ///
    /// # Errors
    /// [`DataError::Shape`] unless `parts` divides the rows.
    pub fn split(&self, parts: usize) -> Result<Vec<Self>, DataError> {
        if parts == 0 || !self.batch_size.is_multiple_of(parts) {
            return Err(DataError::Shape {
                batch_size: self.batch_size,
                seq_len: self.seq_len,
                reason: "rows do not divide into that many equal parts",
            });
        }
        let rows = self.batch_size / parts;
        (0..parts)
            .map(|p| self.rows(p * rows..(p + 1) * rows))
            .collect()
    }

    /// The rows of all `batches`, in order.
    ///
    /// # Errors
    /// [`DataError::Shape`] when there are none or their lengths differ.
    pub fn concat(batches: &[Self]) -> Result<Self, DataError> {
        let Some(first) = batches.first() else {
            return Err(DataError::Shape {
                batch_size: 0,
                seq_len: 0,
                reason: "no batches to join",
            });
        };
        if let Some(other) = batches.iter().find(|b| b.seq_len != first.seq_len) {
            return Err(DataError::Shape {
                batch_size: other.batch_size,
                seq_len: other.seq_len,
                reason: "rows of different lengths cannot be joined",
            });
        }
        Self::new(
            batches.iter().map(|b| b.batch_size).sum(),
            first.seq_len,
            batches
                .iter()
                .flat_map(|b| b.inputs.iter().copied())
                .collect(),
            batches
                .iter()
                .flat_map(|b| b.targets.iter().copied())
                .collect(),
        )
    }

    /// Inputs and targets as `(batch_size, seq_len)` `u32` tensors.
    ///
    /// # Errors
    /// When candle cannot allocate them on `device`.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let shape = (self.batch_size, self.seq_len);
        Ok((
            Tensor::from_slice(&self.inputs, shape, device)?,
            Tensor::from_slice(&self.targets, shape, device)?,
        ))
    }
}

/// The concatenated contents of the files in `dir` whose names end in
/// `suffix`, in sorted name order (so the result does not depend on the file
/// system's listing order), with `\r\n` turned into `\n`.
///
/// # Errors
/// [`DataError::Io`] for a folder or file that cannot be read or is not UTF-8.
pub fn read_text_dir(dir: &Path, suffix: &str) -> Result<String, DataError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(suffix))
        {
            files.push(path);
        }
    }
    files.sort();
    let mut text = String::new();
    for path in &files {
        text.push_str(&std::fs::read_to_string(path).map_err(io(path))?);
    }
    Ok(text.replace("\r\n", "\n"))
}

/// The content id of a shard of these tokens: blake3 (domain `commons train
/// shard v1`) of the length and the tokens as little-endian `u32`, whatever
/// corpus or range they came from. [`Shard::id`] is this.
#[must_use]
pub fn shard_id(tokens: &[u32]) -> Hash {
    let mut hasher = blake3::Hasher::new_derive_key(SHARD_DOMAIN);
    hasher.update(&(tokens.len() as u64).to_le_bytes());
    hasher.update(&token_bytes(tokens));
    hasher.finalize()
}

/// Tokens as they travel and are stored: little-endian `u32`, in order.
#[must_use]
pub fn token_bytes(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// The tokens of [`token_bytes`]'s output, or `None` when the length is not
/// a multiple of 4.
#[must_use]
pub fn tokens_from_bytes(bytes: &[u8]) -> Option<Vec<u32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(len: usize) -> Corpus {
        Corpus::new((0..len as u32).map(|i| (i * 7 + i / 3) % 11).collect(), 11).unwrap()
    }

    #[test]
    fn shard_ids_and_token_bytes_travel_with_the_tokens() {
        let c = corpus(100);
        let shards = c.shards(0..100, 30).unwrap();
        let bytes = token_bytes(shards[1].tokens(&c));
        let back = tokens_from_bytes(&bytes).unwrap();
        assert_eq!(back, shards[1].tokens(&c));
        assert_eq!(shard_id(&back), shards[1].id());
        assert!(tokens_from_bytes(&bytes[1..]).is_none());
    }

    #[test]
    fn corpus_id_depends_on_content() {
        let a = corpus(100);
        assert_eq!(a.id(), corpus(100).id());
        let mut tokens = a.tokens().to_vec();
        tokens[50] = (tokens[50] + 1) % 11;
        assert_ne!(a.id(), Corpus::new(tokens, 11).unwrap().id());
        assert_ne!(a.id(), Corpus::new(a.tokens().to_vec(), 12).unwrap().id());
        assert!(matches!(
            Corpus::new(vec![1, 11], 11),
            Err(DataError::TokenOutOfRange { position: 1, .. })
        ));
    }

    #[test]
    fn split_holds_out_the_tail() {
        let split = corpus(1000).split(0.05).unwrap();
        assert_eq!(split.train, 0..950);
        assert_eq!(split.validation, 950..1000);
        let split = corpus(10).split(0.05).unwrap();
        assert_eq!(split.validation, 9..10, "rounded up");
        assert!(corpus(10).split(1.0).is_err());
        assert!(corpus(10).split(-0.1).is_err());
    }

    #[test]
    fn shards_cover_the_range_with_content_ids() {
        let c = corpus(1000);
        let shards = c.shards(0..950, 300).unwrap();
        let ranges: Vec<_> = shards.iter().map(Shard::range).collect();
        assert_eq!(ranges, vec![0..300, 300..600, 600..900, 900..950]);
        assert_eq!(shards[3].index(), 3);
        assert_eq!(shards[1].tokens(&c), &c.tokens()[300..600]);
        // The same content has the same id wherever it lies.
        let periodic = Corpus::new((0..40).map(|i| i % 10).collect(), 10).unwrap();
        let s = periodic.shards(0..40, 10).unwrap();
        assert_eq!(s[0].id(), s[2].id());
        let s = periodic.shards(0..40, 15).unwrap();
        assert_ne!(s[0].id(), s[1].id());
        assert!(c.shards(0..1001, 10).is_err());
        assert!(c.shards(0..10, 0).is_err());
    }

    #[test]
    fn sampling_is_deterministic_in_seed_shard_and_step() {
        let c = corpus(5000);
        let shards = c.shards(0..5000, 1000).unwrap();
        let b = |shard: &Shard, seed, step| shard.sample_batch(&c, seed, step, 4, 16).unwrap();
        let base = b(&shards[0], 7, 3);
        assert_eq!(base, b(&shards[0], 7, 3));
        assert_ne!(base, b(&shards[0], 8, 3));
        assert_ne!(base, b(&shards[0], 7, 4));
        assert_ne!(base.inputs(), b(&shards[1], 7, 3).inputs());
        // Targets are inputs shifted by one, inside the shard.
        let tokens = shards[0].tokens(&c);
        for row in 0..4 {
            let input = &base.inputs()[row * 16..(row + 1) * 16];
            let target = &base.targets()[row * 16..(row + 1) * 16];
            assert_eq!(&input[1..], &target[..15]);
            let at = tokens
                .windows(17)
                .position(|w| &w[..16] == input && w[16] == target[15]);
            assert!(at.is_some());
        }
        assert!(shards[0].sample_batch(&c, 0, 0, 1, 1000).is_err());
    }

    #[test]
    fn batches_split_and_join() {
        let c = corpus(500);
        let shard = &c.shards(0..500, 500).unwrap()[0];
        let batch = shard.sample_batch(&c, 1, 0, 6, 8).unwrap();
        let parts = batch.split(3).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1].inputs(), &batch.inputs()[16..32]);
        assert_eq!(Batch::concat(&parts).unwrap(), batch);
        assert!(batch.split(4).is_err());
        assert!(batch.rows(5..7).is_err());
        let evals = eval_batches(c.tokens(), 2, 10, 100).unwrap();
        assert_eq!(evals.len(), 24, "499 / 10 = 49 windows, 24 full batches");
        assert_eq!(evals[1].inputs()[..10], c.tokens()[20..30]);
    }

    #[test]
    fn text_dir_is_read_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b_gut.txt"), "second\r\n").unwrap();
        std::fs::write(dir.path().join("a_gut.txt"), "first\n").unwrap();
        std::fs::write(dir.path().join("c.md"), "skipped").unwrap();
        let text = read_text_dir(dir.path(), "_gut.txt").unwrap();
        assert_eq!(text, "first\nsecond\n");
        assert!(read_text_dir(&dir.path().join("missing"), "_gut.txt").is_err());
    }
}
