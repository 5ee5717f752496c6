//! Scenarios: what world to simulate, read from TOML.
//!
//! ```toml
//! name = "weibull-churn"
//! duration_s = 21600
//! sample_every_s = 60
//!
//! [population]
//! initial = 200              # nodes online at the start
//! arrivals_per_hour = 120    # new nodes, Poisson
//!
//! [churn]
//! session = { dist = "weibull", shape = 0.5, scale = 1800.0 }
//! downtime = { dist = "exponential", mean = 3600.0 }  # then rejoin, same identity
//! rejoin_probability = 0.5
//! graceful_fraction = 0.3   # leaves announced; the rest crash
//!
//! [nodes]
//! tokens_per_s = { dist = "lognormal", mu = 6.0, sigma = 0.5 }  # per layer
//! memory_layers = { dist = "uniform", low = 4.0, high = 16.0 }
//!
//! [model]
//! layers = 30
//!
//! [workload]
//! jobs_per_minute = 30
//! prompt_tokens = 40
//! max_tokens = 64
//!
//! [verification]            # the coordinator's spot checks (these are its defaults)
//! enabled = true
//! probation = 10             # results checked always before p falls
//! p_min = 0.05               # then p = max(p_min, 1 / streak)
//! compare_replays = true     # compare every step a checker replays
//! sampling = "step"          # or "session": shadow whole hop sessions
//!
//! [network.nat]             # nodes behind NAT (left out: every node reachable)
//! fraction = 0.4             # share of nodes behind NAT
//! hole_punch_success = 0.7   # of those, reached directly after hole punching
//! relay_rtt_ms = 40          # the others through a relay: this much longer round trips
//! relay_mbps = 10            # and at most this bandwidth
//!
//! [training]                 # training rounds (left out: none)
//! mode = "diloco"            # or "sync"
//! rounds = 100
//! shares = 8
//! inner_steps = 50           # diloco: local steps per share
//! parameters = 7500000
//! tokens_per_step = 1536     # rows × length of one share's step
//!
//! [adversaries]
//! fraction = 0.1             # share of nodes that corrupt results
//! corrupt_probability = 0.3  # f: each result they return is wrong with this probability
//! colluding = false          # colluders return the same wrong output for the same unit
//! honest_units = 0           # results returned honestly first, to earn trust
//! evade_checks = false       # answer re-executions (checks, referees) honestly
//! ```

use serde::{Deserialize, Serialize};

use commons_coordinator::verify::{Sampling, VerifyConfig};

use crate::dist::Dist;

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A name for reports.
    pub name: String,
    /// Simulated seconds.
    pub duration_s: f64,
    /// Seconds between rows of the time series.
    #[serde(default = "default_sample")]
    pub sample_every_s: f64,
    /// Who is there.
    pub population: Population,
    /// How they come and go.
    pub churn: Churn,
    /// What they bring.
    #[serde(default)]
    pub nodes: Nodes,
    /// The model served.
    #[serde(default)]
    pub model: Model,
    /// The jobs.
    #[serde(default)]
    pub workload: Workload,
    /// Latency between nodes.
    #[serde(default)]
    pub network: Network,
    /// Nodes that check for lost spans every this many seconds (0: never).
    #[serde(default = "default_rebalance")]
    pub rebalance_every_s: f64,
    /// Correlated regional outages.
    #[serde(default)]
    pub outages: Vec<Outage>,
    /// The coordinator's spot checks.
    #[serde(default)]
    pub verification: Verification,
    /// Nodes that corrupt their results.
    #[serde(default)]
    pub adversaries: Adversaries,
    /// Training rounds run beside the jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Training>,
}

