//! gRFC A6 details end to end, through real sidecars: the policy's backoff waited, server
//! pushback (a delay that is waited, negative and malformed values that stop retries), the `grpc-previous-rpc-attempts` header
//! the app sees and which pod each retry lands on, a retry the deadline cuts off, and a
//! client-streaming call replayed whole on another pod. The echo app fails on chosen pods only
//! (`fail_on`) and sends pushback on request (`retry_pushback_ms`).

use std::time::{Duration, Instant};

use integration::cluster::{Cluster, ClusterSpec};
use integration::harness::{echo_client, within};
use integration::pb::{EchoReply, EchoRequest};
use serde_json::json;

/// Upper bound for any single call: only there so a hang fails the test with a reason.
const LIMIT: Duration = Duration::from_secs(60);

/// A retry policy on `echo.Echo` with tiny backoffs, retrying UNAVAILABLE only; no ejection,
/// so every pod stays a candidate whatever a test makes fail.
fn spec(max_attempts: u32, method_extra: serde_json::Value) -> ClusterSpec {
    let mut method = json!({
        "name": [{"service": "echo.Echo"}],
        "timeout": "20s",
        "retryPolicy": {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.01s",
            "backoffMultiplier": 1,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    });
    for (key, value) in method_extra.as_object().into_iter().flatten() {
        if key == "retryPolicy" {
            for (k, v) in value.as_object().into_iter().flatten() {
                method["retryPolicy"][k] = v.clone();
            }
        } else {
            method[key] = value.clone();
        }
    }
    let mut spec = ClusterSpec::three_nodes(1);
    spec.service_config = Some(json!({"methodConfig": [method]}));
    spec.client_extra = json!({"outlierDetection": {"consecutiveFailures": 100000, "baseEjectionTime": "1s", "maxEjectionTime": "1s", "maxEjectionPercent": 0}});
    spec
}

fn failing(pods: &[&str], pushback: &str) -> EchoRequest {
    EchoRequest {
        status_code: tonic::Code::Unavailable as i32,
        status_message: "pod says no".to_string(),
        trailers_only: true,
        retry_pushback_ms: pushback.to_string(),
        fail_on: pods.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

async fn call(cluster: &Cluster, request: EchoRequest) -> Result<EchoReply, tonic::Status> {
    let mut client = echo_client(cluster.app_addr).await;
    within(LIMIT, "unary call", client.unary(request))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_pushback_delays_the_retry_by_what_the_server_asked() {
    let cluster = Cluster::start(spec(2, json!({}))).await;
    let before = cluster.app_calls();
    let started = Instant::now();
    let status = call(&cluster, failing(&[], "1500"))
        .await
        .expect_err("every pod fails");
    let took = started.elapsed();
    eprintln!("two attempts 1500 ms of pushback apart took {took:?}");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "pod says no");
    assert_eq!(cluster.app_calls() - before, 2, "one retry");
    // The policy's own backoff is 10 ms: only the pushback explains a wait this long.
    assert!(
        took >= Duration::from_millis(1500),
        "the retry came {took:?} after the call started, before the 1500 ms pushback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_backoff_is_waited_between_attempts() {
    // One retry after a 1 s backoff, jittered to 0.8-1.2 s by A6's formula.
    let cluster = Cluster::start(spec(
        2,
        json!({"retryPolicy": {"initialBackoff": "1s", "maxBackoff": "1s"}}),
    ))
    .await;
    let before = cluster.app_calls();
    let started = Instant::now();
    let status = call(&cluster, failing(&[], ""))
        .await
        .expect_err("every pod fails");
    let took = started.elapsed();
    eprintln!("two attempts 1 s of backoff apart took {took:?}");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(cluster.app_calls() - before, 2, "one retry");
    assert!(
        took >= Duration::from_millis(800),
        "the retry came {took:?} after the call started, before the backoff's 0.8 s minimum"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_or_malformed_pushback_stops_retries() {
    let cluster = Cluster::start(spec(5, json!({}))).await;
    for pushback in ["-1", "soon"] {
        let before = cluster.app_calls();
        let status = call(&cluster, failing(&[], pushback))
            .await
            .expect_err("every pod fails");
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "pushback {pushback}"
        );
        assert_eq!(status.message(), "pod says no", "pushback {pushback}");
        assert_eq!(
            cluster.app_calls() - before,
            1,
            "pushback {pushback:?} means: do not retry"
        );
    }
    // The same failure without pushback is retried up to maxAttempts.
    let before = cluster.app_calls();
    call(&cluster, failing(&[], ""))
        .await
        .expect_err("every pod fails");
    assert_eq!(cluster.app_calls() - before, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_goes_to_the_next_tier_and_tells_the_app_its_attempt_number() {
    // The client is on node-a (zone-1); node-b is in zone-1 too, node-c in zone-2.
    let cluster = Cluster::start(spec(3, json!({}))).await;
    let reply = call(&cluster, EchoRequest::default())
        .await
        .expect("a first attempt that succeeds");
    assert_eq!(reply.server, "echo-a1", "same node first");
    assert_eq!(
        reply.received_previous_rpc_attempts, "",
        "a first attempt carries no grpc-previous-rpc-attempts"
    );

    let reply = call(&cluster, failing(&["echo-a1"], ""))
        .await
        .expect("the retry succeeds on another pod");
    assert_eq!(reply.server, "echo-b1", "same zone after the same node");
    assert_eq!(reply.received_previous_rpc_attempts, "1");

    let reply = call(&cluster, failing(&["echo-a1", "echo-b1"], ""))
        .await
        .expect("the second retry succeeds on the last pod");
    assert_eq!(reply.server, "echo-c1", "any zone last");
    assert_eq!(reply.received_previous_rpc_attempts, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_would_outlive_the_configured_timeout_is_not_made() {
    // Every pod fails; the next attempt would wait at least 4 s of backoff, but the method's
    // `timeout` (the call's deadline, as the app set none) ends 2 s after the call began.
    let cluster = Cluster::start(spec(
        5,
        json!({"timeout": "2s", "retryPolicy": {"initialBackoff": "5s", "maxBackoff": "5s"}}),
    ))
    .await;
    let before = cluster.app_calls();
    let started = Instant::now();
    let status = call(&cluster, failing(&[], ""))
        .await
        .expect_err("every pod fails");
    eprintln!("answered after {:?}", started.elapsed());
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "the last attempt's own status, at once: {status:?}"
    );
    assert_eq!(status.message(), "pod says no");
    assert_eq!(
        cluster.app_calls() - before,
        1,
        "no retry past the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_client_stream_is_replayed_whole_on_another_pod() {
    let cluster = Cluster::start(spec(3, json!({}))).await;
    let mut client = echo_client(cluster.app_addr).await;
    let mut requests: Vec<EchoRequest> = (0..50u8)
        .map(|i| EchoRequest {
            payload: vec![i; 1000].into(),
            ..Default::default()
        })
        .collect();
    // The last message decides how the call ends: echo-a1 fails it, others answer.
    let last = requests.last_mut().unwrap();
    last.status_code = tonic::Code::Unavailable as i32;
    last.trailers_only = true;
    last.fail_on = vec!["echo-a1".to_string()];
    let expected: Vec<u8> = requests
        .iter()
        .flat_map(|r| r.payload.iter().copied())
        .collect();
    let before = cluster.app_calls();
    let reply = within(
        LIMIT,
        "client stream",
        client.client_stream(tokio_stream::iter(requests)),
    )
    .await
    .expect("the retry on another pod succeeds")
    .into_inner();
    assert_eq!(reply.server, "echo-b1");
    assert_eq!(reply.received_previous_rpc_attempts, "1");
    assert_eq!(reply.sequence, 50, "every message replayed");
    assert!(reply.payload[..] == expected[..], "replayed bytes differ");
    assert_eq!(cluster.app_calls() - before, 2);
}
