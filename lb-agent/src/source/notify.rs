//! Kubernetes Events about the objects the agent cannot use as they are, so that
//! `kubectl describe` tells their owner why: an object that does not decode (reason
//! `InvalidObject`, action `Decode`), a Service refused or only partly served (reason
//! `InvalidObject` for an invalid value or a frontend another Service holds, `PartlyServed` for
//! a part this datapath skips, such as an SCTP port or an IPv6 address; action `Translate`).
//! Events are best effort: one that cannot be recorded is logged and the agent goes on.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tracing::warn;

use super::{Kind, ObjectKey};
use crate::translate::Problem;

/// The reporting controller of the agent's Kubernetes Events.
pub const REPORTER: &str = "lb-agent";

/// The API server takes notes of at most 1 kB.
const MAX_NOTE: usize = 1024;

/// Records Events as `lb-agent` on this node.
pub struct Notifier {
    recorder: Recorder,
}

impl Notifier {
    pub fn new(client: Client, node_name: &str) -> Self {
        Self {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: REPORTER.into(),
                    instance: Some(node_name.to_owned()),
                },
            ),
        }
    }

    /// A Warning Event on `key` (nothing for an object without a name).
    pub async fn warn(&self, key: &ObjectKey, reason: &str, action: &str, note: &str) {
        if key.name.is_empty() {
            return;
        }
        let mut note = format!("{REPORTER}: {note}");
        if note.len() > MAX_NOTE {
            note.truncate(note.floor_char_boundary(MAX_NOTE - 3));
            note.push_str("...");
        }
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &reference(key)).await {
            warn!(object = %key, %error, "cannot record a Kubernetes Event");
        }
    }

    /// An Event for a problem the translation found (see the module's description).
    pub async fn problem(&self, problem: &Problem) {
        let reason = if problem.error {
            "InvalidObject"
        } else {
            "PartlyServed"
        };
        self.warn(&problem.object, reason, "Translate", &problem.reason)
            .await;
    }
}

fn reference(key: &ObjectKey) -> ObjectReference {
    let (api_version, kind) = match key.kind {
        Kind::Service => ("v1", "Service"),
        Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
        Kind::Node => ("v1", "Node"),
    };
    ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        name: Some(key.name.clone()),
        namespace: (!key.namespace.is_empty()).then(|| key.namespace.clone()),
        ..ObjectReference::default()
    }
}
