//! A fake Kubernetes API server for tests and the local demo.
//!
//! It speaks the real REST list/watch protocol over plain HTTP/1.1 with the real `k8s-openapi`
//! JSON types, so the sidecar's real `kube` client talks to it through an ordinary kubeconfig
//! and the tests exercise the same code paths as a cluster would: label and field selectors,
//! one global resourceVersion, watch replay from a version, `410 Gone` as an ERROR event after
//! compaction, bookmarks, streaming lists (`sendInitialEvents`), timeouts, 403 and 503 answers.
//!
//! Served: core/v1 Pods, Services, ConfigMaps (namespaced) and Nodes (cluster-scoped) under
//! `/api/v1/...`, plus minimal `/api`, `/apis`, `/api/v1` and `/version` discovery. Only GET;
//! tests change the cluster through the driver methods of [`FakeKube`] instead.

mod selector;
mod server;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, ContainerStatus, HostIP, Node, NodeAddress, NodeCondition,
    NodeSpec, NodeStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::serde::de::DeserializeOwned;
use k8s_openapi::serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use selector::{FieldSelector, LabelSelector};
pub use store::{Kind, Outage, RequestRecord, DEFAULT_HISTORY_LIMIT};

use server::Shared;

/// A running fake API server. Clones share the server; it stops (closing every connection)
/// when the last clone is dropped.
#[derive(Clone)]
pub struct FakeKube {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
    /// Dropped with the server; every connection task watches it to close with it.
    _shutdown: watch::Sender<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.accept.abort();
        // Watches hold no connection of their own to notice the shutdown through.
        self.shared.epoch.send_modify(|epoch| *epoch += 1);
    }
}

impl FakeKube {
    /// Binds 127.0.0.1 on a free port and serves on the current tokio runtime.
    pub async fn start() -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake_kube: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake_kube: local address of the listener");
        let shared = Arc::new(Shared::new());
        let (shutdown, shutdown_rx) = watch::channel(());
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        FakeKube {
            inner: Arc::new(Inner {
                shared,
                addr,
                accept,
                _shutdown: shutdown,
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Writes a kubeconfig whose current context points at this server with `namespace` as the
    /// default namespace and a bearer token user (the token is not checked).
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user:\n    token: fake-token\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
             current-context: fake\n\
             preferences: {{}}\n",
            url = self.url(),
        );
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("fake_kube: write kubeconfig {}: {e}", path.display()));
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    fn apply<K: Serialize>(&self, kind: Kind, object: &K) {
        let value = serde_json::to_value(object).expect("k8s-openapi objects serialise to JSON");
        self.shared().mutate(|store| store.put(kind, value));
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.shared()
            .mutate(|store| store.delete(kind, namespace, name));
    }

    fn get<K: DeserializeOwned>(&self, kind: Kind, namespace: &str, name: &str) -> Option<K> {
        let value = self.shared().lock().get(kind, namespace, name)?;
        Some(K::deserialize(&*value).unwrap_or_else(|e| {
            panic!(
                "fake_kube: stored {} {namespace}/{name} reads back: {e}",
                kind.kind()
            )
        }))
    }

    /// Reads, changes and writes back one object under one lock, so concurrent driver calls
    /// cannot lose each other's changes.
    fn update<K: Serialize + DeserializeOwned>(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut K),
    ) {
        self.shared().mutate(|store| {
            let value = store.get(kind, namespace, name).unwrap_or_else(|| {
                panic!("fake_kube: no {} {namespace}/{name} to update", kind.kind())
            });
            let mut object = K::deserialize(&*value).unwrap_or_else(|e| {
                panic!(
                    "fake_kube: stored {} {namespace}/{name} reads back: {e}",
                    kind.kind()
                )
            });
            change(&mut object);
            let value =
                serde_json::to_value(&object).expect("k8s-openapi objects serialise to JSON");
            store.put(kind, value)
        });
    }

    /// Creates or replaces a Service (ADDED or MODIFIED; nothing if unchanged).
    pub fn apply_service(&self, service: Service) {
        self.apply(Kind::Service, &service);
    }

    pub fn delete_service(&self, namespace: &str, name: &str) {
        self.delete(Kind::Service, namespace, name);
    }

    pub fn get_service(&self, namespace: &str, name: &str) -> Option<Service> {
        self.get(Kind::Service, namespace, name)
    }

