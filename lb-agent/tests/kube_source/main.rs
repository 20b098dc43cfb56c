//! The Kubernetes API source against a stand-in API server.
//!
//! No real API server can run here, so each test starts a stand-in API server: real HTTP on
//! 127.0.0.1 serving real Kubernetes JSON for LIST and WATCH of Services, EndpointSlices and Nodes.
//! It keeps a store per collection and a global resourceVersion, answers LIST with a `*List`
//! object, and streams WATCH responses as newline-delimited watch events that the test feeds
//! through a channel. It records every request so that tests can check what the source asked for.
//! It does not need root.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use lb_agent::source::{
    self, Kind, Object, ObjectKey, PROXY_LABEL_SELECTOR, SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL, Update,
};
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing_subscriber::EnvFilter;

mod apiserver;

use apiserver::StandIn;

/// How long to wait for one update; a relist after 410 Gone waits out the watcher's backoff
/// (0.8 to 1.6 s) first.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole test may take, so that a failure never hangs the suite.
const TEST_DEADLINE: Duration = Duration::from_secs(9);
/// How long to listen for an update that must not come.
const QUIET: Duration = Duration::from_millis(300);
const NAMESPACE: &str = "default";
const NODE: &str = "node-a";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn initial_sync_lists_every_kind() {
    within_deadline(async {
        let (_server, _source, updates) = Source::listed([
            web(),
            (Kind::Service, service("api", "10.96.0.11", 443)),
            // Served only to a client that does not ask for kube-proxy's selector.
            (
                Kind::Service,
                labelled(
                    service("elsewhere", "10.96.0.12", 80),
                    SERVICE_PROXY_NAME_LABEL,
                    "other",
                ),
            ),
            web_slice(),
            this_node(),
        ])
        .await;

        assert_eq!(
            describe(&updates[&Kind::Service]),
            [
                "Listing Service",
                "Applied Service default/api",
                "Applied Service default/web",
                "Listed Service",
            ]
        );
        assert_eq!(
            describe(&updates[&Kind::EndpointSlice]),
            [
                "Listing EndpointSlice",
                "Applied EndpointSlice default/web-abcde",
                "Listed EndpointSlice",
            ]
        );
        assert_eq!(
            describe(&updates[&Kind::Node]),
            ["Listing Node", "Applied Node node-a", "Listed Node"]
        );

        let web = applied_service(&updates[&Kind::Service][2]);
        let spec = web.spec.as_ref().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.ports.as_ref().expect("ports")[0].port, 80);
        assert_slimmed(&web.metadata);
        let Update::Applied(Object::EndpointSlice(slice)) = &updates[&Kind::EndpointSlice][1]
        else {
            panic!(
                "not an EndpointSlice: {:?}",
                updates[&Kind::EndpointSlice][1]
            );
        };
        assert_eq!(slice.endpoints[0].addresses, ["10.0.1.5"]);
        assert_eq!(
            slice.metadata.labels.as_ref().expect("labels")[SERVICE_NAME_LABEL],
            "web"
        );
    })
    .await;
}

