//! ICMP errors that quote a load-balanced flow, translated so that they reach the socket that
//! sent the offending packet. That is what makes path MTU discovery work through the balancer:
//!
//! * towards a frontend: an error about a reply we reverse-NATed (it quotes frontend -> client)
//!   goes to the flow's backend, quoting backend -> client as the backend sent it;
//! * towards a client: an error about a packet we DNATed (it quotes client -> backend) reaches
//!   the client quoting client -> frontend, and, when the backend itself sent it, from the
//!   frontend address.

use lb_common::{
    Be16, Be32,
    conntrack::{FORWARD, FlowKey, REPLY},
    csum,
    net::proto,
    stats::Reason,
};

use crate::{
    ct, fib,
    frame::{Action, Frame, ptr_at},
    hdr::{
        ICMP_HDR_LEN, IPV4_MIN_HDR_LEN, IcmpHdr, Ipv4Hdr, TCP_CHECK_OFF, UDP_CHECK_OFF, be16, be32,
        is_icmp_error,
    },
    maps::LB_CT,
    nat::{self, End},
    parse::Ipv4,
    stats,
};

/// The packet an ICMP error quotes.
struct Quote {
    /// Offset of the ICMP header.
    icmp_off: usize,
    /// Offset of the quoted IPv4 header.
    l3_off: usize,
    /// Offset of the quoted L4 header.
    l4_off: usize,
    src: Be32,
    dst: Be32,
    src_port: Be16,
    dst_port: Be16,
    proto: u8,
}

impl Quote {
    /// The conntrack key of the quoted packet seen from the other direction (an error about a
    /// packet travelling A -> B concerns the flow whose packets travel B -> A towards us).
    #[inline(always)]
    fn flow_towards_sender(&self, dir: u8) -> FlowKey {
        FlowKey::new(
            self.dst,
            self.dst_port,
            self.src,
            self.src_port,
            self.proto,
            dir,
        )
    }
}

/// Whether the ICMP message at `icmp_off` is an error (and so may quote one of our flows).
#[inline(always)]
pub fn is_error<F: Frame>(frame: &mut F, icmp_off: usize) -> bool {
    if !frame.ensure(icmp_off + ICMP_HDR_LEN) {
        return false;
    }
    match ptr_at::<F, IcmpHdr>(frame, icmp_off) {
        // SAFETY: bounds-checked by `ptr_at`.
        Some(icmp) => is_icmp_error(unsafe { (*icmp).kind }),
        None => false,
    }
}

/// Parses the quoted IPv4 header and ports; `None` unless they quote TCP, UDP or SCTP
/// completely.
#[inline(always)]
fn quote<F: Frame>(frame: &mut F, icmp_off: usize) -> Option<Quote> {
    let l3_off = icmp_off + ICMP_HDR_LEN;
    if !frame.ensure(l3_off + IPV4_MIN_HDR_LEN) {
        return None;
    }
    let ip = ptr_at::<F, Ipv4Hdr>(frame, l3_off)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (version_ihl, l4_proto, src, dst) =
        unsafe { ((*ip).version_ihl, (*ip).proto, (*ip).saddr, (*ip).daddr) };
    let words = (version_ihl & 0x0f) as usize;
    if words < IPV4_MIN_HDR_LEN / 4 || !proto::balanced(l4_proto) {
        return None;
    }
    let l4_off = l3_off + words * 4;
    // RFC 792 guarantees 8 bytes of the quoted datagram: both ports, and UDP's checksum.
    if !frame.ensure(l4_off + 8) {
        return None;
    }
    let ports = ptr_at::<F, [u16; 2]>(frame, l4_off)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let [src_port, dst_port] = unsafe { *ports };
    Some(Quote {
        icmp_off,
        l3_off,
        l4_off,
        src: be32(src),
        dst: be32(dst),
        src_port: be16(src_port),
        dst_port: be16(dst_port),
        proto: l4_proto,
    })
}

