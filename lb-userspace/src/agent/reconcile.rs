//! The agent's reconcile step: objects in, map writes out. Services touched since the last step
//! are translated again (the others keep their cached translation), the whole desired state is
//! assembled, and the planner's difference against the shadow of the maps is written.

use std::{
    collections::BTreeMap,
    time::{Instant, SystemTime},
};

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use crate::{
    adopt,
    maps::Maps,
    model::{HealthCheck, ServiceModel},
    planner::{self, Limits, Programmed},
    source::{
        Kind, Update,
        store::{Dirty, ServiceId, Store},
    },
    translate::{self, NodeContext, Problem},
    writer,
};

use super::metrics::{KindLabel, MapLabel, Metrics};

/// A cached translation.
struct Translated {
    model: ServiceModel,
    created: Option<String>,
    object: crate::source::ObjectKey,
}

/// What one sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub frontends: usize,
    pub problems: usize,
}

pub struct Reconciler {
    node_name: String,
    nodeport_cidrs: Vec<Ipv4Net>,
    limits: Limits,
    store: Store,
    dirty: Dirty,
    /// When the oldest change not yet programmed was seen.
    pending_since: Option<Instant>,
    translated: BTreeMap<ServiceId, Translated>,
    /// Problems last reported per service, so each is logged once, not on every sync.
    reported: BTreeMap<ServiceId, Vec<Problem>>,
    conflicts: Vec<Problem>,
    node: NodeContext,
    /// The shadow of the maps; `None` until adopted (and after a failed write).
    programmed: Option<Programmed>,
    synced_once: bool,
}

impl Reconciler {
    pub fn new(node_name: String, nodeport_cidrs: Vec<Ipv4Net>, limits: Limits) -> Self {
        Self {
            node: NodeContext {
                name: node_name.clone(),
                nodeport_addrs: Vec::new(),
            },
            node_name,
            nodeport_cidrs,
            limits,
            store: Store::default(),
            dirty: Dirty::default(),
            pending_since: None,
            translated: BTreeMap::new(),
            reported: BTreeMap::new(),
            conflicts: Vec::new(),
            programmed: None,
            synced_once: false,
        }
    }

    /// Takes one update from the source.
    pub fn apply(&mut self, update: Update, metrics: &Metrics) {
        let changed_kind = match &update {
            Update::Applied(object) => Some(object.key().kind),
            Update::Deleted(key) => Some(key.kind),
            Update::Invalid { origin, reason } => {
                warn!(%origin, %reason, "invalid object skipped");
                metrics
                    .invalid_objects
                    .get_or_create(&KindLabel {
                        kind: "document".into(),
                    })
                    .inc();
                None
            }
            Update::Listing(_) | Update::Listed(_) => None,
        };
        match changed_kind {
            Some(Kind::Service) => {
                metrics.service_changes.inc();
            }
            Some(Kind::EndpointSlice) => {
                metrics.endpoint_changes.inc();
            }
            Some(Kind::Node) | None => {}
        }
        self.store.apply(update, &self.node_name, &mut self.dirty);
        if !self.dirty.is_empty() && self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
    }

    /// Whether there is something to program (and the store is complete enough to do it).
    pub fn has_work(&self) -> bool {
        self.store.ready()
            && (!self.dirty.is_empty() || !self.synced_once || self.programmed.is_none())
    }

    /// Whether the first full sync has been written.
    pub fn synced(&self) -> bool {
        self.synced_once
    }

    /// Forgets the shadow: the next sync re-reads the maps and repairs any difference (the
    /// periodic self-heal, and the recovery after a failed write).
    pub fn resync(&mut self) {
        self.programmed = None;
    }

    /// Health checks of services with externalTrafficPolicy Local, by healthCheckNodePort.
    pub fn health_checks(&self) -> BTreeMap<u16, (String, HealthCheck)> {
        self.translated
            .values()
            .filter_map(|t| {
                t.model.health_check.map(|hc| {
                    (
                        hc.node_port,
                        (format!("{}/{}", t.object.namespace, t.object.name), hc),
                    )
                })
            })
            .collect()
    }

