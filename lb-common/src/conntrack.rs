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

use crate::{
    hash::flow_hash,
    net::{Address, Be16, Be32, Be128, proto, tcp_flags},
    time::SECOND_NS,
};

/// [`FlowKey::dir`] of an entry keyed by the client's packets.
pub const FORWARD: u8 = 0;
/// [`FlowKey::dir`] of an entry keyed by the backend's replies.
pub const REPLY: u8 = 1;

/// Key of [`crate::maps::LB_CT`]: an IPv4 flow's [`FlowKeyOf`].
pub type FlowKey = FlowKeyOf<Be32>;
/// Key of [`crate::maps::LB6_CT`]: an IPv6 flow's [`FlowKeyOf`].
pub type FlowKey6 = FlowKeyOf<Be128>;
/// Value of [`crate::maps::LB_CT`].
pub type CtEntry = CtEntryOf<Be32>;
/// Value of [`crate::maps::LB6_CT`].
pub type CtEntry6 = CtEntryOf<Be128>;

/// A conntrack key: a 5-tuple as it appears in the packet, plus direction; `A` is the address
/// family's address ([`Address`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Zeroable)]
pub struct FlowKeyOf<A> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: Be16,
    pub dst_port: Be16,
    pub proto: u8,
    /// [`FORWARD`] or [`REPLY`].
    pub dir: u8,
    pub _pad: [u8; 2],
}

impl<A: Address> FlowKeyOf<A> {
    /// The key of a packet `src_addr:src_port -> dst_addr:dst_port` in direction `dir`.
    #[inline(always)]
    pub const fn new(
        src_addr: A,
        src_port: Be16,
        dst_addr: A,
        dst_port: Be16,
        proto: u8,
        dir: u8,
    ) -> Self {
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            dir,
            _pad: [0; 2],
        }
    }

    /// The same 5-tuple in direction `dir`.
    #[inline(always)]
    pub const fn with_dir(self, dir: u8) -> Self {
        Self { dir, ..self }
    }

    /// The reply-direction key of this flow when nothing of it is translated: its destination
    /// answers its source.
    #[inline(always)]
    pub const fn reply_as_is(&self) -> Self {
        Self::new(
            self.dst_addr,
            self.dst_port,
            self.src_addr,
            self.src_port,
            self.proto,
            REPLY,
        )
    }

    /// The reply-direction key of the forward flow `self`, whose entry is `forward`: replies come
    /// from the backend (the entry's NAT address) and address the client, or, for a source-NATed
    /// flow, the node address and port the client was replaced with.
    #[inline(always)]
    pub const fn reply_of(&self, forward: &CtEntryOf<A>) -> Self {
        let (dst_addr, dst_port) = if forward.flags & ct_flags::SNAT != 0 {
            (forward.snat_addr, forward.snat_port)
        } else {
            (self.src_addr, self.src_port)
        };
        Self::new(
            forward.nat_addr,
            forward.nat_port,
            dst_addr,
            dst_port,
            self.proto,
            REPLY,
        )
    }
}

impl FlowKey {
    /// The flow hash of the 5-tuple (see [`flow_hash`]): Maglev's slot and the SNAT candidates.
    #[inline(always)]
    pub const fn hash(&self) -> u32 {
        flow_hash(
            self.src_addr,
            self.dst_addr,
            self.src_port,
            self.dst_port,
            self.proto,
        )
    }
}

impl FlowKey6 {
    /// The flow hash of the 5-tuple, its addresses folded ([`Address::fold`]).
    #[inline(always)]
    pub fn hash(&self) -> u32 {
        flow_hash(
            self.src_addr.fold(),
            self.dst_addr.fold(),
            self.src_port,
            self.dst_port,
            self.proto,
        )
    }
}

