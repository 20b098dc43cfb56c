//! A network namespace owned by the test bed: created with a unique name, deleted on drop.

use std::{
    ffi::OsStr,
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{Context as _, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique name prefix for one bed: `lbt`, the tag, the process id and a counter, separated so
/// that no two (process, counter) pairs give the same text (with `pid % 100000` and no
/// separator, pids 1234 and 12345 could). Unique among live processes, as a pid is not reused
/// while its process runs. For namespace and file names; it can be too long for a 15-character
/// interface name.
pub fn unique_prefix(tag: &str) -> String {
    format!(
        "lbt{tag}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!("cannot start {cmd:?} (is iproute2 installed? `cargo xtask setup`)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace with its loopback up, in which IPv6 addresses, the kernel's own
    /// link-local ones included, are usable as soon as they exist: no duplicate address
    /// detection, which would leave a new interface without a usable link-local address (and
    /// so unable to resolve a next hop for what it forwards) for its first second or two.
    pub fn new(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        run(ns.command("sysctl").args([
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace's handle (for `nsenter --net=...`).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Creates a veth pair: `iface` in this namespace, its peer `peer_iface` in `peer`.
    pub fn add_veth(&self, iface: &str, peer: &Netns, peer_iface: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            iface,
            "type",
            "veth",
            "peer",
            "name",
            peer_iface,
            "netns",
            peer.name(),
        ])
        .map(drop)
    }

    /// A command that runs inside the namespace (network namespace only: `nsenter --net`, so
    /// that bpffs and /sys stay those of the caller).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_at(&self.path(), program)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self
            .command("sysctl")
            .args(["-qw", &format!("{key}={value}")]))
        .map(|_| ())
    }

    /// Runs `f` on a thread that lives in this namespace: sockets it opens and interfaces it
    /// resolves belong to the namespace.
    pub fn enter<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let handle = self.spawn(f)?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))
    }

    /// Starts `f` on a new thread that lives in this namespace.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<thread::JoinHandle<R>> {
        spawn_at(&self.path(), f)
    }
}

/// A command that runs `program` inside the network namespace whose handle is `path` (see
/// [`Netns::command`]). For holders of a namespace's path rather than of the [`Netns`], such as
/// processes that outlive a borrow of it.
pub fn command_at(path: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={path}")).arg("--").arg(program);
    cmd
}

/// Starts `f` on a new thread that lives in the network namespace whose handle is `path`.
pub fn spawn_at<R: Send + 'static>(
    path: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<thread::JoinHandle<R>> {
    let file = File::open(path).with_context(|| format!("cannot open netns handle {path}"))?;
    Ok(thread::spawn(move || {
        // SAFETY: setns on a namespace file we hold open; affects only this thread.
        let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
        drop(file);
        f()
    }))
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes every interface in it (and the veth peers).
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("testbed: cannot delete netns {}: {e}", self.name);
        }
    }
}
