//! What the datapath will do with a packet, predicted from the live maps with the same rules and
//! the same flow hash as the kernel programs (`lbctl trace`, tests and benchmarks use it).
//!
//! Every decision is one of `lb_common`'s rules, the very functions the programs call
//! (`FlowKey::reply_of`, `CtEntry::continues`, `snat::allocate`, ...), applied to reads of the
//! live maps instead of kernel lookups. The forward path follows `lb-ebpf/src/forward.rs` step
//! by step:
//!
//! ```text
//! LB_ADDRS[dst]                      miss -> NotAFrontend, or from a pod (`direct.rs`):
//!   LB_DIRECT_NAT set and LB_CT[src -> dst] a continuing direct entry -> DirectEstablished
//!   a new connection (bare SYN, UDP) from a marked source (`filters`) whose reply key
//!   LB_CT[dst -> src, REPLY] is live
//!   -> DirectRemapped: snat::allocate over snat::client_port_range, none -> DirectPortsTaken
//! dst is the node's SNAT address, port in its range, and LB_CT[src -> dst, REPLY] is a live
//!   SNAT entry -> SnatReply (`snat.rs`)
//! dst is the hairpin address: LB_CT[src -> dst, REPLY] a live hairpin entry -> HairpinReply,
//!   else PassNotServed (`hairpin.rs`)
//! not a ClusterIP, destination unmarked (`filters`) -> PassNotServed
//! LB_CT[client -> frontend]          continues -> Established (to its recorded backend)
//! LB_SERVICES[dst, port, proto, scope]
//!                                    miss, external scope, ClusterIP, served from outside
//!                                    (FrontendKey::external_cluster_ip): the internal frontend
//!                                    miss -> RejectUnknownPort (ClusterIP) / PassNotServed
//! backend_count == 0                 -> NoBackend (reject, or drop by policy)
//! source ranges and LB_SRC_RANGES misses -> DropSourceRange
//! affinity and LB_AFFINITY[client, set or its LB_AFFINITY_SCOPE] fresh, backend active (and
//!   local when read through a shared scope) -> Affinity
//! else Maglev slot (or the single backend); backend not active -> Inconsistent
//! snat::hairpin_source -> hairpin: source NAT to the hairpin address, bounced into the pod
//! else snat::needed (from outside to another node, or --masquerade-all unless the frontend
//!   keeps its clients) -> source NAT to the node: snat::allocate, none -> DropSnatPorts
//! else LB_CT[backend -> client, REPLY] held by another live flow of the client port
//!   -> its port remapped: snat::allocate over snat::client_port_range, none -> DropSnatPorts
//! ```
//!
//! Source-NATed packets (new and established flows to backends on other nodes, and their
//! replies) are routed by the node itself after a FIB lookup, which maps cannot predict: with a
//! route, the packet goes straight to its next hop (at XDP only when the next hop's MAC is known;
//! otherwise XDP leaves the packet untouched to the tc program behind it, which resolves it);
//! without one it is dropped (`drop_no_route`). XDP leaves the packets of flows routed into a
//! pod's interface (`--masquerade-all`, `nat_flags::POD_ROUTE`) to tc, which forwards them.
//! Hairpin packets go straight back out of the interface they came in on.
//!
//! Prediction only reads maps: it never refreshes an entry the way the datapath does.

use std::net::SocketAddrV4;

use aya::maps::{MapError, lpm_trie::Key};
use lb_common::{
    Be16, Be32,
    conntrack::{self, CtEntry, FORWARD, FlowKey, REPLY},
    maps::{
        self as names, AffinityKey, Backend, Frontend, FrontendKey, NodeConfig, SourceRange,
        snat::PROBES,
    },
    net::{proto, tcp_flags},
    snat::{self, SnatPort},
    time::SECOND_NS,
};

use crate::maps::{Maps, MapsError};

/// How a new flow's backend was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The service has a single backend and no Maglev table.
    Single,
    /// Maglev: the flow hash picks slot `hash % table_size` of the service's table.
    Maglev {
        hash: u32,
        slot: u32,
        table_size: u32,
    },
    /// sessionAffinity ClientIP: the backend this client last got from the service, still within
    /// the service's timeout and still active.
    Affinity {
        /// `bpf_ktime_get_coarse_ns()` of the client's last new connection to the service.
        last_used_ns: u64,
        timeout_s: u32,
    },
}

