//! `lbctl maps dump`: every map (or those asked for), each decoded into rows.

mod family;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use family::Frontends;
pub use family::{
    AddrRow, AddrRow6, BackendRow, BackendRow6, CtRow, CtRow6, ServiceRow, ServiceRow6,
};
use lb_common::{
    answer,
    maps::{self as names, Backend, NodeConfig},
};
use lb_datapath::{
    maps::{Maps, MapsError},
    predict,
};
use serde::Serialize;

use super::rows::{self, RangeRow, ServiceCounters, SlotShare, VerdictRow, error_text, map_err};
use crate::decode::{Proto, SECOND_NS, seconds_until, socket};

/// One of the datapath's maps, as `lbctl maps dump --map` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapKind {
    Addrs,
    Services,
    Backends,
    Maglev,
    Ct,
    Frags,
    SvcStats,
    Verdicts,
    SrcRanges,
    Affinity,
    Config,
    Answers,
    DirectNat,
    AffinityScope,
    SockRev,
    SockConfig,
    SockStats,
    Filters,
    Addrs6,
    Services6,
    Backends6,
    Ct6,
}

impl MapKind {
    /// In the order of `lb_common::maps::ALL`.
    pub const ALL: [Self; 22] = [
        Self::Addrs,
        Self::Services,
        Self::Backends,
        Self::Maglev,
        Self::Ct,
        Self::Frags,
        Self::SvcStats,
        Self::Verdicts,
        Self::SrcRanges,
        Self::Affinity,
        Self::Config,
        Self::Answers,
        Self::DirectNat,
        Self::AffinityScope,
        Self::SockRev,
        Self::SockConfig,
        Self::SockStats,
        Self::Filters,
        Self::Addrs6,
        Self::Services6,
        Self::Backends6,
        Self::Ct6,
    ];

    /// The map's name (its pin name and its key in the dump's JSON).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Addrs => names::LB_ADDRS,
            Self::Services => names::LB_SERVICES,
            Self::Backends => names::LB_BACKENDS,
            Self::Maglev => names::LB_MAGLEV,
            Self::Ct => names::LB_CT,
            Self::Frags => names::LB_FRAGS,
            Self::SvcStats => names::LB_SVC_STATS,
            Self::Verdicts => names::LB_VERDICTS,
            Self::SrcRanges => names::LB_SRC_RANGES,
            Self::Affinity => names::LB_AFFINITY,
            Self::Config => names::LB_CONFIG,
            Self::Answers => names::LB_ANSWERS,
            Self::DirectNat => names::LB_DIRECT_NAT,
            Self::AffinityScope => names::LB_AFFINITY_SCOPE,
            Self::SockRev => names::LB_SOCK_REV,
            Self::SockConfig => names::LB_SOCK_CONFIG,
            Self::SockStats => names::LB_SOCK_STATS,
            Self::Filters => names::LB_FILTERS,
            Self::Addrs6 => names::LB6_ADDRS,
            Self::Services6 => names::LB6_SERVICES,
            Self::Backends6 => names::LB6_BACKENDS,
            Self::Ct6 => names::LB6_CT,
        }
    }

    /// The short alias `--map` accepts besides the name.
    pub const fn alias(self) -> &'static str {
        match self {
            Self::Addrs => "addrs",
            Self::Services => "services",
            Self::Backends => "backends",
            Self::Maglev => "maglev",
            Self::Ct => "ct",
            Self::Frags => "frags",
            Self::SvcStats => "stats",
            Self::Verdicts => "verdicts",
            Self::SrcRanges => "ranges",
            Self::Affinity => "affinity",
            Self::Config => "config",
            Self::Answers => "answers",
            Self::DirectNat => "direct",
            Self::AffinityScope => "affinity-scope",
            Self::SockRev => "sock-rev",
            Self::SockConfig => "sock-config",
            Self::SockStats => "sock-stats",
            Self::Filters => "filters",
            Self::Addrs6 => "addrs6",
            Self::Services6 => "services6",
            Self::Backends6 => "backends6",
            Self::Ct6 => "ct6",
        }
    }

    /// Parses a map name (`LB_CT`, any case) or alias (`ct`).
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s) || k.alias().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let valid: Vec<String> = Self::ALL
                    .iter()
                    .map(|k| format!("{} ({})", k.name(), k.alias()))
                    .collect();
                format!("unknown map `{s}`; valid maps: {}", valid.join(", "))
            })
    }
}

