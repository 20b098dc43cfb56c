//! Source NAT: which new flows need it, which node address and port they get, and how the
//! replies of source-NATed flows are recognised.
//!
//! A flow from outside the cluster to a backend on another node (externalTrafficPolicy
//! Cluster) leaves this node with the node's address and a port chosen here as its source, so
//! that the backend's replies come back through this node. A port is unique per (backend
//! address, backend port, protocol): the reply conntrack entry keyed by it is the reservation.
//! A pod balanced to itself (hairpin) is source-NATed to the hairpin address instead, its own
//! port kept.
//!
//! The datapath allocates with [`allocate`] over a lookup in `LB_CT`; `lbctl trace` predicts
//! with the same function over a read of the pinned map.

use crate::{
    Address, Be16, Be32,
    conntrack::{CtEntry, CtEntryOf, FlowKey, FlowKeyOf, REPLY, ct_flags},
    maps::{
        Backend, BackendOf, Frontend, NodeConfig, backend_flags, scope,
        snat::{PREVIOUS_PORT_MIN, PROBES},
    },
    net::proto,
};

/// Whether a new flow arriving in `flow_scope` at `frontend` for `backend` must be
/// source-NATed to the node: it came from outside and the backend runs on another node, or the
/// node masquerades every flow (`config`, [`NodeConfig::masquerade_all`]) that does not keep
/// its client ([`Frontend::keeps_client`]: externalTrafficPolicy Local). Only TCP, UDP and SCTP
/// flows are balanced (an SCTP flow keeps its client's port: [`port_range`]).
#[inline(always)]
pub const fn needed<A: Address>(
    flow_scope: u8,
    frontend: &Frontend,
    backend: &BackendOf<A>,
    l4_proto: u8,
    config: &NodeConfig,
) -> bool {
    (l4_proto == proto::TCP || l4_proto == proto::UDP || l4_proto == proto::SCTP)
        && ((config.masquerade_all() && !frontend.keeps_client())
            || (flow_scope == scope::EXTERNAL && backend.flags & backend_flags::LOCAL == 0))
}

/// Whether a flow source-NATed to the node (see [`needed`]) has a pod of this node at one end:
/// a client pod (`flow_scope` internal) or a local backend, as only `--masquerade-all` makes
/// them. The node routes its packets or its replies into a pod's interface, which XDP cannot do
/// (a veth takes XDP redirects only when its peer runs XDP), so XDP leaves them to tc
/// ([`crate::conntrack::nat_flags::POD_ROUTE`]).
#[inline(always)]
pub const fn routes_to_pod(flow_scope: u8, backend: &Backend) -> bool {
    flow_scope == scope::INTERNAL || backend.flags & backend_flags::LOCAL != 0
}

/// The hairpin source of a new flow to `backend`: when the client is the backend itself and the
/// node has a hairpin address, that address and the client's own port (already unique for the
/// pod).
#[inline(always)]
pub const fn hairpin_source(
    flow: &FlowKey,
    backend: &Backend,
    config: &NodeConfig,
) -> Option<(Be32, Be16)> {
    if flow.src_addr.raw() == backend.addr.raw() && config.hairpin_addr.raw() != 0 {
        Some((config.hairpin_addr, flow.src_port))
    } else {
        None
    }
}

/// The key under which the replies of a flow to `backend`, source-NATed to the node's
/// `node_addr:node_port`, reach the node: the port's reservation.
#[inline(always)]
pub const fn reply_key(
    backend: &Backend,
    node_addr: Be32,
    node_port: Be16,
    l4_proto: u8,
) -> FlowKey {
    FlowKey::new(
        backend.addr,
        backend.port,
        node_addr,
        node_port,
        l4_proto,
        REPLY,
    )
}

/// Whether a packet of `l4_proto` to `dst_addr:dst_port` may be the reply of a flow
/// source-NATed with `config`: addressed to its SNAT address, on a port of its range or of the
/// previous default range ([`PREVIOUS_PORT_MIN`]: flows an agent of that default left), or on
/// any port for SCTP, whose source-NATed flows keep their clients' ports ([`port_range`]).
#[inline(always)]
pub const fn is_reply_to(
    config: &NodeConfig,
    dst_addr: Be32,
    dst_port: Be16,
    l4_proto: u8,
) -> bool {
    let port = dst_port.to_host();
    config.snat_configured()
        && dst_addr.raw() == config.snat_addr.raw()
        && ((port >= config.snat_port_min && port <= config.snat_port_max)
            || port >= PREVIOUS_PORT_MIN
            || l4_proto == proto::SCTP)
}

