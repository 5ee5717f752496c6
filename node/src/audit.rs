//! The coordinator's audit log of receipts, and `commons job audit`.
//!
//! Every result the coordinator takes into a job is logged: its [`Receipt`]
//! (unit, commitment, metrics, executor, the executor's signature over the
//! three), the job, the step, the hop's layers and the lane, in an
//! append-only log per job kept in the job database
//! ([`crate::jobstore`]). Each entry stores a chain value: blake3 (keyed by
//! the domain `commons audit chain v1`) over the previous entry's chain value
//! (zero for the first) and the entry's canonical bytes, so that a modified,
//! dropped or reordered entry breaks the chain; the job's record keeps the
//! log's length and last chain value ([`AuditHead`]), so that a dropped last
//! entry is found too.
//!
//! Lanes name why a unit ran: [`Lane::Main`] is the job itself, whose results
//! the scheduler chains into the job's transcript; re-executions by spot
//! checks ([`Lane::Check`]) and referees ([`Lane::Referee`]) are logged too
//! and stay out of the transcript.
//!
//! `commons job audit ID` reads a stopped coordinator's database, checks
//! every receipt's signature, the chain and its head, recomputes the
//! transcript from the main-lane entries and compares it with the job's,
//! and exports the entries as JSON lines ([`check`], [`entry_json`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use commons_protocol::codec::{self, EncodeError};
use commons_protocol::envelope::Envelope;
use commons_protocol::keys::VerifyError;
use commons_protocol::messages::{AuditAnchor, JobReport, LayerRange, Receipt};
use commons_protocol::{Hash, JobId, NodeId, UnitId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::jobstore::{JobReader, RawRecord, StoredJob};
use crate::settings::Settings;

/// Domain of the chain over a job's audit entries.
const CHAIN_DOMAIN: &str = "commons audit chain v1";

/// The transcript after `previous` once `commitment` is taken: the
/// scheduler's own function.
pub use commons_coordinator::job::transcript_next;

/// Why a unit ran. New lanes are added at the end: the canonical encoding
/// names a lane by its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Lane {
    /// A step of the job itself: chained into its transcript.
    Main,
    /// A spot check re-executing a step on another node.
    Check,
    /// A third execution deciding a dispute between two.
    Referee,
}

impl Lane {
    /// The lane's name in exports: `main`, `check`, `referee`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Check => "check",
            Self::Referee => "referee",
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One logged result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// The job.
    pub job: JobId,
    /// Its place in the job's log, from 0 (assigned when appended).
    pub seq: u64,
    /// The run of the job it belongs to ([`StoredJob::segment`]).
    pub segment: u32,
    /// Why the unit ran.
    pub lane: Lane,
    /// The step of the hop's session.
    pub step: u64,
    /// The hop's layers.
    pub layers: LayerRange,
    /// When the coordinator took the result.
    pub recorded_at: UnixMillis,
    /// What the executor signed.
    pub receipt: Receipt,
}

/// An entry as stored: the entry and its chain value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The entry.
    pub entry: AuditEntry,
    /// blake3 over the previous record's chain value and this entry's
    /// canonical bytes.
    pub chain: Hash,
}

/// The end of a job's log: how many entries, and the last chain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// Entries in the log.
    pub entries: u64,
    /// The last entry's chain value.
    pub head: Hash,
}

/// The chain value of `entry` after `previous` (zero for the first entry).
pub fn chain_value(previous: &Hash, entry: &AuditEntry) -> Result<Hash, EncodeError> {
    Ok(Hash::of_parts(
        CHAIN_DOMAIN,
        &[&previous.0, &codec::encode(entry)?],
    ))
}

impl AuditRecord {
    /// The record that follows `last` (`None`: the first of its log) for
    /// `entry`, whose `seq` it sets.
    pub fn next(last: Option<&AuditRecord>, mut entry: AuditEntry) -> Result<Self, EncodeError> {
        entry.seq = last.map_or(0, |r| r.entry.seq + 1);
        let previous = last.map_or(Hash([0; 32]), |r| r.chain);
        let chain = chain_value(&previous, &entry)?;
        Ok(Self { entry, chain })
    }

    /// The log's head when this record is its last.
    #[must_use]
    pub fn head(&self) -> AuditHead {
        AuditHead {
            entries: self.entry.seq + 1,
            head: self.chain,
        }
    }
}

