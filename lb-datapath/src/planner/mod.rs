//! Desired state versus what is programmed: the map writes that turn one into the other, and
//! nothing more. No I/O: [`plan`] reads the desired state, updates the agent's shadow of the maps
//! ([`Programmed`]) to what they will hold, and returns the ordered [`Plan`] of writes that gets
//! them there. If writing fails the caller drops the shadow and re-reads the maps.
//!
//! Order never exposes half a service: backends, source ranges and Maglev tables first, then the
//! frontends that use them, then their addresses; deletions in reverse (addresses, frontends,
//! tables, ranges, backends). Ids (backend slots, backend-set ids, range ids) stay with what they
//! name for as long as it exists, so an update rewrites only what changed and a resync with no
//! change plans nothing.
//!
//! A plan covers either everything ([`Extent::All`], the first sync and periodic resyncs) or
//! only the frontends and sets a change touched ([`Extent::Only`]): its cost is then that of the
//! change, not of the cluster, which keeps the latency of an endpoint change flat at any scale.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::Ipv4Net;
use lb_common::{
    maps::{AddrInfo, Frontend, NodeConfig, addr_flags},
    net::proto,
};

use crate::model::{
    AnyFrontendKey, Desired, DesiredBackend, DesiredFrontend, Family, Members, SetKind, SetName,
};

mod frontends;
mod node;
mod state;
#[cfg(test)]
mod tests;

use frontends::{remove_frontend, upsert_frontend};
pub use node::node_config;
use node::{node_addrs, update_config};
pub use state::*;

/// A Maglev table to build and install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableWrite {
    pub set_id: u32,
    pub table_size: u32,
    /// (backend id, backend address) of every member that takes new flows.
    pub members: Vec<(u32, SocketAddr)>,
}

/// The writes, in the order they must happen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub backends: Vec<(u32, AnyBackend)>,
    pub ranges_added: Vec<(u32, Ipv4Net)>,
    pub tables: Vec<TableWrite>,
    /// `LB_AFFINITY_SCOPE` writes: (set id, the set whose affinity it shares, or 0).
    pub affinity_scopes: Vec<(u32, u32)>,
    /// Counters of newly allocated set ids, zeroed before use.
    pub stats_reset: Vec<u32>,
    pub frontends: Vec<(AnyFrontendKey, Frontend)>,
    /// The node's configuration, when it changes.
    pub config: Option<NodeConfig>,
    pub addrs: Vec<(IpAddr, AddrInfo)>,
    pub addrs_removed: Vec<IpAddr>,
    pub frontends_removed: Vec<AnyFrontendKey>,
    pub tables_removed: Vec<u32>,
    pub ranges_removed: Vec<(u32, Ipv4Net)>,
    /// Slots to empty, in their family's array.
    pub backends_removed: Vec<(u32, Family)>,
    /// (set id, backend id) pairs whose backend stopped taking new flows: their session-affinity
    /// entries must go.
    pub affinity_purge: Vec<(u32, u32)>,
    /// (set id, backend address) of UDP sets whose backend stopped serving or left: their flows
    /// must go, as kube-proxy flushes UDP conntrack (by address: its slot may be reused).
    pub udp_flow_purge: Vec<(u32, SocketAddr)>,
    /// Frontends left out (with their whole service) because a map would overflow, and why.
    pub overflow: Vec<(AnyFrontendKey, String)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.writes() == 0 && self.affinity_purge.is_empty() && self.udp_flow_purge.is_empty()
    }

    /// Number of map writes the plan makes (a table counts as one).
    pub fn writes(&self) -> usize {
        self.backends.len()
            + self.ranges_added.len()
            + self.tables.len()
            + self.affinity_scopes.len()
            + self.frontends.len()
            + usize::from(self.config.is_some())
            + self.addrs.len()
            + self.addrs_removed.len()
            + self.frontends_removed.len()
            + self.tables_removed.len()
            + self.ranges_removed.len()
            + self.backends_removed.len()
    }
}

/// What a change may have touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub frontends: BTreeSet<AnyFrontendKey>,
    pub sets: BTreeSet<SetName>,
}

