//! `lbctl trace`: what the datapath does with one packet, forward or reply, as
//! `lb_datapath::predict` predicts it from the live maps, laid out as the JSON's fields. The
//! explanation in words is rendering's job (`render::trace`), from the prediction kept here.

use std::net::SocketAddrV4;

use lb_common::{
    conntrack::{CtEntry, ct_flags},
    maps::Frontend,
    snat::SnatPort,
    stats::Reason,
};
use lb_datapath::{
    maps::{Maps, MapsError},
    predict::{self, Forward, Reply, Selection, SnatChoice, SourceNat},
};
use serde::Serialize;

use super::rows::ServiceValue;
use crate::decode::{self, Proto, SECOND_NS, Scope, display_serialized};

/// `lbctl trace`: what the datapath does with one packet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trace {
    pub direction: Direction,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: Proto,
    /// Forward only: `"internal"` (lb_from_pod) or `"external"` (lb_xdp, lb_ext_in).
    pub scope: Option<Scope>,
    /// Forward only: the packet is a bare TCP SYN.
    pub syn: bool,
    pub decision: Decision,
    pub verdict: Verdict,
    /// The `LB_VERDICTS` counter the packet bumps, `null` when it is not counted. With verdict
    /// `"forward"`, `forwarded` counts it too when the FIB lookup resolves.
    #[serde(serialize_with = "decode::serialize_opt_reason")]
    pub reason: Option<Reason>,
    /// The service the frontend maps to (forward decisions after the service lookup).
    pub service: Option<ServiceValue>,
    /// The backend set: the frontend's, or the one recorded in conntrack. `service_id` in the
    /// JSON, whose field names stay.
    #[serde(rename = "service_id")]
    pub set_id: Option<u32>,
    pub backend_id: Option<u32>,
    pub backend: Option<SocketAddrV4>,
    /// New flows: how the backend was chosen.
    pub selection: Option<TraceSelection>,
    /// New flows of a service with session affinity: the datapath records (or refreshes) the
    /// client's affinity entry.
    pub affinity_recorded: bool,
    /// What a reject sends back.
    pub reject: Option<RejectKind>,
    /// The packet after translation when it passes, is forwarded or bounced (`null` when
    /// dropped or rejected).
    pub output: Option<TracePacket>,
    /// Source NAT of the flow (`established`, `new_flow`, `snat_reply`, `hairpin_reply`,
    /// `snat_untouched`), else `null`.
    pub snat: Option<TraceSnat>,
    /// What the fields above were read from, for the explanation.
    #[serde(skip)]
    pub prediction: Prediction,
    /// The datapath's clock when the maps were read (`predict::coarse_now_ns`), which
    /// lifetimes in the explanation count from.
    #[serde(skip)]
    pub now_ns: u64,
}

/// Which way the traced packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Client -> frontend: lb_from_pod / lb_xdp / lb_ext_in.
    Forward,
    /// Backend -> client: lb_to_pod / lb_ext_out.
    Reply,
}

/// What the datapath decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    NotAFrontend,
    NotServed,
    RejectUnknownPort,
    DropSourceRange,
    RejectNoBackend,
    DropNoBackend,
    Established,
    NewFlow,
    DropSnatPorts,
    /// A pod's new direct connection (to an address without a frontend) given another source
    /// port: a load-balanced flow of its client port holds its reply key.
    PortRemapped,
    /// The reply of a source-NATed flow reaching the node.
    SnatReply,
    /// The reply of a hairpin flow.
    HairpinReply,
    Inconsistent,
    /// Reply direction: the source restored to the frontend.
    ReverseNat,
    /// Reply direction: no reply of a load-balanced flow.
    NotTracked,
    /// Reply direction: the reply of a source-NATed or hairpin flow, which the reply path
    /// leaves alone.
    SnatUntouched,
}

impl Decision {
    /// The `LB_VERDICTS` counter a packet so decided bumps.
    pub const fn reason(self) -> Option<Reason> {
        match self {
            Self::NotAFrontend | Self::NotServed | Self::NotTracked | Self::SnatUntouched => None,
            Self::RejectUnknownPort => Some(Reason::RejectUnknownPort),
            Self::DropSourceRange => Some(Reason::DropSourceRange),
            Self::RejectNoBackend => Some(Reason::RejectNoBackend),
            Self::DropNoBackend => Some(Reason::DropNoBackend),
            Self::Established => Some(Reason::Established),
            Self::NewFlow => Some(Reason::NewFlow),
            Self::PortRemapped => Some(Reason::PortRemapped),
            Self::DropSnatPorts => Some(Reason::DropSnatPorts),
            Self::SnatReply | Self::HairpinReply | Self::ReverseNat => Some(Reason::ReplyNat),
            Self::Inconsistent => Some(Reason::DropNoTable),
        }
    }
}

