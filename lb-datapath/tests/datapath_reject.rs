//! Frontends that cannot serve a packet, in the real datapath programs (BPF_PROG_TEST_RUN): a
//! service without backends rejects TCP with a reset and UDP with an ICMP port unreachable, or
//! drops silently when its policy says so; a ClusterIP rejects the ports and protocols it does
//! not serve. The rejects are compared whole. Needs root.

mod common;

use common::{
    expected::{expected_port_unreachable, expected_rst},
    harness::{Hook, TCP, UDP, addrs::*, cluster_ip, counts, setup, tc, vip},
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
