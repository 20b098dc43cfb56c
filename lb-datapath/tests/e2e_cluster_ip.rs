//! End to end on one node: pods in network namespaces behind veths, the real datapath attached
//! to the pods' veths, real TCP and UDP sockets. Needs root.

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{maps::scope, net::proto};
use lb_datapath::{
    Capacities, Datapath, Pinning,
    maps::Maps,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec, Services},
};
use lb_testbed::{
    Node,
    server::{self, Server},
};

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 42);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const TIMEOUT: Duration = Duration::from_secs(3);

struct Bed {
    node: Node,
    _servers: Vec<Server>,
    _datapath: Datapath,
    maps: Maps,
    services: Services,
}

impl Bed {
    /// Programs `svc` through the agent's planner and writer.
    fn program(&mut self, svc: &ServiceSpec) {
        self.services
            .program(&mut self.maps, svc)
            .unwrap_or_else(|e| panic!("programming service {}: {e:?}", svc.name));
    }
}

/// One node, a client pod and three `hostnames` backends on :8080, the datapath on every pod veth.
fn bed() -> Option<Bed> {
    if !common::require_privileges() {
        return None;
    }
    let mut node = Node::new("node").expect("node");
    node.add_pod("client", CLIENT_IP).expect("client pod");
    let servers = backend_ips()
        .into_iter()
        .enumerate()
        .map(|(i, ip)| {
            node.add_hostnames_pod(&format!("backend-{i}"), ip, 8080)
                .expect("backend pod")
        })
        .collect();
    let ifaces: Vec<String> = node.pods.iter().map(|p| p.host_iface.clone()).collect();
    let (datapath, maps) = node
        .ns
        .enter(move || {
            let mut dp = Datapath::load(&Pinning::None, Capacities::default()).expect("load");
            for iface in &ifaces {
                dp.attach_pod_iface(iface).expect("attach");
            }
            let maps = dp.take_maps().expect("maps");
            (dp, maps)
        })
        .expect("datapath in the node namespace");
    Some(Bed {
        node,
        _servers: servers,
        _datapath: datapath,
        maps,
        services: Services::default(),
    })
}

/// The ClusterIP service `name`, `vip:80` -> `backends` on :8080.
fn service(name: &str, vip: Ipv4Addr, l4_proto: u8, backends: &[Ipv4Addr]) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        frontends: vec![FrontendSpec {
            addr: vip,
            port: 80,
            proto: l4_proto,
            scope: scope::INTERNAL,
            kind: FrontendKind::ClusterIp,
        }],
        backends: backends
            .iter()
            .map(|addr| BackendSpec {
                addr: SocketAddrV4::new(*addr, 8080),
                local: true,
                weight: 1,
            })
            .collect(),
        ..Default::default()
    }
}

fn backend_ips() -> Vec<Ipv4Addr> {
    (0..3).map(|i| Ipv4Addr::new(10, 0, 1, 10 + i)).collect()
}

/// Splits a `hostnames` answer into (backend name, client address it saw).
fn parse(answer: &str) -> (String, SocketAddrV4) {
    let (name, peer) = answer
        .split_once(' ')
        .unwrap_or_else(|| panic!("bad answer {answer:?}"));
    (
        name.to_owned(),
        peer.parse()
            .unwrap_or_else(|_| panic!("bad peer in {answer:?}")),
    )
}

