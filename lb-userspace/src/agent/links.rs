//! Attaching the programs to interfaces so that they outlive the agent: every link is pinned
//! under `<bpffs>/links/`, and a starting agent swaps its own programs into the links it finds
//! (`BPF_LINK_UPDATE`, atomic: no packet goes unbalanced during an upgrade). Also the bpffs
//! mount, pod-interface discovery and `lb-agent cleanup`.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};
use tracing::{info, warn};

use super::config::XdpMode;
use crate::datapath::{Datapath, has_tcx};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we pass.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe { libc::statfs(path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `dir` lives on a bpffs: creates it, and mounts a bpffs there when the filesystem
/// it is on is not one (a fresh node has /sys/fs/bpf but nothing mounted on it).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if is_bpffs(dir) {
        return Ok(());
    }
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: plain mount(2) with valid C strings.
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        bail!(
            "{} is not on a bpffs and mounting one there failed: {}",
            dir.display(),
            io::Error::last_os_error()
        );
    }
    info!(dir = %dir.display(), "mounted bpffs");
    Ok(())
}

/// Which hook a link serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    PodIngress,
    PodEgress,
    /// XDP on an uplink.
    ExtXdp,
    /// tc ingress of an uplink (instead of XDP).
    ExtIngress,
    /// tc egress of an uplink.
    ExtEgress,
}

impl Hook {
    const fn suffix(self) -> &'static str {
        match self {
            Self::PodIngress => "from-pod",
            Self::PodEgress => "to-pod",
            Self::ExtXdp => "xdp",
            Self::ExtIngress => "ext-in",
            Self::ExtEgress => "ext-out",
        }
    }
}

/// How an uplink's ingress ended up being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressHook {
    XdpNative,
    XdpGeneric,
    Tc,
}

/// The pinned links of one agent.
pub struct Links {
    dir: PathBuf,
    /// Interface -> pins of its links (the pins keep the links, and so the programs, alive).
    attached: BTreeMap<String, Vec<PathBuf>>,
}

