//! Backend -> client: restore the frontend as the source of replies (reverse NAT). Runs where
//! replies pass on their way to a client; a packet that is no reply costs one lookup, or none
//! when its source never sent one (`filters`).

use lb_common::{conntrack::REPLY, net::proto, stats::Reason};

use crate::{
    ct, filters, fragment,
    frame::{Action, Frame},
    icmp,
    nat::{self, End},
    parse::{self, Frag},
    stats,
};

#[inline(always)]
pub fn to_client<F: Frame>(frame: &mut F) -> Action {
    let Some(ip) = parse::ipv4(frame) else {
        return Action::Pass;
    };
    let Some(l4_off) = ip.l4_off() else {
        return Action::Pass;
    };
    let len = frame.len();
    if ip.frag() == Frag::Later {
        return fragment::reply(frame, &ip, len);
    }
    if ip.proto == proto::ICMP {
        if icmp::is_error(frame, l4_off) {
            return icmp::towards_client(frame, &ip, l4_off, len);
        }
        return Action::Pass;
    }
    let Some(l4) = parse::l4(frame, ip.proto, l4_off) else {
        return Action::Pass;
    };
    if !filters::may_be_reply(ip.src, l4.src_port, ip.proto) {
        return Action::Pass;
    }
    let key = parse::flow_key(&ip, &l4, REPLY);
    let Some(entry) = ct::find(&key) else {
        return Action::Pass;
    };
    let now = ct::now();
    // SAFETY: map value from a successful lookup.
    let e = unsafe { *entry };
    // Replies of flows source-NATed to the node or the hairpin address are handled where they
    // reach it (`snat::reply`, `hairpin::reply`); a flow whose client kept its address but not
    // its port gets its reply here, like any other.
    if !e.live(now) || (e.snat() && !e.client_port_remapped()) {
        return Action::Pass;
    }
    // A DSR flow's forward half lives on the node that balanced it (`lb_common::dsr`).
    if ct::touch(entry, ip.proto, l4.tcp_flags, now) && !e.dsr() {
        ct::refresh_forward(&key, entry, now);
    }
    if nat::rewrite(frame, End::Source, Some(&l4), e.nat_addr, e.nat_port).is_err() {
        return Action::Pass;
    }
    if e.client_port_remapped()
        && nat::rewrite(frame, End::Destination, Some(&l4), e.snat_addr, e.snat_port).is_err()
    {
        return Action::Pass;
    }
    let set_id = e.set_id;
    if ip.frag() == Frag::First {
        fragment::remember(&ip, &l4);
    }
    stats::set(set_id, len, false);
    stats::verdict(Reason::ReplyNat, len);
    Action::Pass
}
