//! `cargo xtask check`: formatting and lints, as CI runs them (`cargo xtask test` runs this
//! first and stops when it fails).
//!
//! * `cargo fmt --all --check`;
//! * clippy on every crate but lb-ebpf, all targets, with the toolchain running xtask;
//! * clippy on lb-ebpf the way lb-datapath's build script (aya-build) builds it: the nightly
//!   toolchain, `--target bpfel-unknown-none -Z build-std=core`, the release profile.
//!
//! Warnings are errors; the lints are the workspace's (`[workspace.lints]` in the root
//! Cargo.toml). Every step runs even after one failed, so that one run shows every finding.
//! `cargo xtask setup` installs rustfmt and clippy for both toolchains.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{setup::NIGHTLY, util};

/// The BPF target aya-build builds lb-ebpf for (on this little-endian host).
const BPF_TARGET: &str = "bpfel-unknown-none";

pub fn run() -> Result<()> {
    let root = util::workspace_root()?;
    let mut fmt = Command::new(env!("CARGO"));
    fmt.args(["fmt", "--all", "--check"]);
    let mut clippy = Command::new(env!("CARGO"));
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--exclude",
        "lb-ebpf",
        "--",
        "-D",
        "warnings",
    ]);
    // aya-build's command, with `clippy` for `build`. Like aya-build, drop a RUSTC or wrapper
    // inherited from the outer cargo: they would lint with the stable compiler.
    let mut bpf_clippy = Command::new("rustup");
    bpf_clippy
        .args(["run", NIGHTLY, "cargo", "clippy", "--package", "lb-ebpf"])
        .args(["--release", "--target", BPF_TARGET, "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");

    let mut failed = Vec::new();
    for (what, mut cmd) in [
        ("rustfmt", fmt),
        ("clippy", clippy),
        ("clippy on the BPF programs", bpf_clippy),
    ] {
        let line = command_line(&cmd);
        println!("check: {what}: {line}");
        let status = cmd
            .current_dir(&root)
            .status()
            .with_context(|| format!("cannot start {line}"))?;
        if !status.success() {
            eprintln!("check: {what} failed ({status})");
            failed.push(what);
        }
    }
    if !failed.is_empty() {
        bail!("check failed: {}", failed.join(", "));
    }
    println!("check: formatting and lints clean");
    Ok(())
}

/// `cargo fmt --all --check`, as a person would type it.
fn command_line(cmd: &Command) -> String {
    let program = cmd.get_program().to_string_lossy();
    let program = program.rsplit('/').next().unwrap_or_default();
    let mut line = program.to_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}
