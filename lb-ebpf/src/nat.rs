//! Address and port rewriting with incremental checksum updates (RFC 1624).
//!
//! The IPv4 header checksum is always complete and is fixed in place; the TCP/UDP checksum goes
//! through [`Frame`], which knows whether the hook may hold a partial checksum. Packet pointers
//! are not used after the checksum helpers run (tc helpers invalidate them).

use lb_common::{Be16, Be32, csum};

use crate::{
    frame::{Frame, ptr_at},
    hdr::{Ipv4Hdr, L3_OFF},
    parse::L4,
};

const SADDR_OFF: usize = L3_OFF + 12;
const DADDR_OFF: usize = L3_OFF + 16;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

impl End {
    #[inline(always)]
    const fn addr_off(self) -> usize {
        match self {
            Self::Source => SADDR_OFF,
            Self::Destination => DADDR_OFF,
        }
    }

    #[inline(always)]
    const fn port_off(self, l4_off: usize) -> usize {
        match self {
            Self::Source => l4_off,
            Self::Destination => l4_off + 2,
        }
    }
}

/// Rewrites one end of the packet to `addr:port`. `l4` is `None` for a non-first fragment, which
/// carries no L4 header: only its IP address changes (the L4 checksum, which covers the whole
/// datagram, was adjusted in the first fragment). SCTP gets only its IP address changed too:
/// its CRC32c covers no address, and its ports are never rewritten (the agent programs SCTP
/// frontends only where the backend's port is the frontend's, and a source-NATed SCTP flow
/// keeps its client's port: `lb_common::snat::port_range`), so `port` is the port it has.
#[inline(always)]
pub fn rewrite<F: Frame>(
    frame: &mut F,
    end: End,
    l4: Option<&L4>,
    addr: Be32,
    port: Be16,
) -> Result<(), ()> {
    let ip = ptr_at::<F, Ipv4Hdr>(frame, L3_OFF).ok_or(())?;
    let addr_field = ptr_at::<F, u32>(frame, end.addr_off()).ok_or(())?;
    // SAFETY: both pointers were bounds-checked by `ptr_at`.
    let old_addr = unsafe {
        let old = *addr_field;
        *addr_field = addr.raw();
        (*ip).check = csum::replace4((*ip).check, old, addr.raw());
        old
    };
    let Some(l4) = l4 else {
        return Ok(());
    };
    if l4.sctp {
        return Ok(());
    }
    let port_field = ptr_at::<F, u16>(frame, end.port_off(l4.off)).ok_or(())?;
    // SAFETY: bounds-checked by `ptr_at`.
    let old_port = unsafe {
        let old = *port_field;
        *port_field = port.raw();
        old
    };
    frame.l4_csum_addr(l4.csum_off, old_addr, addr.raw(), l4.udp)?;
    if old_port != port.raw() {
        frame.l4_csum_port(l4.csum_off, old_port, port.raw(), l4.udp)?;
    }
    Ok(())
}
