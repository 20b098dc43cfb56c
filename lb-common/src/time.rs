//! Time as the datapath reads it: nanoseconds of `bpf_ktime_get_coarse_ns()` (the monotonic
//! coarse clock, `CLOCK_MONOTONIC_COARSE` in userspace). Deadlines and timeouts are in these
//! units on both sides.

/// One second, in the datapath's clock units.
pub const SECOND_NS: u64 = 1_000_000_000;

/// `seconds` in the datapath's clock units.
#[inline(always)]
pub const fn seconds(seconds: u64) -> u64 {
    seconds * SECOND_NS
}
