//! The coordinator's durable record of jobs, in an embedded database (redb).
//!
//! Every accepted job is written with its spec, its submitter and the tokens
//! generated so far. The coordinator gathers what changed into a [`Batch`]
//! and commits it on a thread of its own ([`Committer`]), one batch at a
//! time, so that many results share a disk flush; a commit is durable
//! before the coordinator answers about it.
//! After a crash and restart, every job not finished is resumed from its
//! tokens (the scheduler replays them through a new chain) or reported
//! failed with its reason; none is silently lost.
//!
//! The same database holds each job's audit log ([`crate::audit`]): table
//! `audit`, keyed by job id ‖ sequence number (big-endian, so a job's entries
//! are contiguous and in order), each value an [`AuditRecord`] in the
//! canonical encoding. Entries are appended in the transaction that records
//! the job's new transcript and the log's head ([`AuditHead`]), and are never
//! rewritten or deleted.
//!
//! While a coordinator runs it holds the database open for writing, and redb
//! locks the file: [`JobReader::open`], used by `commons job audit`, then
//! fails with [`ReaderError::InUse`].

use std::path::Path;

use anyhow::Context as _;
use commons_coordinator::verify::LedgerState;
use commons_protocol::codec::{self, Limit};
use commons_protocol::messages::JobSpec;
use commons_protocol::{Hash, JobId, NodeId};
use redb::{ReadTransaction, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEntry, AuditHead, AuditRecord};

const JOBS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("jobs");
const AUDIT: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("audit");
/// The coordinator's verification ledger (one entry, JSON): records,
/// exclusions and disagreements outlive a restart.
const LEDGER: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("ledger");
const LEDGER_KEY: &str = "ledger";

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredJob {
    /// Who submitted it.
    pub submitter: NodeId,
    /// What they asked.
    pub spec: JobSpec,
    /// Tokens generated so far.
    pub tokens: Vec<u32>,
    /// `queued`, `running`, or a final state name.
    pub state: String,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// When it was last written (ms since the epoch).
    pub updated_at: u64,
    /// Results chained into the transcript in the current run
    /// ([`StoredJob::segment`]).
    #[serde(default)]
    pub receipts: u32,
    /// The transcript reported for the current run: blake3 chained over the
    /// commitments of its results. `None` in records written before
    /// transcripts were kept.
    #[serde(default)]
    pub transcript: Option<Hash>,
    /// Which run of the job this record describes: 0, then one more each
    /// time it is resumed after a restart (the scheduler starts a new
    /// transcript then).
    #[serde(default)]
    pub segment: u32,
    /// The head of the job's audit log when this record was written (set by
    /// [`JobStore::commit`]); `None` while the log is empty.
    #[serde(default)]
    pub audit: Option<AuditHead>,
}

impl StoredJob {
    /// True while the job still has work to do.
    #[must_use]
    pub fn is_unfinished(&self) -> bool {
        matches!(self.state.as_str(), "queued" | "running")
    }
}

/// The database.
#[derive(Debug)]
pub struct JobStore {
    db: redb::Database,
}

/// A set of changes to commit in one transaction.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The current record of every job that changed.
    pub jobs: Vec<StoredJob>,
    /// Receipts to append to their jobs' audit logs, in order.
    pub entries: Vec<AuditEntry>,
    /// The verification ledger, when it is due to be kept.
    pub ledger: Option<LedgerState>,
}

/// How a commit ended: the audit log head of each job written, or why it failed.
pub type Committed = Result<Vec<(JobId, AuditHead)>, String>;

/// A thread that commits batches, so that the disk flush of a commit never
/// holds up the caller: [`Committer::send`] hands it a batch, and the
/// outcome arrives on the receiver [`Committer::spawn`] returned. It ends
/// when the `Committer` is dropped, after the batch it holds.
#[derive(Debug)]
pub struct Committer {
    batches: std::sync::mpsc::SyncSender<Batch>,
}

