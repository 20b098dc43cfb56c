//! A small test helper over the planner and writer: programs services described in a few plain
//! fields through [`planner::plan`] and [`writer::write`], the way the agent's reconcile step
//! does, so that the datapath tests, `lbctl`'s tests and the benchmark write the maps exactly as
//! the agent would (ids, table sizes, write order, node configuration) and never through a second
//! path of their own.
//!
//! As in the agent: the first [`Services::apply`] reads the maps back ([`adopt`]) and plans
//! everything ([`Extent::All`]); later ones plan only what was staged since ([`Extent::Only`]);
//! a failed write drops the shadow, so that the next call starts over from the maps.
//!
//! The planner hands out the ids (backend-set ids, backend slots, source-range ids) and picks
//! each set's Maglev table size; [`Services::set_id`], [`Services::backend_id`] and
//! [`Services::table_size`] say what it chose.
//!
//! Each [`ServiceSpec`] is one backend set and every frontend that uses it; it stands for what
//! the agent's translation makes of one port of a Service.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
};

use ipnet::Ipv4Net;
use lb_common::{
    maps::{Frontend, FrontendKey, capacity},
    net::proto,
};

pub use crate::model::FrontendKind;
use crate::{
    adopt,
    loader::Capacities,
    maps::{Maps, MapsError},
    model::{AnyFrontendKey, Desired, DesiredBackend, DesiredFrontend, SetKind, SetName},
    planner::{self, Extent, Limits, Programmed, Scope},
    writer::{self, WriteError},
};

/// The namespace every helper-programmed set is named in (the maps never show it).
const NAMESPACE: &str = "default";

/// One address, port and protocol a service answers on, in one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `lb_common::maps::scope` value.
    pub scope: u8,
    /// A ClusterIP rejects ports it does not serve; the other kinds let them pass.
    pub kind: FrontendKind,
}

impl FrontendSpec {
    pub const fn key(&self) -> FrontendKey {
        FrontendKey::new(self.addr, self.port, self.proto, self.scope)
    }
}

/// One backend of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddrV4,
    /// Runs on this node.
    pub local: bool,
    /// 0 keeps the backend for its established flows but gives it no new one (a terminating
    /// endpoint); anything else takes new flows (the planner knows no other weight).
    pub weight: u32,
}

impl BackendSpec {
    /// A backend on this node that takes new flows.
    pub const fn local(addr: SocketAddrV4) -> Self {
        Self {
            addr,
            local: true,
            weight: 1,
        }
    }
}

/// A service: one backend set and every frontend that uses it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Names the backend set; unique among the services of one [`Services`].
    pub name: String,
    pub frontends: Vec<FrontendSpec>,
    pub backends: Vec<BackendSpec>,
    /// Without usable backends, drop instead of rejecting (externalTrafficPolicy Local).
    pub drop_when_empty: bool,
    /// External TCP flows to backends on other nodes go by direct server return
    /// (`lb_common::dsr`) rather than source NAT.
    pub dsr: bool,
    /// `--masquerade-all` leaves the flows of its frontends their client (the external
    /// addresses of a Service with externalTrafficPolicy Local).
    pub keeps_client: bool,
    /// sessionAffinity ClientIP timeout; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// Sources allowed on every frontend (loadBalancerSourceRanges); empty allows everyone.
    pub source_ranges: Vec<Ipv4Net>,
    /// `Some(other)`: this is the Local set of the same Service port as service `other` (the
    /// agent's set for externalTrafficPolicy or internalTrafficPolicy Local), rather than a set
    /// of its own: the two share session affinity.
    pub local_of: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("frontend {key} already belongs to service {owner}")]
    Claimed { key: AnyFrontendKey, owner: String },
    #[error("reading the maps back failed")]
    Adopt(#[source] MapsError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("frontend {key} was left out: {reason}")]
    Overflow { key: AnyFrontendKey, reason: String },
}

