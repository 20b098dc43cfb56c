//! `lbctl trace` for people: the explanation in words of what the datapath does with the packet
//! (in the JSON too, as `explanation`), and the trace as lines of text.

use std::{fmt::Write as _, net::SocketAddrV4};

use lb_common::{
    conntrack::{CtEntry, ct_flags},
    maps::{Frontend, snat},
};
use lb_datapath::predict::{
    Forward, NatReply, Reply, Selection, SnatChoice, SnatFailure, SourceNat,
};
use serde::Serialize;

use crate::{
    decode::{AddrFlag, CtFlag, Flags, SECOND_NS, seconds_until, socket},
    views::trace::{PortState, Prediction, RejectKind, SnatKind, Trace, TraceSelection, Verdict},
};

/// What happens to a source-NATed packet after translation, in words.
const ROUTED_TEXT: &str = "routed to its next hop by this node (FIB lookup; no route: dropped \
                           as drop_no_route)";

/// Why a flow keeps its client's address but not its port, in words.
const CLIENT_PORT_TEXT: &str = "source port remapped (another live flow of the same client port \
                                holds the reply key to this backend), the client's address kept";

/// Why a direct connection (no frontend) is given another source port, in words.
const DIRECT_TEXT: &str = "as nf_nat does, the direct connection is given another source port, \
                           the client's address kept, so that both reach the backend as two \
                           connections";

/// What happens to a hairpin packet after translation, in words.
const BOUNCED_TEXT: &str = "sent straight back into the interface it came from (MAC addresses \
                            swapped)";

/// A trace with its explanation: what `lbctl trace` prints, the JSON being the trace's fields
/// followed by `explanation`.
#[derive(Clone, Debug, Serialize)]
pub struct Explained<'a> {
    #[serde(flatten)]
    pub trace: &'a Trace,
    /// What the datapath does with the packet, in words.
    pub explanation: String,
}

impl<'a> Explained<'a> {
    pub fn new(trace: &'a Trace) -> Self {
        Self {
            trace,
            explanation: explain(trace),
        }
    }
}

/// What the datapath does with the traced packet, in words.
pub fn explain(t: &Trace) -> String {
    match &t.prediction {
        Prediction::Forward(prediction) => forward(t, prediction),
        Prediction::Reply(prediction) => reply(t, prediction),
    }
}

