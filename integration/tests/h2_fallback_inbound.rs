//! The inbound side of the HTTP/2 fallback (issue 16): where UDP is blocked, a peer sidecar calls
//! over TCP + TLS 1.3 (ALPN h2) at the QUIC port's number. Here the test itself is that peer:
//! a tokio-rustls client with a certificate carrying a SPIFFE identity and the `h2` crate's
//! client, against a real server-role sidecar process. Checked as a user would notice it: the
//! echo comes back byte for byte with grpc-status 0, the app sees the verified identity (never a
//! forged copy), an identity outside `inbound.allow` gets PERMISSION_DENIED, a certificate from
//! another CA is refused at the handshake (the sidecar's log says so), `/metrics` counts the
//! open HTTP/2 connection, and an idle one does not hold up the sidecar's shutdown.

mod security_common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use integration::echo_server::{pattern, spawn_echo_server};
use integration::harness::{
    decode_grpc_frames, free_tcp_addr, free_udp_addr, grpc_frame, next_loopback_ip,
    server_sidecar_config, within, Sidecar, TlsFiles,
};
use integration::pb::{EchoReply, EchoRequest};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use security_common::{metric, sidecar_certs, tls_yaml};

const TRUST_DOMAIN: &str = "spiffe://cluster.test/ns/default/sa";
const IDENTITY_HEADER: &str = "x-locality-sidecar-peer-identity";
/// The DNS name every `locality-sidecar certs` certificate carries.
const SERVER_NAME: &str = "locality-sidecar";
const LIMIT: Duration = Duration::from_secs(10);
const CONNECTIONS: &str = "locality_sidecar_peer_connections";
const H2_INBOUND: [&str; 2] = ["direction=\"inbound\"", "protocol=\"h2\""];

fn id(account: &str) -> String {
    format!("{TRUST_DOMAIN}/{account}")
}

/// A TLS 1.3 connection (ALPN h2) to `address` (TCP), trusting `ca`, presenting `client`'s
/// certificate, as a peer sidecar on the fallback would open it.
async fn tls_connect(
    address: SocketAddr,
    ca: &Path,
    client: &TlsFiles,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let chain = CertificateDer::pem_file_iter(&client.cert)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(&client.key).map_err(|e| e.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("TCP connect: {e}"))?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() != Some(b"h2".as_slice()) {
        return Err(format!("the sidecar did not agree on ALPN h2: {alpn:?}"));
    }
    Ok(tls)
}

/// [`tls_connect`] with an HTTP/2 client on top.
async fn connect(
    address: SocketAddr,
    ca: &Path,
    client: &TlsFiles,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let tls = tls_connect(address, ca, client).await?;
    let (sender, connection) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// [`connect`] as a well-behaved peer of `server`, which must succeed.
async fn peer_connection(
    listen: SocketAddr,
    server: &TlsFiles,
    peer: &TlsFiles,
) -> h2::client::SendRequest<Bytes> {
    within(LIMIT, "connect over TCP", connect(listen, &server.ca, peer))
        .await
        .expect("TLS + HTTP/2 to the inbound's TCP port")
}

/// One gRPC response as a peer receives it.
#[derive(Debug)]
struct Answer {
    status: http::StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Answer {
    /// `grpc-status` from the trailers, or from the headers of a trailers-only response.
    fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|trailers| trailers.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|value| value.to_str().ok())
    }
}

/// One unary gRPC call on `sender`: `request` as the body, `metadata` added to the headers.
async fn call(
    sender: &h2::client::SendRequest<Bytes>,
    path: &str,
    metadata: &HeaderMap,
    request: &EchoRequest,
) -> Result<Answer, String> {
    let mut ready = sender
        .clone()
        .ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let mut builder = http::Request::post(format!("https://{SERVER_NAME}{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    for (name, value) in metadata {
        builder = builder.header(name, value);
    }
    let head = builder.body(()).map_err(|e| e.to_string())?;
    let (response, mut send) = ready
        .send_request(head, false)
        .map_err(|e| format!("send request: {e}"))?;
    // A server may answer before the body is sent (a refusal is trailers-only at once), and h2
    // then refuses the body as sent to an ended stream: that is the call's answer, not a failure.
    let body_sent = send.send_data(grpc_frame(request), true);
    let response = response.await.map_err(|e| match &body_sent {
        Err(send_error) => format!("send body: {send_error}"),
        Ok(()) => format!("response: {e}"),
    })?;
    let (parts, mut body) = response.into_parts();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("response body: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| format!("trailers: {e}"))?;
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: data.freeze(),
        trailers,
    })
}

