//! The human-readable side of a benchmark run: `BENCHMARKS.md` (ratios of ours to each baseline,
//! the goals met or missed, in plain words) and SVG plots (rate and latency versus number of
//! services, one line per datapath).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use lb_bench::controlplane::ControlPlaneResults;

use crate::netperf::{NODEPORT, OURS, OURS_DSR, Sample, Skipped};

mod plots;
pub use plots::plots;

/// Median of one (datapath, path, test, size) cell over its runs, and each run's rate.
#[derive(Clone, Debug)]
pub struct Cell {
    pub median: f64,
    /// Rate by run: runs of the datapaths alternate, so run i of two datapaths pair up.
    pub runs: BTreeMap<usize, f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub cpu_us: f64,
    pub softirq_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Key: (path, test, datapath, services).
pub type Cells = BTreeMap<(String, String, String, u32), Cell>;

pub fn cells(samples: &[Sample]) -> Cells {
    let mut groups: BTreeMap<(String, String, String, u32), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        groups
            .entry((s.path.into(), s.test.into(), s.datapath.clone(), s.services))
            .or_default()
            .push(s);
    }
    groups
        .into_iter()
        .map(|(k, runs)| {
            let m = median(runs.iter().map(|s| s.rate).collect());
            let opt_median = |f: fn(&Sample) -> Option<f64>| {
                let v: Vec<f64> = runs.iter().filter_map(|s| f(s)).collect();
                (!v.is_empty()).then(|| median(v))
            };
            let cell = Cell {
                median: m,
                runs: runs.iter().map(|s| (s.run, s.rate)).collect(),
                p50_us: opt_median(|s| s.p50_us),
                p99_us: opt_median(|s| s.p99_us),
                cpu_us: median(runs.iter().map(|s| s.cpu_us_per_unit).collect()),
                softirq_us: median(runs.iter().map(|s| s.softirq_us_per_unit).collect()),
            };
            (k, cell)
        })
        .collect()
}

/// `ours / base` for one path, test and size, when both were measured.
pub fn ratio(
    cells: &Cells,
    path: &str,
    test: &str,
    ours: &str,
    base: &str,
    size: u32,
) -> Option<f64> {
    let get = |dp: &str| {
        cells
            .get(&(path.into(), test.into(), dp.into(), size))
            .map(|c| c.median)
    };
    Some(get(ours)? / get(base)?)
}

/// `ours / base` for one path, test and size from their paired runs, with its 95% interval
/// (none from a single run).
fn paired(cells: &Cells, path: &str, test: &str, ours: &str, base: &str, size: u32) -> String {
    let get = |dp: &str| cells.get(&(path.into(), test.into(), dp.into(), size));
    let (Some(a), Some(b)) = (get(ours), get(base)) else {
        return "–".into();
    };
    let pairs: Vec<(f64, f64)> = a
        .runs
        .iter()
        .filter_map(|(run, rate)| Some((*rate, *b.runs.get(run)?)))
        .collect();
    crate::stats::paired_ratio(&pairs).map_or("–".into(), |r| r.text())
}

/// The paths measured, in the order they first appear.
fn paths_of(cells: &Cells) -> Vec<String> {
    let mut paths: Vec<String> = cells.keys().map(|k| k.0.clone()).collect();
    paths.dedup();
    paths
}

const TESTS: [&str; 4] = ["TCP_CRR", "TCP_RR", "UDP_RR", "TCP_STREAM"];

