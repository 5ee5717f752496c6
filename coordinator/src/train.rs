//! Training runs: rounds of gradient work spread over an elastic set of
//! nodes, as a state machine.
//!
//! A run is a sequence of rounds. Round `r` differentiates at one set of
//! parameters (named by its params root and the content id of the
//! checkpoint that holds it) and is cut into `shares_per_round` shares:
//!
//! - in [`Mode::Sync`] (synchronous data-parallel), share `i` is the `i`-th
//!   equal slice of rows of the round's global batch; the caller averages the
//!   shares' gradients and takes one optimiser step;
//! - in [`Mode::Diloco`], share `i` is one worker's `inner_steps` local
//!   optimiser steps from the round's parameters; the caller averages the
//!   shares' pseudo-gradients and takes DiLoCo's outer step.
//!
//! Either way a share is a pure function of its unit (parameters, data,
//! seed), so any node can compute any share, a share can be sent again to
//! another node, and the aggregate does not depend on who computed what.
//!
//! [`Training`] is driven like the job [`Scheduler`](crate::job::Scheduler):
//! [`Training::set_nodes`], [`Training::handle_result`],
//! [`Training::handle_failure`], [`Training::handle_aggregated`] and
//! [`Training::tick`] take the current time, and [`Training::poll_output`]
//! drains what to do next. It never reads a clock, draws randomness or holds
//! a tensor: results are an opaque `R` chosen by the caller, who does the
//! numeric work (averaging, AdamW, Nesterov) when asked to aggregate.
//!
//! # Rules
//!
//! - A node has at most `max_in_flight_per_node` shares at once; pending
//!   shares go, lowest index first, to the available node with the fewest
//!   shares in flight, then the fewest shares of this round, then the lowest
//!   id. Nodes may join at any time and are given pending shares at once.
//! - Every share sent has a deadline. A node that fails (unreachable,
//!   refused, an invalid answer) or misses a deadline is benched for
//!   `bench_ms` (given no new work), and its share is sent again to another
//!   node. A node that leaves the set loses its shares the same way. A round
//!   therefore waits for no node: it completes as long as one node answers.
//! - The first valid result for a share is kept, even one that comes after
//!   its deadline (a late answer is still a correct one); every other copy of
//!   that share is then dropped, and any answer to a dropped copy or to an
//!   earlier round is ignored. Each share of each round is thus in the
//!   aggregate exactly once.
//! - When every share of a round has a result, [`Output::Aggregate`] gives
//!   the results in share order and nothing more is sent until the caller
//!   reports the new parameters with [`Training::handle_aggregated`].
//! - Every `persist_every` rounds, and after the last one,
//!   [`Output::Persist`] gives the [`Snapshot`] to keep (with the caller's
//!   optimiser state); [`Training::resume`] continues from it after a
//!   restart.
//!
//! # Spot checks
//!
//! With a [`Ledger`] whose policy is on ([`Training::with_checks`]), results
//! reported with [`Training::handle_checked`] are spot-checked as inference
//! results are (BOINC's adaptive replication, [`crate::verify`]): a node on
//! probation has every result re-executed, later ones with probability
//! `max(p_min, 1 / streak)`. A share is a pure function of its unit, so the
//! re-execution by a node of another operator and the same determinism class
//! must commit to the same digest:
//!
//! - a sampled share is held (not aggregated) and sent to such a checker;
//! - as soon as two operators' results agree, the share takes their result
//!   and they gain on their records; a node whose result disagrees with
//!   them lost: it is excluded from the run's scope, and every result it
//!   gave that the round had taken unchecked is dropped and computed again;
//! - two results that disagree go to a third operator's node (the referee);
//!   while none is in the set the share waits for one
//!   ([`Output::Undecided`] says so once), so a disputed result never enters
//!   the aggregate;
//! - a sampled share for which no other operator's node of the same class
//!   exists is taken unchecked and counted `unverifiable`.
//!
//! Rounds already aggregated are not undone: a liar caught in round `r`
//! may have moved parameters with unchecked results before. The check
//! probability bounds how many.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use commons_protocol::{Hash, NodeId, UnixMillis};

use crate::verify::{Ledger, Scope, VerifyConfig};

/// A set of parameters by content: its params root and the checkpoint file
/// that holds it (what nodes fetch).
pub use commons_protocol::messages::ParamsRef;

pub mod pipeline;
#[cfg(test)]
mod tests;

