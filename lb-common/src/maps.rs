//! The datapath's maps: names (they are pin names too, so they are API), key and value layouts,
//! flags and default capacities.
//!
//! Lookup chain for a packet entering from a pod (or, later, from outside):
//!
//! ```text
//! LB_ADDRS[dst addr]            one lookup; a miss means "not ours" and the packet passes untouched
//!   -> LB_CT[flow]              established flow: its backend, if that backend still exists
//!   -> LB_SERVICES[addr, port, proto, scope] -> Service (a backend set)
//!        -> LB_MAGLEV[service id][hash % table_size] -> backend id   (one backend: no table)
//!        -> LB_BACKENDS[backend id] -> (addr, port)                   DNAT target
//! ```
//!
//! Update order (agent): backends, then the Maglev table, then the service entry, then the
//! address entry; deletion in reverse. The datapath therefore never sees a service whose table
//! names a backend that is not there yet.

use bytemuck::{Pod, Zeroable};

use crate::net::{Address, Be16, Be32, Be128};

/// `dst addr -> AddrInfo`: every address that carries at least one frontend. Written by the agent.
pub const LB_ADDRS: &str = "LB_ADDRS";
/// `FrontendKey -> Frontend`: one entry per frontend (address, port, protocol, scope) and the
/// backend set it uses. (Pinned under this name since the first release: the name stays.)
pub const LB_SERVICES: &str = "LB_SERVICES";
/// `backend id -> Backend` (array; id 0 is never used, so a zeroed slot means "no backend").
pub const LB_BACKENDS: &str = "LB_BACKENDS";
/// `set id -> Maglev table` (array of maps). A table is an inner array of
/// [`maglev::CHUNK_SLOTS`]-slot chunks holding backend ids; slot `s` is entry `s % CHUNK_SLOTS` of
/// chunk `s / CHUNK_SLOTS`. Services with a single backend have no table.
pub const LB_MAGLEV: &str = "LB_MAGLEV";
/// `FlowKey -> CtEntry` (LRU): both directions of every load-balanced flow. Written by the
/// datapath; the agent only reads it (and may expire entries).
pub const LB_CT: &str = "LB_CT";
/// `FragKey -> FragEntry` (LRU): ports of fragmented datagrams, so that non-first fragments follow
/// their first fragment. Written by the datapath.
pub const LB_FRAGS: &str = "LB_FRAGS";
/// `set id -> SetStats` (per-CPU array): counters per backend set.
pub const LB_SVC_STATS: &str = "LB_SVC_STATS";
/// `Reason -> Counter` (per-CPU array), see [`crate::stats::Reason`].
pub const LB_VERDICTS: &str = "LB_VERDICTS";
/// `SourceRange (LPM) -> 1` (LPM trie): loadBalancerSourceRanges. A frontend whose
/// `Service::source_range_id` is not zero only takes new flows from sources matching one of its
/// ranges. Written by the agent.
pub const LB_SRC_RANGES: &str = "LB_SRC_RANGES";
/// `AffinityKey -> AffinityEntry` (LRU): sessionAffinity ClientIP, the backend a client last got
/// from a service. Written by the datapath; the agent removes entries of backends that left.
pub const LB_AFFINITY: &str = "LB_AFFINITY";
/// `set id -> set id` (array): the backend set whose [`LB_AFFINITY`] entries a set shares, 0 for
/// its own. A Service port's Local set shares its Cluster set's, because kube-proxy keeps
/// affinity per endpoint, in one list that both of its chains consult: a client that reached an
/// endpoint on this node through either keeps it through the other. Written by the agent.
pub const LB_AFFINITY_SCOPE: &str = "LB_AFFINITY_SCOPE";
/// `SockRevKey -> SockRev` (LRU): the frontend a socket asked for when socket-level balancing
/// connected it (or sent its datagram) to a backend instead, so that `getpeername()` and
/// `recvmsg()` show the frontend. Written by `cgroup/connect4` and `cgroup/sendmsg4`, read by
/// `cgroup/getpeername4` and `cgroup/recvmsg4`; nothing deletes entries (a socket's cookie is
/// never reused; the LRU drops the oldest). See [`crate::sock`].
pub const LB_SOCK_REV: &str = "LB_SOCK_REV";
/// `0 -> SockConfig` (array of one): what the socket programs know of the node (its network
/// namespace, `--socket-lb host-only`). Written by the agent when it attaches them.
pub const LB_SOCK_CONFIG: &str = "LB_SOCK_CONFIG";
/// `set id -> SockStats` (per-CPU array): what the socket programs did for each backend set's
/// frontends (`lbctl service list`).
pub const LB_SOCK_STATS: &str = "LB_SOCK_STATS";

