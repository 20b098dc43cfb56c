//! netperf TCP_RR and TCP_CRR from a client pod to a backend pod, straight to its address and
//! through a ClusterIP balanced by the real agent: transactions per second both ways and their
//! ratio (through / direct), printed. It checks that netperf's traffic flows both ways, not how
//! fast (speed is `cargo xtask bench`'s business); `cargo xtask vm-test` runs it on an older
//! kernel and reports the ratio. Needs root and netperf.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::{Child, Stdio},
    time::Duration,
};

use common::agent::{AgentBed, NODE_NAME, backend_ip};

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 50);
/// netperf's control connection.
const CONTROL: u16 = 12865;
/// The data connections of the runs straight to the pod (`-- -P ,PORT`).
const DATA_DIRECT: u16 = 12866;
/// The data connections of the runs through the ClusterIP (a port of the Service). Not the same
/// as [`DATA_DIRECT`]: netserver closes first, so its TIME_WAITs of the direct run would meet
/// the balanced run's connections (same addresses and ports, but TCP timestamps from another
/// offset, since the client's destination differs) and their SYNs would be answered as old
/// duplicates, stalling TCP_CRR on SYN retransmissions.
const DATA_LB: u16 = 12867;
const SECONDS: &str = "1";
const ROUNDS: usize = 2;

/// The ClusterIP with netperf's two ports, both to the netserver pod.
fn manifests(backend: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: netperf, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: control, port: {CONTROL}, protocol: TCP, targetPort: {CONTROL}}}\n  - {{name: data, port: {DATA_LB}, protocol: TCP, targetPort: {DATA_LB}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: netperf-1, namespace: default, labels: {{kubernetes.io/service-name: netperf}}}}\naddressType: IPv4\nports:\n- {{name: control, port: {CONTROL}, protocol: TCP}}\n- {{name: data, port: {DATA_LB}, protocol: TCP}}\nendpoints:\n- addresses: [{backend}]\n  conditions: {{ready: true}}\n  nodeName: {NODE_NAME}\n"
    )
}

/// Kills netserver when the test ends.
struct Netserver(Child);

impl Drop for Netserver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One netperf run from the client pod, data connections to `host`:`data`; its transactions
/// per second.
fn netperf(bed: &AgentBed, test: &str, host: Ipv4Addr, data: u16) -> f64 {
    let out = bed
        .client()
        .command("netperf")
        .args(["-H", &host.to_string(), "-p", &CONTROL.to_string()])
        .args(["-t", test, "-l", SECONDS, "-P", "0", "-v", "0"])
        .args(["--", "-P", &format!(",{data}")])
        .stdin(Stdio::null())
        .output()
        .expect("netperf (is it installed? `cargo xtask setup`)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "netperf {test} to {host}: {text}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        bed.log()
    );
    text.split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("netperf {test} to {host} printed {text:?}"))
}

#[test]
fn netperf_request_response_through_a_cluster_ip_versus_direct() {
    let Some(mut bed) = AgentBed::new(0) else {
        return;
    };
    let backend = backend_ip(0);
    let pod = bed
        .node
        .add_pod("netserver", backend)
        .expect("netserver pod");
    let _netserver = Netserver(
        bed.node.pods[pod]
            .ns
            .command("netserver")
            .args(["-D", "-4", "-p", &CONTROL.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("netserver (is netperf installed? `cargo xtask setup`)"),
    );
    bed.write("netperf.yaml", &manifests(backend));
    bed.start_agent();
    let control = SocketAddrV4::new(backend, CONTROL);
    assert!(
        bed.wait_until(Duration::from_secs(10), || {
            bed.client()
                .enter(move || TcpStream::connect_timeout(&control.into(), Duration::from_secs(1)))
                .is_ok_and(|c| c.is_ok())
        }),
        "netserver does not answer"
    );

    for test in ["TCP_RR", "TCP_CRR"] {
        // Interleaved rounds, which of the two goes first alternating, and the best of each:
        // one slow run (another process's burst, an emulator's hiccup, a cold first run) does
        // not make the ratio.
        let (mut direct, mut balanced) = (0.0_f64, 0.0_f64);
        for round in 0..ROUNDS {
            if round % 2 == 0 {
                direct = direct.max(netperf(&bed, test, backend, DATA_DIRECT));
                balanced = balanced.max(netperf(&bed, test, VIP, DATA_LB));
            } else {
                balanced = balanced.max(netperf(&bed, test, VIP, DATA_LB));
                direct = direct.max(netperf(&bed, test, backend, DATA_DIRECT));
            }
        }
        println!(
            "netperf {test}: direct {direct:.0}/s, through the ClusterIP {balanced:.0}/s, ratio {:.2} (best of {ROUNDS} runs of {SECONDS} s each)",
            balanced / direct
        );
        assert!(direct > 0.0 && balanced > 0.0);
    }
}