/// The forward path's decision for a TCP, UDP or SCTP packet from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forward {
    /// The destination carries no frontend: the packet passes untouched.
    NotAFrontend,
    /// A frontend address, but not this port or protocol, and not a ClusterIP; or the node's
    /// SNAT or hairpin address, and no reply of a live flow: passes.
    PassNotServed {
        /// The address's `LB_ADDRS` flags.
        addr_flags: u32,
    },
    /// A ClusterIP on a port or protocol it does not serve: rejected.
    RejectUnknownPort,
    /// A new flow from a source outside the frontend's loadBalancerSourceRanges: dropped.
    DropSourceRange { frontend: Frontend },
    /// The frontend has no backend: rejected (RST / ICMP port unreachable) or dropped.
    NoBackend { frontend: Frontend, drop: bool },
    /// An established flow: DNAT to the backend recorded in conntrack (and SNAT to the node for
    /// a source-NATed flow, which the node then routes).
    Established {
        /// The backend set the flow was balanced by (from its conntrack entry).
        set_id: u32,
        backend_id: u32,
        backend: SocketAddrV4,
        /// The address and port that replace the client as the source (a flow with
        /// `ct_flags::SNAT`): the node's, or the hairpin address for a hairpin flow (then also
        /// `ct_flags::HAIRPIN`, and the packet is bounced back into the pod).
        snat: Option<SocketAddrV4>,
        /// The flow's forward conntrack entry.
        entry: CtEntry,
    },
    /// A new flow: affinity, Maglev or the single backend picks the backend. When the service
    /// has session affinity, the datapath also records (or refreshes) the client's entry.
    NewFlow {
        frontend: Frontend,
        selection: Selection,
        backend_id: u32,
        backend: SocketAddrV4,
        /// From outside to a backend on another node: source NAT to the node, which then
        /// routes the packet; a pod balanced to itself: source NAT to the hairpin address, and
        /// back into the pod.
        snat: Option<SourceNat>,
    },
    /// A new flow from outside to a backend on another node that cannot be source-NATed (no
    /// SNAT address, or no free port): dropped. The backend was chosen (and an affinity entry
    /// recorded) as for [`Forward::NewFlow`].
    DropSnatPorts {
        frontend: Frontend,
        selection: Selection,
        backend_id: u32,
        backend: SocketAddrV4,
        failure: SnatFailure,
    },
    /// The reply of a source-NATed flow, addressed to the node's SNAT address and port: the
    /// source becomes the frontend, the destination the client, and the node routes it.
    SnatReply(NatReply),
    /// The reply of a hairpin flow (a pod balanced to itself), addressed to the hairpin
    /// address: the source becomes the frontend, the destination the pod's own client side, and
    /// it goes straight back into the pod.
    HairpinReply(NatReply),
    /// The service names a table or backend that is missing: dropped.
    Inconsistent { frontend: Frontend, detail: String },
    /// A packet of a direct connection (from a pod, to an address without a frontend) that was
    /// given another source port: its source becomes `source` (`conntrack::DIRECT`).
    DirectEstablished {
        destination: SocketAddrV4,
        source: SocketAddrV4,
        entry: CtEntry,
    },
    /// A new direct connection whose reply key a live load-balanced flow of the same client
    /// port holds (`held`, that flow's reply entry): it gets another source port.
    DirectRemapped {
        destination: SocketAddrV4,
        choice: SnatChoice,
        held: CtEntry,
    },
    /// As [`Forward::DirectRemapped`], but every other port of the client's clashes too:
    /// dropped.
    DirectPortsTaken {
        client: SocketAddrV4,
        destination: SocketAddrV4,
        held: CtEntry,
    },
}

/// How the forward path translates the reply of a source-NATed or hairpin flow, from the
/// flow's live reply conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatReply {
    /// The source the reply gets back.
    pub frontend: SocketAddrV4,
    /// The destination it gets: the flow's client.
    pub client: SocketAddrV4,
    pub set_id: u32,
    pub backend_id: u32,
    /// The flow's reply conntrack entry.
    pub entry: CtEntry,
}

