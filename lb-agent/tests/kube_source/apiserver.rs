//! The stand-in API server: real HTTP on 127.0.0.1 serving real Kubernetes JSON for LIST and
//! WATCH of Services, EndpointSlices and Nodes. It keeps a store per collection and one global
//! resourceVersion, answers LIST with a `*List` object, streams WATCH responses as
//! newline-delimited watch events that the test feeds through a channel, and records every
//! request so that tests can check what the source asked for.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::RawQuery,
    http::{Response, header},
    routing::get,
};
use lb_agent::source::Kind;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::UPDATE_TIMEOUT;

/// The stand-in API server, as the test drives it.
pub struct StandIn {
    url: String,
    shared: Arc<Shared>,
    /// Per collection, the watch events for whichever watch is connected.
    feeds: BTreeMap<Kind, mpsc::UnboundedSender<Feed>>,
}

/// What the stand-in API server's handlers share with the test.
pub struct Shared {
    state: Mutex<State>,
    /// Per collection, the receiving end of the watch feed, held by the connected watch; events
    /// queue while no watch is connected.
    feeds: BTreeMap<Kind, Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Feed>>>>,
}

pub struct State {
    /// etcd's revision: one counter across every collection, as resourceVersions are.
    revision: u64,
    collections: BTreeMap<Kind, Collection>,
    /// Kubernetes Events (`events.k8s.io/v1`) created or patched, as sent.
    pub events: Vec<Value>,
}

#[derive(Default)]
pub struct Collection {
    /// By (namespace, name).
    objects: BTreeMap<(String, String), Value>,
    requests: Vec<Request>,
}

impl State {
    /// Gives `object` the next resourceVersion, as every write does.
    pub fn stamp(&mut self, object: &mut Value) {
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
    }
}

pub enum Feed {
    /// One watch event, written as one line.
    Event(Value),
    /// Ends the watch response, as the API server does once timeoutSeconds has passed.
    End,
}

/// A request the stand-in API server received.
#[derive(Clone, Debug)]
pub struct Request {
    pub query: BTreeMap<String, String>,
    /// The revision when it was served: a LIST's resourceVersion.
    pub revision: u64,
}

impl Request {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }
}

pub fn path(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "/api/v1/services",
        Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
        Kind::Node => "/api/v1/nodes",
    }
}

pub fn api_version(kind: Kind) -> &'static str {
    match kind {
        Kind::Service | Kind::Node => "v1",
        Kind::EndpointSlice => "discovery.k8s.io/v1",
    }
}

pub fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let field = |name: &str| meta[name].as_str().unwrap_or_default().to_owned();
    (field("namespace"), field("name"))
}

