//! A node in a network namespace with pods, `hostnames` servers, a YAML source directory and
//! the real `lb-agent` binary running in the node's namespace against a private bpffs.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use lb_common::maps::FrontendKey;
use lb_datapath::maps::Maps;
use lb_testbed::{
    Node,
    addressing::ipv6_twin,
    server::{self, Held, Load, Server},
};

pub const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
pub const NODE_NAME: &str = "node-1";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The client pod's IPv6 address (every pod of the bed has both families): `fd00:10:0:1::2`.
pub const CLIENT_IP6: Ipv6Addr = ipv6_twin(CLIENT_IP);
pub const TIMEOUT: Duration = Duration::from_secs(3);

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 10 + i)
}

/// `backend-<i>`'s IPv6 address: the twin of [`backend_ip`] (`fd00:10:0:1::1<i>`).
pub fn backend_ip6(i: u8) -> Ipv6Addr {
    ipv6_twin(backend_ip(i))
}

pub struct AgentBed {
    pub node: Node,
    /// `backend-<i>` at [`backend_ip`]`(i)` and [`backend_ip6`]`(i)`, one per server.
    servers: Vec<Server>,
    pub dir: PathBuf,
    pub source: PathBuf,
    pub bpffs: PathBuf,
    log: PathBuf,
    agent: Option<Child>,
    /// The agent binary `start_agent` runs: this build's, unless a test sets another (the
    /// previous release's, for the upgrade test).
    pub agent_bin: PathBuf,
    /// Flags added to the agent's command line.
    pub extra_args: Vec<String>,
    /// Where `start_agent` asks `/readyz`: the probe port, as the kubelet does (the previous
    /// release, which has none, answers on the health port).
    pub ready_addr: &'static str,
}

/// The agent's probe address (`--probe-addr`'s default), from inside its namespace.
pub const PROBES: &str = "127.0.0.1:10266";

/// A Service manifest.
pub fn service_yaml(name: &str, cluster_ip: Ipv4Addr, port: u16, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: http, port: {port}, protocol: TCP, targetPort: 8080}}]\n{extra_spec}"
    )
}

/// An EndpointSlice manifest for `service` with ready endpoints on this node.
pub fn slice_yaml(service: &str, backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| {
            format!("- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: {NODE_NAME}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

pub fn node_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}\nstatus:\n  addresses: [{{type: InternalIP, address: 192.168.0.2}}]\n"
    )
}

impl AgentBed {
    /// A node with a client pod and `backends` hostnames pods (`backend-<i>` on :8080).
    pub fn new(backends: u8) -> Option<Self> {
        if !super::require_privileges() {
            return None;
        }
        let mut node = Node::new("node").expect("node");
        node.add_pod("client", CLIENT_IP).expect("client pod");
        let servers = (0..backends)
            .map(|i| {
                node.add_hostnames_pod(&format!("backend-{i}"), backend_ip(i), 8080)
                    .expect("backend pod")
            })
            .collect();
        let dir = std::env::temp_dir().join(format!(
            "lbt-agent-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let source = dir.join("source");
        let bpffs = dir.join("bpffs");
        fs::create_dir_all(&source).unwrap();
        let log = dir.join("agent.log");
        let bed = Self {
            node,
            servers,
            dir,
            source,
            bpffs,
            log,
            agent: None,
            agent_bin: PathBuf::from(AGENT),
            extra_args: Vec::new(),
            ready_addr: PROBES,
        };
        bed.write("node.yaml", &node_yaml());
        Some(bed)
    }

    /// Writes a source file atomically (as `kubectl`-driven tooling and editors do: write, rename).
    pub fn write(&self, file: &str, yaml: &str) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, self.source.join(file)).unwrap();
    }

    /// Writes Service `web` (`vip`:80, `extra_spec` added to its spec) with every backend of the
    /// bed as a ready endpoint.
    pub fn write_web(&self, vip: Ipv4Addr, extra_spec: &str) {
        self.write("web.yaml", &service_yaml("web", vip, 80, extra_spec));
        let backends: Vec<Ipv4Addr> = (0..self.servers.len() as u8).map(backend_ip).collect();
        self.write("web-slice.yaml", &slice_yaml("web", &backends));
    }

    pub fn remove(&self, file: &str) {
        fs::remove_file(self.source.join(file)).unwrap();
    }

    pub fn agent_command(&self) -> Command {
        let mut cmd = self.node.ns.command(&self.agent_bin);
        cmd.args([
            "--source",
            self.source.to_str().unwrap(),
            "--node-name",
            NODE_NAME,
            "--pod-ifaces",
            "lbpod*",
        ])
        .args(["--bpffs-dir", self.bpffs.to_str().unwrap()])
        .args(["--maglev-table-size", "1021"])
        .args(&self.extra_args)
        .env("RUST_LOG", "info");
        cmd
    }

