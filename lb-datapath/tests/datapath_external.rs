//! The external path of the real datapath programs (BPF_PROG_TEST_RUN): NodePort-style frontends
//! reached from outside, source NAT towards backends on other nodes, the full reversal of their
//! replies, forwarding by FIB lookup, SNAT port allocation and lost NAT state; and hairpin flows
//! (a pod balanced to itself). Needs root.
//!
//! Every test runs inside a network namespace of its own with a dummy "uplink" and permanent
//! neighbour entries, so that the programs' FIB lookups have routes to find and the results do
//! not depend on the host's routing table.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{
    expected::expected_icmp_error,
    external::*,
    harness::{Harness, Hook, TCP, UDP, socket, tc, xdp},
    packet::{Packet, assert_frame_eq, flags},
};
use etherparse::{
    Icmpv4Type,
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
};
use lb_common::{
    Be32,
    conntrack::{CtEntry, ct_flags},
    maps::{scope, snat},
    stats::Reason,
};
use lb_datapath::program::{FrontendKind, FrontendSpec, ServiceSpec};

#[test]
fn an_external_flow_to_another_nodes_backend_is_source_natted_and_routed_there() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        for hook in [Hook::Xdp, Hook::ExtIn] {
            let client = socket(
                [192, 168, 50, 2],
                if hook == Hook::Xdp { 40_000 } else { 40_001 },
            );
            let syn = from_client(client, flags::SYN);
            let run = h.run(hook, &syn.bytes());
            let source = snat_source(h, client, TCP);
            assert_eq!(*source.ip(), NODE);
            assert!((snat::PORT_MIN..=snat::PORT_MAX).contains(&source.port()));
            let expected = routed(
                syn.clone().with_dst(REMOTE_POD).with_src(source),
                OTHER_NODE_MAC,
            );
            assert_frame_eq(&run.out, &expected, "DNAT + SNAT + routed");
            // Forwarded straight out of the uplink (not the interface it came in on).
            let redirect = if hook == Hook::Xdp {
                xdp::REDIRECT
            } else {
                tc::REDIRECT
            };
            assert_eq!(run.verdict, redirect, "{hook:?}");

            // The rest of the flow keeps its translation.
            let ack = from_client(client, flags::ACK);
            let run = h.run(hook, &ack.bytes());
            assert_frame_eq(
                &run.out,
                &routed(ack.with_dst(REMOTE_POD).with_src(source), OTHER_NODE_MAC),
                "established",
            );
        }
        assert_eq!(h.verdict_count(Reason::NewFlow), 2);
        assert_eq!(h.verdict_count(Reason::Established), 2);
        assert_eq!(h.verdict_count(Reason::Forwarded), 4);
    });
}

#[test]
fn the_reply_of_a_source_natted_flow_is_fully_reversed_before_it_leaves() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        let syn = from_client(CLIENT, flags::SYN);
        h.run(Hook::Xdp, &syn.bytes());
        let source = snat_source(h, CLIENT, TCP);

        // The backend answers the node; the client must see the NodePort answer it.
        let mut reply = Packet::tcp(REMOTE_POD, source, flags::SYN | flags::ACK, b"");
        reply.eth_src = OTHER_NODE_MAC;
        reply.eth_dst = UPLINK_MAC;
        let run = h.run(Hook::Xdp, &reply.bytes());
        let expected = routed(
            reply.clone().with_src(node_port()).with_dst(CLIENT),
            CLIENT_MAC,
        );
        assert_frame_eq(&run.out, &expected, "reply reversed");
        assert_eq!(run.verdict, xdp::REDIRECT);
        assert_eq!(h.verdict_count(Reason::ReplyNat), 1);

        // UDP too, with its checksum kept valid.
        h.program(&node_port_service("dns", UDP, &[(REMOTE_POD_2, false)]));
        let mut query = Packet::udp(CLIENT, node_port(), b"query");
        query.eth_src = CLIENT_MAC;
        query.eth_dst = UPLINK_MAC;
        let run = h.run(Hook::Xdp, &query.bytes());
        let source = snat_source(h, CLIENT, UDP);
        assert_frame_eq(
            &run.out,
            &routed(
                query.clone().with_dst(REMOTE_POD_2).with_src(source),
                OTHER_NODE_MAC,
            ),
            "UDP forward",
        );
        let mut answer = Packet::udp(REMOTE_POD_2, source, b"answer");
        answer.eth_src = OTHER_NODE_MAC;
        answer.eth_dst = UPLINK_MAC;
        let run = h.run(Hook::ExtIn, &answer.bytes());
        assert_frame_eq(
            &run.out,
            &routed(answer.with_src(node_port()).with_dst(CLIENT), CLIENT_MAC),
            "UDP reply",
        );
    });
}

