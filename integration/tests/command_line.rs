//! The `check-config` command as a user runs it: exit status and what it prints. A bad config
//! gets exit 1 and exactly one line naming the field path, what was expected and what was
//! found; a good one exits 0.

use std::process::Command;

use integration::harness::sidecar_binary;

/// Runs `locality-sidecar check-config FILE` on `config`; returns (exit code, stdout, stderr).
fn check_config(config: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, config).unwrap();
    let output = Command::new(sidecar_binary())
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("run locality-sidecar check-config");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const GOOD: &str = "\
outbound:
  - listen: 127.0.0.1:7001
    name: echo
    endpoints: [{address: '127.0.0.2:15443', node: node-a, zone: z1}]
serviceConfig:
  methodConfig:
    - name: [{service: echo.Echo}]
      timeout: 5s
      retryPolicy:
        maxAttempts: 4
        initialBackoff: 0.05s
        maxBackoff: 1s
        backoffMultiplier: 2
        retryableStatusCodes: [UNAVAILABLE]
tls: {ca: /certs/ca.crt, cert: /certs/tls.crt, key: /certs/tls.key}
";

#[test]
fn a_valid_config_passes_with_exit_0() {
    let (code, stdout, stderr) = check_config(GOOD);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
}

#[test]
fn an_invalid_field_gets_exit_1_and_one_line_naming_its_path() {
    for (bad, path, found) in [
        (
            GOOD.replace("maxAttempts: 4", "maxAttempts: 1"),
            "serviceConfig.methodConfig[0].retryPolicy.maxAttempts",
            "1",
        ),
        (
            GOOD.replace("initialBackoff: 0.05s", "initialBackoff: soon"),
            "serviceConfig.methodConfig[0].retryPolicy.initialBackoff",
            "soon",
        ),
        (
            GOOD.replace("listen: 127.0.0.1:7001", "listen: 0.0.0.0:7001"),
            "outbound[0].listen",
            "0.0.0.0",
        ),
    ] {
        let (code, stdout, stderr) = check_config(&bad);
        assert_eq!(code, Some(1), "{path}: stdout: {stdout}\nstderr: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{path}: one error line, got: {stderr}");
        assert!(lines[0].contains(path), "{path} not named: {}", lines[0]);
        assert!(
            lines[0].contains(found),
            "what was found ({found}) not named: {}",
            lines[0]
        );
        assert!(
            !stderr.contains("panicked"),
            "check-config panicked: {stderr}"
        );
    }
}

#[test]
fn a_missing_file_gets_exit_1_and_one_line() {
    let output = Command::new(sidecar_binary())
        .arg("check-config")
        .arg("/nonexistent/locality-sidecar.yaml")
        .output()
        .expect("run locality-sidecar check-config");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line, got: {stderr}");
    assert!(
        lines[0].contains("/nonexistent/locality-sidecar.yaml"),
        "{}",
        lines[0]
    );
}
