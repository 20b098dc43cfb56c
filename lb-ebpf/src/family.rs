//! The address families. Conntrack, backend selection, address rewriting and the steps of a
//! flow are written once, generic over the family's address type ([`Family`], implemented by
//! `Be32` for IPv4 and `Be128` for IPv6): what differs is here, each family with maps of its own
//! (`lb_common::maps::LB6_*`, docs/ipv6.md).

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    Address, Be32, Be128,
    conntrack::{CtEntryOf, FlowKeyOf},
    maps::BackendOf,
};

use crate::{
    events, fragment,
    frame::{Frame, ptr_at},
    hdr::{IPV6_DADDR_OFF, IPV6_SADDR_OFF, Ipv4Hdr, L3_OFF},
    maps::{CtMap, LB_BACKENDS, LB_CT, LB_CT_CARRYING, LB_CT_PREV, LB6_BACKENDS, LB6_CT},
    nat::End,
    parse::{Frag, Ipv4, L4},
    parse6::Ipv6,
};

/// What the shared logic needs to know of an address family.
pub trait Family: Address {
    /// The parsed network header.
    type Ip: Copy;

    /// The family's conntrack map.
    fn ct() -> &'static CtMap<Self>;

    /// The entry under `key` in an older agent's conntrack map while its flows are carried
    /// over (`ct::find`), copied into [`Family::ct`] first.
    fn carried(key: &FlowKeyOf<Self>) -> Option<*mut CtEntryOf<Self>>;

    /// The backend in slot `id` of the family's backends array (maybe an empty slot).
    fn backend(id: u32) -> Option<BackendOf<Self>>;

    /// Where `ip` stands in fragmentation.
    fn frag(ip: &Self::Ip) -> Frag;

    /// Remembers the ports of a first fragment that was just translated, for the later ones.
    fn remember_fragment(ip: &Self::Ip, l4: &L4);

    /// Writes `addr` at `end` of the packet's network header, fixing its checksum (IPv4);
    /// returns the address it replaced.
    fn write_addr<F: Frame>(frame: &mut F, end: End, addr: Self) -> Result<Self, ()>;

    /// Updates the transport checksum at `csum_off` after the pseudo-header's address `from`
    /// became `to`.
    fn l4_csum_addr<F: Frame>(
        frame: &mut F,
        csum_off: usize,
        from: Self,
        to: Self,
        udp: bool,
    ) -> Result<(), ()>;

    /// Records that the flow `flow` (forward entry `forward`) could not be recorded.
    fn conntrack_full(flow: &FlowKeyOf<Self>, forward: &CtEntryOf<Self>);
}

impl Family for Be32 {
    type Ip = Ipv4;

