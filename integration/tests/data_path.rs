//! End-to-end fidelity of the data path: app → client sidecar (h2c) → HTTP/3 over QUIC with
//! mutual TLS → server sidecar → echo server (h2c). Every test runs two real sidecar processes
//! on loopback and checks, from the app's side, that a call behaves exactly as it would without
//! the sidecars in between (or, for failures the sidecars produce, that the app gets a proper
//! gRPC status). Needs `cargo build --workspace --bins` first.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use integration::{
    echo_server::{pattern, ECHO_REQUEST_HEAD},
    harness::{
        client_sidecar_config, decode_grpc_frames, free_tcp_addr, free_udp_addr, generate_certs,
        grpc_frame, http_get, parse_grpc_timeout, raw_grpc_call, raw_grpc_call_as, within,
        Pipeline, Sidecar, StaticEndpoint, TlsFiles, SERVER_NAME, SERVER_POD,
    },
    pb::{echo_client::EchoClient, EchoReply, EchoRequest},
};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{metadata::MetadataValue, transport::Channel, Code, Status};

/// Upper bound for any single call or stream in these tests: only there so a hang fails the
/// test with a reason instead of stalling the suite.
const LIMIT: Duration = Duration::from_secs(30);

const MIB: usize = 1024 * 1024;

/// Payload bytes that differ from [`pattern`] and from message to message, so a reply that
/// came from the wrong request or a shifted buffer cannot match by accident.
fn distinct_payload(seed: u32, len: usize) -> Bytes {
    let seed = seed.to_be_bytes();
    (0..len)
        .map(|i| seed[i % 4] ^ (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8))
        .collect::<Vec<u8>>()
        .into()
}

fn echo_request(payload: Bytes) -> EchoRequest {
    EchoRequest {
        payload,
        ..Default::default()
    }
}

fn describe(status: &Status) -> String {
    format!(
        "code {:?}, message {:?}, details {} bytes",
        status.code(),
        status.message(),
        status.details().len()
    )
}

