//! Port allocation ([`super::allocate`], [`super::walk`]) and which flows need source NAT.

extern crate std;

use std::{collections::BTreeMap, vec::Vec};

use super::*;
use crate::{conntrack::FORWARD, maps::backend_flags};

const NOW: u64 = 1 << 40;

fn config(min: u16, max: u16) -> NodeConfig {
    NodeConfig {
        snat_addr: Be32::from(core::net::Ipv4Addr::new(192, 168, 50, 10)),
        snat_port_min: min,
        snat_port_max: max,
        hairpin_addr: Be32::default(),
        flags: 0,
    }
}

/// [`backend`] on another node and on this one; a node configuration without and with
/// `--masquerade-all`.
fn remote_local_plain_masquerade() -> (Backend, Backend, NodeConfig, NodeConfig) {
    let remote = backend();
    let local = Backend {
        flags: remote.flags | backend_flags::LOCAL,
        ..remote
    };
    let plain = config(61_000, 65_535);
    let masquerade = NodeConfig {
        flags: crate::maps::node_flags::MASQUERADE_ALL,
        ..plain
    };
    (remote, local, plain, masquerade)
}

#[test]
fn masquerade_all_source_nats_every_balanced_flow_to_the_node() {
    let (remote, local, plain, masquerade) = remote_local_plain_masquerade();
    let f = Frontend::default();
    for (flow_scope, b, tcp_without, pod_route) in [
        (scope::EXTERNAL, &remote, true, false),
        (scope::EXTERNAL, &local, false, true),
        (scope::INTERNAL, &remote, false, true),
        (scope::INTERNAL, &local, false, true),
    ] {
        assert_eq!(needed(flow_scope, &f, b, proto::TCP, &plain), tcp_without);
        assert!(needed(flow_scope, &f, b, proto::TCP, &masquerade));
        assert!(needed(flow_scope, &f, b, proto::UDP, &masquerade));
        assert!(!needed(flow_scope, &f, b, proto::ICMP, &masquerade));
        assert_eq!(routes_to_pod(flow_scope, b), pod_route);
    }
}

/// kube-proxy's masqueradeAll masquerades flows to ClusterIPs: the external addresses of a
/// Service with externalTrafficPolicy Local keep their clients, from outside (to local
/// backends, the policy's point) and from pods (kube-proxy's short-circuit to every
/// endpoint).
#[test]
fn masquerade_all_leaves_external_traffic_policy_local_its_clients() {
    let (remote, local, _, masquerade) = remote_local_plain_masquerade();
    let keeps = Frontend {
        flags: crate::maps::frontend_flags::KEEPS_CLIENT,
        ..Frontend::default()
    };
    for (flow_scope, b) in [
        (scope::EXTERNAL, &local),
        (scope::INTERNAL, &remote),
        (scope::INTERNAL, &local),
    ] {
        assert!(!needed(flow_scope, &keeps, b, proto::TCP, &masquerade));
        assert!(!needed(flow_scope, &keeps, b, proto::UDP, &masquerade));
    }
}

fn backend() -> Backend {
    Backend {
        addr: Be32::from(core::net::Ipv4Addr::new(10, 10, 1, 5)),
        port: Be16::from_host(8080),
        flags: backend_flags::ACTIVE,
        _pad: 0,
    }
}

fn flow(port: u16) -> FlowKey {
    FlowKey::new(
        Be32::from(core::net::Ipv4Addr::new(198, 51, 100, 1)),
        Be16::from_host(port),
        Be32::from(core::net::Ipv4Addr::new(192, 168, 50, 10)),
        Be16::from_host(30_080),
        proto::TCP,
        FORWARD,
    )
}

/// A reservation by a live flow of another client.
fn live() -> CtEntry {
    CtEntry {
        deadline_ns: NOW + 1,
        flags: ct_flags::SNAT | ct_flags::ESTABLISHED,
        ..CtEntry::default()
    }
}

fn walk(
    config: &NodeConfig,
    flow: &FlowKey,
    held: &BTreeMap<u16, CtEntry>,
    refuse: &[u16],
) -> Option<Choice> {
    allocate(
        flow,
        &backend(),
        config,
        NOW,
        |key| held.get(&key.dst_port.to_host()).copied(),
        |key, _absent| !refuse.contains(&key.dst_port.to_host()),
    )
}

#[test]
fn a_free_port_is_found_whenever_one_exists() {
    let config = config(61_000, 61_099);
    let f = flow(40_000);
    let seeds = Seeds::of(&f, &config);
    // Every probed candidate, and all but one other port, held by live flows.
    let free = 61_042;
    let held: BTreeMap<u16, CtEntry> = (61_000..=61_099)
        .filter(|p| *p != free)
        .map(|p| (p, live()))
        .collect();
    assert!((0..PROBES).all(|probe| candidate(&config, seeds, probe) != free));
    let choice = walk(&config, &f, &held, &[]).expect("the free port");
    assert_eq!(
        (choice.port, choice.state, choice.absent),
        (free, SnatPort::Free, true)
    );
    assert!(choice.probe >= PROBES, "found by the scan");
    // The range full: no port, the flow is dropped.
    let full: BTreeMap<u16, CtEntry> = (61_000..=61_099).map(|p| (p, live())).collect();
    assert_eq!(walk(&config, &f, &full, &[]), None);
}

