//! The translation of Kubernetes objects into the desired datapath state, driven by YAML
//! fixtures (`tests/fixtures`), one per group of rules, each case named after the acceptance
//! catalogue's case numbers.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_agent::{
    node::{ForwardingMode, NodePortAddresses},
    source::{
        Object, files,
        objects::{ServiceObject, SliceObject},
    },
    translate::{self, NodeContext, Problem, Translated},
};
use lb_common::{maps::scope, net::proto};
use lb_datapath::model::{
    AnyFrontendKey, Desired, DesiredFrontend, FrontendKind, HealthCheck, ServiceModel, SetKind,
};

struct Result {
    desired: Desired,
    models: BTreeMap<String, ServiceModel>,
    problems: Vec<Problem>,
}

fn translate_with(
    fixtures: &[&str],
    nodeport: &NodePortAddresses,
    local_addrs: &[Ipv4Addr],
) -> Result {
    translate_on(fixtures, nodeport, local_addrs, ForwardingMode::Snat)
}

fn translate_on(
    fixtures: &[&str],
    nodeport: &NodePortAddresses,
    local_addrs: &[Ipv4Addr],
    forwarding: ForwardingMode,
) -> Result {
    let mut services: Vec<Service> = Vec::new();
    let mut slices: Vec<EndpointSlice> = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    for name in fixtures.iter().chain(["node.yaml"].iter()) {
        let text = std::fs::read_to_string(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let (objects, errors) = files::parse(&text);
        assert!(errors.is_empty(), "{name}: {errors:?}");
        for object in objects {
            match object {
                Object::Service(s) => services.push(*s),
                Object::EndpointSlice(s) => slices.push(*s),
                Object::Node(n) => nodes.push(*n),
            }
        }
    }
    let mut node = NodeContext::from_node(
        "n1",
        nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some("n1")),
        nodeport,
        local_addrs,
    );
    node.forwarding = forwarding;
    let slices: Vec<SliceObject> = slices.iter().map(SliceObject::from).collect();
    let mut models = BTreeMap::new();
    let mut keys = BTreeMap::new();
    let mut problems = Vec::new();
    for svc in &services {
        let (ns, name) = (
            svc.metadata.namespace.clone().unwrap(),
            svc.metadata.name.clone().unwrap(),
        );
        let own: Vec<&SliceObject> = slices
            .iter()
            .filter(|s| translate::slice_of(s, &ns, &name))
            .collect();
        let (model, found) = translate::service(&ServiceObject::from(svc), &own, &node);
        problems.extend(found);
        if let Some(model) = model {
            let key = lb_agent::source::ObjectKey {
                kind: lb_agent::source::Kind::Service,
                namespace: ns.clone(),
                name: name.clone(),
            };
            keys.insert(
                format!("{ns}/{name}"),
                (
                    key,
                    svc.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.to_string()),
                ),
            );
            models.insert(format!("{ns}/{name}"), model);
        }
    }
    let (desired, conflicts) = translate::assemble(models.iter().map(|(k, m)| Translated {
        object: &keys[k].0,
        created: keys[k].1.clone(),
        model: m,
    }));
    problems.extend(conflicts);
    Result {
        desired,
        models,
        problems,
    }
}

