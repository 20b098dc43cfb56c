//! The Kubernetes manifests in `deploy/`, checked without a cluster: the kustomization is
//! rendered here (it only lists files), every document must decode into its Kubernetes type with
//! no field left over, the DaemonSet's command line must be accepted by the agent's own parser
//! with the environment the kubelet gives it, its probes must ask the agent's probe port, and
//! the RBAC rules must grant exactly what the agent watches.

use std::collections::{BTreeMap, BTreeSet};

use clap::Parser as _;
use k8s_openapi::{
    Resource,
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
        rbac::v1::ClusterRole,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_agent::{
    config::{Cli, Command, Source},
    source::Kind,
};
use lb_common::maps::snat;

mod manifests;

use manifests::*;

#[test]
fn every_manifest_decodes_into_its_kubernetes_type() {
    let manifests = Manifests::render(".");
    let namespace = manifests.namespace().to_owned();
    let mut kinds = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for object in &manifests.objects {
        let (kind, object_namespace, name) = object.id();
        assert!(!name.is_empty(), "a {kind} without a name");
        if object.is_namespaced() {
            assert_eq!(object_namespace, namespace, "{kind} {name}");
        } else {
            assert_eq!(object_namespace, "", "{kind} {name} is cluster-scoped");
        }
        assert!(
            ids.insert(object.id()),
            "{kind} {object_namespace}/{name} twice"
        );
        kinds.insert(kind);
    }
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "ServiceAccount"
        ])
    );

    let cleanup = Manifests::render("cleanup");
    let daemon_set = cleanup.daemon_set();
    assert_eq!(cleanup.objects.len(), 1, "the cleanup is one DaemonSet");
    assert_eq!(
        daemon_set.metadata.namespace.as_deref(),
        Some(namespace.as_str()),
        "the cleanup runs in the agent's namespace, which outlives the agent's DaemonSet"
    );
}

#[test]
fn a_misspelt_or_unknown_field_fails_the_decoding() {
    let path = deploy_dir().join("daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(decode_all(&text, "daemonset.yaml").is_ok());
    for (right, wrong, reported) in [
        ("hostNetwork: true", "hostNetwrok: true", ".hostNetwrok"),
        (
            "mountPropagation: HostToContainer",
            "mountPropogation: HostToContainer",
            ".mountPropogation",
        ),
        ("  template:\n", "  templates:\n", ".spec.templates"),
    ] {
        assert!(text.contains(right), "{right}");
        let error = decode_all(&text.replacen(right, wrong, 1), "daemonset.yaml")
            .expect_err(wrong)
            .to_string();
        assert!(
            error.contains(reported) && error.contains("no such field"),
            "{error}"
        );
    }
    // A value of the wrong type, an unknown kind, an unknown kustomization feature.
    assert!(decode_all(&text.replacen("maxSurge: 0", "maxSurge: [0]", 1), "x").is_err());
    assert!(decode_all(&text.replacen("kind: DaemonSet", "kind: Daemonset", 1), "x").is_err());
    assert!(
        serde_saphyr::from_str::<Kustomization>(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: []\nnamespace: x\n"
        )
        .is_err()
    );
}

#[test]
fn the_rendering_matches_kubectl_kustomize_where_kubectl_is_installed() {
    for dir in [".", "cleanup"] {
        let path = deploy_dir().join(dir);
        let output = match std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&path)
            .output()
        {
            Ok(output) => output,
            Err(e) => {
                eprintln!("skipped: no kubectl to compare with ({e})");
                return;
            }
        };
        assert!(
            output.status.success(),
            "kubectl kustomize {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        let by_id = |objects: Vec<Object>| -> BTreeMap<_, _> {
            objects.iter().map(|o| (o.id(), o.to_value())).collect()
        };
        let kubectl =
            by_id(decode_all(&text, "kubectl kustomize").unwrap_or_else(|e| panic!("{e}")));
        let ours = by_id(Manifests::render(dir).objects);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            kubectl.keys().collect::<Vec<_>>()
        );
        for (id, value) in &ours {
            assert_eq!(
                difference(value, &kubectl[id], ""),
                None,
                "{id:?} differs from kubectl's rendering"
            );
        }
    }
}

