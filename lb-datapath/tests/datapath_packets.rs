//! Packets out of the ordinary in the real datapath programs (BPF_PROG_TEST_RUN): traffic for
//! other addresses passes byte for byte and uncounted; truncated and malformed packets are passed
//! or dropped, never corrupted; IPv4 options and fragments are carried through NAT; ICMP errors
//! about a flow are translated like the flow. Needs root.

mod common;

use common::{
    harness::{
        Hook, TCP, UDP, addrs::*, cluster_ip, counts, setup, tc, vip, with_external_scope, xdp,
    },
    packet::{Packet, assert_frame_eq, flags},
};
use etherparse::icmpv4::DestUnreachableHeader;

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
