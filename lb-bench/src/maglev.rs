//! Maglev table generation: time to build one table, and the disruption when one backend of N
//! leaves (slots that move although their backend stayed; the Maglev paper's ideal is zero, its
//! bound about 1% of the table).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use anyhow::Result;
use lb_datapath::maglev::{self, MaglevBackend};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct MaglevFigure {
    pub table_size: u32,
    pub backends: usize,
    /// Median time to build one table.
    pub build_us: f64,
    /// Slots whose backend changed although that backend is still there, as a fraction of the
    /// table, when one backend is removed.
    pub disruption: f64,
    /// Slots the removed backend held, as a fraction of the table (they must move).
    pub removed_share: f64,
}

fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| {
            let addr = SocketAddrV4::new(Ipv4Addr::from(0x0a64_0000 + i as u32), 8080);
            MaglevBackend {
                id: i as u32 + 1,
                key: maglev::backend_key_v4(addr),
                weight: 1,
            }
        })
        .collect()
}

pub fn run(table_sizes: &[u32], counts: &[usize], repeats: usize) -> Result<Vec<MaglevFigure>> {
    let mut out = Vec::new();
    for &m in table_sizes {
        for &n in counts {
            let all = backends(n);
            let mut times = Vec::new();
            let mut table = Vec::new();
            for _ in 0..repeats.max(1) {
                let started = Instant::now();
                table = maglev::build_table(&all, m)?;
                times.push(started.elapsed().as_secs_f64() * 1e6);
            }
            times.sort_by(f64::total_cmp);
            // Remove the middle backend.
            let gone = all[n / 2].id;
            let rest: Vec<MaglevBackend> = all.iter().filter(|b| b.id != gone).cloned().collect();
            let after = maglev::build_table(&rest, m)?;
            let moved_needlessly = table
                .iter()
                .zip(&after)
                .filter(|(before, now)| **before != gone && before != now)
                .count();
            let removed = table.iter().filter(|b| **b == gone).count();
            out.push(MaglevFigure {
                table_size: m,
                backends: n,
                build_us: times[times.len() / 2],
                disruption: moved_needlessly as f64 / f64::from(m),
                removed_share: removed as f64 / f64::from(m),
            });
        }
    }
    Ok(out)
}
