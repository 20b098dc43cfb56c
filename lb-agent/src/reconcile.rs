//! The agent's reconcile step: objects in, map writes out. Services touched since the last step
//! are translated again and replace their part of the desired state; the planner then looks at
//! what they touched only (everything on the first sync and on periodic resyncs), and its
//! difference against the shadow of the maps is written.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::RangeInclusive,
    time::{Duration, Instant, SystemTime},
};

use tracing::{debug, info, warn};

use lb_datapath::{
    adopt,
    maps::Maps,
    model::HealthCheck,
    planner::{self, Extent, Limits, Programmed},
    sock_close, writer,
};

use crate::{
    desired::DesiredState,
    node::{self, ForwardingMode, NodePortAddresses},
    source::{
        Kind, Update,
        store::{Dirty, ServiceId, Store},
    },
    translate::{self, NodeContext, Problem},
};

use crate::metrics::{KindLabel, MapLabel, Metrics};

/// What one sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub frontends: usize,
    pub problems: usize,
}

pub struct Reconciler {
    node_name: String,
    nodeport: NodePortAddresses,
    /// The node's interface addresses when `--nodeport-addresses` selects among them (re-read
    /// on every resync, as kube-proxy re-reads them on every sync).
    local_addrs: Vec<Ipv4Addr>,
    limits: Limits,
    store: Store,
    dirty: Dirty,
    /// When the oldest change not yet programmed was seen.
    pending_since: Option<Instant>,
    desired: DesiredState,
    /// Problems last reported per service, so each is logged once, not on every sync.
    reported: BTreeMap<ServiceId, Vec<Problem>>,
    /// Problems newly found, for Kubernetes Events (see [`Reconciler::take_notices`]).
    notices: Vec<Problem>,
    node: NodeContext,
    /// The shadow of the maps; `None` until adopted (and after a failed write, and when a
    /// resync is due).
    programmed: Option<Programmed>,
    synced_once: bool,
    /// Time spent translating ahead of the first sync (see [`Reconciler::translate_ahead`]),
    /// counted in that sync's logged duration: translating, planning and writing N Services.
    translated_ahead: Duration,
    /// Socket-level balancing is on: the node's connected UDP sockets to a backend that left are
    /// closed (`lb_datapath::sock_close`).
    closes_udp_sockets: bool,
}

impl Reconciler {
    pub fn new(
        node_name: String,
        nodeport: NodePortAddresses,
        snat_ports: RangeInclusive<u16>,
        limits: Limits,
    ) -> Self {
        let mut desired = DesiredState::default();
        desired.set_snat_ports(snat_ports);
        Self {
            node: NodeContext::unknown(&node_name),
            node_name,
            local_addrs: Self::read_local_addrs(&nodeport),
            nodeport,
            limits,
            store: Store::default(),
            dirty: Dirty::default(),
            pending_since: None,
            desired,
            reported: BTreeMap::new(),
            notices: Vec::new(),
            programmed: None,
            synced_once: false,
            translated_ahead: Duration::ZERO,
            closes_udp_sockets: false,
        }
    }

    /// Socket-level balancing is on (`--socket-lb on|host-only`).
    pub fn set_socket_lb(&mut self, on: bool) {
        self.closes_udp_sockets = on;
    }

    /// The node's flags (`--masquerade-all`, `--external-cluster-ips`), written with the first
    /// sync.
    pub fn set_node_flags(&mut self, masquerade_all: bool, external_cluster_ips: bool) {
        self.desired
            .set_node_flags(masquerade_all, external_cluster_ips);
    }

    /// How external flows to other nodes' backends are forwarded unless a Service says
    /// (`--forwarding-mode`); set before the first translation.
    pub fn set_forwarding_mode(&mut self, mode: ForwardingMode) {
        self.node.forwarding = mode;
    }

