//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): builds the lookup table in which the
//! datapath finds a flow's backend at slot `flow_hash % M`.
//!
//! Maglev rather than `hash % N` or a hash ring, because:
//! - When a backend comes or goes, its own slots move and only a small fraction of the others do,
//!   so flows that have no conntrack entry on this node (the agent restarted, or ECMP moved the
//!   flow here from another node) mostly keep their backend.
//! - Every node computes the same table for the same backend set: the permutations come from each
//!   backend's address and port (its key), never from node-local state such as the backend id or
//!   the order in which endpoints were seen. That is what lets a flow that changes node reach the
//!   same backend without any state shared between nodes.
//! - Every backend gets an equal share of slots, give or take one, and a lookup is a single array
//!   read, which is what a BPF program can afford.
//!
//! Weights work as in Katran's and Cilium's weighted Maglev: a backend takes a turn only when it
//! has accumulated enough credit, so its share of slots follows its weight, and equal weights are
//! exactly the classic algorithm.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::num::NonZero;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

pub use lb_common::maps::maglev::{DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE};

/// The smallest table size accepted. Below 3 every skip would be 1, so all backends would walk the
/// table in the same order and the table would degenerate into contiguous runs.
pub const MIN_TABLE_SIZE: u32 = 3;

/// Table sizes the agent picks from: primes just under powers of two.
pub const LADDER: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16_381, 32_749, 65_521, 131_071,
];

/// Slots per selectable backend the agent aims for: the Maglev paper's M >= 100 N keeps every
/// backend's share within about 1% of the others'.
pub const SLOTS_PER_BACKEND: u32 = 100;

/// The table size for `backends` selectable backends: the smallest ladder size with at least
/// [`SLOTS_PER_BACKEND`] slots each, but no more than `ceiling` (`--maglev-table-size`).
///
/// A pure function of the backend count, so every node picks the same size for the same set
/// (and so the same backend for the same flow). Sizing by need rather than always using the
/// ceiling keeps kernel memory and build time proportional to the service: 10,000 services of
/// 10 backends take 4 KiB of table each instead of 64 KiB.
pub fn table_size_for(backends: usize, ceiling: u32) -> u32 {
    let wanted = u64::try_from(backends)
        .unwrap_or(u64::MAX)
        .saturating_mul(u64::from(SLOTS_PER_BACKEND));
    LADDER
        .iter()
        .copied()
        .find(|m| u64::from(*m) >= wanted && *m <= ceiling)
        .unwrap_or(ceiling)
}

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// What the table's slots hold. Node-local (it indexes this node's backend map), which is why
    /// it plays no part in the placement.
    pub id: u32,
    /// The node-independent identity that places the backend: an IPv4 address then port, both
    /// in network order, or 48 bits of a fixed hash of an IPv6 one (see [`backend_key`]).
    pub key: [u8; 6],
    /// Relative share of the slots. A weight of 0 takes no slots at all, so draining a backend
    /// gives exactly the table of the set without it.
    pub weight: u32,
}

/// The key of the backend at `addr`, in the byte order every node must agree on.
pub const fn backend_key_v4(addr: SocketAddrV4) -> [u8; 6] {
    let [a, b, c, d] = addr.ip().octets();
    let [p0, p1] = addr.port().to_be_bytes();
    [a, b, c, d, p0, p1]
}

/// The key of the backend at `addr`: [`backend_key_v4`] for IPv4; for IPv6, whose address and
/// port do not fit the 48 bits a key packs into, 48 bits of a fixed 64-bit FNV-1a hash of them
/// (every node computes the same; two backends of one set colliding, about one chance in 10^14
/// for a set of a hundred, is reported as [`MaglevError::DuplicateKey`]).
pub fn backend_key(addr: SocketAddr) -> [u8; 6] {
    match addr {
        SocketAddr::V4(v4) => backend_key_v4(v4),
        SocketAddr::V6(v6) => backend_key_v6(v6),
    }
}

fn backend_key_v6(addr: SocketAddrV6) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in addr
        .ip()
        .octets()
        .into_iter()
        .chain(addr.port().to_be_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let [_, _, a, b, c, d, e, f] = hash.to_be_bytes();
    [a, b, c, d, e, f]
}

/// Why a table could not be built. All of these are caller bugs or configuration errors: the
/// algorithm itself cannot fail on valid input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// With a composite M, skips sharing a factor with M would only ever visit part of the table.
    #[error("Maglev table size {0} is not prime")]
    NotPrime(u32),
    /// Larger tables do not fit the datapath's table map.
    #[error("Maglev table size {0} is outside {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}")]
    SizeOutOfRange(u32),
    /// There is nothing to fill the slots with; the caller must treat the service as empty.
    #[error("no Maglev backend has a nonzero weight")]
    NoBackends,
    /// Two backends with one key would share a permutation, and which of them wins a slot would
    /// depend on the input order, which differs between nodes.
    #[error("two Maglev backends have the same key ({})", key_to_addr(*.0))]
    DuplicateKey([u8; 6]),
}

