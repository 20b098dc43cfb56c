//! SCTP through the real datapath programs (BPF_PROG_TEST_RUN): balanced like TCP and UDP, but
//! only its addresses are ever rewritten. Its CRC32c covers no address, so a translated packet
//! keeps its checksum field byte for byte, and only the IPv4 header checksum changes. A
//! source-NATed SCTP flow keeps its client's port; a second flow that would need the same node
//! port towards the same backend is dropped (`drop_snat_ports`). Frontends without endpoints
//! answer ICMP port unreachable. The predictor behind `lbctl trace` agrees. Needs root.
//!
//! The frames are built by hand (`lb_testbed::packet::sctp_header`), their CRC32c computed from
//! scratch, so comparing whole frames checks that the datapath left it untouched.

mod common;

use std::net::SocketAddrV4;

use common::{
    expected::expected_port_unreachable,
    external::*,
    harness::{Hook, addrs, counts, setup, socket, tc, vip, xdp},
    packet::{Packet, assert_frame_eq, sctp_checksum_ok, sctp_chunk_type, sctp_init_chunk},
};
use lb_common::{
    conntrack::{FORWARD, REPLY, ct_flags, timeout},
    maps::{scope, snat},
    net::proto::SCTP,
    stats::Reason,
};
use lb_datapath::{
    predict::{self, Forward, Reply, SourceNat, coarse_now_ns, flow_key},
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec},
};

/// The S1AP port: SCTP services are typically reached on the port their pods serve.
const PORT: u16 = 36_412;

fn backends() -> [SocketAddrV4; 3] {
    addrs::BACKENDS.map(|b| SocketAddrV4::new(*b.ip(), PORT))
}

/// A ClusterIP `VIP:36412/SCTP` over `backends` (all on this node), as the agent programs it:
/// each backend on the frontend's port.
fn sctp_cluster_ip(backends: &[SocketAddrV4]) -> ServiceSpec {
    common::harness::cluster_ip("s1ap", PORT, SCTP, backends)
}

/// The SCTP part of a frame (after Ethernet and an option-less IPv4 header).
fn sctp_of(frame: &[u8]) -> &[u8] {
    &frame[34..]
}

#[test]
fn an_sctp_init_to_a_cluster_ip_has_only_its_destination_address_rewritten() {
    let backends = backends();
    let svc = sctp_cluster_ip(&backends);
    let Some(mut h) = setup(&svc) else { return };
    let client = socket([10, 0, 1, 2], 40_000);
    let init = Packet::sctp_init(client, vip(PORT), 0x1234_5678);
    let backend = h.expected_backend(&svc, client, vip(PORT), SCTP);
    assert_eq!(backend.port(), PORT);

    match predict::forward(&h.maps, client, vip(PORT), SCTP, scope::INTERNAL, false).unwrap() {
        Forward::NewFlow {
            backend: predicted,
            snat: None,
            ..
        } => assert_eq!(predicted, backend),
        other => panic!("predicted {other:?}"),
    }

    let input = init.bytes();
    let run = h.run(Hook::FromPod, &input);
    assert_eq!(run.verdict, tc::PASS);
    // The whole expected frame is built from scratch: the destination address changed, the IP
    // checksum recomputed, the SCTP header and chunks (ports, tag, CRC32c) as they were.
    assert_frame_eq(&run.out, &init.clone().with_dst(backend).bytes(), "DNAT");
    assert_eq!(sctp_of(&run.out), sctp_of(&input), "SCTP bytes untouched");
    assert!(sctp_checksum_ok(sctp_of(&run.out)));

    // The conntrack entry: established at once, SCTP's idle timeout.
    let entry = h
        .maps
        .ct
        .get(&flow_key(client, vip(PORT), SCTP, FORWARD), 0)
        .expect("forward entry");
    assert_eq!(entry.flags, ct_flags::ESTABLISHED);
    let left = entry.deadline_ns.saturating_sub(coarse_now_ns());
    assert!(left > timeout::SCTP - 5_000_000_000 && left <= timeout::SCTP);

    // The backend's INIT-ACK comes back from the ClusterIP, its CRC32c as the backend sent it.
    let init_ack = Packet::sctp(
        backend,
        client,
        0x1234_5678,
        &sctp_init_chunk(sctp_chunk_type::INIT_ACK, 0x0abc_def0),
    );
    assert_eq!(
        predict::reply(&h.maps, backend, client, SCTP).unwrap(),
        Reply::ReverseNat {
            frontend: vip(PORT),
            client: None,
            set_id: entry.set_id,
            backend_id: entry.backend_id,
            entry: h
                .maps
                .ct
                .get(&flow_key(backend, client, SCTP, REPLY), 0)
                .unwrap(),
        }
    );
    let reply_in = init_ack.bytes();
    let run = h.run(Hook::ToPod, &reply_in);
    assert_eq!(run.verdict, tc::PASS);
    assert_frame_eq(
        &run.out,
        &init_ack.clone().with_src(vip(PORT)).bytes(),
        "reverse NAT",
    );
    assert_eq!(sctp_of(&run.out), sctp_of(&reply_in));

    // The rest of the association keeps its backend.
    let cookie_echo = Packet::sctp(client, vip(PORT), 0x0abc_def0, &[10, 0, 0, 8, 1, 2, 3, 4]);
    let run = h.run(Hook::FromPod, &cookie_echo.bytes());
    assert_frame_eq(
        &run.out,
        &cookie_echo.with_dst(backend).bytes(),
        "established",
    );
    assert!(matches!(
        predict::forward(&h.maps, client, vip(PORT), SCTP, scope::INTERNAL, false).unwrap(),
        Forward::Established { backend: b, snat: None, .. } if b == backend
    ));
    assert_eq!(
        h.verdicts(),
        counts(&[("new_flow", 1), ("reply_nat", 1), ("established", 1)])
    );
}