/// The source NAT of a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceNat {
    /// To the node: a flow from outside to a backend on another node.
    Node(SnatChoice),
    /// To the hairpin address, the client's port kept: a pod balanced to itself.
    Hairpin(SocketAddrV4),
    /// None, by direct server return (`lb_common::dsr`): the client's address kept, routed to
    /// the backend's node (the SYN carrying the frontend), whose replies go straight back.
    Dsr,
    /// The client's address kept, its port replaced: another live flow of the same client port
    /// holds the reply key (`nat_flags::CLIENT_PORT`).
    ClientPort(SnatChoice),
}

/// The address and port a new flow is source-NATed to, and how the port was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatChoice {
    /// The address and port that replace the client as the source: the node's, or the client's
    /// own address with another port.
    pub source: SocketAddrV4,
    /// The flow hash that spreads the candidate ports.
    pub hash: u32,
    /// Which candidate was taken (0-based, below `lb_common::maps::snat::PROBES`).
    pub probe: u32,
    /// What held the candidate: nothing live (`Free`), this same client flow (`Reopened`), or
    /// a flow over but kept in TIME_WAIT by its backend (`TimeWait`).
    pub state: SnatPort,
}

/// Why a new flow that needs source NAT gets none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnatFailure {
    /// `LB_CONFIG` has no SNAT address, or an empty port range.
    NoConfig { config: NodeConfig },
    /// Every port of the range is held by a live flow of another client to the same backend.
    PortsTaken {
        node: std::net::Ipv4Addr,
        hash: u32,
        /// The flow's home port and the candidates spread by the hash, tried before the range
        /// was scanned.
        candidates: Vec<u16>,
    },
    /// The client's port clashes with another live flow of it to the same backend, and every
    /// other port of the client's (`snat::client_port_range`) does too.
    ClientPortsTaken { client: SocketAddrV4 },
}

/// The reply path's decision for a packet from a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Not a reply of a load-balanced flow (or its entry expired): untouched.
    NotTracked,
    /// Source rewritten to the frontend (and the destination to the client's own port when its
    /// flow had it remapped, `client`).
    ReverseNat {
        frontend: SocketAddrV4,
        client: Option<SocketAddrV4>,
        set_id: u32,
        backend_id: u32,
        /// The flow's reply conntrack entry.
        entry: CtEntry,
    },
    /// The reply of a source-NATed flow (keyed backend -> node SNAT address and port, or
    /// hairpin address and port): the reply path leaves it alone; the forward path translates
    /// it where it reaches the node (or, for a hairpin flow, leaves the pod).
    SnatUntouched {
        frontend: SocketAddrV4,
        client: SocketAddrV4,
        set_id: u32,
        backend_id: u32,
        /// A hairpin flow (`ct_flags::HAIRPIN`).
        hairpin: bool,
        entry: CtEntry,
    },
}

/// The conntrack key of a packet `src -> dst` in direction `dir`.
pub fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, l4_proto: u8, dir: u8) -> FlowKey {
    FlowKey::new(
        Be32::from(*src.ip()),
        Be16::from_host(src.port()),
        Be32::from(*dst.ip()),
        Be16::from_host(dst.port()),
        l4_proto,
        dir,
    )
}

fn socket(addr: Be32, port: Be16) -> SocketAddrV4 {
    SocketAddrV4::new(addr.to_ip(), port.to_host())
}

/// Monotonic coarse clock as the datapath reads it (`bpf_ktime_get_coarse_ns`).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * SECOND_NS + ts.tv_nsec as u64
}

/// A lookup's value, `None` when the key is absent, an error for anything else.
pub(crate) fn found<V>(
    name: &'static str,
    result: Result<V, MapError>,
) -> Result<Option<V>, MapsError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(MapsError::Map { name, source }),
    }
}

