//! Socket-level balancing (`cgroup/connect4`, `cgroup/getpeername4`) on the real kernel: the
//! programs attached to a cgroup v2 directory of the test's own, a forked client moved into it,
//! services programmed through the agent's planner and writer, backends listening on 127.0.0.1
//! in a network namespace of the test's own (which has nothing but `lo`, so an address that is
//! not translated is unreachable there and no packet leaves it). Needs root and a writable
//! cgroup v2 hierarchy.

mod common;

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
    time::{Duration, Instant},
};

use common::bpffs::TempBpffs;
use lb_common::{maps::scope, net::proto};
use lb_datapath::{
    Capacities, Datapath, Pinning, attach,
    maps::Maps,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec, Services},
    socket_lb::{self, SockHook},
};
use lb_testbed::{Cgroup, Netns, netns::unique_prefix};

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 42);
/// No frontend, no route in the test's namespace.
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(10, 255, 255, 1);
const TIMEOUT: Duration = Duration::from_secs(3);

/// What one `connect()` of the client did: its errno (0: connected), and then the peer
/// `getpeername()` showed and its own address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Outcome {
    errno: i32,
    peer_addr: [u8; 4],
    peer_port: u16,
    local_port: u16,
    /// How long `connect()` took, in milliseconds.
    millis: u32,
}

impl Outcome {
    fn peer(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(self.peer_addr), self.peer_port)
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Runs `connect()` to each target in a child process forked from the calling thread (so in its
/// network namespace) that first moves itself into `cgroup` (`None`: stays in the test's own),
/// and returns what each did. The child calls nothing but raw syscalls (no allocation after a
/// fork in a threaded process) and keeps its sockets open until it exits.
fn connect_from(cgroup: Option<&Path>, targets: &[SocketAddrV4]) -> Vec<Outcome> {
    assert!(targets.len() <= 64);
    let procs = cgroup.map(|c| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(c.join("cgroup.procs"))
            .expect("cgroup.procs")
    });
    let procs_fd = procs.as_ref().map_or(-1, |f| f.as_raw_fd());
    let addrs: Vec<libc::sockaddr_in> = targets.iter().map(|t| sockaddr(*t)).collect();
    let mut pipe = [0i32; 2];
    // SAFETY: pipe fills the array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes raw syscalls on memory prepared before the fork, then exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: the child; every pointer is into memory allocated before the fork.
        unsafe { client(procs_fd, pipe[1], &addrs) }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(pipe[1]) };
    let mut outcomes = vec![Outcome::default(); targets.len()];
    let want = size_of::<Outcome>() * targets.len();
    let mut got = 0;
    while got < want {
        // SAFETY: reading into the outcomes' bytes, within bounds.
        let n = unsafe {
            libc::read(
                pipe[0],
                outcomes.as_mut_ptr().cast::<u8>().add(got).cast(),
                want - got,
            )
        };
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    let mut status = 0;
    // SAFETY: reaping our child.
    unsafe {
        libc::close(pipe[0]);
        libc::waitpid(pid, &mut status, 0);
    }
    assert_eq!(got, want, "the client died early (status {status:#x})");
    outcomes
}

/// The forked client (see [`connect_from`]).
///
/// # Safety
///
/// Only in the child of a fork; `addrs` was allocated before it.
unsafe fn client(procs_fd: i32, out: i32, addrs: &[libc::sockaddr_in]) -> ! {
    // SAFETY: raw syscalls on valid descriptors and buffers.
    unsafe {
        if procs_fd >= 0 && libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(2);
        }
        let mut sockets = [-1i32; 64];
        for (i, addr) in addrs.iter().enumerate() {
            let mut o = Outcome::default();
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            sockets[i] = s;
            // connect() gives up after SO_SNDTIMEO.
            let tv = libc::timeval {
                tv_sec: 3,
                tv_usec: 0,
            };
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            );
            let mut t0 = std::mem::zeroed::<libc::timespec>();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t0);
            let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let ret = libc::connect(s, std::ptr::from_ref(addr).cast(), len);
            let mut t1 = std::mem::zeroed::<libc::timespec>();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t1);
            o.millis =
                ((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1_000_000) as u32;
            if ret != 0 {
                o.errno = *libc::__errno_location();
            } else {
                let mut peer = std::mem::zeroed::<libc::sockaddr_in>();
                let mut plen = len;
                libc::getpeername(s, (&raw mut peer).cast(), &mut plen);
                o.peer_addr = peer.sin_addr.s_addr.to_ne_bytes();
                o.peer_port = u16::from_be(peer.sin_port);
                let mut local = std::mem::zeroed::<libc::sockaddr_in>();
                let mut llen = len;
                libc::getsockname(s, (&raw mut local).cast(), &mut llen);
                o.local_port = u16::from_be(local.sin_port);
            }
            let bytes = size_of::<Outcome>();
            if libc::write(out, (&raw const o).cast(), bytes) != bytes as isize {
                libc::_exit(3);
            }
        }
        libc::_exit(0)
    }
}

