//! The nodes' side of a unit: running it on the stand-in model, corrupting
//! it when the node is an adversary, answering, and the ground truth the
//! simulation keeps to judge verification (who lied, what reached a
//! submitter, who was excluded).

use commons_coordinator::job::{Lane, StepFailure, StepResult, Ticket};
use commons_coordinator::verify::Profile;
use commons_protocol::messages::{DeterminismClass, ErrorCode, InferenceUnit, LayerRange};
use commons_protocol::{JobId, Tensor};
use rand::Rng as _;

use super::{Micros, SECOND, Simulation, node_id};
use crate::executor::{self, Session};

/// A unit in flight: where, since when, and the answer the node will give.
#[derive(Debug)]
pub(super) struct Flight {
    pub(super) node: u32,
    pub(super) started: Micros,
    pub(super) compute: Micros,
    job: JobId,
    lane: Lane,
    step: u64,
    layers: LayerRange,
    answer: Result<Tensor, StepFailure>,
    corrupt: bool,
}

/// What the simulation follows of an active job.
#[derive(Debug)]
pub(super) struct JobTrack {
    /// Failovers and released tokens, as last seen (never decreasing).
    pub(super) failovers: u32,
    pub(super) tokens: usize,
    /// The text honest nodes generate.
    pub(super) honest: Vec<u32>,
    /// The tokens released, as last seen.
    released: Vec<u32>,
    /// Which (step, layer) the job's chains have run, to count re-runs.
    ran: Vec<u64>,
}

impl JobTrack {
    pub(super) fn new(honest: Vec<u32>) -> Self {
        Self {
            failovers: 0,
            tokens: 0,
            honest,
            released: Vec::new(),
            ran: Vec::new(),
        }
    }

    /// Takes the tokens released now; returns how many newly released ones
    /// differ from the honest text.
    pub(super) fn release(&mut self, tokens: &[u32]) -> u64 {
        let same = self
            .released
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let wrong = tokens[same..]
            .iter()
            .enumerate()
            .filter(|(k, t)| self.honest.get(same + k) != Some(t))
            .count();
        if self.released.len() != tokens.len() || same != tokens.len() {
            self.released = tokens.to_vec();
        }
        wrong as u64
    }

    /// Marks `layers` of `step` as run (of a model of `n_layers`); the share
    /// of them that had run before.
    fn run(&mut self, step: u64, layers: LayerRange, n_layers: u32) -> f64 {
        let n = u64::from(n_layers);
        let mut again = 0u32;
        for l in layers.start..layers.end {
            let bit = step * n + u64::from(l);
            let (word, mask) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if word >= self.ran.len() {
                self.ran.resize(word + 1, 0);
            }
            again += u32::from(self.ran[word] & mask != 0);
            self.ran[word] |= mask;
        }
        f64::from(again) / f64::from(layers.len().max(1))
    }
}

const COLLUSION_DRAW: &str = "commons sim collusion draw v1";
const COLLUSION_KEY: &str = "commons sim collusion key v1";

impl Simulation {
    /// Node `i` runs `unit` (sent on `lane`), starting at `started` for
    /// `compute`: its answer, kept until it arrives.
    pub(super) fn execute(
        &mut self,
        i: u32,
        unit: &InferenceUnit,
        lane: Lane,
        started: Micros,
        compute: Micros,
    ) -> Flight {
        let n_layers = self.scenario.model.layers;
        self.nodes[i as usize].units += 1;
        let sessions = self.sessions.entry(unit.job).or_default();
        let key = (i, unit.session);
        let start_pos = unit.options.start_pos;
        if start_pos == 0 && !sessions.contains_key(&key) {
            sessions.insert(key, Session::new(unit.layers));
        }
        let answer = match sessions.get_mut(&key) {
            Some(s) if s.pos == start_pos => executor::run(s, unit.layers, n_layers, &unit.input)
                .ok_or_else(|| StepFailure::Refused {
                    code: ErrorCode::BAD_REQUEST,
                    message: "the input is neither tokens nor hidden states".into(),
                }),
            // A session this node never opened, or lost when it left.
            found => Err(StepFailure::Refused {
                code: ErrorCode::UNKNOWN_SESSION,
                message: format!(
                    "session at position {}, asked {start_pos}",
                    found.map_or(0, |s| s.pos)
                ),
            }),
        };
        let (answer, corrupt) = match answer {
            Ok(honest) => match self.lie(i, unit, lane, &honest) {
                Some(wrong) => (Ok(wrong), true),
                None => (Ok(honest), false),
            },
            Err(e) => (Err(e), false),
        };
        Flight {
            node: i,
            started,
            compute,
            job: unit.job,
            lane,
            step: unit.step,
            layers: unit.layers,
            answer,
            corrupt,
        }
    }

    /// What adversary `i` returns instead of `honest`, if it lies this time.
    fn lie(&mut self, i: u32, unit: &InferenceUnit, lane: Lane, honest: &Tensor) -> Option<Tensor> {
        let a = &self.scenario.adversaries;
        let node = &self.nodes[i as usize];
        if !node.adversary
            || node.units <= a.honest_units
            || (a.evade_checks && lane != Lane::Chain)
        {
            return None;
        }
        let f = a.corrupt_probability;
        if a.colluding {
            // Every colluder decides, and lies, alike on the same layers and inputs.
            let digest = honest.digest();
            let parts: [&[u8]; 4] = [
                &self.seed.to_le_bytes(),
                &unit.layers.start.to_le_bytes(),
                &unit.layers.end.to_le_bytes(),
                &digest.0,
            ];
            if !executor::below(executor::draw(COLLUSION_DRAW, &parts), f) {
                return None;
            }
            executor::corrupt(honest, executor::draw(COLLUSION_KEY, &parts))
        } else {
            if !self.rng.corruption.random_bool(f) {
                return None;
            }
            let key = self.rng.corruption.random::<u64>();
            executor::corrupt(honest, key)
        }
    }

