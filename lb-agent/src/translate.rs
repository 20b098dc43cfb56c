//! Kubernetes objects to the desired datapath state, exactly as kube-proxy reads them. A pure
//! function of its inputs: fixture-tested, no I/O.
//!
//! * Services kube-proxy ignores are ignored: headless ones, ExternalName ones, and those
//!   labelled `service.kubernetes.io/service-proxy-name` or `service.kubernetes.io/headless`.
//! * Endpoints come from every EndpointSlice of the service (label `kubernetes.io/service-name`),
//!   merged and de-duplicated; a service port takes the slice port of the same name and
//!   protocol, whose number is the resolved targetPort (numeric or named).
//! * Endpoint categories follow kube-proxy's `CategorizeEndpoints`: the cluster set holds the
//!   ready endpoints or, when none is ready anywhere, the serving terminating ones; the local set
//!   holds this node's ready endpoints or, when it has none, its serving terminating ones.
//! * ClusterIPs use the cluster set, or the local set under internalTrafficPolicy Local.
//!   NodePorts, LoadBalancer ingress IPs and externalIPs use the cluster set for traffic from
//!   inside the node and, for traffic from outside, the local set under
//!   externalTrafficPolicy Local. Without endpoints anywhere a frontend rejects; with endpoints
//!   elsewhere but none it may use, it drops.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use lb_common::{maps::scope, net::proto};

use lb_datapath::model::{
    Desired, DesiredBackend, DesiredFrontend, FrontendKey, FrontendKind, HealthCheck, Members,
    ServiceModel, SetKind, SetName,
};

use crate::source::{
    Kind, ObjectKey,
    objects::{EndpointAddress, EndpointObject, PortObject, ServiceObject, SliceObject},
};

/// kube-proxy's default sessionAffinity ClientIP timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's upper bound for it.
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// What the translation needs to know about the node it runs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    /// Addresses that accept NodePorts (the node's addresses within `--nodeport-addresses`).
    pub nodeport_addrs: Vec<Ipv4Addr>,
    /// The node's first IPv4 InternalIP: external flows to backends on other nodes are
    /// source-NATed to it, so that their replies come back through this node.
    pub snat_addr: Option<Ipv4Addr>,
}

impl NodeContext {
    /// The node's IPv4 addresses (InternalIP and ExternalIP) that fall in `allowed` (every
    /// address when `allowed` is empty).
    pub fn from_node(name: &str, node: Option<&Node>, allowed: &[Ipv4Net]) -> Self {
        let addresses = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten();
        let snat_addr = addresses
            .clone()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse().ok());
        let mut addrs: Vec<Ipv4Addr> = addresses
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .filter(|ip: &Ipv4Addr| {
                allowed.is_empty() || allowed.iter().any(|net| net.contains(ip))
            })
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        Self {
            name: name.to_owned(),
            nodeport_addrs: addrs,
            snat_addr,
        }
    }
}

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

fn parse_proto(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(proto::TCP),
        "UDP" => Ok(proto::UDP),
        other => Err(format!(
            "protocol {other} is not supported (TCP and UDP are)"
        )),
    }
}

fn port_number(value: i32, what: &str) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} {value} is out of range 1-65535"))
}

/// An endpoint's state, with kube-proxy's defaults for absent conditions (ready and serving
/// default to true, terminating to false).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Condition {
    ready: bool,
    serving: bool,
    terminating: bool,
}

impl Condition {
    fn of(ep: &EndpointObject) -> Self {
        let ready = ep.ready.unwrap_or(true);
        Self {
            ready,
            serving: ep.serving.unwrap_or(ready),
            terminating: ep.terminating.unwrap_or(false),
        }
    }

    fn serving_terminating(self) -> bool {
        self.serving && self.terminating
    }