impl Links {
    pub fn new(bpffs_dir: &Path) -> Result<Self> {
        let dir = bpffs_dir.join("links");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            dir,
            attached: BTreeMap::new(),
        })
    }

    pub fn is_attached(&self, iface: &str) -> bool {
        self.attached.contains_key(iface)
    }

    pub fn interfaces(&self) -> impl Iterator<Item = &String> {
        self.attached.keys()
    }

    fn pin_path(&self, iface: &str, hook: Hook) -> PathBuf {
        self.dir.join(pin_name(iface, hook))
    }

    /// Attaches both pod programs to `iface`, reusing the pinned links a previous agent left
    /// there when they still work.
    pub fn attach_pod_iface(&mut self, datapath: &mut Datapath, iface: &str) -> Result<()> {
        if !has_tcx() {
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
        }
        let mut links = Vec::new();
        for (hook, attach_type) in [
            (Hook::PodIngress, TcAttachType::Ingress),
            (Hook::PodEgress, TcAttachType::Egress),
        ] {
            let prog = match attach_type {
                TcAttachType::Ingress => datapath.from_pod(),
                _ => datapath.to_pod(),
            };
            let path = self.pin_path(iface, hook);
            attach_tc(prog, iface, attach_type, &path)
                .with_context(|| format!("attaching to {iface} ({})", hook.suffix()))?;
            links.push(path);
        }
        self.attached.insert(iface.to_owned(), links);
        Ok(())
    }

    /// Attaches the uplink programs to `iface`: XDP (native where the driver supports it, else
    /// generic, as `mode` says) with the tc ingress program behind it (alone when XDP is off or
    /// unavailable), and the tc egress program that restores the frontend on this node's
    /// backends' replies.
    pub fn attach_external_iface(
        &mut self,
        datapath: &mut Datapath,
        iface: &str,
        mode: XdpMode,
    ) -> Result<IngressHook> {
        if !has_tcx() {
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
        }
        let mut links = Vec::new();
        let egress = self.pin_path(iface, Hook::ExtEgress);
        attach_tc(datapath.ext_out(), iface, TcAttachType::Egress, &egress)
            .with_context(|| format!("attaching to {iface} (ext-out)"))?;
        links.push(egress);

        let xdp_pin = self.pin_path(iface, Hook::ExtXdp);
        let tc_pin = self.pin_path(iface, Hook::ExtIngress);
        let xdp = match mode {
            XdpMode::Off => None,
            XdpMode::Native => Some(
                attach_xdp(datapath.xdp(), iface, AyaXdpMode::Driver, &xdp_pin)
                    .map(|()| IngressHook::XdpNative)
                    .with_context(|| format!("native XDP on {iface} (--xdp-mode native)"))?,
            ),
            XdpMode::Generic => Some(
                attach_xdp(datapath.xdp(), iface, AyaXdpMode::Skb, &xdp_pin)
                    .map(|()| IngressHook::XdpGeneric)
                    .with_context(|| format!("generic XDP on {iface}"))?,
            ),
            XdpMode::Auto => {
                match attach_xdp(datapath.xdp(), iface, AyaXdpMode::Driver, &xdp_pin) {
                    Ok(()) => Some(IngressHook::XdpNative),
                    Err(native) => {
                        match attach_xdp(datapath.xdp(), iface, AyaXdpMode::Skb, &xdp_pin) {
                            Ok(()) => {
                                info!(%iface, reason = format!("{native:#}"), "no native XDP here; using generic XDP");
                                Some(IngressHook::XdpGeneric)
                            }
                            Err(generic) => {
                                warn!(%iface, error = format!("{generic:#}"), "cannot attach XDP; using tc ingress instead");
                                None
                            }
                        }
                    }
                }
            }
        };
        // The tc ingress program runs in every case: alone when XDP is off, and behind XDP to
        // take the packets XDP leaves to it (those whose next hop's MAC is not known yet).
        attach_tc(datapath.ext_in(), iface, TcAttachType::Ingress, &tc_pin)
            .with_context(|| format!("attaching to {iface} (ext-in)"))?;
        links.push(tc_pin);
        let hook = match xdp {
            Some(hook) => {
                links.push(xdp_pin);
                hook
            }
            None => {
                // An earlier agent may have attached XDP here.
                let _ = std::fs::remove_file(&xdp_pin);
                IngressHook::Tc
            }
        };
        self.attached.insert(iface.to_owned(), links);
        Ok(hook)
    }

    /// Forgets an interface that went away (its links died with it) and removes its pins.
    pub fn forget(&mut self, iface: &str) {
        for path in self.attached.remove(iface).into_iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Removes pins of interfaces that no longer exist (left by an earlier agent).
    pub fn prune_stale_pins(&self, existing: &[String]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let iface = pinned_iface(&name);
            if !existing.contains(&iface) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// A link's pin name. bpffs refuses dots in names (they are reserved for its own files), and
/// interface names may hold some (VLANs: `eth0.100`), so dots are written `%`.
fn pin_name(iface: &str, hook: Hook) -> String {
    format!("{}@{}", iface.replace('.', "%"), hook.suffix())
}

/// The interface a pin name belongs to.
fn pinned_iface(pin: &str) -> String {
    pin.rsplit_once('@')
        .map_or(pin, |(i, _)| i)
        .replace('%', ".")
}

/// Attaches `prog` at `iface`/`attach_type` through the link pinned at `path` when there is a
/// live one (an atomic program swap), else through a new link pinned there.
fn attach_tc(
    prog: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
    path: &Path,
) -> Result<()> {
    if path.exists() {
        match reuse_tc_link(prog, path) {
            Ok(()) => return Ok(()),
            Err(e) => {
                warn!(pin = %path.display(), error = %e, "pinned link unusable (interface recreated?); attaching anew");
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let id = prog.attach(iface, attach_type)?;
    let link = prog.take_link(id)?;
    let fd_link = FdLink::try_from(link)
        .map_err(|e| anyhow::anyhow!("tc link is not a BPF link (kernel without tcx?): {e}"))?;
    // Dropping the handle closes our descriptor; the pin keeps the link.
    fd_link
        .pin(path)
        .with_context(|| format!("cannot pin link at {}", path.display()))?;
    Ok(())
}

/// Attaches XDP `prog` in `mode`, through the link pinned at `path` when there is a live one.
/// (A pinned link keeps the mode it was created with.)
fn attach_xdp(prog: &mut Xdp, iface: &str, mode: AyaXdpMode, path: &Path) -> Result<()> {
    if path.exists() {
        let reused = PinnedLink::from_pin(path)
            .map_err(anyhow::Error::from)
            .and_then(|pinned| {
                let link = XdpLink::try_from(FdLink::from(pinned))?;
                let id = prog.attach_to_link(link)?;
                drop(prog.take_link(id)?);
                Ok(())
            });
        match reused {
            Ok(()) => return Ok(()),
            Err(e) => {
                warn!(pin = %path.display(), error = %e, "pinned XDP link unusable; attaching anew");
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let id = prog.attach(iface, mode)?;
    let link = prog.take_link(id)?;
    let fd_link = FdLink::try_from(link)
        .map_err(|e| anyhow::anyhow!("XDP link is not a BPF link (kernel before 5.9?): {e}"))?;
    fd_link
        .pin(path)
        .with_context(|| format!("cannot pin link at {}", path.display()))?;
    Ok(())
}

/// Swaps `prog` into the link pinned at `path` (BPF_LINK_UPDATE).
fn reuse_tc_link(prog: &mut SchedClassifier, path: &Path) -> Result<()> {
    let fd_link: FdLink = PinnedLink::from_pin(path)?.into();
    let link = SchedClassifierLink::try_from(fd_link)?;
    let id = prog.attach_to_link(link)?;
    // Keep the program from detaching the link when it is dropped: the pin owns it.
    drop(prog.take_link(id)?);
    Ok(())
}

/// `lb-agent cleanup`: unpins every link (detaching the programs) and every map, then removes
/// the directory. The bpffs mount stays.
pub fn cleanup(bpffs_dir: &Path) -> Result<()> {
    if !bpffs_dir.exists() {
        println!(
            "nothing to clean up: {} does not exist",
            bpffs_dir.display()
        );
        return Ok(());
    }
    let links = bpffs_dir.join("links");
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot unpin {}", entry.path().display()))?;
            removed += 1;
        }
        let _ = std::fs::remove_dir(&links);
    }
    for name in lb_common::maps::ALL {
        let path = bpffs_dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot unpin {}", path.display()))?;
            removed += 1;
        }
    }
    let _ = std::fs::remove_dir(bpffs_dir);
    println!(
        "removed {removed} pinned objects under {}",
        bpffs_dir.display()
    );
    Ok(())
}

/// Names of the interfaces of the calling thread's network namespace.
pub fn interfaces() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut cursor = list;
        while (*cursor).if_index != 0 {
            names.push(
                CStr::from_ptr((*cursor).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            cursor = cursor.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

/// A netlink socket subscribed to link changes: readable whenever an interface appears, goes
/// away or changes, so pod interfaces are attached as soon as they exist.
pub fn link_events() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_nl is valid; we set family and groups.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    // SAFETY: binding our socket to a properly sized sockaddr_nl.
    let ret = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// Blocks until the next batch of link events (its content does not matter: the caller
/// re-scans the interfaces).
pub fn wait_link_event(socket: &OwnedFd) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    // SAFETY: reading into our buffer.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `iface` matches one of the `--pod-ifaces` globs.
pub fn matches_any(patterns: &[glob::Pattern], iface: &str) -> bool {
    patterns.iter().any(|p| p.matches(iface))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_avoid_dots_and_map_back_to_the_interface() {
        let name = pin_name("eth0.100", Hook::PodIngress);
        assert!(!name.contains('.'), "{name}");
        assert_eq!(pinned_iface(&name), "eth0.100");
        assert_eq!(
            pinned_iface(&pin_name("cali12ab", Hook::PodEgress)),
            "cali12ab"
        );
    }
}
