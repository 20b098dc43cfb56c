//! What several views share: the decoded frontend value, Maglev shares, counters and source
//! ranges, and reading maps in a stable order (map iteration order is the kernel's hash order,
//! which would reorder the output from one run to the next).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use aya::maps::MapError;
use lb_common::{
    conntrack::{CtEntry, CtEntryOf, FlowKey, FlowKeyOf, ct_flags},
    maps::{self as names, BackendOf, Frontend, FrontendKey, FrontendKeyOf, SourceRange},
    stats::Reason,
};
use lb_datapath::maps::{Maps, MapsError};
use serde::Serialize;

use crate::decode::{self, Flags, FrontendFlag, MapAddress};

/// A frontend's value in `LB_SERVICES`, decoded (shared by several views).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceValue {
    /// The backend set the frontend uses: index of its Maglev table and counters. The JSON
    /// calls it `service_id` (field names are lbctl's interface), but it is a set id, which
    /// the frontends of one Service share.
    #[serde(rename = "service_id")]
    pub set_id: u32,
    /// Backends taking new flows; 0 rejects (or drops).
    pub backend_count: u32,
    /// The backend when there is no table (single backend), else 0.
    pub backend_id: u32,
    /// Maglev table size, 0 without a table.
    pub table_size: u32,
    pub flags: Flags<FrontendFlag>,
    pub flags_raw: u32,
    /// sessionAffinity ClientIP timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges set (`LB_SRC_RANGES` range id); 0 = every source.
    pub source_range_id: u32,
}

impl From<&Frontend> for ServiceValue {
    fn from(s: &Frontend) -> Self {
        Self {
            set_id: s.set_id,
            backend_count: s.backend_count,
            backend_id: s.backend_id,
            table_size: s.table_size,
            flags: Flags::decode(s.flags),
            flags_raw: s.flags,
            affinity_timeout_s: s.affinity_timeout_s,
            source_range_id: s.source_range_id,
        }
    }
}

/// A backend's share of a Maglev table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlotShare {
    pub backend_id: u32,
    pub slots: u32,
    /// Of the table size, rounded to two decimals.
    pub percent: f64,
}

/// A backend set's counters summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceCounters {
    /// The backend set counted (`LB_SVC_STATS` index); `service_id` in the JSON, whose field
    /// names stay.
    #[serde(rename = "service_id")]
    pub set_id: u32,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// A verdict counter summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerdictRow {
    /// `lb_common::stats::Reason::name`.
    #[serde(serialize_with = "decode::serialize_reason")]
    pub reason: Reason,
    pub packets: u64,
    pub bytes: u64,
}

/// A row of `LB_SRC_RANGES`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RangeRow {
    /// `Service::source_range_id` of the services this CIDR admits sources for.
    pub range_id: u32,
    /// `"a.b.c.d/len"`.
    pub cidr: String,
    pub value: u32,
}

pub fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

pub fn percent(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    // Two decimals are plenty and keep the JSON short.
    (f64::from(part) * 10_000.0 / f64::from(whole)).round() / 100.0
}

/// Slots per backend id of a table.
pub fn shares(table: &[u32]) -> Vec<SlotShare> {
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    for id in table {
        *counts.entry(*id).or_default() += 1;
    }
    let size = table.len() as u32;
    counts
        .into_iter()
        .map(|(backend_id, slots)| SlotShare {
            backend_id,
            slots,
            percent: percent(slots, size),
        })
        .collect()
}

/// An error and its causes on one line.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let _ = write!(text, ": {cause}");
        next = cause.source();
    }
    text
}

/// Every IPv4 frontend, sorted by address, port, protocol and scope.
pub fn read_services(maps: &Maps) -> Result<Vec<(FrontendKey, Frontend)>, MapsError> {
    sorted_frontends(maps.services.iter(), names::LB_SERVICES)
}

/// The frontends of map `name` (`LB_SERVICES`, `LB6_SERVICES`) that `entries` iterates, sorted
/// by address, port, protocol and scope. Takes the map's iterator rather than the map: aya's
/// typed maps need `aya::Pod` keys, which lb-common implements per family, not generically.
pub fn sorted_frontends<A: MapAddress>(
    entries: impl IntoIterator<Item = Result<(FrontendKeyOf<A>, Frontend), MapError>>,
    name: &'static str,
) -> Result<Vec<(FrontendKeyOf<A>, Frontend)>, MapsError> {
    let mut rows = BTreeMap::new();
    for item in entries {
        let (key, value) = item.map_err(map_err(name))?;
        let order = (key.addr.ip(), key.port.to_host(), key.proto, key.scope);
        rows.insert(order, (key, value));
    }
    Ok(rows.into_values().collect())
}

/// The distinct (set id, table size) pairs of the frontends whose backend set has a table.
pub fn tabled_sets<'a>(frontends: impl IntoIterator<Item = &'a Frontend>) -> BTreeSet<(u32, u32)> {
    frontends
        .into_iter()
        .filter(|s| s.table_size != 0)
        .map(|s| (s.set_id, s.table_size))
        .collect()
}