/// Whether `n` is prime. Trial division is plenty: it only validates a configured table size.
pub const fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds the lookup table: `table_size` slots, each holding the `id` of a backend.
///
/// Which backend gets which slot depends only on the set of (key, weight) pairs and `table_size`,
/// not on the ids or the order of `backends`, so nodes that number endpoints differently or learn
/// of them in a different order still agree.
pub fn build_table(backends: &[MaglevBackend], table_size: u32) -> Result<Vec<u32>, MaglevError> {
    let mut table = Vec::new();
    build_table_into(backends, table_size, &mut table)?;
    Ok(table)
}

/// [`build_table`] into a caller-owned buffer, so that a full sync of thousands of services does
/// not allocate (and for large M page-fault in) a fresh table for each one. On error `table` is
/// left empty.
pub fn build_table_into(
    backends: &[MaglevBackend],
    table_size: u32,
    table: &mut Vec<u32>,
) -> Result<(), MaglevError> {
    table.clear();
    check_table_size(table_size)?;

    // Sorting by key is what makes the result independent of the input order: the order of turns
    // within a round decides which backend gets a slot that several prefer.
    let mut cursors: Vec<Cursor> = backends.iter().map(Cursor::new).collect();
    cursors.sort_unstable_by_key(|c| c.key);
    if let Some(pair) = cursors.windows(2).find(|pair| pair[0].key == pair[1].key) {
        return Err(MaglevError::DuplicateKey(unpack_key(pair[0].key)));
    }
    // Dropped before filling rather than skipped in each round, so that a weight-0 backend leaves
    // no trace at all in the table.
    cursors.retain(|c| c.weight > 0);
    let max_weight = cursors
        .iter()
        .map(|c| c.weight)
        .max()
        .ok_or(MaglevError::NoBackends)?;
    for c in &mut cursors {
        c.start(table_size);
    }

    table.resize(table_size as usize, FREE);
    populate(&mut cursors, max_weight, table);
    // The fill stores indices into `cursors` rather than ids, so that no id value needs to be
    // reserved for marking free slots.
    for slot in table.iter_mut() {
        *slot = cursors[*slot as usize].id;
    }
    Ok(())
}

/// Builds one table per backend set on all cores and hands each to `f` with its index in `sets`.
///
/// A callback rather than a `Vec` of tables, because a full sync of 10,000 services would
/// otherwise hold 10,000 tables (650 MB at the default size) at once; here each worker reuses one
/// buffer and `f` can write the table to its map straight away. `f` runs on the worker threads,
/// in no particular order.
pub fn for_each_table<S, F>(sets: &[S], table_size: u32, f: F)
where
    S: AsRef<[MaglevBackend]> + Sync,
    F: Fn(usize, Result<&[u32], MaglevError>) + Sync,
{
    let workers = thread::available_parallelism()
        .map_or(1, NonZero::get)
        .min(sets.len());
    // Handing out one set at a time balances sets of very different sizes across the workers.
    let next = AtomicUsize::new(0);
    let work = || {
        let mut table = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(set) = sets.get(index) else { break };
            let result = build_table_into(set.as_ref(), table_size, &mut table);
            f(index, result.map(|()| table.as_slice()));
        }
    };
    thread::scope(|scope| {
        for _ in 1..workers {
            scope.spawn(work);
        }
        work();
    });
}

fn check_table_size(table_size: u32) -> Result<(), MaglevError> {
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&table_size) {
        Err(MaglevError::SizeOutOfRange(table_size))
    } else if !is_prime(table_size) {
        Err(MaglevError::NotPrime(table_size))
    } else {
        Ok(())
    }
}

/// Marks a slot not yet claimed while filling. Slots then hold indices into the cursors, which
/// never come near `u32::MAX`.
const FREE: u32 = u32::MAX;

/// The widest probe block (see [`probe_phase`]).
const MAX_BLOCK: usize = 8;

/// Free slots at most left for [`tail_phase`] (it takes over at `isqrt(M)` free slots).
const MAX_TAIL: usize = MAX_TABLE_SIZE.isqrt() as usize;