/// SCTP keeps its client's port: the range is that one port, taken unless another live
/// flow holds it towards the backend; replies come back to it whatever the SNAT range.
#[test]
fn an_sctp_flow_keeps_its_clients_port_or_finds_none() {
    let node = config(61_000, 65_535);
    let mut f = flow(36_412);
    f.proto = proto::SCTP;
    let range = port_range(&node, &f);
    assert_eq!((range.snat_port_min, range.snat_port_max), (36_412, 36_412));
    assert_eq!(range.snat_addr, node.snat_addr);
    assert_eq!(
        port_range(&node, &flow(36_412)),
        node,
        "TCP keeps the range"
    );
    let choice = walk(&range, &f, &BTreeMap::new(), &[]).expect("its own port");
    assert_eq!((choice.port, choice.state), (36_412, SnatPort::Free));
    let held = BTreeMap::from([(36_412, live())]);
    assert_eq!(
        walk(&range, &f, &held, &[]),
        None,
        "held by another client's flow"
    );
    for (l4_proto, reply) in [
        (proto::SCTP, true),
        (proto::TCP, false),
        (proto::UDP, false),
    ] {
        assert_eq!(
            is_reply_to(&node, node.snat_addr, Be16::from_host(36_412), l4_proto),
            reply
        );
    }
    assert!(needed(
        scope::EXTERNAL,
        &Frontend::default(),
        &backend(),
        proto::SCTP,
        &node
    ));
}

#[test]
fn a_port_another_cpu_claimed_first_is_passed_over() {
    let config = config(61_000, 61_099);
    let f = flow(40_000);
    let first = candidate(&config, Seeds::of(&f, &config), 0);
    let choice = walk(&config, &f, &BTreeMap::new(), &[first]).unwrap();
    assert_ne!(choice.port, first);
    assert_eq!(choice.probe, 1);
}

/// Linux clients take their ports from 32768-60999: in the default range each of one
/// client's ports has a home port of its own, and two clients of the same port have
/// different ones.
#[test]
fn each_port_of_a_client_has_a_home_port_of_its_own() {
    use crate::maps::snat::{PORT_MAX, PORT_MIN};
    let config = config(PORT_MIN, PORT_MAX);
    let homes: std::collections::BTreeSet<u16> = (32_768..=60_999)
        .map(|port| candidate(&config, Seeds::of(&flow(port), &config), 0))
        .collect();
    assert_eq!(homes.len(), 60_999 - 32_768 + 1);
    assert!(homes.iter().all(|p| (PORT_MIN..=PORT_MAX).contains(p)));
    let other = FlowKey {
        src_addr: Be32::from(core::net::Ipv4Addr::new(198, 51, 100, 2)),
        ..flow(40_000)
    };
    assert_ne!(
        Seeds::of(&other, &config).home,
        Seeds::of(&flow(40_000), &config).home
    );
}

/// The client's earlier connection of the same port, which its backend holds in TIME_WAIT,
/// gives its home port back to the new one: the backend takes the SYN, its timestamp being
/// newer. Another client's TIME_WAIT there is passed over for a free port.
#[test]
fn a_client_port_coming_back_finds_its_home_port_in_its_own_time_wait() {
    let config = config(1_024, 29_999);
    let f = flow(40_000);
    let home = candidate(&config, Seeds::of(&f, &config), 0);
    let time_wait = |owner: &FlowKey| CtEntry {
        flags: live().flags | ct_flags::FIN | ct_flags::FIN_FIRST | ct_flags::PEER_FIN,
        nat_addr: owner.dst_addr,
        nat_port: owner.dst_port,
        snat_addr: owner.src_addr,
        snat_port: owner.src_port,
        ..live()
    };
    let own = BTreeMap::from([(home, time_wait(&f))]);
    let choice = walk(&config, &f, &own, &[]).unwrap();
    assert_eq!(
        (choice.port, choice.probe, choice.state),
        (home, 0, SnatPort::Reopened)
    );
    let theirs = BTreeMap::from([(home, time_wait(&flow(40_001)))]);
    let choice = walk(&config, &f, &theirs, &[]).unwrap();
    assert_eq!((choice.probe, choice.state), (1, SnatPort::Free));
}

#[test]
fn time_wait_is_taken_after_the_probes_before_any_scan() {
    let config = config(61_000, 61_099);
    let f = flow(40_000);
    let seeds = Seeds::of(&f, &config);
    let time_wait = CtEntry {
        flags: live().flags | ct_flags::FIN | ct_flags::FIN_FIRST | ct_flags::PEER_FIN,
        ..live()
    };
    let mut held: BTreeMap<u16, CtEntry> = (0..PROBES)
        .map(|probe| (candidate(&config, seeds, probe), live()))
        .collect();
    let third = candidate(&config, seeds, 2);
    held.insert(third, time_wait);
    let choice = walk(&config, &f, &held, &[]).unwrap();
    assert_eq!((choice.port, choice.state), (third, SnatPort::TimeWait));
    let scanned: Vec<u16> = (PROBES..PROBES + 3)
        .map(|probe| candidate(&config, seeds, probe))
        .collect();
    assert!(
        scanned
            .windows(2)
            .all(|w| w[1] == w[0] + 1 || w[1] == 61_000)
    );
}
