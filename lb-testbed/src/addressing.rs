//! The address plan of a cluster bed: one /24 LAN joining the nodes and the external client,
//! and one /24 of pod addresses per node out of a /16.
//!
//! The bed is dual-stack: every address of the plan has an IPv6 twin ([`ipv6_twin`]), a ULA
//! that reads as the IPv4 one (`10.10.1.2` is `fd00:10:10:1::2`, `192.168.50.10` is
//! `fd00:192:168:50::10`), and every /24 of the plan a /64 twin (`10.10.1.0/24` is
//! `fd00:10:10:1::/64`): the pods' /16 is `fd00:10:10::/48`, the LAN `fd00:192:168:50::/64`.
//!
//! Kept apart from the namespaces so the plan can be read (and tested) without root.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Result, ensure};

/// The first 16 bits of every IPv6 twin: the ULA range `fd00::/8`.
const ULA: u16 = 0xfd00;

/// The IPv6 twin of a bed's IPv4 address: `fd00:<a>:<b>:<c>::<d>`, each octet's decimal digits
/// written as hex digits, so that it reads as the IPv4 address (`10.0.1.12` is
/// `fd00:10:0:1::12`). One to one, and a /24 of IPv4 becomes the /64 `fd00:<a>:<b>:<c>::/64`.
pub const fn ipv6_twin(ip: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = ip.octets();
    Ipv6Addr::new(ULA, digits(a), digits(b), digits(c), 0, 0, 0, digits(d))
}

/// The /64 twin of the /24 holding `ip` ([`ipv6_twin`]), as a CIDR.
pub fn ipv6_twin_cidr64(ip: Ipv4Addr) -> String {
    let [a, b, c, _] = ip.octets();
    format!("{}/64", ipv6_twin(Ipv4Addr::new(a, b, c, 0)))
}

/// `n`'s decimal digits read as hex digits: 254 is 0x254.
const fn digits(n: u8) -> u16 {
    let n = n as u16;
    ((n / 100) << 8) | ((n / 10 % 10) << 4) | (n % 10)
}

/// Host part of the first node's uplink address: node `i` is `.10 + i` on the LAN.
const FIRST_NODE_HOST: u8 = 10;
/// Host part of the external client's address on the LAN.
const CLIENT_HOST: u8 = 2;
/// Host part of a node's first pod: `.0` is the network, `.1` is left for a bridge-style CNI
/// gateway, as Kubernetes' own pod CIDR allocations do.
const FIRST_POD_HOST: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressPlan {
    /// The LAN's /24 (the physical network of the nodes): 192.168.50.0 by default.
    pub lan: Ipv4Addr,
    /// The /16 of pod addresses: node `i` gets `<pods>.i.0/24`. 10.10.0.0 by default.
    pub pods: Ipv4Addr,
}

impl Default for AddressPlan {
    fn default() -> Self {
        Self {
            lan: Ipv4Addr::new(192, 168, 50, 0),
            pods: Ipv4Addr::new(10, 10, 0, 0),
        }
    }
}

impl AddressPlan {
    /// The largest number of nodes the plan has room for (uplink addresses `.10` to `.254`).
    pub const MAX_NODES: usize = 255 - FIRST_NODE_HOST as usize;

    /// Prefix length of the LAN.
    pub const LAN_PREFIX_LEN: u8 = 24;

    /// Prefix length of the LAN's IPv6 twin.
    pub const LAN_PREFIX_LEN6: u8 = 64;

    pub fn lan_cidr(&self) -> String {
        format!("{}/{}", self.lan, Self::LAN_PREFIX_LEN)
    }

    /// The LAN's IPv6 twin, as a CIDR.
    pub fn lan_cidr6(&self) -> String {
        ipv6_twin_cidr64(self.lan)
    }

    /// Whether the IPv6 address `ip` is on the LAN.
    pub fn on_lan6(&self, ip: Ipv6Addr) -> bool {
        ip.segments()[..4] == ipv6_twin(self.lan).segments()[..4]
    }

    /// Whether `ip` is on the LAN.
    pub fn on_lan(&self, ip: Ipv4Addr) -> bool {
        ip.octets()[..3] == self.lan.octets()[..3]
    }

