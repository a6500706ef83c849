//! Kubernetes discovery: watches a Service (for its selector) and the Pods it selects, and
//! publishes the ready pods as an [`EndpointSet`]. Also watches Nodes for their zone label when
//! RBAC allows it.
//!
//! While the API server is unreachable the last published set stays in force: the watcher
//! retries with backoff, and a relist (after `410 Gone`) is buffered and swapped in whole at its
//! end, so callers never see a half-listed or empty set because of an API outage.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::endpoints::{Endpoint, EndpointSet, EndpointWatch};

/// The container port name that carries a pod's sidecar QUIC listener.
pub const QUIC_PORT_NAME: &str = "grpc-h3";
pub const DEFAULT_QUIC_PORT: u16 = 15443;
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error("cannot configure the Kubernetes client: {0}")]
    Client(String),
}

/// Builds a Kubernetes client: the given kubeconfig, else `KUBECONFIG`, else in-cluster.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, DiscoveryError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                DiscoveryError::Kubeconfig {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }
            })?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| DiscoveryError::Kubeconfig {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| DiscoveryError::Client(e.to_string()))?,
    };
    // kube's own request retries (429/503/504, doubling up to minutes) would hide an outage
    // from the watcher and, worse, keep it waiting long after the API server is back; the
    // watcher's backoff (`api_backoff`) already paces retries the way a sidecar needs.
    let mut config = config;
    config.default_retry = false;
    Client::try_from(config).map_err(|e| DiscoveryError::Client(e.to_string()))
}

/// Retry pacing for API watches: from 200 ms up to 3 s, jittered. kube's default (up to 30 s,
/// tuned for controllers) would leave a sidecar on stale endpoints for half a minute after the
/// API server comes back; a sidecar's watches are few and cheap, so it may come back sooner.
pub fn api_backoff() -> watcher::ExponentialBackoff {
    watcher::ExponentialBackoff::from(
        backon::ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(3))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times(),
    )
}

/// Zones of nodes by node name, from the Node watch.
pub type NodeZones = watch::Receiver<Arc<BTreeMap<String, String>>>;

/// Watches Nodes for their zone label. When the sidecar may not read Nodes, logs that the zone
/// tier is skipped, once, and publishes nothing more.
pub fn watch_node_zones(client: Client) -> NodeZones {
    let (sender, receiver) = watch::channel(Arc::new(BTreeMap::new()));
    tokio::spawn(async move {
        let nodes: Api<Node> = Api::all(client);
        let mut events = watcher::watcher(nodes, watcher::Config::default())
            .backoff(api_backoff())
            .boxed();
        let mut zones = BTreeMap::new();
        let mut relisting: Option<BTreeMap<String, String>> = None;
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => relisting = Some(BTreeMap::new()),
                Ok(Event::InitApply(node)) => {
                    if let (Some(buffer), Some(zone)) = (relisting.as_mut(), zone_of(&node)) {
                        buffer.insert(node.name_any(), zone);
                    }
                }
                Ok(Event::InitDone) => zones = relisting.take().unwrap_or_default(),
                Ok(Event::Apply(node)) => match zone_of(&node) {
                    Some(zone) => {
                        zones.insert(node.name_any(), zone);
                    }
                    None => {
                        zones.remove(&node.name_any());
                    }
                },
                Ok(Event::Delete(node)) => {
                    zones.remove(&node.name_any());
                }
                Err(error) if is_forbidden(&error) => {
                    tracing::warn!(%error, "cannot read Nodes (no RBAC for it?): the zone tier is skipped");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "node watch failed; retrying with backoff");
                    continue;
                }
            }
            if sender.send(Arc::new(zones.clone())).is_err() {
                return;
            }
        }
    });
    receiver
}

fn is_forbidden(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 403,
        watcher::Error::WatchError(status) => status.code == 403,
        _ => false,
    }
}

fn zone_of(node: &Node) -> Option<String> {
    node.labels().get(ZONE_LABEL).cloned()
}

/// An endpoint for `pod` when it can take calls: it has an IP, is Ready, and is not terminating.
/// Its zone is left for [`PodView::endpoint_set`] to fill in, since zones change on their own.
pub fn endpoint_of(pod: &Pod) -> Option<Endpoint> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|condition| condition.type_ == "Ready" && condition.status == "True");
    if !ready {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|spec| {
            spec.containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
        })
        .flat_map(|container| container.ports.iter().flatten())
        .find(|port| {
            port.name.as_deref() == Some(QUIC_PORT_NAME)
                && port.protocol.as_deref().unwrap_or("TCP") == "UDP"
        })
        .and_then(|port| u16::try_from(port.container_port).ok())
        .unwrap_or(DEFAULT_QUIC_PORT);
    let node = pod.spec.as_ref().and_then(|spec| spec.node_name.clone());
    Some(Endpoint {
        address: SocketAddr::new(ip, port),
        pod: pod.name_any(),
        zone: None,
        node,
        host_ip: status.host_ip.as_deref().and_then(|ip| ip.parse().ok()),
    })
}

