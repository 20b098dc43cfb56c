//! The two-node test bed the netperf and socket-lb parts measure on, and how each datapath is
//! put in place on it.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::{Child, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_bench::kubeproxy::{
    self, NodeConfig,
    measure::{self, Backend},
};
use lb_testbed::{Agents, Cluster, Netns, SocketLb, SourceDir};

use super::{BenchService, CONTROL_NODE_PORT, CONTROL_PORT, Datapath, Path, SERVICE_IP};

/// The pod whose netserver serves kube-proxy's rulesets (see [`Bed`]).
const KUBE_PROXY_BACKEND: &str = "netserver-kube-proxy";

/// Starts netserver in pod `pod` (address `addr`) and waits until it listens.
fn start_netserver(cluster: &Cluster, pod: &str, addr: Ipv4Addr) -> Result<Child> {
    let netserver = cluster
        .pod(pod)
        .ns
        .command("netserver")
        .args(["-D", "-4", "-p", &CONTROL_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting netserver (is netperf installed? `cargo xtask setup`)")?;
    wait_listening(cluster.pod(pod).ns, SocketAddrV4::new(addr, CONTROL_PORT))?;
    Ok(netserver)
}

/// The test bed: the cluster, netserver in the backend pod (and in a second, identical one for
/// kube-proxy's rulesets), the source directory for our agents, and whichever datapath is in
/// place.
///
/// kube-proxy's rulesets get a backend of their own because their MASQUERADE (`--random-fully`)
/// draws source ports from all of 1024-65535: its connections would leave the backend holding
/// TIME_WAITs on (node-0, port) in our SNAT range, which ours would then meet with another
/// client's timestamps, and wait out a SYN retransmission (a second). On a node, nothing else
/// draws from that range: the agent reserves it (`ip_local_reserved_ports`) and kube-proxy does
/// not run beside it.
pub struct Bed {
    // Field order is drop order: the agents and netservers go before the namespaces.
    agents: Option<Agents>,
    netservers: [Child; 2],
    source: SourceDir,
    cluster: Cluster,
    backend: Ipv4Addr,
    /// The backend of kube-proxy's rulesets.
    kube_proxy_backend: Ipv4Addr,
    /// Which kube-proxy ruleset is loaded in the nodes, if any.
    rules: Option<Backend>,
    /// The backend's pod range, which the client routes via node-1 (or node-0: `routed`).
    backend_range: String,
    /// Whether the routes of [`Datapath::Routed`] are in place.
    routed: bool,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for netserver in &mut self.netservers {
            let _ = netserver.kill();
            let _ = netserver.wait();
        }
    }
}

impl Bed {
    pub fn new() -> Result<Self> {
        Self::build(Cluster::new(2).context("the test bed")?)
    }

    /// The bed with a cgroup v2 directory per node (its pods' below it), for socket-level
    /// balancing: each agent's hooks then serve its own node's processes alone.
    pub fn with_cgroups() -> Result<Self> {
        let root = lb_datapath::socket_lb::default_cgroup_root()?;
        Self::build(
            Cluster::new(2)
                .context("the test bed")?
                .with_cgroups(&root)
                .context("a cgroup per node")?,
        )
    }

    fn build(mut cluster: Cluster) -> Result<Self> {
        cluster.add_pod(0, "client")?;
        let backend = cluster.add_pod(1, "netserver")?;
        let kube_proxy_backend = cluster.add_pod(1, KUBE_PROXY_BACKEND)?;
        // The external client reaches the backend directly only for the "direct" floor.
        let backend_range = format!("{}/24", Ipv4Addr::from(u32::from(backend) & !0xff));
        cluster.client_route(&backend_range, 1)?;
        // For the routed floors, node-0 forwards the client's packets out of the interface
        // they came in by: it must not send ICMP redirects, nor the client take them and go
        // straight to node-1 (each setting counts if either `all` or the interface has it).
        for conf in ["all", lb_testbed::cluster::UPLINK] {
            let key = |what: &str| format!("net.ipv4.conf.{conf}.{what}");
            cluster.node(0).ns.sysctl(&key("send_redirects"), "0")?;
            cluster.client().sysctl(&key("accept_redirects"), "0")?;
        }
        let netservers = [
            start_netserver(&cluster, "netserver", backend)?,
            start_netserver(&cluster, KUBE_PROXY_BACKEND, kube_proxy_backend)?,
        ];
        let source = SourceDir::new()?;
        source.write("nodes.yaml", &cluster.node_manifests())?;
        Ok(Self {
            agents: None,
            netservers,
            source,
            cluster,
            backend,
            kube_proxy_backend,
            rules: None,
            backend_range,
            routed: false,
        })
    }

    /// kube-proxy's view of node `i`: its address and its pods' range (the backend runs on
    /// node-1, so that every path crosses the LAN).
    fn node_config(&self, i: usize) -> NodeConfig {
        NodeConfig {
            node_name: self.cluster.node_name(i).to_owned(),
            node_ip: self.cluster.node_ip(i),
            local_pod_cidr: format!("10.10.{i}.0/24"),
            ..NodeConfig::default()
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The netserver pod's address.
    pub fn backend(&self) -> Ipv4Addr {
        self.backend
    }

    /// The address of the netserver pod kube-proxy's rulesets are measured against.
    pub(super) fn kube_proxy_backend(&self) -> Ipv4Addr {
        self.kube_proxy_backend
    }

    /// netserver's process id (its pod's only process).
    pub fn netserver_pid(&self) -> u32 {
        self.netservers[0].id()
    }

    /// Writes the agents' source for `services` (replacing the previous one): the same objects
    /// kube-proxy's rulesets are made of, with the backend on node-1.
    pub fn write_source(&self, services: &[BenchService]) -> Result<()> {
        self.source.write(
            "services.yaml",
            &kubeproxy::manifests(services, &self.node_config(1)),
        )
    }

    /// Removes whatever datapath is in place.
    pub fn clear(&mut self) -> Result<()> {
        self.agents = None;
        if std::mem::take(&mut self.routed) {
            self.route_backend_range(1)?;
            // Gone already when replies went direct.
            let _ = self.cluster.node(1).ns.ip(&[
                "route",
                "del",
                &format!("{}/32", self.cluster.client_ip()),
            ]);
        }
        if let Some(backend) = self.rules.take() {
            for i in 0..self.cluster.node_count() {
                let ns = &self.cluster.node(i).ns;
                match backend {
                    // iptables-nft keeps its tables in nf_tables too.
                    Backend::Nftables | Backend::IptablesNft => {
                        measure::run_in(ns, "nft", &["flush", "ruleset"], None)?;
                    }
                    // Without --noflush, a restore empties the tables it names.
                    Backend::IptablesLegacy => {
                        let empty = "*filter\nCOMMIT\n*nat\nCOMMIT\n*mangle\nCOMMIT\n";
                        measure::run_in(
                            ns,
                            "iptables-legacy-restore",
                            &[],
                            Some(Arc::new(empty.to_owned())),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Puts `datapath` in place with `services`; returns how long that took.
    pub fn switch(
        &mut self,
        datapath: Datapath,
        services: &[BenchService],
        agent_bin: &std::path::Path,
    ) -> Result<Duration> {
        self.clear()?;
        let started = Instant::now();
        let backend = match datapath {
            Datapath::Ours(xdp) => {
                let mut args = Vec::new();
                if let Some(mode) = xdp {
                    args.extend(["--xdp-mode".to_owned(), mode.to_owned()]);
                }
                self.start_agents(services, agent_bin, &args, None)?;
                return Ok(started.elapsed());
            }
            Datapath::OursDsr => {
                let args = ["--forwarding-mode".to_owned(), "dsr".to_owned()];
                self.start_agents(services, agent_bin, &args, None)?;
                return Ok(started.elapsed());
            }
            Datapath::Direct => return Ok(started.elapsed()),
            Datapath::Routed { replies_direct } => {
                self.routed = true;
                self.route_backend_range(0)?;
                if !replies_direct {
                    let via_node_0 = self.cluster.node_ip(0).to_string();
                    let client = format!("{}/32", self.cluster.client_ip());
                    self.cluster.node(1).ns.ip(&[
                        "route",
                        "replace",
                        &client,
                        "via",
                        &via_node_0,
                    ])?;
                }
                return Ok(started.elapsed());
            }
            Datapath::Iptables => Backend::iptables_default()?,
            Datapath::Nftables => Backend::Nftables,
        };
        // Marked first, so that a ruleset loaded on one node only is removed too.
        self.rules = Some(backend);
        let loads = (0..self.cluster.node_count())
            .map(|i| {
                let text = Arc::new(backend.full_ruleset(services, &self.node_config(i)));
                (&self.cluster.node(i).ns, text)
            })
            .collect();
        measure::apply_all(backend, loads)?;
        Ok(started.elapsed())
    }

    /// Routes the client's traffic to the backend's pod range via node `node`.
    fn route_backend_range(&self, node: usize) -> Result<()> {
        let via = self.cluster.node_ip(node).to_string();
        self.cluster
            .client()
            .ip(&["route", "replace", &self.backend_range, "via", &via])?;
        Ok(())
    }

    /// Starts our agents for `services` (after [`Bed::clear`]) with `args`, and socket-level
    /// balancing in `socket_lb` (each agent's hooks on its node's cgroup: [`Bed::with_cgroups`]).
    pub fn start_agents(
        &mut self,
        services: &[BenchService],
        agent_bin: &std::path::Path,
        args: &[String],
        socket_lb: Option<SocketLb>,
    ) -> Result<()> {
        let mut all = vec![
            "--max-services".to_owned(),
            (services.len() as u32 * 2 + 1024)
                .next_power_of_two()
                .to_string(),
        ];
        all.extend_from_slice(args);
        self.agents = Some(match socket_lb {
            None => Agents::start(&self.cluster, agent_bin, self.source.path(), &all)?,
            Some(mode) => Agents::start_with_socket_lb(
                &self.cluster,
                agent_bin,
                self.source.path(),
                &all,
                mode,
            )?,
        });
        Ok(())
    }

    /// Where `path`'s client sends to under `datapath`: (client namespace, host, control port).
    pub(super) fn target(&self, datapath: Datapath, path: Path) -> (&Netns, Ipv4Addr, u16) {
        let ns = match path {
            Path::PodToClusterIp => self.cluster.pod("client").ns,
            Path::ExternalToNodePort | Path::ExternalToLocalNodePort => self.cluster.client(),
        };
        match (datapath, path) {
            (Datapath::Direct | Datapath::Routed { .. }, _) => (ns, self.backend, CONTROL_PORT),
            (_, Path::PodToClusterIp) => (ns, SERVICE_IP, CONTROL_PORT),
            (_, Path::ExternalToNodePort) => (ns, self.cluster.node_ip(0), CONTROL_NODE_PORT),
            (_, Path::ExternalToLocalNodePort) => (ns, self.cluster.node_ip(1), CONTROL_NODE_PORT),
        }
    }
}

/// Waits until something listens on `addr`, from inside `ns` (netserver needs a moment after it
/// starts; the first test would fail without).
fn wait_listening(ns: &Netns, addr: SocketAddrV4) -> Result<()> {
    let listening = ns.enter(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })?;
    if !listening {
        bail!("netserver does not listen on {addr} after 5 s");
    }
    Ok(())
}
