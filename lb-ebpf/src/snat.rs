//! Source NAT of external flows to backends on other nodes (externalTrafficPolicy Cluster): the
//! node's configuration, port allocation over `LB_CT`, and the return of replies. The rules
//! (who needs it, which candidate ports, what a reservation means) are `lb_common::snat`'s.

use aya_ebpf::{bindings::BPF_NOEXIST, cty::c_void, helpers::generated::bpf_loop};
use lb_common::{
    Be16,
    conntrack::{CtEntry, FlowKey, REPLY},
    maps::{Backend, NodeConfig, snat::PROBES},
    snat,
    stats::Reason,
};

use crate::{
    ct, fib, filters, fragment,
    frame::{Action, Frame},
    maps::{LB_CONFIG, LB_CT, LB_SCRATCH},
    nat::{self, End},
    parse::{self, Frag, Ipv4, L4},
    stats,
};

/// The node's configuration (all zero, so no SNAT and no hairpin address, when unset).
#[inline(always)]
pub fn node_config() -> NodeConfig {
    LB_CONFIG.get(0).copied().unwrap_or_default()
}

/// The port in `config`'s range (the node's SNAT ports, or a client's own when its port is
/// remapped) for the new flow `flow` to `backend` ([`snat::allocate`]'s walk over `LB_CT`), and
/// whether its reply entry `reply` already claims it (it does when the port was free of any
/// entry); `None` when no address is configured or the range is full for that backend. The
/// probes (its home port, then hashed ones) run inline; the scan of the whole range, needed
/// only once live flows hold every probe, runs under `bpf_loop`, which the verifier checks once
/// however long the range. Its state lives in the per-CPU scratch map `LB_SCRATCH` (see
/// [`snat::Scan`]).
#[inline(always)]
pub fn allocate(
    flow: &FlowKey,
    backend: &Backend,
    config: &NodeConfig,
    now: u64,
    reply: &CtEntry,
) -> Option<(Be16, bool)> {
    if !config.snat_configured() {
        return None;
    }
    let scratch = LB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry; a program runs to completion on its CPU before another
    // uses it. Fields are written one by one: no copy of the whole on the stack.
    let scan = unsafe { &mut (*scratch).scan };
    scan.flow = *flow;
    scan.backend = *backend;
    scan.config = *config;
    // SCTP keeps its client's port: a range of that one port (written in place, in the
    // scratch map, rather than copied on the stack).
    snat::keep_client_port(&mut scan.config, flow);
    scan.reply = *reply;
    scan.now = now;
    scan.seeds = snat::Seeds::of(flow, &scan.config);
    scan.walk = snat::Walk::new();
    scan.taken.port = 0;
    for probe in 0..PROBES {
        if let Some(choice) = step(scan, probe) {
            return Some((Be16::from_host(choice.port), choice.absent));
        }
    }
    if let Some(choice) = scan.walk.time_wait() {
        return Some((Be16::from_host(choice.port), false));
    }
    // SAFETY: the callback is a static function; it takes no context (it finds the scan in the
    // scratch map).
    unsafe {
        bpf_loop(
            snat::span(&scan.config),
            scan_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    if scan.taken.port != 0 {
        return Some((Be16::from_host(scan.taken.port), scan.taken.absent));
    }
    scan.walk
        .time_wait()
        .map(|c| (Be16::from_host(c.port), false))
}

/// Walks candidate `probe` of `scan`; the candidate when the flow took it.
#[inline(always)]
fn step(scan: &mut snat::Scan, probe: u32) -> Option<snat::Choice> {
    let snat::Scan {
        flow,
        backend,
        config,
        reply,
        now,
        seeds,
        walk,
        ..
    } = scan;
    walk.step(
        flow,
        backend,
        config,
        *seeds,
        probe,
        *now,
        // SAFETY: LRU map value, copied out at once.
        &mut |key| unsafe { LB_CT.get(key).copied() },
        // A port no entry holds is claimed by inserting the reservation, which fails when
        // another CPU's flow got there first; one held by a flow that is over is written over.
        &mut |key, absent| {
            if !absent {
                return true;
            }
            filters::mark_reply(key);
            LB_CT.insert(key, &*reply, BPF_NOEXIST.into()).is_ok()
        },
    )
}

/// `bpf_loop` callback: scan step `index` (candidate `PROBES + index`); stops the loop once a
/// port is taken.
#[inline(never)]
extern "C" fn scan_step(index: u32, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = LB_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch entry, which `allocate` filled and waits on.
    let scan = unsafe { &mut (*scratch).scan };
    match step(scan, PROBES + index) {
        Some(choice) => {
            scan.taken = choice;
            1
        }
        None => 0,
    }
}

/// A packet to the node's SNAT address: the reply of a SNATed flow gets its frontend back as
/// source and its client as destination, and goes straight back out. `None` when it is no such
/// reply (the caller goes on as for any packet to a node address).
#[inline(always)]
pub fn reply<F: Frame>(frame: &mut F, ip: &Ipv4, l4: &L4, len: u32) -> Option<Action> {
    if !snat::is_reply_to(&node_config(), ip.dst, l4.dst_port, ip.proto) {
        return None;
    }
    let key = parse::flow_key(ip, l4, REPLY);
    let entry = ct::find(&key)?;
    let now = ct::now();
    // SAFETY: map value from a successful lookup.
    let e = unsafe { *entry };
    if !e.routed() || !e.live(now) {
        return None;
    }
    if fib::left_to_tc::<F>(&e) {
        return Some(Action::Pass);
    }
    let route = match fib::route(frame, ip, e.nat_addr, e.snat_addr, len) {
        Ok(route) => route,
        Err(action) => return Some(action),
    };
    if let Err(drop) = translate_reply(frame, entry, &e, ip, l4, len, now) {
        return Some(drop);
    }
    Some(fib::send(frame, route, len))
}

/// The reply of a source-NATed flow (to the node's SNAT address, or a hairpin flow's to the
/// hairpin address) whose live reply entry `entry` (copied in `e`) was found: records the
/// packet in it, gives the packet its frontend as source and the flow's client as destination,
/// and counts it. The caller then sends it on; `Err` is the drop of a packet whose headers
/// could not be rewritten.
#[inline(always)]
pub fn translate_reply<F: Frame>(
    frame: &mut F,
    entry: *mut CtEntry,
    e: &CtEntry,
    ip: &Ipv4,
    l4: &L4,
    len: u32,
    now: u64,
) -> Result<(), Action> {
    if ct::touch(entry, ip.proto, l4.tcp_flags, now) {
        ct::refresh_forward(&parse::flow_key(ip, l4, REPLY), entry, now);
    }
    let rewritten = nat::rewrite(frame, End::Source, Some(l4), e.nat_addr, e.nat_port).is_ok()
        && nat::rewrite(frame, End::Destination, Some(l4), e.snat_addr, e.snat_port).is_ok();
    if !rewritten {
        stats::verdict(Reason::DropMalformed, len);
        return Err(Action::Drop);
    }
    if ip.frag() == Frag::First {
        fragment::remember(ip, l4);
    }
    stats::set(e.set_id, len, false);
    stats::verdict(Reason::ReplyNat, len);
    Ok(())
}
