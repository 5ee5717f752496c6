//! Jobs: the state machine that carries text generation jobs through chains
//! of hops, one work unit at a time, and survives a hop's death.
//!
//! The [`Scheduler`] is driven by its caller: [`Scheduler::submit`],
//! [`Scheduler::handle_result`], [`Scheduler::handle_sampled`],
//! [`Scheduler::cancel`] and [`Scheduler::tick`] take the current time;
//! [`Scheduler::poll_output`] drains what to do next (send a unit, sample a
//! token, tell watchers). It never reads a clock, draws randomness or touches
//! a network, so the node and the simulator drive the very same code.
//!
//! # Steps and replay
//!
//! A job's steps are its prompt (step 0) and then each generated token, fed
//! back one at a time. Every hop of the chain records the input it was given
//! at every step. When a hop's node dies, times out or refuses, its layers are
//! routed again (whole spans, other nodes) and the replacement hops are given
//! the recorded inputs, step by step, in the very chunks the first node saw.
//! The replacements therefore rebuild exactly the KV cache that was lost, and
//! the hops after them, whose caches are intact, continue as if nothing
//! happened: the text is identical to an uninterrupted run.
//!
//! # Streaming
//!
//! With [`SchedulerConfig::stream_depth`] above 0, a chain whose hops are
//! all at the same step gets the step's units all at once, every hop but
//! the first told to wait for its input from the hop before, which sends
//! its output there directly: the coordinator is off the path between two
//! hops. At depth 2 a greedy job's next step goes out too, its first hop
//! waiting for the token the last hop sends it, so the chain runs from
//! token to token without the coordinator between. Every hop still returns
//! its result to the coordinator, which takes them into the job in chain
//! order, each only once the result before it is in and it commits to that
//! result as its input. Anything else (a failure, a result that names
//! another input, a failover, a rollback) drops the steps in flight, and
//! the job goes on one unit at a time, each with its recorded input, until
//! its hops are at the same step again (see [`stream`]).
//!
//! # Coalitions
//!
//! A job may run for a coalition ([`Scheduler::submit_in`]). Its units carry
//! the coalition and go only to nodes that serve it
//! ([`Scheduler::set_coalitions`]); open jobs go only to nodes that serve no
//! coalition. Failovers stay within the same nodes.
//!
//! # Fairness
//!
//! At most `max_active_jobs` jobs generate at once. When a slot frees, the
//! queued job whose submitter has the fewest active jobs goes next (oldest
//! first among equals), so one submitter's burst cannot starve the others.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use commons_protocol::messages::{
    ErrorCode, InferenceOptions, InferenceUnit, LayerRange, SamplingParams,
};
use commons_protocol::{CoalitionId, Hash, JobId, ModelId, NodeId, SessionId, Tensor, UnixMillis};

use crate::routing::{self, Offers, SpanOffer, Spans};
use crate::trust;
use crate::verify::{Ledger, Profile, Sampling, VerifyConfig, VerifyStats};

mod check;
mod stream;

pub use stream::StreamStats;

/// Tunables of the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// A unit's deadline: this many milliseconds…
    pub unit_timeout_ms: u64,
    /// …plus this many per input token.
    pub unit_timeout_per_token_ms: u64,
    /// Hops a job may replace before it fails.
    pub max_failovers: u32,
    /// Jobs generating at once; the rest wait in the queue.
    pub max_active_jobs: usize,
    /// Finished jobs kept for their reports.
    pub keep_finished: usize,
    /// Spot checks of results.
    pub verify: VerifyConfig,
    /// Steps a job's chain may have in flight at once, each sent to every
    /// hop ahead of its input, which each hop forwards to the next
    /// ([`stream`](self#streaming)). 0 sends one unit at a time, each with
    /// its input; 1 sends a step to every hop at once; 2 sends the next step
    /// too, so that a greedy job's last hop hands its token straight to the
    /// first.
    pub stream_depth: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            unit_timeout_ms: 10_000,
            unit_timeout_per_token_ms: 50,
            max_failovers: 8,
            max_active_jobs: 64,
            keep_finished: 4096,
            verify: VerifyConfig::default(),
            stream_depth: 0,
        }
    }
}

/// A job as the caller resolved it: prompt tokenized, stop tokens known.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Its id.
    pub id: JobId,
    /// Who submitted it.
    pub submitter: NodeId,
    /// The model.
    pub model: ModelId,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Tokens that end generation.
    pub stop_tokens: Vec<u32>,
    /// Token choice; temperature 0 is greedy and done by the last hop.
    pub sampling: SamplingParams,
}

/// A job refused at submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SubmitError {
    /// Stable code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

/// Why a unit is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// A step of the job's own chain.
    Chain,
    /// A re-execution that checks a hop.
    Check,
    /// A third execution that settles a disagreement.
    Referee,
}

impl Lane {
    /// Its name in logs and reports: `chain`, `check` or `referee`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chain => "chain",
            Self::Check => "check",
            Self::Referee => "referee",
        }
    }
}

