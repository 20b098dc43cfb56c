//! The real datapath programs, run by the kernel on crafted packets (BPF_PROG_TEST_RUN). Every
//! case compares whole output frames (built independently, checksums computed from scratch) and
//! the verdict, and checks the counters the verdict must bump. Needs root.

mod common;

use std::{collections::BTreeMap, net::SocketAddrV4};

use common::{
    harness::{
        Harness, Hook, TCP, UDP, addrs::*, cluster_ip, socket, tc, vip, with_external_scope, xdp,
    },
    packet::{Packet, assert_frame_eq, flags},
};
use etherparse::{IpDscp, IpEcn, icmpv4::DestUnreachableHeader};
use lb_common::{
    Be16, Be32,
    conntrack::{FORWARD, FlowKey, ct_flags, timeout},
    stats::Reason,
};
use lb_datapath::program::ServiceSpec;

fn counts(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    pairs.iter().copied().collect()
}

fn setup(svc: &ServiceSpec) -> Option<Harness> {
    let mut h = Harness::new()?;
    h.program(svc);
    Some(h)
}

/// The RST the datapath must send for `pkt` (a TCP segment to `frontend` without backend).
fn expected_rst(pkt: &Packet, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let rst_flags = if ack.is_some() {
        flags::RST | flags::ACK
    } else {
        flags::RST
    };
    let mut rst = Packet::tcp(pkt.dst(), pkt.src(), rst_flags, &[]);
    rst.eth_src = pkt.eth_dst;
    rst.eth_dst = pkt.eth_src;
    rst.ip.identification = 0;
    if let common::packet::Transport::Tcp(t) = &mut rst.transport {
        t.sequence_number = seq;
        t.acknowledgment_number = ack.unwrap_or(0);
        t.window_size = 0;
    }
    rst.bytes()
}

/// The ICMP port unreachable the datapath must send for `pkt`.
fn expected_port_unreachable(pkt: &Packet) -> Vec<u8> {
    let mut icmp = Packet::icmp_unreachable(
        *pkt.dst().ip(),
        *pkt.src().ip(),
        DestUnreachableHeader::Port,
        pkt,
        8,
    );
    icmp.eth_src = pkt.eth_dst;
    icmp.eth_dst = pkt.eth_src;
    icmp.ip.identification = 0;
    icmp.ip.dont_fragment = false;
    icmp.ip.dscp = IpDscp::try_new(0xc0 >> 2).unwrap();
    icmp.ip.ecn = IpEcn::ZERO;
    icmp.bytes()
}

fn forward_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey {
        src_addr: Be32::from(*src.ip()),
        dst_addr: Be32::from(*dst.ip()),
        src_port: Be16::from_host(src.port()),
        dst_port: Be16::from_host(dst.port()),
        proto,
        dir: FORWARD,
        _pad: [0; 2],
    }
}

#[test]
fn syn_to_a_cluster_ip_is_dnated_to_the_maglev_backend() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    assert!(BACKENDS.contains(&backend));

    let run = h.run(Hook::FromPod, &syn.bytes());
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &syn.clone().with_dst(backend).bytes(),
        "DNATed SYN",
    );
    assert_eq!(h.verdicts(), counts(&[("new_flow", 1)]));
    let stats = h.maps.service_totals(h.set_id(&svc)).unwrap();
    assert_eq!(
        (stats.packets, stats.new_flows, stats.bytes),
        (1, 1, syn.bytes().len() as u64)
    );
}

#[test]
fn new_flows_spread_over_every_backend_exactly_as_predicted() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let mut seen = BTreeMap::new();
    for port in 30_000..30_300 {
        let client = SocketAddrV4::new(*CLIENT.ip(), port);
        let syn = Packet::tcp(client, vip(80), flags::SYN, b"hello");
        let backend = h.expected_backend(&svc, client, vip(80), TCP);
        let run = h.run(Hook::FromPod, &syn.bytes());
        assert_frame_eq(
            &run.out,
            &syn.clone().with_dst(backend).bytes(),
            "DNATed SYN",
        );
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "every backend takes flows: {seen:?}");
    assert!(seen.values().all(|n| *n > 60), "roughly even: {seen:?}");
    // Each flow has its forward and its reply entry; the agent's batch count sees them all.
    assert_eq!(h.maps.conntrack_entries().unwrap(), 600);
}