/// `Be128 -> AddrInfo`: [`LB_ADDRS`] for IPv6 addresses. IPv6 has maps of its own for everything
/// keyed or valued by an address (docs/ipv6.md): IPv4's keys and entries keep their size.
pub const LB6_ADDRS: &str = "LB6_ADDRS";
/// `FrontendKey6 -> Frontend`: [`LB_SERVICES`] for IPv6 frontends. Their backend sets are
/// sets like any other (one id space, one Maglev map), whose backends are all IPv6 ones.
pub const LB6_SERVICES: &str = "LB6_SERVICES";
/// `backend id -> Backend6` (array): [`LB_BACKENDS`] for IPv6 backends. Backend ids come
/// from one allocator for both families: an id names a slot in one of the two arrays only.
pub const LB6_BACKENDS: &str = "LB6_BACKENDS";
/// `FlowKey6 -> CtEntry6` (LRU): [`LB_CT`] for IPv6 flows.
pub const LB6_CT: &str = "LB6_CT";

/// `index -> program` (program array) of the tc programs: each tc entry program hands an IPv6
/// packet over to its IPv6 twin (a tail call) at [`tail::FROM_POD6`], [`tail::EXT_IN6`] or
/// [`tail::TO_CLIENT6`]. Written by the loader; pinned, because the kernel empties a program
/// array once no process and no pin holds it, and the programs outlive the agent.
pub const LB_TAIL_TC: &str = "LB_TAIL_TC";
/// `index -> program` (program array) of the XDP program: [`tail::XDP6`]. A program array
/// serves programs of one type only, hence two.
pub const LB_TAIL_XDP: &str = "LB_TAIL_XDP";
/// The pinned program arrays (not in [`ALL`]: they hold programs, no data; keyed and valued
/// by `u32`s).
pub const TAIL_CALLS: [&str; 2] = [LB_TAIL_TC, LB_TAIL_XDP];

/// Each program array: its slot, its program's name, and the array.
pub const TAIL_PROGRAMS: [(u32, &str, &str); 4] = [
    (tail::FROM_POD6, crate::programs::FROM_POD6, LB_TAIL_TC),
    (tail::EXT_IN6, crate::programs::EXT_IN6, LB_TAIL_TC),
    (tail::TO_CLIENT6, crate::programs::TO_CLIENT6, LB_TAIL_TC),
    (tail::XDP6, crate::programs::XDP6, LB_TAIL_XDP),
];

/// Indices of [`LB_TAIL_TC`] and [`LB_TAIL_XDP`].
pub mod tail {
    /// `lb_from_pod`'s IPv6 twin (tc).
    pub const FROM_POD6: u32 = 0;
    /// `lb_ext_in`'s IPv6 twin (tc).
    pub const EXT_IN6: u32 = 1;
    /// `lb_to_pod`'s and `lb_ext_out`'s IPv6 twin (tc).
    pub const TO_CLIENT6: u32 = 2;
    /// Entries of [`super::LB_TAIL_TC`].
    pub const TC_ENTRIES: u32 = 3;
    /// `lb_xdp`'s IPv6 twin (XDP), in [`super::LB_TAIL_XDP`].
    pub const XDP6: u32 = 0;
    /// Entries of [`super::LB_TAIL_XDP`].
    pub const XDP_ENTRIES: u32 = 1;
}

/// `0 -> NodeConfig` (array of one): what the datapath needs to know about this node. Written
/// by the agent.
pub const LB_CONFIG: &str = "LB_CONFIG";
/// `0 -> answer::Bucket` (array of one): the node's budget of generated answers (rejects, ICMP
/// errors), see [`crate::answer`]. Written by the datapath.
pub const LB_ANSWERS: &str = "LB_ANSWERS";
/// `0 -> u32` (array of one): non-zero once the datapath gave a connection that concerns no
/// frontend another source port ([`crate::conntrack::DIRECT`]). Until then, pods' packets to
/// addresses without a frontend cost no conntrack lookup (only a new connection's first packet
/// looks for a clash); from then on they look for their own flow. Pinned, so that an agent
/// restart keeps those flows translated. Written by the datapath.
pub const LB_DIRECT_NAT: &str = "LB_DIRECT_NAT";
/// `element -> u8` (array of [`crate::filters::ENTRIES`]): the sources of the replies the
/// datapath may translate back, the destinations of its flows and frontends, and whether that is
/// complete; see [`crate::filters`]. Written by the datapath and the agent (marks, and the agent
/// completes them at its start). Pinned: an agent restart keeps the marks of the flows it keeps.
pub const LB_FILTERS: &str = "LB_FILTERS";

/// `0 -> Scratch` (per-CPU array of one): working space of the programs, kept off their stack
/// (see [`Scratch`]). Private to each loaded datapath: never pinned, adopted or read.
pub const LB_SCRATCH: &str = "LB_SCRATCH";

