//! The load balancer's kernel programs.
//!
//! * `lb_from_pod` (tc ingress of a pod's host-side veth): ClusterIP load balancing for traffic
//!   leaving pods.
//! * `lb_to_pod` (tc egress of a pod's host-side veth): reverse NAT of replies on their way to a
//!   client pod, wherever the backend runs.
//! * `lb_xdp` (XDP on an uplink): the same load-balancing logic for traffic arriving from
//!   outside, plus source NAT towards backends on other nodes and the return of their replies.
//! * `lb_ext_in` (tc ingress of an uplink): `lb_xdp`'s logic where XDP is off or unavailable.
//! * `lb_ext_out` (tc egress of an uplink): reverse NAT of replies from this node's backends to
//!   clients elsewhere (`lb_to_pod`'s logic).
//! * `lb_sock_{connect,sendmsg,recvmsg,getpeername}{4,6}` (cgroup v2 `sock_addr` hooks, attached
//!   only with `lb-agent --socket-lb on|host-only`): socket-level balancing (`sock`); the `6`
//!   ones serve IPv4-mapped addresses on IPv6 sockets.
//! * `lb6_*`: the IPv6 twins of the packet programs, which hand IPv6 packets to them by a tail
//!   call (`forward6`, `reply6`).
//! * `bench_empty_*`: empty programs, the baseline of `cargo xtask bench`.
//!
//! The names are `lb_common::programs`'s; every decision (flow keys, conntrack state, source-NAT
//! ports, ...) is a rule of `lb_common`, which the predictor behind `lbctl trace` calls too.
//! Depends on `lb-common`, `aya-ebpf` and `aya-log-ebpf` (rare events, `events`) only;
//! `lb-datapath` builds and embeds the object.
#![no_std]
#![no_main]
// Register self-moves in inline asm hide packet offsets from LLVM (see `frame::ptr_at`).
#![feature(asm_experimental_arch)]
#![deny(clippy::indexing_slicing)]
// aya-ebpf's map methods take `impl Borrow<K>`: passing references keeps keys and values from
// being copied onto the 512-byte BPF stack again.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose"
)]

mod ct;
mod direct;
mod dsr;
mod events;
mod family;
mod fib;
mod filters;
mod forward;
mod forward6;
mod fragment;
mod frame;
mod hairpin;
mod hdr;
mod icmp;
mod maps;
mod nat;
mod parse;
mod parse6;
mod reject;
mod reply;
mod reply6;
mod select;
mod snat;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::maps::{scope, tail};

use crate::{
    frame::{TcFrame, XdpFrame},
    maps::{LB_TAIL_TC, LB_TAIL_XDP},
};

// Each program's body is inlined into its entry point (`#[inline(always)]`, which the macros
// keep): the verifier allows 512 bytes of stack over the frames of a call chain, the SNAT port
// scan's `bpf_loop` callback is one of them, and a separate frame for the body costs at least 32
// more bytes on older kernels (6.1 rounds each frame up to 32).

// IPv6: each entry program hands an IPv6 packet to its IPv6 twin by a tail call through
// `LB_TAIL_TC` or `LB_TAIL_XDP` (docs/ipv6.md), so that the IPv4 programs keep their own
// instructions, stack and verification. The test costs an IPv4 packet one compare on the
// EtherType, which its own parsing reads next; an IPv6 packet whose tail call fails (its twin not
// loaded) passes untouched.

#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame { ctx };
    if parse6::is_ipv6(&mut frame) {
        // SAFETY: a tail call with our own context; on failure it returns.
        unsafe { LB_TAIL_XDP.tail_call(&frame.ctx, tail::XDP6) };
        return aya_ebpf::bindings::xdp_action::XDP_PASS;
    }
    let verdict = xdp_from_client(frame.ctx);
    if verdict == aya_ebpf::bindings::xdp_action::XDP_DROP {
        events::flush();
    }
    verdict
}

/// Hands an IPv6 packet to the tc twin at `index`; false for a packet that is not IPv6 (or when
/// the tail call failed, in which case the packet passes untouched).
#[inline(always)]
fn tc_ipv6(ctx: &TcContext, index: u32) -> bool {
    let mut frame = TcFrame {
        ctx: TcContext::new(ctx.skb.skb),
    };
    if !parse6::is_ipv6(&mut frame) {
        return false;
    }
    // SAFETY: a tail call with our own context; on failure it returns.
    unsafe { LB_TAIL_TC.tail_call(ctx, index) };
    true
}