/// Identifies one unit in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// What the caller must do.
// Outputs are drained as soon as they are made, a handful at a time: the
// size of `Send` costs nothing, where boxing it would allocate per unit.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Sign `unit`, send it to `node`, and report the outcome with `ticket`.
    Send {
        /// Names the answer.
        ticket: Ticket,
        /// The job.
        job: JobId,
        /// Where to.
        node: NodeId,
        /// What to run.
        unit: InferenceUnit,
        /// The unit should expire then.
        deadline: UnixMillis,
        /// Why it is sent.
        lane: Lane,
    },
    /// Choose the next token of `job` from `logits` and give it to
    /// [`Scheduler::handle_sampled`].
    Sample {
        /// The job.
        job: JobId,
        /// Logits of the last position.
        logits: Tensor,
    },
    /// The job's tokens or state changed.
    Changed {
        /// The job.
        job: JobId,
    },
    /// The result of the chain unit sent with `ticket` entered the job's
    /// transcript (its receipt belongs in the job's log). A streamed result
    /// may enter after results that arrived later.
    Taken {
        /// The unit's ticket.
        ticket: Ticket,
    },
}

/// A checked result from a hop.
#[derive(Debug, Clone, PartialEq)]
pub struct StepResult {
    /// Who signed it.
    pub executor: NodeId,
    /// Its outputs.
    pub outputs: Vec<Tensor>,
    /// Its commitment.
    pub commitment: Hash,
    /// For a unit whose input was forwarded: the commitment of the result
    /// it says it ran on, which must be its upstream hop's.
    pub input: Option<Hash>,
}

/// Why a unit brought no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepFailure {
    /// The node answered with a signed error.
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The node could not be reached or the exchange broke.
    Unreachable(String),
    /// The answer was malformed or not the node's.
    Invalid(String),
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused { code, message } => write!(f, "refused: {code}: {message}"),
            Self::Unreachable(m) => write!(f, "unreachable: {m}"),
            Self::Invalid(m) => write!(f, "invalid answer: {m}"),
        }
    }
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    /// Waiting for a slot.
    Queued,
    /// Generating.
    Running,
    /// A stop token ended it.
    Stopped,
    /// The token budget or the context ended it.
    Length,
    /// It failed.
    Failed {
        /// Stable code.
        code: ErrorCode,
        /// For people.
        message: String,
    },
    /// Its submitter cancelled it.
    Cancelled,
}

impl JobStatus {
    /// True once the job can change no more.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

/// A hop as reports show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopView {
    /// The node.
    pub node: NodeId,
    /// Its layers.
    pub layers: LayerRange,
    /// Results it returned for this job.
    pub results: u32,
    /// Still part of the chain (false: replaced after a failure).
    pub current: bool,
}

/// A job's state, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// Its id.
    pub id: JobId,
    /// Its submitter.
    pub submitter: NodeId,
    /// The model.
    pub model: ModelId,
    /// The coalition it runs for.
    pub coalition: Option<CoalitionId>,
    /// Where it stands.
    pub status: JobStatus,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Generated tokens released to the submitter: a token waits until every
    /// check sampled at its step or before has passed.
    pub tokens: Vec<u32>,
    /// Every hop that served it, current and replaced, in layer order.
    pub hops: Vec<HopView>,
    /// Hops replaced.
    pub failovers: u32,
    /// Results received.
    pub receipts: u32,
    /// blake3 chain over the received commitments, in order.
    pub transcript: Hash,
    /// Steps whose results another node re-executed and agreed with.
    pub verified: u32,
    /// Units sent to checkers and referees for this job.
    pub check_units: u32,
    /// Times the job went back to re-execute results of a node that lost a
    /// dispute; non-zero only if such results had reached the submitter.
    pub revisions: u32,
    /// Start to first token, milliseconds.
    pub prefill_ms: u64,
    /// First token to last, milliseconds.
    pub decode_ms: u64,
}

#[derive(Debug, Clone)]
struct Hop {
    node: NodeId,
    layers: LayerRange,
    session: SessionId,
    /// The input of every step this hop has been given.
    inputs: Vec<Tensor>,
    /// Steps it has run.
    done: usize,
    results: u32,
    /// Its output at every step, kept for checks.
    outputs: Vec<Tensor>,
    /// Steps `[0, verified)` agreed with a re-execution.
    verified: usize,
    /// Steps sampled for a check and not yet settled; tokens from the first
    /// of them on are held back.
    flagged: BTreeSet<usize>,
    /// The node re-executing this hop's steps, if any.
    check: Option<check::Shadow>,
    /// A disagreement at a step, waiting for a referee.
    dispute: Option<check::Dispute>,
    /// Nodes that may not check this hop.
    check_banned: BTreeSet<NodeId>,
    /// With [`Sampling::Session`]: whether this session is checked whole.
    shadowed: Option<bool>,
}

impl Hop {
    fn new(node: NodeId, layers: LayerRange, session: SessionId) -> Self {
        Self {
            node,
            layers,
            session,
            inputs: Vec::new(),
            done: 0,
            results: 0,
            outputs: Vec::new(),
            verified: 0,
            flagged: BTreeSet::new(),
            check: None,
            dispute: None,
            check_banned: BTreeSet::new(),
            shadowed: None,
        }
    }
}

#[derive(Debug, Clone)]
struct InFlight {
    ticket: Ticket,
    hop: usize,
    step: usize,
    deadline: UnixMillis,
}