/// How much of the desired state a plan looks at.
#[derive(Clone, Copy, Debug)]
pub enum Extent<'a> {
    /// Everything, removing whatever the maps hold that is not desired.
    All,
    /// Only what a change touched; everything else is known to be programmed already.
    Only(&'a Scope),
}

fn backend_value(b: &DesiredBackend) -> AnyBackend {
    AnyBackend::active(b.addr, b.local)
}

/// `members` sorted by address (the translation already sorts them: then they are shared).
fn sorted(members: &Members) -> Members {
    if members.is_sorted() {
        return members.clone();
    }
    let mut m = members.to_vec();
    m.sort_unstable();
    m.into()
}

/// Plans the writes that make the maps hold `desired` (within `extent`), and updates `current`
/// to what they will hold once written.
pub fn plan(
    desired: &Desired,
    current: &mut Programmed,
    limits: &Limits,
    extent: Extent<'_>,
) -> Plan {
    let mut plan = Plan::default();

    // What this plan looks at.
    let (keys, mut names): (BTreeSet<AnyFrontendKey>, BTreeSet<SetName>) = match extent {
        Extent::All => (
            desired
                .frontends
                .keys()
                .copied()
                .chain(current.frontends.keys().copied())
                .collect(),
            desired
                .sets
                .keys()
                .cloned()
                .chain(current.sets.keys().cloned())
                .collect(),
        ),
        Extent::Only(scope) => (scope.frontends.clone(), scope.sets.clone()),
    };
    for key in &keys {
        if let Some(f) = desired.frontends.get(key) {
            names.insert(f.set.clone());
        }
    }

    // A service fits whole or not at all: when one would overflow a map, none of its changes
    // are made (what was programmed of it stays), and it is reported.
    let skipped = overflowing(desired, current, limits, &keys, &names, &mut plan);
    let skip_key = |k: &AnyFrontendKey| {
        desired
            .frontends
            .get(k)
            .is_some_and(|f| skipped.contains(&owner_of(f)))
    };
    let skip_set = |n: &SetName| skipped.contains(&(n.namespace.clone(), n.service.clone()));

    // Sets first (their backends and tables), then frontends, then what nothing uses any more.
    let mut released_sets = Vec::new();
    let mut unreferenced = Vec::new();
    for name in names.iter().filter(|n| !skip_set(n)) {
        match desired.sets.get(name) {
            Some(members) => {
                upsert_set(name, members, current, limits, &mut plan, &mut unreferenced)
            }
            None => {
                if let Some(old) = current.sets.remove(name) {
                    released_sets.push((name.clone(), old));
                }
            }
        }
    }
    share_affinity(&names, current, &mut plan);
    // Addresses whose frontends changed, with their value before.
    let mut touched_addrs: BTreeMap<IpAddr, Option<AddrInfo>> = BTreeMap::new();
    for key in keys.iter().filter(|k| !skip_key(k)) {
        match desired.frontends.get(key) {
            Some(f) => upsert_frontend(f, current, &mut plan, &mut touched_addrs),
            None => remove_frontend(key, current, &mut plan, &mut touched_addrs),
        }
    }
    if matches!(extent, Extent::All) {
        // Adopted frontends nothing claims, under keys no desired frontend has.
        let stale: Vec<AnyFrontendKey> = current
            .frontends
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            remove_frontend(&key, current, &mut plan, &mut touched_addrs);
        }
    }
    if matches!(extent, Extent::All) {
        // Repairs the flags of the node's own addresses too.
        for (addr, _) in node_addrs(&current.config) {
            if let Some(addr) = addr {
                touch(addr, current, &mut touched_addrs);
            }
        }
    }
    update_config(desired, current, &mut plan, &mut touched_addrs);
    for (addr, before) in touched_addrs {
        let Some(state) = current.addrs.get_mut(&addr) else {
            continue;
        };
        if state.refs == 0 && state.node_flags == 0 {
            current.addrs.remove(&addr);
            if before.is_some() {
                plan.addrs_removed.push(addr);
            }
            continue;
        }
        state.info.flags = if state.cluster_refs > 0 {
            addr_flags::CLUSTER_IP
        } else {
            0
        } | state.node_flags;
        if before != Some(state.info) {
            plan.addrs.push((addr, state.info));
        }
    }
    for addr in unreferenced {
        unreference_backend(addr, current, &mut plan);
    }
    for (name, old) in released_sets {
        release_set(&name, &old, current, &mut plan);
    }
    // Purges of a Local set's affinity apply to the entries it shares.
    for (set_id, _) in &mut plan.affinity_purge {
        if let Some(shared) = current.affinity_scopes.get(set_id) {
            *set_id = *shared;
        }
    }
    if matches!(extent, Extent::All) {
        for id in std::mem::take(&mut current.orphan_tables) {
            plan.tables_removed.push(id);
            current.set_ids.release(id);
        }
        let unused: Vec<SocketAddr> = current
            .backends
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .map(|(a, _)| *a)
            .collect();
        for addr in unused {
            let b = current.backends.remove(&addr).expect("listed above");
            plan.backends_removed.push((b.id, b.value.family()));
            current.backend_ids.release(b.id);
        }
        let unused: Vec<u32> = current
            .ranges
            .iter()
            .filter(|(_, r)| r.refs == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in unused {
            let r = current.ranges.remove(&id).expect("listed above");
            plan.ranges_removed.extend(r.nets.iter().map(|n| (id, *n)));
            current.range_ids.release(id);
        }
    }
    plan
}

