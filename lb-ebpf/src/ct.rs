//! Connection tracking in the datapath: the clock, and the map writes the rules in
//! `lb_common::conntrack` decide on (which entries, when, with which flags and deadline).

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::conntrack::{self, CtEntry, FlowKey};

use crate::maps::LB_CT;

/// Monotonic time, coarse (jiffy resolution is plenty for timeouts measured in seconds, and it
/// costs no clock read).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Accounts a packet on an entry, writing it only when the rules say so
/// ([`conntrack::after_packet`]); returns whether it wrote.
#[inline(always)]
pub fn touch(entry: *mut CtEntry, l4_proto: u8, seg_flags: u8, now: u64) -> bool {
    // SAFETY: `entry` points into a map value returned by a successful lookup.
    unsafe {
        let Some((flags, deadline)) = conntrack::after_packet(&*entry, l4_proto, seg_flags, now)
        else {
            return false;
        };
        (*entry).flags = flags;
        (*entry).deadline_ns = deadline;
        true
    }
}

/// Whether a packet with TCP flags `seg_flags` continues the established flow of forward entry
/// `entry` ([`CtEntry::continues`]): its translation is the entry's, whatever has become of its
/// backend in the maps since (kube-proxy never flushes TCP conntrack; the agent removes the UDP
/// flows of backends that stop serving).
#[inline(always)]
pub fn continues(entry: *const CtEntry, seg_flags: u8, now: u64) -> bool {
    // SAFETY: `entry` points into a map value returned by a successful lookup.
    unsafe { (*entry).continues(seg_flags, now) }
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

/// Called when a forward entry was written (its TCP state changed, or its deadline moved by a
/// refresh interval): keeps the reply entry alive as long as its flow, tells it of the client's
/// FIN or RST ([`conntrack::reply_after_forward`]), and recreates it if the LRU evicted it. Runs
/// at most once per state change or refresh interval per flow.
#[inline(always)]
pub fn refresh_reply(forward_key: &FlowKey, forward: *const CtEntry, now: u64) {
    // SAFETY: a map value returned by a successful lookup.
    let fwd = unsafe { *forward };
    let key = forward_key.reply_of(&fwd);
    if let Some(reply) = LB_CT.get_ptr_mut(&key) {
        // SAFETY: a map value returned by a successful lookup.
        unsafe {
            if !(*reply).replies_to(forward_key) {
                return;
            }
            let (flags, deadline) =
                conntrack::reply_after_forward(&*reply, key.proto, fwd.flags, now);
            (*reply).flags = flags;
            (*reply).deadline_ns = deadline;
        }
        return;
    }
    let entry = CtEntry::reply_of(
        forward_key,
        &fwd,
        0,
        now + conntrack::lifetime(key.proto, 0),
    );
    // Best effort: if this fails, the next refresh tries again.
    let _ = LB_CT.insert(&key, &entry, 0);
}
