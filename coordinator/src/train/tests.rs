//! Training rounds against stand-in nodes: every state, then properties over
//! random deaths, failures and late answers.

use super::*;
use commons_protocol::Hash;
use proptest::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

fn node(n: u8) -> NodeId {
    NodeId([n; 32])
}

fn params(round: u64) -> ParamsRef {
    let mut root = [0u8; 32];
    root[..8].copy_from_slice(&round.to_le_bytes());
    let mut checkpoint = root;
    checkpoint[31] = 1;
    ParamsRef {
        root: Hash(root),
        checkpoint: Hash(checkpoint),
    }
}

fn config(rounds: u64, shares: u32) -> TrainConfig {
    TrainConfig {
        mode: Mode::Sync,
        rounds,
        shares_per_round: shares,
        share_timeout_ms: 1_000,
        max_in_flight_per_node: 1,
        bench_ms: 5_000,
        persist_every: 1,
    }
}

/// Result payloads name what they answer, so the aggregate can be checked.
type Payload = (u64, u32, Ticket);

#[derive(Debug, Clone, PartialEq)]
struct Sent {
    ticket: Ticket,
    node: NodeId,
    round: u64,
    share: u32,
    deadline: UnixMillis,
    attempt: u32,
}

fn drain(t: &mut Training<Payload>) -> Vec<Output<Payload>> {
    std::iter::from_fn(|| t.poll_output()).collect()
}

fn sends(outputs: &[Output<Payload>]) -> Vec<Sent> {
    outputs
        .iter()
        .filter_map(|o| match *o {
            Output::Send {
                ticket,
                node,
                round,
                share,
                deadline,
                attempt,
                ..
            } => Some(Sent {
                ticket,
                node,
                round,
                share,
                deadline,
                attempt,
            }),
            _ => None,
        })
        .collect()
}

fn answer(t: &mut Training<Payload>, now: u64, s: &Sent) -> Taken {
    t.handle_result(UnixMillis(now), s.ticket, (s.round, s.share, s.ticket))
}

fn t0() -> UnixMillis {
    UnixMillis(1_000)
}

#[test]
fn without_nodes_a_round_waits_and_sends_nothing() {
    let mut t = Training::<Payload>::new(config(2, 3), params(0), t0()).unwrap();
    assert_eq!(t.phase(), Phase::Computing { round: 0 });
    assert!(drain(&mut t).is_empty());
    t.tick(UnixMillis(1_000_000));
    assert!(drain(&mut t).is_empty());
    assert_eq!(t.next_wakeup(), None);
    assert_eq!(t.nodes(), 0);
}

#[test]
fn shares_spread_over_nodes_and_aggregate_in_share_order() {
    let mut t = Training::new(config(2, 3), params(0), t0()).unwrap();
    t.set_nodes(t0(), [node(3), node(1), node(2)]);
    let out = drain(&mut t);
    let s = sends(&out);
    assert_eq!(s.len(), 3);
    // One share each, in node order, deadline after the timeout.
    assert_eq!(
        s.iter().map(|x| (x.share, x.node)).collect::<Vec<_>>(),
        vec![(0, node(1)), (1, node(2)), (2, node(3))]
    );
    assert!(
        s.iter()
            .all(|x| x.deadline == UnixMillis(2_000) && x.attempt == 1)
    );
    assert!(out.iter().all(|o| match o {
        Output::Send { params: p, .. } => *p == params(0),
        _ => true,
    }));
    assert_eq!(t.in_flight(), 3);
    assert_eq!(t.next_wakeup(), Some(UnixMillis(2_000)));

    // Answers out of order; the aggregate comes after the last, in share order.
    assert_eq!(answer(&mut t, 1_100, &s[2]), Taken::Accepted);
    assert_eq!(answer(&mut t, 1_200, &s[0]), Taken::Accepted);
    assert!(drain(&mut t).is_empty());
    assert_eq!(t.shares_done(), 2);
    assert_eq!(answer(&mut t, 1_300, &s[1]), Taken::Accepted);
    let out = drain(&mut t);
    let [
        Output::Aggregate {
            round: 0,
            params: p,
            results,
        },
    ] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(*p, params(0));
    assert_eq!(
        results.iter().map(|r| r.share).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(results[1].node, node(2));
    assert_eq!(results[1].result, (0, 1, s[1].ticket));
    assert_eq!(t.phase(), Phase::Aggregating { round: 0 });

    // Nothing is sent while aggregating, whatever happens.
    t.tick(UnixMillis(10_000));
    t.set_nodes(UnixMillis(10_000), [node(1), node(2), node(3), node(4)]);
    assert!(drain(&mut t).is_empty());

    t.handle_aggregated(UnixMillis(10_100), 0, params(1))
        .unwrap();
    let out = drain(&mut t);
    assert_eq!(
        out[0],
        Output::Persist(Snapshot {
            round: 1,
            params: params(1)
        })
    );
    let s = sends(&out);
    assert_eq!(s.len(), 3);
    assert!(s.iter().all(|x| x.round == 1));
    assert!(out.iter().all(|o| match o {
        Output::Send { params: p, .. } => *p == params(1),
        _ => true,
    }));
    for x in &s {
        answer(&mut t, 10_200, x);
    }
    assert!(matches!(
        drain(&mut t)[..],
        [Output::Aggregate { round: 1, .. }]
    ));
    t.handle_aggregated(UnixMillis(10_300), 1, params(2))
        .unwrap();
    assert_eq!(
        drain(&mut t),
        vec![
            Output::Persist(Snapshot {
                round: 2,
                params: params(2)
            }),
            Output::Finished {
                rounds: 2,
                params: params(2)
            }
        ]
    );
    assert_eq!(t.phase(), Phase::Finished);
    assert_eq!(t.params(), params(2));
    let h: Vec<_> = t.history().copied().collect();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (h[0].params, h[0].next, h[0].sends),
        (params(0), params(1), 3)
    );
    assert_eq!(h[1].started_at, UnixMillis(10_100));
    assert_eq!(h[1].computed_at, UnixMillis(10_200));
    assert_eq!(t.stats().accepted, 6);
    assert_eq!(t.stats().sent, 6);
}

