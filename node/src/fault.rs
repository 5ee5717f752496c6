//! Fault injection for tests of verification: `commons node join --fault
//! corrupt:F[:SEED]` makes the node alter the outputs of each result it
//! returns with probability `F`, and sign the altered result as its own, as a
//! dishonest or broken node would; `--fault equivocate:F[:SEED]` makes it
//! alter, with probability `F`, the output it forwards to the next hop of a
//! streamed chain while it returns the true one to the coordinator.
//!
//! The corrupting code is compiled only with the `fault` cargo feature (the
//! end-to-end tests enable it); without it [`corrupt`] does nothing and the
//! flag does not exist.

use commons_protocol::Tensor;

#[cfg(feature = "fault")]
mod enabled {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use commons_protocol::{Hash, Tensor};

    /// `corrupt:F[:SEED]` or `equivocate:F[:SEED]`, parsed.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Fault {
        /// Probability of corrupting a result (or a forwarded output).
        pub probability: f64,
        /// Seed of the draws: the same seed corrupts the same results.
        pub seed: u64,
        /// Forwarded outputs are altered, not results.
        pub forwards: bool,
    }

    impl std::str::FromStr for Fault {
        type Err = String;

        fn from_str(s: &str) -> Result<Self, Self::Err> {
            let mut parts = s.split(':');
            let forwards = match parts.next() {
                Some("corrupt") => false,
                Some("equivocate") => true,
                _ => {
                    return Err(format!(
                        "{s:?}: the faults are corrupt:F[:SEED] and equivocate:F[:SEED]"
                    ));
                }
            };
            let probability: f64 = parts
                .next()
                .ok_or("corrupt:F needs a probability F")?
                .parse()
                .map_err(|e| format!("{s:?}: probability: {e}"))?;
            if !(0.0..=1.0).contains(&probability) {
                return Err(format!("{s:?}: the probability must be within 0..=1"));
            }
            let seed = match parts.next() {
                Some(v) => v.parse().map_err(|e| format!("{s:?}: seed: {e}"))?,
                None => 0,
            };
            if parts.next().is_some() {
                return Err(format!("{s:?}: expected corrupt:F[:SEED]"));
            }
            Ok(Self {
                probability,
                seed,
                forwards,
            })
        }
    }

    struct Installed {
        fault: Fault,
        draws: AtomicU64,
        corrupted: AtomicU64,
    }

    static FAULT: OnceLock<Installed> = OnceLock::new();

    /// Makes this process corrupt its results from now on.
    pub fn install(fault: Fault) {
        let _ = FAULT.set(Installed {
            fault,
            draws: AtomicU64::new(0),
            corrupted: AtomicU64::new(0),
        });
    }

    /// Results corrupted so far.
    pub fn corrupted() -> u64 {
        FAULT
            .get()
            .map_or(0, |f| f.corrupted.load(Ordering::Relaxed))
    }

    pub(super) fn corrupt(outputs: &mut [Tensor], forwards: bool) -> bool {
        let Some(installed) = FAULT.get().filter(|f| f.fault.forwards == forwards) else {
            return false;
        };
        let n = installed.draws.fetch_add(1, Ordering::Relaxed);
        let draw = Hash::of_parts(
            "commons fault draw v1",
            &[&installed.fault.seed.to_le_bytes(), &n.to_le_bytes()],
        );
        let mut b = [0u8; 8];
        b.copy_from_slice(&draw.0[..8]);
        let u = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
        if u >= installed.fault.probability {
            return false;
        }
        let Some(first) = outputs.first_mut() else {
            return false;
        };
        let altered = if let Some(mut tokens) = first.to_u32() {
            tokens[0] ^= 1;
            Tensor::from_u32(first.shape(), &tokens).ok()
        } else if let Some(mut values) = first.to_f32() {
            // Far beyond any tolerance between kernel paths.
            let scale = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let i = (n as usize) % values.len().max(1);
            if let Some(v) = values.get_mut(i) {
                *v += scale * 0.5 + 1.0;
            }
            Tensor::from_f32(first.shape(), &values).ok()
        } else {
            None
        };
        match altered {
            Some(t) => {
                *first = t;
                installed.corrupted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

#[cfg(feature = "fault")]
pub use enabled::{Fault, corrupted, install};

/// Alters `outputs` when a `corrupt` fault is installed and its draw says so; true if it did.
#[must_use]
pub fn corrupt(outputs: &mut [Tensor]) -> bool {
    #[cfg(feature = "fault")]
    {
        enabled::corrupt(outputs, false)
    }
    #[cfg(not(feature = "fault"))]
    {
        let _ = outputs;
        false
    }
}

/// Alters an output about to be forwarded when an `equivocate` fault is
/// installed and its draw says so; true if it did.
#[must_use]
pub fn equivocate(output: &mut Tensor) -> bool {
    #[cfg(feature = "fault")]
    {
        enabled::corrupt(std::slice::from_mut(output), true)
    }
    #[cfg(not(feature = "fault"))]
    {
        let _ = output;
        false
    }
}

#[cfg(all(test, feature = "fault"))]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_say_why_not() {
        let f: Fault = "corrupt:0.25:9".parse().unwrap();
        assert_eq!((f.probability, f.seed, f.forwards), (0.25, 9, false));
        let f: Fault = "equivocate:1".parse().unwrap();
        assert_eq!((f.probability, f.seed, f.forwards), (1.0, 0, true));
        assert_eq!("corrupt:1".parse::<Fault>().unwrap().seed, 0);
        for bad in [
            "flip:0.1",
            "corrupt",
            "corrupt:2",
            "corrupt:x",
            "corrupt:0.1:1:2",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }
}
