//! `lb-agent`'s command line. Flag names follow kube-proxy's where the meaning is the same
//! (`--hostname-override`, `--metrics-bind-address`, `--healthz-bind-address`,
//! `--nodeport-addresses`), so operators can switch without relearning.

use std::{net::SocketAddr, ops::RangeInclusive, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use lb_datapath::maglev;

use crate::node::{ForwardingMode, NodePortFlag};

#[derive(Debug, Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "Per-node agent of the eBPF Service load balancer: programs the datapath from Kubernetes Services and EndpointSlices",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Remove everything the agent installed: program links (traffic stops being balanced) and
    /// pinned maps (connection state is lost).
    Cleanup {
        /// Where the agent pinned its maps and links.
        #[arg(long, default_value = lb_datapath::loader::DEFAULT_PIN_DIR)]
        bpffs_dir: PathBuf,
    },
}

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The API server (in-cluster config, else KUBECONFIG).
    Kubernetes,
    /// A YAML file or a directory of YAML files, watched for changes.
    Files(PathBuf),
}

impl std::str::FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("the source is empty: use `kubernetes` or a path".into()),
            "kubernetes" => Ok(Self::Kubernetes),
            path => Ok(Self::Files(PathBuf::from(path))),
        }
    }
}

/// `--socket-lb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SocketLb {
    /// No socket hooks: the packet path serves pods, and the node's own processes are not
    /// served (the default while the feature is young).
    Off,
    /// The node's processes and pods: connect() and UDP sendmsg() to frontends translated in
    /// the cgroup hooks.
    On,
    /// The node's own processes only (its network namespace); pods keep the packet path, for
    /// service meshes that must see the Service address.
    HostOnly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpMode {
    /// Native (driver) XDP on NICs whose driver has it; tc alone on software interfaces
    /// (veth, bridge, bond, VLAN) and elsewhere.
    Auto,
    /// Native XDP; refused (tc serves instead) on a veth whose peer runs no XDP program, where
    /// frames XDP sends back out would be dropped.
    Native,
    /// Generic (skb) XDP.
    Generic,
    /// No XDP: the tc programs alone.
    Off,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// `kubernetes` (in-cluster config or KUBECONFIG) or a YAML file / directory of YAML files
    /// holding v1 Services, discovery.k8s.io/v1 EndpointSlices and v1 Nodes.
    #[arg(long, default_value = "kubernetes", value_name = "kubernetes|PATH")]
    pub source: Source,

    /// kubeconfig for the API server (default: the pod's service account, else ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The API server's URL, overriding the configuration's (kube-proxy: --master). Needed when
    /// the in-cluster address is the `kubernetes` Service's ClusterIP, which the agent balances.
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,

    /// This node's name (kube-proxy: --hostname-override). Defaults to $NODE_NAME, then the
    /// hostname.
    #[arg(
        long,
        alias = "hostname-override",
        env = "NODE_NAME",
        value_name = "NAME"
    )]
    pub node_name: Option<String>,

    /// The node's uplinks: NodePorts, LoadBalancer IPs and externalIPs are served there.
    #[arg(long, value_delimiter = ',', value_name = "IFACE[,IFACE]")]
    pub external_iface: Vec<String>,

    /// Pods' host-side interfaces (globs, e.g. `cali*,veth*`). Interfaces that appear later are
    /// attached automatically.
    #[arg(long, value_delimiter = ',', value_name = "GLOB[,GLOB]")]
    pub pod_ifaces: Vec<String>,

    /// bpffs directory for pinned maps and program links (a bpffs is mounted there if it is on
    /// none, or on the empty directory it cannot be made in: a fresh node's /sys/fs/bpf).
    #[arg(long, default_value = lb_datapath::loader::DEFAULT_PIN_DIR, value_name = "DIR")]
    pub bpffs_dir: PathBuf,

    /// Prometheus metrics (kube-proxy: --metrics-bind-address).
    #[arg(
        long,
        alias = "metrics-bind-address",
        default_value = "127.0.0.1:10249",
        value_name = "ADDR"
    )]
    pub metrics_addr: SocketAddr,

    /// /healthz, /readyz and /livez (kube-proxy: --healthz-bind-address).
    #[arg(
        long,
        alias = "healthz-bind-address",
        default_value = "0.0.0.0:10256",
        value_name = "ADDR"
    )]
    pub healthz_addr: SocketAddr,

    /// The same health endpoints on a port kube-proxy does not use, for the kubelet's probes:
    /// they reach the agent even while kube-proxy still holds its health port (a migration).
    #[arg(long, default_value = "0.0.0.0:10266", value_name = "ADDR")]
    pub probe_addr: SocketAddr,

    /// Node addresses that accept NodePorts and healthCheckNodePorts (kube-proxy:
    /// --nodeport-addresses): `primary` (the node's first InternalIP, else first ExternalIP),
    /// or CIDRs matched against the node's interface addresses. Default: the Node object's
    /// InternalIP and ExternalIP addresses. Never 127.0.0.1. CIDRs of both families may be
    /// given, as for kube-proxy on a dual-stack cluster: IPv4 NodePorts use the IPv4 ones (every
    /// address when there are none); IPv6 NodePorts are not served yet.
    #[arg(long, value_parser = parse_nodeport_addresses, value_name = "primary|CIDR[,CIDR]")]
    pub nodeport_addresses: Option<NodePortFlag>,

    /// Ports that external flows to backends on other nodes are source-NATed to
    /// (externalTrafficPolicy Cluster), reserved from the node's own connections
    /// (net.ipv4.ip_local_reserved_ports). Each allows one open flow per port to each backend,
    /// and a range wider than a client's ports (Linux: 32768-60999) gives each of them a port of
    /// its own, which new connections take over their backend's TIME_WAIT at once; a range
    /// reaching into the ephemeral ports (32768-60999) shrinks those of the node.
    #[arg(long, default_value = "1024-29999", value_parser = parse_port_range, value_name = "MIN-MAX")]
    pub snat_ports: RangeInclusive<u16>,

    /// Source-NAT every flow the datapath balances to the node's address (kube-proxy:
    /// --masquerade-all): backends then see the node as their client, also for pods' flows
    /// and external flows to backends on this node. As kube-proxy's, it leaves the external
    /// addresses of a Service with externalTrafficPolicy Local their clients.
    #[arg(long)]
    pub masquerade_all: bool,

    /// Serve ClusterIPs to clients outside the cluster (a service range routed to the nodes),
    /// source-NATed like external flows to other nodes' backends, as kube-proxy does; `false`
    /// rejects them.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub external_cluster_ips: bool,

    /// How external flows (NodePort, LoadBalancer IPs, externalIPs) reach backends on other
    /// nodes under externalTrafficPolicy Cluster, for Services without an `lb/forwarding-mode`
    /// annotation: `snat` (source NAT to this node, as kube-proxy) or `dsr` (TCP by direct
    /// server return: the client's address kept, replies straight from the backend's node).
    #[arg(long, value_enum, default_value_t = ForwardingMode::Snat)]
    pub forwarding_mode: ForwardingMode,

    /// XDP on the external interfaces.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    pub xdp_mode: XdpMode,

    /// Socket-level balancing (off by default): `on` attaches cgroup v2 socket hooks to
    /// --cgroup-root, so that a connect() or UDP sendto() from a process in it to a ClusterIP,
    /// LoadBalancer IP, externalIP or this node's NodePort goes to a backend directly (no
    /// per-packet NAT) while getpeername() and recvfrom() still show the Service address; a
    /// Service without endpoints fails the call with ECONNREFUSED. This is also what serves
    /// Services to the node's own processes. `host-only` does so for the node's network
    /// namespace only and leaves pods to the packet path. `off` detaches hooks an earlier run
    /// attached. Needs Linux 6.1+.
    #[arg(long, value_enum, default_value_t = SocketLb::Off)]
    pub socket_lb: SocketLb,

    /// The cgroup v2 directory whose processes get socket-level balancing (--socket-lb on or
    /// host-only).
    /// Default: the host's cgroup v2 root, from /proc/self/mountinfo (/sys/fs/cgroup, or
    /// /sys/fs/cgroup/unified on a hybrid host).
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,

    /// Largest Maglev table, a prime. A service port with N endpoints gets the smallest table
    /// of at least 100 x N slots (from a fixed ladder of primes) up to this size: larger tables
    /// balance more evenly and cost 4 bytes per slot.
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = parse_table_size)]
    pub maglev_table_size: u32,

    /// Connection-tracking entries (two per connection).
    #[arg(long, default_value_t = lb_common::maps::capacity::CT)]
    pub conntrack_max: u32,

    /// Backend sets (service ports, twice for traffic-policy Local) the datapath can hold.
    #[arg(long, default_value_t = lb_common::maps::capacity::SETS)]
    pub max_services: u32,

    /// How often the maps are re-read and every difference from the desired state repaired
    /// (kube-proxy: --sync-period), e.g. `90s`, `5m`. Changes are programmed as they come; this
    /// is the self-heal against anything else writing the maps.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub sync_period: Duration,
}

