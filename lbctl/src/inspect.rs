//! `lbctl trace`: what the datapath does with one packet, and its explanation in words (next
//! to be split into a view and its rendering, as the other commands are).

use std::{fmt::Write as _, net::SocketAddrV4};

use lb_common::{
    conntrack::{SnatPort, ct_flags},
    maps::{Frontend, addr_flags, snat},
    net::proto,
    stats::Reason,
};
use lb_datapath::{
    maps::{Maps, MapsError},
    predict::{self, Forward, Reply, Selection, SnatChoice, SnatFailure, SourceNat},
};
use serde::Serialize;

use crate::{
    decode::{CtFlag, Flags, Proto, SECOND_NS, Scope, seconds_until},
    views::rows::ServiceValue,
};

fn proto_name(p: u8) -> String {
    Proto::from(p).to_string()
}

fn scope_name(s: u8) -> String {
    Scope::from(s).to_string()
}

fn ct_flag_names(flags: u8) -> Vec<String> {
    Flags::<CtFlag>::decode(flags)
        .iter()
        .map(ToString::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// `trace`

/// How a new flow's backend was chosen (`method` tells which).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum TraceSelection {
    /// The service's only backend (no Maglev table).
    Single,
    /// Maglev slot `slot` = `hash % table_size`.
    Maglev {
        hash: u32,
        slot: u32,
        table_size: u32,
    },
    /// sessionAffinity hit: the client's backend from `age_s` seconds ago.
    Affinity {
        age_s: u64,
        timeout_s: u32,
        last_used_ns: u64,
    },
}

/// The packet as it leaves the hook when the datapath passes (forwards, bounces) it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TracePacket {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// Source NAT of a flow: from outside the cluster to a backend on another node (`kind`
/// `"node"`), or a pod balanced to itself (`"hairpin"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TraceSnat {
    /// `"node"` or `"hairpin"`.
    pub kind: &'static str,
    /// The address and port that stand for the client towards the backend (the node's SNAT
    /// address, or the hairpin address with the client's port): the forward packets' new
    /// source, the replies' destination.
    pub addr: SocketAddrV4,
    /// The client: the forward packets' source, restored as the replies' destination.
    pub client: SocketAddrV4,
    /// New flows: the flow hash that spreads the candidate ports (else `null`).
    pub hash: Option<u32>,
    /// New flows: which candidate port was free, 0-based, of
    /// `lb_common::maps::snat::PROBES` (else `null`).
    pub probe: Option<u32>,
    /// New flows: what held the chosen port: `"free"`, `"reopened"` (this same client flow,
    /// which keeps its port) or `"time_wait"` (a flow the backend keeps in TIME_WAIT: it takes
    /// the SYN if its timestamp is newer, else answers with an ACK the client resets, and the
    /// SYN goes through on its retransmission) (else `null`).
    pub port_state: Option<&'static str>,
}

/// `lbctl trace`: what the datapath does with one packet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trace {
    /// `"forward"` (client -> frontend: lb_from_pod / lb_xdp / lb_ext_in) or `"reply"`
    /// (backend -> client: lb_to_pod / lb_ext_out).
    pub direction: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: String,
    /// Forward only: `"internal"` (lb_from_pod) or `"external"` (lb_xdp, lb_ext_in).
    pub scope: Option<String>,
    /// Forward only: the packet is a bare TCP SYN.
    pub syn: bool,
    /// `not_a_frontend`, `not_served`, `reject_unknown_port`, `drop_source_range`,
    /// `reject_no_backend`, `drop_no_backend`, `established`, `new_flow`, `drop_snat_ports`,
    /// `snat_reply` (the reply of a source-NATed flow reaching the node), `hairpin_reply` (the
    /// reply of a hairpin flow), `inconsistent`; reply: `reverse_nat`, `not_tracked`,
    /// `snat_untouched` (the reply of a source-NATed or hairpin flow, which the reply path
    /// leaves alone).
    pub decision: String,
    /// `"pass"` (possibly rewritten), `"drop"`, `"reject"` (a TCP RST or ICMP port
    /// unreachable goes back out of the interface instead), `"forward"`: rewritten and routed
    /// to its next hop by this node (source-NATed flows and their replies): a FIB lookup sends
    /// it straight out (XDP_TX / redirect; at XDP a next hop whose MAC is unknown leaves the
    /// packet untouched to the tc program behind it; no route: dropped as `drop_no_route`); or
    /// `"bounce"`: rewritten
    /// and sent straight back out of the interface it came in on, MAC addresses swapped (hairpin
    /// flows, back into the pod).
    pub verdict: String,
    /// The `LB_VERDICTS` counter the packet bumps, `null` when it is not counted. With verdict
    /// `"forward"`, `forwarded` counts it too when the FIB lookup resolves.
    pub reason: Option<&'static str>,
    /// The service the frontend maps to (forward decisions after the service lookup).
    pub service: Option<ServiceValue>,
    /// The backend set: the service's, or the one recorded in conntrack.
    pub service_id: Option<u32>,
    pub backend_id: Option<u32>,
    pub backend: Option<SocketAddrV4>,
    /// New flows: how the backend was chosen.
    pub selection: Option<TraceSelection>,
    /// New flows of a service with session affinity: the datapath records (or refreshes) the
    /// client's affinity entry.
    pub affinity_recorded: bool,
    /// What a reject sends back: `"tcp_rst"` or `"icmp_port_unreachable"`.
    pub reject: Option<String>,
    /// The packet after translation when it passes, is forwarded or bounced (`null` when
    /// dropped or rejected).
    pub output: Option<TracePacket>,
    /// Source NAT of the flow (`established`, `new_flow`, `snat_reply`, `hairpin_reply`,
    /// `snat_untouched`), else `null`.
    pub snat: Option<TraceSnat>,
    /// The same, in words.
    pub explanation: String,
}

