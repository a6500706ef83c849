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
        // Kubernetes runs a pod without an explicit account as `default`.
        service_account: Some(format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.spec
                .as_ref()
                .and_then(|spec| spec.service_account_name.as_deref())
                .unwrap_or("default")
        )),
        identity: None,
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
#[derive(Debug, Default)]
struct PodView {
    pods: HashMap<String, Endpoint>,
    /// A relist in progress: filled by InitApply, swapped in at InitDone.
    relisting: Option<HashMap<String, Endpoint>>,
    synced: bool,
}

impl PodView {
    /// No pods, and known to be none (no selector, or no Service): readers may stop waiting.
    fn known_empty() -> PodView {
        PodView {
            synced: true,
            ..PodView::default()
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

/// One event for the [`ServiceState`] machine: from the Service watch, the Pod watch, or the
/// Node watch's zones.
// Each event lives only from the watch stream to `ServiceState::step`, never in a collection,
// so boxing the large variants would cost an allocation per event and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum DiscoveryEvent {
    Service(Event<Service>),
    Pods(Event<Pod>),
    Zones(Arc<BTreeMap<String, String>>),
}

/// How the pod watch must change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodWatch {
    /// Replace the pod watch (if any) with one on this label selector (`k=v,k2=v2`).
    Start { label_selector: String },
    /// Drop the pod watch: there is nothing to select.
    Stop,
}

/// What the I/O loop must do after one event. The default is nothing at all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// Applied before `publish`.
    pub pod_watch: Option<PodWatch>,
    /// A set that differs from the last one published.
    pub publish: Option<EndpointSet>,
}

/// The decisions of one Service's discovery, without I/O: fed watcher events one at a time, it
/// says when to (re)start the pod watch and when readers must see a new [`EndpointSet`].
///
/// Kept synchronous so every transition (relists, selector changes, deletions, zone updates) is
/// unit-tested with hand-built events, as kube-rs tests its reflector.
#[derive(Debug)]
pub struct ServiceState {
    service: ServiceRef,
    /// The Service's selector; `None` when it has none or does not exist.
    selector: Option<BTreeMap<String, String>>,
    /// The Service exists as far as we know (seen, and not deleted since).
    service_present: bool,
    /// Ever seen: "not found" is only worth a warning before the first sighting.
    service_seen: bool,
    /// A relist of the Service watch is in progress; true once it has listed our Service.
    service_relisting: Option<bool>,
    pods: PodView,
    zones: Arc<BTreeMap<String, String>>,
    /// What readers have now; the watch channel starts with an empty, unsynced set.
    published: EndpointSet,
}

impl ServiceState {
    pub fn new(service: ServiceRef, zones: Arc<BTreeMap<String, String>>) -> ServiceState {
        ServiceState {
            service,
            selector: None,
            service_present: false,
            service_seen: false,
            service_relisting: None,
            pods: PodView::default(),
            zones,
            published: EndpointSet::default(),
        }
    }

    /// Takes in one event and returns what the I/O loop must do.
    pub fn step(&mut self, event: DiscoveryEvent) -> Step {
        let pod_watch = match event {
            DiscoveryEvent::Service(event) => self.on_service(event),
            DiscoveryEvent::Pods(event) => {
                // Part of a relist: nothing changes for readers until InitDone swaps it in.
                let mid_relist = matches!(event, Event::Init | Event::InitApply(_));
                self.pods.apply(event);
                if mid_relist {
                    return Step::default();
                }
                None
            }
            DiscoveryEvent::Zones(zones) => {
                self.zones = zones;
                None
            }
        };
        let set = self.pods.endpoint_set(&self.zones);
        let publish = if set == self.published {
            None
        } else {
            self.published = set.clone();
            Some(set)
        };
        Step { pod_watch, publish }
    }

    fn on_service(&mut self, event: Event<Service>) -> Option<PodWatch> {
        match event {
            Event::Init => {
                self.service_relisting = Some(false);
                None
            }
            Event::InitApply(service) => {
                if let Some(listed) = self.service_relisting.as_mut() {
                    *listed = true;
                }
                self.on_service_applied(service)
            }
            Event::Apply(service) => self.on_service_applied(service),
            Event::Delete(_) => self.on_service_gone(),
            Event::InitDone => match self.service_relisting.take() {
                // A complete list without our Service: it was deleted while the watch was down.
                Some(false) if self.service_present => self.on_service_gone(),
                Some(false) if !self.service_seen => {
                    tracing::warn!(service = %self.service.name, namespace = %self.service.namespace, "service not found; waiting for it");
                    None
                }
                _ => None,
            },
        }
    }

