//! `cargo xtask bench`: measures the load balancer against baselines run in the same invocation
//! and writes the raw figures to `bench/results/`.

mod cpus;
mod datapath;
mod idle;
mod maglev;
mod netperf;
mod profile;
mod report;
mod socket_lb;
mod stats;

use std::{
    fs,
    path::PathBuf,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::Parser;
use lb_bench::{agent, controlplane};
use lb_testbed::interrupt;
use serde::Serialize;

#[derive(Parser)]
#[command(
    about = "Benchmarks of the eBPF Service load balancer against kube-proxy's datapaths (run \
             through `cargo xtask bench`)",
    long_about = "Benchmarks of the eBPF Service load balancer against kube-proxy's datapaths, \
                  measured in the same run on the same machine (run through `cargo xtask bench`).\n\n\
                  Parts: datapath (per-packet cost through BPF_PROG_TEST_RUN, and where it \
                  goes, from perf samples), agent (sync and change latency, RSS), netperf \
                  (end to end on a two-node test bed: ours, kube-proxy's iptables and \
                  nftables rulesets, direct, and routed through the entry node without \
                  translation), socket-lb (pod and \
                  node to a ClusterIP with the cgroup socket hooks, against the per-packet path, \
                  iptables and direct), controlplane \
                  (programming N services: agent vs iptables-restore vs nft -f), maglev (table \
                  build time and disruption).\n\nWrites bench/results/<date>.json, BENCHMARKS.md \
                  and bench/plots/*.svg."
)]
struct Cli {
    /// A shorter run (about 9 minutes on a 2-CPU machine): one netperf run of 2 s per case at 1,
    /// 1k and 10k services without the XDP-off variant, socket-lb with 3 rounds of 1 s with the
    /// hooks and direct only, fewer calls, control plane at 1k and 10k with 10 changes each.
    #[arg(long)]
    quick: bool,
    /// Only these parts: datapath, agent, netperf, socket-lb, controlplane, maglev (all by
    /// default).
    #[arg(long, value_delimiter = ',', value_parser = ["datapath", "agent", "netperf", "socket-lb", "controlplane", "maglev"])]
    only: Vec<String>,
    /// Calls per datapath case (default 20000, 5000 with --quick).
    #[arg(long)]
    calls: Option<usize>,
    /// Numbers of services the datapath part measures at.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    services: Vec<u32>,
    /// Numbers of services netperf measures at (default 1,1000,10000,100000; 1,1000,10000 with
    /// --quick).
    #[arg(long, value_delimiter = ',')]
    netperf_services: Vec<u32>,
    /// Alternating netperf runs per case (default 3, 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Length of one netperf run in seconds (default 5, 2 with --quick).
    #[arg(long)]
    seconds: Option<u32>,
    /// Rounds of the socket-lb part (default 8, 3 with --quick): its confidence intervals
    /// narrow with the rounds.
    #[arg(long)]
    socket_lb_runs: Option<usize>,
    /// Length of one socket-lb netperf run in seconds (default 2, 1 with --quick).
    #[arg(long)]
    socket_lb_seconds: Option<u32>,
    /// Whether socket-lb measures the node through kube-proxy's iptables ruleset too (default:
    /// not with --quick, where loading it at 10k services would take 30 s a round).
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    socket_lb_iptables: Option<bool>,
    /// Services of the agent benchmark (each with --endpoints endpoints; 2000 with --quick).
    #[arg(long, default_value_t = 10_000)]
    agent_services: u32,
    /// Endpoints per service in the agent benchmark.
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// Endpoint changes timed in the agent and control-plane benchmarks.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench/results")]
    output: PathBuf,
    /// The report to write (Markdown), and the directory of its plots.
    #[arg(long, default_value = "BENCHMARKS.md")]
    report: PathBuf,
    #[arg(long, default_value = "bench/plots")]
    plots: PathBuf,
    /// Let idle CPUs halt as the machine is set up, instead of keeping them polling (see the
    /// report's "How to read these figures"): the end-to-end figures then include the time to
    /// wake them, which on a virtual machine dominates a netperf transaction.
    #[arg(long)]
    allow_idle: bool,
    /// Internal: run the benchmarks in this process (see `lb_testbed::interrupt`).
    #[arg(long, hide = true)]
    worker: bool,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    /// Whether the CPUs were kept polling instead of halting when idle (`idle::Polling`).
    idle_polling: bool,
    /// Why they were not, when they were not.
    idle_halting_reason: Option<String>,
}

#[derive(Serialize)]
struct Results {
    date: String,
    machine: Machine,
    /// The command line's choices that shape the figures.
    quick: bool,
    datapath: datapath::Measured,
    agent: Option<agent::AgentFigures>,
    netperf: Option<NetperfResults>,
    socket_lb: Option<SocketLbJson>,
    controlplane: Option<controlplane::ControlPlaneResults>,
    maglev: Vec<maglev::MaglevFigure>,
}