/// Replaces the 32-bit field at `off` with `new`; returns the old value.
///
/// Each field is fetched, bounds-checked and written in one step: with variable offsets (IPv4
/// options) the verifier only trusts a packet pointer that was checked right before its use.
#[inline(always)]
fn swap32<F: Frame>(frame: &F, off: usize, new: u32) -> Result<u32, ()> {
    let field = ptr_at::<F, u32>(frame, off).ok_or(())?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        let old = *field;
        *field = new;
        Ok(old)
    }
}

/// 16-bit counterpart of [`swap32`].
#[inline(always)]
fn swap16<F: Frame>(frame: &F, off: usize, new: u16) -> Result<u16, ()> {
    let field = ptr_at::<F, u16>(frame, off).ok_or(())?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        let old = *field;
        *field = new;
        Ok(old)
    }
}

/// Applies `update` to the 16-bit checksum at `off`; returns (old, new).
#[inline(always)]
fn update16<F: Frame>(
    frame: &F,
    off: usize,
    update: impl FnOnce(u16) -> u16,
) -> Result<(u16, u16), ()> {
    let field = ptr_at::<F, u16>(frame, off).ok_or(())?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        let old = *field;
        let new = update(old);
        *field = new;
        Ok((old, new))
    }
}

/// Rewrites one end of the quoted packet, keeping its IPv4 checksum, its L4 checksum (when the
/// quote contains it) and the ICMP checksum right. ICMP checksums are always complete, so they
/// are updated in place at either hook.
#[inline(always)]
fn rewrite_quote<F: Frame>(
    frame: &mut F,
    q: &Quote,
    end: End,
    addr: Be32,
    port: Be16,
) -> Result<(), ()> {
    let (addr_off, port_off) = match end {
        End::Source => (q.l3_off + 12, q.l4_off),
        End::Destination => (q.l3_off + 16, q.l4_off + 2),
    };
    let (addr, port) = (addr.raw(), port.raw());
    // Make sure every field exists before writing any of them.
    if ptr_at::<F, [u16; 4]>(frame, q.l4_off).is_none() {
        return Err(());
    }
    let old_addr = swap32(frame, addr_off, addr)?;
    // SCTP's ports keep their values, as in the packets themselves (`nat::rewrite`).
    let (old_port, port) = if proto::rewrites_ports(q.proto) {
        (swap16(frame, port_off, port)?, port)
    } else {
        (0, 0)
    };
    let (old_ip_check, new_ip_check) =
        update16(frame, q.l3_off + 10, |c| csum::replace4(c, old_addr, addr))?;

    let mut icmp_delta = [(old_ip_check, new_ip_check), (old_port, port), (0, 0)];
    // The quote may stop before a TCP checksum; then there is nothing to keep consistent.
    // SCTP's CRC32c covers no address and no port changed.
    let l4_check = if q.proto == proto::SCTP {
        Err(())
    } else if q.proto == proto::UDP {
        update16(frame, q.l4_off + UDP_CHECK_OFF, |c| {
            csum::udp_replace2(csum::udp_replace4(c, old_addr, addr), old_port, port)
        })
    } else {
        update16(frame, q.l4_off + TCP_CHECK_OFF, |c| {
            csum::replace2(csum::replace4(c, old_addr, addr), old_port, port)
        })
    };
    if let Ok(change) = l4_check {
        icmp_delta[2] = change;
    }
    update16(frame, q.icmp_off + 2, |mut c| {
        c = csum::replace4(c, old_addr, addr);
        for (old, new) in icmp_delta {
            c = csum::replace2(c, old, new);
        }
        c
    })?;
    Ok(())
}