/// How a round's shares are computed and combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Synchronous data-parallel: each share is a slice of the global batch's
    /// rows; gradients are averaged and one optimiser step is taken.
    Sync,
    /// DiLoCo: each share is `inner_steps` local optimiser steps; the
    /// pseudo-gradients are averaged and one outer Nesterov step is taken.
    Diloco {
        /// Local steps per share.
        inner_steps: u32,
    },
}

/// Tunables of a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// How shares are computed and combined.
    pub mode: Mode,
    /// Rounds in the run.
    pub rounds: u64,
    /// Shares each round is cut into.
    pub shares_per_round: u32,
    /// A share's deadline, from when it is sent.
    pub share_timeout_ms: u64,
    /// Shares a node may have at once.
    pub max_in_flight_per_node: u32,
    /// How long a node that failed or missed a deadline is given no work.
    pub bench_ms: u64,
    /// Rounds between snapshots to persist (the last round always has one).
    pub persist_every: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Sync,
            rounds: 1,
            shares_per_round: 1,
            share_timeout_ms: 30_000,
            max_in_flight_per_node: 1,
            bench_ms: 10_000,
            persist_every: 1,
        }
    }
}

/// A configuration, snapshot or report the run cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A configuration that cannot work.
    #[error("invalid training configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: &'static str,
    },
    /// Parameters reported for a round that is not waiting for them.
    #[error("round {round} is not waiting for aggregation ({phase})")]
    NotAggregating {
        /// The round reported.
        round: u64,
        /// Where the run stands.
        phase: Phase,
    },
}

impl TrainConfig {
    /// Checks that the run can make progress.
    ///
    /// # Errors
    /// [`TrainError::Config`] naming the first problem.
    pub fn validate(&self) -> Result<(), TrainError> {
        let fail = |reason| Err(TrainError::Config { reason });
        if self.rounds == 0 {
            return fail("a run needs at least one round");
        }
        if self.shares_per_round == 0 {
            return fail("a round needs at least one share");
        }
        if self.share_timeout_ms == 0 {
            return fail("shares need a positive deadline");
        }
        if self.max_in_flight_per_node == 0 {
            return fail("a node must be able to hold one share");
        }
        if self.persist_every == 0 {
            return fail("snapshots need a positive period");
        }
        if let Mode::Diloco { inner_steps: 0 } = self.mode {
            return fail("DiLoCo needs at least one inner step");
        }
        Ok(())
    }
}

/// What a restarted run needs: the next round to run and the parameters it
/// starts from. The caller keeps its optimiser state beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Rounds completed; the next round to run.
    pub round: u64,
    /// The parameters after those rounds.
    pub params: ParamsRef,
}

/// Identifies one share sent to one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The round's shares are being computed.
    Computing {
        /// The round.
        round: u64,
    },
    /// Every share of the round has a result; the caller is combining them.
    Aggregating {
        /// The round.
        round: u64,
    },
    /// Every round is done.
    Finished,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Computing { round } => write!(f, "computing round {round}"),
            Self::Aggregating { round } => write!(f, "aggregating round {round}"),
            Self::Finished => f.write_str("finished"),
        }
    }
}

/// Why a share was taken from a node and sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The node failed it (unreachable, refused, an invalid answer).
    Failed(String),
    /// Its deadline passed.
    Deadline,
    /// The node left the set of nodes.
    Left,
}

/// One share's result, as kept for aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareResult<R> {
    /// The share.
    pub share: u32,
    /// Who computed it.
    pub node: NodeId,
    /// The ticket it answered.
    pub ticket: Ticket,
    /// The caller's result.
    pub result: R,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<R> {
    /// Send share `share` of round `round`, at `params`, to `node`, expiring
    /// at `deadline`; report the outcome with `ticket`.
    Send {
        /// Names the answer.
        ticket: Ticket,
        /// Where to.
        node: NodeId,
        /// The round.
        round: u64,
        /// The share.
        share: u32,
        /// The parameters to differentiate at.
        params: ParamsRef,
        /// After this the share goes to another node.
        deadline: UnixMillis,
        /// How many times this share has been sent this round (from 1).
        attempt: u32,
        /// A re-execution to check (or referee) another node's result.
        check: bool,
    },
    /// `node` gave a result for `share` that two other operators' nodes
    /// contradicted: it is excluded from the run's scope and given no more
    /// work; its results of this round that were taken unchecked are
    /// computed again.
    Excluded {
        /// The round.
        round: u64,
        /// The share it lied on.
        share: u32,
        /// The node.
        node: NodeId,
    },
    /// Results for `share` disagree and no node of a third operator (of the
    /// same determinism class) is in the set to referee: the share waits
    /// for one.
    Undecided {
        /// The round.
        round: u64,
        /// The share.
        share: u32,
        /// The nodes that disagree.
        nodes: Vec<NodeId>,
    },
    /// A share was taken from `node` and will be sent again.
    Reassign {
        /// The round.
        round: u64,
        /// The share.
        share: u32,
        /// The node that lost it.
        node: NodeId,
        /// Why.
        reason: Lost,
    },
    /// Every share of `round` has a result: combine them (in this order) into
    /// the next parameters and report them with
    /// [`Training::handle_aggregated`].
    Aggregate {
        /// The round.
        round: u64,
        /// The parameters the round started from.
        params: ParamsRef,
        /// One result per share, in share order.
        results: Vec<ShareResult<R>>,
    },
    /// Keep this snapshot (and the optimiser state that goes with it).
    Persist(Snapshot),
    /// Every round is done; `params` are the final parameters.
    Finished {
        /// Rounds run in all.
        rounds: u64,
        /// The final parameters.
        params: ParamsRef,
    },
}

