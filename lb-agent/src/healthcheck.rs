//! Service health checks (healthCheckNodePort): for every Service with
//! externalTrafficPolicy Local, an HTTP server on its healthCheckNodePort that tells external
//! load balancers whether this node has local endpoints, answering exactly as kube-proxy does:
//! 200 when there is at least one local ready endpoint (counted by address) and the agent
//! itself is healthy, 503 otherwise, with kube-proxy's JSON body. The servers listen where
//! kube-proxy's do: on every address, or on the `--nodeport-addresses` ones when those select
//! only some.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
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
    /// One listener per address.
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The running health-check servers, by port.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<u16, Server>,
    /// The addresses the servers listen on.
    addrs: Vec<IpAddr>,
}

impl HealthChecks {
    /// Makes the servers match `wanted` (port -> ("namespace/name", check)): starts new ones,
    /// updates counts, stops the ones no service needs any more. A port that cannot be bound is
    /// logged and retried on the next call.
    pub async fn update(
        &mut self,
        wanted: &BTreeMap<u16, (String, HealthCheck)>,
        addrs: &[IpAddr],
        health: &Arc<Health>,
    ) {
        let moved = self.addrs != addrs;
        if moved {
            self.addrs = addrs.to_vec();
        }
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port) && !moved;
            if !keep {
                server.stop();
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
            let mut listeners = Vec::new();
            for ip in &self.addrs {
                let addr = SocketAddr::from((*ip, *port));
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => listeners.push(l),
                    Err(e) => {
                        warn!(%service, %addr, error = %e, "cannot serve the healthCheckNodePort; retrying on the next sync");
                        listeners.clear();
                        break;
                    }
                }
            }
            if listeners.is_empty() {
                continue;
            }
            let answer = Arc::new(RwLock::new(answer));
            let app = Router::new()
                .fallback(get(respond))
                .with_state((answer.clone(), health.clone()));
            let tasks = listeners
                .into_iter()
                .map(|listener| {
                    let app = app.clone();
                    tokio::spawn(async move {
                        let _ = axum::serve(listener, app).await;
                    })
                })
                .collect();
            info!(%service, port, addrs = ?self.addrs, "health check server started");
            self.servers.insert(*port, Server { answer, tasks });
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.stop();
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
    let healthy = health.healthy();
    let status = if answer.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = body(&answer, healthy);
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

/// kube-proxy's body, byte for byte (tab-indented JSON, no trailing newline).
fn body(answer: &Answer, healthy: bool) -> String {
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        quoted(&answer.namespace),
        quoted(&answer.name),
        answer.local_endpoints,
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use axum::response::IntoResponse as _;

    use super::*;

    #[tokio::test]
    async fn an_unhealthy_agent_answers_503_even_with_local_endpoints() {
        let answer = Arc::new(RwLock::new(Answer {
            namespace: "ns1".into(),
            name: "web".into(),
            local_endpoints: 1,
        }));
        let health = Arc::new(Health::new(Duration::from_millis(100)));
        health.synced();
        let status = |r: axum::response::Response| r.status();
        let ok = respond(State((answer.clone(), health.clone()))).await;
        assert_eq!(status(ok.into_response()), StatusCode::OK);
        health.observe(Instant::now().checked_sub(Duration::from_secs(1)), true);
        let late = respond(State((answer.clone(), health.clone()))).await;
        assert_eq!(
            status(late.into_response()),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn the_body_is_kube_proxys() {
        let answer = Answer {
            namespace: "ns1".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        assert_eq!(
            body(&answer, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns1\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let body = body(&answer, false);
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["service"]["name"], "web");
        assert_eq!(parsed["localEndpoints"], 2);
        assert_eq!(parsed["serviceProxyHealthy"], false);
    }
}
