//! The views as text for people: kubectl-like tables, and a trace's explanation in words (which
//! the JSON carries too). Everything here only formats what `views` built.

use std::fmt::{Display, Write as _};

use comfy_table::{ContentArrangement, Table};

pub mod ct;
pub mod dump;
pub mod services;
pub mod sock_trace;
pub mod stats;
pub mod trace;

/// kubectl-like: a rule under the header, nothing else (see comfy_table's preset format).
const TABLE_STYLE: &str = "     ──            ";

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(TABLE_STYLE)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

/// The value, or `-` when there is none.
fn opt<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Flags joined with commas, or `-` when there are none.
fn joined<N: serde::Serialize>(flags: &crate::decode::Flags<N>) -> String {
    if flags.is_empty() {
        "-".into()
    } else {
        flags.to_string()
    }
}

/// A titled table: `name (n entries)`, then the table or `(empty)`.
fn section(out: &mut String, name: &str, rows: usize, t: Table) {
    let plural = if rows == 1 { "entry" } else { "entries" };
    let _ = writeln!(out, "{name} ({rows} {plural})");
    if rows == 0 {
        out.push_str("  (empty)\n\n");
    } else {
        let _ = writeln!(out, "{t}\n");
    }
}

/// A lifetime in seconds, or how long ago it ran out.
fn expiry(seconds: i64, expired: bool) -> String {
    if expired {
        format!("expired ({}s ago)", -seconds)
    } else {
        seconds.to_string()
    }
}