/// What becomes of the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Passes, possibly rewritten.
    Pass,
    Drop,
    /// A TCP RST or ICMP port unreachable goes back out of the interface instead.
    Reject,
    /// Rewritten and routed to its next hop by this node (source-NATed flows and their
    /// replies): a FIB lookup sends it straight out (XDP_TX / redirect; at XDP a next hop whose
    /// MAC is unknown leaves the packet untouched to the tc program behind it; no route:
    /// dropped as `drop_no_route`).
    Forward,
    /// Rewritten and sent straight back out of the interface it came in on, MAC addresses
    /// swapped (hairpin flows, back into the pod).
    Bounce,
}

/// What a reject sends back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    TcpRst,
    IcmpPortUnreachable,
}

impl RejectKind {
    pub fn of(proto: Proto) -> Self {
        if proto == Proto::Tcp {
            Self::TcpRst
        } else {
            Self::IcmpPortUnreachable
        }
    }
}

display_serialized!(Direction, Decision, Verdict, RejectKind, PortState);

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

impl TraceSelection {
    pub fn new(selection: Selection, now_ns: u64) -> Self {
        match selection {
            Selection::Single => Self::Single,
            Selection::Maglev {
                hash,
                slot,
                table_size,
            } => Self::Maglev {
                hash,
                slot,
                table_size,
            },
            Selection::Affinity {
                last_used_ns,
                timeout_s,
            } => Self::Affinity {
                age_s: now_ns.saturating_sub(last_used_ns) / SECOND_NS,
                timeout_s,
                last_used_ns,
            },
        }
    }
}

/// The packet as it leaves the hook when the datapath passes (forwards, bounces) it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TracePacket {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// Source NAT of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TraceSnat {
    pub kind: SnatKind,
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
    /// New flows: what held the chosen port (else `null`).
    pub port_state: Option<PortState>,
}

impl TraceSnat {
    /// Without allocation details.
    fn new(kind: SnatKind, addr: SocketAddrV4, client: SocketAddrV4) -> Self {
        Self {
            kind,
            addr,
            client,
            hash: None,
            probe: None,
            port_state: None,
        }
    }

    /// With the details of how its port was chosen.
    fn chosen(kind: SnatKind, choice: &SnatChoice, client: SocketAddrV4) -> Self {
        Self {
            hash: Some(choice.hash),
            probe: Some(choice.probe),
            port_state: Some(choice.state.into()),
            ..Self::new(kind, choice.source, client)
        }
    }
}

/// Why a flow is source-NATed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SnatKind {
    /// From outside the cluster to a backend on another node: to the node's SNAT address.
    Node,
    /// A pod balanced to itself: to the hairpin address.
    Hairpin,
    /// Another live flow of the client's port holds the reply key: the client's address kept,
    /// another port.
    ClientPort,
}

impl SnatKind {
    /// The kind of a source-NATed flow's conntrack entry.
    fn of(entry: &CtEntry) -> Self {
        if entry.client_port_remapped() {
            Self::ClientPort
        } else if entry.flags & ct_flags::HAIRPIN != 0 {
            Self::Hairpin
        } else {
            Self::Node
        }
    }
}

/// What held a new flow's SNAT port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortState {
    Free,
    /// This same client flow, which keeps its port.
    Reopened,
    /// A flow the backend keeps in TIME_WAIT: it takes the SYN if its timestamp is newer, else
    /// answers with an ACK the client resets, and the SYN goes through on its retransmission.
    TimeWait,
    Taken,
}

impl From<SnatPort> for PortState {
    fn from(state: SnatPort) -> Self {
        match state {
            SnatPort::Free => Self::Free,
            SnatPort::Reopened => Self::Reopened,
            SnatPort::TimeWait => Self::TimeWait,
            SnatPort::Taken => Self::Taken,
        }
    }
}

