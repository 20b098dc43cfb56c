//! Records of rare events for the agent's log (which ones, and how often: `lb_common::events`),
//! written with aya-log into its ring buffer (`AYA_LOGS`, Linux 5.8+).
//!
//! Two halves, because of the stack. Where such a packet is counted (always a drop or a
//! suppressed answer, never the established or new-flow paths), an inlined function leaves the
//! event in this CPU's slot (`LB_EVENT_SLOT`): a lookup and a few stores, no stack. The
//! program's entry function calls [`flush`] on a drop, after the packet's work has returned; it
//! takes the budget (`LB_EVENTS`) and writes the record, out of line. aya-log builds a record on
//! the stack: inlined into the packet's work, its locals would add to a frame that already takes
//! most of the 512 bytes the verifier allows a call chain; as a call of its own, its frame (64
//! bytes) adds to the entry's only on a drop's path, where the work's deeper calls (the SNAT port
//! scan's `bpf_loop` callback) are not.

use aya_log_ebpf::warn;
use lb_common::{
    Be16, Be32,
    conntrack::{CtEntry, FlowKey},
    events::{self, Event},
    stats::Reason,
};

use crate::{
    ct,
    maps::{LB_EVENT_SLOT, LB_EVENTS},
    parse::Ipv4,
};

/// Leaves the event `event` builds in this CPU's slot for [`flush`]. Nothing more, and in this
/// order: inlined into the packet's work, anything held across a helper call (the slot's lookup,
/// the budget's clock read) costs its frame spill slots.
#[inline(always)]
fn leave(event: impl FnOnce() -> Event) {
    if let Some(slot) = LB_EVENT_SLOT.get_ptr_mut(0) {
        // SAFETY: per-CPU value: only this program run writes it, and its entry function reads
        // it when the run's work is done.
        unsafe {
            *slot = Event {
                pending: 1,
                ..event()
            }
        };
    }
}

#[inline(always)]
fn of_flow(reason: Reason, flow: &FlowKey) -> Event {
    Event {
        reason: reason as u32,
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        ..Event::default()
    }
}

#[inline(always)]
fn of_packet(reason: Reason, ip: &Ipv4) -> Event {
    Event {
        reason: reason as u32,
        src_addr: ip.src,
        dst_addr: ip.dst,
        ip_id: ip.id,
        proto: ip.proto,
        ..Event::default()
    }
}

/// A new flow (`forward`, its entry as it would be recorded) found no free source-NAT port
/// towards its backend.
#[inline(always)]
pub fn snat_ports_exhausted(flow: &FlowKey, forward: &CtEntry) {
    leave(|| Event {
        backend_addr: forward.nat_addr,
        backend_port: forward.nat_port,
        ..of_flow(Reason::DropSnatPorts, flow)
    });
}

/// A new flow (`forward`, its entry) could not be recorded in conntrack.
#[inline(always)]
pub fn conntrack_full(flow: &FlowKey, forward: &CtEntry) {
    leave(|| Event {
        backend_addr: forward.nat_addr,
        backend_port: forward.nat_port,
        ..of_flow(Reason::DropCtFull, flow)
    });
}

/// A new flow's frontend names a backend set whose Maglev table or backend is missing.
#[inline(always)]
pub fn inconsistent_service(flow: &FlowKey, set_id: u32) {
    leave(|| Event {
        set_id,
        ..of_flow(Reason::DropNoTable, flow)
    });
}

/// A later fragment to a ClusterIP arrived without its first fragment's state.
#[inline(always)]
pub fn fragment_without_state(ip: &Ipv4) {
    leave(|| of_packet(Reason::DropFragment, ip));
}

/// An answer (reject, ICMP error) to `ip`'s source was not sent.
#[inline(always)]
pub fn answer_suppressed(ip: &Ipv4) {
    leave(|| of_packet(Reason::AnswerSuppressed, ip));
}

const SNAT_PORTS: u32 = Reason::DropSnatPorts as u32;
const CT_FULL: u32 = Reason::DropCtFull as u32;
const NO_TABLE: u32 = Reason::DropNoTable as u32;
const FRAGMENT: u32 = Reason::DropFragment as u32;
const ANSWER_SUPPRESSED: u32 = Reason::AnswerSuppressed as u32;

/// Writes the record of the event this CPU's program run left, if any. For the programs' entry
/// functions, on a drop (see the module's comment); out of line, so that its locals are not part
/// of the entry's frame.
#[inline(never)]
pub fn flush() {
    let Some(slot) = LB_EVENT_SLOT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value (see `leave`). Read in place rather than copied: this frame sits
    // beside the program's own, within the verifier's 512 bytes for both.
    let event = unsafe { &mut *slot };
    if event.pending == 0 {
        return;
    }
    event.pending = 0;
    let Some(budget) = LB_EVENTS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the map's only value; CPUs race on it, which `events::record` allows for.
    let Some(unrecorded) = events::record(unsafe { &mut *budget }, ct::now()) else {
        return;
    };
    let Event {
        reason,
        set_id,
        src_addr,
        dst_addr,
        backend_addr,
        src_port,
        dst_port,
        backend_port,
        ip_id,
        proto,
        pending: _,
        _pad: _,
    } = *event;
    let (src, dst, backend) = (ip(src_addr), ip(dst_addr), ip(backend_addr));
    let (sport, dport, bport) = (port(src_port), port(dst_port), port(backend_port));
    // aya-log-ebpf 0.2's macros take a context they do not use yet.
    let ctx = &();
    match reason {
        SNAT_PORTS => warn!(
            ctx,
            "{}: new flow {:i}:{} -> {:i}:{} (IP protocol {}) dropped: no free source-NAT port towards backend {:i}:{}; {} events unrecorded since the previous record",
            Reason::DropSnatPorts.name(),
            src,
            sport,
            dst,
            dport,
            proto,
            backend,
            bport,
            unrecorded
        ),
        CT_FULL => warn!(
            ctx,
            "{}: new flow {:i}:{} -> {:i}:{} (IP protocol {}) to backend {:i}:{} dropped: conntrack insert failed; {} events unrecorded since the previous record",
            Reason::DropCtFull.name(),
            src,
            sport,
            dst,
            dport,
            proto,
            backend,
            bport,
            unrecorded
        ),
        NO_TABLE => warn!(
            ctx,
            "{}: new flow {:i}:{} -> {:i}:{} (IP protocol {}) dropped: backend set {} has no Maglev table or active backend for it (until the agent's next sync); {} events unrecorded since the previous record",
            Reason::DropNoTable.name(),
            src,
            sport,
            dst,
            dport,
            proto,
            set_id,
            unrecorded
        ),
        FRAGMENT => warn!(
            ctx,
            "{}: later fragment {:i} -> {:i} (IP protocol {}, id {}) dropped: its first fragment was not seen; {} events unrecorded since the previous record",
            Reason::DropFragment.name(),
            src,
            dst,
            proto,
            port(ip_id),
            unrecorded
        ),
        ANSWER_SUPPRESSED => warn!(
            ctx,
            "{}: no reject or ICMP error sent to {:i} about its packet to {:i} (IP protocol {}): not a unicast source, or over the node's rate of answers; {} events unrecorded since the previous record",
            Reason::AnswerSuppressed.name(),
            src,
            dst,
            proto,
            unrecorded
        ),
        _ => {}
    }
}

#[inline(always)]
fn ip(addr: Be32) -> core::net::Ipv4Addr {
    addr.to_ip()
}

#[inline(always)]
fn port(port: Be16) -> u16 {
    port.to_host()
}
