//! Confidence intervals for the ratio of two datapaths' rates.
//!
//! Runs of the datapaths alternate, so run i of one and run i of the other are measured within
//! seconds of each other: a drift of the machine (another job starting, a CPU's frequency)
//! moves both. The ratio is therefore taken per round and the rounds averaged: the geometric
//! mean of the paired ratios, with Student's t interval on their logarithms (ratios are
//! skewed; their logarithms are symmetric around 0 when nothing differs).

use serde::Serialize;

/// A ratio and its 95% confidence interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Ratio {
    /// Geometric mean of the paired ratios.
    pub ratio: f64,
    /// The 95% interval; none from a single pair.
    pub low: Option<f64>,
    pub high: Option<f64>,
    /// Pairs it comes from.
    pub pairs: usize,
}

impl Ratio {
    /// `0.99 [0.97, 1.01]`, or `0.99 (1 run)` without an interval.
    pub fn text(&self) -> String {
        match (self.low, self.high) {
            (Some(low), Some(high)) => format!("{:.2} [{low:.2}, {high:.2}]", self.ratio),
            _ => format!("{:.2} ({} run)", self.ratio, self.pairs),
        }
    }

    /// Whether the whole interval is at least `floor` (false without an interval).
    pub fn at_least(&self, floor: f64) -> bool {
        self.low.is_some_and(|low| low >= floor)
    }
}

/// The two-sided 95% quantile of Student's t distribution with `df` degrees of freedom.
pub fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        // Within 0.5% of the exact quantile from 31 on.
        _ => 1.960 + 2.4 / df as f64,
    }
}

/// `a / b` over rounds `(a_i, b_i)`; pairs with a non-positive or non-finite member are left
/// out (a failed run). None without any pair.
pub fn paired_ratio(pairs: &[(f64, f64)]) -> Option<Ratio> {
    let logs: Vec<f64> = pairs
        .iter()
        .filter(|(a, b)| a.is_finite() && b.is_finite() && *a > 0.0 && *b > 0.0)
        .map(|(a, b)| (a / b).ln())
        .collect();
    let n = logs.len();
    if n == 0 {
        return None;
    }
    let mean = logs.iter().sum::<f64>() / n as f64;
    let (low, high) = if n >= 2 {
        let var = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let half = t95(n - 1) * (var / n as f64).sqrt();
        (Some((mean - half).exp()), Some((mean + half).exp()))
    } else {
        (None, None)
    };
    Some(Ratio {
        ratio: mean.exp(),
        low,
        high,
        pairs: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_rates_give_one_with_a_zero_width_interval() {
        let r = paired_ratio(&[(100.0, 100.0), (120.0, 120.0), (90.0, 90.0)]).unwrap();
        assert!((r.ratio - 1.0).abs() < 1e-12);
        assert!((r.low.unwrap() - 1.0).abs() < 1e-12);
        assert!((r.high.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(r.pairs, 3);
        assert!(r.at_least(0.98));
    }

    #[test]
    fn a_drift_common_to_both_datapaths_cancels() {
        // The machine slows down by half between rounds; the ratio stays at 0.9.
        let r = paired_ratio(&[(90.0, 100.0), (45.0, 50.0), (63.0, 70.0)]).unwrap();
        assert!((r.ratio - 0.9).abs() < 1e-12);
        assert!((r.high.unwrap() - r.low.unwrap()).abs() < 1e-12);
        assert!(!r.at_least(0.98));
    }

    #[test]
    fn the_interval_is_students_on_the_logarithms() {
        // ln ratios 0.1 and -0.1: mean 0, sd 0.1414, half width t(1) * 0.1414 / sqrt 2 = 1.2706.
        let r = paired_ratio(&[(0.1f64.exp(), 1.0), ((-0.1f64).exp(), 1.0)]).unwrap();
        assert!((r.ratio - 1.0).abs() < 1e-12);
        assert!((r.low.unwrap().ln() + 1.2706).abs() < 1e-9);
        assert!((r.high.unwrap().ln() - 1.2706).abs() < 1e-9);
        // A wide interval decides nothing: it reaches below the floor.
        assert!(!r.at_least(0.98));
    }

    #[test]
    fn one_pair_has_no_interval_and_failed_runs_are_left_out() {
        let r = paired_ratio(&[(99.0, 100.0), (0.0, 100.0), (f64::NAN, 1.0)]).unwrap();
        assert_eq!(r.pairs, 1);
        assert_eq!((r.low, r.high), (None, None));
        assert!(!r.at_least(0.5));
        assert_eq!(r.text(), "0.99 (1 run)");
        assert_eq!(paired_ratio(&[]), None);
    }

    #[test]
    fn t_quantiles_fall_towards_the_normal_one() {
        assert!((t95(1) - 12.706).abs() < 1e-9);
        assert!((t95(30) - 2.042).abs() < 1e-9);
        // Exact: t(60) = 2.000, t(120) = 1.980.
        assert!((t95(60) - 2.000).abs() < 0.01);
        assert!((t95(120) - 1.980).abs() < 0.01);
        let mut last = f64::INFINITY;
        for df in 0..200 {
            assert!(t95(df) < last || df == 0);
            last = t95(df);
        }
    }
}
