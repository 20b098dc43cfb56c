//! The whole desired state, kept up to date one Service at a time: replacing a Service's
//! translation touches only its frontends and backend sets (and those of a Service it contests a
//! frontend with), and records what it touched so that the planner looks at nothing else.
//!
//! A frontend claimed by two Services goes to the older one (then the smaller namespace/name);
//! the other's claim is reported and waits: if the winner lets the frontend go, it moves over.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use lb_datapath::{
    model::{AnyFrontendKey, Desired, DesiredFrontend, ServiceModel, SetName},
    planner::Scope,
};

use crate::{
    source::{Kind, ObjectKey, store::ServiceId},
    translate::Problem,
};

/// Orders claims on a frontend: older first (no timestamp last), then by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    undated: bool,
    created: Option<String>,
    service: ServiceId,
}

struct Entry {
    model: ServiceModel,
    /// Shared with the claims list of each of its frontends.
    claim: Arc<Claim>,
}

#[derive(Default)]
pub struct DesiredState {
    services: BTreeMap<ServiceId, Entry>,
    /// Claims per frontend, sorted (almost always one: a Vec, not a set).
    claims: BTreeMap<AnyFrontendKey, Vec<Arc<Claim>>>,
    desired: Desired,
    /// Winning frontends per set: a set is desired while some use it.
    set_refs: BTreeMap<SetName, usize>,
    pending: Scope,
}

fn object(service: &ServiceId) -> ObjectKey {
    ObjectKey {
        kind: Kind::Service,
        namespace: service.0.to_string(),
        name: service.1.to_string(),
    }
}

impl DesiredState {
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The node's SNAT address (from its Node object).
    pub fn set_snat_addr(&mut self, addr: Option<std::net::Ipv4Addr>) {
        self.desired.snat_addr = addr;
    }

    /// The ports external flows are source-NATed to (`--snat-ports`).
    pub fn set_snat_ports(&mut self, ports: std::ops::RangeInclusive<u16>) {
        self.desired.snat_ports = Some(ports);
    }

    /// `--masquerade-all` and `--external-cluster-ips` (the node's flags in `LB_CONFIG`).
    pub fn set_node_flags(&mut self, masquerade_all: bool, external_cluster_ips: bool) {
        self.desired.masquerade_all = masquerade_all;
        self.desired.no_external_cluster_ips = !external_cluster_ips;
    }

    /// What changed since the last call.
    pub fn take_scope(&mut self) -> Scope {
        std::mem::take(&mut self.pending)
    }

    pub fn models(&self) -> impl Iterator<Item = (&ServiceId, &ServiceModel)> {
        self.services.iter().map(|(id, e)| (id, &e.model))
    }

    /// Replaces (or, with `None`, removes) a Service's translation. Returns the frontend claims
    /// that lost to another Service among those touched.
    pub fn set_service(
        &mut self,
        service: ServiceId,
        created: Option<String>,
        model: Option<ServiceModel>,
    ) -> Vec<Problem> {
        let claim = Arc::new(Claim {
            undated: created.is_none(),
            created,
            service: service.clone(),
        });
        let old = self.services.remove(&service);
        let mut touched_keys: BTreeSet<AnyFrontendKey> = BTreeSet::new();
        let mut touched_sets: BTreeSet<SetName> = BTreeSet::new();
        if let Some(old) = &old {
            for f in &old.model.frontends {
                if let Some(claims) = self.claims.get_mut(&f.key) {
                    claims.retain(|c| *c != old.claim);
                }
                touched_keys.insert(f.key);
            }
            touched_sets.extend(old.model.sets.iter().map(|(n, _)| n.clone()));
        }
        if let Some(model) = model {
            for f in &model.frontends {
                let claims = self.claims.entry(f.key).or_default();
                if let Err(at) = claims.binary_search(&claim) {
                    claims.insert(at, claim.clone());
                }
                touched_keys.insert(f.key);
            }
            touched_sets.extend(model.sets.iter().map(|(n, _)| n.clone()));
            self.services.insert(service, Entry { model, claim });
        }
        let mut lost = Vec::new();
        for key in &touched_keys {
            lost.extend(self.resolve(*key, &mut touched_sets));
        }
        // Sets of this service, and of any service whose winning frontends changed above.
        for name in &touched_sets {
            self.refresh_set(name);
        }
        self.pending.frontends.extend(touched_keys);
        self.pending.sets.extend(touched_sets);
        lost
    }

    /// Re-decides who owns `key`; returns the losing claims.
    fn resolve(
        &mut self,
        key: AnyFrontendKey,
        touched_sets: &mut BTreeSet<SetName>,
    ) -> Vec<Problem> {
        let claims = self.claims.get(&key).cloned().unwrap_or_default();
        if claims.is_empty() {
            self.claims.remove(&key);
        }
        let winner: Option<DesiredFrontend> = claims.first().and_then(|c| {
            self.services
                .get(&c.service)
                .and_then(|e| e.model.frontends.iter().find(|f| f.key == key).cloned())
        });
        let previous = match &winner {
            Some(f) => self.desired.frontends.insert(key, f.clone()),
            None => self.desired.frontends.remove(&key),
        };
        if let Some(p) = &previous {
            if let Some(refs) = self.set_refs.get_mut(&p.set) {
                *refs -= 1;
            }
            touched_sets.insert(p.set.clone());
        }
        if let Some(f) = &winner {
            *self.set_refs.entry(f.set.clone()).or_default() += 1;
            touched_sets.insert(f.set.clone());
        }
        let Some(first) = claims.first() else {
            return Vec::new();
        };
        claims
            .iter()
            .skip(1)
            .map(|loser| Problem {
                object: object(&loser.service),
                reason: format!(
                    "frontend {key} is already claimed by {}; skipped",
                    object(&first.service)
                ),
                error: true,
            })
            .collect()
    }

    /// A set is desired, with its owner's current members, while a winning frontend uses it.
    fn refresh_set(&mut self, name: &SetName) {
        let used = self.set_refs.get(name).is_some_and(|n| *n > 0);
        let members = self
            .services
            .get(&(name.namespace.as_str().into(), name.service.as_str().into()))
            .and_then(|e| e.model.set(name))
            .filter(|_| used);
        match members {
            Some(m) => {
                self.desired.sets.insert(name.clone(), m.clone());
            }
            None => {
                self.desired.sets.remove(name);
                if !used {
                    self.set_refs.remove(name);
                }
            }
        }
    }
}
