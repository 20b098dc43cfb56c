//! Shared by the integration tests: the privilege gate, packet builders and the datapath harness.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod agent;
pub mod harness;
#[allow(unused_imports, reason = "used by some test binaries only")]
pub use lb_testbed::packet;

/// Privileged tests need root (BPF, network namespaces). They fail, loudly, when run without it:
/// a green run must mean they ran. Setting `LB_SKIP_PRIVILEGED=1` skips them explicitly, for a
/// developer who wants only the unprivileged tests on a workstation.
pub fn require_privileges() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("LB_SKIP_PRIVILEGED").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: this test needs root and LB_SKIP_PRIVILEGED=1 is set");
        return false;
    }
    panic!(
        "this test needs root (BPF and network namespaces); run `cargo xtask test`, or set LB_SKIP_PRIVILEGED=1 to skip it"
    );
}
