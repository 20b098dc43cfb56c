//! Socket-level balancing end to end: the real agents on a two-node bed with `--socket-lb`, each
//! node's hooks on that node's own cgroup (`Cluster::with_cgroups`), and clients that are
//! processes in a node's cgroup or in its pods' (`SockClient`: this binary run again, as a
//! thread of the test process cannot leave the test's cgroup). Everything is asserted through
//! real sockets: what `connect()`, `getpeername()` and `recvfrom()` return and which backend
//! answered; the per-packet path's counters (read from the pinned maps) tell whether the hooks
//! or the packet path did the work. Needs root and a writable cgroup v2 hierarchy.

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::MetadataExt as _,
    time::Duration,
};

use common::external::slice;
use lb_common::{maps::FrontendKey, net::Be32};
use lb_datapath::{
    maps::Maps,
    socket_lb::{self, default_cgroup_root},
};
use lb_testbed::{
    Agents, Cluster, SockClient, SocketLb, SourceDir,
    manifests::{
        Endpoint, Protocol, ServiceManifest, ServicePort, ServiceType, TrafficPolicy, documents,
    },
    sock_client::{LoadCount, Outcome},
};

lb_testbed::sock_client_entry!();

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
/// `web`: a LoadBalancer Service (ClusterIP, NodePort on both nodes, an ingress IP and an
/// externalIP) over TCP and UDP, served by `web-0` (node-0) and `web-1` (node-1).
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30_080;
const LB_INGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// `empty`: TCP and UDP, no endpoints.
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// `sticky`: sessionAffinity ClientIP, served by `web-0` and `web-1`.
const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 16);
/// `self`: served by `web-0` alone, for `web-0` to reach itself.
const SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
/// `local`: a LoadBalancer with externalTrafficPolicy Local (NodePort 30081, ingress IP below),
/// served by `web-1` alone (node-1).
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 17);
const LOCAL_NODE_PORT: u16 = 30_081;
const LOCAL_INGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// `inner`: a ClusterIP with internalTrafficPolicy Local, served by `web-1` alone (node-1).
const INNER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 18);
/// `ranged`: a LoadBalancer whose loadBalancerSourceRanges hold node-0's address alone (ingress
/// IP below), served by both backends.
const RANGED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 19);
const RANGED_INGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
/// The refusal of a Service without endpoints is the hook's answer to the syscall itself: no
/// packet, no round trip.
const AT_ONCE: Duration = Duration::from_millis(100);
const BACKENDS: [&str; 2] = ["web-0", "web-1"];
/// What the hooks translate in [`assert_every_frontend_served`] on node-0: 20 TCP connects and
/// 6 datagrams to the ClusterIP, 3 datagrams to the node's NodePort, 4 connects to each of the
/// NodePort, the ingress IP and the externalIP.
const HOOKED: u64 = 20 + 6 + 3 + 3 * 4;

/// What a node counted for some frontends ([`Bed::counted`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counted {
    /// Packets the per-packet path NATed.
    packets: u64,
    /// Sockets the hooks connected and datagrams they sent to a backend.
    hooked: u64,
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The bed: two nodes with a cgroup each, `web-<i>` and `client-<i>` pods on node `i`, the
/// Services above, and an agent per node with socket-level balancing in the given mode.
struct Bed {
    // Dropped first: the agents stop (and unpin their hooks) before the cgroups and namespaces
    // go.
    agents: Agents,
    source: SourceDir,
    cluster: Cluster,
    web: [Ipv4Addr; 2],
}

