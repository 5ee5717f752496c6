//! What the coordinator has on disk, and the commits that put it there.
//!
//! A commit of the job database costs a disk flush (about a millisecond on
//! an ordinary disk, far more on a busy one), so it never runs on the event
//! loop: [`Coordinating::settle`] cuts a [`Batch`] of everything that
//! changed (job records, audit entries, the verification ledger), the shell
//! commits it on a thread of its own ([`crate::jobstore::Committer`]) and
//! hands the outcome to [`Coordinating::on_committed`]. One batch is in
//! flight at a time; what changes meanwhile goes into the next, so at full
//! speed one commit covers many results (group commit) instead of one each.
//!
//! Nothing is reported before it is on disk: each job's report shows the
//! [`Snapshot`] of its last committed record (tokens, state, receipts,
//! transcript, audit head), never the scheduler's newer state, and answers
//! to submissions and cancellations wait for the commit that records them.
//! A crash can lose only what no report has shown: the job resumes from its
//! record.

use std::collections::HashMap;
use std::time::Instant;

use commons_coordinator::job::JobStatus;
use commons_protocol::messages::AuditAnchor;
use commons_protocol::{Hash, JobId, UnixMillis};

use super::{Coordinating, MAX_PENDING_AUDIT, Watcher, state_of};
use crate::audit::{AuditEntry, AuditHead};
use crate::jobstore::{Batch, Committed, StoredJob};

/// A job as its last committed record has it: what reports may show.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    pub(super) status: JobStatus,
    pub(super) tokens: Vec<u32>,
    pub(super) receipts: u32,
    pub(super) transcript: Hash,
    pub(super) audit: Option<AuditAnchor>,
}

/// A batch handed to the database and not yet answered.
#[derive(Debug)]
pub(super) struct InFlight {
    /// Its place among the batches cut, from 1.
    cut: u64,
    snapshots: Vec<(JobId, Snapshot)>,
    entries: Vec<AuditEntry>,
    /// The ledger revision and exclusion count the batch keeps, if it keeps the ledger.
    ledger: Option<(u64, u64)>,
}

/// Commits between two sweeps of snapshots of jobs the scheduler forgot.
const PRUNE_EVERY: u64 = 1024;

/// The coordinator's side of durability.
#[derive(Debug, Default)]
pub(super) struct Durable {
    /// Per job, the snapshot of its last committed record.
    pub(super) snapshots: HashMap<JobId, Snapshot>,
    pub(super) in_flight: Option<InFlight>,
    /// Batches cut so far.
    pub(super) cuts: u64,
    commits: u64,
}

impl<C> Coordinating<C> {
    /// Cuts the next batch: every job that changed since the last cut (and
    /// every job with new receipts), the receipts, and the ledger when it is
    /// due. Without a job database the batch counts as committed at once,
    /// and the watchers it answers are returned; with one, the batch is
    /// returned for the shell to commit, then [`Coordinating::on_committed`].
    /// Nothing is cut while a batch is in flight.
    pub fn settle(&mut self, now: UnixMillis) -> (Option<Batch>, Vec<(C, Vec<u8>)>) {
        if self.durable.in_flight.is_some() {
            return (None, Vec::new());
        }
        let mut ids = std::mem::take(&mut self.changed);
        ids.extend(self.audit_pending.iter().map(|e| e.job));
        ids.sort();
        ids.dedup();
        let ledger = self.scheduler.ledger();
        let (revision, exclusions, at) = self.ledger_kept;
        let keep_ledger = self.store.is_some()
            && ledger.revision() != revision
            && (ledger.stats.exclusions != exclusions
                || at.elapsed() >= super::LEDGER_KEEP_INTERVAL);
        if ids.is_empty() && !keep_ledger {
            return (None, Vec::new());
        }
        let ledger_state = keep_ledger.then(|| ledger.state());
        let ledger_mark = keep_ledger.then(|| (ledger.revision(), ledger.stats.exclusions));
        let mut records = Vec::with_capacity(ids.len());
        let mut snapshots = Vec::with_capacity(ids.len());
        for id in &ids {
            let (Some(v), Some(meta)) = (self.scheduler.view(id), self.meta.get(id)) else {
                continue;
            };
            let error = match &v.status {
                JobStatus::Failed { code, message } => Some(format!("{message} ({code})")),
                _ => None,
            };
            records.push(StoredJob {
                submitter: v.submitter,
                spec: meta.spec.clone(),
                tokens: v.tokens.clone(),
                state: state_of(&v.status).name().into(),
                error,
                updated_at: now.0,
                receipts: v.receipts,
                transcript: Some(v.transcript),
                segment: meta.segment,
                audit: None,
            });
            snapshots.push((
                *id,
                Snapshot {
                    status: v.status,
                    tokens: v.tokens,
                    receipts: v.receipts,
                    transcript: v.transcript,
                    audit: None,
                },
            ));
        }
        let entries = std::mem::take(&mut self.audit_pending);
        let batch = Batch {
            jobs: records,
            entries: entries.clone(),
            ledger: ledger_state,
        };
        self.durable.cuts += 1;
        self.durable.in_flight = Some(InFlight {
            cut: self.durable.cuts,
            snapshots,
            entries,
            ledger: ledger_mark,
        });
        if self.store.is_none() {
            return (None, self.on_committed(Ok(Vec::new()), now));
        }
        (Some(batch), Vec::new())
    }

