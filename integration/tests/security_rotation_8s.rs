//! Issue 13's rotation acceptance as written, not compressed: every leaf lives 45 s and is
//! replaced every 8 s (kubelet `..data` swaps, certificates from Python `cryptography`) under a
//! never-restarted client and two server pods, for longer than a leaf lives. Counts the calls
//! that fail through the whole run, restarts one server pod and times its first answer, and
//! after the first leaves expired starts a new client against the never-restarted server.
//! (`security_rotation.rs` swaps once, to a long-lived set; this one rotates repeatedly.)

mod security_common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::cluster::Load;
use integration::echo_server::spawn_echo_server;
use integration::harness::{
    echo_client, free_tcp_addr, free_udp_addr, next_loopback_ip, within, Sidecar,
};
use security_common::{metric, mounted, one_call, peers_script, python, tls_yaml};

const LEAF_LIFETIME_S: u64 = 45;
const ROTATE_EVERY: Duration = Duration::from_secs(8);
/// The run outlives the first leaves by this much.
const PAST_EXPIRY: Duration = Duration::from_secs(15);
const RESTART_ANSWERS_WITHIN: Duration = Duration::from_secs(5);
const LIMIT: Duration = Duration::from_secs(60);
const RELOADS: &str = "locality_sidecar_tls_reloads_total";

fn issue_args(ca: &Path, mount: &Path) -> Vec<String> {
    vec![
        "issue".into(),
        "--ca".into(),
        ca.display().to_string(),
        "--mount".into(),
        mount.display().to_string(),
        "--lifetime".into(),
        LEAF_LIFETIME_S.to_string(),
    ]
}

