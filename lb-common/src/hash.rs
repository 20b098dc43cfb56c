//! The flow hash that picks a Maglev slot. The datapath and userspace (`lbctl trace`, tests) use
//! this one function, so a prediction made in userspace is exactly what the kernel does; it is
//! also node-independent, so every node sends the same flow to the same backend.

use crate::net::{Be16, Be32};

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xbf58_476d_1ce4_e5b9;
const K3: u64 = 0x94d0_49bb_1331_11eb;

/// Hashes a flow's 5-tuple (client side, as the client sends it) into 32 bits.
///
/// A splitmix64-style finaliser: two multiplies and three shifts, no tables, no loops, so it is
/// cheap and verifier-friendly in the datapath.
#[inline(always)]
pub const fn flow_hash(src: Be32, dst: Be32, src_port: Be16, dst_port: Be16, proto: u8) -> u32 {
    let addrs = ((src.raw() as u64) << 32) | dst.raw() as u64;
    let ports = ((src_port.raw() as u64) << 24) | ((dst_port.raw() as u64) << 8) | proto as u64;
    let mut h = addrs.wrapping_mul(K1) ^ ports;
    h ^= h >> 31;
    h = h.wrapping_mul(K2);
    h ^= h >> 29;
    h = h.wrapping_mul(K3);
    h ^= h >> 32;
    h as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_hash() {
        let (client, vip) = (Be32::from_host(0x0a00_0001), Be32::from_host(0xac1e_0001));
        let hash = |src, dst, src_port, dst_port, proto| {
            flow_hash(
                src,
                dst,
                Be16::from_host(src_port),
                Be16::from_host(dst_port),
                proto,
            )
        };
        let h = hash(client, vip, 40000, 80, 6);
        // The base flow with one field changed at a time (the addresses swapped).
        for changed in [
            hash(vip, client, 40000, 80, 6),
            hash(client, vip, 40001, 80, 6),
            hash(client, vip, 40000, 81, 6),
            hash(client, vip, 40000, 80, 17),
        ] {
            assert_ne!(h, changed);
        }
    }

    #[test]
    fn consecutive_source_ports_spread_evenly() {
        // 64 buckets, 64k flows from one client: every bucket within 15% of the mean.
        let mut buckets = [0u32; 64];
        for port in 0..65_536u32 {
            let h = flow_hash(
                Be32::from_host(0x0a00_0001),
                Be32::from_host(0xac1e_0001),
                Be16::from_host(port as u16),
                Be16::from_host(80),
                6,
            );
            buckets[(h % 64) as usize] += 1;
        }
        let mean = 65_536 / 64;
        for count in buckets {
            assert!(count.abs_diff(mean) < mean * 15 / 100, "{buckets:?}");
        }
    }
}
