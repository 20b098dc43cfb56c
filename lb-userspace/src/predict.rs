//! What the datapath will do with a packet, predicted from the live maps with the same rules and
//! the same flow hash as the kernel programs (`lbctl trace`, tests and benchmarks use it).

use std::net::SocketAddrV4;

use lb_common::{
    Be16, Be32,
    conntrack::{FORWARD, FlowKey, REPLY},
    hash::flow_hash,
    maps::{Backend, Service, ServiceKey, addr_flags, service_flags},
    net::proto,
};

use crate::maps::{Maps, MapsError};

/// The forward path's decision for a TCP or UDP packet from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forward {
    /// The destination carries no frontend: the packet passes untouched.
    NotAFrontend,
    /// A frontend address, but not this port or protocol, and not a ClusterIP: passes.
    PassNotServed,
    /// A ClusterIP on a port or protocol it does not serve: rejected.
    RejectUnknownPort,
    /// The frontend has no backend: rejected (RST / ICMP port unreachable) or dropped.
    NoBackend { service: Service, drop: bool },
    /// An established flow: DNAT to the backend recorded in conntrack.
    Established {
        backend_id: u32,
        backend: SocketAddrV4,
    },
    /// A new flow: Maglev (or the single backend) picks the backend.
    NewFlow {
        service: Service,
        slot: Option<u32>,
        backend_id: u32,
        backend: SocketAddrV4,
    },
    /// The service names a table or backend that is missing: dropped.
    Inconsistent { service: Service },
}

/// The reply path's decision for a packet from a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Not a reply of a load-balanced flow: untouched.
    NotTracked,
    /// Source rewritten to the frontend.
    ReverseNat { frontend: SocketAddrV4 },
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
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn live_backend(maps: &Maps, id: u32) -> Result<Option<Backend>, MapsError> {
    match maps.backends.get(&id, 0) {
        Ok(b) if b.is_active() => Ok(Some(b)),
        Ok(_) => Ok(None),
        Err(e) => Err(MapsError::Map {
            name: lb_common::maps::LB_BACKENDS,
            source: e,
        }),
    }
}

/// The forward decision for `src -> dst` (TCP or UDP) arriving in `scope`. `syn` says whether
/// the packet is a bare TCP SYN (which reopens a closed flow).
pub fn forward(
    maps: &Maps,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    l4_proto: u8,
    scope: u8,
    syn: bool,
) -> Result<Forward, MapsError> {
    let Ok(addr) = maps.addrs.get(&Be32::from(*dst.ip()), 0) else {
        return Ok(Forward::NotAFrontend);
    };
    let key = flow_key(src, dst, l4_proto, FORWARD);
    if let Ok(entry) = maps.ct.get(&key, 0) {
        let closed = entry.flags
            & (lb_common::conntrack::ct_flags::FIN | lb_common::conntrack::ct_flags::RST)
            != 0;
        if coarse_now_ns() < entry.deadline_ns && !(syn && closed) {
            if let Some(backend) = live_backend(maps, entry.backend_id)? {
                if backend.addr == entry.nat_addr && backend.port == entry.nat_port {
                    return Ok(Forward::Established {
                        backend_id: entry.backend_id,
                        backend: socket(backend.addr, backend.port),
                    });
                }
            }
        }
    }
    let service_key = ServiceKey {
        addr: key.dst_addr,
        port: key.dst_port,
        proto: l4_proto,
        scope,
    };
    let Ok(service) = maps.services.get(&service_key, 0) else {
        return Ok(if addr.flags & addr_flags::CLUSTER_IP != 0 {
            Forward::RejectUnknownPort
        } else {
            Forward::PassNotServed
        });
    };
    if service.backend_count == 0 {
        return Ok(Forward::NoBackend {
            service,
            drop: service.flags & service_flags::DROP_WHEN_EMPTY != 0,
        });
    }
    let (slot, backend_id) = if service.table_size == 0 {
        (None, service.backend_id)
    } else {
        let hash = flow_hash(
            key.src_addr,
            key.dst_addr,
            key.src_port,
            key.dst_port,
            l4_proto,
        );
        let slot = hash % service.table_size;
        let Ok(table) = maps.maglev_table(service.id, service.table_size) else {
            return Ok(Forward::Inconsistent { service });
        };
        (Some(slot), table[slot as usize])
    };
    match live_backend(maps, backend_id)? {
        Some(b) => Ok(Forward::NewFlow {
            service,
            slot,
            backend_id,
            backend: socket(b.addr, b.port),
        }),
        None => Ok(Forward::Inconsistent { service }),
    }
}

/// The reply decision for `src -> dst` (a backend answering a client).
pub fn reply(maps: &Maps, src: SocketAddrV4, dst: SocketAddrV4, l4_proto: u8) -> Reply {
    match maps.ct.get(&flow_key(src, dst, l4_proto, REPLY), 0) {
        Ok(entry) if coarse_now_ns() < entry.deadline_ns => Reply::ReverseNat {
            frontend: socket(entry.nat_addr, entry.nat_port),
        },
        _ => Reply::NotTracked,
    }
}

/// Parses `tcp` / `udp`.
pub fn parse_proto(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "tcp" => Some(proto::TCP),
        "udp" => Some(proto::UDP),
        _ => None,
    }
}
