//! Source NAT of external flows to backends on other nodes (externalTrafficPolicy Cluster).
//!
//! Such a flow leaves this node with the node's address and a port chosen here as its source,
//! so that the backend's replies come back through this node, which restores the frontend as
//! their source and the client as their destination. Ports come from a range the agent
//! configures (above the kernel's ephemeral ports and the NodePort range); a port is unique per
//! (backend address, backend port, protocol): the reply conntrack entry keyed by it is the
//! reservation, so a port is never handed out twice while a flow holds it.

use lb_common::{
    Be16, Be32,
    conntrack::{CtEntry, FlowKey, REPLY, SnatPort, ct_flags, snat_port},
    hash::flow_hash,
    maps::{Backend, NodeConfig, snat},
    net::proto,
    stats::Reason,
};

use crate::{
    ct, fib,
    frame::{Action, Frame},
    maps::{LB_CONFIG, LB_CT},
    nat::{self, End},
    parse::{Ipv4, L4},
    stats,
};

/// The node's configuration when it has an SNAT address.
#[inline(always)]
pub fn config() -> Option<NodeConfig> {
    LB_CONFIG
        .get(0)
        .copied()
        .filter(|c| c.snat_addr.raw() != 0 && c.snat_port_max >= c.snat_port_min)
}

/// The key under which replies of a flow SNATed to `node` reach this node.
#[inline(always)]
pub fn reply_key(backend: &Backend, node: (Be32, Be16), l4_proto: u8) -> FlowKey {
    FlowKey {
        src_addr: backend.addr,
        dst_addr: node.0,
        src_port: backend.port,
        dst_port: node.1,
        proto: l4_proto,
        dir: REPLY,
        _pad: [0; 2],
    }
}

/// Chooses the node address and port for a new flow from `flow`'s client to `backend` among a
/// few candidates spread by the flow hash (see `lb_common::conntrack::SnatPort`): the first
/// free one (or the one this same client flow held before it was reopened), else the first one
/// whose backend holds its old flow in TIME_WAIT. `None` when live flows hold them all.
#[inline(always)]
pub fn allocate(
    flow: &FlowKey,
    backend: &Backend,
    cfg: &NodeConfig,
    now: u64,
) -> Option<(Be32, Be16)> {
    let span = (cfg.snat_port_max - cfg.snat_port_min) as u32 + 1;
    let hash = flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    );
    // The first candidate in TIME_WAIT, 0 for none (ports come from a range above 0).
    let mut time_wait = 0u16;
    for probe in 0..snat::PROBES {
        // A large odd step spreads the candidates over the whole range.
        let offset = hash.wrapping_add(probe.wrapping_mul(0x9e37_79b1)) % span;
        let port = cfg.snat_port_min + offset as u16;
        let key = reply_key(backend, (cfg.snat_addr, Be16::from_host(port)), flow.proto);
        // SAFETY: LRU map value, copied out at once.
        let held = unsafe { LB_CT.get(&key) }.copied();
        match snat_port(held.as_ref(), flow, now) {
            SnatPort::Free | SnatPort::Reopened => {
                return Some((cfg.snat_addr, Be16::from_host(port)));
            }
            SnatPort::TimeWait if time_wait == 0 => time_wait = port,
            SnatPort::TimeWait | SnatPort::Taken => {}
        }
    }
    (time_wait != 0).then(|| (cfg.snat_addr, Be16::from_host(time_wait)))
}

/// A packet to the node's SNAT address: the reply of a SNATed flow gets its frontend back as
/// source and its client as destination, and goes straight back out. `None` when it is no such
/// reply (the caller goes on as for any packet to a node address).
#[inline(always)]
pub fn reply<F: Frame>(frame: &mut F, ip: &Ipv4, l4: &L4, len: u32) -> Option<Action> {
    let cfg = config()?;
    let port = l4.dst_port.to_host();
    if port < cfg.snat_port_min || port > cfg.snat_port_max || ip.dst != cfg.snat_addr {
        return None;
    }
    let key = FlowKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: l4.src_port,
        dst_port: l4.dst_port,
        proto: ip.proto,
        dir: REPLY,
        _pad: [0; 2],
    };
    let entry = LB_CT.get_ptr_mut(&key)?;
    let now = ct::now();
    // SAFETY: map value from a successful lookup.
    let e: CtEntry = unsafe { *entry };
    if e.flags & (ct_flags::SNAT | ct_flags::HAIRPIN) != ct_flags::SNAT || now >= e.deadline_ns {
        return None;
    }
    let route = match fib::lookup(frame, ip, e.nat_addr, e.snat_addr) {
        fib::Lookup::Go(route) => route,
        fib::Lookup::Defer => return Some(Action::Pass),
        fib::Lookup::NoRoute => {
            stats::verdict(Reason::DropNoRoute, len);
            return Some(Action::Drop);
        }
    };
    ct::touch(entry, ip.proto, l4.tcp_flags, now);
    let rewritten = nat::rewrite(frame, End::Source, Some(l4), e.nat_addr, e.nat_port).is_ok()
        && nat::rewrite(frame, End::Destination, Some(l4), e.snat_addr, e.snat_port).is_ok();
    if !rewritten {
        stats::verdict(Reason::DropMalformed, len);
        return Some(Action::Drop);
    }
    stats::set(e.set_id, len, false);
    stats::verdict(Reason::ReplyNat, len);
    Some(fib::send(frame, route, len))
}

/// Whether a new flow in `scope` to `backend` must be SNATed: it came from outside and the
/// backend runs on another node. (ICMP never is: only TCP and UDP flows are balanced.)
#[inline(always)]
pub fn needed(scope: u8, backend: &Backend, l4_proto: u8) -> bool {
    scope == lb_common::maps::scope::EXTERNAL
        && backend.flags & lb_common::maps::backend_flags::LOCAL == 0
        && (l4_proto == proto::TCP || l4_proto == proto::UDP)
}
