//! Shared by `lbctl`'s tests: the privilege gate and a routed network namespace, a private bpffs,
//! the datapath with its maps pinned there and programmed through the agent's planner and writer
//! ([`lb_datapath::program`]), running the real binary, and building services.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod trace;

use std::{
    ffi::CString,
    net::{Ipv4Addr, SocketAddrV4},
    ops::{Deref, DerefMut},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::lpm_trie::Key;
use lb_common::{Be32, maps::SourceRange};
use lb_datapath::{
    Capacities, Pinning,
    program::{BackendSpec, FrontendKind, FrontendSpec, ServiceSpec},
    testing::Harness,
};
use serde_json::Value;

/// Runs `test` on a thread of its own, in a new network namespace where every destination is
/// routed out of `up0` to a neighbour with a permanent MAC, and re-raises its panic. Nothing
/// runs when privileged tests are skipped.
pub fn in_routed_netns(test: impl FnOnce() + Send + 'static) {
    if !lb_testbed::privileges::require() {
        return;
    }
    let result = std::thread::spawn(move || {
        // SAFETY: plain syscall; it moves only this thread (and the processes it spawns).
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        // `ip` and `sysctl` started from this thread run in its namespace.
        for args in [
            "link add up0 type veth peer name up0p",
            "link set up0p up",
            "link set up0 address 02:00:00:00:00:01 up",
            "addr add 10.255.0.1/24 dev up0",
            "neigh add 10.255.0.2 lladdr 02:00:00:00:00:02 dev up0 nud permanent",
            "route add default via 10.255.0.2",
        ] {
            let status = Command::new("ip").args(args.split(' ')).status().unwrap();
            assert!(status.success(), "ip {args}");
        }
        let status = Command::new("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .status()
            .unwrap();
        assert!(status.success());
        test();
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// A unique temporary directory, removed on drop; with `bpffs`, a private bpf filesystem is
/// mounted on it (and detached on drop, also when the test panics).
pub struct TempMount {
    pub dir: PathBuf,
    mounted: bool,
}

impl TempMount {
    pub fn new(bpffs: bool) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lbctl-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut guard = Self {
            dir,
            mounted: false,
        };
        if bpffs {
            let (src, fstype) = (c"bpf", c"bpf");
            let target = c_path(&guard.dir);
            // SAFETY: valid NUL-terminated strings; no data argument.
            let ret = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            assert_eq!(
                ret,
                0,
                "mount -t bpf on {}: {}",
                guard.dir.display(),
                std::io::Error::last_os_error()
            );
            guard.mounted = true;
        }
        guard
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if self.mounted {
            let target = c_path(&self.dir);
            // SAFETY: a valid path. MNT_DETACH: pinned maps may still be open in this process.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A datapath whose maps are pinned under `pins` on a private bpffs, programmed through the
/// agent's planner and writer; the shared [`Harness`] runs and programs it.
pub struct Fixture {
    harness: Harness,
    pub pins: PathBuf,
    // Last: unmounted after the datapath and maps are closed.
    _mount: TempMount,
}

impl Deref for Fixture {
    type Target = Harness;

    fn deref(&self) -> &Harness {
        &self.harness
    }
}

impl DerefMut for Fixture {
    fn deref_mut(&mut self) -> &mut Harness {
        &mut self.harness
    }
}

impl Fixture {
    pub fn new() -> Option<Self> {
        if !lb_testbed::privileges::require() {
            return None;
        }
        let mount = TempMount::new(true);
        let pins = mount.dir.join("lb");
        std::fs::create_dir(&pins).unwrap();
        let capacities = Capacities {
            ct: 4096,
            sets: 1024,
            ..Capacities::default()
        };
        Some(Self {
            harness: Harness::load(&Pinning::Dir(pins.clone()), capacities, TABLE),
            pins,
            _mount: mount,
        })
    }

    /// The backend id the planner gave the backend at `addr`.
    pub fn backend_id(&self, addr: &str) -> u32 {
        self.services
            .backend_id(sock(addr))
            .unwrap_or_else(|| panic!("no backend {addr} is programmed"))
    }

    /// The source-range id the planner gave the frontends of `svc`.
    pub fn source_range_id(&self, svc: &ServiceSpec) -> u32 {
        self.services
            .frontend(&svc.frontends[0].key())
            .unwrap_or_else(|| panic!("service {} is not programmed", svc.name))
            .source_range_id
    }

    /// Writes a source range straight into the map (for state the planner never writes).
    pub fn add_source_range(&mut self, range_id: u32, addr: Ipv4Addr, len: u32) {
        let key = Key::new(
            SourceRange::ID_BITS + len,
            SourceRange {
                range_id: Be32::from_host(range_id),
                addr: Be32::from(addr),
            },
        );
        self.maps.src_ranges.insert(&key, 1, 0).unwrap();
    }

    pub fn lbctl(&self, args: &[&str]) -> Output {
        lbctl(&self.pins, args)
    }

    /// Runs lbctl with `--output json`, which must succeed, and parses its output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.lbctl(&all);
        assert!(
            out.status.success(),
            "lbctl {all:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "lbctl {all:?}: invalid JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs lbctl in table mode, which must succeed, and returns its output.
    pub fn text(&self, args: &[&str]) -> String {
        let out = self.lbctl(args);
        assert!(
            out.status.success(),
            "lbctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Runs the real binary on the pins under `dir`.
pub fn lbctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .arg("--bpffs-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("running lbctl")
}

pub fn sock(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// The fixture's `--maglev-table-size`: every set with two backends or more gets a table of
/// this size (the smallest the agent picks).
pub const TABLE: u32 = 251;

pub fn frontend(addr: [u8; 4], port: u16, l4: u8, scope: u8, kind: FrontendKind) -> FrontendSpec {
    FrontendSpec {
        addr: Ipv4Addr::from(addr),
        port,
        proto: l4,
        scope,
        kind,
    }
}

/// Backends at `addrs`; every other one runs on this node, starting with the first when
/// `first_local`.
pub fn backends(first_local: bool, addrs: &[&str]) -> Vec<BackendSpec> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| BackendSpec {
            addr: sock(a),
            local: (i % 2 == 0) == first_local,
            weight: 1,
        })
        .collect()
}

pub fn service(
    name: &str,
    frontends: Vec<FrontendSpec>,
    backends: Vec<BackendSpec>,
) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        frontends,
        backends,
        ..Default::default()
    }
}

/// A TCP ClusterIP `name` on `vip` (pods' scope) with one backend, on this node.
pub fn one_backend_cluster_ip(name: &str, vip: &str, backend: &str) -> ServiceSpec {
    let vip = sock(vip);
    service(
        name,
        vec![frontend(
            vip.ip().octets(),
            vip.port(),
            lb_common::net::proto::TCP,
            lb_common::maps::scope::INTERNAL,
            FrontendKind::ClusterIp,
        )],
        backends(true, &[backend]),
    )
}

/// This node's address: the agent's SNAT address (its InternalIP), and the address of the
/// NodePort service.
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);

/// What the agent programs for a node with an InternalIP: `NODE` as the SNAT address, SNAT
/// ports `min..=max`.
pub fn configure_snat(f: &mut Fixture, min: u16, max: u16) {
    f.set_node(NODE, min..=max);
}