/// A duration as kube-proxy's flags take them: a number and a unit (`ms`, `s`, `m`, `h`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{s:?} has no unit (ms, s, m or h)"))?;
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if seconds < 1.0 {
        return Err(format!("{s:?} is shorter than one second"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_nodeport_addresses(s: &str) -> Result<NodePortFlag, String> {
    let values: Vec<String> = s.split(',').map(str::to_owned).collect();
    NodePortFlag::parse(&values)
}

/// The NodePort range Kubernetes allocates from by default (`--service-node-port-range`).
const NODE_PORTS: RangeInclusive<u16> = 30_000..=32_767;

/// `MIN-MAX`: at least 1024 (below are services of the node's own), clear of the default
/// NodePort range (the datapath would take NodePort traffic for replies).
fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (min, max) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is no range: use MIN-MAX, e.g. 1024-29999"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} in {s:?} is not a port (0-65535)"))
    };
    let (min, max) = (port(min)?, port(max)?);
    if min > max {
        return Err(format!("{s:?} is empty: MIN is above MAX"));
    }
    if min < 1024 {
        return Err(format!(
            "{s:?} reaches below 1024, the node's privileged ports"
        ));
    }
    if min <= *NODE_PORTS.end() && max >= *NODE_PORTS.start() {
        return Err(format!(
            "{s:?} overlaps the NodePort range {}-{}",
            NODE_PORTS.start(),
            NODE_PORTS.end()
        ));
    }
    Ok(min..=max)
}