fn forward(t: &Trace, prediction: &Forward) -> String {
    let (src, dst, proto) = (t.src, t.dst, t.proto);
    let frontend = frontend_text(t);
    match prediction {
        Forward::NotAFrontend => format!(
            "{} carries no frontend (not in LB_ADDRS): the packet passes untouched",
            dst.ip()
        ),
        Forward::PassNotServed { addr_flags } => {
            let flags = Flags::<AddrFlag>::decode(*addr_flags);
            if flags.contains(AddrFlag::Hairpin) {
                format!(
                    "{} is the node's hairpin address and {dst}/{proto} is no live hairpin \
                     flow's: the packet passes untouched",
                    dst.ip(),
                )
            } else if flags.contains(AddrFlag::Snat) {
                format!(
                    "{} is the node's SNAT address, {dst}/{proto} is no live source-NATed \
                     flow's, and {frontend} is no frontend: the packet passes untouched to the \
                     stack",
                    dst.ip(),
                )
            } else {
                format!(
                    "{} carries frontends but not {frontend}, and it is no ClusterIP: the \
                     packet passes untouched to the stack",
                    dst.ip()
                )
            }
        }
        Forward::RejectUnknownPort => format!(
            "{} is a ClusterIP that does not serve {frontend}: rejected with a {}",
            dst.ip(),
            reject_text(RejectKind::of(proto))
        ),
        Forward::DropSourceRange { frontend: service } => format!(
            "new flow to frontend {frontend} -> service {}: source {} is outside its \
             loadBalancerSourceRanges (range id {}): dropped",
            service.set_id,
            src.ip(),
            service.source_range_id
        ),
        Forward::NoBackend {
            frontend: service,
            drop: true,
        } => format!(
            "new flow to frontend {frontend} -> service {}: no backend, and the service drops \
             when empty: dropped",
            service.set_id
        ),
        Forward::NoBackend {
            frontend: service,
            drop: false,
        } => format!(
            "new flow to frontend {frontend} -> service {}: no backend: rejected with a {}",
            service.set_id,
            reject_text(RejectKind::of(proto))
        ),
        Forward::Established {
            set_id,
            backend_id,
            backend,
            snat,
            entry,
        } => {
            let nat = match snat {
                None => format!("DNAT: dst {dst} -> {backend}, src {src} unchanged"),
                Some(addr) if entry.client_port_remapped() => {
                    format!("DNAT: dst {dst} -> {backend}; {CLIENT_PORT_TEXT}: src {src} -> {addr}")
                }
                Some(addr) if entry.flags & ct_flags::HAIRPIN != 0 => format!(
                    "DNAT: dst {dst} -> {backend}; SNAT (a hairpin flow): src {src} -> {addr}; \
                     {BOUNCED_TEXT}"
                ),
                Some(addr) => format!(
                    "DNAT: dst {dst} -> {backend}; SNAT (a source-NATed flow): src {src} -> \
                     {addr}; {ROUTED_TEXT}"
                ),
            };
            format!(
                "established flow ({}) of service {set_id} -> backend {backend_id} {backend}; \
                 {nat}",
                entry_text(entry, t.now_ns)
            )
        }
        Forward::NewFlow {
            frontend: service,
            selection,
            backend_id,
            backend,
            snat,
        } => {
            let nat = match snat {
                None => format!("DNAT: dst {dst} -> {backend}, src {src} unchanged"),
                Some(SourceNat::Hairpin(addr)) => format!(
                    "DNAT: dst {dst} -> {backend}; SNAT (hairpin: the client is the backend \
                     itself, which would drop packets from its own address): src {src} -> \
                     {addr}; {BOUNCED_TEXT}"
                ),
                Some(SourceNat::Node(choice)) => format!(
                    "DNAT: dst {dst} -> {backend}; SNAT (from outside to a backend on another \
                     node, so that its replies come back here): src {src} -> {} ({}); \
                     {ROUTED_TEXT}",
                    choice.source,
                    snat_choice_text(choice)
                ),
                Some(SourceNat::ClientPort(choice)) => format!(
                    "DNAT: dst {dst} -> {backend}; {CLIENT_PORT_TEXT}: src {src} -> {} ({})",
                    choice.source,
                    snat_choice_text(choice)
                ),
                Some(SourceNat::Dsr) => format!(
                    "DNAT: dst {dst} -> {backend}, src {src} unchanged; direct server return: \
                     routed to the backend's node, the SYN carrying the frontend {dst} in an \
                     IPv4 option, and the replies go from there straight to the client"
                ),
            };
            format!(
                "{}; conntrack records both directions; {nat}",
                new_flow_text(service, *selection, *backend_id, *backend, t)
            )
        }
        Forward::DropSnatPorts {
            frontend: service,
            selection,
            backend_id,
            backend,
            failure,
        } => {
            let chosen = new_flow_text(service, *selection, *backend_id, *backend, t);
            format!("{chosen}{}: dropped", snat_failure_text(failure, *backend))
        }
        Forward::SnatReply(NatReply {
            frontend: restored,
            client,
            set_id,
            backend_id: _,
            entry,
        }) => format!(
            "reply of a source-NATed flow of service {set_id} to the node's SNAT address and \
             port ({}): src {src} -> {restored}, dst {dst} -> {client}; {ROUTED_TEXT}",
            entry_text(entry, t.now_ns)
        ),
        Forward::HairpinReply(NatReply {
            frontend: restored,
            client,
            set_id,
            backend_id: _,
            entry,
        }) => format!(
            "reply of a hairpin flow of service {set_id} (a pod balanced to itself) to the \
             hairpin address ({}): src {src} -> {restored}, dst {dst} -> {client}; \
             {BOUNCED_TEXT}",
            entry_text(entry, t.now_ns)
        ),
        Forward::Inconsistent {
            frontend: service,
            detail,
        } => format!(
            "new flow to frontend {frontend} -> service {}: its state is inconsistent \
             ({detail}): dropped until the agent repairs it",
            service.set_id
        ),
        Forward::DirectEstablished { entry, source, .. } => format!(
            "{} carries no frontend; established direct connection ({}) that was given \
             another source port: src {src} -> {source}, dst unchanged",
            dst.ip(),
            entry_text(entry, t.now_ns)
        ),
        Forward::DirectRemapped { choice, held, .. } => format!(
            "{} carries no frontend, but a live flow of this client port to frontend {} was \
             balanced to {dst} and holds the reply key: {DIRECT_TEXT}: src {src} -> {} ({})",
            dst.ip(),
            socket(held.nat_addr, held.nat_port),
            choice.source,
            snat_choice_text(choice)
        ),
        Forward::DirectPortsTaken { client, held, .. } => format!(
            "{} carries no frontend, but a live flow of {client} to frontend {} was balanced to \
             {dst} and holds the reply key, and so does one on every other port of the \
             client's: dropped",
            dst.ip(),
            socket(held.nat_addr, held.nat_port),
        ),
    }
}

