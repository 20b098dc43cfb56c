//! Client -> frontend: find the service, keep established flows on their backend, balance new
//! ones with Maglev, DNAT. The client's address is never touched.

use lb_common::{
    conntrack::{CtEntry, FORWARD, FlowKey},
    maps::{AddrInfo, Service, ServiceKey, addr_flags, service_flags},
    net::proto,
    stats::Reason,
};

use crate::{
    ct, fragment,
    frame::{Action, Frame},
    icmp,
    maps::{LB_ADDRS, LB_CT, LB_SERVICES},
    nat::{self, End},
    parse::{self, Frag, Ipv4, L4},
    reject, select, stats,
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
        return Action::Pass;
    };
    let len = frame.len();
    balance(frame, &ip, addr, scope, len)
}

#[inline(always)]
fn counted(reason: Reason, len: u32, action: Action) -> Action {
    stats::verdict(reason, len);
    action
}

#[inline(always)]
fn balance<F: Frame>(frame: &mut F, ip: &Ipv4, addr: AddrInfo, scope: u8, len: u32) -> Action {
    let Some(l4_off) = ip.l4_off() else {
        return counted(Reason::DropMalformed, len, Action::Drop);
    };
    if ip.frag() == Frag::Later {
        return fragment::forward(frame, ip, len);
    }
    if ip.proto == proto::ICMP && icmp::is_error(frame, l4_off) {
        if let Some(action) = icmp::towards_frontend(frame, l4_off, len) {
            return action;
        }
        // An error quoting none of our flows: the stack decides.
        return Action::Pass;
    }
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return not_served(frame, ip, None, addr, len);
    }
    let Some(l4) = parse::l4(frame, ip.proto, l4_off) else {
        return counted(Reason::DropMalformed, len, Action::Drop);
    };
    let flow = FlowKey {
        src_addr: ip.src,
        dst_addr: ip.dst,
        src_port: l4.src_port,
        dst_port: l4.dst_port,
        proto: ip.proto,
        dir: FORWARD,
        _pad: [0; 2],
    };
    let now = ct::now();

    if let Some(entry) = LB_CT.get_ptr_mut(&flow) {
        if let Some(backend) = ct::live_backend(entry, l4.tcp_flags, now) {
            if ct::touch(entry, ip.proto, l4.tcp_flags, now) {
                ct::refresh_reply(&flow, entry, &backend, now);
            }
            if nat::rewrite(
                frame,
                End::Destination,
                Some(&l4),
                backend.addr,
                backend.port,
            )
            .is_err()
            {
                return counted(Reason::DropMalformed, len, Action::Drop);
            }
            if ip.frag() == Frag::First {
                fragment::remember(ip, &l4);
            }
            // SAFETY: map value from a successful lookup.
            stats::service(unsafe { (*entry).service_id }, len, false);
            return counted(Reason::Established, len, Action::Pass);
        }
    }

    let key = ServiceKey {
        addr: ip.dst,
        port: l4.dst_port,
        proto: ip.proto,
        scope,
    };
    // SAFETY: hash map value, copied out at once.
    let Some(svc) = (unsafe { LB_SERVICES.get(&key) }).copied() else {
        return not_served(frame, ip, Some(&l4), addr, len);
    };
    new_flow(frame, ip, &l4, &flow, &svc, now, len)
}

/// A new flow to a known frontend: pick a backend, record the flow, DNAT.
#[inline(always)]
fn new_flow<F: Frame>(
    frame: &mut F,
    ip: &Ipv4,
    l4: &L4,
    flow: &FlowKey,
    svc: &Service,
    now: u64,
    len: u32,
) -> Action {
    // As kube-proxy: a service without endpoints rejects everyone; source ranges only filter
    // who may reach the endpoints it has.
    if svc.backend_count == 0 {
        return no_backend(frame, ip, l4, svc, len);
    }
    if !select::source_allowed(svc, flow) {
        return counted(Reason::DropSourceRange, len, Action::Drop);
    }
    let Some((backend_id, backend)) = select::backend(svc, flow, now) else {
        return counted(Reason::DropNoTable, len, Action::Drop);
    };

    let (flags, deadline_ns) = ct::initial(ip.proto, l4.tcp_flags, now);
    let forward = CtEntry {
        deadline_ns,
        backend_id,
        service_id: svc.id,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        _pad: 0,
    };
    let reply_key = ct::reply_key(flow, &backend);
    let reply = ct::reply_entry(flow, &forward, 0, deadline_ns);
    if ct::open(flow, &forward, &reply_key, &reply).is_err() {
        return counted(Reason::DropCtFull, len, Action::Drop);
    }
    if nat::rewrite(
        frame,
        End::Destination,
        Some(l4),
        backend.addr,
        backend.port,
    )
    .is_err()
    {
        return counted(Reason::DropMalformed, len, Action::Drop);
    }
    if ip.frag() == Frag::First {
        fragment::remember(ip, l4);
    }
    stats::service(svc.id, len, true);
    counted(Reason::NewFlow, len, Action::Pass)
}

/// A frontend without a backend: reject (kube-proxy's REJECT), or drop when the service's
/// traffic policy says so.
#[inline(always)]
fn no_backend<F: Frame>(frame: &mut F, ip: &Ipv4, l4: &L4, svc: &Service, len: u32) -> Action {
    if svc.flags & service_flags::DROP_WHEN_EMPTY != 0 {
        return counted(Reason::DropNoBackend, len, Action::Drop);
    }
    counted(
        Reason::RejectNoBackend,
        len,
        reject::reject(frame, ip, Some(l4)),
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
    if addr.flags & addr_flags::CLUSTER_IP == 0 {
        return Action::Pass;
    }
    counted(
        Reason::RejectUnknownPort,
        len,
        reject::reject(frame, ip, l4),
    )
}
