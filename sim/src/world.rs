//! The simulation: simulated nodes that come and go, and the real
//! coordinator code (placement, routing, the job scheduler with its failover)
//! driven against them on a virtual clock.
//!
//! Nothing here decides what the coordinator would: nodes choose their span
//! with [`placement::choose_span_in`] and move with [`placement::should_move`],
//! jobs go through [`Scheduler`], spot checks included, exactly as in a node.
//! The simulation only supplies time, latency, compute durations, deaths,
//! and the nodes' answers: a stand-in model ([`crate::executor`]) whose
//! outputs depend on each session's history, and adversaries that corrupt
//! them. Knowing the truth, it counts what verification caught and missed.

use std::collections::{BTreeMap, BTreeSet};

use commons_coordinator::job::{
    JobStatus, NewJob, Output, Scheduler, SchedulerConfig, StepFailure, Ticket,
};
use commons_coordinator::placement::{self, Assignment, ModelShape, NodeCapacity, Plan};
use commons_coordinator::verify::VerifyStats;
use commons_protocol::messages::{LayerRange, SamplingParams};
use commons_protocol::{Hash, JobId, ModelId, NodeId, SessionId, UnixMillis};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::dist::Dist;
use crate::executor::{self, Session};
use crate::scenario::Scenario;

mod offers;
mod queue;
mod training;
mod units;

pub use training::TrainingReport;

use offers::OfferBook;
use queue::Queue;
use units::{Flight, JobTrack};

/// Microseconds of simulated time.
pub type Micros = u64;

const SECOND: Micros = 1_000_000;
const MODEL: ModelId = ModelId(Hash([7; 32]));

fn secs(x: f64) -> Micros {
    (x.max(0.0) * SECOND as f64) as Micros
}

/// One row of the time series.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    /// Simulated seconds.
    pub t_s: f64,
    /// Nodes online.
    pub online: u32,
    /// Online nodes serving a span.
    pub serving: u32,
    /// Fraction of layers with at least one server.
    pub coverage: f64,
    /// Jobs generating or queued.
    pub jobs_active: u32,
    /// Jobs finished, all time.
    pub jobs_done: u64,
    /// Jobs failed (after acceptance), all time.
    pub jobs_failed: u64,
    /// Jobs refused at submission (no route), all time.
    pub jobs_refused: u64,
    /// Tokens generated, all time.
    pub tokens: u64,
    /// Tokens per second since the previous row.
    pub tokens_per_s: f64,
    /// Hops replaced after failures, all time.
    pub failovers: u64,
    /// Node-seconds of compute spent on units whose node died before answering.
    pub wasted_compute_s: f64,
    /// Node-seconds of chain compute that re-ran steps a job had already run
    /// (rebuilding a replaced hop's cache, or generating again after a rollback).
    pub redone_compute_s: f64,
    /// Units sent to checkers and referees, all time (the coordinator's count).
    pub check_units: u64,
    /// Node-seconds of compute on check and referee units: the extra compute of verification.
    pub check_compute_s: f64,
    /// Comparisons that disagreed, all time.
    pub mismatches: u64,
    /// Adversaries excluded, all time (the simulation knows who lies).
    pub catches: u64,
    /// Honest nodes excluded, all time.
    pub false_alarms: u64,
    /// Corrupted results returned by adversaries, all time.
    pub corrupt_results: u64,
    /// Tokens released to submitters that differ from what honest nodes
    /// generate, all time (a token revised later still counts).
    pub corrupt_tokens_released: u64,
    /// Jobs sent back to re-execute results of a node that failed
    /// verification, all time.
    pub rollbacks: u64,
    /// Training rounds completed, all time.
    pub train_rounds: u64,
}

/// What one adversary did, by the simulation's ground truth.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Adversary {
    /// The node: its index, in the order nodes appeared.
    pub node: u32,
    /// Results it returned while online (any lane).
    pub results: u64,
    /// Of those, corrupted.
    pub corrupted: u64,
    /// Corrupted chain results the coordinator accepted.
    pub corrupt_chain: u64,
    /// When its first corrupted chain result was accepted, simulated seconds.
    pub onset_s: Option<f64>,
    /// The coordinator's check probability for it then.
    pub p_at_onset: Option<f64>,
    /// The lowest and highest check probability the coordinator applied to
    /// its corrupted chain results, up to and including the first sampled.
    pub p_range: Option<(f64, f64)>,
    /// Its corrupted chain results, counted up to and including the first
    /// that the coordinator sampled for a check.
    pub to_first_sample: Option<u64>,
    /// When it was excluded, simulated seconds.
    pub excluded_s: Option<f64>,
    /// Results it had returned by then (any lane).
    pub results_at_exclusion: Option<u64>,
    /// Corrupted results it had returned by then (any lane).
    pub corrupted_at_exclusion: Option<u64>,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The scenario's hash.
    pub scenario_hash: String,
    /// blake3 over every event, in order: equal for equal seeds and scenarios.
    pub event_log_hash: String,
    /// Events processed.
    pub events: u64,
    /// The time series.
    pub rows: Vec<Row>,
    /// Sessions that ended: (start, length), seconds (for validation).
    pub sessions_s: Vec<(f64, f64)>,
    /// The event log, one JSON object per line (when asked for).
    pub event_log: Option<Vec<String>>,
    /// Seconds from submission to the end, of every finished job.
    pub job_latencies_s: Vec<f64>,
    /// Every adversary, by node index.
    pub adversaries: Vec<Adversary>,
    /// What the coordinator's verification did.
    pub verify: VerifyStats,
    /// Node-seconds of chain compute (units of jobs' own chains) answered.
    pub chain_compute_s: f64,
    /// Finished jobs whose text differs from what honest nodes generate.
    pub jobs_wrong: u64,
    /// The training run, when the scenario has one.
    pub training: Option<TrainingReport>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    NodeArrival,
    Join(u32),
    /// Node, and the session (epoch) that ends: a stale leave is ignored.
    Leave(u32, u32),
    Outage(u32),
    /// A departure from a trace.
    TraceLeave(u32),
    JobArrival,
    UnitDone {
        ticket: u64,
        node: u32,
        epoch: u32,
    },
    Tick,
    Sample,
    Rebalance,
    /// A training share's answer arrives.
    ShareDone {
        ticket: u64,
        node: u32,
        epoch: u32,
    },
    /// The training coordinator has combined a round.
    Aggregated(u64),
    TrainTick,
}

