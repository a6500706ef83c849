//! A small Kubernetes-like cluster on one machine, for the discovery and retry tests and the
//! local demo: the fake API server, "nodes" (names, zones and host IPs in the API only), echo
//! pods each with their own loopback IP (`127.x.y.z`), their own echo server and their own
//! inbound sidecar, and a client pod whose outbound sidecar discovers the echo Service through the
//! real `kube` client. Nothing here is mocked: every call crosses real sockets, real QUIC and
//! real TLS between separate sidecar processes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::echo_server::{spawn_echo_server, EchoServerHandle};
use crate::fake_kube::{self, FakeKube};
use crate::harness::{free_tcp_addr, generate_certs, http_get, next_loopback_ip, CertDir, Sidecar};

pub const NAMESPACE: &str = "default";
pub const SERVICE: &str = "echo";
pub const CONFIGMAP: &str = "locality-sidecar";
/// Every pod's sidecar listens for QUIC on this port of its own IP, as in a real cluster.
pub const QUIC_PORT: u16 = 15443;

/// A node: a name, a zone and a host IP (the host IP only appears in the API).
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub zone: String,
    pub host_ip: String,
}

impl NodeSpec {
    pub fn new(name: &str, zone: &str, host_ip: &str) -> NodeSpec {
        NodeSpec {
            name: name.to_string(),
            zone: zone.to_string(),
            host_ip: host_ip.to_string(),
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: Vec<NodeSpec>,
    /// (pod name, node name) of each echo pod.
    pub pods: Vec<(String, String)>,
    /// The node the client pod runs on.
    pub client_node: String,
    /// The client sidecar's `serviceConfig`, if any.
    pub service_config: Option<serde_json::Value>,
    /// Extra top-level config sections for the client sidecar (e.g. outlierDetection). Without
    /// a `locality` section the client runs with `locality: {strict: true}`.
    pub client_extra: serde_json::Value,
    /// Have the client sidecar watch the `locality-sidecar` ConfigMap (`--configmap`).
    pub watch_configmap: bool,
    /// Let the sidecar read Nodes (for the zone tier); false simulates missing RBAC.
    pub nodes_readable: bool,
}

impl ClusterSpec {
    /// Three nodes in two zones; `pods_per_node` echo pods on each; the client on node-a.
    pub fn three_nodes(pods_per_node: usize) -> ClusterSpec {
        let nodes = vec![
            NodeSpec::new("node-a", "zone-1", "10.0.0.1"),
            NodeSpec::new("node-b", "zone-1", "10.0.0.2"),
            NodeSpec::new("node-c", "zone-2", "10.0.0.3"),
        ];
        let mut pods = Vec::new();
        for node in &nodes {
            let letter = node.name.trim_start_matches("node-");
            for index in 1..=pods_per_node {
                pods.push((format!("echo-{letter}{index}"), node.name.clone()));
            }
        }
        ClusterSpec {
            nodes,
            pods,
            client_node: "node-a".to_string(),
            service_config: None,
            client_extra: json!({}),
            watch_configmap: false,
            nodes_readable: true,
        }
    }
}

/// One echo pod: its app and its sidecar.
pub struct EchoPod {
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub app_addr: SocketAddr,
    pub app: Option<EchoServerHandle>,
    pub sidecar: Sidecar,
}

pub struct Cluster {
    pub kube: FakeKube,
    pub spec: ClusterSpec,
    pub pods: Vec<EchoPod>,
    pub client: Sidecar,
    /// Where the client app dials (the client sidecar's outbound listener).
    pub app_addr: SocketAddr,
    pub certs: CertDir,
    pub kubeconfig: PathBuf,
    // Last: processes stop before their directory goes.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(spec: ClusterSpec) -> Cluster {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let certs = generate_certs(&dir.path().join("certs"), &[]);
        let kube = FakeKube::start().await;
        let kubeconfig = dir.path().join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig, NAMESPACE);
        if !spec.nodes_readable {
            kube.forbid("nodes");
        }
        for node in &spec.nodes {
            kube.apply_node(fake_kube::node(&node.name, Some(&node.zone), &node.host_ip));
        }
        kube.apply_service(fake_kube::service(NAMESPACE, SERVICE, &[("app", SERVICE)]));

        let mut pods = Vec::new();
        for (name, node) in &spec.pods {
            // Each pod has an IP of its own, as in a real cluster; its QUIC port is fixed.
            let ip = next_loopback_ip();
            let pod = start_pod(&dir, &certs, name, node, ip).await;
            let host_ip = host_ip_of(&spec, node);
            kube.apply_pod(fake_kube::pod(
                NAMESPACE,
                name,
                &[("app", SERVICE)],
                node,
                &host_ip,
                &ip.to_string(),
                true,
                QUIC_PORT,
            ));
            pods.push(pod);
        }

        let app_addr = free_tcp_addr();
        let admin = free_tcp_addr();
        let mut config = json!({
            "outbound": [{"listen": app_addr.to_string(), "service": SERVICE}],
            "tls": {
                "ca": certs.ca().display().to_string(),
                "cert": certs.cert().display().to_string(),
                "key": certs.key().display().to_string(),
            },
            "admin": {"listen": admin.to_string()},
        });
        if let Some(service_config) = &spec.service_config {
            config["serviceConfig"] = service_config.clone();
        }
        if let Some(extra) = spec.client_extra.as_object() {
            for (key, value) in extra {
                config[key] = value.clone();
            }
        }
        // Tests of discovery, fall-through and failures assert where calls land under loads of
        // several calls at once, which load-aware spill-over would spread over the tiers: they
        // run with strict locality unless the spec sets `locality` itself (load_locality.rs
        // tests spill-over, with `locality` given).
        if config.get("locality").is_none() {
            config["locality"] = json!({"strict": true});
        }
        let config_text = serde_yaml_ng::to_string(&config).expect("config serialises");
        if spec.watch_configmap {
            kube.apply_config_map(fake_kube::config_map(
                NAMESPACE,
                CONFIGMAP,
                "config.yaml",
                &config_text,
            ));
        }
        let mut args = vec!["--kubeconfig".to_string(), kubeconfig.display().to_string()];
        if spec.watch_configmap {
            args.push("--configmap".to_string());
            args.push(CONFIGMAP.to_string());
        }
        let env = vec![
            ("NODE_NAME".to_string(), spec.client_node.clone()),
            ("HOST_IP".to_string(), host_ip_of(&spec, &spec.client_node)),
            ("POD_NAMESPACE".to_string(), NAMESPACE.to_string()),
            ("POD_NAME".to_string(), "client".to_string()),
        ];
        let client =
            Sidecar::start_with("client", dir.path(), &config_text, admin, &args, &env).await;
        let cluster = Cluster {
            kube,
            spec,
            pods,
            client,
            app_addr,
            certs,
            kubeconfig,
            dir,
        };
        cluster
            .wait_for_endpoints(cluster.pods.len(), Duration::from_secs(10))
            .await;
        cluster
    }

