//! Content-addressed files (model weights) between peers, verified as they
//! stream.
//!
//! A file is known by its blake3 hash, the [`ModelId`]. It travels in blocks
//! of [`BLOCK_LEN`] bytes (1024 blake3 chunks, so every block is a whole
//! subtree of blake3's own tree). A peer first sends the file's
//! [`Manifest`]: its length and the chaining value of every block. Merging
//! those chaining values up blake3's tree must give the file's hash, so the
//! manifest is checked against the id before any block is accepted; then
//! every block is checked against its chaining value the moment it arrives.
//! A corrupt block is rejected on its own and fetched elsewhere; a partial
//! download is resumed by checking the blocks already on disk.

use blake3::hazmat::{
    ChainingValue, HasherExt as _, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use serde::{Deserialize, Serialize};

use crate::bounded::BoundedVec;
use crate::ids::{Hash, ModelId};

/// Bytes per block: 1 MiB, a power of two number of blake3 chunks.
pub const BLOCK_LEN: u64 = 1 << 20;
/// Most blocks of a file (64 GiB).
pub const MAX_BLOCKS: usize = 1 << 16;

/// A file's length and the chaining value of each of its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bytes in the file.
    pub len: u64,
    /// Chaining value of every block, in order.
    pub blocks: BoundedVec<[u8; 32], MAX_BLOCKS>,
}

/// A block or manifest that does not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The manifest's blocks do not merge to the file's hash.
    #[error("the manifest hashes to {actual}, not to the file's id {expected}")]
    ManifestMismatch {
        /// The id asked for.
        expected: Hash,
        /// What the manifest gives.
        actual: Hash,
    },
    /// The manifest's block count does not fit its length.
    #[error("a file of {len} bytes has {expected} blocks, the manifest lists {listed}")]
    BlockCount {
        /// The length.
        len: u64,
        /// Blocks it needs.
        expected: usize,
        /// Blocks listed.
        listed: usize,
    },
    /// A block's bytes do not match its chaining value.
    #[error("block {index} does not match the manifest")]
    CorruptBlock {
        /// Which block.
        index: u32,
    },
    /// A block of the wrong length, or past the end.
    #[error("block {index} has {got} bytes, expected {expected}")]
    BlockLength {
        /// Which block.
        index: u32,
        /// Bytes received.
        got: usize,
        /// Bytes it should have.
        expected: u64,
    },
    /// The file is larger than [`MAX_BLOCKS`] blocks.
    #[error("files over {MAX_BLOCKS} blocks are not supported")]
    TooLarge,
}

/// Blocks in a file of `len` bytes (an empty file has one, empty, block).
#[must_use]
pub fn block_count(len: u64) -> usize {
    len.div_ceil(BLOCK_LEN).max(1) as usize
}

/// Byte offset and length of block `index` in a file of `len` bytes.
#[must_use]
pub fn block_span(len: u64, index: u32) -> (u64, u64) {
    let offset = u64::from(index) * BLOCK_LEN;
    (offset, len.saturating_sub(offset).min(BLOCK_LEN))
}

fn block_cv(index: u32, bytes: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(u64::from(index) * BLOCK_LEN)
        .update(bytes)
        .finalize_non_root()
}

/// Builds a manifest from a file's blocks, given in order.
#[derive(Debug, Default)]
pub struct ManifestBuilder {
    len: u64,
    blocks: Vec<[u8; 32]>,
}

impl ManifestBuilder {
    /// An empty builder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next block (every block but the last must be [`BLOCK_LEN`] bytes).
    pub fn push(&mut self, block: &[u8]) -> Result<(), BlobError> {
        let index = self.blocks.len() as u32;
        if !self.len.is_multiple_of(BLOCK_LEN) || block.len() as u64 > BLOCK_LEN {
            return Err(BlobError::BlockLength {
                index,
                got: block.len(),
                expected: BLOCK_LEN,
            });
        }
        if self.blocks.len() >= MAX_BLOCKS {
            return Err(BlobError::TooLarge);
        }
        if block.is_empty() {
            // Only an empty file has an empty block; `finish` records it.
            return Ok(());
        }
        self.blocks.push(block_cv(index, block));
        self.len += block.len() as u64;
        Ok(())
    }

