//! Serving inference work units: checks a signed unit (signature, validity,
//! replay, coalition and issuer's rate limit, then what this node holds),
//! runs it on the engine, and answers with a signed result committed by
//! blake3, or a signed error reply with a stable code.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use commons_coordinator::quota::{Quotas, RateLimit};
use commons_coordinator::trust::Coalitions;
use commons_protocol::envelope::Envelope;
use commons_protocol::messages::{
    ErrorCode, ErrorReply, ExecMetrics, Forwarded, InferenceUnit, LayerRange, WorkBody, WorkResult,
    WorkUnit,
};
use commons_protocol::replay::ReplayGuard;
use commons_protocol::{Hash, Identity, ModelId, NodeId, UnitId, UnixMillis};

use super::engine::{EngineError, EngineHandle, StepRequest};
use super::session::SessionError;
use super::stage::{StageInput, StageOutput, argmax};

/// What a node serves: a layer range of a model, through an engine.
#[derive(Debug, Clone)]
pub struct Served {
    /// The model.
    pub model: ModelId,
    /// Layers held.
    pub layers: LayerRange,
    /// Layers in the whole model.
    pub total_layers: u32,
    /// Hidden size.
    pub hidden: usize,
    /// The engine running the stage.
    pub engine: EngineHandle,
}

/// How long results and error replies stay valid.
const REPLY_TTL_MS: u64 = 60_000;

/// Issuers whose rate a node tracks at once.
const MAX_TRACKED_ISSUERS: usize = 4096;

/// What a node checks about a unit's issuer before it runs anything: nonces
/// seen, the coalitions it serves, and each issuer's rate.
#[derive(Debug)]
pub struct Admission {
    replay: ReplayGuard,
    coalitions: Coalitions,
    quotas: Option<Quotas<NodeId>>,
}

impl Admission {
    /// Serves `coalitions` (open work when there are none), at most
    /// `per_issuer` units from each issuer (`None`: no limit).
    #[must_use]
    pub fn new(coalitions: Coalitions, per_issuer: Option<RateLimit>) -> Self {
        Self {
            // Units may be valid for up to ten minutes; their nonces are kept that long.
            replay: ReplayGuard::new(10 * 60_000, 1 << 20),
            coalitions,
            quotas: per_issuer.map(|limit| Quotas::new(limit, MAX_TRACKED_ISSUERS)),
        }
    }

    /// The coalitions served.
    #[must_use]
    pub fn coalitions(&self) -> &Coalitions {
        &self.coalitions
    }

    /// Serves `coalitions` from now on (a charter updated, a coalition
    /// taken or dropped), keeping the nonces seen and the issuers' quotas.
    pub fn set_coalitions(&mut self, coalitions: Coalitions) {
        self.coalitions = coalitions;
    }
}

/// A unit refused before it ran.
#[derive(Debug, Clone)]
pub struct Refusal {
    code: ErrorCode,
    message: String,
    unit: Option<UnitId>,
}

/// A refusal not tied to a unit.
#[must_use]
pub fn refusal(code: ErrorCode, message: &str) -> Refusal {
    Refusal::new(code, message, None)
}

impl Refusal {
    /// Its stable code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// A refusal of `unit` (when known) with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>, unit: Option<UnitId>) -> Self {
        Self {
            code,
            message: message.into(),
            unit,
        }
    }
}

/// Opens a work unit and checks it can run here, before any compute:
/// signature, validity, replay, coalition (one served, the issuer a member),
/// the issuer's rate, model, layer range, input shape.
pub fn admit(
    served: &Served,
    admission: &mut Admission,
    bytes: &[u8],
    now: UnixMillis,
) -> Result<(UnitId, InferenceUnit), Refusal> {
    let (id, unit) = open(admission, bytes, now)?;
    Ok((id, check_inference(served, id, unit.body)?))
}