#[derive(Debug)]
struct Job {
    spec: NewJob,
    /// The coalition it runs for; every unit carries it.
    coalition: Option<CoalitionId>,
    status: JobStatus,
    chain: Vec<Hop>,
    retired: Vec<Hop>,
    tokens: Vec<u32>,
    /// Tokens the submitter may see (see [`JobView::tokens`]).
    released: usize,
    /// Generation ended thus; the job finishes once its checks settle.
    ending: Option<JobStatus>,
    verified: u32,
    check_units: u32,
    revisions: u32,
    in_flight: Option<InFlight>,
    /// Steps sent to the whole chain ahead of their inputs.
    stream: stream::Stream,
    awaiting_sample: bool,
    banned: BTreeSet<NodeId>,
    failovers: u32,
    receipts: u32,
    transcript: Hash,
    sessions_opened: u64,
    started_at: Option<UnixMillis>,
    first_token_at: Option<UnixMillis>,
    last_token_at: Option<UnixMillis>,
    /// The caller restored tokens generated before a restart; prefill and decode times restart.
    restored: usize,
    queued_seq: u64,
    /// A resumed job waits for a chain of nodes until then.
    route_deadline: Option<UnixMillis>,
}

impl Job {
    /// Fresh hops for `route`, each with a new session and nothing run yet.
    fn open_hops(&mut self, seed: u64, id: &JobId, route: Vec<routing::Hop>) -> Vec<Hop> {
        route
            .into_iter()
            .map(|h| {
                let session = self.next_session(seed, id);
                Hop::new(h.node, h.layers, session)
            })
            .collect()
    }

    fn next_session(&mut self, seed: u64, id: &JobId) -> SessionId {
        self.sessions_opened += 1;
        session_id(seed, id, self.sessions_opened)
    }
}

/// What the scheduler knows of a model.
#[derive(Debug, Clone, PartialEq)]
struct ModelInfo {
    n_layers: u32,
    context_length: u32,
    offers: Offers,
}

/// Many jobs, their chains, and their recovery.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    seed: u64,
    models: BTreeMap<ModelId, ModelInfo>,
    /// Coalitions each node serves; nodes not listed serve open work only.
    coalitions: BTreeMap<NodeId, BTreeSet<CoalitionId>>,
    jobs: BTreeMap<JobId, Job>,
    queue: Vec<JobId>,
    finished: VecDeque<JobId>,
    tickets: BTreeMap<Ticket, JobId>,
    next_ticket: u64,
    next_seq: u64,
    outputs: VecDeque<Output>,
    ledger: Ledger,
    stream_stats: StreamStats,
}

const TRANSCRIPT_DOMAIN: &str = "commons job transcript v1";

/// A job's transcript after `previous` once a result committed to
/// `commitment` is taken; a job's starts from 32 zero bytes.
#[must_use]
pub fn transcript_next(previous: &Hash, commitment: &Hash) -> Hash {
    Hash::of_parts(TRANSCRIPT_DOMAIN, &[&previous.0, &commitment.0])
}
const SESSION_DOMAIN: &str = "commons session id v1";

fn token_tensor(tokens: &[u32]) -> Tensor {
    // A (1, n) u32 tensor is always well formed.
    Tensor::from_u32(&[1, tokens.len() as u64], tokens)
        .unwrap_or_else(|_| unreachable!("a (1, n) tensor of n values is well formed"))
}

impl Scheduler {
    /// A scheduler; `seed` makes its session ids differ from a previous run's.
    #[must_use]
    pub fn new(config: SchedulerConfig, seed: u64) -> Self {
        Self {
            config: config.clone(),
            seed,
            models: BTreeMap::new(),
            coalitions: BTreeMap::new(),
            jobs: BTreeMap::new(),
            queue: Vec::new(),
            finished: VecDeque::new(),
            tickets: BTreeMap::new(),
            next_ticket: 1,
            next_seq: 0,
            outputs: VecDeque::new(),
            ledger: Ledger::new(config.verify.clone()),
            stream_stats: StreamStats::default(),
        }
    }

    /// Sets what the swarm offers for `model` now (replacing earlier offers).
    pub fn set_offers(
        &mut self,
        model: ModelId,
        n_layers: u32,
        context_length: u32,
        offers: Vec<SpanOffer>,
    ) {
        self.models.insert(
            model,
            ModelInfo {
                n_layers,
                context_length,
                offers: offers.into_iter().collect(),
            },
        );
    }

    /// What the swarm offers for `model`, to change in place (a caller that
    /// follows nodes one at a time, as the simulator does); `None` until
    /// [`Scheduler::set_offers`] has named the model.
    pub fn offers_mut(&mut self, model: &ModelId) -> Option<&mut Offers> {
        self.models.get_mut(model).map(|m| &mut m.offers)
    }

    /// Sets how many steps of a job's chain may be in flight at once
    /// ([`SchedulerConfig::stream_depth`]); jobs running now take it up at
    /// their next step.
    pub fn set_stream_depth(&mut self, depth: usize) {
        self.config.stream_depth = depth;
    }

