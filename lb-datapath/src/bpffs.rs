//! The bpffs the datapath is pinned on: a fresh node has /sys/fs/bpf but nothing mounted there,
//! so the agent mounts one, as a production agent must.

use std::{io, path::Path};

use anyhow::{Context as _, Result, bail};
use tracing::info;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

pub fn is_bpffs(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we pass.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe { libc::statfs(path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC }
}

/// Makes sure `dir` lives on a bpffs. A directory that can be created is, and a bpffs is mounted
/// on it unless it is on one already. One that cannot be created under an empty directory (a
/// fresh node's /sys/fs/bpf, a sysfs directory where nothing can be made) gets a bpffs mounted
/// on that directory first, where every tool looks for it.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    if is_bpffs(dir) {
        return Ok(());
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        let base = dir
            .ancestors()
            .skip(1)
            .find(|a| a.is_dir())
            .filter(|base| !is_bpffs(base) && is_empty_dir(base));
        let Some(base) = base else {
            return Err(e).with_context(|| format!("cannot create {}", dir.display()));
        };
        mount_bpffs(base)?;
        return std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create {} on the bpffs mounted on {}",
                dir.display(),
                base.display()
            )
        });
    }
    if is_bpffs(dir) {
        return Ok(());
    }
    mount_bpffs(dir)
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

fn mount_bpffs(dir: &Path) -> Result<()> {
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
