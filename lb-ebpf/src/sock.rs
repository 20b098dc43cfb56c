//! Socket-level balancing, in the cgroup v2 `sock_addr` hooks: a `connect()` or an unconnected
//! UDP `sendmsg()` to a frontend goes to one of its backends instead (its packets then need no
//! NAT), and `getpeername()` / `recvmsg()` on that socket still show the frontend. The rules are
//! `lb_common::sock`'s; the backend is picked by `select`, as the packet path picks a new flow's.
//!
//! Frontends are looked up in the internal scope: ClusterIPs, and the LoadBalancer IPs,
//! externalIPs and this node's NodePorts as pods and the node reach them (every endpoint,
//! whatever the external policy, as kube-proxy serves traffic from inside the node). Left to the
//! packet path: pods' connected UDP sockets (the packet path moves their flows when a backend
//! goes; the agent closes the node's own, see `lb-agent`'s `udp_sockets`), and affinity or
//! source-range frontends where the client's address is not known yet (a pod's unbound socket).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Be16, Be32,
    maps::{Frontend, FrontendKey, scope},
    net::proto,
    sock::{self, Connect, SockConfig, SockRev, SockRevKey, SockStats},
};

use crate::{
    ct,
    maps::{LB_ADDRS, LB_CONFIG, LB_SERVICES, LB_SOCK_CONFIG, LB_SOCK_REV, LB_SOCK_STATS},
    select,
};

/// Return values of a `sock_addr` program: carry on with the (possibly rewritten) address, or
/// fail the syscall (with `EPERM`, or the error `bpf_set_retval` set).
const PROCEED: i32 = 1;
const FAIL: i32 = 0;

/// Which call a translation serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Connect,
    Sendmsg,
}

/// `cgroup/connect4`: TCP, and UDP from the node's own namespace, see the module comment.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`; `protocol` is readable.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    if protocol != u32::from(proto::TCP) && protocol != u32::from(proto::UDP) {
        return PROCEED;
    }
    translate(ctx, protocol as u8, Call::Connect)
}

/// `cgroup/sendmsg4`: a UDP datagram sent with an address (an unconnected socket). Connected
/// sockets' sends do not come here.
#[inline(always)]
pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `connect4`.
    if unsafe { (*ctx.sock_addr).protocol } != u32::from(proto::UDP) {
        return PROCEED;
    }
    translate(ctx, proto::UDP, Call::Sendmsg)
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, protocol: u8, call: Call) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `user_ip4` and `user_port` are readable in `connect4` and `sendmsg4`.
    let (user_ip4, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let key = FrontendKey {
        addr: Be32::from_raw(user_ip4),
        // The port is in network order in the low 16 bits.
        port: Be16::from_raw(user_port as u16),
        proto: protocol,
        scope: scope::INTERNAL,
    };
    // SAFETY: hash map value, copied out at once.
    let Some(frontend) = (unsafe { LB_SERVICES.get(&key) }).copied() else {
        return unserved(&key);
    };
    let config = LB_SOCK_CONFIG.get(0).copied().unwrap_or_default();
    // SAFETY: the helper reads the context's socket's namespace.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !config.serves(netns)
        || (protocol == proto::UDP && call == Call::Connect && !config.is_host(netns))
    {
        // A pod's connected UDP socket: the packet path serves its flow (see the module comment).
        return PROCEED;
    }
    let client = client_addr(ctx, &config, netns, &frontend);
    match sock::on_connect(&frontend, client) {
        Connect::Leave => PROCEED,
        Connect::Refuse => {
            count(&frontend, |s| s.refused += 1);
            refuse()
        }
        Connect::Balance => balance(ctx, &key, &frontend, client, call),
    }
}

/// No frontend for the destination: a ClusterIP refuses ports it does not serve (as the packet
/// path rejects them); any other address is left alone.
#[inline(always)]
fn unserved(key: &FrontendKey) -> i32 {
    // SAFETY: hash map value, copied out at once.
    match unsafe { LB_ADDRS.get(key.addr) } {
        Some(info) if info.is_cluster_ip() => refuse(),
        _ => PROCEED,
    }
}

