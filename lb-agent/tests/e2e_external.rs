//! Traffic from outside the cluster, end to end: a two-node cluster in network namespaces (a LAN,
//! nodes with uplinks and pods, an external client), the real `lb-agent` on every node with a
//! YAML source, real TCP and UDP sockets. NodePorts through every node, LoadBalancer IPs,
//! externalIPs, source ranges, externalTrafficPolicy Local with its health checks, services
//! without endpoints, endpoint removal, hairpin, and bulk transfers both ways through every
//! path. Every test runs on both of the bed's wirings: NIC-like frames, and veths with their
//! default offloads as in kind (GSO and GRO, partial checksums); the uplinks are named `eth0`, as
//! the host's own. Needs root.

mod common;

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
};

use common::external::*;
use lb_common::{
    conntrack::{REPLY, ct_flags},
    net::proto::TCP,
    stats::Reason,
};
use lb_datapath::{maps::Maps, predict::flow_key};
use lb_testbed::{
    Wiring,
    manifests::{Protocol, ServiceManifest, ServicePort, ServiceType, documents},
    server::{self, Held},
};

#[test]
fn node_ports_from_outside_reach_every_backend_through_every_node_over_tcp_and_udp() {
    on_each_wiring(&[], |bed| {
        let client = bed.cluster.client_ip();
        for node in 0..2 {
            let node_ip = bed.cluster.node_ip(node);
            let answers = bed.ask_from_outside(sock(node_ip, 30_080), 30, None);
            assert_eq!(
                names(&answers),
                BTreeSet::from(["web-0", "web-1"]),
                "TCP via node-{node}"
            );
            // The backend on the entered node sees the client; the other one sees the node, which
            // source-NATed the flow so that its replies come back through it.
            for (name, seen) in &answers {
                let expected = if *name == format!("web-{node}") {
                    client
                } else {
                    node_ip
                };
                assert_eq!(*seen, expected, "{name} via node-{node}");
            }

            let addr = sock(node_ip, 30_080);
            let udp: Vec<(String, Ipv4Addr)> = bed
                .cluster
                .client()
                .enter(move || {
                    (0..30)
                        .map(|i| {
                            parse(
                                &server::udp_request(addr, 41_000 + i, TIMEOUT)
                                    .expect("UDP answer"),
                            )
                        })
                        .collect()
                })
                .unwrap();
            assert_eq!(
                names(&udp),
                BTreeSet::from(["web-0", "web-1"]),
                "UDP via node-{node}"
            );
        }
    });
}

#[test]
fn external_traffic_policy_local_keeps_the_client_drops_elsewhere_and_health_checks_follow() {
    on_each_wiring(&[], |bed| {
        let client = bed.cluster.client_ip();
        let via = |node: usize| sock(bed.cluster.node_ip(node), 30_081);
        // Its only endpoint runs on node-1.
        let answers = bed.ask_from_outside(via(1), 10, None);
        assert!(
            answers.iter().all(|(n, c)| n == "web-1" && *c == client),
            "{answers:?}"
        );
        assert_eq!(
            bed.connect_outcome(via(0), None),
            Outcome::Dropped,
            "no local endpoint on node-0: DROP, not REJECT"
        );
        // From inside the cluster every endpoint is used, whatever the policy.
        assert_eq!(
            names(&bed.ask_from_pod("client-0", sock(LOCAL, 80), 5)),
            BTreeSet::from(["web-1"])
        );

        let (status, body) = bed.health_check(1);
        assert_eq!(status, 200, "{body}");
        // Unset --nodeport-addresses selects every address: the server listens on all of them,
        // loopback included, as kube-proxy's does.
        assert_eq!(
            bed.health_check_on_node(1, Ipv4Addr::LOCALHOST)
                .map(|a| a.0),
            Some(200)
        );
        // kube-proxy's body, tab-indented.
        assert!(body.contains("\t\"localEndpoints\": 1,\n"), "{body}");
        assert!(body.contains("\t\t\"name\": \"local\"\n"), "{body}");
        assert!(
            body.contains("\t\"serviceProxyHealthy\": true\n}"),
            "{body}"
        );
        assert_eq!(bed.health_check(0).0, 503);

        // The endpoint moves to node-0: traffic and health checks follow.
        bed.source
            .write("local.yaml", &local_yaml(bed.endpoint(0)))
            .unwrap();
        bed.wait_until("health checks follow the endpoint", || {
            bed.health_check(0).0 == 200 && bed.health_check(1).0 == 503
        });
        let answers = bed.ask_from_outside(via(0), 10, None);
        assert!(
            answers.iter().all(|(n, c)| n == "web-0" && *c == client),
            "{answers:?}"
        );
        assert_eq!(bed.connect_outcome(via(1), None), Outcome::Dropped);
    });
}

