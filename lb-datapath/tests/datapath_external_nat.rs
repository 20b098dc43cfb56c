//! The external path's source-NATed flows beyond their first packets (BPF_PROG_TEST_RUN): the
//! later fragments of their datagrams and the ICMP errors about them, both ways, go where the
//! flow goes, translated; and a flow that lost one half of its state gets it back from the other.
//! Needs root; every test runs in a routed namespace of its own (`common::external`).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{
    external::*,
    harness::{Harness, Hook, TCP, UDP, tc, xdp},
    packet::{Packet, assert_frame_eq, flags},
};
use etherparse::icmpv4::DestUnreachableHeader;
use lb_common::{
    conntrack::{CtEntry, FlowKey, REFRESH_INTERVAL_NS},
    maps::snat,
    stats::Reason,
};

/// A router on the uplink's subnet (neither the client nor a node).
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);

/// `pkt` as it arrives on the uplink from `mac`.
fn arriving(mut pkt: Packet, mac: [u8; 6]) -> Packet {
    pkt.eth_src = mac;
    pkt.eth_dst = UPLINK_MAC;
    pkt
}

/// `pkt` as this node routes it on to `next_hop_mac`, split into two fragments like the input.
fn routed_fragments(mut pkt: Packet, next_hop_mac: [u8; 6], first_len: usize) -> [Vec<u8>; 2] {
    pkt.eth_src = UPLINK_MAC;
    pkt.eth_dst = next_hop_mac;
    pkt.ip.time_to_live -= 1;
    pkt.fragments(first_len)
}

/// A datagram too big for one frame, from a client to a backend on another node and back: its
/// later fragments are translated like their first fragment and routed where it went (passed
/// to the stack with the node's own address as source they would be dropped), at XDP and at tc.
#[test]
fn fragments_of_source_natted_datagrams_follow_their_first_both_ways() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("dns", UDP, &[(REMOTE_POD_2, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        for (hook, port) in [(Hook::Xdp, 40_000), (Hook::ExtIn, 40_001)] {
            let client = SocketAddrV4::new(*CLIENT.ip(), port);
            let query = arriving(Packet::udp(client, node_port(), &[7; 64]), CLIENT_MAC);
            let [first, later] = query.fragments(32);
            let run = h.run(hook, &first);
            let source = snat_source(h, client, UDP);
            let want = routed_fragments(
                query.clone().with_dst(REMOTE_POD_2).with_src(source),
                OTHER_NODE_MAC,
                32,
            );
            assert_frame_eq(&run.out, &want[0], "first fragment");
            let run = h.run(hook, &later);
            assert_eq!(run.verdict, redirect(hook), "{hook:?}");
            assert_frame_eq(&run.out, &want[1], "later fragment, routed like the first");

            let answer = arriving(Packet::udp(REMOTE_POD_2, source, &[9; 80]), OTHER_NODE_MAC);
            let [first, later] = answer.fragments(40);
            let want = routed_fragments(
                answer.clone().with_src(node_port()).with_dst(client),
                CLIENT_MAC,
                40,
            );
            let run = h.run(hook, &first);
            assert_frame_eq(&run.out, &want[0], "first reply fragment");
            let run = h.run(hook, &later);
            assert_eq!(run.verdict, redirect(hook), "{hook:?}");
            assert_frame_eq(&run.out, &want[1], "later reply fragment");
        }
        assert_eq!(h.verdict_count(Reason::FragmentNat), 4);
        assert_eq!(h.verdict_count(Reason::DropFragment), 0);
    });
}

