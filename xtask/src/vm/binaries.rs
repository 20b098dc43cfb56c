//! The programs the plan runs in the guest: the release binaries (lb-agent, lbctl) and the
//! release test binaries of the plan's steps, built by cargo, found in its JSON messages.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};

use super::plan::PLAN;

pub(super) struct Built {
    /// lb-agent, lbctl.
    pub(super) bins: Vec<PathBuf>,
    /// Test target name -> executable.
    pub(super) tests: BTreeMap<String, PathBuf>,
}

/// Release binaries and release test binaries (smaller and much faster under emulation; their
/// `CARGO_BIN_EXE_lb-agent` is the release agent).
pub(super) fn build(root: &Path) -> Result<Built> {
    let bins = cargo_executables(
        root,
        "bin",
        &[
            "build",
            "--release",
            "-p",
            "lb-agent",
            "-p",
            "lbctl",
            "--bins",
        ],
    )?;
    let targets: BTreeSet<&str> = PLAN.iter().map(|s| s.target).collect();
    let mut args = vec![
        "test",
        "--release",
        "--no-run",
        "-p",
        "lb-datapath",
        "-p",
        "lb-agent",
        "-p",
        "lbctl",
    ];
    for t in &targets {
        args.extend(["--test", t]);
    }
    let tests = cargo_executables(root, "test", &args)?;
    let bins: Vec<PathBuf> = ["lb-agent", "lbctl"]
        .iter()
        .map(|name| {
            bins.get(*name)
                .cloned()
                .with_context(|| format!("cargo built no {name}"))
        })
        .collect::<Result<_>>()?;
    for t in targets {
        ensure!(tests.contains_key(t), "cargo built no test binary {t}");
    }
    Ok(Built { bins, tests })
}

/// Runs cargo with `--message-format=json-render-diagnostics` and returns the executables of
/// targets of `kind` (`bin`, `test`: a test and a binary may share a name) it reports, by name.
fn cargo_executables(root: &Path, kind: &str, args: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run cargo {args:?}"))?;
    ensure!(out.status.success(), "cargo {args:?} failed");
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact"
            || !msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind))
        {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            found.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(found)
}