    /// Creates or replaces a Pod (ADDED or MODIFIED; nothing if unchanged). Server-owned
    /// metadata (uid, creationTimestamp, resourceVersion) is kept or filled in.
    pub fn apply_pod(&self, pod: Pod) {
        self.apply(Kind::Pod, &pod);
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.delete(Kind::Pod, namespace, name);
    }

    pub fn get_pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.get(Kind::Pod, namespace, name)
    }

    /// Changes a stored Pod in place (one MODIFIED event). Panics if there is no such pod.
    pub fn update_pod(&self, namespace: &str, name: &str, change: impl FnOnce(&mut Pod)) {
        self.update(Kind::Pod, namespace, name, change);
    }

    /// Sets the Ready and ContainersReady conditions and every container's `ready`, as the
    /// kubelet does when a readiness probe flips.
    pub fn set_pod_ready(&self, namespace: &str, name: &str, ready: bool) {
        self.update_pod(namespace, name, |pod| set_ready(pod, ready));
    }

    /// Starts a graceful deletion: sets deletionTimestamp (MODIFIED); the pod stays until
    /// [`FakeKube::delete_pod`].
    pub fn set_pod_terminating(&self, namespace: &str, name: &str) {
        self.update_pod(namespace, name, |pod| {
            pod.metadata.deletion_timestamp = Some(now());
            pod.metadata.deletion_grace_period_seconds = Some(30);
        });
    }

    /// Puts the pod on another node (spec.nodeName, status.hostIP and hostIPs).
    pub fn move_pod(&self, namespace: &str, name: &str, node: &str, host_ip: &str) {
        self.update_pod(namespace, name, |pod| {
            pod.spec.get_or_insert_with(Default::default).node_name = Some(node.to_string());
            let status = pod.status.get_or_insert_with(Default::default);
            status.host_ip = Some(host_ip.to_string());
            status.host_ips = Some(vec![HostIP {
                ip: host_ip.to_string(),
            }]);
        });
    }

    pub fn apply_node(&self, node: Node) {
        self.apply(Kind::Node, &node);
    }

    pub fn delete_node(&self, name: &str) {
        self.delete(Kind::Node, "", name);
    }

    pub fn get_node(&self, name: &str) -> Option<Node> {
        self.get(Kind::Node, "", name)
    }

    pub fn apply_config_map(&self, config_map: ConfigMap) {
        self.apply(Kind::ConfigMap, &config_map);
    }

    pub fn delete_config_map(&self, namespace: &str, name: &str) {
        self.delete(Kind::ConfigMap, namespace, name);
    }

    pub fn get_config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        self.get(Kind::ConfigMap, namespace, name)
    }

    /// Simulates an API outage: closes every open watch stream at once (cleanly, as a server
    /// going away does) and answers every new request with 503 (a `Status` body) until
    /// [`FakeKube::restore_api`]. The `kube` client retries 503 by itself with an exponential
    /// backoff from 5 ms, so its callers may not see an error for a long time, and after a long
    /// outage its next retry may come well after the restore.
    pub fn break_api(&self) {
        self.break_api_with(Outage::ServiceUnavailable);
    }

    /// Simulates an API outage of the given kind until [`FakeKube::restore_api`].
    pub fn break_api_with(&self, outage: Outage) {
        self.shared().lock().outage = Some(outage);
        self.shared().epoch.send_modify(|epoch| *epoch += 1);
    }

    pub fn restore_api(&self) {
        self.shared().lock().outage = None;
    }

    /// Forgets the history: a new watch from any resourceVersion older than now gets the
    /// `410 Gone` ERROR event (watches already open are not affected, as with etcd compaction).
    pub fn compact(&self) {
        self.shared().lock().compact();
    }

    /// How many events are kept for replay (default [`DEFAULT_HISTORY_LIMIT`]).
    pub fn set_history_limit(&self, limit: usize) {
        self.shared().lock().set_history_limit(limit);
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (default 1 s); applies
    /// to watches started afterwards.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared().lock().bookmark_interval = interval.max(Duration::from_millis(10));
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared().lock().resource_version
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared().lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.shared().lock().requests.clear();
    }

    /// Answers 403 Forbidden for every request on `resource` (a plural such as "nodes"),
    /// as a cluster without the RBAC rule would.
    pub fn forbid(&self, resource: &str) {
        self.shared().lock().forbidden.insert(resource.to_string());
    }

    pub fn allow(&self, resource: &str) {
        self.shared().lock().forbidden.remove(resource);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<()>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors and the like: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.lock().outage == Some(Outage::ConnectionReset) {
            // Dropped unanswered, as by a server that is going down.
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| server::handle(shared.clone(), request));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.changed() => {}
            }
        });
    }
}

