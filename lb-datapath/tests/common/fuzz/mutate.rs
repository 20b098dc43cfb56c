//! Breaking a frame's headers, on raw bytes: what no packet builder makes. Each mutation leaves
//! the frame at least an Ethernet header long (BPF_PROG_TEST_RUN's minimum).

use etherparse::checksum::Sum16BitWords;
use fastrand::Rng;

use super::{frames::pick, wire};

/// Applies one mutation, chosen at random.
pub fn any(rng: &mut Rng, frame: &mut Vec<u8>) {
    match rng.u8(..12) {
        0 => ihl(rng, frame),
        1 => total_length(rng, frame),
        2 => options(rng, frame),
        3 => fragment_bits(rng, frame),
        4 => later_fragment(rng, frame),
        5 => ttl(rng, frame),
        6 => protocol(rng, frame),
        7 => tcp_header(rng, frame),
        8 => source(rng, frame),
        9 => version(rng, frame),
        _ => flip_bytes(rng, frame),
    }
    if rng.bool() {
        fix_ip_checksum(frame);
    }
}

/// Whether the frame holds a whole fixed IPv4 header to mutate.
fn has_ipv4_header(frame: &[u8]) -> bool {
    frame.len() >= wire::L3 + wire::IPV4_LEN
}

/// An IHL anywhere from 0 to 15 words: below the minimum, or past the frame's end.
fn ihl(rng: &mut Rng, frame: &mut [u8]) {
    if has_ipv4_header(frame) {
        frame[wire::L3] = (frame[wire::L3] & 0xf0) | rng.u8(..16);
    }
}

fn version(rng: &mut Rng, frame: &mut [u8]) {
    if has_ipv4_header(frame) {
        frame[wire::L3] = (rng.u8(..16) << 4) | (frame[wire::L3] & 0x0f);
    }
}

/// A total length shorter or longer than the frame, or anything.
fn total_length(rng: &mut Rng, frame: &mut [u8]) {
    if !has_ipv4_header(frame) {
        return;
    }
    let actual = (frame.len() - wire::L3) as u16;
    let len = match rng.u8(..3) {
        0 => rng.u16(..actual),
        1 => actual.saturating_add(rng.u16(1..=1500)),
        _ => rng.u16(..),
    };
    frame[wire::L3 + 2..wire::L3 + 4].copy_from_slice(&len.to_be_bytes());
}

/// Inserts IPv4 options after the fixed header (NOPs, a router alert, or random bytes), with
/// the IHL and total length grown to match.
fn options(rng: &mut Rng, frame: &mut Vec<u8>) {
    if !has_ipv4_header(frame) {
        return;
    }
    let words = rng.usize(1..=10);
    let mut opts = vec![0u8; words * 4];
    match rng.u8(..3) {
        0 => opts.fill(1),
        1 => {
            opts[..4].copy_from_slice(&[0x94, 0x04, 0, 0]);
            opts[4..].fill(1);
        }
        _ => rng.fill(&mut opts),
    }
    let at = wire::L3 + usize::from(frame[wire::L3] & 0x0f).max(5) * 4;
    let at = at.min(frame.len());
    frame.splice(at..at, opts);
    let ihl = (usize::from(frame[wire::L3] & 0x0f) + words).min(15) as u8;
    frame[wire::L3] = (frame[wire::L3] & 0xf0) | ihl;
    let tot = wire::u16_at(frame, wire::L3 + 2).wrapping_add((words * 4) as u16);
    frame[wire::L3 + 2..wire::L3 + 4].copy_from_slice(&tot.to_be_bytes());
}

/// Fragment bits in any combination: DF, MF and an offset, zero or not.
fn fragment_bits(rng: &mut Rng, frame: &mut [u8]) {
    if !has_ipv4_header(frame) {
        return;
    }
    let flags = pick(rng, &[0x0000, 0x2000, 0x4000, 0x6000, 0x8000]);
    let any = rng.u16(..0x2000);
    let offset = pick(rng, &[0, 0, 1, 3, 0x1fff, any]);
    frame[wire::L3 + 6..wire::L3 + 8].copy_from_slice(&(flags | offset).to_be_bytes());
}

/// Makes the frame a later fragment (an offset, with or without more to come).
pub fn later_fragment(rng: &mut Rng, frame: &mut [u8]) {
    if !has_ipv4_header(frame) {
        return;
    }
    let more = if rng.bool() { 0x2000 } else { 0 };
    let offset = rng.u16(1..0x2000);
    frame[wire::L3 + 6..wire::L3 + 8].copy_from_slice(&(more | offset).to_be_bytes());
}

/// A TTL that runs out on forwarding, or any.
fn ttl(rng: &mut Rng, frame: &mut [u8]) {
    if has_ipv4_header(frame) {
        frame[wire::TTL_OFF] = pick(rng, &[0, 1, 2, 255]);
    }
}

fn protocol(rng: &mut Rng, frame: &mut [u8]) {
    if has_ipv4_header(frame) {
        let any = rng.u8(..);
        frame[wire::L3 + 9] = pick(rng, &[1, 6, 17, 47, 132, any]);
    }
}

/// Any TCP data offset and flags (at the offset the IHL says, when the frame reaches it).
fn tcp_header(rng: &mut Rng, frame: &mut [u8]) {
    let Some(ip) = wire::ipv4(frame) else { return };
    let Some(off) = ip.l4_off() else { return };
    if frame.len() >= off + 14 {
        frame[off + 12] = rng.u8(..);
        frame[off + 13] = rng.u8(..);
    }
}

/// A source the datapath must not answer (zero, loopback, multicast, broadcast) or any, and now
/// and then a group MAC.
fn source(rng: &mut Rng, frame: &mut [u8]) {
    if rng.bool() {
        frame[6] |= 1;
    }
    if has_ipv4_header(frame) {
        let any = rng.u32(..);
        let addr = pick(rng, &[0, 0x7f00_0001, 0xe000_0001, u32::MAX, any]);
        frame[wire::SRC_OFF..wire::SRC_OFF + 4].copy_from_slice(&addr.to_be_bytes());
    }
}

fn flip_bytes(rng: &mut Rng, frame: &mut [u8]) {
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(..frame.len());
        frame[at] = rng.u8(..);
    }
}

/// Recomputes the IPv4 header checksum over the header the IHL describes, when the frame holds
/// it (a mutated frame with a valid checksum gets past checks that look at it).
fn fix_ip_checksum(frame: &mut [u8]) {
    if !has_ipv4_header(frame) {
        return;
    }
    let end = wire::L3 + usize::from(frame[wire::L3] & 0x0f) * 4;
    if end < wire::L3 + wire::IPV4_LEN || end > frame.len() {
        return;
    }
    frame[wire::IP_CSUM_OFF..wire::IP_CSUM_OFF + 2].fill(0);
    let check = Sum16BitWords::new()
        .add_slice(&frame[wire::L3..end])
        .ones_complement();
    frame[wire::IP_CSUM_OFF..wire::IP_CSUM_OFF + 2].copy_from_slice(&check.to_be_bytes());
}
