//! The real `lb-agent` binary with a YAML source, in network namespaces, with real sockets:
//! endpoint changes reach the datapath, held connections keep their backend, restarts lose
//! nothing, session affinity sticks and expires, invalid input is reported by name, pods that
//! appear later are balanced, the periodic resync repairs the maps, a rare datapath drop is
//! logged, kube-proxy's ports held by another process do not stop the agent, and `cleanup`
//! removes everything. Needs root.

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use common::agent::{AgentBed, TIMEOUT, backend_ip, name, service_yaml, slice_yaml};
use lb_testbed::server;

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 41);

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

/// A bed with three backends behind `web` (ClusterIP 172.30.0.41:80), agent running.
fn web_bed(extra_spec: &str) -> Option<AgentBed> {
    let mut bed = AgentBed::new(3)?;
    bed.write_web(VIP, extra_spec);
    bed.start_agent();
    Some(bed)
}

fn distinct(names: &[String]) -> BTreeSet<String> {
    names.iter().cloned().collect()
}

#[test]
fn endpoint_changes_reach_the_datapath_and_held_connections_keep_their_backend() {
    let Some(bed) = web_bed("") else { return };
    assert_eq!(
        distinct(&bed.names(vip(), 30)).len(),
        3,
        "all three backends answer"
    );

    let mut held = bed.hold(vip());
    let held_index: u8 = held.backend.trim_start_matches("backend-").parse().unwrap();

    // Remove another endpoint: new connections avoid it; the held one stays where it is.
    let removed = (held_index + 1) % 3;
    let kept: Vec<Ipv4Addr> = (0..3).filter(|i| *i != removed).map(backend_ip).collect();
    bed.write("web-slice.yaml", &slice_yaml("web", &kept));
    let gone = format!("backend-{removed}");
    // 40 connections: 12 would all miss the removed endpoint by chance (one time in 130) while
    // it still serves, and the checks below would fail.
    let converged = bed.wait_until(Duration::from_secs(5), || {
        !bed.names(vip(), 40).contains(&gone)
    });
    assert!(
        converged,
        "removed endpoint still answers; agent log:\n{}",
        bed.log()
    );
    let names = bed.names(vip(), 40);
    assert!(!names.contains(&gone), "{names:?}");
    assert_eq!(distinct(&names).len(), 2);
    held.assert_kept("the held connection keeps its backend");

    // Add it back: it takes new connections again; still the held one does not move.
    bed.write(
        "web-slice.yaml",
        &slice_yaml("web", &[backend_ip(0), backend_ip(1), backend_ip(2)]),
    );
    assert!(bed.wait_until(Duration::from_secs(5), || {
        bed.names(vip(), 12).contains(&gone)
    }));
    held.assert_kept("the held connection keeps its backend when it comes back");
}

#[test]
fn restarting_the_agent_drops_no_held_connection_and_refuses_no_new_one() {
    let Some(mut bed) = web_bed("") else { return };
    let ids_before = bed.set_ids();
    let mut held = bed.hold(vip());

    // New connections all the time, while the agent stops, is away, and comes back.
    bed.assert_no_connection_refused(vip(), 20, |bed| {
        bed.stop_agent();
        std::thread::sleep(Duration::from_millis(500));
        held.assert_kept("the datapath serves while the agent is away");
        bed.start_agent();
    });
    held.assert_kept("the held connection survived the restart");
    let ids_after = bed.set_ids();
    assert_eq!(
        ids_before, ids_after,
        "service ids are stable across restarts"
    );
    assert!(
        bed.log().contains("writes=0"),
        "the restarted agent adopts the maps and writes nothing:\n{}",
        bed.log()
    );
}

#[test]
fn session_affinity_sticks_then_expires() {
    let Some(bed) = web_bed(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n",
    ) else {
        return;
    };
    let names = bed.names(vip(), 15);
    assert_eq!(
        distinct(&names).len(),
        1,
        "15 connections, one backend: {names:?}"
    );
    // After idling past the timeout, the next connection is balanced anew: within ten rounds a
    // different backend shows up (each round picks one of three by Maglev).
    let first = names[0].clone();
    let mut seen = BTreeSet::from([first.clone()]);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1300));
        seen.insert(bed.names(vip(), 1)[0].clone());
        if seen.len() > 1 {
            break;
        }
    }
    assert!(seen.len() > 1, "affinity never expired: {seen:?}");
}

