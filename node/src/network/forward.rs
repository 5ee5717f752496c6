//! Outputs handed from hop to hop of a streamed chain, `/commons/forward/1.0.0`:
//! one long-lived libp2p stream from each node to each node it forwards to,
//! carrying length-prefixed [`Forwarded`] frames (a unit's output and the
//! link it goes by). The connection authenticates the sender; the unit
//! waiting for the output names it. Frames go from the task that computed
//! the output straight onto the stream, and from the stream straight to the
//! engine: neither side's event loop is on the way.
//!
//! A unit whose input comes this way ([`InferenceOptions::input_from`]) is
//! parked here until its input arrives (an output that arrives first waits
//! for its unit a while), then runs; one whose input never comes is answered
//! [`ErrorCode::NO_INPUT`] a little before it expires, so that its issuer
//! sends the input itself in time. Every unit's issuer order is noted per
//! session: a unit never runs after one issued later for the same or an
//! earlier position of its session ([`ErrorCode::SUPERSEDED`]), so a step
//! its issuer dropped cannot overwrite what came after.
//!
//! [`InferenceOptions::input_from`]: commons_protocol::messages::InferenceOptions::input_from

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use commons_protocol::codec;
use commons_protocol::messages::{ErrorCode, Forwarded, InferenceUnit};
use commons_protocol::{Identity, NodeId, SessionId, UnitId, UnixMillis};
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;

use super::units::UnitReply;
use super::{node_id_of, now};
use crate::executor::serve;

/// Protocol id of forwarded outputs.
pub const FORWARD_PROTOCOL: StreamProtocol = StreamProtocol::new("/commons/forward/1.0.0");

/// Streams from other nodes read at once, at most.
const MAX_INBOUND_STREAMS: usize = 256;
/// How long opening a stream to the next hop may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Units parked here at once, at most.
const MAX_PARKED: usize = 1024;
/// Outputs waiting for their unit, at most, and their bytes.
const MAX_EARLY: usize = 256;
const MAX_EARLY_BYTES: usize = 256 << 20;
/// How long an output waits for its unit.
const EARLY_TTL: Duration = Duration::from_secs(30);
/// A parked unit gives up this long before it expires.
const GIVE_UP_BEFORE: u64 = 1_000;
/// Sessions whose units' order is kept, and units kept per session.
const MAX_SESSIONS: usize = 8192;
const MARKS_PER_SESSION: usize = 16;

/// A unit waiting for its input; `R` is how to answer it.
#[derive(Debug)]
pub(super) struct Parked<R> {
    /// What runs it.
    pub(super) served: serve::Served,
    /// The unit's id.
    pub(super) id: UnitId,
    /// The unit.
    pub(super) unit: InferenceUnit,
    /// Where its answer goes.
    pub(super) reply: R,
    /// When to give up on its input.
    give_up_at: UnixMillis,
}

/// What becomes of a unit or an output that arrives.
#[derive(Debug)]
pub(super) enum Arrival<R> {
    /// Run this unit now, on this forwarded input (`None`: its own).
    Run(Box<Parked<R>>, Option<Forwarded>),
    /// Answer this unit with a refusal.
    Refuse(Box<Parked<R>>, ErrorCode, String),
    /// Nothing to do yet.
    Wait,
}

/// Units waiting for their inputs, inputs waiting for their units, and the
/// order of every session's units.
#[derive(Debug)]
pub(super) struct Links<R> {
    parked: HashMap<(NodeId, u64), Parked<R>>,
    early: HashMap<(NodeId, u64), (Forwarded, Instant)>,
    early_bytes: usize,
    /// Per session: (issuer order, position) of recent units, and when last seen.
    marks: HashMap<SessionId, (VecDeque<(u64, u32)>, Instant)>,
}

impl<R> Default for Links<R> {
    fn default() -> Self {
        Self {
            parked: HashMap::new(),
            early: HashMap::new(),
            early_bytes: 0,
            marks: HashMap::new(),
        }
    }
}

impl<R> Links<R> {
    /// Units parked now.
    #[must_use]
    pub(super) fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Whether a unit issued later than `unit` for the same or an earlier
    /// position of its session has been seen. Order 0 is no order.
    fn superseded(&self, unit: &InferenceUnit) -> bool {
        let order = unit.options.order;
        order != 0
            && self.marks.get(&unit.session).is_some_and(|(m, _)| {
                m.iter()
                    .any(|&(o, p)| o > order && p <= unit.options.start_pos)
            })
    }

