//! Packet header layouts. Fields are raw wire-order integers (never Rust enums: reading an
//! invalid discriminant out of packet memory would be undefined behaviour), compared against
//! big-endian constants so the fast path never byte-swaps.
//!
//! The structs use natural alignment like the kernel's own `struct iphdr`: the IPv4 header sits at
//! offset 14, so its 32-bit fields are only 2-byte aligned, which the BPF JIT handles on every
//! architecture this project targets (x86-64 and arm64 load unaligned words), and it lets LLVM
//! emit one load per field instead of four byte loads.

use lb_common::{Be16, Be32};

pub const ETH_HDR_LEN: usize = 14;
/// The IPv4 header starts right after Ethernet (no VLAN tags on pod veths or node uplinks; a
/// tagged frame does not parse as IPv4 and passes untouched).
pub const L3_OFF: usize = ETH_HDR_LEN;
pub const IPV4_MIN_HDR_LEN: usize = 20;

/// `ETH_P_IP` as it reads from the wire into a native-endian u16.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// `ETH_P_IPV6`, likewise.
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    /// Flags (high 3 bits) and fragment offset in 8-byte units.
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// `frag_off` bits, as they read from the wire into a native-endian u16.
pub const IP_MF_BE: u16 = 0x2000u16.to_be();
pub const IP_DF_BE: u16 = 0x4000u16.to_be();
pub const IP_OFFSET_MASK_BE: u16 = 0x1fffu16.to_be();

/// The fixed IPv6 header (RFC 8200). Its addresses are read and written as four 32-bit words
/// each (`lb_common::Be128`).
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version (high nibble of the first byte), traffic class and flow label.
    pub version_tc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

pub const IPV6_HDR_LEN: usize = 40;
/// Offsets of the IPv6 addresses from the start of the frame.
pub const IPV6_SADDR_OFF: usize = L3_OFF + 8;
pub const IPV6_DADDR_OFF: usize = L3_OFF + 24;

/// The start of an IPv6 extension header: the next header and the length, whose unit depends
/// on the header ([`ipv6_ext`]).
#[repr(C)]
pub struct Ipv6ExtHdr {
    pub next_header: u8,
    pub len: u8,
}

/// The IPv6 fragment header (8 bytes).
#[repr(C)]
pub struct Ipv6FragHdr {
    pub next_header: u8,
    pub reserved: u8,
    /// Fragment offset in 8-byte units (high 13 bits) and the more-fragments flag (bit 0).
    pub offset_flags: u16,
    pub id: u32,
}

pub const IPV6_FRAG_HDR_LEN: usize = 8;
/// `offset_flags` bits, as they read from the wire into a native-endian u16.
pub const IPV6_FRAG_OFFSET_BE: u16 = 0xfff8u16.to_be();
pub const IPV6_FRAG_MORE_BE: u16 = 0x0001u16.to_be();

/// IPv6 next-header values of the extension headers the datapath walks.
pub mod ipv6_ext {
    /// Hop-by-hop options; length in 8-byte units, not counting the first 8.
    pub const HOP_BY_HOP: u8 = 0;
    /// Routing; length as hop-by-hop.
    pub const ROUTING: u8 = 43;
    /// Fragment: 8 bytes.
    pub const FRAGMENT: u8 = 44;
    /// Authentication header; length in 4-byte units, not counting the first 8.
    pub const AUTH: u8 = 51;
    /// Destination options; length as hop-by-hop.
    pub const DEST_OPTS: u8 = 60;
}

#[repr(C)]
pub struct TcpHdr {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset (high nibble of the first byte) and flags (second byte).
    pub doff_res: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

pub const TCP_HDR_LEN: usize = 20;
pub const TCP_CHECK_OFF: usize = 16;

pub use lb_common::net::tcp_flags;

#[repr(C)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

pub const UDP_HDR_LEN: usize = 8;
pub const UDP_CHECK_OFF: usize = 6;

/// SCTP's common header: source and destination port, verification tag, and a CRC32c over the
/// whole SCTP packet (no pseudo-header, so no IP address is covered). The datapath reads the
/// ports only and never rewrites them (`lb_common::net::proto::rewrites_ports`).
#[repr(C)]
pub struct SctpHdr {
    pub source: u16,
    pub dest: u16,
    pub vtag: u32,
    pub check: u32,
}

pub const SCTP_HDR_LEN: usize = 12;
pub const SCTP_CHECK_OFF: usize = 8;

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    /// Unused for the errors we handle, except frag-needed which carries the next-hop MTU in the
    /// low 16 bits.
    pub rest: u32,
}

pub const ICMP_HDR_LEN: usize = 8;

/// ICMP types.
pub mod icmp_type {
    pub const DEST_UNREACH: u8 = 3;
    pub const SOURCE_QUENCH: u8 = 4;
    pub const REDIRECT: u8 = 5;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
}

/// Code of ICMP destination unreachable used to reject (what `iptables -j REJECT` sends).
pub const ICMP_PORT_UNREACH: u8 = 3;
/// Code of ICMP destination unreachable a router sends for a DF packet larger than the next
/// hop's MTU (RFC 1191).
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// ICMP errors that quote the offending packet and so may belong to a load-balanced flow.
#[inline(always)]
pub const fn is_icmp_error(kind: u8) -> bool {
    matches!(
        kind,
        icmp_type::DEST_UNREACH
            | icmp_type::SOURCE_QUENCH
            | icmp_type::REDIRECT
            | icmp_type::TIME_EXCEEDED
            | icmp_type::PARAMETER_PROBLEM
    )
}

/// Wire-order helpers for the fields above.
#[inline(always)]
pub const fn be32(raw: u32) -> Be32 {
    Be32::from_raw(raw)
}

#[inline(always)]
pub const fn be16(raw: u16) -> Be16 {
    Be16::from_raw(raw)
}
