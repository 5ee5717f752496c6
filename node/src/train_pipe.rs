//! Pipeline-parallel training over the swarm (`mode = "pipeline"` in a
//! run's configuration), driven by `commons train submit`.
//!
//! The model's layers are cut into `stages` ranges ([`even_ranges`]) and
//! every round's batch of `batch_size` rows into `shares` micro-batches. The
//! pure state machine [`PipelineTraining`] gives each stage a training node
//! and sends a stage unit ([`GradientMode::Stage`]) as soon as its inputs
//! are there: the hidden states a stage after the first starts from, and for
//! a backward pass of a stage before the last the gradient of its output,
//! travel inside the unit. Each stage's node fetches only its stage's
//! checkpoint. A backward unit recomputes its stage's forward pass, so
//! units are stateless and a lost node costs only its units in flight.
//!
//! When every backward unit of the round is in, each stage's parameter
//! gradients are summed over its micro-batches (in micro-batch order) and
//! scaled by `1 / shares`, merged into the model's canonical order (a tied
//! embedding gets the sum of the first and last stage's gradients), and
//! AdamW takes one step; the round's batch and rows are those of a
//! synchronous run, so the run follows single-process training on the same
//! batches up to f32 rounding. Then every stage's new checkpoint is shared.

use std::collections::{BTreeSet, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use commons_coordinator::train::pipeline::{Output, Pass, PipelineTraining, Taken, Task};
use commons_coordinator::train::{Lost, Snapshot, Ticket};
use commons_protocol::envelope::Envelope;
use commons_protocol::messages::{
    DataShardRef, GradientEncoding, GradientMode, GradientUnit, LayerRange, ParamsRef, Receipt,
    StagePass, WorkBody, WorkUnit,
};
use commons_protocol::{CoalitionId, Hash, Identity, JobId, ModelId, NodeId};
use commons_train::even_ranges;
use tokio::sync::{mpsc, oneshot};

use crate::network::Command;
use crate::train_cli::{
    Learner, Row, ShardFile, append_receipt, check_draw, event, now, outputs_digest, profiles,
    save_snapshot, trainers,
};
use crate::train_config::{Dataset, RunConfig};

/// Stage checkpoints kept shared: this round's and the last.
const SHARED_ROUNDS: usize = 2;

/// What a pipeline run starts from.
pub(crate) struct Setup {
    pub(crate) config: RunConfig,
    pub(crate) dataset: Arc<Dataset>,
    pub(crate) run: JobId,
    pub(crate) out: PathBuf,
    pub(crate) identity: Arc<Identity>,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) learner: Learner,
    pub(crate) shard_files: Vec<ShardFile>,
    pub(crate) rows: Vec<Row>,
    pub(crate) nonces: crate::identity::Nonces,
    pub(crate) json: bool,
    pub(crate) bar: indicatif::ProgressBar,
    pub(crate) receipts: std::fs::File,
    pub(crate) snapshot: Snapshot,
    pub(crate) started: Instant,
}

/// A stage unit's checked answer.
#[derive(Debug)]
pub(crate) struct Answer {
    /// A forward unit's output hidden states.
    hidden: Option<commons_protocol::Tensor>,
    /// A backward unit's gradient with respect to its input (stages after
    /// the first).
    grad_in: Option<commons_protocol::Tensor>,
    /// The micro-batch's mean loss (the last stage's backward unit).
    loss: Option<f32>,
    /// A backward unit's parameter gradients, the stage's canonical order.
    values: Vec<f32>,
}

/// A checked answer: the answer, its receipt, its bytes and the digest of
/// its outputs (equal for the same unit on nodes of one determinism class).
type Checked = (Answer, Receipt, u64, Hash);

type Outcome = (Ticket, Task, Result<Checked, String>);

