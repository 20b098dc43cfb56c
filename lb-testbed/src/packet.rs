//! Test packets, built with etherparse so that every checksum in an expected frame is computed
//! from scratch: comparing whole frames then checks the datapath's incremental updates too.

use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header,
    Ipv4Options, PacketBuilder, TcpHeader, UdpHeader, icmpv4::DestUnreachableHeader,
};

pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// Which transport the packet carries.
#[derive(Clone, Debug)]
pub enum Transport {
    Tcp(TcpHeader),
    /// `zero_checksum`: send UDP without a checksum (RFC 768 allows it over IPv4).
    Udp {
        header: UdpHeader,
        zero_checksum: bool,
    },
    Icmp(Icmpv4Header),
    /// SCTP's common header (its CRC32c computed over it and the chunks in the payload).
    /// etherparse has no SCTP header; [`sctp_header`] builds it.
    Sctp {
        source_port: u16,
        destination_port: u16,
        verification_tag: u32,
    },
    /// Anything else: the protocol number and raw payload follow.
    Other(u8),
}

/// IP protocol number of SCTP.
pub const SCTP: u8 = 132;

/// CRC32c (Castagnoli, reflected polynomial 0x82f63b78), bit by bit: SCTP's checksum
/// (RFC 9260, appendix A).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP common header and `chunks`, its checksum computed: CRC32c over the whole SCTP
/// packet with the checksum field zero, stored least significant byte first (as Linux's
/// `sctp_compute_cksum` does). No IP address is covered.
pub fn sctp_header(source_port: u16, destination_port: u16, vtag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + chunks.len());
    out.extend_from_slice(&source_port.to_be_bytes());
    out.extend_from_slice(&destination_port.to_be_bytes());
    out.extend_from_slice(&vtag.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(chunks);
    let crc = crc32c(&out);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out.truncate(12);
    out
}

/// Whether the SCTP packet `sctp` (common header and chunks) carries a valid CRC32c.
pub fn sctp_checksum_ok(sctp: &[u8]) -> bool {
    if sctp.len() < 12 {
        return false;
    }
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].copy_from_slice(&[0; 4]);
    crc32c(&zeroed).to_le_bytes() == sctp[8..12]
}

/// An SCTP chunk of `kind` with `flags` and `value`, padded to 4 bytes.
pub fn sctp_chunk(kind: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = vec![kind, flags];
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// SCTP chunk types used by the tests.
pub mod sctp_chunk_type {
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
}

/// An INIT chunk (RFC 9260 3.3.2) with initiate tag `tag`: a window of 64 KiB, 10 streams each
/// way, initial TSN `tag`.
pub fn sctp_init_chunk(kind: u8, tag: u32) -> Vec<u8> {
    let mut value = Vec::new();
    value.extend_from_slice(&tag.to_be_bytes());
    value.extend_from_slice(&65_536u32.to_be_bytes());
    value.extend_from_slice(&10u16.to_be_bytes());
    value.extend_from_slice(&10u16.to_be_bytes());
    value.extend_from_slice(&tag.to_be_bytes());
    sctp_chunk(kind, 0, &value)
}

/// A TCP segment over IPv6 from a pod (`src`) to `dst`, as [`Packet::tcp`] builds IPv4 ones
/// (same MACs, sequence numbers and window), its checksum computed from scratch.
pub fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, tcp_flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ipv6(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 1000, 64_240);
    if tcp_flags & flags::SYN != 0 {
        builder = builder.syn();
    }
    if tcp_flags & flags::PSH != 0 {
        builder = builder.psh();
    }
    if tcp_flags & flags::ACK != 0 {
        builder = builder.ack(5000);
    }
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("frame");
    frame
}

