//! Load-aware locality end to end: three echo pods of limited capacity (2 calls at a time,
//! 20 ms each) on three nodes, the client on the first. Light load stays on the node, a hot
//! load spills to the other nodes without failing a call, a constant load does not flap, the
//! calls come back when the load drops, and strict locality (live from the ConfigMap) keeps
//! every call on the node whatever the load.
//!
//! Assertions are on who answered and on failed calls; latency is printed for the record (the
//! benchmark `bench-locality` measures it against a locality-blind sidecar).

use std::time::Duration;

use integration::cluster::{Cluster, ClusterSpec};
use integration::harness::{echo_client, metric_sum, within};
use integration::load::{closed_loop, LoadReport};
use serde_json::json;

const SERVICE_MS: u32 = 20;
const CAPACITY: usize = 2;
const LOCAL: &str = "echo-a1";

async fn start(extra: serde_json::Value, watch_configmap: bool) -> Cluster {
    let mut spec = ClusterSpec::three_nodes(1);
    spec.client_extra = extra;
    spec.watch_configmap = watch_configmap;
    let cluster = Cluster::start(spec).await;
    for pod in &cluster.pods {
        pod.app
            .as_ref()
            .expect("every app runs")
            .state()
            .limit_capacity(Some(CAPACITY));
    }
    cluster
}

fn describe(phase: &str, report: &LoadReport) -> String {
    format!(
        "{phase}: {} answered, {} failed, by pod {:?}, p50 {:?}, p99 {:?}",
        report.answered(),
        report.failures.len(),
        report.by_pod,
        report.quantile(0.5),
        report.quantile(0.99)
    )
}

async fn run(cluster: &Cluster, phase: &str, concurrency: usize, calls: usize) -> LoadReport {
    let client = echo_client(cluster.app_addr).await;
    let report = within(
        Duration::from_secs(60),
        phase,
        closed_loop(&client, concurrency, calls, SERVICE_MS),
    )
    .await;
    eprintln!("{}", describe(phase, &report));
    assert!(
        report.failures.is_empty(),
        "no call may fail; {}: {:?}",
        describe(phase, &report),
        report.failures.first()
    );
    report
}

async fn spill_changes(cluster: &Cluster, direction: &str) -> f64 {
    let metrics = cluster.metrics().await;
    metric_sum(
        &metrics,
        "locality_sidecar_spill_changes_total",
        &[&format!("direction=\"{direction}\"")],
    )
}

