//! The Kubernetes API source.
//!
//! kube-runtime's watcher does the list-then-watch work: it resumes a broken watch from the last
//! resourceVersion it saw and relists after 410 Gone. Every relist arrives as
//! `Init`/`InitApply`/`InitDone`, which maps one-to-one onto `Listing`/`Applied`/`Listed`, so the
//! agent's store infers the deletions it missed and this module keeps no state of its own.

use std::{borrow::Cow, fmt::Debug, pin::pin};

use anyhow::{Context as _, anyhow};
use futures::{StreamExt as _, future};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource,
    config::KubeConfigOptions,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event, watcher},
    },
};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use tokio::sync::mpsc::Sender;
use tracing::{info, warn};

use super::{Kind, Object, ObjectKey, PROXY_LABEL_SELECTOR, Update, notify::Notifier};

/// Written by `kubectl apply`, often as large as the object itself, and never read by the agent.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Feeds `tx` from the API server until its receiver is dropped.
///
/// API errors are logged and retried with backoff, never returned: a node agent has to outlive
/// API server restarts, network partitions and RBAC fixed after the fact. The `Result` lets the
/// agent run every source the same way.
pub async fn run(client: Client, node_name: String, tx: Sender<Update>) -> anyhow::Result<()> {
    let watches = future::join3(
        forward::<Service>(
            client.clone(),
            proxy_config(),
            tx.clone(),
            node_name.clone(),
        ),
        forward::<EndpointSlice>(
            client.clone(),
            proxy_config(),
            tx.clone(),
            node_name.clone(),
        ),
        forward::<Node>(
            client,
            node_config(&node_name),
            tx.clone(),
            node_name.clone(),
        ),
    );
    // A watch only notices the receiver is gone when it has something to send, which on a quiet
    // cluster may be never.
    tokio::select! {
        () = tx.closed() => {}
        _ = watches => {}
    }
    Ok(())
}

/// How to reach the API server (kube-proxy's `--kubeconfig` and `--master`).
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// A kubeconfig file to use instead of the pod's service account.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The API server's URL, overriding the configuration's. A kube-proxy replacement needs it
    /// when the in-cluster address is the `kubernetes` Service's ClusterIP, which it would have
    /// to balance itself before it can read how.
    pub master: Option<String>,
}

/// A client for the API server: an explicit kubeconfig, else the pod's service account, else
/// the default kubeconfig; `master` overrides the address.
///
/// In-cluster comes before the default kubeconfig because the agent normally runs as a
/// DaemonSet pod (unlike `Client::try_default`, which prefers a kubeconfig).
pub async fn client(options: &ClientOptions) -> anyhow::Result<Client> {
    let mut config = if let Some(path) = &options.kubeconfig {
        let kubeconfig = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("kubeconfig {} is unusable", path.display()))?
    } else {
        match Config::incluster() {
            Ok(config) => {
                info!(url = %config.cluster_url, "using the in-cluster Kubernetes API configuration");
                config
            }
            Err(in_cluster) => {
                let config = Config::from_kubeconfig(&KubeConfigOptions::default())
                    .await
                    .map_err(|kubeconfig| {
                        anyhow!(
                            "no Kubernetes API configuration: in-cluster (KUBERNETES_SERVICE_HOST \
                         and the pod's service account): {in_cluster}; kubeconfig (KUBECONFIG \
                         or ~/.kube/config): {kubeconfig}"
                        )
                    })?;
                info!(url = %config.cluster_url, "using the Kubernetes API configuration from the kubeconfig");
                config
            }
        }
    };
    if let Some(master) = &options.master {
        config.cluster_url = master
            .parse()
            .with_context(|| format!("--master {master:?} is not a URL"))?;
        info!(url = %config.cluster_url, "API server address from --master");
    }
    let url = config.cluster_url.clone();
    Client::try_from(config).with_context(|| format!("cannot build a Kubernetes client for {url}"))
}

/// For Services and EndpointSlices: kube-proxy's selector, so that Services delegated to another
/// proxy and headless Services (no virtual IP to balance) never reach the agent, nor their slices,
/// which carry the same labels.
fn proxy_config() -> watcher::Config {
    base_config().labels(PROXY_LABEL_SELECTOR)
}

/// Only this node: the agent needs nothing from the others, and every node watching every Node
/// would grow API server load with the square of the cluster size.
fn node_config(node_name: &str) -> watcher::Config {
    base_config().fields(&format!("metadata.name={node_name}"))
}