/// A conntrack entry (see [`CtEntry`], [`CtEntry6`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Zeroable)]
pub struct CtEntryOf<A> {
    /// `bpf_ktime_get_coarse_ns()` after which the entry no longer counts.
    pub deadline_ns: u64,
    /// The backend of the flow.
    pub backend_id: u32,
    /// The backend set the flow was balanced by, for counters.
    pub set_id: u32,
    /// `FORWARD`: the backend address the flow was DNATed to, where its packets keep going
    /// whatever becomes of the backend. `REPLY`: the frontend address that replaces the
    /// backend as the reply's source.
    pub nat_addr: A,
    /// Port counterpart of `nat_addr`.
    pub nat_port: Be16,
    /// [`ct_flags`] bits.
    pub flags: u8,
    /// [`nat_flags`] bits (a byte of padding before they existed: zero in entries of earlier
    /// versions, which is right for them).
    pub nat_flags: u8,
    /// With [`ct_flags::SNAT`] only. `FORWARD`: the address that replaces the client as the
    /// source (the node's, the hairpin address, or the client's own when only its port is
    /// remapped). `REPLY`: the client address restored as the destination.
    pub snat_addr: A,
    /// Port counterpart of `snat_addr`.
    pub snat_port: Be16,
    pub _pad2: [u8; 2],
}

const _: () = {
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<CtEntry>() == 32);
    assert!(size_of::<FlowKey6>() == 40);
    assert!(size_of::<CtEntry6>() == 56);
};

// SAFETY: `repr(C)`; the sizes asserted above are the sums of the fields' sizes, so there is no
// padding, and every field is `Pod` (bytemuck's derive cannot check generic structs itself).
unsafe impl Pod for FlowKey {}
// SAFETY: as above.
unsafe impl Pod for FlowKey6 {}
// SAFETY: as above.
unsafe impl Pod for CtEntry {}
// SAFETY: as above.
unsafe impl Pod for CtEntry6 {}

impl<A: Address> CtEntryOf<A> {
    /// Whether the entry still counts at `now`.
    #[inline(always)]
    pub const fn live(&self, now: u64) -> bool {
        now < self.deadline_ns
    }

    /// Whether the flow is source-NATed (to the node, or to the hairpin address).
    #[inline(always)]
    pub const fn snat(&self) -> bool {
        self.flags & ct_flags::SNAT != 0
    }

    /// Whether the flow is a hairpin flow (a pod balanced to itself).
    #[inline(always)]
    pub const fn hairpin(&self) -> bool {
        self.flags & ct_flags::HAIRPIN != 0
    }

    /// Whether only the client's port is rewritten ([`nat_flags::CLIENT_PORT`]).
    #[inline(always)]
    pub const fn client_port_remapped(&self) -> bool {
        self.nat_flags & nat_flags::CLIENT_PORT != 0
    }

    /// Whether the node routes this flow into a pod's interface ([`nat_flags::POD_ROUTE`]).
    #[inline(always)]
    pub const fn pod_route(&self) -> bool {
        self.nat_flags & nat_flags::POD_ROUTE != 0
    }

    /// Whether the flow goes by direct server return ([`nat_flags::DSR`]).
    #[inline(always)]
    pub const fn dsr(&self) -> bool {
        self.nat_flags & nat_flags::DSR != 0
    }

    /// Whether the flow is over as far as this node can tell: closed both ways, or reset
    /// ([`ct_flags::closed`]), or a DSR flow whose one visible direction sent its FIN. A node
    /// sees one direction of a DSR flow only: the entry node the client's segments (`FIN` on
    /// its forward entry, `PEER_FIN` on its reply entry), the backend's node the backend's
    /// (`FIN`). The other FIN never passes, so the flow would otherwise never count as closed
    /// there: it would hold its client port for the hour a half-closed flow may last, and a new
    /// connection of the same four addresses and ports would be taken for the old one. Once
    /// one side has closed, the flow is over or in TIME_WAIT at the backend.
    #[inline(always)]
    pub const fn closed_as_seen(&self) -> bool {
        ct_flags::closed(self.flags)
            || (self.dsr() && self.flags & (ct_flags::FIN | ct_flags::PEER_FIN) != 0)
    }

    /// Whether the entry is a direct connection's ([`DIRECT`]).
    #[inline(always)]
    pub const fn direct(&self) -> bool {
        self.set_id == DIRECT
    }

    /// The forward entry of the direct connection `flow` (its destination kept) that takes
    /// source port `port` instead of its own, with TCP state `flags` until `deadline_ns`.
    #[inline(always)]
    pub const fn direct_forward(
        flow: &FlowKeyOf<A>,
        port: Be16,
        flags: u8,
        deadline_ns: u64,
    ) -> Self {
        Self {
            deadline_ns,
            backend_id: DIRECT,
            set_id: DIRECT,
            nat_addr: flow.dst_addr,
            nat_port: flow.dst_port,
            flags: flags | ct_flags::SNAT,
            nat_flags: nat_flags::CLIENT_PORT,
            snat_addr: flow.src_addr,
            snat_port: port,
            _pad2: [0; 2],
        }
    }

