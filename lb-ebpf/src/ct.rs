//! Connection tracking in the datapath: lookups, creation and the rules that decide when an
//! entry is written (see `lb_common::conntrack` for the layout and the timeouts).

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    conntrack::{CtEntry, FlowKey, REFRESH_INTERVAL_NS, REPLY, ct_flags, timeout},
    maps::Backend,
    net::proto,
};

use crate::{
    hdr::tcp_flags,
    maps::{LB_BACKENDS, LB_CT},
};

/// Monotonic time, coarse (jiffy resolution is plenty for timeouts measured in seconds, and it
/// costs no clock read).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// How long an entry with these flags lives after its last refresh.
#[inline(always)]
fn lifetime(l4_proto: u8, flags: u8) -> u64 {
    if l4_proto != proto::TCP {
        if flags & ct_flags::ESTABLISHED != 0 {
            timeout::UDP_STREAM
        } else {
            timeout::UDP
        }
    } else if flags & (ct_flags::RST | ct_flags::PEER_RST) != 0 {
        timeout::TCP_RST
    } else if ct_flags::closed(flags) {
        timeout::TCP_TIME_WAIT
    } else if flags & (ct_flags::FIN | ct_flags::PEER_FIN) != 0 {
        timeout::TCP_FIN
    } else if flags & ct_flags::ESTABLISHED != 0 {
        timeout::TCP_ESTABLISHED
    } else {
        timeout::TCP_SYN
    }
}

/// A datagram flow's flags after a packet at `now`, its entry's deadline being `deadline`: it
/// becomes a stream when it sends past its first seconds. Until then its entry was last written
/// when it opened (a later refresh only makes it look younger).
#[inline(always)]
fn next_datagram_flags(flags: u8, deadline: u64, now: u64) -> u8 {
    let opened = deadline.saturating_sub(timeout::UDP);
    if flags & ct_flags::ESTABLISHED == 0 && now >= opened + timeout::UDP_STREAM_AFTER {
        flags | ct_flags::ESTABLISHED
    } else {
        flags
    }
}

/// A TCP entry's flags after a segment with `seg_flags` went through.
#[inline(always)]
fn next_tcp_flags(flags: u8, seg_flags: u8) -> u8 {
    let mut next = flags;
    if seg_flags & tcp_flags::SYN == 0 {
        next |= ct_flags::ESTABLISHED;
    }
    if seg_flags & tcp_flags::FIN != 0 && flags & ct_flags::FIN == 0 {
        next |= ct_flags::FIN;
        if flags & ct_flags::PEER_FIN == 0 {
            next |= ct_flags::FIN_FIRST;
        }
    }
    if seg_flags & tcp_flags::RST != 0 {
        next |= ct_flags::RST;
    }
    next
}

/// A fresh entry's flags and deadline for a flow opened by a segment with `seg_flags`.
#[inline(always)]
pub fn initial(l4_proto: u8, seg_flags: u8, now: u64) -> (u8, u64) {
    let flags = if l4_proto == proto::TCP {
        next_tcp_flags(0, seg_flags)
    } else {
        0
    };
    (flags, now + lifetime(l4_proto, flags))
}

/// Accounts a packet on an entry. Writes only when the TCP state changed or the deadline would
/// move by more than the refresh interval; returns whether it wrote.
#[inline(always)]
pub fn touch(entry: *mut CtEntry, l4_proto: u8, seg_flags: u8, now: u64) -> bool {
    // SAFETY: `entry` points into a map value returned by a successful lookup.
    unsafe {
        let flags = (*entry).flags;
        let next = if l4_proto == proto::TCP {
            next_tcp_flags(flags, seg_flags)
        } else {
            next_datagram_flags(flags, (*entry).deadline_ns, now)
        };
        let deadline = now + lifetime(l4_proto, next);
        if next == flags && deadline < (*entry).deadline_ns + REFRESH_INTERVAL_NS {
            return false;
        }
        (*entry).flags = next;
        (*entry).deadline_ns = deadline;
        true
    }
}

/// The backend of an established forward entry, or `None` when the flow must be balanced anew:
/// the entry expired, a TCP SYN reopens a closed flow on the same ports, or the backend is gone
/// (its slot emptied or reused for another address).
#[inline(always)]
pub fn live_backend(entry: *const CtEntry, seg_flags: u8, now: u64) -> Option<Backend> {
    // SAFETY: `entry` points into a map value returned by a successful lookup.
    let e = unsafe { *entry };
    if now >= e.deadline_ns {
        return None;
    }
    let reopening = seg_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
        && e.flags & (ct_flags::FIN | ct_flags::RST) != 0;
    if reopening {
        return None;
    }
    let backend = *LB_BACKENDS.get(e.backend_id)?;
    if !backend.is_active() || backend.addr != e.nat_addr || backend.port != e.nat_port {
        return None;
    }
    Some(backend)
}

