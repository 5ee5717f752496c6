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
    let err = check_response(unit(), elsewhere, &sealed(&result_for(unit(), 7)), NOW).unwrap_err();
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
    // Held until the scheduler says it took the result, then queued.
    assert_eq!(c.held.len(), 1);
    let _ = c.drain_sends(NOW);
    assert!(c.held.is_empty());
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
        let _ = c.commit_now(NOW);
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

/// The report of `job` from token 0, opened.
fn report_of(c: &Coordinating<()>, job: &JobId) -> JobReport {
    Envelope::open_bytes::<JobReport>(&c.report_bytes(job, 0, NOW), NOW).unwrap()
}

#[test]
fn reports_show_only_what_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = rig(dir.path());
    let me = executor().node_id();
    let job = submit(&mut c, 1);
    // The submission is cut into a batch; until it is committed the job is
    // not on disk, and its report says only that it waits.
    let sends = c.drain_sends(NOW);
    let (batch, released) = c.settle(NOW);
    let batch = batch.expect("the new job is cut into a batch");
    assert!(released.is_empty());
    assert_eq!(batch.jobs.len(), 1);
    let watcher_of_submit = c.watchers.len();
    c.hold(job, ());
    assert_eq!(report_of(&c, &job).state, JobState::Queued);

    // The first token arrives while that batch is in flight: the scheduler
    // has it, reports do not, and nothing more is cut.
    let pending = sends[0].pending;
    c.on_response(pending, me, &sealed(&result_for(pending.unit, 9)), NOW);
    let _ = c.drain_sends(NOW);
    assert_eq!(c.view(&job).unwrap().tokens, vec![9]);
    assert!(c.settle(NOW).0.is_none(), "one batch in flight at a time");

    // The first commit lands: the job is recorded, but the held answer was
    // held after that batch was cut, so it waits for the next one.
    let store = c.store().unwrap();
    let outcome = store.commit_batch(&batch).map_err(|e| e.to_string());
    assert!(c.on_committed(outcome, NOW).is_empty());
    let report = report_of(&c, &job);
    assert_eq!(report.state, JobState::Running);
    assert_eq!(report.total_tokens, 0, "the token is not on disk yet");
    assert_eq!(report.audit, None);

    // The next batch holds the token and its receipt; it fails once, and the
    // receipt is cut again with the batch after, which commits.
    let (batch, _) = c.settle(NOW);
    let batch = batch.expect("the token and its receipt");
    assert_eq!(batch.entries.len(), 1);
    assert!(
        c.on_committed(Err("disk full".into()), NOW).is_empty(),
        "nothing is released by a failed commit"
    );
    assert_eq!(report_of(&c, &job).total_tokens, 0);
    let (batch, _) = c.settle(NOW);
    let batch = batch.expect("cut again");
    assert_eq!(batch.entries.len(), 1, "the receipt is not lost");
    let outcome = store.commit_batch(&batch).map_err(|e| e.to_string());
    let released = c.on_committed(outcome, NOW);
    assert_eq!(released.len(), 1, "the held answer goes out");
    assert_eq!(c.watchers.len(), watcher_of_submit);
    let report = report_of(&c, &job);
    assert_eq!(report.tokens.as_slice(), &[9]);
    assert_eq!(report.receipts, 1);
    assert_eq!(report.audit.map(|a| a.entries), Some(1));
    let stored = store.get(&job).unwrap().unwrap();
    assert_eq!(stored.tokens, vec![9]);
    assert_eq!(store.audit(&job).unwrap().len(), 1);
}

#[test]
fn a_watcher_is_answered_when_its_news_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = rig(dir.path());
    let me = executor().node_id();
    let job = submit(&mut c, 1);
    let pending = sent_to_executor(&mut c, job);
    c.watchers.push(Watcher {
        job,
        from_token: 0,
        deadline: Instant::now() + Duration::from_secs(60),
        channel: (),
        held_after: None,
    });
    c.on_response(pending, me, &sealed(&result_for(pending.unit, 9)), NOW);
    let _ = c.drain_sends(NOW);
    let (batch, released) = c.settle(NOW);
    assert!(released.is_empty(), "not before the commit");
    assert_eq!(c.watchers.len(), 1);
    let outcome = c
        .store()
        .unwrap()
        .commit_batch(&batch.unwrap())
        .map_err(|e| e.to_string());
    let released = c.on_committed(outcome, NOW);
    assert_eq!(released.len(), 1);
    let report = Envelope::open_bytes::<JobReport>(&released[0].1, NOW).unwrap();
    assert_eq!(report.tokens.as_slice(), &[9]);
    assert!(c.watchers.is_empty());
}