/// Issue 13 items 5 and 7: with `--nodeport-addresses primary` (kube-proxy's nftables
/// default), NodePorts and healthCheckNodePorts are served on the node's primary address only,
/// as kube-proxy binds them: the health check answers there and nothing listens on loopback.
#[test]
fn with_primary_node_port_addresses_health_checks_listen_on_the_node_address_only() {
    let Some(bed) = Bed::new(Wiring::VethDefaults, &["--nodeport-addresses", "primary"]) else {
        return;
    };
    let node_ip = bed.cluster.node_ip(1);
    let (status, body) = bed.health_check(1);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        bed.health_check_on_node(1, node_ip).map(|a| a.0),
        Some(200),
        "on the node address, from the node"
    );
    assert_eq!(
        bed.health_check_on_node(1, Ipv4Addr::LOCALHOST),
        None,
        "nothing on loopback"
    );
    let answers = bed.ask_from_outside(sock(node_ip, 30_081), 5, None);
    assert!(answers.iter().all(|(n, _)| n == "web-1"), "{answers:?}");
}

/// A dual-stack cluster's `--nodeport-addresses` naming IPv6 CIDRs only: the agent starts (as
/// kube-proxy does), serves IPv4 NodePorts on every node address, and says why.
#[test]
fn node_port_addresses_of_ipv6_only_leave_every_ipv4_address_serving() {
    let flag = ["--nodeport-addresses", "fd00:10::/64"];
    let Some(bed) = Bed::new(Wiring::VethDefaults, &flag) else {
        return;
    };
    for node in 0..2 {
        let answers = bed.ask_from_outside(sock(bed.cluster.node_ip(node), 30_080), 10, None);
        assert_eq!(answers.len(), 10, "NodePort via node-{node}");
    }
    // healthCheckNodePorts too: node-1 holds the local Service's endpoint.
    assert_eq!(bed.health_check(1).0, 200);
    bed.wait_until("the IPv6 CIDRs are reported", || {
        bed.logs()
            .contains("the IPv6 CIDRs are kept for IPv6 NodePorts")
    });
}

#[test]
fn load_balancer_ips_and_external_ips_answer_from_outside_and_source_ranges_keep_outsiders_out() {
    on_each_wiring(&[], |bed| {
        let answers = bed.ask_from_outside(sock(LB_INGRESS, 80), 30, None);
        assert_eq!(names(&answers), BTreeSet::from(["web-0", "web-1"]));
        assert_eq!(
            bed.connect_outcome(sock(LB_INGRESS, 80), Some(OUTSIDER)),
            Outcome::Dropped,
            "outside loadBalancerSourceRanges"
        );
        // The ranges guard the load balancer's address only (as in kube-proxy), not externalIPs.
        let answers = bed.ask_from_outside(sock(EXTERNAL_IP, 80), 30, Some(OUTSIDER));
        assert_eq!(names(&answers), BTreeSet::from(["web-0", "web-1"]));
    });
}

#[test]
fn services_without_endpoints_reject_at_once() {
    on_each_wiring(&[], |bed| {
        for node in 0..2 {
            let addr = sock(bed.cluster.node_ip(node), 30_083);
            assert_eq!(
                bed.connect_outcome(addr, None),
                Outcome::Refused,
                "NodePort via node-{node}"
            );
            let udp = bed
                .cluster
                .client()
                .enter(move || server::udp_request(addr, 0, DROPPED))
                .unwrap()
                .unwrap_err();
            let kind = udp
                .root_cause()
                .downcast_ref::<std::io::Error>()
                .map(std::io::Error::kind);
            assert_eq!(
                kind,
                Some(ErrorKind::ConnectionRefused),
                "UDP via node-{node}: {udp:#}"
            );
        }
        let refused = bed
            .cluster
            .pod("client-1")
            .ns
            .enter(|| {
                std::net::TcpStream::connect_timeout(&sock(EMPTY, 80).into(), DROPPED).map(drop)
            })
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "ClusterIP");
    });
}

