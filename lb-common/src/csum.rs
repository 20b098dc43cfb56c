//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624), shared so the
//! datapath's arithmetic is unit-tested on the host.
//!
//! All values are raw wire-order integers as loaded from packet memory: one's complement sums are
//! byte-order independent, so no swapping is needed as long as the checksum field is loaded the
//! same way.

/// Folds a 64-bit one's complement accumulator into 16 bits (not complemented).
#[inline(always)]
pub const fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the two 16-bit halves of a 32-bit word to an accumulator.
#[inline(always)]
pub const fn add32(sum: u64, word: u32) -> u64 {
    sum + (word >> 16) as u64 + (word & 0xffff) as u64
}

/// RFC 1624 eqn. 3: the checksum after a 32-bit field changed from `from` to `to`.
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = add32(add32(!check as u64 & 0xffff, !from), to);
    !fold(sum)
}

/// RFC 1624 eqn. 3 for a 16-bit field.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check as u64 & 0xffff) + (!from as u64 & 0xffff) + to as u64;
    !fold(sum)
}

/// UDP: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff.
#[inline(always)]
pub const fn udp_replace4(check: u16, from: u32, to: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    mangle_zero(replace4(check, from, to))
}

/// UDP counterpart of [`replace2`].
#[inline(always)]
pub const fn udp_replace2(check: u16, from: u16, to: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    mangle_zero(replace2(check, from, to))
}

/// The one's complement difference (`__wsum`, folded to 16 bits) that a change of the words
/// `from` to `to` makes to a sum: what `bpf_l4_csum_replace` takes with a field size of 0, and
/// what [`apply_diff`] applies. One difference for a whole IPv6 address, where four updates of
/// a word each would cost four helper calls at tc.
#[inline(always)]
pub const fn diff(from: [u32; 4], to: [u32; 4]) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while i < 4 {
        sum = add32(add32(sum, !from[i]), to[i]);
        i += 1;
    }
    fold(sum) as u32
}

/// The checksum after fields changed by the difference `diff` ([`diff`]).
#[inline(always)]
pub const fn apply_diff(check: u16, diff: u32) -> u16 {
    !fold((!check as u64 & 0xffff) + diff as u64)
}

/// UDP counterpart of [`apply_diff`] (see [`udp_replace4`]).
#[inline(always)]
pub const fn udp_apply_diff(check: u16, diff: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    mangle_zero(apply_diff(check, diff))
}

#[inline(always)]
const fn mangle_zero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: the full checksum over native-endian loads of `bytes`.
    fn full(bytes: &[u8]) -> u16 {
        let mut sum = 0u64;
        for pair in bytes.chunks(2) {
            let word = [pair[0], *pair.get(1).unwrap_or(&0)];
            sum += u16::from_ne_bytes(word) as u64;
        }
        !fold(sum)
    }

    fn header_with_checksum() -> [u8; 20] {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x3c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x06, 0, 0, 10, 0, 1, 5, 172, 30,
            0, 41,
        ];
        let check = full(&hdr);
        hdr[10..12].copy_from_slice(&check.to_ne_bytes());
        hdr
    }

    #[test]
    fn replacing_an_address_matches_a_full_recompute() {
        let mut hdr = header_with_checksum();
        let check = u16::from_ne_bytes([hdr[10], hdr[11]]);
        let from = u32::from_ne_bytes(hdr[16..20].try_into().unwrap());
        let to = u32::from_ne_bytes([10, 0, 2, 9]);
        hdr[16..20].copy_from_slice(&to.to_ne_bytes());
        let updated = replace4(check, from, to);
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, full(&hdr));
    }

    #[test]
    fn replacing_a_port_matches_a_full_recompute() {
        let mut hdr = header_with_checksum();
        let check = u16::from_ne_bytes([hdr[10], hdr[11]]);
        let from = u16::from_ne_bytes([hdr[4], hdr[5]]);
        let to = 8080u16.to_be();
        hdr[4..6].copy_from_slice(&to.to_ne_bytes());
        let updated = replace2(check, from, to);
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, full(&hdr));
    }

    #[test]
    fn a_whole_ipv6_address_by_one_difference_matches_a_full_recompute() {
        // A pseudo-header-like buffer: an IPv6 address and some more bytes, with its checksum.
        let mut bytes = [0u8; 22];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37);
        }
        let check = full(&bytes);
        let words = |b: &[u8]| -> [u32; 4] {
            core::array::from_fn(|i| u32::from_ne_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
        };
        let from = words(&bytes[..16]);
        let to: [u32; 4] = [0xfd00_0000u32.to_be(), 0x96u32.to_be(), 0, 0x41u32.to_be()];
        for (i, w) in to.iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(apply_diff(check, diff(from, to)), full(&bytes));
        assert_eq!(udp_apply_diff(0, diff(from, to)), 0);
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_is_mangled() {
        assert_eq!(udp_replace4(0, 1, 2), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
        // Some port change turns this checksum into zero; UDP must send that as 0xffff.
        let (check, from, to) = (1..=0xffffu16)
            .find_map(|to| (replace2(0x1234, 0, to) == 0).then_some((0x1234, 0, to)))
            .unwrap();
        assert_eq!(replace2(check, from, to), 0);
        assert_eq!(udp_replace2(check, from, to), 0xffff);
    }
}