/// A backend's walk through its permutation of the slots: slot j of the walk is
/// `(offset + j * skip) % M`, which visits every slot once because M is prime.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    /// The key packed big-endian into a `u64`: sorts like the bytes, compares in one instruction.
    key: u64,
    id: u32,
    weight: u32,
    /// Weight accumulated towards the next turn.
    credit: u64,
    /// The next slot of the walk to try. A slot rather than a step count, so that advancing is an
    /// add and a conditional subtract instead of a multiply and a `%`.
    next: u32,
    /// `skips[k]` is `(k + 1) * skip % M`: the offsets of the slots a probe block looks at.
    skips: [u32; MAX_BLOCK],
    /// The inverse of skip modulo M, computed only once the tail phase needs it (0: not yet).
    inverse: u32,
}

impl Cursor {
    fn new(backend: &MaglevBackend) -> Self {
        let [a, b, c, d, e, f] = backend.key;
        Self {
            key: u64::from_be_bytes([0, 0, a, b, c, d, e, f]),
            id: backend.id,
            weight: backend.weight,
            credit: 0,
            next: 0,
            skips: [0; MAX_BLOCK],
            inverse: 0,
        }
    }

    fn start(&mut self, table_size: u32) {
        let m = u64::from(table_size);
        self.next = (key_hash(self.key, OFFSET_SEED) % m) as u32;
        let skip = key_hash(self.key, SKIP_SEED) % (m - 1) + 1;
        for (k, s) in (1..).zip(&mut self.skips) {
            *s = (k * skip % m) as u32;
        }
    }

    fn skip(&self) -> u32 {
        self.skips[0]
    }
}

/// `slot + offset` wrapped into the table. The sum is below 2M, so one conditional subtract does
/// it, and the `min` form compiles to a conditional move rather than a hard-to-predict branch.
#[inline(always)]
fn advance(slot: u32, offset: u32, table_size: u32) -> u32 {
    let sum = slot + offset;
    sum.min(sum.wrapping_sub(table_size))
}

/// Hands out turns: rounds over the backends in key order, in which the backends with the largest
/// weight take every turn and the others one whenever their credit has reached that weight, so
/// that backend i takes about `weight_i / max_weight` turns per round. Rounds in which most
/// backends pass cost little, but they add up with extreme weights: one backend at `u32::MAX`
/// among 1,000 at 1 takes about 17 ms at the default size, against 0.2 ms for equal weights.
struct Rounds {
    at: usize,
    max_weight: u64,
}

impl Rounds {
    /// The index of the backend whose turn it is.
    #[inline(always)]
    fn next(&mut self, cursors: &mut [Cursor]) -> usize {
        loop {
            let index = self.at;
            self.at = if index + 1 == cursors.len() {
                0
            } else {
                index + 1
            };
            let c = &mut cursors[index];
            c.credit += u64::from(c.weight);
            if c.credit >= self.max_weight {
                c.credit -= self.max_weight;
                return index;
            }
        }
    }
}

/// Fills every slot of `table` (all FREE on entry) with an index into `cursors`.
///
/// Each turn claims the first free slot of the backend's walk, from where its last claim left
/// off: the paper's algorithm, and with equal weights exactly it, which gives every backend
/// floor(M/N) or ceil(M/N) slots. The phases below only change how that slot is found, never
/// which slot it is; they exist because filling is dominated by mispredicted branches early on
/// and by long walks over claimed slots at the end.
fn populate(cursors: &mut [Cursor], max_weight: u32, table: &mut [u32]) {
    let table_size = table.len() as u32;
    let mut rounds = Rounds {
        at: 0,
        max_weight: u64::from(max_weight),
    };
    let mut free = table_size;
    free = probe_phase::<2>(cursors, &mut rounds, table, free, table_size / 2);
    free = probe_phase::<4>(cursors, &mut rounds, table, free, table_size / 4);
    free = probe_phase::<MAX_BLOCK>(cursors, &mut rounds, table, free, table_size.isqrt());
    tail_phase(cursors, &mut rounds, table, free);
}

/// Plays turns until only `until` slots are free, each turn testing the next K slots of the walk
/// at once. With one branch per block instead of one per slot, the branch is predictable ("one of
/// them is free") until a fraction 2^(-1/K) of the table is taken: 71% for K = 2, 92% for K = 8.
/// Narrow blocks waste less work while the table is empty, hence wider blocks as it fills.
fn probe_phase<const K: usize>(
    cursors: &mut [Cursor],
    rounds: &mut Rounds,
    table: &mut [u32],
    mut free: u32,
    until: u32,
) -> u32 {
    let table_size = table.len() as u32;
    while free > until {
        let index = rounds.next(cursors);
        let c = &mut cursors[index];
        let mut slot = c.next;
        let claimed = loop {
            let mut block = [slot; K];
            for (s, &offset) in block[1..].iter_mut().zip(&c.skips) {
                *s = advance(slot, offset, table_size);
            }
            let mut free_mask = 0u32;
            for (k, &s) in block.iter().enumerate() {
                free_mask |= u32::from(table[s as usize] == FREE) << k;
            }
            if free_mask != 0 {
                break block[free_mask.trailing_zeros() as usize];
            }
            slot = advance(slot, c.skips[K - 1], table_size);
        };
        table[claimed as usize] = index as u32;
        c.next = advance(claimed, c.skip(), table_size);
        free -= 1;
    }
    free
}

