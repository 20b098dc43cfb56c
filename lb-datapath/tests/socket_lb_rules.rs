//! Socket-level balancing's Service rules on the real kernel: UDP (unconnected `sendto()` and
//! `recvfrom()` through `sendmsg4`/`recvmsg4`, connected sockets of the node and of pods),
//! NodePorts, LoadBalancer IPs and externalIPs as the node and pods reach them, `host-only`,
//! session affinity and source ranges for the node's own sockets, and the per-set counters.
//! The bed is `common::sockets`'s. Needs root and a writable cgroup v2 hierarchy.

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use common::sockets::{
    Call, Echo, HeldUdp, SockBed, accept_all, cluster_ip, listener, port, service,
};
use ipnet::Ipv4Net;
use lb_common::{
    Be32,
    maps::{NodeConfig, scope},
    net::proto,
    sock::SockStats,
};
use lb_datapath::{
    program::{FrontendKind, FrontendSpec},
    sock_close,
    socket_lb::Mode,
};

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 53);
/// The node's address as the bed's programs know it (unreachable in the bed's namespace).
const NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

/// Every set's socket counters, summed over sets and CPUs.
fn sock_totals(bed: &SockBed) -> SockStats {
    let mut total = SockStats::default();
    for set in 0..lb_common::maps::capacity::SETS {
        let Ok(per_cpu) = bed.maps.sock_stats.get(&set, 0) else {
            continue;
        };
        for s in per_cpu.iter() {
            total.connects += s.connects;
            total.datagrams += s.datagrams;
            total.refused += s.refused;
        }
    }
    total
}

fn set_node_addr(bed: &mut SockBed, addr: Ipv4Addr) {
    let config = NodeConfig {
        snat_addr: Be32::from_ip(addr),
        ..NodeConfig::default()
    };
    bed.maps.config.set(0, config, 0).expect("LB_CONFIG");
}

#[test]
fn udp_datagrams_to_a_cluster_ip_reach_a_backend_and_replies_show_the_cluster_ip() {
    let Some(mut bed) = SockBed::new() else {
        return;
    };
    let echoes = bed.inside(|| [Echo::start(), Echo::start()]);
    let ports = [echoes[0].port(), echoes[1].port()];
    bed.program(&service(
        "dns",
        &[(DNS_VIP, 53, proto::UDP, FrontendKind::ClusterIp)],
        &ports,
    ));
    let frontend = SocketAddrV4::new(DNS_VIP, 53);
    let outcomes = bed.calls(true, Call::UdpSendto, &[frontend; 24]);
    for o in &outcomes {
        assert_eq!(o.errno, 0, "sendto/recvfrom {frontend}: {o:?}");
        assert_eq!(o.peer(), frontend, "recvfrom() shows the ClusterIP: {o:?}");
    }
    assert_eq!(sock_totals(&bed).datagrams, 24);
    // Outside the cgroup the ClusterIP is unreachable: nothing translated it.
    let outside = bed.calls(false, Call::UdpSendto, &[frontend]);
    assert_eq!(outside[0].errno, libc::ENETUNREACH, "{:?}", outside[0]);

    // A UDP ClusterIP without endpoints refuses the datagram at once.
    bed.program(&service(
        "dns",
        &[(DNS_VIP, 53, proto::UDP, FrontendKind::ClusterIp)],
        &[],
    ));
    let refused = bed.calls(true, Call::UdpSendto, &[frontend]);
    assert_eq!(refused[0].errno, libc::ECONNREFUSED, "{:?}", refused[0]);
    assert_eq!(sock_totals(&bed).refused, 1);
}

#[test]
fn connected_udp_is_balanced_for_the_node_and_left_to_the_packet_path_for_pods() {
    let Some(mut bed) = SockBed::new() else {
        return;
    };
    let echo = bed.inside(Echo::start);
    bed.program(&service(
        "dns",
        &[(DNS_VIP, 53, proto::UDP, FrontendKind::ClusterIp)],
        &[echo.port()],
    ));
    let frontend = SocketAddrV4::new(DNS_VIP, 53);
    bed.configure(Mode::On, true);
    let node = bed.calls(true, Call::UdpConnected, &[frontend; 4]);
    for o in &node {
        assert_eq!((o.errno, o.peer()), (0, frontend), "{o:?}");
    }
    assert_eq!(sock_totals(&bed).connects, 4);
    // The same namespace taken for a pod's: its connected socket is not translated (the packet
    // path, which this bed lacks, would serve it), so the ClusterIP is unreachable here.
    bed.configure(Mode::On, false);
    let pod = bed.calls(true, Call::UdpConnected, &[frontend]);
    assert_eq!(pod[0].errno, libc::ENETUNREACH, "{:?}", pod[0]);
    // Its unconnected datagrams still are.
    let pod = bed.calls(true, Call::UdpSendto, &[frontend]);
    assert_eq!((pod[0].errno, pod[0].peer()), (0, frontend), "{:?}", pod[0]);
}