    /// The manifest.
    pub fn finish(mut self) -> Result<Manifest, BlobError> {
        if self.blocks.is_empty() {
            // An empty file: its one block is checked against the id itself.
            self.blocks.push([0; 32]);
        }
        Ok(Manifest {
            len: self.len,
            blocks: BoundedVec::try_from_vec(self.blocks).map_err(|_| BlobError::TooLarge)?,
        })
    }
}

/// The chaining value of the subtree over blocks `first..first + count`.
fn subtree(blocks: &[[u8; 32]], first: usize, count: usize) -> ChainingValue {
    if count == 1 {
        return blocks[first];
    }
    let left = left_blocks(count);
    merge_subtrees_non_root(
        &subtree(blocks, first, left),
        &subtree(blocks, first + left, count - left),
        Mode::Hash,
    )
}

/// Blocks in the left subtree of `count` blocks: blake3 puts the largest
/// power of two strictly less than the total on the left (block-aligned,
/// since a block is a power of two chunks).
fn left_blocks(count: usize) -> usize {
    (count.div_ceil(2)).next_power_of_two()
}

impl Manifest {
    /// Blocks in the file.
    #[must_use]
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The blake3 hash of the whole file, from the blocks' chaining values.
    ///
    /// A one-block file has no parent node: its hash cannot come from a
    /// chaining value, so this returns `None` and its block is checked
    /// against the id directly.
    #[must_use]
    pub fn root(&self) -> Option<Hash> {
        let n = self.blocks.len();
        if n < 2 {
            return None;
        }
        let left = left_blocks(n);
        let root = merge_subtrees_root(
            &subtree(&self.blocks, 0, left),
            &subtree(&self.blocks, left, n - left),
            Mode::Hash,
        );
        Some(Hash(*root.as_bytes()))
    }

    /// Checks the manifest against the id of the file it claims to describe.
    pub fn check(&self, id: &ModelId) -> Result<(), BlobError> {
        let expected = block_count(self.len);
        if self.blocks.len() != expected {
            return Err(BlobError::BlockCount {
                len: self.len,
                expected,
                listed: self.blocks.len(),
            });
        }
        match self.root() {
            Some(actual) if actual != id.0 => Err(BlobError::ManifestMismatch {
                expected: id.0,
                actual,
            }),
            _ => Ok(()),
        }
    }

    /// Checks block `index` (of a manifest already [`check`](Self::check)ed against `id`).
    ///
    /// The chaining values bind the bytes, the length of the last block
    /// included; the manifest's `len` is only a claim, so the last block is
    /// judged by its chaining value alone (see [`Manifest::settle_len`]).
    pub fn verify_block(&self, id: &ModelId, index: u32, bytes: &[u8]) -> Result<(), BlobError> {
        let count = self.blocks.len();
        let last = index as usize + 1 == count;
        let length_ok = if last {
            bytes.len() as u64 <= BLOCK_LEN && (count == 1 || !bytes.is_empty())
        } else {
            bytes.len() as u64 == BLOCK_LEN
        };
        if index as usize >= count || !length_ok {
            return Err(BlobError::BlockLength {
                index,
                got: bytes.len(),
                expected: block_span(self.len, index).1,
            });
        }
        let ok = if count == 1 {
            Hash(*blake3::hash(bytes).as_bytes()) == id.0
        } else {
            block_cv(index, bytes) == self.blocks[index as usize]
        };
        if ok {
            Ok(())
        } else {
            Err(BlobError::CorruptBlock { index })
        }
    }

    /// Sets the length from the verified last block (whose bytes the chaining
    /// values bind), correcting a manifest that claimed another length.
    pub fn settle_len(&mut self, last_block_len: usize) {
        let blocks = self.blocks.len() as u64;
        self.len = (blocks - 1) * BLOCK_LEN + last_block_len as u64;
    }
}

