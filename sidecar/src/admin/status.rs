//! `/status.json`, what the status page at `/` shows: per upstream its ranked endpoints (the
//! `/endpoints` snapshot, whatever fields it has) with call statistics read back from the
//! metrics, plus the config in force and certificate expiry.
//!
//! The statistics come from the rendered exposition rather than from the metric handles: that
//! text is the one public view of every family (including ones added later, which then show up
//! under "series" without changes here), and reading it keeps the page's numbers identical to
//! what Prometheus would scrape. Every figure is since the process started; the page derives
//! rates from successive refreshes.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

/// Metric names as rendered, without the common prefix.
const PREFIX: &str = "locality_sidecar_";

/// One sample line of a text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// The samples of a text exposition (OpenMetrics or classic); comments and lines that do not
/// parse are skipped.
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let (labels, rest) = match line[name_end..].strip_prefix('{') {
        Some(inner) => parse_labels(inner)?,
        None => (Vec::new(), &line[name_end..]),
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A label set after its `{`: the labels, and the text after its `}`. Values are quoted, with
/// `\\`, `\"` and `\n` escapes.
fn parse_labels(inner: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = inner;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (at, '"') => break at,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, other) => value.push(other),
            }
        };
        labels.push((key, value));
        rest = &rest[end + 1..];
    }
}

/// The `q` quantile (0..=1) of a cumulative histogram given as `(upper bound, count)` buckets,
/// interpolated linearly within the bucket as Prometheus' `histogram_quantile` does. `None`
/// without observations. A quantile in the `+Inf` bucket is reported as the highest finite
/// bound (all that is known is "above it").
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(bound, count) in &buckets {
        if count >= rank && count > below {
            if bound.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (bound - lower) * (rank - below) / (count - below));
        }
        lower = bound;
        below = count;
    }
    Some(lower)
}

fn sum<'a>(samples: impl Iterator<Item = &'a Sample>) -> f64 {
    samples.map(|sample| sample.value).sum()
}

/// `name`'s samples summed per value of `label`.
fn by_label<'a>(samples: impl Iterator<Item = &'a Sample>, label: &str) -> BTreeMap<String, f64> {
    let mut totals = BTreeMap::new();
    for sample in samples {
        let key = sample.label(label).unwrap_or("").to_string();
        *totals.entry(key).or_insert(0.0) += sample.value;
    }
    totals
}

/// Call statistics of one upstream, since start.
pub fn upstream_stats(samples: &[Sample], upstream: &str) -> Value {
    let of = |name: &'static str| {
        let full = format!("{PREFIX}{name}");
        samples
            .iter()
            .filter(move |sample| sample.name == full && sample.label("upstream") == Some(upstream))
    };
    let calls = sum(of("calls_total"));
    let ok = sum(of("calls_total").filter(|sample| sample.label("status") == Some("OK")));
    let mut buckets: BTreeMap<String, f64> = BTreeMap::new();
    for sample in of("call_duration_seconds_bucket") {
        if let Some(le) = sample.label("le") {
            *buckets.entry(le.to_string()).or_insert(0.0) += sample.value;
        }
    }
    let buckets: Vec<(f64, f64)> = buckets
        .into_iter()
        .filter_map(|(le, count)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, count))
        })
        .collect();
    let latency: Map<String, Value> = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)]
        .into_iter()
        .filter_map(|(name, q)| Some((name.to_string(), json!(quantile(&buckets, q)?))))
        .collect();
    json!({
        "calls": calls,
        "callsByTier": by_label(of("calls_total"), "tier"),
        "callsByStatus": by_label(of("calls_total"), "status"),
        "successRate": (calls > 0.0).then(|| ok / calls),
        "latencySeconds": latency,
        "attemptsByTier": by_label(of("attempts_total"), "tier"),
        "retries": sum(of("retries_total")),
        "transparentRetries": sum(of("transparent_retries_total")),
        "retriesThrottled": sum(of("retries_throttled_total")),
        "fallthroughs": sum(of("fallthroughs_total")),
        "fallthroughsByTier": by_label(of("fallthroughs_total"), "tier"),
        "hedges": sum(of("hedges_total")),
        "hedgesWon": sum(of("hedges_won_total")),
        "ejections": sum(of("ejections_total")),
        "series": series(samples, Some(upstream)),
    })
}

