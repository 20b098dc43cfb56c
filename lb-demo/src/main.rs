//! `cargo xtask demo`, the README's first command: a two-node cluster in network namespaces with
//! the real `lb-agent` on each node, a three-replica `hostnames` Service and what the load
//! balancer does with its traffic (ClusterIP from a pod, NodePorts from an external client under
//! both external traffic policies, and `lbctl service list`). Everything lives in namespaces, a
//! bpffs and temporary directories created for the run, and is removed at the end, also after
//! Ctrl-C (see `lb_testbed::interrupt`). Depends on `lb-testbed` only: it runs the release
//! binaries `lb-agent` and `lbctl`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_testbed::{
    Agents, Cluster, SourceDir, interrupt,
    manifests::{
        Endpoint, EndpointSliceManifest, Protocol, ServiceManifest, ServicePort, ServiceType,
        TrafficPolicy, documents,
    },
    server,
};

/// Prints a line to stdout, ignoring errors (a closed terminal must not panic the demo halfway
/// through its clean-up).
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
    }};
}

/// The same, without the newline (a progress line, finished later).
macro_rules! say_partial {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = write!(out, $($arg)*);
        let _ = out.flush();
    }};
}

const HELP: &str = "\
lb-demo: the load balancer at work on a two-node Kubernetes-like cluster, in network namespaces.

It brings up a LAN with two nodes (node-0, node-1) and an external client, three pods running
the `hostnames` app (two on node-0, one on node-1) and a client pod, and runs the real lb-agent
on each node, reading the cluster's objects from YAML files:

  hostnames        ClusterIP 10.96.0.10:80, NodePort 30080, externalTrafficPolicy Cluster
  hostnames-local  NodePort 30081, externalTrafficPolicy Local (same three pods)

Then it shows which pods answer and the client address each pod sees: for the ClusterIP from the
client pod, and for both NodePorts from the external client through each node; and the agent's
view of the datapath (`lbctl service list`). Everything is removed at the end, also on Ctrl-C;
it takes a few seconds.

Run it with `cargo xtask demo` (it builds the release binaries first). It needs root, and
lb-agent and lbctl built next to it (target/release/).

Usage: lb-demo [--help]";

/// The Services' cluster IPs, ports and the pods' port.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 9376;
const NODE_PORT: u16 = 30_080;
const LOCAL_NODE_PORT: u16 = 30_081;

/// The `hostnames` pods and their nodes: both nodes have local endpoints.
const HOSTNAMES: [(&str, usize); 3] = [("hostnames-0", 0), ("hostnames-1", 0), ("hostnames-2", 1)];
/// The pod the ClusterIP is requested from, and its node.
const CLIENT_POD: (&str, usize) = ("client", 1);

/// Requests (each a new TCP connection, so a new Maglev choice) per measurement: enough that
/// every backend gets some (a miss among three is a (2/3)^30 event).
const REQUESTS: usize = 30;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Lines of each agent's log shown when something fails.
const LOG_TAIL: usize = 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let worker = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => false,
        ["--worker"] => true,
        ["--help" | "-h"] => {
            say!("{HELP}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("lb-demo: unexpected arguments {args:?}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let result = if worker { worker_main() } else { parent_main() };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks what can be checked before anything is built, then runs the demo in a worker process
/// (see [`interrupt`]) and exits as it does.
fn parent_main() -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo needs root (network namespaces, eBPF programs, a bpffs mount): run \
             `cargo xtask demo` as root"
        );
    }
    binaries()?;
    let exe = std::env::current_exe().context("cannot find the lb-demo executable")?;
    let mut worker = Command::new(exe);
    worker.arg("--worker");
    let status = interrupt::run_worker(worker)?;
    match status.code() {
        Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        None => bail!(
            "the demo was killed ({status}) before it could clean up: look for network \
             namespaces (`ip netns list`), mounts and directories under {} named lbt*",
            std::env::temp_dir().display()
        ),
    }
}

/// The release binaries the demo runs: lb-agent and lbctl, built next to lb-demo.
struct Binaries {
    agent: PathBuf,
    lbctl: PathBuf,
}

fn binaries() -> Result<Binaries> {
    let exe = std::env::current_exe().context("cannot find the lb-demo executable")?;
    let dir = exe.parent().context("lb-demo has no directory")?;
    let find = |name: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        ensure!(
            path.is_file(),
            "{} is missing: build it with `cargo build --release --bins` (`cargo xtask demo` \
             does that before running the demo)",
            path.display()
        );
        Ok(path)
    };
    Ok(Binaries {
        agent: find("lb-agent")?,
        lbctl: find("lbctl")?,
    })
}