/// A simulated node (its id is made from its index: [`node_id`]).
#[derive(Debug, Clone)]
struct SimNode {
    online: bool,
    /// Bumped at every leave, so a unit in flight on a dead session is dropped.
    epoch: u32,
    tokens_per_s: f64,
    memory_layers: u32,
    pos: (f64, f64),
    span: Option<LayerRange>,
    busy_until: Micros,
    joined_at: Micros,
    /// Corrupts results.
    adversary: bool,
    /// Units it has run, all time.
    units: u64,
    /// Upload and download, bits per second (infinite: links never limit).
    up_bps: f64,
    down_bps: f64,
    /// Behind NAT without a direct path: reached through a relay.
    relayed: bool,
}

/// Independent random streams, one per subsystem, each derived from the seed
/// and its name: adding draws to one never shifts another.
struct Streams {
    arrivals: ChaCha8Rng,
    churn: ChaCha8Rng,
    nodes: ChaCha8Rng,
    jobs: ChaCha8Rng,
    /// Who is an adversary.
    adversaries: ChaCha8Rng,
    /// When a non-colluding adversary lies, and how.
    corruption: ChaCha8Rng,
    /// Nodes' bandwidth and NAT.
    links: ChaCha8Rng,
}

fn stream(seed: u64, name: &str) -> ChaCha8Rng {
    let mut h = blake3::Hasher::new();
    h.update(b"commons sim stream v1");
    h.update(&seed.to_le_bytes());
    h.update(name.as_bytes());
    ChaCha8Rng::from_seed(*h.finalize().as_bytes())
}

/// A simulation in progress.
pub struct Simulation {
    scenario: Scenario,
    seed: u64,
    now: Micros,
    end: Micros,
    seq: u64,
    queue: Queue<Event>,
    rng: Streams,
    nodes: Vec<SimNode>,
    /// What online nodes serve, kept up to date.
    plan: Plan,
    shape: ModelShape,
    scheduler: Scheduler,
    /// Whose offers the scheduler has yet to see changed.
    offers: OfferBook,
    /// Nodes were added since the scheduler last got their profiles.
    profiles_dirty: bool,
    /// Units in flight, by ticket.
    in_flight: BTreeMap<u64, Flight>,
    /// Sessions open on nodes, by job, then (node, session).
    sessions: BTreeMap<JobId, BTreeMap<(u32, SessionId), Session>>,
    submitted: BTreeMap<JobId, Micros>,
    next_job: u64,
    log: LogHash,
    log_lines: Option<Vec<String>>,
    events: u64,
    rows: Vec<Row>,
    sessions_s: Vec<(f64, f64)>,
    latencies_s: Vec<f64>,
    jobs_done: u64,
    jobs_failed: u64,
    jobs_refused: u64,
    tokens: u64,
    tokens_at_last_row: u64,
    /// What the simulation follows of each active job.
    tracks: BTreeMap<JobId, JobTrack>,
    failovers: u64,
    wasted_us: u64,
    redone_us: u64,
    chain_us: u64,
    check_us: u64,
    catches: u64,
    false_alarms: u64,
    corrupt_results: u64,
    corrupt_released: u64,
    jobs_wrong: u64,
    /// Exclusions and rollbacks as last seen in the coordinator's counts.
    exclusions_seen: u64,
    rollbacks_seen: u64,
    excluded: BTreeSet<NodeId>,
    adversaries: BTreeMap<u32, Adversary>,
    /// Arrivals and departures come from a trace, not from the distributions.
    traced: bool,
    /// Training rounds, when the scenario has them.
    training: Option<training::TrainRun>,
    /// Nodes online, and online with a span, kept as they change.
    online_count: u32,
    serving_count: u32,
}

impl std::fmt::Debug for Simulation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("seed", &self.seed)
            .field("now", &self.now)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// The hash of the event log: blake3 over every event's fixed binary form,
