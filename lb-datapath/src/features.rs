//! What the running kernel offers, detected once at start. A feature the datapath can do
//! without is reported in one log line saying what the agent does instead; the agent never
//! refuses to start over one.
//!
//! | feature | since | without it |
//! |---|---|---|
//! | tcx (BPF links for tc) | 6.6 | classic tc: a clsact qdisc and cls_bpf filters at a fixed priority and handle, replaced in place by a restarted agent and recorded under `<bpffs>/links/` for `lb-agent cleanup` |
//! | batch map operations | 5.6 (hash), 5.7 (array) | maps are written and read one element at a time (a slower first sync) |
//!
//! What the programs themselves need (they do not load without it): bpf_loop (5.17),
//! bpf_ktime_get_coarse_ns (5.11), bpf_redirect_neigh (5.10), BPF_F_INNER_MAP (5.10), mmapable
//! arrays (5.5), XDP links (5.9). `LB_TC_API=netlink` (or `tcx`) overrides the choice of tc
//! API: the classic path can so be exercised on a kernel that has tcx.

use std::{
    fmt,
    os::fd::{AsFd as _, FromRawFd as _, OwnedFd},
    sync::OnceLock,
};

use aya::{
    programs::{SchedClassifier, TcAttachType},
    util::KernelVersion,
};
use tracing::{error, info, warn};

/// Environment variable overriding the tc API: `netlink` (classic clsact filters), `tcx`, or
/// `auto` (the default: tcx where the kernel has it).
pub const TC_API_VAR: &str = "LB_TC_API";

/// How tc programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcApi {
    /// BPF links (6.6+): pinned, swapped atomically with `BPF_LINK_UPDATE`.
    Tcx,
    /// Classic tc: cls_bpf filters under a clsact qdisc, made with netlink. They are not BPF
    /// links: they stay attached without any process or pin, until deleted.
    Netlink,
}

impl fmt::Display for TcApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "classic tc (clsact)",
        })
    }
}

/// The kernel's features, as far as the agent cares.
#[derive(Clone, Debug)]
pub struct Features {
    /// `major.minor.patch`, when the kernel says.
    pub kernel: Option<String>,
    /// Whether the kernel has tcx (probed, not guessed from the version).
    pub tcx: bool,
    /// What the agent uses.
    pub tc_api: TcApi,
    /// Why, when the choice was overridden with [`TC_API_VAR`].
    pub tc_override: Option<String>,
    /// `BPF_MAP_UPDATE_BATCH` on arrays.
    pub batch_ops: bool,
}

/// The oldest kernel the programs load on (bpf_ktime_get_coarse_ns).
const MIN_KERNEL: (u32, u32) = (5, 17);

impl Features {
    /// Probes the kernel (a few cheap syscalls).
    pub fn detect() -> Self {
        let version = KernelVersion::current().ok();
        let tcx = probe_tcx();
        let requested = std::env::var(TC_API_VAR).ok();
        let (tc_api, tc_override) = choose_tc_api(tcx, requested.as_deref());
        Self {
            kernel: version.map(|v| v.to_string()),
            tcx,
            tc_api,
            tc_override,
            batch_ops: probe_batch_ops(),
        }
    }

    /// One log line per missing feature (and per override), saying what is done instead.
    pub fn report(&self) {
        let kernel = self.kernel.as_deref().unwrap_or("(unknown version)");
        if let Some(version) = self.kernel.as_deref().and_then(major_minor)
            && version < MIN_KERNEL
        {
            error!(
                "kernel {kernel} is older than {}.{}: the datapath needs bpf_loop (5.17), bpf_ktime_get_coarse_ns (5.11), bpf_redirect_neigh and inner-map templates (5.10); loading it will fail",
                MIN_KERNEL.0, MIN_KERNEL.1
            );
        }
        if let Some(why) = &self.tc_override {
            warn!("{why}");
        }
        if !self.tcx {
            warn!(
                "kernel {kernel} has no tcx (6.6+): using classic tc filters (clsact qdisc, cls_bpf at priority {PRIORITY:#x}), replaced in place on restart and recorded for cleanup",
                PRIORITY = crate::tc_record::TC_PRIORITY
            );
        }
        if !self.batch_ops {
            warn!(
                "kernel {kernel} has no batch map operations: maps are written one element at a time (slower first sync)"
            );
        }
        info!(%kernel, tc = %self.tc_api, batch_ops = self.batch_ops, "kernel features");
    }
}