#[test]
fn an_invalid_service_is_reported_by_name_while_the_rest_keeps_working() {
    let Some(bed) = web_bed("") else { return };
    bed.write(
        "bad.yaml",
        &service_yaml("broken", VIP, 81, "")
            .replace("clusterIP: 172.30.0.41", "clusterIP: 300.1.2.3"),
    );
    bed.write(
        "garbage.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [this is not\n",
    );
    let reported = bed.wait_until(Duration::from_secs(5), || {
        let log = bed.log();
        log.contains("Service default/broken")
            && log.contains("300.1.2.3")
            && log.contains("garbage.yaml")
    });
    assert!(reported, "agent log:\n{}", bed.log());
    assert_eq!(
        distinct(&bed.names(vip(), 20)).len(),
        3,
        "the valid service still works"
    );
    let (status, metrics) = bed
        .http_get("127.0.0.1:10249", "/metrics")
        .expect("metrics");
    assert_eq!(status, 200);
    let invalid: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("lb_invalid_objects_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(invalid >= 2.0, "{metrics}");
    assert!(
        metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_datapath_packets_total{reason=\"new_flow\"}"),
        "{metrics}"
    );
    let (status, body) = bed
        .http_get("127.0.0.1:10256", "/healthz")
        .expect("healthz");
    assert_eq!(status, 200);
    assert!(body.contains("lastUpdated"), "{body}");
}

/// The documented migration installs the agent beside kube-proxy, which holds 0.0.0.0:10256 and
/// 127.0.0.1:10249. As kube-proxy does with its own servers, the agent does not exit over a
/// taken port: it programs the datapath, answers the kubelet's probes on its own port, says
/// which ports are taken and by whom (`lb_listen_blocked`), and takes each once it is free.
#[test]
fn the_agent_works_beside_kube_proxys_ports_and_takes_them_once_free() {
    let Some(mut bed) = AgentBed::new(3) else {
        return;
    };
    bed.write_web(VIP, "");
    let health_holder = bed.hold_port("0.0.0.0:10256");
    let metrics_holder = bed.hold_port("127.0.0.1:10249");
    bed.start_agent();
    assert_eq!(
        distinct(&bed.names(vip(), 20)).len(),
        3,
        "the datapath is programmed"
    );
    let holder = format!("(pid {})", std::process::id());
    let log = bed.log();
    for addr in ["0.0.0.0:10256", "127.0.0.1:10249"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("cannot listen on {addr}")) && l.contains(&holder)),
            "{addr} and its holder {holder} named:\n{log}"
        );
    }

    // Each port, once free, is served within the 5 s retry; the metric follows.
    let served = |addr: &str, path: &str| {
        bed.wait_until(Duration::from_secs(8), || {
            bed.http_get(addr, path)
                .is_some_and(|(status, _)| status == 200)
        })
    };
    let blocked = |server: &str| {
        let (_, body) = bed.http_get("127.0.0.1:10249", "/metrics").unwrap();
        let line = format!("lb_listen_blocked{{server=\"{server}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line}in:\n{body}"))
            .to_owned()
    };
    drop(metrics_holder);
    assert!(served("127.0.0.1:10249", "/metrics"), "log:\n{}", bed.log());
    assert_eq!(
        (blocked("healthz"), blocked("metrics")),
        ("1".into(), "0".into())
    );
    drop(health_holder);
    assert!(served("127.0.0.1:10256", "/healthz"), "log:\n{}", bed.log());
    assert_eq!(blocked("healthz"), "0");
    assert_eq!(distinct(&bed.names(vip(), 20)).len(), 3);
}

#[test]
fn a_deleted_service_stops_answering_and_others_keep_theirs() {
    let Some(bed) = web_bed("") else { return };
    let other = Ipv4Addr::new(172, 30, 0, 42);
    bed.write("api.yaml", &service_yaml("api", other, 80, ""));
    bed.write("api-slice.yaml", &slice_yaml("api", &[backend_ip(2)]));
    assert!(bed.wait_until(Duration::from_secs(5), || {
        bed.client()
            .enter(move || server::http_get(SocketAddrV4::new(other, 80), TIMEOUT).is_ok())
            .unwrap()
    }));
    bed.remove("web.yaml");
    // Once deleted its ClusterIP is no frontend at all: connections fail (nothing routes there).
    let gone = bed.wait_until(Duration::from_secs(5), || {
        bed.client()
            .enter(|| server::http_get(vip(), Duration::from_millis(300)).is_err())
            .unwrap()
    });
    assert!(gone, "agent log:\n{}", bed.log());
    assert_eq!(
        bed.names(SocketAddrV4::new(other, 80), 5),
        vec!["backend-2"; 5]
    );
}

