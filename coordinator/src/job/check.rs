//! Spot checks: re-executing sampled steps of a hop on another node, and
//! settling disagreements two out of three.
//!
//! A hop's steps depend on its KV cache, so a checker cannot run one step
//! alone: it opens its own session and replays the hop's recorded inputs, in
//! the same chunks, up to the sampled step. Every step it replays is compared
//! too when [`VerifyConfig::compare_replays`](crate::verify::VerifyConfig) is
//! on (its outputs cost nothing more), and the session stays open, so a later
//! sample on the same hop costs only the steps since.
//!
//! Tokens from the first pending sampled step on are held back from the
//! submitter ([`JobView::tokens`]); a job whose generation ended finishes only
//! once its checks settle. On a disagreement a referee, a third node of
//! another operator, replays the step: the side it agrees with wins. The loser
//! is excluded from the coalition's work, and every job that used results of
//! it that no check confirmed goes back to the first of them and generates
//! again on other nodes. When no referee can decide, both nodes leave the job
//! and it goes back all the same: nothing that failed verification reaches
//! the submitter. A node that disagrees, undecided, with two operators in
//! good standing is excluded as the odd one out.

use super::*;
use crate::verify::Scope;

const DRAW_DOMAIN: &str = "commons spot check draw v1";

/// A node re-executing a hop's steps in a session of its own.
#[derive(Debug, Clone)]
pub(super) struct Shadow {
    node: NodeId,
    session: SessionId,
    /// Steps it has run.
    done: usize,
    pub(super) in_flight: Option<InFlight>,
}

/// A checker that disagreed with a hop at `step`.
#[derive(Debug, Clone)]
pub(super) struct Dispute {
    step: usize,
    checker: NodeId,
    output: Tensor,
}

/// The uniform draw that decides whether step `step` of a hop's session is checked.
pub(super) fn draw(seed: u64, job: &JobId, session: &SessionId, step: usize) -> u64 {
    let h = Hash::of_parts(
        DRAW_DOMAIN,
        &[
            &seed.to_le_bytes(),
            &job.0,
            &session.0,
            &(step as u64).to_le_bytes(),
        ],
    );
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.0[..8]);
    u64::from_le_bytes(b)
}

/// Stops checking `hop` (it leaves its chain or its job ends): the unit in
/// flight is no longer awaited, and its pending samples count as unverifiable.
pub(super) fn retire(
    hop: &mut Hop,
    tickets: &mut BTreeMap<Ticket, JobId>,
    stats: &mut VerifyStats,
) {
    if let Some(f) = hop.check.take().and_then(|c| c.in_flight) {
        tickets.remove(&f.ticket);
    }
    stats.unverifiable += hop.flagged.len() as u64;
    hop.flagged.clear();
    hop.dispute = None;
    hop.outputs = Vec::new();
}

/// How a dispute ended.
enum Verdict {
    /// The hop's node was wrong.
    Original,
    /// The checker was wrong.
    Checker,
    /// No two of three agree, or no referee could be found.
    Undecided,
}

impl Scheduler {
    /// Ends generation with `status`: the job finishes as soon as no check is pending.
    pub(super) fn end_generation(&mut self, now: UnixMillis, id: JobId, status: JobStatus) {
        if let Some(job) = self.jobs.get_mut(&id) {
            job.ending = Some(status);
        }
        self.settle(now, id);
    }

    /// Releases the tokens no pending check holds back, and finishes a job
    /// whose generation ended once nothing is pending.
    pub(super) fn settle(&mut self, now: UnixMillis, id: JobId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.status.is_terminal() {
            return;
        }
        let held = job
            .chain
            .iter()
            .filter_map(|h| h.flagged.first().copied())
            .min();
        let releasable = held.map_or(job.tokens.len(), |s| s.min(job.tokens.len()));
        if releasable > job.released {
            job.released = releasable;
            self.outputs.push_back(Output::Changed { job: id });
        }
        if held.is_none()
            && let Some(status) = job.ending.take()
        {
            self.finish(now, id, status);
        }
    }

