//! The scheduler against a stand-in swarm: chains, failover, replay, fairness, coalitions.

use super::*;
use crate::verify::VerifyConfig;
use commons_protocol::messages::DeterminismClass;
use proptest::prelude::*;
use std::collections::HashMap;

const MODEL: ModelId = ModelId(Hash([9; 32]));
const VOCAB: u32 = 50;
const STOP: u32 = 0;

/// A stand-in executor whose outputs depend on the whole session history,
/// so a hop that lost or skipped a step gives different tokens.
struct FakeNode {
    layers: LayerRange,
    /// Each session's state per layer (a KV cache's stand-in) and next position.
    sessions: HashMap<SessionId, (HashMap<u32, u64>, u32)>,
    alive: bool,
    /// Die when asked for this many more units.
    dies_after: Option<u32>,
    /// Alter outputs (never the session's state): after `.0` honest units,
    /// each with probability `.1`, drawn from a stream seeded by `.2`.
    corrupt: Option<(u32, f64, u64)>,
    units: u32,
}

struct Swarm {
    nodes: BTreeMap<NodeId, FakeNode>,
    now: u64,
    sent: u32,
}

fn node(n: u8) -> NodeId {
    NodeId([n; 32])
}

impl Swarm {
    fn new(spans: &[(u8, u32, u32)]) -> Self {
        let nodes = spans
            .iter()
            .map(|&(n, a, b)| {
                (
                    node(n),
                    FakeNode {
                        layers: LayerRange { start: a, end: b },
                        sessions: HashMap::new(),
                        alive: true,
                        dies_after: None,
                        corrupt: None,
                        units: 0,
                    },
                )
            })
            .collect();
        Self {
            nodes,
            now: 1_000,
            sent: 0,
        }
    }

    fn offers(&self) -> Vec<SpanOffer> {
        self.nodes
            .iter()
            .map(|(id, n)| SpanOffer {
                node: *id,
                layers: n.layers,
                ms_per_layer: 1.0 + f64::from(id.0[0]) / 100.0,
                rtt_ms: 1.0,
                queue_ms: 0.0,
            })
            .collect()
    }

    fn scheduler(&self, config: SchedulerConfig) -> Scheduler {
        let mut s = Scheduler::new(config, 7);
        s.set_offers(MODEL, 30, 256, self.offers());
        // One determinism class: results compare bit for bit.
        s.set_profiles(
            self.nodes
                .keys()
                .map(|&n| {
                    let class = DeterminismClass {
                        kernel: "fake".into(),
                        build: "test".into(),
                    };
                    (n, Profile { operator: n, class })
                })
                .collect(),
        );
        s
    }

    fn execute(&mut self, to: NodeId, unit: &InferenceUnit) -> Result<StepResult, StepFailure> {
        self.sent += 1;
        let n = self.nodes.get_mut(&to).expect("a known node");
        if let Some(k) = n.dies_after.as_mut() {
            if *k == 0 {
                n.alive = false;
            }
            *k = k.saturating_sub(1);
        }
        if !n.alive {
            return Err(StepFailure::Unreachable("connection closed".into()));
        }
        // A node runs any part of its span (checkers do); the fake output
        // depends on the layers run, as a real stage's does.
        let l = unit.layers;
        assert!(
            n.layers.start <= l.start && l.end <= n.layers.end,
            "{l} is not within {}",
            n.layers
        );
        let values: Vec<u64> = match unit.input.to_u32() {
            Some(t) => t.into_iter().map(u64::from).collect(),
            None => unit
                .input
                .to_f32()
                .expect("f32 or u32")
                .into_iter()
                .map(|v| v as u64)
                .collect(),
        };
        let (states, pos) = n.sessions.entry(unit.session).or_default();
        if *pos != unit.options.start_pos {
            return Err(StepFailure::Refused {
                code: ErrorCode::UNKNOWN_SESSION,
                message: format!("at {pos}, asked {}", unit.options.start_pos),
            });
        }
        let mut outs = Vec::new();
        // Layer by layer, so that any split of the layers into hops
        // computes the same: the output depends on the layers run only.
        let mut last = 0;
        for v in values {
            let mut x = v;
            for layer in l.start..l.end {
                let state = states.entry(layer).or_insert(0);
                *state = (*state * 31 + x + u64::from(layer) * 7) % 65_521;
                x = *state;
            }
            last = x;
            outs.push(x as f32);
            *pos += 1;
        }
        n.units += 1;
        let lie = n.corrupt.is_some_and(|(honest, f, seed)| {
            let draw = Hash::of_parts(
                "fake corruption",
                &[&seed.to_le_bytes(), &n.units.to_le_bytes()],
            );
            let u = f64::from(u32::from_le_bytes([
                draw.0[0], draw.0[1], draw.0[2], draw.0[3],
            ])) / f64::from(u32::MAX);
            n.units > honest && u < f
        });
        let output = if l.end == 30 {
            let token = (last % u64::from(VOCAB)) as u32;
            let token = if lie { (token + 1) % VOCAB } else { token };
            Tensor::from_u32(&[1], &[token]).expect("tensor")
        } else {
            if lie {
                outs[0] += 1.0;
            }
            Tensor::from_f32(&[1, outs.len() as u64, 1], &outs).expect("tensor")
        };
        let commitment = output.digest();
        Ok(StepResult {
            executor: to,
            outputs: vec![output],
            commitment,
            input: None,
        })
    }

