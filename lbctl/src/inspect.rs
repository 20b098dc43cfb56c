//! Decoding the datapath's maps for people: what `lbctl` prints.
//!
//! Everything here only reads maps (opened by `open.rs`). Each view is a plain serde structure (the JSON output, whose
//! field names are part of lbctl's interface and documented on the fields) plus a renderer for
//! the table output:
//!
//! | view | function | JSON |
//! |---|---|---|
//! | `lbctl maps dump` | [`dump`] | [`Dump`]: one key per map name, each an array of rows |
//! | `lbctl service list` | [`service_list`] | array of [`ServiceListRow`] |
//! | `lbctl ct list` | [`ct_list`] | array of [`FlowRow`] |
//! | `lbctl stats` | [`stats`] | [`Stats`] |
//! | `lbctl trace` | [`trace_forward`], [`trace_reply`] | [`Trace`] |
//!
//! Addresses are strings (`"10.0.1.2"`, or `"10.0.1.2:40000"` with a port), protocols are
//! `"tcp"`, `"udp"`, `"icmp"` or the protocol number as a string, scopes `"internal"` or
//! `"external"`, flags arrays of snake_case names (bits without a name appear as `"0x.."`), and
//! remaining lifetimes are whole seconds against `predict::coarse_now_ns()` (negative once
//! expired).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::maps::MapError;
use comfy_table::{ContentArrangement, Table};
use lb_common::{
    Be16, Be32,
    conntrack::{CtEntry, FORWARD, FlowKey, REPLY, SnatPort, ct_flags},
    maps::{
        self as names, Backend, Frontend, FrontendKey, NodeConfig, SourceRange, addr_flags,
        backend_flags, frontend_flags, scope, snat,
    },
    net::proto,
    stats::Reason,
};
use serde::Serialize;

use lb_datapath::{
    maps::{Maps, MapsError},
    predict::{self, Forward, Reply, Selection, SnatChoice, SnatFailure, SourceNat},
};

const SECOND_NS: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// Naming.

/// `"tcp"`, `"udp"`, `"icmp"`, or the protocol number.
pub fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        other => other.to_string(),
    }
}

/// `"internal"`, `"external"`, or the raw value.
pub fn scope_name(s: u8) -> String {
    match s {
        scope::INTERNAL => "internal".into(),
        scope::EXTERNAL => "external".into(),
        other => format!("scope{other}"),
    }
}

fn flag_names(bits: u64, known: &[(u64, &str)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bits;
    for (bit, name) in known {
        if bits & bit != 0 {
            out.push((*name).to_owned());
            rest &= !bit;
        }
    }
    for i in 0..64 {
        if rest & (1 << i) != 0 {
            out.push(format!("{:#x}", 1u64 << i));
        }
    }
    out
}

fn addr_flag_names(flags: u32) -> Vec<String> {
    flag_names(
        flags.into(),
        &[
            (addr_flags::CLUSTER_IP.into(), "cluster_ip"),
            (addr_flags::SNAT.into(), "snat"),
            (addr_flags::HAIRPIN.into(), "hairpin"),
        ],
    )
}

fn service_flag_names(flags: u32) -> Vec<String> {
    flag_names(
        flags.into(),
        &[(frontend_flags::DROP_WHEN_EMPTY.into(), "drop_when_empty")],
    )
}

fn backend_flag_names(flags: u8) -> Vec<String> {
    flag_names(
        flags.into(),
        &[
            (backend_flags::ACTIVE.into(), "active"),
            (backend_flags::LOCAL.into(), "local"),
        ],
    )
}

fn ct_flag_names(flags: u8) -> Vec<String> {
    flag_names(
        flags.into(),
        &[
            (ct_flags::ESTABLISHED.into(), "established"),
            (ct_flags::FIN.into(), "fin"),
            (ct_flags::RST.into(), "rst"),
            (ct_flags::SNAT.into(), "snat"),
            (ct_flags::HAIRPIN.into(), "hairpin"),
            (ct_flags::PEER_FIN.into(), "peer_fin"),
            (ct_flags::PEER_RST.into(), "peer_rst"),
            (ct_flags::FIN_FIRST.into(), "fin_first"),
        ],
    )
}

fn socket(addr: Be32, port: Be16) -> SocketAddrV4 {
    SocketAddrV4::new(addr.to_ip(), port.to_host())
}

/// Whole seconds from `now_ns` to `deadline_ns`, negative once past.
fn seconds_until(deadline_ns: u64, now_ns: u64) -> i64 {
    if deadline_ns >= now_ns {
        ((deadline_ns - now_ns) / SECOND_NS) as i64
    } else {
        -(((now_ns - deadline_ns) / SECOND_NS) as i64)
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

fn percent(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    // Two decimals are plenty and keep the JSON short.
    (f64::from(part) * 10_000.0 / f64::from(whole)).round() / 100.0
}

// ---------------------------------------------------------------------------------------------
// Map selection.

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
}

impl MapKind {
    /// In the order of `lb_common::maps::ALL`.
    pub const ALL: [Self; 11] = [
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

// ---------------------------------------------------------------------------------------------
// `maps dump`

/// A row of `LB_ADDRS`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AddrRow {
    pub addr: Ipv4Addr,
    /// `cluster_ip`, `snat` (the node's SNAT address), `hairpin` (the hairpin address); see
    /// `LB_CONFIG`.
    pub flags: Vec<String>,
    pub flags_raw: u32,
}

/// A service value, decoded (shared by several views).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceValue {
    /// Backend-set id (Maglev table and counters index).
    pub service_id: u32,
    /// Backends taking new flows; 0 rejects (or drops).
    pub backend_count: u32,
    /// The backend when there is no table (single backend), else 0.
    pub backend_id: u32,
    /// Maglev table size, 0 without a table.
    pub table_size: u32,
    /// `drop_when_empty`.
    pub flags: Vec<String>,
    pub flags_raw: u32,
    /// sessionAffinity ClientIP timeout; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges set (`LB_SRC_RANGES` range id); 0 = every source.
    pub source_range_id: u32,
}

impl From<&Frontend> for ServiceValue {
    fn from(s: &Frontend) -> Self {
        Self {
            service_id: s.set_id,
            backend_count: s.backend_count,
            backend_id: s.backend_id,
            table_size: s.table_size,
            flags: service_flag_names(s.flags),
            flags_raw: s.flags,
            affinity_timeout_s: s.affinity_timeout_s,
            source_range_id: s.source_range_id,
        }
    }
}

/// A row of `LB_SERVICES`: a frontend and its service value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceRow {
    /// `"ip:port"`.
    pub frontend: SocketAddrV4,
    pub proto: String,
    pub scope: String,
    #[serde(flatten)]
    pub service: ServiceValue,
}

/// An active slot of `LB_BACKENDS`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendRow {
    pub backend_id: u32,
    pub addr: SocketAddrV4,
    /// `active`, `local`.
    pub flags: Vec<String>,
    pub flags_raw: u8,
}

/// A backend's share of a Maglev table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlotShare {
    pub backend_id: u32,
    pub slots: u32,
    /// Of the table size, rounded to two decimals.
    pub percent: f64,
}

/// The Maglev table of one service.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MaglevRow {
    pub service_id: u32,
    pub table_size: u32,
    /// Slots per backend id, by id.
    pub backends: Vec<SlotShare>,
    /// Every slot's backend id (only with `--full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<Vec<u32>>,
    /// Why the table could not be read (it should exist: the service has a table size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A conntrack entry of `LB_CT`, decoded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CtRow {
    /// `"forward"` (keyed client -> frontend) or `"reply"` (keyed backend -> client).
    pub dir: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: String,
    pub backend_id: u32,
    pub service_id: u32,
    /// Forward: the backend the flow is DNATed to. Reply: the frontend restored as source.
    pub nat: SocketAddrV4,
    /// `established`, `fin`, `rst`, `snat`, `hairpin`.
    pub flags: Vec<String>,
    pub flags_raw: u8,
    /// Seconds until the entry stops counting (negative: expired, awaiting LRU eviction).
    pub expires_in_s: i64,
    pub expired: bool,
    /// Source-NATed flows (flag `snat`) only, else `null`. Forward: the node address and port
    /// (or, with flag `hairpin`, the hairpin address and port) that replace the client as the
    /// source. Reply (keyed backend -> that address and port): the client, restored as the
    /// destination.
    pub snat: Option<SocketAddrV4>,
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
}

