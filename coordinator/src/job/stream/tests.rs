//! Streamed chains against a stand-in swarm that forwards outputs between
//! nodes and delivers every message after a random delay: the text equals
//! the one-unit-at-a-time run's whatever the order, when nodes die, and
//! when a node sends one thing down the chain and another to the coordinator.

use super::*;
use crate::verify::VerifyConfig;
use commons_protocol::messages::DeterminismClass;
use proptest::prelude::*;
use std::collections::{BinaryHeap, HashMap};

const MODEL: ModelId = ModelId(Hash([9; 32]));
const VOCAB: u32 = 50;
const STOP: u32 = 0;

fn node(n: u8) -> NodeId {
    NodeId([n; 32])
}

/// A stand-in executor whose outputs depend on the session's whole history;
/// it keeps the state after every position, so a session can be rewound.
struct FakeNode {
    layers: LayerRange,
    sessions: HashMap<SessionId, Vec<HashMap<u32, u64>>>,
    alive: bool,
    /// Dies when asked for this many more units.
    dies_after: Option<u32>,
    /// Sends a wrong output down the chain, the right one to the coordinator.
    equivocates: bool,
    /// Sends nothing down the chain.
    drops_forwards: bool,
    /// Per session, the (order, position) of every unit that arrived.
    marks: HashMap<SessionId, Vec<(u64, u32)>>,
}

/// Who waits for a forwarded output: the receiver, the sender and the link.
type Key = (NodeId, NodeId, u64);

/// A forwarded output and what its sender's result committed to as input.
type Sent = (Tensor, Option<Hash>);

/// What a fake result commits to: its output and its input, as a real one.
fn commit(output: &Tensor, input: Option<Hash>) -> Hash {
    let input = input.unwrap_or(Hash([0; 32]));
    Hash::of_parts("fake result", &[&output.digest().0, &input.0])
}

enum Event {
    Unit(Ticket, NodeId, Box<InferenceUnit>, UnixMillis),
    Forward(Key, Sent),
    Answer(Ticket, Result<StepResult, StepFailure>),
    /// A parked unit's wait ends.
    Expire(Key, Ticket),
}

struct Net {
    nodes: BTreeMap<NodeId, FakeNode>,
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    seq: u64,
    now: u64,
    rng: u64,
    parked: HashMap<Key, (Ticket, InferenceUnit)>,
    early: HashMap<Key, Sent>,
    /// Units run with a carried input at a position before the session's end.
    rewinds: u32,
    taken: u32,
}

