//! The cluster bed itself: pods reach each other across nodes without NAT, the external client
//! reaches the nodes but not the pods, the LAN ports can receive XDP-sent frames, the real
//! agent runs on every node, and nothing is left behind.

mod common;

use common::{PORT, parse_answer, two_node_cluster};
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use lb_testbed::{
    Agents, Cluster, Netns, SourceDir, Wiring,
    agents::{self, HEALTHZ_PORT},
    ethtool,
    server::{self, http_get, http_get_from, udp_request, udp_request_from},
    xdp,
};

const NODE_PORT: u16 = 9000;
const TIMEOUT: Duration = Duration::from_secs(3);

fn tcp_from(ns: &Netns, to: SocketAddrV4) -> anyhow::Result<String> {
    ns.enter(move || http_get(to, TIMEOUT))?
}

fn udp_from(ns: &Netns, to: SocketAddrV4) -> anyhow::Result<String> {
    ns.enter(move || udp_request(to, 0, TIMEOUT))?
}

/// Namespaces of the bed with this prefix that still exist.
fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect()
}

/// Mount points at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|mount| mount.starts_with(dir))
        .map(str::to_owned)
        .collect()
}

#[test]
fn pods_reach_pods_on_every_node_without_nat() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let cluster = two_node_cluster(Wiring::NicLike);
    let client = cluster.pod("client");
    assert_eq!(client.node, 0);
    assert_eq!(client.ip, Ipv4Addr::new(10, 10, 0, 3));
    for (web, node) in [("web-0", 0), ("web-1", 1)] {
        let pod = cluster.pod(web);
        assert_eq!(pod.node, node);
        assert_eq!(pod.ip, Ipv4Addr::new(10, 10, node as u8, 2));
        let to = SocketAddrV4::new(pod.ip, PORT);
        for (proto, answer) in [
            ("TCP", tcp_from(client.ns, to)),
            ("UDP", udp_from(client.ns, to)),
        ] {
            let answer = answer.unwrap_or_else(|e| panic!("{proto} to {web}: {e:#}"));
            let (name, peer) = parse_answer::<SocketAddrV4>(&answer);
            assert_eq!(name, web, "{proto} answered by the wrong pod");
            assert_eq!(*peer.ip(), client.ip, "{proto} to {web} was NATed");
        }
    }
    // And back: a pod on node-1 reaches a pod on node-0.
    let web1 = cluster.pod("web-1");
    let answer = tcp_from(web1.ns, SocketAddrV4::new(cluster.pod("web-0").ip, PORT)).unwrap();
    let (name, peer) = parse_answer::<SocketAddrV4>(&answer);
    assert_eq!(name, "web-0");
    assert_eq!(*peer.ip(), web1.ip);
}

#[test]
fn external_client_reaches_nodes_but_not_pods() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let mut cluster = two_node_cluster(Wiring::NicLike);
    let client = cluster.client();
    assert_eq!(cluster.client_ip(), Ipv4Addr::new(192, 168, 50, 2));
    for i in 0..cluster.node_count() {
        assert_eq!(
            cluster.node_ip(i),
            Ipv4Addr::new(192, 168, 50, 10 + i as u8)
        );
        let ping = client
            .command("ping")
            .args(["-c1", "-W1", &cluster.node_ip(i).to_string()])
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
        let to = SocketAddrV4::new(cluster.node_ip(i), NODE_PORT);
        let (name, peer) = parse_answer::<SocketAddrV4>(&tcp_from(client, to).unwrap());
        assert_eq!(name, format!("node-{i}"));
        assert_eq!(*peer.ip(), cluster.client_ip());
        let (name, _) = parse_answer::<SocketAddrV4>(&udp_from(client, to).unwrap());
        assert_eq!(name, format!("node-{i}"));
    }

    // Pods are inside the cluster: the client has no route to them.
    let web1 = SocketAddrV4::new(cluster.pod("web-1").ip, PORT);
    let err = tcp_from(client, web1).expect_err("the client must not reach a pod");
    let err = format!("{err:#}");
    assert!(err.contains("unreachable"), "unexpected error: {err}");

    // Unless it is given one (as for LoadBalancer IPs): then it reaches the pod, unNATed.
    cluster
        .client_route(&cluster.plan().pod_cidr(1), 1)
        .unwrap();
    let (name, peer) = parse_answer::<SocketAddrV4>(&tcp_from(client, web1).unwrap());
    assert_eq!(name, "web-1");
    assert_eq!(*peer.ip(), cluster.client_ip());

    // More client addresses, to send from: one on the LAN, one behind the client.
    let node0 = SocketAddrV4::new(cluster.node_ip(0), NODE_PORT);
    for extra in [
        Ipv4Addr::new(192, 168, 50, 3),
        Ipv4Addr::new(198, 51, 100, 7),
    ] {
        cluster.add_client_ip(extra).unwrap();
        let answer = client
            .enter(move || http_get_from(extra, node0, TIMEOUT))
            .unwrap()
            .unwrap_or_else(|e| panic!("TCP from {extra}: {e:#}"));
        assert_eq!(*parse_answer::<SocketAddrV4>(&answer).1.ip(), extra);
        let from = SocketAddrV4::new(extra, 0);
        let answer = client
            .enter(move || udp_request_from(from, node0, TIMEOUT))
            .unwrap()
            .unwrap_or_else(|e| panic!("UDP from {extra}: {e:#}"));
        assert_eq!(*parse_answer::<SocketAddrV4>(&answer).1.ip(), extra);
    }
}