    /// Sets which coalitions each node serves now (replacing what was set
    /// before). Nodes not listed serve open work only.
    pub fn set_coalitions(&mut self, served: BTreeMap<NodeId, BTreeSet<CoalitionId>>) {
        self.coalitions = served;
    }

    /// Sets who runs each node and its determinism class (replacing earlier
    /// profiles): checks go to another operator, and compare bit for bit
    /// within a class.
    pub fn set_profiles(&mut self, profiles: BTreeMap<NodeId, Profile>) {
        self.ledger.set_profiles(profiles);
    }

    /// Verification records, exclusions and counts.
    #[must_use]
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Takes back verification records, exclusions and counts kept across a
    /// restart, so that a restart neither forgives an excluded node nor puts
    /// trusted ones back on probation.
    pub fn restore_ledger(&mut self, state: crate::verify::LedgerState) {
        self.ledger.restore(state);
    }

    /// What verification did.
    #[must_use]
    pub fn verify_stats(&self) -> VerifyStats {
        self.ledger.stats
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// A job's state.
    #[must_use]
    pub fn view(&self, id: &JobId) -> Option<JobView> {
        let job = self.jobs.get(id)?;
        let mut hops: Vec<HopView> = job
            .retired
            .iter()
            .map(|h| (h, false))
            .chain(job.chain.iter().map(|h| (h, true)))
            .map(|(h, current)| HopView {
                node: h.node,
                layers: h.layers,
                results: h.results,
                current,
            })
            .collect();
        hops.sort_by_key(|h| (h.layers.start, !h.current));
        let prefill_ms = match (job.started_at, job.first_token_at) {
            (Some(s), Some(f)) => f.0.saturating_sub(s.0),
            _ => 0,
        };
        let decode_ms = match (job.first_token_at, job.last_token_at) {
            (Some(f), Some(l)) => l.0.saturating_sub(f.0),
            _ => 0,
        };
        Some(JobView {
            id: *id,
            submitter: job.spec.submitter,
            model: job.spec.model,
            coalition: job.coalition,
            status: job.status.clone(),
            prompt: job.spec.prompt.clone(),
            tokens: job.tokens[..job.released].to_vec(),
            hops,
            failovers: job.failovers,
            receipts: job.receipts,
            transcript: job.transcript,
            verified: job.verified,
            check_units: job.check_units,
            revisions: job.revisions,
            prefill_ms,
            decode_ms,
        })
    }

    /// Jobs not yet finished.
    #[must_use]
    pub fn active(&self) -> Vec<JobId> {
        self.jobs
            .iter()
            .filter(|(_, j)| !j.status.is_terminal())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Unfinished jobs of `submitter`.
    #[must_use]
    pub fn unfinished_of(&self, submitter: &NodeId) -> usize {
        self.jobs
            .values()
            .filter(|j| !j.status.is_terminal() && &j.spec.submitter == submitter)
            .count()
    }

    /// Tokens released so far and whether the job has ended, without
    /// copying its view.
    #[must_use]
    pub fn progress(&self, id: &JobId) -> Option<(usize, bool)> {
        self.jobs
            .get(id)
            .map(|j| (j.released, j.status.is_terminal()))
    }

    /// Accepts an open job, or refuses it at once when it cannot run: unknown
    /// model, no chain of nodes serving it, empty or over-long prompt.
    pub fn submit(&mut self, now: UnixMillis, job: NewJob) -> Result<(), SubmitError> {
        self.submit_in(now, job, None)
    }

    /// [`Scheduler::submit`] for a job that runs for `coalition`: only nodes
    /// serving it run its units, and every unit carries it.
    pub fn submit_in(
        &mut self,
        now: UnixMillis,
        job: NewJob,
        coalition: Option<CoalitionId>,
    ) -> Result<(), SubmitError> {
        self.accept(now, job, coalition, Vec::new(), None)
    }

    /// Takes back a job that had already generated `tokens` (after a restart):
    /// every hop of its new chain replays them before it goes on. The swarm
    /// may not be known yet, so the job waits in the queue for a chain of
    /// nodes until `wait_for_route_until`, then fails as lost.
    pub fn resume(
        &mut self,
        now: UnixMillis,
        job: NewJob,
        tokens: Vec<u32>,
        wait_for_route_until: UnixMillis,
    ) -> Result<(), SubmitError> {
        self.resume_in(now, job, None, tokens, wait_for_route_until)
    }

    /// [`Scheduler::resume`] for a job that runs for `coalition`.
    pub fn resume_in(
        &mut self,
        now: UnixMillis,
        job: NewJob,
        coalition: Option<CoalitionId>,
        tokens: Vec<u32>,
        wait_for_route_until: UnixMillis,
    ) -> Result<(), SubmitError> {
        self.accept(now, job, coalition, tokens, Some(wait_for_route_until))
    }

    fn accept(
        &mut self,
        now: UnixMillis,
        job: NewJob,
        coalition: Option<CoalitionId>,
        tokens: Vec<u32>,
        route_deadline: Option<UnixMillis>,
    ) -> Result<(), SubmitError> {
        let refuse = |code, message: String| Err(SubmitError { code, message });
        if let Some(existing) = self.jobs.get(&job.id) {
            if existing.spec.submitter == job.submitter {
                return Ok(());
            }
            return refuse(
                ErrorCode::BAD_REQUEST,
                format!("job id {} is taken", job.id),
            );
        }
        if job.prompt.is_empty() {
            return refuse(ErrorCode::BAD_REQUEST, "the prompt is empty".into());
        }
        let info = self.models.get(&job.model);
        let Some(info) = info.filter(|_| route_deadline.is_none()) else {
            if route_deadline.is_none() {
                return refuse(
                    ErrorCode::NO_ROUTE,
                    format!("no node in the swarm serves model {}", job.model),
                );
            }
            self.enqueue(now, job, coalition, tokens, route_deadline);
            return Ok(());
        };
        let used = job.prompt.len() + tokens.len();
        if used >= info.context_length as usize {
            return refuse(
                ErrorCode::TOO_LARGE,
                format!(
                    "the prompt is {} tokens; the model's context length is {}",
                    job.prompt.len(),
                    info.context_length
                ),
            );
        }
        let whole = LayerRange {
            start: 0,
            end: info.n_layers,
        };
        let usable = |o: &SpanOffer| may_serve(&self.coalitions, &self.ledger, coalition, o);
        if let Err(e) = info
            .offers
            .route(whole, &BTreeSet::new(), Spans::Whole, usable)
        {
            return refuse(
                ErrorCode::NO_ROUTE,
                format!(
                    "no chain of nodes{} serves model {} ({e} of {})",
                    in_coalition(coalition),
                    job.model,
                    info.n_layers
                ),
            );
        }
        self.enqueue(now, job, coalition, tokens, None);
        Ok(())
    }

    fn enqueue(
        &mut self,
        now: UnixMillis,
        job: NewJob,
        coalition: Option<CoalitionId>,
        tokens: Vec<u32>,
        route_deadline: Option<UnixMillis>,
    ) {
        let id = job.id;
        let restored = tokens.len();
        self.next_seq += 1;
        let released = tokens.len();
        self.jobs.insert(
            id,
            Job {
                spec: job,
                coalition,
                status: JobStatus::Queued,
                chain: Vec::new(),
                retired: Vec::new(),
                tokens,
                released,
                ending: None,
                verified: 0,
                check_units: 0,
                revisions: 0,
                in_flight: None,
                stream: stream::Stream::default(),
                awaiting_sample: false,
                banned: BTreeSet::new(),
                failovers: 0,
                receipts: 0,
                transcript: Hash([0; 32]),
                sessions_opened: 0,
                started_at: None,
                first_token_at: None,
                last_token_at: None,
                restored,
                queued_seq: self.next_seq,
                route_deadline,
            },
        );
        self.queue.push(id);
        self.outputs.push_back(Output::Changed { job: id });
        self.admit(now);
    }

    /// Cancels `job` if `by` submitted it. Returns false if it is unknown or not theirs.
    pub fn cancel(&mut self, now: UnixMillis, job: &JobId, by: &NodeId) -> bool {
        match self.jobs.get(job) {
            Some(j) if &j.spec.submitter == by => {
                if !j.status.is_terminal() {
                    self.finish(now, *job, JobStatus::Cancelled);
                }
                true
            }
            _ => false,
        }
    }

    /// Ends `job` as failed (for failures outside the scheduler, such as sampling).
    pub fn fail(&mut self, now: UnixMillis, job: &JobId, code: ErrorCode, message: String) {
        if self.jobs.get(job).is_some_and(|j| !j.status.is_terminal()) {
            self.finish(now, *job, JobStatus::Failed { code, message });
        }
    }

    /// Expires units past their deadline, as failures of their hops.
    pub fn tick(&mut self, now: UnixMillis) {
        // Resumed jobs start once their route appears, or fail past their wait.
        self.admit(now);
        let late: Vec<(Ticket, UnixMillis)> = self
            .jobs
            .values()
            .flat_map(|j| {
                let checks = j
                    .chain
                    .iter()
                    .filter_map(|h| h.check.as_ref()?.in_flight.as_ref())
                    .map(|f| (f.ticket, f.deadline));
                j.in_flight
                    .iter()
                    .map(|f| (f.ticket, f.deadline))
                    .chain(checks)
                    .chain(j.stream.awaited())
            })
            .filter(|&(_, deadline)| deadline < now)
            .collect();
        for (ticket, deadline) in late {
            self.handle_result(
                now,
                ticket,
                Err(StepFailure::Unreachable(format!(
                    "no answer by its deadline ({} ms late)",
                    now.0 - deadline.0
                ))),
            );
        }
    }

    /// The outcome of the unit sent with `ticket`. Answers to units no longer
    /// awaited (after a timeout or a cancel) are ignored.
    pub fn handle_result(
        &mut self,
        now: UnixMillis,
        ticket: Ticket,
        outcome: Result<StepResult, StepFailure>,
    ) {
        let Some(id) = self.tickets.remove(&ticket) else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.stream.holds(ticket) {
            self.on_stream_result(now, id, ticket, outcome);
            self.pump(now, id);
            return;
        }
        let Some(flight) = job.in_flight.take_if(|f| f.ticket == ticket) else {
            self.on_check_result(now, id, ticket, outcome);
            self.pump(now, id);
            return;
        };
        let outcome = outcome.and_then(|r| {
            let hop = &job.chain[flight.hop];
            if r.executor != hop.node {
                return Err(StepFailure::Invalid(format!(
                    "result signed by {}, not by {}",
                    r.executor, hop.node
                )));
            }
            Ok(r)
        });
        match outcome {
            Ok(result) => {
                self.on_result(now, id, flight, result);
            }
            Err(failure) => self.on_failure(now, id, flight.hop, &failure),
        }
        self.pump(now, id);
    }

    /// The token chosen from the logits of an [`Output::Sample`].
    pub fn handle_sampled(&mut self, now: UnixMillis, job: &JobId, token: u32) {
        let Some(j) = self.jobs.get_mut(job) else {
            return;
        };
        if !j.awaiting_sample || j.status != JobStatus::Running {
            return;
        }
        j.awaiting_sample = false;
        self.accept_token(now, *job, token);
        self.pump(now, *job);
    }

    /// Takes `result` into the job: true when it entered the transcript.
    fn on_result(
        &mut self,
        now: UnixMillis,
        id: JobId,
        flight: InFlight,
        result: StepResult,
    ) -> bool {
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        let step = flight.step;
        let last = flight.hop + 1 == job.chain.len();
        let input_len = job.chain[flight.hop].inputs[step]
            .shape()
            .get(1)
            .copied()
            .unwrap_or(0);
        let [output] = result.outputs.as_slice() else {
            self.on_failure(
                now,
                id,
                flight.hop,
                &StepFailure::Invalid(format!("{} outputs, not 1", result.outputs.len())),
            );
            return false;
        };
        if !last {
            let shape = output.shape();
            if shape.len() != 3 || shape[0] != 1 || shape[1] != input_len {
                self.on_failure(
                    now,
                    id,
                    flight.hop,
                    &StepFailure::Invalid(format!(
                        "hidden states of shape {shape:?} for {input_len} tokens"
                    )),
                );
                return false;
            }
        }
        job.receipts += 1;
        self.outputs.push_back(Output::Taken {
            ticket: flight.ticket,
        });
        job.transcript = transcript_next(&job.transcript, &result.commitment);
        let hop = &mut job.chain[flight.hop];
        hop.done += 1;
        hop.results += 1;
        if self.ledger.config().enabled {
            hop.outputs.push(output.clone());
            let sampled = match self.ledger.config().sampling {
                Sampling::Step => self
                    .ledger
                    .sample(&hop.node, check::draw(self.seed, &id, &hop.session, step)),
                // One draw per session, when its first result comes.
                Sampling::Session => *hop.shadowed.get_or_insert_with(|| {
                    self.ledger
                        .sample(&hop.node, check::draw(self.seed, &id, &hop.session, 0))
                }),
            };
            if sampled {
                hop.flagged.insert(step);
                self.ledger.stats.sampled += 1;
            }
        }
        if !last {
            let next = &mut job.chain[flight.hop + 1];
            // A replacement hop replaying old steps produces inputs the next
            // hop already has (and has run): those are dropped.
            if next.inputs.len() == step {
                next.inputs.push(output.clone());
            }
            return true;
        }
        if step < job.tokens.len() {
            // A replayed step: its token was chosen before.
            return true;
        }
        if let Some(token) = output.to_u32().filter(|t| t.len() == 1) {
            self.accept_token(now, id, token[0]);
        } else if job.spec.sampling.temperature > 0.0 && output.to_f32().is_some() {
            job.awaiting_sample = true;
            self.outputs.push_back(Output::Sample {
                job: id,
                logits: output.clone(),
            });
        } else {
            self.on_failure(
                now,
                id,
                flight.hop,
                &StepFailure::Invalid("the last hop returned neither a token nor logits".into()),
            );
        }
        true
    }

    fn accept_token(&mut self, now: UnixMillis, id: JobId, token: u32) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.tokens.push(token);
        if job.released + 1 == job.tokens.len() && job.chain.iter().all(|h| h.flagged.is_empty()) {
            job.released += 1;
        }
        if job.first_token_at.is_none() {
            job.first_token_at = Some(now);
        }
        job.last_token_at = Some(now);
        self.outputs.push_back(Output::Changed { job: id });
        let context = self
            .models
            .get(&job.spec.model)
            .map_or(0, |m| m.context_length as usize);
        if job.spec.stop_tokens.contains(&token) {
            self.end_generation(now, id, JobStatus::Stopped);
        } else if job.tokens.len() >= job.spec.max_tokens as usize
            || job.spec.prompt.len() + job.tokens.len() >= context
        {
            self.end_generation(now, id, JobStatus::Length);
        } else {
            job.chain[0].inputs.push(token_tensor(&[token]));
        }
    }

    fn on_failure(&mut self, now: UnixMillis, id: JobId, hop_index: usize, failure: &StepFailure) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let hop = job.chain[hop_index].clone();
        if let StepFailure::Refused { code, message } = failure
            && matches!(*code, ErrorCode::BAD_REQUEST | ErrorCode::TOO_LARGE)
        {
            let status = JobStatus::Failed {
                code: *code,
                message: format!("node {} refused layers {}: {message}", hop.node, hop.layers),
            };
            self.finish(now, id, status);
            return;
        }
        job.banned.insert(hop.node);
        job.failovers += 1;
        if job.failovers > self.config.max_failovers {
            let status = JobStatus::Failed {
                code: ErrorCode::TIMEOUT,
                message: format!(
                    "gave up after {} failovers; the last: node {} on layers {}: {failure}",
                    self.config.max_failovers, hop.node, hop.layers
                ),
            };
            self.finish(now, id, status);
            return;
        }
        let usable = |o: &SpanOffer| may_serve(&self.coalitions, &self.ledger, job.coalition, o);
        let route = match self.models.get(&job.spec.model) {
            Some(m) => m
                .offers
                .route(hop.layers, &job.banned, Spans::Whole, usable),
            None => routing::route_within(hop.layers, &[], &job.banned, Spans::Whole),
        };
        match route {
            Ok(route) => {
                let mut replacement = job.open_hops(self.seed, &id, route);
                // The first replacement replays what the failed hop was given.
                replacement[0].inputs = hop.inputs.clone();
                let failed = job.chain.splice(hop_index..=hop_index, replacement).next();
                if let Some(mut failed) = failed {
                    check::retire(&mut failed, &mut self.tickets, &mut self.ledger.stats);
                    job.retired.push(failed);
                }
                self.outputs.push_back(Output::Changed { job: id });
            }
            Err(e) => {
                let status = JobStatus::Failed {
                    code: ErrorCode::NO_ROUTE,
                    message: format!(
                        "node {} failed on layers {} ({failure}) and no other node can take them over: {e}",
                        hop.node, hop.layers
                    ),
                };
                self.finish(now, id, status);
            }
        }
    }

