//! What a program must do with a frame, read from the maps just before it runs.
//!
//! For TCP and UDP this is the predictor's decision (`lb_datapath::predict`, what `lbctl trace`
//! shows), mapped to the verdict and translation each hook gives it. The few decisions the
//! predictor does not cover are written here from what a load balancer owes its flows, not from
//! the programs' code: a later fragment follows its first fragment's translation, and an ICMP
//! error about a translated packet reaches its sender quoting the packet as that sender sent it.
//! Frames the programs cannot parse far enough to concern a frontend must pass untouched.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    Be16, Be32, answer,
    conntrack::{CtEntry, FORWARD, REPLY},
    maps::{AddrInfo, FragKey, scope},
    net::{proto, tcp_flags},
    stats::Reason,
};
use lb_datapath::{
    maps::Maps,
    predict::{self, Forward, Reply, SnatFailure, SourceNat},
};

use super::{
    scenario,
    wire::{self, Frag, Ipv4, L4, Quote},
};
use crate::common::harness::Hook;

/// What a program must do with a frame.
#[derive(Clone, Debug)]
pub enum Expect {
    /// Passes byte for byte, uncounted: it concerns no frontend, or the datapath leaves it to
    /// the stack.
    Untouched,
    /// Counted once under the reason, with this outcome.
    Counted(Reason, Outcome),
    /// Refused with a generated answer (a TCP RST, else ICMP port unreachable), counted under
    /// the reason.
    Reject(Reason, Answer),
    /// Translated and routed by the node itself: the FIB lookup decides (the table in
    /// `lb-ebpf/src/fib.rs`), which maps cannot predict. `then` is what happens once a route
    /// is found.
    Routed {
        /// The TTL runs out on forwarding: answered with ICMP time exceeded, whatever the route.
        ttl_expired: bool,
        /// Whether an ICMP answer about the packet (time exceeded, fragmentation needed) can go.
        answer: Answer,
        then: Box<Expect>,
    },
}

/// What happens to a frame the datapath decided on.
#[derive(Clone, Debug)]
pub enum Outcome {
    Drop,
    /// Passes on through the stack, translated.
    Pass(Nat),
    /// Sent back out of the interface it came in on (a hairpin flow), translated, MACs swapped.
    Bounce(Nat),
    /// Sent to its next hop after a FIB lookup: translated, TTL decremented, MACs the route's.
    Forward(Nat),
}

/// Whether a generated answer about a frame can be built, and whether it may go at all.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    /// A RST answers anything but a RST; an ICMP error quotes only an option-less header and
    /// 8 bytes of L4 (`lb-ebpf/src/reject.rs`).
    pub builds: bool,
    /// To a group MAC or a source that is no unicast address, nothing goes, ever.
    pub suppressed: bool,
    /// The answer is a TCP RST (else an ICMP error).
    pub reset: bool,
}

/// A translation: the bytes it writes, and the checksums that follow them.
#[derive(Clone, Debug, Default)]
pub struct Nat {
    /// (offset, bytes) written over the frame.
    pub writes: Vec<(usize, Vec<u8>)>,
    /// Each checksum the translation updates: the offsets of the 16-bit words of its sum that
    /// change, the checksum's own first. Updated incrementally, the one's complement sum of
    /// those words must not change.
    pub sums: Vec<Vec<usize>>,
}

impl Nat {
    fn write(&mut self, off: usize, bytes: &[u8]) {
        self.writes.push((off, bytes.to_vec()));
    }

    /// Rewrites the address at `addr_off` and, when given, the port at `port_off`.
    fn endpoint(&mut self, addr_off: usize, addr: Ipv4Addr, port: Option<(usize, u16)>) {
        self.write(addr_off, &addr.octets());
        if let Some((off, port)) = port {
            self.write(off, &port.to_be_bytes());
        }
    }
}

/// The words of an IPv4 header's sum an address rewrite changes (addresses are 2 words each).
fn ip_words(l3: usize) -> Vec<usize> {
    vec![l3 + 10, l3 + 12, l3 + 14, l3 + 16, l3 + 18]
}

/// The words of a TCP/UDP checksum (pseudo header included) an address or port rewrite
/// changes.
fn l4_words(l3: usize, l4: usize, csum: usize) -> Vec<usize> {
    vec![csum, l3 + 12, l3 + 14, l3 + 16, l3 + 18, l4, l4 + 2]
}