/// The Service to discover: `name` or `name.namespace`.
#[derive(Debug, Clone)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
}

impl ServiceRef {
    pub fn parse(service: &str, default_namespace: &str) -> ServiceRef {
        match service.split_once('.') {
            Some((name, namespace)) => ServiceRef {
                name: name.to_string(),
                namespace: namespace.to_string(),
            },
            None => ServiceRef {
                name: service.to_string(),
                namespace: default_namespace.to_string(),
            },
        }
    }
}

type PodEvents = Pin<Box<dyn Stream<Item = Result<Event<Pod>, watcher::Error>> + Send>>;

/// The ready pods of one Service as they are known right now, by pod name. Only the few fields
/// routing needs are kept, not whole Pod objects, so memory stays small and proportional to the
/// number of pods (a 5,000-pod Service costs about 1 MiB here).
struct PodView {
    pods: HashMap<String, Endpoint>,
    /// A relist in progress: filled by InitApply, swapped in at InitDone.
    relisting: Option<HashMap<String, Endpoint>>,
    synced: bool,
}

impl PodView {
    fn new() -> PodView {
        PodView {
            pods: HashMap::new(),
            relisting: None,
            synced: false,
        }
    }

    fn apply(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.relisting = Some(HashMap::new()),
            Event::InitApply(pod) => {
                if let (Some(buffer), Some(endpoint)) = (self.relisting.as_mut(), endpoint_of(&pod))
                {
                    buffer.insert(pod.name_any(), endpoint);
                }
            }
            Event::InitDone => {
                if let Some(buffer) = self.relisting.take() {
                    self.pods = buffer;
                }
                self.synced = true;
            }
            Event::Apply(pod) => match endpoint_of(&pod) {
                Some(endpoint) => {
                    self.pods.insert(pod.name_any(), endpoint);
                }
                None => {
                    self.pods.remove(&pod.name_any());
                }
            },
            Event::Delete(pod) => {
                self.pods.remove(&pod.name_any());
            }
        }
    }

    fn endpoint_set(&self, zones: &BTreeMap<String, String>) -> EndpointSet {
        let mut endpoints: Vec<Endpoint> = self
            .pods
            .values()
            .map(|endpoint| Endpoint {
                zone: endpoint
                    .node
                    .as_ref()
                    .and_then(|node| zones.get(node).cloned()),
                ..endpoint.clone()
            })
            .collect();
        endpoints.sort_by(|a, b| a.pod.cmp(&b.pod));
        EndpointSet {
            endpoints,
            synced: self.synced,
        }
    }
}

