//! IPv6 ClusterIPs end to end (issue 16, docs/ipv6.md): the real agents on the dual-stack
//! two-node bed, reading an IPv6 Service (`ipFamilies: [IPv6]`, SingleStack) and a dual-stack
//! one (`[IPv4, IPv6]`, RequireDualStack) with an EndpointSlice per family, reached from pods
//! on both nodes through real sockets: TCP and UDP answered by backends on both nodes, each
//! seeing the client pod's own address, the client seeing the ClusterIP as its peer
//! (`getpeername()`, `recvfrom()`). Every test first checks the bed itself: the client pods
//! reach every backend's own IPv6 address directly, through the attached datapath. Both
//! wirings (NIC-like frames, veths with kind's defaults). Needs root.

mod common;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use lb_testbed::{
    Agents, Cluster, SourceDir, Wiring,
    manifests::{
        Endpoint, EndpointSliceManifest, IpFamily, Protocol, ServiceManifest, ServicePort,
        documents,
    },
    server,
};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const TIMEOUT: Duration = Duration::from_secs(3);
/// `web6`: IPv6 only, TCP 80 and UDP 53, served by every backend.
const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x41);
/// `both`: dual-stack, TCP 80 and UDP 53 in each family, served by every backend.
const BOTH4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 42);
const BOTH6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x42);
/// Where the backends' `hostnames` servers listen, over TCP and UDP, in both families.
const TARGET_PORT: u16 = 8080;
/// The backends and the node each runs on: two on node-0, one on node-1.
const BACKENDS: [(&str, usize); 3] = [("web-0", 0), ("web-1", 1), ("web-2", 0)];
/// The client pods, one per node.
const CLIENTS: [&str; 2] = ["client-0", "client-1"];
/// Connections (and datagrams) per check: with three backends equally weighted, one of them
/// is left out by chance about once in four million runs.
const ROUNDS: usize = 40;

/// What one request came back with.
#[derive(Debug)]
struct Answer {
    /// The backend that answered.
    backend: String,
    /// The client address the backend saw.
    seen: SocketAddr,
    /// What the client's socket saw as its peer: `getpeername()` over TCP, the source of the
    /// answer (`recvfrom()`) over UDP.
    peer: SocketAddr,
}

/// The bed: two nodes, the backends and client pods above, the Services above, and an agent per
/// node.
struct Bed {
    // Dropped first: the agents stop before the namespaces go.
    agents: Agents,
    _source: SourceDir,
    cluster: Cluster,
}

impl Bed {
    fn new(wiring: Wiring) -> Option<Self> {
        if !common::require_privileges() {
            return None;
        }
        let mut cluster = Cluster::wired(2, wiring).expect("cluster");
        for (name, node) in BACKENDS {
            cluster
                .add_hostnames_pod(node, name, TARGET_PORT)
                .expect(name);
        }
        for (node, name) in CLIENTS.iter().enumerate() {
            cluster.add_pod(node, name).expect(name);
        }
        let source = SourceDir::new().unwrap();
        for (file, yaml) in [
            ("nodes.yaml", cluster.node_manifests_dual_stack()),
            ("web6.yaml", web6_yaml(&cluster)),
            ("both.yaml", both_yaml(&cluster)),
        ] {
            source.write(file, &yaml).unwrap();
        }
        let agents = Agents::start(&cluster, AGENT.as_ref(), source.path(), &[])
            .unwrap_or_else(|e| panic!("starting the agents: {e:#}"));
        Some(Self {
            agents,
            _source: source,
            cluster,
        })
    }

    fn logs(&self) -> String {
        (0..self.cluster.node_count())
            .map(|i| format!("--- node-{i}:\n{}", self.agents.log(i)))
            .collect()
    }

