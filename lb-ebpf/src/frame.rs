//! One packet-access interface over the XDP and tc contexts, so that the load-balancing logic is
//! written once.
//!
//! The two hooks differ in exactly the places this trait names:
//! * checksums: an XDP buffer always carries complete checksums, so the datapath updates them in
//!   place; an skb may carry `CHECKSUM_PARTIAL` (a pod's own TCP/UDP packets over a veth hold
//!   only the pseudo-header sum), which only the kernel's `bpf_l4_csum_replace` handles right;
//! * linear data: an skb's headers may sit outside its linear area until pulled;
//! * resizing and bouncing a packet back out (XDP_TX versus `bpf_redirect` to the same device).

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_adj_room_mode::{BPF_ADJ_ROOM_MAC, BPF_ADJ_ROOM_NET},
        bpf_fib_lookup, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1, xdp_action,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup_helper, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{Be32, csum};

use crate::{
    hdr::{IPV4_MIN_HDR_LEN, L3_OFF},
    parse::Ipv4,
};

/// The room `Frame::grow_after_ip_header` opens: one DSR option (`lb_common::dsr`).
pub const IP_OPTION_ROOM: usize = lb_common::dsr::OPTION_LEN;

const AF_INET: u32 = 2;

/// What to do with the packet once the logic is done.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let it continue (possibly rewritten) through the stack.
    Pass,
    /// Discard it.
    Drop,
    /// Send it back out of the interface it arrived on (a generated reject, or a forwarded
    /// packet whose next hop is on the same link).
    Bounce,
    /// Send it out of another interface (a forwarded packet), by ifindex.
    Redirect(u32),
    /// Send it out of `ifindex` to `next_hop`, resolving its MAC first (tc only).
    RedirectNeigh { ifindex: u32, next_hop: Be32 },
}

pub trait Frame {
    /// Whether the hook can send a packet to a next hop whose MAC is not known yet.
    const RESOLVES_NEIGHBOURS: bool;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;

    /// Length of the whole packet in bytes, for counters.
    fn len(&self) -> u32;

    /// Makes the first `len` bytes directly accessible; false when the packet is shorter.
    fn ensure(&mut self, len: usize) -> bool;

    /// Updates the TCP/UDP checksum at `off` after an address (a pseudo-header field) changed.
    fn l4_csum_addr(&mut self, off: usize, from: u32, to: u32, udp: bool) -> Result<(), ()>;

    /// Updates the TCP/UDP checksum at `off` after a port changed.
    fn l4_csum_port(&mut self, off: usize, from: u16, to: u16, udp: bool) -> Result<(), ()>;

    /// Updates the TCP/UDP checksum at `off` by the difference `diff` (`csum::diff`) that
    /// pseudo-header fields (an IPv6 address) made.
    fn l4_csum_diff(&mut self, off: usize, diff: u32, udp: bool) -> Result<(), ()>;

    /// Cuts the packet down to `len` bytes.
    fn truncate(&mut self, len: usize) -> Result<(), ()>;

    /// Opens `len` bytes of room right after the Ethernet header (the Ethernet header moves
    /// to the new front).
    fn grow_after_eth(&mut self, len: usize) -> Result<(), ()>;

    /// Opens [`IP_OPTION_ROOM`] bytes right after the fixed IPv4 header, where the first IPv4
    /// option goes (the Ethernet and fixed IPv4 headers move to the new front; their fields
    /// are the caller's to fix).
    fn grow_after_ip_header(&mut self) -> Result<(), ()>;

    /// The interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;

    /// `bpf_fib_lookup` for this packet's context.
    fn fib_lookup(&mut self, params: &mut bpf_fib_lookup) -> i64;

    /// The length `bpf_fib_lookup` checks against the egress MTU (`tot_len`): the packet's own at
    /// XDP, where a frame is what goes on the wire; zero at tc, where the kernel then checks the
    /// skb itself, knowing that a GSO or GRO packet goes out as segments that each fit.
    fn fib_tot_len(ip: &Ipv4) -> u16;
}

