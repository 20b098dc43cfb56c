//! Which client address a backend sees, through the real datapath programs
//! (BPF_PROG_TEST_RUN) in a routed namespace with a pod interface: a ClusterIP reached from
//! outside is served like a NodePort, and `--masquerade-all` source-NATs every balanced flow but
//! those to the external addresses of a Service with externalTrafficPolicy Local. Needs root.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{
    external::*,
    harness::{Harness, Hook, TCP, socket, tc, xdp},
    packet::{Packet, assert_frame_eq, flags},
};
use lb_common::{
    maps::{scope, snat},
    stats::Reason,
};
use lb_datapath::{
    predict::{self, Forward, SourceNat},
    program::{FrontendKind, FrontendSpec, ServiceSpec},
};

/// A pod interface `pod0` in the routed namespace, as a CNI makes one: the node's pods
/// (10.10.0.0/24) behind it, permanent neighbours for `LOCAL_POD` and `CLIENT_POD`. Must run
/// inside the namespace (`in_routed_namespace`'s closure).
fn add_pod_iface() {
    let ip = |args: &[&str]| {
        let status = std::process::Command::new("ip")
            .args(args)
            .status()
            .expect("ip");
        assert!(status.success(), "ip {args:?}");
    };
    ip(&[
        "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
    ]);
    ip(&["link", "set", "pod0p", "up"]);
    ip(&["link", "set", "pod0", "address", "02:00:00:00:00:fe", "up"]);
    ip(&["route", "add", "10.10.0.0/24", "dev", "pod0"]);
    for (addr, mac) in [(LOCAL_POD.ip(), POD_MAC), (CLIENT_POD.ip(), CLIENT_POD_MAC)] {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        ip(&[
            "neigh",
            "add",
            &addr.to_string(),
            "lladdr",
            &mac,
            "dev",
            "pod0",
            "nud",
            "permanent",
        ]);
    }
}

const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
const POD_GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// A client pod on this node.
const CLIENT_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 7), 40_000);
const CLIENT_POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);

/// A ClusterIP service `name` on `CLUSTER_IP:port` (internal scope only, as the agent programs
/// them) with these backends.
fn cluster_ip_service(name: &str, port: u16, backends: &[(SocketAddrV4, bool)]) -> ServiceSpec {
    ServiceSpec {
        frontends: vec![FrontendSpec {
            addr: CLUSTER_IP,
            port,
            proto: TCP,
            scope: scope::INTERNAL,
            kind: FrontendKind::ClusterIp,
        }],
        ..node_port_service(name, TCP, backends)
    }
}

/// `pkt` as it leaves the pod of `pod_mac` for its gateway.
fn leaving_pod(mut pkt: Packet, pod_mac: [u8; 6]) -> Packet {
    pkt.eth_src = pod_mac;
    pkt.eth_dst = POD_GATEWAY_MAC;
    pkt
}

/// `CLIENT_POD`'s SYN to `dst`, as it leaves the pod for its gateway.
fn syn_from_client_pod(dst: SocketAddrV4) -> Packet {
    leaving_pod(
        Packet::tcp(CLIENT_POD, dst, flags::SYN, b""),
        CLIENT_POD_MAC,
    )
}

/// `pkt` as this node routes it into a pod's interface to `pod_mac`.
fn routed_to_pod(mut pkt: Packet, pod_mac: [u8; 6]) -> Vec<u8> {
    pkt.eth_src = POD_GATEWAY_MAC;
    pkt.eth_dst = pod_mac;
    pkt.ip.time_to_live -= 1;
    pkt.bytes()
}

/// The node address and port `predict::forward` says the new flow `src -> dst` arriving in
/// `flow_scope` is source-NATed to, with its backend.
fn predicted_snat(
    h: &Harness,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flow_scope: u8,
) -> (SocketAddrV4, SocketAddrV4) {
    match predict::forward(&h.maps, src, dst, TCP, flow_scope, true).unwrap() {
        Forward::NewFlow {
            backend,
            snat: Some(SourceNat::Node(choice)),
            ..
        } => (backend, choice.source),
        other => panic!("{src} -> {dst}: predicted {other:?}"),
    }
}