fn owner_of(f: &DesiredFrontend) -> (String, String) {
    (f.set.namespace.clone(), f.set.service.clone())
}

/// A service's namespace and name.
type ServiceId = (String, String);
/// The frontends and sets one service changes in a plan.
type ServiceChanges<'a> = (Vec<&'a DesiredFrontend>, Vec<&'a SetName>);

/// Services whose changes would overflow a map, reported in `plan.overflow`.
fn overflowing(
    desired: &Desired,
    current: &Programmed,
    limits: &Limits,
    keys: &BTreeSet<AnyFrontendKey>,
    names: &BTreeSet<SetName>,
    plan: &mut Plan,
) -> BTreeSet<(String, String)> {
    let mut by_service: BTreeMap<ServiceId, ServiceChanges> = BTreeMap::new();
    for key in keys {
        if let Some(f) = desired.frontends.get(key) {
            by_service.entry(owner_of(f)).or_default().0.push(f);
        }
    }
    for name in names.iter().filter(|n| desired.sets.contains_key(*n)) {
        by_service
            .entry((name.namespace.clone(), name.service.clone()))
            .or_default()
            .1
            .push(name);
    }
    let (mut frontends, mut addrs) = (current.frontends.len(), current.addrs.len());
    let (mut set_ids, mut backend_ids, mut range_ids) = (
        current.set_ids.available(limits.set_ids),
        current.backend_ids.available(limits.backends),
        current.ranges.values().map(|r| r.nets.len()).sum::<usize>(),
    );
    let mut seen_backends = BTreeSet::new();
    let mut seen_addrs = BTreeSet::new();
    let mut skipped = BTreeSet::new();
    for (service, (service_frontends, sets)) in by_service {
        let new_frontends = service_frontends
            .iter()
            .filter(|f| !current.frontends.contains_key(&f.key))
            .count();
        let new_sets = sets
            .iter()
            .filter(|n| !current.sets.contains_key(**n))
            .count();
        let new_backends: BTreeSet<SocketAddr> = sets
            .iter()
            .flat_map(|n| desired.sets[*n].iter().map(|b| b.addr))
            .filter(|a| !current.backends.contains_key(a) && !seen_backends.contains(a))
            .collect();
        let new_addrs: BTreeSet<IpAddr> = service_frontends
            .iter()
            .map(|f| f.key.addr())
            .filter(|a| !current.addrs.contains_key(a) && !seen_addrs.contains(a))
            .collect();
        let new_ranges: usize = service_frontends
            .iter()
            .map(|f| f.source_ranges.len())
            .sum();
        let full = if frontends + new_frontends > limits.frontends as usize {
            Some("map LB_SERVICES is full")
        } else if new_sets > set_ids {
            Some("no backend-set id left (raise --max-services)")
        } else if new_backends.len() > backend_ids {
            Some("map LB_BACKENDS is full")
        } else if addrs + new_addrs.len() > limits.addrs as usize {
            Some("map LB_ADDRS is full")
        } else if range_ids + new_ranges > limits.ranges as usize {
            Some("map LB_SRC_RANGES is full")
        } else {
            None
        };
        if let Some(reason) = full {
            plan.overflow
                .extend(service_frontends.iter().map(|f| (f.key, reason.to_owned())));
            skipped.insert(service);
            continue;
        }
        frontends += new_frontends;
        addrs += new_addrs.len();
        set_ids -= new_sets;
        backend_ids -= new_backends.len();
        range_ids += new_ranges;
        seen_backends.extend(new_backends);
        seen_addrs.extend(new_addrs);
    }
    skipped
}

