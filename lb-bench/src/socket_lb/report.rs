//! The socket-level balancing section of BENCHMARKS.md and its goals: each variant's rate as a
//! fraction of the direct floor, and the hooks' over the baseline, with 95% confidence
//! intervals over the paired rounds ([`crate::stats`]).

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{AGENTS, DIRECT, IPTABLES, NODE, OFF, ON, POD, SocketLbResults, TESTS};
use crate::{
    netperf::Sample,
    report::Goal,
    stats::{self, Ratio},
};

/// The goal: with the hooks, at least this fraction of direct, over the whole interval.
pub const GOAL: f64 = 0.98;
/// The sizes the goal is judged at.
pub const GOAL_SIZES: [u32; 3] = [1, 1_000, 10_000];

/// One datapath over another at one (path, test, size).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub path: String,
    pub test: String,
    pub services: u32,
    pub of: String,
    pub to: String,
    #[serde(flatten)]
    pub ratio: Ratio,
}

/// The comparisons the section shows: per path, every variant over direct, and the hooks over
/// the path's baseline (per packet for pods, iptables for the node).
pub fn comparisons(samples: &[Sample]) -> Vec<Comparison> {
    // (path, test, datapath, services) -> rate by run.
    let mut rates: BTreeMap<(&str, &str, &str, u32), BTreeMap<usize, f64>> = BTreeMap::new();
    for s in samples {
        rates
            .entry((s.path, s.test, s.datapath.as_str(), s.services))
            .or_default()
            .insert(s.run, s.rate);
    }
    let mut out = Vec::new();
    for (&(path, test, of, services), runs) in &rates {
        let mut bases = Vec::new();
        if of != DIRECT {
            bases.push(DIRECT);
        }
        if of == ON {
            bases.extend([OFF, IPTABLES, AGENTS]);
        }
        for to in bases {
            let Some(base) = rates.get(&(path, test, to, services)) else {
                continue;
            };
            let pairs: Vec<(f64, f64)> = runs
                .iter()
                .filter_map(|(run, a)| Some((*a, *base.get(run)?)))
                .collect();
            if let Some(ratio) = stats::paired_ratio(&pairs) {
                out.push(Comparison {
                    path: path.into(),
                    test: test.into(),
                    services,
                    of: of.into(),
                    to: to.into(),
                    ratio,
                });
            }
        }
    }
    out
}

fn find<'a>(
    c: &'a [Comparison],
    path: &str,
    test: &str,
    services: u32,
    of: &str,
    to: &str,
) -> Option<&'a Comparison> {
    c.iter().find(|x| {
        x.path == path && x.test == test && x.services == services && x.of == of && x.to == to
    })
}

/// The goals: per path and test, the hooks at least [`GOAL`] of direct at every size of
/// [`GOAL_SIZES`], the whole interval included.
pub fn goals(c: &[Comparison]) -> Vec<Goal> {
    let mut goals = Vec::new();
    for path in [POD, NODE] {
        if !c.iter().any(|x| x.path == path) {
            continue;
        }
        for test in TESTS.map(|t| t.name()) {
            let mut met = true;
            let mut figures = Vec::new();
            for n in GOAL_SIZES {
                match find(c, path, test, n, ON, DIRECT) {
                    Some(x) => {
                        met &= x.ratio.at_least(GOAL);
                        figures.push(format!("{} at {n}", x.ratio.text()));
                    }
                    None => {
                        met = false;
                        figures.push(format!("not measured at {n}"));
                    }
                }
            }
            goals.push(Goal {
                what: format!(
                    "{path}: {test} with socket LB on ≥ {GOAL}× the direct floor at 1, 1k and \
                     10k services (the whole 95% interval)"
                ),
                met,
                figures: figures.join(", "),
            });
        }
    }
    goals
}

