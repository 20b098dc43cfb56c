//! Attaching the programs to interfaces so that they outlive the process that attached them:
//! every link is pinned under `<bpffs>/links/`, and a starting agent swaps its own programs into
//! the links it finds (`BPF_LINK_UPDATE`, atomic: no packet goes unbalanced during an upgrade).
//! Kernels without tcx get classic tc filters instead ([`crate::tc_record`]). [`cleanup`]
//! removes every link and map again.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
    links::{FdLink, LinkOrder, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
    xdp::XdpLink,
};
use tracing::{info, warn};

use crate::{
    features::TcApi,
    loader::Datapath,
    tc_record::{TC_HANDLE, TC_PRIORITY, TcRecord, netlink_errno},
};

/// How XDP serves an uplink's ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkXdp {
    /// No XDP: the tc ingress program alone.
    Off,
    /// Driver (native) mode; an error where the driver has none.
    Native,
    /// Generic (skb) mode.
    Generic,
    /// Driver mode where the driver has it, else tc alone.
    NativeIfAvailable,
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

    /// Attaches the uplink programs to `iface`: XDP as `mode` says, with the tc ingress program behind it (alone when XDP is off or
    /// unavailable), and the tc egress program that restores the frontend on this node's
    /// backends' replies.
    pub fn attach_external_iface(
        &mut self,
        datapath: &mut Datapath,
        iface: &str,
        mode: UplinkXdp,
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
            UplinkXdp::Off => None,
            UplinkXdp::Native => Some(
                attach_xdp(datapath.xdp(), iface, AyaXdpMode::Driver, &xdp_pin)
                    .map(|()| IngressHook::XdpNative)
                    .with_context(|| format!("native XDP on {iface} (--xdp-mode native)"))?,
            ),
            UplinkXdp::Generic => Some(
                attach_xdp(datapath.xdp(), iface, AyaXdpMode::Skb, &xdp_pin)
                    .map(|()| IngressHook::XdpGeneric)
                    .with_context(|| format!("generic XDP on {iface}"))?,
            ),
            UplinkXdp::NativeIfAvailable => {
                match attach_xdp(datapath.xdp(), iface, AyaXdpMode::Driver, &xdp_pin) {
                    Ok(()) => Some(IngressHook::XdpNative),
                    Err(native) => {
                        info!(%iface, reason = format!("{native:#}"), "no native XDP here; tc serves this interface");
                        None
                    }
                }
            }
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
pub(crate) fn pinned_iface(pin: &str) -> String {
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
    pin_link(
        prog.take_link(id)?,
        path,
        "tc link is not a BPF link (kernel without tcx?)",
    )
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
    pin_link(
        prog.take_link(id)?,
        path,
        "XDP link is not a BPF link (kernel before 5.9?)",
    )
}

/// Pins the link of a new attachment at `path`; `not_bpf_link` says what it means when the
/// kernel made it no BPF link.
fn pin_link<L>(link: L, path: &Path, not_bpf_link: &str) -> Result<()>
where
    FdLink: TryFrom<L, Error: std::fmt::Display>,
{
    let fd_link = FdLink::try_from(link).map_err(|e| anyhow::anyhow!("{not_bpf_link}: {e}"))?;
    // Dropping the handle closes our descriptor; the pin keeps the link.
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

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Whether there was a directory to clean up.
    pub existed: bool,
    /// Pins removed (links, tc records and maps).
    pub removed: usize,
    /// Classic tc filters deleted.
    pub filters: usize,
    /// Filters that could not be deleted, and why (their records are removed all the same).
    pub warnings: Vec<String>,
}

/// Unpins every link (detaching the programs; the socket programs' cgroup links too) and every
/// map under `bpffs_dir`, deleting the
/// classic tc filters recorded there, then removes the directory. The bpffs mount stays.
pub fn cleanup(bpffs_dir: &Path) -> Result<Cleanup> {
    let mut done = Cleanup::default();
    if !bpffs_dir.exists() {
        return Ok(done);
    }
    done.existed = true;
    let links = bpffs_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for entry in entries.flatten() {
            // A classic tc filter is deleted explicitly; a pinned link detaches when unpinned.
            if let Some(record) = TcRecord::read(&entry.path()) {
                match record.detach() {
                    Ok(true) => done.filters += 1,
                    Ok(false) => {}
                    Err(e) => done.warnings.push(format!("{e:#}")),
                }
            }
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot unpin {}", entry.path().display()))?;
            done.removed += 1;
        }
        let _ = std::fs::remove_dir(&links);
    }
    done.removed += crate::socket_lb::detach(bpffs_dir)?;
    for name in lb_common::maps::ALL
        .iter()
        .chain(&lb_common::maps::TAIL_CALLS)
        .chain(&[crate::ct_carry::OLD_PIN])
    {
        let path = bpffs_dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot unpin {}", path.display()))?;
            done.removed += 1;
        }
    }
    let _ = std::fs::remove_dir(bpffs_dir);
    Ok(done)
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
