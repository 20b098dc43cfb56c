//! The control plane compared: programming N Services from scratch and applying one endpoint
//! change, for our agent and for kube-proxy's iptables and nftables modes, with the same
//! Services (N ClusterIP Services with one endpoint each, [`kubeproxy::fillers`]).
//!
//! - **ours**: the real `lb-agent` over a source directory of JSON files (one file per Service:
//!   a `List` of it and its EndpointSlice in the API server's encoding, much as the API server
//!   sends them), in a network namespace of its own with a
//!   private bpffs. From scratch: process start to `/readyz` answering 200 (load the datapath,
//!   read and parse N files, translate, program), and the first full sync alone as the agent logs
//!   it. A change: from the rename of the changed Service's file to the services map showing the
//!   new backend count (polled every 100 µs), i.e. inotify, parsing, translation, planning and the
//!   map writes. Then the agent's peak RSS and the kernel memory of its BPF maps.
//! - **iptables / nftables**: kube-proxy's ruleset ([`kubeproxy::iptables::full_ruleset`],
//!   [`kubeproxy::nftables::ruleset`]) loaded with `iptables-restore --noflush` / `nft -f` into a
//!   fresh namespace (the command's wall time); a change is kube-proxy's partial sync
//!   ([`measure::one_endpoint_change_in`]): what it reads back from the kernel (`read`, none in
//!   iptables' large-cluster mode) plus the restore of the changed chains (`write`). The texts
//!   are generated beforehand and not timed (kube-proxy's Go code is not what is measured), nor
//!   is the watch latency from the API server — both favour kube-proxy.
//!
//! Changes alternate: add a second endpoint to the middle Service, remove it again. Each
//! datapath gets `timeout` to program N Services and `timeout` again for its changes; what does
//! not finish is recorded as not completed (the command killed) rather than failing the run.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::{
    agent::{self, Agent, MapMemory},
    kubeproxy::{
        self, BenchService, EndpointChange, NodeConfig,
        measure::{self, Backend},
        with_endpoint_change,
    },
};

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Numbers of Services.
    pub sizes: Vec<usize>,
    /// Endpoint changes timed per datapath and size.
    pub changes: usize,
    /// Per datapath and size: the limit for programming from scratch, and again for the changes.
    pub timeout: Duration,
    /// Per kube-proxy datapath and size: no change starts after this much time of changes
    /// (kube-proxy's nftables takes seconds per change at 10k Services). Ours always makes all
    /// of its changes: its goal is judged on them.
    pub baseline_changes_budget: Duration,
    /// The `lb-agent` binary.
    pub agent_bin: PathBuf,
    /// The kube-proxy datapaths measured, in order.
    pub backends: Vec<Backend>,
    /// Whether our agent is measured.
    pub ours: bool,
}

impl Options {
    /// Every datapath: ours, iptables through this machine's default `iptables` variant, the
    /// other variant, nftables; 120 s limits; the agent found by [`find_agent`].
    pub fn new(sizes: &[usize], changes: usize) -> Result<Self> {
        Self::with_agent(sizes, changes, &find_agent()?)
    }

    /// [`Options::new`] with the given `lb-agent` binary.
    pub fn with_agent(sizes: &[usize], changes: usize, agent_bin: &Path) -> Result<Self> {
        let default = Backend::iptables_default()?;
        let other = if default == Backend::IptablesNft {
            Backend::IptablesLegacy
        } else {
            Backend::IptablesNft
        };
        Ok(Self {
            sizes: sizes.to_vec(),
            changes,
            timeout: Duration::from_secs(120),
            baseline_changes_budget: Duration::from_secs(120),
            agent_bin: agent_bin.to_owned(),
            backends: vec![default, other, Backend::Nftables],
            ours: true,
        })
    }
}

/// The `lb-agent` to run: `$LB_AGENT_BIN` when set, else the one next to the running
/// executable (the bench binary's case), else the newest one built in the workspace's `target/`
/// ([`lb_testbed::agents::agent_binary`]).
pub fn find_agent() -> Result<PathBuf> {
    if std::env::var_os(lb_testbed::agents::AGENT_BIN_VAR).is_none() {
        let sibling = std::env::current_exe()?.with_file_name("lb-agent");
        if sibling.is_file() {
            return Ok(sibling);
        }
    }
    lb_testbed::agents::agent_binary()
}