/// What one service put into the desired state, to take it out again.
#[derive(Clone, Debug)]
struct Entry {
    set: SetName,
    frontends: Vec<AnyFrontendKey>,
}

/// The services programmed so far, the desired state they make, and the planner's shadow of the
/// maps.
#[derive(Debug)]
pub struct Services {
    limits: Limits,
    desired: Desired,
    entries: BTreeMap<String, Entry>,
    /// What changed since the last [`Services::apply`].
    scope: Scope,
    /// `None` until the first apply reads the maps back, and after a failed write.
    programmed: Option<Programmed>,
}

impl Default for Services {
    /// The agent's defaults: map capacities of [`Capacities::default`], Maglev tables up to
    /// [`crate::maglev::DEFAULT_TABLE_SIZE`] slots.
    fn default() -> Self {
        Self::new(Capacities::default(), crate::maglev::DEFAULT_TABLE_SIZE)
    }
}

impl Services {
    /// Services for a datapath loaded with `capacities`, with Maglev tables of at most
    /// `table_size` slots (the agent's `--maglev-table-size`).
    pub fn new(capacities: Capacities, table_size: u32) -> Self {
        // As the agent derives them from its flags.
        let limits = Limits {
            backends: capacity::BACKENDS,
            set_ids: capacities.sets,
            frontends: capacity::SERVICES,
            addrs: capacity::ADDRS,
            ranges: capacity::SRC_RANGES,
            table_size,
        };
        Self {
            limits,
            desired: Desired::default(),
            entries: BTreeMap::new(),
            scope: Scope::default(),
            programmed: None,
        }
    }

    /// Stages the node's SNAT address and ports (`None`: the default range), as the agent takes
    /// them from its Node object and `--snat-ports`. The planner always programs the hairpin
    /// address [`lb_common::maps::hairpin::DEFAULT_ADDR`] beside them.
    pub fn set_node(
        &mut self,
        snat_addr: Option<Ipv4Addr>,
        snat_ports: Option<RangeInclusive<u16>>,
    ) {
        self.desired.snat_addr = snat_addr;
        self.desired.snat_ports = snat_ports;
    }

    /// Stages the node's flags ([`lb_common::maps::node_flags`]): `--masquerade-all`, and
    /// whether ClusterIPs reject flows from outside (`--external-cluster-ips=false`).
    pub fn set_node_flags(&mut self, masquerade_all: bool, no_external_cluster_ips: bool) {
        self.desired.masquerade_all = masquerade_all;
        self.desired.no_external_cluster_ips = no_external_cluster_ips;
    }

    /// Stages `svc`, adding it or replacing the service of the same name.
    pub fn set(&mut self, svc: &ServiceSpec) -> Result<(), ProgramError> {
        for f in &svc.frontends {
            let key = f.key().into();
            if let Some(owner) = self.desired.frontends.get(&key)
                && owner.set.service != svc.name
            {
                return Err(ProgramError::Claimed {
                    key,
                    owner: owner.set.service.clone(),
                });
            }
        }
        self.remove(&svc.name);
        // The set's protocol only decides whether UDP flows to a backend that leaves are purged
        // (as kube-proxy flushes UDP conntrack): that of the first frontend.
        let l4 = svc.frontends.first().map_or(proto::TCP, |f| f.proto);
        let set = match &svc.local_of {
            None => SetName::new(NAMESPACE, svc.name.as_str(), "", l4, SetKind::Cluster),
            Some(other) => SetName::new(NAMESPACE, other.as_str(), "", l4, SetKind::Local),
        };
        let mut members: Vec<DesiredBackend> = svc
            .backends
            .iter()
            .map(|b| DesiredBackend {
                addr: b.addr.into(),
                local: b.local,
                weight: u32::from(b.weight > 0),
                // Listed: serving. (Its UDP flows go when it leaves the set.)
                serving: true,
            })
            .collect();
        members.sort_unstable();
        self.desired.sets.insert(set.clone(), members.into());
        // Sorted as adoption reads them back, so that a list compares equal to its own.
        let mut source_ranges = svc.source_ranges.clone();
        source_ranges.sort_unstable();
        for f in &svc.frontends {
            let key = f.key().into();
            self.desired.frontends.insert(
                key,
                DesiredFrontend {
                    key,
                    kind: f.kind,
                    set: set.clone(),
                    drop_when_empty: svc.drop_when_empty,
                    dsr: svc.dsr,
                    keeps_client: svc.keeps_client,
                    affinity_timeout_s: svc.affinity_timeout_s,
                    source_ranges: source_ranges.clone(),
                },
            );
            self.scope.frontends.insert(key);
        }
        self.scope.sets.insert(set.clone());
        self.entries.insert(
            svc.name.clone(),
            Entry {
                set,
                frontends: svc.frontends.iter().map(|f| f.key().into()).collect(),
            },
        );
        Ok(())
    }

