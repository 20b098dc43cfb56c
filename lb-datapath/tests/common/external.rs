//! The external path's test bed: a network namespace with an uplink, routes and neighbours for
//! the programs' FIB lookups, a NodePort service builder, and the packets of external clients,
//! this node and the other node's pods (`datapath_external`, `datapath_external_nat`).

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    conntrack::{FORWARD, FlowKey, REPLY, ct_flags},
    maps::scope,
};
use lb_datapath::{
    predict::flow_key,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec},
};
use lb_testbed::{Netns, netns::unique_prefix};

use super::{
    harness::{Harness, Hook, TCP, harness, xdp},
    packet::{Packet, flags},
};

/// This node's address on its uplink (the SNAT address), and the NodePort.
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
pub const NODE_PORT: u16 = 30_080;
/// Another node, the next hop to its pods (10.10.1.0/24).
pub const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
pub const OTHER_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
pub const REMOTE_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 10, 1, 5), 8080);
pub const REMOTE_POD_2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 10, 1, 6), 8080);
/// A pod on this node.
pub const LOCAL_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 5), 8080);
/// The external client, on the uplink's subnet.
pub const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 2), 40_000);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
/// The hairpin address the planner always programs (`lb_common::maps::hairpin::DEFAULT_ADDR`).
pub const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

pub fn node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE, NODE_PORT)
}

