//! Rare datapath events worth a line in the agent's log: a new flow dropped because the node has
//! no free source-NAT port (`Reason::DropSnatPorts`) or its conntrack is full
//! (`Reason::DropCtFull`), a frontend whose backend set has no Maglev table or backend while the
//! maps disagree (`Reason::DropNoTable`, until the agent's next sync), a later fragment to a
//! ClusterIP without its first fragment's state (`Reason::DropFragment`), an answer (reject,
//! ICMP error) not sent (`Reason::AnswerSuppressed`). Every such packet is counted under its
//! reason anyway; a record adds which flow it was.
//!
//! Records are metered per node, at most [`RATE_PER_S`] a second in bursts of [`BURST`], so that
//! a flood of such packets costs the agent a few lines a second rather than one per packet. Each
//! record says how many events went unrecorded since the one before it.
//!
//! Where a packet is dropped, the datapath leaves the event in a per-CPU slot ([`Event`]); the
//! program's entry function takes the budget and writes the record once the packet's work is
//! done (a record needs stack, which the verifier counts over whole call chains).

use bytemuck::{Pod, Zeroable};

use crate::{
    bucket::{self, Bucket, Limit},
    net::{Be16, Be32},
};

/// Records a second, per node.
pub const RATE_PER_S: u64 = 5;
/// Records that may go at once after a quiet spell.
pub const BURST: u64 = 10;
/// The budget of [`crate::maps::LB_EVENTS`].
pub const LIMIT: Limit = Limit::per_second(RATE_PER_S, BURST);

/// Value of [`crate::maps::LB_EVENTS`] (an array of one, shared by every CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Budget {
    pub bucket: Bucket,
    /// Events not recorded since the last record. CPUs race on it as on the bucket, so it may
    /// miss a few in a flood; the counters per reason are exact.
    pub unrecorded: u64,
}

const _: () = assert!(size_of::<Budget>() == 24);

/// Whether an event at `now` may be recorded; if so, how many were not since the last record
/// (and that count starts over).
#[inline(always)]
pub const fn record(budget: &mut Budget, now: u64) -> Option<u64> {
    if !bucket::take(&mut budget.bucket, now, LIMIT) {
        budget.unrecorded = budget.unrecorded.saturating_add(1);
        return None;
    }
    let unrecorded = budget.unrecorded;
    budget.unrecorded = 0;
    Some(unrecorded)
}

/// Value of [`crate::maps::LB_EVENT_SLOT`] (a per-CPU array of one): the event a packet left for
/// its program's entry function to record. Fields an event has no use for are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    /// The [`crate::stats::Reason`] the packet was counted under.
    pub reason: u32,
    /// The backend set of the flow's frontend (`Reason::DropNoTable`).
    pub set_id: u32,
    pub src_addr: Be32,
    pub dst_addr: Be32,
    /// The backend the flow was balanced to (`Reason::DropSnatPorts`, `Reason::DropCtFull`).
    pub backend_addr: Be32,
    pub src_port: Be16,
    pub dst_port: Be16,
    pub backend_port: Be16,
    /// The IP identification (`Reason::DropFragment`).
    pub ip_id: Be16,
    pub proto: u8,
    /// 1 while the record is still to be written.
    pub pending: u8,
    pub _pad: [u8; 2],
}

const _: () = assert!(size_of::<Event>() == 32);

#[cfg(feature = "user")]
aya_pod!(Budget, Event);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::SECOND_NS;

    #[test]
    fn a_burst_then_the_rate_and_what_was_not_recorded() {
        let mut budget = Budget::default();
        let start = 100 * SECOND_NS;
        let first: [Option<u64>; 3] = core::array::from_fn(|_| record(&mut budget, start));
        assert_eq!(first, [Some(0); 3]);
        let burst = 3
            + (0..1_000)
                .filter(|_| record(&mut budget, start).is_some())
                .count() as u64;
        assert_eq!(burst, BURST, "a flood is cut to the burst");
        // The next record, once the credit is back, tells how many the flood lost.
        assert_eq!(record(&mut budget, start + LIMIT.cost_ns / 2), None);
        assert_eq!(
            record(&mut budget, start + LIMIT.cost_ns),
            Some(1_000 + 3 - BURST + 1)
        );
        assert_eq!(record(&mut budget, start + 2 * LIMIT.cost_ns), Some(0));
        // A minute of one event per millisecond: the rate, no more.
        let minute = (1..=60_000u64)
            .filter(|ms| record(&mut budget, start + 2 * LIMIT.cost_ns + ms * 1_000_000).is_some())
            .count() as u64;
        assert_eq!(minute, 60 * RATE_PER_S);
    }
}
