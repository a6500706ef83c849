//! A Python app (grpcio, the C-core gRPC stack) through the sidecars: the same data path as
//! `data_path.rs`, but with a client that shares no code with the Rust one, so differences in
//! how stacks frame metadata, trailers and statuses show up. Needs
//! `pip install grpcio grpcio-tools`; a missing module fails the test rather than skipping it.

use std::{path::Path, process::Command, time::Duration};

use integration::harness::Pipeline;

const INSTALL_HINT: &str = "run `pip install grpcio grpcio-tools`";

fn check_python() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is not available ({e}): install Python 3, then {INSTALL_HINT}")
        });
    assert!(
        probe.status.success(),
        "python3 cannot import grpc and grpc_tools: {INSTALL_HINT}\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_gets_every_call_shape_through_the_sidecars() {
    check_python();
    let pipeline = Pipeline::start().await;
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest_dir.join("python/echo_client.py");
    let proto = manifest_dir.join("../proto/echo.proto");
    let target = pipeline.app_addr.to_string();
    // The script has its own 30 s per-call timeouts; this bound only stops a stuck interpreter.
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .arg(&script)
            .arg("--target")
            .arg(&target)
            .arg("--proto")
            .arg(&proto)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python client finished within 120 s")
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python3 {} --target {target} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        output.status
    );
    assert!(
        stdout.contains(" 0 failed"),
        "unexpected summary from the Python client:\n{stdout}\n{stderr}"
    );
    // Each Python call must reach the app exactly once: nothing answered by the sidecars
    // themselves, nothing duplicated.
    let calls: u64 = stdout
        .split(" calls,")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no call count in the Python summary:\n{stdout}"));
    assert!(calls > 0, "the Python client made no calls:\n{stdout}");
    assert_eq!(
        pipeline.echo.state().calls_started(),
        calls,
        "calls the app received vs calls the Python client made"
    );
    assert_eq!(
        pipeline.echo.state().calls_without_te_trailers(),
        0,
        "calls that reached the app without te: trailers"
    );
}
