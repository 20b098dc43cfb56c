//! kube-proxy's own datapaths, as baselines: the rulesets its `iptables` and `nftables` modes
//! write for a set of Services, the smaller ones they write when one endpoint changes, and the
//! time the kernel tools take to load them in a network namespace of their own.
//!
//! What is mirrored is kube-proxy's `pkg/proxy/iptables/proxier.go` as of v1.33 (its rules for
//! these Services are unchanged since partial syncs came in 1.28) and `pkg/proxy/nftables/proxier.go`
//! of the 1.32/1.33 era (base chains `filter-prerouting` ... `filter-output-post-dnat`,
//! `cluster-ips-check`, element-level partial syncs; later releases split the filter chains into
//! `*-pre-dnat` ones and dropped the port from the ClusterIP masquerade rule), with knftables'
//! rendering of a transaction, for an IPv4
//! single-stack node with kube-proxy's defaults: masquerade bit 14, `--cluster-cidr` set (so the
//! local-traffic detector is the cluster CIDR), `localhostNodePorts` on, iptables'
//! `--random-fully` available, `nf_conntrack_tcp_be_liberal` off, `nodePortAddresses` empty (all
//! local addresses in iptables mode; the node's primary IP in nftables mode, whose default that
//! is) and a ServiceCIDR object for the Service range. Per mode, the doc of [`iptables`] and
//! [`nftables`] says what is left out.
//!
//! The model is deliberately small — ClusterIP and NodePort Services, TCP and UDP ports, ready
//! endpoints, `externalTrafficPolicy` Cluster or Local — so that the same objects can be given
//! to our agent as YAML ([`manifests`]) and both sides program the same thing.
//!
//! kube-proxy walks its Service map in Go's map order, i.e. at random; here Services are written
//! in the order of the slice given, so a benchmark can say where its measured Service sits
//! ([`arrange`]). That order matters for iptables (KUBE-SERVICES is a linear list), not for
//! nftables (one verdict-map lookup).

pub mod iptables;
pub mod measure;
pub mod nftables;

use std::{cmp::Ordering, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail, ensure};
pub use lb_testbed::manifests::Protocol as Proto;
use lb_testbed::manifests::{
    Endpoint, EndpointSliceManifest, ServiceManifest, ServicePort, ServiceType, TrafficPolicy,
    documents,
};

/// One port of a [`BenchService`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchPort {
    /// Empty for a Service's single unnamed port.
    pub name: String,
    pub protocol: Proto,
    pub port: u16,
    /// The endpoints' port (every endpoint serves every port, on its target port).
    pub target_port: u16,
    /// Set on the ports of a NodePort Service.
    pub node_port: Option<u16>,
}

impl BenchPort {
    pub fn new(name: &str, protocol: Proto, port: u16, target_port: u16) -> Self {
        Self {
            name: name.to_owned(),
            protocol,
            port,
            target_port,
            node_port: None,
        }
    }

    pub fn tcp(name: &str, port: u16, target_port: u16) -> Self {
        Self::new(name, Proto::Tcp, port, target_port)
    }

    pub fn udp(name: &str, port: u16, target_port: u16) -> Self {
        Self::new(name, Proto::Udp, port, target_port)
    }

