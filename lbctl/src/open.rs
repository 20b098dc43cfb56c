//! Opening the maps the agent pins on bpffs, read-only. Every failure says what to do about it:
//! mount a bpffs, start the agent or point `--bpffs-dir` elsewhere, run as root.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use lb_common::maps as names;
use lb_datapath::maps::{Maps, MapsError};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why the pinned datapath could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "no bpf filesystem is mounted at {dir}, so no datapath can be pinned there: mount one \
         (`mount -t bpf bpf /sys/fs/bpf`) and start lb-agent, or point --bpffs-dir at the \
         directory where the agent pins its maps"
    )]
    NotMounted { dir: PathBuf },
    #[error(
        "no datapath is pinned at {dir} ({detail}): is lb-agent running, or has it run since \
         boot? Point --bpffs-dir at the directory where the agent pins its maps (default {})",
        lb_datapath::loader::default_pin_dir().display()
    )]
    NoPins { dir: PathBuf, detail: Absent },
    #[error(
        "the datapath pinned at {dir} is incomplete: {} missing (an agent of another version, or \
         one that is starting?)",
        missing.join(", ")
    )]
    Incomplete {
        dir: PathBuf,
        missing: Vec<&'static str>,
    },
    #[error(
        "permission denied reading the datapath pinned at {dir}: lbctl needs root (CAP_BPF and \
         CAP_SYS_ADMIN)"
    )]
    Permission {
        dir: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot inspect {dir}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// Why nothing is pinned where lbctl looked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Absent {
    NotADirectory,
    NoDirectory,
    NoMaps,
}

impl std::fmt::Display for Absent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotADirectory => "it is not a directory",
            Self::NoDirectory => "the directory does not exist",
            Self::NoMaps => "none of the LB_* maps is there",
        })
    }
}

fn is_permission(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::PermissionDenied
        || matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

/// Whether `path` lives on a bpf filesystem.
fn on_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs only writes into the struct we pass; zeroed is a valid initial value.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Not `expect`: the cast is only unnecessary where f_type is already i64.
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between targets"
    )]
    Ok(buf.f_type as i64 == BPF_FS_MAGIC)
}

/// Opens the datapath's maps pinned under `dir` for reading, checking first that there is
/// something to open, so that every failure comes with what to do about it.
pub fn open(dir: &Path) -> Result<Maps, OpenError> {
    let io_err = |source: io::Error| {
        if is_permission(&source) {
            OpenError::Permission {
                dir: dir.to_owned(),
                source: Box::new(source),
            }
        } else {
            OpenError::Io {
                dir: dir.to_owned(),
                source,
            }
        }
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(OpenError::NoPins {
                dir: dir.to_owned(),
                detail: Absent::NotADirectory,
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A missing directory under a mounted bpffs means no agent pinned there; anywhere
            // else, the filesystem itself is missing.
            let mounted = dir
                .ancestors()
                .skip(1)
                .find(|a| a.exists())
                .is_some_and(|a| on_bpffs(a).unwrap_or(false));
            return Err(if mounted {
                OpenError::NoPins {
                    dir: dir.to_owned(),
                    detail: Absent::NoDirectory,
                }
            } else {
                OpenError::NotMounted {
                    dir: dir.to_owned(),
                }
            });
        }
        Err(e) => return Err(io_err(e)),
    }
    if !on_bpffs(dir).map_err(io_err)? {
        return Err(OpenError::NotMounted {
            dir: dir.to_owned(),
        });
    }
    let mut missing = Vec::new();
    for name in names::ALL {
        match std::fs::symlink_metadata(dir.join(name)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(name),
            Err(e) => return Err(io_err(e)),
        }
    }
    if missing.len() == names::ALL.len() {
        return Err(OpenError::NoPins {
            dir: dir.to_owned(),
            detail: Absent::NoMaps,
        });
    }
    if !missing.is_empty() {
        return Err(OpenError::Incomplete {
            dir: dir.to_owned(),
            missing,
        });
    }
    Maps::open_pinned(dir).map_err(|e| {
        if error_chain_has_permission(&e) {
            OpenError::Permission {
                dir: dir.to_owned(),
                source: Box::new(e),
            }
        } else {
            OpenError::Maps(e)
        }
    })
}

fn error_chain_has_permission(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.downcast_ref::<io::Error>().is_some_and(is_permission) {
            return true;
        }
        next = e.source();
    }
    false
}
