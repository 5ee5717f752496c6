//! Pipeline-parallel training over the swarm, GPipe style, as a state
//! machine.
//!
//! The model is cut into `stages` consecutive layer ranges, each held by one
//! node, and every round's global batch into `micro_batches` equal slices of
//! rows. A round is a set of stage units ([`Task`]):
//!
//! - `Forward(s, m)` for every stage but the last: stage `s`'s output for
//!   micro-batch `m`, from the output of `Forward(s − 1, m)` (the first stage
//!   reads its tokens from the data itself);
//! - `Backward(s, m)` for every stage: the gradients of micro-batch `m`'s
//!   loss with respect to stage `s`'s parameters and its input. The last
//!   stage starts from its input (`Forward(s − 1, m)`'s output) and the
//!   targets; the others from their input and the input gradient of
//!   `Backward(s + 1, m)`.
//!
//! A unit is sent as soon as what it needs is there, so different stages
//! work on different micro-batches at once (backward units go first: they
//! finish micro-batches). Units are stateless: a backward unit recomputes
//! its stage's forward pass from the input it is sent, as GPipe
//! re-materialises activations, so a lost node costs only its units in
//! flight. The machine keeps every result of the round, so the caller can
//! hand a unit its inputs and a replacement node needs nothing else.
//!
//! When every backward unit has a result, [`Output::Aggregate`] gives them
//! per stage in micro-batch order; the caller sums each stage's parameter
//! gradients, takes the optimiser step and reports each stage's new
//! parameters with [`PipelineTraining::handle_aggregated`].
//!
//! # Rules
//!
//! - Stages stay with their nodes from round to round (a node fetches only
//!   its stage's parameters). A stage without a node goes to the available
//!   node holding the fewest stages, then the lowest id; with fewer nodes
//!   than stages a node holds several.
//! - A node has at most `max_in_flight_per_node` units at once.
//! - A node that fails a unit or misses its deadline is benched for
//!   `bench_ms` and loses its stages: they move to other nodes and its units
//!   in flight are sent again there. A node that leaves the set loses its
//!   stages the same way. A round waits only while no node is available.
//! - The first valid result of a unit is kept, even a late one; later
//!   copies are dropped.
//! - Every `persist_every` rounds, and after the last one,
//!   [`Output::Persist`] gives the snapshot to keep.
//!
//! # Spot checks
//!
//! With a [`Ledger`] whose policy is on ([`PipelineTraining::with_checks`]),
//! results reported with [`PipelineTraining::handle_checked`] are checked as
//! data-parallel shares are: a unit is a pure function of its inputs, so a
//! sampled unit (every one while its node is on probation) is held back and
//! sent again to a node of another operator and the same determinism class;
//! only a result two operators agree on is used. The loser of a
//! disagreement (settled by a third operator's node) is excluded from the
//! run and loses its stages, and every micro-batch of the round holding a
//! result of it that no check confirmed is computed again from the start
//! (results downstream of it, even confirmed ones, were computed from it).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use commons_protocol::{Hash, NodeId, UnixMillis};

/// What became of a result: as for a data-parallel share, the unit standing
/// for the share ([`Taken::Late`]: kept though the unit had been sent again;
/// [`Taken::Dropped`]: also for an excluded node's answer).
pub use super::Taken;
use super::{Lost, ParamsRef, Snapshot, Ticket, TrainError};
use crate::verify::{Ledger, Scope, VerifyConfig};

/// Tunables of a pipeline-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Rounds (optimiser steps) in the run.
    pub rounds: u64,
    /// Stages the model is cut into.
    pub stages: u32,
    /// Micro-batches each round's batch is cut into.
    pub micro_batches: u32,
    /// A unit's deadline, from when it is sent.
    pub unit_timeout_ms: u64,
    /// Units a node may have at once.
    pub max_in_flight_per_node: u32,
    /// How long a node that failed or missed a deadline is given no work.
    pub bench_ms: u64,
    /// Rounds between snapshots to persist (the last round always has one).
    pub persist_every: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            rounds: 1,
            stages: 2,
            micro_batches: 2,
            unit_timeout_ms: 30_000,
            max_in_flight_per_node: 4,
            bench_ms: 10_000,
            persist_every: 1,
        }
    }
}

