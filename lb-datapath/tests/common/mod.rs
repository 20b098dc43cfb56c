//! Shared by the datapath's integration tests: the privilege gate, packet builders, the frames the
//! datapath must send back, and the datapath harness.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod bpffs;
pub mod expected;
pub mod external;
pub mod fuzz;
pub mod harness;
pub mod sockets;
#[allow(unused_imports, reason = "used by some test binaries only")]
pub use lb_testbed::packet;
pub use lb_testbed::privileges::require as require_privileges;
