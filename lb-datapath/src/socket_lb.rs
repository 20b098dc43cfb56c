//! Socket-level balancing's attachments: the `cgroup/connect4`, `sendmsg4`, `recvmsg4` and
//! `getpeername4` programs attached to a cgroup v2 directory (every process in it or below it gets
//! its `connect()`s and datagrams to frontends translated) through BPF links pinned under
//! `<bpffs>/cgroup/`, so that they outlive the agent like the interface links
//! ([`crate::attach`]). A starting agent swaps its programs into the links it finds
//! (`BPF_LINK_UPDATE`: no `connect()` goes untranslated during an upgrade), replaces links that
//! serve another cgroup, and [`detach`] (`--socket-lb off`, `lb-agent cleanup`) unpins them,
//! which detaches them.

use std::{
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use aya_obj::generated::{bpf_attach_type, bpf_link_type};
use lb_common::{
    programs,
    sock::{SockConfig, sock_flags},
};
use tracing::warn;

pub use crate::sys::CgroupLinkInfo;
use crate::{loader::Datapath, maps::Maps, sys};

/// The directory under the bpffs directory where the cgroup links are pinned (apart from the
/// interface links in `links/`, which are pruned by interface name).
pub const PIN_DIR: &str = "cgroup";

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A socket hook of socket-level balancing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockHook {
    Connect4,
    Sendmsg4,
    Recvmsg4,
    Getpeername4,
    /// The IPv6 hooks, for IPv4-mapped addresses on IPv6 sockets.
    Connect6,
    Sendmsg6,
    Recvmsg6,
    Getpeername6,
}

impl SockHook {
    /// In attach order: the programs that show frontends come before those that hide them, so
    /// that no socket is translated before its replies can be shown as the frontend's.
    pub const ALL: [Self; 8] = [
        Self::Getpeername4,
        Self::Recvmsg4,
        Self::Getpeername6,
        Self::Recvmsg6,
        Self::Sendmsg4,
        Self::Connect4,
        Self::Sendmsg6,
        Self::Connect6,
    ];

    /// Its link's pin name under [`PIN_DIR`].
    pub const fn pin_name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Sendmsg4 => "sendmsg4",
            Self::Recvmsg4 => "recvmsg4",
            Self::Getpeername4 => "getpeername4",
            Self::Connect6 => "connect6",
            Self::Sendmsg6 => "sendmsg6",
            Self::Recvmsg6 => "recvmsg6",
            Self::Getpeername6 => "getpeername6",
        }
    }

    /// Its program in the BPF object.
    pub const fn program(self) -> &'static str {
        match self {
            Self::Connect4 => programs::SOCK_CONNECT4,
            Self::Sendmsg4 => programs::SOCK_SENDMSG4,
            Self::Recvmsg4 => programs::SOCK_RECVMSG4,
            Self::Getpeername4 => programs::SOCK_GETPEERNAME4,
            Self::Connect6 => programs::SOCK_CONNECT6,
            Self::Sendmsg6 => programs::SOCK_SENDMSG6,
            Self::Recvmsg6 => programs::SOCK_RECVMSG6,
            Self::Getpeername6 => programs::SOCK_GETPEERNAME6,
        }
    }

    /// `bpf_attach_type` of the hook.
    const fn attach_type(self) -> u32 {
        match self {
            Self::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT as u32,
            Self::Sendmsg4 => bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG as u32,
            Self::Recvmsg4 => bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG as u32,
            Self::Getpeername4 => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME as u32,
            Self::Connect6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT as u32,
            Self::Sendmsg6 => bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG as u32,
            Self::Recvmsg6 => bpf_attach_type::BPF_CGROUP_UDP6_RECVMSG as u32,
            Self::Getpeername6 => bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME as u32,
        }
    }
}

/// The mount point of the cgroup v2 hierarchy in a `/proc/self/mountinfo` text: the one at
/// `/sys/fs/cgroup` when there is one there (a unified host), else the first (a hybrid host
/// mounts it at `/sys/fs/cgroup/unified`, beside the v1 controllers).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| {
            // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`
            let (head, tail) = line.split_once(" - ")?;
            if tail.split(' ').next()? != "cgroup2" {
                return None;
            }
            head.split(' ').nth(4).map(|p| p.replace("\\040", " "))
        })
        .collect();
    mounts
        .iter()
        .find(|p| *p == "/sys/fs/cgroup")
        .or_else(|| mounts.first())
        .map(PathBuf::from)
}

/// The host's cgroup v2 root (`--cgroup-root`'s default), from `/proc/self/mountinfo`.
/// When none is mounted (a cgroup v1-only host), mounts the v2 hierarchy at
/// [`FALLBACK_CGROUP2`]: every process is in its root, so the hooks see them all.
pub fn default_cgroup_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    if let Some(found) = cgroup2_mount(&mountinfo) {
        return Ok(found);
    }
    let dir = Path::new(FALLBACK_CGROUP2);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let target = std::ffi::CString::new(FALLBACK_CGROUP2).expect("no NUL");
    // SAFETY: plain mount(2) with valid C strings.
    let ret = unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "no cgroup v2 hierarchy is mounted and mounting one at {FALLBACK_CGROUP2} failed: \
                 mount one (`mount -t cgroup2 none DIR`) and pass --cgroup-root DIR"
            )
        });
    }
    tracing::info!(dir = FALLBACK_CGROUP2, "mounted the cgroup v2 hierarchy");
    Ok(dir.to_path_buf())
}

