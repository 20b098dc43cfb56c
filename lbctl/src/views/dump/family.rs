//! The maps each address family has its own of: addresses, frontends, backends and conntrack
//! (`LB_ADDRS` and `LB6_ADDRS`, ...). One row type and one reader per map, generic over the
//! family's address ([`MapAddress`]), so that both families dump in the same shape; only the
//! addresses differ (`"10.0.0.1:80"`, `"[fd00::1]:80"`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use aya::maps::MapError;
use lb_common::{
    conntrack::{CtEntryOf, FlowKeyOf},
    maps::{
        self as names, AddrInfo, BackendOf, Frontend, FrontendKey, FrontendKey6, FrontendKeyOf,
    },
};
use lb_datapath::maps::{Maps, MapsError};
use serde::Serialize;

use super::{Dump, MapKind};
use crate::{
    decode::{
        AddrFlag, BackendFlag, CtDir, CtFlag, Flags, MapAddress, Proto, Scope, seconds_until,
        socket,
    },
    views::rows::{self, ServiceValue, map_err},
};

/// A row of `LB_ADDRS` (`I` = `Ipv4Addr`) or `LB6_ADDRS` (`Ipv6Addr`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AddrRow<I = Ipv4Addr> {
    pub addr: I,
    /// `cluster_ip`, `snat` (the node's SNAT address), `hairpin` (the hairpin address); see
    /// `LB_CONFIG`.
    pub flags: Flags<AddrFlag>,
    pub flags_raw: u32,
}

/// A row of `LB_SERVICES` (`S` = `SocketAddrV4`) or `LB6_SERVICES` (`SocketAddrV6`): a
/// frontend and its service value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceRow<S = SocketAddrV4> {
    /// `"ip:port"`, `"[ip]:port"`.
    pub frontend: S,
    pub proto: Proto,
    pub scope: Scope,
    #[serde(flatten)]
    pub service: ServiceValue,
}

/// An active slot of `LB_BACKENDS` (`S` = `SocketAddrV4`) or `LB6_BACKENDS` (`SocketAddrV6`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendRow<S = SocketAddrV4> {
    pub backend_id: u32,
    pub addr: S,
    pub flags: Flags<BackendFlag>,
    pub flags_raw: u8,
}

/// A conntrack entry of `LB_CT` (`S` = `SocketAddrV4`) or `LB6_CT` (`SocketAddrV6`), decoded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CtRow<S = SocketAddrV4> {
    /// `"forward"` (keyed client -> frontend) or `"reply"` (keyed backend -> client).
    pub dir: CtDir,
    pub src: S,
    pub dst: S,
    pub proto: Proto,
    pub backend_id: u32,
    /// The backend set the flow was balanced by; `service_id` in the JSON, whose field names
    /// stay.
    #[serde(rename = "service_id")]
    pub set_id: u32,
    /// Forward: the backend the flow is DNATed to. Reply: the frontend restored as source.
    pub nat: S,
    pub flags: Flags<CtFlag>,
    pub flags_raw: u8,
    /// Seconds until the entry stops counting (negative: expired, awaiting LRU eviction).
    pub expires_in_s: i64,
    pub expired: bool,
    /// Source-NATed flows (flag `snat`) only, else `null`. Forward: the node address and port
    /// (or, with flag `hairpin`, the hairpin address and port) that replace the client as the
    /// source. Reply (keyed backend -> that address and port): the client, restored as the
    /// destination.
    pub snat: Option<S>,
    /// Direct server return (`lb_common::dsr`). Forward: routed to the backend's node with the
    /// client's address, the replies going straight back from there. Reply, on the backend's
    /// node: `nat` is another node's frontend, and the forward entry lives there.
    pub dsr: bool,
}

/// `LB6_ADDRS`' rows.
pub type AddrRow6 = AddrRow<Ipv6Addr>;
/// `LB6_SERVICES`' rows.
pub type ServiceRow6 = ServiceRow<SocketAddrV6>;
/// `LB6_BACKENDS`' rows.
pub type BackendRow6 = BackendRow<SocketAddrV6>;
/// `LB6_CT`'s rows.
pub type CtRow6 = CtRow<SocketAddrV6>;

/// The frontends of both families, sorted; read once, as several maps' rows need them.
#[derive(Default)]
pub struct Frontends {
    pub v4: Vec<(FrontendKey, Frontend)>,
    pub v6: Vec<(FrontendKey6, Frontend)>,
}

impl Frontends {
    /// Reads `LB_SERVICES` and `LB6_SERVICES`.
    pub fn read(maps: &Maps) -> Result<Self, MapsError> {
        Ok(Self {
            v4: rows::read_services(maps)?,
            v6: rows::sorted_frontends(maps.services6.iter(), names::LB6_SERVICES)?,
        })
    }

    /// Every frontend's value, of either family: both use the same backend sets (one id space,
    /// one Maglev map).
    pub fn values(&self) -> impl Iterator<Item = &Frontend> {
        let v4 = self.v4.iter().map(|(_, f)| f);
        v4.chain(self.v6.iter().map(|(_, f)| f))
    }
}

