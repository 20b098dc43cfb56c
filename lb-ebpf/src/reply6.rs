//! IPv6 backend -> client: `reply`'s reverse NAT for IPv6 packets, reached by a tail call from
//! the IPv4 entry programs (`main`).

use lb_common::{conntrack::REPLY, net::proto, stats::Reason};

use crate::{
    ct,
    frame::{Action, Frame},
    nat::{self, End},
    parse::{self, Frag},
    parse6, stats,
};

#[inline(always)]
pub fn to_client<F: Frame>(frame: &mut F) -> Action {
    let Some(ip) = parse6::ipv6(frame) else {
        return Action::Pass;
    };
    if ip.frag == Frag::Later || !proto::balanced(ip.proto) {
        return Action::Pass;
    }
    let Some(l4) = parse::l4(frame, ip.proto, ip.l4_off) else {
        return Action::Pass;
    };
    let key = parse6::flow_key(&ip, &l4, REPLY);
    let Some(entry) = ct::find(&key) else {
        return Action::Pass;
    };
    let now = ct::now();
    // SAFETY: map value from a successful lookup.
    let e = unsafe { *entry };
    if !e.live(now) || e.snat() {
        return Action::Pass;
    }
    if ct::touch(entry, ip.proto, l4.tcp_flags, now) {
        ct::refresh_forward(&key, entry, now);
    }
    if nat::rewrite(frame, End::Source, Some(&l4), e.nat_addr, e.nat_port).is_err() {
        return Action::Pass;
    }
    let len = frame.len();
    stats::set(e.set_id, len, false);
    stats::verdict(Reason::ReplyNat, len);
    Action::Pass
}
