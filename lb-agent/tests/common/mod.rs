//! Shared by the agent's integration tests: a node with the real agent, and the privilege gate.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod agent;
pub mod external;
pub use lb_testbed::privileges::require as require_privileges;