/// The tc API to use, once per process: the probe, unless [`TC_API_VAR`] says otherwise.
pub fn tc_api() -> TcApi {
    static API: OnceLock<TcApi> = OnceLock::new();
    *API.get_or_init(|| choose_tc_api(probe_tcx(), std::env::var(TC_API_VAR).ok().as_deref()).0)
}

/// The decision: tcx where the kernel has it, unless `requested` (the value of [`TC_API_VAR`])
/// asks for netlink; tcx cannot be forced onto a kernel without it. Also returns the line that
/// explains an override or a refused request.
pub fn choose_tc_api(has_tcx: bool, requested: Option<&str>) -> (TcApi, Option<String>) {
    let auto = if has_tcx { TcApi::Tcx } else { TcApi::Netlink };
    match requested.map(str::trim) {
        None | Some("" | "auto") => (auto, None),
        Some("netlink" | "classic") => (
            TcApi::Netlink,
            has_tcx.then(|| {
                format!(
                    "{TC_API_VAR}=netlink: using classic tc filters although the kernel has tcx"
                )
            }),
        ),
        Some("tcx") if has_tcx => (TcApi::Tcx, None),
        Some("tcx") => (
            TcApi::Netlink,
            Some(format!(
                "{TC_API_VAR}=tcx, but the kernel has no tcx: using classic tc filters"
            )),
        ),
        Some(other) => (
            auto,
            Some(format!(
                "{TC_API_VAR}={other:?} is not one of auto, netlink, tcx: ignored (using {auto})"
            )),
        ),
    }
}

fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// tcx exists when the kernel answers a tcx query (on the loopback, which every namespace has);
/// kernels before 6.6 reject the attach type.
fn probe_tcx() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

/// Batch updates exist when one succeeds on a fresh one-slot array.
fn probe_batch_ops() -> bool {
    /// The leading fields of `union bpf_attr` for `BPF_MAP_CREATE`.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        rest: [u8; 60],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
        rest: [0; 60],
    };
    // SAFETY: BPF_MAP_CREATE reads the attribute we pass, of the size we say.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            size_of::<MapCreate>() as libc::c_uint,
        )
    };
    if fd < 0 {
        // No BPF at all: loading the datapath will say why.
        return true;
    }
    // SAFETY: a new descriptor that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    crate::sys::map_update_batch(map.as_fd(), &[0u32], &[0u32]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcx_where_the_kernel_has_it_classic_tc_otherwise() {
        assert_eq!(choose_tc_api(true, None), (TcApi::Tcx, None));
        assert_eq!(choose_tc_api(false, None), (TcApi::Netlink, None));
        assert_eq!(choose_tc_api(true, Some("auto")), (TcApi::Tcx, None));
    }

    #[test]
    fn netlink_can_be_forced_and_tcx_cannot() {
        let (api, why) = choose_tc_api(true, Some("netlink"));
        assert_eq!(api, TcApi::Netlink);
        assert!(why.unwrap().contains("although the kernel has tcx"));
        // Already the default there: nothing to say.
        assert_eq!(
            choose_tc_api(false, Some("netlink")),
            (TcApi::Netlink, None)
        );
        let (api, why) = choose_tc_api(false, Some("tcx"));
        assert_eq!(api, TcApi::Netlink);
        assert!(why.unwrap().contains("no tcx"));
        assert_eq!(choose_tc_api(true, Some("tcx")), (TcApi::Tcx, None));
    }

    #[test]
    fn unknown_requests_are_reported_and_ignored() {
        let (api, why) = choose_tc_api(false, Some("bogus"));
        assert_eq!(api, TcApi::Netlink);
        assert!(why.unwrap().contains("\"bogus\""));
    }

    #[test]
    fn kernel_versions_compare_by_major_and_minor() {
        assert_eq!(major_minor("6.1.192"), Some((6, 1)));
        assert!(major_minor("5.10.0").unwrap() < MIN_KERNEL);
        assert!(major_minor("6.1.0").unwrap() >= MIN_KERNEL);
        assert_eq!(major_minor("x"), None);
    }
}
