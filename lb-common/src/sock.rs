//! Socket-level balancing (the cgroup v2 `sock_addr` programs): what a `connect()` or a
//! `sendmsg()` to a frontend becomes, the hash that picks its Maglev slot, and the layouts of the
//! maps only those programs use. The kernel programs call these rules; userspace (`lbctl trace`,
//! tests) calls them too.

use bytemuck::{Pod, Zeroable};

use crate::{
    Be16, Be32,
    hash::flow_hash,
    maps::{Frontend, FrontendKey},
};

/// What a `connect()` (TCP or UDP) or an unconnected UDP `sendmsg()` to a frontend does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connect {
    /// Left to the packet path: the socket connects (or sends) to the address it asked for.
    Leave,
    /// The call fails at once with [`REFUSED_ERRNO`]: the frontend has no backend that takes
    /// new connections, or the ClusterIP does not serve that port (the packet path rejects both
    /// with a TCP reset or an ICMP port unreachable, which a client also sees as
    /// `ECONNREFUSED`).
    Refuse,
    /// Connected (or sent) to a backend of the frontend.
    Balance,
}

/// The errno a refused call returns: `ECONNREFUSED` (111 on x86-64 and arm64, the architectures
/// the datapath is built for). The program sets it with `bpf_set_retval` (cgroup `sock_addr`
/// programs have it from Linux 6.1) and returns 0; without it, a 0 from the program makes the
/// syscall fail with `EPERM`.
pub const REFUSED_ERRNO: i32 = 111;

/// What a call to `frontend` (found for the destination, internal scope) does, for a client
/// whose address is `client` when the program knows it (a socket bound to an address, or any
/// socket of the node's own network namespace, whose connections leave from the node's address).
/// Session affinity and source ranges need that address; a pod's unbound socket has none yet,
/// so those frontends leave it to the packet path, which sees the pod's address on its packets.
#[inline(always)]
pub const fn on_connect(frontend: &Frontend, client: Option<Be32>) -> Connect {
    if frontend.backend_count == 0 {
        Connect::Refuse
    } else if client.is_none() && (frontend.affinity_timeout_s != 0 || frontend.has_source_ranges())
    {
        Connect::Leave
    } else {
        Connect::Balance
    }
}

/// The client's address where `frontend`'s rules need it (affinity, source ranges) and the
/// programs know it: the socket's bound address (`bound`, 0 when unbound), else the node's
/// (`node`) for a socket of the node's own namespace (`is_host`), whose connections leave from
/// the node's address. `Some(0)` when no rule needs it; `None` when one does and it is unknown
/// (see [`on_connect`]). `bound` and `node` are only asked for when needed.
#[inline(always)]
pub fn client_addr(
    frontend: &Frontend,
    is_host: bool,
    bound: impl FnOnce() -> Be32,
    node: impl FnOnce() -> Option<Be32>,
) -> Option<Be32> {
    if frontend.affinity_timeout_s == 0 && !frontend.has_source_ranges() {
        return Some(Be32::from_raw(0));
    }
    let bound = bound();
    if bound.raw() != 0 {
        return Some(bound);
    }
    if is_host {
        return node().filter(|n| n.raw() != 0);
    }
    None
}

/// The hash whose Maglev slot a socket's call to `frontend` uses. A socket has no source port
/// before `connect()`, so the socket's cookie (unique per socket for the life of the system)
/// stands in for the source address and port of the flow hash: sockets spread over the table as
/// flows from consecutive source ports do, and one socket calling again (a non-blocking
/// `connect()` repeated, every datagram of an unconnected UDP socket) gets the same backend
/// while the table is unchanged. Unlike a flow's hash it is not the same on every node: a
/// connected socket needs no other node to agree.
#[inline(always)]
pub const fn slot_hash(cookie: u64, frontend: &FrontendKey) -> u32 {
    flow_hash(
        Be32::from_raw(cookie as u32),
        frontend.addr,
        Be16::from_raw((cookie >> 32) as u16),
        frontend.port,
        frontend.proto,
    )
}

/// Key of [`crate::maps::LB_SOCK_REV`]: a socket and the backend it was connected or sent to
/// instead of a frontend. Keyed by the backend too because one unconnected UDP socket can send
/// to several frontends, and `recvmsg()` must show each reply the frontend its request went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend_addr: Be32,
    pub backend_port: Be16,
    /// IP protocol number ([`crate::net::proto`]).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`crate::maps::LB_SOCK_REV`]: the frontend the socket asked for, which
/// `getpeername()` and `recvmsg()` show while the peer is the backend of the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRev {
    pub frontend_addr: Be32,
    pub frontend_port: Be16,
    pub _pad: u16,
}

/// Value of [`crate::maps::LB_SOCK_CONFIG`]: what the socket programs need to know of the node.
/// Written by the agent when it attaches them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockConfig {
    /// The network namespace cookie of the node's own namespace (`SO_NETNS_COOKIE`): its
    /// sockets are the node's processes (host-network pods included), the others pods'.
    pub host_netns_cookie: u64,
    /// [`sock_flags`] bits.
    pub flags: u32,
    pub _pad: u32,
}