impl Committer {
    /// Starts the thread, committing to `store`.
    pub fn spawn(
        store: std::sync::Arc<JobStore>,
    ) -> anyhow::Result<(Self, tokio::sync::mpsc::Receiver<Committed>)> {
        // One batch in flight at a time (the caller cuts the next when told).
        let (batches, incoming) = std::sync::mpsc::sync_channel::<Batch>(1);
        let (outcomes, results) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("commons-jobstore".into())
            .spawn(move || {
                while let Ok(batch) = incoming.recv() {
                    let outcome = store.commit_batch(&batch).map_err(|e| format!("{e:#}"));
                    if outcomes.blocking_send(outcome).is_err() {
                        return;
                    }
                }
            })
            .context("cannot start the job database's writer")?;
        Ok((Self { batches }, results))
    }

    /// Hands `batch` to the thread; gives it back if the thread holds one
    /// already or has stopped.
    pub fn send(&self, batch: Batch) -> Result<(), Box<Batch>> {
        self.batches.try_send(batch).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(b)
            | std::sync::mpsc::TrySendError::Disconnected(b) => Box::new(b),
        })
    }
}

/// `job id ‖ seq`, big-endian: a job's entries sort together and in order.
fn audit_key(job: &JobId, seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&job.0);
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The last record of `job`'s log in `table`, if any.
fn last_record(
    table: &impl redb::ReadableTable<&'static [u8], &'static [u8]>,
    job: &JobId,
) -> anyhow::Result<Option<AuditRecord>> {
    let (first, last) = (audit_key(job, 0), audit_key(job, u64::MAX));
    let Some(entry) = table.range(first.as_slice()..=last.as_slice())?.next_back() else {
        return Ok(None);
    };
    let (key, value) = entry?;
    let record = codec::decode::<AuditRecord>(value.value(), Limit::K4).with_context(|| {
        format!(
            "the last audit entry of job {job} (key {}) is unreadable",
            hex::encode(key.value())
        )
    })?;
    Ok(Some(record))
}