/// The range in which the new flow `flow` finds its source port, given `range` (the node's
/// SNAT ports, or the client's when its own port clashes: [`client_port_range`]). A protocol
/// whose ports are never rewritten ([`proto::rewrites_ports`], SCTP) has only the client's own
/// port there: the flow takes it when no live flow holds that reply key (backend -> source
/// address and client port), else it is dropped as a flow that finds no free port
/// (`drop_snat_ports`). So two SCTP clients with the same port, source-NATed by one node to one
/// backend, cannot both be served: the second one's packets are dropped until the first's
/// entries expire.
#[inline(always)]
pub const fn port_range(range: &NodeConfig, flow: &FlowKey) -> NodeConfig {
    let mut range = *range;
    keep_client_port(&mut range, flow);
    range
}

/// [`port_range`] in place: narrows `range` to the client's own port for a protocol whose
/// ports are never rewritten.
#[inline(always)]
pub const fn keep_client_port(range: &mut NodeConfig, flow: &FlowKey) {
    if !proto::rewrites_ports(flow.proto) {
        let port = flow.src_port.to_host();
        range.snat_port_min = port;
        range.snat_port_max = port;
    }
}

/// The range a client's port is remapped in when its flow clashes with another of the same
/// client port (see [`crate::conntrack::nat_flags::CLIENT_PORT`]): the unprivileged ports, as
/// nf_nat uses for a client port above 1023. The walk is [`allocate`]'s, over reply keys to the
/// client's own address.
#[inline(always)]
pub const fn client_port_range(client: Be32) -> NodeConfig {
    NodeConfig {
        snat_addr: client,
        snat_port_min: 1024,
        snat_port_max: u16::MAX,
        hairpin_addr: Be32::from_raw(0),
        flags: 0,
    }
}

/// The number of ports in `config`'s range (which must be [`NodeConfig::snat_configured`]).
#[inline(always)]
pub const fn span(config: &NodeConfig) -> u32 {
    (config.snat_port_max - config.snat_port_min) as u32 + 1
}

/// Where a new flow's candidate ports start: its home port and its flow hash (see
/// [`candidate`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seeds {
    /// The home port's offset in the range ([`home`]).
    pub home: u32,
    /// The flow hash ([`FlowKey::hash`]), which spreads the other probes.
    pub hash: u32,
}

impl Seeds {
    /// The seeds of the new flow `flow` in `config`'s range (which must be
    /// [`NodeConfig::snat_configured`]).
    #[inline(always)]
    pub const fn of(flow: &FlowKey, config: &NodeConfig) -> Self {
        Self {
            home: home(config, flow),
            hash: flow.hash(),
        }
    }
}

/// The offset in `config`'s range of the port a new flow tries first, its home: the client's
/// port turned by an offset of the client's address. Consecutive ports of one client get
/// consecutive home ports, so a client whose ports span no more than the range (Linux's
/// 32768-60999 in the default range) has a home port of its own for each of them: when a
/// client port comes again, which it does every few seconds under load, it finds its home
/// port held in TIME_WAIT by its own earlier connection. The backend takes a new SYN over that
/// TIME_WAIT when its TCP timestamp is newer, which a connection of the same four addresses and
/// ports always has (Linux offsets timestamps by a hash of them); another client's would be
/// refused about half the time, and its SYN retransmitted after a delay (see [`SnatPort`]).
/// The address's offset keeps clients that use the same ports apart. A hash of the whole
/// flow, the home before, made ports collide as soon as a client had used more than a few
/// hundred: in steady state every port was another flow's TIME_WAIT.
#[inline(always)]
pub const fn home(config: &NodeConfig, flow: &FlowKey) -> u32 {
    let turn = flow.src_addr.raw().wrapping_mul(0x9e37_79b1);
    (flow.src_port.to_host() as u32).wrapping_add(turn) % span(config)
}

/// Candidate `probe` (from 0) for a flow seeded `seeds`: first its home port, then
/// [`PROBES`]` - 1` others spread over the range by its hash with a large odd step, so that two
/// flows rarely walk the same candidates; the rest walk the whole range in order from the
/// home port (a scan, see [`allocate`]). `config` must be [`NodeConfig::snat_configured`].
#[inline(always)]
pub const fn candidate(config: &NodeConfig, seeds: Seeds, probe: u32) -> u16 {
    let offset = if probe == 0 {
        seeds.home
    } else if probe < PROBES {
        seeds.hash.wrapping_add(probe.wrapping_mul(0x9e37_79b1)) % span(config)
    } else {
        seeds.home.wrapping_add(probe - PROBES) % span(config)
    };
    // offset < span: the sum stays within the range.
    config.snat_port_min + offset as u16
}

