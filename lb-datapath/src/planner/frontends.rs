//! Frontends (`LB_SERVICES`): written when their value changes, removed with the references
//! they hold on their address and source ranges.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::maps::{AddrInfo, Frontend, frontend_flags};

use super::{
    FrontendState, Plan, Programmed, reference_range, table_digest, touch, unreference_range,
};
use crate::model::{AnyFrontendKey, DesiredBackend, DesiredFrontend, FrontendKind};

pub(super) fn upsert_frontend(
    f: &DesiredFrontend,
    current: &mut Programmed,
    plan: &mut Plan,
    touched: &mut BTreeMap<IpAddr, Option<AddrInfo>>,
) {
    let key = f.key;
    let Some(set) = current.sets.get(&f.set) else {
        return;
    };
    let selectable: Vec<&DesiredBackend> = set.members.iter().filter(|b| b.selectable()).collect();
    let backend_id = match selectable.as_slice() {
        [only] => current.backends[&only.addr].id,
        _ => 0,
    };
    let (set_id, count, size, digest) = (
        set.id,
        selectable.len() as u32,
        set.table_size,
        table_digest(&set.members, set.table_size),
    );
    let old = current.frontends.get(&key).cloned();
    let old_range = old.as_ref().map_or(0, |o| o.value.source_range_id);
    let range_id = match current.ranges.get(&old_range) {
        Some(r) if r.nets == f.source_ranges => old_range,
        _ => {
            let id = reference_range(&f.source_ranges, current, plan);
            if old_range != 0 {
                unreference_range(old_range, current, plan);
            }
            id
        }
    };
    let value = Frontend {
        set_id,
        backend_count: count,
        backend_id,
        table_size: size,
        flags: frontend_flags_of(f),
        affinity_timeout_s: f.affinity_timeout_s,
        source_range_id: range_id,
        table_digest: digest,
    };
    let cluster_ip = f.kind == FrontendKind::ClusterIp;
    let addr = key.addr();
    touch(addr, current, touched);
    let state = current.addrs.entry(addr).or_default();
    match &old {
        None => {
            state.refs += 1;
            state.cluster_refs += u32::from(cluster_ip);
        }
        Some(o) if o.cluster_ip != cluster_ip => {
            state.cluster_refs = if cluster_ip {
                state.cluster_refs + 1
            } else {
                state.cluster_refs.saturating_sub(1)
            };
        }
        Some(_) => {}
    }
    if old.as_ref().is_none_or(|o| o.value != value) {
        plan.frontends.push((key, value));
    }
    current.frontends.insert(
        key,
        FrontendState {
            value,
            set: Some(f.set.clone()),
            cluster_ip,
        },
    );
}

pub(super) fn remove_frontend(
    key: &AnyFrontendKey,
    current: &mut Programmed,
    plan: &mut Plan,
    touched: &mut BTreeMap<IpAddr, Option<AddrInfo>>,
) {
    if !current.frontends.contains_key(key) {
        return;
    }
    touch(key.addr(), current, touched);
    let old = current.frontends.remove(key).expect("checked above");
    plan.frontends_removed.push(*key);
    if old.value.source_range_id != 0 {
        unreference_range(old.value.source_range_id, current, plan);
    }
    if let Some(state) = current.addrs.get_mut(&key.addr()) {
        state.refs = state.refs.saturating_sub(1);
        if old.cluster_ip {
            state.cluster_refs = state.cluster_refs.saturating_sub(1);
        }
    }
}

/// The datapath's flags for the desired frontend `f`.
fn frontend_flags_of(f: &DesiredFrontend) -> u32 {
    let mut flags = 0;
    if f.drop_when_empty {
        flags |= frontend_flags::DROP_WHEN_EMPTY;
    }
    if f.dsr {
        flags |= frontend_flags::DSR;
    }
    if f.keeps_client {
        flags |= frontend_flags::KEEPS_CLIENT;
    }
    flags
}