/// The Maglev table of one backend set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MaglevRow {
    /// The backend set (`LB_MAGLEV` index); `service_id` in the JSON, whose field names stay.
    #[serde(rename = "service_id")]
    pub set_id: u32,
    pub table_size: u32,
    /// Slots per backend id, by id.
    pub backends: Vec<SlotShare>,
    /// Every slot's backend id (only with `--full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<Vec<u32>>,
    /// Why the table could not be read (it should exist: the set has a table size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `LB_CONFIG`: the node's configuration (one row).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConfigRow {
    /// The address external flows to backends on other nodes are source-NATed to;
    /// `"0.0.0.0"` when unset.
    pub snat_addr: Ipv4Addr,
    /// The SNAT port range, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Whether the datapath source-NATs: an address is set and the range is not empty.
    /// Without, new external flows to backends on other nodes are dropped (`drop_snat_ports`).
    pub snat_enabled: bool,
    /// The address hairpin flows (a pod balanced to itself) are source-NATed to; `"0.0.0.0"`
    /// disables that (such flows then fail).
    pub hairpin_addr: Ipv4Addr,
    /// `lb-agent --masquerade-all`: every balanced flow is source-NATed to the node.
    pub masquerade_all: bool,
    /// ClusterIPs serve clients outside the cluster (`lb-agent --external-cluster-ips`).
    pub external_cluster_ips: bool,
}

/// `LB_ANSWERS`: the node's budget of generated answers (rejects, ICMP errors), one row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnswersRow {
    /// Answers that may go at once now.
    pub available: u64,
    /// At most this many at once, after a quiet spell.
    pub burst: u64,
    /// And this many a second beyond it.
    pub rate_per_s: u64,
}

/// `LB_DIRECT_NAT`: whether direct connections have needed another source port, one row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DirectNatRow {
    /// True once the datapath gave a pod's direct connection (to an address without a
    /// frontend) another source port; from then on such packets look for their flow.
    pub remapped_before: bool,
}

/// `LB_FILTERS`: the filters in front of the datapath's lookups (`lb_common::filters`), one
/// row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FiltersRow {
    /// Whether the programs trust them (false while an agent starts up: they then look up every
    /// packet).
    pub complete: bool,
    /// Slots marked by a source of translated replies, of `slots`.
    pub reply_sources: usize,
    /// Slots marked by the destination of a flow or a frontend, of `slots`.
    pub destinations: usize,
    pub slots: u32,
}

/// A row of `LB_AFFINITY_SCOPE`: a set that shares another's affinity entries (a Service
/// port's Local set, sharing its Cluster set's). Sets of the installed frontends only.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AffinityScopeRow {
    pub set_id: u32,
    pub shares_set_id: u32,
}

/// A row of `LB_SOCK_REV`: a socket that socket-level balancing connected (or sent a datagram)
/// to a backend, and the frontend it asked for (what its `getpeername()` and `recvmsg()` show).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SockRevRow {
    pub cookie: u64,
    pub proto: Proto,
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
}

/// The row of `LB_SOCK_CONFIG`: which network namespace the socket programs take for the
/// node's, and whether they leave pods to the packet path.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SockConfigRow {
    /// 0 until an agent with `--socket-lb on|host-only` wrote it.
    pub host_netns_cookie: u64,
    pub host_only: bool,
}

/// A row of `LB_SOCK_STATS`: what the socket programs did for one backend set's frontends.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SockCountersRow {
    pub set_id: u32,
    pub connects: u64,
    pub datagrams: u64,
    pub refused: u64,
}

/// A row of `LB_FRAGS`: the ports of a fragmented datagram.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FragRow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ip_id: u16,
    pub proto: Proto,
    pub src_port: u16,
    pub dst_port: u16,
}

/// A row of `LB_AFFINITY`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AffinityRow {
    pub client: Ipv4Addr,
    /// The backend set the client is pinned in; `service_id` in the JSON, whose field names
    /// stay.
    #[serde(rename = "service_id")]
    pub set_id: u32,
    pub backend_id: u32,
    /// The backend's address, when its slot is active.
    pub backend: Option<SocketAddrV4>,
    /// Seconds since the client's last new connection to the set.
    pub age_s: u64,
    pub last_used_ns: u64,
    /// The set's affinity timeout, when a frontend using that set is installed.
    pub timeout_s: Option<u32>,
    /// Seconds until the entry stops counting (negative: expired), with `timeout_s`.
    pub expires_in_s: Option<i64>,
}