impl Bed {
    fn new(mode: SocketLb) -> Option<Self> {
        if !common::require_privileges() {
            return None;
        }
        let root = default_cgroup_root().expect("a cgroup v2 hierarchy");
        let mut cluster = Cluster::new(2)
            .expect("cluster")
            .with_cgroups(&root)
            .expect("a cgroup per node");
        let web = [
            cluster.add_hostnames_pod(0, "web-0", 8080).unwrap(),
            cluster.add_hostnames_pod(1, "web-1", 8080).unwrap(),
        ];
        cluster.add_pod(0, "client-0").unwrap();
        cluster.add_pod(1, "client-1").unwrap();
        let source = SourceDir::new().unwrap();
        let both: Vec<Endpoint> = (0..2)
            .map(|i| Endpoint::ready(web[i], cluster.node_name(i)))
            .collect();
        for (file, yaml) in [
            ("nodes.yaml", cluster.node_manifests()),
            ("web.yaml", web_yaml(&both)),
            (
                "empty.yaml",
                ServiceManifest::new("empty", EMPTY)
                    .port(ServicePort::tcp("http", 80, 8080))
                    .port(ServicePort::udp("echo", 80, 8080))
                    .yaml(),
            ),
            (
                "sticky.yaml",
                documents([
                    ServiceManifest::new("sticky", STICKY)
                        .port(ServicePort::tcp("http", 80, 8080))
                        .client_ip_affinity(10_800)
                        .yaml(),
                    slice("sticky", &[("http", Protocol::Tcp)], &both),
                ]),
            ),
            ("policies.yaml", policies_yaml(&cluster, web)),
        ] {
            source.write(file, &yaml).unwrap();
        }
        let agents =
            Agents::start_with_socket_lb(&cluster, AGENT.as_ref(), source.path(), &[], mode)
                .expect("agents");
        Some(Self {
            agents,
            source,
            cluster,
            web,
        })
    }

    fn logs(&self) -> String {
        (0..2)
            .map(|i| format!("--- node-{i}:\n{}", self.agents.log(i)))
            .collect()
    }

    /// A client process on node `i`, in the node's cgroup.
    fn node_client(&self, i: usize) -> SockClient {
        let client = SockClient::on_node(&self.cluster, i).expect("node client");
        let cgroups = self.cluster.cgroups(i).expect("cgroups");
        assert!(
            cgroups.node.pids().unwrap().contains(&client.pid()),
            "the client runs in {}",
            cgroups.node.path().display()
        );
        client
    }

    /// A client process in pod `pod`, in its node's `pods` cgroup.
    fn pod_client(&self, pod: &str) -> SockClient {
        let client = SockClient::in_pod(&self.cluster, pod).expect("pod client");
        let node = self.cluster.pod(pod).node;
        let cgroups = self.cluster.cgroups(node).expect("cgroups");
        assert!(
            cgroups.pods.pids().unwrap().contains(&client.pid()),
            "the client runs in {}",
            cgroups.pods.path().display()
        );
        client
    }

    /// What node `node` counted for the backend sets of every frontend at one of `addrs` (any
    /// port, protocol and scope): the packet path's packets, and the hooks' connects and
    /// datagrams.
    fn counted(&self, node: usize, addrs: &[Ipv4Addr]) -> Counted {
        let maps = Maps::open_pinned(self.agents.bpffs_dir(node)).expect("pinned maps");
        let wanted: Vec<Be32> = addrs.iter().map(|a| Be32::from(*a)).collect();
        let sets: BTreeSet<u32> = maps
            .services
            .iter()
            .map(|e| e.expect("a frontend"))
            .filter(|(key, _): &(FrontendKey, _)| wanted.contains(&key.addr))
            .map(|(_, frontend)| frontend.set_id)
            .collect();
        assert!(!sets.is_empty(), "node-{node} has frontends at {addrs:?}");
        let mut counted = Counted::default();
        for set in sets {
            counted.packets += maps.set_totals(set).expect("set counters").packets;
            let hooks = maps.sock_totals(set).expect("socket counters");
            counted.hooked += hooks.connects + hooks.datagrams;
        }
        counted
    }

    /// `web`'s frontends on node `node`: ClusterIP, the node's NodePort address, the ingress IP
    /// and the externalIP.
    fn web_addrs(&self, node: usize) -> [Ipv4Addr; 4] {
        [WEB, self.cluster.node_ip(node), LB_INGRESS, EXTERNAL_IP]
    }