/// The active slots of backend array `name` (`LB_BACKENDS`, `LB6_BACKENDS`) that `slots`
/// iterates in index order, by id.
pub fn active_backends<A: MapAddress>(
    slots: impl IntoIterator<Item = Result<BackendOf<A>, MapError>>,
    name: &'static str,
) -> Result<BTreeMap<u32, BackendOf<A>>, MapsError> {
    let mut out = BTreeMap::new();
    for (id, item) in slots.into_iter().enumerate() {
        let backend = item.map_err(map_err(name))?;
        if backend.is_active() {
            out.insert(id as u32, backend);
        }
    }
    Ok(out)
}

/// Where a conntrack entry sorts: direction, then 5-tuple in host order (an address's std
/// type orders as its number).
pub type CtOrder<I = Ipv4Addr> = (u8, I, u16, I, u16, u8);

pub fn ct_order<A: MapAddress>(key: &FlowKeyOf<A>) -> CtOrder<A::Ip> {
    (
        key.dir,
        key.src_addr.ip(),
        key.src_port.to_host(),
        key.dst_addr.ip(),
        key.dst_port.to_host(),
        key.proto,
    )
}

/// Every IPv4 conntrack entry, sorted by direction then 5-tuple.
pub fn read_ct(maps: &Maps) -> Result<BTreeMap<CtOrder, (FlowKey, CtEntry)>, MapsError> {
    sorted_ct(maps.ct.iter(), names::LB_CT)
}

/// Conntrack entries of one family, by [`CtOrder`].
pub type SortedCt<A> = BTreeMap<CtOrder<<A as MapAddress>::Ip>, (FlowKeyOf<A>, CtEntryOf<A>)>;

/// The entries of conntrack map `name` (`LB_CT`, `LB6_CT`) that `entries` iterates, sorted by
/// direction then 5-tuple.
pub fn sorted_ct<A: MapAddress>(
    entries: impl IntoIterator<Item = Result<(FlowKeyOf<A>, CtEntryOf<A>), MapError>>,
    name: &'static str,
) -> Result<SortedCt<A>, MapsError> {
    let mut rows = BTreeMap::new();
    for item in entries {
        let (key, entry) = item.map_err(map_err(name))?;
        rows.insert(ct_order(&key), (key, entry));
    }
    Ok(rows)
}

/// The SNAT end of a source-NATed entry: forward, the address and port that replace the
/// client; reply, the client.
pub fn snat_of<A: MapAddress>(entry: &CtEntryOf<A>) -> Option<A::Socket> {
    (entry.flags & ct_flags::SNAT != 0).then(|| decode::socket(entry.snat_addr, entry.snat_port))
}

/// Every source range, by range id, then address and prefix length.
pub fn read_ranges(maps: &Maps) -> Result<Vec<RangeRow>, MapsError> {
    let mut rows = BTreeMap::new();
    for item in maps.src_ranges.iter() {
        let (key, value) = item.map_err(map_err(names::LB_SRC_RANGES))?;
        let data: SourceRange = key.data();
        let bits = key
            .prefix_len()
            .saturating_sub(SourceRange::ID_BITS)
            .min(32);
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        let addr = data.addr.to_host() & mask;
        let range_id = data.range_id.to_host();
        rows.insert(
            (range_id, addr, bits),
            RangeRow {
                range_id,
                cidr: format!("{}/{bits}", Ipv4Addr::from(addr)),
                value,
            },
        );
    }
    Ok(rows.into_values().collect())
}

/// Non-zero per-set counters, by set id.
pub fn read_set_stats(maps: &Maps) -> Result<Vec<ServiceCounters>, MapsError> {
    let mut rows = Vec::new();
    for (id, item) in maps.set_stats.iter().enumerate() {
        let per_cpu = item.map_err(map_err(names::LB_SVC_STATS))?;
        let mut total = ServiceCounters {
            set_id: id as u32,
            packets: 0,
            bytes: 0,
            new_flows: 0,
        };
        for s in per_cpu.iter() {
            total.packets += s.packets;
            total.bytes += s.bytes;
            total.new_flows += s.new_flows;
        }
        if total.packets != 0 || total.bytes != 0 || total.new_flows != 0 {
            rows.push(total);
        }
    }
    Ok(rows)
}

/// Every verdict counter, in `Reason` order, zeros included.
pub fn read_verdicts(maps: &Maps) -> Result<Vec<VerdictRow>, MapsError> {
    Ok(maps
        .verdict_totals()?
        .into_iter()
        .map(|(reason, c)| VerdictRow {
            reason,
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_count_slots_per_backend() {
        let s = shares(&[1, 2, 1, 1]);
        assert_eq!(
            s,
            [
                SlotShare {
                    backend_id: 1,
                    slots: 3,
                    percent: 75.0
                },
                SlotShare {
                    backend_id: 2,
                    slots: 1,
                    percent: 25.0
                }
            ]
        );
        assert_eq!(percent(1, 3), 33.33);
    }

    #[test]
    fn set_ids_keep_their_json_name() {
        let v = serde_json::to_value(ServiceCounters {
            set_id: 3,
            packets: 1,
            bytes: 2,
            new_flows: 0,
        })
        .unwrap();
        assert_eq!(v["service_id"], 3);
        let v = serde_json::to_value(VerdictRow {
            reason: Reason::DropNoTable,
            packets: 0,
            bytes: 0,
        })
        .unwrap();
        assert_eq!(v["reason"], "drop_inconsistent_service");
    }
}