/// The netperf section of BENCHMARKS.md: per path, every datapath as a fraction of the direct
/// floor and ours over each kube-proxy datapath; TCP_CRR latency; CPU per transaction.
pub fn netperf_markdown(
    cells: &Cells,
    sizes: &[u32],
    datapaths: &[String],
    skipped: &[Skipped],
) -> String {
    let mut md = String::from(
        "## End to end (netperf)\n\nA pod on node-0 to a ClusterIP, and the external client to \
         node-0's NodePort, both served by a netserver pod on node-1 (so every path crosses the \
         nodes' LAN), with the measured Service in the middle of N Services (one endpoint each). \
         Rates are the median over the runs. Each datapath is shown as a fraction of the direct \
         floor (client to the pod's address, no load balancer) and ours of each kube-proxy \
         datapath: the geometric mean of the ratios of runs made side by side (the datapaths \
         alternate run by run), with its 95% confidence interval in brackets (Student's t on \
         their logarithms); *(1 run)*: one run each, as with `--quick`, which gives no \
         interval. The goals are judged on the medians. Variants of ours with another XDP \
         mode are measured at the smallest size only; `ours (dsr)` (`--forwarding-mode dsr`: direct server return, the \
         client's address kept and node-1 answering it itself) through the NodePort only, the \
         one path it changes. *external -> NodePort, local backend*: the external client to \
         node-1's NodePort, the backend on node-1 itself (ours keeps the client's address and \
         only DNATs; kube-proxy's rulesets masquerade all external NodePort traffic), TCP_CRR \
         and TCP_RR with the default datapaths. ",
    );
    md.push_str(&crate::cpus::netperf_note());
    md.push('\n');
    let others: Vec<&String> = datapaths.iter().filter(|d| *d != "direct").collect();
    let bases: Vec<&str> = ["iptables", "nftables"]
        .into_iter()
        .filter(|b| datapaths.iter().any(|d| d == b))
        .collect();
    for path in paths_of(cells) {
        let _ = writeln!(md, "\n### {path}\n");
        let mut header = String::from("| test | services | direct |");
        let mut rule = String::from("|---|---:|---:|");
        for dp in &others {
            let _ = write!(header, " {dp} / direct |");
            rule.push_str("---:|");
        }
        for base in &bases {
            let _ = write!(header, " {OURS} / {base} |");
            rule.push_str("---:|");
        }
        let _ = writeln!(md, "{header}\n{rule}");
        for test in TESTS {
            for &size in sizes {
                let Some(direct) = cells.get(&(path.clone(), test.into(), "direct".into(), size))
                else {
                    continue;
                };
                let unit = if test == "TCP_STREAM" { "Mb/s" } else { "/s" };
                let mut row = format!("| {test} | {size} | {:.0} {unit} |", direct.median);
                for dp in &others {
                    let _ = write!(row, " {} |", paired(cells, &path, test, dp, "direct", size));
                }
                for base in &bases {
                    let _ = write!(row, " {} |", paired(cells, &path, test, OURS, base, size));
                }
                let _ = writeln!(md, "{row}");
            }
        }
        let mut header = String::from("| services |");
        let mut rule = String::from("|---:|");
        for dp in datapaths {
            let _ = write!(header, " {dp} |");
            rule.push_str("---:|");
        }
        let table = |md: &mut String,
                     title: &str,
                     cell_text: &dyn Fn(&Cell) -> Option<String>,
                     test: &str| {
            let _ = writeln!(md, "\n{title}\n\n{header}\n{rule}");
            for &size in sizes {
                let mut row = format!("| {size} |");
                for dp in datapaths {
                    let text = cells
                        .get(&(path.clone(), test.into(), dp.clone(), size))
                        .and_then(cell_text)
                        .unwrap_or_else(|| "–".into());
                    let _ = write!(row, " {text} |");
                }
                let _ = writeln!(md, "{row}");
            }
        };
        table(
            &mut md,
            "First-packet latency: TCP_CRR transaction latency in µs, p50 / p99 (connect, request, \
             response, close):",
            &|c| Some(format!("{:.0} / {:.0}", c.p50_us?, c.p99_us?)),
            "TCP_CRR",
        );
        table(
            &mut md,
            "CPU per TCP_RR transaction, µs of all cores (softirq part in brackets), at the load \
             one netperf stream offers:",
            &|c| Some(format!("{:.1} [{:.1}]", c.cpu_us, c.softirq_us)),
            "TCP_RR",
        );
    }
    for s in skipped {
        let _ = writeln!(
            md,
            "\n**Not measured:** {} at {} services: {}",
            s.datapath, s.services, s.reason
        );
    }
    md
}

