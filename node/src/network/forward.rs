//! Outputs handed from hop to hop of a streamed chain, `/commons/forward/1.0.0`:
//! the request is an encoded [`Forwarded`] (a unit's output and the link it
//! goes by), the answer an empty acknowledgement. The connection
//! authenticates the sender; the unit waiting for the output names it.
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
use std::time::{Duration, Instant};

use commons_protocol::codec;
use commons_protocol::messages::{ErrorCode, Forwarded, InferenceUnit};
use commons_protocol::{NodeId, SessionId, UnitId, UnixMillis};
use libp2p::StreamProtocol;

use super::work::{FrameCodec, FrameLimits};

/// Protocol id of forwarded outputs.
pub const FORWARD_PROTOCOL: StreamProtocol = StreamProtocol::new("/commons/forward/1.0.0");

/// Forwarded outputs in, empty acknowledgements back.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardLimits;

impl FrameLimits for ForwardLimits {
    fn request() -> usize {
        Forwarded::LIMIT.bytes()
    }
    fn response() -> usize {
        64
    }
}

/// The codec of `/commons/forward/1.0.0`.
pub type ForwardCodec = FrameCodec<ForwardLimits>;

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
pub struct Parked<R> {
    /// The unit's id.
    pub id: UnitId,
    /// The unit.
    pub unit: InferenceUnit,
    /// Where its answer goes.
    pub reply: R,
    /// When to give up on its input.
    give_up_at: UnixMillis,
}

/// What becomes of a unit or an output that arrives.
#[derive(Debug)]
pub enum Arrival<R> {
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
pub struct Links<R> {
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
    pub fn parked(&self) -> usize {
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
    pub fn on_unit(
        &mut self,
        id: UnitId,
        unit: InferenceUnit,
        expires_at: UnixMillis,
        reply: R,
    ) -> Arrival<R> {
        let stale = self.superseded(&unit);
        let give_up_at = UnixMillis(expires_at.0.saturating_sub(GIVE_UP_BEFORE));
        let upstream = unit.options.input_from;
        let parked = Box::new(Parked {
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
    pub fn on_forwarded(&mut self, from: NodeId, forwarded: Forwarded) -> Arrival<R> {
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
    pub fn expire(&mut self, now: UnixMillis) -> Vec<Parked<R>> {
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
pub fn decode(bytes: &[u8]) -> Result<Forwarded, codec::DecodeError> {
    codec::decode(bytes, Forwarded::LIMIT)
}
