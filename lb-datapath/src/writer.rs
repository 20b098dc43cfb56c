//! Carries out a [`Plan`] on the maps, in the plan's order. Maglev tables are built on every
//! core while the writes go on.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    thread,
};

use aya::{
    Pod,
    maps::{HashMap, MapData, MapError, PerCpuValues, lpm_trie::Key},
};
use lb_common::{
    Address, Be32, Be128,
    conntrack::{CtEntryOf, FlowKeyOf, REPLY},
    maps::{self as names, AddrInfo, Backend, Backend6, Frontend, SetStats, SourceRange},
    net::proto,
};

use crate::{
    maglev::{self, MaglevBackend},
    maps::{Maps, MapsError},
    model::{AnyFrontendKey, Family},
    planner::{AnyBackend, Plan, TableWrite},
};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("Maglev table of backend set {set_id}: {source}")]
    Maglev {
        set_id: u32,
        #[source]
        source: maglev::MaglevError,
    },
}

fn write_err(map: &'static str) -> impl Fn(MapError) -> WriteError {
    move |source| WriteError::Map { map, source }
}

/// Deleting what is already gone is fine.
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn range_key(range_id: u32, net: &ipnet::Ipv4Net) -> Key<SourceRange> {
    Key::new(
        SourceRange::ID_BITS + u32::from(net.prefix_len()),
        SourceRange {
            range_id: Be32::from_host(range_id),
            addr: Be32::from(net.network()),
        },
    )
}

/// Builds the tables of `writes` on every core (Maglev and filling the table's map), then
/// installs them all with one batch update.
fn install_tables(maps: &mut Maps, writes: &[TableWrite]) -> Result<(), WriteError> {
    if writes.is_empty() {
        return Ok(());
    }
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(writes.len());
    let built: Vec<Result<(u32, MapData), WriteError>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                scope.spawn(move || {
                    let mut buffer = Vec::new();
                    let mut out = Vec::new();
                    for write in writes.iter().skip(worker).step_by(workers) {
                        let members: Vec<MaglevBackend> = write
                            .members
                            .iter()
                            .map(|(id, addr)| MaglevBackend {
                                id: *id,
                                key: maglev::backend_key(*addr),
                                weight: 1,
                            })
                            .collect();
                        let result =
                            maglev::build_table_into(&members, write.table_size, &mut buffer)
                                .map_err(|source| WriteError::Maglev {
                                    set_id: write.set_id,
                                    source,
                                })
                                .and_then(|()| {
                                    Ok((
                                        write.set_id,
                                        Maps::build_maglev_map(write.set_id, &buffer)?,
                                    ))
                                });
                        out.push(result);
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("table builder panicked"))
            .collect()
    });
    let tables = built.into_iter().collect::<Result<Vec<_>, _>>()?;
    maps.install_maglev_maps(&tables)?;
    Ok(())
}