async fn unary(
    client: &mut EchoClient<Channel>,
    request: EchoRequest,
) -> Result<EchoReply, Status> {
    within(LIMIT, "unary call", client.unary(request))
        .await
        .map(tonic::Response::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Call shapes and payload sizes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_payload_arrives_byte_identical() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let payload = distinct_payload(7, 4096);
    let reply = unary(&mut client, echo_request(payload.clone()))
        .await
        .expect("unary call through the sidecars");
    assert_eq!(reply.payload, payload);
    assert_eq!(reply.server, SERVER_NAME);
    assert_eq!(reply.sequence, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_te_trailers_and_no_sidecar_header_reaches_the_caller() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    // The first calls on a connection carry `te` across the hop; once the serving sidecar has
    // said it restores it, the rest do not. The app must get it on every one, and what the
    // sidecars say to each other must not reach the app's client.
    for i in 0..5 {
        let response = within(
            LIMIT,
            "unary call",
            client.unary(echo_request(distinct_payload(i, 64))),
        )
        .await
        .expect("unary call through the sidecars");
        assert!(
            response
                .metadata()
                .get("locality-sidecar-features")
                .is_none(),
            "call {i}: {:?}",
            response.metadata()
        );
    }
    assert_eq!(pipeline.echo.state().calls_started(), 5);
    assert_eq!(
        pipeline.echo.state().calls_without_te_trailers(),
        0,
        "the app got a call without te: trailers, which gRPC over HTTP/2 requires"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_content_type_reaches_the_app_and_the_caller_exactly_as_sent() {
    // Between two sidecars gRPC's content type is implied rather than sent; every other form
    // (a subtype, none, empty ones, several) must still arrive as the app's client sent it.
    let pipeline = Pipeline::start().await;
    let sent: [&[&str]; 6] = [
        &["application/grpc"],
        &["application/grpc+proto"],
        &[],
        &[""],
        &["", ""],
        &["application/grpc", "application/grpc+proto"],
    ];
    for content_types in sent {
        let raw = within(
            LIMIT,
            "raw unary",
            raw_grpc_call_as(
                pipeline.app_addr,
                "/echo.Echo/Unary",
                content_types,
                &HeaderMap::new(),
                grpc_frame(&EchoRequest::default()),
            ),
        )
        .await
        .expect("raw unary call");
        assert_eq!(raw.status, http::StatusCode::OK, "sent {content_types:?}");
        // The app (tonic) answers every call with exactly one `application/grpc`.
        let answered: Vec<_> = raw.headers.get_all("content-type").iter().collect();
        assert_eq!(answered, ["application/grpc"], "sent {content_types:?}");
    }
    assert_eq!(pipeline.echo.state().calls_started(), 6);
    let expected: Vec<Vec<String>> = sent[1..]
        .iter()
        .map(|types| types.iter().map(|t| t.to_string()).collect())
        .collect();
    assert_eq!(pipeline.echo.state().other_content_types(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_user_agents_reach_the_app_exactly_while_the_sidecars_remember_them() {
    // Between two sidecars a repeated path and user-agent travel once per connection and are
    // referred to afterwards. Every call must still reach the app with exactly its own: the
    // calls that define them, the ones that refer to them, and the forms never remembered
    // (no user-agent, two of them, an empty one, a query string).
    let pipeline = Pipeline::start().await;
    let paths = [
        "/echo.Echo/Unary",
        "/echo.Echo/ClientStream",
        "/echo.Echo/ServerStream",
        "/echo.Echo/Bidi",
    ];
    let agents: [&[&str]; 5] = [
        &["grpc-dotnet/2.66.0 (.NET 8.0.11; CLR 8.0.11; net8.0; linux; x64)"],
        &["tonic/0.14.2"],
        &[],
        &["first/1", "second/2"],
        &[""],
    ];
    let mut calls = 0;
    for round in 0..3 {
        for path in paths {
            for sent_agents in agents {
                let mut metadata = HeaderMap::new();
                metadata.insert(ECHO_REQUEST_HEAD, HeaderValue::from_static("1"));
                for agent in sent_agents {
                    metadata.append(
                        http::header::USER_AGENT,
                        HeaderValue::from_str(agent).unwrap(),
                    );
                }
                let raw = within(
                    LIMIT,
                    "raw call",
                    raw_grpc_call_as(
                        pipeline.app_addr,
                        path,
                        &["application/grpc"],
                        &metadata,
                        grpc_frame(&EchoRequest::default()),
                    ),
                )
                .await
                .expect("raw call");
                calls += 1;
                let what = format!("round {round}, {path}, user-agents {sent_agents:?}");
                assert_eq!(raw.grpc_status(), Some("0"), "{what}: {raw:?}");
                assert_eq!(raw.headers["echo-path"], path, "{what}");
                let seen: Vec<_> = raw.headers.get_all("echo-user-agent").iter().collect();
                assert_eq!(seen, sent_agents.to_vec(), "{what}");
            }
        }
    }
    assert_eq!(pipeline.echo.state().calls_started(), calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_one_byte_messages_pass_in_every_call_shape() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;

    // `EchoRequest::default()` encodes to a zero-length protobuf message: a bare 5-byte frame.
    let reply = unary(&mut client, EchoRequest::default())
        .await
        .expect("empty unary");
    assert!(reply.payload.is_empty());
    assert_eq!(reply.server, SERVER_NAME);
    let reply = unary(&mut client, echo_request(Bytes::from_static(&[0x00])))
        .await
        .expect("one-byte unary");
    assert_eq!(&reply.payload[..], &[0x00]);
    let reply = unary(
        &mut client,
        EchoRequest {
            reply_size: 1,
            ..Default::default()
        },
    )
    .await
    .expect("one-byte reply");
    assert_eq!(&reply.payload[..], &[0x00]);

    let reply = within(
        LIMIT,
        "client stream of empty messages",
        client.client_stream(tokio_stream::iter(vec![EchoRequest::default(); 3])),
    )
    .await
    .expect("client stream of empty messages")
    .into_inner();
    assert_eq!(reply.sequence, 3);
    assert!(reply.payload.is_empty());

    let requests = vec![
        EchoRequest::default(),
        echo_request(Bytes::from_static(b"x")),
        EchoRequest::default(),
    ];
    let replies: Vec<EchoReply> = within(LIMIT, "bidi of empty messages", async {
        let mut stream = client
            .bidi(tokio_stream::iter(requests.clone()))
            .await?
            .into_inner();
        let mut replies = Vec::new();
        while let Some(reply) = stream.message().await? {
            replies.push(reply);
        }
        Ok::<_, Status>(replies)
    })
    .await
    .expect("bidi of empty messages");
    let payloads: Vec<&[u8]> = replies.iter().map(|r| &r.payload[..]).collect();
    assert_eq!(payloads, [&b""[..], b"x", b""]);

    let mut stream = within(
        LIMIT,
        "server stream of empty messages",
        client.server_stream(EchoRequest {
            reply_count: 2,
            ..Default::default()
        }),
    )
    .await
    .expect("server stream")
    .into_inner();
    let mut count = 0;
    while let Some(reply) = within(LIMIT, "next reply", stream.message())
        .await
        .expect("reply")
    {
        assert!(reply.payload.is_empty());
        count += 1;
    }
    assert_eq!(count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_messages_pass_in_both_directions() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let big = distinct_payload(16, 16 * MIB);

    let reply = unary(&mut client, echo_request(big.clone()))
        .await
        .expect("16 MiB unary");
    assert!(reply.payload == big, "16 MiB unary reply differs");

    let mut stream = within(
        LIMIT,
        "16 MiB server stream",
        client.server_stream(EchoRequest {
            reply_size: 16 * MIB as u64,
            reply_count: 1,
            ..Default::default()
        }),
    )
    .await
    .expect("16 MiB server stream")
    .into_inner();
    let reply = within(LIMIT, "16 MiB reply", stream.message())
        .await
        .expect("16 MiB reply")
        .expect("one reply");
    assert!(
        reply.payload == pattern(16 * MIB),
        "16 MiB streamed reply differs"
    );

    let second = distinct_payload(17, 16 * MIB);
    let replies = within(LIMIT, "16 MiB bidi", async {
        let mut stream = client
            .bidi(tokio_stream::iter(vec![
                echo_request(big.clone()),
                echo_request(second.clone()),
            ]))
            .await?
            .into_inner();
        let mut replies = Vec::new();
        while let Some(reply) = stream.message().await? {
            replies.push(reply.payload);
        }
        Ok::<_, Status>(replies)
    })
    .await
    .expect("16 MiB bidi");
    assert_eq!(replies.len(), 2);
    assert!(
        replies[0] == big && replies[1] == second,
        "16 MiB bidi replies differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_of_10000_messages_arrives_complete_and_in_order() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let expected = pattern(100);
    let mut stream = within(
        LIMIT,
        "server stream",
        client.server_stream(EchoRequest {
            reply_size: 100,
            reply_count: 10_000,
            ..Default::default()
        }),
    )
    .await
    .expect("server stream")
    .into_inner();
    let received = within(LIMIT, "10,000 replies", async {
        let mut sequence = 0u64;
        while let Some(reply) = stream.message().await? {
            assert_eq!(reply.sequence, sequence, "reply out of order");
            assert_eq!(reply.payload, expected, "payload of reply {sequence}");
            sequence += 1;
        }
        Ok::<_, Status>(sequence)
    })
    .await
    .expect("stream ends with OK");
    assert_eq!(received, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stream_of_1000_messages_arrives_byte_identical() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let requests: Vec<EchoRequest> = (0..1000u32)
        .map(|i| echo_request(distinct_payload(i, (i as usize * 37) % 600)))
        .collect();
    let expected: Vec<u8> = requests
        .iter()
        .flat_map(|r| r.payload.iter().copied())
        .collect();
    let reply = within(
        LIMIT,
        "client stream",
        client.client_stream(tokio_stream::iter(requests)),
    )
    .await
    .expect("client stream")
    .into_inner();
    assert_eq!(reply.sequence, 1000, "requests counted by the server");
    assert!(
        reply.payload[..] == expected[..],
        "concatenated payload differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_stream_of_10000_messages_round_trips_in_order() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let request = |i: u32| echo_request(distinct_payload(i, 16 + (i as usize % 200)));
    let received = within(LIMIT, "10,000-message bidi", async {
        let mut stream = client
            .bidi(tokio_stream::iter((0..10_000u32).map(request)))
            .await?
            .into_inner();
        let mut count = 0u32;
        while let Some(reply) = stream.message().await? {
            assert_eq!(reply.sequence, u64::from(count), "reply out of order");
            assert_eq!(
                reply.payload,
                request(count).payload,
                "payload of reply {count}"
            );
            count += 1;
        }
        Ok::<_, Status>(count)
    })
    .await
    .expect("bidi ends with OK");
    assert_eq!(received, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_unary_calls_all_succeed() {
    let pipeline = Pipeline::start().await;
    // Several connections, as several app threads or processes would open.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(pipeline.client().await);
    }
    let mut calls = JoinSet::new();
    for i in 0..1000u32 {
        let mut client = clients[i as usize % clients.len()].clone();
        calls.spawn(async move {
            let payload = distinct_payload(i, 64);
            let reply = client.unary(echo_request(payload.clone())).await;
            (i, payload, reply)
        });
    }
    let results = within(LIMIT, "1,000 concurrent calls", calls.join_all()).await;
    let mut failures = Vec::new();
    for (i, payload, reply) in results {
        match reply {
            Ok(reply) if reply.get_ref().payload == payload => {}
            Ok(_) => failures.push(format!("call {i}: wrong payload")),
            Err(status) => failures.push(format!("call {i}: {}", describe(&status))),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 1000 calls failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_apps_per_connection_limit_are_all_answered_while_the_first_stay_open() {
    // The app allows 100 calls per HTTP/2 connection (Kestrel's default) and every stream
    // stays open, as a producer streaming to many consumers keeps them: the serving sidecar
    // must open connections enough for all, not queue the 201st behind streams that never end.
    const STREAMS: u32 = 250;
    let pipeline = Pipeline::start().await;
    pipeline
        .echo
        .state()
        .limit_streams_per_connection(Some(100));
    let client = pipeline.client().await;
    let mut streams = JoinSet::new();
    for i in 0..STREAMS {
        let mut client = client.clone();
        streams.spawn(async move {
            let payload = distinct_payload(i, 32);
            let (requests, pending) = tokio::sync::mpsc::channel(1);
            let _ = requests.send(echo_request(payload.clone())).await;
            let answered = async {
                let mut replies = client
                    .bidi(ReceiverStream::new(pending))
                    .await?
                    .into_inner();
                let first = replies.message().await?;
                Ok::<_, Status>((first.map(|reply| reply.payload), replies))
            }
            .await;
            // The request side and the replies are handed back, so the stream stays open.
            (i, payload, answered, requests)
        });
    }
    let answered = within(
        LIMIT,
        "first replies of 250 open streams",
        streams.join_all(),
    )
    .await;
    let mut failures = Vec::new();
    let mut open = Vec::new();
    for (i, payload, answered, requests) in answered {
        match answered {
            Ok((Some(first), replies)) if first == payload => open.push((requests, replies)),
            Ok((first, _)) => failures.push(format!("stream {i}: first reply {first:?}")),
            Err(status) => failures.push(format!("stream {i}: {}", describe(&status))),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {STREAMS} streams failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(open.len(), STREAMS as usize);
    // The operator is told once, not per call.
    let log = pipeline.server.log_text();
    assert_eq!(
        log.matches("connections are at its stream limit").count(),
        1,
        "serving sidecar's log:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Metadata, statuses and trailers

fn bin_value(bytes: &[u8]) -> MetadataValue<tonic::metadata::Binary> {
    MetadataValue::from_bytes(bytes)
}

const BINARY: &[u8] = &[0x00, 0xff, 0x0a, 0x0d, b':', 0x80];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metadata_comes_back_in_headers_and_trailers() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;

    let mut request = tonic::Request::new(EchoRequest {
        reply_count: 3,
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    metadata.insert("x-echo-text", "plain ascii; with = signs".parse().unwrap());
    metadata.insert_bin("x-echo-blob-bin", bin_value(BINARY));
    let response = within(LIMIT, "server stream", client.server_stream(request))
        .await
        .expect("server stream");
    let headers = response.metadata().clone();
    let mut stream = response.into_inner();
    while within(LIMIT, "next reply", stream.message())
        .await
        .expect("reply")
        .is_some()
    {}
    let trailers = stream
        .trailers()
        .await
        .expect("trailers")
        .expect("the stream has trailers");
    for (place, map) in [("headers", &headers), ("trailers", &trailers)] {
        assert_eq!(
            map.get("x-echo-text").map(|v| v.to_str().unwrap()),
            Some("plain ascii; with = signs"),
            "ASCII metadata in {place}"
        );
        assert_eq!(
            map.get_bin("x-echo-blob-bin")
                .map(|v| v.to_bytes().unwrap()),
            Some(Bytes::from_static(BINARY)),
            "binary metadata in {place}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_metadata_keys_keep_every_value_in_order() {
    let pipeline = Pipeline::start().await;
    let mut metadata = HeaderMap::new();
    for value in ["first", "second", "third"] {
        metadata.append("x-echo-multi", HeaderValue::from_static(value));
    }
    metadata.append("x-echo-multi-bin", HeaderValue::from_static("AAH/"));
    metadata.append("x-echo-multi-bin", HeaderValue::from_static("gA"));
    let raw = within(
        LIMIT,
        "raw unary",
        raw_grpc_call(
            pipeline.app_addr,
            "/echo.Echo/Unary",
            &metadata,
            grpc_frame(&EchoRequest::default()),
        ),
    )
    .await
    .expect("raw unary call");
    let trailers = raw.trailers.clone().expect("a normal reply has trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    // The upstream sidecar leaves the app's Date off the hop; the app still gets one, dated by
    // its own sidecar (RFC 9110's IMF-fixdate: "Fri, 27 Nov 2026 16:42:34 GMT").
    let date = raw
        .headers
        .get("date")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    assert!(
        date.as_deref()
            .is_some_and(|d| d.len() == 29 && d.ends_with(" GMT")),
        "response headers carry a Date: {date:?}"
    );
    assert_eq!(raw.headers.get_all("date").iter().count(), 1, "one Date");
    for (place, map) in [("headers", &raw.headers), ("trailers", &trailers)] {
        let values: Vec<_> = map.get_all("x-echo-multi").iter().collect();
        assert_eq!(values, ["first", "second", "third"], "{place}");
        let values: Vec<_> = map.get_all("x-echo-multi-bin").iter().collect();
        assert_eq!(values, ["AAH/", "gA"], "{place}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_status_keeps_its_trailing_metadata() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let mut request = tonic::Request::new(EchoRequest {
        reply_count: 2,
        status_code: Code::DataLoss as i32,
        status_message: "lost".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-echo-reason", "disk".parse().unwrap());
    request
        .metadata_mut()
        .insert_bin("x-echo-trace-bin", bin_value(BINARY));
    let mut stream = within(LIMIT, "server stream", client.server_stream(request))
        .await
        .expect("server stream")
        .into_inner();
    for _ in 0..2 {
        within(LIMIT, "reply", stream.message())
            .await
            .expect("reply")
            .expect("some");
    }
    let status = within(LIMIT, "final status", stream.message())
        .await
        .expect_err("the stream ends with DATA_LOSS");
    assert_eq!(status.code(), Code::DataLoss, "{}", describe(&status));
    assert_eq!(status.message(), "lost");
    assert_eq!(status.metadata().get("x-echo-reason").unwrap(), "disk");
    assert_eq!(
        status
            .metadata()
            .get_bin("x-echo-trace-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        Bytes::from_static(BINARY)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_code_arrives_with_its_message() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    for code in 1..=16 {
        for trailers_only in [true, false] {
            let message = format!("status {code}, trailers-only {trailers_only}");
            let status = unary(
                &mut client,
                EchoRequest {
                    status_code: code,
                    status_message: message.clone(),
                    trailers_only,
                    ..Default::default()
                },
            )
            .await
            .expect_err("the call must fail");
            assert_eq!(
                status.code(),
                Code::from_i32(code),
                "sent {message:?}, got {}",
                describe(&status)
            );
            assert_eq!(status.message(), message);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_status_message_arrives_intact() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let message = "échec — 失敗 ✓ 100% done\n";
    for trailers_only in [true, false] {
        let status = unary(
            &mut client,
            EchoRequest {
                status_code: Code::Internal as i32,
                status_message: message.into(),
                trailers_only,
                ..Default::default()
            },
        )
        .await
        .expect_err("the call must fail");
        assert_eq!(status.code(), Code::Internal, "{}", describe(&status));
        assert_eq!(status.message(), message, "trailers-only {trailers_only}");
    }
    // After streamed replies the message travels in real trailers.
    let mut stream = within(
        LIMIT,
        "server stream",
        client.server_stream(EchoRequest {
            reply_count: 1,
            status_code: Code::Aborted as i32,
            status_message: message.into(),
            ..Default::default()
        }),
    )
    .await
    .expect("server stream")
    .into_inner();
    within(LIMIT, "reply", stream.message())
        .await
        .expect("reply")
        .expect("some");
    let status = within(LIMIT, "status after the reply", stream.message())
        .await
        .expect_err("status after the reply");
    assert_eq!(status.code(), Code::Aborted, "{}", describe(&status));
    assert_eq!(status.message(), message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_details_bytes_arrive_intact() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let details: Bytes = (0..=255u8).chain(0..=255u8).collect::<Vec<_>>().into();
    for trailers_only in [true, false] {
        let status = unary(
            &mut client,
            EchoRequest {
                status_code: Code::InvalidArgument as i32,
                status_message: "bad field".into(),
                status_details: details.clone(),
                trailers_only,
                ..Default::default()
            },
        )
        .await
        .expect_err("the call must fail");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{}",
            describe(&status)
        );
        assert_eq!(
            status.details(),
            &details[..],
            "trailers-only {trailers_only}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_only_error_arrives_as_a_single_headers_frame() {
    let pipeline = Pipeline::start().await;
    let request = grpc_frame(&EchoRequest {
        status_code: Code::NotFound as i32,
        status_message: "no-such-thing".into(),
        trailers_only: true,
        ..Default::default()
    });
    let raw = within(
        LIMIT,
        "raw unary",
        raw_grpc_call(
            pipeline.app_addr,
            "/echo.Echo/Unary",
            &HeaderMap::new(),
            request,
        ),
    )
    .await
    .expect("raw unary call");
    assert_eq!(raw.status, http::StatusCode::OK);
    assert_eq!(
        raw.headers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"5"[..]),
        "the response headers themselves must carry the status: {raw:?}"
    );
    assert_eq!(raw.headers.get("grpc-message").unwrap(), "no-such-thing");
    assert!(
        raw.ended_with_headers,
        "the HEADERS frame must end the stream: {raw:?}"
    );
    assert!(raw.body.is_empty(), "no DATA expected: {raw:?}");
    assert!(
        raw.trailers.is_none(),
        "no second HEADERS expected: {raw:?}"
    );

    // tonic sees the same thing as a plain status.
    let mut client = pipeline.client().await;
    let status = unary(
        &mut client,
        EchoRequest {
            status_code: Code::NotFound as i32,
            trailers_only: true,
            ..Default::default()
        },
    )
    .await
    .expect_err("NOT_FOUND");
    assert_eq!(status.code(), Code::NotFound, "{}", describe(&status));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_after_replies_arrives_in_trailers_after_the_data() {
    let pipeline = Pipeline::start().await;
    let request = grpc_frame(&EchoRequest {
        reply_count: 3,
        reply_size: 10,
        status_code: Code::ResourceExhausted as i32,
        status_message: "quota".into(),
        ..Default::default()
    });
    let raw = within(
        LIMIT,
        "raw server stream",
        raw_grpc_call(
            pipeline.app_addr,
            "/echo.Echo/ServerStream",
            &HeaderMap::new(),
            request,
        ),
    )
    .await
    .expect("raw server-stream call");
    assert!(
        raw.headers.get("grpc-status").is_none(),
        "status must not be in the headers: {raw:?}"
    );
    let replies: Vec<EchoReply> = decode_grpc_frames(&raw.body);
    assert_eq!(replies.len(), 3);
    assert!(replies.iter().all(|r| r.payload == pattern(10)));
    let trailers = raw.trailers.expect("trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "8");
    assert_eq!(trailers.get("grpc-message").unwrap(), "quota");
}

// ---------------------------------------------------------------------------------------------
// Deadlines and cancellation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_grpc_timeout_is_reduced_by_time_already_spent() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(10));
    let reply = within(LIMIT, "unary", client.unary(request))
        .await
        .expect("unary with a 10 s deadline")
        .into_inner();
    let received = parse_grpc_timeout(&reply.received_grpc_timeout).unwrap_or_else(|| {
        panic!(
            "the app received grpc-timeout {:?}, not a valid timeout",
            reply.received_grpc_timeout
        )
    });
    assert!(
        received < Duration::from_secs(10) && received > Duration::from_secs(9),
        "the app received grpc-timeout {:?} ({received:?}) for a 10 s deadline",
        reply.received_grpc_timeout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadline_returns_deadline_exceeded_and_cancels_the_app_call() {
    let pipeline = Pipeline::start().await;
    // A raw client, because tonic's channel enforces grpc-timeout itself (answering CANCELLED
    // "Timeout expired" at 200 ms) and would hide what the sidecars answer.
    let mut metadata = HeaderMap::new();
    metadata.insert("grpc-timeout", HeaderValue::from_static("200m"));
    let request = grpc_frame(&EchoRequest {
        delay_ms: 3000,
        ..Default::default()
    });
    let started = Instant::now();
    let raw = within(
        LIMIT,
        "call with a 200 ms deadline",
        raw_grpc_call(pipeline.app_addr, "/echo.Echo/Unary", &metadata, request),
    )
    .await
    .expect("the call gets an HTTP response");
    let elapsed = started.elapsed();
    assert_eq!(
        raw.grpc_status(),
        Some("4"),
        "a 3 s call with a 200 ms deadline must end DEADLINE_EXCEEDED: {raw:?}"
    );
    assert!(raw.body.is_empty(), "no reply expected: {raw:?}");
    assert!(
        elapsed < Duration::from_millis(1500),
        "DEADLINE_EXCEEDED took {elapsed:?} for a 200 ms deadline"
    );
    // The echo server does not enforce grpc-timeout, so only a reset from the server sidecar
    // can make it see the cancellation.
    assert!(
        pipeline
            .echo
            .state()
            .wait_for_cancellations(1, Duration::from_secs(5))
            .await,
        "the app never saw its call cancelled after the deadline passed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_bidi_stream_midway_cancels_the_app_call() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    let cancel = request.cancellation_handle();
    sender
        .send(echo_request(Bytes::from_static(b"0")))
        .await
        .unwrap();
    let mut replies = within(LIMIT, "bidi", client.bidi(request))
        .await
        .expect("bidi")
        .into_inner();
    for i in 0..5u8 {
        if i > 0 {
            sender.send(echo_request(vec![i].into())).await.unwrap();
        }
        let reply = within(LIMIT, "bidi reply", replies.message())
            .await
            .expect("reply")
            .expect("some");
        assert_eq!(reply.sequence, u64::from(i));
    }
    assert_eq!(pipeline.echo.state().calls_cancelled(), 0);
    // The app gives up while its request side is still open: tonic sends RST_STREAM(CANCEL).
    cancel.cancel();
    drop(replies);
    assert!(
        pipeline
            .echo
            .state()
            .wait_for_cancellations(1, Duration::from_secs(5))
            .await,
        "the app's bidi call was not cancelled within 5 s of the client cancelling"
    );
    drop(sender);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_server_stream_midway_cancels_the_app_call() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let mut stream = within(
        LIMIT,
        "server stream",
        client.server_stream(EchoRequest {
            reply_size: 1024,
            reply_count: 1_000_000,
            ..Default::default()
        }),
    )
    .await
    .expect("server stream")
    .into_inner();
    for _ in 0..5 {
        within(LIMIT, "reply", stream.message())
            .await
            .expect("reply")
            .expect("some");
    }
    assert_eq!(pipeline.echo.state().calls_cancelled(), 0);
    drop(stream);
    assert!(
        pipeline
            .echo
            .state()
            .wait_for_cancellations(1, Duration::from_secs(5))
            .await,
        "the app's server stream was not cancelled within 5 s of the client dropping it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cancelled_server_streams_leave_the_sidecars_healthy() {
    let mut pipeline = Pipeline::start().await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(pipeline.client().await);
    }
    let mut streams = JoinSet::new();
    for i in 0..200usize {
        let mut client = clients[i % clients.len()].clone();
        streams.spawn(async move {
            let mut stream = client
                .server_stream(EchoRequest {
                    reply_size: 1024,
                    reply_count: 100_000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            for _ in 0..3 {
                stream
                    .message()
                    .await?
                    .ok_or_else(|| Status::internal("stream ended early"))?;
            }
            // Dropping the stream here is the cancellation.
            Ok::<_, Status>(())
        });
    }
    let results = within(LIMIT, "200 streams", streams.join_all()).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(describe))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 streams failed before being cancelled, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        pipeline
            .echo
            .state()
            .wait_for_cancellations(200, Duration::from_secs(15))
            .await,
        "only {} of 200 cancelled streams were cancelled at the app",
        pipeline.echo.state().calls_cancelled()
    );
    assert!(
        pipeline.client.is_running(),
        "the client sidecar died:\n{}",
        pipeline.client.log_text()
    );
    assert!(
        pipeline.server.is_running(),
        "the server sidecar died:\n{}",
        pipeline.server.log_text()
    );
    for sidecar in [&pipeline.client, &pipeline.server] {
        let live = http_get(sidecar.admin_addr(), "/live").await;
        assert!(
            matches!(live, Ok((200, _))),
            "{} sidecar /live: {live:?}",
            sidecar.label()
        );
    }
    let mut client = pipeline.client().await;
    let reply = unary(&mut client, echo_request(Bytes::from_static(b"still here")))
        .await
        .expect("a normal call after the cancellations");
    assert_eq!(&reply.payload[..], b"still here");
}

// ---------------------------------------------------------------------------------------------
// Upstream failure, backpressure

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_server_dying_midstream_ends_the_client_stream_with_an_error() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let mut stream = within(
        LIMIT,
        "server stream",
        client.server_stream(EchoRequest {
            reply_count: 100_000,
            delay_ms: 5,
            ..Default::default()
        }),
    )
    .await
    .expect("server stream")
    .into_inner();
    for _ in 0..3 {
        within(LIMIT, "reply", stream.message())
            .await
            .expect("reply")
            .expect("some");
    }
    let aborted = Instant::now();
    pipeline.echo.abort();
    let end = within(
        Duration::from_secs(10),
        "the stream's end after the app server died",
        async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        },
    )
    .await;
    match end {
        // The app's connection died under a started response: a transport loss, which gRPC
        // reports as UNAVAILABLE (not INTERNAL, not CANCELLED).
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{}", describe(&status)),
        Ok(_) => panic!(
            "the stream ended cleanly {:?} after the app server died mid-stream: a truncated \
             stream must not look like success",
            aborted.elapsed()
        ),
    }
}

/// An app that restarts on the same address costs only the calls made while it was down: the
/// inbound sidecar notices the old connection is gone and the next call opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_succeed_again_as_soon_as_a_restarted_app_listens() {
    let mut pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    let reply = unary(&mut client, echo_request(Bytes::from_static(b"before")))
        .await
        .expect("a call before the restart");
    assert_eq!(&reply.payload[..], b"before");

    let app_addr = pipeline.echo.addr();
    let echo = std::mem::replace(
        &mut pipeline.echo,
        // A placeholder until the restart: nothing calls it.
        integration::echo_server::spawn_echo_server(
            SocketAddr::from((integration::harness::next_loopback_ip(), 0)),
            "placeholder",
        )
        .await
        .expect("start a placeholder echo server"),
    );
    within(LIMIT, "the app's shutdown", echo.kill()).await;
    let status = unary(&mut client, echo_request(Bytes::from_static(b"down")))
        .await
        .expect_err("a call while the app is down");
    assert_eq!(status.code(), Code::Unavailable, "{}", describe(&status));

    pipeline.echo = integration::echo_server::spawn_echo_server(app_addr, SERVER_NAME)
        .await
        .expect("restart the echo server on its old address");
    let reply = unary(&mut client, echo_request(Bytes::from_static(b"after")))
        .await
        .expect("the first call after the app is back");
    assert_eq!(&reply.payload[..], b"after");
    assert_eq!(pipeline.echo.state().calls_started(), 1);
}

async fn read_in_order(
    stream: &mut tonic::Streaming<EchoReply>,
    sequences: std::ops::Range<u64>,
    expected: &Bytes,
) {
    for sequence in sequences {
        let reply = within(LIMIT, "reply", stream.message())
            .await
            .expect("reply")
            .expect("some");
        assert_eq!(reply.sequence, sequence);
        assert!(reply.payload == expected, "payload of reply {sequence}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_backpressure_bounds_producer_and_sidecar_memory() {
    const MESSAGE: usize = 64 * 1024;
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    // Warm up so connections and their buffers exist before the baseline is taken.
    unary(&mut client, echo_request(distinct_payload(1, MESSAGE)))
        .await
        .expect("warm-up call");
    let client_baseline = pipeline.client.rss_bytes();
    let server_baseline = pipeline.server.rss_bytes();

    let mut stream = within(
        LIMIT,
        "1 GiB server stream",
        client.server_stream(EchoRequest {
            reply_size: MESSAGE as u64,
            reply_count: 16384,
            ..Default::default()
        }),
    )
    .await
    .expect("1 GiB server stream")
    .into_inner();
    let expected = pattern(MESSAGE);
    read_in_order(&mut stream, 0..10, &expected).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let produced = pipeline.echo.state().stream_bytes();
    let client_growth = pipeline.client.rss_bytes().saturating_sub(client_baseline);
    let server_growth = pipeline.server.rss_bytes().saturating_sub(server_baseline);
    // Printed so that `--nocapture` shows how much headroom the bounds below have.
    eprintln!(
        "paused reader: app produced {} KiB; RSS growth: client sidecar {} KiB, server sidecar {} KiB",
        produced / 1024,
        client_growth / 1024,
        server_growth / 1024
    );
    assert!(
        produced < 64 * MIB as u64,
        "the app produced {} MiB while the client had read 640 KiB: no backpressure",
        produced / MIB as u64
    );
    assert!(
        client_growth < 32 * MIB as u64,
        "client sidecar RSS grew by {} MiB while the reader paused",
        client_growth / MIB as u64
    );
    assert!(
        server_growth < 32 * MIB as u64,
        "server sidecar RSS grew by {} MiB while the reader paused",
        server_growth / MIB as u64
    );
    // Pausing lost nothing: the stream resumes where it stopped.
    read_in_order(&mut stream, 10..110, &expected).await;
}

fn other_ca_dirs(dir: &tempfile::TempDir) -> (TlsFiles, TlsFiles) {
    let a = generate_certs(&dir.path().join("ca-a"), &[]);
    let b = generate_certs(&dir.path().join("ca-b"), &[]);
    (a.tls(), b.tls())
}

/// Makes a call with `deadline` and expects the sidecars' own UNAVAILABLE, naming `upstream`
/// and `pod` (as the README promises), before the deadline passes; returns the (decoded)
/// grpc-message. A raw client, because
/// tonic's channel would answer CANCELLED "Timeout expired" itself at the deadline and hide
/// what the sidecar did.
async fn expect_unavailable_naming(
    app: SocketAddr,
    upstream: &str,
    pod: &str,
    deadline: Duration,
) -> String {
    let mut metadata = HeaderMap::new();
    let timeout = format!("{}m", deadline.as_millis());
    metadata.insert("grpc-timeout", HeaderValue::from_str(&timeout).unwrap());
    let started = Instant::now();
    let raw = within(
        LIMIT,
        "call to a failing upstream",
        raw_grpc_call(
            app,
            "/echo.Echo/Unary",
            &metadata,
            grpc_frame(&EchoRequest::default()),
        ),
    )
    .await
    .expect("the sidecar answers with an HTTP/2 response");
    let elapsed = started.elapsed();
    let message = raw.grpc_message_decoded();
    assert_eq!(
        raw.grpc_status(),
        Some("14"),
        "expected UNAVAILABLE after {elapsed:?}, got grpc-status {:?} with message {message:?}: {raw:?}",
        raw.grpc_status()
    );
    assert!(
        message.contains(upstream),
        "the UNAVAILABLE message should name the upstream {upstream:?}: {message:?}"
    );
    assert!(
        message.contains(pod),
        "the UNAVAILABLE message should name the pod {pod:?}: {message:?}"
    );
    assert!(
        elapsed < deadline,
        "UNAVAILABLE took {elapsed:?}, longer than the {deadline:?} deadline"
    );
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_gives_unavailable_naming_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let certs = generate_certs(&dir.path().join("certs"), &[]);
    let app = free_tcp_addr();
    let admin = free_tcp_addr();
    // Nothing listens on this UDP port: QUIC gets no answer at all.
    let nobody = free_udp_addr();
    let config = client_sidecar_config(
        app,
        "echo-unreachable",
        &[StaticEndpoint::new(nobody, "node-a", "z1").with_pod("echo-nobody-0")],
        &certs.tls(),
        admin,
    );
    let _client_sidecar = Sidecar::start("client", dir.path(), &config, admin).await;
    expect_unavailable_naming(
        app,
        "echo-unreachable",
        "echo-nobody-0",
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_from_another_ca_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (trusted, foreign) = other_ca_dirs(&dir);
    let pipeline = Pipeline::start_with(dir, &trusted, &foreign, "echo-foreign-server").await;
    let message = expect_unavailable_naming(
        pipeline.app_addr,
        "echo-foreign-server",
        SERVER_POD,
        Duration::from_secs(5),
    )
    .await;
    let lower = message.to_lowercase();
    assert!(
        lower.contains("tls") || lower.contains("certificate"),
        "the UNAVAILABLE message should say the TLS handshake failed: {message:?}"
    );
    assert_eq!(
        pipeline.echo.state().calls_started(),
        0,
        "a call reached the app through an untrusted server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused_by_the_inbound() {
    let dir = tempfile::tempdir().unwrap();
    let (trusted, foreign) = other_ca_dirs(&dir);
    // The client sidecar holds a certificate of the foreign CA and trusts both CAs (a bundle,
    // as during a CA rotation), so it accepts the server; the server trusts only its own CA.
    let bundle = dir.path().join("both-cas.crt");
    let pem_a = std::fs::read_to_string(&trusted.ca).unwrap();
    let pem_b = std::fs::read_to_string(&foreign.ca).unwrap();
    std::fs::write(&bundle, format!("{pem_a}\n{pem_b}")).unwrap();
    let client_tls = TlsFiles {
        ca: bundle,
        cert: foreign.cert,
        key: foreign.key,
    };
    let pipeline = Pipeline::start_with(dir, &client_tls, &trusted, "echo-foreign-client").await;
    expect_unavailable_naming(
        pipeline.app_addr,
        "echo-foreign-client",
        SERVER_POD,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        pipeline.echo.state().calls_started(),
        0,
        "the inbound let an unauthenticated client reach the app"
    );
}