/// What the programs keep in `LB_SCRATCH` instead of on their stack. The verifier allows a
/// program 512 bytes of stack across the frames of a call chain, and the SNAT port scan's
/// `bpf_loop` callback adds a frame to the programs' own, which older verifiers (6.1) round up
/// generously: the largest values a packet needs live here. Each program runs to completion on
/// its CPU before another uses that CPU's entry.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    /// The SNAT port allocation in progress.
    pub scan: crate::snat::Scan,
    /// The parameters of a `bpf_fib_lookup` (`struct bpf_fib_lookup`, [`FIB_PARAMS_SIZE`] bytes).
    pub fib: [u64; FIB_PARAMS_SIZE / 8],
    /// Where the walk of an IPv6 packet's extension headers ended (transport offset, protocol,
    /// fragment state), passed through memory so that the verifier meets one state after the
    /// walk rather than one per path through it (`lb_ebpf::parse6`).
    pub ipv6_walk: [u32; 4],
}

/// `sizeof(struct bpf_fib_lookup)`.
pub const FIB_PARAMS_SIZE: usize = 64;

/// `FlowKey -> CtEntry` (LRU hash, the layout of `LB_CT`): while an agent moves the flows of a
/// conntrack map of another shape into a new `LB_CT` (`lb_datapath::ct_carry`), that old map,
/// which the programs consult when `LB_CT` misses and [`LB_CT_CARRYING`] is set (the old
/// programs write it until the new ones are attached on every interface); otherwise an empty
/// map of one entry. Private: never pinned under this name.
pub const LB_CT_PREV: &str = "LB_CT_PREV";
/// `0 -> u32` (array of one): non-zero while the agent carries flows over from `LB_CT_PREV`.
/// Written by the agent. Private to each loaded object.
pub const LB_CT_CARRYING: &str = "LB_CT_CARRYING";

/// `0 -> events::Budget` (array of one): the node's budget of event records, see
/// [`crate::events`]. Written by the datapath. Private to each loaded object (see [`PRIVATE`]).
pub const LB_EVENTS: &str = "LB_EVENTS";
/// `0 -> events::Event` (per-CPU array of one): the event a dropped packet left for its program's
/// entry function to record. Written by the datapath. Private to each loaded object (see
/// [`PRIVATE`]).
pub const LB_EVENT_SLOT: &str = "LB_EVENT_SLOT";
/// aya-log's ring buffer (`aya_log_ebpf`'s, 128 KiB; the name is aya-log's): the event records
/// on their way to the agent, which reads them (`Datapath::event_log`). Private to each loaded
/// object (see [`PRIVATE`]).
pub const AYA_LOGS: &str = "AYA_LOGS";

/// Every pinned map, in creation order, for tools that walk them all.
pub const ALL: [&str; 22] = [
    LB_ADDRS,
    LB_SERVICES,
    LB_BACKENDS,
    LB_MAGLEV,
    LB_CT,
    LB_FRAGS,
    LB_SVC_STATS,
    LB_VERDICTS,
    LB_SRC_RANGES,
    LB_AFFINITY,
    LB_CONFIG,
    LB_ANSWERS,
    LB_DIRECT_NAT,
    LB_AFFINITY_SCOPE,
    LB_SOCK_REV,
    LB_SOCK_CONFIG,
    LB_SOCK_STATS,
    LB_FILTERS,
    LB6_ADDRS,
    LB6_SERVICES,
    LB6_BACKENDS,
    LB6_CT,
];

/// A map's key and value sizes as this version lays them out: what the BPF object declares
/// (checked by a test against the built object) and what a pinned map must have for an agent to
/// adopt it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
}

const fn layout(name: &'static str, key_size: usize, value_size: usize) -> Layout {
    Layout {
        name,
        key_size: key_size as u32,
        value_size: value_size as u32,
    }
}

