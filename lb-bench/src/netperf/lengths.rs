//! How long a netperf run lasts, and which client ports its TCP_CRR cycles through.

use std::time::Duration;

use super::{Sample, Test};

/// The client ports TCP_CRR cycles through for the `index`th datapath (netperf's `-p`).
///
/// The server closes each TCP_CRR connection first, so it holds a TIME_WAIT socket for every
/// client port, and accepts a new SYN on the same ports only if its TCP timestamp is newer
/// (PAWS). A client's timestamps carry a random offset (per connection on recent kernels, per
/// pair of addresses on older ones): a datapath reusing ports another one used in the last
/// 60 s would see some of its SYNs refused and stall on retransmissions. Disjoint ranges keep
/// each datapath to its own ports.
pub fn crr_ports(index: usize, datapaths: usize) -> (u16, u16) {
    ports_of(5_000, 60_999, index, datapaths)
}

/// [`crr_ports`] for the NodePort path: within Linux's ephemeral ports (32768-60999), what an
/// external Linux client uses. The agent's default SNAT range is wider, so each of these ports
/// has a home port of its own (`lb_common::snat::home`) and the datapaths' ranges map to
/// disjoint SNAT ports: no variant of ours inherits another's TIME_WAITs, and each one's runs,
/// back to back on the same ports round after round, measure the steady state an operator's
/// node reaches, with its one default range.
pub fn nodeport_crr_ports(index: usize, datapaths: usize) -> (u16, u16) {
    ports_of(32_768, 60_999, index, datapaths)
}

/// The `index`th of `datapaths` equal ranges of `first..=last`.
fn ports_of(first: u32, last: u32, index: usize, datapaths: usize) -> (u16, u16) {
    let width = (last - first + 1) / datapaths.max(1) as u32;
    let min = first + width * index as u32;
    (min as u16, (min + width - 1) as u16)
}

/// How long a counted netperf run may take (a few seconds when nothing stalls).
pub(super) const COUNTED_LIMIT: Duration = Duration::from_secs(30);

/// How long one netperf run lasts (netperf's `-l`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    Seconds(u32),
    /// This many transactions. A timed TCP_CRR costs 4 s more than its length: netserver
    /// blocks in accept() until its own timer, set 4 s (netperf's `PAD_TIME`) past the test's
    /// length, fires; a counted one ends with its last transaction.
    Transactions(u32),
}

impl Length {
    pub(super) fn arg(self) -> String {
        match self {
            Self::Seconds(s) => s.to_string(),
            Self::Transactions(n) => format!("-{n}"),
        }
    }
}

