//! Verification policy: which results are re-executed by another node, how
//! two results of the same unit are compared, and what each node's record
//! earns it.
//!
//! The policy is BOINC's adaptive replication. A node nobody has checked yet
//! is on probation: every result it returns is re-executed elsewhere until
//! [`VerifyConfig::probation`] consecutive results agree. From then on a
//! result is checked with probability `max(p_min, 1 / valid)`, where `valid`
//! counts its consecutive agreeing results. Any disagreement that goes against
//! it resets the count to zero, and with it the probability to one.
//!
//! Two results agree when their outputs are bit-identical (blake3 digests
//! equal) for nodes of the same determinism class, or within
//! [`VerifyConfig::tolerance`] otherwise ([`agree`]). The [`Ledger`] keeps the
//! records, the profiles (operator key and determinism class) and the
//! exclusions; the scheduler ([`crate::job`]) decides and drives the checks.

use std::collections::{BTreeMap, BTreeSet};

use commons_protocol::messages::DeterminismClass;
use commons_protocol::tensor::DType;
use commons_protocol::{CoalitionId, NodeId, Tensor};
use serde::{Deserialize, Serialize};

/// Tunables of verification.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyConfig {
    /// Spot checks on (false: no result is ever re-executed).
    pub enabled: bool,
    /// Consecutive agreeing results a node needs before it is checked less
    /// than always.
    pub probation: u32,
    /// The lowest probability of a check, however long a node's record.
    pub p_min: f64,
    /// What a draw samples: one step, or a hop's whole session.
    pub sampling: Sampling,
    /// Compare every step a checker replays to rebuild a session's state, not
    /// only the sampled one (free extra verification: the checker computes
    /// those outputs anyway).
    pub compare_replays: bool,
    /// Largest difference tolerated between nodes of different determinism
    /// classes, relative to the larger of the two outputs' largest magnitude.
    pub tolerance: f32,
    /// A dispute no referee decides excludes nobody, but it is remembered:
    /// a node that has disagreed, undecided, with this many distinct
    /// operators in good standing is the odd one out, and is excluded as if
    /// it had lost (0: never). A liar out of a referee's reach meets a new
    /// checker at each lie; an honest node rarely meets two liars.
    pub undecided_limit: u32,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            probation: 10,
            p_min: 0.05,
            sampling: Sampling::Step,
            compare_replays: true,
            tolerance: DEFAULT_TOLERANCE,
            undecided_limit: 2,
        }
    }
}

/// What one draw of the check probability decides.
///
/// A checker must replay a hop's steps up to the one it checks (the KV cache
/// depends on them all), so the two choices cost differently for the same p.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// Each step of a hop is sampled with probability p: the fraction of
    /// results checked is exactly p, but the first sample of a session costs
    /// the replay of every step before it (`trust-overhead` bench: about 60%
    /// extra compute at p = 0.05 on 32-token jobs).
    Step,
    /// Each hop's session is shadowed whole with probability p, decided when
    /// it opens: a fraction p of results is checked in expectation, at a cost
    /// of p, but the samples come in whole sessions.
    Session,
}

/// Relative tolerance between kernel paths, from measurement. On
/// SmolLM2-135M Q4_1, the very same inputs through candle's quantized CPU
/// path (activations quantized to Q8_1) and through the weights dequantized
/// to f32 differ by at most, relative to the largest magnitude: 1.2e-2 on the
/// hidden states of layers 0..10, 7.1e-3 on layers 10..20, and 4.3e-2 on the
/// logits of layers 20..30, over two prompts of eight steps each
/// (`kernel_paths_differ_within_the_verification_tolerance` in the node's
/// tests prints them). The tolerance leaves room for about twice the worst.
pub const DEFAULT_TOLERANCE: f32 = 0.1;

/// Who runs a node and how it computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The key of the member who runs it: a check never goes to the same operator.
    pub operator: NodeId,
    /// Nodes of one class give bit-identical results.
    pub class: DeterminismClass,
}

/// A node's verification record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Consecutive results that agreed with a re-execution.
    pub valid_streak: u32,
    /// Results that agreed, in all.
    pub valid: u64,
    /// Disputes it lost (or could not win).
    pub invalid: u64,
}

/// Counts of what verification did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyStats {
    /// Steps sampled for a check.
    pub sampled: u64,
    /// Units sent to checkers and referees (the extra compute).
    pub check_units: u64,
    /// Steps compared against a re-execution.
    pub compared: u64,
    /// Comparisons that disagreed.
    pub mismatches: u64,
    /// Disputes decided by a third execution.
    pub decided: u64,
    /// Disputes no third node could decide.
    pub undecided: u64,
    /// Nodes excluded from a coalition's work.
    pub exclusions: u64,
    /// Sampled steps that could not be checked (no other node holds the span,
    /// or the hop was replaced first).
    pub unverifiable: u64,
    /// Jobs rolled back to re-execute results of a node that lost a dispute.
    pub rollbacks: u64,
}

