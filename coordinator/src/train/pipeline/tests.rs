use super::*;
use commons_protocol::Hash;

fn node(i: u8) -> NodeId {
    NodeId([i; 32])
}

fn params(i: u8) -> ParamsRef {
    ParamsRef {
        root: Hash([i; 32]),
        checkpoint: Hash([i.wrapping_add(100); 32]),
    }
}

fn config(stages: u32, micro_batches: u32, rounds: u64) -> PipelineConfig {
    PipelineConfig {
        rounds,
        stages,
        micro_batches,
        unit_timeout_ms: 1_000,
        max_in_flight_per_node: 4,
        bench_ms: 5_000,
        persist_every: 1,
    }
}

fn run(stages: u32, micro_batches: u32, rounds: u64) -> PipelineTraining<u64> {
    let stage_params = (0..stages).map(|s| params(s as u8)).collect();
    PipelineTraining::new(
        config(stages, micro_batches, rounds),
        Snapshot {
            round: 0,
            params: params(50),
        },
        stage_params,
    )
    .unwrap()
}

/// A stand-in for the stage computation whose value depends on every
/// input, in order, so a unit given the wrong inputs shows.
fn execute(stages: u32, round: u64, task: Task, inputs: &[u64]) -> u64 {
    let last = task.stage + 1 == stages;
    let (expected, base) = match (task.pass, task.stage) {
        (Pass::Forward, 0) => (0, round * 10_000 + u64::from(task.micro) * 100 + 1),
        (Pass::Backward, 0) if last => (0, round * 10_000 + u64::from(task.micro) * 100 + 7),
        (Pass::Forward, _) => (1, 0),
        (Pass::Backward, _) if last => (1, 3),
        (Pass::Backward, 0) => (1, 5),
        (Pass::Backward, _) => (2, 9),
    };
    assert_eq!(inputs.len(), expected, "{task:?} inputs {inputs:?}");
    inputs.iter().fold(base + u64::from(task.stage), |acc, &x| {
        acc.wrapping_mul(1_000_003).wrapping_add(x)
    })
}

/// The aggregate computed directly, stage after stage.
fn expected(stages: u32, micros: u32, round: u64) -> Vec<Vec<u64>> {
    let task = |pass, stage, micro| Task { pass, micro, stage };
    let mut out = vec![vec![0; micros as usize]; stages as usize];
    for m in 0..micros {
        let mut fwd = Vec::new();
        for s in 0..stages - 1 {
            let inputs: Vec<u64> = fwd.last().copied().into_iter().collect();
            fwd.push(execute(stages, round, task(Pass::Forward, s, m), &inputs));
        }
        let mut grad: Option<u64> = None;
        for s in (0..stages).rev() {
            let mut inputs: Vec<u64> = if s > 0 {
                vec![fwd[s as usize - 1]]
            } else {
                vec![]
            };
            inputs.extend(grad);
            let value = execute(stages, round, task(Pass::Backward, s, m), &inputs);
            out[s as usize][m as usize] = value;
            grad = Some(value);
        }
    }
    out
}

struct Sent {
    ticket: Ticket,
    node: NodeId,
    round: u64,
    task: Task,
    inputs: Vec<u64>,
}

/// Drains outputs: sends queue up, aggregates are answered with new
/// parameters; returns the aggregates seen.
fn drain(
    t: &mut PipelineTraining<u64>,
    queue: &mut VecDeque<Sent>,
    now: UnixMillis,
    log: &mut Vec<Output<u64>>,
) -> Vec<Vec<Vec<u64>>> {
    let mut aggregates = Vec::new();
    while let Some(out) = t.poll_output() {
        match &out {
            Output::Send {
                ticket,
                node,
                round,
                task,
                inputs,
                params: p,
                ..
            } => {
                assert_eq!(p.root.0[0], (*round as u8) * 10 + task.stage as u8);
                queue.push_back(Sent {
                    ticket: *ticket,
                    node: *node,
                    round: *round,
                    task: *task,
                    inputs: inputs.clone(),
                });
            }
            Output::Aggregate { round, results } => {
                aggregates.push(results.clone());
                let next = (*round as u8 + 1) * 10;
                let stage_params = (0..t.config().stages)
                    .map(|s| params(next + s as u8))
                    .collect();
                t.handle_aggregated(now, *round, params(next + 50), stage_params)
                    .unwrap();
            }
            _ => {}
        }
        log.push(out);
    }
    aggregates
}

