//! The OpenAI-compatible API of a coordinating node (`--api ADDR`):
//! `POST /v1/chat/completions` and `POST /v1/completions` (both with
//! `stream: true` as server-sent events) and `GET /v1/models`, backed by the
//! swarm. Each request becomes a job signed with the node's key and handed to
//! its coordinator; errors use OpenAI's error format.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use commons_protocol::envelope::{Envelope, MessageKind};
use commons_protocol::messages::{
    ChatTurn, ErrorCode, ErrorReply, JobInput, JobOp, JobReport, JobRequest, JobSpec, JobState,
    SamplingParams,
};
use commons_protocol::{BoundedVec, CoalitionId, Identity, JobId, ModelId, Nonce, UnixMillis};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::network::Command;

/// A model the API offers, by name and by id.
#[derive(Debug, Clone)]
pub struct ApiModel {
    /// Its content id.
    pub id: ModelId,
    /// The name clients use (the file's stem); its id in hex works too.
    pub name: String,
}

#[derive(Clone)]
struct Api {
    commands: mpsc::Sender<Command>,
    identity: Arc<Identity>,
    models: Arc<Vec<ApiModel>>,
    counter: Arc<AtomicU64>,
    nonce_seed: [u8; 8],
    coalition: Option<CoalitionId>,
}

/// An error in OpenAI's format.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<String>,
    message: String,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }

    fn from_code(code: ErrorCode, message: String) -> Self {
        let (status, kind) = match code {
            ErrorCode::BAD_REQUEST => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ErrorCode::TOO_LARGE => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ErrorCode::UNKNOWN_JOB => (StatusCode::NOT_FOUND, "invalid_request_error"),
            ErrorCode::OVERLOADED => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            ErrorCode::NO_ROUTE => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        Self {
            status,
            kind,
            code: Some(code.name().to_owned()),
            message,
        }
    }

    fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": Value::Null,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Binds the API; returns the bound address and the server future. Its jobs
/// are signed by `identity` and run for `coalition` (`None`: open work).
pub async fn serve(
    addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    identity: Arc<Identity>,
    models: Vec<ApiModel>,
    coalition: Option<CoalitionId>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    crate::control::check_loopback(&addr)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the API on {addr}"))?;
    let bound = listener.local_addr()?;
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let api = Api {
        commands,
        identity,
        models: Arc::new(models),
        counter: Arc::new(AtomicU64::new(0)),
        nonce_seed: seed,
        coalition,
    };
    let app = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                code: Some("not_found".into()),
                message: "no such endpoint".into(),
            }
        })
        .with_state(api);
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    Ok((bound, async move { server.await }))
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now() -> UnixMillis {
    UnixMillis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

impl Api {
    fn model(&self, name: &str) -> Result<&ApiModel, ApiError> {
        self.models
            .iter()
            .find(|m| m.name == name || m.id.to_string() == name)
            .ok_or_else(|| ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                code: Some("model_not_found".into()),
                message: format!(
                    "the model `{name}` does not exist here; GET /v1/models lists those served"
                ),
            })
    }

    /// Signs `op` with the node's key and asks the node's coordinator.
    async fn call(&self, op: JobOp) -> Result<JobReport, ApiError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.nonce_seed);
        nonce[8..].copy_from_slice(&n.to_le_bytes());
        let t = now();
        let request = JobRequest {
            submitter: self.identity.node_id(),
            nonce: Nonce(nonce),
            issued_at: t,
            expires_at: t.plus_millis(120_000),
            op,
        };
        let internal = |m: String| ApiError::from_code(ErrorCode::INTERNAL, m);
        let bytes = Envelope::seal(&self.identity, &request)
            .map_err(|e| internal(e.to_string()))?
            .to_bytes();
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Job {
                request: bytes,
                reply: tx,
            })
            .await
            .map_err(|_| internal("the node is stopping".into()))?;
        let answer = rx
            .await
            .map_err(|_| internal("the node is stopping".into()))?;
        let envelope = Envelope::from_bytes(&answer).map_err(|e| internal(e.to_string()))?;
        match envelope.kind() {
            MessageKind::JobReport => envelope
                .open::<JobReport>(now())
                .map_err(|e| internal(e.to_string())),
            MessageKind::ErrorReply => {
                let e: ErrorReply = envelope.open(now()).map_err(|e| internal(e.to_string()))?;
                Err(ApiError::from_code(e.code, e.message))
            }
            other => Err(internal(format!("unexpected {other:?}"))),
        }
    }

    async fn watch(&self, job: JobId, from_token: u32) -> Result<JobReport, ApiError> {
        self.call(JobOp::Watch {
            job,
            from_token,
            wait_ms: 10_000,
        })
        .await
    }
}

