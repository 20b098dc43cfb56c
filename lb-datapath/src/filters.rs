//! The filters' userspace side (`lb_common::filters`).
//!
//! The writer marks every frontend before it writes it ([`mark_frontends`]), and the programs
//! mark every conntrack entry they write; but programs and agents that do not mark may have
//! written the maps too: those of a version before the filters, or of one an operator went back
//! to for a while. So an agent withdraws the filters ([`suspend`]) before it attaches its
//! programs, and once no other program writes conntrack any more, marks every frontend and
//! every conntrack entry there and puts the filters back ([`complete`]). In between, the
//! programs look every packet up, as without them. A datapath loaded without pins starts with
//! empty maps, so its filters are complete from the start.

use std::collections::BTreeSet;

use lb_common::{
    Address, Be16, Be32,
    conntrack::{FlowKey, REPLY},
    filters::{
        COMPLETE, ENTRIES, SLOTS, destination, destination_of, frontend, reply_source,
        reply_source_of,
    },
    maps::{self as names},
};

use crate::{
    maps::{Maps, MapsError},
    model::AnyFrontendKey,
    predict::found,
};

/// The element a frontend of either family marks: an IPv6 one by its folded address
/// (`lb_common::Address::fold`), as the IPv6 programs look it up.
fn any_frontend(key: &AnyFrontendKey) -> u32 {
    match key {
        AnyFrontendKey::V4(k) => frontend(k),
        AnyFrontendKey::V6(k) => destination(k.addr.fold(), k.port, k.proto),
    }
}

/// Withdraws the filters: until [`complete`], the programs look up every packet.
pub fn suspend(maps: &mut Maps) -> Result<(), MapsError> {
    set(maps, COMPLETE, 0)
}

/// Marks every frontend and every conntrack entry, then puts the filters back; returns how many
/// elements it marked. Call it once every program that writes conntrack is one that marks.
pub fn complete(maps: &mut Maps) -> Result<usize, MapsError> {
    let mut elements = BTreeSet::new();
    maps.conntrack_keys(|key| {
        elements.insert(if key.dir == REPLY {
            reply_source_of(&key)
        } else {
            destination_of(&key)
        });
    })?;
    maps.frontend_keys(|key| {
        elements.insert(frontend(&key));
    })?;
    maps.frontends6(|key, _| {
        elements.insert(any_frontend(&key.into()));
    })?;
    let elements: Vec<u32> = elements.into_iter().collect();
    write_marks(maps, &elements)?;
    set(maps, COMPLETE, 1)?;
    Ok(elements.len())
}

/// Marks `frontends`, before the writer writes them.
pub fn mark_frontends(maps: &mut Maps, frontends: &[AnyFrontendKey]) -> Result<(), MapsError> {
    let elements: BTreeSet<u32> = frontends.iter().map(any_frontend).collect();
    write_marks(maps, &elements.into_iter().collect::<Vec<_>>())
}

/// Marks the source of reply entry `key`, as the programs do before they write one: for
/// entries written from userspace.
pub fn mark_reply(maps: &mut Maps, key: &FlowKey) -> Result<(), MapsError> {
    set(maps, reply_source_of(key), 1)
}

/// What the filters hold: whether they are complete, and how many elements of each (reply
/// sources, destinations) are marked, of [`SLOTS`].
pub fn state(maps: &Maps) -> Result<(bool, usize, usize), MapsError> {
    let elements = maps.filter_elements()?;
    let marked = |range: std::ops::Range<u32>| {
        elements
            .get(range.start as usize..range.end as usize)
            .map_or(0, |slots| slots.iter().filter(|m| **m != 0).count())
    };
    let complete = elements.get(COMPLETE as usize).is_some_and(|c| *c != 0);
    Ok((complete, marked(0..SLOTS), marked(SLOTS..2 * SLOTS)))
}

/// Whether the programs look a packet from `addr:port` up as a possible reply
/// (`filters::may_be_reply` in the datapath).
pub fn may_be_reply(maps: &Maps, addr: Be32, port: Be16, proto: u8) -> Result<bool, MapsError> {
    may_be(maps, reply_source(addr, port, proto))
}

/// Whether the programs look a packet to `addr:port` (an address that carries frontends) up as
/// a flow's or a frontend's (`filters::may_be_served` in the datapath).
pub fn may_be_served(maps: &Maps, addr: Be32, port: Be16, proto: u8) -> Result<bool, MapsError> {
    may_be(maps, destination(addr, port, proto))
}

fn may_be(maps: &Maps, element: u32) -> Result<bool, MapsError> {
    Ok(get(maps, COMPLETE)? == 0 || get(maps, element)? != 0)
}

/// Writes 1 to `elements` (one syscall where the kernel can): element by element, so that no
/// mark the programs make meanwhile is undone.
fn write_marks(maps: &mut Maps, elements: &[u32]) -> Result<(), MapsError> {
    let ones = vec![1u8; elements.len()];
    if !maps.update_batch(names::LB_FILTERS, elements, &ones)? {
        for &element in elements {
            set(maps, element, 1)?;
        }
    }
    Ok(())
}

fn get(maps: &Maps, element: u32) -> Result<u8, MapsError> {
    debug_assert!(element < ENTRIES);
    Ok(found(names::LB_FILTERS, maps.filters.get(&element, 0))?.unwrap_or(0))
}

fn set(maps: &mut Maps, element: u32, value: u8) -> Result<(), MapsError> {
    maps.filters
        .set(element, value, 0)
        .map_err(|source| MapsError::Map {
            name: names::LB_FILTERS,
            source,
        })
}
