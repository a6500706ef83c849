//! The local demo: a small cluster on this machine (fake Kubernetes API server, three nodes in two
//! zones, five echo pods each behind its own sidecar on its own 127.x address, and a client pod
//! with an outbound sidecar on node-a) that shows same-node-first routing and fall-through live.
//!
//! It sends calls in rounds and prints which node answered each round's share, then takes the
//! same-node pod out of service three times (un-ready through the API, its app killed outright,
//! its sidecar frozen with SIGSTOP as a hung node looks) and brings it back each time; then
//! saturates it and slows it down to show load-aware spill-over and the return; and finishes
//! with the client sidecar's own counters.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration::cluster::{answers_by_pod, Cluster, ClusterSpec};
use integration::harness::echo_client;
use integration::load::{closed_loop, open_loop, LoadReport};
use serde_json::json;

const ROUND_CALLS: usize = 200;
/// Calls outstanding at once in the rounds: a light load, which the sidecar keeps on the node
/// (phases 8 and 9 show what a heavy one does).
const CONCURRENCY: usize = 2;
const BAR_WIDTH: usize = 40;

fn node_of(cluster: &Cluster, pod: &str) -> String {
    cluster
        .pods
        .iter()
        .find(|p| p.name == pod)
        .map(|p| p.node.clone())
        .unwrap_or_else(|| "?".to_string())
}

/// One round of calls, printed as a bar per node.
async fn round(
    cluster: &Cluster,
    client: &integration::pb::echo_client::EchoClient<tonic::transport::Channel>,
    label: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (by_pod, failures) = answers_by_pod(client, ROUND_CALLS, CONCURRENCY).await;
    let elapsed = started.elapsed();
    print_shares(
        cluster,
        &format!(
            "{label}  ({ROUND_CALLS} calls in {:.0} ms, {} failed)",
            elapsed.as_secs_f64() * 1000.0,
            failures.len()
        ),
        &by_pod,
        &failures,
    );
    Ok(())
}

/// Who answered, as a bar per node.
fn print_shares(
    cluster: &Cluster,
    title: &str,
    by_pod: &BTreeMap<String, usize>,
    failures: &[tonic::Status],
) {
    let total: usize = by_pod.values().sum::<usize>().max(1);
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    for (pod, count) in by_pod {
        *by_node.entry(node_of(cluster, pod)).or_default() += count;
    }
    println!("  {title}");
    for node in ["node-a", "node-b", "node-c"] {
        let count = by_node.get(node).copied().unwrap_or(0);
        let width = count * BAR_WIDTH / total;
        let marker = if node == cluster.spec.client_node {
            " (client's node)"
        } else {
            ""
        };
        println!(
            "    {node} {:<BAR_WIDTH$} {count:>4}{marker}",
            "█".repeat(width)
        );
    }
    if let Some(status) = failures.first() {
        println!(
            "    first failure: {:?} {}",
            status.code(),
            status.message()
        );
    }
}

/// A load's shares per node, with its latency.
fn print_load(cluster: &Cluster, label: &str, report: &LoadReport) {
    let title = format!(
        "{label}  ({} calls, p50 {:.0} ms, p99 {:.0} ms, {} failed)",
        report.answered() + report.failures.len(),
        report.quantile(0.5).as_secs_f64() * 1000.0,
        report.quantile(0.99).as_secs_f64() * 1000.0,
        report.failures.len()
    );
    print_shares(cluster, &title, &report.by_pod, &report.failures);
}

/// The client sidecar's spill-over state for the upstream, as `/endpoints` explains it.
async fn spill(cluster: &Cluster) -> (String, String) {
    let view = cluster.endpoints_view().await;
    let spill = &view["upstreams"][0]["spill"];
    (
        spill["state"].as_str().unwrap_or("?").to_string(),
        spill["reason"].as_str().unwrap_or("?").to_string(),
    )
}