/// What became of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Kept for its share.
    Accepted,
    /// Kept for its share, though it came after its deadline.
    Late,
    /// Not wanted any more: another copy of its share answered first, its
    /// round is over, or the ticket is unknown.
    Dropped,
    /// Held until another node's re-execution confirms it.
    Checking,
    /// Contradicted by two other operators: thrown away, and its node
    /// excluded.
    Rejected,
}

impl Taken {
    /// Its name in reports and events.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Late => "late",
            Self::Dropped => "dropped",
            Self::Checking => "checking",
            Self::Rejected => "rejected",
        }
    }
}

/// A completed round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundRecord {
    /// The round.
    pub round: u64,
    /// The parameters it differentiated at.
    pub params: ParamsRef,
    /// The parameters it produced.
    pub next: ParamsRef,
    /// When its first share could be sent.
    pub started_at: UnixMillis,
    /// When its last result came.
    pub computed_at: UnixMillis,
    /// Shares sent, resends included.
    pub sends: u32,
    /// Shares sent again after a loss.
    pub reassigned: u32,
}

/// Counters over the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainStats {
    /// Shares sent.
    pub sent: u64,
    /// Results kept.
    pub accepted: u64,
    /// Results kept after their deadline.
    pub late: u64,
    /// Results dropped as no longer wanted (see [`Taken::Dropped`]).
    pub dropped: u64,
    /// Shares failed by their node.
    pub failures: u64,
    /// Deadlines missed.
    pub deadlines: u64,
    /// Shares taken from a node and sent again.
    pub reassigned: u64,
    /// Results sampled for a check.
    pub sampled: u64,
    /// Shares sent to check or referee another node's result.
    pub check_sends: u64,
    /// Checked shares whose results all agreed.
    pub confirmed: u64,
    /// Checked shares with a result that disagreed.
    pub mismatches: u64,
    /// Nodes excluded for a result that two others contradicted.
    pub exclusions: u64,
    /// Sampled results taken unchecked: no other operator's node of the
    /// same class was in the set.
    pub unverifiable: u64,
    /// Results of excluded nodes dropped from the round they were in.
    pub discarded: u64,
}

/// Completed rounds kept for reports.
const MAX_HISTORY: usize = 4096;

#[derive(Debug, Clone, Default)]
struct NodeState {
    in_flight: u32,
    assigned_this_round: u32,
    benched_until: Option<UnixMillis>,
}

impl NodeState {
    fn available(&self, now: UnixMillis, max: u32) -> bool {
        self.in_flight < max && self.benched_until.is_none_or(|t| t <= now)
    }
}

#[derive(Debug, Clone)]
struct Flight {
    share: u32,
    node: NodeId,
    deadline: UnixMillis,
    /// The deadline passed: the share went elsewhere, but an answer is still taken.
    expired: bool,
}

#[derive(Debug, Clone)]
struct Share<R> {
    /// Tickets out for this share (expired ones included).
    tickets: BTreeSet<Ticket>,
    sends: u32,
    done: Option<ShareResult<R>>,
    /// Whether `done` was taken without a check.
    unchecked: bool,
    /// Results held while the share is being checked (`None`: no check).
    check: Option<Vec<Candidate<R>>>,
    /// An [`Output::Undecided`] went out for the current dispute.
    undecided_reported: bool,
}