impl PipelineConfig {
    /// Checks that the run can make progress.
    ///
    /// # Errors
    /// [`TrainError::Config`] naming the first problem.
    pub fn validate(&self) -> Result<(), TrainError> {
        let fail = |reason| Err(TrainError::Config { reason });
        if self.rounds == 0 {
            return fail("a run needs at least one round");
        }
        if self.stages == 0 {
            return fail("a pipeline needs at least one stage");
        }
        if self.micro_batches == 0 {
            return fail("a round needs at least one micro-batch");
        }
        if self.unit_timeout_ms == 0 {
            return fail("units need a positive deadline");
        }
        if self.max_in_flight_per_node == 0 {
            return fail("a node must be able to hold one unit");
        }
        if self.persist_every == 0 {
            return fail("snapshots need a positive period");
        }
        Ok(())
    }
}

/// A stage unit's pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pass {
    /// Backward (ordered first: it finishes a micro-batch).
    Backward,
    /// Forward.
    Forward,
}

/// One stage unit of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Task {
    /// Forward or backward.
    pub pass: Pass,
    /// The micro-batch.
    pub micro: u32,
    /// The stage.
    pub stage: u32,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<R> {
    /// Send `task` of `round` to `node`, at the stage's parameters `params`,
    /// with `inputs` (results of earlier tasks of the round, in this order:
    /// for a stage after the first the `Forward(stage − 1)` result whose
    /// output is its input; for a backward unit of a stage before the last,
    /// the `Backward(stage + 1)` result whose input gradient is its output
    /// gradient). Report the outcome with `ticket`.
    Send {
        /// Names the answer.
        ticket: Ticket,
        /// Where to.
        node: NodeId,
        /// The round.
        round: u64,
        /// The unit.
        task: Task,
        /// The stage's parameters.
        params: ParamsRef,
        /// The results the unit starts from.
        inputs: Vec<R>,
        /// After this the unit goes to another node.
        deadline: UnixMillis,
        /// How many times this unit has been sent this round (from 1).
        attempt: u32,
        /// A re-execution to check (or referee) another node's result.
        check: bool,
    },
    /// `node` gave a result that two other operators' nodes contradicted:
    /// it is excluded from the run and loses its stages.
    Excluded {
        /// The round.
        round: u64,
        /// The node.
        node: NodeId,
    },
    /// Results for `task` disagree and no node of a third operator (of the
    /// same determinism class) is there to referee: the unit waits for one.
    Undecided {
        /// The round.
        round: u64,
        /// The unit.
        task: Task,
        /// The nodes that disagree.
        nodes: Vec<NodeId>,
    },
    /// `stage` moved to `node` (from `from`, which lost it for `reason`; none
    /// when the stage had no node).
    Moved {
        /// The stage.
        stage: u32,
        /// The node that now holds it.
        node: NodeId,
        /// The node that held it.
        from: Option<(NodeId, Lost)>,
    },
    /// Every backward unit of `round` has a result: `results[s][m]` is stage
    /// `s`'s for micro-batch `m`. Sum each stage's parameter gradients, step,
    /// and report the stages' new parameters with
    /// [`PipelineTraining::handle_aggregated`].
    Aggregate {
        /// The round.
        round: u64,
        /// Per stage, per micro-batch.
        results: Vec<Vec<R>>,
    },
    /// Keep this snapshot (and the optimiser state that goes with it).
    Persist(Snapshot),
    /// Every round is done.
    Finished {
        /// Rounds run in all.
        rounds: u64,
        /// The final parameters (the whole model's).
        params: ParamsRef,
    },
}

