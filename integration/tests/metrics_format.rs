//! `/metrics` parses with the parser its content type names, checked with an independent
//! implementation (Python's `prometheus_client`): OpenMetrics when the scraper asks for it (as
//! Prometheus does), the classic text format otherwise, with counters typed `counter` in both.
//! Needs `pip install prometheus_client`; a missing module fails the test rather than skipping it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::harness::{within, Pipeline};
use integration::pb::EchoRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(30);
const CALLS: usize = 12;
/// What Prometheus (2.x and 3.x without native histograms) sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Parses stdin with the parser named in argv[1] and prints each family's type and samples.
const PARSE: &str = r#"
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families as classic
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
parse = openmetrics if sys.argv[1] == "openmetrics" else classic
families = {}
for family in parse(sys.stdin.read()):
    families[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value if math.isfinite(s.value) else str(s.value)]
                    for s in family.samples],
    }
print(json.dumps(families))
"#;

/// GET /metrics with an optional `Accept`; returns the response's headers (lower-cased names)
/// and body.
async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (BTreeMap<String, String>, String) {
    within(LIMIT, "GET /metrics", async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let text = String::from_utf8(response).expect("UTF-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        (headers, body.to_string())
    })
    .await
}

/// Family name → (type, samples as `[name, labels, value]`), as Python's parser reads `body`.
fn python_parse(parser: &str, body: &str) -> BTreeMap<String, serde_json::Value> {
    let mut child = Command::new("python3")
        .args(["-c", PARSE, parser])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is not available ({e}): install Python 3"));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(body.as_bytes()).expect("write to python");
    }
    let output = child.wait_with_output().expect("python3 ran");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named 'prometheus_client'"),
        "run `pip install prometheus_client` (integration/run-tests.sh does)"
    );
    assert!(
        output.status.success(),
        "the {parser} parser rejected the body:\n{stderr}\n--- body ---\n{body}"
    );
    serde_json::from_slice(&output.stdout).expect("parser output is JSON")
}

fn family_type(families: &BTreeMap<String, serde_json::Value>, name: &str) -> String {
    families
        .get(name)
        .unwrap_or_else(|| panic!("no family {name}: {:?}", families.keys()))["type"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The sum of `family`'s samples named `sample` whose labels include every `(name, value)`.
fn sum(
    families: &BTreeMap<String, serde_json::Value>,
    family: &str,
    sample: &str,
    labels: &[(&str, &str)],
) -> f64 {
    families[family]["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .filter(|s| s[0] == sample)
        .filter(|s| labels.iter().all(|(k, v)| s[1][*k] == *v))
        .map(|s| s[2].as_f64().unwrap_or(0.0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_formats_parse_with_their_own_parser_and_counters_are_counters() {
    let pipeline = Pipeline::start().await;
    let mut client = pipeline.client().await;
    for _ in 0..CALLS {
        within(LIMIT, "unary call", client.unary(EchoRequest::default()))
            .await
            .expect("unary call");
    }
    let admin = pipeline.client.admin_addr();

    // Classic: no Accept (curl, most tools), or one that prefers text/plain.
    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (headers, body) = scrape(admin, accept).await;
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "Accept {accept:?}"
        );
        assert!(!body.contains("# EOF"), "classic bodies have no # EOF");
        assert!(!body.contains("# UNIT"), "classic bodies have no # UNIT");
    }
    let (_, classic_body) = scrape(admin, None).await;
    let classic = python_parse("classic", &classic_body);

    // OpenMetrics: what Prometheus asks for.
    let (headers, om_body) = scrape(admin, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(
        headers.get("vary").map(String::as_str),
        Some("accept"),
        "caches must keep the formats apart"
    );
    assert!(om_body.ends_with("# EOF\n"), "{om_body}");
    let openmetrics = python_parse("openmetrics", &om_body);

    for (format, families) in [("classic", &classic), ("openmetrics", &openmetrics)] {
        for counter in [
            "locality_sidecar_calls",
            "locality_sidecar_attempts",
            "locality_sidecar_retries",
            "locality_sidecar_fallthroughs",
            "locality_sidecar_quic_connections_opened",
            "locality_sidecar_config_reloads",
        ] {
            assert_eq!(
                family_type(families, counter),
                "counter",
                "{format}: {counter}"
            );
        }
        assert_eq!(
            family_type(families, "locality_sidecar_call_duration_seconds"),
            "histogram",
            "{format}"
        );
        assert_eq!(
            family_type(families, "locality_sidecar_endpoints"),
            "gauge",
            "{format}"
        );
        let untyped: Vec<&String> = families
            .iter()
            .filter(|(_, family)| {
                !["counter", "gauge", "histogram"]
                    .contains(&family["type"].as_str().unwrap_or_default())
            })
            .map(|(name, _)| name)
            .collect();
        assert!(
            untyped.is_empty(),
            "{format}: families without a type: {untyped:?}"
        );
        assert_eq!(
            sum(
                families,
                "locality_sidecar_calls",
                "locality_sidecar_calls_total",
                &[("status", "OK")]
            ),
            CALLS as f64,
            "{format}"
        );
        assert_eq!(
            sum(
                families,
                "locality_sidecar_call_duration_seconds",
                "locality_sidecar_call_duration_seconds_count",
                &[("upstream", "echo")]
            ),
            CALLS as f64,
            "{format}"
        );
    }
    // One registry, two spellings: the same families with the same types.
    let types = |families: &BTreeMap<String, serde_json::Value>| -> BTreeMap<String, String> {
        families
            .iter()
            .map(|(name, family)| {
                (
                    name.clone(),
                    family["type"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(types(&classic), types(&openmetrics));
}
