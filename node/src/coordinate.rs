//! The coordinator role of a node (`commons node join --coordinator`): the
//! shell around [`commons_coordinator::job::Scheduler`]. It turns signed job
//! requests into scheduler inputs, signs the scheduler's units and hands them
//! to the swarm, checks the signed results that come back, samples tokens
//! when a job is not greedy, and answers watchers (long polls) with signed
//! reports. All decisions are the scheduler's; this module only moves bytes,
//! and refuses, before the scheduler sees them, jobs from non-members of the
//! job's coalition and submitters over their rate limit, and answers that are
//! not a unit's valid result ([`AnswerError`]: a forged receipt among them).
//!
//! Every result the scheduler takes into a job's transcript is appended, as
//! its receipt, to the job's audit log ([`crate::audit`]) in the transaction
//! that records the job's progress, before any report of that progress goes
//! out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use commons_coordinator::job::{
    JobStatus, JobView, NewJob, Output, Scheduler, SchedulerConfig, StepFailure, StepResult, Ticket,
};
use commons_coordinator::quota::{Quotas, RateLimit};
use commons_coordinator::routing::SpanOffer;
use commons_coordinator::trust::Coalitions;
use commons_coordinator::verify::Profile;
use commons_protocol::envelope::{Envelope, MessageKind, OpenError};
use commons_protocol::keys::VerifyError;
use commons_protocol::messages::{
    AuditAnchor, ErrorCode, ErrorReply, JobInput, JobOp, JobReport, JobRequest, JobSpec, JobState,
    LayerRange, Receipt, ResultError, RouteHop, WorkBody, WorkResult, WorkUnit,
};
use commons_protocol::replay::ReplayGuard;
use commons_protocol::{
    BoundedVec, CoalitionId, Identity, JobId, ModelId, NodeId, UnitId, UnixMillis,
};

use crate::audit::{AuditEntry, Lane};
use crate::executor::{ChatMessage, Sampler, SamplingConfig, Tokenizer};
use crate::jobstore::{JobStore, StoredJob};
use crate::network::{ExcludedStatus, RecordStatus, VerificationStatus};

mod durable;

/// A model the coordinator can plan jobs for: it holds the tokenizer.
#[derive(Debug)]
pub struct KnownModel {
    /// Its id.
    pub id: ModelId,
    /// Its tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// Transformer blocks.
    pub n_layers: u32,
    /// Longest sequence.
    pub context_length: u32,
    /// Hidden size (for the cost estimate).
    pub hidden: usize,
}

impl KnownModel {
    /// Reads what the coordinator needs from a model file.
    pub fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let file = crate::executor::ModelFile::open(path)?;
        let cfg = file.config().clone();
        Ok(Self {
            id: crate::executor::model_id(path)?,
            tokenizer: Tokenizer::for_model(&file)?,
            n_layers: cfg.n_layer as u32,
            context_length: cfg.context_length as u32,
            hidden: cfg.hidden,
        })
    }
}

/// How long a report stays valid.
const REPORT_TTL_MS: u64 = 60_000;
/// Longest a watcher is kept waiting.
const MAX_WAIT: Duration = Duration::from_secs(20);
/// Shortest time between two reports of a running job's new tokens to its
/// watchers (its end is reported at once).
const REPORT_EVERY: Duration = Duration::from_millis(40);
/// Unfinished jobs one submitter may have.
const MAX_JOBS_PER_SUBMITTER: usize = 64;
/// Submitters whose rate is tracked at once.
const MAX_TRACKED_SUBMITTERS: usize = 4096;
/// Audit entries kept for another try while the database refuses writes.
const MAX_PENDING_AUDIT: usize = 1 << 16;

struct Watcher<C> {
    job: JobId,
    from_token: u32,
    deadline: Instant,
    channel: C,
    /// An answer that waits for a commit, not for tokens: released by the
    /// commit of a batch cut after this many (see [`Coordinating::hold`]).
    held_after: Option<u64>,
}

/// What a job needs beyond the scheduler's view.
struct JobMeta {
    spec: JobSpec,
    sampler: Option<Sampler>,
    /// The run of the job: 0, then one more per resumption after a restart.
    segment: u32,
}

/// A unit sent and not yet answered.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    ticket: Ticket,
    unit: UnitId,
    job: JobId,
    step: u64,
    layers: LayerRange,
    lane: commons_coordinator::job::Lane,
}

/// A unit to hand to the swarm.
#[derive(Debug)]
pub struct Outgoing {
    /// Where to.
    pub node: NodeId,
    /// The signed unit envelope.
    pub bytes: Vec<u8>,
    /// What to report the answer with.
    pub pending: Pending,
}

/// How long a resumed job waits for a chain of nodes after a restart.
const RESUME_GRACE_MS: u64 = 30_000;