/// A row of `LB_FRAGS`: the ports of a fragmented datagram.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FragRow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ip_id: u16,
    pub proto: String,
    pub src_port: u16,
    pub dst_port: u16,
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

/// A row of `LB_AFFINITY`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AffinityRow {
    pub client: Ipv4Addr,
    pub service_id: u32,
    pub backend_id: u32,
    /// The backend's address, when its slot is active.
    pub backend: Option<SocketAddrV4>,
    /// Seconds since the client's last new connection to the service.
    pub age_s: u64,
    pub last_used_ns: u64,
    /// The service's affinity timeout, when a frontend of that service is installed.
    pub timeout_s: Option<u32>,
    /// Seconds until the entry stops counting (negative: expired), with `timeout_s`.
    pub expires_in_s: Option<i64>,
}

/// A service's counters summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceCounters {
    pub service_id: u32,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// A verdict counter summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerdictRow {
    /// `lb_common::stats::Reason::name`.
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
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
    /// One entry per service id that has a table.
    #[serde(rename = "LB_MAGLEV", skip_serializing_if = "Option::is_none")]
    pub maglev: Option<Vec<MaglevRow>>,
    #[serde(rename = "LB_CT", skip_serializing_if = "Option::is_none")]
    pub ct: Option<Vec<CtRow>>,
    #[serde(rename = "LB_FRAGS", skip_serializing_if = "Option::is_none")]
    pub frags: Option<Vec<FragRow>>,
    /// Non-zero counters only.
    #[serde(rename = "LB_SVC_STATS", skip_serializing_if = "Option::is_none")]
    pub svc_stats: Option<Vec<ServiceCounters>>,
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
}

fn read_addrs(maps: &Maps) -> Result<Vec<AddrRow>, MapsError> {
    let mut rows = BTreeMap::new();
    for item in maps.addrs.iter() {
        let (addr, info) = item.map_err(map_err(names::LB_ADDRS))?;
        rows.insert(addr.to_host(), (addr, info));
    }
    Ok(rows
        .into_values()
        .map(|(addr, info)| AddrRow {
            addr: addr.to_ip(),
            flags: addr_flag_names(info.flags),
            flags_raw: info.flags,
        })
        .collect())
}

/// Every frontend, sorted by address, port, protocol and scope.
fn read_services(maps: &Maps) -> Result<Vec<(FrontendKey, Frontend)>, MapsError> {
    let mut rows = BTreeMap::new();
    for item in maps.services.iter() {
        let (key, value) = item.map_err(map_err(names::LB_SERVICES))?;
        let order = (key.addr.to_host(), key.port.to_host(), key.proto, key.scope);
        rows.insert(order, (key, value));
    }
    Ok(rows.into_values().collect())
}

fn service_row(key: &FrontendKey, value: &Frontend) -> ServiceRow {
    ServiceRow {
        frontend: socket(key.addr, key.port),
        proto: proto_name(key.proto),
        scope: scope_name(key.scope),
        service: value.into(),
    }
}

/// Every active backend slot, by id.
fn read_backends(maps: &Maps) -> Result<BTreeMap<u32, Backend>, MapsError> {
    let mut out = BTreeMap::new();
    for (id, item) in maps.backends.iter().enumerate() {
        let backend = item.map_err(map_err(names::LB_BACKENDS))?;
        if backend.is_active() {
            out.insert(id as u32, backend);
        }
    }
    Ok(out)
}

/// Slots per backend id of a table.
fn shares(table: &[u32]) -> Vec<SlotShare> {
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

/// The distinct (service id, table size) pairs of the services that have a table.
fn tabled_services(services: &[(FrontendKey, Frontend)]) -> BTreeSet<(u32, u32)> {
    services
        .iter()
        .filter(|(_, s)| s.table_size != 0)
        .map(|(_, s)| (s.set_id, s.table_size))
        .collect()
}

fn read_maglev(
    maps: &Maps,
    services: &[(FrontendKey, Frontend)],
    full: bool,
) -> Result<Vec<MaglevRow>, MapsError> {
    Ok(tabled_services(services)
        .into_iter()
        .map(
            |(service_id, table_size)| match maps.maglev_table(service_id, table_size) {
                Ok(table) => MaglevRow {
                    service_id,
                    table_size,
                    backends: shares(&table),
                    table: full.then_some(table),
                    error: None,
                },
                Err(e) => MaglevRow {
                    service_id,
                    table_size,
                    backends: Vec::new(),
                    table: None,
                    error: Some(error_text(&e)),
                },
            },
        )
        .collect())
}

fn ct_row(key: &FlowKey, entry: &CtEntry, now: u64) -> CtRow {
    CtRow {
        dir: match key.dir {
            FORWARD => "forward".into(),
            REPLY => "reply".into(),
            other => format!("dir{other}"),
        },
        src: socket(key.src_addr, key.src_port),
        dst: socket(key.dst_addr, key.dst_port),
        proto: proto_name(key.proto),
        backend_id: entry.backend_id,
        service_id: entry.set_id,
        nat: socket(entry.nat_addr, entry.nat_port),
        flags: ct_flag_names(entry.flags),
        flags_raw: entry.flags,
        expires_in_s: seconds_until(entry.deadline_ns, now),
        expired: now >= entry.deadline_ns,
        snat: snat_of(entry),
    }
}

/// The SNAT end of a source-NATed entry (see [`CtRow::snat`]).
fn snat_of(entry: &CtEntry) -> Option<SocketAddrV4> {
    (entry.flags & ct_flags::SNAT != 0).then(|| socket(entry.snat_addr, entry.snat_port))
}

fn config_row(config: &NodeConfig) -> ConfigRow {
    ConfigRow {
        snat_addr: config.snat_addr.to_ip(),
        snat_port_min: config.snat_port_min,
        snat_port_max: config.snat_port_max,
        snat_enabled: predict::snat_configured(config),
        hairpin_addr: config.hairpin_addr.to_ip(),
    }
}

/// Every conntrack entry, sorted by direction then 5-tuple.
fn read_ct(maps: &Maps) -> Result<BTreeMap<CtOrder, (FlowKey, CtEntry)>, MapsError> {
    let mut rows = BTreeMap::new();
    for item in maps.ct.iter() {
        let (key, entry) = item.map_err(map_err(names::LB_CT))?;
        rows.insert(ct_order(&key), (key, entry));
    }
    Ok(rows)
}

type CtOrder = (u8, u32, u16, u32, u16, u8);

fn ct_order(key: &FlowKey) -> CtOrder {
    (
        key.dir,
        key.src_addr.to_host(),
        key.src_port.to_host(),
        key.dst_addr.to_host(),
        key.dst_port.to_host(),
        key.proto,
    )
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
                proto: proto_name(key.proto),
                src_port: entry.src_port.to_host(),
                dst_port: entry.dst_port.to_host(),
            },
        );
    }
    Ok(rows.into_values().collect())
}

