//! The executor actor: one thread that owns a stage and its sessions and runs
//! every forward, so compute never runs on the async runtime's workers
//! (candle's kernels fan out onto their own thread pool from here).
//!
//! Requests arrive on a bounded channel. Each turn the engine drains what is
//! waiting (up to `max_batch`), runs the single-position steps of distinct
//! sessions as one batched forward, and the rest one by one in arrival order.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use commons_protocol::SessionId;
use tokio::sync::{mpsc, oneshot};

use super::session::{SessionError, SessionLimits, SessionStore};
use super::stage::{Stage, StageError, StageInput, StageOutput};

/// Forwards of fewer positions than this (a decode step, a few sessions'
/// batched) run on the engine's thread alone: bound by memory bandwidth,
/// they gain little from a second core, which the node's other work and,
/// on a shared machine, other processes need (see [`commons_kernels::solo`]).
const SOLO_BELOW: usize = 4;

/// One step of a session on this stage.
#[derive(Debug)]
pub struct StepRequest {
    /// The session.
    pub session: SessionId,
    /// Position of the input's first token; 0 opens (or restarts) the session.
    pub start_pos: usize,
    /// Tokens (first stage) or hidden states.
    pub input: StageInput,
    /// Most tokens the session may hold (used when it opens).
    pub session_budget: usize,
    /// Close the session after this step.
    pub close_after: bool,
    /// Part of the stage's layers to run (`None`: all): a node checking
    /// another's hop runs that hop's layers only.
    pub layers: Option<std::ops::Range<usize>>,
}

/// The result of a step.
#[derive(Debug)]
pub struct StepReply {
    /// Hidden states or logits.
    pub output: StageOutput,
    /// Time waiting for the engine.
    pub queued: Duration,
    /// Time computing (the whole batch when batched).
    pub compute: Duration,
    /// Sessions in the forward that ran this step.
    pub batch_size: usize,
}

/// A step that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The session refused it (unknown, out of position, over budget…).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The stage failed to run it.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The engine has stopped.
    #[error("the executor has stopped")]
    Stopped,
    /// Too many steps wait for the engine already.
    #[error("the executor's queue is full")]
    Busy,
}

enum Request {
    Step(
        StepRequest,
        Instant,
        oneshot::Sender<Result<StepReply, EngineError>>,
    ),
    Close(SessionId, oneshot::Sender<bool>),
}

/// Counters of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Steps run.
    pub steps: u64,
    /// Forwards run (a batch counts once).
    pub forwards: u64,
    /// Sessions held now.
    pub sessions: usize,
    /// Sessions evicted to make room.
    pub evicted: u64,
}

/// A cloneable handle to an engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
    stats: std::sync::Arc<std::sync::Mutex<EngineStats>>,
}

/// Settings of an engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Session limits.
    pub limits: SessionLimits,
    /// Most sessions batched into one decode forward.
    pub max_batch: usize,
    /// Requests that may wait before senders are slowed down.
    pub queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            limits: SessionLimits::default(),
            max_batch: 16,
            queue: 256,
        }
    }
}

/// Starts an engine on its own thread; it stops when every handle is dropped.
pub fn spawn(
    stage: Stage,
    config: EngineConfig,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let stats = std::sync::Arc::new(std::sync::Mutex::new(EngineStats::default()));
    let worker = Worker {
        stage,
        sessions: SessionStore::new(config.limits),
        max_batch: config.max_batch.max(1),
        stats: stats.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(format!(
            "executor-{}..{}",
            worker.stage.layers().start,
            worker.stage.layers().end
        ))
        .spawn(move || worker.run(rx))?;
    Ok((EngineHandle { tx, stats }, thread))
}

impl EngineHandle {
    /// Runs a step.
    pub async fn step(&self, request: StepRequest) -> Result<StepReply, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Step(request, Instant::now(), reply))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Hands a step to the engine without waiting for room or for its
    /// reply, which arrives on the receiver returned.
    pub fn submit(
        &self,
        request: StepRequest,
    ) -> Result<oneshot::Receiver<Result<StepReply, EngineError>>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Request::Step(request, Instant::now(), reply))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => EngineError::Busy,
                mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
            })?;
        Ok(rx)
    }

    /// Runs a step from outside an async runtime.
    pub fn step_blocking(&self, request: StepRequest) -> Result<StepReply, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Request::Step(request, Instant::now(), reply))
            .map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }

    /// Closes a session; true if it was open.
    pub async fn close(&self, session: SessionId) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Request::Close(session, reply)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The engine's counters.
    #[must_use]
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

struct Worker {
    stage: Stage,
    sessions: SessionStore,
    max_batch: usize,
    stats: std::sync::Arc<std::sync::Mutex<EngineStats>>,
}