    /// Polls `check` for up to 5 s.
    fn wait_until(&self, what: &str, check: impl Fn() -> bool) {
        common::wait_until(what, check, || self.logs());
    }
}

/// `self`, `local`, `inner` and `ranged` (see their addresses).
fn policies_yaml(cluster: &Cluster, web: [Ipv4Addr; 2]) -> String {
    let http = [("http", Protocol::Tcp)];
    let web_0 = [Endpoint::ready(web[0], cluster.node_name(0))];
    let web_1 = [Endpoint::ready(web[1], cluster.node_name(1))];
    let both = [web_0[0].clone(), web_1[0].clone()];
    documents([
        ServiceManifest::new("self", SELF)
            .port(ServicePort::tcp("http", 80, 8080))
            .yaml(),
        slice("self", &http, &web_0),
        ServiceManifest::new("local", LOCAL)
            .service_type(ServiceType::LoadBalancer)
            .port(ServicePort::tcp("http", 80, 8080).node_port(LOCAL_NODE_PORT))
            .external_traffic_policy(TrafficPolicy::Local)
            .ingress_ip(LOCAL_INGRESS)
            .yaml(),
        slice("local", &http, &web_1),
        ServiceManifest::new("inner", INNER)
            .port(ServicePort::tcp("http", 80, 8080))
            .internal_traffic_policy(TrafficPolicy::Local)
            .yaml(),
        slice("inner", &http, &web_1),
        ServiceManifest::new("ranged", RANGED)
            .service_type(ServiceType::LoadBalancer)
            .port(ServicePort::tcp("http", 80, 8080).node_port(30_082))
            .ingress_ip(RANGED_INGRESS)
            .source_range(&format!("{}/32", cluster.node_ip(0)))
            .yaml(),
        slice("ranged", &http, &both),
    ])
}

fn web_yaml(endpoints: &[Endpoint]) -> String {
    documents([
        ServiceManifest::new("web", WEB)
            .service_type(ServiceType::LoadBalancer)
            .port(ServicePort::tcp("http", 80, 8080).node_port(NODE_PORT))
            .port(ServicePort::udp("echo", 80, 8080).node_port(NODE_PORT))
            .ingress_ip(LB_INGRESS)
            .external_ip(EXTERNAL_IP)
            .yaml(),
        slice(
            "web",
            &[("http", Protocol::Tcp), ("echo", Protocol::Udp)],
            endpoints,
        ),
    ])
}

/// Asserts that `outcome` is an answer of one of `web`'s backends as seen through `frontend`;
/// the backend's name.
#[track_caller]
fn assert_served(outcome: &Outcome, frontend: SocketAddrV4, what: &str) -> String {
    let Ok(answer) = &outcome.result else {
        panic!("{what}: {frontend} not served: {outcome:?}");
    };
    assert_eq!(
        answer.peer, frontend,
        "{what}: the application sees the frontend"
    );
    assert!(
        BACKENDS.contains(&answer.name.as_str()),
        "{what}: answered by {answer:?}"
    );
    answer.name.clone()
}

