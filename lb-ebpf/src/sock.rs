//! Socket-level balancing, in the cgroup v2 `sock_addr` hooks: a TCP `connect()` to a ClusterIP
//! frontend connects to one of its backends instead (its packets then need no NAT), and
//! `getpeername()` on that socket still shows the frontend. The rules are `lb_common::sock`'s;
//! the backend is picked by `select::balanced`, as the packet path picks a new flow's.
//!
//! Only IPv4 TCP to ClusterIPs for now: UDP (`sendmsg4`/`recvmsg4`), NodePorts, LoadBalancer and
//! external IPs, and frontends with session affinity or source ranges are left to the packet
//! path (see docs/datapath.md, "Socket-level balancing").

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Be16, Be32,
    maps::{FrontendKey, SockRev, scope},
    net::proto,
    sock::{self, Connect},
};

use crate::{
    maps::{LB_ADDRS, LB_SERVICES, LB_SOCK_REV},
    select,
};

/// Return values of a `sock_addr` program: carry on with the (possibly rewritten) address, or
/// fail the syscall (with `EPERM`, or the error `bpf_set_retval` set).
const PROCEED: i32 = 1;
const FAIL: i32 = 0;

/// `cgroup/connect4`: see the module comment. Sockets of other protocols and addresses that are
/// not ClusterIPs are left alone (nothing is written).
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`; these fields are readable in
    // `connect4` (the verifier rewrites the loads).
    let (protocol, user_ip4, user_port) =
        unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    if protocol != u32::from(proto::TCP) {
        return PROCEED;
    }
    let addr = Be32::from_raw(user_ip4);
    // SAFETY: hash map value, copied out at once.
    let Some(info) = (unsafe { LB_ADDRS.get(addr) }).copied() else {
        return PROCEED;
    };
    if !info.is_cluster_ip() {
        return PROCEED;
    }
    // The port is in network order in the low 16 bits.
    let key = FrontendKey {
        addr,
        port: Be16::from_raw(user_port as u16),
        proto: proto::TCP,
        scope: scope::INTERNAL,
    };
    // SAFETY: as above.
    let Some(frontend) = (unsafe { LB_SERVICES.get(&key) }).copied() else {
        // A port the ClusterIP does not serve: the packet path rejects it.
        return refuse();
    };
    match sock::on_connect(&frontend) {
        Connect::Leave => PROCEED,
        Connect::Refuse => refuse(),
        Connect::Balance => {
            // SAFETY: the helper reads the context's socket.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let Some((_, backend)) = select::balanced(&frontend, || sock::slot_hash(cookie, &key))
            else {
                // A table or backend missing (the agent writes them before the frontend: only
                // tampering gets here); the packet path drops such a flow.
                return refuse();
            };
            let rev = SockRev {
                frontend_addr: addr,
                backend_addr: backend.addr,
                frontend_port: key.port,
                backend_port: backend.port,
            };
            // Best effort: without the entry, getpeername() shows the backend.
            let _ = LB_SOCK_REV.insert(&cookie, &rev, 0);
            // SAFETY: `user_ip4` and `user_port` are writable in `connect4` (4-byte stores).
            unsafe {
                (*sa).user_ip4 = backend.addr.raw();
                (*sa).user_port = u32::from(backend.port.raw());
            }
            PROCEED
        }
    }
}

/// Fails the `connect()` with `ECONNREFUSED` (see `lb_common::sock::REFUSED_ERRNO`).
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: the helper takes no pointer. (Linux 6.1+ for `sock_addr` programs: the kernel's
    // bed89185af0d, "bpf: Use cgroup_{common,current}_func_proto in more hooks".)
    unsafe { bpf_set_retval(-sock::REFUSED_ERRNO) };
    FAIL
}

/// `cgroup/getpeername4`: a socket `connect4` connected to a backend shows the frontend it asked
/// for, as long as its peer is still that backend. Must return 1 (the verifier allows nothing
/// else here).
#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: hash map value, copied out at once.
    let Some(rev) = (unsafe { LB_SOCK_REV.get(&cookie) }).copied() else {
        return PROCEED;
    };
    // SAFETY: the kernel's `bpf_sock_addr`; these fields are readable and writable in
    // `getpeername4`.
    unsafe {
        if (*sa).user_ip4 == rev.backend_addr.raw()
            && (*sa).user_port as u16 == rev.backend_port.raw()
        {
            (*sa).user_ip4 = rev.frontend_addr.raw();
            (*sa).user_port = u32::from(rev.frontend_port.raw());
        }
    }
    PROCEED
}