/// The coordinator's state; `C` is the response channel of a job request.
pub struct Coordinating<C> {
    store: Option<Arc<JobStore>>,
    identity: Arc<Identity>,
    scheduler: Scheduler,
    models: BTreeMap<ModelId, KnownModel>,
    meta: HashMap<JobId, JobMeta>,
    watchers: Vec<Watcher<C>>,
    replay: ReplayGuard,
    nonces: crate::identity::Nonces,
    coalitions: Coalitions,
    quotas: Option<Quotas<NodeId>>,
    refusals: BTreeMap<String, u64>,
    /// Answers to units not taken as results, by [`AnswerError::name`].
    rejected: BTreeMap<String, u64>,
    /// Receipts taken and not yet committed to the audit log.
    audit_pending: Vec<AuditEntry>,
    /// Receipts of chain results the scheduler has not taken yet, by ticket.
    held: HashMap<commons_coordinator::job::Ticket, AuditEntry>,
    /// The ledger's revision and exclusion count last kept in the store, and when.
    ledger_kept: (u64, u64, std::time::Instant),
    /// Jobs changed since the last [`Coordinating::settle`].
    changed: Vec<JobId>,
    /// When each watched job's tokens were last reported.
    reported: HashMap<JobId, Instant>,
    /// What is on disk, and the batch being committed.
    durable: durable::Durable,
}

/// How often a changed verification ledger is written at most, unless a
/// node was excluded (written at once).
const LEDGER_KEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl<C> std::fmt::Debug for Coordinating<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinating")
            .field("models", &self.models.keys().collect::<Vec<_>>())
            .field("jobs", &self.meta.len())
            .finish_non_exhaustive()
    }
}

/// A reply to a job request: now, or later (the request waits).
#[derive(Debug)]
pub enum Answer<C> {
    /// Send these bytes on the channel.
    Now(C, Vec<u8>),
    /// The channel is kept until there is news.
    Later,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

impl<C> Coordinating<C> {
    /// A coordinator for `models`, recording jobs in `store`; unfinished jobs
    /// found there are resumed (or failed with their reason).
    pub fn new(
        identity: Arc<Identity>,
        models: Vec<KnownModel>,
        store: Option<JobStore>,
        now: UnixMillis,
    ) -> Self {
        let seed = random_u64();
        let mut this = Self {
            store: store.map(Arc::new),
            identity,
            scheduler: Scheduler::new(SchedulerConfig::default(), seed),
            models: models.into_iter().map(|m| (m.id, m)).collect(),
            meta: HashMap::new(),
            watchers: Vec::new(),
            replay: ReplayGuard::new(10 * 60_000, 1 << 18),
            nonces: crate::identity::Nonces::new(seed.to_le_bytes()),
            coalitions: Coalitions::open(),
            quotas: None,
            refusals: BTreeMap::new(),
            rejected: BTreeMap::new(),
            audit_pending: Vec::new(),
            held: HashMap::new(),
            ledger_kept: (0, 0, std::time::Instant::now()),
            changed: Vec::new(),
            reported: HashMap::new(),
            durable: durable::Durable::default(),
        };
        this.restore_ledger();
        this.resume_stored(now);
        this
    }

    /// Takes back the verification ledger kept in the store: exclusions and
    /// records outlive a restart.
    fn restore_ledger(&mut self) {
        let Some(store) = &self.store else {
            return;
        };
        match store.ledger() {
            Ok(Some(state)) => {
                tracing::info!(
                    nodes = state.records.len(),
                    excluded = state.excluded.len(),
                    "verification ledger restored"
                );
                self.scheduler.restore_ledger(state);
                let l = self.scheduler.ledger();
                self.ledger_kept = (l.revision(), l.stats.exclusions, std::time::Instant::now());
            }
            Ok(None) => {}
            Err(e) => tracing::error!(
                error = %format!("{e:#}"),
                "cannot restore the verification ledger; every node starts on probation"
            ),
        }
    }

    fn resume_stored(&mut self, now: UnixMillis) {
        let Some(store) = &self.store else {
            return;
        };
        let stored = match store.all() {
            Ok(all) => all,
            Err(e) => {
                tracing::error!(%e, "cannot read the job database; no job resumed");
                return;
            }
        };
        let mut failed = Vec::new();
        for job in stored.into_iter().filter(StoredJob::is_unfinished) {
            let id = job.spec.job;
            let outcome = self
                .resolve(job.submitter, &job.spec)
                .and_then(|(new, sampler)| {
                    self.scheduler
                        .resume_in(
                            now,
                            new,
                            job.spec.coalition,
                            job.tokens.clone(),
                            now.plus_millis(RESUME_GRACE_MS),
                        )
                        .map_err(|e| (e.code, e.message))?;
                    Ok(sampler)
                });
            match outcome {
                Ok(sampler) => {
                    tracing::info!(job = %id, tokens = job.tokens.len(), "resuming a job after restart");
                    self.meta.insert(
                        id,
                        JobMeta {
                            spec: job.spec,
                            sampler,
                            // The scheduler starts a new transcript.
                            segment: job.segment + 1,
                        },
                    );
                }
                Err((code, message)) => {
                    tracing::warn!(job = %id, %message, "cannot resume a job");
                    failed.push(StoredJob {
                        state: "failed".into(),
                        error: Some(format!("cannot resume after a restart: {message} ({code})")),
                        updated_at: now.0,
                        ..job
                    });
                }
            }
        }
        if let Some(store) = &self.store
            && let Err(e) = store.put_all(&failed)
        {
            tracing::error!(%e, "cannot record failed jobs");
        }
    }