#[test]
fn host_only_balances_the_nodes_sockets_and_leaves_pods_to_the_packet_path() {
    let Some(mut bed) = SockBed::new() else {
        return;
    };
    let web = bed.inside(listener);
    bed.program(&cluster_ip("web", VIP, 80, &[port(&web)]));
    let frontend = SocketAddrV4::new(VIP, 80);
    bed.configure(Mode::HostOnly, false);
    let pod = bed.connect(&[frontend]);
    assert_eq!(pod[0].errno, libc::ENETUNREACH, "a pod: {:?}", pod[0]);
    bed.configure(Mode::HostOnly, true);
    let node = bed.connect(&[frontend]);
    assert_eq!(
        (node[0].errno, node[0].peer()),
        (0, frontend),
        "{:?}",
        node[0]
    );
    assert_eq!(accept_all(&[&web], 1)[0].len(), 1);
}

#[test]
fn node_ports_load_balancer_ips_and_external_ips_are_balanced_from_inside() {
    let Some(mut bed) = SockBed::new() else {
        return;
    };
    let web = bed.inside(listener);
    let mut spec = service(
        "web",
        &[
            (NODE, 30080, proto::TCP, FrontendKind::NodePort),
            (LB_IP, 80, proto::TCP, FrontendKind::LoadBalancer),
            (EXTERNAL_IP, 80, proto::TCP, FrontendKind::ExternalIp),
        ],
        &[port(&web)],
    );
    // A frontend only clients from outside use (an external-scope one) is not the hooks'.
    spec.frontends.push(FrontendSpec {
        addr: Ipv4Addr::new(203, 0, 113, 5),
        port: 80,
        proto: proto::TCP,
        scope: scope::EXTERNAL,
        kind: FrontendKind::LoadBalancer,
    });
    bed.program(&spec);
    let served = [
        SocketAddrV4::new(NODE, 30080),
        SocketAddrV4::new(LB_IP, 80),
        SocketAddrV4::new(EXTERNAL_IP, 80),
    ];
    let outcomes = bed.connect(&served);
    for (o, frontend) in outcomes.iter().zip(served) {
        assert_eq!((o.errno, o.peer()), (0, frontend), "{o:?}");
    }
    assert_eq!(accept_all(&[&web], 3)[0].len(), 3);
    // Other ports of those addresses are not refused (they are no ClusterIPs): left alone.
    let left = bed.connect(&[
        SocketAddrV4::new(NODE, 30081),
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 5), 80),
    ]);
    for o in &left {
        assert_eq!(o.errno, libc::ENETUNREACH, "not translated: {o:?}");
    }
}

#[test]
fn the_nodes_sockets_keep_their_backend_under_session_affinity() {
    let Some(mut bed) = SockBed::new() else {
        return;
    };
    let backends = bed.inside(|| [listener(), listener(), listener()]);
    let mut spec = cluster_ip(
        "sticky",
        VIP,
        80,
        &[port(&backends[0]), port(&backends[1]), port(&backends[2])],
    );
    spec.affinity_timeout_s = 600;
    bed.program(&spec);
    let frontend = SocketAddrV4::new(VIP, 80);
    // Not known to be the node's: the client's address is unknown, the packet path decides.
    let unknown = bed.connect(&[frontend]);
    assert_eq!(unknown[0].errno, libc::ENETUNREACH, "{:?}", unknown[0]);

    set_node_addr(&mut bed, NODE);
    bed.configure(Mode::On, true);
    let outcomes = bed.connect(&[frontend; 16]);
    for o in &outcomes {
        assert_eq!((o.errno, o.peer()), (0, frontend), "{o:?}");
    }
    let seen = accept_all(&[&backends[0], &backends[1], &backends[2]], 16);
    let used: Vec<_> = seen.iter().filter(|s| !s.is_empty()).collect();
    assert_eq!(used.len(), 1, "one backend for the node: {seen:?}");
    assert_eq!(used[0].len(), 16);
}

