//! What the translation and the health servers need to know about the node the agent runs for,
//! read from its Node object (addresses, zone, whether it is going away) and its interfaces.

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::api::core::v1::Node;

use crate::addr;

/// The Node label naming its zone (topology hints are matched against it).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The taint the cluster autoscaler puts on a node it is about to delete: from then on the
/// node reports itself ineligible for load-balancer traffic (kube-proxy's `/healthz`).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Which node addresses serve NodePorts (`--nodeport-addresses`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Unset: the Node object's InternalIP and ExternalIP addresses.
    #[default]
    NodeAddresses,
    /// `primary`: the node's primary address only (its first InternalIP, else its first
    /// ExternalIP), kube-proxy's default in nftables mode.
    Primary,
    /// CIDRs: the node's interface addresses within them, as kube-proxy selects them (not
    /// loopback: see [`NodePortAddresses::select`]).
    Cidrs(Vec<Ipv4Net>),
}

/// The value of `--nodeport-addresses`, both families' CIDRs apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePortFlag {
    /// What IPv4 NodePorts use.
    pub ipv4: NodePortAddresses,
    /// IPv6 CIDRs, kept for IPv6 NodePorts, which this datapath does not serve yet
    /// (docs/ipv6.md): a dual-stack cluster's flag carries both families.
    pub ipv6: Vec<Ipv6Net>,
}

impl NodePortFlag {
    /// Parses the flag's value: `primary`, or CIDRs of either family (IPv4 ones with leading
    /// zeros read as kube-proxy reads them). kube-proxy does not mix `primary` with CIDRs and
    /// neither do we. As kube-proxy's proxier of each family, IPv4 takes the IPv4 CIDRs, and
    /// every IPv4 address (0.0.0.0/0) when the flag names IPv6 CIDRs only.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let values: Vec<&str> = values
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .collect();
        match values.as_slice() {
            [] => Ok(Self::default()),
            ["primary"] => Ok(Self {
                ipv4: NodePortAddresses::Primary,
                ipv6: Vec::new(),
            }),
            _ if values.contains(&"primary") => {
                Err("`primary` cannot be combined with CIDRs".into())
            }
            _ => {
                let (mut ipv4, mut ipv6) = (Vec::new(), Vec::new());
                for v in values {
                    if v.contains(':') {
                        let net: Ipv6Net = v.parse().map_err(|_| format!("{v:?} is not a CIDR"))?;
                        ipv6.push(net.trunc());
                    } else {
                        let net = addr::ipv4_net(v)
                            .ok_or_else(|| format!("{v:?} is not a CIDR (nor `primary`)"))?;
                        ipv4.push(net.trunc());
                    }
                }
                if ipv4.is_empty() {
                    ipv4.push(Ipv4Net::default());
                }
                Ok(Self {
                    ipv4: NodePortAddresses::Cidrs(ipv4),
                    ipv6,
                })
            }
        }
    }
}

impl NodePortAddresses {
    /// Whether every address is selected (kube-proxy then binds health checks to 0.0.0.0).
    pub fn matches_all(&self) -> bool {
        match self {
            Self::NodeAddresses => true,
            Self::Primary => false,
            Self::Cidrs(nets) => nets.iter().any(|n| n.prefix_len() == 0),
        }
    }

    /// The addresses that serve NodePorts: from the Node object's addresses (`node_addrs`, in
    /// the Node's order, with their types) or the interfaces' (`local_addrs`). Loopback
    /// addresses never do: no program sees the node's own packets to them (kube-proxy's
    /// nftables mode does not answer on 127.0.0.1 either; its iptables mode does).
    fn select(&self, node_addrs: &[(&str, Ipv4Addr)], local_addrs: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
        let mut out: Vec<Ipv4Addr> = match self {
            Self::NodeAddresses => node_addrs
                .iter()
                .filter(|(kind, _)| *kind == "InternalIP" || *kind == "ExternalIP")
                .map(|(_, ip)| *ip)
                .collect(),
            Self::Primary => primary(node_addrs).into_iter().collect(),
            Self::Cidrs(nets) => local_addrs
                .iter()
                .copied()
                .filter(|ip| nets.iter().any(|n| n.contains(ip)))
                .collect(),
        };
        out.retain(|ip| !ip.is_loopback() && !ip.is_unspecified());
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// kube-proxy's node IP: the first InternalIP, else the first ExternalIP.
fn primary(node_addrs: &[(&str, Ipv4Addr)]) -> Option<Ipv4Addr> {
    let first = |kind: &str| {
        node_addrs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, ip)| *ip)
    };
    first("InternalIP").or_else(|| first("ExternalIP"))
}

/// What the translation needs to know about the node it runs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    /// Addresses that accept NodePorts (see [`NodePortAddresses`]).
    pub nodeport_addrs: Vec<Ipv4Addr>,
    /// The node's first IPv4 InternalIP: external flows to backends on other nodes are
    /// source-NATed to it, so that their replies come back through this node.
    pub snat_addr: Option<Ipv4Addr>,
    /// kube-proxy's node IP (first InternalIP, else first ExternalIP): a LoadBalancer's own
    /// address is an allowed source under loadBalancerSourceRanges only when a range holds it.
    pub primary_addr: Option<Ipv4Addr>,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// False while the Node is being deleted or tainted ToBeDeletedByClusterAutoscaler.
    pub eligible: bool,
    /// How external flows to other nodes' backends are forwarded when a Service does not say
    /// (`lb-agent --forwarding-mode`).
    pub forwarding: ForwardingMode,
}