    /// Starts the agent and waits until it reports ready (first full sync written).
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .agent_command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting lb-agent");
        self.agent = Some(child);
        // Generous: under emulation (the VM test) two agents verifying their programs at once
        // take most of 20 s.
        let ready = self.wait_until(Duration::from_secs(60), || {
            self.http_get(self.ready_addr, "/readyz")
                .is_some_and(|(s, _)| s == 200)
        });
        assert!(
            ready,
            "the agent never became ready; its log:\n{}",
            self.log()
        );
    }

    /// Stops the agent with SIGTERM, as Kubernetes does, and waits for it to exit.
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent did not stop on SIGTERM; its log:\n{}",
                self.log()
            );
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `check` every 20 ms until it holds or `timeout` passes.
    pub fn wait_until(&self, timeout: Duration, check: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        check()
    }

    /// A plain HTTP GET to one of the agent's endpoints, from inside the node's namespace.
    pub fn http_get(&self, addr: &str, path: &str) -> Option<(u16, String)> {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let path = path.to_owned();
        self.node
            .ns
            .enter(move || -> Option<(u16, String)> {
                use std::io::{Read as _, Write as _};
                let mut s =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").as_bytes())
                    .ok()?;
                let mut response = String::new();
                s.read_to_string(&mut response).ok()?;
                let status = response.split_whitespace().nth(1)?.parse().ok()?;
                let body = response
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default();
                Some((status, body))
            })
            .ok()
            .flatten()
    }

    /// A listening socket on `addr` in the node's namespace, as another process there (say
    /// kube-proxy) would hold it; it accepts nothing.
    pub fn hold_port(&self, addr: &'static str) -> std::net::TcpListener {
        self.node
            .ns
            .enter(move || std::net::TcpListener::bind(addr))
            .unwrap()
            .unwrap_or_else(|e| panic!("holding {addr}: {e}"))
    }

    /// The agent's maps, opened from their pins (as lbctl does).
    pub fn maps(&self) -> Maps {
        Maps::open_pinned(&self.bpffs).expect("pinned maps")
    }

    /// Every frontend the maps hold and the backend set it uses (to see whether a restarted
    /// agent kept them). Reads the frontends' pin alone, which every release has made, so that it
    /// also reads a datapath an older release pinned.
    pub fn set_ids(&self) -> Vec<(FrontendKey, u32)> {
        let pin = self.bpffs.join(lb_common::maps::LB_SERVICES);
        let data = aya::maps::MapData::from_pin(&pin).expect("the frontends' pin");
        let frontends: aya::maps::HashMap<_, FrontendKey, lb_common::maps::Frontend> =
            aya::maps::Map::HashMap(data)
                .try_into()
                .expect("a hash map");
        frontends
            .iter()
            .map(|e| e.unwrap())
            .map(|(k, v)| (k, v.set_id))
            .collect()
    }

    /// A connection from the client pod to `addr`, held open, and the backend that answered its
    /// first request.
    pub fn hold(&self, addr: SocketAddrV4) -> HeldOn {
        let mut conn = self
            .client()
            .enter(move || Held::connect(addr, TIMEOUT))
            .unwrap()
            .expect("held connection");
        let backend = name(&conn.ask().unwrap());
        HeldOn { conn, backend }
    }

    /// Keeps new connections from the client pod to `addr` coming while `during` runs (from
    /// 300 ms before until 300 ms after), and asserts that none failed and more than `at_least`
    /// succeeded: what a restart or an upgrade of the agent must look like from outside.
    pub fn assert_no_connection_refused<T>(
        &mut self,
        addr: SocketAddrV4,
        at_least: usize,
        during: impl FnOnce(&mut Self) -> T,
    ) -> T {
        let load = Load::start(self.client(), addr, TIMEOUT).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let out = during(self);
        std::thread::sleep(Duration::from_millis(300));
        let count = load.finish();
        assert_eq!(
            count.failed,
            0,
            "{} connections succeeded; failures: {:#?}; agent log:\n{}",
            count.ok,
            count.failures,
            self.log()
        );
        assert!(count.ok > at_least, "{count:?}");
        out
    }

    pub fn client(&self) -> &lb_testbed::Netns {
        &self.node.pod("client").ns
    }

    /// `n` HTTP requests over new connections from the client pod; the backend names answering.
    pub fn names(&self, vip: SocketAddrV4, n: usize) -> Vec<String> {
        self.names_from("client", vip, n)
            .expect("every request answered")
    }

    /// `n` HTTP requests over new connections from pod `pod`; the backend names answering, or
    /// the first failure.
    pub fn names_from(
        &self,
        pod: &str,
        vip: SocketAddrV4,
        n: usize,
    ) -> anyhow::Result<Vec<String>> {
        self.node.pod(pod).ns.enter(move || {
            (0..n)
                .map(|_| server::http_get(vip, TIMEOUT).map(|a| name(&a)))
                .collect::<Result<Vec<_>, _>>()
        })?
    }

    /// What is pinned under the bed's bpffs directory (without the kernel's own `maps.debug`
    /// and `progs.debug`, present in every bpffs).
    pub fn pins(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if ["maps.debug", "progs.debug"].contains(&entry.file_name().to_str().unwrap_or(""))
                {
                    continue;
                }
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.bpffs, &mut out);
        out
    }
}

/// A connection held open, and the backend that answered on it first.
pub struct HeldOn {
    pub conn: Held,
    pub backend: String,
}

impl HeldOn {
    /// Asks again on the held connection; the same backend must answer (`what` says why).
    pub fn assert_kept(&mut self, what: &str) {
        assert_eq!(name(&self.conn.ask().unwrap()), self.backend, "{what}");
    }
}

/// The backend name in a `hostnames` answer.
pub fn name(answer: &str) -> String {
    answer
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl Drop for AgentBed {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(AGENT)
            .args(["cleanup", "--bpffs-dir", self.bpffs.to_str().unwrap()])
            .stdout(Stdio::null())
            .status();
        if let Ok(path) = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes()) {
            // SAFETY: unmounting the bpffs this bed's agent mounted (lazily, in case of users).
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Whether `path` is a mount point of a bpffs (for leak checks).
pub fn is_mounted(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == path.to_str())
    })
}