/// The section of BENCHMARKS.md.
pub fn markdown(results: &SocketLbResults, c: &[Comparison]) -> String {
    let mut md = format!(
        "## Socket-level balancing\n\nnetperf to the ClusterIP from a pod on node-0 and from \
         node-0 itself (a host-network process), served by the netserver pod on node-1. \
         *{ON}*: the agents run with `--socket-lb on`, each with its node's cgroup as \
         `--cgroup-root`, and the client starts in that cgroup (a pod: in a child of it), so \
         its connect() goes straight to the backend. *{OFF}*: the same agents, the client \
         outside the hooked cgroups: the per-packet path's NAT, as without the hooks. \
         *{IPTABLES}*: kube-proxy's ruleset (the per-packet path does not serve a node's own \
         connections). *{DIRECT}*: the backend's address, no load balancer (the floor). \
         *{AGENTS}*: the backend's address from the hooked cgroup while the agents run (what \
         the packet programs cost traffic that is no Service's; *{ON}* over it is the hooks' \
         own cost). \
         The backend keeps no TIME_WAIT (`tcp_max_tw_buckets` 0): with one client cycling \
         through its ports, kube-proxy's randomly chosen source ports would meet earlier \
         connections' TIME_WAITs and wait out SYN retransmissions. \
         {} rounds of {} s per case at each size (TCP_CRR: as many connections as the path's \
         first run made in that time, at most {}); within a round the datapaths alternate test \
         by test. Each ratio is the geometric mean of the rounds' ratios with its 95% \
         confidence interval in brackets (Student's t on the logarithms of the paired \
         rounds). {}\n",
        results.runs,
        results.seconds,
        super::max_crr_connections(),
        crate::cpus::netperf_note(),
    );
    for (path, base) in [(POD, OFF), (NODE, IPTABLES)] {
        if !results.samples.iter().any(|s| s.path == path) {
            continue;
        }
        let _ = writeln!(
            md,
            "\n### {path}\n\n| test | services | direct | {ON} / direct | {base} / direct | \
             {ON} / {base} | {ON} / {AGENTS} |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for test in TESTS.map(|t| t.name()) {
            for &n in &results.sizes {
                let rates: Vec<f64> = results
                    .samples
                    .iter()
                    .filter(|s| {
                        s.path == path && s.test == test && s.datapath == DIRECT && s.services == n
                    })
                    .map(|s| s.rate)
                    .collect();
                let direct = if rates.is_empty() {
                    "–".to_owned()
                } else {
                    let unit = if test == "TCP_STREAM" { "Mb/s" } else { "/s" };
                    format!(
                        "{:.0} {unit}",
                        rates.iter().sum::<f64>() / rates.len() as f64
                    )
                };
                let cell = |of: &str, to: &str| {
                    find(c, path, test, n, of, to).map_or("–".to_owned(), |x| x.ratio.text())
                };
                let _ = writeln!(
                    md,
                    "| {test} | {n} | {direct} | {} | {} | {} | {} |",
                    cell(ON, DIRECT),
                    cell(base, DIRECT),
                    cell(ON, base),
                    cell(ON, AGENTS)
                );
            }
        }
        let _ = writeln!(
            md,
            "\nTCP_CRR transaction latency, µs, p50 / p99 (median over the rounds):\n\n\
             | services | {ON} | {base} | {AGENTS} | {DIRECT} |\n|---:|---:|---:|---:|---:|"
        );
        for &n in &results.sizes {
            let mut row = format!("| {n} |");
            for dp in [ON, base, AGENTS, DIRECT] {
                let pick = |f: fn(&Sample) -> Option<f64>| {
                    let mut v: Vec<f64> = results
                        .samples
                        .iter()
                        .filter(|s| {
                            s.path == path
                                && s.test == "TCP_CRR"
                                && s.datapath == dp
                                && s.services == n
                        })
                        .filter_map(f)
                        .collect();
                    v.sort_by(f64::total_cmp);
                    v.get(v.len() / 2).copied()
                };
                let text = match (pick(|s| s.p50_us), pick(|s| s.p99_us)) {
                    (Some(p50), Some(p99)) => format!("{p50:.0} / {p99:.0}"),
                    _ => "–".into(),
                };
                let _ = write!(row, " {text} |");
            }
            let _ = writeln!(md, "{row}");
        }
    }
    let goals = goals(c);
    if !goals.is_empty() {
        md.push_str("\n| goal | this run | |\n|---|---|---|\n");
        for g in &goals {
            md.push_str(&g.row());
        }
    }
    for s in &results.skipped {
        let _ = writeln!(
            md,
            "\n**Not measured:** {} at {} services: {}",
            s.datapath, s.services, s.reason
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(
        path: &'static str,
        test: &'static str,
        dp: &str,
        n: u32,
        run: usize,
        rate: f64,
    ) -> Sample {
        Sample {
            datapath: dp.into(),
            path,
            test,
            services: n,
            run,
            rate,
            unit: String::new(),
            p50_us: Some(40.0 + run as f64),
            p90_us: None,
            p99_us: Some(100.0),
            cpu_us_per_unit: 0.0,
            softirq_us_per_unit: 0.0,
        }
    }

    /// Every test at every goal size over three rounds: direct at 100, 200, 100 (a machine
    /// drifting), the hooks at `on` times direct, the baseline at 0.9 times, direct with the
    /// agents running at 0.95.
    fn results(path: &'static str, on: f64) -> SocketLbResults {
        let base = if path == POD { OFF } else { IPTABLES };
        let mut samples = Vec::new();
        for n in GOAL_SIZES {
            for test in TESTS.map(|t| t.name()) {
                for (run, direct) in [100.0, 200.0, 100.0].into_iter().enumerate() {
                    samples.push(sample(path, test, DIRECT, n, run, direct));
                    samples.push(sample(path, test, ON, n, run, direct * on));
                    samples.push(sample(path, test, base, n, run, direct * 0.9));
                    samples.push(sample(path, test, AGENTS, n, run, direct * 0.95));
                }
            }
        }
        SocketLbResults {
            sizes: GOAL_SIZES.to_vec(),
            runs: 3,
            seconds: 1,
            samples,
            skipped: Vec::new(),
            setup_times: Vec::new(),
            took_s: 0.0,
        }
    }

    #[test]
    fn rounds_are_paired_so_a_drift_cancels() {
        let r = results(POD, 0.99);
        let c = comparisons(&r.samples);
        let on = find(&c, POD, "TCP_CRR", 1_000, ON, DIRECT).unwrap();
        assert!((on.ratio.ratio - 0.99).abs() < 1e-9);
        assert!((on.ratio.low.unwrap() - 0.99).abs() < 1e-9);
        assert_eq!(on.ratio.pairs, 3);
        let over_off = find(&c, POD, "TCP_RR", 1, ON, OFF).unwrap();
        assert!((over_off.ratio.ratio - 1.1).abs() < 1e-9);
        let hooks_alone = find(&c, POD, "TCP_STREAM", 10_000, ON, AGENTS).unwrap();
        assert!((hooks_alone.ratio.ratio - 0.99 / 0.95).abs() < 1e-9);
        // Only the hooks are compared with the baselines.
        assert!(find(&c, POD, "TCP_RR", 1, OFF, ON).is_none());
        assert!(find(&c, POD, "TCP_RR", 1, OFF, DIRECT).is_some());
    }

    #[test]
    fn a_goal_is_met_only_when_every_size_clears_the_floor() {
        let met = goals(&comparisons(&results(NODE, 0.99).samples));
        assert_eq!(met.len(), 3);
        assert!(
            met.iter().all(|g| g.met),
            "{:?}",
            met.iter().map(|g| &g.figures).collect::<Vec<_>>()
        );
        assert!(met[0].what.starts_with("node -> ClusterIP: TCP_CRR"));
        assert!(met[0].figures.contains("0.99 [0.99, 0.99] at 10000"));

        let missed = goals(&comparisons(&results(NODE, 0.97).samples));
        assert!(missed.iter().all(|g| !g.met));

        // One size missing: not met, and said so.
        let mut r = results(POD, 1.0);
        r.samples.retain(|s| s.services != 10_000);
        let g = goals(&comparisons(&r.samples));
        assert!(g.iter().all(|g| !g.met));
        assert!(g[0].figures.ends_with("not measured at 10000"));
    }

    #[test]
    fn an_interval_that_reaches_below_the_floor_misses() {
        // Rounds at 1.05 and 0.95 of direct: the mean is about 1, the interval is wide.
        let mut samples = Vec::new();
        for n in GOAL_SIZES {
            for (run, on) in [1.05, 0.95].into_iter().enumerate() {
                samples.push(sample(POD, "TCP_CRR", DIRECT, n, run, 100.0));
                samples.push(sample(POD, "TCP_CRR", ON, n, run, 100.0 * on));
            }
        }
        let g = goals(&comparisons(&samples));
        assert!(!g[0].met);
        assert!(g[1].figures.starts_with("not measured"));
    }

    #[test]
    fn the_section_shows_each_path_with_its_baseline() {
        let mut r = results(POD, 1.0);
        r.samples.extend(results(NODE, 1.0).samples);
        let md = markdown(&r, &comparisons(&r.samples));
        assert!(md.starts_with("## Socket-level balancing"));
        assert!(md.contains("### pod -> ClusterIP"));
        assert!(md.contains("| socket LB on / per packet |"));
        assert!(md.contains("### node -> ClusterIP"));
        assert!(md.contains("| socket LB on / iptables |"));
        assert!(md.contains(
            "| TCP_CRR | 1000 | 133 /s | 1.00 [1.00, 1.00] | 0.90 [0.90, 0.90] | 1.11 [1.11, 1.11] | 1.05 [1.05, 1.05] |"
        ));
        // p50 median over the rounds (40, 41, 42), p99 100.
        assert!(md.contains("| 1 | 41 / 100 | 41 / 100 | 41 / 100 | 41 / 100 |"));
        assert_eq!(md.matches("| met |").count(), 6);
    }
}
