//! A Service port's endpoints, as kube-proxy reads them from the EndpointSlices
//! (`EndpointSliceCache`) and sorts them (`CategorizeEndpoints`, including topology).
//!
//! * A service port takes, from each slice of the address family asked for (`addressType`
//!   IPv4 or IPv6: a dual-stack Service has slices of both, and a set per family), the slice
//!   port of the same name (an unnamed slice port only for an unnamed service port) and
//!   protocol; its number is the resolved targetPort. An endpoint is its first address.
//! * An address listed by several slices is one endpoint: local if any slice says so (as
//!   kube-proxy favours the local reading), and, where the slices disagree on its conditions,
//!   the most available reading (kube-proxy keeps whichever slice its map yields first, which
//!   is not deterministic).
//! * Absent conditions: ready is true, serving is ready's value, terminating is false.
//! * The cluster set holds the ready endpoints available for this node's topology or, when none
//!   is ready anywhere, the serving terminating ones; the local set holds this node's ready
//!   endpoints or, when it has none, its serving terminating ones (topology never applies to it).
//! * Topology (hints set by the EndpointSlice controller for `topology-mode: Auto` and
//!   `trafficDistribution`): when every ready endpoint has node hints and one names this node,
//!   the endpoints hinted for this node (`PreferSameNode`); else when every ready endpoint has
//!   zone hints and one names this node's zone, those (`PreferClose`, `PreferSameZone`); else
//!   every endpoint. kube-proxy reads only the hints, not the Service's fields, and so do we.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use lb_datapath::model::{DesiredBackend, Family};

use crate::{
    node::NodeContext,
    source::{
        Kind, ObjectKey,
        objects::{EndpointAddress, EndpointObject, Hints, PortObject, SliceObject},
    },
    translate::{Problem, parse_proto, port_number},
};

/// An endpoint's state, with kube-proxy's defaults for absent conditions.
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

/// One endpoint of a service port.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub local: bool,
    condition: Condition,
    hints: Option<Hints>,
}

impl Endpoint {
    pub fn ready(&self) -> bool {
        self.condition.ready
    }
}

/// The endpoints of one service port in `family`, merged over the service's slices of that
/// family.
pub fn for_port(
    port: &PortObject,
    port_proto: u8,
    family: Family,
    slices: &[&SliceObject],
    node: &NodeContext,
    problems: &mut Vec<Problem>,
) -> Vec<Endpoint> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let address_type = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    let mut merged: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        let slice_key = || ObjectKey {
            kind: Kind::EndpointSlice,
            namespace: slice.namespace.clone(),
            name: slice.name.clone(),
        };
        if slice.address_type != address_type {
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
                    object: slice_key(),
                    reason,
                    error: true,
                });
                continue;
            }
        };
        for ep in &slice.endpoints {
            let ip = match (&ep.address, family) {
                (None, _) => continue,
                (Some(EndpointAddress::V4(ip)), Family::V4) => IpAddr::V4(*ip),
                (Some(EndpointAddress::V6(ip)), Family::V6) => IpAddr::V6(**ip),
                (Some(other), _) => {
                    let first = match other {
                        EndpointAddress::V4(ip) => ip.to_string(),
                        EndpointAddress::V6(ip) => ip.to_string(),
                        EndpointAddress::Invalid(text) => format!("{text:?}"),
                    };
                    problems.push(Problem {
                        object: slice_key(),
                        reason: format!(
                            "endpoint address {first} is not an {address_type} address"
                        ),
                        error: true,
                    });
                    continue;
                }
            };
            let addr = SocketAddr::new(ip, number);
            let found = Endpoint {
                addr,
                local: ep.node_name.as_deref().is_some_and(|n| *n == *node.name),
                condition: Condition::of(ep),
                hints: ep.hints.as_deref().cloned(),
            };
            merged
                .entry(addr)
                .and_modify(|e| {
                    e.condition = e.condition.merge(found.condition);
                    if found.local && !e.local {
                        e.local = true;
                        e.hints.clone_from(&found.hints);
                    }
                })
                .or_insert(found);
        }
    }
    merged.into_values().collect()
}

