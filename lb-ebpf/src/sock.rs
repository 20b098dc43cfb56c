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
//!
//! The same programs serve IPv6 sockets given an IPv4-mapped address (`::ffff:a.b.c.d`, what
//! dual-stack runtimes such as Java's do for every IPv4 address): `V6` selects the
//! `bpf_sock_addr` fields a hook reads and writes, a constant, so that each program only touches
//! the fields its attach type may (the verifier refuses `user_ip6` in the IPv4 hooks).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    Be16, Be32,
    maps::{Frontend, FrontendKey, scope},
    net::proto,
    sock::{self, Connect, SockRev, SockRevKey, SockStats},
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

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`) as loaded from memory.
const MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address the call names (raw, network order) and its port (in the low 16 bits, network
/// order): `user_ip4`, or the IPv4 address inside an IPv4-mapped `user_ip6` (`None` for any
/// other IPv6 address).
#[inline(always)]
fn user_addr<const V6: bool>(ctx: &SockAddrContext) -> Option<(u32, u32)> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's `bpf_sock_addr`; `user_ip4` is readable in the IPv4 hooks,
    // `user_ip6` (4-byte loads) in the IPv6 ones, `user_port` in both.
    unsafe {
        if V6 {
            let ip6 = (*sa).user_ip6;
            (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == MAPPED_WORD)
                .then_some((ip6[3], (*sa).user_port))
        } else {
            Some(((*sa).user_ip4, (*sa).user_port))
        }
    }
}

/// Writes the address and port the call goes to (or shows), in the family `user_addr` read.
#[inline(always)]
fn set_user_addr<const V6: bool>(ctx: &SockAddrContext, addr: Be32, port: Be16) {
    let sa = ctx.sock_addr;
    // SAFETY: these fields are writable (4-byte stores) in the hooks that call this.
    unsafe {
        if V6 {
            (*sa).user_ip6[3] = addr.raw();
        } else {
            (*sa).user_ip4 = addr.raw();
        }
        (*sa).user_port = u32::from(port.raw());
    }
}

/// `cgroup/connect4` and `cgroup/connect6`: TCP, and UDP from the node's own namespace, see the
/// module comment.
#[inline(always)]
pub fn connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr`; `protocol` is readable.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
    if protocol != u32::from(proto::TCP) && protocol != u32::from(proto::UDP) {
        return PROCEED;
    }
    translate::<V6>(ctx, protocol as u8, Call::Connect)
}

/// `cgroup/sendmsg4` and `cgroup/sendmsg6`: a UDP datagram sent with an address (an
/// unconnected socket). Connected sockets' sends do not come here.
#[inline(always)]
pub fn sendmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in `connect`.
    if unsafe { (*ctx.sock_addr).protocol } != u32::from(proto::UDP) {
        return PROCEED;
    }
    translate::<V6>(ctx, proto::UDP, Call::Sendmsg)
}

#[inline(always)]
fn translate<const V6: bool>(ctx: &SockAddrContext, protocol: u8, call: Call) -> i32 {
    let Some((user_ip4, user_port)) = user_addr::<V6>(ctx) else {
        return PROCEED;
    };
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
    if config
        .skips(netns, protocol, call == Call::Connect)
        .is_some()
    {
        return PROCEED;
    }
    let client = sock::client_addr(
        &frontend,
        config.is_host(netns),
        // SAFETY: `sk` is always set in `sock_addr` programs and its `src_ip4` is readable (0
        // for an IPv6 socket, whose bound IPv4-mapped address is not looked at).
        || Be32::from_raw(unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).src_ip4 }),
        || LB_CONFIG.get(0).map(|c| c.snat_addr),
    );
    match sock::on_connect(&frontend, client) {
        Connect::Leave => PROCEED,
        Connect::Refuse => {
            count(&frontend, |s| s.refused += 1);
            refuse()
        }
        Connect::Balance => balance::<V6>(ctx, &key, &frontend, client, call),
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

#[inline(always)]
fn balance<const V6: bool>(
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
    set_user_addr::<V6>(ctx, backend.addr, backend.port);
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

/// `cgroup/getpeername4|6` and `cgroup/recvmsg4|6`: a socket whose peer (or datagram's source)
/// is a backend it was connected or sent to instead of a frontend shows the frontend. Must
/// return 1 (the verifier allows nothing else in these hooks).
#[inline(always)]
pub fn show_frontend<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let Some((user_ip4, user_port)) = user_addr::<V6>(ctx) else {
        return PROCEED;
    };
    // SAFETY: the kernel's `bpf_sock_addr`; `protocol` is readable in these hooks.
    let protocol = unsafe { (*ctx.sock_addr).protocol };
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
        set_user_addr::<V6>(ctx, rev.frontend_addr, rev.frontend_port);
    }
    PROCEED
}