/// Where [`default_cgroup_root`] mounts the cgroup v2 hierarchy when the host has none mounted.
pub const FALLBACK_CGROUP2: &str = "/run/lb/cgroup2";

fn is_cgroup2(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we pass.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe {
        libc::statfs(path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

/// Attaches the socket programs of `datapath` to the cgroup v2 directory `cgroup`, pinning
/// their links under `<bpffs_dir>/cgroup/`; links pinned there by an earlier agent for the same
/// cgroup get the new programs in place.
pub fn attach(datapath: &mut Datapath, bpffs_dir: &Path, cgroup: &Path) -> Result<()> {
    if !is_cgroup2(cgroup) {
        bail!(
            "{} is not a cgroup v2 directory (--cgroup-root; on hybrid hosts the v2 hierarchy is \
             usually /sys/fs/cgroup/unified)",
            cgroup.display()
        );
    }
    let cgroup_file =
        File::open(cgroup).with_context(|| format!("cannot open {}", cgroup.display()))?;
    let cgroup_id = cgroup_file.metadata()?.ino();
    let dir = bpffs_dir.join(PIN_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for hook in SockHook::ALL {
        let prog = datapath.sock_program(hook.program())?;
        let path = dir.join(hook.pin_name());
        if std::fs::symlink_metadata(&path).is_ok() {
            match swap_into(prog, &path, hook, cgroup_id) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    warn!(pin = %path.display(), error = format!("{e:#}"), "pinned cgroup link unusable; attaching anew");
                }
            }
            // Another cgroup's (or a broken) link: unpinning detaches it.
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot unpin {}", path.display()))?;
        }
        let id = prog
            .attach(&cgroup_file, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {} to {}", hook.pin_name(), cgroup.display()))?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .context("cgroup attachment is no BPF link (kernel before 5.7?)")?;
        // Dropping the handle closes our descriptor; the pin keeps the link.
        link.pin(&path)
            .with_context(|| format!("cannot pin link at {}", path.display()))?;
    }
    Ok(())
}

/// Which sockets of the cgroup the hooks balance (`lb-agent --socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every process's, the node's and its pods'.
    On,
    /// The node's own network namespace only; pods' sockets are left to the packet path.
    HostOnly,
}

/// Tells the socket programs which network namespace is the node's (`host_netns`, see
/// [`netns_cookie`]) and which sockets they balance. Until this is written the programs treat
/// no namespace as the node's: they balance pods and node alike, but leave connected UDP
/// sockets and affinity or source-range frontends to the packet path.
pub fn configure(maps: &mut Maps, mode: Mode, host_netns: u64) -> Result<()> {
    let config = SockConfig {
        host_netns_cookie: host_netns,
        flags: match mode {
            Mode::On => 0,
            Mode::HostOnly => sock_flags::HOST_ONLY,
        },
        _pad: 0,
    };
    maps.sock_config
        .set(0, config, 0)
        .with_context(|| format!("writing {}", lb_common::maps::LB_SOCK_CONFIG))
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+), as
/// the socket programs' `bpf_get_netns_cookie` sees it.
pub fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .context("a socket to read the network namespace cookie from")?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// Swaps `prog` into the link pinned at `path` when it is `hook`'s link on cgroup `cgroup_id`
/// (true); false when it serves another cgroup or hook.
fn swap_into(
    prog: &mut CgroupSockAddr,
    path: &Path,
    hook: SockHook,
    cgroup_id: u64,
) -> Result<bool> {
    let link = sys::obj_get(path)?;
    let info = sys::link_info(link.as_fd())?;
    if info.link_type != bpf_link_type::BPF_LINK_TYPE_CGROUP as u32
        || info.attach_type != hook.attach_type()
        || info.cgroup_id != cgroup_id
    {
        return Ok(false);
    }
    sys::link_update(link.as_fd(), prog.fd()?.as_fd()).context("BPF_LINK_UPDATE")?;
    Ok(true)
}

/// The links pinned under `<bpffs_dir>/cgroup/`, with what the kernel says of them.
pub fn links(bpffs_dir: &Path) -> Result<Vec<(SockHook, CgroupLinkInfo)>> {
    let dir = bpffs_dir.join(PIN_DIR);
    let mut found = Vec::new();
    for hook in SockHook::ALL {
        let path = dir.join(hook.pin_name());
        if std::fs::symlink_metadata(&path).is_err() {
            continue;
        }
        let link = sys::obj_get(&path).with_context(|| format!("opening {}", path.display()))?;
        found.push((hook, sys::link_info(link.as_fd())?));
    }
    Ok(found)
}

/// Unpins every link under `<bpffs_dir>/cgroup/` (detaching the programs) and removes the
/// directory. Returns how many pins it removed.
pub fn detach(bpffs_dir: &Path) -> Result<usize> {
    let dir = bpffs_dir.join(PIN_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        std::fs::remove_file(entry.path())
            .with_context(|| format!("cannot unpin {}", entry.path().display()))?;
        removed += 1;
    }
    let _ = std::fs::remove_dir(&dir);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "\
24 30 0:22 / /run/a\\040b rw shared:5 - cgroup2 none rw
30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount("24 30 0:22 / /run/a\\040b rw shared:5 - cgroup2 none rw"),
            Some(PathBuf::from("/run/a b"))
        );
        assert_eq!(
            cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu"),
            None
        );
    }
}
