//! The bed of the socket-level balancing tests: the socket programs attached to a cgroup v2
//! directory of the test's own, services programmed through the agent's planner and writer,
//! backends listening on 127.0.0.1 in a network namespace of the test's own (which has nothing
//! but `lo`, so an address that is not translated is unreachable there and no packet leaves
//! it), and a client forked into the cgroup that makes real TCP and UDP calls.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    time::{Duration, Instant},
};

use lb_common::{maps::scope, net::proto};
use lb_datapath::{
    Capacities, Datapath, Pinning,
    maps::Maps,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec, Services},
    socket_lb,
};
use lb_testbed::{Cgroup, Netns, netns::unique_prefix};

use super::bpffs::TempBpffs;

pub const TIMEOUT: Duration = Duration::from_secs(3);

/// What the client does with one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// TCP `connect()`, then `getpeername()`.
    Tcp,
    /// UDP `sendto()` the target from an unconnected socket, then `recvfrom()` the echo.
    UdpSendto,
    /// UDP `connect()`, `getpeername()`, `send()`, then `recvfrom()` the echo.
    UdpConnected,
    /// As `Tcp` and `UdpSendto`, from an IPv6 socket given the IPv4-mapped address
    /// (`::ffff:a.b.c.d`); the outcome's peer is the IPv4 address inside the one shown.
    Tcp6Mapped,
    UdpSendto6Mapped,
}

impl Call {
    const fn v6(self) -> bool {
        matches!(self, Self::Tcp6Mapped | Self::UdpSendto6Mapped)
    }
}

/// What one call of the client did: its errno (0: it worked), and then the peer
/// `getpeername()` showed (for `UdpSendto`, the source `recvfrom()` showed) and its own port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub errno: i32,
    pub peer_addr: [u8; 4],
    pub peer_port: u16,
    pub local_port: u16,
    /// How long the call took, in milliseconds.
    pub millis: u32,
    /// The socket's cookie (`SO_COOKIE`), which picked its Maglev slot.
    pub cookie: u64,
}

impl Outcome {
    pub fn peer(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(self.peer_addr), self.peer_port)
    }
}

fn sockaddr6(addr: SocketAddrV4) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: addr.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: addr.ip().to_ipv6_mapped().octets(),
        },
        sin6_scope_id: 0,
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

/// Makes `call` to each target in a child process forked from the calling thread (so in its
/// network namespace) that first moves itself into `cgroup` (`None`: stays in the test's own),
/// and returns what each did. The child calls nothing but raw syscalls (no allocation after a
/// fork in a threaded process) and keeps its sockets open until it exits.
pub fn calls_from(cgroup: Option<&Path>, call: Call, targets: &[SocketAddrV4]) -> Vec<Outcome> {
    assert!(targets.len() <= 64);
    let procs = cgroup.map(|c| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(c.join("cgroup.procs"))
            .expect("cgroup.procs")
    });
    let procs_fd = procs.as_ref().map_or(-1, |f| f.as_raw_fd());
    let addrs: Vec<libc::sockaddr_in> = targets.iter().map(|t| sockaddr(*t)).collect();
    let addrs6: Vec<libc::sockaddr_in6> = targets.iter().map(|t| sockaddr6(*t)).collect();
    let mut pipe = [0i32; 2];
    // SAFETY: pipe fills the array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes raw syscalls on memory prepared before the fork, then exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: the child; every pointer is into memory allocated before the fork.
        unsafe { client(procs_fd, pipe[1], call, &addrs, &addrs6) }
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

/// Milliseconds since `t0` (monotonic clock).
///
/// # Safety
///
/// Raw syscall only (safe after a fork).
unsafe fn millis_since(t0: &libc::timespec) -> u32 {
    // SAFETY: clock_gettime fills the struct.
    unsafe {
        let mut t1 = std::mem::zeroed::<libc::timespec>();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t1);
        ((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1_000_000) as u32
    }
}