    /// Runs until every job ends or `limit` outputs were handled.
    fn drive(&mut self, s: &mut Scheduler, limit: usize) {
        for _ in 0..limit {
            self.now += 1;
            let now = UnixMillis(self.now);
            match s.poll_output() {
                Some(Output::Send {
                    ticket, node, unit, ..
                }) => {
                    let r = self.execute(node, &unit);
                    s.handle_result(now, ticket, r);
                }
                Some(Output::Sample { .. }) => panic!("greedy jobs never sample"),
                Some(Output::Changed { .. } | Output::Taken { .. }) => {}
                None => return,
            }
        }
        panic!("the jobs did not end within {limit} steps");
    }
}

fn job(id: u8, submitter: u8, prompt: &[u32], max_tokens: u32) -> NewJob {
    NewJob {
        id: JobId([id; 16]),
        submitter: node(submitter),
        model: MODEL,
        prompt: prompt.to_vec(),
        max_tokens,
        stop_tokens: vec![STOP],
        sampling: SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        },
    }
}

const SPANS: [(u8, u32, u32); 5] = [
    (1, 0, 10),
    (2, 10, 20),
    (3, 10, 20),
    (4, 20, 30),
    (5, 0, 10),
];

fn reference(prompt: &[u32], max_tokens: u32) -> Vec<u32> {
    let mut swarm = Swarm::new(&SPANS);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, prompt, max_tokens))
        .unwrap();
    swarm.drive(&mut s, 10_000);
    let v = s.view(&JobId([1; 16])).unwrap();
    assert!(matches!(v.status, JobStatus::Length | JobStatus::Stopped));
    assert_eq!(v.failovers, 0);
    v.tokens
}

#[test]
fn a_job_runs_through_a_three_hop_chain() {
    let tokens = reference(&[5, 6, 7, 8], 24);
    assert!(!tokens.is_empty());
    let mut swarm = Swarm::new(&SPANS);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[5, 6, 7, 8], 24))
        .unwrap();
    swarm.drive(&mut s, 10_000);
    let v = s.view(&JobId([1; 16])).unwrap();
    assert_eq!(v.tokens, tokens);
    let chain: Vec<(u8, u32)> = v
        .hops
        .iter()
        .map(|h| (h.node.0[0], h.layers.start))
        .collect();
    assert_eq!(chain, vec![(1, 0), (2, 10), (4, 20)]);
    // One result per hop per step.
    assert_eq!(v.receipts as usize, 3 * v.tokens.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whichever hop dies, whenever: the text equals the uninterrupted run's.
    #[test]
    fn a_dying_hop_is_replaced_and_the_text_is_unchanged(
        victim in prop::sample::select(vec![1u8, 2, 4]),
        after in 0u32..40,
        prompt in proptest::collection::vec(1u32..VOCAB, 1..12),
    ) {
        let expected = reference(&prompt, 32);
        let mut spans = SPANS.to_vec();
        spans.push((6, 20, 30));
        let mut swarm = Swarm::new(&spans);
        swarm.nodes.get_mut(&node(victim)).unwrap().dies_after = Some(after);
        let mut s = swarm.scheduler(SchedulerConfig::default());
        s.submit(UnixMillis(0), job(1, 1, &prompt, 32)).unwrap();
        swarm.drive(&mut s, 100_000);
        let v = s.view(&JobId([1; 16])).unwrap();
        prop_assert!(matches!(v.status, JobStatus::Length | JobStatus::Stopped), "{:?}", v.status);
        prop_assert_eq!(&v.tokens, &expected);
        let died = !swarm.nodes[&node(victim)].alive;
        prop_assert_eq!(v.failovers, u32::from(died));
        if died {
            prop_assert!(v.hops.iter().any(|h| h.node == node(victim) && !h.current));
        }
    }
}

