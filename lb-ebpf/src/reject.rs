//! Answers generated in the datapath, sent straight back out of the interface the packet came in
//! on: rejects as kube-proxy's REJECT rules would send them (a TCP RST for TCP, an ICMP port
//! unreachable for everything else), and the ICMP errors a router sends (fragmentation needed,
//! time exceeded). Never in answer to a RST, to a non-first fragment or to an ICMP error; only
//! to unicast sources, and at most at the node's rate (`lb_common::answer`).

use lb_common::{answer, csum, net::proto, stats::Reason};

use crate::{
    ct, events,
    frame::{Action, Frame, ptr_at},
    hdr::{
        ETH_HDR_LEN, ETH_P_IP_BE, EthHdr, ICMP_FRAG_NEEDED, ICMP_HDR_LEN, ICMP_PORT_UNREACH,
        IP_DF_BE, IPV4_MIN_HDR_LEN, IcmpHdr, Ipv4Hdr, L3_OFF, TCP_HDR_LEN, TcpHdr, UDP_HDR_LEN,
        icmp_type, tcp_flags,
    },
    maps::LB_ANSWERS,
    parse::{Frag, Ipv4, L4},
    stats,
};

const TTL: u8 = 64;
/// Precedence "internetwork control", which Linux sets on the ICMP errors it generates.
const ICMP_TOS: u8 = 0xc0;
/// What an ICMP error quotes: the offending IPv4 header (without options) and 8 bytes of L4.
const QUOTE_LEN: usize = IPV4_MIN_HDR_LEN + UDP_HDR_LEN;
const ICMP_IP_LEN: usize = IPV4_MIN_HDR_LEN + ICMP_HDR_LEN + QUOTE_LEN;
const RST_IP_LEN: usize = IPV4_MIN_HDR_LEN + TCP_HDR_LEN;

/// Turns the packet into its reject and bounces it, or drops it when no reject is due.
#[inline(always)]
pub fn reject<F: Frame>(frame: &mut F, ip: &Ipv4, l4: Option<&L4>, len: u32) -> Action {
    if !may_answer(frame, ip, len) {
        return Action::Drop;
    }
    let built = match l4 {
        Some(l4) if ip.proto == proto::TCP => tcp_reset(frame, ip, l4),
        _ => icmp_error(frame, ip, icmp_type::DEST_UNREACH, ICMP_PORT_UNREACH, 0),
    };
    sent(built)
}

/// ICMP fragmentation needed (RFC 1191) with the next hop's `mtu`, for a DF packet too large to
/// forward.
#[inline(always)]
pub fn fragmentation_needed<F: Frame>(frame: &mut F, ip: &Ipv4, mtu: u16, len: u32) -> Action {
    if !may_answer(frame, ip, len) {
        return Action::Drop;
    }
    // The last 16 bits of the header's second word carry the MTU.
    let rest = u32::from(mtu).to_be();
    sent(icmp_error(
        frame,
        ip,
        icmp_type::DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        rest,
    ))
}

/// ICMP time exceeded in transit, for a packet to forward whose TTL runs out.
#[inline(always)]
pub fn time_exceeded<F: Frame>(frame: &mut F, ip: &Ipv4, len: u32) -> Action {
    if !may_answer(frame, ip, len) {
        return Action::Drop;
    }
    sent(icmp_error(frame, ip, icmp_type::TIME_EXCEEDED, 0, 0))
}

#[inline(always)]
fn sent(built: Result<(), ()>) -> Action {
    match built {
        Ok(()) => Action::Bounce,
        Err(()) => Action::Drop,
    }
}

