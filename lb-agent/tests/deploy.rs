//! The Kubernetes manifests in `deploy/`, checked without a cluster: the kustomization is
//! rendered here (it only lists files), every document must decode into its Kubernetes type with
//! no field left over, the DaemonSet's command line must be accepted by the agent's own parser
//! with the environment the kubelet gives it, its probes must ask the agent's health port, and
//! the RBAC rules must grant exactly what the agent watches.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, Parser as _, parser::ValueSource};
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{
            ConfigMap, Container, Namespace, Node, PodSpec, Probe, Service, ServiceAccount,
            VolumeMount,
        },
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_agent::{
    config::{Cli, Command, RunArgs, Source},
    source::Kind,
};
use lb_common::maps::snat;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The node name the downward API (`spec.nodeName`) hands the agent in these tests.
const NODE: &str = "node-a";

/// The image every manifest runs, as the Containerfile's documented build command tags it.
fn image() -> String {
    format!("localhost/lb:{}", env!("CARGO_PKG_VERSION"))
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// A kustomization as far as [`render`] renders it: a list of files or directories. Anything
/// else (patches, generators, a namespace or image transformer) would change what
/// `kubectl apply -k` sends, so an unknown field fails instead of being ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
}

/// One rendered document, decoded.
#[derive(Debug, Clone)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
}

impl Object {
    /// Kind, namespace (empty when cluster-scoped) and name.
    fn id(&self) -> (&'static str, String, String) {
        let (kind, meta) = match self {
            Self::Namespace(o) => (Namespace::KIND, &o.metadata),
            Self::ServiceAccount(o) => (ServiceAccount::KIND, &o.metadata),
            Self::ClusterRole(o) => (ClusterRole::KIND, &o.metadata),
            Self::ClusterRoleBinding(o) => (ClusterRoleBinding::KIND, &o.metadata),
            Self::ConfigMap(o) => (ConfigMap::KIND, &o.metadata),
            Self::DaemonSet(o) => (DaemonSet::KIND, &o.metadata),
        };
        (
            kind,
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }

    fn is_namespaced(&self) -> bool {
        matches!(
            self,
            Self::ServiceAccount(_) | Self::ConfigMap(_) | Self::DaemonSet(_)
        )
    }

    fn to_value(&self) -> Value {
        match self {
            Self::Namespace(o) => serde_json::to_value(o),
            Self::ServiceAccount(o) => serde_json::to_value(o),
            Self::ClusterRole(o) => serde_json::to_value(o),
            Self::ClusterRoleBinding(o) => serde_json::to_value(o),
            Self::ConfigMap(o) => serde_json::to_value(o),
            Self::DaemonSet(o) => serde_json::to_value(o),
        }
        .unwrap()
    }
}

/// Decodes `value` as `T` and requires that encoding it again gives `value` back: the Kubernetes
/// types skip fields they do not know, so a misspelt or misplaced field shows up as missing.
fn decode_strictly<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let again = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match difference(value, &again, "") {
        Some(difference) => Err(difference),
        None => Ok(typed),
    }
}

/// Where `written` and `decoded` first differ, as a path into the document.
fn difference(written: &Value, decoded: &Value, path: &str) -> Option<String> {
    match (written, decoded) {
        (Value::Object(written), Value::Object(decoded)) => {
            for (key, value) in written {
                let path = format!("{path}.{key}");
                match decoded.get(key) {
                    None => {
                        return Some(format!(
                            "{path}: no such field in the Kubernetes type (misspelt or misplaced?)"
                        ));
                    }
                    Some(again) => {
                        if let Some(found) = difference(value, again, &path) {
                            return Some(found);
                        }
                    }
                }
            }
            decoded
                .keys()
                .find(|key| !written.contains_key(*key))
                .map(|key| format!("{path}.{key}: appears when decoded"))
        }
        (Value::Array(written), Value::Array(decoded)) if written.len() == decoded.len() => written
            .iter()
            .zip(decoded)
            .enumerate()
            .find_map(|(i, (a, b))| difference(a, b, &format!("{path}[{i}]"))),
        _ if written == decoded => None,
        _ => Some(format!("{path}: {written} decodes as {decoded}")),
    }
}

/// Decodes one document by its apiVersion and kind.
fn decode(value: &Value) -> Result<Object, String> {
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    let is = |api_version_and_kind: (&str, &str)| api_version_and_kind == (api_version, kind);
    macro_rules! kinds {
        ($($variant:ident),*) => {
            $(if is((<$variant as Resource>::API_VERSION, <$variant as Resource>::KIND)) {
                return decode_strictly(value).map(|o: $variant| Object::$variant(o.into()));
            })*
        };
    }
    kinds!(
        Namespace,
        ServiceAccount,
        ClusterRole,
        ClusterRoleBinding,
        ConfigMap,
        DaemonSet
    );
    Err(format!(
        "{api_version} {kind}: a kind this test does not know (teach it to `decode`)"
    ))
}