#[test]
fn a_failed_share_goes_to_another_node_and_the_node_is_benched() {
    let mut t = Training::new(config(1, 2), params(0), t0()).unwrap();
    t.set_nodes(t0(), [node(1), node(2), node(3)]);
    let s = sends(&drain(&mut t));
    assert_eq!(s.len(), 2);
    assert!(t.handle_failure(UnixMillis(1_050), s[0].ticket, "connection closed"));
    let out = drain(&mut t);
    assert_eq!(
        out[0],
        Output::Reassign {
            round: 0,
            share: 0,
            node: node(1),
            reason: Lost::Failed("connection closed".into())
        }
    );
    let again = sends(&out);
    // Node 3 is the only one free; node 1 is benched.
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].share, again[0].node, again[0].attempt),
        (0, node(3), 2)
    );
    // The failed ticket is no longer wanted.
    assert!(!t.handle_failure(UnixMillis(1_060), s[0].ticket, "again"));
    assert_eq!(answer(&mut t, 1_070, &s[0]), Taken::Dropped);
    // Node 2 frees up, but there is nothing pending; node 1 stays benched.
    answer(&mut t, 1_100, &s[1]);
    assert!(drain(&mut t).is_empty());
    assert_eq!(t.stats().failures, 1);
    assert_eq!(t.stats().reassigned, 1);
    answer(&mut t, 1_200, &again[0]);
    let out = drain(&mut t);
    let [Output::Aggregate { results, .. }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(results[0].node, node(3));
}

#[test]
fn a_benched_node_gets_work_again_once_its_bench_ends() {
    let mut t = Training::new(config(1, 1), params(0), t0()).unwrap();
    t.set_nodes(t0(), [node(1)]);
    let s = sends(&drain(&mut t));
    t.handle_failure(UnixMillis(1_100), s[0].ticket, "refused");
    let out = drain(&mut t);
    assert!(sends(&out).is_empty(), "the only node is benched: {out:?}");
    assert_eq!(t.next_wakeup(), Some(UnixMillis(6_100)));
    t.tick(UnixMillis(6_099));
    assert!(sends(&drain(&mut t)).is_empty());
    t.tick(UnixMillis(6_100));
    let again = sends(&drain(&mut t));
    assert_eq!((again[0].node, again[0].attempt), (node(1), 2));
}