/// Every map's layout, in [`ALL`]'s order. Arrays are keyed by a `u32` index; the Maglev outer
/// map holds a map descriptor (`u32`) per set; an LPM trie key is a `u32` prefix length and the
/// data.
pub const LAYOUTS: [Layout; ALL.len()] = {
    use crate::conntrack::{CtEntry, FlowKey};
    [
        layout(LB_ADDRS, size_of::<Be32>(), size_of::<AddrInfo>()),
        layout(LB_SERVICES, size_of::<FrontendKey>(), size_of::<Frontend>()),
        layout(LB_BACKENDS, 4, size_of::<Backend>()),
        layout(LB_MAGLEV, 4, 4),
        layout(LB_CT, size_of::<FlowKey>(), size_of::<CtEntry>()),
        layout(LB_FRAGS, size_of::<FragKey>(), size_of::<FragEntry>()),
        layout(LB_SVC_STATS, 4, size_of::<SetStats>()),
        layout(LB_VERDICTS, 4, size_of::<Counter>()),
        layout(LB_SRC_RANGES, 4 + size_of::<SourceRange>(), 4),
        layout(
            LB_AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<AffinityEntry>(),
        ),
        layout(LB_CONFIG, 4, size_of::<NodeConfig>()),
        layout(LB_ANSWERS, 4, size_of::<crate::answer::Bucket>()),
        layout(LB_DIRECT_NAT, 4, 4),
        layout(LB_AFFINITY_SCOPE, 4, 4),
        layout(
            LB_SOCK_REV,
            size_of::<crate::sock::SockRevKey>(),
            size_of::<crate::sock::SockRev>(),
        ),
        layout(LB_SOCK_CONFIG, 4, size_of::<crate::sock::SockConfig>()),
        layout(LB_SOCK_STATS, 4, size_of::<crate::sock::SockStats>()),
        layout(LB_FILTERS, 4, 1),
        layout(LB6_ADDRS, size_of::<Be128>(), size_of::<AddrInfo>()),
        layout(
            LB6_SERVICES,
            size_of::<FrontendKey6>(),
            size_of::<Frontend>(),
        ),
        layout(LB6_BACKENDS, 4, size_of::<Backend6>()),
        layout(
            LB6_CT,
            size_of::<crate::conntrack::FlowKey6>(),
            size_of::<crate::conntrack::CtEntry6>(),
        ),
    ]
};

/// Maps private to each loaded object, never pinned and not in [`ALL`]: what they hold matters
/// only to the process that loaded the object (the agent, reading its event records), so an
/// agent of another version neither adopts them nor misses them, and `lbctl` does not need them.
/// A ring buffer has no key or value.
pub const PRIVATE: [Layout; 6] = [
    layout(LB_SCRATCH, 4, size_of::<Scratch>()),
    layout(
        LB_CT_PREV,
        size_of::<crate::conntrack::FlowKey>(),
        size_of::<crate::conntrack::CtEntry>(),
    ),
    layout(LB_CT_CARRYING, 4, 4),
    layout(LB_EVENTS, 4, size_of::<crate::events::Budget>()),
    layout(LB_EVENT_SLOT, 4, size_of::<crate::events::Event>()),
    layout(AYA_LOGS, 0, 0),
];

/// The layout of map `name`, pinned or private.
pub fn layout_of(name: &str) -> Option<Layout> {
    let tail_calls = TAIL_CALLS.map(|name| layout(name, 4, 4));
    LAYOUTS
        .iter()
        .chain(&PRIVATE)
        .chain(&tail_calls)
        .copied()
        .find(|l| l.name.as_bytes() == name.as_bytes())
}

const _: () = {
    let mut i = 0;
    while i < ALL.len() {
        // Same order as ALL: compare the names byte by byte (no const str equality).
        let (a, b) = (ALL[i].as_bytes(), LAYOUTS[i].name.as_bytes());
        assert!(a.len() == b.len());
        let mut j = 0;
        while j < a.len() {
            assert!(a[j] == b[j]);
            j += 1;
        }
        i += 1;
    }
};

/// `map_flags` of `LB_CT`: an LRU with one list common to all CPUs (no `BPF_F_NO_COMMON_LRU`).
/// Per-CPU lists would give each CPU only its share of the entries: a 64-CPU node would hold
/// about 2,000 flows per CPU, and evict live ones from a busy CPU's share while the others sit
/// empty. Earlier versions made it with per-CPU lists; an agent adopting such a map moves its
/// flows into one of this kind (`lb_datapath::ct_carry`).
pub const CT_MAP_FLAGS: u32 = 0;

/// Default capacities. Each is a compile-time size the agent may override at load time.
pub mod capacity {
    /// Addresses carrying frontends (ClusterIPs, node addresses, LB and external IPs).
    pub const ADDRS: u32 = 131_072;
    /// Frontends: one per (address, port, protocol, scope).
    pub const SERVICES: u32 = 262_144;
    /// Backend sets; also the size of the Maglev outer array and of the per-set counters.
    pub const SETS: u32 = 65_536;
    /// Distinct backends (address, port) across all services.
    pub const BACKENDS: u32 = 262_144;
    /// Flow entries; every flow takes two (one per direction). The map is made a little larger
    /// (see [`ct_lru_slack`]) so that this many hold before the LRU evicts any.
    pub const CT: u32 = 262_144;

