//! A multi-node cluster in network namespaces: a LAN (a Linux bridge in a namespace of its
//! own, standing for the physical network), nodes on it with pods behind them, and an external
//! client on the LAN that knows only the nodes' addresses.
//!
//! ```text
//!   client (eth0 192.168.50.2)      node-i (eth0 192.168.50.10+i, pods 10.10.i.0/24)
//!        |                              |            \-- lbpod<k> == eth0 of pod (10.10.i.k+2/32)
//!   [lan: br0 <- "client" port, "node<i>" ports (GRO on, XDP_PASS attached)]
//! ```
//!
//! The bed is dual-stack: every interface above also has the IPv6 twin of its IPv4 address
//! ([`crate::addressing`]: the client `fd00:192:168:50::2/64`, node-0 `fd00:192:168:50::10/64`,
//! node-i's pods `fd00:10:10:<i>::/64`, its first pod `fd00:10:10:<i>::2/128`), every IPv4 route
//! has its IPv6 twin, and nodes forward both families. The bridge floods multicast (no
//! snooping), so that neighbour discovery never waits for a membership report.
//!
//! The links come in two [`Wiring`]s, because a datapath meets both: NIC-like frames (complete
//! checksums, nothing over the MTU), with the nodes' ports on the bridge and the pods' ends of
//! their veths ready for frames sent with XDP (GRO on, and an XDP program that passes
//! everything on the bridge ports: that program is what makes XDP_TX out of a node's uplink
//! arrive; GRO alone only serves XDP_REDIRECT, see [`crate::xdp`]); and veths as the kernel
//! makes them, as in kind (offloads on: GSO packets with partial checksums cross, nothing
//! prepared for XDP).
//!
//! Every node routes the other nodes' pod ranges via their uplink addresses (as a flat,
//! non-overlay CNI such as Calico in BGP mode does), so pod-to-pod traffic crosses the LAN
//! without NAT. Every namespace's name starts with the bed's prefix; dropping the [`Cluster`]
//! deletes them all, and with them every interface: nothing of the host is touched.
//!
//! A LoadBalancer Service served by the agents on two nodes:
//!
//! ```no_run
//! use lb_testbed::{Agents, Cluster, SourceDir, agents::agent_binary, manifests::*};
//! # fn main() -> anyhow::Result<()> {
//! let mut cluster = Cluster::new(2)?;
//! let web = cluster.add_hostnames_pod(1, "web-0", 8080)?;
//! cluster.add_pod(0, "client")?;
//! let source = SourceDir::new()?;
//! source.write("nodes.yaml", &cluster.node_manifests())?;
//! let service = ServiceManifest::new("web", "10.96.0.10".parse()?)
//!     .service_type(ServiceType::LoadBalancer)
//!     .port(ServicePort::tcp("http", 80, 8080).node_port(30080))
//!     .ingress_ip("203.0.113.10".parse()?);
//! let slice = EndpointSliceManifest::new("web")
//!     .port("http", 8080, Protocol::Tcp)
//!     .endpoint(Endpoint::ready(web, cluster.node_name(1)));
//! source.write("web.yaml", &documents([service.yaml(), slice.yaml()]))?;
//! cluster.client_route("203.0.113.10/32", 0)?;
//! // Declared after the cluster, so dropped (and cleaned up) before it.
//! let agents = Agents::start(&cluster, &agent_binary()?, source.path(), &[])?;
//! # Ok(())
//! # }
//! ```

use std::{
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    addressing::AddressPlan,
    cgroup::Cgroup,
    ethtool,
    manifests::{self, NodeManifest},
    netns::{Netns, unique_prefix},
    node::{Node, Pod},
    server::Server,
    xdp::{self, XdpLink},
};

/// The name of every node's (and the client's) interface on the LAN: the host's own uplink is
/// usually called so too, which is what an agent that looks in the wrong namespace trips on.
pub const UPLINK: &str = "eth0";

/// How the bed's links behave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wiring {
    /// As physical NICs: complete checksums and no segment over the MTU in both directions;
    /// frames a node sends out of its uplink with XDP_TX arrive (the bridge port runs XDP), and
    /// frames XDP redirects into a pod's veth too (GRO on).
    #[default]
    NicLike,
    /// veths as the kernel sets them up, as in kind: checksum and segmentation offloads on, so
    /// that GSO packets with partial checksums cross and arrive GRO'd, GRO off where the kernel
    /// leaves it off, and no XDP on the other ends.
    VethDefaults,
}
/// The bridge in the LAN namespace.
const BRIDGE: &str = "br0";
/// The client's port on the bridge (node `i`'s is `node<i>`).
const CLIENT_PORT: &str = "client";