/// Training rounds: a run of the real training coordinator
/// (`commons_coordinator::train`) over the online nodes. A share's time is
/// the fetch of the round's parameters (once per node and round), its
/// compute, and the upload of its values, each over the node's links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// `sync` (a gradient per share) or `diloco` (`inner_steps` local steps
    /// per share).
    #[serde(default)]
    pub mode: TrainingMode,
    /// Rounds in the run.
    pub rounds: u64,
    /// Shares per round.
    pub shares: u32,
    /// DiLoCo: local steps per share.
    #[serde(default = "default_inner")]
    pub inner_steps: u32,
    /// Model parameters.
    pub parameters: u64,
    /// Tokens in one step of one share (rows × length).
    pub tokens_per_step: u64,
    /// Work of one training token, in layers of the node's inference speed
    /// (`tokens_per_s` is per layer): a forward and a backward pass cost
    /// about three forwards; left out, three times the model's layers.
    #[serde(default)]
    pub layers_per_token: Option<f64>,
    /// Bytes per parameter of a share's answer (2: bf16).
    #[serde(default = "default_gradient_bytes")]
    pub gradient_bytes: f64,
    /// A share's deadline, seconds.
    #[serde(default = "default_share_timeout")]
    pub share_timeout_s: f64,
    /// How long a node that failed or missed a deadline gets no share.
    #[serde(default = "default_train_bench")]
    pub bench_s: f64,
    /// Seconds the coordinator takes to combine a round.
    #[serde(default = "default_aggregate")]
    pub aggregate_s: f64,
}

/// How a training round's shares are computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainingMode {
    /// A gradient per share.
    #[default]
    Sync,
    /// Local steps per share.
    Diloco,
}

fn default_inner() -> u32 {
    1
}

fn default_gradient_bytes() -> f64 {
    2.0
}

fn default_share_timeout() -> f64 {
    600.0
}

fn default_train_bench() -> f64 {
    60.0
}

fn default_aggregate() -> f64 {
    1.0
}

/// Nodes behind NAT: not dialable; a share of them is reached directly
/// after hole punching (DCUtR), the rest only through a relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nat {
    /// Share of nodes behind NAT.
    pub fraction: f64,
    /// Of those, the share reached directly after hole punching.
    #[serde(default = "default_punch")]
    pub hole_punch_success: f64,
    /// Extra round trip through a relay, milliseconds.
    #[serde(default = "default_relay_rtt")]
    pub relay_rtt_ms: f64,
    /// A relayed node's bandwidth cap, both ways, Mbit/s.
    #[serde(default = "default_relay_mbps")]
    pub relay_mbps: f64,
}

fn default_punch() -> f64 {
    0.7
}

fn default_relay_rtt() -> f64 {
    40.0
}

fn default_relay_mbps() -> f64 {
    10.0
}

fn default_sample() -> f64 {
    60.0
}

fn default_rebalance() -> f64 {
    30.0
}

/// Arrivals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Population {
    /// Nodes online at time 0 (their remaining sessions are drawn like new ones).
    #[serde(default)]
    pub initial: u32,
    /// New nodes per hour (a Poisson process; the mean rate when diurnal).
    #[serde(default)]
    pub arrivals_per_hour: f64,
    /// Daily swing of the arrival rate, 0 to 1: the rate is
    /// `arrivals_per_hour × (1 + a·cos(2π (h − peak)/24))` at hour `h` of the day.
    #[serde(default)]
    pub diurnal_amplitude: f64,
    /// Hour of the day when arrivals peak.
    #[serde(default = "default_peak")]
    pub diurnal_peak_hour: f64,
}

fn default_peak() -> f64 {
    20.0
}

/// A correlated outage: at `at_s`, every node inside a square covering
/// `fraction` of the world (placed at random) crashes, and comes back
/// `duration_s` later with the same identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// When, simulated seconds.
    pub at_s: f64,
    /// How long the region stays dark.
    pub duration_s: f64,
    /// Share of the world's area.
    pub fraction: f64,
}

/// One line of a churn trace: node `node` is online from `join_s` to `leave_s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRow {
    /// The node (the same number for the same identity).
    pub node: u64,
    /// Join time, seconds.
    pub join_s: f64,
    /// Leave time, seconds.
    pub leave_s: f64,
}

