//! End to end with netperf on the two-node test bed: a client pod on node-0 and the external
//! client talk to a `netserver` pod on node-1 through a ClusterIP and a NodePort (via node-0),
//! with the load balancer's maps, or kube-proxy's iptables or nftables rulesets, filled with the
//! same number of services; and directly, without any load balancer (the floor).
//!
//! Runs alternate between datapaths (ours, iptables, nftables, direct, then again), so that a
//! drift of the machine over time hits every datapath alike.
//!
//! The measured service sits in the middle of kube-proxy's KUBE-SERVICES chain (kube-proxy writes
//! services in map order, effectively random: the middle is the expected position).

use std::{
    fs,
    net::Ipv4Addr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_testbed::{Cgroup, Netns};
use serde::Serialize;

mod bed;
mod lengths;

pub use bed::Bed;
use lengths::COUNTED_LIMIT;
pub use lengths::{Length, Lengths, crr_ports, nodeport_crr_ports};

use lb_bench::kubeproxy::{self, BenchPort, BenchService, Position};

/// netserver's control port, and the data port of every test (netperf's `-P ,PORT`): the
/// Service maps both, and the data port is also its NodePort and target port, because netperf
/// tells netserver which port to listen on and then connects to that same port.
pub const CONTROL_PORT: u16 = 12_865;
pub const DATA_PORT: u16 = 30_001;
/// The NodePort of the control connection.
pub const CONTROL_NODE_PORT: u16 = 31_865;
/// The measured Service's ClusterIP.
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Datapath {
    /// This project: with the agent's default XDP mode, or with `--xdp-mode` set to this one
    /// (measured at the smallest size only, to show why the default is what it is).
    Ours(Option<&'static str>),
    /// This project with `--forwarding-mode dsr`: direct server return through the NodePort
    /// (the only path it changes, so the only one measured).
    OursDsr,
    Iptables,
    Nftables,
    /// No load balancer: the client talks to the backend's address.
    Direct,
    /// No load balancer either, but the way a NodePort's flow goes: the client routes the
    /// backend's pod range through node-0, which forwards to node-1 (plain kernel routing);
    /// node-1 routes its replies to the client back through node-0 (source NAT's way) or,
    /// with `replies_direct`, straight to the client (direct server return's). What the hop
    /// through the entry node costs on this bed, without anything translated: the floor of a
    /// NodePort whose backend runs on another node. The NodePort path only, at the smallest
    /// size.
    Routed {
        replies_direct: bool,
    },
}

impl Datapath {
    pub fn name(self) -> String {
        match self {
            Self::Ours(None) => OURS.into(),
            Self::Ours(Some(mode)) => format!("ours (xdp {mode})"),
            Self::OursDsr => OURS_DSR.into(),
            Self::Iptables => "iptables".into(),
            Self::Nftables => "nftables".into(),
            Self::Direct => "direct".into(),
            Self::Routed {
                replies_direct: false,
            } => "routed via node-0".into(),
            Self::Routed {
                replies_direct: true,
            } => "routed via node-0, replies direct".into(),
        }
    }

    /// A variant measured at the smallest size only.
    fn is_variant(self) -> bool {
        matches!(self, Self::Ours(Some(_)) | Self::Routed { .. })
    }
}

/// The name of this project's default datapath in samples and reports.
pub const OURS: &str = "ours";
/// The name of this project's datapath with direct server return.
pub const OURS_DSR: &str = "ours (dsr)";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Path {
    /// A pod on node-0 to the ClusterIP (the backend runs on node-1).
    PodToClusterIp,
    /// The external client to node-0's NodePort (the backend runs on node-1).
    ExternalToNodePort,
    /// The external client to node-1's NodePort, where the backend runs: no source NAT for
    /// ours (the client's address is kept), kube-proxy's masquerade for its rulesets.
    ExternalToLocalNodePort,
}

impl Path {
    pub const ALL: [Self; 3] = [
        Self::PodToClusterIp,
        Self::ExternalToNodePort,
        Self::ExternalToLocalNodePort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::PodToClusterIp => "pod -> ClusterIP",
            Self::ExternalToNodePort => NODEPORT,
            Self::ExternalToLocalNodePort => LOCAL_NODEPORT,
        }
    }

    /// Whether `datapath` runs `test` on this path. The local NodePort is measured for what it
    /// shows (the cost of a connection and of a packet without the remote hop) by the default
    /// datapaths only: direct server return changes nothing there.
    fn measures(self, datapath: Datapath, test: Test) -> bool {
        if let Datapath::Routed { .. } = datapath {
            return self == Self::ExternalToNodePort && test != Test::UdpRr;
        }
        match self {
            Self::PodToClusterIp => datapath != Datapath::OursDsr,
            Self::ExternalToNodePort => true,
            Self::ExternalToLocalNodePort => {
                matches!(
                    datapath,
                    Datapath::Ours(None)
                        | Datapath::Iptables
                        | Datapath::Nftables
                        | Datapath::Direct
                ) && matches!(test, Test::TcpCrr | Test::TcpRr)
            }
        }
    }
}

/// The name of the NodePort path whose backend runs on another node.
pub const NODEPORT: &str = "external -> NodePort";
/// The name of the NodePort path whose backend runs on the node.
pub const LOCAL_NODEPORT: &str = "external -> NodePort, local backend";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Test {
    TcpRr,
    TcpCrr,
    UdpRr,
    TcpStream,
}

impl Test {
    pub const ALL: [Self; 4] = [Self::TcpRr, Self::TcpCrr, Self::UdpRr, Self::TcpStream];

    pub fn name(self) -> &'static str {
        match self {
            Self::TcpRr => "TCP_RR",
            Self::TcpCrr => "TCP_CRR",
            Self::UdpRr => "UDP_RR",
            Self::TcpStream => "TCP_STREAM",
        }
    }

    fn has_latency(self) -> bool {
        self != Self::TcpStream
    }
}