#[classifier]
#[inline(always)]
pub fn lb_from_pod(ctx: TcContext) -> i32 {
    if tc_ipv6(&ctx, tail::FROM_POD6) {
        return aya_ebpf::bindings::TC_ACT_UNSPEC;
    }
    let verdict = tc_from_client::<{ scope::INTERNAL }>(ctx);
    if verdict == TC_ACT_SHOT {
        events::flush();
    }
    verdict
}

#[classifier]
#[inline(always)]
pub fn lb_ext_in(ctx: TcContext) -> i32 {
    if tc_ipv6(&ctx, tail::EXT_IN6) {
        return aya_ebpf::bindings::TC_ACT_UNSPEC;
    }
    let verdict = tc_from_client::<{ scope::EXTERNAL }>(ctx);
    if verdict == TC_ACT_SHOT {
        events::flush();
    }
    verdict
}

/// The work of `lb_xdp`, in the entry function's frame (see above); a rare event is recorded
/// after it by `events::flush`, out of line.
#[inline(always)]
fn xdp_from_client(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame { ctx };
    XdpFrame::verdict(forward::from_client(&mut frame, scope::EXTERNAL))
}

/// The work of `lb_from_pod` and `lb_ext_in` (see `xdp_from_client`).
#[inline(always)]
fn tc_from_client<const SCOPE: u8>(ctx: TcContext) -> i32 {
    let mut frame = TcFrame { ctx };
    let action = forward::from_client(&mut frame, SCOPE);
    frame.verdict(action)
}

#[classifier]
#[inline(always)]
pub fn lb_ext_out(ctx: TcContext) -> i32 {
    if tc_ipv6(&ctx, tail::TO_CLIENT6) {
        return aya_ebpf::bindings::TC_ACT_UNSPEC;
    }
    let mut frame = TcFrame { ctx };
    let action = reply::to_client(&mut frame);
    frame.verdict(action)
}

#[classifier]
#[inline(always)]
pub fn lb_to_pod(ctx: TcContext) -> i32 {
    if tc_ipv6(&ctx, tail::TO_CLIENT6) {
        return aya_ebpf::bindings::TC_ACT_UNSPEC;
    }
    let mut frame = TcFrame { ctx };
    let action = reply::to_client(&mut frame);
    frame.verdict(action)
}

/// `lb_xdp`'s IPv6 twin (`LB_TAIL_XDP`, never attached).
#[xdp]
#[inline(always)]
pub fn lb6_xdp(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame { ctx };
    XdpFrame::verdict(forward6::from_client(&mut frame, scope::EXTERNAL))
}

/// `lb_from_pod`'s IPv6 twin (`LB_TAIL_TC`, never attached).
#[classifier]
#[inline(always)]
pub fn lb6_from_pod(ctx: TcContext) -> i32 {
    let mut frame = TcFrame { ctx };
    let action = forward6::from_client(&mut frame, scope::INTERNAL);
    frame.verdict(action)
}

/// `lb_ext_in`'s IPv6 twin (`LB_TAIL_TC`, never attached).
#[classifier]
#[inline(always)]
pub fn lb6_ext_in(ctx: TcContext) -> i32 {
    let mut frame = TcFrame { ctx };
    let action = forward6::from_client(&mut frame, scope::EXTERNAL);
    frame.verdict(action)
}

/// `lb_to_pod`'s and `lb_ext_out`'s IPv6 twin (`LB_TAIL_TC`, never attached).
#[classifier]
#[inline(always)]
pub fn lb6_to_client(ctx: TcContext) -> i32 {
    let mut frame = TcFrame { ctx };
    let action = reply6::to_client(&mut frame);
    frame.verdict(action)
}

#[cgroup_sock_addr(connect4)]
#[inline(always)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
#[inline(always)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::connect::<true>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
#[inline(always)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
#[inline(always)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::sendmsg::<true>(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
#[inline(always)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::show_frontend::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
#[inline(always)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::show_frontend::<true>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
#[inline(always)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::show_frontend::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
#[inline(always)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::show_frontend::<true>(&ctx)
}

/// Benchmark baseline: an XDP program that does nothing, timed the same way as `lb_xdp` so that
/// the harness overhead can be subtracted. Never attached by the agent.
#[xdp]
pub fn bench_empty_xdp(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Benchmark baseline for the tc programs (see `bench_empty_xdp`).
#[classifier]
pub fn bench_empty_tc(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists for the compiler.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