/// The forked client (see [`calls_from`]).
///
/// # Safety
///
/// Only in the child of a fork; `addrs` was allocated before it.
unsafe fn client(
    procs_fd: i32,
    out: i32,
    call: Call,
    addrs: &[libc::sockaddr_in],
    addrs6: &[libc::sockaddr_in6],
) -> ! {
    // SAFETY: raw syscalls on valid descriptors and buffers.
    unsafe {
        if procs_fd >= 0 && libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(2);
        }
        let (family, len) = if call.v6() {
            (libc::AF_INET6, size_of::<libc::sockaddr_in6>())
        } else {
            (libc::AF_INET, size_of::<libc::sockaddr_in>())
        };
        let len = len as libc::socklen_t;
        let mut sockets = [-1i32; 64];
        for (i, addr) in addrs.iter().enumerate() {
            let mut o = Outcome::default();
            let kind = if matches!(call, Call::Tcp | Call::Tcp6Mapped) {
                libc::SOCK_STREAM
            } else {
                libc::SOCK_DGRAM
            };
            let s = libc::socket(family, kind, 0);
            sockets[i] = s;
            // connect() and recvfrom() give up after 3 s.
            let tv = libc::timeval {
                tv_sec: 3,
                tv_usec: 0,
            };
            for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
                libc::setsockopt(
                    s,
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as u32,
                );
            }
            let mut t0 = std::mem::zeroed::<libc::timespec>();
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t0);
            let target: *const libc::sockaddr = if call.v6() {
                std::ptr::from_ref(&addrs6[i]).cast()
            } else {
                std::ptr::from_ref(addr).cast()
            };
            // Large enough for either family; read as sockaddr_in6 for IPv6 sockets.
            let mut peer = std::mem::zeroed::<libc::sockaddr_in6>();
            let mut plen = len;
            let ret = match call {
                Call::Tcp | Call::Tcp6Mapped => {
                    let r = libc::connect(s, target, len);
                    if r == 0 {
                        libc::getpeername(s, (&raw mut peer).cast(), &mut plen);
                    }
                    r
                }
                Call::UdpSendto | Call::UdpSendto6Mapped => {
                    let r = libc::sendto(s, b"ping".as_ptr().cast(), 4, 0, target, len);
                    if r < 0 {
                        -1
                    } else {
                        let mut buf = [0u8; 64];
                        let n = libc::recvfrom(
                            s,
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&raw mut peer).cast(),
                            &mut plen,
                        );
                        if n < 0 { -1 } else { 0 }
                    }
                }
                Call::UdpConnected => {
                    let mut r = libc::connect(s, target, len);
                    if r == 0 {
                        libc::getpeername(s, (&raw mut peer).cast(), &mut plen);
                        let mut buf = [0u8; 64];
                        if libc::send(s, b"ping".as_ptr().cast(), 4, 0) < 0
                            || libc::recv(s, buf.as_mut_ptr().cast(), buf.len(), 0) < 0
                        {
                            r = -1;
                        }
                    }
                    r
                }
            };
            o.millis = millis_since(&t0);
            if ret != 0 {
                o.errno = *libc::__errno_location();
            } else {
                // Both families put the port at the same offset; the IPv4 address of a mapped
                // IPv6 one is its last 4 bytes.
                o.peer_port = u16::from_be(peer.sin6_port);
                o.peer_addr = if call.v6() {
                    let b = peer.sin6_addr.s6_addr;
                    [b[12], b[13], b[14], b[15]]
                } else {
                    let v4: libc::sockaddr_in = std::ptr::read((&raw const peer).cast());
                    v4.sin_addr.s_addr.to_ne_bytes()
                };
                let mut local = std::mem::zeroed::<libc::sockaddr_in6>();
                let mut llen = len;
                libc::getsockname(s, (&raw mut local).cast(), &mut llen);
                o.local_port = u16::from_be(local.sin6_port);
            }
            const SO_COOKIE: i32 = 57;
            let mut clen = size_of::<u64>() as libc::socklen_t;
            libc::getsockopt(
                s,
                libc::SOL_SOCKET,
                SO_COOKIE,
                (&raw mut o.cookie).cast(),
                &mut clen,
            );
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
pub fn accept_all(listeners: &[&TcpListener], count: usize) -> Vec<BTreeSet<u16>> {
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

pub fn listener() -> TcpListener {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    l.set_nonblocking(true).unwrap();
    l
}

pub fn port(l: &TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

/// A UDP echo server on 127.0.0.1 (a thread of the namespace it was started in): answers each
/// datagram with its own bytes, and counts them. Stops when the bed's namespace goes.
pub struct Echo {
    pub socket: UdpSocket,
}

impl Echo {
    pub fn start() -> Self {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let serving = socket.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = serving.recv_from(&mut buf) {
                let _ = serving.send_to(&buf[..n], from);
            }
        });
        Self { socket }
    }

    pub fn port(&self) -> u16 {
        self.socket.local_addr().unwrap().port()
    }
}