/// A bounds-checked pointer to a `T` at `off` bytes into the packet.
///
/// The offset goes through [`opaque`] so that LLVM cannot prove one check redundant from another
/// (say, a quoted header's field from a check of the header after it): the verifier knows
/// nothing of such relations between offsets and only trusts a pointer it saw checked.
#[inline(always)]
pub fn ptr_at<F: Frame, T>(frame: &F, off: usize) -> Option<*mut T> {
    let ptr = frame.data() + opaque(off);
    if ptr + size_of::<T>() > frame.data_end() {
        return None;
    }
    Some(ptr as *mut T)
}

/// Hides a value from the optimiser (a register move LLVM must assume "may change" it) while leaving
/// the value, and the verifier's knowledge of it, untouched.
#[inline(always)]
fn opaque(mut value: usize) -> usize {
    // SAFETY: the asm moves a register onto itself; LLVM must assume the value changed.
    unsafe {
        core::arch::asm!("{0} = {0}", inout(reg) value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Updates a complete checksum stored in the packet at `off` (XDP; also the IPv4 header and ICMP
/// checksums, which are always complete).
#[inline(always)]
fn update_csum_in_place<F: Frame>(
    frame: &F,
    off: usize,
    update: impl FnOnce(u16) -> u16,
) -> Result<(), ()> {
    let check = ptr_at::<F, u16>(frame, off).ok_or(())?;
    // SAFETY: `ptr_at` checked that the two bytes lie inside the packet.
    unsafe { *check = update(*check) };
    Ok(())
}

pub struct XdpFrame {
    pub ctx: XdpContext,
}

impl Frame for XdpFrame {
    const RESOLVES_NEIGHBOURS: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.ctx.data_end() - self.ctx.data()) as u32
    }

    #[inline(always)]
    fn ensure(&mut self, len: usize) -> bool {
        self.data() + len <= self.data_end()
    }

    #[inline(always)]
    fn l4_csum_addr(&mut self, off: usize, from: u32, to: u32, udp: bool) -> Result<(), ()> {
        if udp {
            update_csum_in_place(self, off, |c| csum::udp_replace4(c, from, to))
        } else {
            update_csum_in_place(self, off, |c| csum::replace4(c, from, to))
        }
    }

    #[inline(always)]
    fn l4_csum_port(&mut self, off: usize, from: u16, to: u16, udp: bool) -> Result<(), ()> {
        if udp {
            update_csum_in_place(self, off, |c| csum::udp_replace2(c, from, to))
        } else {
            update_csum_in_place(self, off, |c| csum::replace2(c, from, to))
        }
    }

    #[inline(always)]
    fn l4_csum_diff(&mut self, off: usize, diff: u32, udp: bool) -> Result<(), ()> {
        if udp {
            update_csum_in_place(self, off, |c| csum::udp_apply_diff(c, diff))
        } else {
            update_csum_in_place(self, off, |c| csum::apply_diff(c, diff))
        }
    }

    #[inline(always)]
    fn truncate(&mut self, len: usize) -> Result<(), ()> {
        let delta = len as i32 - self.len() as i32;
        // SAFETY: plain helper call on our own context.
        match unsafe { bpf_xdp_adjust_tail(self.ctx.ctx, delta) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    #[inline(always)]
    fn grow_after_eth(&mut self, len: usize) -> Result<(), ()> {
        // SAFETY: plain helper call on our own context.
        if unsafe { bpf_xdp_adjust_head(self.ctx.ctx, -(len as i32)) } != 0 {
            return Err(());
        }
        // Move the Ethernet header from its old place (now `len` bytes in) to the new front.
        let dst = ptr_at::<Self, [u8; 14]>(self, 0).ok_or(())?;
        let src = ptr_at::<Self, [u8; 14]>(self, len).ok_or(())?;
        // SAFETY: both 14-byte ranges were bounds-checked; they do not overlap when len >= 14.
        unsafe { *dst = *src };
        Ok(())
    }

    #[inline(always)]
    fn grow_after_ip_header(&mut self) -> Result<(), ()> {
        const ROOM: usize = IP_OPTION_ROOM;
        // SAFETY: plain helper call on our own context.
        if unsafe { bpf_xdp_adjust_head(self.ctx.ctx, -(ROOM as i32)) } != 0 {
            return Err(());
        }
        // Move the Ethernet and fixed IPv4 headers (34 bytes) from `ROOM` bytes in to the new
        // front, in ascending 8-byte steps: each step reads its source before a later step
        // writes over it (the ranges overlap, the steps' own do not).
        const HEADERS: usize = L3_OFF + IPV4_MIN_HDR_LEN;
        const _: () = assert!(HEADERS == 4 * ROOM + 2 && ROOM == 8);
        let mut off = 0;
        while off < 4 * ROOM {
            let dst = ptr_at::<Self, [u8; ROOM]>(self, off).ok_or(())?;
            let src = ptr_at::<Self, [u8; ROOM]>(self, off + ROOM).ok_or(())?;
            // SAFETY: both ranges were bounds-checked; they are `ROOM` bytes apart.
            unsafe { dst.write_unaligned(src.read_unaligned()) };
            off += ROOM;
        }
        let dst = ptr_at::<Self, [u8; 2]>(self, HEADERS - 2).ok_or(())?;
        let src = ptr_at::<Self, [u8; 2]>(self, HEADERS - 2 + ROOM).ok_or(())?;
        // SAFETY: as above.
        unsafe { dst.write_unaligned(src.read_unaligned()) };
        Ok(())
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own context.
        unsafe { (*self.ctx.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn fib_lookup(&mut self, params: &mut bpf_fib_lookup) -> i64 {
        // SAFETY: helper call with our context and a parameter block of the size we pass.
        unsafe {
            fib_lookup_helper(
                self.ctx.ctx.cast(),
                params,
                size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        }
    }

    #[inline(always)]
    fn fib_tot_len(ip: &Ipv4) -> u16 {
        ip.tot_len.to_host()
    }
}

impl XdpFrame {
    #[inline(always)]
    pub fn verdict(action: Action) -> u32 {
        match action {
            Action::Pass => xdp_action::XDP_PASS,
            Action::Drop => xdp_action::XDP_DROP,
            Action::Bounce => xdp_action::XDP_TX,
            // SAFETY: plain helper call; XDP_REDIRECT on success.
            Action::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
            // Never produced at XDP (see `fib::lookup`).
            Action::RedirectNeigh { .. } => xdp_action::XDP_DROP,
        }
    }
}

pub struct TcFrame {
    pub ctx: TcContext,
}

const CSUM_SIZE_2: u64 = 2;
const CSUM_SIZE_4: u64 = 4;

impl TcFrame {
    #[inline(always)]
    fn l4_csum_replace(
        &mut self,
        off: usize,
        from: u64,
        to: u64,
        flags: u64,
        udp: bool,
    ) -> Result<(), ()> {
        let flags = if udp {
            flags | BPF_F_MARK_MANGLED_0 as u64
        } else {
            flags
        };
        self.ctx
            .l4_csum_replace(off, from, to, flags)
            .map_err(|_| ())
    }

    /// The tc verdict. `Pass` is `TC_ACT_UNSPEC` so that, under tcx, the next program in the
    /// chain still runs (classic cls_bpf treats it as "continue" too).
    #[inline(always)]
    pub fn verdict(&self, action: Action) -> i32 {
        match action {
            Action::Pass => TC_ACT_UNSPEC,
            Action::Drop => TC_ACT_SHOT,
            // Redirecting to the receiving device's egress sends the packet back where it came
            // from.
            Action::Bounce => Self::redirect(self.ingress_ifindex()),
            Action::Redirect(ifindex) => Self::redirect(ifindex),
            Action::RedirectNeigh { ifindex, next_hop } => {
                let mut nh = bpf_redir_neigh {
                    nh_family: AF_INET,
                    __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                        ipv4_nh: next_hop.raw(),
                    },
                };
                // SAFETY: helper call with a parameter block of the size we pass.
                let ret = unsafe {
                    bpf_redirect_neigh(ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0)
                };
                if ret == TC_ACT_REDIRECT as i64 {
                    TC_ACT_REDIRECT
                } else {
                    TC_ACT_SHOT
                }
            }
        }
    }

    #[inline(always)]
    fn redirect(ifindex: u32) -> i32 {
        // SAFETY: plain helper call.
        let ret = unsafe { bpf_redirect(ifindex, 0) };
        if ret == TC_ACT_REDIRECT as i64 {
            TC_ACT_REDIRECT
        } else {
            TC_ACT_SHOT
        }
    }
}

impl TcFrame {
    /// The skb, as a value the compiler cannot see through. The verifier only accepts a load of
    /// `data` or `data_end` at a constant offset from the context pointer itself; in a large
    /// program LLVM may otherwise compute `ctx + offset` once, keep it on the stack and load
    /// through it later, which the verifier rejects ("dereference of modified ctx ptr").
    /// (`opaque`: a register moved onto itself, where `black_box` would cost a trip through the
    /// stack on every read.)
    #[inline(always)]
    fn opaque_skb(&self) -> *mut aya_ebpf::bindings::__sk_buff {
        opaque(self.ctx.skb.skb as usize) as *mut aya_ebpf::bindings::__sk_buff
    }
}

impl Frame for TcFrame {
    const RESOLVES_NEIGHBOURS: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: reading a field of our own skb; see `opaque_skb`.
        unsafe { (*self.opaque_skb()).data as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as in `data`.
        unsafe { (*self.opaque_skb()).data_end as usize }
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        self.ctx.len()
    }

    #[inline(always)]
    fn ensure(&mut self, len: usize) -> bool {
        if self.data() + len <= self.data_end() {
            return true;
        }
        if len > self.ctx.len() as usize {
            return false;
        }
        // Headers outside the linear area (rare: GSO or paged skbs): pull just what we read.
        self.ctx.pull_data(len as u32).is_ok() && self.data() + len <= self.data_end()
    }

    #[inline(always)]
    fn l4_csum_addr(&mut self, off: usize, from: u32, to: u32, udp: bool) -> Result<(), ()> {
        self.l4_csum_replace(
            off,
            from as u64,
            to as u64,
            CSUM_SIZE_4 | BPF_F_PSEUDO_HDR as u64,
            udp,
        )
    }

    #[inline(always)]
    fn l4_csum_port(&mut self, off: usize, from: u16, to: u16, udp: bool) -> Result<(), ()> {
        self.l4_csum_replace(off, from as u64, to as u64, CSUM_SIZE_2, udp)
    }

    /// A field size of 0: `to` is the difference itself (`inet_proto_csum_replace_by_diff`),
    /// right for `CHECKSUM_PARTIAL` too with `BPF_F_PSEUDO_HDR`.
    #[inline(always)]
    fn l4_csum_diff(&mut self, off: usize, diff: u32, udp: bool) -> Result<(), ()> {
        self.l4_csum_replace(off, 0, diff as u64, BPF_F_PSEUDO_HDR as u64, udp)
    }

    #[inline(always)]
    fn truncate(&mut self, len: usize) -> Result<(), ()> {
        // SAFETY: plain helper call on our own skb.
        match unsafe { bpf_skb_change_tail(self.ctx.skb.skb, len as u32, 0) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    #[inline(always)]
    fn grow_after_eth(&mut self, len: usize) -> Result<(), ()> {
        self.ctx
            .adjust_room(len as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| ())
    }

    #[inline(always)]
    fn grow_after_ip_header(&mut self) -> Result<(), ()> {
        // `BPF_ADJ_ROOM_NET` opens the room right after the fixed IPv4 header (20 bytes from
        // the network header, whatever its length field says).
        self.ctx
            .adjust_room(IP_OPTION_ROOM as i32, BPF_ADJ_ROOM_NET, 0)
            .map_err(|_| ())
    }

    #[inline(always)]
    #[expect(
        clippy::misnamed_getters,
        reason = "at tc ingress the skb's device is the one it arrived on"
    )]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own skb. At tc ingress the skb's device is the one it
        // arrived on.
        unsafe { (*self.ctx.skb.skb).ifindex }
    }

    #[inline(always)]
    fn fib_lookup(&mut self, params: &mut bpf_fib_lookup) -> i64 {
        // SAFETY: helper call with our skb and a parameter block of the size we pass.
        unsafe {
            fib_lookup_helper(
                self.ctx.skb.skb.cast(),
                params,
                size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        }
    }

    #[inline(always)]
    fn fib_tot_len(_ip: &Ipv4) -> u16 {
        0
    }
}