#[test]
fn an_established_flow_keeps_its_backend_when_the_table_changes() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    h.run(Hook::FromPod, &syn.bytes());

    // The flow's backend leaves the table (weight 0) but keeps existing: new flows avoid it,
    // the established flow stays on it.
    let mut changed = svc.clone();
    for b in &mut changed.backends {
        if b.addr == backend {
            b.weight = 0;
        }
    }
    h.program(&changed);
    let ack = Packet::tcp(
        CLIENT,
        vip(80),
        flags::ACK | flags::PSH,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    let run = h.run(Hook::FromPod, &ack.bytes());
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &ack.clone().with_dst(backend).bytes(),
        "established segment",
    );

    for port in 41_000..41_050 {
        let client = SocketAddrV4::new(*CLIENT.ip(), port);
        let run = h.run(
            Hook::FromPod,
            &Packet::tcp(client, vip(80), flags::SYN, &[]).bytes(),
        );
        let chosen = h.expected_backend(&changed, client, vip(80), TCP);
        assert_ne!(chosen, backend);
        assert_frame_eq(
            &run.out,
            &Packet::tcp(client, vip(80), flags::SYN, &[])
                .with_dst(chosen)
                .bytes(),
            "new flow",
        );
    }
    assert_eq!(
        h.verdicts(),
        counts(&[("new_flow", 51), ("established", 1)])
    );
}

#[test]
fn a_flow_whose_backend_is_gone_moves_to_a_live_one() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    h.run(Hook::FromPod, &syn.bytes());

    let mut shrunk = svc.clone();
    let gone = shrunk
        .backends
        .iter()
        .position(|b| b.addr == backend)
        .unwrap();
    // The planner empties the slot of a backend no set lists any more.
    shrunk.backends.remove(gone);
    h.program(&shrunk);

    let ack = Packet::tcp(CLIENT, vip(80), flags::ACK, &[]);
    let run = h.run(Hook::FromPod, &ack.bytes());
    let now = h.expected_backend(&shrunk, CLIENT, vip(80), TCP);
    assert_ne!(now, backend);
    assert_frame_eq(&run.out, &ack.with_dst(now).bytes(), "re-balanced segment");
    assert_eq!(h.verdicts(), counts(&[("new_flow", 2)]));
}

#[test]
fn replies_are_reverse_nated_to_the_frontend() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    h.run(Hook::FromPod, &syn.bytes());

    let reply = syn
        .clone()
        .with_dst(backend)
        .reply(flags::SYN | flags::ACK, &[]);
    let run = h.run(Hook::ToPod, &reply.bytes());
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &reply.clone().with_src(vip(80)).bytes(),
        "reverse-NATed SYN-ACK",
    );

    let data = syn
        .clone()
        .with_dst(backend)
        .reply(flags::ACK | flags::PSH, b"HTTP/1.1 200 OK\r\n\r\n");
    let run = h.run(Hook::ToPod, &data.bytes());
    assert_frame_eq(
        &run.out,
        &data.with_src(vip(80)).bytes(),
        "reverse-NATed data",
    );
    assert_eq!(h.verdicts(), counts(&[("new_flow", 1), ("reply_nat", 2)]));
    assert_eq!(h.maps.service_totals(h.set_id(&svc)).unwrap().packets, 3);
}

#[test]
fn udp_is_balanced_and_reverse_nated_with_its_checksum_kept_valid() {
    let svc = cluster_ip(
        "dns",
        53,
        UDP,
        &BACKENDS.map(|b| SocketAddrV4::new(*b.ip(), 5353)),
    );
    let Some(mut h) = setup(&svc) else { return };
    let query = Packet::udp(CLIENT, vip(53), b"\x12\x34 dns query");
    let backend = h.expected_backend(&svc, CLIENT, vip(53), UDP);
    let run = h.run(Hook::FromPod, &query.bytes());
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &query.clone().with_dst(backend).bytes(),
        "DNATed UDP",
    );

    let answer = query
        .clone()
        .with_dst(backend)
        .reply(0, b"\x12\x34 dns answer");
    let run = h.run(Hook::ToPod, &answer.bytes());
    assert_frame_eq(
        &run.out,
        &answer.with_src(vip(53)).bytes(),
        "reverse-NATed UDP",
    );
}

