//! A pod's sidecar stopped the way Kubernetes stops it (SIGTERM), and outlier ejection over
//! time, end to end: calls in flight on the draining pod finish there, new calls move to other
//! pods and none fails; an ejected pod comes back by itself after its ejection time, is ejected
//! for longer the next time, and `maxEjectionPercent` caps how many pods are out at once.

use std::time::{Duration, Instant};

use integration::cluster::{answers_by_pod, Cluster, ClusterSpec, Load};
use integration::harness::{echo_client, metric_sum, within};
use integration::pb::{EchoReply, EchoRequest};
use serde_json::json;

/// Upper bound for any single call or load phase: only there so a hang fails the test with a
/// reason instead of stalling the suite.
const LIMIT: Duration = Duration::from_secs(60);

async fn call(cluster: &Cluster, request: EchoRequest) -> Result<EchoReply, tonic::Status> {
    let mut client = echo_client(cluster.app_addr).await;
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(20));
    within(LIMIT, "unary call", client.unary(request))
        .await
        .map(tonic::Response::into_inner)
}

/// A request the listed pods (all when empty) fail with UNAVAILABLE, trailers-only.
fn failing(pods: &[&str]) -> EchoRequest {
    EchoRequest {
        status_code: tonic::Code::Unavailable as i32,
        status_message: "pod says no".to_string(),
        trailers_only: true,
        fail_on: pods.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

/// The pods the client sidecar's `/endpoints` shows as ejected.
async fn ejected_pods(cluster: &Cluster) -> Vec<String> {
    let view = cluster.endpoints_view().await;
    view["upstreams"][0]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["ejected"] == json!(true))
        .filter_map(|e| e["pod"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_sidecar_finishes_its_calls_and_new_ones_move_elsewhere_without_a_failure() {
    // No retry policy: a clean drain must need none. The API keeps listing the pod as ready
    // throughout (the worst case: in a cluster its endpoint goes away about when SIGTERM comes).
    let mut cluster = Cluster::start(ClusterSpec::three_nodes(1)).await;
    let client = echo_client(cluster.app_addr).await;
    let (before, failures) = answers_by_pod(&client, 20, 1).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        before.get("echo-a1"),
        Some(&20),
        "same node first: {before:?}"
    );

    // Slow calls in flight on the same-node pod when its sidecar is told to stop. The first
    // one goes there for sure (nothing else is waiting); the second may spill to another tier.
    let a1 = cluster
        .pod("echo-a1")
        .app
        .as_ref()
        .expect("app")
        .state()
        .clone();
    let a1_before = a1.calls_started();
    let all_before = cluster.app_calls();
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let mut client = client.clone();
        slow.spawn(async move {
            let mut request = tonic::Request::new(EchoRequest {
                delay_ms: 3000,
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(20));
            client.unary(request).await.map(|r| r.into_inner().server)
        });
        within(LIMIT, "a slow call reaches an app", async {
            while cluster.app_calls() < all_before + slow.len() as u64 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
    let on_a1 = a1.calls_started() - a1_before;
    assert!(on_a1 >= 1, "the first slow call goes to the same-node pod");

    let terminated = Instant::now();
    cluster
        .pods
        .iter_mut()
        .find(|pod| pod.name == "echo-a1")
        .expect("echo-a1")
        .sidecar
        .terminate();
    // New calls from now on, while the slow ones are still in flight.
    let load = Load::start(&client, 4);

    // The calls in flight finish where they were, answered by the app behind the draining
    // sidecar (not failed, not retried elsewhere).
    let mut answered_by_a1 = 0;
    while let Some(done) = within(LIMIT, "a slow call", slow.join_next()).await {
        match done.expect("a slow call task panicked") {
            Ok(server) if server == "echo-a1" => answered_by_a1 += 1,
            Ok(_) => {}
            Err(status) => {
                // What the client sidecar said about it: a drain must not look like a failure.
                let log = cluster.client.log_text();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "an in-flight call failed: {status:?}\nclient sidecar log, newest first:\n{}",
                    tail.join("\n")
                )
            }
        }
    }
    assert_eq!(
        answered_by_a1, on_a1,
        "every call in flight on the draining pod is answered there"
    );
    let at_slow_done = load.completed();
    eprintln!(
        "in-flight calls finished {:?} after SIGTERM; {at_slow_done} new calls meanwhile",
        terminated.elapsed()
    );
    let sidecar = &mut cluster
        .pods
        .iter_mut()
        .find(|pod| pod.name == "echo-a1")
        .expect("echo-a1")
        .sidecar;
    let status = sidecar.wait_exit(Duration::from_secs(20)).await;
    eprintln!(
        "the sidecar exited ({status}) {:?} after SIGTERM",
        terminated.elapsed()
    );
    assert!(status.success(), "a drained sidecar exits 0: {status}");
    let log = sidecar.log_text();
    assert!(log.contains("inbound drained"), "{log}");

    // New calls kept going (to the other pods once the drain began) and none failed.
    let at_exit = load.completed();
    load.wait_completed(at_exit + 200, LIMIT).await;
    let (during, failures) = load.finish(LIMIT).await;
    eprintln!("load: {at_slow_done} calls during the drain, {at_exit} at exit; answers {during:?}");
    assert!(
        failures.is_empty(),
        "calls failed during the drain: {failures:?}"
    );
    let elsewhere: usize = during
        .iter()
        .filter(|(pod, _)| *pod != "echo-a1")
        .map(|(_, n)| n)
        .sum();
    assert!(elsewhere >= 200, "calls did not move: {during:?}");

    let (after, failures) = answers_by_pod(&client, 50, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(after.get("echo-a1"), None, "{after:?}");
}

/// Three pods, echo-a1 on the client's node; a retry policy so calls succeed on another pod
/// while echo-a1 fails; echo-a1 ejected after 3 failures in a row for 1 s, then 2 s, ...
fn ejection_spec(outlier: serde_json::Value) -> ClusterSpec {
    let mut spec = ClusterSpec::three_nodes(1);
    spec.service_config = Some(json!({"methodConfig": [{
        "name": [{"service": "echo.Echo"}],
        "timeout": "10s",
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.01s",
            "backoffMultiplier": 1,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    }]}));
    spec.client_extra = json!({ "outlierDetection": outlier });
    spec
}

/// Makes calls that echo-a1 fails until it is ejected; returns when the call that ejected it
/// began (the ejection started no earlier).
async fn fail_echo_a1_until_ejected(cluster: &Cluster) -> Instant {
    for _ in 0..20 {
        let began = Instant::now();
        let reply = call(cluster, failing(&["echo-a1"]))
            .await
            .expect("another pod answers");
        assert_ne!(reply.server, "echo-a1");
        if ejected_pods(cluster).await == ["echo-a1"] {
            return began;
        }
    }
    panic!("echo-a1 not ejected after 20 calls it failed");
}

/// Polls `/endpoints` until echo-a1 is no longer ejected; returns how long after `since`.
async fn wait_unejected(cluster: &Cluster, since: Instant) -> Duration {
    within(LIMIT, "echo-a1 back from ejection", async {
        while !ejected_pods(cluster).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_pod_comes_back_by_itself_and_is_ejected_longer_the_next_time() {
    let cluster = Cluster::start(ejection_spec(json!({
        "consecutiveFailures": 3,
        "baseEjectionTime": "1s",
        "maxEjectionTime": "10s",
        "maxEjectionPercent": 50,
    })))
    .await;

    let began = fail_echo_a1_until_ejected(&cluster).await;
    let first = wait_unejected(&cluster, began).await;
    eprintln!("first ejection: back after {first:?}");
    assert!(
        first >= Duration::from_millis(999),
        "back after {first:?}, before baseEjectionTime"
    );
    assert!(first < Duration::from_secs(8), "still out after {first:?}");

    // Back in the ranking, echo-a1 gets the first attempts again; it keeps failing, so it is
    // ejected again, for twice as long.
    let began = fail_echo_a1_until_ejected(&cluster).await;
    let second = wait_unejected(&cluster, began).await;
    eprintln!("second ejection: back after {second:?}");
    assert!(
        second >= Duration::from_millis(1999),
        "the second ejection lasted {second:?}, not 2 x baseEjectionTime"
    );
    assert!(
        second < Duration::from_secs(10),
        "still out after {second:?}"
    );

    // Healthy again, it takes its node's calls again.
    let client = echo_client(cluster.app_addr).await;
    let (answers, failures) = answers_by_pod(&client, 20, 1).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(answers.get("echo-a1"), Some(&20), "{answers:?}");
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "locality_sidecar_ejections_total", &[]),
        2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_caps_the_pods_ejected_at_once() {
    // Six pods that all fail: at most 50% of them, three, may be out at once.
    let mut spec = ClusterSpec::three_nodes(2);
    spec.client_extra = json!({"outlierDetection": {
        "consecutiveFailures": 2,
        "baseEjectionTime": "60s",
        "maxEjectionTime": "60s",
        "maxEjectionPercent": 50,
    }});
    let cluster = Cluster::start(spec).await;
    let mut calls = 0;
    while ejected_pods(&cluster).await.len() < 3 {
        calls += 1;
        assert!(calls <= 60, "3 pods not ejected after 60 failing calls");
        let status = call(&cluster, failing(&[])).await.expect_err("all fail");
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    // Many more failures on the pods still in: none of them goes.
    for _ in 0..30 {
        call(&cluster, failing(&[])).await.expect_err("all fail");
    }
    let ejected = ejected_pods(&cluster).await;
    eprintln!("ejected after {calls} + 30 failing calls: {ejected:?}");
    assert_eq!(ejected.len(), 3, "{ejected:?}");
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "locality_sidecar_ejections_total", &[]),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "locality_sidecar_ejected_endpoints", &[]),
        3.0,
        "{metrics}"
    );
}