#[derive(Serialize)]
struct NetperfResults {
    sizes: Vec<u32>,
    runs: usize,
    seconds: u32,
    samples: Vec<netperf::Sample>,
    skipped: Vec<netperf::Skipped>,
    setup_times: Vec<netperf::SetupTime>,
}

#[derive(Serialize)]
struct SocketLbJson {
    #[serde(flatten)]
    results: socket_lb::SocketLbResults,
    /// The ratios the report shows, with their 95% intervals.
    comparisons: Vec<socket_lb::report::Comparison>,
}

fn machine(idle_halting_reason: Option<String>) -> Machine {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|v| v.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    Machine {
        kernel,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        idle_polling: idle_halting_reason.is_none(),
        idle_halting_reason,
    }
}

/// The arguments this run was given, as the report quotes them (without the internal ones).
fn arguments() -> String {
    std::env::args()
        .skip(1)
        .filter(|a| a != "--worker")
        .map(|a| format!(" {a}"))
        .collect()
}

fn now_stamp() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H-%M-%SZ"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The benchmarks run in a worker process, so that Ctrl-C stops them between steps and every
/// namespace, agent and mount of the test bed is removed (see `lb_testbed::interrupt`).
fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.worker {
        let mut worker = match std::env::current_exe() {
            Ok(exe) => Command::new(exe),
            Err(e) => {
                eprintln!("lb-bench: error: cannot find the lb-bench executable: {e}");
                return ExitCode::FAILURE;
            }
        };
        worker.args(std::env::args_os().skip(1)).arg("--worker");
        return match interrupt::run_worker(worker) {
            Ok(status) => status.code().map_or(ExitCode::FAILURE, |c| {
                ExitCode::from(u8::try_from(c).unwrap_or(1))
            }),
            Err(e) => {
                eprintln!("lb-bench: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = interrupt::install_in_worker() {
        eprintln!("lb-bench: error: {e:#}");
        return ExitCode::FAILURE;
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if interrupt::is_interrupted(&e) => {
            eprintln!("lb-bench: interrupted; the test beds are removed, nothing was written");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("lb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let calls = cli.calls.unwrap_or(if cli.quick { 5_000 } else { 20_000 });
    let started = Instant::now();
    let mut progress = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
    let wants = |part: &str| cli.only.is_empty() || cli.only.iter().any(|p| p == part);
    let bins = std::env::current_exe()?;
    let agent_bin = bins.with_file_name("lb-agent");
    // Held until the report is written.
    let polling = if cli.allow_idle {
        Err("--allow-idle".to_owned())
    } else {
        idle::Polling::hold().map_err(|e| {
            progress(&format!("idle CPUs will halt: {e:#}"));
            format!("{e:#}")
        })
    };
    let mut results = Results {
        date: now_stamp(),
        machine: machine(polling.as_ref().err().cloned()),
        quick: cli.quick,
        datapath: datapath::Measured::default(),
        agent: None,
        netperf: None,
        socket_lb: None,
        controlplane: None,
        maglev: Vec::new(),
    };
    // Each part prints its section of the report as soon as it is measured.
    let mut sections = Vec::new();
    let mut section = |text: String| {
        println!("{text}");
        sections.push(text);
    };

    if wants("netperf") {
        let sizes = if !cli.netperf_services.is_empty() {
            cli.netperf_services.clone()
        } else if cli.quick {
            vec![1, 1_000, 10_000]
        } else {
            vec![1, 1_000, 10_000, 100_000]
        };
        let runs = cli.runs.unwrap_or(if cli.quick { 1 } else { 3 });
        let seconds = cli.seconds.unwrap_or(if cli.quick { 2 } else { 5 });
        let mut datapaths = vec![
            netperf::Datapath::Direct,
            netperf::Datapath::Ours(None),
            netperf::Datapath::OursDsr,
            netperf::Datapath::Iptables,
            netperf::Datapath::Nftables,
            netperf::Datapath::Ours(Some("native")),
            netperf::Datapath::Routed {
                replies_direct: false,
            },
            netperf::Datapath::Routed {
                replies_direct: true,
            },
        ];
        // XDP off is what the agent chooses on the bed's veths anyway: measured in full runs.
        if !cli.quick {
            datapaths.push(netperf::Datapath::Ours(Some("off")));
        }
        let plan = netperf::Plan {
            sizes: &sizes,
            runs,
            seconds,
            datapaths: &datapaths,
            tests: &netperf::Test::ALL,
            agent_bin: &agent_bin,
        };
        let (samples, skipped, setup_times) = netperf::run(&plan, &mut progress)?;
        let names: Vec<String> = datapaths.iter().map(|d| d.name()).collect();
        section(report::netperf_markdown(
            &report::cells(&samples),
            &sizes,
            &names,
            &skipped,
        ));
        results.netperf = Some(NetperfResults {
            sizes,
            runs,
            seconds,
            samples,
            skipped,
            setup_times,
        });
    }
    interrupt::check()?;
    if wants("socket-lb") {
        let sizes = if cli.netperf_services.is_empty() {
            socket_lb::report::GOAL_SIZES.to_vec()
        } else {
            cli.netperf_services.clone()
        };
        let plan = socket_lb::Plan {
            sizes: &sizes,
            runs: cli.socket_lb_runs.unwrap_or(if cli.quick { 3 } else { 8 }),
            seconds: cli
                .socket_lb_seconds
                .unwrap_or(if cli.quick { 1 } else { 2 }),
            iptables: cli.socket_lb_iptables.unwrap_or(!cli.quick),
            per_packet: !cli.quick,
            agents: !cli.quick,
            agent_bin: &agent_bin,
        };
        let figures = socket_lb::run(&plan, &mut progress)?;
        let comparisons = socket_lb::report::comparisons(&figures.samples);
        section(socket_lb::report::markdown(&figures, &comparisons));
        results.socket_lb = Some(SocketLbJson {
            results: figures,
            comparisons,
        });
    }
    interrupt::check()?;
    if wants("controlplane") {
        let sizes: &[usize] = if cli.quick {
            &[1_000, 10_000]
        } else {
            &[1_000, 10_000, 100_000]
        };
        // kube-proxy's nftables takes seconds per change at 10k services.
        let changes = if cli.quick { 10 } else { cli.changes.min(50) };
        let mut opts = controlplane::Options::with_agent(sizes, changes, &agent_bin)?;
        if cli.quick {
            opts.baseline_changes_budget = Duration::from_secs(10);
        }
        let figures = controlplane::run_with(&opts, &mut progress)?;
        section(report::controlplane_markdown(&figures));
        results.controlplane = Some(figures);
    }
    interrupt::check()?;
    if wants("datapath") {
        results.datapath =
            datapath::run(&cli.services, calls, &std::env::temp_dir(), &mut progress)?;
        section(datapath::report::markdown(&results.datapath, &cli.services));
    }
    interrupt::check()?;
    if wants("agent") {
        let services = if cli.quick {
            cli.agent_services.min(2_000)
        } else {
            cli.agent_services
        };
        let table_size = lb_common::maps::maglev::DEFAULT_TABLE_SIZE;
        let figures = agent::run(
            &agent_bin,
            services,
            cli.endpoints,
            cli.changes,
            table_size,
            &mut progress,
        )?;
        section(report::agent_markdown(&figures));
        results.agent = Some(figures);
    }
    interrupt::check()?;
    if wants("maglev") {
        progress("maglev: building tables");
        results.maglev = maglev::run(
            &[16_381, 65_537],
            &[10, 100, 1_000],
            if cli.quick { 5 } else { 21 },
        )?;
        section(report::maglev_markdown(&results.maglev));
    }

    fs::create_dir_all(&cli.output)
        .with_context(|| format!("cannot create {}", cli.output.display()))?;
    let json = cli.output.join(format!("{}.json", results.date));
    fs::write(&json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let plots = match &results.netperf {
        Some(n) => report::plots(&report::cells(&n.samples), &cli.plots)?,
        None => Vec::new(),
    };
    let goals = report::goals_markdown(
        results
            .netperf
            .as_ref()
            .map(|n| (report::cells(&n.samples), n.sizes.as_slice())),
        results.controlplane.as_ref(),
        datapath::report::goals(&results.datapath, &cli.services)
            .into_iter()
            .chain(
                results
                    .socket_lb
                    .as_ref()
                    .map_or_else(Vec::new, |s| socket_lb::report::goals(&s.comparisons)),
            )
            .collect(),
    );
    let md = report::document(
        &report::Header {
            date: &results.date,
            kernel: &results.machine.kernel,
            cpus: results.machine.cpus,
            cpu_model: &results.machine.cpu_model,
            idle_halting_reason: results.machine.idle_halting_reason.as_deref(),
            arguments: &arguments(),
            json: &json,
            report: &cli.report,
            plots: &plots,
        },
        &goals,
        &sections,
    );
    fs::write(&cli.report, md).with_context(|| format!("cannot write {}", cli.report.display()))?;
    println!("{goals}");
    println!(
        "\nraw figures: {}\nreport: {} ({} plots in {})\ntook {:.0}s",
        json.display(),
        cli.report.display(),
        plots.len(),
        cli.plots.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
