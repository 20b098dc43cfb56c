//! Objects from YAML files: one file, or every `.yaml`/`.yml`/`.json` file of a directory, each
//! possibly holding several documents (`---`), each a v1 Service, a discovery.k8s.io/v1
//! EndpointSlice or a v1 Node exactly as the API serves them. Edits are picked up while running
//! (inotify), re-reading only the files that changed.
//!
//! Documents are decoded one by one: a malformed document is reported (file, document number,
//! object name when it has one, reason) and skipped; the rest of its file and every other file
//! keep working.

use std::{
    collections::{BTreeSet, HashMap},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use super::{Kind, Object, ObjectKey, Update};

/// How long to wait for an editor's burst of events to settle before re-reading.
const SETTLE: Duration = Duration::from_millis(5);

/// A decoded document and a digest of its text (to tell a changed object from a re-saved one).
type Decoded = (Object, u64);

/// What one file currently contributes: its objects and their digests (a short list, so a Vec:
/// there is one per file).
#[derive(Default)]
struct FileObjects {
    objects: Vec<(ObjectKey, u64)>,
}

impl FileObjects {
    fn digest(&self, key: &ObjectKey) -> Option<u64> {
        self.objects.iter().find(|(k, _)| k == key).map(|(_, d)| *d)
    }

    fn contains(&self, key: &ObjectKey) -> bool {
        self.digest(key).is_some()
    }
}

fn is_config_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Splits a YAML stream into its documents (lines that are exactly `---`, or start with
/// `--- `, separate documents). Blank documents are dropped.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut index = 1;
    for line in text.lines() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            if !current.trim().is_empty() {
                docs.push((index, std::mem::take(&mut current)));
            }
            current.clear();
            index += 1;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    if !current.trim().is_empty() {
        docs.push((index, current));
    }
    docs
}

/// Decodes one document: its object, or each item of a `List` (as `kubectl get -o yaml`
/// prints), with a digest of its text; kinds the agent does not watch are left out.
fn decode(text: &str) -> Vec<Result<Decoded, String>> {
    // JSON (what the API server and `kubectl get -o json` write, and a subset of YAML) is read
    // straight into the objects, several times faster than through the YAML parser. A document
    // that only looks like JSON (a YAML flow mapping) goes to the YAML parser, whose reason is
    // then reported only if JSON was not meant.
    let mut json_error = None;
    if text.trim_start().starts_with('{') {
        match decode_json(text) {
            Ok(decoded) => return decoded,
            Err(e) => json_error = Some(e),
        }
    }
    let value: serde_json::Value = match serde_saphyr::from_str(text) {
        Ok(v) => v,
        Err(yaml) => {
            return vec![Err(match json_error {
                Some(json) => format!("not valid JSON: {json}"),
                None => format!("not valid YAML: {yaml}"),
            })];
        }
    };
    let is_list = value["kind"].as_str().is_some_and(|k| k.ends_with("List"));
    match value {
        serde_json::Value::Object(mut map) if is_list => match map.remove("items") {
            Some(serde_json::Value::Array(items)) => items
                .into_iter()
                .filter_map(|item| {
                    let hash = digest_value(&item);
                    decode_value(item).map(|o| o.map(|o| (o, hash))).transpose()
                })
                .collect(),
            _ => vec![Err("a List without items".into())],
        },
        value => decode_value(value)
            .map(|o| o.map(|o| (o, digest(text))))
            .transpose()
            .into_iter()
            .collect(),
    }
}

/// What identifies an object, read before the object itself.
#[derive(Default, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Head {
    api_version: String,
    kind: String,
    metadata: HeadMeta,
}

#[derive(Default, serde::Deserialize)]
#[serde(default)]
struct HeadMeta {
    name: Option<String>,
    namespace: Option<String>,
}

impl Head {
    /// "Kind namespace/name", for what is reported about it.
    fn what(&self) -> String {
        let name = self.metadata.name.as_deref().unwrap_or("<no name>");
        match self.metadata.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => format!("{} {ns}/{name}", self.kind),
            _ => format!("{} {name}", self.kind),
        }
    }
}

/// The items of a `List`, each left as its text.
#[derive(serde::Deserialize)]
struct JsonList<'a> {
    #[serde(borrow)]
    items: Option<Vec<&'a serde_json::value::RawValue>>,
}

