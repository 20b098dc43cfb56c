//! Attaching the programs to interfaces so that they outlive the agent: every link is pinned
//! under `<bpffs>/links/`, and a starting agent swaps its own programs into the links it finds
//! (`BPF_LINK_UPDATE`, atomic: no packet goes unbalanced during an upgrade). Also the bpffs
//! mount, pod-interface discovery and `lb-agent cleanup`.
//!
//! Kernels without tcx (before 6.6) get classic tc filters instead (clsact + cls_bpf, made with
//! netlink). Those are not BPF links and cannot be pinned, but they stay attached on their own.
//! Each hook has a fixed priority and handle, so a starting agent replaces its predecessor's
//! filter in place (atomically, like a link update) instead of adding a second one; and each
//! filter is recorded under `<bpffs>/links/` as a symlink whose target describes it
//! ([`TcRecord`]), which `lb-agent cleanup` reads to delete it.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
    links::{FdLink, Link as _, LinkOrder, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    xdp::XdpLink,
};
use tracing::{info, warn};

use super::{config::XdpMode, features::TcApi};
use crate::datapath::Datapath;

/// Priority of the agent's classic tc filters (one per hook and interface): below tc's
/// automatic priorities (49152 and down), so they run before filters added without one.
pub const TC_PRIORITY: u16 = 0x4c42;
/// Handle of the agent's classic tc filters.
pub const TC_HANDLE: TcHandle = TcHandle::new(0, 0x4c42);

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

/// The pinned links (or recorded classic tc filters) of one agent.
pub struct Links {
    dir: PathBuf,
    /// How tc programs are attached.
    tc_api: TcApi,
    /// Interface -> pins of its links (the pins keep the links, and so the programs, alive), or
    /// records of its tc filters.
    attached: BTreeMap<String, Vec<PathBuf>>,
}

impl Links {
    pub fn new(bpffs_dir: &Path, tc_api: TcApi) -> Result<Self> {
        let dir = bpffs_dir.join("links");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self {
            dir,
            tc_api,
            attached: BTreeMap::new(),
        })
    }

    /// How this agent attaches tc programs.
    pub fn tc_api(&self) -> TcApi {
        self.tc_api
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
            attach_tc(self.tc_api, prog, iface, attach_type, &path)
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
        let mut links = Vec::new();
        let egress = self.pin_path(iface, Hook::ExtEgress);
        attach_tc(
            self.tc_api,
            datapath.ext_out(),
            iface,
            TcAttachType::Egress,
            &egress,
        )
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
            // Native XDP where a NIC driver offers it; tc alone everywhere else. Generic XDP is
            // never chosen: it runs on the same skbs as tc, later than XDP and no faster, and
            // sees GSO packets with partial checksums (see `xdp_is_safe`).
            XdpMode::Auto => match xdp_is_safe(iface) {
                Err(reason) => {
                    info!(%iface, reason, "XDP off here; tc serves this interface (--xdp-mode native forces XDP)");
                    None
                }
                Ok(()) => match attach_xdp(datapath.xdp(), iface, AyaXdpMode::Driver, &xdp_pin) {
                    Ok(()) => Some(IngressHook::XdpNative),
                    Err(native) => {
                        info!(%iface, reason = format!("{native:#}"), "no native XDP here; tc serves this interface");
                        None
                    }
                },
            },
        };
        // The tc ingress program runs in every case: alone when XDP is off, and behind XDP to
        // take the packets XDP leaves to it (those whose next hop's MAC is not known yet).
        attach_tc(
            self.tc_api,
            datapath.ext_in(),
            iface,
            TcAttachType::Ingress,
            &tc_pin,
        )
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

/// Attaches `prog` at `iface`/`attach_type` with `api`, leaving a pin (tcx) or a record
/// (classic tc) at `path`. What an earlier agent left there is taken over in place; what it
/// left with the other API is removed first.
fn attach_tc(
    api: TcApi,
    prog: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
    path: &Path,
) -> Result<()> {
    match api {
        TcApi::Tcx => {
            if let Some(record) = TcRecord::read(path) {
                // A classic filter from an agent that ran without tcx.
                let _ = record.detach();
                let _ = std::fs::remove_file(path);
            }
            attach_tcx(prog, iface, attach_type, path)
        }
        TcApi::Netlink => {
            if TcRecord::read(path).is_none() && std::fs::symlink_metadata(path).is_ok() {
                // A tcx link pinned by an agent that used tcx: unpinning detaches it.
                let _ = std::fs::remove_file(path);
            }
            attach_netlink(prog, iface, attach_type, path)
        }
    }
}

