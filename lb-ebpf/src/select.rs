//! Backend selection for a new flow: sessionAffinity first (a client sticks to the backend it
//! last got, within the service's timeout), else the service's Maglev table indexed by the flow
//! hash (or its single backend).

use lb_common::{
    conntrack::FlowKey,
    hash::flow_hash,
    maps::{AffinityEntry, AffinityKey, Backend, Frontend, SourceRange, maglev::CHUNK_SLOTS},
};

use crate::maps::{LB_AFFINITY, LB_BACKENDS, LB_MAGLEV, LB_SRC_RANGES};

const SECOND_NS: u64 = 1_000_000_000;

/// Whether a new flow from `flow.src_addr` may use `frontend` (loadBalancerSourceRanges).
#[inline(always)]
pub fn source_allowed(frontend: &Frontend, flow: &FlowKey) -> bool {
    if frontend.source_range_id == 0 {
        return true;
    }
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        SourceRange::LOOKUP_BITS,
        SourceRange {
            range_id: lb_common::Be32::from_host(frontend.source_range_id),
            addr: flow.src_addr,
        },
    );
    LB_SRC_RANGES.get(&key).is_some()
}

/// The Maglev (or single) backend id for a new flow of `frontend`, or `None` when the service's table
/// is missing (the agent writes tables before services, so only tampering gets here).
#[inline(always)]
fn maglev_backend(frontend: &Frontend, flow: &FlowKey) -> Option<u32> {
    if frontend.table_size == 0 {
        return Some(frontend.backend_id);
    }
    let hash = flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    );
    let slot = hash % frontend.table_size;
    let chunk = LB_MAGLEV.get_value(frontend.set_id, &(slot / CHUNK_SLOTS))?;
    chunk.get((slot % CHUNK_SLOTS) as usize).copied()
}

#[inline(always)]
fn active_backend(id: u32) -> Option<Backend> {
    LB_BACKENDS.get(id).copied().filter(Backend::is_active)
}

/// The backend for a new flow of `frontend`: (id, backend).
#[inline(always)]
pub fn backend(frontend: &Frontend, flow: &FlowKey, now: u64) -> Option<(u32, Backend)> {
    if frontend.affinity_timeout_s == 0 {
        let id = maglev_backend(frontend, flow)?;
        return Some((id, active_backend(id)?));
    }
    let key = AffinityKey {
        client: flow.src_addr,
        set_id: frontend.set_id,
    };
    if let Some(entry) = LB_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: map value from a successful lookup.
        let (last_used, id) = unsafe { ((*entry).last_used_ns, (*entry).backend_id) };
        if now < last_used + frontend.affinity_timeout_s as u64 * SECOND_NS {
            if let Some(backend) = active_backend(id) {
                // Every new connection refreshes the affinity (kube-proxy's `recent --update`).
                // SAFETY: as above.
                unsafe { (*entry).last_used_ns = now };
                return Some((id, backend));
            }
        }
    }
    let id = maglev_backend(frontend, flow)?;
    let backend = active_backend(id)?;
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