    /// Whether the flow is source-NATed to this node, which then routes its packets (every
    /// source-NATed flow but hairpin flows, bounced back into their pod, and flows whose client
    /// keeps its address, which go on through the stack). DSR flows are routed too, with their
    /// client's address ([`CtEntry::dsr`]).
    #[inline(always)]
    pub const fn routed(&self) -> bool {
        self.flags & (ct_flags::SNAT | ct_flags::HAIRPIN) == ct_flags::SNAT
            && !self.client_port_remapped()
    }

    /// Whether a forward entry keeps its flow for a packet with TCP flags `seg_flags` (0 for
    /// UDP, or when the packet's flags are unknown) at `now`: it has not expired, and the packet
    /// is no bare SYN reopening a flow that is over ([`CtEntry::closed_as_seen`]: that one is
    /// balanced anew). A SYN on a half-closed flow is not a new connection, as nf_conntrack
    /// holds too.
    #[inline(always)]
    pub const fn continues(&self, seg_flags: u8, now: u64) -> bool {
        let reopening = tcp_flags::opens(seg_flags) && self.closed_as_seen();
        self.live(now) && !reopening
    }

    /// The forward key of the flow whose reply entry this is: its client (the source the reply
    /// entry restores as destination) to its frontend (the one it restores as source).
    #[inline(always)]
    pub const fn forward_key(&self, l4_proto: u8) -> FlowKeyOf<A> {
        FlowKeyOf::new(
            self.snat_addr,
            self.snat_port,
            self.nat_addr,
            self.nat_port,
            l4_proto,
            FORWARD,
        )
    }

    /// Whether this reply entry belongs to the forward flow `forward_key`. A source-NATed flow's
    /// port goes to a new flow once the old one closed: the reply entry under the key may then
    /// be the new flow's.
    #[inline(always)]
    pub fn replies_to(&self, forward_key: &FlowKeyOf<A>) -> bool {
        self.snat_addr == forward_key.src_addr && self.snat_port == forward_key.src_port
    }

    /// The reply-direction entry of the forward flow `forward_key` (entry `forward`): it restores
    /// the frontend (the forward key's destination) as the source of the backend's replies, and,
    /// for a source-NATed flow, the client as their destination.
    #[inline(always)]
    pub const fn reply_of(
        forward_key: &FlowKeyOf<A>,
        forward: &CtEntryOf<A>,
        flags: u8,
        deadline_ns: u64,
    ) -> Self {
        Self {
            deadline_ns,
            backend_id: forward.backend_id,
            set_id: forward.set_id,
            nat_addr: forward_key.dst_addr,
            nat_port: forward_key.dst_port,
            flags: flags | (forward.flags & (ct_flags::SNAT | ct_flags::HAIRPIN)),
            nat_flags: forward.nat_flags,
            snat_addr: forward_key.src_addr,
            snat_port: forward_key.src_port,
            _pad2: [0; 2],
        }
    }

    /// The forward-direction entry of the flow whose reply entry is `reply` (under `reply_key`):
    /// what [`CtEntry::reply_of`] made `reply` from, so that the forward half of a flow can be
    /// recovered when the LRU evicted it and its reply half is written.
    #[inline(always)]
    pub const fn forward_of(
        reply_key: &FlowKeyOf<A>,
        reply: &CtEntryOf<A>,
        flags: u8,
        deadline_ns: u64,
    ) -> Self {
        let (snat_addr, snat_port) = if reply.flags & ct_flags::SNAT != 0 {
            (reply_key.dst_addr, reply_key.dst_port)
        } else {
            (A::ZERO, Be16::from_raw(0))
        };
        Self {
            deadline_ns,
            backend_id: reply.backend_id,
            set_id: reply.set_id,
            nat_addr: reply_key.src_addr,
            nat_port: reply_key.src_port,
            flags: flags | (reply.flags & (ct_flags::SNAT | ct_flags::HAIRPIN)),
            nat_flags: reply.nat_flags,
            snat_addr,
            snat_port,
            _pad2: [0; 2],
        }
    }
}