#[test]
fn a_restored_job_replays_its_tokens_and_goes_on_identically() {
    let expected = reference(&[3, 1, 4, 1, 5], 30);
    assert!(expected.len() > 6, "{expected:?}");
    let mut swarm = Swarm::new(&SPANS);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.resume(
        UnixMillis(0),
        job(1, 1, &[3, 1, 4, 1, 5], 30),
        expected[..6].to_vec(),
        UnixMillis(0),
    )
    .unwrap();
    swarm.drive(&mut s, 10_000);
    assert_eq!(s.view(&JobId([1; 16])).unwrap().tokens, expected);
    // Restoring every token ends the job at once, with no unit sent.
    let mut swarm = Swarm::new(&SPANS);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.resume(
        UnixMillis(0),
        job(1, 1, &[3, 1, 4, 1, 5], 30),
        expected.clone(),
        UnixMillis(0),
    )
    .unwrap();
    swarm.drive(&mut s, 10);
    assert_eq!(swarm.sent, 0);
    assert!(s.view(&JobId([1; 16])).unwrap().status.is_terminal());
}

#[test]
fn a_resumed_job_waits_for_its_route_then_fails_as_lost() {
    let expected = reference(&[3, 1, 4, 1, 5], 30);
    let mut swarm = Swarm::new(&SPANS);
    // A restarted coordinator knows no node yet.
    let mut s = Scheduler::new(SchedulerConfig::default(), 7);
    let id = JobId([1; 16]);
    s.resume(
        UnixMillis(0),
        job(1, 1, &[3, 1, 4, 1, 5], 30),
        expected[..3].to_vec(),
        UnixMillis(5_000),
    )
    .unwrap();
    s.tick(UnixMillis(1_000));
    assert_eq!(s.view(&id).unwrap().status, JobStatus::Queued);
    assert_eq!(s.view(&id).unwrap().tokens, expected[..3]);
    // The nodes' adverts arrive: it resumes and ends as if never stopped.
    s.set_offers(MODEL, 30, 256, swarm.offers());
    s.tick(UnixMillis(2_000));
    swarm.drive(&mut s, 10_000);
    assert_eq!(s.view(&id).unwrap().tokens, expected);
    // No node ever comes: failed, with the reason.
    let mut s = Scheduler::new(SchedulerConfig::default(), 7);
    s.resume(
        UnixMillis(0),
        job(2, 1, &[3, 1, 4, 1, 5], 30),
        expected[..3].to_vec(),
        UnixMillis(5_000),
    )
    .unwrap();
    s.tick(UnixMillis(5_001));
    let JobStatus::Failed { code, message } = s.view(&JobId([2; 16])).unwrap().status else {
        panic!("still waiting")
    };
    assert_eq!(code, ErrorCode::LOST);
    assert!(message.contains("after 3 tokens"), "{message}");
}

#[test]
fn jobs_nobody_can_serve_fail_at_submission() {
    let swarm = Swarm::new(&[(1, 0, 10), (2, 11, 30)]);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    let e = s.submit(UnixMillis(0), job(1, 1, &[1], 4)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NO_ROUTE);
    assert!(e.message.contains("layer 10"), "{e}");
    let mut other = job(2, 1, &[1], 4);
    other.model = ModelId(Hash([1; 32]));
    assert_eq!(
        s.submit(UnixMillis(0), other).unwrap_err().code,
        ErrorCode::NO_ROUTE
    );
    assert_eq!(
        s.submit(UnixMillis(0), job(3, 1, &[], 4)).unwrap_err().code,
        ErrorCode::BAD_REQUEST
    );
    assert_eq!(
        s.submit(UnixMillis(0), job(4, 1, &[1; 256], 4))
            .unwrap_err()
            .code,
        ErrorCode::TOO_LARGE
    );
}

#[test]
fn a_hop_with_no_replacement_fails_the_job_with_its_reason() {
    let mut swarm = Swarm::new(&[(1, 0, 10), (2, 10, 20), (4, 20, 30)]);
    swarm.nodes.get_mut(&node(2)).unwrap().dies_after = Some(0);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[1, 2], 30)).unwrap();
    swarm.drive(&mut s, 10_000);
    let v = s.view(&JobId([1; 16])).unwrap();
    let JobStatus::Failed { code, message } = v.status else {
        panic!("{:?}", v.status)
    };
    assert_eq!(code, ErrorCode::NO_ROUTE);
    assert!(message.contains("layers 10..20"), "{message}");
    assert!(message.contains("connection closed"), "{message}");
}

