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
    time::{Duration, Instant},
};

use lb_testbed::{
    Agents, Cluster, SourceDir, Wiring,
    manifests::{
        Endpoint, EndpointSliceManifest, Protocol, ServiceManifest, ServicePort, ServiceType,
        TrafficPolicy, documents,
    },
    server::{self, Held},
};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a dropped connection attempt is given before it counts as dropped.
const DROPPED: Duration = Duration::from_millis(800);

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
/// `bulk`: served by `web-1` alone (node-1), so that each way in reaches a backend known to be
/// local or remote: its NodePort through node-1 (local) and node-0 (remote, source-NATed), a
/// LoadBalancer IP routed to each node, an externalIP routed to node-0.
const BULK: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
const BULK_NODE_PORT: u16 = 30_085;
const BULK_LB_REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
const BULK_LB_LOCAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 31);
const BULK_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 32);
/// Bytes each bulk transfer moves, each way.
const BULK_BYTES: u64 = 16 << 20;
const LB_INGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// A second address of the external client, outside the LoadBalancer's source ranges.
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
const HEALTH_CHECK_PORT: u16 = 32_001;

/// The bed: two nodes, a hostnames pod on each (`web-0`, `web-1`, port 8080), a client pod on
/// each (`client-0`, `client-1`), the services below, and an agent per node.
struct Bed {
    // Dropped first: the agents stop before the namespaces go.
    agents: Agents,
    source: SourceDir,
    cluster: Cluster,
    web: [Ipv4Addr; 2],
}

/// `web`: NodePort 30080 over TCP and UDP, served by `endpoints`.
fn web_yaml(endpoints: &[Endpoint]) -> String {
    documents([
        ServiceManifest::new("web", WEB)
            .service_type(ServiceType::NodePort)
            .port(ServicePort::tcp("http", 80, 8080).node_port(30_080))
            .port(ServicePort::udp("echo", 80, 8080).node_port(30_080))
            .yaml(),
        slice(
            "web",
            &[("http", Protocol::Tcp), ("echo", Protocol::Udp)],
            endpoints,
        ),
    ])
}

/// `local`: a LoadBalancer with externalTrafficPolicy Local (NodePort 30081, health checks on
/// `HEALTH_CHECK_PORT`), served by `endpoint`.
fn local_yaml(endpoint: Endpoint) -> String {
    documents([
        ServiceManifest::new("local", LOCAL)
            .service_type(ServiceType::LoadBalancer)
            .port(ServicePort::tcp("http", 80, 8080).node_port(30_081))
            .external_traffic_policy(TrafficPolicy::Local)
            .health_check_node_port(HEALTH_CHECK_PORT)
            .yaml(),
        slice("local", &[("http", Protocol::Tcp)], &[endpoint]),
    ])
}

fn slice(service: &str, ports: &[(&str, Protocol)], endpoints: &[Endpoint]) -> String {
    let mut slice = EndpointSliceManifest::new(service);
    for (name, protocol) in ports {
        slice = slice.port(name, 8080, *protocol);
    }
    for endpoint in endpoints {
        slice = slice.endpoint(endpoint.clone());
    }
    slice.yaml()
}

/// Runs `test` on a fresh bed of each wiring, with `agent_args` on every agent.
fn on_each_wiring(agent_args: &[&str], test: impl Fn(&Bed)) {
    for wiring in [Wiring::NicLike, Wiring::VethDefaults] {
        let Some(bed) = Bed::new(wiring, agent_args) else {
            return;
        };
        eprintln!("--- wiring {wiring:?}");
        test(&bed);
    }
}

