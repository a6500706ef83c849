//! Gray failures, as a user meets them: three pods behind a Service, the client's node holding
//! one, three callers making unary calls with a 1 s deadline under a plain retry policy. The
//! same-node pod's sidecar is frozen (SIGSTOP: a hung node or a partition, no RST, no ICMP), or
//! killed and started again at once on the same address (a container restart). The tests count
//! failed calls and see where calls land, with real processes and signals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration::cluster::{Cluster, ClusterSpec};
use integration::harness::{echo_client, metric_sum, within, Sidecar};
use integration::pb::echo_client::EchoClient;
use integration::pb::EchoRequest;
use serde_json::json;
use tonic::transport::Channel;

const SAME_NODE_POD: &str = "echo-a1";
const CALLERS: usize = 3;
const CALL_DEADLINE: Duration = Duration::from_secs(1);

fn retry_policy(per_attempt: Option<&str>) -> serde_json::Value {
    let mut policy = json!({
        "maxAttempts": 4,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    });
    if let Some(timeout) = per_attempt {
        policy["perAttemptRecvTimeout"] = json!(timeout);
    }
    json!({"methodConfig": [{"name": [{"service": "echo.Echo"}], "retryPolicy": policy}]})
}

/// One finished call: when it finished, who answered or how it failed, and when it was sent.
type Outcome = (Instant, Result<String, tonic::Status>, Instant);