/// One netperf run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub datapath: String,
    pub path: &'static str,
    pub test: &'static str,
    pub services: u32,
    pub run: usize,
    /// Transactions per second, or 10^6 bits per second for TCP_STREAM.
    pub rate: f64,
    pub unit: String,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// CPU time of the whole machine (every core, every process, softirq included) per
    /// transaction (or per MB for TCP_STREAM), in µs.
    pub cpu_us_per_unit: f64,
    /// The softirq part of it (where most packet processing happens).
    pub softirq_us_per_unit: f64,
}

/// A datapath that could not be set up at some size (e.g. 100k services), and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub datapath: String,
    pub services: u32,
    pub reason: String,
}

/// What to run.
pub struct Plan<'a> {
    pub sizes: &'a [u32],
    pub runs: usize,
    pub seconds: u32,
    pub datapaths: &'a [Datapath],
    pub tests: &'a [Test],
    pub agent_bin: &'a std::path::Path,
}

/// The measured Service plus `n - 1` filler Services (one TCP port, one endpoint each).
pub fn services(n: u32, backend: Ipv4Addr) -> Vec<BenchService> {
    let measured = BenchService::new("bench", "netperf", SERVICE_IP)
        .port(BenchPort::tcp("control", CONTROL_PORT, CONTROL_PORT).node_port(CONTROL_NODE_PORT))
        .port(BenchPort::tcp("data", DATA_PORT, DATA_PORT).node_port(DATA_PORT))
        .port(BenchPort::udp("data-udp", DATA_PORT, DATA_PORT).node_port(DATA_PORT))
        .endpoint(backend);
    let fillers = kubeproxy::fillers(n.saturating_sub(1) as usize, 1);
    // The middle of kube-proxy's chain (see the module documentation).
    kubeproxy::arrange(measured, fillers, Position::Middle)
}

/// The machine's CPU time so far: (all non-idle, softirq), in µs.
fn cpu_time_us() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...; USER_HZ is 100.
    let tick_us = 10_000.0;
    let total: f64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    let softirq = fields.get(6).copied().unwrap_or(0.0);
    ((total - idle) * tick_us, softirq * tick_us)
}

