//! The planner's rules on small desired states: dependency order, idempotence, incremental
//! plans equal to full ones, stable ids, overflow handling.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use lb_common::maps::{FrontendKey, hairpin, scope};

use super::*;
use crate::model::{FrontendKind, SetKind};

const LIMITS: Limits = Limits {
    backends: 1000,
    set_ids: 100,
    frontends: 1000,
    addrs: 1000,
    ranges: 100,
    table_size: 251,
};

fn set(service: &str, kind: SetKind) -> SetName {
    SetName::new("ns", service, "", proto::TCP, kind)
}

fn backend(last: u8, weight: u32) -> DesiredBackend {
    DesiredBackend {
        addr: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 8080).into(),
        local: true,
        weight,
        serving: true,
    }
}

/// ClusterIPs 172.30.0.N:80 of services svcN with the given backends.
fn desired(services: &[(u8, &[DesiredBackend])]) -> Desired {
    let mut d = Desired::default();
    for (n, backends) in services {
        let name = set(&format!("svc{n}"), SetKind::Cluster);
        let key = FrontendKey::new(
            Ipv4Addr::new(172, 30, 0, *n),
            80,
            proto::TCP,
            scope::INTERNAL,
        )
        .into();
        d.sets.insert(name.clone(), (*backends).into());
        d.frontends.insert(
            key,
            DesiredFrontend {
                key,
                kind: FrontendKind::ClusterIp,
                set: name,
                drop_when_empty: false,
                dsr: false,
                keeps_client: false,
                affinity_timeout_s: 0,
                source_ranges: Vec::new(),
            },
        );
    }
    d
}

fn full(desired: &Desired, current: &mut Programmed) -> Plan {
    plan(desired, current, &LIMITS, Extent::All)
}

fn committed(desired: &Desired) -> Programmed {
    let mut p = Programmed::default();
    full(desired, &mut p);
    p
}

#[test]
fn a_first_sync_writes_in_dependency_order() {
    let d = desired(&[
        (1, &[backend(11, 1), backend(12, 1)]),
        (2, &[backend(21, 1)]),
    ]);
    let p = full(&d, &mut Programmed::default());
    assert_eq!(p.backends.len(), 3);
    assert_eq!(p.tables.len(), 1, "only the two-backend set needs a table");
    assert_eq!(p.frontends.len(), 2);
    // Two ClusterIPs, and the node's hairpin address (there is no SNAT address yet).
    let hairpin = IpAddr::from(hairpin::DEFAULT_ADDR);
    assert_eq!(p.addrs.len(), 3);
    assert!(p.addrs.iter().all(|(addr, info)| if *addr == hairpin {
        info.flags == addr_flags::HAIRPIN
    } else {
        info.flags == addr_flags::CLUSTER_IP
    }));
    assert_eq!(
        p.config.map(|c| IpAddr::from(c.hairpin_addr)),
        Some(hairpin)
    );
    let single = p
        .frontends
        .iter()
        .find(|(k, _)| k.addr() == Ipv4Addr::new(172, 30, 0, 2))
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
    let mut p = committed(&d);
    let again = full(&d, &mut p);
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(again.writes(), 0);
}

#[test]
fn an_incremental_plan_equals_the_full_one() {
    let before = desired(&[
        (1, &[backend(11, 1), backend(12, 1)]),
        (2, &[backend(21, 1), backend(22, 1)]),
    ]);
    let after = desired(&[
        (1, &[backend(11, 1), backend(12, 1)]),
        (2, &[backend(21, 1)]),
        (3, &[backend(31, 1)]),
    ]);
    let mut by_scope = committed(&before);
    let mut by_full = by_scope.clone();
    let scope = Scope {
        frontends: after
            .frontends
            .keys()
            .filter(|k| k.addr() != Ipv4Addr::new(172, 30, 0, 1))
            .copied()
            .collect(),
        sets: [set("svc2", SetKind::Cluster), set("svc3", SetKind::Cluster)].into(),
    };
    let a = plan(&after, &mut by_scope, &LIMITS, Extent::Only(&scope));
    let b = full(&after, &mut by_full);
    assert_eq!(a, b);
    assert_eq!(by_scope, by_full);
}

#[test]
fn ids_stay_with_what_they_name_when_others_change() {
    let before = desired(&[
        (1, &[backend(11, 1), backend(12, 1)]),
        (2, &[backend(21, 1), backend(22, 1)]),
    ]);
    let mut p = committed(&before);
    let sets_before: Vec<(SetName, u32)> = p.sets.iter().map(|(n, s)| (n.clone(), s.id)).collect();
    let backends_before = p.backends.clone();
    // Service 2 loses a backend; service 3 appears.
    let after = desired(&[
        (1, &[backend(11, 1), backend(12, 1)]),
        (2, &[backend(21, 1)]),
        (3, &[backend(31, 1)]),
    ]);
    let next = full(&after, &mut p);
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
    for (name, id) in &sets_before {
        assert_eq!(p.sets[name].id, *id, "{name} kept its id");
    }
    for (addr, state) in &backends_before {
        if addr.ip() != Ipv4Addr::new(10, 0, 0, 22) {
            assert_eq!(p.backends[addr].id, state.id);
        }
    }
}

