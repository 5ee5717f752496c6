//! The one place where Commons turns values into bytes and back.
//!
//! Today the format is bincode 2 (standard configuration: little-endian,
//! variable-length integers) through serde. bincode carries the RustSec
//! advisory RUSTSEC-2025-0141 ("unmaintained"); because every message type is a
//! plain serde type and nothing else in the workspace names bincode, the format
//! can be swapped here (postcard is the maintained alternative) without
//! touching a message.
//!
//! Every decode has an explicit [`Limit`]: an input longer than the limit is
//! refused before decoding starts, and bincode counts every byte it reads or
//! reserves for a string or byte buffer against the same limit, so decoding
//! never allocates more than the limit whatever the input. Sequences are
//! [`BoundedVec`](crate::BoundedVec)s, which refuse over-long length prefixes
//! before reserving anything.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A byte limit for one kind of message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// 4 KiB: error replies, leave notices.
    K4,
    /// 16 KiB: capacity adverts.
    K16,
    /// 1 MiB: coalition charters.
    M1,
    /// 64 MiB: work units (hidden states of a long prompt on a wide model).
    M64,
    /// 256 MiB: work results (several output tensors or a gradient shard).
    M256,
}
// Every limit is a decode tier, so a limit is enforced exactly.
const _: () = assert!(
    Limit::K4.bytes() == TIERS[0]
        && Limit::K16.bytes() == TIERS[1]
        && Limit::M1.bytes() == TIERS[4]
);
const _: () = assert!(Limit::M64.bytes() == TIERS[7] && Limit::M256.bytes() == TIERS[8]);

impl Limit {
    /// The limit in bytes.
    #[must_use]
    pub const fn bytes(self) -> usize {
        match self {
            Limit::K4 => 4 << 10,
            Limit::K16 => 16 << 10,
            Limit::M1 => 1 << 20,
            Limit::M64 => 64 << 20,
            Limit::M256 => 256 << 20,
        }
    }
}

/// A value that could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("could not encode value")]
pub struct EncodeError(#[source] bincode::error::EncodeError);

/// Bytes that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is longer than the limit for its kind.
    #[error("{len} bytes exceed the limit of {limit} bytes")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A value was decoded but bytes were left over.
    #[error("{extra} trailing bytes after the value")]
    TrailingBytes {
        /// Bytes left over.
        extra: usize,
    },
    /// The bytes are not a valid encoding of the type.
    #[error("malformed bytes")]
    Malformed(#[source] bincode::error::DecodeError),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` in the canonical Commons encoding. The same value always
/// gives the same bytes, so hashes and signatures can be taken over them.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, config()).map_err(EncodeError)
}

/// Decodes exactly one `T` from `bytes`, never reading or allocating more than `limit`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: Limit) -> Result<T, DecodeError> {
    if bytes.len() > limit.bytes() {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit: limit.bytes(),
        });
    }
    // bincode counts the bytes of every string and byte buffer against the
    // limit before allocating them. Those bytes must also be present in the
    // input; but bincode also counts every integer at its full width (8 for a
    // `u64`) where the varint on the wire may take 1, so a valid input can
    // count for more than its own length. Decode under the smallest tier that
    // fits twice the input: a short hostile input announcing a huge buffer is
    // still refused without reserving the kind's limit, and a large message
    // (tensor bytes and a header of a few dozen integers) always fits.
    let fits = TIERS
        .iter()
        .copied()
        .find(|&t| t >= bytes.len().saturating_mul(2))
        .unwrap_or(usize::MAX);
    let tier = fits.min(limit.bytes());
    let (value, used) = match tier {
        t if t <= 4 << 10 => decode_limited::<T, { 4 << 10 }>(bytes),
        t if t <= 16 << 10 => decode_limited::<T, { 16 << 10 }>(bytes),
        t if t <= 64 << 10 => decode_limited::<T, { 64 << 10 }>(bytes),
        t if t <= 256 << 10 => decode_limited::<T, { 256 << 10 }>(bytes),
        t if t <= 1 << 20 => decode_limited::<T, { 1 << 20 }>(bytes),
        t if t <= 4 << 20 => decode_limited::<T, { 4 << 20 }>(bytes),
        t if t <= 16 << 20 => decode_limited::<T, { 16 << 20 }>(bytes),
        t if t <= 64 << 20 => decode_limited::<T, { 64 << 20 }>(bytes),
        _ => decode_limited::<T, { 256 << 20 }>(bytes),
    }
    .map_err(DecodeError::Malformed)?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes {
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

/// Decode limits tried, smallest first; every [`Limit`] is one of them.
const TIERS: [usize; 9] = [
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
];

fn decode_limited<T: DeserializeOwned, const N: usize>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, config().with_limit::<N>())
}