/// Counters over the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Units sent, resends included.
    pub sent: u64,
    /// Results kept.
    pub accepted: u64,
    /// Results kept after their unit was sent again.
    pub late: u64,
    /// Results dropped.
    pub dropped: u64,
    /// Units that failed.
    pub failures: u64,
    /// Deadlines missed.
    pub deadlines: u64,
    /// Units sent again after their node lost them.
    pub resent: u64,
    /// Stages that moved from one node to another.
    pub moves: u64,
    /// Results sampled for a check.
    pub sampled: u64,
    /// Units sent to check or referee a result.
    pub check_sends: u64,
    /// Checks where every result agreed.
    pub confirmed: u64,
    /// Checks where a result was contradicted.
    pub mismatches: u64,
    /// Nodes excluded.
    pub exclusions: u64,
    /// Sampled results taken unchecked: no other operator's node of the
    /// class was there.
    pub unverifiable: u64,
    /// Micro-batches computed again because an excluded node had a result
    /// in them that no check confirmed.
    pub recomputed: u64,
}

/// One completed round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineRecord {
    /// The round.
    pub round: u64,
    /// Units sent.
    pub sends: u32,
    /// Units sent again.
    pub resent: u32,
}

#[derive(Debug, Clone)]
struct Flight {
    task: Task,
    node: NodeId,
    deadline: UnixMillis,
}

/// A unit's result in use.
#[derive(Debug, Clone)]
struct Done<R> {
    result: R,
    node: NodeId,
    /// Taken without a check.
    unchecked: bool,
}

/// A result held while its unit is checked.
#[derive(Debug, Clone)]
struct Candidate<R> {
    result: R,
    node: NodeId,
    digest: Hash,
}

/// A pipeline-parallel training run (see the module docs).
#[derive(Debug)]
pub struct PipelineTraining<R> {
    config: PipelineConfig,
    round: u64,
    /// The whole model's parameters at the start of the round.
    params: ParamsRef,
    /// Each stage's parameters at the start of the round.
    stage_params: Vec<ParamsRef>,
    aggregating: bool,
    finished: bool,
    nodes: BTreeSet<NodeId>,
    benched: BTreeMap<NodeId, UnixMillis>,
    holder: Vec<Option<NodeId>>,
    /// Stages taken from a node, until they have a new one.
    pending_moves: Vec<(u32, NodeId, Lost)>,
    forward: BTreeMap<(u32, u32), Done<R>>,
    backward: BTreeMap<(u32, u32), Done<R>>,
    in_flight: BTreeMap<Ticket, Flight>,
    /// Tickets of this round that were sent again (answers still taken).
    stale: BTreeMap<Ticket, (Task, NodeId)>,
    /// Units whose results are held for a check.
    checking: BTreeMap<Task, Vec<Candidate<R>>>,
    /// Units reported undecided (once each).
    undecided: BTreeSet<Task>,
    ledger: Ledger,
    scope: Scope,
    attempts: BTreeMap<Task, u32>,
    next_ticket: u64,
    outputs: VecDeque<Output<R>>,
    stats: PipelineStats,
    round_sends: u32,
    round_resent: u32,
    history: Vec<PipelineRecord>,
}