#[test]
fn the_agent_accepts_the_daemonsets_command_line() {
    let agent = Deployed::new();
    let argv = agent.command_line();
    let args = agent.args();

    // NODE_NAME comes from the downward API and reaches --node-name through clap's `env`.
    let node_name = agent
        .container()
        .env
        .iter()
        .flatten()
        .find(|v| v.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|f| f.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    assert_eq!(args.node_name(), NODE, "{argv:?}");

    assert_eq!(args.source, Source::Kubernetes);
    let config = agent
        .manifests
        .config_map(&agent.namespace, "lb-agent")
        .data
        .clone()
        .unwrap();
    let master = args.master.as_deref().expect("--master is set");
    assert_eq!(master, config["api-server"]);
    assert!(
        master.starts_with("https://") && master.parse().map(kube::Config::new).is_ok(),
        "{master}"
    );
    assert!(
        !args.external_iface.is_empty() && args.external_iface.iter().all(|i| !i.is_empty()),
        "{:?}",
        args.external_iface
    );
    assert!(!args.pod_ifaces.is_empty());
    for glob in &args.pod_ifaces {
        glob::Pattern::new(glob).unwrap_or_else(|e| panic!("{glob}: {e}"));
    }
    // kube-proxy's ports, so that what watches kube-proxy keeps working.
    assert_eq!(args.metrics_addr.port(), 10249);
    assert_eq!(args.healthz_addr.port(), 10256);

    // The pins live where lbctl looks by default, on the node's bpffs.
    assert_eq!(args.bpffs_dir, lb_datapath::loader::default_pin_dir());
    let bpffs = mount_of(agent.container(), "bpffs");
    assert!(args.bpffs_dir.starts_with(&bpffs.mount_path));
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    let volume = agent
        .pod()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "bpffs")
        .and_then(|v| v.host_path.as_ref())
        .expect("bpffs is a hostPath volume");
    assert_eq!(volume.path, "/sys/fs/bpf");
    assert_eq!(volume.path, bpffs.mount_path);
    assert_eq!(volume.type_.as_deref(), Some("DirectoryOrCreate"));
}

#[test]
fn the_probes_ask_the_agents_probe_port_which_kube_proxy_does_not_hold() {
    let agent = Deployed::new();
    let args = agent.args();
    let container = agent.container();
    // The kubelet probes the pod's address, which is the node's (host network); kube-proxy holds
    // the health port while both run (a migration), so the probes ask a port of the agent's own.
    assert!(args.probe_addr.ip().is_unspecified(), "{}", args.probe_addr);
    assert_ne!(args.probe_addr.port(), 10256);
    assert_ne!(args.probe_addr.port(), 10249);
    assert_eq!(agent.pod().host_network, Some(true));
    let readiness = container
        .readiness_probe
        .as_ref()
        .expect("a readiness probe");
    let liveness = container.liveness_probe.as_ref().expect("a liveness probe");
    assert_eq!(
        probe_port(container, readiness),
        ("/readyz".to_owned(), args.probe_addr.port())
    );
    assert_eq!(
        probe_port(container, liveness),
        ("/livez".to_owned(), args.probe_addr.port())
    );
}

