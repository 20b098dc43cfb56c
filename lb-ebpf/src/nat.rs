//! Address and port rewriting with incremental checksum updates (RFC 1624).
//!
//! The IPv4 header checksum is always complete and is fixed in place (IPv6 has none: see
//! [`Family::write_addr`]); the TCP/UDP checksum goes through [`Frame`], which knows whether the
//! hook may hold a partial checksum. Packet pointers
//! are not used after the checksum helpers run (tc helpers invalidate them).

use lb_common::Be16;

use crate::{
    family::Family,
    frame::{Frame, ptr_at},
    parse::L4,
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

impl End {
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
pub fn rewrite<F: Frame, A: Family>(
    frame: &mut F,
    end: End,
    l4: Option<&L4>,
    addr: A,
    port: Be16,
) -> Result<(), ()> {
    let old_addr = A::write_addr(frame, end, addr)?;
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
    A::l4_csum_addr(frame, l4.csum_off, old_addr, addr, l4.udp)?;
    if old_port != port.raw() {
        frame.l4_csum_port(l4.csum_off, old_port, port.raw(), l4.udp)?;
    }
    Ok(())
}