fn reply(t: &Trace, prediction: &Reply) -> String {
    let (src, dst) = (t.src, t.dst);
    match prediction {
        Reply::NotTracked => format!(
            "no live reply entry for {src} -> {dst}/{}: not a reply of a load-balanced flow, \
             the packet passes untouched",
            t.proto
        ),
        Reply::ReverseNat {
            frontend,
            client,
            set_id,
            backend_id: _,
            entry,
        } => {
            let dst_text = match client {
                Some(client) => format!("dst {dst} -> {client} (the client's own port)"),
                None => format!("dst {dst} unchanged"),
            };
            if entry.direct() {
                return format!(
                    "reply of a direct connection given another source port ({}): src \
                     unchanged, {dst_text}",
                    entry_text(entry, t.now_ns)
                );
            }
            format!(
                "reply of a flow of service {set_id} ({}): reverse NAT: src {src} -> \
                 {frontend}, {dst_text}",
                entry_text(entry, t.now_ns)
            )
        }
        Reply::SnatUntouched {
            frontend,
            client,
            set_id,
            backend_id: _,
            hairpin,
            entry,
        } => {
            let (what, where_, scope) = if *hairpin {
                ("a hairpin flow", "as it leaves the pod", "internal")
            } else {
                (
                    "a source-NATed flow",
                    "where it reaches this node",
                    "external",
                )
            };
            format!(
                "reply of {what} of service {set_id} ({}): the reply path leaves it alone, the \
                 packet passes untouched; {where_}, the forward path translates it (src {src} \
                 -> {frontend}, dst {dst} -> {client}): trace it without --reply, with --scope \
                 {scope}",
                entry_text(entry, t.now_ns)
            )
        }
    }
}

/// `ip:port/proto scope`: the frontend a forward packet asks for.
fn frontend_text(t: &Trace) -> String {
    let scope = t.scope.map_or(String::new(), |s| format!(" {s}"));
    format!("{}/{}{scope}", t.dst, t.proto)
}

/// The conntrack entry a decision read: its flags and remaining lifetime.
fn entry_text(entry: &CtEntry, now_ns: u64) -> String {
    let flags = Flags::<CtFlag>::decode(entry.flags);
    format!(
        "conntrack entry, {}, expires in {} s",
        if flags.is_empty() {
            "no flags".to_owned()
        } else {
            flags.to_string()
        },
        seconds_until(entry.deadline_ns, now_ns)
    )
}

fn reject_text(kind: RejectKind) -> &'static str {
    match kind {
        RejectKind::TcpRst => "TCP RST",
        RejectKind::IcmpPortUnreachable => "ICMP port unreachable",
    }
}