pub struct Cluster {
    plan: AddressPlan,
    wiring: Wiring,
    prefix: String,
    /// One per node once [`Cluster::with_cgroups`] made them (else empty). First to go: removing
    /// them kills the processes started in them while their namespaces still exist.
    cgroups: Vec<NodeCgroups>,
    /// Servers first: they stop before the namespaces they listen in go away.
    servers: Vec<Server>,
    nodes: Vec<Node>,
    client: Netns,
    /// XDP_PASS programs on the nodes' ports of the bridge.
    _lan_xdp: Vec<XdpLink>,
    /// The LAN last: deleting a node or the client also deletes its port on the bridge.
    lan: Netns,
}

/// The cgroup v2 directories of one node (see [`Cluster::with_cgroups`]).
#[derive(Debug)]
pub struct NodeCgroups {
    /// `pods`, below `node`: its pods' processes. Declared first, so removed first.
    pub pods: Cgroup,
    /// The node's own processes (its agent, node-side clients); `pods` is below it, as
    /// `kubepods` is below a real node's root, so that what is attached here serves both.
    pub node: Cgroup,
}

/// A pod of the cluster, found by name.
#[derive(Clone, Copy, Debug)]
pub struct PodRef<'a> {
    /// Index of the node the pod runs on.
    pub node: usize,
    pub name: &'a str,
    pub ip: Ipv4Addr,
    /// Its IPv6 address (the twin of `ip`).
    pub ip6: Ipv6Addr,
    pub ns: &'a Netns,
    /// The pod's veth on the node side (in the node's namespace), e.g. `lbpod0`.
    pub host_iface: &'a str,
}

impl<'a> From<(usize, &'a Pod)> for PodRef<'a> {
    fn from((node, pod): (usize, &'a Pod)) -> Self {
        Self {
            node,
            name: &pod.name,
            ip: pod.ip,
            ip6: pod.ip6,
            ns: &pod.ns,
            host_iface: &pod.host_iface,
        }
    }
}

impl Cluster {
    /// `nodes` nodes on the default address plan (LAN 192.168.50.0/24, pods `10.10.<i>.0/24`),
    /// wired NIC-like.
    pub fn new(nodes: usize) -> Result<Self> {
        Self::with_plan(nodes, AddressPlan::default(), Wiring::NicLike)
    }

    /// `nodes` nodes on the default address plan, wired as `wiring` says.
    pub fn wired(nodes: usize, wiring: Wiring) -> Result<Self> {
        Self::with_plan(nodes, AddressPlan::default(), wiring)
    }