    fn mark(&mut self, unit: &InferenceUnit) {
        if unit.options.order == 0 {
            return;
        }
        if self.marks.len() >= MAX_SESSIONS && !self.marks.contains_key(&unit.session) {
            // The least recently seen session is forgotten.
            if let Some(oldest) = self
                .marks
                .iter()
                .min_by_key(|(_, (_, seen))| *seen)
                .map(|(s, _)| *s)
            {
                self.marks.remove(&oldest);
            }
        }
        let (m, seen) = self
            .marks
            .entry(unit.session)
            .or_insert_with(|| (VecDeque::new(), Instant::now()));
        *seen = Instant::now();
        if m.len() >= MARKS_PER_SESSION {
            m.pop_front();
        }
        m.push_back((unit.options.order, unit.options.start_pos));
    }

    /// An admitted inference unit, valid until `expires_at`: run it now,
    /// park it until its input comes, or refuse it (superseded, or too many
    /// parked).
    pub(super) fn on_unit(
        &mut self,
        served: serve::Served,
        id: UnitId,
        unit: InferenceUnit,
        expires_at: UnixMillis,
        reply: R,
    ) -> Arrival<R> {
        let stale = self.superseded(&unit);
        let give_up_at = UnixMillis(expires_at.0.saturating_sub(GIVE_UP_BEFORE));
        let upstream = unit.options.input_from;
        let parked = Box::new(Parked {
            served,
            id,
            unit,
            reply,
            give_up_at,
        });
        if stale {
            return Arrival::Refuse(
                parked,
                ErrorCode::SUPERSEDED,
                "a unit issued later for this session position came first".into(),
            );
        }
        self.mark(&parked.unit);
        let Some(up) = upstream else {
            return Arrival::Run(parked, None);
        };
        let key = (up.executor, up.link);
        if let Some((forwarded, _)) = self.early.remove(&key) {
            self.early_bytes -= forwarded.output.data().len();
            return Arrival::Run(parked, Some(forwarded));
        }
        if self.parked.len() >= MAX_PARKED {
            return Arrival::Refuse(
                parked,
                ErrorCode::OVERLOADED,
                format!("{MAX_PARKED} units already wait for their inputs here"),
            );
        }
        if let Some(old) = self.parked.insert(key, *parked) {
            // The same link twice: the first is answered as superseded.
            return Arrival::Refuse(
                Box::new(old),
                ErrorCode::SUPERSEDED,
                "another unit waits on the same link".into(),
            );
        }
        Arrival::Wait
    }

    /// An output `from` a node: runs the unit waiting for it, or waits for it.
    pub(super) fn on_forwarded(&mut self, from: NodeId, forwarded: Forwarded) -> Arrival<R> {
        let key = (from, forwarded.link);
        let Some(parked) = self.parked.remove(&key) else {
            let bytes = forwarded.output.data().len();
            if self.early.len() >= MAX_EARLY || self.early_bytes + bytes > MAX_EARLY_BYTES {
                tracing::debug!(%from, "an output came for no unit and no room is left; dropped");
                return Arrival::Wait;
            }
            self.early_bytes += bytes;
            if let Some((old, _)) = self.early.insert(key, (forwarded, Instant::now())) {
                self.early_bytes -= old.output.data().len();
            }
            return Arrival::Wait;
        };
        let parked = Box::new(parked);
        if self.superseded(&parked.unit) {
            return Arrival::Refuse(
                parked,
                ErrorCode::SUPERSEDED,
                "a unit issued later for this session position came first".into(),
            );
        }
        if let Err(e) = forwarded.output.verify() {
            return Arrival::Refuse(
                parked,
                ErrorCode::NO_INPUT,
                format!("the input {from} sent is malformed: {e}"),
            );
        }
        Arrival::Run(parked, Some(forwarded))
    }

    /// Units whose input did not come in time (to be answered
    /// [`ErrorCode::NO_INPUT`]); drops outputs that waited too long.
    pub(super) fn expire(&mut self, now: UnixMillis) -> Vec<Parked<R>> {
        let late: Vec<(NodeId, u64)> = self
            .parked
            .iter()
            .filter(|(_, p)| p.give_up_at <= now)
            .map(|(k, _)| *k)
            .collect();
        let out = late
            .into_iter()
            .filter_map(|k| self.parked.remove(&k))
            .collect();
        let mut freed = 0;
        self.early.retain(|_, (f, at)| {
            let keep = at.elapsed() < EARLY_TTL;
            if !keep {
                freed += f.output.data().len();
            }
            keep
        });
        self.early_bytes -= freed;
        out
    }
}

/// Decodes a forwarded output.
pub(super) fn decode(bytes: &[u8]) -> Result<Forwarded, codec::DecodeError> {
    codec::decode(bytes, Forwarded::LIMIT)
}

/// A stream to another node, opened when first needed.
type OutStream = Arc<tokio::sync::Mutex<Option<libp2p::Stream>>>;