#[tokio::test]
async fn services_and_slices_are_listed_from_the_watch_cache_and_watched_with_kube_proxys_selector_and_bookmarks()
 {
    within_deadline(async {
        let (server, _source, _) = Source::listed([web(), this_node()]).await;

        for kind in [Kind::Service, Kind::EndpointSlice] {
            let watch = server.wait_for_watches(kind, 1).await.remove(0);
            let lists = server.lists(kind);
            assert_eq!(lists.len(), 1, "{kind:?}: {lists:?}");
            let list = &lists[0];
            assert_eq!(
                list.param("labelSelector"),
                Some(PROXY_LABEL_SELECTOR),
                "{kind:?}"
            );
            assert_eq!(list.param("fieldSelector"), None, "{kind:?}");
            // From the watch cache, as kube-proxy's informers list (issue 13 item 11).
            assert_eq!(list.param("resourceVersion"), Some("0"), "{kind:?}");

            assert_eq!(
                watch.param("labelSelector"),
                Some(PROXY_LABEL_SELECTOR),
                "{kind:?}"
            );
            assert_eq!(watch.param("fieldSelector"), None, "{kind:?}");
            assert_eq!(watch.param("allowWatchBookmarks"), Some("true"), "{kind:?}");
            // The watch picks up exactly where the list left off.
            assert_eq!(
                watch.param("resourceVersion"),
                Some(&*list.revision.to_string()),
                "{kind:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn watch_events_become_updates() {
    within_deadline(async {
        let (server, mut source, _) = Source::listed([web(), web_slice(), this_node()]).await;

        assert_eq!(
            server.apply(Kind::Service, service("api", "10.96.0.11", 443)),
            "ADDED"
        );
        let update = source.next().await;
        let api = applied_service(&update);
        assert_eq!(api.metadata.name.as_deref(), Some("api"));
        assert_eq!(
            api.spec.as_ref().expect("spec").cluster_ip.as_deref(),
            Some("10.96.0.11")
        );
        assert_slimmed(&api.metadata);

        let grown = endpoint_slice("web", "web-abcde", &["10.0.1.5", "10.0.2.7"]);
        assert_eq!(server.apply(Kind::EndpointSlice, grown), "MODIFIED");
        match source.next().await {
            Update::Applied(Object::EndpointSlice(slice)) => {
                assert_eq!(slice.metadata.name.as_deref(), Some("web-abcde"));
                let addresses: Vec<_> = slice
                    .endpoints
                    .iter()
                    .flat_map(|e| e.addresses.clone())
                    .collect();
                assert_eq!(addresses, ["10.0.1.5", "10.0.2.7"]);
            }
            other => panic!("expected the modified EndpointSlice, got {other:?}"),
        }

        server.delete(Kind::Service, NAMESPACE, "web");
        match source.next().await {
            Update::Deleted(key) => assert_eq!(
                key,
                ObjectKey {
                    kind: Kind::Service,
                    namespace: NAMESPACE.into(),
                    name: "web".into(),
                }
            ),
            other => panic!("expected the deletion of web, got {other:?}"),
        }
        source.assert_quiet().await;
    })
    .await;
}

#[tokio::test]
async fn bookmark_produces_no_update_and_a_resumed_watch_starts_from_it() {
    within_deadline(async {
        let (server, mut source, _) = Source::listed([web(), this_node()]).await;

        let bookmark = server.bookmark(Kind::Service);
        source.assert_quiet().await;

        // The watch times out, as the API server ends every watch after timeoutSeconds: the source
        // must resume from the bookmark, without listing again.
        server.end_watch(Kind::Service);
        let watches = server.wait_for_watches(Kind::Service, 2).await;
        assert_eq!(
            watches[1].param("resourceVersion"),
            Some(&*bookmark.to_string())
        );
        assert_eq!(server.lists(Kind::Service).len(), 1);

        server.apply(Kind::Service, service("api", "10.96.0.11", 443));
        source.assert_next("Applied Service default/api").await;
    })
    .await;
}

#[tokio::test]
async fn gone_on_a_watch_relists() {
    within_deadline(async {
        let (server, mut source, _) = Source::listed([
            web(),
            (Kind::Service, service("api", "10.96.0.11", 443)),
            web_slice(),
            this_node(),
        ])
        .await;
        server.wait_for_watches(Kind::Service, 1).await;

        // Changes whose events the source never sees: its resourceVersion has left the API server's
        // watch window, so the server answers the watch with 410 Gone.
        server.remove_silently(Kind::Service, NAMESPACE, "api");
        server.put_silently(Kind::Service, service("db", "10.96.0.13", 5432));
        server.put_silently(Kind::Service, service("web", "10.96.0.10", 8080));
        server.expire_watch(Kind::Service);

        let relisted = source.until_listed(&[Kind::Service]).await;
        assert_eq!(
            relisted.keys().collect::<Vec<_>>(),
            [&Kind::Service],
            "only Services relist"
        );
        let relisted = &relisted[&Kind::Service];
        assert_eq!(
            describe(relisted),
            [
                "Listing Service",
                "Applied Service default/db",
                "Applied Service default/web",
                "Listed Service",
            ]
        );
        let web = applied_service(&relisted[2]);
        assert_eq!(
            web.spec
                .as_ref()
                .expect("spec")
                .ports
                .as_ref()
                .expect("ports")[0]
                .port,
            8080
        );

        let lists = server.lists(Kind::Service);
        assert_eq!(lists.len(), 2, "{lists:?}");
        assert_eq!(lists[1].param("labelSelector"), Some(PROXY_LABEL_SELECTOR));
        assert_eq!(server.lists(Kind::EndpointSlice).len(), 1);
        assert_eq!(server.lists(Kind::Node).len(), 1);

        // Watching resumes from the new list.
        let watches = server.wait_for_watches(Kind::Service, 2).await;
        assert_eq!(
            watches[1].param("resourceVersion"),
            Some(&*lists[1].revision.to_string())
        );
        server.apply(Kind::Service, service("cache", "10.96.0.14", 6379));
        source.assert_next("Applied Service default/cache").await;
    })
    .await;
}

#[tokio::test]
async fn node_watch_is_restricted_to_this_node() {
    within_deadline(async {
        let (server, mut source, updates) =
            Source::listed([this_node(), (Kind::Node, node("node-b", "192.168.0.11"))]).await;
        assert_eq!(
            describe(&updates[&Kind::Node]),
            ["Listing Node", "Applied Node node-a", "Listed Node"]
        );

        let expected = format!("metadata.name={NODE}");
        let watch = server.wait_for_watches(Kind::Node, 1).await.remove(0);
        let lists = server.lists(Kind::Node);
        assert_eq!(lists.len(), 1);
        for request in [&lists[0], &watch] {
            assert_eq!(
                request.param("fieldSelector"),
                Some(&*expected),
                "{request:?}"
            );
            assert_eq!(request.param("labelSelector"), None, "{request:?}");
        }
        assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));

        server.apply(Kind::Node, node(NODE, "192.168.0.20"));
        match source.next().await {
            Update::Applied(Object::Node(node)) => {
                let addresses = node
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .expect("addresses");
                assert_eq!(addresses[0].address, "192.168.0.20");
            }
            other => panic!("expected node-a, got {other:?}"),
        }
    })
    .await;
}

/// kube-runtime's watcher decodes a whole LIST or WATCH response with one decoder (as
/// kube-proxy's informers do), so one object that did not decode stopped its whole kind. Each
/// object now decodes on its own: the bad one is reported by name with the reason and gets a
/// Kubernetes Event (reason `InvalidObject`), and every other object flows, in the LIST and in
/// the WATCH.
#[tokio::test]
async fn an_undecodable_object_is_reported_by_name_and_the_others_flow() {
    within_deadline(async {
        let broken = |name: &str| {
            let mut object = service(name, "10.96.0.13", 80);
            object["spec"]["ports"] = json!("not a list");
            object
        };
        let (server, mut source, updates) = Source::listed([
            web(),
            (Kind::Service, broken("bad")),
            (Kind::Service, service("api", "10.96.0.11", 443)),
            web_slice(),
            this_node(),
        ])
        .await;
        let services = describe(&updates[&Kind::Service]);
        for good in ["Applied Service default/web", "Applied Service default/api"] {
            assert!(services.iter().any(|u| u == good), "{services:?}");
        }
        let invalid = |u: &String, name: &str| {
            u.starts_with(&format!("Invalid Service default/{name}: "))
                && u.contains("invalid type")
        };
        assert!(services.iter().any(|u| invalid(u, "bad")), "{services:?}");
        assert!(
            services.last().is_some_and(|u| u == "Listed Service"),
            "{services:?}"
        );

        // In the WATCH too: a bad object, then a good one.
        server.apply(Kind::Service, broken("worse"));
        let update = describe(&[source.next().await]);
        assert!(invalid(&update[0], "worse"), "{update:?}");
        server.apply(Kind::Service, service("later", "10.96.0.14", 80));
        source.assert_next("Applied Service default/later").await;

        // Each bad object's owner is told, on the object.
        let events = server.state().events.clone();
        let told: BTreeSet<(String, String, String)> = events
            .iter()
            .map(|e| {
                let field = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (
                    field(&e["regarding"]["name"]),
                    field(&e["reason"]),
                    field(&e["type"]),
                )
            })
            .collect();
        let expected =
            ["bad", "worse"].map(|name| (name.into(), "InvalidObject".into(), "Warning".into()));
        assert_eq!(told, BTreeSet::from(expected), "{events:#?}");
        assert!(
            events.iter().all(|e| e["regarding"]["kind"] == "Service"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("invalid type"))),
            "{events:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn run_returns_once_the_receiver_is_dropped() {
    within_deadline(async {
        let (server, source, _) = Source::listed([this_node()]).await;
        server.wait_for_watches(Kind::Node, 1).await;

        // Every watch is idle: nothing to send, so only the closed channel can stop the source.
        let Source { updates, task } = source;
        drop(updates);
        let result = tokio::time::timeout(UPDATE_TIMEOUT, task)
            .await
            .expect("run did not return after the receiver was dropped")
            .expect("run panicked");
        result.expect("run failed");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The source under test

struct Source {
    updates: mpsc::Receiver<Update>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Source {
    fn start(server: &StandIn) -> Self {
        // The source's own logs (watch errors), shown when a test fails; RUST_LOG filters them.
        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("lb=debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let (tx, updates) = mpsc::channel(64);
        let task = tokio::spawn(source::kube::run(server.client(), NODE.into(), tx));
        Self { updates, task }
    }

    /// A stand-in API server holding `objects`, and a source on it that has listed every kind
    /// (the updates of that listing).
    async fn listed(
        objects: impl IntoIterator<Item = (Kind, Value)>,
    ) -> (StandIn, Self, BTreeMap<Kind, Vec<Update>>) {
        let server = StandIn::start().await;
        for (kind, object) in objects {
            server.put_silently(kind, object);
        }
        let mut source = Self::start(&server);
        let updates = source.until_listed(&Kind::ALL).await;
        (server, source, updates)
    }

    async fn next(&mut self) -> Update {
        tokio::time::timeout(UPDATE_TIMEOUT, self.updates.recv())
            .await
            .unwrap_or_else(|_| panic!("no update within {UPDATE_TIMEOUT:?}"))
            .expect("the source stopped")
    }

    /// The updates up to `Listed` of each of `kinds`, by kind (kinds interleave on the channel).
    async fn until_listed(&mut self, kinds: &[Kind]) -> BTreeMap<Kind, Vec<Update>> {
        let mut by_kind: BTreeMap<Kind, Vec<Update>> = BTreeMap::new();
        let mut pending = kinds.to_vec();
        while !pending.is_empty() {
            let update = self.next().await;
            if let Update::Listed(kind) = update {
                pending.retain(|k| *k != kind);
            }
            by_kind.entry(kind_of(&update)).or_default().push(update);
        }
        by_kind
    }

    /// The next update, as [`describe`] puts it, must be `expected`.
    async fn assert_next(&mut self, expected: &str) {
        assert_eq!(describe(&[self.next().await]), [expected]);
    }

    async fn assert_quiet(&mut self) {
        if let Ok(update) = tokio::time::timeout(QUIET, self.updates.recv()).await {
            panic!("unexpected update: {update:?}");
        }
    }
}

async fn within_deadline(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_DEADLINE, test)
        .await
        .unwrap_or_else(|_| panic!("the test took longer than {TEST_DEADLINE:?}"));
}

fn kind_of(update: &Update) -> Kind {
    match update {
        Update::Listing(kind) | Update::Listed(kind) => *kind,
        Update::Applied(object) => object.key().kind,
        Update::Deleted(key) => key.kind,
        Update::Invalid { key: Some(key), .. } => key.kind,
        Update::Invalid { origin, reason, .. } => panic!("invalid object from {origin}: {reason}"),
    }
}

fn describe(updates: &[Update]) -> Vec<String> {
    updates
        .iter()
        .map(|update| match update {
            Update::Listing(kind) => format!("Listing {}", kind.name()),
            Update::Listed(kind) => format!("Listed {}", kind.name()),
            Update::Applied(object) => format!("Applied {}", object.key()),
            Update::Deleted(key) => format!("Deleted {key}"),
            Update::Invalid { origin, reason, .. } => format!("Invalid {origin}: {reason}"),
        })
        .collect()
}

fn applied_service(update: &Update) -> &Service {
    match update {
        Update::Applied(Object::Service(service)) => service,
        other => panic!("not an applied Service: {other:?}"),
    }
}

/// managedFields and the last-applied annotation are dropped, the rest of the metadata is kept.
fn assert_slimmed(meta: &ObjectMeta) {
    assert_eq!(meta.managed_fields, None);
    let annotations = meta.annotations.as_ref().expect("annotations");
    assert!(!annotations.contains_key(LAST_APPLIED), "{annotations:?}");
    assert_eq!(
        annotations.get("example.com/owner").map(String::as_str),
        Some("edge")
    );
    assert!(meta.resource_version.is_some());
}

// ---------------------------------------------------------------------------------------------
// Kubernetes objects, as the API server stores them

/// Service `web` (10.96.0.10:80), the Service most tests start from.
fn web() -> (Kind, Value) {
    (Kind::Service, service("web", "10.96.0.10", 80))
}

/// The EndpointSlice of `web`: one endpoint.
fn web_slice() -> (Kind, Value) {
    (
        Kind::EndpointSlice,
        endpoint_slice("web", "web-abcde", &["10.0.1.5"]),
    )
}

/// The Node this source runs on.
fn this_node() -> (Kind, Value) {
    (Kind::Node, node(NODE, "192.168.0.10"))
}

fn service(name: &str, cluster_ip: &str, port: i32) -> Value {
    let service = Service {
        metadata: ObjectMeta {
            namespace: Some(NAMESPACE.into()),
            name: Some(name.into()),
            annotations: Some(BTreeMap::from([
                (
                    LAST_APPLIED.into(),
                    format!(
                        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}"}}}}"#
                    ),
                ),
                ("example.com/owner".into(), "edge".into()),
            ])),
            managed_fields: Some(vec![ManagedFieldsEntry {
                api_version: Some("v1".into()),
                fields_type: Some("FieldsV1".into()),
                fields_v1: Some(FieldsV1(
                    json!({"f:spec": {"f:ports": {}, "f:selector": {}}}),
                )),
                manager: Some("kubectl-client-side-apply".into()),
                operation: Some("Update".into()),
                ..ManagedFieldsEntry::default()
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            ip_families: Some(vec!["IPv4".into()]),
            ports: Some(vec![ServicePort {
                name: Some("main".into()),
                port,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(8080)),
                ..ServicePort::default()
            }]),
            selector: Some(BTreeMap::from([("app".into(), name.into())])),
            session_affinity: Some("None".into()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    serde_json::to_value(service).expect("Service serializes")
}

fn endpoint_slice(service: &str, name: &str, addresses: &[&str]) -> Value {
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some(NAMESPACE.into()),
            name: Some(name.into()),
            generate_name: Some(format!("{service}-")),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.into(), service.into()),
                (
                    "endpointslice.kubernetes.io/managed-by".into(),
                    "endpointslice-controller.k8s.io".into(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: addresses
            .iter()
            .map(|address| Endpoint {
                addresses: vec![(*address).into()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(NODE.into()),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("main".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    };
    serde_json::to_value(slice).expect("EndpointSlice serializes")
}

fn node(name: &str, internal_ip: &str) -> Value {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/hostname".into(),
                name.into(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some("10.0.1.0/24".into()),
            pod_cidrs: Some(vec!["10.0.1.0/24".into()]),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    address: internal_ip.into(),
                    type_: "InternalIP".into(),
                },
                NodeAddress {
                    address: name.into(),
                    type_: "Hostname".into(),
                },
            ]),
            ..NodeStatus::default()
        }),
    };
    serde_json::to_value(node).expect("Node serializes")
}

fn labelled(mut object: Value, key: &str, value: &str) -> Value {
    object["metadata"]["labels"][key] = json!(value);
    object
}

/// Beyond kube-proxy (issue 13): a Service the agent refuses or only partly serves gets a
/// Kubernetes Event saying why, on the Service, so that `kubectl describe service` shows it:
/// `InvalidObject` for an invalid value or a frontend another Service holds, `PartlyServed` for
/// a part this datapath skips (an SCTP NodePort that differs from its port, an IPv6 address).
#[tokio::test]
async fn refused_and_partly_served_services_are_told_with_events() {
    within_deadline(async {
        let server = StandIn::start().await;
        let notifier = source::notify::Notifier::new(server.client(), "node-a");
        let sctp = source::objects::ServiceObject {
            namespace: "default".into(),
            name: "sctp".into(),
            has_spec: true,
            cluster_ip: Some("10.96.0.20".into()),
            ports: vec![source::objects::PortObject {
                name: None,
                port: 9000,
                protocol: Some("SCTP".into()),
                node_port: Some(30_900),
            }],
            ..Default::default()
        };
        let bad = source::objects::ServiceObject {
            name: "bad".into(),
            ports: vec![source::objects::PortObject {
                name: None,
                port: 70_000,
                protocol: None,
                node_port: None,
            }],
            ..sctp.clone()
        };
        let node = lb_agent::translate::NodeContext::unknown("node-a");
        for svc in [&sctp, &bad] {
            let (_, problems) = lb_agent::translate::service(svc, &[], &node);
            assert_eq!(problems.len(), 1, "{problems:?}");
            notifier.problem(&problems[0]).await;
        }
        let events = server.state().events.clone();
        let told: Vec<(String, String, String, String)> = events
            .iter()
            .map(|e| {
                let field = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (
                    field(&e["regarding"]["name"]),
                    field(&e["reason"]),
                    field(&e["action"]),
                    field(&e["note"]),
                )
            })
            .collect();
        assert_eq!(told.len(), 2, "{events:#?}");
        assert_eq!(
            (&*told[0].0, &*told[0].1, &*told[0].2),
            ("sctp", "PartlyServed", "Translate")
        );
        assert!(told[0].3.contains("SCTP"), "{told:?}");
        assert_eq!((&*told[1].0, &*told[1].1), ("bad", "InvalidObject"));
        assert!(told[1].3.contains("70000"), "{told:?}");
        assert!(
            events
                .iter()
                .all(|e| e["regarding"]["kind"] == "Service" && e["type"] == "Warning"),
            "{events:#?}"
        );
    })
    .await;
}