/// in order. Events are gathered into blocks before hashing (the hash of a
/// stream does not depend on how it is cut), so blake3 hashes many chunks at
/// once instead of being called 25 bytes at a time.
struct LogHash {
    hasher: blake3::Hasher,
    block: Vec<u8>,
}

/// Bytes gathered before they are hashed: sixteen 1 KiB chunks, as many as
/// blake3 hashes side by side.
const LOG_BLOCK: usize = 16 * 1024;

impl Default for LogHash {
    fn default() -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            block: Vec::with_capacity(LOG_BLOCK),
        }
    }
}

impl LogHash {
    fn update(&mut self, bytes: &[u8]) {
        if self.block.len() + bytes.len() > LOG_BLOCK {
            self.hasher.update(&self.block);
            self.block.clear();
        }
        self.block.extend_from_slice(bytes);
    }

    fn finalize(mut self) -> blake3::Hash {
        self.hasher.update(&self.block);
        self.hasher.finalize()
    }
}

fn node_id(index: u32) -> NodeId {
    let mut b = [0u8; 32];
    // Big-endian, so ids order as indices do.
    b[..4].copy_from_slice(&index.to_be_bytes());
    NodeId(b)
}

impl Simulation {
    /// The index of the node with `id`, if it is one of the simulation's
    /// (submitters are not): read back from the id, which is made from it.
    fn index_of(&self, id: &NodeId) -> Option<u32> {
        let (head, rest) = id.0.split_at(4);
        let i = u32::from_be_bytes(head.try_into().ok()?);
        let known = rest.iter().all(|b| *b == 0) && (i as usize) < self.nodes.len();
        known.then_some(i)
    }
}

fn exp_gap(rng: &mut ChaCha8Rng, per_second: f64) -> Micros {
    if per_second <= 0.0 {
        return Micros::MAX;
    }
    secs(
        Dist::Exponential {
            mean: 1.0 / per_second,
        }
        .sample(rng),
    )
    .max(1)
}

impl Simulation {
    /// A simulation of `scenario` from `seed`; `keep_log` keeps the event log's lines.
    #[must_use]
    pub fn new(scenario: Scenario, seed: u64, keep_log: bool) -> Self {
        let shape = ModelShape {
            n_layers: scenario.model.layers,
            layer_bytes: 1,
        };
        let end = secs(scenario.duration_s);
        let mut sim = Self {
            seed,
            now: 0,
            end,
            seq: 0,
            queue: Queue::new(),
            rng: Streams {
                arrivals: stream(seed, "arrivals"),
                churn: stream(seed, "churn"),
                nodes: stream(seed, "nodes"),
                jobs: stream(seed, "jobs"),
                adversaries: stream(seed, "adversaries"),
                corruption: stream(seed, "corruption"),
                links: stream(seed, "links"),
            },
            nodes: Vec::new(),
            plan: placement::current(&shape, &[]),
            shape,
            scheduler: Scheduler::new(
                SchedulerConfig {
                    verify: scenario.verification.config(),
                    ..SchedulerConfig::default()
                },
                seed,
            ),
            offers: OfferBook::default(),
            profiles_dirty: true,
            in_flight: BTreeMap::new(),
            sessions: BTreeMap::new(),
            submitted: BTreeMap::new(),
            next_job: 0,
            log: LogHash::default(),
            log_lines: keep_log.then(Vec::new),
            events: 0,
            rows: Vec::new(),
            sessions_s: Vec::new(),
            latencies_s: Vec::new(),
            jobs_done: 0,
            jobs_failed: 0,
            jobs_refused: 0,
            tokens: 0,
            tokens_at_last_row: 0,
            tracks: BTreeMap::new(),
            failovers: 0,
            wasted_us: 0,
            redone_us: 0,
            chain_us: 0,
            check_us: 0,
            catches: 0,
            false_alarms: 0,
            corrupt_results: 0,
            corrupt_released: 0,
            jobs_wrong: 0,
            exclusions_seen: 0,
            rollbacks_seen: 0,
            excluded: BTreeSet::new(),
            adversaries: BTreeMap::new(),
            traced: false,
            training: scenario.training.clone().and_then(training::TrainRun::new),
            online_count: 0,
            serving_count: 0,
            scenario,
        };
        // Room for every node the run will make, as far as the arrival rate
        // says (capped): one allocation, not doublings that copy every record
        // and touch fresh memory each time.
        let p = &sim.scenario.population;
        let arrivals = p.arrivals_per_hour / 3600.0 * sim.scenario.duration_s;
        let expected = (arrivals * 1.1 + 64.0).min(f64::from(1u32 << 20)) as usize;
        sim.nodes.reserve(p.initial as usize + expected);
        for _ in 0..sim.scenario.population.initial {
            let i = sim.new_node();
            sim.at(0, Event::Join(i));
        }
        sim.choose_initial_adversaries();
        if sim.training.is_some() {
            // After the initial joins: the first shares go out at once.
            sim.at(0, Event::TrainTick);
        }
        let peak = sim.peak_arrival_rate();
        let gap = exp_gap(&mut sim.rng.arrivals, peak);
        sim.at(gap, Event::NodeArrival);
        for k in 0..sim.scenario.outages.len() {
            let at = secs(sim.scenario.outages[k].at_s);
            sim.at(at, Event::Outage(k as u32));
        }
        let jobs = sim.scenario.workload.jobs_per_minute / 60.0;
        if jobs > 0.0 {
            let gap = exp_gap(&mut sim.rng.jobs, jobs);
            sim.at(gap, Event::JobArrival);
            sim.at(SECOND, Event::Tick);
        }
        sim.at(0, Event::Sample);
        if sim.scenario.rebalance_every_s > 0.0 {
            sim.at(secs(sim.scenario.rebalance_every_s), Event::Rebalance);
        }
        sim
    }