    pub fn node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }

    /// `tcp` / `udp`, as kube-proxy writes protocols into rules and hashes them into names.
    pub fn proto(&self) -> &'static str {
        match self.protocol {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A Service with its ready endpoints. An endpoint is on this node when its address is in
/// [`NodeConfig::local_pod_cidr`] (what `externalTrafficPolicy: Local` selects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<BenchPort>,
    pub endpoints: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local` (only meaningful with node ports, as in the API).
    pub external_traffic_policy_local: bool,
}

impl BenchService {
    pub fn new(namespace: &str, name: &str, cluster_ip: Ipv4Addr) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            cluster_ip,
            ports: Vec::new(),
            endpoints: Vec::new(),
            external_traffic_policy_local: false,
        }
    }

    pub fn port(mut self, port: BenchPort) -> Self {
        self.ports.push(port);
        self
    }

    pub fn endpoint(mut self, ip: Ipv4Addr) -> Self {
        self.endpoints.push(ip);
        self
    }

    pub fn endpoints(mut self, ips: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        self.endpoints.extend(ips);
        self
    }

    pub fn external_traffic_policy_local(mut self) -> Self {
        self.external_traffic_policy_local = true;
        self
    }

    /// kube-proxy's `ServicePortName.String()`: `ns/name:port`, or `ns/name` for an unnamed port.
    pub fn port_name(&self, port: &BenchPort) -> String {
        if port.name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, port.name)
        }
    }
}

/// The node kube-proxy runs on, and the flags that shape its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_name: String,
    /// The node's primary IP (nftables mode accepts NodePorts on it only).
    pub node_ip: Ipv4Addr,
    /// `--cluster-cidr`: traffic from outside it to a ClusterIP is masqueraded, and ETP-Local
    /// Services short-circuit traffic from inside it.
    pub cluster_cidr: String,
    /// This node's pod range: endpoints in it are local.
    pub local_pod_cidr: String,
    /// The ServiceCIDR (nftables mode drops traffic to its unallocated addresses).
    pub service_cidr: String,
    /// `--masquerade-bit` (14: mark 0x4000).
    pub masquerade_bit: u8,
    /// `--iptables-localhost-nodeports` (iptables mode only).
    pub localhost_node_ports: bool,
    /// Whether `iptables` supports `MASQUERADE --random-fully` (every iptables since 1.6.2).
    pub random_fully: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_name: "node-0".to_owned(),
            node_ip: Ipv4Addr::new(192, 168, 50, 10),
            cluster_cidr: "10.10.0.0/16".to_owned(),
            local_pod_cidr: "10.10.0.0/24".to_owned(),
            service_cidr: "10.96.0.0/12".to_owned(),
            masquerade_bit: 14,
            localhost_node_ports: true,
            random_fully: true,
        }
    }
}

impl NodeConfig {
    /// The masquerade mark as kube-proxy formats it (Go's `%#08x`: `0x00004000`).
    pub fn masquerade_mark(&self) -> String {
        format!("0x{:08x}", 1u32 << self.masquerade_bit)
    }

    fn is_local(&self, ip: Ipv4Addr) -> bool {
        Cidr::parse(&self.local_pod_cidr).is_ok_and(|c| c.contains(ip))
    }

    fn check(&self) -> Result<()> {
        for cidr in [&self.cluster_cidr, &self.local_pod_cidr, &self.service_cidr] {
            Cidr::parse(cidr)?;
        }
        ensure!(self.masquerade_bit < 32, "masquerade bit out of range");
        Ok(())
    }
}

/// Where the measured Service goes among the fillers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Position {
    First,
    #[default]
    Middle,
    Last,
}

impl Position {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Middle => "middle",
            Self::Last => "last",
        }
    }

    /// The measured Service's index among `fillers + 1` Services.
    pub fn index(self, fillers: usize) -> usize {
        match self {
            Self::First => 0,
            Self::Middle => fillers / 2,
            Self::Last => fillers,
        }
    }
}

/// `measured` placed among `fillers` at `position` (the Services' write order, standing for
/// kube-proxy's random map order). Its index is `position.index(fillers.len())`.
pub fn arrange(
    measured: BenchService,
    mut fillers: Vec<BenchService>,
    position: Position,
) -> Vec<BenchService> {
    let at = position.index(fillers.len());
    fillers.insert(at, measured);
    fillers
}

/// How [`fillers_with`] makes its Services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FillerSpec {
    pub namespace: String,
    /// Endpoints per Service (at most 16: each Service gets its own block of 16 addresses).
    pub endpoints: usize,
    pub port: u16,
    pub target_port: u16,
    /// Filler `i` gets ClusterIP `cluster_ip_base + i`.
    pub cluster_ip_base: Ipv4Addr,
    /// Filler `i`'s endpoint `e` is `endpoint_base + 16 i + e`.
    pub endpoint_base: Ipv4Addr,
}

