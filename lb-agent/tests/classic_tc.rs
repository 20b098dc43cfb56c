//! The agent on classic tc filters (a clsact qdisc and cls_bpf), what kernels before 6.6 get
//! instead of tcx; forced here with `LB_TC_API=netlink` on kernels that have tcx (`cargo xtask
//! vm-test` runs it on 6.1, where it is the default). The filters balance; a restarted agent
//! replaces them in place (one per hook, never two) without refusing a connection; `lb-agent
//! cleanup` deletes them, from outside the node's namespace too. Needs root.

mod common;

use std::{
    collections::BTreeSet,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::agent::{AGENT, AgentBed, backend_ip};
use lb_datapath::features::TC_API_VAR;

const VIP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 42);

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, 80)
}

/// Starts the agent on classic tc and waits until it is ready.
fn start(bed: &AgentBed) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(bed.dir.join("agent.log"))
        .unwrap();
    let child = bed
        .agent_command()
        .env(TC_API_VAR, "netlink")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting lb-agent");
    // As long as the bed's own wait: under the VM test's emulation, loading the datapath alone
    // may take 20 s when the machine is busy.
    let ready = bed.wait_until(Duration::from_secs(60), || {
        bed.http_get("127.0.0.1:10256", "/readyz")
            .is_some_and(|(s, _)| s == 200)
    });
    assert!(ready, "the agent never became ready:\n{}", bed.log());
    child
}

/// Stops the agent with SIGTERM and waits for it.
fn stop(bed: &AgentBed, mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("the agent ignored SIGTERM:\n{}", bed.log());
}

/// The classic tc filters on `iface` (`ingress` or `egress`) in the node: (program name, id).
fn filters(bed: &AgentBed, iface: &str, direction: &str) -> Vec<(String, u32)> {
    let out = bed
        .node
        .ns
        .command("tc")
        .args(["filter", "show", "dev", iface, direction])
        .output()
        .expect("tc");
    assert!(
        out.status.success(),
        "tc filter show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "handle")?;
            let name = words.get(at + 2)?.to_string();
            let id_at = words.iter().position(|w| *w == "id")?;
            Some((name, words.get(id_at + 1)?.parse().ok()?))
        })
        .collect()
}

/// Every pod interface's filters: exactly `lb_from_pod` on ingress and `lb_to_pod` on egress,
/// one each. Returns their program ids.
fn one_filter_per_hook(bed: &AgentBed) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for pod in &bed.node.pods {
        for (direction, program) in [("ingress", "lb_from_pod"), ("egress", "lb_to_pod")] {
            let found = filters(bed, &pod.host_iface, direction);
            assert_eq!(
                found.len(),
                1,
                "{} {direction}: {found:?}\n{}",
                pod.host_iface,
                bed.log()
            );
            assert_eq!(found[0].0, program, "{} {direction}", pod.host_iface);
            ids.insert(found[0].1);
        }
    }
    ids
}

#[test]
fn classic_tc_filters_balance_are_replaced_in_place_on_restart_and_deleted_by_cleanup() {
    let Some(mut bed) = AgentBed::new(2) else {
        return;
    };
    bed.write_web(VIP, "");
    let agent = start(&bed);
    assert!(
        bed.log().contains("classic tc filters"),
        "the agent says it uses classic tc:\n{}",
        bed.log()
    );
    // What it said about the kernel (shown with --nocapture: vm-test reports it).
    for line in bed
        .log()
        .lines()
        .filter(|l| l.contains("tcx") || l.contains("kernel features"))
    {
        println!("agent: {line}");
    }
    let names: BTreeSet<String> = bed.names(vip(), 20).into_iter().collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let first = one_filter_per_hook(&bed);
    // Recorded for cleanup: one symlink per filter, naming the hook.
    let records: Vec<String> = bed
        .pins()
        .iter()
        .filter_map(|p| fs::read_link(p).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t.starts_with("tc:"))
        .collect();
    assert_eq!(records.len(), 2 * bed.node.pods.len(), "{records:?}");

    // Restart under load: no new connection refused, the held one kept, the filters replaced
    // (new programs) rather than doubled.
    let mut held = bed.hold(vip());
    let agent = bed.assert_no_connection_refused(vip(), 5, |bed| {
        stop(bed, agent);
        assert_eq!(
            one_filter_per_hook(bed),
            first,
            "the filters stay while no agent runs"
        );
        std::thread::sleep(Duration::from_millis(300));
        start(bed)
    });
    held.assert_kept("the held connection survived");
    let second = one_filter_per_hook(&bed);
    assert!(
        first.is_disjoint(&second),
        "the restarted agent's programs replaced the old ones: {first:?} then {second:?}"
    );
    drop(held);
    stop(&bed, agent);

    // Cleanup from outside the node's namespace (as the test beds do): it finds the namespace
    // by its /run/netns name and deletes the filters there.
    let out = Command::new(AGENT)
        .args(["cleanup", "--bpffs-dir", bed.bpffs.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!(
            "deleted {} classic tc filters",
            2 * bed.node.pods.len()
        )),
        "{said}"
    );
    for pod in &bed.node.pods {
        for direction in ["ingress", "egress"] {
            assert_eq!(
                filters(&bed, &pod.host_iface, direction),
                [],
                "{}",
                pod.host_iface
            );
        }
    }
    assert_eq!(bed.pins(), Vec::<std::path::PathBuf>::new());
    assert!(
        bed.names_from("client", vip(), 1).is_err(),
        "nothing balances the ClusterIP any more"
    );
    let direct = SocketAddrV4::new(backend_ip(1), 8080);
    assert_eq!(
        bed.names_from("client", direct, 2).unwrap(),
        ["backend-1"; 2]
    );
}