/// `set_id` and `backend_id` of the entries of a direct connection: one that concerns no
/// frontend (a pod connecting to another pod's address), recorded only because its source port
/// had to change. Linux gives one local port to connections to different destinations; when a
/// load-balanced flow of that client port was balanced to this same destination, it holds the
/// reply key the direct connection would use, so, as nf_nat does, the direct connection gets
/// another source port ([`nat_flags::CLIENT_PORT`]). No backend set has this id: such a flow is
/// counted for no service and flushed with none.
pub const DIRECT: u32 = u32::MAX;

/// Whether a direct connection (see [`DIRECT`]) whose own reply key holds `held` must take
/// another source port: any live entry there is another flow's (a direct connection's own never
/// uses that key), and its replies would be reverse-NATed as that flow's, even after it closed.
#[inline(always)]
pub const fn direct_clashes<A: Address>(held: &CtEntryOf<A>, now: u64) -> bool {
    held.live(now)
}

/// Bits of [`CtEntry::nat_flags`].
pub mod nat_flags {
    /// With `ct_flags::SNAT`: only the client's port is rewritten, its address kept. Linux gives
    /// one local port to connections to different destinations, so two flows of one client
    /// port may be balanced to the same backend (a ClusterIP and a LoadBalancer IP of one
    /// Service): the second would take the first's reply entry. As nf_nat does, the second
    /// gets another source port instead (see `crate::snat::client_port_range`).
    pub const CLIENT_PORT: u8 = 1 << 0;
    /// With `ct_flags::SNAT` (to the node): the node routes this flow's packets or its replies
    /// into a pod's interface on this node (`--masquerade-all`: a client pod, or a backend on
    /// this node; see `crate::snat::routes_to_pod`). XDP leaves such packets untouched to the
    /// tc program behind it, which can redirect into a veth.
    pub const POD_ROUTE: u8 = 1 << 1;
    /// Direct server return ([`crate::dsr`]), without `ct_flags::SNAT`. On the entry node's
    /// entries: the node routes the client's packets, DNATed, to the backend's node, and the
    /// replies never come back through it. On the reply entry the backend's node made from the
    /// first packet's option: its forward half lives on the entry node.
    pub const DSR: u8 = 1 << 2;
}

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
    /// backend that closed first holds TIME_WAIT instead; see [`crate::snat::SnatPort`]).
    pub const fn reusable(flags: u8) -> bool {
        flags & (RST | PEER_RST) != 0 || (closed(flags) && flags & FIN_FIRST == 0)
    }
}

/// Timeouts in nanoseconds. The long ones mirror what kube-proxy configures for nf_conntrack so
/// that an idle connection lives at least as long as it would under kube-proxy.
pub mod timeout {
    use crate::time::SECOND_NS;

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
    /// An SCTP association, from its first packet: established, idle this long at most. The
    /// datapath tracks no SCTP chunks (no INIT, SHUTDOWN or ABORT state as it tracks TCP's SYN,
    /// FIN and RST: chunks are bundled and would have to be walked), so an entry lives by
    /// traffic only. An idle association still sends a HEARTBEAT on every path every 30 s
    /// (`hb_interval`) plus its RTO, so its entries stay alive; this is nf_conntrack's
    /// `sctp_timeout_established` (`hb_interval * path_max_retrans + rto_max`), what kube-proxy
    /// gives SCTP: an association is not forgotten before it would give up on its path itself,
    /// and one that ended frees its entries (and its source-NAT reservation) 210 s later.
    pub const SCTP: u64 = 210 * SECOND_NS;
}

/// The datapath rewrites an entry's deadline only when it would move by more than this.
pub const REFRESH_INTERVAL_NS: u64 = 10 * SECOND_NS;

/// How long an entry with these flags lives after its last refresh.
#[inline(always)]
pub const fn lifetime(l4_proto: u8, flags: u8) -> u64 {
    if l4_proto != proto::TCP {
        // SCTP entries are established from their first packet (see `initial`): the test of
        // the protocol costs only established datagram flows, and a UDP stream one compare.
        if flags & ct_flags::ESTABLISHED == 0 {
            timeout::UDP
        } else if l4_proto == proto::SCTP {
            timeout::SCTP
        } else {
            timeout::UDP_STREAM
        }
    } else if flags & (ct_flags::RST | ct_flags::PEER_RST) != 0 {
        timeout::TCP_RST
    } else if ct_flags::closed(flags) {
        timeout::TCP_TIME_WAIT
    } else if flags & (ct_flags::FIN | ct_flags::PEER_FIN) != 0 {
        timeout::TCP_FIN
    } else if flags & ct_flags::ESTABLISHED != 0 {
        timeout::TCP_ESTABLISHED
    } else {
        timeout::TCP_SYN
    }
}

