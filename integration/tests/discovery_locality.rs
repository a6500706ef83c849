//! Discovery and same-node-first locality, end to end: a client sidecar discovers the echo
//! Service through the real `kube` client talking to the fake API server, and calls cross real
//! QUIC/TLS to per-pod sidecars. Assertions are on which pod answered and on what `/ready` and
//! `/endpoints` report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration::cluster::{answers_by_pod, Cluster, ClusterSpec, NAMESPACE, SERVICE};
use integration::harness::{echo_client, free_tcp_addr, http_get, Sidecar};

/// One same-node pod among six on three nodes: the client is on node-a.
fn one_same_node_pod() -> ClusterSpec {
    let mut spec = ClusterSpec::three_nodes(0);
    spec.pods = [
        ("echo-a1", "node-a"),
        ("echo-b1", "node-b"),
        ("echo-b2", "node-b"),
        ("echo-c1", "node-c"),
        ("echo-c2", "node-c"),
        ("echo-c3", "node-c"),
    ]
    .iter()
    .map(|(pod, node)| (pod.to_string(), node.to_string()))
    .collect();
    spec
}

fn share(counts: &BTreeMap<String, usize>, pods: &[&str]) -> usize {
    pods.iter()
        .map(|pod| counts.get(*pod).copied().unwrap_or(0))
        .sum()
}