impl Bed {
    /// The bed, wired as `wiring` says, with `agent_args` on every agent.
    fn new(wiring: Wiring, agent_args: &[&str]) -> Option<Self> {
        if !common::require_privileges() {
            return None;
        }
        let mut cluster = Cluster::wired(2, wiring).expect("cluster");
        let web = [
            cluster.add_hostnames_pod(0, "web-0", 8080).unwrap(),
            cluster.add_hostnames_pod(1, "web-1", 8080).unwrap(),
        ];
        cluster.add_pod(0, "client-0").unwrap();
        cluster.add_pod(1, "client-1").unwrap();
        cluster
            .client_route(&format!("{LB_INGRESS}/32"), 0)
            .unwrap();
        cluster
            .client_route(&format!("{EXTERNAL_IP}/32"), 1)
            .unwrap();
        // The service range routed to a node, as a router or BGP would: `web`'s ClusterIP.
        cluster.client_route(&format!("{WEB}/32"), 0).unwrap();
        for (ip, node) in [
            (BULK_LB_REMOTE, 0),
            (BULK_LB_LOCAL, 1),
            (BULK_EXTERNAL_IP, 0),
        ] {
            cluster.client_route(&format!("{ip}/32"), node).unwrap();
        }
        cluster.add_client_ip(OUTSIDER).unwrap();

        let on = |i: usize| Endpoint::ready(web[i], cluster.node_name(i));
        let http = [("http", Protocol::Tcp)];
        let source = SourceDir::new().unwrap();
        for (file, yaml) in [
            ("nodes.yaml", cluster.node_manifests()),
            ("web.yaml", web_yaml(&[on(0), on(1)])),
            ("local.yaml", local_yaml(on(1))),
            (
                "lb.yaml",
                documents([
                    ServiceManifest::new("lb", LB)
                        .service_type(ServiceType::LoadBalancer)
                        .port(ServicePort::tcp("http", 80, 8080).node_port(30_082))
                        .ingress_ip(LB_INGRESS)
                        .external_ip(EXTERNAL_IP)
                        .source_range(&format!("{}/32", cluster.client_ip()))
                        .yaml(),
                    slice("lb", &http, &[on(0), on(1)]),
                ]),
            ),
            (
                "empty.yaml",
                ServiceManifest::new("empty", EMPTY)
                    .service_type(ServiceType::NodePort)
                    .port(ServicePort::tcp("http", 80, 8080).node_port(30_083))
                    .port(ServicePort::udp("echo", 80, 8080).node_port(30_083))
                    .yaml(),
            ),
            (
                "self.yaml",
                documents([
                    ServiceManifest::new("self", SELF)
                        .service_type(ServiceType::NodePort)
                        .port(ServicePort::tcp("http", 80, 8080).node_port(30_084))
                        .yaml(),
                    slice("self", &http, &[on(0)]),
                ]),
            ),
            (
                "bulk.yaml",
                documents([
                    ServiceManifest::new("bulk", BULK)
                        .service_type(ServiceType::LoadBalancer)
                        .port(ServicePort::tcp("http", 80, 8080).node_port(BULK_NODE_PORT))
                        .ingress_ip(BULK_LB_REMOTE)
                        .ingress_ip(BULK_LB_LOCAL)
                        .external_ip(BULK_EXTERNAL_IP)
                        .yaml(),
                    slice("bulk", &http, &[on(1)]),
                ]),
            ),
        ] {
            source.write(file, &yaml).unwrap();
        }
        let agent_args: Vec<String> = agent_args.iter().map(|a| (*a).to_owned()).collect();
        let agents =
            Agents::start(&cluster, AGENT.as_ref(), source.path(), &agent_args).expect("agents");
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

    /// The endpoint of `web-<i>` on its node.
    fn endpoint(&self, i: usize) -> Endpoint {
        Endpoint::ready(self.web[i], self.cluster.node_name(i))
    }

    /// `n` HTTP requests over new connections from the external client (from `local`, or its
    /// first address); the (backend name, client address it saw) of each answer.
    fn ask_from_outside(
        &self,
        addr: SocketAddrV4,
        n: usize,
        local: Option<Ipv4Addr>,
    ) -> Vec<(String, Ipv4Addr)> {
        self.cluster
            .client()
            .enter(move || {
                (0..n)
                    .map(|_| match local {
                        Some(local) => server::http_get_from(local, addr, TIMEOUT),
                        None => server::http_get(addr, TIMEOUT),
                    })
                    .map(|answer| parse(&answer.expect("answer")))
                    .collect()
            })
            .unwrap()
    }

    /// `n` HTTP requests over new connections from pod `pod`.
    fn ask_from_pod(&self, pod: &str, addr: SocketAddrV4, n: usize) -> Vec<(String, Ipv4Addr)> {
        self.cluster
            .pod(pod)
            .ns
            .enter(move || {
                (0..n)
                    .map(|_| parse(&server::http_get(addr, TIMEOUT).expect("answer")))
                    .collect()
            })
            .unwrap()
    }

    /// How a TCP connection attempt from the external client (from `local`) ends.
    fn connect_outcome(&self, addr: SocketAddrV4, local: Option<Ipv4Addr>) -> Outcome {
        self.cluster
            .client()
            .enter(move || {
                let started = Instant::now();
                let result = match local {
                    Some(local) => server::connect_from(local, addr, DROPPED).map(drop),
                    None => std::net::TcpStream::connect_timeout(&addr.into(), DROPPED)
                        .map(drop)
                        .map_err(anyhow::Error::from),
                };
                outcome(result, started)
            })
            .unwrap()
    }

    /// The health check answer of node `node` (status, body), asked from the external client.
    fn health_check(&self, node: usize) -> (u16, String) {
        let addr = SocketAddrV4::new(self.cluster.node_ip(node), HEALTH_CHECK_PORT);
        self.cluster
            .client()
            .enter(move || server::http_request(addr, "/healthz", TIMEOUT))
            .unwrap()
            .expect("health check answer")
    }

    fn wait_until(&self, what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            check(),
            "{what}: not within 5 s; agent logs:\n{}",
            self.logs()
        );
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Connected,
    /// Refused at once (a reset, or ICMP port unreachable).
    Refused,
    /// Nothing came back.
    Dropped,
}

fn outcome(result: anyhow::Result<()>, started: Instant) -> Outcome {
    match result {
        Ok(()) => Outcome::Connected,
        Err(e) => {
            let io = e.root_cause().downcast_ref::<std::io::Error>();
            // A non-blocking connect that timed out reports "still in progress".
            if io.and_then(std::io::Error::raw_os_error) == Some(libc::EINPROGRESS) {
                return Outcome::Dropped;
            }
            match io.map(std::io::Error::kind) {
                Some(ErrorKind::ConnectionRefused) => {
                    assert!(
                        started.elapsed() < DROPPED,
                        "refused, but only after {:?}",
                        started.elapsed()
                    );
                    Outcome::Refused
                }
                Some(ErrorKind::TimedOut | ErrorKind::WouldBlock) => Outcome::Dropped,
                _ => panic!("unexpected connection error: {e:#}"),
            }
        }
    }
}

/// A hostnames answer: "<name> <client addr:port>".
fn parse(answer: &str) -> (String, Ipv4Addr) {
    let mut words = answer.split_whitespace();
    let name = words.next().unwrap_or_default().to_owned();
    let client: SocketAddrV4 = words
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no client address in {answer:?}"));
    (name, *client.ip())
}

fn names(answers: &[(String, Ipv4Addr)]) -> BTreeSet<&str> {
    answers.iter().map(|(n, _)| n.as_str()).collect()
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

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
        // A pod balanced to itself keeps the hairpin address.
        let hairpin = Ipv4Addr::from(lb_common::maps::hairpin::DEFAULT_ADDR);
        let answers = bed.ask_from_pod("web-0", sock(SELF, 80), 3);
        assert!(answers.iter().all(|(_, c)| *c == hairpin), "{answers:?}");
    });
}

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
/// translation, source NAT and forwarding end to end, small and bulk.
#[test]
fn node_ports_work_through_native_xdp() {
    let Some(bed) = Bed::new(Wiring::NicLike, &["--xdp-mode", "native"]) else {
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
            "TCP via node-{node}"
        );
    }
    bulk_transfers(&bed);
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