/// The agent section (a larger, multi-endpoint sync than the control-plane comparison's).
pub fn agent_markdown(f: &crate::agent::AgentFigures) -> String {
    format!(
        "## Agent\n\n{} services × {} endpoints (Maglev M up to {}), from a YAML source:\n\n\
         | figure | value | goal |\n|---|---:|---|\n\
         | start to ready (load, parse, translate, program) | {:.2} s | |\n\
         | first full sync | {:.2} s | under 1 s: {} |\n\
         | endpoint change to map, p50 | {:.1} ms | |\n\
         | endpoint change to map, p99 (over {} changes) | {:.1} ms | under 50 ms: {} |\n\
         | peak RSS | {:.1} MiB | under 50 MiB: {} |\n",
        f.services,
        f.endpoints_per_service,
        f.table_size,
        f.start_to_ready_s,
        f.first_sync_s,
        verdict(f.first_sync_s < 1.0),
        f.change_latency_p50_ms,
        f.changes,
        f.change_latency_p99_ms,
        verdict(f.change_latency_p99_ms < 50.0),
        f.peak_rss_mib,
        verdict(f.peak_rss_mib < 50.0),
    )
}

pub fn maglev_markdown(figures: &[crate::maglev::MaglevFigure]) -> String {
    let mut md = String::from(
        "## Maglev\n\nTime to build one table, and what happens when one of N backends leaves: \
         the removed backend's share must move; *disruption* is the share of slots that moved \
         although their backend stayed (the Maglev paper's bound is about 1% of the table).\n\n\
         | M | N | build | removed backend's share | disruption |\n|---:|---:|---:|---:|---:|\n",
    );
    for f in figures {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} µs | {:.2}% | {:.2}% |",
            f.table_size,
            f.backends,
            f.build_us,
            f.removed_share * 100.0,
            f.disruption * 100.0
        );
    }
    md
}

pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// One goal of the issue, judged on this run's figures.
pub struct Goal {
    pub what: String,
    pub met: bool,
    pub figures: String,
}

impl Goal {
    /// Its row in a `| goal | this run | |` table.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} |\n",
            self.what,
            self.figures,
            verdict(self.met)
        )
    }
}

