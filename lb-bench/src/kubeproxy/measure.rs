//! Control-plane timings of kube-proxy's two modes, each in a fresh network namespace of its own
//! (never the host's netfilter): how long the kernel tools take to program a ruleset from
//! scratch, and to apply the partial sync of one endpoint change.
//!
//! Each figure is the wall time of the whole command kube-proxy runs — process start, parsing,
//! the kernel transaction, exit — with the ruleset text on its standard input, as kube-proxy
//! feeds it. The text itself is generated beforehand and not timed (kube-proxy's own Go code
//! that builds it is not what is measured). Commands run from a thread inside the namespace (no
//! `nsenter` in the timed path).
//!
//! A change also counts what kube-proxy reads from the kernel during that sync: in iptables mode
//! `iptables-save -t nat` (to find stale chains; skipped in large-cluster mode), in nftables mode
//! `nft --json list chains ip` and `nft --json list sets ip` (knftables ≤ v0.0.19's `List`).

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Output, Stdio},
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_testbed::{Netns, netns::unique_prefix};

use super::{BenchService, EndpointChange, NodeConfig, iptables, nftables, with_endpoint_change};

/// Which kernel interface programs the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// kube-proxy's iptables mode through `iptables-nft` (rules in nf_tables).
    IptablesNft,
    /// kube-proxy's iptables mode through `iptables-legacy` (x_tables).
    IptablesLegacy,
    /// kube-proxy's nftables mode (`nft`).
    Nftables,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::IptablesNft => "iptables-nft",
            Self::IptablesLegacy => "iptables-legacy",
            Self::Nftables => "nftables",
        }
    }

    pub fn is_iptables(self) -> bool {
        self != Self::Nftables
    }

    /// The variant plain `iptables` is on this machine (what kube-proxy's iptables mode would
    /// use here, as it runs `iptables-restore`), from `iptables -V`.
    pub fn iptables_default() -> Result<Self> {
        let version = iptables_version()?;
        Ok(if version.contains("nf_tables") {
            Self::IptablesNft
        } else {
            Self::IptablesLegacy
        })
    }

    fn restore(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Self::IptablesNft => ("iptables-nft-restore", &iptables::RESTORE_FLAGS),
            Self::IptablesLegacy => ("iptables-legacy-restore", &iptables::RESTORE_FLAGS),
            Self::Nftables => ("nft", &["-f", "-"]),
        }
    }

    /// The initial ruleset of `services` in this backend's format: for iptables the jump rules
    /// and the full sync, for nftables the first sync.
    pub fn full_ruleset(self, services: &[BenchService], cfg: &NodeConfig) -> String {
        match self {
            Self::Nftables => nftables::ruleset(services, cfg),
            _ => iptables::full_ruleset(services, cfg),
        }
    }

    /// The partial sync from `before` to `after`.
    pub fn endpoint_change(
        self,
        before: &[BenchService],
        after: &[BenchService],
        cfg: &NodeConfig,
    ) -> String {
        match self {
            Self::Nftables => nftables::endpoint_change(before, after, cfg),
            _ => iptables::endpoint_change(before, after, cfg),
        }
    }
}

/// `iptables -V`, e.g. `iptables v1.8.9 (nf_tables)`.
pub fn iptables_version() -> Result<String> {
    version_of("iptables", "-V")
}

/// `nft -v`, e.g. `nftables v1.0.6 (Lester Gooch #5)`.
pub fn nft_version() -> Result<String> {
    version_of("nft", "-v")
}

