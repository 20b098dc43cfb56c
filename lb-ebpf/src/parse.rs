//! Parsing: Ethernet and IPv4 first (just enough to decide whether the packet concerns us), the
//! L4 header only for packets that do. Every read is bounds-checked through [`ptr_at`].

use lb_common::{Be16, Be32, conntrack::FlowKey, net::proto};

use crate::{
    frame::{Frame, ptr_at},
    hdr::{
        ETH_P_IP_BE, EthHdr, IP_DF_BE, IP_MF_BE, IP_OFFSET_MASK_BE, IPV4_MIN_HDR_LEN, Ipv4Hdr,
        L3_OFF, SCTP_CHECK_OFF, SCTP_HDR_LEN, SctpHdr, TCP_CHECK_OFF, TCP_HDR_LEN, TcpHdr,
        UDP_CHECK_OFF, UDP_HDR_LEN, UdpHdr, be16, be32,
    },
};

/// Where a packet stands in fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram.
    None,
    /// The first fragment: it carries the L4 header.
    First,
    /// A later fragment: no L4 header, only IP.
    Later,
}

/// The fixed IPv4 header fields the datapath uses.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub src: Be32,
    pub dst: Be32,
    pub proto: u8,
    version_ihl: u8,
    frag_off: u16,
    pub id: Be16,
    pub tot_len: Be16,
    pub ttl: u8,
}

impl Ipv4 {
    /// Offset of the L4 header, honouring IPv4 options; `None` for an invalid header length.
    #[inline(always)]
    pub fn l4_off(&self) -> Option<usize> {
        let words = (self.version_ihl & 0x0f) as usize;
        if words < IPV4_MIN_HDR_LEN / 4 {
            return None;
        }
        Some(L3_OFF + words * 4)
    }

    /// Whether the header carries options (the ICMP rejects quote only option-less headers).
    #[inline(always)]
    pub fn has_options(&self) -> bool {
        self.version_ihl & 0x0f != 5
    }

    /// Don't fragment: a router must answer "fragmentation needed" rather than split it.
    #[inline(always)]
    pub fn dont_fragment(&self) -> bool {
        self.frag_off & IP_DF_BE != 0
    }

    #[inline(always)]
    pub fn frag(&self) -> Frag {
        if self.frag_off & IP_OFFSET_MASK_BE != 0 {
            Frag::Later
        } else if self.frag_off & IP_MF_BE != 0 {
            Frag::First
        } else {
            Frag::None
        }
    }
}

/// Reads Ethernet and the fixed IPv4 header; `None` for anything that is not an IPv4 packet with
/// at least a full fixed header (such packets are never ours and pass untouched).
#[inline(always)]
pub fn ipv4<F: Frame>(frame: &mut F) -> Option<Ipv4> {
    if !frame.ensure(L3_OFF + IPV4_MIN_HDR_LEN) {
        return None;
    }
    let eth = ptr_at::<F, EthHdr>(frame, 0)?;
    let ip = ptr_at::<F, Ipv4Hdr>(frame, L3_OFF)?;
    // SAFETY: both headers were bounds-checked by `ptr_at`.
    unsafe {
        if (*eth).proto != ETH_P_IP_BE || (*ip).version_ihl >> 4 != 4 {
            return None;
        }
        Some(Ipv4 {
            src: be32((*ip).saddr),
            dst: be32((*ip).daddr),
            proto: (*ip).proto,
            version_ihl: (*ip).version_ihl,
            frag_off: (*ip).frag_off,
            id: be16((*ip).id),
            tot_len: be16((*ip).tot_len),
            ttl: (*ip).ttl,
        })
    }
}

/// The TCP, UDP or SCTP header fields the datapath uses.
#[derive(Clone, Copy)]
pub struct L4 {
    pub src_port: Be16,
    pub dst_port: Be16,
    /// TCP flags; zero for UDP and SCTP.
    pub tcp_flags: u8,
    /// Offset of the L4 header.
    pub off: usize,
    /// Offset of the L4 checksum field.
    pub csum_off: usize,
    pub udp: bool,
    /// SCTP: only addresses are rewritten (`nat::rewrite`), its ports and its CRC32c never.
    pub sctp: bool,
}

/// Reads the TCP, UDP or SCTP header at `off`; `None` for another protocol or a cut header.
#[inline(always)]
pub fn l4<F: Frame>(frame: &mut F, ip_proto: u8, off: usize) -> Option<L4> {
    match ip_proto {
        proto::TCP => {
            if !frame.ensure(off + TCP_HDR_LEN) {
                return None;
            }
            let tcp = ptr_at::<F, TcpHdr>(frame, off)?;
            // SAFETY: bounds-checked by `ptr_at`.
            unsafe {
                Some(L4 {
                    src_port: be16((*tcp).source),
                    dst_port: be16((*tcp).dest),
                    tcp_flags: (*tcp).flags,
                    off,
                    csum_off: off + TCP_CHECK_OFF,
                    udp: false,
                    sctp: false,
                })
            }
        }
        proto::UDP => {
            if !frame.ensure(off + UDP_HDR_LEN) {
                return None;
            }
            let udp = ptr_at::<F, UdpHdr>(frame, off)?;
            // SAFETY: bounds-checked by `ptr_at`.
            unsafe {
                Some(L4 {
                    src_port: be16((*udp).source),
                    dst_port: be16((*udp).dest),
                    tcp_flags: 0,
                    off,
                    csum_off: off + UDP_CHECK_OFF,
                    udp: true,
                    sctp: false,
                })
            }
        }
        proto::SCTP => {
            if !frame.ensure(off + SCTP_HDR_LEN) {
                return None;
            }
            let sctp = ptr_at::<F, SctpHdr>(frame, off)?;
            // SAFETY: bounds-checked by `ptr_at`.
            unsafe {
                Some(L4 {
                    src_port: be16((*sctp).source),
                    dst_port: be16((*sctp).dest),
                    tcp_flags: 0,
                    off,
                    csum_off: off + SCTP_CHECK_OFF,
                    udp: false,
                    sctp: true,
                })
            }
        }
        _ => None,
    }
}

/// The conntrack key of the packet `ip`/`l4` in direction `dir`.
#[inline(always)]
pub fn flow_key(ip: &Ipv4, l4: &L4, dir: u8) -> FlowKey {
    FlowKey::new(ip.src, l4.src_port, ip.dst, l4.dst_port, ip.proto, dir)
}
