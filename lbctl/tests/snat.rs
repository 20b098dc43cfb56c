//! `lbctl trace` against the real datapath for external flows to backends on other nodes: source
//! NAT to the node's address, SNAT port allocation (free, reopened, taken, none left, no SNAT
//! address), the full reversal of replies, local backends that see the client, and how the
//! views show such flows. Needs root (BPF, mount, network namespaces).
//!
//! The test runs in a network namespace of its own whose routing table sends everything out of
//! one interface to a neighbour with a known MAC: source-NATed packets are routed by the
//! datapath after a FIB lookup, which then always resolves (XDP_REDIRECT / TC_ACT_REDIRECT),
//! whatever the host's routing table holds; their rewritten bytes are what is checked.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{
    Fixture, NODE, backends, configure_snat, frontend, in_routed_netns, service,
    trace::{Case, Hook, backend_addr, check, hash_of, json_sock, maglev_pick, maglev_pick_l4},
};
use lb_common::{
    Be16, Be32,
    conntrack::{CtEntry, FORWARD, FlowKey, REPLY, ct_flags},
    maps::{scope, snat},
    net::proto::{TCP, UDP},
};
use lb_datapath::{
    predict::flow_key,
    program::{FrontendKind::NodePort, ServiceSpec},
};
use lb_testbed::packet::flags;
use serde_json::{Value, json};

/// The NodePorts of the service, TCP and UDP.
const NODE_PORT: u16 = 30_080;
const NODE_PORT_UDP: u16 = 30_053;

/// A NodePort on the node's address (external scope), TCP and UDP. The first and last backends
/// run on other nodes, the second on this one.
fn svc_node_port() -> ServiceSpec {
    let node = NODE.octets();
    service(
        "node-port",
        vec![
            frontend(node, NODE_PORT, TCP, scope::EXTERNAL, NodePort),
            frontend(node, NODE_PORT_UDP, UDP, scope::EXTERNAL, NodePort),
        ],
        backends(
            false,
            &["10.10.1.6:8080", "10.10.0.7:8080", "10.10.2.8:8080"],
        ),
    )
}

fn forward_key(client: SocketAddrV4, frontend: SocketAddrV4, l4: u8) -> FlowKey {
    flow_key(client, frontend, l4, FORWARD)
}

/// The key of the replies of a flow source-NATed to `NODE:port`.
fn snat_reply_key(backend: SocketAddrV4, port: u16, l4: u8) -> FlowKey {
    flow_key(backend, SocketAddrV4::new(NODE, port), l4, REPLY)
}

/// The SNAT port candidates of a new flow, in the order the datapath tries them, for the range
/// `min..=max` (the allocation rule, restated independently of lbctl): its home port (the
/// client's port turned by an offset of its address), then ports spread by the flow hash.
fn snat_candidates(
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    l4: u8,
    min: u16,
    max: u16,
) -> Vec<u16> {
    let span = u32::from(max - min) + 1;
    let turn = u32::from_ne_bytes(client.ip().octets()).wrapping_mul(0x9e37_79b1);
    let home = u32::from(client.port()).wrapping_add(turn) % span;
    let hash = hash_of(client, frontend, l4);
    (0..snat::PROBES)
        .map(|probe| match probe {
            0 => min + home as u16,
            _ => min + (hash.wrapping_add(probe.wrapping_mul(0x9e37_79b1)) % span) as u16,
        })
        .collect()
}

/// The node address and port the datapath recorded for the flow `client -> frontend`.
fn recorded_snat(
    f: &Fixture,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    l4: u8,
) -> SocketAddrV4 {
    let entry = f
        .maps
        .ct
        .get(&forward_key(client, frontend, l4), 0)
        .unwrap();
    assert_ne!(
        entry.flags & ct_flags::SNAT,
        0,
        "{client} -> {frontend} is source-NATed"
    );
    SocketAddrV4::new(entry.snat_addr.to_ip(), entry.snat_port.to_host())
}

#[test]
fn trace_predicts_source_nat_of_external_flows_to_other_nodes() {
    in_routed_netns(trace_predicts_source_nat_here);
}