async fn ranking(cluster: &Cluster) -> String {
    let view = cluster.endpoints_view().await;
    view["upstreams"][0]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let ejected = if e["ejected"] == json!(true) {
                " (ejected)"
            } else {
                ""
            };
            format!(
                "{}[{}]{ejected}",
                e["pod"].as_str().unwrap_or("?"),
                e["tier"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn counter(metrics: &str, name: &str, filter: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && line.contains(filter))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |total, value| total + value)
}

/// Waits (at most 30 s) until the client sidecar has no ejected endpoint.
async fn wait_until_nothing_ejected(cluster: &Cluster) {
    let waited = Instant::now();
    loop {
        let view = cluster.endpoints_view().await;
        let ejected = view["upstreams"][0]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["ejected"] == json!(true));
        if !ejected || waited.elapsed() > Duration::from_secs(30) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `signal` (STOP, CONT) to a process, as `kill -SIGNAL PID` does.
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// UDP to and from one loopback address dropped by an nftables table of the demo's own (needs
/// root and `nft`), as a NetworkPolicy without UDP would; the table goes when this is dropped.
struct UdpBlock {
    table: String,
}

impl UdpBlock {
    fn to(ip: std::net::Ipv4Addr) -> anyhow::Result<UdpBlock> {
        let table = format!("locality_demo_{}", std::process::id());
        let rules = format!(
            "table ip {table} {{\n\
             chain out {{ type filter hook output priority 0; ip daddr {ip} meta l4proto udp drop; }}\n\
             chain in {{ type filter hook input priority 0; ip saddr {ip} meta l4proto udp drop; }}\n\
             }}\n"
        );
        let mut nft = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = nft.stdin.take() {
            use std::io::Write as _;
            stdin.write_all(rules.as_bytes())?;
        }
        let output = nft.wait_with_output()?;
        anyhow::ensure!(
            output.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(UdpBlock { table })
    }
}

impl Drop for UdpBlock {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "ip", &self.table])
            .status();
    }
}

