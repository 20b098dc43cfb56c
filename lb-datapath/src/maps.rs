//! Typed handles on the datapath's maps, and the few operations that need more than one
//! syscall (a Maglev table is a map of its own, written through mmap).

use std::{
    cell::Cell,
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Array, ArrayOfMaps, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray},
};
use lb_common::{
    Address, Be32, Be128,
    answer::Bucket,
    conntrack::{CtEntry, CtEntry6, FlowKey, FlowKey6},
    maps::{
        self as names, AddrInfo, AffinityEntry, AffinityKey, Backend, Backend6, BackendOf, Counter,
        FragEntry, FragKey, Frontend, FrontendKey, FrontendKey6, NodeConfig, SetStats, SourceRange,
        maglev::{self, CHUNK_SLOTS, Chunk},
    },
    sock::{SockConfig, SockRev, SockRevKey, SockStats},
    stats::Reason,
};

/// `BPF_F_INNER_MAP | BPF_F_MMAPABLE`: must equal the flags of the datapath's table template.
const MAGLEV_TABLE_FLAGS: u32 = 0x1000 | 0x400;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// The kernel-internal "operation not supported" (not exported by libc).
const ENOTSUPP: i32 = 524;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from the BPF object")]
    Missing { name: &'static str },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open pinned map {path}")]
    Pinned {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("Maglev table of backend set {set_id}: {reason}")]
    Table { set_id: u32, reason: String },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

/// Every map of the datapath, typed.
pub struct Maps {
    pub addrs: HashMap<MapData, Be32, AddrInfo>,
    pub services: HashMap<MapData, FrontendKey, Frontend>,
    pub backends: Array<MapData, Backend>,
    /// Kept untyped: tables are created, swapped and read through [`Maps::build_maglev_map`],
    /// [`Maps::install_maglev_maps`] and [`Maps::maglev_table`].
    pub maglev: Map,
    pub ct: HashMap<MapData, FlowKey, CtEntry>,
    pub frags: HashMap<MapData, FragKey, FragEntry>,
    pub set_stats: PerCpuArray<MapData, SetStats>,
    pub verdicts: PerCpuArray<MapData, Counter>,
    pub src_ranges: LpmTrie<MapData, SourceRange, u32>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    /// Set id -> the set whose affinity entries it shares (0: its own).
    pub affinity_scope: Array<MapData, u32>,
    /// One entry: the node's configuration.
    pub config: Array<MapData, NodeConfig>,
    /// One entry: the node's budget of generated answers.
    pub answers: Array<MapData, Bucket>,
    /// One entry: non-zero once the datapath gave a direct connection another source port.
    pub direct_nat: Array<MapData, u32>,
    /// Marked reply sources and destinations, and whether that is complete
    /// ([`crate::filters`]).
    pub filters: Array<MapData, u8>,
    /// (Socket, backend) -> the frontend a socket-balanced socket asked for.
    pub sock_rev: HashMap<MapData, SockRevKey, SockRev>,
    /// One entry: what the socket programs know of the node.
    pub sock_config: Array<MapData, SockConfig>,
    /// Set id -> what the socket programs did for its frontends (per CPU).
    pub sock_stats: PerCpuArray<MapData, SockStats>,
    /// The IPv6 counterparts of `addrs`, `services`, `backends` and `ct`.
    pub addrs6: HashMap<MapData, Be128, AddrInfo>,
    pub services6: HashMap<MapData, FrontendKey6, Frontend>,
    pub backends6: Array<MapData, Backend6>,
    pub ct6: HashMap<MapData, FlowKey6, CtEntry6>,
    /// Descriptors of the maps written in bulk (typed handles keep theirs private).
    bulk: BTreeMap<&'static str, OwnedFd>,
    /// The backends array is as this process's load created it (every slot inactive) and no
    /// adoption has read it yet (see [`Maps::take_backends_created`]).
    backends_created: Cell<bool>,
}

/// Maps written or read in bulk.
const BULK: [&str; 10] = [
    names::LB_AFFINITY_SCOPE,
    names::LB_BACKENDS,
    names::LB_SERVICES,
    names::LB_ADDRS,
    names::LB_CT,
    names::LB_FILTERS,
    names::LB6_BACKENDS,
    names::LB6_SERVICES,
    names::LB6_ADDRS,
    names::LB6_CT,
];

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::assemble(|name| ebpf.take_map(name).ok_or(MapsError::Missing { name }))
    }

    /// Opens the maps pinned under `dir` (what `lbctl` does; works while the agent is down).
    pub fn open_pinned(dir: &Path) -> Result<Self, MapsError> {
        Self::assemble(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| MapsError::Pinned {
                path: path.display().to_string(),
                source,
            })?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    fn assemble(
        mut take: impl FnMut(&'static str) -> Result<Map, MapsError>,
    ) -> Result<Self, MapsError> {
        let mut bulk = BTreeMap::new();
        let mut take = |name: &'static str| -> Result<Map, MapsError> {
            let map = take(name)?;
            if BULK.contains(&name) {
                let data = match &map {
                    Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) => d,
                    _ => return Err(MapsError::Missing { name }),
                };
                let fd = data
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| MapsError::Map {
                        name,
                        source: MapError::IoError(e),
                    })?;
                bulk.insert(name, fd);
            }
            Ok(map)
        };
        macro_rules! typed {
            ($name:expr) => {
                take($name)?.try_into().map_err(map_err($name))?
            };
        }
        Ok(Self {
            addrs: typed!(names::LB_ADDRS),
            services: typed!(names::LB_SERVICES),
            backends: typed!(names::LB_BACKENDS),
            maglev: take(names::LB_MAGLEV)?,
            ct: typed!(names::LB_CT),
            frags: typed!(names::LB_FRAGS),
            set_stats: typed!(names::LB_SVC_STATS),
            verdicts: typed!(names::LB_VERDICTS),
            src_ranges: typed!(names::LB_SRC_RANGES),
            affinity: typed!(names::LB_AFFINITY),
            affinity_scope: typed!(names::LB_AFFINITY_SCOPE),
            config: typed!(names::LB_CONFIG),
            answers: typed!(names::LB_ANSWERS),
            direct_nat: typed!(names::LB_DIRECT_NAT),
            filters: typed!(names::LB_FILTERS),
            sock_rev: typed!(names::LB_SOCK_REV),
            sock_config: typed!(names::LB_SOCK_CONFIG),
            sock_stats: typed!(names::LB_SOCK_STATS),
            addrs6: typed!(names::LB6_ADDRS),
            services6: typed!(names::LB6_SERVICES),
            backends6: typed!(names::LB6_BACKENDS),
            ct6: typed!(names::LB6_CT),
            bulk,
            backends_created: Cell::new(false),
        })
    }

    /// Records that the backends array was created by this process's load.
    pub(crate) fn note_backends_created(&self) {
        self.backends_created.set(true);
    }

    /// Whether the backends array is still as its load created it, every slot inactive; true
    /// at most once, for the first adoption, which then need not read its 262,144 slots (some
    /// 30 ms of an agent's start).
    pub fn take_backends_created(&self) -> bool {
        self.backends_created.take()
    }

    /// Writes `keys[i] -> values[i]` into map `name` (one of the bulk-written maps) with one
    /// syscall where the kernel can (BPF_MAP_UPDATE_BATCH), else `false`: the caller writes
    /// one entry at a time.
    pub fn update_batch<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        keys: &[K],
        values: &[V],
    ) -> Result<bool, MapsError> {
        if keys.is_empty() {
            return Ok(true);
        }
        let fd = self.bulk.get(name).ok_or(MapsError::Missing { name })?;
        match crate::sys::map_update_batch(fd.as_fd(), keys, values) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(MapsError::Map {
                name,
                source: MapError::IoError(e),
            }),
        }
    }

    /// Every active backend slot, read with batch lookups (a few syscalls for the whole array).
    pub fn active_backends(&self) -> Result<Vec<(u32, Backend)>, MapsError> {
        self.active_slots(names::LB_BACKENDS, &self.backends)
    }

    /// Every active IPv6 backend slot, as [`Maps::active_backends`].
    pub fn active_backends6(&self) -> Result<Vec<(u32, Backend6)>, MapsError> {
        self.active_slots(names::LB6_BACKENDS, &self.backends6)
    }

    /// The active slots of the backends array `name` (`array`).
    fn active_slots<A: Address>(
        &self,
        name: &'static str,
        array: &Array<MapData, BackendOf<A>>,
    ) -> Result<Vec<(u32, BackendOf<A>)>, MapsError>
    where
        BackendOf<A>: aya::Pod,
    {
        let fd = self.bulk.get(name).ok_or(MapsError::Missing { name })?;
        let capacity = array.len() as usize;
        let mut found = Vec::new();
        match crate::sys::array_lookup_all::<BackendOf<A>>(fd.as_fd(), capacity) {
            Ok(values) => {
                for (id, b) in values.into_iter().enumerate() {
                    if b.is_active() {
                        found.push((id as u32, b));
                    }
                }
            }
            // Kernels without batch lookups: one slot at a time.
            Err(_) => {
                for (id, b) in array.iter().enumerate() {
                    let b = b.map_err(map_err(name))?;
                    if b.is_active() {
                        found.push((id as u32, b));
                    }
                }
            }
        }
        Ok(found)
    }

    /// Every element of `LB_AFFINITY_SCOPE` (by set id), read with batch lookups where the kernel
    /// has them.
    pub fn affinity_scope_elements(&self) -> Result<Vec<u32>, MapsError> {
        let name = names::LB_AFFINITY_SCOPE;
        let fd = self.bulk.get(name).ok_or(MapsError::Missing { name })?;
        match crate::sys::array_lookup_all(fd.as_fd(), self.affinity_scope.len() as usize) {
            Ok(elements) => Ok(elements),
            Err(_) => self
                .affinity_scope
                .iter()
                .map(|e| e.map_err(map_err(name)))
                .collect(),
        }
    }

    /// Every element of the filters (`lb_common::filters`), read with batch lookups where the
    /// kernel has them.
    pub fn filter_elements(&self) -> Result<Vec<u8>, MapsError> {
        let name = names::LB_FILTERS;
        let entries = lb_common::filters::ENTRIES;
        let fd = self.bulk.get(name).ok_or(MapsError::Missing { name })?;
        match crate::sys::array_lookup_all(fd.as_fd(), entries as usize) {
            Ok(elements) => Ok(elements),
            Err(_) => (0..entries)
                .map(|i| {
                    self.filters
                        .get(&i, 0)
                        .map_err(|source| MapsError::Map { name, source })
                })
                .collect(),
        }
    }

    /// How many conntrack entries there are (two per flow), counted with batch lookups: walking
    /// a million-entry table key by key would cost a million syscalls.
    pub fn conntrack_entries(&self) -> Result<usize, MapsError> {
        self.conntrack_keys(|_| ())
    }

    /// Calls `visit` with every conntrack key (read with batch lookups where the kernel has
    /// them); returns how many there were. Keys that come and go meanwhile may be missed.
    pub fn conntrack_keys(&self, mut visit: impl FnMut(FlowKey)) -> Result<usize, MapsError> {
        match self.batch_keys::<FlowKey, CtEntry>(names::LB_CT, &mut visit)? {
            Some(n) => Ok(n),
            // Kernels without batch lookups on hash maps.
            None => Ok(self.ct.keys().flatten().map(&mut visit).count()),
        }
    }

    /// Calls `visit` with the key of every frontend, as [`Maps::conntrack_keys`].
    pub fn frontend_keys(&self, mut visit: impl FnMut(FrontendKey)) -> Result<usize, MapsError> {
        match self.batch_keys::<FrontendKey, Frontend>(names::LB_SERVICES, &mut visit)? {
            Some(n) => Ok(n),
            None => Ok(self.services.keys().flatten().map(&mut visit).count()),
        }
    }

    /// Every frontend and its value through `visit`, read with batch lookups where the kernel
    /// has them (an agent's restart adopts ten thousand of them).
    pub fn frontends(&self, mut visit: impl FnMut(FrontendKey, Frontend)) -> Result<(), MapsError> {
        self.entries(names::LB_SERVICES, &self.services, &mut visit)
    }

    /// Every address that carries frontends and its value through `visit`, as
    /// [`Maps::frontends`].
    pub fn frontend_addrs(&self, mut visit: impl FnMut(Be32, AddrInfo)) -> Result<(), MapsError> {
        self.entries(names::LB_ADDRS, &self.addrs, &mut visit)
    }

    /// Every IPv6 frontend and its value through `visit`, as [`Maps::frontends`].
    pub fn frontends6(
        &self,
        mut visit: impl FnMut(FrontendKey6, Frontend),
    ) -> Result<(), MapsError> {
        self.entries(names::LB6_SERVICES, &self.services6, &mut visit)
    }

    /// Every IPv6 address that carries frontends and its value through `visit`, as
    /// [`Maps::frontends`].
    pub fn frontend_addrs6(&self, mut visit: impl FnMut(Be128, AddrInfo)) -> Result<(), MapsError> {
        self.entries(names::LB6_ADDRS, &self.addrs6, &mut visit)
    }

    /// The entries of the bulk-read hash map `name` (`map`) through `visit`: with batch lookups,
    /// else one entry at a time.
    fn entries<K, V>(
        &self,
        name: &'static str,
        map: &HashMap<MapData, K, V>,
        visit: &mut dyn FnMut(K, V),
    ) -> Result<(), MapsError>
    where
        K: aya::Pod + bytemuck::Pod,
        V: aya::Pod + bytemuck::Pod,
    {
        if self.batch_entries(name, visit)? {
            return Ok(());
        }
        for entry in map.iter() {
            let (key, value) = entry.map_err(map_err(name))?;
            visit(key, value);
        }
        Ok(())
    }

    /// The entries of the bulk-read hash map `name` through `visit`, read with batch lookups;
    /// `false` (and nothing visited) where the kernel has none.
    fn batch_entries<K: bytemuck::Pod, V: bytemuck::Pod>(
        &self,
        name: &'static str,
        visit: &mut dyn FnMut(K, V),
    ) -> Result<bool, MapsError> {
        let fd = self.bulk.get(name).ok_or(MapsError::Missing { name })?;
        let read =
            crate::sys::hash_entries(fd.as_fd(), size_of::<K>(), size_of::<V>(), |key, value| {
                visit(
                    bytemuck::pod_read_unaligned(key),
                    bytemuck::pod_read_unaligned(value),
                );
            });
        Ok(read.is_ok())
    }

    /// The keys of the bulk-read hash map `name` (values of type `V`) through `visit`, read with
    /// batch lookups; `None` where the kernel has none.
    fn batch_keys<K: bytemuck::Pod, V>(
        &self,
        name: &'static str,
        visit: &mut dyn FnMut(K),
    ) -> Result<Option<usize>, MapsError> {
        let fd = self.bulk.get(name).ok_or(MapsError::Missing { name })?;
        let read = crate::sys::hash_keys(fd.as_fd(), size_of::<K>(), size_of::<V>(), |bytes| {
            visit(bytemuck::pod_read_unaligned(bytes));
        });
        Ok(read.ok())
    }

    /// Creates the map of one Maglev table (one backend id per slot) and fills it (one memcpy
    /// through mmap). It takes effect once installed with [`Maps::install_maglev_maps`]: a table
    /// is built in a fresh map and swapped in with one update, so the datapath sees the old table
    /// or the new one, never a mix.
    pub fn build_maglev_map(set_id: u32, table: &[u32]) -> Result<MapData, MapsError> {
        let table_err = |reason: String| MapsError::Table { set_id, reason };
        let size = u32::try_from(table.len()).map_err(|_| table_err("too large".into()))?;
        let chunks = maglev::chunks(size);
        let def = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>() as u32,
            size_of::<Chunk>() as u32,
            chunks,
            MAGLEV_TABLE_FLAGS,
        );
        let inner = MapData::create(def, "lb_maglev_tbl", None)
            .map_err(|e| table_err(format!("cannot create its map: {e}")))?;
        let bytes = chunks as usize * size_of::<Chunk>();
        // SAFETY: the map was created BPF_F_MMAPABLE with exactly `bytes` bytes of values, and
        // nothing else maps it: the mapping is private to this function.
        let mut mem = unsafe {
            memmap2::MmapOptions::new()
                .len(bytes)
                .map_mut(inner.fd().as_fd().as_raw_fd())
        }
        .map_err(|e| table_err(format!("cannot mmap its map: {e}")))?;
        for (dst, id) in mem.chunks_exact_mut(4).zip(table) {
            dst.copy_from_slice(&id.to_ne_bytes());
        }
        drop(mem);
        Ok(inner)
    }

    /// Swaps built tables in. Every update of a map of maps makes the kernel wait for an RCU
    /// grace period (so that no program still uses the old table when it returns): one batch
    /// update waits once for all of them, where one update per table would wait each time.
    pub fn install_maglev_maps(&mut self, tables: &[(u32, MapData)]) -> Result<(), MapsError> {
        if tables.is_empty() {
            return Ok(());
        }
        let Map::ArrayOfMaps(outer) = &self.maglev else {
            return Err(MapsError::Missing {
                name: names::LB_MAGLEV,
            });
        };
        let keys: Vec<u32> = tables.iter().map(|(id, _)| *id).collect();
        let fds: Vec<u32> = tables
            .iter()
            .map(|(_, map)| map.fd().as_fd().as_raw_fd() as u32)
            .collect();
        match crate::sys::map_update_batch(outer.fd().as_fd(), &keys, &fds) {
            Ok(_) => Ok(()),
            // Kernels without batch updates for maps of maps: one at a time.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
                ) =>
            {
                for (id, map) in tables {
                    self.maglev_mut()?
                        .set(*id, map, 0)
                        .map_err(map_err(names::LB_MAGLEV))?;
                }
                Ok(())
            }
            Err(e) => Err(MapsError::Table {
                set_id: keys[0],
                reason: format!("installing {} tables failed: {e}", keys.len()),
            }),
        }
    }

    /// Reads back the Maglev table of `set_id` (`table_size` slots).
    pub fn maglev_table(&self, set_id: u32, table_size: u32) -> Result<Vec<u32>, MapsError> {
        let table_err = |reason: String| MapsError::Table { set_id, reason };
        let outer: ArrayOfMaps<&MapData, MapData> =
            ArrayOfMaps::try_from(&self.maglev).map_err(map_err(names::LB_MAGLEV))?;
        let inner = outer
            .get(&set_id, 0)
            .map_err(|e| table_err(format!("not installed: {e}")))?;
        let array = Array::<MapData, Chunk>::try_from(Map::Array(inner))
            .map_err(|e| table_err(format!("unexpected map: {e}")))?;
        let mut slots = Vec::with_capacity(table_size as usize);
        for chunk in 0..maglev::chunks(table_size) {
            let values = array
                .get(&chunk, 0)
                .map_err(|e| table_err(format!("chunk {chunk}: {e}")))?;
            let take = (table_size - chunk * CHUNK_SLOTS).min(CHUNK_SLOTS) as usize;
            slots.extend_from_slice(&values[..take]);
        }
        Ok(slots)
    }

    /// Removes the Maglev table of `set_id` (the kernel frees it once no program uses it).
    pub fn remove_maglev_table(&mut self, set_id: u32) -> Result<(), MapsError> {
        let Map::ArrayOfMaps(data) = &self.maglev else {
            return Err(MapsError::Missing {
                name: names::LB_MAGLEV,
            });
        };
        match crate::sys::map_delete(data.fd().as_fd(), &set_id) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(MapsError::Table {
                set_id,
                reason: format!("cannot remove it: {e}"),
            }),
        }
    }

    fn maglev_mut(&mut self) -> Result<ArrayOfMaps<&mut MapData, MapData>, MapsError> {
        ArrayOfMaps::try_from(&mut self.maglev).map_err(map_err(names::LB_MAGLEV))
    }

    /// Verdict counters summed over CPUs, in `Reason` order.
    pub fn verdict_totals(&self) -> Result<Vec<(Reason, Counter)>, MapsError> {
        Reason::ALL
            .iter()
            .map(|reason| {
                let per_cpu = self
                    .verdicts
                    .get(&(*reason as u32), 0)
                    .map_err(map_err(names::LB_VERDICTS))?;
                let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
                Ok((*reason, total))
            })
            .collect()
    }

    /// One service's counters summed over CPUs.
    pub fn set_totals(&self, set_id: u32) -> Result<SetStats, MapsError> {
        let per_cpu = self
            .set_stats
            .get(&set_id, 0)
            .map_err(map_err(names::LB_SVC_STATS))?;
        Ok(per_cpu.iter().fold(SetStats::default(), |acc, s| SetStats {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
            new_flows: acc.new_flows + s.new_flows,
        }))
    }

    /// What the socket programs did for one set's frontends, summed over CPUs.
    pub fn sock_totals(&self, set_id: u32) -> Result<SockStats, MapsError> {
        let per_cpu = self
            .sock_stats
            .get(&set_id, 0)
            .map_err(map_err(names::LB_SOCK_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(SockStats::default(), |acc, s| SockStats {
                connects: acc.connects + s.connects,
                datagrams: acc.datagrams + s.datagrams,
                refused: acc.refused + s.refused,
            }))
    }
}
