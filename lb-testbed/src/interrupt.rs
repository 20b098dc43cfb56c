//! Ctrl-C without leftovers, for the long-running tools (`lb-demo`, `lb-bench`).
//!
//! A bed is removed by `Drop` impls, which run only if the process unwinds; a process killed by
//! SIGINT does not. And Ctrl-C in a terminal signals the whole foreground process group, so the
//! `ip` commands and agents the bed runs would be killed halfway too (an `ip netns add` cut short
//! can leave a namespace that nothing owns).
//!
//! So the tool runs its work in a child of its own (the worker) in a new process group, which
//! the terminal does not signal. The parent stays in the foreground: on SIGINT, SIGTERM or SIGHUP
//! it tells the worker (SIGINT to its pid only), and the worker sets a flag that the work checks
//! between steps ([`check`]): it stops there, unwinds, and cleans up as after a normal run, then
//! exits with status 130. Only SIGKILL (of the worker) leaves the bed behind.

use std::{
    io::Write as _,
    process::{Child, Command, ExitStatus},
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
};

use anyhow::{Context as _, Result, bail};

/// Set in the worker when it is asked to stop.
static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The worker's pid, in the parent (0 until it runs).
static WORKER: AtomicI32 = AtomicI32::new(0);
/// A signal arrived in the parent before the worker's pid was known.
static PENDING: AtomicBool = AtomicBool::new(false);
/// The parent has said that it is stopping (said once).
static NOTIFIED: AtomicBool = AtomicBool::new(false);

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The error a step returns when the work was interrupted.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// `Err(Interrupted)` once the worker has been asked to stop.
pub fn check() -> Result<()> {
    if REQUESTED.load(Ordering::Relaxed) {
        return Err(Interrupted.into());
    }
    Ok(())
}

pub fn is_interrupted(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Interrupted>().is_some()
}

extern "C" fn request_stop(_: libc::c_int) {
    REQUESTED.store(true, Ordering::Relaxed);
}

extern "C" fn forward(_: libc::c_int) {
    let pid = WORKER.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; pid is our child's (never 0 or negative here,
        // which would signal a whole process group).
        unsafe { libc::kill(pid, libc::SIGINT) };
    } else {
        PENDING.store(true, Ordering::Relaxed);
    }
    if !NOTIFIED.swap(true, Ordering::Relaxed) {
        let msg = b"\nInterrupted: stopping after the current step, then cleaning up...\n";
        // SAFETY: write(2) is async-signal-safe; the buffer is valid for its length.
        unsafe { libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len()) };
    }
}

fn install(handler: extern "C" fn(libc::c_int), signals: &[libc::c_int]) -> Result<()> {
    for &signal in signals {
        // SAFETY: a zeroed sigaction is valid; the handler only touches atomics (and, in the
        // parent, async-signal-safe calls).
        let ret = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut())
        };
        if ret != 0 {
            bail!(
                "cannot handle signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// In the worker, before anything is built: SIGINT, SIGTERM and SIGHUP request a stop.
pub fn install_in_worker() -> Result<()> {
    install(request_stop, &SIGNALS)?;
    // The worker writes to the terminal from a background process group: with `stty tostop` that
    // would stop it, unless SIGTTOU is ignored.
    // SAFETY: setting a signal's disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGTTOU, libc::SIG_IGN) };
    Ok(())
}

/// In the parent: starts `worker` in a process group of its own, forwards stop requests to it
/// and waits for it.
pub fn run_worker(mut worker: Command) -> Result<ExitStatus> {
    use std::os::unix::process::CommandExt as _;

    install(forward, &SIGNALS)?;
    let mut child: Child = worker
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {worker:?}"))?;
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    WORKER.store(pid, Ordering::Relaxed);
    if PENDING.load(Ordering::Relaxed) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
    let status = child.wait().context("waiting for the worker")?;
    let _ = std::io::stderr().flush();
    Ok(status)
}