/// Every series of an upstream (`Some`) or of the process (`None`: samples without an
/// `upstream` label), summed over `method` (up to 500 values) and without histogram buckets:
/// a generic view in which metrics added later appear by themselves.
pub fn series(samples: &[Sample], upstream: Option<&str>) -> BTreeMap<String, f64> {
    let histograms: BTreeSet<&str> = samples
        .iter()
        .filter_map(|sample| sample.name.strip_suffix("_bucket"))
        .collect();
    let is_histogram_part = |name: &str| {
        ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|family| histograms.contains(family))
            })
    };
    let mut totals = BTreeMap::new();
    for sample in samples {
        if sample.label("upstream") != upstream || is_histogram_part(&sample.name) {
            continue;
        }
        let name = sample.name.strip_prefix(PREFIX).unwrap_or(&sample.name);
        let labels: Vec<String> = sample
            .labels
            .iter()
            .filter(|(key, _)| key != "upstream" && key != "method")
            .map(|(key, value)| format!("{key}={value:?}"))
            .collect();
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        *totals.entry(key).or_insert(0.0) += sample.value;
    }
    totals
}

/// Certificate expiry from any metric whose name has `cert` and `expir` in it: a value above
/// 10^9 is read as a Unix time, anything else as seconds left (negative once expired).
pub fn certificates(samples: &[Sample], now_unix: f64) -> Vec<Value> {
    samples
        .iter()
        .filter(|sample| {
            let name = sample.name.to_ascii_lowercase();
            name.contains("cert") && name.contains("expir")
        })
        .map(|sample| {
            let (expires_at, seconds_left) = if sample.value > 1e9 {
                (sample.value, sample.value - now_unix)
            } else {
                (now_unix + sample.value, sample.value)
            };
            let labels: Map<String, Value> = sample
                .labels
                .iter()
                .map(|(key, value)| (key.clone(), json!(value)))
                .collect();
            json!({
                "metric": sample.name,
                "labels": labels,
                "expiresAtUnix": expires_at,
                "secondsLeft": seconds_left,
            })
        })
        .collect()
}

/// The config in force: its version counts the live changes applied since start (1 = the
/// config the process started with), and its fingerprint identifies the live policy's content,
/// the same on every pod running the same binary with the same policy.
pub fn config(samples: &[Sample], policy: &crate::config::live::LivePolicy) -> Value {
    let reloads = |result: &str| {
        sum(samples.iter().filter(|sample| {
            sample.name == format!("{PREFIX}config_reloads_total")
                && sample.label("result") == Some(result)
        }))
    };
    let applied = reloads("applied");
    json!({
        "version": 1.0 + applied,
        "liveChangesApplied": applied,
        "rejected": reloads("rejected"),
        "fingerprint": fingerprint(&format!("{policy:?}")),
    })
}