async fn list_models(State(api): State<Api>) -> Response {
    let data: Vec<Value> = api
        .models
        .iter()
        .map(|m| json!({ "id": m.name, "object": "model", "created": 0, "owned_by": "commons", "blake3": m.id.to_string() }))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

/// A message's content: a string, or a list of parts of which the text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n: Option<u32>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

fn sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
) -> Result<SamplingParams, ApiError> {
    // OpenAI's defaults: temperature 1, top_p 1.
    let temperature = temperature.unwrap_or(1.0);
    let top_p = top_p.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature must be between 0 and 2"));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p must be in (0, 1]"));
    }
    Ok(SamplingParams {
        temperature,
        top_k: 0,
        top_p,
        repetition_penalty: 1.0,
        seed: seed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b)
        }),
    })
}

fn new_job() -> Result<JobId, ApiError> {
    crate::job_cli::new_job_id()
        .map_err(|e| ApiError::from_code(ErrorCode::INTERNAL, e.to_string()))
}

/// Which of the two endpoints a job serves.
#[derive(Debug, Clone, Copy)]
enum Flavor {
    Chat,
    Text,
}

impl Flavor {
    fn id(self, job: &JobId) -> String {
        match self {
            Self::Chat => format!("chatcmpl-{job}"),
            Self::Text => format!("cmpl-{job}"),
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Self::Chat, false) => "chat.completion",
            (Self::Chat, true) => "chat.completion.chunk",
            (Self::Text, _) => "text_completion",
        }
    }

    /// One choice: the whole text, or a piece of it when streaming.
    fn choice(self, text: &str, finish: Option<&str>, chunk: bool, first: bool) -> Value {
        match (self, chunk) {
            (Self::Chat, false) => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": Value::Null,
                "finish_reason": finish,
            }),
            (Self::Chat, true) => {
                let delta = if first {
                    json!({ "role": "assistant", "content": text })
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({ "content": text })
                };
                json!({ "index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish })
            }
            (Self::Text, _) => json!({
                "index": 0,
                "text": text,
                "logprobs": Value::Null,
                "finish_reason": finish,
            }),
        }
    }
}

fn finish_reason(state: &JobState) -> Option<&'static str> {
    match state {
        JobState::Stopped => Some("stop"),
        JobState::Length => Some("length"),
        _ => None,
    }
}

fn usage(r: &JobReport) -> Value {
    json!({
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.total_tokens,
        "total_tokens": r.prompt_tokens + r.total_tokens,
    })
}

/// Ends of a job other than a finished text, as errors.
fn failure(r: &JobReport) -> Option<ApiError> {
    match &r.state {
        JobState::Failed { code, message } => Some(ApiError::from_code(*code, message.clone())),
        JobState::Cancelled => Some(ApiError::from_code(
            ErrorCode::INTERNAL,
            "the job was cancelled".into(),
        )),
        _ => None,
    }
}