#[test]
fn a_pod_interface_that_appears_later_is_attached() {
    let Some(mut bed) = web_bed("") else { return };
    bed.node
        .add_pod("late", Ipv4Addr::new(10, 0, 1, 60))
        .expect("late pod");
    let iface = bed.node.pod("late").host_iface.clone();
    let answered = bed.wait_until(Duration::from_secs(5), || {
        bed.names_from("late", vip(), 6).is_ok()
    });
    assert!(
        answered,
        "the late pod cannot reach the ClusterIP; agent log:\n{}",
        bed.log()
    );
    assert_eq!(
        distinct(&bed.names_from("late", vip(), 30).unwrap()).len(),
        3
    );
    assert!(
        bed.log().contains(&format!("iface={iface}")),
        "the attachment is logged:\n{}",
        bed.log()
    );
}

#[test]
fn the_periodic_resync_repairs_what_someone_else_changed_in_the_maps() {
    let Some(mut bed) = AgentBed::new(3) else {
        return;
    };
    bed.extra_args = vec!["--sync-period".into(), "1s".into()];
    bed.write_web(VIP, "");
    bed.start_agent();
    let mut maps = bed.maps();
    let keys: Vec<lb_common::maps::FrontendKey> =
        maps.services.keys().map(|k| k.unwrap()).collect();
    assert!(!keys.is_empty());
    for key in &keys {
        maps.services.remove(key).unwrap();
    }
    assert!(
        bed.names_from("client", vip(), 1).is_err(),
        "without its frontend the ClusterIP does not answer"
    );
    let repaired = bed.wait_until(Duration::from_secs(5), || {
        bed.names_from("client", vip(), 3).is_ok()
    });
    assert!(repaired, "not repaired; agent log:\n{}", bed.log());
    assert_eq!(distinct(&bed.names(vip(), 30)).len(), 3);
}

#[test]
fn a_rare_datapath_drop_is_logged_by_the_agent() {
    let Some(mut bed) = AgentBed::new(1) else {
        return;
    };
    bed.write_web(VIP, "");
    bed.start_agent();
    // The backend slot emptied behind the agent's back: until its next sync (a minute away) new
    // flows to the service are dropped as inconsistent, and the datapath says so.
    let mut maps = bed.maps();
    let (id, _) = maps.active_backends().unwrap()[0];
    maps.backends
        .set(id, lb_common::maps::Backend::default(), 0)
        .unwrap();
    assert!(bed.names_from("client", vip(), 1).is_err());
    let logged = bed.wait_until(Duration::from_secs(5), || {
        bed.log()
            .contains(" WARN lb_ebpf::events: drop_inconsistent_service: new flow 10.0.1.2:")
    });
    assert!(logged, "agent log:\n{}", bed.log());
}

#[test]
fn cleanup_removes_every_pin_and_the_balancing_with_them() {
    let Some(mut bed) = web_bed("") else { return };
    assert_eq!(distinct(&bed.names(vip(), 30)).len(), 3);
    bed.stop_agent();
    assert!(!bed.pins().is_empty(), "the stopped agent leaves its pins");
    assert_eq!(
        distinct(&bed.names(vip(), 30)).len(),
        3,
        "the datapath serves while the agent is stopped"
    );

    for _ in 0..2 {
        // Twice: cleaning a clean directory succeeds too.
        let status = bed
            .node
            .ns
            .command(common::agent::AGENT)
            .args(["cleanup", "--bpffs-dir", bed.bpffs.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(bed.pins(), Vec::<std::path::PathBuf>::new());
    }
    // Nothing translates the ClusterIP any more: the connection goes nowhere. (Unpinning a
    // link detaches it from a kernel work item: shortly after, not at once.)
    assert!(bed.wait_until(Duration::from_secs(2), || {
        bed.names_from("client", vip(), 1).is_err()
    }));
    // Pod-to-pod traffic is untouched.
    let direct = SocketAddrV4::new(backend_ip(1), 8080);
    assert_eq!(
        bed.names_from("client", direct, 3).unwrap(),
        ["backend-1"; 3]
    );
}

/// `web` with a TCP and a UDP port (both served by the hostnames pods on 8080); `not_ready`
/// lists endpoints that are not ready (still serving nothing new).
fn dual_protocol_yaml(not_ready: Option<u8>) -> (String, String) {
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}\n  - {{name: echo, port: 80, protocol: UDP, targetPort: 8080}}\n"
    );
    let endpoints: String = (0..3)
        .map(|i| {
            format!(
                "- addresses: [{}]\n  conditions: {{ready: {}}}\n  nodeName: {}\n",
                backend_ip(i),
                Some(i) != not_ready,
                common::agent::NODE_NAME
            )
        })
        .collect();
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: echo, port: 8080, protocol: UDP}}\nendpoints:\n{endpoints}"
    );
    (service, slice)
}

