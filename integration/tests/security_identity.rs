//! Workload identity end to end, with certificates from `locality-sidecar certs --identity`:
//! `inbound.allow` lets a listed caller through and refuses an unlisted one (same CA) with
//! PERMISSION_DENIED before its app sees anything; the app receives the caller's verified
//! identity in `x-locality-sidecar-peer-identity` and never a copy the caller forged; a client
//! whose `outbound[].endpoints[].identity` expects another identity refuses the server, moves the
//! call to an endpoint that presents the right one, and names both identities when none does.

mod security_common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use integration::echo_server::spawn_echo_server;
use integration::harness::{
    echo_client, free_tcp_addr, free_udp_addr, grpc_frame, next_loopback_ip, raw_grpc_call,
    Sidecar, TlsFiles,
};
use integration::pb::EchoRequest;
use security_common::{metric, sidecar_certs, tls_yaml};

const TRUST_DOMAIN: &str = "spiffe://cluster.test/ns/default/sa";
const IDENTITY_HEADER: &str = "x-locality-sidecar-peer-identity";

fn id(account: &str) -> String {
    format!("{TRUST_DOMAIN}/{account}")
}

/// A local app that records every request's headers and answers gRPC OK, trailers-only.
struct HeaderApp {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

async fn header_app() -> HeaderApp {
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
                        async {
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", "0")
                                .body(http_body_util::Empty::<Bytes>::new())
                        }
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    HeaderApp { addr, seen }
}

fn server_config(
    listen: SocketAddr,
    forward: SocketAddr,
    allow: &[String],
    tls: &TlsFiles,
    admin: SocketAddr,
) -> String {
    let allow = allow
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "inbound: {{listen: {listen}, forward: {forward}, allow: [{allow}]}}\n{}\nadmin: {{listen: {admin}}}\n",
        tls_yaml(tls)
    )
}

