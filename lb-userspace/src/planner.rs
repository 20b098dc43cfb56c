//! Desired state versus what is programmed: the map writes that turn one into the other, and
//! nothing more. A pure function: the agent's shadow of the maps ([`Programmed`]) goes in, an
//! ordered [`Plan`] comes out, and [`Programmed::commit`] records it once written.
//!
//! Order never exposes half a service: backends, source ranges and Maglev tables first, then the
//! frontends that use them, then their addresses; deletions in reverse (addresses, frontends,
//! tables, ranges, backends). Ids (backend slots, backend-set ids, range ids) stay with what they
//! name for as long as it exists, so an update rewrites only what changed and a resync with no
//! change plans nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use ipnet::Ipv4Net;
use lb_common::{
    Be16, Be32,
    maps::{AddrInfo, Backend, Service, ServiceKey, addr_flags, backend_flags, service_flags},
    net::proto,
};

use crate::model::{Desired, DesiredBackend, FrontendKey, SetName};

/// Map capacities the plan must fit in (entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub backends: u32,
    pub set_ids: u32,
    pub frontends: u32,
    pub addrs: u32,
    pub ranges: u32,
    /// Maglev table size for backend sets with more than one backend.
    pub table_size: u32,
}

/// A backend set as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetState {
    pub id: u32,
    /// Sorted by address.
    pub members: Vec<DesiredBackend>,
    /// The Maglev table's size, 0 when the set has no table.
    pub table_size: u32,
}

/// What the maps hold, as far as the agent knows (its shadow, rebuilt from the maps at start).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub backends: BTreeMap<SocketAddrV4, (u32, Backend)>,
    pub sets: BTreeMap<SetName, SetState>,
    pub frontends: BTreeMap<ServiceKey, Service>,
    pub addrs: BTreeMap<Be32, AddrInfo>,
    /// Range id -> its CIDRs (sorted).
    pub ranges: BTreeMap<u32, Vec<Ipv4Net>>,
    /// Set ids found holding a Maglev table at start that no desired set took over: removed once
    /// the frontends that might still use them are re-pointed, their ids reserved until then.
    pub orphan_tables: BTreeSet<u32>,
}

/// A Maglev table to build and install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableWrite {
    pub set_id: u32,
    pub table_size: u32,
    /// (backend id, backend address) of every member that takes new flows.
    pub members: Vec<(u32, SocketAddrV4)>,
}

/// The writes, in the order they must happen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub backends: Vec<(u32, Backend)>,
    pub ranges_added: Vec<(u32, Ipv4Net)>,
    pub tables: Vec<TableWrite>,
    /// Counters of newly allocated set ids, zeroed before use.
    pub stats_reset: Vec<u32>,
    pub frontends: Vec<(ServiceKey, Service)>,
    pub addrs: Vec<(Be32, AddrInfo)>,
    pub addrs_removed: Vec<Be32>,
    pub frontends_removed: Vec<ServiceKey>,
    pub tables_removed: Vec<u32>,
    pub ranges_removed: Vec<(u32, Ipv4Net)>,
    pub backends_removed: Vec<u32>,
    /// (set id, backend id) pairs whose backend stopped taking new flows: their session-affinity
    /// entries must go (and, for UDP sets, their flows, as kube-proxy flushes UDP conntrack).
    pub affinity_purge: Vec<(u32, u32)>,
    pub udp_flow_purge: Vec<(u32, u32)>,
    /// The shadow once this plan is written.
    next: Programmed,
    /// Frontends left out (with their whole service) because a map would overflow, and why.
    pub overflow: Vec<(FrontendKey, String)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
            && self.ranges_added.is_empty()
            && self.tables.is_empty()
            && self.frontends.is_empty()
            && self.addrs.is_empty()
            && self.addrs_removed.is_empty()
            && self.frontends_removed.is_empty()
            && self.tables_removed.is_empty()
            && self.ranges_removed.is_empty()
            && self.backends_removed.is_empty()
            && self.affinity_purge.is_empty()
            && self.udp_flow_purge.is_empty()
    }

    /// Number of map writes the plan makes (a table counts as one).
    pub fn writes(&self) -> usize {
        self.backends.len()
            + self.ranges_added.len()
            + self.tables.len()
            + self.frontends.len()
            + self.addrs.len()
            + self.addrs_removed.len()
            + self.frontends_removed.len()
            + self.tables_removed.len()
            + self.ranges_removed.len()
            + self.backends_removed.len()
    }
}

impl Programmed {
    /// Records a plan as written.
    pub fn commit(&mut self, plan: Plan) {
        *self = plan.next;
    }
}