/// How long each run lasts: `seconds`, but TCP_CRR counts transactions where it can (a timed
/// one costs 4 s more, see [`Length::Transactions`]). A counted run lasts as long as its
/// stalls make it (up to 30 s, then it fails), so counting needs a rate to aim at and a path
/// that does not stall on SYN retransmissions.
#[derive(Default)]
pub struct Lengths {
    /// Per path: its first TCP_CRR sample's rate ([`Lengths::length`]).
    crr_rates: Vec<(&'static str, f64)>,
    /// Per (path, datapath): its latest TCP_CRR sample's rate and p99, in µs
    /// ([`Lengths::datapath_length`]).
    latest_crr: Vec<(&'static str, String, f64, Option<f64>)>,
}

/// A p99 under this (µs) means that fewer than 1% of a run's connections stalled on a SYN
/// retransmission (about 10 ms each, see the report).
const NO_STALLS_P99_US: f64 = 5_000.0;

/// The TCP_CRR rate a datapath's first counted run aims at, per second: about what one netperf
/// stream makes on a 2-CPU machine without a load balancer.
const FIRST_CRR_RATE: f64 = 20_000.0;

impl Lengths {
    /// For a path whose datapaths' TCP_CRR runs must not wrap around their client ports
    /// ([`crr_ports`]; the socket-lb part's kube-proxy variant draws random source ports): as
    /// many transactions as the path's first TCP_CRR made in `seconds` (2,000 per second for
    /// that first one), and at most 90% of a datapath's ports.
    pub fn length(&self, path: &str, test: Test, seconds: u32, port_ranges: usize) -> Length {
        if test != Test::TcpCrr {
            return Length::Seconds(seconds);
        }
        let rate = self
            .crr_rates
            .iter()
            .find(|r| r.0 == path)
            .map_or(2_000.0, |r| r.1);
        let (min, max) = crr_ports(0, port_ranges);
        let cap = f64::from(max - min + 1) * 0.9;
        Length::Transactions((rate * f64::from(seconds)).clamp(500.0, cap) as u32)
    }

    /// For a run of `test` by `datapath` whose TCP_CRR may come back to its client ports: as
    /// many transactions as the datapath's latest TCP_CRR on this path made in `seconds`
    /// ([`FIRST_CRR_RATE`] for the first), so that each run lasts about `seconds` however fast
    /// the datapath is. Coming back is harmless when the backend sees each client port as the
    /// same four addresses and ports every time: its TIME_WAIT takes a SYN with newer
    /// timestamps. Where the backend may see another client's connection on a port in
    /// TIME_WAIT (`may_stall`: a source NAT that draws its ports at random), a run is timed
    /// until the datapath's latest one showed no stalls ([`NO_STALLS_P99_US`]): a counted run
    /// lasts as long as its stalls make it. (Any count measures the rate alike; the timing
    /// only bounds how long a run takes.)
    pub fn datapath_length(
        &self,
        path: &str,
        datapath: &str,
        test: Test,
        seconds: u32,
        may_stall: bool,
    ) -> Length {
        if test != Test::TcpCrr {
            return Length::Seconds(seconds);
        }
        let latest = self
            .latest_crr
            .iter()
            .find(|r| r.0 == path && r.1 == datapath);
        let rate = match latest {
            Some(&(_, _, rate, Some(p99))) if !may_stall || p99 < NO_STALLS_P99_US => rate,
            Some(&(_, _, rate, None)) if !may_stall => rate,
            None if !may_stall => FIRST_CRR_RATE,
            _ => return Length::Seconds(seconds),
        };
        Length::Transactions((rate * f64::from(seconds)).max(500.0) as u32)
    }

    /// Learns from a TCP_CRR sample: its path's rate if it is the path's first, and its
    /// datapath's latest rate and p99 on the path.
    pub fn record(&mut self, s: &Sample) {
        if s.test != Test::TcpCrr.name() {
            return;
        }
        if !self.crr_rates.iter().any(|r| r.0 == s.path) {
            self.crr_rates.push((s.path, s.rate));
        }
        self.latest_crr
            .retain(|r| !(r.0 == s.path && r.1 == s.datapath));
        self.latest_crr
            .push((s.path, s.datapath.clone(), s.rate, s.p99_us));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crr(path: &'static str, datapath: &str, rate: f64, p99_us: f64) -> Sample {
        Sample {
            datapath: datapath.to_owned(),
            path,
            test: Test::TcpCrr.name(),
            services: 1,
            run: 0,
            rate,
            unit: "Trans/s".to_owned(),
            p50_us: Some(30.0),
            p90_us: Some(50.0),
            p99_us: Some(p99_us),
            cpu_us_per_unit: 0.0,
            softirq_us_per_unit: 0.0,
        }
    }

    #[test]
    fn a_path_that_does_not_stall_counts_at_each_datapaths_latest_rate() {
        let mut lengths = Lengths::default();
        let first = lengths.datapath_length("pod", "ours", Test::TcpCrr, 2, false);
        assert_eq!(first, Length::Transactions(40_000));
        lengths.record(&crr("pod", "ours", 25_000.0, 100.0));
        lengths.record(&crr("pod", "iptables", 5_000.0, 100.0));
        lengths.record(&crr("pod", "ours", 27_000.0, 100.0));
        assert_eq!(
            lengths.datapath_length("pod", "ours", Test::TcpCrr, 2, false),
            Length::Transactions(54_000)
        );
        assert_eq!(
            lengths.datapath_length("pod", "iptables", Test::TcpCrr, 2, false),
            Length::Transactions(10_000)
        );
        assert_eq!(
            lengths.datapath_length("pod", "ours", Test::TcpRr, 2, false),
            Length::Seconds(2)
        );
    }

    #[test]
    fn a_path_that_may_stall_is_timed_until_the_datapaths_latest_run_had_no_stalls() {
        let mut lengths = Lengths::default();
        let np = "external -> NodePort";
        assert_eq!(
            lengths.datapath_length(np, "ours", Test::TcpCrr, 2, true),
            Length::Seconds(2)
        );
        lengths.record(&crr(np, "ours", 20_000.0, 120.0));
        lengths.record(&crr(np, "nftables", 1_500.0, 13_000.0));
        assert_eq!(
            lengths.datapath_length(np, "ours", Test::TcpCrr, 2, true),
            Length::Transactions(40_000)
        );
        assert_eq!(
            lengths.datapath_length(np, "nftables", Test::TcpCrr, 2, true),
            Length::Seconds(2)
        );
        // Stalls in a later run: timed again.
        lengths.record(&crr(np, "ours", 3_000.0, 11_000.0));
        assert_eq!(
            lengths.datapath_length(np, "ours", Test::TcpCrr, 2, true),
            Length::Seconds(2)
        );
    }

    #[test]
    fn a_path_that_must_not_wrap_stays_below_its_ports() {
        let mut lengths = Lengths::default();
        let (min, max) = crr_ports(0, 4);
        let cap = (f64::from(max - min + 1) * 0.9) as u32;
        assert_eq!(
            lengths.length("node", Test::TcpCrr, 1, 4),
            Length::Transactions(2_000)
        );
        lengths.record(&crr("node", "direct", 28_000.0, 90.0));
        assert_eq!(
            lengths.length("node", Test::TcpCrr, 1, 4),
            Length::Transactions(cap)
        );
    }
}
