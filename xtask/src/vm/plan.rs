//! What runs in the guest, in order, and how it reports: `/init`, a busybox shell script that
//! mounts the usual filesystems, loads the modules, runs each step of the plan under a timeout
//! and powers off; and the reader of its console lines (`lb-vm: ok <step>`,
//! `lb-vm: FAILED <step>`, `lb-vm: RESULT PASS` or `FAIL`).

use std::path::Path;

use super::{binaries::Built, initramfs::BUSYBOX_DIR, packages::Kernel};

/// One step of the plan, at most (inside the guest).
const STEP_TIMEOUT_SECS: u32 = 240;
/// Lines of the plan start with this.
const MARK: &str = "lb-vm:";

#[derive(Debug)]
pub(super) struct Step {
    name: &'static str,
    pub(super) target: &'static str,
    args: &'static [&'static str],
    /// Environment of the test binary (`NAME=value`), on top of the guest's.
    env: &'static [&'static str],
}

/// What runs inside the VM, in order.
pub(super) const PLAN: [Step; 28] = [
    Step {
        name: "datapath",
        target: "datapath",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_flows",
        target: "datapath_flows",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_reject",
        target: "datapath_reject",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_packets",
        target: "datapath_packets",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_external",
        target: "datapath_external",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_client_addresses",
        target: "datapath_client_addresses",
        args: &[],
        env: &[],
    },
    // A twenty-fifth of the host's frames: emulated, the full run would take minutes.
    Step {
        name: "datapath_fuzz (20000 frames per test)",
        target: "datapath_fuzz",
        args: &[],
        env: &["LB_FUZZ_FRAMES=20000"],
    },
    Step {
        name: "datapath_external_nat",
        target: "datapath_external_nat",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_dsr",
        target: "datapath_dsr",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_events",
        target: "datapath_events",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_direct",
        target: "datapath_direct",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_sctp",
        target: "datapath_sctp",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_affinity",
        target: "datapath_affinity",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_ipv6",
        target: "datapath_ipv6",
        args: &[],
        env: &[],
    },
    Step {
        name: "socket_lb",
        target: "socket_lb",
        args: &[],
        env: &[],
    },
    Step {
        name: "socket_lb_rules",
        target: "socket_lb_rules",
        args: &[],
        env: &[],
    },
    Step {
        name: "datapath_carry",
        target: "datapath_carry",
        args: &[],
        env: &[],
    },
    Step {
        name: "lbctl trace",
        target: "trace",
        args: &[],
        env: &[],
    },
    Step {
        name: "lbctl trace, source NAT",
        target: "snat",
        args: &[],
        env: &[],
    },
    Step {
        name: "lbctl trace, hairpin",
        target: "hairpin",
        args: &[],
        env: &[],
    },
    Step {
        name: "classic_tc",
        target: "classic_tc",
        args: &["--nocapture"],
        env: &[],
    },
    Step {
        name: "agent restart + cleanup",
        target: "e2e_agent",
        args: &["restarting_the_agent", "cleanup_removes"],
        env: &[],
    },
    Step {
        name: "e2e ClusterIP",
        target: "e2e_client_addresses",
        args: &["cluster_ips_from_pods_on_both_nodes"],
        env: &[],
    },
    Step {
        name: "e2e IPv6 ClusterIP",
        target: "e2e_ipv6",
        args: &["an_ipv6_cluster_ip_serves_pods"],
        env: &[],
    },
    Step {
        name: "e2e NodePort",
        target: "e2e_external",
        args: &["node_ports_from_outside"],
        env: &[],
    },
    Step {
        name: "e2e NodePort by direct server return",
        target: "e2e_external",
        args: &["direct_server_return_keeps"],
        env: &[],
    },
    // Socket-level balancing with the real agents on 6.1, a client in the node's cgroup: the
    // agent attaches the hooks, a connected UDP socket goes to a backend (connect4, recvmsg4,
    // getpeername4), and when that backend leaves the agent closes the socket through sock_diag
    // (bpf_sock_destroy is 6.5+). One bed: under emulation its two agents load their programs
    // in some 20 s, and two beds at once (four agents on two CPUs) miss the bed's 30 s.
    Step {
        name: "e2e socket-level balancing, connected UDP",
        target: "e2e_socket_lb",
        args: &["a_connected_udp_socket"],
        env: &[],
    },
    Step {
        name: "netperf",
        target: "netperf",
        args: &["--nocapture"],
        env: &[],
    },
];

