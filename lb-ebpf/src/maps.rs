//! The datapath's maps. Names, layouts and meanings are defined once, in `lb_common::maps`;
//! capacities here are defaults that the agent overrides at load time.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    bindings::{BPF_F_INNER_MAP, BPF_F_MMAPABLE},
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use lb_common::{
    Be32, Be128,
    answer::Bucket,
    conntrack::{CtEntry, CtEntryOf, FlowKey, FlowKeyOf},
    events::{Budget, Event},
    maps::{
        AddrInfo, AffinityEntry, AffinityKey, Backend, Backend6, Counter, FragEntry, FragKey,
        Frontend, FrontendKey, FrontendKey6, NodeConfig, SetStats, SourceRange, capacity, maglev,
        tail,
    },
    sock::{SockConfig, SockRev, SockRevKey, SockStats},
    stats::Reason,
};

/// See [`lb_common::maps::LB_ADDRS`].
#[btf_map]
pub static LB_ADDRS: HashMap<Be32, AddrInfo, { capacity::ADDRS as usize }> = HashMap::new();

/// See [`lb_common::maps::LB_SERVICES`].
#[btf_map]
pub static LB_SERVICES: HashMap<FrontendKey, Frontend, { capacity::SERVICES as usize }> =
    HashMap::new();

/// See [`lb_common::maps::LB_BACKENDS`].
#[btf_map]
pub static LB_BACKENDS: Array<Backend, { capacity::BACKENDS as usize }> = Array::new();

/// Flags of every Maglev table. `BPF_F_INNER_MAP` lets tables of different sizes live in one
/// outer map (the table size may change across agent versions or flags); `BPF_F_MMAPABLE` lets the
/// agent write a whole table with one memcpy instead of one syscall per slot.
pub const MAGLEV_TABLE_FLAGS: usize = (BPF_F_INNER_MAP | BPF_F_MMAPABLE) as usize;

/// One service's Maglev table: chunks of slots holding backend ids. Only its shape matters here
/// (the agent creates each table with as many chunks as its size needs).
pub type MaglevTable = Array<
    maglev::Chunk,
    { maglev::chunks(maglev::DEFAULT_TABLE_SIZE) as usize },
    MAGLEV_TABLE_FLAGS,
>;

/// See [`lb_common::maps::LB_MAGLEV`].
#[btf_map]
pub static LB_MAGLEV: ArrayOfMaps<MaglevTable, { capacity::SETS as usize }> = ArrayOfMaps::new();

/// A conntrack map of either family: [`lb_common::maps::CT_MAP_FLAGS`] (one LRU list for all
/// CPUs, so that the whole capacity serves whichever CPUs the flows land on).
pub type CtMap<A> = LruHashMap<
    FlowKeyOf<A>,
    CtEntryOf<A>,
    { capacity::CT as usize },
    { lb_common::maps::CT_MAP_FLAGS as usize },
>;

/// See [`lb_common::maps::LB_CT`].
#[btf_map]
pub static LB_CT: CtMap<Be32> = LruHashMap::new();

/// See [`lb_common::maps::LB_CT_PREV`]: the loader swaps in the old conntrack map while flows are
/// carried over, whatever its capacity and flags.
#[btf_map]
pub static LB_CT_PREV: LruHashMap<FlowKey, CtEntry, 1> = LruHashMap::new();

/// See [`lb_common::maps::LB_CT_CARRYING`].
#[btf_map]
pub static LB_CT_CARRYING: Array<u32, 1> = Array::new();

/// See [`lb_common::maps::LB_FRAGS`].
#[btf_map]
pub static LB_FRAGS: LruHashMap<FragKey, FragEntry, { capacity::FRAGS as usize }> =
    LruHashMap::new();

/// See [`lb_common::maps::LB_SVC_STATS`].
#[btf_map]
pub static LB_SVC_STATS: PerCpuArray<SetStats, { capacity::SETS as usize }> = PerCpuArray::new();

/// See [`lb_common::maps::LB_VERDICTS`].
#[btf_map]
pub static LB_VERDICTS: PerCpuArray<Counter, { Reason::COUNT as usize }> = PerCpuArray::new();

