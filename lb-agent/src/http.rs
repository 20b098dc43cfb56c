//! The agent's HTTP endpoints: `/metrics` on the metrics address; `/healthz`, `/livez` and
//! `/readyz` on the health address (kube-proxy's port 10256 answers `/healthz` the same way:
//! 200 with the last update and current times while healthy) and on the probe address (the
//! kubelet's, see [`Addresses::probes`]).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use tracing::{info, warn};

use crate::{metrics::Metrics, port_holder};

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

/// How long a taken address waits before the next try (kube-proxy retries its servers every
/// 5 s).
const RETRY: Duration = Duration::from_secs(5);

/// Where the servers listen (each is served on its own, and retried while its address is taken).
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    /// `/metrics` (kube-proxy's metrics port).
    pub metrics: SocketAddr,
    /// `/healthz`, `/livez`, `/readyz` (kube-proxy's health port).
    pub healthz: SocketAddr,
    /// The same health endpoints on a port of the agent's own, for the kubelet's probes: they
    /// then reach the agent while kube-proxy still holds its health port (a migration).
    pub probes: SocketAddr,
}

/// Serves the metrics, health and probe endpoints in the background. A server whose address is
/// taken (by kube-proxy during a migration, say) does not stop the agent, as it does not stop
/// kube-proxy: it says so (log line with the holder when known, `lb_listen_blocked`) and tries
/// again every 5 s, while the datapath keeps being programmed.
pub fn serve(addresses: Addresses, registry: Registry, health: Arc<Health>, metrics: &Metrics) {
    let health_app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health);
    let metrics_app = Router::new()
        .route("/metrics", get(self::metrics))
        .with_state(Arc::new(registry));
    for (server, flag, addr, app) in [
        (
            "healthz",
            "--healthz-addr",
            addresses.healthz,
            health_app.clone(),
        ),
        ("probes", "--probe-addr", addresses.probes, health_app),
        ("metrics", "--metrics-addr", addresses.metrics, metrics_app),
    ] {
        let blocked = metrics.listen_blocked(server);
        tokio::spawn(listen(server, flag, addr, app, blocked));
    }
}

/// Serves `app` on `addr`, binding again (every [`RETRY`]) for as long as it fails.
async fn listen(
    server: &'static str,
    flag: &'static str,
    addr: SocketAddr,
    app: Router,
    blocked: Gauge,
) {
    let mut failures = 0_u64;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                blocked.set(0);
                if failures > 0 {
                    info!(%addr, server, "listening now, after {failures} failed tries");
                }
                failures = 0;
                if let Err(error) = axum::serve(listener, app.clone()).await {
                    warn!(%addr, server, %error, "server stopped; listening again");
                }
            }
            Err(error) => {
                blocked.set(1);
                // The first failure, then one line a minute.
                if failures.is_multiple_of(12) {
                    let holder = port_holder::holder_of(addr).unwrap_or_else(|| "unknown".into());
                    warn!(
                        %addr,
                        server,
                        %holder,
                        %error,
                        "cannot listen on {addr} ({flag}); trying again every 5 s, the datapath \
                         keeps being programmed"
                    );
                }
                failures += 1;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}
