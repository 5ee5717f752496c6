//! Streaming a chain: a step's units sent to every hop at once, each hop
//! forwarding its output to the next (and, at depth 2, the last hop its
//! token to the first hop of the next step, already sent).
//!
//! A step in flight is a [`Wave`]: one slot per hop. Results may arrive in
//! any order; they are taken into the job in chain order, wave after wave,
//! each only when the one before it is in and it commits to that one as its
//! input ([`StepResult::input`]). A result that names another input means
//! the hop before sent one thing to the coordinator and another down the
//! chain (or that the hop lies about what it got): neither can be told from
//! the other, so no one is blamed, nothing of the step is taken, and the job
//! stops streaming. A failure of a slot drops every wave in flight and goes
//! to the usual failover; the job then runs one unit at a time, each with
//! its recorded input (the nodes rewind a session to such a unit's
//! position), until its hops are at the same step again.

use super::*;
use commons_protocol::BoundedVec;
use commons_protocol::messages::{Downstream, Upstream};

/// What happened to streamed steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Steps sent to a whole chain at once.
    pub waves: u64,
    /// Results whose input was not the result before them.
    pub mismatches: u64,
    /// Steps in flight dropped (a failure, a failover, a rollback, the end).
    pub dropped: u64,
}

/// A unit of a wave, and its answer once it came.
#[derive(Debug, Clone)]
struct Slot {
    ticket: Ticket,
    deadline: UnixMillis,
    answer: Option<Result<StepResult, StepFailure>>,
}

/// One step sent to every hop at once.
#[derive(Debug, Clone)]
struct Wave {
    step: usize,
    slots: Vec<Slot>,
    /// Hops whose result was taken (a prefix).
    taken: usize,
    /// The commitment of the last result taken: the next hop's input.
    last_taken: Option<Hash>,
    /// The first hop's input is the previous wave's token, not carried.
    chained: bool,
    /// The link by which the last hop sends its token to the first hop of
    /// the next step, if it does.
    token_link: Option<u64>,
}

/// A job's waves in flight.
#[derive(Debug, Clone, Default)]
pub(super) struct Stream {
    waves: VecDeque<Wave>,
    /// The commitment of the last hop's result of the last wave taken: the
    /// input a chained first hop must name.
    last_commitment: Option<Hash>,
    /// A result named another input: the job no longer streams.
    off: bool,
}

impl Stream {
    /// Whether `ticket` is one of the waves' units not yet answered.
    pub(super) fn holds(&self, ticket: Ticket) -> bool {
        self.waves
            .iter()
            .flat_map(|w| &w.slots)
            .any(|s| s.ticket == ticket && s.answer.is_none())
    }

    /// The units still awaited, with their deadlines.
    pub(super) fn awaited(&self) -> impl Iterator<Item = (Ticket, UnixMillis)> + '_ {
        self.waves
            .iter()
            .flat_map(|w| &w.slots)
            .filter(|s| s.answer.is_none())
            .map(|s| (s.ticket, s.deadline))
    }

    /// Drops every wave: their units are no longer awaited. Returns how many.
    pub(super) fn abandon(&mut self, tickets: &mut BTreeMap<Ticket, JobId>) -> u64 {
        let n = self.waves.len() as u64;
        for wave in self.waves.drain(..) {
            for slot in wave.slots {
                tickets.remove(&slot.ticket);
            }
        }
        self.last_commitment = None;
        n
    }
}

impl Scheduler {
    /// What streaming did.
    #[must_use]
    pub fn stream_stats(&self) -> StreamStats {
        self.stream_stats
    }

    /// Sends the job's next waves while it streams; false when it does not
    /// (then its chain runs one unit at a time).
    pub(super) fn pump_stream(&mut self, now: UnixMillis, id: JobId) -> bool {
        let depth = self.config.stream_depth;
        let Some(job) = self.jobs.get(&id) else {
            return false;
        };
        if depth == 0 || job.stream.off || job.chain.is_empty() {
            return false;
        }
        if job.status != JobStatus::Running || job.ending.is_some() || job.awaiting_sample {
            return !job.stream.waves.is_empty();
        }
        while self
            .jobs
            .get(&id)
            .is_some_and(|j| j.stream.waves.len() < depth)
        {
            if !self.send_wave(now, id) {
                break;
            }
        }
        self.jobs
            .get(&id)
            .is_some_and(|j| !j.stream.waves.is_empty())
    }

