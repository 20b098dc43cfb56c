//! The kube-proxy baselines at work: their iptables and nftables datapaths really balance
//! ClusterIP and NodePort traffic between pods of a node in network namespaces, and the
//! control-plane comparison programs the same Services with each of them and with ours.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::Arc,
    time::Duration,
};

use lb_bench::{
    controlplane,
    kubeproxy::{
        BenchPort, BenchService, EndpointChange, NodeConfig, Position, arrange, fillers,
        measure::{self, Backend},
        with_endpoint_change,
    },
};
use lb_testbed::{
    Netns, Node,
    netns::unique_prefix,
    server::{self, Server},
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The datapaths at work: a node with two `hostnames` pods and a client pod, and an external
// client on a link of its own.

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const WEB_0: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const WEB_1: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 4);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const PORT: u16 = 8080;

struct Bed {
    node: Node,
    external: Netns,
    _servers: Vec<Server>,
}

fn bed() -> Bed {
    let mut node = Node::new("kp").expect("node");
    let servers = vec![
        node.add_hostnames_pod("web-0", WEB_0, PORT).expect("web-0"),
        node.add_hostnames_pod("web-1", WEB_1, PORT).expect("web-1"),
    ];
    node.add_pod("client", CLIENT).expect("client");
    let external = Netns::new(unique_prefix("kpx")).expect("external netns");
    let ns = &node.ns;
    ns.add_veth("kpext0", &external, "eth0")
        .expect("uplink veth");
    ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "kpext0"])
        .unwrap();
    ns.ip(&["link", "set", "kpext0", "up"]).unwrap();
    // A default route, as a real node has (traffic to a Service without endpoints is routed
    // before the filter rejects it).
    ns.ip(&["route", "add", "default", "via", &EXTERNAL_IP.to_string()])
        .unwrap();
    external
        .ip(&["addr", "add", &format!("{EXTERNAL_IP}/24"), "dev", "eth0"])
        .unwrap();
    external.ip(&["link", "set", "eth0", "up"]).unwrap();
    external
        .ip(&["route", "add", "10.96.0.0/12", "via", &NODE_IP.to_string()])
        .unwrap();
    Bed {
        node,
        external,
        _servers: servers,
    }
}

fn bed_config() -> NodeConfig {
    NodeConfig {
        node_ip: NODE_IP,
        ..NodeConfig::default()
    }
}

/// `web` (both pods, NodePort 30080, also UDP), `local` (ETP Local, NodePort 30081: web-0 here
/// and a pod on another node), `empty` (no endpoints), among fillers.
fn bed_services() -> Vec<BenchService> {
    let web = BenchService::new("default", "web", WEB_VIP)
        .port(BenchPort::tcp("http", 80, PORT).node_port(30080))
        .port(BenchPort::udp("echo", 53, PORT).node_port(30053))
        .endpoints([WEB_0, WEB_1]);
    let mut services = arrange(web, fillers(50, 1), Position::Middle);
    services.push(
        BenchService::new("default", "local", LOCAL_VIP)
            .port(BenchPort::tcp("http", 80, PORT).node_port(30081))
            .endpoints([WEB_0, ip("10.10.1.2")])
            .external_traffic_policy_local(),
    );
    services.insert(
        0,
        BenchService::new("default", "empty", EMPTY_VIP).port(BenchPort::tcp("http", 80, PORT)),
    );
    services
}

/// Sends `n` HTTP requests from `ns` to `to`; returns (server name, client address it saw).
fn ask(ns: &Netns, to: SocketAddrV4, n: usize) -> Vec<(String, Ipv4Addr)> {
    ns.enter(move || {
        (0..n)
            .map(|_| {
                let body =
                    server::http_get(to, TIMEOUT).unwrap_or_else(|e| panic!("GET {to}: {e:#}"));
                let (name, peer) = body.split_once(' ').expect("hostnames answer");
                let peer: SocketAddrV4 = peer.parse().expect("peer");
                (name.to_owned(), *peer.ip())
            })
            .collect()
    })
    .unwrap()
}

fn names(answers: &[(String, Ipv4Addr)]) -> BTreeSet<String> {
    answers.iter().map(|(n, _)| n.clone()).collect()
}