/// Fills in the rows of the maps of both families that `want` asks for.
pub fn fill(
    out: &mut Dump,
    maps: &Maps,
    frontends: &Frontends,
    want: impl Fn(MapKind) -> bool,
    now: u64,
) -> Result<(), MapsError> {
    if want(MapKind::Addrs) {
        out.addrs = Some(addr_rows(maps.addrs.iter(), names::LB_ADDRS)?);
    }
    if want(MapKind::Addrs6) {
        out.addrs6 = Some(addr_rows(maps.addrs6.iter(), names::LB6_ADDRS)?);
    }
    if want(MapKind::Services) {
        out.services = Some(service_rows(&frontends.v4));
    }
    if want(MapKind::Services6) {
        out.services6 = Some(service_rows(&frontends.v6));
    }
    if want(MapKind::Backends) {
        out.backends = Some(backend_rows(maps.backends.iter(), names::LB_BACKENDS)?);
    }
    if want(MapKind::Backends6) {
        out.backends6 = Some(backend_rows(maps.backends6.iter(), names::LB6_BACKENDS)?);
    }
    if want(MapKind::Ct) {
        out.ct = Some(ct_rows(maps.ct.iter(), names::LB_CT, now)?);
    }
    if want(MapKind::Ct6) {
        out.ct6 = Some(ct_rows(maps.ct6.iter(), names::LB6_CT, now)?);
    }
    Ok(())
}

/// The rows of address map `name` that `entries` iterates, by address.
fn addr_rows<A: MapAddress>(
    entries: impl IntoIterator<Item = Result<(A, AddrInfo), MapError>>,
    name: &'static str,
) -> Result<Vec<AddrRow<A::Ip>>, MapsError> {
    let mut rows = Vec::new();
    for item in entries {
        let (addr, info) = item.map_err(map_err(name))?;
        rows.push(addr_row(addr, &info));
    }
    rows.sort_by_key(|r| r.addr);
    Ok(rows)
}

fn addr_row<A: MapAddress>(addr: A, info: &AddrInfo) -> AddrRow<A::Ip> {
    AddrRow {
        addr: addr.ip(),
        flags: Flags::decode(info.flags),
        flags_raw: info.flags,
    }
}

fn service_rows<A: MapAddress>(
    frontends: &[(FrontendKeyOf<A>, Frontend)],
) -> Vec<ServiceRow<A::Socket>> {
    frontends.iter().map(|(k, v)| service_row(k, v)).collect()
}

fn service_row<A: MapAddress>(key: &FrontendKeyOf<A>, value: &Frontend) -> ServiceRow<A::Socket> {
    ServiceRow {
        frontend: socket(key.addr, key.port),
        proto: key.proto.into(),
        scope: key.scope.into(),
        service: value.into(),
    }
}

/// The active slots of backend array `name` that `slots` iterates, by id.
fn backend_rows<A: MapAddress>(
    slots: impl IntoIterator<Item = Result<BackendOf<A>, MapError>>,
    name: &'static str,
) -> Result<Vec<BackendRow<A::Socket>>, MapsError> {
    Ok(rows::active_backends(slots, name)?
        .into_iter()
        .map(|(id, b)| backend_row(id, &b))
        .collect())
}

fn backend_row<A: MapAddress>(id: u32, b: &BackendOf<A>) -> BackendRow<A::Socket> {
    BackendRow {
        backend_id: id,
        addr: socket(b.addr, b.port),
        flags: Flags::decode(b.flags),
        flags_raw: b.flags,
    }
}

/// The entries of conntrack map `name` that `entries` iterates, by direction then 5-tuple.
fn ct_rows<A: MapAddress>(
    entries: impl IntoIterator<Item = Result<(FlowKeyOf<A>, CtEntryOf<A>), MapError>>,
    name: &'static str,
    now: u64,
) -> Result<Vec<CtRow<A::Socket>>, MapsError> {
    Ok(rows::sorted_ct(entries, name)?
        .values()
        .map(|(k, e)| ct_row(k, e, now))
        .collect())
}