/// Discovers the ready pods behind `service` and publishes them whenever they change.
pub fn watch_service(client: Client, service: ServiceRef, mut zones: NodeZones) -> EndpointWatch {
    let (sender, receiver) = watch::channel(Arc::new(EndpointSet::default()));
    tokio::spawn(async move {
        let services: Api<Service> = Api::namespaced(client.clone(), &service.namespace);
        let pods_api: Api<Pod> = Api::namespaced(client, &service.namespace);
        let service_config =
            watcher::Config::default().fields(&format!("metadata.name={}", service.name));
        let mut service_events = watcher::watcher(services, service_config)
            .backoff(api_backoff())
            .boxed();
        let mut selector: Option<BTreeMap<String, String>> = None;
        let mut pod_events: Option<PodEvents> = None;
        let mut view = PodView::new();
        let mut service_seen = false;
        let mut zones_open = true;
        loop {
            tokio::select! {
                event = service_events.next() => {
                    let Some(event) = event else { return };
                    match event {
                        Ok(Event::Apply(svc) | Event::InitApply(svc)) => {
                            service_seen = true;
                            let next = svc.spec.and_then(|spec| spec.selector).filter(|s| !s.is_empty());
                            if next != selector {
                                tracing::info!(service = %service.name, namespace = %service.namespace, selector = ?next, "service selector");
                                pod_events = next.as_ref().map(|labels| {
                                    let label_selector = labels
                                        .iter()
                                        .map(|(key, value)| format!("{key}={value}"))
                                        .collect::<Vec<_>>()
                                        .join(",");
                                    watcher::watcher(pods_api.clone(), watcher::Config::default().labels(&label_selector))
                                        .backoff(api_backoff())
                                        .boxed()
                                });
                                // The old selector's pods stay in service until the new list
                                // arrives: the relist buffer replaces them whole at InitDone.
                                view.relisting = None;
                                if next.is_none() {
                                    view = PodView { synced: true, ..PodView::new() };
                                }
                                selector = next;
                            }
                        }
                        Ok(Event::Delete(_)) => {
                            tracing::warn!(service = %service.name, namespace = %service.namespace, "service deleted: no endpoints");
                            selector = None;
                            pod_events = None;
                            view = PodView { synced: true, ..PodView::new() };
                        }
                        Ok(Event::InitDone) if !service_seen => {
                            tracing::warn!(service = %service.name, namespace = %service.namespace, "service not found; waiting for it");
                            continue;
                        }
                        Ok(Event::Init | Event::InitDone) => continue,
                        Err(error) => {
                            tracing::warn!(service = %service.name, %error, "service watch failed; keeping the last known endpoints");
                            continue;
                        }
                    }
                }
                event = next_pod_event(&mut pod_events) => match event {
                    Ok(event) => {
                        let is_init = matches!(event, Event::Init | Event::InitApply(_));
                        view.apply(event);
                        if is_init {
                            continue;
                        }
                    }
                    Err(error) => {
                        record_discovery_event(&service.name, "error");
                        tracing::warn!(service = %service.name, %error, "pod watch failed; keeping the last known endpoints");
                        continue;
                    }
                },
                changed = zones.changed(), if zones_open => {
                    // The node watch ends without RBAC for Nodes; zones then stay as they were.
                    zones_open = changed.is_ok();
                }
            }
            let set = view.endpoint_set(&zones.borrow());
            let changed = sender.send_if_modified(|current| {
                if **current == set {
                    false
                } else {
                    *current = Arc::new(set);
                    true
                }
            });
            if changed {
                record_discovery_event(&service.name, "applied");
            }
            if sender.is_closed() {
                return;
            }
        }
    });
    receiver
}

fn record_discovery_event(upstream: &str, kind: &'static str) {
    let metrics = crate::metrics::metrics();
    metrics
        .discovery_events
        .get_or_create(&crate::metrics::DiscoveryLabels {
            upstream: upstream.to_string(),
            kind,
        })
        .inc();
    if kind != "error" {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        metrics
            .discovery_last_event
            .get_or_create(&crate::metrics::upstream(upstream))
            .set(now);
    }
}

async fn next_pod_event(events: &mut Option<PodEvents>) -> Result<Event<Pod>, watcher::Error> {
    match events {
        Some(stream) => match stream.next().await {
            Some(event) => event,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(ready: bool, ports: Vec<ContainerPort>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("echo-1".to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".to_string()),
                containers: vec![Container {
                    name: "app".to_string(),
                    ports: Some(ports),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.1.2.3".to_string()),
                host_ip: Some("192.168.0.1".to_string()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_string(),
                    status: if ready { "True" } else { "False" }.to_string(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn port(name: &str, number: i32, protocol: &str) -> ContainerPort {
        ContainerPort {
            name: Some(name.to_string()),
            container_port: number,
            protocol: Some(protocol.to_string()),
            ..ContainerPort::default()
        }
    }

    #[test]
    fn ready_pod_uses_its_udp_grpc_h3_port() {
        let endpoint = endpoint_of(&pod(
            true,
            vec![
                port("grpc", 50051, "TCP"),
                port(QUIC_PORT_NAME, 16000, "UDP"),
            ],
        ))
        .unwrap();
        assert_eq!(endpoint.address, "10.1.2.3:16000".parse().unwrap());
        assert_eq!(endpoint.node.as_deref(), Some("node-a"));
        assert_eq!(endpoint.host_ip, Some("192.168.0.1".parse().unwrap()));
    }

    #[test]
    fn default_port_when_none_is_named_and_tcp_grpc_h3_does_not_count() {
        let endpoint = endpoint_of(&pod(true, vec![port(QUIC_PORT_NAME, 16000, "TCP")])).unwrap();
        assert_eq!(endpoint.address.port(), DEFAULT_QUIC_PORT);
    }

    #[test]
    fn unready_terminating_and_ip_less_pods_are_not_endpoints() {
        assert!(endpoint_of(&pod(false, vec![])).is_none());
        let mut terminating = pod(true, vec![]);
        terminating.metadata.deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(endpoint_of(&terminating).is_none());
        let mut no_ip = pod(true, vec![]);
        no_ip.status.as_mut().unwrap().pod_ip = None;
        assert!(endpoint_of(&no_ip).is_none());
    }
}