/// Adds the L4 checksum at `csum` to `nat`: a UDP datagram without a checksum (zero) keeps it.
fn l4_sum(nat: &mut Nat, frame: &[u8], udp: bool, words: Vec<usize>) {
    let csum = words[0];
    if udp && wire::u16_at(frame, csum) == 0 {
        nat.write(csum, &[0, 0]);
    } else {
        nat.sums.push(words);
    }
}

/// DNAT and/or SNAT of a whole TCP/UDP packet.
fn translate(
    frame: &[u8],
    ip: &Ipv4<'_>,
    l4: &L4,
    src: Option<SocketAddrV4>,
    dst: Option<SocketAddrV4>,
) -> Nat {
    let mut nat = Nat::default();
    // SCTP's ports are never rewritten (`proto::rewrites_ports`).
    let ports = proto::rewrites_ports(ip.proto());
    if let Some(src) = src {
        nat.endpoint(
            wire::SRC_OFF,
            *src.ip(),
            ports.then_some((l4.off, src.port())),
        );
    }
    if let Some(dst) = dst {
        nat.endpoint(
            wire::DST_OFF,
            *dst.ip(),
            ports.then_some((l4.off + 2, dst.port())),
        );
    }
    nat.sums.push(ip_words(wire::L3));
    if let Some(csum_off) = l4.csum_off {
        let udp = ip.proto() == proto::UDP;
        l4_sum(&mut nat, frame, udp, l4_words(wire::L3, l4.off, csum_off));
    }
    nat
}

/// The expectation for `frame` through `hook`, from the maps as they are now.
pub fn expect(maps: &Maps, hook: Hook, frame: &[u8]) -> Expect {
    match hook {
        Hook::FromPod => forward(maps, scope::INTERNAL, frame),
        Hook::Xdp | Hook::ExtIn => forward(maps, scope::EXTERNAL, frame),
        Hook::ToPod | Hook::ExtOut => reply(maps, frame),
    }
}

/// A client's packet (`forward.rs`).
fn forward(maps: &Maps, flow_scope: u8, frame: &[u8]) -> Expect {
    let Some(ip) = wire::ipv4(frame) else {
        return Expect::Untouched;
    };
    let Ok(addr) = maps.addrs.get(&Be32::from(ip.dst()), 0) else {
        return if flow_scope == scope::INTERNAL {
            direct(maps, frame, &ip)
        } else {
            Expect::Untouched
        };
    };
    let Some(l4_off) = ip.l4_off() else {
        return Expect::Counted(Reason::DropMalformed, Outcome::Drop);
    };
    if ip.frag() == Frag::Later {
        return later_fragment_forward(maps, frame, &ip, addr);
    }
    if ip.proto() == proto::ICMP && wire::is_icmp_error(frame, l4_off) {
        // An error about none of our flows is the stack's.
        return icmp_towards_frontend(maps, frame, l4_off).unwrap_or(Expect::Untouched);
    }
    if !proto::balanced(ip.proto()) {
        return if addr.is_cluster_ip() {
            Expect::Reject(Reason::RejectUnknownPort, answer(frame, &ip, None))
        } else {
            Expect::Untouched
        };
    }
    let Some(l4) = wire::l4(&ip, l4_off) else {
        return Expect::Counted(Reason::DropMalformed, Outcome::Drop);
    };
    let bare_syn = l4.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    let decision = predict::forward(
        maps,
        l4.src(&ip),
        l4.dst(&ip),
        ip.proto(),
        flow_scope,
        bare_syn,
    )
    .expect("prediction");
    predicted_forward(frame, &ip, &l4, decision)
}

/// A pod's packet to an address without a frontend (`direct.rs`): untouched unless it is a
/// TCP or UDP packet the datapath can read ports from, which the predictor then decides on.
fn direct(maps: &Maps, frame: &[u8], ip: &Ipv4<'_>) -> Expect {
    let Some(l4_off) = ip.l4_off() else {
        return Expect::Untouched;
    };
    if ip.frag() == Frag::Later || (ip.proto() != proto::TCP && ip.proto() != proto::UDP) {
        return Expect::Untouched;
    }
    let Some(l4) = wire::l4(ip, l4_off) else {
        return Expect::Untouched;
    };
    let bare_syn = l4.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    let decision = predict::forward(
        maps,
        l4.src(ip),
        l4.dst(ip),
        ip.proto(),
        scope::INTERNAL,
        bare_syn,
    )
    .expect("prediction");
    predicted_forward(frame, ip, &l4, decision)
}