fn translate_fixture(fixtures: &[&str]) -> Result {
    translate_with(fixtures, &NodePortAddresses::NodeAddresses, &[])
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

impl Result {
    fn frontend(&self, addr: &str, port: u16, l4_proto: u8, scope: u8) -> &DesiredFrontend {
        let key = AnyFrontendKey::new(addr.parse().unwrap(), port, l4_proto, scope);
        self.desired.frontends.get(&key).unwrap_or_else(|| {
            panic!(
                "no frontend {key}; have {:?}",
                self.desired
                    .frontends
                    .keys()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            )
        })
    }

    fn has_frontend(&self, addr: &str, port: u16, l4_proto: u8, scope: u8) -> bool {
        self.desired.frontends.contains_key(&AnyFrontendKey::new(
            addr.parse().unwrap(),
            port,
            l4_proto,
            scope,
        ))
    }

    /// The frontend's backends as "addr:port" with their weight.
    fn backends(&self, f: &DesiredFrontend) -> Vec<(String, u32)> {
        let mut b: Vec<(String, u32)> = self.desired.sets[&f.set]
            .iter()
            .map(|b| (b.addr.to_string(), b.weight))
            .collect();
        b.sort();
        b
    }

    /// Only the backends that take new flows.
    fn selectable(&self, f: &DesiredFrontend) -> Vec<String> {
        self.backends(f)
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(a, _)| a)
            .collect()
    }

    fn problem(&self, name: &str) -> &Problem {
        self.problems
            .iter()
            .find(|p| p.object.name == name)
            .unwrap_or_else(|| panic!("no problem reported for {name}: {:?}", self.problems))
    }
}

const TCP: u8 = proto::TCP;
const UDP: u8 = proto::UDP;
const SCTP: u8 = proto::SCTP;
const IN: u8 = scope::INTERNAL;
const EXT: u8 = scope::EXTERNAL;

#[test]
fn case_4_cluster_ip_dnat_targets_come_from_the_slices() {
    let r = translate_fixture(&["clusterip.yaml"]);
    let http = r.frontend("172.30.0.41", 80, TCP, IN);
    assert_eq!(http.kind, FrontendKind::ClusterIp);
    // Two slices merged; 10.180.2.1 listed twice, kept once.
    assert_eq!(
        r.selectable(http),
        ["10.180.0.1:8080", "10.180.2.1:8080", "10.180.3.1:8080"]
    );
    // The https port exists only in slice web-a.
    let https = r.frontend("172.30.0.41", 443, TCP, IN);
    assert_eq!(r.selectable(https), ["10.180.0.1:8443", "10.180.2.1:8443"]);
    assert!(
        !r.has_frontend("172.30.0.41", 80, TCP, EXT),
        "ClusterIPs are not served from outside"
    );
    assert!(!http.drop_when_empty);
    assert_eq!(http.affinity_timeout_s, 0);
    // Locality comes from the endpoint's nodeName.
    assert!(
        r.desired.sets[&http.set]
            .iter()
            .any(|b| b.local && b.addr.to_string() == "10.180.0.1:8080")
    );
}

#[test]
fn case_5_the_same_port_for_tcp_udp_and_sctp_goes_to_each_protocols_target() {
    let r = translate_fixture(&["clusterip.yaml"]);
    assert_eq!(
        r.selectable(r.frontend("172.30.0.10", 53, TCP, IN)),
        ["10.180.0.53:5353"]
    );
    assert_eq!(
        r.selectable(r.frontend("172.30.0.10", 53, UDP, IN)),
        ["10.180.0.53:53"]
    );
    assert_eq!(
        r.selectable(r.frontend("172.30.0.10", 53, SCTP, IN)),
        ["10.180.0.53:53"]
    );
    assert!(
        r.problems.iter().all(|p| p.object.name != "dns"),
        "{:?}",
        r.problems
    );
}