    /// Sends the job's next step to its whole chain, if it can go: with no
    /// wave in flight, when every hop has run the same steps and the first
    /// has the next input; behind a wave, when that wave's last hop sends
    /// its token on.
    fn send_wave(&mut self, now: UnixMillis, id: JobId) -> bool {
        let depth = self.config.stream_depth;
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        let (step, chained) = match job.stream.waves.back() {
            None => {
                let applied = job.chain[0].done;
                let in_sync = job.chain.iter().enumerate().all(|(h, hop)| {
                    hop.done == applied && hop.inputs.len() == applied + usize::from(h == 0)
                });
                if !in_sync {
                    return false;
                }
                (applied, false)
            }
            Some(Wave {
                step,
                token_link: Some(_),
                ..
            }) => (step + 1, true),
            Some(_) => return false,
        };
        let token_in = job.stream.waves.back().and_then(|w| w.token_link);
        let greedy = job.spec.sampling.temperature == 0.0;
        let context = self
            .models
            .get(&job.spec.model)
            .map_or(0, |m| m.context_length as usize);
        // Generation goes on after this step's token.
        let continues =
            step + 1 < job.spec.max_tokens as usize && job.spec.prompt.len() + step + 1 < context;
        let forwards_token = depth >= 2 && greedy && continues;
        let last = job.chain.len() - 1;
        // The step's tokens: the prompt, then one.
        let tokens_in = if step == 0 {
            job.spec.prompt.len() as u64
        } else {
            1
        };
        let waves_ahead = job.stream.waves.len() as u64;
        let tickets: Vec<Ticket> = (0..=last)
            .map(|_| {
                self.next_ticket += 1;
                Ticket(self.next_ticket - 1)
            })
            .collect();
        // The link into hop `h`, and the last hop's to the next step.
        let link = |h: usize| link_id(self.seed, &id, tickets[h], 0);
        let token_link = forwards_token.then(|| link_id(self.seed, &id, tickets[last], 1));
        let mut slots = Vec::with_capacity(job.chain.len());
        for (h, &ticket) in tickets.iter().enumerate() {
            let carried = h == 0 && !chained;
            let input = if carried {
                job.chain[0].inputs[step].clone()
            } else {
                empty_input()
            };
            let session = job.chain[h].session;
            let (mut unit, deadline) = unit_with(
                &self.config,
                now,
                id,
                job,
                h,
                step,
                session,
                input,
                tokens_in,
            );
            unit.options.order = ticket.0;
            if !carried {
                let (from, link) = if h == 0 {
                    (&job.chain[last], token_in.unwrap_or_default())
                } else {
                    (&job.chain[h - 1], link(h))
                };
                unit.options.input_from = Some(Upstream {
                    executor: from.node,
                    link,
                });
            }
            if h < last {
                unit.options.forward_to = Some(Downstream {
                    node: job.chain[h + 1].node,
                    link: link(h + 1),
                    unless: BoundedVec::new(),
                });
            } else if let Some(link) = token_link {
                let unless = job.spec.stop_tokens.iter().copied().take(16).collect();
                unit.options.forward_to = Some(Downstream {
                    node: job.chain[0].node,
                    link,
                    unless: BoundedVec::try_from_vec(unless).unwrap_or_default(),
                });
            }
            // A unit waits for the hops before it, and a step for the one before.
            let wait = (waves_ahead * (last as u64 + 1) + h as u64).min(64);
            let deadline = UnixMillis(
                deadline.0
                    + wait * (self.config.unit_timeout_ms / 4).max(1)
                    + self.config.unit_timeout_per_token_ms * tokens_in * h as u64,
            );
            self.tickets.insert(ticket, id);
            self.outputs.push_back(Output::Send {
                ticket,
                job: id,
                node: job.chain[h].node,
                unit,
                deadline,
                lane: Lane::Chain,
            });
            slots.push(Slot {
                ticket,
                deadline,
                answer: None,
            });
        }
        job.stream.waves.push_back(Wave {
            step,
            slots,
            taken: 0,
            last_taken: None,
            chained,
            token_link,
        });
        self.stream_stats.waves += 1;
        true
    }