#[test]
fn an_endpoint_turning_not_ready_loses_its_udp_flows_but_keeps_its_tcp_connections() {
    let Some(mut bed) = AgentBed::new(3) else {
        return;
    };
    let (service, slice) = dual_protocol_yaml(None);
    bed.write("web.yaml", &service);
    bed.write("web-slice.yaml", &slice);
    bed.start_agent();

    // A UDP "flow" (a fixed client port) and a held TCP connection, both on the same backend.
    const UDP_PORT: u16 = 40_000;
    let udp_answer = || {
        bed.client()
            .enter(|| server::udp_request(vip(), UDP_PORT, TIMEOUT))
            .unwrap()
            .map(|a| name(&a))
    };
    let udp_on = udp_answer().expect("UDP answer");
    let mut held = None;
    for _ in 0..50 {
        let conn = bed.hold(vip());
        if conn.backend == udp_on {
            held = Some(conn);
            break;
        }
    }
    let mut held = held.expect("a TCP connection on the UDP flow's backend");
    assert_eq!(udp_answer().unwrap(), udp_on, "the UDP flow sticks");

    // That backend stops being ready.
    let index: u8 = udp_on.trim_start_matches("backend-").parse().unwrap();
    let (_, slice) = dual_protocol_yaml(Some(index));
    bed.write("web-slice.yaml", &slice);
    let moved = bed.wait_until(Duration::from_secs(5), || {
        udp_answer().is_ok_and(|n| n != udp_on)
    });
    assert!(
        moved,
        "the UDP flow still reaches the not-ready backend; agent log:\n{}",
        bed.log()
    );
    held.assert_kept("the TCP connection to the not-ready backend continues");
    assert!(
        !bed.names(vip(), 30).contains(&udp_on),
        "no new TCP connection goes there"
    );
}

/// Issue 13 item 5, as kube-proxy's ProxyHealthServer: while the Node is being deleted or
/// tainted ToBeDeletedByClusterAutoscaler, `/healthz` answers 503 with `"nodeEligible": false`
/// so that cloud load balancers drain the node first; `/livez` (the liveness probe) stays 200
/// and the datapath keeps serving. Both come back when the Node does.
#[test]
fn a_node_going_away_fails_healthz_but_stays_live_and_serving() {
    let Some(mut bed) = AgentBed::new(2) else {
        return;
    };
    bed.write_web(VIP, "");
    bed.start_agent();
    let get = |path: &str| bed.http_get("127.0.0.1:10256", path).expect(path);
    let (status, body) = get("/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""nodeEligible": true"#), "{body}");
    let node = common::agent::node_yaml();
    for (what, marked) in [
        (
            "tainted ToBeDeletedByClusterAutoscaler",
            node.replace(
                "\nstatus:",
                "\nspec:\n  taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}]\nstatus:",
            ),
        ),
        (
            "being deleted",
            node.replacen(
                "metadata: {name: ",
                "metadata: {deletionTimestamp: \"2026-01-01T00:00:00Z\", name: ",
                1,
            ),
        ),
    ] {
        bed.write("node.yaml", &marked);
        assert!(
            bed.wait_until(Duration::from_secs(5), || get("/healthz").0 == 503),
            "{what}: /healthz stays 200; log:\n{}",
            bed.log()
        );
        let (_, body) = get("/healthz");
        assert!(body.contains(r#""nodeEligible": false"#), "{what}: {body}");
        let (status, body) = get("/livez");
        assert_eq!(status, 200, "{what}: /livez {body}");
        assert!(!body.contains("nodeEligible"), "{body}");
        assert_eq!(
            distinct(&bed.names(vip(), 10)).len(),
            2,
            "{what}: the datapath keeps serving"
        );
        bed.write("node.yaml", &node);
        assert!(
            bed.wait_until(Duration::from_secs(5), || get("/healthz").0 == 200),
            "{what}: /healthz does not recover"
        );
    }
}