/// Keeps the endpoints on `port` only, for a protocol the datapath balances without rewriting
/// ports (SCTP: `lb_common::net::proto::rewrites_ports`), and returns the ports of those left
/// out (their resolved targetPort differs from the frontend's port).
pub fn keep_on_port(endpoints: &mut Vec<Endpoint>, port: u16) -> BTreeSet<u16> {
    let left_out = endpoints
        .iter()
        .map(|e| e.addr.port())
        .filter(|p| *p != port)
        .collect();
    endpoints.retain(|e| e.addr.port() == port);
    left_out
}

/// How the cluster set is narrowed by topology hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Everywhere,
    SameNode,
    SameZone,
}

/// kube-proxy's `topologyModeFromHints`, over the ready endpoints.
fn topology(endpoints: &[Endpoint], node: &NodeContext) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready()).collect();
    if ready.is_empty() {
        return Topology::Everywhere;
    }
    let all_have = |pick: fn(&Hints) -> &Vec<String>| {
        ready
            .iter()
            .all(|e| e.hints.as_ref().is_some_and(|h| !pick(h).is_empty()))
    };
    let any_names = |pick: fn(&Hints) -> &Vec<String>, name: &str| {
        ready.iter().any(|e| {
            e.hints
                .as_ref()
                .is_some_and(|h| pick(h).iter().any(|n| n == name))
        })
    };
    if all_have(|h| &h.nodes) && any_names(|h| &h.nodes, &node.name) {
        return Topology::SameNode;
    }
    let zone = node.zone.as_deref().unwrap_or_default();
    if all_have(|h| &h.zones) && any_names(|h| &h.zones, zone) {
        return Topology::SameZone;
    }
    Topology::Everywhere
}

fn available(ep: &Endpoint, topology: Topology, node: &NodeContext) -> bool {
    let hinted = |pick: fn(&Hints) -> &Vec<String>, name: &str| {
        ep.hints
            .as_ref()
            .is_some_and(|h| pick(h).iter().any(|n| n == name))
    };
    match topology {
        Topology::Everywhere => true,
        Topology::SameNode => hinted(|h| &h.nodes, &node.name),
        Topology::SameZone => hinted(|h| &h.zones, node.zone.as_deref().unwrap_or_default()),
    }
}

/// The endpoint sets of one service port.
pub struct Categories {
    pub cluster: Vec<DesiredBackend>,
    pub local: Vec<DesiredBackend>,
    /// Some endpoint anywhere takes new flows (else the frontends reject).
    pub any: bool,
}

/// kube-proxy's endpoint categories. Each set also lists, with weight 0, the endpoints of its
/// scope that take no new flows (not ready, terminating while ready ones exist, out of this
/// node's topology): their backend stays programmed so that their established connections
/// continue until the endpoint leaves its EndpointSlice.
pub fn categorize(endpoints: &[Endpoint], node: &NodeContext) -> Categories {
    let topology = topology(endpoints, node);
    let set = |members: Vec<&Endpoint>, topology: Topology| -> Vec<DesiredBackend> {
        let mut chosen: Vec<SocketAddr> = members
            .iter()
            .filter(|e| e.ready() && available(e, topology, node))
            .map(|e| e.addr)
            .collect();
        if chosen.is_empty() {
            chosen = members
                .iter()
                .filter(|e| e.condition.serving_terminating())
                .map(|e| e.addr)
                .collect();
        }
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
    let cluster = set(endpoints.iter().collect(), topology);
    let local = set(
        endpoints.iter().filter(|e| e.local).collect(),
        Topology::Everywhere,
    );
    let any = cluster.iter().any(DesiredBackend::selectable);
    Categories {
        cluster,
        local,
        any,
    }
}
