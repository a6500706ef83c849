//! Certificates rotating under running sidecars, the way a pod sees it: short-lived leaves made
//! independently of our `certs` command (`integration/peers/certs.py`, Python `cryptography`),
//! replaced through the kubelet's atomic `..data` symlink swap. Calls keep flowing through the
//! rotation, both roles pick the new set up within 5 s without a restart, a new client reaches
//! the never-restarted server after its first leaf expired, and a restarted server is answered
//! by the never-restarted client (which must present its rotated leaf). A bad new set is refused
//! whole, logged once, counted, and the old set stays.

mod security_common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use integration::cluster::Load;
use integration::echo_server::spawn_echo_server;
use integration::harness::{
    echo_client, free_tcp_addr, free_udp_addr, next_loopback_ip, within, Sidecar, TlsFiles,
};
use security_common::{metric, mounted, one_call, python, tls_yaml, wait_metric};

const LIMIT: Duration = Duration::from_secs(60);
/// The promise: a new set is in use within this long of the swap.
const APPLY_WITHIN: Duration = Duration::from_secs(5);
const RELOADS: &str = "locality_sidecar_tls_reloads_total";

fn issue(ca: &Path, mount: &Path, lifetime_s: u64, extra: &[&str]) {
    let lifetime = lifetime_s.to_string();
    let mut args = vec![
        "issue",
        "--ca",
        ca.to_str().expect("utf-8 path"),
        "--mount",
        mount.to_str().expect("utf-8 path"),
        "--lifetime",
        &lifetime,
    ];
    args.extend_from_slice(extra);
    python("certs.py", &args);
}

fn server_config(
    listen: SocketAddr,
    forward: SocketAddr,
    tls: &TlsFiles,
    admin: SocketAddr,
) -> String {
    format!(
        "inbound: {{listen: {listen}, forward: {forward}}}\n{}\nadmin: {{listen: {admin}}}\n",
        tls_yaml(tls)
    )
}

fn client_config(
    listen: SocketAddr,
    server: SocketAddr,
    tls: &TlsFiles,
    admin: SocketAddr,
) -> String {
    format!(
        "outbound:\n  - listen: {listen}\n    name: echo\n    endpoints: [{{address: {server}, node: node-a, zone: z1, pod: echo-pod}}]\n{}\nadmin: {{listen: {admin}}}\n",
        tls_yaml(tls)
    )
}

