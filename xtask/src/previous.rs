//! The previous release's agent, built from this repository's history for the upgrade test
//! (`lb-agent/tests/upgrade.rs`): an agent of this version must take over a datapath that the
//! previous release pinned, without losing a connection.
//!
//! The release is a commit named here; its tree is exported with `git archive` (no checkout, no
//! worktree left behind) and built in a target directory of its own under
//! `<target>/previous-release/` (its own: its binary would otherwise replace this version's
//! `lb-agent`), once: later runs reuse the binary. A debug build: it compiles faster and runs
//! the same datapath (the BPF object is always optimised). When a release changes the
//! pinned datapath, bump [`PREVIOUS_RELEASE`] to the commit that the upgrade starts from.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::util;

/// The release whose pinned datapath this version must adopt: the last commit before the
/// crates were split (lb-userspace held the agent then).
pub const PREVIOUS_RELEASE: &str = "65ac89fdb30b393a998b916d385f6ff42322d3b3";
/// The package and binary of the agent at that commit.
const PACKAGE: &str = "lb-userspace";
const BINARY: &str = "lb-agent";
/// Environment variable through which the upgrade test finds the binary.
pub const ENV: &str = "LB_PREVIOUS_AGENT";

/// Builds (once) the previous release's agent and returns its path.
pub fn agent(root: &Path, target: &Path) -> Result<PathBuf> {
    let dir = target.join("previous-release");
    let binary = dir.join(format!("{BINARY}-{}", &PREVIOUS_RELEASE[..12]));
    if binary.is_file() {
        return Ok(binary);
    }
    println!(
        "xtask: building the previous release's agent ({}) for the upgrade test (once; a few minutes)",
        &PREVIOUS_RELEASE[..12]
    );
    ensure_commit(root)?;
    let src = dir.join("src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).with_context(|| format!("cannot create {}", src.display()))?;
    export(root, &src)?;
    util::run(
        Command::new(env!("CARGO"))
            .args(["build", "--locked", "-p", PACKAGE, "--bin", BINARY])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", dir.join("target")),
    )
    .context("building the previous release's agent")?;
    fs::copy(dir.join("target/debug").join(BINARY), &binary)
        .with_context(|| format!("cannot copy the agent to {}", binary.display()))?;
    let _ = fs::remove_dir_all(&src);
    Ok(binary)
}

/// Makes sure the commit is in the repository (a shallow clone may lack it: fetch it then).
fn ensure_commit(root: &Path) -> Result<()> {
    let has = |root: &Path| {
        Command::new("git")
            .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
            .current_dir(root)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has(root) {
        return Ok(());
    }
    let _ = Command::new("git")
        .args(["fetch", "--quiet", "origin", PREVIOUS_RELEASE])
        .current_dir(root)
        .status();
    if !has(root) {
        bail!(
            "commit {PREVIOUS_RELEASE} (the previous release, for the upgrade test) is not in this clone \
             and could not be fetched: clone with history (not --depth), or fetch it"
        );
    }
    Ok(())
}

/// Writes the release's tree into `dest`.
fn export(root: &Path, dest: &Path) -> Result<()> {
    let mut archive = Command::new("git")
        .args(["archive", "--format=tar", PREVIOUS_RELEASE])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run git archive")?;
    let stdout = archive.stdout.take().context("git archive has no stdout")?;
    let untar = Command::new("tar")
        .args(["-x", "-C"])
        .arg(dest)
        .stdin(stdout)
        .status()
        .context("cannot run tar")?;
    let archived = archive.wait()?;
    if !archived.success() || !untar.success() {
        bail!("exporting {PREVIOUS_RELEASE} failed (git archive: {archived}, tar: {untar})");
    }
    Ok(())
}
