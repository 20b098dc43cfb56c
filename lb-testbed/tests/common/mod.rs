//! Shared by the bed's integration tests: the two-node cluster they start from, and the
//! reading of a hostnames answer.

use std::{fmt::Debug, str::FromStr};

use lb_testbed::{Cluster, Wiring};

pub const PORT: u16 = 8080;

/// Two nodes, a hostnames pod on each (`web-0`, `web-1`) and a client pod on node-0.
pub fn two_node_cluster(wiring: Wiring) -> Cluster {
    let mut cluster = Cluster::wired(2, wiring).expect("cluster");
    cluster.add_hostnames_pod(0, "web-0", PORT).expect("web-0");
    cluster.add_hostnames_pod(1, "web-1", PORT).expect("web-1");
    cluster.add_pod(0, "client").expect("client pod");
    cluster
}

/// Splits a hostnames answer into the server's name and the client address it saw.
pub fn parse_answer<A: FromStr<Err: Debug>>(answer: &str) -> (String, A) {
    let (name, peer) = answer
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("not a hostnames answer: {answer:?}"));
    (name.to_owned(), peer.parse().expect("peer address"))
}