#[test]
fn an_sctp_frontend_without_endpoints_answers_port_unreachable() {
    let svc = sctp_cluster_ip(&[]);
    let Some(mut h) = setup(&svc) else { return };
    let init = Packet::sctp_init(addrs::CLIENT, vip(PORT), 7);
    assert!(matches!(
        predict::forward(
            &h.maps,
            addrs::CLIENT,
            vip(PORT),
            SCTP,
            scope::INTERNAL,
            false
        )
        .unwrap(),
        Forward::NoBackend { drop: false, .. }
    ));
    let run = h.run(Hook::FromPod, &init.bytes());
    assert_eq!(run.verdict, tc::REDIRECT);
    assert_frame_eq(
        &run.out,
        &expected_port_unreachable(&init),
        "ICMP port unreachable, never a RST",
    );
    // A port of the ClusterIP it does not serve: rejected the same way.
    let other = Packet::sctp_init(addrs::CLIENT, vip(PORT + 1), 7);
    let run = h.run(Hook::FromPod, &other.bytes());
    assert_frame_eq(&run.out, &expected_port_unreachable(&other), "unknown port");
    assert_eq!(
        h.verdicts(),
        counts(&[("reject_no_backend", 1), ("reject_unknown_port", 1)])
    );
}

/// The remote backend of the NodePort tests, on the NodePort itself (the agent serves an SCTP
/// NodePort only when it equals its backends' port).
fn remote_backend() -> SocketAddrV4 {
    SocketAddrV4::new(*REMOTE_POD.ip(), NODE_PORT)
}

fn sctp_node_port() -> ServiceSpec {
    ServiceSpec {
        name: "s1ap-np".to_owned(),
        frontends: vec![FrontendSpec {
            addr: NODE,
            port: NODE_PORT,
            proto: SCTP,
            scope: scope::EXTERNAL,
            kind: FrontendKind::NodePort,
        }],
        backends: vec![BackendSpec {
            addr: remote_backend(),
            local: false,
            weight: 1,
        }],
        ..Default::default()
    }
}

fn init_from(client: SocketAddrV4, tag: u32) -> Packet {
    let mut pkt = Packet::sctp_init(client, node_port(), tag);
    pkt.eth_src = CLIENT_MAC;
    pkt.eth_dst = UPLINK_MAC;
    pkt
}