    /// Stages the removal of the service `name` (nothing when there is none).
    pub fn remove(&mut self, name: &str) {
        let Some(entry) = self.entries.remove(name) else {
            return;
        };
        for key in entry.frontends {
            self.desired.frontends.remove(&key);
            self.scope.frontends.insert(key);
        }
        self.desired.sets.remove(&entry.set);
        self.scope.sets.insert(entry.set);
    }

    /// Plans what was staged and writes it.
    pub fn apply(&mut self, maps: &mut Maps) -> Result<(), ProgramError> {
        let scope = std::mem::take(&mut self.scope);
        let (mut programmed, extent) = match self.programmed.take() {
            Some(p) => (p, Extent::Only(&scope)),
            None => (
                adopt::adopt(maps, &self.desired, &self.limits).map_err(ProgramError::Adopt)?,
                Extent::All,
            ),
        };
        let plan = planner::plan(&self.desired, &mut programmed, &self.limits, extent);
        writer::write(maps, &plan)?;
        self.programmed = Some(programmed);
        match plan.overflow.into_iter().next() {
            Some((key, reason)) => Err(ProgramError::Overflow { key, reason }),
            None => Ok(()),
        }
    }

    /// Stages `svc` and applies it: what a test usually wants.
    pub fn program(&mut self, maps: &mut Maps, svc: &ServiceSpec) -> Result<(), ProgramError> {
        self.set(svc)?;
        self.apply(maps)
    }

    /// The backend-set id of the service `name` (its Maglev table's and counters' index).
    pub fn set_id(&self, name: &str) -> Option<u32> {
        Some(self.programmed_set(name)?.id)
    }

    /// The size of the Maglev table of the service `name`; 0 when it has none (fewer than two
    /// backends take new flows).
    pub fn table_size(&self, name: &str) -> Option<u32> {
        Some(self.programmed_set(name)?.table_size)
    }

    /// The backend id (slot in LB_BACKENDS) of the backend at `addr`.
    pub fn backend_id(&self, addr: SocketAddrV4) -> Option<u32> {
        Some(self.programmed.as_ref()?.backends.get(&addr.into())?.id)
    }

    /// The address of backend `id`.
    pub fn backend_addr(&self, id: u32) -> Option<SocketAddrV4> {
        self.programmed
            .as_ref()?
            .backends
            .iter()
            .find(|(_, b)| b.id == id)
            .and_then(|(addr, _)| match addr {
                std::net::SocketAddr::V4(v4) => Some(*v4),
                std::net::SocketAddr::V6(_) => None,
            })
    }

    /// The LB_SERVICES value programmed for `key`.
    pub fn frontend(&self, key: &FrontendKey) -> Option<&Frontend> {
        let key = AnyFrontendKey::from(*key);
        Some(&self.programmed.as_ref()?.frontends.get(&key)?.value)
    }

    fn programmed_set(&self, name: &str) -> Option<&planner::SetState> {
        let set = &self.entries.get(name)?.set;
        self.programmed.as_ref()?.sets.get(set)
    }
}
