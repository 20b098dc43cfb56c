//! Running commands (with privileges when needed) and finding the workspace's root.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Runs `cmd`, inheriting stdio; fails with the command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; `None` when it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new(env!("CARGO")).args(args))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `cargo <args>` with `env` set, where test binaries run as root (`sudo -E` as their runner when
/// we are not).
pub fn cargo_as_root(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(args);
    cmd.envs(env.iter().copied());
    if !is_root() {
        eprintln!("xtask: not root; test binaries will run under `sudo -E`");
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    run(&mut cmd)
}

/// Runs a built program as root (`sudo -E` when we are not).
pub fn run_privileged(program: &Path, args: &[&str]) -> Result<()> {
    if !program.exists() {
        bail!("{} was not built", program.display());
    }
    if is_root() {
        run(Command::new(program).args(args))
    } else {
        eprintln!("xtask: not root; running {} under sudo", program.display());
        run(Command::new("sudo").arg("-E").arg(program).args(args))
    }
}

/// The workspace's root directory (xtask's parent).
pub fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().context("xtask is not in a workspace")?;
    fs::canonicalize(root).with_context(|| format!("cannot resolve {}", root.display()))
}

/// Where `cargo build --release` puts the workspace's binary `name` (wherever xtask runs from,
/// and with `CARGO_TARGET_DIR` set).
pub fn release_binary(name: &str) -> Result<PathBuf> {
    Ok(target_dir(&workspace_root()?).join("release").join(name))
}

/// Cargo's target directory for the workspace at `root`.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d))
}
