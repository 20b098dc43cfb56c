//! Where netperf and netserver run. Left to the scheduler, the two share a CPU in some runs and
//! not in others, and a request/response test is a different test in each case: one context
//! switch per transaction, or a wake-up on the other CPU. Bound each to a CPU of its own
//! (netperf's `-T`), every run is the second kind, as between two machines; and each one's
//! packets are processed (softirq) on its own CPU too, since a veth hands a packet on in the
//! sender's context.

/// The (netperf, netserver) CPUs: the last two this process may run on (on a machine with more
/// than two, CPU 0, where most interrupts land, stays with the rest); `None` with fewer than two.
pub fn netperf_pair() -> Option<(usize, usize)> {
    pair(&allowed())
}

/// How the report says it.
pub fn netperf_note() -> String {
    match netperf_pair() {
        Some((local, remote)) => format!(
            "netperf runs on CPU {local} and netserver on CPU {remote} (netperf's `-T`), so \
             that each one's packets are processed on its own CPU in every run."
        ),
        None => "netperf and netserver share this machine's one CPU.".to_owned(),
    }
}

fn pair(allowed: &[usize]) -> Option<(usize, usize)> {
    match allowed {
        [.., a, b] => Some((*a, *b)),
        _ => None,
    }
}

/// The CPUs this process may run on, in order.
fn allowed() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size passed is the set's own.
    let status = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if status != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: a CPU number within the set's size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_two_cpus_carry_the_pair() {
        assert_eq!(pair(&[0, 1]), Some((0, 1)));
        assert_eq!(pair(&[0, 1, 2, 3]), Some((2, 3)));
        assert_eq!(pair(&[3]), None);
        assert_eq!(pair(&[]), None);
        assert!(!allowed().is_empty(), "this process runs somewhere");
    }
}