fn fresh(stages: u32, micro_batches: u32, rounds: u64) -> PipelineTraining<u64> {
    let mut t = run(stages, micro_batches, rounds);
    // Round r's stage parameters are params(10 r + s).
    t.stage_params = (0..stages).map(|s| params(s as u8)).collect();
    t
}

#[test]
fn units_follow_their_inputs_and_stages_overlap() {
    let (stages, micros) = (3, 4);
    let mut t = fresh(stages, micros, 2);
    let mut queue = VecDeque::new();
    let mut log = Vec::new();
    t.set_nodes(UnixMillis(0), [node(1), node(2), node(3)]);
    let mut aggregates = drain(&mut t, &mut queue, UnixMillis(0), &mut log);
    // Every stage on its own node.
    let holders: BTreeSet<NodeId> = t.holders().iter().flatten().copied().collect();
    assert_eq!(holders.len(), 3);
    let mut overlap = false;
    let mut sent = 0;
    while let Some(s) = queue.pop_front() {
        sent += 1;
        let stages_busy: BTreeSet<u32> = queue
            .iter()
            .filter(|q| q.round == s.round)
            .map(|q| q.task.stage)
            .chain([s.task.stage])
            .collect();
        overlap |= stages_busy.len() > 1;
        let value = execute(stages, s.round, s.task, &s.inputs);
        assert_eq!(
            t.handle_result(UnixMillis(1), s.ticket, value),
            Taken::Accepted
        );
        aggregates.extend(drain(&mut t, &mut queue, UnixMillis(1), &mut log));
    }
    assert!(overlap, "different stages never worked at once");
    // (S − 1) forward and S backward units per micro-batch, per round.
    assert_eq!(sent, 2 * (2 * 4 + 3 * 4));
    assert_eq!(aggregates.len(), 2);
    assert_eq!(aggregates[0].len(), 3);
    assert!(aggregates.iter().all(|a| a.iter().all(|s| s.len() == 4)));
    assert_ne!(aggregates[0], aggregates[1]);
    for (round, aggregate) in aggregates.iter().enumerate() {
        assert_eq!(aggregate, &expected(stages, micros, round as u64));
    }
    assert!(matches!(
        log.last(),
        Some(Output::Finished { rounds: 2, .. })
    ));
    assert_eq!(
        log.iter()
            .filter(|o| matches!(o, Output::Persist(_)))
            .count(),
        2
    );
    let stats = t.stats();
    assert_eq!((stats.sent, stats.accepted, stats.resent), (40, 40, 0));
}

/// Runs a round of `stages` × `micros` to its aggregate, failing the
/// `fail_at`-th unit sent (by its ticket) if given, or letting it miss
/// its deadline (and answer late) when `late`.
fn round_with(
    stages: u32,
    micros: u32,
    nodes: u8,
    fail_at: Option<usize>,
    late: bool,
) -> (Vec<Vec<u64>>, PipelineTraining<u64>, Vec<Output<u64>>) {
    let mut t = fresh(stages, micros, 1);
    let mut queue = VecDeque::new();
    let mut log = Vec::new();
    t.set_nodes(UnixMillis(0), (1..=nodes).map(node));
    let mut aggregates = drain(&mut t, &mut queue, UnixMillis(0), &mut log);
    let mut n = 0;
    let mut held_back = None;
    let mut now = 0;
    while let Some(s) = queue.pop_front() {
        now += 1;
        n += 1;
        if Some(n) == fail_at {
            if late {
                // No answer before the deadline: the unit goes elsewhere.
                t.tick(UnixMillis(now + 5_000));
                held_back = Some(s);
            } else {
                assert!(t.handle_failure(UnixMillis(now), s.ticket, "unreachable"));
            }
            aggregates.extend(drain(&mut t, &mut queue, UnixMillis(now), &mut log));
            continue;
        }
        let value = execute(stages, s.round, s.task, &s.inputs);
        t.handle_result(UnixMillis(now), s.ticket, value);
        aggregates.extend(drain(&mut t, &mut queue, UnixMillis(now), &mut log));
        if let Some(h) = held_back.take() {
            // The late answer arrives after the resend was queued.
            let value = execute(stages, h.round, h.task, &h.inputs);
            let taken = t.handle_result(UnixMillis(now), h.ticket, value);
            assert!(matches!(taken, Taken::Late | Taken::Dropped));
            aggregates.extend(drain(&mut t, &mut queue, UnixMillis(now), &mut log));
        }
    }
    assert_eq!(aggregates.len(), 1, "the round completes");
    (aggregates.remove(0), t, log)
}