#[test]
fn a_removed_backend_gets_no_new_connections_while_established_ones_to_the_other_survive() {
    on_each_wiring(&[], |bed| {
        let node_port = sock(bed.cluster.node_ip(0), 30_080);
        // A held connection on each backend (one of them source-NATed across the LAN).
        let mut held = std::collections::BTreeMap::new();
        for _ in 0..40 {
            let mut conn = bed
                .cluster
                .client()
                .enter(move || Held::connect(node_port, TIMEOUT))
                .unwrap()
                .expect("held connection");
            let (name, _) = parse(&conn.ask().unwrap());
            held.entry(name).or_insert(conn);
            if held.len() == 2 {
                break;
            }
        }
        assert_eq!(held.len(), 2, "both backends hold a connection");

        for (gone, kept) in [(1usize, 0usize), (0, 1)] {
            bed.source
                .write("web.yaml", &web_yaml(&[bed.endpoint(kept)]))
                .unwrap();
            let kept_name = format!("web-{kept}");
            bed.wait_until("the removed backend gets no new connections", || {
                names(&bed.ask_from_outside(node_port, 10, None))
                    == BTreeSet::from([kept_name.as_str()])
            });
            let conn = held.get_mut(&kept_name).unwrap();
            assert_eq!(
                parse(&conn.ask().unwrap()).0,
                kept_name,
                "established connection to web-{kept} (gone: web-{gone})"
            );
            // Both back for the next round.
            bed.source
                .write("web.yaml", &web_yaml(&[bed.endpoint(0), bed.endpoint(1)]))
                .unwrap();
            bed.wait_until("both backends again", || {
                names(&bed.ask_from_outside(node_port, 20, None)).len() == 2
            });
        }
    });
}

#[test]
fn a_pod_reaching_its_own_service_is_answered_by_itself_through_the_hairpin_address() {
    on_each_wiring(&[], |bed| {
        let hairpin = Ipv4Addr::from(lb_common::maps::hairpin::DEFAULT_ADDR);
        for addr in [sock(SELF, 80), sock(bed.cluster.node_ip(0), 30_084)] {
            let answers = bed.ask_from_pod("web-0", addr, 5);
            assert!(
                answers.iter().all(|(n, c)| n == "web-0" && *c == hairpin),
                "via {addr}: {answers:?}"
            );
        }
    });
}

/// A pod reaches one backend from one local port through two frontends of its Service (the
/// ClusterIP and a LoadBalancer IP; Linux gives the port to both, their destinations differ):
/// both connections work, and the first survives the second (which gets another source port on
/// its way to the backend, the pod's address kept).
#[test]
fn one_client_port_reaches_one_backend_through_two_frontends_on_two_live_connections() {
    on_each_wiring(&[], |bed| {
        let pod = bed.cluster.pod("client-0");
        let local = SocketAddrV4::new(pod.ip, 45_000);
        pod.ns
            .enter(move || {
                let mut via_cluster_ip =
                    Held::connect_from(local, sock(BULK, 80), TIMEOUT).expect("ClusterIP");
                let first = via_cluster_ip.ask().expect("first answer");
                let mut via_lb_ip = Held::connect_from(local, sock(BULK_LB_LOCAL, 80), TIMEOUT)
                    .expect("LoadBalancer IP, from the same port");
                assert_eq!(via_lb_ip.local_addr().unwrap(), local, "both from one port");
                let second = via_lb_ip.ask().expect("answer through the LoadBalancer IP");
                assert_eq!(parse(&first).0, "web-1");
                assert_eq!(parse(&second).0, "web-1");
                for round in 0..3 {
                    via_cluster_ip
                        .ask()
                        .unwrap_or_else(|e| panic!("round {round}: the first connection: {e:#}"));
                    via_lb_ip
                        .ask()
                        .unwrap_or_else(|e| panic!("round {round}: the second connection: {e:#}"));
                }
            })
            .unwrap();
    });
}

