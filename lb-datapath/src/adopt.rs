//! Reading the maps back into the agent's shadow ([`Programmed`]) when it starts: a restarted or
//! upgraded agent adopts what its predecessor programmed, so its first sync writes only the
//! difference and established flows never notice.
//!
//! The maps name no Kubernetes object, so a backend set is recognised through its frontends:
//! the set id their entries point to is the set's id, and the table digest stored beside them
//! says whether that set's Maglev table was built from the backends the set has now.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::Ipv4Net;
use lb_common::maps::{self as names, AddrInfo, Frontend, addr_flags};

use crate::{
    maps::{Maps, MapsError},
    model::{AnyFrontendKey, Desired, DesiredFrontend, FrontendKind, Members, SetName},
    planner::{
        AddrState, AnyBackend, BackendState, FrontendState, IdAlloc, Limits, Programmed,
        RangeState, SetState, table_digest, table_size,
    },
};

fn read_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// The shadow of what the maps hold, with backend sets recognised from `desired`.
pub fn adopt(maps: &Maps, desired: &Desired, limits: &Limits) -> Result<Programmed, MapsError> {
    let mut programmed = Programmed::default();
    let backends: Vec<(u32, AnyBackend)> = if maps.take_backends_created() {
        Vec::new()
    } else {
        let v4 = maps.active_backends()?.into_iter();
        let v6 = maps.active_backends6()?.into_iter();
        v4.map(|(id, b)| (id, AnyBackend::V4(b)))
            .chain(v6.map(|(id, b)| (id, AnyBackend::V6(b))))
            .collect()
    };
    for (id, value) in backends {
        programmed
            .backends
            .insert(value.addr(), BackendState { id, value, refs: 0 });
    }
    let mut adopt_frontend = |key: AnyFrontendKey, value: Frontend| {
        let claimed = desired.frontends.get(&key);
        programmed.frontends.insert(
            key,
            FrontendState {
                value,
                set: None,
                cluster_ip: claimed.is_some_and(|f| f.kind == FrontendKind::ClusterIp),
            },
        );
    };
    maps.frontends(|key, value| adopt_frontend(key.into(), value))?;
    maps.frontends6(|key, value| adopt_frontend(key.into(), value))?;
    programmed.config = maps.config.get(&0, 0).map_err(read_err(names::LB_CONFIG))?;
    let config = programmed.config;
    let mut adopt_addr = |addr: IpAddr, info: AddrInfo| {
        programmed.addrs.insert(
            addr,
            AddrState {
                info,
                refs: 0,
                cluster_refs: 0,
                node_flags: node_flags(&config, addr),
            },
        );
    };
    maps.frontend_addrs(|addr, info| adopt_addr(addr.to_ip().into(), info))?;
    maps.frontend_addrs6(|addr, info| adopt_addr(addr.to_ip().into(), info))?;
    let mut ranges: BTreeMap<u32, Vec<Ipv4Net>> = BTreeMap::new();
    for entry in maps.src_ranges.iter() {
        let (key, _) = entry.map_err(read_err(names::LB_SRC_RANGES))?;
        let data = key.data();
        let prefix = key
            .prefix_len()
            .saturating_sub(lb_common::maps::SourceRange::ID_BITS) as u8;
        if let Ok(net) = Ipv4Net::new(data.addr.to_ip(), prefix) {
            ranges.entry(data.range_id.to_host()).or_default().push(net);
        }
    }
    for (id, mut nets) in ranges {
        nets.sort_unstable();
        programmed.ranges.insert(id, RangeState { nets, refs: 0 });
    }

    // Backend sets, recognised through their frontends.
    let mut frontends_of: BTreeMap<&SetName, Vec<&DesiredFrontend>> = BTreeMap::new();
    for f in desired.frontends.values() {
        frontends_of.entry(&f.set).or_default().push(f);
    }
    let mut taken = BTreeSet::new();
    for (name, members) in &desired.sets {
        let claims: Vec<(u32, u32, u32)> = frontends_of
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|f| programmed.frontends.get(&f.key))
            .map(|f| (f.value.set_id, f.value.table_size, f.value.table_digest))
            .collect();
        let Some(&(id, current_size, digest)) = claims.first() else {
            continue;
        };
        if claims.iter().any(|c| c.0 != id) || !taken.insert(id) {
            continue;
        }
        let mut sorted = members.to_vec();
        sorted.sort_unstable();
        let current = table_size(&sorted, limits) == current_size
            && digest == table_digest(&sorted, current_size);
        // Members are taken as desired only when the table proves them current; otherwise the
        // planner rewrites the table (its members are unknown).
        let members: Members = if current {
            sorted
                .into_iter()
                .filter(|b| programmed.backends.contains_key(&b.addr))
                .collect()
        } else {
            Members::default()
        };
        programmed.sets.insert(
            name.clone(),
            SetState {
                id,
                members,
                table_size: current_size,
            },
        );
        for f in frontends_of.get(name).into_iter().flatten() {
            if let Some(state) = programmed.frontends.get_mut(&f.key) {
                state.set = Some(name.clone());
            }
        }
    }

    // Reference counts, from what refers to what.
    for set in programmed.sets.values() {
        for b in set.members.iter() {
            if let Some(state) = programmed.backends.get_mut(&b.addr) {
                state.refs += 1;
            }
        }
    }
    for (key, f) in &programmed.frontends {
        if let Some(addr) = programmed.addrs.get_mut(&key.addr()) {
            addr.refs += 1;
            addr.cluster_refs += u32::from(
                f.cluster_ip || (addr.info.flags & addr_flags::CLUSTER_IP != 0 && f.set.is_none()),
            );
        }
        if let Some(range) = programmed.ranges.get_mut(&f.value.source_range_id) {
            range.refs += 1;
        }
    }
    // Tables nobody took over: removed once their frontends are re-pointed.
    for f in programmed.frontends.values() {
        if f.value.table_size > 0 && !taken.contains(&f.value.set_id) {
            programmed.orphan_tables.insert(f.value.set_id);
        }
    }
    // Which sets share another's affinity entries (only adopted sets' entries matter: a set id
    // taken later has its entry written when it is).
    let scopes = maps.affinity_scope_elements()?;
    for set in programmed.sets.values() {
        let shared = scopes.get(set.id as usize).copied().unwrap_or(0);
        if shared != 0 {
            programmed.affinity_scopes.insert(set.id, shared);
        }
    }
    programmed.backend_ids = IdAlloc::with_used(programmed.backends.values().map(|b| b.id));
    programmed.set_ids = IdAlloc::with_used(
        programmed
            .sets
            .values()
            .map(|s| s.id)
            .chain(programmed.orphan_tables.iter().copied()),
    );
    programmed.range_ids = IdAlloc::with_used(programmed.ranges.keys().copied());
    Ok(programmed)
}

/// The flags `addr` carries as one of the node's own addresses in `config` (IPv4 ones only so
/// far).
fn node_flags(config: &lb_common::maps::NodeConfig, addr: IpAddr) -> u32 {
    let IpAddr::V4(addr) = addr else {
        return 0;
    };
    let addr = lb_common::Be32::from(addr);
    let mut flags = 0;
    if addr.raw() != 0 && addr == config.snat_addr {
        flags |= addr_flags::SNAT;
    }
    if addr.raw() != 0 && addr == config.hairpin_addr {
        flags |= addr_flags::HAIRPIN;
    }
    flags
}