/// A service whose frontends are `frontends` (address, port, protocol, kind; internal scope)
/// and whose backends listen on 127.0.0.1 at `backends`.
pub fn service(
    name: &str,
    frontends: &[(Ipv4Addr, u16, u8, FrontendKind)],
    backends: &[u16],
) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        frontends: frontends
            .iter()
            .map(|&(addr, port, proto, kind)| FrontendSpec {
                addr,
                port,
                proto,
                scope: scope::INTERNAL,
                kind,
            })
            .collect(),
        backends: backends
            .iter()
            .map(|p| BackendSpec::local(SocketAddrV4::new(Ipv4Addr::LOCALHOST, *p)))
            .collect(),
        ..ServiceSpec::default()
    }
}

/// A TCP ClusterIP service.
pub fn cluster_ip(name: &str, vip: Ipv4Addr, port: u16, backends: &[u16]) -> ServiceSpec {
    service(
        name,
        &[(vip, port, proto::TCP, FrontendKind::ClusterIp)],
        backends,
    )
}

/// The datapath on `bpffs`'s pins, its socket programs verified (the packet programs, which
/// these tests never run, are left unloaded).
pub fn load(bpffs: &TempBpffs) -> Datapath {
    lb_datapath::testing::load_socket_programs(
        &Pinning::Dir(bpffs.dir.clone()),
        Capacities::default(),
    )
}

pub struct SockBed {
    pub ns: Netns,
    // Dropped in this order: the datapath's maps and programs, then the links' bpffs, then the
    // cgroup (empty by then).
    pub maps: Maps,
    pub services: Services,
    pub datapath: Datapath,
    pub bpffs: TempBpffs,
    pub cgroup: Cgroup,
}

impl SockBed {
    /// The bed with the programs attached to its cgroup and nothing programmed, or `None`
    /// without the privileges (the test then passes vacuously only where the gate says so).
    pub fn new() -> Option<Self> {
        if !super::require_privileges() {
            return None;
        }
        let root = socket_lb::default_cgroup_root().expect("a cgroup v2 hierarchy");
        let cgroup =
            Cgroup::new(&root, &unique_prefix("sock")).expect("a cgroup of the test's own");
        let bpffs = TempBpffs::new(&unique_prefix("sock"));
        let ns = Netns::new(unique_prefix("sock")).expect("netns");
        let mut datapath = load(&bpffs);
        let maps = datapath.take_maps().expect("maps");
        socket_lb::attach(&mut datapath, &bpffs.dir, cgroup.path()).expect("attach");
        Some(Self {
            ns,
            maps,
            services: Services::default(),
            datapath,
            bpffs,
            cgroup,
        })
    }

    pub fn program(&mut self, spec: &ServiceSpec) {
        self.services
            .program(&mut self.maps, spec)
            .unwrap_or_else(|e| panic!("{}: {e:#}", spec.name));
    }

