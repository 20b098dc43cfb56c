//! Which packets may be replies the datapath translates back, before it looks for their flow.
//!
//! Every packet on its way to a pod or out of an uplink is looked up in conntrack as a possible
//! reply (`lb_to_pod`, `lb_ext_out`), and a pod's new connection to an address without a
//! frontend as a possible clash (`conntrack::DIRECT`). On a busy node that map is large and
//! full, and a miss costs cache misses in its buckets and in the entries they chain: about as
//! much as the rest of the program. Most of those packets cannot be replies at all: a reply's
//! source is the backend (address, port) of a flow the datapath translated, and a client's
//! packet to its backend, or any traffic between pods that is no Service's, comes from
//! elsewhere.
//!
//! So every reply entry written to conntrack first marks the slot of its source (address, port,
//! protocol) in [`crate::maps::LB_REPLY_SOURCES`], and a packet whose source's slot is unmarked
//! passes without a lookup. Slots are never cleared: a mark outlives its flow and at worst costs
//! a lookup that finds nothing, which keeps the filter exact without any bookkeeping. It fills up
//! with the backends a node has served since the map was made (about one slot in 6.5 per 10,000
//! of them); the map goes with the node's pins (`lb-agent cleanup`, a reboot).
//!
//! Element [`COMPLETE`] says whether every reply entry in conntrack has its mark. A map created
//! next to flows written by programs that did not mark (an upgrade) is not complete: the
//! programs look up every packet until the agent has marked what it finds in conntrack, after
//! the old programs have been replaced everywhere.
//!
//! One byte per slot, each its own array element, so that concurrent marks (a byte store each,
//! by any CPU, or a write from the agent) never undo one another.

use crate::{
    conntrack::FlowKey,
    hash::flow_hash,
    net::{Be16, Be32},
};

/// Slots of the filter (array elements 0 to `SLOTS - 1`); 512 KiB of map, the part a node's
/// traffic touches stays in the CPU caches.
pub const SLOTS: u32 = 1 << 16;
/// Index of the element that is non-zero once the filter is complete (see above).
pub const COMPLETE: u32 = SLOTS;
/// Elements of the map.
pub const ENTRIES: u32 = SLOTS + 1;

/// The slot of a reply's source: the flow hash's mixing of (source, nothing), so that sources
/// differing in any bit (consecutive ports, the addresses of a pod range) spread.
#[inline(always)]
pub const fn slot(addr: Be32, port: Be16, proto: u8) -> u32 {
    let none = (Be32::from_raw(0), Be16::from_raw(0));
    flow_hash(addr, none.0, port, none.1, proto) & (SLOTS - 1)
}

/// The slot a reply entry's key marks: that of the packets it translates, whose source is the
/// key's.
#[inline(always)]
pub const fn slot_of(key: &FlowKey) -> u32 {
    slot(key.src_addr, key.src_port, key.proto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::REPLY;

    #[test]
    fn a_reply_key_marks_the_slot_its_packets_are_checked_against() {
        let backend = (Be32::from_host(0x0a0a_0102), Be16::from_host(8080));
        let client = (Be32::from_host(0x0a0a_0007), Be16::from_host(40_000));
        let key = FlowKey::new(backend.0, backend.1, client.0, client.1, 6, REPLY);
        assert_eq!(slot_of(&key), slot(backend.0, backend.1, 6));
        assert!(slot_of(&key) < SLOTS);
    }

    #[test]
    fn sources_spread_over_the_slots() {
        // The ports of one client, and one port of every address of a /16: few share a slot.
        let mut seen = [false; SLOTS as usize];
        let mut shared = 0;
        for i in 0..20_000u32 {
            let (addr, port) = if i < 10_000 {
                (Be32::from_host(0x0a0a_0007), 30_000 + i as u16)
            } else {
                let j = i - 10_000;
                (Be32::from_host(0x0a0a_0000 | j), 8080)
            };
            let s = slot(addr, Be16::from_host(port), 6) as usize;
            shared += usize::from(seen[s]);
            seen[s] = true;
        }
        // 20,000 sources in 65,536 slots: about 2,700 expected to share one by chance.
        assert!(shared < 3_500, "{shared} sources share a slot");
    }
}
