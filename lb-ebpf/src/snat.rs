//! Source NAT of external flows to backends on other nodes (externalTrafficPolicy Cluster): the
//! node's configuration, port allocation over `LB_CT`, and the return of replies. The rules
//! (who needs it, which candidate ports, what a reservation means) are `lb_common::snat`'s.

use lb_common::{
    Be16,
    conntrack::{CtEntry, FlowKey, REPLY},
    maps::{Backend, NodeConfig},
    snat,
    stats::Reason,
};

use crate::{
    ct, fib,
    frame::{Action, Frame},
    maps::{LB_CONFIG, LB_CT},
    nat::{self, End},
    parse::{self, Ipv4, L4},
    stats,
};

/// The node's configuration (all zero, so no SNAT and no hairpin address, when unset).
#[inline(always)]
pub fn node_config() -> NodeConfig {
    LB_CONFIG.get(0).copied().unwrap_or_default()
}

/// The node port for the new flow `flow` to `backend` ([`snat::allocate`] over `LB_CT`);
/// `None` when the node cannot source-NAT or live flows hold every candidate.
#[inline(always)]
pub fn allocate(flow: &FlowKey, backend: &Backend, config: &NodeConfig, now: u64) -> Option<Be16> {
    if !config.snat_configured() {
        return None;
    }
    // SAFETY: LRU map value, copied out at once.
    let choice = snat::allocate(flow, backend, config, now, |key| unsafe {
        LB_CT.get(key).copied()
    })?;
    Some(Be16::from_host(choice.port))
}

/// A packet to the node's SNAT address: the reply of a SNATed flow gets its frontend back as
/// source and its client as destination, and goes straight back out. `None` when it is no such
/// reply (the caller goes on as for any packet to a node address).
#[inline(always)]
pub fn reply<F: Frame>(frame: &mut F, ip: &Ipv4, l4: &L4, len: u32) -> Option<Action> {
    if !snat::is_reply_to(&node_config(), ip.dst, l4.dst_port) {
        return None;
    }
    let key = parse::flow_key(ip, l4, REPLY);
    let entry = LB_CT.get_ptr_mut(&key)?;
    let now = ct::now();
    // SAFETY: map value from a successful lookup.
    let e = unsafe { *entry };
    if !e.routed() || !e.live(now) {
        return None;
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
    stats::set(e.set_id, len, false);
    stats::verdict(Reason::ReplyNat, len);
    Ok(())
}