    fn finish(&mut self, now: UnixMillis, id: JobId, status: JobStatus) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if let Some(f) = job.in_flight.take() {
            self.tickets.remove(&f.ticket);
        }
        job.stream.abandon(&mut self.tickets);
        job.status = status;
        job.awaiting_sample = false;
        job.ending = None;
        // A finished job keeps its report, not the recorded inputs and outputs of its hops.
        for hop in job.chain.iter_mut().chain(job.retired.iter_mut()) {
            check::retire(hop, &mut self.tickets, &mut self.ledger.stats);
            hop.inputs = Vec::new();
        }
        self.queue.retain(|q| q != &id);
        self.outputs.push_back(Output::Changed { job: id });
        self.finished.push_back(id);
        while self.finished.len() > self.config.keep_finished {
            if let Some(old) = self.finished.pop_front() {
                self.jobs.remove(&old);
            }
        }
        self.admit(now);
    }

    fn running(&self) -> impl Iterator<Item = &Job> {
        self.jobs
            .values()
            .filter(|j| j.status == JobStatus::Running)
    }

    /// Starts queued jobs while slots are free, fairest first.
    fn admit(&mut self, now: UnixMillis) {
        'slots: while self.running().count() < self.config.max_active_jobs {
            let mut active: BTreeMap<NodeId, usize> = BTreeMap::new();
            for j in self.running() {
                *active.entry(j.spec.submitter).or_default() += 1;
            }
            let mut order: Vec<(usize, u64, JobId)> = self
                .queue
                .iter()
                .map(|id| {
                    let j = &self.jobs[id];
                    (
                        active.get(&j.spec.submitter).copied().unwrap_or(0),
                        j.queued_seq,
                        *id,
                    )
                })
                .collect();
            order.sort();
            for (_, _, id) in order {
                if self.start(now, id) {
                    continue 'slots;
                }
            }
            return;
        }
    }

    /// Starts a queued job; false when it must keep waiting for a route.
    fn start(&mut self, now: UnixMillis, id: JobId) -> bool {
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        let route = self.models.get(&job.spec.model).and_then(|info| {
            let whole = LayerRange {
                start: 0,
                end: info.n_layers,
            };
            let usable =
                |o: &SpanOffer| may_serve(&self.coalitions, &self.ledger, job.coalition, o);
            info.offers
                .route(whole, &job.banned, Spans::Whole, usable)
                .ok()
                .filter(|r| !r.is_empty())
        });
        let Some(route) = route else {
            match job.route_deadline {
                Some(d) if now <= d => return false,
                Some(_) => {
                    let status = JobStatus::Failed {
                        code: ErrorCode::LOST,
                        message: format!(
                            "the coordinator restarted after {} tokens and no chain of nodes served model {} in time to resume",
                            job.tokens.len(),
                            job.spec.model
                        ),
                    };
                    self.finish(now, id, status);
                }
                None => {
                    let status = JobStatus::Failed {
                        code: ErrorCode::NO_ROUTE,
                        message: format!(
                            "no chain of nodes{} serves model {}",
                            in_coalition(job.coalition),
                            job.spec.model
                        ),
                    };
                    self.finish(now, id, status);
                }
            }
            return true;
        };
        self.queue.retain(|q| q != &id);
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        job.chain = job.open_hops(self.seed, &id, route);
        // Step 0 is the prompt; then one step per token already generated
        // (restored after a restart), the newest still to be run.
        let first = &mut job.chain[0];
        first.inputs.push(token_tensor(&job.spec.prompt));
        let generated = job.tokens.len();
        for (i, &t) in job.tokens.iter().enumerate() {
            let ends_it =
                job.spec.stop_tokens.contains(&t) || i + 1 >= job.spec.max_tokens as usize;
            if i + 1 == generated && ends_it {
                break;
            }
            first.inputs.push(token_tensor(&[t]));
        }
        job.status = JobStatus::Running;
        job.started_at = Some(now);
        self.outputs.push_back(Output::Changed { job: id });
        if generated > 0 && job.chain[0].inputs.len() == generated {
            // The restored tokens already ended the job.
            let status = if job.spec.stop_tokens.contains(&job.tokens[generated - 1]) {
                JobStatus::Stopped
            } else {
                JobStatus::Length
            };
            self.finish(now, id, status);
            return true;
        }
        self.pump(now, id);
        true
    }

    /// Sends the job's next units: on its chain, the first hop that has an
    /// input it has not run; and on each checker, the next step to re-execute.
    fn pump(&mut self, now: UnixMillis, id: JobId) {
        self.pump_chain(now, id);
        self.pump_checks(now, id);
        // A check may have sent the job back onto a new chain.
        self.pump_chain(now, id);
    }

    fn pump_chain(&mut self, now: UnixMillis, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.status != JobStatus::Running || job.in_flight.is_some() || job.awaiting_sample {
            return;
        }
        if self.pump_stream(now, id) {
            return;
        }
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(h) = job.chain.iter().position(|h| h.done < h.inputs.len()) else {
            return;
        };
        let step = job.chain[h].done;
        let (node, session) = (job.chain[h].node, job.chain[h].session);
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let (mut unit, deadline) = unit_for(&self.config, now, id, job, h, step, session);
        unit.options.order = ticket.0;
        job.in_flight = Some(InFlight {
            ticket,
            hop: h,
            step,
            deadline,
        });
        self.tickets.insert(ticket, id);
        self.outputs.push_back(Output::Send {
            ticket,
            job: id,
            node,
            unit,
            deadline,
            lane: Lane::Chain,
        });
    }

    /// Tokens restored when the job was resumed (they count neither for prefill nor decode time).
    #[must_use]
    pub fn restored_tokens(&self, id: &JobId) -> usize {
        self.jobs.get(id).map_or(0, |j| j.restored)
    }
}