/// A UDP datagram over IPv6 from a pod (`src`) to `dst` (see [`tcp6`]).
pub fn udp6(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ipv6(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("frame");
    frame
}

/// An Ethernet + IPv4 packet under construction.
#[derive(Clone, Debug)]
pub struct Packet {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub ip: Ipv4Header,
    pub transport: Transport,
    pub payload: Vec<u8>,
}

pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

fn ip_header(src: Ipv4Addr, dst: Ipv4Addr, proto: IpNumber) -> Ipv4Header {
    let mut ip = Ipv4Header::new(0, 64, proto, src.octets(), dst.octets()).unwrap();
    ip.identification = 0x1c46;
    ip
}

impl Packet {
    /// A TCP segment from a pod (`src`) to `dst` with the given flags.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, tcp_flags: u8, payload: &[u8]) -> Self {
        let mut tcp = TcpHeader::new(src.port(), dst.port(), 1000, 64_240);
        tcp.fin = tcp_flags & flags::FIN != 0;
        tcp.syn = tcp_flags & flags::SYN != 0;
        tcp.rst = tcp_flags & flags::RST != 0;
        tcp.psh = tcp_flags & flags::PSH != 0;
        tcp.ack = tcp_flags & flags::ACK != 0;
        if tcp.ack {
            tcp.acknowledgment_number = 5000;
        }
        Self {
            eth_src: POD_MAC,
            eth_dst: HOST_MAC,
            ip: ip_header(*src.ip(), *dst.ip(), IpNumber::TCP),
            transport: Transport::Tcp(tcp),
            payload: payload.to_vec(),
        }
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            eth_src: POD_MAC,
            eth_dst: HOST_MAC,
            ip: ip_header(*src.ip(), *dst.ip(), IpNumber::UDP),
            transport: Transport::Udp {
                header: UdpHeader {
                    source_port: src.port(),
                    destination_port: dst.port(),
                    length: 0,
                    checksum: 0,
                },
                zero_checksum: false,
            },
            payload: payload.to_vec(),
        }
    }

    /// An ICMP destination unreachable (`code`) from `from` to `to`, quoting `quoted`
    /// (its IPv4 header and the first `quote_len` bytes after it).
    pub fn icmp_unreachable(
        from: Ipv4Addr,
        to: Ipv4Addr,
        code: DestUnreachableHeader,
        quoted: &Packet,
        quote_len: usize,
    ) -> Self {
        Self::icmp_error(
            from,
            to,
            Icmpv4Type::DestinationUnreachable(code),
            quoted,
            quote_len,
        )
    }

    /// An ICMP error of `kind` from `from` to `to`, quoting `quoted`'s IPv4 header and the first
    /// `quote_len` bytes after it.
    pub fn icmp_error(
        from: Ipv4Addr,
        to: Ipv4Addr,
        kind: Icmpv4Type,
        quoted: &Packet,
        quote_len: usize,
    ) -> Self {
        let frame = quoted.bytes();
        let ip_start = 14;
        let quoted_ip_len = quoted.ip.header_len();
        let end = (ip_start + quoted_ip_len + quote_len).min(frame.len());
        Self {
            eth_src: POD_MAC,
            eth_dst: HOST_MAC,
            ip: ip_header(from, to, IpNumber::ICMP),
            transport: Transport::Icmp(Icmpv4Header::new(kind)),
            payload: frame[ip_start..end].to_vec(),
        }
    }

    /// An SCTP packet from `src` to `dst` with verification tag `vtag` and `chunks`.
    pub fn sctp(src: SocketAddrV4, dst: SocketAddrV4, vtag: u32, chunks: &[u8]) -> Self {
        Self {
            eth_src: POD_MAC,
            eth_dst: HOST_MAC,
            ip: ip_header(*src.ip(), *dst.ip(), IpNumber(SCTP)),
            transport: Transport::Sctp {
                source_port: src.port(),
                destination_port: dst.port(),
                verification_tag: vtag,
            },
            payload: chunks.to_vec(),
        }
    }

    /// An SCTP INIT (verification tag 0, as RFC 9260 requires) with initiate tag `tag`.
    pub fn sctp_init(src: SocketAddrV4, dst: SocketAddrV4, tag: u32) -> Self {
        Self::sctp(src, dst, 0, &sctp_init_chunk(sctp_chunk_type::INIT, tag))
    }

    /// An IPv4 packet of another protocol (e.g. 47, GRE) with a raw payload.
    pub fn other(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Self {
        Self {
            eth_src: POD_MAC,
            eth_dst: HOST_MAC,
            ip: ip_header(src, dst, IpNumber(proto)),
            transport: Transport::Other(proto),
            payload: payload.to_vec(),
        }
    }

    pub fn src(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(self.ip.source), self.ports().0)
    }

    pub fn dst(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(self.ip.destination), self.ports().1)
    }

    fn ports(&self) -> (u16, u16) {
        match &self.transport {
            Transport::Tcp(t) => (t.source_port, t.destination_port),
            Transport::Udp { header, .. } => (header.source_port, header.destination_port),
            Transport::Sctp {
                source_port,
                destination_port,
                ..
            } => (*source_port, *destination_port),
            _ => (0, 0),
        }
    }

    /// The same packet with another destination address and port.
    pub fn with_dst(mut self, dst: SocketAddrV4) -> Self {
        self.ip.destination = dst.ip().octets();
        match &mut self.transport {
            Transport::Tcp(t) => t.destination_port = dst.port(),
            Transport::Udp { header, .. } => header.destination_port = dst.port(),
            Transport::Sctp {
                destination_port, ..
            } => *destination_port = dst.port(),
            _ => {}
        }
        self
    }

    /// The same packet with another source address and port.
    pub fn with_src(mut self, src: SocketAddrV4) -> Self {
        self.ip.source = src.ip().octets();
        match &mut self.transport {
            Transport::Tcp(t) => t.source_port = src.port(),
            Transport::Udp { header, .. } => header.source_port = src.port(),
            Transport::Sctp { source_port, .. } => *source_port = src.port(),
            _ => {}
        }
        self
    }

    /// The reply to this packet: addresses, ports and MACs swapped (`tcp_flags` only for TCP).
    pub fn reply(&self, tcp_flags: u8, payload: &[u8]) -> Self {
        let mut reply = match &self.transport {
            Transport::Tcp(_) => Packet::tcp(self.dst(), self.src(), tcp_flags, payload),
            Transport::Udp { .. } => Packet::udp(self.dst(), self.src(), payload),
            // SCTP: the chunks are `payload`, the verification tag the INIT's initiate tag
            // (taken from the INIT chunk this packet carries, when it does).
            Transport::Sctp { .. } => {
                let vtag = self
                    .payload
                    .get(4..8)
                    .map_or(0, |tag| u32::from_be_bytes(tag.try_into().unwrap()));
                Packet::sctp(self.dst(), self.src(), vtag, payload)
            }
            _ => panic!("reply() is for TCP, UDP and SCTP"),
        };
        reply.eth_src = self.eth_dst;
        reply.eth_dst = self.eth_src;
        reply
    }

    pub fn with_ip_options(mut self, options: &[u8]) -> Self {
        self.ip.options = Ipv4Options::try_from(options).unwrap();
        self
    }

    pub fn with_zero_udp_checksum(mut self) -> Self {
        if let Transport::Udp { zero_checksum, .. } = &mut self.transport {
            *zero_checksum = true;
        }
        self
    }

    pub fn with_ip_id(mut self, id: u16) -> Self {
        self.ip.identification = id;
        self
    }

    /// The L4 header and payload, with every length and checksum computed.
    fn l4_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.transport {
            Transport::Tcp(tcp) => {
                let mut tcp = tcp.clone();
                tcp.checksum = tcp.calc_checksum_ipv4(&self.ip, &self.payload).unwrap();
                out.extend_from_slice(&tcp.to_bytes());
            }
            Transport::Udp {
                header,
                zero_checksum,
            } => {
                let mut udp = UdpHeader::with_ipv4_checksum(
                    header.source_port,
                    header.destination_port,
                    &self.ip,
                    &self.payload,
                )
                .unwrap();
                if *zero_checksum {
                    udp.checksum = 0;
                }
                out.extend_from_slice(&udp.to_bytes());
            }
            Transport::Icmp(icmp) => {
                let icmp = Icmpv4Header::with_checksum(icmp.icmp_type.clone(), &self.payload);
                out.extend_from_slice(&icmp.to_bytes());
            }
            Transport::Sctp {
                source_port,
                destination_port,
                verification_tag,
            } => out.extend_from_slice(&sctp_header(
                *source_port,
                *destination_port,
                *verification_tag,
                &self.payload,
            )),
            Transport::Other(_) => {}
        }
        out.extend_from_slice(&self.payload);
        out
    }

    /// The whole frame.
    pub fn bytes(&self) -> Vec<u8> {
        self.frame(self.ip.clone(), &self.l4_bytes())
    }

    /// A frame of this packet's Ethernet addresses, `ip` (its length and checksum filled in) and
    /// `data` after it.
    fn frame(&self, mut ip: Ipv4Header, data: &[u8]) -> Vec<u8> {
        ip.set_payload_len(data.len()).unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = Vec::new();
        Ethernet2Header {
            source: self.eth_src,
            destination: self.eth_dst,
            ether_type: EtherType::IPV4,
        }
        .write(&mut out)
        .unwrap();
        ip.write(&mut out).unwrap();
        out.extend_from_slice(data);
        out
    }

    /// Splits the packet into two IPv4 fragments, the first carrying `first_len` bytes of the
    /// L4 datagram (a multiple of 8).
    pub fn fragments(&self, first_len: usize) -> [Vec<u8>; 2] {
        assert_eq!(first_len % 8, 0);
        let l4 = self.l4_bytes();
        let parts = [
            (&l4[..first_len], 0u16, true),
            (&l4[first_len..], first_len as u16 / 8, false),
        ];
        parts.map(|(data, offset, more)| {
            let mut ip = self.ip.clone();
            ip.dont_fragment = false;
            ip.more_fragments = more;
            ip.fragment_offset = IpFragOffset::try_new(offset).unwrap();
            self.frame(ip, data)
        })
    }
}