/// Issue 13 item 9: SCTP is served where no port is rewritten. A frontend gets only the
/// endpoints on its own port; an SCTP NodePort is served only when it equals the port. What is
/// left out is reported once per Service (notes: the rest is served), and a Service none of
/// whose SCTP ports can be served is reported as such.
#[test]
fn sctp_is_served_only_where_no_port_is_rewritten() {
    let r = translate_fixture(&["sctp.yaml"]);
    let s1ap = r.frontend("172.30.0.60", 30412, SCTP, IN);
    assert_eq!(
        r.selectable(s1ap),
        ["10.180.0.60:30412", "10.180.2.60:30412"]
    );
    for scope in [IN, EXT] {
        let np = r.frontend("192.168.0.2", 30412, SCTP, scope);
        assert_eq!(np.kind, FrontendKind::NodePort);
    }
    assert_eq!(
        r.selectable(r.frontend("172.30.0.60", 3868, SCTP, IN)),
        ["10.180.0.60:3868", "10.180.2.60:3868"]
    );
    assert!(!r.has_frontend("192.168.0.2", 31868, SCTP, EXT));
    assert!(!r.has_frontend("192.168.0.2", 31868, SCTP, IN));

    // targetPort 12905 != port 2905: the frontend has no endpoint (it rejects, as one without
    // endpoints does) and the Service is reported as unservable.
    let rewrite = r.frontend("172.30.0.61", 2905, SCTP, IN);
    assert!(r.selectable(rewrite).is_empty());
    assert!(!rewrite.drop_when_empty);

    // One pod on the port, one elsewhere: the first serves; TCP on the same number is whole.
    assert_eq!(
        r.selectable(r.frontend("172.30.0.62", 7000, SCTP, IN)),
        ["10.180.0.62:7000"]
    );
    assert_eq!(
        r.selectable(r.frontend("172.30.0.62", 7000, TCP, IN)),
        ["10.180.0.62:8080", "10.180.2.62:8080"]
    );

    let reasons = |name: &str| -> Vec<&str> {
        r.problems
            .iter()
            .filter(|p| p.object.name == name)
            .inspect(|p| assert!(!p.error, "{p}"))
            .map(|p| p.reason.as_str())
            .collect()
    };
    let s1ap = reasons("s1ap");
    assert_eq!(s1ap.len(), 1, "{s1ap:?}");
    assert!(s1ap[0].starts_with("nodePort 31868/SCTP is not port 3868; NodePort skipped"));
    let rewrite = reasons("rewrite");
    assert_eq!(rewrite.len(), 2, "{rewrite:?}");
    assert!(rewrite[0].starts_with("port 2905/SCTP: endpoints on targetPort 12905 left out"));
    assert!(rewrite[1].starts_with("no SCTP port of this Service can be served"));
    assert!(rewrite[1].contains("without rewriting ports"));
    let mixed = reasons("mixed");
    assert_eq!(mixed.len(), 1, "{mixed:?}");
    assert!(mixed[0].starts_with("port 7000/SCTP: endpoints on targetPort 7001 left out"));
}

#[test]
fn case_11_services_kube_proxy_ignores_get_no_frontend() {
    let r = translate_fixture(&["ignored.yaml"]);
    assert!(
        r.desired.frontends.is_empty(),
        "{:?}",
        r.desired.frontends.keys().collect::<Vec<_>>()
    );
    assert!(r.models.is_empty());
    assert!(
        r.problems.is_empty(),
        "ignoring is not an error: {:?}",
        r.problems
    );
}

#[test]
fn cases_59_to_65_ready_endpoints_first_serving_terminating_only_as_a_fallback() {
    let r = translate_fixture(&["conditions.yaml"]);
    let mixed = r.frontend("172.30.0.50", 80, TCP, IN);
    // Ready ones take new flows; terminating and not-serving ones stay known for their flows.
    assert_eq!(
        r.backends(mixed),
        [
            ("10.0.1.1:80".into(), 1),
            ("10.0.1.2:80".into(), 0),
            ("10.0.1.3:80".into(), 0),
            ("10.0.2.1:80".into(), 1)
        ]
    );
    // No ready endpoint anywhere: the serving terminating ones (on any node) take new flows.
    let terminating = r.frontend("172.30.0.51", 80, TCP, IN);
    assert_eq!(r.selectable(terminating), ["10.0.1.2:80", "10.0.2.2:80"]);
    // Nothing serving: no backend, and the frontend rejects (no endpoints means REJECT).
    let nothing = r.frontend("172.30.0.52", 80, TCP, IN);
    assert!(r.selectable(nothing).is_empty());
    assert!(!nothing.drop_when_empty);
}