#[test]
fn source_ranges_are_checked_against_the_nodes_address() {
    let Some(mut bed) = SockBed::new() else {
        return;
    };
    let web = bed.inside(listener);
    let mut spec = service(
        "ranged",
        &[(LB_IP, 80, proto::TCP, FrontendKind::LoadBalancer)],
        &[port(&web)],
    );
    spec.source_ranges = vec![Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap()];
    bed.program(&spec);
    bed.configure(Mode::On, true);
    let frontend = SocketAddrV4::new(LB_IP, 80);

    set_node_addr(&mut bed, NODE);
    let inside = bed.connect(&[frontend]);
    assert_eq!(
        (inside[0].errno, inside[0].peer()),
        (0, frontend),
        "{:?}",
        inside[0]
    );
    assert_eq!(accept_all(&[&web], 1)[0].len(), 1);

    set_node_addr(&mut bed, Ipv4Addr::new(192, 168, 7, 1));
    let outside = bed.connect(&[frontend]);
    assert_eq!(outside[0].errno, libc::ECONNREFUSED, "{:?}", outside[0]);
}

#[test]
fn the_nodes_connected_udp_sockets_to_a_backend_that_left_are_closed() {
    let Some(mut bed) = SockBed::new() else {
        return;
    };
    let echo = bed.inside(Echo::start);
    let backend = SocketAddrV4::new(Ipv4Addr::LOCALHOST, echo.port());
    bed.program(&service(
        "dns",
        &[(DNS_VIP, 53, proto::UDP, FrontendKind::ClusterIp)],
        &[echo.port()],
    ));
    bed.configure(Mode::On, true);
    let cgroup = bed.cgroup.path().to_path_buf();
    let frontend = SocketAddrV4::new(DNS_VIP, 53);
    let (balanced, first) = bed.inside({
        let cgroup = cgroup.clone();
        move || HeldUdp::start(&cgroup, frontend)
    });
    assert_eq!(first, 0, "the balanced socket works");
    // A socket connected to the backend by its own address is none of the hooks' business.
    let (direct, first) = bed.inside(move || HeldUdp::start(&cgroup, backend));
    assert_eq!(first, 0, "the direct socket works");

    let doomed = sock_close::forget_udp(&mut bed.maps, &BTreeSet::from([backend])).unwrap();
    assert_eq!(doomed.len(), 1, "{doomed:?}");
    assert!(
        sock_close::forget_udp(&mut bed.maps, &BTreeSet::from([backend]))
            .unwrap()
            .is_empty(),
        "forgotten once"
    );
    let closed = bed.inside(move || sock_close::close_connected(&doomed).expect("sock_diag"));
    assert_eq!(closed, 1);
    // Aborted and disconnected: its next send() has no destination (a recv() would report
    // ECONNABORTED); resolvers open a new socket, which the hooks balance anew.
    assert_eq!(balanced.exchange_again(), libc::EDESTADDRREQ);
    assert_eq!(direct.exchange_again(), 0, "left alone");
}

#[test]
fn ipv6_sockets_given_ipv4_mapped_addresses_are_balanced_too() {
    let Some(mut bed) = SockBed::new() else {
        return;
    };
    let (web, echo) = bed.inside(|| (listener(), Echo::start()));
    bed.program(&cluster_ip("web", VIP, 80, &[port(&web)]));
    bed.program(&service(
        "dns",
        &[(DNS_VIP, 53, proto::UDP, FrontendKind::ClusterIp)],
        &[echo.port()],
    ));
    let tcp = SocketAddrV4::new(VIP, 80);
    let o = bed.calls(true, Call::Tcp6Mapped, &[tcp]);
    assert_eq!(
        (o[0].errno, o[0].peer()),
        (0, tcp),
        "::ffff:{tcp}: {:?}",
        o[0]
    );
    assert_eq!(accept_all(&[&web], 1)[0].len(), 1);
    let udp = SocketAddrV4::new(DNS_VIP, 53);
    let o = bed.calls(true, Call::UdpSendto6Mapped, &[udp]);
    assert_eq!(
        (o[0].errno, o[0].peer()),
        (0, udp),
        "::ffff:{udp}: {:?}",
        o[0]
    );
    // Outside the cgroup the mapped address is as unreachable as the IPv4 one.
    let o = bed.calls(false, Call::Tcp6Mapped, &[tcp]);
    assert_eq!(o[0].errno, libc::ENETUNREACH, "{:?}", o[0]);
}
