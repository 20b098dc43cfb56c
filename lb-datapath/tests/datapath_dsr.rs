//! Direct server return through the real datapath programs (BPF_PROG_TEST_RUN), both halves:
//! the node a client reaches forwards its flow to another node's backend with the client's
//! address kept and the frontend carried in an IPv4 option on the SYN; the backend's node
//! records the reverse NAT from that option and gives the replies the frontend back as they
//! leave. Needs root; every test runs in a routed namespace of its own (`common::external`).

mod common;

use std::net::SocketAddrV4;

use common::{
    external::*,
    harness::{Harness, Hook, TCP, UDP, tc, xdp},
    packet::{Packet, assert_frame_eq, flags},
};
use lb_common::{
    conntrack::{FORWARD, REPLY, ct_flags},
    dsr,
    maps::{scope, snat},
    stats::Reason,
};
use lb_datapath::{
    predict::{self, Forward, SourceNat, flow_key},
    program::ServiceSpec,
};

/// `node_port_service` with direct server return.
fn dsr_service(name: &str, l4_proto: u8, backends: &[(SocketAddrV4, bool)]) -> ServiceSpec {
    ServiceSpec {
        dsr: true,
        ..node_port_service(name, l4_proto, backends)
    }
}

/// The option carrying this node's NodePort, byte for byte.
fn node_port_option() -> [u8; 8] {
    let [a, b, c, d] = NODE.octets();
    let [p, q] = NODE_PORT.to_be_bytes();
    [0x9e, 8, p, q, a, b, c, d]
}