/// Decodes every document of a (multi-document) YAML text; `origin` names it in errors.
fn decode_all(text: &str, origin: &str) -> Result<Vec<Object>, String> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("{origin}: not YAML: {e}"))?;
    documents
        .iter()
        .enumerate()
        // An empty document (a trailing `---`) is skipped, as kustomize skips it.
        .filter(|(_, document)| !document.is_null())
        .map(|(i, document)| {
            decode(document).map_err(|e| format!("{origin}, document {}: {e}", i + 1))
        })
        .collect()
}

/// What `kubectl apply -k dir` applies: the documents of every file the kustomization lists, in
/// order (a listed directory is a kustomization of its own).
fn render(dir: &Path) -> Result<Vec<Object>, String> {
    let path = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let kustomization: Kustomization =
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if (
        kustomization.api_version.as_str(),
        kustomization.kind.as_str(),
    ) != ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    {
        return Err(format!("{}: not a Kustomization", path.display()));
    }
    let mut objects = Vec::new();
    for resource in &kustomization.resources {
        let path = dir.join(resource);
        if path.is_dir() {
            objects.extend(render(&path)?);
        } else {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            objects.extend(decode_all(&text, &path.display().to_string())?);
        }
    }
    Ok(objects)
}

/// The rendered manifests of `deploy/` (or of a directory under it).
struct Manifests {
    objects: Vec<Object>,
}

impl Manifests {
    fn render(dir: &str) -> Self {
        Self {
            objects: render(&deploy_dir().join(dir)).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    fn all<T>(&self, pick: impl Fn(&Object) -> Option<&T>) -> Vec<&T> {
        self.objects.iter().filter_map(pick).collect()
    }

    fn one<T>(&self, what: &str, pick: impl Fn(&Object) -> Option<&T>) -> &T {
        match self.all(pick).as_slice() {
            [one] => one,
            other => panic!("expected one {what}, found {}", other.len()),
        }
    }

    fn namespace(&self) -> &str {
        self.one("Namespace", |o| match o {
            Object::Namespace(n) => Some(n),
            _ => None,
        })
        .metadata
        .name
        .as_deref()
        .unwrap()
    }

    fn daemon_set(&self) -> &DaemonSet {
        self.one("DaemonSet", |o| match o {
            Object::DaemonSet(d) => Some(d.as_ref()),
            _ => None,
        })
    }

    fn config_map(&self, namespace: &str, name: &str) -> &ConfigMap {
        self.one(&format!("ConfigMap {namespace}/{name}"), |o| match o {
            Object::ConfigMap(c)
                if c.metadata.namespace.as_deref() == Some(namespace)
                    && c.metadata.name.as_deref() == Some(name) =>
            {
                Some(c)
            }
            _ => None,
        })
    }
}

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod template")
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

// ---------------------------------------------------------------------------------------------
// The agent's command line, as the kubelet builds it

/// The container's environment as the kubelet resolves it: literal values, the downward API's
/// `spec.nodeName` (as [`NODE`]) and ConfigMap keys from the manifests.
fn environment(
    manifests: &Manifests,
    namespace: &str,
    container: &Container,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) => value.clone(),
            (None, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    assert_eq!(
                        field.field_path, "spec.nodeName",
                        "{}: teach the test this field",
                        var.name
                    );
                    NODE.to_owned()
                } else if let Some(key) = &from.config_map_key_ref {
                    assert_ne!(key.optional, Some(true), "{}: optional key", var.name);
                    manifests
                        .config_map(namespace, &key.name)
                        .data
                        .as_ref()
                        .and_then(|data| data.get(&key.key))
                        .unwrap_or_else(|| {
                            panic!(
                                "{}: ConfigMap {} has no key {}",
                                var.name, key.name, key.key
                            )
                        })
                        .clone()
                } else {
                    panic!("{}: teach the test this source: {from:?}", var.name)
                }
            }
            _ => panic!("{}: neither a value nor a source", var.name),
        };
        assert!(
            env.insert(var.name.clone(), value).is_none(),
            "{} is set twice",
            var.name
        );
    }
    env
}