/// `lbctl maps dump`: one key per dumped map (its name), absent when not asked for.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Dump {
    #[serde(rename = "LB_ADDRS", skip_serializing_if = "Option::is_none")]
    pub addrs: Option<Vec<AddrRow>>,
    #[serde(rename = "LB_SERVICES", skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<ServiceRow>>,
    /// Active slots only.
    #[serde(rename = "LB_BACKENDS", skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<BackendRow>>,
    /// One entry per set id that has a table.
    #[serde(rename = "LB_MAGLEV", skip_serializing_if = "Option::is_none")]
    pub maglev: Option<Vec<MaglevRow>>,
    #[serde(rename = "LB_CT", skip_serializing_if = "Option::is_none")]
    pub ct: Option<Vec<CtRow>>,
    #[serde(rename = "LB_FRAGS", skip_serializing_if = "Option::is_none")]
    pub frags: Option<Vec<FragRow>>,
    /// Non-zero counters only.
    #[serde(rename = "LB_SVC_STATS", skip_serializing_if = "Option::is_none")]
    pub set_stats: Option<Vec<ServiceCounters>>,
    /// Every reason, zeros included.
    #[serde(rename = "LB_VERDICTS", skip_serializing_if = "Option::is_none")]
    pub verdicts: Option<Vec<VerdictRow>>,
    #[serde(rename = "LB_SRC_RANGES", skip_serializing_if = "Option::is_none")]
    pub src_ranges: Option<Vec<RangeRow>>,
    #[serde(rename = "LB_AFFINITY", skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Vec<AffinityRow>>,
    /// One row.
    #[serde(rename = "LB_CONFIG", skip_serializing_if = "Option::is_none")]
    pub config: Option<Vec<ConfigRow>>,
    /// One row.
    #[serde(rename = "LB_ANSWERS", skip_serializing_if = "Option::is_none")]
    pub answers: Option<Vec<AnswersRow>>,
    /// One row.
    #[serde(rename = "LB_DIRECT_NAT", skip_serializing_if = "Option::is_none")]
    pub direct_nat: Option<Vec<DirectNatRow>>,
    #[serde(rename = "LB_AFFINITY_SCOPE", skip_serializing_if = "Option::is_none")]
    pub affinity_scope: Option<Vec<AffinityScopeRow>>,
    #[serde(rename = "LB_SOCK_REV", skip_serializing_if = "Option::is_none")]
    pub sock_rev: Option<Vec<SockRevRow>>,
    /// One row.
    #[serde(rename = "LB_SOCK_CONFIG", skip_serializing_if = "Option::is_none")]
    pub sock_config: Option<Vec<SockConfigRow>>,
    /// Non-zero counters only.
    #[serde(rename = "LB_SOCK_STATS", skip_serializing_if = "Option::is_none")]
    pub sock_stats: Option<Vec<SockCountersRow>>,
    /// One row.
    #[serde(rename = "LB_FILTERS", skip_serializing_if = "Option::is_none")]
    pub filters: Option<Vec<FiltersRow>>,
    /// IPv6's own maps, each in the shape of its IPv4 counterpart's (`LB_ADDRS` ...), with
    /// IPv6 addresses (`"fd00::1"`, `"[fd00::1]:80"`).
    #[serde(rename = "LB6_ADDRS", skip_serializing_if = "Option::is_none")]
    pub addrs6: Option<Vec<AddrRow6>>,
    #[serde(rename = "LB6_SERVICES", skip_serializing_if = "Option::is_none")]
    pub services6: Option<Vec<ServiceRow6>>,
    /// Active slots only.
    #[serde(rename = "LB6_BACKENDS", skip_serializing_if = "Option::is_none")]
    pub backends6: Option<Vec<BackendRow6>>,
    #[serde(rename = "LB6_CT", skip_serializing_if = "Option::is_none")]
    pub ct6: Option<Vec<CtRow6>>,
}