/// The data plane of streamed chains: units waiting for their inputs,
/// outputs on their way, and the tasks that run units as their inputs come.
/// Cloned freely; the event loop hands it units, the streams hand it inputs.
#[derive(Clone)]
pub(super) struct Plane {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("parked", &self.parked())
            .finish_non_exhaustive()
    }
}

struct Inner {
    identity: Arc<Identity>,
    control: Mutex<libp2p_stream::Control>,
    links: Mutex<Links<UnitReply>>,
    out: Mutex<HashMap<PeerId, OutStream>>,
    /// Where answers to units go (the event loop sends them).
    answers: mpsc::Sender<(UnitReply, serve::UnitAnswer)>,
    in_progress: Arc<AtomicU64>,
    inbound: AtomicUsize,
    outputs_forwarded: AtomicU64,
    inputs_forwarded: AtomicU64,
}

impl Plane {
    /// A plane that opens streams with `control`, answers units on
    /// `answers`, and counts the units it runs in `in_progress`; it reads
    /// the streams other nodes open once [`Plane::listen`] is called.
    pub(super) fn new(
        identity: Arc<Identity>,
        control: libp2p_stream::Control,
        answers: mpsc::Sender<(UnitReply, serve::UnitAnswer)>,
        in_progress: Arc<AtomicU64>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                identity,
                control: Mutex::new(control),
                links: Mutex::new(Links::default()),
                out: Mutex::new(HashMap::new()),
                answers,
                in_progress,
                inbound: AtomicUsize::new(0),
                outputs_forwarded: AtomicU64::new(0),
                inputs_forwarded: AtomicU64::new(0),
            }),
        }
    }

    /// Reads the forward streams other nodes open, each on a task of its own.
    pub(super) fn listen(&self) -> Result<(), libp2p_stream::AlreadyRegistered> {
        let mut incoming = self.control().accept(FORWARD_PROTOCOL)?;
        let plane = self.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let active = plane.inner.inbound.fetch_add(1, Ordering::Relaxed);
                if active >= MAX_INBOUND_STREAMS {
                    plane.inner.inbound.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "too many forward streams; one dropped");
                    continue;
                }
                let plane = plane.clone();
                tokio::spawn(async move {
                    plane.read(peer, stream).await;
                    plane.inner.inbound.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(())
    }

    fn control(&self) -> libp2p_stream::Control {
        self.inner
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links<UnitReply>> {
        self.inner
            .links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Units parked now.
    #[must_use]
    pub(super) fn parked(&self) -> usize {
        self.links().parked()
    }

    /// Outputs sent on, and inputs received, so far.
    #[must_use]
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.inner.outputs_forwarded.load(Ordering::Relaxed),
            self.inner.inputs_forwarded.load(Ordering::Relaxed),
        )
    }

    /// An admitted inference unit: runs now, waits for its input, or is refused.
    pub(super) fn on_unit(
        &self,
        served: serve::Served,
        id: UnitId,
        unit: InferenceUnit,
        expires_at: UnixMillis,
        reply: UnitReply,
    ) {
        let arrival = self.links().on_unit(served, id, unit, expires_at, reply);
        self.on_arrival(arrival);
    }

    /// An output `from` a node, for a unit here.
    pub(super) fn on_forwarded(&self, from: NodeId, forwarded: Forwarded) {
        self.inner.inputs_forwarded.fetch_add(1, Ordering::Relaxed);
        let arrival = self.links().on_forwarded(from, forwarded);
        self.on_arrival(arrival);
    }

    /// Answers the parked units whose input did not come in time.
    pub(super) fn expire(&self) {
        let late = self.links().expire(now());
        for p in late {
            let message = "the input from the hop before did not come in time".to_owned();
            self.refuse(Box::new(p), ErrorCode::NO_INPUT, message);
        }
    }

    fn on_arrival(&self, arrival: Arrival<UnitReply>) {
        match arrival {
            Arrival::Wait => {}
            Arrival::Refuse(parked, code, message) => self.refuse(parked, code, message),
            Arrival::Run(parked, forwarded) => self.run(*parked, forwarded),
        }
    }

    fn refuse(&self, parked: Box<Parked<UnitReply>>, code: ErrorCode, message: String) {
        let refusal = serve::Refusal::new(code, message, Some(parked.id));
        let answer = serve::UnitAnswer::refusal(&self.inner.identity, &refusal, now());
        self.answer(parked.reply, answer);
    }

    fn answer(&self, reply: UnitReply, answer: serve::UnitAnswer) {
        if let Err(mpsc::error::TrySendError::Full(pair)) =
            self.inner.answers.try_send((reply, answer))
        {
            let answers = self.inner.answers.clone();
            tokio::spawn(async move {
                let _ = answers.send(pair).await;
            });
        }
    }

    /// Hands the unit to the engine at once (on `forwarded`'s output when
    /// its input came that way); the rest (forwarding the output, signing
    /// the result, answering) runs on a task of its own.
    fn run(&self, parked: Parked<UnitReply>, forwarded: Option<Forwarded>) {
        let Parked {
            served,
            id,
            mut unit,
            reply,
            ..
        } = parked;
        let ran_on = forwarded.map(|f| {
            let commitment = f.commitment();
            unit.input = f.output;
            commitment
        });
        let begun = match serve::begin(&served, id, unit, ran_on) {
            Ok(b) => b,
            Err(refusal) => {
                let answer = serve::UnitAnswer::refusal(&self.inner.identity, &refusal, now());
                self.answer(reply, answer);
                return;
            }
        };
        self.inner.in_progress.fetch_add(1, Ordering::Relaxed);
        let plane = self.clone();
        tokio::spawn(async move {
            let answer = match begun.outputs().await {
                Ok(computed) => {
                    if let Some((to, bytes)) = computed.forwarded() {
                        plane.send(to, bytes).await;
                        // Let the connection's task carry the output out
                        // before this one signs the result.
                        tokio::task::yield_now().await;
                    }
                    computed.sign(&plane.inner.identity, now())
                }
                Err(refusal) => serve::UnitAnswer::refusal(&plane.inner.identity, &refusal, now()),
            };
            plane.inner.in_progress.fetch_sub(1, Ordering::Relaxed);
            let _ = plane.inner.answers.send((reply, answer)).await;
        });
    }

    /// Sends an encoded [`Forwarded`] to `to` (here, when it is this node).
    /// A failure is logged, not returned: the unit's result still goes to
    /// its issuer, and the next hop, left without its input, says so to the
    /// issuer, who then sends the input itself.
    async fn send(&self, to: NodeId, bytes: Vec<u8>) {
        self.inner.outputs_forwarded.fetch_add(1, Ordering::Relaxed);
        if to == self.inner.identity.node_id() {
            match decode(&bytes) {
                Ok(forwarded) => self.on_forwarded(to, forwarded),
                Err(e) => tracing::warn!(error = %e, "an output of ours does not decode"),
            }
            return;
        }
        let peer = match PeerId::from_bytes(&to.peer_id_bytes()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot forward to a bad peer id");
                return;
            }
        };
        let slot = self
            .inner
            .out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer)
            .or_default()
            .clone();
        let mut stream = slot.lock().await;
        // A stream found broken is opened again, once.
        for _ in 0..2 {
            if stream.is_none() {
                let mut control = self.control();
                match tokio::time::timeout(
                    OPEN_TIMEOUT,
                    control.open_stream(peer, FORWARD_PROTOCOL),
                )
                .await
                {
                    Ok(Ok(s)) => *stream = Some(s),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "cannot open a forward stream");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "no forward stream in time");
                        return;
                    }
                }
            }
            let Some(s) = stream.as_mut() else {
                return;
            };
            match write_frame(s, &bytes).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "a forward stream broke");
                    *stream = None;
                }
            }
        }
    }

    /// Reads the frames of one stream from `peer` until it ends or
    /// misbehaves (an oversized, trickled or undecodable frame).
    async fn read(&self, peer: PeerId, mut stream: libp2p::Stream) {
        let Some(from) = node_id_of(&peer) else {
            return;
        };
        loop {
            match read_frame(&mut stream).await {
                Ok(Some(bytes)) => match decode(&bytes) {
                    Ok(forwarded) => self.on_forwarded(from, forwarded),
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "an undecodable forwarded output; stream closed");
                        return;
                    }
                },
                Ok(None) => return,
                Err(e) => {
                    tracing::info!(%peer, error = %e, "a forward stream misbehaved; closed");
                    return;
                }
            }
        }
    }
}

async fn write_frame(stream: &mut libp2p::Stream, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    // One write: one frame of the multiplexer, not two.
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(bytes);
    stream.write_all(&frame).await?;
    stream.flush().await
}

/// The next frame of a forward stream; `None` when the stream ended between
/// frames. A stream may stay idle between frames as long as it likes; once
/// a frame starts, it must be within the limit and arrive at
/// [`super::work::MIN_REQUEST_RATE`].
async fn read_frame(stream: &mut libp2p::Stream) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > Forwarded::LIMIT.bytes() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes"),
        ));
    }
    let budget = super::work::REQUEST_GRACE
        + Duration::from_secs_f64(len as f64 / super::work::MIN_REQUEST_RATE as f64);
    let mut buf = Vec::new();
    let mut body = (&mut *stream).take(len as u64);
    match tokio::time::timeout(budget, body.read_to_end(&mut buf)).await {
        Ok(Ok(n)) if n == len => Ok(Some(buf)),
        Ok(Ok(n)) => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("a frame ended after {n} of {len} bytes"),
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("a frame of {len} bytes did not arrive within {budget:?}"),
        )),
    }
}