/// The unit that runs `step` of hop `h` of `job` in `session`, and its deadline.
fn unit_for(
    config: &SchedulerConfig,
    now: UnixMillis,
    id: JobId,
    job: &Job,
    h: usize,
    step: usize,
    session: SessionId,
) -> (InferenceUnit, UnixMillis) {
    let input = job.chain[h].inputs[step].clone();
    let tokens_in = input.shape().get(1).copied().unwrap_or(1);
    unit_with(config, now, id, job, h, step, session, input, tokens_in)
}

/// [`unit_for`] with `input` (`tokens_in` tokens) given: empty for a unit
/// whose input is forwarded.
#[allow(clippy::too_many_arguments)]
fn unit_with(
    config: &SchedulerConfig,
    now: UnixMillis,
    id: JobId,
    job: &Job,
    h: usize,
    step: usize,
    session: SessionId,
    input: Tensor,
    tokens_in: u64,
) -> (InferenceUnit, UnixMillis) {
    let hop = &job.chain[h];
    let start_pos = if step == 0 {
        0
    } else {
        (job.spec.prompt.len() + step - 1) as u32
    };
    let deadline =
        now.plus_millis(config.unit_timeout_ms + config.unit_timeout_per_token_ms * tokens_in);
    let unit = InferenceUnit {
        job: id,
        model: job.spec.model,
        layers: hop.layers,
        session,
        step: step as u64,
        input,
        options: InferenceOptions {
            start_pos,
            max_session_tokens: (job.spec.prompt.len() as u32).saturating_add(job.spec.max_tokens),
            sampling: (h + 1 == job.chain.len()).then(|| job.spec.sampling.clone()),
            close_session: false,
            input_from: None,
            forward_to: None,
            order: 0,
        },
        coalition: job.coalition,
    };
    (unit, deadline)
}

/// Whether the node of `offer` takes work for `coalition` and is not
/// excluded from it.
fn may_serve(
    served: &BTreeMap<NodeId, BTreeSet<CoalitionId>>,
    ledger: &Ledger,
    coalition: Option<CoalitionId>,
    offer: &SpanOffer,
) -> bool {
    let serves = match served.get(&offer.node) {
        Some(s) => trust::serves(s, coalition),
        None => trust::serves(&BTreeSet::new(), coalition),
    };
    serves && !ledger.is_excluded(&offer.node, coalition)
}

fn in_coalition(coalition: Option<CoalitionId>) -> String {
    coalition.map_or_else(String::new, |c| format!(" in coalition {c}"))
}

fn session_id(seed: u64, job: &JobId, n: u64) -> SessionId {
    let h = Hash::of_parts(
        SESSION_DOMAIN,
        &[&seed.to_le_bytes(), &job.0, &n.to_le_bytes()],
    );
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.0[..16]);
    SessionId(id)
}

#[cfg(test)]
mod tests;