/// Something an audit found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditProblem {
    /// A stored entry could not be decoded.
    #[error("entry {seq} is unreadable: {reason}")]
    Unreadable {
        /// Its key's sequence number.
        seq: u64,
        /// The decoding error.
        reason: String,
    },
    /// An entry is not where its sequence number says: an entry before it
    /// was dropped, or entries were reordered.
    #[error("entry {seq} (key {key_seq}) is at position {position} of the log")]
    OutOfPlace {
        /// Where it was found.
        position: u64,
        /// Its sequence number.
        seq: u64,
        /// Its key's sequence number.
        key_seq: u64,
    },
    /// An entry names another job.
    #[error("entry {seq} belongs to job {other}")]
    WrongJob {
        /// The entry.
        seq: u64,
        /// The job it names.
        other: JobId,
    },
    /// A receipt's signature does not verify.
    #[error("entry {seq}: the receipt of unit {unit} by {executor} is not validly signed")]
    BadSignature {
        /// The entry.
        seq: u64,
        /// Its unit.
        unit: UnitId,
        /// The executor it names.
        executor: NodeId,
        /// Why.
        #[source]
        source: VerifyError,
    },
    /// An entry's chain value does not follow from the entry before and its
    /// own bytes: it was modified, or one before it dropped or moved.
    #[error("entry {seq}: the hash chain is broken (stored {stored}, recomputed {recomputed})")]
    ChainBroken {
        /// The entry.
        seq: u64,
        /// Its stored chain value.
        stored: Hash,
        /// The value from the entry before and its bytes.
        recomputed: Hash,
    },
    /// An entry belongs to a later run of the job than its record.
    #[error("entry {seq} is from run {segment}, after the job record's run {recorded}")]
    LaterRun {
        /// The entry.
        seq: u64,
        /// Its run.
        segment: u32,
        /// The record's run.
        recorded: u32,
    },
    /// The log does not end where the job record says.
    #[error(
        "the log ends after {found_entries} entries at {found_head}, but the job record says \
         {recorded_entries} entries ending at {recorded_head}"
    )]
    HeadMismatch {
        /// Entries the record counts.
        recorded_entries: u64,
        /// The record's last chain value (zero: none).
        recorded_head: Hash,
        /// Entries found.
        found_entries: u64,
        /// The last chain value found (zero: none).
        found_head: Hash,
    },
    /// The transcript recomputed from the main-lane receipts differs from
    /// the job's.
    #[error(
        "the transcript of {counted} main-lane receipts is {recomputed}, but the job's is \
         {recorded} over {recorded_receipts} receipts"
    )]
    TranscriptMismatch {
        /// Recomputed from the log.
        recomputed: Hash,
        /// Main-lane entries of the job's current run.
        counted: u32,
        /// The job record's.
        recorded: Hash,
        /// The job record's count.
        recorded_receipts: u32,
    },
    /// The job record predates transcripts: nothing to compare with.
    #[error("the job record carries no transcript (written by an older version)")]
    NoTranscript,
    /// The log does not pass through the head a signed report gave: it was
    /// rewritten (or cut short) after that report.
    #[error(
        "the signed report anchors the log at {entries} entries ending at {head}, but the log \
         {found}"
    )]
    AnchorMissed {
        /// Entries the report counted.
        entries: u64,
        /// The chain value it gave.
        head: Hash,
        /// What the log has there, for people.
        found: String,
    },
}

/// An entry with what the audit found of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedEntry {
    /// The stored record.
    pub record: AuditRecord,
    /// The receipt's signature verifies.
    pub signature_ok: bool,
    /// The chain value follows from the entry before and the entry's bytes.
    pub chain_ok: bool,
    /// It sits where its sequence number says, in its own job's log.
    pub in_place: bool,
}

impl CheckedEntry {
    /// Every check passed.
    #[must_use]
    pub fn verified(&self) -> bool {
        self.signature_ok && self.chain_ok && self.in_place
    }
}

/// What an audit of one job found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// The readable entries, in log order.
    pub entries: Vec<CheckedEntry>,
    /// Everything wrong; empty when the audit passed.
    pub problems: Vec<AuditProblem>,
    /// The transcript recomputed from the main-lane entries of the job's
    /// current run.
    pub transcript: Hash,
    /// Main-lane entries of the job's current run.
    pub main_receipts: u32,
}