/// See [`lb_common::maps::LB_SRC_RANGES`].
#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SourceRange, u32, { capacity::SRC_RANGES as usize }> =
    LpmTrie::new();

/// See [`lb_common::maps::LB_AFFINITY`].
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { capacity::AFFINITY as usize }> =
    LruHashMap::new();

/// See [`lb_common::maps::LB_AFFINITY_SCOPE`].
#[btf_map]
pub static LB_AFFINITY_SCOPE: Array<u32, { capacity::SETS as usize }> = Array::new();

/// See [`lb_common::maps::LB_SOCK_REV`].
#[btf_map]
pub static LB_SOCK_REV: LruHashMap<SockRevKey, SockRev, { capacity::SOCK_REV as usize }> =
    LruHashMap::new();

/// See [`lb_common::maps::LB_SOCK_CONFIG`].
#[btf_map]
pub static LB_SOCK_CONFIG: Array<SockConfig, 1> = Array::new();

/// See [`lb_common::maps::LB_SOCK_STATS`].
#[btf_map]
pub static LB_SOCK_STATS: PerCpuArray<SockStats, { capacity::SETS as usize }> = PerCpuArray::new();

/// See [`lb_common::maps::LB_CONFIG`].
#[btf_map]
pub static LB_CONFIG: Array<NodeConfig, 1> = Array::new();

/// See [`lb_common::maps::LB_ANSWERS`].
#[btf_map]
pub static LB_ANSWERS: Array<Bucket, 1> = Array::new();

/// See [`lb_common::maps::LB_DIRECT_NAT`].
#[btf_map]
pub static LB_DIRECT_NAT: Array<u32, 1> = Array::new();

/// See [`lb_common::maps::LB_FILTERS`].
#[btf_map]
pub static LB_FILTERS: Array<u8, { lb_common::filters::ENTRIES as usize }> = Array::new();

/// Flags of the IPv6 hash maps the agent writes: allocated as entries come rather than all at
/// load, so that a node without IPv6 Services pays no memory for them.
const LB6_HASH_FLAGS: usize = BPF_F_NO_PREALLOC as usize;

/// See [`lb_common::maps::LB6_ADDRS`].
#[btf_map]
pub static LB6_ADDRS: HashMap<Be128, AddrInfo, { capacity::ADDRS as usize }, LB6_HASH_FLAGS> =
    HashMap::new();

/// See [`lb_common::maps::LB6_SERVICES`].
#[btf_map]
pub static LB6_SERVICES: HashMap<
    FrontendKey6,
    Frontend,
    { capacity::SERVICES as usize },
    LB6_HASH_FLAGS,
> = HashMap::new();

/// See [`lb_common::maps::LB6_BACKENDS`].
#[btf_map]
pub static LB6_BACKENDS: Array<Backend6, { capacity::BACKENDS as usize }> = Array::new();

/// See [`lb_common::maps::LB6_CT`] (the loader sizes it: `capacity::CT6`).
#[btf_map]
pub static LB6_CT: CtMap<Be128> = LruHashMap::new();

/// See [`lb_common::maps::LB_TAIL_TC`].
#[btf_map]
pub static LB_TAIL_TC: ProgramArray<{ tail::TC_ENTRIES as usize }> = ProgramArray::new();

/// See [`lb_common::maps::LB_TAIL_XDP`].
#[btf_map]
pub static LB_TAIL_XDP: ProgramArray<{ tail::XDP_ENTRIES as usize }> = ProgramArray::new();

/// See [`lb_common::maps::LB_SCRATCH`].
#[btf_map]
pub static LB_SCRATCH: PerCpuArray<lb_common::maps::Scratch, 1> = PerCpuArray::new();

/// See [`lb_common::maps::LB_EVENTS`]. Not pinned: each loaded object meters its own records.
#[btf_map]
pub static LB_EVENTS: Array<Budget, 1> = Array::new();

/// See [`lb_common::maps::LB_EVENT_SLOT`]. Not pinned.
#[btf_map]
pub static LB_EVENT_SLOT: PerCpuArray<Event, 1> = PerCpuArray::new();
