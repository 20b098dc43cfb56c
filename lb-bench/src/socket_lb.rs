//! Socket-level balancing end to end (issue 14): netperf to the ClusterIP from a pod on node-0
//! and from node-0 itself (a host-network process), served by the netserver pod on node-1, with
//! the cgroup socket hooks translating the connect(), against the per-packet path (pods) or
//! kube-proxy's iptables ruleset (the node, which the per-packet path does not serve), and
//! against the direct floor (the backend's address, no load balancer).
//!
//! The bed gets a cgroup v2 directory per node under the host's cgroup v2 root, each node's
//! agent attaches its hooks to its node's (`--socket-lb on --cgroup-root`), and a node's pods
//! run in a child of it: the hooks see only the bed's processes, never the host's. With the
//! hooks on, "off" is the same agents serving a client started outside those cgroups, so that
//! on and off are measured back to back on the very same maps and programs; for a process
//! outside, the kernel runs no socket program and the pod's packets take the per-packet path,
//! exactly as with `--socket-lb off`.
//!
//! Runs alternate as in [`crate::netperf`]: per round and size, the hooks' variants (test by
//! test, on then off), then the direct floor, then iptables, and every other round in the
//! reverse order; the ratios pair each variant's run with the direct floor's run of the same
//! round (see [`crate::stats`]).

pub mod report;

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result};
use lb_testbed::{Cgroup, Netns, SocketLb};
use serde::Serialize;

use crate::netperf::{
    self, Bed, CONTROL_PORT, Datapath, RunOf, SERVICE_IP, Sample, SetupTime, Skipped, Test,
};

/// The paths measured.
pub const POD: &str = "pod -> ClusterIP";
pub const NODE: &str = "node -> ClusterIP";

/// The tests measured (connection set-up, request/response on one connection, bulk).
pub const TESTS: [Test; 3] = [Test::TcpCrr, Test::TcpRr, Test::TcpStream];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Variant {
    /// The client starts in its node's cgroup (a pod's: a child of it), where the agent's
    /// hooks are attached.
    On,
    /// Pods only: the same agents, the client outside the hooked cgroups (per-packet NAT).
    Off,
    /// The node only: kube-proxy's iptables ruleset, no agent.
    Iptables,
    /// No load balancer: the client connects to the backend's address.
    Direct,
    /// The backend's address from the hooked cgroup while the agents run: what the packet
    /// programs cost traffic that is no Service's, so that the hooks' own cost shows apart.
    Agents,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Self::On => ON,
            Self::Off => OFF,
            Self::Iptables => IPTABLES,
            Self::Direct => DIRECT,
            Self::Agents => AGENTS,
        }
    }

    /// What is in place while it is measured.
    fn setup(self) -> Setup {
        match self {
            Self::On | Self::Off | Self::Agents => Setup::Hooks,
            Self::Iptables => Setup::Iptables,
            Self::Direct => Setup::Direct,
        }
    }

    /// Its range of TCP_CRR client ports (see [`netperf::crr_ports`]): the variants of one
    /// path all reach the backend from the same address, so each gets its own.
    fn port_index(self) -> usize {
        match self {
            Self::On => 0,
            Self::Off | Self::Iptables => 1,
            Self::Direct => 2,
            Self::Agents => 3,
        }
    }
}

/// Names in samples and the report.
pub const ON: &str = "socket LB on";
pub const OFF: &str = "per packet";
pub const IPTABLES: &str = "iptables";
pub const DIRECT: &str = "direct";
pub const AGENTS: &str = "direct, agents on";

/// Every (path, variant) of `plan`, in the order of a round.
fn cases(plan: &Plan<'_>) -> Vec<(&'static str, Variant)> {
    let mut cases = vec![(POD, Variant::On)];
    if plan.per_packet {
        cases.push((POD, Variant::Off));
    }
    cases.push((NODE, Variant::On));
    if plan.agents {
        cases.extend([(POD, Variant::Agents), (NODE, Variant::Agents)]);
    }
    cases.extend([(POD, Variant::Direct), (NODE, Variant::Direct)]);
    if plan.iptables {
        cases.push((NODE, Variant::Iptables));
    }
    cases
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Hooks,
    Direct,
    Iptables,
}

/// What to run.
pub struct Plan<'a> {
    pub sizes: &'a [u32],
    pub runs: usize,
    pub seconds: u32,
    /// Whether to measure the node through kube-proxy's iptables ruleset (loading it takes
    /// about 30 s per round at 10k Services).
    pub iptables: bool,
    /// Whether to measure pods through the per-packet path too (the netperf part measures it
    /// against direct as well, on its own bed).
    pub per_packet: bool,
    /// Whether to measure direct with the agents running too (telling the hooks' own cost
    /// from the packet programs').
    pub agents: bool,
    pub agent_bin: &'a std::path::Path,
}

/// The figures of a run, raw.
#[derive(Clone, Debug, Serialize)]
pub struct SocketLbResults {
    pub sizes: Vec<u32>,
    pub runs: usize,
    pub seconds: u32,
    pub samples: Vec<Sample>,
    pub skipped: Vec<Skipped>,
    pub setup_times: Vec<SetupTime>,
    /// Wall time of the whole part, bed included.
    pub took_s: f64,
}

/// Where a case's client runs and what it connects to.
fn client<'a>(
    bed: &'a Bed,
    path: &str,
    variant: Variant,
) -> (&'a Netns, Option<&'a Cgroup>, Ipv4Addr) {
    let cgroups = bed.cluster().cgroups(0).expect("the bed has cgroups");
    let (ns, cgroup) = if path == POD {
        (bed.cluster().pod("client").ns, &cgroups.pods)
    } else {
        (&bed.cluster().node(0).ns, &cgroups.node)
    };
    let cgroup = (variant != Variant::Off).then_some(cgroup);
    let host = if matches!(variant, Variant::Direct | Variant::Agents) {
        bed.backend()
    } else {
        SERVICE_IP
    };
    (ns, cgroup, host)
}