/// Drives a pipeline-parallel run (see the module docs).
pub(crate) struct Driver {
    config: RunConfig,
    dataset: Arc<Dataset>,
    run: JobId,
    out: PathBuf,
    identity: Arc<Identity>,
    commands: mpsc::Sender<Command>,
    machine: PipelineTraining<Arc<Answer>>,
    learner: Option<Learner>,
    ranges: Vec<Range<usize>>,
    /// Parameters per stage.
    stage_elements: Vec<usize>,
    /// Size of each stage's current checkpoint file.
    stage_bytes: Vec<u64>,
    shard_files: Vec<ShardFile>,
    shared: VecDeque<Hash>,
    results_tx: mpsc::Sender<Outcome>,
    results_rx: mpsc::Receiver<Outcome>,
    rows: Vec<Row>,
    nonces: crate::identity::Nonces,
    json: bool,
    bar: indicatif::ProgressBar,
    started: Instant,
    receipts: std::fs::File,
    nodes: usize,
    round_bytes_up: u64,
    round_bytes_down: u64,
    /// (node, stage) pairs given work this round: each fetches that stage's
    /// checkpoint once.
    round_fetches: BTreeSet<(NodeId, u32)>,
}

impl Driver {
    /// Cuts the model into its stages, shares their checkpoints and builds
    /// the state machine.
    pub(crate) async fn start(setup: Setup) -> anyhow::Result<Self> {
        let config = setup.config;
        let n_layers = setup.learner.model.config().n_layers;
        let ranges = even_ranges(n_layers, config.train.stages as usize).map_err(|e| {
            anyhow::anyhow!(
                "stages = {} for a model of {n_layers} layers: {e}",
                config.train.stages
            )
        })?;
        let (learner, published) = {
            let ranges = ranges.clone();
            let learner = setup.learner;
            tokio::task::spawn_blocking(move || {
                let published = learner.publish_stages(&ranges);
                (learner, published)
            })
            .await?
        };
        let published = published?;
        let stage_elements = learner
            .model
            .split(&ranges)?
            .iter()
            .map(|s| s.params().num_elements())
            .collect();
        let mut shared = VecDeque::new();
        for (params, path, _) in &published {
            setup
                .commands
                .send(Command::ShareFile {
                    id: ModelId(params.checkpoint),
                    path: path.clone(),
                })
                .await
                .map_err(|_| anyhow::anyhow!("the network stopped"))?;
            shared.push_back(params.checkpoint);
        }
        let ledger = commons_coordinator::verify::Ledger::new(config.train.verify.config());
        let machine = PipelineTraining::new(
            config.pipeline_machine(),
            setup.snapshot,
            published.iter().map(|(p, _, _)| *p).collect(),
        )?
        .with_checks(ledger, config.train.coalition()?);
        let (results_tx, results_rx) = mpsc::channel(256);
        let driver = Self {
            dataset: setup.dataset,
            run: setup.run,
            out: setup.out,
            identity: setup.identity,
            commands: setup.commands,
            machine,
            learner: Some(learner),
            stage_elements,
            stage_bytes: published.iter().map(|(_, _, b)| *b).collect(),
            ranges,
            shard_files: setup.shard_files,
            shared,
            results_tx,
            results_rx,
            rows: setup.rows,
            nonces: setup.nonces,
            json: setup.json,
            bar: setup.bar,
            started: setup.started,
            receipts: setup.receipts,
            nodes: 0,
            round_bytes_up: 0,
            round_bytes_down: 0,
            round_fetches: BTreeSet::new(),
            config,
        };
        driver.event(serde_json::json!({
            "event": "pipeline",
            "stages": driver.ranges.iter().map(|r| format!("{}..{}", r.start, r.end)).collect::<Vec<_>>(),
            "micro_batches": driver.config.train.shares,
            "stage_parameters": driver.stage_elements,
        }));
        Ok(driver)
    }