#[test]
fn a_zero_udp_checksum_stays_zero() {
    let svc = cluster_ip("dns", 53, UDP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let query = Packet::udp(CLIENT, vip(53), b"no checksum").with_zero_udp_checksum();
    let backend = h.expected_backend(&svc, CLIENT, vip(53), UDP);
    let run = h.run(Hook::FromPod, &query.bytes());
    assert_frame_eq(
        &run.out,
        &query.clone().with_dst(backend).bytes(),
        "DNATed UDP without checksum",
    );
    let answer = query
        .clone()
        .with_dst(backend)
        .reply(0, b"still none")
        .with_zero_udp_checksum();
    let run = h.run(Hook::ToPod, &answer.bytes());
    assert_frame_eq(
        &run.out,
        &answer.with_src(vip(53)).bytes(),
        "reverse-NATed UDP without checksum",
    );
}

#[test]
fn traffic_for_other_addresses_passes_byte_for_byte_and_uncounted() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&with_external_scope(svc)) else {
        return;
    };
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&common::packet::POD_MAC);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[0; 20]);
        f
    };
    let ipv6 = {
        let mut f = vec![0x02; 12];
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 0, 17, 64]);
        f.extend_from_slice(&[0; 40]);
        f
    };
    let frames = [
        Packet::tcp(CLIENT, OTHER, flags::SYN, &[]).bytes(),
        Packet::udp(CLIENT, OTHER, b"x").bytes(),
        Packet::other(*CLIENT.ip(), *OTHER.ip(), 47, b"gre").bytes(),
        // A reply-shaped packet that matches no flow.
        Packet::tcp(BACKENDS[0], CLIENT, flags::ACK, b"stray").bytes(),
        arp,
        ipv6,
    ];
    for frame in &frames {
        for (hook, pass) in [
            (Hook::FromPod, tc::PASS),
            (Hook::ToPod, tc::PASS),
            (Hook::Xdp, xdp::PASS),
        ] {
            let run = h.run(hook, frame);
            assert_eq!(run.verdict, pass, "{hook:?}");
            assert_frame_eq(&run.out, frame, "untouched frame");
        }
    }
    assert_eq!(h.verdicts(), counts(&[]));
    assert_eq!(
        h.maps.ct.keys().count(),
        0,
        "no conntrack entry for non-service traffic"
    );
}

#[test]
fn a_service_without_backends_rejects_tcp_with_a_reset() {
    let svc = cluster_ip("empty", 80, TCP, &[]);
    let Some(mut h) = setup(&svc) else { return };
    // A SYN with data: the RST acknowledges the SYN and every data byte.
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, b"early data");
    let run = h.run(Hook::FromPod, &syn.bytes());
    assert_eq!(run.verdict, tc::REDIRECT);
    assert_frame_eq(
        &run.out,
        &expected_rst(&syn, 0, Some(1000 + 1 + 10)),
        "RST for a SYN",
    );

    // A segment with ACK: the RST takes its sequence number from that ACK.
    let ack = Packet::tcp(CLIENT, vip(80), flags::ACK, &[]);
    let run = h.run(Hook::FromPod, &ack.bytes());
    assert_eq!(run.verdict, tc::REDIRECT);
    assert_frame_eq(&run.out, &expected_rst(&ack, 5000, None), "RST for an ACK");

    // Never a reset in answer to a reset.
    let rst = Packet::tcp(CLIENT, vip(80), flags::RST, &[]);
    assert_eq!(h.run(Hook::FromPod, &rst.bytes()).verdict, tc::SHOT);
    assert_eq!(h.verdicts(), counts(&[("reject_no_backend", 3)]));
}