#[test]
fn cases_26_to_28_external_traffic_policy_local() {
    let r = translate_fixture(&["policies.yaml"]);
    // From inside, every frontend of the service uses every endpoint (kube-proxy short-circuits
    // local traffic); from outside, only this node's endpoints, client address kept.
    for (addr, port) in [
        ("172.30.0.60", 80),
        ("192.168.99.11", 80),
        ("1.2.3.4", 80),
        ("192.168.0.2", 3001),
        ("192.168.1.2", 3001),
    ] {
        let inside = r.frontend(addr, port, TCP, IN);
        assert_eq!(
            r.selectable(inside),
            ["10.180.0.1:80", "10.180.1.1:80"],
            "{addr}:{port} from inside"
        );
        // --masquerade-all masquerades the ClusterIP's flows, as kube-proxy's masqueradeAll,
        // not those to the Service's external addresses.
        let external_address = addr != "172.30.0.60";
        assert_eq!(inside.keeps_client, external_address, "{addr}:{port}");
        if external_address {
            let outside = r.frontend(addr, port, TCP, EXT);
            assert!(outside.keeps_client, "{addr}:{port}");
            assert_eq!(outside.set.kind, SetKind::Local);
            assert_eq!(
                r.selectable(outside),
                ["10.180.0.1:80"],
                "{addr}:{port} from outside"
            );
        }
    }
    // Case 28: endpoints only elsewhere: external traffic is dropped (not rejected), the
    // ClusterIP still reaches the remote endpoint.
    let remote_only = r.frontend("192.168.0.2", 3002, TCP, EXT);
    assert!(r.selectable(remote_only).is_empty());
    assert!(remote_only.drop_when_empty);
    assert_eq!(
        r.selectable(r.frontend("172.30.0.61", 80, TCP, IN)),
        ["10.180.1.2:80"]
    );
    // Case 31: the health check counts this node's ready endpoints.
    assert_eq!(
        r.models["ns1/etp-local"].health_check,
        Some(HealthCheck {
            node_port: 30000,
            local_ready_endpoints: 1
        })
    );
}

#[test]
fn cases_35_to_38_internal_traffic_policy_local() {
    let r = translate_fixture(&["policies.yaml"]);
    // ClusterIP: only the local endpoint. NodePort: every endpoint (ITP does not touch it).
    assert_eq!(
        r.selectable(r.frontend("172.30.0.62", 80, TCP, IN)),
        ["10.180.0.3:80"]
    );
    assert_eq!(
        r.selectable(r.frontend("192.168.0.2", 3003, TCP, EXT)),
        ["10.180.0.3:80", "10.180.1.3:80"]
    );
    // No local endpoint while others exist: drop. No endpoint at all: reject.
    let none_here = r.frontend("172.30.0.63", 80, TCP, IN);
    assert!(r.selectable(none_here).is_empty() && none_here.drop_when_empty);
    let none = r.frontend("172.30.0.64", 80, TCP, IN);
    assert!(r.selectable(none).is_empty() && !none.drop_when_empty);
    // externalTrafficPolicy Cluster: --masquerade-all masquerades every flow.
    assert!(!r.frontend("192.168.0.2", 3003, TCP, EXT).keeps_client);
    assert!(!r.frontend("172.30.0.62", 80, TCP, IN).keeps_client);
}

