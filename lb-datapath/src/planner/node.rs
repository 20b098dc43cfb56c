//! The node's own configuration (`LB_CONFIG`) and the flags its SNAT and hairpin addresses
//! carry in `LB_ADDRS`.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    Be32,
    maps::{AddrInfo, NodeConfig, addr_flags, hairpin, node_flags, snat},
};

use super::{Plan, Programmed, touch};
use crate::model::Desired;

/// The node configuration the desired state implies.
pub fn node_config(desired: &Desired) -> NodeConfig {
    NodeConfig {
        snat_addr: desired.snat_addr.map_or(Be32::default(), Be32::from),
        snat_port_min: desired
            .snat_ports
            .as_ref()
            .map_or(snat::PORT_MIN, |p| *p.start()),
        snat_port_max: desired
            .snat_ports
            .as_ref()
            .map_or(snat::PORT_MAX, |p| *p.end()),
        hairpin_addr: Be32::from(std::net::Ipv4Addr::from(hairpin::DEFAULT_ADDR)),
        flags: if desired.masquerade_all {
            node_flags::MASQUERADE_ALL
        } else {
            0
        } | if desired.no_external_cluster_ips {
            node_flags::NO_EXTERNAL_CLUSTER_IPS
        } else {
            0
        },
    }
}

/// The node's own addresses in a configuration (`None` where unset), with the flag each
/// carries in LB_ADDRS.
pub(super) fn node_addrs(config: &NodeConfig) -> [(Option<IpAddr>, u32); 2] {
    let set = |addr: Be32| (addr.raw() != 0).then(|| IpAddr::V4(addr.to_ip()));
    [
        (set(config.snat_addr), addr_flags::SNAT),
        (set(config.hairpin_addr), addr_flags::HAIRPIN),
    ]
}

/// Plans the node configuration when it changed, and moves the SNAT and hairpin flags to their
/// addresses.
pub(super) fn update_config(
    desired: &Desired,
    current: &mut Programmed,
    plan: &mut Plan,
    touched: &mut BTreeMap<IpAddr, Option<AddrInfo>>,
) {
    let config = node_config(desired);
    if config == current.config {
        return;
    }
    for (addr, flag) in node_addrs(&current.config) {
        if let Some(addr) = addr {
            touch(addr, current, touched);
            current.addrs.entry(addr).or_default().node_flags &= !flag;
        }
    }
    for (addr, flag) in node_addrs(&config) {
        if let Some(addr) = addr {
            touch(addr, current, touched);
            current.addrs.entry(addr).or_default().node_flags |= flag;
        }
    }
    current.config = config;
    plan.config = Some(config);
}
