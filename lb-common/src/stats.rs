//! Why the datapath did what it did: one per-CPU counter per reason in
//! [`crate::maps::LB_VERDICTS`]. Packets that are not addressed to any frontend, or addressed to a
//! frontend address on a port that is not a frontend and not a ClusterIP, are deliberately not
//! counted: they are most of the traffic and counting them would cost a write per packet.

/// Index into [`crate::maps::LB_VERDICTS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// A new flow was balanced to a backend and DNATed.
    NewFlow = 0,
    /// A packet of an established flow was DNATed to its backend.
    Established = 1,
    /// A reply was reverse-NATed (source restored to the frontend).
    ReplyNat = 2,
    /// An ICMP error quoting a load-balanced flow was translated.
    IcmpErrorNat = 3,
    /// A non-first fragment followed its first fragment's translation.
    FragmentNat = 4,
    /// Rejected: the service has no backend (TCP RST or ICMP port unreachable sent back).
    RejectNoBackend = 5,
    /// Rejected: a ClusterIP was addressed on a port or protocol it does not serve.
    RejectUnknownPort = 6,
    /// Dropped: the service has no usable backend and its policy says drop.
    DropNoBackend = 7,
    /// Dropped: addressed to a frontend but too short or malformed to be balanced.
    DropMalformed = 8,
    /// Dropped: a non-first fragment for a frontend whose first fragment was not seen.
    DropFragment = 9,
    /// Dropped: the flow could not be recorded (conntrack insert failed).
    DropCtFull = 10,
    /// Dropped: the service's state is inconsistent (table or backend missing); the agent
    /// repairs it on its next sync.
    DropNoTable = 11,
    /// Dropped: a new flow from outside the frontend's loadBalancerSourceRanges.
    DropSourceRange = 12,
    /// Dropped: a new external flow to a backend on another node found no free SNAT port (or
    /// the node has no SNAT address).
    DropSnatPorts = 13,
    /// A packet was forwarded straight to its next hop after NAT (FIB lookup), bypassing the
    /// stack. Counted in addition to its NAT reason.
    Forwarded = 14,
    /// Dropped: a packet to forward after NAT had no route.
    DropNoRoute = 15,
    /// Dropped: a packet to forward after NAT was larger than the egress MTU (answered with ICMP
    /// fragmentation needed when it had DF set).
    DropTooBig = 16,
    /// Dropped: a packet to forward after NAT had no TTL left (answered with ICMP time exceeded).
    DropTtlExceeded = 17,
    /// A reject, ICMP error or reset the datapath would have sent was not: its destination was
    /// no unicast address, or the node's rate of generated packets was used up.
    AnswerSuppressed = 18,
    /// A connection that concerns no frontend (a pod to another pod's address) was given
    /// another source port, its address kept: a load-balanced flow of the same client port to
    /// that same destination holds the reply path it would use (see `conntrack::DIRECT`).
    /// Counted when the connection opens; its later packets count as `Established`.
    PortRemapped = 19,
    /// The first packet of a flow another node balanced by direct server return carried its
    /// frontend (`crate::dsr`): this node recorded the reverse NAT of its replies.
    DsrAccepted = 20,
}

impl Reason {
    /// Number of reasons (size of the counters array).
    pub const COUNT: u32 = 21;

    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::NewFlow,
        Self::Established,
        Self::ReplyNat,
        Self::IcmpErrorNat,
        Self::FragmentNat,
        Self::RejectNoBackend,
        Self::RejectUnknownPort,
        Self::DropNoBackend,
        Self::DropMalformed,
        Self::DropFragment,
        Self::DropCtFull,
        Self::DropNoTable,
        Self::DropSourceRange,
        Self::DropSnatPorts,
        Self::Forwarded,
        Self::DropNoRoute,
        Self::DropTooBig,
        Self::DropTtlExceeded,
        Self::AnswerSuppressed,
        Self::PortRemapped,
        Self::DsrAccepted,
    ];

    /// A stable snake_case name for metrics and `lbctl stats`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NewFlow => "new_flow",
            Self::Established => "established",
            Self::ReplyNat => "reply_nat",
            Self::IcmpErrorNat => "icmp_error_nat",
            Self::FragmentNat => "fragment_nat",
            Self::RejectNoBackend => "reject_no_backend",
            Self::RejectUnknownPort => "reject_unknown_port",
            Self::DropNoBackend => "drop_no_backend",
            Self::DropMalformed => "drop_malformed",
            Self::DropFragment => "drop_fragment_no_state",
            Self::DropCtFull => "drop_ct_full",
            Self::DropNoTable => "drop_inconsistent_service",
            Self::DropSourceRange => "drop_source_range",
            Self::DropSnatPorts => "drop_snat_ports",
            Self::Forwarded => "forwarded",
            Self::DropNoRoute => "drop_no_route",
            Self::DropTooBig => "drop_too_big",
            Self::DropTtlExceeded => "drop_ttl_exceeded",
            Self::AnswerSuppressed => "answer_suppressed",
            Self::PortRemapped => "port_remapped",
            Self::DsrAccepted => "dsr_accepted",
        }
    }
}