/// Opens a work unit of any kind and checks what does not depend on the
/// work: signature, validity, replay, coalition (one served, the issuer a
/// member) and the issuer's rate.
pub fn open(
    admission: &mut Admission,
    bytes: &[u8],
    now: UnixMillis,
) -> Result<(UnitId, WorkUnit), Refusal> {
    let unit: WorkUnit = Envelope::open_bytes(bytes, now).map_err(|e| {
        let code = match e {
            commons_protocol::OpenError::Expired { .. }
            | commons_protocol::OpenError::NotYetValid { .. } => ErrorCode::EXPIRED,
            commons_protocol::OpenError::TooLarge { .. } => ErrorCode::TOO_LARGE,
            _ => ErrorCode::BAD_REQUEST,
        };
        Refusal::new(code, e.to_string(), None)
    })?;
    let id = unit
        .id()
        .map_err(|e| Refusal::new(ErrorCode::BAD_REQUEST, e.to_string(), None))?;
    admission
        .replay
        .check(unit.issuer, unit.nonce, unit.expires_at, now)
        .map_err(|e| {
            let code = if matches!(e, commons_protocol::replay::ReplayError::Replayed { .. }) {
                ErrorCode::REPLAYED
            } else {
                ErrorCode::EXPIRED
            };
            Refusal::new(code, e.to_string(), Some(id))
        })?;
    admission
        .coalitions
        .authorize(unit.body.coalition(), &unit.issuer)
        .map_err(|e| Refusal::new(ErrorCode::UNAUTHORIZED, e.to_string(), Some(id)))?;
    if let Some(quotas) = admission.quotas.as_mut() {
        quotas.try_take(&unit.issuer, now).map_err(|e| {
            Refusal::new(
                ErrorCode::OVERLOADED,
                format!("units from {}: {e}", unit.issuer),
                Some(id),
            )
        })?;
    }
    Ok((id, unit))
}

/// Checks that an opened unit is an inference step this node can run.
pub fn check_inference(
    served: &Served,
    id: UnitId,
    body: WorkBody,
) -> Result<InferenceUnit, Refusal> {
    let WorkBody::Inference(inf) = body else {
        return Err(Refusal::new(
            ErrorCode::BAD_REQUEST,
            "this node serves inference units only",
            Some(id),
        ));
    };
    // Any part of the layers held: a checker replays another node's hop.
    let within = served.layers.start <= inf.layers.start
        && inf.layers.end <= served.layers.end
        && inf.layers.start < inf.layers.end;
    if inf.model != served.model || !within {
        return Err(Refusal::new(
            ErrorCode::MODEL_NOT_HELD,
            format!(
                "this node holds layers {} of {}, not {} of {}",
                served.layers, served.model, inf.layers, inf.model
            ),
            Some(id),
        ));
    }
    inf.input
        .verify()
        .map_err(|e| Refusal::new(ErrorCode::BAD_REQUEST, e.to_string(), Some(id)))?;
    Ok(inf)
}

fn to_input(
    served: &Served,
    layers: LayerRange,
    t: &commons_protocol::Tensor,
) -> Result<StageInput, String> {
    let shape = t.shape();
    if layers.start == 0 {
        let ids = t.to_u32().ok_or("the first stage takes u32 token ids")?;
        // (n,) is a token the last hop sent on.
        let tokens = shape.len() == 1 || (shape.len() == 2 && shape[0] == 1);
        if !tokens || ids.is_empty() {
            return Err(format!("token ids must have shape (1, n), not {shape:?}"));
        }
        return Ok(StageInput::Tokens(ids));
    }
    let values = t.to_f32().ok_or("later stages take f32 hidden states")?;
    if shape.len() != 3 || shape[0] != 1 || shape[2] as usize != served.hidden {
        return Err(format!(
            "hidden states must have shape (1, n, {}), not {shape:?}",
            served.hidden
        ));
    }
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
        .map(StageInput::Hidden)
        .map_err(|e| e.to_string())
}

fn to_wire(t: &Tensor) -> Result<commons_protocol::Tensor, String> {
    let shape: Vec<u64> = t.dims().iter().map(|&d| d as u64).collect();
    let values = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())?;
    commons_protocol::Tensor::from_f32(&shape, &values).map_err(|e| e.to_string())
}