#[test]
fn snat_ports_are_never_shared_by_live_flows_and_come_back_when_flows_end() {
    in_routed_namespace(|h| {
        // Four ports: the four first clients get one each, the fifth finds none.
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, 61_000, 61_003);
        let mut taken = Vec::new();
        for port in 0..4 {
            let client = socket([192, 168, 50, 2], 50_000 + port);
            h.run(Hook::Xdp, &from_client(client, flags::SYN).bytes());
            taken.push(snat_source(h, client, TCP).port());
        }
        taken.sort_unstable();
        assert_eq!(
            taken,
            [61_000, 61_001, 61_002, 61_003],
            "four flows, four ports"
        );

        let fifth = socket([192, 168, 50, 3], 50_000);
        let run = h.run(Hook::Xdp, &from_client(fifth, flags::SYN).bytes());
        assert_eq!(run.verdict, xdp::DROP);
        assert_eq!(h.verdict_count(Reason::DropSnatPorts), 1);

        // A client that reopens its flow (same ports, after a RST) keeps its own port.
        let first = socket([192, 168, 50, 2], 50_000);
        let port = snat_source(h, first, TCP).port();
        h.run(Hook::Xdp, &from_client(first, flags::RST).bytes());
        h.run(Hook::Xdp, &from_client(first, flags::SYN).bytes());
        assert_eq!(snat_source(h, first, TCP).port(), port);

        // When a flow's state expires, its port is free again.
        let second = socket([192, 168, 50, 2], 50_001);
        let freed = snat_source(h, second, TCP);
        let reply_key = remote_reply_key(freed.port());
        let mut expired = h.maps.ct.get(&reply_key, 0).unwrap();
        expired.deadline_ns = 0;
        h.maps.ct.insert(reply_key, expired, 0).unwrap();
        let run = h.run(Hook::Xdp, &from_client(fifth, flags::SYN).bytes());
        assert_eq!(run.verdict, xdp::REDIRECT);
        assert_eq!(snat_source(h, fifth, TCP), freed);
    });
}

/// A busy NodePort opens thousands of short connections a second to the same backend: the
/// port of a flow that is over, with nothing of it left at the backend, must serve a new flow
/// at once, not after the flow's timeout (which would drop new connections after a few
/// thousand); a half-closed flow keeps its port; a port whose backend closed first (it holds
/// TIME_WAIT) still serves when nothing else is free.
#[test]
fn snat_ports_of_finished_flows_serve_new_flows_at_once() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, 61_000, 61_000);
        let reply_key = remote_reply_key(61_000);
        let port = SocketAddrV4::new(NODE, 61_000);
        let backend_says = |h: &mut Harness, tcp_flags: u8| {
            h.run(Hook::ExtIn, &from_remote_pod(61_000, tcp_flags).bytes())
        };
        let open = |h: &mut Harness, client: SocketAddrV4| {
            let run = h.run(Hook::Xdp, &from_client(client, flags::SYN).bytes());
            assert_eq!(run.verdict, xdp::REDIRECT, "{client} gets the port");
            assert_eq!(snat_source(h, client, TCP), port);
            backend_says(h, flags::SYN | flags::ACK);
            h.run(Hook::Xdp, &from_client(client, flags::ACK).bytes());
        };
        let refused = |h: &mut Harness, client: SocketAddrV4, why: &str| {
            let drops = h.verdict_count(Reason::DropSnatPorts);
            let run = h.run(Hook::Xdp, &from_client(client, flags::SYN).bytes());
            assert_eq!(run.verdict, xdp::DROP, "{why}");
            assert_eq!(h.verdict_count(Reason::DropSnatPorts), drops + 1, "{why}");
        };
        let clients: Vec<SocketAddrV4> =
            (2..8).map(|i| socket([192, 168, 50, i], 50_000)).collect();

        // The client closes first; the backend, closing second, keeps nothing.
        open(h, clients[0]);
        h.run(
            Hook::Xdp,
            &from_client(clients[0], flags::FIN | flags::ACK).bytes(),
        );
        refused(h, clients[1], "half closed: the backend may still send");
        backend_says(h, flags::FIN | flags::ACK);
        let entry = h.maps.ct.get(&reply_key, 0).unwrap();
        assert!(ct_flags::reusable(entry.flags), "flags {:#x}", entry.flags);
        open(h, clients[1]);
        assert_eq!(
            h.maps.ct.get(&reply_key, 0).unwrap().snat_addr,
            Be32::from(*clients[1].ip())
        );

        // A late segment of the old flow that rewrites its own entry (here a RST) leaves the
        // new flow's reservation alone.
        h.run(Hook::Xdp, &from_client(clients[0], flags::RST).bytes());
        let entry = h.maps.ct.get(&reply_key, 0).unwrap();
        assert_eq!(entry.snat_addr, Be32::from(*clients[1].ip()));
        assert!(!ct_flags::closed(entry.flags), "flags {:#x}", entry.flags);

        // The backend closes first: the flow ends, the backend holds TIME_WAIT on the port,
        // and with no other port free, a new flow takes it.
        backend_says(h, flags::FIN | flags::ACK);
        h.run(
            Hook::Xdp,
            &from_client(clients[1], flags::FIN | flags::ACK).bytes(),
        );
        let entry = h.maps.ct.get(&reply_key, 0).unwrap();
        assert!(ct_flags::closed(entry.flags), "flags {:#x}", entry.flags);
        assert!(!ct_flags::reusable(entry.flags), "flags {:#x}", entry.flags);
        open(h, clients[2]);

        // A reset frees the port at once.
        h.run(Hook::Xdp, &from_client(clients[2], flags::RST).bytes());
        open(h, clients[3]);
    });
}