impl JobStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let db = redb::Database::create(path)
            .with_context(|| format!("cannot open the job database {}", path.display()))?;
        let tx = db.begin_write()?;
        tx.open_table(JOBS)?;
        tx.open_table(AUDIT)?;
        tx.open_table(LEDGER)?;
        tx.commit()?;
        Ok(Self { db })
    }

    /// Writes `jobs` in one durable transaction.
    pub fn put_all(&self, jobs: &[StoredJob]) -> anyhow::Result<()> {
        self.commit(jobs, &[])
    }

    /// Appends `entries` to their jobs' audit logs and writes `jobs`, in one
    /// durable transaction. Each entry's `seq` is set to its place in its
    /// job's log and its chain value computed from the entry before; each
    /// job record is written with its log's head. A job with new entries
    /// must be among `jobs`, so that its record's transcript and head move
    /// with its log.
    pub fn commit(&self, jobs: &[StoredJob], entries: &[AuditEntry]) -> anyhow::Result<()> {
        self.commit_with(jobs, entries, None).map(drop)
    }

    /// As [`JobStore::commit`], and replaces the verification ledger with
    /// `ledger` when given, in the same transaction. Returns the audit log
    /// head of each job written that has one.
    pub fn commit_with(
        &self,
        jobs: &[StoredJob],
        entries: &[AuditEntry],
        ledger: Option<&LedgerState>,
    ) -> anyhow::Result<Vec<(JobId, AuditHead)>> {
        let mut heads = Vec::new();
        if jobs.is_empty() && entries.is_empty() && ledger.is_none() {
            return Ok(heads);
        }
        let tx = self.db.begin_write()?;
        if let Some(state) = ledger {
            let value = serde_json::to_vec(state)?;
            tx.open_table(LEDGER)?
                .insert(LEDGER_KEY, value.as_slice())?;
        }
        {
            let mut audit = tx.open_table(AUDIT)?;
            for entry in entries {
                let last = last_record(&audit, &entry.job)?;
                let record = AuditRecord::next(last.as_ref(), entry.clone())?;
                let key = audit_key(&record.entry.job, record.entry.seq);
                let value = codec::encode(&record)?;
                if audit.insert(key.as_slice(), value.as_slice())?.is_some() {
                    anyhow::bail!(
                        "audit entry {} of job {} exists already; entries are never rewritten",
                        record.entry.seq,
                        record.entry.job
                    );
                }
            }
            let mut table = tx.open_table(JOBS)?;
            for job in jobs {
                let head = last_record(&audit, &job.spec.job)?.map(|r| r.head());
                if let Some(head) = head {
                    heads.push((job.spec.job, head));
                }
                let job = StoredJob {
                    audit: head,
                    ..job.clone()
                };
                let value = serde_json::to_vec(&job)?;
                table.insert(job.spec.job.0.as_slice(), value.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(heads)
    }

    /// Commits `batch` ([`JobStore::commit_with`]).
    pub fn commit_batch(&self, batch: &Batch) -> anyhow::Result<Vec<(JobId, AuditHead)>> {
        self.commit_with(&batch.jobs, &batch.entries, batch.ledger.as_ref())
    }

    /// The verification ledger kept, if any.
    pub fn ledger(&self) -> anyhow::Result<Option<LedgerState>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(LEDGER)?;
        let Some(value) = table.get(LEDGER_KEY)? else {
            return Ok(None);
        };
        let state = serde_json::from_slice(value.value())
            .context("the verification ledger in the job database is unreadable")?;
        Ok(Some(state))
    }

    /// One job.
    pub fn get(&self, id: &JobId) -> anyhow::Result<Option<StoredJob>> {
        read_job(&self.db.begin_read()?, id)
    }

    /// The records of `job`'s audit log, in key order.
    pub fn audit(&self, job: &JobId) -> anyhow::Result<Vec<RawRecord>> {
        read_audit(&self.db.begin_read()?, job)
    }

    /// Every stored job; unreadable records are skipped with a warning.
    pub fn all(&self) -> anyhow::Result<Vec<StoredJob>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(JOBS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            match serde_json::from_slice::<StoredJob>(value.value()) {
                Ok(job) => out.push(job),
                Err(e) => {
                    tracing::warn!(key = %hex::encode(key.value()), %e, "unreadable job record")
                }
            }
        }
        Ok(out)
    }

    /// Applies `edit` to the stored bytes of the audit table: tests use it
    /// to tamper with a log as an intruder with the file would.
    #[cfg(test)]
    pub(crate) fn tamper_audit(
        &self,
        edit: impl FnOnce(&mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>),
    ) -> anyhow::Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(AUDIT)?;
            let mut all = std::collections::BTreeMap::new();
            for entry in table.iter()? {
                let (k, v) = entry?;
                all.insert(k.value().to_vec(), v.value().to_vec());
            }
            table.retain(|_, _| false)?;
            edit(&mut all);
            for (k, v) in &all {
                table.insert(k.as_slice(), v.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// An audit table entry as read: its key's sequence number and the record,
/// or why the record could not be decoded.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// The sequence number in the key.
    pub key_seq: u64,
    /// The decoded record.
    pub record: Result<AuditRecord, String>,
}

fn read_job(tx: &ReadTransaction, id: &JobId) -> anyhow::Result<Option<StoredJob>> {
    let table = tx.open_table(JOBS)?;
    Ok(match table.get(id.0.as_slice())? {
        Some(v) => Some(serde_json::from_slice(v.value())?),
        None => None,
    })
}

fn read_audit(tx: &ReadTransaction, job: &JobId) -> anyhow::Result<Vec<RawRecord>> {
    let table = match tx.open_table(AUDIT) {
        Ok(t) => t,
        // A database from before audit logs: no entries.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let (first, last) = (audit_key(job, 0), audit_key(job, u64::MAX));
    let mut out = Vec::new();
    for entry in table.range(first.as_slice()..=last.as_slice())? {
        let (key, value) = entry?;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&key.value()[16..]);
        out.push(RawRecord {
            key_seq: u64::from_be_bytes(seq),
            record: codec::decode::<AuditRecord>(value.value(), Limit::K4)
                .map_err(|e| format!("{:#}", anyhow::Error::new(e))),
        });
    }
    Ok(out)
}

/// Why a job database could not be opened for reading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReaderError {
    /// No database at the path.
    #[error("no job database at {path} (is this a coordinator's data directory?)")]
    Missing {
        /// Where it was looked for.
        path: std::path::PathBuf,
    },
    /// Another process (a running coordinator) holds it open for writing.
    #[error(
        "the job database {path} is in use: a coordinator is running from this data directory \
         and redb locks the file while it writes; stop the coordinator (`commons node leave`) \
         and run the audit again"
    )]
    InUse {
        /// The database.
        path: std::path::PathBuf,
    },
    /// It could not be opened.
    #[error("cannot open the job database {path}")]
    Open {
        /// The database.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
}

