//! Which packets may concern a flow or a frontend, known before any lookup in the large maps.
//!
//! On a busy node conntrack is large and full, and a lookup that misses walks a bucket and the
//! entries chained in it: cache misses that cost about as much as the rest of a program. Most
//! packets miss:
//!
//! * Every packet into a pod and out of an uplink is looked up as a possible reply to restore
//!   (`lb_to_pod`, `lb_ext_out`), and a pod's new connection to an address without a frontend as
//!   a possible clash with a balanced one (`conntrack::DIRECT`). A reply's source is the
//!   backend (address, port) of a flow the datapath translated; a client's packets to its
//!   backend, and traffic between pods that is no Service's, come from elsewhere.
//! * Every packet to an address that carries a frontend (a node's addresses carry the
//!   NodePorts) is looked up as a flow to a frontend and then as a new one, although most of a
//!   node's own traffic (the kubelet, host-network pods, replies to its connections) goes to
//!   other ports.
//!
//! So the map [`crate::maps::LB_FILTERS`] keeps two sets of slots, each the hash of an (address,
//! port, protocol) into [`SLOTS`] one-byte array elements:
//!
//! * [`reply_source`]: marked by the datapath before it writes a reply entry, for the entry's
//!   source; a packet whose source is unmarked is no reply.
//! * [`destination`]: marked by the agent before it writes a frontend, and by the datapath
//!   before it writes a forward entry, for its destination; a packet to an unmarked destination
//!   is neither a flow's nor a frontend's. Not checked on ClusterIPs, which carry nothing else
//!   (their flows would pay the check for nothing).
//!
//! Slots are never cleared: a mark outlives its flow or frontend and at worst costs the lookup
//! that finds nothing, so the filters stay exact without any bookkeeping. They fill with what a
//! node has served since the map was made (one slot in 6.5 per 10,000 sources or frontends);
//! the map goes with the node's pins (`lb-agent cleanup`, a reboot). One byte per slot, each its
//! own array element, so that concurrent marks (a byte store each, by any CPU, or a write from
//! the agent) never undo one another.
//!
//! Element [`COMPLETE`] says whether every reply entry, forward entry and frontend has its mark.
//! Maps written by programs or agents that did not mark (an upgrade) are not complete: the
//! programs look up every packet until the agent has marked what it finds, after the old
//! programs have been replaced everywhere.

use crate::{
    conntrack::FlowKeyOf,
    hash::flow_hash,
    maps::FrontendKey,
    net::{Address, Be16, Be32},
};

/// Slots of each filter; 512 KiB of map each, the part a node's traffic touches stays in the
/// CPU caches.
pub const SLOTS: u32 = 1 << 16;
/// First element of the reply-source slots.
const REPLY_SOURCES: u32 = 0;
/// First element of the destination slots.
const DESTINATIONS: u32 = SLOTS;
/// Index of the element that is non-zero once the filters are complete (see above).
pub const COMPLETE: u32 = 2 * SLOTS;
/// Elements of the map.
pub const ENTRIES: u32 = COMPLETE + 1;

/// The slot of (address, port, protocol) in a filter: the flow hash's mixing of (it, nothing),
/// so that sources differing in any bit (consecutive ports, the addresses of a pod range)
/// spread.
#[inline(always)]
const fn slot(addr: Be32, port: Be16, proto: u8) -> u32 {
    let none = (Be32::from_raw(0), Be16::from_raw(0));
    flow_hash(addr, none.0, port, none.1, proto) & (SLOTS - 1)
}

/// The element of a reply's source.
#[inline(always)]
pub const fn reply_source(addr: Be32, port: Be16, proto: u8) -> u32 {
    REPLY_SOURCES + slot(addr, port, proto)
}

/// The element a reply entry's key marks: that of the packets it translates, whose source is
/// the key's.
#[inline(always)]
pub fn reply_source_of<A: Address>(key: &FlowKeyOf<A>) -> u32 {
    reply_source(key.src_addr.fold(), key.src_port, key.proto)
}

/// The element of a packet's destination.
#[inline(always)]
pub const fn destination(addr: Be32, port: Be16, proto: u8) -> u32 {
    DESTINATIONS + slot(addr, port, proto)
}

/// The element a forward entry's key marks: its destination (a frontend, or the destination of
/// a direct connection given another source port).
#[inline(always)]
pub fn destination_of<A: Address>(key: &FlowKeyOf<A>) -> u32 {
    destination(key.dst_addr.fold(), key.dst_port, key.proto)
}

/// The element a frontend marks (whatever its scope: a ClusterIP's internal frontend serves
/// packets from outside too).
#[inline(always)]
pub const fn frontend(key: &FrontendKey) -> u32 {
    destination(key.addr, key.port, key.proto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::FlowKey;
    use crate::conntrack::{FORWARD, REPLY};

    #[test]
    fn keys_mark_the_elements_their_packets_are_checked_against() {
        let backend = (Be32::from_host(0x0a0a_0102), Be16::from_host(8080));
        let client = (Be32::from_host(0x0a0a_0007), Be16::from_host(40_000));
        let vip = (Be32::from_host(0xac1e_0029), Be16::from_host(80));
        let reply = FlowKey::new(backend.0, backend.1, client.0, client.1, 6, REPLY);
        assert_eq!(
            reply_source_of(&reply),
            reply_source(backend.0, backend.1, 6)
        );
        let forward = FlowKey::new(client.0, client.1, vip.0, vip.1, 6, FORWARD);
        assert_eq!(destination_of(&forward), destination(vip.0, vip.1, 6));
        let key = FrontendKey {
            addr: vip.0,
            port: vip.1,
            proto: 6,
            scope: 1,
        };
        assert_eq!(frontend(&key), destination(vip.0, vip.1, 6));
        // The two filters never share an element, nor with COMPLETE.
        assert!(reply_source_of(&reply) < SLOTS);
        assert!((SLOTS..COMPLETE).contains(&destination_of(&forward)));
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
                (Be32::from_host(0x0a0a_0000 | (i - 10_000)), 8080)
            };
            let s = reply_source(addr, Be16::from_host(port), 6) as usize;
            shared += usize::from(seen[s]);
            seen[s] = true;
        }
        // 20,000 sources in 65,536 slots: about 2,700 expected to share one by chance.
        assert!(shared < 3_500, "{shared} sources share a slot");
    }
}