#[test]
fn a_missed_deadline_resends_and_a_late_answer_that_comes_first_is_kept() {
    let mut t = Training::new(config(1, 1), params(0), t0()).unwrap();
    t.set_nodes(t0(), [node(1), node(2)]);
    let first = sends(&drain(&mut t));
    assert_eq!(first[0].node, node(1));
    t.tick(UnixMillis(1_999));
    assert!(drain(&mut t).is_empty());
    t.tick(UnixMillis(2_000));
    let out = drain(&mut t);
    assert_eq!(
        out[0],
        Output::Reassign {
            round: 0,
            share: 0,
            node: node(1),
            reason: Lost::Deadline
        }
    );
    let second = sends(&out);
    assert_eq!((second[0].node, second[0].attempt), (node(2), 2));
    assert_eq!(t.in_flight(), 1);
    // The slow node answers before the second: its answer is kept, the copy dropped.
    assert_eq!(answer(&mut t, 2_500, &first[0]), Taken::Late);
    let out = drain(&mut t);
    let [Output::Aggregate { results, .. }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (results[0].node, results[0].ticket),
        (node(1), first[0].ticket)
    );
    assert_eq!(answer(&mut t, 2_600, &second[0]), Taken::Dropped);
    let stats = t.stats();
    assert_eq!((stats.late, stats.dropped, stats.deadlines), (1, 1, 1));
}

#[test]
fn a_late_answer_after_the_resend_answered_is_dropped() {
    let mut t = Training::new(config(2, 1), params(0), t0()).unwrap();
    t.set_nodes(t0(), [node(1), node(2)]);
    let first = sends(&drain(&mut t));
    t.tick(UnixMillis(2_000));
    let second = sends(&drain(&mut t));
    assert_eq!(answer(&mut t, 2_100, &second[0]), Taken::Accepted);
    assert!(matches!(drain(&mut t)[..], [Output::Aggregate { .. }]));
    assert_eq!(answer(&mut t, 2_200, &first[0]), Taken::Dropped);
    // Or in the next round: still dropped, the new round is untouched.
    t.handle_aggregated(UnixMillis(2_300), 0, params(1))
        .unwrap();
    let next = sends(&drain(&mut t));
    assert_eq!(next.len(), 1);
    assert_eq!(answer(&mut t, 2_400, &first[0]), Taken::Dropped);
    assert_eq!(t.shares_done(), 0);
}

#[test]
fn a_node_that_leaves_loses_its_share_and_one_that_joins_takes_pending_work() {
    let mut t = Training::new(config(1, 3), params(0), t0()).unwrap();
    t.set_nodes(t0(), [node(1), node(2)]);
    let s = sends(&drain(&mut t));
    assert_eq!(s.len(), 2, "one share each, one pending");
    t.set_nodes(UnixMillis(1_100), [node(2)]);
    let out = drain(&mut t);
    assert_eq!(
        out,
        vec![Output::Reassign {
            round: 0,
            share: 0,
            node: node(1),
            reason: Lost::Left
        }]
    );
    // A newcomer takes a pending share at once.
    t.set_nodes(UnixMillis(1_200), [node(2), node(9)]);
    let joined = sends(&drain(&mut t));
    assert_eq!(
        joined.iter().map(|x| (x.share, x.node)).collect::<Vec<_>>(),
        vec![(0, node(9))]
    );
    answer(&mut t, 1_300, &s[1]);
    let next = sends(&drain(&mut t));
    assert_eq!((next[0].share, next[0].node), (2, node(2)));
    // The departed node's answer is not wanted.
    assert_eq!(answer(&mut t, 1_400, &s[0]), Taken::Dropped);
    answer(&mut t, 1_500, &joined[0]);
    answer(&mut t, 1_600, &next[0]);
    let out = drain(&mut t);
    let [Output::Aggregate { results, .. }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        results.iter().map(|r| r.node).collect::<Vec<_>>(),
        vec![node(9), node(2), node(2)]
    );
}

#[test]
fn a_node_holds_at_most_its_share_of_work_at_once() {
    let mut c = config(1, 5);
    c.max_in_flight_per_node = 2;
    let mut t = Training::new(c, params(0), t0()).unwrap();
    t.set_nodes(t0(), [node(1)]);
    let s = sends(&drain(&mut t));
    assert_eq!(s.iter().map(|x| x.share).collect::<Vec<_>>(), vec![0, 1]);
    answer(&mut t, 1_100, &s[1]);
    let s2 = sends(&drain(&mut t));
    assert_eq!(s2.iter().map(|x| x.share).collect::<Vec<_>>(), vec![2]);
    assert_eq!(t.in_flight(), 2);
}