fn check_datapath(backend: Backend) {
    let bed = bed();
    let cfg = bed_config();
    let services = bed_services();
    measure::apply(
        &bed.node.ns,
        backend,
        Arc::new(backend.full_ruleset(&services, &cfg)),
    )
    .unwrap_or_else(|e| panic!("{}: {e:#}", backend.name()));
    let client = &bed.node.pod("client").ns;
    let both: BTreeSet<String> = ["web-0".to_owned(), "web-1".to_owned()].into();

    // ClusterIP from a pod: balanced over both pods, the client's address kept.
    let answers = ask(client, SocketAddrV4::new(WEB_VIP, 80), 40);
    assert_eq!(names(&answers), both, "{answers:?}");
    assert!(
        answers.iter().all(|(_, peer)| *peer == CLIENT),
        "{answers:?}"
    );

    // The UDP port.
    let to = SocketAddrV4::new(WEB_VIP, 53);
    let answer = client
        .enter(move || server::udp_request(to, 0, TIMEOUT))
        .unwrap()
        .expect("UDP answer");
    assert!(answer.starts_with("web-"), "{answer}");

    // NodePort from outside: balanced, masqueraded (ETP Cluster).
    let answers = ask(&bed.external, SocketAddrV4::new(NODE_IP, 30080), 40);
    assert_eq!(names(&answers), both, "{answers:?}");
    assert!(
        answers.iter().all(|(_, peer)| *peer != EXTERNAL_IP),
        "{answers:?}"
    );

    // ETP Local: only the local pod, the client's address kept.
    let answers = ask(&bed.external, SocketAddrV4::new(NODE_IP, 30081), 10);
    assert!(
        answers
            .iter()
            .all(|(n, peer)| n == "web-0" && *peer == EXTERNAL_IP),
        "{answers:?}"
    );

    // ClusterIP from outside the cluster CIDR: masqueraded.
    let answers = ask(&bed.external, SocketAddrV4::new(WEB_VIP, 80), 10);
    assert!(
        answers.iter().all(|(_, peer)| *peer != EXTERNAL_IP),
        "{answers:?}"
    );

    // A Service without endpoints rejects.
    let to = SocketAddrV4::new(EMPTY_VIP, 80);
    let err = client
        .enter(move || TcpStream::connect_timeout(&to.into(), TIMEOUT).map(|_| ()))
        .unwrap()
        .expect_err("a Service without endpoints must not connect");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // After a partial sync that removes web-1, only web-0 answers; after adding it back, both.
    let web = services.iter().position(|s| s.name == "web").unwrap();
    let without = with_endpoint_change(&services, web, EndpointChange::Remove(WEB_1)).unwrap();
    let partial_sync = |from: &[BenchService], to: &[BenchService]| {
        measure::apply(
            &bed.node.ns,
            backend,
            Arc::new(backend.endpoint_change(from, to, &cfg)),
        )
        .unwrap();
    };
    partial_sync(&services, &without);
    let answers = ask(client, SocketAddrV4::new(WEB_VIP, 80), 20);
    assert!(answers.iter().all(|(n, _)| n == "web-0"), "{answers:?}");
    partial_sync(&without, &services);
    let answers = ask(client, SocketAddrV4::new(WEB_VIP, 80), 40);
    assert_eq!(names(&answers), both, "{answers:?}");
}

#[test]
fn iptables_datapath_balances_services() {
    if !lb_testbed::privileges::require() {
        return;
    }
    check_datapath(Backend::iptables_default().unwrap());
}

#[test]
fn nftables_datapath_balances_services() {
    if !lb_testbed::privileges::require() {
        return;
    }
    check_datapath(Backend::Nftables);
}

// ---------------------------------------------------------------------------------------------
// The control-plane comparison, small: every datapath programs the Services and applies the
// changes, and the figures say so.

#[test]
fn controlplane_comparison_runs() {
    if !lb_testbed::privileges::require() {
        return;
    }
    let opts = controlplane::Options::new(&[200], 4).expect("options (is lb-agent built?)");
    let results = controlplane::run_with(&opts, &mut |line| eprintln!("{line}")).unwrap();
    let mut datapaths = results.datapaths();
    datapaths.sort();
    assert_eq!(
        datapaths,
        ["iptables-legacy", "iptables-nft", "nftables", "ours"]
    );
    for datapath in results.datapaths() {
        let f = results.get(&datapath, 200).unwrap();
        assert!(f.completed, "{f:?}");
        assert!(f.program_s.is_some_and(|s| s > 0.0), "{f:?}");
        let change = f.change.as_ref().expect("changes");
        assert_eq!(change.completed, 4, "{f:?}");
        assert!(
            change.p50_ms > 0.0 && change.p99_ms >= change.p50_ms,
            "{f:?}"
        );
        if datapath == "ours" {
            assert!(f.first_sync_s.is_some_and(|s| s > 0.0), "{f:?}");
            assert!(f.peak_rss_mib.is_some_and(|m| m > 1.0), "{f:?}");
            assert!(f.bpf_map_bytes.is_some_and(|b| b > 1 << 20), "{f:?}");
            assert!(
                f.bpf_maps
                    .iter()
                    .any(|m| m.name.eq_ignore_ascii_case("LB_SERVICES")),
                "{:?}",
                f.bpf_maps
            );
        } else {
            assert!(f.ruleset_bytes.is_some_and(|b| b > 200 * 100), "{f:?}");
            assert!(change.write_ms.iter().all(|w| *w > 0.0), "{f:?}");
        }
    }
    serde_json::to_string(&results).unwrap();
}