/// Writes `plan`. On error the maps may hold part of it: the caller re-reads them before planning
/// again.
pub fn write(maps: &mut Maps, plan: &Plan) -> Result<(), WriteError> {
    let (backends, backends6) = by_family(&plan.backends, |(id, value)| match value {
        AnyBackend::V4(b) => Ok((*id, *b)),
        AnyBackend::V6(b) => Err((*id, *b)),
    });
    write_entries(maps, names::LB_BACKENDS, &backends, |maps, id, value| {
        maps.backends.set(*id, value, 0)
    })?;
    write_entries(maps, names::LB6_BACKENDS, &backends6, |maps, id, value| {
        maps.backends6.set(*id, value, 0)
    })?;
    for (range_id, net) in &plan.ranges_added {
        maps.src_ranges
            .insert(&range_key(*range_id, net), 1, 0)
            .map_err(write_err(names::LB_SRC_RANGES))?;
    }
    install_tables(maps, &plan.tables)?;
    for (set_id, shared) in &plan.affinity_scopes {
        maps.affinity_scope
            .set(*set_id, shared, 0)
            .map_err(write_err(names::LB_AFFINITY_SCOPE))?;
    }
    if !plan.stats_reset.is_empty() {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| WriteError::Map {
            map: names::LB_SVC_STATS,
            source: MapError::IoError(e),
        })?;
        for id in &plan.stats_reset {
            let zeros = PerCpuValues::try_from(vec![SetStats::default(); cpus]).map_err(|e| {
                WriteError::Map {
                    map: names::LB_SVC_STATS,
                    source: MapError::IoError(e),
                }
            })?;
            maps.set_stats
                .set(*id, zeros, 0)
                .map_err(write_err(names::LB_SVC_STATS))?;
        }
    }
    // Marked first: a frontend whose destination is unmarked would not be looked up.
    let frontends: Vec<_> = plan.frontends.iter().map(|(key, _)| *key).collect();
    crate::filters::mark_frontends(maps, &frontends)?;
    let (frontends, frontends6) = by_family(&plan.frontends, split_frontend);
    write_entries(maps, names::LB_SERVICES, &frontends, |maps, key, value| {
        maps.services.insert(key, value, 0)
    })?;
    write_entries(
        maps,
        names::LB6_SERVICES,
        &frontends6,
        |maps, key, value| maps.services6.insert(key, value, 0),
    )?;
    if let Some(config) = &plan.config {
        maps.config
            .set(0, config, 0)
            .map_err(write_err(names::LB_CONFIG))?;
    }
    let (addrs, addrs6) = by_family(&plan.addrs, split_addr);
    write_entries(maps, names::LB_ADDRS, &addrs, |maps, addr, info| {
        maps.addrs.insert(addr, info, 0)
    })?;
    write_entries(maps, names::LB6_ADDRS, &addrs6, |maps, addr, info| {
        maps.addrs6.insert(addr, info, 0)
    })?;
    for addr in &plan.addrs_removed {
        match *addr {
            IpAddr::V4(v4) => {
                absent_ok(maps.addrs.remove(&Be32::from(v4))).map_err(write_err(names::LB_ADDRS))?
            }
            IpAddr::V6(v6) => absent_ok(maps.addrs6.remove(&Be128::from(v6)))
                .map_err(write_err(names::LB6_ADDRS))?,
        }
    }
    for key in &plan.frontends_removed {
        match key {
            AnyFrontendKey::V4(k) => {
                absent_ok(maps.services.remove(k)).map_err(write_err(names::LB_SERVICES))?
            }
            AnyFrontendKey::V6(k) => {
                absent_ok(maps.services6.remove(k)).map_err(write_err(names::LB6_SERVICES))?
            }
        }
    }
    for set_id in &plan.tables_removed {
        maps.remove_maglev_table(*set_id)?;
    }
    for (range_id, net) in &plan.ranges_removed {
        absent_ok(maps.src_ranges.remove(&range_key(*range_id, net)))
            .map_err(write_err(names::LB_SRC_RANGES))?;
    }
    for (id, family) in &plan.backends_removed {
        match family {
            Family::V4 => maps
                .backends
                .set(*id, Backend::default(), 0)
                .map_err(write_err(names::LB_BACKENDS))?,
            Family::V6 => maps
                .backends6
                .set(*id, Backend6::default(), 0)
                .map_err(write_err(names::LB6_BACKENDS))?,
        }
    }
    purge_affinity(maps, &plan.affinity_purge)?;
    purge_udp_flows(maps, &plan.udp_flow_purge)?;
    Ok(())
}

/// `entries` split into their IPv4 (`Ok`) and IPv6 (`Err`) map entries by `split`.
fn by_family<T, V4, V6>(entries: &[T], split: impl Fn(&T) -> Result<V4, V6>) -> (Vec<V4>, Vec<V6>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for entry in entries {
        match split(entry) {
            Ok(e) => v4.push(e),
            Err(e) => v6.push(e),
        }
    }
    (v4, v6)
}

type FrontendEntry<K> = (K, Frontend);