fn trace_predicts_source_nat_here() {
    let Some(mut f) = Fixture::new() else { return };
    use Hook::*;
    const SYN: u8 = flags::SYN;
    const ACK: u8 = flags::ACK;
    let svc = svc_node_port();
    f.program(&svc);
    let node_port = SocketAddrV4::new(NODE, NODE_PORT);
    let local_ids: Vec<u32> = svc
        .backends
        .iter()
        .filter(|b| b.local)
        .map(|b| f.backend_id(&b.addr.to_string()))
        .collect();
    let local = |id: u32| local_ids.contains(&id);
    // Client ports from `ip`.
    let clients = |ip: [u8; 4]| (40_000..).map(move |port| SocketAddrV4::new(ip.into(), port));
    // Clients Maglev sends to a backend on another node.
    let remote: Vec<SocketAddrV4> = clients([203, 0, 113, 7])
        .filter(|c| !local(maglev_pick(&f, &svc, *c, node_port)))
        .take(2)
        .collect();

    // The node has no SNAT address yet: such a flow cannot be source-NATed, it is dropped.
    let client = remote[0];
    let t = check(
        &mut f,
        &Case::tcp("no SNAT address", Xdp, client, node_port, SYN),
    );
    assert_eq!(t["decision"], "drop_snat_ports");
    assert_eq!(t["reason"], "drop_snat_ports");
    assert!(t["snat"].is_null() && t["output"].is_null());
    assert_eq!(t["backend_id"], maglev_pick(&f, &svc, client, node_port));
    let explanation = t["explanation"].as_str().unwrap();
    assert!(explanation.contains("no SNAT address"), "{explanation}");

    configure_snat(&mut f, snat::PORT_MIN, snat::PORT_MAX);

    // A new flow: DNAT to the backend and SNAT to the node, on the first candidate port (no
    // flow holds any). `check` compares the whole output frame with the prediction.
    let t = check(
        &mut f,
        &Case::tcp("SNAT new flow", Xdp, client, node_port, SYN),
    );
    assert_eq!(
        (&t["decision"], &t["verdict"], &t["reason"]),
        (&json!("new_flow"), &json!("forward"), &json!("new_flow"))
    );
    let backend = json_sock(&t["backend"]);
    let node = json_sock(&t["snat"]["addr"]);
    let candidates = snat_candidates(client, node_port, TCP, snat::PORT_MIN, snat::PORT_MAX);
    assert_eq!(node, SocketAddrV4::new(NODE, candidates[0]));
    assert_eq!(
        t["snat"],
        json!({
            "kind": "node",
            "addr": node.to_string(),
            "client": client.to_string(),
            "hash": hash_of(client, node_port, TCP),
            "probe": 0,
            "port_state": "free",
        })
    );
    assert_eq!(json_sock(&t["output"]["src"]), node);
    assert_eq!(recorded_snat(&f, client, node_port, TCP), node);
    let explanation = t["explanation"].as_str().unwrap();
    assert!(
        explanation.contains("SNAT")
            && explanation.contains("routed to its next hop by this node (FIB lookup"),
        "{explanation}"
    );

    // The rest of the flow keeps both translations.
    let t = check(
        &mut f,
        &Case::tcp("SNAT established", Xdp, client, node_port, ACK),
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("established"), &json!("forward"))
    );
    assert_eq!(json_sock(&t["output"]["src"]), node);
    assert_eq!(json_sock(&t["snat"]["addr"]), node);

    // The backend's reply reaches the node's SNAT address: the frontend becomes its source, the
    // client its destination (through XDP and through tc).
    for (what, hook, tcp_flags) in [
        ("SNAT reply", Xdp, SYN | ACK),
        ("SNAT reply, tc", ExtIn, ACK),
    ] {
        let t = check(&mut f, &Case::tcp(what, hook, backend, node, tcp_flags));
        assert_eq!(
            (&t["decision"], &t["verdict"], &t["reason"]),
            (&json!("snat_reply"), &json!("forward"), &json!("reply_nat")),
            "{what}"
        );
        assert_eq!(
            (
                json_sock(&t["output"]["src"]),
                json_sock(&t["output"]["dst"])
            ),
            (node_port, client),
            "{what}"
        );
        assert_eq!(json_sock(&t["snat"]["client"]), client);
    }
    // The reply path (pod veth and uplink egress) leaves such replies alone.
    let t = check(
        &mut f,
        &Case::tcp("SNAT reply on the reply path", ToPod, backend, node, ACK),
    );
    assert_eq!(t["decision"], "snat_untouched");
    assert!(t["reason"].is_null());
    // A port of the range no flow holds: not a reply, the node's stack gets it.
    let unused = *candidates.iter().find(|p| **p != node.port()).unwrap();
    let t = check(
        &mut f,
        &Case::tcp(
            "unknown SNAT port",
            Xdp,
            backend,
            SocketAddrV4::new(NODE, unused),
            ACK,
        ),
    );
    assert_eq!(t["decision"], "not_served");

    // Another client whose first candidate port is held by a live flow of someone else and
    // whose second is held by an expired one: it gets the second.
    let second = remote[1];
    let second_backend = backend_addr(&f, u64::from(maglev_pick(&f, &svc, second, node_port)));
    let second_candidates = snat_candidates(second, node_port, TCP, snat::PORT_MIN, snat::PORT_MAX);
    let candidates = &second_candidates;
    let (holder_backend, holder_set) = (f.backend_id("10.10.1.6:8080"), f.set_id(&svc));
    let holder = |deadline_ns: u64| CtEntry {
        deadline_ns,
        backend_id: holder_backend,
        set_id: holder_set,
        nat_addr: Be32::from(NODE),
        nat_port: Be16::from_host(NODE_PORT),
        flags: ct_flags::SNAT,
        snat_addr: Be32::from(Ipv4Addr::new(198, 51, 100, 99)),
        snat_port: Be16::from_host(1234),
        ..Default::default()
    };
    f.maps
        .ct
        .insert(
            snat_reply_key(second_backend, candidates[0], TCP),
            holder(u64::MAX),
            0,
        )
        .unwrap();
    f.maps
        .ct
        .insert(
            snat_reply_key(second_backend, candidates[1], TCP),
            holder(1),
            0,
        )
        .unwrap();
    let t = check(
        &mut f,
        &Case::tcp("SNAT, first candidate taken", Xdp, second, node_port, SYN),
    );
    assert_eq!(t["snat"]["probe"], 1);
    assert_eq!(
        json_sock(&t["snat"]["addr"]),
        SocketAddrV4::new(NODE, candidates[1])
    );
    assert_eq!(
        recorded_snat(&f, second, node_port, TCP).port(),
        candidates[1]
    );

    // A connection closed and reopened on the same ports keeps its port.
    check(
        &mut f,
        &Case::tcp("SNAT rst", Xdp, client, node_port, flags::RST | ACK),
    );
    let t = check(
        &mut f,
        &Case::tcp("SNAT reopened", Xdp, client, node_port, SYN),
    );
    assert_eq!(t["decision"], "new_flow");
    assert_eq!(json_sock(&t["snat"]["addr"]), node);
    assert_eq!(t["snat"]["port_state"], "reopened");

    // One port in the range, held by the first client's flow: a new flow to the same backend
    // finds no port.
    configure_snat(&mut f, node.port(), node.port());
    let third = clients([203, 0, 113, 8])
        .find(|c| backend_addr(&f, u64::from(maglev_pick(&f, &svc, *c, node_port))) == backend)
        .unwrap();
    let t = check(
        &mut f,
        &Case::tcp("no free SNAT port", Xdp, third, node_port, SYN),
    );
    assert_eq!(t["decision"], "drop_snat_ports");
    let explanation = t["explanation"].as_str().unwrap();
    assert!(
        explanation.contains("every port of") && explanation.contains("is held by a live flow"),
        "{explanation}"
    );
    configure_snat(&mut f, snat::PORT_MIN, snat::PORT_MAX);

    // A backend on this node sees the client: DNAT only, and the stack delivers.
    let near = clients([203, 0, 113, 7])
        .find(|c| local(maglev_pick(&f, &svc, *c, node_port)))
        .unwrap();
    let t = check(
        &mut f,
        &Case::tcp("local backend", Xdp, near, node_port, SYN),
    );
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("new_flow"), &json!("pass"))
    );
    assert!(t["snat"].is_null());

    // UDP through tc, and its answer.
    let udp_port = SocketAddrV4::new(NODE, NODE_PORT_UDP);
    let udp_client = clients([203, 0, 113, 9])
        .find(|c| !local(maglev_pick_l4(&f, &svc, *c, udp_port, UDP)))
        .unwrap();
    let t = check(&mut f, &Case::udp("SNAT udp", ExtIn, udp_client, udp_port));
    assert_eq!(
        (&t["decision"], &t["verdict"]),
        (&json!("new_flow"), &json!("forward"))
    );
    let udp_node = json_sock(&t["snat"]["addr"]);
    assert_eq!(recorded_snat(&f, udp_client, udp_port, UDP), udp_node);
    let t = check(
        &mut f,
        &Case::udp("SNAT udp answer", ExtIn, json_sock(&t["backend"]), udp_node),
    );
    assert_eq!(t["decision"], "snat_reply");
    assert_eq!(json_sock(&t["output"]["dst"]), udp_client);

    // The views.
    let flows = f.json(&["ct", "list"]);
    let flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == client.to_string())
        .unwrap_or_else(|| panic!("no flow of {client} in {flows:#}"));
    assert_eq!(
        (&flow["frontend"], &flow["backend"], &flow["snat"]),
        (
            &json!(node_port.to_string()),
            &json!(backend.to_string()),
            &json!(node.to_string())
        )
    );
    assert!(
        !flow["reply"].is_null(),
        "paired with its reply entry: {flow:#}"
    );
    assert_eq!(flow["forward"]["flags"], json!(["snat"]));
    let near_flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == near.to_string())
        .unwrap();
    assert!(near_flow["snat"].is_null() && !near_flow["reply"].is_null());
    // The live planted holder has no forward entry: it shows as a reply-only flow of its
    // client, translated to the node. (The expired one was taken over by the second client.)
    let planted: Vec<&Value> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["forward"].is_null())
        .collect();
    assert_eq!(planted.len(), 1, "{flows:#}");
    assert_eq!(
        (&planted[0]["client"], &planted[0]["snat"]),
        (
            &json!("198.51.100.99:1234"),
            &json!(SocketAddrV4::new(NODE, second_candidates[0]).to_string())
        )
    );

    let ct = f.json(&["maps", "dump", "--map", "ct"]);
    let reply = ct["LB_CT"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["dir"] == "reply" && e["dst"] == node.to_string())
        .unwrap();
    assert_eq!(
        (&reply["src"], &reply["nat"], &reply["snat"]),
        (
            &json!(backend.to_string()),
            &json!(node_port.to_string()),
            &json!(client.to_string())
        )
    );
    let config = f.json(&["maps", "dump", "--map", "config"]);
    assert_eq!(config["LB_CONFIG"][0]["snat_addr"], NODE.to_string());
    assert_eq!(config["LB_CONFIG"][0]["snat_enabled"], true);

    let stats = f.json(&["stats"]);
    let count = |reason: &str| {
        stats["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["reason"] == reason)
            .unwrap_or_else(|| panic!("{reason} missing from {stats:#}"))["packets"]
            .clone()
    };
    assert_eq!(count("drop_snat_ports"), 2);
    // Every translated packet of a source-NATed flow went straight out (routed namespace).
    assert_eq!(count("forwarded"), 9);

    for (args, needles) in [
        (
            vec!["ct", "list"],
            vec![node.to_string(), "snat".to_owned()],
        ),
        (
            vec!["maps", "dump", "--map", "config"],
            vec![
                "LB_CONFIG (1 entry)".to_owned(),
                format!("{}-{}", snat::PORT_MIN, snat::PORT_MAX),
            ],
        ),
        (
            vec!["maps", "dump", "--map", "addrs"],
            vec!["snat".to_owned()],
        ),
    ] {
        let text = f.text(&args);
        for needle in needles {
            assert!(text.contains(&needle), "{needle} missing from:\n{text}");
        }
    }
    let trace = [
        "trace",
        &backend.to_string(),
        &node.to_string(),
        "tcp",
        "--scope",
        "external",
    ];
    let text = f.text(&trace);
    assert!(
        text.contains("decision: snat_reply (forward)")
            && text.contains(&format!("output:   {node_port} -> {client}"))
            && text.contains("routed:   routed to its next hop by this node (FIB lookup"),
        "{text}"
    );
}