/// Reads a churn trace: CSV lines `node,join_s,leave_s` (a header line and
/// `#` comments are skipped).
pub fn parse_trace(text: &str) -> Result<Vec<TraceRow>, ScenarioError> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed = match fields.as_slice() {
            [a, b, c] => (a.parse::<u64>(), b.parse::<f64>(), c.parse::<f64>()),
            _ => {
                return Err(ScenarioError::Invalid(format!(
                    "trace line {}: expected node,join_s,leave_s",
                    n + 1
                )));
            }
        };
        match parsed {
            (Ok(node), Ok(join_s), Ok(leave_s)) => {
                if !(join_s >= 0.0 && leave_s > join_s) {
                    return Err(ScenarioError::Invalid(format!(
                        "trace line {}: need 0 ≤ join_s < leave_s",
                        n + 1
                    )));
                }
                rows.push(TraceRow {
                    node,
                    join_s,
                    leave_s,
                });
            }
            // A header.
            _ if n == 0 || rows.is_empty() => {}
            _ => {
                return Err(ScenarioError::Invalid(format!(
                    "trace line {}: not numbers: {line}",
                    n + 1
                )));
            }
        }
    }
    Ok(rows)
}

/// Sessions and downtimes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// How long a node stays online.
    pub session: Dist,
    /// How long a node that will come back stays away.
    #[serde(default)]
    pub downtime: Option<Dist>,
    /// Probability that a leaving node comes back later (with the same identity).
    #[serde(default)]
    pub rejoin_probability: f64,
    /// Fraction of leaves that are announced (the rest are crashes, found by timeouts).
    #[serde(default = "default_graceful")]
    pub graceful_fraction: f64,
}

fn default_graceful() -> f64 {
    0.5
}

/// Node heterogeneity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nodes {
    /// Tokens per second one layer runs at on the node (prefill and decode alike).
    pub tokens_per_s: Dist,
    /// Layers the node can hold.
    pub memory_layers: Dist,
    /// Upload bandwidth, Mbit/s (left out: links never limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_mbps: Option<Dist>,
    /// Download bandwidth, Mbit/s (left out: links never limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_mbps: Option<Dist>,
}

impl Default for Nodes {
    fn default() -> Self {
        Self {
            tokens_per_s: Dist::LogNormal {
                mu: 6.0,
                sigma: 0.5,
            },
            memory_layers: Dist::Uniform {
                low: 4.0,
                high: 16.0,
            },
            up_mbps: None,
            down_mbps: None,
        }
    }
}

/// The model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Transformer blocks.
    pub layers: u32,
    /// Longest sequence.
    pub context: u32,
    /// Bytes of one token's hidden state between hops (left out: 2,304,
    /// SmolLM2-135M's 576 f32 values). Counted only where links are limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_bytes_per_token: Option<u64>,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            layers: 30,
            context: 2048,
            hidden_bytes_per_token: None,
        }
    }
}

/// Inference jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// New jobs per minute (Poisson).
    pub jobs_per_minute: f64,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Tokens generated per job.
    pub max_tokens: u32,
    /// Distinct submitters (jobs are spread over them evenly).
    pub submitters: u32,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            jobs_per_minute: 10.0,
            prompt_tokens: 40,
            max_tokens: 64,
            submitters: 8,
        }
    }
}

/// Latency from coordinates: nodes sit uniformly on a square of
/// `world_km`², and a round trip costs `base_rtt_ms` plus `ms_per_1000km`
/// per 1000 km of distance (there and back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Side of the world, kilometres.
    pub world_km: f64,
    /// Round trip at distance 0, milliseconds.
    pub base_rtt_ms: f64,
    /// Added per 1000 km, milliseconds.
    pub ms_per_1000km: f64,
    /// Nodes behind NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Nat>,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            world_km: 8000.0,
            base_rtt_ms: 2.0,
            ms_per_1000km: 20.0,
            nat: None,
        }
    }
}