/// The predictor's decision as a verdict and translation (lbctl's `trace` makes the same
/// mapping for its verdicts).
fn predicted_forward(frame: &[u8], ip: &Ipv4<'_>, l4: &L4, decision: Forward) -> Expect {
    use Expect::Counted;
    use Outcome::{Bounce, Drop, Forward as Routed, Pass};
    let reject = |reason| Expect::Reject(reason, answer(frame, ip, Some(l4)));
    let nat = |src, dst| translate(frame, ip, l4, src, dst);
    match decision {
        Forward::NotAFrontend | Forward::PassNotServed { .. } => Expect::Untouched,
        Forward::RejectUnknownPort => reject(Reason::RejectUnknownPort),
        Forward::NoBackend { drop: false, .. } => reject(Reason::RejectNoBackend),
        Forward::NoBackend { drop: true, .. } => Counted(Reason::DropNoBackend, Drop),
        Forward::DropSourceRange { .. } => Counted(Reason::DropSourceRange, Drop),
        Forward::Inconsistent { .. } => Counted(Reason::DropNoTable, Drop),
        Forward::Established {
            backend,
            snat,
            entry,
            ..
        } => {
            let nat = nat(snat, Some(backend));
            if entry.routed() {
                routed(frame, ip, Counted(Reason::Established, Routed(nat)))
            } else if entry.hairpin() {
                Counted(Reason::Established, Bounce(nat))
            } else {
                Counted(Reason::Established, Pass(nat))
            }
        }
        Forward::NewFlow { backend, snat, .. } => match snat {
            None => Counted(Reason::NewFlow, Pass(nat(None, Some(backend)))),
            Some(SourceNat::ClientPort(choice)) => Counted(
                Reason::NewFlow,
                Pass(nat(Some(choice.source), Some(backend))),
            ),
            Some(SourceNat::Hairpin(source)) => {
                Counted(Reason::NewFlow, Bounce(nat(Some(source), Some(backend))))
            }
            Some(SourceNat::Node(choice)) => {
                let nat = nat(Some(choice.source), Some(backend));
                routed(frame, ip, Counted(Reason::NewFlow, Routed(nat)))
            }
            // Its packets grow an option, which this oracle does not build: DSR has tests of
            // its own (`datapath_dsr`).
            Some(SourceNat::Dsr) => panic!("the fuzz scenarios program no DSR frontend"),
        },
        // The client's own ports ran out: no route is looked up for a flow that keeps its
        // address.
        Forward::DropSnatPorts {
            failure: SnatFailure::ClientPortsTaken { .. },
            ..
        } => Counted(Reason::DropSnatPorts, Drop),
        // The route comes first: only a routable flow finds the node's ports taken.
        Forward::DropSnatPorts { .. } => routed(frame, ip, Counted(Reason::DropSnatPorts, Drop)),
        Forward::SnatReply(r) => {
            let nat = nat(Some(r.frontend), Some(r.client));
            routed(frame, ip, Counted(Reason::ReplyNat, Routed(nat)))
        }
        Forward::HairpinReply(r) => Counted(
            Reason::ReplyNat,
            Bounce(nat(Some(r.frontend), Some(r.client))),
        ),
        Forward::DirectEstablished {
            destination,
            source,
            ..
        } => Counted(
            Reason::Established,
            Pass(nat(Some(source), Some(destination))),
        ),
        Forward::DirectRemapped {
            destination,
            choice,
            ..
        } => Counted(
            Reason::PortRemapped,
            Pass(nat(Some(choice.source), Some(destination))),
        ),
        Forward::DirectPortsTaken { .. } => Counted(Reason::DropSnatPorts, Drop),
    }
}

fn routed(frame: &[u8], ip: &Ipv4<'_>, then: Expect) -> Expect {
    Expect::Routed {
        ttl_expired: ip.ttl() <= 1,
        answer: Answer {
            builds: icmp_quotes(frame, ip),
            suppressed: suppressed(frame, ip),
            reset: false,
        },
        then: Box::new(then),
    }
}

