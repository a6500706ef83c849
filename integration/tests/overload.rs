//! Overload: a burst far above the sidecar's caps on calls in flight. Backpressure first (the
//! outbound listener's SETTINGS_MAX_CONCURRENT_STREAMS makes a well-behaved client queue in its
//! own process: nothing fails), then shedding (calls beyond the process cap are answered at once
//! with UNAVAILABLE naming the limit, counted), and service resumes the moment the burst ends.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use integration::echo_server::spawn_echo_server;
use integration::harness::{
    client_sidecar_config, echo_client, free_tcp_addr, free_udp_addr, generate_certs, http_get,
    metric_sum, next_loopback_ip, server_sidecar_config, within, Sidecar, StaticEndpoint,
};
use integration::pb::EchoRequest;
use serde_json::json;

struct Pair {
    client: Sidecar,
    _server: Sidecar,
    _echo: integration::echo_server::EchoServerHandle,
    app_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn pair(limits: serde_json::Value) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = generate_certs(&dir.path().join("certs"), &[]);
    let echo = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), "echo-1")
        .await
        .expect("echo");
    let (quic, server_admin) = (free_udp_addr(), free_tcp_addr());
    let server = Sidecar::start(
        "server",
        dir.path(),
        &server_sidecar_config(quic, echo.addr(), &certs.tls(), server_admin),
        server_admin,
    )
    .await;
    let (app_addr, admin) = (free_tcp_addr(), free_tcp_addr());
    let config = client_sidecar_config(
        app_addr,
        "echo",
        &[StaticEndpoint::new(quic, "node-a", "z1").with_pod("echo-1")],
        &certs.tls(),
        admin,
    );
    let mut config: serde_json::Value = serde_yaml_ng::from_str(&config).expect("yaml");
    config["limits"] = limits;
    let client = Sidecar::start(
        "client",
        dir.path(),
        &serde_yaml_ng::to_string(&config).expect("yaml"),
        admin,
    )
    .await;
    Pair {
        client,
        _server: server,
        _echo: echo,
        app_addr,
        _dir: dir,
    }
}

/// `calls` unary calls at once on one connection, each served in `delay_ms`; the statuses.
async fn burst(
    app_addr: SocketAddr,
    calls: usize,
    delay_ms: u32,
) -> Vec<Result<(), tonic::Status>> {
    let client = echo_client(app_addr).await;
    // One call first, so the connection has the sidecar's SETTINGS before the burst: streams
    // opened before them are refused (REFUSED_STREAM), which grpc-go retries by itself but
    // tonic does not. Long-lived app connections are past this point.
    let mut warm = client.clone();
    within(
        Duration::from_secs(10),
        "a warm-up call",
        warm.unary(EchoRequest::default()),
    )
    .await
    .expect("warm-up call");
    within(
        Duration::from_secs(60),
        "the burst",
        futures::stream::iter(0..calls)
            .map(|_| {
                let mut client = client.clone();
                async move {
                    let mut request = tonic::Request::new(EchoRequest {
                        payload: bytes::Bytes::from_static(b"burst"),
                        delay_ms,
                        ..Default::default()
                    });
                    request.set_timeout(Duration::from_secs(30));
                    client.unary(request).await.map(|_| ())
                }
            })
            .buffer_unordered(calls)
            .collect::<Vec<_>>(),
    )
    .await
}

