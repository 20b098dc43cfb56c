//! `lbctl trace` against the real datapath with a mix of services (ClusterIPs with one, several
//! or no backends, a drop policy, a LoadBalancer IP with source ranges, session affinity, source
//! NAT configured): for every kind of packet, the prediction is exactly what the programs then do
//! with it. [`views`] then checks the other views (`stats`, `service list`, `ct list`,
//! `maps dump`) against the state those packets left. Needs root (BPF, mount, network
//! namespaces).
//!
//! The test runs in a network namespace of its own whose routing table sends everything out of
//! one interface to a neighbour with a known MAC: source-NATed packets are routed by the
//! datapath after a FIB lookup, which then always resolves (XDP_REDIRECT / TC_ACT_REDIRECT),
//! whatever the host's routing table holds; their rewritten bytes are what is checked.

mod common;
// Beside this file rather than beside the test targets, where cargo would take it for one.
#[path = "trace/views.rs"]
mod views;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{
    Fixture, TABLE, backends, configure_snat, frontend, in_routed_netns, service, sock,
    trace::{Case, Hook, backend_addr, check, json_sock, maglev_pick},
};
use lb_common::{
    maps::{Backend, scope, snat},
    net::proto::{TCP, UDP},
};
use lb_datapath::program::{
    FrontendKind::{ClusterIp, LoadBalancer},
    ServiceSpec,
};
use lb_testbed::packet::flags;
use serde_json::json;

/// Multi-backend ClusterIP, reachable internally and externally.
fn svc_web() -> ServiceSpec {
    service(
        "web",
        vec![
            frontend([172, 30, 0, 41], 80, TCP, scope::INTERNAL, ClusterIp),
            frontend([172, 30, 0, 41], 80, TCP, scope::EXTERNAL, ClusterIp),
        ],
        backends(true, &["10.0.1.5:8080", "10.0.1.6:8080", "10.0.2.7:8080"]),
    )
}

/// Single-backend UDP ClusterIP.
fn svc_dns() -> ServiceSpec {
    service(
        "dns",
        vec![frontend(
            [172, 30, 0, 42],
            53,
            UDP,
            scope::INTERNAL,
            ClusterIp,
        )],
        backends(true, &["10.0.1.8:5353"]),
    )
}

/// No backends: rejects (TCP and UDP frontends). Source ranges on a service without backends:
/// the lack of backends decides first.
fn svc_empty() -> ServiceSpec {
    ServiceSpec {
        source_ranges: source_ranges(),
        ..service(
            "empty",
            vec![
                frontend([172, 30, 0, 43], 80, TCP, scope::INTERNAL, ClusterIp),
                frontend([172, 30, 0, 43], 53, UDP, scope::INTERNAL, ClusterIp),
            ],
            vec![],
        )
    }
}

/// No backends, drops (traffic policy Local).
fn svc_empty_drop() -> ServiceSpec {
    ServiceSpec {
        drop_when_empty: true,
        ..service(
            "empty-drop",
            vec![frontend(
                [172, 30, 0, 44],
                80,
                TCP,
                scope::INTERNAL,
                ClusterIp,
            )],
            vec![],
        )
    }
}

/// A LoadBalancer IP (not a ClusterIP), external only, with loadBalancerSourceRanges.
fn svc_ranged() -> ServiceSpec {
    ServiceSpec {
        source_ranges: source_ranges(),
        ..service(
            "ranged",
            vec![frontend(
                [192, 0, 2, 10],
                443,
                TCP,
                scope::EXTERNAL,
                LoadBalancer,
            )],
            backends(true, &["10.0.3.1:8443", "10.0.3.2:8443"]),
        )
    }
}

fn source_ranges() -> Vec<ipnet::Ipv4Net> {
    ["203.0.113.0/24", "198.51.100.7/32"]
        .map(|net| net.parse().unwrap())
        .to_vec()
}

/// ClusterIP with sessionAffinity ClientIP.
fn svc_sticky() -> ServiceSpec {
    ServiceSpec {
        affinity_timeout_s: AFFINITY_S,
        ..service(
            "sticky",
            vec![frontend(
                [172, 30, 0, 45],
                8080,
                TCP,
                scope::INTERNAL,
                ClusterIp,
            )],
            backends(true, &["10.0.4.1:80", "10.0.4.2:80", "10.0.4.3:80"]),
        )
    }
}

const AFFINITY_S: u32 = 10_800;

/// The six services above, in the order they are programmed.
fn all_services() -> [ServiceSpec; 6] {
    [
        svc_web(),
        svc_dns(),
        svc_empty(),
        svc_empty_drop(),
        svc_ranged(),
        svc_sticky(),
    ]
}

