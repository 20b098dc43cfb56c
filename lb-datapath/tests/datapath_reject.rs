//! Frontends that cannot serve a packet, in the real datapath programs (BPF_PROG_TEST_RUN): a
//! service without backends rejects TCP with a reset and UDP with an ICMP port unreachable, or
//! drops silently when its policy says so; a ClusterIP rejects the ports and protocols it does
//! not serve. The rejects are compared whole. Needs root.

mod common;

use common::{
    expected::{expected_port_unreachable, expected_rst},
    harness::{Hook, TCP, UDP, addrs::*, cluster_ip, counts, setup, socket, tc, vip},
    packet::{Packet, assert_frame_eq, flags},
};

#[test]
fn a_service_without_backends_rejects_tcp_with_a_reset() {
    let svc = cluster_ip("empty", 80, TCP, &[]);
    let Some(mut h) = setup(&svc) else { return };
    let syn = Packet::tcp(CLIENT, vip(80), flags::SYN, b"early data");
    let ack = Packet::tcp(CLIENT, vip(80), flags::ACK, &[]);
    for (segment, rst, what) in [
        // A SYN with data: the RST acknowledges the SYN and every data byte.
        (
            &syn,
            expected_rst(&syn, 0, Some(1000 + 1 + 10)),
            "RST for a SYN",
        ),
        // A segment with ACK: the RST takes its sequence number from that ACK.
        (&ack, expected_rst(&ack, 5000, None), "RST for an ACK"),
    ] {
        let run = h.run(Hook::FromPod, &segment.bytes());
        assert_eq!(run.verdict, tc::REDIRECT, "{what}");
        assert_frame_eq(&run.out, &rst, what);
    }

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
    let wrong_proto = Packet::udp(CLIENT, vip(80), b"udp to a tcp-only port");
    let gre = Packet::other(*CLIENT.ip(), VIP, 47, b"gre payload");
    for (refused, reject, what) in [
        (
            &wrong_port,
            expected_rst(&wrong_port, 0, Some(1001)),
            "RST for an unknown port",
        ),
        (
            &wrong_proto,
            expected_port_unreachable(&wrong_proto),
            "ICMP for an unknown protocol",
        ),
        (&gre, expected_port_unreachable(&gre), "ICMP for GRE"),
    ] {
        let run = h.run(Hook::FromPod, &refused.bytes());
        assert_eq!(run.verdict, tc::REDIRECT, "{what}");
        assert_frame_eq(&run.out, &reject, what);
    }
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

/// Rejects go to unicast sources only: a spoofed multicast, broadcast, loopback or "this
/// network" source, or a group MAC, gets nothing back, and the datapath counts what it kept to
/// itself.
#[test]
fn rejects_answer_unicast_sources_only() {
    let svc = cluster_ip("empty", 80, TCP, &[]);
    let Some(mut h) = setup(&svc) else { return };
    let sources = [
        [224, 0, 0, 1],
        [255, 255, 255, 255],
        [127, 0, 0, 1],
        [0, 1, 2, 3],
    ];
    for src in sources {
        let syn = Packet::tcp(socket(src, 40_000), vip(80), flags::SYN, &[]);
        let run = h.run(Hook::FromPod, &syn.bytes());
        assert_eq!(run.verdict, tc::SHOT, "{src:?}");
    }
    let mut group_mac = Packet::tcp(CLIENT, vip(80), flags::SYN, &[]);
    group_mac.eth_src = [0x01, 0, 0x5e, 0, 0, 1];
    assert_eq!(h.run(Hook::FromPod, &group_mac.bytes()).verdict, tc::SHOT);
    assert_eq!(
        h.verdicts(),
        counts(&[("reject_no_backend", 5), ("answer_suppressed", 5)])
    );
}

/// A flood of packets that would each be rejected gets at most the node's burst of answers
/// (50), then one a millisecond (the kernel's own ICMP rate limits): a spoofed flood cannot
/// turn the node into a reflector.
#[test]
fn rejects_are_rate_limited_per_node() {
    let svc = cluster_ip("empty", 53, UDP, &[]);
    let Some(mut h) = setup(&svc) else { return };
    let started = std::time::Instant::now();
    let sent = 400;
    let mut answered = 0u64;
    for port in 0..sent {
        let query = Packet::udp(socket([10, 0, 1, 2], 20_000 + port), vip(53), b"query");
        if h.run(Hook::FromPod, &query.bytes()).verdict == tc::REDIRECT {
            answered += 1;
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    assert!(answered >= 50, "the burst goes out: {answered}");
    // The datapath's clock is coarse (a jiffy, up to 10 ms): the refill comes in such steps.
    assert!(
        answered <= 50 + elapsed_ms + 10,
        "{answered} answers in {elapsed_ms} ms"
    );
    assert_eq!(
        h.verdicts(),
        counts(&[
            ("reject_no_backend", u64::from(sent)),
            ("answer_suppressed", u64::from(sent) - answered)
        ])
    );
}