#[test]
fn a_service_without_backends_rejects_udp_with_port_unreachable() {
    let svc = cluster_ip("empty", 53, UDP, &[]);
    let Some(mut h) = setup(&svc) else { return };
    let query = Packet::udp(
        CLIENT,
        vip(53),
        b"query with some payload beyond eight bytes",
    );
    let run = h.run(Hook::FromPod, &query.bytes());
    assert_eq!(run.verdict, tc::REDIRECT);
    assert_frame_eq(
        &run.out,
        &expected_port_unreachable(&query),
        "ICMP port unreachable",
    );
    assert_eq!(h.verdicts(), counts(&[("reject_no_backend", 1)]));
}

#[test]
fn a_cluster_ip_rejects_ports_and_protocols_it_does_not_serve() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let wrong_port = Packet::tcp(CLIENT, vip(81), flags::SYN, &[]);
    let run = h.run(Hook::FromPod, &wrong_port.bytes());
    assert_eq!(run.verdict, tc::REDIRECT);
    assert_frame_eq(
        &run.out,
        &expected_rst(&wrong_port, 0, Some(1001)),
        "RST for an unknown port",
    );

    let wrong_proto = Packet::udp(CLIENT, vip(80), b"udp to a tcp-only port");
    let run = h.run(Hook::FromPod, &wrong_proto.bytes());
    assert_eq!(run.verdict, tc::REDIRECT);
    assert_frame_eq(
        &run.out,
        &expected_port_unreachable(&wrong_proto),
        "ICMP for an unknown protocol",
    );

    let gre = Packet::other(*CLIENT.ip(), VIP, 47, b"gre payload");
    let run = h.run(Hook::FromPod, &gre.bytes());
    assert_eq!(run.verdict, tc::REDIRECT);
    assert_frame_eq(&run.out, &expected_port_unreachable(&gre), "ICMP for GRE");
    assert_eq!(h.verdicts(), counts(&[("reject_unknown_port", 3)]));
}

#[test]
fn a_service_whose_policy_says_drop_drops_silently() {
    let mut svc = cluster_ip("local-only", 80, TCP, &[]);
    svc.drop_when_empty = true;
    let Some(mut h) = setup(&svc) else { return };
    let run = h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes(),
    );
    assert_eq!(run.verdict, tc::SHOT);
    assert_eq!(h.verdicts(), counts(&[("drop_no_backend", 1)]));
}

#[test]
fn truncated_and_malformed_packets_are_passed_or_dropped_never_corrupted() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes();

    // Cut inside the IPv4 header: not even an IPv4 packet we can read; the stack drops it.
    // (BPF_PROG_TEST_RUN builds no skb for an IPv4 frame shorter than its header, so these go
    // through the XDP entry point, which shares the parser.)
    for len in [14, 20, 33] {
        let frame = &syn[..len];
        let run = h.run(Hook::Xdp, frame);
        assert_eq!(run.verdict, xdp::PASS);
        assert_frame_eq(&run.out, frame, "truncated IPv4 header");
    }
    // Addressed to the VIP but cut inside the TCP header: dropped and counted.
    let cut = &syn[..14 + 20 + 10];
    let run = h.run(Hook::FromPod, cut);
    assert_eq!(run.verdict, tc::SHOT);
    // An impossible header length (IHL 4) towards the VIP: dropped.
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    assert_eq!(h.run(Hook::FromPod, &bad_ihl).verdict, tc::SHOT);
    assert_eq!(h.run(Hook::Xdp, &bad_ihl).verdict, xdp::DROP);
    // The same cuts to another address, and on the reply path, pass untouched.
    let other = Packet::tcp(CLIENT, OTHER, flags::SYN, &[]).bytes();
    for hook in [Hook::FromPod, Hook::ToPod] {
        for frame in [&other[..14 + 20 + 10], &syn[..14 + 20 + 10]] {
            if hook == Hook::FromPod && frame[30..34] == VIP.octets() {
                continue;
            }
            let run = h.run(hook, frame);
            assert_eq!(run.verdict, tc::PASS);
            assert_frame_eq(&run.out, frame, "truncated, not ours");
        }
    }
    assert_eq!(h.verdicts(), counts(&[("drop_malformed", 3)]));
}