    /// Entries an LRU map with one common list may leave unused when it starts evicting, per
    /// possible CPU: each CPU keeps a local list of up to 128 free entries, and eviction starts
    /// once the common free list runs short of a CPU's refill of 128 (the kernel's
    /// `LOCAL_FREE_TARGET` in `bpf_lru_list.c`). Reserved on top of the capacity asked for.
    pub const fn ct_lru_slack(possible_cpus: u32) -> u32 {
        possible_cpus.saturating_mul(2 * 128)
    }
    /// IPv6 flow entries (`LB6_CT`), as [`CT`] for IPv4: smaller by default, because an LRU
    /// map takes all its memory when it is made (144 bytes an entry), on every node, whether
    /// or not it serves IPv6.
    pub const CT6: u32 = 65_536;
    /// Fragmented datagrams in flight.
    pub const FRAGS: u32 = 8_192;
    /// loadBalancerSourceRanges CIDRs over all services.
    pub const SRC_RANGES: u32 = 16_384;
    /// (client, service) pairs with session affinity.
    pub const AFFINITY: u32 = 65_536;
    /// (Socket, backend) pairs whose frontend `getpeername()` and `recvmsg()` still show (LRU: the
    /// oldest entries go first, whether or not their socket is still open).
    pub const SOCK_REV: u32 = 65_536;
}

/// Maglev table sizes: primes, so that every skip value visits every slot.
pub mod maglev {
    /// The default table size M (Maglev paper: M >> 100 * N keeps imbalance under 1%).
    pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
    /// The largest table size the agent accepts.
    pub const MAX_TABLE_SIZE: u32 = 131_071;
    /// Slots per inner-array element. BPF arrays round every element up to 8 bytes, so a table
    /// of bare u32 slots would take twice its size; page-sized chunks waste nothing and let the
    /// agent write a whole table with one memcpy through mmap.
    pub const CHUNK_SLOTS: u32 = 1024;
    /// One inner-array element.
    pub type Chunk = [u32; CHUNK_SLOTS as usize];

    /// Number of chunks a table of `table_size` slots needs.
    pub const fn chunks(table_size: u32) -> u32 {
        table_size.div_ceil(CHUNK_SLOTS)
    }
}

/// Bits of [`AddrInfo::flags`].
pub mod addr_flags {
    /// The address is a ClusterIP: a packet to a port or protocol it does not serve is rejected
    /// (as kube-proxy does), instead of passed to the stack.
    pub const CLUSTER_IP: u32 = 1 << 0;
    /// The node's SNAT address ([`super::NodeConfig::snat_addr`]): packets to its SNAT ports
    /// may be replies of source-NATed flows.
    pub const SNAT: u32 = 1 << 1;
    /// The node's hairpin address ([`super::NodeConfig::hairpin_addr`]): packets to it are
    /// replies of hairpin flows.
    pub const HAIRPIN: u32 = 1 << 2;
}

/// Hairpin flows: a pod balanced to itself.
pub mod hairpin {
    /// The address such flows come from, as the pod sees them. Link-local, outside the
    /// 169.254.1.1 pod gateway CNIs commonly use; a pod cannot be shown its own address (Linux
    /// drops packets that arrive with one of its own addresses as source).
    pub const DEFAULT_ADDR: [u8; 4] = [169, 254, 42, 1];
}

/// Source NAT of external flows to backends on other nodes.
pub mod snat {
    /// Ports the datapath hands out, by default: below the NodePort range (30000-32767) and
    /// Linux's ephemeral range (32768-60999), so that they collide with neither (the agent also
    /// reserves them: `net.ipv4.ip_local_reserved_ports`). A port is unique per (backend
    /// address, backend port, protocol), so this allows 28976 concurrent flows from this node
    /// to each backend; and it is wider than the ports Linux clients use, so that each port of
    /// one client has a home port of its own (`crate::snat::home`).
    pub const PORT_MIN: u16 = 1_024;
    pub const PORT_MAX: u16 = 29_999;
    /// The first port of the default range before it moved below the NodePorts (it was
    /// 61000-65535). Replies to these ports are looked up whatever the range, so that an agent
    /// upgraded from that default keeps the flows it source-NATed there; the node's own
    /// connections never use them (they are above its ephemeral ports).
    pub const PREVIOUS_PORT_MIN: u16 = 61_000;
    /// Candidate ports spread by a new flow's hash that the datapath tries before it scans the
    /// whole range (see `crate::snat::allocate`).
    pub const PROBES: u32 = 8;
}

/// Which side of the node a frontend serves. A frontend may have one entry per scope with
/// different backend sets (externalTrafficPolicy=Local uses only local endpoints for external
/// traffic, while in-cluster traffic uses all).
pub mod scope {
    /// Traffic from pods (and the node itself).
    pub const INTERNAL: u8 = 0;
    /// Traffic arriving on an external interface.
    pub const EXTERNAL: u8 = 1;
}