impl<R: Clone> PipelineTraining<R> {
    /// A run starting at `snapshot` (round 0 for a new run) with each stage's
    /// parameters `stage_params`, in stage order.
    ///
    /// # Errors
    /// [`TrainError::Config`] for an invalid configuration or a number of
    /// stage parameters other than `stages`.
    pub fn new(
        config: PipelineConfig,
        snapshot: Snapshot,
        stage_params: Vec<ParamsRef>,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        if stage_params.len() != config.stages as usize {
            return Err(TrainError::Config {
                reason: "one set of parameters per stage is needed",
            });
        }
        let stages = config.stages as usize;
        let mut run = Self {
            finished: snapshot.round >= config.rounds,
            config,
            round: snapshot.round,
            params: snapshot.params,
            stage_params,
            aggregating: false,
            nodes: BTreeSet::new(),
            benched: BTreeMap::new(),
            holder: vec![None; stages],
            pending_moves: Vec::new(),
            forward: BTreeMap::new(),
            backward: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            stale: BTreeMap::new(),
            checking: BTreeMap::new(),
            undecided: BTreeSet::new(),
            ledger: Ledger::new(VerifyConfig {
                enabled: false,
                ..VerifyConfig::default()
            }),
            scope: None,
            attempts: BTreeMap::new(),
            next_ticket: 0,
            outputs: VecDeque::new(),
            stats: PipelineStats::default(),
            round_sends: 0,
            round_resent: 0,
            history: Vec::new(),
        };
        if run.finished {
            run.outputs.push_back(Output::Finished {
                rounds: run.round,
                params: run.params,
            });
        }
        Ok(run)
    }

    /// Spot-checks results reported with
    /// [`PipelineTraining::handle_checked`] by `ledger`'s policy (see the
    /// module docs); a node the ledger excludes from `scope` gets no work.
    #[must_use]
    pub fn with_checks(mut self, ledger: Ledger, scope: Scope) -> Self {
        self.ledger = ledger;
        self.scope = scope;
        self
    }

    /// The verification ledger.
    #[must_use]
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The verification ledger, to update nodes' profiles.
    pub fn ledger_mut(&mut self) -> &mut Ledger {
        &mut self.ledger
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// The round being computed (or the number of rounds, when finished).
    #[must_use]
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The node holding each stage.
    #[must_use]
    pub fn holders(&self) -> &[Option<NodeId>] {
        &self.holder
    }

    /// Counters over the run.
    #[must_use]
    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// The completed rounds.
    #[must_use]
    pub fn history(&self) -> &[PipelineRecord] {
        &self.history
    }

    /// Units in flight.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output<R>> {
        self.outputs.pop_front()
    }

    /// The nodes that may be given stages now: those not in the set lose
    /// their stages and units in flight.
    pub fn set_nodes(&mut self, now: UnixMillis, nodes: impl IntoIterator<Item = NodeId>) {
        self.nodes = nodes.into_iter().collect();
        let gone: BTreeSet<NodeId> = self
            .holder
            .iter()
            .flatten()
            .chain(self.in_flight.values().map(|f| &f.node))
            .filter(|n| !self.nodes.contains(n))
            .copied()
            .collect();
        for node in gone {
            self.lose(node, &Lost::Left);
        }
        self.pump(now);
    }

    /// A unit's result, never spot-checked. Returns what became of it.
    pub fn handle_result(&mut self, now: UnixMillis, ticket: Ticket, result: R) -> Taken {
        self.take(now, ticket, result, None)
    }

    /// A unit's result, committed to by `digest` (bit-identical for the same
    /// unit on nodes of one determinism class), with a uniform 64-bit `draw`
    /// that decides whether it is checked.
    pub fn handle_checked(
        &mut self,
        now: UnixMillis,
        ticket: Ticket,
        result: R,
        digest: Hash,
        draw: u64,
    ) -> Taken {
        self.take(now, ticket, result, Some((digest, draw)))
    }

    fn take(
        &mut self,
        now: UnixMillis,
        ticket: Ticket,
        result: R,
        checked: Option<(Hash, u64)>,
    ) -> Taken {
        let (task, node, late) = if let Some(flight) = self.in_flight.remove(&ticket) {
            (flight.task, flight.node, false)
        } else if let Some((task, node)) = self.stale.remove(&ticket) {
            (task, node, true)
        } else {
            self.stats.dropped += 1;
            return Taken::Dropped;
        };
        if self.is_done(task) || self.ledger.is_excluded(&node, self.scope) {
            self.stats.dropped += 1;
            return Taken::Dropped;
        }
        let Some((digest, draw)) = checked else {
            return self.accept(now, task, result, node, late, true);
        };
        let candidate = Candidate {
            result,
            node,
            digest,
        };
        if let Some(held) = self.checking.get_mut(&task) {
            held.push(candidate);
            return self.settle(now, task, node);
        }
        if !self.ledger.sample(&node, draw) {
            return self.accept(now, task, candidate.result, node, late, true);
        }
        self.stats.sampled += 1;
        self.ledger.stats.sampled += 1;
        // Other copies would only repeat it: the check goes to another operator.
        self.drop_copies(task);
        self.checking.insert(task, vec![candidate]);
        self.pump(now);
        if self.is_done(task) {
            // No other operator's node: taken unverifiable.
            if late { Taken::Late } else { Taken::Accepted }
        } else {
            Taken::Checking
        }
    }