    /// A simulation whose nodes join and leave as `trace` says (rows of
    /// `node,join_s,leave_s`), instead of by the scenario's distributions.
    #[must_use]
    pub fn with_trace(
        scenario: Scenario,
        seed: u64,
        keep_log: bool,
        trace: &[crate::scenario::TraceRow],
    ) -> Self {
        let mut s = scenario;
        s.population.initial = 0;
        s.population.arrivals_per_hour = 0.0;
        let mut sim = Self::new(s, seed, keep_log);
        sim.traced = true;
        let mut index: BTreeMap<u64, u32> = BTreeMap::new();
        for row in trace {
            let i = match index.get(&row.node) {
                Some(&i) => i,
                None => {
                    let i = sim.new_node();
                    sim.maybe_adversary(i);
                    index.insert(row.node, i);
                    i
                }
            };
            sim.at(secs(row.join_s), Event::Join(i));
            sim.at(secs(row.leave_s), Event::TraceLeave(i));
        }
        sim
    }

    /// Schedules `e` at `t` (never before now), after everything already
    /// scheduled for the same time.
    fn at(&mut self, t: Micros, e: Event) {
        if t > self.end {
            return;
        }
        self.seq += 1;
        self.queue.push(t.max(self.now), self.seq, e);
    }

    /// Feeds an event to the run's hash (a fixed binary form: cheap) and, when
    /// the log is kept, its JSON line (built only then).
    fn record(&mut self, kind: u8, a: u64, b: u64, line: impl FnOnce() -> String) {
        let mut buf = [0u8; 25];
        buf[..8].copy_from_slice(&self.now.to_le_bytes());
        buf[8] = kind;
        buf[9..17].copy_from_slice(&a.to_le_bytes());
        buf[17..].copy_from_slice(&b.to_le_bytes());
        self.log.update(&buf);
        if let Some(lines) = &mut self.log_lines {
            let line = line();
            lines.push(format!(
                "{{\"t_us\":{},{}}}",
                self.now,
                line.trim_start_matches('{').trim_end_matches('}')
            ));
        }
    }

    fn new_node(&mut self) -> u32 {
        let i = self.nodes.len() as u32;
        let world = self.scenario.network.world_km;
        let r = &mut self.rng.nodes;
        let node = SimNode {
            online: false,
            epoch: 0,
            tokens_per_s: self.scenario.nodes.tokens_per_s.sample(r).max(1e-3),
            memory_layers: self.scenario.nodes.memory_layers.sample(r).round().max(0.0) as u32,
            pos: (r.random_range(0.0..world), r.random_range(0.0..world)),
            span: None,
            busy_until: 0,
            joined_at: 0,
            adversary: false,
            units: 0,
            up_bps: f64::INFINITY,
            down_bps: f64::INFINITY,
            relayed: false,
        };
        let mut node = node;
        // Links from their own stream, drawn only when the scenario limits
        // them: other draws (and runs without limits) are unchanged.
        let l = &mut self.rng.links;
        if let Some(d) = &self.scenario.nodes.up_mbps {
            node.up_bps = d.sample(l).max(1e-3) * 1e6;
        }
        if let Some(d) = &self.scenario.nodes.down_mbps {
            node.down_bps = d.sample(l).max(1e-3) * 1e6;
        }
        if let Some(nat) = &self.scenario.network.nat {
            let behind = l.random_bool(nat.fraction);
            let punched = l.random_bool(nat.hole_punch_success);
            node.relayed = behind && !punched;
        }
        self.nodes.push(node);
        self.profiles_dirty = true;
        i
    }

    /// Exactly `round(fraction × initial)` of the initial nodes, chosen at random.
    fn choose_initial_adversaries(&mut self) {
        let fraction = self.scenario.adversaries.fraction;
        let n = self.nodes.len();
        if fraction <= 0.0 || n == 0 {
            return;
        }
        let k = ((fraction * n as f64).round() as usize).min(n);
        // A partial Fisher–Yates shuffle: the first k of a random permutation.
        let mut order: Vec<u32> = (0..n as u32).collect();
        for j in 0..k {
            let pick = self.rng.adversaries.random_range(j..n);
            order.swap(j, pick);
        }
        order.truncate(k);
        order.sort_unstable();
        for i in order {
            self.make_adversary(i);
        }
    }

    /// A later node is an adversary with probability `fraction`.
    fn maybe_adversary(&mut self, i: u32) {
        let fraction = self.scenario.adversaries.fraction;
        if fraction > 0.0 && self.rng.adversaries.random_bool(fraction) {
            self.make_adversary(i);
        }
    }