fn worker_main() -> Result<ExitCode> {
    interrupt::install_in_worker()?;
    let started = Instant::now();
    let bins = binaries()?;
    say!(
        "lb demo: Kubernetes Services load-balanced by lb's eBPF datapath, on a two-node cluster \
         in network namespaces\n"
    );
    let result = Bed::up(&bins).and_then(|bed| {
        let shown = bed.show();
        if let Err(e) = &shown
            && !interrupt::is_interrupted(e)
        {
            bed.print_log_tails();
        }
        shown
        // The bed is dropped here: agents stopped and their pinned datapath removed, then the
        // namespaces and temporary directories.
    });
    let elapsed = started.elapsed().as_secs_f64();
    let left = leftovers();
    let cleaned = if left.is_empty() {
        "cleaned up".to_owned()
    } else {
        format!(
            "NOT cleaned up, left behind: {} (remove them with `ip netns del`, `umount`, `rm -r`)",
            left.join(", ")
        )
    };
    let code = match result {
        Ok(()) => {
            say!("\nDone in {elapsed:.1}s; {cleaned}.");
            ExitCode::SUCCESS
        }
        Err(e) if interrupt::is_interrupted(&e) => {
            say!("Interrupted after {elapsed:.1}s; {cleaned}.");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("\nlb-demo: error: {}", clip(&format!("{e:#}"), 25));
            eprintln!("(after {elapsed:.1}s; {cleaned})");
            ExitCode::FAILURE
        }
    };
    Ok(if left.is_empty() {
        code
    } else {
        ExitCode::FAILURE
    })
}

/// What this process's bed left behind: network namespaces, mounts and temporary directories
/// whose names start with the prefixes lb-testbed gives them (`lbt<tag><pid>-`, see
/// `lb_testbed::netns::unique_prefix`).
fn leftovers() -> Vec<String> {
    let pid = std::process::id();
    let ours = |name: &str| {
        name.strip_prefix("lbt")
            .and_then(|rest| rest.get(1..))
            .is_some_and(|rest| rest.starts_with(&format!("{pid}-")))
    };
    let mut left = Vec::new();
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| ours(name))
                    .collect()
            })
            .unwrap_or_default()
    };
    left.extend(
        names(Path::new("/run/netns"))
            .into_iter()
            .map(|n| format!("netns {n}")),
    );
    let tmp = std::env::temp_dir();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            .filter(|point| {
                Path::new(point)
                    .strip_prefix(&tmp)
                    .ok()
                    .and_then(|rest| rest.components().next())
                    .and_then(|first| first.as_os_str().to_str())
                    .is_some_and(ours)
            })
            .map(|point| format!("mount {point}")),
    );
    left.extend(
        names(&tmp)
            .into_iter()
            .map(|n| format!("{}", tmp.join(n).display())),
    );
    left
}

/// The cluster, its objects and its agents.
struct Bed {
    /// Dropped first: the agents stop (and their datapaths are removed) before the namespaces go.
    agents: Agents,
    _source: SourceDir,
    cluster: Cluster,
    lbctl: PathBuf,
}

/// Runs one setup step on a progress line.
fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    interrupt::check()?;
    say_partial!("  {what}... ");
    let started = Instant::now();
    match f() {
        Ok(value) => {
            say!("done ({:.1}s)", started.elapsed().as_secs_f64());
            // What the step built is dropped (and removed) if the demo was interrupted meanwhile.
            interrupt::check()?;
            Ok(value)
        }
        Err(e) => {
            say!("failed");
            Err(e)
        }
    }
}

impl Bed {
    fn up(bins: &Binaries) -> Result<Self> {
        say!("Setting up (a few seconds):");
        let mut cluster = step(
            "LAN 192.168.50.0/24 with node-0 (.10), node-1 (.11) and an external client (.2)",
            || Cluster::new(2),
        )?;
        let mut pod_ips = Vec::new();
        step(
            "pods hostnames-0, hostnames-1 on node-0, hostnames-2 and client on node-1",
            || {
                for (name, node) in HOSTNAMES {
                    pod_ips.push(cluster.add_hostnames_pod(node, name, POD_PORT)?);
                }
                cluster.add_pod(CLIENT_POD.1, CLIENT_POD.0)?;
                Ok(())
            },
        )?;
        let source = step(
            "Node, Service and EndpointSlice objects, as YAML files for the agents",
            || {
                let source = SourceDir::new()?;
                source.write("nodes.yaml", &cluster.node_manifests())?;
                source.write("hostnames.yaml", &services(&cluster, &pod_ips))?;
                Ok(source)
            },
        )?;
        let agents = step(
            "lb-agent on node-0 and node-1: datapath loaded, Services programmed",
            || Agents::start(&cluster, &bins.agent, source.path(), &[]),
        )?;
        say!("\nServices (over the three hostnames pods, port {POD_PORT}):");
        say!(
            "  hostnames        ClusterIP {CLUSTER_IP}:{SERVICE_PORT}, NodePort {NODE_PORT}, \
             externalTrafficPolicy Cluster"
        );
        say!(
            "  hostnames-local  NodePort {LOCAL_NODE_PORT}, externalTrafficPolicy Local \
             (ClusterIP {LOCAL_CLUSTER_IP})"
        );
        Ok(Self {
            agents,
            _source: source,
            cluster,
            lbctl: bins.lbctl.clone(),
        })
    }