/// The job database opened for reading only, as `commons job audit` does.
#[derive(Debug)]
pub struct JobReader {
    db: ReaderDb,
    repaired: bool,
}

enum ReaderDb {
    ReadOnly(redb::ReadOnlyDatabase),
    Repaired(redb::Database),
}

impl std::fmt::Debug for ReaderDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ReadOnly(_) => "ReadOnly",
            Self::Repaired(_) => "Repaired",
        })
    }
}

impl JobReader {
    /// Opens the database at `path` read-only. A database left unclean by a
    /// crash cannot be read before redb repairs it: it is then opened for
    /// writing once, repaired as a restarting coordinator would, and only
    /// read ([`JobReader::repaired`] tells).
    pub fn open(path: &Path) -> Result<Self, ReaderError> {
        if !path.exists() {
            return Err(ReaderError::Missing {
                path: path.to_owned(),
            });
        }
        let classify = |source: redb::DatabaseError| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => ReaderError::InUse {
                path: path.to_owned(),
            },
            source => ReaderError::Open {
                path: path.to_owned(),
                source,
            },
        };
        match redb::ReadOnlyDatabase::open(path) {
            Ok(db) => Ok(Self {
                db: ReaderDb::ReadOnly(db),
                repaired: false,
            }),
            Err(redb::DatabaseError::RepairAborted) => redb::Database::open(path)
                .map(|db| Self {
                    db: ReaderDb::Repaired(db),
                    repaired: true,
                })
                .map_err(classify),
            Err(e) => Err(classify(e)),
        }
    }

    /// True when the database had to be repaired first (its writer crashed).
    #[must_use]
    pub fn repaired(&self) -> bool {
        self.repaired
    }

    fn begin_read(&self) -> anyhow::Result<ReadTransaction> {
        Ok(match &self.db {
            ReaderDb::ReadOnly(db) => db.begin_read()?,
            ReaderDb::Repaired(db) => db.begin_read()?,
        })
    }

    /// One job and its audit log, read in one snapshot.
    pub fn job_and_audit(&self, id: &JobId) -> anyhow::Result<Option<(StoredJob, Vec<RawRecord>)>> {
        let tx = self.begin_read()?;
        let Some(job) = read_job(&tx, id)? else {
            return Ok(None);
        };
        let records = read_audit(&tx, id)?;
        Ok(Some((job, records)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commons_protocol::ModelId;
    use commons_protocol::messages::SamplingParams;

    fn job(n: u8, state: &str, tokens: Vec<u32>) -> StoredJob {
        StoredJob {
            submitter: NodeId([n; 32]),
            spec: JobSpec {
                job: JobId([n; 16]),
                model: ModelId(commons_protocol::Hash([1; 32])),
                input: commons_protocol::messages::JobInput::user(format!("prompt {n}")),
                max_tokens: 64,
                sampling: SamplingParams {
                    temperature: 0.0,
                    top_k: 0,
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    seed: 5,
                },
                coalition: None,
            },
            tokens,
            state: state.into(),
            error: None,
            updated_at: 1,
            receipts: 0,
            transcript: None,
            segment: 0,
            audit: None,
        }
    }

    fn entry(job: u8, n: u8) -> AuditEntry {
        use commons_protocol::messages::{ExecMetrics, LayerRange, Receipt};
        AuditEntry {
            job: JobId([job; 16]),
            seq: 99,
            segment: 0,
            lane: crate::audit::Lane::Main,
            step: u64::from(n),
            layers: LayerRange { start: 0, end: 30 },
            recorded_at: commons_protocol::UnixMillis(u64::from(n)),
            receipt: Receipt {
                unit: commons_protocol::UnitId(Hash([n; 32])),
                commitment: Hash([n + 1; 32]),
                metrics: ExecMetrics::default(),
                executor: NodeId([7; 32]),
                signature: commons_protocol::Signature([n; 64]),
            },
        }
    }

    #[test]
    fn audit_entries_are_appended_in_order_chained_and_headed_in_the_job_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        {
            let store = JobStore::open(&path).unwrap();
            let (one, two) = (job(1, "running", vec![]), job(2, "running", vec![]));
            store
                .commit(std::slice::from_ref(&one), &[entry(1, 0), entry(1, 1)])
                .unwrap();
            store
                .commit(&[one.clone(), two.clone()], &[entry(2, 0), entry(1, 2)])
                .unwrap();
            // A record written without new entries keeps its head.
            store.put_all(&[one]).unwrap();
        }
        let reader = JobReader::open(&path).unwrap();
        assert!(!reader.repaired());
        let (one, records) = reader.job_and_audit(&JobId([1; 16])).unwrap().unwrap();
        let records: Vec<AuditRecord> = records
            .into_iter()
            .map(|r| {
                let record = r.record.unwrap();
                assert_eq!(r.key_seq, record.entry.seq);
                record
            })
            .collect();
        assert_eq!(
            records.iter().map(|r| r.entry.seq).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(
            records.iter().map(|r| r.entry.step).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        let mut previous = Hash([0; 32]);
        for r in &records {
            assert_eq!(
                r.chain,
                crate::audit::chain_value(&previous, &r.entry).unwrap()
            );
            previous = r.chain;
        }
        assert_eq!(one.audit, Some(records[2].head()));
        assert_eq!(one.audit.unwrap().entries, 3);
        let (two, records) = reader.job_and_audit(&JobId([2; 16])).unwrap().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(two.audit.unwrap().entries, 1);
        assert!(reader.job_and_audit(&JobId([3; 16])).unwrap().is_none());
    }

    #[test]
    fn a_database_from_before_audit_logs_reads_as_empty_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        {
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut table = tx.open_table(JOBS).unwrap();
                // A record as older versions wrote it: no transcript, no head.
                let old = serde_json::json!({
                    "submitter": NodeId([1; 32]),
                    "spec": job(1, "stop", vec![]).spec,
                    "tokens": [4, 5],
                    "state": "stop",
                    "error": null,
                    "updated_at": 3,
                });
                let value = serde_json::to_vec(&old).unwrap();
                table
                    .insert([1u8; 16].as_slice(), value.as_slice())
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        let reader = JobReader::open(&path).unwrap();
        let (old, records) = reader.job_and_audit(&JobId([1; 16])).unwrap().unwrap();
        assert!(records.is_empty());
        assert_eq!((old.transcript, old.audit, old.segment), (None, None, 0));
        drop(reader);
        // The coordinator opens it and adds the table.
        let store = JobStore::open(&path).unwrap();
        store.commit(&[old], &[entry(1, 0)]).unwrap();
        assert_eq!(store.audit(&JobId([1; 16])).unwrap().len(), 1);
    }

    #[test]
    fn jobs_survive_reopening_and_updates_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        {
            let store = JobStore::open(&path).unwrap();
            store
                .put_all(&[job(1, "running", vec![1, 2]), job(2, "stop", vec![3])])
                .unwrap();
            store.put_all(&[job(1, "running", vec![1, 2, 9])]).unwrap();
        }
        let store = JobStore::open(&path).unwrap();
        let mut all = store.all().unwrap();
        all.sort_by_key(|j| j.spec.job);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].tokens, vec![1, 2, 9]);
        assert!(all[0].is_unfinished() && !all[1].is_unfinished());
        assert_eq!(
            store.get(&JobId([2; 16])).unwrap(),
            Some(job(2, "stop", vec![3]))
        );
        assert_eq!(store.get(&JobId([7; 16])).unwrap(), None);
    }
}