#[test]
fn snapshots_follow_their_period_and_a_run_resumes_from_one() {
    let mut c = config(5, 1);
    c.persist_every = 2;
    let mut t = Training::new(c.clone(), params(0), t0()).unwrap();
    t.set_nodes(t0(), [node(1)]);
    let mut persisted = Vec::new();
    for round in 0..3 {
        let s = sends(&drain(&mut t));
        answer(&mut t, 1_000 + round, &s[0]);
        drain(&mut t);
        t.handle_aggregated(UnixMillis(1_000 + round), round, params(round + 1))
            .unwrap();
        let out = drain(&mut t);
        persisted.extend(out.iter().filter_map(|o| match o {
            Output::Persist(s) => Some(*s),
            _ => None,
        }));
        // Put the round's sends back for the next iteration.
        for o in out {
            if let Output::Send { .. } = o {
                t.outputs.push_front(o);
            }
        }
    }
    assert_eq!(
        persisted,
        vec![Snapshot {
            round: 2,
            params: params(2)
        }]
    );
    assert_eq!(t.snapshot().round, 3);

    // A restart from the snapshot runs round 2 at its parameters.
    let mut r = Training::<Payload>::resume(c.clone(), persisted[0], UnixMillis(9_000)).unwrap();
    assert_eq!(r.phase(), Phase::Computing { round: 2 });
    r.set_nodes(UnixMillis(9_000), [node(7)]);
    let out = drain(&mut r);
    assert!(matches!(
        out[..],
        [Output::Send { round: 2, share: 0, params: p, .. }] if p == params(2)
    ));
    // A snapshot at the end is a finished run.
    let mut done = Training::<Payload>::resume(
        c,
        Snapshot {
            round: 5,
            params: params(5),
        },
        UnixMillis(9_000),
    )
    .unwrap();
    assert_eq!(done.phase(), Phase::Finished);
    assert_eq!(
        drain(&mut done),
        vec![Output::Finished {
            rounds: 5,
            params: params(5)
        }]
    );
}

#[test]
fn aggregation_is_refused_for_a_round_not_waiting_for_it() {
    let mut t = Training::<Payload>::new(config(2, 1), params(0), t0()).unwrap();
    assert_eq!(
        t.handle_aggregated(t0(), 0, params(1)),
        Err(TrainError::NotAggregating {
            round: 0,
            phase: Phase::Computing { round: 0 }
        })
    );
    t.set_nodes(t0(), [node(1)]);
    let s = sends(&drain(&mut t));
    answer(&mut t, 1_100, &s[0]);
    drain(&mut t);
    assert!(t.handle_aggregated(t0(), 1, params(1)).is_err());
    assert_eq!(t.phase(), Phase::Aggregating { round: 0 });
    t.handle_aggregated(t0(), 0, params(1)).unwrap();
    assert!(t.handle_aggregated(t0(), 0, params(1)).is_err());
}

#[test]
fn configurations_that_cannot_work_are_refused() {
    let bad = [
        TrainConfig {
            rounds: 0,
            ..config(1, 1)
        },
        TrainConfig {
            shares_per_round: 0,
            ..config(1, 1)
        },
        TrainConfig {
            share_timeout_ms: 0,
            ..config(1, 1)
        },
        TrainConfig {
            max_in_flight_per_node: 0,
            ..config(1, 1)
        },
        TrainConfig {
            persist_every: 0,
            ..config(1, 1)
        },
        TrainConfig {
            mode: Mode::Diloco { inner_steps: 0 },
            ..config(1, 1)
        },
    ];
    for c in bad {
        assert!(
            matches!(
                Training::<Payload>::new(c.clone(), params(0), t0()),
                Err(TrainError::Config { .. })
            ),
            "{c:?}"
        );
    }
    let diloco = TrainConfig {
        mode: Mode::Diloco { inner_steps: 8 },
        ..config(1, 1)
    };
    assert!(Training::<Payload>::new(diloco, params(0), t0()).is_ok());
}

/// splitmix64: the harness's own randomness, from the case's seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The node answers the ticket (with a result or a failure).
    Answer { ticket: Ticket, node: u8, ok: bool },
    /// The node dies: it never answers again.
    Kill { node: u8 },
    /// The caller notices a death (the node leaves the set).
    Forget { node: u8 },
    /// A node joins.
    Join { node: u8 },
}

#[derive(Debug, Clone)]
struct Scenario {
    nodes: u8,
    shares: u32,
    rounds: u64,
    in_flight: u32,
    /// Probability that a live node fails a share.
    fail: f64,
    /// Probability that a live node answers after the deadline.
    late: f64,
    /// Kills: (time, node); the survivor is never killed.
    kills: Vec<(u64, u8)>,
    /// Late joiners: (time, node id past the first ones).
    joins: Vec<(u64, u8)>,
    seed: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        1u8..=5,
        1u32..=6,
        1u64..=4,
        1u32..=2,
        0.0..0.3f64,
        0.0..0.3f64,
    )
        .prop_flat_map(|(nodes, shares, rounds, in_flight, fail, late)| {
            (
                Just((nodes, shares, rounds, in_flight, fail, late)),
                proptest::collection::vec((0u64..8_000, 0..nodes), 0..=usize::from(nodes)),
                proptest::collection::vec(0u64..8_000, 0..3),
                0..nodes,
                any::<u64>(),
            )
        })
        .prop_map(
            |((nodes, shares, rounds, in_flight, fail, late), kills, joins, survivor, seed)| {
                Scenario {
                    nodes,
                    shares,
                    rounds,
                    in_flight,
                    fail,
                    late,
                    kills: kills.into_iter().filter(|&(_, n)| n != survivor).collect(),
                    joins: joins
                        .into_iter()
                        .enumerate()
                        .map(|(i, t)| (t, 100 + i as u8))
                        .collect(),
                    seed,
                }
            },
        )
}