/// Every raw figure of the comparison.
#[derive(Clone, Debug, Serialize)]
pub struct ControlPlaneResults {
    /// `iptables -V`, e.g. `iptables v1.8.9 (nf_tables)`.
    pub iptables_version: String,
    /// `nft -v`.
    pub nft_version: String,
    /// The variant plain `iptables` is on this machine (kube-proxy's iptables mode would use
    /// it): `iptables-nft` or `iptables-legacy`.
    pub iptables_default: String,
    pub sizes: Vec<usize>,
    pub endpoints_per_service: usize,
    pub changes_requested: usize,
    pub timeout_s: f64,
    /// One per (datapath, size), in measurement order.
    pub figures: Vec<Figure>,
}

impl ControlPlaneResults {
    /// The figure of `datapath` (`ours`, `iptables-nft`, `iptables-legacy`, `nftables`) at
    /// `services`.
    pub fn get(&self, datapath: &str, services: usize) -> Option<&Figure> {
        self.figures
            .iter()
            .find(|f| f.datapath == datapath && f.services == services)
    }

    /// The datapaths measured, in order.
    pub fn datapaths(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for f in &self.figures {
            if !out.contains(&f.datapath) {
                out.push(f.datapath.clone());
            }
        }
        out
    }
}

/// One datapath at one size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figure {
    /// `ours`, `iptables-nft`, `iptables-legacy` or `nftables`.
    pub datapath: String,
    pub services: usize,
    /// Programming the Services from scratch finished within the limit.
    pub completed: bool,
    /// Programming from scratch: ours from process start to ready; kube-proxy the restore
    /// command's wall time. `None` when not completed.
    pub program_s: Option<f64>,
    /// Ours: the first full sync alone (translate, plan, write), from the agent's log.
    pub first_sync_s: Option<f64>,
    /// kube-proxy: size of the full ruleset text.
    pub ruleset_bytes: Option<usize>,
    /// kube-proxy: time this benchmark took to generate the text (not part of `program_s`).
    pub generate_s: Option<f64>,
    /// The endpoint changes (absent when programming did not complete).
    pub change: Option<Changes>,
    /// Ours: the agent's peak RSS (VmHWM) at the end, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Ours: the sum of `bytes` over `bpf_maps`.
    pub bpf_map_bytes: Option<u64>,
    /// Ours: the BPF maps the agent holds, after the full sync.
    pub bpf_maps: Vec<MapMemory>,
    /// Why the figure is incomplete, when it is.
    pub note: Option<String>,
}

/// Timed endpoint changes; every sample in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Changes {
    pub requested: usize,
    /// Fewer than requested when the limit was reached.
    pub completed: usize,
    /// What each change took (ours: file to map; kube-proxy: read + write).
    pub total_ms: Vec<f64>,
    /// kube-proxy: reading the kernel's state back (zero when skipped).
    pub read_ms: Vec<f64>,
    /// kube-proxy: applying the partial sync.
    pub write_ms: Vec<f64>,
    /// kube-proxy: size of the partial sync's text (the first change's).
    pub bytes: Option<usize>,
    /// Of `total_ms`, nearest rank (with 20 samples p99 is the largest).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Changes {
    fn new(requested: usize, total_ms: Vec<f64>) -> Self {
        let mut sorted = total_ms.clone();
        sorted.sort_by(f64::total_cmp);
        Self {
            requested,
            completed: total_ms.len(),
            p50_ms: nearest_rank(&sorted, 50.0),
            p99_ms: nearest_rank(&sorted, 99.0),
            max_ms: sorted.last().copied().unwrap_or(f64::NAN),
            total_ms,
            ..Self::default()
        }
    }
}

fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Measures every datapath at `sizes` (see [`Options::new`]).
pub fn run(
    sizes: &[usize],
    changes: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<ControlPlaneResults> {
    run_with(&Options::new(sizes, changes)?, progress)
}

pub fn run_with(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<ControlPlaneResults> {
    let mut results = ControlPlaneResults {
        iptables_version: measure::iptables_version()?,
        nft_version: measure::nft_version()?,
        iptables_default: Backend::iptables_default()?.name().to_owned(),
        sizes: opts.sizes.clone(),
        endpoints_per_service: 1,
        changes_requested: opts.changes,
        timeout_s: opts.timeout.as_secs_f64(),
        figures: Vec::new(),
    };
    let cfg = NodeConfig::default();
    for &n in &opts.sizes {
        let services = kubeproxy::fillers(n, 1);
        let index = n / 2;
        if opts.ours {
            progress(&format!("controlplane: ours, {n} services"));
            let figure = ours(opts, &services, &cfg, index, progress)
                .with_context(|| format!("ours at {n} services"))?;
            report(&figure, progress);
            results.figures.push(figure);
        }
        for &backend in &opts.backends {
            progress(&format!("controlplane: {}, {n} services", backend.name()));
            let figure = kube_proxy(opts, backend, &services, &cfg, index, progress)
                .with_context(|| format!("{} at {n} services", backend.name()))?;
            report(&figure, progress);
            results.figures.push(figure);
        }
    }
    Ok(results)
}

fn report(f: &Figure, progress: &mut dyn FnMut(&str)) {
    let program = match f.program_s {
        Some(s) => format!("{s:.3} s"),
        None => "not completed".to_owned(),
    };
    let change = match &f.change {
        Some(c) if c.completed > 0 => format!(
            "; change p50 {:.1} ms, p99 {:.1} ms ({}/{})",
            c.p50_ms, c.p99_ms, c.completed, c.requested
        ),
        _ => String::new(),
    };
    let memory = match (f.peak_rss_mib, f.bpf_map_bytes) {
        (Some(rss), Some(bytes)) => format!(
            "; peak RSS {rss:.1} MiB, BPF maps {:.1} MiB",
            bytes as f64 / (1 << 20) as f64
        ),
        _ => String::new(),
    };
    let note = f
        .note
        .as_ref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    progress(&format!(
        "controlplane: {} {} services: program {program}{change}{memory}{note}",
        f.datapath, f.services
    ));
}

/// kube-proxy in `backend`'s mode.
fn kube_proxy(
    opts: &Options,
    backend: Backend,
    services: &[BenchService],
    cfg: &NodeConfig,
    index: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Figure> {
    let n = services.len();
    let mut figure = Figure {
        datapath: backend.name().to_owned(),
        services: n,
        ..Figure::default()
    };
    let start = Instant::now();
    let text = Arc::new(backend.full_ruleset(services, cfg));
    figure.generate_s = Some(start.elapsed().as_secs_f64());
    figure.ruleset_bytes = Some(text.len());
    let ns = measure::fresh_netns()?;
    let Some(took) = measure::apply_with_timeout(&ns, backend, text, opts.timeout)? else {
        figure.note = Some(format!(
            "programming {n} services did not finish in {:.0} s",
            opts.timeout.as_secs_f64()
        ));
        return Ok(figure);
    };
    figure.completed = true;
    figure.program_s = Some(took.as_secs_f64());
    if opts.changes == 0 || n == 0 {
        return Ok(figure);
    }
    progress(&format!(
        "controlplane: {} programmed {n} services in {:.3} s; {} endpoint changes",
        backend.name(),
        took.as_secs_f64(),
        opts.changes
    ));
    let budget = opts.baseline_changes_budget.min(opts.timeout);
    let timings = measure::one_endpoint_change_in(
        &ns,
        backend,
        services,
        cfg,
        index,
        opts.changes,
        Some(budget),
    )?;
    let mut change = Changes::new(
        opts.changes,
        timings.iter().map(|t| ms(t.total())).collect(),
    );
    change.read_ms = timings.iter().map(|t| ms(t.read)).collect();
    change.write_ms = timings.iter().map(|t| ms(t.write)).collect();
    change.bytes = timings.first().map(|t| t.bytes);
    if change.completed < change.requested {
        figure.note = Some(format!(
            "{} of {} changes in the {:.0} s allowed",
            change.completed,
            change.requested,
            budget.as_secs_f64()
        ));
    }
    figure.change = Some(change);
    Ok(figure)
}

/// Our agent.
fn ours(
    opts: &Options,
    services: &[BenchService],
    cfg: &NodeConfig,
    index: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Figure> {
    let n = services.len();
    let mut figure = Figure {
        datapath: "ours".to_owned(),
        services: n,
        ..Figure::default()
    };
    let mut agent = Agent::prepare("cp")?;
    agent.write("node.yaml", &agent::node_yaml(&cfg.node_name, cfg.node_ip))?;
    for (i, svc) in services.iter().enumerate() {
        agent.write(&file_name(i), &source_text(std::slice::from_ref(svc), cfg)?)?;
    }
    agent.start(
        &opts.agent_bin,
        &cfg.node_name,
        &[
            "--max-services".into(),
            (n + 1024).next_power_of_two().to_string(),
        ],
    )?;
    let Some(ready) = agent.wait_ready(opts.timeout)? else {
        figure.note = Some(format!(
            "the agent was not ready with {n} services in {:.0} s",
            opts.timeout.as_secs_f64()
        ));
        figure.peak_rss_mib = agent.peak_rss_mib();
        return Ok(figure);
    };
    figure.completed = true;
    figure.program_s = Some(ready.as_secs_f64());
    figure.first_sync_s = agent.first_sync_s();
    let maps = agent.map_memory()?;
    figure.bpf_map_bytes = Some(maps.iter().map(|m| m.bytes).sum());
    figure.bpf_maps = maps;

    if opts.changes > 0 && n > 0 {
        progress(&format!(
            "controlplane: ours ready with {n} services in {:.3} s; {} endpoint changes",
            ready.as_secs_f64(),
            opts.changes
        ));
        let (samples, note) = agent_changes(&agent, services, cfg, index, opts)?;
        let change = Changes::new(opts.changes, samples);
        figure.note = note;
        figure.change = Some(change);
    }
    figure.peak_rss_mib = agent.peak_rss_mib();
    Ok(figure)
}

fn file_name(i: usize) -> String {
    format!("svc-{i}.json")
}

/// The objects of `services` as the agent reads them here: one JSON `List`, the API server's
/// encoding (the agent decodes JSON with a JSON parser, several times faster than YAML).
fn source_text(services: &[BenchService], cfg: &NodeConfig) -> Result<String> {
    lb_testbed::manifests::json_list(&kubeproxy::manifests(services, cfg))
        .context("the bench's own manifests do not parse")
}

/// The agent's endpoint changes: milliseconds from the file's rename to the map.
fn agent_changes(
    agent: &Agent,
    services: &[BenchService],
    cfg: &NodeConfig,
    index: usize,
    opts: &Options,
) -> Result<(Vec<f64>, Option<String>)> {
    let extra = measure::extra_endpoint(services, index)?;
    let maps = agent.maps()?;
    let svc = &services[index];
    let port = svc.ports.first().context("a port")?.port;
    let key = agent::cluster_ip_key(svc.cluster_ip, port);
    let base = svc.endpoints.len() as u32;
    anyhow::ensure!(
        agent::wait_for_service(&maps, &key, Duration::from_secs(10), |v| v.backend_count
            == base),
        "the agent's map has no ClusterIP entry for {}/{} with {base} backend(s)",
        svc.namespace,
        svc.name
    );
    let started = Instant::now();
    let mut current = services.to_vec();
    let mut samples = Vec::with_capacity(opts.changes);
    for i in 0..opts.changes {
        if started.elapsed() >= opts.timeout {
            let note = format!(
                "{i} of {} changes in {:.0} s",
                opts.changes,
                opts.timeout.as_secs_f64()
            );
            return Ok((samples, Some(note)));
        }
        let (change, want) = if i % 2 == 0 {
            (EndpointChange::Add(extra), base + 1)
        } else {
            (EndpointChange::Remove(extra), base)
        };
        let next = with_endpoint_change(&current, index, change)?;
        let text = source_text(std::slice::from_ref(&next[index]), cfg)?;
        let at = agent.replace(&file_name(index), &text)?;
        if !agent::wait_for_service(&maps, &key, Duration::from_secs(10), |v| {
            v.backend_count == want
        }) {
            anyhow::bail!("change {i} ({change:?}) did not reach the maps in 10 s");
        }
        samples.push(ms(at.elapsed()));
        current = next;
    }
    Ok((samples, None))
}
