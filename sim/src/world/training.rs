//! Training rounds in the simulated world: the real training coordinator
//! ([`commons_coordinator::train::Training`]) drives shares over the online
//! nodes; the simulation gives each share a duration from the node's links
//! and speed, and answers it unless the node left first.

use std::collections::BTreeMap;

use commons_coordinator::train::{Mode, Output, Taken, Ticket, TrainConfig, Training};
use commons_protocol::Hash;
use commons_protocol::messages::ParamsRef;

use super::{Event, Micros, SECOND, Simulation, node_id, secs};
use crate::scenario::{self, TrainingMode};

/// A share in flight on a node.
#[derive(Debug)]
struct ShareFlight {
    node: u32,
    compute: Micros,
    upload_bytes: u64,
}

/// A training run in progress.
pub(super) struct TrainRun {
    machine: Training<()>,
    config: scenario::Training,
    flights: BTreeMap<u64, ShareFlight>,
    /// The round whose parameters each node holds.
    fetched: BTreeMap<u32, u64>,
    /// Online nodes changed since the machine last heard.
    pub(super) nodes_dirty: bool,
    round_started: Micros,
    round_times_s: Vec<f64>,
    finished_at: Option<Micros>,
    useful_us: u64,
    wasted_us: u64,
    bytes_down: u64,
    bytes_up: u64,
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainingReport {
    /// Rounds completed.
    pub rounds: u64,
    /// Simulated seconds at which the last round completed, if it did.
    pub finished_s: Option<f64>,
    /// Seconds each completed round took, in order.
    pub round_times_s: Vec<f64>,
    /// Shares sent, resends included.
    pub shares_sent: u64,
    /// Shares taken from a node (dead, late or gone) and sent again.
    pub reassigned: u64,
    /// Results that came after their share had been sent again, and counted.
    pub late: u64,
    /// Node-seconds of share compute whose result counted.
    pub useful_compute_s: f64,
    /// Node-seconds of share compute lost (node left, or result not needed).
    pub wasted_compute_s: f64,
    /// Bytes of parameters nodes fetched.
    pub bytes_down: u64,
    /// Bytes of share results that arrived.
    pub bytes_up: u64,
}

fn params(round: u64) -> ParamsRef {
    let root = Hash(*blake3::hash(&round.to_le_bytes()).as_bytes());
    ParamsRef {
        root,
        checkpoint: root,
    }
}

impl TrainRun {
    /// A run of `config`, from simulated time zero.
    pub(super) fn new(config: scenario::Training) -> Option<Self> {
        let machine = Training::new(
            TrainConfig {
                mode: match config.mode {
                    TrainingMode::Sync => Mode::Sync,
                    TrainingMode::Diloco => Mode::Diloco {
                        inner_steps: config.inner_steps,
                    },
                },
                rounds: config.rounds,
                shares_per_round: config.shares,
                share_timeout_ms: (config.share_timeout_s * 1e3).max(1.0) as u64,
                max_in_flight_per_node: 1,
                bench_ms: (config.bench_s * 1e3) as u64,
                persist_every: config.rounds,
            },
            params(0),
            commons_protocol::UnixMillis(0),
        )
        .ok()?;
        Some(Self {
            machine,
            config,
            flights: BTreeMap::new(),
            fetched: BTreeMap::new(),
            nodes_dirty: true,
            round_started: 0,
            round_times_s: Vec::new(),
            finished_at: None,
            useful_us: 0,
            wasted_us: 0,
            bytes_down: 0,
            bytes_up: 0,
        })
    }

    /// Rounds completed.
    pub(super) fn rounds(&self) -> u64 {
        self.round_times_s.len() as u64
    }

    /// The report.
    pub(super) fn report(&self) -> TrainingReport {
        let stats = self.machine.stats();
        TrainingReport {
            rounds: self.rounds(),
            finished_s: self.finished_at.map(|t| t as f64 / SECOND as f64),
            round_times_s: self.round_times_s.clone(),
            shares_sent: stats.sent,
            reassigned: stats.reassigned,
            late: stats.late,
            useful_compute_s: self.useful_us as f64 / SECOND as f64,
            wasted_compute_s: self.wasted_us as f64 / SECOND as f64,
            bytes_down: self.bytes_down,
            bytes_up: self.bytes_up,
        }
    }
}

impl Simulation {
    /// Once a second: tells the training coordinator who is online, checks
    /// deadlines, and carries out what it asks.
    pub(super) fn train_tick(&mut self) {
        let now = self.unix();
        let online: Vec<_> = if self.training.as_ref().is_some_and(|t| t.nodes_dirty) {
            (0..)
                .zip(&self.nodes)
                .filter(|(_, n)| n.online)
                .map(|(i, _)| node_id(i))
                .collect()
        } else {
            Vec::new()
        };
        let Some(run) = &mut self.training else {
            return;
        };
        if run.nodes_dirty {
            run.nodes_dirty = false;
            run.machine.set_nodes(now, online);
        }
        run.machine.tick(now);
        self.drain_training();
        if self
            .training
            .as_ref()
            .is_some_and(|t| t.finished_at.is_none())
        {
            self.at(self.now + SECOND, Event::TrainTick);
        }
    }