/// The six services above, programmed one after the other (so their ids follow that order).
fn populated() -> Option<Fixture> {
    let mut f = Fixture::new()?;
    for svc in all_services() {
        f.program(&svc);
    }
    // Another list admitting everything, which no frontend uses (the planner never writes such
    // a list): range ids must keep lists apart.
    let range_id = f.source_range_id(&svc_ranged());
    f.add_source_range(range_id + 1, Ipv4Addr::UNSPECIFIED, 0);
    // External flows to backends on other nodes are source-NATed.
    configure_snat(&mut f, snat::PORT_MIN, snat::PORT_MAX);
    Some(f)
}

#[test]
fn trace_predicts_what_the_datapath_does() {
    in_routed_netns(trace_predicts_what_the_datapath_does_here);
}

fn trace_predicts_what_the_datapath_does_here() {
    let Some(mut f) = populated() else { return };
    let range_id = f.source_range_id(&svc_ranged());
    use Hook::*;
    const SYN: u8 = flags::SYN;
    const ACK: u8 = flags::ACK;

    // A new flow to a multi-backend ClusterIP: Maglev.
    let t = check(
        &mut f,
        &Case::tcp("new flow", FromPod, "10.0.1.2:40000", "172.30.0.41:80", SYN),
    );
    assert_eq!(t["decision"], "new_flow");
    assert_eq!(t["reason"], "new_flow");
    assert_eq!(t["service_id"], f.set_id(&svc_web()));
    assert_eq!(t["scope"], "internal");
    assert_eq!(t["selection"]["method"], "maglev");
    assert_eq!(t["selection"]["table_size"], TABLE);
    let hash = t["selection"]["hash"].as_u64().unwrap();
    assert_eq!(t["selection"]["slot"], hash % u64::from(TABLE));
    let web_backend = json_sock(&t["backend"]);
    assert_eq!(
        t["backend_id"],
        maglev_pick(
            &f,
            &svc_web(),
            sock("10.0.1.2:40000"),
            sock("172.30.0.41:80")
        )
    );
    assert_eq!(
        backend_addr(&f, t["backend_id"].as_u64().unwrap()),
        web_backend
    );
    assert_eq!(t["affinity_recorded"], false);
    let explanation = t["explanation"].as_str().unwrap();
    assert!(explanation.contains("Maglev slot"), "{explanation}");

    // The same flow again: established, same backend.
    let t = check(
        &mut f,
        &Case::tcp(
            "established",
            FromPod,
            "10.0.1.2:40000",
            "172.30.0.41:80",
            ACK,
        ),
    );
    assert_eq!(t["decision"], "established");
    assert_eq!(json_sock(&t["backend"]), web_backend);
    assert!(t["selection"].is_null());

    // Its reply is reverse-NATed; a stranger's packet is not.
    let t = check(
        &mut f,
        &Case::tcp(
            "reply",
            ToPod,
            web_backend,
            sock("10.0.1.2:40000"),
            SYN | ACK,
        ),
    );
    assert_eq!(t["decision"], "reverse_nat");
    assert_eq!(t["direction"], "reply");
    assert_eq!(t["output"]["src"], "172.30.0.41:80");
    let t = check(
        &mut f,
        &Case::tcp(
            "untracked reply",
            ToPod,
            "10.0.9.9:8080",
            "10.0.1.2:40000",
            ACK,
        ),
    );
    assert_eq!(t["decision"], "not_tracked");
    assert!(t["reason"].is_null());

    // Single backend, UDP: new, then established.
    let t = check(
        &mut f,
        &Case::udp("single backend", FromPod, "10.0.1.2:5000", "172.30.0.42:53"),
    );
    assert_eq!(
        (&t["decision"], &t["selection"]),
        (&json!("new_flow"), &json!({"method": "single"}))
    );
    assert_eq!(t["backend"], "10.0.1.8:5353");
    let t = check(
        &mut f,
        &Case::udp(
            "single backend again",
            FromPod,
            "10.0.1.2:5000",
            "172.30.0.42:53",
        ),
    );
    assert_eq!(t["decision"], "established");

    // No backend: reject (RST, ICMP) or drop.
    let t = check(
        &mut f,
        &Case::tcp(
            "no backend, tcp",
            FromPod,
            "10.0.1.2:40001",
            "172.30.0.43:80",
            SYN,
        ),
    );
    assert_eq!(
        t["decision"], "reject_no_backend",
        "rejected, whatever the source"
    );
    assert_eq!(t["service"]["source_range_id"], range_id);
    let t = check(
        &mut f,
        &Case::udp(
            "no backend, udp",
            FromPod,
            "10.0.1.2:40001",
            "172.30.0.43:53",
        ),
    );
    assert_eq!(t["decision"], "reject_no_backend");
    let t = check(
        &mut f,
        &Case::tcp(
            "no backend, drop",
            FromPod,
            "10.0.1.2:40001",
            "172.30.0.44:80",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "drop_no_backend");
    assert_eq!(t["service"]["flags"], json!(["drop_when_empty"]));

    // Unknown port or protocol on a ClusterIP; an address that carries no frontend.
    let t = check(
        &mut f,
        &Case::tcp(
            "unknown port",
            FromPod,
            "10.0.1.2:40002",
            "172.30.0.41:81",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "reject_unknown_port");
    let t = check(
        &mut f,
        &Case::udp(
            "unknown protocol",
            FromPod,
            "10.0.1.2:40002",
            "172.30.0.41:80",
        ),
    );
    assert_eq!(t["decision"], "reject_unknown_port");
    let t = check(
        &mut f,
        &Case::tcp(
            "not a frontend",
            FromPod,
            "10.0.1.2:40002",
            "10.0.2.9:80",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "not_a_frontend");
    assert!(t["reason"].is_null());

    // loadBalancerSourceRanges, from outside (XDP).
    for (what, client) in [
        ("source in range /24", "203.0.113.5:50000"),
        ("source in range /32", "198.51.100.7:50001"),
    ] {
        let t = check(&mut f, &Case::tcp(what, Xdp, client, "192.0.2.10:443", SYN));
        assert_eq!(t["decision"], "new_flow", "{what}");
        assert_eq!(t["scope"], "external");
        assert_eq!(t["service"]["source_range_id"], range_id);
    }
    let t = check(
        &mut f,
        &Case::tcp(
            "source out of range",
            Xdp,
            "8.8.8.8:50002",
            "192.0.2.10:443",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "drop_source_range");
    assert_eq!(t["reason"], "drop_source_range");
    // A port the LoadBalancer IP does not serve, and the internal scope it has no frontend in:
    // it is no ClusterIP, so both pass to the stack.
    let t = check(
        &mut f,
        &Case::tcp("not served", Xdp, "8.8.8.8:50002", "192.0.2.10:80", SYN),
    );
    assert_eq!(t["decision"], "not_served");
    let t = check(
        &mut f,
        &Case::tcp(
            "other scope",
            FromPod,
            "203.0.113.5:50003",
            "192.0.2.10:443",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "not_served");
    // The ClusterIP from outside.
    let t = check(
        &mut f,
        &Case::tcp(
            "external new flow",
            Xdp,
            "198.18.0.1:1234",
            "172.30.0.41:80",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "new_flow");

    // Session affinity: a first connection records the backend Maglev gives it; a second one
    // from another port, which Maglev would send elsewhere, sticks to it.
    let sticky = svc_sticky();
    let vip = sock("172.30.0.45:8080");
    let first = sock("10.0.5.5:41000");
    let t = check(
        &mut f,
        &Case::tcp("affinity, first connection", FromPod, first, vip, SYN),
    );
    assert_eq!(t["selection"]["method"], "maglev");
    assert_eq!(t["affinity_recorded"], true);
    let sticky_id = t["backend_id"].as_u64().unwrap();
    let second = (41_001..=u16::MAX)
        .map(|port| SocketAddrV4::new(*first.ip(), port))
        .find(|src| u64::from(maglev_pick(&f, &sticky, *src, vip)) != sticky_id)
        .unwrap();
    let t = check(
        &mut f,
        &Case::tcp("affinity hit", FromPod, second, vip, SYN),
    );
    assert_eq!(t["decision"], "new_flow");
    assert_eq!(t["selection"]["method"], "affinity");
    assert_eq!(t["selection"]["timeout_s"], AFFINITY_S);
    assert!(t["selection"]["age_s"].as_u64().unwrap() < 5);
    assert_eq!(t["backend_id"], sticky_id);
    assert!(t["explanation"].as_str().unwrap().contains("affinity"));

    // A RST closes the web flow; a SYN on the same ports is a new connection, balanced anew.
    let t = check(
        &mut f,
        &Case::tcp(
            "rst",
            FromPod,
            "10.0.1.2:40000",
            "172.30.0.41:80",
            flags::RST | ACK,
        ),
    );
    assert_eq!(t["decision"], "established");
    let t = check(
        &mut f,
        &Case::tcp(
            "syn after rst",
            FromPod,
            "10.0.1.2:40000",
            "172.30.0.41:80",
            SYN,
        ),
    );
    assert_eq!(t["decision"], "new_flow");

    // A backend slot emptied behind the service's back: flows hashed to it are dropped as
    // inconsistent, and `service list` shows the backend missing.
    let gone = f.backend_id("10.0.4.3:80");
    f.maps.backends.set(gone, Backend::default(), 0).unwrap();
    let orphan = (42_000..=u16::MAX)
        .map(|port| SocketAddrV4::new(Ipv4Addr::new(10, 0, 6, 6), port))
        .find(|src| maglev_pick(&f, &sticky, *src, vip) == gone)
        .unwrap();
    let t = check(
        &mut f,
        &Case::tcp("missing backend", FromPod, orphan, vip, SYN),
    );
    assert_eq!(t["decision"], "inconsistent");
    assert_eq!(t["reason"], "drop_inconsistent_service");

    views::check_views(&f, web_backend, sticky_id);
}
