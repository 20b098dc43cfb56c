//! Connection tracking in the datapath: the clock, and the map writes the rules in
//! `lb_common::conntrack` decide on (which entries, when, with which flags and deadline).

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::conntrack::{self, CtEntry, FlowKey, ct_flags};

use crate::{
    filters,
    maps::{LB_CT, LB_CT_CARRYING, LB_CT_PREV},
};

/// Monotonic time, coarse (jiffy resolution is plenty for timeouts measured in seconds, and it
/// costs no clock read).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The entry under `key`: `LB_CT`'s, or, while an agent carries the flows of an old conntrack
/// map over (`LB_CT_CARRYING`), the old map's (`LB_CT_PREV`), copied into `LB_CT` first. The old
/// programs keep writing the old map until the new ones are attached on every interface, and
/// the agent's last copy follows: without this, a flow opened by an old program in that window
/// would meet a new one that does not know it (a reply passing untranslated, a client packet
/// balanced anew).
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<*mut CtEntry> {
    if let Some(entry) = LB_CT.get_ptr_mut(key) {
        return Some(entry);
    }
    if !LB_CT_CARRYING.get(0).is_some_and(|on| *on != 0) {
        return None;
    }
    // SAFETY: a map value, passed to the insert in place (no copy on the stack).
    let old = unsafe { &*LB_CT_PREV.get_ptr(key)? };
    // Whatever `LB_CT` got meanwhile is newer.
    let _ = LB_CT.insert(key, old, BPF_NOEXIST.into());
    LB_CT.get_ptr_mut(key)
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

/// Records both directions of a new flow: `reply` (key and entry) unless the flow already
/// claimed its reply key.
#[inline(always)]
pub fn open(
    forward_key: &FlowKey,
    forward: &CtEntry,
    reply: Option<(&FlowKey, &CtEntry)>,
) -> Result<(), ()> {
    // Reply first: once the forward entry exists, packets are DNATed and their replies must
    // find their way back.
    if let Some((key, entry)) = reply {
        filters::mark_reply(key);
        LB_CT.insert(key, entry, 0).map_err(|_| ())?;
    }
    filters::mark_forward(forward_key);
    LB_CT.insert(forward_key, forward, 0).map_err(|_| ())
}

/// Called when a forward entry was written (its TCP state changed, or its deadline moved by a
/// refresh interval): tells the reply entry of the client's FIN or RST and keeps it alive as long
/// as its flow ([`conntrack::after_other_direction`]), and recreates it if the LRU evicted it,
/// with what it knew of the client. Runs at most once per state change or refresh interval per
/// flow.
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
            learn_from_other(reply, key.proto, fwd.flags, now);
        }
        return;
    }
    let peer = conntrack::peer_flags(fwd.flags);
    let lived = peer | (fwd.flags & ct_flags::ESTABLISHED);
    let entry = CtEntry::reply_of(
        forward_key,
        &fwd,
        peer,
        now + conntrack::lifetime(key.proto, lived),
    );
    // Best effort: if this fails, the next refresh tries again. The insert fails rather than
    // take the key from another flow that got it in the meantime.
    filters::mark_reply(&key);
    let _ = LB_CT.insert(&key, &entry, BPF_NOEXIST.into());
}

/// Called when a reply entry was written: tells the forward entry of the backend's FIN or RST
/// and keeps it alive as long as its flow, so that it knows when the flow is over (TIME_WAIT
/// rather than an hour after the client's FIN) and that a SYN then opens a new one; and
/// recreates it if the LRU evicted it, so that the client's next packets keep their backend
/// and source port. Runs at most once per state change or refresh interval per flow.
#[inline(always)]
pub fn refresh_forward(reply_key: &FlowKey, reply: *const CtEntry, now: u64) {
    // SAFETY: a map value returned by a successful lookup.
    let rep = unsafe { *reply };
    let key = rep.forward_key(reply_key.proto);
    let Some(forward) = LB_CT.get_ptr_mut(&key) else {
        let flags = conntrack::peer_flags(rep.flags)
            | conntrack::own_flags(rep.flags)
            | (rep.flags & ct_flags::ESTABLISHED);
        let deadline = now + conntrack::lifetime(key.proto, flags);
        let entry = CtEntry::forward_of(reply_key, &rep, flags, deadline);
        // Best effort, as in `refresh_reply`. The insert fails rather than take the key from a
        // flow that got it in the meantime.
        filters::mark_forward(&key);
        let _ = LB_CT.insert(&key, &entry, BPF_NOEXIST.into());
        return;
    };
    // SAFETY: a map value returned by a successful lookup.
    unsafe {
        // The forward entry under the key may be a newer flow's, with another reply key.
        if key.reply_of(&*forward) != *reply_key {
            return;
        }
        learn_from_other(forward, key.proto, rep.flags, now);
    }
}

/// Writes into `entry` what [`conntrack::after_other_direction`] says it learns from the other
/// direction's flags.
///
/// # Safety
/// `entry` points into a map value returned by a successful lookup.
#[inline(always)]
unsafe fn learn_from_other(entry: *mut CtEntry, l4_proto: u8, other_flags: u8, now: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        let (flags, deadline) =
            conntrack::after_other_direction(&*entry, l4_proto, other_flags, now);
        (*entry).flags = flags;
        (*entry).deadline_ns = deadline;
    }
}