/// The work an exclusion covers: a coalition's, or open work (`None`).
pub type Scope = Option<CoalitionId>;

/// Records, profiles and exclusions of every node the coordinator has used.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    config: VerifyConfig,
    records: BTreeMap<NodeId, Record>,
    profiles: BTreeMap<NodeId, Profile>,
    excluded: BTreeMap<NodeId, BTreeSet<Scope>>,
    /// The nodes each node disagreed with in disputes no referee decided.
    disagreed: BTreeMap<NodeId, BTreeSet<NodeId>>,
    /// Bumped by every change of a record, an exclusion or a disagreement.
    revision: u64,
    /// What verification did.
    pub stats: VerifyStats,
}

/// What a [`Ledger`] keeps across a coordinator's restart: records,
/// exclusions, undecided disagreements and counts. (Profiles come back
/// with the swarm's adverts.) Lists rather than maps, for any format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    /// Each node's record.
    pub records: Vec<(NodeId, Record)>,
    /// Each excluded node's scopes.
    pub excluded: Vec<(NodeId, Vec<Scope>)>,
    /// The nodes each node disagreed with, undecided.
    pub disagreed: Vec<(NodeId, Vec<NodeId>)>,
    /// What verification did.
    pub stats: VerifyStats,
}

impl Ledger {
    /// An empty ledger.
    #[must_use]
    pub fn new(config: VerifyConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// The policy.
    #[must_use]
    pub fn config(&self) -> &VerifyConfig {
        &self.config
    }

    /// Sets who runs each node and its determinism class (replacing earlier
    /// profiles). A node without a profile is its own operator, in a class of its own.
    pub fn set_profiles(&mut self, profiles: BTreeMap<NodeId, Profile>) {
        self.profiles = profiles;
    }

    /// `node`'s record.
    #[must_use]
    pub fn record(&self, node: &NodeId) -> Record {
        self.records.get(node).copied().unwrap_or_default()
    }

    /// Every record.
    #[must_use]
    pub fn records(&self) -> &BTreeMap<NodeId, Record> {
        &self.records
    }

    /// The probability that a result of `node` is checked: one on probation,
    /// then `max(p_min, 1 / valid_streak)`; zero when checks are off.
    #[must_use]
    pub fn probability(&self, node: &NodeId) -> f64 {
        if !self.config.enabled {
            return 0.0;
        }
        let streak = self.record(node).valid_streak;
        if streak < self.config.probation {
            1.0
        } else {
            (1.0 / f64::from(streak)).max(self.config.p_min).min(1.0)
        }
    }

    /// Whether to check a result of `node`, given a uniform 64-bit draw.
    #[must_use]
    pub fn sample(&self, node: &NodeId, draw: u64) -> bool {
        let p = self.probability(node);
        if p >= 1.0 {
            return true;
        }
        // `draw / 2^64 < p`, exact for the p of interest.
        (draw as f64) < p * 18_446_744_073_709_551_616.0
    }

    /// What to keep across a restart.
    #[must_use]
    pub fn state(&self) -> LedgerState {
        LedgerState {
            records: self.records.iter().map(|(n, r)| (*n, *r)).collect(),
            excluded: self
                .excluded
                .iter()
                .map(|(n, s)| (*n, s.iter().copied().collect()))
                .collect(),
            disagreed: self
                .disagreed
                .iter()
                .map(|(n, s)| (*n, s.iter().copied().collect()))
                .collect(),
            stats: self.stats,
        }
    }

    /// Takes back what [`Ledger::state`] kept (the policy and profiles stay).
    pub fn restore(&mut self, state: LedgerState) {
        self.records = state.records.into_iter().collect();
        self.excluded = state
            .excluded
            .into_iter()
            .map(|(n, s)| (n, s.into_iter().collect()))
            .collect();
        self.disagreed = state
            .disagreed
            .into_iter()
            .map(|(n, s)| (n, s.into_iter().collect()))
            .collect();
        self.stats = state.stats;
        self.revision += 1;
    }

    /// Changes so far: a new value means there is something new to keep.
    #[must_use]
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A result of `node` agreed with a re-execution.
    pub fn valid(&mut self, node: NodeId) {
        self.revision += 1;
        let r = self.records.entry(node).or_default();
        r.valid_streak = r.valid_streak.saturating_add(1);
        r.valid += 1;
    }

    /// `node` lost a dispute (or could not win one): its streak restarts.
    pub fn invalid(&mut self, node: NodeId) {
        self.revision += 1;
        let r = self.records.entry(node).or_default();
        r.valid_streak = 0;
        r.invalid += 1;
    }

    /// Takes `node` off `scope`'s work for good.
    pub fn exclude(&mut self, node: NodeId, scope: Scope) {
        self.revision += 1;
        if self.excluded.entry(node).or_default().insert(scope) {
            self.stats.exclusions += 1;
        }
    }

    /// `a` and `b` disagreed and no referee decided. Returns those of the two
    /// that have now disagreed, undecided, with
    /// [`VerifyConfig::undecided_limit`] distinct operators not excluded from
    /// `scope`: the ones to exclude.
    pub fn disagreed(&mut self, a: NodeId, b: NodeId, scope: Scope) -> Vec<NodeId> {
        self.revision += 1;
        self.disagreed.entry(a).or_default().insert(b);
        self.disagreed.entry(b).or_default().insert(a);
        let limit = self.config.undecided_limit as usize;
        if limit == 0 {
            return Vec::new();
        }
        [a, b]
            .into_iter()
            .filter(|n| !self.is_excluded(n, scope))
            .filter(|n| {
                let operators: BTreeSet<NodeId> = self.disagreed[n]
                    .iter()
                    .filter(|other| !self.is_excluded(other, scope))
                    .map(|other| self.operator(other))
                    .filter(|op| *op != self.operator(n))
                    .collect();
                operators.len() >= limit
            })
            .collect()
    }

    /// Whether `node` is off `scope`'s work.
    #[must_use]
    pub fn is_excluded(&self, node: &NodeId, scope: Scope) -> bool {
        self.excluded.get(node).is_some_and(|s| s.contains(&scope))
    }

    /// Every exclusion.
    #[must_use]
    pub fn exclusions(&self) -> &BTreeMap<NodeId, BTreeSet<Scope>> {
        &self.excluded
    }

    /// The key of the member who runs `node`.
    #[must_use]
    pub fn operator(&self, node: &NodeId) -> NodeId {
        self.profiles.get(node).map_or(*node, |p| p.operator)
    }

    /// Whether `a` and `b` give bit-identical results.
    #[must_use]
    pub fn same_class(&self, a: &NodeId, b: &NodeId) -> bool {
        match (self.profiles.get(a), self.profiles.get(b)) {
            (Some(pa), Some(pb)) => pa.class == pb.class,
            _ => a == b,
        }
    }

    /// Whether outputs of `a` and `b` for the same unit agree.
    #[must_use]
    pub fn agree(&self, a: (&NodeId, &Tensor), b: (&NodeId, &Tensor)) -> bool {
        agree(a.1, b.1, self.same_class(a.0, b.0), self.config.tolerance)
    }
}

/// Whether two outputs of the same unit agree: bit-identical within a
/// determinism class; across classes, integer outputs (tokens) must be equal
/// and float outputs of the same shape may differ by `tolerance` relative to
/// their largest magnitude. A non-finite value never agrees.
#[must_use]
pub fn agree(a: &Tensor, b: &Tensor, same_class: bool, tolerance: f32) -> bool {
    if a.digest() == b.digest() {
        return true;
    }
    if same_class || a.shape() != b.shape() || a.dtype() != b.dtype() {
        return false;
    }
    match a.dtype() {
        DType::F32 => {
            let (Some(x), Some(y)) = (a.to_f32(), b.to_f32()) else {
                return false;
            };
            let mut scale = 0f32;
            let mut diff = 0f32;
            for (u, v) in x.iter().zip(&y) {
                if !u.is_finite() || !v.is_finite() {
                    return false;
                }
                scale = scale.max(u.abs()).max(v.abs());
                diff = diff.max((u - v).abs());
            }
            diff <= tolerance * scale.max(f32::MIN_POSITIVE)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    fn class(kernel: &str) -> DeterminismClass {
        DeterminismClass {
            kernel: kernel.into(),
            build: "b".into(),
        }
    }

    #[test]
    fn a_restored_ledger_forgets_nothing() {
        let mut l = Ledger::new(VerifyConfig::default());
        for _ in 0..12 {
            l.valid(n(1));
        }
        l.invalid(n(2));
        l.exclude(n(2), None);
        l.disagreed(n(3), n(4), None);
        l.stats.sampled = 7;
        let state = l.state();
        let mut back = Ledger::new(VerifyConfig::default());
        let before = back.revision();
        back.restore(state.clone());
        assert_ne!(back.revision(), before);
        assert_eq!(back.state(), state);
        assert_eq!(back.probability(&n(1)), l.probability(&n(1)));
        assert!(back.is_excluded(&n(2), None));
        assert_eq!(back.stats.sampled, 7);
        // One more undecided disagreement of node 3, with another operator:
        // the one before the restart counts.
        assert_eq!(back.disagreed(n(3), n(5), None), vec![n(3)]);
    }

    #[test]
    fn probation_then_adaptive_then_reset() {
        let mut l = Ledger::new(VerifyConfig::default());
        for _ in 0..9 {
            l.valid(n(1));
            assert_eq!(l.probability(&n(1)), 1.0);
        }
        l.valid(n(1));
        assert!((l.probability(&n(1)) - 0.1).abs() < 1e-12);
        for _ in 0..10 {
            l.valid(n(1));
        }
        assert!((l.probability(&n(1)) - 0.05).abs() < 1e-12);
        for _ in 0..100 {
            l.valid(n(1));
        }
        assert!(
            (l.probability(&n(1)) - 0.05).abs() < 1e-12,
            "p_min floors it"
        );
        l.invalid(n(1));
        assert_eq!(l.probability(&n(1)), 1.0);
        assert_eq!(l.record(&n(1)).invalid, 1);
        assert_eq!(l.record(&n(1)).valid, 120);
    }

    #[test]
    fn sampling_follows_the_probability() {
        let mut l = Ledger::new(VerifyConfig::default());
        for _ in 0..20 {
            l.valid(n(1));
        }
        // p = 1/20: a stream of uniform draws picks about that fraction.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let picked = (0..100_000)
            .filter(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                l.sample(&n(1), state)
            })
            .count();
        assert!((4_700..5_300).contains(&picked), "{picked}");
        assert!(l.sample(&n(2), u64::MAX), "probation checks every result");
        let off = Ledger::new(VerifyConfig {
            enabled: false,
            ..VerifyConfig::default()
        });
        assert!(!off.sample(&n(2), 0));
    }

    #[test]
    fn exclusions_are_per_scope() {
        let mut l = Ledger::new(VerifyConfig::default());
        let c = CoalitionId(commons_protocol::Hash([3; 32]));
        l.exclude(n(1), Some(c));
        l.exclude(n(1), Some(c));
        assert!(l.is_excluded(&n(1), Some(c)));
        assert!(!l.is_excluded(&n(1), None));
        assert_eq!(l.stats.exclusions, 1);
    }

    #[test]
    fn outputs_agree_bitwise_within_a_class_and_within_tolerance_across() {
        let a = Tensor::from_f32(&[1, 3], &[1.0, -2.0, 4.0]).unwrap();
        let near = Tensor::from_f32(&[1, 3], &[1.001, -2.0, 4.0]).unwrap();
        let far = Tensor::from_f32(&[1, 3], &[1.5, -2.0, 4.0]).unwrap();
        assert!(agree(&a, &a.clone(), true, 0.0));
        assert!(!agree(&a, &near, true, 1e-2), "same class: bits must match");
        assert!(agree(&a, &near, false, 1e-2));
        assert!(!agree(&a, &far, false, 1e-2));
        let nan = Tensor::from_f32(&[1, 3], &[f32::NAN, -2.0, 4.0]).unwrap();
        assert!(!agree(&a, &nan, false, 1.0));
        let other_shape = Tensor::from_f32(&[3, 1], &[1.0, -2.0, 4.0]).unwrap();
        assert!(!agree(&a, &other_shape, false, 1.0));
        let t1 = Tensor::from_u32(&[1], &[5]).unwrap();
        let t2 = Tensor::from_u32(&[1], &[6]).unwrap();
        assert!(!agree(&t1, &t2, false, 1.0), "tokens must be equal");

        let mut l = Ledger::new(VerifyConfig::default());
        l.set_profiles(BTreeMap::from([
            (
                n(1),
                Profile {
                    operator: n(1),
                    class: class("cpu"),
                },
            ),
            (
                n(2),
                Profile {
                    operator: n(9),
                    class: class("cpu"),
                },
            ),
            (
                n(3),
                Profile {
                    operator: n(9),
                    class: class("cuda"),
                },
            ),
        ]));
        assert!(l.same_class(&n(1), &n(2)));
        assert!(!l.same_class(&n(1), &n(3)));
        assert!(!l.same_class(&n(1), &n(4)), "unknown nodes share no class");
        assert!(!l.agree((&n(1), &a), (&n(2), &near)));
        assert!(l.agree((&n(1), &a), (&n(3), &near)));
        assert_eq!(l.operator(&n(3)), n(9));
        assert_eq!(l.operator(&n(4)), n(4));
    }
}
