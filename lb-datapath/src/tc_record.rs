//! Classic tc filters (clsact + cls_bpf, made with netlink) on kernels without tcx (before 6.6).
//! They are not BPF links and cannot be pinned, but they stay attached on their own. Each hook
//! has a fixed priority and handle, so a starting agent replaces its predecessor's filter in
//! place (atomically, like a link update) instead of adding a second one; and each filter is
//! recorded under `<bpffs>/links/` as a symlink whose target describes it ([`TcRecord`]), which
//! cleanup reads to delete it.

use std::{
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::attach::pinned_iface;
use aya::programs::{
    ProgramError, TcAttachType,
    links::Link as _,
    tc::{SchedClassifierLink, TcError, TcHandle},
};

/// Priority of the agent's classic tc filters (one per hook and interface): below tc's
/// automatic priorities (49152 and down), so they run before filters added without one.
pub const TC_PRIORITY: u16 = 0x4c42;
/// Handle of the agent's classic tc filters.
pub const TC_HANDLE: TcHandle = TcHandle::new(0, 0x4c42);

/// The errno of a failed netlink request, if that is what failed.
pub(crate) fn netlink_errno(e: &ProgramError) -> Option<i32> {
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
    pub(crate) fn here(iface: &str, attach_type: TcAttachType) -> Result<Self> {
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
    pub(crate) fn write(&self, path: &Path) -> Result<()> {
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
}
