//! Test beds in network namespaces: nodes, pods behind veths, servers that answer with their name
//! and the client address they see (like Kubernetes' `hostnames` app), and clients; a whole
//! multi-node cluster on a LAN with an external client ([`Cluster`]), the real agent on each of
//! its nodes ([`Agents`]) and the Kubernetes objects they read ([`manifests`]).
//!
//! The beds are dual-stack: every pod, node and external client has an IPv6 address too, the
//! twin of its IPv4 one ([`addressing::ipv6_twin`]), with routes to match, and the servers
//! answer both families.
//!
//! Every name is unique per process and bed, everything is removed on drop (also when a test
//! panics), and no traffic leaves the namespaces: no interface of the host is touched.
//!
//! Depends on nothing of the project (it runs the agent as a binary), so that the tests of every
//! crate, the demo and the benchmarks can use it.

pub mod addressing;
pub mod agents;
pub mod cgroup;
pub mod cluster;
pub mod ethtool;
pub mod interrupt;
pub mod manifests;
pub mod netns;
pub mod node;
pub mod packet;
pub mod privileges;
pub mod server;
pub mod sock_client;
pub mod source_dir;
pub mod temp_dir;
pub mod xdp;

pub use addressing::AddressPlan;
pub use agents::{Agents, SocketLb};
pub use cgroup::Cgroup;
pub use cluster::{Cluster, NodeCgroups, PodRef, Wiring};
pub use netns::Netns;
pub use node::{Node, Pod};
pub use sock_client::SockClient;
pub use source_dir::SourceDir;