/// Starts a client sidecar and returns it with its app address.
async fn start_client(
    label: &str,
    dir: &Path,
    server: SocketAddr,
    tls: &TlsFiles,
) -> (Sidecar, SocketAddr) {
    let app = free_tcp_addr();
    let admin = free_tcp_addr();
    let sidecar = Sidecar::start(label, dir, &client_config(app, server, tls, admin), admin).await;
    (sidecar, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_through_symlink_swaps_keeps_calls_flowing_and_outlives_the_first_leaf() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = dir.path().join("ca");
    python(
        "certs.py",
        &["ca", "--out", ca.to_str().expect("utf-8 path")],
    );
    let (server_mount, client_mount) =
        (dir.path().join("server-tls"), dir.path().join("client-tls"));
    // The first leaves live 12 s: long enough to start everything on a busy machine, short
    // enough that the test runs past their expiry.
    const FIRST_LIFETIME_S: u64 = 12;
    issue(&ca, &server_mount, FIRST_LIFETIME_S, &[]);
    issue(&ca, &client_mount, FIRST_LIFETIME_S, &[]);
    let first_expiry = tokio::time::Instant::now() + Duration::from_secs(FIRST_LIFETIME_S);

    let echo = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), "echo-1")
        .await
        .expect("echo server");
    let quic = free_udp_addr();
    let server_admin = free_tcp_addr();
    let server_yaml = server_config(quic, echo.addr(), &mounted(&server_mount), server_admin);
    let _server = Sidecar::start("server", dir.path(), &server_yaml, server_admin).await;
    let (client, app) = start_client("client", dir.path(), quic, &mounted(&client_mount)).await;
    let expiry = metric(
        server_admin,
        "locality_sidecar_tls_cert_expiry_seconds",
        &[],
    )
    .await;
    assert!(
        expiry > 0.0 && expiry <= FIRST_LIFETIME_S as f64,
        "the expiry gauge shows the first leaf's remaining life: {expiry}"
    );

    // Calls flow all along; new leaves (a long life) are swapped in under both sidecars.
    let load = Load::start(&echo_client(app).await, 4);
    load.wait_completed(100, LIMIT).await;
    issue(&ca, &server_mount, 600, &[]);
    issue(&ca, &client_mount, 600, &[]);
    let server_took = wait_metric(server_admin, RELOADS, &["applied"], 1.0, APPLY_WITHIN).await;
    let client_took = wait_metric(
        client.admin_addr(),
        RELOADS,
        &["applied"],
        1.0,
        APPLY_WITHIN,
    )
    .await;
    eprintln!("new sets applied: server after {server_took:?}, client after {client_took:?}");
    let expiry = metric(
        server_admin,
        "locality_sidecar_tls_cert_expiry_seconds",
        &[],
    )
    .await;
    assert!(expiry > 500.0, "the gauge follows the new leaf: {expiry}");

    // Past the first leaves' expiry, calls still flow on the established connection.
    tokio::time::sleep_until(first_expiry + Duration::from_secs(1)).await;
    let done = load.completed();
    load.wait_completed(done + 100, LIMIT).await;
    let (answers, failures) = load.finish(LIMIT).await;
    let total: usize = answers.values().sum::<usize>() + failures.len();
    eprintln!(
        "{total} calls through the rotation, {} failed: {failures:?}",
        failures.len()
    );
    assert!(
        failures.len() * 100 <= total,
        "more than 1% of {total} calls failed across the rotation: {failures:?}"
    );

    // A new client (a new handshake) reaches the server that never restarted.
    let (_late_client, late_app) =
        start_client("late-client", dir.path(), quic, &mounted(&client_mount)).await;
    assert_eq!(
        one_call(late_app)
            .await
            .expect("a new client reaches the never-restarted server"),
        "echo-1"
    );

    // The server restarts: the never-restarted client handshakes again, presenting its new leaf.
    drop(_server);
    let restarted = tokio::time::Instant::now();
    let _server = Sidecar::spawn("server-restarted", dir.path(), &server_yaml, server_admin);
    let answered = within(
        APPLY_WITHIN,
        "the restarted server answering the old client",
        async {
            loop {
                if let Ok(server) = one_call(app).await {
                    return server;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    assert_eq!(answered, "echo-1");
    eprintln!("restarted server answered after {:?}", restarted.elapsed());
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_set_is_refused_whole_logged_once_and_the_old_set_stays() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (ca, other_ca) = (dir.path().join("ca"), dir.path().join("other-ca"));
    for out in [&ca, &other_ca] {
        python(
            "certs.py",
            &["ca", "--out", out.to_str().expect("utf-8 path")],
        );
    }
    let (server_mount, client_mount) =
        (dir.path().join("server-tls"), dir.path().join("client-tls"));
    issue(&ca, &server_mount, 600, &[]);
    issue(&ca, &client_mount, 600, &[]);
    let echo = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), "echo-1")
        .await
        .expect("echo server");
    let quic = free_udp_addr();
    let server_admin = free_tcp_addr();
    let server_yaml = server_config(quic, echo.addr(), &mounted(&server_mount), server_admin);
    let server = Sidecar::start("server", dir.path(), &server_yaml, server_admin).await;
    let (_client, app) = start_client("client", dir.path(), quic, &mounted(&client_mount)).await;
    assert_eq!(one_call(app).await.expect("call before"), "echo-1");

    // A key that does not match its certificate, then a set from another CA: both refused.
    issue(&ca, &server_mount, 600, &["--bad-key"]);
    wait_metric(server_admin, RELOADS, &["rejected"], 1.0, APPLY_WITHIN).await;
    // A leaf from another CA, swapped in beside our CA's file: not signed by the CA it names.
    let foreign = dir.path().join("foreign");
    issue(&other_ca, &foreign, 600, &[]);
    swap_files(
        &server_mount,
        &[
            ca.join("ca.crt"),
            foreign.join("tls.crt"),
            foreign.join("tls.key"),
        ],
    );
    wait_metric(server_admin, RELOADS, &["rejected"], 2.0, APPLY_WITHIN).await;

    // Each bad set is told once, however many times the files are read (three more polls).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(metric(server_admin, RELOADS, &["rejected"]).await, 2.0);
    assert_eq!(metric(server_admin, RELOADS, &["applied"]).await, 0.0);
    let log = server.log_text();
    assert_eq!(
        log.matches("does not belong to the certificate").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("is not signed by tls.ca").count(), 1, "{log}");

    // The old set stays: a new client (a new handshake) is still served.
    let (_late, late_app) =
        start_client("late-client", dir.path(), quic, &mounted(&client_mount)).await;
    assert_eq!(
        one_call(late_app).await.expect("served with the old set"),
        "echo-1"
    );

    // A good set after the bad ones applies.
    issue(&ca, &server_mount, 600, &[]);
    wait_metric(server_admin, RELOADS, &["applied"], 1.0, APPLY_WITHIN).await;
    assert_eq!(one_call(app).await.expect("call after"), "echo-1");
}

/// Swaps `files` (ca.crt, tls.crt, tls.key in that order) into `mount` through a new `..data`.
fn swap_files(mount: &Path, files: &[std::path::PathBuf]) {
    let stamp = mount.join("..manual");
    std::fs::create_dir_all(&stamp).expect("new data directory");
    for (file, name) in files.iter().zip(["ca.crt", "tls.crt", "tls.key"]) {
        std::fs::copy(file, stamp.join(name)).expect("copy into the new data directory");
    }
    let temporary = mount.join("..data_tmp");
    std::os::unix::fs::symlink("..manual", &temporary).expect("new ..data link");
    std::fs::rename(&temporary, mount.join("..data")).expect("atomic swap of ..data");
}