fn parse_table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(maglev::MIN_TABLE_SIZE..=maglev::MAX_TABLE_SIZE).contains(&n) || !maglev::is_prime(n) {
        return Err(format!(
            "{n} must be a prime between {} and {}",
            maglev::MIN_TABLE_SIZE,
            maglev::MAX_TABLE_SIZE
        ));
    }
    Ok(n)
}

impl RunArgs {
    /// The node name: the flag, $NODE_NAME (folded into the flag by clap), else the hostname.
    pub fn node_name(&self) -> String {
        if let Some(name) = self.node_name.as_ref().filter(|n| !n.is_empty()) {
            return name.clone();
        }
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if ok {
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            "localhost".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn snat_port_ranges_are_checked() {
        assert_eq!(parse_port_range("40000-65535"), Ok(40_000..=65_535));
        assert_eq!(parse_port_range("61000-61000"), Ok(61_000..=61_000));
        for (bad, why) in [
            ("61000", "no range"),
            ("61000-", "not a port"),
            ("x-65535", "not a port"),
            ("61000-70000", "not a port"),
            ("65535-61000", "MIN is above MAX"),
            ("80-1000", "below 1024"),
            ("20000-31000", "NodePort range"),
            ("32767-40000", "NodePort range"),
        ] {
            let err = parse_port_range(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn documented_flags_parse() {
        let cli = Cli::try_parse_from([
            "lb-agent",
            "--source",
            "/etc/lb",
            "--node-name",
            "n1",
            "--external-iface",
            "eth0,eth1",
            "--pod-ifaces",
            "cali*,veth*",
            "--bpffs-dir",
            "/sys/fs/bpf/x",
            "--metrics-addr",
            "127.0.0.1:9000",
            "--healthz-addr",
            "0.0.0.0:9001",
        ])
        .unwrap();
        assert_eq!(cli.run.source, Source::Files("/etc/lb".into()));
        assert_eq!(cli.run.external_iface, ["eth0", "eth1"]);
        assert_eq!(cli.run.pod_ifaces, ["cali*", "veth*"]);
        assert_eq!(cli.run.node_name(), "n1");
        let cli = Cli::try_parse_from([
            "lb-agent",
            "--hostname-override",
            "n2",
            "--metrics-bind-address",
            "0.0.0.0:10249",
        ])
        .unwrap();
        assert_eq!(cli.run.node_name(), "n2");
        assert_eq!(cli.run.source, Source::Kubernetes);
        assert_eq!(
            cli.run.snat_ports,
            lb_common::maps::snat::PORT_MIN..=lb_common::maps::snat::PORT_MAX
        );
        assert!(matches!(
            Cli::try_parse_from(["lb-agent", "cleanup"])
                .unwrap()
                .command,
            Some(Command::Cleanup { .. })
        ));
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        let err = Cli::try_parse_from(["lb-agent", "--maglev-table-size", "1000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be a prime"), "{err}");
        let err = Cli::try_parse_from(["lb-agent", "--nodeport-addresses", "10.0.0.0/33"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(Cli::try_parse_from(["lb-agent", "--no-such-flag"]).is_err());
        for bad in ["30", "30x", "0.5s", "s"] {
            assert!(
                Cli::try_parse_from(["lb-agent", "--sync-period", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn sync_periods_read_like_kube_proxys() {
        let period = |s: &str| {
            Cli::try_parse_from(["lb-agent", "--sync-period", s])
                .unwrap()
                .run
                .sync_period
        };
        assert_eq!(period("90s"), Duration::from_secs(90));
        assert_eq!(period("5m"), Duration::from_secs(300));
        assert_eq!(period("1500ms"), Duration::from_millis(1500));
        assert_eq!(
            Cli::try_parse_from(["lb-agent"]).unwrap().run.sync_period,
            Duration::from_secs(60)
        );
    }
}