/// The prediction a trace was laid out from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prediction {
    Forward(Forward),
    Reply(Reply),
}

/// Predicts what the forward path (`lb_from_pod` for internal scope, `lb_xdp` and `lb_ext_in`
/// for external) does with `src -> dst`. `syn`: a bare TCP SYN (else a segment without SYN).
pub fn forward(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: Proto,
    scope: Scope,
    syn: bool,
) -> Result<Trace, MapsError> {
    let prediction = predict::forward(maps, src, dst, proto.number(), scope.number(), syn)?;
    let (decision, verdict) = classify(&prediction);
    let mut t = Trace {
        scope: Some(scope),
        syn,
        reject: (verdict == Verdict::Reject).then(|| RejectKind::of(proto)),
        ..Trace::decided(
            src,
            dst,
            proto,
            decision,
            verdict,
            Prediction::Forward(prediction.clone()),
        )
    };
    match prediction {
        Forward::NotAFrontend | Forward::PassNotServed { .. } => {
            t.output = Some(TracePacket { src, dst });
        }
        Forward::RejectUnknownPort => {}
        Forward::DropSourceRange { frontend }
        | Forward::NoBackend { frontend, .. }
        | Forward::Inconsistent { frontend, .. } => t.frontend(&frontend),
        Forward::Established {
            set_id,
            backend_id,
            backend,
            snat,
            entry,
        } => {
            t.set_id = Some(set_id);
            t.backend(backend_id, backend);
            t.snat = snat.map(|addr| TraceSnat::new(SnatKind::of(&entry), addr, src));
            t.output = Some(TracePacket {
                src: snat.unwrap_or(src),
                dst: backend,
            });
        }
        Forward::NewFlow {
            frontend,
            selection,
            backend_id,
            backend,
            snat,
        } => {
            t.chosen(&frontend, selection, backend_id, backend);
            t.snat = snat.and_then(|snat| match snat {
                SourceNat::Hairpin(addr) => Some(TraceSnat::new(SnatKind::Hairpin, addr, src)),
                SourceNat::Node(choice) => Some(TraceSnat::chosen(SnatKind::Node, &choice, src)),
                SourceNat::ClientPort(choice) => {
                    Some(TraceSnat::chosen(SnatKind::ClientPort, &choice, src))
                }
                SourceNat::Dsr => None,
            });
            t.output = Some(TracePacket {
                src: t.snat.map_or(src, |s| s.addr),
                dst: backend,
            });
        }
        Forward::DropSnatPorts {
            frontend,
            selection,
            backend_id,
            backend,
            failure: _,
        } => {
            // The datapath picks the backend (recording affinity) before it allocates a port.
            t.chosen(&frontend, selection, backend_id, backend);
        }
        Forward::SnatReply(reply) | Forward::HairpinReply(reply) => {
            t.set_id = Some(reply.set_id);
            t.backend(reply.backend_id, src);
            t.output = Some(TracePacket {
                src: reply.frontend,
                dst: reply.client,
            });
            let kind = if decision == Decision::HairpinReply {
                SnatKind::Hairpin
            } else {
                SnatKind::Node
            };
            t.snat = Some(TraceSnat::new(kind, dst, reply.client));
        }
        Forward::DirectEstablished { source, .. } => {
            t.snat = Some(TraceSnat::new(SnatKind::ClientPort, source, src));
            t.output = Some(TracePacket { src: source, dst });
        }
        Forward::DirectRemapped { choice, .. } => {
            t.snat = Some(TraceSnat::chosen(SnatKind::ClientPort, &choice, src));
            t.output = Some(TracePacket {
                src: choice.source,
                dst,
            });
        }
        Forward::DirectPortsTaken { .. } => {}
    }
    Ok(t)
}