type Pending = (
    StepRequest,
    Instant,
    oneshot::Sender<Result<StepReply, EngineError>>,
);

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut drained = vec![first];
            while drained.len() < self.max_batch * 2 {
                match rx.try_recv() {
                    Ok(r) => drained.push(r),
                    Err(_) => break,
                }
            }
            self.turn(drained);
            if let Ok(mut s) = self.stats.lock() {
                s.sessions = self.sessions.len();
                s.evicted = self.sessions.evicted();
            }
        }
        tracing::debug!(layers = ?self.stage.layers(), "executor stopped");
    }

    fn turn(&mut self, drained: Vec<Request>) {
        let mut seen = HashSet::new();
        let mut batch: Vec<Pending> = Vec::new();
        let mut rest: Vec<Pending> = Vec::new();
        for request in drained {
            match request {
                Request::Close(id, reply) => {
                    let _ = reply.send(self.sessions.close(&id));
                }
                Request::Step(step, at, reply) => {
                    let single = match &step.input {
                        StageInput::Tokens(t) => t.len() == 1,
                        StageInput::Hidden(h) => h.dims().get(1) == Some(&1),
                    };
                    let first_sight = seen.insert(step.session);
                    let whole = step
                        .layers
                        .as_ref()
                        .is_none_or(|l| *l == self.stage.layers());
                    if single
                        && whole
                        && step.start_pos > 0
                        && first_sight
                        && batch.len() < self.max_batch
                    {
                        batch.push((step, at, reply));
                    } else {
                        rest.push((step, at, reply));
                    }
                }
            }
        }
        if batch.len() == 1 {
            rest.insert(0, batch.remove(0));
        }
        if !batch.is_empty() {
            self.run_batch(batch);
        }
        for pending in rest {
            self.run_one(pending);
        }
    }

    fn count(&self, steps: u64) {
        if let Ok(mut s) = self.stats.lock() {
            s.steps += steps;
            s.forwards += 1;
        }
    }

    fn run_one(&mut self, (step, at, reply): Pending) {
        let queued = at.elapsed();
        let tokens = match &step.input {
            StageInput::Tokens(t) => t.len(),
            StageInput::Hidden(h) => h.dims().get(1).copied().unwrap_or(0),
        };
        let stage = &self.stage;
        let mut checkout = match self.sessions.checkout(
            step.session,
            step.start_pos,
            tokens,
            step.session_budget,
            || stage.new_cache(),
        ) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let started = Instant::now();
        let layers = step.layers.unwrap_or_else(|| self.stage.layers());
        let forward = || {
            self.stage
                .forward_range(step.input, &mut checkout.cache, layers)
        };
        let result = if tokens < SOLO_BELOW {
            commons_kernels::solo(forward)
        } else {
            forward()
        };
        let compute = started.elapsed();
        self.count(1);
        match result {
            Ok(output) => {
                if !step.close_after {
                    self.sessions.commit(checkout);
                }
                let _ = reply.send(Ok(StepReply {
                    output,
                    queued,
                    compute,
                    batch_size: 1,
                }));
            }
            // A failed step leaves the cache in an unknown state: the session is dropped.
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    fn run_batch(&mut self, batch: Vec<Pending>) {
        let mut ready = Vec::with_capacity(batch.len());
        for (step, at, reply) in batch {
            let stage = &self.stage;
            match self.sessions.checkout(
                step.session,
                step.start_pos,
                1,
                step.session_budget,
                || stage.new_cache(),
            ) {
                Ok(c) => ready.push((step, at, reply, c)),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            }
        }
        let n = ready.len();
        let started = Instant::now();
        let mut inputs = Vec::with_capacity(n);
        let mut rest = Vec::with_capacity(n);
        for (step, at, reply, checkout) in ready {
            inputs.push(step.input);
            rest.push((step.session, step.close_after, at, reply, checkout));
        }
        let result = {
            let steps: Vec<_> = inputs
                .into_iter()
                .zip(rest.iter_mut().map(|r| &mut r.4.cache))
                .collect();
            if n < SOLO_BELOW {
                commons_kernels::solo(|| self.stage.forward_batch(steps))
            } else {
                self.stage.forward_batch(steps)
            }
        };
        let compute = started.elapsed();
        self.count(n as u64);
        match result {
            Ok(outputs) => {
                for ((_, close_after, at, reply, checkout), output) in rest.into_iter().zip(outputs)
                {
                    if !close_after {
                        self.sessions.commit(checkout);
                    }
                    let _ = reply.send(Ok(StepReply {
                        output,
                        queued: started.saturating_duration_since(at),
                        compute,
                        batch_size: n,
                    }));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (_, _, _, reply, _) in rest {
                    let _ = reply.send(Err(StageError::Input(format!(
                        "batched step failed: {message}"
                    ))
                    .into()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::stage::argmax;
    use crate::executor::tiny::{TinySpec, write_tiny_gguf};
    use crate::executor::{ModelFile, Pipeline};

    fn model() -> (tempfile::TempDir, ModelFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_tiny_gguf(&path, &TinySpec::default()).unwrap();
        let model = ModelFile::open(&path).unwrap();
        (dir, model)
    }

    fn logits(out: StageOutput) -> candle_core::Tensor {
        match out {
            StageOutput::Logits(l) => l,
            StageOutput::Hidden(_) => panic!("expected logits"),
        }
    }

    fn step(session: u8, start_pos: usize, tokens: Vec<u32>) -> StepRequest {
        StepRequest {
            session: SessionId([session; 16]),
            start_pos,
            input: StageInput::Tokens(tokens),
            session_budget: 128,
            close_after: false,
            layers: None,
        }
    }

    #[test]
    fn a_turn_batches_decode_steps_of_distinct_sessions() {
        let (_d, model) = model();
        let stage = Stage::load(&model, 0..6, &candle_core::Device::Cpu).unwrap();
        let reference = Pipeline::new(vec![
            Stage::load(&model, 0..6, &candle_core::Device::Cpu).unwrap(),
        ])
        .unwrap();
        let mut worker = Worker {
            stage,
            sessions: SessionStore::new(SessionLimits::default()),
            max_batch: 8,
            stats: Default::default(),
        };
        let prompts: Vec<Vec<u32>> = vec![(3..12).collect(), vec![40, 41], (60..70).collect()];

        // Turn 1: three prefills run one by one.
        let mut rxs = Vec::new();
        let mut requests = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            requests.push(Request::Step(
                step(i as u8, 0, p.clone()),
                Instant::now(),
                tx,
            ));
            rxs.push(rx);
        }
        worker.turn(requests);
        let firsts: Vec<u32> = rxs
            .into_iter()
            .map(|rx| argmax(&logits(rx.blocking_recv().unwrap().unwrap().output)).unwrap())
            .collect();

        // Turn 2: three decode steps, plus a second step of session 0 that must wait its turn.
        let mut rxs = Vec::new();
        let mut requests = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            requests.push(Request::Step(
                step(i as u8, p.len(), vec![firsts[i]]),
                Instant::now(),
                tx,
            ));
            rxs.push(rx);
        }
        let (tx, late) = oneshot::channel();
        requests.push(Request::Step(
            step(0, prompts[0].len() + 1, vec![5]),
            Instant::now(),
            tx,
        ));
        worker.turn(requests);
        let replies: Vec<StepReply> = rxs
            .into_iter()
            .map(|rx| rx.blocking_recv().unwrap().unwrap())
            .collect();
        assert!(replies.iter().all(|r| r.batch_size == 3));
        assert_eq!(late.blocking_recv().unwrap().unwrap().batch_size, 1);
        let stats = *worker.stats.lock().unwrap();
        assert_eq!((stats.steps, stats.forwards), (7, 5));

        // The batched logits equal a plain run of each session.
        for (i, (p, reply)) in prompts.iter().zip(replies).enumerate() {
            let mut caches = reference.new_caches();
            reference.forward(p, &mut caches).unwrap();
            let alone = reference.forward(&[firsts[i]], &mut caches).unwrap();
            let got = logits(reply.output);
            assert_eq!(
                got.to_vec1::<f32>().unwrap(),
                alone.to_vec1::<f32>().unwrap()
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sessions_through_the_actor_match_generation_alone() {
        let (_d, model) = model();
        let stage = Stage::load(&model, 0..6, &candle_core::Device::Cpu).unwrap();
        let (engine, thread) = spawn(stage, EngineConfig::default()).unwrap();
        let reference = Pipeline::new(vec![
            Stage::load(&model, 0..6, &candle_core::Device::Cpu).unwrap(),
        ])
        .unwrap();
        let mut tasks = Vec::new();
        for s in 0..4u8 {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let prompt: Vec<u32> = (10 + s as u32..20 + 3 * s as u32).collect();
                let mut pos = 0;
                let mut input = prompt.clone();
                let mut out = Vec::new();
                for _ in 0..10 {
                    let len = input.len();
                    let reply = engine
                        .step(StepRequest {
                            session: SessionId([s; 16]),
                            start_pos: pos,
                            input: StageInput::Tokens(input),
                            session_budget: 64,
                            close_after: false,
                            layers: None,
                        })
                        .await
                        .unwrap();
                    pos += len;
                    let t = argmax(&logits(reply.output)).unwrap();
                    out.push(t);
                    input = vec![t];
                }
                assert!(engine.close(SessionId([s; 16])).await);
                (prompt, out)
            }));
        }
        for task in tasks {
            let (prompt, out) = task.await.unwrap();
            let mut sampler =
                crate::executor::Sampler::new(crate::executor::SamplingConfig::default()).unwrap();
            let (alone, _, _) = reference
                .generate(&prompt, 10, &mut sampler, &[], |_| {})
                .unwrap();
            assert_eq!(out, alone);
        }
        let stats = engine.stats();
        assert_eq!(stats.steps, 40);
        assert!(stats.forwards <= stats.steps);
        // An unknown session is refused, and the engine stops once its handles are gone.
        let err = engine.step(step(9, 5, vec![1])).await.unwrap_err();
        assert!(matches!(
            err,
            EngineError::Session(SessionError::Unknown { .. })
        ));
        drop(engine);
        thread.join().unwrap();
    }
}