#[test]
fn ipv4_options_are_carried_through_nat() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    // Router alert (RFC 2113) + two NOPs + end of list: an 8-byte options area.
    let options = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x00, 0x00];
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, b"payload").with_ip_options(&options);
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    let run = h.run(Hook::FromPod, &syn.bytes());
    assert_frame_eq(
        &run.out,
        &syn.clone().with_dst(backend).bytes(),
        "DNAT with options",
    );

    let reply = syn
        .clone()
        .with_dst(backend)
        .reply(flags::SYN | flags::ACK, &[])
        .with_ip_options(&options);
    let run = h.run(Hook::ToPod, &reply.bytes());
    assert_frame_eq(
        &run.out,
        &reply.with_src(vip(80)).bytes(),
        "reverse NAT with options",
    );
}

#[test]
fn fragments_follow_their_first_fragment() {
    let svc = cluster_ip("dns", 53, UDP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let payload: Vec<u8> = (0..64u8).collect();
    let query = Packet::udp(CLIENT, vip(53), &payload).with_ip_id(0x4242);
    let backend = h.expected_backend(&svc, CLIENT, vip(53), UDP);
    let [first, second] = query.fragments(32);
    let [want_first, want_second] = query.clone().with_dst(backend).fragments(32);
    let run = h.run(Hook::FromPod, &first);
    assert_frame_eq(&run.out, &want_first, "first fragment");
    let run = h.run(Hook::FromPod, &second);
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(&run.out, &want_second, "second fragment");

    // The reply, fragmented too.
    let answer = query
        .clone()
        .with_dst(backend)
        .reply(0, &payload)
        .with_ip_id(0x7777);
    let [first, second] = answer.fragments(40);
    let [want_first, want_second] = answer.with_src(vip(53)).fragments(40);
    assert_frame_eq(
        &h.run(Hook::ToPod, &first).out,
        &want_first,
        "first reply fragment",
    );
    assert_frame_eq(
        &h.run(Hook::ToPod, &second).out,
        &want_second,
        "second reply fragment",
    );

    // A later fragment whose first fragment never came cannot be translated: dropped.
    let [_, orphan] = Packet::udp(CLIENT, vip(53), &payload)
        .with_ip_id(0x9999)
        .fragments(32);
    assert_eq!(h.run(Hook::FromPod, &orphan).verdict, tc::SHOT);
    assert_eq!(
        h.verdicts(),
        counts(&[
            ("new_flow", 1),
            ("reply_nat", 1),
            ("fragment_nat", 2),
            ("drop_fragment_no_state", 1)
        ])
    );
}

#[test]
fn icmp_fragmentation_needed_for_a_reply_reaches_the_backend() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    h.run(Hook::FromPod, &syn.bytes());

    // A big reply as the client's side of the network saw it (from the VIP) was too big for a
    // link: the router there reports it to the VIP. Quote the whole TCP header so that the quoted
    // TCP checksum must be kept consistent too.
    let router = std::net::Ipv4Addr::new(10, 0, 1, 1);
    let mtu = DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 };
    let big_reply = syn.clone().reply(flags::ACK, &[0xab; 64]);
    let error = Packet::icmp_unreachable(router, VIP, mtu.clone(), &big_reply, 28);
    let as_backend_sent = syn.clone().with_dst(backend).reply(flags::ACK, &[0xab; 64]);
    let want = Packet::icmp_unreachable(router, *backend.ip(), mtu, &as_backend_sent, 28);
    let run = h.run(Hook::FromPod, &error.bytes());
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(&run.out, &want.bytes(), "ICMP error towards the backend");
    assert_eq!(
        h.verdicts(),
        counts(&[("new_flow", 1), ("icmp_error_nat", 1)])
    );
}

