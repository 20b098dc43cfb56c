//! Builds the BPF object (the `lb-ebpf` binary) with the nightly toolchain and bpf-linker, and
//! leaves it in OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs both, and the
//! nightly's `llvm-tools`, whose `llvm-objcopy` strips the object's DWARF once bpf-linker has
//! turned it into BTF.
//!
//! The object is the same whatever the host build's profile (aya-build always builds it in
//! release), so it is built in one directory beside the profiles', `<target>/bpf-object`, and
//! copied from there: `cargo clippy`, `cargo build --release` and `cargo test` would otherwise
//! each build it (and `core` for the BPF target) in their own OUT_DIR, a minute apiece.
use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

/// Name of the object aya-build leaves in its output directory (the binary's name).
const OBJECT: &str = "lb-ebpf";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let shared = shared_dir(&out_dir);
    fs::create_dir_all(&shared).with_context(|| format!("cannot create {}", shared.display()))?;
    // Two builds of different profiles may run this at once: one builds, the other waits and
    // finds the object up to date, and neither copies it while the other writes it.
    let lock = File::create(shared.join("lock"))
        .with_context(|| format!("cannot create the lock in {}", shared.display()))?;
    lock.lock().context("locking the shared BPF build")?;
    build_in(&shared)?;
    let object = out_dir.join(OBJECT);
    fs::copy(shared.join(OBJECT), &object)
        .with_context(|| format!("cannot copy the BPF object to {}", object.display()))?;
    drop(lock);
    if let Err(e) = strip_debug_info(&object) {
        println!(
            "cargo:warning=the BPF object keeps its DWARF (4 MB more in every binary and in the agent's memory): {e:#}"
        );
    }
    Ok(())
}

/// `<target>/bpf-object`, `<target>` being the directory that holds the profile directory of
/// `out_dir` (`<target>/<profile>/build/lb-datapath-<hash>/out`). OUT_DIR itself when its shape
/// is another: the object is then built per profile, as before.
fn shared_dir(out_dir: &Path) -> PathBuf {
    let build = out_dir.parent().and_then(Path::parent);
    match build.and_then(|b| Some((b.file_name()?, b.parent()?.parent()?))) {
        Some((name, target)) if name == "build" => target.join("bpf-object"),
        _ => out_dir.to_owned(),
    }
}

/// Runs aya-build with `dir` as its output directory: it reads that from OUT_DIR.
fn build_in(dir: &Path) -> anyhow::Result<()> {
    let out_dir = std::env::var_os("OUT_DIR");
    // SAFETY: a build script is single-threaded here; nothing else reads the environment.
    unsafe { std::env::set_var("OUT_DIR", dir) };
    let ebpf = aya_build::Package {
        name: OBJECT,
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    let built = aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
        .context("building the BPF programs failed; `cargo xtask setup` installs what they need");
    if let Some(out_dir) = out_dir {
        // SAFETY: as above.
        unsafe { std::env::set_var("OUT_DIR", out_dir) };
    }
    built
}

/// Removes the DWARF sections of `object` (about 80% of it). The programs need only the BTF
/// bpf-linker generated from them, which stays: the agent embeds the object and aya reads it
/// whole, so the DWARF cost 4 MB of binary and some 2.5 MB of the agent's resident memory.
fn strip_debug_info(object: &Path) -> anyhow::Result<()> {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running rustup")?;
    anyhow::ensure!(sysroot.status.success(), "no nightly toolchain");
    let sysroot = String::from_utf8(sysroot.stdout)?;
    let objcopy = PathBuf::from(sysroot.trim())
        .join("lib/rustlib")
        .join(std::env::var("HOST")?)
        .join("bin/llvm-objcopy");
    let status = Command::new(&objcopy)
        .arg("--strip-debug")
        .arg(object)
        .status()
        .with_context(|| format!("running {} (the nightly's llvm-tools)", objcopy.display()))?;
    anyhow::ensure!(status.success(), "{} failed: {status}", objcopy.display());
    Ok(())
}
