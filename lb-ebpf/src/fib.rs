//! Forwarding a translated packet straight to its next hop, as a router would (FIB lookup, TTL
//! decremented, MACs rewritten), without a trip through the stack. Used where NAT makes this node
//! the flow's router: source-NATed flows to backends on other nodes, and their replies. The stack
//! could not forward these itself: after SNAT their source is one of the node's own addresses,
//! which Linux drops as a martian on input.
//!
//! The route is looked up before the packet is translated, with the addresses it will have, so
//! that a packet that cannot go is answered or dropped before any state is written:
//!
//! | lookup | XDP | tc |
//! |---|---|---|
//! | success | go, MACs rewritten | go, MACs rewritten |
//! | next hop's MAC unknown | leave it to tc (untouched, untracked) | go, the kernel resolves it (`bpf_redirect_neigh`) |
//! | larger than the egress MTU | leave it to tc | DF: ICMP fragmentation needed with the MTU; else drop (counted) |
//! | TTL would run out | ICMP time exceeded | ICMP time exceeded |
//! | no route (unreachable, blackhole, prohibited...) | drop (counted) | drop (counted) |
//! | a flow routed into a pod's interface (`--masquerade-all`) | leave it to tc, before the lookup | go |
//!
//! The MTU check must be GSO-aware: at tc an skb may be a GSO or GRO packet of up to 64 KiB whose
//! segments each fit. So tc passes no length to the lookup, and the kernel checks the skb itself
//! (`is_skb_forwardable`, which knows GSO); XDP frames are real frames and pass their length.

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    bpf_fib_lookup,
};
use lb_common::{Be32, conntrack::CtEntry, csum, maps::FIB_PARAMS_SIZE, stats::Reason};

use crate::{
    frame::{Action, Frame, ptr_at},
    hdr::{EthHdr, Ipv4Hdr, L3_OFF},
    maps::LB_SCRATCH,
    parse::Ipv4,
    reject, stats,
};

const AF_INET: u8 = 2;

const _: () = assert!(size_of::<bpf_fib_lookup>() == FIB_PARAMS_SIZE);

/// Where a packet leaves. A plain struct rather than an enum on purpose: every field is always
/// written, so that the compiler never leaves a variant's bytes undefined on some path (the
/// verifier then saw a stale spilled pointer where the MAC addresses should be).
#[derive(Clone, Copy)]
pub struct Route {
    pub ifindex: u32,
    /// The next hop's MAC is known (`smac`/`dmac` hold the rewrite); otherwise the packet goes
    /// to `next_hop` out of `ifindex`, resolved by the kernel (tc only).
    pub resolved: bool,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub next_hop: Be32,
}

impl Route {
    /// No route (every field written, see above), for a packet that will not be forwarded.
    pub const NONE: Self = Self {
        ifindex: 0,
        resolved: false,
        smac: [0; 6],
        dmac: [0; 6],
        next_hop: Be32::from_raw(0),
    };
}

/// Whether this hook leaves a packet of the routed flow `entry` to the tc program behind it,
/// untouched: XDP does for a flow the node routes into a pod's interface
/// ([`lb_common::conntrack::nat_flags::POD_ROUTE`], `--masquerade-all`), as a veth takes XDP
/// redirects only when its peer runs an XDP program of its own.
#[inline(always)]
pub fn left_to_tc<F: Frame>(entry: &CtEntry) -> bool {
    !F::RESOLVES_NEIGHBOURS && entry.pod_route()
}

/// The route of `ip` once its addresses are `src` -> `dst`, or what to do with it instead
/// (see the module's table); `len` is the packet's length, for counters.
#[inline(always)]
pub fn route<F: Frame>(
    frame: &mut F,
    ip: &Ipv4,
    src: Be32,
    dst: Be32,
    len: u32,
) -> Result<Route, Action> {
    route_grown(frame, ip, src, dst, 0, len)
}

