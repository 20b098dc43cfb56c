//! Direct connections (a pod to another pod's address, no frontend involved) in the real
//! datapath programs (BPF_PROG_TEST_RUN): untouched and stateless, unless their source port
//! clashes with a load-balanced flow to the same destination. Needs root.

mod common;

use std::net::SocketAddrV4;

use common::{
    harness::{Hook, TCP, UDP, addrs::*, cluster_ip, counts, setup, tc, vip},
    packet::{Packet, assert_frame_eq, flags},
};
use lb_common::{
    conntrack::{DIRECT, FORWARD, REPLY},
    maps::scope::INTERNAL,
};
use lb_datapath::predict::{self, Forward, flow_key};

/// Linux gives one local port to connections with different destinations: a pod that reached
/// a backend through a ClusterIP from port p may then connect from p to the backend's own
/// address. Both would reach the backend as one connection, and its replies to the direct one
/// would be reverse-NATed as the balanced flow's. As nf_nat does, the direct connection gets
/// another source port (its address kept) and both go on, each with its own replies; the
/// predictor tells the same. A direct connection that clashes with nothing stays untouched,
/// uncounted and stateless, before and after.
#[test]
fn a_direct_connection_from_a_port_a_balanced_flow_holds_gets_another_port() {
    for l4_proto in [TCP, UDP] {
        let svc = cluster_ip("web", 80, l4_proto, &BACKENDS[..1]);
        let Some(mut h) = setup(&svc) else {
            return;
        };
        let backend = BACKENDS[0];
        let opening = |src, dst| match l4_proto {
            TCP => Packet::tcp(src, dst, flags::SYN, &[]),
            _ => Packet::udp(src, dst, b"query"),
        };
        let more = |src, dst| match l4_proto {
            TCP => Packet::tcp(src, dst, flags::ACK, b"more"),
            _ => Packet::udp(src, dst, b"more"),
        };
        let answer = |src, dst| match l4_proto {
            TCP => Packet::tcp(src, dst, flags::ACK, b"answer"),
            _ => Packet::udp(src, dst, b"answer"),
        };
        let bystander = SocketAddrV4::new(*CLIENT.ip(), CLIENT.port() + 1);
        let untouched = |h: &mut common::harness::Harness, packet: &Packet, what: &str| {
            let predicted = predict::forward(
                &h.maps,
                packet.src(),
                packet.dst(),
                l4_proto,
                INTERNAL,
                true,
            )
            .unwrap();
            assert_eq!(predicted, Forward::NotAFrontend, "{l4_proto} {what}");
            let run = h.run(Hook::FromPod, &packet.bytes());
            assert_eq!(run.verdict, tc::PASS);
            assert_frame_eq(&run.out, &packet.bytes(), what);
        };

        untouched(&mut h, &opening(bystander, backend), "a direct connection");
        let run = h.run(Hook::FromPod, &opening(CLIENT, vip(80)).bytes());
        assert_frame_eq(
            &run.out,
            &opening(CLIENT, vip(80)).with_dst(backend).bytes(),
            "the balanced flow keeps its port",
        );

        // The direct connection from the balanced flow's port: the predictor and the datapath
        // agree on the port it gets instead.
        let predicted =
            predict::forward(&h.maps, CLIENT, backend, l4_proto, INTERNAL, true).unwrap();
        let Forward::DirectRemapped { choice, held, .. } = predicted else {
            panic!("{l4_proto}: predicted {predicted:?}");
        };
        assert_eq!(
            held.nat_addr.to_ip(),
            *vip(80).ip(),
            "held by the balanced flow"
        );
        let remapped = choice.source;
        assert_eq!(remapped.ip(), CLIENT.ip(), "the client keeps its address");
        assert_ne!(remapped.port(), CLIENT.port());
        let run = h.run(Hook::FromPod, &opening(CLIENT, backend).bytes());
        assert_eq!(run.verdict, tc::PASS);
        assert_frame_eq(
            &run.out,
            &opening(CLIENT, backend).with_src(remapped).bytes(),
            "the direct connection gets another port",
        );
        let entry = h
            .maps
            .ct
            .get(&flow_key(CLIENT, backend, l4_proto, FORWARD), 0)
            .unwrap();
        assert_eq!((entry.set_id, entry.backend_id), (DIRECT, DIRECT));

        // Each connection's replies reach the client's own port, from where it sent to.
        for (dst, from) in [(CLIENT, vip(80)), (remapped, backend)] {
            let run = h.run(Hook::ToPod, &answer(backend, dst).bytes());
            assert_eq!(run.verdict, tc::PASS);
            assert_frame_eq(
                &run.out,
                &answer(backend, dst).with_src(from).with_dst(CLIENT).bytes(),
                "reply",
            );
        }

        // Both go on, each on its own source port; the bystander stays untouched.
        assert_eq!(
            predict::forward(&h.maps, CLIENT, backend, l4_proto, INTERNAL, false).unwrap(),
            Forward::DirectEstablished {
                destination: backend,
                source: remapped,
                entry: h
                    .maps
                    .ct
                    .get(&flow_key(CLIENT, backend, l4_proto, FORWARD), 0)
                    .unwrap(),
            }
        );
        for (dst, out) in [
            (vip(80), more(CLIENT, backend)),
            (backend, more(remapped, backend)),
        ] {
            let run = h.run(Hook::FromPod, &more(CLIENT, dst).bytes());
            assert_frame_eq(&run.out, &out.bytes(), "established");
        }
        untouched(
            &mut h,
            &more(bystander, backend),
            "a direct connection's next packet",
        );
        assert!(
            h.maps
                .ct
                .get(&flow_key(backend, bystander, l4_proto, REPLY), 0)
                .is_err(),
            "a direct connection that clashes with nothing leaves no state"
        );
        assert_eq!(
            h.verdicts(),
            counts(&[
                ("new_flow", 1),
                ("port_remapped", 1),
                ("reply_nat", 2),
                ("established", 2)
            ]),
            "{l4_proto}"
        );
    }
}
