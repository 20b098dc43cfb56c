//! `lbctl ct list` as a table: one row per flow, each direction's flags and lifetime in words.

use super::{opt, table};
use crate::views::ct::{CtSide, FlowRow};

pub fn text(rows: &[FlowRow]) -> String {
    if rows.is_empty() {
        return "no conntrack entries\n".into();
    }
    let mut t = table(&[
        "proto", "client", "frontend", "backend", "service", "forward", "reply", "snat",
    ]);
    for r in rows {
        // A direct connection given another source port has no frontend, backend set or
        // backend id (`conntrack::DIRECT`).
        let (frontend, backend, service) = if r.direct {
            ("(direct)".to_owned(), r.backend.to_string(), "-".to_owned())
        } else if r.dsr && r.forward.is_none() {
            // The reply half of another node's DSR flow: its frontend and set are that node's.
            (
                r.frontend.to_string(),
                r.backend.to_string(),
                "(other node)".to_owned(),
            )
        } else {
            (
                r.frontend.to_string(),
                format!("{} (id {})", r.backend, r.backend_id),
                r.set_id.to_string(),
            )
        };
        t.add_row(vec![
            r.proto.to_string(),
            r.client.to_string(),
            frontend,
            backend,
            service,
            side(r.forward.as_ref()),
            side(r.reply.as_ref()),
            if r.dsr { "dsr".to_owned() } else { opt(r.snat) },
        ]);
    }
    format!("{t}\n")
}

fn side(side: Option<&CtSide>) -> String {
    let Some(s) = side else {
        return "(none)".to_owned();
    };
    let life = if s.expired {
        format!("expired {}s ago", -s.expires_in_s)
    } else {
        format!("{}s left", s.expires_in_s)
    };
    if s.flags.is_empty() {
        life
    } else {
        format!("{} {life}", s.flags)
    }
}