/// The reply-direction key of a forward flow (entry `forward`) that was sent to `backend`:
/// replies address the client, or, for a source-NATed flow, the node's SNAT address and port.
#[inline(always)]
pub fn reply_key(forward_key: &FlowKey, forward: &CtEntry, backend: &Backend) -> FlowKey {
    let (dst_addr, dst_port) = if forward.flags & ct_flags::SNAT != 0 {
        (forward.snat_addr, forward.snat_port)
    } else {
        (forward_key.src_addr, forward_key.src_port)
    };
    FlowKey {
        src_addr: backend.addr,
        dst_addr,
        src_port: backend.port,
        dst_port,
        proto: forward_key.proto,
        dir: REPLY,
        _pad: [0; 2],
    }
}

/// Records both directions of a new flow.
#[inline(always)]
pub fn open(
    forward_key: &FlowKey,
    forward: &CtEntry,
    reply_key: &FlowKey,
    reply: &CtEntry,
) -> Result<(), ()> {
    // Reply first: once the forward entry exists, packets are DNATed and their replies must
    // find their way back.
    LB_CT.insert(reply_key, reply, 0).map_err(|_| ())?;
    LB_CT.insert(forward_key, forward, 0).map_err(|_| ())
}

/// The reply-direction entry of a forward flow: it restores the frontend (the forward key's
/// destination) as the source of the backend's replies, and for a source-NATed flow the client
/// as their destination.
#[inline(always)]
pub fn reply_entry(
    forward_key: &FlowKey,
    forward: &CtEntry,
    flags: u8,
    deadline_ns: u64,
) -> CtEntry {
    CtEntry {
        deadline_ns,
        backend_id: forward.backend_id,
        set_id: forward.set_id,
        nat_addr: forward_key.dst_addr,
        nat_port: forward_key.dst_port,
        flags: flags | (forward.flags & (ct_flags::SNAT | ct_flags::HAIRPIN)),
        _pad: 0,
        snat_addr: forward_key.src_addr,
        snat_port: forward_key.src_port,
        _pad2: [0; 2],
    }
}

/// The forward direction's FIN and RST as a reply entry records them.
#[inline(always)]
fn peer_flags(forward_flags: u8) -> u8 {
    let mut peer = 0;
    if forward_flags & ct_flags::FIN != 0 {
        peer |= ct_flags::PEER_FIN;
    }
    if forward_flags & ct_flags::RST != 0 {
        peer |= ct_flags::PEER_RST;
    }
    peer
}

/// Called when a forward entry was written (its TCP state changed, or its deadline moved by a
/// refresh interval): keeps the reply entry alive as long as its flow (a flow whose replies are
/// rare would otherwise outlive them), tells it of the client's FIN or RST, and recreates it if
/// the LRU evicted it. Runs at most once per state change or refresh interval per flow.
#[inline(always)]
pub fn refresh_reply(forward_key: &FlowKey, forward: *const CtEntry, backend: &Backend, now: u64) {
    // SAFETY: a map value returned by a successful lookup.
    let fwd = unsafe { *forward };
    let key = reply_key(forward_key, &fwd, backend);
    if let Some(reply) = LB_CT.get_ptr_mut(&key) {
        // SAFETY: a map value returned by a successful lookup.
        unsafe {
            // A source-NATed flow's port goes to a new flow once this one closed: the entry
            // under the key may be that new flow's, which this one must leave alone.
            if (*reply).snat_addr != forward_key.src_addr
                || (*reply).snat_port != forward_key.src_port
            {
                return;
            }
            let flags = (*reply).flags | peer_flags(fwd.flags);
            let deadline = now + lifetime(key.proto, flags);
            (*reply).flags = flags;
            if deadline > (*reply).deadline_ns || ct_flags::closed(flags) {
                (*reply).deadline_ns = deadline;
            }
        }
        return;
    }
    let entry = reply_entry(forward_key, &fwd, 0, now + lifetime(key.proto, 0));
    // Best effort: if this fails, the next refresh tries again.
    let _ = LB_CT.insert(&key, &entry, 0);
}