    /// Merging duplicates across slices: the most available reading wins.
    fn merge(self, other: Self) -> Self {
        Self {
            ready: self.ready || other.ready,
            serving: self.serving || other.serving,
            terminating: self.terminating && other.terminating,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Endpointish {
    addr: SocketAddrV4,
    local: bool,
    condition: Condition,
}

/// The endpoints of one service port, merged over the service's slices.
fn endpoints_for_port(
    port: &PortObject,
    port_proto: u8,
    slices: &[&SliceObject],
    node: &NodeContext,
    problems: &mut Vec<Problem>,
) -> Vec<Endpointish> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let mut merged: BTreeMap<SocketAddrV4, Endpointish> = BTreeMap::new();
    for slice in slices {
        let slice_key = ObjectKey {
            kind: Kind::EndpointSlice,
            namespace: slice.namespace.clone(),
            name: slice.name.clone(),
        };
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(slice_port) = slice.ports.iter().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && parse_proto(p.protocol.as_deref()) == Ok(port_proto)
        }) else {
            continue;
        };
        let Some(number) = slice_port.port else {
            continue;
        };
        let number = match port_number(number, "endpoint port") {
            Ok(n) => n,
            Err(reason) => {
                problems.push(Problem {
                    object: slice_key.clone(),
                    reason,
                    error: true,
                });
                continue;
            }
        };
        for ep in &slice.endpoints {
            // kube-proxy uses an endpoint's first address.
            let ip = match &ep.address {
                None => continue,
                Some(EndpointAddress::V4(ip)) => *ip,
                Some(EndpointAddress::Invalid(first)) => {
                    problems.push(Problem {
                        object: slice_key.clone(),
                        reason: format!("endpoint address {first:?} is not an IPv4 address"),
                        error: true,
                    });
                    continue;
                }
            };
            let addr = SocketAddrV4::new(ip, number);
            let found = Endpointish {
                addr,
                local: ep.node_name.as_deref().is_some_and(|n| *n == *node.name),
                condition: Condition::of(ep),
            };
            merged
                .entry(addr)
                .and_modify(|e| {
                    e.condition = e.condition.merge(found.condition);
                    e.local |= found.local;
                })
                .or_insert(found);
        }
    }
    merged.into_values().collect()
}

