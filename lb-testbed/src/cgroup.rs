//! A cgroup v2 directory owned by the test bed: created with a unique name under a parent the
//! caller gives (the host's cgroup v2 root, found by `lb_datapath::socket_lb::default_cgroup_root`,
//! or another bed cgroup), its processes killed and the directory removed on drop.
//!
//! Socket-level balancing applies to the processes of one cgroup v2 directory (the agent's
//! `--cgroup-root`), so a bed that runs several nodes on one machine gives each node one of these
//! and starts the node's processes in it: the node's hooks then never see the host's sockets or
//! another node's.

use std::{
    fs::{File, OpenOptions},
    io::{ErrorKind, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};

#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<parent>/<name>`; `name` should be unique (see [`crate::netns::unique_prefix`]).
    pub fn new(parent: &Path, name: &str) -> Result<Self> {
        let path = parent.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// Creates a cgroup below this one (removed by its own drop, or by this one's).
    pub fn child(&self, name: &str) -> Result<Self> {
        Self::new(&self.path, name)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd` start its process in this cgroup (the child moves itself between fork and
    /// exec, so nothing it runs is ever outside). `nsenter`-wrapped commands
    /// ([`crate::Netns::command`]) keep the cgroup through the exec.
    pub fn start_in(&self, cmd: &mut Command) -> Result<()> {
        start_in(&self.path, cmd)
    }

    /// Moves the process `pid` (all its threads) into this cgroup.
    pub fn add(&self, pid: u32) -> Result<()> {
        procs_file(&self.path)?
            .write_all(pid.to_string().as_bytes())
            .with_context(|| format!("cannot move pid {pid} into {}", self.path.display()))
    }

    /// The processes in this cgroup (not in its children).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let text = std::fs::read_to_string(self.path.join("cgroup.procs"))
            .with_context(|| format!("cannot read {}/cgroup.procs", self.path.display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }
}

/// [`Cgroup::start_in`] for a holder of the cgroup's path rather than of the [`Cgroup`] (such as
/// the agents, which outlive a borrow of the cluster whose cgroups they start in).
pub fn start_in(cgroup: &Path, cmd: &mut Command) -> Result<()> {
    let procs = procs_file(cgroup)?;
    // SAFETY: the closure only calls write(2) on a descriptor it owns (async-signal-safe)
    // and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let pid = b"0";
            let n = libc::write(procs.as_raw_fd(), pid.as_ptr().cast(), pid.len());
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn procs_file(cgroup: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("cannot open {}/cgroup.procs", cgroup.display()))
}

/// Kills what is left in `path` (`cgroup.kill`, Linux 5.14+) and removes it, children first.
fn remove(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove(&entry.path());
            }
        }
    }
    for _ in 0..100 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::NotFound => return,
            Err(_) => {
                let _ = std::fs::write(path.join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    eprintln!("testbed: cannot remove cgroup {}", path.display());
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove(&self.path);
    }
}
