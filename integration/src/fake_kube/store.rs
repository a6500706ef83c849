//! The fake API server's state: the objects, the global resourceVersion counter, the bounded
//! event history that watches replay from, and the knobs tests turn (outage, forbidden
//! resources, compaction). Objects are kept as JSON so that every kind shares one code path and
//! what a watcher receives is byte-for-byte what was stored.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::selector::{FieldSelector, LabelSelector};

/// How many events are kept for replay; older ones are forgotten as by etcd compaction, so a
/// watch from before them gets `410 Gone`.
pub const DEFAULT_HISTORY_LIMIT: usize = 10_000;

/// The first resourceVersion handed out. Not 1, so that a client that confuses "0" (any
/// version) with a real version, or parses versions as small integers, stands out.
const FIRST_RESOURCE_VERSION: u64 = 1000;

/// The core/v1 resources the fake server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Service,
    Node,
    ConfigMap,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Pod, Kind::Service, Kind::Node, Kind::ConfigMap];

    pub fn from_plural(plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.plural() == plural)
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::Node => "nodes",
            Kind::ConfigMap => "configmaps",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Kind::Pod => "pod",
            Kind::Service => "service",
            Kind::Node => "node",
            Kind::ConfigMap => "configmap",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::Node => "Node",
            Kind::ConfigMap => "ConfigMap",
        }
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &["po"],
            Kind::Service => &["svc"],
            Kind::Node => &["no"],
            Kind::ConfigMap => &["cm"],
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }
}

/// Key of a stored object; the namespace is empty for cluster-scoped kinds.
pub type Key = (Kind, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as the watch cache keeps it: the state before (to tell a watcher whose selector
/// no longer matches that the object left its view) and after.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub resource_version: u64,
    pub kind: Kind,
    pub event_type: EventType,
    pub old: Option<Arc<Value>>,
    /// For `Deleted`, the last state carrying the deletion's resourceVersion.
    pub new: Arc<Value>,
}

/// One request the server received, for tests that assert on the client's behaviour (e.g. that a
/// relist followed a `410 Gone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string (still percent-encoded), empty when there was none.
    pub query: String,
    /// The decoded query parameters, in order.
    pub params: Vec<(String, String)>,
    pub watch: bool,
    /// The HTTP status answered (200 for a watch, even one that then sends a 410 ERROR event).
    pub status: u16,
}

impl RequestRecord {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// How the API fails while it is down (see `FakeKube::break_api_with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Every request gets `503 Service Unavailable` with a `Status` body; open watches end
    /// cleanly. Note that the `kube` client retries 503 itself (exponential backoff from 5 ms,
    /// up to 15 times) before its caller sees an error.
    ServiceUnavailable,
    /// Connections are closed without an answer and open watches are cut mid-stream, as when
    /// the API server's process dies: the client sees transport errors at once, no retries.
    ConnectionReset,
}

/// Which objects one list or watch sees.
#[derive(Debug, Clone)]
pub struct Filter {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        if let Some(namespace) = &self.namespace {
            if metadata["namespace"].as_str().unwrap_or_default() != namespace {
                return false;
            }
        }
        if let Some(name) = &self.name {
            if metadata["name"].as_str().unwrap_or_default() != name {
                return false;
            }
        }
        self.labels.matches(&labels_of(object)) && self.fields.matches(object)
    }

    /// What this watcher is told about `event`, if anything. Like the real server, an object
    /// that stops matching the selectors is reported as DELETED and one that starts matching
    /// as ADDED.
    pub fn view(&self, event: &StoredEvent) -> Option<(&'static str, Arc<Value>)> {
        if event.kind != self.kind {
            return None;
        }
        let was = event.old.as_deref().is_some_and(|old| self.matches(old));
        match event.event_type {
            EventType::Deleted => was.then(|| ("DELETED", event.new.clone())),
            EventType::Added | EventType::Modified => match (was, self.matches(&event.new)) {
                (true, true) => Some(("MODIFIED", event.new.clone())),
                (true, false) => Some(("DELETED", event.new.clone())),
                (false, true) => Some(("ADDED", event.new.clone())),
                (false, false) => None,
            },
        }
    }
}

fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Why a watch cannot start or go on from the version it asked for.
#[derive(Debug, Clone)]
pub struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

impl Expired {
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {} ({})", self.requested, self.oldest),
            "reason": "Expired",
            "code": 410,
        })
    }
}

pub struct Store {
    pub resource_version: u64,
    pub objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<StoredEvent>,
    /// Every event after this version is still in `history`, so open watches can go on.
    retained_from: u64,
    /// New watches may start from this version on (`compact()` moves it without touching open
    /// watches, as etcd compaction leaves the real server's established watches alone).
    compacted: u64,
    history_limit: usize,
    next_uid: u64,
    /// Set while the API is down, and how it fails.
    pub outage: Option<Outage>,
    pub forbidden: HashSet<String>,
    pub requests: Vec<RequestRecord>,
    pub bookmark_interval: Duration,
}

