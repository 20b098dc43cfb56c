//! Socket-level balancing of TCP on the real kernel: `connect()` to a ClusterIP from a process
//! in the hooks' cgroup goes to a backend and `getpeername()` shows the ClusterIP; refusals;
//! what is left alone; restarts and cleanup. The bed is `common::sockets`'s. Needs root and a
//! writable cgroup v2 hierarchy.

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
};

use common::sockets::{
    Call, Outcome, SockBed, TIMEOUT, accept_all, cluster_ip, listener, load, port,
};
use lb_common::{Be32, net::proto};
use lb_datapath::{
    attach,
    predict_sock::{self, Origin, SockCall, SockDecision},
    socket_lb::{self, SockHook},
};

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 42);
/// No frontend, no route in the test's namespace.
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 1);

struct Bed {
    backends: [TcpListener; 2],
    /// Listens on 127.0.0.1, no frontend.
    plain: TcpListener,
    sock: SockBed,
}

fn bed() -> Option<Bed> {
    let mut sock = SockBed::new()?;
    let (backends, plain) = sock.inside(|| ([listener(), listener()], listener()));
    let ports = [port(&backends[0]), port(&backends[1])];
    sock.program(&cluster_ip("web", VIP, 80, &ports));
    sock.program(&cluster_ip("empty", EMPTY_VIP, 80, &[]));
    Some(Bed {
        backends,
        plain,
        sock,
    })
}

impl Bed {
    /// TCP connects from inside the cgroup or (`false`) outside it.
    fn connect(&self, inside: bool, targets: &[SocketAddrV4]) -> Vec<Outcome> {
        self.sock.calls(inside, Call::Tcp, targets)
    }
}

#[test]
fn connect_to_a_cluster_ip_reaches_a_backend_and_getpeername_shows_the_cluster_ip() {
    let Some(bed) = bed() else { return };
    let frontend = SocketAddrV4::new(VIP, 80);
    let outcomes = bed.connect(true, &[frontend; 24]);
    for o in &outcomes {
        assert_eq!(o.errno, 0, "connect() to {frontend}: {o:?}");
        assert_eq!(o.peer(), frontend, "getpeername() shows the ClusterIP");
    }
    let seen = accept_all(&[&bed.backends[0], &bed.backends[1]], outcomes.len());
    let client_ports: BTreeSet<u16> = outcomes.iter().map(|o| o.local_port).collect();
    let accepted: BTreeSet<u16> = seen.iter().flatten().copied().collect();
    assert_eq!(
        accepted, client_ports,
        "every connection reached a backend listener"
    );
    assert!(
        seen.iter().all(|s| !s.is_empty()),
        "Maglev spreads sockets over both backends: {seen:?}"
    );
}

#[test]
fn the_predictor_names_the_backend_each_socket_got_and_every_refusal() {
    let Some(bed) = bed() else { return };
    let frontend = SocketAddrV4::new(VIP, 80);
    let outcomes = bed.connect(true, &[frontend; 16]);
    let seen = accept_all(&[&bed.backends[0], &bed.backends[1]], outcomes.len());
    let predict = |dst: SocketAddrV4, cookie: u64| {
        predict_sock::predict(
            &bed.sock.maps,
            dst,
            proto::TCP,
            SockCall::Connect,
            Origin::Node,
            cookie,
            Be32::from_raw(0),
        )
        .expect("maps")
    };
    for o in &outcomes {
        assert_eq!(o.errno, 0, "{o:?}");
        let got = seen
            .iter()
            .position(|ports| ports.contains(&o.local_port))
            .expect("accepted");
        match predict(frontend, o.cookie) {
            SockDecision::Translated { backend, .. } => {
                assert_eq!(backend.port(), port(&bed.backends[got]), "{o:?}");
            }
            other => panic!("predicted {other:?} for {o:?}"),
        }
    }
    assert!(matches!(
        predict(SocketAddrV4::new(EMPTY_VIP, 80), 1),
        SockDecision::Refused { .. }
    ));
    assert!(matches!(
        predict(SocketAddrV4::new(VIP, 81), 1),
        SockDecision::Refused { frontend: None, .. }
    ));
    assert_eq!(
        predict(SocketAddrV4::new(ELSEWHERE, 80), 1),
        SockDecision::NotAFrontend
    );
}