impl Default for FillerSpec {
    fn default() -> Self {
        Self {
            namespace: "bench".to_owned(),
            endpoints: 1,
            port: 80,
            target_port: 8080,
            // Inside the default ServiceCIDR (10.96.0.0/12), clear of 10.96.0.0/16 for the
            // Services a test or benchmark names itself; room for 786,432 fillers.
            cluster_ip_base: Ipv4Addr::new(10, 100, 0, 0),
            // Pods on other nodes (outside the default node's pod range).
            endpoint_base: Ipv4Addr::new(10, 128, 0, 0),
        }
    }
}

/// `n` ClusterIP Services `bench/svc-<i>` with one TCP port `http` 80 -> 8080, distinct ClusterIPs
/// and `endpoints` endpoints each (1 is kube-proxy's common case; see [`FillerSpec`]).
pub fn fillers(n: usize, endpoints: usize) -> Vec<BenchService> {
    fillers_with(
        n,
        &FillerSpec {
            endpoints,
            ..FillerSpec::default()
        },
    )
}

pub fn fillers_with(n: usize, spec: &FillerSpec) -> Vec<BenchService> {
    assert!(spec.endpoints <= 16, "at most 16 endpoints per filler");
    let ip_base = u32::from(spec.cluster_ip_base);
    let ep_base = u32::from(spec.endpoint_base);
    (0..n as u32)
        .map(|i| {
            BenchService::new(
                &spec.namespace,
                &format!("svc-{i}"),
                Ipv4Addr::from(ip_base + i),
            )
            .port(BenchPort::tcp("http", spec.port, spec.target_port))
            .endpoints((0..spec.endpoints as u32).map(|e| Ipv4Addr::from(ep_base + i * 16 + e)))
        })
        .collect()
}

/// Every endpoint of every port: what kube-proxy counts to decide "large cluster mode".
pub fn total_endpoints(services: &[BenchService]) -> usize {
    services
        .iter()
        .map(|s| s.ports.len() * s.endpoints.len())
        .sum()
}

/// The same Services as Kubernetes objects (a Service and an EndpointSlice each, as the API
/// server serves them), for our agent's YAML source. Local endpoints get `cfg.node_name` as
/// their node, the others `<node_name>-remote`.
pub fn manifests(services: &[BenchService], cfg: &NodeConfig) -> String {
    let remote = format!("{}-remote", cfg.node_name);
    let mut objects = Vec::with_capacity(services.len() * 2);
    for svc in services {
        let external = svc.ports.iter().any(|p| p.node_port.is_some());
        let mut service = ServiceManifest::new(&svc.name, svc.cluster_ip)
            .namespace(&svc.namespace)
            .service_type(if external {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIP
            });
        if svc.external_traffic_policy_local {
            service = service.external_traffic_policy(TrafficPolicy::Local);
        }
        let mut slice = EndpointSliceManifest::new(&svc.name).namespace(&svc.namespace);
        for port in &svc.ports {
            let mut p = ServicePort::new(&port.name, port.port, port.protocol, port.target_port);
            if let Some(np) = port.node_port {
                p = p.node_port(np);
            }
            service = service.port(p);
            slice = slice.port(&port.name, port.target_port, port.protocol);
        }
        for &ip in &svc.endpoints {
            let node = if cfg.is_local(ip) {
                &cfg.node_name
            } else {
                &remote
            };
            slice = slice.endpoint(Endpoint::ready(ip, node));
        }
        objects.push(service.yaml());
        objects.push(slice.yaml());
    }
    documents(objects)
}