/// Bits of [`Service::flags`].
pub mod frontend_flags {
    /// With no backend, drop silently instead of rejecting (kube-proxy's behaviour for traffic
    /// policy Local when endpoints exist only on other nodes).
    pub const DROP_WHEN_EMPTY: u32 = 1 << 0;
    /// External TCP flows to backends on other nodes go by direct server return
    /// ([`crate::dsr`]) instead of being source-NATed to the node.
    pub const DSR: u32 = 1 << 1;
    /// A NodePort, LoadBalancer IP or externalIP of a Service with externalTrafficPolicy
    /// Local (both scopes): `--masquerade-all` leaves its flows their client's address, as
    /// kube-proxy's masqueradeAll does (it masquerades flows to ClusterIPs). External flows
    /// keep their client because that is what the policy is for; pods' flows take kube-proxy's
    /// short-circuit to every endpoint, unmasqueraded.
    pub const KEEPS_CLIENT: u32 = 1 << 2;
}

/// Bits of [`NodeConfig::flags`]: node-wide choices the agent makes from its flags. Read by the
/// datapath once per new flow (with the rest of the configuration), never for established ones.
pub mod node_flags {
    /// `lb-agent --masquerade-all` (kube-proxy's flag): every new flow the datapath balances,
    /// internal or external, to a backend on this node or another, is source-NATed to the
    /// node's SNAT address, as external flows to other nodes' backends always are, except
    /// flows to the external addresses of a Service with externalTrafficPolicy Local
    /// ([`frontend_flags::KEEPS_CLIENT`]). A pod balanced to itself keeps the hairpin address.
    pub const MASQUERADE_ALL: u32 = 1 << 0;
    /// `lb-agent --external-cluster-ips=false`: a ClusterIP reached from outside the cluster
    /// (a routed service range arriving on an uplink) is rejected as a port it does not serve.
    /// Without it (the default, as kube-proxy does) such a flow uses the ClusterIP's frontend
    /// (its internal backend set, so internalTrafficPolicy applies) and is source-NATed like
    /// any external flow to a backend on another node.
    pub const NO_EXTERNAL_CLUSTER_IPS: u32 = 1 << 1;
}

/// Bits of [`Backend::flags`].
pub mod backend_flags {
    /// The slot holds a backend (a zeroed slot does not).
    pub const ACTIVE: u8 = 1 << 0;
    /// The backend runs on this node.
    pub const LOCAL: u8 = 1 << 1;
}

/// Value of [`LB_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NodeConfig {
    /// The address flows to backends on other nodes are source-NATed to (the node's
    /// InternalIP); zero when unknown, in which case such flows are dropped.
    pub snat_addr: Be32,
    /// SNAT ports, inclusive, in host byte order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The link-local address hairpin flows (a pod balanced to itself) are source-NATed to;
    /// zero disables that (such flows then fail, as the pod drops packets from itself).
    pub hairpin_addr: Be32,
    /// [`node_flags`] bits.
    pub flags: u32,
}

impl NodeConfig {
    /// Whether flows can be source-NATed to the node: it has an address and a port range.
    #[inline(always)]
    pub const fn snat_configured(&self) -> bool {
        self.snat_addr.raw() != 0 && self.snat_port_max >= self.snat_port_min
    }

    /// Every balanced flow is source-NATed to the node ([`node_flags::MASQUERADE_ALL`]).
    #[inline(always)]
    pub const fn masquerade_all(&self) -> bool {
        self.flags & node_flags::MASQUERADE_ALL != 0
    }

    /// ClusterIPs serve flows from outside the cluster ([`node_flags::NO_EXTERNAL_CLUSTER_IPS`]
    /// unset).
    #[inline(always)]
    pub const fn external_cluster_ips(&self) -> bool {
        self.flags & node_flags::NO_EXTERNAL_CLUSTER_IPS == 0
    }
}

/// Value of [`LB_ADDRS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AddrInfo {
    /// [`addr_flags`] bits.
    pub flags: u32,
}

impl AddrInfo {
    #[inline(always)]
    pub const fn is_cluster_ip(&self) -> bool {
        self.flags & addr_flags::CLUSTER_IP != 0
    }

    /// The node's SNAT address: replies of source-NATed flows arrive there.
    #[inline(always)]
    pub const fn is_snat(&self) -> bool {
        self.flags & addr_flags::SNAT != 0
    }

    /// The node's hairpin address: replies of hairpin flows arrive there.
    #[inline(always)]
    pub const fn is_hairpin(&self) -> bool {
        self.flags & addr_flags::HAIRPIN != 0
    }
}

/// Key of [`LB_SERVICES`].
pub type FrontendKey = FrontendKeyOf<Be32>;
/// Key of [`LB6_SERVICES`].
pub type FrontendKey6 = FrontendKeyOf<Be128>;