/// A request for a file's manifest or one of its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BlobRequest {
    /// The manifest of a file.
    Manifest {
        /// The file.
        model: ModelId,
    },
    /// One block.
    Block {
        /// The file.
        model: ModelId,
        /// Which block.
        index: u32,
    },
}

/// The answer to a [`BlobRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BlobResponse {
    /// The manifest asked for.
    Manifest(Manifest),
    /// The block asked for.
    Block {
        /// Which block.
        index: u32,
        /// Its bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// This peer does not have the file.
    NotHeld,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn manifest(bytes: &[u8]) -> Manifest {
        let mut b = ManifestBuilder::new();
        for block in bytes.chunks(BLOCK_LEN as usize) {
            b.push(block).unwrap();
        }
        b.finish().unwrap()
    }

    #[test]
    fn manifests_merge_to_blake3_of_the_whole_file() {
        let b = BLOCK_LEN as usize;
        for len in [
            0,
            1,
            1024,
            b,
            b + 1,
            2 * b,
            3 * b - 5,
            4 * b,
            5 * b + 17,
            8 * b + 1,
        ] {
            let bytes = data(len);
            let m = manifest(&bytes);
            assert_eq!(m.block_count(), block_count(len as u64), "len {len}");
            let id = ModelId(Hash(*blake3::hash(&bytes).as_bytes()));
            m.check(&id).unwrap();
            if m.block_count() > 1 {
                assert_eq!(m.root(), Some(id.0), "len {len}");
            }
            for (i, block) in bytes.chunks(b).enumerate() {
                m.verify_block(&id, i as u32, block).unwrap();
            }
        }
    }

    #[test]
    fn corrupt_blocks_and_forged_manifests_are_caught() {
        let b = BLOCK_LEN as usize;
        let bytes = data(3 * b + 100);
        let id = ModelId(Hash(*blake3::hash(&bytes).as_bytes()));
        let m = manifest(&bytes);
        // One flipped bit in a block.
        let mut bad = bytes[b..2 * b].to_vec();
        bad[77] ^= 1;
        assert_eq!(
            m.verify_block(&id, 1, &bad),
            Err(BlobError::CorruptBlock { index: 1 })
        );
        // A block moved to another index.
        assert_eq!(
            m.verify_block(&id, 2, &bytes[b..2 * b]),
            Err(BlobError::CorruptBlock { index: 2 })
        );
        // A short last block (the chaining value binds its length), a short
        // block in the middle, and a block past the end.
        assert!(matches!(
            m.verify_block(&id, 3, &bytes[3 * b..3 * b + 99]),
            Err(BlobError::CorruptBlock { .. })
        ));
        assert!(matches!(
            m.verify_block(&id, 1, &bytes[b..2 * b - 1]),
            Err(BlobError::BlockLength { .. })
        ));
        assert!(matches!(
            m.verify_block(&id, 4, &[]),
            Err(BlobError::BlockLength { .. })
        ));
        // A manifest of other data, or with a block's value changed, does not match the id.
        let other = manifest(&data(3 * b + 101));
        assert!(matches!(
            other.check(&id),
            Err(BlobError::BlockCount { .. }) | Err(BlobError::ManifestMismatch { .. })
        ));
        let mut forged = m.clone();
        let mut blocks = forged.blocks.into_vec();
        blocks[2][0] ^= 1;
        forged.blocks = BoundedVec::try_from_vec(blocks).unwrap();
        assert!(matches!(
            forged.check(&id),
            Err(BlobError::ManifestMismatch { .. })
        ));
        // A one-block file is checked against the id itself.
        let small = data(500);
        let small_id = ModelId(Hash(*blake3::hash(&small).as_bytes()));
        let sm = manifest(&small);
        sm.check(&small_id).unwrap();
        sm.verify_block(&small_id, 0, &small).unwrap();
        assert!(sm.verify_block(&id, 0, &small).is_err());
    }
}
