//! `lbctl trace` against the real datapath for hairpin flows (a pod balanced to itself, seen
//! from the hairpin address), their replies, and a node without a hairpin address. Needs root
//! (BPF, mount).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{
    Fixture, one_backend_cluster_ip, sock,
    trace::{Case, Hook, check, json_sock},
};
use lb_common::Be32;
use lb_testbed::packet::flags;
use serde_json::json;

/// The hairpin address the planner always programs (`lb_common::maps::hairpin::DEFAULT_ADDR`).
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// Clears LB_CONFIG's `hairpin_addr`, which the planner never does: a node without a hairpin
/// address, written by hand.
fn clear_hairpin(f: &mut Fixture) {
    let mut config = f.maps.config.get(&0, 0).unwrap();
    config.hairpin_addr = Be32::from_host(0);
    f.maps.config.set(0, config, 0).unwrap();
}

#[test]
fn trace_predicts_hairpin_flows() {
    let Some(mut f) = Fixture::new() else { return };
    use Hook::*;
    const SYN: u8 = flags::SYN;
    const ACK: u8 = flags::ACK;
    // A ClusterIP whose only backend is the pod that connects to it.
    f.program(&one_backend_cluster_ip(
        "self",
        "172.30.0.48:80",
        "10.0.8.8:8080",
    ));
    let vip = sock("172.30.0.48:80");
    let pod = sock("10.0.8.8:40000");
    let as_seen = SocketAddrV4::new(HAIRPIN, pod.port());

    let t = check(
        &mut f,
        &Case::tcp("hairpin new flow", FromPod, pod, vip, SYN),
    );
    assert_eq!(
        (&t["decision"], &t["verdict"], &t["reason"]),
        (&json!("new_flow"), &json!("bounce"), &json!("new_flow"))
    );
    assert_eq!(
        (&t["snat"]["kind"], json_sock(&t["snat"]["addr"])),
        (&json!("hairpin"), as_seen)
    );
    assert_eq!(json_sock(&t["output"]["src"]), as_seen);
    let t = check(
        &mut f,
        &Case::tcp("hairpin established", FromPod, pod, vip, ACK),
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("established"), &json!("bounce"))
    );

    // The pod answers the hairpin address: the service answers the pod.
    let backend = sock("10.0.8.8:8080");
    let t = check(
        &mut f,
        &Case::tcp("hairpin reply", FromPod, backend, as_seen, SYN | ACK),
    );
    assert_eq!(
        (&t["decision"], &t["verdict"], &t["reason"]),
        (
            &json!("hairpin_reply"),
            &json!("bounce"),
            &json!("reply_nat")
        )
    );
    assert_eq!(
        (
            json_sock(&t["output"]["src"]),
            json_sock(&t["output"]["dst"])
        ),
        (vip, pod)
    );
    // Left alone on the reply path; anything else to the hairpin address passes untouched.
    let t = check(
        &mut f,
        &Case::tcp(
            "hairpin reply on the reply path",
            ToPod,
            backend,
            as_seen,
            ACK,
        ),
    );
    assert_eq!(t["decision"], "snat_untouched");
    let t = check(
        &mut f,
        &Case::tcp(
            "hairpin address, no flow",
            FromPod,
            backend,
            SocketAddrV4::new(HAIRPIN, 40_001),
            ACK,
        ),
    );
    assert_eq!(t["decision"], "not_served");
    assert!(t["reason"].is_null());

    let flows = f.json(&["ct", "list"]);
    assert_eq!(flows.as_array().unwrap().len(), 1, "{flows:#}");
    assert_eq!(
        (
            &flows[0]["client"],
            &flows[0]["snat"],
            &flows[0]["forward"]["flags"]
        ),
        (
            &json!(pod.to_string()),
            &json!(as_seen.to_string()),
            &json!(["established", "snat", "hairpin"])
        )
    );
    assert!(!flows[0]["reply"].is_null(), "{flows:#}");
    let config = f.json(&["maps", "dump", "--map", "config"]);
    assert_eq!(config["LB_CONFIG"][0]["hairpin_addr"], HAIRPIN.to_string());

    // Without a hairpin address the flow is only DNATed (and fails in the pod).
    clear_hairpin(&mut f);
    let t = check(
        &mut f,
        &Case::tcp(
            "no hairpin address",
            FromPod,
            sock("10.0.8.8:40002"),
            vip,
            SYN,
        ),
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("new_flow"), &json!("pass"))
    );
    assert!(t["snat"].is_null());
}
