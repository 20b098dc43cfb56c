//! The agent's HTTP endpoints: `/metrics` on the metrics address; `/healthz`, `/livez` and
//! `/readyz` on the health address (kube-proxy's port 10256 answers `/healthz` the same way:
//! 200 with the last update and current times while healthy).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;

/// The agent counts as stuck when its loop has not turned for this long.
const STALL: Duration = Duration::from_secs(60);

/// What the health endpoints report.
#[derive(Debug)]
pub struct Health {
    /// The first full sync has been written.
    pub ready: AtomicBool,
    last_update: Mutex<Option<SystemTime>>,
    heartbeat: Mutex<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            last_update: Mutex::new(None),
            heartbeat: Mutex::new(Instant::now()),
        }
    }
}

impl Health {
    /// The loop turned (called on every iteration).
    pub fn beat(&self) {
        if let Ok(mut h) = self.heartbeat.lock() {
            *h = Instant::now();
        }
    }

    /// The maps were written.
    pub fn synced(&self) {
        self.ready.store(true, Ordering::Relaxed);
        if let Ok(mut t) = self.last_update.lock() {
            *t = Some(SystemTime::now());
        }
    }

    pub fn healthy(&self) -> bool {
        self.heartbeat.lock().is_ok_and(|h| h.elapsed() < STALL)
    }
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let last = health
        .last_update
        .lock()
        .ok()
        .and_then(|t| *t)
        .map(rfc3339)
        .unwrap_or_default();
    let body = format!(
        r#"{{"lastUpdated": "{last}","currentTime": "{}"}}"#,
        rfc3339(SystemTime::now())
    );
    let status = if health.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [("content-type", "application/json")], body)
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
    }
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

/// Binds both servers (failing at once when an address is taken) and serves them in the
/// background.
pub async fn serve(
    metrics_addr: SocketAddr,
    healthz_addr: SocketAddr,
    registry: Registry,
    health: Arc<Health>,
) -> Result<()> {
    let health_app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health);
    let metrics_app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(registry));
    let health_listener = tokio::net::TcpListener::bind(healthz_addr)
        .await
        .with_context(|| format!("cannot listen on {healthz_addr} (--healthz-addr)"))?;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} (--metrics-addr)"))?;
    tokio::spawn(async move { axum::serve(health_listener, health_app).await });
    tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
    Ok(())
}
