//! Client -> frontend: find the service, keep established flows on their backend, balance new
//! ones with Maglev, DNAT. The client's address is never touched.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    conntrack::{self, CtEntry, CtEntryOf, FORWARD, FlowKey, FlowKeyOf, ct_flags, nat_flags},
    dsr::DsrOption,
    maps::{AddrInfo, Frontend, FrontendKey, scope as scopes},
    net::proto,
    snat::SnatPort,
    stats::Reason,
};

use crate::{
    ct, direct, dsr, events,
    family::Family,
    fib, filters,
    frame::{Action, Frame},
    hairpin, icmp,
    maps::{LB_ADDRS, LB_SERVICES},
    nat::{self, End},
    parse::{self, Frag, Ipv4, L4},
    reject, select, snat, stats,
};

/// Entry point of the forward path at `scope` (internal for pod interfaces, external for
/// uplinks). Packets to addresses that carry no frontend cost one hash lookup and no write.
#[inline(always)]
pub fn from_client<F: Frame>(frame: &mut F, scope: u8) -> Action {
    let Some(ip) = parse::ipv4(frame) else {
        return Action::Pass;
    };
    // SAFETY: hash map value, copied out at once.
    let Some(addr) = (unsafe { LB_ADDRS.get(ip.dst) }).copied() else {
        if scope == scopes::INTERNAL {
            return direct::from_pod(frame, &ip);
        }
        // Options are rare: only then may it be a DSR flow's first packet, for a backend here.
        if ip.has_options() {
            return dsr::accept(frame, &ip);
        }
        return Action::Pass;
    };
    let len = frame.len();
    balance(frame, &ip, addr, scope, len)
}

#[inline(always)]
pub(crate) fn counted(reason: Reason, len: u32, action: Action) -> Action {
    stats::verdict(reason, len);
    action
}

#[inline(always)]
fn balance<F: Frame>(frame: &mut F, ip: &Ipv4, addr: AddrInfo, scope: u8, len: u32) -> Action {
    let Some(l4_off) = ip.l4_off() else {
        return counted(Reason::DropMalformed, len, Action::Drop);
    };
    if ip.frag() == Frag::Later {
        return crate::fragment::forward(frame, ip, addr, len);
    }
    if ip.proto == proto::ICMP && icmp::is_error(frame, l4_off) {
        if let Some(action) = icmp::towards_frontend(frame, ip, l4_off, len) {
            return action;
        }
        // An error quoting none of our flows: the stack decides.
        return Action::Pass;
    }
    if !proto::balanced(ip.proto) {
        return not_served(frame, ip, None, addr, len);
    }
    let Some(l4) = parse::l4(frame, ip.proto, l4_off) else {
        return counted(Reason::DropMalformed, len, Action::Drop);
    };
    let flow = parse::flow_key(ip, &l4, FORWARD);
    // Replies of flows this node source-NATed come back to its SNAT or hairpin address.
    if addr.is_snat()
        && let Some(action) = snat::reply(frame, ip, &l4, len)
    {
        return action;
    }
    if addr.is_hairpin() {
        return hairpin::reply(frame, ip, &l4, len).unwrap_or(Action::Pass);
    }
    // Neither a flow's nor a frontend's (most of a node's own traffic): no lookup would hit. A
    // ClusterIP carries nothing but its frontends: its flows skip the check.
    if !addr.is_cluster_ip() && !filters::may_be_served(ip.dst, l4.dst_port, ip.proto) {
        return not_served(frame, ip, Some(&l4), addr, len);
    }
    let now = ct::now();

    if let Some(entry) = ct::find(&flow)
        && ct::continues(entry, l4.tcp_flags, now)
    {
        // SAFETY: map value from a successful lookup.
        if fib::left_to_tc::<F>(unsafe { &*entry }) {
            return Action::Pass;
        }
        if ct::touch(entry, ip.proto, l4.tcp_flags, now) {
            ct::refresh_reply(&flow, entry, now);
        }
        // SAFETY: map value from a successful lookup.
        let e = unsafe { *entry };
        // Only flows from outside go by DSR: pods' programs never look.
        let dsr = scope == scopes::EXTERNAL && e.dsr();
        if e.routed() || dsr {
            // Decided once, on this branch alone: the verifier cannot tell that a second test
            // of the same flag would go the same way. A DSR flow keeps its client as source,
            // and a retransmitted SYN carries its frontend again.
            let (src, grow) = if dsr {
                (ip.src, dsr_growth(ip, &l4))
            } else {
                (e.snat_addr, 0)
            };
            let route = match fib::route_grown(frame, ip, src, e.nat_addr, grow, len) {
                Ok(route) => route,
                Err(action) => return action,
            };
            if let Err(action) = established(frame, ip, &l4, &e, len) {
                return action;
            }
            if grow != 0 && dsr::carry(frame, frontend_of(&flow)).is_err() {
                return counted(Reason::DropMalformed, len, Action::Drop);
            }
            return fib::send(frame, route, len);
        }
        if let Err(action) = established(frame, ip, &l4, &e, len) {
            return action;
        }
        return unrouted(frame, &e);
    }

    let key = FrontendKey {
        addr: ip.dst,
        port: l4.dst_port,
        proto: ip.proto,
        scope,
    };
    // A miss from outside on a ClusterIP tries its internal frontend (`external_cluster_ip`).
    // SAFETY: hash map value, copied out at once.
    let frontend = (unsafe { LB_SERVICES.get(&key) }).copied().or_else(|| {
        let internal = key.external_cluster_ip(&addr, &snat::node_config())?;
        // SAFETY: as above.
        (unsafe { LB_SERVICES.get(&internal) }).copied()
    });
    let Some(frontend) = frontend else {
        return not_served(frame, ip, Some(&l4), addr, len);
    };
    new_flow(frame, ip, &l4, &flow, &frontend, scope, now, len)
}

