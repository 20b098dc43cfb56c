//! The bed of the end-to-end tests of traffic from outside the cluster (`e2e_external`,
//! `e2e_client_addresses`): a two-node cluster in network namespaces (a LAN, nodes with uplinks
//! and pods, an external client), the real `lb-agent` on every node with a YAML source, and the
//! services below; helpers that connect through it with real sockets and tell what happened.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_testbed::{
    Agents, Cluster, SourceDir, Wiring,
    manifests::{
        Endpoint, EndpointSliceManifest, Protocol, ServiceManifest, ServicePort, ServiceType,
        TrafficPolicy, documents,
    },
    server,
};

pub const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// How long a dropped connection attempt is given before it counts as dropped.
pub const DROPPED: Duration = Duration::from_millis(800);
pub const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
pub const LB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
pub const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
pub const SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
/// `bulk`: served by `web-1` alone (node-1), so that each way in reaches a backend known to be
/// local or remote: its NodePort through node-1 (local) and node-0 (remote, source-NATed), a
/// LoadBalancer IP routed to each node, an externalIP routed to node-0.
pub const BULK: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
pub const BULK_NODE_PORT: u16 = 30_085;
pub const BULK_LB_REMOTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
pub const BULK_LB_LOCAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 31);
pub const BULK_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 32);
/// Bytes each bulk transfer moves, each way.
pub const BULK_BYTES: u64 = 16 << 20;
pub const LB_INGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// A second address of the external client, outside the LoadBalancer's source ranges.
pub const OUTSIDER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
pub const HEALTH_CHECK_PORT: u16 = 32_001;

/// The bed: two nodes, a hostnames pod on each (`web-0`, `web-1`, port 8080), a client pod on
/// each (`client-0`, `client-1`), the services below, and an agent per node.
pub struct Bed {
    // Dropped first: the agents stop before the namespaces go.
    pub agents: Agents,
    pub source: SourceDir,
    pub cluster: Cluster,
    pub web: [Ipv4Addr; 2],
    /// The IPv6 addresses of `web-0` and `web-1` (the bed is dual-stack).
    pub web6: [Ipv6Addr; 2],
}

/// `web`: NodePort 30080 over TCP and UDP, served by `endpoints`.
pub fn web_yaml(endpoints: &[Endpoint]) -> String {
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
pub fn local_yaml(endpoint: Endpoint) -> String {
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

pub fn slice(service: &str, ports: &[(&str, Protocol)], endpoints: &[Endpoint]) -> String {
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
pub fn on_each_wiring(agent_args: &[&str], test: impl Fn(&Bed)) {
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
    pub fn new(wiring: Wiring, agent_args: &[&str]) -> Option<Self> {
        if !super::require_privileges() {
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
        let web6 = [0, 1].map(|i| cluster.pod(&format!("web-{i}")).ip6);
        Some(Self {
            agents,
            source,
            cluster,
            web,
            web6,
        })
    }

    pub fn logs(&self) -> String {
        (0..2)
            .map(|i| format!("--- node-{i}:\n{}", self.agents.log(i)))
            .collect()
    }

    /// The endpoint of `web-<i>` on its node.
    pub fn endpoint(&self, i: usize) -> Endpoint {
        Endpoint::ready(self.web[i], self.cluster.node_name(i))
    }

    /// `n` HTTP requests over new connections from the external client (from `local`, or its
    /// first address); the (backend name, client address it saw) of each answer.
    pub fn ask_from_outside(
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
    pub fn ask_from_pod(&self, pod: &str, addr: SocketAddrV4, n: usize) -> Vec<(String, Ipv4Addr)> {
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
    pub fn connect_outcome(&self, addr: SocketAddrV4, local: Option<Ipv4Addr>) -> Outcome {
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
    pub fn health_check(&self, node: usize) -> (u16, String) {
        let addr = SocketAddrV4::new(self.cluster.node_ip(node), HEALTH_CHECK_PORT);
        self.cluster
            .client()
            .enter(move || server::http_request(addr, "/healthz", TIMEOUT))
            .unwrap()
            .expect("health check answer")
    }

    /// The health check answer node `node` gives on its own `addr`, asked from the node itself
    /// (`None`: nothing listens there).
    pub fn health_check_on_node(&self, node: usize, addr: Ipv4Addr) -> Option<(u16, String)> {
        let addr = SocketAddrV4::new(addr, HEALTH_CHECK_PORT);
        self.cluster
            .node(node)
            .ns
            .enter(move || server::http_request(addr, "/healthz", TIMEOUT).ok())
            .unwrap()
    }

    /// Polls `check` for up to 5 s (see [`super::wait_until`]).
    pub fn wait_until(&self, what: &str, check: impl Fn() -> bool) {
        super::wait_until(what, check, || self.logs());
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    /// Refused at once (a reset, or ICMP port unreachable).
    Refused,
    /// Nothing came back.
    Dropped,
}

pub fn outcome(result: anyhow::Result<()>, started: Instant) -> Outcome {
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
pub fn parse(answer: &str) -> (String, Ipv4Addr) {
    let mut words = answer.split_whitespace();
    let name = words.next().unwrap_or_default().to_owned();
    let client: SocketAddrV4 = words
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no client address in {answer:?}"));
    (name, *client.ip())
}

pub fn names(answers: &[(String, Ipv4Addr)]) -> BTreeSet<&str> {
    answers.iter().map(|(n, _)| n.as_str()).collect()
}

pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}