    /// Carries out what the training coordinator asks.
    pub(super) fn drain_training(&mut self) {
        loop {
            let Some(out) = self.training.as_mut().and_then(|t| t.machine.poll_output()) else {
                return;
            };
            match out {
                Output::Send {
                    ticket,
                    node,
                    round,
                    share,
                    ..
                } => self.send_share(ticket, node, round, share),
                Output::Aggregate { round, .. } => {
                    let wait = self
                        .training
                        .as_ref()
                        .map_or(0, |t| secs(t.config.aggregate_s));
                    self.at(self.now + wait, Event::Aggregated(round));
                }
                Output::Finished { rounds, .. } => {
                    if let Some(t) = &mut self.training {
                        t.finished_at = Some(self.now);
                    }
                    self.record(22, rounds, 1, || {
                        format!("{{\"event\":\"training_done\",\"rounds\":{rounds}}}")
                    });
                }
                _ => {}
            }
        }
    }

    fn send_share(
        &mut self,
        ticket: Ticket,
        node: commons_protocol::NodeId,
        round: u64,
        share: u32,
    ) {
        let Some(i) = self.index_of(&node) else {
            return;
        };
        let n = &self.nodes[i as usize];
        if !n.online {
            // Crashed, and the coordinator does not know yet: no answer.
            return;
        }
        let Some(run) = &self.training else {
            return;
        };
        let c = &run.config;
        let steps = match c.mode {
            TrainingMode::Sync => 1,
            TrainingMode::Diloco => u64::from(c.inner_steps),
        };
        let layers = c
            .layers_per_token
            .unwrap_or(3.0 * f64::from(self.scenario.model.layers));
        let compute = secs((steps * c.tokens_per_step) as f64 * layers / n.tokens_per_s);
        let fetch_bytes = if run.fetched.get(&i) == Some(&round) {
            0
        } else {
            c.parameters * 4
        };
        let upload_bytes = (c.parameters as f64 * c.gradient_bytes) as u64;
        let rtt = self.rtt(i);
        let fetch = self.transfer(i, fetch_bytes, false);
        let upload = self.transfer(i, upload_bytes, true);
        let start = (self.now + rtt / 2 + fetch).max(n.busy_until);
        let done = start + compute + upload + rtt / 2;
        let epoch = n.epoch;
        self.set_busy(i, start + compute);
        if let Some(run) = &mut self.training {
            run.fetched.insert(i, round);
            run.bytes_down += fetch_bytes;
            run.flights.insert(
                ticket.0,
                ShareFlight {
                    node: i,
                    compute,
                    upload_bytes,
                },
            );
        }
        self.record(20, u64::from(i), round << 32 | u64::from(share), || {
            format!("{{\"event\":\"share\",\"node\":{i},\"round\":{round},\"share\":{share}}}")
        });
        self.at(
            done,
            Event::ShareDone {
                ticket: ticket.0,
                node: i,
                epoch,
            },
        );
    }

    /// A share's answer arrives, unless its node left meanwhile.
    pub(super) fn share_done(&mut self, ticket: u64, node: u32, epoch: u32) {
        let now = self.unix();
        let alive = {
            let n = &self.nodes[node as usize];
            n.online && n.epoch == epoch
        };
        let Some(run) = &mut self.training else {
            return;
        };
        let Some(flight) = run.flights.remove(&ticket) else {
            return;
        };
        if !alive {
            run.wasted_us += flight.compute;
            return;
        }
        match run.machine.handle_result(now, Ticket(ticket), ()) {
            Taken::Accepted | Taken::Late => {
                run.useful_us += flight.compute;
                run.bytes_up += flight.upload_bytes;
            }
            _ => run.wasted_us += flight.compute,
        }
        self.record(21, u64::from(flight.node), ticket, || {
            format!(
                "{{\"event\":\"share_done\",\"node\":{},\"ticket\":{ticket}}}",
                flight.node
            )
        });
        self.drain_training();
    }

    /// The coordinator has combined `round`: the next one starts.
    pub(super) fn aggregated(&mut self, round: u64) {
        let now = self.unix();
        let Some(run) = &mut self.training else {
            return;
        };
        if run
            .machine
            .handle_aggregated(now, round, params(round + 1))
            .is_err()
        {
            return;
        }
        run.round_times_s
            .push(self.now.saturating_sub(run.round_started) as f64 / SECOND as f64);
        run.round_started = self.now;
        self.record(23, round, 0, || {
            format!("{{\"event\":\"round\",\"round\":{round}}}")
        });
        self.drain_training();
    }
}