    /// `n` HTTP requests over new TCP connections from pod `pod` to `addr`; panics with the
    /// agents' logs on the first failure.
    fn tcp(&self, pod: &str, addr: SocketAddr, n: usize) -> Vec<Answer> {
        let answers = self.cluster.pod(pod).ns.enter(move || {
            (0..n)
                .map(|_| {
                    let (body, peer) = server::http_get_peer(addr, TIMEOUT)?;
                    Ok(answer(&body, peer))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        });
        answers.unwrap().unwrap_or_else(|e| {
            panic!(
                "TCP from {pod} to {addr}: {e:#}\nagent logs:\n{}",
                self.logs()
            )
        })
    }

    /// `n` UDP requests from pod `pod` to `addr`, each from a new socket (a new flow); panics
    /// with the agents' logs on the first failure.
    fn udp(&self, pod: &str, addr: SocketAddr, n: usize) -> Vec<Answer> {
        let answers = self.cluster.pod(pod).ns.enter(move || {
            (0..n)
                .map(|_| {
                    let (body, from) = server::udp_request_source(addr, TIMEOUT)?;
                    Ok(answer(&body, from))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        });
        answers.unwrap().unwrap_or_else(|e| {
            panic!(
                "UDP from {pod} to {addr}: {e:#}\nagent logs:\n{}",
                self.logs()
            )
        })
    }

    /// The bed itself, with the agents' datapath attached: every client pod reaches every
    /// backend's own address of `family` directly, over TCP and UDP, unNATed. What the
    /// ClusterIP checks then find missing is the ClusterIP's, not the bed's.
    fn assert_backends_reached_directly(&self, family: IpFamily) {
        for client in CLIENTS {
            let own = self.pod_ip(client, family);
            for (backend, _) in BACKENDS {
                let to = SocketAddr::new(self.pod_ip(backend, family), TARGET_PORT);
                for answers in [self.tcp(client, to, 1), self.udp(client, to, 1)] {
                    let a = &answers[0];
                    assert_eq!(a.backend, backend, "{client} to {to} directly: {a:?}");
                    assert_eq!(a.seen.ip(), own, "{client} to {to} directly: {a:?}");
                    assert_eq!(a.peer, to, "{client} to {to} directly: {a:?}");
                }
            }
        }
    }

    /// The ClusterIP `ip` serves every client pod over TCP (port 80) and UDP (port 53): every
    /// backend answers, each sees the client pod's own address, and the client sees the
    /// ClusterIP as its peer.
    fn assert_cluster_ip_served(&self, ip: IpAddr) {
        let family = IpFamily::of(ip);
        let all: BTreeSet<&str> = BACKENDS.iter().map(|(name, _)| *name).collect();
        for client in CLIENTS {
            let own = self.pod_ip(client, family);
            let (tcp, udp) = (SocketAddr::new(ip, 80), SocketAddr::new(ip, 53));
            for (proto, frontend, answers) in [
                ("TCP", tcp, self.tcp(client, tcp, ROUNDS)),
                ("UDP", udp, self.udp(client, udp, ROUNDS)),
            ] {
                let what = format!("{proto} from {client} ({own}) to {frontend}");
                let answered: BTreeSet<&str> = answers.iter().map(|a| a.backend.as_str()).collect();
                assert_eq!(answered, all, "{what}: every backend answers");
                for a in &answers {
                    assert_eq!(a.seen.ip(), own, "{what}: the client is kept: {a:?}");
                    assert_eq!(a.peer, frontend, "{what}: answered by the ClusterIP: {a:?}");
                }
            }
        }
    }

    /// Pod `pod`'s address of `family`.
    fn pod_ip(&self, pod: &str, family: IpFamily) -> IpAddr {
        let pod = self.cluster.pod(pod);
        match family {
            IpFamily::IPv4 => pod.ip.into(),
            IpFamily::IPv6 => pod.ip6.into(),
        }
    }
}

/// A `hostnames` answer ("<name> <client addr:port>") that came back from `peer`.
fn answer(body: &str, peer: SocketAddr) -> Answer {
    let (backend, seen) = body
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("not a hostnames answer: {body:?}"));
    Answer {
        backend: backend.to_owned(),
        seen: seen
            .parse()
            .unwrap_or_else(|e| panic!("{seen:?} in {body:?}: {e}")),
        peer,
    }
}

/// The ports every Service here has: TCP 80 (`http`) and UDP 53 (`dns`), both to 8080.
fn ports(service: ServiceManifest) -> ServiceManifest {
    service
        .port(ServicePort::tcp("http", 80, TARGET_PORT))
        .port(ServicePort::udp("dns", 53, TARGET_PORT))
}

/// An EndpointSlice of `service` named `name`: every backend, ready, by its address of
/// `family`.
fn slice(cluster: &Cluster, service: &str, name: &str, family: IpFamily) -> String {
    BACKENDS
        .iter()
        .fold(
            EndpointSliceManifest::new(service)
                .name(name)
                .address_type(family)
                .port("http", TARGET_PORT, Protocol::Tcp)
                .port("dns", TARGET_PORT, Protocol::Udp),
            |slice, (backend, node)| {
                let pod = cluster.pod(backend);
                let ip: IpAddr = match family {
                    IpFamily::IPv4 => pod.ip.into(),
                    IpFamily::IPv6 => pod.ip6.into(),
                };
                slice.endpoint(Endpoint::ready(ip, cluster.node_name(*node)))
            },
        )
        .yaml()
}

/// `web6`: `ipFamilies: [IPv6]`, SingleStack, its one slice of addressType IPv6.
fn web6_yaml(cluster: &Cluster) -> String {
    documents([
        ports(ServiceManifest::new_ipv6("web6", WEB6)).yaml(),
        slice(cluster, "web6", "web6-ipv6", IpFamily::IPv6),
    ])
}

/// `both`: `ipFamilies: [IPv4, IPv6]`, RequireDualStack, a slice per family.
fn both_yaml(cluster: &Cluster) -> String {
    documents([
        ports(ServiceManifest::new("both", BOTH4).dual_stack(BOTH6)).yaml(),
        slice(cluster, "both", "both-ipv4", IpFamily::IPv4),
        slice(cluster, "both", "both-ipv6", IpFamily::IPv6),
    ])
}

/// Runs `test` on a fresh bed of each wiring.
fn on_each_wiring(test: impl Fn(&Bed)) {
    for wiring in [Wiring::NicLike, Wiring::VethDefaults] {
        let Some(bed) = Bed::new(wiring) else {
            return;
        };
        eprintln!("--- wiring {wiring:?}");
        test(&bed);
    }
}

#[test]
fn an_ipv6_cluster_ip_serves_pods_over_tcp_and_udp_with_the_client_address_kept() {
    on_each_wiring(|bed| {
        bed.assert_backends_reached_directly(IpFamily::IPv6);
        bed.assert_cluster_ip_served(WEB6.into());
    });
}

#[test]
fn a_dual_stack_service_is_served_in_both_families() {
    on_each_wiring(|bed| {
        bed.assert_backends_reached_directly(IpFamily::IPv4);
        bed.assert_backends_reached_directly(IpFamily::IPv6);
        bed.assert_cluster_ip_served(BOTH4.into());
        bed.assert_cluster_ip_served(BOTH6.into());
    });
}
