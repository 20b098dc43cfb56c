//! `lbctl maps dump` as tables, one per map, titled with its name and entry count. The maps
//! each address family has its own of (`LB_CT` and `LB6_CT`, ...) share their tables.

use std::fmt::{Display, Write as _};

use comfy_table::Table;
use lb_common::maps as names;

use super::{
    expiry, joined, opt, section,
    stats::{counters_table, verdicts_table},
    table,
};
use crate::views::dump::{AddrRow, BackendRow, CtRow, Dump, ServiceRow};

pub fn text(d: &Dump) -> String {
    let mut out = String::new();
    if let Some(rows) = &d.addrs {
        section(&mut out, names::LB_ADDRS, rows.len(), addrs_table(rows));
    }
    if let Some(rows) = &d.services {
        section(
            &mut out,
            names::LB_SERVICES,
            rows.len(),
            services_table(rows),
        );
    }
    if let Some(rows) = &d.backends {
        section(
            &mut out,
            names::LB_BACKENDS,
            rows.len(),
            backends_table(rows),
        );
    }
    if let Some(rows) = &d.maglev {
        let mut t = table(&["service", "table size", "backend id", "slots", "%"]);
        for r in rows {
            if let Some(e) = &r.error {
                t.add_row(vec![
                    r.set_id.to_string(),
                    r.table_size.to_string(),
                    format!("error: {e}"),
                    String::new(),
                    String::new(),
                ]);
            }
            for s in &r.backends {
                t.add_row(vec![
                    r.set_id.to_string(),
                    r.table_size.to_string(),
                    s.backend_id.to_string(),
                    s.slots.to_string(),
                    format!("{:.2}", s.percent),
                ]);
            }
        }
        section(&mut out, names::LB_MAGLEV, rows.len(), t);
        for r in rows {
            if let Some(table) = &r.table {
                let _ = writeln!(out, "service {} table ({} slots):", r.set_id, table.len());
                for (i, line) in table.chunks(16).enumerate() {
                    let ids: Vec<String> = line.iter().map(u32::to_string).collect();
                    let _ = writeln!(out, "  {:>6}: {}", i * 16, ids.join(" "));
                }
                out.push('\n');
            }
        }
    }
    if let Some(rows) = &d.ct {
        section(&mut out, names::LB_CT, rows.len(), ct_table(rows));
    }
    if let Some(rows) = &d.frags {
        let mut t = table(&["src", "dst", "ip id", "proto", "src port", "dst port"]);
        for r in rows {
            t.add_row(vec![
                r.src.to_string(),
                r.dst.to_string(),
                r.ip_id.to_string(),
                r.proto.to_string(),
                r.src_port.to_string(),
                r.dst_port.to_string(),
            ]);
        }
        section(&mut out, names::LB_FRAGS, rows.len(), t);
    }
    if let Some(rows) = &d.set_stats {
        section(
            &mut out,
            names::LB_SVC_STATS,
            rows.len(),
            counters_table(rows),
        );
    }
    if let Some(rows) = &d.verdicts {
        section(
            &mut out,
            names::LB_VERDICTS,
            rows.len(),
            verdicts_table(rows),
        );
    }
    if let Some(rows) = &d.src_ranges {
        let mut t = table(&["range id", "cidr"]);
        for r in rows {
            t.add_row(vec![r.range_id.to_string(), r.cidr.clone()]);
        }
        section(&mut out, names::LB_SRC_RANGES, rows.len(), t);
    }
    if let Some(rows) = &d.affinity {
        let mut t = table(&[
            "client",
            "service",
            "backend id",
            "backend",
            "age s",
            "timeout s",
            "expires s",
        ]);
        for r in rows {
            t.add_row(vec![
                r.client.to_string(),
                r.set_id.to_string(),
                r.backend_id.to_string(),
                opt(r.backend),
                r.age_s.to_string(),
                opt(r.timeout_s),
                r.expires_in_s
                    .map_or_else(|| "-".into(), |s| expiry(s, s < 0)),
            ]);
        }
        section(&mut out, names::LB_AFFINITY, rows.len(), t);
    }
    if let Some(rows) = &d.config {
        let mut t = table(&[
            "snat address",
            "snat ports",
            "snat",
            "hairpin address",
            "masquerade all",
            "external clusterIPs",
        ]);
        for r in rows {
            t.add_row(vec![
                r.snat_addr.to_string(),
                format!("{}-{}", r.snat_port_min, r.snat_port_max),
                if r.snat_enabled {
                    "enabled".to_owned()
                } else {
                    "disabled (external flows to other nodes' backends are dropped)".to_owned()
                },
                r.hairpin_addr.to_string(),
                r.masquerade_all.to_string(),
                r.external_cluster_ips.to_string(),
            ]);
        }
        section(&mut out, names::LB_CONFIG, rows.len(), t);
    }
    if let Some(rows) = &d.answers {
        let mut t = table(&["answers available", "burst", "rate"]);
        for r in rows {
            t.add_row(vec![
                r.available.to_string(),
                r.burst.to_string(),
                format!("{}/s", r.rate_per_s),
            ]);
        }
        section(&mut out, names::LB_ANSWERS, rows.len(), t);
    }
    if let Some(rows) = &d.direct_nat {
        let mut t = table(&["direct connections given another source port"]);
        for r in rows {
            t.add_row(vec![
                if r.remapped_before {
                    "yes"
                } else {
                    "none so far"
                }
                .to_owned(),
            ]);
        }
        section(&mut out, names::LB_DIRECT_NAT, rows.len(), t);
    }
    if let Some(rows) = &d.affinity_scope {
        let mut t = table(&["set", "shares the affinity of set"]);
        for r in rows {
            t.add_row(vec![r.set_id.to_string(), r.shares_set_id.to_string()]);
        }
        section(&mut out, names::LB_AFFINITY_SCOPE, rows.len(), t);
    }
    if let Some(rows) = &d.sock_rev {
        let mut t = table(&["socket cookie", "proto", "frontend (shown)", "backend"]);
        for r in rows {
            t.add_row(vec![
                r.cookie.to_string(),
                r.proto.to_string(),
                r.frontend.to_string(),
                r.backend.to_string(),
            ]);
        }
        section(&mut out, names::LB_SOCK_REV, rows.len(), t);
    }
    if let Some(rows) = &d.sock_config {
        let mut t = table(&["node's netns cookie", "host only"]);
        for r in rows {
            t.add_row(vec![
                r.host_netns_cookie.to_string(),
                r.host_only.to_string(),
            ]);
        }
        section(&mut out, names::LB_SOCK_CONFIG, rows.len(), t);
    }
    if let Some(rows) = &d.sock_stats {
        let mut t = table(&["set", "connects", "datagrams", "refused"]);
        for r in rows {
            t.add_row(vec![
                r.set_id.to_string(),
                r.connects.to_string(),
                r.datagrams.to_string(),
                r.refused.to_string(),
            ]);
        }
        section(&mut out, names::LB_SOCK_STATS, rows.len(), t);
    }
    if let Some(rows) = &d.filters {
        let mut t = table(&["complete", "reply sources marked", "destinations marked"]);
        for r in rows {
            t.add_row(vec![
                if r.complete {
                    "yes"
                } else {
                    "no (every packet is looked up)"
                }
                .to_owned(),
                format!("{} of {}", r.reply_sources, r.slots),
                format!("{} of {}", r.destinations, r.slots),
            ]);
        }
        section(&mut out, names::LB_FILTERS, rows.len(), t);
    }
    if let Some(rows) = &d.addrs6 {
        section(&mut out, names::LB6_ADDRS, rows.len(), addrs_table(rows));
    }
    if let Some(rows) = &d.services6 {
        section(
            &mut out,
            names::LB6_SERVICES,
            rows.len(),
            services_table(rows),
        );
    }
    if let Some(rows) = &d.backends6 {
        section(
            &mut out,
            names::LB6_BACKENDS,
            rows.len(),
            backends_table(rows),
        );
    }
    if let Some(rows) = &d.ct6 {
        section(&mut out, names::LB6_CT, rows.len(), ct_table(rows));
    }
    out
}

