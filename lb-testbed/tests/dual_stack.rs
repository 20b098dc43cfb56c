//! The cluster bed in IPv6: every pod, node and the external client has the IPv6 twin of its
//! IPv4 address, usable at once; pods reach each other across nodes without NAT in both
//! wirings, the external client reaches the nodes but not the pods (unless given a route), the
//! servers answer both families, and the Node objects can say so.

mod common;

use common::{PORT, parse_answer, two_node_cluster};
use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use lb_testbed::{
    Cluster, Netns, Wiring,
    node::POD_GATEWAY6,
    server::{http_get, http_get_from, http_get_peer, udp_request_from, udp_request_source},
};

const NODE_PORT: u16 = 9000;
const TIMEOUT: Duration = Duration::from_secs(3);

fn v6(text: &str) -> Ipv6Addr {
    text.parse().unwrap()
}

/// One TCP request from `ns` to `to`: the answer, and the address the client's socket is
/// connected to.
fn tcp_from(ns: &Netns, to: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    ns.enter(move || http_get_peer(to, TIMEOUT))?
}

/// One UDP request from `ns` to `to`: the answer, and the address it came from.
fn udp_from(ns: &Netns, to: SocketAddr) -> anyhow::Result<(String, SocketAddr)> {
    ns.enter(move || udp_request_source(to, TIMEOUT))?
}