/// A packet on its way to a client (`reply.rs`).
fn reply(maps: &Maps, frame: &[u8]) -> Expect {
    let Some(ip) = wire::ipv4(frame) else {
        return Expect::Untouched;
    };
    let Some(l4_off) = ip.l4_off() else {
        return Expect::Untouched;
    };
    if ip.frag() == Frag::Later {
        return later_fragment_reply(maps, &ip);
    }
    if ip.proto() == proto::ICMP {
        if !wire::is_icmp_error(frame, l4_off) {
            return Expect::Untouched;
        }
        return icmp_towards_client(maps, frame, &ip, l4_off).unwrap_or(Expect::Untouched);
    }
    let Some(l4) = wire::l4(&ip, l4_off) else {
        return Expect::Untouched;
    };
    match predict::reply(maps, l4.src(&ip), l4.dst(&ip), ip.proto()).expect("prediction") {
        Reply::NotTracked | Reply::SnatUntouched { .. } => Expect::Untouched,
        Reply::ReverseNat {
            frontend, client, ..
        } => Expect::Counted(
            Reason::ReplyNat,
            Outcome::Pass(translate(frame, &ip, &l4, Some(frontend), client)),
        ),
    }
}

/// The ports a first fragment left for the later fragments of its datagram.
fn first_fragment_ports(maps: &Maps, ip: &Ipv4<'_>) -> Option<(u16, u16)> {
    let key = FragKey {
        src_addr: Be32::from(ip.src()),
        dst_addr: Be32::from(ip.dst()),
        ip_id: Be16::from_host(u16::from_be_bytes(ip.id())),
        proto: ip.proto(),
        _pad: 0,
    };
    let ports = maps.frags.get(&key, 0).ok()?;
    Some((ports.src_port.to_host(), ports.dst_port.to_host()))
}

fn ct_entry(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
    dir: u8,
) -> Option<CtEntry> {
    maps.ct
        .get(&predict::flow_key(src, dst, l4_proto, dir), 0)
        .ok()
}

/// Rewrites addresses only: a later fragment carries no ports (its first fragment's L4
/// checksum already covers the whole datagram).
fn translate_addrs(src: Option<Be32>, dst: Option<Be32>) -> Nat {
    let mut nat = Nat::default();
    if let Some(src) = src {
        nat.endpoint(wire::SRC_OFF, src.to_ip(), None);
    }
    if let Some(dst) = dst {
        nat.endpoint(wire::DST_OFF, dst.to_ip(), None);
    }
    nat.sums.push(ip_words(wire::L3));
    nat
}

/// A later fragment to a frontend address (`addr`): translated as its first fragment was, when
/// that one went through and its flow goes on, and sent where the first went; else dropped
/// towards a ClusterIP (it could go nowhere useful) and left to the stack elsewhere
/// (`fragment.rs`). To the SNAT or hairpin address, the later fragment of a source-NATed or
/// hairpin flow's reply comes first.
fn later_fragment_forward(maps: &Maps, frame: &[u8], ip: &Ipv4<'_>, addr: AddrInfo) -> Expect {
    let now = predict::coarse_now_ns();
    let ports = first_fragment_ports(maps, ip);
    let key = |(sport, dport)| {
        (
            SocketAddrV4::new(ip.src(), sport),
            SocketAddrV4::new(ip.dst(), dport),
        )
    };
    if addr.is_snat() || addr.is_hairpin() {
        let reply = ports.and_then(|p| {
            let (src, dst) = key(p);
            ct_entry(maps, src, dst, ip.proto(), REPLY)
        });
        if let Some(e) = reply.filter(|e| (e.routed() || e.hairpin()) && e.live(now)) {
            let nat = translate_addrs(Some(e.nat_addr), Some(e.snat_addr));
            return if e.routed() {
                routed(
                    frame,
                    ip,
                    Expect::Counted(Reason::FragmentNat, Outcome::Forward(nat)),
                )
            } else {
                Expect::Counted(Reason::FragmentNat, Outcome::Bounce(nat))
            };
        }
    }
    let entry = ports.and_then(|p| {
        let (src, dst) = key(p);
        let entry = ct_entry(maps, src, dst, ip.proto(), FORWARD)?;
        entry.continues(0, now).then_some(entry)
    });
    let Some(e) = entry else {
        return if addr.is_cluster_ip() {
            Expect::Counted(Reason::DropFragment, Outcome::Drop)
        } else {
            Expect::Untouched
        };
    };
    let nat = translate_addrs(e.snat().then_some(e.snat_addr), Some(e.nat_addr));
    // Where its first fragment went: routed to the backend's node, back into the pod for a
    // hairpin flow, else on through the stack.
    if e.routed() {
        routed(
            frame,
            ip,
            Expect::Counted(Reason::FragmentNat, Outcome::Forward(nat)),
        )
    } else if e.hairpin() {
        Expect::Counted(Reason::FragmentNat, Outcome::Bounce(nat))
    } else {
        Expect::Counted(Reason::FragmentNat, Outcome::Pass(nat))
    }
}

