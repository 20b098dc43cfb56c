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

use std::{fs::File, io::Write as _};

use anyhow::{Context as _, Result};

const PM_QOS_DEVICE: &str = "/dev/cpu_dma_latency";

/// A PM QoS request for a CPU wake-up latency of 0 µs, withdrawn when dropped (the kernel
/// withdraws it when the file is closed, however the process ends).
pub struct Polling {
    _request: File,
}

impl Polling {
    pub fn hold() -> Result<Self> {
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
