//! Builds the BPF object (the `lb-ebpf` binary) with the nightly toolchain and bpf-linker, and
//! leaves it in OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs both, and the
//! nightly's `llvm-tools`, whose `llvm-objcopy` strips the object's DWARF once bpf-linker has
//! turned it into BTF.
use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
        .context("building the BPF programs failed; `cargo xtask setup` installs what they need")?;
    let object = PathBuf::from(std::env::var("OUT_DIR")?).join("lb-ebpf");
    if let Err(e) = strip_debug_info(&object) {
        println!(
            "cargo:warning=the BPF object keeps its DWARF (4 MB more in every binary and in the agent's memory): {e:#}"
        );
    }
    Ok(())
}

/// Removes the DWARF sections of `object` (about 80% of it). The programs need only the BTF
/// bpf-linker generated from them, which stays: the agent embeds the object and aya reads it
/// whole, so the DWARF cost 4 MB of binary and some 2.5 MB of the agent's resident memory.
fn strip_debug_info(object: &std::path::Path) -> anyhow::Result<()> {
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