/// One netperf run from `ns` to `host`; TCP_CRR cycles through the client ports `ports`.
/// netperf starts in `cgroup` when given (else in this process's).
fn netperf(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    host: Ipv4Addr,
    control: u16,
    test: Test,
    length: Length,
    ports: (u16, u16),
) -> Result<(f64, String, [Option<f64>; 3])> {
    let selectors = if test.has_latency() {
        "THROUGHPUT,THROUGHPUT_UNITS,P50_LATENCY,P90_LATENCY,P99_LATENCY"
    } else {
        "THROUGHPUT,THROUGHPUT_UNITS"
    };
    let mut cmd = ns.command("netperf");
    if let Some(cgroup) = cgroup {
        cgroup.start_in(&mut cmd)?;
    }
    cmd.args(["-H", &host.to_string(), "-p", &control.to_string()]);
    if let Some((local, remote)) = crate::cpus::netperf_pair() {
        cmd.args(["-T", &format!("{local},{remote}")]);
    }
    cmd.args(["-l", &length.arg(), "-t", test.name(), "-P", "0"])
        .args(["--", "-P", &format!(",{DATA_PORT}"), "-o", selectors])
        .args(if test == Test::TcpCrr {
            vec!["-p".to_owned(), format!("{},{}", ports.0, ports.1)]
        } else {
            Vec::new()
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running netperf")?;
    // A counted run has no end of its own if the path stalls; a timed one ends (nsenter execs
    // netperf, so the child is netperf).
    if let Length::Transactions(n) = length {
        let deadline = Instant::now() + COUNTED_LIMIT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "netperf {} of {n} transactions to {host}:{control} did not finish within \
                     {COUNTED_LIMIT:?} (stalled)",
                    test.name()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Its output is a few lines: it fits the pipes while it runs.
    let out = child.wait_with_output().context("running netperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(','))
        .unwrap_or_default();
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    let rate: f64 = match fields.first().and_then(|f| f.parse().ok()) {
        Some(rate) if out.status.success() => rate,
        _ => bail!(
            "netperf {} to {host}:{control} failed: {}{}",
            test.name(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    };
    let unit = fields.get(1).copied().unwrap_or_default().to_owned();
    let latency = |i: usize| fields.get(i).and_then(|f| f.parse().ok());
    Ok((rate, unit, [latency(2), latency(3), latency(4)]))
}

/// What one netperf run measures: the labels of its [`Sample`].
#[derive(Clone)]
pub struct RunOf {
    pub datapath: String,
    pub path: &'static str,
    pub test: Test,
    pub services: u32,
    pub run: usize,
}

/// One netperf run of `of.test` from `ns` (in `cgroup` when given) to `(host, control port)`,
/// with the machine's CPU time over it.
pub fn sample(
    of: RunOf,
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    (host, control): (Ipv4Addr, u16),
    length: Length,
    ports: (u16, u16),
) -> Result<Sample> {
    let (cpu0, soft0) = cpu_time_us();
    let (rate, unit, [p50, p90, p99]) = netperf(ns, cgroup, host, control, of.test, length, ports)?;
    let (cpu1, soft1) = cpu_time_us();
    // Per transaction, or per MB (10^6 bits/s * s / 8).
    let units = match length {
        Length::Transactions(n) => f64::from(n),
        Length::Seconds(s) if of.test == Test::TcpStream => rate * f64::from(s) / 8.0,
        Length::Seconds(s) => rate * f64::from(s),
    };
    Ok(Sample {
        datapath: of.datapath,
        path: of.path,
        test: of.test.name(),
        services: of.services,
        run: of.run,
        rate,
        unit,
        p50_us: p50,
        p90_us: p90,
        p99_us: p99,
        cpu_us_per_unit: (cpu1 - cpu0) / units.max(1.0),
        softirq_us_per_unit: (soft1 - soft0) / units.max(1.0),
    })
}

/// Runs the plan; `progress` hears about every step.
pub fn run(
    plan: &Plan<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<Sample>, Vec<Skipped>, Vec<SetupTime>)> {
    progress("netperf: building the two-node test bed");
    let mut bed = Bed::new()?;
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    let mut setup_times = Vec::new();
    let mut lengths = Lengths::default();
    for &size in plan.sizes {
        let ours = services(size, bed.backend());
        let kube_proxys = services(size, bed.kube_proxy_backend());
        bed.write_source(&ours)?;
        let mut broken: Vec<Datapath> = Vec::new();
        for run in 0..plan.runs {
            for (index, &datapath) in plan.datapaths.iter().enumerate() {
                if broken.contains(&datapath)
                    || (datapath.is_variant() && Some(&size) != plan.sizes.first())
                {
                    continue;
                }
                progress(&format!(
                    "netperf: {size} services, run {}/{}, {}",
                    run + 1,
                    plan.runs,
                    datapath.name()
                ));
                let services = match datapath {
                    Datapath::Iptables | Datapath::Nftables => &kube_proxys,
                    Datapath::Ours(_)
                    | Datapath::OursDsr
                    | Datapath::Direct
                    | Datapath::Routed { .. } => &ours,
                };
                match bed.switch(datapath, services, plan.agent_bin) {
                    Ok(took) => setup_times.push(SetupTime {
                        datapath: datapath.name(),
                        services: size,
                        seconds: took.as_secs_f64(),
                    }),
                    Err(e) => {
                        progress(&format!(
                            "netperf: {} at {size} services did not come up: {e:#}",
                            datapath.name()
                        ));
                        skipped.push(Skipped {
                            datapath: datapath.name(),
                            services: size,
                            reason: format!("{e:#}"),
                        });
                        broken.push(datapath);
                        continue;
                    }
                }
                for path in Path::ALL {
                    for &test in plan.tests {
                        if !path.measures(datapath, test) {
                            continue;
                        }
                        lb_testbed::interrupt::check()?;
                        let (ns, host, control) = bed.target(datapath, path);
                        let run_of = RunOf {
                            datapath: datapath.name(),
                            path: path.name(),
                            test,
                            services: size,
                            run,
                        };
                        let ports = match path {
                            Path::PodToClusterIp => crr_ports(index, plan.datapaths.len()),
                            Path::ExternalToNodePort | Path::ExternalToLocalNodePort => {
                                nodeport_crr_ports(index, plan.datapaths.len())
                            }
                        };
                        // kube-proxy's NodePorts stall on SYN retransmissions (SNAT ports
                        // drawn at random meet other ports' TIME_WAITs, see the report); ours
                        // gives each client port a home SNAT port.
                        let may_stall = path != Path::PodToClusterIp
                            && matches!(datapath, Datapath::Iptables | Datapath::Nftables);
                        let length = lengths.datapath_length(
                            path.name(),
                            &run_of.datapath,
                            test,
                            plan.seconds,
                            may_stall,
                        );
                        let target = (host, control);
                        let measured = sample(run_of.clone(), ns, None, target, length, ports)
                            .or_else(|e| match length {
                                // It stalled after all: the run again, timed.
                                Length::Transactions(_) => {
                                    progress(&format!("netperf: {e:#}; again, timed"));
                                    let timed = Length::Seconds(plan.seconds);
                                    sample(run_of, ns, None, target, timed, ports)
                                }
                                _ => Err(e),
                            });
                        match measured {
                            Ok(s) => {
                                lengths.record(&s);
                                samples.push(s);
                            }
                            Err(e) => progress(&format!("netperf: {e:#}")),
                        }
                    }
                }
            }
        }
    }
    bed.clear()?;
    Ok((samples, skipped, setup_times))
}

/// How long putting a datapath in place took (agents ready, rulesets loaded).
#[derive(Clone, Debug, Serialize)]
pub struct SetupTime {
    pub datapath: String,
    pub services: u32,
    pub seconds: f64,
}