/// The port a new flow got, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub port: u16,
    /// Which candidate it was ([`candidate`]'s `probe`).
    pub probe: u32,
    /// What held it: nothing live, this same client flow, or a flow its backend keeps in
    /// TIME_WAIT.
    pub state: SnatPort,
    /// No entry at all held it: the new flow's reply entry claims it with an insert that fails
    /// if another flow got there first (`BPF_NOEXIST`).
    pub absent: bool,
}

/// The state of one port allocation in the datapath, kept in the per-CPU scratch map
/// (`crate::maps::Scratch`) rather than on the stack: the scan of the range runs in a `bpf_loop`
/// callback, whose frame the verifier adds to the program's own.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Scan {
    pub flow: FlowKey,
    pub backend: Backend,
    pub config: NodeConfig,
    /// The new flow's reply entry, inserted as the reservation of a port no entry holds.
    pub reply: CtEntry,
    pub now: u64,
    pub seeds: Seeds,
    pub walk: Walk,
    /// The candidate taken (port 0 while none).
    pub taken: Choice,
}

/// A walk over the candidate ports of one new flow: the first free one is taken; failing that,
/// the first whose backend holds it in TIME_WAIT.
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    /// The first candidate in TIME_WAIT (port 0 for none: ports come from a range above 0).
    time_wait: Choice,
}

impl Default for Walk {
    fn default() -> Self {
        Self::new()
    }
}

impl Walk {
    #[inline(always)]
    pub const fn new() -> Self {
        Self {
            time_wait: Choice {
                port: 0,
                probe: 0,
                state: SnatPort::TimeWait,
                absent: false,
            },
        }
    }

    /// The walk's fallback: the first candidate it met in TIME_WAIT.
    #[inline(always)]
    pub const fn time_wait(&self) -> Option<Choice> {
        if self.time_wait.port != 0 {
            Some(self.time_wait)
        } else {
            None
        }
    }

    /// Candidate `probe` of the walk for the new flow `flow` to `backend`, whose reservation
    /// `held` looks up: the choice when the flow is to take it (free, or this flow's own).
    /// `claim` then claims it (`absent`: with an insert that fails if another flow got there
    /// first); when it fails the walk goes on, the port being taken after all.
    #[expect(
        clippy::too_many_arguments,
        reason = "the walk's inputs, passed apart as both the kernel and the predictor have them"
    )]
    #[inline(always)]
    pub fn step(
        &mut self,
        flow: &FlowKey,
        backend: &Backend,
        config: &NodeConfig,
        seeds: Seeds,
        probe: u32,
        now: u64,
        held: &mut impl FnMut(&FlowKey) -> Option<CtEntry>,
        claim: &mut impl FnMut(&FlowKey, bool) -> bool,
    ) -> Option<Choice> {
        let port = candidate(config, seeds, probe);
        let key = reply_key(backend, config.snat_addr, Be16::from_host(port), flow.proto);
        let entry = held(&key);
        let state = classify(entry.as_ref(), flow, now);
        let choice = Choice {
            port,
            probe,
            state,
            absent: entry.is_none(),
        };
        match state {
            SnatPort::Free | SnatPort::Reopened => claim(&key, choice.absent).then_some(choice),
            SnatPort::TimeWait => {
                if self.time_wait.port == 0 {
                    self.time_wait = choice;
                }
                None
            }
            SnatPort::Taken => None,
        }
    }
}

