//! The two text formats `/metrics` speaks, and which one a scraper gets.
//!
//! `prometheus-client` renders OpenMetrics only: a counter family is named without `_total`
//! (`# TYPE x counter`) while its samples carry it (`x_total`), and the body ends in `# EOF`.
//! Served under the classic content type, a classic parser (Prometheus when it negotiates
//! `text/plain`, Python's `prometheus_client`) matches samples to families by exact name and so
//! reads every counter as untyped. The classic body is therefore derived from the OpenMetrics
//! one: counter families take their samples' `_total` name, and the OpenMetrics-only lines
//! (`# UNIT`, `# EOF`) go. Sample lines and values are the same in both formats.

use std::collections::HashMap;

/// A text exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0: `_total` samples under `# TYPE x counter`, `# UNIT`, `# EOF`.
    OpenMetrics,
    /// Prometheus text format 0.0.4: counter families named like their `_total` samples.
    Classic,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The format to answer a scrape with, from its `Accept` header: OpenMetrics when the scraper
/// names `application/openmetrics-text` and prefers it at least as much as the classic format
/// (Prometheus sends `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`),
/// the classic format otherwise, including when there is no header or nothing we speak is
/// acceptable (as Prometheus' own client libraries do: a scrape is better than a 406).
pub fn negotiate(accept: Option<&str>) -> Format {
    let Some(accept) = accept else {
        return Format::Classic;
    };
    let mut openmetrics: f32 = 0.0;
    let mut classic: f32 = 0.0;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|param| param.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, value)| value.trim().parse::<f32>().ok())
            .unwrap_or(1.0)
            .clamp(0.0, 1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => classic = classic.max(q),
            _ => {}
        }
    }
    if openmetrics > 0.0 && openmetrics >= classic {
        Format::OpenMetrics
    } else {
        Format::Classic
    }
}

/// The classic-format body for an OpenMetrics body rendered by `prometheus-client`.
///
/// Per family: a counter's `# HELP`/`# TYPE` take the `_total` name its samples have; an info
/// family becomes a gauge named like its `_info` samples (classic has no info type); `unknown`
/// is spelled `untyped`; `_created` samples (classic has no place for them) and exemplars are
/// dropped, as are `# UNIT` and `# EOF`.
pub fn to_classic(openmetrics: &str) -> String {
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + openmetrics.len() / 16);
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, _) = classic_family(name, types.get(name).copied().unwrap_or("unknown"));
            out.push_str("# HELP ");
            out.push_str(&name);
            if !help.is_empty() {
                out.push(' ');
                out.push_str(help);
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = classic_family(name, kind);
            out.push_str("# TYPE ");
            out.push_str(&name);
            out.push(' ');
            out.push_str(kind);
        } else if line.starts_with('#') || line.is_empty() {
            // `# UNIT`, `# EOF`: OpenMetrics only.
            continue;
        } else {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            if line[..name_end].ends_with("_created") {
                continue;
            }
            // An exemplar follows the value after ` # `; label values may contain that too.
            let value_start = labels_end(line, name_end);
            let sample = match line[value_start..].find(" # ") {
                Some(at) => &line[..value_start + at],
                None => line,
            };
            out.push_str(sample);
        }
        out.push('\n');
    }
    out
}

/// Where a sample line's label set (starting at `from`, if there is one) ends: past the `}`
/// that closes it, quotes and escapes inside label values respected.
fn labels_end(line: &str, from: usize) -> usize {
    if !line[from..].starts_with('{') {
        return from;
    }
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in line[from..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return from + at + 1,
            _ => {}
        }
    }
    line.len()
}

/// A family's classic name and type, from its OpenMetrics name and type.
fn classic_family(name: &str, kind: &str) -> (String, &'static str) {
    match kind {
        "counter" => (format!("{name}_total"), "counter"),
        "info" => (format!("{name}_info"), "gauge"),
        "gauge" => (name.to_string(), "gauge"),
        "histogram" => (name.to_string(), "histogram"),
        "summary" => (name.to_string(), "summary"),
        _ => (name.to_string(), "untyped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_the_classic_format() {
        assert_eq!(negotiate(Some(PROMETHEUS_ACCEPT)), Format::OpenMetrics);
        assert_eq!(
            negotiate(Some(
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            )),
            Format::OpenMetrics
        );
        assert_eq!(negotiate(None), Format::Classic);
        assert_eq!(negotiate(Some("*/*")), Format::Classic);
        assert_eq!(negotiate(Some("text/plain;version=0.0.4")), Format::Classic);
        assert_eq!(negotiate(Some("application/json")), Format::Classic);
        assert_eq!(negotiate(Some("")), Format::Classic);
        // Preferences are honoured both ways.
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0.2, text/plain")),
            Format::Classic
        );
        assert_eq!(
            negotiate(Some(
                "text/plain;q=0.3, APPLICATION/OpenMetrics-Text ; q=0.9"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=0")),
            Format::Classic
        );
        assert_eq!(
            negotiate(Some("application/openmetrics-text;q=oops")),
            Format::OpenMetrics
        );
    }

    const OPENMETRICS: &str = "\
# HELP app_calls Calls.
# TYPE app_calls counter
app_calls_total{status=\"OK\"} 3
app_calls_created{status=\"OK\"} 1700000000.0
# HELP app_up Up.
# TYPE app_up gauge
app_up 1
# HELP app_latency_seconds Latency.
# TYPE app_latency_seconds histogram
# UNIT app_latency_seconds seconds
app_latency_seconds_sum 0.5
app_latency_seconds_count 2
app_latency_seconds_bucket{le=\"0.1\"} 1
app_latency_seconds_bucket{le=\"+Inf\"} 2
# HELP app_build Build.
# TYPE app_build info
app_build_info{version=\"1\"} 1
# HELP app_bytes Bytes.
# TYPE app_bytes counter
app_bytes_total 7 # {trace_id=\"a\"} 1.0
# EOF
";

    #[test]
    fn classic_counters_are_named_like_their_samples_and_openmetrics_lines_go() {
        let classic = to_classic(OPENMETRICS);
        assert_eq!(
            classic,
            "\
# HELP app_calls_total Calls.
# TYPE app_calls_total counter
app_calls_total{status=\"OK\"} 3
# HELP app_up Up.
# TYPE app_up gauge
app_up 1
# HELP app_latency_seconds Latency.
# TYPE app_latency_seconds histogram
app_latency_seconds_sum 0.5
app_latency_seconds_count 2
app_latency_seconds_bucket{le=\"0.1\"} 1
app_latency_seconds_bucket{le=\"+Inf\"} 2
# HELP app_build_info Build.
# TYPE app_build_info gauge
app_build_info{version=\"1\"} 1
# HELP app_bytes_total Bytes.
# TYPE app_bytes_total counter
app_bytes_total 7
"
        );
    }

    #[test]
    fn label_values_that_look_like_comments_or_suffixes_are_left_alone() {
        let text = "# HELP x X.\n# TYPE x counter\nx_total{path=\"/a # {b} _created\"} 1\n# EOF\n";
        assert_eq!(
            to_classic(text),
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{path=\"/a # {b} _created\"} 1\n"
        );
    }
}