    fn show(&self) -> Result<()> {
        let client_pod = self.cluster.pod(CLIENT_POD.0).ip;
        let external = self.cluster.client_ip();

        say!(
            "\nClusterIP: {REQUESTS} requests from pod {} ({client_pod}, on node-{}) to \
             {CLUSTER_IP}:{SERVICE_PORT}.\nEvery pod answers, and sees the client pod's own \
             address:",
            CLIENT_POD.0,
            CLIENT_POD.1
        );
        let target = SocketAddrV4::new(CLUSTER_IP, SERVICE_PORT);
        let ns = self.cluster.pod(CLIENT_POD.0).ns;
        let answers = ns.enter(move || requests(target))??;
        self.report("  ", &answers, |_| Some(client_pod))?;

        say!(
            "\nNodePort {NODE_PORT} (externalTrafficPolicy Cluster): {REQUESTS} requests from the \
             external client ({external})\nthrough each node. Every pod answers; a pod on \
             another node sees the node the client entered\n(source NAT, so that its replies go \
             back through that node):"
        );
        for node in 0..self.cluster.node_count() {
            let node_ip = self.cluster.node_ip(node);
            say!("  via node-{node} ({node_ip}:{NODE_PORT}):");
            let answers = self.external_requests(SocketAddrV4::new(node_ip, NODE_PORT))?;
            self.report("    ", &answers, |pod_node| {
                Some(if pod_node == node { external } else { node_ip })
            })?;
        }

        say!(
            "\nNodePort {LOCAL_NODE_PORT} (externalTrafficPolicy Local): the same, but each node \
             sends only to its own pods,\nand every pod sees the external client's address:"
        );
        for node in 0..self.cluster.node_count() {
            let node_ip = self.cluster.node_ip(node);
            say!("  via node-{node} ({node_ip}:{LOCAL_NODE_PORT}):");
            let answers = self.external_requests(SocketAddrV4::new(node_ip, LOCAL_NODE_PORT))?;
            self.report("    ", &answers, |pod_node| {
                (pod_node == node).then_some(external)
            })?;
        }

        interrupt::check()?;
        say!(
            "\n`lbctl service list` on node-0: the frontends the agent programmed and their \
             backends\n(Maglev slots, local or not), with the counters of each backend set (shared by a \
             Service's frontends):"
        );
        let out = Command::new(&self.lbctl)
            .arg("--bpffs-dir")
            .arg(self.agents.bpffs_dir(0))
            .args(["service", "list"])
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.lbctl.display()))?;
        ensure!(
            out.status.success(),
            "`lbctl service list` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            say!("  {}", line.trim_end());
        }
        Ok(())
    }

    /// [`REQUESTS`] requests from the external client to `target`.
    fn external_requests(&self, target: SocketAddrV4) -> Result<Vec<Answer>> {
        self.cluster.client().enter(move || requests(target))?
    }

    /// Prints one line per pod that answered, then checks the answers against `expected`: for a
    /// pod on node `n`, `expected(n)` is the address it must see, or `None` when it must not
    /// answer.
    fn report(
        &self,
        indent: &str,
        answers: &[Answer],
        expected: impl Fn(usize) -> Option<Ipv4Addr>,
    ) -> Result<()> {
        let mut by_pod = BTreeMap::<&str, (usize, BTreeSet<Ipv4Addr>)>::new();
        for answer in answers {
            let entry = by_pod.entry(&answer.pod).or_default();
            entry.0 += 1;
            entry.1.insert(answer.saw);
        }
        let mut problems = Vec::new();
        for (pod, (count, seen)) in &by_pod {
            let node = HOSTNAMES.iter().find(|(name, _)| name == pod).map(|p| p.1);
            let where_ = node.map_or_else(|| "?".to_owned(), |n| format!("node-{n}"));
            let seen_text = seen
                .iter()
                .map(|ip| format!("{ip:<13} ({})", self.who(*ip)))
                .collect::<Vec<_>>()
                .join(", ");
            say!("{indent}{pod} ({where_})  ×{count:<3} saw {seen_text}");
            match node.and_then(&expected) {
                None => problems.push(format!("{pod} answered, but should not have")),
                Some(ip) if seen.iter().any(|s| *s != ip) => {
                    problems.push(format!("{pod} should have seen only {ip}"));
                }
                Some(_) => {}
            }
        }
        for (pod, node) in HOSTNAMES {
            if expected(node).is_some() && !by_pod.contains_key(pod) {
                say!("{indent}{pod} (node-{node})  ×0");
                problems.push(format!("{pod} should have answered"));
            }
        }
        ensure!(
            problems.is_empty(),
            "not what the load balancer should do: {}",
            problems.join("; ")
        );
        Ok(())
    }

    /// Who an address seen by a pod is.
    fn who(&self, ip: Ipv4Addr) -> String {
        if ip == self.cluster.client_ip() {
            return "the external client".to_owned();
        }
        if ip == self.cluster.pod(CLIENT_POD.0).ip {
            return format!("pod {}", CLIENT_POD.0);
        }
        match (0..self.cluster.node_count()).find(|&i| self.cluster.node_ip(i) == ip) {
            Some(i) => format!("node-{i}, source NAT"),
            None => "?".to_owned(),
        }
    }

    fn print_log_tails(&self) {
        for i in 0..self.cluster.node_count() {
            let log = self.agents.log(i);
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "\n--- the last {} lines of node-{i}'s lb-agent log:",
                LOG_TAIL.min(lines.len())
            );
            for line in &lines[lines.len().saturating_sub(LOG_TAIL)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// The two Services over the three `hostnames` pods (at `pod_ips`, in [`HOSTNAMES`] order).
fn services(cluster: &Cluster, pod_ips: &[Ipv4Addr]) -> String {
    // The two differ only in name, addresses and traffic policy: a NodePort Service and its
    // EndpointSlice over every pod.
    let service = |name: &str, cluster_ip, node_port, policy| {
        let slice = HOSTNAMES.iter().zip(pod_ips).fold(
            EndpointSliceManifest::new(name).port("http", POD_PORT, Protocol::Tcp),
            |slice, ((_, node), ip)| slice.endpoint(Endpoint::ready(*ip, cluster.node_name(*node))),
        );
        [
            ServiceManifest::new(name, cluster_ip)
                .service_type(ServiceType::NodePort)
                .port(ServicePort::tcp("http", SERVICE_PORT, POD_PORT).node_port(node_port))
                .external_traffic_policy(policy)
                .yaml(),
            slice.yaml(),
        ]
    };
    documents(
        service("hostnames", CLUSTER_IP, NODE_PORT, TrafficPolicy::Cluster)
            .into_iter()
            .chain(service(
                "hostnames-local",
                LOCAL_CLUSTER_IP,
                LOCAL_NODE_PORT,
                TrafficPolicy::Local,
            )),
    )
}

/// A `hostnames` answer: the pod that answered and the client address it saw.
struct Answer {
    pod: String,
    saw: Ipv4Addr,
}

/// [`REQUESTS`] HTTP requests to `target`, each over a new connection, from the calling thread's
/// namespace. Stops at the first failure, or when the demo is interrupted.
fn requests(target: SocketAddrV4) -> Result<Vec<Answer>> {
    (0..REQUESTS)
        .map(|_| {
            interrupt::check()?;
            let body = server::http_get(target, REQUEST_TIMEOUT)
                .with_context(|| format!("no answer from {target}"))?;
            parse(&body).with_context(|| format!("unexpected answer from {target}: {body:?}"))
        })
        .collect()
}

/// "<pod> <client ip:port>".
fn parse(body: &str) -> Option<Answer> {
    let mut words = body.split_whitespace();
    let pod = words.next()?.to_owned();
    let saw: SocketAddrV4 = words.next()?.parse().ok()?;
    Some(Answer {
        pod,
        saw: *saw.ip(),
    })
}

/// `text`, with the middle left out when it has more than `max` lines (an agent's whole log
/// can be part of an error).
fn clip(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= max {
        return text.to_owned();
    }
    let head = 2.min(max);
    let tail = max - head;
    format!(
        "{}\n[... {} lines left out ...]\n{}",
        lines[..head].join("\n"),
        lines.len() - head - tail,
        lines[lines.len() - tail..].join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_hostnames_answer() {
        let answer = parse("hostnames-1 192.168.50.2:40312").unwrap();
        assert_eq!(answer.pod, "hostnames-1");
        assert_eq!(answer.saw, Ipv4Addr::new(192, 168, 50, 2));
        assert!(parse("hostnames-1").is_none());
        assert!(parse("").is_none());
    }

    #[test]
    fn clips_long_text_in_the_middle() {
        assert_eq!(clip("a\nb", 5), "a\nb");
        let long: Vec<String> = (1..=10).map(|i| i.to_string()).collect();
        assert_eq!(
            clip(&long.join("\n"), 5),
            "1\n2\n[... 5 lines left out ...]\n8\n9\n10"
        );
    }
}
