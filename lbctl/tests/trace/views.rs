//! The views other than `trace` (`stats`, `service list`, `ct list`, `maps dump`, as JSON and
//! as tables), checked against the maps after the packets of the trace test.

use std::net::SocketAddrV4;

use lb_common::maps::snat;
use serde_json::{Value, json};

use super::{
    AFFINITY_S, all_services,
    common::{Fixture, TABLE, trace::json_sock},
    svc_dns, svc_ranged, svc_sticky, svc_web,
};

/// The number `field` of every row of a dumped map.
fn column(rows: &Value, field: &str) -> Vec<u64> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| row[field].as_u64().unwrap())
        .collect()
}

/// The other views, against what the fixture did to the maps.
pub fn check_views(f: &Fixture, web_backend: SocketAddrV4, sticky_id: u64) {
    let [web_id, dns_id, ranged_id, sticky_set_id] =
        [svc_web(), svc_dns(), svc_ranged(), svc_sticky()].map(|svc| f.set_id(&svc));
    let range_id = f.source_range_id(&svc_ranged());
    // stats: exactly the kernel's counters.
    let stats = f.json(&["stats"]);
    let verdicts: Vec<Value> = f
        .maps
        .verdict_totals()
        .unwrap()
        .into_iter()
        .map(|(r, c)| json!({"reason": r.name(), "packets": c.packets, "bytes": c.bytes}))
        .collect();
    assert_eq!(stats["verdicts"], Value::Array(verdicts));
    let mut ids: Vec<u32> = all_services().iter().map(|svc| f.set_id(svc)).collect();
    ids.sort_unstable();
    let services: Vec<Value> = ids
        .into_iter()
        .map(|id| (id, f.maps.set_totals(id).unwrap()))
        .filter(|(_, s)| s.packets > 0)
        .map(|(id, s)| {
            json!({"service_id": id, "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows})
        })
        .collect();
    assert_eq!(stats["services"], Value::Array(services));
    assert_eq!(stats["services"][0]["service_id"], web_id);

    // service list: one row per frontend, sorted by address.
    let rows = f.json(&["service", "list"]);
    let rows = rows.as_array().unwrap();
    let frontends: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}/{} {}",
                r["frontend"].as_str().unwrap(),
                r["proto"].as_str().unwrap(),
                r["scope"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        frontends,
        [
            "172.30.0.41:80/tcp internal",
            "172.30.0.41:80/tcp external",
            "172.30.0.42:53/udp internal",
            "172.30.0.43:53/udp internal",
            "172.30.0.43:80/tcp internal",
            "172.30.0.44:80/tcp internal",
            "172.30.0.45:8080/tcp internal",
            "192.0.2.10:443/tcp external",
        ]
    );
    let web = &rows[0];
    assert_eq!(web["service_id"], web_id);
    assert_eq!(web["cluster_ip"], true);
    assert_eq!(web["backend_count"], 3);
    let web_backends = web["backends"].as_array().unwrap();
    assert_eq!(web_backends.len(), 3);
    let slots: u64 = web_backends
        .iter()
        .map(|b| b["slots"].as_u64().unwrap())
        .sum();
    assert_eq!(slots, u64::from(TABLE));
    for (b, spec) in web_backends.iter().zip(svc_web().backends) {
        assert_eq!(b["backend_id"], f.backend_id(&spec.addr.to_string()));
        assert_eq!(b["state"], "active");
        assert_eq!(b["addr"], spec.addr.to_string());
        assert_eq!(b["local"], spec.local);
        let n = b["slots"].as_u64().unwrap();
        assert!((83..=84).contains(&n), "Maglev gives 251/3 slots each: {b}");
    }
    let web_stats = f.maps.set_totals(web_id).unwrap();
    assert_eq!(
        (&web["packets"], &web["bytes"], &web["new_flows"]),
        (
            &json!(web_stats.packets),
            &json!(web_stats.bytes),
            &json!(web_stats.new_flows)
        )
    );
    assert_eq!(
        rows[2]["backends"],
        json!([{"backend_id": f.backend_id("10.0.1.8:5353"), "state": "active", "addr": "10.0.1.8:5353", "local": true, "slots": null, "percent": 100.0}])
    );
    assert_eq!(rows[4]["backends"], json!([]));
    assert_eq!(rows[4]["flags"], json!([]));
    assert_eq!(rows[5]["flags"], json!(["drop_when_empty"]));
    let sticky = &rows[6];
    assert_eq!(sticky["affinity_timeout_s"], AFFINITY_S);
    let missing: Vec<&Value> = sticky["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "missing")
        .collect();
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0]["backend_id"], f.backend_id("10.0.4.3:80"));
    assert!(missing[0]["addr"].is_null());
    let ranged = &rows[7];
    assert_eq!(ranged["cluster_ip"], false);
    assert_eq!(ranged["source_range_id"], range_id);
    assert_eq!(
        ranged["source_ranges"],
        json!(["198.51.100.7/32", "203.0.113.0/24"])
    );

    // ct list: the web flow (reopened after its RST) with both directions.
    let flows = f.json(&["ct", "list"]);
    let flows = flows.as_array().unwrap();
    let web_flow = flows
        .iter()
        .find(|r| r["client"] == "10.0.1.2:40000" && r["frontend"] == "172.30.0.41:80")
        .unwrap_or_else(|| panic!("no web flow in {flows:#?}"));
    assert_eq!(web_flow["proto"], "tcp");
    assert_eq!(web_flow["service_id"], web_id);
    assert_eq!(json_sock(&web_flow["backend"]), web_backend);
    assert_eq!(web_flow["forward"]["flags"], json!([]), "reopened by a SYN");
    assert!(!web_flow["reply"].is_null(), "paired with its reply entry");
    let expires = web_flow["forward"]["expires_in_s"].as_i64().unwrap();
    assert!((45..=60).contains(&expires), "SYN timeout 60 s: {expires}");
    let dns = flows
        .iter()
        .find(|r| r["frontend"] == "172.30.0.42:53")
        .unwrap();
    assert_eq!(dns["proto"], "udp");
    assert_eq!(dns["backend"], "10.0.1.8:5353");
    let expires = dns["reply"]["expires_in_s"].as_i64().unwrap();
    // Its flow opened some seconds ago, more under emulation (the VM test): what matters is
    // that it is UDP's 30 s, not a stream's 120 s.
    assert!((15..=30).contains(&expires), "UDP timeout 30 s: {expires}");
    // Every new flow (web x3 incl. the reopened one counted once, dns, ranged x2, external,
    // sticky x2) has its pair; the missing-backend flow none.
    assert_eq!(flows.len(), 7, "{flows:#?}");
    assert!(
        flows
            .iter()
            .all(|r| !r["forward"].is_null() && !r["reply"].is_null())
    );

    // maps dump: every map, decoded.
    let dump = f.json(&["maps", "dump"]);
    for name in lb_common::maps::ALL {
        assert!(dump.get(name).is_some(), "{name} missing from the dump");
    }
    // The fixture's services are all IPv4 ones.
    for name in ["LB6_ADDRS", "LB6_SERVICES", "LB6_BACKENDS", "LB6_CT"] {
        assert_eq!(dump[name], json!([]), "{name}");
    }
    assert_eq!(
        dump["LB_SRC_RANGES"],
        json!([
            {"range_id": range_id, "cidr": "198.51.100.7/32", "value": 1},
            {"range_id": range_id, "cidr": "203.0.113.0/24", "value": 1},
            {"range_id": range_id + 1, "cidr": "0.0.0.0/0", "value": 1},
        ])
    );
    let affinity = dump["LB_AFFINITY"].as_array().unwrap();
    assert_eq!(affinity.len(), 1, "{affinity:#?}");
    assert_eq!(affinity[0]["client"], "10.0.5.5");
    assert_eq!(affinity[0]["service_id"], sticky_set_id);
    assert_eq!(affinity[0]["backend_id"], sticky_id);
    assert_eq!(affinity[0]["timeout_s"], AFFINITY_S);
    assert!(affinity[0]["age_s"].as_u64().unwrap() < 5);
    let active = column(&dump["LB_BACKENDS"], "backend_id");
    let programmed: Vec<u64> = [
        "10.0.1.5:8080",
        "10.0.1.6:8080",
        "10.0.2.7:8080",
        "10.0.1.8:5353",
        "10.0.3.1:8443",
        "10.0.3.2:8443",
        "10.0.4.1:80",
        "10.0.4.2:80",
    ]
    .map(|addr| u64::from(f.backend_id(addr)))
    .to_vec();
    assert_eq!(active, programmed);
    assert_eq!(
        dump["LB_BACKENDS"][0],
        json!({"backend_id": f.backend_id("10.0.1.5:8080"), "addr": "10.0.1.5:8080", "flags": ["active", "local"], "flags_raw": 3})
    );
    let tables = column(&dump["LB_MAGLEV"], "service_id");
    assert_eq!(tables, [web_id, ranged_id, sticky_set_id].map(u64::from));
    assert!(
        dump["LB_MAGLEV"][0].get("table").is_none(),
        "no slots without --full"
    );
    let addrs = dump["LB_ADDRS"].as_array().unwrap();
    assert_eq!(
        addrs.iter().find(|a| a["addr"] == "172.30.0.41").unwrap(),
        &json!({"addr": "172.30.0.41", "flags": ["cluster_ip"], "flags_raw": 1})
    );
    let addr_flags = |addr: &str| &addrs.iter().find(|a| a["addr"] == addr).unwrap()["flags"];
    assert_eq!(addr_flags("192.0.2.10"), &json!([]));
    assert_eq!(
        addr_flags("192.168.50.10"),
        &json!(["snat"]),
        "the SNAT address"
    );
    assert_eq!(
        dump["LB_CONFIG"],
        json!([{
            "snat_addr": "192.168.50.10",
            "snat_port_min": snat::PORT_MIN,
            "snat_port_max": snat::PORT_MAX,
            "snat_enabled": true,
            // The planner's: lb_common::maps::hairpin::DEFAULT_ADDR.
            "hairpin_addr": "169.254.42.1",
            "masquerade_all": false,
            "external_cluster_ips": true,
        }])
    );
    assert_eq!(dump["LB_SERVICES"].as_array().unwrap().len(), 8);
    assert_eq!(dump["LB_CT"].as_array().unwrap().len(), 14);
    let reply = dump["LB_CT"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["dir"] == "reply" && e["dst"] == "10.0.1.2:5000")
        .unwrap();
    assert_eq!(
        (
            &reply["src"],
            &reply["nat"],
            &reply["proto"],
            &reply["backend_id"],
            &reply["service_id"]
        ),
        (
            &json!("10.0.1.8:5353"),
            &json!("172.30.0.42:53"),
            &json!("udp"),
            &json!(f.backend_id("10.0.1.8:5353")),
            &json!(dns_id)
        )
    );
    assert_eq!(dump["LB_FRAGS"], json!([]));
    assert_eq!(dump["LB_VERDICTS"], stats["verdicts"]);
    assert_eq!(dump["LB_SVC_STATS"], stats["services"]);

    // One map, by name or alias; --full lists every slot.
    let ct = f.json(&["maps", "dump", "--map", "ct"]);
    assert_eq!(
        ct.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["LB_CT"]
    );
    let full = f.json(&["maps", "dump", "--map", "LB_MAGLEV", "--full"]);
    let table: Vec<u64> = full["LB_MAGLEV"][0]["table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let installed = f.maps.maglev_table(web_id, TABLE).unwrap();
    assert_eq!(
        table,
        installed.iter().map(|&v| u64::from(v)).collect::<Vec<_>>()
    );

    // The table output, smoke-checked: what each view must say.
    let maglev_header = format!("service {web_id} table (251 slots):");
    let views: [(&[&str], &[&str]); 6] = [
        (
            &["maps", "dump"],
            &[
                "LB_CT (14 entries)",
                "LB_FRAGS (0 entries)",
                "LB6_CT (0 entries)",
                "10.0.1.8:5353",
                "203.0.113.0/24",
                "cluster_ip",
            ],
        ),
        (
            &["maps", "dump", "--map", "maglev", "--full"],
            &[&maglev_header],
        ),
        (
            &["service", "list"],
            &[
                "172.30.0.41:80/tcp internal",
                "missing",
                "affinity 10800s",
                "drop_when_empty",
                "198.51.100.7/32",
            ],
        ),
        (&["ct", "list"], &["10.0.1.2:40000", "172.30.0.42:53"]),
        (&["stats"], &["drop_source_range", "new flows"]),
        (
            &["trace", "10.0.1.2:40000", "172.30.0.41:80", "tcp"],
            &["decision: established (pass)"],
        ),
    ];
    for (args, needles) in views {
        let text = f.text(args);
        for needle in needles {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