#[test]
fn the_daemonset_runs_on_every_node_like_a_node_proxy() {
    let agent = Deployed::new();
    let daemon_set = agent.manifests.daemon_set();
    let pod = agent.pod();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // kube-proxy's DaemonSet (kubeadm's) runs on Linux nodes only, and so does this one.
    assert_eq!(
        pod.node_selector,
        Some(BTreeMap::from([(
            "kubernetes.io/os".to_owned(),
            "linux".to_owned()
        )]))
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration of every taint"
    );
    let strategy = daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));

    // Capabilities, not privileges, for the agent.
    let security = agent.container().security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    let capabilities = security.capabilities.as_ref().unwrap();
    let set = |list: &Option<Vec<String>>| -> BTreeSet<String> {
        list.iter().flatten().cloned().collect()
    };
    assert_eq!(
        set(&capabilities.add),
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"].map(String::from))
    );
    assert_eq!(set(&capabilities.drop), BTreeSet::from(["ALL".to_owned()]));

    // Every container has requests and limits, and runs the image the Containerfile builds.
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let resources = container.resources.as_ref().expect(&container.name);
        for (what, list) in [
            ("requests", &resources.requests),
            ("limits", &resources.limits),
        ] {
            let list = list
                .as_ref()
                .unwrap_or_else(|| panic!("{}: {what}", container.name));
            assert!(
                list.contains_key("cpu") && list.contains_key("memory"),
                "{}: {what}",
                container.name
            );
        }
        assert_eq!(container.image.as_deref(), Some(image().as_str()));
    }
}

