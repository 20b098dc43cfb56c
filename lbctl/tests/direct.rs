//! `lbctl trace` against the real datapath for a pod's direct connection (to a backend's own
//! address, no frontend) from a port a load-balanced flow to that backend holds: the port it gets
//! instead, its later packets and replies, and how `ct list`, `maps dump` and `trace`'s text show
//! it. Needs root (BPF, mount).

mod common;

use common::{
    Fixture, one_backend_cluster_ip, sock,
    trace::{Case, Hook, check, json_sock},
};
use lb_testbed::packet::flags;
use serde_json::json;

#[test]
fn trace_predicts_direct_connections_that_clash_with_a_balanced_flow() {
    let (vip, backend, pod) = ("172.30.0.49:80", "10.0.9.9:8080", "10.0.9.20:40000");
    let Some(mut f) = Fixture::new() else { return };
    f.program(&one_backend_cluster_ip("web", vip, backend));
    let (vip, backend, pod) = (sock(vip), sock(backend), sock(pod));
    use Hook::*;
    let (syn, ack) = (flags::SYN, flags::ACK);
    // (decision, verdict, counter) of a trace.
    let outcome = |t: &serde_json::Value| {
        [&t["decision"], &t["verdict"], &t["reason"]].map(|v| v.as_str().unwrap_or("-").to_owned())
    };

    let t = check(
        &mut f,
        &Case::tcp("direct, no clash", FromPod, pod, backend, syn),
    );
    assert_eq!(outcome(&t), ["not_a_frontend", "pass", "-"]);
    let t = check(&mut f, &Case::tcp("balanced", FromPod, pod, vip, syn));
    assert_eq!(t["decision"], "new_flow");
    let dump = f.json(&["maps", "dump", "--map", "direct"]);
    assert_eq!(dump["LB_DIRECT_NAT"][0]["remapped_before"], false);

    // From the balanced flow's port: another port, the pod's address kept.
    let t = check(
        &mut f,
        &Case::tcp("direct, clashing", FromPod, pod, backend, syn),
    );
    assert_eq!(outcome(&t), ["port_remapped", "pass", "port_remapped"]);
    let remapped = json_sock(&t["output"]["src"]);
    assert_eq!(
        (remapped.ip(), json_sock(&t["output"]["dst"])),
        (pod.ip(), backend)
    );
    assert_ne!(remapped.port(), pod.port());
    assert_eq!(t["snat"]["kind"], "client_port");
    let text = f.text(&[
        "trace",
        &pod.to_string(),
        &backend.to_string(),
        "tcp",
        "--syn",
    ]);
    assert!(
        text.contains("established direct connection"),
        "now established: {text}"
    );

    let t = check(
        &mut f,
        &Case::tcp("direct, established", FromPod, pod, backend, ack),
    );
    assert_eq!(
        (&t["decision"], &t["reason"], json_sock(&t["output"]["src"])),
        (&json!("established"), &json!("established"), remapped)
    );
    let t = check(
        &mut f,
        &Case::tcp("direct, reply", ToPod, backend, remapped, syn | ack),
    );
    assert_eq!(
        (
            &t["decision"],
            json_sock(&t["output"]["src"]),
            json_sock(&t["output"]["dst"])
        ),
        (&json!("reverse_nat"), backend, pod)
    );
    let text = f.text(&[
        "trace",
        &backend.to_string(),
        &remapped.to_string(),
        "tcp",
        "--reply",
    ]);
    assert!(text.contains("reply of a direct connection"), "{text}");

    let flows = f.json(&["ct", "list"]);
    let direct: Vec<_> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["direct"] == true)
        .collect();
    assert_eq!(direct.len(), 1, "{flows:#}");
    assert_eq!(
        (
            &direct[0]["client"],
            &direct[0]["backend"],
            &direct[0]["snat"]
        ),
        (
            &json!(pod.to_string()),
            &json!(backend.to_string()),
            &json!(remapped.to_string())
        )
    );
    assert!(!direct[0]["reply"].is_null(), "{flows:#}");
    let table = f.text(&["ct", "list"]);
    assert!(table.contains("(direct)"), "{table}");
    let dump = f.json(&["maps", "dump", "--map", "direct"]);
    assert_eq!(dump["LB_DIRECT_NAT"][0]["remapped_before"], true);
}