/// A server-role sidecar in front of an echo app, and a peer certificate (identity
/// `frontend`) from the same CA to call it over the fallback with.
struct EchoBehindSidecar {
    // Drop order is field order: the processes go before the directory holding their files.
    server: Sidecar,
    echo: integration::echo_server::EchoServerHandle,
    server_tls: TlsFiles,
    peer_tls: TlsFiles,
    /// The QUIC port's number, where the TCP fallback listens too.
    listen: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl EchoBehindSidecar {
    async fn start() -> EchoBehindSidecar {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca_dir = dir.path().join("server-certs");
        let server_tls = sidecar_certs(&ca_dir, None, Some(&id("echo")));
        let peer_tls = sidecar_certs(
            &dir.path().join("frontend"),
            Some(&ca_dir),
            Some(&id("frontend")),
        );
        let echo = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), "echo-pod")
            .await
            .expect("start the echo server");
        let listen = free_udp_addr();
        let admin = free_tcp_addr();
        let config = server_sidecar_config(listen, echo.addr(), &server_tls, admin);
        let server = Sidecar::start("server", dir.path(), &config, admin).await;
        EchoBehindSidecar {
            server,
            echo,
            server_tls,
            peer_tls,
            listen,
            admin,
            dir,
        }
    }
}

/// Polls `/metrics` until the open inbound HTTP/2 connections are `value`; panics after LIMIT.
async fn wait_h2_connections(admin: SocketAddr, value: f64) {
    let started = tokio::time::Instant::now();
    loop {
        let now = metric(admin, CONNECTIONS, &H2_INBOUND).await;
        if now == value {
            return;
        }
        assert!(
            started.elapsed() < LIMIT,
            "{CONNECTIONS}{H2_INBOUND:?} is {now} after {LIMIT:?}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_tcp_gets_its_exact_bytes_back_and_is_counted_as_an_http2_connection() {
    let EchoBehindSidecar {
        dir: _dir,
        server_tls,
        peer_tls,
        echo: _echo,
        mut server,
        listen,
        admin,
    } = EchoBehindSidecar::start().await;

    let sender = peer_connection(listen, &server_tls, &peer_tls).await;
    // Not a multiple of any frame size, so a lost or repeated chunk shows.
    let payload = pattern(70_001);
    let request = EchoRequest {
        payload: payload.clone(),
        ..EchoRequest::default()
    };
    let answer = within(
        LIMIT,
        "unary call over HTTP/2",
        call(&sender, "/echo.Echo/Unary", &HeaderMap::new(), &request),
    )
    .await
    .expect("the call is answered");
    assert_eq!(answer.status, http::StatusCode::OK, "{answer:?}");
    assert_eq!(answer.grpc_status(), Some("0"), "{answer:?}");
    let replies: Vec<EchoReply> = decode_grpc_frames(&answer.body);
    assert_eq!(replies.len(), 1, "one reply");
    assert_eq!(replies[0].payload, payload, "the exact bytes come back");
    assert_eq!(replies[0].server, "echo-pod");

    // The connection is still open: counted once, as inbound HTTP/2.
    wait_h2_connections(admin, 1.0).await;
    drop(sender);
    // Closed by the peer: no longer counted.
    wait_h2_connections(admin, 0.0).await;

    // Shutting down with an idle fallback connection open: the sidecar's GOAWAY ends it at
    // once, so the process exits well within its 10 s drain instead of waiting it out.
    let sender = peer_connection(listen, &server_tls, &peer_tls).await;
    let answer = within(
        LIMIT,
        "second call",
        call(&sender, "/echo.Echo/Unary", &HeaderMap::new(), &request),
    )
    .await
    .expect("the call is answered");
    assert_eq!(answer.grpc_status(), Some("0"), "{answer:?}");
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "clean exit: {status}");
}

/// A local app that records every request's headers and echoes the request body back with
/// grpc-status 0, so a test sees both what reached the app and the bytes.
struct RecordingApp {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

async fn recording_app() -> RecordingApp {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind((next_loopback_ip(), 0))
        .await
        .expect("bind the app");
    let addr = listener.local_addr().expect("app address");
    let seen: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        record
                            .lock()
                            .expect("app lock")
                            .push(request.headers().clone());
                        async move {
                            let body = request.into_body().collect().await?.to_bytes();
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let frames = futures::stream::iter([
                                Ok::<_, hyper::Error>(hyper::body::Frame::data(body)),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ]);
                            let mut response =
                                http::Response::new(http_body_util::StreamBody::new(frames));
                            response.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/grpc"),
                            );
                            Ok::<_, hyper::Error>(response)
                        }
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    RecordingApp { addr, seen }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_on_the_http2_fallback_are_verified_and_authorized_as_on_quic() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca_dir = dir.path().join("server-certs");
    let server_tls = sidecar_certs(&ca_dir, None, Some(&id("echo")));
    let app = recording_app().await;
    let listen = free_udp_addr();
    let admin = free_tcp_addr();
    let config = format!(
        "inbound: {{listen: {listen}, forward: {}, allow: [\"{}\"]}}\n{}\nadmin: {{listen: {admin}}}\n",
        app.addr,
        id("frontend"),
        tls_yaml(&server_tls)
    );
    let server = Sidecar::start("server", dir.path(), &config, admin).await;
    let seen = || app.seen.lock().expect("app lock").clone();

    // A listed identity reaches the app, which learns it from the sidecar alone.
    let frontend = sidecar_certs(
        &dir.path().join("frontend"),
        Some(&ca_dir),
        Some(&id("frontend")),
    );
    let sender = within(
        LIMIT,
        "connect as frontend",
        connect(listen, &server_tls.ca, &frontend),
    )
    .await
    .expect("a certificate of the CA is accepted");
    let mut forged = HeaderMap::new();
    forged.append(IDENTITY_HEADER, id("admin").parse().expect("header value"));
    let request = EchoRequest {
        payload: Bytes::from_static(b"who am i"),
        ..EchoRequest::default()
    };
    let answer = within(
        LIMIT,
        "allowed call",
        call(&sender, "/echo.Echo/Unary", &forged, &request),
    )
    .await
    .expect("the allowed call is answered");
    assert_eq!(answer.grpc_status(), Some("0"), "{answer:?}");
    assert_eq!(answer.body, grpc_frame(&request), "the app's echo, exact");
    let headers = seen();
    assert_eq!(headers.len(), 1, "the call reached the app");
    let identities: Vec<_> = headers[0].get_all(IDENTITY_HEADER).iter().collect();
    assert_eq!(
        identities,
        vec![id("frontend").as_str()],
        "only the verified identity: {:?}",
        headers[0]
    );

    // Same CA, an identity the allow list does not name.
    let intruder = sidecar_certs(
        &dir.path().join("intruder"),
        Some(&ca_dir),
        Some(&id("intruder")),
    );
    let sender = within(
        LIMIT,
        "connect as intruder",
        connect(listen, &server_tls.ca, &intruder),
    )
    .await
    .expect("the handshake succeeds: the certificate is the CA's");
    let answer = within(
        LIMIT,
        "unlisted call",
        call(&sender, "/echo.Echo/Unary", &HeaderMap::new(), &request),
    )
    .await
    .expect("the unlisted call is answered");
    assert_eq!(
        answer.grpc_status(),
        Some("7"),
        "PERMISSION_DENIED: {answer:?}"
    );
    assert_eq!(seen().len(), 1, "the unlisted caller never reached the app");

    // A certificate from another CA (with an allowed identity in it) is refused by TLS. In TLS
    // 1.3 the server judges the client's certificate after the client's side of the handshake
    // is done, so the refusal (an alert) arrives at the first exchange: HTTP/2's preface.
    let foreign = sidecar_certs(&dir.path().join("foreign"), None, Some(&id("frontend")));
    let refused = within(LIMIT, "connect with a foreign certificate", async {
        let sender = connect(listen, &server_tls.ca, &foreign).await?;
        call(&sender, "/echo.Echo/Unary", &HeaderMap::new(), &request).await
    })
    .await;
    // The peer sees its connection cut (an alert, or a broken pipe if the close wins the race);
    // the operator sees why in the sidecar's log.
    let error = refused.expect_err("a certificate from another CA is refused");
    let started = tokio::time::Instant::now();
    while !server
        .log_text()
        .contains("HTTP/2 fallback TLS handshake failed")
    {
        assert!(
            started.elapsed() < LIMIT,
            "no TLS refusal in the sidecar's log within {LIMIT:?} (the peer saw: {error}):\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen().len(), 1, "the foreign caller never reached the app");
}

/// A peer that cancels a call over the fallback after sending its request whole (RST_STREAM
/// while the app works on it) has the app's call cancelled at once, not at a deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cancelling_over_http2_cancels_the_app_call_at_once() {
    let EchoBehindSidecar {
        dir: _dir,
        server_tls,
        peer_tls,
        echo,
        server: _server,
        listen,
        ..
    } = EchoBehindSidecar::start().await;
    let sender = peer_connection(listen, &server_tls, &peer_tls).await;
    let mut ready = within(LIMIT, "connection ready", sender.ready())
        .await
        .expect("connection ready");
    let head = http::Request::post(format!("https://{SERVER_NAME}/echo.Echo/Unary"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .expect("request head");
    let (_response, mut send) = ready.send_request(head, false).expect("send request");
    // A minute of service time, sent whole: only the peer's reset can end it early.
    let slow = EchoRequest {
        delay_ms: 60_000,
        ..EchoRequest::default()
    };
    send.send_data(grpc_frame(&slow), true).expect("send body");
    let state = echo.state();
    assert!(
        state.wait_for_calls_started(1, LIMIT).await,
        "the call never reached the app"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        state.calls_cancelled(),
        0,
        "the call ended before the cancel"
    );
    let cancelled_at = std::time::Instant::now();
    send.send_reset(h2::Reason::CANCEL);
    assert!(
        state
            .wait_for_cancellations(1, Duration::from_secs(3))
            .await,
        "the app's call was not cancelled within 3 s of the peer's RST_STREAM"
    );
    let delay = state
        .last_cancellation()
        .expect("a cancellation was counted, so its time was kept")
        .saturating_duration_since(cancelled_at);
    println!("HTTP/2 fallback: the app saw the cancel {delay:?} after the peer's RST_STREAM");
}

/// An HTTP/2 frame: 9-byte header, then the payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("a small frame");
    let mut frame = length.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HPACK integer with a 7-bit prefix (RFC 7541, section 5.1).
fn hpack_int(mut value: u64) -> Vec<u8> {
    if value < 127 {
        return vec![value as u8];
    }
    let mut out = vec![127];
    value -= 127;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
    out
}

/// A peer whose request announces a 4 MiB header value and trickles it in CONTINUATION frames
/// has its connection ended by the sidecar (h2 stops at the header limit), counted as a header
/// limit; other peers' calls go on being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_flooding_headers_over_http2_is_cut_off_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let EchoBehindSidecar {
        dir: _dir,
        server_tls,
        peer_tls,
        echo: _echo,
        server: _server,
        listen,
        admin,
    } = EchoBehindSidecar::start().await;
    let mut tls = within(LIMIT, "TLS", tls_connect(listen, &server_tls.ca, &peer_tls))
        .await
        .expect("TLS with ALPN h2");
    // :method POST, :scheme https (static table), then a literal `x-big` announced at 4 MiB.
    let mut block = vec![0x83, 0x87, 0x00];
    block.extend(hpack_int(5));
    block.extend(b"x-big");
    block.extend(hpack_int(4 * 1024 * 1024));
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[]));
    // HEADERS on stream 1 without END_HEADERS (nor END_STREAM): CONTINUATIONs follow.
    opening.extend(h2_frame(0x1, 0, 1, &block));
    tls.write_all(&opening).await.expect("send the opening");
    let continuation = h2_frame(0x9, 0, 1, &[b'a'; 16 * 1024]);
    let mut sent = 0usize;
    within(LIMIT, "the flood, then the sidecar closing", async {
        while sent < 4 * 1024 * 1024 {
            if tls.write_all(&continuation).await.is_err() {
                break;
            }
            sent += continuation.len();
        }
        // Socket buffers may have taken it all: the sidecar must end the connection anyway.
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
    })
    .await;
    security_common::wait_metric(
        admin,
        "locality_sidecar_inbound_limited_total",
        &["limit=\"header_size\""],
        1.0,
        LIMIT,
    )
    .await;
    // A well-behaved peer is still served.
    let sender = peer_connection(listen, &server_tls, &peer_tls).await;
    let answer = within(
        LIMIT,
        "a call after the flood",
        call(
            &sender,
            "/echo.Echo/Unary",
            &HeaderMap::new(),
            &EchoRequest::default(),
        ),
    )
    .await
    .expect("the call is answered");
    assert_eq!(answer.grpc_status(), Some("0"), "{answer:?}");
    println!("header flood over HTTP/2: the connection ended after {sent} bytes were written");
}