/// A ClusterIP reached from outside (a routed service range): served by its internal frontend,
/// as kube-proxy does; a backend on this node sees the client, one on another node sees this
/// node, exactly as for a NodePort. `--external-cluster-ips=false` makes it reject them again.
/// `lbctl trace`'s predictor agrees.
#[test]
fn a_cluster_ip_reached_from_outside_is_served_like_a_node_port() {
    in_routed_namespace(|h| {
        h.program(&cluster_ip_service("remote", 80, &[(REMOTE_POD, false)]));
        h.program(&cluster_ip_service("local", 81, &[(LOCAL_POD, true)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        let to = |port| SocketAddrV4::new(CLUSTER_IP, port);
        let arriving = |client, port, tcp_flags| {
            let mut pkt = Packet::tcp(client, to(port), tcp_flags, b"GET");
            pkt.eth_src = CLIENT_MAC;
            pkt.eth_dst = UPLINK_MAC;
            pkt
        };

        // To the backend on another node: source-NATed and routed, as predicted.
        let syn = arriving(CLIENT, 80, flags::SYN);
        let (backend, source) = predicted_snat(h, CLIENT, to(80), scope::EXTERNAL);
        assert_eq!(backend, REMOTE_POD);
        let run = h.run(Hook::Xdp, &syn.bytes());
        assert_eq!(run.verdict, xdp::REDIRECT);
        assert_frame_eq(
            &run.out,
            &routed(syn.with_dst(REMOTE_POD).with_src(source), OTHER_NODE_MAC),
            "DNAT + SNAT + routed",
        );
        let mut reply = Packet::tcp(REMOTE_POD, source, flags::SYN | flags::ACK, b"");
        reply.eth_src = OTHER_NODE_MAC;
        reply.eth_dst = UPLINK_MAC;
        let run = h.run(Hook::Xdp, &reply.bytes());
        assert_frame_eq(
            &run.out,
            &routed(reply.with_src(to(80)).with_dst(CLIENT), CLIENT_MAC),
            "the reply comes from the ClusterIP",
        );

        // To the backend on this node: DNAT only, the client kept, at XDP and tc alike.
        for (hook, client, verdict) in [
            (Hook::Xdp, socket([192, 168, 50, 2], 40_010), xdp::PASS),
            (Hook::ExtIn, socket([192, 168, 50, 2], 40_011), tc::PASS),
        ] {
            let syn = arriving(client, 81, flags::SYN);
            assert!(matches!(
                predict::forward(&h.maps, client, to(81), TCP, scope::EXTERNAL, true).unwrap(),
                Forward::NewFlow {
                    backend: LOCAL_POD,
                    snat: None,
                    ..
                }
            ));
            let run = h.run(hook, &syn.bytes());
            assert_eq!(run.verdict, verdict, "{hook:?}");
            assert_frame_eq(&run.out, &syn.with_dst(LOCAL_POD).bytes(), "DNAT only");
        }
        assert_eq!(h.verdict_count(Reason::NewFlow), 3);

        // Closed to outsiders: a ClusterIP rejects them as a port it does not serve.
        h.set_node_flags(false, true);
        let client = socket([192, 168, 50, 2], 40_020);
        assert_eq!(
            predict::forward(&h.maps, client, to(80), TCP, scope::EXTERNAL, true).unwrap(),
            Forward::RejectUnknownPort
        );
        let run = h.run(Hook::Xdp, &arriving(client, 80, flags::SYN).bytes());
        assert_eq!(run.verdict, xdp::TX, "a RST goes back");
        assert_eq!(h.verdict_count(Reason::RejectUnknownPort), 1);
        assert_eq!(h.verdict_count(Reason::NewFlow), 3);
    });
}

/// `--masquerade-all`: an external flow to a backend on this node and a pod's flow to a
/// ClusterIP are source-NATed to the node and routed by it, as predicted; their replies are
/// restored and routed back. XDP leaves every packet the node routes into a pod's interface to
/// tc, untouched and without state (a veth takes XDP redirects only when its peer runs XDP).
#[test]
fn masquerade_all_source_nats_flows_to_local_backends_and_from_pods() {
    in_routed_namespace(|h| {
        add_pod_iface();
        h.program(&node_port_service("web", TCP, &[(LOCAL_POD, true)]));
        h.program(&cluster_ip_service("remote", 80, &[(REMOTE_POD, false)]));
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        h.set_node_flags(true, false);

        // From outside to the NodePort's local backend.
        let syn = from_client(CLIENT, flags::SYN);
        let run = h.run(Hook::Xdp, &syn.bytes());
        assert_eq!(run.verdict, xdp::PASS, "XDP leaves it to tc");
        assert_frame_eq(&run.out, &syn.bytes(), "untouched");
        assert!(
            h.maps.ct.get(&forward_key(CLIENT, TCP), 0).is_err(),
            "no state"
        );
        let (backend, source) = predicted_snat(h, CLIENT, node_port(), scope::EXTERNAL);
        assert_eq!((backend, *source.ip()), (LOCAL_POD, NODE));
        let run = h.run(Hook::ExtIn, &syn.bytes());
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_eq!(snat_source(h, CLIENT, TCP), source);
        assert_frame_eq(
            &run.out,
            &routed_to_pod(syn.with_dst(LOCAL_POD).with_src(source), POD_MAC),
            "DNAT + SNAT into the pod",
        );
        // The pod answers the node; the client gets the answer from the NodePort.
        let reply = leaving_pod(
            Packet::tcp(LOCAL_POD, source, flags::SYN | flags::ACK, b""),
            POD_MAC,
        );
        let run = h.run(Hook::FromPod, &reply.bytes());
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_frame_eq(
            &run.out,
            &routed(reply.with_src(node_port()).with_dst(CLIENT), CLIENT_MAC),
            "reply restored and routed out",
        );
        // Later packets: XDP still leaves them to tc, which keeps the translation.
        let ack = from_client(CLIENT, flags::ACK);
        assert_eq!(h.run(Hook::Xdp, &ack.bytes()).verdict, xdp::PASS);
        let run = h.run(Hook::ExtIn, &ack.bytes());
        assert_frame_eq(
            &run.out,
            &routed_to_pod(ack.with_dst(LOCAL_POD).with_src(source), POD_MAC),
            "established",
        );

        // From a pod to a ClusterIP whose backend runs on another node.
        let vip = SocketAddrV4::new(CLUSTER_IP, 80);
        let syn = syn_from_client_pod(vip);
        let (backend, source) = predicted_snat(h, CLIENT_POD, vip, scope::INTERNAL);
        assert_eq!((backend, *source.ip()), (REMOTE_POD, NODE));
        let run = h.run(Hook::FromPod, &syn.bytes());
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_frame_eq(
            &run.out,
            &routed(syn.with_dst(REMOTE_POD).with_src(source), OTHER_NODE_MAC),
            "DNAT + SNAT + routed to the other node",
        );
        // Its reply reaches the uplink: XDP leaves it to tc, which routes it into the pod.
        let reply = from_remote_pod(source.port(), flags::SYN | flags::ACK);
        let run = h.run(Hook::Xdp, &reply.bytes());
        assert_eq!(run.verdict, xdp::PASS);
        assert_frame_eq(&run.out, &reply.bytes(), "untouched at XDP");
        let run = h.run(Hook::ExtIn, &reply.bytes());
        assert_eq!(run.verdict, tc::REDIRECT);
        assert_frame_eq(
            &run.out,
            &routed_to_pod(reply.with_src(vip).with_dst(CLIENT_POD), CLIENT_POD_MAC),
            "reply restored and routed into the client pod",
        );
        assert_eq!(h.verdict_count(Reason::NewFlow), 2);
        assert_eq!(h.verdict_count(Reason::ReplyNat), 2);
    });
}

/// `--masquerade-all` leaves the NodePort of a Service with externalTrafficPolicy Local its
/// clients, as kube-proxy's masqueradeAll does (it masquerades flows to ClusterIPs): an
/// external client reaches the local backend with its own address, and so does a pod through
/// the NodePort's internal frontend (kube-proxy's short-circuit to every endpoint), to a
/// backend on another node; both as predicted. The same Service without the flag's frontends
/// is source-NATed (the test above).
#[test]
fn masquerade_all_leaves_external_traffic_policy_local_its_clients() {
    in_routed_namespace(|h| {
        add_pod_iface();
        let local = ServiceSpec {
            keeps_client: true,
            ..node_port_service("local", TCP, &[(LOCAL_POD, true)])
        };
        let mut short_circuit = ServiceSpec {
            keeps_client: true,
            ..node_port_service("local-from-pods", TCP, &[(REMOTE_POD, false)])
        };
        short_circuit.frontends[0].scope = scope::INTERNAL;
        h.program(&local);
        h.program(&short_circuit);
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        h.set_node_flags(true, false);

        for (hook, client, verdict) in [
            (Hook::Xdp, socket([192, 168, 50, 2], 40_030), xdp::PASS),
            (Hook::ExtIn, socket([192, 168, 50, 2], 40_031), tc::PASS),
        ] {
            assert!(matches!(
                predict::forward(&h.maps, client, node_port(), TCP, scope::EXTERNAL, true).unwrap(),
                Forward::NewFlow {
                    backend: LOCAL_POD,
                    snat: None,
                    ..
                }
            ));
            let syn = from_client(client, flags::SYN);
            let run = h.run(hook, &syn.bytes());
            assert_eq!(run.verdict, verdict, "{hook:?}");
            assert_frame_eq(
                &run.out,
                &syn.with_dst(LOCAL_POD).bytes(),
                "DNAT only, the client kept",
            );
        }

        let syn = syn_from_client_pod(node_port());
        assert!(matches!(
            predict::forward(&h.maps, CLIENT_POD, node_port(), TCP, scope::INTERNAL, true).unwrap(),
            Forward::NewFlow {
                backend: REMOTE_POD,
                snat: None,
                ..
            }
        ));
        let run = h.run(Hook::FromPod, &syn.bytes());
        assert_eq!(run.verdict, tc::PASS);
        assert_frame_eq(
            &run.out,
            &syn.with_dst(REMOTE_POD).bytes(),
            "DNAT only, the pod kept",
        );
        assert_eq!(h.verdict_count(Reason::NewFlow), 3);
    });
}
