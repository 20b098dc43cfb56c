//! Test beds in network namespaces: nodes, pods behind veths, servers that answer with their name
//! and the client address they see (like Kubernetes' `hostnames` app), and clients.
//!
//! Every name is unique per process and bed, everything is removed on drop (also when a test
//! panics), and no traffic leaves the namespaces: no interface of the host is touched.

pub mod netns;
pub mod node;
pub mod packet;
pub mod server;

pub use netns::Netns;
pub use node::{Node, Pod};