/// The client's address where the frontend's rules need it (affinity, source ranges) and the
/// program knows it: the socket's bound address, else the node's for a socket of the node's own
/// namespace (its connections leave from the node's address). `Some(0)` when no rule needs it.
#[inline(always)]
fn client_addr(
    ctx: &SockAddrContext,
    config: &SockConfig,
    netns: u64,
    frontend: &Frontend,
) -> Option<Be32> {
    if frontend.affinity_timeout_s == 0 && !frontend.has_source_ranges() {
        return Some(Be32::from_raw(0));
    }
    // SAFETY: `sk` is always set in `sock_addr` programs and its `src_ip4` is readable.
    let bound = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).src_ip4 };
    if bound != 0 {
        return Some(Be32::from_raw(bound));
    }
    if config.is_host(netns) {
        let node = LB_CONFIG.get(0).map(|c| c.snat_addr)?;
        return (node.raw() != 0).then_some(node);
    }
    None
}

#[inline(always)]
fn balance(
    ctx: &SockAddrContext,
    key: &FrontendKey,
    frontend: &Frontend,
    client: Option<Be32>,
    call: Call,
) -> i32 {
    let client = client.unwrap_or(Be32::from_raw(0));
    if !select::source_allowed(frontend, client) {
        // Refused as the packet path refuses a source outside the ranges.
        return refuse();
    }
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some((_, backend)) =
        select::backend(frontend, client, || sock::slot_hash(cookie, key), ct::now())
    else {
        // A table or backend missing (the agent writes them before the frontend: only
        // tampering gets here); the packet path drops such a flow.
        return refuse();
    };
    let rev_key = SockRevKey {
        cookie,
        backend_addr: backend.addr,
        backend_port: backend.port,
        proto: key.proto,
        _pad: 0,
    };
    let rev = SockRev {
        frontend_addr: key.addr,
        frontend_port: key.port,
        _pad: 0,
    };
    // Every datagram of an unconnected socket comes here: write only what changed. Best
    // effort: without the entry, getpeername() and recvmsg() show the backend.
    // SAFETY: hash map value, compared at once.
    if call == Call::Connect || unsafe { LB_SOCK_REV.get(&rev_key) } != Some(&rev) {
        let _ = LB_SOCK_REV.insert(&rev_key, &rev, 0);
    }
    count(frontend, |s| match call {
        Call::Connect => s.connects += 1,
        Call::Sendmsg => s.datagrams += 1,
    });
    // SAFETY: `user_ip4` and `user_port` are writable in `connect4` and `sendmsg4` (4-byte
    // stores).
    unsafe {
        (*ctx.sock_addr).user_ip4 = backend.addr.raw();
        (*ctx.sock_addr).user_port = u32::from(backend.port.raw());
    }
    PROCEED
}

#[inline(always)]
fn count(frontend: &Frontend, add: impl FnOnce(&mut SockStats)) {
    if let Some(stats) = LB_SOCK_STATS.get_ptr_mut(frontend.set_id) {
        // SAFETY: per-CPU array value: this CPU's copy, no one else writes it while we run.
        add(unsafe { &mut *stats });
    }
}

/// Fails the call with `ECONNREFUSED` (see `lb_common::sock::REFUSED_ERRNO`).
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: the helper takes no pointer. (Linux 6.1+ for `sock_addr` programs: the kernel's
    // bed89185af0d, "bpf: Use cgroup_{common,current}_func_proto in more hooks".)
    unsafe { bpf_set_retval(-sock::REFUSED_ERRNO) };
    FAIL
}

/// `cgroup/getpeername4` and `cgroup/recvmsg4`: a socket whose peer (or datagram's source) is a
/// backend it was connected or sent to instead of a frontend shows the frontend. Must return 1
/// (the verifier allows nothing else in these hooks).
#[inline(always)]
pub fn show_frontend(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's `bpf_sock_addr`; these fields are readable in `getpeername4` and
    // `recvmsg4`.
    let (protocol, user_ip4, user_port) =
        unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let key = SockRevKey {
        // SAFETY: the helper reads the context's socket.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend_addr: Be32::from_raw(user_ip4),
        backend_port: Be16::from_raw(user_port as u16),
        proto: protocol as u8,
        _pad: 0,
    };
    // SAFETY: hash map value, copied out at once.
    if let Some(rev) = unsafe { LB_SOCK_REV.get(&key) }.copied() {
        // SAFETY: `user_ip4` and `user_port` are writable in these hooks.
        unsafe {
            (*sa).user_ip4 = rev.frontend_addr.raw();
            (*sa).user_port = u32::from(rev.frontend_port.raw());
        }
    }
    PROCEED
}
