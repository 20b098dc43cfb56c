//! The agent's control plane: a full sync of many services from a YAML source, the latency from
//! an endpoint change to the maps, and the agent's peak memory. The real `lb-agent` binary runs
//! in a network namespace of its own, against a private bpffs.
//!
//! [`Agent`] drives one agent process (also used by the control-plane comparison); [`run`] is the
//! agent benchmark of services with several endpoints each.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{
    Be16, Be32,
    maps::{FrontendKey, scope},
    net::proto,
};
use lb_datapath::maps::Maps;
use lb_testbed::Netns;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct AgentFigures {
    pub services: u32,
    pub endpoints_per_service: u32,
    pub table_size: u32,
    /// From process start to /readyz answering 200 (load, parse, translate, program).
    pub start_to_ready_s: f64,
    /// The first sync alone, as the agent reports it (translate, plan, write).
    pub first_sync_s: f64,
    pub change_latency_p50_ms: f64,
    pub change_latency_p99_ms: f64,
    pub changes: usize,
    pub peak_rss_mib: f64,
}

/// The agent's `--healthz-addr` port (its default).
const HEALTHZ_PORT: u16 = 10256;

/// One `lb-agent` process over a YAML source directory, in a network namespace of its own with
/// a private bpffs; everything (process, bpffs mount, files, namespace) goes on drop.
pub struct Agent {
    dir: PathBuf,
    source: PathBuf,
    bpffs: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    started: Option<Instant>,
    ns: Netns,
}

impl Agent {
    /// A namespace and an empty source directory; no process yet.
    pub fn prepare(tag: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-bench-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        let source = dir.join("source");
        fs::create_dir_all(&source)
            .with_context(|| format!("cannot create {}", source.display()))?;
        let ns = match Netns::new(lb_testbed::netns::unique_prefix("agent")) {
            Ok(ns) => ns,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Self {
            bpffs: dir.join("bpffs"),
            log: dir.join("agent.log"),
            source,
            dir,
            child: None,
            started: None,
            ns,
        })
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Writes `name` in the source directory (before the start, or as a change while running).
    pub fn write(&self, name: &str, contents: &str) -> Result<()> {
        let path = self.source.join(name);
        fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Replaces `name` atomically (written aside, then renamed over it: one inotify event);
    /// returns the instant just before the rename, the moment the change exists.
    pub fn replace(&self, name: &str, contents: &str) -> Result<Instant> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
        let at = Instant::now();
        fs::rename(&tmp, self.source.join(name)).context("renaming into the source")?;
        Ok(at)
    }

    /// Starts `bin --source <dir> --node-name <node> --bpffs-dir <bpffs> <extra...>`.
    pub fn start(&mut self, bin: &Path, node_name: &str, extra: &[String]) -> Result<()> {
        let log = fs::File::create(&self.log)?;
        let mut cmd: Command = self.ns.command(bin.to_str().context("agent path")?);
        cmd.arg("--source")
            .arg(&self.source)
            .args(["--node-name", node_name])
            .arg("--bpffs-dir")
            .arg(&self.bpffs)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.started = Some(Instant::now());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits for /readyz to answer 200; returns the time since [`Agent::start`], or `None` when
    /// `timeout` passed first. Fails when the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Option<Duration>> {
        let started = self.started.context("the agent was not started")?;
        loop {
            if http_status(&self.ns, HEALTHZ_PORT, "/readyz") == Some(200) {
                return Ok(Some(started.elapsed()));
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!("the agent exited ({status}): {}", self.log_tail());
            }
            if started.elapsed() > timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The first full sync's duration, from the agent's log line `first full sync done`.
    pub fn first_sync_s(&self) -> Option<f64> {
        first_sync_seconds(&self.log())
    }

    /// The agent's pinned maps, opened from its bpffs.
    pub fn maps(&self) -> Result<Maps> {
        Maps::open_pinned(&self.bpffs).context("the agent's maps")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Peak resident set size (VmHWM) so far, MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        self.pid().and_then(peak_rss_mib)
    }

    /// Kernel memory of the BPF maps the agent holds open (see [`MapMemory`]).
    pub fn map_memory(&self) -> Result<Vec<MapMemory>> {
        map_memory(self.pid().context("the agent was not started")?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(path) = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: detaching the bpffs the agent mounted there (a no-op when none is).
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One BPF map and the kernel memory it takes.
#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub id: u32,
    /// From `bpftool -j map show` (empty when bpftool is missing).
    pub name: String,
    pub map_type: u32,
    pub max_entries: u32,
    /// `memlock` of the map's fdinfo: the kernel's own estimate of the map's memory (its
    /// `bytes_memlock` in bpftool).
    pub bytes: u64,
}

/// The BPF maps process `pid` holds descriptors of (each map once), from `/proc/<pid>/fdinfo`.
pub fn map_memory(pid: u32) -> Result<Vec<MapMemory>> {
    let mut maps: BTreeMap<u32, MapMemory> = BTreeMap::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for entry in fs::read_dir(&fd_dir).with_context(|| format!("cannot list {fd_dir}"))? {
        let Ok(entry) = entry else { continue };
        let is_map = fs::read_link(entry.path())
            .is_ok_and(|t| t.as_os_str().as_encoded_bytes() == b"anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(text) = fs::read_to_string(&fdinfo) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(bytes)) = (field("map_id"), field("memlock")) else {
            continue;
        };
        maps.entry(id as u32).or_insert(MapMemory {
            id: id as u32,
            name: String::new(),
            map_type: field("map_type").unwrap_or(0) as u32,
            max_entries: field("max_entries").unwrap_or(0) as u32,
            bytes,
        });
    }
    // Names, from one `bpftool -j map show`.
    let listed = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = listed
        && let Ok(serde_json::Value::Array(all)) = serde_json::from_slice(&out.stdout)
    {
        for m in all {
            let id = m.get("id").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
            if let Some(mm) = maps.get_mut(&id) {
                mm.name = m
                    .get("name")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned();
            }
        }
    }
    Ok(maps.into_values().collect())
}

fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn endpoint(i: u32, e: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + e)
}

fn slice_yaml(i: u32, endpoints: u32, skip: Option<u32>) -> String {
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for e in (0..endpoints).filter(|e| Some(*e) != skip) {
        out.push_str(&format!(
            "- addresses: [{}]\n  conditions: {{ready: true}}\n  nodeName: node-{}\n",
            endpoint(i, e),
            e % 3
        ));
    }
    out
}

fn service_yaml(i: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec:\n  clusterIP: {}\n  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]\n",
        cluster_ip(i)
    )
}

/// A Node object (the agent's own node, for its addresses).
pub fn node_yaml(name: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n"
    )
}

/// Writes the source directory: one file per service (its Service and EndpointSlice).
fn write_source(agent: &Agent, services: u32, endpoints: u32) -> Result<()> {
    agent.write(
        "node.yaml",
        &node_yaml("node-0", Ipv4Addr::new(192, 168, 0, 2)),
    )?;
    for i in 0..services {
        agent.write(
            &format!("svc-{i}.yaml"),
            &format!("{}---\n{}", service_yaml(i), slice_yaml(i, endpoints, None)),
        )?;
    }
    Ok(())
}

/// VmHWM of process `pid`, MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    Some(kib / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn http_status(ns: &Netns, port: u16, path: &'static str) -> Option<u16> {
    ns.enter(move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_millis(200),
        )
        .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        r.split_whitespace().nth(1)?.parse().ok()
    })
    .ok()
    .flatten()
}