    pub fn pod(&self, name: &str) -> &EchoPod {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn pod_mut(&mut self, name: &str) -> &mut EchoPod {
        self.pods
            .iter_mut()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn set_ready(&self, name: &str, ready: bool) {
        self.kube.set_pod_ready(NAMESPACE, name, ready);
    }

    /// Kills the pod's app abruptly (its connections drop) and returns once it is gone; its
    /// sidecar stays up.
    pub async fn kill_app(&mut self, name: &str) {
        if let Some(app) = self.pod_mut(name).app.take() {
            app.kill().await;
        }
    }

    /// Kills the pod's sidecar with SIGKILL (as when its container or node dies), marked as
    /// expected so the harness does not count it as a crash; the pod's app stays up.
    pub fn kill_sidecar(&mut self, name: &str) {
        self.pod_mut(name).sidecar.kill();
    }

    /// Starts the pod's app again on the same address.
    pub async fn restart_app(&mut self, name: &str) {
        let pod = self.pod_mut(name);
        let app = spawn_echo_server(pod.app_addr, &pod.name)
            .await
            .unwrap_or_else(|e| panic!("restart app of {name}: {e}"));
        pod.app = Some(app);
    }

    /// Adds a ready echo pod on `node` (its own app and sidecar) and registers it in the API.
    pub async fn add_pod(&mut self, name: &str, node: &str) {
        let ip = next_loopback_ip();
        let pod = start_pod(&self.dir, &self.certs, name, node, ip).await;
        self.kube.apply_pod(fake_kube::pod(
            NAMESPACE,
            name,
            &[("app", SERVICE)],
            node,
            &host_ip_of(&self.spec, node),
            &ip.to_string(),
            true,
            QUIC_PORT,
        ));
        self.pods.push(pod);
    }

    /// Calls the echo apps of every pod received so far: each attempt that reached an app
    /// counts once (a killed app's calls no longer count).
    pub fn app_calls(&self) -> u64 {
        self.pods
            .iter()
            .filter_map(|pod| pod.app.as_ref())
            .map(|app| app.state().calls_started())
            .sum()
    }

    /// Rewrites the client's ConfigMap (`watch_configmap` clusters): `change` edits the config
    /// as JSON, and the result is applied through the API as an operator's edit would be.
    pub fn update_config(&self, change: impl FnOnce(&mut serde_json::Value)) {
        let configmap = self
            .kube
            .get_config_map(NAMESPACE, CONFIGMAP)
            .expect("the cluster watches a ConfigMap");
        let text = configmap
            .data
            .as_ref()
            .and_then(|data| data.get("config.yaml"))
            .cloned()
            .expect("the ConfigMap has config.yaml");
        let mut config: serde_json::Value =
            serde_yaml_ng::from_str(&text).expect("the ConfigMap holds YAML");
        change(&mut config);
        self.kube.apply_config_map(fake_kube::config_map(
            NAMESPACE,
            CONFIGMAP,
            "config.yaml",
            &serde_yaml_ng::to_string(&config).expect("config serialises"),
        ));
    }

    /// The client sidecar's `/endpoints` view.
    pub async fn endpoints_view(&self) -> serde_json::Value {
        let (status, body) = http_get(self.client.admin_addr(), "/endpoints")
            .await
            .expect("admin /endpoints answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("/endpoints is JSON")
    }

    /// Pod names the client sidecar currently ranks, in order.
    pub async fn ranked_pods(&self) -> Vec<(String, String)> {
        let view = self.endpoints_view().await;
        view["upstreams"][0]["endpoints"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|e| {
                        (
                            e["pod"].as_str().unwrap_or_default().to_string(),
                            e["tier"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the client sidecar ranks exactly `count` endpoints.
    pub async fn wait_for_endpoints(&self, count: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ranked = self.ranked_pods().await;
            if ranked.len() == count {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("client sidecar ranks {ranked:?}, expected {count} endpoints");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The client sidecar's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.client.admin_addr(), "/metrics")
            .await
            .expect("admin /metrics answers");
        assert_eq!(status, 200, "{body}");
        body
    }
}

fn host_ip_of(spec: &ClusterSpec, node: &str) -> String {
    spec.nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.host_ip.clone())
        .unwrap_or_else(|| panic!("no node {node}"))
}

async fn start_pod(
    dir: &tempfile::TempDir,
    certs: &CertDir,
    name: &str,
    node: &str,
    ip: Ipv4Addr,
) -> EchoPod {
    let app = spawn_echo_server(SocketAddr::new(IpAddr::V4(ip), 0), name)
        .await
        .unwrap_or_else(|e| panic!("start app of {name} on {ip}: {e}"));
    let app_addr = app.addr();
    let admin = free_tcp_addr();
    let config = json!({
        "inbound": {"listen": SocketAddr::new(IpAddr::V4(ip), QUIC_PORT).to_string(), "forward": app_addr.to_string()},
        "tls": {
            "ca": certs.ca().display().to_string(),
            "cert": certs.cert().display().to_string(),
            "key": certs.key().display().to_string(),
        },
        "admin": {"listen": admin.to_string()},
    });
    let text = serde_yaml_ng::to_string(&config).expect("config serialises");
    let env = vec![
        ("NODE_NAME".to_string(), node.to_string()),
        ("POD_NAME".to_string(), name.to_string()),
    ];
    let sidecar = Sidecar::start_with(name, dir.path(), &text, admin, &[], &env).await;
    EchoPod {
        name: name.to_string(),
        node: node.to_string(),
        ip,
        app_addr,
        app: Some(app),
        sidecar,
    }
}

/// Counts, per server (pod) name, who answered `calls` unary calls made `concurrency` at a time.
pub async fn answers_by_pod(
    client: &crate::pb::echo_client::EchoClient<tonic::transport::Channel>,
    calls: usize,
    concurrency: usize,
) -> (
    std::collections::BTreeMap<String, usize>,
    Vec<tonic::Status>,
) {
    use futures::StreamExt;
    let results: Vec<Result<String, tonic::Status>> = futures::stream::iter(0..calls)
        .map(|_| {
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(crate::pb::EchoRequest {
                    payload: bytes::Bytes::from_static(b"ping"),
                    ..Default::default()
                });
                request.set_timeout(Duration::from_secs(10));
                client
                    .unary(request)
                    .await
                    .map(|reply| reply.into_inner().server)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut counts = std::collections::BTreeMap::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(server) => *counts.entry(server).or_insert(0) += 1,
            Err(status) => failures.push(status),
        }
    }
    (counts, failures)
}

/// A steady load of unary calls, `concurrency` at a time, until [`Load::finish`]: tests
/// synchronize on its count of completed calls (kill something after N calls, stop N calls
/// later) instead of on sleeps, so a slow machine changes the timing but not what is tested.
pub struct Load {
    completed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: tokio::task::JoinSet<LoadResult>,
}

/// One load worker's tally: who answered, and the failures.
type LoadResult = (
    std::collections::BTreeMap<String, usize>,
    Vec<tonic::Status>,
);

impl Load {
    /// Starts `concurrency` workers, each making one call after another (10 s deadline each).
    pub fn start(
        client: &crate::pb::echo_client::EchoClient<tonic::transport::Channel>,
        concurrency: usize,
    ) -> Load {
        use std::sync::atomic::Ordering;
        let completed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let mut client = client.clone();
            let completed = completed.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                let mut counts = std::collections::BTreeMap::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let mut request = tonic::Request::new(crate::pb::EchoRequest {
                        payload: bytes::Bytes::from_static(b"load"),
                        ..Default::default()
                    });
                    request.set_timeout(Duration::from_secs(10));
                    match client.unary(request).await {
                        Ok(reply) => *counts.entry(reply.into_inner().server).or_insert(0) += 1,
                        Err(status) => failures.push(status),
                    }
                    completed.fetch_add(1, Ordering::SeqCst);
                }
                (counts, failures)
            });
        }
        Load {
            completed,
            stop,
            tasks,
        }
    }

    /// Calls completed so far (answered or failed).
    pub fn completed(&self) -> usize {
        self.completed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `count` calls completed; panics after `limit`.
    pub async fn wait_completed(&self, count: usize, limit: Duration) {
        crate::harness::within(
            limit,
            &format!("{count} completed calls of the load"),
            async {
                while self.completed() < count {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
        )
        .await
    }

    /// Stops the workers and returns who answered and what failed; panics after `limit`.
    pub async fn finish(mut self, limit: Duration) -> LoadResult {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let results = crate::harness::within(limit, "the load's last calls", async {
            let mut all = Vec::new();
            while let Some(result) = self.tasks.join_next().await {
                all.push(result.expect("a load worker panicked"));
            }
            all
        })
        .await;
        let mut counts = std::collections::BTreeMap::new();
        let mut failures = Vec::new();
        for (worker_counts, worker_failures) in results {
            for (pod, n) in worker_counts {
                *counts.entry(pod).or_insert(0) += n;
            }
            failures.extend(worker_failures);
        }
        (counts, failures)
    }
}