#[test]
fn a_silent_hop_times_out_and_is_replaced() {
    let swarm = Swarm::new(&SPANS);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[1, 2], 30)).unwrap();
    let first = loop {
        match s.poll_output() {
            Some(Output::Send { node, .. }) => break node,
            Some(_) => {}
            None => panic!("nothing sent"),
        }
    };
    assert_eq!(first, node(1));
    s.tick(UnixMillis(5_000));
    assert!(s.poll_output().is_none(), "not late yet");
    s.tick(UnixMillis(60_000));
    let next = std::iter::from_fn(|| s.poll_output())
        .find_map(|o| match o {
            Output::Send { node, .. } => Some(node),
            _ => None,
        })
        .unwrap();
    assert_eq!(next, node(5));
    assert_eq!(s.view(&JobId([1; 16])).unwrap().failovers, 1);
}

#[test]
fn bad_requests_fail_the_job_without_failover() {
    let mut swarm = Swarm::new(&SPANS);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[1, 2], 30)).unwrap();
    let Some(Output::Send { ticket, .. }) =
        std::iter::from_fn(|| s.poll_output()).find(|o| matches!(o, Output::Send { .. }))
    else {
        panic!("nothing sent")
    };
    s.handle_result(
        UnixMillis(2),
        ticket,
        Err(StepFailure::Refused {
            code: ErrorCode::BAD_REQUEST,
            message: "hidden states must have shape (1, n, 576)".into(),
        }),
    );
    swarm.drive(&mut s, 100);
    let v = s.view(&JobId([1; 16])).unwrap();
    assert!(matches!(
        v.status,
        JobStatus::Failed {
            code: ErrorCode::BAD_REQUEST,
            ..
        }
    ));
    assert_eq!(swarm.sent, 0);
}

#[test]
fn submitters_share_slots_fairly_and_cancel_frees_theirs() {
    let swarm = Swarm::new(&SPANS);
    let config = SchedulerConfig {
        max_active_jobs: 2,
        ..SchedulerConfig::default()
    };
    let mut s = swarm.scheduler(config);
    for i in 1..=3 {
        s.submit(UnixMillis(0), job(i, 1, &[1, 2], 8)).unwrap();
    }
    s.submit(UnixMillis(0), job(9, 2, &[1, 2], 8)).unwrap();
    let status = |s: &Scheduler, i: u8| s.view(&JobId([i; 16])).unwrap().status;
    assert_eq!(status(&s, 1), JobStatus::Running);
    assert_eq!(status(&s, 2), JobStatus::Running);
    assert_eq!(status(&s, 9), JobStatus::Queued);
    // A slot frees: the second submitter goes before the first one's third job.
    assert!(
        !s.cancel(UnixMillis(1), &JobId([1; 16]), &node(2)),
        "not theirs"
    );
    assert!(s.cancel(UnixMillis(1), &JobId([1; 16]), &node(1)));
    assert_eq!(status(&s, 1), JobStatus::Cancelled);
    assert_eq!(status(&s, 9), JobStatus::Running);
    assert_eq!(status(&s, 3), JobStatus::Queued);
    // All of them end.
    let mut swarm = swarm;
    swarm.drive(&mut s, 100_000);
    for i in [2, 3, 9] {
        assert!(matches!(
            status(&s, i),
            JobStatus::Length | JobStatus::Stopped
        ));
    }
}