fn version_of(program: &str, flag: &str) -> Result<String> {
    let out = Command::new(program)
        .arg(flag)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} (installed by `cargo xtask setup`)"))?;
    ensure!(out.status.success(), "{program} {flag} failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A new, empty network namespace (deleted on drop).
pub fn fresh_netns() -> Result<Netns> {
    Netns::new(unique_prefix("kp"))
}

/// Runs `program args` inside `ns` with `stdin` on its standard input; returns the wall time
/// from start to exit and the standard output. Fails with the standard error (and, for an
/// `iptables-restore` that names a failing line, that line) when the command fails.
pub fn run_in(
    ns: &Netns,
    program: &str,
    args: &[&str],
    stdin: Option<Arc<String>>,
) -> Result<(Duration, Vec<u8>)> {
    run_in_with_timeout(ns, program, args, stdin, None)?
        .context("the command was killed without a timeout")
}

/// [`run_in`], killing the command once `timeout` has passed: `Ok(None)` then.
pub fn run_in_with_timeout(
    ns: &Netns,
    program: &str,
    args: &[&str],
    stdin: Option<Arc<String>>,
    timeout: Option<Duration>,
) -> Result<Option<(Duration, Vec<u8>)>> {
    let what = format!("{program} {}", args.join(" "));
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let input = stdin.clone();
    let (elapsed, out, timed_out) = ns.enter(move || -> Result<_> {
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let pid = child.id() as libc::pid_t;
        let writer = match (child.stdin.take(), input) {
            (Some(mut pipe), Some(text)) => Some(thread::spawn(move || {
                // A failing command may exit before reading everything: its error wins.
                let _ = pipe.write_all(text.as_bytes());
            })),
            _ => None,
        };
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        // A watchdog kills the command at the deadline; waiting stays exact (no polling).
        let watchdog = timeout.map(|timeout| {
            let (done, wait) = mpsc::channel::<()>();
            let fired = thread::spawn(move || {
                if wait.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout) {
                    // SAFETY: kill has no memory-safety preconditions; the child is not
                    // reaped before the watchdog is stopped, so `pid` is still the child's.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    true
                } else {
                    false
                }
            });
            (done, fired)
        });
        // Wait for the exit without reaping (WNOWAIT), so that `pid` cannot be reused under
        // the watchdog; stop the watchdog, then reap.
        // SAFETY: an all-zero siginfo_t is valid; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `info` is a valid, writable siginfo_t.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break;
            }
        }
        let elapsed = start.elapsed();
        let timed_out = match watchdog {
            Some((done, fired)) => {
                let _ = done.send(());
                fired.join().unwrap_or(false)
            }
            None => false,
        };
        let status = child.wait()?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        let out = Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        Ok((elapsed, out, timed_out))
    })??;
    if timed_out {
        return Ok(None);
    }
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut msg = format!("{what} failed: {}", stderr.trim());
        if let Some(text) = &stdin
            && let Some(line) = failing_line(&stderr)
        {
            let _ = std::fmt::Write::write_fmt(
                &mut msg,
                format_args!(
                    "\nline {line}: {}",
                    text.lines().nth(line.saturating_sub(1)).unwrap_or("?")
                ),
            );
        }
        bail!(msg);
    }
    Ok(Some((elapsed, out.stdout)))
}

/// Reads a child's pipe to the end on a thread of its own.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// The line number in an `iptables-restore` error ("... line 12 failed").
fn failing_line(stderr: &str) -> Option<usize> {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "line")
        .and_then(|w| w[1].trim_end_matches(':').parse().ok())
}

/// Loads `text` into `ns` with the backend's restore command; returns the command's wall time.
pub fn apply(ns: &Netns, backend: Backend, text: Arc<String>) -> Result<Duration> {
    let (program, args) = backend.restore();
    run_in(ns, program, args, Some(text)).map(|(elapsed, _)| elapsed)
}

/// Loads each `(namespace, text)` of `loads`, side by side (a node's full ruleset takes some
/// 30 s at 10k Services), except with iptables-legacy, which takes one lock for the whole
/// machine.
pub fn apply_all(backend: Backend, loads: Vec<(&Netns, Arc<String>)>) -> Result<()> {
    if backend == Backend::IptablesLegacy {
        for (ns, text) in loads {
            apply(ns, backend, text)?;
        }
        return Ok(());
    }
    thread::scope(|scope| {
        let running: Vec<_> = loads
            .into_iter()
            .map(|(ns, text)| scope.spawn(move || apply(ns, backend, text)))
            .collect();
        running.into_iter().try_for_each(|load| {
            load.join()
                .map_err(|_| anyhow::anyhow!("loading a ruleset panicked"))?
                .map(drop)
        })
    })
}

/// [`apply`], giving up (the command killed) after `timeout`: `Ok(None)` then.
pub fn apply_with_timeout(
    ns: &Netns,
    backend: Backend,
    text: Arc<String>,
    timeout: Duration,
) -> Result<Option<Duration>> {
    let (program, args) = backend.restore();
    Ok(
        run_in_with_timeout(ns, program, args, Some(text), Some(timeout))?
            .map(|(elapsed, _)| elapsed),
    )
}

/// What kube-proxy reads back from the kernel during a sync (see the module doc); returns the
/// wall time of those commands.
pub fn read_back(ns: &Netns, backend: Backend) -> Result<Duration> {
    Ok(match backend {
        Backend::IptablesNft => run_in(ns, "iptables-nft-save", &["-t", "nat"], None)?.0,
        Backend::IptablesLegacy => run_in(ns, "iptables-legacy-save", &["-t", "nat"], None)?.0,
        Backend::Nftables => {
            run_in(ns, "nft", &["--json", "list", "chains", "ip"], None)?.0
                + run_in(ns, "nft", &["--json", "list", "sets", "ip"], None)?.0
        }
    })
}

