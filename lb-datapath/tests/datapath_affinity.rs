//! Session affinity across a Service port's two backend sets, in the real programs
//! (BPF_PROG_TEST_RUN). kube-proxy keeps a client's affinity per endpoint, in one list that its
//! Cluster and Local chains both consult; here the Local set reads its Cluster set's entries
//! (`LB_AFFINITY_SCOPE`), taking from them only backends on this node. Needs root.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{
    external::*,
    harness::{Harness, Hook, TCP, socket, xdp},
    packet::{Packet, assert_frame_eq, flags},
};
use lb_common::maps::{scope, snat};
use lb_datapath::{
    predict::{self, Forward, Selection},
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec},
};

const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(172, 30, 0, 41), 80);
const LOCAL_POD_2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 10, 0, 6), 8080);
const AFFINITY_S: u32 = 600;

/// One Service port with externalTrafficPolicy Local and ClientIP affinity, as the agent
/// programs it: the Cluster set behind its ClusterIP (which outside clients reach through a
/// routed service range), the Local set behind its NodePort from outside.
fn service_port() -> (ServiceSpec, ServiceSpec) {
    let backend = |addr, local| BackendSpec {
        addr,
        local,
        weight: 1,
    };
    let cluster = ServiceSpec {
        name: "web".into(),
        frontends: vec![FrontendSpec {
            addr: *CLUSTER_IP.ip(),
            port: CLUSTER_IP.port(),
            proto: TCP,
            scope: scope::INTERNAL,
            kind: FrontendKind::ClusterIp,
        }],
        backends: vec![
            backend(LOCAL_POD, true),
            backend(LOCAL_POD_2, true),
            backend(REMOTE_POD, false),
        ],
        affinity_timeout_s: AFFINITY_S,
        ..Default::default()
    };
    let local = ServiceSpec {
        name: "web-local".into(),
        local_of: Some("web".into()),
        backends: vec![backend(LOCAL_POD, true), backend(LOCAL_POD_2, true)],
        drop_when_empty: true,
        ..node_port_service("web-local", TCP, &[])
    };
    let local = ServiceSpec {
        affinity_timeout_s: AFFINITY_S,
        ..local
    };
    (cluster, local)
}

fn arriving(client: SocketAddrV4, dst: SocketAddrV4) -> Packet {
    let mut pkt = Packet::tcp(client, dst, flags::SYN, b"GET");
    pkt.eth_src = CLIENT_MAC;
    pkt.eth_dst = UPLINK_MAC;
    pkt
}

/// A port of the client at `ip` whose new flow to `dst` Maglev gives to `wanted` in `svc`'s set,
/// from `from` on (flows of one client use distinct ports: the same port to the same backend
/// would be another source port's business).
fn port_picking(
    h: &Harness,
    from: u16,
    svc: &ServiceSpec,
    ip: [u8; 4],
    dst: SocketAddrV4,
    wanted: SocketAddrV4,
) -> u16 {
    (from..from + 1000)
        .find(|port| h.expected_backend(svc, socket(ip, *port), dst, TCP) == wanted)
        .unwrap_or_else(|| panic!("no port of {ip:?} goes to {wanted}"))
}

/// Sends a SYN from `client` to `dst` through XDP and checks that it went, DNAT only, to the
/// local backend `backend` (and that `lbctl trace`'s predictor said so first).
fn assert_served_by(
    h: &mut Harness,
    client: SocketAddrV4,
    dst: SocketAddrV4,
    backend: SocketAddrV4,
    why: &str,
) {
    match predict::forward(&h.maps, client, dst, TCP, scope::EXTERNAL, true).unwrap() {
        Forward::NewFlow {
            backend: predicted, ..
        } => assert_eq!(predicted, backend, "predicted: {why}"),
        other => panic!("{why}: predicted {other:?}"),
    }
    let syn = arriving(client, dst);
    let run = h.run(Hook::Xdp, &syn.bytes());
    assert_eq!(run.verdict, xdp::PASS, "{why}");
    assert_frame_eq(&run.out, &syn.with_dst(backend).bytes(), why);
}