#[test]
fn a_service_without_backends_and_an_unserved_port_refuse_at_once() {
    let Some(bed) = bed() else { return };
    let outcomes = bed.connect(
        true,
        &[SocketAddrV4::new(EMPTY_VIP, 80), SocketAddrV4::new(VIP, 81)],
    );
    for o in &outcomes {
        assert_eq!(o.errno, libc::ECONNREFUSED, "{o:?}");
        assert!(o.millis < 500, "refused at once: {o:?}");
    }
    assert_eq!(lb_common::sock::REFUSED_ERRNO, libc::ECONNREFUSED);
}

#[test]
fn other_addresses_and_processes_outside_the_cgroup_are_left_alone() {
    let Some(bed) = bed() else { return };
    let plain = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port(&bed.plain));
    let backend = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port(&bed.backends[0]));
    let inside = bed.connect(true, &[plain, backend, SocketAddrV4::new(ELSEWHERE, 80)]);
    assert_eq!((inside[0].errno, inside[0].peer()), (0, plain));
    // A backend reached by its own address shows its own address.
    assert_eq!((inside[1].errno, inside[1].peer()), (0, backend));
    assert_eq!(
        inside[2].errno,
        libc::ENETUNREACH,
        "not translated: {:?}",
        inside[2]
    );
    let seen = accept_all(&[&bed.plain, &bed.backends[0]], 2);
    assert_eq!(seen[0], BTreeSet::from([inside[0].local_port]));
    assert_eq!(seen[1], BTreeSet::from([inside[1].local_port]));

    // Outside the cgroup, the ClusterIP is just an address this namespace has no route to, and
    // the service without backends is not refused by the hook.
    let outside = bed.connect(
        false,
        &[SocketAddrV4::new(VIP, 80), SocketAddrV4::new(EMPTY_VIP, 80)],
    );
    for o in &outside {
        assert_eq!(o.errno, libc::ENETUNREACH, "not translated: {o:?}");
    }
    // And so for this test's own thread.
    let err = bed
        .sock
        .inside(|| TcpStream::connect_timeout(&SocketAddrV4::new(VIP, 80).into(), TIMEOUT))
        .expect_err("the ClusterIP is not reachable outside the cgroup");
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");
}

#[test]
fn a_restarted_datapath_takes_over_the_pinned_links_and_cleanup_removes_them() {
    let Some(mut bed) = bed() else { return };
    let before = socket_lb::links(&bed.sock.bpffs.dir).expect("links");
    assert_eq!(
        before.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        SockHook::ALL
    );
    let cgroup_id = std::fs::metadata(bed.sock.cgroup.path()).unwrap().ino();
    for (hook, info) in &before {
        assert_eq!(info.cgroup_id, cgroup_id, "{hook:?}: on the test's cgroup");
    }

    // A second datapath on the same pins (an agent restart): the same links, its programs.
    let mut second = load(&bed.sock.bpffs);
    socket_lb::attach(&mut second, &bed.sock.bpffs.dir, bed.sock.cgroup.path())
        .expect("attach again");
    let after = socket_lb::links(&bed.sock.bpffs.dir).expect("links");
    for ((hook, old), (_, new)) in before.iter().zip(&after) {
        assert_eq!(old.link_id, new.link_id, "{hook:?}: the link is kept");
        assert_ne!(old.prog_id, new.prog_id, "{hook:?}: with the new program");
    }
    // The first datapath's programs are gone from the links; the second's serve alone.
    bed.sock.datapath = second;
    let o = bed.connect(true, &[SocketAddrV4::new(VIP, 80)]);
    assert_eq!((o[0].errno, o[0].peer()), (0, SocketAddrV4::new(VIP, 80)));
    accept_all(&[&bed.backends[0], &bed.backends[1]], 1);

    // Cleanup detaches the hooks.
    let done = attach::cleanup(&bed.sock.bpffs.dir).expect("cleanup");
    assert!(done.removed >= SockHook::ALL.len(), "{done:?}");
    assert!(
        socket_lb::links(&bed.sock.bpffs.dir)
            .expect("links")
            .is_empty()
    );
    let o = bed.connect(true, &[SocketAddrV4::new(VIP, 80)]);
    assert_eq!(o[0].errno, libc::ENETUNREACH, "detached: {:?}", o[0]);
}