/// The bytes a packet of a DSR flow grows by: the option, on a SYN whose header has room for it
/// (a header with options of its own never opens a DSR flow).
#[inline(always)]
fn dsr_growth(ip: &Ipv4, l4: &L4) -> u16 {
    if ip.has_options() {
        0
    } else {
        dsr::growth(l4.tcp_flags)
    }
}

/// The frontend a DSR flow's first packet carries: what the client addressed.
#[inline(always)]
fn frontend_of(flow: &FlowKey) -> DsrOption {
    DsrOption {
        addr: flow.dst_addr,
        port: flow.dst_port,
    }
}

/// DNAT to the flow's backend (the entry's NAT address), and SNAT to the node for a
/// source-NATed flow.
#[inline(always)]
fn translate<F: Frame, A: Family>(frame: &mut F, l4: &L4, entry: &CtEntryOf<A>) -> Result<(), ()> {
    nat::rewrite(
        frame,
        End::Destination,
        Some(l4),
        entry.nat_addr,
        entry.nat_port,
    )?;
    if entry.snat() {
        nat::rewrite(
            frame,
            End::Source,
            Some(l4),
            entry.snat_addr,
            entry.snat_port,
        )?;
    }
    Ok(())
}

/// Translates a packet of an established flow and counts it.
#[inline(always)]
pub(crate) fn established<F: Frame, A: Family>(
    frame: &mut F,
    ip: &A::Ip,
    l4: &L4,
    entry: &CtEntryOf<A>,
    len: u32,
) -> Result<(), Action> {
    if translate(frame, l4, entry).is_err() {
        return Err(counted(Reason::DropMalformed, len, Action::Drop));
    }
    if A::frag(ip) == Frag::First {
        A::remember_fragment(ip, l4);
    }
    stats::set(entry.set_id, len, false);
    stats::verdict(Reason::Established, len);
    Ok(())
}

/// Where a translated packet of a flow that is not routed here goes: a hairpin flow back into
/// the pod; anything else on through the stack to its (local or remote) backend.
#[inline(always)]
fn unrouted<F: Frame>(frame: &mut F, entry: &CtEntry) -> Action {
    if entry.hairpin() {
        hairpin::bounce(frame)
    } else {
        Action::Pass
    }
}

