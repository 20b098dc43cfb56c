//! The SVG plots of the netperf figures: each metric versus the number of services, one line
//! per datapath.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{Cells, paths_of};
use crate::netperf::{LOCAL_NODEPORT, NODEPORT};

/// One line per datapath of `test`'s `metric` versus number of services, for `path`.
pub fn plot(cells: &Cells, path: &str, test: &str, metric: Metric, file: &Path) -> Result<()> {
    let mut lines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for ((p, t, dp, size), cell) in cells {
        if p != path || t != test {
            continue;
        }
        let y = match metric {
            Metric::Rate => Some(cell.median),
            Metric::P99 => cell.p99_us,
        };
        if let Some(y) = y {
            lines
                .entry(dp.clone())
                .or_default()
                .push((f64::from((*size).max(1)), y));
        }
    }
    if lines.is_empty() {
        return Ok(());
    }
    let x_max = lines.values().flatten().map(|p| p.0).fold(1.0, f64::max) * 2.0;
    let y_max = lines.values().flatten().map(|p| p.1).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(file, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("{test}, {path}: {}", metric.label());
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((0.8f64..x_max).log_scale(), 0f64..y_max.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("services")
        .y_desc(metric.label())
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    let palette = [&BLUE, &RED, &GREEN, &BLACK, &MAGENTA, &CYAN];
    for (i, (dp, mut points)) in lines.into_iter().enumerate() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = palette[i % palette.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(dp)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

#[derive(Clone, Copy)]
pub enum Metric {
    Rate,
    P99,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Self::Rate => "rate (transactions/s, or Mb/s)",
            Self::P99 => "p99 latency (µs)",
        }
    }
}

/// Writes every plot into `dir`; returns the files, relative to `dir`'s parent's parent (the
/// repository root) for linking.
pub fn plots(cells: &Cells, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    for path in &paths_of(cells) {
        let slug = match path.as_str() {
            NODEPORT => "nodeport",
            LOCAL_NODEPORT => "nodeport_local",
            _ => "clusterip",
        };
        for (test, metric, name) in [
            ("TCP_CRR", Metric::Rate, "tcp_crr_rate"),
            ("TCP_CRR", Metric::P99, "tcp_crr_p99"),
            ("TCP_RR", Metric::Rate, "tcp_rr_rate"),
            ("TCP_STREAM", Metric::Rate, "tcp_stream"),
        ] {
            let file = dir.join(format!("{name}_{slug}.svg"));
            plot(cells, path, test, metric, &file)?;
            if file.exists() {
                files.push(file);
            }
        }
    }
    Ok(files)
}
