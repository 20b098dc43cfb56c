//! What the datapath will do with a packet, predicted from the live maps with the same rules and
//! the same flow hash as the kernel programs (`lbctl trace`, tests and benchmarks use it).
//!
//! The forward path follows `lb-ebpf/src/forward.rs` and `select.rs` step by step:
//!
//! ```text
//! LB_ADDRS[dst]                      miss -> NotAFrontend
//! LB_CT[client -> frontend]          live, backend still there -> Established
//! LB_SERVICES[dst, port, proto, scope]
//!                                    miss -> RejectUnknownPort (ClusterIP) / PassNotServed
//! backend_count == 0                 -> NoBackend (reject, or drop by policy)
//! source_range_id != 0 and LB_SRC_RANGES misses -> DropSourceRange
//! affinity_timeout_s != 0 and LB_AFFINITY[client, service] fresh, backend active -> Affinity
//! else Maglev slot hash % M (or the single backend); backend not active -> Inconsistent
//! ```
//!
//! Prediction only reads maps: it never refreshes an entry the way the datapath does.

use std::net::SocketAddrV4;

use aya::maps::{MapError, lpm_trie::Key};
use lb_common::{
    Be16, Be32,
    conntrack::{CtEntry, FORWARD, FlowKey, REPLY, ct_flags},
    hash::flow_hash,
    maps::{
        self as names, AffinityKey, Backend, Service, ServiceKey, SourceRange, addr_flags,
        service_flags,
    },
    net::proto,
};

use crate::maps::{Maps, MapsError};

const SECOND_NS: u64 = 1_000_000_000;

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

/// The forward path's decision for a TCP or UDP packet from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forward {
    /// The destination carries no frontend: the packet passes untouched.
    NotAFrontend,
    /// A frontend address, but not this port or protocol, and not a ClusterIP: passes.
    PassNotServed,
    /// A ClusterIP on a port or protocol it does not serve: rejected.
    RejectUnknownPort,
    /// A new flow from a source outside the frontend's loadBalancerSourceRanges: dropped.
    DropSourceRange { service: Service },
    /// The frontend has no backend: rejected (RST / ICMP port unreachable) or dropped.
    NoBackend { service: Service, drop: bool },
    /// An established flow: DNAT to the backend recorded in conntrack.
    Established {
        /// The backend set the flow was balanced by (from its conntrack entry).
        service_id: u32,
        backend_id: u32,
        backend: SocketAddrV4,
        /// The flow's forward conntrack entry.
        entry: CtEntry,
    },
    /// A new flow: affinity, Maglev or the single backend picks the backend. When the service
    /// has session affinity, the datapath also records (or refreshes) the client's entry.
    NewFlow {
        service: Service,
        selection: Selection,
        backend_id: u32,
        backend: SocketAddrV4,
    },
    /// The service names a table or backend that is missing: dropped.
    Inconsistent { service: Service, detail: String },
}

/// The reply path's decision for a packet from a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Not a reply of a load-balanced flow (or its entry expired): untouched.
    NotTracked,
    /// Source rewritten to the frontend.
    ReverseNat {
        frontend: SocketAddrV4,
        service_id: u32,
        backend_id: u32,
        /// The flow's reply conntrack entry.
        entry: CtEntry,
    },
}

