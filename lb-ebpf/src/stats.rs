//! Per-CPU counters: no atomics, no helper calls (array lookups are inlined by the verifier).

use lb_common::stats::Reason;

use crate::maps::{LB_SVC_STATS, LB_VERDICTS};

/// Counts one packet of `len` bytes under `reason`.
#[inline(always)]
pub fn verdict(reason: Reason, len: u32) {
    if let Some(counter) = LB_VERDICTS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len as u64;
        }
    }
}

/// Counts one packet of `len` bytes for the backend set `set_id`; `new_flow` when it opened
/// a flow.
#[inline(always)]
pub fn set(set_id: u32, len: u32, new_flow: bool) {
    if let Some(stats) = LB_SVC_STATS.get_ptr_mut(set_id) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len as u64;
            if new_flow {
                (*stats).new_flows += 1;
            }
        }
    }
}
