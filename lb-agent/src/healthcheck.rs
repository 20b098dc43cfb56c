//! Service health checks (healthCheckNodePort): for every Service with
//! externalTrafficPolicy Local, an HTTP server on its healthCheckNodePort that tells external
//! load balancers whether this node has local endpoints, answering exactly as kube-proxy does:
//! 200 with the local endpoint count when there is at least one, 503 otherwise.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::http::Health;
use lb_datapath::model::HealthCheck;

/// What one server answers about its service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answer {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

struct Server {
    answer: Arc<RwLock<Answer>>,
    task: JoinHandle<()>,
}

/// The running health-check servers, by port.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<u16, Server>,
}

impl HealthChecks {
    /// Makes the servers match `wanted` (port -> ("namespace/name", check)): starts new ones,
    /// updates counts, stops the ones no service needs any more. A port that cannot be bound is
    /// logged and retried on the next call.
    pub async fn update(
        &mut self,
        wanted: &BTreeMap<u16, (String, HealthCheck)>,
        health: &Arc<Health>,
    ) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
                info!(port, "health check server stopped");
            }
            keep
        });
        for (port, (service, check)) in wanted {
            let (namespace, name) = service.split_once('/').unwrap_or(("", service));
            let answer = Answer {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                local_endpoints: check.local_ready_endpoints,
            };
            if let Some(server) = self.servers.get(port) {
                if let Ok(mut current) = server.answer.write() {
                    *current = answer;
                }
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(%service, port, error = %e, "cannot serve the healthCheckNodePort; retrying on the next sync");
                    continue;
                }
            };
            let answer = Arc::new(RwLock::new(answer));
            let app = Router::new()
                .fallback(get(respond))
                .with_state((answer.clone(), health.clone()));
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            info!(%service, port, "health check server started");
            self.servers.insert(*port, Server { answer, task });
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

/// kube-proxy's answer: the status says whether to send traffic here, the body and the
/// `X-Load-Balancing-Endpoint-Weight` header how many local endpoints there are.
async fn respond(
    State((answer, health)): State<(Arc<RwLock<Answer>>, Arc<Health>)>,
) -> impl IntoResponse {
    let answer = answer
        .read()
        .map(|a| a.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    let status = if answer.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = format!(
        r#"{{"service":{{"namespace":"{}","name":"{}"}},"localEndpoints":{},"serviceProxyHealthy":{}}}"#,
        answer.namespace,
        answer.name,
        answer.local_endpoints,
        health.healthy()
    );
    (
        status,
        [
            ("content-type", "application/json".to_owned()),
            ("x-content-type-options", "nosniff".to_owned()),
            (
                "x-load-balancing-endpoint-weight",
                answer.local_endpoints.to_string(),
            ),
        ],
        body,
    )
}
