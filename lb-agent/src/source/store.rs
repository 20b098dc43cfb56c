//! The agent's copy of the watched objects, fed by a source's [`Update`]s, and which Services
//! each update touched (only those are translated again).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Node;

use super::{
    Kind, Object, ObjectKey, Update,
    objects::{ServiceObject, SliceObject},
};

/// A Service's namespace and name. Shared (one copy of each string per Service): the store,
/// the set of Services to translate again, the desired state and its claims all key by it.
pub type ServiceId = (Arc<str>, Arc<str>);

/// What changed since the last reconcile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub services: BTreeSet<ServiceId>,
    /// The node changed (its addresses carry NodePorts): every service is affected.
    pub node: bool,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.node
    }
}

#[derive(Default)]
pub struct Store {
    // Boxed: a B-tree node holds eleven slots whether used or not, and these objects are large.
    services: BTreeMap<ServiceId, Box<ServiceObject>>,
    slices: BTreeMap<ServiceId, Box<SliceObject>>,
    /// Every endpoint names its node: one copy of each name, shared. (Node names are few and
    /// long-lived; names of nodes that left are kept.)
    node_names: BTreeSet<Arc<str>>,
    /// Service -> names of its slices, sorted. A Vec: most Services have one slice, and a
    /// B-tree set allocates a node of eleven names for it.
    slices_of: BTreeMap<ServiceId, Vec<String>>,
    nodes: BTreeMap<String, Node>,
    /// Keys applied since `Listing(kind)`, until `Listed(kind)`.
    listing: BTreeMap<Kind, BTreeSet<ObjectKey>>,
    listed: BTreeSet<Kind>,
}

fn slice_service(slice: &SliceObject) -> Option<ServiceId> {
    Some((
        slice.namespace.as_str().into(),
        slice.service.as_deref()?.into(),
    ))
}

/// The (namespace, name) of `key`, for the maps keyed by it.
pub fn service_id(key: &ObjectKey) -> ServiceId {
    (key.namespace.as_str().into(), key.name.as_str().into())
}

impl Store {
    /// Every kind has been listed at least once: the store holds a complete picture.
    pub fn ready(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceId, &ServiceObject)> {
        self.services.iter().map(|(id, s)| (id, &**s))
    }

    pub fn service(&self, id: &ServiceId) -> Option<&ServiceObject> {
        self.services.get(id).map(|s| &**s)
    }

    pub fn slices_of(&self, id: &ServiceId) -> Vec<&SliceObject> {
        let Some(names) = self.slices_of.get(id) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|n| self.slices.get(&(id.0.clone(), n.as_str().into())))
            .map(|s| &**s)
            .collect()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// Applies one update, recording in `dirty` what it touched.
    pub fn apply(&mut self, update: Update, node_name: &str, dirty: &mut Dirty) {
        match update {
            Update::Listing(kind) => {
                // What a relist does not see again is deleted at its end; with nothing of this
                // kind held yet (the agent's start) there is nothing to delete, and recording
                // every key seen would cost a copy of each (tens of thousands).
                if self.holds(kind) {
                    self.listing.insert(kind, BTreeSet::new());
                } else {
                    self.listing.remove(&kind);
                }
            }
            Update::Listed(kind) => {
                if let Some(seen) = self.listing.remove(&kind) {
                    for key in self.keys(kind) {
                        if !seen.contains(&key) {
                            self.delete(&key, node_name, dirty);
                        }
                    }
                }
                self.listed.insert(kind);
            }
            Update::Applied(object) => {
                let key = object.key();
                if let Some(seen) = self.listing.get_mut(&key.kind) {
                    seen.insert(key.clone());
                }
                self.upsert(object, node_name, dirty);
            }
            Update::Deleted(key) => self.delete(&key, node_name, dirty),
            // What was last read of it stays; a relist must not take it for deleted.
            Update::Invalid { key: Some(key), .. } => {
                if let Some(seen) = self.listing.get_mut(&key.kind) {
                    seen.insert(key);
                }
            }
            Update::Invalid { key: None, .. } => {}
        }
    }

    fn holds(&self, kind: Kind) -> bool {
        match kind {
            Kind::Service => !self.services.is_empty(),
            Kind::EndpointSlice => !self.slices.is_empty(),
            Kind::Node => !self.nodes.is_empty(),
        }
    }

    fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        let key = |(namespace, name): &ServiceId| ObjectKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match kind {
            Kind::Service => self.services.keys().map(key).collect(),
            Kind::EndpointSlice => self.slices.keys().map(key).collect(),
            Kind::Node => self
                .nodes
                .keys()
                .map(|n| ObjectKey {
                    kind,
                    namespace: String::new(),
                    name: n.clone(),
                })
                .collect(),
        }
    }

    fn upsert(&mut self, object: Object, node_name: &str, dirty: &mut Dirty) {
        let key = object.key();
        let id = service_id(&key);
        match object {
            Object::Service(svc) => {
                dirty.services.insert(id.clone());
                self.services
                    .insert(id, Box::new(ServiceObject::from(&*svc)));
            }
            Object::EndpointSlice(slice) => {
                let mut slice = Box::new(SliceObject::from(&*slice));
                self.intern_node_names(&mut slice);
                let new_owner = slice_service(&slice);
                if let Some(old) = self.slices.get(&id).and_then(|s| slice_service(s))
                    && Some(&old) != new_owner.as_ref()
                {
                    self.unlink_slice(&old, &key.name);
                    dirty.services.insert(old);
                }
                if let Some(owner) = new_owner {
                    let names = self.slices_of.entry(owner.clone()).or_default();
                    if let Err(at) = names.binary_search(&key.name) {
                        names.insert(at, key.name.clone());
                    }
                    dirty.services.insert(owner);
                }
                self.slices.insert(id, slice);
            }
            Object::Node(node) => {
                if key.name == node_name {
                    dirty.node = true;
                }
                self.nodes.insert(key.name, *node);
            }
        }
    }

    fn intern_node_names(&mut self, slice: &mut SliceObject) {
        for name in slice
            .endpoints
            .iter_mut()
            .filter_map(|e| e.node_name.as_mut())
        {
            match self.node_names.get(&**name) {
                Some(shared) => *name = shared.clone(),
                None => {
                    self.node_names.insert(name.clone());
                }
            }
        }
    }

    fn unlink_slice(&mut self, owner: &ServiceId, slice: &str) {
        if let Some(names) = self.slices_of.get_mut(owner) {
            names.retain(|n| n != slice);
            if names.is_empty() {
                self.slices_of.remove(owner);
            }
        }
    }

    fn delete(&mut self, key: &ObjectKey, node_name: &str, dirty: &mut Dirty) {
        let id = service_id(key);
        match key.kind {
            Kind::Service => {
                if self.services.remove(&id).is_some() {
                    dirty.services.insert(id);
                }
            }
            Kind::EndpointSlice => {
                if let Some(slice) = self.slices.remove(&id)
                    && let Some(owner) = slice_service(&slice)
                {
                    self.unlink_slice(&owner, &key.name);
                    dirty.services.insert(owner);
                }
            }
            Kind::Node => {
                if self.nodes.remove(&key.name).is_some() && key.name == node_name {
                    dirty.node = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;

    fn service(name: &str) -> Update {
        Update::Applied(Object::Service(Box::new(Service {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        })))
    }

    fn listed(store: &mut Store, updates: Vec<Update>) {
        let mut dirty = Dirty::default();
        store.apply(Update::Listing(Kind::Service), "node", &mut dirty);
        for update in updates {
            store.apply(update, "node", &mut dirty);
        }
        store.apply(Update::Listed(Kind::Service), "node", &mut dirty);
    }

    /// An object that stops decoding keeps what was last read of it, also across a relist
    /// (which would otherwise take it for deleted); one of no name counts for nothing.
    #[test]
    fn an_object_that_no_longer_decodes_keeps_its_last_good_version() {
        let mut store = Store::default();
        listed(&mut store, vec![service("web"), service("api")]);
        assert_eq!(store.service_count(), 2);
        let invalid = |name: &str| Update::Invalid {
            origin: format!("Service default/{name}"),
            reason: "invalid type".into(),
            key: Some(ObjectKey {
                kind: Kind::Service,
                namespace: "default".into(),
                name: name.into(),
            }),
        };
        listed(&mut store, vec![service("web"), invalid("api")]);
        let id: ServiceId = ("default".into(), "api".into());
        assert!(store.service(&id).is_some(), "kept across the relist");
        let nameless = Update::Invalid {
            origin: "a file".into(),
            reason: "not YAML".into(),
            key: None,
        };
        listed(&mut store, vec![service("web"), nameless]);
        assert!(
            store.service(&id).is_none(),
            "gone once a relist no longer names it"
        );
    }
}
