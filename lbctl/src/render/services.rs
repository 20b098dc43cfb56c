//! `lbctl service list` as a table: one row per frontend, its backends one per line.

use super::table;
use crate::views::services::ServiceListRow;

pub fn text(rows: &[ServiceListRow]) -> String {
    // Counters belong to the backend set, which a Service's frontends share (its ClusterIP and
    // NodePorts): the headers say so, so that equal figures on two rows are not read as traffic
    // that each frontend took.
    let mut t = table(&[
        "frontend",
        "set",
        "backends (slots)",
        "flags",
        "set packets",
        "set bytes",
        "set new flows",
        "set socket calls",
    ]);
    for r in rows {
        let s = &r.service;
        let backends = if r.backends.is_empty() {
            r.error
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |e| format!("error: {e}"))
        } else {
            r.backends
                .iter()
                .map(|b| {
                    let share = match b.slots {
                        Some(slots) => format!("{slots} slots, {:.2}%", b.percent),
                        None => "single".to_owned(),
                    };
                    let local = if b.local { " local" } else { "" };
                    match b.addr {
                        Some(addr) => {
                            format!("{} {addr} {}{local} ({share})", b.backend_id, b.state)
                        }
                        None => format!("{} {} ({share})", b.backend_id, b.state),
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut flags: Vec<String> = s.flags.iter().map(ToString::to_string).collect();
        if s.affinity_timeout_s != 0 {
            flags.push(format!("affinity {}s", s.affinity_timeout_s));
        }
        if s.source_range_id != 0 {
            flags.push(format!(
                "ranges #{}: {}",
                s.source_range_id,
                if r.source_ranges.is_empty() {
                    "(none: every source dropped)".to_owned()
                } else {
                    r.source_ranges.join(" ")
                }
            ));
        }
        if r.cluster_ip {
            flags.insert(0, "cluster_ip".into());
        }
        t.add_row(vec![
            format!("{}/{} {}", r.frontend, r.proto, r.scope),
            s.set_id.to_string(),
            backends,
            if flags.is_empty() {
                "-".into()
            } else {
                flags.join("\n")
            },
            r.packets.to_string(),
            r.bytes.to_string(),
            r.new_flows.to_string(),
            socket_calls(r),
        ]);
    }
    if rows.is_empty() {
        return "no frontends installed\n".into();
    }
    format!("{t}\n")
}

/// The socket programs' work for the row's set: `-` when they did nothing (socket-level
/// balancing off, or no calls yet).
fn socket_calls(r: &ServiceListRow) -> String {
    let s = r.socket;
    if s.connects == 0 && s.datagrams == 0 && s.refused == 0 {
        return "-".into();
    }
    format!(
        "{} connects\n{} datagrams\n{} refused",
        s.connects, s.datagrams, s.refused
    )
}
