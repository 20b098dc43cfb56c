//! Forwarding a translated packet straight to its next hop, as a router would (FIB lookup, TTL
//! decremented, MACs rewritten), without a trip through the stack. Used where NAT makes this node
//! the flow's router: source-NATed flows to backends on other nodes, and their replies. The stack
//! could not forward these itself: after SNAT their source is one of the node's own addresses,
//! which Linux drops as a martian on input.
//!
//! The route is looked up before the packet is translated, with the addresses it will have. At
//! tc a next hop whose neighbour entry is missing is no problem (`bpf_redirect_neigh` resolves
//! it). XDP cannot resolve neighbours: it leaves such a packet untouched and untracked, and the
//! tc program behind it on the same interface handles it.

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    bpf_fib_lookup,
};
use lb_common::{Be32, csum, stats::Reason};

use crate::{
    frame::{Action, Frame, ptr_at},
    hdr::{EthHdr, Ipv4Hdr, L3_OFF},
    parse::Ipv4,
    stats,
};

const AF_INET: u8 = 2;

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

/// What to do with a packet about to be translated and forwarded.
pub enum Lookup {
    /// Translate it, then [`send`] it along this route.
    Go(Route),
    /// Leave it as it is: the tc program behind this XDP program handles it.
    Defer,
    /// No route to the destination: drop it.
    NoRoute,
}

/// Looks up the route of `ip` once its addresses are `src` -> `dst`.
#[inline(always)]
pub fn lookup<F: Frame>(frame: &mut F, ip: &Ipv4, src: Be32, dst: Be32) -> Lookup {
    // SAFETY: an all-zero parameter block is valid (plain integers and unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.__bindgen_anon_1.tot_len = ip.tot_len.to_host();
    params.__bindgen_anon_3.ipv4_src = src.raw();
    params.__bindgen_anon_4.ipv4_dst = dst.raw();
    params.ifindex = frame.ingress_ifindex();
    let ret = frame.fib_lookup(&mut params) as u32;
    let resolved = ret == BPF_FIB_LKUP_RET_SUCCESS;
    let unresolved = ret == BPF_FIB_LKUP_RET_NO_NEIGH || ret == BPF_FIB_LKUP_RET_FRAG_NEEDED;
    if !resolved && !unresolved {
        return Lookup::NoRoute;
    }
    if !resolved && !F::RESOLVES_NEIGHBOURS {
        return Lookup::Defer;
    }
    // SAFETY: the kernel filled in the egress interface and, for a gateway route, the gateway as
    // destination (plain integers either way).
    let next_hop = Be32::from_raw(unsafe { params.__bindgen_anon_4.ipv4_dst });
    Lookup::Go(Route {
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
    // SAFETY: bounds-checked by `ptr_at`.
    let (ttl, proto) = unsafe { ((*ip).ttl, (*ip).proto) };
    if ttl <= 1 {
        // A router would answer with ICMP time exceeded; the datapath just drops.
        stats::verdict(Reason::DropNoRoute, len);
        return Action::Drop;
    }
    // SAFETY: bounds-checked by `ptr_at`. TTL and protocol share one checksummed 16-bit word.
    unsafe {
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        (*ip).ttl = ttl - 1;
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
