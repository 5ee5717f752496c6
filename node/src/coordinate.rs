//! The coordinator role of a node (`commons node join --coordinator`): the
//! shell around [`commons_coordinator::job::Scheduler`]. It turns signed job
//! requests into scheduler inputs, signs the scheduler's units and hands them
//! to the swarm, checks the signed results that come back, samples tokens
//! when a job is not greedy, and answers watchers (long polls) with signed
//! reports. All decisions are the scheduler's; this module only moves bytes,
//! and refuses, before the scheduler sees them, jobs from non-members of the
//! job's coalition and submitters over their rate limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use commons_coordinator::job::{
    JobStatus, JobView, NewJob, Output, Scheduler, SchedulerConfig, StepFailure, StepResult, Ticket,
};
use commons_coordinator::quota::{Quotas, RateLimit};
use commons_coordinator::routing::SpanOffer;
use commons_coordinator::trust::Coalitions;
use commons_protocol::envelope::{Envelope, MessageKind};
use commons_protocol::messages::{
    ErrorCode, ErrorReply, JobInput, JobOp, JobReport, JobRequest, JobSpec, JobState, RouteHop,
    WorkBody, WorkResult, WorkUnit,
};
use commons_protocol::replay::ReplayGuard;
use commons_protocol::{
    BoundedVec, CoalitionId, Identity, JobId, ModelId, NodeId, Nonce, UnitId, UnixMillis,
};

use crate::executor::{ChatMessage, Sampler, SamplingConfig, Tokenizer};
use crate::jobstore::{JobStore, StoredJob};

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
}

/// A unit sent and not yet answered.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    ticket: Ticket,
    unit: UnitId,
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
    nonce_counter: u64,
    nonce_seed: [u8; 8],
    coalitions: Coalitions,
    quotas: Option<Quotas<NodeId>>,
    refusals: BTreeMap<String, u64>,
}

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
            nonce_counter: 0,
            nonce_seed: seed.to_le_bytes(),
            coalitions: Coalitions::open(),
            quotas: None,
            refusals: BTreeMap::new(),
        };
        this.resume_stored(now);
        this
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

    /// Job requests refused so far, by error code name.
    #[must_use]
    pub fn refusals(&self) -> BTreeMap<String, u64> {
        self.refusals.clone()
    }

    /// Models it plans for.
    pub fn models(&self) -> impl Iterator<Item = &KnownModel> {
        self.models.values()
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
        self.meta.insert(spec.job, JobMeta { spec, sampler });
        // Accepted means recorded: the report goes out after the commit.
        self.persist(&[job_id], now);
        Ok(())
    }

    fn next_nonce(&mut self) -> Nonce {
        self.nonce_counter += 1;
        let mut n = [0u8; 16];
        n[..8].copy_from_slice(&self.nonce_seed);
        n[8..].copy_from_slice(&self.nonce_counter.to_le_bytes());
        Nonce(n)
    }

    /// Drains the scheduler: units to send, tokens to sample, watchers to answer.
    pub fn drain(&mut self, now: UnixMillis) -> (Vec<Outgoing>, Vec<(C, Vec<u8>)>) {
        let mut sends = Vec::new();
        let mut changed = Vec::new();
        while let Some(out) = self.scheduler.poll_output() {
            match out {
                Output::Send {
                    ticket,
                    node,
                    unit,
                    deadline,
                    ..
                } => {
                    let unit = WorkUnit {
                        issuer: self.identity.node_id(),
                        nonce: self.next_nonce(),
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
                            pending: Pending { ticket, unit: id },
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
                Output::Changed { job } => changed.push(job),
            }
        }
        changed.sort();
        changed.dedup();
        self.persist(&changed, now);
        let answers = self.answer_watchers(&changed, now);
        (sends, answers)
    }

    /// Records the current state of `jobs`.
    fn persist(&self, jobs: &[JobId], now: UnixMillis) {
        let Some(store) = &self.store else {
            return;
        };
        let records: Vec<StoredJob> = jobs
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
                })
            })
            .collect();
        if let Err(e) = store.put_all(&records) {
            tracing::error!(%e, "cannot record jobs");
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

    /// The answer to a unit: a signed result or error envelope.
    pub fn on_response(&mut self, pending: Pending, node: NodeId, bytes: &[u8], now: UnixMillis) {
        let outcome = check_response(pending.unit, node, bytes, now);
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
            receipts: 0,
            transcript: commons_protocol::Hash([0; 32]),
            prefill_ms: 0,
            decode_ms: 0,
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
            prefill_ms: v.prefill_ms,
            decode_ms: v.decode_ms,
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

/// Opens and checks the answer to `unit` from `node`.
fn check_response(
    unit: UnitId,
    node: NodeId,
    bytes: &[u8],
    now: UnixMillis,
) -> Result<StepResult, StepFailure> {
    let envelope = Envelope::from_bytes(bytes).map_err(|e| StepFailure::Invalid(e.to_string()))?;
    match envelope.kind() {
        MessageKind::WorkResult => {
            let result: WorkResult = envelope
                .open(now)
                .map_err(|e| StepFailure::Invalid(e.to_string()))?;
            result
                .verify()
                .map_err(|e| StepFailure::Invalid(e.to_string()))?;
            if result.unit != unit {
                return Err(StepFailure::Invalid(format!(
                    "result for unit {}, not {unit}",
                    result.unit
                )));
            }
            if result.executor != node {
                return Err(StepFailure::Invalid(format!(
                    "result signed by {}, sent to {node}",
                    result.executor
                )));
            }
            Ok(StepResult {
                executor: result.executor,
                commitment: result.commitment,
                outputs: result.outputs.into_vec(),
            })
        }
        MessageKind::ErrorReply => {
            let reply: ErrorReply = envelope
                .open(now)
                .map_err(|e| StepFailure::Invalid(e.to_string()))?;
            Err(StepFailure::Refused {
                code: reply.code,
                message: reply.message,
            })
        }
        other => Err(StepFailure::Invalid(format!(
            "a {other:?} in answer to a work unit"
        ))),
    }
}
