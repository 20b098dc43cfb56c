//! The agent's control plane: a full sync of many services from a YAML source, the latency from
//! an endpoint change to the maps, and the agent's peak memory. The real `lb-agent` binary runs
//! in a network namespace of its own, against a private bpffs.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb::maps::Maps;
use lb_common::{
    Be16, Be32,
    maps::{ServiceKey, scope},
    net::proto,
};
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

/// Writes the source directory: one file per service (its Service and EndpointSlice).
fn write_source(dir: &Path, services: u32, endpoints: u32) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(
        dir.join("node.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-0}\nstatus:\n  addresses: [{type: InternalIP, address: 192.168.0.2}]\n",
    )?;
    for i in 0..services {
        fs::write(
            dir.join(format!("svc-{i}.yaml")),
            format!("{}---\n{}", service_yaml(i), slice_yaml(i, endpoints, None)),
        )?;
    }
    Ok(())
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Run {
    dir: PathBuf,
    bpffs: PathBuf,
    child: Option<Child>,
    _ns: Netns,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(path) = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: detaching the bpffs this run mounted.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
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

fn first_sync_seconds(log: &str) -> f64 {
    log.lines()
        .find(|l| l.contains("first full sync done"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("seconds="))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs the agent over `services` services of `endpoints` endpoints and measures it.
pub fn run(
    agent: &Path,
    services: u32,
    endpoints: u32,
    changes: usize,
    table_size: u32,
    progress: &mut dyn FnMut(&str),
) -> Result<AgentFigures> {
    let dir = std::env::temp_dir().join(format!("lb-bench-agent-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let source = dir.join("source");
    let bpffs = dir.join("bpffs");
    progress(&format!(
        "agent: writing {services} services x {endpoints} endpoints"
    ));
    write_source(&source, services, endpoints)?;
    let ns = Netns::new(lb_testbed::netns::unique_prefix("agent"))?;
    let log_path = dir.join("agent.log");
    let log = fs::File::create(&log_path)?;
    let mut run = Run {
        dir: dir.clone(),
        bpffs: bpffs.clone(),
        child: None,
        _ns: ns,
    };
    let ns = &run._ns;

    progress("agent: full sync");
    let started = Instant::now();
    let child = ns
        .command(agent.to_str().context("agent path")?)
        .args([
            "--source",
            source.to_str().unwrap(),
            "--node-name",
            "node-0",
            "--bpffs-dir",
            bpffs.to_str().unwrap(),
        ])
        .args([
            "--maglev-table-size",
            &table_size.to_string(),
            "--max-services",
            &(services + 1024).next_power_of_two().to_string(),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting lb-agent")?;
    let pid = child.id();
    run.child = Some(child);
    loop {
        if http_status(ns, 10256, "/readyz") == Some(200) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "the agent did not become ready: {}",
                fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let start_to_ready = started.elapsed().as_secs_f64();
    let first_sync = first_sync_seconds(&fs::read_to_string(&log_path).unwrap_or_default());

    progress(&format!("agent: {changes} endpoint changes"));
    let maps = Maps::open_pinned(&bpffs).context("the agent's maps")?;
    let mut latencies = Vec::with_capacity(changes);
    for n in 0..changes {
        let i = (n as u32 * 7919) % services;
        let key = ServiceKey {
            addr: Be32::from(cluster_ip(i)),
            port: Be16::from_host(80),
            proto: proto::TCP,
            scope: scope::INTERNAL,
        };
        let before = maps
            .services
            .get(&key, 0)
            .context("service entry")?
            .backend_count;
        // Drop one endpoint, then wait for the service entry to show one backend fewer.
        let path = source.join(format!("svc-{i}.yaml"));
        let tmp = dir.join("tmp.yaml");
        fs::write(
            &tmp,
            format!(
                "{}---\n{}",
                service_yaml(i),
                slice_yaml(i, endpoints, Some(n as u32 % endpoints))
            ),
        )?;
        let t = Instant::now();
        fs::rename(&tmp, &path)?;
        loop {
            if maps
                .services
                .get(&key, 0)
                .is_ok_and(|v| v.backend_count == before - 1)
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("change {n} never reached the maps");
            }
            std::thread::yield_now();
        }
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        // Restore it (not timed) before the next change.
        fs::write(
            &tmp,
            format!("{}---\n{}", service_yaml(i), slice_yaml(i, endpoints, None)),
        )?;
        fs::rename(&tmp, &path)?;
        let restore = Instant::now();
        while !maps
            .services
            .get(&key, 0)
            .is_ok_and(|v| v.backend_count == before)
        {
            if restore.elapsed() > Duration::from_secs(10) {
                bail!("restoring change {n} never reached the maps");
            }
            std::thread::yield_now();
        }
    }
    latencies.sort_by(f64::total_cmp);
    let peak = peak_rss_mib(pid);
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