#[test]
fn coalition_jobs_run_only_on_nodes_that_serve_their_coalition() {
    let (a, b) = (CoalitionId(Hash([0xa; 32])), CoalitionId(Hash([0xb; 32])));
    // Nodes 1, 2, 4 serve coalition A; 3, 5, 6 serve open work.
    let mut spans = SPANS.to_vec();
    spans.push((6, 20, 30));
    let mut swarm = Swarm::new(&spans);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.set_coalitions(
        [1, 2, 4]
            .into_iter()
            .map(|n| (node(n), BTreeSet::from([a])))
            .collect(),
    );
    s.submit_in(UnixMillis(0), job(1, 1, &[1, 2, 3], 6), Some(a))
        .unwrap();
    s.submit(UnixMillis(0), job(2, 1, &[1, 2, 3], 6)).unwrap();
    let mut seen: Vec<(JobId, NodeId, Option<CoalitionId>)> = Vec::new();
    for _ in 0..10_000 {
        swarm.now += 1;
        match s.poll_output() {
            Some(Output::Send {
                ticket,
                job,
                node,
                unit,
                ..
            }) => {
                seen.push((job, node, unit.coalition));
                let r = swarm.execute(node, &unit);
                s.handle_result(UnixMillis(swarm.now), ticket, r);
            }
            Some(_) => {}
            None => break,
        }
    }
    for (job, nodes, coalition) in [
        (JobId([1; 16]), [1u8, 2, 4], Some(a)),
        (JobId([2; 16]), [3, 5, 6], None),
    ] {
        let v = s.view(&job).unwrap();
        assert!(v.status.is_terminal() && !matches!(v.status, JobStatus::Failed { .. }));
        assert_eq!(v.coalition, coalition);
        let used: BTreeSet<u8> = seen
            .iter()
            .filter(|(j, ..)| *j == job)
            .map(|(_, n, c)| {
                assert_eq!(*c, coalition, "every unit carries the job's coalition");
                n.0[0]
            })
            .collect();
        assert_eq!(used, BTreeSet::from(nodes));
    }
    // Nobody serves coalition B: refused at once, naming it.
    let e = s
        .submit_in(UnixMillis(0), job(3, 1, &[1], 4), Some(b))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NO_ROUTE);
    assert!(e.message.contains(&b.to_string()), "{e}");
    // A failover stays inside the coalition: with node 2 dead and only open
    // nodes left on 10..20, the coalition's job fails instead of leaking out.
    swarm.nodes.get_mut(&node(2)).unwrap().dies_after = Some(0);
    s.submit_in(UnixMillis(0), job(4, 1, &[1, 2, 3], 6), Some(a))
        .unwrap();
    swarm.drive(&mut s, 10_000);
    let v = s.view(&JobId([4; 16])).unwrap();
    let JobStatus::Failed { code, .. } = v.status else {
        panic!("{:?}", v.status)
    };
    assert_eq!(code, ErrorCode::NO_ROUTE);
    assert!(v.hops.iter().all(|h| [1, 2, 4].contains(&h.node.0[0])));
}

// Spot checks.

/// Three nodes on every span, so a referee can always be found.
const TRIPLES: [(u8, u32, u32); 9] = [
    (1, 0, 10),
    (5, 0, 10),
    (7, 0, 10),
    (2, 10, 20),
    (3, 10, 20),
    (8, 10, 20),
    (4, 20, 30),
    (6, 20, 30),
    (9, 20, 30),
];

fn unverified() -> SchedulerConfig {
    SchedulerConfig {
        verify: VerifyConfig {
            enabled: false,
            ..VerifyConfig::default()
        },
        ..SchedulerConfig::default()
    }
}

fn always_checked() -> SchedulerConfig {
    SchedulerConfig {
        verify: VerifyConfig {
            p_min: 1.0,
            ..VerifyConfig::default()
        },
        ..SchedulerConfig::default()
    }
}

/// Drives like [`Swarm::drive`], asserting after every step that the tokens
/// released to the submitter are a prefix of `honest`.
fn drive_watching(swarm: &mut Swarm, s: &mut Scheduler, id: JobId, honest: &[u32]) {
    for _ in 0..200_000 {
        swarm.now += 1;
        let now = UnixMillis(swarm.now);
        match s.poll_output() {
            Some(Output::Send {
                ticket, node, unit, ..
            }) => {
                let r = swarm.execute(node, &unit);
                s.handle_result(now, ticket, r);
            }
            Some(Output::Changed { .. }) => {
                let v = s.view(&id).unwrap();
                assert!(
                    honest.starts_with(&v.tokens),
                    "released {:?}, honest {honest:?}",
                    v.tokens
                );
            }
            Some(Output::Sample { .. }) => panic!("greedy jobs never sample"),
            Some(Output::Taken { .. }) => {}
            None => return,
        }
    }
    panic!("the jobs did not end");
}

fn honest(spans: &[(u8, u32, u32)], prompt: &[u32], max_tokens: u32) -> Vec<u32> {
    let mut swarm = Swarm::new(spans);
    let mut s = swarm.scheduler(unverified());
    s.submit(UnixMillis(0), job(1, 1, prompt, max_tokens))
        .unwrap();
    swarm.drive(&mut s, 10_000);
    s.view(&JobId([1; 16])).unwrap().tokens
}

