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
    /// The backend set the flow was balanced by, for counters.
    pub set_id: u32,
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
    /// segment was seen). A UDP flow: it is a stream, still sending
    /// [`super::timeout::UDP_STREAM_AFTER`] after it opened.
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
    /// flow as freely as an unused one: the flow is over and the backend keeps nothing of it (a
    /// backend that closed first holds TIME_WAIT instead; see [`super::SnatPort`]).
    pub const fn reusable(flags: u8) -> bool {
        flags & (RST | PEER_RST) != 0 || (closed(flags) && flags & FIN_FIRST == 0)
    }
}

/// What the reply entry reserving a source-NAT port (`held`, `None` when there is none) means for
/// a new flow (its forward key `flow`) that wants the port. The datapath takes the first `Free`
/// or `Reopened` candidate, else the first `TimeWait` one; `lbctl trace` predicts with the same
/// rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnatPort {
    /// No live flow holds it: no entry, an expired one, or a flow that is over with nothing
    /// left of it at the backend.
    Free,
    /// Held by this very client flow (same client address and port, same frontend), which a
    /// SYN reopens: it keeps its port.
    Reopened,
    /// The backend closed the old flow first and holds it in TIME_WAIT, which takes a new SYN
    /// only if its TCP timestamp is newer than the old flow's last one. Clients offset their
    /// timestamps at random (per connection on recent Linux kernels, measured), so that is so
    /// about half the time. Otherwise the backend answers with an ACK of the old flow, the
    /// client resets that TIME_WAIT and retransmits its SYN, which goes through: a delay for
    /// some new flows (Linux retransmits within a few milliseconds then), where refusing them
    /// would be a drop.
    TimeWait,
    /// Held by a live flow.
    Taken,
}

/// See [`SnatPort`]. `now` is the datapath's clock (`bpf_ktime_get_coarse_ns`).
#[inline(always)]
pub fn snat_port(held: Option<&CtEntry>, flow: &FlowKey, now: u64) -> SnatPort {
    let Some(held) = held else {
        return SnatPort::Free;
    };
    if now >= held.deadline_ns {
        return SnatPort::Free;
    }
    if held.snat_addr == flow.src_addr
        && held.snat_port == flow.src_port
        && held.nat_addr == flow.dst_addr
        && held.nat_port == flow.dst_port
    {
        return SnatPort::Reopened;
    }
    if ct_flags::reusable(held.flags) {
        SnatPort::Free
    } else if flow.proto == crate::net::proto::TCP && ct_flags::closed(held.flags) {
        SnatPort::TimeWait
    } else {
        SnatPort::Taken
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
    /// A UDP flow in its first seconds, such as a DNS query and its answer (nf_conntrack's
    /// `udp_timeout`): its entries, and the source-NAT port they may hold, are soon free again.
    pub const UDP: u64 = 30 * SECOND_NS;
    /// A UDP flow that sends past [`UDP_STREAM_AFTER`]: a stream (nf_conntrack's
    /// `udp_timeout_stream`).
    pub const UDP_STREAM: u64 = 120 * SECOND_NS;
    /// How long after it opened a UDP flow that still sends is a stream (nf_conntrack: 2 s after
    /// the first reply).
    pub const UDP_STREAM_AFTER: u64 = 2 * SECOND_NS;
}

/// The datapath rewrites an entry's deadline only when it would move by more than this.
pub const REFRESH_INTERVAL_NS: u64 = 10 * SECOND_NS;

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), padding-free (bytemuck derive), valid for every bit pattern.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::proto;

    const NOW: u64 = 2 * timeout::TCP_ESTABLISHED;

    fn flow(client: [u8; 4], port: u16, l4_proto: u8) -> FlowKey {
        FlowKey {
            src_addr: Be32::from(core::net::Ipv4Addr::from(client)),
            dst_addr: Be32::from(core::net::Ipv4Addr::new(192, 168, 50, 10)),
            src_port: Be16::from_host(port),
            dst_port: Be16::from_host(30_080),
            proto: l4_proto,
            dir: FORWARD,
            _pad: [0; 2],
        }
    }

    /// The reply entry of `owner`'s flow, with `flags`, last written `age_ns` ago.
    fn held(owner: &FlowKey, flags: u8, age_ns: u64) -> CtEntry {
        let lifetime = if ct_flags::closed(flags) {
            timeout::TCP_TIME_WAIT
        } else {
            timeout::TCP_ESTABLISHED
        };
        CtEntry {
            deadline_ns: NOW - age_ns + lifetime,
            nat_addr: owner.dst_addr,
            nat_port: owner.dst_port,
            flags: flags | ct_flags::SNAT,
            snat_addr: owner.src_addr,
            snat_port: owner.src_port,
            ..CtEntry::default()
        }
    }

    #[test]
    fn snat_ports_are_classified_by_what_their_reply_entry_holds() {
        use ct_flags::*;
        let old = flow([198, 51, 100, 1], 40_000, proto::TCP);
        let same_client = flow([198, 51, 100, 1], 40_001, proto::TCP);
        let other_client = flow([198, 51, 100, 2], 40_000, proto::TCP);
        let backend_closed_first = ESTABLISHED | FIN | FIN_FIRST | PEER_FIN;
        let second = SECOND_NS;
        let cases = [
            (None, &other_client, SnatPort::Free),
            (
                Some(held(&old, ESTABLISHED, 0)),
                &other_client,
                SnatPort::Taken,
            ),
            (
                Some(held(&old, ESTABLISHED, 0)),
                &same_client,
                SnatPort::Taken,
            ),
            (Some(held(&old, ESTABLISHED, 0)), &old, SnatPort::Reopened),
            // Expired.
            (
                Some(held(&old, ESTABLISHED, timeout::TCP_ESTABLISHED)),
                &other_client,
                SnatPort::Free,
            ),
            // Half closed: the backend may still send.
            (
                Some(held(&old, ESTABLISHED | PEER_FIN, second)),
                &other_client,
                SnatPort::Taken,
            ),
            // Over, and the backend closed second or reset: nothing left there.
            (
                Some(held(&old, ESTABLISHED | FIN | PEER_FIN, 0)),
                &other_client,
                SnatPort::Free,
            ),
            (
                Some(held(&old, ESTABLISHED | PEER_RST, 0)),
                &other_client,
                SnatPort::Free,
            ),
            // The backend closed first and holds TIME_WAIT.
            (
                Some(held(&old, backend_closed_first, second)),
                &same_client,
                SnatPort::TimeWait,
            ),
            (
                Some(held(&old, backend_closed_first, second)),
                &other_client,
                SnatPort::TimeWait,
            ),
        ];
        for (i, (entry, flow, want)) in cases.iter().enumerate() {
            assert_eq!(snat_port(entry.as_ref(), flow, NOW), *want, "case {i}");
        }
        // UDP keeps nothing at the backend, but a live flow may send again at any time.
        let udp = flow([198, 51, 100, 1], 40_000, proto::UDP);
        let mut entry = held(&udp, 0, second);
        entry.deadline_ns = NOW + timeout::UDP_STREAM;
        let other_udp = flow([198, 51, 100, 2], 40_000, proto::UDP);
        assert_eq!(snat_port(Some(&entry), &other_udp, NOW), SnatPort::Taken);
    }
}