#[test]
fn case_16_node_ports_on_the_node_addresses_within_nodeport_addresses() {
    let everywhere = translate_fixture(&["policies.yaml"]);
    for addr in ["192.168.0.2", "192.168.1.2"] {
        assert!(
            everywhere.has_frontend(addr, 3003, TCP, EXT)
                && everywhere.has_frontend(addr, 3003, TCP, IN)
        );
    }
    // CIDRs select among the node's interface addresses, as kube-proxy's do: an interface
    // address the Node object does not list serves too; loopback never does.
    let interfaces = [
        ip("127.0.0.1"),
        ip("192.168.1.2"),
        ip("192.168.0.2"),
        ip("10.99.0.7"),
    ];
    let restricted = translate_with(
        &["policies.yaml"],
        &NodePortAddresses::Cidrs(vec!["192.168.1.0/24".parse().unwrap()]),
        &interfaces,
    );
    assert!(restricted.has_frontend("192.168.1.2", 3003, TCP, EXT));
    assert!(
        !restricted.has_frontend("192.168.0.2", 3003, TCP, EXT),
        "secondary address only"
    );
    assert!(restricted.frontend("192.168.1.2", 3003, TCP, EXT).kind == FrontendKind::NodePort);
    let all = translate_with(
        &["policies.yaml"],
        &NodePortAddresses::Cidrs(vec!["0.0.0.0/0".parse().unwrap()]),
        &interfaces,
    );
    for addr in ["192.168.0.2", "192.168.1.2", "10.99.0.7"] {
        assert!(all.has_frontend(addr, 3003, TCP, EXT), "{addr}");
    }
    assert!(
        !all.has_frontend("127.0.0.1", 3003, TCP, EXT)
            && !all.has_frontend("127.0.0.1", 3003, TCP, IN),
        "no NodePort on loopback (kube-proxy's nftables mode)"
    );
    // `primary` (kube-proxy's nftables default): the first InternalIP only.
    let primary = translate_with(&["policies.yaml"], &NodePortAddresses::Primary, &interfaces);
    assert!(primary.has_frontend("192.168.0.2", 3003, TCP, EXT));
    assert!(!primary.has_frontend("192.168.1.2", 3003, TCP, EXT));
    assert!(!primary.has_frontend("10.99.0.7", 3003, TCP, EXT));
}

#[test]
fn cases_39_44_46_load_balancer_ips_ranges_and_external_ips() {
    let r = translate_fixture(&["loadbalancer.yaml"]);
    // ipMode VIP or unset: programmed; Proxy: not; hostnames: not.
    assert!(r.has_frontend("1.2.3.4", 80, TCP, EXT) && r.has_frontend("5.6.7.8", 80, TCP, EXT));
    assert!(
        !r.has_frontend("9.10.11.12", 80, TCP, EXT) && !r.has_frontend("9.10.11.12", 80, TCP, IN)
    );
    // Source ranges (the blank tolerated) plus the service's LB IPs, since a range holds the
    // node's address (kube-proxy's allowFromNode), on LB IPs from both sides.
    let want: Vec<Ipv4Net> = [
        "1.2.3.4/32",
        "5.6.7.8/32",
        "192.168.0.0/24",
        "203.0.113.0/25",
    ]
    .iter()
    .map(|n| n.parse().unwrap())
    .collect();
    assert_eq!(r.frontend("1.2.3.4", 80, TCP, EXT).source_ranges, want);
    assert_eq!(r.frontend("1.2.3.4", 80, TCP, IN).source_ranges, want);
    // Case 17: NodePorts and the ClusterIP ignore the ranges.
    assert!(
        r.frontend("192.168.0.2", 3001, TCP, EXT)
            .source_ranges
            .is_empty()
    );
    assert!(
        r.frontend("172.30.0.70", 80, TCP, IN)
            .source_ranges
            .is_empty()
    );
    // Case 44: no node ports allocated, no NodePort frontend; case 41: an externalIP that is
    // no node address is served; its IPv6 sibling is reported and skipped.
    assert!(
        r.has_frontend("203.0.113.250", 80, TCP, IN)
            && r.has_frontend("203.0.113.250", 80, TCP, EXT)
    );
    assert!(r.problem("lb-no-nodeports").reason.contains("IPv6"));
    // Case 54: ClientIP affinity, default 10800 s, or the configured timeout.
    assert_eq!(
        r.frontend("1.2.3.4", 80, TCP, EXT).affinity_timeout_s,
        10_800
    );
    assert_eq!(
        r.frontend("172.30.0.71", 80, TCP, IN).affinity_timeout_s,
        125
    );
}