fn read_ranges(maps: &Maps) -> Result<Vec<RangeRow>, MapsError> {
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

fn read_affinity(
    maps: &Maps,
    services: &[(FrontendKey, Frontend)],
    now: u64,
) -> Result<Vec<AffinityRow>, MapsError> {
    let timeouts: BTreeMap<u32, u32> = services
        .iter()
        .map(|(_, s)| (s.set_id, s.affinity_timeout_s))
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
                service_id: key.set_id,
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

/// Non-zero per-service counters, by service id.
fn read_svc_stats(maps: &Maps) -> Result<Vec<ServiceCounters>, MapsError> {
    let mut rows = Vec::new();
    for (id, item) in maps.svc_stats.iter().enumerate() {
        let per_cpu = item.map_err(map_err(names::LB_SVC_STATS))?;
        let mut total = ServiceCounters {
            service_id: id as u32,
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

fn read_verdicts(maps: &Maps) -> Result<Vec<VerdictRow>, MapsError> {
    Ok(maps
        .verdict_totals()?
        .into_iter()
        .map(|(reason, c)| VerdictRow {
            reason: reason.name(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect())
}

/// Reads the maps in `kinds` (every map when empty). `full` keeps every Maglev slot.
pub fn dump(maps: &Maps, kinds: &[MapKind], full: bool) -> Result<Dump, MapsError> {
    let want = |k: MapKind| kinds.is_empty() || kinds.contains(&k);
    let now = predict::coarse_now_ns();
    let mut out = Dump::default();
    let needs_services =
        want(MapKind::Services) || want(MapKind::Maglev) || want(MapKind::Affinity);
    let services = if needs_services {
        read_services(maps)?
    } else {
        Vec::new()
    };
    if want(MapKind::Addrs) {
        out.addrs = Some(read_addrs(maps)?);
    }
    if want(MapKind::Services) {
        out.services = Some(services.iter().map(|(k, v)| service_row(k, v)).collect());
    }
    if want(MapKind::Backends) {
        out.backends = Some(
            read_backends(maps)?
                .into_iter()
                .map(|(id, b)| BackendRow {
                    backend_id: id,
                    addr: socket(b.addr, b.port),
                    flags: backend_flag_names(b.flags),
                    flags_raw: b.flags,
                })
                .collect(),
        );
    }
    if want(MapKind::Maglev) {
        out.maglev = Some(read_maglev(maps, &services, full)?);
    }
    if want(MapKind::Ct) {
        out.ct = Some(
            read_ct(maps)?
                .values()
                .map(|(k, e)| ct_row(k, e, now))
                .collect(),
        );
    }
    if want(MapKind::Frags) {
        out.frags = Some(read_frags(maps)?);
    }
    if want(MapKind::SvcStats) {
        out.svc_stats = Some(read_svc_stats(maps)?);
    }
    if want(MapKind::Verdicts) {
        out.verdicts = Some(read_verdicts(maps)?);
    }
    if want(MapKind::SrcRanges) {
        out.src_ranges = Some(read_ranges(maps)?);
    }
    if want(MapKind::Affinity) {
        out.affinity = Some(read_affinity(maps, &services, now)?);
    }
    if want(MapKind::Config) {
        out.config = Some(vec![config_row(&predict::node_config(maps)?)]);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// `service list`

/// A backend of a service, as far as the maps tell (weights are not stored: the share of Maglev
/// slots is what the datapath acts on).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceBackend {
    pub backend_id: u32,
    /// `"active"`, or `"missing"` when its slot in `LB_BACKENDS` holds no backend (new flows
    /// hashed to it are dropped until the agent repairs the service).
    pub state: String,
    /// The backend's address (active backends only).
    pub addr: Option<SocketAddrV4>,
    pub local: bool,
    /// Maglev slots pointing at it; `null` for a single backend (no table).
    pub slots: Option<u32>,
    /// Share of the table (100 for a single backend).
    pub percent: f64,
}

/// `lbctl service list`: one row per frontend.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceListRow {
    /// `"ip:port"`.
    pub frontend: SocketAddrV4,
    pub proto: String,
    pub scope: String,
    /// The frontend address is a ClusterIP (unknown ports are rejected).
    pub cluster_ip: bool,
    #[serde(flatten)]
    pub service: ServiceValue,
    /// CIDRs of `source_range_id` (empty when it is 0).
    pub source_ranges: Vec<String>,
    pub backends: Vec<ServiceBackend>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Why the Maglev table could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn service_backend(maps: &Maps, id: u32, slots: Option<u32>, size: u32) -> ServiceBackend {
    let backend = maps.backends.get(&id, 0).ok().filter(Backend::is_active);
    ServiceBackend {
        backend_id: id,
        state: if backend.is_some() {
            "active"
        } else {
            "missing"
        }
        .into(),
        addr: backend.map(|b| socket(b.addr, b.port)),
        local: backend.is_some_and(|b| b.flags & backend_flags::LOCAL != 0),
        slots,
        percent: slots.map_or(100.0, |s| percent(s, size)),
    }
}

/// One row per frontend: its service, backends (from the Maglev table or the single backend),
/// source ranges and counters.
pub fn service_list(maps: &Maps) -> Result<Vec<ServiceListRow>, MapsError> {
    let services = read_services(maps)?;
    let ranges = read_ranges(maps)?;
    let mut tables: BTreeMap<(u32, u32), Result<Vec<SlotShare>, String>> = BTreeMap::new();
    for (id, size) in tabled_services(&services) {
        let table = maps
            .maglev_table(id, size)
            .map(|t| shares(&t))
            .map_err(|e| error_text(&e));
        tables.insert((id, size), table);
    }
    let mut rows = Vec::new();
    for (key, svc) in &services {
        let cluster_ip = maps
            .addrs
            .get(&key.addr, 0)
            .is_ok_and(|a| a.flags & addr_flags::CLUSTER_IP != 0);
        let mut error = None;
        let backends = if svc.backend_count == 0 {
            Vec::new()
        } else if svc.table_size == 0 {
            vec![service_backend(maps, svc.backend_id, None, 0)]
        } else {
            match &tables[&(svc.set_id, svc.table_size)] {
                Ok(shares) => shares
                    .iter()
                    .map(|s| service_backend(maps, s.backend_id, Some(s.slots), svc.table_size))
                    .collect(),
                Err(e) => {
                    error = Some(e.clone());
                    Vec::new()
                }
            }
        };
        let counters = maps.service_totals(svc.set_id)?;
        rows.push(ServiceListRow {
            frontend: socket(key.addr, key.port),
            proto: proto_name(key.proto),
            scope: scope_name(key.scope),
            cluster_ip,
            service: svc.into(),
            source_ranges: ranges
                .iter()
                .filter(|r| svc.source_range_id != 0 && r.range_id == svc.source_range_id)
                .map(|r| r.cidr.clone())
                .collect(),
            backends,
            packets: counters.packets,
            bytes: counters.bytes,
            new_flows: counters.new_flows,
            error,
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// `ct list`

/// One direction of a flow.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CtSide {
    pub flags: Vec<String>,
    pub flags_raw: u8,
    pub expires_in_s: i64,
    pub expired: bool,
}

/// `lbctl ct list`: one row per flow, its forward and reply entries paired.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowRow {
    pub proto: String,
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub service_id: u32,
    pub backend_id: u32,
    /// The entry keyed client -> frontend (`null` when only the reply entry is left).
    pub forward: Option<CtSide>,
    /// The entry keyed backend -> client, or backend -> `snat` for a source-NATed flow (`null`
    /// when only the forward entry is left).
    pub reply: Option<CtSide>,
    /// Source-NATed flows (an external client and a backend on another node, or a hairpin
    /// flow): the node address and port (or hairpin address and port) the client is translated
    /// to, as the backend sees it; else `null`.
    pub snat: Option<SocketAddrV4>,
}

fn ct_side(entry: &CtEntry, now: u64) -> CtSide {
    CtSide {
        flags: ct_flag_names(entry.flags),
        flags_raw: entry.flags,
        expires_in_s: seconds_until(entry.deadline_ns, now),
        expired: now >= entry.deadline_ns,
    }
}

/// The conntrack entries as flows: every forward entry with its reply entry when that exists,
/// then the reply entries left over.
pub fn ct_list(maps: &Maps) -> Result<Vec<FlowRow>, MapsError> {
    let now = predict::coarse_now_ns();
    let entries = read_ct(maps)?;
    let mut paired = BTreeSet::new();
    let mut rows = Vec::new();
    for (key, entry) in entries.values().filter(|(k, _)| k.dir == FORWARD) {
        let client = socket(key.src_addr, key.src_port);
        let snat = snat_of(entry);
        // Replies address the client, or the node address and port it was translated to.
        let reply_to = snat.unwrap_or(client);
        let reply_key = FlowKey {
            src_addr: entry.nat_addr,
            dst_addr: Be32::from(*reply_to.ip()),
            src_port: entry.nat_port,
            dst_port: Be16::from_host(reply_to.port()),
            proto: key.proto,
            dir: REPLY,
            _pad: [0; 2],
        };
        let reply = entries.get(&ct_order(&reply_key)).filter(|(_, r)| {
            r.nat_addr == key.dst_addr
                && r.nat_port == key.dst_port
                && (snat.is_none() || snat_of(r) == Some(client))
        });
        if reply.is_some() {
            paired.insert(ct_order(&reply_key));
        }
        rows.push(FlowRow {
            proto: proto_name(key.proto),
            client,
            frontend: socket(key.dst_addr, key.dst_port),
            backend: socket(entry.nat_addr, entry.nat_port),
            service_id: entry.set_id,
            backend_id: entry.backend_id,
            forward: Some(ct_side(entry, now)),
            reply: reply.map(|(_, r)| ct_side(r, now)),
            snat,
        });
    }
    for (order, (key, entry)) in &entries {
        if key.dir != REPLY || paired.contains(order) {
            continue;
        }
        // A source-NATed flow's reply is keyed by the node's address and port; the client is
        // in the entry.
        let to = socket(key.dst_addr, key.dst_port);
        let (client, snat) = match snat_of(entry) {
            Some(client) => (client, Some(to)),
            None => (to, None),
        };
        rows.push(FlowRow {
            proto: proto_name(key.proto),
            client,
            frontend: socket(entry.nat_addr, entry.nat_port),
            backend: socket(key.src_addr, key.src_port),
            service_id: entry.set_id,
            backend_id: entry.backend_id,
            forward: None,
            reply: Some(ct_side(entry, now)),
            snat,
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// `stats`

/// `lbctl stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Every reason, in `Reason` order, zeros included.
    pub verdicts: Vec<VerdictRow>,
    /// Services with a non-zero counter, by id.
    pub services: Vec<ServiceCounters>,
}

pub fn stats(maps: &Maps) -> Result<Stats, MapsError> {
    Ok(Stats {
        verdicts: read_verdicts(maps)?,
        services: read_svc_stats(maps)?,
    })
}

// ---------------------------------------------------------------------------------------------
// `trace`

/// How a new flow's backend was chosen (`method` tells which).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum TraceSelection {
    /// The service's only backend (no Maglev table).
    Single,
    /// Maglev slot `slot` = `hash % table_size`.
    Maglev {
        hash: u32,
        slot: u32,
        table_size: u32,
    },
    /// sessionAffinity hit: the client's backend from `age_s` seconds ago.
    Affinity {
        age_s: u64,
        timeout_s: u32,
        last_used_ns: u64,
    },
}

/// The packet as it leaves the hook when the datapath passes (forwards, bounces) it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TracePacket {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// Source NAT of a flow: from outside the cluster to a backend on another node (`kind`
/// `"node"`), or a pod balanced to itself (`"hairpin"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TraceSnat {
    /// `"node"` or `"hairpin"`.
    pub kind: &'static str,
    /// The address and port that stand for the client towards the backend (the node's SNAT
    /// address, or the hairpin address with the client's port): the forward packets' new
    /// source, the replies' destination.
    pub addr: SocketAddrV4,
    /// The client: the forward packets' source, restored as the replies' destination.
    pub client: SocketAddrV4,
    /// New flows: the flow hash that spreads the candidate ports (else `null`).
    pub hash: Option<u32>,
    /// New flows: which candidate port was free, 0-based, of
    /// `lb_common::maps::snat::PROBES` (else `null`).
    pub probe: Option<u32>,
    /// New flows: what held the chosen port: `"free"`, `"reopened"` (this same client flow,
    /// which keeps its port) or `"time_wait"` (a flow the backend keeps in TIME_WAIT: it takes
    /// the SYN if its timestamp is newer, else answers with an ACK the client resets, and the
    /// SYN goes through on its retransmission) (else `null`).
    pub port_state: Option<&'static str>,
}

/// `lbctl trace`: what the datapath does with one packet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trace {
    /// `"forward"` (client -> frontend: lb_from_pod / lb_xdp / lb_ext_in) or `"reply"`
    /// (backend -> client: lb_to_pod / lb_ext_out).
    pub direction: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: String,
    /// Forward only: `"internal"` (lb_from_pod) or `"external"` (lb_xdp, lb_ext_in).
    pub scope: Option<String>,
    /// Forward only: the packet is a bare TCP SYN.
    pub syn: bool,
    /// `not_a_frontend`, `not_served`, `reject_unknown_port`, `drop_source_range`,
    /// `reject_no_backend`, `drop_no_backend`, `established`, `new_flow`, `drop_snat_ports`,
    /// `snat_reply` (the reply of a source-NATed flow reaching the node), `hairpin_reply` (the
    /// reply of a hairpin flow), `inconsistent`; reply: `reverse_nat`, `not_tracked`,
    /// `snat_untouched` (the reply of a source-NATed or hairpin flow, which the reply path
    /// leaves alone).
    pub decision: String,
    /// `"pass"` (possibly rewritten), `"drop"`, `"reject"` (a TCP RST or ICMP port
    /// unreachable goes back out of the interface instead), `"forward"`: rewritten and routed
    /// to its next hop by this node (source-NATed flows and their replies): a FIB lookup sends
    /// it straight out (XDP_TX / redirect; at XDP a next hop whose MAC is unknown leaves the
    /// packet untouched to the tc program behind it; no route: dropped as `drop_no_route`); or
    /// `"bounce"`: rewritten
    /// and sent straight back out of the interface it came in on, MAC addresses swapped (hairpin
    /// flows, back into the pod).
    pub verdict: String,
    /// The `LB_VERDICTS` counter the packet bumps, `null` when it is not counted. With verdict
    /// `"forward"`, `forwarded` counts it too when the FIB lookup resolves.
    pub reason: Option<&'static str>,
    /// The service the frontend maps to (forward decisions after the service lookup).
    pub service: Option<ServiceValue>,
    /// The backend set: the service's, or the one recorded in conntrack.
    pub service_id: Option<u32>,
    pub backend_id: Option<u32>,
    pub backend: Option<SocketAddrV4>,
    /// New flows: how the backend was chosen.
    pub selection: Option<TraceSelection>,
    /// New flows of a service with session affinity: the datapath records (or refreshes) the
    /// client's affinity entry.
    pub affinity_recorded: bool,
    /// What a reject sends back: `"tcp_rst"` or `"icmp_port_unreachable"`.
    pub reject: Option<String>,
    /// The packet after translation when it passes, is forwarded or bounced (`null` when
    /// dropped or rejected).
    pub output: Option<TracePacket>,
    /// Source NAT of the flow (`established`, `new_flow`, `snat_reply`, `hairpin_reply`,
    /// `snat_untouched`), else `null`.
    pub snat: Option<TraceSnat>,
    /// The same, in words.
    pub explanation: String,
}

fn reject_kind(l4_proto: u8) -> String {
    if l4_proto == proto::TCP {
        "tcp_rst".into()
    } else {
        "icmp_port_unreachable".into()
    }
}

fn frontend_text(dst: SocketAddrV4, l4_proto: u8, scope: u8) -> String {
    format!("{dst}/{} {}", proto_name(l4_proto), scope_name(scope))
}

/// What happens to a source-NATed packet after translation, in words.
const ROUTED_TEXT: &str = "routed to its next hop by this node (FIB lookup; no route: dropped \
                           as drop_no_route)";

/// How a new flow's backend was chosen, in words; records the selection in `t`.
fn selection_text(t: &mut Trace, selection: Selection, src: SocketAddrV4, now: u64) -> String {
    match selection {
        Selection::Single => {
            t.selection = Some(TraceSelection::Single);
            "its single backend".to_owned()
        }
        Selection::Maglev {
            hash,
            slot,
            table_size,
        } => {
            t.selection = Some(TraceSelection::Maglev {
                hash,
                slot,
                table_size,
            });
            format!("Maglev slot {slot} of {table_size} (flow hash {hash:#010x})")
        }
        Selection::Affinity {
            last_used_ns,
            timeout_s,
        } => {
            let age_s = now.saturating_sub(last_used_ns) / SECOND_NS;
            t.selection = Some(TraceSelection::Affinity {
                age_s,
                timeout_s,
                last_used_ns,
            });
            format!(
                "session affinity: {} got this backend {age_s} s ago (timeout {timeout_s} s)",
                src.ip()
            )
        }
    }
}

/// What the datapath does with the client's affinity entry for a new flow, in words.
fn affinity_text(service: &Frontend, selection: Selection, src: SocketAddrV4) -> String {
    match (service.affinity_timeout_s != 0, selection) {
        (false, _) => String::new(),
        (true, Selection::Affinity { .. }) => "; the affinity entry is refreshed".to_owned(),
        (true, _) => format!(
            "; no live affinity entry for {}, the datapath records this backend for it ({} s)",
            src.ip(),
            service.affinity_timeout_s
        ),
    }
}

/// What happens to a hairpin packet after translation, in words.
const BOUNCED_TEXT: &str = "sent straight back into the interface it came from (MAC addresses \
                            swapped)";

/// [`TraceSnat::port_state`] of a port in `state`.
fn snat_port_state(state: SnatPort) -> &'static str {
    match state {
        SnatPort::Free => "free",
        SnatPort::Reopened => "reopened",
        SnatPort::TimeWait => "time_wait",
        SnatPort::Taken => "taken",
    }
}

fn snat_choice_text(choice: &SnatChoice) -> String {
    let held = match choice.state {
        SnatPort::Free | SnatPort::Taken => "",
        SnatPort::Reopened => ", the port this client flow held before",
        SnatPort::TimeWait => {
            ", in TIME_WAIT at the backend after an earlier flow (no candidate was free)"
        }
    };
    format!(
        "candidate port {} of {}, flow hash {:#010x}{held}",
        choice.probe + 1,
        snat::PROBES,
        choice.hash
    )
}

/// A [`TraceSnat`] without allocation details.
fn trace_snat(hairpin: bool, addr: SocketAddrV4, client: SocketAddrV4) -> TraceSnat {
    TraceSnat {
        kind: if hairpin { "hairpin" } else { "node" },
        addr,
        client,
        hash: None,
        probe: None,
        port_state: None,
    }
}

/// Predicts what the forward path (`lb_from_pod` for `scope::INTERNAL`, `lb_xdp` and
/// `lb_ext_in` for `scope::EXTERNAL`) does with `src -> dst`. `syn`: a bare TCP SYN (else a
/// segment without SYN).
pub fn trace_forward(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
    scope: u8,
    syn: bool,
) -> Result<Trace, MapsError> {
    let decision = predict::forward(maps, src, dst, l4_proto, scope, syn)?;
    let now = predict::coarse_now_ns();
    let frontend = frontend_text(dst, l4_proto, scope);
    let mut t = Trace {
        direction: "forward".into(),
        src,
        dst,
        proto: proto_name(l4_proto),
        scope: Some(scope_name(scope)),
        syn,
        decision: String::new(),
        verdict: "pass".into(),
        reason: None,
        service: None,
        service_id: None,
        backend_id: None,
        backend: None,
        selection: None,
        affinity_recorded: false,
        reject: None,
        output: None,
        snat: None,
        explanation: String::new(),
    };
    let with_service = |t: &mut Trace, s: &Frontend| {
        t.service = Some(s.into());
        t.service_id = Some(s.set_id);
    };
    match decision {
        Forward::NotAFrontend => {
            t.decision = "not_a_frontend".into();
            t.output = Some(TracePacket { src, dst });
            t.explanation = format!(
                "{} carries no frontend (not in LB_ADDRS): the packet passes untouched",
                dst.ip()
            );
        }
        Forward::PassNotServed { addr_flags: flags } => {
            t.decision = "not_served".into();
            t.output = Some(TracePacket { src, dst });
            t.explanation = if flags & addr_flags::HAIRPIN != 0 {
                format!(
                    "{} is the node's hairpin address and {dst}/{} is no live hairpin flow's: \
                     the packet passes untouched",
                    dst.ip(),
                    proto_name(l4_proto)
                )
            } else if flags & addr_flags::SNAT != 0 {
                format!(
                    "{} is the node's SNAT address, {dst}/{} is no live source-NATed flow's, \
                     and {frontend} is no frontend: the packet passes untouched to the stack",
                    dst.ip(),
                    proto_name(l4_proto)
                )
            } else {
                format!(
                    "{} carries frontends but not {frontend}, and it is no ClusterIP: the \
                     packet passes untouched to the stack",
                    dst.ip()
                )
            };
        }
        Forward::RejectUnknownPort => {
            t.decision = "reject_unknown_port".into();
            t.verdict = "reject".into();
            t.reason = Some(Reason::RejectUnknownPort.name());
            t.reject = Some(reject_kind(l4_proto));
            t.explanation = format!(
                "{} is a ClusterIP that does not serve {frontend}: rejected with a {}",
                dst.ip(),
                reject_text(l4_proto)
            );
        }
        Forward::DropSourceRange { frontend: service } => {
            with_service(&mut t, &service);
            t.decision = "drop_source_range".into();
            t.verdict = "drop".into();
            t.reason = Some(Reason::DropSourceRange.name());
            t.explanation = format!(
                "new flow to frontend {frontend} -> service {}: source {} is outside its \
                 loadBalancerSourceRanges (range id {}): dropped",
                service.set_id,
                src.ip(),
                service.source_range_id
            );
        }
        Forward::NoBackend {
            frontend: service,
            drop,
        } => {
            with_service(&mut t, &service);
            if drop {
                t.decision = "drop_no_backend".into();
                t.verdict = "drop".into();
                t.reason = Some(Reason::DropNoBackend.name());
                t.explanation = format!(
                    "new flow to frontend {frontend} -> service {}: no backend, and the \
                     service drops when empty: dropped",
                    service.set_id
                );
            } else {
                t.decision = "reject_no_backend".into();
                t.verdict = "reject".into();
                t.reason = Some(Reason::RejectNoBackend.name());
                t.reject = Some(reject_kind(l4_proto));
                t.explanation = format!(
                    "new flow to frontend {frontend} -> service {}: no backend: rejected with \
                     a {}",
                    service.set_id,
                    reject_text(l4_proto)
                );
            }
        }
        Forward::Established {
            set_id: service_id,
            backend_id,
            backend,
            snat,
            entry,
        } => {
            t.decision = "established".into();
            t.reason = Some(Reason::Established.name());
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(backend);
            let hairpin = entry.flags & ct_flags::HAIRPIN != 0;
            let nat = match snat {
                None => format!("DNAT: dst {dst} -> {backend}, src {src} unchanged"),
                Some(addr) if hairpin => {
                    t.verdict = "bounce".into();
                    t.snat = Some(trace_snat(true, addr, src));
                    format!(
                        "DNAT: dst {dst} -> {backend}; SNAT (a hairpin flow): src {src} -> \
                         {addr}; {BOUNCED_TEXT}"
                    )
                }
                Some(addr) => {
                    t.verdict = "forward".into();
                    t.snat = Some(trace_snat(false, addr, src));
                    format!(
                        "DNAT: dst {dst} -> {backend}; SNAT (a source-NATed flow): src {src} \
                         -> {addr}; {ROUTED_TEXT}"
                    )
                }
            };
            t.output = Some(TracePacket {
                src: snat.unwrap_or(src),
                dst: backend,
            });
            t.explanation = format!(
                "established flow (conntrack entry, {}, expires in {} s) of service \
                 {service_id} -> backend {backend_id} {backend}; {nat}",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
        Forward::NewFlow {
            frontend: service,
            selection,
            backend_id,
            backend,
            snat,
        } => {
            with_service(&mut t, &service);
            t.decision = "new_flow".into();
            t.reason = Some(Reason::NewFlow.name());
            t.backend_id = Some(backend_id);
            t.backend = Some(backend);
            t.affinity_recorded = service.affinity_timeout_s != 0;
            let why = selection_text(&mut t, selection, src, now);
            let affinity = affinity_text(&service, selection, src);
            let nat = match snat {
                None => format!("DNAT: dst {dst} -> {backend}, src {src} unchanged"),
                Some(SourceNat::Hairpin(addr)) => {
                    t.verdict = "bounce".into();
                    t.snat = Some(trace_snat(true, addr, src));
                    format!(
                        "DNAT: dst {dst} -> {backend}; SNAT (hairpin: the client is the backend \
                         itself, which would drop packets from its own address): src {src} -> \
                         {addr}; {BOUNCED_TEXT}"
                    )
                }
                Some(SourceNat::Node(choice)) => {
                    t.verdict = "forward".into();
                    t.snat = Some(TraceSnat {
                        kind: "node",
                        addr: choice.node,
                        client: src,
                        hash: Some(choice.hash),
                        probe: Some(choice.probe),
                        port_state: Some(snat_port_state(choice.state)),
                    });
                    format!(
                        "DNAT: dst {dst} -> {backend}; SNAT (from outside to a backend on \
                         another node, so that its replies come back here): src {src} -> {} \
                         ({}); {ROUTED_TEXT}",
                        choice.node,
                        snat_choice_text(&choice)
                    )
                }
            };
            t.output = Some(TracePacket {
                src: t.snat.map_or(src, |s| s.addr),
                dst: backend,
            });
            t.explanation = format!(
                "new flow to frontend {frontend} -> service {}: {why} -> backend {backend_id} \
                 {backend}{affinity}; conntrack records both directions; {nat}",
                service.set_id
            );
        }
        Forward::DropSnatPorts {
            frontend: service,
            selection,
            backend_id,
            backend,
            failure,
        } => {
            with_service(&mut t, &service);
            t.decision = "drop_snat_ports".into();
            t.verdict = "drop".into();
            t.reason = Some(Reason::DropSnatPorts.name());
            t.backend_id = Some(backend_id);
            t.backend = Some(backend);
            // The datapath picks the backend (recording affinity) before it allocates a port.
            t.affinity_recorded = service.affinity_timeout_s != 0;
            let why = selection_text(&mut t, selection, src, now);
            let affinity = affinity_text(&service, selection, src);
            let failure = match failure {
                SnatFailure::NoConfig { config } => format!(
                    "but the node has {} (LB_CONFIG: address {}, ports {}-{})",
                    if config.snat_addr.raw() == 0 {
                        "no SNAT address"
                    } else {
                        "no SNAT ports"
                    },
                    config.snat_addr.to_ip(),
                    config.snat_port_min,
                    config.snat_port_max
                ),
                SnatFailure::PortsTaken {
                    node,
                    hash,
                    candidates,
                } => {
                    let ports: Vec<String> = candidates.iter().map(u16::to_string).collect();
                    format!(
                        "but all {} candidate ports of {node} ({}; flow hash {hash:#010x}) are \
                         held by live flows of other clients to {backend}",
                        candidates.len(),
                        ports.join(", ")
                    )
                }
            };
            t.explanation = format!(
                "new flow to frontend {frontend} -> service {}: {why} -> backend {backend_id} \
                 {backend}{affinity}, which runs on another node: a flow from outside must be \
                 source-NATed to this node, {failure}: dropped",
                service.set_id
            );
        }
        Forward::SnatReply {
            frontend: restored,
            client,
            set_id: service_id,
            backend_id,
            entry,
        } => {
            t.decision = "snat_reply".into();
            t.verdict = "forward".into();
            t.reason = Some(Reason::ReplyNat.name());
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(src);
            t.output = Some(TracePacket {
                src: restored,
                dst: client,
            });
            t.snat = Some(trace_snat(false, dst, client));
            t.explanation = format!(
                "reply of a source-NATed flow of service {service_id} to the node's SNAT \
                 address and port (conntrack entry, {}, expires in {} s): src {src} -> \
                 {restored}, dst {dst} -> {client}; {ROUTED_TEXT}",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
        Forward::HairpinReply {
            frontend: restored,
            client,
            set_id: service_id,
            backend_id,
            entry,
        } => {
            t.decision = "hairpin_reply".into();
            t.verdict = "bounce".into();
            t.reason = Some(Reason::ReplyNat.name());
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(src);
            t.output = Some(TracePacket {
                src: restored,
                dst: client,
            });
            t.snat = Some(trace_snat(true, dst, client));
            t.explanation = format!(
                "reply of a hairpin flow of service {service_id} (a pod balanced to itself) to \
                 the hairpin address (conntrack entry, {}, expires in {} s): src {src} -> \
                 {restored}, dst {dst} -> {client}; {BOUNCED_TEXT}",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
        Forward::Inconsistent {
            frontend: service,
            detail,
        } => {
            with_service(&mut t, &service);
            t.decision = "inconsistent".into();
            t.verdict = "drop".into();
            t.reason = Some(Reason::DropNoTable.name());
            t.explanation = format!(
                "new flow to frontend {frontend} -> service {}: its state is inconsistent \
                 ({detail}): dropped until the agent repairs it",
                service.set_id
            );
        }
    }
    Ok(t)
}

fn reject_text(l4_proto: u8) -> &'static str {
    if l4_proto == proto::TCP {
        "TCP RST"
    } else {
        "ICMP port unreachable"
    }
}

fn flags_text(flags: &[String]) -> String {
    if flags.is_empty() {
        "no flags".into()
    } else {
        flags.join(",")
    }
}

/// Predicts what the reply path (`lb_to_pod`, `lb_ext_out`) does with `src -> dst` (a backend
/// answering).
pub fn trace_reply(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
) -> Result<Trace, MapsError> {
    let decision = predict::reply(maps, src, dst, l4_proto)?;
    let now = predict::coarse_now_ns();
    let mut t = Trace {
        direction: "reply".into(),
        src,
        dst,
        proto: proto_name(l4_proto),
        scope: None,
        syn: false,
        decision: String::new(),
        verdict: "pass".into(),
        reason: None,
        service: None,
        service_id: None,
        backend_id: None,
        backend: None,
        selection: None,
        affinity_recorded: false,
        reject: None,
        output: None,
        snat: None,
        explanation: String::new(),
    };
    match decision {
        Reply::NotTracked => {
            t.decision = "not_tracked".into();
            t.output = Some(TracePacket { src, dst });
            t.explanation = format!(
                "no live reply entry for {src} -> {dst}/{}: not a reply of a load-balanced \
                 flow, the packet passes untouched",
                proto_name(l4_proto)
            );
        }
        Reply::ReverseNat {
            frontend,
            set_id: service_id,
            backend_id,
            entry,
        } => {
            t.decision = "reverse_nat".into();
            t.reason = Some(Reason::ReplyNat.name());
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(src);
            t.output = Some(TracePacket { src: frontend, dst });
            t.explanation = format!(
                "reply of a flow of service {service_id} (conntrack entry, {}, expires in {} s): \
                 reverse NAT: src {src} -> {frontend}, dst {dst} unchanged",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
        Reply::SnatUntouched {
            frontend,
            client,
            set_id: service_id,
            backend_id,
            hairpin,
            entry,
        } => {
            t.decision = "snat_untouched".into();
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(src);
            t.output = Some(TracePacket { src, dst });
            t.snat = Some(trace_snat(hairpin, dst, client));
            let (what, where_, scope) = if hairpin {
                ("a hairpin flow", "as it leaves the pod", "internal")
            } else {
                (
                    "a source-NATed flow",
                    "where it reaches this node",
                    "external",
                )
            };
            t.explanation = format!(
                "reply of {what} of service {service_id} (conntrack entry, {}, expires in {} \
                 s): the reply path leaves it alone, the packet passes untouched; {where_}, the \
                 forward path translates it (src {src} -> {frontend}, dst {dst} -> {client}): \
                 trace it without --reply, with --scope {scope}",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
    }
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// Table rendering.

/// kubectl-like: a rule under the header, nothing else (see comfy_table's preset format).
const TABLE_STYLE: &str = "     ──            ";

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(TABLE_STYLE)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn joined(flags: &[String]) -> String {
    if flags.is_empty() {
        "-".into()
    } else {
        flags.join(",")
    }
}

fn section(out: &mut String, name: &str, rows: usize, t: Table) {
    let plural = if rows == 1 { "entry" } else { "entries" };
    let _ = writeln!(out, "{name} ({rows} {plural})");
    if rows == 0 {
        out.push_str("  (empty)\n\n");
    } else {
        let _ = writeln!(out, "{t}\n");
    }
}

/// `lbctl maps dump` as tables, one per map.
pub fn render_dump(d: &Dump) -> String {
    let mut out = String::new();
    if let Some(rows) = &d.addrs {
        let mut t = table(&["address", "flags"]);
        for r in rows {
            t.add_row(vec![r.addr.to_string(), joined(&r.flags)]);
        }
        section(&mut out, names::LB_ADDRS, rows.len(), t);
    }
    if let Some(rows) = &d.services {
        let mut t = table(&[
            "frontend",
            "proto",
            "scope",
            "service",
            "backends",
            "backend id",
            "table size",
            "flags",
            "affinity s",
            "range id",
        ]);
        for r in rows {
            let s = &r.service;
            t.add_row(vec![
                r.frontend.to_string(),
                r.proto.clone(),
                r.scope.clone(),
                s.service_id.to_string(),
                s.backend_count.to_string(),
                s.backend_id.to_string(),
                s.table_size.to_string(),
                joined(&s.flags),
                s.affinity_timeout_s.to_string(),
                s.source_range_id.to_string(),
            ]);
        }
        section(&mut out, names::LB_SERVICES, rows.len(), t);
    }
    if let Some(rows) = &d.backends {
        let mut t = table(&["backend id", "address", "flags"]);
        for r in rows {
            t.add_row(vec![
                r.backend_id.to_string(),
                r.addr.to_string(),
                joined(&r.flags),
            ]);
        }
        section(&mut out, names::LB_BACKENDS, rows.len(), t);
    }
    if let Some(rows) = &d.maglev {
        let mut t = table(&["service", "table size", "backend id", "slots", "%"]);
        for r in rows {
            if let Some(e) = &r.error {
                t.add_row(vec![
                    r.service_id.to_string(),
                    r.table_size.to_string(),
                    format!("error: {e}"),
                    String::new(),
                    String::new(),
                ]);
            }
            for s in &r.backends {
                t.add_row(vec![
                    r.service_id.to_string(),
                    r.table_size.to_string(),
                    s.backend_id.to_string(),
                    s.slots.to_string(),
                    format!("{:.2}", s.percent),
                ]);
            }
        }
        section(&mut out, names::LB_MAGLEV, rows.len(), t);
        for r in rows {
            if let Some(table) = &r.table {
                let _ = writeln!(
                    out,
                    "service {} table ({} slots):",
                    r.service_id,
                    table.len()
                );
                for (i, line) in table.chunks(16).enumerate() {
                    let ids: Vec<String> = line.iter().map(u32::to_string).collect();
                    let _ = writeln!(out, "  {:>6}: {}", i * 16, ids.join(" "));
                }
                out.push('\n');
            }
        }
    }
    if let Some(rows) = &d.ct {
        let mut t = table(&[
            "dir",
            "src",
            "dst",
            "proto",
            "nat",
            "backend id",
            "service",
            "flags",
            "expires s",
            "snat",
        ]);
        for r in rows {
            t.add_row(vec![
                r.dir.clone(),
                r.src.to_string(),
                r.dst.to_string(),
                r.proto.clone(),
                r.nat.to_string(),
                r.backend_id.to_string(),
                r.service_id.to_string(),
                joined(&r.flags),
                expiry(r.expires_in_s, r.expired),
                opt(r.snat),
            ]);
        }
        section(&mut out, names::LB_CT, rows.len(), t);
    }
    if let Some(rows) = &d.frags {
        let mut t = table(&["src", "dst", "ip id", "proto", "src port", "dst port"]);
        for r in rows {
            t.add_row(vec![
                r.src.to_string(),
                r.dst.to_string(),
                r.ip_id.to_string(),
                r.proto.clone(),
                r.src_port.to_string(),
                r.dst_port.to_string(),
            ]);
        }
        section(&mut out, names::LB_FRAGS, rows.len(), t);
    }
    if let Some(rows) = &d.svc_stats {
        section(
            &mut out,
            names::LB_SVC_STATS,
            rows.len(),
            counters_table(rows),
        );
    }
    if let Some(rows) = &d.verdicts {
        section(
            &mut out,
            names::LB_VERDICTS,
            rows.len(),
            verdicts_table(rows),
        );
    }
    if let Some(rows) = &d.src_ranges {
        let mut t = table(&["range id", "cidr"]);
        for r in rows {
            t.add_row(vec![r.range_id.to_string(), r.cidr.clone()]);
        }
        section(&mut out, names::LB_SRC_RANGES, rows.len(), t);
    }
    if let Some(rows) = &d.affinity {
        let mut t = table(&[
            "client",
            "service",
            "backend id",
            "backend",
            "age s",
            "timeout s",
            "expires s",
        ]);
        for r in rows {
            t.add_row(vec![
                r.client.to_string(),
                r.service_id.to_string(),
                r.backend_id.to_string(),
                opt(r.backend),
                r.age_s.to_string(),
                opt(r.timeout_s),
                r.expires_in_s
                    .map_or_else(|| "-".into(), |s| expiry(s, s < 0)),
            ]);
        }
        section(&mut out, names::LB_AFFINITY, rows.len(), t);
    }
    if let Some(rows) = &d.config {
        let mut t = table(&["snat address", "snat ports", "snat", "hairpin address"]);
        for r in rows {
            t.add_row(vec![
                r.snat_addr.to_string(),
                format!("{}-{}", r.snat_port_min, r.snat_port_max),
                if r.snat_enabled {
                    "enabled".to_owned()
                } else {
                    "disabled (external flows to other nodes' backends are dropped)".to_owned()
                },
                r.hairpin_addr.to_string(),
            ]);
        }
        section(&mut out, names::LB_CONFIG, rows.len(), t);
    }
    out
}

fn expiry(seconds: i64, expired: bool) -> String {
    if expired {
        format!("expired ({}s ago)", -seconds)
    } else {
        seconds.to_string()
    }
}

fn counters_table(rows: &[ServiceCounters]) -> Table {
    let mut t = table(&["service", "packets", "bytes", "new flows"]);
    for r in rows {
        t.add_row(vec![
            r.service_id.to_string(),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.new_flows.to_string(),
        ]);
    }
    t
}

fn verdicts_table(rows: &[VerdictRow]) -> Table {
    let mut t = table(&["reason", "packets", "bytes"]);
    for r in rows {
        t.add_row(vec![
            r.reason.to_owned(),
            r.packets.to_string(),
            r.bytes.to_string(),
        ]);
    }
    t
}

/// `lbctl service list` as a table: one row per frontend, backends one per line.
pub fn render_services(rows: &[ServiceListRow]) -> String {
    // Counters belong to the backend set, which a Service's frontends share (its ClusterIP and
    // NodePorts): the headers say so, so that equal figures on two rows are not read as traffic
    // that each frontend took.
    let mut t = table(&[
        "frontend",
        "set",
        "backends (slots)",
        "flags",
        "set packets",
        "set bytes",
        "set new flows",
    ]);
    for r in rows {
        let s = &r.service;
        let backends = if r.backends.is_empty() {
            r.error
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |e| format!("error: {e}"))
        } else {
            r.backends
                .iter()
                .map(|b| {
                    let share = match b.slots {
                        Some(slots) => format!("{slots} slots, {:.2}%", b.percent),
                        None => "single".to_owned(),
                    };
                    let local = if b.local { " local" } else { "" };
                    match b.addr {
                        Some(addr) => {
                            format!("{} {addr} {}{local} ({share})", b.backend_id, b.state)
                        }
                        None => format!("{} {} ({share})", b.backend_id, b.state),
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut flags = s.flags.clone();
        if s.affinity_timeout_s != 0 {
            flags.push(format!("affinity {}s", s.affinity_timeout_s));
        }
        if s.source_range_id != 0 {
            flags.push(format!(
                "ranges #{}: {}",
                s.source_range_id,
                if r.source_ranges.is_empty() {
                    "(none: every source dropped)".to_owned()
                } else {
                    r.source_ranges.join(" ")
                }
            ));
        }
        if r.cluster_ip {
            flags.insert(0, "cluster_ip".into());
        }
        t.add_row(vec![
            format!("{}/{} {}", r.frontend, r.proto, r.scope),
            s.service_id.to_string(),
            backends,
            if flags.is_empty() {
                "-".into()
            } else {
                flags.join("\n")
            },
            r.packets.to_string(),
            r.bytes.to_string(),
            r.new_flows.to_string(),
        ]);
    }
    if rows.is_empty() {
        return "no frontends installed\n".into();
    }
    format!("{t}\n")
}

/// `lbctl ct list` as a table.
pub fn render_flows(rows: &[FlowRow]) -> String {
    if rows.is_empty() {
        return "no conntrack entries\n".into();
    }
    let side = |s: &Option<CtSide>| {
        s.as_ref().map_or_else(
            || "(none)".to_owned(),
            |s| {
                let life = if s.expired {
                    format!("expired {}s ago", -s.expires_in_s)
                } else {
                    format!("{}s left", s.expires_in_s)
                };
                if s.flags.is_empty() {
                    life
                } else {
                    format!("{} {life}", s.flags.join(","))
                }
            },
        )
    };
    let mut t = table(&[
        "proto", "client", "frontend", "backend", "service", "forward", "reply", "snat",
    ]);
    for r in rows {
        t.add_row(vec![
            r.proto.clone(),
            r.client.to_string(),
            r.frontend.to_string(),
            format!("{} (id {})", r.backend, r.backend_id),
            r.service_id.to_string(),
            side(&r.forward),
            side(&r.reply),
            opt(r.snat),
        ]);
    }
    format!("{t}\n")
}

/// `lbctl stats` as two tables.
pub fn render_stats(s: &Stats) -> String {
    let mut out = String::from("verdicts\n");
    let _ = writeln!(out, "{}\n", verdicts_table(&s.verdicts));
    out.push_str("services\n");
    if s.services.is_empty() {
        out.push_str("  (no traffic counted)\n");
    } else {
        let _ = writeln!(out, "{}", counters_table(&s.services));
    }
    out
}

/// `lbctl trace` as lines of text.
pub fn render_trace(t: &Trace) -> String {
    let mut out = String::new();
    let scope = t
        .scope
        .as_deref()
        .map_or(String::new(), |s| format!(" {s}"));
    let syn = if t.syn { " SYN" } else { "" };
    let _ = writeln!(
        out,
        "{} {} -> {}/{}{scope}{syn}",
        t.direction, t.src, t.dst, t.proto
    );
    let _ = writeln!(out, "  decision: {} ({})", t.decision, t.verdict);
    if let Some(reason) = t.reason {
        let _ = writeln!(out, "  counted:  {reason}");
    }
    if let Some(id) = t.service_id {
        let _ = writeln!(out, "  service:  {id}");
    }
    if let (Some(id), Some(b)) = (t.backend_id, t.backend) {
        let _ = writeln!(out, "  backend:  {id} {b}");
    }
    if let Some(sel) = &t.selection {
        let how = match sel {
            TraceSelection::Single => "single backend".to_owned(),
            TraceSelection::Maglev {
                hash,
                slot,
                table_size,
            } => format!("maglev slot {slot}/{table_size} hash {hash:#010x}"),
            TraceSelection::Affinity {
                age_s, timeout_s, ..
            } => {
                format!("session affinity ({age_s}s old, timeout {timeout_s}s)")
            }
        };
        let _ = writeln!(out, "  chosen:   {how}");
    }
    if let Some(s) = &t.snat {
        let how = match (s.probe, s.hash) {
            (Some(probe), Some(hash)) => format!(
                " (candidate port {} of {}, flow hash {hash:#010x}{})",
                probe + 1,
                snat::PROBES,
                match s.port_state {
                    Some(state) if state != "free" => format!(", {state}"),
                    _ => String::new(),
                }
            ),
            _ => String::new(),
        };
        let kind = if s.kind == "hairpin" {
            " (hairpin)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  snat:     client {} as {}{how}{kind}",
            s.client, s.addr
        );
    }
    if let Some(p) = t.output {
        let _ = writeln!(out, "  output:   {} -> {}", p.src, p.dst);
    }
    match t.verdict.as_str() {
        "forward" => {
            let _ = writeln!(out, "  routed:   {ROUTED_TEXT}");
        }
        "bounce" => {
            let _ = writeln!(out, "  bounced:  {BOUNCED_TEXT}");
        }
        _ => {}
    }
    if let Some(r) = &t.reject {
        let _ = writeln!(out, "  sends:    {r} to {}", t.src);
    }
    let _ = writeln!(out, "  why:      {}", t.explanation);
    out
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
                && err.contains("LB_CONFIG (config)"),
            "{err}"
        );
    }

    #[test]
    fn flags_name_known_bits_and_show_the_rest() {
        assert_eq!(ct_flag_names(0), Vec::<String>::new());
        assert_eq!(
            ct_flag_names(ct_flags::ESTABLISHED | ct_flags::FIN),
            ["established", "fin"]
        );
        assert_eq!(
            backend_flag_names(backend_flags::ACTIVE | 0x80),
            ["active", "0x80"]
        );
        assert_eq!(addr_flag_names(1), ["cluster_ip"]);
        assert_eq!(
            addr_flag_names(addr_flags::CLUSTER_IP | addr_flags::SNAT),
            ["cluster_ip", "snat"]
        );
        assert_eq!(
            ct_flag_names(ct_flags::ESTABLISHED | ct_flags::SNAT | ct_flags::HAIRPIN),
            ["established", "snat", "hairpin"]
        );
        assert_eq!(addr_flag_names(addr_flags::HAIRPIN), ["hairpin"]);
        assert_eq!(service_flag_names(1), ["drop_when_empty"]);
    }

    #[test]
    fn lifetimes_round_towards_zero_and_go_negative() {
        assert_eq!(seconds_until(10 * SECOND_NS + 5, 5), 10);
        assert_eq!(seconds_until(5, 5 + 3 * SECOND_NS), -3);
        assert_eq!(seconds_until(5, 5), 0);
    }

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
    fn trace_json_field_names_are_stable() {
        let t = Trace {
            direction: "forward".into(),
            src: "10.0.0.1:1000".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            proto: proto_name(proto::TCP),
            scope: Some(scope_name(scope::INTERNAL)),
            syn: true,
            decision: "new_flow".into(),
            verdict: "pass".into(),
            reason: Some("new_flow"),
            service: None,
            service_id: Some(1),
            backend_id: Some(2),
            backend: Some("10.0.0.3:8080".parse().unwrap()),
            selection: Some(TraceSelection::Maglev {
                hash: 7,
                slot: 7,
                table_size: 13,
            }),
            affinity_recorded: false,
            reject: None,
            output: Some(TracePacket {
                src: "10.0.0.1:1000".parse().unwrap(),
                dst: "10.0.0.3:8080".parse().unwrap(),
            }),
            snat: None,
            explanation: String::new(),
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["selection"]["method"], "maglev");
        assert_eq!(v["output"]["dst"], "10.0.0.3:8080");
        assert_eq!(v["scope"], "internal");
        assert_eq!(v["proto"], "tcp");
        assert!(v["snat"].is_null());
        assert!(render_trace(&t).contains("maglev slot 7/13"));

        let snatted = Trace {
            verdict: "forward".into(),
            snat: Some(TraceSnat {
                kind: "node",
                addr: "192.168.50.10:61234".parse().unwrap(),
                client: "10.0.0.1:1000".parse().unwrap(),
                hash: Some(7),
                probe: Some(1),
                port_state: Some("time_wait"),
            }),
            ..t
        };
        let v = serde_json::to_value(&snatted).unwrap();
        assert_eq!(
            v["snat"],
            serde_json::json!({
                "kind": "node",
                "addr": "192.168.50.10:61234",
                "client": "10.0.0.1:1000",
                "hash": 7,
                "probe": 1,
                "port_state": "time_wait",
            })
        );
        let text = render_trace(&snatted);
        assert!(
            text.contains(
                "snat:     client 10.0.0.1:1000 as 192.168.50.10:61234 (candidate port 2 of 8"
            ) && text.contains("routed:   routed to its next hop"),
            "{text}"
        );
    }
}
