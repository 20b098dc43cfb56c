//! Backend selection for a new flow: sessionAffinity first (a client sticks to the backend it
//! last got, within the frontend's timeout), else the backend set's Maglev table indexed by the
//! flow hash (or its single backend).

use lb_common::{
    Be32,
    maps::{
        AffinityEntry, AffinityKey, Backend, BackendOf, Frontend, SourceRange, maglev::CHUNK_SLOTS,
    },
};

use crate::{
    family::Family,
    maps::{LB_AFFINITY, LB_AFFINITY_SCOPE, LB_MAGLEV, LB_SRC_RANGES},
};

/// Whether a new connection from `client` may use `frontend` (loadBalancerSourceRanges).
#[inline(always)]
pub fn source_allowed(frontend: &Frontend, client: Be32) -> bool {
    if !frontend.has_source_ranges() {
        return true;
    }
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        SourceRange::LOOKUP_BITS,
        SourceRange::lookup(frontend, client),
    );
    LB_SRC_RANGES.get(&key).is_some()
}

/// The Maglev (or single) backend id for a new flow of `frontend` whose hash `hash` computes
/// (only when there is a table), or `None` when its table is missing (the agent writes tables
/// before frontends, so only tampering gets here).
#[inline(always)]
fn maglev_backend(frontend: &Frontend, hash: impl FnOnce() -> u32) -> Option<u32> {
    if !frontend.has_table() {
        return Some(frontend.backend_id);
    }
    let slot = frontend.slot(hash());
    let chunk = LB_MAGLEV.get_value(frontend.set_id, &(slot / CHUNK_SLOTS))?;
    chunk.get((slot % CHUNK_SLOTS) as usize).copied()
}

#[inline(always)]
fn active_backend<A: Family>(id: u32) -> Option<BackendOf<A>> {
    A::backend(id).filter(BackendOf::is_active)
}

/// The backend Maglev (or the single backend) gives a new connection of `frontend` whose hash
/// `hash` computes, without session affinity: (id, backend). The packet path's flows and the
/// socket programs' `connect()`s both pick their backend here.
#[inline(always)]
pub fn balanced<A: Family>(
    frontend: &Frontend,
    hash: impl FnOnce() -> u32,
) -> Option<(u32, BackendOf<A>)> {
    let id = maglev_backend(frontend, hash)?;
    Some((id, active_backend(id)?))
}

/// The backend for a new connection of `frontend` from `client`, whose Maglev hash `hash`
/// computes (the flow's, or a socket's): (id, backend). Session affinity keys on `client`, so
/// the packet path and the socket programs share a client's entries.
#[inline(always)]
pub fn backend(
    frontend: &Frontend,
    client: Be32,
    hash: impl FnOnce() -> u32,
    now: u64,
) -> Option<(u32, Backend)> {
    if frontend.affinity_timeout_s == 0 {
        return balanced(frontend, hash);
    }
    // A Local set shares its Cluster set's entries (one read, for affinity frontends only).
    let scope = LB_AFFINITY_SCOPE
        .get(frontend.set_id)
        .copied()
        .unwrap_or_default();
    let key = AffinityKey::of(client, frontend.set_id, scope);
    if let Some(entry) = LB_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: map value from a successful lookup.
        let known = unsafe { *entry };
        if known.fresh(frontend.affinity_timeout_s, now)
            && let Some(backend) = active_backend(known.backend_id)
            && key.serves(frontend.set_id, &backend)
        {
            // Every new connection refreshes the affinity (kube-proxy's `recent --update`).
            // SAFETY: as above.
            unsafe { (*entry).last_used_ns = now };
            return Some((known.backend_id, backend));
        }
    }
    let (id, backend) = balanced(frontend, hash)?;
    // Best effort: without the entry the next connection is balanced by Maglev again.
    let _ = LB_AFFINITY.insert(
        &key,
        &AffinityEntry {
            last_used_ns: now,
            backend_id: id,
            _pad: 0,
        },
        0,
    );
    Some((id, backend))
}
