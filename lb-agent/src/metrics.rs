//! Prometheus metrics. Where kube-proxy has a metric for the same thing, it has the same name and
//! meaning (`kubeproxy_sync_proxy_rules_duration_seconds`,
//! `kubeproxy_network_programming_duration_seconds`, ...); the rest is prefixed `lb_`.
//! Datapath counters are read from the pinned maps at scrape time.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock, atomic::AtomicU64},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use lb_datapath::{maps::Maps, model::SetName};

/// Labels naming a map.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

/// Labels naming what kind of object was invalid.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Labels naming one of the agent's HTTP servers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ServerLabel {
    pub server: String,
}

/// The agent's own metrics.
pub struct Metrics {
    pub sync_duration: Histogram,
    pub programming_latency: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub endpoint_changes: Counter,
    pub service_changes: Counter,
    pub sync_failures: Counter,
    /// The node's connected UDP sockets closed because their backend left (socket-level
    /// balancing).
    pub udp_sockets_closed: Counter,
    pub invalid_objects: Family<KindLabel, Counter>,
    pub not_programmed: Family<MapLabel, Counter>,
    pub frontends: Gauge,
    pub backend_sets: Gauge,
    pub backends: Gauge,
    pub flows: Gauge,
    pub map_fill: Family<MapLabel, Gauge<f64, AtomicU64>>,
    /// 1 while a server cannot listen on its address (see `http::serve`).
    listen_blocked: Family<ServerLabel, Gauge>,
    /// Backend-set id -> name, for the datapath counters' labels.
    pub set_names: Arc<RwLock<BTreeMap<u32, SetName>>>,
}

impl Metrics {
    /// The `lb_listen_blocked` gauge of `server`.
    pub fn listen_blocked(&self, server: &str) -> Gauge {
        self.listen_blocked
            .get_or_create(&ServerLabel {
                server: server.to_owned(),
            })
            .clone()
    }

    pub fn new(registry: &mut Registry, bpffs_dir: PathBuf) -> Arc<Self> {
        let metrics = Arc::new(Self {
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            programming_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            last_sync: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            sync_failures: Counter::default(),
            udp_sockets_closed: Counter::default(),
            invalid_objects: Family::default(),
            not_programmed: Family::default(),
            frontends: Gauge::default(),
            backend_sets: Gauge::default(),
            backends: Gauge::default(),
            flows: Gauge::default(),
            map_fill: Family::default(),
            listen_blocked: Family::default(),
            set_names: Arc::default(),
        });
        let m = &metrics;
        registry.register_with_unit(
            "kubeproxy_sync_proxy_rules_duration",
            "SyncProxyRules latency: from the start of a sync to the maps written",
            Unit::Seconds,
            m.sync_duration.clone(),
        );
        registry.register_with_unit(
            "kubeproxy_network_programming_duration",
            "In-cluster network programming latency: from an object change seen to the maps written",
            Unit::Seconds,
            m.programming_latency.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time the maps were successfully synced (unix seconds)",
            m.last_sync.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative EndpointSlice changes",
            m.endpoint_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative Service changes",
            m.service_changes.clone(),
        );
        registry.register(
            "lb_sync_failures",
            "Syncs that failed to write the maps (retried)",
            m.sync_failures.clone(),
        );
        registry.register(
            "lb_socket_udp_closed",
            "The node's connected UDP sockets closed because the backend socket-level balancing \
             gave them left its Service",
            m.udp_sockets_closed.clone(),
        );
        registry.register(
            "lb_invalid_objects",
            "Objects skipped because they are invalid, by kind",
            m.invalid_objects.clone(),
        );
        registry.register(
            "lb_frontends_not_programmed",
            "Frontends left out because a map is full, by map",
            m.not_programmed.clone(),
        );
        registry.register(
            "lb_frontends_programmed",
            "Frontends (address, port, protocol, scope) in the datapath",
            m.frontends.clone(),
        );
        registry.register(
            "lb_backend_sets_programmed",
            "Backend sets (service ports) in the datapath",
            m.backend_sets.clone(),
        );
        registry.register(
            "lb_backends_programmed",
            "Distinct backends (address, port) in the datapath",
            m.backends.clone(),
        );
        registry.register(
            "lb_conntrack_flows",
            "Connections tracked by the datapath (sampled)",
            m.flows.clone(),
        );
        registry.register(
            "lb_map_fill_ratio",
            "How full each sized map is (0-1)",
            m.map_fill.clone(),
        );
        registry.register(
            "lb_listen_blocked",
            "1 while the agent cannot listen on a server's address (held by another process, \
             such as kube-proxy during a migration); it tries again every 5 s",
            m.listen_blocked.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector {
            bpffs_dir,
            set_names: metrics.set_names.clone(),
        }));
        metrics
    }
}

/// Reads the datapath's per-CPU counters from the pinned maps at scrape time.
#[derive(Debug)]
struct DatapathCollector {
    bpffs_dir: PathBuf,
    set_names: Arc<RwLock<BTreeMap<u32, SetName>>>,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(maps) = Maps::open_pinned(&self.bpffs_dir) else {
            return Ok(());
        };
        if let Ok(verdicts) = maps.verdict_totals() {
            let mut family = encoder.encode_descriptor(
                "lb_datapath_packets",
                "Packets the datapath handled for frontends, by verdict reason",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, counter) in verdicts {
                let labels = [("reason", reason.name())];
                ConstCounter::new(counter.packets).encode(family.encode_family(&labels)?)?;
            }
        }
        let names = self.set_names.read().map(|n| n.clone()).unwrap_or_default();
        for (metric, help, pick) in [
            (
                "lb_service_packets",
                "Packets balanced to a backend set's backends (both directions)",
                0usize,
            ),
            ("lb_service_bytes", "Bytes of those packets", 1),
            (
                "lb_service_new_flows",
                "Connections balanced by a backend set",
                2,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                metric,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (id, name) in &names {
                let Ok(stats) = maps.set_totals(*id) else {
                    continue;
                };
                let value = [stats.packets, stats.bytes, stats.new_flows][pick];
                let labels = [("service", name.to_string())];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