/// Renders a frame as hex rows of 16 bytes, for readable assertion failures.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(16)
        .enumerate()
        .map(|(row, chunk)| {
            let bytes: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}: {}", row * 16, bytes.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts two frames are identical, showing both in hex (and where they first differ).
#[track_caller]
pub fn assert_frame_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual != expected {
        let first = actual
            .iter()
            .zip(expected)
            .position(|(a, e)| a != e)
            .unwrap_or(actual.len().min(expected.len()));
        panic!(
            "{what}: frames differ at byte {first} (lengths {} vs {})\nactual:\n{}\nexpected:\n{}",
            actual.len(),
            expected.len(),
            hex(actual),
            hex(expected)
        );
    }
}

/// A raw IPv4 socket for SCTP (protocol 132), which needs no SCTP support in the kernel (this
/// host's kernel has no sctp module: SCTP sockets fail with EPROTONOSUPPORT). What it receives
/// starts with the IPv4 header; what it sends is the SCTP packet, the kernel adding the IPv4
/// header. `timeout` bounds each receive.
pub fn sctp_raw_socket(timeout: std::time::Duration) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::from(libc::SOCK_RAW),
        Some(socket2::Protocol::from(i32::from(SCTP))),
    )?;
    socket.set_read_timeout(Some(timeout))?;
    Ok(socket)
}

/// Receives the next IPv4 packet from a raw socket: (source, destination, the IP payload).
pub fn raw_recv(socket: &socket2::Socket) -> std::io::Result<(Ipv4Addr, Ipv4Addr, Vec<u8>)> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    let n = socket.recv(&mut buf)?;
    // SAFETY: `recv` initialised the first `n` bytes.
    let bytes: Vec<u8> = buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    let header_len = usize::from(bytes.first().copied().unwrap_or(0) & 0x0f) * 4;
    if n < header_len.max(20) {
        return Err(std::io::Error::other(format!("short packet of {n} bytes")));
    }
    let addr = |at: usize| Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]);
    Ok((addr(12), addr(16), bytes[header_len..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value_and_sctp_packets_verify() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let init = Packet::sctp_init(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 36_412),
            SocketAddrV4::new(Ipv4Addr::new(172, 30, 0, 41), 36_412),
            0x1234_5678,
        );
        let frame = init.bytes();
        assert_eq!(frame[23], SCTP);
        assert!(sctp_checksum_ok(&frame[34..]));
        let mut bad = frame[34..].to_vec();
        bad[20] ^= 1;
        assert!(!sctp_checksum_ok(&bad));
    }
}
