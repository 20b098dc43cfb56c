//! Reading the maps back into the agent's shadow ([`Programmed`]) when it starts: a restarted or
//! upgraded agent adopts what its predecessor programmed, so its first sync writes only the
//! difference and established flows never notice.
//!
//! The maps name no Kubernetes object, so a backend set is recognised through its frontends:
//! the set id their entries point to is the set's id, and the table digest stored beside them
//! says whether that set's Maglev table was built from the backends the set has now.

use std::{collections::BTreeMap, net::SocketAddrV4};

use ipnet::Ipv4Net;
use lb_common::maps as names;

use crate::{
    maps::{Maps, MapsError},
    model::Desired,
    planner::{Programmed, SetState, table_digest},
};

fn read_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// The shadow of what the maps hold, with backend sets recognised from `desired`.
pub fn adopt(maps: &Maps, desired: &Desired, table_size: u32) -> Result<Programmed, MapsError> {
    let mut programmed = Programmed::default();
    for entry in maps.backends.iter().enumerate() {
        let (id, backend) = (
            entry.0 as u32,
            entry.1.map_err(read_err(names::LB_BACKENDS))?,
        );
        if backend.is_active() {
            programmed.backends.insert(
                SocketAddrV4::new(backend.addr.to_ip(), backend.port.to_host()),
                (id, backend),
            );
        }
    }
    for entry in maps.services.iter() {
        let (key, value) = entry.map_err(read_err(names::LB_SERVICES))?;
        programmed.frontends.insert(key, value);
    }
    for entry in maps.addrs.iter() {
        let (addr, info) = entry.map_err(read_err(names::LB_ADDRS))?;
        programmed.addrs.insert(addr, info);
    }
    for entry in maps.src_ranges.iter() {
        let (key, _) = entry.map_err(read_err(names::LB_SRC_RANGES))?;
        let data = key.data();
        let prefix = key
            .prefix_len()
            .saturating_sub(lb_common::maps::SourceRange::ID_BITS) as u8;
        if let Ok(net) = Ipv4Net::new(data.addr.to_ip(), prefix) {
            programmed
                .ranges
                .entry(data.range_id.to_host())
                .or_default()
                .push(net);
        }
    }
    for nets in programmed.ranges.values_mut() {
        nets.sort_unstable();
    }

    // Backend sets, recognised through their frontends.
    let mut taken: BTreeMap<u32, ()> = BTreeMap::new();
    for (name, members) in &desired.sets {
        let ids: Vec<(u32, u32, u32)> = desired
            .frontends
            .values()
            .filter(|f| &f.set == name)
            .filter_map(|f| programmed.frontends.get(&f.key.map_key()))
            .map(|v| (v.id, v.table_size, v.table_digest))
            .collect();
        let Some(&(id, current_size, digest)) = ids.first() else {
            continue;
        };
        if ids.iter().any(|x| x.0 != id) || taken.contains_key(&id) {
            continue;
        }
        taken.insert(id, ());
        let mut sorted = members.clone();
        sorted.sort_unstable();
        let selectable = sorted.iter().filter(|b| b.selectable()).count();
        let wanted_size = if selectable > 1 { table_size } else { 0 };
        let current = wanted_size == current_size && digest == table_digest(&sorted, current_size);
        programmed.sets.insert(
            name.clone(),
            SetState {
                id,
                // Unknown members force the planner to rewrite the table and frontends.
                members: if current { sorted } else { Vec::new() },
                table_size: current_size,
            },
        );
    }
    // Tables nobody took over: removed after the first sync re-points their frontends.
    for value in programmed.frontends.values() {
        if value.table_size > 0 && !taken.contains_key(&value.id) {
            programmed.orphan_tables.insert(value.id);
        }
    }
    Ok(programmed)
}