    /// Takes one update from the source.
    pub fn apply(&mut self, update: Update, metrics: &Metrics) {
        let changed = match &update {
            Update::Applied(object) => Some(object.key().kind),
            Update::Deleted(key) => Some(key.kind),
            Update::Invalid {
                origin,
                reason,
                key,
            } => {
                warn!(%origin, %reason, "invalid object skipped");
                let kind = key.as_ref().map_or("document", |key| key.kind.name());
                metrics
                    .invalid_objects
                    .get_or_create(&KindLabel { kind: kind.into() })
                    .inc();
                None
            }
            Update::Listing(_) | Update::Listed(_) => None,
        };
        match changed {
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
        let local_addrs = Self::read_local_addrs(&self.nodeport);
        if local_addrs != self.local_addrs {
            self.local_addrs = local_addrs;
            self.dirty.node = true;
        }
    }

    fn read_local_addrs(nodeport: &NodePortAddresses) -> Vec<Ipv4Addr> {
        match nodeport {
            NodePortAddresses::Cidrs(_) => node::local_addrs(),
            _ => Vec::new(),
        }
    }

    /// The problems found since the last call, each once (when it first appears), for the
    /// Kubernetes Events that tell the objects' owners.
    pub fn take_notices(&mut self) -> Vec<Problem> {
        std::mem::take(&mut self.notices)
    }

    /// What the agent knows of its node (addresses, zone, eligibility).
    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    /// When the oldest change not yet programmed arrived (kube-proxy's health turns bad when
    /// that is too long ago).
    pub fn pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    /// Where healthCheckNodePorts listen: every address when `--nodeport-addresses` selects
    /// every address (or none is known yet), else the selected ones, as kube-proxy binds them.
    pub fn health_check_addrs(&self) -> Vec<IpAddr> {
        if self.nodeport.matches_all() || self.node.nodeport_addrs.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            self.node
                .nodeport_addrs
                .iter()
                .copied()
                .map(IpAddr::V4)
                .collect()
        }
    }

    /// Health checks of services with externalTrafficPolicy Local, by healthCheckNodePort.
    pub fn health_checks(&self) -> BTreeMap<u16, (String, HealthCheck)> {
        self.desired
            .models()
            .filter_map(|(id, m)| {
                m.health_check
                    .map(|hc| (hc.node_port, (format!("{}/{}", id.0, id.1), hc)))
            })
            .collect()
    }

    /// Translates what changed, without programming it, once the store holds a complete
    /// picture: the agent's start does it while the kernel still verifies the programs, so that
    /// the first sync only plans and writes.
    pub fn translate_ahead(&mut self, metrics: &Metrics) {
        if self.store.ready() {
            let started = Instant::now();
            self.translate_dirty(metrics);
            if !self.synced_once {
                self.translated_ahead += started.elapsed();
            }
        }
    }

