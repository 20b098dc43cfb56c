//! Wire-order integers: the byte order is in the type, so the datapath compares header fields
//! with map keys without swapping, and userspace converts exactly once, at its boundary.

use core::net::Ipv4Addr;

use bytemuck::{Pod, Zeroable};

/// A 32-bit value in network byte order, stored exactly as it appears on the wire.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct Be32(u32);

/// A 16-bit value in network byte order, stored exactly as it appears on the wire.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct Be16(u16);

impl Be32 {
    /// Wraps four wire bytes that were read as a native-endian `u32`.
    #[inline(always)]
    pub const fn from_raw(raw: u32) -> Self {
        Self(raw)
    }

    /// The wire bytes as a native-endian `u32` (what a packet load or store uses).
    #[inline(always)]
    pub const fn raw(self) -> u32 {
        self.0
    }

    pub const fn from_host(host: u32) -> Self {
        Self(host.to_be())
    }

    pub const fn to_host(self) -> u32 {
        u32::from_be(self.0)
    }

    pub const fn from_ip(ip: Ipv4Addr) -> Self {
        Self(u32::from_ne_bytes(ip.octets()))
    }

    pub const fn to_ip(self) -> Ipv4Addr {
        let [a, b, c, d] = self.0.to_ne_bytes();
        Ipv4Addr::new(a, b, c, d)
    }
}

impl Be16 {
    /// Wraps two wire bytes that were read as a native-endian `u16`.
    #[inline(always)]
    pub const fn from_raw(raw: u16) -> Self {
        Self(raw)
    }

    /// The wire bytes as a native-endian `u16`.
    #[inline(always)]
    pub const fn raw(self) -> u16 {
        self.0
    }

    pub const fn from_host(host: u16) -> Self {
        Self(host.to_be())
    }

    pub const fn to_host(self) -> u16 {
        u16::from_be(self.0)
    }
}

impl From<Ipv4Addr> for Be32 {
    fn from(ip: Ipv4Addr) -> Self {
        Self::from_ip(ip)
    }
}

impl From<Be32> for Ipv4Addr {
    fn from(be: Be32) -> Self {
        be.to_ip()
    }
}

impl core::fmt::Debug for Be32 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.to_ip(), f)
    }
}

impl core::fmt::Debug for Be16 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.to_host(), f)
    }
}

/// IP protocol numbers the datapath handles.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    /// SCTP: balanced without rewriting its ports. Its checksum (CRC32c) covers the SCTP packet
    /// only, no pseudo-header, so rewriting addresses leaves it valid; a port change would mean
    /// computing it again over the whole packet, which the datapath does not do
    /// ([`rewrites_ports`]).
    pub const SCTP: u8 = 132;

    /// `TCP`, `UDP` or `SCTP` (the protocols frontends serve), else `?`.
    pub const fn name(l4_proto: u8) -> &'static str {
        match l4_proto {
            TCP => "TCP",
            UDP => "UDP",
            SCTP => "SCTP",
            _ => "?",
        }
    }

    /// Whether frontends serve this protocol (the datapath reads its ports): TCP, UDP, SCTP.
    pub const fn balanced(l4_proto: u8) -> bool {
        matches!(l4_proto, TCP | UDP | SCTP)
    }

    /// Whether the datapath may give a flow of this protocol other ports than its own: not
    /// SCTP, whose CRC32c over the whole packet would have to be computed anew (BPF has no
    /// helper for it, and a per-packet pass over the payload is the cost this datapath avoids).
    /// Its frontends are programmed only where the backend's port is the frontend's, and a
    /// source-NATed SCTP flow keeps the client's port. (CRC32c is linear: a port change could
    /// be patched into it incrementally, from the change and the length after it, as the way
    /// to port rewriting later.)
    pub const fn rewrites_ports(l4_proto: u8) -> bool {
        l4_proto != SCTP
    }
}

/// TCP flag bits, as they stand in the 14th byte of a TCP header (what the datapath's conntrack
/// rules take as a segment's flags).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;

    /// Whether a segment with these flags opens a connection: a SYN without ACK (the first
    /// segment, or its retransmission).
    #[inline(always)]
    pub const fn opens(flags: u8) -> bool {
        flags & (SYN | ACK) == SYN
    }
}

#[cfg(feature = "user")]
aya_pod!(Be32, Be16);