    fn is_done(&self, task: Task) -> bool {
        let key = (task.stage, task.micro);
        match task.pass {
            Pass::Forward => self.forward.contains_key(&key),
            Pass::Backward => self.backward.contains_key(&key),
        }
    }

    /// Tickets in flight for `task` are no longer wanted.
    fn drop_copies(&mut self, task: Task) {
        self.in_flight.retain(|_, f| f.task != task);
        self.stale.retain(|_, (t, _)| *t != task);
    }

    /// Uses `result` of `node` for `task`, and moves the round on.
    fn accept(
        &mut self,
        now: UnixMillis,
        task: Task,
        result: R,
        node: NodeId,
        late: bool,
        unchecked: bool,
    ) -> Taken {
        let key = (task.stage, task.micro);
        let slot = match task.pass {
            Pass::Forward => &mut self.forward,
            Pass::Backward => &mut self.backward,
        };
        slot.insert(
            key,
            Done {
                result,
                node,
                unchecked,
            },
        );
        self.drop_copies(task);
        self.stats.accepted += 1;
        if late {
            self.stats.late += 1;
        }
        self.complete_round();
        self.pump(now);
        if late { Taken::Late } else { Taken::Accepted }
    }

    /// `task` is under check and just got a result from `node`: uses the
    /// result two operators agree on, excluding whoever contradicts it, or
    /// waits for one more execution.
    fn settle(&mut self, now: UnixMillis, task: Task, node: NodeId) -> Taken {
        let held = self.checking.get(&task).map_or(&[][..], Vec::as_slice);
        let agreed = held.iter().find_map(|c| {
            let operators: BTreeSet<NodeId> = held
                .iter()
                .filter(|o| o.digest == c.digest)
                .map(|o| self.ledger.operator(&o.node))
                .collect();
            (operators.len() >= 2).then_some(c.digest)
        });
        let Some(digest) = agreed else {
            self.pump(now);
            return Taken::Checking;
        };
        let held = self.checking.remove(&task).unwrap_or_default();
        self.undecided.remove(&task);
        let mut winner = None;
        let mut losers = Vec::new();
        let mut taken = Taken::Rejected;
        for c in held {
            if c.digest == digest {
                self.ledger.valid(c.node);
                if c.node == node {
                    taken = Taken::Accepted;
                }
                if winner.is_none() {
                    winner = Some(c);
                }
            } else {
                losers.push(c.node);
            }
        }
        self.ledger.stats.compared += 1;
        if losers.is_empty() {
            self.stats.confirmed += 1;
        } else {
            self.stats.mismatches += 1;
            self.ledger.stats.mismatches += 1;
            self.ledger.stats.decided += 1;
        }
        let micro = task.micro;
        let mut wiped = false;
        for loser in losers {
            wiped |= self.exclude(loser).contains(&micro);
        }
        match winner {
            // A confirmed result computed from a liar's input is no better.
            Some(c) if !wiped => {
                self.accept(now, task, c.result, c.node, false, false);
            }
            _ => self.pump(now),
        }
        taken
    }