/// A TCP entry's flags after a segment with `seg_flags` went through.
#[inline(always)]
pub const fn next_tcp_flags(flags: u8, seg_flags: u8) -> u8 {
    let mut next = flags;
    if seg_flags & tcp_flags::SYN == 0 {
        next |= ct_flags::ESTABLISHED;
    }
    if seg_flags & tcp_flags::FIN != 0 && flags & ct_flags::FIN == 0 {
        next |= ct_flags::FIN;
        if flags & ct_flags::PEER_FIN == 0 {
            next |= ct_flags::FIN_FIRST;
        }
    }
    if seg_flags & tcp_flags::RST != 0 {
        next |= ct_flags::RST;
    }
    next
}

/// A datagram flow's flags after a packet at `now`, its entry's deadline being `deadline`: it
/// becomes a stream when it sends past its first seconds. Until then its entry was last written
/// when it opened (a later refresh only makes it look younger).
#[inline(always)]
pub const fn next_datagram_flags(flags: u8, deadline: u64, now: u64) -> u8 {
    let opened = deadline.saturating_sub(timeout::UDP);
    if flags & ct_flags::ESTABLISHED == 0 && now >= opened + timeout::UDP_STREAM_AFTER {
        flags | ct_flags::ESTABLISHED
    } else {
        flags
    }
}

/// A fresh entry's flags and deadline, for a flow opened at `now` by a packet with TCP flags
/// `seg_flags`.
#[inline(always)]
pub const fn initial(l4_proto: u8, seg_flags: u8, now: u64) -> (u8, u64) {
    let flags = if l4_proto == proto::TCP {
        next_tcp_flags(0, seg_flags)
    } else if l4_proto == proto::SCTP {
        // Established at once: an SCTP entry lives by `timeout::SCTP` alone, and being
        // established it never takes the datagram rules' stream step (`after_packet`).
        ct_flags::ESTABLISHED
    } else {
        0
    };
    (flags, now + lifetime(l4_proto, flags))
}

/// The flags and deadline `entry` takes after a packet with TCP flags `seg_flags` at `now`, or
/// `None` when it needs no write: its TCP state did not change and its deadline would move by
/// less than [`REFRESH_INTERVAL_NS`].
#[inline(always)]
pub const fn after_packet<A: Address>(
    entry: &CtEntryOf<A>,
    l4_proto: u8,
    seg_flags: u8,
    now: u64,
) -> Option<(u8, u64)> {
    let next = if l4_proto == proto::TCP {
        next_tcp_flags(entry.flags, seg_flags)
    } else {
        next_datagram_flags(entry.flags, entry.deadline_ns, now)
    };
    let deadline = now + lifetime(l4_proto, next);
    if next == entry.flags && deadline < entry.deadline_ns + REFRESH_INTERVAL_NS {
        None
    } else {
        Some((next, deadline))
    }
}

/// This direction's own FIN and RST, from the other direction's record of them (`PEER_FIN`,
/// `PEER_RST`): what an entry recreated from its other half knows of itself.
#[inline(always)]
pub const fn own_flags(other_flags: u8) -> u8 {
    let mut own = 0;
    if other_flags & ct_flags::PEER_FIN != 0 {
        own |= ct_flags::FIN;
    }
    if other_flags & ct_flags::PEER_RST != 0 {
        own |= ct_flags::RST;
    }
    own
}

/// The other direction's FIN and RST as an entry records them.
#[inline(always)]
pub const fn peer_flags(other_flags: u8) -> u8 {
    let mut peer = 0;
    if other_flags & ct_flags::FIN != 0 {
        peer |= ct_flags::PEER_FIN;
    }
    if other_flags & ct_flags::RST != 0 {
        peer |= ct_flags::PEER_RST;
    }
    peer
}