/// TCP and UDP to the ClusterIP, TCP to both nodes' NodePorts, the ingress IP and the
/// externalIP, from `client`: each is answered by a backend and shows the frontend as its peer.
/// Returns the backends the ClusterIP's TCP connections reached.
fn assert_every_frontend_served(bed: &Bed, client: &mut SockClient, who: &str) -> BTreeSet<String> {
    let cluster_ip = sock(WEB, 80);
    let names: BTreeSet<String> = (0..20)
        .map(|_| assert_served(&client.tcp(cluster_ip).unwrap(), cluster_ip, who))
        .collect();
    for _ in 0..6 {
        let outcome = client.udp(cluster_ip).unwrap();
        assert_served(&outcome, cluster_ip, &format!("{who}: UDP recvfrom()"));
    }
    let node_port = sock(bed.cluster.node_ip(0), NODE_PORT);
    for _ in 0..3 {
        let outcome = client.udp(node_port).unwrap();
        assert_served(
            &outcome,
            node_port,
            &format!("{who}: UDP to node-0's NodePort"),
        );
    }
    for (what, frontend) in [
        ("node-0's NodePort", node_port),
        ("the LoadBalancer ingress IP", sock(LB_INGRESS, 80)),
        ("the externalIP", sock(EXTERNAL_IP, 80)),
    ] {
        for _ in 0..4 {
            let outcome = client.tcp(frontend).unwrap();
            assert_served(&outcome, frontend, &format!("{who} to {what}"));
        }
    }
    // Another node's NodePort is that node's to serve: the connection crosses the LAN to
    // node-1's address, and node-1's packet path balances it.
    let node_1 = bed.cluster.node_ip(1);
    let before = bed.counted(1, &[node_1]);
    for _ in 0..4 {
        let frontend = sock(node_1, NODE_PORT);
        let outcome = client.tcp(frontend).unwrap();
        assert_served(&outcome, frontend, &format!("{who} to node-1's NodePort"));
    }
    let after = bed.counted(1, &[node_1]);
    assert!(
        after.packets > before.packets,
        "{who}: node-1's packet path served its NodePort: {before:?} -> {after:?}"
    );
    names
}

/// Asserts that node-0's packet path translated nothing for `web`'s frontends between `before`
/// and now, and that its hooks did at least `hooked` translations.
#[track_caller]
fn assert_hooks_did_it(bed: &Bed, before: Counted, hooked: u64, who: &str) {
    let after = bed.counted(0, &bed.web_addrs(0));
    assert_eq!(
        after.packets,
        before.packets,
        "{who}: node-0's packet path translated none of it; logs:\n{}",
        bed.logs()
    );
    assert!(
        after.hooked >= before.hooked + hooked,
        "{who}: node-0's hooks counted {} translations, {hooked} expected at least",
        after.hooked - before.hooked
    );
}

#[test]
fn node_processes_reach_cluster_ips_node_ports_and_load_balancer_ips_through_the_hooks() {
    let Some(bed) = Bed::new(SocketLb::On) else {
        return;
    };
    let before = bed.counted(0, &bed.web_addrs(0));
    let mut client = bed.node_client(0);
    let names = assert_every_frontend_served(&bed, &mut client, "node-0");
    assert_eq!(
        names,
        BACKENDS.map(str::to_owned).into(),
        "sockets spread over both backends"
    );
    assert_hooks_did_it(&bed, before, HOOKED, "node-0");

    // Each agent's hooks are on its own node's cgroup, no other.
    for i in 0..2 {
        let cgroup = bed.cluster.cgroups(i).expect("cgroups").node.path();
        let id = std::fs::metadata(cgroup).expect("the node's cgroup").ino();
        let links = socket_lb::links(bed.agents.bpffs_dir(i)).expect("node's hooks");
        assert!(!links.is_empty(), "node-{i} has hooks");
        for (hook, info) in links {
            assert_eq!(
                info.cgroup_id, id,
                "node-{i}'s {hook:?} is on its own cgroup"
            );
        }
    }
    // The hooks serve node-0's cgroup alone: a thread of this test (in the test's own cgroup) in
    // node-0's namespace is not translated, and the node has no route to a ClusterIP.
    let err = bed
        .cluster
        .node(0)
        .ns
        .enter(|| std::net::TcpStream::connect_timeout(&sock(WEB, 80).into(), AT_ONCE))
        .unwrap()
        .expect_err("a ClusterIP is unreachable outside the node's cgroup");
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");
}

