//! IPv4 fragments. Only the first fragment carries the L4 ports, so the datapath remembers them
//! per datagram (source, destination, IP id, protocol) and translates later fragments like their
//! first one. Later fragments that arrive before their first one cannot be translated: towards a
//! ClusterIP they are dropped (forwarding them untranslated would send them nowhere useful);
//! elsewhere, node addresses included (they may be the stack's own fragments), they pass
//! untouched.

use lb_common::{
    conntrack::{FORWARD, FlowKey, REPLY},
    maps::{AddrInfo, FragEntry, FragKey},
    stats::Reason,
};

use crate::{
    ct, events, fib,
    frame::{Action, Frame},
    hairpin,
    maps::{LB_CT, LB_FRAGS},
    nat::{self, End},
    parse::{Ipv4, L4},
    stats,
};

#[inline(always)]
fn key(ip: &Ipv4) -> FragKey {
    FragKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        ip_id: ip.id,
        proto: ip.proto,
        _pad: 0,
    }
}

/// Remembers the ports of a first fragment that was just translated.
#[inline(always)]
pub fn remember(ip: &Ipv4, l4: &L4) {
    let ports = FragEntry {
        src_port: l4.src_port,
        dst_port: l4.dst_port,
    };
    // Best effort: a failed insert only means the later fragments cannot follow.
    let _ = LB_FRAGS.insert(&key(ip), &ports, 0);
}

#[inline(always)]
fn flow(ip: &Ipv4, dir: u8) -> Option<FlowKey> {
    // SAFETY: LRU map value, copied out at once.
    let ports = unsafe { *LB_FRAGS.get(&key(ip))? };
    Some(FlowKey::new(
        ip.src,
        ports.src_port,
        ip.dst,
        ports.dst_port,
        ip.proto,
        dir,
    ))
}

/// A later fragment addressed to a frontend address (`addr`): a ClusterIP drops one it cannot
/// translate rather than pass it. Fragments of flows this node source-NATed go where their
/// first fragment went (routed to the backend's node, or bounced back into a hairpin pod):
/// passed to the stack with one of its own addresses as source, they would be dropped.
#[inline(always)]
pub fn forward<F: Frame>(frame: &mut F, ip: &Ipv4, addr: AddrInfo, len: u32) -> Action {
    // The replies of such flows come back to the node's SNAT or hairpin address.
    if (addr.is_snat() || addr.is_hairpin())
        && let Some(action) = reply_to_source_nat(frame, ip, len)
    {
        return action;
    }
    let entry = flow(ip, FORWARD).and_then(|key| {
        let entry = LB_CT.get_ptr_mut(&key)?;
        // SAFETY: map value from a successful lookup.
        ct::continues(entry, 0, ct::now()).then(|| unsafe { *entry })
    });
    let Some(entry) = entry else {
        if !addr.is_cluster_ip() {
            return Action::Pass;
        }
        events::fragment_without_state(ip);
        stats::verdict(Reason::DropFragment, len);
        return Action::Drop;
    };
    // The route first: a fragment this hook cannot forward goes on untouched.
    let mut route = fib::Route::NONE;
    if fib::left_to_tc::<F>(&entry) {
        return Action::Pass;
    }
    if entry.routed() {
        route = match fib::route(frame, ip, entry.snat_addr, entry.nat_addr, len) {
            Ok(route) => route,
            Err(action) => return action,
        };
    }
    let mut rewritten = nat::rewrite(
        frame,
        End::Destination,
        None,
        entry.nat_addr,
        entry.nat_port,
    )
    .is_ok();
    if entry.snat() {
        rewritten &=
            nat::rewrite(frame, End::Source, None, entry.snat_addr, entry.snat_port).is_ok();
    }
    if !rewritten {
        stats::verdict(Reason::DropMalformed, len);
        return Action::Drop;
    }
    stats::set(entry.set_id, len, false);
    stats::verdict(Reason::FragmentNat, len);
    if entry.routed() {
        fib::send(frame, route, len)
    } else if entry.hairpin() {
        hairpin::bounce(frame)
    } else {
        Action::Pass
    }
}

/// A later fragment of the reply of a flow this node source-NATed (to its SNAT address or the
/// hairpin address), whose first fragment `snat::translate_reply` remembered: the frontend
/// restored as source and the client as destination, then sent where the first went. `None`
/// when it is no such fragment.
#[inline(always)]
fn reply_to_source_nat<F: Frame>(frame: &mut F, ip: &Ipv4, len: u32) -> Option<Action> {
    let key = flow(ip, REPLY)?;
    // SAFETY: LRU map value, copied out at once.
    let entry = unsafe { *LB_CT.get(&key)? };
    if !(entry.routed() || entry.hairpin()) || !entry.live(ct::now()) {
        return None;
    }
    let mut route = fib::Route::NONE;
    if fib::left_to_tc::<F>(&entry) {
        return Some(Action::Pass);
    }
    if entry.routed() {
        route = match fib::route(frame, ip, entry.nat_addr, entry.snat_addr, len) {
            Ok(route) => route,
            Err(action) => return Some(action),
        };
    }
    let rewritten = nat::rewrite(frame, End::Source, None, entry.nat_addr, entry.nat_port).is_ok()
        && nat::rewrite(
            frame,
            End::Destination,
            None,
            entry.snat_addr,
            entry.snat_port,
        )
        .is_ok();
    if !rewritten {
        stats::verdict(Reason::DropMalformed, len);
        return Some(Action::Drop);
    }
    stats::set(entry.set_id, len, false);
    stats::verdict(Reason::FragmentNat, len);
    Some(if entry.routed() {
        fib::send(frame, route, len)
    } else {
        hairpin::bounce(frame)
    })
}

/// A later fragment on the reply path: translated if its first fragment was, else untouched.
#[inline(always)]
pub fn reply<F: Frame>(frame: &mut F, ip: &Ipv4, len: u32) -> Action {
    let Some(key) = flow(ip, REPLY) else {
        return Action::Pass;
    };
    // SAFETY: LRU map value, copied out at once.
    let Some(entry) = (unsafe { LB_CT.get(&key) }).copied() else {
        return Action::Pass;
    };
    if !entry.live(ct::now()) {
        return Action::Pass;
    }
    if nat::rewrite(frame, End::Source, None, entry.nat_addr, entry.nat_port).is_err() {
        return Action::Pass;
    }
    stats::set(entry.set_id, len, false);
    stats::verdict(Reason::FragmentNat, len);
    Action::Pass
}
