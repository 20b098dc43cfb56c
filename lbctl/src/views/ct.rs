//! `lbctl ct list`: the conntrack entries as flows, each flow's forward and reply entries
//! paired.

use std::{collections::BTreeSet, net::SocketAddrV4};

use lb_common::{
    Be16, Be32,
    conntrack::{CtEntry, FORWARD, FlowKey, REPLY},
};
use lb_datapath::{
    maps::{Maps, MapsError},
    predict,
};
use serde::Serialize;

use super::rows::{self, ct_order, snat_of};
use crate::decode::{CtFlag, Flags, Proto, seconds_until, socket};

/// One direction of a flow.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CtSide {
    pub flags: Flags<CtFlag>,
    pub flags_raw: u8,
    pub expires_in_s: i64,
    pub expired: bool,
}

/// `lbctl ct list`: one row per flow, its forward and reply entries paired.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowRow {
    pub proto: Proto,
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
    /// The backend set the flow was balanced by; `service_id` in the JSON, whose field names
    /// stay.
    #[serde(rename = "service_id")]
    pub set_id: u32,
    pub backend_id: u32,
    /// A pod's direct connection to `backend` (no frontend involved) that was given another
    /// source port, `snat`, because a load-balanced flow of its port holds its reply key;
    /// `service_id` and `backend_id` are then `lb_common::conntrack::DIRECT`.
    pub direct: bool,
    /// Direct server return (`lb_common::dsr`): on the node that balanced it, the flow is
    /// routed to its backend's node with the client's address; on the backend's node only its
    /// reply entry is here, restoring the other node's frontend.
    pub dsr: bool,
    /// The entry keyed client -> frontend (`null` when only the reply entry is left).
    pub forward: Option<CtSide>,
    /// The entry keyed backend -> client, or backend -> `snat` for a source-NATed flow (`null`
    /// when only the forward entry is left).
    pub reply: Option<CtSide>,
    /// Source-NATed flows (an external client and a backend on another node, or a hairpin
    /// flow): the node address and port (or hairpin address and port) the client is translated
    /// to, as the backend sees it; else `null`.
    pub snat: Option<SocketAddrV4>,
}

/// The conntrack entries as flows: every forward entry with its reply entry when that exists,
/// then the reply entries left over.
pub fn list(maps: &Maps) -> Result<Vec<FlowRow>, MapsError> {
    let now = predict::coarse_now_ns();
    let entries = rows::read_ct(maps)?;
    let mut paired = BTreeSet::new();
    let mut out = Vec::new();
    for (key, entry) in entries.values().filter(|(k, _)| k.dir == FORWARD) {
        let client = socket(key.src_addr, key.src_port);
        let snat = snat_of(entry);
        // Replies address the client, or the node address and port it was translated to.
        let reply_to = snat.unwrap_or(client);
        let reply_key = FlowKey::new(
            entry.nat_addr,
            entry.nat_port,
            Be32::from(*reply_to.ip()),
            Be16::from_host(reply_to.port()),
            key.proto,
            REPLY,
        );
        let reply = entries.get(&ct_order(&reply_key)).filter(|(_, r)| {
            r.nat_addr == key.dst_addr
                && r.nat_port == key.dst_port
                && (snat.is_none() || snat_of(r) == Some(client))
        });
        if reply.is_some() {
            paired.insert(ct_order(&reply_key));
        }
        out.push(FlowRow {
            proto: key.proto.into(),
            client,
            frontend: socket(key.dst_addr, key.dst_port),
            backend: socket(entry.nat_addr, entry.nat_port),
            set_id: entry.set_id,
            backend_id: entry.backend_id,
            direct: entry.direct(),
            dsr: entry.dsr(),
            forward: Some(side(entry, now)),
            reply: reply.map(|(_, r)| side(r, now)),
            snat,
        });
    }
    for (order, (key, entry)) in &entries {
        if key.dir != REPLY || paired.contains(order) {
            continue;
        }
        // A source-NATed flow's reply is keyed by the node's address and port; the client is
        // in the entry.
        let to = socket(key.dst_addr, key.dst_port);
        let (client, snat) = match snat_of(entry) {
            Some(client) => (client, Some(to)),
            None => (to, None),
        };
        out.push(FlowRow {
            proto: key.proto.into(),
            client,
            frontend: socket(entry.nat_addr, entry.nat_port),
            backend: socket(key.src_addr, key.src_port),
            set_id: entry.set_id,
            backend_id: entry.backend_id,
            direct: entry.direct(),
            dsr: entry.dsr(),
            forward: None,
            reply: Some(side(entry, now)),
            snat,
        });
    }
    Ok(out)
}

fn side(entry: &CtEntry, now: u64) -> CtSide {
    CtSide {
        flags: Flags::decode(entry.flags),
        flags_raw: entry.flags,
        expires_in_s: seconds_until(entry.deadline_ns, now),
        expired: now >= entry.deadline_ns,
    }
}