/// What a run looked like from outside.
#[derive(Debug, Default)]
struct Outcome {
    /// Aggregated rounds, in order, with the shares of each.
    rounds: Vec<(u64, Vec<ShareResult<Payload>>)>,
    finished: Option<(u64, ParamsRef)>,
    persisted: Vec<Snapshot>,
    reassigned: usize,
    late: usize,
    dropped: usize,
    events: usize,
}

/// Runs a scenario to its end: a discrete-event stand-in for the swarm.
fn run(s: &Scenario) -> Outcome {
    let timeout = 1_000;
    let c = TrainConfig {
        rounds: s.rounds,
        shares_per_round: s.shares,
        max_in_flight_per_node: s.in_flight,
        share_timeout_ms: timeout,
        bench_ms: 700,
        ..config(1, 1)
    };
    let mut rng = Rng(s.seed);
    let mut t = Training::<Payload>::new(c, params(0), UnixMillis(0)).unwrap();
    let mut members: BTreeSet<u8> = (0..s.nodes).collect();
    let mut dead = BTreeSet::new();
    let mut queue: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BinaryHeap<_>, at: u64, e: Event| {
        seq += 1;
        queue.push(Reverse((at, seq, e)));
    };
    for &(at, n) in &s.kills {
        push(&mut queue, at, Event::Kill { node: n });
    }
    for &(at, n) in &s.joins {
        push(&mut queue, at, Event::Join { node: n });
    }
    let mut sent: BTreeMap<Ticket, (u64, u32)> = BTreeMap::new();
    let mut out = Outcome::default();
    let mut now = 0u64;
    t.set_nodes(UnixMillis(now), members.iter().map(|&n| node(n)));
    loop {
        while let Some(o) = t.poll_output() {
            match o {
                Output::Send {
                    ticket,
                    node: to,
                    round,
                    share,
                    deadline,
                    ..
                } => {
                    assert!(deadline.0 == now + timeout);
                    assert!(
                        sent.insert(ticket, (round, share)).is_none(),
                        "tickets are unique"
                    );
                    let n = to.0[0];
                    if dead.contains(&n) {
                        // A dead peer: refused at once, or silence.
                        if rng.chance(0.5) {
                            push(
                                &mut queue,
                                now + 1,
                                Event::Answer {
                                    ticket,
                                    node: n,
                                    ok: false,
                                },
                            );
                        }
                        continue;
                    }
                    let ok = !rng.chance(s.fail);
                    let delay = if rng.chance(s.late) {
                        timeout + 1 + rng.below(2 * timeout)
                    } else {
                        1 + rng.below(timeout - 1)
                    };
                    push(
                        &mut queue,
                        now + delay,
                        Event::Answer {
                            ticket,
                            node: n,
                            ok,
                        },
                    );
                }
                Output::Aggregate { round, results, .. } => {
                    out.rounds.push((round, results));
                    t.handle_aggregated(UnixMillis(now), round, params(round + 1))
                        .unwrap();
                }
                Output::Persist(snapshot) => out.persisted.push(snapshot),
                Output::Finished { rounds, params } => out.finished = Some((rounds, params)),
                Output::Reassign { .. } => out.reassigned += 1,
                Output::Excluded { .. } | Output::Undecided { .. } => {
                    panic!("no checks in this run")
                }
            }
        }
        if out.finished.is_some() {
            return out;
        }
        out.events += 1;
        assert!(out.events < 100_000, "the run does not end: {s:?}");
        // The next event, or the next deadline if it comes first.
        let wake = t.next_wakeup().map(|w| w.0);
        let next = queue.peek().map(|Reverse((at, _, _))| *at);
        match (next, wake) {
            (Some(at), w) if w.is_none_or(|w| at <= w) => {
                let Some(Reverse((at, _, event))) = queue.pop() else {
                    unreachable!()
                };
                now = now.max(at);
                match event {
                    Event::Answer {
                        ticket,
                        node: n,
                        ok,
                    } => {
                        if dead.contains(&n) {
                            continue;
                        }
                        if ok {
                            let (round, share) = sent[&ticket];
                            match t.handle_result(UnixMillis(now), ticket, (round, share, ticket)) {
                                Taken::Late => out.late += 1,
                                Taken::Dropped => out.dropped += 1,
                                Taken::Accepted => {}
                                Taken::Checking | Taken::Rejected => {
                                    panic!("no checks in this run")
                                }
                            }
                        } else {
                            t.handle_failure(UnixMillis(now), ticket, "refused");
                        }
                    }
                    Event::Kill { node: n } => {
                        dead.insert(n);
                        // The caller notices some time later, or never.
                        if rng.chance(0.7) {
                            let after = rng.below(3 * timeout);
                            push(&mut queue, now + after, Event::Forget { node: n });
                        }
                    }
                    Event::Forget { node: n } => {
                        members.remove(&n);
                        t.set_nodes(UnixMillis(now), members.iter().map(|&m| node(m)));
                    }
                    Event::Join { node: n } => {
                        members.insert(n);
                        t.set_nodes(UnixMillis(now), members.iter().map(|&m| node(m)));
                    }
                }
                t.tick(UnixMillis(now));
            }
            (_, Some(w)) => {
                now = now.max(w);
                t.tick(UnixMillis(now));
            }
            (None, None) => panic!("nothing left to happen and the run is not done: {s:?}"),
            (Some(_), None) => unreachable!(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever dies, fails or answers late, every round is aggregated once,
    /// in order, with every share exactly once, each from a ticket sent for
    /// that very round and share; and the run finishes.
    #[test]
    fn every_share_of_every_round_is_aggregated_exactly_once(s in scenario()) {
        let out = run(&s);
        prop_assert_eq!(out.finished, Some((s.rounds, params(s.rounds))));
        prop_assert_eq!(out.rounds.len() as u64, s.rounds);
        for (i, (round, results)) in out.rounds.iter().enumerate() {
            prop_assert_eq!(*round, i as u64);
            prop_assert_eq!(results.len() as u32, s.shares);
            for (j, r) in results.iter().enumerate() {
                prop_assert_eq!(r.share, j as u32);
                prop_assert_eq!(r.result, (*round, j as u32, r.ticket));
            }
        }
        prop_assert_eq!(
            out.persisted.last().copied(),
            Some(Snapshot { round: s.rounds, params: params(s.rounds) })
        );
    }

    /// The same inputs give the same run.
    #[test]
    fn runs_are_deterministic(s in scenario()) {
        let (a, b) = (run(&s), run(&s));
        prop_assert_eq!(a.events, b.events);
        prop_assert_eq!(a.rounds, b.rounds);
    }
}

#[test]
fn rounds_complete_with_every_node_but_one_killed_mid_round() {
    for survivor in 0..3u8 {
        for at in [0, 1, 250, 999, 1_000, 1_001, 2_500] {
            let s = Scenario {
                nodes: 3,
                shares: 4,
                rounds: 3,
                in_flight: 1,
                fail: 0.0,
                late: 0.0,
                kills: (0..3).filter(|&n| n != survivor).map(|n| (at, n)).collect(),
                joins: Vec::new(),
                seed: u64::from(survivor) * 1_000 + at,
            };
            let out = run(&s);
            assert_eq!(out.rounds.len(), 3, "{s:?}");
            if at == 0 {
                // Killed holding their first shares: those went elsewhere,
                // and the survivor computed everything.
                assert!(out.reassigned >= 2, "{s:?}: {}", out.reassigned);
                assert!(
                    out.rounds
                        .iter()
                        .flat_map(|(_, r)| r)
                        .all(|r| r.node == node(survivor)),
                    "{s:?}"
                );
            }
        }
    }
}

#[test]
fn the_harness_exercises_deaths_failures_and_late_answers() {
    let (mut reassigned, mut late, mut dropped) = (0, 0, 0);
    for seed in 0..200 {
        let out = run(&Scenario {
            nodes: 4,
            shares: 5,
            rounds: 3,
            in_flight: 1,
            fail: 0.1,
            late: 0.2,
            kills: vec![(seed * 17 % 3_000, 1), (seed * 31 % 5_000, 2)],
            joins: vec![(1_500, 100)],
            seed,
        });
        assert_eq!(out.rounds.len(), 3);
        reassigned += out.reassigned;
        late += out.late;
        dropped += out.dropped;
    }
    println!(
        "200 runs with deaths, failures and late answers: {reassigned} shares reassigned, \
         {late} late results kept, {dropped} answers dropped"
    );
    assert!(reassigned > 200, "{reassigned}");
    assert!(late > 20, "{late}");
    assert!(dropped > 20, "{dropped}");
}

// Spot checks.

/// How a stand-in node answers under checks.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Honest,
    /// Commits to a wrong digest with this probability.
    Lies(f64),
}

#[derive(Debug, Default)]
struct Checked {
    /// Every aggregated result: (round, share, node, honest).
    aggregated: Vec<(u64, u32, NodeId, bool)>,
    excluded: Vec<NodeId>,
    undecided: Vec<(u64, u32)>,
    finished: bool,
    stats: TrainStats,
}

/// The honest digest of a share, and a liar's.
fn digest(round: u64, share: u32, lie: Option<u8>) -> Hash {
    let liar = lie.map(|n| vec![n]).unwrap_or_default();
    Hash::of_parts(
        "test share digest",
        &[&round.to_le_bytes(), &share.to_le_bytes(), &liar],
    )
}

/// Runs `rounds` rounds of `shares` shares over `nodes` (all of one class,
/// each its own operator unless `operators` says otherwise), answering every
/// send in order at once; `joins` adds nodes when the run stalls.
fn run_checked(
    nodes: &[(u8, Behaviour)],
    operators: &[(u8, u8)],
    verify: VerifyConfig,
    rounds: u64,
    shares: u32,
    seed: u64,
    mut joins: Vec<(u8, Behaviour)>,
) -> Checked {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut t: Training<(u64, u32, bool)> = Training::new(config(rounds, shares), params(0), t0())
        .unwrap()
        .with_checks(Ledger::new(verify), None);
    let mut behaviour: BTreeMap<NodeId, Behaviour> =
        nodes.iter().map(|&(n, b)| (node(n), b)).collect();
    let class = commons_protocol::messages::DeterminismClass {
        kernel: "cpu-test".into(),
        build: "test".into(),
    };
    let profiles = |behaviour: &BTreeMap<NodeId, Behaviour>| {
        behaviour
            .keys()
            .map(|n| {
                let operator = operators
                    .iter()
                    .find(|(a, _)| node(*a) == *n)
                    .map_or(*n, |(_, o)| node(*o));
                (
                    *n,
                    crate::verify::Profile {
                        operator,
                        class: class.clone(),
                    },
                )
            })
            .collect()
    };
    t.ledger_mut().set_profiles(profiles(&behaviour));
    t.set_nodes(t0(), behaviour.keys().copied());
    let mut queue: VecDeque<(Ticket, NodeId, u64, u32)> = VecDeque::new();
    let mut out = Checked::default();
    for _ in 0..100_000 {
        while let Some(o) = t.poll_output() {
            match o {
                Output::Send {
                    ticket,
                    node,
                    round,
                    share,
                    ..
                } => queue.push_back((ticket, node, round, share)),
                Output::Aggregate { round, results, .. } => {
                    for r in results {
                        out.aggregated.push((round, r.share, r.node, r.result.2));
                    }
                    t.handle_aggregated(t0(), round, params(round + 1)).unwrap();
                }
                Output::Excluded { node, .. } => out.excluded.push(node),
                Output::Undecided { round, share, .. } => out.undecided.push((round, share)),
                Output::Finished { .. } => out.finished = true,
                Output::Persist(_) | Output::Reassign { .. } => {}
            }
        }
        if out.finished {
            break;
        }
        let Some((ticket, n, round, share)) = queue.pop_front() else {
            // Stalled: a node joins, or the run stops here.
            let Some((j, b)) = joins.pop() else { break };
            behaviour.insert(node(j), b);
            t.ledger_mut().set_profiles(profiles(&behaviour));
            t.set_nodes(t0(), behaviour.keys().copied());
            continue;
        };
        let lies = match behaviour[&n] {
            Behaviour::Honest => false,
            Behaviour::Lies(f) => rng.chance(f),
        };
        let d = digest(round, share, lies.then_some(n.0[0]));
        t.handle_checked(t0(), ticket, (round, share, !lies), d, rng.next());
    }
    out.stats = t.stats();
    out
}

fn always() -> VerifyConfig {
    VerifyConfig {
        probation: u32::MAX,
        ..VerifyConfig::default()
    }
}

#[test]
fn with_every_result_checked_no_lie_reaches_the_aggregate() {
    for seed in 0..20 {
        let nodes = [
            (1, Behaviour::Honest),
            (2, Behaviour::Lies(0.5)),
            (3, Behaviour::Honest),
            (4, Behaviour::Honest),
        ];
        let out = run_checked(&nodes, &[], always(), 6, 4, seed, Vec::new());
        assert!(out.finished, "seed {seed}: {out:?}");
        assert_eq!(out.aggregated.len(), 24);
        assert!(out.aggregated.iter().all(|a| a.3), "seed {seed}: {out:?}");
        // The liar is out as soon as a lie of its is seen; nobody else is.
        assert!(out.excluded.iter().all(|n| *n == node(2)), "{out:?}");
        assert!(out.excluded.len() <= 1);
        assert!(out.aggregated.iter().all(|a| a.2 != node(2) || a.3));
        assert!(out.stats.check_sends >= 24, "{:?}", out.stats);
    }
}

#[test]
fn adaptive_checks_exclude_a_liar_and_never_an_honest_node() {
    for seed in 0..20 {
        let nodes = [
            (1, Behaviour::Honest),
            (2, Behaviour::Honest),
            (3, Behaviour::Lies(1.0)),
            (4, Behaviour::Honest),
            (5, Behaviour::Honest),
        ];
        let out = run_checked(
            &nodes,
            &[],
            VerifyConfig::default(),
            30,
            5,
            seed,
            Vec::new(),
        );
        assert!(out.finished, "{out:?}");
        // On probation, its first result is checked: caught at once.
        assert_eq!(out.excluded, vec![node(3)], "seed {seed}");
        assert!(out.aggregated.iter().all(|a| a.3), "seed {seed}");
        assert!(out.aggregated.iter().all(|a| a.2 != node(3)));
        assert_eq!(out.stats.exclusions, 1);
        // Past probation, honest nodes are checked less than always.
        assert!(
            out.stats.sampled < out.aggregated.len() as u64,
            "{:?}",
            out.stats
        );
    }
}

#[test]
fn a_liar_past_probation_is_caught_and_its_unchecked_results_redone() {
    // Lies rarely: gets past probation, is then sampled with p_min.
    let verify = VerifyConfig {
        probation: 3,
        p_min: 0.3,
        ..VerifyConfig::default()
    };
    let mut caught = 0;
    let mut redone = 0;
    for seed in 0..40 {
        let nodes = [
            (1, Behaviour::Honest),
            (2, Behaviour::Honest),
            (3, Behaviour::Lies(0.2)),
        ];
        // More shares than nodes: the liar has several results in a round.
        let out = run_checked(&nodes, &[], verify.clone(), 40, 9, seed, Vec::new());
        assert!(out.finished);
        assert!(out.excluded.iter().all(|n| *n == node(3)), "{out:?}");
        caught += out.excluded.len();
        redone += out.stats.discarded;
        // Lies that got in came from the liar, unchecked, before it was caught.
        for a in out.aggregated.iter().filter(|a| !a.3) {
            assert_eq!(a.2, node(3));
        }
    }
    assert!(caught >= 35, "caught in {caught} of 40 runs");
    assert!(
        redone > 0,
        "no unchecked result of a caught liar was redone"
    );
}

#[test]
fn a_dispute_between_two_operators_waits_for_a_referee() {
    let nodes = [(1, Behaviour::Honest), (2, Behaviour::Lies(1.0))];
    let stalled = run_checked(&nodes, &[], always(), 2, 1, 1, Vec::new());
    assert!(!stalled.finished);
    assert_eq!(stalled.undecided, vec![(0, 0)]);
    assert!(stalled.aggregated.is_empty() && stalled.excluded.is_empty());
    // A third operator's node joins and referees.
    let out = run_checked(&nodes, &[], always(), 2, 1, 1, vec![(3, Behaviour::Honest)]);
    assert!(out.finished, "{out:?}");
    assert_eq!(out.excluded, vec![node(2)]);
    assert!(out.aggregated.iter().all(|a| a.3));
}

#[test]
fn without_another_operator_sampled_results_are_unverifiable() {
    // One node; then two nodes of one operator: neither checks the other.
    for (nodes, operators) in [
        (vec![(1, Behaviour::Honest)], vec![]),
        (
            vec![(1, Behaviour::Honest), (2, Behaviour::Honest)],
            vec![(2, 1)],
        ),
    ] {
        let out = run_checked(&nodes, &operators, always(), 3, 2, 0, Vec::new());
        assert!(out.finished);
        assert_eq!(out.stats.unverifiable, 6, "{:?}", out.stats);
        assert_eq!(out.stats.check_sends, 0);
    }
}
