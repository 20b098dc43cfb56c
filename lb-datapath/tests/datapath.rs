//! The real datapath programs, run by the kernel on crafted packets (BPF_PROG_TEST_RUN): new
//! flows to a ClusterIP balanced by Maglev and DNATed, their replies reverse-NATed (TCP and UDP),
//! and the XDP entry point doing what tc does. Every case compares whole output frames (built
//! independently, checksums computed from scratch) and the verdict, and checks the counters the
//! verdict must bump. Needs root.
//!
//! The other cases of the same kind: `datapath_flows` (flows across service changes, conntrack
//! lifetimes), `datapath_reject` (no backend, unserved ports), `datapath_packets` (traffic that
//! is not ours, malformed packets, IP options, fragments, ICMP errors); `datapath_external` (the
//! external path: source NAT, routing, hairpin).

mod common;

use std::{collections::BTreeMap, net::SocketAddrV4};

use common::{
    expected::{expected_port_unreachable, expected_rst},
    harness::{
        Hook, TCP, UDP, addrs::*, cluster_ip, counts, setup, socket, tc, vip, web_flow,
        with_external_scope, xdp,
    },
    packet::{Packet, assert_frame_eq, flags},
};

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
    let stats = h.maps.set_totals(h.set_id(&svc)).unwrap();
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
fn replies_are_reverse_nated_to_the_frontend() {
    let Some((mut h, svc, syn, backend)) = web_flow() else {
        return;
    };

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
    assert_eq!(h.maps.set_totals(h.set_id(&svc)).unwrap().packets, 3);
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

    let refused_tcp = Packet::tcp(client, vip(443), flags::SYN, &[]);
    let refused_udp = Packet::udp(client, vip(5000), b"nobody home");
    for (refused, reject, what) in [
        (
            &refused_tcp,
            expected_rst(&refused_tcp, 0, Some(1001)),
            "XDP RST",
        ),
        (
            &refused_udp,
            expected_port_unreachable(&refused_udp),
            "XDP port unreachable",
        ),
    ] {
        let run = h.run(Hook::Xdp, &refused.bytes());
        assert_eq!(run.verdict, xdp::TX, "{what}");
        assert_frame_eq(&run.out, &reject, what);
    }
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