#[test]
fn a_set_change_programs_the_new_set_before_the_frontend_and_drops_the_old_after() {
    let d = desired(&[(1, &[backend(11, 1), backend(12, 1)])]);
    let mut p = committed(&d);
    let old_id = p.sets[&set("svc1", SetKind::Cluster)].id;
    let mut moved = d.clone();
    let local = set("svc1", SetKind::Local);
    moved.sets.clear();
    moved
        .sets
        .insert(local.clone(), [backend(11, 1), backend(13, 1)].into());
    for f in moved.frontends.values_mut() {
        f.set = local.clone();
    }
    let next = full(&moved, &mut p);
    let new_id = next.tables[0].set_id;
    assert_ne!(new_id, old_id);
    assert_eq!(next.frontends[0].1.set_id, new_id);
    assert_eq!(next.tables_removed, [old_id]);
    assert_eq!(next.stats_reset, [new_id]);
}

#[test]
fn weight_zero_backends_keep_their_slot_but_take_no_new_flow() {
    let d = desired(&[(1, &[backend(11, 1), backend(12, 0)])]);
    let p = full(&d, &mut Programmed::default());
    assert_eq!(
        p.backends.len(),
        2,
        "both slots exist for established flows"
    );
    assert!(p.tables.is_empty(), "one selectable backend needs no table");
    assert_eq!(p.frontends[0].1.backend_count, 1);
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
    let p = plan(&d, &mut Programmed::default(), &limits, Extent::All);
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
    let mut p = Programmed::default();
    let first = full(&d, &mut p);
    assert_eq!(first.ranges_added.len(), 1, "shared by both frontends");
    assert!(
        first
            .frontends
            .iter()
            .all(|(_, v)| v.source_range_id == first.ranges_added[0].0)
    );
    // Dropping the ranges from one frontend keeps the list; from both removes it.
    let mut one = d.clone();
    one.frontends
        .values_mut()
        .next()
        .unwrap()
        .source_ranges
        .clear();
    assert!(full(&one, &mut p).ranges_removed.is_empty());
    let mut none = one.clone();
    none.frontends
        .values_mut()
        .for_each(|f| f.source_ranges.clear());
    assert_eq!(full(&none, &mut p).ranges_removed.len(), 1);
}

#[test]
fn ids_are_reused_lowest_first() {
    let mut ids = IdAlloc::with_used([1, 2, 4]);
    assert_eq!(ids.take(10), Some(3));
    assert_eq!(ids.take(10), Some(5));
    ids.release(2);
    assert_eq!(ids.take(10), Some(2));
    let mut small = IdAlloc::default();
    assert_eq!(
        (small.take(3), small.take(3), small.take(3)),
        (Some(1), Some(2), None)
    );
}

/// kube-proxy flushes the UDP conntrack entries of an endpoint that stops serving, not of one
/// that is terminating but still serving (a rolling update); TCP flows are never flushed.
#[test]
fn udp_flows_are_flushed_only_when_their_backend_stops_serving() {
    let mut d = desired(&[(1, &[backend(11, 1), backend(12, 1)])]);
    // The same set, as a UDP service port.
    let (tcp_name, members) = d.sets.pop_first().unwrap();
    let udp_name = SetName::new("ns", "svc1", "", proto::UDP, SetKind::Cluster);
    d.sets.insert(udp_name.clone(), members);
    for f in d.frontends.values_mut() {
        assert_eq!(f.set, tcp_name);
        f.set = udp_name.clone();
    }
    let mut p = committed(&d);
    let set_id = p.sets[&udp_name].id;
    let with = |d: &mut Desired, members: &[DesiredBackend]| {
        d.sets.insert(udp_name.clone(), members.into());
    };
    let terminating = DesiredBackend {
        weight: 0,
        ..backend(12, 1)
    };

    with(&mut d, &[backend(11, 1), terminating]);
    let next = full(&d, &mut p);
    assert_eq!(next.affinity_purge.len(), 1, "no new flows: affinity goes");
    assert!(
        next.udp_flow_purge.is_empty(),
        "still serving: its flows stay"
    );

    let not_serving = DesiredBackend {
        serving: false,
        ..terminating
    };
    with(&mut d, &[backend(11, 1), not_serving]);
    let next = full(&d, &mut p);
    assert_eq!(next.udp_flow_purge, [(set_id, not_serving.addr)]);
    assert!(next.affinity_purge.is_empty(), "already gone");

    with(&mut d, &[not_serving]);
    let next = full(&d, &mut p);
    assert_eq!(
        next.udp_flow_purge,
        [(set_id, backend(11, 1).addr)],
        "left the set"
    );

    // The same changes to a TCP set flush nothing.
    let mut t = desired(&[(1, &[backend(11, 1), backend(12, 1)])]);
    let mut p = committed(&t);
    t.sets.insert(tcp_name, [backend(11, 1)].as_slice().into());
    assert!(full(&t, &mut p).udp_flow_purge.is_empty());
}

