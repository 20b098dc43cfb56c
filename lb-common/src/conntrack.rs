//! Connection tracking: the flow key, the entry and the timeouts.
//!
//! Every load-balanced flow has two entries in [`crate::maps::LB_CT`]:
//!
//! * `FORWARD`, keyed by the packet as the client sends it (client -> frontend), holding the
//!   chosen backend: an established flow keeps its backend whatever happens to the service, for
//!   as long as that backend exists.
//! * `REPLY`, keyed by the reply as the backend sends it (backend -> client), holding the
//!   frontend address and port to restore as the reply's source.
//!
//! A flow from outside the cluster to a backend on another node is also source-NATed to this
//! node ([`ct_flags::SNAT`]) so that its replies come back here: its `FORWARD` entry holds the
//! node address and port that replace the client, and its `REPLY` entry is keyed by the reply
//! as it reaches the node (backend -> node address and SNAT port) and holds the client to
//! restore as the destination.
//!
//! Entries carry a deadline. The datapath writes an entry only when it is created, when a TCP
//! state change shortens or lengthens its lifetime, and when its deadline would move by more than
//! [`REFRESH_INTERVAL_NS`]: an established flow costs no map writes on most packets.

use bytemuck::{Pod, Zeroable};

use crate::net::{Be16, Be32};

/// [`FlowKey::dir`] of an entry keyed by the client's packets.
pub const FORWARD: u8 = 0;
/// [`FlowKey::dir`] of an entry keyed by the backend's replies.
pub const REPLY: u8 = 1;

/// Key of [`crate::maps::LB_CT`]: a 5-tuple as it appears in the packet, plus direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FlowKey {
    pub src_addr: Be32,
    pub dst_addr: Be32,
    pub src_port: Be16,
    pub dst_port: Be16,
    pub proto: u8,
    /// [`FORWARD`] or [`REPLY`].
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of [`crate::maps::LB_CT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns()` after which the entry no longer counts.
    pub deadline_ns: u64,
    /// The backend of the flow.
    pub backend_id: u32,
    /// The backend set (service id) the flow was balanced by, for counters.
    pub service_id: u32,
    /// `FORWARD`: the backend address the flow was DNATed to (checked against the backend slot, so
    /// a reused backend id never captures an old flow). `REPLY`: the frontend address that
    /// replaces the backend as the reply's source.
    pub nat_addr: Be32,
    /// Port counterpart of `nat_addr`.
    pub nat_port: Be16,
    /// [`ct_flags`] bits.
    pub flags: u8,
    pub _pad: u8,
    /// With [`ct_flags::SNAT`] only. `FORWARD`: the node address that replaces the client as
    /// the source. `REPLY`: the client address that replaces the node's as the destination.
    pub snat_addr: Be32,
    /// Port counterpart of `snat_addr`.
    pub snat_port: Be16,
    pub _pad2: [u8; 2],
}

const _: () = {
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<CtEntry>() == 32);
};

/// Bits of [`CtEntry::flags`].
pub mod ct_flags {
    /// The TCP flow completed its handshake as far as this direction can tell (a non-SYN
    /// segment was seen).
    pub const ESTABLISHED: u8 = 1 << 0;
    /// A FIN was seen in this direction.
    pub const FIN: u8 = 1 << 1;
    /// A RST was seen.
    pub const RST: u8 = 1 << 2;
    /// The flow is source-NATed to this node (see the module documentation).
    pub const SNAT: u8 = 1 << 3;
    /// With `SNAT`: a hairpin flow (a pod balanced to itself), source-NATed to the node's
    /// hairpin address and bounced straight back into the pod's interface.
    pub const HAIRPIN: u8 = 1 << 4;
    /// On a reply entry: its forward direction (the client) sent a FIN. Mirrored there when the
    /// forward entry records it, so that the reply entry, which is a source-NATed flow's port
    /// reservation, knows when the flow is closed both ways.
    pub const PEER_FIN: u8 = 1 << 5;
    /// On a reply entry: its forward direction sent a RST.
    pub const PEER_RST: u8 = 1 << 6;
    /// This direction sent its FIN before the other one did (set with `FIN` when `PEER_FIN` is
    /// not there yet). On a reply entry: the backend closed first, so it holds the connection
    /// in TIME_WAIT.
    pub const FIN_FIRST: u8 = 1 << 7;

    /// Whether a flow with these flags is over: reset, or closed in both directions (an entry
    /// learns the other direction's FIN through `PEER_FIN`).
    pub const fn closed(flags: u8) -> bool {
        flags & (RST | PEER_RST) != 0 || flags & (FIN | PEER_FIN) == FIN | PEER_FIN
    }

    /// Whether the source-NAT port reserved by a reply entry with these flags may go to another
    /// client's flow before the entry expires: the flow is over and the backend keeps nothing
    /// of it. A backend that closed first holds TIME_WAIT on (node address, port) for a minute
    /// or more and takes a new SYN on it only if its TCP timestamp is newer than the old
    /// flow's, which a different client flow's (timestamps are offset per connection) is only
    /// half the time: the port rests until the entry's TIME_WAIT deadline instead.
    pub const fn reusable(flags: u8) -> bool {
        flags & (RST | PEER_RST) != 0 || (closed(flags) && flags & FIN_FIRST == 0)
    }
}

const SECOND_NS: u64 = 1_000_000_000;

/// Timeouts in nanoseconds. The long ones mirror what kube-proxy configures for nf_conntrack so
/// that an idle connection lives at least as long as it would under kube-proxy.
pub mod timeout {
    use super::SECOND_NS;

    /// A TCP flow that has only sent a SYN.
    pub const TCP_SYN: u64 = 60 * SECOND_NS;
    /// An established TCP flow (kube-proxy: `conntrack.tcpEstablishedTimeout`, 24 h).
    pub const TCP_ESTABLISHED: u64 = 24 * 3600 * SECOND_NS;
    /// After a FIN: the other side may keep sending (kube-proxy: `tcpCloseWaitTimeout`, 1 h).
    pub const TCP_FIN: u64 = 3600 * SECOND_NS;
    /// After a RST.
    pub const TCP_RST: u64 = 10 * SECOND_NS;
    /// Closed in both directions: late segments (the last ACK, a retransmitted FIN) still find
    /// their translation (nf_conntrack's `tcp_timeout_time_wait`).
    pub const TCP_TIME_WAIT: u64 = 120 * SECOND_NS;
    /// UDP and other datagram flows (nf_conntrack's `udp_timeout_stream`).
    pub const UDP: u64 = 120 * SECOND_NS;
}

/// The datapath rewrites an entry's deadline only when it would move by more than this.
pub const REFRESH_INTERVAL_NS: u64 = 10 * SECOND_NS;

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), padding-free (bytemuck derive), valid for every bit pattern.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtEntry {}
}