#[test]
fn invalid_objects_are_reported_by_name_and_skipped_while_the_rest_works() {
    let r = translate_fixture(&["invalid.yaml"]);
    for (name, reason) in [
        ("not-an-ip", "clusterIP \"300.1.2.3\" is not an IP address"),
        ("bad-port", "port 70000 is out of range"),
        ("bad-range", "is not a CIDR"),
        ("bad-affinity", "timeout 100000s is out of range"),
        ("thief", "already claimed by Service ns1/good"),
        ("good-1", "not an IPv4 address"),
    ] {
        let p = r.problem(name);
        assert!(p.error && p.reason.contains(reason), "{name}: {p}");
    }
    for clusterip in ["172.30.0.81", "172.30.0.82", "172.30.0.83"] {
        assert!(
            !r.has_frontend(clusterip, 80, TCP, IN),
            "{clusterip} belongs to an invalid service"
        );
    }
    // The older service keeps the contested frontend; the thief keeps its other frontends.
    let contested = r.frontend("192.168.99.20", 80, TCP, EXT);
    assert_eq!(contested.set.service, "good");
    assert!(r.has_frontend("172.30.0.84", 80, TCP, IN));
    // The bad endpoint address is skipped, the good one kept.
    assert_eq!(
        r.selectable(r.frontend("172.30.0.80", 80, TCP, IN)),
        ["10.0.0.1:80"]
    );
    // Dual stack: both clusterIPs are served, each by its family's set.
    let v4 = r.frontend("172.30.0.85", 80, TCP, IN);
    let v6 = r.frontend("fd00:10:96::85", 80, TCP, IN);
    assert_ne!(v4.set, v6.set, "a set per family");
    assert!(r.problems.iter().all(|p| p.object.name != "dual-stack"));
    // IPv6 only: its ClusterIP, and no frontend in the family it does not have (its NodePort
    // would reject); its IPv6 NodePort is noted.
    assert!(r.has_frontend("fd00:10:96::86", 80, TCP, IN));
    assert!(!r.has_frontend("192.168.0.2", 3086, TCP, EXT));
    assert!(!r.has_frontend("203.0.113.86", 80, TCP, EXT));
    let note = r.problem("ipv6-only");
    assert!(
        !note.error && note.reason.contains("NodePorts on IPv6"),
        "{note:?}"
    );
}

