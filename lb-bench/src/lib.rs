//! The benchmark's library part: the baselines it measures against and the measurements that
//! drive real processes, usable from tests. Depends on `lb-datapath` (never on the agent's
//! crates: it runs the agent as a binary) and `lb-testbed`.

pub mod agent;
pub mod controlplane;
pub mod kubeproxy;