    fn on_service_applied(&mut self, service: Service) -> Option<PodWatch> {
        self.service_present = true;
        self.service_seen = true;
        let next = service
            .spec
            .and_then(|spec| spec.selector)
            .filter(|selector| !selector.is_empty());
        if next == self.selector {
            return None;
        }
        tracing::info!(service = %self.service.name, namespace = %self.service.namespace, selector = ?next, "service selector");
        self.selector = next;
        match &self.selector {
            Some(labels) => {
                // The old selector's pods stay in service until the new list arrives: the new
                // watch's relist replaces them whole at its InitDone.
                self.pods.relisting = None;
                Some(PodWatch::Start {
                    label_selector: label_selector(labels),
                })
            }
            None => {
                self.pods = PodView::known_empty();
                Some(PodWatch::Stop)
            }
        }
    }

    fn on_service_gone(&mut self) -> Option<PodWatch> {
        tracing::warn!(service = %self.service.name, namespace = %self.service.namespace, "service deleted: no endpoints");
        self.service_present = false;
        self.selector = None;
        self.pods = PodView::known_empty();
        Some(PodWatch::Stop)
    }
}

/// A Kubernetes label selector (`k=v,k2=v2`) that matches exactly `labels`.
fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Discovers the ready pods behind `service` and publishes them whenever they change. The
/// decisions are [`ServiceState`]'s; this loop only moves events in and carries out its steps.
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
        let mut pod_events: Option<PodEvents> = None;
        let mut state = ServiceState::new(service.clone(), zones.borrow_and_update().clone());
        let mut zones_open = true;
        loop {
            let event = tokio::select! {
                event = service_events.next() => match event {
                    None => return,
                    Some(Ok(event)) => DiscoveryEvent::Service(event),
                    Some(Err(error)) => {
                        tracing::warn!(service = %service.name, %error, "service watch failed; keeping the last known endpoints");
                        continue;
                    }
                },
                event = next_pod_event(&mut pod_events) => match event {
                    Ok(event) => DiscoveryEvent::Pods(event),
                    Err(error) => {
                        record_discovery_event(&service.name, "error");
                        tracing::warn!(service = %service.name, %error, "pod watch failed; keeping the last known endpoints");
                        continue;
                    }
                },
                changed = zones.changed(), if zones_open => {
                    if changed.is_err() {
                        // The node watch ends without RBAC for Nodes; zones then stay as they were.
                        zones_open = false;
                        continue;
                    }
                    DiscoveryEvent::Zones(zones.borrow_and_update().clone())
                }
            };
            let step = state.step(event);
            match step.pod_watch {
                Some(PodWatch::Start { label_selector }) => {
                    pod_events = Some(
                        watcher::watcher(
                            pods_api.clone(),
                            watcher::Config::default().labels(&label_selector),
                        )
                        .backoff(api_backoff())
                        .boxed(),
                    );
                }
                Some(PodWatch::Stop) => pod_events = None,
                None => {}
            }
            if let Some(set) = step.publish {
                sender.send_replace(Arc::new(set));
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

/// The service watch's state machine, fed hand-built watcher events.
#[cfg(test)]
mod state_tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str, ip: &str, node: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_string()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(ip.to_string()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_string(),
                    status: if ready { "True" } else { "False" }.to_string(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn service(selector: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("echo".to_string()),
                namespace: Some("default".to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                selector: Some(
                    selector
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn new_state() -> ServiceState {
        ServiceState::new(
            ServiceRef::parse("echo", "default"),
            Arc::new(BTreeMap::new()),
        )
    }

    fn svc(event: Event<Service>) -> DiscoveryEvent {
        DiscoveryEvent::Service(event)
    }

    fn pods(event: Event<Pod>) -> DiscoveryEvent {
        DiscoveryEvent::Pods(event)
    }

    fn names(set: &EndpointSet) -> Vec<&str> {
        set.endpoints.iter().map(|e| e.pod.as_str()).collect()
    }

    /// A state whose Service selects `app=echo` and whose pod watch has listed `listed`.
    fn synced_with(listed: Vec<Pod>) -> ServiceState {
        let mut state = new_state();
        state.step(svc(Event::Init));
        state.step(svc(Event::InitApply(service(&[("app", "echo")]))));
        state.step(svc(Event::InitDone));
        state.step(pods(Event::Init));
        for pod in listed {
            state.step(pods(Event::InitApply(pod)));
        }
        state.step(pods(Event::InitDone));
        state
    }

    #[test]
    fn first_service_sighting_starts_the_pod_watch_on_its_selector() {
        let mut state = new_state();
        assert_eq!(state.step(svc(Event::Init)), Step::default());
        let step = state.step(svc(Event::InitApply(service(&[
            ("tier", "backend"),
            ("app", "echo"),
        ]))));
        assert_eq!(
            step.pod_watch,
            Some(PodWatch::Start {
                label_selector: "app=echo,tier=backend".to_string()
            })
        );
        // Nothing is known about pods yet: readers keep waiting on the unsynced empty set.
        assert_eq!(step.publish, None);
        assert_eq!(state.step(svc(Event::InitDone)), Step::default());
    }

    #[test]
    fn pod_relist_is_published_whole_at_init_done_and_marks_synced() {
        let mut state = new_state();
        state.step(svc(Event::Apply(service(&[("app", "echo")]))));
        assert_eq!(state.step(pods(Event::Init)), Step::default());
        let mid = state.step(pods(Event::InitApply(pod("a", "10.0.0.1", "n1", true))));
        assert_eq!(mid, Step::default(), "no half-listed set is published");
        state.step(pods(Event::InitApply(pod("b", "10.0.0.2", "n2", true))));
        let done = state.step(pods(Event::InitDone));
        let set = done.publish.expect("the relist is published");
        assert!(set.synced);
        assert_eq!(names(&set), ["a", "b"]);
    }

    #[test]
    fn relist_replaces_the_set_dropping_pods_that_vanished_during_an_outage() {
        let mut state = synced_with(vec![
            pod("a", "10.0.0.1", "n1", true),
            pod("b", "10.0.0.2", "n1", true),
        ]);
        // The watch restarts (410 Gone): the old set stays until the new list is complete.
        assert_eq!(state.step(pods(Event::Init)), Step::default());
        assert_eq!(
            state.step(pods(Event::InitApply(pod("c", "10.0.0.3", "n2", true)))),
            Step::default()
        );
        let set = state.step(pods(Event::InitDone)).publish.expect("changed");
        assert_eq!(names(&set), ["c"]);
        assert!(set.synced);
    }

    #[test]
    fn pod_becoming_ready_is_added_and_unready_is_removed() {
        let mut state = synced_with(vec![pod("a", "10.0.0.1", "n1", true)]);
        let set = state
            .step(pods(Event::Apply(pod("b", "10.0.0.2", "n1", true))))
            .publish
            .expect("b added");
        assert_eq!(names(&set), ["a", "b"]);
        let set = state
            .step(pods(Event::Apply(pod("a", "10.0.0.1", "n1", false))))
            .publish
            .expect("a removed");
        assert_eq!(names(&set), ["b"]);
    }

    #[test]
    fn unready_pod_never_seen_ready_publishes_nothing() {
        let mut state = synced_with(vec![pod("a", "10.0.0.1", "n1", true)]);
        let step = state.step(pods(Event::Apply(pod("b", "10.0.0.2", "n1", false))));
        assert_eq!(step, Step::default());
    }

    #[test]
    fn deleted_pod_is_removed() {
        let mut state = synced_with(vec![
            pod("a", "10.0.0.1", "n1", true),
            pod("b", "10.0.0.2", "n1", true),
        ]);
        let set = state
            .step(pods(Event::Delete(pod("a", "10.0.0.1", "n1", true))))
            .publish
            .expect("a removed");
        assert_eq!(names(&set), ["b"]);
    }

    #[test]
    fn the_same_state_twice_publishes_nothing() {
        let mut state = synced_with(vec![pod("a", "10.0.0.1", "n1", true)]);
        let again = pod("a", "10.0.0.1", "n1", true);
        assert_eq!(state.step(pods(Event::Apply(again))), Step::default());
        // Same Service, same selector: the pod watch is left alone.
        assert_eq!(
            state.step(svc(Event::Apply(service(&[("app", "echo")])))),
            Step::default()
        );
        // A relist that finds exactly what we have changes nothing for readers.
        state.step(pods(Event::Init));
        state.step(pods(Event::InitApply(pod("a", "10.0.0.1", "n1", true))));
        assert_eq!(state.step(pods(Event::InitDone)), Step::default());
    }

    #[test]
    fn selector_change_restarts_the_pod_watch_and_keeps_old_pods_until_the_new_list() {
        let mut state = synced_with(vec![pod("a", "10.0.0.1", "n1", true)]);
        let step = state.step(svc(Event::Apply(service(&[("app", "echo-v2")]))));
        assert_eq!(
            step.pod_watch,
            Some(PodWatch::Start {
                label_selector: "app=echo-v2".to_string()
            })
        );
        assert_eq!(step.publish, None, "old pods keep serving meanwhile");
        state.step(pods(Event::Init));
        state.step(pods(Event::InitApply(pod("v2", "10.0.0.9", "n1", true))));
        let set = state.step(pods(Event::InitDone)).publish.expect("swapped");
        assert_eq!(names(&set), ["v2"]);
    }

    #[test]
    fn selector_removed_stops_the_pod_watch_and_empties_the_set() {
        let mut state = synced_with(vec![pod("a", "10.0.0.1", "n1", true)]);
        let step = state.step(svc(Event::Apply(service(&[]))));
        assert_eq!(step.pod_watch, Some(PodWatch::Stop));
        let set = step.publish.expect("emptied");
        assert!(set.endpoints.is_empty() && set.synced);
    }

    #[test]
    fn service_deleted_stops_the_pod_watch_and_empties_the_set() {
        let mut state = synced_with(vec![pod("a", "10.0.0.1", "n1", true)]);
        let step = state.step(svc(Event::Delete(service(&[("app", "echo")]))));
        assert_eq!(step.pod_watch, Some(PodWatch::Stop));
        let set = step.publish.expect("emptied");
        assert!(set.endpoints.is_empty());
        assert!(
            set.synced,
            "an absent Service is a known answer, not a wait"
        );
        // Recreated: the pod watch starts again.
        let step = state.step(svc(Event::Apply(service(&[("app", "echo")]))));
        assert!(matches!(step.pod_watch, Some(PodWatch::Start { .. })));
    }

    #[test]
    fn service_relist_without_the_service_counts_as_deleted() {
        let mut state = synced_with(vec![pod("a", "10.0.0.1", "n1", true)]);
        assert_eq!(state.step(svc(Event::Init)), Step::default());
        let step = state.step(svc(Event::InitDone));
        assert_eq!(step.pod_watch, Some(PodWatch::Stop));
        assert!(step.publish.expect("emptied").endpoints.is_empty());
    }

    #[test]
    fn service_relist_that_still_lists_it_changes_nothing() {
        let mut state = synced_with(vec![pod("a", "10.0.0.1", "n1", true)]);
        state.step(svc(Event::Init));
        let step = state.step(svc(Event::InitApply(service(&[("app", "echo")]))));
        assert_eq!(step, Step::default());
        assert_eq!(state.step(svc(Event::InitDone)), Step::default());
    }

    #[test]
    fn missing_service_at_start_keeps_readers_waiting() {
        let mut state = new_state();
        state.step(svc(Event::Init));
        assert_eq!(state.step(svc(Event::InitDone)), Step::default());
    }

    #[test]
    fn zones_fill_in_endpoint_zones_by_node() {
        let mut state = synced_with(vec![
            pod("a", "10.0.0.1", "n1", true),
            pod("b", "10.0.0.2", "n2", true),
        ]);
        let zones = BTreeMap::from([("n1".to_string(), "z1".to_string())]);
        let set = state
            .step(DiscoveryEvent::Zones(Arc::new(zones.clone())))
            .publish
            .expect("zone added");
        let zone_of = |set: &EndpointSet, pod: &str| {
            set.endpoints
                .iter()
                .find(|e| e.pod == pod)
                .and_then(|e| e.zone.clone())
        };
        assert_eq!(zone_of(&set, "a").as_deref(), Some("z1"));
        assert_eq!(zone_of(&set, "b"), None);
        // The same zones again: nothing to publish.
        assert_eq!(
            state.step(DiscoveryEvent::Zones(Arc::new(zones))),
            Step::default()
        );
        // A pod arriving later gets its node's zone too.
        let set = state
            .step(pods(Event::Apply(pod("c", "10.0.0.3", "n1", true))))
            .publish
            .expect("c added");
        assert_eq!(zone_of(&set, "c").as_deref(), Some("z1"));
    }
}
