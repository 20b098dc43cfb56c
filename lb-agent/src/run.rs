//! The agent's main loop: loads (or adopts) the pinned datapath, attaches it to the node's
//! interfaces, and keeps the maps equal to what the Services and EndpointSlices say.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use lb_datapath::{
    Capacities, Datapath, Pinning,
    attach::Links,
    bpffs, ct_carry,
    features::TcApi,
    filters,
    loader::{self, Loader},
    planner::Limits,
};

use crate::{
    config::{self, RunArgs, Source},
    events, healthcheck, http, interfaces, metrics,
    reconcile::Reconciler,
    source::{self, Update},
    sysctl,
    translate::Problem,
};

/// How often it samples the conntrack fill level for metrics.
const SAMPLE_PERIOD: Duration = Duration::from_secs(15);
/// Updates taken from the source before programming, at most (keeps latency bounded while a
/// large initial list streams in), and the source channel's size (objects in flight).
const BATCH: usize = 256;
/// Kubernetes Events waiting to be sent, at most.
const NOTICES: usize = 256;

/// Runs the agent until SIGTERM or SIGINT. The datapath stays in place afterwards (pinned): a
/// restarted agent takes it over without dropping a connection.
pub async fn run(args: RunArgs) -> Result<()> {
    let args = Arc::new(args);
    let node_name = args.node_name();
    info!(node = %node_name, source = ?args.source, bpffs = %args.bpffs_dir.display(), "starting");
    if let Some(flag) = args
        .nodeport_addresses
        .as_ref()
        .filter(|f| !f.ipv6.is_empty())
    {
        info!(
            ipv6 = ?flag.ipv6,
            ipv4 = ?flag.ipv4,
            "--nodeport-addresses: the IPv6 CIDRs are kept for IPv6 NodePorts, which this \
             datapath does not serve yet; IPv4 NodePorts use the IPv4 CIDRs (every address when \
             there are none)"
        );
    }

    // Mistakes in the command line stop the agent before it touches the node.
    let patterns: Vec<glob::Pattern> = args
        .pod_ifaces
        .iter()
        .map(|p| {
            glob::Pattern::new(p)
                .with_context(|| format!("--pod-ifaces: {p:?} is not a valid glob"))
        })
        .collect::<Result<_>>()?;
    if let Source::Files(path) = &args.source
        && !path.exists()
    {
        anyhow::bail!("--source {}: no such file or directory", path.display());
    }

    let capacities = Capacities {
        ct: args.conntrack_max,
        sets: args.max_services,
        ..Capacities::default()
    };
    let (loader, tc_api) = datapath_loader(&args, capacities)?;
    // The kernel verifies the programs while the source lists the objects: the reconciler takes
    // them in below, and programs nothing before it has the maps.
    let setup = {
        let args = args.clone();
        let patterns = patterns.clone();
        tokio::task::spawn_blocking(move || prepare_datapath(&args, &patterns, loader, tc_api))
    };

    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry, args.bpffs_dir.clone());
    let health = Arc::new(http::Health::new(args.sync_period));
    let addresses = http::Addresses {
        metrics: args.metrics_addr,
        healthz: args.healthz_addr,
        probes: args.probe_addr,
    };
    http::serve(addresses, registry, health.clone(), &metrics);

    let (tx, mut updates) = mpsc::channel::<Update>(BATCH);
    // Kubernetes Events about the objects the agent refuses or only partly serves, sent by a
    // task of their own so that a slow API server never holds the loop up (and dropped, with the
    // log line and metric kept, when more than NOTICES wait).
    let mut notices: Option<mpsc::Sender<Problem>> = None;
    let source_task = match args.source.clone() {
        Source::Files(path) => tokio::spawn(async move { source::files::run(path, tx).await }),
        Source::Kubernetes => {
            let options = source::kube::ClientOptions {
                kubeconfig: args.kubeconfig.clone(),
                master: args.master.clone(),
            };
            let client = source::kube::client(&options).await?;
            let (notice_tx, mut notice_rx) = mpsc::channel::<Problem>(NOTICES);
            notices = Some(notice_tx);
            let notifier = source::notify::Notifier::new(client.clone(), &node_name);
            tokio::spawn(async move {
                while let Some(problem) = notice_rx.recv().await {
                    notifier.problem(&problem).await;
                }
            });
            let name = node_name.clone();
            tokio::spawn(async move { source::kube::run(client, name, tx).await })
        }
    };

    let (iface_tx, mut iface_events) = mpsc::channel::<()>(1);
    spawn_link_watcher(iface_tx);

    let limits = Limits {
        backends: lb_common::maps::capacity::BACKENDS,
        set_ids: args.max_services,
        frontends: lb_common::maps::capacity::SERVICES,
        addrs: lb_common::maps::capacity::ADDRS,
        ranges: lb_common::maps::capacity::SRC_RANGES,
        table_size: args.maglev_table_size,
    };
    let mut reconciler = Reconciler::new(
        node_name,
        args.nodeport_addresses.clone().unwrap_or_default().ipv4,
        args.snat_ports.clone(),
        limits,
    );
    reconciler.set_node_flags(args.masquerade_all, args.external_cluster_ips);
    reconciler.set_forwarding_mode(args.forwarding_mode);
    reconciler.set_socket_lb(args.socket_lb != config::SocketLb::Off);
    let Prepared {
        mut datapath,
        mut maps,
        mut links,
    } = {
        let mut setup = std::pin::pin!(setup);
        loop {
            tokio::select! {
                prepared = &mut setup => break prepared.context("preparing the datapath panicked")??,
                Some(update) = updates.recv() => {
                    apply_batch(&mut reconciler, update, &mut updates, &metrics);
                    reconciler.translate_ahead(&metrics);
                }
            }
        }
    };
    let ifaces = Interfaces {
        pod_patterns: &patterns,
        external: &args.external_iface,
        xdp_mode: args.xdp_mode,
    };
    let mut health_checks = healthcheck::HealthChecks::default();
    let mut heal = tokio::time::interval(args.sync_period);
    heal.tick().await;
    let mut sample = tokio::time::interval(SAMPLE_PERIOD);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        health.beat();
        // Before waiting: the first sync follows the datapath's preparation at once.
        if reconciler.has_work() && reconciler.sync(&mut maps, &metrics).is_some() {
            health.synced();
            health_checks
                .update(
                    &reconciler.health_checks(),
                    &reconciler.health_check_addrs(),
                    &health,
                )
                .await;
        }
        health.observe(reconciler.pending_since(), reconciler.node().eligible);
        for problem in reconciler.take_notices() {
            if let Some(tx) = &notices {
                let _ = tx.try_send(problem);
            }
        }
        tokio::select! {
            update = updates.recv() => {
                let Some(update) = update else {
                    // The datapath stays; exiting non-zero lets the DaemonSet restart us.
                    return match source_task.await {
                        Ok(Err(e)) => Err(e.context("the object source stopped")),
                        _ => Err(anyhow::anyhow!("the object source stopped")),
                    };
                };
                apply_batch(&mut reconciler, update, &mut updates, &metrics);
            }
            _ = iface_events.recv() => {
                let present = interfaces::present();
                let gone: Vec<String> = links.interfaces().filter(|i| !present.contains(i)).cloned().collect();
                for iface in gone {
                    links.forget(&iface);
                }
                ifaces.attach_new(&mut links, &mut datapath, &present);
            }
            _ = heal.tick() => reconciler.resync(),
            _ = sample.tick() => sample_fill(&maps, &metrics, capacities),
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    info!("stopping; the datapath stays in place for the next agent");
    Ok(())
}

