//! The benchmark's library part: the baselines it measures against and the measurements that
//! drive real processes, usable from tests.

pub mod agent;
pub mod controlplane;
pub mod kubeproxy;