/// A result held while its share is being checked.
#[derive(Debug, Clone)]
struct Candidate<R> {
    result: ShareResult<R>,
    digest: Hash,
}

impl<R> Share<R> {
    fn new() -> Self {
        Self {
            tickets: BTreeSet::new(),
            sends: 0,
            done: None,
            unchecked: false,
            check: None,
            undecided_reported: false,
        }
    }
}

/// Which node, if any, re-executes a share under check.
enum Checker {
    /// This one, now.
    Node(NodeId),
    /// One exists but none is free: wait.
    Busy,
    /// None exists.
    None,
}

/// A training run's rounds over an elastic set of nodes (see the module docs).
#[derive(Debug)]
pub struct Training<R> {
    config: TrainConfig,
    phase: Phase,
    round: u64,
    params: ParamsRef,
    nodes: BTreeMap<NodeId, NodeState>,
    shares: Vec<Share<R>>,
    tickets: BTreeMap<Ticket, Flight>,
    next_ticket: u64,
    started_at: UnixMillis,
    computed_at: UnixMillis,
    round_reassigned: u32,
    outputs: VecDeque<Output<R>>,
    history: VecDeque<RoundRecord>,
    stats: TrainStats,
    ledger: Ledger,
    scope: Scope,
}

impl<R> Training<R> {
    /// A run from its first round, at `params`.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a configuration that cannot work.
    pub fn new(
        config: TrainConfig,
        params: ParamsRef,
        now: UnixMillis,
    ) -> Result<Self, TrainError> {
        Self::resume(config, Snapshot { round: 0, params }, now)
    }

    /// A run continued from `snapshot` (after a restart). A snapshot past the
    /// last round gives a finished run.
    ///
    /// # Errors
    /// [`TrainError::Config`] for a configuration that cannot work.
    pub fn resume(
        config: TrainConfig,
        snapshot: Snapshot,
        now: UnixMillis,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        let mut this = Self {
            phase: Phase::Finished,
            round: snapshot.round,
            params: snapshot.params,
            nodes: BTreeMap::new(),
            shares: Vec::new(),
            tickets: BTreeMap::new(),
            next_ticket: 0,
            started_at: now,
            computed_at: now,
            round_reassigned: 0,
            outputs: VecDeque::new(),
            history: VecDeque::new(),
            stats: TrainStats::default(),
            ledger: Ledger::new(VerifyConfig {
                enabled: false,
                ..VerifyConfig::default()
            }),
            scope: None,
            config,
        };
        if this.round >= this.config.rounds {
            this.outputs.push_back(Output::Finished {
                rounds: this.round,
                params: this.params,
            });
        } else {
            this.start_round(now);
        }
        Ok(this)
    }

    /// Spot-checks results reported with [`Training::handle_checked`] by
    /// `ledger`'s policy and records (see the module docs); a node the
    /// ledger excludes from `scope` gets no work.
    #[must_use]
    pub fn with_checks(mut self, ledger: Ledger, scope: Scope) -> Self {
        self.ledger = ledger;
        self.scope = scope;
        self
    }

