//! Sidecars of two versions side by side, as in the middle of a rollout. The calling sidecar
//! leaves `te: trailers` off the hop only once the serving sidecar has said it sets it for its
//! app itself; a serving peer that never says so (an older sidecar, played by an HTTP/3 server
//! on aioquic, `integration/peers/old_sidecar_h3.py`) gets it on every request, because apps on
//! gRPC C-core refuse calls without it. Likewise gRPC's content type, which two sidecars of this
//! version imply on the hop, still travels to a peer that offers only plain `h3`.

mod security_common;

use std::time::Duration;

use integration::harness::{echo_client, free_tcp_addr, free_udp_addr, within, Sidecar};
use integration::pb::EchoRequest;
use security_common::{peers_script, sidecar_certs, tls_yaml};
use tokio::io::{AsyncBufReadExt, BufReader};

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_peer_that_never_says_it_restores_te_gets_it_on_every_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = sidecar_certs(&dir.path().join("certs"), None, None);
    let peer_addr = free_udp_addr();
    let mut peer = tokio::process::Command::new("python3")
        .arg(peers_script("old_sidecar_h3.py"))
        .arg("--listen")
        .arg(peer_addr.to_string())
        .arg("--cert")
        .arg(&tls.cert)
        .arg("--key")
        .arg(&tls.key)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start python3 (the old peer needs `pip install aioquic`)");
    let mut lines = BufReader::new(peer.stdout.take().expect("peer stdout")).lines();
    let ready = within(LIMIT, "the old peer to listen", lines.next_line())
        .await
        .expect("read the old peer's output");
    assert_eq!(ready.as_deref(), Some("listening"));

    let app = free_tcp_addr();
    let admin = free_tcp_addr();
    let config = format!(
        "outbound:\n  - listen: {app}\n    name: old\n    endpoints: [{{address: {peer_addr}, node: node-a, zone: z1}}]\n{}\nadmin: {{listen: {admin}}}\n",
        tls_yaml(&tls)
    );
    let _client = Sidecar::start("client", dir.path(), &config, admin).await;
    let mut client = echo_client(app).await;
    // One after another on one connection: a peer that had said it restores `te` would get
    // every call after the first without it.
    for i in 0..5 {
        within(
            LIMIT,
            "a call to the old peer",
            client.unary(EchoRequest::default()),
        )
        .await
        .unwrap_or_else(|status| panic!("call {i} to the old peer: {status:?}"));
        let seen = within(LIMIT, "the old peer's report", lines.next_line())
            .await
            .expect("read the old peer's report")
            .expect("the old peer reports each request");
        let report: serde_json::Value = serde_json::from_str(&seen).expect("a JSON report");
        assert_eq!(
            report["te"], "trailers",
            "request {i} reached the old peer without te: trailers"
        );
        // Only a peer that agreed on the sidecars' own HTTP/3 in the handshake has it implied.
        assert_eq!(
            report["content-type"], "application/grpc",
            "request {i} reached the old peer without gRPC's content type"
        );
    }
}
