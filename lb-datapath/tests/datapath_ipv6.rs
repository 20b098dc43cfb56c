//! IPv6 in the real datapath programs (BPF_PROG_TEST_RUN): each entry program hands an IPv6
//! packet to its IPv6 twin by a tail call, which balances a new flow with Maglev over the IPv6
//! maps, DNATs it and every later packet of it, and restores the frontend on the replies; the
//! output frames are compared byte for byte with frames built from scratch (checksums
//! included). Extension headers are walked within their bound. Needs root.
//!
//! The frontends are written straight into the `LB6_*` maps: the agent does not program IPv6
//! Services yet (docs/ipv6.md, step 3).

mod common;

use std::net::{Ipv6Addr, SocketAddrV6};

use common::{
    harness::{Harness, Hook, counts, harness, tc, xdp},
    packet::{assert_frame_eq, flags as tcp_flags, tcp6 as tcp, udp6 as udp},
};
use lb_common::{
    Be16, Be128,
    conntrack::{FORWARD, FlowKey6},
    maps::{AddrInfo, Backend6, Frontend, FrontendKey6, addr_flags, backend_flags, scope},
    net::proto,
};
use lb_datapath::maps::Maps;

const VIP: SocketAddrV6 = v6([0xfd00, 0x96, 0, 0, 0, 0, 0, 0x41], 80);
const CLIENT: SocketAddrV6 = v6([0xfd00, 0x10, 1, 0, 0, 0, 0, 2], 40_000);
const BACKENDS: [SocketAddrV6; 3] = [
    v6([0xfd00, 0x10, 2, 0, 0, 0, 0, 7], 8080),
    v6([0xfd00, 0x10, 2, 0, 0, 0, 0, 8], 8080),
    v6([0xfd00, 0x10, 3, 0, 0, 0, 0, 9], 8080),
];
/// Backend ids: the slots of `LB6_BACKENDS` these tests use.
const BACKEND_IDS: [u32; 3] = [101, 102, 103];
const SET_ID: u32 = 7;
/// A small prime table, so that all three backends get slots.
const TABLE: [u32; 7] = [101, 102, 103, 101, 102, 103, 101];

const fn v6(segments: [u16; 8], port: u16) -> SocketAddrV6 {
    let [a, b, c, d, e, f, g, h] = segments;
    SocketAddrV6::new(Ipv6Addr::new(a, b, c, d, e, f, g, h), port, 0, 0)
}