fn reject_kind(l4_proto: u8) -> String {
    if l4_proto == proto::TCP {
        "tcp_rst".into()
    } else {
        "icmp_port_unreachable".into()
    }
}

fn frontend_text(dst: SocketAddrV4, l4_proto: u8, scope: u8) -> String {
    format!("{dst}/{} {}", proto_name(l4_proto), scope_name(scope))
}

/// What happens to a source-NATed packet after translation, in words.
const ROUTED_TEXT: &str = "routed to its next hop by this node (FIB lookup; no route: dropped \
                           as drop_no_route)";

/// How a new flow's backend was chosen, in words; records the selection in `t`.
fn selection_text(t: &mut Trace, selection: Selection, src: SocketAddrV4, now: u64) -> String {
    match selection {
        Selection::Single => {
            t.selection = Some(TraceSelection::Single);
            "its single backend".to_owned()
        }
        Selection::Maglev {
            hash,
            slot,
            table_size,
        } => {
            t.selection = Some(TraceSelection::Maglev {
                hash,
                slot,
                table_size,
            });
            format!("Maglev slot {slot} of {table_size} (flow hash {hash:#010x})")
        }
        Selection::Affinity {
            last_used_ns,
            timeout_s,
        } => {
            let age_s = now.saturating_sub(last_used_ns) / SECOND_NS;
            t.selection = Some(TraceSelection::Affinity {
                age_s,
                timeout_s,
                last_used_ns,
            });
            format!(
                "session affinity: {} got this backend {age_s} s ago (timeout {timeout_s} s)",
                src.ip()
            )
        }
    }
}

/// What the datapath does with the client's affinity entry for a new flow, in words.
fn affinity_text(service: &Frontend, selection: Selection, src: SocketAddrV4) -> String {
    match (service.affinity_timeout_s != 0, selection) {
        (false, _) => String::new(),
        (true, Selection::Affinity { .. }) => "; the affinity entry is refreshed".to_owned(),
        (true, _) => format!(
            "; no live affinity entry for {}, the datapath records this backend for it ({} s)",
            src.ip(),
            service.affinity_timeout_s
        ),
    }
}

/// What happens to a hairpin packet after translation, in words.
const BOUNCED_TEXT: &str = "sent straight back into the interface it came from (MAC addresses \
                            swapped)";

/// [`TraceSnat::port_state`] of a port in `state`.
fn snat_port_state(state: SnatPort) -> &'static str {
    match state {
        SnatPort::Free => "free",
        SnatPort::Reopened => "reopened",
        SnatPort::TimeWait => "time_wait",
        SnatPort::Taken => "taken",
    }
}

fn snat_choice_text(choice: &SnatChoice) -> String {
    let held = match choice.state {
        SnatPort::Free | SnatPort::Taken => "",
        SnatPort::Reopened => ", the port this client flow held before",
        SnatPort::TimeWait => {
            ", in TIME_WAIT at the backend after an earlier flow (no candidate was free)"
        }
    };
    format!(
        "candidate port {} of {}, flow hash {:#010x}{held}",
        choice.probe + 1,
        snat::PROBES,
        choice.hash
    )
}