#[test]
fn pod_processes_are_served_by_the_hooks_and_the_packet_path_counts_nothing() {
    let Some(bed) = Bed::new(SocketLb::On) else {
        return;
    };
    let before = bed.counted(0, &bed.web_addrs(0));
    let mut client = bed.pod_client("client-0");
    let names = assert_every_frontend_served(&bed, &mut client, "client-0");
    assert_eq!(names, BACKENDS.map(str::to_owned).into());
    // No NAT anywhere: the backends see the pod's own address.
    let own = bed.cluster.pod("client-0").ip;
    for _ in 0..6 {
        let answer = client.tcp(sock(WEB, 80)).unwrap();
        assert_eq!(*answer.answer().seen.ip(), own, "{answer:?}");
    }
    assert_hooks_did_it(&bed, before, HOOKED, "client-0");

    // A pod balanced to itself connects to itself: no hairpin NAT, its own address seen.
    let mut web_0 = bed.pod_client("web-0");
    for _ in 0..3 {
        let outcome = web_0.tcp(sock(SELF, 80)).unwrap();
        let answer = assert_served(&outcome, sock(SELF, 80), "web-0 to itself");
        assert_eq!(answer, "web-0");
        assert_eq!(*outcome.answer().seen.ip(), bed.web[0], "{outcome:?}");
    }
}

#[test]
fn a_service_without_endpoints_refuses_tcp_and_udp_at_once() {
    let Some(bed) = Bed::new(SocketLb::On) else {
        return;
    };
    for (who, mut client) in [
        ("node-0", bed.node_client(0)),
        ("client-0", bed.pod_client("client-0")),
    ] {
        let empty = sock(EMPTY, 80);
        for (proto, outcome) in [
            ("TCP connect()", client.tcp(empty).unwrap()),
            ("UDP sendto()", client.udp(empty).unwrap()),
            // A port the ClusterIP does not serve.
            ("TCP connect()", client.tcp(sock(WEB, 81)).unwrap()),
        ] {
            let failure = outcome.result.as_ref().expect_err(proto);
            assert_eq!(
                (failure.step.as_str(), failure.errno),
                (
                    if proto.starts_with("TCP") {
                        "connect"
                    } else {
                        "send"
                    },
                    libc::ECONNREFUSED
                ),
                "{who}: {proto} to {empty}: {outcome:?}"
            );
            assert!(
                outcome.elapsed < AT_ONCE,
                "{who}: {proto} refused at once: {outcome:?}"
            );
        }
    }
}

#[test]
fn client_ip_affinity_holds_for_node_and_pod_processes() {
    let Some(bed) = Bed::new(SocketLb::On) else {
        return;
    };
    let sticky = sock(STICKY, 80);
    for (who, mut client) in [
        ("node-0", bed.node_client(0)),
        ("client-0", bed.pod_client("client-0")),
        ("node-1", bed.node_client(1)),
    ] {
        let names: BTreeSet<String> = (0..20)
            .map(|_| assert_served(&client.tcp(sticky).unwrap(), sticky, who))
            .collect();
        assert_eq!(
            names.len(),
            1,
            "{who}: every connection reached the same backend: {names:?}"
        );
    }
}

#[test]
fn host_only_translates_node_processes_and_leaves_pods_to_the_packet_path() {
    let Some(bed) = Bed::new(SocketLb::HostOnly) else {
        return;
    };
    let cluster_ip = sock(WEB, 80);
    let counted = || bed.counted(0, &[WEB]);
    let before = counted();
    let mut node = bed.node_client(0);
    for _ in 0..10 {
        assert_served(&node.tcp(cluster_ip).unwrap(), cluster_ip, "node-0");
    }
    let after_node = counted();
    assert_eq!(
        (after_node.packets, after_node.hooked),
        (before.packets, before.hooked + 10),
        "node-0's own flows went through the hooks"
    );

    // The pod's flows are NATed per packet: the counters move (and the pod still sees the
    // ClusterIP, now because reverse NAT rewrote the replies).
    let mut pod = bed.pod_client("client-0");
    for _ in 0..10 {
        assert_served(&pod.tcp(cluster_ip).unwrap(), cluster_ip, "client-0");
    }
    let after = counted();
    assert!(
        after.packets >= after_node.packets + 10 * 3 && after.hooked == after_node.hooked,
        "client-0's flows went through the packet path, not the hooks: {after_node:?} -> {after:?}"
    );
}