/// Applies `first` and what else the source has ready, up to [`BATCH`] updates: a large
/// listing is programmed in steps, each with a bounded delay.
fn apply_batch(
    reconciler: &mut Reconciler,
    first: Update,
    updates: &mut mpsc::Receiver<Update>,
    metrics: &metrics::Metrics,
) {
    reconciler.apply(first, metrics);
    for _ in 1..BATCH {
        match updates.try_recv() {
            Ok(update) => reconciler.apply(update, metrics),
            Err(_) => break,
        }
    }
}

/// What [`prepare_datapath`] leaves: the loaded programs, their maps and their links.
struct Prepared {
    datapath: Datapath,
    maps: lb_datapath::maps::Maps,
    links: Links,
}

/// Everything before the datapath's load, on the calling thread: the pinned maps checked (or set
/// aside to be carried over) and the loader set up, which parses the kernel's BTF before the
/// source starts allocating (see `Datapath::loader`).
fn datapath_loader(args: &RunArgs, capacities: Capacities) -> Result<(Loader, TcApi)> {
    let features = lb_datapath::features::Features::detect();
    features.report();

    bpffs::ensure_bpffs(&args.bpffs_dir)?;
    for map in loader::check_pinned_maps(&args.bpffs_dir)? {
        info!(%map, "pinned counters of another layout replaced (they start over)");
    }
    let ct_entries = ct_carry::map_entries(capacities.ct);
    if let Some((entries, flags)) = ct_carry::set_aside(&args.bpffs_dir, ct_entries)? {
        info!(
            entries,
            flags,
            new_entries = ct_entries,
            "pinned conntrack map of another shape: its flows move into a new one"
        );
    }
    let loader = Datapath::loader(&Pinning::Dir(args.bpffs_dir.clone()), capacities);
    Ok((loader, features.tc_api))
}