    fn translate_dirty(&mut self, metrics: &Metrics) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut ids = dirty.services;
        if dirty.node {
            let mut node = NodeContext::from_node(
                &self.node_name,
                self.store.node(&self.node_name),
                &self.nodeport,
                &self.local_addrs,
            );
            node.forwarding = self.node.forwarding;
            // A Node's status changes often (heartbeats, conditions); only what the translation
            // reads makes every Service translate again.
            if node != self.node {
                self.node = node;
                self.node_changed();
                ids.extend(
                    self.store
                        .services()
                        .map(|(id, _)| id.clone())
                        .collect::<BTreeSet<_>>(),
                );
            }
        }
        for id in ids {
            let (created, model) = match self.store.service(&id) {
                Some(svc) => {
                    let slices = self.store.slices_of(&id);
                    let (model, problems) = translate::service(svc, &slices, &self.node);
                    let created = svc.created.clone();
                    self.report(&id, problems, metrics);
                    (created, model)
                }
                None => {
                    self.reported.remove(&id);
                    (None, None)
                }
            };
            for lost in self.desired.set_service(id, created, model) {
                warn!(object = %lost.object, reason = %lost.reason, "invalid input skipped");
                self.notices.push(lost.clone());
                metrics
                    .invalid_objects
                    .get_or_create(&KindLabel {
                        kind: "Service".into(),
                    })
                    .inc();
            }
        }
    }

    fn node_changed(&mut self) {
        info!(
            node = %self.node_name,
            addresses = ?self.node.nodeport_addrs,
            snat = ?self.node.snat_addr,
            zone = ?self.node.zone,
            eligible = self.node.eligible,
            "node: addresses for NodePorts and SNAT, zone for topology hints, eligibility for load balancers"
        );
        self.desired.set_snat_addr(self.node.snat_addr);
    }

    fn report(&mut self, id: &ServiceId, problems: Vec<Problem>, metrics: &Metrics) {
        if self.reported.get(id) == Some(&problems) {
            return;
        }
        for p in &problems {
            if self.reported.get(id).is_some_and(|old| old.contains(p)) {
                continue;
            }
            self.notices.push(p.clone());
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
        let scope = self.desired.take_scope();
        let desired = self.desired.desired();

        // Without a shadow (first sync, resync, after a failure): read the maps and plan
        // everything; with one: plan what changed.
        let (mut programmed, extent) = match self.programmed.take() {
            Some(p) => (p, Extent::Only(&scope)),
            None => match adopt::adopt(maps, desired, &self.limits) {
                Ok(p) => {
                    debug!(
                        frontends = p.frontends.len(),
                        backends = p.backends.len(),
                        "adopted the maps' content"
                    );
                    (p, Extent::All)
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the maps back; will retry");
                    metrics.sync_failures.inc();
                    return None;
                }
            },
        };
        let plan = planner::plan(desired, &mut programmed, &self.limits, extent);
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
        if let Err(e) = writer::write(maps, &plan) {
            warn!(error = %e, "writing the maps failed; the next sync re-reads them and retries");
            metrics.sync_failures.inc();
            return None;
        }
        if self.closes_udp_sockets && !plan.udp_flow_purge.is_empty() {
            close_udp_sockets(maps, &plan.udp_flow_purge, metrics);
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
        if writes > 0
            && let Ok(mut names) = metrics.set_names.write()
        {
            *names = programmed
                .sets
                .iter()
                .map(|(name, s)| (s.id, name.clone()))
                .collect();
        }
        let report = SyncReport {
            writes,
            frontends: programmed.frontends.len(),
            problems: self.reported.values().map(Vec::len).sum(),
        };
        if !self.synced_once {
            info!(
                services = self.store.service_count(),
                endpoint_slices = self.store.slice_count(),
                frontends = report.frontends,
                writes,
                seconds = (started.elapsed() + self.translated_ahead).as_secs_f64(),
                translated_ahead_seconds = self.translated_ahead.as_secs_f64(),
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

/// Closes the node's connected UDP sockets that socket-level balancing gave a backend that has
/// now stopped serving or left its set (as the packet path flushes those flows). Failures are
/// logged: the sockets then wait for their application's timeout, as without this.
fn close_udp_sockets(maps: &mut Maps, purged: &[(u32, SocketAddr)], metrics: &Metrics) {
    // Socket-level balancing serves IPv4 frontends only so far.
    let gone: BTreeSet<SocketAddrV4> = purged
        .iter()
        .filter_map(|(_, addr)| match addr {
            SocketAddr::V4(v4) => Some(*v4),
            SocketAddr::V6(_) => None,
        })
        .collect();
    let doomed = match sock_close::forget_udp(maps, &gone) {
        Ok(doomed) => doomed,
        Err(e) => {
            warn!(error = %e, "cannot read the sockets socket-level balancing connected");
            return;
        }
    };
    match sock_close::close_connected(&doomed) {
        Ok(0) => {}
        Ok(closed) => {
            info!(sockets = closed, backends = ?gone, "closed the node's connected UDP sockets to backends that left");
            metrics.udp_sockets_closed.inc_by(closed as u64);
        }
        Err(e) => {
            warn!(error = %e, "cannot close the node's UDP sockets to backends that left (sock_diag SOCK_DESTROY: kernel without CONFIG_INET_DIAG_DESTROY?)")
        }
    }
}
