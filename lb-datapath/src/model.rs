//! The desired state of the datapath, as plain data: what the translation of Kubernetes objects
//! produces and what the planner turns into map writes. No I/O here.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::Deref,
    sync::Arc,
};

use ipnet::Ipv4Net;
pub use lb_common::maps::{FrontendKey, FrontendKey6};
use lb_common::{Be16, Be128, maps::scope, net::proto};

/// An address family: which of the datapath's maps (`LB_*` or `LB6_*`) hold what concerns an
/// address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// A frontend of either address family, by its key in its family's map (`LB_SERVICES`,
/// `LB6_SERVICES`): what the desired state and the planner name frontends by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnyFrontendKey {
    V4(FrontendKey),
    V6(FrontendKey6),
}

impl AnyFrontendKey {
    /// The key of a frontend on `addr:port`, protocol `proto`, in `scope`.
    pub fn new(addr: IpAddr, port: u16, proto: u8, scope: u8) -> Self {
        match addr {
            IpAddr::V4(v4) => Self::V4(FrontendKey::new(v4, port, proto, scope)),
            IpAddr::V6(v6) => Self::V6(FrontendKey6 {
                addr: Be128::from_ip(v6),
                port: Be16::from_host(port),
                proto,
                scope,
            }),
        }
    }

    pub fn addr(&self) -> IpAddr {
        match self {
            Self::V4(k) => k.addr.to_ip().into(),
            Self::V6(k) => k.addr.to_ip().into(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Self::V4(k) => k.port.to_host(),
            Self::V6(k) => k.port.to_host(),
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            Self::V4(k) => k.proto,
            Self::V6(k) => k.proto,
        }
    }

    pub fn scope(&self) -> u8 {
        match self {
            Self::V4(k) => k.scope,
            Self::V6(k) => k.scope,
        }
    }

    pub fn family(&self) -> Family {
        match self {
            Self::V4(_) => Family::V4,
            Self::V6(_) => Family::V6,
        }
    }
}

impl From<FrontendKey> for AnyFrontendKey {
    fn from(key: FrontendKey) -> Self {
        Self::V4(key)
    }
}

impl From<FrontendKey6> for AnyFrontendKey {
    fn from(key: FrontendKey6) -> Self {
        Self::V6(key)
    }
}

/// `10.96.0.1:80/TCP internal`, `[fd00::1]:80/TCP internal`, as logs and errors name a
/// frontend.
impl fmt::Display for AnyFrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scope = if self.scope() == scope::EXTERNAL {
            "external"
        } else {
            "internal"
        };
        write!(
            f,
            "{}/{} {scope}",
            SocketAddr::new(self.addr(), self.port()),
            proto::name(self.proto())
        )
    }
}

/// Which endpoints of a service port a backend set holds (kube-proxy's "cluster" and "local"
/// endpoint categories).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// Every usable endpoint: the ready ones, or, when none is ready anywhere, the serving
    /// terminating ones.
    Cluster,
    /// This node's usable endpoints: the ready local ones, or, when none is, the serving
    /// terminating local ones.
    Local,
}

/// Names a backend set: one port of one Service, and which of its endpoints. A shared handle:
/// the desired state, the planner's shadow and the metrics all name the same sets, and a clone
/// costs a reference count rather than three strings.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetName(Arc<SetNameParts>);

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetNameParts {
    pub namespace: String,
    pub service: String,
    /// The service port's name ("" for a single unnamed port).
    pub port_name: String,
    pub proto: u8,
    pub kind: SetKind,
    /// A dual-stack Service port has a set per family (an EndpointSlice has one address type).
    pub family: Family,
}

impl SetName {
    /// The name of an IPv4 set (see [`SetName::in_family`]).
    pub fn new(
        namespace: impl Into<String>,
        service: impl Into<String>,
        port_name: impl Into<String>,
        proto: u8,
        kind: SetKind,
    ) -> Self {
        Self(Arc::new(SetNameParts {
            namespace: namespace.into(),
            service: service.into(),
            port_name: port_name.into(),
            proto,
            kind,
            family: Family::V4,
        }))
    }

    /// The same set's name in `family`.
    pub fn in_family(self, family: Family) -> Self {
        if self.family == family {
            return self;
        }
        let mut parts = Arc::unwrap_or_clone(self.0);
        parts.family = family;
        Self(Arc::new(parts))
    }
}

impl SetName {
    /// The other set of the same Service port (Cluster for Local and the reverse).
    pub fn sibling(&self) -> Self {
        let kind = match self.kind {
            SetKind::Cluster => SetKind::Local,
            SetKind::Local => SetKind::Cluster,
        };
        Self::new(
            self.namespace.as_str(),
            self.service.as_str(),
            self.port_name.as_str(),
            self.proto,
            kind,
        )
        .in_family(self.family)
    }
}