/// Loads (or takes over) the pinned datapath, attaches it to the interfaces present and to the
/// cgroup of `--socket-lb`, and carries an earlier agent's flows over: everything before the
/// first sync that needs the kernel, run while the source lists the objects.
fn prepare_datapath(
    args: &RunArgs,
    patterns: &[glob::Pattern],
    loader: Loader,
    tc_api: TcApi,
) -> Result<Prepared> {
    let mut datapath = loader.load().context("loading the datapath")?;
    let mut maps = datapath.take_maps()?;
    // Until every program that writes conntrack marks the flows it records.
    filters::suspend(&mut maps).context("withdrawing the datapath's filters")?;
    events::forward(&mut datapath);
    // Before the new programs see a packet, and once more when the old ones no longer run; in
    // between, the new programs look up what they miss in the old map.
    let carried = ct_carry::copy_old(&args.bpffs_dir, &mut maps.ct)?;
    let carrying = ct_carry::carrying(&args.bpffs_dir);
    if carrying {
        datapath.set_ct_carrying(true)?;
    }
    sysctl::reserve_snat_ports(&args.snat_ports);

    let mut links = Links::new(&args.bpffs_dir, tc_api)?;
    let present = interfaces::present();
    for iface in &args.external_iface {
        if !present.contains(iface) {
            warn!(%iface, "external interface not found (yet); NodePorts and LoadBalancer IPs are served on the others until it appears");
        }
    }
    links.prune_stale_pins(&present);
    let ifaces = Interfaces {
        pod_patterns: patterns,
        external: &args.external_iface,
        xdp_mode: args.xdp_mode,
    };
    ifaces.attach_new(&mut links, &mut datapath, &present);
    socket_lb(args, &mut datapath, &mut maps)?;
    let carried = carried + ct_carry::finish(&args.bpffs_dir, &mut maps.ct)?;
    if carrying {
        datapath.set_ct_carrying(false)?;
    }
    if carried > 0 {
        info!(
            entries = carried,
            "conntrack carried over from the earlier map"
        );
    }
    let marked = filters::complete(&mut maps).context("completing the datapath's filters")?;
    debug!(
        elements = marked,
        "frontends and conntrack entries marked in the filters"
    );

    Ok(Prepared {
        datapath,
        maps,
        links,
    })
}

/// Which interfaces get which programs.
struct Interfaces<'a> {
    pod_patterns: &'a [glob::Pattern],
    external: &'a [String],
    xdp_mode: config::XdpMode,
}