async fn run(
    api: Api,
    flavor: Flavor,
    model: String,
    spec: JobSpec,
    stream: bool,
) -> Result<Response, ApiError> {
    let job = spec.job;
    let created = unix_secs();
    let report = api.call(JobOp::Submit(spec)).await?;
    if !stream {
        let mut report = report;
        while !report.state.is_terminal() {
            report = api.watch(job, report.total_tokens).await?;
        }
        if let Some(e) = failure(&report) {
            return Err(e);
        }
        let body = json!({
            "id": flavor.id(&job),
            "object": flavor.object(false),
            "created": created,
            "model": model,
            "choices": [flavor.choice(&report.text, finish_reason(&report.state), false, false)],
            "usage": usage(&report),
            "system_fingerprint": Value::Null,
        });
        return Ok(axum::Json(body).into_response());
    }
    struct Progress {
        api: Api,
        report: Option<JobReport>,
        from_token: u32,
        sent_text: usize,
        first: bool,
        done: bool,
    }
    let start = Progress {
        api,
        report: Some(report),
        from_token: 0,
        sent_text: 0,
        first: true,
        done: false,
    };
    let events = futures::stream::unfold(start, move |mut p| {
        let model = model.clone();
        async move {
            if p.done {
                return None;
            }
            let report = match p.report.take() {
                Some(r) => Ok(r),
                None => p.api.watch(job, p.from_token).await,
            };
            let mut out = Vec::new();
            let r = match report {
                Ok(r) => r,
                Err(e) => {
                    out.push(Event::default().data(e.body().to_string()));
                    out.push(Event::default().data("[DONE]"));
                    p.done = true;
                    return Some((out, p));
                }
            };
            if let Some(e) = failure(&r) {
                out.push(Event::default().data(e.body().to_string()));
            } else {
                let new = r.text.get(p.sent_text..).unwrap_or("");
                let mut chunk = json!({
                    "id": flavor.id(&job),
                    "object": flavor.object(true),
                    "created": created,
                    "model": model,
                    "choices": [flavor.choice(new, None, true, p.first)],
                    "system_fingerprint": Value::Null,
                });
                if !new.is_empty() || p.first {
                    out.push(Event::default().data(chunk.to_string()));
                    p.first = false;
                }
                if let Some(f) = finish_reason(&r.state) {
                    chunk["choices"] = json!([flavor.choice("", Some(f), true, false)]);
                    chunk["usage"] = usage(&r);
                    out.push(Event::default().data(chunk.to_string()));
                }
                p.sent_text = p.sent_text.max(r.text.len());
            }
            p.from_token = r.total_tokens;
            if r.state.is_terminal() {
                out.push(Event::default().data("[DONE]"));
                p.done = true;
            }
            Some((out, p))
        }
    })
    .flat_map(|events| {
        futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

async fn chat_completions(State(api): State<Api>, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    let model = api.model(&req.model)?.clone();
    let mut turns = BoundedVec::new();
    for m in req.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::invalid(format!(
                "role `{}` is not supported (system, developer, user, assistant)",
                m.role
            )));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => parts
                .into_iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text)
                .collect::<Vec<_>>()
                .join(""),
        };
        let role = if m.role == "developer" {
            "system".to_owned()
        } else {
            m.role
        };
        turns
            .try_push(ChatTurn { role, content })
            .map_err(|_| ApiError::invalid("at most 256 messages"))?;
    }
    let spec = JobSpec {
        job: new_job()?,
        model: model.id,
        input: JobInput::Chat(turns),
        max_tokens: req.max_completion_tokens.or(req.max_tokens).unwrap_or(256),
        sampling: sampling(req.temperature, req.top_p, req.seed)?,
        coalition: api.coalition,
    };
    run(
        api,
        Flavor::Chat,
        model.name,
        spec,
        req.stream.unwrap_or(false),
    )
    .await
}

async fn completions(State(api): State<Api>, body: Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    let prompt = match req.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::invalid(
                "only one prompt per request is supported",
            ));
        }
    };
    let model = api.model(&req.model)?.clone();
    let spec = JobSpec {
        job: new_job()?,
        model: model.id,
        input: JobInput::Text(prompt),
        // OpenAI's default for completions.
        max_tokens: req.max_tokens.unwrap_or(16),
        sampling: sampling(req.temperature, req.top_p, req.seed)?,
        coalition: api.coalition,
    };
    run(
        api,
        Flavor::Text,
        model.name,
        spec,
        req.stream.unwrap_or(false),
    )
    .await
}