/// Issue 13 item 10: each of these follows a kube-proxy reading (pkg/proxy
/// endpointslicecache.go, serviceport.go, topology.go, the proxiers' source-range rules).
#[test]
fn fields_are_read_as_kube_proxy_reads_them() {
    let r = translate_fixture(&["kube_proxy_reading.yaml"]);
    // `serving` unset means ready's value: a terminating endpoint that is not ready is then no
    // fallback; one that says serving is.
    assert_eq!(
        r.selectable(r.frontend("172.30.0.90", 80, TCP, IN)),
        ["10.180.0.2:80"]
    );
    // A named Service port ignores an unnamed slice port.
    assert_eq!(
        r.selectable(r.frontend("172.30.0.91", 80, TCP, IN)),
        ["10.180.0.4:8081"]
    );
    // One address in two slices is one endpoint: ready and local (it takes the Local set).
    let dup = r.frontend("192.168.0.2", 3010, TCP, EXT);
    assert_eq!(r.backends(dup), [("10.180.0.5:80".to_owned(), 1)]);
    assert!(r.desired.sets[&dup.set].iter().all(|b| b.local));
    // Ranges without the node's address: the load balancer's own address is not let through.
    assert_eq!(
        r.frontend("1.2.3.20", 80, TCP, EXT).source_ranges,
        ["203.0.113.0/25".parse::<Ipv4Net>().unwrap()]
    );
    // Leading zeros are decimal (ParseIPSloppy, ParseCIDRSloppy).
    assert_eq!(
        r.selectable(r.frontend("172.30.0.94", 80, TCP, IN)),
        ["10.180.0.9:80"]
    );
    assert!(r.has_frontend("192.168.99.21", 80, TCP, EXT));
    assert_eq!(
        r.frontend("1.2.3.21", 80, TCP, EXT).source_ranges,
        ["203.0.113.0/25".parse::<Ipv4Net>().unwrap()]
    );
    // Load-balancer status whatever the type; ipMode other than VIP skipped; a bad IP skipped
    // and reported, the rest served.
    assert!(r.has_frontend("1.2.3.22", 80, TCP, EXT) && r.has_frontend("1.2.3.22", 80, TCP, IN));
    assert!(!r.has_frontend("1.2.3.23", 80, TCP, EXT));
    assert!(r.has_frontend("172.30.0.95", 80, TCP, IN));
    let bad = r.problem("status-only");
    assert!(bad.error && bad.reason.contains("\"1.2.3\""), "{bad}");
    // healthCheckNodePort: two local endpoints serving two ports are two, not four.
    assert_eq!(
        r.models["ns1/multiport-local"].health_check,
        Some(HealthCheck {
            node_port: 30096,
            local_ready_endpoints: 2
        })
    );
    // externalTrafficPolicy Local on a ClusterIP Service with externalIPs.
    assert_eq!(
        r.selectable(r.frontend("192.168.99.97", 80, TCP, EXT)),
        ["10.180.0.14:80"]
    );
    assert_eq!(
        r.selectable(r.frontend("192.168.99.97", 80, TCP, IN)),
        ["10.180.0.14:80", "10.180.1.15:80"]
    );
}

/// Issue 13 item 4: topology-aware routing and trafficDistribution as kube-proxy applies them
/// (pkg/proxy/topology.go): from the EndpointSlice controller's hints and the Node's zone label.
#[test]
fn topology_hints_narrow_the_cluster_set_with_kube_proxys_fallbacks() {
    let r = translate_fixture(&["topology.yaml"]);
    // Every ready endpoint hinted, two for this node's zone: only those take new flows; the
    // others stay programmed with weight 0 for their established connections.
    let zonal = r.frontend("172.30.0.100", 80, TCP, IN);
    assert_eq!(r.selectable(zonal), ["10.180.0.1:80", "10.180.2.1:80"]);
    assert_eq!(r.backends(zonal).len(), 5);
    // Each frontend with the endpoints that take its new flows, and why.
    for (addr, port, flow_scope, want, why) in [
        (
            "192.168.0.2",
            3100,
            IN,
            &["10.180.0.1:80", "10.180.2.1:80"][..],
            "the same set from inside the node on the NodePort",
        ),
        (
            "192.168.0.2",
            3100,
            EXT,
            &["10.180.0.1:80"],
            "externalTrafficPolicy Local from outside: this node's, topology aside",
        ),
        (
            "172.30.0.101",
            80,
            IN,
            &["10.180.0.2:80", "10.180.1.2:80"],
            "a ready endpoint without hints: every endpoint",
        ),
        (
            "172.30.0.102",
            80,
            IN,
            &["10.180.1.3:80", "10.180.3.3:80"],
            "no hint for this zone: every endpoint",
        ),
        (
            "172.30.0.103",
            80,
            IN,
            &["10.180.0.4:80"],
            "node hints for this node win over zone hints (PreferSameNode)",
        ),
        (
            "172.30.0.104",
            80,
            IN,
            &["10.180.0.5:80"],
            "internalTrafficPolicy Local: this node's, though hinted for another zone",
        ),
    ] {
        assert_eq!(
            r.selectable(r.frontend(addr, port, TCP, flow_scope)),
            want,
            "{why}"
        );
    }
}

