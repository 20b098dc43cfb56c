//! `cargo xtask setup`: installs, idempotently and one line per step, what a fresh machine of
//! this kind lacks to build and test the project.
//!
//! * rustfmt and clippy for the toolchain running xtask (`cargo xtask check`);
//! * the nightly toolchain's `rust-src` (BPF programs are built with `-Z build-std=core`),
//!   `llvm-tools` and clippy (`cargo xtask check` lints the BPF programs with it);
//! * bpf-linker, built against the nightly toolchain's own libLLVM, so that the linker and rustc
//!   agree on the LLVM version (a mismatch produces objects the linker cannot read);
//! * the Debian packages the tests, the demo and the benchmarks use (netperf lives in the
//!   non-free component, which setup enables).

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, output};

/// The toolchain that builds the BPF programs (aya-build's default) and lints them.
pub const NIGHTLY: &str = "nightly";
const NIGHTLY_COMPONENTS: [&str; 3] = ["rust-src", "llvm-tools", "clippy"];
/// What `cargo xtask check` needs of the toolchain running xtask, which builds everything else.
const COMPONENTS: [&str; 2] = ["rustfmt", "clippy"];
/// The bpf-linker release that matches aya 0.14.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages and what needs them.
const PACKAGES: [(&str, &str); 11] = [
    ("make", "building jemalloc, the agent's allocator"),
    (
        "iproute2",
        "network namespaces and veths for end-to-end tests",
    ),
    (
        "iptables",
        "kube-proxy's iptables datapath (benchmark baseline)",
    ),
    (
        "nftables",
        "kube-proxy's nftables datapath (benchmark baseline)",
    ),
    ("netperf", "end-to-end benchmarks"),
    (
        "linux-perf",
        "where the datapath's per-packet time goes (benchmarks)",
    ),
    (
        "bpftool",
        "inspecting programs and their runtime statistics",
    ),
    ("curl", "the demo's HTTP requests"),
    ("iputils-ping", "connectivity checks"),
    ("procps", "sysctl for the test bed"),
    (
        "qemu-system-x86",
        "cargo xtask vm-test (an older kernel under qemu)",
    ),
];

pub fn run() -> Result<()> {
    components(&Toolchain::running(), &COMPONENTS)?;
    nightly()?;
    components(&Toolchain::nightly(), &NIGHTLY_COMPONENTS)?;
    bpf_linker()?;
    packages()?;
    Ok(())
}

fn step(what: &str, state: &str) {
    println!("setup: {what:<44} {state}");
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn nightly() -> Result<()> {
    let installed = output(rustup().args(["toolchain", "list"])).unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("nightly")) {
        step("nightly toolchain", "present");
        return Ok(());
    }
    step("nightly toolchain", "installing");
    util::run(rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
}

/// A rustup toolchain, as `rustup --toolchain` takes it and as the setup lines name it.
struct Toolchain {
    /// `None`: the one rustup picks for this directory.
    name: Option<String>,
    label: String,
}

impl Toolchain {
    fn nightly() -> Self {
        Self {
            name: Some(NIGHTLY.to_owned()),
            label: NIGHTLY.to_owned(),
        }
    }

    /// The toolchain that runs xtask: rustup names it in `RUSTUP_TOOLCHAIN` for the programs it
    /// starts (`stable-x86_64-unknown-linux-gnu`, shown as `stable`).
    fn running() -> Self {
        let name = env::var("RUSTUP_TOOLCHAIN").ok();
        let host = format!("-{}-unknown-linux-gnu", env::consts::ARCH);
        let label = name
            .as_deref()
            .map_or("active toolchain", |n| n.strip_suffix(&host).unwrap_or(n))
            .to_owned();
        Self { name, label }
    }

    fn rustup(&self, args: &[&str]) -> Command {
        let mut cmd = rustup();
        cmd.args(args);
        if let Some(name) = &self.name {
            cmd.args(["--toolchain", name]);
        }
        cmd
    }
}

fn components(toolchain: &Toolchain, components: &[&str]) -> Result<()> {
    let installed =
        output(&mut toolchain.rustup(&["component", "list", "--installed"])).unwrap_or_default();
    for component in components {
        let what = format!("{} component {component}", toolchain.label);
        if installed.lines().any(|l| l.starts_with(component)) {
            step(&what, "present");
        } else {
            step(&what, "installing");
            util::run(&mut toolchain.rustup(&["component", "add", component]))?;
        }
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn bpf_linker_runs() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .or_else(|| output(Command::new(cargo_home().join("bin/bpf-linker")).arg("--version")))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

/// The nightly sysroot's libLLVM and its major version, read from the toolchain itself.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let version = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))
        .context("rustc +nightly -vV failed")?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV reports no LLVM version")?
        .to_owned();
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
            .context("rustc +nightly --print sysroot failed")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    Ok((libllvm, major))
}

/// A stable directory whose `lib/` links to the nightly libLLVM; bpf-linker builds against it and
/// finds the library through an rpath into it at run time, so it must outlive the build.
fn llvm_prefix(libllvm: &Path) -> Result<PathBuf> {
    let prefix = cargo_home().join("lb-bpf-linker-llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let file_name = libllvm.file_name().context("libLLVM path without a name")?;
    for name in [Path::new("libLLVM.so"), Path::new(file_name)] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(libllvm, &link).with_context(|| format!("cannot link {}", link.display()))?;
    }
    Ok(prefix)
}

fn bpf_linker() -> Result<()> {
    let what = format!("bpf-linker {BPF_LINKER_VERSION} (nightly's LLVM)");
    if bpf_linker_runs() {
        step(&what, "present");
        return Ok(());
    }
    let (libllvm, major) = nightly_llvm()?;
    let prefix = llvm_prefix(&libllvm)?;
    // An installed linker that stopped running has lost its libLLVM links: restoring them is
    // enough.
    if bpf_linker_runs() {
        step(&what, "repaired (libLLVM links restored)");
        return Ok(());
    }
    step(
        &what,
        &format!("building against LLVM {major} (a minute or two)"),
    );
    util::run(
        Command::new(env!("CARGO"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_runs() {
        bail!("bpf-linker was installed but does not run");
    }
    Ok(())
}

fn package_installed(name: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter_map(|(name, why)| {
            let present = package_installed(name);
            step(
                &format!("package {name}"),
                if present { "present" } else { "missing" },
            );
            if !present {
                println!("setup:   ({why})");
            }
            (!present).then_some(*name)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "installing Debian packages needs root: sudo apt-get install {}",
            missing.join(" ")
        );
    }
    if missing.contains(&"netperf") {
        enable_non_free()?;
    }
    step("apt-get update", "running");
    util::run(Command::new("apt-get").args(["-q", "update"]))?;
    step(&format!("apt-get install {}", missing.join(" ")), "running");
    util::run(
        Command::new("apt-get")
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// netperf is in Debian's non-free component: add it for the release and mirror the machine
/// already uses.
fn enable_non_free() -> Result<()> {
    let path = Path::new("/etc/apt/sources.list.d/lb-non-free.sources");
    if path.exists() {
        step("apt source for non-free", "present");
        return Ok(());
    }
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VERSION_CODENAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| "bookworm".to_owned());
    let mirror = fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("URIs: ").map(str::to_owned))
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
    let source = format!(
        "Types: deb\nURIs: {mirror}\nSuites: {codename}\nComponents: non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    fs::write(path, source).with_context(|| format!("cannot write {}", path.display()))?;
    step("apt source for non-free", "added");
    Ok(())
}