/// FNV-1a (64 bits) as 16 hex digits: stable across processes, unlike std's seeded hasher.
fn fingerprint(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP locality_sidecar_calls Calls.
# TYPE locality_sidecar_calls counter
locality_sidecar_calls_total{upstream="echo",method="/echo.Echo/Unary",status="OK",tier="node"} 6
locality_sidecar_calls_total{upstream="echo",method="/echo.Echo/Unary",status="OK",tier="zone"} 2
locality_sidecar_calls_total{upstream="echo",method="/echo.Echo/Other",status="UNAVAILABLE",tier="any"} 2
locality_sidecar_calls_total{upstream="other",method="/x",status="OK",tier="node"} 100
locality_sidecar_retries_total{upstream="echo"} 3
locality_sidecar_fallthroughs_total{upstream="echo",tier="zone"} 1
locality_sidecar_fallthroughs_total{upstream="echo",tier="any"} 2
locality_sidecar_call_duration_seconds_sum{upstream="echo"} 0.1
locality_sidecar_call_duration_seconds_count{upstream="echo"} 10
locality_sidecar_call_duration_seconds_bucket{le="0.001",upstream="echo"} 5
locality_sidecar_call_duration_seconds_bucket{le="0.002",upstream="echo"} 9
locality_sidecar_call_duration_seconds_bucket{le="+Inf",upstream="echo"} 10
locality_sidecar_config_reloads_total{source="file",result="applied"} 2
locality_sidecar_config_reloads_total{source="configmap",result="rejected"} 1
locality_sidecar_tls_cert_expiry_seconds 86400.5
locality_sidecar_odd{upstream="echo",path="a \"q\" \\ b\nc"} 1
# EOF
"#;

    #[test]
    fn samples_parse_with_escaped_label_values() {
        let samples = parse_samples(TEXT);
        assert_eq!(samples.len(), 16);
        let odd = samples
            .iter()
            .find(|s| s.name == "locality_sidecar_odd")
            .unwrap();
        assert_eq!(odd.label("path"), Some("a \"q\" \\ b\nc"));
        assert_eq!(odd.value, 1.0);
        assert!(parse_sample("x{a=\"unterminated} 1").is_none());
        assert!(parse_sample("x notanumber").is_none());
        assert_eq!(parse_sample("x +Inf").unwrap().value, f64::INFINITY);
    }

    #[test]
    fn an_upstreams_stats_count_only_its_own_calls() {
        let stats = upstream_stats(&parse_samples(TEXT), "echo");
        assert_eq!(stats["calls"], 10.0);
        assert_eq!(stats["callsByTier"]["node"], 6.0);
        assert_eq!(stats["callsByTier"]["zone"], 2.0);
        assert_eq!(stats["callsByStatus"]["UNAVAILABLE"], 2.0);
        assert_eq!(stats["successRate"], 0.8);
        assert_eq!(stats["retries"], 3.0);
        assert_eq!(stats["fallthroughs"], 3.0);
        assert_eq!(stats["latencySeconds"]["p50"], 0.001);
        assert_eq!(stats["series"]["retries_total"], 3.0);
        assert_eq!(
            stats["series"]["calls_total{status=\"OK\",tier=\"node\"}"],
            6.0
        );
        assert!(stats["series"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("call_duration")));
        let idle = upstream_stats(&parse_samples(TEXT), "idle");
        assert_eq!(idle["calls"], 0.0);
        assert_eq!(idle["successRate"], Value::Null);
        assert_eq!(idle["latencySeconds"], json!({}));
    }

    #[test]
    fn quantiles_interpolate_within_buckets_like_prometheus() {
        let buckets = [(0.001, 5.0), (0.002, 9.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(&buckets, 0.5), Some(0.001));
        let p90 = quantile(&buckets, 0.9).unwrap();
        assert!((p90 - 0.002).abs() < 1e-12, "{p90}");
        let p70 = quantile(&buckets, 0.7).unwrap();
        assert!((p70 - 0.0015).abs() < 1e-12, "{p70}");
        // In the +Inf bucket: the highest finite bound.
        assert_eq!(quantile(&buckets, 0.99), Some(0.002));
        assert_eq!(quantile(&[(0.001, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        assert_eq!(quantile(&[], 0.5), None);
        // Empty leading buckets do not pull the estimate to zero.
        let late = [
            (0.001, 0.0),
            (0.002, 0.0),
            (0.004, 4.0),
            (f64::INFINITY, 4.0),
        ];
        assert_eq!(quantile(&late, 0.5), Some(0.003));
    }

    #[test]
    fn certificate_expiry_is_read_as_seconds_left_or_a_unix_time() {
        let now = 1_800_000_000.0;
        let certs = certificates(&parse_samples(TEXT), now);
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0]["secondsLeft"], 86400.5);
        assert_eq!(certs[0]["expiresAtUnix"], now + 86400.5);
        let stamp = parse_samples(
            "my_certificate_expiration_timestamp_seconds{name=\"peer\"} 1800003600\n",
        );
        let certs = certificates(&stamp, now);
        assert_eq!(certs[0]["secondsLeft"], 3600.0);
        assert_eq!(certs[0]["labels"]["name"], "peer");
        assert!(certificates(&parse_samples("locality_sidecar_calls_total 1\n"), now).is_empty());
    }

    #[test]
    fn the_config_version_counts_applied_changes_and_the_fingerprint_follows_content() {
        let started = crate::config::Config::default();
        let policy = crate::config::live::LivePolicy::from_config(&started);
        let config = config(&parse_samples(TEXT), &policy);
        assert_eq!(config["version"], 3.0);
        assert_eq!(config["rejected"], 1.0);
        let again = super::config(&[], &policy);
        assert_eq!(again["fingerprint"], config["fingerprint"]);
        assert_eq!(again["version"], 1.0);
        let retrying = crate::config::Config::parse(
            "serviceConfig: {methodConfig: [{name: [{}], timeout: 2s}]}\n",
            "test",
        )
        .expect("a valid config");
        let other = crate::config::live::LivePolicy::from_config(&retrying);
        assert_ne!(
            super::config(&[], &other)["fingerprint"],
            config["fingerprint"]
        );
        assert_eq!(fingerprint(""), "cbf29ce484222325");
    }
}