/// The node port for the new flow `flow` (its forward key) to `backend`, with `config` (which
/// must be [`NodeConfig::snat_configured`]). `held` looks up the reply entry reserving a
/// candidate (`LB_CT` in the kernel, the pinned map in `lbctl trace`); `claim` claims a free one
/// (the kernel inserts the flow's reply entry there, the predictor takes it as is).
///
/// First its home port ([`home`]), then candidates spread by the flow's hash, [`PROBES`] in all:
/// the first free one (or its home held by this same client flow), else the first
/// whose backend holds it in TIME_WAIT (a retransmitted SYN's delay at worst, where resting
/// every such port would soon drop new flows). Only when live flows hold every one of them does
/// the walk scan the whole range in order for a free port (or a TIME_WAIT one): a port is found
/// whenever one exists, and a flow is dropped only when the range really is full for its
/// backend. The scan's cost grows with how full the range is (at 90 % use, ten candidates on
/// average) and is bounded by its size.
#[inline(always)]
pub fn allocate(
    flow: &FlowKey,
    backend: &Backend,
    config: &NodeConfig,
    now: u64,
    mut held: impl FnMut(&FlowKey) -> Option<CtEntry>,
    mut claim: impl FnMut(&FlowKey, bool) -> bool,
) -> Option<Choice> {
    let seeds = Seeds::of(flow, config);
    let mut walk = Walk::new();
    for probe in 0..PROBES {
        let choice = walk.step(
            flow, backend, config, seeds, probe, now, &mut held, &mut claim,
        );
        if choice.is_some() {
            return choice;
        }
    }
    if let Some(choice) = walk.time_wait() {
        return Some(choice);
    }
    for probe in PROBES..PROBES + span(config) {
        let choice = walk.step(
            flow, backend, config, seeds, probe, now, &mut held, &mut claim,
        );
        if choice.is_some() {
            return choice;
        }
    }
    walk.time_wait()
}

/// What the reply entry reserving a source-NAT port (`held`, `None` when there is none) means for
/// a new flow (its forward key `flow`) that wants the port. The datapath takes the first `Free`
/// or `Reopened` candidate, else the first `TimeWait` one; `lbctl trace` predicts with the same
/// rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnatPort {
    /// No live flow holds it: no entry, an expired one, or a flow that is over with nothing
    /// left of it at the backend.
    Free,
    /// Held by this very client flow (same client address and port, same frontend), which a
    /// SYN reopens: it keeps its port.
    Reopened,
    /// The backend closed the old flow first and holds it in TIME_WAIT, which takes a new SYN
    /// only if its TCP timestamp is newer than the old flow's last one. Clients offset their
    /// timestamps at random (per connection on recent Linux kernels, measured), so that is so
    /// about half the time. Otherwise the backend answers with an ACK of the old flow, the
    /// client resets that TIME_WAIT and retransmits its SYN, which goes through: a delay for
    /// some new flows (Linux retransmits within a few milliseconds then), where refusing them
    /// would be a drop.
    TimeWait,
    /// Held by a live flow.
    Taken,
}