#[test]
fn an_external_sctp_flow_to_another_node_keeps_its_clients_port_and_a_clash_is_dropped() {
    in_routed_namespace(|h| {
        h.program(&sctp_node_port());
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        let client = socket([192, 168, 50, 2], 40_000);
        // The source the node gives it: its own address, the client's port (outside the SNAT
        // range).
        let source = SocketAddrV4::new(NODE, client.port());
        match predict::forward(&h.maps, client, node_port(), SCTP, scope::EXTERNAL, false).unwrap()
        {
            Forward::NewFlow {
                backend,
                snat: Some(SourceNat::Node(choice)),
                ..
            } => assert_eq!((backend, choice.source), (remote_backend(), source)),
            other => panic!("predicted {other:?}"),
        }
        let init = init_from(client, 0x1111_1111);
        let input = init.bytes();
        let run = h.run(Hook::Xdp, &input);
        assert_eq!(run.verdict, xdp::REDIRECT);
        assert_eq!(snat_source(h, client, SCTP), source);
        assert_frame_eq(
            &run.out,
            &routed(
                init.clone().with_dst(remote_backend()).with_src(source),
                OTHER_NODE_MAC,
            ),
            "DNAT + SNAT of the address only, routed",
        );
        assert_eq!(sctp_of(&run.out), sctp_of(&input), "SCTP bytes untouched");

        // The backend's answer to the node's address and the client's port is reversed.
        let mut init_ack = Packet::sctp(
            remote_backend(),
            source,
            0x1111_1111,
            &sctp_init_chunk(sctp_chunk_type::INIT_ACK, 0x2222_2222),
        );
        init_ack.eth_src = OTHER_NODE_MAC;
        init_ack.eth_dst = UPLINK_MAC;
        assert!(matches!(
            predict::forward(
                &h.maps,
                remote_backend(),
                source,
                SCTP,
                scope::EXTERNAL,
                false
            )
            .unwrap(),
            Forward::SnatReply(_)
        ));
        let run = h.run(Hook::Xdp, &init_ack.bytes());
        assert_eq!(run.verdict, xdp::REDIRECT);
        assert_frame_eq(
            &run.out,
            &routed(init_ack.with_src(node_port()).with_dst(client), CLIENT_MAC),
            "reply reversed",
        );

        // Another client with the same port would need the same node port towards the same
        // backend: dropped and counted, in both hooks, and so predicted.
        let rival = socket([192, 168, 50, 3], 40_000);
        assert!(matches!(
            predict::forward(&h.maps, rival, node_port(), SCTP, scope::EXTERNAL, false).unwrap(),
            Forward::DropSnatPorts { .. }
        ));
        for hook in [Hook::Xdp, Hook::ExtIn] {
            let run = h.run(hook, &init_from(rival, 0x3333_3333).bytes());
            let drop = if hook == Hook::Xdp {
                xdp::DROP
            } else {
                tc::SHOT
            };
            assert_eq!(run.verdict, drop, "{hook:?}");
        }
        assert!(
            h.maps.ct.get(&forward_key(rival, SCTP), 0).is_err(),
            "no state for the dropped flow"
        );
        // The first flow is unharmed; a client with another port is served.
        let run = h.run(Hook::Xdp, &init.bytes());
        assert_eq!(run.verdict, xdp::REDIRECT);
        let other_port = socket([192, 168, 50, 3], 40_001);
        let run = h.run(Hook::Xdp, &init_from(other_port, 0x4444_4444).bytes());
        assert_eq!(run.verdict, xdp::REDIRECT);
        assert_eq!(
            snat_source(h, other_port, SCTP),
            SocketAddrV4::new(NODE, 40_001)
        );
        assert_eq!(h.verdict_count(Reason::DropSnatPorts), 2);
        assert_eq!(h.verdict_count(Reason::NewFlow), 2);
        assert_eq!(h.verdict_count(Reason::Established), 1);
        assert_eq!(h.verdict_count(Reason::ReplyNat), 1);
    });
}