/// Whether an answer to the packet may go: to a unicast source (address and MAC), within the
/// node's budget. Counted when it may not.
#[inline(always)]
fn may_answer<F: Frame>(frame: &F, ip: &Ipv4, len: u32) -> bool {
    let unicast_mac = match ptr_at::<F, EthHdr>(frame, 0) {
        // SAFETY: bounds-checked by `ptr_at`. The group bit is the first byte's lowest.
        Some(eth) => unsafe { (*eth).src[0] & 1 == 0 },
        None => false,
    };
    let allowed = unicast_mac
        && answer::unicast(ip.src)
        && match LB_ANSWERS.get_ptr_mut(0) {
            // SAFETY: the map's only value; CPUs race on it, which `answer::take` allows for.
            Some(bucket) => answer::take(unsafe { &mut *bucket }, ct::now()),
            None => false,
        };
    if !allowed {
        events::answer_suppressed(ip);
        stats::verdict(Reason::AnswerSuppressed, len);
    }
    allowed
}

/// One's complement sum of a value's 16-bit words, as they lie in memory.
#[inline(always)]
fn sum_words<const N: usize>(words: &[u16; N]) -> u64 {
    let mut sum = 0u64;
    for word in words {
        sum += *word as u64;
    }
    sum
}

#[inline(always)]
fn ipv4_header(
    total_len: usize,
    tos: u8,
    frag_off: u16,
    proto: u8,
    saddr: u32,
    daddr: u32,
) -> Ipv4Hdr {
    let mut hdr = Ipv4Hdr {
        version_ihl: 0x45,
        tos,
        tot_len: (total_len as u16).to_be(),
        id: 0,
        frag_off,
        ttl: TTL,
        proto,
        check: 0,
        saddr,
        daddr,
    };
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers without padding.
    let words: [u16; 10] = unsafe { core::mem::transmute_copy(&hdr) };
    hdr.check = !csum::fold(sum_words(&words));
    hdr
}

/// Swaps the Ethernet addresses at the front of the frame.
#[inline(always)]
fn swap_macs<F: Frame>(frame: &F, dst: [u8; 6], src: [u8; 6]) -> Result<(), ()> {
    let eth = ptr_at::<F, EthHdr>(frame, 0).ok_or(())?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        (*eth).dst = src;
        (*eth).src = dst;
        (*eth).proto = ETH_P_IP_BE;
    }
    Ok(())
}

/// RFC 793 reset generation: if the offending segment has an ACK, the RST takes its sequence
/// number from that ACK; otherwise the RST acknowledges everything the segment occupied.
#[inline(always)]
fn tcp_reset<F: Frame>(frame: &mut F, ip: &Ipv4, l4: &L4) -> Result<(), ()> {
    if l4.tcp_flags & tcp_flags::RST != 0 {
        return Err(());
    }
    let eth = ptr_at::<F, EthHdr>(frame, 0).ok_or(())?;
    let iph = ptr_at::<F, Ipv4Hdr>(frame, L3_OFF).ok_or(())?;
    let tcp = ptr_at::<F, TcpHdr>(frame, l4.off).ok_or(())?;
    // SAFETY: all three headers were bounds-checked by `ptr_at`.
    let (dst_mac, src_mac, seq, ack, data_off, ip_len) = unsafe {
        (
            (*eth).dst,
            (*eth).src,
            u32::from_be((*tcp).seq),
            u32::from_be((*tcp).ack_seq),
            ((*tcp).doff_res >> 4) as usize * 4,
            u16::from_be((*iph).tot_len) as usize,
        )
    };
    let (rst_seq, rst_ack, rst_flags) = if l4.tcp_flags & tcp_flags::ACK != 0 {
        (ack, 0, tcp_flags::RST)
    } else {
        let payload = ip_len.saturating_sub(l4.off - L3_OFF + data_off) as u32;
        let syn_fin = (l4.tcp_flags & tcp_flags::SYN != 0) as u32
            + (l4.tcp_flags & tcp_flags::FIN != 0) as u32;
        (
            0,
            seq.wrapping_add(payload).wrapping_add(syn_fin),
            tcp_flags::RST | tcp_flags::ACK,
        )
    };

    let new_ip = ipv4_header(
        RST_IP_LEN,
        0,
        IP_DF_BE,
        proto::TCP,
        ip.dst.raw(),
        ip.src.raw(),
    );
    let mut rst = TcpHdr {
        source: l4.dst_port.raw(),
        dest: l4.src_port.raw(),
        seq: rst_seq.to_be(),
        ack_seq: rst_ack.to_be(),
        doff_res: ((TCP_HDR_LEN / 4) as u8) << 4,
        flags: rst_flags,
        window: 0,
        urg_ptr: 0,
        check: 0,
    };
    // SAFETY: TcpHdr is 20 bytes of plain integers without padding.
    let tcp_words: [u16; 10] = unsafe { core::mem::transmute_copy(&rst) };
    let pseudo = csum::add32(csum::add32(0, ip.dst.raw()), ip.src.raw())
        + (proto::TCP as u16).to_be() as u64
        + (TCP_HDR_LEN as u16).to_be() as u64;
    rst.check = !csum::fold(pseudo + sum_words(&tcp_words));

    swap_macs(frame, dst_mac, src_mac)?;
    let ip_out = ptr_at::<F, Ipv4Hdr>(frame, L3_OFF).ok_or(())?;
    let tcp_out = ptr_at::<F, TcpHdr>(frame, L3_OFF + IPV4_MIN_HDR_LEN).ok_or(())?;
    // SAFETY: bounds-checked by `ptr_at`; the original headers were read above.
    unsafe {
        *ip_out = new_ip;
        *tcp_out = rst;
    }
    frame.truncate(ETH_HDR_LEN + RST_IP_LEN)
}