#[test]
fn a_failed_node_loses_its_stages_and_the_round_completes_unchanged() {
    let (reference, _, _) = round_with(3, 4, 3, None, false);
    assert_eq!(reference, expected(3, 4, 0));
    for fail_at in 1..=20 {
        let (aggregate, t, log) = round_with(3, 4, 3, Some(fail_at), false);
        assert_eq!(aggregate, reference, "failing unit {fail_at}");
        let moved = log.iter().any(|o| {
            matches!(
                o,
                Output::Moved {
                    from: Some((_, Lost::Failed(_))),
                    ..
                }
            )
        });
        assert!(moved, "failing unit {fail_at}: no stage moved");
        assert_eq!(t.stats().failures, 1);
        assert!(t.stats().resent >= 1);
        // The failed node is benched: two nodes hold the three stages.
        let holders: BTreeSet<NodeId> = t.holders().iter().flatten().copied().collect();
        assert_eq!(holders.len(), 2);
    }
}

#[test]
fn a_missed_deadline_moves_the_stage_and_a_late_answer_still_counts() {
    let (reference, _, _) = round_with(2, 3, 2, None, false);
    for at in [1, 4, 7] {
        let (aggregate, t, log) = round_with(2, 3, 2, Some(at), true);
        assert_eq!(aggregate, reference, "unit {at} late");
        assert!(log.iter().any(|o| matches!(
            o,
            Output::Moved {
                from: Some((_, Lost::Deadline)),
                ..
            }
        )));
        assert_eq!(t.stats().deadlines, 1);
    }
}

#[test]
fn one_node_holds_every_stage_and_none_means_waiting() {
    let mut t = fresh(3, 2, 1);
    let mut queue = VecDeque::new();
    let mut log = Vec::new();
    t.set_nodes(UnixMillis(0), []);
    drain(&mut t, &mut queue, UnixMillis(0), &mut log);
    assert!(queue.is_empty(), "nothing is sent without nodes");
    t.set_nodes(UnixMillis(1), [node(7)]);
    drain(&mut t, &mut queue, UnixMillis(1), &mut log);
    assert_eq!(t.holders(), &[Some(node(7)); 3]);
    let mut aggregates = Vec::new();
    while let Some(s) = queue.pop_front() {
        assert_eq!(s.node, node(7));
        let value = execute(3, s.round, s.task, &s.inputs);
        t.handle_result(UnixMillis(2), s.ticket, value);
        aggregates.extend(drain(&mut t, &mut queue, UnixMillis(2), &mut log));
    }
    assert_eq!(aggregates.len(), 1);
    // A node that leaves gives its stages to the next one.
    let mut t = fresh(2, 2, 1);
    t.set_nodes(UnixMillis(0), [node(1), node(2)]);
    drain(&mut t, &mut queue, UnixMillis(0), &mut log);
    t.set_nodes(UnixMillis(1), [node(2)]);
    log.clear();
    drain(&mut t, &mut queue, UnixMillis(1), &mut log);
    assert!(log.iter().any(
        |o| matches!(o, Output::Moved { node: n, from: Some((_, Lost::Left)), .. } if *n == node(2))
    ));
    assert_eq!(t.holders(), &[Some(node(2)); 2]);
}

/// The aggregates, the run and its outputs.
type Checked = (Vec<Vec<Vec<u64>>>, PipelineTraining<u64>, Vec<Output<u64>>);

/// Runs rounds of 3 stages × 2 micro-batches over nodes 1 to 4, every
/// result reported checked; `lies(round, node)` says whether a node's
/// results are wrong, and `draw(round, node, n)` gives the draw of its
/// `n`-th result of the round. Returns the aggregates and the run.
fn checked_run(
    rounds: u64,
    config: VerifyConfig,
    lies: impl Fn(u64, NodeId) -> bool,
    draw: impl Fn(u64, NodeId, u32) -> u64,
) -> Checked {
    let class = commons_protocol::messages::DeterminismClass {
        kernel: "cpu".into(),
        build: "test".into(),
    };
    let nodes: Vec<NodeId> = (1..=4).map(node).collect();
    let mut ledger = Ledger::new(config);
    ledger.set_profiles(
        nodes
            .iter()
            .map(|n| {
                (
                    *n,
                    crate::verify::Profile {
                        operator: *n,
                        class: class.clone(),
                    },
                )
            })
            .collect(),
    );
    let mut t = fresh(3, 2, rounds).with_checks(ledger, None);
    let mut queue = VecDeque::new();
    let mut log = Vec::new();
    t.set_nodes(UnixMillis(0), nodes);
    let mut aggregates = drain(&mut t, &mut queue, UnixMillis(0), &mut log);
    let mut count: BTreeMap<(u64, NodeId), u32> = BTreeMap::new();
    let mut steps = 0;
    while let Some(s) = queue.pop_front() {
        steps += 1;
        assert!(steps < 10_000, "the run does not end");
        let honest = execute(3, s.round, s.task, &s.inputs);
        let value = if lies(s.round, s.node) {
            honest ^ 1
        } else {
            honest
        };
        let n = count.entry((s.round, s.node)).or_default();
        *n += 1;
        let digest = Hash::of_parts("test", &[&value.to_le_bytes()]);
        t.handle_checked(
            UnixMillis(steps),
            s.ticket,
            value,
            digest,
            draw(s.round, s.node, *n),
        );
        aggregates.extend(drain(&mut t, &mut queue, UnixMillis(steps), &mut log));
    }
    (aggregates, t, log)
}