/// `services` with one endpoint of `services[index]` added (`add`) or removed: the change
/// [`measure::one_endpoint_change`] times. The added endpoint is the first free address after
/// the Service's highest endpoint.
pub fn with_endpoint_change(
    services: &[BenchService],
    index: usize,
    change: EndpointChange,
) -> Result<Vec<BenchService>> {
    let mut after = services.to_vec();
    let svc = after
        .get_mut(index)
        .with_context(|| format!("no service at index {index}"))?;
    match change {
        EndpointChange::Add(ip) => {
            ensure!(!svc.endpoints.contains(&ip), "{ip} is already an endpoint");
            svc.endpoints.push(ip);
        }
        EndpointChange::Remove(ip) => {
            let before = svc.endpoints.len();
            svc.endpoints.retain(|e| *e != ip);
            if svc.endpoints.len() == before {
                bail!("{ip} is not an endpoint of {}/{}", svc.namespace, svc.name);
            }
        }
    }
    Ok(after)
}

/// One endpoint added to or removed from a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointChange {
    Add(Ipv4Addr),
    Remove(Ipv4Addr),
}

/// The Services (by namespace/name) that differ between `before` and `after`, or exist in one
/// only: kube-proxy's `UpdatedServices` for a partial sync.
fn updated_services<'a>(
    before: &'a [BenchService],
    after: &'a [BenchService],
) -> Vec<(&'a str, &'a str)> {
    use std::collections::HashMap;
    let index: HashMap<(&str, &str), &BenchService> = before
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
        .collect();
    let mut updated = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for s in after {
        let key = (s.namespace.as_str(), s.name.as_str());
        seen.insert(key);
        match index.get(&key) {
            Some(old) if *old == s => {}
            _ => updated.push(key),
        }
    }
    for s in before {
        let key = (s.namespace.as_str(), s.name.as_str());
        if !seen.contains(&key) {
            updated.push(key);
        }
    }
    updated
}

/// An IPv4 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cidr {
    net: u32,
    mask: u32,
}

impl Cidr {
    pub(crate) fn parse(s: &str) -> Result<Self> {
        let (ip, len) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not a CIDR"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .with_context(|| format!("bad address in {s:?}"))?;
        let len: u32 = len
            .parse()
            .with_context(|| format!("bad length in {s:?}"))?;
        ensure!(len <= 32, "bad length in {s:?}");
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Self {
            net: u32::from(ip) & mask,
            mask,
        })
    }

    pub(crate) fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask == self.net
    }
}

/// One endpoint of one Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ep {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl Ep {
    /// `ip:port`, kube-proxy's `BaseEndpointInfo.String()`.
    pub fn string(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// What kube-proxy derives for one Service port before writing its rules
/// (`proxy.CategorizeEndpoints` and the traffic-policy flags of `syncProxyRules`), for ready
/// endpoints without topology hints and `internalTrafficPolicy: Cluster`.
pub(crate) struct PortPlan<'a> {
    pub svc: &'a BenchService,
    pub port: &'a BenchPort,
    /// `ns/name:port`.
    pub name: String,
    pub proto: &'static str,
    /// Every endpoint, sorted as kube-proxy's EndpointsMap keeps them (by `ip:port` text).
    /// With ready endpoints only, this is both the Cluster-policy set and every endpoint
    /// reachable from the node.
    pub endpoints: Vec<Ep>,
    /// The local endpoints, when the port uses Local policy (else empty).
    pub local: Vec<Ep>,
    /// Has a node port (kube-proxy's `ExternallyAccessible`).
    pub external: bool,
    /// `ExternalPolicyLocal`.
    pub etp_local: bool,
}

impl<'a> PortPlan<'a> {
    pub fn new(svc: &'a BenchService, port: &'a BenchPort, cfg: &NodeConfig) -> Self {
        let mut endpoints: Vec<Ep> = svc
            .endpoints
            .iter()
            .map(|&ip| Ep {
                ip,
                port: port.target_port,
            })
            .collect();
        endpoints.sort_by(|a, b| cmp_text(&a.string(), &b.string()));
        endpoints.dedup();
        let external = port.node_port.is_some();
        let etp_local = external && svc.external_traffic_policy_local;
        let local = if etp_local {
            endpoints
                .iter()
                .copied()
                .filter(|e| cfg.is_local(e.ip))
                .collect()
        } else {
            Vec::new()
        };
        Self {
            svc,
            port,
            name: svc.port_name(port),
            proto: port.proto(),
            endpoints,
            local,
            external,
            etp_local,
        }
    }