/// Bytes of the big-endian length prefix of a frame.
pub const FRAME_HEADER_LEN: usize = 4;

/// A frame on a stream that breaks the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced frame length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// Appends `payload` to `out` as one frame: a 4-byte big-endian length, then the payload.
pub fn write_frame(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        limit: u32::MAX as usize,
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Splits length-prefixed frames off a byte stream, sans I/O: feed it bytes as
/// they arrive, take frames as they complete. It never buffers more than one
/// frame plus its header, and refuses a frame longer than its limit as soon as
/// the header arrives.
#[derive(Debug)]
pub struct FrameDecoder {
    limit: usize,
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder that accepts frames of at most `limit` bytes.
    #[must_use]
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            buf: Vec::new(),
        }
    }

    /// Bytes that would complete the current header or frame; never more than
    /// is needed, so a caller reading into a buffer of this size can't overfill.
    #[must_use]
    pub fn wanted(&self) -> usize {
        if self.buf.len() < FRAME_HEADER_LEN {
            return FRAME_HEADER_LEN - self.buf.len();
        }
        self.announced().saturating_add(FRAME_HEADER_LEN) - self.buf.len()
    }

    fn announced(&self) -> usize {
        let mut len = [0u8; FRAME_HEADER_LEN];
        len.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        u32::from_be_bytes(len) as usize
    }

    /// Consumes bytes from the front of `input` (at most [`Self::wanted`]),
    /// returning how many were used and the frame if one completed.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Vec<u8>>), FrameError> {
        let take = input.len().min(self.wanted());
        self.buf.extend_from_slice(&input[..take]);
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok((take, None));
        }
        let len = self.announced();
        if len > self.limit {
            return Err(FrameError::TooLarge {
                len,
                limit: self.limit,
            });
        }
        if self.buf.len() == FRAME_HEADER_LEN + len {
            let frame = self.buf.split_off(FRAME_HEADER_LEN);
            self.buf.clear();
            return Ok((take, Some(frame)));
        }
        Ok((take, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rejects_oversized_and_trailing() {
        let bytes = encode(&(1u32, String::from("x"))).unwrap();
        assert_eq!(
            decode::<(u32, String)>(&bytes, Limit::K4).unwrap(),
            (1, "x".into())
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<(u32, String)>(&trailing, Limit::K4),
            Err(DecodeError::TrailingBytes { extra: 1 })
        ));
        let big = encode(&vec![0u8; 5000]).unwrap();
        assert!(matches!(
            decode::<Vec<u8>>(&big, Limit::K4),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_byte_buffer_just_under_a_tier_with_integers_beside_it_decodes() {
        // The buffer's bytes and the integers' full widths together count for
        // more than the input's length, which sits just under 16 KiB.
        type M = (Vec<u64>, serde_bytes::ByteBuf);
        let ints = vec![1u64; 64];
        let buf = serde_bytes::ByteBuf::from(vec![7u8; (16 << 10) - 200]);
        let bytes = encode(&(ints.clone(), buf.clone())).unwrap();
        assert!(bytes.len() < 16 << 10, "{}", bytes.len());
        assert_eq!(decode::<M>(&bytes, Limit::M1).unwrap(), (ints, buf));
    }

    #[test]
    fn hostile_length_prefix_is_refused_before_allocating() {
        // A byte buffer that claims 60 MiB within an input of a few bytes.
        let mut bytes = Vec::new();
        bytes.push(252u8); // bincode varint: u32 follows
        bytes.extend_from_slice(&(60u32 << 20).to_le_bytes());
        assert!(matches!(
            decode::<serde_bytes::ByteBuf>(&bytes, Limit::K16),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn frames_split_across_feeds() {
        let mut stream = Vec::new();
        write_frame(&mut stream, b"hello").unwrap();
        write_frame(&mut stream, b"").unwrap();
        write_frame(&mut stream, b"world!").unwrap();
        let mut dec = FrameDecoder::new(16);
        let mut frames = Vec::new();
        for chunk in stream.chunks(3) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (used, frame) = dec.feed(rest).unwrap();
                rest = &rest[used..];
                frames.extend(frame);
            }
        }
        assert_eq!(frames, vec![b"hello".to_vec(), vec![], b"world!".to_vec()]);
    }

    #[test]
    fn oversized_frame_is_refused_at_its_header() {
        let mut dec = FrameDecoder::new(8);
        assert_eq!(
            dec.feed(&100u32.to_be_bytes()),
            Err(FrameError::TooLarge { len: 100, limit: 8 })
        );
    }
}
