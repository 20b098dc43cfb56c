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

use std::{fmt::Write as _, net::Ipv4Addr};

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
    cluster_ip: Ipv4Addr,
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
    /// A ClusterIP Service in namespace `default`, with no ports yet.
    pub fn new(name: &str, cluster_ip: Ipv4Addr) -> Self {
        Self {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            service_type: ServiceType::ClusterIP,
            cluster_ip,
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
        line(&mut y, 1, "clusterIP", self.cluster_ip);
        list(&mut y, 1, "clusterIPs", [self.cluster_ip]);
        list(&mut y, 1, "ipFamilies", ["IPv4"]);
        line(&mut y, 1, "ipFamilyPolicy", "SingleStack");
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
    pub ip: Ipv4Addr,
    pub node_name: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Endpoint {
    /// A running, ready pod.
    pub fn ready(ip: Ipv4Addr, node_name: &str) -> Self {
        Self {
            ip,
            node_name: node_name.to_owned(),
            ready: true,
            serving: true,
            terminating: false,
        }
    }

    /// A pod whose readiness probe fails.
    pub fn not_ready(ip: Ipv4Addr, node_name: &str) -> Self {
        Self {
            ready: false,
            serving: false,
            ..Self::ready(ip, node_name)
        }
    }

    /// A pod being deleted; `serving` tells whether it still passes its readiness probe.
    /// (Terminating endpoints are never `ready`.)
    pub fn terminating(ip: Ipv4Addr, node_name: &str, serving: bool) -> Self {
        Self {
            ready: false,
            serving,
            terminating: true,
            ..Self::ready(ip, node_name)
        }
    }
}

/// A discovery.k8s.io/v1 EndpointSlice of IPv4 endpoints for one Service.
#[derive(Clone, Debug)]
pub struct EndpointSliceManifest {
    name: String,
    namespace: String,
    service: String,
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
        y.push_str("addressType: IPv4\n");
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
                e.ip,
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
/// optionally, its pod CIDR.
#[derive(Clone, Debug)]
pub struct NodeManifest {
    name: String,
    internal_ip: Ipv4Addr,
    pod_cidr: Option<String>,
}

impl NodeManifest {
    pub fn new(name: &str, internal_ip: Ipv4Addr) -> Self {
        Self {
            name: name.to_owned(),
            internal_ip,
            pod_cidr: None,
        }
    }

    pub fn pod_cidr(mut self, cidr: &str) -> Self {
        self.pod_cidr = Some(cidr.to_owned());
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
        if let Some(cidr) = &self.pod_cidr {
            y.push_str("spec:\n");
            line(&mut y, 1, "podCIDR", scalar(cidr));
            list(&mut y, 1, "podCIDRs", [scalar(cidr)]);
        }
        let _ = writeln!(
            y,
            "status:\n  addresses:\n  - address: {}\n    type: InternalIP\n  - address: {}\n    type: Hostname",
            self.internal_ip,
            scalar(&self.name)
        );
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
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{Node, Service},
            discovery::v1::EndpointSlice,
        },
        apimachinery::pkg::util::intstr::IntOrString,
    };

    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("does not parse: {e}\n---\n{yaml}"))
    }

    #[test]
    fn a_yaml_stream_becomes_one_json_list_of_its_objects() {
        let yaml = documents([
            ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
                .port(ServicePort::tcp("http", 80, 8080))
                .yaml(),
            EndpointSliceManifest::new("web").yaml(),
        ]);
        let list: serde_json::Value = serde_json::from_str(&json_list(&yaml).unwrap()).unwrap();
        assert_eq!(list["kind"], "List");
        let kinds: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["Service", "EndpointSlice"]);
        let svc: Service = serde_json::from_value(list["items"][0].clone()).unwrap();
        assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
    }

    #[test]
    fn cluster_ip_service_has_the_api_defaults() {
        let yaml = ServiceManifest::new("web", Ipv4Addr::new(10, 96, 0, 10))
            .port(ServicePort::tcp("http", 80, 8080))
            .port(ServicePort::udp("dns", 53, 5353))
            .yaml();
        let svc: Service = parse(&yaml);
        assert_eq!(svc.metadata.name.as_deref(), Some("web"));
        assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.cluster_ips, Some(vec!["10.96.0.10".to_owned()]));
        assert_eq!(spec.session_affinity.as_deref(), Some("None"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.external_traffic_policy, None);
        let ports = spec.ports.unwrap();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[0].port, 80);
        assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
        assert_eq!(ports[0].target_port, Some(IntOrString::Int(8080)));
        assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
        assert_eq!(ports[1].node_port, None);
    }

    #[test]
    fn load_balancer_service_carries_every_field() {
        let yaml = ServiceManifest::new("lb", Ipv4Addr::new(10, 96, 0, 20))
            .namespace("shop")
            .service_type(ServiceType::LoadBalancer)
            .port(ServicePort::tcp("http", 80, 8080).node_port(30080))
            .external_traffic_policy(TrafficPolicy::Local)
            .internal_traffic_policy(TrafficPolicy::Local)
            .health_check_node_port(31000)
            .external_ip(Ipv4Addr::new(203, 0, 113, 20))
            .source_range("192.168.50.2/32")
            .client_ip_affinity(60)
            .ingress_ip(Ipv4Addr::new(203, 0, 113, 10))
            .yaml();
        let svc: Service = parse(&yaml);
        assert_eq!(svc.metadata.namespace.as_deref(), Some("shop"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.ports.unwrap()[0].node_port, Some(30080));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.health_check_node_port, Some(31000));
        assert_eq!(spec.allocate_load_balancer_node_ports, Some(true));
        assert_eq!(spec.external_ips, Some(vec!["203.0.113.20".to_owned()]));
        assert_eq!(
            spec.load_balancer_source_ranges,
            Some(vec!["192.168.50.2/32".to_owned()])
        );
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        let timeout = spec
            .session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds);
        assert_eq!(timeout, Some(60));
        let ingress = svc.status.unwrap().load_balancer.unwrap().ingress.unwrap();
        assert_eq!(ingress.len(), 1);
        assert_eq!(ingress[0].ip.as_deref(), Some("203.0.113.10"));
        assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"));
    }

    #[test]
    fn node_port_service_without_ports_or_ingress() {
        let yaml = ServiceManifest::new("empty", Ipv4Addr::new(10, 96, 0, 30))
            .service_type(ServiceType::NodePort)
            .yaml();
        let svc: Service = parse(&yaml);
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.allocate_load_balancer_node_ports, None);
        assert_eq!(spec.ports, Some(vec![]));
        assert_eq!(svc.status.unwrap().load_balancer.unwrap().ingress, None);
    }

    #[test]
    fn endpoint_slice_with_conditions() {
        let yaml = endpoint_slice_yaml(
            "web",
            "shop",
            &[("http", 8080, Protocol::Tcp), ("", 53, Protocol::Udp)],
            &[
                Endpoint::ready(Ipv4Addr::new(10, 10, 0, 2), "node-0"),
                Endpoint::not_ready(Ipv4Addr::new(10, 10, 1, 2), "node-1"),
                Endpoint::terminating(Ipv4Addr::new(10, 10, 1, 3), "node-1", true),
            ],
        );
        let slice: EndpointSlice = parse(&yaml);
        assert_eq!(slice.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(slice.metadata.namespace.as_deref(), Some("shop"));
        let labels = slice.metadata.labels.unwrap();
        assert_eq!(
            labels.get("kubernetes.io/service-name").map(String::as_str),
            Some("web")
        );
        assert_eq!(slice.address_type, "IPv4");
        let ports = slice.ports.unwrap();
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[0].port, Some(8080));
        assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
        assert_eq!(ports[1].name.as_deref(), Some(""));
        let conditions: Vec<_> = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (
                    e.addresses.clone(),
                    e.node_name.clone().unwrap(),
                    c.ready,
                    c.serving,
                    c.terminating,
                )
            })
            .collect();
        let (t, f) = (Some(true), Some(false));
        assert_eq!(
            conditions,
            [
                (vec!["10.10.0.2".to_owned()], "node-0".to_owned(), t, t, f),
                (vec!["10.10.1.2".to_owned()], "node-1".to_owned(), f, f, f),
                (vec!["10.10.1.3".to_owned()], "node-1".to_owned(), f, t, t),
            ]
        );
    }

    #[test]
    fn empty_endpoint_slice() {
        let yaml = EndpointSliceManifest::new("none").name("none-abcde").yaml();
        let slice: EndpointSlice = parse(&yaml);
        assert_eq!(slice.metadata.name.as_deref(), Some("none-abcde"));
        assert!(slice.endpoints.is_empty());
        assert_eq!(slice.ports, Some(vec![]));
    }

    #[test]
    fn node_with_internal_ip_and_pod_cidr() {
        let node: Node = parse(&node_yaml("node-0", Ipv4Addr::new(192, 168, 50, 10)));
        assert_eq!(node.metadata.name.as_deref(), Some("node-0"));
        let addresses = node.status.unwrap().addresses.unwrap();
        assert_eq!(addresses[0].type_, "InternalIP");
        assert_eq!(addresses[0].address, "192.168.50.10");
        assert_eq!(addresses[1].type_, "Hostname");
        assert!(node.spec.is_none());

        let yaml = NodeManifest::new("node-1", Ipv4Addr::new(192, 168, 50, 11))
            .pod_cidr("10.10.1.0/24")
            .yaml();
        let node: Node = parse(&yaml);
        assert_eq!(node.spec.unwrap().pod_cidr.as_deref(), Some("10.10.1.0/24"));
    }

    #[test]
    fn documents_join_into_one_stream() {
        let stream = documents([
            node_yaml("node-0", Ipv4Addr::new(192, 168, 50, 10)),
            node_yaml("node-1", Ipv4Addr::new(192, 168, 50, 11)),
        ]);
        assert_eq!(stream.matches("\n---\n").count(), 1);
        let docs: Vec<Node> = stream.split("---\n").map(parse::<Node>).collect();
        assert_eq!(docs[1].metadata.name.as_deref(), Some("node-1"));
    }

    #[test]
    fn strings_that_yaml_would_misread_are_quoted() {
        assert_eq!(scalar("web"), "web");
        assert_eq!(scalar("10.0.0.0/8"), "\"10.0.0.0/8\"");
        assert_eq!(scalar(""), "\"\"");
        assert_eq!(scalar("on"), "\"on\"");
        assert_eq!(scalar("a: b"), "\"a: b\"");
        assert_eq!(scalar("say \"hi\""), "\"say \\\"hi\\\"\"");
        let svc: Service = parse(
            &ServiceManifest::new("true", Ipv4Addr::new(10, 96, 0, 1))
                .namespace("null")
                .yaml(),
        );
        assert_eq!(svc.metadata.name.as_deref(), Some("true"));
        assert_eq!(svc.metadata.namespace.as_deref(), Some("null"));
    }
}
