//! Kubernetes objects as YAML text, shaped as the API server serves them (`kubectl get -o
//! yaml`): v1 Service, discovery.k8s.io/v1 EndpointSlice and v1 Node, for the agent's file
//! source in tests and the demo.
//!
//! "As served" means with the fields the API server defaults filled in (`clusterIPs`,
//! `ipFamilies`, `sessionAffinity: None`, the traffic policies, `ipMode`, the EndpointSlice
//! controller's labels...), because the agent must handle what a real cluster sends. Fields
//! only the server generates and the agent never reads (`uid`, `resourceVersion`,
//! `creationTimestamp`, `managedFields`) are left out. Nothing is allocated: a NodePort or
//! LoadBalancer Service gets the `nodePort`s and `healthCheckNodePort` it is given, or none.
//!
//! Services and EndpointSlices come in both families: a Service's `clusterIPs` name its
//! `ipFamilies` ([`ServiceManifest::new_ipv6`], [`ServiceManifest::dual_stack`]), a slice has
//! one `addressType` ([`EndpointSliceManifest::address_type`]).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// The API server's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }

    /// Whether the Service is reachable from outside (and so has an externalTrafficPolicy).
    fn is_external(self) -> bool {
        self != Self::ClusterIP
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "Cluster",
            Self::Local => "Local",
        }
    }
}

/// An address family, as a Service's `ipFamilies` and an EndpointSlice's `addressType` name
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::IPv4,
            IpAddr::V6(_) => Self::IPv6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::IPv4 => "IPv4",
            Self::IPv6 => "IPv6",
        }
    }
}

/// A Service's `ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamilyPolicy {
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

impl IpFamilyPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SingleStack => "SingleStack",
            Self::PreferDualStack => "PreferDualStack",
            Self::RequireDualStack => "RequireDualStack",
        }
    }
}

/// One entry of a Service's `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty for the single unnamed port a Service may have.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
    pub node_port: Option<u16>,
}

impl ServicePort {
    pub fn new(name: &str, port: u16, protocol: Protocol, target_port: u16) -> Self {
        Self {
            name: name.to_owned(),
            port,
            protocol,
            target_port,
            node_port: None,
        }
    }

    pub fn tcp(name: &str, port: u16, target_port: u16) -> Self {
        Self::new(name, port, Protocol::Tcp, target_port)
    }

    pub fn udp(name: &str, port: u16, target_port: u16) -> Self {
        Self::new(name, port, Protocol::Udp, target_port)
    }

    pub fn node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }
}

/// A v1 Service, built field by field; [`ServiceManifest::yaml`] renders it.
#[derive(Clone, Debug)]
pub struct ServiceManifest {
    name: String,
    namespace: String,
    service_type: ServiceType,
    /// `clusterIPs`: the first is `clusterIP`, and their families in order are `ipFamilies`.
    cluster_ips: Vec<IpAddr>,
    ip_family_policy: IpFamilyPolicy,
    ports: Vec<ServicePort>,
    external_traffic_policy: TrafficPolicy,
    internal_traffic_policy: TrafficPolicy,
    health_check_node_port: Option<u16>,
    external_ips: Vec<Ipv4Addr>,
    load_balancer_source_ranges: Vec<String>,
    /// `Some(timeout)`: sessionAffinity ClientIP.
    affinity_timeout: Option<u32>,
    ingress_ips: Vec<Ipv4Addr>,
    annotations: Vec<(String, String)>,
}

impl ServiceManifest {
    /// A ClusterIP Service in namespace `default`, with no ports yet: IPv4, SingleStack.
    pub fn new(name: &str, cluster_ip: Ipv4Addr) -> Self {
        Self::single_stack(name, cluster_ip.into())
    }

    /// [`ServiceManifest::new`] in IPv6: `ipFamilies: [IPv6]`, SingleStack.
    pub fn new_ipv6(name: &str, cluster_ip: Ipv6Addr) -> Self {
        Self::single_stack(name, cluster_ip.into())
    }