    #[inline(always)]
    fn ct() -> &'static CtMap<Self> {
        &LB_CT
    }

    /// `LB_CT_PREV`, while `LB_CT_CARRYING` says an agent carries its flows over. The old
    /// programs keep writing the old map until the new ones are attached on every interface,
    /// and the agent's last copy follows: without this, a flow opened by an old program in that
    /// window would meet a new one that does not know it (a reply passing untranslated, a
    /// client packet balanced anew).
    #[inline(always)]
    fn carried(key: &FlowKeyOf<Self>) -> Option<*mut CtEntryOf<Self>> {
        if !LB_CT_CARRYING.get(0).is_some_and(|on| *on != 0) {
            return None;
        }
        // SAFETY: a map value, passed to the insert in place (no copy on the stack).
        let old = unsafe { &*LB_CT_PREV.get_ptr(key)? };
        // Whatever `LB_CT` got meanwhile is newer.
        let _ = LB_CT.insert(key, old, BPF_NOEXIST.into());
        LB_CT.get_ptr_mut(key)
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<BackendOf<Self>> {
        LB_BACKENDS.get(id).copied()
    }

    #[inline(always)]
    fn frag(ip: &Ipv4) -> Frag {
        ip.frag()
    }

    #[inline(always)]
    fn remember_fragment(ip: &Ipv4, l4: &L4) {
        fragment::remember(ip, l4);
    }

    #[inline(always)]
    fn write_addr<F: Frame>(frame: &mut F, end: End, addr: Self) -> Result<Self, ()> {
        let off = match end {
            End::Source => L3_OFF + 12,
            End::Destination => L3_OFF + 16,
        };
        let ip = ptr_at::<F, Ipv4Hdr>(frame, L3_OFF).ok_or(())?;
        let field = ptr_at::<F, u32>(frame, off).ok_or(())?;
        // SAFETY: both pointers were bounds-checked by `ptr_at`.
        unsafe {
            let old = *field;
            *field = addr.raw();
            (*ip).check = lb_common::csum::replace4((*ip).check, old, addr.raw());
            Ok(Be32::from_raw(old))
        }
    }

    #[inline(always)]
    fn l4_csum_addr<F: Frame>(
        frame: &mut F,
        csum_off: usize,
        from: Self,
        to: Self,
        udp: bool,
    ) -> Result<(), ()> {
        frame.l4_csum_addr(csum_off, from.raw(), to.raw(), udp)
    }

    #[inline(always)]
    fn conntrack_full(flow: &FlowKeyOf<Self>, forward: &CtEntryOf<Self>) {
        events::conntrack_full(flow, forward);
    }
}

impl Family for Be128 {
    type Ip = Ipv6;

    #[inline(always)]
    fn ct() -> &'static CtMap<Self> {
        &LB6_CT
    }

    /// No conntrack map of another shape was ever pinned for IPv6: nothing to carry over.
    #[inline(always)]
    fn carried(_key: &FlowKeyOf<Self>) -> Option<*mut CtEntryOf<Self>> {
        None
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<BackendOf<Self>> {
        LB6_BACKENDS.get(id).copied()
    }

    #[inline(always)]
    fn frag(ip: &Ipv6) -> Frag {
        ip.frag
    }

    /// IPv6 later fragments are not followed yet (docs/ipv6.md, step 2): they pass untouched.
    #[inline(always)]
    fn remember_fragment(_ip: &Ipv6, _l4: &L4) {}

    /// IPv6 has no header checksum: only the four words change.
    #[inline(always)]
    fn write_addr<F: Frame>(frame: &mut F, end: End, addr: Self) -> Result<Self, ()> {
        let off = match end {
            End::Source => IPV6_SADDR_OFF,
            End::Destination => IPV6_DADDR_OFF,
        };
        let field = ptr_at::<F, [u32; 4]>(frame, off).ok_or(())?;
        // SAFETY: bounds-checked by `ptr_at`. The field is only 2-byte aligned (the header
        // starts at 14): word loads and stores, which the JIT handles unaligned as the IPv4
        // header's (see `hdr`); `read_unaligned` would make them sixteen byte loads.
        unsafe {
            let old = *field;
            *field = addr.raw();
            Ok(Be128::from_raw(old))
        }
    }

    /// One update by the address's difference (`csum::diff`): at tc a single helper call,
    /// with `BPF_F_PSEUDO_HDR`, right for `CHECKSUM_PARTIAL` too. A UDP checksum is mandatory in
    /// IPv6: the update never leaves a zero (`csum::udp_apply_diff`).
    #[inline(always)]
    fn l4_csum_addr<F: Frame>(
        frame: &mut F,
        csum_off: usize,
        from: Self,
        to: Self,
        udp: bool,
    ) -> Result<(), ()> {
        frame.l4_csum_diff(csum_off, lb_common::csum::diff(from.raw(), to.raw()), udp)
    }

    /// Event records name IPv4 flows only so far (docs/ipv6.md, step 2); the verdict counter
    /// (`drop_ct_full`) still counts the packet.
    #[inline(always)]
    fn conntrack_full(_flow: &FlowKeyOf<Self>, _forward: &CtEntryOf<Self>) {}
}
