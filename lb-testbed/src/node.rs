//! A node (a network namespace that routes) and its pods (namespaces behind veths).
//!
//! Pods are wired like Calico's: a pod has its /32 address on `eth0` and a default route via the
//! link-local gateway 169.254.1.1, which the node answers for on every pod veth; the node routes
//! each pod's /32 to its veth. The node side of a pod's veth is where the datapath attaches.
//!
//! Dual-stack, as Calico's IPv6 is: a pod also has an IPv6 address, the twin of its IPv4 one
//! ([`crate::addressing::ipv6_twin`]), as a /128 on `eth0`, and a default route via the
//! link-local fe80::1, which every pod veth of the node holds; the node routes each pod's /128
//! to its veth and forwards IPv6 too. IPv6 addresses are added without duplicate address
//! detection (`nodad`), so that they are usable at once.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};

use crate::{
    addressing::ipv6_twin,
    netns::{Netns, unique_prefix},
    server::Server,
};

/// The gateway address every pod routes through (answered by the node).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway every pod routes through: a link-local address on every pod veth of the
/// node.
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Its IPv6 address: the twin of `ip`.
    pub ip6: Ipv6Addr,
    /// Name of the pod's veth on the node side (in the node's namespace).
    pub host_iface: String,
}

#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub pods: Vec<Pod>,
    /// Pods' namespaces are named `<pod_ns_prefix>-<pod name>`.
    pod_ns_prefix: String,
}

impl Node {
    /// A node namespace that forwards IPv4 and IPv6 and answers for the pods' gateways, under a
    /// prefix of its own.
    pub fn new(name: &str) -> Result<Self> {
        let prefix = unique_prefix("n");
        Self::create(name, format!("{prefix}-{name}"), prefix)
    }

    /// A node of a bed whose namespaces all share `bed_prefix` (so that one look at
    /// `ip netns list` finds everything the bed made): the node is `<bed_prefix>-<name>`, its
    /// pods `<bed_prefix>-<name>-<pod>`.
    pub fn in_bed(bed_prefix: &str, name: &str) -> Result<Self> {
        let ns_name = format!("{bed_prefix}-{name}");
        Self::create(name, ns_name.clone(), ns_name)
    }

    fn create(name: &str, ns_name: String, pod_ns_prefix: String) -> Result<Self> {
        let ns = Netns::new(ns_name)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for scope in ["all", "default"] {
            ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
        }
        ns.ip(&["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", "lo"])?;
        Ok(Self {
            name: name.to_owned(),
            ns,
            pods: Vec::new(),
            pod_ns_prefix,
        })
    }

    /// Adds a pod `name` with address `ip` (and its IPv6 twin) running a `hostnames` server on
    /// `port` (TCP and UDP, both families) that answers as `name`; the server serves until
    /// dropped.
    pub fn add_hostnames_pod(&mut self, name: &str, ip: Ipv4Addr, port: u16) -> Result<Server> {
        let index = self.add_pod(name, ip)?;
        Server::hostnames(&self.pods[index].ns, name, port)
            .with_context(|| format!("starting the hostnames server of pod {name}"))
    }

    /// Adds a pod with address `ip` (and its IPv6 twin); returns its index in `pods`.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<usize> {
        let index = self.pods.len();
        let ip6 = ipv6_twin(ip);
        let ns = Netns::new(format!("{}-{name}", self.pod_ns_prefix))?;
        let host_iface = format!("lbpod{index}");
        self.ns
            .add_veth(&host_iface, &ns, "eth0")
            .with_context(|| format!("creating the veth of pod {name}"))?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            &POD_GATEWAY.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &POD_GATEWAY.to_string(),
            "dev",
            "eth0",
        ])?;
        let ip6_cidr = format!("{ip6}/128");
        ns.ip(&["-6", "addr", "add", &ip6_cidr, "dev", "eth0", "nodad"])?;
        let gateway6 = POD_GATEWAY6.to_string();
        ns.ip(&[
            "-6", "route", "add", "default", "via", &gateway6, "dev", "eth0",
        ])?;
        self.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{POD_GATEWAY6}/64"),
            "dev",
            &host_iface,
            "nodad",
        ])?;
        self.ns.ip(&["link", "set", &host_iface, "up"])?;
        self.ns
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &host_iface])?;
        self.ns
            .ip(&["-6", "route", "add", &ip6_cidr, "dev", &host_iface])?;
        // No 0.8 s proxy-ARP delay: the first packet of a test must not wait for it.
        self.ns
            .sysctl(&format!("net.ipv4.neigh.{host_iface}.proxy_delay"), "0")?;
        self.pods.push(Pod {
            name: name.to_owned(),
            ns,
            ip,
            ip6,
            host_iface,
        });
        Ok(index)
    }

    pub fn find_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.find_pod(name)
            .unwrap_or_else(|| panic!("no pod {name} on {}", self.name))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Pods first (their veths go with them), then the node.
        self.pods.clear();
    }
}