impl AuditReport {
    /// True when nothing is wrong.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Audits `job`'s log, `records` in key order: every receipt's signature,
/// the chain, its head against the job record, and the transcript of the
/// main-lane entries of the job's current run against the job's.
#[must_use]
pub fn check(job: &StoredJob, records: Vec<RawRecord>) -> AuditReport {
    let id = job.spec.job;
    let mut problems = Vec::new();
    let mut entries = Vec::with_capacity(records.len());
    let mut previous = Hash([0; 32]);
    let mut transcript = Hash([0; 32]);
    let mut main_receipts = 0u32;
    for (position, raw) in (0u64..).zip(records) {
        let record = match raw.record {
            Ok(r) => r,
            Err(reason) => {
                problems.push(AuditProblem::Unreadable {
                    seq: raw.key_seq,
                    reason,
                });
                continue;
            }
        };
        let e = &record.entry;
        let in_place = e.seq == position && e.seq == raw.key_seq && e.job == id;
        if e.job != id {
            problems.push(AuditProblem::WrongJob {
                seq: e.seq,
                other: e.job,
            });
        } else if !in_place {
            problems.push(AuditProblem::OutOfPlace {
                position,
                seq: e.seq,
                key_seq: raw.key_seq,
            });
        }
        let signature_ok = match e.receipt.verify() {
            Ok(()) => true,
            Err(source) => {
                problems.push(AuditProblem::BadSignature {
                    seq: e.seq,
                    unit: e.receipt.unit,
                    executor: e.receipt.executor,
                    source,
                });
                false
            }
        };
        // An entry that cannot be encoded cannot have been chained.
        let recomputed = chain_value(&previous, e).unwrap_or(Hash([0; 32]));
        let chain_ok = recomputed == record.chain;
        if !chain_ok {
            problems.push(AuditProblem::ChainBroken {
                seq: e.seq,
                stored: record.chain,
                recomputed,
            });
        }
        // Go on from the stored value, so that one altered entry is reported
        // once rather than breaking every entry after it.
        previous = record.chain;
        if e.segment > job.segment {
            problems.push(AuditProblem::LaterRun {
                seq: e.seq,
                segment: e.segment,
                recorded: job.segment,
            });
        }
        if e.lane == Lane::Main && e.segment == job.segment {
            transcript = transcript_next(&transcript, &e.receipt.commitment);
            main_receipts += 1;
        }
        entries.push(CheckedEntry {
            record,
            signature_ok,
            chain_ok,
            in_place,
        });
    }
    let found = entries.last().map(|c| AuditHead {
        entries: c.record.entry.seq + 1,
        head: c.record.chain,
    });
    if found != job.audit {
        let zero = AuditHead {
            entries: 0,
            head: Hash([0; 32]),
        };
        let (recorded, found) = (job.audit.unwrap_or(zero), found.unwrap_or(zero));
        problems.push(AuditProblem::HeadMismatch {
            recorded_entries: recorded.entries,
            recorded_head: recorded.head,
            found_entries: found.entries,
            found_head: found.head,
        });
    }
    match job.transcript {
        None => problems.push(AuditProblem::NoTranscript),
        Some(recorded) if recorded != transcript || job.receipts != main_receipts => {
            problems.push(AuditProblem::TranscriptMismatch {
                recomputed: transcript,
                counted: main_receipts,
                recorded,
                recorded_receipts: job.receipts,
            });
        }
        Some(_) => {}
    }
    AuditReport {
        entries,
        problems,
        transcript,
        main_receipts,
    }
}

/// Holds `report`'s log to a signed job report's anchor: the entry the
/// anchor ends at must be there, chained as recorded, with the anchor's
/// value. A log rewritten consistently after the report (chains recomputed,
/// the job record's head updated) passes [`check`] but fails here.
pub fn check_anchor(report: &mut AuditReport, anchor: &AuditAnchor) {
    if anchor.entries == 0 {
        return;
    }
    let at = report
        .entries
        .iter()
        .find(|c| c.record.entry.seq == anchor.entries - 1);
    let found = match at {
        None => format!("has no entry {}", anchor.entries - 1),
        Some(c) if c.record.chain != anchor.head => {
            format!("reaches {} there", c.record.chain)
        }
        Some(c) if !c.chain_ok || !c.in_place => {
            format!("is broken at or before entry {}", c.record.entry.seq)
        }
        Some(_) => return,
    };
    report.problems.push(AuditProblem::AnchorMissed {
        entries: anchor.entries,
        head: anchor.head,
        found,
    });
}

/// One exported JSON line.
#[must_use]
pub fn entry_json(c: &CheckedEntry) -> serde_json::Value {
    let e = &c.record.entry;
    let r = &e.receipt;
    serde_json::json!({
        "job": e.job.to_string(),
        "seq": e.seq,
        "segment": e.segment,
        "lane": e.lane.name(),
        "step": e.step,
        "layers": e.layers.to_string(),
        "recorded_at": e.recorded_at.0,
        "unit": r.unit.to_string(),
        "commitment": r.commitment.to_string(),
        "metrics": {
            "queue_micros": r.metrics.queue_micros,
            "compute_micros": r.metrics.compute_micros,
            "tokens": r.metrics.tokens,
            "peak_memory_bytes": r.metrics.peak_memory_bytes,
        },
        "executor": r.executor.to_string(),
        "signature": hex::encode(r.signature.0),
        "chain": c.record.chain.to_string(),
        "signature_ok": c.signature_ok,
        "chain_ok": c.chain_ok,
        "in_place": c.in_place,
        "verified": c.verified(),
    })
}

/// Arguments of `commons job audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The job id.
    pub job: JobId,
    /// Write the entries as JSON lines to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// A signed report of the job (`commons job submit --save-report`): the
    /// log must pass through the head it anchors.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// The audit anchor of the signed report in `path`, which must be this data
/// directory's coordinator's report on `job`.
fn read_anchor(
    settings: &Settings,
    path: &Path,
    job: &JobId,
) -> anyhow::Result<Option<AuditAnchor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let envelope = Envelope::from_bytes(&bytes)
        .and_then(|e| e.open_archived::<JobReport>().map(|r| (e.signer(), r)))
        .with_context(|| format!("{} is not a signed job report", path.display()))?;
    let (signer, report) = envelope;
    if report.job != *job {
        anyhow::bail!(
            "{} reports on job {}, not {job}",
            path.display(),
            report.job
        );
    }
    let me = crate::identity::load(&settings.key)
        .with_context(|| "cannot load this data directory's node key")?
        .node_id();
    if signer != me {
        anyhow::bail!(
            "{} is signed by {signer}, but this data directory's coordinator is {me}",
            path.display()
        );
    }
    Ok(report.audit)
}