impl Net {
    fn new(spans: &[(u8, u32, u32)], seed: u64) -> Self {
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
                        equivocates: false,
                        drops_forwards: false,
                        marks: HashMap::new(),
                    },
                )
            })
            .collect();
        Self {
            nodes,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            now: 1_000,
            rng: seed.wrapping_mul(6_364_136_223_846_793_005) | 1,
            parked: HashMap::new(),
            early: HashMap::new(),
            rewinds: 0,
            taken: 0,
        }
    }

    fn scheduler(&self, depth: usize) -> Scheduler {
        let config = SchedulerConfig {
            stream_depth: depth,
            verify: VerifyConfig {
                enabled: false,
                ..VerifyConfig::default()
            },
            ..SchedulerConfig::default()
        };
        let mut s = Scheduler::new(config, 7);
        let offers = self
            .nodes
            .iter()
            .map(|(id, n)| SpanOffer {
                node: *id,
                layers: n.layers,
                ms_per_layer: 1.0 + f64::from(id.0[0]) / 100.0,
                rtt_ms: 1.0,
                queue_ms: 0.0,
            })
            .collect();
        s.set_offers(MODEL, 30, 256, offers);
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

    /// A delay of 1 to 8 time units, from the seeded stream.
    fn delay(&mut self) -> u64 {
        self.rng = self
            .rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        1 + (self.rng >> 61)
    }

    fn at_later(&mut self, event: Event) {
        let when = self.now + self.delay();
        self.at(when, event);
    }

    fn at(&mut self, when: u64, event: Event) {
        self.seq += 1;
        self.queue.push(std::cmp::Reverse((when, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// A node dies: every unit it holds fails, as a closed connection does.
    fn kill(&mut self, n: NodeId) {
        if let Some(node) = self.nodes.get_mut(&n) {
            node.alive = false;
        }
        let held: Vec<Key> = self.parked.keys().filter(|k| k.0 == n).copied().collect();
        for k in held {
            if let Some((ticket, _)) = self.parked.remove(&k) {
                let e = Event::Answer(ticket, Err(StepFailure::Unreachable("closed".into())));
                self.at_later(e);
            }
        }
        self.early.retain(|k, _| k.0 != n);
    }

    /// Whether a unit issued later for the same or an earlier position of
    /// `unit`'s session has arrived at `to`.
    fn superseded(&self, to: NodeId, unit: &InferenceUnit) -> bool {
        self.nodes[&to].marks.get(&unit.session).is_some_and(|m| {
            m.iter()
                .any(|&(o, p)| o > unit.options.order && p <= unit.options.start_pos)
        })
    }

    fn refuse(&mut self, ticket: Ticket, code: ErrorCode) {
        let e = Event::Answer(
            ticket,
            Err(StepFailure::Refused {
                code,
                message: code.name().into(),
            }),
        );
        self.at_later(e);
    }

    fn on_unit(&mut self, ticket: Ticket, to: NodeId, unit: InferenceUnit, deadline: UnixMillis) {
        let n = self.nodes.get_mut(&to).expect("a known node");
        if let Some(k) = n.dies_after.as_mut() {
            if *k == 0 {
                self.kill(to);
            } else {
                *k -= 1;
            }
        }
        if !self.nodes[&to].alive {
            let e = Event::Answer(ticket, Err(StepFailure::Unreachable("closed".into())));
            self.at_later(e);
            return;
        }
        if self.superseded(to, &unit) {
            self.refuse(ticket, ErrorCode::SUPERSEDED);
            return;
        }
        if let Some(n) = self.nodes.get_mut(&to) {
            n.marks
                .entry(unit.session)
                .or_default()
                .push((unit.options.order, unit.options.start_pos));
        }
        match unit.options.input_from {
            None => {
                let input = unit.input.clone();
                self.run(ticket, to, &unit, &input, None);
            }
            Some(up) => {
                let key = (to, up.executor, up.link);
                match self.early.remove(&key) {
                    Some((input, its_input)) => {
                        let c = commit(&input, its_input);
                        self.run(ticket, to, &unit, &input, Some(c));
                    }
                    None => {
                        self.parked.insert(key, (ticket, unit));
                        // A node gives up a little before the unit's deadline.
                        let when = deadline.0.saturating_sub(1_000).max(self.now + 1);
                        self.at(when, Event::Expire(key, ticket));
                    }
                }
            }
        }
    }

    fn on_forward(&mut self, key: Key, (tensor, its_input): Sent) {
        if !self.nodes[&key.0].alive {
            return;
        }
        match self.parked.remove(&key) {
            Some((ticket, unit)) if self.superseded(key.0, &unit) => {
                self.refuse(ticket, ErrorCode::SUPERSEDED);
            }
            Some((ticket, unit)) => {
                let c = commit(&tensor, its_input);
                self.run(ticket, key.0, &unit, &tensor, Some(c));
            }
            None => {
                self.early.insert(key, (tensor, its_input));
            }
        }
    }

    /// Runs `unit` on `input`, rewinding the session to its position.
    fn run(
        &mut self,
        ticket: Ticket,
        to: NodeId,
        unit: &InferenceUnit,
        input: &Tensor,
        input_commitment: Option<Hash>,
    ) {
        let n = self.nodes.get_mut(&to).expect("a known node");
        let l = unit.layers;
        let values: Vec<u64> = match input.to_u32() {
            Some(t) => t.into_iter().map(u64::from).collect(),
            None => input
                .to_f32()
                .expect("f32 or u32")
                .into_iter()
                .map(|v| v as u64)
                .collect(),
        };
        let history = n
            .sessions
            .entry(unit.session)
            .or_insert_with(|| vec![HashMap::new()]);
        let start = unit.options.start_pos as usize;
        let cached = history.len() - 1;
        if start == 0 {
            history.truncate(1);
            history[0].clear();
        } else if start < cached {
            history.truncate(start + 1);
            self.rewinds += 1;
        } else if start != cached {
            let e = Event::Answer(
                ticket,
                Err(StepFailure::Refused {
                    code: ErrorCode::UNKNOWN_SESSION,
                    message: format!("at {cached}, asked {start}"),
                }),
            );
            self.at_later(e);
            return;
        }
        let mut outs = Vec::new();
        let mut last = 0;
        for v in values {
            let mut states = history.last().cloned().unwrap_or_default();
            let mut x = v;
            for layer in l.start..l.end {
                let state = states.entry(layer).or_insert(0);
                *state = (*state * 31 + x + u64::from(layer) * 7) % 65_521;
                x = *state;
            }
            history.push(states);
            last = x;
            outs.push(x as f32);
        }
        let greedy = unit
            .options
            .sampling
            .as_ref()
            .is_none_or(|s| s.temperature == 0.0);
        let output = if l.end == 30 && greedy {
            Tensor::from_u32(&[1], &[(last % u64::from(VOCAB)) as u32]).expect("tensor")
        } else if l.end == 30 {
            // Logits whose largest entry is the greedy token.
            let mut logits = vec![0.0f32; VOCAB as usize];
            logits[(last % u64::from(VOCAB)) as usize] = 1.0;
            Tensor::from_f32(&[u64::from(VOCAB)], &logits).expect("tensor")
        } else {
            Tensor::from_f32(&[1, outs.len() as u64, 1], &outs).expect("tensor")
        };
        if let Some(down) = &unit.options.forward_to {
            let token = output.to_u32().filter(|t| t.len() == 1).map(|t| t[0]);
            if token.is_none_or(|t| !down.unless.contains(&t)) && !n.drops_forwards {
                let sent = if n.equivocates {
                    let mut v = output.to_f32().unwrap_or_else(|| vec![0.0]);
                    v[0] += 1.0;
                    Tensor::from_f32(output.shape(), &v).expect("tensor")
                } else {
                    output.clone()
                };
                let key = (down.node, to, down.link);
                self.at_later(Event::Forward(key, (sent, input_commitment)));
            }
        }
        let result = StepResult {
            executor: to,
            commitment: commit(&output, input_commitment),
            outputs: vec![output],
            input: input_commitment,
        };
        self.at_later(Event::Answer(ticket, Ok(result)));
    }

    /// Runs until the job ends and nothing is left to deliver.
    fn drive(&mut self, s: &mut Scheduler, id: JobId) {
        for _ in 0..200_000 {
            while let Some(out) = s.poll_output() {
                match out {
                    Output::Send {
                        ticket,
                        node,
                        unit,
                        deadline,
                        ..
                    } => self.at_later(Event::Unit(ticket, node, Box::new(unit), deadline)),
                    Output::Sample { job, logits } => {
                        let v = logits.to_f32().expect("f32 logits");
                        let best = (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]));
                        s.handle_sampled(UnixMillis(self.now), &job, best.unwrap_or(0) as u32);
                    }
                    Output::Taken { .. } => self.taken += 1,
                    Output::Changed { .. } => {}
                }
            }
            let Some(std::cmp::Reverse((when, seq))) = self.queue.pop() else {
                if s.view(&id).is_some_and(|v| v.status.is_terminal()) {
                    return;
                }
                // Only deadlines can move the job now.
                self.now += 1_000;
                s.tick(UnixMillis(self.now));
                continue;
            };
            self.now = when;
            match self.events.remove(&seq).expect("an event") {
                Event::Unit(t, to, unit, deadline) => self.on_unit(t, to, *unit, deadline),
                Event::Forward(key, tensor) => self.on_forward(key, tensor),
                Event::Answer(t, r) => s.handle_result(UnixMillis(self.now), t, r),
                Event::Expire(key, t) => {
                    if self.parked.get(&key).is_some_and(|(pt, _)| *pt == t) {
                        self.parked.remove(&key);
                        self.refuse(t, ErrorCode::NO_INPUT);
                    }
                }
            }
            s.tick(UnixMillis(self.now));
        }
        panic!("the job did not end");
    }
}

fn job(prompt: &[u32], max_tokens: u32, temperature: f32) -> NewJob {
    NewJob {
        id: JobId([1; 16]),
        submitter: node(99),
        model: MODEL,
        prompt: prompt.to_vec(),
        max_tokens,
        stop_tokens: vec![STOP],
        sampling: SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        },
    }
}

const SPANS: [(u8, u32, u32); 6] = [
    (1, 0, 10),
    (2, 10, 20),
    (3, 10, 20),
    (4, 20, 30),
    (5, 0, 10),
    (6, 20, 30),
];

/// The run of `prompt` one unit at a time (depth 0).
fn reference(prompt: &[u32], max_tokens: u32) -> Vec<u32> {
    let mut net = Net::new(&SPANS, 1);
    let mut s = net.scheduler(0);
    s.submit(UnixMillis(0), job(prompt, max_tokens, 0.0))
        .unwrap();
    net.drive(&mut s, JobId([1; 16]));
    let v = s.view(&JobId([1; 16])).unwrap();
    assert!(matches!(v.status, JobStatus::Length | JobStatus::Stopped));
    assert_eq!(s.stream_stats().waves, 0);
    v.tokens
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// In any delivery order, at depth 1 or 2, the text is the one-unit-at-a-time run's.
    #[test]
    fn streamed_jobs_give_the_text_of_one_unit_at_a_time(
        depth in 1usize..=2,
        seed in any::<u64>(),
        prompt in proptest::collection::vec(1u32..VOCAB, 1..10),
    ) {
        let expected = reference(&prompt, 40);
        let mut net = Net::new(&SPANS, seed);
        let mut s = net.scheduler(depth);
        s.submit(UnixMillis(0), job(&prompt, 40, 0.0)).unwrap();
        let id = JobId([1; 16]);
        net.drive(&mut s, id);
        let v = s.view(&id).unwrap();
        prop_assert!(matches!(v.status, JobStatus::Length | JobStatus::Stopped), "{:?}", v.status);
        prop_assert_eq!(&v.tokens, &expected);
        prop_assert_eq!(v.failovers, 0);
        // Every step of every hop taken once, and logged as taken.
        prop_assert_eq!(v.receipts as usize, 3 * expected.len());
        prop_assert_eq!(net.taken, v.receipts);
        let stats = s.stream_stats();
        prop_assert_eq!(stats.mismatches, 0);
        // Every step streamed; at depth 2 a step past a stop token may go out and be dropped.
        prop_assert!(stats.waves as usize >= expected.len());
        prop_assert!((stats.waves as usize) < expected.len() + depth);
    }

    /// Whichever node of the chain dies, whenever: the text is unchanged.
    #[test]
    fn a_node_dying_mid_stream_changes_nothing_in_the_text(
        depth in 1usize..=2,
        victim in prop::sample::select(vec![1u8, 2, 4]),
        after in 0u32..60,
        seed in any::<u64>(),
        prompt in proptest::collection::vec(1u32..VOCAB, 1..10),
    ) {
        let expected = reference(&prompt, 40);
        let mut net = Net::new(&SPANS, seed);
        net.nodes.get_mut(&node(victim)).unwrap().dies_after = Some(after);
        let mut s = net.scheduler(depth);
        s.submit(UnixMillis(0), job(&prompt, 40, 0.0)).unwrap();
        let id = JobId([1; 16]);
        net.drive(&mut s, id);
        let v = s.view(&id).unwrap();
        prop_assert!(matches!(v.status, JobStatus::Length | JobStatus::Stopped), "{:?}", v.status);
        prop_assert_eq!(&v.tokens, &expected);
        // A node may die on a step sent past the end, which nobody waits for.
        let died = !net.nodes[&node(victim)].alive;
        prop_assert!(v.failovers <= u32::from(died), "{} failovers", v.failovers);
        prop_assert_eq!(s.stream_stats().mismatches, 0);
    }
}

#[test]
fn a_node_that_forwards_one_thing_and_reports_another_stops_the_stream_and_blames_no_one() {
    let prompt = [3, 1, 4, 1, 5];
    let expected = reference(&prompt, 30);
    let mut net = Net::new(&SPANS, 5);
    net.nodes.get_mut(&node(2)).unwrap().equivocates = true;
    let mut s = net.scheduler(2);
    s.submit(UnixMillis(0), job(&prompt, 30, 0.0)).unwrap();
    let id = JobId([1; 16]);
    net.drive(&mut s, id);
    let v = s.view(&id).unwrap();
    assert_eq!(v.tokens, expected);
    assert_eq!(v.failovers, 0, "neither side of a mismatch is replaced");
    assert!(v.hops.iter().all(|h| h.current));
    let stats = s.stream_stats();
    assert_eq!(
        stats.mismatches, 1,
        "the job stops streaming after the first"
    );
    assert!(stats.dropped >= 1);
    // The hop after the liar ran the step on what it was sent, then again on
    // the coordinator's input: it rewound its session.
    assert!(net.rewinds >= 1);
    assert_eq!(net.taken, v.receipts);
    assert_eq!(v.receipts as usize, 3 * expected.len());
}

#[test]
fn a_sampled_job_streams_each_step_but_the_coordinator_chooses_its_tokens() {
    let prompt = [2, 7, 1, 8];
    let mut relay = Net::new(&SPANS, 3);
    let mut s = relay.scheduler(0);
    s.submit(UnixMillis(0), job(&prompt, 25, 0.7)).unwrap();
    let id = JobId([1; 16]);
    relay.drive(&mut s, id);
    let expected = s.view(&id).unwrap().tokens;
    assert!(!expected.is_empty());
    let mut net = Net::new(&SPANS, 3);
    let mut s = net.scheduler(2);
    s.submit(UnixMillis(0), job(&prompt, 25, 0.7)).unwrap();
    net.drive(&mut s, id);
    let v = s.view(&id).unwrap();
    assert_eq!(v.tokens, expected);
    // No step goes out before its token is chosen: one wave per token.
    assert_eq!(s.stream_stats().waves as usize, expected.len());
}

#[test]
fn a_restored_job_replays_one_unit_at_a_time_then_streams() {
    let prompt = [3, 1, 4, 1, 5];
    let expected = reference(&prompt, 30);
    assert!(expected.len() > 6, "{expected:?}");
    let mut net = Net::new(&SPANS, 9);
    let mut s = net.scheduler(2);
    let id = JobId([1; 16]);
    s.resume(
        UnixMillis(0),
        job(&prompt, 30, 0.0),
        expected[..6].to_vec(),
        UnixMillis(0),
    )
    .unwrap();
    net.drive(&mut s, id);
    assert_eq!(s.view(&id).unwrap().tokens, expected);
    let streamed = s.stream_stats().waves as usize;
    assert!(
        streamed > 0 && streamed <= expected.len() - 6 + 1,
        "{streamed}"
    );
}

#[test]
fn a_silent_node_in_a_wave_times_out_and_is_replaced() {
    let prompt = [4, 4, 2];
    let expected = reference(&prompt, 20);
    let mut net = Net::new(&SPANS, 11);
    let mut s = net.scheduler(2);
    let id = JobId([1; 16]);
    s.submit(UnixMillis(0), job(&prompt, 20, 0.0)).unwrap();
    // Node 2 takes units and never answers: no closed connection tells.
    let mut sent_to_2 = 0;
    for _ in 0..100 {
        match s.poll_output() {
            Some(Output::Send { node: n, .. }) if n == node(2) => sent_to_2 += 1,
            Some(Output::Send {
                ticket,
                node: n,
                unit,
                deadline,
                ..
            }) => net.at_later(Event::Unit(ticket, n, Box::new(unit), deadline)),
            Some(_) => {}
            None => break,
        }
    }
    assert!(sent_to_2 >= 1);
    net.nodes.get_mut(&node(2)).unwrap().alive = false;
    net.drive(&mut s, id);
    let v = s.view(&id).unwrap();
    assert_eq!(v.tokens, expected);
    assert_eq!(v.failovers, 1);
}

#[test]
fn a_node_whose_outputs_never_reach_the_next_hop_costs_speed_not_a_failover() {
    let prompt = [6, 2, 8];
    let expected = reference(&prompt, 30);
    let mut net = Net::new(&SPANS, 21);
    net.nodes.get_mut(&node(2)).unwrap().drops_forwards = true;
    let mut s = net.scheduler(2);
    s.submit(UnixMillis(0), job(&prompt, 30, 0.0)).unwrap();
    let id = JobId([1; 16]);
    net.drive(&mut s, id);
    let v = s.view(&id).unwrap();
    assert_eq!(v.tokens, expected);
    assert_eq!(v.failovers, 0);
    assert!(v.hops.iter().all(|h| h.current));
    // The first step waits for its input, then the job relays.
    assert_eq!(s.stream_stats().waves, 2);
    assert_eq!(s.stream_stats().mismatches, 0);
}
