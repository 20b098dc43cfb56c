//! The guest's kernel and busybox: Debian packages fetched with `apt-get download` and unpacked
//! under `<target>/vm-cache/` (`dpkg-deb -x`), so that a second run downloads nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::util::{self, output};

/// The meta package whose dependency names the current bookworm cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";

/// The unpacked guest kernel.
pub(super) struct Kernel {
    /// `uname -r` inside the guest, e.g. `6.1.0-56-cloud-amd64`.
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub(super) modules: PathBuf,
}

impl Kernel {
    /// The current bookworm cloud kernel: resolved from the meta package's dependency, fetched
    /// unless cached. Without apt lists (or offline) the newest cached kernel does.
    pub(super) fn fetch(cache: &Path) -> Result<Self> {
        let package = match kernel_package() {
            Some(p) => p,
            None => {
                match newest_cached(cache, "linux-image-") {
                    Some(p) => {
                        println!("vm-test: apt does not know {KERNEL_META}; using the cached {p}");
                        p
                    }
                    None => {
                        apt_update()?;
                        kernel_package().with_context(|| {
                        format!("apt cannot resolve {KERNEL_META} (is a bookworm source configured?)")
                    })?
                    }
                }
            }
        };
        let dir = fetch_package(cache, &package)?;
        let release = package
            .strip_prefix("linux-image-")
            .context("unexpected kernel package name")?
            .to_owned();
        let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
        let modules = dir.join(format!("lib/modules/{release}"));
        ensure!(
            vmlinuz.is_file() && modules.is_dir(),
            "{} lacks the kernel or its modules",
            dir.display()
        );
        Ok(Self {
            release,
            vmlinuz,
            modules,
        })
    }
}

/// busybox-static's `bin/busybox`, fetched unless cached.
pub(super) fn busybox(cache: &Path) -> Result<PathBuf> {
    let busybox = fetch_package(cache, BUSYBOX)?.join("bin/busybox");
    ensure!(busybox.is_file(), "{} has no bin/busybox", BUSYBOX);
    Ok(busybox)
}

/// `linux-image-6.1.0-NN-cloud-amd64`, from `apt-cache depends linux-image-cloud-amd64`.
fn kernel_package() -> Option<String> {
    let deps = output(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_owned)
}

fn apt_update() -> Result<()> {
    println!("vm-test: apt-get update");
    util::run(Command::new("apt-get").args(["-q", "update"]))
}

/// The unpacked directory of `package` under `cache`: `<cache>/<package>/`, complete when it
/// holds `.unpacked`. Downloads the .deb (into `<cache>/debs/`) only when it is not there.
fn fetch_package(cache: &Path, package: &str) -> Result<PathBuf> {
    let dir = cache.join(package);
    let done = dir.join(".unpacked");
    if done.exists() {
        return Ok(dir);
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = match cached_deb(&debs, package) {
        Some(deb) => deb,
        None => {
            println!(
                "vm-test: downloading {package} with apt-get download (kept in {}: later runs reuse it)",
                debs.display()
            );
            let download = || {
                Command::new("apt-get")
                    .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
                    .current_dir(&debs)
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !download() {
                // Stale or missing lists.
                apt_update()?;
                ensure!(download(), "apt-get download {package} failed");
            }
            cached_deb(&debs, package).with_context(|| {
                format!(
                    "apt-get download {package} left no .deb in {}",
                    debs.display()
                )
            })?
        }
    };
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    fs::write(&done, deb.file_name().unwrap().as_encoded_bytes())?;
    Ok(dir)
}

fn cached_deb(debs: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(debs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .max()
}

/// The newest unpacked package in the cache whose name starts with `prefix`.
fn newest_cached(cache: &Path, prefix: &str) -> Option<String> {
    fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| e.path().join(".unpacked").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .max()
}