/// A namespace whose routing table the programs' FIB lookups see: an uplink `up0` with this
/// node's address, the other node's pods behind `OTHER_NODE`, permanent neighbours.
pub fn routed_namespace() -> Netns {
    let ns = Netns::new(unique_prefix("dpx")).expect("namespace");
    let ip = |args: &[&str]| ns.ip(args).unwrap_or_else(|e| panic!("{e:#}"));
    // A veth pair stands for the uplink (this kernel has no dummy interfaces).
    ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up0p"]);
    ip(&["link", "set", "up0p", "up"]);
    ip(&["link", "set", "up0", "address", "02:00:00:00:00:10", "up"]);
    ip(&["addr", "add", &format!("{NODE}/24"), "dev", "up0"]);
    ip(&[
        "route",
        "add",
        "10.10.1.0/24",
        "via",
        &OTHER_NODE.to_string(),
    ]);
    for (addr, mac) in [
        (OTHER_NODE, "02:00:00:00:00:11"),
        (*CLIENT.ip(), "02:00:00:00:00:02"),
    ] {
        ip(&[
            "neigh",
            "add",
            &addr.to_string(),
            "lladdr",
            mac,
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    ns
}

/// Runs `test` with a fresh datapath inside a routed namespace (nothing when privileged tests
/// are skipped).
pub fn in_routed_namespace(test: impl FnOnce(&mut Harness) + Send + 'static) {
    if !super::require_privileges() {
        return;
    }
    let ns = routed_namespace();
    ns.enter(move || {
        let mut h = harness().expect("privileged");
        test(&mut h);
    })
    .unwrap();
}

/// What the agent programs for this node: `NODE` as its SNAT address, SNAT ports `min..=max`.
pub fn configure_snat(h: &mut Harness, min: u16, max: u16) {
    h.set_node(NODE, min..=max);
}

/// A NodePort service `name` (external scope) on `NODE:NODE_PORT` with these backends.
pub fn node_port_service(
    name: &str,
    l4_proto: u8,
    backends: &[(SocketAddrV4, bool)],
) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        frontends: vec![FrontendSpec {
            addr: NODE,
            port: NODE_PORT,
            proto: l4_proto,
            scope: scope::EXTERNAL,
            kind: FrontendKind::NodePort,
        }],
        backends: backends
            .iter()
            .map(|(addr, local)| BackendSpec {
                addr: *addr,
                local: *local,
                weight: 1,
            })
            .collect(),
        ..Default::default()
    }
}

pub fn forward_key(client: SocketAddrV4, l4_proto: u8) -> FlowKey {
    flow_key(
        client,
        SocketAddrV4::new(NODE, NODE_PORT),
        l4_proto,
        FORWARD,
    )
}

/// The key of the reply entry of a flow to `REMOTE_POD` source-NATed to this node's `port`.
pub fn remote_reply_key(port: u16) -> FlowKey {
    flow_key(REMOTE_POD, SocketAddrV4::new(NODE, port), TCP, REPLY)
}

/// A segment from `REMOTE_POD` to this node's SNAT `port`, as the other node sends it.
pub fn from_remote_pod(port: u16, tcp_flags: u8) -> Packet {
    let mut pkt = Packet::tcp(REMOTE_POD, SocketAddrV4::new(NODE, port), tcp_flags, b"");
    pkt.eth_src = OTHER_NODE_MAC;
    pkt.eth_dst = UPLINK_MAC;
    pkt
}

/// The node address and port the flow from `client` was source-NATed to.
pub fn snat_source(h: &Harness, client: SocketAddrV4, l4_proto: u8) -> SocketAddrV4 {
    let entry = h
        .maps
        .ct
        .get(&forward_key(client, l4_proto), 0)
        .expect("forward entry");
    assert_ne!(entry.flags & ct_flags::SNAT, 0, "the flow is source-NATed");
    SocketAddrV4::new(entry.snat_addr.to_ip(), entry.snat_port.to_host())
}

/// The verdict of a packet a hook sends straight out of another interface.
pub fn redirect(hook: Hook) -> u32 {
    if hook == Hook::Xdp {
        xdp::REDIRECT
    } else {
        super::harness::tc::REDIRECT
    }
}

/// `pkt` as a router forwards it to `next_hop_mac` out of the uplink.
pub fn routed(mut pkt: Packet, next_hop_mac: [u8; 6]) -> Vec<u8> {
    pkt.eth_src = UPLINK_MAC;
    pkt.eth_dst = next_hop_mac;
    pkt.ip.time_to_live -= 1;
    pkt.bytes()
}

pub fn from_client(client: SocketAddrV4, tcp_flags: u8) -> Packet {
    let mut pkt = Packet::tcp(client, node_port(), tcp_flags, b"GET");
    pkt.eth_src = CLIENT_MAC;
    pkt.eth_dst = UPLINK_MAC;
    pkt
}

/// Opens the TCP flow of `client` to the NodePort, served by `REMOTE_POD` (SYN, the backend's
/// SYN-ACK, ACK); returns the SNAT port it got.
pub fn open_snat_flow(h: &mut Harness, client: SocketAddrV4) -> u16 {
    let run = h.run(Hook::Xdp, &from_client(client, flags::SYN).bytes());
    assert_eq!(run.verdict, xdp::REDIRECT, "{client} gets a port");
    let port = snat_source(h, client, TCP).port();
    h.run(
        Hook::ExtIn,
        &from_remote_pod(port, flags::SYN | flags::ACK).bytes(),
    );
    h.run(Hook::Xdp, &from_client(client, flags::ACK).bytes());
    port
}

/// The backend closes the flow of `client` on SNAT `port` first, as HTTP servers and netserver
/// do, and the client second: the backend then holds TIME_WAIT on (node, port).
pub fn close_backend_first(h: &mut Harness, client: SocketAddrV4, port: u16) {
    h.run(
        Hook::ExtIn,
        &from_remote_pod(port, flags::FIN | flags::ACK).bytes(),
    );
    h.run(
        Hook::Xdp,
        &from_client(client, flags::FIN | flags::ACK).bytes(),
    );
    let entry = h.maps.ct.get(&remote_reply_key(port), 0).unwrap();
    assert!(ct_flags::closed(entry.flags), "flags {:#x}", entry.flags);
    assert!(!ct_flags::reusable(entry.flags), "flags {:#x}", entry.flags);
}

/// The home SNAT port of `client` in `min..=max`, the first a new flow tries, restated
/// independently of `lb_common::snat::home`: the client's port turned by an offset of its
/// address.
pub fn home_port(client: SocketAddrV4, min: u16, max: u16) -> u16 {
    let span = u32::from(max - min) + 1;
    let turn = u32::from_ne_bytes(client.ip().octets()).wrapping_mul(0x9e37_79b1);
    min + (u32::from(client.port()).wrapping_add(turn) % span) as u16
}
