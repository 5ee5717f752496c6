//! A character-level tokenizer: token `i` is the `i`-th character of the
//! corpus's sorted character set, so the same corpus always gives the same
//! vocabulary, whatever order its files were read in.

use serde::{Deserialize, Serialize};

/// A string or id list that the tokenizer cannot translate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizeError {
    /// A character that is not in the vocabulary.
    #[error("character {ch:?} at byte {offset} is not in the vocabulary")]
    UnknownChar {
        /// The character.
        ch: char,
        /// Its byte offset in the text.
        offset: usize,
    },
    /// A token id past the end of the vocabulary.
    #[error("token id {id} is past the vocabulary of {vocab_size}")]
    UnknownId {
        /// The id.
        id: u32,
        /// The vocabulary's size.
        vocab_size: usize,
    },
    /// A serialised vocabulary that is not sorted, repeats a character or is
    /// empty.
    #[error("a vocabulary must be a non-empty, strictly increasing list of characters")]
    Unsorted,
}

/// A character-level tokenizer over a sorted set of characters.
///
/// Serialises as the list of its characters (serde), and is rebuilt from it
/// only if the list is strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<char>", into = "Vec<char>")]
pub struct CharTokenizer {
    chars: Vec<char>,
}

impl CharTokenizer {
    /// The tokenizer whose vocabulary is the set of characters of `text`,
    /// sorted by code point.
    #[must_use]
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self { chars }
    }

    /// The tokenizer with this vocabulary.
    ///
    /// # Errors
    /// [`TokenizeError::Unsorted`] unless `chars` is non-empty and strictly
    /// increasing.
    pub fn from_chars(chars: Vec<char>) -> Result<Self, TokenizeError> {
        if chars.is_empty() || chars.windows(2).any(|w| w[0] >= w[1]) {
            return Err(TokenizeError::Unsorted);
        }
        Ok(Self { chars })
    }

    /// The vocabulary, sorted.
    #[must_use]
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// How many tokens there are.
    #[must_use]
    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// The token ids of `text`.
    ///
    /// # Errors
    /// [`TokenizeError::UnknownChar`] at the first character outside the
    /// vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let mut ids = Vec::with_capacity(text.len());
        // Most corpora are ASCII: a direct table for it, a binary search beyond.
        let mut ascii = [u32::MAX; 128];
        for (id, &c) in self.chars.iter().enumerate() {
            if c.is_ascii() {
                ascii[c as usize] = id as u32;
            }
        }
        for (offset, ch) in text.char_indices() {
            let id = if ch.is_ascii() {
                Some(ascii[ch as usize]).filter(|&id| id != u32::MAX)
            } else {
                self.chars.binary_search(&ch).ok().map(|i| i as u32)
            };
            ids.push(id.ok_or(TokenizeError::UnknownChar { ch, offset })?);
        }
        Ok(ids)
    }

    /// The text of `ids`.
    ///
    /// # Errors
    /// [`TokenizeError::UnknownId`] at the first id past the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        ids.iter()
            .map(|&id| {
                self.chars
                    .get(id as usize)
                    .copied()
                    .ok_or(TokenizeError::UnknownId {
                        id,
                        vocab_size: self.chars.len(),
                    })
            })
            .collect()
    }
}

impl TryFrom<Vec<char>> for CharTokenizer {
    type Error = TokenizeError;

    fn try_from(chars: Vec<char>) -> Result<Self, Self::Error> {
        Self::from_chars(chars)
    }
}

impl From<CharTokenizer> for Vec<char> {
    fn from(tokenizer: CharTokenizer) -> Self {
        tokenizer.chars
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_is_sorted_and_independent_of_order() {
        let a = CharTokenizer::from_text("hello world");
        let b = CharTokenizer::from_text("world hello");
        assert_eq!(a, b);
        assert_eq!(a.chars(), &[' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
    }

    #[test]
    fn encode_decode_roundtrip_and_errors() {
        let t = CharTokenizer::from_text("abcé");
        let ids = t.encode("cabé").unwrap();
        assert_eq!(ids, vec![2, 0, 1, 3]);
        assert_eq!(t.decode(&ids).unwrap(), "cabé");
        assert_eq!(
            t.encode("abz"),
            Err(TokenizeError::UnknownChar { ch: 'z', offset: 2 })
        );
        assert_eq!(
            t.decode(&[4]),
            Err(TokenizeError::UnknownId {
                id: 4,
                vocab_size: 4
            })
        );
    }

    #[test]
    fn serde_roundtrip_checks_order() {
        let t = CharTokenizer::from_text("the quick brown fox");
        let json = serde_json::to_string(&t).unwrap();
        let back: CharTokenizer = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        assert!(serde_json::from_str::<CharTokenizer>(r#"["b","a"]"#).is_err());
        assert!(serde_json::from_str::<CharTokenizer>(r#"["a","a"]"#).is_err());
        assert!(serde_json::from_str::<CharTokenizer>("[]").is_err());
    }
}
