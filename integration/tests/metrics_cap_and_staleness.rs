//! Metric values a user relies on, end to end: the `method` label keeps at most 500 distinct
//! paths (then `other`, so an app calling random paths cannot blow up the metric's
//! cardinality), and `discovery_last_event_timestamp_seconds` says when the sidecar last heard of
//! an endpoint change, standing still while the API is unreachable.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use http::uri::PathAndQuery;
use integration::cluster::{answers_by_pod, Cluster, ClusterSpec};
use integration::harness::{echo_client, http_get, metric_sum, within, Pipeline, Sidecar};
use integration::pb::{EchoReply, EchoRequest};
use tonic::transport::{Channel, Endpoint};

/// Upper bound for any phase: only there so a hang fails the test with a reason.
const LIMIT: Duration = Duration::from_secs(60);

/// The README's cap on distinct `method` label values.
const MAX_METHODS: usize = 500;

async fn metrics(sidecar: &Sidecar) -> String {
    let (status, body) = http_get(sidecar.admin_addr(), "/metrics")
        .await
        .unwrap_or_else(|e| panic!("{} /metrics: {e}", sidecar.label()));
    assert_eq!(status, 200, "{body}");
    body
}

/// One unary call to any path, as an app with a generated client for another service would
/// make it.
async fn call_path(channel: Channel, path: String) -> Result<EchoReply, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = PathAndQuery::try_from(path).expect("a valid path");
    let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(20));
    grpc.unary(request, path, codec)
        .await
        .map(tonic::Response::into_inner)
}

/// The distinct `method` label values of `calls_total`.
fn method_labels(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|line| line.starts_with("locality_sidecar_calls_total{"))
        .filter_map(|line| {
            let rest = &line[line.find("method=\"")? + "method=\"".len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_method_label_keeps_500_paths_and_counts_the_rest_as_other() {
    let pipeline = Pipeline::start().await;
    let channel = Endpoint::from_shared(format!("http://{}", pipeline.app_addr))
        .expect("a valid URI")
        .connect()
        .await
        .expect("connect to the client sidecar");
    // 500 distinct unknown methods: the echo app answers UNIMPLEMENTED to each.
    let results: Vec<_> = within(
        LIMIT,
        "500 calls",
        futures::stream::iter(0..MAX_METHODS)
            .map(|i| call_path(channel.clone(), format!("/echo.Echo/Missing{i:03}")))
            .buffer_unordered(8)
            .collect(),
    )
    .await;
    for result in results {
        let status = result.expect_err("no such method");
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    }
    // Past the cap: 5 more new paths, one path too long to be a label, and a real method
    // seen for the first time now.
    for i in 0..5 {
        call_path(channel.clone(), format!("/echo.Echo/Extra{i}"))
            .await
            .expect_err("no such method");
    }
    call_path(channel.clone(), format!("/echo.Echo/{}", "x".repeat(300)))
        .await
        .expect_err("no such method");
    let reply = call_path(channel.clone(), "/echo.Echo/Unary".to_string())
        .await
        .expect("a real method answers");
    assert_eq!(reply.server, integration::harness::SERVER_NAME);
    // A path that has its label keeps it.
    call_path(channel.clone(), "/echo.Echo/Missing000".to_string())
        .await
        .expect_err("no such method");

    let text = metrics(&pipeline.client).await;
    let labels = method_labels(&text);
    let named: Vec<&String> = labels.iter().filter(|l| *l != "other").collect();
    assert_eq!(named.len(), MAX_METHODS, "distinct method labels");
    assert!(
        named.iter().all(|l| l.starts_with("/echo.Echo/Missing")),
        "only the first 500 paths have labels"
    );
    let calls = |filters: &[&str]| metric_sum(&text, "locality_sidecar_calls_total", filters);
    assert_eq!(
        calls(&["method=\"other\""]),
        7.0,
        "5 new, 1 long, 1 real method"
    );
    assert_eq!(
        calls(&["method=\"other\"", "status=\"OK\""]),
        1.0,
        "the real method's call, under other"
    );
    assert_eq!(calls(&["method=\"/echo.Echo/Missing000\""]), 2.0);
    assert_eq!(calls(&[]), (MAX_METHODS + 8) as f64, "every call counted");
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

async fn last_event(cluster: &Cluster) -> f64 {
    let text = cluster.metrics().await;
    let value = metric_sum(
        &text,
        "locality_sidecar_discovery_last_event_timestamp_seconds",
        &["upstream=\"echo\""],
    );
    assert!(
        value > 0.0,
        "no discovery timestamp for upstream echo:\n{text}"
    );
    value
}

/// Waits until the client sidecar ranks pods satisfying `accept`.
async fn wait_ranked(cluster: &Cluster, what: &str, accept: impl Fn(&[(String, String)]) -> bool) {
    within(LIMIT, what, async {
        while !accept(&cluster.ranked_pods().await) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_discovery_timestamp_follows_endpoint_changes_and_stands_still_without_the_api() {
    // The metric is in seconds since the epoch, as Prometheus' time() is; allow for rounding.
    const SLACK: f64 = 0.01;
    let started = unix_now();
    let mut cluster = Cluster::start(ClusterSpec::three_nodes(1)).await;
    let first = last_event(&cluster).await;
    assert!(
        first >= started - SLACK && first <= unix_now() + SLACK,
        "the first sync at {first}, not between {started} and now"
    );

    let changed = unix_now();
    cluster.set_ready("echo-c1", false);
    cluster.wait_for_endpoints(2, LIMIT).await;
    let second = last_event(&cluster).await;
    assert!(
        second >= changed - SLACK && second <= unix_now() + SLACK,
        "the readiness change at {changed}, the metric says {second}"
    );
    let text = cluster.metrics().await;
    assert!(
        metric_sum(
            &text,
            "locality_sidecar_discovery_events_total",
            &["upstream=\"echo\"", "kind=\"applied\""]
        ) >= 2.0,
        "{text}"
    );

    // The API goes away, and a pod joins that the sidecar cannot hear of: calls go on, the
    // timestamp stands still, so `time() - timestamp` grows as an alert would want.
    cluster.kube.break_api();
    cluster.add_pod("echo-b2", "node-b").await;
    let client = echo_client(cluster.app_addr).await;
    let (answers, failures) = answers_by_pod(&client, 20, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(answers.get("echo-b2"), None, "{answers:?}");
    assert_eq!(
        last_event(&cluster).await,
        second,
        "no event without the API"
    );

    let restored = unix_now();
    cluster.kube.restore_api();
    wait_ranked(&cluster, "echo-b2 after the API is back", |ranked| {
        ranked.iter().any(|(pod, _)| pod == "echo-b2")
    })
    .await;
    let third = last_event(&cluster).await;
    assert!(
        third >= restored - SLACK && third <= unix_now() + SLACK,
        "the API came back at {restored}, the metric says {third}"
    );
}