#[test]
fn the_init_container_prepares_what_the_agent_cannot() {
    let agent = Deployed::new();
    let prepare = container(agent.pod(), "prepare-node");
    assert!(
        agent
            .pod()
            .init_containers
            .iter()
            .flatten()
            .any(|c| c.name == prepare.name)
    );
    // Bidirectional propagation (the bpffs it mounts must reach the node) and writing /proc/sys
    // both take a privileged container.
    assert_eq!(
        prepare.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let bpffs = mount_of(prepare, "bpffs");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    let script = prepare.args.iter().flatten().cloned().collect::<String>();
    assert!(
        script.contains(&format!("mount -t bpf bpf {}", bpffs.mount_path)),
        "{script}"
    );
    // The range the datapath source-NATs to (lb-common), the one the agent itself would reserve.
    assert!(
        script.contains("/proc/sys/net/ipv4/ip_local_reserved_ports")
            && script.contains(&format!("{}-{}", snat::PORT_MIN, snat::PORT_MAX)),
        "{script}"
    );
}

/// What the agent watches, and so must be allowed to read: the types `lb_agent::source::kube` runs its
/// watchers on (`forward::<Service>`, `forward::<EndpointSlice>` and `forward::<Node>` in
/// `lb-agent/src/source/kube.rs`), one per [`Kind`]. The match has no catch-all: a new kind
/// does not compile here until it is given its resource.
fn watched_resource(kind: Kind) -> (&'static str, &'static str) {
    fn of<K: Resource>() -> (&'static str, &'static str) {
        (K::GROUP, K::URL_PATH_SEGMENT)
    }
    match kind {
        Kind::Service => of::<Service>(),
        Kind::EndpointSlice => of::<EndpointSlice>(),
        Kind::Node => of::<Node>(),
    }
}

/// kube-runtime's watcher lists, then watches (`source/kube.rs`); `get` reads nothing more than
/// `list` does and completes the read-only set.
const READ_VERBS: [&str; 3] = ["get", "list", "watch"];
/// What the agent does with Kubernetes Events.
const EVENT_VERBS: [&str; 2] = ["create", "patch"];

#[test]
fn rbac_grants_exactly_what_the_agent_watches_and_event_writes() {
    let agent = Deployed::new();
    let manifests = &agent.manifests;
    let role = manifests.one("ClusterRole", |o| match o {
        Object::ClusterRole(r) => Some(r),
        _ => None,
    });
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for name in [group, resource, verb] {
                        assert!(!name.contains('*'), "a wildcard: {rule:?}");
                    }
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut needed: BTreeSet<_> = Kind::ALL
        .into_iter()
        .map(watched_resource)
        .flat_map(|(group, resource)| {
            READ_VERBS.map(|verb| (group.to_owned(), resource.to_owned(), verb.to_owned()))
        })
        .collect();
    // kube-runtime's event recorder creates an event, and patches it for a repeat
    // (`source/kube.rs`, objects that do not decode).
    needed.extend(EVENT_VERBS.map(|verb| ("events.k8s.io".into(), "events".into(), verb.into())));
    assert_eq!(
        granted,
        needed,
        "granted but not needed: {:?}; needed but not granted: {:?}",
        granted.difference(&needed).collect::<Vec<_>>(),
        needed.difference(&granted).collect::<Vec<_>>()
    );

    // Bound to the DaemonSet's service account, and nothing else is granted.
    let account = manifests.one("ServiceAccount", |o| match o {
        Object::ServiceAccount(a) => Some(a),
        _ => None,
    });
    let binding = manifests.one("ClusterRoleBinding", |o| match o {
        Object::ClusterRoleBinding(b) => Some(b),
        _ => None,
    });
    assert_eq!(
        (
            binding.role_ref.api_group.as_str(),
            binding.role_ref.kind.as_str(),
            Some(binding.role_ref.name.as_str())
        ),
        (
            ClusterRole::GROUP,
            ClusterRole::KIND,
            role.metadata.name.as_deref()
        )
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
    assert_eq!(
        agent.pod().service_account_name.as_ref(),
        account.metadata.name.as_ref()
    );
    assert_ne!(agent.pod().automount_service_account_token, Some(false));
}

#[test]
fn the_cleanup_daemonset_runs_the_agents_cleanup_where_the_agent_pins() {
    let agent = Deployed::new();
    let cleanup = Manifests::render("cleanup");
    let pod = pod_spec(cleanup.daemon_set());
    let init = container(pod, "cleanup");
    assert!(
        pod.init_containers
            .iter()
            .flatten()
            .any(|c| c.name == init.name)
    );
    let argv: Vec<String> = init
        .command
        .iter()
        .flatten()
        .chain(init.args.iter().flatten())
        .cloned()
        .collect();
    assert_eq!(argv.first().map(String::as_str), Some("lb-agent"));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}:\n{e}"));
    let Some(Command::Cleanup { bpffs_dir }) = cli.command else {
        panic!("{argv:?} is not `lb-agent cleanup`");
    };
    assert_eq!(bpffs_dir, agent.args().bpffs_dir);
    let mount = mount_of(init, "bpffs");
    assert!(bpffs_dir.starts_with(&mount.mount_path));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "bpffs")
        .and_then(|v| v.host_path.as_ref())
        .unwrap();
    assert_eq!(volume.path, mount.mount_path);
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert_eq!(container.image.as_deref(), Some(image().as_str()));
        let security = container.security_context.as_ref().unwrap();
        assert_ne!(security.privileged, Some(true));
        let added: Vec<&str> = security
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        // Unpinning needs none; deleting the classic tc filters of kernels without tcx needs
        // NET_ADMIN, in the node's network namespace.
        let expected: &[&str] = if container.name == init.name {
            &["NET_ADMIN"]
        } else {
            &[]
        };
        assert_eq!(added, expected, "{}", container.name);
    }
    assert_eq!(pod.host_network, Some(true));
}

#[test]
fn the_documented_image_build_produces_what_the_manifests_run() {
    let containerfile = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    assert!(
        containerfile.contains(&format!("-t {} target/image", image())),
        "the Containerfile's build command tags {}",
        image()
    );
    assert!(
        containerfile
            .lines()
            .any(|l| l.trim() == "COPY lb-agent lbctl /usr/local/bin/"),
        "both binaries land on the PATH (the manifests run `lb-agent` by name)"
    );
    let guide =
        std::fs::read_to_string(deploy_dir().join("../docs/deploy.md")).expect("docs/deploy.md");
    assert!(guide.contains(&image()), "docs/deploy.md names {}", image());
}