/// A pod that reached a backend through its Service's ClusterIP from one local port then
/// connects from that same port to the backend's own address (Linux allows it: the
/// destinations differ): both connections work, from the backend's node and from the other
/// (the direct one reaches the backend from another source port, the pod's address kept).
#[test]
fn a_direct_connection_from_a_port_a_balanced_flow_holds_works_beside_it() {
    on_each_wiring(&[], |bed| {
        let backend = SocketAddrV4::new(bed.web[1], 8080);
        for (client, port) in [("client-0", 45_001), ("client-1", 45_002)] {
            let pod = bed.cluster.pod(client);
            let local = SocketAddrV4::new(pod.ip, port);
            pod.ns
                .enter(move || {
                    let mut balanced =
                        Held::connect_from(local, sock(BULK, 80), TIMEOUT).expect("ClusterIP");
                    assert_eq!(parse(&balanced.ask().expect("first answer")).0, "web-1");
                    let mut direct = Held::connect_from(local, backend, TIMEOUT)
                        .expect("the backend's own address, from the same port");
                    assert_eq!(direct.local_addr().unwrap(), local, "both from one port");
                    let (name, seen) = parse(&direct.ask().expect("direct answer"));
                    assert_eq!((name.as_str(), seen), ("web-1", *local.ip()), "{client}");
                    for round in 0..3 {
                        balanced.ask().unwrap_or_else(|e| {
                            panic!("{client} round {round}: the balanced connection: {e:#}")
                        });
                        direct.ask().unwrap_or_else(|e| {
                            panic!("{client} round {round}: the direct connection: {e:#}")
                        });
                    }
                })
                .unwrap();
        }
    });
}

#[test]
fn bulk_transfers_cross_every_path_intact_both_ways() {
    on_each_wiring(&[], bulk_transfers);
}

/// Native XDP forced on the uplinks, where the NIC-like bed makes it work (complete checksums,
/// and an XDP program on the other end, so that XDP_TX arrives): the XDP program's own
/// translation, source NAT (or, with `--forwarding-mode dsr`, the SYN's option) and forwarding
/// end to end, small and bulk.
#[test]
fn node_ports_work_through_native_xdp() {
    for mode in ["snat", "dsr"] {
        let Some(bed) = Bed::new(
            Wiring::NicLike,
            &["--xdp-mode", "native", "--forwarding-mode", mode],
        ) else {
            return;
        };
        assert!(
            bed.logs().contains("hook=XdpNative"),
            "native XDP not attached:\n{}",
            bed.logs()
        );
        for node in 0..2 {
            let answers = bed.ask_from_outside(sock(bed.cluster.node_ip(node), 30_080), 30, None);
            assert_eq!(
                names(&answers),
                BTreeSet::from(["web-0", "web-1"]),
                "{mode}: TCP via node-{node}"
            );
        }
        bulk_transfers(&bed);
    }
}

/// On veths as kind wires them, XDP_TX out of an uplink is dropped (nothing runs XDP on the
/// other end): native XDP is refused there, loudly, and tc serves the uplink, so that every
/// path still works. By default (auto) the agent, asking in its own namespace, sees a veth named
/// `eth0` where the host's `eth0` is a NIC, and leaves XDP off.
#[test]
fn native_xdp_is_refused_where_what_it_sends_back_would_be_dropped() {
    for (args, refused) in [(&["--xdp-mode", "native"][..], true), (&[][..], false)] {
        let Some(bed) = Bed::new(Wiring::VethDefaults, args) else {
            return;
        };
        let logs = bed.logs();
        assert!(
            !logs.contains("hook=XdpNative"),
            "{args:?}: XDP attached:\n{logs}"
        );
        assert!(
            logs.contains("hook=Tc"),
            "{args:?}: tc does not serve:\n{logs}"
        );
        assert_eq!(
            logs.contains("--xdp-mode native refused"),
            refused,
            "{args:?}:\n{logs}"
        );
        for node in 0..2 {
            let answers = bed.ask_from_outside(sock(bed.cluster.node_ip(node), 30_080), 20, None);
            assert_eq!(
                names(&answers),
                BTreeSet::from(["web-0", "web-1"]),
                "{args:?}: TCP via node-{node}"
            );
        }
    }
}