/// A frontend's key: its address (of either family, [`Address`]), port, protocol and scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Zeroable)]
pub struct FrontendKeyOf<A> {
    pub addr: A,
    pub port: Be16,
    /// IP protocol number ([`crate::net::proto`]).
    pub proto: u8,
    /// [`scope`] value.
    pub scope: u8,
}

impl<A: Address> FrontendKeyOf<A> {
    /// The frontend a packet that matched no frontend of its own scope (`self`) uses instead:
    /// a packet from outside to a ClusterIP (`addr`) takes the ClusterIP's internal frontend
    /// when the node serves ClusterIPs to external clients ([`NodeConfig::external_cluster_ips`]).
    /// ClusterIPs have internal frontends only, so their backend set is the one
    /// internalTrafficPolicy chose; the flow keeps its external scope for source NAT.
    #[inline(always)]
    pub const fn external_cluster_ip(&self, addr: &AddrInfo, config: &NodeConfig) -> Option<Self> {
        if self.scope == scope::EXTERNAL && addr.is_cluster_ip() && config.external_cluster_ips() {
            Some(Self {
                scope: scope::INTERNAL,
                ..*self
            })
        } else {
            None
        }
    }
}

impl FrontendKey {
    /// The key of a frontend on `addr:port`, protocol `proto`, in `scope`.
    pub const fn new(addr: core::net::Ipv4Addr, port: u16, proto: u8, scope: u8) -> Self {
        Self {
            addr: Be32::from_ip(addr),
            port: Be16::from_host(port),
            proto,
            scope,
        }
    }
}

/// `10.96.0.1:80/TCP internal`, as logs and errors name a frontend.
impl core::fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let scope = if self.scope == scope::EXTERNAL {
            "external"
        } else {
            "internal"
        };
        write!(
            f,
            "{}:{}/{} {scope}",
            self.addr.to_ip(),
            self.port.to_host(),
            crate::net::proto::name(self.proto)
        )
    }
}

/// Value of [`LB_SERVICES`]: a frontend and the backend set it uses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Frontend {
    /// Its backend set: index of the set's Maglev table and counters.
    pub set_id: u32,
    /// Number of backends that take new flows. Zero means reject (or drop, see flags).
    pub backend_count: u32,
    /// The backend when `table_size` is zero (a single backend needs no table).
    pub backend_id: u32,
    /// Maglev table size (a prime), or zero when there is no table.
    pub table_size: u32,
    /// [`frontend_flags`] bits.
    pub flags: u32,
    /// sessionAffinity ClientIP timeout in seconds; zero disables affinity.
    pub affinity_timeout_s: u32,
    /// Set of loadBalancerSourceRanges that new flows must come from ([`LB_SRC_RANGES`]); zero
    /// accepts every source.
    pub source_range_id: u32,
    /// Not read by the datapath: a digest of the backends and size the Maglev table was built
    /// from, so that a restarted agent knows which tables are current without reading them.
    pub table_digest: u32,
}

impl Frontend {
    /// With no backend, drop rather than reject ([`frontend_flags::DROP_WHEN_EMPTY`]).
    #[inline(always)]
    pub const fn drop_when_empty(&self) -> bool {
        self.flags & frontend_flags::DROP_WHEN_EMPTY != 0
    }

    /// External flows to other nodes' backends go by direct server return
    /// ([`frontend_flags::DSR`]).
    #[inline(always)]
    pub const fn dsr(&self) -> bool {
        self.flags & frontend_flags::DSR != 0
    }

    /// `--masquerade-all` leaves its flows their client ([`frontend_flags::KEEPS_CLIENT`]).
    #[inline(always)]
    pub const fn keeps_client(&self) -> bool {
        self.flags & frontend_flags::KEEPS_CLIENT != 0
    }

    /// Whether new flows are balanced by a Maglev table (else the single `backend_id`).
    #[inline(always)]
    pub const fn has_table(&self) -> bool {
        self.table_size != 0
    }

    /// The Maglev slot of a flow with hash `hash` (needs [`Frontend::has_table`]).
    #[inline(always)]
    pub const fn slot(&self, hash: u32) -> u32 {
        hash % self.table_size
    }

    /// Whether new flows must come from its loadBalancerSourceRanges.
    #[inline(always)]
    pub const fn has_source_ranges(&self) -> bool {
        self.source_range_id != 0
    }
}

/// Value of [`LB_BACKENDS`].
pub type Backend = BackendOf<Be32>;
/// Value of [`LB6_BACKENDS`].
pub type Backend6 = BackendOf<Be128>;

/// A backend: its address (of either family, [`Address`]) and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Zeroable)]
pub struct BackendOf<A> {
    pub addr: A,
    pub port: Be16,
    /// [`backend_flags`] bits.
    pub flags: u8,
    pub _pad: u8,
}