/// The coordinator's verification policy (see `commons_coordinator::verify`).
/// Left out, it is the coordinator's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verification {
    /// Spot checks on.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Consecutive agreeing results a node needs before it is checked less than always.
    #[serde(default = "default_probation")]
    pub probation: u32,
    /// The lowest check probability: past probation a result is checked with
    /// probability `max(p_min, 1 / streak)`.
    #[serde(default = "default_p_min")]
    pub p_min: f64,
    /// Compare every step a checker replays, not only the sampled one.
    #[serde(default = "yes")]
    pub compare_replays: bool,
    /// What a draw samples: one step of a hop, or the hop's whole session.
    #[serde(default)]
    pub sampling: CheckSampling,
}

fn yes() -> bool {
    true
}

fn default_probation() -> u32 {
    VerifyConfig::default().probation
}

fn default_p_min() -> f64 {
    VerifyConfig::default().p_min
}

impl Default for Verification {
    fn default() -> Self {
        let c = VerifyConfig::default();
        Self {
            enabled: c.enabled,
            probation: c.probation,
            p_min: c.p_min,
            compare_replays: c.compare_replays,
            sampling: CheckSampling::default(),
        }
    }
}

impl Verification {
    /// The coordinator's configuration for this policy.
    #[must_use]
    pub fn config(&self) -> VerifyConfig {
        VerifyConfig {
            enabled: self.enabled,
            probation: self.probation,
            p_min: self.p_min,
            compare_replays: self.compare_replays,
            sampling: match self.sampling {
                CheckSampling::Step => Sampling::Step,
                CheckSampling::Session => Sampling::Session,
            },
            ..VerifyConfig::default()
        }
    }
}

/// What one draw of the check probability samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckSampling {
    /// Each step of a hop, with probability p.
    #[default]
    Step,
    /// Each hop's session whole, with probability p decided when it opens.
    Session,
}

/// Adversaries: a share of the nodes return wrong results.
///
/// Of the nodes online at the start, exactly `round(fraction × initial)` are
/// adversaries; each later arrival is one with probability `fraction`. The
/// choice comes from the simulation's own random stream. An adversary alters
/// the outputs it returns, never its own session state, so its later outputs
/// are right on the inputs it is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adversaries {
    /// Share of nodes that corrupt results, 0 to 1.
    #[serde(default)]
    pub fraction: f64,
    /// Probability `f` that an adversary corrupts a result it returns.
    #[serde(default = "default_corrupt")]
    pub corrupt_probability: f64,
    /// Adversaries act together: for the same unit (the same layers on the
    /// same inputs) they all lie or all tell the truth, and their lies are
    /// identical, so a colluding checker agrees with a colluding hop.
    /// Otherwise each lies on its own draws, and two lies never agree.
    #[serde(default)]
    pub colluding: bool,
    /// Results an adversary returns honestly before it starts to corrupt
    /// (it builds a record first, and is checked less by then).
    #[serde(default)]
    pub honest_units: u64,
    /// Adversaries tell re-executions (checks and referees) from chain work
    /// and answer them honestly: only their own chain results are ever wrong.
    #[serde(default)]
    pub evade_checks: bool,
}

fn default_corrupt() -> f64 {
    1.0
}

impl Default for Adversaries {
    fn default() -> Self {
        Self {
            fraction: 0.0,
            corrupt_probability: default_corrupt(),
            colluding: false,
            honest_units: 0,
            evade_checks: false,
        }
    }
}

/// A scenario that cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not TOML, or not this shape.
    #[error("the scenario is not valid TOML for a scenario: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value out of range.
    #[error("{0}")]
    Invalid(String),
}

