//! Connection tracking in the datapath: the clock, and the map writes the rules in
//! `lb_common::conntrack` decide on (which entries, when, with which flags and deadline).

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::conntrack::{self, CtEntryOf, FlowKeyOf, ct_flags};

use crate::{family::Family, filters};

/// Monotonic time, coarse (jiffy resolution is plenty for timeouts measured in seconds, and it
/// costs no clock read).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The entry under `key`: the family's conntrack map's, or, while an agent carries the flows of
/// an old conntrack map over, the old map's ([`Family::carried`]).
#[inline(always)]
pub fn find<A: Family>(key: &FlowKeyOf<A>) -> Option<*mut CtEntryOf<A>> {
    if let Some(entry) = A::ct().get_ptr_mut(key) {
        return Some(entry);
    }
    A::carried(key)
}

/// Accounts a packet on an entry, writing it only when the rules say so
/// ([`conntrack::after_packet`]); returns whether it wrote.
#[inline(always)]
pub fn touch<A: Family>(entry: *mut CtEntryOf<A>, l4_proto: u8, seg_flags: u8, now: u64) -> bool {
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
pub fn continues<A: Family>(entry: *const CtEntryOf<A>, seg_flags: u8, now: u64) -> bool {
    // SAFETY: `entry` points into a map value returned by a successful lookup.
    unsafe { (*entry).continues(seg_flags, now) }
}

/// Records both directions of a new flow: `reply` (key and entry) unless the flow already
/// claimed its reply key.
#[inline(always)]
pub fn open<A: Family>(
    forward_key: &FlowKeyOf<A>,
    forward: &CtEntryOf<A>,
    reply: Option<(&FlowKeyOf<A>, &CtEntryOf<A>)>,
) -> Result<(), ()> {
    // Reply first: once the forward entry exists, packets are DNATed and their replies must
    // find their way back.
    if let Some((key, entry)) = reply {
        filters::mark_reply(key);
        A::ct().insert(key, entry, 0).map_err(|_| ())?;
    }
    filters::mark_forward(forward_key);
    A::ct().insert(forward_key, forward, 0).map_err(|_| ())
}

/// Called when a forward entry was written (its TCP state changed, or its deadline moved by a
/// refresh interval): tells the reply entry of the client's FIN or RST and keeps it alive as long
/// as its flow ([`conntrack::after_other_direction`]), and recreates it if the LRU evicted it,
/// with what it knew of the client. Runs at most once per state change or refresh interval per
/// flow.
#[inline(always)]
pub fn refresh_reply<A: Family>(
    forward_key: &FlowKeyOf<A>,
    forward: *const CtEntryOf<A>,
    now: u64,
) {
    // SAFETY: a map value returned by a successful lookup.
    let fwd = unsafe { *forward };
    let key = forward_key.reply_of(&fwd);
    if let Some(reply) = A::ct().get_ptr_mut(&key) {
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
    let entry = CtEntryOf::reply_of(
        forward_key,
        &fwd,
        peer,
        now + conntrack::lifetime(key.proto, lived),
    );
    // Best effort: if this fails, the next refresh tries again. The insert fails rather than
    // take the key from another flow that got it in the meantime.
    filters::mark_reply(&key);
    let _ = A::ct().insert(&key, &entry, BPF_NOEXIST.into());
}

/// Called when a reply entry was written: tells the forward entry of the backend's FIN or RST
/// and keeps it alive as long as its flow, so that it knows when the flow is over (TIME_WAIT
/// rather than an hour after the client's FIN) and that a SYN then opens a new one; and
/// recreates it if the LRU evicted it, so that the client's next packets keep their backend
/// and source port. Runs at most once per state change or refresh interval per flow.
#[inline(always)]
pub fn refresh_forward<A: Family>(reply_key: &FlowKeyOf<A>, reply: *const CtEntryOf<A>, now: u64) {
    // SAFETY: a map value returned by a successful lookup.
    let rep = unsafe { *reply };
    let key = rep.forward_key(reply_key.proto);
    let Some(forward) = A::ct().get_ptr_mut(&key) else {
        let flags = conntrack::peer_flags(rep.flags)
            | conntrack::own_flags(rep.flags)
            | (rep.flags & ct_flags::ESTABLISHED);
        let deadline = now + conntrack::lifetime(key.proto, flags);
        let entry = CtEntryOf::forward_of(reply_key, &rep, flags, deadline);
        // Best effort, as in `refresh_reply`. The insert fails rather than take the key from a
        // flow that got it in the meantime.
        filters::mark_forward(&key);
        let _ = A::ct().insert(&key, &entry, BPF_NOEXIST.into());
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
unsafe fn learn_from_other<A: Family>(
    entry: *mut CtEntryOf<A>,
    l4_proto: u8,
    other_flags: u8,
    now: u64,
) {
    // SAFETY: as the caller promises.
    unsafe {
        let (flags, deadline) =
            conntrack::after_other_direction(&*entry, l4_proto, other_flags, now);
        (*entry).flags = flags;
        (*entry).deadline_ns = deadline;
    }
}
