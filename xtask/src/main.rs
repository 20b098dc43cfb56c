//! Project tasks: `setup` (install what a fresh machine lacks), `test` (every test), `demo` (the
//! README's first command) and `bench`.
//!
//! xtask depends on nothing of the project, so it builds on a machine where the BPF toolchain is
//! not installed yet: that is what `setup` is for.

mod setup;
mod util;

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
    /// Run every test: unit, datapath (BPF_PROG_TEST_RUN) and end-to-end in network namespaces.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bring up a small cluster in network namespaces and show the load balancer at work.
    Demo,
    /// Measure the datapath and compare it with baselines measured in the same run.
    Bench {
        /// Extra arguments for the benchmark binary (see `--help` there).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { args } => {
            setup::run()?;
            test(&args)
        }
        Task::Demo => {
            setup::run()?;
            util::cargo(&["build", "--release", "--bins"])?;
            util::run_privileged("target/release/lb-demo", &[])
        }
        Task::Bench { args } => {
            setup::run()?;
            util::cargo(&["build", "--release", "--bins"])?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            util::run_privileged("target/release/lb-bench", &args)
        }
    }
}

/// Every test of the workspace. Test binaries that need root run under `sudo -E` when the caller
/// is not root (CI runs as root).
fn test(extra: &[String]) -> Result<()> {
    // Release binaries are what the end-to-end tests start.
    util::cargo(&["build", "--release", "--bins"])?;
    let mut args = vec!["test", "--workspace", "--exclude", "lb-ebpf"];
    args.extend(extra.iter().map(String::as_str));
    util::cargo_as_root(&args)
}