fn now() -> Time {
    Time(store::now_timestamp())
}

fn string_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn set_ready(pod: &mut Pod, ready: bool) {
    let status = pod.status.get_or_insert_with(Default::default);
    let value = if ready { "True" } else { "False" };
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    for type_ in ["Ready", "ContainersReady"] {
        match conditions
            .iter_mut()
            .find(|condition| condition.type_ == type_)
        {
            Some(condition) if condition.status == value => {}
            Some(condition) => {
                condition.status = value.to_string();
                condition.last_transition_time = Some(now());
            }
            None => conditions.push(PodCondition {
                type_: type_.to_string(),
                status: value.to_string(),
                last_transition_time: Some(now()),
                ..Default::default()
            }),
        }
    }
    for container in status.container_statuses.iter_mut().flatten() {
        container.ready = ready;
    }
}

/// A running pod as the kubelet reports it: an "app" container and a "locality-sidecar"
/// container exposing `grpc-h3` (UDP `quic_port`), scheduled on `node`, with the Ready
/// condition set to `ready`.
#[allow(clippy::too_many_arguments)]
pub fn pod(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: &str,
    host_ip: &str,
    pod_ip: &str,
    ready: bool,
    quic_port: u16,
) -> Pod {
    let container_status = |container: &str, image: &str| ContainerStatus {
        name: container.to_string(),
        image: image.to_string(),
        image_id: format!("{image}@sha256:{}", "0".repeat(64)),
        ready,
        started: Some(true),
        restart_count: 0,
        ..Default::default()
    };
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(string_map(labels)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            containers: vec![
                Container {
                    name: "app".to_string(),
                    image: Some("example.com/echo:latest".to_string()),
                    ports: Some(vec![ContainerPort {
                        name: Some("grpc".to_string()),
                        container_port: 50051,
                        protocol: Some("TCP".to_string()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                Container {
                    name: "locality-sidecar".to_string(),
                    image: Some("example.com/locality-sidecar:latest".to_string()),
                    ports: Some(vec![ContainerPort {
                        name: Some("grpc-h3".to_string()),
                        container_port: i32::from(quic_port),
                        protocol: Some("UDP".to_string()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_string()),
            host_ip: Some(host_ip.to_string()),
            host_ips: Some(vec![HostIP {
                ip: host_ip.to_string(),
            }]),
            pod_ip: Some(pod_ip.to_string()),
            pod_ips: Some(vec![PodIP {
                ip: pod_ip.to_string(),
            }]),
            start_time: Some(now()),
            conditions: Some(
                ["PodReadyToStartContainers", "Initialized", "PodScheduled"]
                    .into_iter()
                    .map(|type_| PodCondition {
                        type_: type_.to_string(),
                        status: "True".to_string(),
                        last_transition_time: Some(now()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            container_statuses: Some(vec![
                container_status("app", "example.com/echo:latest"),
                container_status("locality-sidecar", "example.com/locality-sidecar:latest"),
            ]),
            qos_class: Some("BestEffort".to_string()),
            ..Default::default()
        }),
    };
    set_ready(&mut pod, ready);
    pod
}

/// A ClusterIP Service selecting `selector`, with a `grpc` port 50051.
pub fn service(namespace: &str, name: &str, selector: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(string_map(selector)),
            ports: Some(vec![ServicePort {
                name: Some("grpc".to_string()),
                port: 50051,
                target_port: Some(IntOrString::Int(50051)),
                protocol: Some("TCP".to_string()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// A Ready node with an InternalIP, labelled `topology.kubernetes.io/zone` when `zone` is given.
pub fn node(name: &str, zone: Option<&str>, internal_ip: &str) -> Node {
    let mut labels = string_map(&[
        ("kubernetes.io/hostname", name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
    ]);
    if let Some(zone) = zone {
        labels.insert("topology.kubernetes.io/zone".to_string(), zone.to_string());
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".to_string(),
                    address: internal_ip.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".to_string(),
                    address: name.to_string(),
                },
            ]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".to_string(),
                status: "True".to_string(),
                reason: Some("KubeletReady".to_string()),
                last_transition_time: Some(now()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A ConfigMap holding one key.
pub fn config_map(namespace: &str, name: &str, key: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
        ..Default::default()
    }
}
