//! The control API, on loopback only: `GET /v1/status` (JSON), `GET /metrics`
//! (Prometheus text), `POST /v1/leave`, `POST /v1/charters` (a sealed
//! charter to take and pass on), `POST /v1/coalitions/{id}/serve` and
//! `/drop`; and the client `commons node status | leave | serve | drop` and
//! `commons coalition publish` use.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, oneshot};

use commons_protocol::CoalitionId;

use crate::network::{
    CoalitionAnswer, CoalitionCommand, CoalitionRequest, Command, MAX_GOSSIP_BYTES, Status,
};

#[derive(Clone)]
struct AppState {
    commands: mpsc::Sender<Command>,
    leave: Arc<Notify>,
}

/// Refuses any control address that is not on loopback.
pub fn check_loopback(addr: &SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("the control API listens on loopback only (127.0.0.1 or [::1]), not {addr}");
    }
    Ok(())
}

/// Binds the control API; returns the bound address and the server future.
pub async fn serve(
    addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    leave: Arc<Notify>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    check_loopback(&addr)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for control on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics_text))
        .route("/v1/leave", post(leave_now))
        .route("/v1/charters", post(take_charter))
        .route("/v1/coalitions/{id}/{action}", post(change_coalition))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_GOSSIP_BYTES))
        .with_state(AppState { commands, leave });
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    Ok((bound, async move { server.await }))
}

/// A snapshot from the event loop, the one place the node's state lives.
async fn snapshot(state: &AppState) -> Option<Status> {
    let (tx, rx) = oneshot::channel();
    state.commands.send(Command::Status(tx)).await.ok()?;
    rx.await.ok()
}

async fn status(State(state): State<AppState>) -> Response {
    match snapshot(&state).await {
        Some(status) => axum::Json(status).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response(),
    }
}

async fn leave_now(State(state): State<AppState>) -> Response {
    state.leave.notify_one();
    (StatusCode::ACCEPTED, "leaving").into_response()
}

async fn coalition_request(state: &AppState, request: CoalitionRequest) -> Response {
    let (reply, rx) = oneshot::channel();
    let command = Command::Coalition(CoalitionCommand { request, reply });
    if state.commands.send(command).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response();
    }
    let answer: Option<CoalitionAnswer> = rx.await.ok();
    match answer {
        Some(Ok(json)) => axum::Json(json).into_response(),
        Some(Err(why)) => (StatusCode::UNPROCESSABLE_ENTITY, why).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response(),
    }
}

async fn take_charter(State(state): State<AppState>, body: Bytes) -> Response {
    coalition_request(&state, CoalitionRequest::Charter(body.to_vec())).await
}

async fn change_coalition(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let Ok(id) = id.parse::<CoalitionId>() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("{id} is not a coalition id (64 hex digits)"),
        )
            .into_response();
    };
    let request = match action.as_str() {
        "serve" => CoalitionRequest::Serve(id),
        "drop" => CoalitionRequest::Drop(id),
        other => {
            return (
                StatusCode::NOT_FOUND,
                format!("no action {other:?} (serve or drop)"),
            )
                .into_response();
        }
    };
    coalition_request(&state, request).await
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let Some(s) = snapshot(&state).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response();
    };
    let mut registry = Registry::with_prefix("commons");
    let c = &s.counters;
    let verification = s
        .verification
        .as_ref()
        .map(|v| v.counts.clone())
        .unwrap_or_default();
    for (name, help, value) in [
        (
            "peers",
            "Peers known by their adverts",
            s.peers.len() as u64,
        ),
        (
            "connected_peers",
            "Peers connected now",
            s.connected_peers as u64,
        ),
        (
            "work_in_progress",
            "Work units running",
            s.work_in_progress as u64,
        ),
        (
            "adverts_published",
            "Adverts this node published",
            c.adverts_published,
        ),
        (
            "adverts_accepted",
            "Adverts and leave notices accepted",
            c.adverts_accepted,
        ),
        (
            "adverts_rejected",
            "Gossip messages rejected",
            c.adverts_rejected,
        ),
        (
            "connections_established",
            "Connections established since start",
            c.connections_established,
        ),
        (
            "units_served",
            "Work units answered with a signed result",
            c.units_served,
        ),
        (
            "outputs_forwarded",
            "Outputs sent straight to the node running the next hop",
            c.outputs_forwarded,
        ),
        (
            "inputs_forwarded",
            "Inputs received from the node running the hop before",
            c.inputs_forwarded,
        ),
        (
            "peers_dropped",
            "Peers disconnected for an oversized, malformed or trickled request",
            c.peers_dropped,
        ),
        (
            "charters_accepted",
            "Coalition charters taken (new coalitions and newer versions)",
            c.charters_accepted,
        ),
        (
            "charters_rejected",
            "Coalition charters refused as invalid",
            c.charters_rejected,
        ),
        (
            "coalitions_served",
            "Coalitions this node serves (0: open work only)",
            s.coalitions.len() as u64,
        ),
    ] {
        let g: Gauge = Gauge::default();
        g.set(value as i64);
        registry.register(name, help, g);
    }
    for (name, help, by_code) in [
        (
            "units_refused",
            "Work units refused, by error code",
            &c.units_refused,
        ),
        (
            "jobs_refused",
            "Job requests refused by this coordinator, by error code",
            &c.jobs_refused,
        ),
        (
            "results_rejected",
            "Answers to work units this coordinator did not take as results, by kind",
            &c.results_rejected,
        ),
        (
            "verification",
            "What this coordinator's spot checks did, by kind (check_units, compared, mismatches, exclusions…)",
            &verification,
        ),
    ] {
        let family = Family::<Vec<(String, String)>, Counter>::default();
        for (code, n) in by_code {
            family
                .get_or_create(&vec![("code".to_owned(), code.clone())])
                .inc_by(*n);
        }
        registry.register(name, help, family);
    }
    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into()
}

/// Fetches a node's status.
pub fn fetch_status(addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    check_loopback(&addr)?;
    let mut response = agent()
        .get(&format!("http://{addr}/v1/status"))
        .call()
        .with_context(|| format!("no node answers on {addr}"))?;
    response
        .body_mut()
        .read_json()
        .context("the node answered with invalid JSON")
}

/// Posts `body` to `path` of the node's control API; the JSON answer, or the
/// node's reason for refusing.
pub fn post_to(addr: SocketAddr, path: &str, body: &[u8]) -> anyhow::Result<serde_json::Value> {
    check_loopback(&addr)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .post(&format!("http://{addr}{path}"))
        .send(body)
        .with_context(|| format!("no node answers on {addr}"))?;
    let status = response.status();
    let text = response
        .body_mut()
        .read_to_string()
        .context("cannot read the node's answer")?;
    if !status.is_success() {
        bail!("the node refused: {text}");
    }
    serde_json::from_str(&text).context("the node answered with invalid JSON")
}

/// Asks a node to leave.
pub fn request_leave(addr: SocketAddr) -> anyhow::Result<()> {
    check_loopback(&addr)?;
    agent()
        .post(&format!("http://{addr}/v1/leave"))
        .send_empty()
        .with_context(|| format!("no node answers on {addr}"))?;
    Ok(())
}