/// Attaches through the tcx link pinned at `path` when there is a live one (an atomic program
/// swap), else through a new link pinned there.
fn attach_tcx(
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
    let id = prog.attach_with_options(
        iface,
        attach_type,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )?;
    let link = prog.take_link(id)?;
    let fd_link = FdLink::try_from(link)
        .map_err(|e| anyhow::anyhow!("tc link is not a BPF link (kernel without tcx?): {e}"))?;
    // Dropping the handle closes our descriptor; the pin keeps the link.
    fd_link
        .pin(path)
        .with_context(|| format!("cannot pin link at {}", path.display()))?;
    Ok(())
}

/// Attaches a classic tc filter (clsact qdisc, cls_bpf in direct-action mode) at the fixed
/// priority and handle: replaces the filter there when an earlier agent left one (atomic: the
/// kernel swaps the program under RCU), creates it otherwise. Records it at `path`.
fn attach_netlink(
    prog: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
    path: &Path,
) -> Result<()> {
    // clsact may already exist (an earlier agent, another program): that is fine.
    let _ = aya::programs::tc::qdisc_add_clsact(iface);
    let replace = |prog: &mut SchedClassifier| {
        let existing =
            SchedClassifierLink::attached(iface, attach_type, TC_PRIORITY, TC_HANDLE, None)
                .map_err(|e| ProgramError::from(TcError::IoError(e)))?;
        // Without NLM_F_CREATE: changes the filter at that priority and handle, or fails
        // with ENOENT when there is none.
        prog.attach_to_link(existing)
    };
    let create = |prog: &mut SchedClassifier| {
        // NLM_F_CREATE | NLM_F_EXCL: fails with EEXIST when the filter exists.
        prog.attach_with_options(
            iface,
            attach_type,
            TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIORITY,
                handle: TC_HANDLE,
                classid: None,
            }),
        )
    };
    let id = match replace(prog) {
        Ok(id) => id,
        Err(e) if netlink_errno(&e) == Some(libc::ENOENT) => match create(prog) {
            Ok(id) => id,
            // Created by someone else in between: take it over.
            Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => replace(prog)?,
            Err(e) => return Err(e.into()),
        },
        Err(e) => return Err(e.into()),
    };
    let link = prog.take_link(id)?;
    // Dropping the link would delete the filter: it must outlive the agent, as pinned links do.
    std::mem::forget(link);
    TcRecord::here(iface, attach_type)?.write(path)
}

/// The errno of a failed netlink request, if that is what failed.
fn netlink_errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(TcError::NetlinkError(e)) | ProgramError::NetlinkError(e) => {
            e.raw_os_error()
        }
        _ => None,
    }
}

/// A classic tc filter of the agent, as recorded under `<bpffs>/links/`: in the target of a
/// symlink (bpffs holds no regular files), `tc:<ingress|egress>:<ifindex>:<netns inode>`.
/// The priority and handle are [`TC_PRIORITY`] and [`TC_HANDLE`]; the interface is in the
/// record's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcRecord {
    pub iface: String,
    pub attach_type: TcAttachType,
    pub ifindex: u32,
    /// Inode of the network namespace the interface is in.
    pub netns: u64,
}

impl TcRecord {
    /// A record of the filter at `iface`/`attach_type` in the calling thread's namespace.
    fn here(iface: &str, attach_type: TcAttachType) -> Result<Self> {
        Ok(Self {
            iface: iface.to_owned(),
            attach_type,
            ifindex: ifindex(iface).with_context(|| format!("{iface} has no index"))?,
            netns: current_netns()?,
        })
    }

    fn target(&self) -> String {
        let direction = match self.attach_type {
            TcAttachType::Ingress => "ingress",
            _ => "egress",
        };
        format!("tc:{direction}:{}:{}", self.ifindex, self.netns)
    }

    fn parse(iface: &str, target: &str) -> Option<Self> {
        let mut parts = target.strip_prefix("tc:")?.split(':');
        let attach_type = match parts.next()? {
            "ingress" => TcAttachType::Ingress,
            "egress" => TcAttachType::Egress,
            _ => return None,
        };
        let ifindex = parts.next()?.parse().ok()?;
        let netns = parts.next()?.parse().ok()?;
        parts.next().is_none().then(|| Self {
            iface: iface.to_owned(),
            attach_type,
            ifindex,
            netns,
        })
    }

    /// The record at `path`, if that is one (not a pinned link).
    pub fn read(path: &Path) -> Option<Self> {
        let target = std::fs::read_link(path).ok()?;
        let name = path.file_name()?.to_str()?;
        Self::parse(&pinned_iface(name), target.to_str()?)
    }