/// Backends that close first (HTTP servers, netserver) hold TIME_WAIT on (node address, SNAT
/// port) for a minute: resting those ports would cap a node at a few thousand new connections
/// per minute and backend. A port in TIME_WAIT serves a new flow when no free candidate is left
/// (the first such candidate); ports of live flows are never handed out.
#[test]
fn snat_ports_in_time_wait_serve_new_flows_only_when_none_is_free() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, 61_000, 61_001);
        let open = open_snat_flow;
        // Which of the two ports a flow from `client` tries first: its home.
        let first_candidate = |client: SocketAddrV4| home_port(client, 61_000, 61_001);

        let a = socket([192, 168, 50, 2], 50_000);
        let port_a = open(h, a);
        close_backend_first(h, a, port_a);
        // A free port goes before one in TIME_WAIT, whichever the flow tries first.
        let b = (50_000..=u16::MAX)
            .map(|port| socket([192, 168, 50, 3], port))
            .find(|c| first_candidate(*c) == port_a)
            .unwrap();
        let port_b = open(h, b);
        assert_ne!(port_b, port_a, "the free port");
        close_backend_first(h, b, port_b);

        // Both ports in TIME_WAIT: a new flow gets the first it tries.
        let c = (50_000..=u16::MAX)
            .map(|port| socket([192, 168, 50, 4], port))
            .find(|c| first_candidate(*c) == port_b)
            .unwrap();
        assert_eq!(open(h, c), port_b, "the first candidate, in TIME_WAIT");
        // The next one gets what is left.
        let d = socket([192, 168, 50, 5], 50_000);
        assert_eq!(open(h, d), port_a, "the other port in TIME_WAIT");

        // Live flows hold both ports: the next flow finds none.
        let run = h.run(
            Hook::Xdp,
            &from_client(socket([192, 168, 50, 6], 50_000), flags::SYN).bytes(),
        );
        assert_eq!(run.verdict, xdp::DROP);
        assert_eq!(h.verdict_count(Reason::DropSnatPorts), 1);
    });
}