    /// The answer to the unit sent with `ticket` reaches the coordinator,
    /// if node `node` is still there in session `epoch`.
    pub(super) fn unit_done(&mut self, ticket: u64, node: u32, epoch: u32) {
        let Some(flight) = self.in_flight.remove(&ticket) else {
            return;
        };
        let n = &self.nodes[node as usize];
        if !n.online || n.epoch != epoch {
            return;
        }
        let id = node_id(node);
        let layers = self.scenario.model.layers;
        if flight.lane == Lane::Chain {
            self.chain_us += flight.compute;
            if let Some(track) = self.tracks.get_mut(&flight.job) {
                let again = track.run(flight.step, flight.layers, layers);
                self.redone_us += (flight.compute as f64 * again) as Micros;
            }
        } else {
            self.check_us += flight.compute;
        }
        self.corrupt_results += u64::from(flight.corrupt);
        // What an adversary's corrupted chain result does: accepted or not,
        // sampled for a check or not (the coordinator's own counts tell).
        let watch = flight.corrupt && flight.lane == Lane::Chain;
        let before = watch.then(|| {
            (
                self.scheduler.ledger().probability(&id),
                self.scheduler.view(&flight.job).map_or(0, |v| v.receipts),
                self.scheduler.verify_stats().sampled,
            )
        });
        if let Some(a) = self.adversaries.get_mut(&node) {
            a.results += 1;
            a.corrupted += u64::from(flight.corrupt);
        }
        let result = flight.answer.map(|output| StepResult {
            executor: id,
            commitment: output.digest(),
            outputs: vec![output],
            input: None,
        });
        self.refresh_offers();
        let now = self.unix();
        self.scheduler.handle_result(now, Ticket(ticket), result);
        if let Some((p, receipts, sampled)) = before {
            let accepted = self
                .scheduler
                .view(&flight.job)
                .is_some_and(|v| v.receipts > receipts);
            let was_sampled = self.scheduler.verify_stats().sampled > sampled;
            let t_s = self.now as f64 / SECOND as f64;
            if let Some(a) = self.adversaries.get_mut(&node)
                && accepted
            {
                a.corrupt_chain += 1;
                if a.onset_s.is_none() {
                    a.onset_s = Some(t_s);
                    a.p_at_onset = Some(p);
                }
                if a.to_first_sample.is_none() {
                    let (lo, hi) = a.p_range.unwrap_or((p, p));
                    a.p_range = Some((lo.min(p), hi.max(p)));
                    if was_sampled {
                        a.to_first_sample = Some(a.corrupt_chain);
                    }
                }
            }
        }
        self.drain();
    }

    /// Gives the scheduler every node's profile when nodes were added: one
    /// determinism class, each node its own operator. Only adversaries make
    /// outputs differ, and without them profiles change nothing (honest
    /// outputs are bit-identical, and every checker is as near in class as
    /// any other), so they are set only when a scenario has adversaries.
    pub(super) fn refresh_profiles(&mut self) {
        if !self.profiles_dirty || self.scenario.adversaries.fraction <= 0.0 {
            return;
        }
        self.profiles_dirty = false;
        let class = DeterminismClass {
            kernel: "sim".into(),
            build: "sim".into(),
        };
        let profiles = (0..self.nodes.len() as u32)
            .map(|i| {
                let profile = Profile {
                    operator: node_id(i),
                    class: class.clone(),
                };
                (node_id(i), profile)
            })
            .collect();
        self.scheduler.set_profiles(profiles);
    }

    /// Turns the coordinator's new exclusions into catches (an adversary
    /// excluded) and false alarms (an honest node excluded), and logs
    /// rollbacks.
    pub(super) fn observe_verification(&mut self) {
        let stats = self.scheduler.verify_stats();
        if stats.rollbacks != self.rollbacks_seen {
            self.rollbacks_seen = stats.rollbacks;
            let total = stats.rollbacks;
            self.record(14, total, 0, || {
                format!("{{\"event\":\"rollback\",\"total\":{total}}}")
            });
        }
        if stats.exclusions == self.exclusions_seen {
            return;
        }
        self.exclusions_seen = stats.exclusions;
        let new: Vec<_> = self
            .scheduler
            .ledger()
            .exclusions()
            .keys()
            .filter(|n| !self.excluded.contains(n))
            .copied()
            .collect();
        for id in new {
            self.excluded.insert(id);
            let Some(i) = self.index_of(&id) else {
                continue;
            };
            let t_s = self.now as f64 / SECOND as f64;
            let caught = match self.adversaries.get_mut(&i) {
                Some(a) => {
                    a.excluded_s = Some(t_s);
                    a.results_at_exclusion = Some(a.results);
                    a.corrupted_at_exclusion = Some(a.corrupted);
                    self.catches += 1;
                    true
                }
                None => {
                    self.false_alarms += 1;
                    false
                }
            };
            let kind = if caught { "catch" } else { "false_alarm" };
            self.record(11 + u8::from(!caught), u64::from(i), 0, || {
                format!("{{\"event\":\"{kind}\",\"node\":{i}}}")
            });
        }
    }
}