/// Kubernetes' expansion of `$(NAME)` in command and args: a defined variable is replaced, an
/// undefined reference stays as written, `$$` is a `$`. Returns the names it used.
fn expand(text: &str, env: &BTreeMap<String, String>, used: &mut BTreeSet<String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = after
            .strip_prefix('(')
            .and_then(|inner| inner.split_once(')'))
            .filter(|(name, _)| env.contains_key(*name))
        {
            out.push_str(&env[name]);
            used.insert(name.to_owned());
            rest = after;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The agent container's command line as the agent sees it, with the values clap would take from
/// the environment (e.g. `NODE_NAME` for `--node-name`) written as flags, so that the test does
/// not depend on its own process environment. Also checks that every variable is used.
fn agent_command_line(
    manifests: &Manifests,
    namespace: &str,
    container: &Container,
) -> Vec<String> {
    let env = environment(manifests, namespace, container);
    let mut used = BTreeSet::new();
    let mut argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|arg| expand(arg, &env, &mut used))
        .collect();
    for arg in &argv {
        assert!(!arg.contains("$("), "{arg}: an undefined variable");
    }
    let program = argv.first().expect("the container names its command");
    assert_eq!(
        Path::new(program).file_name().and_then(|n| n.to_str()),
        Some("lb-agent"),
        "{program}"
    );

    let command = Cli::command();
    let matches = command
        .clone()
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let mut from_env = Vec::new();
    for arg in command.get_arguments() {
        let Some(name) = arg.get_env().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(value) = env.get(name) else {
            continue;
        };
        used.insert(name.to_owned());
        if matches.value_source(arg.get_id().as_str()) != Some(ValueSource::CommandLine) {
            let long = arg
                .get_long()
                .expect("an environment-backed flag has a long name");
            from_env.push(format!("--{long}={value}"));
        }
    }
    argv.extend(from_env);
    let unused: Vec<_> = env.keys().filter(|name| !used.contains(*name)).collect();
    assert!(
        unused.is_empty(),
        "set but read by nothing (neither $(NAME) in the arguments nor lb-agent): {unused:?}"
    );
    argv
}

fn parse_agent(argv: &[String]) -> RunArgs {
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}:\n{e}"));
    assert!(cli.command.is_none(), "{argv:?} is not the agent");
    cli.run
}

/// The manifests of `deploy/`, seen from the agent's side.
struct Deployed {
    manifests: Manifests,
    namespace: String,
}

impl Deployed {
    fn new() -> Self {
        let manifests = Manifests::render(".");
        let namespace = manifests.namespace().to_owned();
        Self {
            manifests,
            namespace,
        }
    }

    fn pod(&self) -> &PodSpec {
        pod_spec(self.manifests.daemon_set())
    }

    fn container(&self) -> &Container {
        container(self.pod(), "agent")
    }

    fn command_line(&self) -> Vec<String> {
        agent_command_line(&self.manifests, &self.namespace, self.container())
    }

    fn args(&self) -> RunArgs {
        parse_agent(&self.command_line())
    }
}

/// The port a probe asks, resolving a named port through the container's ports.
fn probe_port(container: &Container, probe: &Probe) -> (String, u16) {
    let get = probe.http_get.as_ref().expect("an HTTP probe");
    assert!(
        get.host.is_none(),
        "the kubelet must ask the pod's (the node's) address"
    );
    assert!(matches!(get.scheme.as_deref(), None | Some("HTTP")));
    let port = match &get.port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    };
    (
        get.path.clone().unwrap_or_default(),
        u16::try_from(port).unwrap(),
    )
}

fn mount_of<'a>(container: &'a Container, volume: &str) -> &'a VolumeMount {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("{} does not mount {volume}", container.name))
}

// ---------------------------------------------------------------------------------------------
// Tests

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
fn the_probes_ask_the_agents_health_port() {
    let agent = Deployed::new();
    let args = agent.args();
    let container = agent.container();
    // The kubelet probes the pod's address, which is the node's (host network).
    assert!(
        args.healthz_addr.ip().is_unspecified(),
        "{}",
        args.healthz_addr
    );
    assert_eq!(agent.pod().host_network, Some(true));
    let readiness = container
        .readiness_probe
        .as_ref()
        .expect("a readiness probe");
    let liveness = container.liveness_probe.as_ref().expect("a liveness probe");
    assert_eq!(
        probe_port(container, readiness),
        ("/readyz".to_owned(), args.healthz_addr.port())
    );
    assert_eq!(
        probe_port(container, liveness),
        ("/healthz".to_owned(), args.healthz_addr.port())
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

#[test]
fn rbac_grants_exactly_what_the_agent_watches() {
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
    let needed: BTreeSet<_> = Kind::ALL
        .into_iter()
        .map(watched_resource)
        .flat_map(|(group, resource)| {
            READ_VERBS.map(|verb| (group.to_owned(), resource.to_owned(), verb.to_owned()))
        })
        .collect();
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
