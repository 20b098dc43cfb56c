//! Compact copies of the watched objects: only the fields the translation reads. A full
//! k8s-openapi EndpointSlice endpoint takes about 350 bytes before its strings; the agent keeps
//! every endpoint of the cluster, so it keeps these instead and drops the API objects as soon as
//! they arrive.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::addr;

use super::{
    FORWARDING_MODE_ANNOTATION, HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL,
};

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortObject {
    pub name: Option<String>,
    pub port: i32,
    pub protocol: Option<String>,
    pub node_port: Option<i32>,
}

/// One load-balancer ingress point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressObject {
    pub ip: Option<String>,
    pub ip_mode: Option<String>,
}

/// What the translation reads of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceObject {
    pub namespace: String,
    pub name: String,
    pub created: Option<String>,
    /// Labelled `service-proxy-name` or `headless`: kube-proxy leaves it alone.
    pub labelled_away: bool,
    pub has_spec: bool,
    /// Its `lb/forwarding-mode` annotation, as written.
    pub forwarding_mode: Option<String>,
    pub type_: Option<String>,
    pub cluster_ip: Option<String>,
    pub cluster_ips: Vec<String>,
    pub external_ips: Vec<String>,
    pub ports: Vec<PortObject>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub session_affinity: Option<String>,
    pub affinity_timeout_s: Option<i32>,
    pub load_balancer_source_ranges: Vec<String>,
    pub health_check_node_port: Option<i32>,
    pub lb_ingress: Vec<IngressObject>,
}

/// An endpoint's first address: kube-proxy uses only that one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointAddress {
    V4(Ipv4Addr),
    /// Boxed, as `Invalid`: IPv4 endpoints are the common case, and every endpoint of the cluster
    /// is kept.
    V6(Box<Ipv6Addr>),
    /// Not an IP address (reported by the translation, with the slice's name). Boxed twice so
    /// that the common case stays small.
    Invalid(Box<String>),
}

/// What the translation reads of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointObject {
    pub address: Option<EndpointAddress>,
    /// Shared between the endpoints of a node (see `Store`, which interns it).
    pub node_name: Option<Arc<str>>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    /// Topology hints set by the EndpointSlice controller (topology-aware routing,
    /// `trafficDistribution`); boxed because most endpoints have none.
    pub hints: Option<Box<Hints>>,
}

/// Where an endpoint should preferably be used from (`hints.forZones`, `hints.forNodes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortObject {
    pub name: Option<String>,
    pub port: Option<i32>,
    pub protocol: Option<String>,
}

/// What the translation reads of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceObject {
    pub namespace: String,
    pub name: String,
    /// Its `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub labelled_away: bool,
    pub address_type: String,
    pub ports: Vec<SlicePortObject>,
    pub endpoints: Vec<EndpointObject>,
}

fn labelled_away(labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
}

impl From<&Service> for ServiceObject {
    fn from(svc: &Service) -> Self {
        let meta = &svc.metadata;
        let mut out = Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0.to_string()),
            labelled_away: labelled_away(meta.labels.as_ref()),
            forwarding_mode: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(FORWARDING_MODE_ANNOTATION))
                .cloned(),
            ..Self::default()
        };
        if let Some(spec) = &svc.spec {
            out.has_spec = true;
            out.type_ = spec.type_.clone();
            out.cluster_ip = spec.cluster_ip.clone();
            out.cluster_ips = spec.cluster_ips.clone().unwrap_or_default();
            out.external_ips = spec.external_ips.clone().unwrap_or_default();
            out.ports = spec
                .ports
                .iter()
                .flatten()
                .map(|p| PortObject {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol.clone(),
                    node_port: p.node_port,
                })
                .collect();
            out.external_traffic_policy = spec.external_traffic_policy.clone();
            out.internal_traffic_policy = spec.internal_traffic_policy.clone();
            out.session_affinity = spec.session_affinity.clone();
            out.affinity_timeout_s = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            out.load_balancer_source_ranges =
                spec.load_balancer_source_ranges.clone().unwrap_or_default();
            out.health_check_node_port = spec.health_check_node_port;
        }
        out.lb_ingress = svc
            .status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|l| l.ingress.iter().flatten())
            .map(|i| IngressObject {
                ip: i.ip.clone(),
                ip_mode: i.ip_mode.clone(),
            })
            .collect();
        out
    }
}

impl From<&EndpointSlice> for SliceObject {
    fn from(slice: &EndpointSlice) -> Self {
        let meta = &slice.metadata;
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            service: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned(),
            labelled_away: labelled_away(meta.labels.as_ref()),
            address_type: slice.address_type.clone(),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| SlicePortObject {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol.clone(),
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .map(|ep| {
                    let c = ep.conditions.as_ref();
                    EndpointObject {
                        address: ep.addresses.first().map(|a| {
                            if let Some(ip) = addr::ipv4(a) {
                                EndpointAddress::V4(ip)
                            } else if let Ok(ip) = a.parse::<Ipv6Addr>() {
                                EndpointAddress::V6(Box::new(ip))
                            } else {
                                EndpointAddress::Invalid(Box::new(a.clone()))
                            }
                        }),
                        node_name: ep.node_name.as_deref().map(Into::into),
                        ready: c.and_then(|c| c.ready),
                        serving: c.and_then(|c| c.serving),
                        terminating: c.and_then(|c| c.terminating),
                        hints: ep.hints.as_ref().and_then(|h| {
                            let hints = Hints {
                                zones: h
                                    .for_zones
                                    .iter()
                                    .flatten()
                                    .map(|z| z.name.clone())
                                    .collect(),
                                nodes: h
                                    .for_nodes
                                    .iter()
                                    .flatten()
                                    .map(|n| n.name.clone())
                                    .collect(),
                            };
                            (hints != Hints::default()).then(|| Box::new(hints))
                        }),
                    }
                })
                .collect(),
        }
    }
}