impl<A: Address> BackendOf<A> {
    #[inline(always)]
    pub const fn is_active(&self) -> bool {
        self.flags & backend_flags::ACTIVE != 0
    }
}

/// Key of [`LB_FRAGS`]: what identifies the fragments of one datagram (RFC 791).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub src_addr: Be32,
    pub dst_addr: Be32,
    pub ip_id: Be16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`LB_FRAGS`]: the L4 ports found in the first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragEntry {
    pub src_port: Be16,
    pub dst_port: Be16,
}

/// Data of an [`LB_SRC_RANGES`] LPM key. The trie's prefix length counts the bits of `range_id`
/// ([`SourceRange::ID_BITS`], always matched exactly) plus the CIDR's prefix length; lookups use
/// [`SourceRange::LOOKUP_BITS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SourceRange {
    /// `Service::source_range_id` in network byte order, so that it is the leading 32 bits.
    pub range_id: Be32,
    pub addr: Be32,
}

impl SourceRange {
    /// Bits of the key before the address.
    pub const ID_BITS: u32 = 32;
    /// Prefix length of a lookup (the whole key).
    pub const LOOKUP_BITS: u32 = 64;

    /// The key data that looks up `addr` among the ranges of `frontend` (with
    /// [`Self::LOOKUP_BITS`]).
    #[inline(always)]
    pub const fn lookup(frontend: &Frontend, addr: Be32) -> Self {
        Self {
            range_id: Be32::from_host(frontend.source_range_id),
            addr,
        }
    }
}

/// Key of [`LB_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub client: Be32,
    pub set_id: u32,
}

/// Value of [`LB_AFFINITY`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityEntry {
    /// `bpf_ktime_get_coarse_ns()` of the client's last new connection to the backend set.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

impl AffinityKey {
    /// The entry of `client` for a frontend of backend set `set_id`, whose [`LB_AFFINITY_SCOPE`]
    /// value is `scope` (0: the set's own entries).
    #[inline(always)]
    pub const fn of(client: Be32, set_id: u32, scope: u32) -> Self {
        Self {
            client,
            set_id: if scope == 0 { set_id } else { scope },
        }
    }

    /// Whether the backend a found entry names may serve a frontend of set `set_id`: always
    /// from the set's own entries; from a shared set's (a Local set reading its Cluster set's),
    /// only a backend on this node, which the Local set then holds too.
    #[inline(always)]
    pub const fn serves(&self, set_id: u32, backend: &Backend) -> bool {
        self.set_id == set_id || backend.flags & backend_flags::LOCAL != 0
    }
}

impl AffinityEntry {
    /// Whether the client still sticks to its backend at `now` under a frontend's timeout.
    #[inline(always)]
    pub const fn fresh(&self, timeout_s: u32, now: u64) -> bool {
        now < self
            .last_used_ns
            .saturating_add(crate::time::seconds(timeout_s as u64))
    }
}

/// Value of [`LB_SVC_STATS`] (per CPU; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SetStats {
    /// Packets sent to a backend of this service (both directions).
    pub packets: u64,
    /// Their bytes, as seen on the wire at the hook.
    pub bytes: u64,
    /// Flows that selected a backend of this service.
    pub new_flows: u64,
}

/// Value of [`LB_VERDICTS`] (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = {
    assert!(size_of::<AddrInfo>() == 4);
    assert!(size_of::<NodeConfig>() == 16);
    assert!(size_of::<FrontendKey>() == 8);
    assert!(size_of::<Frontend>() == 32);
    assert!(size_of::<SourceRange>() == 8);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<AffinityEntry>() == 16);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<FrontendKey6>() == 20);
    assert!(size_of::<Backend6>() == 20);
    assert!(size_of::<FragKey>() == 12);
    assert!(size_of::<FragEntry>() == 4);
    assert!(size_of::<SetStats>() == 24);
    assert!(size_of::<Counter>() == 16);
};

// SAFETY: `repr(C)`; the sizes asserted above are the sums of the fields' sizes, so there is no
// padding, and every field is `Pod` (bytemuck's derive cannot check generic structs itself).
unsafe impl Pod for FrontendKey {}
// SAFETY: as above.
unsafe impl Pod for FrontendKey6 {}
// SAFETY: as above.
unsafe impl Pod for Backend {}
// SAFETY: as above.
unsafe impl Pod for Backend6 {}

#[cfg(feature = "user")]
aya_pod!(
    AddrInfo,
    FrontendKey,
    FrontendKey6,
    Backend6,
    Frontend,
    Backend,
    FragKey,
    FragEntry,
    SetStats,
    Counter,
    SourceRange,
    AffinityKey,
    AffinityEntry,
    NodeConfig
);
