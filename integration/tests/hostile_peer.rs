//! A hostile peer holding a valid certificate, played by a raw HTTP/3 client on aioquic
//! (`integration/peers/hostile_h3.py`, not our QUIC stack): request streams announcing huge
//! HEADERS frames trickled in and never finished, headers that never complete, more connections
//! than allowed. The attacked sidecar's memory stays bounded (peak RSS read from the kernel),
//! every limit is counted, and a well-behaved client's calls made during the attack all succeed.

mod security_common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use integration::cluster::Load;
use integration::echo_server::spawn_echo_server;
use integration::harness::{
    echo_client, free_tcp_addr, free_udp_addr, next_loopback_ip, within, Sidecar, TlsFiles,
};
use security_common::{metric, peers_script, sidecar_certs, tls_yaml};

const LIMIT: Duration = Duration::from_secs(90);
const LIMITED: &str = "locality_sidecar_inbound_limited_total";
/// The acceptance bound on the attacked sidecar's peak resident memory.
const MAX_PEAK_RSS: u64 = 96 * 1024 * 1024;

/// The attacked server sidecar and a well-behaved client sidecar calling through it.
struct Rig {
    server: Sidecar,
    client: Sidecar,
    app: SocketAddr,
    quic: SocketAddr,
    tls: TlsFiles,
    _echo: integration::echo_server::EchoServerHandle,
}

async fn rig(dir: &Path, limits: &str) -> Rig {
    let tls = sidecar_certs(&dir.join("certs"), None, None);
    let echo = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), "echo-1")
        .await
        .expect("echo server");
    let quic = free_udp_addr();
    let server_admin = free_tcp_addr();
    let server_config = format!(
        "inbound: {{listen: {quic}, forward: {}, limits: {{{limits}}}}}\n{}\nadmin: {{listen: {server_admin}}}\n",
        echo.addr(),
        tls_yaml(&tls)
    );
    let server = Sidecar::start("server", dir, &server_config, server_admin).await;
    let app = free_tcp_addr();
    let client_admin = free_tcp_addr();
    let client_config = format!(
        "outbound:\n  - listen: {app}\n    name: echo\n    endpoints: [{{address: {quic}, node: node-a, zone: z1}}]\n{}\nadmin: {{listen: {client_admin}}}\n",
        tls_yaml(&tls)
    );
    let client = Sidecar::start("client", dir, &client_config, client_admin).await;
    Rig {
        server,
        client,
        app,
        quic,
        tls,
        _echo: echo,
    }
}

/// Runs the hostile client to its end and returns its JSON summary.
async fn attack(rig: &Rig, args: &[&str]) -> serde_json::Value {
    let output = within(LIMIT, "the hostile client", async {
        tokio::process::Command::new("python3")
            .arg(peers_script("hostile_h3.py"))
            .arg("--connect")
            .arg(rig.quic.to_string())
            .arg("--ca")
            .arg(&rig.tls.ca)
            .arg("--cert")
            .arg(&rig.tls.cert)
            .arg("--key")
            .arg(&rig.tls.key)
            .args(args)
            .output()
            .await
            .expect("run python3 hostile_h3.py")
    })
    .await;
    assert!(
        output.status.success(),
        "hostile_h3.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_never_finished_headers_keep_memory_bounded_and_others_served() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let rig = rig(dir.path(), "").await;
    let load = Load::start(&echo_client(rig.app).await, 2);
    load.wait_completed(20, LIMIT).await;
    let before = peak_rss(rig.server.pid());

    // 64 streams, each announcing a 4 MiB HEADERS frame and trickling it in, never finished.
    let summary = attack(
        &rig,
        &[
            "--streams",
            "64",
            "--frame-size",
            "4194304",
            "--chunk",
            "16384",
            "--duration",
            "8",
        ],
    )
    .await;
    let during = load.completed();
    let (_, failures) = load.finish(LIMIT).await;
    let peak = peak_rss(rig.server.pid());
    let refused = metric(rig.server.admin_addr(), LIMITED, &["header_size"]).await;
    eprintln!(
        "attack: {summary}; server peak RSS {} KiB before, {} KiB after; {refused} streams refused; {during} calls",
        before / 1024,
        peak / 1024
    );
    assert!(
        failures.is_empty(),
        "well-behaved calls failed during the attack: {failures:?}"
    );
    assert!(
        during > 20,
        "the well-behaved client kept calling: {during}"
    );
    assert!(peak < MAX_PEAK_RSS, "peak RSS {} MiB", peak / (1024 * 1024));
    assert!(
        refused >= 64.0,
        "every oversized stream is refused and counted: {refused}"
    );
    assert!(
        summary["streams_refused"].as_u64().unwrap_or(0) >= 64,
        "the peer heard the refusals: {summary}"
    );
    drop(rig.client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_never_complete_time_out_and_extra_connections_are_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let rig = rig(dir.path(), "headerTimeout: 1s, maxConnectionsPerPeer: 2").await;
    // The well-behaved client holds one of the two connections its address may have (every
    // process here calls from 127.0.0.1).
    let load = Load::start(&echo_client(rig.app).await, 2);
    load.wait_completed(20, LIMIT).await;

    // Four connections: one more is admitted, the rest refused. Small HEADERS frames that stop
    // one byte short, so they never complete.
    let summary = attack(
        &rig,
        &[
            "--connections",
            "4",
            "--streams",
            "8",
            "--frame-size",
            "1000",
            "--chunk",
            "100",
            "--duration",
            "4",
        ],
    )
    .await;
    let (_, failures) = load.finish(LIMIT).await;
    let admin = rig.server.admin_addr();
    let timed_out = metric(admin, LIMITED, &["header_timeout"]).await;
    let refused_connections = metric(admin, LIMITED, &["connections_per_peer"]).await;
    eprintln!(
        "attack: {summary}; {timed_out} header timeouts, {refused_connections} connections refused"
    );
    assert!(
        failures.is_empty(),
        "well-behaved calls failed during the attack: {failures:?}"
    );
    assert_eq!(summary["connections"].as_u64(), Some(1), "{summary}");
    assert_eq!(
        summary["connections_refused"].as_u64(),
        Some(3),
        "{summary}"
    );
    assert!(refused_connections >= 3.0, "{refused_connections}");
    assert!(
        timed_out >= 8.0,
        "each incomplete request timed out: {timed_out}"
    );
    drop(rig.client);
}