/// Variants of a path, each with a range of TCP_CRR client ports of its own.
const PORT_RANGES: usize = 4;

/// The most connections one TCP_CRR run makes (see [`netperf::Lengths`]).
pub fn max_crr_connections() -> u32 {
    match netperf::Lengths::default().length(POD, Test::TcpCrr, u32::MAX, PORT_RANGES) {
        netperf::Length::Transactions(n) => n,
        netperf::Length::Seconds(_) => 0,
    }
}

/// Puts `setup` in place; how long that took.
fn switch(
    bed: &mut Bed,
    setup: Setup,
    services: &[lb_bench::kubeproxy::BenchService],
    agent_bin: &std::path::Path,
) -> Result<f64> {
    let started = Instant::now();
    match setup {
        Setup::Hooks => {
            bed.clear()?;
            bed.start_agents(services, agent_bin, &[], Some(SocketLb::On))?;
        }
        Setup::Direct => {
            bed.switch(Datapath::Direct, services, agent_bin)?;
        }
        Setup::Iptables => {
            bed.switch(Datapath::Iptables, services, agent_bin)?;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Runs the plan; `progress` hears about every step.
pub fn run(plan: &Plan<'_>, progress: &mut dyn FnMut(&str)) -> Result<SocketLbResults> {
    let started = Instant::now();
    progress("socket-lb: building the two-node test bed and its cgroups");
    let mut bed = Bed::with_cgroups()?;
    bed.cluster()
        .cgroups(1)
        .context("the bed has cgroups")?
        .pods
        .add(bed.netserver_pid())
        .context("moving netserver into its node's pods' cgroup")?;
    // No TIME_WAIT on the backend: one client cycles through its ports thousands of times a
    // second, and a SYN that meets the TIME_WAIT of an earlier connection on the same four
    // addresses and ports waits a 1 s retransmission. Disjoint client ports keep the variants
    // apart, but kube-proxy's MASQUERADE (`--random-fully`) picks the node's source ports from
    // the whole range: its TCP_CRR met the others' TIME_WAITs every few connections (16,800
    // connections took 55 s). A backend serving many clients does not see this.
    bed.cluster()
        .pod("netserver")
        .ns
        .sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
    // kube-proxy's OUTPUT chain sees a node's connection only once it has a route: a real node
    // reaches the Service range by its default route; the bed's nodes have none. The hooks and
    // the direct floor connect to the backend and never use it.
    bed.cluster()
        .node(0)
        .ns
        .ip(&[
            "route",
            "add",
            "10.96.0.0/12",
            "dev",
            lb_testbed::cluster::UPLINK,
        ])
        .context("routing the Service range from node-0")?;
    let cases = cases(plan);
    let mut lengths = netperf::Lengths::default();
    let mut samples = Vec::new();
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut setup_times = Vec::new();
    for &size in plan.sizes {
        let services = netperf::services(size, bed.backend());
        bed.write_source(&services)?;
        let mut broken: Vec<Setup> = Vec::new();
        for run in 0..plan.runs {
            // Every other round backwards, so that no variant is always the first after the
            // agents start (or always right after another).
            let mut order = [Setup::Hooks, Setup::Direct, Setup::Iptables];
            if run % 2 == 1 {
                order.reverse();
            }
            for setup in order {
                let mut here: Vec<_> = cases.iter().filter(|c| c.1.setup() == setup).collect();
                if run % 2 == 1 {
                    here.reverse();
                }
                if here.is_empty() || broken.contains(&setup) {
                    continue;
                }
                progress(&format!(
                    "socket-lb: {size} services, run {}/{}, {setup:?}",
                    run + 1,
                    plan.runs
                ));
                match switch(&mut bed, setup, &services, plan.agent_bin) {
                    Ok(seconds) => setup_times.push(SetupTime {
                        datapath: format!("{setup:?}"),
                        services: size,
                        seconds,
                    }),
                    Err(e) => {
                        progress(&format!("socket-lb: {setup:?} at {size} services: {e:#}"));
                        for (_, variant) in &here {
                            skipped.push(Skipped {
                                datapath: variant.name().into(),
                                services: size,
                                reason: format!("{e:#}"),
                            });
                        }
                        broken.push(setup);
                        continue;
                    }
                }
                // Test by test, the variants of one set-up back to back.
                for test in TESTS {
                    for &&(path, variant) in &here {
                        lb_testbed::interrupt::check()?;
                        let (ns, cgroup, host) = client(&bed, path, variant);
                        let of = RunOf {
                            datapath: variant.name().into(),
                            path,
                            test,
                            services: size,
                            run,
                        };
                        let ports = netperf::crr_ports(variant.port_index(), PORT_RANGES);
                        let target = (host, CONTROL_PORT);
                        let length = lengths.length(path, test, plan.seconds, PORT_RANGES);
                        match netperf::sample(of, ns, cgroup, target, length, ports) {
                            Ok(s) => {
                                lengths.record(&s);
                                samples.push(s);
                            }
                            Err(e) => progress(&format!("socket-lb: {path}, {e:#}")),
                        }
                    }
                }
            }
        }
    }
    bed.clear()?;
    Ok(SocketLbResults {
        sizes: plan.sizes.to_vec(),
        runs: plan.runs,
        seconds: plan.seconds,
        samples,
        skipped,
        setup_times,
        took_s: started.elapsed().as_secs_f64(),
    })
}