fn split_frontend(
    (key, value): &(AnyFrontendKey, Frontend),
) -> Result<FrontendEntry<lb_common::maps::FrontendKey>, FrontendEntry<lb_common::maps::FrontendKey6>>
{
    match key {
        AnyFrontendKey::V4(k) => Ok((*k, *value)),
        AnyFrontendKey::V6(k) => Err((*k, *value)),
    }
}

fn split_addr((addr, info): &(IpAddr, AddrInfo)) -> Result<(Be32, AddrInfo), (Be128, AddrInfo)> {
    match addr {
        IpAddr::V4(v4) => Ok(((*v4).into(), *info)),
        IpAddr::V6(v6) => Err(((*v6).into(), *info)),
    }
}

/// Writes `entries` into the bulk-written map `name` with one syscall where the kernel can, else
/// one at a time with `write_one`.
fn write_entries<K: Pod, V: Pod>(
    maps: &mut Maps,
    name: &'static str,
    entries: &[(K, V)],
    write_one: impl Fn(&mut Maps, &K, &V) -> Result<(), MapError>,
) -> Result<(), WriteError> {
    if entries.is_empty() {
        return Ok(());
    }
    let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
    if !maps.update_batch(name, &keys, &values)? {
        for (key, value) in entries {
            write_one(maps, key, value).map_err(write_err(name))?;
        }
    }
    Ok(())
}

/// Forgets session affinity to backends that left a set: the next connection is balanced anew.
fn purge_affinity(maps: &mut Maps, pairs: &[(u32, u32)]) -> Result<(), WriteError> {
    remove_to_backends(
        &mut maps.affinity,
        names::LB_AFFINITY,
        pairs,
        |key, entry| Some((key.set_id, entry.backend_id)),
    )
}

/// As kube-proxy flushes UDP conntrack of endpoints that stopped serving: UDP flows to such a
/// backend move to a serving one on their next datagram instead of blackholing. Matched by the
/// backend's address (a forward entry's NAT address, a reply entry's source), not its slot,
/// which another backend may have taken in the same plan.
fn purge_udp_flows(maps: &mut Maps, pairs: &[(u32, SocketAddr)]) -> Result<(), WriteError> {
    let (v4, v6): (Vec<_>, Vec<_>) = pairs.iter().copied().partition(|(_, a)| a.is_ipv4());
    remove_to_backends(&mut maps.ct, names::LB_CT, &v4, udp_backend_of)?;
    remove_to_backends(&mut maps.ct6, names::LB6_CT, &v6, udp_backend_of)
}

/// The (set id, backend) a UDP conntrack entry leads to: a forward entry's NAT address, a
/// reply entry's source.
fn udp_backend_of<A: Address + Into<IpAddr>>(
    key: &FlowKeyOf<A>,
    entry: &CtEntryOf<A>,
) -> Option<(u32, SocketAddr)> {
    let backend = if key.dir == REPLY {
        SocketAddr::new(key.src_addr.into(), key.src_port.to_host())
    } else {
        SocketAddr::new(entry.nat_addr.into(), entry.nat_port.to_host())
    };
    (key.proto == proto::UDP).then_some((entry.set_id, backend))
}

/// Removes the entries of `map` (LB map `name`) that lead to one of `pairs` (set id, and the
/// backend's id or address), as `pair_of` reads an entry's (`None`: an entry of no concern). An
/// entry gone meanwhile (LRU eviction, expiry) is no error.
fn remove_to_backends<K: Pod, V: Pod, P: Ord + Copy>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    pairs: &[P],
    pair_of: impl Fn(&K, &V) -> Option<P>,
) -> Result<(), WriteError> {
    if pairs.is_empty() {
        return Ok(());
    }
    let pairs: BTreeSet<P> = pairs.iter().copied().collect();
    let stale: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, entry)| pair_of(key, entry).is_some_and(|pair| pairs.contains(&pair)))
        .map(|(key, _)| key)
        .collect();
    for key in stale {
        absent_ok(map.remove(&key)).map_err(write_err(name))?;
    }
    Ok(())
}
/// The address of a backend id as programmed, for logs.
pub fn describe_backend(value: &AnyBackend) -> SocketAddr {
    value.addr()
}
