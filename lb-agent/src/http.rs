//! The agent's HTTP endpoints: `/metrics` on the metrics address; `/healthz`, `/livez` and
//! `/readyz` on the health address and on the probe address (the kubelet's, see
//! [`Addresses::probes`]).
//!
//! `/healthz` and `/livez` answer as kube-proxy's do. The agent is healthy unless its loop has
//! stalled or a change has waited longer than twice `--sync-period` to be programmed
//! (kube-proxy's health timeout). `/livez` says only that; `/healthz` also answers 503 while
//! the node is ineligible for load-balancer traffic (its Node is being deleted or tainted
//! `ToBeDeletedByClusterAutoscaler`), so that cloud load balancers checking it drain the node
//! first. The body is kube-proxy's: `lastUpdated` (the current time while healthy),
//! `currentTime`, and on `/healthz` `nodeEligible`.

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
    /// When the oldest change not yet programmed arrived.
    pending_since: Mutex<Option<Instant>>,
    /// How long a change may wait (kube-proxy: twice its sync period).
    timeout: Duration,
    /// The Node is not being deleted (kube-proxy's `nodeEligible`).
    node_eligible: AtomicBool,
}

impl Health {
    /// `sync_period`: the agent's `--sync-period`; a change waiting twice as long makes it
    /// unhealthy.
    pub fn new(sync_period: Duration) -> Self {
        Self {
            ready: AtomicBool::new(false),
            last_update: Mutex::new(None),
            heartbeat: Mutex::new(Instant::now()),
            pending_since: Mutex::new(None),
            timeout: sync_period * 2,
            // Eligible until the Node says otherwise, as kube-proxy assumes while starting.
            node_eligible: AtomicBool::new(true),
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
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

    /// What the reconciler has not programmed yet, and the Node's eligibility (called after
    /// every turn of the loop).
    pub fn observe(&self, pending_since: Option<Instant>, node_eligible: bool) {
        if let Ok(mut p) = self.pending_since.lock() {
            *p = pending_since;
        }
        self.node_eligible.store(node_eligible, Ordering::Relaxed);
    }

    /// The proxy's own health, whatever the Node (kube-proxy's `IsHealthy`, also what
    /// healthCheckNodePorts report as `serviceProxyHealthy`).
    pub fn healthy(&self) -> bool {
        let turning = self.heartbeat.lock().is_ok_and(|h| h.elapsed() < STALL);
        // Until the first sync, however long the initial lists take, a pending change is not
        // late (kube-proxy counts only proxiers that have synced once).
        let synced = self.last_update.lock().is_ok_and(|t| t.is_some());
        let late = self
            .pending_since
            .lock()
            .is_ok_and(|p| p.is_some_and(|since| since.elapsed() >= self.timeout));
        turning && !(synced && late)
    }

    pub fn node_eligible(&self) -> bool {
        self.node_eligible.load(Ordering::Relaxed)
    }
}

/// A time as kube-proxy prints one (Go's `time.Time.String()` in UTC, without the monotonic
/// clock reading): `2026-12-06 13:05:09.123456789 +0000 UTC`.
fn go_time(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string())
        .unwrap_or_default()
}

/// kube-proxy's `/healthz` (`with_node`) and `/livez` answer.
fn health_answer(health: &Health, with_node: bool) -> impl IntoResponse + use<> {
    let now = SystemTime::now();
    let healthy = health.healthy();
    let eligible = health.node_eligible();
    let last = if healthy {
        Some(now)
    } else {
        health.last_update.lock().ok().and_then(|t| *t)
    };
    let mut body = format!(
        r#"{{"lastUpdated": "{}","currentTime": "{}""#,
        last.map(go_time).unwrap_or_default(),
        go_time(now)
    );
    if with_node {
        body.push_str(&format!(r#", "nodeEligible": {eligible}"#));
    }
    body.push('}');
    let status = if healthy && (eligible || !with_node) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            ("content-type", "application/json"),
            ("x-content-type-options", "nosniff"),
        ],
        body,
    )
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health_answer(&health, true)
}

async fn livez(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health_answer(&health, false)
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
        .route("/livez", get(livez))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_waiting_twice_the_sync_period_makes_the_agent_unhealthy() {
        let health = Health::new(Duration::from_millis(100));
        assert!(health.healthy());
        health.observe(Instant::now().checked_sub(Duration::from_secs(1)), true);
        assert!(health.healthy(), "before the first sync nothing is late");
        health.synced();
        health.observe(Some(Instant::now()), true);
        assert!(health.healthy(), "a fresh change is not late");
        health.observe(Instant::now().checked_sub(Duration::from_millis(250)), true);
        assert!(!health.healthy(), "a change waiting 250 ms > 2 x 100 ms");
        health.observe(None, false);
        assert!(health.healthy(), "ineligibility is not ill health");
        assert!(!health.node_eligible());
    }

    #[test]
    fn times_print_as_go_prints_them() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_765_000_000, 120_000_000);
        assert_eq!(go_time(t), "2025-12-06 05:46:40.12 +0000 UTC");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_765_000_000);
        assert_eq!(go_time(t), "2025-12-06 05:46:40 +0000 UTC");
    }
}