    /// What `spec` means for the scheduler: the prompt tokenized, the sampler.
    fn resolve(
        &self,
        submitter: NodeId,
        spec: &JobSpec,
    ) -> Result<(NewJob, Option<Sampler>), (ErrorCode, String)> {
        let Some(model) = self.models.get(&spec.model) else {
            return Err((
                ErrorCode::NO_ROUTE,
                format!(
                    "this coordinator plans no jobs for model {} (it knows {})",
                    spec.model,
                    self.models
                        .keys()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        let text = match &spec.input {
            JobInput::Text(t) => t.clone(),
            JobInput::Chat(turns) => {
                let messages: Vec<ChatMessage> = turns
                    .iter()
                    .map(|t| ChatMessage {
                        role: t.role.clone(),
                        content: t.content.clone(),
                    })
                    .collect();
                model
                    .tokenizer
                    .apply_chat_template(&messages)
                    .map_err(|e| (ErrorCode::BAD_REQUEST, e.to_string()))?
            }
            _ => {
                return Err((
                    ErrorCode::BAD_REQUEST,
                    "this coordinator does not know this kind of prompt".into(),
                ));
            }
        };
        let prompt = model
            .tokenizer
            .encode(&text)
            .map_err(|e| (ErrorCode::BAD_REQUEST, e.to_string()))?;
        let s = &spec.sampling;
        let sampler = if s.temperature > 0.0 {
            Some(
                Sampler::new(SamplingConfig {
                    temperature: f64::from(s.temperature),
                    top_k: s.top_k as usize,
                    top_p: f64::from(s.top_p),
                    repetition_penalty: s.repetition_penalty,
                    seed: s.seed,
                    ..SamplingConfig::default()
                })
                .map_err(|e| (ErrorCode::BAD_REQUEST, e.to_string()))?,
            )
        } else {
            None
        };
        let job = NewJob {
            id: spec.job,
            submitter,
            model: spec.model,
            prompt,
            max_tokens: spec.max_tokens,
            stop_tokens: model.tokenizer.stop_tokens().to_vec(),
            sampling: spec.sampling.clone(),
        };
        Ok((job, sampler))
    }

    /// Steps of a job's chain in flight at once (0: one unit at a time,
    /// each through this coordinator; see
    /// [`SchedulerConfig::stream_depth`](commons_coordinator::job::SchedulerConfig::stream_depth)).
    pub fn set_stream_depth(&mut self, depth: usize) {
        self.scheduler.set_stream_depth(depth);
    }

    /// What streaming did: steps sent to whole chains, results that named
    /// another input, steps dropped.
    #[must_use]
    pub fn stream_stats(&self) -> commons_coordinator::job::StreamStats {
        self.scheduler.stream_stats()
    }

    /// Accepts jobs only for `coalitions` (open jobs when there are none) and
    /// from their members, at most `per_member` a submitter (`None`: no limit).
    pub fn set_trust(&mut self, coalitions: Coalitions, per_member: Option<RateLimit>) {
        self.coalitions = coalitions;
        self.quotas = per_member.map(|l| Quotas::new(l, MAX_TRACKED_SUBMITTERS));
    }

    /// Serves `coalitions` from now on, keeping the members' quotas: jobs
    /// already accepted run on; new ones are checked against these charters.
    pub fn set_coalitions(&mut self, coalitions: Coalitions) {
        self.coalitions = coalitions;
    }

    /// Job requests refused so far, by error code name.
    #[must_use]
    pub fn refusals(&self) -> BTreeMap<String, u64> {
        self.refusals.clone()
    }

    /// Answers to units not taken as results so far, by kind
    /// ([`AnswerError::name`]: `forged_receipt`, `wrong_unit`…).
    #[must_use]
    pub fn rejected_results(&self) -> BTreeMap<String, u64> {
        self.rejected.clone()
    }

    /// Models it plans for.
    pub fn models(&self) -> impl Iterator<Item = &KnownModel> {
        self.models.values()
    }

    /// Sets each node's operator and determinism class, from its advert:
    /// checks go to another operator and compare bit for bit within a class.
    pub fn set_profiles(&mut self, profiles: BTreeMap<NodeId, Profile>) {
        self.scheduler.set_profiles(profiles);
    }

    /// What spot checks did, who is excluded, and each node's record.
    #[must_use]
    pub fn verification(&self) -> VerificationStatus {
        let ledger = self.scheduler.ledger();
        let s = ledger.stats;
        VerificationStatus {
            counts: BTreeMap::from([
                ("sampled".to_owned(), s.sampled),
                ("check_units".to_owned(), s.check_units),
                ("compared".to_owned(), s.compared),
                ("mismatches".to_owned(), s.mismatches),
                ("decided".to_owned(), s.decided),
                ("undecided".to_owned(), s.undecided),
                ("exclusions".to_owned(), s.exclusions),
                ("unverifiable".to_owned(), s.unverifiable),
                ("rollbacks".to_owned(), s.rollbacks),
            ]),
            excluded: ledger
                .exclusions()
                .iter()
                .flat_map(|(node, scopes)| {
                    scopes.iter().map(move |scope| ExcludedStatus {
                        peer_id: node.to_string(),
                        coalition: scope.map(|c| c.to_string()),
                    })
                })
                .collect(),
            records: ledger
                .records()
                .iter()
                .map(|(node, r)| RecordStatus {
                    peer_id: node.to_string(),
                    valid_streak: r.valid_streak,
                    valid: r.valid,
                    invalid: r.invalid,
                    check_probability: ledger.probability(node),
                })
                .collect(),
        }
    }

    /// Replaces the span offers of every known model, and which coalitions
    /// each node serves (nodes not listed serve open work only).
    pub fn set_offers(
        &mut self,
        offers: &[(ModelId, SpanOffer)],
        coalitions: BTreeMap<NodeId, std::collections::BTreeSet<CoalitionId>>,
    ) {
        self.scheduler.set_coalitions(coalitions);
        for m in self.models.values() {
            let mine = offers
                .iter()
                .filter(|(id, _)| *id == m.id)
                .map(|(_, o)| o.clone())
                .collect();
            self.scheduler
                .set_offers(m.id, m.n_layers, m.context_length, mine);
        }
    }

    /// Estimated milliseconds per token per layer of `model` at `mflops`.
    #[must_use]
    pub fn ms_per_layer(&self, model: &ModelId, mflops: u64) -> f64 {
        let hidden = self.models.get(model).map_or(1024, |m| m.hidden) as f64;
        // About 12·h² multiply-adds per token per layer (attention and MLP).
        24.0 * hidden * hidden / (mflops.max(1) as f64 * 1e3)
    }

    fn refuse(&self, code: ErrorCode, message: String, now: UnixMillis) -> Vec<u8> {
        let reply = ErrorReply {
            code,
            message,
            regarding: None,
            responder: self.identity.node_id(),
            issued_at: now,
            expires_at: now.plus_millis(REPORT_TTL_MS),
        };
        Envelope::seal(&self.identity, &reply)
            .map(|e| e.to_bytes())
            .unwrap_or_default()
    }

    /// A refusal of a job request, counted.
    fn refuse_request(&mut self, code: ErrorCode, message: String, now: UnixMillis) -> Vec<u8> {
        *self.refusals.entry(code.name().to_owned()).or_default() += 1;
        self.refuse(code, message, now)
    }

    /// The coalition of `job`, known or recorded.
    fn coalition_of(&self, job: &JobId) -> Option<CoalitionId> {
        match self.meta.get(job) {
            Some(m) => m.spec.coalition,
            None => self
                .store
                .as_ref()
                .and_then(|s| s.get(job).ok().flatten())
                .and_then(|j| j.spec.coalition),
        }
    }

    /// Handles a signed job request.
    pub fn on_request(&mut self, bytes: &[u8], channel: C, now: UnixMillis) -> Answer<C> {
        let request: JobRequest = match Envelope::open_bytes(bytes, now) {
            Ok(r) => r,
            Err(e) => {
                let refusal = self.refuse_request(ErrorCode::BAD_REQUEST, e.to_string(), now);
                return Answer::Now(channel, refusal);
            }
        };
        if let Err(e) = self
            .replay
            .check(request.submitter, request.nonce, request.expires_at, now)
        {
            let refusal = self.refuse_request(ErrorCode::REPLAYED, e.to_string(), now);
            return Answer::Now(channel, refusal);
        }
        match request.op {
            JobOp::Submit(spec) => {
                let job = spec.job;
                match self.submit(request.submitter, spec, now) {
                    // Accepted means recorded: the report goes out after the commit.
                    Ok(true) => {
                        self.hold(job, channel);
                        Answer::Later
                    }
                    // A submission seen before, recorded with the first.
                    Ok(false) => Answer::Now(channel, self.report_bytes(&job, 0, now)),
                    Err((code, message)) => {
                        Answer::Now(channel, self.refuse_request(code, message, now))
                    }
                }
            }
            JobOp::Watch {
                job,
                from_token,
                wait_ms,
            } => {
                // A coalition's jobs are its members' to follow.
                if let Some(c) = self.coalition_of(&job)
                    && let Err(e) = self.coalitions.authorize(Some(c), &request.submitter)
                {
                    let refusal = self.refuse_request(ErrorCode::UNAUTHORIZED, e.to_string(), now);
                    return Answer::Now(channel, refusal);
                }
                let Some((tokens, ended)) = self.durable_progress(&job) else {
                    return Answer::Now(channel, self.report_bytes(&job, from_token, now));
                };
                let due = self
                    .reported
                    .get(&job)
                    .is_none_or(|at| at.elapsed() >= REPORT_EVERY);
                if ended || wait_ms == 0 || (tokens > from_token as usize && due) {
                    self.reported.insert(job, Instant::now());
                    return Answer::Now(channel, self.report_bytes(&job, from_token, now));
                }
                self.watchers.push(Watcher {
                    job,
                    from_token,
                    deadline: Instant::now()
                        + Duration::from_millis(u64::from(wait_ms)).min(MAX_WAIT),
                    channel,
                    held_after: None,
                });
                Answer::Later
            }
            JobOp::Cancel { job } => {
                if self.scheduler.cancel(now, &job, &request.submitter) {
                    // The report says cancelled once that is recorded.
                    self.hold(job, channel);
                    Answer::Later
                } else {
                    let refusal = self.refuse_request(
                        ErrorCode::UNKNOWN_JOB,
                        format!("no job {job} of yours here"),
                        now,
                    );
                    Answer::Now(channel, refusal)
                }
            }
            _ => {
                let refusal = self.refuse_request(
                    ErrorCode::BAD_REQUEST,
                    "unknown job operation".into(),
                    now,
                );
                Answer::Now(channel, refusal)
            }
        }
    }

    /// Takes a job; true when it is new, false when it was submitted before.
    fn submit(
        &mut self,
        submitter: NodeId,
        spec: JobSpec,
        now: UnixMillis,
    ) -> Result<bool, (ErrorCode, String)> {
        self.coalitions
            .authorize(spec.coalition, &submitter)
            .map_err(|e| (ErrorCode::UNAUTHORIZED, format!("job refused: {e}")))?;
        if let Some(existing) = self.meta.get(&spec.job) {
            return if existing.spec == spec {
                Ok(false)
            } else {
                Err((
                    ErrorCode::BAD_REQUEST,
                    format!("job id {} is taken", spec.job),
                ))
            };
        }
        let mine = self.scheduler.unfinished_of(&submitter);
        if mine >= MAX_JOBS_PER_SUBMITTER {
            return Err((
                ErrorCode::OVERLOADED,
                format!("you have {mine} unfinished jobs here; wait for some to end"),
            ));
        }
        if let Some(quotas) = self.quotas.as_mut() {
            quotas
                .try_take(&submitter, now)
                .map_err(|e| (ErrorCode::OVERLOADED, format!("jobs from {submitter}: {e}")))?;
        }
        let (job, sampler) = self.resolve(submitter, &spec)?;
        self.scheduler
            .submit_in(now, job, spec.coalition)
            .map_err(|e| (e.code, e.message))?;
        tracing::info!(job = %spec.job, %submitter, model = %spec.model, "job accepted");
        self.meta.insert(
            spec.job,
            JobMeta {
                spec,
                sampler,
                segment: 0,
            },
        );
        Ok(true)
    }

    /// Drains the scheduler (units to send, tokens to sample) and commits
    /// what changed on this thread: watchers to answer. For tests; the
    /// shell sends first, then commits off its event loop.
    #[cfg(test)]
    pub(crate) fn drain(&mut self, now: UnixMillis) -> (Vec<Outgoing>, Vec<(C, Vec<u8>)>) {
        let sends = self.drain_sends(now);
        let answers = self.commit_now(now);
        (sends, answers)
    }

    /// The units to send now (tokens to sample are sampled on the way). The
    /// jobs that changed wait for [`Coordinating::settle`], which cuts them
    /// into the next commit.
    pub fn drain_sends(&mut self, now: UnixMillis) -> Vec<Outgoing> {
        let mut sends = Vec::new();
        while let Some(out) = self.scheduler.poll_output() {
            match out {
                Output::Send {
                    ticket,
                    job,
                    node,
                    unit,
                    deadline,
                    lane,
                } => {
                    let (step, layers) = (unit.step, unit.layers);
                    let unit = WorkUnit {
                        issuer: self.identity.node_id(),
                        nonce: self.nonces.take(),
                        issued_at: now,
                        expires_at: deadline,
                        body: WorkBody::Inference(unit),
                    };
                    let sealed = unit.id().map_err(|e| e.to_string()).and_then(|id| {
                        Envelope::seal(&self.identity, &unit)
                            .map(|e| (id, e.to_bytes()))
                            .map_err(|e| e.to_string())
                    });
                    match sealed {
                        Ok((id, bytes)) => sends.push(Outgoing {
                            node,
                            bytes,
                            pending: Pending {
                                ticket,
                                unit: id,
                                job,
                                step,
                                layers,
                                lane,
                            },
                        }),
                        Err(e) => self.scheduler.handle_result(
                            now,
                            ticket,
                            Err(StepFailure::Invalid(format!("cannot seal the unit: {e}"))),
                        ),
                    }
                }
                Output::Sample { job, logits } => {
                    let token = self.sample(&job, &logits);
                    match token {
                        Ok(t) => self.scheduler.handle_sampled(now, &job, t),
                        Err(e) => self.scheduler.fail(
                            now,
                            &job,
                            ErrorCode::INTERNAL,
                            format!("cannot sample the next token: {e}"),
                        ),
                    }
                }
                Output::Changed { job } => self.changed.push(job),
                Output::Taken { ticket } => {
                    if let Some(entry) = self.held.remove(&ticket) {
                        self.audit_pending.push(entry);
                    }
                }
            }
        }
        sends
    }

    fn sample(&mut self, job: &JobId, logits: &commons_protocol::Tensor) -> anyhow::Result<u32> {
        let history: Vec<u32> = self
            .scheduler
            .view(job)
            .map(|v| v.prompt.iter().chain(&v.tokens).copied().collect())
            .unwrap_or_default();
        let meta = self
            .meta
            .get_mut(job)
            .ok_or_else(|| anyhow::anyhow!("unknown job"))?;
        let sampler = meta
            .sampler
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("logits for a greedy job"))?;
        let values = logits
            .to_f32()
            .ok_or_else(|| anyhow::anyhow!("logits are not f32"))?;
        let n = values.len();
        let t = candle_core::Tensor::from_vec(values, n, &candle_core::Device::Cpu)?;
        Ok(sampler.sample(&t, &history)?)
    }

    /// The answer to a unit: a signed result or error envelope. A result the
    /// scheduler takes into the job's transcript is queued for the job's
    /// audit log, cut into the next batch by [`Coordinating::settle`].
    pub fn on_response(&mut self, pending: Pending, node: NodeId, bytes: &[u8], now: UnixMillis) {
        let (outcome, receipt) = match check_response(pending.unit, node, bytes, now) {
            Ok((result, receipt)) => (Ok(result), Some(receipt)),
            Err(AnswerError::Refused { code, message }) => {
                (Err(StepFailure::Refused { code, message }), None)
            }
            Err(e) => {
                let message = e.describe();
                tracing::warn!(job = %pending.job, %node, kind = e.name(), %message, "answer refused");
                *self.rejected.entry(e.name().to_owned()).or_default() += 1;
                (Err(StepFailure::Invalid(message)), None)
            }
        };
        if pending.lane != commons_coordinator::job::Lane::Chain {
            // Check and referee results never enter the transcript; every
            // valid one is logged with its lane.
            if let (Some(receipt), Some(_)) = (receipt, &self.store) {
                self.audit_pending.push(AuditEntry {
                    job: pending.job,
                    seq: 0,
                    segment: self.meta.get(&pending.job).map_or(0, |m| m.segment),
                    lane: match pending.lane {
                        commons_coordinator::job::Lane::Referee => Lane::Referee,
                        _ => Lane::Check,
                    },
                    step: pending.step,
                    layers: pending.layers,
                    recorded_at: now,
                    receipt,
                });
            }
            self.scheduler.handle_result(now, pending.ticket, outcome);
            return;
        }
        // Logged once the scheduler takes it into the transcript
        // ([`Output::Taken`]): a streamed result may wait for others.
        if let (Some(receipt), Some(_)) = (receipt, &self.store) {
            if self.held.len() >= MAX_PENDING_AUDIT {
                let scheduler = &self.scheduler;
                self.held
                    .retain(|_, e| scheduler.progress(&e.job).is_some_and(|(_, ended)| !ended));
            }
            self.held.insert(
                pending.ticket,
                AuditEntry {
                    job: pending.job,
                    seq: 0,
                    segment: self.meta.get(&pending.job).map_or(0, |m| m.segment),
                    lane: Lane::Main,
                    step: pending.step,
                    layers: pending.layers,
                    recorded_at: now,
                    receipt,
                },
            );
        }
        self.scheduler.handle_result(now, pending.ticket, outcome);
    }

    /// A unit that got no answer.
    pub fn on_failure(&mut self, pending: Pending, reason: String, now: UnixMillis) {
        self.scheduler
            .handle_result(now, pending.ticket, Err(StepFailure::Unreachable(reason)));
    }

    /// Deadlines: late units fail, watchers past their wait get a report.
    pub fn tick(&mut self, now: UnixMillis) {
        self.scheduler.tick(now);
    }

    /// Watchers whose wait is over; answers held for a commit, when the
    /// `cut`th batch, holding their job (among `committed`, sorted), is;
    /// and watchers with news: once the job ends, or no sooner than
    /// [`REPORT_EVERY`] after the job's last report, so that a fast job's
    /// reports carry several tokens each.
    fn answer_watchers(
        &mut self,
        committed: &[JobId],
        cut: u64,
        now: UnixMillis,
    ) -> Vec<(C, Vec<u8>)> {
        let instant = Instant::now();
        let mut out = Vec::new();
        let mut kept = Vec::new();
        for w in std::mem::take(&mut self.watchers) {
            let ready = match w.held_after {
                Some(after) => cut > after && committed.binary_search(&w.job).is_ok(),
                None => self.durable_progress(&w.job).is_none_or(|(tokens, ended)| {
                    let due = self
                        .reported
                        .get(&w.job)
                        .is_none_or(|at| instant.duration_since(*at) >= REPORT_EVERY);
                    ended || (tokens > w.from_token as usize && due)
                }),
            };
            if ready || instant >= w.deadline {
                let bytes = self.report_bytes(&w.job, w.from_token, now);
                if w.held_after.is_none() {
                    self.reported.insert(w.job, instant);
                }
                out.push((w.channel, bytes));
            } else {
                kept.push(w);
            }
        }
        self.watchers = kept;
        if self.reported.len() > MAX_TRACKED_SUBMITTERS {
            let watched: std::collections::HashSet<JobId> =
                self.watchers.iter().map(|w| w.job).collect();
            self.reported.retain(|job, _| watched.contains(job));
        }
        out
    }

    /// Answers every watcher whose wait is over.
    pub fn expire_watchers(&mut self, now: UnixMillis) -> Vec<(C, Vec<u8>)> {
        self.answer_watchers(&[], 0, now)
    }

    /// A job's state, if known.
    #[must_use]
    pub fn view(&self, job: &JobId) -> Option<JobView> {
        self.scheduler.view(job)
    }

    /// The signed report of `job` from token `from` on.
    pub fn report_bytes(&self, job: &JobId, from: u32, now: UnixMillis) -> Vec<u8> {
        match self.report(job, from, now) {
            Some(r) => Envelope::seal(&self.identity, &r)
                .map(|e| e.to_bytes())
                .unwrap_or_else(|e| self.refuse(ErrorCode::INTERNAL, e.to_string(), now)),
            None => self.refuse(ErrorCode::UNKNOWN_JOB, format!("no job {job} here"), now),
        }
    }

    /// The report of a job known only from the database (finished before a restart).
    fn stored_report(&self, job: &JobId, from: u32, now: UnixMillis) -> Option<JobReport> {
        let stored = self.store.as_ref()?.get(job).ok()??;
        let text = self
            .models
            .get(&stored.spec.model)
            .and_then(|m| m.tokenizer.decode(&stored.tokens).ok())
            .map(|t| t.trim_end_matches('\u{FFFD}').to_owned())
            .unwrap_or_default();
        let state = match stored.state.as_str() {
            "stop" => JobState::Stopped,
            "length" => JobState::Length,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Failed {
                code: ErrorCode::LOST,
                message: stored
                    .error
                    .clone()
                    .unwrap_or_else(|| "the job was lost in a restart".into()),
            },
        };
        let from = (from as usize).min(stored.tokens.len());
        Some(JobReport {
            coordinator: self.identity.node_id(),
            job: *job,
            model: stored.spec.model,
            state,
            prompt_tokens: 0,
            from_token: from as u32,
            tokens: BoundedVec::try_from_vec(stored.tokens[from..].to_vec()).unwrap_or_default(),
            total_tokens: stored.tokens.len() as u32,
            text,
            route: BoundedVec::new(),
            failovers: 0,
            receipts: stored.receipts,
            transcript: stored.transcript.unwrap_or(commons_protocol::Hash([0; 32])),
            verified: 0,
            check_units: 0,
            revisions: 0,
            prefill_ms: 0,
            decode_ms: 0,
            audit: stored.audit.map(|h| AuditAnchor {
                entries: h.entries,
                head: h.head,
            }),
            issued_at: now,
            expires_at: now.plus_millis(REPORT_TTL_MS),
        })
    }

    /// The report of a job the scheduler knows: its tokens, state, receipts,
    /// transcript and audit head as last committed, the rest (route, counts,
    /// timings) as they are now.
    fn report(&self, job: &JobId, from: u32, now: UnixMillis) -> Option<JobReport> {
        let Some(v) = self.scheduler.view(job) else {
            return self.stored_report(job, from, now);
        };
        // Not yet recorded: nothing to show but that it waits.
        let unrecorded = durable::Snapshot {
            status: JobStatus::Queued,
            tokens: Vec::new(),
            receipts: 0,
            transcript: commons_protocol::Hash([0; 32]),
            audit: None,
        };
        let shown = self.durable.snapshots.get(job).unwrap_or(&unrecorded);
        let text = self
            .models
            .get(&v.model)
            .and_then(|m| m.tokenizer.decode(&shown.tokens).ok())
            .map(|t| t.trim_end_matches('\u{FFFD}').to_owned())
            .unwrap_or_default();
        let from = (from as usize).min(shown.tokens.len());
        let state = state_of(&shown.status);
        Some(JobReport {
            coordinator: self.identity.node_id(),
            job: *job,
            model: v.model,
            state,
            prompt_tokens: v.prompt.len() as u32,
            from_token: from as u32,
            tokens: BoundedVec::try_from_vec(shown.tokens[from..].to_vec()).unwrap_or_default(),
            total_tokens: shown.tokens.len() as u32,
            text,
            route: BoundedVec::try_from_vec(
                v.hops
                    .iter()
                    .take(256)
                    .map(|h| RouteHop {
                        node: h.node,
                        layers: h.layers,
                        results: h.results,
                    })
                    .collect(),
            )
            .unwrap_or_default(),
            failovers: v.failovers,
            receipts: shown.receipts,
            transcript: shown.transcript,
            verified: v.verified,
            check_units: v.check_units,
            revisions: v.revisions,
            prefill_ms: v.prefill_ms,
            decode_ms: v.decode_ms,
            audit: shown.audit,
            issued_at: now,
            expires_at: now.plus_millis(REPORT_TTL_MS),
        })
    }
}

fn state_of(status: &JobStatus) -> JobState {
    match status.clone() {
        JobStatus::Queued => JobState::Queued,
        JobStatus::Running => JobState::Running,
        JobStatus::Stopped => JobState::Stopped,
        JobStatus::Length => JobState::Length,
        JobStatus::Cancelled => JobState::Cancelled,
        JobStatus::Failed { code, message } => JobState::Failed { code, message },
    }
}

/// Why an answer to a unit is not taken as its result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// The node refused the unit with a signed error.
    #[error("refused: {message} ({code})")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The envelope does not open: malformed, badly signed, expired…
    #[error("the answer's envelope is refused")]
    Envelope(#[source] OpenError),
    /// The result's receipt (unit, commitment, metrics) is not validly
    /// signed by the executor it names: forged, or altered after signing.
    #[error("forged receipt: the result for unit {unit} is not validly signed by {executor}")]
    ForgedReceipt {
        /// The unit it claims to answer.
        unit: UnitId,
        /// The executor it names.
        executor: NodeId,
        /// Why.
        #[source]
        source: VerifyError,
    },
    /// Validly signed, but the outputs are malformed or do not match the
    /// commitment the executor signed.
    #[error("the result does not hold together")]
    Inconsistent(#[source] ResultError),
    /// A result for another unit.
    #[error("result for unit {got}, not {expected}")]
    WrongUnit {
        /// The unit sent.
        expected: UnitId,
        /// The unit answered.
        got: UnitId,
    },
    /// A result signed by another node than the one the unit went to.
    #[error("result signed by {executor}, sent to {node}")]
    WrongExecutor {
        /// Who signed it.
        executor: NodeId,
        /// Where the unit went.
        node: NodeId,
    },
    /// Neither a result nor an error.
    #[error("a {kind:?} in answer to a work unit")]
    UnexpectedKind {
        /// What came.
        kind: MessageKind,
    },
}

impl AnswerError {
    /// A stable name for counting: `refused`, `bad_envelope`,
    /// `forged_receipt`, `inconsistent_result`, `wrong_unit`,
    /// `wrong_executor`, `unexpected_kind`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Refused { .. } => "refused",
            Self::Envelope(_) => "bad_envelope",
            Self::ForgedReceipt { .. } => "forged_receipt",
            Self::Inconsistent(_) => "inconsistent_result",
            Self::WrongUnit { .. } => "wrong_unit",
            Self::WrongExecutor { .. } => "wrong_executor",
            Self::UnexpectedKind { .. } => "unexpected_kind",
        }
    }

    /// The message with its causes, `: `-separated.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// Opens and checks the answer to `unit` from `node`: a result with its
/// receipt, or why not.
pub fn check_response(
    unit: UnitId,
    node: NodeId,
    bytes: &[u8],
    now: UnixMillis,
) -> Result<(StepResult, Receipt), AnswerError> {
    let envelope = Envelope::from_bytes(bytes).map_err(AnswerError::Envelope)?;
    match envelope.kind() {
        MessageKind::WorkResult => {
            let result: WorkResult = envelope.open(now).map_err(AnswerError::Envelope)?;
            result.verify().map_err(|e| match e {
                ResultError::Signature(source) => AnswerError::ForgedReceipt {
                    unit: result.unit,
                    executor: result.executor,
                    source,
                },
                other => AnswerError::Inconsistent(other),
            })?;
            if result.unit != unit {
                return Err(AnswerError::WrongUnit {
                    expected: unit,
                    got: result.unit,
                });
            }
            if result.executor != node {
                return Err(AnswerError::WrongExecutor {
                    executor: result.executor,
                    node,
                });
            }
            let receipt = result.receipt();
            Ok((
                StepResult {
                    executor: result.executor,
                    commitment: result.commitment,
                    input: result.input,
                    outputs: result.outputs.into_vec(),
                },
                receipt,
            ))
        }
        MessageKind::ErrorReply => {
            let reply: ErrorReply = envelope.open(now).map_err(AnswerError::Envelope)?;
            Err(AnswerError::Refused {
                code: reply.code,
                message: reply.message,
            })
        }
        kind => Err(AnswerError::UnexpectedKind { kind }),
    }
}

#[cfg(test)]
mod tests;