    /// The answer to a streamed unit: kept, then whatever can be taken is.
    pub(super) fn on_stream_result(
        &mut self,
        now: UnixMillis,
        id: JobId,
        ticket: Ticket,
        outcome: Result<StepResult, StepFailure>,
    ) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let chain = &job.chain;
        for wave in &mut job.stream.waves {
            if let Some((h, slot)) = wave
                .slots
                .iter_mut()
                .enumerate()
                .find(|(_, s)| s.ticket == ticket)
            {
                let outcome = outcome.and_then(|r| {
                    let node = chain[h].node;
                    if r.executor == node {
                        Ok(r)
                    } else {
                        Err(StepFailure::Invalid(format!(
                            "result signed by {}, not by {node}",
                            r.executor
                        )))
                    }
                });
                slot.answer = Some(outcome);
                break;
            }
        }
        self.take_stream(now, id);
    }

    /// Takes the answers that can be taken, in chain order.
    fn take_stream(&mut self, now: UnixMillis, id: JobId) {
        loop {
            let Some(job) = self.jobs.get_mut(&id) else {
                return;
            };
            let Some(wave) = job.stream.waves.front_mut() else {
                return;
            };
            let h = wave.taken;
            if h == wave.slots.len() {
                job.stream.waves.pop_front();
                continue;
            }
            let (step, ticket, deadline) =
                (wave.step, wave.slots[h].ticket, wave.slots[h].deadline);
            let expected = if h > 0 {
                wave.last_taken
            } else if wave.chained {
                job.stream.last_commitment
            } else {
                None
            };
            let last = h + 1 == wave.slots.len();
            match wave.slots[h].answer.take() {
                None => return,
                // The input never came: the hop before did not send it here,
                // or could not. Not this hop's fault; the step goes again
                // with the input the coordinator has.
                Some(Err(StepFailure::Refused { code, .. })) if code == ErrorCode::NO_INPUT => {
                    if let Some(job) = self.jobs.get_mut(&id) {
                        job.stream.off = true;
                    }
                    self.drop_stream(id);
                    return;
                }
                Some(Err(failure)) => {
                    self.tickets.remove(&ticket);
                    self.drop_stream(id);
                    self.on_failure(now, id, h, &failure);
                    return;
                }
                Some(Ok(result)) if result.input != expected => {
                    self.stream_stats.mismatches += 1;
                    if let Some(job) = self.jobs.get_mut(&id) {
                        job.stream.off = true;
                    }
                    self.drop_stream(id);
                    return;
                }
                Some(Ok(result)) => {
                    self.tickets.remove(&ticket);
                    wave.taken += 1;
                    wave.last_taken = Some(result.commitment);
                    if last {
                        job.stream.last_commitment = Some(result.commitment);
                    }
                    let flight = InFlight {
                        ticket,
                        hop: h,
                        step,
                        deadline,
                    };
                    let failovers = job.failovers;
                    let taken = self.on_result(now, id, flight, result);
                    let Some(job) = self.jobs.get(&id) else {
                        return;
                    };
                    let goes_on = taken
                        && job.failovers == failovers
                        && job.status == JobStatus::Running
                        && job.ending.is_none()
                        && !job.awaiting_sample;
                    if !goes_on {
                        self.drop_stream(id);
                        return;
                    }
                }
            }
        }
    }

    /// Drops the job's waves in flight, counted.
    fn drop_stream(&mut self, id: JobId) {
        if let Some(job) = self.jobs.get_mut(&id) {
            self.stream_stats.dropped += job.stream.abandon(&mut self.tickets);
        }
    }
}

const LINK_DOMAIN: &str = "commons stream link v1";

/// The link a forwarded output goes by: unique to the receiving unit (its
/// ticket, and `kind` 1 for a token into the next step), and unguessable
/// without the scheduler's seed.
fn link_id(seed: u64, job: &JobId, ticket: Ticket, kind: u8) -> u64 {
    let h = Hash::of_parts(
        LINK_DOMAIN,
        &[
            &seed.to_le_bytes(),
            &job.0,
            &ticket.0.to_le_bytes(),
            &[kind],
        ],
    );
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.0[..8]);
    u64::from_le_bytes(b)
}

/// The input of a unit whose input is forwarded: no values.
fn empty_input() -> Tensor {
    Tensor::from_u32(&[0], &[])
        .unwrap_or_else(|_| unreachable!("an empty tensor of no values is well formed"))
}

#[cfg(test)]
mod tests;