impl Scenario {
    /// Parses and checks a scenario.
    pub fn from_toml(text: &str) -> Result<Self, ScenarioError> {
        let s: Self = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// blake3 of the scenario's canonical JSON form (stamped on every output).
    #[must_use]
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&json).to_hex()[..16].to_owned()
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError::Invalid(m));
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return bad("duration_s must be > 0".into());
        }
        if !(self.sample_every_s.is_finite() && self.sample_every_s > 0.0) {
            return bad("sample_every_s must be > 0".into());
        }
        if !(0.0..=1.0).contains(&self.churn.rejoin_probability)
            || !(0.0..=1.0).contains(&self.churn.graceful_fraction)
        {
            return bad("rejoin_probability and graceful_fraction are probabilities".into());
        }
        if self.churn.rejoin_probability > 0.0 && self.churn.downtime.is_none() {
            return bad("rejoin_probability > 0 needs a downtime distribution".into());
        }
        if !(0.0..=1.0).contains(&self.population.diurnal_amplitude) {
            return bad("population.diurnal_amplitude must be between 0 and 1".into());
        }
        for o in &self.outages {
            if !(o.at_s >= 0.0 && o.duration_s > 0.0 && o.fraction > 0.0 && o.fraction <= 1.0) {
                return bad("outages: need at_s ≥ 0, duration_s > 0, 0 < fraction ≤ 1".into());
            }
        }
        if self.population.arrivals_per_hour < 0.0 || self.workload.jobs_per_minute < 0.0 {
            return bad("rates must be ≥ 0".into());
        }
        if self.model.layers == 0 || self.workload.submitters == 0 {
            return bad("model.layers and workload.submitters must be ≥ 1".into());
        }
        if self.workload.prompt_tokens == 0
            || self.workload.prompt_tokens + self.workload.max_tokens > self.model.context
        {
            return bad("prompt_tokens must be ≥ 1 and prompt + max tokens fit the context".into());
        }
        let v = &self.verification;
        if !(v.p_min.is_finite() && (0.0..=1.0).contains(&v.p_min)) {
            return bad(format!(
                "verification.p_min must be a probability, 0 to 1 (got {})",
                v.p_min
            ));
        }
        let a = &self.adversaries;
        for (what, x) in [
            ("adversaries.fraction", a.fraction),
            ("adversaries.corrupt_probability", a.corrupt_probability),
        ] {
            if !(x.is_finite() && (0.0..=1.0).contains(&x)) {
                return bad(format!("{what} must be a probability, 0 to 1 (got {x})"));
            }
        }
        if let Some(nat) = &self.network.nat {
            let p = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
            if !(p(nat.fraction) && p(nat.hole_punch_success)) {
                return bad(
                    "network.nat: fraction and hole_punch_success are probabilities".into(),
                );
            }
            if !(nat.relay_rtt_ms >= 0.0 && nat.relay_mbps > 0.0) {
                return bad("network.nat: relay_rtt_ms ≥ 0 and relay_mbps > 0".into());
            }
        }
        if let Some(t) = &self.training {
            if t.rounds == 0 || t.shares == 0 || t.inner_steps == 0 {
                return bad("training: rounds, shares and inner_steps must be ≥ 1".into());
            }
            if t.parameters == 0 || t.tokens_per_step == 0 {
                return bad("training: parameters and tokens_per_step must be ≥ 1".into());
            }
            let positive = |x: f64| x.is_finite() && x > 0.0;
            if !(positive(t.share_timeout_s)
                && positive(t.gradient_bytes)
                && t.bench_s >= 0.0
                && t.aggregate_s >= 0.0
                && t.layers_per_token.is_none_or(positive))
            {
                return bad(
                    "training: share_timeout_s, gradient_bytes and layers_per_token must be > 0, \
                     bench_s and aggregate_s ≥ 0"
                        .into(),
                );
            }
        }
        for (what, d) in [
            ("churn.session", Some(&self.churn.session)),
            ("churn.downtime", self.churn.downtime.as_ref()),
            ("nodes.tokens_per_s", Some(&self.nodes.tokens_per_s)),
            ("nodes.memory_layers", Some(&self.nodes.memory_layers)),
            ("nodes.up_mbps", self.nodes.up_mbps.as_ref()),
            ("nodes.down_mbps", self.nodes.down_mbps.as_ref()),
        ] {
            if let Some(d) = d {
                d.validate()
                    .map_err(|e| ScenarioError::Invalid(format!("{what}: {}", e.0)))?;
            }
        }
        Ok(())
    }
}