impl Deref for SetName {
    type Target = SetNameParts;

    fn deref(&self) -> &SetNameParts {
        &self.0
    }
}

impl fmt::Display for SetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            SetKind::Cluster => "cluster",
            SetKind::Local => "local",
        };
        let family = match self.family {
            Family::V4 => "",
            Family::V6 => " IPv6",
        };
        write!(
            f,
            "{}/{}:{}/{}{family} ({kind})",
            self.namespace,
            self.service,
            self.port_name,
            proto::name(self.proto)
        )
    }
}

/// The endpoints of a backend set, sorted by address. Shared, not copied, between a service's
/// translation, the desired state and the planner's shadow of the maps.
pub type Members = Arc<[DesiredBackend]>;

/// One endpoint of a backend set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DesiredBackend {
    /// Of the family of its set's frontends (an EndpointSlice has one address type).
    pub addr: SocketAddr,
    /// Runs on this node.
    pub local: bool,
    /// 1: takes new flows. 0: still an endpoint (terminating, not ready) but chosen for no new
    /// flow; its established flows keep it.
    pub weight: u32,
    /// Serving (ready, or terminating but still serving): its UDP flows stay on it. Once it
    /// stops serving (or leaves the set), they are flushed so that their next datagram is
    /// balanced anew, as kube-proxy flushes UDP conntrack; TCP flows stay whatever happens.
    pub serving: bool,
}

impl DesiredBackend {
    pub const fn selectable(&self) -> bool {
        self.weight > 0
    }
}

/// What kind of address a frontend answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

/// One frontend and how it behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub key: AnyFrontendKey,
    pub kind: FrontendKind,
    pub set: SetName,
    /// No usable endpoint here although the service has some elsewhere: drop, don't reject.
    pub drop_when_empty: bool,
    /// External TCP flows to other nodes' backends go by direct server return
    /// (`lb_common::dsr`) rather than source NAT.
    pub dsr: bool,
    /// An external address of a Service with externalTrafficPolicy Local: `--masquerade-all`
    /// leaves its flows their client (`lb_common::maps::frontend_flags::KEEPS_CLIENT`).
    pub keeps_client: bool,
    /// sessionAffinity ClientIP timeout; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges (plus the frontend address itself); empty allows everyone.
    pub source_ranges: Vec<Ipv4Net>,
}

/// The desired state of one Service: its backend sets and frontends. (Vectors, not maps: a
/// service has a handful of each, and the agent keeps one model per Service of the cluster.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceModel {
    pub sets: Vec<(SetName, Members)>,
    pub frontends: Vec<DesiredFrontend>,
    /// healthCheckNodePort and this node's ready endpoint count (externalTrafficPolicy Local).
    pub health_check: Option<HealthCheck>,
}

impl ServiceModel {
    /// The members of one of its sets.
    pub fn set(&self, name: &SetName) -> Option<&Members> {
        self.sets.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    pub local_ready_endpoints: usize,
}

/// The whole desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub sets: BTreeMap<SetName, Members>,
    pub frontends: BTreeMap<AnyFrontendKey, DesiredFrontend>,
    /// The address external flows to backends on other nodes are source-NATed to (the node's
    /// InternalIP).
    pub snat_addr: Option<Ipv4Addr>,
    /// The ports they are source-NATed to (`--snat-ports`); `None`: the default range,
    /// [`lb_common::maps::snat::PORT_MIN`] to [`lb_common::maps::snat::PORT_MAX`].
    pub snat_ports: Option<std::ops::RangeInclusive<u16>>,
    /// Every balanced flow is source-NATed to the node (`--masquerade-all`,
    /// [`lb_common::maps::node_flags::MASQUERADE_ALL`]).
    pub masquerade_all: bool,
    /// ClusterIPs reject flows from outside the cluster (`--external-cluster-ips=false`,
    /// [`lb_common::maps::node_flags::NO_EXTERNAL_CLUSTER_IPS`]); by default they serve them.
    pub no_external_cluster_ips: bool,
}

impl Desired {
    /// Addresses that carry frontends, with whether any of them is a ClusterIP.
    pub fn addrs(&self) -> BTreeMap<IpAddr, bool> {
        let mut addrs = BTreeMap::new();
        for f in self.frontends.values() {
            *addrs.entry(f.key.addr()).or_insert(false) |= f.kind == FrontendKind::ClusterIp;
        }
        addrs
    }
}
