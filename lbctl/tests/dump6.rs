//! `lbctl maps dump` of IPv6's own maps (`LB6_ADDRS`, `LB6_SERVICES`, `LB6_BACKENDS`,
//! `LB6_CT`) against the real, pinned maps: the rows of their IPv4 counterparts, with IPv6
//! addresses; and `lbctl service list` of an IPv6 frontend. The entries are written straight
//! into the maps. Needs root (BPF, mount).

mod common;

use std::net::Ipv6Addr;

use common::Fixture;
use lb_common::{
    Be16, Be128,
    conntrack::{CtEntry6, FORWARD, FlowKey6, ct_flags},
    maps::{AddrInfo, Backend6, Frontend, FrontendKey6, addr_flags, backend_flags, scope},
    net::proto,
    time::SECOND_NS,
};
use lb_datapath::predict;
use serde_json::json;

/// An id no IPv4 backend of the fixture has (it programs none).
const BACKEND_ID: u32 = 40;
const SET_ID: u32 = 12;

fn v6(text: &str) -> Be128 {
    Be128::from(text.parse::<Ipv6Addr>().unwrap())
}

fn port(p: u16) -> Be16 {
    Be16::from_host(p)
}

/// A single-backend IPv6 ClusterIP `[fd00:96::10]:80` -> `[fd00:1::5]:8080`, and one flow to it
/// from `[fd00::2]:40000`, written into the maps.
fn write_ipv6_service(f: &mut Fixture) {
    let vip = v6("fd00:96::10");
    let cluster_ip = AddrInfo {
        flags: addr_flags::CLUSTER_IP,
    };
    f.maps.addrs6.insert(vip, cluster_ip, 0).unwrap();
    let key = FrontendKey6 {
        addr: vip,
        port: port(80),
        proto: proto::TCP,
        scope: scope::INTERNAL,
    };
    let frontend = Frontend {
        set_id: SET_ID,
        backend_count: 1,
        backend_id: BACKEND_ID,
        ..Default::default()
    };
    f.maps.services6.insert(key, frontend, 0).unwrap();
    let backend = Backend6 {
        addr: v6("fd00:1::5"),
        port: port(8080),
        flags: backend_flags::ACTIVE,
        ..Default::default()
    };
    f.maps.backends6.set(BACKEND_ID, backend, 0).unwrap();
    let flow = FlowKey6::new(
        v6("fd00::2"),
        port(40000),
        vip,
        port(80),
        proto::TCP,
        FORWARD,
    );
    let entry = CtEntry6 {
        deadline_ns: predict::coarse_now_ns() + 60 * SECOND_NS,
        backend_id: BACKEND_ID,
        set_id: SET_ID,
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags: ct_flags::ESTABLISHED,
        ..Default::default()
    };
    f.maps.ct6.insert(flow, entry, 0).unwrap();
}

#[test]
fn ipv6_maps_dump_like_their_ipv4_counterparts() {
    let Some(mut f) = Fixture::new() else { return };
    let empty = f.json(&["maps", "dump"]);
    for name in ["LB6_ADDRS", "LB6_SERVICES", "LB6_BACKENDS", "LB6_CT"] {
        assert_eq!(empty[name], json!([]), "{name}");
    }
    write_ipv6_service(&mut f);
    let dump = f.json(&["maps", "dump"]);
    assert_eq!(
        dump["LB6_ADDRS"],
        json!([{"addr": "fd00:96::10", "flags": ["cluster_ip"], "flags_raw": 1}])
    );
    assert_eq!(
        dump["LB6_SERVICES"],
        json!([{
            "frontend": "[fd00:96::10]:80",
            "proto": "tcp",
            "scope": "internal",
            "service_id": SET_ID,
            "backend_count": 1,
            "backend_id": BACKEND_ID,
            "table_size": 0,
            "flags": [],
            "flags_raw": 0,
            "affinity_timeout_s": 0,
            "source_range_id": 0,
        }])
    );
    assert_eq!(
        dump["LB6_BACKENDS"],
        json!([{"backend_id": BACKEND_ID, "addr": "[fd00:1::5]:8080", "flags": ["active"], "flags_raw": 1}])
    );
    let ct = &dump["LB6_CT"][0];
    assert_eq!(
        (&ct["dir"], &ct["src"], &ct["dst"], &ct["nat"], &ct["snat"]),
        (
            &json!("forward"),
            &json!("[fd00::2]:40000"),
            &json!("[fd00:96::10]:80"),
            &json!("[fd00:1::5]:8080"),
            &json!(null)
        )
    );
    let expires = ct["expires_in_s"].as_i64().unwrap();
    assert!((55..=60).contains(&expires), "{expires}");
    // The IPv4 maps hold none of it.
    assert_eq!(dump["LB_SERVICES"], json!([]));
    assert_eq!(dump["LB_CT"], json!([]));

    // One map by its alias, and as a table.
    let ct6 = f.json(&["maps", "dump", "--map", "ct6"]);
    assert_eq!(
        ct6.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["LB6_CT"]
    );
    let text = f.text(&["maps", "dump", "--map", "services6"]);
    for needle in ["LB6_SERVICES (1 entry)", "[fd00:96::10]:80", "internal"] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let text = f.text(&["maps", "dump"]);
    for needle in [
        "LB6_ADDRS (1 entry)",
        "LB6_BACKENDS (1 entry)",
        "[fd00:1::5]:8080",
        "LB6_CT (1 entry)",
        "[fd00::2]:40000",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn service_list_shows_ipv6_frontends_after_the_ipv4_ones() {
    let Some(mut f) = Fixture::new() else { return };
    write_ipv6_service(&mut f);
    let list = f.json(&["service", "list"]);
    let rows = list.as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["frontend"] == json!("[fd00:96::10]:80"))
        .unwrap_or_else(|| panic!("no IPv6 row in {list:#}"));
    assert_eq!(row["cluster_ip"], json!(true));
    assert_eq!(row["backends"][0]["addr"], json!("[fd00:1::5]:8080"));
    assert_eq!(row["backends"][0]["state"], json!("active"));
    assert_eq!(row["backends"][0]["percent"], json!(100.0));
    let text = f.text(&["service", "list"]);
    for needle in ["[fd00:96::10]:80", "[fd00:1::5]:8080"] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}
