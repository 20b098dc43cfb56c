//! A frame read the way the datapath reads it: fields at fixed offsets, checked only as far as
//! the programs check them (`lb-ebpf/src/parse.rs`, `icmp.rs`). etherparse refuses the headers a
//! fuzzer sends on purpose (an IHL below 5, a total length beyond the frame), which the programs
//! still read; so the oracle reads them here, and etherparse builds frames and checks answers.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::net::proto;

pub const ETH_LEN: usize = 14;
/// The fixed IPv4 header, right after Ethernet (the programs know no VLAN tags).
pub const L3: usize = ETH_LEN;
pub const IPV4_LEN: usize = 20;
pub const ICMP_LEN: usize = 8;
/// Offsets of the IPv4 header fields the datapath reads or writes.
pub const TTL_OFF: usize = L3 + 8;
pub const IP_CSUM_OFF: usize = L3 + 10;
pub const SRC_OFF: usize = L3 + 12;
pub const DST_OFF: usize = L3 + 16;

/// Where a packet stands in fragmentation (`parse::Frag`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    None,
    First,
    Later,
}

/// The fixed IPv4 header of a frame the datapath takes for IPv4: EtherType 0x0800, version 4,
/// and the whole fixed header in the frame (`parse::ipv4`).
#[derive(Clone, Copy, Debug)]
pub struct Ipv4<'a> {
    pub frame: &'a [u8],
}

pub fn ipv4(frame: &[u8]) -> Option<Ipv4<'_>> {
    let is_ipv4 = frame.len() >= L3 + IPV4_LEN && frame[12..14] == [0x08, 0x00];
    (is_ipv4 && frame[L3] >> 4 == 4).then_some(Ipv4 { frame })
}

impl Ipv4<'_> {
    /// Offset of the L4 header, `None` for an IHL below 5 (`Ipv4::l4_off`).
    pub fn l4_off(&self) -> Option<usize> {
        let words = usize::from(self.frame[L3] & 0x0f);
        (words >= 5).then_some(L3 + words * 4)
    }

    pub fn has_options(&self) -> bool {
        self.frame[L3] & 0x0f != 5
    }

    pub fn proto(&self) -> u8 {
        self.frame[L3 + 9]
    }

    pub fn ttl(&self) -> u8 {
        self.frame[TTL_OFF]
    }

    pub fn id(&self) -> [u8; 2] {
        [self.frame[L3 + 4], self.frame[L3 + 5]]
    }

    pub fn src(&self) -> Ipv4Addr {
        addr_at(self.frame, SRC_OFF)
    }

    pub fn dst(&self) -> Ipv4Addr {
        addr_at(self.frame, DST_OFF)
    }

    pub fn frag(&self) -> Frag {
        let field = u16::from_be_bytes([self.frame[L3 + 6], self.frame[L3 + 7]]);
        if field & 0x1fff != 0 {
            Frag::Later
        } else if field & 0x2000 != 0 {
            Frag::First
        } else {
            Frag::None
        }
    }

    pub fn dont_fragment(&self) -> bool {
        self.frame[L3 + 6] & 0x40 != 0
    }
}

pub fn addr_at(frame: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(frame[off], frame[off + 1], frame[off + 2], frame[off + 3])
}

pub fn u16_at(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

/// The TCP or UDP header of a packet, when the frame holds all of it (`parse::l4`).
#[derive(Clone, Copy, Debug)]
pub struct L4 {
    pub off: usize,
    pub src_port: u16,
    pub dst_port: u16,
    /// Zero for UDP and SCTP.
    pub tcp_flags: u8,
    /// The TCP/UDP checksum; SCTP's CRC32c covers no address and no port is rewritten.
    pub csum_off: Option<usize>,
}

pub fn l4(ip: &Ipv4<'_>, off: usize) -> Option<L4> {
    let (len, csum, tcp_flags) = match ip.proto() {
        proto::TCP => (20, Some(16), *ip.frame.get(off + 13)?),
        proto::UDP => (8, Some(6), 0),
        proto::SCTP => (12, None, 0),
        _ => return None,
    };
    (ip.frame.len() >= off + len).then(|| L4 {
        off,
        src_port: u16_at(ip.frame, off),
        dst_port: u16_at(ip.frame, off + 2),
        tcp_flags,
        csum_off: csum.map(|c| off + c),
    })
}

impl L4 {
    pub fn src(&self, ip: &Ipv4<'_>) -> SocketAddrV4 {
        SocketAddrV4::new(ip.src(), self.src_port)
    }

    pub fn dst(&self, ip: &Ipv4<'_>) -> SocketAddrV4 {
        SocketAddrV4::new(ip.dst(), self.dst_port)
    }
}

/// Whether the ICMP message at `off` is an error, which quotes a packet (`icmp::is_error`).
pub fn is_icmp_error(frame: &[u8], off: usize) -> bool {
    frame.len() >= off + ICMP_LEN && matches!(frame[off], 3 | 4 | 5 | 11 | 12)
}

/// The packet an ICMP error quotes, when it quotes TCP, UDP or SCTP with both ports
/// (`icmp::quote`).
#[derive(Clone, Copy, Debug)]
pub struct Quote {
    pub icmp_off: usize,
    pub l3_off: usize,
    pub l4_off: usize,
    pub proto: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

pub fn quote(frame: &[u8], icmp_off: usize) -> Option<Quote> {
    let l3_off = icmp_off + ICMP_LEN;
    if frame.len() < l3_off + IPV4_LEN {
        return None;
    }
    let words = usize::from(frame[l3_off] & 0x0f);
    let l4_proto = frame[l3_off + 9];
    if words < 5 || !proto::balanced(l4_proto) {
        return None;
    }
    let l4_off = l3_off + words * 4;
    // Both ports and UDP's checksum: the 8 bytes RFC 792 guarantees.
    if frame.len() < l4_off + 8 {
        return None;
    }
    Some(Quote {
        icmp_off,
        l3_off,
        l4_off,
        proto: l4_proto,
        src: SocketAddrV4::new(addr_at(frame, l3_off + 12), u16_at(frame, l4_off)),
        dst: SocketAddrV4::new(addr_at(frame, l3_off + 16), u16_at(frame, l4_off + 2)),
    })
}

impl Quote {
    /// Offset of the quoted L4 checksum, when the quote reaches it.
    pub fn l4_csum_off(&self, frame_len: usize) -> Option<usize> {
        let off = self.l4_off
            + match self.proto {
                proto::UDP => 6,
                proto::TCP => 16,
                _ => return None,
            };
        (frame_len >= off + 2).then_some(off)
    }
}

/// The frame as one hex string, for a failure report that can be pasted back.
pub fn hex_string(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}
