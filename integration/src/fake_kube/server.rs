//! The HTTP side of the fake API server: routing of the core/v1 REST paths, list and get
//! answers, and watch streams with the real server's semantics (replay from a
//! resourceVersion, `410 Gone` as an ERROR event, bookmarks, streaming lists, timeouts).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::selector::{FieldSelector, LabelSelector};
use super::store::{Filter, Kind, Outage, RequestRecord, Store};

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Returned by the service to make hyper drop the connection without an answer.
#[derive(Debug)]
pub struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fake API server outage: connection reset")
    }
}

impl std::error::Error for Reset {}

fn reset_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, Reset)
}

/// State shared by the driver (`FakeKube`) and every connection.
pub struct Shared {
    pub store: Mutex<Store>,
    /// The current resourceVersion, so that watches wake up on every change.
    pub changes: watch::Sender<u64>,
    /// Bumped to close every open watch at once (API outage).
    pub epoch: watch::Sender<u64>,
}

impl Shared {
    pub fn new() -> Shared {
        let store = Store::new();
        let version = store.resource_version;
        Shared {
            store: Mutex::new(store),
            changes: watch::Sender::new(version),
            epoch: watch::Sender::new(0),
        }
    }

    /// The store, even if a panicking test thread poisoned the lock: the data stays consistent
    /// because every mutation completes under one lock hold.
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs a mutation and wakes the watches if it changed anything.
    pub fn mutate<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let (result, version) = {
            let mut store = self.lock();
            let result = f(&mut store);
            (result, store.resource_version)
        };
        self.changes.send_if_modified(|current| {
            let changed = *current != version;
            *current = version;
            changed
        });
        result
    }
}

enum Route {
    Json(Value),
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    Object {
        kind: Kind,
        namespace: Option<String>,
        name: String,
    },
    NotFound,
}

fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api"] => Route::Json(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        })),
        ["apis"] => Route::Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})),
        ["api", "v1"] => Route::Json(api_resource_list()),
        ["version"] => Route::Json(json!({
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0-fake",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        })),
        ["api", "v1", plural] => match Kind::from_plural(plural) {
            Some(kind) => Route::Collection {
                kind,
                namespace: None,
            },
            None => Route::NotFound,
        },
        ["api", "v1", plural, name] => match Kind::from_plural(plural) {
            Some(kind) if !kind.namespaced() => Route::Object {
                kind,
                namespace: None,
                name: name.to_string(),
            },
            _ => Route::NotFound,
        },
        ["api", "v1", "namespaces", namespace, plural] => match Kind::from_plural(plural) {
            Some(kind) if kind.namespaced() => Route::Collection {
                kind,
                namespace: Some(namespace.to_string()),
            },
            _ => Route::NotFound,
        },
        ["api", "v1", "namespaces", namespace, plural, name] => match Kind::from_plural(plural) {
            Some(kind) if kind.namespaced() => Route::Object {
                kind,
                namespace: Some(namespace.to_string()),
                name: name.to_string(),
            },
            _ => Route::NotFound,
        },
        _ => Route::NotFound,
    }
}

fn api_resource_list() -> Value {
    let resources: Vec<Value> = Kind::ALL
        .iter()
        .map(|kind| {
            json!({
                "name": kind.plural(),
                "singularName": kind.singular(),
                "namespaced": kind.namespaced(),
                "kind": kind.kind(),
                "verbs": ["get", "list", "watch"],
                "shortNames": kind.short_names(),
            })
        })
        .collect();
    json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": resources})
}

/// Decodes `application/x-www-form-urlencoded` query text.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let byte = std::str::from_utf8(&bytes[index + 1..index + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok());
                match byte {
                    Some(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

fn flag(params: &[(String, String)], name: &str) -> bool {
    matches!(param(params, name), Some("true" | "1"))
}

pub async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Reset> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let params = parse_query(&query);
    let watch = flag(&params, "watch");
    let response = respond(&shared, &method, &path, &params, watch);
    shared.lock().requests.push(RequestRecord {
        method: method.to_string(),
        path,
        query,
        params,
        watch,
        // 0: no answer, the connection was dropped.
        status: response
            .as_ref()
            .map_or(0, |response| response.status().as_u16()),
    });
    response
}

fn respond(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    params: &[(String, String)],
    watch: bool,
) -> Result<Response<Body>, Reset> {
    let (outage, forbidden) = {
        let store = shared.lock();
        (store.outage, store.forbidden.clone())
    };
    match outage {
        Some(Outage::ConnectionReset) => return Err(Reset),
        Some(Outage::ServiceUnavailable) => {
            return Ok(status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the server is currently unable to handle the request".to_string(),
            ))
        }
        None => {}
    }
    Ok(answer(shared, method, path, params, watch, &forbidden))
}

fn answer(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    params: &[(String, String)],
    watch: bool,
    forbidden: &std::collections::HashSet<String>,
) -> Response<Body> {
    if method != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the fake API server only serves GET, not {method}"),
        );
    }
    let (kind, namespace, name) = match route(path) {
        Route::Json(value) => return json_response(StatusCode::OK, &value),
        Route::NotFound => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource".to_string(),
            )
        }
        Route::Collection { kind, namespace } => (kind, namespace, None),
        Route::Object {
            kind,
            namespace,
            name,
        } => (kind, namespace, Some(name)),
    };
    let verb = match (&name, watch) {
        (_, true) => "watch",
        (Some(_), false) => "get",
        (None, false) => "list",
    };
    if forbidden.contains(kind.plural()) {
        let scope = match &namespace {
            Some(namespace) => format!("in the namespace \"{namespace}\""),
            None => "at the cluster scope".to_string(),
        };
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{} is forbidden: User \"system:serviceaccount:default:fake\" cannot {verb} resource \"{}\" in API group \"\" {scope}",
                kind.plural(),
                kind.plural()
            ),
        );
    }
    let labels = match LabelSelector::parse(param(params, "labelSelector").unwrap_or_default()) {
        Ok(labels) => labels,
        Err(error) => return status(StatusCode::BAD_REQUEST, "BadRequest", error),
    };
    let fields = match FieldSelector::parse(param(params, "fieldSelector").unwrap_or_default()) {
        Ok(fields) => fields,
        Err(error) => return status(StatusCode::BAD_REQUEST, "BadRequest", error),
    };
    let filter = Filter {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
        labels,
        fields,
    };
    match (verb, name) {
        ("get", Some(name)) => {
            match shared
                .lock()
                .get(kind, namespace.as_deref().unwrap_or_default(), &name)
            {
                Some(object) => json_response(StatusCode::OK, &object),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind.plural()),
                ),
            }
        }
        ("list", _) => {
            let store = shared.lock();
            let items: Vec<Value> = store
                .list(&filter)
                .iter()
                .map(|object| {
                    // The real server leaves kind and apiVersion out of list items.
                    let mut item = (**object).clone();
                    if let Some(item) = item.as_object_mut() {
                        item.remove("kind");
                        item.remove("apiVersion");
                    }
                    item
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{}List", kind.kind()),
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": store.resource_version.to_string()},
                    "items": items,
                }),
            )
        }
        _ => start_watch(shared, filter, params),
    }
}

