//! The node the fuzz test runs on: services that reach every decision of the forward path
//! (ClusterIPs, a NodePort with backends here and on another node, one without backends and a
//! drop policy, a LoadBalancer IP with source ranges and session affinity, an external IP that
//! shares its backend with a ClusterIP), the node's SNAT and hairpin addresses, and the clients
//! and addresses frames come from and go to. All of it goes through the agent's planner and
//! writer ([`Harness::program`]).

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use lb_common::maps::{hairpin, scope};
use lb_datapath::program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec};

use super::super::harness::{Harness, SCTP, TCP, UDP};

pub const VIP_WEB: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);
pub const VIP_ONE: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 42);
pub const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 43);
/// This node: its NodePorts' address and its SNAT address.
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 5);
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 7);
pub const HAIRPIN: Ipv4Addr = Ipv4Addr::from_octets(hairpin::DEFAULT_ADDR);
/// A small SNAT range, so that flows to a backend on another node compete for ports.
pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61_000..=61_015;

/// Every address that carries a frontend (what the planner writes to LB_ADDRS).
pub const FRONTEND_ADDRS: [Ipv4Addr; 7] = [
    VIP_WEB,
    VIP_ONE,
    VIP_EMPTY,
    NODE,
    LB_IP,
    EXTERNAL_IP,
    HAIRPIN,
];

const fn pod(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, last)
}

/// Backends: pods on this node (10.0.1.0/24) and on another node (10.0.2.0/24).
pub const WEB_BACKENDS: [(SocketAddrV4, bool); 3] = [
    (SocketAddrV4::new(pod(5), 8080), true),
    (SocketAddrV4::new(pod(6), 8080), true),
    (SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 7), 8080), false),
];
const DNS_BACKENDS: [(SocketAddrV4, bool); 2] = [
    (SocketAddrV4::new(pod(5), 53), true),
    (SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 8), 53), false),
];
const ONE_BACKEND: (SocketAddrV4, bool) = (SocketAddrV4::new(pod(9), 8080), true);
const LB_BACKENDS: [(SocketAddrV4, bool); 2] = [
    (SocketAddrV4::new(pod(5), 8443), true),
    (SocketAddrV4::new(pod(6), 8443), true),
];

/// Every backend address: the only sources whose packets can be replies of a flow.
pub const BACKEND_ADDRS: [Ipv4Addr; 5] = [
    pod(5),
    pod(6),
    pod(9),
    Ipv4Addr::new(10, 0, 2, 7),
    Ipv4Addr::new(10, 0, 2, 8),
];

/// Pods on this node that open flows; two of them are backends (hairpin flows).
pub const POD_CLIENTS: [Ipv4Addr; 4] = [pod(2), pod(3), pod(5), pod(9)];
/// Clients outside the cluster: two within the LoadBalancer's source ranges, one not.
pub const EXTERNAL_CLIENTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(192, 168, 50, 2),
    Ipv4Addr::new(192, 168, 50, 3),
    Ipv4Addr::new(203, 0, 113, 9),
];
/// Few client ports, so that flows repeat (established flows, reopened flows, and one client port
/// to two frontends of the same backend).
pub const CLIENT_PORTS: [u16; 4] = [40_000, 40_001, 40_002, 33_333];
/// Addresses without a frontend, in and out of the cluster's ranges.
pub const OTHER_ADDRS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 0, 2, 9),
    Ipv4Addr::new(172, 30, 0, 99),
    Ipv4Addr::new(8, 8, 8, 8),
    Ipv4Addr::new(192, 168, 50, 11),
];
/// Routers that send ICMP errors about packets they could not forward.
pub const ROUTERS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(192, 168, 50, 1)];

fn frontend(addr: Ipv4Addr, port: u16, proto: u8, scope: u8, kind: FrontendKind) -> FrontendSpec {
    FrontendSpec {
        addr,
        port,
        proto,
        scope,
        kind,
    }
}