fn base_config() -> watcher::Config {
    // Bookmarks (on by default; stated so that it stays so) move our resourceVersion forward while
    // nothing we select changes, so a reconnect resumes the watch instead of getting 410 Gone and
    // relisting everything.
    //
    // Lists ask for resourceVersion 0 ("any"): the API server answers from its watch cache, as it
    // does for kube-proxy's informers, instead of a quorum read from etcd for each of a
    // thousand agents restarting at once. What that list misses (it may be a little behind) the
    // watch that resumes from its resourceVersion delivers. Such a list is not paged (the cache
    // answers it whole, and kube-core sends "0" only without a limit), as client-go's is not.
    watcher::Config {
        bookmarks: true,
        page_size: None,
        ..watcher::Config::default()
    }
    .any_semantic()
}

/// Forwards one kind's watch events until the receiver is gone.
async fn forward<K: Watched>(
    client: Client,
    config: watcher::Config,
    tx: Sender<Update>,
    node_name: String,
) {
    let notifier = Notifier::new(client.clone(), &node_name);
    // The watcher recovers by itself on the next poll after an error (resuming the watch, or
    // relisting); the backoff spaces those polls out so that a failing API server is not hammered.
    let api = Api::<Lenient<K>>::all(client);
    let mut events = pin!(watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                let update = update(event.modify(slim));
                if let Update::Invalid {
                    reason,
                    key: Some(key),
                    ..
                } = &update
                {
                    let note = format!("cannot decode this object and ignores it: {reason}");
                    notifier.warn(key, "InvalidObject", "Decode", &note).await;
                }
                if tx.send(update).await.is_err() {
                    return;
                }
            }
            Err(error) => warn!(
                kind = K::KIND.name(),
                error = &error as &dyn std::error::Error,
                "watch failed, retrying with backoff"
            ),
        }
    }
}

fn update<K: Watched>(event: Event<Lenient<K>>) -> Update {
    match event {
        Event::Init => Update::Listing(K::KIND),
        Event::InitApply(object) | Event::Apply(object) => match object {
            Lenient::Decoded(object) => Update::Applied(object.into_object()),
            Lenient::Undecodable { metadata, reason } => {
                let key = key_of::<K>(&metadata);
                Update::Invalid {
                    origin: key.to_string(),
                    reason,
                    key: Some(key),
                }
            }
        },
        Event::InitDone => Update::Listed(K::KIND),
        Event::Delete(object) => Update::Deleted(key_of::<K>(object.meta())),
    }
}

fn key_of<K: Watched>(metadata: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind: K::KIND,
        namespace: metadata.namespace.clone().unwrap_or_default(),
        name: metadata.name.clone().unwrap_or_default(),
    }
}

/// Tells the owner of an object the agent cannot decode why, with a Kubernetes Event on it
/// (`kubectl describe` shows it; repeats become one event's count). Best effort: without the
/// right to create events the log line and the metric remain.
/// An object of kind `K` as the API server sent it: decoded, or, when it does not decode as `K`
/// (a field of the wrong type, say), its metadata and why. kube-runtime's watcher decodes a whole
/// LIST or WATCH response with one decoder, so one bad object would fail its whole kind; with
/// this, each object decodes on its own.
#[derive(Clone, Debug)]
enum Lenient<K> {
    Decoded(K),
    /// Boxed: rare, and the decoded kinds are no smaller.
    Undecodable {
        metadata: Box<ObjectMeta>,
        reason: String,
    },
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(match K::deserialize(&value) {
            Ok(object) => Self::Decoded(object),
            Err(error) => Self::Undecodable {
                metadata: Box::new(ObjectMeta::deserialize(&value["metadata"]).unwrap_or_default()),
                reason: error.to_string(),
            },
        })
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Decoded(object) => object.meta(),
            Self::Undecodable { metadata, .. } => metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Decoded(object) => object.meta_mut(),
            Self::Undecodable { metadata, .. } => metadata,
        }
    }
}

/// Drops what every object carries but the agent never reads: it keeps every object for its whole
/// life, and managedFields alone is often larger than the rest of the object.
fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

/// The watched types, tied to their [`Kind`] and [`Object`] variant.
trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static {
    const KIND: Kind;
    fn into_object(self) -> Object;
}

impl Watched for Service {
    const KIND: Kind = Kind::Service;
    fn into_object(self) -> Object {
        Object::Service(Box::new(self))
    }
}

impl Watched for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn into_object(self) -> Object {
        Object::EndpointSlice(Box::new(self))
    }
}

impl Watched for Node {
    const KIND: Kind = Kind::Node;
    fn into_object(self) -> Object {
        Object::Node(Box::new(self))
    }
}