/// A Service port's Local set shares its Cluster set's affinity entries (kube-proxy keeps
/// affinity per endpoint, for both of its chains): its scope entry names the Cluster set while
/// both exist, and an endpoint leaving the Local set's new flows purges the shared entries.
#[test]
fn a_local_set_shares_its_cluster_sets_affinity() {
    let mut d = desired(&[(1, &[backend(11, 1), backend(12, 1)])]);
    let local = set("svc1", SetKind::Local);
    d.sets.insert(
        local.clone(),
        [backend(11, 1), backend(12, 1)].as_slice().into(),
    );
    let key = FrontendKey::new(
        Ipv4Addr::new(192, 168, 0, 2),
        30_080,
        proto::TCP,
        scope::EXTERNAL,
    )
    .into();
    d.frontends.insert(
        key,
        DesiredFrontend {
            key,
            kind: FrontendKind::NodePort,
            set: local.clone(),
            drop_when_empty: true,
            dsr: false,
            keeps_client: true,
            affinity_timeout_s: 60,
            source_ranges: Vec::new(),
        },
    );
    let mut p = Programmed::default();
    let first = full(&d, &mut p);
    let (cluster_id, local_id) = (p.sets[&set("svc1", SetKind::Cluster)].id, p.sets[&local].id);
    assert!(
        first.affinity_scopes.contains(&(local_id, cluster_id)),
        "{first:?}"
    );
    assert!(
        first.affinity_scopes.contains(&(cluster_id, 0)),
        "new ids are written"
    );
    assert!(full(&d, &mut p).is_empty(), "nothing more to write");

    // Backend 12 stops taking new flows in the Local set only: the shared entries are purged.
    d.sets.insert(
        local.clone(),
        [backend(11, 1), backend(12, 0)].as_slice().into(),
    );
    let next = full(&d, &mut p);
    let twelve = p.backends[&backend(12, 1).addr].id;
    assert_eq!(next.affinity_purge, [(cluster_id, twelve)]);

    // The Cluster set goes: the Local set reads its own entries again.
    let cluster_frontends: Vec<AnyFrontendKey> = d
        .frontends
        .iter()
        .filter(|(_, f)| f.set.kind == SetKind::Cluster)
        .map(|(k, _)| *k)
        .collect();
    for k in cluster_frontends {
        d.frontends.remove(&k);
    }
    d.sets.remove(&set("svc1", SetKind::Cluster));
    let next = full(&d, &mut p);
    assert!(next.affinity_scopes.contains(&(local_id, 0)), "{next:?}");
    assert!(p.affinity_scopes.is_empty());
}

/// A dual-stack Service port: its IPv6 set and ClusterIP are planned as the IPv4 ones, with set
/// and backend ids from the same allocators (the Maglev map and the counters are shared), and
/// their writes name their family's maps.
#[test]
fn an_ipv6_set_takes_ids_beside_the_ipv4_ones_and_its_writes_name_its_family() {
    let mut d = desired(&[(1, &[backend(11, 1), backend(12, 1)])]);
    let v6 = set("svc1", SetKind::Cluster).in_family(Family::V6);
    let pod = |last: u16| DesiredBackend {
        addr: SocketAddr::new(
            Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, last).into(),
            8080,
        ),
        local: true,
        weight: 1,
        serving: true,
    };
    d.sets
        .insert(v6.clone(), [pod(11), pod(12)].as_slice().into());
    let vip6: IpAddr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1).into();
    let key = AnyFrontendKey::new(vip6, 80, proto::TCP, scope::INTERNAL);
    let frontend = DesiredFrontend {
        key,
        set: v6.clone(),
        ..d.frontends.values().next().unwrap().clone()
    };
    d.frontends.insert(key, frontend);

    let mut p = Programmed::default();
    let plan = full(&d, &mut p);
    let v4 = set("svc1", SetKind::Cluster);
    assert_ne!(p.sets[&v4].id, p.sets[&v6].id);
    assert_eq!(plan.tables.len(), 2, "a table per family's set");
    let ids: BTreeSet<u32> = plan.backends.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 4, "four backends, four slots");
    let families: Vec<Family> = plan.backends.iter().map(|(_, b)| b.family()).collect();
    assert_eq!(
        families.iter().filter(|f| **f == Family::V6).count(),
        2,
        "{families:?}"
    );
    assert!(plan.frontends.iter().any(|(k, _)| *k == key));
    assert!(
        plan.addrs
            .iter()
            .any(|(a, i)| *a == vip6 && i.flags == addr_flags::CLUSTER_IP)
    );
    assert!(full(&d, &mut p).is_empty(), "nothing more to write");

    // The IPv6 set goes: its backends leave their family's array, its address its map.
    d.frontends.remove(&key);
    d.sets.remove(&v6);
    let plan = full(&d, &mut p);
    assert_eq!(plan.frontends_removed, [key]);
    assert_eq!(plan.addrs_removed, [vip6]);
    assert_eq!(plan.backends_removed.len(), 2);
    assert!(plan.backends_removed.iter().all(|(_, f)| *f == Family::V6));
}
