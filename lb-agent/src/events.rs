//! The datapath's rare events (SNAT ports exhausted, conntrack full, an inconsistent service, a
//! fragment without state, suppressed answers; `lb_common::events`) in the agent's log. The
//! programs write them, at most a few a second, with aya-log; aya-log hands them to the `log`
//! crate, which the agent's `tracing` subscriber takes in (`tracing-log`), so they appear as
//! warnings with the target `lb_ebpf::events`, in the agent's format.

use lb_datapath::{Datapath, EventLog};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

/// Starts forwarding the event records of `datapath`'s programs into the log, on a task of its
/// own. If that cannot start, says so once and returns: the events are still counted (`lbctl
/// stats`, `lb_datapath_packets_total`), and nothing else depends on their records.
pub fn forward(datapath: &mut Datapath) {
    let log = match datapath.event_log() {
        Ok(log) => log,
        Err(e) => return not_logged(&anyhow::Error::from(e)),
    };
    // SAFETY: the descriptor is the ring buffer's, which the reader owns and keeps open until
    // it is dropped, with the `AsyncFd` that owns it.
    let fd = match unsafe { AsyncFd::register_with_interest(log, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return not_logged(&anyhow::Error::from(e.into_parts().1)),
    };
    tokio::spawn(read(fd));
}

async fn read(mut fd: AsyncFd<EventLog>) {
    loop {
        let mut ready = match fd.readable_mut().await {
            Ok(ready) => ready,
            Err(e) => return not_logged(&anyhow::Error::from(e)),
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

fn not_logged(e: &anyhow::Error) {
    warn!(
        error = format!("{e:#}"),
        "the datapath's rare events (SNAT ports exhausted, conntrack full, ...) are not logged; they are still counted (lbctl stats)"
    );
}