    fn make_adversary(&mut self, i: u32) {
        self.nodes[i as usize].adversary = true;
        self.adversaries.insert(
            i,
            Adversary {
                node: i,
                results: 0,
                corrupted: 0,
                corrupt_chain: 0,
                onset_s: None,
                p_at_onset: None,
                p_range: None,
                to_first_sample: None,
                excluded_s: None,
                results_at_exclusion: None,
                corrupted_at_exclusion: None,
            },
        );
        self.record(10, u64::from(i), 0, || {
            format!("{{\"event\":\"adversary\",\"node\":{i}}}")
        });
    }

    /// Round trip between the coordinator (the world's centre) and node `i`, microseconds.
    fn rtt(&self, i: u32) -> Micros {
        let n = &self.nodes[i as usize];
        let c = self.scenario.network.world_km / 2.0;
        let km = ((n.pos.0 - c).powi(2) + (n.pos.1 - c).powi(2)).sqrt();
        let mut ms =
            self.scenario.network.base_rtt_ms + km / 1000.0 * self.scenario.network.ms_per_1000km;
        if n.relayed
            && let Some(nat) = &self.scenario.network.nat
        {
            ms += nat.relay_rtt_ms;
        }
        secs(ms / 1000.0)
    }

    /// Time to move `bytes` to (`up`: from) node `i` over its link (capped
    /// by its relay's when relayed); zero where links are not limited.
    fn transfer(&self, i: u32, bytes: u64, up: bool) -> Micros {
        let n = &self.nodes[i as usize];
        let mut bps = if up { n.up_bps } else { n.down_bps };
        if n.relayed
            && let Some(nat) = &self.scenario.network.nat
        {
            bps = bps.min(nat.relay_mbps * 1e6);
        }
        if !bps.is_finite() || bytes == 0 {
            return 0;
        }
        secs(bytes as f64 * 8.0 / bps)
    }

    fn capacity(&self, i: u32) -> NodeCapacity {
        let n = &self.nodes[i as usize];
        NodeCapacity {
            node: node_id(i),
            layer_throughput: n.tokens_per_s,
            memory_bytes: u64::from(n.memory_layers),
        }
    }

    fn set_span(&mut self, i: u32, span: Option<LayerRange>) {
        let n = &self.nodes[i as usize];
        let per_layer = |r: &LayerRange| n.tokens_per_s / f64::from(r.len().max(1));
        if let Some(old) = n.span {
            let t = per_layer(&old);
            for x in &mut self.plan.layer_throughput[old.start as usize..old.end as usize] {
                *x = (*x - t).max(0.0);
            }
        }
        if let Some(new) = span {
            let t = per_layer(&new);
            for x in &mut self.plan.layer_throughput[new.start as usize..new.end as usize] {
                *x += t;
            }
        }
        let was = n.online && n.span.is_some();
        self.nodes[i as usize].span = span;
        self.count_serving(i, was);
        self.offers.changed(i);
    }

    /// Keeps `serving_count` right after node `i` changed, given whether it
    /// served before.
    fn count_serving(&mut self, i: u32, was: bool) {
        let n = &self.nodes[i as usize];
        match (was, n.online && n.span.is_some()) {
            (false, true) => self.serving_count += 1,
            (true, false) => self.serving_count -= 1,
            _ => {}
        }
    }