    /// The verification records, profiles and exclusions.
    #[must_use]
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The ledger, to set profiles (operators and determinism classes) from
    /// the swarm's adverts.
    pub fn ledger_mut(&mut self) -> &mut Ledger {
        &mut self.ledger
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Where the run stands.
    #[must_use]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current round (the number of rounds done once finished).
    #[must_use]
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The parameters of the current round (the final ones once finished).
    #[must_use]
    pub fn params(&self) -> ParamsRef {
        self.params
    }

    /// What a restart would continue from: the rounds completed and their
    /// parameters.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            round: self.round,
            params: self.params,
        }
    }

    /// Completed rounds, oldest first (the last 4096).
    pub fn history(&self) -> impl Iterator<Item = &RoundRecord> {
        self.history.iter()
    }

    /// Counters over the run.
    #[must_use]
    pub fn stats(&self) -> TrainStats {
        self.stats
    }

    /// Nodes in the set.
    #[must_use]
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Shares of the current round with a result.
    #[must_use]
    pub fn shares_done(&self) -> u32 {
        self.shares.iter().filter(|s| s.done.is_some()).count() as u32
    }

    /// Shares sent and not yet answered, failed or past their deadline.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.tickets.values().filter(|f| !f.expired).count()
    }

    /// The earliest instant at which [`Training::tick`] has something to do
    /// (a deadline, or a benched node coming back while shares wait).
    #[must_use]
    pub fn next_wakeup(&self) -> Option<UnixMillis> {
        let deadline = self
            .tickets
            .values()
            .filter(|f| !f.expired)
            .map(|f| f.deadline)
            .min();
        let waiting = self.shares.iter().any(|s| s.done.is_none());
        let bench = waiting
            .then(|| self.nodes.values().filter_map(|n| n.benched_until).min())
            .flatten();
        deadline.into_iter().chain(bench).min()
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<Output<R>> {
        self.outputs.pop_front()
    }

    /// The nodes that may be given shares now. Nodes not listed any more lose
    /// their shares (sent again elsewhere); new ones get pending shares.
    pub fn set_nodes(&mut self, now: UnixMillis, nodes: impl IntoIterator<Item = NodeId>) {
        let wanted: BTreeSet<NodeId> = nodes.into_iter().collect();
        let gone: Vec<NodeId> = self
            .nodes
            .keys()
            .filter(|n| !wanted.contains(n))
            .copied()
            .collect();
        for node in gone {
            self.nodes.remove(&node);
            let lost: Vec<Ticket> = self
                .tickets
                .iter()
                .filter(|(_, f)| f.node == node)
                .map(|(t, _)| *t)
                .collect();
            for ticket in lost {
                self.lose(ticket, Lost::Left);
            }
        }
        for node in wanted {
            self.nodes.entry(node).or_default();
        }
        self.dispatch(now);
    }

    /// The result of `ticket`. The caller checked it (signature, commitment,
    /// shape) first; an invalid answer is a [`Training::handle_failure`].
    /// The result is never spot-checked (see [`Training::handle_checked`]).
    pub fn handle_result(&mut self, now: UnixMillis, ticket: Ticket, result: R) -> Taken {
        self.take_result(now, ticket, result, None)
    }

    /// The result of `ticket`, committed to by `digest` (bit-identical for
    /// the same share on nodes of one determinism class), with a uniform
    /// 64-bit `draw` that decides whether it is checked.
    pub fn handle_checked(
        &mut self,
        now: UnixMillis,
        ticket: Ticket,
        result: R,
        digest: Hash,
        draw: u64,
    ) -> Taken {
        self.take_result(now, ticket, result, Some((digest, draw)))
    }

    fn take_result(
        &mut self,
        now: UnixMillis,
        ticket: Ticket,
        result: R,
        checked: Option<(Hash, u64)>,
    ) -> Taken {
        let Some(flight) = self.tickets.remove(&ticket) else {
            self.stats.dropped += 1;
            return Taken::Dropped;
        };
        if let Some(n) = self.nodes.get_mut(&flight.node) {
            if !flight.expired {
                n.in_flight = n.in_flight.saturating_sub(1);
            }
            // An answer, even a late one, shows the node is alive.
            n.benched_until = None;
        }
        // Tickets live only while their share waits for a result in the
        // round being computed (they are dropped otherwise).
        let index = flight.share as usize;
        if self.shares.get(index).is_none_or(|s| s.done.is_some()) {
            self.stats.dropped += 1;
            return Taken::Dropped;
        }
        let share_result = ShareResult {
            share: flight.share,
            node: flight.node,
            ticket,
            result,
        };
        self.shares[index].tickets.remove(&ticket);
        if let Some((digest, draw)) = checked {
            let candidate = Candidate {
                result: share_result,
                digest,
            };
            if let Some(held) = self.shares[index].check.as_mut() {
                held.push(candidate);
                return self.settle(now, index, ticket);
            }
            if self.ledger.sample(&flight.node, draw) {
                self.stats.sampled += 1;
                self.ledger.stats.sampled += 1;
                // Other first copies would only repeat the first result.
                let copies: Vec<Ticket> = self.shares[index].tickets.iter().copied().collect();
                for copy in copies {
                    self.drop_ticket(copy);
                }
                self.shares[index].check = Some(vec![candidate]);
                return self.settle(now, index, ticket);
            }
            return self.accept(now, index, candidate.result, flight.expired, true);
        }
        self.accept(now, index, share_result, flight.expired, true)
    }

    /// Keeps `result` for share `index`, drops every other copy, and moves
    /// the round on.
    fn accept(
        &mut self,
        now: UnixMillis,
        index: usize,
        result: ShareResult<R>,
        late: bool,
        unchecked: bool,
    ) -> Taken {
        let share = &mut self.shares[index];
        share.done = Some(result);
        share.unchecked = unchecked;
        share.check = None;
        share.undecided_reported = false;
        // Every other copy of the share is dropped.
        let copies: Vec<Ticket> = std::mem::take(&mut share.tickets).into_iter().collect();
        for copy in copies {
            self.drop_ticket(copy);
        }
        self.stats.accepted += 1;
        let taken = if late {
            self.stats.late += 1;
            Taken::Late
        } else {
            Taken::Accepted
        };
        if self.shares.iter().all(|s| s.done.is_some()) {
            self.finish_computing(now);
        } else {
            self.dispatch(now);
        }
        taken
    }

    /// Share `index` is under check and just got the result of `ticket`:
    /// takes the result two operators agree on, or asks for one more
    /// execution. Returns what became of `ticket`'s result.
    fn settle(&mut self, now: UnixMillis, index: usize, ticket: Ticket) -> Taken {
        let held = self.shares[index]
            .check
            .as_ref()
            .map_or(&[][..], Vec::as_slice);
        // A digest on which two operators agree.
        let agreed = held.iter().find_map(|c| {
            let operators: BTreeSet<NodeId> = held
                .iter()
                .filter(|o| o.digest == c.digest)
                .map(|o| self.ledger.operator(&o.result.node))
                .collect();
            (operators.len() >= 2).then_some(c.digest)
        });
        let Some(digest) = agreed else {
            if self.live_copies(index as u32) == 0 {
                self.dispatch(now);
            }
            return if self.shares[index].done.is_some() {
                // Taken unverifiable by the dispatch.
                Taken::Accepted
            } else {
                Taken::Checking
            };
        };
        let held = self.shares[index].check.take().unwrap_or_default();
        let round = self.round;
        let mut winner = None;
        let mut losers = Vec::new();
        let mut taken = Taken::Rejected;
        for c in held {
            if c.digest == digest {
                self.ledger.valid(c.result.node);
                if c.result.ticket == ticket {
                    taken = Taken::Accepted;
                }
                if winner.is_none() {
                    winner = Some(c.result);
                }
            } else {
                losers.push(c.result.node);
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
        for node in losers {
            self.exclude(round, index as u32, node);
        }
        if let Some(result) = winner {
            self.accept(now, index, result, false, false);
        }
        taken
    }

    /// `node` lost a check on `share`: off the run's scope, its flights
    /// dropped, its unchecked results of this round computed again.
    fn exclude(&mut self, round: u64, share: u32, node: NodeId) {
        self.ledger.invalid(node);
        if !self.ledger.is_excluded(&node, self.scope) {
            self.ledger.exclude(node, self.scope);
            self.stats.exclusions += 1;
            self.outputs
                .push_back(Output::Excluded { round, share, node });
        }
        let flights: Vec<Ticket> = self
            .tickets
            .iter()
            .filter(|(_, f)| f.node == node)
            .map(|(t, _)| *t)
            .collect();
        for ticket in flights {
            self.drop_ticket(ticket);
        }
        for s in &mut self.shares {
            if s.unchecked && s.done.as_ref().is_some_and(|d| d.node == node) {
                s.done = None;
                s.unchecked = false;
                self.stats.discarded += 1;
            }
            if let Some(held) = s.check.as_mut() {
                held.retain(|c| c.result.node != node);
                if held.is_empty() {
                    s.check = None;
                }
            }
        }
    }

    /// `ticket` brought no result: the node could not be reached, refused,
    /// or answered with something invalid. The node is benched and the share
    /// sent again. Returns whether the ticket was still wanted.
    pub fn handle_failure(&mut self, now: UnixMillis, ticket: Ticket, reason: &str) -> bool {
        let Some(flight) = self.tickets.get(&ticket) else {
            return false;
        };
        self.stats.failures += 1;
        let node = flight.node;
        if let Some(n) = self.nodes.get_mut(&node) {
            n.benched_until = Some(now.plus_millis(self.config.bench_ms));
        }
        self.lose(ticket, Lost::Failed(reason.to_owned()));
        self.dispatch(now);
        true
    }

    /// The caller combined round `round`'s results into `next`: the next
    /// round starts from them (or the run finishes).
    ///
    /// # Errors
    /// [`TrainError::NotAggregating`] unless round `round` is waiting for
    /// aggregation; nothing changes then.
    pub fn handle_aggregated(
        &mut self,
        now: UnixMillis,
        round: u64,
        next: ParamsRef,
    ) -> Result<(), TrainError> {
        if self.phase != (Phase::Aggregating { round }) {
            return Err(TrainError::NotAggregating {
                round,
                phase: self.phase,
            });
        }
        let record = RoundRecord {
            round,
            params: self.params,
            next,
            started_at: self.started_at,
            computed_at: self.computed_at,
            sends: self.shares.iter().map(|s| s.sends).sum(),
            reassigned: self.round_reassigned,
        };
        if self.history.len() == MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(record);
        self.round = round + 1;
        self.params = next;
        let last = self.round >= self.config.rounds;
        if last || self.round.is_multiple_of(self.config.persist_every) {
            self.outputs.push_back(Output::Persist(self.snapshot()));
        }
        if last {
            self.phase = Phase::Finished;
            self.shares.clear();
            self.outputs.push_back(Output::Finished {
                rounds: self.round,
                params: self.params,
            });
        } else {
            self.start_round(now);
        }
        Ok(())
    }

    /// Passes deadlines (their shares go elsewhere) and brings benched nodes
    /// back.
    pub fn tick(&mut self, now: UnixMillis) {
        for n in self.nodes.values_mut() {
            if n.benched_until.is_some_and(|t| t <= now) {
                n.benched_until = None;
            }
        }
        let due: Vec<Ticket> = self
            .tickets
            .iter()
            .filter(|(_, f)| !f.expired && f.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for ticket in due {
            let Some(flight) = self.tickets.get_mut(&ticket) else {
                continue;
            };
            flight.expired = true;
            let (node, share) = (flight.node, flight.share);
            self.stats.deadlines += 1;
            if let Some(n) = self.nodes.get_mut(&node) {
                n.in_flight = n.in_flight.saturating_sub(1);
                n.benched_until = Some(now.plus_millis(self.config.bench_ms));
            }
            // The ticket stays: a late answer is still taken while the share
            // has none.
            if self.live_copies(share) == 0 {
                self.reassign(share, node, Lost::Deadline);
            }
        }
        self.dispatch(now);
    }

    fn start_round(&mut self, now: UnixMillis) {
        self.phase = Phase::Computing { round: self.round };
        self.shares = (0..self.config.shares_per_round)
            .map(|_| Share::new())
            .collect();
        self.started_at = now;
        self.round_reassigned = 0;
        for n in self.nodes.values_mut() {
            n.assigned_this_round = 0;
        }
        self.dispatch(now);
    }

    fn finish_computing(&mut self, now: UnixMillis) {
        let round = self.round;
        self.phase = Phase::Aggregating { round };
        self.computed_at = now;
        // Nothing of this round is wanted any more.
        let left: Vec<Ticket> = self.tickets.keys().copied().collect();
        for ticket in left {
            self.drop_ticket(ticket);
        }
        let results = self
            .shares
            .iter_mut()
            .filter_map(|s| s.done.take())
            .collect();
        self.outputs.push_back(Output::Aggregate {
            round,
            params: self.params,
            results,
        });
    }

    /// Live (not expired) tickets out for `share`.
    fn live_copies(&self, share: u32) -> usize {
        self.shares.get(share as usize).map_or(0, |s| {
            s.tickets
                .iter()
                .filter(|t| self.tickets.get(t).is_some_and(|f| !f.expired))
                .count()
        })
    }

    /// Forgets `ticket` (its answer will be stale), freeing its node's slot.
    fn drop_ticket(&mut self, ticket: Ticket) {
        if let Some(flight) = self.tickets.remove(&ticket) {
            if !flight.expired
                && let Some(n) = self.nodes.get_mut(&flight.node)
            {
                n.in_flight = n.in_flight.saturating_sub(1);
            }
            if let Some(s) = self.shares.get_mut(flight.share as usize) {
                s.tickets.remove(&ticket);
            }
        }
    }

    /// `ticket` will bring nothing: forget it, and send its share again if
    /// no other copy is live.
    fn lose(&mut self, ticket: Ticket, reason: Lost) {
        let Some(flight) = self.tickets.get(&ticket) else {
            return;
        };
        let (share, node, expired) = (flight.share, flight.node, flight.expired);
        self.drop_ticket(ticket);
        let done = self
            .shares
            .get(share as usize)
            .is_none_or(|s| s.done.is_some());
        // An expired ticket's share was already sent again.
        if !done && !expired && self.live_copies(share) == 0 {
            self.reassign(share, node, reason);
        }
    }

    fn reassign(&mut self, share: u32, node: NodeId, reason: Lost) {
        self.stats.reassigned += 1;
        self.round_reassigned += 1;
        self.outputs.push_back(Output::Reassign {
            round: self.round,
            share,
            node,
            reason,
        });
    }

    /// A node to re-execute share `index` under check: one not excluded, of
    /// an operator none of the held results came from, of the determinism
    /// class of the first; free now, lowest load first.
    fn checker(&self, now: UnixMillis, index: usize) -> Checker {
        let Some(held) = self.shares[index].check.as_ref() else {
            return Checker::None;
        };
        let Some(first) = held.first() else {
            return Checker::None;
        };
        let operators: BTreeSet<NodeId> = held
            .iter()
            .map(|c| self.ledger.operator(&c.result.node))
            .collect();
        let max = self.config.max_in_flight_per_node;
        let mut eligible = self
            .nodes
            .iter()
            .filter(|(id, _)| {
                !self.ledger.is_excluded(id, self.scope)
                    && !operators.contains(&self.ledger.operator(id))
                    && self.ledger.same_class(id, &first.result.node)
            })
            .peekable();
        if eligible.peek().is_none() {
            return Checker::None;
        }
        eligible
            .filter(|(_, n)| n.available(now, max))
            .min_by_key(|(id, n)| (n.in_flight, n.assigned_this_round, **id))
            .map_or(Checker::Busy, |(id, _)| Checker::Node(*id))
    }

    /// Sends every share that has no live copy to the best available node
    /// (a share under check to a checker).
    fn dispatch(&mut self, now: UnixMillis) {
        let Phase::Computing { round } = self.phase else {
            return;
        };
        let mut unverifiable = Vec::new();
        for index in 0..self.shares.len() {
            let share = index as u32;
            if self.shares[index].done.is_some() || self.live_copies(share) > 0 {
                continue;
            }
            let check = self.shares[index].check.is_some();
            let node = if check {
                match self.checker(now, index) {
                    Checker::Node(node) => node,
                    Checker::Busy => continue,
                    Checker::None => {
                        let s = &mut self.shares[index];
                        let held = s.check.as_ref().map_or(0, Vec::len);
                        if held == 1 {
                            unverifiable.push(index);
                        } else if !s.undecided_reported {
                            s.undecided_reported = true;
                            let nodes = s.check.iter().flatten().map(|c| c.result.node).collect();
                            self.ledger.stats.undecided += 1;
                            self.outputs.push_back(Output::Undecided {
                                round,
                                share,
                                nodes,
                            });
                        }
                        continue;
                    }
                }
            } else {
                let max = self.config.max_in_flight_per_node;
                let Some(node) = self
                    .nodes
                    .iter()
                    .filter(|(id, n)| {
                        n.available(now, max) && !self.ledger.is_excluded(id, self.scope)
                    })
                    .min_by_key(|(id, n)| (n.in_flight, n.assigned_this_round, **id))
                    .map(|(id, _)| *id)
                else {
                    continue;
                };
                node
            };
            let ticket = Ticket(self.next_ticket);
            self.next_ticket += 1;
            let deadline = now.plus_millis(self.config.share_timeout_ms);
            if let Some(n) = self.nodes.get_mut(&node) {
                n.in_flight += 1;
                n.assigned_this_round += 1;
                // A node back from the bench starts afresh.
                n.benched_until = None;
            }
            let s = &mut self.shares[index];
            s.tickets.insert(ticket);
            s.sends += 1;
            let attempt = s.sends;
            self.tickets.insert(
                ticket,
                Flight {
                    share,
                    node,
                    deadline,
                    expired: false,
                },
            );
            self.stats.sent += 1;
            if check {
                self.stats.check_sends += 1;
                self.ledger.stats.check_units += 1;
            }
            self.outputs.push_back(Output::Send {
                ticket,
                node,
                round,
                share,
                params: self.params,
                deadline,
                attempt,
                check,
            });
        }
        // Sampled results no other operator's node can check are taken as
        // they are.
        for index in unverifiable {
            if let Some(c) = self.shares[index].check.take().and_then(|mut h| h.pop()) {
                self.stats.unverifiable += 1;
                self.ledger.stats.unverifiable += 1;
                if self.shares[index].done.is_none() {
                    self.shares[index].done = Some(c.result);
                    self.shares[index].unchecked = true;
                    self.stats.accepted += 1;
                }
            }
        }
        if matches!(self.phase, Phase::Computing { .. })
            && !self.shares.is_empty()
            && self.shares.iter().all(|s| s.done.is_some())
        {
            self.finish_computing(now);
        }
    }
}
