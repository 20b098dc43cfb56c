//! Kubernetes objects to the desired datapath state, exactly as kube-proxy reads them. A pure
//! function of its inputs: fixture-tested, no I/O.
//!
//! * Services kube-proxy ignores are ignored: headless ones, ExternalName ones, and those
//!   labelled `service.kubernetes.io/service-proxy-name` or `service.kubernetes.io/headless`.
//! * Endpoints come from every EndpointSlice of the service (label `kubernetes.io/service-name`),
//!   and fall in kube-proxy's categories, topology included: see [`crate::endpoints`].
//! * Addresses are read as kube-proxy reads them ([`crate::addr`]): leading zeros allowed.
//! * Each family of a Service's `clusterIPs` gets its own frontends and backend sets, from the
//!   EndpointSlices of that `addressType` (as kube-proxy's proxier of each family): an IPv6-only
//!   Service gets nothing in IPv4. IPv6 serves ClusterIPs only so far; NodePorts, load-balancer
//!   IPs and externalIPs are IPv4's (docs/ipv6.md).
//! * ClusterIPs use the cluster set, or the local set under internalTrafficPolicy Local.
//!   NodePorts, LoadBalancer ingress IPs and externalIPs use the cluster set for traffic from
//!   inside the node and, for traffic from outside, the local set under
//!   externalTrafficPolicy Local. Without endpoints anywhere a frontend rejects; with endpoints
//!   elsewhere but none it may use, it drops.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::Ipv4Net;
use lb_common::{maps::scope, net::proto};

use lb_datapath::model::{
    AnyFrontendKey, Desired, DesiredBackend, DesiredFrontend, Family, FrontendKind, HealthCheck,
    Members, ServiceModel, SetKind, SetName,
};

use crate::{addr, endpoints, node::ForwardingMode};

use crate::source::{
    FORWARDING_MODE_ANNOTATION, Kind, ObjectKey,
    objects::{ServiceObject, SliceObject},
};

/// kube-proxy's default sessionAffinity ClientIP timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's upper bound for it.
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

pub use crate::node::NodeContext;

/// Something wrong (or deliberately skipped) in an object, reported by name with the reason.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub object: ObjectKey,
    pub reason: String,
    /// Errors are invalid input; the rest are notes (e.g. IPv6 entries skipped).
    pub error: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

fn service_key(svc: &ServiceObject) -> ObjectKey {
    ObjectKey {
        kind: Kind::Service,
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
    }
}

/// Whether kube-proxy would leave this Service alone (and so do we).
pub fn ignored(svc: &ServiceObject) -> bool {
    if svc.labelled_away || !svc.has_spec || svc.type_.as_deref() == Some("ExternalName") {
        return true;
    }
    matches!(svc.cluster_ip.as_deref(), None | Some("") | Some("None"))
}

/// Whether `slice` belongs to the service `namespace/name` (and kube-proxy would read it).
pub fn slice_of(slice: &SliceObject, namespace: &str, name: &str) -> bool {
    slice.namespace == namespace && slice.service.as_deref() == Some(name) && !slice.labelled_away
}

pub(crate) fn parse_proto(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(proto::TCP),
        "UDP" => Ok(proto::UDP),
        "SCTP" => Ok(proto::SCTP),
        other => Err(format!(
            "protocol {other} is not supported (TCP, UDP and SCTP are)"
        )),
    }
}

pub(crate) fn port_number(value: i32, what: &str) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {value} is out of range 1-65535"))
}

/// Parses loadBalancerSourceRanges (blanks around entries are tolerated, as the API does).
fn source_ranges(
    spec_ranges: &[String],
    object: &ObjectKey,
    problems: &mut Vec<Problem>,
) -> Result<Vec<Ipv4Net>, String> {
    let mut nets = Vec::new();
    for raw in spec_ranges {
        let text = raw.trim();
        if text.contains(':') {
            problems.push(Problem {
                object: object.clone(),
                reason: format!("loadBalancerSourceRange {text} is IPv6, which this datapath does not handle yet; skipped"),
                error: false,
            });
            continue;
        }
        // kube-proxy drops a range it cannot parse and so may open the load balancer to more
        // sources than the owner meant; refusing the Service keeps it closed.
        match addr::ipv4_net(text) {
            Some(net) => nets.push(net.trunc()),
            None => return Err(format!("loadBalancerSourceRange {raw:?} is not a CIDR")),
        }
    }
    Ok(nets)
}

/// A note about a part of an SCTP port left unserved: the datapath balances SCTP without
/// rewriting ports (its CRC32c covers the whole packet and is not recomputed), so a frontend
/// serves only the endpoints on its own port, and a NodePort only when it equals the port.
fn sctp_note(object: &ObjectKey, what: String) -> Problem {
    Problem {
        object: object.clone(),
        reason: format!(
            "{what}: SCTP is balanced without rewriting ports, so only endpoints on the \
             frontend's own port serve it"
        ),
        error: false,
    }
}