    /// The answer to a check unit of `id` sent with `ticket`.
    pub(super) fn on_check_result(
        &mut self,
        now: UnixMillis,
        id: JobId,
        ticket: Ticket,
        outcome: Result<StepResult, StepFailure>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(h) = job.chain.iter().position(|hop| {
            hop.check
                .as_ref()
                .and_then(|c| c.in_flight.as_ref())
                .is_some_and(|f| f.ticket == ticket)
        }) else {
            return;
        };
        let hop = &mut job.chain[h];
        let Some(shadow) = hop.check.as_mut() else {
            return;
        };
        let Some(flight) = shadow.in_flight.take() else {
            return;
        };
        let checker = shadow.node;
        let output = outcome.ok().and_then(|r| {
            let [output] = <[Tensor; 1]>::try_from(r.outputs).ok()?;
            (r.executor == checker).then_some(output)
        });
        let Some(output) = output else {
            // A checker that fails is not a verdict on anyone: another takes over.
            hop.check_banned.insert(checker);
            hop.check = None;
            return;
        };
        shadow.done += 1;
        let step = flight.step;
        let Some(original) = hop.outputs.get(step) else {
            return;
        };
        if let Some(dispute) = &hop.dispute {
            if step < dispute.step {
                return;
            }
            let with_original = self
                .ledger
                .agree((&hop.node, original), (&checker, &output));
            let with_checker = self
                .ledger
                .agree((&dispute.checker, &dispute.output), (&checker, &output));
            let verdict = match (with_original, with_checker) {
                (false, true) => Verdict::Original,
                (true, false) => Verdict::Checker,
                _ => Verdict::Undecided,
            };
            self.ledger.stats.decided += u64::from(!matches!(verdict, Verdict::Undecided));
            self.decide(now, id, h, checker, verdict);
            return;
        }
        let compare = hop.flagged.contains(&step)
            || (self.ledger.config().compare_replays && step >= hop.verified);
        if !compare {
            return;
        }
        self.ledger.stats.compared += 1;
        if self
            .ledger
            .agree((&hop.node, original), (&checker, &output))
        {
            self.ledger.valid(hop.node);
            self.ledger.valid(checker);
            job.verified += 1;
            if step == hop.verified {
                hop.verified += 1;
            }
            hop.flagged.remove(&step);
            self.settle(now, id);
        } else {
            self.ledger.stats.mismatches += 1;
            hop.flagged.insert(step);
            hop.check_banned.insert(checker);
            hop.check = None;
            hop.dispute = Some(Dispute {
                step,
                checker,
                output,
            });
        }
    }