    fn translate_dirty(&mut self, metrics: &Metrics) {
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.node {
            self.node = NodeContext::from_node(
                &self.node_name,
                self.store.node(&self.node_name),
                &self.nodeport_cidrs,
            );
            info!(node = %self.node_name, addresses = ?self.node.nodeport_addrs, "node addresses for NodePorts");
        }
        let ids: Vec<ServiceId> = if dirty.node {
            self.store
                .services()
                .map(|(id, _)| id.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .chain(dirty.services)
                .collect()
        } else {
            dirty.services.into_iter().collect()
        };
        for id in ids {
            let Some(svc) = self.store.service(&id) else {
                self.translated.remove(&id);
                self.reported.remove(&id);
                continue;
            };
            let slices = self.store.slices_of(&id);
            let (model, problems) = translate::service(svc, &slices, &self.node);
            let created = svc
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string());
            self.report(&id, problems, metrics);
            match model {
                Some(model) => {
                    let object = crate::source::ObjectKey {
                        kind: Kind::Service,
                        namespace: id.0.clone(),
                        name: id.1.clone(),
                    };
                    self.translated.insert(
                        id,
                        Translated {
                            model,
                            created,
                            object,
                        },
                    );
                }
                None => {
                    self.translated.remove(&id);
                }
            }
        }
    }

    fn report(&mut self, id: &ServiceId, problems: Vec<Problem>, metrics: &Metrics) {
        if self.reported.get(id) == Some(&problems) {
            return;
        }
        for p in &problems {
            if self.reported.get(id).is_some_and(|old| old.contains(p)) {
                continue;
            }
            if p.error {
                warn!(object = %p.object, reason = %p.reason, "invalid input skipped");
                metrics
                    .invalid_objects
                    .get_or_create(&KindLabel {
                        kind: p.object.kind.name().into(),
                    })
                    .inc();
            } else {
                info!(object = %p.object, note = %p.reason, "skipped");
            }
        }
        if problems.is_empty() {
            self.reported.remove(id);
        } else {
            self.reported.insert(id.clone(), problems);
        }
    }

    /// Translates what changed and writes the difference. Errors are logged and counted; the
    /// next sync retries from the maps' actual content.
    pub fn sync(&mut self, maps: &mut Maps, metrics: &Metrics) -> Option<SyncReport> {
        if !self.store.ready() {
            return None;
        }
        let started = Instant::now();
        self.translate_dirty(metrics);
        let (desired, conflicts) =
            translate::assemble(self.translated.values().map(|t| translate::Translated {
                object: &t.object,
                created: t.created.clone(),
                model: &t.model,
            }));
        if conflicts != self.conflicts {
            for c in conflicts.iter().filter(|c| !self.conflicts.contains(c)) {
                warn!(object = %c.object, reason = %c.reason, "invalid input skipped");
                metrics
                    .invalid_objects
                    .get_or_create(&KindLabel {
                        kind: "Service".into(),
                    })
                    .inc();
            }
            self.conflicts = conflicts;
        }

        let programmed = match self.programmed.take() {
            Some(p) => p,
            None => match adopt::adopt(maps, &desired, self.limits.table_size) {
                Ok(p) => {
                    debug!(
                        frontends = p.frontends.len(),
                        backends = p.backends.len(),
                        "adopted the maps' content"
                    );
                    p
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the maps back; will retry");
                    metrics.sync_failures.inc();
                    return None;
                }
            },
        };
        let plan = planner::plan(&desired, &programmed, &self.limits);
        for (key, reason) in &plan.overflow {
            warn!(frontend = %key, %reason, "frontend not programmed (its whole service is left out)");
            let map = reason
                .split_whitespace()
                .nth(1)
                .unwrap_or("unknown")
                .to_owned();
            metrics
                .not_programmed
                .get_or_create(&MapLabel { map })
                .inc();
        }
        let writes = plan.writes();
        let mut programmed = programmed;
        match writer::write(maps, &plan) {
            Ok(()) => programmed.commit(plan),
            Err(e) => {
                warn!(error = %e, "writing the maps failed; the next sync re-reads them and retries");
                metrics.sync_failures.inc();
                return None;
            }
        }

        metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(since) = self.pending_since.take() {
            metrics
                .programming_latency
                .observe(since.elapsed().as_secs_f64());
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics.last_sync.set(now);
        metrics.frontends.set(programmed.frontends.len() as i64);
        metrics.backend_sets.set(programmed.sets.len() as i64);
        metrics.backends.set(programmed.backends.len() as i64);
        if let Ok(mut names) = metrics.set_names.write() {
            *names = programmed
                .sets
                .iter()
                .map(|(name, s)| (s.id, name.to_string()))
                .collect();
        }
        let report = SyncReport {
            writes,
            frontends: programmed.frontends.len(),
            problems: self.reported.values().map(Vec::len).sum::<usize>() + self.conflicts.len(),
        };
        if !self.synced_once {
            info!(
                services = self.store.service_count(),
                endpoint_slices = self.store.slice_count(),
                frontends = report.frontends,
                writes,
                seconds = started.elapsed().as_secs_f64(),
                "first full sync done"
            );
        } else if writes > 0 {
            debug!(writes, seconds = started.elapsed().as_secs_f64(), "synced");
        }
        self.synced_once = true;
        self.programmed = Some(programmed);
        Some(report)
    }
}