    fn unix(&self) -> UnixMillis {
        UnixMillis(self.now / 1000)
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> Report {
        while let Some((t, event)) = self.queue.pop() {
            self.now = t;
            self.events += 1;
            self.handle(event);
        }
        self.now = self.end;
        self.sample();
        Report {
            seed: self.seed,
            scenario_hash: self.scenario.hash(),
            event_log_hash: std::mem::take(&mut self.log)
                .finalize()
                .to_hex()
                .to_string(),
            events: self.events,
            rows: self.rows,
            sessions_s: self.sessions_s,
            event_log: self.log_lines,
            job_latencies_s: self.latencies_s,
            adversaries: self.adversaries.into_values().collect(),
            verify: self.scheduler.verify_stats(),
            chain_compute_s: self.chain_us as f64 / SECOND as f64,
            jobs_wrong: self.jobs_wrong,
            training: self.training.as_ref().map(training::TrainRun::report),
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::NodeArrival => {
                // A non-homogeneous Poisson process by thinning: candidates at
                // the peak rate, each kept with probability rate(t)/peak.
                let peak = self.peak_arrival_rate();
                let keep = self.arrival_rate() / peak.max(f64::MIN_POSITIVE);
                if self.rng.arrivals.random_bool(keep.clamp(0.0, 1.0)) {
                    let i = self.new_node();
                    self.maybe_adversary(i);
                    self.join(i);
                }
                let gap = exp_gap(&mut self.rng.arrivals, peak);
                self.at(self.now.saturating_add(gap), Event::NodeArrival);
            }
            Event::Join(i) => self.join(i),
            Event::Leave(i, epoch) => {
                let n = &self.nodes[i as usize];
                if n.online && n.epoch == epoch {
                    self.leave(i);
                }
            }
            Event::Outage(k) => self.outage(k),
            Event::TraceLeave(i) => {
                if self.nodes[i as usize].online {
                    let graceful = self
                        .rng
                        .churn
                        .random_bool(self.scenario.churn.graceful_fraction);
                    self.depart(i, graceful, None);
                }
            }
            Event::JobArrival => {
                self.submit();
                let rate = self.scenario.workload.jobs_per_minute / 60.0;
                let gap = exp_gap(&mut self.rng.jobs, rate);
                self.at(self.now.saturating_add(gap), Event::JobArrival);
            }
            Event::UnitDone {
                ticket,
                node,
                epoch,
            } => self.unit_done(ticket, node, epoch),
            Event::Tick => {
                self.refresh_offers();
                let now = self.unix();
                self.scheduler.tick(now);
                self.drain();
                self.at(self.now + SECOND, Event::Tick);
            }
            Event::Sample => {
                self.sample();
                let every = secs(self.scenario.sample_every_s);
                self.at(self.now + every, Event::Sample);
            }
            Event::Rebalance => {
                self.rebalance();
                let every = secs(self.scenario.rebalance_every_s);
                self.at(self.now + every, Event::Rebalance);
            }
            Event::ShareDone {
                ticket,
                node,
                epoch,
            } => self.share_done(ticket, node, epoch),
            Event::Aggregated(round) => self.aggregated(round),
            Event::TrainTick => self.train_tick(),
        }
    }

    fn join(&mut self, i: u32) {
        let me = self.capacity(i);
        let span = placement::choose_span_in(&self.shape, &self.plan, &me);
        if let Some(t) = &mut self.training {
            t.nodes_dirty = true;
        }
        let was = self.nodes[i as usize].online && self.nodes[i as usize].span.is_some();
        if !self.nodes[i as usize].online {
            self.online_count += 1;
        }
        let n = &mut self.nodes[i as usize];
        n.online = true;
        n.joined_at = self.now;
        n.busy_until = self.now;
        self.count_serving(i, was);
        self.set_span(i, span);
        if !self.traced {
            let session = secs(self.scenario.churn.session.sample(&mut self.rng.churn)).max(1);
            let epoch = self.nodes[i as usize].epoch;
            self.at(self.now.saturating_add(session), Event::Leave(i, epoch));
        }
        let code = span.map_or(0, |r| u64::from(r.start) << 32 | u64::from(r.end));
        self.record(1, u64::from(i), code, || {
            format!(
                "{{\"event\":\"join\",\"node\":{i},\"span\":\"{}\"}}",
                span.map_or_else(String::new, |s| s.to_string())
            )
        });
    }

    fn leave(&mut self, i: u32) {
        let graceful = self
            .rng
            .churn
            .random_bool(self.scenario.churn.graceful_fraction);
        let rejoin = self
            .rng
            .churn
            .random_bool(self.scenario.churn.rejoin_probability);
        let downtime = self
            .scenario
            .churn
            .downtime
            .as_ref()
            .map(|d| secs(d.sample(&mut self.rng.churn)).max(1));
        let back = (rejoin && !self.traced).then_some(downtime).flatten();
        self.depart(i, graceful, back);
    }

    /// Arrival rate now, per second.
    fn arrival_rate(&self) -> f64 {
        let p = &self.scenario.population;
        if p.diurnal_amplitude == 0.0 {
            // What the cycle below gives without one, without its cosine.
            return p.arrivals_per_hour / 3600.0;
        }
        let hour = (self.now as f64 / SECOND as f64 / 3600.0) % 24.0;
        let phase = 2.0 * std::f64::consts::PI * (hour - p.diurnal_peak_hour) / 24.0;
        p.arrivals_per_hour / 3600.0 * (1.0 + p.diurnal_amplitude * phase.cos())
    }

    fn peak_arrival_rate(&self) -> f64 {
        if self.traced {
            return 0.0;
        }
        let p = &self.scenario.population;
        p.arrivals_per_hour / 3600.0 * (1.0 + p.diurnal_amplitude)
    }

    /// Every online node in a random square of the world crashes, and comes back later.
    fn outage(&mut self, k: u32) {
        let o = self.scenario.outages[k as usize].clone();
        let world = self.scenario.network.world_km;
        let side = world * o.fraction.sqrt();
        let x0 = self.rng.churn.random_range(0.0..=(world - side).max(0.0));
        let y0 = self.rng.churn.random_range(0.0..=(world - side).max(0.0));
        let hit: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&i| {
                let n = &self.nodes[i as usize];
                n.online
                    && (x0..=x0 + side).contains(&n.pos.0)
                    && (y0..=y0 + side).contains(&n.pos.1)
            })
            .collect();
        self.record(9, u64::from(k), hit.len() as u64, || {
            format!(
                "{{\"event\":\"outage\",\"outage\":{k},\"nodes\":{}}}",
                hit.len()
            )
        });
        for i in hit {
            self.depart(i, false, Some(secs(o.duration_s).max(1)));
        }
    }

