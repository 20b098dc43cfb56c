//! `lbctl trace-connect` in words.

use crate::views::sock_trace::SockTrace;

pub fn text(t: &SockTrace) -> String {
    let call = format!(
        "{}() from a {} socket to {}/{}",
        t.call, t.from, t.dst, t.proto
    );
    match t.decision {
        "translated" => format!(
            "{call}: translated to backend {} (id {}, {}); getpeername() and recvfrom() show {}\n",
            t.backend.map_or_else(String::new, |b| b.to_string()),
            t.backend_id.unwrap_or_default(),
            t.selection.as_deref().unwrap_or("-"),
            t.frontend.map_or_else(String::new, |f| f.to_string()),
        ),
        "refused" => format!(
            "{call}: fails at once with ECONNREFUSED: {}\n",
            t.why.unwrap_or("-")
        ),
        "left" => format!(
            "{call}: not translated by the socket programs ({}); the packet path sees its packets (a pod's), or nothing does (the node's)\n",
            t.why.unwrap_or("-")
        ),
        _ => format!("{call}: no frontend there; the call goes where it asked\n"),
    }
}