#[test]
fn icmp_errors_towards_a_client_quote_the_frontend() {
    let svc = cluster_ip("dns", 53, UDP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let query = Packet::udp(CLIENT, vip(53), b"query");
    let backend = h.expected_backend(&svc, CLIENT, vip(53), UDP);
    h.run(Hook::FromPod, &query.bytes());

    // The backend answers "port unreachable" about the DNATed datagram (8 quoted bytes).
    let dnated = query.clone().with_dst(backend);
    let error = Packet::icmp_unreachable(
        *backend.ip(),
        *CLIENT.ip(),
        DestUnreachableHeader::Port,
        &dnated,
        8,
    );
    let want = Packet::icmp_unreachable(VIP, *CLIENT.ip(), DestUnreachableHeader::Port, &query, 8);
    let run = h.run(Hook::ToPod, &error.bytes());
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(&run.out, &want.bytes(), "ICMP error towards the client");

    // A router on the way reports the same: only the quote changes, not the router's address.
    let router = std::net::Ipv4Addr::new(10, 0, 2, 1);
    let error = Packet::icmp_unreachable(
        router,
        *CLIENT.ip(),
        DestUnreachableHeader::Host,
        &dnated,
        8,
    );
    let want =
        Packet::icmp_unreachable(router, *CLIENT.ip(), DestUnreachableHeader::Host, &query, 8);
    assert_frame_eq(
        &h.run(Hook::ToPod, &error.bytes()).out,
        &want.bytes(),
        "router's ICMP error",
    );
    assert_eq!(
        h.verdicts(),
        counts(&[("new_flow", 1), ("icmp_error_nat", 2)])
    );
}

#[test]
fn a_single_backend_service_needs_no_table() {
    let svc = cluster_ip("single", 80, TCP, &BACKENDS[..1]);
    let Some(mut h) = setup(&svc) else { return };
    assert!(
        h.maps
            .maglev_table(h.set_id(&svc), lb_datapath::maglev::DEFAULT_TABLE_SIZE)
            .is_err(),
        "no table installed"
    );
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    let run = h.run(Hook::FromPod, &syn.bytes());
    assert_frame_eq(
        &run.out,
        &syn.with_dst(BACKENDS[0]).bytes(),
        "single backend",
    );
}

#[test]
fn a_syn_after_close_balances_the_ports_anew() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let backend = h.expected_backend(&svc, CLIENT, vip(80), TCP);
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes(),
    );
    // A retransmitted SYN of the open flow stays put.
    let mut changed = svc.clone();
    for b in &mut changed.backends {
        if b.addr == backend {
            b.weight = 0;
        }
    }
    h.program(&changed);
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    assert_frame_eq(
        &h.run(Hook::FromPod, &syn.bytes()).out,
        &syn.clone().with_dst(backend).bytes(),
        "SYN retransmit",
    );
    // The client closes; a new connection on the same ports goes where Maglev says now.
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::FIN | flags::ACK, &[]).bytes(),
    );
    let now = h.expected_backend(&changed, CLIENT, vip(80), TCP);
    assert_frame_eq(
        &h.run(Hook::FromPod, &syn.bytes()).out,
        &syn.with_dst(now).bytes(),
        "SYN after FIN",
    );
}

#[test]
fn an_established_flow_writes_its_entry_only_when_timeouts_need_it() {
    let svc = cluster_ip("web", 80, TCP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let key = forward_key(CLIENT, vip(80), TCP);
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::SYN, &[]).bytes(),
    );
    let syn_entry = h.maps.ct.get(&key, 0).unwrap();
    h.run(
        Hook::FromPod,
        &Packet::tcp(CLIENT, vip(80), flags::ACK, &[]).bytes(),
    );
    let established = h.maps.ct.get(&key, 0).unwrap();
    assert!(
        established.deadline_ns > syn_entry.deadline_ns,
        "the handshake extends the lifetime"
    );
    for _ in 0..20 {
        h.run(
            Hook::FromPod,
            &Packet::tcp(CLIENT, vip(80), flags::ACK | flags::PSH, b"data").bytes(),
        );
    }
    assert_eq!(
        h.maps.ct.get(&key, 0).unwrap(),
        established,
        "no rewrite within the refresh interval"
    );
    assert_eq!(h.verdict_count(Reason::Established), 21);
}