/// Direct server return, as the node-wide default (`--forwarding-mode dsr`): through either
/// node, both backends see the client's own address, the one on the other node included, and
/// that node answers the client itself (its datapath recorded the flows from the SYN's option
/// and reverse-NATed their replies; the entry node reverse-NATed none). UDP stays source-NATed.
#[test]
fn direct_server_return_keeps_the_client_and_answers_from_the_backends_node() {
    on_each_wiring(&["--forwarding-mode", "dsr"], |bed| {
        let client = bed.cluster.client_ip();
        let reply_nat = |node: usize| verdict(bed, node, Reason::ReplyNat);
        let accepted = |node: usize| verdict(bed, node, Reason::DsrAccepted);
        for node in 0..2 {
            let answers = bed.ask_from_outside(sock(bed.cluster.node_ip(node), 30_080), 30, None);
            assert_eq!(names(&answers), BTreeSet::from(["web-0", "web-1"]));
            assert!(
                answers.iter().all(|(_, seen)| *seen == client),
                "via node-{node}: {answers:?}"
            );
        }

        // `bulk` is served by web-1 alone: through node-0, none of its replies pass node-0.
        let before = [reply_nat(0), reply_nat(1), accepted(1)];
        let via = sock(bed.cluster.node_ip(0), BULK_NODE_PORT);
        let answers = bed.ask_from_outside(via, 10, None);
        assert!(
            answers
                .iter()
                .all(|answer| *answer == ("web-1".to_owned(), client)),
            "{answers:?}"
        );
        let after = [reply_nat(0), reply_nat(1), accepted(1)];
        assert_eq!(after[0], before[0], "node-0 reverse-NATed replies");
        // Every reply segment on node-1 (at least a SYN-ACK per flow); each SYN recorded at
        // least once (by XDP, and again by tc where both run).
        assert!(after[1] - before[1] >= 10, "{before:?} -> {after:?}");
        assert!(after[2] - before[2] >= 10, "{before:?} -> {after:?}");

        // A client that reuses one port for two frontends of web-1 (the NodePort and the
        // LoadBalancer IP, both entering at node-0) keeps its address on each new connection:
        // node-0 sees its client's FIN only, and the port is free again after it. Each
        // connection waits until node-0 has that FIN of the one before: until then the old flow
        // holds the port, and the client's FIN and next SYN may cross on their way (a veth
        // hands each to the backlog of the CPU its sender ran on).
        let local = SocketAddrV4::new(client, 23_456);
        let node_0 = Maps::open_pinned(bed.agents.bpffs_dir(0)).expect("pinned maps");
        let reply_key = flow_key(SocketAddrV4::new(bed.web[1], 8080), local, TCP, REPLY);
        for target in [via, sock(BULK_LB_REMOTE, 80)].repeat(2) {
            let answer = bed
                .cluster
                .client()
                .enter(move || server::http_get_bound(local, target, TIMEOUT))
                .unwrap()
                .unwrap_or_else(|e| panic!("{target}: {e:#}"));
            assert_eq!(parse(&answer.0), ("web-1".to_owned(), client), "{target}");
            bed.wait_until("node-0 sees the client's FIN", || {
                node_0.ct.get(&reply_key, 0).is_ok_and(|entry| {
                    entry.nat_addr.to_ip() == *target.ip()
                        && entry.nat_port.to_host() == target.port()
                        && entry.flags & ct_flags::PEER_FIN != 0
                })
            });
        }

        // UDP is source-NATed still: web-1 sees node-0.
        let addr = sock(bed.cluster.node_ip(0), 30_080);
        let udp: Vec<(String, Ipv4Addr)> = bed
            .cluster
            .client()
            .enter(move || {
                (0..20)
                    .map(|i| parse(&server::udp_request(addr, 42_000 + i, TIMEOUT).unwrap()))
                    .collect()
            })
            .unwrap();
        for (name, seen) in &udp {
            let want = if name == "web-0" {
                client
            } else {
                bed.cluster.node_ip(0)
            };
            assert_eq!(*seen, want, "UDP answered by {name}");
        }
    });
}

/// Bulk transfers through every path with DSR the node's default, DSR paths (the NodePort, the
/// LoadBalancer IP and the externalIP of a backend on the other node) included, arrive intact
/// both ways.
#[test]
fn bulk_transfers_cross_every_path_intact_by_direct_server_return() {
    on_each_wiring(&["--forwarding-mode", "dsr"], bulk_transfers);
}