/// A new flow to a known frontend: pick a backend, record the flow, DNAT (and SNAT when it came
/// from outside and the backend runs on another node, or under `--masquerade-all` for every
/// flow whose frontend does not keep its clients).
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the packet's parsed headers and the flow's state, passed apart to stay in registers"
)]
fn new_flow<F: Frame>(
    frame: &mut F,
    ip: &Ipv4,
    l4: &L4,
    flow: &FlowKey,
    frontend: &Frontend,
    scope: u8,
    now: u64,
    len: u32,
) -> Action {
    // As kube-proxy: a service without endpoints rejects everyone; source ranges only filter
    // who may reach the endpoints it has.
    if frontend.backend_count == 0 {
        return no_backend(frame, ip, l4, frontend, len);
    }
    if !select::source_allowed(frontend, flow.src_addr) {
        return counted(Reason::DropSourceRange, len, Action::Drop);
    }
    let Some((backend_id, backend)) = select::backend(frontend, flow.src_addr, || flow.hash(), now)
    else {
        events::inconsistent_service(flow, frontend.set_id);
        return counted(Reason::DropNoTable, len, Action::Drop);
    };

    let (flags, deadline_ns) = conntrack::initial(ip.proto, l4.tcp_flags, now);
    let mut forward = CtEntry {
        deadline_ns,
        backend_id,
        set_id: frontend.set_id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        ..CtEntry::default()
    };
    let config = snat::node_config();
    // The source the flow goes out with: the hairpin address (a pod balanced to itself), the
    // node's (from outside to another node's backend, or any flow under --masquerade-all:
    // source NAT, and the node routes it), or
    // the client's own, with another port when its own is taken (see `reply_clashes`). `range`
    // is where a port is to be found for it.
    let mut route = fib::Route::NONE;
    let mut routed = false;
    let mut range = None;
    let mut reply_written = false;
    let mut grow = 0;
    let hairpin = lb_common::snat::hairpin_source(flow, &backend, &config);
    // Direct server return: routed to the backend's node with the client's address.
    let dsr = hairpin.is_none()
        && !ip.has_options()
        && lb_common::dsr::applies(scope, frontend, &backend, ip.proto, &config);
    if let Some((addr, port)) = hairpin {
        forward.flags |= ct_flags::SNAT | ct_flags::HAIRPIN;
        forward.snat_addr = addr;
        forward.snat_port = port;
    } else if dsr || lb_common::snat::needed(scope, frontend, &backend, ip.proto, &config) {
        if !dsr && lb_common::snat::routes_to_pod(scope, &backend) {
            forward.nat_flags |= nat_flags::POD_ROUTE;
            if fib::left_to_tc::<F>(&forward) {
                return Action::Pass;
            }
        }
        // The route first: a flow this hook cannot forward is left to the next hook, or
        // answered, before it claims a port or writes any state. One lookup for both kinds of
        // routed flow: the verifier walks each copy of it, ICMP answers and all.
        let src = if dsr {
            grow = dsr_growth(ip, l4);
            ip.src
        } else {
            config.snat_addr
        };
        route = match fib::route_grown(frame, ip, src, backend.addr, grow, len) {
            Ok(route) => route,
            Err(action) => return action,
        };
        routed = true;
        let mut snat = !dsr;
        if dsr {
            forward.nat_flags |= nat_flags::DSR;
            match claim_reply(flow, &forward, now) {
                Claim::Claimed => reply_written = true,
                Claim::Free => {}
                Claim::Clash => {
                    // Another live flow of this client port holds the backend's reply key (see
                    // `Claim::Clash`): source NAT gives this one a key of its own.
                    forward.nat_flags &= !nat_flags::DSR;
                    grow = 0;
                    snat = true;
                }
            }
        }
        if snat {
            forward.flags |= ct_flags::SNAT;
            forward.snat_addr = config.snat_addr;
            range = Some(config);
        }
    } else {
        match claim_reply(flow, &forward, now) {
            Claim::Claimed => reply_written = true,
            Claim::Free => {}
            Claim::Clash => {
                forward.flags |= ct_flags::SNAT;
                forward.nat_flags |= nat_flags::CLIENT_PORT;
                forward.snat_addr = flow.src_addr;
                range = Some(lb_common::snat::client_port_range(flow.src_addr));
            }
        }
    }
    if let Some(range) = range {
        // SCTP keeps its client's port: a range of that one port.
        // The reply entry does not depend on the port: it claims the port it is keyed by.
        let reply = CtEntry::reply_of(flow, &forward, 0, forward.deadline_ns);
        let Some((port, claimed)) = snat::allocate(flow, &backend, &range, now, &reply) else {
            events::snat_ports_exhausted(flow, &forward);
            return counted(Reason::DropSnatPorts, len, Action::Drop);
        };
        forward.snat_port = port;
        reply_written = claimed;
    }
    if let Err(action) = open(
        frame,
        ip,
        l4,
        flow,
        &forward,
        reply_written,
        len,
        Reason::NewFlow,
    ) {
        return action;
    }
    if grow != 0 && dsr::carry(frame, frontend_of(flow)).is_err() {
        return counted(Reason::DropMalformed, len, Action::Drop);
    }
    if routed {
        return fib::send(frame, route, len);
    }
    unrouted(frame, &forward)
}