/// The signed answer to a unit.
#[derive(Debug)]
pub struct UnitAnswer {
    /// A `WorkResult` or `ErrorReply` envelope.
    pub bytes: Vec<u8>,
    /// The code, when the answer is a refusal.
    pub refused: Option<ErrorCode>,
}

impl UnitAnswer {
    /// The signed reply to a unit refused.
    pub fn refusal(identity: &Identity, refusal: &Refusal, now: UnixMillis) -> Self {
        Self {
            bytes: refusal_bytes(identity, refusal, now),
            refused: Some(refusal.code),
        }
    }
}

/// A unit handed to the engine: its reply is on the way.
#[derive(Debug)]
pub struct Begun {
    id: UnitId,
    unit: InferenceUnit,
    ran_on: Option<Hash>,
    reply: tokio::sync::oneshot::Receiver<Result<super::engine::StepReply, EngineError>>,
}

/// A unit's outputs, computed and not yet signed.
#[derive(Debug)]
pub struct Computed {
    id: UnitId,
    unit: InferenceUnit,
    ran_on: Option<Hash>,
    outputs: Vec<commons_protocol::Tensor>,
    metrics: ExecMetrics,
}

fn engine_refusal(id: UnitId, e: &EngineError) -> Refusal {
    let code = match e {
        EngineError::Session(SessionError::Unknown { .. } | SessionError::Position { .. }) => {
            ErrorCode::UNKNOWN_SESSION
        }
        EngineError::Session(SessionError::OverBudget { .. } | SessionError::NoRoom { .. })
        | EngineError::Busy => ErrorCode::OVERLOADED,
        EngineError::Stopped => ErrorCode::SHUTTING_DOWN,
        _ => ErrorCode::INTERNAL,
    };
    Refusal::new(code, e.to_string(), Some(id))
}

/// Hands an admitted unit to the engine, without waiting: the step starts
/// as soon as the engine is free. A unit that ran on a forwarded input
/// commits to it (`ran_on`: the commitment of the result it came from).
pub fn begin(
    served: &Served,
    id: UnitId,
    unit: InferenceUnit,
    ran_on: Option<Hash>,
) -> Result<Begun, Refusal> {
    let input = to_input(served, unit.layers, &unit.input)
        .map_err(|m| Refusal::new(ErrorCode::BAD_REQUEST, m, Some(id)))?;
    let request = StepRequest {
        session: unit.session,
        start_pos: unit.options.start_pos as usize,
        input,
        session_budget: unit.options.max_session_tokens as usize,
        close_after: unit.options.close_session,
        layers: (unit.layers != served.layers)
            .then_some(unit.layers.start as usize..unit.layers.end as usize),
    };
    let reply = served
        .engine
        .submit(request)
        .map_err(|e| engine_refusal(id, &e))?;
    Ok(Begun {
        id,
        unit,
        ran_on,
        reply,
    })
}

impl Begun {
    /// Waits for the engine and makes the unit's outputs: hidden states,
    /// logits, or the greedy token.
    pub async fn outputs(self) -> Result<Computed, Refusal> {
        let Self {
            id,
            unit,
            ran_on,
            reply,
        } = self;
        let reply = reply
            .await
            .map_err(|_| EngineError::Stopped)
            .and_then(|r| r)
            .map_err(|e| engine_refusal(id, &e))?;
        let internal = |m: String| Refusal::new(ErrorCode::INTERNAL, m, Some(id));
        let mut outputs = match reply.output {
            StageOutput::Hidden(h) => vec![to_wire(&h).map_err(internal)?],
            StageOutput::Logits(l) => match &unit.options.sampling {
                // Greedy is the only sampling that needs no history: anything else
                // is chosen by whoever holds the whole sequence, from the logits.
                Some(s) if s.temperature == 0.0 => {
                    let token = argmax(&l).map_err(|e| internal(e.to_string()))?;
                    vec![
                        commons_protocol::Tensor::from_u32(&[1], &[token])
                            .map_err(|e| internal(e.to_string()))?,
                    ]
                }
                _ => vec![to_wire(&l).map_err(internal)?],
            },
        };
        if crate::fault::corrupt(&mut outputs) {
            tracing::warn!(unit = %id, "fault: corrupted the result");
        }
        let tokens = match unit.input.shape() {
            s if s.len() >= 2 => s[1] as u32,
            [n] => *n as u32,
            _ => 0,
        };
        let metrics = ExecMetrics {
            queue_micros: reply.queued.as_micros() as u64,
            compute_micros: reply.compute.as_micros() as u64,
            tokens,
            peak_memory_bytes: 0,
        };
        Ok(Computed {
            id,
            unit,
            ran_on,
            outputs,
            metrics,
        })
    }
}

