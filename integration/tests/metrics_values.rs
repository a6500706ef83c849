//! Metric values, not just names, end to end through a client and a server sidecar: inbound
//! calls by status, QUIC connections made and lost, and calls by status, each counted exactly
//! as the app and the echo server saw them.

use std::time::Duration;

use bytes::Bytes;
use integration::harness::{http_get, metric_sum, within, Pipeline, Sidecar, SERVER_NAME};
use integration::pb::EchoRequest;

const LIMIT: Duration = Duration::from_secs(30);

async fn metrics(sidecar: &Sidecar) -> String {
    let (status, body) = http_get(sidecar.admin_addr(), "/metrics")
        .await
        .unwrap_or_else(|e| panic!("{} /metrics: {e}", sidecar.label()));
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_connections_are_counted_exactly() {
    let mut pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    for i in 0..20u8 {
        let reply = within(
            LIMIT,
            "unary call",
            client.unary(EchoRequest {
                payload: Bytes::from(vec![i]),
                ..Default::default()
            }),
        )
        .await
        .expect("unary call")
        .into_inner();
        assert_eq!(reply.server, SERVER_NAME);
    }
    let client_metrics = metrics(&pipeline.client).await;
    let server_metrics = metrics(&pipeline.server).await;
    assert_eq!(
        metric_sum(
            &server_metrics,
            "locality_sidecar_inbound_calls_total",
            &["status=\"FORWARDED\""]
        ),
        20.0,
        "{server_metrics}"
    );
    assert_eq!(
        metric_sum(
            &client_metrics,
            "locality_sidecar_calls_total",
            &["status=\"OK\""]
        ),
        20.0,
        "{client_metrics}"
    );
    assert!(
        metric_sum(
            &client_metrics,
            "locality_sidecar_quic_connections_opened_total",
            &["direction=\"outbound\""]
        ) >= 1.0,
        "{client_metrics}"
    );
    assert!(
        metric_sum(
            &server_metrics,
            "locality_sidecar_quic_connections_opened_total",
            &["direction=\"inbound\""]
        ) >= 1.0,
        "{server_metrics}"
    );
    for (label, text) in [("client", &client_metrics), ("server", &server_metrics)] {
        assert_eq!(
            metric_sum(text, "locality_sidecar_quic_connections_lost_total", &[]),
            0.0,
            "{label}: {text}"
        );
    }

    // The app goes away: the server sidecar refuses the calls it cannot hand over (so the
    // client sidecar may retry them elsewhere) and counts them as REJECTED.
    let placeholder = integration::echo_server::spawn_echo_server(
        std::net::SocketAddr::from((integration::harness::next_loopback_ip(), 0)),
        "placeholder",
    )
    .await
    .expect("start a placeholder echo server");
    let app = std::mem::replace(&mut pipeline.echo, placeholder);
    within(LIMIT, "the app's shutdown", app.kill()).await;
    let status = within(LIMIT, "unary call", client.unary(EchoRequest::default()))
        .await
        .expect_err("the app is down");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let server_metrics = metrics(&pipeline.server).await;
    assert!(
        metric_sum(
            &server_metrics,
            "locality_sidecar_inbound_calls_total",
            &["status=\"REJECTED\""]
        ) >= 1.0,
        "{server_metrics}"
    );
    assert_eq!(
        metric_sum(
            &server_metrics,
            "locality_sidecar_inbound_calls_total",
            &["status=\"FORWARDED\""]
        ),
        20.0,
        "{server_metrics}"
    );
}
