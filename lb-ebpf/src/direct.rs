//! Pod -> an address that carries no frontend (another pod's, directly): the stack's, untouched,
//! unless its source port clashes with a load-balanced flow of the same client port that was
//! balanced to this same destination. Linux gives one local port to connections to different
//! destinations, so a pod may connect from port p to a ClusterIP (balanced to backend B) and then
//! from p to B itself: both would reach B as one connection, and B's replies to the second would
//! be reverse-NATed as the first's. As nf_nat does, the second gets another source port, its
//! address kept (`lb_common::conntrack::DIRECT`).
//!
//! Until the node has needed that once (`LB_DIRECT_NAT`), such a packet costs a read of that
//! flag, and a new connection's first packet (a bare TCP SYN, any UDP datagram) one conntrack
//! lookup for the clash, none when the destination never sent a translated reply
//! (`filters`); afterwards every packet looks for its flow.

use lb_common::{
    conntrack::{self, CtEntry, FORWARD},
    maps::Backend,
    net::{proto, tcp_flags},
    stats::Reason,
};

use crate::{
    ct, events, filters,
    forward::{self, counted},
    frame::{Action, Frame},
    maps::{LB_CT, LB_DIRECT_NAT},
    parse::{self, Frag, Ipv4},
    snat,
};

#[inline(always)]
pub fn from_pod<F: Frame>(frame: &mut F, ip: &Ipv4) -> Action {
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return Action::Pass;
    }
    // Ports are in the first fragment only: later ones pass as they are (docs/datapath.md).
    if ip.frag() == Frag::Later {
        return Action::Pass;
    }
    let Some(l4_off) = ip.l4_off() else {
        return Action::Pass;
    };
    let Some(l4) = parse::l4(frame, ip.proto, l4_off) else {
        return Action::Pass;
    };
    let opening = ip.proto == proto::UDP || tcp_flags::opens(l4.tcp_flags);
    let remapped_before = LB_DIRECT_NAT.get(0).is_some_and(|seen| *seen != 0);
    if !opening && !remapped_before {
        return Action::Pass;
    }
    let len = frame.len();
    let flow = parse::flow_key(ip, &l4, FORWARD);
    let now = ct::now();
    if remapped_before
        && let Some(entry) = ct::find(&flow)
        // SAFETY: map value from a successful lookup.
        && unsafe { (*entry).direct() }
        && ct::continues(entry, l4.tcp_flags, now)
    {
        if ct::touch(entry, ip.proto, l4.tcp_flags, now) {
            ct::refresh_reply(&flow, entry, now);
        }
        // SAFETY: map value from a successful lookup.
        let e = unsafe { *entry };
        return match forward::established(frame, ip, &l4, &e, len) {
            Ok(()) => Action::Pass,
            Err(action) => action,
        };
    }
    if !opening {
        return Action::Pass;
    }
    // A clash is a reply entry whose source is this destination.
    if !filters::may_be_reply(ip.dst, l4.dst_port, ip.proto) {
        return Action::Pass;
    }
    let (flags, deadline_ns) = conntrack::initial(ip.proto, l4.tcp_flags, now);
    // SAFETY: LRU map value, read at once.
    let clashes = unsafe { LB_CT.get(&flow.reply_as_is()) }
        .is_some_and(|held| conntrack::direct_clashes(held, now));
    if !clashes {
        return Action::Pass;
    }
    let mut forward = CtEntry::direct_forward(&flow, l4.src_port, flags, deadline_ns);
    let destination = Backend {
        addr: flow.dst_addr,
        port: flow.dst_port,
        ..Backend::default()
    };
    let range = lb_common::snat::client_port_range(flow.src_addr);
    // The reply entry does not depend on the port: it claims the port it is keyed by.
    let reply = CtEntry::reply_of(&flow, &forward, 0, deadline_ns);
    let Some((port, claimed)) = snat::allocate(&flow, &destination, &range, now, &reply) else {
        events::snat_ports_exhausted(&flow, &forward);
        return counted(Reason::DropSnatPorts, len, Action::Drop);
    };
    forward.snat_port = port;
    if let Err(action) = forward::open(
        frame,
        ip,
        &l4,
        &flow,
        &forward,
        claimed,
        len,
        Reason::PortRemapped,
    ) {
        return action;
    }
    if let Some(seen) = LB_DIRECT_NAT.get_ptr_mut(0) {
        // SAFETY: array value; a plain store of a constant, whichever CPU wins.
        unsafe { *seen = 1 };
    }
    Action::Pass
}