fn ct_row<A: MapAddress>(key: &FlowKeyOf<A>, entry: &CtEntryOf<A>, now: u64) -> CtRow<A::Socket> {
    CtRow {
        dir: key.dir.into(),
        src: socket(key.src_addr, key.src_port),
        dst: socket(key.dst_addr, key.dst_port),
        proto: key.proto.into(),
        backend_id: entry.backend_id,
        set_id: entry.set_id,
        nat: socket(entry.nat_addr, entry.nat_port),
        flags: Flags::decode(entry.flags),
        flags_raw: entry.flags,
        expires_in_s: seconds_until(entry.deadline_ns, now),
        expired: now >= entry.deadline_ns,
        snat: rows::snat_of(entry),
        dsr: entry.dsr(),
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{
        Be16, Be32, Be128,
        conntrack::{CtEntry, CtEntry6, FORWARD, FlowKey, FlowKey6, ct_flags},
        maps::{Backend6, addr_flags, backend_flags, scope},
        net::proto,
    };
    use serde_json::{Value, json};

    use super::*;
    use crate::decode::SECOND_NS;

    fn v6(text: &str) -> Be128 {
        Be128::from(text.parse::<Ipv6Addr>().unwrap())
    }

    fn v4(text: &str) -> Be32 {
        Be32::from(text.parse::<Ipv4Addr>().unwrap())
    }

    fn port(p: u16) -> Be16 {
        Be16::from_host(p)
    }

    /// A row's JSON field names: what both families must share.
    fn fields(row: &Value) -> Vec<&String> {
        row.as_object().unwrap().keys().collect()
    }

    #[test]
    fn ipv6_conntrack_entries_read_like_ipv4_ones() {
        let key = FlowKey6::new(
            v6("fd00::2"),
            port(40000),
            v6("fd00:96::10"),
            port(80),
            proto::TCP,
            FORWARD,
        );
        let entry = CtEntry6 {
            deadline_ns: 70 * SECOND_NS,
            backend_id: 7,
            set_id: 3,
            nat_addr: v6("fd00:1::5"),
            nat_port: port(8080),
            flags: ct_flags::ESTABLISHED | ct_flags::SNAT,
            snat_addr: v6("fd00:50::10"),
            snat_port: port(30000),
            ..Default::default()
        };
        let row = serde_json::to_value(ct_row(&key, &entry, 10 * SECOND_NS)).unwrap();
        assert_eq!(
            row,
            json!({
                "dir": "forward",
                "src": "[fd00::2]:40000",
                "dst": "[fd00:96::10]:80",
                "proto": "tcp",
                "backend_id": 7,
                "service_id": 3,
                "nat": "[fd00:1::5]:8080",
                "flags": ["established", "snat"],
                "flags_raw": 9,
                "expires_in_s": 60,
                "expired": false,
                "snat": "[fd00:50::10]:30000",
                "dsr": false,
            })
        );
        let key4 = FlowKey::new(
            v4("10.0.0.2"),
            port(40000),
            v4("172.30.0.10"),
            port(80),
            proto::TCP,
            FORWARD,
        );
        let row4 = serde_json::to_value(ct_row(&key4, &CtEntry::default(), 0)).unwrap();
        assert_eq!(fields(&row), fields(&row4));
    }

    #[test]
    fn ipv6_addresses_frontends_and_backends_read_like_ipv4_ones() {
        let info = AddrInfo {
            flags: addr_flags::CLUSTER_IP,
        };
        let addr = serde_json::to_value(addr_row(v6("fd00:96::10"), &info)).unwrap();
        assert_eq!(
            addr,
            json!({"addr": "fd00:96::10", "flags": ["cluster_ip"], "flags_raw": 1})
        );
        let key = FrontendKey6 {
            addr: v6("fd00:96::10"),
            port: port(443),
            proto: proto::UDP,
            scope: scope::EXTERNAL,
        };
        let frontend = Frontend {
            set_id: 4,
            backend_count: 1,
            backend_id: 9,
            ..Default::default()
        };
        let service = serde_json::to_value(service_row(&key, &frontend)).unwrap();
        assert_eq!(service["frontend"], "[fd00:96::10]:443");
        assert_eq!(
            (&service["proto"], &service["scope"]),
            (&json!("udp"), &json!("external"))
        );
        let key4 = FrontendKey::new(
            Ipv4Addr::new(172, 30, 0, 10),
            443,
            proto::UDP,
            scope::EXTERNAL,
        );
        let service4 = serde_json::to_value(service_row(&key4, &frontend)).unwrap();
        assert_eq!(fields(&service), fields(&service4));
        let backend = Backend6 {
            addr: v6("fd00:1::5"),
            port: port(8443),
            flags: backend_flags::ACTIVE,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(backend_row(9, &backend)).unwrap(),
            json!({"backend_id": 9, "addr": "[fd00:1::5]:8443", "flags": ["active"], "flags_raw": 1})
        );
    }

    /// Rows sort by address as a number, whatever the family.
    #[test]
    fn ipv6_rows_sort_by_address() {
        let info = AddrInfo::default();
        let entries = ["fd00::10", "fd00::9", "::1"].map(|a| Ok((v6(a), info)));
        let rows = addr_rows(entries, names::LB6_ADDRS).unwrap();
        let order: Vec<String> = rows.iter().map(|r| r.addr.to_string()).collect();
        assert_eq!(order, ["::1", "fd00::9", "fd00::10"]);
        let inactive = Backend6::default();
        let active = Backend6 {
            flags: backend_flags::ACTIVE,
            ..inactive
        };
        let slots = [inactive, active, inactive, active].map(Ok);
        let ids: Vec<u32> = backend_rows(slots, names::LB6_BACKENDS)
            .unwrap()
            .iter()
            .map(|r| r.backend_id)
            .collect();
        assert_eq!(ids, [1, 3], "active slots only, by id");
    }
}