/// Decodes a JSON document; an error when it is not JSON (or not JSON of the expected shape).
fn decode_json(text: &str) -> Result<Vec<Result<Decoded, String>>, serde_json::Error> {
    let head: Head = serde_json::from_str(text)?;
    if !head.kind.ends_with("List") {
        return Ok(decode_json_object(head, text, digest(text))
            .into_iter()
            .collect());
    }
    let Some(items) = serde_json::from_str::<JsonList<'_>>(text)?.items else {
        return Ok(vec![Err("a List without items".into())]);
    };
    Ok(items
        .into_iter()
        .filter_map(|item| {
            let text = item.get();
            match serde_json::from_str::<Head>(text) {
                Ok(head) => decode_json_object(head, text, digest(text)),
                Err(e) => Some(Err(format!("a List item does not decode: {e}"))),
            }
        })
        .collect())
}

/// Decodes one JSON object whose `head` was read; `None` for kinds the agent does not watch.
fn decode_json_object(head: Head, text: &str, hash: u64) -> Option<Result<Decoded, String>> {
    let mut de = serde_json::Deserializer::from_str(text);
    decode_as(&head.api_version, &head.kind, &head.what(), &mut de)
        .map(|o| o.map(|o| (o, hash)))
        .transpose()
}

/// Decodes one object; `Ok(None)` for kinds the agent does not watch.
fn decode_value(value: serde_json::Value) -> Result<Option<Object>, String> {
    let name = |v: &serde_json::Value| {
        let meta = &v["metadata"];
        let ns = meta["namespace"].as_str().unwrap_or_default();
        let n = meta["name"].as_str().unwrap_or("<no name>");
        if ns.is_empty() {
            n.to_owned()
        } else {
            format!("{ns}/{n}")
        }
    };
    let api = value["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = value["kind"].as_str().unwrap_or_default().to_owned();
    let what = format!("{kind} {}", name(&value));
    decode_as(&api, &kind, &what, value)
}

/// Decodes an object of type `api`/`kind` (`what` names it) from `de`; `Ok(None)` for kinds the
/// agent does not watch.
fn decode_as<'de, D>(api: &str, kind: &str, what: &str, de: D) -> Result<Option<Object>, String>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize as _;
    let object = match (api, kind) {
        ("v1", "Service") => Service::deserialize(de).map(|o| Object::Service(Box::new(o))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            EndpointSlice::deserialize(de).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        ("v1", "Node") => Node::deserialize(de).map(|o| Object::Node(Box::new(o))),
        _ => return Ok(None),
    }
    .map_err(|e| format!("{what} does not decode: {e}"))?;
    let key = object.key();
    if key.name.is_empty() || (key.kind != Kind::Node && key.namespace.is_empty()) {
        return Err(format!("{what} has no namespace or name"));
    }
    Ok(Some(object))
}

/// Decodes every document of a YAML stream: the objects, and a reason per document that could
/// not be decoded (for fixtures and tools; the source itself reports per file and document).
pub fn parse(text: &str) -> (Vec<Object>, Vec<String>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, doc) in documents(text) {
        for decoded in decode(&doc) {
            match decoded {
                Ok((o, _)) => objects.push(o),
                Err(reason) => errors.push(format!("document {index}: {reason}")),
            }
        }
    }
    (objects, errors)
}

fn digest(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// A digest of a decoded item of a `List` (whose own text is not at hand), computed over its
/// structure rather than a re-serialisation of it.
fn digest_value(value: &serde_json::Value) -> u64 {
    fn feed(value: &serde_json::Value, h: &mut DefaultHasher) {
        use serde_json::Value;
        // The variant first, so that `"1"` and `1`, or `[]` and `{}`, differ.
        std::mem::discriminant(value).hash(h);
        match value {
            Value::Null => {}
            Value::Bool(b) => b.hash(h),
            Value::Number(n) => n.hash(h),
            Value::String(s) => s.hash(h),
            Value::Array(items) => {
                items.len().hash(h);
                items.iter().for_each(|v| feed(v, h));
            }
            Value::Object(map) => {
                map.len().hash(h);
                for (k, v) in map {
                    k.hash(h);
                    feed(v, h);
                }
            }
        }
    }
    let mut h = DefaultHasher::new();
    feed(value, &mut h);
    h.finish()
}

/// Reads and decodes one file: its objects and what could not be read.
fn read_file(path: &Path) -> (Vec<Decoded>, Vec<Update>) {
    let mut objects = Vec::new();
    let mut invalid = Vec::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            invalid.push(Update::Invalid {
                origin: path.display().to_string(),
                reason: format!("cannot read: {e}"),
                key: None,
            });
            return (objects, invalid);
        }
    };
    for (index, doc) in documents(&text) {
        for decoded in decode(&doc) {
            match decoded {
                Ok(object) => objects.push(object),
                Err(reason) => invalid.push(Update::Invalid {
                    origin: format!("{} document {index}", path.display()),
                    reason,
                    key: None,
                }),
            }
        }
    }
    (objects, invalid)
}

