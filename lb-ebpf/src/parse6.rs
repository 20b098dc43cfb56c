//! IPv6 parsing: the fixed header, then the extension headers up to the transport header,
//! within a fixed bound. Every read is bounds-checked through [`ptr_at`].

use lb_common::{Be128, conntrack::FlowKey6};

use crate::{
    frame::{Frame, ptr_at},
    hdr::{
        ETH_P_IPV6_BE, EthHdr, IPV6_FRAG_HDR_LEN, IPV6_FRAG_MORE_BE, IPV6_FRAG_OFFSET_BE,
        IPV6_HDR_LEN, Ipv6ExtHdr, Ipv6FragHdr, Ipv6Hdr, L3_OFF, ipv6_ext,
    },
    maps::LB_SCRATCH,
    parse::{Frag, L4},
};

/// Extension headers walked before giving up: hop-by-hop, destination options (twice: before
/// routing and before the payload), routing, fragment and authentication, each at most once in
/// the order RFC 8200 recommends. A longer chain passes unbalanced.
pub const MAX_EXT_HEADERS: usize = 6;

/// The furthest a transport header may start: a packet whose extension headers take more than
/// this passes unbalanced (it keeps the offsets the verifier tracks small).
pub const MAX_L4_OFF: usize = 512;

/// The IPv6 header fields the datapath uses, the extension headers already walked.
#[derive(Clone, Copy)]
pub struct Ipv6 {
    pub src: Be128,
    pub dst: Be128,
    /// The transport protocol: the last next-header value of the chain.
    pub proto: u8,
    /// Offset of the transport header.
    pub l4_off: usize,
    pub frag: Frag,
}

/// Whether the frame carries IPv6 (what the IPv4 entry programs hand to their IPv6 twins).
#[inline(always)]
pub fn is_ipv6<F: Frame>(frame: &mut F) -> bool {
    if !frame.ensure(L3_OFF) {
        return false;
    }
    // SAFETY: bounds-checked by `ptr_at`.
    ptr_at::<F, EthHdr>(frame, 0).is_some_and(|eth| unsafe { (*eth).proto } == ETH_P_IPV6_BE)
}

/// Reads Ethernet, the fixed IPv6 header and its extension headers; `None` for anything that is
/// not IPv6, is cut short, or whose chain of extension headers is longer than
/// [`MAX_EXT_HEADERS`] or [`MAX_L4_OFF`] (such packets are never balanced and pass untouched).
#[inline(always)]
pub fn ipv6<F: Frame>(frame: &mut F) -> Option<Ipv6> {
    if !frame.ensure(L3_OFF + IPV6_HDR_LEN) {
        return None;
    }
    let eth = ptr_at::<F, EthHdr>(frame, 0)?;
    let ip = ptr_at::<F, Ipv6Hdr>(frame, L3_OFF)?;
    // SAFETY: both headers were bounds-checked by `ptr_at`.
    let mut parsed = unsafe {
        if (*eth).proto != ETH_P_IPV6_BE || (*ip).version_tc_flow.to_ne_bytes()[0] >> 4 != 6 {
            return None;
        }
        Ipv6 {
            src: Be128::from_raw((*ip).saddr),
            dst: Be128::from_raw((*ip).daddr),
            proto: (*ip).next_header,
            l4_off: L3_OFF + IPV6_HDR_LEN,
            frag: Frag::None,
        }
    };
    if is_extension(parsed.proto) {
        walk(frame, &mut parsed)?;
        join(&mut parsed)?;
    }
    Some(parsed)
}

fn is_extension(next_header: u8) -> bool {
    matches!(
        next_header,
        ipv6_ext::HOP_BY_HOP
            | ipv6_ext::ROUTING
            | ipv6_ext::DEST_OPTS
            | ipv6_ext::AUTH
            | ipv6_ext::FRAGMENT
    )
}

/// Walks the extension headers from `parsed.proto` on, up to the transport header.
#[inline(always)]
fn walk<F: Frame>(frame: &mut F, parsed: &mut Ipv6) -> Option<()> {
    for _ in 0..MAX_EXT_HEADERS {
        let off = parsed.l4_off;
        if parsed.proto == ipv6_ext::FRAGMENT {
            if !frame.ensure(off + IPV6_FRAG_HDR_LEN) {
                return None;
            }
            let frag = ptr_at::<F, Ipv6FragHdr>(frame, off)?;
            // SAFETY: bounds-checked by `ptr_at`.
            let (next, offset_flags) = unsafe { ((*frag).next_header, (*frag).offset_flags) };
            parsed.frag = if offset_flags & IPV6_FRAG_OFFSET_BE != 0 {
                Frag::Later
            } else if offset_flags & IPV6_FRAG_MORE_BE != 0 {
                Frag::First
            } else {
                // An atomic fragment (RFC 6946): a whole datagram.
                Frag::None
            };
            parsed.proto = next;
            parsed.l4_off = off + IPV6_FRAG_HDR_LEN;
            if parsed.frag == Frag::Later {
                // No transport header follows: nothing further to walk.
                return Some(());
            }
        } else {
            if !frame.ensure(off + 2) {
                return None;
            }
            let ext = ptr_at::<F, Ipv6ExtHdr>(frame, off)?;
            // SAFETY: bounds-checked by `ptr_at`.
            let (next, len) = unsafe { ((*ext).next_header, (*ext).len as usize) };
            // The authentication header counts 4-byte units beyond its first 8 bytes, the
            // others 8-byte units beyond theirs.
            let size = if parsed.proto == ipv6_ext::AUTH {
                (len + 2) * 4
            } else {
                (len + 1) * 8
            };
            parsed.proto = next;
            parsed.l4_off = off + size;
        }
        if parsed.l4_off > MAX_L4_OFF {
            return None;
        }
        if !is_extension(parsed.proto) {
            return Some(());
        }
    }
    None
}

/// Passes the walk's results through memory. Every path through the walk reaches the rest of
/// the program with offsets the verifier knows differently, and it would verify the rest once
/// per path (some 480,000 instructions for a twin program, too many for older kernels): read
/// back from a map, they are values it knows nothing of but the bounds checked here, the same
/// on every path.
#[inline(always)]
fn join(parsed: &mut Ipv6) -> Option<()> {
    let slot = LB_SCRATCH.get_ptr_mut(0)?;
    let frag = match parsed.frag {
        Frag::None => 0,
        Frag::First => 1,
        Frag::Later => 2,
    };
    // SAFETY: this CPU's scratch entry, ours until the program returns; volatile, so that the
    // compiler keeps the round trip the verifier is to see.
    let [off, proto, frag, _] = unsafe {
        let walk = &raw mut (*slot).ipv6_walk;
        walk.write_volatile([parsed.l4_off as u32, u32::from(parsed.proto), frag, 0]);
        walk.read_volatile()
    };
    if off as usize > MAX_L4_OFF {
        return None;
    }
    parsed.l4_off = off as usize;
    parsed.proto = proto as u8;
    parsed.frag = match frag {
        0 => Frag::None,
        1 => Frag::First,
        _ => Frag::Later,
    };
    Some(())
}

/// The conntrack key of the packet `ip`/`l4` in direction `dir`.
#[inline(always)]
pub fn flow_key(ip: &Ipv6, l4: &L4, dir: u8) -> FlowKey6 {
    FlowKey6::new(ip.src, l4.src_port, ip.dst, l4.dst_port, ip.proto, dir)
}