/// Whether kube-proxy reads the kernel's state back during a sync of `services` (iptables
/// mode skips it in large-cluster mode).
pub fn reads_back(backend: Backend, services: &[BenchService]) -> bool {
    match backend {
        Backend::Nftables => true,
        _ => !iptables::large_cluster_mode(services),
    }
}

/// Loads `ruleset` (e.g. [`Backend::full_ruleset`]) into a fresh namespace in one command;
/// returns that command's wall time.
pub fn program_from_scratch(backend: Backend, ruleset: &str) -> Result<Duration> {
    let ns = fresh_netns()?;
    apply(&ns, backend, Arc::new(ruleset.to_owned()))
}

/// One timed endpoint change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeTiming {
    pub change: EndpointChange,
    /// Reading the kernel's state during the sync (zero when kube-proxy skips it).
    pub read: Duration,
    /// Applying the partial sync.
    pub write: Duration,
    /// Size of the partial sync's text.
    pub bytes: usize,
}

impl ChangeTiming {
    /// The whole sync's work with the kernel: what kube-proxy waits for.
    pub fn total(&self) -> Duration {
        self.read + self.write
    }
}

/// Programs `services` into a fresh namespace (untimed), then times `k` endpoint changes of
/// `services[index]`, alternately adding an endpoint (the address after its highest one) and
/// removing it again, each applied as kube-proxy's partial sync.
pub fn one_endpoint_change(
    backend: Backend,
    services: &[BenchService],
    cfg: &NodeConfig,
    index: usize,
    k: usize,
) -> Result<Vec<ChangeTiming>> {
    let ns = fresh_netns()?;
    apply(&ns, backend, Arc::new(backend.full_ruleset(services, cfg)))
        .context("loading the initial ruleset")?;
    one_endpoint_change_in(&ns, backend, services, cfg, index, k, None)
}

/// [`one_endpoint_change`] in `ns`, which already holds the rules of `services` (e.g. after
/// [`apply`] of [`Backend::full_ruleset`]); it holds them again afterwards when `k` is even.
/// With a `budget`, stops starting changes once that much time has passed (fewer than `k`
/// timings then); a single change is also killed when it outlasts the budget.
pub fn one_endpoint_change_in(
    ns: &Netns,
    backend: Backend,
    services: &[BenchService],
    cfg: &NodeConfig,
    index: usize,
    k: usize,
    budget: Option<Duration>,
) -> Result<Vec<ChangeTiming>> {
    let extra = extra_endpoint(services, index)?;
    let started = Instant::now();
    let mut current = services.to_vec();
    let mut timings = Vec::with_capacity(k);
    for i in 0..k {
        let left = budget.map(|b| b.saturating_sub(started.elapsed()));
        if left == Some(Duration::ZERO) {
            break;
        }
        let change = if i % 2 == 0 {
            EndpointChange::Add(extra)
        } else {
            EndpointChange::Remove(extra)
        };
        let next = with_endpoint_change(&current, index, change)?;
        let delta = Arc::new(backend.endpoint_change(&current, &next, cfg));
        let read = if reads_back(backend, &next) {
            read_back(ns, backend)?
        } else {
            Duration::ZERO
        };
        let bytes = delta.len();
        let (program, args) = backend.restore();
        let Some((write, _)) = run_in_with_timeout(ns, program, args, Some(delta), left)
            .with_context(|| format!("change {i}: {change:?}"))?
        else {
            break;
        };
        timings.push(ChangeTiming {
            change,
            read,
            write,
            bytes,
        });
        current = next;
    }
    Ok(timings)
}

/// The endpoint [`one_endpoint_change`] adds to `services[index]`: the address after its
/// highest endpoint.
pub fn extra_endpoint(services: &[BenchService], index: usize) -> Result<Ipv4Addr> {
    let svc = services
        .get(index)
        .with_context(|| format!("no service at index {index}"))?;
    let extra = svc
        .endpoints
        .iter()
        .map(|ip| u32::from(*ip))
        .max()
        .map_or(Ipv4Addr::new(10, 10, 0, 250), |m| Ipv4Addr::from(m + 1));
    ensure!(
        !svc.endpoints.contains(&extra),
        "no free endpoint address after {extra}"
    );
    Ok(extra)
}

/// The `p`th percentile (0-100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s[..1], 99.0), Duration::from_millis(1));
    }

    #[test]
    fn restore_error_line() {
        assert_eq!(failing_line("iptables-restore: line 12 failed\n"), Some(12));
        assert_eq!(failing_line("Error: syntax error"), None);
    }
}
