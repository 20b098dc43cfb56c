//! Direct server return: an external flow balanced to a backend on another node keeps its
//! client's address (no source NAT), and the backend's node sends the replies straight to the
//! client with the frontend as their source, so they never come back through the node the
//! client reached.
//!
//! The entry node DNATs the client's packets to the backend and routes them to the backend's
//! node. That node must learn the frontend to restore on the replies: the entry node carries it
//! in an IPv4 option ([`DsrOption`], 8 bytes) on the flow's first packet, the TCP SYN (and its
//! retransmissions); the backend's node records the flow's reply entry from it and the later
//! packets need nothing. So the option never makes a full-size packet larger than the path's MTU
//! (a SYN carries no data, short of TCP Fast Open), and no encapsulation costs every packet
//! bytes and a header to build and strip.
//!
//! TCP only: a datagram flow has no first packet the other side is sure to see, so it would
//! need the option on every datagram, 8 bytes over the MTU for full-size ones. UDP and SCTP
//! flows of a DSR frontend are source-NATed as in SNAT mode.

use crate::{
    Be16, Be32,
    conntrack::{CtEntry, FlowKey, REPLY, nat_flags},
    maps::{Backend, Frontend, NodeConfig, backend_flags, scope},
    net::proto,
};

/// The option's type byte: copied into fragments (bit 7), class 0, number 30, which RFC 4727
/// sets aside for experiments. Linux ignores options it does not know on packets it receives and
/// forwards, so a backend that reads no option still accepts the SYN.
pub const OPTION_TYPE: u8 = 0x80 | 30;
/// The option's length in bytes: type, length, the frontend's port and address.
pub const OPTION_LEN: usize = 8;
/// The largest IPv4 header length (in 32-bit words) that still has room for the option.
pub const MAX_IHL_BEFORE: u8 = 15 - (OPTION_LEN / 4) as u8;

/// The frontend a DSR flow's first packet carries to the backend's node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsrOption {
    pub addr: Be32,
    pub port: Be16,
}

impl DsrOption {
    /// The option's bytes as they go on the wire.
    #[inline(always)]
    pub const fn to_bytes(self) -> [u8; OPTION_LEN] {
        let p = self.port.raw().to_ne_bytes();
        let a = self.addr.raw().to_ne_bytes();
        [
            OPTION_TYPE,
            OPTION_LEN as u8,
            p[0],
            p[1],
            a[0],
            a[1],
            a[2],
            a[3],
        ]
    }

    /// The option in `bytes` (the first option after the fixed header), if it is ours.
    #[inline(always)]
    pub const fn from_bytes(bytes: [u8; OPTION_LEN]) -> Option<Self> {
        if bytes[0] != OPTION_TYPE || bytes[1] != OPTION_LEN as u8 {
            return None;
        }
        Some(Self {
            port: Be16::from_raw(u16::from_ne_bytes([bytes[2], bytes[3]])),
            addr: Be32::from_raw(u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]])),
        })
    }
}

/// Whether a new flow arriving in `flow_scope` to `frontend`, balanced to `backend`, goes by
/// direct server return: a TCP flow from outside to a backend on another node, on a frontend
/// the agent marked DSR (the Service's annotation or the node's default), unless the node
/// source-NATs every flow (`--masquerade-all`).
#[inline(always)]
pub const fn applies(
    flow_scope: u8,
    frontend: &Frontend,
    backend: &Backend,
    l4_proto: u8,
    config: &NodeConfig,
) -> bool {
    frontend.dsr()
        && l4_proto == proto::TCP
        && flow_scope == scope::EXTERNAL
        && backend.flags & backend_flags::LOCAL == 0
        && !config.masquerade_all()
}