/// Lowest ids not in `used`, from 1 up to `limit` (exclusive).
struct IdPool {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl IdPool {
    fn new(used: impl IntoIterator<Item = u32>, limit: u32) -> Self {
        Self {
            used: used.into_iter().collect(),
            next: 1,
            limit,
        }
    }

    /// Ids still available.
    fn free(&self) -> usize {
        (self.limit.saturating_sub(1) as usize).saturating_sub(self.used.len())
    }

    fn take(&mut self) -> Option<u32> {
        while self.next < self.limit {
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

fn backend_value(b: &DesiredBackend) -> Backend {
    Backend {
        addr: Be32::from(*b.addr.ip()),
        port: Be16::from_host(b.addr.port()),
        flags: backend_flags::ACTIVE | if b.local { backend_flags::LOCAL } else { 0 },
        _pad: 0,
    }
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
        eat(&b.addr.ip().octets());
        eat(&b.addr.port().to_be_bytes());
    }
    hash
}

fn sorted(members: &[DesiredBackend]) -> Vec<DesiredBackend> {
    let mut m = members.to_vec();
    m.sort_unstable();
    m
}

/// Plans the writes that make the maps hold `desired`.
pub fn plan(desired: &Desired, current: &Programmed, limits: &Limits) -> Plan {
    let mut plan = Plan::default();
    let mut next = Programmed::default();

    // Frontends that fit: each needs its set (an id), its backends (slots) and its address.
    let mut set_pool = IdPool::new(
        current
            .sets
            .values()
            .map(|s| s.id)
            .chain(current.orphan_tables.iter().copied()),
        limits.set_ids,
    );
    let mut backend_pool = IdPool::new(
        current.backends.values().map(|(id, _)| *id),
        limits.backends,
    );
    let mut range_pool = IdPool::new(current.ranges.keys().copied(), u32::MAX);
    let mut range_ids: BTreeMap<Vec<Ipv4Net>, u32> = current
        .ranges
        .iter()
        .map(|(id, nets)| (nets.clone(), *id))
        .collect();
    // Range CIDRs already programmed stay counted until the plan removes them.
    let range_entries_now: usize = current.ranges.values().map(Vec::len).sum();
    let mut range_entries = 0usize;
    let mut addr_count = 0usize;

    // Frontends grouped by Kubernetes service: a service fits whole or not at all, so that no
    // service is ever half programmed when a map is full.
    let mut by_service: BTreeMap<(&str, &str), Vec<&crate::model::DesiredFrontend>> =
        BTreeMap::new();
    for frontend in desired.frontends.values() {
        if desired.sets.contains_key(&frontend.set) {
            by_service
                .entry((&frontend.set.namespace, &frontend.set.service))
                .or_default()
                .push(frontend);
        }
    }
    for frontends in by_service.values() {
        // What this service adds, checked against what is left before anything is taken.
        let new_sets: BTreeSet<&SetName> = frontends
            .iter()
            .map(|f| &f.set)
            .filter(|n| !next.sets.contains_key(*n))
            .collect();
        let new_set_ids = new_sets
            .iter()
            .filter(|n| !current.sets.contains_key(**n))
            .count();
        let new_backends: BTreeSet<SocketAddrV4> = new_sets
            .iter()
            .flat_map(|n| desired.sets[*n].iter().map(|b| b.addr))
            .filter(|a| !next.backends.contains_key(a) && !current.backends.contains_key(a))
            .collect();
        let new_addrs: BTreeSet<Be32> = frontends
            .iter()
            .map(|f| Be32::from(f.key.addr))
            .filter(|a| !next.addrs.contains_key(a))
            .collect();
        let new_ranges: BTreeSet<&Vec<Ipv4Net>> = frontends
            .iter()
            .map(|f| &f.source_ranges)
            .filter(|r| !r.is_empty() && !range_ids.contains_key(*r))
            .collect();
        let new_range_entries: usize = new_ranges.iter().map(|r| r.len()).sum();
        let full = if next.frontends.len() + frontends.len() > limits.frontends as usize {
            Some("map LB_SERVICES is full")
        } else if set_pool.free() < new_set_ids {
            Some("no backend-set id left (raise --max-services)")
        } else if backend_pool.free() < new_backends.len() {
            Some("map LB_BACKENDS is full")
        } else if addr_count + new_addrs.len() > limits.addrs as usize {
            Some("map LB_ADDRS is full")
        } else if range_entries_now + range_entries + new_range_entries > limits.ranges as usize {
            Some("map LB_SRC_RANGES is full")
        } else {
            None
        };
        if let Some(reason) = full {
            plan.overflow
                .extend(frontends.iter().map(|f| (f.key, reason.to_owned())));
            continue;
        }

        for frontend in frontends {
            let key = &frontend.key;
            if !next.sets.contains_key(&frontend.set) {
                let members = &desired.sets[&frontend.set];
                let id = match current.sets.get(&frontend.set) {
                    Some(s) => s.id,
                    None => {
                        let id = set_pool.take().expect("checked above");
                        plan.stats_reset.push(id);
                        id
                    }
                };
                for b in members {
                    next.backends.entry(b.addr).or_insert_with(|| {
                        let id = current.backends.get(&b.addr).map_or_else(
                            || backend_pool.take().expect("checked above"),
                            |(id, _)| *id,
                        );
                        (id, backend_value(b))
                    });
                }
                let members = sorted(members);
                let selectable = members.iter().filter(|b| b.selectable()).count();
                let table_size = if selectable > 1 { limits.table_size } else { 0 };
                next.sets.insert(
                    frontend.set.clone(),
                    SetState {
                        id,
                        members,
                        table_size,
                    },
                );
            }
            let mut range_id = 0;
            if !frontend.source_ranges.is_empty() {
                let nets = &frontend.source_ranges;
                range_id = match range_ids.get(nets) {
                    Some(id) => *id,
                    None => {
                        let id = range_pool.take().expect("range ids are plentiful");
                        range_entries += nets.len();
                        range_ids.insert(nets.clone(), id);
                        id
                    }
                };
                next.ranges.insert(range_id, nets.clone());
            }
            let addr = Be32::from(key.addr);
            let info = next.addrs.entry(addr).or_insert_with(|| {
                addr_count += 1;
                AddrInfo::default()
            });
            if frontend.kind == crate::model::FrontendKind::ClusterIp {
                info.flags |= addr_flags::CLUSTER_IP;
            }
            let set = &next.sets[&frontend.set];
            let selectable: Vec<&DesiredBackend> =
                set.members.iter().filter(|b| b.selectable()).collect();
            let value = Service {
                id: set.id,
                backend_count: selectable.len() as u32,
                backend_id: match selectable.as_slice() {
                    [only] => next.backends[&only.addr].0,
                    _ => 0,
                },
                table_size: set.table_size,
                flags: if frontend.drop_when_empty {
                    service_flags::DROP_WHEN_EMPTY
                } else {
                    0
                },
                affinity_timeout_s: frontend.affinity_timeout_s,
                source_range_id: range_id,
                table_digest: table_digest(&set.members, set.table_size),
            };
            next.frontends.insert(key.map_key(), value);
        }
    }

    // Writes: what is new or different.
    for (addr, (id, value)) in &next.backends {
        if current.backends.get(addr) != Some(&(*id, *value)) {
            plan.backends.push((*id, *value));
        }
    }
    for (id, nets) in &next.ranges {
        if !current.ranges.contains_key(id) {
            plan.ranges_added.extend(nets.iter().map(|n| (*id, *n)));
        }
    }
    for (name, set) in &next.sets {
        let unchanged = current.sets.get(name).is_some_and(|c| {
            c.id == set.id && c.members == set.members && c.table_size == set.table_size
        });
        if set.table_size > 0 && !unchanged {
            plan.tables.push(TableWrite {
                set_id: set.id,
                table_size: set.table_size,
                members: set
                    .members
                    .iter()
                    .filter(|b| b.selectable())
                    .map(|b| (next.backends[&b.addr].0, b.addr))
                    .collect(),
            });
        }
        // Backends that stopped taking new flows from this set.
        if let Some(old) = current.sets.get(name).filter(|c| c.id == set.id) {
            let now: BTreeSet<SocketAddrV4> = set
                .members
                .iter()
                .filter(|b| b.selectable())
                .map(|b| b.addr)
                .collect();
            for gone in old
                .members
                .iter()
                .filter(|b| b.selectable() && !now.contains(&b.addr))
            {
                if let Some((backend_id, _)) = current.backends.get(&gone.addr) {
                    plan.affinity_purge.push((set.id, *backend_id));
                    if name.proto == proto::UDP {
                        plan.udp_flow_purge.push((set.id, *backend_id));
                    }
                }
            }
        }
    }
    for (key, value) in &next.frontends {
        if current.frontends.get(key) != Some(value) {
            plan.frontends.push((*key, *value));
        }
    }
    for (addr, info) in &next.addrs {
        if current.addrs.get(addr) != Some(info) {
            plan.addrs.push((*addr, *info));
        }
    }

    // Removals, in reverse order of dependency.
    plan.addrs_removed = current
        .addrs
        .keys()
        .filter(|a| !next.addrs.contains_key(a))
        .copied()
        .collect();
    plan.frontends_removed = current
        .frontends
        .keys()
        .filter(|k| !next.frontends.contains_key(k))
        .copied()
        .collect();
    for (name, set) in &current.sets {
        let kept_table = next
            .sets
            .get(name)
            .is_some_and(|n| n.id == set.id && n.table_size > 0);
        if set.table_size > 0 && !kept_table {
            plan.tables_removed.push(set.id);
        }
        if !next.sets.contains_key(name) {
            for b in set.members.iter().filter(|b| b.selectable()) {
                if let Some((backend_id, _)) = current.backends.get(&b.addr) {
                    plan.affinity_purge.push((set.id, *backend_id));
                    if name.proto == proto::UDP {
                        plan.udp_flow_purge.push((set.id, *backend_id));
                    }
                }
            }
        }
    }
    plan.tables_removed
        .extend(current.orphan_tables.iter().copied());
    for (id, nets) in &current.ranges {
        if !next.ranges.contains_key(id) {
            plan.ranges_removed.extend(nets.iter().map(|n| (*id, *n)));
        }
    }
    plan.backends_removed = current
        .backends
        .iter()
        .filter(|(addr, _)| !next.backends.contains_key(addr))
        .map(|(_, (id, _))| *id)
        .collect();
    plan.next = next;
    plan
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::maps::scope;

    use super::*;
    use crate::model::{DesiredFrontend, FrontendKind, SetKind};

    const LIMITS: Limits = Limits {
        backends: 1000,
        set_ids: 100,
        frontends: 1000,
        addrs: 1000,
        ranges: 100,
        table_size: 251,
    };

    fn set(service: &str, kind: SetKind) -> SetName {
        SetName {
            namespace: "ns".into(),
            service: service.into(),
            port_name: String::new(),
            proto: proto::TCP,
            kind,
        }
    }

    fn backend(last: u8, weight: u32) -> DesiredBackend {
        DesiredBackend {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 8080),
            local: true,
            weight,
        }
    }

    /// A desired state of `services` ClusterIPs (172.30.0.N:80), service N with backends
    /// 10.0.0.(N*10 + i) for i < `per_service`.
    fn desired(services: &[(u8, &[DesiredBackend])]) -> Desired {
        let mut d = Desired::default();
        for (n, backends) in services {
            let name = set(&format!("svc{n}"), SetKind::Cluster);
            let key = FrontendKey {
                addr: Ipv4Addr::new(172, 30, 0, *n),
                port: 80,
                proto: proto::TCP,
                scope: scope::INTERNAL,
            };
            d.sets.insert(name.clone(), backends.to_vec());
            d.frontends.insert(
                key,
                DesiredFrontend {
                    key,
                    kind: FrontendKind::ClusterIp,
                    set: name,
                    drop_when_empty: false,
                    affinity_timeout_s: 0,
                    source_ranges: Vec::new(),
                },
            );
        }
        d
    }

    fn committed(desired: &Desired) -> Programmed {
        let mut p = Programmed::default();
        p.commit(plan(desired, &Programmed::default(), &LIMITS));
        p
    }

    #[test]
    fn a_first_sync_writes_in_dependency_order() {
        let d = desired(&[
            (1, &[backend(11, 1), backend(12, 1)]),
            (2, &[backend(21, 1)]),
        ]);
        let p = plan(&d, &Programmed::default(), &LIMITS);
        assert_eq!(p.backends.len(), 3);
        assert_eq!(p.tables.len(), 1, "only the two-backend set needs a table");
        assert_eq!(p.frontends.len(), 2);
        assert_eq!(p.addrs.len(), 2);
        assert!(
            p.addrs
                .iter()
                .all(|(_, info)| info.flags & addr_flags::CLUSTER_IP != 0)
        );
        let single = p
            .frontends
            .iter()
            .find(|(k, _)| k.addr == Be32::from(Ipv4Addr::new(172, 30, 0, 2)))
            .unwrap()
            .1;
        assert_eq!((single.backend_count, single.table_size), (1, 0));
        assert_ne!(single.backend_id, 0);
        assert!(p.frontends_removed.is_empty() && p.backends_removed.is_empty());
    }

    #[test]
    fn a_resync_without_change_writes_nothing() {
        let d = desired(&[
            (1, &[backend(11, 1), backend(12, 1)]),
            (2, &[backend(21, 1)]),
        ]);
        let p = committed(&d);
        let again = plan(&d, &p, &LIMITS);
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(again.writes(), 0);
    }

    #[test]
    fn ids_stay_with_what_they_name_when_others_change() {
        let before = desired(&[
            (1, &[backend(11, 1), backend(12, 1)]),
            (2, &[backend(21, 1), backend(22, 1)]),
        ]);
        let mut p = committed(&before);
        let ids = |p: &Programmed| {
            (
                p.sets
                    .iter()
                    .map(|(n, s)| (n.clone(), s.id))
                    .collect::<Vec<_>>(),
                p.backends.clone(),
            )
        };
        let (sets_before, backends_before) = ids(&p);
        // Service 2 loses a backend; service 3 appears.
        let after = desired(&[
            (1, &[backend(11, 1), backend(12, 1)]),
            (2, &[backend(21, 1)]),
            (3, &[backend(31, 1)]),
        ]);
        let next = plan(&after, &p, &LIMITS);
        assert_eq!(
            next.tables_removed.len(),
            1,
            "service 2 is down to one backend: no table"
        );
        assert_eq!(next.backends_removed.len(), 1);
        assert_eq!(
            next.affinity_purge.len(),
            1,
            "the backend that left loses its affinity entries"
        );
        p.commit(next);
        let (sets_after, backends_after) = ids(&p);
        for (name, id) in &sets_before {
            assert!(
                sets_after.contains(&(name.clone(), *id)),
                "{name} kept id {id}"
            );
        }
        for (addr, value) in &backends_before {
            if addr.ip().octets()[3] != 22 {
                assert_eq!(backends_after.get(addr), Some(value));
            }
        }
    }

    #[test]
    fn a_set_change_programs_the_new_set_before_the_frontend_and_drops_the_old_after() {
        let d = desired(&[(1, &[backend(11, 1), backend(12, 1)])]);
        let p = committed(&d);
        let mut moved = d.clone();
        let local = set("svc1", SetKind::Local);
        moved.sets.clear();
        moved
            .sets
            .insert(local.clone(), vec![backend(11, 1), backend(13, 1)]);
        for f in moved.frontends.values_mut() {
            f.set = local.clone();
        }
        let next = plan(&moved, &p, &LIMITS);
        let new_id = next.tables[0].set_id;
        assert_ne!(new_id, p.sets[&set("svc1", SetKind::Cluster)].id);
        assert_eq!(next.frontends[0].1.id, new_id);
        assert_eq!(
            next.tables_removed,
            [p.sets[&set("svc1", SetKind::Cluster)].id]
        );
        assert_eq!(next.stats_reset, [new_id]);
    }

    #[test]
    fn weight_zero_backends_keep_their_slot_but_take_no_new_flow() {
        let d = desired(&[(1, &[backend(11, 1), backend(12, 0)])]);
        let p = plan(&d, &Programmed::default(), &LIMITS);
        assert_eq!(
            p.backends.len(),
            2,
            "both slots exist for established flows"
        );
        assert!(p.tables.is_empty(), "one selectable backend needs no table");
        let value = p.frontends[0].1;
        assert_eq!(value.backend_count, 1);
    }

    #[test]
    fn a_service_that_does_not_fit_is_left_out_whole() {
        let limits = Limits {
            backends: 4,
            ..LIMITS
        };
        // Backend ids run from 1: three slots. Service 1 takes two, service 2 needs two more.
        let d = desired(&[
            (1, &[backend(11, 1), backend(12, 1)]),
            (2, &[backend(21, 1), backend(22, 1)]),
        ]);
        let p = plan(&d, &Programmed::default(), &limits);
        assert_eq!(p.frontends.len(), 1);
        assert_eq!(p.overflow.len(), 1);
        assert!(p.overflow[0].1.contains("LB_BACKENDS"));
        assert_eq!(p.backends.len(), 2, "nothing of service 2 is written");
    }

    #[test]
    fn source_ranges_get_one_id_per_distinct_list() {
        let mut d = desired(&[(1, &[backend(11, 1)]), (2, &[backend(21, 1)])]);
        let nets: Vec<Ipv4Net> = vec!["10.0.0.0/8".parse().unwrap()];
        for f in d.frontends.values_mut() {
            f.source_ranges = nets.clone();
        }
        let p = plan(&d, &Programmed::default(), &LIMITS);
        assert_eq!(p.ranges_added.len(), 1, "shared by both frontends");
        assert!(
            p.frontends
                .iter()
                .all(|(_, v)| v.source_range_id == p.ranges_added[0].0)
        );
    }
}