fn issue(ca: &Path, mount: &Path) {
    let args = issue_args(ca, mount);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    python("certs.py", &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_of_45s_replaced_every_8s_through_a_run_longer_than_a_leaf_lives() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = dir.path().join("ca");
    python(
        "certs.py",
        &["ca", "--out", ca.to_str().expect("utf-8 path")],
    );
    let mounts: Vec<PathBuf> = ["server-a-tls", "server-b-tls", "client-tls"]
        .iter()
        .map(|m| dir.path().join(m))
        .collect();
    for mount in &mounts {
        issue(&ca, mount);
    }
    let first_expiry = tokio::time::Instant::now() + Duration::from_secs(LEAF_LIFETIME_S);

    let echo_a = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), "echo-a")
        .await
        .expect("echo server a");
    let echo_b = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), "echo-b")
        .await
        .expect("echo server b");
    let (quic_a, quic_b) = (free_udp_addr(), free_udp_addr());
    let (admin_a, admin_b) = (free_tcp_addr(), free_tcp_addr());
    let server_yaml = |quic: SocketAddr, forward: SocketAddr, mount: &Path, admin: SocketAddr| {
        format!(
            "inbound: {{listen: {quic}, forward: {forward}}}\n{}\nadmin: {{listen: {admin}}}\n",
            tls_yaml(&mounted(mount))
        )
    };
    let yaml_a = server_yaml(quic_a, echo_a.addr(), &mounts[0], admin_a);
    let yaml_b = server_yaml(quic_b, echo_b.addr(), &mounts[1], admin_b);
    let _server_a = Sidecar::start("server-a", dir.path(), &yaml_a, admin_a).await;
    let mut server_b = Sidecar::start("server-b", dir.path(), &yaml_b, admin_b).await;

    let client_yaml = |app_a: SocketAddr, app_b: SocketAddr, admin: SocketAddr| {
        format!(
            "outbound:\n  - listen: {app_a}\n    name: echo-a\n    endpoints: [{{address: {quic_a}, node: node-a, zone: z1, pod: echo-pod-a}}]\n  - listen: {app_b}\n    name: echo-b\n    endpoints: [{{address: {quic_b}, node: node-b, zone: z1, pod: echo-pod-b}}]\n{}\nadmin: {{listen: {admin}}}\n",
            tls_yaml(&mounted(&mounts[2]))
        )
    };
    let (app_a, app_b, client_admin) = (free_tcp_addr(), free_tcp_addr(), free_tcp_addr());
    let client = Sidecar::start(
        "client",
        dir.path(),
        &client_yaml(app_a, app_b, client_admin),
        client_admin,
    )
    .await;

    // The rotator: every 8 s, a new 45 s leaf for each pod, swapped in the kubelet's way.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rotator = {
        let (ca, mounts, stop) = (ca.clone(), mounts.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0usize;
            let mut next = std::time::Instant::now() + ROTATE_EVERY;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if std::time::Instant::now() >= next {
                    for mount in &mounts {
                        let status = std::process::Command::new("python3")
                            .arg(peers_script("certs.py"))
                            .args(issue_args(&ca, mount))
                            .status()
                            .expect("run certs.py");
                        assert!(status.success(), "certs.py issue failed");
                    }
                    swaps += 1;
                    next += ROTATE_EVERY;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            swaps
        })
    };

    let load_a = Load::start(&echo_client(app_a).await, 4);
    let load_b = Load::start(&echo_client(app_b).await, 2);

    // Past the first leaves' expiry: every pod has been through several rotations.
    tokio::time::sleep_until(first_expiry + Duration::from_secs(2)).await;

    // A new client (new handshake, presenting its current leaf) reaches the never-restarted
    // server, which must present its current leaf rather than its expired first one.
    let (late_app, late_admin) = (free_tcp_addr(), free_tcp_addr());
    let late = Sidecar::start(
        "late-client",
        dir.path(),
        &client_yaml(late_app, free_tcp_addr(), late_admin),
        late_admin,
    )
    .await;
    let late_answer = one_call(late_app).await;
    eprintln!("new client after first expiry -> never-restarted server: {late_answer:?}");

    // Server pod B restarts: it loads its current leaf, and the never-restarted client must
    // handshake again presenting its own rotated leaf. Its route's load pauses meanwhile: calls
    // to a pod that is down on purpose (its only endpoint) fail fast, and are no rotation failure.
    let (mut answers_b, mut failures_b) = load_b.finish(LIMIT).await;
    server_b.kill();
    let restarted = tokio::time::Instant::now();
    let _server_b = Sidecar::spawn("server-b-restarted", dir.path(), &yaml_b, admin_b);
    let first_answer = within(LIMIT, "the restarted server answering", async {
        loop {
            if let Ok(server) = one_call(app_b).await {
                return (server, restarted.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    eprintln!(
        "restarted server answered the old client after {:?}",
        first_answer.1
    );
    let load_b = Load::start(&echo_client(app_b).await, 2);

    tokio::time::sleep_until(first_expiry + PAST_EXPIRY).await;
    let (answers_a, failures_a) = load_a.finish(LIMIT).await;
    let (answers_b_after, failures_b_after) = load_b.finish(LIMIT).await;
    for (pod, n) in answers_b_after {
        *answers_b.entry(pod).or_insert(0) += n;
    }
    failures_b.extend(failures_b_after);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let swaps = rotator.join().expect("rotator thread");
    let total_a: usize = answers_a.values().sum::<usize>() + failures_a.len();
    let total_b: usize = answers_b.values().sum::<usize>() + failures_b.len();
    let reloads_a = metric(admin_a, RELOADS, &["applied"]).await;
    let reloads_client = metric(client_admin, RELOADS, &["applied"]).await;
    eprintln!(
        "{swaps} rotations of every pod; applied: server a {reloads_a}, client {reloads_client}"
    );
    eprintln!(
        "route a (server never restarted): {total_a} calls, {} failed ({:.3}%): {:?}",
        failures_a.len(),
        failures_a.len() as f64 * 100.0 / total_a.max(1) as f64,
        failures_a.iter().take(5).collect::<Vec<_>>()
    );
    eprintln!(
        "route b (server restarted once, paused while it was down): {total_b} calls, {} failed ({:.3}%): {:?}",
        failures_b.len(),
        failures_b.len() as f64 * 100.0 / total_b.max(1) as f64,
        failures_b.iter().take(5).collect::<Vec<_>>()
    );
    let all_failed = failures_a.len() + failures_b.len();
    let all = total_a + total_b;
    eprintln!(
        "whole run: {all} calls, {all_failed} failed ({:.3}%)",
        all_failed as f64 * 100.0 / all.max(1) as f64
    );

    assert_eq!(
        late_answer.expect("a new client reaches the never-restarted server"),
        "echo-a"
    );
    assert_eq!(first_answer.0, "echo-b");
    assert!(
        first_answer.1 <= RESTART_ANSWERS_WITHIN,
        "the restarted pod answered only after {:?}",
        first_answer.1
    );
    assert!(
        swaps >= 6,
        "the run saw {swaps} rotations: it must outlive a leaf"
    );
    assert!(
        reloads_a >= swaps as f64 - 1.0,
        "server a applied {reloads_a} of {swaps} rotations"
    );
    assert!(
        all_failed * 100 <= all,
        "more than 1% of {all} calls failed through the rotation run"
    );
    drop((client, late));
}
