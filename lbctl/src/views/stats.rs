//! `lbctl stats`: the verdict counters and the per-set counters.

use lb_datapath::maps::{Maps, MapsError};
use serde::Serialize;

use super::rows::{self, ServiceCounters, VerdictRow};

/// `lbctl stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Every reason, in `Reason` order, zeros included.
    pub verdicts: Vec<VerdictRow>,
    /// Backend sets with a non-zero counter, by set id.
    pub services: Vec<ServiceCounters>,
}

pub fn read(maps: &Maps) -> Result<Stats, MapsError> {
    Ok(Stats {
        verdicts: rows::read_verdicts(maps)?,
        services: rows::read_set_stats(maps)?,
    })
}