/// Path MTU discovery through a source-NATed flow: an ICMP error about a packet this node sent
/// on (to the node, quoting node port -> backend) reaches the client quoting what it sent
/// (client -> frontend), from the frontend when the backend itself sent it; an error about a
/// reply (to the frontend, quoting frontend -> client) reaches the backend quoting what it sent
/// (backend -> node port).
#[test]
fn icmp_errors_about_source_natted_flows_reach_their_sockets() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        h.run(Hook::Xdp, &from_client(CLIENT, flags::SYN).bytes());
        let source = snat_source(h, CLIENT, TCP);
        let mtu = DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 };

        // A router towards the other node finds a segment too big.
        let sent = Packet::tcp(source, REMOTE_POD, flags::ACK, &[0xab; 64]);
        let error = arriving(
            Packet::icmp_unreachable(ROUTER, NODE, mtu.clone(), &sent, 28),
            OTHER_NODE_MAC,
        );
        let quote = sent.clone().with_src(CLIENT).with_dst(node_port());
        let want = Packet::icmp_unreachable(ROUTER, *CLIENT.ip(), mtu.clone(), &quote, 28);
        let run = h.run(Hook::Xdp, &error.bytes());
        assert_eq!(run.verdict, xdp::REDIRECT);
        assert_frame_eq(&run.out, &routed(want, CLIENT_MAC), "towards the client");

        // The backend itself refuses: the client hears it from the frontend.
        let error = arriving(
            Packet::icmp_unreachable(
                *REMOTE_POD.ip(),
                NODE,
                DestUnreachableHeader::Port,
                &sent,
                8,
            ),
            OTHER_NODE_MAC,
        );
        let want =
            Packet::icmp_unreachable(NODE, *CLIENT.ip(), DestUnreachableHeader::Port, &quote, 8);
        let run = h.run(Hook::ExtIn, &error.bytes());
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_frame_eq(&run.out, &routed(want, CLIENT_MAC), "from the frontend");

        // A router towards the client finds a reply too big: the backend hears of it.
        let reply = Packet::tcp(node_port(), CLIENT, flags::ACK, &[0xcd; 64]);
        let error = arriving(
            Packet::icmp_unreachable(ROUTER, NODE, mtu.clone(), &reply, 28),
            CLIENT_MAC,
        );
        let as_backend_sent = reply.clone().with_src(REMOTE_POD).with_dst(source);
        let mut want =
            Packet::icmp_unreachable(ROUTER, *REMOTE_POD.ip(), mtu, &as_backend_sent, 28);
        want.eth_src = CLIENT_MAC;
        want.eth_dst = UPLINK_MAC;
        let run = h.run(Hook::Xdp, &error.bytes());
        assert_eq!(run.verdict, xdp::PASS, "the stack forwards it");
        assert_frame_eq(&run.out, &want.bytes(), "towards the backend");
        assert_eq!(h.verdict_count(Reason::IcmpErrorNat), 3);
    });
}

/// The LRU may evict one half of an idle flow. Each half rebuilds the other the next time it
/// is written (a state change, or its lifetime moving by more than the refresh interval): the
/// flow keeps its backend and its source port, whichever side speaks first.
#[test]
fn a_flow_that_lost_one_half_of_its_state_gets_it_back_from_the_other() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        h.run(Hook::Xdp, &from_client(CLIENT, flags::SYN).bytes());
        let source = snat_source(h, CLIENT, TCP);
        h.run(
            Hook::Xdp,
            &from_remote_pod(source.port(), flags::SYN | flags::ACK).bytes(),
        );
        h.run(Hook::Xdp, &from_client(CLIENT, flags::ACK).bytes());
        let forward = h.maps.ct.get(&forward_key(CLIENT, TCP), 0).unwrap();
        let reply_key = remote_reply_key(source.port());
        // Ages an entry as if it had not been written for longer than the refresh interval.
        let age = |h: &mut Harness, key: &FlowKey| {
            let mut entry = h.maps.ct.get(key, 0).unwrap();
            entry.deadline_ns -= 2 * REFRESH_INTERVAL_NS;
            h.maps.ct.insert(key, entry, 0).unwrap();
        };

        // The forward half is gone; the backend speaks first.
        h.maps.ct.remove(&forward_key(CLIENT, TCP)).unwrap();
        age(h, &reply_key);
        let data = from_remote_pod(source.port(), flags::ACK | flags::PSH);
        let run = h.run(Hook::Xdp, &data.bytes());
        assert_frame_eq(
            &run.out,
            &routed(data.with_src(node_port()).with_dst(CLIENT), CLIENT_MAC),
            "the reply is translated",
        );
        let rebuilt = h.maps.ct.get(&forward_key(CLIENT, TCP), 0).unwrap();
        assert_eq!(
            rebuilt,
            CtEntry {
                deadline_ns: rebuilt.deadline_ns,
                ..forward
            },
            "the forward half is back as it was"
        );
        let ack = from_client(CLIENT, flags::ACK);
        let run = h.run(Hook::Xdp, &ack.bytes());
        assert_frame_eq(
            &run.out,
            &routed(ack.with_dst(REMOTE_POD).with_src(source), OTHER_NODE_MAC),
            "same backend, same source port",
        );

        // The reply half is gone; the client speaks first.
        h.maps.ct.remove(&reply_key).unwrap();
        age(h, &forward_key(CLIENT, TCP));
        h.run(Hook::Xdp, &from_client(CLIENT, flags::ACK).bytes());
        let data = from_remote_pod(source.port(), flags::ACK);
        let run = h.run(Hook::Xdp, &data.bytes());
        assert_frame_eq(
            &run.out,
            &routed(data.with_src(node_port()).with_dst(CLIENT), CLIENT_MAC),
            "the reply half is back",
        );
        assert_eq!(h.verdict_count(Reason::NewFlow), 1, "never balanced anew");
    });
}
