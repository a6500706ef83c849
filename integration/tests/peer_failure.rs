//! A peer sidecar that dies outright (SIGKILL: no QUIC close, no drain, its app still running
//! behind it), end to end: calls move to the other pods with at most a handful of failures,
//! and later calls never go back to the dead pod.

use std::time::Duration;

use integration::cluster::{answers_by_pod, Cluster, ClusterSpec, Load};
use integration::harness::echo_client;
use serde_json::json;

/// Upper bound for one load phase: only there so a hang fails the test with a reason.
const LIMIT: Duration = Duration::from_secs(60);

/// Calls in flight at once; a failure per call in flight at the kill is the most allowed.
const CONCURRENCY: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_sidecar_moves_calls_to_other_pods() {
    let mut spec = ClusterSpec::three_nodes(1);
    spec.service_config = Some(json!({
        "methodConfig": [{
            "name": [{"service": "echo.Echo"}],
            "timeout": "10s",
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.05s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        }]
    }));
    let mut cluster = Cluster::start(spec).await;
    let client = echo_client(cluster.app_addr).await;
    let (before, failures) = answers_by_pod(&client, 50, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        before.get("echo-a1"),
        Some(&50),
        "same node first: {before:?}"
    );

    let load = Load::start(&client, CONCURRENCY);
    load.wait_completed(100, LIMIT).await;
    cluster.kill_sidecar("echo-a1");
    let at_kill = load.completed();
    load.wait_completed(at_kill + 500, LIMIT).await;
    let (during, failures) = load.finish(LIMIT).await;
    eprintln!(
        "echo-a1's sidecar killed after {at_kill} load calls; answers {during:?}; {} failed: {failures:?}",
        failures.len()
    );
    assert!(
        failures.len() <= CONCURRENCY,
        "{} calls failed, more than the {CONCURRENCY} in flight at the kill: {failures:?}",
        failures.len()
    );
    for status in &failures {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let elsewhere: usize = during
        .iter()
        .filter(|(pod, _)| *pod != "echo-a1")
        .map(|(_, n)| n)
        .sum();
    assert!(elsewhere >= 400, "calls did not move: {during:?}");

    // Afterwards: nothing fails and nothing goes to the dead pod.
    let (after, failures) = answers_by_pod(&client, 100, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(after.get("echo-a1"), None, "{after:?}");
}