/// A [`TraceSnat`] without allocation details.
fn trace_snat(hairpin: bool, addr: SocketAddrV4, client: SocketAddrV4) -> TraceSnat {
    TraceSnat {
        kind: if hairpin { "hairpin" } else { "node" },
        addr,
        client,
        hash: None,
        probe: None,
        port_state: None,
    }
}

/// Predicts what the forward path (`lb_from_pod` for `scope::INTERNAL`, `lb_xdp` and
/// `lb_ext_in` for `scope::EXTERNAL`) does with `src -> dst`. `syn`: a bare TCP SYN (else a
/// segment without SYN).
pub fn trace_forward(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
    scope: u8,
    syn: bool,
) -> Result<Trace, MapsError> {
    let decision = predict::forward(maps, src, dst, l4_proto, scope, syn)?;
    let now = predict::coarse_now_ns();
    let frontend = frontend_text(dst, l4_proto, scope);
    let mut t = Trace {
        direction: "forward".into(),
        src,
        dst,
        proto: proto_name(l4_proto),
        scope: Some(scope_name(scope)),
        syn,
        decision: String::new(),
        verdict: "pass".into(),
        reason: None,
        service: None,
        service_id: None,
        backend_id: None,
        backend: None,
        selection: None,
        affinity_recorded: false,
        reject: None,
        output: None,
        snat: None,
        explanation: String::new(),
    };
    let with_service = |t: &mut Trace, s: &Frontend| {
        t.service = Some(s.into());
        t.service_id = Some(s.set_id);
    };
    match decision {
        Forward::NotAFrontend => {
            t.decision = "not_a_frontend".into();
            t.output = Some(TracePacket { src, dst });
            t.explanation = format!(
                "{} carries no frontend (not in LB_ADDRS): the packet passes untouched",
                dst.ip()
            );
        }
        Forward::PassNotServed { addr_flags: flags } => {
            t.decision = "not_served".into();
            t.output = Some(TracePacket { src, dst });
            t.explanation = if flags & addr_flags::HAIRPIN != 0 {
                format!(
                    "{} is the node's hairpin address and {dst}/{} is no live hairpin flow's: \
                     the packet passes untouched",
                    dst.ip(),
                    proto_name(l4_proto)
                )
            } else if flags & addr_flags::SNAT != 0 {
                format!(
                    "{} is the node's SNAT address, {dst}/{} is no live source-NATed flow's, \
                     and {frontend} is no frontend: the packet passes untouched to the stack",
                    dst.ip(),
                    proto_name(l4_proto)
                )
            } else {
                format!(
                    "{} carries frontends but not {frontend}, and it is no ClusterIP: the \
                     packet passes untouched to the stack",
                    dst.ip()
                )
            };
        }
        Forward::RejectUnknownPort => {
            t.decision = "reject_unknown_port".into();
            t.verdict = "reject".into();
            t.reason = Some(Reason::RejectUnknownPort.name());
            t.reject = Some(reject_kind(l4_proto));
            t.explanation = format!(
                "{} is a ClusterIP that does not serve {frontend}: rejected with a {}",
                dst.ip(),
                reject_text(l4_proto)
            );
        }
        Forward::DropSourceRange { frontend: service } => {
            with_service(&mut t, &service);
            t.decision = "drop_source_range".into();
            t.verdict = "drop".into();
            t.reason = Some(Reason::DropSourceRange.name());
            t.explanation = format!(
                "new flow to frontend {frontend} -> service {}: source {} is outside its \
                 loadBalancerSourceRanges (range id {}): dropped",
                service.set_id,
                src.ip(),
                service.source_range_id
            );
        }
        Forward::NoBackend {
            frontend: service,
            drop,
        } => {
            with_service(&mut t, &service);
            if drop {
                t.decision = "drop_no_backend".into();
                t.verdict = "drop".into();
                t.reason = Some(Reason::DropNoBackend.name());
                t.explanation = format!(
                    "new flow to frontend {frontend} -> service {}: no backend, and the \
                     service drops when empty: dropped",
                    service.set_id
                );
            } else {
                t.decision = "reject_no_backend".into();
                t.verdict = "reject".into();
                t.reason = Some(Reason::RejectNoBackend.name());
                t.reject = Some(reject_kind(l4_proto));
                t.explanation = format!(
                    "new flow to frontend {frontend} -> service {}: no backend: rejected with \
                     a {}",
                    service.set_id,
                    reject_text(l4_proto)
                );
            }
        }
        Forward::Established {
            set_id: service_id,
            backend_id,
            backend,
            snat,
            entry,
        } => {
            t.decision = "established".into();
            t.reason = Some(Reason::Established.name());
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(backend);
            let hairpin = entry.flags & ct_flags::HAIRPIN != 0;
            let nat = match snat {
                None => format!("DNAT: dst {dst} -> {backend}, src {src} unchanged"),
                Some(addr) if hairpin => {
                    t.verdict = "bounce".into();
                    t.snat = Some(trace_snat(true, addr, src));
                    format!(
                        "DNAT: dst {dst} -> {backend}; SNAT (a hairpin flow): src {src} -> \
                         {addr}; {BOUNCED_TEXT}"
                    )
                }
                Some(addr) => {
                    t.verdict = "forward".into();
                    t.snat = Some(trace_snat(false, addr, src));
                    format!(
                        "DNAT: dst {dst} -> {backend}; SNAT (a source-NATed flow): src {src} \
                         -> {addr}; {ROUTED_TEXT}"
                    )
                }
            };
            t.output = Some(TracePacket {
                src: snat.unwrap_or(src),
                dst: backend,
            });
            t.explanation = format!(
                "established flow (conntrack entry, {}, expires in {} s) of service \
                 {service_id} -> backend {backend_id} {backend}; {nat}",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
        Forward::NewFlow {
            frontend: service,
            selection,
            backend_id,
            backend,
            snat,
        } => {
            with_service(&mut t, &service);
            t.decision = "new_flow".into();
            t.reason = Some(Reason::NewFlow.name());
            t.backend_id = Some(backend_id);
            t.backend = Some(backend);
            t.affinity_recorded = service.affinity_timeout_s != 0;
            let why = selection_text(&mut t, selection, src, now);
            let affinity = affinity_text(&service, selection, src);
            let nat = match snat {
                None => format!("DNAT: dst {dst} -> {backend}, src {src} unchanged"),
                Some(SourceNat::Hairpin(addr)) => {
                    t.verdict = "bounce".into();
                    t.snat = Some(trace_snat(true, addr, src));
                    format!(
                        "DNAT: dst {dst} -> {backend}; SNAT (hairpin: the client is the backend \
                         itself, which would drop packets from its own address): src {src} -> \
                         {addr}; {BOUNCED_TEXT}"
                    )
                }
                Some(SourceNat::Node(choice)) => {
                    t.verdict = "forward".into();
                    t.snat = Some(TraceSnat {
                        kind: "node",
                        addr: choice.node,
                        client: src,
                        hash: Some(choice.hash),
                        probe: Some(choice.probe),
                        port_state: Some(snat_port_state(choice.state)),
                    });
                    format!(
                        "DNAT: dst {dst} -> {backend}; SNAT (from outside to a backend on \
                         another node, so that its replies come back here): src {src} -> {} \
                         ({}); {ROUTED_TEXT}",
                        choice.node,
                        snat_choice_text(&choice)
                    )
                }
            };
            t.output = Some(TracePacket {
                src: t.snat.map_or(src, |s| s.addr),
                dst: backend,
            });
            t.explanation = format!(
                "new flow to frontend {frontend} -> service {}: {why} -> backend {backend_id} \
                 {backend}{affinity}; conntrack records both directions; {nat}",
                service.set_id
            );
        }
        Forward::DropSnatPorts {
            frontend: service,
            selection,
            backend_id,
            backend,
            failure,
        } => {
            with_service(&mut t, &service);
            t.decision = "drop_snat_ports".into();
            t.verdict = "drop".into();
            t.reason = Some(Reason::DropSnatPorts.name());
            t.backend_id = Some(backend_id);
            t.backend = Some(backend);
            // The datapath picks the backend (recording affinity) before it allocates a port.
            t.affinity_recorded = service.affinity_timeout_s != 0;
            let why = selection_text(&mut t, selection, src, now);
            let affinity = affinity_text(&service, selection, src);
            let failure = match failure {
                SnatFailure::NoConfig { config } => format!(
                    "but the node has {} (LB_CONFIG: address {}, ports {}-{})",
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
                    let ports: Vec<String> = candidates.iter().map(u16::to_string).collect();
                    format!(
                        "but all {} candidate ports of {node} ({}; flow hash {hash:#010x}) are \
                         held by live flows of other clients to {backend}",
                        candidates.len(),
                        ports.join(", ")
                    )
                }
            };
            t.explanation = format!(
                "new flow to frontend {frontend} -> service {}: {why} -> backend {backend_id} \
                 {backend}{affinity}, which runs on another node: a flow from outside must be \
                 source-NATed to this node, {failure}: dropped",
                service.set_id
            );
        }
        Forward::SnatReply {
            frontend: restored,
            client,
            set_id: service_id,
            backend_id,
            entry,
        } => {
            t.decision = "snat_reply".into();
            t.verdict = "forward".into();
            t.reason = Some(Reason::ReplyNat.name());
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(src);
            t.output = Some(TracePacket {
                src: restored,
                dst: client,
            });
            t.snat = Some(trace_snat(false, dst, client));
            t.explanation = format!(
                "reply of a source-NATed flow of service {service_id} to the node's SNAT \
                 address and port (conntrack entry, {}, expires in {} s): src {src} -> \
                 {restored}, dst {dst} -> {client}; {ROUTED_TEXT}",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
        Forward::HairpinReply {
            frontend: restored,
            client,
            set_id: service_id,
            backend_id,
            entry,
        } => {
            t.decision = "hairpin_reply".into();
            t.verdict = "bounce".into();
            t.reason = Some(Reason::ReplyNat.name());
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(src);
            t.output = Some(TracePacket {
                src: restored,
                dst: client,
            });
            t.snat = Some(trace_snat(true, dst, client));
            t.explanation = format!(
                "reply of a hairpin flow of service {service_id} (a pod balanced to itself) to \
                 the hairpin address (conntrack entry, {}, expires in {} s): src {src} -> \
                 {restored}, dst {dst} -> {client}; {BOUNCED_TEXT}",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
        Forward::Inconsistent {
            frontend: service,
            detail,
        } => {
            with_service(&mut t, &service);
            t.decision = "inconsistent".into();
            t.verdict = "drop".into();
            t.reason = Some(Reason::DropNoTable.name());
            t.explanation = format!(
                "new flow to frontend {frontend} -> service {}: its state is inconsistent \
                 ({detail}): dropped until the agent repairs it",
                service.set_id
            );
        }
    }
    Ok(t)
}

fn reject_text(l4_proto: u8) -> &'static str {
    if l4_proto == proto::TCP {
        "TCP RST"
    } else {
        "ICMP port unreachable"
    }
}

fn flags_text(flags: &[String]) -> String {
    if flags.is_empty() {
        "no flags".into()
    } else {
        flags.join(",")
    }
}

/// Predicts what the reply path (`lb_to_pod`, `lb_ext_out`) does with `src -> dst` (a backend
/// answering).
pub fn trace_reply(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
) -> Result<Trace, MapsError> {
    let decision = predict::reply(maps, src, dst, l4_proto)?;
    let now = predict::coarse_now_ns();
    let mut t = Trace {
        direction: "reply".into(),
        src,
        dst,
        proto: proto_name(l4_proto),
        scope: None,
        syn: false,
        decision: String::new(),
        verdict: "pass".into(),
        reason: None,
        service: None,
        service_id: None,
        backend_id: None,
        backend: None,
        selection: None,
        affinity_recorded: false,
        reject: None,
        output: None,
        snat: None,
        explanation: String::new(),
    };
    match decision {
        Reply::NotTracked => {
            t.decision = "not_tracked".into();
            t.output = Some(TracePacket { src, dst });
            t.explanation = format!(
                "no live reply entry for {src} -> {dst}/{}: not a reply of a load-balanced \
                 flow, the packet passes untouched",
                proto_name(l4_proto)
            );
        }
        Reply::ReverseNat {
            frontend,
            set_id: service_id,
            backend_id,
            entry,
        } => {
            t.decision = "reverse_nat".into();
            t.reason = Some(Reason::ReplyNat.name());
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(src);
            t.output = Some(TracePacket { src: frontend, dst });
            t.explanation = format!(
                "reply of a flow of service {service_id} (conntrack entry, {}, expires in {} s): \
                 reverse NAT: src {src} -> {frontend}, dst {dst} unchanged",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
        Reply::SnatUntouched {
            frontend,
            client,
            set_id: service_id,
            backend_id,
            hairpin,
            entry,
        } => {
            t.decision = "snat_untouched".into();
            t.service_id = Some(service_id);
            t.backend_id = Some(backend_id);
            t.backend = Some(src);
            t.output = Some(TracePacket { src, dst });
            t.snat = Some(trace_snat(hairpin, dst, client));
            let (what, where_, scope) = if hairpin {
                ("a hairpin flow", "as it leaves the pod", "internal")
            } else {
                (
                    "a source-NATed flow",
                    "where it reaches this node",
                    "external",
                )
            };
            t.explanation = format!(
                "reply of {what} of service {service_id} (conntrack entry, {}, expires in {} \
                 s): the reply path leaves it alone, the packet passes untouched; {where_}, the \
                 forward path translates it (src {src} -> {frontend}, dst {dst} -> {client}): \
                 trace it without --reply, with --scope {scope}",
                flags_text(&ct_flag_names(entry.flags)),
                seconds_until(entry.deadline_ns, now)
            );
        }
    }
    Ok(t)
}

/// `lbctl trace` as lines of text.
pub fn render_trace(t: &Trace) -> String {
    let mut out = String::new();
    let scope = t
        .scope
        .as_deref()
        .map_or(String::new(), |s| format!(" {s}"));
    let syn = if t.syn { " SYN" } else { "" };
    let _ = writeln!(
        out,
        "{} {} -> {}/{}{scope}{syn}",
        t.direction, t.src, t.dst, t.proto
    );
    let _ = writeln!(out, "  decision: {} ({})", t.decision, t.verdict);
    if let Some(reason) = t.reason {
        let _ = writeln!(out, "  counted:  {reason}");
    }
    if let Some(id) = t.service_id {
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
                    Some(state) if state != "free" => format!(", {state}"),
                    _ => String::new(),
                }
            ),
            _ => String::new(),
        };
        let kind = if s.kind == "hairpin" {
            " (hairpin)"
        } else {
            ""
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
    match t.verdict.as_str() {
        "forward" => {
            let _ = writeln!(out, "  routed:   {ROUTED_TEXT}");
        }
        "bounce" => {
            let _ = writeln!(out, "  bounced:  {BOUNCED_TEXT}");
        }
        _ => {}
    }
    if let Some(r) = &t.reject {
        let _ = writeln!(out, "  sends:    {r} to {}", t.src);
    }
    let _ = writeln!(out, "  why:      {}", t.explanation);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::scope;

    #[test]
    fn trace_json_field_names_are_stable() {
        let t = Trace {
            direction: "forward".into(),
            src: "10.0.0.1:1000".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            proto: proto_name(proto::TCP),
            scope: Some(scope_name(scope::INTERNAL)),
            syn: true,
            decision: "new_flow".into(),
            verdict: "pass".into(),
            reason: Some("new_flow"),
            service: None,
            service_id: Some(1),
            backend_id: Some(2),
            backend: Some("10.0.0.3:8080".parse().unwrap()),
            selection: Some(TraceSelection::Maglev {
                hash: 7,
                slot: 7,
                table_size: 13,
            }),
            affinity_recorded: false,
            reject: None,
            output: Some(TracePacket {
                src: "10.0.0.1:1000".parse().unwrap(),
                dst: "10.0.0.3:8080".parse().unwrap(),
            }),
            snat: None,
            explanation: String::new(),
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["selection"]["method"], "maglev");
        assert_eq!(v["output"]["dst"], "10.0.0.3:8080");
        assert_eq!(v["scope"], "internal");
        assert_eq!(v["proto"], "tcp");
        assert!(v["snat"].is_null());
        assert!(render_trace(&t).contains("maglev slot 7/13"));

        let snatted = Trace {
            verdict: "forward".into(),
            snat: Some(TraceSnat {
                kind: "node",
                addr: "192.168.50.10:61234".parse().unwrap(),
                client: "10.0.0.1:1000".parse().unwrap(),
                hash: Some(7),
                probe: Some(1),
                port_state: Some("time_wait"),
            }),
            ..t
        };
        let v = serde_json::to_value(&snatted).unwrap();
        assert_eq!(
            v["snat"],
            serde_json::json!({
                "kind": "node",
                "addr": "192.168.50.10:61234",
                "client": "10.0.0.1:1000",
                "hash": 7,
                "probe": 1,
                "port_state": "time_wait",
            })
        );
        let text = render_trace(&snatted);
        assert!(
            text.contains(
                "snat:     client 10.0.0.1:1000 as 192.168.50.10:61234 (candidate port 2 of 8"
            ) && text.contains("routed:   routed to its next hop"),
            "{text}"
        );
    }
}
