//! The echo service on its own, without sidecars: proves that every knob the end-to-end tests
//! rely on does what they assume, so an end-to-end failure points at the sidecar, not the
//! test service.

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use integration::{
    echo_server::{pattern, spawn_echo_server, EchoServerHandle},
    harness::{decode_grpc_frames, grpc_frame, raw_grpc_call, within},
    pb::{echo_client::EchoClient, EchoReply, EchoRequest},
};
use tokio_stream::StreamExt as _;
use tonic::{metadata::MetadataValue, transport::Channel, Code};

const LIMIT: Duration = Duration::from_secs(10);

async fn start() -> (EchoServerHandle, EchoClient<Channel>) {
    let server = spawn_echo_server("127.0.0.1:0".parse().unwrap(), "direct")
        .await
        .expect("start echo server");
    // Every call's response headers within LIMIT (stream messages are bounded one by one).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr()))
        .expect("a valid URI")
        .connect_timeout(LIMIT)
        .timeout(LIMIT)
        .connect()
        .await
        .expect("connect to the echo server");
    let client = EchoClient::new(channel)
        .max_decoding_message_size(integration::echo_server::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(integration::echo_server::MAX_MESSAGE_SIZE);
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_unary_echoes_payload_and_names_the_server() {
    let (server, mut client) = start().await;
    let reply = client
        .unary(EchoRequest {
            payload: b"hello"[..].into(),
            ..Default::default()
        })
        .await
        .expect("unary call")
        .into_inner();
    assert_eq!(&reply.payload[..], b"hello");
    assert_eq!(reply.server, "direct");
    assert_eq!(reply.received_grpc_timeout, "");
    assert_eq!(server.state().calls_started(), 1);
    assert_eq!(server.state().calls_cancelled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_size_uses_the_deterministic_pattern() {
    let (_server, mut client) = start().await;
    let reply = client
        .unary(EchoRequest {
            reply_size: 1000,
            ..Default::default()
        })
        .await
        .expect("unary call")
        .into_inner();
    assert_eq!(reply.payload.len(), 1000);
    assert_eq!(reply.payload[250], 250);
    assert_eq!(reply.payload[251], 0);
    assert_eq!(reply.payload, pattern(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_status_carries_unicode_message_and_details() {
    let (_server, mut client) = start().await;
    let details = bytes::Bytes::from_static(&[0, 1, 2, 0xfe, 0xff]);
    for trailers_only in [true, false] {
        let status = client
            .unary(EchoRequest {
                status_code: Code::FailedPrecondition as i32,
                status_message: "échec — 失敗 ✓".into(),
                status_details: details.clone(),
                trailers_only,
                ..Default::default()
            })
            .await
            .expect_err("the call must fail");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "échec — 失敗 ✓");
        assert_eq!(status.details(), &details[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_trailers_only_is_one_headers_frame_and_otherwise_status_follows_headers() {
    let (server, _client) = start().await;
    let request = |trailers_only| {
        grpc_frame(&EchoRequest {
            status_code: Code::NotFound as i32,
            status_message: "gone".into(),
            trailers_only,
            ..Default::default()
        })
    };

    let raw = raw_grpc_call(
        server.addr(),
        "/echo.Echo/Unary",
        &HeaderMap::new(),
        request(true),
    )
    .await
    .expect("raw call");
    assert!(raw.ended_with_headers, "{raw:?}");
    assert_eq!(raw.headers.get("grpc-status").unwrap(), "5");
    assert!(raw.body.is_empty() && raw.trailers.is_none(), "{raw:?}");

    let raw = raw_grpc_call(
        server.addr(),
        "/echo.Echo/Unary",
        &HeaderMap::new(),
        request(false),
    )
    .await
    .expect("raw call");
    assert!(!raw.ended_with_headers, "{raw:?}");
    assert!(raw.headers.get("grpc-status").is_none(), "{raw:?}");
    let trailers = raw.trailers.expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "5");
    assert_eq!(trailers.get("grpc-message").unwrap(), "gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_metadata_is_echoed_in_headers_and_trailers() {
    let (server, mut client) = start().await;

    let mut metadata = HeaderMap::new();
    metadata.insert("x-echo-text", HeaderValue::from_static("hello"));
    metadata.append("x-echo-twice", HeaderValue::from_static("one"));
    metadata.append("x-echo-twice", HeaderValue::from_static("two"));
    metadata.insert("x-other", HeaderValue::from_static("not echoed"));
    let raw = raw_grpc_call(
        server.addr(),
        "/echo.Echo/Unary",
        &metadata,
        grpc_frame(&EchoRequest::default()),
    )
    .await
    .expect("raw call");
    let trailers = raw.trailers.clone().expect("trailers");
    for map in [&raw.headers, &trailers] {
        assert_eq!(map.get("x-echo-text").unwrap(), "hello");
        let twice: Vec<_> = map.get_all("x-echo-twice").iter().collect();
        assert_eq!(twice, ["one", "two"]);
        assert!(map.get("x-other").is_none());
    }
    let replies: Vec<EchoReply> = decode_grpc_frames(&raw.body);
    assert_eq!(replies.len(), 1);

    let mut request = tonic::Request::new(EchoRequest {
        reply_count: 2,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert_bin("x-echo-blob-bin", MetadataValue::from_bytes(&[0, 255, 10]));
    let response = client.server_stream(request).await.expect("server stream");
    assert_eq!(
        response
            .metadata()
            .get_bin("x-echo-blob-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        &[0, 255, 10][..]
    );
    let mut stream = response.into_inner();
    while within(LIMIT, "stream message", stream.message())
        .await
        .expect("message")
        .is_some()
    {}
    let trailers = within(LIMIT, "trailers", stream.trailers())
        .await
        .expect("trailers")
        .expect("some");
    assert_eq!(
        trailers
            .get_bin("x-echo-blob-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        &[0, 255, 10][..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reports_the_received_grpc_timeout() {
    let (_server, mut client) = start().await;
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(10));
    let reply = client.unary(request).await.expect("unary").into_inner();
    assert_eq!(reply.received_grpc_timeout, "10000000u");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_server_stream_is_produced_only_as_fast_as_it_is_read() {
    let (server, mut client) = start().await;
    let mut stream = client
        .server_stream(EchoRequest {
            reply_size: 64 * 1024,
            reply_count: 16384,
            ..Default::default()
        })
        .await
        .expect("server stream")
        .into_inner();
    for sequence in 0..10 {
        let reply = within(LIMIT, "stream message", stream.message())
            .await
            .expect("message")
            .expect("some");
        assert_eq!(reply.sequence, sequence);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let produced = server.state().stream_bytes();
    assert!(
        produced < 32 * 1024 * 1024,
        "the server produced {produced} bytes for a reader that took 640 KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_server_stream_ends_with_the_requested_status_after_replies() {
    let (_server, mut client) = start().await;
    let mut stream = client
        .server_stream(EchoRequest {
            reply_count: 3,
            status_code: Code::Aborted as i32,
            status_message: "stop".into(),
            ..Default::default()
        })
        .await
        .expect("server stream")
        .into_inner();
    for _ in 0..3 {
        within(LIMIT, "stream message", stream.message())
            .await
            .expect("message")
            .expect("some");
    }
    let status = within(LIMIT, "stream message", stream.message())
        .await
        .expect_err("status after replies");
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_dropped_calls_are_counted_as_cancelled() {
    let (server, mut client) = start().await;

    let mut stream = client
        .server_stream(EchoRequest {
            reply_size: 1024,
            reply_count: 1_000_000,
            ..Default::default()
        })
        .await
        .expect("server stream")
        .into_inner();
    within(LIMIT, "stream message", stream.message())
        .await
        .expect("message")
        .expect("some");
    drop(stream);
    assert!(
        server
            .state()
            .wait_for_cancellations(1, Duration::from_secs(5))
            .await,
        "dropped server stream not observed"
    );

    let slow = client.unary(EchoRequest {
        delay_ms: 10_000,
        ..Default::default()
    });
    assert!(tokio::time::timeout(Duration::from_millis(200), slow)
        .await
        .is_err());
    assert!(
        server
            .state()
            .wait_for_cancellations(2, Duration::from_secs(5))
            .await,
        "abandoned unary call not observed"
    );
    assert_eq!(server.state().calls_started(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_client_stream_and_bidi_round_trip() {
    let (_server, mut client) = start().await;
    let requests: Vec<EchoRequest> = (0..50u8)
        .map(|i| EchoRequest {
            payload: vec![i; usize::from(i)].into(),
            ..Default::default()
        })
        .collect();
    let expected: Vec<u8> = requests
        .iter()
        .flat_map(|r| r.payload.iter().copied())
        .collect();

    let reply = client
        .client_stream(tokio_stream::iter(requests.clone()))
        .await
        .expect("client stream")
        .into_inner();
    assert_eq!(reply.sequence, 50);
    assert_eq!(&reply.payload[..], &expected[..]);

    let mut replies = client
        .bidi(tokio_stream::iter(requests.clone()))
        .await
        .expect("bidi")
        .into_inner();
    let mut count = 0;
    while let Some(reply) = within(LIMIT, "next reply", replies.next()).await {
        let reply = reply.expect("reply");
        assert_eq!(reply.payload, requests[count].payload);
        assert_eq!(reply.sequence, count as u64);
        count += 1;
    }
    assert_eq!(count, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_abort_ends_the_client_stream_with_an_error() {
    let (server, mut client) = start().await;
    let mut stream = client
        .server_stream(EchoRequest {
            reply_count: 100_000,
            delay_ms: 5,
            ..Default::default()
        })
        .await
        .expect("server stream")
        .into_inner();
    within(LIMIT, "stream message", stream.message())
        .await
        .expect("message")
        .expect("some");
    let started = Instant::now();
    server.abort();
    let end = within(LIMIT, "stream end after abort", async {
        loop {
            match within(LIMIT, "stream message", stream.message()).await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(end.is_err(), "aborted stream ended cleanly: {end:?}");
    assert!(started.elapsed() < LIMIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_fail_on_pushback_and_attempt_header_knobs() {
    let (server, mut client) = start().await;
    // `fail_on` naming another server: this one answers normally.
    let reply = client
        .unary(EchoRequest {
            status_code: Code::Unavailable as i32,
            fail_on: vec!["some-other-pod".into()],
            ..Default::default()
        })
        .await
        .expect("not this server's failure")
        .into_inner();
    assert_eq!(reply.server, "direct");
    assert_eq!(reply.received_previous_rpc_attempts, "");
    // `fail_on` naming this server: it fails, with the pushback header in its status.
    let status = client
        .unary(EchoRequest {
            status_code: Code::Unavailable as i32,
            status_message: "no".into(),
            trailers_only: true,
            fail_on: vec!["direct".into()],
            retry_pushback_ms: "-250".into(),
            ..Default::default()
        })
        .await
        .expect_err("this server fails");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "-250"
    );
    // The attempt header, reported as received.
    let mut request = tonic::Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("grpc-previous-rpc-attempts", "2".parse().unwrap());
    let reply = client.unary(request).await.expect("unary").into_inner();
    assert_eq!(reply.received_previous_rpc_attempts, "2");
    assert_eq!(server.state().calls_started(), 3);
}
