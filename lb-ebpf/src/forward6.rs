//! IPv6 client -> frontend: `forward`'s logic for IPv6 packets, reached by a tail call from the
//! IPv4 entry programs (`main`). Conntrack, backend selection, the recording of a new flow and
//! its translation are `forward`'s own, generic over the family.
//!
//! What IPv6 serves so far (docs/ipv6.md, step 1): flows whose backend keeps the client's
//! address (pods to ClusterIPs, external clients to backends on this node), balanced by Maglev
//! and tracked both ways. Not yet: source NAT (a flow that needs it is dropped and counted
//! `drop_snat_ports`: the node has no IPv6 source address to give it), session affinity and
//! source ranges (the frontend's Maglev choice stands), hairpin, rejects (a frontend without
//! backends drops), ICMPv6 errors, later fragments and ports a ClusterIP does not serve (all
//! passed to the stack).

use lb_common::{
    Address, Be16, Be128,
    conntrack::{self, CtEntry6, FORWARD, FlowKey6},
    maps::{Frontend, FrontendKey6},
    net::proto,
    stats::Reason,
};

use crate::{
    ct,
    forward::{self, Claim, counted},
    frame::{Action, Frame},
    maps::{LB6_ADDRS, LB6_SERVICES},
    parse::{self, Frag, L4},
    parse6::{self, Ipv6},
    select, snat,
};

/// Entry point of the IPv6 forward path at `scope` (see `forward::from_client`).
#[inline(always)]
pub fn from_client<F: Frame>(frame: &mut F, scope: u8) -> Action {
    let Some(ip) = parse6::ipv6(frame) else {
        return Action::Pass;
    };
    // SAFETY: hash map value, copied out at once.
    if unsafe { LB6_ADDRS.get(ip.dst) }.is_none() {
        return Action::Pass;
    }
    if ip.frag == Frag::Later || !proto::balanced(ip.proto) {
        return Action::Pass;
    }
    let len = frame.len();
    let Some(l4) = parse::l4(frame, ip.proto, ip.l4_off) else {
        return counted(Reason::DropMalformed, len, Action::Drop);
    };
    let flow = parse6::flow_key(&ip, &l4, FORWARD);
    let now = ct::now();
    if let Some(entry) = ct::find(&flow)
        && ct::continues(entry, l4.tcp_flags, now)
    {
        if ct::touch(entry, ip.proto, l4.tcp_flags, now) {
            ct::refresh_reply(&flow, entry, now);
        }
        // SAFETY: map value from a successful lookup; read in place (a copy would take 56 bytes
        // of a stack that 6.1's verifier allows 480 of beside a `memset` call).
        let e = unsafe { &*entry };
        return match forward::established(frame, &ip, &l4, e, len) {
            Ok(()) => Action::Pass,
            Err(action) => action,
        };
    }
    let key = FrontendKey6 {
        addr: ip.dst,
        port: l4.dst_port,
        proto: ip.proto,
        scope,
    };
    // SAFETY: hash map value, copied out at once.
    let Some(frontend) = (unsafe { LB6_SERVICES.get(&key) }).copied() else {
        return Action::Pass;
    };
    new_flow(frame, &ip, &l4, &flow, &frontend, scope, now, len)
}

/// A new flow to a known frontend: pick a backend, record the flow both ways, DNAT.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the packet's parsed headers and the flow's state, passed apart to stay in registers"
)]
fn new_flow<F: Frame>(
    frame: &mut F,
    ip: &Ipv6,
    l4: &L4,
    flow: &FlowKey6,
    frontend: &Frontend,
    scope: u8,
    now: u64,
    len: u32,
) -> Action {
    if frontend.backend_count == 0 {
        return counted(Reason::DropNoBackend, len, Action::Drop);
    }
    let Some((backend_id, backend)) = select::balanced(frontend, || flow.hash()) else {
        return counted(Reason::DropNoTable, len, Action::Drop);
    };
    if lb_common::snat::needed(scope, frontend, &backend, ip.proto, &snat::node_config()) {
        return counted(Reason::DropSnatPorts, len, Action::Drop);
    }
    let (flags, deadline_ns) = conntrack::initial(ip.proto, l4.tcp_flags, now);
    // Every field written out: `..Default::default()` would zero the entry with a call to
    // `memset`, a subprogram whose frame 6.1's verifier adds to this one's.
    let forward = CtEntry6 {
        deadline_ns,
        backend_id,
        set_id: frontend.set_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        nat_flags: 0,
        snat_addr: Be128::ZERO,
        snat_port: Be16::from_raw(0),
        _pad2: [0; 2],
    };
    let reply_written = match forward::claim_reply(flow, &forward, now) {
        Claim::Claimed => true,
        Claim::Free => false,
        // Another live flow of this client port holds the backend's reply key; IPv4 gives
        // this one another source port, which needs IPv6 source NAT.
        Claim::Clash => return counted(Reason::DropSnatPorts, len, Action::Drop),
    };
    match forward::open(
        frame,
        ip,
        l4,
        flow,
        &forward,
        reply_written,
        len,
        Reason::NewFlow,
    ) {
        Ok(()) => Action::Pass,
        Err(action) => action,
    }
}
