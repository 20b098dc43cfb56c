//! The manifests as the tests read them: the kustomization rendered (it only lists files),
//! every document decoded strictly into its Kubernetes type, the DaemonSet's environment and
//! command line expanded as the kubelet does, and the agent's own parser run on it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, Parser as _, parser::ValueSource};
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Probe, ServiceAccount, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_agent::config::{Cli, RunArgs};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The node name the downward API (`spec.nodeName`) hands the agent in these tests.
pub const NODE: &str = "node-a";

/// The image every manifest runs, as the Containerfile's documented build command tags it.
pub fn image() -> String {
    format!("localhost/lb:{}", env!("CARGO_PKG_VERSION"))
}

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// A kustomization as far as [`render`] renders it: a list of files or directories. Anything
/// else (patches, generators, a namespace or image transformer) would change what
/// `kubectl apply -k` sends, so an unknown field fails instead of being ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Kustomization {
    pub api_version: String,
    pub kind: String,
    pub resources: Vec<String>,
}

/// One rendered document, decoded.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
}

impl Object {
    /// Kind, namespace (empty when cluster-scoped) and name.
    pub fn id(&self) -> (&'static str, String, String) {
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

    pub fn is_namespaced(&self) -> bool {
        matches!(
            self,
            Self::ServiceAccount(_) | Self::ConfigMap(_) | Self::DaemonSet(_)
        )
    }

    pub fn to_value(&self) -> Value {
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
pub fn decode_strictly<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let again = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match difference(value, &again, "") {
        Some(difference) => Err(difference),
        None => Ok(typed),
    }
}

/// Where `written` and `decoded` first differ, as a path into the document.
pub fn difference(written: &Value, decoded: &Value, path: &str) -> Option<String> {
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
pub fn decode(value: &Value) -> Result<Object, String> {
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
pub fn decode_all(text: &str, origin: &str) -> Result<Vec<Object>, String> {
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
pub fn render(dir: &Path) -> Result<Vec<Object>, String> {
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
pub struct Manifests {
    pub objects: Vec<Object>,
}

impl Manifests {
    pub fn render(dir: &str) -> Self {
        Self {
            objects: render(&deploy_dir().join(dir)).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn all<T>(&self, pick: impl Fn(&Object) -> Option<&T>) -> Vec<&T> {
        self.objects.iter().filter_map(pick).collect()
    }

    pub fn one<T>(&self, what: &str, pick: impl Fn(&Object) -> Option<&T>) -> &T {
        match self.all(pick).as_slice() {
            [one] => one,
            other => panic!("expected one {what}, found {}", other.len()),
        }
    }

    pub fn namespace(&self) -> &str {
        self.one("Namespace", |o| match o {
            Object::Namespace(n) => Some(n),
            _ => None,
        })
        .metadata
        .name
        .as_deref()
        .unwrap()
    }

    pub fn daemon_set(&self) -> &DaemonSet {
        self.one("DaemonSet", |o| match o {
            Object::DaemonSet(d) => Some(d.as_ref()),
            _ => None,
        })
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> &ConfigMap {
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

pub fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod template")
}

pub fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
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
pub fn environment(
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
pub fn expand(text: &str, env: &BTreeMap<String, String>, used: &mut BTreeSet<String>) -> String {
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
pub fn agent_command_line(
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

pub fn parse_agent(argv: &[String]) -> RunArgs {
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}:\n{e}"));
    assert!(cli.command.is_none(), "{argv:?} is not the agent");
    cli.run
}

/// The manifests of `deploy/`, seen from the agent's side.
pub struct Deployed {
    pub manifests: Manifests,
    pub namespace: String,
}

impl Deployed {
    pub fn new() -> Self {
        let manifests = Manifests::render(".");
        let namespace = manifests.namespace().to_owned();
        Self {
            manifests,
            namespace,
        }
    }

    pub fn pod(&self) -> &PodSpec {
        pod_spec(self.manifests.daemon_set())
    }

    pub fn container(&self) -> &Container {
        container(self.pod(), "agent")
    }

    pub fn command_line(&self) -> Vec<String> {
        agent_command_line(&self.manifests, &self.namespace, self.container())
    }

    pub fn args(&self) -> RunArgs {
        parse_agent(&self.command_line())
    }
}

/// The port a probe asks, resolving a named port through the container's ports.
pub fn probe_port(container: &Container, probe: &Probe) -> (String, u16) {
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

pub fn mount_of<'a>(container: &'a Container, volume: &str) -> &'a VolumeMount {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("{} does not mount {volume}", container.name))
}