/// A new flow from its frontend to the backend chosen for it, in words.
fn new_flow_text(
    service: &Frontend,
    selection: Selection,
    backend_id: u32,
    backend: SocketAddrV4,
    t: &Trace,
) -> String {
    format!(
        "new flow to frontend {} -> service {}: {} -> backend {backend_id} {backend}{}",
        frontend_text(t),
        service.set_id,
        selection_text(selection, t),
        affinity_text(service, selection, t),
    )
}

/// How a new flow's backend was chosen, in words.
fn selection_text(selection: Selection, t: &Trace) -> String {
    match selection {
        Selection::Single => "its single backend".to_owned(),
        Selection::Maglev {
            hash,
            slot,
            table_size,
        } => format!("Maglev slot {slot} of {table_size} (flow hash {hash:#010x})"),
        Selection::Affinity {
            last_used_ns,
            timeout_s,
        } => format!(
            "session affinity: {} got this backend {} s ago (timeout {timeout_s} s)",
            t.src.ip(),
            t.now_ns.saturating_sub(last_used_ns) / SECOND_NS
        ),
    }
}

/// What the datapath does with the client's affinity entry for a new flow, in words.
fn affinity_text(service: &Frontend, selection: Selection, t: &Trace) -> String {
    match (service.affinity_timeout_s != 0, selection) {
        (false, _) => String::new(),
        (true, Selection::Affinity { .. }) => "; the affinity entry is refreshed".to_owned(),
        (true, _) => format!(
            "; no live affinity entry for {}, the datapath records this backend for it ({} s)",
            t.src.ip(),
            service.affinity_timeout_s
        ),
    }
}

fn snat_choice_text(choice: &SnatChoice) -> String {
    format!(
        "candidate port {} of {}, flow hash {:#010x}{}",
        choice.probe + 1,
        snat::PROBES,
        choice.hash,
        port_state_text(choice.state.into())
    )
}

/// What held a chosen SNAT port, as a clause of the explanation.
fn port_state_text(state: PortState) -> &'static str {
    match state {
        PortState::Free | PortState::Taken => "",
        PortState::Reopened => ", the port this client flow held before",
        PortState::TimeWait => {
            ", in TIME_WAIT at the backend after an earlier flow (no candidate was free)"
        }
    }
}

/// `lbctl trace` as lines of text.
pub fn text(e: &Explained<'_>) -> String {
    let t = e.trace;
    let mut out = String::new();
    let scope = t.scope.map_or(String::new(), |s| format!(" {s}"));
    let syn = if t.syn { " SYN" } else { "" };
    let _ = writeln!(
        out,
        "{} {} -> {}/{}{scope}{syn}",
        t.direction, t.src, t.dst, t.proto
    );
    let _ = writeln!(out, "  decision: {} ({})", t.decision, t.verdict);
    if let Some(reason) = t.reason {
        let _ = writeln!(out, "  counted:  {}", reason.name());
    }
    if let Some(id) = t.set_id {
        let _ = writeln!(out, "  service:  {id}");
    }
    if let (Some(id), Some(b)) = (t.backend_id, t.backend) {
        let _ = writeln!(out, "  backend:  {id} {b}");
    }
    if let Some(sel) = &t.selection {
        let how = match sel {
            TraceSelection::Single => "single backend".to_owned(),
            TraceSelection::Maglev {
                hash,
                slot,
                table_size,
            } => format!("maglev slot {slot}/{table_size} hash {hash:#010x}"),
            TraceSelection::Affinity {
                age_s, timeout_s, ..
            } => {
                format!("session affinity ({age_s}s old, timeout {timeout_s}s)")
            }
        };
        let _ = writeln!(out, "  chosen:   {how}");
    }
    if let Some(s) = &t.snat {
        let how = match (s.probe, s.hash) {
            (Some(probe), Some(hash)) => format!(
                " (candidate port {} of {}, flow hash {hash:#010x}{})",
                probe + 1,
                snat::PROBES,
                match s.port_state {
                    Some(state) if state != PortState::Free => format!(", {state}"),
                    _ => String::new(),
                }
            ),
            _ => String::new(),
        };
        let kind = match s.kind {
            SnatKind::Hairpin => " (hairpin)",
            SnatKind::Node => "",
            SnatKind::ClientPort => " (client port remapped)",
        };
        let _ = writeln!(
            out,
            "  snat:     client {} as {}{how}{kind}",
            s.client, s.addr
        );
    }
    if let Some(p) = t.output {
        let _ = writeln!(out, "  output:   {} -> {}", p.src, p.dst);
    }
    match t.verdict {
        Verdict::Forward => {
            let _ = writeln!(out, "  routed:   {ROUTED_TEXT}");
        }
        Verdict::Bounce => {
            let _ = writeln!(out, "  bounced:  {BOUNCED_TEXT}");
        }
        Verdict::Pass | Verdict::Drop | Verdict::Reject => {}
    }
    if let Some(r) = &t.reject {
        let _ = writeln!(out, "  sends:    {r} to {}", t.src);
    }
    let _ = writeln!(out, "  why:      {}", e.explanation);
    out
}