/// The backend in slot `id`, if that slot holds an active backend.
fn active_backend(maps: &Maps, id: u32) -> Result<Option<Backend>, MapsError> {
    match maps.backends.get(&id, 0) {
        Ok(b) => Ok(Some(b).filter(Backend::is_active)),
        // Out of bounds: the datapath's lookup fails the same way.
        Err(MapError::OutOfBounds { .. } | MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(MapsError::Map {
            name: names::LB_BACKENDS,
            source,
        }),
    }
}

/// A conntrack entry, `None` when absent.
fn ct_entry(maps: &Maps, key: &FlowKey) -> Result<Option<CtEntry>, MapsError> {
    found(names::LB_CT, maps.ct.get(key, 0))
}

/// Whether a new flow from `src` may use `frontend` (loadBalancerSourceRanges).
pub fn source_allowed(maps: &Maps, frontend: &Frontend, src: Be32) -> Result<bool, MapsError> {
    if !frontend.has_source_ranges() {
        return Ok(true);
    }
    let key = Key::new(SourceRange::LOOKUP_BITS, SourceRange::lookup(frontend, src));
    Ok(found(names::LB_SRC_RANGES, maps.src_ranges.get(&key, 0))?.is_some())
}

/// `LB_CONFIG`'s single entry, as stored.
pub fn node_config(maps: &Maps) -> Result<NodeConfig, MapsError> {
    maps.config.get(&0, 0).map_err(|source| MapsError::Map {
        name: names::LB_CONFIG,
        source,
    })
}

/// The node port the datapath gives the new flow `flow` (its forward key) to `backend`, with
/// `config` (which must be [`NodeConfig::snat_configured`]): [`snat::allocate`] over the live
/// `LB_CT`.
pub fn snat_allocate(
    maps: &Maps,
    flow: &FlowKey,
    backend: &Backend,
    config: &NodeConfig,
    now: u64,
) -> Result<Result<SnatChoice, SnatFailure>, MapsError> {
    let mut failed = None;
    let chosen = snat::allocate(
        flow,
        backend,
        config,
        now,
        |key| {
            ct_entry(maps, key).unwrap_or_else(|e| {
                failed.get_or_insert(e);
                None
            })
        },
        // Nothing races a prediction for the port.
        |_key, _absent| true,
    );
    if let Some(e) = failed {
        return Err(e);
    }
    let seeds = snat::Seeds::of(flow, config);
    let hash = seeds.hash;
    Ok(match chosen {
        Some(choice) => Ok(SnatChoice {
            source: SocketAddrV4::new(config.snat_addr.to_ip(), choice.port),
            hash,
            probe: choice.probe,
            state: choice.state,
        }),
        None => Err(SnatFailure::PortsTaken {
            node: config.snat_addr.to_ip(),
            hash,
            candidates: (0..PROBES)
                .map(|probe| snat::candidate(config, seeds, probe))
                .collect(),
        }),
    })
}

/// The source NAT a new flow to `backend` gets (`forward::new_flow` in the datapath): `None`
/// when it needs none, else the hairpin or node address and port, or why there is none.
fn new_flow_snat(
    maps: &Maps,
    flow: &FlowKey,
    frontend: &Frontend,
    backend: &Backend,
    flow_scope: u8,
    now: u64,
) -> Result<Option<Result<SourceNat, SnatFailure>>, MapsError> {
    let config = node_config(maps)?;
    if let Some((addr, port)) = snat::hairpin_source(flow, backend, &config) {
        return Ok(Some(Ok(SourceNat::Hairpin(socket(addr, port)))));
    }
    // A packet traced has no IPv4 options of its own, which would rule DSR out. A clash on the
    // backend's reply key makes the flow source-NATed instead.
    if lb_common::dsr::applies(flow_scope, frontend, backend, flow.proto, &config)
        && client_port_clash(maps, flow, backend, now)?.is_none()
    {
        return Ok(Some(Ok(SourceNat::Dsr)));
    }
    if !snat::needed(flow_scope, frontend, backend, flow.proto, &config) {
        return client_port_clash(maps, flow, backend, now);
    }
    if !config.snat_configured() {
        return Ok(Some(Err(SnatFailure::NoConfig { config })));
    }
    // SCTP keeps its client's port: a range of that one port.
    let range = snat::port_range(&config, flow);
    Ok(Some(
        snat_allocate(maps, flow, backend, &range, now)?.map(SourceNat::Node),
    ))
}

/// A new flow `flow` to `backend` that keeps its source: `None` while its reply key is free (or
/// held by this same flow, or one that is over), else the port the client gets instead
/// (`forward::claim_reply` in the datapath).
fn client_port_clash(
    maps: &Maps,
    flow: &FlowKey,
    backend: &Backend,
    now: u64,
) -> Result<Option<Result<SourceNat, SnatFailure>>, MapsError> {
    let forward = CtEntry {
        nat_addr: backend.addr,
        nat_port: backend.port,
        ..CtEntry::default()
    };
    let held = ct_entry(maps, &flow.reply_of(&forward))?;
    if snat::classify(held.as_ref(), flow, now) != SnatPort::Taken {
        return Ok(None);
    }
    Ok(Some(match client_port(maps, flow, backend, now)? {
        Some(choice) => Ok(SourceNat::ClientPort(choice)),
        None => Err(SnatFailure::ClientPortsTaken {
            client: socket(flow.src_addr, flow.src_port),
        }),
    }))
}

/// The port the client of `flow` to `backend` gets instead of its own
/// ([`snat::client_port_range`]); `None` when every other port clashes too.
fn client_port(
    maps: &Maps,
    flow: &FlowKey,
    backend: &Backend,
    now: u64,
) -> Result<Option<SnatChoice>, MapsError> {
    let range = snat::port_range(&snat::client_port_range(flow.src_addr), flow);
    // As the datapath's `snat::allocate`: a range without an address (a client 0.0.0.0) has
    // no port to give.
    if !range.snat_configured() {
        return Ok(None);
    }
    Ok(snat_allocate(maps, flow, backend, &range, now)?.ok())
}

/// A packet `key` (forward direction, as it arrives) to the node's SNAT address: the reply of a
/// source-NATed flow when it is addressed to a port of the range and a live SNAT reply entry
/// holds it (`snat::reply` in the datapath).
fn snat_reply(maps: &Maps, key: &FlowKey, now: u64) -> Result<Option<Forward>, MapsError> {
    if !snat::is_reply_to(&node_config(maps)?, key.dst_addr, key.dst_port, key.proto) {
        return Ok(None);
    }
    Ok(nat_reply(maps, key, now, CtEntry::routed)?.map(Forward::SnatReply))
}

/// A packet `key` (forward direction) to the hairpin address: the reply of a hairpin flow when a
/// live hairpin reply entry holds it (`hairpin::reply` in the datapath).
fn hairpin_reply(maps: &Maps, key: &FlowKey, now: u64) -> Result<Option<Forward>, MapsError> {
    Ok(nat_reply(maps, key, now, CtEntry::hairpin)?.map(Forward::HairpinReply))
}

/// The translation of the reply `key` (forward direction) when its live reply entry is of the
/// `kind` of flow (source-NATed, hairpin) the caller looks for.
fn nat_reply(
    maps: &Maps,
    key: &FlowKey,
    now: u64,
    kind: fn(&CtEntry) -> bool,
) -> Result<Option<NatReply>, MapsError> {
    Ok(match ct_entry(maps, &key.with_dir(REPLY))? {
        Some(entry) if kind(&entry) && entry.live(now) => Some(NatReply {
            frontend: socket(entry.nat_addr, entry.nat_port),
            client: socket(entry.snat_addr, entry.snat_port),
            set_id: entry.set_id,
            backend_id: entry.backend_id,
            entry,
        }),
        _ => None,
    })
}

/// The forward decision for `src -> dst` (TCP, UDP or SCTP) arriving in `scope`. `syn` says whether
/// the packet is a bare TCP SYN (which reopens a flow that saw a FIN or RST); any other TCP
/// packet is taken as a segment without SYN.
pub fn forward(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
    scope: u8,
    syn: bool,
) -> Result<Forward, MapsError> {
    let key = flow_key(src, dst, l4_proto, FORWARD);
    let now = coarse_now_ns();
    let seg_flags = match (l4_proto, syn) {
        (proto::TCP, true) => tcp_flags::SYN,
        (proto::TCP, false) => tcp_flags::ACK,
        _ => 0,
    };
    let Some(addr) = found(names::LB_ADDRS, maps.addrs.get(&Be32::from(*dst.ip()), 0))? else {
        if scope == names::scope::INTERNAL {
            return direct(maps, &key, seg_flags, now);
        }
        return Ok(Forward::NotAFrontend);
    };
    // Replies of source-NATed flows come first, whatever the scope (as in the datapath).
    if addr.is_snat()
        && let Some(reply) = snat_reply(maps, &key, now)?
    {
        return Ok(reply);
    }
    // Nothing but hairpin replies is addressed to the hairpin address.
    if addr.is_hairpin() {
        return Ok(
            hairpin_reply(maps, &key, now)?.unwrap_or(Forward::PassNotServed {
                addr_flags: addr.flags,
            }),
        );
    }
    // Neither a flow's nor a frontend's destination (`filters`, not checked on a ClusterIP):
    // the lookups below would miss.
    if !addr.is_cluster_ip()
        && !crate::filters::may_be_served(maps, key.dst_addr, key.dst_port, l4_proto)?
    {
        return Ok(not_served(&addr));
    }
    // An established flow keeps its translation whatever became of its backend in the maps.
    if let Some(entry) = ct_entry(maps, &key)?
        && entry.continues(seg_flags, now)
    {
        return Ok(Forward::Established {
            set_id: entry.set_id,
            backend_id: entry.backend_id,
            backend: socket(entry.nat_addr, entry.nat_port),
            snat: entry
                .snat()
                .then(|| socket(entry.snat_addr, entry.snat_port)),
            entry,
        });
    }
    let frontend_key = FrontendKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: l4_proto,
        scope,
    };
    let mut frontend = found(names::LB_SERVICES, maps.services.get(&frontend_key, 0))?;
    if frontend.is_none()
        && let Some(internal) = frontend_key.external_cluster_ip(&addr, &node_config(maps)?)
    {
        frontend = found(names::LB_SERVICES, maps.services.get(&internal, 0))?;
    }
    let Some(frontend) = frontend else {
        return Ok(not_served(&addr));
    };
    // As the datapath (and kube-proxy): a frontend without endpoints rejects everyone; source
    // ranges only filter who may reach the endpoints it has.
    if frontend.backend_count == 0 {
        return Ok(Forward::NoBackend {
            frontend,
            drop: frontend.drop_when_empty(),
        });
    }
    if !source_allowed(maps, &frontend, key.src_addr)? {
        return Ok(Forward::DropSourceRange { frontend });
    }
    let (selection, backend_id, backend) =
        match select(maps, &frontend, key.src_addr, || key.hash(), now)? {
            Ok(chosen) => chosen,
            Err(detail) => return Ok(Forward::Inconsistent { frontend, detail }),
        };
    let addr = socket(backend.addr, backend.port);
    Ok(
        match new_flow_snat(maps, &key, &frontend, &backend, scope, now)? {
            Some(Err(failure)) => Forward::DropSnatPorts {
                frontend,
                selection,
                backend_id,
                backend: addr,
                failure,
            },
            snat => Forward::NewFlow {
                frontend,
                selection,
                backend_id,
                backend: addr,
                snat: snat.and_then(Result::ok),
            },
        },
    )
}