async fn spill_state(cluster: &Cluster) -> String {
    let view = cluster.endpoints_view().await;
    view["upstreams"][0]["spill"]["state"]
        .as_str()
        .unwrap_or("missing")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_load_stays_local_hot_load_spills_and_comes_back() {
    let cluster = start(json!({"locality": {}}), false).await;

    let light = run(&cluster, "light (1 call at a time)", 1, 100).await;
    assert!(
        light.share_of(LOCAL) >= 0.95,
        "light load stays on the node: {}",
        describe("light", &light)
    );
    assert_eq!(spill_changes(&cluster, "out").await, 0.0);

    let hot = run(&cluster, "hot (8 at a time)", 8, 400).await;
    let elsewhere = 1.0 - hot.share_of(LOCAL);
    assert!(
        elsewhere >= 0.3,
        "8 calls at a time on a pod serving 2 spill to the other nodes: {}",
        describe("hot", &hot)
    );
    assert!(
        hot.share_of(LOCAL) >= 0.15,
        "the local pod keeps its share: {}",
        describe("hot", &hot)
    );
    assert!(spill_changes(&cluster, "out").await >= 1.0);
    assert_eq!(spill_state(&cluster).await, "spilling");

    // The same load again: the candidate set stays as it is, no tier joins or leaves.
    let (out_before, back_before) = (
        spill_changes(&cluster, "out").await,
        spill_changes(&cluster, "back").await,
    );
    run(&cluster, "hot again (constant load)", 8, 400).await;
    let (out_after, back_after) = (
        spill_changes(&cluster, "out").await,
        spill_changes(&cluster, "back").await,
    );
    assert_eq!(
        (out_after - out_before, back_after - back_before),
        (0.0, 0.0),
        "a constant load does not flap"
    );

    // Light load again: the other tiers leave (after the band's settle time) and calls return.
    let client = echo_client(cluster.app_addr).await;
    within(
        Duration::from_secs(20),
        "the spill ending under light load",
        async {
            loop {
                closed_loop(&client, 1, 10, SERVICE_MS).await;
                if spill_state(&cluster).await == "local" {
                    break;
                }
            }
        },
    )
    .await;
    assert!(spill_changes(&cluster, "back").await >= 1.0);
    let back = run(&cluster, "light again", 1, 100).await;
    assert!(
        back.share_of(LOCAL) >= 0.95,
        "calls come back to the node: {}",
        describe("light again", &back)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_locality_stays_local_under_hot_load_until_turned_off_live() {
    let cluster = start(json!({"locality": {"strict": true}}), true).await;

    let strict = run(&cluster, "hot, strict", 8, 200).await;
    assert_eq!(
        strict.share_of(LOCAL),
        1.0,
        "strict locality keeps every call on the node: {}",
        describe("strict", &strict)
    );
    assert_eq!(spill_state(&cluster).await, "strict");

    // Turning strict off through the ConfigMap lets the same load spill.
    cluster.update_config(|config| {
        config["locality"] = json!({"spillOver": {"low": 0.5, "high": 1.5}});
    });
    within(
        Duration::from_secs(10),
        "the new locality settings",
        async {
            while spill_state(&cluster).await == "strict" {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    let view = cluster.endpoints_view().await;
    assert_eq!(view["upstreams"][0]["spill"]["band"]["high"], json!(1.5));

    let relaxed = run(&cluster, "hot, spill-over on", 8, 200).await;
    assert!(
        relaxed.share_of(LOCAL) <= 0.7,
        "the same load now spills: {}",
        describe("relaxed", &relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_local_pod_sheds_its_calls_and_gets_them_back_when_it_recovers() {
    // Pods without a capacity limit here: only the local pod's speed changes.
    let mut spec = ClusterSpec::three_nodes(1);
    spec.client_extra = json!({"locality": {}});
    let cluster = Cluster::start(spec).await;
    let client = echo_client(cluster.app_addr).await;
    let local_app = cluster.pod(LOCAL).app.as_ref().expect("the local app runs");
    // 50 calls/s of 5 ms keep a quarter of a call waiting on the local pod: far under the band
    // even when a starved machine triples latency, so only the slowdown below makes it spill.
    let open =
        |seconds: u64| integration::load::open_loop(&client, 50, Duration::from_secs(seconds), 5);
    let report = |phase: &str, report: LoadReport| {
        eprintln!("{}", describe(phase, &report));
        assert!(report.failures.is_empty(), "{}", describe(phase, &report));
        report
    };

    let fast = report("fast, 50 calls/s", open(2).await);
    assert!(fast.share_of(LOCAL) >= 0.95, "{}", describe("fast", &fast));

    // 50 calls/s at 105 ms each is ~5 calls waiting on one pod: far above the band.
    local_app.state().slow_down(100);
    open(1).await;
    let slow = report("local pod slow", open(3).await);
    assert!(
        slow.share_of(LOCAL) <= 0.5,
        "most calls go where they are answered fast: {}",
        describe("slow", &slow)
    );

    local_app.state().slow_down(0);
    within(Duration::from_secs(60), "the calls coming back", async {
        loop {
            open(1).await;
            if spill_state(&cluster).await == "local" {
                break;
            }
        }
    })
    .await;
    let back = report("recovered", open(2).await);
    assert!(
        back.share_of(LOCAL) >= 0.95,
        "{}",
        describe("recovered", &back)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_not_load() {
    // A producer holding streams open to the local pod (answered, idle) and making light unary
    // calls beside them: the streams do not count as waiting calls, so nothing spills.
    let cluster = start(json!({"locality": {}}), false).await;
    let client = echo_client(cluster.app_addr).await;
    let mut streams = Vec::new();
    for index in 0..10 {
        let (requests, feed) = tokio::sync::mpsc::channel(4);
        requests
            .send(integration::pb::EchoRequest {
                payload: bytes::Bytes::from_static(b"hello"),
                ..Default::default()
            })
            .await
            .expect("the stream takes a first message");
        let mut replies = within(
            Duration::from_secs(10),
            &format!("stream {index} opening"),
            client
                .clone()
                .bidi(tokio_stream::wrappers::ReceiverStream::new(feed)),
        )
        .await
        .expect("the stream opens")
        .into_inner();
        let first = within(
            Duration::from_secs(10),
            &format!("stream {index}'s first reply"),
            replies.message(),
        )
        .await
        .expect("a reply")
        .expect("not the end");
        assert_eq!(first.server, LOCAL, "light load: streams open on the node");
        streams.push((requests, replies));
    }
    let light = run(&cluster, "light, beside 10 open streams", 1, 100).await;
    assert!(
        light.share_of(LOCAL) >= 0.95,
        "open streams are not load: {}",
        describe("light beside streams", &light)
    );
    let view = cluster.endpoints_view().await;
    let local = view["upstreams"][0]["endpoints"]
        .as_array()
        .and_then(|list| list.iter().find(|e| e["pod"] == json!(LOCAL)))
        .cloned()
        .expect("the local pod is listed");
    assert_eq!(local["inFlight"], json!(10), "the streams are in flight");
    assert_eq!(local["waiting"], json!(0), "but not waiting for an answer");
    drop(streams);
}