/// The decision and verdict of a forward prediction.
fn classify(prediction: &Forward) -> (Decision, Verdict) {
    match prediction {
        Forward::NotAFrontend => (Decision::NotAFrontend, Verdict::Pass),
        Forward::PassNotServed { .. } => (Decision::NotServed, Verdict::Pass),
        Forward::RejectUnknownPort => (Decision::RejectUnknownPort, Verdict::Reject),
        Forward::DropSourceRange { .. } => (Decision::DropSourceRange, Verdict::Drop),
        Forward::NoBackend { drop: true, .. } => (Decision::DropNoBackend, Verdict::Drop),
        Forward::NoBackend { drop: false, .. } => (Decision::RejectNoBackend, Verdict::Reject),
        Forward::Established { snat, entry, .. } => (
            Decision::Established,
            match snat {
                None if entry.dsr() => Verdict::Forward,
                None => Verdict::Pass,
                Some(_) => nat_verdict(SnatKind::of(entry)),
            },
        ),
        Forward::NewFlow { snat, .. } => (
            Decision::NewFlow,
            match snat {
                None => Verdict::Pass,
                Some(SourceNat::Node(_)) => nat_verdict(SnatKind::Node),
                Some(SourceNat::Hairpin(_)) => nat_verdict(SnatKind::Hairpin),
                Some(SourceNat::ClientPort(_)) => nat_verdict(SnatKind::ClientPort),
                // Routed to the backend's node like a source-NATed flow.
                Some(SourceNat::Dsr) => Verdict::Forward,
            },
        ),
        Forward::DropSnatPorts { .. } => (Decision::DropSnatPorts, Verdict::Drop),
        Forward::SnatReply(_) => (Decision::SnatReply, nat_verdict(SnatKind::Node)),
        Forward::HairpinReply(_) => (Decision::HairpinReply, nat_verdict(SnatKind::Hairpin)),
        Forward::Inconsistent { .. } => (Decision::Inconsistent, Verdict::Drop),
        Forward::DirectEstablished { .. } => (Decision::Established, Verdict::Pass),
        Forward::DirectRemapped { .. } => (Decision::PortRemapped, Verdict::Pass),
        Forward::DirectPortsTaken { .. } => (Decision::DropSnatPorts, Verdict::Drop),
    }
}

/// Source-NATed packets leave towards their next hop, hairpin packets back into the pod.
const fn nat_verdict(kind: SnatKind) -> Verdict {
    match kind {
        SnatKind::Node => Verdict::Forward,
        SnatKind::Hairpin => Verdict::Bounce,
        // The client keeps its address: the stack routes the packet on, as any other.
        SnatKind::ClientPort => Verdict::Pass,
    }
}

/// Predicts what the reply path (`lb_to_pod`, `lb_ext_out`) does with `src -> dst` (a backend
/// answering).
pub fn reply(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: Proto,
) -> Result<Trace, MapsError> {
    let prediction = predict::reply(maps, src, dst, proto.number())?;
    let decision = match prediction {
        Reply::NotTracked => Decision::NotTracked,
        Reply::ReverseNat { .. } => Decision::ReverseNat,
        Reply::SnatUntouched { .. } => Decision::SnatUntouched,
    };
    let mut t = Trace::decided(
        src,
        dst,
        proto,
        decision,
        // The reply path translates or leaves alone; it never drops.
        Verdict::Pass,
        Prediction::Reply(prediction.clone()),
    );
    match prediction {
        Reply::NotTracked => t.output = Some(TracePacket { src, dst }),
        Reply::ReverseNat {
            frontend,
            client,
            set_id,
            backend_id,
            entry: _,
        } => {
            t.set_id = Some(set_id);
            t.backend(backend_id, src);
            t.output = Some(TracePacket {
                src: frontend,
                dst: client.unwrap_or(dst),
            });
        }
        Reply::SnatUntouched {
            frontend: _,
            client,
            set_id,
            backend_id,
            hairpin,
            entry: _,
        } => {
            t.set_id = Some(set_id);
            t.backend(backend_id, src);
            t.output = Some(TracePacket { src, dst });
            let kind = if hairpin {
                SnatKind::Hairpin
            } else {
                SnatKind::Node
            };
            t.snat = Some(TraceSnat::new(kind, dst, client));
        }
    }
    Ok(t)
}

impl Trace {
    /// The trace of the packet `src -> dst`/`proto` that `prediction` decided, with none of the
    /// details yet (no scope, SYN, service, backend, output or source NAT) and the datapath's
    /// clock read now, just after the maps.
    fn decided(
        src: SocketAddrV4,
        dst: SocketAddrV4,
        proto: Proto,
        decision: Decision,
        verdict: Verdict,
        prediction: Prediction,
    ) -> Self {
        Self {
            direction: match prediction {
                Prediction::Forward(_) => Direction::Forward,
                Prediction::Reply(_) => Direction::Reply,
            },
            src,
            dst,
            proto,
            scope: None,
            syn: false,
            decision,
            verdict,
            reason: decision.reason(),
            service: None,
            set_id: None,
            backend_id: None,
            backend: None,
            selection: None,
            affinity_recorded: false,
            reject: None,
            output: None,
            snat: None,
            prediction,
            now_ns: predict::coarse_now_ns(),
        }
    }