/// An ICMP error addressed to a frontend address (`ip` its outer header). Returns `None` when it
/// quotes none of our flows, so the caller treats it like any other packet to that address.
#[inline(always)]
pub fn towards_frontend<F: Frame>(
    frame: &mut F,
    ip: &Ipv4,
    icmp_off: usize,
    len: u32,
) -> Option<Action> {
    let q = quote(frame, icmp_off)?;
    let Some(entry) = LB_CT.get_ptr_mut(&q.flow_towards_sender(FORWARD)) else {
        return about_source_nat(frame, ip, &q, len);
    };
    if !ct::continues(entry, 0, ct::now()) {
        return None;
    }
    // SAFETY: map value from a successful lookup.
    let e = unsafe { *entry };
    // About a reply we sent as frontend -> client: the backend gets it quoting the reply as it
    // sent it, backend -> client, or -> the source this node gave the client.
    let mut translated = rewrite_quote(frame, &q, End::Source, e.nat_addr, e.nat_port);
    if translated.is_ok() && e.snat() {
        translated = rewrite_quote(frame, &q, End::Destination, e.snat_addr, e.snat_port);
    }
    if translated.is_ok() {
        translated = nat::rewrite(frame, End::Destination, None, e.nat_addr, e.nat_port);
    }
    if translated.is_err() {
        stats::verdict(Reason::DropMalformed, len);
        return Some(Action::Drop);
    }
    stats::set(e.set_id, len, false);
    stats::verdict(Reason::IcmpErrorNat, len);
    Some(Action::Pass)
}

/// An ICMP error addressed to the node about a packet it sent on for a source-NATed flow (it
/// quotes node port -> backend: a router on the way asks for a smaller MTU, or the backend
/// refuses): the client gets it, quoting client -> frontend as it sent it, from the frontend
/// when the backend itself sent it; routed like the flow's replies. `None` when it is no such
/// error.
#[inline(always)]
fn about_source_nat<F: Frame>(frame: &mut F, ip: &Ipv4, q: &Quote, len: u32) -> Option<Action> {
    if q.src != ip.dst {
        return None;
    }
    // SAFETY: LRU map value, copied out at once.
    let e = unsafe { *LB_CT.get(&q.flow_towards_sender(REPLY))? };
    if !e.routed() || !e.live(ct::now()) {
        return None;
    }
    if fib::left_to_tc::<F>(&e) {
        return Some(Action::Pass);
    }
    let from_backend = ip.src == q.dst;
    let src = if from_backend { e.nat_addr } else { ip.src };
    let route = match fib::route(frame, ip, src, e.snat_addr, len) {
        Ok(route) => route,
        Err(action) => return Some(action),
    };
    let mut translated = rewrite_quote(frame, q, End::Source, e.snat_addr, e.snat_port)
        .and_then(|()| rewrite_quote(frame, q, End::Destination, e.nat_addr, e.nat_port))
        .and_then(|()| nat::rewrite(frame, End::Destination, None, e.snat_addr, e.snat_port));
    if translated.is_ok() && from_backend {
        translated = nat::rewrite(frame, End::Source, None, e.nat_addr, e.nat_port);
    }
    if translated.is_err() {
        stats::verdict(Reason::DropMalformed, len);
        return Some(Action::Drop);
    }
    stats::set(e.set_id, len, false);
    stats::verdict(Reason::IcmpErrorNat, len);
    Some(fib::send(frame, route, len))
}

/// An ICMP error on its way to a client: translated if it quotes one of our flows, else
/// untouched.
#[inline(always)]
pub fn towards_client<F: Frame>(frame: &mut F, ip: &Ipv4, icmp_off: usize, len: u32) -> Action {
    let Some(q) = quote(frame, icmp_off) else {
        return Action::Pass;
    };
    // SAFETY: LRU map value, copied out at once.
    let Some(entry) = (unsafe { LB_CT.get(&q.flow_towards_sender(REPLY)) }).copied() else {
        return Action::Pass;
    };
    if !entry.live(ct::now()) {
        return Action::Pass;
    }
    let mut translated = rewrite_quote(frame, &q, End::Destination, entry.nat_addr, entry.nat_port);
    // A flow whose client port was remapped: the client gets its own port back.
    if translated.is_ok() && entry.client_port_remapped() {
        translated = rewrite_quote(frame, &q, End::Source, entry.snat_addr, entry.snat_port);
    }
    if translated.is_ok() && ip.src == q.dst {
        translated = nat::rewrite(frame, End::Source, None, entry.nat_addr, entry.nat_port);
    }
    if translated.is_err() {
        return Action::Pass;
    }
    stats::set(entry.set_id, len, false);
    stats::verdict(Reason::IcmpErrorNat, len);
    Action::Pass
}