fn first_sync_seconds(log: &str) -> Option<f64> {
    log.lines()
        .find(|l| l.contains("first full sync done"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("seconds="))
        })
        .and_then(|v| v.parse().ok())
}

/// The ClusterIP frontend of `ip:port/TCP` in the services map.
pub fn cluster_ip_key(ip: Ipv4Addr, port: u16) -> FrontendKey {
    FrontendKey {
        addr: Be32::from(ip),
        port: Be16::from_host(port),
        proto: proto::TCP,
        scope: scope::INTERNAL,
    }
}

/// Waits until `check` holds of the service entry at `key` (polling every 100 µs, which leaves
/// the CPU to the agent); returns false after `timeout`.
pub fn wait_for_service(
    maps: &Maps,
    key: &FrontendKey,
    timeout: Duration,
    check: impl Fn(&lb_common::maps::Frontend) -> bool,
) -> bool {
    let start = Instant::now();
    loop {
        if maps.services.get(key, 0).is_ok_and(|v| check(&v)) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Runs the agent over `services` services of `endpoints` endpoints and measures it.
pub fn run(
    agent_bin: &Path,
    services: u32,
    endpoints: u32,
    changes: usize,
    table_size: u32,
    progress: &mut dyn FnMut(&str),
) -> Result<AgentFigures> {
    progress(&format!(
        "agent: writing {services} services x {endpoints} endpoints"
    ));
    let mut agent = Agent::prepare("agent")?;
    write_source(&agent, services, endpoints)?;

    progress("agent: full sync");
    agent.start(
        agent_bin,
        "node-0",
        &[
            "--maglev-table-size".into(),
            table_size.to_string(),
            "--max-services".into(),
            (services + 1024).next_power_of_two().to_string(),
        ],
    )?;
    let start_to_ready = agent
        .wait_ready(Duration::from_secs(300))?
        .with_context(|| format!("the agent did not become ready: {}", agent.log_tail()))?
        .as_secs_f64();
    let first_sync = agent.first_sync_s().unwrap_or(f64::NAN);

    progress(&format!("agent: {changes} endpoint changes"));
    let maps = agent.maps()?;
    let mut latencies = Vec::with_capacity(changes);
    for n in 0..changes {
        let i = (n as u32 * 7919) % services;
        let key = cluster_ip_key(cluster_ip(i), 80);
        let before = maps
            .services
            .get(&key, 0)
            .context("service entry")?
            .backend_count;
        // Drop one endpoint, then wait for the service entry to show one backend fewer.
        let file = format!("svc-{i}.yaml");
        let t = agent.replace(
            &file,
            &format!(
                "{}---\n{}",
                service_yaml(i),
                slice_yaml(i, endpoints, Some(n as u32 % endpoints))
            ),
        )?;
        if !wait_for_service(&maps, &key, Duration::from_secs(10), |v| {
            v.backend_count == before - 1
        }) {
            bail!("change {n} never reached the maps");
        }
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        // Restore it (not timed) before the next change.
        agent.replace(
            &file,
            &format!("{}---\n{}", service_yaml(i), slice_yaml(i, endpoints, None)),
        )?;
        if !wait_for_service(&maps, &key, Duration::from_secs(10), |v| {
            v.backend_count == before
        }) {
            bail!("restoring change {n} never reached the maps");
        }
    }
    latencies.sort_by(f64::total_cmp);
    let peak = agent.peak_rss_mib().unwrap_or(f64::NAN);
    Ok(AgentFigures {
        services,
        endpoints_per_service: endpoints,
        table_size,
        start_to_ready_s: start_to_ready,
        first_sync_s: first_sync,
        change_latency_p50_ms: percentile(&latencies, 50.0),
        change_latency_p99_ms: percentile(&latencies, 99.0),
        changes,
        peak_rss_mib: peak,
    })
}
