//! Bad input from the local app, as an app developer would meet it: HTTP/1.1 sent to an
//! outbound listener (which speaks h2c with prior knowledge only) must get an HTTP answer that
//! says what the port expects, not a closed connection; and request metadata over the limit
//! must come back as a gRPC status the client can read (RESOURCE_EXHAUSTED naming the limit),
//! not as a bare HTTP 431. Real sidecar processes, a raw TCP client and a tonic client.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use integration::harness::{http_get, metric_sum, within, Pipeline, SERVER_NAME};
use integration::pb::EchoRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(30);

/// Sends `request` on a fresh connection and reads until the sidecar closes it.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    within(LIMIT, "raw HTTP/1.1 exchange", async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the outbound listener");
        stream.write_all(request).await.expect("send the request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read the answer (a reset means the sidecar closed without one)");
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
}

async fn unary_ok(pipeline: &Pipeline, what: &str) {
    let mut client = pipeline.client().await;
    let reply = within(LIMIT, what, client.unary(EchoRequest::default()))
        .await
        .unwrap_or_else(|status| panic!("{what}: {status:?}"))
        .into_inner();
    assert_eq!(reply.server, SERVER_NAME, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_gets_a_505_saying_the_port_speaks_h2c_and_grpc_still_works() {
    let pipeline = Pipeline::start().await;
    let addr = pipeline.app_addr;

    let answer = raw_exchange(
        addr,
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: a-browser\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 505 "),
        "an HTTP/1.1 GET must get 505 HTTP Version Not Supported; got {answer:?}"
    );
    assert!(
        answer.contains("gRPC over HTTP/2 (h2c, prior knowledge)"),
        "the answer must name what the port expects; got {answer:?}"
    );
    assert!(answer.contains(&addr.to_string()), "{answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{answer:?}"
    );

    // A gRPC call made over HTTP/1.1 (gRPC-Web proxies and misconfigured clients do this).
    let body = b"\0\0\0\0\0";
    let grpc_over_http1 = format!(
        "POST /echo.Echo/Unary HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/grpc\r\nTE: trailers\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut request = grpc_over_http1.into_bytes();
    request.extend_from_slice(body);
    let answer = raw_exchange(addr, &request).await;
    assert!(answer.starts_with("HTTP/1.1 505 "), "{answer:?}");
    assert!(answer.contains("h2c"), "{answer:?}");

    // The listener still serves gRPC, and the misuse was logged once, not per connection.
    unary_ok(&pipeline, "unary call after the HTTP/1.1 requests").await;
    let log = pipeline.client.log_text();
    assert_eq!(
        log.matches("sent HTTP/1.x to an outbound listener").count(),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_over_the_limit_gets_resource_exhausted_naming_the_limit() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;

    // Under the limit: forwarded as usual.
    let mut request = tonic::Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("x-large", "a".repeat(8 * 1024).parse().expect("ASCII"));
    let reply = within(LIMIT, "call with 8 KiB of metadata", client.unary(request))
        .await
        .expect("8 KiB of metadata is under the limit")
        .into_inner();
    assert_eq!(reply.server, SERVER_NAME);

    // Over it (and under h2's own hard limit): a gRPC status, not an HTTP 431.
    let mut request = tonic::Request::new(EchoRequest {
        payload: Bytes::from_static(b"never sent"),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-large", "a".repeat(20 * 1024).parse().expect("ASCII"));
    let status = within(LIMIT, "call with 20 KiB of metadata", client.unary(request))
        .await
        .expect_err("20 KiB of metadata is over the limit");
    assert_eq!(
        status.code(),
        tonic::Code::ResourceExhausted,
        "the client must read a gRPC status: {status:?}"
    );
    assert!(
        status.message().contains("16384 bytes"),
        "the message must name the limit: {status:?}"
    );
    assert!(
        status.message().contains("metadata"),
        "the message must say what is too large: {status:?}"
    );

    // The same connection goes on serving, and the refusal is counted as a call.
    let reply = within(
        LIMIT,
        "call after the refusal",
        client.unary(EchoRequest::default()),
    )
    .await
    .expect("the connection survives a refused call")
    .into_inner();
    assert_eq!(reply.server, SERVER_NAME);
    let (code, metrics) = http_get(pipeline.client.admin_addr(), "/metrics")
        .await
        .expect("client /metrics");
    assert_eq!(code, 200);
    assert_eq!(
        metric_sum(
            &metrics,
            "locality_sidecar_calls_total",
            &["status=\"RESOURCE_EXHAUSTED\"", "tier=\"none\""]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        pipeline.echo.state().calls_started(),
        2,
        "the refused call must not reach the app"
    );
}