/// The VM's /init. /tmp and /run stay directories of the root, which is in memory and writable
/// already: a tmpfs mounted over them would hide the project's files when the checkout lives
/// there (as a CI clone in /tmp does).
pub(super) fn init_script(kernel: &Kernel, built: &Built, insmods: &[String]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        r#"#!{BUSYBOX_DIR}/busybox sh
# Generated by `cargo xtask vm-test`.
{BUSYBOX_DIR}/busybox --install -s {BUSYBOX_DIR}/bin
export PATH=/usr/sbin:/usr/bin:{BUSYBOX_DIR}/bin
export HOME=/root RUST_BACKTRACE=1 RUST_LOG=info
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ln -s /proc/self/fd /dev/fd
ip link set lo up
echo "{MARK} booted $(uname -r) ($(cut -d' ' -f1 /proc/uptime)s after start), $(nproc) CPUs, $(free -m | awk '/Mem:/ {{print $2}}') MiB"
for m in {modules}; do
    insmod "$m" || echo "{MARK} cannot load $m"
done
fails=0
step() {{
    name="$1"; shift
    echo "{MARK} === $name"
    t0=$(cut -d. -f1 /proc/uptime)
    if timeout {STEP_TIMEOUT_SECS} "$@"; then
        echo "{MARK} ok $name ($(( $(cut -d. -f1 /proc/uptime) - t0 ))s)"
    else
        echo "{MARK} FAILED $name ($(( $(cut -d. -f1 /proc/uptime) - t0 ))s)"
        fails=$((fails + 1))
    fi
}}
"#,
        modules = insmods.join(" "),
    ));
    for step in &PLAN {
        s.push_str(&step_line(step, &built.tests[step.target]));
        s.push('\n');
    }
    s.push_str(&format!(
        r#"if [ "$fails" = 0 ]; then
    echo "{MARK} RESULT PASS ({release})"
else
    echo "{MARK} RESULT FAIL ($fails steps failed)"
fi
sync
poweroff -f
"#,
        release = kernel.release,
    ));
    s
}

/// The `/init` line that runs `step` with its test binary `exe` (through busybox's `env` when
/// the step sets variables).
fn step_line(step: &Step, exe: &Path) -> String {
    let mut line = format!("step '{}'", step.name);
    if !step.env.is_empty() {
        line.push_str(" env");
        for var in step.env {
            line.push_str(&format!(" '{var}'"));
        }
    }
    line.push_str(&format!(" {}", exe.display()));
    for arg in step.args {
        line.push_str(&format!(" '{arg}'"));
    }
    line
}

/// What the console said about the plan.
#[derive(Default)]
pub(super) struct Outcome {
    /// `Some(passed)` once the plan printed its result.
    pub(super) result: Option<bool>,
    /// The steps' outcomes and the measurements, for the summary.
    pub(super) summary: Vec<String>,
}

impl Outcome {
    /// Picks the plan's own lines out of the console.
    pub(super) fn note(&mut self, line: &str) {
        // The netperf results, and what the agent said about the kernel (classic_tc prints it).
        for what in ["netperf TCP_", "has no tcx", "has no batch map"] {
            if line.contains(what) {
                self.summary.push(line.trim().to_owned());
                return;
            }
        }
        let Some(at) = line.find(MARK) else { return };
        let text = line[at + MARK.len()..].trim();
        if let Some(result) = text.strip_prefix("RESULT ") {
            self.result = Some(result.starts_with("PASS"));
            self.summary.push(text.to_owned());
        } else if text.starts_with("ok ")
            || text.starts_with("FAILED ")
            || text.starts_with("booted ")
        {
            self.summary.push(text.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_line_sets_the_steps_variables_before_its_binary_and_arguments() {
        let fuzz = PLAN.iter().find(|s| s.target == "datapath_fuzz").unwrap();
        assert_eq!(
            step_line(fuzz, Path::new("/t/datapath_fuzz-1")),
            "step 'datapath_fuzz (20000 frames per test)' env 'LB_FUZZ_FRAMES=20000' \
             /t/datapath_fuzz-1"
        );
        let tc = PLAN.iter().find(|s| s.target == "classic_tc").unwrap();
        assert_eq!(
            step_line(tc, Path::new("/t/classic_tc-2")),
            "step 'classic_tc' /t/classic_tc-2 '--nocapture'"
        );
    }

    #[test]
    fn outcome_keeps_the_plans_lines_and_its_result() {
        let mut outcome = Outcome::default();
        for line in [
            "[    0.9] Run /init as init process",
            "lb-vm: booted 6.1.0-56-cloud-amd64 (2.1s after start), 2 CPUs, 1987 MiB",
            "lb-vm: === datapath",
            "lb-vm: ok datapath (41s)",
            "lb-vm: FAILED netperf (12s)",
            "  netperf TCP_RR via ClusterIP: 1234 transactions/s  ",
        ] {
            outcome.note(line);
        }
        assert_eq!(outcome.result, None);
        assert_eq!(
            outcome.summary,
            [
                "booted 6.1.0-56-cloud-amd64 (2.1s after start), 2 CPUs, 1987 MiB",
                "ok datapath (41s)",
                "FAILED netperf (12s)",
                "netperf TCP_RR via ClusterIP: 1234 transactions/s",
            ]
        );
        outcome.note("\u{1b}[0mlb-vm: RESULT FAIL (1 steps failed)");
        assert_eq!(outcome.result, Some(false));
        outcome.note("lb-vm: RESULT PASS (6.1.0-56-cloud-amd64)");
        assert_eq!(outcome.result, Some(true));
    }
}
