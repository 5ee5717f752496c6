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
    store: Option<JobStore>,
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
    /// The ledger's revision and exclusion count last kept in the store, and when.
    ledger_kept: (u64, u64, std::time::Instant),
    /// Each job's audit log head as last committed, for its reports.
    anchors: HashMap<JobId, AuditAnchor>,
    /// Jobs changed since the last [`Coordinating::settle`].
    changed: Vec<JobId>,
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
            store,
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
            ledger_kept: (0, 0, std::time::Instant::now()),
            anchors: HashMap::new(),
            changed: Vec::new(),
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
        // Receipts taken are logged before any report can mention them.
        if !self.audit_pending.is_empty() {
            self.persist(&[], now);
        }
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
                    Ok(()) => Answer::Now(channel, self.report_bytes(&job, 0, now)),
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
                let Some((tokens, ended)) = self.scheduler.progress(&job) else {
                    return Answer::Now(channel, self.report_bytes(&job, from_token, now));
                };
                if tokens > from_token as usize || ended || wait_ms == 0 {
                    return Answer::Now(channel, self.report_bytes(&job, from_token, now));
                }
                self.watchers.push(Watcher {
                    job,
                    from_token,
                    deadline: Instant::now()
                        + Duration::from_millis(u64::from(wait_ms)).min(MAX_WAIT),
                    channel,
                });
                Answer::Later
            }
            JobOp::Cancel { job } => {
                if self.scheduler.cancel(now, &job, &request.submitter) {
                    Answer::Now(channel, self.report_bytes(&job, 0, now))
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

    fn submit(
        &mut self,
        submitter: NodeId,
        spec: JobSpec,
        now: UnixMillis,
    ) -> Result<(), (ErrorCode, String)> {
        let job_id = spec.job;
        self.coalitions
            .authorize(spec.coalition, &submitter)
            .map_err(|e| (ErrorCode::UNAUTHORIZED, format!("job refused: {e}")))?;
        if let Some(existing) = self.meta.get(&spec.job) {
            return if existing.spec == spec {
                Ok(())
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
        // Accepted means recorded: the report goes out after the commit.
        self.persist(&[job_id], now);
        Ok(())
    }

    /// Drains the scheduler: units to send, tokens to sample, watchers to answer.
    pub fn drain(&mut self, now: UnixMillis) -> (Vec<Outgoing>, Vec<(C, Vec<u8>)>) {
        let sends = self.drain_sends(now);
        let answers = self.settle(now);
        (sends, answers)
    }

    /// The units to send now (tokens to sample are sampled on the way). The
    /// jobs that changed wait for [`Coordinating::settle`], so that the next
    /// hop's unit leaves before the previous result is written to disk: a
    /// durable commit per step would otherwise sit between every two hops.
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
            }
        }
        sends
    }

    /// Records the jobs that changed since the last call, with their
    /// receipts, in one transaction; then answers their watchers (never
    /// before their progress is on disk).
    pub fn settle(&mut self, now: UnixMillis) -> Vec<(C, Vec<u8>)> {
        let mut changed = std::mem::take(&mut self.changed);
        changed.sort();
        changed.dedup();
        self.persist(&changed, now);
        self.answer_watchers(&changed, now)
    }

    /// Records the current state of `jobs`, and appends the receipts taken
    /// since the last commit to their jobs' audit logs (with those jobs'
    /// records), in one transaction.
    fn persist(&mut self, jobs: &[JobId], now: UnixMillis) {
        let Some(store) = &self.store else {
            self.audit_pending.clear();
            return;
        };
        let mut ids = jobs.to_vec();
        ids.extend(self.audit_pending.iter().map(|e| e.job));
        ids.sort();
        ids.dedup();
        let records: Vec<StoredJob> = ids
            .iter()
            .filter_map(|id| {
                let v = self.scheduler.view(id)?;
                let meta = self.meta.get(id)?;
                let error = match &v.status {
                    JobStatus::Failed { code, message } => Some(format!("{message} ({code})")),
                    _ => None,
                };
                Some(StoredJob {
                    submitter: v.submitter,
                    spec: meta.spec.clone(),
                    tokens: v.tokens,
                    state: state_of(&v.status).name().into(),
                    error,
                    updated_at: now.0,
                    receipts: v.receipts,
                    transcript: Some(v.transcript),
                    segment: meta.segment,
                    audit: None,
                })
            })
            .collect();
        let ledger = self.scheduler.ledger();
        let (revision, exclusions, at) = self.ledger_kept;
        let keep_ledger = ledger.revision() != revision
            && (ledger.stats.exclusions != exclusions || at.elapsed() >= LEDGER_KEEP_INTERVAL);
        let state = keep_ledger.then(|| ledger.state());
        let kept = (ledger.revision(), ledger.stats.exclusions);
        match store.commit_with(&records, &self.audit_pending, state.as_ref()) {
            Ok(heads) => {
                self.audit_pending.clear();
                for (job, head) in heads {
                    self.anchors.insert(
                        job,
                        AuditAnchor {
                            entries: head.entries,
                            head: head.head,
                        },
                    );
                }
                if keep_ledger {
                    self.ledger_kept = (kept.0, kept.1, std::time::Instant::now());
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot record jobs and receipts");
                // Kept for the next commit; past the bound, the oldest are
                // lost, and an audit of their jobs will say so.
                let excess = self.audit_pending.len().saturating_sub(MAX_PENDING_AUDIT);
                if excess > 0 {
                    tracing::error!(lost = excess, "audit entries dropped");
                    self.audit_pending.drain(..excess);
                }
            }
        }
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
    /// audit log, committed by the next [`Coordinating::drain`].
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
        let before = match (&receipt, &self.store) {
            (Some(_), Some(_)) => self.scheduler.view(&pending.job).map(|v| v.receipts),
            _ => None,
        };
        self.scheduler.handle_result(now, pending.ticket, outcome);
        let (Some(receipt), Some(before)) = (receipt, before) else {
            return;
        };
        // Taken into the transcript: the scheduler counted one more receipt.
        let taken = self
            .scheduler
            .view(&pending.job)
            .is_some_and(|v| v.receipts == before + 1);
        if taken {
            self.audit_pending.push(AuditEntry {
                job: pending.job,
                seq: 0,
                segment: self.meta.get(&pending.job).map_or(0, |m| m.segment),
                lane: Lane::Main,
                step: pending.step,
                layers: pending.layers,
                recorded_at: now,
                receipt,
            });
        }
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

    /// Watchers whose wait is over or whose job changed.
    fn answer_watchers(&mut self, changed: &[JobId], now: UnixMillis) -> Vec<(C, Vec<u8>)> {
        let instant = Instant::now();
        let mut out = Vec::new();
        let mut kept = Vec::new();
        for w in std::mem::take(&mut self.watchers) {
            let ready = instant >= w.deadline
                || (changed.contains(&w.job)
                    && self
                        .scheduler
                        .progress(&w.job)
                        .is_none_or(|(tokens, ended)| tokens > w.from_token as usize || ended));
            if ready {
                let bytes = self.report_bytes(&w.job, w.from_token, now);
                out.push((w.channel, bytes));
            } else {
                kept.push(w);
            }
        }
        self.watchers = kept;
        out
    }

    /// Answers every watcher whose wait is over.
    pub fn expire_watchers(&mut self, now: UnixMillis) -> Vec<(C, Vec<u8>)> {
        self.answer_watchers(&[], now)
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

    fn report(&self, job: &JobId, from: u32, now: UnixMillis) -> Option<JobReport> {
        let Some(v) = self.scheduler.view(job) else {
            return self.stored_report(job, from, now);
        };
        let text = self
            .models
            .get(&v.model)
            .and_then(|m| m.tokenizer.decode(&v.tokens).ok())
            .map(|t| t.trim_end_matches('\u{FFFD}').to_owned())
            .unwrap_or_default();
        let from = (from as usize).min(v.tokens.len());
        let state = state_of(&v.status);
        Some(JobReport {
            coordinator: self.identity.node_id(),
            job: *job,
            model: v.model,
            state,
            prompt_tokens: v.prompt.len() as u32,
            from_token: from as u32,
            tokens: BoundedVec::try_from_vec(v.tokens[from..].to_vec()).unwrap_or_default(),
            total_tokens: v.tokens.len() as u32,
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
            receipts: v.receipts,
            transcript: v.transcript,
            verified: v.verified,
            check_units: v.check_units,
            revisions: v.revisions,
            prefill_ms: v.prefill_ms,
            decode_ms: v.decode_ms,
            audit: self.anchors.get(job).copied(),
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
mod tests {
    use super::*;
    use commons_coordinator::routing::SpanOffer;
    use commons_protocol::messages::{ExecMetrics, SamplingParams};
    use commons_protocol::{Hash, Tensor};

    const NOW: UnixMillis = UnixMillis(1_000_000);

    fn executor() -> Identity {
        Identity::from_secret([21; 32])
    }

    fn metrics() -> ExecMetrics {
        ExecMetrics {
            queue_micros: 5,
            compute_micros: 700,
            tokens: 1,
            peak_memory_bytes: 0,
        }
    }

    fn result_for(unit: UnitId, token: u32) -> WorkResult {
        let output = Tensor::from_u32(&[1], &[token]).unwrap();
        WorkResult::sign(
            &executor(),
            unit,
            vec![output],
            metrics(),
            NOW,
            NOW.plus_millis(60_000),
        )
        .unwrap()
    }

    fn sealed(result: &WorkResult) -> Vec<u8> {
        Envelope::seal(&executor(), result).unwrap().to_bytes()
    }

    fn unit() -> UnitId {
        UnitId(Hash::of(b"a unit"))
    }

    #[test]
    fn a_valid_result_is_taken_with_its_receipt() {
        let result = result_for(unit(), 7);
        let (step, receipt) =
            check_response(unit(), executor().node_id(), &sealed(&result), NOW).unwrap();
        assert_eq!(step.commitment, result.commitment);
        assert_eq!(receipt, result.receipt());
        receipt.verify().unwrap();
    }

    #[test]
    fn a_forged_receipt_is_refused_with_its_own_error() {
        // Metrics altered after signing, sealed again by the executor: the
        // envelope opens, the receipt does not verify.
        let mut result = result_for(unit(), 7);
        result.metrics.compute_micros = 1;
        let err = check_response(unit(), executor().node_id(), &sealed(&result), NOW).unwrap_err();
        assert!(
            matches!(err, AnswerError::ForgedReceipt { unit: u, .. } if u == unit()),
            "{err:?}"
        );
        assert_eq!(err.name(), "forged_receipt");
        assert!(
            err.describe().contains("forged receipt"),
            "{}",
            err.describe()
        );
        // A signature byte flipped.
        let mut result = result_for(unit(), 7);
        result.signature.0[10] ^= 0x40;
        let err = check_response(unit(), executor().node_id(), &sealed(&result), NOW).unwrap_err();
        assert!(matches!(err, AnswerError::ForgedReceipt { .. }), "{err:?}");
    }

    #[test]
    fn other_bad_answers_have_their_own_errors() {
        let me = executor().node_id();
        // Validly signed, for another unit.
        let other = UnitId(Hash::of(b"another unit"));
        let err = check_response(unit(), me, &sealed(&result_for(other, 7)), NOW).unwrap_err();
        assert!(matches!(err, AnswerError::WrongUnit { .. }), "{err:?}");
        // Validly signed, by a node the unit did not go to.
        let elsewhere = Identity::from_secret([22; 32]).node_id();
        let err =
            check_response(unit(), elsewhere, &sealed(&result_for(unit(), 7)), NOW).unwrap_err();
        assert!(matches!(err, AnswerError::WrongExecutor { .. }), "{err:?}");
        // Signed over a commitment its outputs do not have.
        let mut result = result_for(unit(), 7);
        result.commitment = Hash::of(b"something else");
        result.signature = executor().sign(&Receipt::signed_bytes(
            &result.unit,
            &result.commitment,
            &result.metrics,
        ));
        let err = check_response(unit(), me, &sealed(&result), NOW).unwrap_err();
        assert!(matches!(err, AnswerError::Inconsistent(_)), "{err:?}");
        // Not an envelope.
        let err = check_response(unit(), me, b"garbage", NOW).unwrap_err();
        assert!(matches!(err, AnswerError::Envelope(_)), "{err:?}");
        // A refusal.
        let reply = ErrorReply {
            code: ErrorCode::OVERLOADED,
            message: "busy".into(),
            regarding: None,
            responder: me,
            issued_at: NOW,
            expires_at: NOW.plus_millis(1000),
        };
        let bytes = Envelope::seal(&executor(), &reply).unwrap().to_bytes();
        let err = check_response(unit(), me, &bytes, NOW).unwrap_err();
        assert!(
            matches!(err, AnswerError::Refused { code, .. } if code == ErrorCode::OVERLOADED),
            "{err:?}"
        );
    }

    /// A coordinator with a job database and one node serving all of a
    /// two-layer model, with a job submitted to the scheduler directly (the
    /// shell's model lookup needs a tokenizer).
    fn rig(dir: &std::path::Path) -> Coordinating<()> {
        let store = JobStore::open(&dir.join("jobs.redb")).unwrap();
        let mut c = Coordinating::new(
            Arc::new(Identity::from_secret([20; 32])),
            Vec::new(),
            Some(store),
            NOW,
        );
        let model = ModelId(Hash::of(b"model"));
        c.scheduler.set_offers(
            model,
            2,
            64,
            vec![SpanOffer {
                node: executor().node_id(),
                layers: LayerRange { start: 0, end: 2 },
                ms_per_layer: 1.0,
                rtt_ms: 1.0,
                queue_ms: 0.0,
            }],
        );
        c
    }

    fn submit(c: &mut Coordinating<()>, n: u8) -> JobId {
        let sampling = SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 1,
        };
        let spec = JobSpec {
            job: JobId([n; 16]),
            model: ModelId(Hash::of(b"model")),
            input: JobInput::Text("hello".into()),
            max_tokens: 4,
            sampling: sampling.clone(),
            coalition: None,
        };
        let submitter = Identity::from_secret([30; 32]).node_id();
        c.scheduler
            .submit_in(
                NOW,
                NewJob {
                    id: spec.job,
                    submitter,
                    model: spec.model,
                    prompt: vec![1, 2, 3],
                    max_tokens: spec.max_tokens,
                    stop_tokens: vec![0],
                    sampling,
                },
                None,
            )
            .unwrap();
        c.meta.insert(
            spec.job,
            JobMeta {
                spec,
                sampler: None,
                segment: 0,
            },
        );
        JobId([n; 16])
    }

    fn sent_to_executor(c: &mut Coordinating<()>, job: JobId) -> Pending {
        let (sends, _) = c.drain(NOW);
        sends
            .into_iter()
            .find(|o| o.pending.job == job)
            .map(|o| o.pending)
            .expect("a unit for the job")
    }

    #[test]
    fn taken_results_are_logged_before_reports_and_forged_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = rig(dir.path());
        let me = executor().node_id();

        // A valid result: taken into the transcript, and logged by the next drain.
        let job = submit(&mut c, 1);
        let pending = sent_to_executor(&mut c, job);
        assert_eq!(pending.step, 0);
        c.on_response(pending, me, &sealed(&result_for(pending.unit, 9)), NOW);
        assert_eq!(c.audit_pending.len(), 1);
        let view = c.view(&job).unwrap();
        assert_eq!(view.receipts, 1);
        let _ = c.drain(NOW);
        assert!(c.audit_pending.is_empty());

        // A forged answer to another job's unit: refused, counted, not logged.
        let other = submit(&mut c, 2);
        let pending = sent_to_executor(&mut c, other);
        let mut forged = result_for(pending.unit, 9);
        forged.metrics.tokens = 1000;
        c.on_response(pending, me, &sealed(&forged), NOW);
        assert!(c.audit_pending.is_empty());
        assert_eq!(c.rejected_results().get("forged_receipt"), Some(&1));
        assert_eq!(c.view(&other).unwrap().receipts, 0);
        let _ = c.drain(NOW);

        let store = c.store.as_ref().unwrap();
        let stored = store.get(&job).unwrap().unwrap();
        assert_eq!(stored.receipts, 1);
        assert_eq!(stored.transcript, Some(view.transcript));
        let records = store.audit(&job).unwrap();
        assert_eq!(records.len(), 1);
        let record = records[0].record.clone().unwrap();
        assert_eq!(record.entry.lane, Lane::Main);
        assert_eq!(record.entry.layers, LayerRange { start: 0, end: 2 });
        assert_eq!(record.entry.receipt.executor, me);
        let report = crate::audit::check(&stored, records);
        assert!(report.passed(), "{:?}", report.problems);
        assert!(store.audit(&other).unwrap().is_empty());
        let stored_other = store.get(&other).unwrap().unwrap();
        assert!(crate::audit::check(&stored_other, Vec::new()).passed());
    }

    #[test]
    fn exclusions_and_records_outlive_a_restart() {
        use commons_coordinator::verify::{LedgerState, Record, VerifyStats};
        let dir = tempfile::tempdir().unwrap();
        let liar = NodeId([66; 32]);
        let trusted = executor().node_id();
        let state = LedgerState {
            records: vec![(
                trusted,
                Record {
                    valid_streak: 40,
                    valid: 40,
                    invalid: 0,
                },
            )],
            excluded: vec![(liar, vec![None])],
            disagreed: Vec::new(),
            stats: VerifyStats {
                exclusions: 1,
                ..VerifyStats::default()
            },
        };
        {
            let mut c = rig(dir.path());
            c.scheduler.restore_ledger(state.clone());
            // An exclusion is kept at once, not at the next interval.
            c.persist(&[], NOW);
            assert_eq!(c.store.as_ref().unwrap().ledger().unwrap(), Some(state));
        }
        let c = rig(dir.path());
        let ledger = c.scheduler.ledger();
        assert!(ledger.is_excluded(&liar, None));
        assert_eq!(ledger.record(&trusted).valid_streak, 40);
        assert!(ledger.probability(&trusted) < 0.1, "not back on probation");
        assert!(
            c.verification()
                .excluded
                .iter()
                .any(|e| e.peer_id == liar.to_string() && e.coalition.is_none())
        );
    }
}