#[test]
fn without_nat_state_a_reply_passes_untouched_and_without_an_address_nothing_is_natted() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        h.run(Hook::Xdp, &from_client(CLIENT, flags::SYN).bytes());
        let source = snat_source(h, CLIENT, TCP);
        // The LRU lost the reply entry: the reply is not ours to translate; the stack decides.
        let reply_key = remote_reply_key(source.port());
        h.maps.ct.remove(&reply_key).unwrap();
        let reply = Packet::tcp(REMOTE_POD, source, flags::ACK, b"late");
        let run = h.run(Hook::Xdp, &reply.bytes());
        assert_eq!(run.verdict, xdp::PASS);
        assert_frame_eq(&run.out, &reply.bytes(), "untouched");

        // No SNAT address configured: such flows are dropped (not sent out unreturnable).
        let mut config = h.maps.config.get(&0, 0).unwrap();
        config.snat_addr = Be32::default();
        h.maps.config.set(0, config, 0).unwrap();
        let other = socket([192, 168, 50, 7], 41_000);
        let run = h.run(Hook::Xdp, &from_client(other, flags::SYN).bytes());
        assert_eq!(run.verdict, xdp::DROP);
        assert_eq!(h.verdict_count(Reason::DropSnatPorts), 1);
    });
}

#[test]
fn a_local_backend_sees_the_client_and_its_reply_is_restored_on_the_uplink() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(LOCAL_POD, true)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        let syn = from_client(CLIENT, flags::SYN);
        let run = h.run(Hook::Xdp, &syn.bytes());
        // DNAT only: the client's address is kept and the stack delivers to the pod.
        assert_eq!(run.verdict, xdp::PASS);
        assert_frame_eq(
            &run.out,
            &syn.clone().with_dst(LOCAL_POD).bytes(),
            "DNAT only",
        );
        let entry = h.maps.ct.get(&forward_key(CLIENT, TCP), 0).unwrap();
        assert_eq!(entry.flags & ct_flags::SNAT, 0);

        // The pod's reply leaves through the uplink, where the frontend is restored.
        let reply = Packet::tcp(LOCAL_POD, CLIENT, flags::SYN | flags::ACK, b"");
        let run = h.run(Hook::ExtOut, &reply.bytes());
        assert_eq!(run.verdict, tc::PASS);
        assert_frame_eq(
            &run.out,
            &reply.with_src(node_port()).bytes(),
            "reverse NAT",
        );
        assert_eq!(h.verdict_count(Reason::Forwarded), 0);
    });
}

#[test]
fn a_pod_balanced_to_itself_is_hairpinned_through_the_link_local_address() {
    in_routed_namespace(|h| {
        let vip = SocketAddrV4::new(Ipv4Addr::new(172, 30, 0, 41), 80);
        let svc = ServiceSpec {
            frontends: vec![FrontendSpec {
                addr: *vip.ip(),
                port: vip.port(),
                proto: TCP,
                scope: scope::INTERNAL,
                kind: FrontendKind::ClusterIp,
            }],
            ..node_port_service("web", TCP, &[(LOCAL_POD, true)])
        };
        h.program(&svc);
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        let pod = SocketAddrV4::new(*LOCAL_POD.ip(), 40_000);
        let pod_mac = [0x02, 0, 0, 0, 0, 0x05];
        let gateway_mac = [0x02, 0, 0, 0, 0, 0xfe];
        let mut syn = Packet::tcp(pod, vip, flags::SYN, b"hi");
        syn.eth_src = pod_mac;
        syn.eth_dst = gateway_mac;
        let run = h.run(Hook::FromPod, &syn.bytes());
        // Back into the pod: from the hairpin address, to itself, MACs swapped.
        let mut expected = syn
            .with_dst(LOCAL_POD)
            .with_src(SocketAddrV4::new(HAIRPIN, 40_000));
        expected.eth_src = gateway_mac;
        expected.eth_dst = pod_mac;
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_frame_eq(&run.out, &expected.bytes(), "hairpinned SYN");

        // The pod answers the hairpin address; it gets the answer from the service.
        let mut answer = Packet::tcp(
            LOCAL_POD,
            SocketAddrV4::new(HAIRPIN, 40_000),
            flags::SYN | flags::ACK,
            b"",
        );
        answer.eth_src = pod_mac;
        answer.eth_dst = gateway_mac;
        let run = h.run(Hook::FromPod, &answer.bytes());
        let mut expected = answer.with_src(vip).with_dst(pod);
        expected.eth_src = gateway_mac;
        expected.eth_dst = pod_mac;
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_frame_eq(&run.out, &expected.bytes(), "hairpinned reply");
        assert_eq!(h.verdict_count(Reason::NewFlow), 1);
        assert_eq!(h.verdict_count(Reason::ReplyNat), 1);
    });
}

