//! Which client address a backend sees, end to end on the two-node bed of `e2e_external`: pods
//! through ClusterIPs keep theirs, external clients through a routed ClusterIP are served as
//! through a NodePort, `--masquerade-all` shows every backend the node, source-NAT ports in
//! TIME_WAIT keep serving, and a client reusing its ports keeps its source-NAT ports. Both wirings (NIC-like frames, veths with kind's defaults). Needs
//! root.

mod common;

use std::{collections::BTreeSet, net::Ipv4Addr};

use common::external::*;
use lb_testbed::server;

#[test]
fn cluster_ips_from_pods_on_both_nodes_reach_backends_on_both_with_the_client_address_kept() {
    on_each_wiring(&[], |bed| {
        for pod in ["client-0", "client-1"] {
            let own = bed.cluster.pod(pod).ip;
            let answers = bed.ask_from_pod(pod, sock(WEB, 80), 30);
            assert_eq!(names(&answers), BTreeSet::from(["web-0", "web-1"]), "{pod}");
            assert!(
                answers.iter().all(|(_, client)| *client == own),
                "{pod} ({own}) is seen as itself: {answers:?}"
            );
        }
    });
}

/// A ClusterIP reached from outside (the service range routed to node-0), as kube-proxy serves
/// it: its backends on both nodes answer from the ClusterIP (the connections would not open
/// otherwise); the one on node-0 sees the client, the one on node-1 sees node-0, which
/// source-NATed the flow as it does an external flow to a NodePort.
#[test]
fn cluster_ips_reached_from_outside_are_served_and_source_natted_like_node_ports() {
    on_each_wiring(&[], |bed| {
        let (client, node_0) = (bed.cluster.client_ip(), bed.cluster.node_ip(0));
        let answers = bed.ask_from_outside(sock(WEB, 80), 30, None);
        assert_eq!(names(&answers), BTreeSet::from(["web-0", "web-1"]));
        for (name, seen) in &answers {
            let expected = if name == "web-0" { client } else { node_0 };
            assert_eq!(*seen, expected, "{name}");
        }
        let addr = sock(WEB, 80);
        let udp: Vec<(String, Ipv4Addr)> = bed
            .cluster
            .client()
            .enter(move || {
                (0..20)
                    .map(|i| {
                        parse(&server::udp_request(addr, 42_000 + i, TIMEOUT).expect("UDP answer"))
                    })
                    .collect()
            })
            .unwrap();
        assert_eq!(names(&udp), BTreeSet::from(["web-0", "web-1"]), "UDP");
        // A port the ClusterIP does not serve is still refused.
        assert_eq!(bed.connect_outcome(sock(WEB, 81), None), Outcome::Refused);
    });
}

/// `--external-cluster-ips=false`: a ClusterIP refuses clients outside the cluster, as before
/// this was served; pods keep reaching it.
#[test]
fn cluster_ips_can_be_closed_to_clients_outside_the_cluster() {
    on_each_wiring(&["--external-cluster-ips=false"], |bed| {
        assert_eq!(bed.connect_outcome(sock(WEB, 80), None), Outcome::Refused);
        let answers = bed.ask_from_pod("client-0", sock(WEB, 80), 10);
        assert!(!answers.is_empty());
    });
}

/// `--masquerade-all`, as kube-proxy's: every balanced flow reaches its backend from the node
/// it entered (its SNAT address), also an external flow to a backend on that node and a pod's
/// flow to a ClusterIP, whichever node the backend runs on; answers still come from the
/// frontend. Without it (the other tests) only external flows to other nodes' backends are.
/// externalTrafficPolicy Local keeps its clients.
#[test]
fn masquerade_all_shows_every_backend_the_node_as_its_client() {
    on_each_wiring(&["--masquerade-all"], |bed| {
        let node_0 = bed.cluster.node_ip(0);
        for (what, answers) in [
            (
                "NodePort",
                bed.ask_from_outside(sock(node_0, 30_080), 30, None),
            ),
            (
                "ClusterIP from outside",
                bed.ask_from_outside(sock(WEB, 80), 30, None),
            ),
            (
                "ClusterIP from client-0",
                bed.ask_from_pod("client-0", sock(WEB, 80), 30),
            ),
        ] {
            assert_eq!(
                names(&answers),
                BTreeSet::from(["web-0", "web-1"]),
                "{what}"
            );
            assert!(
                answers.iter().all(|(_, seen)| *seen == node_0),
                "{what}: every backend sees node-0 ({node_0}): {answers:?}"
            );
        }
        // Except flows to the external addresses of a Service with externalTrafficPolicy
        // Local, as kube-proxy's masqueradeAll (it masquerades flows to ClusterIPs): `local`'s
        // backend, on node-1, sees the external client through node-1's NodePort, and a pod
        // on node-0 through node-0's (kube-proxy's short-circuit to every endpoint).
        let client = bed.cluster.client_ip();
        let answers = bed.ask_from_outside(sock(bed.cluster.node_ip(1), 30_081), 5, None);
        assert!(
            answers.iter().all(|(_, seen)| *seen == client),
            "Local NodePort from outside: the client ({client}) kept: {answers:?}"
        );
        let pod = bed.cluster.pod("client-0").ip;
        let answers = bed.ask_from_pod("client-0", sock(node_0, 30_081), 5);
        assert!(
            answers.iter().all(|(_, seen)| *seen == pod),
            "Local NodePort from client-0: the pod ({pod}) kept: {answers:?}"
        );
        // A pod balanced to itself keeps the hairpin address.
        let hairpin = Ipv4Addr::from(lb_common::maps::hairpin::DEFAULT_ADDR);
        let answers = bed.ask_from_pod("web-0", sock(SELF, 80), 3);
        assert!(answers.iter().all(|(_, c)| *c == hairpin), "{answers:?}");
    });
}