/// The NodePort's steady state (issue 15): TCP_CRR with the client's ports coming back run
/// after run, at least `floor` × direct for `datapath` (0.9 through the default SNAT range, 0.95
/// by direct server return), with a p99 within twice direct's.
fn steady_state_goal(cells: &Cells, path: &str, sizes: &[u32], datapath: &str, floor: f64) -> Goal {
    let cell = |datapath: &str, n: u32| {
        cells.get(&(path.to_owned(), "TCP_CRR".into(), datapath.into(), n))
    };
    let figures: Vec<(u32, f64, f64)> = sizes
        .iter()
        .filter_map(|&n| {
            let (ours, direct) = (cell(datapath, n)?, cell("direct", n)?);
            Some((
                n,
                ours.median / direct.median,
                ours.p99_us? / direct.p99_us?,
            ))
        })
        .collect();
    Goal {
        what: if datapath == OURS {
            format!(
                "{path}: TCP_CRR in steady state (client ports reused run after run, the default \
                 SNAT range) ≥ {floor}× the direct floor, p99 within 2× direct's, at 1, 1k and 10k"
            )
        } else {
            format!(
                "{path}, {datapath}: TCP_CRR in steady state ≥ {floor}× the direct floor, p99 \
                 within 2× direct's, at 1, 1k and 10k"
            )
        },
        met: figures.len() >= 3 && figures.iter().all(|(_, r, p)| *r >= floor && *p <= 2.0),
        figures: figures
            .iter()
            .map(|(n, r, p)| format!("{r:.2} (p99 {p:.1}×) at {n}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Direct server return's other NodePort goals: TCP_RR and TCP_STREAM at least 0.95× direct.
fn dsr_goals(cells: &Cells, path: &str, sizes: &[u32]) -> Vec<Goal> {
    ["TCP_RR", "TCP_STREAM"]
        .into_iter()
        .map(|test| {
            let v: Vec<(u32, f64)> = sizes
                .iter()
                .filter_map(|&n| Some((n, ratio(cells, path, test, OURS_DSR, "direct", n)?)))
                .collect();
            Goal {
                what: format!("{path}, {OURS_DSR}: {test} ≥ 0.95× the direct floor"),
                met: v.len() >= 3 && v.iter().all(|(_, x)| *x >= 0.95),
                figures: v
                    .iter()
                    .map(|(n, x)| format!("{x:.2} at {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })
        .collect()
}

/// The agent's footprint at 10k services (issue 15): peak RSS under 50 MiB, process start to
/// ready under 0.5 s.
fn agent_footprint_goal(ours: &crate::controlplane::Figure) -> Goal {
    let (rss, ready) = (ours.peak_rss_mib, ours.program_s);
    Goal {
        what: "control plane: the agent at 10k services: peak RSS under 50 MiB, from process \
               start to ready under 0.5 s"
            .into(),
        met: rss.is_some_and(|r| r < 50.0) && ready.is_some_and(|r| r < 0.5),
        figures: format!(
            "peak RSS {}, ready in {}",
            rss.map_or("not measured".into(), |r| format!("{r:.0} MiB")),
            ready.map_or("not measured".into(), |r| format!("{r:.2} s")),
        ),
    }
}

/// The goals, met or missed, with the figures that decide them; `more` are judged elsewhere
/// (socket-level balancing's) and listed last.
pub fn goals_markdown(
    netperf: Option<(Cells, &[u32])>,
    control_plane: Option<&ControlPlaneResults>,
    more: Vec<Goal>,
) -> String {
    let mut goals = Vec::new();
    if let Some((cells, sizes)) = &netperf {
        for path in paths_of(cells) {
            let r = |test: &str, base: &str, size: u32| ratio(cells, &path, test, OURS, base, size);
            let series = |test: &str, base: &str| -> Vec<(u32, f64)> {
                sizes
                    .iter()
                    .filter_map(|&n| Some((n, r(test, base, n)?)))
                    .collect()
            };
            let list = |v: &[(u32, f64)]| {
                v.iter()
                    .map(|(n, x)| format!("{x:.2} at {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let floor = series("TCP_CRR", "direct");
            goals.push(Goal {
                what: format!("{path}: TCP_CRR ≥ 0.95× the direct floor at every size"),
                met: !floor.is_empty() && floor.iter().all(|(_, x)| *x >= 0.95),
                figures: list(&floor),
            });
            for base in ["iptables", "nftables"] {
                let v = series("TCP_CRR", base);
                if !v.is_empty() {
                    goals.push(Goal {
                        what: format!(
                            "{path}: TCP_CRR over {base} (expected about 1.4× iptables and \
                             1.25× nftables at 1k, 2.5× iptables at 10k)"
                        ),
                        met: v.iter().all(|(_, x)| *x >= 1.0),
                        figures: list(&v),
                    });
                }
            }
            if path == NODEPORT {
                goals.push(steady_state_goal(cells, &path, sizes, OURS, 0.9));
                let dsr_measured = cells.keys().any(|(p, _, d, _)| *p == path && d == OURS_DSR);
                if dsr_measured {
                    goals.push(steady_state_goal(cells, &path, sizes, OURS_DSR, 0.95));
                    goals.extend(dsr_goals(cells, &path, sizes));
                }
            }
            let crr = |n: u32| {
                cells
                    .get(&(path.clone(), "TCP_CRR".into(), OURS.into(), n))
                    .map(|c| c.median)
            };
            if let (Some(one), Some(ten_k)) = (crr(1), crr(10_000)) {
                let change = ten_k / one - 1.0;
                goals.push(Goal {
                    what: format!(
                        "{path}: ours' TCP_CRR varies less than 5% from 1 to 10k services"
                    ),
                    met: change.abs() < 0.05,
                    figures: format!("{:+.1}%", change * 100.0),
                });
            }
            for test in ["TCP_RR", "TCP_STREAM"] {
                // A test this path does not run (the local NodePort's TCP_STREAM) has no goal.
                if !cells.keys().any(|(p, t, _, _)| *p == path && t == test) {
                    continue;
                }
                let floor = series(test, "direct");
                goals.push(Goal {
                    what: format!("{path}: {test} ≥ 0.97× the direct floor"),
                    met: !floor.is_empty() && floor.iter().all(|(_, x)| *x >= 0.97),
                    figures: list(&floor),
                });
                for base in ["iptables", "nftables"] {
                    let v = series(test, base);
                    if !v.is_empty() {
                        goals.push(Goal {
                            what: format!("{path}: {test} never below {base}"),
                            met: v.iter().all(|(_, x)| *x >= 1.0),
                            figures: list(&v),
                        });
                    }
                }
            }
        }
    }
    if let Some(cp) = control_plane {
        let ours = cp.get(OURS, 10_000);
        let sync = ours.and_then(|f| f.first_sync_s);
        let ready = ours.and_then(|f| f.program_s);
        for variant in ["iptables-nft", "iptables-legacy"] {
            let Some(base) = cp.get(variant, 10_000) else {
                continue;
            };
            let default = if cp.iptables_default == variant {
                ", this machine's `iptables`"
            } else {
                ""
            };
            let what = format!(
                "control plane: programming 10k services ≥ 10× faster than iptables-restore \
                 ({variant}{default})"
            );
            let (met, figures) = match (sync, ready, base.program_s) {
                (Some(sync), Some(ready), Some(restore)) => (
                    restore / sync >= 10.0,
                    format!(
                        "{:.1}× (first sync {sync:.2} s vs {restore:.2} s; from process start to \
                         ready {ready:.2} s, {:.1}×)",
                        restore / sync,
                        restore / ready
                    ),
                ),
                (Some(sync), _, None) => (
                    true,
                    format!(
                        "first sync {sync:.2} s; iptables-restore did not finish in {:.0} s",
                        cp.timeout_s
                    ),
                ),
                _ => (false, "not measured".into()),
            };
            goals.push(Goal { what, met, figures });
        }
        if let Some(ours) = ours {
            goals.push(agent_footprint_goal(ours));
        }
        if let Some(change) = ours.and_then(|f| f.change.as_ref()) {
            goals.push(Goal {
                what: "control plane: one endpoint change p99 under 50 ms (10k services)".into(),
                met: change.p99_ms < 50.0,
                figures: format!(
                    "{:.1} ms (p50 {:.1} ms, {} changes)",
                    change.p99_ms, change.p50_ms, change.completed
                ),
            });
        }
    }
    goals.extend(more);
    let mut md = String::from("## Goals\n\n| goal | this run | |\n|---|---|---|\n");
    for g in &goals {
        md.push_str(&g.row());
    }
    let missed = goals.iter().filter(|g| !g.met).count();
    let _ = writeln!(
        md,
        "\n{} of {} goals met{}.",
        goals.len() - missed,
        goals.len(),
        if missed > 0 {
            "; the missed ones are in bold, with their figures"
        } else {
            ""
        }
    );
    md
}

/// What the report says about the run itself.
pub struct Header<'a> {
    pub date: &'a str,
    pub kernel: &'a str,
    pub cpus: usize,
    pub cpu_model: &'a str,
    /// Why idle CPUs were left to halt; `None`: they were kept polling (`crate::idle`).
    pub idle_halting_reason: Option<&'a str>,
    /// The command line's arguments, each with a leading space.
    pub arguments: &'a str,
    pub json: &'a Path,
    pub report: &'a Path,
    pub plots: &'a [PathBuf],
}

/// BENCHMARKS.md: the header, the goals, the plots, then every section.
pub fn document(h: &Header<'_>, goals: &str, sections: &[String]) -> String {
    // Links are relative to the report's directory.
    let base = h.report.parent().unwrap_or(Path::new(""));
    let rel = |p: &Path| -> String { p.strip_prefix(base).unwrap_or(p).display().to_string() };
    let mut md = format!(
        "# Benchmarks\n\nGenerated by `cargo xtask bench{}` on {} — Linux {}, {} CPUs ({}). \
         Every figure, raw: [{}]({}). Every ratio compares datapaths measured in this same run, \
         on this same machine.\n\n",
        h.arguments,
        h.date,
        h.kernel,
        h.cpus,
        h.cpu_model,
        rel(h.json),
        rel(h.json),
    );
    md.push_str(goals);
    md.push_str(METHOD);
    match h.idle_halting_reason {
        None => md.push_str(IDLE_POLLING),
        Some(reason) => {
            let _ = writeln!(md, "{IDLE_HALTING} ({reason}).");
        }
    }
    if !h.plots.is_empty() {
        md.push_str("\n## Plots\n\n");
        for p in h.plots {
            let _ = writeln!(
                md,
                "![{}]({})",
                p.file_stem().unwrap_or_default().to_string_lossy(),
                rel(p)
            );
        }
    }
    for s in sections {
        md.push('\n');
        md.push_str(s);
    }
    md
}

/// The control-plane section: programming N Services from scratch and one endpoint change.
pub fn controlplane_markdown(cp: &ControlPlaneResults) -> String {
    let mut md = format!(
        "## Control plane\n\nProgramming N Services (one endpoint each) from scratch, and one \
         endpoint change. Ours: the real agent reading one JSON file per Service, the API server's encoding (from process start to ready, and \
         the first full sync alone: translate, plan, write the maps); a change is timed from the \
         file's rename to the map holding it. kube-proxy: the wall time of `iptables-restore` / \
         `nft -f` on its full ruleset in a fresh namespace (generating the text is not counted), \
         and for a change its partial sync plus what it reads back from the kernel. {} and {}; \
         this machine's `iptables` is {}. Limit per step: {:.0} s.\n\n\
         | datapath | services | from scratch | one change p50 / p99 | notes |\n|---|---:|---:|---:|---|\n",
        cp.iptables_version, cp.nft_version, cp.iptables_default, cp.timeout_s
    );
    for dp in cp.datapaths() {
        for &n in &cp.sizes {
            let Some(f) = cp.get(&dp, n) else { continue };
            let scratch = match (f.program_s, f.first_sync_s) {
                (Some(p), Some(sync)) => format!("{p:.2} s (first sync {sync:.2} s)"),
                (Some(p), None) => format!("{p:.2} s"),
                _ => "did not finish".into(),
            };
            let change = f.change.as_ref().map_or("–".into(), |c| {
                format!(
                    "{:.1} / {:.1} ms ({} of {})",
                    c.p50_ms, c.p99_ms, c.completed, c.requested
                )
            });
            let mut notes = Vec::new();
            if let Some(rss) = f.peak_rss_mib {
                notes.push(format!("peak RSS {rss:.0} MiB"));
            }
            if let Some(bytes) = f.bpf_map_bytes {
                notes.push(format!(
                    "BPF maps {:.0} MiB",
                    bytes as f64 / (1024.0 * 1024.0)
                ));
            }
            if let Some(bytes) = f.ruleset_bytes {
                notes.push(format!("ruleset {:.1} MB", bytes as f64 / 1e6));
            }
            if let Some(note) = &f.note {
                notes.push(note.clone());
            }
            let _ = writeln!(
                md,
                "| {dp} | {n} | {scratch} | {change} | {} |",
                notes.join("; ")
            );
        }
    }
    md
}

/// How the figures come about, and what they do not show.
const METHOD: &str = "
## How to read these figures

- The test bed is two nodes, a LAN and an external client in network namespaces joined by veth
  pairs, on one machine; every datapath runs the same bed with the same Services in the same run.
  One netperf stream per test, the runs of all datapaths alternating.
- Each run lasts about the same time, its length in seconds, except TCP_CRR, which counts
  connections where it can: a timed TCP_CRR ends 4 s after its length (netserver waits in
  accept() until its own timer fires). A datapath's TCP_CRR makes as many connections as its
  previous run made in that time (20,000 a second for its first on a path); kube-proxy's
  through a NodePort are timed until their previous run there showed no stalled connections
  (p99 under 5 ms), since a counted run lasts as long as its stalls make it.
- `ours` is the agent with its defaults. The nodes' uplinks are veths, on which the agent leaves
  XDP off (a veth hands XDP GSO packets with partial checksums that it cannot translate), so
  `ours` is the tc datapath; `ours (xdp native)` forces native XDP (the bed's uplinks carry
  NIC-like frames), `ours (xdp off)` is the same as the default here; both at the smallest size.
- NodePort traffic enters node-0 and is served by a pod on node-1, so every datapath
  source-NATs it (externalTrafficPolicy Cluster). netserver closes every TCP_CRR connection
  first, so it holds each one in TIME_WAIT on (node address, SNAT port), and the external
  client cycles through a few thousand ports of Linux's ephemeral range (a range of its own per
  datapath), coming back to each one several times a second, run after run: the steady state
  of a busy NodePort, not its first seconds. TIME_WAIT takes a new SYN only if its TCP
  timestamp is newer, which it always is for the same four addresses and ports and only about
  half the time for another client port (Linux offsets timestamps by a hash of them); the
  backend answers the others with an ACK, and the client retransmits its SYN about 10 ms later.
  Ours gives each client port a home SNAT port of its own in its default range (1024-29999),
  so a client port that comes back takes its own TIME_WAIT over; kube-proxy's MASQUERADE
  (`--random-fully`) draws a random port for each connection, which soon meets another
  port's TIME_WAIT: its p99 of about 10 ms. Every variant of ours uses the default range, as
  an operator's node does. kube-proxy's rulesets are served by a second, identical netserver
  pod on node-1: their MASQUERADE draws ports from all of 1024-65535, and the TIME_WAITs it
  leaves on (node-0, port) would meet ours in the backend for a minute after (a node has no
  other masquerader on the range the agent reserves).
- `routed via node-0` and `routed via node-0, replies direct` (external -> NodePort only, at the
  smallest size) translate nothing: the client sends to the backend's address through node-0,
  which forwards to node-1 with plain kernel routing, and node-1 sends its replies back through
  node-0 (source NAT's way) or straight to the client (direct server return's). On this bed
  every namespace shares the same two CPUs, so the hop through the entry node costs what a
  wire would not: these are the floors of a NodePort whose backend runs on another node, and
  `direct` (to node-1 alone) lies above what any NodePort implementation can reach there.
- CPU per transaction is the whole machine's CPU time (all cores, every process) over the
  transactions of a run, at the load one netperf stream offers (closed loop, not a fixed
  offered load); the softirq part is where packet processing runs.
- Control plane: kube-proxy's figures are the kernel tools' wall time on a ruleset generated
  beforehand; ours include the agent reading and decoding its source (JSON files).
";

/// The last point of `METHOD`, for a run whose CPUs were kept polling (`crate::idle`).
const IDLE_POLLING: &str = "\
- Idle CPUs were kept polling rather than halting (a PM QoS request of 0 µs on
  `/dev/cpu_dma_latency`, as tuned's latency-performance profile makes): one netperf stream wakes
  an idle CPU at every hop, and on a virtual machine waking a halted vCPU can take longer than
  the whole path through the kernel, so that with halting every datapath looks alike (on the
  machine this was written on: TCP_RR between two namespaces 19,000/s halting, 95,000/s
  polling). `--allow-idle` measures with the machine's idle states.
";

/// The last point of `METHOD`, for a run whose CPUs were left to halt when idle (the reason
/// follows).
const IDLE_HALTING: &str = "\
- Idle CPUs were left to halt: every figure includes the time to wake them at each hop, which
  on some virtual machines dominates a netperf transaction and narrows the differences between
  datapaths";