    fn single_stack(name: &str, cluster_ip: IpAddr) -> Self {
        Self {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            service_type: ServiceType::ClusterIP,
            cluster_ips: vec![cluster_ip],
            ip_family_policy: IpFamilyPolicy::SingleStack,
            ports: Vec::new(),
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            external_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            affinity_timeout: None,
            ingress_ips: Vec::new(),
            annotations: Vec::new(),
        }
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    /// Makes the Service dual-stack: `secondary`, of the other family than its clusterIP, is
    /// its second `clusterIPs` entry (and family), and its policy RequireDualStack (change it
    /// with [`ServiceManifest::ip_family_policy`]). Panics when the families are the same.
    pub fn dual_stack(mut self, secondary: impl Into<IpAddr>) -> Self {
        let secondary = secondary.into();
        assert!(
            self.cluster_ips
                .iter()
                .all(|ip| IpFamily::of(*ip) != IpFamily::of(secondary)),
            "{secondary} is of the family of {:?}",
            self.cluster_ips
        );
        self.cluster_ips.push(secondary);
        self.ip_family_policy = IpFamilyPolicy::RequireDualStack;
        self
    }

    pub fn ip_family_policy(mut self, policy: IpFamilyPolicy) -> Self {
        self.ip_family_policy = policy;
        self
    }

    pub fn service_type(mut self, service_type: ServiceType) -> Self {
        self.service_type = service_type;
        self
    }

    pub fn port(mut self, port: ServicePort) -> Self {
        self.ports.push(port);
        self
    }

    /// Rendered for NodePort and LoadBalancer Services only (the API server clears it on
    /// ClusterIP ones).
    pub fn external_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.external_traffic_policy = policy;
        self
    }

    pub fn internal_traffic_policy(mut self, policy: TrafficPolicy) -> Self {
        self.internal_traffic_policy = policy;
        self
    }

    /// The port serving `/healthz` for this Service's local endpoints (LoadBalancer with
    /// externalTrafficPolicy Local).
    pub fn health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    pub fn external_ip(mut self, ip: Ipv4Addr) -> Self {
        self.external_ips.push(ip);
        self
    }

    /// A `loadBalancerSourceRanges` entry, as written (e.g. `"192.168.50.2/32"`).
    pub fn source_range(mut self, cidr: &str) -> Self {
        self.load_balancer_source_ranges.push(cidr.to_owned());
        self
    }

    /// sessionAffinity ClientIP with `timeout_seconds` (the API's default is
    /// [`DEFAULT_AFFINITY_TIMEOUT`]).
    pub fn client_ip_affinity(mut self, timeout_seconds: u32) -> Self {
        self.affinity_timeout = Some(timeout_seconds);
        self
    }

    /// A `metadata.annotations` entry.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }

