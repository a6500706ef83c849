//! The harness's own guarantees, checked with real sidecar processes: a sidecar that dies or
//! panics during a test fails that test when its handle is dropped (fall-through would
//! otherwise hide a crashing pod sidecar from the app), while one stopped on purpose with
//! [`Sidecar::kill`] does not.

use std::io::Write as _;

use integration::harness::{
    free_tcp_addr, free_udp_addr, generate_certs, server_sidecar_config, Sidecar,
};

async fn idle_sidecar(dir: &tempfile::TempDir) -> Sidecar {
    let certs = generate_certs(&dir.path().join("certs"), &[]);
    let admin = free_tcp_addr();
    let config = server_sidecar_config(free_udp_addr(), free_tcp_addr(), &certs.tls(), admin);
    Sidecar::start("idle", dir.path(), &config, admin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "idle sidecar exited unexpectedly")]
async fn a_sidecar_that_died_fails_the_test_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = idle_sidecar(&dir).await;
    // Killed behind the harness's back, as a crash would.
    let status = std::process::Command::new("kill")
        .args(["-KILL", &sidecar.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    // Wait until the process is really gone: a multi-threaded process is a zombie in /proc a
    // little before `waitpid` can report it.
    let mut sidecar = sidecar;
    integration::harness::within(
        std::time::Duration::from_secs(10),
        "the killed sidecar's exit",
        async {
            while sidecar.is_running() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "idle sidecar logged a panic")]
async fn a_sidecar_that_logged_a_panic_fails_the_test_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = idle_sidecar(&dir).await;
    // What a panicking per-call task writes to stderr while the process keeps running.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(sidecar.log_path())
        .unwrap();
    writeln!(
        log,
        "thread 'tokio-runtime-worker' panicked at sidecar/src/outbound/call.rs:1:1:"
    )
    .unwrap();
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_on_purpose_is_no_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = idle_sidecar(&dir).await;
    sidecar.kill();
    assert!(!sidecar.is_running());
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_sidecar_is_no_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = idle_sidecar(&dir).await;
    assert_eq!(sidecar.health_problem(), None);
}