/// `commons job audit`: offline, on the coordinator's data directory
/// (`--data-dir`). The coordinator must be stopped: redb keeps the database
/// locked while it writes.
pub fn run(settings: &Settings, args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let path = settings.data_dir.join("jobs.redb");
    let reader = JobReader::open(&path)?;
    if reader.repaired() {
        eprintln!(
            "note: {} was not closed cleanly (the coordinator stopped abruptly); it was repaired \
             before reading, as a restarting coordinator would",
            path.display()
        );
    }
    let (job, records) = reader
        .job_and_audit(&args.job)
        .with_context(|| format!("cannot read {}", path.display()))?
        .with_context(|| format!("no job {} in {}", args.job, path.display()))?;
    let mut report = check(&job, records);
    if let Some(path) = &args.report {
        match read_anchor(settings, path, &args.job)? {
            Some(anchor) => {
                check_anchor(&mut report, &anchor);
                eprintln!(
                    "signed report: anchors {} entries ending at {}",
                    anchor.entries, anchor.head
                );
            }
            None => eprintln!("signed report: it anchors no log (nothing was logged yet)"),
        }
    }
    write_lines(&report, args.out.as_ref())?;
    print_summary(&job, &report);
    if report.passed() {
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::bail!(
        "the audit of job {} failed: {}",
        job.spec.job,
        report
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    )
}

fn write_lines(report: &AuditReport, out: Option<&PathBuf>) -> anyhow::Result<()> {
    let mut text = String::new();
    for c in &report.entries {
        text.push_str(&entry_json(c).to_string());
        text.push('\n');
    }
    match out {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .context("cannot write to stdout")?;
        }
    }
    Ok(())
}