/// kube-proxy's endpoint categories: (cluster set, local set, any usable endpoint anywhere).
///
/// Each set also lists, with weight 0, the endpoints of its scope that take no new flows (not
/// ready, or terminating while ready ones exist): their backend stays programmed so that their
/// established connections continue until the endpoint leaves its EndpointSlice.
fn categorize(endpoints: &[Endpointish]) -> (Vec<DesiredBackend>, Vec<DesiredBackend>, bool) {
    let usable = |members: &[&Endpointish]| -> Vec<SocketAddrV4> {
        let ready: Vec<SocketAddrV4> = members
            .iter()
            .filter(|e| e.condition.ready)
            .map(|e| e.addr)
            .collect();
        if ready.is_empty() {
            members
                .iter()
                .filter(|e| e.condition.serving_terminating())
                .map(|e| e.addr)
                .collect()
        } else {
            ready
        }
    };
    let set = |members: Vec<&Endpointish>| -> Vec<DesiredBackend> {
        let chosen = usable(&members);
        members
            .iter()
            .map(|e| DesiredBackend {
                addr: e.addr,
                local: e.local,
                weight: u32::from(chosen.contains(&e.addr)),
                serving: e.condition.serving,
            })
            .collect()
    };
    let cluster = set(endpoints.iter().collect());
    let local = set(endpoints.iter().filter(|e| e.local).collect());
    let any = cluster.iter().any(DesiredBackend::selectable);
    (cluster, local, any)
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
        match Ipv4Net::from_str(text) {
            Ok(net) => nets.push(net.trunc()),
            Err(_) => return Err(format!("loadBalancerSourceRange {raw:?} is not a CIDR")),
        }
    }
    Ok(nets)
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

    let mut cluster_ips = Vec::new();
    let listed: Vec<&String> = if spec.cluster_ips.is_empty() {
        spec.cluster_ip.iter().collect()
    } else {
        spec.cluster_ips.iter().collect()
    };
    for ip in listed {
        if ip.contains(':') {
            problems.push(Problem {
                object: object.clone(),
                reason: format!(
                    "clusterIP {ip} is IPv6, which this datapath does not handle yet; skipped"
                ),
                error: false,
            });
            continue;
        }
        match Ipv4Addr::from_str(ip) {
            Ok(addr) => cluster_ips.push(addr),
            Err(_) => {
                return (
                    None,
                    vec![error(format!("clusterIP {ip:?} is not an IP address"))],
                );
            }
        }
    }

    let mut external_ips = Vec::new();
    for ip in &spec.external_ips {
        match Ipv4Addr::from_str(ip) {
            Ok(addr) => external_ips.push(addr),
            Err(_) if ip.contains(':') => problems.push(Problem {
                object: object.clone(),
                reason: format!("externalIP {ip} is IPv6; skipped"),
                error: false,
            }),
            Err(_) => {
                return (
                    None,
                    vec![error(format!("externalIP {ip:?} is not an IP address"))],
                );
            }
        }
    }

    let lb_type = spec.type_.as_deref() == Some("LoadBalancer");
    let mut lb_ips = Vec::new();
    if lb_type {
        for ingress in &svc.lb_ingress {
            // ipMode Proxy: the load balancer proxies to the nodes itself; kube-proxy programs
            // nothing for that IP.
            if ingress.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(ip) = ingress.ip.as_deref() else {
                continue;
            };
            match Ipv4Addr::from_str(ip) {
                Ok(addr) => lb_ips.push(addr),
                Err(_) if ip.contains(':') => {}
                Err(_) => {
                    return (
                        None,
                        vec![error(format!(
                            "load balancer ingress IP {ip:?} is not an IP address"
                        ))],
                    );
                }
            }
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
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let node_ports_on = matches!(
        spec.type_.as_deref(),
        Some("NodePort") | Some("LoadBalancer")
    );

    let mut model = ServiceModel::default();
    let mut local_ready_total = 0usize;
    let mut seen_ports = BTreeSet::new();
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
        let endpoints = endpoints_for_port(port, port_proto, slices, node, &mut problems);
        let (cluster, local, has_endpoints) = categorize(&endpoints);
        local_ready_total += endpoints
            .iter()
            .filter(|e| e.local && e.condition.ready)
            .count();
        let name = |kind| {
            SetName::new(
                object.namespace.as_str(),
                object.name.as_str(),
                port.name.as_deref().unwrap_or_default(),
                port_proto,
                kind,
            )
        };
        let (cluster_name, local_name) = (name(SetKind::Cluster), name(SetKind::Local));
        let (cluster, local): (Members, Members) = (cluster.into(), local.into());
        let mut frontend =
            |addr: Ipv4Addr, port: u16, scope: u8, kind: FrontendKind, set_kind: SetKind| {
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
                    // The load balancer's own address may always reach it (node-to-own-LB hairpin).
                    source_ranges.push(Ipv4Net::new(addr, 32).expect("a /32"));
                    source_ranges.sort_unstable();
                    source_ranges.dedup();
                }
                model.frontends.push(DesiredFrontend {
                    key: FrontendKey::new(addr, port, port_proto, scope),
                    kind,
                    set: name,
                    drop_when_empty: !selectable && has_endpoints,
                    affinity_timeout_s,
                    source_ranges,
                });
            };
        for &ip in &cluster_ips {
            let kind = if internal_local {
                SetKind::Local
            } else {
                SetKind::Cluster
            };
            frontend(ip, number, scope::INTERNAL, FrontendKind::ClusterIp, kind);
        }
        let external_set = if external_local {
            SetKind::Local
        } else {
            SetKind::Cluster
        };
        let mut external = |addr: Ipv4Addr, port: u16, kind: FrontendKind| {
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
        if node_ports_on && let Some(node_port) = port.node_port {
            match port_number(node_port, "nodePort") {
                Ok(np) => {
                    for &ip in &node.nodeport_addrs {
                        external(ip, np, FrontendKind::NodePort);
                    }
                }
                Err(reason) => problems.push(error(format!("{reason}; NodePort skipped"))),
            }
        }
    }
    if external_local
        && lb_type
        && let Some(hc) = spec.health_check_node_port
    {
        match port_number(hc, "healthCheckNodePort") {
            Ok(node_port) => {
                model.health_check = Some(HealthCheck {
                    node_port,
                    local_ready_endpoints: local_ready_total,
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
        let id = (t.object.namespace.clone(), t.object.name.clone());
        problems.extend(state.set_service(id, t.created, Some(t.model.clone())));
    }
    // With three or more claimants a loser may be reported twice.
    problems.sort();
    problems.dedup();
    (state.desired().clone(), problems)
}