/// What `held` (the reply entry reserving a port, if any) means for the new flow `flow`: see
/// [`SnatPort`]. `now` is the datapath's clock.
#[inline(always)]
pub fn classify<A: Address>(
    held: Option<&CtEntryOf<A>>,
    flow: &FlowKeyOf<A>,
    now: u64,
) -> SnatPort {
    let Some(held) = held else {
        return SnatPort::Free;
    };
    if !held.live(now) {
        return SnatPort::Free;
    }
    if held.snat_addr == flow.src_addr
        && held.snat_port == flow.src_port
        && held.nat_addr == flow.dst_addr
        && held.nat_port == flow.dst_port
    {
        return SnatPort::Reopened;
    }
    if ct_flags::reusable(held.flags) {
        SnatPort::Free
    } else if flow.proto == proto::TCP && held.closed_as_seen() {
        SnatPort::TimeWait
    } else {
        SnatPort::Taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conntrack::{FORWARD, timeout},
        time::SECOND_NS,
    };

    const NOW: u64 = 2 * timeout::TCP_ESTABLISHED;

    fn flow(client: [u8; 4], port: u16, l4_proto: u8) -> FlowKey {
        FlowKey::new(
            Be32::from(core::net::Ipv4Addr::from(client)),
            Be16::from_host(port),
            Be32::from(core::net::Ipv4Addr::new(192, 168, 50, 10)),
            Be16::from_host(30_080),
            l4_proto,
            FORWARD,
        )
    }

    /// The reply entry of `owner`'s flow, with `flags`, last written `age_ns` ago.
    fn held(owner: &FlowKey, flags: u8, age_ns: u64) -> CtEntry {
        let lifetime = if ct_flags::closed(flags) {
            timeout::TCP_TIME_WAIT
        } else {
            timeout::TCP_ESTABLISHED
        };
        CtEntry {
            deadline_ns: NOW - age_ns + lifetime,
            nat_addr: owner.dst_addr,
            nat_port: owner.dst_port,
            flags: flags | ct_flags::SNAT,
            snat_addr: owner.src_addr,
            snat_port: owner.src_port,
            ..CtEntry::default()
        }
    }

    #[test]
    fn snat_ports_are_classified_by_what_their_reply_entry_holds() {
        use ct_flags::*;
        let old = flow([198, 51, 100, 1], 40_000, proto::TCP);
        let same_client = flow([198, 51, 100, 1], 40_001, proto::TCP);
        let other_client = flow([198, 51, 100, 2], 40_000, proto::TCP);
        let backend_closed_first = ESTABLISHED | FIN | FIN_FIRST | PEER_FIN;
        let second = SECOND_NS;
        let cases = [
            (None, &other_client, SnatPort::Free),
            (
                Some(held(&old, ESTABLISHED, 0)),
                &other_client,
                SnatPort::Taken,
            ),
            (
                Some(held(&old, ESTABLISHED, 0)),
                &same_client,
                SnatPort::Taken,
            ),
            (Some(held(&old, ESTABLISHED, 0)), &old, SnatPort::Reopened),
            // Expired.
            (
                Some(held(&old, ESTABLISHED, timeout::TCP_ESTABLISHED)),
                &other_client,
                SnatPort::Free,
            ),
            // Half closed: the backend may still send.
            (
                Some(held(&old, ESTABLISHED | PEER_FIN, second)),
                &other_client,
                SnatPort::Taken,
            ),
            // Over, and the backend closed second or reset: nothing left there.
            (
                Some(held(&old, ESTABLISHED | FIN | PEER_FIN, 0)),
                &other_client,
                SnatPort::Free,
            ),
            (
                Some(held(&old, ESTABLISHED | PEER_RST, 0)),
                &other_client,
                SnatPort::Free,
            ),
            // The backend closed first and holds TIME_WAIT.
            (
                Some(held(&old, backend_closed_first, second)),
                &same_client,
                SnatPort::TimeWait,
            ),
            (
                Some(held(&old, backend_closed_first, second)),
                &other_client,
                SnatPort::TimeWait,
            ),
        ];
        for (i, (entry, flow, want)) in cases.iter().enumerate() {
            assert_eq!(classify(entry.as_ref(), flow, NOW), *want, "case {i}");
        }
        // UDP keeps nothing at the backend, but a live flow may send again at any time.
        let udp = flow([198, 51, 100, 1], 40_000, proto::UDP);
        let mut entry = held(&udp, 0, second);
        entry.deadline_ns = NOW + timeout::UDP_STREAM;
        let other_udp = flow([198, 51, 100, 2], 40_000, proto::UDP);
        assert_eq!(classify(Some(&entry), &other_udp, NOW), SnatPort::Taken);
    }

    /// A DSR flow's entries see one direction each: its client's FIN on the entry node
    /// (`PEER_FIN`), its backend's on the backend's node (`FIN`). Either ends the flow's hold on
    /// the client port, as TIME_WAIT; before it, the flow holds the port.
    #[test]
    fn a_dsr_flow_releases_its_client_port_once_its_visible_side_closed() {
        use ct_flags::*;
        let old = flow([198, 51, 100, 1], 40_000, proto::TCP);
        let via_other_frontend = FlowKey {
            dst_port: Be16::from_host(30_081),
            ..old
        };
        let dsr = |flags: u8| CtEntry {
            flags,
            nat_flags: crate::conntrack::nat_flags::DSR,
            snat_addr: old.src_addr,
            snat_port: old.src_port,
            nat_addr: old.dst_addr,
            nat_port: old.dst_port,
            deadline_ns: NOW + timeout::TCP_FIN,
            ..CtEntry::default()
        };
        for (flags, want) in [
            (ESTABLISHED, SnatPort::Taken),
            (ESTABLISHED | PEER_FIN, SnatPort::TimeWait),
            (ESTABLISHED | FIN | FIN_FIRST, SnatPort::TimeWait),
            (ESTABLISHED | PEER_RST, SnatPort::Free),
        ] {
            let held = dsr(flags);
            assert_eq!(
                classify(Some(&held), &via_other_frontend, NOW),
                want,
                "{flags:#x}"
            );
            assert_eq!(classify(Some(&held), &old, NOW), SnatPort::Reopened);
            // Without DSR, the same half-closed flow still holds the port.
            let snat = CtEntry {
                nat_flags: 0,
                ..held
            };
            if flags & (FIN | PEER_FIN) != 0 {
                assert_eq!(
                    classify(Some(&snat), &via_other_frontend, NOW),
                    SnatPort::Taken
                );
            }
        }
    }
}

#[cfg(test)]
mod walk_tests;
