//! Packets the datapath generates in answer to others (TCP resets, ICMP port unreachable,
//! fragmentation needed, time exceeded): to whom, and how often. Like the kernel's own ICMP
//! (`icmp_global_allow`, `icmp_msgs_per_sec` and `icmp_msgs_burst`), answers go to unicast
//! sources only and at most [`RATE_PER_S`] a second per node, in bursts of [`BURST`]: a flood of
//! spoofed packets cannot turn the node into a reflector. What is not sent is counted
//! (`Reason::AnswerSuppressed`).

pub use crate::bucket::Bucket;
use crate::{bucket, bucket::Limit, net::Be32, time::SECOND_NS};

/// Answers a second, per node (the kernel's `icmp_msgs_per_sec` default).
pub const RATE_PER_S: u64 = 1000;
/// Answers that may go at once after a quiet spell (the kernel's `icmp_msgs_burst` default).
pub const BURST: u64 = 50;
/// The credit one answer costs, in nanoseconds of quiet.
pub const COST_NS: u64 = SECOND_NS / RATE_PER_S;
/// The budget of [`crate::maps::LB_ANSWERS`] (a [`Bucket`] shared by every CPU).
pub const LIMIT: Limit = Limit::per_second(RATE_PER_S, BURST);

/// The answer credit `bucket` holds at `now` (see [`bucket::credit`]).
#[inline(always)]
pub const fn credit(bucket: &Bucket, now: u64) -> u64 {
    bucket::credit(bucket, now, LIMIT)
}

/// Takes one answer's credit from `bucket` at `now`; whether the answer may go (see
/// [`bucket::take`]).
#[inline(always)]
pub const fn take(bucket: &mut Bucket, now: u64) -> bool {
    bucket::take(bucket, now, LIMIT)
}

/// Whether `src` may be answered: a unicast address, not 0.0.0.0/8 ("this network"), not
/// loopback (127/8), not multicast (224/4), not reserved or limited broadcast (240/4).
#[inline(always)]
pub const fn unicast(src: Be32) -> bool {
    let first = (src.to_host() >> 24) as u8;
    first != 0 && first != 127 && first < 224
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut bucket = Bucket::default();
        let start = 10 * SECOND_NS;
        // A long quiet spell fills the bucket to the burst, no more.
        let sent = (0..200).filter(|_| take(&mut bucket, start)).count() as u64;
        assert_eq!(sent, BURST);
        // Then one per COST_NS.
        assert!(!take(&mut bucket, start + COST_NS / 2));
        assert!(take(&mut bucket, start + COST_NS));
        assert!(!take(&mut bucket, start + COST_NS));
        let second_later = (1..=2_000)
            .filter(|i| take(&mut bucket, start + COST_NS + i * COST_NS / 2))
            .count() as u64;
        assert_eq!(
            second_later, RATE_PER_S,
            "a second of answers at twice the rate"
        );
    }

    #[test]
    fn only_unicast_sources_are_answered() {
        let ip = |a, b, c, d| Be32::from(core::net::Ipv4Addr::new(a, b, c, d));
        for (addr, ok) in [
            (ip(10, 0, 1, 2), true),
            (ip(192, 168, 50, 2), true),
            (ip(223, 255, 255, 254), true),
            (ip(0, 0, 0, 0), false),
            (ip(0, 1, 2, 3), false),
            (ip(127, 0, 0, 1), false),
            (ip(224, 0, 0, 1), false),
            (ip(239, 1, 2, 3), false),
            (ip(240, 0, 0, 1), false),
            (ip(255, 255, 255, 255), false),
        ] {
            assert_eq!(unicast(addr), ok, "{addr:?}");
        }
    }
}