/// The addresses of `iface` in `ns` that are not usable yet (duplicate address detection).
fn tentative(ns: &Netns, iface: &str) -> String {
    let out = ns
        .ip(&["-6", "addr", "show", "dev", iface, "tentative"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn pods_reach_pods_on_every_node_over_ipv6_without_nat() {
    if !lb_testbed::privileges::require() {
        return;
    }
    for wiring in [Wiring::NicLike, Wiring::VethDefaults] {
        let cluster = two_node_cluster(wiring);
        let client = cluster.pod("client");
        assert_eq!(client.ip6, v6("fd00:10:10:0::3"));
        assert_eq!(tentative(client.ns, "eth0"), "", "{wiring:?}");
        for (web, node) in [("web-0", 0), ("web-1", 1)] {
            let pod = cluster.pod(web);
            assert_eq!(pod.ip6, v6(&format!("fd00:10:10:{node}::2")));
            let to = SocketAddr::new(pod.ip6.into(), PORT);
            for (proto, answer) in [
                ("TCP", tcp_from(client.ns, to)),
                ("UDP", udp_from(client.ns, to)),
            ] {
                let (answer, from) =
                    answer.unwrap_or_else(|e| panic!("{wiring:?}: {proto} to {web}: {e:#}"));
                let (name, peer) = parse_answer::<SocketAddr>(&answer);
                assert_eq!(name, web, "{wiring:?}: {proto} answered by the wrong pod");
                assert_eq!(peer.ip(), IpAddr::V6(client.ip6), "{proto} to {web} NATed");
                assert_eq!(from, to, "{wiring:?}: {proto} answered from elsewhere");
            }
            // The same server still answers IPv4 as IPv4 (no IPv4-mapped addresses).
            let to4 = SocketAddr::new(pod.ip.into(), PORT);
            let (answer, _) = tcp_from(client.ns, to4).unwrap();
            assert_eq!(
                parse_answer::<SocketAddr>(&answer).1.ip(),
                IpAddr::V4(client.ip)
            );
        }
        // And back: a pod on node-1 reaches a pod on node-0.
        let web1 = cluster.pod("web-1");
        let to = SocketAddr::new(cluster.pod("web-0").ip6.into(), PORT);
        let (answer, _) = tcp_from(web1.ns, to).unwrap();
        let (name, peer) = parse_answer::<SocketAddr>(&answer);
        assert_eq!(name, "web-0");
        assert_eq!(peer.ip(), IpAddr::V6(web1.ip6));
        // Each pod routes through the link-local gateway its node holds on every pod veth.
        let routes = client.ns.ip(&["-6", "route", "show", "default"]).unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(routes.contains(&format!("via {POD_GATEWAY6}")), "{routes}");
    }
}

#[test]
fn external_client_reaches_nodes_over_ipv6_but_not_pods() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let mut cluster = two_node_cluster(Wiring::NicLike);
    assert_eq!(cluster.client_ip6(), v6("fd00:192:168:50::2"));
    assert_eq!(tentative(cluster.client(), "eth0"), "");
    for i in 0..cluster.node_count() {
        assert_eq!(cluster.node_ip6(i), v6(&format!("fd00:192:168:50::1{i}")));
        assert_eq!(tentative(&cluster.node(i).ns, "eth0"), "");
        let ping = cluster
            .client()
            .command("ping")
            .args(["-6", "-c1", "-W1", &cluster.node_ip6(i).to_string()])
            .output()
            .unwrap();
        assert!(
            ping.status.success(),
            "the client cannot ping node-{i}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }
    for i in 0..cluster.node_count() {
        cluster.add_node_server(i, NODE_PORT).unwrap();
    }
    let client = cluster.client();
    for i in 0..cluster.node_count() {
        let to = SocketAddr::new(cluster.node_ip6(i).into(), NODE_PORT);
        let (answer, _) = tcp_from(client, to).unwrap();
        let (name, peer) = parse_answer::<SocketAddr>(&answer);
        assert_eq!(name, format!("node-{i}"));
        assert_eq!(peer.ip(), IpAddr::V6(cluster.client_ip6()));
        let (answer, _) = udp_from(client, to).unwrap();
        assert_eq!(parse_answer::<SocketAddr>(&answer).0, format!("node-{i}"));
    }

    // Pods are inside the cluster: the client has no route to them.
    let web1 = SocketAddr::new(cluster.pod("web-1").ip6.into(), PORT);
    let err = tcp_from(client, web1).expect_err("the client must not reach a pod");
    let err = format!("{err:#}");
    assert!(err.contains("unreachable"), "unexpected error: {err}");

    // Unless it is given one: then it reaches the pod, unNATed.
    cluster
        .client_route(&cluster.plan().pod_cidr6(1), 1)
        .unwrap();
    let (answer, _) = tcp_from(client, web1).unwrap();
    let (name, peer) = parse_answer::<SocketAddr>(&answer);
    assert_eq!(name, "web-1");
    assert_eq!(peer.ip(), IpAddr::V6(cluster.client_ip6()));

    // More client addresses, to send from: one on the LAN, one behind the client.
    let node0 = SocketAddr::new(cluster.node_ip6(0).into(), NODE_PORT);
    for extra in [v6("fd00:192:168:50::3"), v6("fd00:198:51:100::7")] {
        cluster.add_client_ip(extra).unwrap();
        let answer = client
            .enter(move || http_get_from(extra, node0, TIMEOUT))
            .unwrap()
            .unwrap_or_else(|e| panic!("TCP from {extra}: {e:#}"));
        assert_eq!(
            parse_answer::<SocketAddr>(&answer).1.ip(),
            IpAddr::V6(extra)
        );
        let from = SocketAddr::new(extra.into(), 0);
        let answer = client
            .enter(move || udp_request_from(from, node0, TIMEOUT))
            .unwrap()
            .unwrap_or_else(|e| panic!("UDP from {extra}: {e:#}"));
        assert_eq!(
            parse_answer::<SocketAddr>(&answer).1.ip(),
            IpAddr::V6(extra)
        );
    }
}

#[test]
fn a_standalone_node_gives_its_pods_both_families() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let mut node = lb_testbed::Node::new("node").unwrap();
    node.add_pod("client", "10.0.1.2".parse().unwrap()).unwrap();
    let _server = node
        .add_hostnames_pod("backend-0", "10.0.1.10".parse().unwrap(), PORT)
        .unwrap();
    let (client, backend) = (node.pod("client"), node.pod("backend-0"));
    assert_eq!(client.ip6, v6("fd00:10:0:1::2"));
    assert_eq!(backend.ip6, v6("fd00:10:0:1::10"));
    let to = SocketAddr::new(backend.ip6.into(), PORT);
    let answer = client.ns.enter(move || http_get(to, TIMEOUT)).unwrap();
    let (name, peer) = parse_answer::<SocketAddr>(&answer.unwrap());
    assert_eq!(name, "backend-0");
    assert_eq!(peer.ip(), IpAddr::V6(client.ip6));
}

#[test]
fn dual_stack_node_objects_carry_both_families() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let cluster = Cluster::new(2).unwrap();
    let yaml = cluster.node_manifests_dual_stack();
    for text in [
        "192.168.50.11",
        "\"fd00:192:168:50::11\"",
        "\"10.10.1.0/24\"",
        "\"fd00:10:10:1::/64\"",
    ] {
        assert!(yaml.contains(text), "{text} missing from:\n{yaml}");
    }
    assert!(!cluster.node_manifests().contains("fd00"));
}