#[test]
fn the_entry_node_routes_the_flow_with_its_client_kept_and_the_frontend_on_the_syn() {
    in_routed_namespace(|h| {
        h.program(&dsr_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        for (hook, port) in [(Hook::Xdp, 40_000), (Hook::ExtIn, 40_001)] {
            let client = SocketAddrV4::new(*CLIENT.ip(), port);
            // `lbctl trace` predicts it.
            match predict::forward(&h.maps, client, node_port(), TCP, scope::EXTERNAL, true) {
                Ok(Forward::NewFlow {
                    backend,
                    snat: Some(SourceNat::Dsr),
                    ..
                }) => assert_eq!(backend, REMOTE_POD),
                other => panic!("predicted {other:?}"),
            }
            let syn = from_client(client, flags::SYN);
            let run = h.run(hook, &syn.bytes());
            let want = routed(
                syn.clone()
                    .with_dst(REMOTE_POD)
                    .with_ip_options(&node_port_option()),
                OTHER_NODE_MAC,
            );
            assert_frame_eq(&run.out, &want, "DNAT, client kept, option added, routed");
            assert_eq!(run.verdict, redirect(hook), "{hook:?}");
            let entry = h
                .maps
                .ct
                .get(&forward_key(client, TCP), 0)
                .expect("forward entry");
            assert!(entry.dsr(), "{entry:?}");
            assert_eq!(entry.flags & ct_flags::SNAT, 0, "no source NAT");

            // A retransmitted SYN carries the frontend again; the rest of the flow does not.
            let run = h.run(hook, &syn.bytes());
            assert_frame_eq(&run.out, &want, "retransmitted SYN");
            let ack = from_client(client, flags::ACK);
            let run = h.run(hook, &ack.bytes());
            assert_frame_eq(
                &run.out,
                &routed(ack.with_dst(REMOTE_POD), OTHER_NODE_MAC),
                "established: DNAT only",
            );
            assert_eq!(run.verdict, redirect(hook), "{hook:?}");
        }
        assert_eq!(h.verdict_count(Reason::NewFlow), 2);
        assert_eq!(h.verdict_count(Reason::Established), 4);
        assert_eq!(h.verdict_count(Reason::Forwarded), 6);
    });
}

#[test]
fn udp_local_backends_and_option_carrying_clients_are_not_dsr() {
    in_routed_namespace(|h| {
        h.program(&dsr_service("dns", UDP, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        // UDP is source-NATed: no datagram is sure to reach the backend's node first.
        let mut query = Packet::udp(CLIENT, node_port(), b"query");
        query.eth_src = CLIENT_MAC;
        query.eth_dst = UPLINK_MAC;
        h.run(Hook::Xdp, &query.bytes());
        assert_eq!(*snat_source(h, CLIENT, UDP).ip(), NODE);

        // A client whose SYN has options of its own is source-NATed too.
        h.program(&dsr_service("web", TCP, &[(REMOTE_POD, false)]));
        let syn = from_client(CLIENT, flags::SYN).with_ip_options(&[1, 1, 1, 1]);
        h.run(Hook::ExtIn, &syn.bytes());
        assert_eq!(*snat_source(h, CLIENT, TCP).ip(), NODE);

        // A backend on this node needs neither: DNAT alone, no option, through the stack.
        h.program(&dsr_service("web", TCP, &[(LOCAL_POD, true)]));
        let client = SocketAddrV4::new(*CLIENT.ip(), 40_100);
        let syn = from_client(client, flags::SYN);
        let run = h.run(Hook::Xdp, &syn.bytes());
        assert_eq!(run.verdict, xdp::PASS);
        assert_frame_eq(&run.out, &syn.with_dst(LOCAL_POD).bytes(), "DNAT only");
        let entry = h.maps.ct.get(&forward_key(client, TCP), 0).unwrap();
        assert!(!entry.dsr() && entry.flags & ct_flags::SNAT == 0);
    });
}

#[test]
fn the_backends_node_gives_replies_the_frontend_the_syn_carried() {
    in_routed_namespace(|h| {
        // This node holds the backend; the client reached the NodePort of `OTHER_NODE`.
        let frontend = SocketAddrV4::new(OTHER_NODE, NODE_PORT);
        let option = {
            let [a, b, c, d] = OTHER_NODE.octets();
            let [p, q] = NODE_PORT.to_be_bytes();
            [dsr::OPTION_TYPE, 8, p, q, a, b, c, d]
        };
        for (hook, port) in [(Hook::Xdp, 41_000), (Hook::ExtIn, 41_001)] {
            let client = SocketAddrV4::new(*CLIENT.ip(), port);
            let mut syn = Packet::tcp(client, LOCAL_POD, flags::SYN, b"").with_ip_options(&option);
            syn.eth_src = OTHER_NODE_MAC;
            syn.eth_dst = UPLINK_MAC;
            let run = h.run(hook, &syn.bytes());
            let pass = if hook == Hook::Xdp {
                xdp::PASS
            } else {
                tc::PASS
            };
            assert_eq!(
                run.verdict, pass,
                "{hook:?}: on to the pod through the stack"
            );
            assert_frame_eq(&run.out, &syn.bytes(), "untouched");
            let reply_key = flow_key(LOCAL_POD, client, TCP, REPLY);
            let entry = h.maps.ct.get(&reply_key, 0).expect("reply entry");
            assert!(entry.dsr(), "{entry:?}");
            assert_eq!(
                SocketAddrV4::new(entry.nat_addr.to_ip(), entry.nat_port.to_host()),
                frontend
            );

            // The backend answers the client; leaving the uplink, it answers from the frontend.
            let mut answer = Packet::tcp(LOCAL_POD, client, flags::SYN | flags::ACK, b"");
            answer.eth_src = UPLINK_MAC;
            answer.eth_dst = CLIENT_MAC;
            let run = h.run(Hook::ExtOut, &answer.bytes());
            assert_eq!(run.verdict, tc::PASS);
            assert_frame_eq(
                &run.out,
                &answer.clone().with_src(frontend).bytes(),
                "reply from the frontend",
            );
            let ack = Packet::tcp(LOCAL_POD, client, flags::ACK, b"data");
            let run = h.run(Hook::ExtOut, &ack.bytes());
            assert_frame_eq(&run.out, &ack.with_src(frontend).bytes(), "and the rest");
            // Its forward half is the other node's: none is made here.
            let forward = flow_key(client, frontend, TCP, FORWARD);
            assert!(h.maps.ct.get(&forward, 0).is_err(), "{hook:?}");
        }
        assert_eq!(h.verdict_count(Reason::DsrAccepted), 2);
        assert_eq!(h.verdict_count(Reason::ReplyNat), 4);

        // Options that are not ours, or ours on anything but a SYN, record nothing.
        let client = SocketAddrV4::new(*CLIENT.ip(), 41_002);
        for (tcp_flags, options) in [
            (flags::SYN, [0x94, 4, 0, 0, 1, 1, 1, 1]),
            (flags::ACK, option),
            (flags::SYN | flags::ACK, option),
        ] {
            let pkt = Packet::tcp(client, LOCAL_POD, tcp_flags, b"").with_ip_options(&options);
            let run = h.run(Hook::ExtIn, &pkt.bytes());
            assert_eq!(run.verdict, tc::PASS);
        }
        let reply_key = flow_key(LOCAL_POD, client, TCP, REPLY);
        assert!(h.maps.ct.get(&reply_key, 0).is_err());
        assert_eq!(h.verdict_count(Reason::DsrAccepted), 2);
    });
}

/// Linux gives one client port to connections to different destinations, so one client port
/// may reach the same backend through two DSR frontends. While the first flow lives, the second
/// is source-NATed: at the backend both would be one connection. This node never sees the
/// backend's FIN, so once the client has sent its own, the port goes by DSR again (else every
/// such flow would be source-NATed for the hour a half-closed flow may last). `lbctl trace`
/// predicts both.
#[test]
fn a_client_port_is_source_nated_only_while_its_dsr_flow_to_the_same_backend_lives() {
    in_routed_namespace(|h| {
        const OTHER_PORT: u16 = NODE_PORT + 1;
        let other = SocketAddrV4::new(NODE, OTHER_PORT);
        h.program(&dsr_service("web", TCP, &[(REMOTE_POD, false)]));
        let mut second = dsr_service("web-2", TCP, &[(REMOTE_POD, false)]);
        second.frontends[0].port = OTHER_PORT;
        h.program(&second);
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        let to_other = |client: SocketAddrV4| from_client(client, flags::SYN).with_dst(other);
        let predicted = |h: &Harness, client| match predict::forward(
            &h.maps,
            client,
            other,
            TCP,
            scope::EXTERNAL,
            true,
        ) {
            Ok(Forward::NewFlow { snat, .. }) => snat,
            other => panic!("predicted {other:?}"),
        };
        let second_key = |client| flow_key(client, other, TCP, FORWARD);

        for (port, client_closed) in [(40_200, false), (40_201, true)] {
            let client = SocketAddrV4::new(*CLIENT.ip(), port);
            h.run(Hook::Xdp, &from_client(client, flags::SYN).bytes());
            h.run(Hook::Xdp, &from_client(client, flags::ACK).bytes());
            if client_closed {
                h.run(
                    Hook::Xdp,
                    &from_client(client, flags::FIN | flags::ACK).bytes(),
                );
            }
            let first = h.maps.ct.get(&forward_key(client, TCP), 0).unwrap();
            assert!(first.dsr(), "{first:?}");

            let prediction = predicted(h, client);
            let syn = to_other(client);
            let run = h.run(Hook::Xdp, &syn.bytes());
            assert_eq!(run.verdict, xdp::REDIRECT);
            let entry = h
                .maps
                .ct
                .get(&second_key(client), 0)
                .expect("forward entry");
            if client_closed {
                assert_eq!(prediction, Some(SourceNat::Dsr));
                assert!(
                    entry.dsr() && entry.flags & ct_flags::SNAT == 0,
                    "{entry:?}"
                );
                let want = routed(
                    syn.with_dst(REMOTE_POD).with_ip_options(&{
                        let mut option = node_port_option();
                        option[2..4].copy_from_slice(&OTHER_PORT.to_be_bytes());
                        option
                    }),
                    OTHER_NODE_MAC,
                );
                assert_frame_eq(&run.out, &want, "by DSR, the client kept");
            } else {
                assert!(
                    matches!(prediction, Some(SourceNat::Node(_))),
                    "{prediction:?}"
                );
                assert!(!entry.dsr(), "{entry:?}");
                assert_eq!(entry.flags & ct_flags::SNAT, ct_flags::SNAT);
                assert_eq!(entry.snat_addr.to_ip(), NODE);
            }
        }
    });
}
