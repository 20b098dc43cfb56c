//! The datapath's programs: their names in the BPF object (the entry functions of `lb-ebpf`,
//! looked up by name by the loader, and named in benchmarks and tests) and what each is for.

/// XDP on an uplink: load balancing of traffic from outside, source NAT towards backends on
/// other nodes, and the return of their replies.
pub const XDP: &str = "lb_xdp";
/// tc ingress of a pod's host-side veth: load balancing of pod traffic.
pub const FROM_POD: &str = "lb_from_pod";
/// tc egress of a pod's host-side veth: reverse NAT of replies to pods.
pub const TO_POD: &str = "lb_to_pod";
/// tc ingress of an uplink: `lb_xdp`'s logic where XDP is off (or behind it, for the packets
/// XDP leaves to it).
pub const EXT_IN: &str = "lb_ext_in";
/// tc egress of an uplink: reverse NAT of this node's backends' replies to clients elsewhere.
pub const EXT_OUT: &str = "lb_ext_out";
/// The IPv6 twins of the packet programs: never attached, each entry program above hands its
/// IPv6 packets to its twin by a tail call (`crate::maps::TAIL_PROGRAMS`).
pub const XDP6: &str = "lb6_xdp";
pub const FROM_POD6: &str = "lb6_from_pod";
pub const EXT_IN6: &str = "lb6_ext_in";
/// Both reverse-NAT programs' (`lb_to_pod`, `lb_ext_out`) twin.
pub const TO_CLIENT6: &str = "lb6_to_client";
/// `cgroup/connect4`: socket-level balancing, a `connect()` (TCP, or UDP from the node's own
/// namespace) to a frontend connects to one of its backends instead. Attached to a cgroup v2
/// directory only when asked (`lb-agent --socket-lb on|host-only`).
pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
/// `cgroup/sendmsg4`: an unconnected UDP datagram to a frontend goes to one of its backends.
pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
/// `cgroup/recvmsg4`: a datagram from a backend `lb_sock_sendmsg4` sent to shows the frontend as
/// its source.
pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
/// `cgroup/getpeername4`: `getpeername()` on a socket `lb_sock_connect4` connected shows the
/// frontend it asked for.
pub const SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
/// The same four for IPv6 sockets given IPv4-mapped addresses (`::ffff:a.b.c.d`).
pub const SOCK_CONNECT6: &str = "lb_sock_connect6";
pub const SOCK_SENDMSG6: &str = "lb_sock_sendmsg6";
pub const SOCK_RECVMSG6: &str = "lb_sock_recvmsg6";
pub const SOCK_GETPEERNAME6: &str = "lb_sock_getpeername6";
/// Empty programs, never attached: the baseline the benchmarks subtract.
pub const EMPTY_XDP: &str = "bench_empty_xdp";
pub const EMPTY_TC: &str = "bench_empty_tc";

/// The tc programs.
pub const TC: [&str; 4] = [FROM_POD, TO_POD, EXT_IN, EXT_OUT];

/// The IPv6 twins.
pub const IPV6: [&str; 4] = [XDP6, FROM_POD6, EXT_IN6, TO_CLIENT6];

/// The cgroup socket programs (socket-level balancing).
pub const SOCK: [&str; 8] = [
    SOCK_CONNECT4,
    SOCK_SENDMSG4,
    SOCK_RECVMSG4,
    SOCK_GETPEERNAME4,
    SOCK_CONNECT6,
    SOCK_SENDMSG6,
    SOCK_RECVMSG6,
    SOCK_GETPEERNAME6,
];

/// Every program, for tools that check the object holds them all.
pub const ALL: [&str; 19] = [
    XDP,
    FROM_POD,
    TO_POD,
    EXT_IN,
    EXT_OUT,
    XDP6,
    FROM_POD6,
    EXT_IN6,
    TO_CLIENT6,
    SOCK_CONNECT4,
    SOCK_SENDMSG4,
    SOCK_RECVMSG4,
    SOCK_GETPEERNAME4,
    SOCK_CONNECT6,
    SOCK_SENDMSG6,
    SOCK_RECVMSG6,
    SOCK_GETPEERNAME6,
    EMPTY_XDP,
    EMPTY_TC,
];