/// On the backend's node: the key and entry that reverse-NAT the replies of the flow whose
/// first packet `forward` (client -> backend, already DNATed) carried `option`. The entry
/// restores the entry node's frontend as the replies' source; its flow's forward half lives on
/// that node ([`nat_flags::DSR`]). It counts for no backend set of this node.
#[inline(always)]
pub const fn reply_entry(
    forward: &FlowKey,
    option: DsrOption,
    flags: u8,
    deadline_ns: u64,
) -> (FlowKey, CtEntry) {
    let key = FlowKey::new(
        forward.dst_addr,
        forward.dst_port,
        forward.src_addr,
        forward.src_port,
        forward.proto,
        REPLY,
    );
    let entry = CtEntry {
        deadline_ns,
        backend_id: REMOTE,
        set_id: REMOTE,
        nat_addr: option.addr,
        nat_port: option.port,
        flags,
        nat_flags: nat_flags::DSR,
        snat_addr: forward.src_addr,
        snat_port: forward.src_port,
        _pad2: [0; 2],
    };
    (key, entry)
}

/// `set_id` and `backend_id` of a reply entry a DSR flow's first packet made on its backend's
/// node: the frontend and its backend set are another node's. No backend set has this id.
pub const REMOTE: u32 = u32::MAX - 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::frontend_flags;

    #[test]
    fn option_round_trips_in_wire_order() {
        let option = DsrOption {
            addr: Be32::from_ip(core::net::Ipv4Addr::new(192, 168, 1, 10)),
            port: Be16::from_host(30080),
        };
        let bytes = option.to_bytes();
        assert_eq!(bytes, [0x9e, 8, 0x75, 0x80, 192, 168, 1, 10]);
        assert_eq!(DsrOption::from_bytes(bytes), Some(option));
        let mut other = bytes;
        other[0] = 0x94; // Router Alert
        assert_eq!(DsrOption::from_bytes(other), None);
        let mut short = bytes;
        short[1] = 4;
        assert_eq!(DsrOption::from_bytes(short), None);
    }

    #[test]
    fn applies_to_external_tcp_flows_to_remote_backends_of_dsr_frontends() {
        let dsr = Frontend {
            flags: frontend_flags::DSR,
            ..Frontend::default()
        };
        let remote = Backend::default();
        let local = Backend {
            flags: backend_flags::LOCAL,
            ..Backend::default()
        };
        let config = NodeConfig::default();
        assert!(applies(scope::EXTERNAL, &dsr, &remote, proto::TCP, &config));
        assert!(!applies(
            scope::EXTERNAL,
            &Frontend::default(),
            &remote,
            proto::TCP,
            &config
        ));
        assert!(!applies(scope::EXTERNAL, &dsr, &local, proto::TCP, &config));
        assert!(!applies(
            scope::INTERNAL,
            &dsr,
            &remote,
            proto::TCP,
            &config
        ));
        assert!(!applies(
            scope::EXTERNAL,
            &dsr,
            &remote,
            proto::UDP,
            &config
        ));
        let masquerading = NodeConfig {
            flags: crate::maps::node_flags::MASQUERADE_ALL,
            ..NodeConfig::default()
        };
        assert!(!applies(
            scope::EXTERNAL,
            &dsr,
            &remote,
            proto::TCP,
            &masquerading
        ));
    }

    #[test]
    fn reply_entry_restores_the_carried_frontend_to_the_client() {
        let ip = |d| Be32::from_ip(core::net::Ipv4Addr::new(10, 0, 0, d));
        let forward = FlowKey::new(
            ip(1),
            Be16::from_host(40000),
            ip(2),
            Be16::from_host(8080),
            proto::TCP,
            crate::conntrack::FORWARD,
        );
        let option = DsrOption {
            addr: ip(3),
            port: Be16::from_host(30080),
        };
        let (key, entry) = reply_entry(&forward, option, 0, 5);
        assert_eq!(
            key,
            FlowKey::new(
                ip(2),
                Be16::from_host(8080),
                ip(1),
                Be16::from_host(40000),
                proto::TCP,
                REPLY
            )
        );
        assert_eq!((entry.nat_addr, entry.nat_port), (option.addr, option.port));
        assert!(entry.dsr() && !entry.snat() && entry.live(4));
        assert_eq!(entry.forward_key(proto::TCP).src_addr, ip(1));
    }
}