/// [`route`] for a packet that grows by `grow` bytes before it leaves (a DSR flow's first
/// packet, which gains an IPv4 option). Such a packet is never a GSO packet (a TCP SYN), so its
/// grown length is checked against the egress MTU at tc too, and fragmentation needed names the
/// MTU less `grow`, which is what the sender's packets may be.
#[inline(always)]
pub fn route_grown<F: Frame>(
    frame: &mut F,
    ip: &Ipv4,
    src: Be32,
    dst: Be32,
    grow: u16,
    len: u32,
) -> Result<Route, Action> {
    if ip.ttl <= 1 {
        // A router answers with ICMP time exceeded; nothing is recorded for the flow.
        stats::verdict(Reason::DropTtlExceeded, len);
        return Err(reject::time_exceeded(frame, ip, len));
    }
    // The parameter block lives in the scratch map: 64 bytes the stack cannot spare.
    let Some(scratch) = LB_SCRATCH.get_ptr_mut(0) else {
        stats::verdict(Reason::DropNoRoute, len);
        return Err(Action::Drop);
    };
    // SAFETY: this CPU's scratch entry (see `lb_common::maps::Scratch`), of the size of a
    // parameter block (asserted below), which the lookup owns until it returns.
    let params = unsafe { &mut *(&raw mut (*scratch).fib).cast::<bpf_fib_lookup>() };
    // SAFETY: an all-zero parameter block is valid (plain integers and unions of them).
    *params = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.__bindgen_anon_1.tot_len = if grow == 0 {
        F::fib_tot_len(ip)
    } else {
        ip.tot_len.to_host().saturating_add(grow)
    };
    params.__bindgen_anon_3.ipv4_src = src.raw();
    params.__bindgen_anon_4.ipv4_dst = dst.raw();
    params.ifindex = frame.ingress_ifindex();
    let ret = frame.fib_lookup(params) as u32;
    let resolved = ret == BPF_FIB_LKUP_RET_SUCCESS;
    if ret == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        if !F::RESOLVES_NEIGHBOURS {
            // XDP sees one frame; tc sees the skb and checks it GSO-aware.
            return Err(Action::Pass);
        }
        // SAFETY: on FRAG_NEEDED the kernel wrote the egress MTU over `tot_len`.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result }.saturating_sub(grow);
        stats::verdict(Reason::DropTooBig, len);
        return Err(if ip.dont_fragment() {
            reject::fragmentation_needed(frame, ip, mtu, len)
        } else {
            Action::Drop
        });
    }
    if !resolved && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        stats::verdict(Reason::DropNoRoute, len);
        return Err(Action::Drop);
    }
    if !resolved && !F::RESOLVES_NEIGHBOURS {
        return Err(Action::Pass);
    }
    // SAFETY: on success or a missing neighbour the kernel filled in the egress interface and,
    // for a gateway route, the gateway as destination (plain integers either way).
    let next_hop = Be32::from_raw(unsafe { params.__bindgen_anon_4.ipv4_dst });
    Ok(Route {
        ifindex: params.ifindex,
        resolved,
        smac: params.smac,
        dmac: params.dmac,
        next_hop,
    })
}

/// Sends a translated packet along `route`.
#[inline(always)]
pub fn send<F: Frame>(frame: &mut F, route: Route, len: u32) -> Action {
    let Some(ip) = ptr_at::<F, Ipv4Hdr>(frame, L3_OFF) else {
        return Action::Drop;
    };
    // SAFETY: bounds-checked by `ptr_at`. TTL and protocol share one checksummed 16-bit word;
    // `route` made sure the TTL does not run out.
    unsafe {
        let (ttl, proto) = ((*ip).ttl, (*ip).proto);
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl.wrapping_sub(1), proto]);
        (*ip).ttl = ttl.wrapping_sub(1);
        (*ip).check = csum::replace2((*ip).check, old, new);
    }
    stats::verdict(Reason::Forwarded, len);
    if !route.resolved {
        return Action::RedirectNeigh {
            ifindex: route.ifindex,
            next_hop: route.next_hop,
        };
    }
    let Some(eth) = ptr_at::<F, EthHdr>(frame, 0) else {
        return Action::Drop;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*eth).dst = route.dmac;
        (*eth).src = route.smac;
    }
    if route.ifindex == frame.ingress_ifindex() {
        Action::Bounce
    } else {
        Action::Redirect(route.ifindex)
    }
}