#[test]
fn a_client_keeps_its_backend_across_a_service_ports_cluster_and_local_sets() {
    in_routed_namespace(|h| {
        let (cluster, local) = service_port();
        h.program(&cluster);
        h.program(&local);
        configure_snat(h, snat::PORT_MIN, snat::PORT_MAX);
        let (cluster_id, local_id) = (h.set_id(&cluster), h.set_id(&local));
        assert_eq!(h.maps.affinity_scope.get(&local_id, 0).unwrap(), cluster_id);
        assert_eq!(h.maps.affinity_scope.get(&cluster_id, 0).unwrap(), 0);

        // Through the Cluster set, the client gets LOCAL_POD_2 (Maglev's pick for this flow).
        let ip = [192, 168, 50, 2];
        let first = socket(
            ip,
            port_picking(h, 41_000, &cluster, ip, CLUSTER_IP, LOCAL_POD_2),
        );
        assert_served_by(h, first, CLUSTER_IP, LOCAL_POD_2, "first flow, Cluster set");

        // Through the Local set, with a flow Maglev would give to LOCAL_POD, it keeps LOCAL_POD_2.
        let second = socket(
            ip,
            port_picking(h, 43_000, &local, ip, node_port(), LOCAL_POD),
        );
        match predict::forward(&h.maps, second, node_port(), TCP, scope::EXTERNAL, true).unwrap() {
            Forward::NewFlow {
                selection: Selection::Affinity { .. },
                ..
            } => {}
            other => panic!("predicted {other:?}"),
        }
        assert_served_by(
            h,
            second,
            node_port(),
            LOCAL_POD_2,
            "shared affinity, Local set",
        );

        // A client stuck to the backend on another node through the Cluster set gets one of this
        // node's through the Local set: the Local set holds no other.
        let ip = [192, 168, 50, 3];
        let remote_port = port_picking(h, 41_000, &cluster, ip, CLUSTER_IP, REMOTE_POD);
        let remote_flow = socket(ip, remote_port);
        match predict::forward(&h.maps, remote_flow, CLUSTER_IP, TCP, scope::EXTERNAL, true)
            .unwrap()
        {
            Forward::NewFlow { backend, .. } => assert_eq!(backend, REMOTE_POD),
            other => panic!("predicted {other:?}"),
        }
        let run = h.run(Hook::Xdp, &arriving(remote_flow, CLUSTER_IP).bytes());
        assert_eq!(run.verdict, xdp::REDIRECT, "to the other node");
        let local_flow = socket(ip, remote_port + 1);
        let maglev = h.expected_backend(&local, local_flow, node_port(), TCP);
        assert_served_by(
            h,
            local_flow,
            node_port(),
            maglev,
            "a remote entry is no Local choice",
        );
    });
}

/// The entries a Local set shares follow the sets: pointed at the Cluster set while both exist,
/// back to its own once the Cluster set goes.
#[test]
fn the_shared_scope_follows_the_sets() {
    in_routed_namespace(|h| {
        let (cluster, local) = service_port();
        h.program(&local);
        let local_id = h.set_id(&local);
        assert_eq!(h.maps.affinity_scope.get(&local_id, 0).unwrap(), 0, "alone");
        h.program(&cluster);
        let cluster_id = h.set_id(&cluster);
        assert_eq!(h.maps.affinity_scope.get(&local_id, 0).unwrap(), cluster_id);
        h.remove("web");
        assert_eq!(
            h.maps.affinity_scope.get(&local_id, 0).unwrap(),
            0,
            "its own again"
        );
    });
}

/// More services than the default capacity: every map indexed by set id grows with the others
/// (at 100k services the scope map once stayed at the default and the agent's write failed).
#[test]
fn every_map_indexed_by_set_holds_as_many_sets_as_asked() {
    if !common::require_privileges() {
        return;
    }
    let sets = lb_common::maps::capacity::SETS + 4_096;
    let capacities = lb_datapath::Capacities {
        sets,
        ..lb_datapath::Capacities::default()
    };
    let mut datapath =
        lb_datapath::Datapath::load(&lb_datapath::Pinning::None, capacities).expect("load");
    let maps = datapath.take_maps().expect("maps");
    assert_eq!(maps.set_stats.len(), sets);
    assert_eq!(maps.affinity_scope.len(), sets);
    assert_eq!(maps.sock_stats.len(), sets);
}
