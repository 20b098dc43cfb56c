//! The token bucket the datapath meters rare things with (generated answers in [`crate::answer`],
//! event records in [`crate::events`]): each use has its own [`Limit`], the rule is this one.

use bytemuck::{Pod, Zeroable};

use crate::time::SECOND_NS;

/// A rate, as a bucket spends it: the credit one item costs and how many may go at once after a
/// quiet spell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Nanoseconds of quiet one item costs.
    pub cost_ns: u64,
    /// Items that may go at once.
    pub burst: u64,
}

impl Limit {
    /// `rate` items a second, in bursts of `burst`.
    pub const fn per_second(rate: u64, burst: u64) -> Self {
        Self {
            cost_ns: SECOND_NS / rate,
            burst,
        }
    }
}

/// A token bucket whose tokens are nanoseconds of credit, shared by every CPU (the value of an
/// array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Bucket {
    /// Credit left, at most `burst * cost_ns`.
    pub credit_ns: u64,
    /// When the credit was last computed.
    pub last_ns: u64,
}

const _: () = assert!(size_of::<Bucket>() == 16);

/// The credit `bucket` holds at `now`: what it held, plus the time since, up to the burst.
#[inline(always)]
pub const fn credit(bucket: &Bucket, now: u64, limit: Limit) -> u64 {
    let credit = bucket
        .credit_ns
        .saturating_add(now.saturating_sub(bucket.last_ns));
    if credit > limit.burst * limit.cost_ns {
        limit.burst * limit.cost_ns
    } else {
        credit
    }
}

/// Takes one item's credit from `bucket` at `now`; whether the item may go. CPUs race on the
/// shared bucket without a lock: a burst may let through a few more than the limit, never many.
#[inline(always)]
pub const fn take(bucket: &mut Bucket, now: u64, limit: Limit) -> bool {
    let credit = credit(bucket, now, limit);
    bucket.last_ns = now;
    if credit < limit.cost_ns {
        bucket.credit_ns = credit;
        return false;
    }
    bucket.credit_ns = credit - limit.cost_ns;
    true
}

#[cfg(feature = "user")]
aya_pod!(Bucket);