/// Why a new flow to `backend` that needs a source port got none (`failure`), in words
/// following what the flow is.
fn snat_failure_text(failure: &SnatFailure, backend: SocketAddrV4) -> String {
    const OUTSIDE: &str = ", which runs on another node: a flow from outside must be \
                           source-NATed to this node";
    match failure {
        SnatFailure::ClientPortsTaken { client } => format!(
            "; another live flow of {client} to {backend} holds the reply key, and so does one \
             on every other port of the client's"
        ),
        SnatFailure::NoConfig { config } => format!(
            "{OUTSIDE}, but the node has {} (LB_CONFIG: address {}, ports {}-{})",
            if config.snat_addr.raw() == 0 {
                "no SNAT address"
            } else {
                "no SNAT ports"
            },
            config.snat_addr.to_ip(),
            config.snat_port_min,
            config.snat_port_max
        ),
        SnatFailure::PortsTaken {
            node,
            hash,
            candidates,
        } => {
            // A narrow range gives some ports more than once.
            let mut ports: Vec<String> = Vec::new();
            for port in candidates.iter().map(u16::to_string) {
                if !ports.contains(&port) {
                    ports.push(port);
                }
            }
            format!(
                "{OUTSIDE}, but every port of {node}'s range is held by a live flow of another \
                 client to {backend} (tried first, spread by the flow hash {hash:#010x}: {})",
                ports.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::trace;

    #[test]
    fn the_explanation_closes_the_json() {
        let t = trace::sample();
        let json = serde_json::to_string(&Explained::new(&t)).unwrap();
        assert!(
            json.ends_with(
                "\"snat\":null,\"explanation\":\"new flow to frontend 10.0.0.2:80/tcp internal -> \
                 service 1: Maglev slot 7 of 13 (flow hash 0x00000007) -> backend 2 \
                 10.0.0.3:8080; conntrack records both directions; DNAT: dst 10.0.0.2:80 -> \
                 10.0.0.3:8080, src 10.0.0.1:1000 unchanged\"}"
            ),
            "{json}"
        );
    }

    #[test]
    fn text_shows_the_selection_and_the_snat() {
        let t = trace::sample();
        assert!(text(&Explained::new(&t)).contains("maglev slot 7/13"));

        let snatted = Trace {
            verdict: Verdict::Forward,
            snat: Some(trace::sample_snat()),
            ..t
        };
        let text = text(&Explained::new(&snatted));
        assert!(
            text.contains(
                "snat:     client 10.0.0.1:1000 as 192.168.50.10:61234 (candidate port 2 of 8, \
                 flow hash 0x00000007, time_wait)"
            ) && text.contains("routed:   routed to its next hop"),
            "{text}"
        );
    }
}