#[test]
fn a_pod_reaches_a_cluster_ip_and_every_backend_answers_over_tcp_and_udp() {
    let Some(mut bed) = bed() else { return };
    bed.program(&service("web-tcp", VIP, proto::TCP, &backend_ips()));
    bed.program(&service("web-udp", VIP, proto::UDP, &backend_ips()));
    let client = &bed.node.pod("client").ns;

    let answers = client
        .enter(|| {
            (0..60)
                .map(|_| server::http_get(SocketAddrV4::new(VIP, 80), TIMEOUT))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .expect("every TCP request answered");
    let names: BTreeSet<String> = answers.iter().map(|a| parse(a).0).collect();
    assert_eq!(
        names,
        ["backend-0", "backend-1", "backend-2"]
            .map(String::from)
            .into(),
        "TCP: {answers:?}"
    );
    assert!(
        answers.iter().all(|a| *parse(a).1.ip() == CLIENT_IP),
        "the backend sees the client pod: {answers:?}"
    );

    let answers = client
        .enter(|| {
            (0..60)
                .map(|i| server::udp_request(SocketAddrV4::new(VIP, 80), 20_000 + i, TIMEOUT))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .expect("every UDP request answered");
    let names: BTreeSet<String> = answers.iter().map(|a| parse(a).0).collect();
    assert_eq!(names.len(), 3, "UDP: {answers:?}");
    assert!(
        answers.iter().all(|a| *parse(a).1.ip() == CLIENT_IP),
        "UDP source preserved: {answers:?}"
    );
}

#[test]
fn a_cluster_ip_without_backends_refuses_at_once() {
    let Some(mut bed) = bed() else { return };
    bed.program(&service("empty-tcp", EMPTY_VIP, proto::TCP, &[]));
    bed.program(&service("empty-udp", EMPTY_VIP, proto::UDP, &[]));
    let client = &bed.node.pod("client").ns;
    let (tcp, udp, elapsed) = client
        .enter(|| {
            let start = Instant::now();
            let tcp = std::net::TcpStream::connect_timeout(
                &SocketAddrV4::new(EMPTY_VIP, 80).into(),
                TIMEOUT,
            );
            let udp = server::udp_request(SocketAddrV4::new(EMPTY_VIP, 80), 0, TIMEOUT);
            (tcp.map(|_| ()), udp, start.elapsed())
        })
        .unwrap();
    assert_eq!(
        tcp.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let udp_err = udp.unwrap_err();
    assert!(
        udp_err.chain().any(|e| e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)),
        "UDP gets port unreachable: {udp_err:?}"
    );
    assert!(
        elapsed < Duration::from_secs(1),
        "refused fast, not timed out: {elapsed:?}"
    );
}

/// SCTP end to end through real veths. This host's kernel has no sctp module (an SCTP socket
/// fails with EPROTONOSUPPORT), so the pods speak through raw IP sockets for protocol 132, which
/// need none: the client pod sends a hand-built INIT to the ClusterIP; the backend pod receives
/// it addressed to itself, its ports and CRC32c as sent; its INIT-ACK reaches the client from
/// the ClusterIP, its CRC32c still valid.
#[test]
fn a_pod_reaches_an_sctp_cluster_ip_with_only_addresses_rewritten() {
    use lb_testbed::packet::{
        raw_recv, sctp_checksum_ok, sctp_chunk_type, sctp_header, sctp_init_chunk, sctp_raw_socket,
    };
    const PORT: u16 = 36_412;
    const CLIENT_PORT: u16 = 40_000;
    let Some(mut bed) = bed() else { return };
    let backend = backend_ips()[0];
    let mut svc = service("s1ap", VIP, proto::SCTP, &[backend]);
    svc.frontends[0].port = PORT;
    svc.backends[0].addr = SocketAddrV4::new(backend, PORT);
    bed.program(&svc);

    let backend_ns = &bed.node.pod("backend-0").ns;
    let listening = backend_ns
        .enter(|| sctp_raw_socket(TIMEOUT).expect("raw SCTP socket in the backend pod"))
        .unwrap();
    let init = sctp_header(
        CLIENT_PORT,
        PORT,
        0,
        &sctp_init_chunk(sctp_chunk_type::INIT, 0x5ca1_ab1e),
    );
    let init_sent = [init, sctp_init_chunk(sctp_chunk_type::INIT, 0x5ca1_ab1e)].concat();
    let client_ns = &bed.node.pod("client").ns;
    let to_send = init_sent.clone();
    let client = client_ns
        .enter(move || {
            let socket = sctp_raw_socket(TIMEOUT).expect("raw SCTP socket in the client pod");
            socket
                .send_to(&to_send, &SocketAddrV4::new(VIP, 0).into())
                .expect("send the INIT");
            socket
        })
        .unwrap();

    let (src, dst, got) = backend_ns
        .enter(move || raw_recv(&listening))
        .unwrap()
        .expect("the backend receives the INIT");
    assert_eq!((src, dst), (CLIENT_IP, backend), "DNAT of the address only");
    assert_eq!(
        got, init_sent,
        "ports, tag, chunks and CRC32c as the client sent them"
    );
    assert!(sctp_checksum_ok(&got));

    let ack_chunk = sctp_init_chunk(sctp_chunk_type::INIT_ACK, 0x0bad_cafe);
    let init_ack = [
        sctp_header(PORT, CLIENT_PORT, 0x5ca1_ab1e, &ack_chunk),
        ack_chunk,
    ]
    .concat();
    let to_send = init_ack.clone();
    backend_ns
        .enter(move || {
            let socket = sctp_raw_socket(TIMEOUT).expect("raw socket");
            socket
                .send_to(&to_send, &SocketAddrV4::new(CLIENT_IP, 0).into())
                .expect("send the INIT-ACK");
        })
        .unwrap();
    let (src, dst, got) = client_ns
        .enter(move || raw_recv(&client))
        .unwrap()
        .expect("the client receives the INIT-ACK");
    assert_eq!((src, dst), (VIP, CLIENT_IP), "from the ClusterIP");
    assert_eq!(got, init_ack);
    assert!(sctp_checksum_ok(&got));
}