/// Programs a desired set: its backends' slots, then its table.
/// Backends whose references are dropped are collected in `unreferenced` and released only after
/// every set took its new references, so that a backend moving between sets keeps its slot (and
/// its established flows).
fn upsert_set(
    name: &SetName,
    members: &Members,
    current: &mut Programmed,
    limits: &Limits,
    plan: &mut Plan,
    unreferenced: &mut Vec<SocketAddr>,
) {
    let wanted = sorted(members);
    let size = table_size(&wanted, limits);
    let old = current.sets.get(name).cloned();
    if old
        .as_ref()
        .is_some_and(|o| o.members == wanted && o.table_size == size)
    {
        return;
    }
    let id = match &old {
        Some(o) => o.id,
        None => {
            let id = current
                .set_ids
                .take(limits.set_ids)
                .expect("checked by overflowing()");
            plan.stats_reset.push(id);
            id
        }
    };
    let old_members: &[DesiredBackend] = old.as_ref().map(|o| &*o.members).unwrap_or_default();
    let in_old = |addr: &SocketAddr| old_members.binary_search_by_key(addr, |o| o.addr).is_ok();
    let wanted_member = |addr: &SocketAddr| {
        wanted
            .binary_search_by_key(addr, |b| b.addr)
            .ok()
            .map(|at| wanted[at])
    };
    // New references first, so that no slot is freed and retaken within one plan.
    for b in wanted.iter() {
        let value = backend_value(b);
        match current.backends.get_mut(&b.addr) {
            Some(state) => {
                if !in_old(&b.addr) {
                    state.refs += 1;
                }
                if state.value != value {
                    state.value = value;
                    plan.backends.push((state.id, value));
                }
            }
            None => {
                let id = current
                    .backend_ids
                    .take(limits.backends)
                    .expect("checked by overflowing()");
                current
                    .backends
                    .insert(b.addr, BackendState { id, value, refs: 1 });
                plan.backends.push((id, value));
            }
        }
    }
    // Backends that stopped taking new flows lose their affinity, and those that stopped
    // serving their UDP flows; found before the slots of backends that left the set entirely
    // are released.
    for old_member in old_members {
        let now = wanted_member(&old_member.addr);
        if old_member.selectable()
            && !now.is_some_and(|b| b.selectable())
            && let Some(b) = current.backends.get(&old_member.addr)
        {
            plan.affinity_purge.push((id, b.id));
        }
        if old_member.serving && !now.is_some_and(|b| b.serving) {
            purge_udp(name, id, old_member.addr, plan);
        }
    }
    unreferenced.extend(
        old_members
            .iter()
            .filter(|o| wanted.binary_search_by_key(&o.addr, |b| b.addr).is_err())
            .map(|o| o.addr),
    );
    let selectable_changed = old.as_ref().is_none_or(|o| {
        o.table_size != size
            || !o
                .members
                .iter()
                .filter(|b| b.selectable())
                .map(|b| b.addr)
                .eq(wanted.iter().filter(|b| b.selectable()).map(|b| b.addr))
    });
    if size > 0 && selectable_changed {
        plan.tables.push(TableWrite {
            set_id: id,
            table_size: size,
            members: wanted
                .iter()
                .filter(|b| b.selectable())
                .map(|b| (current.backends[&b.addr].id, b.addr))
                .collect(),
        });
    } else if size == 0 && old.as_ref().is_some_and(|o| o.table_size > 0) {
        plan.tables_removed.push(id);
    }
    current.sets.insert(
        name.clone(),
        SetState {
            id,
            members: wanted,
            table_size: size,
        },
    );
}

