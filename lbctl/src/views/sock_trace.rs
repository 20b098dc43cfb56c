//! `lbctl trace-connect`: what the socket programs (socket-level balancing) do with a
//! `connect()` or an unconnected UDP `sendto()` from a process in their cgroup, from the live maps
//! (`lb_datapath::predict_sock`).

use std::net::SocketAddrV4;

use lb_common::{Be32, maps::FrontendKey};
use lb_datapath::{
    maps::{Maps, MapsError},
    predict::Selection,
    predict_sock::{self, Origin, SockCall, SockDecision},
};
use serde::Serialize;

use crate::decode::{Proto, socket};

/// The JSON of `lbctl trace-connect`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SockTrace {
    /// `"node"` or `"pod"`: whose socket.
    pub from: &'static str,
    /// `"connect"` or `"sendto"`.
    pub call: &'static str,
    pub dst: SocketAddrV4,
    pub proto: Proto,
    /// `"not_a_frontend"`, `"left"`, `"refused"` or `"translated"`.
    pub decision: &'static str,
    /// The frontend found (internal scope), if any.
    pub frontend: Option<SocketAddrV4>,
    /// Why the call is left or refused.
    pub why: Option<&'static str>,
    /// Where a translated call goes, and its backend's id.
    pub backend: Option<SocketAddrV4>,
    pub backend_id: Option<u32>,
    /// How the backend was chosen: `"single"`, `"maglev slot S of N"`, `"affinity"`.
    pub selection: Option<String>,
}

pub struct Request {
    pub dst: SocketAddrV4,
    pub proto: Proto,
    pub call: SockCall,
    pub origin: Origin,
    pub cookie: u64,
    pub bound: Option<std::net::Ipv4Addr>,
}

pub fn trace(maps: &Maps, r: &Request) -> Result<SockTrace, MapsError> {
    let bound = r.bound.map_or(Be32::from_raw(0), Be32::from_ip);
    let decision = predict_sock::predict(
        maps,
        r.dst,
        r.proto.number(),
        r.call,
        r.origin,
        r.cookie,
        bound,
    )?;
    let addr = |k: &FrontendKey| socket(k.addr, k.port);
    let mut out = SockTrace {
        from: match r.origin {
            Origin::Node => "node",
            Origin::Pod => "pod",
        },
        call: match r.call {
            SockCall::Connect => "connect",
            SockCall::Sendto => "sendto",
        },
        dst: r.dst,
        proto: r.proto,
        decision: "not_a_frontend",
        frontend: None,
        why: None,
        backend: None,
        backend_id: None,
        selection: None,
    };
    match decision {
        SockDecision::NotAFrontend => {}
        SockDecision::Left { frontend, why } => {
            out.decision = "left";
            out.frontend = Some(addr(&frontend));
            out.why = Some(why);
        }
        SockDecision::Refused { frontend, why } => {
            out.decision = "refused";
            out.frontend = frontend.as_ref().map(addr);
            out.why = Some(why);
        }
        SockDecision::Translated {
            frontend,
            selection,
            backend_id,
            backend,
        } => {
            out.decision = "translated";
            out.frontend = Some(addr(&frontend));
            out.backend = Some(backend);
            out.backend_id = Some(backend_id);
            out.selection = Some(match selection {
                Selection::Single => "single backend".to_owned(),
                Selection::Maglev {
                    slot, table_size, ..
                } => format!("maglev slot {slot} of {table_size} (from the socket cookie)"),
                Selection::Affinity { timeout_s, .. } => {
                    format!("session affinity (timeout {timeout_s}s)")
                }
            });
        }
    }
    Ok(out)
}
