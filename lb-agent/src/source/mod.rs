//! Where the agent's Kubernetes objects come from: the API server (`kube`) or YAML files
//! (`files`). Both deliver the same stream of [`Update`]s; the agent keeps its own store.

pub mod files;
pub mod kube;
pub mod notify;
pub mod objects;
pub mod store;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// The kinds of objects the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Self; 3] = [Self::Service, Self::EndpointSlice, Self::Node];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }
}

/// Identity of an object: kind, namespace (empty for nodes) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

/// One watched object.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        let (kind, meta) = match self {
            Self::Service(o) => (Kind::Service, &o.metadata),
            Self::EndpointSlice(o) => (Kind::EndpointSlice, &o.metadata),
            Self::Node(o) => (Kind::Node, &o.metadata),
        };
        ObjectKey {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// What a source reports.
#[derive(Clone, Debug)]
pub enum Update {
    /// The source (re)starts listing `Kind`: objects of that kind not applied again before the
    /// matching [`Update::Listed`] no longer exist (a relist after 410 Gone, a restart).
    Listing(Kind),
    /// Every object of `Kind` has been applied since the matching [`Update::Listing`]. The agent
    /// is ready once every kind has been listed once.
    Listed(Kind),
    /// An object was added or changed.
    Applied(Object),
    /// An object was deleted.
    Deleted(ObjectKey),
    /// Something the source could not read (a malformed file, an object that does not decode):
    /// logged and counted by the agent, everything else keeps working. `key`: the object, when
    /// it has a name (an API object); the agent then keeps what it last read of it, even across
    /// a relist.
    Invalid {
        origin: String,
        reason: String,
        key: Option<ObjectKey>,
    },
}

/// The label kube-proxy uses to hand a Service to another proxy: services carrying it are not
/// ours.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label that marks a Service headless regardless of its clusterIP.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// A Service's annotation choosing how external flows to backends on other nodes are
/// forwarded: `snat` or `dsr` (`lb-agent --forwarding-mode` when absent).
pub const FORWARDING_MODE_ANNOTATION: &str = "lb/forwarding-mode";
/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// What kube-proxy asks the API server for (Services and EndpointSlices alike).
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