    /// The outcome of committing the batch [`Coordinating::settle`] cut:
    /// on success its jobs' reports move on, and their watchers, and the
    /// submissions and cancellations it records, are answered; on failure
    /// its receipts go back to be committed with the next batch (past a
    /// bound the oldest are dropped, and an audit of their jobs will say so).
    pub fn on_committed(&mut self, outcome: Committed, now: UnixMillis) -> Vec<(C, Vec<u8>)> {
        let Some(batch) = self.durable.in_flight.take() else {
            return Vec::new();
        };
        let heads = match outcome {
            Ok(heads) => heads,
            Err(e) => {
                tracing::error!(error = %e, "cannot record jobs and receipts");
                // Their jobs are cut again, with their receipts first.
                self.changed
                    .extend(batch.snapshots.iter().map(|(id, _)| *id));
                let mut entries = batch.entries;
                entries.append(&mut self.audit_pending);
                let excess = entries.len().saturating_sub(MAX_PENDING_AUDIT);
                if excess > 0 {
                    tracing::error!(lost = excess, "audit entries dropped");
                    entries.drain(..excess);
                }
                self.audit_pending = entries;
                return Vec::new();
            }
        };
        if let Some((revision, exclusions)) = batch.ledger {
            self.ledger_kept = (revision, exclusions, Instant::now());
        }
        let heads: HashMap<JobId, AuditHead> = heads.into_iter().collect();
        let mut committed = Vec::with_capacity(batch.snapshots.len());
        for (id, mut snapshot) in batch.snapshots {
            snapshot.audit = heads
                .get(&id)
                .map(|h| AuditAnchor {
                    entries: h.entries,
                    head: h.head,
                })
                .or_else(|| self.durable.snapshots.get(&id).and_then(|s| s.audit));
            self.durable.snapshots.insert(id, snapshot);
            committed.push(id);
        }
        self.durable.commits += 1;
        if self.durable.commits.is_multiple_of(PRUNE_EVERY) {
            let scheduler = &self.scheduler;
            self.durable
                .snapshots
                .retain(|id, _| scheduler.progress(id).is_some());
        }
        self.answer_watchers(&committed, batch.cut, now)
    }

    /// Commits until nothing is left to commit, on this thread; returns the
    /// answers released. For a coordinator that is stopping, and for tests.
    pub fn commit_now(&mut self, now: UnixMillis) -> Vec<(C, Vec<u8>)> {
        let mut answers = Vec::new();
        // Each round either commits (and takes what was pending) or fails;
        // a failing database is not tried forever.
        for _ in 0..4 {
            if self.durable.in_flight.is_some() {
                return answers;
            }
            let (batch, mut released) = self.settle(now);
            answers.append(&mut released);
            let (Some(batch), Some(store)) = (batch, self.store.clone()) else {
                return answers;
            };
            let outcome = store.commit_batch(&batch).map_err(|e| format!("{e:#}"));
            answers.extend(self.on_committed(outcome, now));
        }
        answers
    }

    /// Released tokens and whether the job has ended, as last committed;
    /// `None` for a job the scheduler does not know.
    pub(super) fn durable_progress(&self, job: &JobId) -> Option<(usize, bool)> {
        self.scheduler.progress(job)?;
        Some(
            self.durable
                .snapshots
                .get(job)
                .map_or((0, false), |s| (s.tokens.len(), s.status.is_terminal())),
        )
    }

    /// Whether a batch is being committed.
    #[must_use]
    pub fn commit_in_flight(&self) -> bool {
        self.durable.in_flight.is_some()
    }

    /// The job database, if any.
    #[must_use]
    pub fn store(&self) -> Option<std::sync::Arc<crate::jobstore::JobStore>> {
        self.store.clone()
    }

    /// Holds the answer on `channel` until a record of `job` cut from now
    /// on is committed.
    pub(super) fn hold(&mut self, job: JobId, channel: C) {
        self.watchers.push(Watcher {
            job,
            from_token: 0,
            deadline: Instant::now() + super::MAX_WAIT,
            channel,
            held_after: Some(self.durable.cuts),
        });
    }
}