fn print_summary(job: &StoredJob, report: &AuditReport) {
    let mut lanes = std::collections::BTreeMap::<Lane, usize>::new();
    let mut executors = std::collections::BTreeSet::new();
    for c in &report.entries {
        *lanes.entry(c.record.entry.lane).or_default() += 1;
        executors.insert(c.record.entry.receipt.executor);
    }
    let verified = report.entries.iter().filter(|c| c.verified()).count();
    eprintln!("job {} ({}, run {})", job.spec.job, job.state, job.segment);
    eprintln!(
        "  entries: {} ({}), {} verified, from {} executors",
        report.entries.len(),
        lanes
            .iter()
            .map(|(lane, n)| format!("{n} {lane}"))
            .collect::<Vec<_>>()
            .join(", "),
        verified,
        executors.len()
    );
    if let Some(head) = job.audit {
        eprintln!("  chain head: {} after {} entries", head.head, head.entries);
    }
    eprintln!(
        "  transcript: {} over {} main-lane receipts (job record: {} over {})",
        report.transcript,
        report.main_receipts,
        job.transcript
            .map_or_else(|| "none".to_owned(), |t| t.to_string()),
        job.receipts
    );
    if job.is_unfinished() {
        eprintln!("  note: the job was unfinished when last recorded");
    }
    if report.passed() {
        eprintln!("  audit passed");
    } else {
        for p in &report.problems {
            eprintln!("  FAILED: {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commons_protocol::messages::{ExecMetrics, JobInput, JobSpec, SamplingParams, WorkResult};
    use commons_protocol::{Identity, ModelId, Tensor};

    use crate::jobstore::JobStore;

    const JOB: JobId = JobId([5; 16]);

    fn entry(n: u64, lane: Lane, segment: u32) -> AuditEntry {
        let executor = Identity::from_secret([n as u8 % 3 + 1; 32]);
        let unit = UnitId(Hash::of(&n.to_le_bytes()));
        let output = Tensor::from_u32(&[1], &[n as u32]).unwrap();
        let result = WorkResult::sign(
            &executor,
            unit,
            vec![output],
            ExecMetrics {
                queue_micros: n,
                compute_micros: 100 + n,
                tokens: 1,
                peak_memory_bytes: 0,
            },
            UnixMillis(1),
            UnixMillis(2),
        )
        .unwrap();
        AuditEntry {
            job: JOB,
            seq: 0,
            segment,
            lane,
            step: n / 2,
            layers: LayerRange {
                start: (n % 2) as u32 * 15,
                end: (n % 2) as u32 * 15 + 15,
            },
            recorded_at: UnixMillis(10 + n),
            receipt: result.receipt(),
        }
    }

    fn job_record() -> StoredJob {
        StoredJob {
            submitter: Identity::from_secret([9; 32]).node_id(),
            spec: JobSpec {
                job: JOB,
                model: ModelId(Hash([1; 32])),
                input: JobInput::Text("hi".into()),
                max_tokens: 8,
                sampling: SamplingParams {
                    temperature: 0.0,
                    top_k: 0,
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    seed: 1,
                },
                coalition: None,
            },
            tokens: vec![1, 2],
            state: "length".into(),
            error: None,
            updated_at: 1,
            receipts: 0,
            transcript: None,
            segment: 0,
            audit: None,
        }
    }

    /// A log of six main-lane entries and one check-lane entry, with the job
    /// record that goes with it, as the coordinator writes them.
    fn log() -> (StoredJob, Vec<RawRecord>) {
        let mut records: Vec<AuditRecord> = Vec::new();
        let mut transcript = Hash([0; 32]);
        let mut receipts = 0;
        for n in 0..7 {
            let lane = if n == 3 { Lane::Check } else { Lane::Main };
            let e = entry(n, lane, 0);
            if lane == Lane::Main {
                transcript = transcript_next(&transcript, &e.receipt.commitment);
                receipts += 1;
            }
            let r = AuditRecord::next(records.last(), e).unwrap();
            records.push(r);
        }
        let job = StoredJob {
            receipts,
            transcript: Some(transcript),
            audit: records.last().map(AuditRecord::head),
            ..job_record()
        };
        (job, raw(records))
    }

    fn raw(records: Vec<AuditRecord>) -> Vec<RawRecord> {
        records
            .into_iter()
            .map(|r| RawRecord {
                key_seq: r.entry.seq,
                record: Ok(r),
            })
            .collect()
    }

    fn unverified(report: &AuditReport) -> Vec<u64> {
        report
            .entries
            .iter()
            .filter(|c| !c.verified())
            .map(|c| c.record.entry.seq)
            .collect()
    }

    #[test]
    fn an_intact_log_passes_and_only_the_main_lane_makes_the_transcript() {
        let (job, records) = log();
        let report = check(&job, records);
        assert!(report.passed(), "{:?}", report.problems);
        assert_eq!(report.entries.len(), 7);
        assert_eq!(report.main_receipts, 6);
        assert_eq!(Some(report.transcript), job.transcript);
        assert!(unverified(&report).is_empty());
        let line = entry_json(&report.entries[3]);
        assert_eq!(line["lane"], "check");
        assert_eq!(line["seq"], 3);
        assert_eq!(line["verified"], true);
        assert_eq!(line["layers"], "15..30");
    }

    #[test]
    fn a_consistent_rewrite_passes_the_chain_but_not_a_signed_anchor() {
        let (job, records) = log();
        let mut records: Vec<AuditRecord> =
            records.into_iter().map(|r| r.record.unwrap()).collect();
        let anchor = AuditAnchor {
            entries: 5,
            head: records[4].chain,
        };
        let mut report = check(&job, raw(records.clone()));
        check_anchor(&mut report, &anchor);
        assert!(report.passed(), "{:?}", report.problems);

        // Whoever can write the database changes entry 2's layers (not
        // signed by its executor) and recomputes every chain value after it.
        records[2].entry.layers.end += 1;
        let mut previous = records[1].chain;
        for r in &mut records[2..] {
            r.chain = chain_value(&previous, &r.entry).unwrap();
            previous = r.chain;
        }
        let job = StoredJob {
            audit: records.last().map(AuditRecord::head),
            ..job
        };
        let mut report = check(&job, raw(records.clone()));
        assert!(report.passed(), "a consistent rewrite passes on its own");
        check_anchor(&mut report, &anchor);
        assert!(
            matches!(
                report.problems.as_slice(),
                [AuditProblem::AnchorMissed { entries: 5, .. }]
            ),
            "{:?}",
            report.problems
        );
        // Cut short before the anchor: missed too.
        let mut report = check(
            &StoredJob {
                audit: records[2].head().into(),
                ..job
            },
            raw(records[..3].to_vec()),
        );
        check_anchor(&mut report, &anchor);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.to_string().contains("has no entry 4"))
        );
    }

    #[test]
    fn the_chain_links_each_entry_to_the_one_before() {
        let (_, records) = log();
        let records: Vec<AuditRecord> = records.into_iter().map(|r| r.record.unwrap()).collect();
        let mut previous = Hash([0; 32]);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.entry.seq, i as u64);
            assert_eq!(r.chain, chain_value(&previous, &r.entry).unwrap());
            previous = r.chain;
        }
        // The same entry after another history chains differently.
        let e = records[1].entry.clone();
        assert_ne!(chain_value(&Hash([1; 32]), &e).unwrap(), records[1].chain);
    }

    #[test]
    fn a_modified_entry_is_found() {
        // Metrics changed: the signature and the chain fail, at that entry only.
        let (job, mut records) = log();
        if let Ok(r) = &mut records[2].record {
            r.entry.receipt.metrics.compute_micros += 1;
        }
        let report = check(&job, records);
        assert_eq!(unverified(&report), vec![2]);
        assert!(report.problems.iter().any(
            |p| matches!(p, AuditProblem::BadSignature { seq: 2, source, .. } if *source == VerifyError::BadSignature)
        ));
        assert!(
            report
                .problems
                .iter()
                .any(|p| matches!(p, AuditProblem::ChainBroken { seq: 2, .. }))
        );
        // Layers changed (not signed by the executor): the chain finds it.
        let (job, mut records) = log();
        if let Ok(r) = &mut records[4].record {
            r.entry.layers.end += 1;
        }
        let report = check(&job, records);
        assert_eq!(unverified(&report), vec![4]);
        assert!(matches!(
            report.problems.as_slice(),
            [AuditProblem::ChainBroken { seq: 4, .. }]
        ));
        // A lane changed from check to main: the chain and the transcript.
        let (job, mut records) = log();
        if let Ok(r) = &mut records[3].record {
            r.entry.lane = Lane::Main;
        }
        let report = check(&job, records);
        assert!(!report.passed());
        assert!(
            report
                .problems
                .iter()
                .any(|p| matches!(p, AuditProblem::TranscriptMismatch { counted: 7, .. }))
        );
    }

    #[test]
    fn a_dropped_entry_is_found() {
        // In the middle.
        let (job, mut records) = log();
        records.remove(2);
        let report = check(&job, records);
        assert!(report.problems.iter().any(|p| matches!(
            p,
            AuditProblem::OutOfPlace {
                position: 2,
                seq: 3,
                ..
            }
        )));
        assert!(
            report
                .problems
                .iter()
                .any(|p| matches!(p, AuditProblem::ChainBroken { seq: 3, .. }))
        );
        assert!(
            report
                .problems
                .iter()
                .any(|p| matches!(p, AuditProblem::TranscriptMismatch { .. }))
        );
        // The last: the chain that is left holds, but not its head.
        let (job, mut records) = log();
        records.pop();
        let report = check(&job, records);
        assert!(unverified(&report).is_empty());
        assert!(report.problems.iter().any(|p| matches!(
            p,
            AuditProblem::HeadMismatch {
                recorded_entries: 7,
                found_entries: 6,
                ..
            }
        )));
    }

    #[test]
    fn reordered_entries_are_found() {
        // Entries 1 and 4 swapped under their keys.
        let (job, mut records) = log();
        records.swap(1, 4);
        for (i, r) in records.iter_mut().enumerate() {
            r.key_seq = i as u64;
        }
        let report = check(&job, records);
        // Each moved entry, and each entry after a moved one (its chain no
        // longer follows); entry 3 follows entry 2 as before.
        assert_eq!(unverified(&report), vec![4, 2, 1, 5]);
        assert!(report.problems.iter().any(|p| matches!(
            p,
            AuditProblem::OutOfPlace {
                position: 1,
                seq: 4,
                ..
            }
        )));
        assert!(
            report
                .problems
                .iter()
                .any(|p| matches!(p, AuditProblem::TranscriptMismatch { .. }))
        );
    }

    #[test]
    fn a_restarted_job_compares_the_transcript_of_its_last_run() {
        let mut records: Vec<AuditRecord> = Vec::new();
        let mut transcript = Hash([0; 32]);
        for n in 0..5 {
            let segment = u32::from(n >= 2);
            let e = entry(n, Lane::Main, segment);
            if segment == 1 {
                transcript = transcript_next(&transcript, &e.receipt.commitment);
            }
            records.push(AuditRecord::next(records.last(), e).unwrap());
        }
        let job = StoredJob {
            receipts: 3,
            transcript: Some(transcript),
            segment: 1,
            audit: records.last().map(AuditRecord::head),
            ..job_record()
        };
        let report = check(&job, raw(records.clone()));
        assert!(report.passed(), "{:?}", report.problems);
        assert_eq!(report.entries.len(), 5);
        assert_eq!(report.main_receipts, 3);
        // An entry of a run the record does not know.
        let late = entry(9, Lane::Main, 2);
        records.push(AuditRecord::next(records.last(), late).unwrap());
        let job = StoredJob {
            audit: records.last().map(AuditRecord::head),
            ..job
        };
        let report = check(&job, raw(records));
        assert!(matches!(
            report.problems.as_slice(),
            [AuditProblem::LaterRun {
                seq: 5,
                segment: 2,
                recorded: 1
            }]
        ));
    }

    #[test]
    fn a_job_record_without_a_transcript_fails() {
        let report = check(&job_record(), Vec::new());
        assert_eq!(report.problems, vec![AuditProblem::NoTranscript]);
    }

    fn settings(dir: &std::path::Path) -> Settings {
        Settings {
            data_dir: dir.to_owned(),
            key: dir.join("node.key"),
            log: "warn".into(),
            config_file: None,
        }
    }

    /// A coordinator's database holding the job of [`log`], written through
    /// the store as the coordinator writes it.
    fn database(dir: &std::path::Path) -> (StoredJob, JobStore) {
        let store = JobStore::open(&dir.join("jobs.redb")).unwrap();
        let (job, records) = log();
        let entries: Vec<AuditEntry> = records
            .into_iter()
            .map(|r| r.record.unwrap().entry)
            .collect();
        store
            .commit(std::slice::from_ref(&job), &entries[..4])
            .unwrap();
        store
            .commit(std::slice::from_ref(&job), &entries[4..])
            .unwrap();
        (job, store)
    }

    fn read_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn the_command_exports_a_verified_log() {
        let dir = tempfile::tempdir().unwrap();
        let (job, store) = database(dir.path());
        assert_eq!(store.get(&JOB).unwrap().unwrap().audit, job.audit);
        drop(store);
        let out = dir.path().join("audit.jsonl");
        let args = AuditArgs {
            job: JOB,
            out: Some(out.clone()),
            report: None,
        };
        assert_eq!(
            run(&settings(dir.path()), &args).unwrap(),
            ExitCode::SUCCESS
        );
        let lines = read_lines(&out);
        assert_eq!(lines.len(), 7);
        assert!(lines.iter().all(|l| l["verified"] == true), "{lines:?}");
        assert_eq!(lines[0]["job"], JOB.to_string());
    }

    /// A report on `job`, anchored at `anchor`, sealed by `by`.
    fn signed_report(by: &Identity, job: JobId, anchor: AuditAnchor) -> Vec<u8> {
        let report = JobReport {
            coordinator: by.node_id(),
            job,
            model: ModelId(Hash::of(b"model")),
            state: commons_protocol::messages::JobState::Length,
            prompt_tokens: 3,
            from_token: 0,
            tokens: Default::default(),
            total_tokens: 6,
            text: String::new(),
            route: Default::default(),
            failovers: 0,
            receipts: 6,
            transcript: Hash([0; 32]),
            verified: 0,
            check_units: 0,
            revisions: 0,
            prefill_ms: 0,
            decode_ms: 0,
            audit: Some(anchor),
            issued_at: UnixMillis(1_000),
            expires_at: UnixMillis(2_000),
        };
        Envelope::seal(by, &report).unwrap().to_bytes()
    }

    #[test]
    fn the_command_holds_the_log_to_a_signed_report() {
        let dir = tempfile::tempdir().unwrap();
        let (job, store) = database(dir.path());
        drop(store);
        let settings = settings(dir.path());
        let (me, _) = crate::identity::load_or_create(&settings.key).unwrap();
        let head = job.audit.unwrap();
        let anchor = AuditAnchor {
            entries: head.entries,
            head: head.head,
        };
        let path = dir.path().join("report.bin");
        let args = |report: &Path| AuditArgs {
            job: JOB,
            out: Some(dir.path().join("audit.jsonl")),
            report: Some(report.to_owned()),
        };
        // Long expired, still evidence.
        std::fs::write(&path, signed_report(&me, JOB, anchor)).unwrap();
        assert_eq!(run(&settings, &args(&path)).unwrap(), ExitCode::SUCCESS);

        // An anchor the log does not reach: the audit fails and says why.
        let other = AuditAnchor {
            entries: 3,
            head: Hash([9; 32]),
        };
        std::fs::write(&path, signed_report(&me, JOB, other)).unwrap();
        let e = run(&settings, &args(&path)).unwrap_err();
        assert!(
            format!("{e:#}").contains("anchors the log at 3 entries"),
            "{e:#}"
        );

        // Another job's report, or another coordinator's: refused.
        std::fs::write(&path, signed_report(&me, JobId([6; 16]), anchor)).unwrap();
        let e = run(&settings, &args(&path)).unwrap_err();
        assert!(format!("{e:#}").contains("not 05050505"), "{e:#}");
        let stranger = Identity::from_secret([44; 32]);
        std::fs::write(&path, signed_report(&stranger, JOB, anchor)).unwrap();
        let e = run(&settings, &args(&path)).unwrap_err();
        assert!(
            format!("{e:#}").contains("this data directory's coordinator"),
            "{e:#}"
        );
        std::fs::write(&path, b"garbage").unwrap();
        let e = run(&settings, &args(&path)).unwrap_err();
        assert!(
            format!("{e:#}").contains("is not a signed job report"),
            "{e:#}"
        );
    }

    #[test]
    fn the_command_fails_clearly_on_a_tampered_log() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = database(dir.path());
        // A signature byte flipped in the stored entry 5.
        store
            .tamper_audit(|all| {
                let (_, value) = all.iter_mut().nth(5).unwrap();
                let mut r: AuditRecord =
                    codec::decode(value, commons_protocol::codec::Limit::K4).unwrap();
                r.entry.receipt.signature.0[0] ^= 1;
                *value = codec::encode(&r).unwrap();
            })
            .unwrap();
        drop(store);
        let out = dir.path().join("audit.jsonl");
        let args = AuditArgs {
            job: JOB,
            out: Some(out.clone()),
            report: None,
        };
        let err = run(&settings(dir.path()), &args).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains(&format!("the audit of job {JOB} failed"))
                && message.contains("entry 5")
                && message.contains("not validly signed"),
            "{message}"
        );
        let lines = read_lines(&out);
        assert_eq!(lines.len(), 7);
        let bad: Vec<_> = lines.iter().filter(|l| l["verified"] == false).collect();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0]["seq"], 5);
        assert_eq!(bad[0]["signature_ok"], false);

        // An entry dropped from the database.
        let store = JobStore::open(&dir.path().join("jobs.redb")).unwrap();
        store
            .tamper_audit(|all| {
                let key = all.keys().nth(1).unwrap().clone();
                all.remove(&key);
            })
            .unwrap();
        drop(store);
        let err = run(&settings(dir.path()), &args).unwrap_err();
        assert!(
            format!("{err:#}").contains("hash chain is broken"),
            "{err:#}"
        );
    }

    #[test]
    fn the_command_says_so_when_the_coordinator_is_running_or_the_job_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = database(dir.path());
        let args = AuditArgs {
            job: JOB,
            out: None,
            report: None,
        };
        let err = run(&settings(dir.path()), &args).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("is in use") && message.contains("coordinator is running"),
            "{message}"
        );
        drop(store);
        let args = AuditArgs {
            job: JobId([6; 16]),
            out: None,
            report: None,
        };
        let err = run(&settings(dir.path()), &args).unwrap_err();
        assert!(format!("{err:#}").contains("no job"), "{err:#}");
        let empty = tempfile::tempdir().unwrap();
        let err = run(&settings(empty.path()), &args).unwrap_err();
        assert!(format!("{err:#}").contains("no job database"), "{err:#}");
    }
}
