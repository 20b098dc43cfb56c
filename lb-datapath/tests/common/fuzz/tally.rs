//! What a fuzz run went through, per program: the summary it prints, and the coverage it must
//! reach (a generator that stopped reaching a decision would otherwise go unnoticed).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use lb_common::stats::Reason;

use super::{
    check::{Observed, Verdict},
    frames::Family,
};
use crate::common::harness::Hook;

pub const HOOKS: [Hook; 5] = [
    Hook::FromPod,
    Hook::ToPod,
    Hook::Xdp,
    Hook::ExtIn,
    Hook::ExtOut,
];

fn slot(hook: Hook) -> usize {
    HOOKS.iter().position(|&h| h == hook).expect("a hook")
}

#[derive(Default)]
pub struct Tally {
    frames: [u64; HOOKS.len()],
    untouched: [u64; HOOKS.len()],
    /// Frames that concern no frontend (by the scenario's addresses).
    foreign: [u64; HOOKS.len()],
    /// Verdicts, per hook.
    verdicts: [BTreeMap<String, u64>; HOOKS.len()],
    /// Frames counted, by reason (extras included), per hook.
    reasons: [BTreeMap<Reason, u64>; HOOKS.len()],
    families: BTreeMap<Family, u64>,
    /// Frames meant for a tc program that BPF_PROG_TEST_RUN refuses there, run at XDP.
    moved_to_xdp: u64,
}

impl Tally {
    pub fn note(&mut self, family: Family, seen: &Observed<'_>, verdict: Verdict, foreign: bool) {
        let at = slot(seen.hook);
        self.frames[at] += 1;
        *self.verdicts[at].entry(format!("{verdict:?}")).or_default() += 1;
        self.foreign[at] += u64::from(foreign);
        *self.families.entry(family).or_default() += 1;
        if seen.reason().is_none() {
            self.untouched[at] += 1;
        }
        for &(reason, _, _) in &seen.counted {
            *self.reasons[at].entry(reason).or_default() += 1;
        }
    }

    pub fn moved_to_xdp(&mut self) {
        self.moved_to_xdp += 1;
    }

    pub fn total(&self) -> u64 {
        self.frames.iter().sum()
    }

    /// Frames counted under `reason`, over every hook.
    fn reached(&self, reason: Reason) -> u64 {
        self.reasons.iter().filter_map(|r| r.get(&reason)).sum()
    }

    pub fn summary(&self, test: &str, elapsed: Duration) -> String {
        let mut s = format!(
            "{test}: {} frames in {:.1}s\n",
            self.total(),
            elapsed.as_secs_f64()
        );
        for (at, hook) in HOOKS.iter().enumerate() {
            let counted: Vec<String> = self.reasons[at]
                .iter()
                .map(|(r, n)| format!("{} {n}", r.name()))
                .collect();
            let _ = writeln!(
                s,
                "  {hook:?}: {} frames ({} concern no frontend), {} untouched; {:?}; {}",
                self.frames[at],
                self.foreign[at],
                self.untouched[at],
                self.verdicts[at],
                counted.join(", ")
            );
        }
        let _ = writeln!(s, "  families: {:?}", self.families);
        let _ = writeln!(
            s,
            "  short IPv4/IPv6 frames run at XDP (no skb at tc): {}",
            self.moved_to_xdp
        );
        s
    }

    /// Every hook got its share of the frames, and every reason in `reasons` was reached.
    pub fn assert_coverage(&self, test: &str, reasons: &[Reason]) {
        let share = self.total() / (2 * HOOKS.len() as u64);
        for (at, hook) in HOOKS.iter().enumerate() {
            assert!(
                self.frames[at] >= share,
                "{test}: {hook:?} ran only {} of {} frames",
                self.frames[at],
                self.total()
            );
        }
        let missed: Vec<&str> = reasons
            .iter()
            .filter(|&&r| self.reached(r) == 0)
            .map(|r| r.name())
            .collect();
        assert!(
            missed.is_empty(),
            "{test}: the frames never reached {missed:?}"
        );
    }
}
