//! `lbctl service list`: one row per frontend (IPv4 ones, then IPv6 ones), with its backend set's
//! backends (their share of the Maglev table), source ranges and counters.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::maps::{
    self as names, AddrInfo, BackendOf, Frontend, FrontendKeyOf, addr_flags, backend_flags,
};
use lb_datapath::maps::{Maps, MapsError};
use serde::Serialize;

use super::rows::{self, RangeRow, ServiceValue, SlotShare};
use crate::decode::{MapAddress, Proto, Scope, display_serialized};

/// A backend of a service, as far as the maps tell (weights are not stored: the share of Maglev
/// slots is what the datapath acts on).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceBackend {
    pub backend_id: u32,
    pub state: BackendState,
    /// The backend's address (active backends only).
    pub addr: Option<SocketAddr>,
    pub local: bool,
    /// Maglev slots pointing at it; `null` for a single backend (no table).
    pub slots: Option<u32>,
    /// Share of the table (100 for a single backend).
    pub percent: f64,
}

/// Whether a backend the set names is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    Active,
    /// Its slot in `LB_BACKENDS` holds no backend: new flows hashed to it are dropped until
    /// the agent repairs the service.
    Missing,
}

display_serialized!(BackendState);

/// `lbctl service list`: one row per frontend.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceListRow {
    /// `"ip:port"`, `"[ip6]:port"`.
    pub frontend: SocketAddr,
    pub proto: Proto,
    pub scope: Scope,
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
    /// What the socket programs did for the set's frontends (socket-level balancing): these
    /// connections and datagrams never met the packet path, so its counters do not show them.
    pub socket: SocketCounters,
    /// Why the Maglev table could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The set's socket-level counters (`LB_SOCK_STATS`, summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SocketCounters {
    /// `connect()`s sent to a backend.
    pub connects: u64,
    /// Unconnected UDP datagrams sent to a backend.
    pub datagrams: u64,
    /// Calls refused at once (no backend).
    pub refused: u64,
}

/// One row per frontend: its service, backends (from the Maglev table or the single backend),
/// source ranges and counters.
pub fn list(maps: &Maps) -> Result<Vec<ServiceListRow>, MapsError> {
    let services = rows::read_services(maps)?;
    let services6 = rows::sorted_frontends(maps.services6.iter(), names::LB6_SERVICES)?;
    let ranges = rows::read_ranges(maps)?;
    let mut tables: BTreeMap<(u32, u32), Result<Vec<SlotShare>, String>> = BTreeMap::new();
    let values = services.iter().map(|(_, s)| s);
    for (id, size) in rows::tabled_sets(values.chain(services6.iter().map(|(_, s)| s))) {
        let table = maps
            .maglev_table(id, size)
            .map(|t| rows::shares(&t))
            .map_err(|e| rows::error_text(&e));
        tables.insert((id, size), table);
    }
    let family = Family {
        maps,
        ranges: &ranges,
        tables: &tables,
    };
    let mut out = family.rows(
        &services,
        |addr| maps.addrs.get(addr, 0).ok(),
        |id| maps.backends.get(&id, 0).ok(),
    )?;
    out.extend(family.rows(
        &services6,
        |addr| maps.addrs6.get(addr, 0).ok(),
        |id| maps.backends6.get(&id, 0).ok(),
    )?);
    Ok(out)
}

/// What one family's rows are built from.
struct Family<'a> {
    maps: &'a Maps,
    ranges: &'a [RangeRow],
    tables: &'a BTreeMap<(u32, u32), Result<Vec<SlotShare>, String>>,
}

impl Family<'_> {
    /// The rows of `services`, one family's frontends: `addr_info` reads an address's entry in
    /// that family's `LB_ADDRS`, `backend_at` a slot of its backends array.
    fn rows<A: MapAddress>(
        &self,
        services: &[(FrontendKeyOf<A>, Frontend)],
        addr_info: impl Fn(&A) -> Option<AddrInfo>,
        backend_at: impl Fn(u32) -> Option<BackendOf<A>>,
    ) -> Result<Vec<ServiceListRow>, MapsError>
    where
        A::Socket: Into<SocketAddr>,
    {
        let backend = |id: u32, slots: Option<u32>, size: u32| {
            let backend = backend_at(id).filter(BackendOf::is_active);
            ServiceBackend {
                backend_id: id,
                state: if backend.is_some() {
                    BackendState::Active
                } else {
                    BackendState::Missing
                },
                addr: backend.map(|b| b.addr.with_port(b.port).into()),
                local: backend.is_some_and(|b| b.flags & backend_flags::LOCAL != 0),
                slots,
                percent: slots.map_or(100.0, |s| rows::percent(s, size)),
            }
        };
        let mut out = Vec::new();
        for (key, svc) in services {
            let cluster_ip =
                addr_info(&key.addr).is_some_and(|a| a.flags & addr_flags::CLUSTER_IP != 0);
            let mut error = None;
            let backends = if svc.backend_count == 0 {
                Vec::new()
            } else if svc.table_size == 0 {
                vec![backend(svc.backend_id, None, 0)]
            } else {
                match &self.tables[&(svc.set_id, svc.table_size)] {
                    Ok(shares) => shares
                        .iter()
                        .map(|s| backend(s.backend_id, Some(s.slots), svc.table_size))
                        .collect(),
                    Err(e) => {
                        error = Some(e.clone());
                        Vec::new()
                    }
                }
            };
            let counters = self.maps.set_totals(svc.set_id)?;
            let sock = self.maps.sock_totals(svc.set_id)?;
            out.push(ServiceListRow {
                frontend: key.addr.with_port(key.port).into(),
                proto: key.proto.into(),
                scope: key.scope.into(),
                cluster_ip,
                service: svc.into(),
                source_ranges: self
                    .ranges
                    .iter()
                    .filter(|r| svc.source_range_id != 0 && r.range_id == svc.source_range_id)
                    .map(|r| r.cidr.clone())
                    .collect(),
                backends,
                packets: counters.packets,
                bytes: counters.bytes,
                new_flows: counters.new_flows,
                socket: SocketCounters {
                    connects: sock.connects,
                    datagrams: sock.datagrams,
                    refused: sock.refused,
                },
                error,
            });
        }
        Ok(out)
    }
}
