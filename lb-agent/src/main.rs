//! `lb-agent`: the per-node agent of the eBPF Service load balancer (see `lb-agent --help`).

use std::process::ExitCode;

use clap::Parser as _;
use lb_agent::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc's malloc. The agent's state is hundreds of thousands of small
/// allocations (names, addresses, ports of every Service and endpoint): jemalloc packs them in
/// size classes from 8 bytes, where glibc gives each at least 32 and a header, and keeps freed
/// memory per thread arena. At 10,000 Services the agent's peak RSS went from 59 to 66 MiB
/// (glibc) to 48 MiB, with the same time to ready (`cargo xtask bench`, control plane).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`_RJEM_MALLOC_CONF` in the environment
/// still overrides them):
/// - one arena: the agent's threads allocate little at once, and each arena would keep its own
///   free memory;
/// - freed pages go back to the kernel at once (no decay): the initial listing frees as much as
///   it keeps, and would otherwise leave that resident until the next purge;
/// - thread caches only for allocations up to 1 KiB.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: ConfString =
    ConfString(c"narenas:1,tcache_max:1024,dirty_decay_ms:0,muzzy_decay_ms:0".as_ptr());

/// A C string jemalloc reads as its `const char *malloc_conf`.
#[repr(transparent)]
struct ConfString(*const std::ffi::c_char);

// SAFETY: it points to a static, immutable C string.
unsafe impl Sync for ConfString {}

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