/// Without a zone label on the Node, zone hints are ignored.
#[test]
fn a_node_without_a_zone_ignores_zone_hints() {
    let mut node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]}
    }))
    .unwrap();
    let zoneless =
        NodeContext::from_node("n1", Some(&node), &NodePortAddresses::NodeAddresses, &[]);
    assert_eq!(zoneless.zone, None);
    node.metadata.labels = Some(
        [(
            "topology.kubernetes.io/zone".to_owned(),
            "zone-a".to_owned(),
        )]
        .into(),
    );
    let zoned = NodeContext::from_node("n1", Some(&node), &NodePortAddresses::NodeAddresses, &[]);
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/topology.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let (objects, _) = files::parse(&text);
    let svc = objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s) if s.metadata.name.as_deref() == Some("zonal") => {
                Some(ServiceObject::from(&**s))
            }
            _ => None,
        })
        .unwrap();
    let slices: Vec<SliceObject> = objects
        .iter()
        .filter_map(|o| match o {
            Object::EndpointSlice(s) => Some(SliceObject::from(&**s)),
            _ => None,
        })
        .filter(|s| translate::slice_of(s, "ns1", "zonal"))
        .collect();
    let slices: Vec<&SliceObject> = slices.iter().collect();
    let weights = |node: &NodeContext| -> usize {
        let (model, _) = translate::service(&svc, &slices, node);
        let model = model.unwrap();
        let f = model
            .frontends
            .iter()
            .find(|f| f.kind == FrontendKind::ClusterIp)
            .unwrap();
        model
            .set(&f.set)
            .unwrap()
            .iter()
            .filter(|b| b.weight > 0)
            .count()
    };
    assert_eq!(weights(&zoneless), 4, "every ready endpoint");
    assert_eq!(weights(&zoned), 2, "zone-a's");
}

/// The `lb/forwarding-mode` annotation marks a Service's external frontends (NodePorts,
/// LoadBalancer IPs, externalIPs; never ClusterIPs nor what pods and the node reach) for direct
/// server return, or keeps them source-NATed, whatever the node's default; a value naming no
/// mode is an error on the Service, which keeps the default.
#[test]
fn the_forwarding_mode_annotation_marks_external_frontends_for_dsr() {
    let tcp = proto::TCP;
    for default in [ForwardingMode::Snat, ForwardingMode::Dsr] {
        let r = translate_on(
            &["forwarding_mode.yaml"],
            &NodePortAddresses::NodeAddresses,
            &[],
            default,
        );
        let dsr = |addr: &str, port, scope| r.frontend(addr, port, tcp, scope).dsr;
        let by_default = default == ForwardingMode::Dsr;
        for (addr, port) in [
            ("192.168.0.2", 3090),
            ("192.168.1.2", 3090),
            ("1.2.3.90", 80),
            ("203.0.113.90", 80),
        ] {
            assert!(dsr(addr, port, scope::EXTERNAL), "{addr}:{port}");
            assert!(!dsr(addr, port, scope::INTERNAL), "{addr}:{port} internal");
        }
        assert!(!dsr("172.30.0.90", 80, scope::INTERNAL));
        assert!(!dsr("192.168.0.2", 3091, scope::EXTERNAL), "annotated snat");
        assert_eq!(dsr("192.168.0.2", 3092, scope::EXTERNAL), by_default);
        assert_eq!(dsr("192.168.0.2", 3093, scope::EXTERNAL), by_default);
        let reported: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
        let default_name = if by_default { "dsr" } else { "snat" };
        assert_eq!(
            reported,
            [format!(
                "Service ns1/misspelt: annotation lb/forwarding-mode: \"DSR\" is neither \
                 \"snat\" nor \"dsr\"; the node's default ({default_name}) applies"
            )]
        );
        assert!(r.problems.iter().all(|p| p.error));
    }
}