    /// Node `i` goes offline (announced or not), and comes back after `back` if given.
    fn depart(&mut self, i: u32, graceful: bool, back: Option<Micros>) {
        if let Some(t) = &mut self.training {
            t.nodes_dirty = true;
        }
        let was = self.nodes[i as usize].online && self.nodes[i as usize].span.is_some();
        if self.nodes[i as usize].online {
            self.online_count -= 1;
        }
        let n = &mut self.nodes[i as usize];
        self.sessions_s.push((
            n.joined_at as f64 / SECOND as f64,
            self.now.saturating_sub(n.joined_at) as f64 / SECOND as f64,
        ));
        n.online = false;
        n.epoch += 1;
        self.count_serving(i, was);
        self.set_span(i, None);
        // Units in flight there are lost; an announced leave fails them now,
        // a crash only at their deadline.
        let lost: Vec<(u64, Micros, u64)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.node == i)
            .map(|(t, f)| (*t, f.started, f.compute))
            .collect();
        // Its sessions (KV caches) are gone with it.
        for sessions in self.sessions.values_mut() {
            sessions.retain(|(node, _), _| *node != i);
        }
        for (ticket, started, compute) in lost {
            self.in_flight.remove(&ticket);
            self.wasted_us += self.now.saturating_sub(started).min(compute);
            if graceful {
                self.refresh_offers();
                let now = self.unix();
                self.scheduler.handle_result(
                    now,
                    Ticket(ticket),
                    Err(StepFailure::Unreachable("the node left".into())),
                );
            }
        }
        self.drain();
        if let Some(d) = back {
            self.at(self.now.saturating_add(d), Event::Join(i));
        }
        let kind = if graceful { "leave" } else { "crash" };
        self.record(2 + u8::from(graceful), u64::from(i), 0, || {
            format!("{{\"event\":\"{kind}\",\"node\":{i}}}")
        });
    }

    fn submit(&mut self) {
        self.next_job += 1;
        let w = &self.scenario.workload;
        let submitter = node_id(u32::MAX - (self.next_job % u64::from(w.submitters)) as u32);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next_job.to_be_bytes());
        let prompt = executor::prompt(self.next_job, w.prompt_tokens);
        let honest = executor::reference(&prompt, w.max_tokens, self.scenario.model.layers);
        let job = NewJob {
            id: JobId(id),
            submitter,
            model: MODEL,
            prompt,
            max_tokens: w.max_tokens,
            stop_tokens: Vec::new(),
            sampling: SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                repetition_penalty: 1.0,
                seed: 0,
            },
        };
        self.refresh_queues();
        let now = self.unix();
        let outcome = self.scheduler.submit(now, job);
        let n = self.next_job;
        match outcome {
            Ok(()) => {
                self.submitted.insert(JobId(id), self.now);
                self.tracks.insert(JobId(id), JobTrack::new(honest));
                self.record(4, n, 0, || format!("{{\"event\":\"job\",\"job\":{n}}}"));
            }
            Err(e) => {
                self.jobs_refused += 1;
                self.record(5, n, u64::from(e.code.0), || {
                    format!(
                        "{{\"event\":\"refused\",\"job\":{n},\"code\":\"{}\"}}",
                        e.code.name()
                    )
                });
            }
        }
        self.drain();
    }

    /// Carries out what the scheduler asks.
    fn drain(&mut self) {
        while let Some(out) = self.scheduler.poll_output() {
            match out {
                Output::Send {
                    ticket,
                    node,
                    unit,
                    lane,
                    ..
                } => {
                    let Some(i) = self.index_of(&node) else {
                        continue;
                    };
                    let n = &self.nodes[i as usize];
                    if !n.online {
                        // A crashed node the coordinator does not know is dead: no answer.
                        continue;
                    }
                    let tokens = unit.input.shape().get(1).copied().unwrap_or(1);
                    let compute =
                        secs(tokens as f64 * f64::from(unit.layers.len()) / n.tokens_per_s);
                    let rtt = self.rtt(i);
                    // Token ids in, hidden states between hops, a token out.
                    let hidden = self.scenario.model.hidden_bytes_per_token.unwrap_or(2304);
                    let bytes_in = tokens * if unit.layers.start == 0 { 4 } else { hidden };
                    let bytes_out = if unit.layers.end == self.scenario.model.layers {
                        8
                    } else {
                        tokens * hidden
                    };
                    let down = self.transfer(i, bytes_in, false);
                    let up = self.transfer(i, bytes_out, true);
                    let start = (self.now + rtt / 2 + down).max(n.busy_until);
                    let done = start + compute + up + rtt / 2;
                    let epoch = n.epoch;
                    self.set_busy(i, start + compute);
                    let flight = self.execute(i, &unit, lane, start, compute);
                    self.in_flight.insert(ticket.0, flight);
                    self.at(
                        done,
                        Event::UnitDone {
                            ticket: ticket.0,
                            node: i,
                            epoch,
                        },
                    );
                }
                Output::Sample { job, .. } => {
                    // Greedy jobs never sample; a stray request ends the job plainly.
                    let now = self.unix();
                    self.scheduler.fail(
                        now,
                        &job,
                        commons_protocol::messages::ErrorCode::INTERNAL,
                        "the simulation samples greedily".into(),
                    );
                }
                Output::Changed { job } => self.job_changed(job),
                Output::Taken { .. } => {}
            }
        }
        self.observe_verification();
    }

    fn job_changed(&mut self, job: JobId) {
        let Some(v) = self.scheduler.view(&job) else {
            return;
        };
        let n = u64::from_be_bytes(job.0[..8].try_into().unwrap_or_default());
        let Some(track) = self.tracks.get_mut(&job) else {
            return;
        };
        self.failovers += u64::from(v.failovers.saturating_sub(track.failovers));
        self.tokens += v.tokens.len().saturating_sub(track.tokens) as u64;
        track.failovers = track.failovers.max(v.failovers);
        track.tokens = track.tokens.max(v.tokens.len());
        let wrong = track.release(&v.tokens);
        if wrong > 0 {
            self.corrupt_released += wrong;
            self.record(13, n, wrong, || {
                format!("{{\"event\":\"corrupt_released\",\"job\":{n},\"tokens\":{wrong}}}")
            });
        }
        if !v.status.is_terminal() {
            return;
        }
        let Some(started) = self.submitted.remove(&job) else {
            return;
        };
        let track = self.tracks.remove(&job);
        self.sessions.remove(&job);
        if matches!(v.status, JobStatus::Stopped | JobStatus::Length)
            && track.is_some_and(|t| !t.honest.starts_with(&v.tokens))
        {
            self.jobs_wrong += 1;
        }
        match &v.status {
            JobStatus::Stopped | JobStatus::Length => {
                self.jobs_done += 1;
                self.latencies_s
                    .push(self.now.saturating_sub(started) as f64 / SECOND as f64);
                let (tokens, failovers) = (v.tokens.len(), v.failovers);
                self.record(6, n, tokens as u64 | u64::from(failovers) << 32, || {
                    format!(
                        "{{\"event\":\"done\",\"job\":{n},\"tokens\":{tokens},\"failovers\":{failovers}}}"
                    )
                });
            }
            JobStatus::Failed { code, .. } => {
                self.jobs_failed += 1;
                let code = *code;
                self.record(7, n, u64::from(code.0), || {
                    format!(
                        "{{\"event\":\"failed\",\"job\":{n},\"code\":\"{}\"}}",
                        code.name()
                    )
                });
            }
            _ => {}
        }
    }

    fn rebalance(&mut self) {
        if self.plan.covers_all() {
            return;
        }
        let all: Vec<Assignment> = (0..)
            .zip(&self.nodes)
            .filter(|(_, n)| n.online)
            .filter_map(|(i, n)| {
                let span = n.span?;
                Some(Assignment {
                    node: node_id(i),
                    layers: span,
                    throughput: n.tokens_per_s / f64::from(span.len().max(1)),
                })
            })
            .collect();
        // Every node would ask; at most one moves per round, the lowest id that may.
        for i in 0..self.nodes.len() as u32 {
            if !self.nodes[i as usize].online || self.nodes[i as usize].span.is_none() {
                continue;
            }
            let me = self.capacity(i);
            if let Some(to) = placement::should_move(&self.shape, &all, &me) {
                self.set_span(i, Some(to));
                self.record(
                    8,
                    u64::from(i),
                    u64::from(to.start) << 32 | u64::from(to.end),
                    || format!("{{\"event\":\"move\",\"node\":{i},\"to\":\"{to}\"}}"),
                );
                return;
            }
        }
    }

    fn sample(&mut self) {
        let (online, serving) = (self.online_count, self.serving_count);
        debug_assert_eq!(
            online,
            self.nodes.iter().filter(|n| n.online).count() as u32
        );
        debug_assert_eq!(
            serving,
            self.nodes
                .iter()
                .filter(|n| n.online && n.span.is_some())
                .count() as u32
        );
        let layers = self.plan.layer_throughput.len().max(1);
        let covered = self
            .plan
            .layer_throughput
            .iter()
            .filter(|t| **t > 1e-12)
            .count();
        let t_s = self.now as f64 / SECOND as f64;
        let dt = self.rows.last().map_or(t_s, |r| t_s - r.t_s).max(1e-9);
        let stats = self.scheduler.verify_stats();
        let row = Row {
            t_s,
            online,
            serving,
            coverage: covered as f64 / layers as f64,
            jobs_active: self.scheduler.active().len() as u32,
            jobs_done: self.jobs_done,
            jobs_failed: self.jobs_failed,
            jobs_refused: self.jobs_refused,
            tokens: self.tokens,
            tokens_per_s: (self.tokens - self.tokens_at_last_row) as f64 / dt,
            failovers: self.failovers,
            wasted_compute_s: self.wasted_us as f64 / SECOND as f64,
            redone_compute_s: self.redone_us as f64 / SECOND as f64,
            check_units: stats.check_units,
            check_compute_s: self.check_us as f64 / SECOND as f64,
            mismatches: stats.mismatches,
            catches: self.catches,
            false_alarms: self.false_alarms,
            corrupt_results: self.corrupt_results,
            corrupt_tokens_released: self.corrupt_released,
            rollbacks: stats.rollbacks,
            train_rounds: self.training.as_ref().map_or(0, training::TrainRun::rounds),
        };
        self.tokens_at_last_row = self.tokens;
        if self.rows.last().is_some_and(|r| r.t_s == row.t_s) {
            self.rows.pop();
        }
        self.rows.push(row);
    }
}
