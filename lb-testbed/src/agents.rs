//! The real `lb-agent` on every node of a [`Cluster`], as a DaemonSet would run it: inside the
//! node's network namespace (`nsenter --net` only, so the bpffs it mounts is visible from the
//! host's mount namespace), with a private bpffs directory per node and one shared source
//! directory of YAML files.
//!
//! Dropping [`Agents`] kills the agents, removes what they pinned (`lb-agent cleanup`),
//! unmounts their bpffs and removes the bed's temporary directory.

use std::{
    fs::{self, File},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{Cluster, cgroup, netns, server, temp_dir::TempDir};

/// Where each agent serves /healthz and /readyz (kube-proxy's port), on every address of its
/// node.
pub const HEALTHZ_PORT: u16 = 10256;
/// Where each agent serves /metrics, on its node's loopback.
pub const METRICS_PORT: u16 = 10249;
/// The glob the agents attach to: the node-side veths of the bed's pods.
pub const POD_IFACES: &str = "lbpod*";
/// How long an agent may take to load its datapath and make its first full sync: well under a
/// second on a host, but the VM test's emulated 6.1 verifies the programs of two agents at once
/// on two emulated CPUs, 30 s and more on a busy machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an agent may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// Environment variable naming the agent binary to run, overriding the search in `target/`.
pub const AGENT_BIN_VAR: &str = "LB_AGENT_BIN";

/// Finds the `lb-agent` binary: `$LB_AGENT_BIN` when set, else the most recently built of
/// `<target>/release/lb-agent` and `<target>/debug/lb-agent`, `<target>` being
/// `$CARGO_TARGET_DIR` or the workspace's `target/`. (A test of this crate cannot use
/// `CARGO_BIN_EXE_lb-agent`: cargo only sets that for the binary's own package.)
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(AGENT_BIN_VAR) {
        let bin = PathBuf::from(bin);
        ensure!(
            bin.is_file(),
            "{AGENT_BIN_VAR}={} is not a file",
            bin.display()
        );
        return Ok(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("lb-testbed is not inside a workspace")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), |dir| workspace.join(dir));
    let candidates = ["release", "debug"].map(|profile| target.join(profile).join("lb-agent"));
    candidates
        .iter()
        .filter_map(|bin| {
            let built = fs::metadata(bin).and_then(|m| m.modified()).ok()?;
            Some((built, bin))
        })
        .max()
        .map(|(_, bin)| bin.clone())
        .with_context(|| {
            format!(
                "lb-agent is not built (looked for {} and {}): run `cargo build --bins` first \
                 (`cargo test --workspace` builds the debug ones), or set {AGENT_BIN_VAR}",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// Socket-level balancing for the agents ([`Agents::start_with_socket_lb`]): each agent gets
/// `--socket-lb <mode> --cgroup-root <its node's cgroup>`, so that its hooks serve the processes
/// of its node alone, never the host's or another node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketLb {
    /// The node's processes and its pods'.
    On,
    /// The node's processes; pods stay with the packet path.
    HostOnly,
}

impl SocketLb {
    /// The value of `--socket-lb`.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::HostOnly => "host-only",
        }
    }
}

/// One agent per node of a cluster.
pub struct Agents {
    bin: PathBuf,
    source: PathBuf,
    extra_args: Vec<String>,
    nodes: Vec<NodeAgent>,
    /// Holds the bpffs directories and logs; removed last, by `Drop`.
    dir: Option<TempDir>,
}

/// The agent of one node and where its state lives.
struct NodeAgent {
    name: String,
    /// The node's namespace handle: kept as a path, not a borrow of the [`Cluster`], so that a
    /// test can own both the cluster and its agents.
    netns_path: String,
    bpffs: PathBuf,
    log: PathBuf,
    /// The node's cgroup, when the cluster has cgroups: the agent runs in it, as a DaemonSet's
    /// pod runs below the node's root.
    cgroup: Option<PathBuf>,
    /// Arguments of this node's agent alone (after the shared ones).
    node_args: Vec<String>,
    child: Option<Child>,
}

impl Agents {
    /// Starts `agent_bin` on every node of `cluster`, reading objects from `source_dir`, with
    /// `extra_args` appended to each command line, and waits until every agent is ready.
    pub fn start(
        cluster: &Cluster,
        agent_bin: &Path,
        source_dir: &Path,
        extra_args: &[String],
    ) -> Result<Self> {
        Self::start_all(cluster, agent_bin, source_dir, extra_args, None)
    }

    /// [`Agents::start`] with socket-level balancing in `mode`, each agent's hooks on its own
    /// node's cgroup (the cluster must have them: [`Cluster::with_cgroups`]).
    pub fn start_with_socket_lb(
        cluster: &Cluster,
        agent_bin: &Path,
        source_dir: &Path,
        extra_args: &[String],
        mode: SocketLb,
    ) -> Result<Self> {
        Self::start_all(cluster, agent_bin, source_dir, extra_args, Some(mode))
    }

    fn start_all(
        cluster: &Cluster,
        agent_bin: &Path,
        source_dir: &Path,
        extra_args: &[String],
        socket_lb: Option<SocketLb>,
    ) -> Result<Self> {
        let dir = TempDir::new("a")?;
        let mut nodes = Vec::with_capacity(cluster.node_count());
        for (i, node) in cluster.nodes().iter().enumerate() {
            let cgroup = cluster.cgroups(i).map(|c| c.node.path().to_owned());
            let node_args = match (socket_lb, &cgroup) {
                (None, _) => Vec::new(),
                (Some(mode), Some(cgroup)) => vec![
                    "--socket-lb".to_owned(),
                    mode.as_arg().to_owned(),
                    "--cgroup-root".to_owned(),
                    cgroup.display().to_string(),
                ],
                // Without a cgroup of its own the agent would serve the host's root, every
                // process of the machine: never.
                (Some(_), None) => {
                    bail!("socket-level balancing needs a cgroup per node (Cluster::with_cgroups)")
                }
            };
            nodes.push(NodeAgent {
                name: node.name.clone(),
                netns_path: node.ns.path(),
                bpffs: dir.path().join(format!("bpffs-{}", node.name)),
                log: dir.path().join(format!("{}.log", node.name)),
                cgroup,
                node_args,
                child: None,
            });
        }
        // Owned from here on: a failure below drops (and so cleans up) what was started.
        let mut agents = Self {
            bin: agent_bin.to_owned(),
            source: source_dir.to_owned(),
            extra_args: extra_args.to_vec(),
            nodes,
            dir: Some(dir),
        };
        // All at once, then wait: the agents load their datapaths in parallel.
        for i in 0..agents.nodes.len() {
            agents.spawn(i)?;
        }
        for i in 0..agents.nodes.len() {
            agents.wait_ready(i)?;
        }
        Ok(agents)
    }

    /// The temporary directory holding the agents' bpffs directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// Node `i`'s bpffs directory (for `lbctl --bpffs-dir`, or opening the pinned maps).
    pub fn bpffs_dir(&self, i: usize) -> &Path {
        &self.nodes[i].bpffs
    }

    pub fn log_path(&self, i: usize) -> &Path {
        &self.nodes[i].log
    }

    /// Everything node `i`'s agent has logged, over all its runs.
    pub fn log(&self, i: usize) -> String {
        read_log(&self.nodes[i].log)
    }

    /// Process id of node `i`'s agent, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Node `i`'s agent gets `--socket-lb <mode>` (`None`: `off`) on its next start, its hooks on
    /// its node's cgroup (an upgrade that turns socket-level balancing on or off).
    pub fn set_socket_lb(&mut self, i: usize, mode: Option<SocketLb>) -> Result<()> {
        let node = &mut self.nodes[i];
        let cgroup = node
            .cgroup
            .as_ref()
            .context("socket-level balancing needs a cgroup per node (Cluster::with_cgroups)")?;
        node.node_args = vec![
            "--socket-lb".to_owned(),
            mode.map_or("off", SocketLb::as_arg).to_owned(),
            "--cgroup-root".to_owned(),
            cgroup.display().to_string(),
        ];
        Ok(())
    }

    /// Starts node `i`'s agent again (after [`Agents::stop_node`]) and waits until it is ready.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        self.wait_ready(i)
    }

    /// Stops node `i`'s agent with SIGTERM, as the kubelet does, and waits for it to exit. Its
    /// datapath stays pinned. Returns how it exited.
    pub fn stop_node(&mut self, i: usize) -> Result<ExitStatus> {
        let agent = &mut self.nodes[i];
        let mut child = agent
            .child
            .take()
            .with_context(|| format!("the agent of {} is not running", agent.name))?;
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: signalling our own child, which has not been reaped (so the pid is its).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the agent of {} did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed); its log:\n{}",
                    agent.name,
                    read_log(&agent.log)
                );
            }
            thread::sleep(POLL);
        }
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let agent = &mut self.nodes[i];
        ensure!(
            agent.child.is_none(),
            "the agent of {} is already running",
            agent.name
        );
        let log = File::options()
            .create(true)
            .append(true)
            .open(&agent.log)
            .with_context(|| format!("cannot open {}", agent.log.display()))?;
        let mut cmd = netns::command_at(&agent.netns_path, &self.bin);
        cmd.arg("--source")
            .arg(&self.source)
            .args(["--node-name", &agent.name])
            .args(["--external-iface", crate::cluster::UPLINK])
            .args(["--pod-ifaces", POD_IFACES])
            .arg("--bpffs-dir")
            .arg(&agent.bpffs)
            .args(["--healthz-addr", &format!("0.0.0.0:{HEALTHZ_PORT}")])
            .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
            .args(&self.extra_args)
            .args(&agent.node_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(cgroup) = &agent.cgroup {
            cgroup::start_in(cgroup, &mut cmd)?;
        }
        // nsenter execs the agent (no fork for a network namespace): the child is the agent.
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?} for {}", agent.name))?;
        agent.child = Some(child);
        Ok(())
    }

    /// Waits until node `i`'s agent answers 200 on /readyz (its first full sync is written).
    fn wait_ready(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let agent = &mut self.nodes[i];
            let child = agent
                .child
                .as_mut()
                .with_context(|| format!("the agent of {} is not running", agent.name))?;
            if let Some(status) = child.try_wait()? {
                agent.child = None;
                bail!(
                    "the agent of {} exited ({status}) before it was ready; its log:\n{}",
                    agent.name,
                    read_log(&agent.log)
                );
            }
            if readyz(&agent.netns_path) == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent of {} was not ready within {READY_TIMEOUT:?}; its log:\n{}",
                    agent.name,
                    read_log(&agent.log)
                );
            }
            thread::sleep(POLL);
        }
    }
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// The status of `GET /readyz` on the agent of the namespace at `netns_path`, if it answers.
fn readyz(netns_path: &str) -> Option<u16> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, HEALTHZ_PORT);
    let probe = move || server::http_request(addr, "/readyz", Duration::from_millis(500));
    let (status, _) = netns::spawn_at(netns_path, probe).ok()?.join().ok()?.ok()?;
    Some(status)
}

impl Drop for Agents {
    fn drop(&mut self) {
        for agent in &mut self.nodes {
            if let Some(mut child) = agent.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Unpins links (detaching the programs) and maps; needs the bpffs still mounted.
            let cleanup = std::process::Command::new(&self.bin)
                .arg("cleanup")
                .arg("--bpffs-dir")
                .arg(&agent.bpffs)
                .stdin(Stdio::null())
                .output();
            match cleanup {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "testbed: `lb-agent cleanup` of {} failed: {}",
                    agent.bpffs.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("testbed: cannot run {}: {e}", self.bin.display()),
            }
            unmount(&agent.bpffs);
        }
        // Only now: removing the directory while a bpffs is mounted in it would unpin through
        // the mount.
        self.dir.take();
    }
}

/// Detaches every mount at `path` (the agent mounted a bpffs there unless it already was one).
fn unmount(path: &Path) {
    let Ok(target) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // A bounded loop: a mount stacked on another is possible if two runs both mounted.
    for _ in 0..8 {
        // SAFETY: umount2 with a valid C string; MNT_DETACH in case something still uses it.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            break;
        }
    }
}