    /// A `status.loadBalancer.ingress` IP (what a cloud controller or MetalLB writes).
    pub fn ingress_ip(mut self, ip: Ipv4Addr) -> Self {
        self.ingress_ips.push(ip);
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        y.push_str("apiVersion: v1\nkind: Service\n");
        metadata(&mut y, &self.name, Some(&self.namespace), &[]);
        if !self.annotations.is_empty() {
            y.push_str("  annotations:\n");
            for (key, value) in &self.annotations {
                line(&mut y, 2, key, scalar(value));
            }
        }
        y.push_str("spec:\n");
        line(&mut y, 1, "type", self.service_type.as_str());
        line(&mut y, 1, "clusterIP", ip_scalar(self.cluster_ips[0]));
        list(
            &mut y,
            1,
            "clusterIPs",
            self.cluster_ips.iter().map(|ip| ip_scalar(*ip)),
        );
        list(
            &mut y,
            1,
            "ipFamilies",
            self.cluster_ips.iter().map(|ip| IpFamily::of(*ip).as_str()),
        );
        line(&mut y, 1, "ipFamilyPolicy", self.ip_family_policy.as_str());
        if self.ports.is_empty() {
            y.push_str("  ports: []\n");
        } else {
            y.push_str("  ports:\n");
        }
        for port in &self.ports {
            let mut first = true;
            let mut field = |y: &mut String, key: &str, value: &dyn std::fmt::Display| {
                let lead = if std::mem::take(&mut first) {
                    "  - "
                } else {
                    "    "
                };
                let _ = writeln!(y, "{lead}{key}: {value}");
            };
            if !port.name.is_empty() {
                field(&mut y, "name", &scalar(&port.name));
            }
            field(&mut y, "port", &port.port);
            field(&mut y, "protocol", &port.protocol.as_str());
            field(&mut y, "targetPort", &port.target_port);
            if let Some(node_port) = port.node_port {
                field(&mut y, "nodePort", &node_port);
            }
        }
        if self.service_type.is_external() {
            line(
                &mut y,
                1,
                "externalTrafficPolicy",
                self.external_traffic_policy.as_str(),
            );
        }
        line(
            &mut y,
            1,
            "internalTrafficPolicy",
            self.internal_traffic_policy.as_str(),
        );
        if let Some(port) = self.health_check_node_port {
            line(&mut y, 1, "healthCheckNodePort", port);
        }
        if self.service_type == ServiceType::LoadBalancer {
            line(&mut y, 1, "allocateLoadBalancerNodePorts", true);
        }
        if !self.external_ips.is_empty() {
            list(&mut y, 1, "externalIPs", &self.external_ips);
        }
        if !self.load_balancer_source_ranges.is_empty() {
            list(
                &mut y,
                1,
                "loadBalancerSourceRanges",
                self.load_balancer_source_ranges.iter().map(|r| scalar(r)),
            );
        }
        match self.affinity_timeout {
            None => line(&mut y, 1, "sessionAffinity", "None"),
            Some(timeout) => {
                line(&mut y, 1, "sessionAffinity", "ClientIP");
                y.push_str("  sessionAffinityConfig:\n    clientIP:\n");
                line(&mut y, 3, "timeoutSeconds", timeout);
            }
        }
        y.push_str("status:\n  loadBalancer:");
        if self.ingress_ips.is_empty() {
            y.push_str(" {}\n");
        } else {
            y.push_str("\n    ingress:\n");
            for ip in &self.ingress_ips {
                let _ = writeln!(y, "    - ip: {ip}\n      ipMode: VIP");
            }
        }
        y
    }
}

