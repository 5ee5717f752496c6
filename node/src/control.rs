//! The control API, on loopback only: `GET /v1/status` (JSON), `GET /metrics`
//! (Prometheus text), `POST /v1/leave`; and the client `commons node status`
//! and `commons node leave` use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::network::{Command, Metrics};

#[derive(Clone)]
struct AppState {
    commands: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
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
    metrics: Arc<Metrics>,
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
        .with_state(AppState {
            commands,
            metrics,
            leave,
        });
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    Ok((bound, async move { server.await }))
}

async fn status(State(state): State<AppState>) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.commands.send(Command::Status(tx)).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response();
    }
    match rx.await {
        Ok(status) => axum::Json(status).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the node is stopping").into_response(),
    }
}

async fn leave_now(State(state): State<AppState>) -> Response {
    state.leave.notify_one();
    (StatusCode::ACCEPTED, "leaving").into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    let mut registry = Registry::with_prefix("commons");
    let gauge = |v: u64| {
        let g: Gauge = Gauge::default();
        g.set(v as i64);
        g
    };
    registry.register(
        "peers",
        "Peers known by their adverts",
        gauge(m.peers.load(Ordering::Relaxed)),
    );
    registry.register(
        "connected_peers",
        "Peers connected now",
        gauge(m.connected.load(Ordering::Relaxed)),
    );
    registry.register(
        "adverts_published",
        "Adverts this node published",
        gauge(m.published.load(Ordering::Relaxed)),
    );
    registry.register(
        "adverts_accepted",
        "Adverts and leave notices accepted",
        gauge(m.accepted.load(Ordering::Relaxed)),
    );
    registry.register(
        "adverts_rejected",
        "Gossip messages rejected",
        gauge(m.rejected.load(Ordering::Relaxed)),
    );
    registry.register(
        "connections_established",
        "Connections established since start",
        gauge(m.connections.load(Ordering::Relaxed)),
    );
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

/// Asks a node to leave.
pub fn request_leave(addr: SocketAddr) -> anyhow::Result<()> {
    check_loopback(&addr)?;
    agent()
        .post(&format!("http://{addr}/v1/leave"))
        .send_empty()
        .with_context(|| format!("no node answers on {addr}"))?;
    Ok(())
}
