//! Wall-clock instants as plain numbers: the caller reads the clock.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch. Always passed in; this crate never reads a clock.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// `self + millis`, saturating at the end of time.
    #[must_use]
    pub fn plus_millis(self, millis: u64) -> Self {
        Self(self.0.saturating_add(millis))
    }

    /// `self - millis`, saturating at the epoch.
    #[must_use]
    pub fn minus_millis(self, millis: u64) -> Self {
        Self(self.0.saturating_sub(millis))
    }
}

impl std::fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}ms", self.0)
    }
}
