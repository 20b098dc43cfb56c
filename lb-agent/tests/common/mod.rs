//! Shared by the agent's integration tests: a node with the real agent, and the privilege gate.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod agent;
pub mod external;
pub use lb_testbed::privileges::require as require_privileges;

/// Polls `check` for up to 5 s; fails with `what` and the agents' `logs` when it never holds.
pub fn wait_until(what: &str, check: impl Fn() -> bool, logs: impl FnOnce() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(check(), "{what}: not within 5 s; agent logs:\n{}", logs());
}
