//! The gate of every test that needs root (network namespaces, BPF, netfilter).

/// Whether a privileged test may run. Such tests fail, loudly, when run without root: a green
/// run must mean they ran. Setting `LB_SKIP_PRIVILEGED=1` skips them explicitly (returns
/// `false`), for a developer who wants only the unprivileged tests on a workstation.
pub fn require() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("LB_SKIP_PRIVILEGED").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: this test needs root and LB_SKIP_PRIVILEGED=1 is set");
        return false;
    }
    panic!(
        "this test needs root (network namespaces, BPF, netfilter); run `cargo xtask test`, or \
         set LB_SKIP_PRIVILEGED=1 to skip it"
    );
}
