//! The coordinator's durable record of jobs, in an embedded database (redb).
//!
//! Every accepted job is written with its spec, its submitter and the tokens
//! generated so far, in the same transaction as any other change of the
//! same drain; a commit is durable before the coordinator answers about it.
//! After a crash and restart, every job not finished is resumed from its
//! tokens (the scheduler replays them through a new chain) or reported
//! failed with its reason; none is silently lost.

use std::path::Path;

use anyhow::Context as _;
use commons_protocol::messages::JobSpec;
use commons_protocol::{JobId, NodeId};
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

const JOBS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("jobs");

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

impl JobStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let db = redb::Database::create(path)
            .with_context(|| format!("cannot open the job database {}", path.display()))?;
        let tx = db.begin_write()?;
        tx.open_table(JOBS)?;
        tx.commit()?;
        Ok(Self { db })
    }

    /// Writes `jobs` in one durable transaction.
    pub fn put_all(&self, jobs: &[StoredJob]) -> anyhow::Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(JOBS)?;
            for job in jobs {
                let value = serde_json::to_vec(job)?;
                table.insert(job.spec.job.0.as_slice(), value.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// One job.
    pub fn get(&self, id: &JobId) -> anyhow::Result<Option<StoredJob>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(JOBS)?;
        Ok(match table.get(id.0.as_slice())? {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
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
        }
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