    /// The frontend the packet matched, and its backend set.
    fn frontend(&mut self, frontend: &Frontend) {
        self.service = Some(frontend.into());
        self.set_id = Some(frontend.set_id);
    }

    fn backend(&mut self, id: u32, addr: SocketAddrV4) {
        self.backend_id = Some(id);
        self.backend = Some(addr);
    }

    /// A new flow's frontend and the backend chosen for it.
    fn chosen(
        &mut self,
        frontend: &Frontend,
        selection: Selection,
        backend_id: u32,
        backend: SocketAddrV4,
    ) {
        self.frontend(frontend);
        self.backend(backend_id, backend);
        self.selection = Some(TraceSelection::new(selection, self.now_ns));
        self.affinity_recorded = frontend.affinity_timeout_s != 0;
    }
}

/// A new flow balanced by Maglev, as a test fixture.
#[cfg(test)]
pub fn sample() -> Trace {
    let src: SocketAddrV4 = "10.0.0.1:1000".parse().unwrap();
    let backend: SocketAddrV4 = "10.0.0.3:8080".parse().unwrap();
    let selection = Selection::Maglev {
        hash: 7,
        slot: 7,
        table_size: 13,
    };
    Trace {
        direction: Direction::Forward,
        src,
        dst: "10.0.0.2:80".parse().unwrap(),
        proto: Proto::Tcp,
        scope: Some(Scope::Internal),
        syn: true,
        decision: Decision::NewFlow,
        verdict: Verdict::Pass,
        reason: Some(Reason::NewFlow),
        service: None,
        set_id: Some(1),
        backend_id: Some(2),
        backend: Some(backend),
        selection: Some(TraceSelection::new(selection, 0)),
        affinity_recorded: false,
        reject: None,
        output: Some(TracePacket { src, dst: backend }),
        snat: None,
        prediction: Prediction::Forward(Forward::NewFlow {
            frontend: Frontend {
                set_id: 1,
                ..Default::default()
            },
            selection,
            backend_id: 2,
            backend,
            snat: None,
        }),
        now_ns: 0,
    }
}

/// The source NAT of [`sample`]'s flow to the node's address, as a test fixture.
#[cfg(test)]
pub fn sample_snat() -> TraceSnat {
    TraceSnat {
        kind: SnatKind::Node,
        addr: "192.168.50.10:61234".parse().unwrap(),
        client: "10.0.0.1:1000".parse().unwrap(),
        hash: Some(7),
        probe: Some(1),
        port_state: Some(PortState::TimeWait),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_json_field_names_are_stable() {
        let t = sample();
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["direction"], "forward");
        assert_eq!(v["decision"], "new_flow");
        assert_eq!(v["verdict"], "pass");
        assert_eq!(v["reason"], "new_flow");
        assert_eq!(v["service_id"], 1);
        assert_eq!(v["selection"]["method"], "maglev");
        assert_eq!(v["output"]["dst"], "10.0.0.3:8080");
        assert_eq!(v["scope"], "internal");
        assert_eq!(v["proto"], "tcp");
        assert!(v["snat"].is_null());
        assert!(v.get("prediction").is_none() && v.get("now_ns").is_none());

        let snatted = Trace {
            verdict: Verdict::Forward,
            reject: Some(RejectKind::IcmpPortUnreachable),
            snat: Some(sample_snat()),
            ..t
        };
        let v = serde_json::to_value(&snatted).unwrap();
        assert_eq!(v["verdict"], "forward");
        assert_eq!(v["reject"], "icmp_port_unreachable");
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
    }

    #[test]
    fn decisions_count_under_their_reasons() {
        assert_eq!(Decision::NotServed.reason(), None);
        assert_eq!(Decision::HairpinReply.reason(), Some(Reason::ReplyNat));
        assert_eq!(Decision::Inconsistent.reason(), Some(Reason::DropNoTable));
        assert_eq!(Decision::SnatUntouched.to_string(), "snat_untouched");
        assert_eq!(PortState::TimeWait.to_string(), "time_wait");
    }
}
