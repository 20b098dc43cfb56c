//! The datapath as a library: everything about the BPF programs and maps that does not depend on
//! where the desired state comes from.
//!
//! - [`loader`]: the BPF object, loaded with private or pinned maps, and the reader of its
//!   rare-event records ([`EventLog`]); [`features`]: what the kernel offers; [`attach`]:
//!   programs attached to interfaces through pinned links (or classic tc filters), and removing
//!   all of it again; [`socket_lb`]: the socket programs attached to a cgroup v2 directory.
//! - [`maps`]: typed handles on every map; [`maglev`]: the consistent-hashing tables.
//! - [`model`] (the desired state as plain data) -> [`planner`] (the ordered map writes that
//!   program it) -> [`writer`] (carries them out); [`adopt`] reads the maps back into the
//!   planner's shadow when an agent starts on a pinned datapath; [`program`]: a small helper
//!   over the planner and writer with which tests and benchmarks program services the same way.
//! - [`predict`]: what the datapath does with a packet, from the live maps and the same rules
//!   (`lb_common`) the programs use.
//! - `testing` (feature `test-helpers`): the programs run on crafted frames, for the packet tests
//!   here and in `lbctl`.
//!
//! Depends on `lb-common` and aya (with aya-log and `log`) only: no Kubernetes, HTTP or metrics
//! crates. `lb-agent`, `lbctl`, the tests and the benchmarks build on it.

pub mod adopt;
pub mod attach;
pub mod bpffs;
pub mod ct_carry;
pub mod features;
pub mod filters;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod planner;
pub mod predict;
pub mod predict_sock;
pub mod program;
pub mod sock_close;
pub mod socket_lb;
mod sys;
pub mod tc_record;
#[cfg(feature = "test-helpers")]
pub mod testing;
pub mod uplink;
pub mod writer;

pub use loader::{Capacities, Datapath, DatapathError, EventLog, Pinning};

/// The BPF object holding every datapath program, built by this crate's build script.
pub static LB_EBPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