fn purge_udp(name: &SetName, set_id: u32, backend: SocketAddr, plan: &mut Plan) {
    if name.proto == proto::UDP {
        plan.udp_flow_purge.push((set_id, backend));
    }
}

fn unreference_backend(addr: SocketAddr, current: &mut Programmed, plan: &mut Plan) {
    let Some(state) = current.backends.get_mut(&addr) else {
        return;
    };
    state.refs = state.refs.saturating_sub(1);
    if state.refs == 0 {
        let id = state.id;
        current.backends.remove(&addr);
        plan.backends_removed.push((id, Family::of(&addr.ip())));
        current.backend_ids.release(id);
    }
}

/// Points each Local set among `names` (or beside one of them) at its Cluster set's affinity
/// entries, and every other set at its own: a Service port's two sets share a client's
/// affinity, as kube-proxy's per-endpoint affinity is shared by its Cluster and Local chains.
/// A set id taken in this plan is always written (its entry may be left from before a crash).
/// Written before the frontends that read it.
fn share_affinity(names: &BTreeSet<SetName>, current: &mut Programmed, plan: &mut Plan) {
    let both: BTreeSet<SetName> = names
        .iter()
        .flat_map(|n| [n.clone(), n.sibling()])
        .collect();
    for name in both {
        let Some(id) = current.sets.get(&name).map(|s| s.id) else {
            continue;
        };
        let wanted = match name.kind {
            SetKind::Local => current.sets.get(&name.sibling()).map_or(0, |s| s.id),
            SetKind::Cluster => 0,
        };
        let programmed = current.affinity_scopes.get(&id).copied().unwrap_or(0);
        if wanted == programmed && !plan.stats_reset.contains(&id) {
            continue;
        }
        if wanted == 0 {
            current.affinity_scopes.remove(&id);
        } else {
            current.affinity_scopes.insert(id, wanted);
        }
        plan.affinity_scopes.push((id, wanted));
    }
}

/// Removes a set nothing uses any more: its table, its backends' references, its affinity.
fn release_set(name: &SetName, old: &SetState, current: &mut Programmed, plan: &mut Plan) {
    if old.table_size > 0 {
        plan.tables_removed.push(old.id);
    }
    if current.affinity_scopes.remove(&old.id).is_some() {
        plan.affinity_scopes.push((old.id, 0));
    }
    for b in old.members.iter() {
        if b.selectable()
            && let Some(state) = current.backends.get(&b.addr)
        {
            plan.affinity_purge.push((old.id, state.id));
        }
        if b.serving {
            purge_udp(name, old.id, b.addr, plan);
        }
        unreference_backend(b.addr, current, plan);
    }
    current.set_ids.release(old.id);
}

fn reference_range(nets: &[Ipv4Net], current: &mut Programmed, plan: &mut Plan) -> u32 {
    if nets.is_empty() {
        return 0;
    }
    if let Some((id, state)) = current.ranges.iter_mut().find(|(_, r)| r.nets == nets) {
        state.refs += 1;
        return *id;
    }
    let id = current
        .range_ids
        .take(u32::MAX)
        .expect("range ids are plentiful");
    plan.ranges_added.extend(nets.iter().map(|n| (id, *n)));
    current.ranges.insert(
        id,
        RangeState {
            nets: nets.to_vec(),
            refs: 1,
        },
    );
    id
}

fn unreference_range(id: u32, current: &mut Programmed, plan: &mut Plan) {
    let Some(state) = current.ranges.get_mut(&id) else {
        return;
    };
    state.refs = state.refs.saturating_sub(1);
    if state.refs == 0 {
        let state = current.ranges.remove(&id).expect("present");
        plan.ranges_removed
            .extend(state.nets.iter().map(|n| (id, *n)));
        current.range_ids.release(id);
    }
}

/// Notes the value an address had before this plan touched it.
fn touch(addr: IpAddr, current: &Programmed, touched: &mut BTreeMap<IpAddr, Option<AddrInfo>>) {
    touched.entry(addr).or_insert_with(|| {
        current
            .addrs
            .get(&addr)
            .filter(|s| s.refs > 0 || s.node_flags != 0)
            .map(|s| s.info)
    });
}
