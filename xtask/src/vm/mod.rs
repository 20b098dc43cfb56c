//! `cargo xtask vm-test`: the datapath and the agent on an older kernel, Debian bookworm's 6.1
//! cloud kernel, booted under qemu (software emulation: no KVM needed). This file runs the
//! phases in order and reports; each module below does one of them.
//!
//! * `packages`: the kernel package and a static busybox are fetched with `apt-get download` and
//!   unpacked under `<target>/vm-cache/` (`dpkg-deb -x`): a second run downloads nothing.
//! * `binaries`: the release binaries and the test binaries the plan runs, built by cargo.
//! * `initramfs` (with `image`, the cpio archive): the cloud kernel has no 9p and virtiofsd is
//!   not in bookworm, so the guest gets no view of the host's files: its root is an initramfs
//!   (built here, uncompressed cpio) holding busybox, the few host tools the tests start (`ip`,
//!   `tc`, `nsenter`, `sysctl`, netperf) with their shared libraries, the release binaries and
//!   test binaries at their host paths (the tests name the agent by absolute path), and the
//!   guest kernel's modules the tests need.
//! * `plan`: what runs in the guest, as its `/init`: mount the usual filesystems, load the
//!   modules, run the plan and power off. Every step ends with `lb-vm: ok` or `lb-vm: FAILED`
//!   on the serial console, and the run with `lb-vm: RESULT PASS` or `FAIL`.
//! * `qemu`: boots the VM and reads that console.
//!
//! The plan: the datapath tests (`datapath`, `datapath_flows`, `datapath_reject`,
//! `datapath_packets`, `datapath_external`, `datapath_client_addresses`, `datapath_external_nat`,
//! `datapath_events`, `datapath_direct`, `datapath_carry`: the programs each test runs, through
//! the 6.1 verifier and fed crafted packets; rare events read from aya-log's ring buffer;
//! `datapath_fuzz` with a twenty-fifth of its frames), lbctl's predictions against the
//! programs (`trace`, `snat`, `hairpin`), the classic-tc test (the agent attaches clsact
//! filters, replaces them on restart, removes them on cleanup), ClusterIP and NodePort end to end
//! with the real agent on a two-node cluster in namespaces (every program of the datapath through
//! the verifier, as the agent loads them all), socket-level balancing end to end
//! (`e2e_socket_lb`, clients in the nodes' and pods' cgroups), and netperf TCP_RR / TCP_CRR
//! through a ClusterIP versus straight to the backend.

mod binaries;
mod image;
mod initramfs;
mod packages;
mod plan;
mod qemu;

use std::{fs, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::util;

pub fn run() -> Result<()> {
    let started = Instant::now();
    let root = util::workspace_root()?;
    let target = util::target_dir(&root);
    let cache = target.join("vm-cache");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;

    let phase = Instant::now();
    let kernel = packages::Kernel::fetch(&cache)?;
    let busybox = packages::busybox(&cache)?;
    let qemu = which("qemu-system-x86_64")
        .context("qemu-system-x86_64 is missing: `cargo xtask setup` installs qemu-system-x86")?;
    println!(
        "vm-test: kernel {} and busybox ready ({:.1}s)",
        kernel.release,
        phase.elapsed().as_secs_f64()
    );

    let phase = Instant::now();
    let built = binaries::build(&root)?;
    println!(
        "vm-test: release binaries and test binaries built ({:.1}s)",
        phase.elapsed().as_secs_f64()
    );

    let phase = Instant::now();
    let initrd = cache.join("initramfs.cpio");
    let size = initramfs::build(&initrd, &kernel, &busybox, &built)?;
    println!(
        "vm-test: initramfs {} ({} MiB, {:.1}s)",
        initrd.display(),
        size >> 20,
        phase.elapsed().as_secs_f64()
    );

    let log = target.join("vm-test.log");
    let phase = Instant::now();
    let outcome = qemu::boot(&qemu, &kernel, &initrd, &log)?;
    let vm_time = phase.elapsed();
    println!(
        "vm-test: ---- summary (full console log: {})",
        log.display()
    );
    for line in &outcome.summary {
        println!("vm-test:   {line}");
    }
    println!(
        "vm-test: VM {:.0}s, total {:.0}s",
        vm_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    match outcome.result {
        Some(true) => {
            println!("vm-test: PASS on {}", kernel.release);
            Ok(())
        }
        Some(false) => bail!(
            "vm-test: FAIL on {} (see {})",
            kernel.release,
            log.display()
        ),
        None => bail!(
            "vm-test: the VM stopped without a result (crash or timeout; see {})",
            log.display()
        ),
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
