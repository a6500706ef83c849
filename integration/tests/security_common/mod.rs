//! What the security tests share: certificates made by our `certs` command or independently by
//! `integration/peers/certs.py` (Python `cryptography`), config text, and waits on metrics.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration::harness::{echo_client, http_get, metric_sum, sidecar_binary, TlsFiles};
use integration::pb::EchoRequest;

/// A helper script under `integration/peers/`.
pub fn peers_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(name)
}

/// Runs `python3 integration/peers/SCRIPT ARGS...`, which must succeed.
pub fn python(script: &str, args: &[&str]) {
    let output = Command::new("python3")
        .arg(peers_script(script))
        .args(args)
        .output()
        .expect("run python3 (integration/run-tests.sh installs what the scripts need)");
    assert!(
        output.status.success(),
        "{script} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `locality-sidecar certs --out OUT [--ca CA] [--identity ID]`: a certificate (from a new CA,
/// or from `ca`'s) carrying `identity` as its SPIFFE ID.
pub fn sidecar_certs(out: &Path, ca: Option<&Path>, identity: Option<&str>) -> TlsFiles {
    let mut command = Command::new(sidecar_binary());
    command.arg("certs").arg("--out").arg(out);
    if let Some(ca) = ca {
        command.arg("--ca").arg(ca);
    }
    if let Some(identity) = identity {
        command.arg("--identity").arg(identity);
    }
    let output = command.output().expect("run locality-sidecar certs");
    assert!(
        output.status.success(),
        "locality-sidecar certs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    TlsFiles {
        ca: out.join("ca.crt"),
        cert: out.join("tls.crt"),
        key: out.join("tls.key"),
    }
}

/// The files of a kubelet-style mount made by `certs.py issue`.
pub fn mounted(mount: &Path) -> TlsFiles {
    TlsFiles {
        ca: mount.join("ca.crt"),
        cert: mount.join("tls.crt"),
        key: mount.join("tls.key"),
    }
}

/// A config's `tls:` line.
pub fn tls_yaml(tls: &TlsFiles) -> String {
    format!(
        "tls: {{ca: {}, cert: {}, key: {}}}",
        tls.ca.display(),
        tls.cert.display(),
        tls.key.display()
    )
}

/// The sum of metric `name` (lines containing every filter) on the sidecar whose admin
/// listener is `admin`.
pub async fn metric(admin: SocketAddr, name: &str, filters: &[&str]) -> f64 {
    let (status, text) = http_get(admin, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    metric_sum(&text, name, filters)
}

/// Waits until metric `name` reaches at least `value`; panics after `limit`.
pub async fn wait_metric(
    admin: SocketAddr,
    name: &str,
    filters: &[&str],
    value: f64,
    limit: Duration,
) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        let now = metric(admin, name, filters).await;
        if now >= value {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{name}{filters:?} is {now} after {limit:?}, expected at least {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One unary call through the outbound listener at `app` (5 s deadline): the pod that answered.
pub async fn one_call(app: SocketAddr) -> Result<String, tonic::Status> {
    let mut client = echo_client(app).await;
    let mut request = tonic::Request::new(EchoRequest::default());
    request.set_timeout(Duration::from_secs(5));
    client
        .unary(request)
        .await
        .map(|reply| reply.into_inner().server)
}