    pub fn with_plan(nodes: usize, plan: AddressPlan, wiring: Wiring) -> Result<Self> {
        ensure!(
            (1..=AddressPlan::MAX_NODES).contains(&nodes),
            "a cluster has 1 to {} nodes, not {nodes}",
            AddressPlan::MAX_NODES
        );
        let prefix = unique_prefix("c");
        // Each piece is owned as soon as it exists: an error below drops what was built.
        let lan = Netns::new(format!("{prefix}-lan"))?;
        lan.ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])
        .with_context(|| format!("creating the bridge in netns {}", lan.name()))?;
        lan.ip(&["link", "set", BRIDGE, "up"])?;

        let client = Netns::new(format!("{prefix}-client"))?;
        attach_to_lan(&lan, &client, CLIENT_PORT, plan.client_ip(), wiring)?;
        add_lan_ip6(&client, plan.client_ip6())?;

        let mut built = Vec::with_capacity(nodes);
        let mut lan_xdp = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let node = Node::in_bed(&prefix, &node_name(i))?;
            attach_to_lan(&lan, &node.ns, &lan_port(i), plan.node_ip(i), wiring)?;
            add_lan_ip6(&node.ns, plan.node_ip6(i))?;
            built.push(node);
            if wiring == Wiring::NicLike {
                // A node's datapath may send frames back out of its uplink with XDP_TX.
                lan_xdp.push(xdp::attach_verdict(&lan, &lan_port(i), xdp::action::PASS)?);
            }
        }
        for (j, node) in built.iter().enumerate() {
            for i in (0..nodes).filter(|&i| i != j) {
                node.ns
                    .ip(&[
                        "route",
                        "add",
                        &plan.pod_cidr(i),
                        "via",
                        &plan.node_ip(i).to_string(),
                        "dev",
                        UPLINK,
                    ])
                    .with_context(|| format!("routing node-{i}'s pods from {}", node.ns.name()))?;
                node.ns
                    .ip(&[
                        "-6",
                        "route",
                        "add",
                        &plan.pod_cidr6(i),
                        "via",
                        &plan.node_ip6(i).to_string(),
                        "dev",
                        UPLINK,
                    ])
                    .with_context(|| {
                        format!("routing node-{i}'s IPv6 pods from {}", node.ns.name())
                    })?;
            }
        }
        Ok(Self {
            plan,
            wiring,
            prefix,
            cgroups: Vec::new(),
            servers: Vec::new(),
            nodes: built,
            client,
            _lan_xdp: lan_xdp,
            lan,
        })
    }

    /// Gives every node a cgroup v2 directory of its own, `<root>/<prefix>-node-<i>`, with a
    /// child `pods` for its pods' processes: what the bed starts on a node from then on
    /// ([`Cluster::node_command`], [`Cluster::pod_command`], the node's agent) starts there.
    /// Socket-level balancing serves the processes of one cgroup (the agent's `--cgroup-root`,
    /// see [`crate::agents::SocketLb`]); with a directory per node, several nodes on one machine
    /// never touch the host's sockets or each other's. `root` is the host's cgroup v2 root
    /// (`lb_datapath::socket_lb::default_cgroup_root`), given by the caller because this crate
    /// depends on nothing of the project.
    ///
    /// The bed's servers are threads of the test process, which stays in its own cgroup: they
    /// only accept and answer, which the socket hooks leave alone.
    pub fn with_cgroups(mut self, root: &Path) -> Result<Self> {
        ensure!(self.cgroups.is_empty(), "the cluster has cgroups already");
        for i in 0..self.nodes.len() {
            let node = Cgroup::new(root, &format!("{}-{}", self.prefix, node_name(i)))?;
            let pods = node.child("pods")?;
            self.cgroups.push(NodeCgroups { pods, node });
        }
        Ok(self)
    }

    /// Node `i`'s cgroups, when the cluster has them ([`Cluster::with_cgroups`]).
    pub fn cgroups(&self, i: usize) -> Option<&NodeCgroups> {
        self.cgroups.get(i)
    }

    /// A command that runs `program` on node `i`: in its network namespace, and in its cgroup
    /// when the cluster has cgroups.
    pub fn node_command(&self, i: usize, program: impl AsRef<OsStr>) -> Result<Command> {
        ensure!(i < self.nodes.len(), "no node {i}");
        let mut cmd = self.nodes[i].ns.command(program);
        if let Some(cgroups) = self.cgroups.get(i) {
            cgroups.node.start_in(&mut cmd)?;
        }
        Ok(cmd)
    }

    /// A command that runs `program` in pod `pod`: in its network namespace, and in its node's
    /// `pods` cgroup when the cluster has cgroups.
    pub fn pod_command(&self, pod: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        let pod = self
            .find_pod(pod)
            .with_context(|| format!("no pod {pod} in cluster {}", self.prefix))?;
        let mut cmd = pod.ns.command(program);
        if let Some(cgroups) = self.cgroups.get(pod.node) {
            cgroups.pods.start_in(&mut cmd)?;
        }
        Ok(cmd)
    }

    /// The prefix of every namespace of this cluster.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn plan(&self) -> &AddressPlan {
        &self.plan
    }

    pub fn wiring(&self) -> Wiring {
        self.wiring
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// `node-<i>`: the node's name, as in its Node object.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s address on the LAN (its InternalIP).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.plan.node_ip(i)
    }

    /// Node `i`'s IPv6 address on the LAN (its IPv6 InternalIP in
    /// [`Cluster::node_manifests_dual_stack`]).
    pub fn node_ip6(&self, i: usize) -> Ipv6Addr {
        self.plan.node_ip6(i)
    }

    /// The interface connecting a node (or the client) to the LAN, in its own namespace.
    pub fn uplink(&self) -> &'static str {
        UPLINK
    }

    /// The LAN namespace, holding the bridge.
    pub fn lan(&self) -> &Netns {
        &self.lan
    }

    /// Node `i`'s port on the bridge (in the LAN namespace): the peer of its uplink.
    pub fn lan_port(&self, i: usize) -> String {
        assert!(i < self.nodes.len(), "no node {i}");
        lan_port(i)
    }

    /// The external client, on the LAN outside the cluster.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        self.plan.client_ip()
    }

    pub fn client_ip6(&self) -> Ipv6Addr {
        self.plan.client_ip6()
    }

    /// Routes `cidr` (a LoadBalancer IP, an externalIP...) from the client via node `via_node`,
    /// as an upstream router or a MetalLB-style announcement would; an IPv6 `cidr` via the
    /// node's IPv6 address.
    pub fn client_route(&self, cidr: &str, via_node: usize) -> Result<()> {
        ensure!(via_node < self.nodes.len(), "no node {via_node}");
        let via = if cidr.contains(':') {
            self.node_ip6(via_node).to_string()
        } else {
            self.node_ip(via_node).to_string()
        };
        self.client
            .ip(&["route", "add", cidr, "via", &via, "dev", UPLINK])
            .with_context(|| format!("routing {cidr} from the client via node-{via_node}"))?;
        Ok(())
    }

    /// Gives the client another address to send from (bind to it): on the LAN when `ip` is in
    /// the LAN's range (of its family); otherwise as an address of a network behind the client,
    /// which every node then routes via the client's first address of that family.
    pub fn add_client_ip(&self, ip: impl Into<IpAddr>) -> Result<()> {
        let ip = ip.into();
        let (on_lan, lan_len, host_len, via, nodad) = match ip {
            IpAddr::V4(v4) => (
                self.plan.on_lan(v4),
                AddressPlan::LAN_PREFIX_LEN,
                32,
                IpAddr::V4(self.client_ip()),
                None,
            ),
            IpAddr::V6(v6) => (
                self.plan.on_lan6(v6),
                AddressPlan::LAN_PREFIX_LEN6,
                128,
                IpAddr::V6(self.client_ip6()),
                Some("nodad"),
            ),
        };
        let len = if on_lan { lan_len } else { host_len };
        let cidr = format!("{ip}/{len}");
        let mut args = vec!["addr", "add", &cidr, "dev", UPLINK];
        args.extend(nodad);
        self.client.ip(&args)?;
        if on_lan {
            return Ok(());
        }
        let host = format!("{ip}/{host_len}");
        for node in &self.nodes {
            node.ns.ip(&[
                "route",
                "add",
                &host,
                "via",
                &via.to_string(),
                "dev",
                UPLINK,
            ])?;
        }
        Ok(())
    }

    /// Adds a pod without a server (a client pod) on node `node`, with the next free address
    /// of the node's range (and its IPv6 twin: [`PodRef::ip6`]). Pod names are unique in the
    /// cluster.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Ipv4Addr> {
        ensure!(node < self.nodes.len(), "no node {node} for pod {name}");
        if let Some(existing) = self.find_pod(name) {
            bail!("a pod named {name} already runs on node-{}", existing.node);
        }
        let ip = self.plan.nth_pod_ip(node, self.nodes[node].pods.len())?;
        let index = self.nodes[node]
            .add_pod(name, ip)
            .with_context(|| format!("adding pod {name} to node-{node}"))?;
        if self.wiring == Wiring::NicLike {
            // The datapath may XDP_REDIRECT frames into the pod's veth; its pod end only
            // receives them in NAPI mode (see `xdp`).
            ethtool::set_gro(&self.nodes[node].pods[index].ns, "eth0", true)?;
        }
        Ok(ip)
    }

    /// Adds a pod on node `node` running a `hostnames` server on `port` (TCP and UDP, both
    /// families) that answers as `name`; the server lives as long as the cluster.
    pub fn add_hostnames_pod(&mut self, node: usize, name: &str, port: u16) -> Result<Ipv4Addr> {
        let ip = self.add_pod(node, name)?;
        let server = Server::hostnames(self.pod(name).ns, name, port)
            .with_context(|| format!("starting the hostnames server of pod {name}"))?;
        self.servers.push(server);
        Ok(ip)
    }

    /// Runs a `hostnames` server in node `node`'s own namespace (a host-network pod, answering
    /// as `node-<i>`) on `port`, for as long as the cluster lives.
    pub fn add_node_server(&mut self, node: usize, port: u16) -> Result<()> {
        ensure!(node < self.nodes.len(), "no node {node}");
        let n = &self.nodes[node];
        let server = Server::hostnames(&n.ns, &n.name, port)
            .with_context(|| format!("starting a hostnames server on {}", n.name))?;
        self.servers.push(server);
        Ok(())
    }

    pub fn find_pod(&self, name: &str) -> Option<PodRef<'_>> {
        self.nodes
            .iter()
            .enumerate()
            .find_map(|(i, node)| node.find_pod(name).map(|pod| PodRef::from((i, pod))))
    }

    /// The pod named `name`; panics when there is none (a mistake in the test).
    pub fn pod(&self, name: &str) -> PodRef<'_> {
        self.find_pod(name)
            .unwrap_or_else(|| panic!("no pod {name} in cluster {}", self.prefix))
    }

    /// The Node objects of every node (InternalIP and pod CIDR), as one YAML stream for the
    /// agents' source.
    pub fn node_manifests(&self) -> String {
        manifests::documents((0..self.nodes.len()).map(|i| {
            NodeManifest::new(self.node_name(i), self.node_ip(i))
                .pod_cidr(&self.plan.pod_cidr(i))
                .yaml()
        }))
    }

    /// The Node objects of every node as a dual-stack cluster's kubelet reports them: both
    /// InternalIPs (IPv4 first) and both pod CIDRs.
    pub fn node_manifests_dual_stack(&self) -> String {
        manifests::documents((0..self.nodes.len()).map(|i| {
            NodeManifest::new(self.node_name(i), self.node_ip(i))
                .internal_ip(self.node_ip6(i))
                .pod_cidr(&self.plan.pod_cidr(i))
                .pod_cidr(&self.plan.pod_cidr6(i))
                .yaml()
        }))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stated rather than left to field order: the cgroups (killing what runs in them),
        // servers, then pods and nodes, then the client, then the LAN (the fields drop in this
        // order too).
        self.cgroups.clear();
        self.servers.clear();
        self.nodes.clear();
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

fn lan_port(i: usize) -> String {
    format!("node{i}")
}

/// Connects `ns` to the LAN: its `eth0` gets `ip`/24 and the peer `port` joins the bridge,
/// wired as `wiring` says.
fn attach_to_lan(lan: &Netns, ns: &Netns, port: &str, ip: Ipv4Addr, wiring: Wiring) -> Result<()> {
    ns.add_veth(UPLINK, lan, port)
        .with_context(|| format!("creating the uplink of {} ({port} on the LAN)", ns.name()))?;
    lan.ip(&["link", "set", port, "master", BRIDGE])
        .with_context(|| format!("adding {port} to the bridge in {}", lan.name()))?;
    lan.ip(&["link", "set", port, "up"])?;
    if wiring == Wiring::NicLike {
        // Frames XDP redirects out of `eth0` reach the bridge.
        ethtool::set_gro(lan, port, true)?;
        // Frames as a physical NIC sends and receives them: complete checksums and no segment
        // larger than the MTU, in both directions. A veth hands its peer GSO packets whose
        // checksum holds only the pseudo-header sum (CHECKSUM_PARTIAL); an XDP program sees
        // them as plain bytes and cannot tell, so without this every NAT it does on them would
        // leave a wrong checksum. With transmit checksumming off (which also turns segmentation
        // offload off), each end segments and checksums in software before the frame crosses
        // (see `ethtool`).
        ethtool::set_tx_checksum(ns, UPLINK, false)?;
        ethtool::set_tx_checksum(lan, port, false)?;
    }
    let cidr = format!("{ip}/{}", AddressPlan::LAN_PREFIX_LEN);
    ns.ip(&["addr", "add", &cidr, "dev", UPLINK])?;
    ns.ip(&["link", "set", UPLINK, "up"])?;
    Ok(())
}

/// Gives `ns`'s uplink its IPv6 address on the LAN, usable at once (no duplicate address
/// detection).
fn add_lan_ip6(ns: &Netns, ip: Ipv6Addr) -> Result<()> {
    let cidr = format!("{ip}/{}", AddressPlan::LAN_PREFIX_LEN6);
    ns.ip(&["-6", "addr", "add", &cidr, "dev", UPLINK, "nodad"])
        .with_context(|| format!("adding {cidr} to the uplink of {}", ns.name()))?;
    Ok(())
}