async fn metrics(sidecar: &Sidecar) -> String {
    http_get(sidecar.admin_addr(), "/metrics")
        .await
        .expect("metrics answer")
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_above_the_cap_is_shed_at_once_and_service_resumes() {
    let pair = pair(json!({"maxCallsInFlight": 20, "maxStreamsPerConnection": 1000})).await;
    let results = burst(pair.app_addr, 300, 300).await;
    let shed: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let answered = results.len() - shed.len();
    eprintln!(
        "300 calls at once, cap 20: {answered} answered, {} shed",
        shed.len()
    );
    assert!(
        (20..=60).contains(&answered),
        "about the cap's worth answered (the cap frees as calls end): {answered}"
    );
    for status in &shed {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("limits.maxCallsInFlight")
                && status.message().contains("20 calls"),
            "the status names the limit: {}",
            status.message()
        );
    }
    let text = metrics(&pair.client).await;
    assert_eq!(
        metric_sum(
            &text,
            "locality_sidecar_calls_shed_total",
            &["limit=\"process\""]
        ),
        shed.len() as f64
    );
    assert_eq!(
        metric_sum(
            &text,
            "locality_sidecar_calls_in_flight_limit",
            &["upstream=\"all\""]
        ),
        20.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "locality_sidecar_calls_in_flight",
            &["upstream=\"all\""]
        ),
        0.0,
        "every place given back"
    );
    // Right after the burst, ordinary calls go through.
    let after = burst(pair.app_addr, 20, 0).await;
    assert!(
        after.iter().all(Result::is_ok),
        "{:?}",
        after.iter().find(|r| r.is_err())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_behaved_client_queues_behind_max_concurrent_streams_and_nothing_fails() {
    let pair = pair(json!({"maxCallsInFlight": 1000, "maxStreamsPerConnection": 8})).await;
    let admin = pair.client.admin_addr();
    let sampling = tokio::spawn(async move {
        let mut highest = 0.0f64;
        for _ in 0..200 {
            if let Ok((_, text)) = http_get(admin, "/metrics").await {
                highest = highest.max(metric_sum(
                    &text,
                    "locality_sidecar_calls_in_flight",
                    &["upstream=\"all\""],
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        highest
    });
    let results = burst(pair.app_addr, 100, 100).await;
    let highest = sampling.await.expect("sampler");
    assert!(
        results.iter().all(Result::is_ok),
        "the client queued instead of being shed: {:?}",
        results.iter().find(|r| r.is_err())
    );
    assert!(highest >= 1.0, "the sampler saw the calls");
    assert!(
        highest <= 8.0,
        "never more calls in flight than the streams advertised: {highest}"
    );
    let text = metrics(&pair.client).await;
    assert_eq!(
        metric_sum(&text, "locality_sidecar_calls_shed_total", &[]),
        0.0
    );
}

#[test]
fn a_zero_cap_is_refused_by_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, "limits: {maxCallsInFlight: 0}\n").expect("write");
    let output = std::process::Command::new(integration::harness::sidecar_binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run check-config");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("limits.maxCallsInFlight"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_caller_over_its_share_of_an_app_is_turned_to_other_pods_without_failures() {
    // The same-node pod's sidecar lets one peer connection hold 2 calls at its app; the client
    // (strict locality, so only refusals move calls) sends 12 slow calls at once: 2 are served
    // there, the rest are refused as not processed and retried on the other node's pod.
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = generate_certs(&dir.path().join("certs"), &[]);
    let mut pods = Vec::new();
    for (name, inbound_limits) in [
        (
            "echo-near",
            json!({"maxCallsToApp": 4, "maxCallsPerPeer": 2}),
        ),
        ("echo-far", json!({})),
    ] {
        let echo = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), name)
            .await
            .expect("echo");
        let (quic, admin) = (free_udp_addr(), free_tcp_addr());
        let config = server_sidecar_config(quic, echo.addr(), &certs.tls(), admin);
        let mut config: serde_json::Value = serde_yaml_ng::from_str(&config).expect("yaml");
        config["inbound"]["limits"] = inbound_limits;
        let sidecar = Sidecar::start(
            name,
            dir.path(),
            &serde_yaml_ng::to_string(&config).expect("yaml"),
            admin,
        )
        .await;
        pods.push((name, quic, sidecar, echo));
    }
    let (app_addr, admin) = (free_tcp_addr(), free_tcp_addr());
    let config = client_sidecar_config(
        app_addr,
        "echo",
        &[
            StaticEndpoint::new(pods[0].1, "node-a", "z1").with_pod("echo-near"),
            StaticEndpoint::new(pods[1].1, "node-b", "z1").with_pod("echo-far"),
        ],
        &certs.tls(),
        admin,
    );
    let mut config: serde_json::Value = serde_yaml_ng::from_str(&config).expect("yaml");
    config["locality"] = json!({"strict": true});
    let _client = Sidecar::start_with(
        "client",
        dir.path(),
        &serde_yaml_ng::to_string(&config).expect("yaml"),
        admin,
        &[],
        &[("NODE_NAME".to_string(), "node-a".to_string())],
    )
    .await;

    let results = burst(app_addr, 12, 500).await;
    assert!(
        results.iter().all(Result::is_ok),
        "refused calls were not processed, so they moved: {:?}",
        results.iter().find(|r| r.is_err())
    );
    let near_started = pods[0].3.state().calls_started();
    let far_started = pods[1].3.state().calls_started();
    eprintln!("near app started {near_started} calls, far app {far_started}");
    // The warm-up call plus at most 2 at a time of the burst's first wave reached the near app.
    assert!(
        near_started <= 3,
        "the near app held at most its share: {near_started}"
    );
    assert!(
        far_started >= 10,
        "the rest went to the far pod: {far_started}"
    );
    let near_metrics = metrics(&pods[0].2).await;
    assert!(
        metric_sum(
            &near_metrics,
            "locality_sidecar_inbound_limited_total",
            &["limit=\"calls_per_peer\""]
        ) >= 1.0,
        "refusals counted"
    );
}