#[test]
fn an_agent_restart_under_load_fails_no_connect() {
    let Some(mut bed) = Bed::new(SocketLb::On) else {
        return;
    };
    let mut client = bed.node_client(0);
    client.start_load(sock(WEB, 80)).unwrap();
    // Enough connects before, while the agent is down, and after, whatever the machine's speed
    // (the VM's emulated CPUs are many times slower).
    let count = client.wait_for_load(&LoadCount::default(), 100).unwrap();
    let status = bed.agents.stop_node(0).expect("stop node-0's agent");
    assert!(status.success(), "{status}");
    // Stopped, the agent leaves its hooks pinned and serving.
    let count = client.wait_for_load(&count, 100).unwrap();
    bed.agents
        .start_node(0)
        .expect("start node-0's agent again");
    client.wait_for_load(&count, 100).unwrap();
    let count = client.finish_load().unwrap();
    eprintln!("connects during the restart: {count:?}");
    assert_eq!(
        count.failed,
        0,
        "{} connects succeeded; failures: {:#?}; logs:\n{}",
        count.ok,
        count.failures,
        bed.logs()
    );
    assert!(count.ok >= 300, "hundreds of connects: {count:?}");
}

#[test]
fn a_connected_udp_socket_whose_backend_goes_is_not_left_blackholed() {
    let Some(bed) = Bed::new(SocketLb::On) else {
        return;
    };
    let cluster_ip = sock(WEB, 80);
    let mut client = bed.node_client(0);
    let (id, peer) = client
        .udp_connect(cluster_ip)
        .unwrap()
        .expect("connect() to the ClusterIP");
    assert_eq!(peer, cluster_ip, "getpeername() shows the ClusterIP");
    let first = assert_served(&client.udp_ask(id).unwrap(), cluster_ip, "connected UDP");
    let gone = BACKENDS.iter().position(|b| *b == first).unwrap();
    let kept = 1 - gone;
    let endpoint = Endpoint::ready(bed.web[kept], bed.cluster.node_name(kept));
    bed.source
        .write("web.yaml", &web_yaml(&[endpoint]))
        .unwrap();
    // New sockets reach the kept backend alone once node-0's agent has the change. 30 of them:
    // 6 would all reach it by chance (one time in 64) before the change, and the connected
    // socket below would still be on the backend that is leaving.
    bed.wait_until("the endpoint change reached node-0", || {
        let mut probe = bed.node_client(0);
        (0..30).all(|_| {
            probe
                .tcp(cluster_ip)
                .is_ok_and(|o| o.result.is_ok_and(|a| a.name == BACKENDS[kept]))
        })
    });
    // The connected socket: closed by the agent (an error on its next send or receive) or moved
    // to the kept backend, never still talking to the one that left nor silent.
    let outcome = client.udp_ask(id).unwrap();
    match &outcome.result {
        Ok(answer) => assert_eq!(
            answer.name, BACKENDS[kept],
            "the socket was moved, not left on {first}: {outcome:?}"
        ),
        Err(failure) => assert_ne!(
            failure.errno,
            libc::EAGAIN,
            "the socket is blackholed (no answer, no error); logs:\n{}",
            bed.logs()
        ),
    }
    eprintln!("connected UDP socket after its backend left: {outcome:?}");
}