/// Accepts `count` connections from the listeners (non-blocking), within [`TIMEOUT`]: the
/// client ports each listener saw.
fn accept_all(listeners: &[&TcpListener], count: usize) -> Vec<BTreeSet<u16>> {
    let mut seen = vec![BTreeSet::new(); listeners.len()];
    let deadline = Instant::now() + TIMEOUT;
    let mut total = 0;
    while total < count && Instant::now() < deadline {
        let mut idle = true;
        for (i, l) in listeners.iter().enumerate() {
            match l.accept() {
                Ok((_, std::net::SocketAddr::V4(peer))) => {
                    assert_eq!(*peer.ip(), Ipv4Addr::LOCALHOST);
                    seen[i].insert(peer.port());
                    total += 1;
                    idle = false;
                }
                Ok((_, other)) => panic!("unexpected peer {other}"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    seen
}

struct Bed {
    ns: Netns,
    backends: [TcpListener; 2],
    /// Listens on 127.0.0.1, no frontend.
    plain: TcpListener,
    // Dropped in this order: the datapath's maps and programs, then the links' bpffs, then the
    // cgroup (empty by then).
    _maps: Maps,
    _services: Services,
    datapath: Datapath,
    bpffs: TempBpffs,
    cgroup: Cgroup,
}

fn listener() -> TcpListener {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    l.set_nonblocking(true).unwrap();
    l
}

fn port(l: &TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

fn cluster_ip(name: &str, vip: Ipv4Addr, port: u16, backends: &[u16]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        frontends: vec![FrontendSpec {
            addr: vip,
            port,
            proto: proto::TCP,
            scope: scope::INTERNAL,
            kind: FrontendKind::ClusterIp,
        }],
        backends: backends
            .iter()
            .map(|p| BackendSpec::local(SocketAddrV4::new(Ipv4Addr::LOCALHOST, *p)))
            .collect(),
        ..ServiceSpec::default()
    }
}

fn load(bpffs: &TempBpffs) -> Datapath {
    Datapath::load(&Pinning::Dir(bpffs.dir.clone()), Capacities::default()).expect("load")
}

fn bed() -> Option<Bed> {
    if !common::require_privileges() {
        return None;
    }
    let root = socket_lb::default_cgroup_root().expect("a cgroup v2 hierarchy");
    let cgroup = Cgroup::new(&root, &unique_prefix("sock")).expect("a cgroup of the test's own");
    let bpffs = TempBpffs::new(&unique_prefix("sock"));
    let ns = Netns::new(unique_prefix("sock")).expect("netns");
    let (backends, plain) = ns
        .enter(|| ([listener(), listener()], listener()))
        .expect("listeners in the namespace");
    let mut datapath = load(&bpffs);
    let mut maps = datapath.take_maps().expect("maps");
    let mut services = Services::default();
    let ports = [port(&backends[0]), port(&backends[1])];
    services
        .program(&mut maps, &cluster_ip("web", VIP, 80, &ports))
        .expect("web");
    services
        .program(&mut maps, &cluster_ip("empty", EMPTY_VIP, 80, &[]))
        .expect("empty");
    socket_lb::attach(&mut datapath, &bpffs.dir, cgroup.path()).expect("attach");
    Some(Bed {
        ns,
        backends,
        plain,
        _maps: maps,
        _services: services,
        datapath,
        bpffs,
        cgroup,
    })
}

impl Bed {
    /// [`connect_from`] in the bed's namespace, from inside the cgroup or (`false`) outside it.
    fn connect(&self, inside: bool, targets: &[SocketAddrV4]) -> Vec<Outcome> {
        let cgroup = inside.then(|| self.cgroup.path().to_path_buf());
        let targets = targets.to_vec();
        self.ns
            .enter(move || connect_from(cgroup.as_deref(), &targets))
            .expect("client in the namespace")
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
        .ns
        .enter(|| TcpStream::connect_timeout(&SocketAddrV4::new(VIP, 80).into(), TIMEOUT))
        .unwrap()
        .expect_err("the ClusterIP is not reachable outside the cgroup");
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");
}

#[test]
fn a_restarted_datapath_takes_over_the_pinned_links_and_cleanup_removes_them() {
    let Some(mut bed) = bed() else { return };
    let before = socket_lb::links(&bed.bpffs.dir).expect("links");
    assert_eq!(
        before.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        SockHook::ALL
    );
    let cgroup_id = std::fs::metadata(&bed.cgroup.path()).unwrap().ino();
    for (hook, info) in &before {
        assert_eq!(info.cgroup_id, cgroup_id, "{hook:?}: on the test's cgroup");
    }

    // A second datapath on the same pins (an agent restart): the same links, its programs.
    let mut second = load(&bed.bpffs);
    socket_lb::attach(&mut second, &bed.bpffs.dir, &bed.cgroup.path()).expect("attach again");
    let after = socket_lb::links(&bed.bpffs.dir).expect("links");
    for ((hook, old), (_, new)) in before.iter().zip(&after) {
        assert_eq!(old.link_id, new.link_id, "{hook:?}: the link is kept");
        assert_ne!(old.prog_id, new.prog_id, "{hook:?}: with the new program");
    }
    // The first datapath's programs are gone from the links; the second's serve alone.
    bed.datapath = second;
    let o = bed.connect(true, &[SocketAddrV4::new(VIP, 80)]);
    assert_eq!((o[0].errno, o[0].peer()), (0, SocketAddrV4::new(VIP, 80)));
    accept_all(&[&bed.backends[0], &bed.backends[1]], 1);

    // Cleanup detaches the hooks.
    let done = attach::cleanup(&bed.bpffs.dir).expect("cleanup");
    assert!(done.removed >= SockHook::ALL.len(), "{done:?}");
    assert!(socket_lb::links(&bed.bpffs.dir).expect("links").is_empty());
    let o = bed.connect(true, &[SocketAddrV4::new(VIP, 80)]);
    assert_eq!(o[0].errno, libc::ENETUNREACH, "detached: {:?}", o[0]);
}