/// One endpoint of an EndpointSlice, with its conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Of the family of its slice's `addressType`.
    pub ip: IpAddr,
    pub node_name: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    /// A running, ready pod.
    pub fn ready(ip: impl Into<IpAddr>, node_name: &str) -> Self {
        Self {
            ip: ip.into(),
            node_name: node_name.to_owned(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A pod whose readiness probe fails.
    pub fn not_ready(ip: impl Into<IpAddr>, node_name: &str) -> Self {
        Self {
            ready: false,
            serving: false,
            ..Self::ready(ip, node_name)
        }
    }

    /// A pod being deleted; `serving` tells whether it still passes its readiness probe.
    /// (Terminating endpoints are never `ready`.)
    pub fn terminating(ip: impl Into<IpAddr>, node_name: &str, serving: bool) -> Self {
        Self {
            ready: false,
            serving,
            terminating: true,
            ..Self::ready(ip, node_name)
        }
    }
}

/// A discovery.k8s.io/v1 EndpointSlice of IPv4 endpoints (or IPv6 ones:
/// [`EndpointSliceManifest::address_type`]) for one Service.
#[derive(Clone, Debug)]
pub struct EndpointSliceManifest {
    name: String,
    namespace: String,
    service: String,
    address_type: IpFamily,
    ports: Vec<(String, u16, Protocol)>,
    endpoints: Vec<Endpoint>,
}

impl EndpointSliceManifest {
    /// A slice named `<service>-1` (the controller would add a random suffix) in `default`.
    pub fn new(service: &str) -> Self {
        Self {
            name: format!("{service}-1"),
            namespace: "default".to_owned(),
            service: service.to_owned(),
            address_type: IpFamily::IPv4,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }

    /// Another slice of the same Service needs another name.
    pub fn name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    /// The family of every endpoint's address (IPv4 unless set). A dual-stack Service has a
    /// slice per family, under different names ([`EndpointSliceManifest::name`]).
    pub fn address_type(mut self, family: IpFamily) -> Self {
        self.address_type = family;
        self
    }

    /// A port, named as the Service port it serves (empty for an unnamed one).
    pub fn port(mut self, name: &str, port: u16, protocol: Protocol) -> Self {
        self.ports.push((name.to_owned(), port, protocol));
        self
    }

    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        y.push_str("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n");
        metadata(
            &mut y,
            &self.name,
            Some(&self.namespace),
            &[
                (
                    "endpointslice.kubernetes.io/managed-by",
                    "endpointslice-controller.k8s.io",
                ),
                ("kubernetes.io/service-name", &self.service),
            ],
        );
        line(&mut y, 0, "addressType", self.address_type.as_str());
        if self.ports.is_empty() {
            y.push_str("ports: []\n");
        } else {
            y.push_str("ports:\n");
        }
        for (name, port, protocol) in &self.ports {
            // The controller always writes the name, "" for an unnamed port.
            let _ = writeln!(
                y,
                "- name: {}\n  port: {port}\n  protocol: {}",
                scalar(name),
                protocol.as_str()
            );
        }
        if self.endpoints.is_empty() {
            y.push_str("endpoints: []\n");
        } else {
            y.push_str("endpoints:\n");
        }
        for e in &self.endpoints {
            let _ = writeln!(
                y,
                "- addresses:\n  - {}\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: {}\n  nodeName: {}",
                ip_scalar(e.ip),
                e.ready,
                e.serving,
                e.terminating,
                scalar(&e.node_name)
            );
        }
        y
    }
}

/// An EndpointSlice for `service` in `namespace` in one call: `ports` are (name, port,
/// protocol).
pub fn endpoint_slice_yaml(
    service: &str,
    namespace: &str,
    ports: &[(&str, u16, Protocol)],
    endpoints: &[Endpoint],
) -> String {
    let slice = EndpointSliceManifest::new(service).namespace(namespace);
    let slice = ports.iter().fold(slice, |s, &(name, port, protocol)| {
        s.port(name, port, protocol)
    });
    endpoints
        .iter()
        .fold(slice, |s, e| s.endpoint(e.clone()))
        .yaml()
}

/// A v1 Node with its InternalIP (the address the agent serves NodePorts on and SNATs to) and,
/// optionally, its pod CIDR; a dual-stack node has an InternalIP and a pod CIDR of each family.
#[derive(Clone, Debug)]
pub struct NodeManifest {
    name: String,
    /// The first is kube-proxy's node IP.
    internal_ips: Vec<IpAddr>,
    /// `podCIDRs`; the first is `podCIDR`.
    pod_cidrs: Vec<String>,
}

impl NodeManifest {
    pub fn new(name: &str, internal_ip: Ipv4Addr) -> Self {
        Self {
            name: name.to_owned(),
            internal_ips: vec![internal_ip.into()],
            pod_cidrs: Vec::new(),
        }
    }

    /// Another InternalIP, after those given (a dual-stack node's IPv6 one).
    pub fn internal_ip(mut self, ip: impl Into<IpAddr>) -> Self {
        self.internal_ips.push(ip.into());
        self
    }

    /// A pod CIDR, after those given: the first is `podCIDR`, all are `podCIDRs`.
    pub fn pod_cidr(mut self, cidr: &str) -> Self {
        self.pod_cidrs.push(cidr.to_owned());
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        y.push_str("apiVersion: v1\nkind: Node\n");
        metadata(
            &mut y,
            &self.name,
            None,
            &[
                ("kubernetes.io/hostname", &self.name),
                ("kubernetes.io/os", "linux"),
            ],
        );
        if let Some(cidr) = self.pod_cidrs.first() {
            y.push_str("spec:\n");
            line(&mut y, 1, "podCIDR", scalar(cidr));
            list(
                &mut y,
                1,
                "podCIDRs",
                self.pod_cidrs.iter().map(|c| scalar(c)),
            );
        }
        y.push_str("status:\n  addresses:\n");
        for ip in &self.internal_ips {
            let _ = writeln!(y, "  - address: {}\n    type: InternalIP", ip_scalar(*ip));
        }
        let _ = writeln!(y, "  - address: {}\n    type: Hostname", scalar(&self.name));
        y
    }
}

/// A v1 Node named `name` whose InternalIP is `internal_ip`.
pub fn node_yaml(name: &str, internal_ip: Ipv4Addr) -> String {
    NodeManifest::new(name, internal_ip).yaml()
}

/// Joins objects into one multi-document YAML stream.
pub fn documents<S: AsRef<str>>(objects: impl IntoIterator<Item = S>) -> String {
    objects
        .into_iter()
        .map(|o| o.as_ref().trim_end().to_owned() + "\n")
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A multi-document YAML stream (as [`documents`] joins objects) as one JSON `List`: the
/// encoding the API server sends, for what reads it as a stand-in for one.
pub fn json_list(yaml: &str) -> Result<String, serde_saphyr::Error> {
    let mut items = Vec::new();
    let mut document = String::new();
    for line in yaml.lines().chain(["---"]) {
        if line.trim_end() == "---" {
            if !document.trim().is_empty() {
                items.push(serde_saphyr::from_str::<serde_json::Value>(&document)?);
            }
            document.clear();
        } else {
            document.push_str(line);
            document.push('\n');
        }
    }
    let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
    Ok(list.to_string())
}

fn metadata(y: &mut String, name: &str, namespace: Option<&str>, labels: &[(&str, &str)]) {
    y.push_str("metadata:\n");
    if !labels.is_empty() {
        y.push_str("  labels:\n");
        for (key, value) in labels {
            line(y, 2, key, scalar(value));
        }
    }
    line(y, 1, "name", scalar(name));
    if let Some(namespace) = namespace {
        line(y, 1, "namespace", scalar(namespace));
    }
}

/// `key: value` at `depth` (two spaces a level).
fn line(y: &mut String, depth: usize, key: &str, value: impl std::fmt::Display) {
    let _ = writeln!(y, "{:width$}{key}: {value}", "", width = depth * 2);
}

/// A block list under `key` at `depth`, its items at the same indentation (as kubectl writes).
fn list<T: std::fmt::Display>(
    y: &mut String,
    depth: usize,
    key: &str,
    items: impl IntoIterator<Item = T>,
) {
    let _ = writeln!(y, "{:width$}{key}:", "", width = depth * 2);
    for item in items {
        let _ = writeln!(y, "{:width$}- {item}", "", width = depth * 2);
    }
}

/// An address as a YAML scalar: IPv4 plain, IPv6 quoted (a plain scalar with colons can be
/// misread, e.g. as YAML 1.1's base-60 numbers).
fn ip_scalar(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"{v6}\""),
    }
}

/// A string as a YAML scalar: plain when it cannot be read as anything but that string (names,
/// label values, CIDRs), otherwise double-quoted (JSON string syntax is valid YAML).
fn scalar(s: &str) -> String {
    let plain_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
    let starts_safely = s.starts_with(|c: char| c.is_ascii_alphabetic());
    let reserved = matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "nan" | "inf"
    );
    if plain_chars && starts_safely && !reserved {
        return s.to_owned();
    }
    let mut quoted = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04x}", u32::from(c));
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests;
