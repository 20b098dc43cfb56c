//! `lb-agent`: the per-node agent of the eBPF Service load balancer (see `lb-agent --help`).

use std::process::ExitCode;

use clap::Parser as _;
use lb_agent::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Some(Command::Cleanup { bpffs_dir }) => cleanup(&bpffs_dir),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(lb_agent::run(cli.run))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lb-agent cleanup`: removes every link and map the agent pinned, and says what it removed.
fn cleanup(bpffs_dir: &std::path::Path) -> anyhow::Result<()> {
    let done = lb_datapath::attach::cleanup(bpffs_dir)?;
    for warning in &done.warnings {
        eprintln!("warning: {warning}");
    }
    if !done.existed {
        println!(
            "nothing to clean up: {} does not exist",
            bpffs_dir.display()
        );
        return Ok(());
    }
    let filters = if done.filters > 0 {
        format!(" and deleted {} classic tc filters", done.filters)
    } else {
        String::new()
    };
    println!(
        "removed {} pinned objects under {}{filters}",
        done.removed,
        bpffs_dir.display()
    );
    Ok(())
}
