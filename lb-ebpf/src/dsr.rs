//! Direct server return (`lb_common::dsr`): the entry node's half, which gives a flow's first
//! packet the frontend as an IPv4 option, and the backend node's half, which reads it and
//! records the reverse NAT of the flow's replies.

use lb_common::{
    conntrack::{self, FORWARD},
    csum,
    dsr::{self, DsrOption, OPTION_LEN},
    net::{proto, tcp_flags},
    stats::Reason,
};

use crate::{
    ct, filters,
    frame::{Action, Frame, ptr_at},
    hdr::{IPV4_MIN_HDR_LEN, Ipv4Hdr, L3_OFF},
    maps::LB_CT,
    parse::{self, Frag, Ipv4},
    stats,
};

/// Where the option goes: first after the fixed header.
const OPTION_OFF: usize = L3_OFF + IPV4_MIN_HDR_LEN;

/// The bytes a packet with TCP flags `seg_flags` of a DSR flow grows by on its way out.
#[inline(always)]
pub fn growth(seg_flags: u8) -> u16 {
    if tcp_flags::opens(seg_flags) {
        OPTION_LEN as u16
    } else {
        0
    }
}

/// Gives the (already DNATed) packet the option carrying `option`, as the first of its IPv4
/// options, and fixes the header's length fields and checksum. The caller made sure the header
/// had no options (`Ipv4::has_options`), so there is room.
#[inline(always)]
pub fn carry<F: Frame>(frame: &mut F, option: DsrOption) -> Result<(), ()> {
    frame.grow_after_ip_header()?;
    let ip = ptr_at::<F, Ipv4Hdr>(frame, L3_OFF).ok_or(())?;
    let opt = ptr_at::<F, [u8; OPTION_LEN]>(frame, OPTION_OFF).ok_or(())?;
    let bytes = option.to_bytes();
    // SAFETY: both bounds-checked by `ptr_at`. The checksum gains the option's two words (from
    // zero) and follows the length fields' change.
    unsafe {
        opt.write_unaligned(bytes);
        let first = u16::from_ne_bytes([(*ip).version_ihl, (*ip).tos]);
        (*ip).version_ihl += (OPTION_LEN / 4) as u8;
        let first_now = u16::from_ne_bytes([(*ip).version_ihl, (*ip).tos]);
        let tot_len = (*ip).tot_len;
        let tot_len_now = (u16::from_be(tot_len) + OPTION_LEN as u16).to_be();
        (*ip).tot_len = tot_len_now;
        let mut check = csum::replace2((*ip).check, first, first_now);
        check = csum::replace2(check, tot_len, tot_len_now);
        let [a, b, c, d, e, f, g, h] = bytes;
        check = csum::replace4(check, 0, u32::from_ne_bytes([a, b, c, d]));
        check = csum::replace4(check, 0, u32::from_ne_bytes([e, f, g, h]));
        (*ip).check = check;
    }
    Ok(())
}

/// On a node's uplink, a packet to an address that carries no frontend and has IPv4 options: if
/// it is the first packet of a DSR flow another node balanced here (a TCP SYN with our option
/// first), records the reply entry that gives the flow's replies their frontend back. The
/// packet goes on to its backend through the stack, option and all (Linux ignores an option it
/// does not know on a packet it receives or forwards).
#[inline(always)]
pub fn accept<F: Frame>(frame: &mut F, ip: &Ipv4) -> Action {
    if ip.proto != proto::TCP || ip.frag() != Frag::None {
        return Action::Pass;
    }
    let Some(l4_off) = ip.l4_off() else {
        return Action::Pass;
    };
    if l4_off < OPTION_OFF + OPTION_LEN || !frame.ensure(OPTION_OFF + OPTION_LEN) {
        return Action::Pass;
    }
    let Some(opt) = ptr_at::<F, [u8; OPTION_LEN]>(frame, OPTION_OFF) else {
        return Action::Pass;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    let Some(option) = DsrOption::from_bytes(unsafe { opt.read_unaligned() }) else {
        return Action::Pass;
    };
    let Some(l4) = parse::l4(frame, ip.proto, l4_off) else {
        return Action::Pass;
    };
    if !tcp_flags::opens(l4.tcp_flags) {
        return Action::Pass;
    }
    let flow = parse::flow_key(ip, &l4, FORWARD);
    // The backend has sent nothing yet: its direction starts as a SYN's would.
    let (flags, deadline) = conntrack::initial(proto::TCP, tcp_flags::SYN, ct::now());
    let (key, entry) = dsr::reply_entry(&flow, option, flags, deadline);
    filters::mark_reply(&key);
    // A retransmitted SYN writes the same entry again; a new connection of the same client
    // port (after the last one closed) takes the key over.
    let _ = LB_CT.insert(&key, &entry, 0);
    stats::verdict(Reason::DsrAccepted, frame.len());
    Action::Pass
}