    /// `node` lost a check: excluded from the run, its stages and units
    /// taken away, and every micro-batch holding a result of it that no
    /// check confirmed computed again. Returns those micro-batches.
    fn exclude(&mut self, node: NodeId) -> BTreeSet<u32> {
        self.ledger.invalid(node);
        if !self.ledger.is_excluded(&node, self.scope) {
            self.ledger.exclude(node, self.scope);
            self.stats.exclusions += 1;
            self.outputs.push_back(Output::Excluded {
                round: self.round,
                node,
            });
        }
        let micros: BTreeSet<u32> = self
            .forward
            .iter()
            .chain(&self.backward)
            .filter(|(_, d)| d.node == node && d.unchecked)
            .map(|((_, m), _)| *m)
            .collect();
        for &m in &micros {
            self.forward.retain(|(_, k), _| *k != m);
            self.backward.retain(|(_, k), _| *k != m);
            self.checking.retain(|t, _| t.micro != m);
            self.in_flight.retain(|_, f| f.task.micro != m);
            self.stale.retain(|_, (t, _)| t.micro != m);
            self.stats.recomputed += 1;
        }
        for held in self.checking.values_mut() {
            held.retain(|c| c.node != node);
        }
        self.checking.retain(|_, held| !held.is_empty());
        self.in_flight.retain(|_, f| f.node != node);
        self.stale.retain(|_, (_, n)| *n != node);
        self.lose(node, &Lost::Failed("excluded after a check".into()));
        micros
    }

    /// A unit failed (unreachable node, refusal, invalid answer): its node
    /// is benched and loses its stages. Returns whether the ticket was in
    /// flight.
    pub fn handle_failure(&mut self, now: UnixMillis, ticket: Ticket, reason: &str) -> bool {
        self.stale.remove(&ticket);
        let Some(flight) = self.in_flight.get(&ticket) else {
            return false;
        };
        let node = flight.node;
        self.stats.failures += 1;
        self.benched
            .insert(node, now.plus_millis(self.config.bench_ms));
        self.lose(node, &Lost::Failed(reason.to_owned()));
        self.pump(now);
        true
    }

    /// The caller took the optimiser step of `round`: `params` are the whole
    /// model's new parameters, `stage_params` each stage's.
    ///
    /// # Errors
    /// [`TrainError::NotAggregating`] when `round` is not waiting for them;
    /// [`TrainError::Config`] for a number of stage parameters other than
    /// `stages`.
    pub fn handle_aggregated(
        &mut self,
        now: UnixMillis,
        round: u64,
        params: ParamsRef,
        stage_params: Vec<ParamsRef>,
    ) -> Result<(), TrainError> {
        if !self.aggregating || round != self.round {
            let phase = if self.finished {
                super::Phase::Finished
            } else if self.aggregating {
                super::Phase::Aggregating { round: self.round }
            } else {
                super::Phase::Computing { round: self.round }
            };
            return Err(TrainError::NotAggregating { round, phase });
        }
        if stage_params.len() != self.config.stages as usize {
            return Err(TrainError::Config {
                reason: "one set of parameters per stage is needed",
            });
        }
        self.history.push(PipelineRecord {
            round,
            sends: std::mem::take(&mut self.round_sends),
            resent: std::mem::take(&mut self.round_resent),
        });
        self.aggregating = false;
        self.round += 1;
        self.params = params;
        self.stage_params = stage_params;
        self.forward.clear();
        self.backward.clear();
        self.stale.clear();
        self.checking.clear();
        self.undecided.clear();
        self.attempts.clear();
        let last = self.round >= self.config.rounds;
        if last || self.round.is_multiple_of(self.config.persist_every) {
            self.outputs.push_back(Output::Persist(Snapshot {
                round: self.round,
                params,
            }));
        }
        if last {
            self.finished = true;
            self.outputs.push_back(Output::Finished {
                rounds: self.round,
                params,
            });
        } else {
            self.pump(now);
        }
        Ok(())
    }

