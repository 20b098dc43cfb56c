//! Hairpin flows: a pod reaching a service (ClusterIP, or a NodePort from inside) whose chosen
//! backend is the pod itself. Linux drops packets that arrive from outside with one of its own
//! addresses as source, so such a flow is source-NATed too, to the link-local hairpin address
//! the agent configures (the pod sees that address as its client), and bounced straight back
//! into the pod's interface. Its replies, addressed to the hairpin address, come back the same
//! way with the frontend restored. Bouncing instead of routing keeps the node's reverse-path
//! filter out of it (the hairpin address has no route).

use lb_common::conntrack::{CtEntry, REPLY};

use crate::{
    ct,
    frame::{Action, Frame, ptr_at},
    hdr::EthHdr,
    parse::{self, Ipv4, L4},
    snat,
};

/// Sends a translated hairpin packet back into the interface it came from, addressed to the pod.
#[inline(always)]
pub fn bounce<F: Frame>(frame: &mut F) -> Action {
    let Some(eth) = ptr_at::<F, EthHdr>(frame, 0) else {
        return Action::Drop;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        core::mem::swap(&mut (*eth).dst, &mut (*eth).src);
    }
    Action::Bounce
}

/// A packet to the hairpin address: the reply of a hairpin flow gets the frontend back as its
/// source and the pod's client side as its destination, and goes back into the pod.
#[inline(always)]
pub fn reply<F: Frame>(frame: &mut F, ip: &Ipv4, l4: &L4, len: u32) -> Option<Action> {
    let key = parse::flow_key(ip, l4, REPLY);
    let entry = ct::find(&key)?;
    let now = ct::now();
    // SAFETY: map value from a successful lookup.
    let e: CtEntry = unsafe { *entry };
    if !e.hairpin() || !e.live(now) {
        return None;
    }
    if let Err(drop) = snat::translate_reply(frame, entry, &e, ip, l4, len, now) {
        return Some(drop);
    }
    Some(bounce(frame))
}