#[test]
fn spot_checks_confirm_an_honest_swarm_without_changing_its_text() {
    let expected = honest(&TRIPLES, &[5, 6, 7, 8], 24);
    let mut swarm = Swarm::new(&TRIPLES);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[5, 6, 7, 8], 24))
        .unwrap();
    drive_watching(&mut swarm, &mut s, JobId([1; 16]), &expected);
    let v = s.view(&JobId([1; 16])).unwrap();
    assert_eq!(v.tokens, expected);
    assert!(matches!(v.status, JobStatus::Length | JobStatus::Stopped));
    let stats = s.verify_stats();
    assert_eq!(stats.mismatches, 0);
    assert_eq!(stats.exclusions, 0);
    // Every node is on probation: every step of every hop is re-executed,
    // each by the fastest other node of its span.
    let steps = v.tokens.len() as u64;
    assert_eq!(stats.sampled, 3 * steps);
    assert_eq!(stats.compared, 3 * steps);
    assert_eq!(u64::from(v.verified), 3 * steps);
    assert_eq!(u64::from(v.check_units), 3 * steps);
    assert_eq!(
        v.receipts as u64,
        3 * steps,
        "receipts count the chain's results"
    );
    for (hop, checker) in [(1, 5), (2, 3), (4, 6)] {
        assert_eq!(s.ledger().record(&node(hop)).valid, steps);
        assert_eq!(s.ledger().record(&node(checker)).valid, steps);
    }
    assert_eq!(v.revisions, 0);
}

#[test]
fn once_trusted_a_node_is_checked_less_often() {
    let mut swarm = Swarm::new(&TRIPLES);
    let mut s = swarm.scheduler(SchedulerConfig::default());
    for i in 1..=6 {
        s.submit(UnixMillis(0), job(i, i, &[i.into(), 2, 3], 40))
            .unwrap();
        swarm.drive(&mut s, 100_000);
    }
    let stats = s.verify_stats();
    let steps: u64 = (1..=6)
        .map(|i| s.view(&JobId([i; 16])).unwrap().tokens.len() as u64)
        .sum();
    assert!(steps > 100, "{steps}");
    // The first ten results of each hop node are all checked; after that p
    // falls to max(0.05, 1/streak): far fewer samples than results.
    assert!(
        stats.sampled < 3 * steps / 2,
        "{stats:?} of {} results",
        3 * steps
    );
    assert!(stats.sampled >= 30, "{stats:?}");
    assert_eq!(stats.mismatches, 0);
    assert!(s.ledger().probability(&node(1)) < 0.2);
}

#[test]
fn a_corrupting_hop_is_caught_excluded_and_its_work_redone() {
    let expected = honest(&TRIPLES, &[5, 6, 7, 8], 24);
    let mut swarm = Swarm::new(&TRIPLES);
    // Node 2 is the fastest on 10..20; it corrupts half its results.
    swarm.nodes.get_mut(&node(2)).unwrap().corrupt = Some((0, 0.5, 1));
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[5, 6, 7, 8], 24))
        .unwrap();
    drive_watching(&mut swarm, &mut s, JobId([1; 16]), &expected);
    let v = s.view(&JobId([1; 16])).unwrap();
    assert_eq!(v.tokens, expected, "{:?}", v.status);
    assert!(s.ledger().is_excluded(&node(2), None));
    assert!(
        !s.ledger().is_excluded(&node(3), None),
        "its checker was right"
    );
    let stats = s.verify_stats();
    assert!(stats.mismatches >= 1 && stats.decided >= 1, "{stats:?}");
    assert_eq!(stats.undecided, 0);
    assert!(stats.rollbacks >= 1);
    assert_eq!(v.revisions, 0, "nothing unchecked had been released");
    assert!(v.hops.iter().all(|h| h.node != node(2) || !h.current));
    // Excluded for good: a new job never goes near it.
    s.submit(UnixMillis(0), job(2, 1, &[5, 6, 7, 8], 24))
        .unwrap();
    let sent_before = swarm.nodes[&node(2)].units;
    swarm.drive(&mut s, 100_000);
    assert_eq!(swarm.nodes[&node(2)].units, sent_before);
    assert_eq!(s.view(&JobId([2; 16])).unwrap().tokens, expected);
}

#[test]
fn a_lying_checker_loses_to_the_referee() {
    let expected = honest(&TRIPLES, &[9, 8, 7], 20);
    let mut swarm = Swarm::new(&TRIPLES);
    // Node 3 checks node 2; it lies every time.
    swarm.nodes.get_mut(&node(3)).unwrap().corrupt = Some((0, 1.0, 1));
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[9, 8, 7], 20)).unwrap();
    drive_watching(&mut swarm, &mut s, JobId([1; 16]), &expected);
    let v = s.view(&JobId([1; 16])).unwrap();
    assert_eq!(v.tokens, expected);
    assert!(s.ledger().is_excluded(&node(3), None));
    assert!(!s.ledger().is_excluded(&node(2), None));
    assert_eq!(s.ledger().record(&node(2)).invalid, 0);
    assert_eq!(s.verify_stats().decided, 1);
}

