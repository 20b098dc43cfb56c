//! Project tasks: `setup` (install what a fresh machine lacks), `check` (formatting and lints),
//! `test` (`check`, then every test), `vm-test` (the datapath and the agent on an older kernel,
//! under qemu), `demo` (the README's first command) and `bench`.
//!
//! xtask depends on nothing of the project, so it builds on a machine where the BPF toolchain is
//! not installed yet: that is what `setup` is for.

mod check;
mod previous;
mod setup;
mod util;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Set-up, tests, benchmarks and the demo of the eBPF Service load balancer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and Debian packages this project needs (idempotent).
    Setup,
    /// Check formatting (rustfmt) and lints (clippy, warnings denied) of every crate, the BPF
    /// programs included (with the nightly toolchain). Needs `cargo xtask setup` once.
    Check,
    /// Run `check` (stopping if it fails), then every test: unit, datapath (BPF_PROG_TEST_RUN)
    /// and end-to-end in network namespaces, then `vm-test` (skipped with --no-vm or when test
    /// arguments are given).
    Test {
        /// Skip the VM test on the older kernel.
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test`, e.g. a test name filter or `--test datapath_external`
        /// (after them, `--` and arguments for the test binaries).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot Debian bookworm's 6.1 cloud kernel under qemu and run the datapath tests, the
    /// classic-tc agent test, ClusterIP and NodePort end to end, and netperf inside it.
    VmTest,
    /// Bring up a small cluster in network namespaces and show the load balancer at work.
    Demo,
    /// Measure the datapath and compare it with baselines measured in the same run.
    Bench {
        /// Arguments for the benchmark binary, e.g. `--quick` (see `lb-bench --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    forget_cargo_run_env();
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Check => check::run(),
        Task::Test { no_vm, args } => {
            setup::run()?;
            check::run()?;
            test(&args)?;
            if no_vm || !args.is_empty() {
                return Ok(());
            }
            vm::run()
        }
        Task::VmTest => {
            setup::run()?;
            vm::run()
        }
        Task::Demo => {
            setup::run()?;
            util::cargo(&["build", "--release", "--bins"])?;
            util::run_privileged(&util::release_binary("lb-demo")?, &[])
        }
        Task::Bench { args } => {
            setup::run()?;
            util::cargo(&["build", "--release", "--bins"])?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            util::run_privileged(&util::release_binary("lb-bench")?, &args)
        }
    }
}

/// Every test of the workspace. Test binaries that need root run under `sudo -E` when the caller
/// is not root (CI runs as root). The end-to-end tests start the binaries cargo builds beside
/// the test binaries (`CARGO_BIN_EXE_*`, the same profile): no release build is needed before
/// them (the VM test builds its own).
fn test(extra: &[String]) -> Result<()> {
    let root = util::workspace_root()?;
    let previous_agent = previous::agent(&root, &util::target_dir(&root))?;
    let mut args = vec!["test", "--workspace", "--exclude", "lb-ebpf"];
    args.extend(extra.iter().map(String::as_str));
    util::cargo_as_root(&args, &[(previous::ENV, previous_agent.as_os_str())])
}

/// Removes what `cargo run` told xtask about itself (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...)
/// before xtask starts cargo in turn. Build scripts such as ring's declare
/// `rerun-if-env-changed` on those names, and cargo compares them in its own environment: left
/// in, every cargo started here would rebuild ring and all that depends on it (rustls, kube,
/// lb-datapath and each test binary: minutes) whenever the previous build was started from a
/// shell, and the next shell build would rebuild them again.
fn forget_cargo_run_env() {
    let names: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            name.to_str().is_some_and(|n| {
                n.starts_with("CARGO_PKG_")
                    || n.starts_with("CARGO_MANIFEST_")
                    || matches!(
                        n,
                        "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
                    )
            })
        })
        .collect();
    for name in names {
        // SAFETY: called first thing in main, before any thread exists.
        unsafe { std::env::remove_var(name) };
    }
}