/// Starts a one-minute call on the same-node pod, cancels it as an app would (dropping it), and
/// prints how long echo-a1's app took to see the cancellation.
async fn cancel_a_slow_call(
    cluster: &Cluster,
    client: &integration::pb::echo_client::EchoClient<tonic::transport::Channel>,
) -> anyhow::Result<()> {
    wait_until_nothing_ejected(cluster).await;
    let app = cluster
        .pod("echo-a1")
        .app
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("echo-a1's app is not running"))?
        .state()
        .clone();
    let (started, cancelled) = (app.calls_started(), app.calls_cancelled());
    let mut caller = client.clone();
    let call = tokio::spawn(async move {
        let request = integration::pb::EchoRequest {
            delay_ms: 60_000,
            ..Default::default()
        };
        let _ = caller.unary(request).await;
    });
    if !app
        .wait_for_calls_started(started + 1, Duration::from_secs(5))
        .await
    {
        call.abort();
        println!("  skipped: the call did not reach echo-a1");
        return Ok(());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancelled_at = Instant::now();
    call.abort();
    if app
        .wait_for_cancellations(cancelled + 1, Duration::from_secs(10))
        .await
    {
        let seen = app
            .last_cancellation()
            .map(|at| at.saturating_duration_since(cancelled_at));
        println!(
            "  echo-a1's app saw the call cancelled {:.1} ms after the app dropped it",
            seen.unwrap_or_default().as_secs_f64() * 1000.0
        );
    } else {
        println!("  echo-a1's app did not see the cancellation within 10 s");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("locality-sidecar demo: a cluster on this machine");
    println!("  nodes: node-a (zone-1), node-b (zone-1), node-c (zone-2)");
    println!(
        "  echo pods: echo-a1 on node-a, echo-b1 + echo-b2 on node-b, echo-c1 + echo-c2 on node-c,"
    );
    println!("             each with its own sidecar on its own 127.x address (QUIC, mutual TLS)");
    println!(
        "  client pod on node-a; its sidecar finds the pods through the (fake) Kubernetes API"
    );
    println!("  retry policy: UNAVAILABLE retried up to 4 attempts\n");

    let mut spec = ClusterSpec::three_nodes(0);
    spec.pods = [
        ("echo-a1", "node-a"),
        ("echo-b1", "node-b"),
        ("echo-b2", "node-b"),
        ("echo-c1", "node-c"),
        ("echo-c2", "node-c"),
    ]
    .iter()
    .map(|(pod, node)| (pod.to_string(), node.to_string()))
    .collect();
    spec.service_config = Some(json!({
        "methodConfig": [{
            "name": [{"service": "echo.Echo"}],
            "timeout": "5s",
            "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
        }]
    }));
    // Short ejections so the demo shows the pod coming back within seconds.
    spec.client_extra = json!({"outlierDetection": {"consecutiveFailures": 3, "baseEjectionTime": "2s", "maxEjectionTime": "10s", "maxEjectionPercent": 50}, "locality": {}});
    let mut cluster = Cluster::start(spec).await;
    let client = echo_client(cluster.app_addr).await;
    println!("the client sidecar ranks: {}\n", ranking(&cluster).await);

    println!("1. all pods ready: calls stay on the client's node");
    for i in 1..=3 {
        round(&cluster, &client, &format!("round {i}")).await?;
    }

    println!("\n2. echo-a1 marked un-ready in the API: calls move to node-b, the same zone");
    cluster.set_ready("echo-a1", false);
    let moved = Instant::now();
    while cluster
        .ranked_pods()
        .await
        .iter()
        .any(|(pod, _)| pod == "echo-a1")
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "  ranking updated {:.0} ms after the API event: {}",
        moved.elapsed().as_secs_f64() * 1000.0,
        ranking(&cluster).await
    );
    for i in 1..=2 {
        round(&cluster, &client, &format!("round {i}")).await?;
    }

    println!("\n3. echo-a1 ready again: calls come back");
    cluster.set_ready("echo-a1", true);
    while cluster
        .ranked_pods()
        .await
        .first()
        .map(|(pod, _)| pod.as_str())
        != Some("echo-a1")
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    round(&cluster, &client, "round 1").await?;

    println!("\n4. echo-a1's app crashes (the API still says ready): the sidecar retries on other nodes, no call fails");
    cluster.kill_app("echo-a1").await;
    for i in 1..=2 {
        round(&cluster, &client, &format!("round {i}")).await?;
    }
    println!("  ranking: {}", ranking(&cluster).await);

    println!("\n5. echo-a1's app restarts: after its ejection ends, calls return to node-a");
    cluster.restart_app("echo-a1").await;
    wait_until_nothing_ejected(&cluster).await;
    round(&cluster, &client, "round 1").await?;

    println!("\n6. node-a freezes (echo-a1's sidecar stopped with SIGSTOP: no answer, no reset, as a hung");
    println!("   node or a partition looks): its connection is declared dead within a second, calls move, none fails");
    let frozen = cluster.pod("echo-a1").sidecar.pid();
    signal(frozen, "STOP")?;
    for i in 1..=2 {
        round(&cluster, &client, &format!("round {i}")).await?;
    }
    println!("  ranking: {}", ranking(&cluster).await);

    println!("\n7. node-a thaws (SIGCONT): calls come back to it");
    signal(frozen, "CONT")?;
    let thawed = Instant::now();
    wait_until_nothing_ejected(&cluster).await;
    // Probe with single calls until node-a answers: the endpoint is avoided for a second after
    // its connection was declared dead, then reconnected.
    while thawed.elapsed() < Duration::from_secs(30) {
        let (by_pod, _) = answers_by_pod(&client, 1, 1).await;
        if by_pod.contains_key("echo-a1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "  node-a answered again {:.0} ms after SIGCONT",
        thawed.elapsed().as_secs_f64() * 1000.0
    );
    round(&cluster, &client, "round 1").await?;

    println!("\n8. echo-a1 saturates: it serves 2 calls at a time (20 ms each), the app sends 8 at a time.");
    println!("   The load per same-node pod passes the band (2 waiting calls): the other nodes join, no call fails");
    for pod in &cluster.pods {
        if let Some(app) = &pod.app {
            app.state().limit_capacity(Some(2));
        }
    }
    let hot = closed_loop(&client, 8, 400, 20).await;
    print_load(&cluster, "8 at a time", &hot);
    let (state, reason) = spill(&cluster).await;
    println!("  spill state: {state}: {reason}");
    println!("  (with locality.strict: true every call would queue on node-a: ~4x the latency)");
    for pod in &cluster.pods {
        if let Some(app) = &pod.app {
            app.state().limit_capacity(None);
        }
    }
    let light_again = Instant::now();
    while spill(&cluster).await.0 != "local" && light_again.elapsed() < Duration::from_secs(30) {
        closed_loop(&client, 1, 20, 5).await;
    }
    println!(
        "  the load drops to 1 call at a time: node-a takes every call again after {:.1} s",
        light_again.elapsed().as_secs_f64()
    );

    println!("\n9. echo-a1 gets slow (+100 ms per call) under 100 calls/s: its calls move to the fast pods,");
    println!("   a few probes keep checking it; it recovers: the calls come back to node-a");
    let local_app = cluster
        .pod("echo-a1")
        .app
        .as_ref()
        .map(|app| app.state().clone());
    let slow_down = |ms: u64| {
        if let Some(state) = &local_app {
            state.slow_down(ms);
        }
    };
    let steady = |seconds: u64| open_loop(&client, 100, Duration::from_secs(seconds), 5);
    print_load(&cluster, "echo-a1 fast", &steady(2).await);
    slow_down(100);
    steady(1).await;
    print_load(&cluster, "echo-a1 slow", &steady(3).await);
    slow_down(0);
    let recovered = Instant::now();
    while spill(&cluster).await.0 != "local" && recovered.elapsed() < Duration::from_secs(30) {
        steady(1).await;
    }
    println!(
        "  back to node-a {:.1} s after it recovered (the band waits for the load to stay low for 1 s)",
        recovered.elapsed().as_secs_f64()
    );
    print_load(&cluster, "echo-a1 recovered", &steady(2).await);

    println!("\n10. UDP to node-a blocked (an nftables rule, as a NetworkPolicy without UDP would): QUIC");
    println!("    to echo-a1 goes silent, its calls move over HTTP/2 on TCP (same port, same mutual TLS);");
    println!("    UDP passes again: calls return to QUIC");
    match UdpBlock::to(cluster.pod("echo-a1").ip) {
        Err(error) => println!("  skipped: blocking UDP needs root and nftables ({error:#})"),
        Ok(block) => {
            let blocked = Instant::now();
            while blocked.elapsed() < Duration::from_secs(30) {
                let metrics = cluster.metrics().await;
                if counter(
                    &metrics,
                    "locality_sidecar_peer_connections",
                    "protocol=\"h2\"",
                ) >= 1.0
                {
                    break;
                }
                answers_by_pod(&client, 4, 2).await;
            }
            println!(
                "  an HTTP/2 connection to echo-a1 {:.1} s after the block (the silent QUIC connection was",
                blocked.elapsed().as_secs_f64()
            );
            println!("  declared dead and echo-a1 ejected for a moment; then the race found TCP)");
            wait_until_nothing_ejected(&cluster).await;
            round(&cluster, &client, "round 1").await?;
            drop(block);
            let unblocked = Instant::now();
            while unblocked.elapsed() < Duration::from_secs(30) {
                let metrics = cluster.metrics().await;
                if counter(
                    &metrics,
                    "locality_sidecar_peer_connections",
                    "protocol=\"h2\"",
                ) == 0.0
                {
                    break;
                }
                answers_by_pod(&client, 4, 2).await;
            }
            println!(
                "  back on QUIC {:.1} s after UDP passed again",
                unblocked.elapsed().as_secs_f64()
            );
            round(&cluster, &client, "round 1").await?;
        }
    }

    println!(
        "\n11. the app cancels a call whose request it sent whole (a slow unary call): echo-a1's"
    );
    println!("    app sees the cancellation at once, not at the call's 5 s deadline");
    cancel_a_slow_call(&cluster, &client).await?;

    let metrics = cluster.metrics().await;
    println!("\nthe client sidecar's counters (GET /metrics on its admin port):");
    for (label, name, filter) in [
        (
            "calls answered on the same node",
            "locality_sidecar_calls_total",
            "tier=\"node\"",
        ),
        (
            "calls answered in the same zone",
            "locality_sidecar_calls_total",
            "tier=\"zone\"",
        ),
        (
            "calls answered in another zone",
            "locality_sidecar_calls_total",
            "tier=\"any\"",
        ),
        (
            "failed calls",
            "locality_sidecar_calls_total",
            "status=\"UNAVAILABLE\"",
        ),
        ("retries", "locality_sidecar_retries_total", ""),
        (
            "transparent retries",
            "locality_sidecar_transparent_retries_total",
            "",
        ),
        (
            "fall-throughs to another node",
            "locality_sidecar_fallthroughs_total",
            "",
        ),
        ("ejections", "locality_sidecar_ejections_total", ""),
        (
            "tiers joined by spill-over",
            "locality_sidecar_spill_changes_total",
            "direction=\"out\"",
        ),
        (
            "connections declared dead (frozen)",
            "locality_sidecar_quic_dead_connections_total",
            "",
        ),
        (
            "HTTP/2 fallbacks (UDP blocked)",
            "locality_sidecar_h2_fallbacks_total",
            "",
        ),
    ] {
        println!("  {label:<34} {:>6}", counter(&metrics, name, filter));
    }
    println!("\ndone: every process of the demo cluster stops now.");
    drop(cluster);
    Ok(())
}