/// Reads the maps in `kinds` (every map when empty). `full` keeps every Maglev slot.
pub fn dump(maps: &Maps, kinds: &[MapKind], full: bool) -> Result<Dump, MapsError> {
    let want = |k: MapKind| kinds.is_empty() || kinds.contains(&k);
    let now = predict::coarse_now_ns();
    let mut out = Dump::default();
    let needs_frontends = [
        MapKind::Services,
        MapKind::Services6,
        MapKind::Maglev,
        MapKind::Affinity,
        MapKind::AffinityScope,
    ]
    .into_iter()
    .any(want);
    let frontends = if needs_frontends {
        Frontends::read(maps)?
    } else {
        Frontends::default()
    };
    family::fill(&mut out, maps, &frontends, want, now)?;
    if want(MapKind::Maglev) {
        out.maglev = Some(read_maglev(maps, &frontends, full));
    }
    if want(MapKind::Frags) {
        out.frags = Some(read_frags(maps)?);
    }
    if want(MapKind::SvcStats) {
        out.set_stats = Some(rows::read_set_stats(maps)?);
    }
    if want(MapKind::Verdicts) {
        out.verdicts = Some(rows::read_verdicts(maps)?);
    }
    if want(MapKind::SrcRanges) {
        out.src_ranges = Some(rows::read_ranges(maps)?);
    }
    if want(MapKind::Affinity) {
        out.affinity = Some(read_affinity(maps, &frontends, now)?);
    }
    if want(MapKind::Answers) {
        out.answers = Some(vec![answers_row(maps)?]);
    }
    if want(MapKind::Config) {
        out.config = Some(vec![config_row(&predict::node_config(maps)?)]);
    }
    if want(MapKind::DirectNat) {
        let seen = maps
            .direct_nat
            .get(&0, 0)
            .map_err(|source| MapsError::Map {
                name: names::LB_DIRECT_NAT,
                source,
            })?;
        out.direct_nat = Some(vec![DirectNatRow {
            remapped_before: seen != 0,
        }]);
    }
    if want(MapKind::AffinityScope) {
        out.affinity_scope = Some(read_affinity_scope(maps, &frontends)?);
    }
    if want(MapKind::SockRev) {
        out.sock_rev = Some(read_sock_rev(maps)?);
    }
    if want(MapKind::SockConfig) {
        let c = lb_datapath::predict_sock::sock_config(maps)?;
        out.sock_config = Some(vec![SockConfigRow {
            host_netns_cookie: c.host_netns_cookie,
            host_only: c.flags & lb_common::sock::sock_flags::HOST_ONLY != 0,
        }]);
    }
    if want(MapKind::SockStats) {
        out.sock_stats = Some(read_sock_stats(maps)?);
    }
    if want(MapKind::Filters) {
        let (complete, reply_sources, destinations) = lb_datapath::filters::state(maps)?;
        out.filters = Some(vec![FiltersRow {
            complete,
            reply_sources,
            destinations,
            slots: lb_common::filters::SLOTS,
        }]);
    }
    Ok(out)
}

fn read_sock_stats(maps: &Maps) -> Result<Vec<SockCountersRow>, MapsError> {
    let mut rows = Vec::new();
    for set_id in 0..maps.sock_stats.len() {
        let s = maps.sock_totals(set_id)?;
        if s.connects != 0 || s.datagrams != 0 || s.refused != 0 {
            rows.push(SockCountersRow {
                set_id,
                connects: s.connects,
                datagrams: s.datagrams,
                refused: s.refused,
            });
        }
    }
    Ok(rows)
}

fn read_sock_rev(maps: &Maps) -> Result<Vec<SockRevRow>, MapsError> {
    let failed = |source| MapsError::Map {
        name: names::LB_SOCK_REV,
        source,
    };
    let mut rows = Vec::new();
    for entry in maps.sock_rev.iter() {
        let (key, rev) = entry.map_err(failed)?;
        rows.push(SockRevRow {
            cookie: key.cookie,
            proto: Proto::from(key.proto),
            frontend: SocketAddrV4::new(rev.frontend_addr.to_ip(), rev.frontend_port.to_host()),
            backend: SocketAddrV4::new(key.backend_addr.to_ip(), key.backend_port.to_host()),
        });
    }
    rows.sort_by_key(|r| (r.cookie, r.backend));
    Ok(rows)
}

/// One row per backend set with a table (of the frontends of either family); a table that
/// cannot be read is a row with its error.
fn read_maglev(maps: &Maps, frontends: &Frontends, full: bool) -> Vec<MaglevRow> {
    rows::tabled_sets(frontends.values())
        .into_iter()
        .map(
            |(set_id, table_size)| match maps.maglev_table(set_id, table_size) {
                Ok(table) => MaglevRow {
                    set_id,
                    table_size,
                    backends: rows::shares(&table),
                    table: full.then_some(table),
                    error: None,
                },
                Err(e) => MaglevRow {
                    set_id,
                    table_size,
                    backends: Vec::new(),
                    table: None,
                    error: Some(error_text(&e)),
                },
            },
        )
        .collect()
}