/// Plays the last turns, when walks would mostly step over claimed slots (about M/F steps with F
/// slots free). Instead, each turn works out how many steps of the backend's walk every remaining
/// free slot is, `(slot - next) / skip mod M`, and claims the nearest: F multiplications instead
/// of M/F probes, cheaper once F is below about sqrt(M).
fn tail_phase(cursors: &mut [Cursor], rounds: &mut Rounds, table: &mut [u32], free: u32) {
    let table_size = table.len() as u32;
    let modulus = Modulus::new(table_size);
    let mut free_slots = [0u32; MAX_TAIL];
    let mut len = 0;
    for (slot, &value) in (0u32..).zip(table.iter()) {
        if value == FREE {
            free_slots[len] = slot;
            len += 1;
        }
    }
    debug_assert_eq!(len, free as usize);
    while len > 0 {
        let index = rounds.next(cursors);
        let c = &mut cursors[index];
        if c.inverse == 0 {
            c.inverse = mod_inverse(c.skip(), table_size);
        }
        let (mut nearest, mut steps) = (0, u32::MAX);
        for (i, &slot) in free_slots[..len].iter().enumerate() {
            let distance = advance(slot, table_size - c.next, table_size);
            let d = modulus.reduce(u64::from(distance) * u64::from(c.inverse));
            if d < steps {
                (nearest, steps) = (i, d);
            }
        }
        let claimed = free_slots[nearest];
        len -= 1;
        free_slots[nearest] = free_slots[len];
        table[claimed as usize] = index as u32;
        c.next = advance(claimed, c.skip(), table_size);
    }
}

/// Reduction modulo M without a division (Barrett): the tail phase does one per free slot per
/// turn, and a hardware divide would cost more than the probes it saves.
struct Modulus {
    m: u64,
    /// floor((2^64 - 1) / M): for x < 2^34 the quotient estimate is off by at most one.
    reciprocal: u64,
}

impl Modulus {
    fn new(m: u32) -> Self {
        Self {
            m: u64::from(m),
            reciprocal: u64::MAX / u64::from(m),
        }
    }

    /// `x % M` for `x < M * M`.
    #[inline(always)]
    fn reduce(&self, x: u64) -> u32 {
        let quotient = ((u128::from(x) * u128::from(self.reciprocal)) >> 64) as u64;
        let rest = x - quotient * self.m;
        rest.min(rest.wrapping_sub(self.m)) as u32
    }
}

/// The inverse of `a` modulo the prime `m`, by the extended Euclidean algorithm.
fn mod_inverse(a: u32, m: u32) -> u32 {
    let (mut t, mut next_t) = (0i64, 1i64);
    let (mut r, mut next_r) = (i64::from(m), i64::from(a));
    while next_r != 0 {
        let q = r / next_r;
        (t, next_t) = (next_t, t - q * next_t);
        (r, next_r) = (next_r, r - q * next_r);
    }
    t.rem_euclid(i64::from(m)) as u32
}

// Arbitrary but fixed forever: they are part of the contract between nodes (and between agent
// versions during a rolling upgrade). Changing them, or `key_hash`, reshuffles every table.
const OFFSET_SEED: u64 = u64::from_be_bytes(*b"maglevof");
const SKIP_SEED: u64 = u64::from_be_bytes(*b"maglevsk");

/// A fixed hash of the packed key. Not std's `DefaultHasher`, which is randomly seeded per
/// process and unspecified across Rust versions, so nodes would disagree. The splitmix64
/// finaliser is a bijection, so distinct keys never collide for one seed, and it mixes well
/// enough that a key's offset and skip look independent.
const fn key_hash(key: u64, seed: u64) -> u64 {
    let mut z = (key ^ seed).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn unpack_key(key: u64) -> [u8; 6] {
    let [_, _, a, b, c, d, e, f] = key.to_be_bytes();
    [a, b, c, d, e, f]
}

/// The IPv4 backend a key names (an IPv6 backend's key names no address: it reads as one).
fn key_to_addr(key: [u8; 6]) -> SocketAddrV4 {
    let [a, b, c, d, p0, p1] = key;
    SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), u16::from_be_bytes([p0, p1]))
}

#[cfg(test)]
mod tests;