/// The flags and deadline of `entry` once the entry of its flow's other direction, with flags
/// `other_flags`, was written at `now`. It learns the other side's FIN or RST (so that each
/// direction knows when the flow is over, and a flow closed both ways lives out TIME_WAIT rather
/// than an hour), and it lives as long as its flow: once the other direction is established, so
/// is its lifetime, however rarely this side speaks. A flow that is over may shorten it.
#[inline(always)]
pub const fn after_other_direction<A: Address>(
    entry: &CtEntryOf<A>,
    l4_proto: u8,
    other_flags: u8,
    now: u64,
) -> (u8, u64) {
    let flags = entry.flags | peer_flags(other_flags);
    let lived = flags | (other_flags & ct_flags::ESTABLISHED);
    let deadline = now + lifetime(l4_proto, lived);
    if deadline > entry.deadline_ns || ct_flags::closed(flags) {
        (flags, deadline)
    } else {
        (flags, entry.deadline_ns)
    }
}

#[cfg(feature = "user")]
aya_pod!(FlowKey, CtEntry, FlowKey6, CtEntry6);

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000 * SECOND_NS;

    fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey::new(
            Be32::from(core::net::Ipv4Addr::from(src)),
            Be16::from_host(sport),
            Be32::from(core::net::Ipv4Addr::from(dst)),
            Be16::from_host(dport),
            proto::TCP,
            FORWARD,
        )
    }

    /// A SYN after the client's FIN of a DSR flow is a new connection on the entry node, which
    /// never sees the backend's FIN; a SYN on a half-closed flow of another kind continues it.
    #[test]
    fn a_syn_after_the_clients_fin_reopens_a_dsr_flow_only() {
        let live = |flags: u8, nat: u8| CtEntry {
            deadline_ns: NOW + timeout::TCP_FIN,
            flags,
            nat_flags: nat,
            ..CtEntry::default()
        };
        let syn = tcp_flags::SYN;
        let half_closed = ct_flags::ESTABLISHED | ct_flags::FIN;
        assert!(!live(half_closed, nat_flags::DSR).continues(syn, NOW));
        assert!(live(half_closed, nat_flags::DSR).continues(tcp_flags::ACK, NOW));
        assert!(live(ct_flags::ESTABLISHED, nat_flags::DSR).continues(syn, NOW));
        assert!(live(half_closed, 0).continues(syn, NOW));
    }

    #[test]
    fn replies_are_keyed_from_the_backend_to_the_client_or_to_the_snat_source() {
        let client = key([10, 0, 1, 2], 40_000, [172, 30, 0, 41], 80);
        let mut forward = CtEntry {
            nat_addr: Be32::from(core::net::Ipv4Addr::new(10, 0, 2, 7)),
            nat_port: Be16::from_host(8080),
            ..CtEntry::default()
        };
        assert_eq!(
            client.reply_of(&forward),
            key([10, 0, 2, 7], 8080, [10, 0, 1, 2], 40_000).with_dir(REPLY)
        );
        forward.flags = ct_flags::SNAT;
        forward.snat_addr = Be32::from(core::net::Ipv4Addr::new(192, 168, 50, 10));
        forward.snat_port = Be16::from_host(61_234);
        assert_eq!(
            client.reply_of(&forward),
            key([10, 0, 2, 7], 8080, [192, 168, 50, 10], 61_234).with_dir(REPLY)
        );
        // The reply entry restores the frontend and, for SNAT, the client.
        let reply = CtEntry::reply_of(&client, &forward, 0, NOW);
        assert_eq!(
            (reply.nat_addr, reply.nat_port),
            (client.dst_addr, client.dst_port)
        );
        assert_eq!(
            (reply.snat_addr, reply.snat_port),
            (client.src_addr, client.src_port)
        );
        assert!(reply.snat() && reply.replies_to(&client));
        assert!(!reply.replies_to(&key([10, 0, 1, 3], 40_000, [172, 30, 0, 41], 80)));
    }

    /// Either half of a flow can be rebuilt from the other: the forward entry recovered from
    /// its reply entry is the one the flow opened with, for every kind of flow.
    #[test]
    fn a_forward_entry_is_recovered_from_its_reply_entry() {
        let client = key([10, 0, 1, 2], 40_000, [172, 30, 0, 41], 80);
        let plain = CtEntry {
            backend_id: 7,
            set_id: 3,
            nat_addr: Be32::from(core::net::Ipv4Addr::new(10, 0, 2, 7)),
            nat_port: Be16::from_host(8080),
            flags: ct_flags::ESTABLISHED,
            deadline_ns: NOW,
            ..CtEntry::default()
        };
        let node = CtEntry {
            flags: ct_flags::ESTABLISHED | ct_flags::SNAT,
            snat_addr: Be32::from(core::net::Ipv4Addr::new(192, 168, 50, 10)),
            snat_port: Be16::from_host(61_234),
            ..plain
        };
        let hairpin = CtEntry {
            flags: ct_flags::ESTABLISHED | ct_flags::SNAT | ct_flags::HAIRPIN,
            snat_addr: Be32::from(core::net::Ipv4Addr::new(169, 254, 42, 1)),
            snat_port: client.src_port,
            ..plain
        };
        let client_port = CtEntry {
            flags: ct_flags::ESTABLISHED | ct_flags::SNAT,
            nat_flags: nat_flags::CLIENT_PORT,
            snat_addr: client.src_addr,
            snat_port: Be16::from_host(1_234),
            ..plain
        };
        for forward in [plain, node, hairpin, client_port] {
            let reply_key = client.reply_of(&forward);
            let reply = CtEntry::reply_of(&client, &forward, 0, NOW);
            assert_eq!(reply.forward_key(proto::TCP), client);
            assert_eq!(
                CtEntry::forward_of(&reply_key, &reply, ct_flags::ESTABLISHED, NOW),
                forward
            );
        }
        assert_eq!(
            own_flags(ct_flags::PEER_FIN | ct_flags::FIN),
            ct_flags::FIN,
            "the other side's own FIN is not ours"
        );
    }

    #[test]
    fn tcp_entries_live_by_their_state() {
        use tcp_flags::*;
        let (syn_flags, deadline) = initial(proto::TCP, SYN, NOW);
        assert_eq!((syn_flags, deadline), (0, NOW + timeout::TCP_SYN));
        let established = next_tcp_flags(syn_flags, ACK);
        assert_eq!(lifetime(proto::TCP, established), timeout::TCP_ESTABLISHED);
        let fin = next_tcp_flags(established, FIN | ACK);
        assert_eq!(
            fin & (ct_flags::FIN | ct_flags::FIN_FIRST),
            ct_flags::FIN | ct_flags::FIN_FIRST
        );
        assert_eq!(lifetime(proto::TCP, fin), timeout::TCP_FIN);
        // Closed both ways (the peer's FIN learnt), or reset.
        assert_eq!(
            lifetime(proto::TCP, fin | ct_flags::PEER_FIN),
            timeout::TCP_TIME_WAIT
        );
        assert_eq!(
            lifetime(proto::TCP, next_tcp_flags(established, RST)),
            timeout::TCP_RST
        );
        // The second side to close does not claim to have closed first.
        let second = next_tcp_flags(established | ct_flags::PEER_FIN, FIN | ACK);
        assert_eq!(second & ct_flags::FIN_FIRST, 0);
    }

    #[test]
    fn established_flows_write_their_entry_only_to_change_state_or_refresh() {
        let entry = CtEntry {
            deadline_ns: NOW + timeout::TCP_ESTABLISHED,
            flags: ct_flags::ESTABLISHED,
            ..CtEntry::default()
        };
        assert_eq!(after_packet(&entry, proto::TCP, tcp_flags::ACK, NOW), None);
        let later = NOW + REFRESH_INTERVAL_NS;
        assert_eq!(
            after_packet(&entry, proto::TCP, tcp_flags::ACK, later),
            Some((ct_flags::ESTABLISHED, later + timeout::TCP_ESTABLISHED))
        );
        assert_eq!(
            after_packet(&entry, proto::TCP, tcp_flags::FIN, NOW),
            Some((
                ct_flags::ESTABLISHED | ct_flags::FIN | ct_flags::FIN_FIRST,
                NOW + timeout::TCP_FIN
            ))
        );
    }

    #[test]
    fn datagram_flows_become_streams_when_they_outlast_their_first_seconds() {
        let (flags, deadline) = initial(proto::UDP, 0, NOW);
        let entry = CtEntry {
            deadline_ns: deadline,
            flags,
            ..CtEntry::default()
        };
        assert_eq!(after_packet(&entry, proto::UDP, 0, NOW + SECOND_NS), None);
        let stream = NOW + timeout::UDP_STREAM_AFTER;
        assert_eq!(
            after_packet(&entry, proto::UDP, 0, stream),
            Some((ct_flags::ESTABLISHED, stream + timeout::UDP_STREAM))
        );
    }

    #[test]
    fn sctp_flows_are_established_from_their_first_packet_and_live_by_their_idle_timeout() {
        let (flags, deadline) = initial(proto::SCTP, 0, NOW);
        assert_eq!(
            (flags, deadline),
            (ct_flags::ESTABLISHED, NOW + timeout::SCTP)
        );
        let entry = CtEntry {
            deadline_ns: deadline,
            flags,
            ..CtEntry::default()
        };
        // Within the refresh interval: no write; later, only the deadline moves.
        assert_eq!(after_packet(&entry, proto::SCTP, 0, NOW + SECOND_NS), None);
        let later = NOW + REFRESH_INTERVAL_NS;
        assert_eq!(
            after_packet(&entry, proto::SCTP, 0, later),
            Some((ct_flags::ESTABLISHED, later + timeout::SCTP))
        );
        // UDP keeps its own rules.
        assert_eq!(
            lifetime(proto::UDP, ct_flags::ESTABLISHED),
            timeout::UDP_STREAM
        );
        assert_eq!(initial(proto::UDP, 0, NOW), (0, NOW + timeout::UDP));
    }

    #[test]
    fn a_bare_syn_reopens_only_a_closed_flow() {
        let mut entry = CtEntry {
            deadline_ns: NOW + 1,
            flags: ct_flags::ESTABLISHED,
            ..CtEntry::default()
        };
        assert!(entry.continues(tcp_flags::SYN, NOW));
        // Half closed, either way: still the same connection.
        entry.flags |= ct_flags::FIN;
        assert!(entry.continues(tcp_flags::SYN, NOW));
        entry.flags = ct_flags::ESTABLISHED | ct_flags::PEER_FIN;
        assert!(entry.continues(tcp_flags::SYN, NOW));
        // Closed both ways, or reset: a bare SYN opens a new one.
        entry.flags |= ct_flags::FIN;
        assert!(!entry.continues(tcp_flags::SYN, NOW));
        assert!(entry.continues(tcp_flags::ACK, NOW));
        entry.flags = ct_flags::ESTABLISHED | ct_flags::PEER_RST;
        assert!(!entry.continues(tcp_flags::SYN, NOW));
        assert!(!entry.continues(tcp_flags::ACK, NOW + 1));
    }

    #[test]
    fn each_direction_learns_the_others_close_and_lives_as_long_as_its_flow() {
        // A backend that has not spoken yet: its reply entry still has the SYN's lifetime, but
        // lives as an established flow's once the client's side is established.
        let silent = CtEntry {
            deadline_ns: NOW + timeout::TCP_SYN,
            ..CtEntry::default()
        };
        assert_eq!(
            after_other_direction(&silent, proto::TCP, ct_flags::ESTABLISHED, NOW),
            (0, NOW + timeout::TCP_ESTABLISHED)
        );
        let reply = CtEntry {
            deadline_ns: NOW + timeout::TCP_SYN,
            flags: ct_flags::ESTABLISHED,
            ..CtEntry::default()
        };
        assert_eq!(
            after_other_direction(&reply, proto::TCP, ct_flags::ESTABLISHED, NOW),
            (ct_flags::ESTABLISHED, NOW + timeout::TCP_ESTABLISHED)
        );
        // The forward side learns the backend's FIN: closed both ways, TIME_WAIT, not an hour.
        let forward = CtEntry {
            deadline_ns: NOW + timeout::TCP_FIN,
            flags: ct_flags::ESTABLISHED | ct_flags::FIN | ct_flags::FIN_FIRST,
            ..CtEntry::default()
        };
        assert_eq!(
            after_other_direction(
                &forward,
                proto::TCP,
                ct_flags::ESTABLISHED | ct_flags::FIN,
                NOW
            ),
            (
                forward.flags | ct_flags::PEER_FIN,
                NOW + timeout::TCP_TIME_WAIT
            )
        );
        let closed = CtEntry {
            flags: ct_flags::ESTABLISHED | ct_flags::FIN,
            deadline_ns: NOW + timeout::TCP_FIN,
            ..reply
        };
        // Closed both ways: the deadline may shorten to TIME_WAIT's.
        assert_eq!(
            after_other_direction(&closed, proto::TCP, ct_flags::FIN, NOW),
            (
                closed.flags | ct_flags::PEER_FIN,
                NOW + timeout::TCP_TIME_WAIT
            )
        );
    }
}