/// `frame` with extension headers `(next-header value, bytes)` inserted after the fixed IPv6
/// header, in order: the chain's next-header fields and the payload length are fixed up (the
/// transport checksum covers neither).
fn with_extensions(frame: &[u8], extensions: &[(u8, Vec<u8>)]) -> Vec<u8> {
    const IP: usize = 14;
    const NEXT: usize = IP + 6;
    let transport = frame[NEXT];
    let mut out = frame[..IP + 40].to_vec();
    let mut chain = Vec::new();
    for (i, (_, bytes)) in extensions.iter().enumerate() {
        let mut header = bytes.clone();
        header[0] = extensions.get(i + 1).map_or(transport, |(kind, _)| *kind);
        chain.extend_from_slice(&header);
    }
    out[NEXT] = extensions.first().map_or(transport, |(kind, _)| *kind);
    out.extend_from_slice(&chain);
    out.extend_from_slice(&frame[IP + 40..]);
    let payload_len = u16::from_be_bytes([frame[IP + 4], frame[IP + 5]]) + chain.len() as u16;
    out[IP + 4..IP + 6].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// An options header (hop-by-hop or destination options) of 8 bytes: padding only.
fn options_header() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

const HOP_BY_HOP: u8 = 0;
const DEST_OPTS: u8 = 60;
const FRAGMENT: u8 = 44;

fn be128(ip: &Ipv6Addr) -> Be128 {
    Be128::from_ip(*ip)
}

fn frontend_key(frontend: SocketAddrV6, l4_proto: u8, scope: u8) -> FrontendKey6 {
    FrontendKey6 {
        addr: be128(frontend.ip()),
        port: Be16::from_host(frontend.port()),
        proto: l4_proto,
        scope,
    }
}

/// Programs `VIP:80` (TCP and UDP, internal scope) over [`BACKENDS`] with [`TABLE`], as the
/// agent's writer orders it: backends, table, frontends, address.
fn program(maps: &mut Maps) {
    for (id, backend) in BACKEND_IDS.iter().zip(BACKENDS) {
        let value = Backend6 {
            addr: be128(backend.ip()),
            port: Be16::from_host(backend.port()),
            flags: backend_flags::ACTIVE,
            _pad: 0,
        };
        maps.backends6.set(*id, value, 0).expect("backend");
    }
    let table = Maps::build_maglev_map(SET_ID, &TABLE).expect("table");
    maps.install_maglev_maps(&[(SET_ID, table)])
        .expect("install table");
    for l4_proto in [proto::TCP, proto::UDP] {
        let frontend = Frontend {
            set_id: SET_ID,
            backend_count: BACKENDS.len() as u32,
            table_size: TABLE.len() as u32,
            ..Frontend::default()
        };
        maps.services6
            .insert(frontend_key(VIP, l4_proto, scope::INTERNAL), frontend, 0)
            .expect("frontend");
    }
    let info = AddrInfo {
        flags: addr_flags::CLUSTER_IP,
    };
    maps.addrs6
        .insert(be128(VIP.ip()), info, 0)
        .expect("address");
}

fn setup() -> Option<Harness> {
    let mut h = harness()?;
    program(&mut h.maps);
    Some(h)
}

/// The backend Maglev gives the flow `client -> VIP` of protocol `l4_proto`: [`TABLE`]'s slot
/// for the flow hash, which `lb_common` computes for both sides.
fn expected_backend(client: SocketAddrV6, l4_proto: u8) -> SocketAddrV6 {
    let flow = FlowKey6::new(
        be128(client.ip()),
        Be16::from_host(client.port()),
        be128(VIP.ip()),
        Be16::from_host(VIP.port()),
        l4_proto,
        FORWARD,
    );
    let id = TABLE[(flow.hash() % TABLE.len() as u32) as usize];
    let index = BACKEND_IDS.iter().position(|b| *b == id).expect("an id");
    BACKENDS[index]
}

#[test]
fn a_pods_tcp_flow_to_an_ipv6_cluster_ip_is_balanced_dnated_and_its_replies_restored() {
    let Some(mut h) = setup() else {
        return;
    };
    let backend = expected_backend(CLIENT, proto::TCP);

    let syn = tcp(CLIENT, VIP, tcp_flags::SYN, &[]);
    let run = h.run(Hook::FromPod, &syn);
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &tcp(CLIENT, backend, tcp_flags::SYN, &[]),
        "SYN DNATed to the Maglev backend",
    );
    assert_eq!(h.maps.ct6.keys().count(), 2, "forward and reply entries");

    let reply = tcp(backend, CLIENT, tcp_flags::SYN | tcp_flags::ACK, &[]);
    let run = h.run(Hook::ToPod, &reply);
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &tcp(VIP, CLIENT, tcp_flags::SYN | tcp_flags::ACK, &[]),
        "SYN-ACK from the frontend",
    );

    let data = tcp(
        CLIENT,
        VIP,
        tcp_flags::ACK | tcp_flags::PSH,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let run = h.run(Hook::FromPod, &data);
    assert_frame_eq(
        &run.out,
        &tcp(
            CLIENT,
            backend,
            tcp_flags::ACK | tcp_flags::PSH,
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        "data segment to the same backend",
    );
    assert_eq!(h.maps.ct6.keys().count(), 2, "no entry for a known flow");
    assert_eq!(
        h.verdicts(),
        counts(&[("new_flow", 1), ("reply_nat", 1), ("established", 1)])
    );
    assert_eq!(h.maps.ct.keys().count(), 0, "nothing in IPv4's conntrack");
}

#[test]
fn clients_are_spread_over_every_backend_as_the_maglev_table_says() {
    let Some(mut h) = setup() else {
        return;
    };
    let mut seen = std::collections::BTreeSet::new();
    for port in 40_000..40_064 {
        let client = SocketAddrV6::new(*CLIENT.ip(), port, 0, 0);
        let backend = expected_backend(client, proto::TCP);
        let run = h.run(Hook::FromPod, &tcp(client, VIP, tcp_flags::SYN, &[]));
        assert_frame_eq(
            &run.out,
            &tcp(client, backend, tcp_flags::SYN, &[]),
            "DNAT to the table's backend",
        );
        seen.insert(backend);
    }
    assert_eq!(seen.len(), BACKENDS.len(), "every backend got flows");
}

#[test]
fn udp_is_balanced_at_tc_and_xdp_with_valid_checksums() {
    let Some(mut h) = setup() else {
        return;
    };
    let client = SocketAddrV6::new(*CLIENT.ip(), 5353, 0, 0);
    let backend = expected_backend(client, proto::UDP);
    let query = udp(client, VIP, b"query");
    let run = h.run(Hook::FromPod, &query);
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(&run.out, &udp(client, backend, b"query"), "tc DNAT");
    // The flow is known wherever its next datagram arrives, XDP included.
    let run = h.run(Hook::Xdp, &query);
    assert_eq!(run.verdict, xdp::PASS);
    assert_frame_eq(&run.out, &udp(client, backend, b"query"), "XDP DNAT");
    // A new flow from outside finds no external frontend on a ClusterIP (its internal one is
    // for pods; serving ClusterIPs to external clients is step 2 for IPv6): untouched.
    let stranger = udp(SocketAddrV6::new(*CLIENT.ip(), 5354, 0, 0), VIP, b"query");
    let run = h.run(Hook::Xdp, &stranger);
    assert_eq!(run.verdict, xdp::PASS);
    assert_frame_eq(&run.out, &stranger, "no external frontend: untouched");

    let answer = udp(backend, client, b"answer");
    let run = h.run(Hook::ExtOut, &answer);
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &udp(VIP, client, b"answer"),
        "answer from the VIP",
    );
}

