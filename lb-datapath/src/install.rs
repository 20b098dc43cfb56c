//! Writes one service (its frontends, backends and Maglev table) into the maps in the order that
//! never exposes half a service: backends, then the table, then the frontends, then the
//! frontend addresses. Removal runs in reverse.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    Be16, Be32,
    maps::{AddrInfo, Backend, Frontend, FrontendKey, addr_flags, backend_flags},
};

use crate::{
    maglev::{self, MaglevBackend},
    maps::{Maps, MapsError},
};

/// One address, port and protocol a service answers on, in one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `lb_common::maps::scope` value.
    pub scope: u8,
    /// A ClusterIP rejects ports it does not serve.
    pub cluster_ip: bool,
}

/// One backend of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// Node-local backend id (slot in the backends array; never 0).
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Runs on this node.
    pub local: bool,
    /// Maglev weight; 0 keeps the backend for existing flows but gives it no new ones.
    pub weight: u32,
}

/// A service (one backend set) and every frontend that uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Backend-set id (index of its Maglev table and counters).
    pub id: u32,
    pub frontends: Vec<FrontendSpec>,
    pub backends: Vec<BackendSpec>,
    /// Maglev table size (prime).
    pub table_size: u32,
    /// `lb_common::maps::frontend_flags` bits.
    pub flags: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("service {id}: backend id 0 is reserved")]
    ReservedBackendId { id: u32 },
    #[error("service {id}: {source}")]
    Maglev {
        id: u32,
        #[source]
        source: maglev::MaglevError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("service {id}: writing map {map} failed")]
    Write {
        id: u32,
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

impl FrontendSpec {
    pub fn key(&self) -> FrontendKey {
        FrontendKey {
            addr: Be32::from(self.addr),
            port: Be16::from_host(self.port),
            proto: self.proto,
            scope: self.scope,
        }
    }
}

impl BackendSpec {
    pub fn value(&self) -> Backend {
        let local = if self.local { backend_flags::LOCAL } else { 0 };
        Backend {
            addr: Be32::from(self.addr),
            port: Be16::from_host(self.port),
            flags: backend_flags::ACTIVE | local,
            _pad: 0,
        }
    }
}

/// The service-map value for `svc`, building and installing its Maglev table when it needs one.
fn program_table(maps: &mut Maps, svc: &ServiceSpec) -> Result<Frontend, InstallError> {
    let selectable: Vec<&BackendSpec> = svc.backends.iter().filter(|b| b.weight > 0).collect();
    let mut value = Frontend {
        set_id: svc.id,
        backend_count: selectable.len() as u32,
        flags: svc.flags,
        ..Default::default()
    };
    match selectable.as_slice() {
        [] => {}
        [only] => value.backend_id = only.id,
        many => {
            let members: Vec<MaglevBackend> = many
                .iter()
                .map(|b| MaglevBackend {
                    id: b.id,
                    key: maglev::backend_key(SocketAddrV4::new(b.addr, b.port)),
                    weight: b.weight,
                })
                .collect();
            let table = maglev::build_table(&members, svc.table_size)
                .map_err(|source| InstallError::Maglev { id: svc.id, source })?;
            maps.set_maglev_table(svc.id, &table)?;
            value.table_size = svc.table_size;
        }
    }
    Ok(value)
}

/// Installs or updates `svc`.
pub fn install(maps: &mut Maps, svc: &ServiceSpec) -> Result<(), InstallError> {
    let write = |map: &'static str| {
        move |source| InstallError::Write {
            id: svc.id,
            map,
            source,
        }
    };
    for backend in &svc.backends {
        if backend.id == 0 {
            return Err(InstallError::ReservedBackendId { id: svc.id });
        }
        maps.backends
            .set(backend.id, backend.value(), 0)
            .map_err(write("LB_BACKENDS"))?;
    }
    let value = program_table(maps, svc)?;
    for frontend in &svc.frontends {
        maps.services
            .insert(frontend.key(), value, 0)
            .map_err(write("LB_SERVICES"))?;
    }
    for frontend in &svc.frontends {
        let flags = if frontend.cluster_ip {
            addr_flags::CLUSTER_IP
        } else {
            0
        };
        maps.addrs
            .insert(Be32::from(frontend.addr), AddrInfo { flags }, 0)
            .map_err(write("LB_ADDRS"))?;
    }
    Ok(())
}

/// Removes `svc`: frontends, table, then its backends. Frontend addresses stay (other services
/// may share them); [`remove_address`] drops one once nothing uses it.
pub fn remove(maps: &mut Maps, svc: &ServiceSpec) -> Result<(), InstallError> {
    let write = |map: &'static str| {
        move |source| InstallError::Write {
            id: svc.id,
            map,
            source,
        }
    };
    for frontend in &svc.frontends {
        ignore_missing(maps.services.remove(&frontend.key())).map_err(write("LB_SERVICES"))?;
    }
    maps.remove_maglev_table(svc.id)?;
    for backend in &svc.backends {
        maps.backends
            .set(backend.id, Backend::default(), 0)
            .map_err(write("LB_BACKENDS"))?;
    }
    Ok(())
}

/// Forgets a frontend address: packets to it pass untouched again.
pub fn remove_address(maps: &mut Maps, addr: Ipv4Addr) -> Result<(), InstallError> {
    ignore_missing(maps.addrs.remove(&Be32::from(addr))).map_err(|source| InstallError::Write {
        id: 0,
        map: "LB_ADDRS",
        source,
    })
}

fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}