fn backends(list: &[(SocketAddrV4, bool)]) -> Vec<BackendSpec> {
    list.iter()
        .map(|&(addr, local)| BackendSpec {
            addr,
            local,
            weight: 1,
        })
        .collect()
}

fn service(name: &str, frontends: Vec<FrontendSpec>, list: &[(SocketAddrV4, bool)]) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        frontends,
        backends: backends(list),
        ..Default::default()
    }
}

/// `web` (VIP_WEB:80/TCP from pods and from outside) in one of its variants, which the test
/// switches between while flows are open: all three backends; one of them terminating
/// (established flows only); a single backend (no Maglev table); none (rejects).
pub fn web(variant: usize) -> ServiceSpec {
    let frontends = vec![
        frontend(VIP_WEB, 80, TCP, scope::INTERNAL, FrontendKind::ClusterIp),
        frontend(VIP_WEB, 80, TCP, scope::EXTERNAL, FrontendKind::ClusterIp),
    ];
    let mut svc = service("web", frontends, &WEB_BACKENDS);
    match variant % WEB_VARIANTS {
        0 => {}
        1 => svc.backends[2].weight = 0,
        2 => svc.backends.truncate(1),
        _ => svc.backends.clear(),
    }
    svc
}

pub const WEB_VARIANTS: usize = 4;

/// Every other service.
fn services() -> Vec<ServiceSpec> {
    use FrontendKind::*;
    use scope::{EXTERNAL, INTERNAL};
    let one_frontends = [TCP, UDP, SCTP]
        .into_iter()
        .flat_map(|p| {
            [
                frontend(VIP_ONE, 8080, p, INTERNAL, ClusterIp),
                frontend(EXTERNAL_IP, 8080, p, INTERNAL, ExternalIp),
                frontend(EXTERNAL_IP, 8080, p, EXTERNAL, ExternalIp),
            ]
        })
        .collect();
    let node_ports = [TCP, UDP, SCTP]
        .into_iter()
        .map(|p| frontend(NODE, 30_080, p, EXTERNAL, NodePort))
        .collect();
    let mut local_only = service(
        "local-only",
        vec![frontend(NODE, 30_081, TCP, EXTERNAL, NodePort)],
        &[],
    );
    local_only.drop_when_empty = true;
    let mut lb = service(
        "lb",
        vec![frontend(LB_IP, 443, TCP, EXTERNAL, LoadBalancer)],
        &LB_BACKENDS,
    );
    lb.source_ranges = vec![Ipv4Net::new(Ipv4Addr::new(192, 168, 50, 0), 24).unwrap()];
    // Long enough never to run out during a test: a timeout that expires between prediction
    // and run would make the two disagree.
    lb.affinity_timeout_s = 3600;
    vec![
        service(
            "dns",
            vec![frontend(VIP_WEB, 53, UDP, INTERNAL, ClusterIp)],
            &DNS_BACKENDS,
        ),
        service("one", one_frontends, &[ONE_BACKEND]),
        service(
            "empty",
            vec![
                frontend(VIP_EMPTY, 80, TCP, INTERNAL, ClusterIp),
                frontend(VIP_EMPTY, 81, UDP, INTERNAL, ClusterIp),
            ],
            &[],
        ),
        service("node-port", node_ports, &WEB_BACKENDS[1..]),
        local_only,
        lb,
    ]
}

/// Programs the node and every service into a fresh harness.
pub fn program(h: &mut Harness) {
    h.set_node(NODE, SNAT_PORTS);
    h.program(&web(0));
    for svc in services() {
        h.program(&svc);
    }
}

/// Every frontend as (address, port, protocol), for frames aimed at one.
pub fn frontends() -> Vec<(Ipv4Addr, u16, u8)> {
    std::iter::once(web(0))
        .chain(services())
        .flat_map(|svc| svc.frontends)
        .map(|f| (f.addr, f.port, f.proto))
        .collect()
}