    /// Acts on the referee's verdict on the dispute of hop `h` of `id`.
    fn decide(&mut self, now: UnixMillis, id: JobId, h: usize, referee: NodeId, verdict: Verdict) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let scope = job.coalition;
        let hop = &mut job.chain[h];
        let Some(dispute) = hop.dispute.take() else {
            return;
        };
        let original = hop.node;
        match verdict {
            Verdict::Original => {
                self.ledger.valid(dispute.checker);
                self.ledger.valid(referee);
                self.ledger.invalid(original);
                self.punish(now, original, scope);
            }
            Verdict::Checker => {
                // The original stands; the referee's session goes on checking this hop.
                hop.flagged.remove(&dispute.step);
                if dispute.step == hop.verified {
                    hop.verified += 1;
                }
                job.verified += 1;
                self.ledger.valid(original);
                self.ledger.valid(referee);
                self.ledger.invalid(dispute.checker);
                self.punish(now, dispute.checker, scope);
                self.settle(now, id);
            }
            Verdict::Undecided => self.undecided(now, id, original, dispute.checker),
        }
    }

    /// No majority: neither node serves the job again, and it goes back to
    /// before the first result of the hop's node that no check confirmed.
    /// Both are back on probation; one that keeps disagreeing with distinct
    /// operators is excluded all the same ([`VerifyConfig::undecided_limit`]).
    ///
    /// [`VerifyConfig::undecided_limit`]: crate::verify::VerifyConfig::undecided_limit
    fn undecided(&mut self, now: UnixMillis, id: JobId, original: NodeId, checker: NodeId) {
        self.ledger.stats.undecided += 1;
        self.ledger.invalid(original);
        self.ledger.invalid(checker);
        let mut scope = None;
        if let Some(job) = self.jobs.get_mut(&id) {
            scope = job.coalition;
            job.banned.insert(checker);
            forget_checker(job, checker, &mut self.tickets);
        }
        self.rollback(now, id, original);
        for odd in self.ledger.disagreed(original, checker, scope) {
            self.punish(now, odd, scope);
        }
    }

    /// Excludes `loser` from `scope`'s work and re-executes every result of
    /// it that no check confirmed, in every job of that scope.
    fn punish(&mut self, now: UnixMillis, loser: NodeId, scope: Scope) {
        self.ledger.exclude(loser, scope);
        let affected: Vec<JobId> =
            self.jobs
                .iter()
                .filter(|(_, j)| !j.status.is_terminal() && j.coalition == scope)
                .filter(|(_, j)| {
                    j.chain.iter().chain(&j.retired).any(|h| {
                        h.node == loser || h.check.as_ref().is_some_and(|c| c.node == loser)
                    })
                })
                .map(|(id, _)| *id)
                .collect();
        for id in affected {
            if let Some(job) = self.jobs.get_mut(&id) {
                forget_checker(job, loser, &mut self.tickets);
            }
            self.rollback(now, id, loser);
            self.pump(now, id);
        }
    }

    /// Sends `id` back to before the first result of `bad` that no check
    /// confirmed (and before any pending check), on a new chain without `bad`.
    /// Does nothing when every result of `bad` in the job was confirmed and it
    /// is no longer part of the chain.
    fn rollback(&mut self, now: UnixMillis, id: JobId, bad: NodeId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.status.is_terminal() {
            return;
        }
        job.banned.insert(bad);
        let unconfirmed = job
            .chain
            .iter()
            .chain(&job.retired)
            .filter(|h| h.node == bad && h.done > h.verified)
            .map(|h| h.verified)
            .min();
        let in_chain = job.chain.iter().any(|h| h.node == bad);
        let from = match unconfirmed {
            Some(step) => step,
            None if in_chain && job.ending.is_none() => job.tokens.len(),
            None => {
                self.settle(now, id);
                return;
            }
        };
        let pending = job
            .chain
            .iter()
            .filter_map(|h| h.flagged.first().copied())
            .min();
        let from = pending.map_or(from, |p| p.min(from)).min(job.tokens.len());
        self.ledger.stats.rollbacks += 1;
        if let Some(f) = job.in_flight.take() {
            self.tickets.remove(&f.ticket);
        }
        job.stream.abandon(&mut self.tickets);
        job.awaiting_sample = false;
        job.ending = None;
        job.tokens.truncate(from);
        if job.released > from {
            job.released = from;
            job.revisions += 1;
        }
        for mut hop in std::mem::take(&mut job.chain) {
            retire(&mut hop, &mut self.tickets, &mut self.ledger.stats);
            hop.inputs = Vec::new();
            job.retired.push(hop);
        }
        let route = self.models.get(&job.spec.model).and_then(|info| {
            let whole = LayerRange {
                start: 0,
                end: info.n_layers,
            };
            let usable =
                |o: &SpanOffer| may_serve(&self.coalitions, &self.ledger, job.coalition, o);
            info.offers
                .route(whole, &job.banned, Spans::Whole, usable)
                .ok()
                .filter(|r| !r.is_empty())
        });
        let Some(route) = route else {
            let status = JobStatus::Failed {
                code: ErrorCode::NO_ROUTE,
                message: format!(
                    "node {bad} failed verification and no other chain of nodes{} serves model {}",
                    in_coalition(job.coalition),
                    job.spec.model
                ),
            };
            self.finish(now, id, status);
            return;
        };
        job.chain = job.open_hops(self.seed, &id, route);
        let first = &mut job.chain[0];
        first.inputs.push(token_tensor(&job.spec.prompt));
        for &t in &job.tokens {
            first.inputs.push(token_tensor(&[t]));
        }
        self.outputs.push_back(Output::Changed { job: id });
    }

    /// Sends each hop's checker (or referee) its next step, choosing one
    /// first where a sample or a dispute needs it.
    pub(super) fn pump_checks(&mut self, now: UnixMillis, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.status != JobStatus::Running {
            return;
        }
        for h in 0..job.chain.len() {
            self.pump_check(now, id, h);
        }
    }

    fn pump_check(&mut self, now: UnixMillis, id: JobId, h: usize) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let Some(hop) = job.chain.get(h) else {
            return;
        };
        let target = match &hop.dispute {
            Some(d) => d.step,
            None => match hop.flagged.last() {
                Some(&s) => s,
                None => return,
            },
        };
        if hop.check.is_none() {
            let Some(node) = self.choose_checker(job, hop) else {
                if let Some(d) = &hop.dispute {
                    let (original, checker) = (hop.node, d.checker);
                    if let Some(job) = self.jobs.get_mut(&id) {
                        job.chain[h].dispute = None;
                    }
                    self.undecided(now, id, original, checker);
                } else {
                    self.ledger.stats.unverifiable += hop.flagged.len() as u64;
                    if let Some(job) = self.jobs.get_mut(&id) {
                        job.chain[h].flagged.clear();
                    }
                    self.settle(now, id);
                }
                return;
            };
            let Some(job) = self.jobs.get_mut(&id) else {
                return;
            };
            let session = job.next_session(self.seed, &id);
            job.chain[h].check = Some(Shadow {
                node,
                session,
                done: 0,
                in_flight: None,
            });
        }
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let hop = &job.chain[h];
        let Some(shadow) = hop.check.as_ref() else {
            return;
        };
        let step = shadow.done;
        if shadow.in_flight.is_some() || step > target || step >= hop.done {
            return;
        }
        let (node, session) = (shadow.node, shadow.session);
        let lane = if hop.dispute.is_some() {
            Lane::Referee
        } else {
            Lane::Check
        };
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let (mut unit, deadline) = unit_for(&self.config, now, id, job, h, step, session);
        unit.options.order = ticket.0;
        job.check_units += 1;
        self.ledger.stats.check_units += 1;
        if let Some(shadow) = job.chain[h].check.as_mut() {
            shadow.in_flight = Some(InFlight {
                ticket,
                hop: h,
                step,
                deadline,
            });
        }
        self.tickets.insert(ticket, id);
        self.outputs.push_back(Output::Send {
            ticket,
            job: id,
            node,
            unit,
            deadline,
            lane,
        });
    }

    /// The node that re-executes `hop`'s steps: another operator's node
    /// holding its layers (exactly, or within a larger span: a node runs
    /// any part of what it holds), serving the job's coalition, neither
    /// excluded nor banned; of the hop node's determinism class if possible
    /// (bit-exact comparison), then the fastest.
    fn choose_checker(&self, job: &Job, hop: &Hop) -> Option<NodeId> {
        let info = self.models.get(&job.spec.model)?;
        let operator = self.ledger.operator(&hop.node);
        let other = hop
            .dispute
            .as_ref()
            .map(|d| self.ledger.operator(&d.checker));
        info.offers
            .containing(hop.layers)
            .filter(|o| may_serve(&self.coalitions, &self.ledger, job.coalition, o))
            .filter(|o| o.node != hop.node && self.ledger.operator(&o.node) != operator)
            .filter(|o| other != Some(self.ledger.operator(&o.node)))
            .filter(|o| !job.banned.contains(&o.node) && !hop.check_banned.contains(&o.node))
            .map(|o| {
                let cost = o.ms_per_layer * f64::from(hop.layers.len()) + o.rtt_ms + o.queue_ms;
                (!self.ledger.same_class(&o.node, &hop.node), cost, o.node)
            })
            // A total order, so the choice never depends on the offers' order.
            .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)))
            .map(|(_, _, node)| node)
    }
}

/// Drops every check `node` runs for `job`.
fn forget_checker(job: &mut Job, node: NodeId, tickets: &mut BTreeMap<Ticket, JobId>) {
    for hop in &mut job.chain {
        if hop.check.as_ref().is_some_and(|c| c.node == node) {
            if let Some(f) = hop.check.take().and_then(|c| c.in_flight) {
                tickets.remove(&f.ticket);
            }
            hop.check_banned.insert(node);
            // What it confirmed counts for nothing now.
            hop.verified = 0;
        }
    }
}