#[test]
fn external_frontends_balance_at_xdp_to_local_backends_and_drop_what_needs_ipv6_snat() {
    let Some(mut h) = setup() else {
        return;
    };
    let lb_ip = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80], 443);
    let local = Backend6 {
        addr: be128(BACKENDS[0].ip()),
        port: Be16::from_host(BACKENDS[0].port()),
        flags: backend_flags::ACTIVE | backend_flags::LOCAL,
        _pad: 0,
    };
    h.maps.backends6.set(201, local, 0).expect("local backend");
    let remote = Backend6 {
        flags: backend_flags::ACTIVE,
        ..local
    };
    h.maps
        .backends6
        .set(202, remote, 0)
        .expect("remote backend");
    let single = |backend_id| Frontend {
        set_id: 8,
        backend_count: 1,
        backend_id,
        ..Frontend::default()
    };
    let local_key = frontend_key(lb_ip, proto::TCP, scope::EXTERNAL);
    let remote_port = SocketAddrV6::new(*lb_ip.ip(), 444, 0, 0);
    let remote_key = frontend_key(remote_port, proto::TCP, scope::EXTERNAL);
    h.maps.services6.insert(local_key, single(201), 0).unwrap();
    h.maps.services6.insert(remote_key, single(202), 0).unwrap();
    h.maps
        .addrs6
        .insert(be128(lb_ip.ip()), AddrInfo::default(), 0)
        .unwrap();

    let client = v6([0x2001, 0xdb8, 9, 0, 0, 0, 0, 1], 50_000);
    let run = h.run(Hook::Xdp, &tcp(client, lb_ip, tcp_flags::SYN, &[]));
    assert_eq!(run.verdict, xdp::PASS);
    assert_frame_eq(
        &run.out,
        &tcp(client, BACKENDS[0], tcp_flags::SYN, &[]),
        "DNAT at XDP, client kept",
    );
    let syn = tcp(client, remote_port, tcp_flags::SYN, &[]);
    let run = h.run(Hook::ExtIn, &syn);
    assert_eq!(run.verdict, tc::SHOT, "no IPv6 source NAT yet");
    assert_eq!(
        h.verdicts(),
        counts(&[("new_flow", 1), ("drop_snat_ports", 1)])
    );
}

#[test]
fn extension_headers_are_walked_within_their_bound() {
    let Some(mut h) = setup() else {
        return;
    };
    let backend = expected_backend(CLIENT, proto::TCP);
    let syn = tcp(CLIENT, VIP, tcp_flags::SYN, &[]);
    let chain = [
        (HOP_BY_HOP, options_header()),
        (DEST_OPTS, options_header()),
    ];
    let run = h.run(Hook::FromPod, &with_extensions(&syn, &chain));
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &with_extensions(&tcp(CLIENT, backend, tcp_flags::SYN, &[]), &chain),
        "balanced behind two extension headers",
    );

    // Seven headers: one more than the walk's bound. Passed untouched and unbalanced.
    let long = vec![(DEST_OPTS, options_header()); 7];
    let other = SocketAddrV6::new(*CLIENT.ip(), 40_001, 0, 0);
    let frame = with_extensions(&tcp(other, VIP, tcp_flags::SYN, &[]), &long);
    let run = h.run(Hook::FromPod, &frame);
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(&run.out, &frame, "beyond the bound: untouched");

    // A later fragment (offset 8) carries no ports: passed untouched.
    let later = vec![(FRAGMENT, vec![0, 0, 0, 8, 0, 0, 0, 42])];
    let frame = with_extensions(&tcp(other, VIP, tcp_flags::ACK, b"tail"), &later);
    let run = h.run(Hook::FromPod, &frame);
    assert_frame_eq(&run.out, &frame, "later fragment: untouched");

    assert_eq!(h.verdicts(), counts(&[("new_flow", 1)]));
}

#[test]
fn traffic_to_other_ipv6_addresses_and_frontends_without_backends() {
    let Some(mut h) = setup() else {
        return;
    };
    let other = v6([0xfd00, 0x10, 2, 0, 0, 0, 0, 99], 80);
    let frame = tcp(CLIENT, other, tcp_flags::SYN, &[]);
    for hook in [Hook::FromPod, Hook::ToPod, Hook::ExtIn, Hook::ExtOut] {
        let run = h.run(hook, &frame);
        assert_eq!(run.verdict, tc::PASS, "{hook:?}");
        assert_frame_eq(&run.out, &frame, "untouched");
    }
    let run = h.run(Hook::Xdp, &frame);
    assert_eq!(run.verdict, xdp::PASS);
    assert_eq!(h.verdicts(), counts(&[]));
    assert_eq!(h.maps.ct6.keys().count(), 0);

    let empty = Frontend {
        set_id: SET_ID,
        ..Frontend::default()
    };
    h.maps
        .services6
        .insert(frontend_key(VIP, proto::TCP, scope::INTERNAL), empty, 0)
        .unwrap();
    let run = h.run(Hook::FromPod, &tcp(CLIENT, VIP, tcp_flags::SYN, &[]));
    assert_eq!(run.verdict, tc::SHOT);
    assert_eq!(h.verdicts(), counts(&[("drop_no_backend", 1)]));
}