/// Callers making one unary call after another until stopped.
struct Callers {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Callers {
    fn start(client: &EchoClient<Channel>) -> Callers {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..CALLERS {
            let mut client = client.clone();
            let outcomes = outcomes.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    let mut request = tonic::Request::new(EchoRequest {
                        payload: bytes::Bytes::from_static(b"gray"),
                        ..Default::default()
                    });
                    request.set_timeout(CALL_DEADLINE);
                    let result = client
                        .unary(request)
                        .await
                        .map(|reply| reply.into_inner().server);
                    outcomes
                        .lock()
                        .expect("outcomes lock")
                        .push((Instant::now(), result, sent));
                }
            });
        }
        Callers {
            outcomes,
            stop,
            tasks,
        }
    }

    /// Waits until `condition` holds over the calls so far; panics after `limit`.
    async fn wait_for(&self, what: &str, limit: Duration, condition: impl Fn(&[Outcome]) -> bool) {
        within(limit, what, async {
            loop {
                if condition(&self.outcomes.lock().expect("outcomes lock")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Waits until the same-node pod has answered 50 calls: locality is in force.
    async fn wait_for_same_node_answers(&self) {
        self.wait_for(
            "50 calls answered on the same node",
            Duration::from_secs(30),
            |all| all.iter().filter(|o| answered_by(o, SAME_NODE_POD)).count() >= 50,
        )
        .await
    }

    async fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        within(Duration::from_secs(10), "the callers' last calls", async {
            while let Some(done) = self.tasks.join_next().await {
                done.expect("a caller panicked");
            }
        })
        .await;
        let outcomes = self.outcomes.lock().expect("outcomes lock");
        outcomes.clone()
    }
}

fn answered_by(outcome: &Outcome, pod: &str) -> bool {
    matches!(&outcome.1, Ok(server) if server == pod)
}

/// The failures among calls that finished after `since`, with the total.
fn failures_since(outcomes: &[Outcome], since: Instant) -> (Vec<String>, usize) {
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.0 >= since).collect();
    let failures = after
        .iter()
        .filter_map(|o| o.1.as_ref().err())
        .map(|status| format!("{:?}: {}", status.code(), status.message()))
        .collect();
    (failures, after.len())
}

/// What a freeze may cost when attempts move on (a per-attempt timeout, hedging): nothing for
/// calls sent after it, and for calls in flight at the freeze only those whose answer had
/// already begun. Response headers commit a call (gRFC A6: it is never retried after them),
/// so a pod frozen between a response's first frame and its trailers fails that call at its
/// deadline, through any proxy; at most one per caller can be caught that way. Any other
/// failure fails the test.
fn assert_a_freeze_cost_no_movable_call(outcomes: &[Outcome], freeze: Instant) {
    let since: Vec<&Outcome> = outcomes.iter().filter(|o| o.0 >= freeze).collect();
    let describe = |o: &&Outcome| {
        o.1.as_ref()
            .err()
            .map(|status| format!("{:?}: {}", status.code(), status.message()))
    };
    let sent_after: Vec<String> = since
        .iter()
        .filter(|o| o.2 >= freeze)
        .filter_map(describe)
        .collect();
    assert!(
        sent_after.is_empty(),
        "calls sent after the freeze failed: {sent_after:?}"
    );
    let in_flight: Vec<String> = since
        .iter()
        .filter(|o| o.2 < freeze)
        .filter_map(describe)
        .collect();
    // The sidecar's deadline and the client's own timer end such a call at the same moment:
    // whichever fires first names it.
    let committed = |failure: &String| {
        (failure.starts_with("DeadlineExceeded") && failure.contains("while streaming"))
            || failure.starts_with("Cancelled: Timeout expired")
    };
    assert!(
        in_flight.iter().all(committed) && in_flight.len() <= CALLERS,
        "calls in flight at the freeze failed other than mid-answer: {in_flight:?}"
    );
    if !in_flight.is_empty() {
        println!("in flight at the freeze and cut off mid-answer: {in_flight:?}");
    }
}

async fn cluster(service_config: serde_json::Value) -> (Cluster, EchoClient<Channel>) {
    let mut spec = ClusterSpec::three_nodes(1);
    spec.service_config = Some(service_config);
    let cluster = Cluster::start(spec).await;
    let client = echo_client(cluster.app_addr).await;
    (cluster, client)
}

/// Freezes the same-node pod's sidecar under load; returns every call's outcome and when the
/// freeze began.
async fn freeze_same_node_pod(
    cluster: &Cluster,
    client: &EchoClient<Channel>,
) -> (Vec<Outcome>, Instant) {
    let callers = Callers::start(client);
    callers.wait_for_same_node_answers().await;
    let frozen = &cluster.pod(SAME_NODE_POD).sidecar;
    let freeze = Instant::now();
    frozen.signal("STOP");
    // Long enough to see the whole move and then steady calls elsewhere: 300 calls and 3 s.
    callers
        .wait_for(
            "300 calls after the freeze",
            Duration::from_secs(60),
            |all| {
                all.iter().filter(|o| o.0 >= freeze).count() >= 300
                    && freeze.elapsed() >= Duration::from_secs(3)
            },
        )
        .await;
    let outcomes = callers.finish().await;
    frozen.signal("CONT");
    (outcomes, freeze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_same_node_pod_costs_at_most_one_percent_of_calls() {
    let (cluster, client) = cluster(retry_policy(None)).await;
    let (outcomes, freeze) = freeze_same_node_pod(&cluster, &client).await;
    let (failures, total) = failures_since(&outcomes, freeze);
    let moved = outcomes
        .iter()
        .filter(|o| o.0 >= freeze && o.1.is_ok() && !answered_by(o, SAME_NODE_POD))
        .map(|o| o.0.duration_since(freeze))
        .min();
    println!(
        "frozen node: {} of {total} calls failed after the freeze; first answer elsewhere after {moved:?}",
        failures.len()
    );
    assert!(
        failures.len() * 100 <= total,
        "more than 1% of {total} calls failed: {failures:?}"
    );
    let moved = moved.expect("calls never moved to another node");
    assert!(
        moved < Duration::from_secs(5),
        "calls moved only after {moved:?}"
    );
    let metrics = cluster.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "locality_sidecar_quic_dead_connections_total",
            &[]
        ) >= 1.0,
        "the frozen peer's connection was not declared dead:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_per_attempt_timeout_a_frozen_pod_costs_no_call() {
    let (cluster, client) = cluster(retry_policy(Some("0.2s"))).await;
    let (outcomes, freeze) = freeze_same_node_pod(&cluster, &client).await;
    let (failures, total) = failures_since(&outcomes, freeze);
    println!(
        "frozen node, perAttemptRecvTimeout 0.2s: {} of {total} calls failed",
        failures.len()
    );
    assert_a_freeze_cost_no_movable_call(&outcomes, freeze);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hedging_a_frozen_pod_costs_no_call_and_hedges_win() {
    let hedging = json!({"methodConfig": [{"name": [{"service": "echo.Echo"}], "hedgingPolicy": {
        "maxAttempts": 3, "hedgingDelay": "0.1s", "nonFatalStatusCodes": ["UNAVAILABLE"]}}]});
    let (cluster, client) = cluster(hedging).await;
    let (outcomes, freeze) = freeze_same_node_pod(&cluster, &client).await;
    let (failures, total) = failures_since(&outcomes, freeze);
    println!(
        "frozen node, hedgingDelay 0.1s: {} of {total} calls failed",
        failures.len()
    );
    assert_a_freeze_cost_no_movable_call(&outcomes, freeze);
    let metrics = cluster.metrics().await;
    let won = metric_sum(&metrics, "locality_sidecar_hedges_won_total", &[]);
    assert!(won >= 1.0, "no call was answered by a hedge:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_same_node_sidecar_costs_at_most_one_percent_and_gets_calls_back() {
    let (mut cluster, client) = cluster(retry_policy(None)).await;
    let callers = Callers::start(&client);
    callers.wait_for_same_node_answers().await;
    let dir = cluster.dir.path().to_path_buf();
    let pod = cluster
        .pods
        .iter_mut()
        .find(|pod| pod.name == SAME_NODE_POD)
        .expect("the same-node pod");
    let config = std::fs::read_to_string(dir.join(format!("{SAME_NODE_POD}.yaml")))
        .expect("the pod sidecar's config");
    let env = vec![
        ("NODE_NAME".to_string(), pod.node.clone()),
        ("POD_NAME".to_string(), pod.name.clone()),
    ];
    let admin = pod.sidecar.admin_addr();
    let killed = Instant::now();
    pod.sidecar.kill();
    // Started again at once on the same addresses, as a container restart does.
    pod.sidecar = Sidecar::spawn_with(
        &format!("{SAME_NODE_POD}-restarted"),
        &dir,
        &config,
        admin,
        &[],
        &env,
    );
    let restarted = Instant::now();
    callers
        .wait_for(
            "the restarted pod to answer again",
            Duration::from_secs(30),
            |all| {
                all.iter()
                    .any(|o| o.0 >= restarted && answered_by(o, SAME_NODE_POD))
            },
        )
        .await;
    let back = restarted.elapsed();
    callers
        .wait_for(
            "300 calls after the restart",
            Duration::from_secs(60),
            |all| all.iter().filter(|o| o.0 >= killed).count() >= 300,
        )
        .await;
    let outcomes = callers.finish().await;
    let (failures, total) = failures_since(&outcomes, killed);
    println!(
        "restarted sidecar: {} of {total} calls failed; the pod answered again {back:?} after its restart",
        failures.len()
    );
    assert!(
        failures.len() * 100 <= total,
        "more than 1% of {total} calls failed: {failures:?}"
    );
    assert!(
        back < Duration::from_secs(10),
        "the restarted pod got calls back only after {back:?}"
    );
}