/// A later fragment on its way to a client: translated as its first fragment was.
fn later_fragment_reply(maps: &Maps, ip: &Ipv4<'_>) -> Expect {
    let entry = first_fragment_ports(maps, ip).and_then(|(sport, dport)| {
        let src = SocketAddrV4::new(ip.src(), sport);
        let dst = SocketAddrV4::new(ip.dst(), dport);
        let entry = ct_entry(maps, src, dst, ip.proto(), REPLY)?;
        entry.live(predict::coarse_now_ns()).then_some(entry)
    });
    match entry {
        Some(e) => Expect::Counted(
            Reason::FragmentNat,
            Outcome::Pass(translate_addrs(Some(e.nat_addr), None)),
        ),
        None => Expect::Untouched,
    }
}

/// Rewrites the quoted packet's ends (address and port) with every checksum that covers them:
/// the quoted IPv4 header's, its L4 checksum when the quote reaches it, and the ICMP checksum.
fn rewrite_quote(
    nat: &mut Nat,
    frame: &[u8],
    q: &Quote,
    src: Option<SocketAddrV4>,
    dst: Option<SocketAddrV4>,
) {
    let ports = proto::rewrites_ports(q.proto);
    if let Some(src) = src {
        nat.endpoint(
            q.l3_off + 12,
            *src.ip(),
            ports.then_some((q.l4_off, src.port())),
        );
    }
    if let Some(dst) = dst {
        nat.endpoint(
            q.l3_off + 16,
            *dst.ip(),
            ports.then_some((q.l4_off + 2, dst.port())),
        );
    }
    nat.sums.push(ip_words(q.l3_off));
    let mut icmp = vec![q.icmp_off + 2, q.l3_off + 10];
    icmp.extend(l4_words(q.l3_off, q.l4_off, 0).into_iter().skip(1));
    if let Some(csum) = q.l4_csum_off(frame.len()) {
        l4_sum(
            nat,
            frame,
            q.proto == proto::UDP,
            l4_words(q.l3_off, q.l4_off, csum),
        );
        icmp.push(csum);
    }
    nat.sums.push(icmp);
}

/// An ICMP error to a frontend about a reply the datapath translated (frontend -> client): it
/// goes to the flow's backend, quoting the reply as the backend sent it.
fn icmp_towards_frontend(maps: &Maps, frame: &[u8], icmp_off: usize) -> Option<Expect> {
    let q = wire::quote(frame, icmp_off)?;
    let e = ct_entry(maps, q.dst, q.src, q.proto, FORWARD)?;
    if !e.continues(0, predict::coarse_now_ns()) {
        return None;
    }
    let backend = SocketAddrV4::new(e.nat_addr.to_ip(), e.nat_port.to_host());
    // The backend's reply went to the source its flow has: the client, or the address and port
    // the client's were source-NATed to.
    let replied_to = e
        .snat()
        .then(|| SocketAddrV4::new(e.snat_addr.to_ip(), e.snat_port.to_host()));
    let mut nat = Nat::default();
    nat.endpoint(wire::DST_OFF, *backend.ip(), None);
    nat.sums.push(ip_words(wire::L3));
    rewrite_quote(&mut nat, frame, &q, Some(backend), replied_to);
    Some(Expect::Counted(Reason::IcmpErrorNat, Outcome::Pass(nat)))
}