#[test]
fn with_no_referee_both_sides_leave_the_job_and_nothing_wrong_is_released() {
    let spans = [(1, 0, 10), (2, 10, 20), (3, 10, 20), (4, 20, 30)];
    let expected = honest(&spans, &[1, 2, 3], 20);
    let mut swarm = Swarm::new(&spans);
    swarm.nodes.get_mut(&node(2)).unwrap().corrupt = Some((3, 1.0, 1));
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[1, 2, 3], 20)).unwrap();
    drive_watching(&mut swarm, &mut s, JobId([1; 16]), &expected);
    let v = s.view(&JobId([1; 16])).unwrap();
    let JobStatus::Failed { code, message } = &v.status else {
        panic!("{:?}", v.status)
    };
    assert_eq!(*code, ErrorCode::NO_ROUTE);
    assert!(message.contains("failed verification"), "{message}");
    assert_eq!(v.tokens, expected[..3], "released up to the disputed step");
    assert_eq!(s.verify_stats().undecided, 1);
    assert!(
        !s.ledger().is_excluded(&node(2), None),
        "no majority, no exclusion"
    );
}

#[test]
fn nodes_holding_larger_spans_check_and_referee_a_hop() {
    // The chain is 1, 2, 3; no other node holds exactly 10..20, but 50
    // (all layers) and 60 (10..30) hold it within theirs. Node 2 lies.
    let spans = [
        (1, 0, 10),
        (2, 10, 20),
        (3, 20, 30),
        (50, 0, 30),
        (60, 10, 30),
    ];
    let expected = honest(&spans, &[4, 5, 6], 20);
    let mut swarm = Swarm::new(&spans);
    swarm.nodes.get_mut(&node(2)).unwrap().corrupt = Some((3, 1.0, 1));
    let mut s = swarm.scheduler(SchedulerConfig::default());
    s.submit(UnixMillis(0), job(1, 1, &[4, 5, 6], 20)).unwrap();
    drive_watching(&mut swarm, &mut s, JobId([1; 16]), &expected);
    let v = s.view(&JobId([1; 16])).unwrap();
    assert_eq!(v.tokens, expected);
    let stats = s.verify_stats();
    assert!(s.ledger().is_excluded(&node(2), None), "{stats:?}");
    assert!(stats.decided >= 1 && stats.undecided == 0, "{stats:?}");
    // Only samples pending on the chain the rollback retired went unchecked.
    assert!(stats.unverifiable <= stats.rollbacks * 3, "{stats:?}");
    assert!(swarm.nodes[&node(50)].units + swarm.nodes[&node(60)].units > 0);
}

#[test]
fn a_liar_out_of_a_referees_reach_is_excluded_after_disagreeing_with_two_operators() {
    // Nodes 3 and 5 both hold 10..20, but never at the same time: no dispute
    // of node 2's ever finds a referee.
    let spans = [
        (1, 0, 10),
        (2, 10, 20),
        (3, 10, 20),
        (5, 10, 20),
        (4, 20, 30),
    ];
    let mut swarm = Swarm::new(&spans);
    swarm.nodes.get_mut(&node(2)).unwrap().corrupt = Some((3, 1.0, 1));
    let mut s = swarm.scheduler(SchedulerConfig::default());
    let all = swarm.offers();
    let without = |gone: u8| -> Vec<SpanOffer> {
        all.iter()
            .filter(|o| o.node != node(gone))
            .cloned()
            .collect()
    };
    let (without_5, without_3) = (without(5), without(3));
    s.set_offers(MODEL, 30, 256, without_5);
    s.submit(UnixMillis(0), job(1, 1, &[1, 2, 3], 20)).unwrap();
    swarm.drive(&mut s, 100_000);
    assert_eq!(s.verify_stats().undecided, 1);
    assert!(!s.ledger().is_excluded(&node(2), None), "one disagreement");
    assert!(!s.ledger().is_excluded(&node(3), None));

    s.set_offers(MODEL, 30, 256, without_3);
    s.submit(UnixMillis(0), job(2, 1, &[1, 2, 3], 20)).unwrap();
    swarm.drive(&mut s, 100_000);
    assert_eq!(s.verify_stats().undecided, 2);
    assert!(
        s.ledger().is_excluded(&node(2), None),
        "disagreed with two operators: the odd one out"
    );
    assert!(!s.ledger().is_excluded(&node(3), None));
    assert!(!s.ledger().is_excluded(&node(5), None));

    // The same history with the rule off excludes nobody.
    let mut swarm = Swarm::new(&spans);
    swarm.nodes.get_mut(&node(2)).unwrap().corrupt = Some((3, 1.0, 1));
    let mut s = swarm.scheduler(SchedulerConfig {
        verify: VerifyConfig {
            undecided_limit: 0,
            ..VerifyConfig::default()
        },
        ..SchedulerConfig::default()
    });
    for (i, offers) in [(1, without(5)), (2, without(3))] {
        s.set_offers(MODEL, 30, 256, offers);
        s.submit(UnixMillis(0), job(i, 1, &[1, 2, 3], 20)).unwrap();
        swarm.drive(&mut s, 100_000);
    }
    assert_eq!(s.verify_stats().undecided, 2);
    assert!(!s.ledger().is_excluded(&node(2), None));
}

