//! Wire-order integers: the byte order is in the type, so the datapath compares header fields
//! with map keys without swapping, and userspace converts exactly once, at its boundary.

use core::net::{Ipv4Addr, Ipv6Addr};

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

/// A 128-bit IPv6 address, stored exactly as it appears on the wire: four words of wire bytes,
/// each read as a native-endian `u32` (what the datapath loads and stores, 4-byte aligned as
/// the addresses in an IPv6 header are).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct Be128([u32; 4]);

impl Be128 {
    /// Wraps four words of wire bytes read as native-endian `u32`s.
    #[inline(always)]
    pub const fn from_raw(raw: [u32; 4]) -> Self {
        Self(raw)
    }

    /// The wire bytes as four native-endian `u32`s.
    #[inline(always)]
    pub const fn raw(self) -> [u32; 4] {
        self.0
    }

    pub const fn from_ip(ip: Ipv6Addr) -> Self {
        let b = ip.octets();
        let mut words = [0; 4];
        let mut i = 0;
        while i < 4 {
            words[i] = u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
            i += 1;
        }
        Self(words)
    }

    pub const fn to_ip(self) -> Ipv6Addr {
        let [a, b, c, d] = self.0;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        Ipv6Addr::from_octets([
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ])
    }
}

impl From<Be32> for core::net::IpAddr {
    fn from(be: Be32) -> Self {
        Self::V4(be.to_ip())
    }
}

impl From<Be128> for core::net::IpAddr {
    fn from(be: Be128) -> Self {
        Self::V6(be.to_ip())
    }
}

impl From<Ipv6Addr> for Be128 {
    fn from(ip: Ipv6Addr) -> Self {
        Self::from_ip(ip)
    }
}

impl From<Be128> for Ipv6Addr {
    fn from(be: Be128) -> Self {
        be.to_ip()
    }
}

/// An address family's address as the datapath keys maps by it: [`Be32`] for IPv4, [`Be128`]
/// for IPv6. The conntrack, frontend and backend types are generic over it (their IPv4 forms
/// are the defaults), so that one set of rules serves both families.
pub trait Address: Copy + Eq + Default + Pod + core::fmt::Debug + 'static {
    /// The unspecified address (`0.0.0.0`, `::`).
    const ZERO: Self;

    /// The address folded into 32 bits, for hashes ([`crate::hash`], [`crate::filters`]): the
    /// IPv4 address itself, an IPv6 address's four words XORed.
    fn fold(self) -> Be32;
}

impl Address for Be32 {
    const ZERO: Self = Self(0);

    #[inline(always)]
    fn fold(self) -> Be32 {
        self
    }
}

impl Address for Be128 {
    const ZERO: Self = Self([0; 4]);

    #[inline(always)]
    fn fold(self) -> Be32 {
        let [a, b, c, d] = self.0;
        Be32(a ^ b ^ c ^ d)
    }
}

impl core::fmt::Debug for Be128 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.to_ip(), f)
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
aya_pod!(Be32, Be16, Be128);