/// Traffic policies and source ranges as kube-proxy applies them to traffic from inside:
/// externalTrafficPolicy Local does not restrict the node's and its pods' own connections (every
/// endpoint serves them); internalTrafficPolicy Local does, and with no endpoint on the node the
/// connection is refused at once; loadBalancerSourceRanges are checked against the node's
/// address.
#[test]
fn traffic_policies_and_source_ranges_apply_to_the_nodes_sockets_as_kube_proxy_applies_them() {
    let Some(bed) = Bed::new(SocketLb::On) else {
        return;
    };
    let node_0 = bed.cluster.node_ip(0);
    for (who, mut client) in [
        ("node-0", bed.node_client(0)),
        ("client-0", bed.pod_client("client-0")),
    ] {
        for frontend in [sock(node_0, LOCAL_NODE_PORT), sock(LOCAL_INGRESS, 80)] {
            let outcome = client.tcp(frontend).unwrap();
            let name = assert_served(&outcome, frontend, &format!("{who}, eTP Local"));
            assert_eq!(name, "web-1", "{who}: {frontend}'s only endpoint");
        }
        let outcome = client.tcp(sock(INNER, 80)).unwrap();
        assert_eq!(
            outcome.errno(),
            Some(libc::ECONNREFUSED),
            "{who}: iTP Local without an endpoint on node-0: {outcome:?}"
        );
        assert!(outcome.elapsed < AT_ONCE, "{who}: at once: {outcome:?}");
    }
    let mut node_1 = bed.node_client(1);
    let outcome = node_1.tcp(sock(INNER, 80)).unwrap();
    assert_eq!(
        assert_served(&outcome, sock(INNER, 80), "node-1, iTP Local"),
        "web-1"
    );

    // node-0's address is in the ranges, node-1's is not.
    let ranged = sock(RANGED_INGRESS, 80);
    let mut node_0_client = bed.node_client(0);
    for _ in 0..3 {
        assert_served(
            &node_0_client.tcp(ranged).unwrap(),
            ranged,
            "node-0, in range",
        );
    }
    let outcome = node_1.tcp(ranged).unwrap();
    assert_eq!(
        outcome.errno(),
        Some(libc::ECONNREFUSED),
        "node-1 is outside the ranges: {outcome:?}"
    );
    assert!(outcome.elapsed < AT_ONCE, "refused at once: {outcome:?}");
}

#[test]
fn connections_keep_working_when_socket_level_balancing_is_turned_off_and_on() {
    let Some(mut bed) = Bed::new(SocketLb::On) else {
        return;
    };
    let mut client = bed.pod_client("client-0");
    let frontend = sock(WEB, 80);
    let open = |client: &mut SockClient| {
        let (id, peer) = client
            .tcp_open(frontend)
            .unwrap()
            .unwrap_or_else(|errno| panic!("connect to {frontend}: errno {errno}"));
        assert_eq!(peer, frontend, "getpeername() shows the ClusterIP");
        id
    };
    let answered = |client: &mut SockClient, id: usize, what: &str| {
        let outcome = client.tcp_ask(id).unwrap();
        let answer = outcome
            .result
            .as_ref()
            .unwrap_or_else(|f| panic!("{what}: {f:?}"));
        assert!(
            BACKENDS.contains(&answer.name.as_str()),
            "{what}: {answer:?}"
        );
    };
    let restart = |bed: &mut Bed, mode: Option<SocketLb>| {
        assert!(bed.agents.stop_node(0).unwrap().success());
        bed.agents.set_socket_lb(0, mode).unwrap();
        bed.agents.start_node(0).expect("node-0's agent again");
    };

    // Connected by the hooks, then the hooks go (an agent restarted with --socket-lb off).
    let before = bed.counted(0, &[WEB]);
    let by_hooks = open(&mut client);
    assert_eq!(bed.counted(0, &[WEB]).hooked, before.hooked + 1);
    restart(&mut bed, None);
    assert!(
        socket_lb::links(bed.agents.bpffs_dir(0))
            .unwrap()
            .is_empty(),
        "off detached the hooks"
    );
    answered(
        &mut client,
        by_hooks,
        "a connection the hooks made, after they left",
    );

    // Connected by the packet path (DNAT per packet), then the hooks come back.
    let before = bed.counted(0, &[WEB]);
    let by_packets = open(&mut client);
    let after = bed.counted(0, &[WEB]);
    assert!(
        after.hooked == before.hooked && after.packets > before.packets,
        "the packet path made it: {before:?} -> {after:?}"
    );
    restart(&mut bed, Some(SocketLb::On));
    answered(
        &mut client,
        by_packets,
        "a NATed connection, after the hooks came",
    );
    let before = bed.counted(0, &[WEB]);
    let again = open(&mut client);
    assert_eq!(
        bed.counted(0, &[WEB]).hooked,
        before.hooked + 1,
        "the hooks serve anew"
    );
    answered(&mut client, again, "a new connection");
}