#[test]
fn a_node_caught_after_probation_has_its_unchecked_work_redone_in_every_running_job() {
    let prompts: [&[u32]; 3] = [&[4, 4, 2], &[7, 1], &[3, 3, 3, 3]];
    let expected: Vec<Vec<u32>> = prompts.iter().map(|p| honest(&TRIPLES, p, 40)).collect();
    let mut swarm = Swarm::new(&TRIPLES);
    // Honest long enough to leave probation, then always wrong.
    swarm.nodes.get_mut(&node(2)).unwrap().corrupt = Some((30, 1.0, 1));
    let config = SchedulerConfig {
        verify: VerifyConfig {
            p_min: 0.2,
            compare_replays: false,
            ..VerifyConfig::default()
        },
        ..SchedulerConfig::default()
    };
    let mut s = swarm.scheduler(config);
    let ids: Vec<JobId> = (1..=3).map(|i| JobId([i; 16])).collect();
    for (i, p) in prompts.iter().enumerate() {
        s.submit(UnixMillis(0), job(i as u8 + 1, 1, p, 40)).unwrap();
    }
    let mut running_at_exclusion = None;
    for _ in 0..200_000 {
        swarm.now += 1;
        match s.poll_output() {
            Some(Output::Send {
                ticket, node, unit, ..
            }) => {
                let r = swarm.execute(node, &unit);
                s.handle_result(UnixMillis(swarm.now), ticket, r);
            }
            Some(_) => {}
            None => break,
        }
        if running_at_exclusion.is_none() && s.ledger().is_excluded(&node(2), None) {
            let running: Vec<usize> = (0..3)
                .filter(|&i| !s.view(&ids[i]).unwrap().status.is_terminal())
                .collect();
            running_at_exclusion = Some(running);
        }
    }
    // Past probation its lies slip through at p = max(0.2, 1/streak) until
    // one is sampled; then every job still running goes back and ends honest.
    let running = running_at_exclusion.expect("caught");
    assert!(!running.is_empty());
    for i in running {
        let v = s.view(&ids[i]).unwrap();
        assert_eq!(v.tokens, expected[i], "job {}: {:?}", i + 1, v.status);
    }
    assert!(s.verify_stats().rollbacks >= 1);
    let revised: u32 = ids.iter().map(|id| s.view(id).unwrap().revisions).sum();
    assert!(revised >= 1, "released lies were taken back");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whichever node corrupts, however often: with every result checked, the
    /// submitter only ever sees honest tokens, and the job ends with the
    /// honest text.
    #[test]
    fn checked_jobs_only_ever_release_honest_tokens(
        liar in prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9]),
        honest_units in 0u32..20,
        f in 0.05f64..1.0,
        seed in any::<u64>(),
        prompt in proptest::collection::vec(1u32..VOCAB, 1..8),
    ) {
        let expected = honest(&TRIPLES, &prompt, 24);
        let mut swarm = Swarm::new(&TRIPLES);
        swarm.nodes.get_mut(&node(liar)).unwrap().corrupt = Some((honest_units, f, seed));
        let mut s = swarm.scheduler(always_checked());
        s.submit(UnixMillis(0), job(1, 1, &prompt, 24)).unwrap();
        drive_watching(&mut swarm, &mut s, JobId([1; 16]), &expected);
        let v = s.view(&JobId([1; 16])).unwrap();
        prop_assert!(matches!(v.status, JobStatus::Length | JobStatus::Stopped), "{:?}", v.status);
        prop_assert_eq!(&v.tokens, &expected);
        prop_assert_eq!(v.revisions, 0);
        let stats = s.verify_stats();
        if stats.mismatches > 0 {
            prop_assert!(s.ledger().is_excluded(&node(liar), None), "{stats:?}");
        }
        for n in 1..=9u8 {
            if n != liar {
                prop_assert!(!s.ledger().is_excluded(&node(n), None));
            }
        }
    }
}