    /// Runs `f` on a thread in the bed's namespace (listeners, echo servers, cookies).
    pub fn inside<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.ns.enter(f).expect("a thread in the namespace")
    }

    /// [`calls_from`] in the bed's namespace, from inside the cgroup or (`false`) outside it.
    pub fn calls(&self, inside: bool, call: Call, targets: &[SocketAddrV4]) -> Vec<Outcome> {
        let cgroup = inside.then(|| self.cgroup.path().to_path_buf());
        let targets = targets.to_vec();
        self.inside(move || calls_from(cgroup.as_deref(), call, &targets))
    }

    /// TCP connects from inside the cgroup.
    pub fn connect(&self, targets: &[SocketAddrV4]) -> Vec<Outcome> {
        self.calls(true, Call::Tcp, targets)
    }

    /// Tells the programs the bed's namespace is the node's (`host`), or that it is a pod's
    /// (the node's namespace is then some other).
    pub fn configure(&mut self, mode: socket_lb::Mode, host: bool) {
        let cookie = self
            .inside(socket_lb::netns_cookie)
            .expect("the namespace's cookie");
        let node = if host { cookie } else { cookie ^ 1 };
        socket_lb::configure(&mut self.maps, mode, node).expect("configure");
    }
}

/// A connected UDP socket held open by a child process in a cgroup (see [`HeldUdp::start`]).
pub struct HeldUdp {
    pid: i32,
    go: i32,
    results: i32,
}

impl HeldUdp {
    /// Forks a child (in the calling thread's network namespace) that moves into `cgroup`,
    /// connects a UDP socket to `target` and exchanges one datagram with it, then waits for
    /// [`HeldUdp::exchange_again`]. Returns with the errno of that first exchange.
    pub fn start(cgroup: &Path, target: SocketAddrV4) -> (Self, i32) {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .expect("cgroup.procs");
        let addr = sockaddr(target);
        let (mut go, mut results) = ([0i32; 2], [0i32; 2]);
        // SAFETY: pipe fills the arrays.
        unsafe {
            assert_eq!(libc::pipe(go.as_mut_ptr()), 0);
            assert_eq!(libc::pipe(results.as_mut_ptr()), 0);
        }
        // SAFETY: the child only makes raw syscalls on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: the child; raw syscalls on descriptors and memory from before the fork.
            unsafe { hold_udp(procs.as_raw_fd(), go[0], results[1], &addr) }
        }
        // SAFETY: closing the child's ends in the parent.
        unsafe {
            libc::close(go[0]);
            libc::close(results[1]);
        }
        let held = Self {
            pid,
            go: go[1],
            results: results[0],
        };
        let first = held.result();
        (held, first)
    }

    fn result(&self) -> i32 {
        let mut errno = [0u8; 4];
        // SAFETY: reading 4 bytes into our buffer.
        let n = unsafe { libc::read(self.results, errno.as_mut_ptr().cast(), 4) };
        assert_eq!(n, 4, "the UDP holder died");
        i32::from_ne_bytes(errno)
    }

    /// Has the child send and receive once more on its socket: the errno (0: echoed).
    pub fn exchange_again(self) -> i32 {
        // SAFETY: one byte on our pipe.
        assert_eq!(unsafe { libc::write(self.go, b"1".as_ptr().cast(), 1) }, 1);
        self.result()
    }
}

impl Drop for HeldUdp {
    fn drop(&mut self) {
        // SAFETY: our descriptors and child.
        unsafe {
            libc::close(self.go);
            libc::close(self.results);
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The child of [`HeldUdp::start`].
///
/// # Safety
///
/// Only in the child of a fork.
unsafe fn hold_udp(procs: i32, go: i32, results: i32, addr: &libc::sockaddr_in) -> ! {
    // SAFETY: raw syscalls on valid descriptors and buffers.
    unsafe {
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(2);
        }
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let exchange = || -> i32 {
            let mut buf = [0u8; 16];
            if libc::send(s, b"ping".as_ptr().cast(), 4, 0) < 0
                || libc::recv(s, buf.as_mut_ptr().cast(), buf.len(), 0) < 0
            {
                *libc::__errno_location()
            } else {
                0
            }
        };
        let mut errno = if libc::connect(s, std::ptr::from_ref(addr).cast(), len) == 0 {
            exchange()
        } else {
            *libc::__errno_location()
        };
        libc::write(results, (&raw const errno).cast(), 4);
        let mut byte = 0u8;
        if libc::read(go, (&raw mut byte).cast(), 1) == 1 {
            errno = exchange();
            libc::write(results, (&raw const errno).cast(), 4);
        }
        libc::_exit(0)
    }
}