/// A pod's packet `key` (forward direction) to an address without a frontend (`direct.rs` in
/// the datapath): untouched, unless it belongs to a direct connection that had to take another
/// source port, or opens one that must.
fn direct(maps: &Maps, key: &FlowKey, seg_flags: u8, now: u64) -> Result<Forward, MapsError> {
    let destination = socket(key.dst_addr, key.dst_port);
    let opening = key.proto == proto::UDP || tcp_flags::opens(seg_flags);
    let remapped_before =
        found(names::LB_DIRECT_NAT, maps.direct_nat.get(&0, 0))?.is_some_and(|seen| seen != 0);
    if remapped_before
        && let Some(entry) = ct_entry(maps, key)?
        && entry.direct()
        && entry.continues(seg_flags, now)
    {
        return Ok(Forward::DirectEstablished {
            destination,
            source: socket(entry.snat_addr, entry.snat_port),
            entry,
        });
    }
    if !opening || !crate::filters::may_be_reply(maps, key.dst_addr, key.dst_port, key.proto)? {
        return Ok(Forward::NotAFrontend);
    }
    let held = ct_entry(maps, &key.reply_as_is())?;
    let Some(held) = held.filter(|held| conntrack::direct_clashes(held, now)) else {
        return Ok(Forward::NotAFrontend);
    };
    let target = Backend {
        addr: key.dst_addr,
        port: key.dst_port,
        ..Backend::default()
    };
    Ok(match client_port(maps, key, &target, now)? {
        Some(choice) => Forward::DirectRemapped {
            destination,
            choice,
            held,
        },
        None => Forward::DirectPortsTaken {
            client: socket(key.src_addr, key.src_port),
            destination,
            held,
        },
    })
}