/// What holds the reply key of a new flow that is not source-NATed (backend -> client).
pub(crate) enum Claim {
    /// Nothing did: this flow's reply entry now does.
    Claimed,
    /// An entry of this same flow (reopened), or of one that is over: written over by `open`.
    Free,
    /// Another live flow of the same client port. Linux gives one local port to connections to
    /// different destinations (a ClusterIP and a LoadBalancer IP of one Service, balanced to
    /// the same backend): as nf_nat does, this flow gets another source port, its client
    /// address kept ([`nat_flags::CLIENT_PORT`]).
    Clash,
}

/// Claims the reply key of the new flow `flow` (entry `forward`) with an insert that fails when
/// the key is held, and says by what.
#[inline(always)]
pub(crate) fn claim_reply<A: Family>(
    flow: &FlowKeyOf<A>,
    forward: &CtEntryOf<A>,
    now: u64,
) -> Claim {
    let key = flow.reply_of(forward);
    let reply = CtEntryOf::reply_of(flow, forward, 0, forward.deadline_ns);
    filters::mark_reply(&key);
    if A::ct().insert(&key, &reply, BPF_NOEXIST.into()).is_ok() {
        return Claim::Claimed;
    }
    // SAFETY: LRU map value, copied out at once.
    let held = unsafe { A::ct().get(&key) }.copied();
    if lb_common::snat::classify(held.as_ref(), flow, now) == SnatPort::Taken {
        Claim::Clash
    } else {
        Claim::Free
    }
}

/// Records a new flow, translates its first packet and counts it under `reason`.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the packet's parsed headers and the flow's state, passed apart to stay in registers"
)]
pub(crate) fn open<F: Frame, A: Family>(
    frame: &mut F,
    ip: &A::Ip,
    l4: &L4,
    flow: &FlowKeyOf<A>,
    forward: &CtEntryOf<A>,
    reply_written: bool,
    len: u32,
    reason: Reason,
) -> Result<(), Action> {
    let reply_key = flow.reply_of(forward);
    let reply = CtEntryOf::reply_of(flow, forward, 0, forward.deadline_ns);
    let reply = (!reply_written).then_some((&reply_key, &reply));
    if ct::open(flow, forward, reply).is_err() {
        A::conntrack_full(flow, forward);
        return Err(counted(Reason::DropCtFull, len, Action::Drop));
    }
    if translate(frame, l4, forward).is_err() {
        return Err(counted(Reason::DropMalformed, len, Action::Drop));
    }
    if A::frag(ip) == Frag::First {
        A::remember_fragment(ip, l4);
    }
    stats::set(forward.set_id, len, true);
    stats::verdict(reason, len);
    Ok(())
}

/// A frontend without a backend: reject (kube-proxy's REJECT), or drop when the service's
/// traffic policy says so.
#[inline(always)]
fn no_backend<F: Frame>(
    frame: &mut F,
    ip: &Ipv4,
    l4: &L4,
    frontend: &Frontend,
    len: u32,
) -> Action {
    if frontend.drop_when_empty() {
        return counted(Reason::DropNoBackend, len, Action::Drop);
    }
    counted(
        Reason::RejectNoBackend,
        len,
        reject::reject(frame, ip, Some(l4), len),
    )
}

/// Addressed to a frontend address but to none of its frontends: a ClusterIP rejects (as
/// kube-proxy does for ports a ClusterIP does not serve); any other address, such as a node
/// address on a port that is no NodePort, belongs to the stack.
#[inline(always)]
fn not_served<F: Frame>(
    frame: &mut F,
    ip: &Ipv4,
    l4: Option<&L4>,
    addr: AddrInfo,
    len: u32,
) -> Action {
    if !addr.is_cluster_ip() {
        return Action::Pass;
    }
    counted(
        Reason::RejectUnknownPort,
        len,
        reject::reject(frame, ip, l4, len),
    )
}