/// How the Service's external flows reach other nodes' backends: its `lb/forwarding-mode`
/// annotation, else the node's default. A value that names no mode is reported and the default
/// applies.
fn forwarding_mode(
    svc: &ServiceObject,
    node: &NodeContext,
    object: &ObjectKey,
    problems: &mut Vec<Problem>,
) -> ForwardingMode {
    let Some(value) = svc.forwarding_mode.as_deref() else {
        return node.forwarding;
    };
    ForwardingMode::parse(value).unwrap_or_else(|| {
        problems.push(Problem {
            object: object.clone(),
            reason: format!(
                "annotation {FORWARDING_MODE_ANNOTATION}: {value:?} is neither \"snat\" nor \"dsr\"; \
                 the node's default ({}) applies",
                node.forwarding.name()
            ),
            error: true,
        });
        node.forwarding
    })
}

/// Translates one Service and its EndpointSlices. `None` when the service is ignored or invalid
/// (the problems say why); invalid parts of a valid service are skipped and reported.
pub fn service(
    svc: &ServiceObject,
    slices: &[&SliceObject],
    node: &NodeContext,
) -> (Option<ServiceModel>, Vec<Problem>) {
    let object = service_key(svc);
    let mut problems = Vec::new();
    if ignored(svc) {
        return (None, problems);
    }
    let spec = svc;
    let error = |reason: String| Problem {
        object: object.clone(),
        reason,
        error: true,
    };

    // Each family of the Service's clusterIPs gets its frontends and its backend sets, as
    // kube-proxy's proxier of that family gives them: an IPv6-only Service gets no IPv4
    // frontend (NodePorts on the node's IPv4 addresses would only reject).
    let (mut cluster_ips, mut cluster_ips6) = (Vec::new(), Vec::new());
    let listed: Vec<&String> = if spec.cluster_ips.is_empty() {
        spec.cluster_ip.iter().collect()
    } else {
        spec.cluster_ips.iter().collect()
    };
    for ip in &listed {
        if let Some(addr) = addr::ipv4(ip) {
            cluster_ips.push(addr);
        } else if let Ok(addr) = ip.parse::<Ipv6Addr>() {
            cluster_ips6.push(addr);
        } else {
            return (
                None,
                vec![error(format!("clusterIP {ip:?} is not an IP address"))],
            );
        }
    }
    let serves_ipv4 = listed.is_empty() || !cluster_ips.is_empty();

    // externalIPs and load-balancer ingress IPs that do not parse are skipped (kube-proxy
    // skips them silently; we report them) and the rest of the Service is served.
    let mut external_ips = Vec::new();
    for ip in &spec.external_ips {
        match addr::ipv4(ip) {
            Some(addr) => external_ips.push(addr),
            None if ip.contains(':') => problems.push(Problem {
                object: object.clone(),
                reason: format!("externalIP {ip} is IPv6; skipped"),
                error: false,
            }),
            None => problems.push(error(format!(
                "externalIP {ip:?} is not an IP address; skipped"
            ))),
        }
    }

    // Read whatever the Service's type, as kube-proxy reads it: an ingress point without an IP
    // (a hostname) or whose ipMode is not VIP (Proxy: the load balancer proxies to the nodes
    // itself) gets nothing.
    let mut lb_ips = Vec::new();
    for ingress in &svc.lb_ingress {
        if !matches!(ingress.ip_mode.as_deref(), None | Some("VIP")) {
            continue;
        }
        let Some(ip) = ingress.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        match addr::ipv4(ip) {
            Some(addr) => lb_ips.push(addr),
            None if ip.contains(':') => {}
            None => problems.push(error(format!(
                "load balancer ingress IP {ip:?} is not an IP address; skipped"
            ))),
        }
    }
    let ranges = match source_ranges(&spec.load_balancer_source_ranges, &object, &mut problems) {
        Ok(r) => r,
        Err(reason) => return (None, vec![error(reason)]),
    };

    let affinity_timeout_s = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .affinity_timeout_s
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S as i32);
        if !(1..=MAX_AFFINITY_TIMEOUT_S).contains(&timeout) {
            return (
                None,
                vec![error(format!(
                    "sessionAffinity timeout {timeout}s is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"
                ))],
            );
        }
        timeout as u32
    } else {
        0
    };
    let dsr = forwarding_mode(svc, node, &object, &mut problems) == ForwardingMode::Dsr;
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    // The external policy applies to externally accessible Services only (kube-proxy's
    // `ExternalPolicyLocal`): NodePort, LoadBalancer, and ClusterIP with externalIPs.
    let lb_type = spec.type_.as_deref() == Some("LoadBalancer");
    let externally_accessible = match spec.type_.as_deref() {
        Some("LoadBalancer" | "NodePort") => true,
        None | Some("ClusterIP") => !spec.external_ips.is_empty(),
        Some(_) => false,
    };
    let external_local =
        spec.external_traffic_policy.as_deref() == Some("Local") && externally_accessible;
    // kube-proxy lets the LoadBalancer's own addresses through its source ranges only when a
    // range holds the node's address: the node reaching its own load balancer, whose packets
    // are routed straight back (hairpin) with the load balancer's address as their source.
    let lb_sources_from_node = node
        .primary_addr
        .is_some_and(|ip| ranges.iter().any(|net| net.contains(&ip)));

    let mut model = ServiceModel::default();
    // healthCheckNodePort counts local ready endpoints by address over every port.
    let mut local_ready_addrs = BTreeSet::new();
    let mut seen_ports = BTreeSet::new();
    // SCTP ports, and those of them no endpoint can serve (see `sctp_note`).
    let (mut sctp_ports, mut sctp_unservable) = (0, 0);
    for port in &spec.ports {
        let port_proto = match parse_proto(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(reason) => {
                problems.push(Problem {
                    object: object.clone(),
                    reason: format!("port {}: {reason}; skipped", port.port),
                    error: false,
                });
                continue;
            }
        };
        let number = match port_number(port.port, "port") {
            Ok(n) => n,
            Err(reason) => return (None, vec![error(reason)]),
        };
        if !seen_ports.insert((number, port_proto)) {
            return (
                None,
                vec![error(format!(
                    "port {number}/{} is listed twice",
                    proto::name(port_proto)
                ))],
            );
        }
        if !proto::rewrites_ports(port_proto) {
            sctp_ports += 1;
        }
        let mut port_unservable = true;
        let families = [
            (Family::V4, serves_ipv4),
            (Family::V6, !cluster_ips6.is_empty()),
        ];
        for (family, _) in families.into_iter().filter(|(_, served)| *served) {
            let mut endpoints =
                endpoints::for_port(port, port_proto, family, slices, node, &mut problems);
            if !proto::rewrites_ports(port_proto) {
                let left_out = endpoints::keep_on_port(&mut endpoints, number);
                if !left_out.is_empty() {
                    port_unservable &= endpoints.is_empty();
                    let ports: Vec<String> = left_out.iter().map(ToString::to_string).collect();
                    problems.push(sctp_note(
                        &object,
                        format!(
                            "port {number}/SCTP: endpoints on targetPort {} left out",
                            ports.join(", ")
                        ),
                    ));
                } else {
                    port_unservable = false;
                }
            }
            let endpoints::Categories {
                cluster,
                local,
                any: has_endpoints,
            } = endpoints::categorize(&endpoints, node);
            // A dual-stack pod is one endpoint: counted in the Service's first family only.
            if family == Family::V4 || !serves_ipv4 {
                local_ready_addrs.extend(
                    endpoints
                        .iter()
                        .filter(|e| e.local && e.ready())
                        .map(|e| e.addr.ip()),
                );
            }
            let name = |kind| {
                SetName::new(
                    object.namespace.as_str(),
                    object.name.as_str(),
                    port.name.as_deref().unwrap_or_default(),
                    port_proto,
                    kind,
                )
                .in_family(family)
            };
            let (cluster_name, local_name) = (name(SetKind::Cluster), name(SetKind::Local));
            let (cluster, local): (Members, Members) = (cluster.into(), local.into());
            let mut frontend =
                |addr: IpAddr, port: u16, scope: u8, kind: FrontendKind, set_kind: SetKind| {
                    let (name, members) = match set_kind {
                        SetKind::Cluster => (&cluster_name, &cluster),
                        SetKind::Local => (&local_name, &local),
                    };
                    if model.set(name).is_none() {
                        model.sets.push((name.clone(), members.clone()));
                    }
                    let name = name.clone();
                    let selectable = members.iter().any(DesiredBackend::selectable);
                    let mut source_ranges = Vec::new();
                    if kind == FrontendKind::LoadBalancer && !ranges.is_empty() {
                        source_ranges = ranges.clone();
                        if lb_sources_from_node {
                            source_ranges.extend(
                                lb_ips
                                    .iter()
                                    .map(|ip| Ipv4Net::new(*ip, 32).expect("a /32")),
                            );
                        }
                        source_ranges.sort_unstable();
                        source_ranges.dedup();
                    }
                    model.frontends.push(DesiredFrontend {
                        key: AnyFrontendKey::new(addr, port, port_proto, scope),
                        kind,
                        set: name,
                        drop_when_empty: !selectable && has_endpoints,
                        // Only flows from outside can go by DSR (to other nodes' backends).
                        dsr: dsr && scope == scope::EXTERNAL && kind != FrontendKind::ClusterIp,
                        // kube-proxy's masqueradeAll masquerades flows to ClusterIPs, not those to
                        // the external addresses of a Service with externalTrafficPolicy Local.
                        keeps_client: external_local && kind != FrontendKind::ClusterIp,
                        affinity_timeout_s,
                        source_ranges,
                    });
                };
            let family_cluster_ips: Vec<IpAddr> = match family {
                Family::V4 => cluster_ips.iter().map(|ip| IpAddr::V4(*ip)).collect(),
                Family::V6 => cluster_ips6.iter().map(|ip| IpAddr::V6(*ip)).collect(),
            };
            for ip in family_cluster_ips {
                let kind = if internal_local {
                    SetKind::Local
                } else {
                    SetKind::Cluster
                };
                frontend(ip, number, scope::INTERNAL, FrontendKind::ClusterIp, kind);
            }
            if family == Family::V6 {
                // NodePorts, load-balancer IPs and externalIPs are IPv4's so far (docs/ipv6.md).
                if port.node_port.is_some_and(|p| p != 0) {
                    problems.push(Problem {
                        object: object.clone(),
                        reason: format!(
                            "port {number}: NodePorts on IPv6 node addresses are not served yet; \
                             skipped"
                        ),
                        error: false,
                    });
                }
                continue;
            }
            let external_set = if external_local {
                SetKind::Local
            } else {
                SetKind::Cluster
            };
            let mut external = |addr: Ipv4Addr, port: u16, kind: FrontendKind| {
                let addr = IpAddr::V4(addr);
                // From inside the node (pods, the node itself) every endpoint is used, whatever the
                // external policy (kube-proxy's short-circuit for local traffic).
                frontend(addr, port, scope::INTERNAL, kind, SetKind::Cluster);
                frontend(addr, port, scope::EXTERNAL, kind, external_set);
            };
            for &ip in &lb_ips {
                external(ip, number, FrontendKind::LoadBalancer);
            }
            for &ip in &external_ips {
                external(ip, number, FrontendKind::ExternalIp);
            }
            // Whatever the type, as kube-proxy does (the API server allows a nodePort on NodePort
            // and LoadBalancer Services only).
            if let Some(node_port) = port.node_port.filter(|p| *p != 0) {
                match port_number(node_port, "nodePort") {
                    Ok(np) if !proto::rewrites_ports(port_proto) && np != number => {
                        problems.push(sctp_note(
                            &object,
                            format!("nodePort {np}/SCTP is not port {number}; NodePort skipped"),
                        ));
                    }
                    Ok(np) => {
                        for &ip in &node.nodeport_addrs {
                            external(ip, np, FrontendKind::NodePort);
                        }
                    }
                    Err(reason) => problems.push(error(format!("{reason}; NodePort skipped"))),
                }
            }
        }
        if !proto::rewrites_ports(port_proto) {
            sctp_unservable += usize::from(port_unservable);
        }
    }
    if sctp_ports > 0 && sctp_unservable == sctp_ports {
        problems.push(sctp_note(
            &object,
            "no SCTP port of this Service can be served".to_owned(),
        ));
    }
    if external_local
        && lb_type
        && let Some(hc) = spec.health_check_node_port
    {
        match port_number(hc, "healthCheckNodePort") {
            Ok(node_port) => {
                model.health_check = Some(HealthCheck {
                    node_port,
                    local_ready_endpoints: local_ready_addrs.len(),
                })
            }
            Err(reason) => problems.push(error(reason)),
        }
    }
    // Kept for as long as the Service exists: no spare capacity.
    model.sets.shrink_to_fit();
    model.frontends.shrink_to_fit();
    (Some(model), problems)
}

/// One translated Service, with its creation time (which decides which of two services claiming
/// the same frontend wins: the older one).
pub struct Translated<'a> {
    pub object: &'a ObjectKey,
    pub created: Option<String>,
    pub model: &'a ServiceModel,
}

/// Merges per-service models into the whole desired state (what the agent keeps up to date
/// incrementally with [`crate::desired::DesiredState`]).
pub fn assemble<'a>(services: impl IntoIterator<Item = Translated<'a>>) -> (Desired, Vec<Problem>) {
    let mut state = crate::desired::DesiredState::default();
    let mut problems = Vec::new();
    for t in services {
        let id = crate::source::store::service_id(t.object);
        problems.extend(state.set_service(id, t.created, Some(t.model.clone())));
    }
    // With three or more claimants a loser may be reported twice.
    problems.sort();
    problems.dedup();
    (state.desired().clone(), problems)
}
