//! The load balancer's userspace: loading and pinning the datapath, the typed map handles,
//! Maglev, and what the agent and lbctl share.

pub mod adopt;
pub mod agent;
pub mod datapath;
pub mod desired;
pub mod inspect;
pub mod install;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod planner;
pub mod predict;
pub mod source;
mod sys;
pub mod translate;
pub mod writer;

/// The BPF object holding every datapath program, built by this crate's build script.
pub static LB_EBPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
