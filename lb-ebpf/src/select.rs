//! Backend selection for a new flow: the service's Maglev table indexed by the flow hash.

use lb_common::{
    conntrack::FlowKey,
    hash::flow_hash,
    maps::{Service, maglev::CHUNK_SLOTS},
};

use crate::maps::LB_MAGLEV;

/// The backend id for a new flow of `svc`, or `None` when the service's table is missing (the
/// agent writes tables before services, so this only happens if the maps were tampered with).
#[inline(always)]
pub fn backend_id(svc: &Service, flow: &FlowKey) -> Option<u32> {
    if svc.table_size == 0 {
        return Some(svc.backend_id);
    }
    let hash = flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    );
    let slot = hash % svc.table_size;
    let chunk = LB_MAGLEV.get_value(svc.id, &(slot / CHUNK_SLOTS))?;
    chunk.get((slot % CHUNK_SLOTS) as usize).copied()
}