/// An ICMP error to a client about a packet the datapath translated (client -> backend): it
/// reaches the client quoting the packet as the client sent it, and from the frontend when the
/// backend sent it.
fn icmp_towards_client(
    maps: &Maps,
    frame: &[u8],
    ip: &Ipv4<'_>,
    icmp_off: usize,
) -> Option<Expect> {
    let q = wire::quote(frame, icmp_off)?;
    let e = ct_entry(maps, q.dst, q.src, q.proto, REPLY)?;
    if !e.live(predict::coarse_now_ns()) {
        return None;
    }
    let frontend = SocketAddrV4::new(e.nat_addr.to_ip(), e.nat_port.to_host());
    // A client whose port was remapped sent its packet from its own port.
    let client = e
        .client_port_remapped()
        .then(|| SocketAddrV4::new(e.snat_addr.to_ip(), e.snat_port.to_host()));
    let mut nat = Nat::default();
    if ip.src() == *q.dst.ip() {
        nat.endpoint(wire::SRC_OFF, *frontend.ip(), None);
    }
    nat.sums.push(ip_words(wire::L3));
    rewrite_quote(&mut nat, frame, &q, client, Some(frontend));
    Some(Expect::Counted(Reason::IcmpErrorNat, Outcome::Pass(nat)))
}

/// Whether an ICMP error can quote the frame: an option-less header, not a later fragment, and
/// 8 bytes of L4.
fn icmp_quotes(frame: &[u8], ip: &Ipv4<'_>) -> bool {
    !ip.has_options() && ip.frag() != Frag::Later && frame.len() >= wire::L3 + 28
}

/// Whether every answer to the frame must be suppressed: a group source MAC, or a source that
/// is no unicast address.
fn suppressed(frame: &[u8], ip: &Ipv4<'_>) -> bool {
    frame[6] & 1 != 0 || !answer::unicast(Be32::from(ip.src()))
}

/// The reject of a frame: a RST for TCP (never to a RST), else ICMP port unreachable.
fn answer(frame: &[u8], ip: &Ipv4<'_>, l4: Option<&L4>) -> Answer {
    let reset = l4.is_some() && ip.proto() == proto::TCP;
    let builds = match l4 {
        Some(l4) if reset => l4.tcp_flags & tcp_flags::RST == 0,
        _ => icmp_quotes(frame, ip),
    };
    Answer {
        builds,
        suppressed: suppressed(frame, ip),
        reset,
    }
}

/// A later fragment sent right after its first fragment, which left translated to
/// `src -> dst` (bounced back where it came from, or passed on): it leaves the same way, with the
/// same addresses, whatever the maps say.
pub fn follows_first(src: Ipv4Addr, dst: Ipv4Addr, bounced: bool) -> Expect {
    let nat = translate_addrs(Some(Be32::from(src)), Some(Be32::from(dst)));
    let outcome = if bounced {
        Outcome::Bounce(nat)
    } else {
        Outcome::Pass(nat)
    };
    Expect::Counted(Reason::FragmentNat, outcome)
}

/// Whether `frame` concerns no frontend at `hook`, judged by the scenario's addresses alone
/// rather than the maps: the programs cannot read it as IPv4; or, at a forward hook, its
/// destination carries no frontend; or, at a reply hook, it comes from no backend and quotes
/// no packet to one (only a backend's packets can be replies). Such a frame must pass untouched
/// and uncounted, whatever the maps hold.
pub fn concerns_no_frontend(hook: Hook, frame: &[u8]) -> bool {
    let Some(ip) = wire::ipv4(frame) else {
        return true;
    };
    match hook {
        Hook::Xdp | Hook::ExtIn => !scenario::FRONTEND_ADDRS.contains(&ip.dst()),
        // A pod's direct connection to a backend may clash with a balanced flow's port.
        Hook::FromPod => {
            !scenario::FRONTEND_ADDRS.contains(&ip.dst())
                && !scenario::BACKEND_ADDRS.contains(&ip.dst())
        }
        Hook::ToPod | Hook::ExtOut => {
            let quoted = ip
                .l4_off()
                .filter(|_| ip.proto() == proto::ICMP)
                .and_then(|off| wire::quote(frame, off));
            let from_backend = |addr| scenario::BACKEND_ADDRS.contains(&addr);
            !from_backend(ip.src()) && !quoted.is_some_and(|q| from_backend(*q.dst.ip()))
        }
    }
}