    /// Writes the record at `path`, replacing what is there in one rename.
    fn write(&self, path: &Path) -> Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push("+new");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(self.target(), &tmp)
            .and_then(|()| std::fs::rename(&tmp, path))
            .with_context(|| format!("cannot record the tc filter at {}", path.display()))
    }

    /// Deletes the filter, in the calling thread's namespace if it is the recorded one, else in
    /// the named namespace (`/run/netns/*`) that is. `Ok(false)`: it was already gone (the
    /// interface went away, or the filter was deleted); an error when its namespace cannot be
    /// found.
    pub fn detach(&self) -> Result<bool> {
        if current_netns()? == self.netns {
            return self.detach_here();
        }
        let path = find_named_netns(self.netns).with_context(|| {
            format!(
                "the tc filters of {} are in another network namespace (inode {}) with no name under /run/netns: they go when the interface does",
                self.iface, self.netns
            )
        })?;
        let ns = std::fs::File::open(&path)?;
        let record = self.clone();
        std::thread::spawn(move || {
            // SAFETY: setns on a namespace file we hold open; affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error().into());
            }
            record.detach_here()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("detaching thread panicked"))?
    }

    fn detach_here(&self) -> Result<bool> {
        if ifindex(&self.iface) != Some(self.ifindex) {
            // The interface went away (or was recreated): so did the filter.
            return Ok(false);
        }
        let link = SchedClassifierLink::attached(
            &self.iface,
            self.attach_type,
            TC_PRIORITY,
            TC_HANDLE,
            None,
        )?;
        match link.detach() {
            Ok(()) => Ok(true),
            Err(e) if netlink_errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(anyhow::Error::from(e).context(format!(
                "cannot delete the tc filter of {} ({:?})",
                self.iface, self.attach_type
            ))),
        }
    }
}

fn ifindex(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Inode of the calling thread's network namespace.
fn current_netns() -> Result<u64> {
    Ok(std::fs::metadata("/proc/thread-self/ns/net")
        .context("cannot read this thread's network namespace")?
        .ino())
}

/// The `/run/netns/*` handle of the namespace with inode `netns`.
fn find_named_netns(netns: u64) -> Option<PathBuf> {
    std::fs::read_dir("/run/netns")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == netns))
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
    let mut filters = 0;
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            // A classic tc filter is deleted explicitly; a pinned link detaches when unpinned.
            if let Some(record) = TcRecord::read(&entry.path()) {
                match record.detach() {
                    Ok(true) => filters += 1,
                    Ok(false) => {}
                    Err(e) => eprintln!("warning: {e:#}"),
                }
            }
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
        "removed {removed} pinned objects under {}{}",
        bpffs_dir.display(),
        if filters > 0 {
            format!(" and deleted {filters} classic tc filters")
        } else {
            String::new()
        }
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

/// Whether an XDP program can translate what `iface` receives. A NIC hands XDP frames as they
/// came off the wire: complete checksums, nothing larger than the MTU (drivers turn receive
/// offloads off while a program is attached). A virtual interface (veth, the uplink of a node
/// that is itself a container, as in kind) hands it its peer's skbs as they are: GSO packets of
/// up to 64 KiB whose TCP/UDP checksum holds only the pseudo-header sum. XDP cannot see that
/// state; every address or port it rewrites would leave a wrong checksum behind. Interfaces
/// backed by a bus device (`/sys/class/net/<iface>/device`) are NICs; the others are virtual.
fn xdp_is_safe(iface: &str) -> Result<(), &'static str> {
    if std::path::Path::new("/sys/class/net")
        .join(iface)
        .join("device")
        .exists()
    {
        Ok(())
    } else {
        Err(
            "virtual interface: its peer sends GSO packets with partial checksums, which XDP cannot translate",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_records_read_back() {
        let record = TcRecord {
            iface: "eth0.100".into(),
            attach_type: TcAttachType::Egress,
            ifindex: 42,
            netns: 4_026_531_840,
        };
        assert_eq!(record.target(), "tc:egress:42:4026531840");
        assert_eq!(
            TcRecord::parse("eth0.100", &record.target()),
            Some(record.clone())
        );
        assert_eq!(TcRecord::parse("x", "tc:sideways:1:2"), None);
        assert_eq!(TcRecord::parse("x", "tc:ingress:1:2:3"), None);
        assert_eq!(TcRecord::parse("x", "/sys/fs/bpf/elsewhere"), None);
    }

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