    /// A LAN address with host part `host`.
    pub fn lan_ip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.lan.octets();
        Ipv4Addr::new(a, b, c, host)
    }

    /// Node `node`'s uplink address.
    pub fn node_ip(&self, node: usize) -> Ipv4Addr {
        assert!(node < Self::MAX_NODES, "node {node} is out of the plan");
        self.lan_ip(FIRST_NODE_HOST + node as u8)
    }

    /// Node `node`'s IPv6 uplink address (the twin of its IPv4 one).
    pub fn node_ip6(&self, node: usize) -> Ipv6Addr {
        ipv6_twin(self.node_ip(node))
    }

    /// The external client's first address.
    pub fn client_ip(&self) -> Ipv4Addr {
        self.lan_ip(CLIENT_HOST)
    }

    /// The external client's first IPv6 address.
    pub fn client_ip6(&self) -> Ipv6Addr {
        ipv6_twin(self.client_ip())
    }

    /// Node `node`'s pod range, as a CIDR.
    pub fn pod_cidr(&self, node: usize) -> String {
        format!("{}/24", self.pod_ip(node, 0))
    }

    /// Node `node`'s IPv6 pod range (a /64), as a CIDR.
    pub fn pod_cidr6(&self, node: usize) -> String {
        ipv6_twin_cidr64(self.pod_ip(node, 0))
    }

    /// The address with host part `host` in node `node`'s pod range.
    pub fn pod_ip(&self, node: usize, host: u8) -> Ipv4Addr {
        assert!(node < Self::MAX_NODES, "node {node} is out of the plan");
        let [a, b, _, _] = self.pods.octets();
        Ipv4Addr::new(a, b, node as u8, host)
    }

    /// The `index`th pod address of node `node` (0 is the first pod).
    pub fn nth_pod_ip(&self, node: usize, index: usize) -> Result<Ipv4Addr> {
        let host = usize::from(FIRST_POD_HOST) + index;
        ensure!(host < 255, "node-{node}'s pod range is full");
        Ok(self.pod_ip(node, host as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan() {
        let plan = AddressPlan::default();
        assert_eq!(plan.lan_cidr(), "192.168.50.0/24");
        assert_eq!(plan.client_ip(), Ipv4Addr::new(192, 168, 50, 2));
        assert_eq!(plan.node_ip(0), Ipv4Addr::new(192, 168, 50, 10));
        assert_eq!(plan.node_ip(3), Ipv4Addr::new(192, 168, 50, 13));
        assert_eq!(plan.pod_cidr(1), "10.10.1.0/24");
        assert_eq!(plan.nth_pod_ip(1, 0).unwrap(), Ipv4Addr::new(10, 10, 1, 2));
        assert!(plan.nth_pod_ip(0, 252).is_ok());
        assert!(plan.nth_pod_ip(0, 253).is_err());
        assert!(plan.on_lan(Ipv4Addr::new(192, 168, 50, 3)));
        assert!(!plan.on_lan(Ipv4Addr::new(192, 168, 51, 3)));
    }

    #[test]
    fn ipv6_twins_read_as_their_ipv4_addresses() {
        let plan = AddressPlan::default();
        assert_eq!(plan.lan_cidr6(), "fd00:192:168:50::/64");
        assert_eq!(
            plan.client_ip6(),
            "fd00:192:168:50::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            plan.node_ip6(1),
            "fd00:192:168:50::11".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(plan.pod_cidr6(1), "fd00:10:10:1::/64");
        assert_eq!(
            ipv6_twin(plan.nth_pod_ip(1, 0).unwrap()),
            "fd00:10:10:1::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ipv6_twin(Ipv4Addr::new(255, 0, 9, 254)),
            "fd00:255:0:9::254".parse::<Ipv6Addr>().unwrap()
        );
        assert!(plan.on_lan6(plan.node_ip6(7)));
        assert!(!plan.on_lan6("fd00:192:168:51::2".parse().unwrap()));
        // One to one: no two addresses of a pod range share a twin.
        let twins: std::collections::BTreeSet<_> = (0..=255)
            .map(|d| ipv6_twin(Ipv4Addr::new(10, 10, 0, d)))
            .collect();
        assert_eq!(twins.len(), 256);
    }

    #[test]
    fn every_node_fits() {
        let plan = AddressPlan::default();
        assert_eq!(
            plan.node_ip(AddressPlan::MAX_NODES - 1),
            Ipv4Addr::new(192, 168, 50, 254)
        );
    }
}