/// The backend of a new connection of `frontend` from `client` whose Maglev hash `hash` computes
/// (`select::backend` in the datapath): the client's affinity entry when fresh and its backend
/// active, else the Maglev slot or the single backend. `Err` tells why the frontend's state is
/// inconsistent.
pub(crate) fn select(
    maps: &Maps,
    frontend: &Frontend,
    client: Be32,
    hash: impl FnOnce() -> u32,
    now: u64,
) -> Result<Result<(Selection, u32, Backend), String>, MapsError> {
    if frontend.affinity_timeout_s != 0 {
        // A Local set reads its Cluster set's entries.
        let scope = found(
            names::LB_AFFINITY_SCOPE,
            maps.affinity_scope.get(&frontend.set_id, 0),
        )?
        .unwrap_or(0);
        let affinity_key = AffinityKey::of(client, frontend.set_id, scope);
        // Within the timeout, still active and one this frontend's set may use; otherwise
        // Maglev decides (and the datapath overwrites the entry).
        if let Some(entry) = found(names::LB_AFFINITY, maps.affinity.get(&affinity_key, 0))?
            && entry.fresh(frontend.affinity_timeout_s, now)
            && let Some(b) = active_backend(maps, entry.backend_id)?
            && affinity_key.serves(frontend.set_id, &b)
        {
            let selection = Selection::Affinity {
                last_used_ns: entry.last_used_ns,
                timeout_s: frontend.affinity_timeout_s,
            };
            return Ok(Ok((selection, entry.backend_id, b)));
        }
    }
    let (selection, backend_id) = if frontend.has_table() {
        let hash = hash();
        let slot = frontend.slot(hash);
        let table = match maps.maglev_table(frontend.set_id, frontend.table_size) {
            Ok(table) => table,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let selection = Selection::Maglev {
            hash,
            slot,
            table_size: frontend.table_size,
        };
        (selection, table[slot as usize])
    } else {
        (Selection::Single, frontend.backend_id)
    };
    Ok(match active_backend(maps, backend_id)? {
        Some(b) => Ok((selection, backend_id, b)),
        None => Err(format!("backend id {backend_id} is not an active backend")),
    })
}

/// A packet to an address with frontends that none serves (`forward::not_served`).
fn not_served(addr: &lb_common::maps::AddrInfo) -> Forward {
    if addr.is_cluster_ip() {
        Forward::RejectUnknownPort
    } else {
        Forward::PassNotServed {
            addr_flags: addr.flags,
        }
    }
}

/// The reply decision for `src -> dst` (a backend answering a client) on the reply path
/// (`lb_to_pod`, `lb_ext_out`).
pub fn reply(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
) -> Result<Reply, MapsError> {
    let key = flow_key(src, dst, l4_proto, REPLY);
    if !crate::filters::may_be_reply(maps, key.src_addr, key.src_port, key.proto)? {
        return Ok(Reply::NotTracked);
    }
    Ok(match ct_entry(maps, &key)? {
        Some(entry) if entry.live(coarse_now_ns()) => {
            let frontend = socket(entry.nat_addr, entry.nat_port);
            if entry.snat() && !entry.client_port_remapped() {
                Reply::SnatUntouched {
                    frontend,
                    client: socket(entry.snat_addr, entry.snat_port),
                    set_id: entry.set_id,
                    backend_id: entry.backend_id,
                    hairpin: entry.hairpin(),
                    entry,
                }
            } else {
                Reply::ReverseNat {
                    frontend,
                    client: entry
                        .client_port_remapped()
                        .then(|| socket(entry.snat_addr, entry.snat_port)),
                    set_id: entry.set_id,
                    backend_id: entry.backend_id,
                    entry,
                }
            }
        }
        _ => Reply::NotTracked,
    })
}
