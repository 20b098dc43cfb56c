//! `cargo xtask bench`: measures the load balancer against baselines run in the same invocation
//! and writes the raw figures to `bench/results/`.

mod agent;
mod datapath;

use std::{fs, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use clap::Parser;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Benchmarks of the eBPF Service load balancer (run through `cargo xtask bench`)")]
struct Cli {
    /// A shorter run: fewer calls per case.
    #[arg(long)]
    quick: bool,
    /// Calls per datapath case (default 20000, 5000 with --quick).
    #[arg(long)]
    calls: Option<usize>,
    /// Numbers of services to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    services: Vec<u32>,
    /// Services of the agent benchmark (each with --endpoints endpoints).
    #[arg(long, default_value_t = 10_000)]
    agent_services: u32,
    /// Endpoints per service in the agent benchmark.
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// Endpoint changes timed in the agent benchmark.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Only these parts (datapath, agent); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench/results")]
    output: PathBuf,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
}

#[derive(Serialize)]
struct Results {
    date: String,
    machine: Machine,
    datapath: Vec<datapath::Figure>,
    agent: Option<agent::AgentFigures>,
}

fn machine() -> Machine {
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
    }
}

fn now_stamp() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H-%M-%SZ"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn print_datapath(figures: &[datapath::Figure], scales: &[u32]) {
    println!(
        "\nDatapath cost per packet, ns net of an empty program (median of BPF_PROG_TEST_RUN calls; bpf_stats in brackets)"
    );
    print!("{:<14}{:<5}", "case", "hook");
    for s in scales {
        print!("{:>22}", format!("{s} svc"));
    }
    println!();
    let mut rows: Vec<(&str, &str)> = figures.iter().map(|f| (f.case.as_str(), f.hook)).collect();
    rows.sort_by_key(|(case, hook)| {
        (
            *hook,
            ["non-service", "established", "new flow", "reply", "empty"]
                .iter()
                .position(|c| c == case),
        )
    });
    rows.dedup();
    for (case, hook) in rows {
        print!("{case:<14}{hook:<5}");
        for s in scales {
            let f = figures
                .iter()
                .find(|f| f.case == case && f.hook == hook && f.services == *s);
            let cell = f.map_or("-".into(), |f| {
                if case == "empty" {
                    format!("{:.0} gross [{:.0}]", f.median_ns, f.bpf_stats_ns)
                } else {
                    format!("{:.0} [{:.0}]", f.net_ns, f.bpf_stats_net_ns)
                }
            });
            print!("{cell:>22}");
        }
        println!();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let calls = cli.calls.unwrap_or(if cli.quick { 5_000 } else { 20_000 });
    let started = Instant::now();
    let mut progress = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
    let wants = |part: &str| cli.only.is_empty() || cli.only.iter().any(|p| p == part);
    let mut figures = Vec::new();
    if wants("datapath") {
        figures = datapath::run(&cli.services, calls, &mut progress)?;
        print_datapath(&figures, &cli.services);
    }
    let mut agent_figures = None;
    if wants("agent") {
        let agent_bin = std::env::current_exe()?.with_file_name("lb-agent");
        let services = if cli.quick {
            cli.agent_services.min(2_000)
        } else {
            cli.agent_services
        };
        let table_size = lb_common::maps::maglev::DEFAULT_TABLE_SIZE;
        let f = agent::run(
            &agent_bin,
            services,
            cli.endpoints,
            cli.changes,
            table_size,
            &mut progress,
        )?;
        println!(
            "\nAgent: {} services x {} endpoints (Maglev M = {}), YAML source",
            f.services, f.endpoints_per_service, f.table_size
        );
        println!(
            "  full sync: {:.2} s from start to ready, of which the first sync {:.2} s (goal: under 1 s)",
            f.start_to_ready_s, f.first_sync_s
        );
        println!(
            "  endpoint change to map: p50 {:.1} ms, p99 {:.1} ms over {} changes (goal: p99 under 50 ms)",
            f.change_latency_p50_ms, f.change_latency_p99_ms, f.changes
        );
        println!("  peak RSS: {:.1} MiB (goal: under 50 MiB)", f.peak_rss_mib);
        agent_figures = Some(f);
    }

    let results = Results {
        date: now_stamp(),
        machine: machine(),
        datapath: figures,
        agent: agent_figures,
    };
    fs::create_dir_all(&cli.output)
        .with_context(|| format!("cannot create {}", cli.output.display()))?;
    let path = cli.output.join(format!("{}.json", results.date));
    fs::write(&path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("\nraw figures: {}", path.display());
    Ok(())
}
