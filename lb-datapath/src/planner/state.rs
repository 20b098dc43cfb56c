//! The planner's shadow of the maps ([`Programmed`]): what each map holds as far as the agent
//! knows, with the reference counts and id allocators that keep ids stable, and the capacities
//! a plan must fit in.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::Ipv4Net;
use lb_common::{
    Be16, Be32, Be128,
    maps::{AddrInfo, Backend, Backend6, Frontend, NodeConfig, backend_flags},
};

use crate::model::{AnyFrontendKey, DesiredBackend, Family, Members, SetName};

/// A backend slot's value in its family's array (`LB_BACKENDS`, `LB6_BACKENDS`). One id
/// allocator serves both: an id names a slot in one of the arrays only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnyBackend {
    V4(Backend),
    V6(Backend6),
}

impl AnyBackend {
    /// The value of an active backend at `addr`, on this node when `local`.
    pub fn active(addr: SocketAddr, local: bool) -> Self {
        let flags = backend_flags::ACTIVE | if local { backend_flags::LOCAL } else { 0 };
        let port = Be16::from_host(addr.port());
        match addr.ip() {
            IpAddr::V4(ip) => Self::V4(Backend {
                addr: Be32::from(ip),
                port,
                flags,
                _pad: 0,
            }),
            IpAddr::V6(ip) => Self::V6(Backend6 {
                addr: Be128::from(ip),
                port,
                flags,
                _pad: 0,
            }),
        }
    }

    /// The backend's address and port.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::V4(b) => SocketAddr::new(b.addr.to_ip().into(), b.port.to_host()),
            Self::V6(b) => SocketAddr::new(b.addr.to_ip().into(), b.port.to_host()),
        }
    }

    pub fn family(&self) -> Family {
        match self {
            Self::V4(_) => Family::V4,
            Self::V6(_) => Family::V6,
        }
    }
}

/// Map capacities the plan must fit in (entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub backends: u32,
    pub set_ids: u32,
    pub frontends: u32,
    pub addrs: u32,
    pub ranges: u32,
    /// Largest Maglev table (`--maglev-table-size`); sets get
    /// [`crate::maglev::table_size_for`] their backends.
    pub table_size: u32,
}

/// Hands out the lowest free ids, from 1 up to a limit (exclusive).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdAlloc {
    /// Ids given back below `high`.
    free: BTreeSet<u32>,
    /// The lowest id never handed out.
    high: u32,
}

impl IdAlloc {
    /// An allocator where `used` are taken.
    pub fn with_used(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let high = used.last().map_or(1, |max| max + 1);
        Self {
            free: (1..high).filter(|id| !used.contains(id)).collect(),
            high,
        }
    }

    pub(super) fn available(&self, limit: u32) -> usize {
        self.free.len() + limit.saturating_sub(self.high.max(1)) as usize
    }

    pub(super) fn take(&mut self, limit: u32) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        let id = self.high.max(1);
        (id < limit).then(|| {
            self.high = id + 1;
            id
        })
    }

    pub(super) fn release(&mut self, id: u32) {
        if id < self.high {
            self.free.insert(id);
        }
    }
}

/// A backend slot as programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendState {
    pub id: u32,
    pub value: AnyBackend,
    /// Sets that list it.
    pub refs: u32,
}

/// A backend set as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetState {
    pub id: u32,
    /// Sorted by address.
    pub members: Members,
    /// The Maglev table's size, 0 when the set has no table.
    pub table_size: u32,
}

/// A frontend as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    pub value: Frontend,
    /// Its backend set (unknown for an adopted frontend nothing claims any more).
    pub set: Option<SetName>,
    pub cluster_ip: bool,
}

/// A frontend address as programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrState {
    pub info: AddrInfo,
    pub refs: u32,
    pub cluster_refs: u32,
    /// `addr_flags::SNAT` / `HAIRPIN` when it is the node's SNAT or hairpin address: then it is
    /// programmed with or without frontends.
    pub node_flags: u32,
}

/// A set of source ranges as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeState {
    pub nets: Vec<Ipv4Net>,
    pub refs: u32,
}

/// What the maps hold, as far as the agent knows (its shadow, rebuilt from the maps at start).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub backends: BTreeMap<SocketAddr, BackendState>,
    pub sets: BTreeMap<SetName, SetState>,
    pub frontends: BTreeMap<AnyFrontendKey, FrontendState>,
    pub addrs: BTreeMap<IpAddr, AddrState>,
    pub ranges: BTreeMap<u32, RangeState>,
    pub config: NodeConfig,
    /// Set ids found holding a Maglev table at start that no desired set took over: removed by
    /// the first full plan, once the frontends that might use them are re-pointed.
    pub orphan_tables: BTreeSet<u32>,
    /// `LB_AFFINITY_SCOPE`'s non-zero entries: Local set id -> the id of its Cluster set, whose
    /// affinity entries it shares.
    pub affinity_scopes: BTreeMap<u32, u32>,
    pub backend_ids: IdAlloc,
    pub set_ids: IdAlloc,
    pub range_ids: IdAlloc,
}

/// Identifies what a set's Maglev table was built from (its selectable members and size): stored
/// beside the frontend so that a restarted agent can tell a current table from a stale one
/// without reading it. FNV-1a, stable across versions and machines.
pub fn table_digest(members: &[DesiredBackend], table_size: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u32::from(*b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    };
    eat(&table_size.to_be_bytes());
    for b in members.iter().filter(|b| b.selectable()) {
        match b.addr.ip() {
            IpAddr::V4(ip) => eat(&ip.octets()),
            IpAddr::V6(ip) => eat(&ip.octets()),
        }
        eat(&b.addr.port().to_be_bytes());
    }
    hash
}

/// The table size a set with these members gets.
pub fn table_size(members: &[DesiredBackend], limits: &Limits) -> u32 {
    let selectable = members.iter().filter(|b| b.selectable()).count();
    if selectable > 1 {
        crate::maglev::table_size_for(selectable, limits.table_size)
    } else {
        0
    }
}