/// The datapath's clock (`bpf_ktime_get_coarse_ns`).
fn ktime_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// As with nf_conntrack: a UDP exchange (a DNS query and its answer) holds its entries for 30 s,
/// and a flow still sending 2 s after it opened is a stream, which lives 120 s.
#[test]
fn udp_flows_live_30_s_and_streams_120_s() {
    let svc = cluster_ip("dns", 53, UDP, &BACKENDS);
    let Some(mut h) = setup(&svc) else { return };
    let key = forward_key(CLIENT, vip(53), UDP);
    let query = Packet::udp(CLIENT, vip(53), b"query");
    let before = ktime_coarse_ns();
    h.run(Hook::FromPod, &query.bytes());
    let after = ktime_coarse_ns();
    let opened = h.maps.ct.get(&key, 0).unwrap();
    assert!(
        (before + timeout::UDP..=after + timeout::UDP).contains(&opened.deadline_ns),
        "a new UDP flow lives 30 s"
    );
    assert_eq!(opened.flags & ct_flags::ESTABLISHED, 0);
    h.run(Hook::FromPod, &query.bytes());
    assert_eq!(
        h.maps.ct.get(&key, 0).unwrap(),
        opened,
        "within its first 2 s, a packet writes nothing"
    );

    // Three seconds later, it still sends: a stream.
    let mut aged = opened;
    aged.deadline_ns -= 3_000_000_000;
    h.maps.ct.insert(key, aged, 0).unwrap();
    let before = ktime_coarse_ns();
    h.run(Hook::FromPod, &query.bytes());
    let after = ktime_coarse_ns();
    let stream = h.maps.ct.get(&key, 0).unwrap();
    assert_ne!(stream.flags & ct_flags::ESTABLISHED, 0);
    assert!(
        (before + timeout::UDP_STREAM..=after + timeout::UDP_STREAM).contains(&stream.deadline_ns),
        "a UDP stream lives 120 s"
    );
}

#[test]
fn the_xdp_entry_point_balances_and_rejects_like_tc() {
    let tcp_svc = with_external_scope(cluster_ip("web", 80, TCP, &BACKENDS));
    let udp_svc = with_external_scope(cluster_ip("dns", 53, UDP, &BACKENDS));
    let empty = with_external_scope(cluster_ip("empty", 443, TCP, &[]));
    let empty_udp = with_external_scope(cluster_ip("empty-udp", 5000, UDP, &[]));
    let Some(mut h) = setup(&tcp_svc) else { return };
    for svc in [&udp_svc, &empty, &empty_udp] {
        h.program(svc);
    }
    let client = socket([203, 0, 113, 2], 55_555);
    let syn = Packet::tcp(client, vip(80), flags::SYN, b"x");
    let backend = h.expected_backend(&tcp_svc, client, vip(80), TCP);
    let run = h.run(Hook::Xdp, &syn.bytes());
    assert_eq!(run.verdict, xdp::PASS);
    assert_frame_eq(&run.out, &syn.with_dst(backend).bytes(), "XDP DNAT");

    let query = Packet::udp(client, vip(53), b"q").with_zero_udp_checksum();
    let backend = h.expected_backend(&udp_svc, client, vip(53), UDP);
    assert_frame_eq(
        &h.run(Hook::Xdp, &query.bytes()).out,
        &query.with_dst(backend).bytes(),
        "XDP UDP",
    );
    let query = Packet::udp(client, vip(53), b"with checksum");
    let backend = h.expected_backend(&udp_svc, client, vip(53), UDP);
    assert_frame_eq(
        &h.run(Hook::Xdp, &query.bytes()).out,
        &query.with_dst(backend).bytes(),
        "XDP UDP checksum",
    );

    let refused = Packet::tcp(client, vip(443), flags::SYN, &[]);
    let run = h.run(Hook::Xdp, &refused.bytes());
    assert_eq!(run.verdict, xdp::TX);
    assert_frame_eq(&run.out, &expected_rst(&refused, 0, Some(1001)), "XDP RST");

    let refused = Packet::udp(client, vip(5000), b"nobody home");
    let run = h.run(Hook::Xdp, &refused.bytes());
    assert_eq!(run.verdict, xdp::TX);
    assert_frame_eq(
        &run.out,
        &expected_port_unreachable(&refused),
        "XDP port unreachable",
    );
    // The two datagrams share a 5-tuple: the second one is the same flow.
    assert_eq!(
        h.verdicts(),
        counts(&[
            ("new_flow", 2),
            ("established", 1),
            ("reject_no_backend", 2)
        ])
    );
}