    /// Deadlines and the end of benches.
    pub fn tick(&mut self, now: UnixMillis) {
        self.benched.retain(|_, until| *until > now);
        let missed: Vec<NodeId> = self
            .in_flight
            .values()
            .filter(|f| f.deadline <= now)
            .map(|f| f.node)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for node in missed {
            self.stats.deadlines += 1;
            self.benched
                .insert(node, now.plus_millis(self.config.bench_ms));
            self.lose(node, &Lost::Deadline);
        }
        self.pump(now);
    }

    /// `node` loses its stages; its units in flight become stale (their
    /// answers are still taken) and are sent again.
    fn lose(&mut self, node: NodeId, reason: &Lost) {
        let tickets: Vec<Ticket> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.node == node)
            .map(|(t, _)| *t)
            .collect();
        for t in tickets {
            if let Some(f) = self.in_flight.remove(&t) {
                self.stale.insert(t, (f.task, f.node));
                self.stats.resent += 1;
                self.round_resent += 1;
            }
        }
        for (stage, holder) in self.holder.iter_mut().enumerate() {
            if *holder == Some(node) {
                *holder = None;
                self.pending_moves
                    .push((stage as u32, node, reason.clone()));
            }
        }
    }

    /// Gives stages without a node to available nodes and sends every unit
    /// whose inputs are there to its stage's node.
    fn pump(&mut self, now: UnixMillis) {
        if self.finished || self.aggregating {
            return;
        }
        self.assign();
        let stages = self.config.stages;
        let mut busy: BTreeMap<NodeId, u32> = BTreeMap::new();
        for f in self.in_flight.values() {
            *busy.entry(f.node).or_default() += 1;
        }
        let flying: BTreeSet<Task> = self.in_flight.values().map(|f| f.task).collect();
        let mut ready = Vec::new();
        for micro in 0..self.config.micro_batches {
            for stage in 0..stages {
                let input_ready = stage == 0 || self.forward.contains_key(&(stage - 1, micro));
                if !input_ready {
                    continue;
                }
                if stage + 1 < stages && !self.forward.contains_key(&(stage, micro)) {
                    ready.push(Task {
                        pass: Pass::Forward,
                        micro,
                        stage,
                    });
                }
                let grad_ready =
                    stage + 1 == stages || self.backward.contains_key(&(stage + 1, micro));
                if grad_ready && !self.backward.contains_key(&(stage, micro)) {
                    ready.push(Task {
                        pass: Pass::Backward,
                        micro,
                        stage,
                    });
                }
            }
        }
        ready.sort();
        for task in ready {
            if flying.contains(&task) || self.checking.contains_key(&task) {
                continue;
            }
            let Some(node) = self.holder[task.stage as usize] else {
                continue;
            };
            let load = busy.entry(node).or_default();
            if *load >= self.config.max_in_flight_per_node {
                continue;
            }
            *load += 1;
            self.send(now, task, node, false);
        }
        self.dispatch_checks(now, &mut busy);
    }

    /// The results `task` starts from, in the order [`Output::Send`] gives.
    fn inputs(&self, task: Task) -> Vec<R> {
        let mut inputs = Vec::new();
        if task.stage > 0 {
            inputs.push(self.forward[&(task.stage - 1, task.micro)].result.clone());
        }
        if task.pass == Pass::Backward && task.stage + 1 < self.config.stages {
            inputs.push(self.backward[&(task.stage + 1, task.micro)].result.clone());
        }
        inputs
    }

    fn send(&mut self, now: UnixMillis, task: Task, node: NodeId, check: bool) {
        let inputs = self.inputs(task);
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let attempt = self.attempts.entry(task).or_default();
        *attempt += 1;
        let attempt = *attempt;
        let deadline = now.plus_millis(self.config.unit_timeout_ms);
        self.in_flight.insert(
            ticket,
            Flight {
                task,
                node,
                deadline,
            },
        );
        self.stats.sent += 1;
        self.round_sends += 1;
        if check {
            self.stats.check_sends += 1;
            self.ledger.stats.check_units += 1;
        }
        self.outputs.push_back(Output::Send {
            ticket,
            node,
            round: self.round,
            task,
            params: self.stage_params[task.stage as usize],
            inputs,
            deadline,
            attempt,
            check,
        });
    }

    /// Sends every held unit with no copy in flight to a node of another
    /// operator (and the first result's class); takes a lone result
    /// unverifiable when no such node exists, and reports a disagreement
    /// with no referee once.
    fn dispatch_checks(&mut self, now: UnixMillis, busy: &mut BTreeMap<NodeId, u32>) {
        let waiting: Vec<Task> = self
            .checking
            .keys()
            .filter(|t| !self.in_flight.values().any(|f| f.task == **t))
            .copied()
            .collect();
        for task in waiting {
            let Some(held) = self.checking.get(&task) else {
                continue;
            };
            let operators: BTreeSet<NodeId> =
                held.iter().map(|c| self.ledger.operator(&c.node)).collect();
            let first = held[0].node;
            let eligible: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|n| {
                    !self.benched.contains_key(n)
                        && !self.ledger.is_excluded(n, self.scope)
                        && !operators.contains(&self.ledger.operator(n))
                        && self.ledger.same_class(&first, n)
                })
                .copied()
                .collect();
            let free = eligible
                .iter()
                .filter(|n| busy.get(n).copied().unwrap_or(0) < self.config.max_in_flight_per_node)
                .min_by_key(|n| (busy.get(n).copied().unwrap_or(0), **n))
                .copied();
            if let Some(node) = free {
                *busy.entry(node).or_default() += 1;
                self.send(now, task, node, true);
            } else if eligible.is_empty() {
                if held.len() == 1 {
                    let Some(mut held) = self.checking.remove(&task) else {
                        continue;
                    };
                    let c = held.remove(0);
                    self.stats.unverifiable += 1;
                    self.ledger.stats.unverifiable += 1;
                    self.accept(now, task, c.result, c.node, false, true);
                    return;
                }
                if self.undecided.insert(task) {
                    self.ledger.stats.undecided += 1;
                    self.outputs.push_back(Output::Undecided {
                        round: self.round,
                        task,
                        nodes: held.iter().map(|c| c.node).collect(),
                    });
                }
            }
        }
    }

    /// Stages without a node go to the available node holding the fewest,
    /// then the lowest id.
    fn assign(&mut self) {
        for stage in 0..self.holder.len() {
            if self.holder[stage].is_some() {
                continue;
            }
            let held = |n: &NodeId| self.holder.iter().filter(|h| **h == Some(*n)).count();
            let Some(node) = self
                .nodes
                .iter()
                .filter(|n| {
                    !self.benched.contains_key(n) && !self.ledger.is_excluded(n, self.scope)
                })
                .min_by_key(|n| (held(n), **n))
                .copied()
            else {
                return;
            };
            self.holder[stage] = Some(node);
            let from = self
                .pending_moves
                .iter()
                .position(|(s, _, _)| *s as usize == stage)
                .map(|i| self.pending_moves.remove(i))
                .map(|(_, n, reason)| (n, reason));
            if from.is_some() {
                self.stats.moves += 1;
            }
            self.outputs.push_back(Output::Moved {
                stage: stage as u32,
                node,
                from,
            });
        }
    }

    /// When every backward unit has a result, asks for the aggregate.
    fn complete_round(&mut self) {
        let (stages, micros) = (self.config.stages, self.config.micro_batches);
        if self.aggregating || self.backward.len() < (stages * micros) as usize {
            return;
        }
        self.aggregating = true;
        for (t, f) in std::mem::take(&mut self.in_flight) {
            self.stale.insert(t, (f.task, f.node));
        }
        let results = (0..stages)
            .map(|s| {
                (0..micros)
                    .map(|m| self.backward[&(s, m)].result.clone())
                    .collect()
            })
            .collect();
        self.outputs.push_back(Output::Aggregate {
            round: self.round,
            results,
        });
    }
}

#[cfg(test)]
mod tests;