fn answers_row(maps: &Maps) -> Result<AnswersRow, MapsError> {
    let bucket = maps.answers.get(&0, 0).map_err(|source| MapsError::Map {
        name: names::LB_ANSWERS,
        source,
    })?;
    Ok(AnswersRow {
        available: answer::credit(&bucket, predict::coarse_now_ns()) / answer::COST_NS,
        burst: answer::BURST,
        rate_per_s: answer::RATE_PER_S,
    })
}

fn config_row(config: &NodeConfig) -> ConfigRow {
    ConfigRow {
        snat_addr: config.snat_addr.to_ip(),
        snat_port_min: config.snat_port_min,
        snat_port_max: config.snat_port_max,
        snat_enabled: config.snat_configured(),
        hairpin_addr: config.hairpin_addr.to_ip(),
        masquerade_all: config.masquerade_all(),
        external_cluster_ips: config.external_cluster_ips(),
    }
}

fn read_frags(maps: &Maps) -> Result<Vec<FragRow>, MapsError> {
    let mut rows = BTreeMap::new();
    for item in maps.frags.iter() {
        let (key, entry) = item.map_err(map_err(names::LB_FRAGS))?;
        let order = (
            key.src_addr.to_host(),
            key.dst_addr.to_host(),
            key.ip_id.to_host(),
            key.proto,
        );
        rows.insert(
            order,
            FragRow {
                src: key.src_addr.to_ip(),
                dst: key.dst_addr.to_ip(),
                ip_id: key.ip_id.to_host(),
                proto: key.proto.into(),
                src_port: entry.src_port.to_host(),
                dst_port: entry.dst_port.to_host(),
            },
        );
    }
    Ok(rows.into_values().collect())
}

fn read_affinity_scope(
    maps: &Maps,
    frontends: &Frontends,
) -> Result<Vec<AffinityScopeRow>, MapsError> {
    let sets: BTreeSet<u32> = frontends.values().map(|f| f.set_id).collect();
    let mut rows = Vec::new();
    for set_id in sets {
        let shares_set_id = maps
            .affinity_scope
            .get(&set_id, 0)
            .map_err(map_err(names::LB_AFFINITY_SCOPE))?;
        if shares_set_id != 0 {
            rows.push(AffinityScopeRow {
                set_id,
                shares_set_id,
            });
        }
    }
    Ok(rows)
}

fn read_affinity(
    maps: &Maps,
    frontends: &Frontends,
    now: u64,
) -> Result<Vec<AffinityRow>, MapsError> {
    let timeouts: BTreeMap<u32, u32> = frontends
        .values()
        .map(|s| (s.set_id, s.affinity_timeout_s))
        .collect();
    let mut rows = BTreeMap::new();
    for item in maps.affinity.iter() {
        let (key, entry) = item.map_err(map_err(names::LB_AFFINITY))?;
        let timeout_s = timeouts.get(&key.set_id).copied();
        let backend = maps
            .backends
            .get(&entry.backend_id, 0)
            .ok()
            .filter(Backend::is_active)
            .map(|b| socket(b.addr, b.port));
        rows.insert(
            (key.client.to_host(), key.set_id),
            AffinityRow {
                client: key.client.to_ip(),
                set_id: key.set_id,
                backend_id: entry.backend_id,
                backend,
                age_s: now.saturating_sub(entry.last_used_ns) / SECOND_NS,
                last_used_ns: entry.last_used_ns,
                timeout_s,
                expires_in_s: timeout_s.map(|t| {
                    seconds_until(
                        entry.last_used_ns.saturating_add(u64::from(t) * SECOND_NS),
                        now,
                    )
                }),
            },
        );
    }
    Ok(rows.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_and_aliases_parse() {
        for k in MapKind::ALL {
            assert_eq!(MapKind::parse(k.name()), Ok(k));
            assert_eq!(MapKind::parse(k.alias()), Ok(k));
            assert_eq!(MapKind::parse(&k.name().to_lowercase()), Ok(k));
        }
        assert_eq!(
            MapKind::ALL.map(MapKind::name),
            names::ALL,
            "MapKind follows lb_common::maps::ALL"
        );
        let err = MapKind::parse("nope").unwrap_err();
        assert!(
            err.contains("LB_CT (ct)")
                && err.contains("LB_AFFINITY (affinity)")
                && err.contains("LB_CONFIG (config)")
                && err.contains("LB6_CT (ct6)"),
            "{err}"
        );
    }
}