/// One Service by DSR through its annotation while the node's default stays SNAT, and one
/// annotated `snat` while the default is DSR; a value that names no mode is reported and the
/// default applies.
#[test]
fn the_forwarding_mode_annotation_overrides_the_nodes_default() {
    const MODE_NODE_PORT: u16 = 30_086;
    for (default, annotation, keeps_client) in [
        ("snat", "dsr", true),
        ("dsr", "snat", false),
        ("snat", "fast", false),
    ] {
        let Some(bed) = Bed::new(Wiring::VethDefaults, &["--forwarding-mode", default]) else {
            return;
        };
        let yaml = documents([
            ServiceManifest::new("web", WEB)
                .service_type(ServiceType::NodePort)
                .annotation("lb/forwarding-mode", annotation)
                .port(ServicePort::tcp("http", 80, 8080).node_port(MODE_NODE_PORT))
                .yaml(),
            slice("web", &[("http", Protocol::Tcp)], &[bed.endpoint(1)]),
        ]);
        bed.source.write("web.yaml", &yaml).unwrap();
        // A NodePort the bed's own `web` does not have: it answers only once this manifest
        // has replaced that one, whose two backends could otherwise pass for this one's.
        let via = sock(bed.cluster.node_ip(0), MODE_NODE_PORT);
        bed.wait_until("the new NodePort serves", || {
            bed.connect_outcome(via, None) == Outcome::Connected
        });
        let client = bed.cluster.client_ip();
        let want = if keeps_client {
            client
        } else {
            bed.cluster.node_ip(0)
        };
        bed.wait_until("the annotation applies", || {
            bed.ask_from_outside(via, 1, None)[0] == ("web-1".to_owned(), want)
        });
        let answers = bed.ask_from_outside(via, 10, None);
        assert!(
            answers
                .iter()
                .all(|answer| *answer == ("web-1".to_owned(), want)),
            "{default} / {annotation}: {answers:?}"
        );
        if annotation == "fast" {
            bed.wait_until("the bad value is reported", || {
                bed.logs().contains(
                    "annotation lb/forwarding-mode: \"fast\" is neither \"snat\" nor \"dsr\"",
                )
            });
        }
    }
}

/// Node `node`'s count of packets for `reason`.
fn verdict(bed: &Bed, node: usize, reason: Reason) -> u64 {
    let maps = Maps::open_pinned(bed.agents.bpffs_dir(node)).expect("pinned maps");
    let totals = maps.verdict_totals().expect("verdicts");
    totals
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, c)| c.packets)
}

/// Every way into `bulk` (served by web-1 on node-1), [`BULK_BYTES`] up and down, each checked
/// byte by byte: ClusterIP from the same node and from the other, NodePort through the
/// backend's node and the other (source-NATed), a LoadBalancer IP routed to either node, an
/// externalIP, and a pod reaching its own Service (hairpin).
fn bulk_transfers(bed: &Bed) {
    let cluster_ip = SocketAddrV4::new(BULK, 80);
    let from_pods = [
        ("client-1", cluster_ip, "ClusterIP, same node"),
        ("client-0", cluster_ip, "ClusterIP, other node"),
        ("web-0", SocketAddrV4::new(SELF, 80), "hairpin"),
    ];
    let from_outside = [
        (
            sock(bed.cluster.node_ip(1), BULK_NODE_PORT),
            "NodePort, local backend",
        ),
        (
            sock(bed.cluster.node_ip(0), BULK_NODE_PORT),
            "NodePort, remote backend",
        ),
        (sock(BULK_LB_LOCAL, 80), "LoadBalancer IP, local backend"),
        (sock(BULK_LB_REMOTE, 80), "LoadBalancer IP, remote backend"),
        (sock(BULK_EXTERNAL_IP, 80), "externalIP, remote backend"),
    ];
    let paths = from_pods
        .iter()
        .map(|(pod, addr, what)| (bed.cluster.pod(pod).ns, *addr, *what))
        .chain(
            from_outside
                .iter()
                .map(|(addr, what)| (bed.cluster.client(), *addr, *what)),
        );
    for (ns, addr, what) in paths {
        let transfers = ns
            .enter(move || {
                let up = server::upload(addr, BULK_BYTES, TIMEOUT)?;
                let down = server::download(addr, BULK_BYTES, TIMEOUT)?;
                anyhow::Ok((up, down))
            })
            .unwrap();
        match transfers {
            Ok((up, down)) => {
                let want = if what == "hairpin" { "web-0" } else { "web-1" };
                assert_eq!(
                    (parse(&up).0, parse(&down).0),
                    (want.into(), want.into()),
                    "{what}"
                );
            }
            Err(e) => panic!(
                "{what} ({addr}, {:?}): {e:#}\n{}",
                bed.cluster.wiring(),
                bed.logs()
            ),
        }
    }
}
