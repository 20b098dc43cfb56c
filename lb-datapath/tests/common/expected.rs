//! The frames the datapath must send back when it refuses a packet, built independently of it.

use etherparse::{Icmpv4Type, IpDscp, IpEcn, icmpv4::DestUnreachableHeader};

use super::packet::{self, Packet, flags};

/// The RST the datapath must send for `pkt` (a TCP segment to `frontend` without backend).
pub fn expected_rst(pkt: &Packet, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let rst_flags = if ack.is_some() {
        flags::RST | flags::ACK
    } else {
        flags::RST
    };
    let mut rst = Packet::tcp(pkt.dst(), pkt.src(), rst_flags, &[]);
    rst.eth_src = pkt.eth_dst;
    rst.eth_dst = pkt.eth_src;
    rst.ip.identification = 0;
    if let packet::Transport::Tcp(t) = &mut rst.transport {
        t.sequence_number = seq;
        t.acknowledgment_number = ack.unwrap_or(0);
        t.window_size = 0;
    }
    rst.bytes()
}

/// The ICMP port unreachable the datapath must send for `pkt`.
pub fn expected_port_unreachable(pkt: &Packet) -> Vec<u8> {
    expected_icmp_error(
        pkt,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
    )
}

/// The ICMP error of `kind` the datapath must send for `pkt`, from the address `pkt` went to,
/// back out of the interface it came in on.
pub fn expected_icmp_error(pkt: &Packet, kind: Icmpv4Type) -> Vec<u8> {
    let mut icmp = Packet::icmp_error(*pkt.dst().ip(), *pkt.src().ip(), kind, pkt, 8);
    icmp.eth_src = pkt.eth_dst;
    icmp.eth_dst = pkt.eth_src;
    icmp.ip.identification = 0;
    icmp.ip.dont_fragment = false;
    icmp.ip.dscp = IpDscp::try_new(0xc0 >> 2).unwrap();
    icmp.ip.ecn = IpEcn::ZERO;
    icmp.bytes()
}
