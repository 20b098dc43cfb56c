//! Keeps the CPUs out of their idle states while the benchmarks run.
//!
//! One netperf stream is a ping-pong: every packet wakes a process or a softirq on a CPU that
//! was idle a moment ago. On a virtual machine an idle vCPU halts, and waking a halted vCPU goes
//! through the hypervisor: tens of microseconds a hop, more than the whole path through the
//! kernel. Measured on the 2-vCPU machine this was written on, between two network namespaces
//! with nothing in between: TCP_RR 19,000/s (p99 100 µs) with idle halting against 95,000/s
//! (p99 18 µs) without, TCP_CRR 13,800/s (run-to-run spread 11%) against 40,000/s (2.4%). With
//! halting, the wake-ups dominate every transaction, so that every datapath looks alike and the
//! spread hides what differs.
//!
//! The kernel's PM QoS interface does what tuned's latency-performance profile does: a process
//! that writes a latency of 0 µs to `/dev/cpu_dma_latency` keeps every CPU polling instead of
//! halting for as long as it holds the file open. Every datapath is measured under the same
//! request, and it ends with the benchmark.
//!
//! Only a cpuidle driver's governor reads that request. A kernel running without one (its
//! `cpuidle/current_driver` is `none`, as on some virtual machines) halts idle CPUs whatever is
//! asked: the request is then refused here, so that the report does not claim polling.

use std::{
    fs::{self, File},
    io::Write as _,
};

use anyhow::{Context as _, Result, bail};

const PM_QOS_DEVICE: &str = "/dev/cpu_dma_latency";
const CPUIDLE_DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";

/// A PM QoS request for a CPU wake-up latency of 0 µs, withdrawn when dropped (the kernel
/// withdraws it when the file is closed, however the process ends).
pub struct Polling {
    _request: File,
}

impl Polling {
    /// Asks every CPU to poll when idle; an error says why they will halt instead.
    pub fn hold() -> Result<Self> {
        let driver = fs::read_to_string(CPUIDLE_DRIVER)
            .with_context(|| format!("cannot read {CPUIDLE_DRIVER}"))?;
        if !honours_pm_qos(&driver) {
            bail!(
                "this kernel runs no cpuidle driver ({CPUIDLE_DRIVER}: {}), so its idle loop \
                 halts whatever PM QoS asks",
                driver.trim()
            );
        }
        let mut request = File::options()
            .write(true)
            .open(PM_QOS_DEVICE)
            .with_context(|| format!("cannot open {PM_QOS_DEVICE} (PM QoS)"))?;
        request
            .write_all(&0_i32.to_ne_bytes())
            .with_context(|| format!("cannot write a latency request to {PM_QOS_DEVICE}"))?;
        Ok(Self { _request: request })
    }
}

/// Whether idle CPUs read PM QoS requests under the cpuidle driver named `current_driver`.
fn honours_pm_qos(current_driver: &str) -> bool {
    !matches!(current_driver.trim(), "" | "none")
}

#[cfg(test)]
mod tests {
    use super::honours_pm_qos;

    #[test]
    fn only_a_cpuidle_driver_honours_pm_qos() {
        assert!(!honours_pm_qos("none\n"));
        assert!(!honours_pm_qos(""));
        assert!(honours_pm_qos("haltpoll\n"));
        assert!(honours_pm_qos("intel_idle\n"));
    }
}
