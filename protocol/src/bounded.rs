//! A vector with a maximum length that is enforced while decoding, before any
//! allocation, so that a hostile length prefix cannot make a decoder reserve
//! memory for elements that will never arrive.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A `Vec<T>` holding at most `N` elements.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BoundedVec<T, const N: usize>(Vec<T>);

/// The vector was longer than its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} elements exceed the bound of {max}")]
pub struct TooManyElements {
    /// Elements offered.
    pub len: usize,
    /// The bound.
    pub max: usize,
}

impl<T, const N: usize> BoundedVec<T, N> {
    /// The bound.
    pub const MAX: usize = N;

    /// An empty vector.
    #[must_use]
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Wraps `items` if there are at most `N` of them.
    pub fn try_from_vec(items: Vec<T>) -> Result<Self, TooManyElements> {
        if items.len() > N {
            return Err(TooManyElements {
                len: items.len(),
                max: N,
            });
        }
        Ok(Self(items))
    }

    /// Appends `item` if there is room.
    pub fn try_push(&mut self, item: T) -> Result<(), TooManyElements> {
        if self.0.len() >= N {
            return Err(TooManyElements {
                len: self.0.len() + 1,
                max: N,
            });
        }
        self.0.push(item);
        Ok(())
    }

    /// Keeps only the elements for which `keep` is true.
    pub fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        self.0.retain(keep);
    }

    /// The elements.
    #[must_use]
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }

    /// Gives back the inner vector.
    #[must_use]
    pub fn into_vec(self) -> Vec<T> {
        self.0
    }
}

impl<T, const N: usize> Default for BoundedVec<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> std::ops::Deref for BoundedVec<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T, const N: usize> TryFrom<Vec<T>> for BoundedVec<T, N> {
    type Error = TooManyElements;
    fn try_from(items: Vec<T>) -> Result<Self, TooManyElements> {
        Self::try_from_vec(items)
    }
}

impl<'a, T, const N: usize> IntoIterator for &'a BoundedVec<T, N> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T: fmt::Debug, const N: usize> fmt::Debug for BoundedVec<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize, const N: usize> Serialize for BoundedVec<T, N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BoundedVisitor<T, const N: usize>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for BoundedVisitor<T, N> {
            type Value = BoundedVec<T, N>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {N} elements")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > N {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                // Reserve at most 4 KiB up front; anything beyond grows with
                // elements that were actually decoded.
                let cap = hint.min(4096 / std::mem::size_of::<T>().max(1));
                let mut items = Vec::with_capacity(cap);
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                    items.push(item);
                }
                Ok(BoundedVec(items))
            }
        }

        deserializer.deserialize_seq(BoundedVisitor::<T, N>(PhantomData))
    }
}