/// Bits of [`SockConfig::flags`].
pub mod sock_flags {
    /// `lb-agent --socket-lb host-only`: only the node's own sockets are balanced in the hooks;
    /// pods' are left to the packet path (service meshes that need to see the Service address).
    pub const HOST_ONLY: u32 = 1 << 0;
}

/// Why the socket programs leave a socket's call alone before looking at its frontend's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// `--socket-lb host-only` and a pod's socket.
    HostOnly,
    /// A pod's connected UDP socket: nothing per packet would move it when its backend leaves,
    /// and the agent can only close the node's own sockets, so the packet path serves its flow.
    PodConnectedUdp,
}

impl SockConfig {
    /// Whether the programs translate a call of a socket of the network namespace whose cookie
    /// is `netns`, over `proto`, `connect()` or not: `None` when they do, else why not.
    #[inline(always)]
    pub const fn skips(&self, netns: u64, proto: u8, connect: bool) -> Option<Skip> {
        if !self.serves(netns) {
            Some(Skip::HostOnly)
        } else if proto == crate::net::proto::UDP && connect && !self.is_host(netns) {
            Some(Skip::PodConnectedUdp)
        } else {
            None
        }
    }

    /// Whether the hooks balance a socket of the network namespace whose cookie is `netns`.
    #[inline(always)]
    pub const fn serves(&self, netns: u64) -> bool {
        self.flags & sock_flags::HOST_ONLY == 0 || self.is_host(netns)
    }

    /// Whether `netns` is the node's own network namespace.
    #[inline(always)]
    pub const fn is_host(&self, netns: u64) -> bool {
        self.host_netns_cookie != 0 && netns == self.host_netns_cookie
    }
}

/// Value of [`crate::maps::LB_SOCK_STATS`] (per CPU, per backend set; userspace sums the CPUs):
/// what the hooks did for the frontends of a set, whose packets then never meet the packet path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockStats {
    /// `connect()`s connected to a backend of the set.
    pub connects: u64,
    /// Unconnected UDP datagrams sent to a backend of the set.
    pub datagrams: u64,
    /// Calls refused at once (no backend takes new connections).
    pub refused: u64,
}

const _: () = {
    assert!(size_of::<SockRevKey>() == 16);
    assert!(size_of::<SockRev>() == 8);
    assert!(size_of::<SockConfig>() == 16);
    assert!(size_of::<SockStats>() == 24);
};

#[cfg(feature = "user")]
aya_pod!(SockRevKey, SockRev, SockConfig, SockStats);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_frontends_refuse_and_client_rules_need_the_clients_address() {
        let balanced = Frontend {
            backend_count: 2,
            ..Frontend::default()
        };
        let node = Some(Be32::from_ip(core::net::Ipv4Addr::new(192, 168, 1, 10)));
        assert_eq!(on_connect(&balanced, None), Connect::Balance);
        assert_eq!(on_connect(&Frontend::default(), None), Connect::Refuse);
        let sticky = Frontend {
            affinity_timeout_s: 10_800,
            ..balanced
        };
        assert_eq!(on_connect(&sticky, None), Connect::Leave);
        assert_eq!(on_connect(&sticky, node), Connect::Balance);
        let ranged = Frontend {
            source_range_id: 3,
            ..balanced
        };
        assert_eq!(on_connect(&ranged, None), Connect::Leave);
        assert_eq!(on_connect(&ranged, node), Connect::Balance);
        // No backend refuses even with affinity (as the packet path rejects everyone).
        let empty = Frontend {
            backend_count: 0,
            ..sticky
        };
        assert_eq!(on_connect(&empty, None), Connect::Refuse);
    }

    #[test]
    fn host_only_serves_the_nodes_own_namespace_only() {
        let on = SockConfig {
            host_netns_cookie: 1,
            ..SockConfig::default()
        };
        assert!(on.serves(1) && on.serves(4096));
        let host_only = SockConfig {
            flags: sock_flags::HOST_ONLY,
            ..on
        };
        assert!(host_only.serves(1) && !host_only.serves(4096));
        assert!(on.is_host(1) && !on.is_host(4096));
        // Unknown (zero) host cookie: no socket is the node's.
        assert!(!SockConfig::default().is_host(0));
        let udp = crate::net::proto::UDP;
        assert_eq!(on.skips(1, udp, true), None, "the node's connected UDP");
        assert_eq!(on.skips(4096, udp, true), Some(Skip::PodConnectedUdp));
        assert_eq!(on.skips(4096, udp, false), None, "a pod's datagrams");
        assert_eq!(host_only.skips(4096, 6, true), Some(Skip::HostOnly));
    }

    #[test]
    fn consecutive_cookies_spread_evenly() {
        let frontend = FrontendKey::new(core::net::Ipv4Addr::new(10, 96, 0, 10), 53, 6, 0);
        let mut buckets = [0u32; 64];
        for cookie in 4096..4096 + 65_536u64 {
            buckets[(slot_hash(cookie, &frontend) % 64) as usize] += 1;
        }
        let mean = 65_536 / 64;
        for count in buckets {
            assert!(count.abs_diff(mean) < mean * 15 / 100, "{buckets:?}");
        }
    }
}