impl Store {
    pub fn new() -> Store {
        Store {
            resource_version: FIRST_RESOURCE_VERSION,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            retained_from: FIRST_RESOURCE_VERSION,
            compacted: FIRST_RESOURCE_VERSION,
            history_limit: DEFAULT_HISTORY_LIMIT,
            next_uid: 1,
            outage: None,
            forbidden: HashSet::new(),
            requests: Vec::new(),
            bookmark_interval: Duration::from_secs(1),
        }
    }

    pub fn key_of(kind: Kind, object: &Value) -> Key {
        let metadata = &object["metadata"];
        let name = metadata["name"]
            .as_str()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| panic!("fake_kube: a {} needs metadata.name", kind.kind()))
            .to_string();
        let namespace = if kind.namespaced() {
            metadata["namespace"]
                .as_str()
                .filter(|ns| !ns.is_empty())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        (kind, namespace, name)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Arc<Value>> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        self.objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Creates or replaces an object. Server-owned metadata (uid, creationTimestamp,
    /// resourceVersion) is filled in as the real server would; a write that changes nothing
    /// produces no event and keeps the version, as there. Returns the new version if it changed.
    pub fn put(&mut self, kind: Kind, mut object: Value) -> Option<u64> {
        let key = Store::key_of(kind, &object);
        let old = self.objects.get(&key).cloned();
        object["kind"] = json!(kind.kind());
        object["apiVersion"] = json!("v1");
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let metadata = &mut object["metadata"];
        if kind.namespaced() {
            metadata["namespace"] = json!(key.1);
        } else if let Some(metadata) = metadata.as_object_mut() {
            metadata.remove("namespace");
        }
        match &old {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    if metadata.get(field).is_none_or(Value::is_null) {
                        metadata[field] = old["metadata"][field].clone();
                    }
                }
                metadata["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
                if object == **old {
                    return None;
                }
            }
            None => {
                if metadata.get("uid").is_none_or(Value::is_null) {
                    metadata["uid"] = json!(self.uid());
                }
                if metadata.get("creationTimestamp").is_none_or(Value::is_null) {
                    metadata["creationTimestamp"] = json!(now());
                }
            }
        }
        let version = self.bump();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let new = Arc::new(object);
        self.objects.insert(key, new.clone());
        let event_type = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(StoredEvent {
            resource_version: version,
            kind,
            event_type,
            old,
            new,
        });
        Some(version)
    }

    /// Deletes an object; the DELETED event carries its last state with the deletion's version.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let old = self
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))?;
        let version = self.bump();
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = json!(version.to_string());
        self.record(StoredEvent {
            resource_version: version,
            kind,
            event_type: EventType::Deleted,
            old: Some(old),
            new: Arc::new(last),
        });
        Some(version)
    }

    /// Forgets all history for new watches: one from any version before now gets `410 Gone`.
    pub fn compact(&mut self) {
        self.compacted = self.resource_version;
    }

    pub fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit.max(1);
        self.trim();
    }

    /// The current objects `filter` sees, in key order.
    pub fn list(&self, filter: &Filter) -> Vec<Arc<Value>> {
        self.objects
            .iter()
            .filter(|((kind, _, _), object)| *kind == filter.kind && filter.matches(object))
            .map(|(_, object)| object.clone())
            .collect()
    }

    /// The events after `since` that `filter` sees, or why they are no longer known. `open`
    /// says whether an already established watch asks (compaction does not cut those off).
    pub fn events_since(
        &self,
        filter: &Filter,
        since: u64,
        open: bool,
    ) -> Result<Vec<(&'static str, Arc<Value>)>, Expired> {
        let floor = if open {
            self.retained_from
        } else {
            self.retained_from.max(self.compacted)
        };
        if since < floor {
            return Err(Expired {
                requested: since,
                oldest: floor,
            });
        }
        let start = self
            .history
            .partition_point(|event| event.resource_version <= since);
        Ok(self
            .history
            .range(start..)
            .filter_map(|event| filter.view(event))
            .collect())
    }

    fn bump(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    fn record(&mut self, event: StoredEvent) {
        self.history.push_back(event);
        self.trim();
    }

    fn trim(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(event) = self.history.pop_front() {
                self.retained_from = event.resource_version;
            }
        }
    }

    fn uid(&mut self) -> String {
        let n = self.next_uid;
        self.next_uid += 1;
        // Shaped like the real server's UUIDs so clients that parse them are not surprised.
        format!("00000000-0000-4000-8000-{n:012x}")
    }
}

/// The current time in whole seconds, as the API server writes timestamps. (jiff's own clock
/// needs its `std` feature, which k8s-openapi does not enable.)
pub fn now_timestamp() -> k8s_openapi::jiff::Timestamp {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(seconds).unwrap_or_default())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

/// The current time in RFC 3339, as in `metadata.creationTimestamp`.
pub fn now() -> String {
    now_timestamp().to_string()
}
