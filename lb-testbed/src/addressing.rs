//! The address plan of a cluster bed: one /24 LAN joining the nodes and the external client,
//! and one /24 of pod addresses per node out of a /16.
//!
//! Kept apart from the namespaces so the plan can be read (and tested) without root.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};

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

    pub fn lan_cidr(&self) -> String {
        format!("{}/{}", self.lan, Self::LAN_PREFIX_LEN)
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

    /// The external client's first address.
    pub fn client_ip(&self) -> Ipv4Addr {
        self.lan_ip(CLIENT_HOST)
    }

    /// Node `node`'s pod range, as a CIDR.
    pub fn pod_cidr(&self, node: usize) -> String {
        format!("{}/24", self.pod_ip(node, 0))
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
    fn every_node_fits() {
        let plan = AddressPlan::default();
        assert_eq!(
            plan.node_ip(AddressPlan::MAX_NODES - 1),
            Ipv4Addr::new(192, 168, 50, 254)
        );
    }
}