fn config_files(root: &Path) -> Result<Vec<PathBuf>> {
    if root.is_file() {
        return Ok(vec![root.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read directory {}", root.display()))?
        .filter_map(Result::ok)
        .filter(|e| is_config_file(&e.path()))
        // The directory entry's own type spares a stat per file; symbolic links (as a mounted
        // ConfigMap has) are followed.
        .filter(|e| match e.file_type() {
            Ok(t) if t.is_symlink() => e.path().is_file(),
            Ok(t) => t.is_file(),
            Err(_) => false,
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// The source state: which objects each file holds.
struct Files {
    root: PathBuf,
    // Hashed: comparing paths component by component made a B-tree of ten thousand files a
    // noticeable part of the initial listing.
    files: HashMap<PathBuf, FileObjects>,
}

impl Files {
    /// Re-reads `path` (gone, changed or new) and returns the updates it implies.
    fn refresh(&mut self, path: &Path) -> Vec<Update> {
        let read = if path.is_file() {
            read_file(path)
        } else {
            (Vec::new(), Vec::new())
        };
        self.record(path, read)
    }

    /// Records what `path` holds now (`read`: its decoded objects and problems) and returns the
    /// updates that implies.
    fn record(&mut self, path: &Path, read: (Vec<Decoded>, Vec<Update>)) -> Vec<Update> {
        let (decoded, mut updates) = read;
        let previous = self.files.remove(path).unwrap_or_default();
        let mut now = FileObjects::default();
        for (object, hash) in decoded {
            let key = object.key();
            if previous.digest(&key) != Some(hash) {
                updates.push(Update::Applied(object));
            }
            now.objects.push((key, hash));
        }
        for (key, _) in previous.objects.iter().filter(|(k, _)| !now.contains(k)) {
            // An object that moved to another file is not deleted.
            if !self.files.values().any(|f| f.contains(key)) {
                updates.push(Update::Deleted(key.clone()));
            }
        }
        if !now.objects.is_empty() || path.is_file() {
            now.objects.shrink_to_fit();
            self.files.insert(path.to_owned(), now);
        }
        updates
    }
}

/// Files a listing worker reads before handing their objects over: one hand-over per file woke
/// the receiving thread ten thousand times for as many files.
const LISTING_CHUNK: usize = 32;

/// The initial listing: `paths` read and decoded on every core (decoding dominates it), their
/// updates sent as they come, so that at most a few chunks' objects are in memory at once.
fn list_all(files: &mut Files, paths: &[PathBuf], tx: &mpsc::Sender<Update>) -> Result<()> {
    let chunks: Vec<&[PathBuf]> = paths.chunks(LISTING_CHUNK).collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks.len().max(1));
    type Read = Vec<(usize, (Vec<Decoded>, Vec<Update>))>;
    let (done_tx, done) = std::sync::mpsc::sync_channel::<Read>(workers * 2);
    std::thread::scope(|scope| {
        for worker in 0..workers {
            let done_tx = done_tx.clone();
            let chunks = &chunks;
            scope.spawn(move || {
                for index in (worker..chunks.len()).step_by(workers) {
                    let first = index * LISTING_CHUNK;
                    let read = chunks[index]
                        .iter()
                        .enumerate()
                        .map(|(i, path)| (first + i, read_file(path)))
                        .collect();
                    if done_tx.send(read).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        for chunk in done {
            for (index, read) in chunk {
                for update in files.record(&paths[index], read) {
                    tx.blocking_send(update)
                        .map_err(|_| anyhow::anyhow!("the agent stopped listening"))?;
                }
            }
        }
        Ok(())
    })
}

/// Runs the files source: an initial full listing, then updates as files change, until the
/// receiver goes away.
pub async fn run(root: PathBuf, tx: mpsc::Sender<Update>) -> Result<()> {
    anyhow::ensure!(root.exists(), "source {} does not exist", root.display());
    let mut files = Files {
        root: root.clone(),
        files: HashMap::new(),
    };

    // Watch before the first read so that no edit slips between the two.
    let (events_tx, mut events) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |e| {
        let _ = events_tx.send(e);
    })
    .context("cannot start watching files (inotify)")?;
    // A single file is watched through its directory: editors replace files by renaming.
    let watched = if root.is_file() {
        root.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_owned)
    } else {
        root.clone()
    };
    watcher
        .watch(&watched, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", watched.display()))?;

    for kind in Kind::ALL {
        send(&tx, Update::Listing(kind)).await?;
    }
    let paths = config_files(&root)?;
    let listing_tx = tx.clone();
    let mut files = tokio::task::spawn_blocking(move || {
        list_all(&mut files, &paths, &listing_tx).map(|()| files)
    })
    .await
    .context("the initial listing panicked")??;
    for kind in Kind::ALL {
        send(&tx, Update::Listed(kind)).await?;
    }

    while let Some(event) = events.recv().await {
        let mut changed = BTreeSet::new();
        let mut collect = |event: notify::Result<notify::Event>| match event {
            // Reads (ours included: reading a file reports it opened and accessed) change nothing.
            Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => {}
            Ok(e) => changed.extend(e.paths),
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        };
        collect(event);
        tokio::time::sleep(SETTLE).await;
        while let Ok(e) = events.try_recv() {
            collect(e);
        }
        for path in changed {
            let ours = if files.root.is_file() {
                path == files.root
            } else {
                is_config_file(&path) && path.parent() == Some(files.root.as_path())
            };
            if !ours {
                continue;
            }
            for update in files.refresh(&path) {
                send(&tx, update).await?;
            }
        }
    }
    Ok(())
}

async fn send(tx: &mpsc::Sender<Update>, update: Update) -> Result<()> {
    tx.send(update)
        .await
        .map_err(|_| anyhow::anyhow!("the agent stopped listening"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_on_separators_only() {
        let text = "a: 1\n---\nb: 2\n--- # comment\nc: 3\n---\n\n";
        let docs = documents(text);
        assert_eq!(docs.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(docs[1].1, "b: 2\n");
    }

    fn one_error(text: &str) -> String {
        match decode(text).as_slice() {
            [Err(reason)] => reason.clone(),
            other => panic!("expected one error, got {} results", other.len()),
        }
    }

    #[test]
    fn decoding_reports_the_object_and_the_reason() {
        let bad = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  ports:\n  - port: eighty\n";
        let err = one_error(bad);
        assert!(err.contains("Service shop/web"), "{err}");
        assert!(decode("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n").is_empty());
        assert!(one_error("not: [valid").contains("not valid YAML"));
    }

    #[test]
    fn json_is_decoded_as_json_and_flow_mappings_still_as_yaml() {
        let json = r#"{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}"#;
        let flow = "{apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}, spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}}";
        for text in [json, flow] {
            let decoded = decode(text);
            let [Ok((object, _))] = decoded.as_slice() else {
                panic!(
                    "{text}: {:?}",
                    decoded.iter().map(|d| d.as_ref().err()).collect::<Vec<_>>()
                )
            };
            assert_eq!(object.key().name, "web");
        }
        assert!(one_error(r#"{"apiVersion": "v1", "kind": "Service", "spec": {"ports": [{"port": "x"}]}, "metadata": {"name": "web", "namespace": "shop"}}"#).contains("Service shop/web"));
        assert!(one_error("{\"apiVersion\": ").contains("not valid JSON"));
    }

    #[test]
    fn items_of_a_list_keep_their_digest_until_they_change() {
        let item = |ip: &str| {
            format!(
                r#"{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "web", "namespace": "shop"}}, "spec": {{"clusterIP": "{ip}", "ports": [{{"port": 80}}]}}}}"#
            )
        };
        let list = |a: &str, b: &str| {
            format!(
                r#"{{"apiVersion": "v1", "kind": "List", "items": [{}, {}]}}"#,
                item(a),
                item(b).replace("web", "api")
            )
        };
        let digests =
            |text: &str| -> Vec<u64> { decode(text).into_iter().map(|d| d.unwrap().1).collect() };
        let before = digests(&list("10.96.0.1", "10.96.0.2"));
        let after = digests(&list("10.96.0.1", "10.96.0.3"));
        assert_eq!(before[0], after[0], "an unchanged item keeps its digest");
        assert_ne!(before[1], after[1], "a changed item does not");
        assert_ne!(
            digest_value(&serde_json::json!({"a": "1"})),
            digest_value(&serde_json::json!({"a": 1}))
        );
    }

    #[test]
    fn lists_as_kubectl_prints_them_are_unpacked_item_by_item() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a, namespace: shop}\n  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: c, namespace: shop}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b, namespace: shop}\n  spec: {ports: [{port: x}]}\n";
        let decoded = decode(list);
        assert_eq!(decoded.len(), 2, "the ConfigMap is left out");
        let Ok((first, _)) = &decoded[0] else {
            panic!("{:?}", decoded[0].as_ref().err())
        };
        assert_eq!(first.key().name, "a");
        assert!(decoded[1].as_ref().unwrap_err().contains("Service shop/b"));
        assert_eq!(
            one_error("apiVersion: v1\nkind: ServiceList\nitems: 3\n"),
            "a List without items"
        );
    }
}