/// How external flows (NodePort, LoadBalancer IPs, externalIPs, externalTrafficPolicy Cluster)
/// reach backends on other nodes: `lb-agent --forwarding-mode`, and a Service's
/// `lb/forwarding-mode` annotation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardingMode {
    /// Source NAT to this node, as kube-proxy does: replies come back through it. Works on
    /// every network.
    #[default]
    Snat,
    /// Direct server return for TCP: the client's address is kept and the backend's node
    /// answers the client itself, from the frontend's address. Every node must run a version
    /// that serves it, and the network must let a node send packets from another node's
    /// address (docs/datapath.md). UDP and SCTP flows stay source-NATed.
    Dsr,
}

impl ForwardingMode {
    /// The mode an annotation value names: the flag's own spelling.
    pub fn parse(value: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(value, false).ok()
    }

    /// Its name, as the flag and the annotation spell it.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

impl NodeContext {
    /// A node not known yet: no addresses, eligible (kube-proxy's start-up assumption).
    pub fn unknown(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            eligible: true,
            ..Self::default()
        }
    }

    /// Reads the Node object (`None` while it is not known) and the node's interface
    /// addresses.
    pub fn from_node(
        name: &str,
        node: Option<&Node>,
        nodeport: &NodePortAddresses,
        local_addrs: &[Ipv4Addr],
    ) -> Self {
        let node_addrs: Vec<(&str, Ipv4Addr)> = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|a| Some((a.type_.as_str(), addr::ipv4(&a.address)?)))
            .collect();
        let being_deleted = node.is_some_and(|n| n.metadata.deletion_timestamp.is_some());
        let autoscaled_away = node
            .and_then(|n| n.spec.as_ref())
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        Self {
            name: name.to_owned(),
            nodeport_addrs: nodeport.select(&node_addrs, local_addrs),
            snat_addr: node_addrs
                .iter()
                .find(|(kind, _)| *kind == "InternalIP")
                .map(|(_, ip)| *ip),
            primary_addr: primary(&node_addrs),
            zone: node
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(ZONE_LABEL))
                .cloned(),
            eligible: !being_deleted && !autoscaled_away,
            // The agent's flag, which the caller sets (`Reconciler::set_forwarding_mode`).
            forwarding: ForwardingMode::default(),
        }
    }
}

/// The IPv4 addresses of the interfaces of the calling thread's network namespace.
pub fn local_addrs() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list freed below with freeifaddrs; each
    // entry's address, when present, is a sockaddr of the family it names.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cursor = list;
        while !cursor.is_null() {
            let sa = (*cursor).ifa_addr;
            if !sa.is_null() && i32::from((*sa).sa_family) == libc::AF_INET {
                let sin = std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>());
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cursor = (*cursor).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn nodeport_addresses_parse_as_kube_proxys_flag() {
        let ipv4 = |values: &[&str]| NodePortFlag::parse(&strings(values)).map(|f| f.ipv4);
        let cidrs = |nets: &[&str]| {
            Ok(NodePortAddresses::Cidrs(
                nets.iter().map(|n| n.parse().unwrap()).collect(),
            ))
        };
        assert_eq!(ipv4(&[]), Ok(NodePortAddresses::NodeAddresses));
        assert_eq!(ipv4(&["primary"]), Ok(NodePortAddresses::Primary));
        assert_eq!(
            ipv4(&["10.0.0.1/16", "192.168.1.0/24"]),
            cidrs(&["10.0.0.0/16", "192.168.1.0/24"])
        );
        for bad in [
            &["primary", "10.0.0.0/8"][..],
            &["10.0.0.0/33"],
            &["10.0.0.1"],
            &["fd00::/129"],
            &["fd00::1"],
        ] {
            let err = NodePortFlag::parse(&strings(bad)).unwrap_err();
            assert!(!err.is_empty(), "{bad:?}");
        }
        assert!(NodePortAddresses::Cidrs(vec!["0.0.0.0/0".parse().unwrap()]).matches_all());
        assert!(!NodePortAddresses::Primary.matches_all());
    }

    /// A dual-stack cluster's flag: IPv4 takes its own CIDRs, and every address when only IPv6
    /// ones are named (kube-proxy's `NewNodePortAddresses` for the IPv4 family).
    #[test]
    fn nodeport_addresses_of_both_families_give_ipv4_its_own() {
        let both = NodePortFlag::parse(&strings(&["10.0.0.0/8", "fd00::1/64"])).unwrap();
        assert_eq!(
            both.ipv4,
            NodePortAddresses::Cidrs(vec!["10.0.0.0/8".parse().unwrap()])
        );
        assert_eq!(both.ipv6, ["fd00::/64".parse::<Ipv6Net>().unwrap()]);
        assert!(!both.ipv4.matches_all());

        let ipv6_only = NodePortFlag::parse(&strings(&["fd00::/64"])).unwrap();
        assert_eq!(
            ipv6_only.ipv4,
            NodePortAddresses::Cidrs(vec!["0.0.0.0/0".parse().unwrap()])
        );
        assert!(ipv6_only.ipv4.matches_all());
    }

    #[test]
    fn loopback_never_serves_node_ports() {
        let all = NodePortAddresses::Cidrs(vec!["0.0.0.0/0".parse().unwrap()]);
        let local = [Ipv4Addr::LOCALHOST, Ipv4Addr::new(192, 168, 0, 2)];
        assert_eq!(all.select(&[], &local), [Ipv4Addr::new(192, 168, 0, 2)]);
    }
}