/// This HTTP server closes first, as many do, so it holds every source-NATed connection in
/// TIME_WAIT on (node address, SNAT port) for a minute. With 8 SNAT ports, a client connecting
/// again and again and then another client are all served: ports in TIME_WAIT serve new
/// connections (some after a quick SYN retransmission, when TIME_WAIT finds the SYN's
/// timestamp older), while a port held by a live connection never does.
#[test]
fn source_nat_ports_in_time_wait_keep_serving_new_connections() {
    on_each_wiring(&["--snat-ports", "61000-61007"], |bed| {
        let node_ip = bed.cluster.node_ip(0);
        let via_node_0 = sock(node_ip, 30_080);
        let answers = bed.ask_from_outside(via_node_0, 80, None);
        let snatted = answers.iter().filter(|(_, seen)| *seen == node_ip).count();
        assert!(
            snatted > 20,
            "{snatted} of 80 connections went to the other node's backend"
        );
        let answers = bed.ask_from_outside(via_node_0, 40, Some(OUTSIDER));
        assert_eq!(names(&answers), BTreeSet::from(["web-0", "web-1"]));
    });
}

/// A busy client cycles through its ports and comes back to each one while the backend, which
/// closed first, still holds its last connection in TIME_WAIT. Each client port has a home SNAT
/// port of its own when the range is as wide as the client's ports: here 64 client ports, 64
/// SNAT ports, every connection source-NATed to `bulk`'s one backend on node-1, twice round.
/// The second round reaches the backend from the same node port as the first for each client
/// port (the backend takes the SYN over its TIME_WAIT, the timestamps being the same
/// connection's), and no SYN is sent twice. A port chosen by a hash of the flow instead lands
/// on another client port's TIME_WAIT for about a third of them, half of which the backend
/// refuses until the client retransmits.
#[test]
fn a_client_reusing_its_ports_gets_the_same_source_nat_port_and_never_retransmits() {
    const PORTS: u16 = 64;
    let range = format!("20000-{}", 20_000 + PORTS - 1);
    on_each_wiring(&["--snat-ports", &range], |bed| {
        let node_0 = bed.cluster.node_ip(0);
        let client = bed.cluster.client_ip();
        let target = sock(node_0, BULK_NODE_PORT);
        let rounds: Vec<Vec<(String, u32)>> = bed
            .cluster
            .client()
            .enter(move || {
                (0..2)
                    .map(|_| {
                        (0..PORTS)
                            .map(|i| {
                                let local = sock(client, 40_000 + i);
                                server::http_get_bound(local, target, TIMEOUT)
                                    .unwrap_or_else(|e| panic!("{local}: {e:#}"))
                            })
                            .collect()
                    })
                    .collect()
            })
            .unwrap();
        let peers = |round: &[(String, u32)]| -> Vec<String> {
            round
                .iter()
                .map(|(body, _)| {
                    let (name, peer) = body.split_once(' ').expect("name and peer");
                    assert_eq!(name, "web-1");
                    assert!(peer.starts_with(&format!("{node_0}:")), "{peer}");
                    peer.to_owned()
                })
                .collect()
        };
        let (first, second) = (peers(&rounds[0]), peers(&rounds[1]));
        assert_eq!(
            first.iter().collect::<BTreeSet<_>>().len(),
            usize::from(PORTS),
            "a port each: {first:?}"
        );
        assert_eq!(
            first, second,
            "each client port came back on its own node port"
        );
        let retransmitted: u32 = rounds.iter().flatten().map(|(_, r)| r).sum();
        assert_eq!(retransmitted, 0, "segments sent again");
    });
}
