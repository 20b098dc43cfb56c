//! The reply-source filter (`lb_common::reply_sources`): marks written with every reply entry,
//! read before a lookup that only a reply could answer.

use lb_common::{
    Be16, Be32,
    conntrack::FlowKey,
    reply_sources::{COMPLETE, slot, slot_of},
};

use crate::maps::LB_REPLY_SOURCES;

/// Marks the source of the packets reply entry `key` translates; called before the entry is
/// written, so that no packet it translates can meet an unmarked slot.
#[inline(always)]
pub fn mark(key: &FlowKey) {
    if let Some(slot) = LB_REPLY_SOURCES.get_ptr_mut(slot_of(key)) {
        // SAFETY: an array element of its own; a plain byte store, whichever CPU also marks it.
        unsafe { *slot = 1 };
    }
}

/// Whether a packet from `addr:port` may be a reply of a translated flow: false only when the
/// filter is complete and the source's slot unmarked.
#[inline(always)]
pub fn may_be_reply(addr: Be32, port: Be16, proto: u8) -> bool {
    let complete = LB_REPLY_SOURCES.get(COMPLETE).is_some_and(|c| *c != 0);
    !complete
        || LB_REPLY_SOURCES
            .get(slot(addr, port, proto))
            .is_none_or(|marked| *marked != 0)
}