impl Computed {
    /// The output to send to the next hop, encoded, and where to: `None`
    /// when the unit forwards nothing, or its token ends the job.
    #[must_use]
    pub fn forwarded(&self) -> Option<(NodeId, Vec<u8>)> {
        let down = self.unit.options.forward_to.as_ref()?;
        let [output] = self.outputs.as_slice() else {
            return None;
        };
        if let Some([token]) = output.to_u32().as_deref()
            && down.unless.contains(token)
        {
            return None;
        }
        let mut sent = output.clone();
        if crate::fault::equivocate(&mut sent) {
            tracing::warn!(unit = %self.id, "fault: forwarding another output than the result's");
        }
        let forwarded = Forwarded {
            unit: self.id,
            link: down.link,
            input: self.ran_on,
            output: sent,
        };
        match commons_protocol::codec::encode(&forwarded) {
            Ok(bytes) => Some((down.node, bytes)),
            Err(e) => {
                tracing::warn!(unit = %self.id, error = %e, "cannot encode the output to forward");
                None
            }
        }
    }

    /// The signed result.
    pub fn sign(self, identity: &Identity, now: UnixMillis) -> UnitAnswer {
        let id = self.id;
        let signed = WorkResult::sign_with_input(
            identity,
            id,
            self.ran_on,
            self.outputs,
            self.metrics,
            now,
            now.plus_millis(REPLY_TTL_MS),
        )
        .map_err(|e| Refusal::new(ErrorCode::INTERNAL, e.to_string(), Some(id)))
        .and_then(|result| {
            Envelope::seal(identity, &result)
                .map(|e| e.to_bytes())
                .map_err(|e| Refusal::new(ErrorCode::TOO_LARGE, e.to_string(), Some(id)))
        });
        match signed {
            Ok(bytes) => UnitAnswer {
                bytes,
                refused: None,
            },
            Err(refusal) => UnitAnswer::refusal(identity, &refusal, now),
        }
    }
}

/// Runs an admitted unit to its signed answer, forwarding nothing.
pub async fn run(
    served: &Served,
    identity: &Arc<Identity>,
    id: UnitId,
    unit: InferenceUnit,
    now: impl Fn() -> UnixMillis,
) -> UnitAnswer {
    let computed = match begin(served, id, unit, None) {
        Ok(begun) => begun.outputs().await,
        Err(refusal) => Err(refusal),
    };
    match computed {
        Ok(c) => c.sign(identity, now()),
        Err(refusal) => UnitAnswer::refusal(identity, &refusal, now()),
    }
}

/// A signed error reply for `refusal`.
pub fn refusal_bytes(identity: &Identity, refusal: &Refusal, now: UnixMillis) -> Vec<u8> {
    let mut message = refusal.message.clone();
    message.truncate(1024);
    let reply = ErrorReply {
        code: refusal.code,
        message,
        regarding: refusal.unit,
        responder: identity.node_id(),
        issued_at: now,
        expires_at: now.plus_millis(REPLY_TTL_MS),
    };
    Envelope::seal(identity, &reply)
        .map(|e| e.to_bytes())
        .unwrap_or_default()
}