/// What a router answers for packets it cannot forward, decided before the flow gets any state:
/// a TTL that would run out gets ICMP time exceeded; a DF packet larger than the next hop's MTU
/// gets ICMP fragmentation needed with that MTU, from tc (XDP, which sees one frame where tc may
/// see a GSO packet whose segments fit, leaves it to tc).
#[test]
fn packets_the_node_cannot_forward_get_a_routers_answer_and_no_state() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        for (hook, bounce) in [(Hook::Xdp, xdp::TX), (Hook::ExtIn, tc::REDIRECT)] {
            let client = socket(
                [192, 168, 50, 2],
                if hook == Hook::Xdp { 41_000 } else { 41_001 },
            );
            let mut syn = from_client(client, flags::SYN);
            syn.ip.time_to_live = 1;
            let run = h.run(hook, &syn.bytes());
            assert_eq!(run.verdict, bounce, "{hook:?}");
            assert_frame_eq(
                &run.out,
                &expected_icmp_error(
                    &syn,
                    Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
                ),
                "time exceeded",
            );
            assert!(
                h.maps.ct.get(&forward_key(client, TCP), 0).is_err(),
                "{hook:?}: no state for a packet that went nowhere"
            );
        }
        assert_eq!(h.verdict_count(Reason::DropTtlExceeded), 2);

        let client = socket([192, 168, 50, 2], 42_000);
        let mut big = Packet::tcp(client, node_port(), flags::SYN, &[0x42; 1600]);
        big.eth_src = CLIENT_MAC;
        big.eth_dst = UPLINK_MAC;
        big.ip.dont_fragment = true;
        let run = h.run(Hook::Xdp, &big.bytes());
        assert_eq!(run.verdict, xdp::PASS, "XDP leaves it to tc");
        assert_frame_eq(&run.out, &big.bytes(), "untouched");
        let run = h.run(Hook::ExtIn, &big.bytes());
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_frame_eq(
            &run.out,
            &expected_icmp_error(
                &big,
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1500,
                }),
            ),
            "fragmentation needed",
        );
        assert!(h.maps.ct.get(&forward_key(client, TCP), 0).is_err());
        assert_eq!(h.verdict_count(Reason::DropTooBig), 1);
    });
}

/// A new flow finds a free SNAT port whenever the range has one, also when live flows hold every
/// candidate its hash spreads (it then scans the range), and is dropped only when the range is
/// full for its backend. Eight candidates alone drop about one flow in eight at 77 % use and
/// most of them near 100 %.
#[test]
fn a_free_snat_port_is_found_whenever_the_range_has_one() {
    in_routed_namespace(|h| {
        h.program(&node_port_service("web", TCP, &[(REMOTE_POD, false)]));
        configure_snat(h, 61_000, 61_099);
        let client = socket([192, 168, 50, 2], 51_000);
        let flow = forward_key(client, TCP);
        let config = h.maps.config.get(&0, 0).unwrap();
        let probes: Vec<u16> = (0..snat::PROBES)
            .map(|probe| {
                lb_common::snat::candidate(
                    &config,
                    lb_common::snat::Seeds::of(&flow, &config),
                    probe,
                )
            })
            .collect();
        let free = (61_000..=61_099)
            .find(|p| !probes.contains(p))
            .expect("a port no probe tries");
        // Every other port held by a live flow of another client to the same backend.
        let held = CtEntry {
            deadline_ns: u64::MAX,
            flags: ct_flags::SNAT | ct_flags::ESTABLISHED,
            snat_addr: Be32::from(Ipv4Addr::new(192, 168, 50, 99)),
            ..CtEntry::default()
        };
        for port in (61_000..=61_099).filter(|p| *p != free) {
            h.maps.ct.insert(remote_reply_key(port), held, 0).unwrap();
        }
        let run = h.run(Hook::ExtIn, &from_client(client, flags::SYN).bytes());
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_eq!(
            snat_source(h, client, TCP).port(),
            free,
            "found by the scan"
        );

        // Now the range is full: the next flow is dropped, and counted.
        let other = socket([192, 168, 50, 2], 51_001);
        let run = h.run(Hook::ExtIn, &from_client(other, flags::SYN).bytes());
        assert_eq!(run.verdict, tc::SHOT);
        assert_eq!(h.verdict_count(Reason::DropSnatPorts), 1);
    });
}