/// Polls the client sidecar's ranking until `accept` holds; returns how long it took.
async fn wait_ranking(
    cluster: &Cluster,
    what: &str,
    accept: impl Fn(&[(String, String)]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let ranked = cluster.ranked_pods().await;
        if accept(&ranked) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: ranking still {ranked:?} after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_pod_answers_at_least_99_percent_of_calls() {
    let cluster = Cluster::start(one_same_node_pod()).await;
    let ranked = cluster.ranked_pods().await;
    assert_eq!(
        ranked[0],
        ("echo-a1".to_string(), "node".to_string()),
        "{ranked:?}"
    );
    assert!(
        ranked.iter().filter(|(_, tier)| tier == "zone").count() == 2,
        "node-b shares our zone: {ranked:?}"
    );

    let client = echo_client(cluster.app_addr).await;
    let (counts, failures) = answers_by_pod(&client, 1000, 16).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        share(&counts, &["echo-a1"]) >= 990,
        "same-node share too low: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unready_same_node_pod_moves_calls_to_the_next_tier_and_back() {
    let cluster = Cluster::start(one_same_node_pod()).await;
    let client = echo_client(cluster.app_addr).await;

    cluster.set_ready("echo-a1", false);
    let took = wait_ranking(&cluster, "un-ready echo-a1 leaves", |ranked| {
        ranked.iter().all(|(pod, _)| pod != "echo-a1")
    })
    .await;
    // The contract is "well under a second"; several sidecars share two cores here, so the
    // bound is generous and the measured time is printed (speed belongs in the benchmark).
    eprintln!("un-readying reached the ranking after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "un-readying took {took:?} to reach the ranking"
    );
    let (counts, failures) = answers_by_pod(&client, 200, 8).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(share(&counts, &["echo-a1"]), 0, "{counts:?}");
    assert_eq!(
        share(&counts, &["echo-b1", "echo-b2"]),
        200,
        "same zone comes next: {counts:?}"
    );

    cluster.set_ready("echo-a1", true);
    let took = wait_ranking(&cluster, "ready echo-a1 returns first", |ranked| {
        ranked.first().map(|(pod, _)| pod.as_str()) == Some("echo-a1")
    })
    .await;
    // The contract is "well under a second"; several sidecars share two cores here, so the
    // bound is generous and the measured time is printed (speed belongs in the benchmark).
    eprintln!("readying reached the ranking after {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "readying took {took:?} to reach the ranking"
    );
    let (counts, failures) = answers_by_pod(&client, 200, 8).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(share(&counts, &["echo-a1"]) >= 198, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pods_join_and_deleted_or_terminating_pods_leave() {
    let mut spec = ClusterSpec::three_nodes(0);
    spec.pods = vec![
        ("echo-b1".to_string(), "node-b".to_string()),
        ("echo-c1".to_string(), "node-c".to_string()),
    ];
    let mut cluster = Cluster::start(spec).await;
    let client = echo_client(cluster.app_addr).await;

    cluster.add_pod("echo-a1", "node-a").await;
    wait_ranking(&cluster, "new same-node pod ranks first", |ranked| {
        ranked.first().map(|(pod, _)| pod.as_str()) == Some("echo-a1")
    })
    .await;
    let (counts, _) = answers_by_pod(&client, 100, 4).await;
    assert_eq!(share(&counts, &["echo-a1"]), 100, "{counts:?}");

    cluster.kube.set_pod_terminating(NAMESPACE, "echo-a1");
    wait_ranking(&cluster, "terminating pod leaves", |ranked| {
        ranked.iter().all(|(pod, _)| pod != "echo-a1")
    })
    .await;
    cluster.kube.delete_pod(NAMESPACE, "echo-b1");
    wait_ranking(&cluster, "deleted pod leaves", |ranked| {
        ranked
            .iter()
            .map(|(pod, _)| pod.as_str())
            .collect::<Vec<_>>()
            == ["echo-c1"]
    })
    .await;
    let (counts, failures) = answers_by_pod(&client, 50, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(share(&counts, &["echo-c1"]), 50, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_service_selector_is_followed() {
    let cluster = Cluster::start(ClusterSpec::three_nodes(1)).await;
    // Relabel one pod and point the Service at the new label only.
    let mut pod = integration::fake_kube::pod(
        NAMESPACE,
        "echo-c1",
        &[("app", "echo-v2")],
        "node-c",
        "10.0.0.3",
        &cluster.pod("echo-c1").ip.to_string(),
        true,
        integration::cluster::QUIC_PORT,
    );
    pod.metadata.resource_version = None;
    cluster.kube.apply_pod(pod);
    cluster.kube.apply_service(integration::fake_kube::service(
        NAMESPACE,
        SERVICE,
        &[("app", "echo-v2")],
    ));
    wait_ranking(&cluster, "selector change", |ranked| {
        ranked
            .iter()
            .map(|(pod, _)| pod.as_str())
            .collect::<Vec<_>>()
            == ["echo-c1"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_watch_keeps_serving_and_a_relist_after_410_brings_new_pods() {
    let mut spec = ClusterSpec::three_nodes(1);
    spec.client_node = "node-c".to_string();
    let mut cluster = Cluster::start(spec).await;
    let client = echo_client(cluster.app_addr).await;

    cluster.kube.break_api();
    // 30 s without the API: calls keep landing on the last known pods.
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let (counts, failures) = answers_by_pod(&client, 20, 4).await;
        assert!(
            failures.is_empty(),
            "calls failed while the API was down: {failures:?}"
        );
        assert_eq!(share(&counts, &["echo-c1"]), 20, "{counts:?}");
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(rounds > 20);
    let ready = http_get(cluster.client.admin_addr(), "/ready")
        .await
        .expect("/ready answers");
    assert_eq!(
        ready.0, 200,
        "an API outage after the first sync keeps the sidecar ready"
    );

    // While the watch is down a new pod appears and history is compacted: the sidecar's next
    // watch gets 410 Gone and must relist to see it.
    cluster.kube.compact();
    cluster.add_pod("echo-c2", "node-c").await;
    cluster.kube.compact();
    cluster.kube.restore_api();
    wait_ranking(&cluster, "relist brings echo-c2", |ranked| {
        ranked.iter().any(|(pod, _)| pod == "echo-c2")
    })
    .await;
    let relists = cluster
        .kube
        .requests()
        .iter()
        .filter(|r| !r.watch && r.path.ends_with("/pods"))
        .count();
    assert!(relists >= 2, "expected a relist after the 410");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_first_full_sync() {
    let cluster = Cluster::start(ClusterSpec::three_nodes(1)).await;
    cluster.kube.break_api();
    // A second client sidecar starting while the API is down must not claim readiness.
    let app = free_tcp_addr();
    let admin = free_tcp_addr();
    let config = format!(
        "outbound: [{{listen: '{app}', service: {SERVICE}}}]\ntls: {{ca: '{}', cert: '{}', key: '{}'}}\nadmin: {{listen: '{admin}'}}\n",
        cluster.certs.ca().display(),
        cluster.certs.cert().display(),
        cluster.certs.key().display()
    );
    let args = vec![
        "--kubeconfig".to_string(),
        cluster.kubeconfig.display().to_string(),
    ];
    let env = vec![
        ("NODE_NAME".to_string(), "node-a".to_string()),
        ("POD_NAMESPACE".to_string(), NAMESPACE.to_string()),
    ];
    let mut late = Sidecar::spawn_with(
        "late-client",
        cluster.dir.path(),
        &config,
        admin,
        &args,
        &env,
    );
    // Every probe must get an answer, and every answer must be "not ready": a slow or absent
    // admin port must fail the test, not skip the check.
    let mut answers = 0;
    let mut last_error = None;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) || answers < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {answers} answers from /ready in 20 s; last error: {last_error:?}"
        );
        match http_get(admin, "/ready").await {
            Ok((status, body)) => {
                assert_eq!(status, 503, "ready before any sync: {body}");
                answers += 1;
            }
            // The admin listener may not be bound yet right after the start.
            Err(e) => last_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(late.is_running(), "{}", late.log_text());
    cluster.kube.restore_api();
    late.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_node_rbac_the_zone_tier_is_skipped_and_logged() {
    let mut spec = one_same_node_pod();
    spec.nodes_readable = false;
    let cluster = Cluster::start(spec).await;
    let ranked = cluster.ranked_pods().await;
    assert_eq!(ranked[0].1, "node");
    assert!(ranked.iter().all(|(_, tier)| tier != "zone"), "{ranked:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cluster.client.log_text().contains("zone tier is skipped") {
        assert!(
            Instant::now() < deadline,
            "no log line about the skipped zone tier"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cluster
            .client
            .log_text()
            .matches("zone tier is skipped")
            .count(),
        1,
        "logged once"
    );
}