/// A client sidecar config; `endpoints` are (address, node, pod, expected identity).
fn client_config(
    listen: SocketAddr,
    endpoints: &[(SocketAddr, &str, &str, String)],
    tls: &TlsFiles,
    admin: SocketAddr,
) -> String {
    let endpoints = endpoints
        .iter()
        .map(|(address, node, pod, identity)| {
            format!("{{address: {address}, node: {node}, zone: z1, pod: {pod}, identity: \"{identity}\"}}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "outbound:\n  - listen: {listen}\n    name: echo\n    endpoints: [{endpoints}]\n{}\nadmin: {{listen: {admin}}}\n",
        tls_yaml(tls)
    )
}

async fn start_client(
    label: &str,
    dir: &Path,
    server: SocketAddr,
    server_identity: &str,
    tls: &TlsFiles,
) -> (Sidecar, SocketAddr) {
    let app = free_tcp_addr();
    let admin = free_tcp_addr();
    let config = client_config(
        app,
        &[(server, "node-a", "server-pod", server_identity.to_string())],
        tls,
        admin,
    );
    (Sidecar::start(label, dir, &config, admin).await, app)
}

/// A server sidecar allowing only `frontend`, in front of a header-recording app, and the
/// certificate directory of its CA.
async fn allow_list_server(dir: &Path) -> (Sidecar, SocketAddr, HeaderApp, std::path::PathBuf) {
    let ca_dir = dir.join("server-certs");
    let server_tls = sidecar_certs(&ca_dir, None, Some(&id("echo")));
    let app = header_app().await;
    let quic = free_udp_addr();
    let admin = free_tcp_addr();
    let config = server_config(quic, app.addr, &[id("frontend")], &server_tls, admin);
    let server = Sidecar::start("server", dir, &config, admin).await;
    (server, quic, app, ca_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_caller_reaches_the_app_with_its_verified_identity_and_a_forged_one_is_dropped()
{
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_server, quic, app, ca_dir) = allow_list_server(dir.path()).await;
    let tls = sidecar_certs(
        &dir.path().join("frontend"),
        Some(&ca_dir),
        Some(&id("frontend")),
    );
    let (_client, client_app) = start_client("frontend", dir.path(), quic, &id("echo"), &tls).await;

    let mut metadata = HeaderMap::new();
    metadata.append(IDENTITY_HEADER, id("admin").parse().expect("header value"));
    metadata.append(
        IDENTITY_HEADER,
        "spiffe://evil/x".parse().expect("header value"),
    );
    for _ in 0..5 {
        let response = raw_grpc_call(
            client_app,
            "/echo.Echo/Unary",
            &metadata,
            grpc_frame(&EchoRequest::default()),
        )
        .await
        .expect("call through the sidecars");
        assert_eq!(response.grpc_status(), Some("0"), "{response:?}");
    }
    let seen = app.seen.lock().expect("app lock").clone();
    assert_eq!(seen.len(), 5, "every allowed call reached the app");
    for headers in seen {
        let values: Vec<_> = headers.get_all(IDENTITY_HEADER).iter().collect();
        assert_eq!(
            values,
            vec![id("frontend").as_str()],
            "only the verified identity: {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_caller_gets_permission_denied_on_every_call_and_never_reaches_the_app() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (server, quic, app, ca_dir) = allow_list_server(dir.path()).await;
    // Same CA, another service account.
    let tls = sidecar_certs(
        &dir.path().join("intruder"),
        Some(&ca_dir),
        Some(&id("intruder")),
    );
    let (_client, client_app) = start_client("intruder", dir.path(), quic, &id("echo"), &tls).await;

    const CALLS: usize = 20;
    for _ in 0..CALLS {
        let response = raw_grpc_call(
            client_app,
            "/echo.Echo/Unary",
            &HeaderMap::new(),
            grpc_frame(&EchoRequest::default()),
        )
        .await
        .expect("call through the sidecars");
        assert_eq!(
            response.grpc_status(),
            Some("7"),
            "PERMISSION_DENIED: {response:?}"
        );
        let message = response.grpc_message_decoded();
        assert!(
            message.contains(&id("intruder")),
            "the message names the caller: {message}"
        );
    }
    assert!(
        app.seen.lock().expect("app lock").is_empty(),
        "no denied call reached the app"
    );
    let denied = metric(
        server.admin_addr(),
        "locality_sidecar_inbound_denied_total",
        &[],
    )
    .await;
    assert_eq!(denied, CALLS as f64);

    // A caller without any SPIFFE ID (a plain certificate of the same CA) is refused too.
    let plain = sidecar_certs(&dir.path().join("plain"), Some(&ca_dir), None);
    let (_plain, plain_app) = start_client("plain", dir.path(), quic, &id("echo"), &plain).await;
    let response = raw_grpc_call(
        plain_app,
        "/echo.Echo/Unary",
        &HeaderMap::new(),
        grpc_frame(&EchoRequest::default()),
    )
    .await
    .expect("call through the sidecars");
    assert_eq!(response.grpc_status(), Some("7"), "{response:?}");
    assert!(app.seen.lock().expect("app lock").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_another_identity_refuses_the_server_and_goes_elsewhere() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca_dir = dir.path().join("ca");
    let client_tls = sidecar_certs(&ca_dir, None, Some(&id("frontend")));
    // Two upstream pods: one presents the identity the client expects, one presents another.
    let mut upstreams = Vec::new();
    for (pod, account) in [("impostor-pod", "impostor"), ("echo-pod", "echo")] {
        let tls = sidecar_certs(&dir.path().join(pod), Some(&ca_dir), Some(&id(account)));
        let echo = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), pod)
            .await
            .expect("echo server");
        let quic = free_udp_addr();
        let admin = free_tcp_addr();
        let config = format!(
            "inbound: {{listen: {quic}, forward: {}}}\n{}\nadmin: {{listen: {admin}}}\n",
            echo.addr(),
            tls_yaml(&tls)
        );
        let sidecar = Sidecar::start(pod, dir.path(), &config, admin).await;
        upstreams.push((sidecar, echo, quic));
    }
    let (impostor_quic, echo_quic) = (upstreams[0].2, upstreams[1].2);

    // The impostor is on the client's node, so it is tried first.
    let app = free_tcp_addr();
    let admin = free_tcp_addr();
    let config = client_config(
        app,
        &[
            (impostor_quic, "node-a", "impostor-pod", id("echo")),
            (echo_quic, "node-b", "echo-pod", id("echo")),
        ],
        &client_tls,
        admin,
    );
    let env = [("NODE_NAME".to_string(), "node-a".to_string())];
    let client = Sidecar::start_with("client", dir.path(), &config, admin, &[], &env).await;
    let mut echo = echo_client(app).await;
    for _ in 0..10 {
        let mut request = tonic::Request::new(EchoRequest::default());
        request.set_timeout(Duration::from_secs(5));
        let reply = echo
            .unary(request)
            .await
            .expect("the call moves to the right identity");
        assert_eq!(reply.into_inner().server, "echo-pod");
    }
    assert_eq!(
        upstreams[0].1.state().calls_started(),
        0,
        "the impostor's app saw nothing"
    );
    let refused = metric(
        client.admin_addr(),
        "locality_sidecar_upstream_identity_mismatches_total",
        &[],
    )
    .await;
    assert!(
        refused >= 1.0,
        "the impostor was tried and refused: {refused}"
    );

    // With only the impostor, the call fails naming both identities.
    let app = free_tcp_addr();
    let admin = free_tcp_addr();
    let config = client_config(
        app,
        &[(impostor_quic, "node-a", "impostor-pod", id("echo"))],
        &client_tls,
        admin,
    );
    let _alone = Sidecar::start("client-alone", dir.path(), &config, admin).await;
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(5));
    let status = echo_client(app)
        .await
        .unary(request)
        .await
        .expect_err("no endpoint presents the identity");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let message = status.message();
    assert!(
        message.contains(&format!("expected {}", id("echo"))),
        "{message}"
    );
    assert!(
        message.contains(&format!("presented {}", id("impostor"))),
        "{message}"
    );
    assert_eq!(upstreams[0].1.state().calls_started(), 0);
}