/// Packets received by `iface` in `ns`, as the kernel counts them.
fn rx_packets(ns: &Netns, iface: &str) -> u64 {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", iface]).unwrap();
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx counter for {iface} in {links}"))
}

/// `count` pings from the external client to node-0 (unanswered when XDP bounces them).
fn ping_node0(cluster: &Cluster, count: u32) {
    let _ = cluster
        .client()
        .command("ping")
        .args(["-q", "-c", &count.to_string(), "-i", "0.05", "-W", "1"])
        .arg(cluster.node_ip(0).to_string())
        .output()
        .unwrap();
}

#[test]
fn frames_that_xdp_sends_into_veths_are_received() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let cluster = two_node_cluster(Wiring::NicLike);
    for i in 0..cluster.node_count() {
        let port = cluster.lan_port(i);
        assert!(
            ethtool::gro(cluster.lan(), &port).unwrap(),
            "GRO off on {port}"
        );
    }
    for pod in ["web-0", "web-1", "client"] {
        assert!(
            ethtool::gro(cluster.pod(pod).ns, "eth0").unwrap(),
            "GRO off in {pod}"
        );
    }
    // The client learns node-0's MAC first: XDP below bounces ARP too.
    ping_node0(&cluster, 1);
    let node0 = &cluster.node(0).ns;

    // XDP_TX out of node-0's uplink: the frames come back into the LAN.
    let port = cluster.lan_port(0);
    let before = rx_packets(cluster.lan(), &port);
    let bounce = xdp::attach_verdict(node0, "eth0", xdp::action::TX).unwrap();
    ping_node0(&cluster, 5);
    drop(bounce);
    let received = rx_packets(cluster.lan(), &port) - before;
    assert!(
        received >= 5,
        "{port} received {received} of 5 XDP_TX frames"
    );

    // XDP_REDIRECT from node-0's uplink into a pod's veth: the pod receives them.
    ping_node0(&cluster, 1);
    let web0 = cluster.pod("web-0");
    let before = rx_packets(web0.ns, "eth0");
    let redirect = xdp::attach_redirect(node0, "eth0", web0.host_iface).unwrap();
    ping_node0(&cluster, 5);
    drop(redirect);
    let received = rx_packets(web0.ns, "eth0") - before;
    assert!(
        received >= 5,
        "web-0 received {received} of 5 redirected frames"
    );

    // The GRO switch works both ways (it is not a no-op).
    ethtool::set_gro(cluster.lan(), &port, false).unwrap();
    assert!(!ethtool::gro(cluster.lan(), &port).unwrap());
}

#[test]
fn pod_names_are_unique_in_the_cluster() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let mut cluster = Cluster::new(2).unwrap();
    cluster.add_pod(0, "a").unwrap();
    let err = cluster.add_pod(1, "a").unwrap_err();
    assert!(
        format!("{err:#}").contains("already runs on node-0"),
        "{err:#}"
    );
    assert!(cluster.add_pod(2, "b").is_err(), "there is no node-2");
    assert!(cluster.find_pod("b").is_none());
}

#[test]
fn drop_removes_every_namespace_even_after_a_panic() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let cluster = two_node_cluster(Wiring::NicLike);
    let prefix = cluster.prefix().to_owned();
    // lan, client, 2 nodes, 3 pods.
    assert_eq!(namespaces_with_prefix(&prefix).len(), 7);
    drop(cluster);
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());

    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let cluster = two_node_cluster(Wiring::NicLike);
        tx.send(cluster.prefix().to_owned()).unwrap();
        panic!("a test failing with its cluster up");
    });
    assert!(outcome.is_err());
    let prefix = rx.recv().unwrap();
    assert_eq!(namespaces_with_prefix(&prefix), Vec::<String>::new());
}

#[test]
fn agents_run_restart_and_clean_up_on_every_node() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let bin = agents::agent_binary().unwrap_or_else(|e| panic!("{e:#}"));
    let cluster = two_node_cluster(Wiring::NicLike);
    let source = SourceDir::new().unwrap();
    source
        .write("nodes.yaml", &cluster.node_manifests())
        .unwrap();
    let mut agents = Agents::start(&cluster, &bin, source.path(), &[]).unwrap_or_else(|e| {
        panic!("{e:#}");
    });
    let dir = agents.dir().to_owned();
    for i in 0..cluster.node_count() {
        assert!(
            mounts_under(&dir).contains(&agents.bpffs_dir(i).to_str().unwrap().to_owned()),
            "node-{i}'s agent did not mount its bpffs"
        );
    }

    // The agents' health port answers on the nodes' addresses, from outside the cluster.
    let healthz = SocketAddrV4::new(cluster.node_ip(1), HEALTHZ_PORT);
    let (status, _) = cluster
        .client()
        .enter(move || server::http_request(healthz, "/readyz", TIMEOUT))
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    // Pods still reach each other through the attached datapath.
    let web1 = SocketAddrV4::new(cluster.pod("web-1").ip, PORT);
    let (name, _) =
        parse_answer::<SocketAddrV4>(&tcp_from(cluster.pod("client").ns, web1).unwrap());
    assert_eq!(name, "web-1");

    let status = agents.stop_node(1).unwrap();
    assert!(
        status.success(),
        "the agent exited {status} on SIGTERM:\n{}",
        agents.log(1)
    );
    assert!(agents.pid(1).is_none());
    agents.start_node(1).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(agents.log(1).contains("node-1"), "{}", agents.log(1));

    drop(agents);
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