impl Interfaces<'_> {
    /// Attaches the programs to every present interface that should have them and has not yet:
    /// the uplinks named by --external-iface, and the pod interfaces matching --pod-ifaces.
    fn attach_new(&self, links: &mut Links, datapath: &mut Datapath, present: &[String]) {
        for iface in present {
            if links.is_attached(iface) {
                continue;
            }
            if self.external.contains(iface) {
                match links.attach_external_iface(
                    datapath,
                    iface,
                    interfaces::uplink_xdp(self.xdp_mode, iface),
                ) {
                    Ok(hook) => {
                        info!(%iface, ?hook, tc = %links.tc_api(), "serving NodePorts, LoadBalancer IPs and externalIPs on uplink")
                    }
                    Err(e) => warn!(%iface, error = format!("{e:#}"), "cannot attach to uplink"),
                }
            } else if interfaces::matches_any(self.pod_patterns, iface) {
                match links.attach_pod_iface(datapath, iface) {
                    Ok(()) => info!(%iface, tc = %links.tc_api(), "attached to pod interface"),
                    Err(e) => {
                        warn!(%iface, error = format!("{e:#}"), "cannot attach to pod interface")
                    }
                }
            }
        }
    }
}

/// Forwards link events (interfaces appearing or going) from a blocking netlink socket.
fn spawn_link_watcher(tx: mpsc::Sender<()>) {
    let socket = match interfaces::link_events() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch interfaces; new pod interfaces are attached only at start");
            return;
        }
    };
    std::thread::spawn(move || {
        while interfaces::wait_link_event(&socket).is_ok() {
            if tx.blocking_send(()).is_err() {
                return;
            }
        }
    });
}

/// Samples how full the maps are (conntrack is counted by walking it, so not on every scrape).
fn sample_fill(maps: &lb_datapath::maps::Maps, metrics: &metrics::Metrics, capacities: Capacities) {
    let ct_entries = maps.conntrack_entries().unwrap_or(0);
    metrics.flows.set((ct_entries / 2) as i64);
    let fill = |name: &str, used: usize, capacity: u32| {
        metrics
            .map_fill
            .get_or_create(&metrics::MapLabel { map: name.into() })
            .set(used as f64 / f64::from(capacity.max(1)));
    };
    fill(lb_common::maps::LB_CT, ct_entries, capacities.ct);
    fill(
        lb_common::maps::LB_SERVICES,
        metrics.frontends.get() as usize,
        lb_common::maps::capacity::SERVICES,
    );
    fill(
        lb_common::maps::LB_BACKENDS,
        metrics.backends.get() as usize,
        lb_common::maps::capacity::BACKENDS,
    );
}

/// `--socket-lb`: attaches the socket programs to `--cgroup-root` (taking over the links an
/// earlier agent pinned), or detaches the hooks an earlier run left when off.
fn socket_lb(
    args: &RunArgs,
    datapath: &mut Datapath,
    maps: &mut lb_datapath::maps::Maps,
) -> Result<()> {
    use lb_datapath::socket_lb::{self, Mode};
    let mode = match args.socket_lb {
        config::SocketLb::On => Mode::On,
        config::SocketLb::HostOnly => Mode::HostOnly,
        config::SocketLb::Off => {
            let removed = socket_lb::detach(&args.bpffs_dir)?;
            if removed > 0 {
                info!(
                    links = removed,
                    "socket-level balancing off: detached an earlier run's hooks"
                );
            }
            return Ok(());
        }
    };
    // A kernel that refused the programs (before 6.1) leaves this node as with `off`, loudly,
    // rather than failing the agent: one old node in a DaemonSet must not lose its packet path.
    if let Err(e) = datapath.sock_program(lb_common::programs::SOCK_CONNECT4) {
        error!(error = %e, "--socket-lb {mode:?} is unavailable on this kernel: the node's own processes are not served; pods keep the packet path");
        let _ = socket_lb::detach(&args.bpffs_dir);
        return Ok(());
    }
    let root = match &args.cgroup_root {
        Some(dir) => dir.clone(),
        None => socket_lb::default_cgroup_root()?,
    };
    let context = || format!("--socket-lb {mode:?}, --cgroup-root {}", root.display());
    // The configuration first: the programs must know the node's namespace before they serve.
    let host = socket_lb::netns_cookie().with_context(context)?;
    socket_lb::configure(maps, mode, host).with_context(context)?;
    socket_lb::attach(datapath, &args.bpffs_dir, &root).with_context(context)?;
    info!(cgroup = %root.display(), ?mode, "socket-level balancing on");
    Ok(())
}