fn addrs_table<I: Display>(rows: &[AddrRow<I>]) -> Table {
    let mut t = table(&["address", "flags"]);
    for r in rows {
        t.add_row(vec![r.addr.to_string(), joined(&r.flags)]);
    }
    t
}

fn services_table<S: Display>(rows: &[ServiceRow<S>]) -> Table {
    let mut t = table(&[
        "frontend",
        "proto",
        "scope",
        "service",
        "backends",
        "backend id",
        "table size",
        "flags",
        "affinity s",
        "range id",
    ]);
    for r in rows {
        let s = &r.service;
        t.add_row(vec![
            r.frontend.to_string(),
            r.proto.to_string(),
            r.scope.to_string(),
            s.set_id.to_string(),
            s.backend_count.to_string(),
            s.backend_id.to_string(),
            s.table_size.to_string(),
            joined(&s.flags),
            s.affinity_timeout_s.to_string(),
            s.source_range_id.to_string(),
        ]);
    }
    t
}

fn backends_table<S: Display>(rows: &[BackendRow<S>]) -> Table {
    let mut t = table(&["backend id", "address", "flags"]);
    for r in rows {
        t.add_row(vec![
            r.backend_id.to_string(),
            r.addr.to_string(),
            joined(&r.flags),
        ]);
    }
    t
}

fn ct_table<S: Display + Copy>(rows: &[CtRow<S>]) -> Table {
    let mut t = table(&[
        "dir",
        "src",
        "dst",
        "proto",
        "nat",
        "backend id",
        "service",
        "flags",
        "expires s",
        "snat",
    ]);
    for r in rows {
        t.add_row(vec![
            r.dir.to_string(),
            r.src.to_string(),
            r.dst.to_string(),
            r.proto.to_string(),
            r.nat.to_string(),
            r.backend_id.to_string(),
            r.set_id.to_string(),
            joined(&r.flags),
            expiry(r.expires_in_s, r.expired),
            if r.dsr { "dsr".to_owned() } else { opt(r.snat) },
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV6;

    use super::*;
    use crate::{
        decode::{BackendFlag, Flags},
        views::dump::BackendRow6,
    };

    #[test]
    fn ipv6_maps_have_the_tables_of_their_ipv4_counterparts() {
        let addr: SocketAddrV6 = "[fd00:1::5]:8080".parse().unwrap();
        let row = BackendRow6 {
            backend_id: 9,
            addr,
            flags: Flags::<BackendFlag>::decode(1_u8),
            flags_raw: 1,
        };
        let dump = Dump {
            backends6: Some(vec![row]),
            ct6: Some(Vec::new()),
            ..Dump::default()
        };
        let text = text(&dump);
        for needle in [
            "LB6_BACKENDS (1 entry)",
            "backend id",
            "[fd00:1::5]:8080",
            "active",
            "LB6_CT (0 entries)",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
