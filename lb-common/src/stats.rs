//! Why the datapath did what it did: one per-CPU counter per reason in
//! [`crate::maps::LB_VERDICTS`]. Packets that are not addressed to any frontend are deliberately
//! not counted: they are most of the traffic and counting them would cost a write per packet.

/// Index into [`crate::maps::LB_VERDICTS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A new flow was balanced to a backend and DNATed.
    NewFlow = 0,
    /// A packet of an established flow was DNATed to its backend.
    Established = 1,
    /// A reply was reverse-NATed (source restored to the frontend).
    ReplyNat = 2,
    /// An ICMP error quoting a load-balanced flow was translated.
    IcmpErrorNat = 3,
    /// Rejected: the service has no backend (TCP RST or ICMP port unreachable sent back).
    RejectNoBackend = 4,
    /// Rejected: a ClusterIP was addressed on a port or protocol it does not serve.
    RejectUnknownPort = 5,
    /// Dropped: the service has no usable backend and its policy says drop.
    DropNoBackend = 6,
    /// Dropped: addressed to a frontend but too short or malformed to be balanced.
    DropMalformed = 7,
    /// Dropped: a non-first fragment for a frontend whose first fragment was not seen.
    DropFragment = 8,
    /// Dropped: the flow could not be recorded (conntrack insert failed).
    DropCtFull = 9,
    /// Dropped: the service's state is inconsistent (table or backend missing); the agent
    /// repairs it on its next sync.
    DropNoTable = 10,
    /// Passed untouched: addressed to a frontend address but to no frontend of it and not a
    /// ClusterIP (e.g. a node address on a port that is no NodePort), or not worth rejecting.
    PassNotService = 11,
    /// A non-first fragment followed its first fragment's translation.
    FragmentNat = 12,
}

impl Reason {
    /// Number of reasons (size of the counters array).
    pub const COUNT: u32 = 13;

    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::NewFlow,
        Self::Established,
        Self::ReplyNat,
        Self::IcmpErrorNat,
        Self::RejectNoBackend,
        Self::RejectUnknownPort,
        Self::DropNoBackend,
        Self::DropMalformed,
        Self::DropFragment,
        Self::DropCtFull,
        Self::DropNoTable,
        Self::PassNotService,
        Self::FragmentNat,
    ];

    /// A stable snake_case name for metrics and `lbctl stats`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NewFlow => "new_flow",
            Self::Established => "established",
            Self::ReplyNat => "reply_nat",
            Self::IcmpErrorNat => "icmp_error_nat",
            Self::RejectNoBackend => "reject_no_backend",
            Self::RejectUnknownPort => "reject_unknown_port",
            Self::DropNoBackend => "drop_no_backend",
            Self::DropMalformed => "drop_malformed",
            Self::DropFragment => "drop_fragment_no_state",
            Self::DropCtFull => "drop_ct_full",
            Self::DropNoTable => "drop_inconsistent_service",
            Self::PassNotService => "pass_not_service",
            Self::FragmentNat => "fragment_nat",
        }
    }
}
