//! `lbctl stats` as two tables, verdicts and backend sets; `maps dump` shows the same tables.

use std::fmt::Write as _;

use comfy_table::Table;

use super::table;
use crate::views::{
    rows::{ServiceCounters, VerdictRow},
    stats::Stats,
};

pub fn text(s: &Stats) -> String {
    let mut out = String::from("verdicts\n");
    let _ = writeln!(out, "{}\n", verdicts_table(&s.verdicts));
    out.push_str("services\n");
    if s.services.is_empty() {
        out.push_str("  (no traffic counted)\n");
    } else {
        let _ = writeln!(out, "{}", counters_table(&s.services));
    }
    out
}

pub(super) fn counters_table(rows: &[ServiceCounters]) -> Table {
    let mut t = table(&["service", "packets", "bytes", "new flows"]);
    for r in rows {
        t.add_row(vec![
            r.set_id.to_string(),
            r.packets.to_string(),
            r.bytes.to_string(),
            r.new_flows.to_string(),
        ]);
    }
    t
}

pub(super) fn verdicts_table(rows: &[VerdictRow]) -> Table {
    let mut t = table(&["reason", "packets", "bytes"]);
    for r in rows {
        t.add_row(vec![
            r.reason.name().to_owned(),
            r.packets.to_string(),
            r.bytes.to_string(),
        ]);
    }
    t
}