pub fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, l4_proto: u8, dir: u8) -> FlowKey {
    FlowKey {
        src_addr: Be32::from(*src.ip()),
        dst_addr: Be32::from(*dst.ip()),
        src_port: Be16::from_host(src.port()),
        dst_port: Be16::from_host(dst.port()),
        proto: l4_proto,
        dir,
        _pad: [0; 2],
    }
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
fn found<V>(name: &'static str, result: Result<V, MapError>) -> Result<Option<V>, MapsError> {
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

/// Whether a new flow from `src` may use `service` (loadBalancerSourceRanges).
pub fn source_allowed(maps: &Maps, service: &Service, src: Be32) -> Result<bool, MapsError> {
    if service.source_range_id == 0 {
        return Ok(true);
    }
    let key = Key::new(
        SourceRange::LOOKUP_BITS,
        SourceRange {
            range_id: Be32::from_host(service.source_range_id),
            addr: src,
        },
    );
    Ok(found(names::LB_SRC_RANGES, maps.src_ranges.get(&key, 0))?.is_some())
}

/// The forward decision for `src -> dst` (TCP or UDP) arriving in `scope`. `syn` says whether
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
    let Some(addr) = found(names::LB_ADDRS, maps.addrs.get(&Be32::from(*dst.ip()), 0))? else {
        return Ok(Forward::NotAFrontend);
    };
    let key = flow_key(src, dst, l4_proto, FORWARD);
    let now = coarse_now_ns();
    if let Some(entry) = found(names::LB_CT, maps.ct.get(&key, 0))? {
        let closed = entry.flags & (ct_flags::FIN | ct_flags::RST) != 0;
        let reopening = l4_proto == proto::TCP && syn && closed;
        // The backend must still hold the slot (same address and port) for the flow to stay.
        if now < entry.deadline_ns
            && !reopening
            && let Some(backend) = active_backend(maps, entry.backend_id)?
            && backend.addr == entry.nat_addr
            && backend.port == entry.nat_port
        {
            return Ok(Forward::Established {
                service_id: entry.service_id,
                backend_id: entry.backend_id,
                backend: socket(backend.addr, backend.port),
                entry,
            });
        }
    }
    let service_key = ServiceKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: l4_proto,
        scope,
    };
    let Some(service) = found(names::LB_SERVICES, maps.services.get(&service_key, 0))? else {
        return Ok(if addr.flags & addr_flags::CLUSTER_IP != 0 {
            Forward::RejectUnknownPort
        } else {
            Forward::PassNotServed
        });
    };
    // As the datapath (and kube-proxy): a service without endpoints rejects everyone; source
    // ranges only filter who may reach the endpoints it has.
    if service.backend_count == 0 {
        return Ok(Forward::NoBackend {
            service,
            drop: service.flags & service_flags::DROP_WHEN_EMPTY != 0,
        });
    }
    if !source_allowed(maps, &service, key.src_addr)? {
        return Ok(Forward::DropSourceRange { service });
    }
    if service.affinity_timeout_s != 0 {
        let affinity_key = AffinityKey {
            client: key.src_addr,
            service_id: service.id,
        };
        if let Some(entry) = found(names::LB_AFFINITY, maps.affinity.get(&affinity_key, 0))? {
            let timeout_ns = u64::from(service.affinity_timeout_s) * SECOND_NS;
            // Within the timeout and still active; otherwise Maglev decides (and the datapath
            // overwrites the entry).
            if now < entry.last_used_ns.saturating_add(timeout_ns)
                && let Some(b) = active_backend(maps, entry.backend_id)?
            {
                return Ok(Forward::NewFlow {
                    service,
                    selection: Selection::Affinity {
                        last_used_ns: entry.last_used_ns,
                        timeout_s: service.affinity_timeout_s,
                    },
                    backend_id: entry.backend_id,
                    backend: socket(b.addr, b.port),
                });
            }
        }
    }
    let (selection, backend_id) = if service.table_size == 0 {
        (Selection::Single, service.backend_id)
    } else {
        let hash = flow_hash(
            key.src_addr,
            key.dst_addr,
            key.src_port,
            key.dst_port,
            l4_proto,
        );
        let slot = hash % service.table_size;
        let table = match maps.maglev_table(service.id, service.table_size) {
            Ok(table) => table,
            Err(e) => {
                return Ok(Forward::Inconsistent {
                    service,
                    detail: e.to_string(),
                });
            }
        };
        let selection = Selection::Maglev {
            hash,
            slot,
            table_size: service.table_size,
        };
        (selection, table[slot as usize])
    };
    match active_backend(maps, backend_id)? {
        Some(b) => Ok(Forward::NewFlow {
            service,
            selection,
            backend_id,
            backend: socket(b.addr, b.port),
        }),
        None => Ok(Forward::Inconsistent {
            service,
            detail: format!("backend id {backend_id} is not an active backend"),
        }),
    }
}

/// The reply decision for `src -> dst` (a backend answering a client).
pub fn reply(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
) -> Result<Reply, MapsError> {
    let key = flow_key(src, dst, l4_proto, REPLY);
    Ok(match found(names::LB_CT, maps.ct.get(&key, 0))? {
        Some(entry) if coarse_now_ns() < entry.deadline_ns => Reply::ReverseNat {
            frontend: socket(entry.nat_addr, entry.nat_port),
            service_id: entry.service_id,
            backend_id: entry.backend_id,
            entry,
        },
        _ => Reply::NotTracked,
    })
}

/// Parses `tcp` / `udp`.
pub fn parse_proto(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "tcp" => Some(proto::TCP),
        "udp" => Some(proto::UDP),
        _ => None,
    }
}