#[test]
fn a_liar_on_probation_is_caught_and_never_used() {
    let liar = node(2);
    let (aggregates, t, log) = checked_run(
        2,
        VerifyConfig::default(),
        |_, n| n == liar,
        |_, _, _| u64::MAX,
    );
    assert_eq!(aggregates, vec![expected(3, 2, 0), expected(3, 2, 1)]);
    let excluded: Vec<&Output<u64>> = log
        .iter()
        .filter(|o| matches!(o, Output::Excluded { .. }))
        .collect();
    assert_eq!(excluded.len(), 1, "{excluded:?}");
    assert!(matches!(excluded[0], Output::Excluded { node: n, round: 0 } if *n == liar));
    assert!(!t.holders().contains(&Some(liar)));
    let stats = t.stats();
    assert!(stats.check_sends > 0 && stats.confirmed > 0 && stats.mismatches >= 1);
    assert_eq!(stats.exclusions, 1);
    assert!(t.ledger().is_excluded(&liar, None));
}

#[test]
fn an_unchecked_lie_caught_later_recomputes_its_micro_batches() {
    // Off probation at once (p = 1 / streak), so the draws decide: the
    // liar's first lies in round 1 go unchecked, its fourth is checked.
    let liar = node(1);
    let config = VerifyConfig {
        probation: 0,
        p_min: 0.0,
        ..VerifyConfig::default()
    };
    let (aggregates, t, log) = checked_run(
        2,
        config,
        |round, n| round == 1 && n == liar,
        |round, n, k| {
            if round == 1 && n == liar && k >= 4 {
                0
            } else {
                u64::MAX
            }
        },
    );
    assert_eq!(aggregates, vec![expected(3, 2, 0), expected(3, 2, 1)]);
    assert!(
        log.iter()
            .any(|o| matches!(o, Output::Excluded { node: n, round: 1 } if *n == liar))
    );
    assert!(t.stats().recomputed >= 1, "{:?}", t.stats());
    // Without the recomputation the lies would have reached the aggregate.
    let (unchecked, _, _) = checked_run(
        2,
        VerifyConfig {
            enabled: false,
            ..VerifyConfig::default()
        },
        |round, n| round == 1 && n == liar,
        |_, _, _| u64::MAX,
    );
    assert_ne!(unchecked[1], expected(3, 2, 1));
}

#[test]
fn bad_configurations_and_reports_are_refused() {
    for bad in [
        PipelineConfig {
            stages: 0,
            ..PipelineConfig::default()
        },
        PipelineConfig {
            micro_batches: 0,
            ..PipelineConfig::default()
        },
        PipelineConfig {
            rounds: 0,
            ..PipelineConfig::default()
        },
        PipelineConfig {
            unit_timeout_ms: 0,
            ..PipelineConfig::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let snapshot = Snapshot {
        round: 0,
        params: params(1),
    };
    assert!(
        PipelineTraining::<u64>::new(PipelineConfig::default(), snapshot, vec![params(1)]).is_err()
    );
    let mut t = fresh(2, 2, 1);
    assert!(
        t.handle_aggregated(UnixMillis(0), 0, params(1), vec![])
            .is_err()
    );
    assert_eq!(
        t.handle_result(UnixMillis(0), Ticket(99), 1),
        Taken::Dropped
    );
    assert!(!t.handle_failure(UnixMillis(0), Ticket(99), "x"));
    // A run resumed past its last round is finished at once.
    let done = PipelineTraining::<u64>::new(
        config(2, 2, 3),
        Snapshot {
            round: 3,
            params: params(9),
        },
        vec![params(1), params(2)],
    )
    .unwrap();
    let mut done = done;
    assert!(matches!(
        done.poll_output(),
        Some(Output::Finished { rounds: 3, .. })
    ));
}