/// An ICMP error of type `kind` and `code` (RFC 792), the second word of its header `rest`,
/// quoting the offending IPv4 header and the first 8 bytes of its payload. Headers with options
/// are not quoted (no answer goes then): the quote has a fixed size, which keeps the code
/// verifier-friendly.
#[inline(always)]
fn icmp_error<F: Frame>(frame: &mut F, ip: &Ipv4, kind: u8, code: u8, rest: u32) -> Result<(), ()> {
    if ip.has_options() || ip.frag() == Frag::Later || !frame.ensure(L3_OFF + QUOTE_LEN) {
        return Err(());
    }
    let eth = ptr_at::<F, EthHdr>(frame, 0).ok_or(())?;
    let quote = ptr_at::<F, [u16; QUOTE_LEN / 2]>(frame, L3_OFF).ok_or(())?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (dst_mac, src_mac, quote_sum) = unsafe { ((*eth).dst, (*eth).src, sum_words(&*quote)) };

    let new_ip = ipv4_header(
        ICMP_IP_LEN,
        ICMP_TOS,
        0,
        proto::ICMP,
        ip.dst.raw(),
        ip.src.raw(),
    );
    let mut icmp = IcmpHdr {
        kind,
        code,
        check: 0,
        rest,
    };
    // SAFETY: IcmpHdr is 8 bytes of plain integers without padding.
    let icmp_words: [u16; 4] = unsafe { core::mem::transmute_copy(&icmp) };
    icmp.check = !csum::fold(sum_words(&icmp_words) + quote_sum);

    // Room for the new IPv4 and ICMP headers in front of the quoted packet.
    frame.grow_after_eth(IPV4_MIN_HDR_LEN + ICMP_HDR_LEN)?;
    swap_macs(frame, dst_mac, src_mac)?;
    let ip_out = ptr_at::<F, Ipv4Hdr>(frame, L3_OFF).ok_or(())?;
    let icmp_out = ptr_at::<F, IcmpHdr>(frame, L3_OFF + IPV4_MIN_HDR_LEN).ok_or(())?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        *ip_out = new_ip;
        *icmp_out = icmp;
    }
    frame.truncate(ETH_HDR_LEN + ICMP_IP_LEN)
}