    pub fn has_endpoints(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// Traffic from outside has endpoints to go to (for ETP Local: local ones).
    pub fn has_external_endpoints(&self) -> bool {
        if self.etp_local {
            !self.local.is_empty()
        } else {
            self.has_endpoints()
        }
    }

    pub fn uses_external_chain(&self) -> bool {
        self.has_endpoints() && self.external
    }

    pub fn uses_local_chain(&self) -> bool {
        self.etp_local && !self.local.is_empty()
    }
}

fn cmp_text(a: &str, b: &str) -> Ordering {
    a.as_bytes().cmp(b.as_bytes())
}

/// Every Service port of `services`, in order.
pub(crate) fn plans<'a>(
    services: &'a [BenchService],
    cfg: &'a NodeConfig,
) -> impl Iterator<Item = PortPlan<'a>> + 'a {
    services
        .iter()
        .flat_map(move |svc| svc.ports.iter().map(move |p| PortPlan::new(svc, p, cfg)))
}

/// base32 (RFC 4648, padded, upper case) of SHA-256, as Go's `base32.StdEncoding`.
pub(crate) fn sha256_base32(text: &str) -> String {
    use sha2::Digest as _;
    data_encoding::BASE32.encode(&sha2::Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        let c = Cidr::parse("10.10.0.0/24").unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 10, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 10, 1, 2)));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains(Ipv4Addr::BROADCAST)
        );
        assert!(Cidr::parse("10.0.0.0").is_err());
    }

    #[test]
    fn endpoints_sort_as_text() {
        let svc = BenchService::new("ns", "s", Ipv4Addr::new(10, 96, 0, 1))
            .port(BenchPort::tcp("p", 80, 80))
            .endpoint(Ipv4Addr::new(10, 0, 0, 9))
            .endpoint(Ipv4Addr::new(10, 0, 0, 10));
        let cfg = NodeConfig::default();
        let plan = PortPlan::new(&svc, &svc.ports[0], &cfg);
        let order: Vec<_> = plan.endpoints.iter().map(Ep::string).collect();
        assert_eq!(order, ["10.0.0.10:80", "10.0.0.9:80"]);
    }

    #[test]
    fn fillers_are_distinct_and_arranged() {
        let f = fillers(5, 2);
        assert_eq!(f[4].cluster_ip, Ipv4Addr::new(10, 100, 0, 4));
        assert_eq!(
            f[1].endpoints,
            [Ipv4Addr::new(10, 128, 0, 16), Ipv4Addr::new(10, 128, 0, 17)]
        );
        let m = BenchService::new("ns", "measured", Ipv4Addr::new(10, 96, 0, 10));
        for (pos, at) in [
            (Position::First, 0),
            (Position::Middle, 2),
            (Position::Last, 5),
        ] {
            let all = arrange(m.clone(), f.clone(), pos);
            assert_eq!(all[at].name, "measured");
            assert_eq!(pos.index(5), at);
        }
    }

    #[test]
    fn manifests_parse_shape() {
        let svc = BenchService::new("web", "front", Ipv4Addr::new(10, 96, 0, 10))
            .port(BenchPort::tcp("http", 80, 8080).node_port(30080))
            .endpoint(Ipv4Addr::new(10, 10, 0, 2))
            .endpoint(Ipv4Addr::new(10, 10, 1, 2))
            .external_traffic_policy_local();
        let y = manifests(&[svc], &NodeConfig::default());
        assert!(y.contains("type: NodePort"));
        assert!(y.contains("nodePort: 30080"));
        assert!(y.contains("externalTrafficPolicy: Local"));
        assert!(y.contains("nodeName: node-0\n"));
        assert!(y.contains("nodeName: node-0-remote"));
        assert_eq!(y.matches("\n---\n").count(), 1);
    }
}