impl StandIn {
    pub async fn start() -> Self {
        let mut senders = BTreeMap::new();
        let mut receivers = BTreeMap::new();
        for kind in Kind::ALL {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(kind, tx);
            receivers.insert(kind, Arc::new(tokio::sync::Mutex::new(rx)));
        }
        let state = State {
            revision: 1000,
            collections: Kind::ALL
                .into_iter()
                .map(|kind| (kind, Collection::default()))
                .collect(),
            events: Vec::new(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            feeds: receivers,
        });

        let mut router = Router::new();
        for kind in Kind::ALL {
            let shared = shared.clone();
            router = router.route(
                path(kind),
                get(move |RawQuery(query): RawQuery| serve(shared.clone(), kind, query)),
            );
        }
        // Events: created (POST) and, for a repeat, patched; recorded as sent.
        let recorded = shared.clone();
        let record = move |body: axum::body::Bytes| {
            let shared = recorded.clone();
            async move {
                let event: Value = serde_json::from_slice(&body).expect("an event in JSON");
                shared
                    .state
                    .lock()
                    .expect("state lock")
                    .events
                    .push(event.clone());
                Response::builder()
                    .status(201)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(event.to_string()))
                    .expect("response")
            }
        };
        router = router
            .route(
                "/apis/events.k8s.io/v1/namespaces/{namespace}/events",
                axum::routing::post(record.clone()),
            )
            .route(
                "/apis/events.k8s.io/v1/namespaces/{namespace}/events/{name}",
                axum::routing::patch(record),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("stand-in API server")
        });
        Self {
            url,
            shared,
            feeds: senders,
        }
    }

    /// A client for this server: plain HTTP, no authentication.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().expect("server URL"));
        kube::Client::try_from(config).expect("client")
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("state lock")
    }

    pub fn feed(&self, kind: Kind, feed: Feed) {
        self.feeds[&kind]
            .send(feed)
            .expect("the stand-in API server is gone");
    }

    /// Creates or replaces an object without a watch event: the initial contents, or a change
    /// made while the source could not see it.
    pub fn put_silently(&self, kind: Kind, mut object: Value) {
        let mut state = self.state();
        state.stamp(&mut object);
        state
            .collections
            .get_mut(&kind)
            .expect("collection")
            .objects
            .insert(key_of(&object), object);
    }

    /// Deletes an object without a watch event.
    pub fn remove_silently(&self, kind: Kind, namespace: &str, name: &str) {
        let mut state = self.state();
        state.revision += 1;
        let objects = &mut state
            .collections
            .get_mut(&kind)
            .expect("collection")
            .objects;
        objects
            .remove(&(namespace.into(), name.into()))
            .expect("no such object");
    }

    /// Creates or replaces an object and tells the watch; returns the event type sent.
    pub fn apply(&self, kind: Kind, mut object: Value) -> &'static str {
        let event_type = {
            let mut state = self.state();
            state.stamp(&mut object);
            let objects = &mut state
                .collections
                .get_mut(&kind)
                .expect("collection")
                .objects;
            match objects.insert(key_of(&object), object.clone()) {
                None => "ADDED",
                Some(_) => "MODIFIED",
            }
        };
        self.feed(
            kind,
            Feed::Event(json!({"type": event_type, "object": object})),
        );
        event_type
    }

    /// Deletes an object and tells the watch.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let object = {
            let mut state = self.state();
            let objects = &mut state
                .collections
                .get_mut(&kind)
                .expect("collection")
                .objects;
            let mut object = objects
                .remove(&(namespace.into(), name.into()))
                .expect("no such object");
            state.stamp(&mut object);
            object
        };
        self.feed(
            kind,
            Feed::Event(json!({"type": "DELETED", "object": object})),
        );
    }

    /// Sends a bookmark after writes elsewhere moved the revision on; returns its resourceVersion.
    pub fn bookmark(&self, kind: Kind) -> u64 {
        let revision = {
            let mut state = self.state();
            state.revision += 5;
            state.revision
        };
        // What the API server sends: the collection's type and only a resourceVersion.
        let kind_name = kind.name();
        let object = json!({
            "kind": kind_name,
            "apiVersion": api_version(kind),
            "metadata": {"resourceVersion": revision.to_string(), "creationTimestamp": null},
        });
        self.feed(
            kind,
            Feed::Event(json!({"type": "BOOKMARK", "object": object})),
        );
        revision
    }

    /// Answers the watch with 410 Gone, as the API server does once the watch's resourceVersion
    /// has left its window; that ends the watch response.
    pub fn expire_watch(&self, kind: Kind) {
        let revision = self.state().revision;
        let status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: 1001 ({revision})"),
            "reason": "Expired",
            "code": 410,
        });
        self.feed(
            kind,
            Feed::Event(json!({"type": "ERROR", "object": status})),
        );
    }

    /// Ends the watch response without an error.
    pub fn end_watch(&self, kind: Kind) {
        self.feed(kind, Feed::End);
    }

    pub fn requests(&self, kind: Kind) -> Vec<Request> {
        self.state().collections[&kind].requests.clone()
    }

    pub fn lists(&self, kind: Kind) -> Vec<Request> {
        self.requests(kind)
            .into_iter()
            .filter(|r| !r.is_watch())
            .collect()
    }

    /// The WATCH requests of `kind`, once there are at least `count`.
    pub async fn wait_for_watches(&self, kind: Kind, count: usize) -> Vec<Request> {
        let wait = async {
            loop {
                let watches: Vec<_> = self
                    .requests(kind)
                    .into_iter()
                    .filter(Request::is_watch)
                    .collect();
                if watches.len() >= count {
                    return watches;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(UPDATE_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| {
                panic!("fewer than {count} {kind:?} watches within {UPDATE_TIMEOUT:?}")
            })
    }
}

/// One GET on a collection: a LIST, or a WATCH with `watch=true`.
pub async fn serve(shared: Arc<Shared>, kind: Kind, query: Option<String>) -> Response<Body> {
    let query = parse_query(query.as_deref().unwrap_or_default());
    let request = {
        let mut state = shared.state.lock().expect("state lock");
        let request = Request {
            query,
            revision: state.revision,
        };
        state
            .collections
            .get_mut(&kind)
            .expect("collection")
            .requests
            .push(request.clone());
        request
    };
    let body = if request.is_watch() {
        watch(&shared, kind, request.query).await
    } else {
        Body::from(list(&shared, kind, &request).to_string())
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("response")
}

/// A `*List` of the selected objects, at the current revision.
pub fn list(shared: &Shared, kind: Kind, request: &Request) -> Value {
    let state = shared.state.lock().expect("state lock");
    let items: Vec<Value> = state.collections[&kind]
        .objects
        .values()
        .filter(|object| selected(object, &request.query))
        .map(|object| {
            // List items carry no apiVersion and kind: the list says them once.
            let mut item = object.clone();
            let fields = item.as_object_mut().expect("object");
            fields.remove("apiVersion");
            fields.remove("kind");
            item
        })
        .collect();
    json!({
        "apiVersion": api_version(kind),
        "kind": format!("{}List", kind.name()),
        "metadata": {"resourceVersion": request.revision.to_string()},
        "items": items,
    })
}

/// The watch response: the feed's events for the selected objects (and bookmarks, if asked for),
/// one JSON document a line, until the feed says `End` or after an ERROR event.
pub async fn watch(shared: &Shared, kind: Kind, query: BTreeMap<String, String>) -> Body {
    let feed = shared.feeds[&kind].clone().lock_owned().await;
    let lines = futures::stream::unfold(Some((feed, query)), |state| async move {
        let (mut feed, query) = state?;
        loop {
            let Feed::Event(event) = feed.recv().await? else {
                return None;
            };
            let wanted = match event["type"].as_str() {
                Some("ADDED" | "MODIFIED" | "DELETED") => selected(&event["object"], &query),
                Some("BOOKMARK") => query
                    .get("allowWatchBookmarks")
                    .is_some_and(|allow| allow == "true"),
                _ => true,
            };
            if !wanted {
                continue;
            }
            let is_error = event["type"] == "ERROR";
            let line = format!("{event}\n");
            return Some((
                Ok::<_, Infallible>(line),
                (!is_error).then_some((feed, query)),
            ));
        }
    });
    Body::from_stream(lines)
}

/// The selectors the stand-in API server understands: `!label` terms and `metadata.name=`.
pub fn selected(object: &Value, query: &BTreeMap<String, String>) -> bool {
    let meta = &object["metadata"];
    let labels_match = query.get("labelSelector").is_none_or(|selector| {
        selector.split(',').all(|term| {
            let label = term
                .strip_prefix('!')
                .unwrap_or_else(|| panic!("unsupported label selector {term}"));
            meta["labels"].get(label).is_none()
        })
    });
    let fields_match = query.get("fieldSelector").is_none_or(|selector| {
        selector.split(',').all(|term| match term.split_once('=') {
            Some(("metadata.name", name)) => meta["name"] == name,
            _ => panic!("unsupported field selector {term}"),
        })
    });
    labels_match && fields_match
}

pub fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding, which is how the client encodes selectors.
pub fn percent_decode(text: &str) -> String {
    let mut bytes = text.bytes();
    let mut decoded = Vec::with_capacity(text.len());
    while let Some(byte) = bytes.next() {
        decoded.push(match byte {
            b'+' => b' ',
            b'%' => {
                let hex = [bytes.next().expect("escape"), bytes.next().expect("escape")];
                u8::from_str_radix(std::str::from_utf8(&hex).expect("hex"), 16).expect("hex")
            }
            byte => byte,
        });
    }
    String::from_utf8(decoded).expect("UTF-8 query")
}
