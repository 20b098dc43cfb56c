//! The reply-source filter's userspace side (`lb_common::reply_sources`).
//!
//! The programs mark the source of every reply entry they write, but programs that do not mark
//! may have written conntrack too: those of a version before the filter, or of one an operator
//! went back to for a while. So an agent withdraws the filter ([`suspend`]) before it attaches
//! its programs, and once no other program writes conntrack any more, marks the source of every
//! reply entry there and puts the filter back ([`complete`]). In between, the programs look
//! every packet up, as without the filter. A datapath loaded without pins starts with an empty
//! conntrack map, so its filter is complete from the start.

use std::collections::BTreeSet;

use lb_common::{
    Be16, Be32,
    conntrack::{FlowKey, REPLY},
    maps as names,
    reply_sources::{COMPLETE, ENTRIES, SLOTS, slot, slot_of},
};

use crate::{
    maps::{Maps, MapsError},
    predict::found,
};

/// Withdraws the filter: until [`complete`], the programs look up every packet.
pub fn suspend(maps: &mut Maps) -> Result<(), MapsError> {
    set(maps, COMPLETE, 0)
}

/// Marks the source of every reply entry in conntrack, then puts the filter back; returns how
/// many slots it marked. Call it once every program that writes conntrack is one that marks.
pub fn complete(maps: &mut Maps) -> Result<usize, MapsError> {
    let mut slots = BTreeSet::new();
    maps.conntrack_keys(|key| {
        if key.dir == REPLY {
            slots.insert(slot_of(&key));
        }
    })?;
    for &slot in &slots {
        set(maps, slot, 1)?;
    }
    set(maps, COMPLETE, 1)?;
    Ok(slots.len())
}

/// Marks the source of reply entry `key`, as the programs do before they write one: for
/// entries written from userspace.
pub fn mark(maps: &mut Maps, key: &FlowKey) -> Result<(), MapsError> {
    set(maps, slot_of(key), 1)
}

/// What the filter holds: whether it is complete, and how many of its slots are marked.
pub fn state(maps: &Maps) -> Result<(bool, usize), MapsError> {
    let elements = maps.reply_source_elements()?;
    let complete = elements.get(COMPLETE as usize).is_some_and(|c| *c != 0);
    let marked = elements
        .iter()
        .take(SLOTS as usize)
        .filter(|m| **m != 0)
        .count();
    Ok((complete, marked))
}

/// Whether the programs look a packet from `addr:port` up as a possible reply
/// (`reply_sources::may_be_reply` in the datapath).
pub fn may_be_reply(maps: &Maps, addr: Be32, port: Be16, proto: u8) -> Result<bool, MapsError> {
    Ok(get(maps, COMPLETE)? == 0 || get(maps, slot(addr, port, proto))? != 0)
}

fn get(maps: &Maps, index: u32) -> Result<u8, MapsError> {
    debug_assert!(index < ENTRIES);
    Ok(found(names::LB_REPLY_SOURCES, maps.reply_sources.get(&index, 0))?.unwrap_or(0))
}

fn set(maps: &mut Maps, index: u32, value: u8) -> Result<(), MapsError> {
    maps.reply_sources
        .set(index, value, 0)
        .map_err(|source| MapsError::Map {
            name: names::LB_REPLY_SOURCES,
            source,
        })
}