/// How a watch begins, decided under the same lock as the cursor so no event is lost or doubled.
enum Start {
    Expired(Value),
    Stream { cursor: u64, initial: Vec<Bytes> },
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(kind: Kind, version: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.kind(), "apiVersion": "v1", "metadata": metadata}),
    )
}

fn start_watch(
    shared: &Arc<Shared>,
    filter: Filter,
    params: &[(String, String)],
) -> Response<Body> {
    let send_initial_events = flag(params, "sendInitialEvents");
    let bookmarks = flag(params, "allowWatchBookmarks");
    let timeout = param(params, "timeoutSeconds")
        .and_then(|seconds| seconds.parse::<u64>().ok())
        .map(Duration::from_secs);
    let requested = match param(params, "resourceVersion").filter(|rv| !rv.is_empty() && *rv != "0")
    {
        None => None,
        Some(text) => match text.parse::<u64>() {
            Ok(version) => Some(version),
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("invalid resource version {text:?}"),
                )
            }
        },
    };
    // Subscribe before reading the store: a change in between then still wakes this watch.
    let mut changes = shared.changes.subscribe();
    let mut epoch = shared.epoch.subscribe();
    let (start, interval) = {
        let store = shared.lock();
        let current = store.resource_version;
        let start = match requested {
            Some(version) if !send_initial_events => {
                match store.events_since(&filter, version, false) {
                    Ok(events) => Start::Stream {
                        cursor: current.max(version),
                        initial: events
                            .iter()
                            .map(|(kind, object)| event_line(kind, object))
                            .collect(),
                    },
                    Err(expired) => Start::Expired(expired.status()),
                }
            }
            // Absent or "0", or a streaming list: the current state as ADDED events.
            _ => {
                let mut initial: Vec<Bytes> = store
                    .list(&filter)
                    .iter()
                    .map(|object| event_line("ADDED", object))
                    .collect();
                if send_initial_events {
                    initial.push(bookmark(filter.kind, current, true));
                }
                Start::Stream {
                    cursor: current,
                    initial,
                }
            }
        };
        (start, store.bookmark_interval)
    };
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let shared = shared.clone();
    tokio::spawn(async move {
        let (mut cursor, initial) = match start {
            Start::Expired(status) => {
                let _ = sender.send(Ok(event_line("ERROR", &status))).await;
                return;
            }
            Start::Stream { cursor, initial } => (cursor, initial),
        };
        for line in initial {
            if sender.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(24 * 3600)));
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let tick = tokio::select! {
                _ = epoch.changed() => {
                    // An error in the body makes hyper cut the connection mid-stream.
                    if shared.lock().outage == Some(Outage::ConnectionReset) {
                        let _ = sender.send(Err(reset_error())).await;
                    }
                    return;
                }
                _ = sender.closed() => return,
                _ = &mut deadline => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = ticker.tick(), if bookmarks => true,
            };
            // Drain up to now before any bookmark, so a bookmark never claims events not yet sent.
            let (lines, current) = {
                let store = shared.lock();
                (
                    store.events_since(&filter, cursor, true),
                    store.resource_version,
                )
            };
            let lines = match lines {
                Ok(events) => events,
                Err(expired) => {
                    let _ = sender
                        .send(Ok(event_line("ERROR", &expired.status())))
                        .await;
                    return;
                }
            };
            cursor = cursor.max(current);
            for (event_type, object) in lines {
                if sender
                    .send(Ok(event_line(event_type, &object)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if tick
                && sender
                    .send(Ok(bookmark(filter.kind, cursor, false)))
                    .await
                    .is_err()
            {
                return;
            }
        }
    });

    let stream = ReceiverStream::new(receiver).map(|line| line.map(Frame::data));
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
