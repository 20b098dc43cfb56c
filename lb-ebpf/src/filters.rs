//! The filters of `lb_common::filters`: marks written with every reply entry, forward entry
//! and (by the agent) frontend, read before lookups that only a marked packet could satisfy.

use lb_common::{
    Address, Be16, Be32,
    conntrack::FlowKeyOf,
    filters::{COMPLETE, destination, destination_of, reply_source, reply_source_of},
};

use crate::maps::LB_FILTERS;

/// Marks the source of the packets reply entry `key` translates; called before the entry is
/// written, so that no packet it translates can meet an unmarked element.
#[inline(always)]
pub fn mark_reply<A: Address>(key: &FlowKeyOf<A>) {
    mark(reply_source_of(key));
}

/// Marks the destination of forward entry `key`; called before the entry is written.
#[inline(always)]
pub fn mark_forward<A: Address>(key: &FlowKeyOf<A>) {
    mark(destination_of(key));
}

#[inline(always)]
fn mark(element: u32) {
    if let Some(slot) = LB_FILTERS.get_ptr_mut(element) {
        // SAFETY: an array element of its own; plain byte loads and stores, whichever CPU also
        // marks it. Stored only while unmarked: every flow to a busy frontend or from a busy
        // backend marks the same element, and a store would pull its cache line away from
        // every other CPU reading it.
        unsafe {
            if *slot == 0 {
                *slot = 1;
            }
        }
    }
}

/// Whether a packet from `addr:port` may be a reply of a translated flow: false only when the
/// filters are complete and the source's element unmarked.
#[inline(always)]
pub fn may_be_reply(addr: Be32, port: Be16, proto: u8) -> bool {
    may_be(reply_source(addr, port, proto))
}

/// Whether a packet to `addr:port` may belong to a flow or a frontend: false only when the
/// filters are complete and the destination's element unmarked.
#[inline(always)]
pub fn may_be_served(addr: Be32, port: Be16, proto: u8) -> bool {
    may_be(destination(addr, port, proto))
}

#[inline(always)]
fn may_be(element: u32) -> bool {
    let complete = LB_FILTERS.get(COMPLETE).is_some_and(|c| *c != 0);
    !complete || LB_FILTERS.get(element).is_none_or(|marked| *marked != 0)
}