    /// Runs the rounds to the end; returns the final parameters.
    pub(crate) async fn drive(&mut self) -> anyhow::Result<ParamsRef> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.update_nodes().await;
        loop {
            while let Some(out) = self.machine.poll_output() {
                match out {
                    Output::Send {
                        ticket,
                        node,
                        round,
                        task,
                        params,
                        inputs,
                        deadline,
                        attempt,
                        check,
                    } => {
                        self.send(
                            ticket, node, round, task, params, &inputs, deadline, attempt, check,
                        )
                        .await?;
                    }
                    Output::Excluded { round, node } => {
                        tracing::warn!(round, %node, "a node's result was contradicted by two others: excluded from the run");
                        self.event(serde_json::json!({
                            "event": "excluded", "round": round, "node": node.to_string(),
                        }));
                    }
                    Output::Undecided { round, task, nodes } => {
                        tracing::warn!(
                            round,
                            ?task,
                            "results disagree and no third operator's node can referee: the unit waits for one"
                        );
                        self.event(serde_json::json!({
                            "event": "undecided", "round": round, "stage": task.stage,
                            "micro": task.micro,
                            "nodes": nodes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        }));
                    }
                    Output::Moved { stage, node, from } => {
                        let (from, reason) = match from {
                            Some((n, reason)) => (
                                Some(n.to_string()),
                                Some(match reason {
                                    Lost::Failed(m) => format!("failed: {m}"),
                                    Lost::Deadline => "deadline".into(),
                                    Lost::Left => "left".into(),
                                }),
                            ),
                            None => (None, None),
                        };
                        self.event(serde_json::json!({
                            "event": "moved", "round": self.machine.round(), "stage": stage,
                            "layers": format!("{}..{}", self.ranges[stage as usize].start, self.ranges[stage as usize].end),
                            "node": node.to_string(), "from": from, "reason": reason,
                        }));
                    }
                    Output::Aggregate { round, results } => self.aggregate(round, results).await?,
                    Output::Persist(snapshot) => self.persist(snapshot)?,
                    Output::Finished { params, .. } => return Ok(params),
                }
            }
            tokio::select! {
                Some((ticket, task, outcome)) = self.results_rx.recv() => self.on_outcome(ticket, task, outcome),
                _ = tick.tick() => {
                    self.update_nodes().await;
                    self.machine.tick(now());
                }
            }
        }
    }

    /// Clears the progress bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// The loss curve, the rounds run and the run's counters.
    pub(crate) fn into_report(self) -> (Vec<Row>, u64, serde_json::Value) {
        let s = self.machine.stats();
        let stats = serde_json::json!({
            "sent": s.sent,
            "accepted": s.accepted,
            "late": s.late,
            "dropped": s.dropped,
            "failures": s.failures,
            "deadlines": s.deadlines,
            "reassigned": s.resent,
            "moves": s.moves,
            "sampled": s.sampled,
            "check_sends": s.check_sends,
            "confirmed": s.confirmed,
            "mismatches": s.mismatches,
            "exclusions": s.exclusions,
            "unverifiable": s.unverifiable,
            "recomputed": s.recomputed,
        });
        (self.rows, self.machine.round(), stats)
    }

    fn event(&self, value: serde_json::Value) {
        event(self.json, &self.bar, &value);
    }

    fn coalition(&self) -> Option<CoalitionId> {
        self.config.train.coalition().ok().flatten()
    }

    async fn update_nodes(&mut self) {
        let nodes = trainers(&self.commands, self.coalition()).await;
        if nodes.len() != self.nodes {
            self.nodes = nodes.len();
            self.event(serde_json::json!({
                "event": "nodes",
                "nodes": nodes.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>(),
            }));
        }
        self.machine.ledger_mut().set_profiles(profiles(&nodes));
        self.machine
            .set_nodes(now(), nodes.into_iter().map(|(node, _)| node));
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        ticket: Ticket,
        node: NodeId,
        round: u64,
        task: Task,
        params: ParamsRef,
        inputs: &[Arc<Answer>],
        deadline: commons_protocol::UnixMillis,
        attempt: u32,
        check: bool,
    ) -> anyhow::Result<()> {
        let stages = self.ranges.len() as u32;
        let (shard, batch) = self.dataset.share(&self.config, round, task.micro);
        let file = self.shard_files[shard];
        let mut given = inputs.iter();
        let mut wire = Vec::new();
        if task.stage > 0 {
            match given.next().and_then(|a| a.hidden.clone()) {
                Some(h) => wire.push(h),
                None => bail!("stage {} has no input for {task:?}", task.stage),
            }
        }
        if task.pass == Pass::Backward && task.stage + 1 < stages {
            match given.next().and_then(|a| a.grad_in.clone()) {
                Some(g) => wire.push(g),
                None => bail!("stage {} has no output gradient for {task:?}", task.stage),
            }
        }
        let range = self.ranges[task.stage as usize].clone();
        let encoding = self.config.encoding();
        let unit = WorkUnit {
            issuer: self.identity.node_id(),
            nonce: self.nonces.take(),
            issued_at: now(),
            expires_at: deadline,
            body: WorkBody::Gradient(GradientUnit {
                job: self.run,
                round,
                share: task.micro,
                params,
                data: DataShardRef {
                    blob: file.blob,
                    shard: file.shard,
                },
                batch,
                mode: GradientMode::Stage {
                    layers: LayerRange {
                        start: range.start as u32,
                        end: range.end as u32,
                    },
                    pass: match task.pass {
                        Pass::Forward => StagePass::Forward,
                        Pass::Backward => StagePass::Backward,
                    },
                },
                encoding,
                coalition: self.coalition(),
                inputs: wire,
            }),
        };
        let id = unit.id()?;
        let bytes = Envelope::seal(&self.identity, &unit)?.to_bytes();
        self.round_bytes_down += bytes.len() as u64;
        self.round_fetches.insert((node, task.stage));
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::SendUnit { node, bytes, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the network stopped"))?;
        self.event(serde_json::json!({
            "event": "sent", "round": round, "stage": task.stage, "micro": task.micro,
            "pass": if task.pass == Pass::Forward { "forward" } else { "backward" },
            "attempt": attempt, "node": node.to_string(), "unit": id.to_string(),
            "check": check,
        }));
        let shape = Shape {
            hidden: vec![
                u64::from(batch.rows_end - batch.rows_start),
                u64::from(batch.seq_len),
                self.learner
                    .as_ref()
                    .map_or(0, |l| l.model.config().dim as u64),
            ],
            first: task.stage == 0,
            last: task.stage + 1 == stages,
            values: self.stage_elements[task.stage as usize],
            encoding,
        };
        let results = self.results_tx.clone();
        tokio::spawn(async move {
            let outcome = match rx.await {
                Ok(Ok(bytes)) => tokio::task::spawn_blocking(move || {
                    let n = bytes.len() as u64;
                    open_answer(id, node, &bytes, task, &shape).map(|(a, r, d)| (a, r, n, d))
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
                Ok(Err(e)) => Err(format!("unreachable: {e}")),
                Err(_) => Err("the network stopped".into()),
            };
            let _ = results.send((ticket, task, outcome)).await;
        });
        Ok(())
    }

    fn on_outcome(&mut self, ticket: Ticket, task: Task, outcome: Result<Checked, String>) {
        match outcome {
            Ok((answer, receipt, bytes, digest)) => {
                self.round_bytes_up += bytes;
                let taken = self.machine.handle_checked(
                    now(),
                    ticket,
                    Arc::new(answer),
                    digest,
                    check_draw(),
                );
                if taken != Taken::Dropped {
                    append_receipt(&mut self.receipts, &receipt);
                }
                self.event(serde_json::json!({
                    "event": "result", "unit": receipt.unit.to_string(),
                    "node": receipt.executor.to_string(), "stage": task.stage, "micro": task.micro,
                    "taken": taken.name(),
                }));
            }
            Err(reason) => {
                let wanted = self.machine.handle_failure(now(), ticket, &reason);
                tracing::info!(%reason, wanted, ?task, "a stage unit failed");
                self.event(serde_json::json!({
                    "event": "unit_failed", "reason": reason, "wanted": wanted,
                    "stage": task.stage, "micro": task.micro,
                }));
            }
        }
    }

    async fn aggregate(
        &mut self,
        round: u64,
        results: Vec<Vec<Arc<Answer>>>,
    ) -> anyhow::Result<()> {
        let Some(mut learner) = self.learner.take() else {
            bail!("the model is missing");
        };
        let losses: Vec<f32> = results
            .last()
            .map(|last| last.iter().filter_map(|a| a.loss).collect())
            .unwrap_or_default();
        let train_loss =
            (losses.iter().map(|&l| f64::from(l)).sum::<f64>() / losses.len().max(1) as f64) as f32;
        let t = &self.config.train;
        let last = round + 1 >= t.rounds;
        let evaluate = !self.dataset.validation.is_empty()
            && (last || (t.eval_every > 0 && (round + 1).is_multiple_of(t.eval_every)));
        let dataset = self.dataset.clone();
        let ranges = self.ranges.clone();
        let (learner, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = (|| -> anyhow::Result<_> {
                let stages = learner.model.split(&ranges)?;
                let micros = results.first().map_or(1, Vec::len).max(1);
                let scale = 1.0 / micros as f32;
                let grads = stages
                    .iter()
                    .zip(&results)
                    .map(|(stage, per_micro)| {
                        let mut sum = vec![0.0f32; stage.params().num_elements()];
                        for answer in per_micro {
                            for (acc, v) in sum.iter_mut().zip(&answer.values) {
                                *acc += v;
                            }
                        }
                        for v in &mut sum {
                            *v *= scale;
                        }
                        Ok(stage.params().unflatten(&sum)?)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let merged = learner.model.merge_stage_gradients(&stages, &grads)?;
                learner.step_tensors(&merged)?;
                let (next, _) = learner.publish()?;
                let published = learner.publish_stages(&ranges)?;
                let val = if evaluate {
                    Some(learner.model.eval_loss(&dataset.validation)?)
                } else {
                    None
                };
                Ok((next, published, val))
            })();
            (learner, outcome)
        })
        .await?;
        self.learner = Some(learner);
        let (next, published, val_loss) = outcome?;
        for (params, path, _) in &published {
            self.commands
                .send(Command::ShareFile {
                    id: ModelId(params.checkpoint),
                    path: path.clone(),
                })
                .await
                .map_err(|_| anyhow::anyhow!("the network stopped"))?;
            self.shared.push_back(params.checkpoint);
        }
        while self.shared.len() > SHARED_ROUNDS * self.ranges.len() {
            if let Some(old) = self.shared.pop_front() {
                let _ = self.commands.send(Command::UnshareFile(ModelId(old))).await;
            }
        }
        let bytes_params = std::mem::take(&mut self.round_fetches)
            .iter()
            .map(|(_, stage)| self.stage_bytes[*stage as usize])
            .sum();
        self.stage_bytes = published.iter().map(|(_, _, b)| *b).collect();
        self.machine.handle_aggregated(
            now(),
            round,
            next,
            published.iter().map(|(p, _, _)| *p).collect(),
        )?;
        let record = self.machine.history().last().copied();
        let row = Row {
            round: round + 1,
            train_loss,
            val_loss,
            seconds: self.started.elapsed().as_secs_f64(),
            nodes: self.nodes,
            bytes_up: std::mem::take(&mut self.round_bytes_up),
            bytes_params,
            bytes_down: std::mem::take(&mut self.round_bytes_down),
            sends: record.map_or(0, |r| r.sends),
            reassigned: record.map_or(0, |r| r.resent),
        };
        self.bar.set_position(round + 1);
        self.bar.set_message(format!(
            "loss {train_loss:.4}{} on {} nodes",
            val_loss.map_or(String::new(), |v| format!(" (validation {v:.4})")),
            self.nodes
        ));
        self.event(serde_json::json!({
            "event": "round", "round": row.round, "train_loss": row.train_loss,
            "val_loss": row.val_loss, "seconds": row.seconds, "nodes": row.nodes,
            "sends": row.sends, "reassigned": row.reassigned,
            "bytes_up": row.bytes_up, "bytes_params": row.bytes_params, "bytes_down": row.bytes_down,
            "params_root": next.root.to_string(), "checkpoint": next.checkpoint.to_string(),
        }));
        self.rows.push(row);
        Ok(())
    }

    /// Writes the snapshot, the optimiser's state and the loss curve.
    fn persist(&mut self, snapshot: Snapshot) -> anyhow::Result<()> {
        let Some(learner) = &self.learner else {
            bail!("the model is missing");
        };
        let state = save_snapshot(learner, self.run, snapshot, &self.rows, &self.out)?;
        self.event(serde_json::json!({
            "event": "persisted", "round": snapshot.round,
            "checkpoint": state.checkpoint, "optimizer": state.optimizer,
        }));
        Ok(())
    }
}

/// What a stage unit's answer must look like.
#[derive(Debug, Clone)]
struct Shape {
    /// Hidden states of the micro-batch: rows, length, width.
    hidden: Vec<u64>,
    first: bool,
    last: bool,
    /// Parameters of the stage.
    values: usize,
    encoding: GradientEncoding,
}

/// Opens and checks the answer to stage unit `unit` from `node`.
fn open_answer(
    unit: commons_protocol::UnitId,
    node: NodeId,
    bytes: &[u8],
    task: Task,
    shape: &Shape,
) -> Result<(Answer, Receipt, Hash), String> {
    let (result, receipt) =
        crate::coordinate::check_response(unit, node, bytes, now()).map_err(|e| e.describe())?;
    let digest = outputs_digest("commons stage outputs v1", &result.outputs);
    let hidden = |t: &commons_protocol::Tensor, what: &str| {
        if t.shape() != shape.hidden.as_slice() || t.dtype() != commons_protocol::DType::F32 {
            return Err(format!(
                "{what} of shape {:?} {:?}, expected {:?} f32",
                t.shape(),
                t.dtype(),
                shape.hidden
            ));
        }
        match t.to_f32() {
            Some(v) if v.iter().all(|x| x.is_finite()) => Ok(t.clone()),
            _ => Err(format!("{what} holds values that are not finite")),
        }
    };
    let empty = |t: &commons_protocol::Tensor, what: &str| {
        if t.shape() == [0] {
            Ok(())
        } else {
            Err(format!("{what} of shape {:?}, expected [0]", t.shape()))
        }
    };
    match task.pass {
        Pass::Forward => {
            let [out] = &result.outputs[..] else {
                return Err(format!("{} outputs, expected 1", result.outputs.len()));
            };
            Ok((
                Answer {
                    hidden: Some(hidden(out, "the output")?),
                    grad_in: None,
                    loss: None,
                    values: Vec::new(),
                },
                receipt,
                digest,
            ))
        }
        Pass::Backward => {
            let [loss, values, grad_in] = &result.outputs[..] else {
                return Err(format!("{} outputs, expected 3", result.outputs.len()));
            };
            let loss = if shape.last {
                match loss.to_f32().as_deref() {
                    Some(&[l]) if l.is_finite() && loss.shape() == [1] => Some(l),
                    _ => return Err("the loss is not one finite f32".into()),
                }
            } else {
                empty(loss, "the loss of a stage before the last")?;
                None
            };
            let values = crate::train_exec::decode_values(values, shape.encoding, shape.values)?;
            if values.iter().any(|v| !v.is_finite()) {
                return Err("the gradients are not all finite".into());
            }
            let grad_in = if shape.first {
                empty(grad_in, "the input gradient of the first stage")?;
                None
            } else {
                Some(hidden(grad_in, "the input gradient")?)
            };
            Ok((
                Answer {
                    hidden: None,
                    grad_in,
                    loss,
                    values,
                },
                receipt,
                digest,
            ))
        }
    }
}
