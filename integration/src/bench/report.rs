//! Results and their three renderings: the terminal table, the JSON file and the SVG latency
//! plot (hand-written SVG, so the build needs no plotting or font crates).

use std::{fmt::Write as _, time::Duration};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::procs::SetupKind;

/// Percentiles shown in the table and the JSON.
pub const PERCENTILES: [(f64, &str); 4] =
    [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")];

/// A histogram of nanoseconds from 1 ns to an hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// What happened to one setup in one scenario.
#[derive(Debug)]
pub enum Status {
    Ran,
    /// The proxy is not installed here; the column stays, saying so.
    NotInstalled,
    Failed(String),
}

/// One proxy process's figures over a scenario.
#[derive(Debug, Clone)]
pub struct SideResult {
    pub name: &'static str,
    /// CPU seconds spent inside the measured windows.
    pub cpu_seconds: f64,
    /// Resident memory right after start (first round's processes).
    pub idle_rss: u64,
    /// Highest resident memory over the scenario (VmHWM, warm-ups included).
    pub peak_rss: u64,
    /// Streams scenario: resident memory with every idle stream open (highest over rounds).
    pub rss_streams_open: Option<u64>,
}

/// One setup in one scenario, all rounds merged.
#[derive(Debug)]
pub struct SetupResult {
    pub kind: SetupKind,
    pub status: Status,
    pub histogram: Histogram<u64>,
    pub calls: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub measured: Duration,
    pub sides: Vec<SideResult>,
    /// CPU seconds of the echo server and of this load generator in the measured windows.
    pub echo_cpu: f64,
    pub loadgen_cpu: f64,
    /// Open loop: mean lateness of call starts against the schedule.
    pub start_lag: Vec<Duration>,
    /// Server stream: each round's time for the whole stream.
    pub stream_times: Vec<Duration>,
}

impl SetupResult {
    pub fn new(kind: SetupKind, status: Status) -> SetupResult {
        SetupResult {
            kind,
            status,
            histogram: new_histogram(),
            calls: 0,
            errors: 0,
            first_error: None,
            measured: Duration::ZERO,
            sides: Vec::new(),
            echo_cpu: 0.0,
            loadgen_cpu: 0.0,
            start_lag: Vec::new(),
            stream_times: Vec::new(),
        }
    }

    pub fn ran(&self) -> bool {
        matches!(self.status, Status::Ran) && self.calls > 0
    }

    /// Calls (or messages) per second over the measured windows.
    pub fn throughput(&self) -> f64 {
        if self.measured.is_zero() {
            0.0
        } else {
            self.calls as f64 / self.measured.as_secs_f64()
        }
    }

    pub fn percentile_ns(&self, p: f64) -> u64 {
        self.histogram.value_at_percentile(p)
    }

    /// CPU seconds per 1,000 calls of all proxy sides together.
    pub fn cpu_per_1k(&self) -> Option<f64> {
        (!self.sides.is_empty() && self.calls > 0).then(|| {
            self.sides.iter().map(|s| s.cpu_seconds).sum::<f64>() / self.calls as f64 * 1000.0
        })
    }

    fn side_cpu_per_1k(&self, side: &SideResult) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            side.cpu_seconds / self.calls as f64 * 1000.0
        }
    }
}

/// Which load a scenario puts on each setup.
#[derive(Debug, Clone)]
pub enum Load {
    Closed {
        concurrency: usize,
        size: usize,
    },
    /// The same closed loop, driven by h2load instead of this process (`h2load.rs`).
    H2load {
        concurrency: usize,
        size: usize,
    },
    Open {
        size: usize,
        fraction: f64,
    },
    Stream {
        messages: u64,
        size: usize,
    },
    Streams {
        idle: usize,
        busy: usize,
        size: usize,
    },
}

/// What the calls crossed between the client side and the server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Everything on this machine's loopback.
    Loopback,
    /// A veth link to a network namespace, nothing dropped.
    Clean,
    /// The same link with this many packets in 1,000 dropped at random, each way.
    Lossy { per_mille: u32 },
}

impl Link {
    pub fn label(self) -> String {
        match self {
            Link::Loopback => "loopback".into(),
            Link::Clean => "clean link".into(),
            Link::Lossy { per_mille } => format!("{} loss", fmt_per_mille(per_mille)),
        }
    }
}

/// Thousandths as a percentage: 10 → "1%", 5 → "0.5%".
pub fn fmt_per_mille(per_mille: u32) -> String {
    if per_mille % 10 == 0 {
        format!("{}%", per_mille / 10)
    } else {
        format!("{}%", per_mille as f64 / 10.0)
    }
}

/// A scenario's definition and what every setup did in it.
#[derive(Debug)]
pub struct ScenarioResult {
    pub name: String,
    pub about: String,
    pub load: Load,
    /// Open loop: the rate used, calls/s.
    pub rate: Option<f64>,
    pub rate_source: Option<String>,
    pub link: Link,
    /// Lossy link: the name of the same scenario's results on the clean link (same processes,
    /// same run), which "throughput kept" compares against.
    pub clean_counterpart: Option<String>,
    /// `/proc/loadavg` when the scenario started: the machine is shared.
    pub load_at_start: Option<String>,
    pub setups: Vec<SetupResult>,
}

impl ScenarioResult {
    pub fn setup(&self, kind: SetupKind) -> Option<&SetupResult> {
        self.setups.iter().find(|s| s.kind == kind && s.ran())
    }

    fn unit(&self) -> &'static str {
        match self.load {
            Load::Stream { .. } => "msgs/s",
            _ => "calls/s",
        }
    }

    fn per_what(&self) -> &'static str {
        match self.load {
            Load::Stream { .. } => "1k msgs",
            _ => "1k calls",
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub fn fmt_ns(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e4 {
        format!("{:.2}µs", ns / 1e3)
    } else if ns < 1e6 {
        format!("{:.0}µs", ns / 1e3)
    } else if ns < 1e7 {
        format!("{:.2}ms", ns / 1e6)
    } else if ns < 1e9 {
        format!("{:.1}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

/// Three significant digits at most: CPU per 1,000 calls spans 0.05 to 500 ms.
fn fmt_sig(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

pub fn fmt_mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn fmt_rate(rate: f64) -> String {
    let whole = rate.round() as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn status_text(result: &SetupResult) -> Option<String> {
    match &result.status {
        Status::NotInstalled => Some("not installed".into()),
        Status::Failed(why) => Some(format!(
            "FAILED: {}",
            why.split_whitespace().collect::<Vec<_>>().join(" ")
        )),
        Status::Ran if result.calls == 0 => Some(format!(
            "no successful call ({} errors{})",
            result.errors,
            result
                .first_error
                .as_deref()
                .map(|e| format!(", first: {e}"))
                .unwrap_or_default()
        )),
        Status::Ran => None,
    }
}

/// The ratio sidecar/other, as text.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "-".into()
    }
}

/// Comparison lines: the sidecar against each other setup that ran.
pub fn ratio_lines(scenario: &ScenarioResult) -> Vec<String> {
    let Some(sidecar) = scenario.setup(SetupKind::Sidecar) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for other_kind in [SetupKind::Direct, SetupKind::Haproxy, SetupKind::Nginx] {
        let Some(other) = scenario.setup(other_kind) else {
            if scenario.setups.iter().any(|s| s.kind == other_kind) {
                lines.push(format!("sidecar/{}: no figures", other_kind.name()));
            }
            continue;
        };
        let p50 = (sidecar.percentile_ns(50.0), other.percentile_ns(50.0));
        let p99 = (sidecar.percentile_ns(99.0), other.percentile_ns(99.0));
        let mut line = format!(
            "sidecar/{:<7} throughput {}  p50 {} ({}{})  p99 {}",
            other_kind.name(),
            ratio(sidecar.throughput(), other.throughput()),
            ratio(p50.0 as f64, p50.1 as f64),
            if p50.0 >= p50.1 { "+" } else { "-" },
            fmt_ns(p50.0.abs_diff(p50.1)),
            ratio(p99.0 as f64, p99.1 as f64),
        );
        if let (Some(a), Some(b)) = (sidecar.cpu_per_1k(), other.cpu_per_1k()) {
            let _ = write!(line, "  proxy CPU/call {}", ratio(a, b));
        }
        lines.push(line);
    }
    lines
}

/// The terminal table for one scenario.
pub fn scenario_table(scenario: &ScenarioResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== {} — {}", scenario.name, scenario.about);
    if scenario.link != Link::Loopback {
        let _ = writeln!(
            out,
            "   link: {}; load average at the scenario's start: {}",
            scenario.link.label(),
            scenario.load_at_start.as_deref().unwrap_or("?")
        );
    }
    if let (Some(rate), Some(source)) = (scenario.rate, &scenario.rate_source) {
        let _ = writeln!(out, "   rate {} calls/s ({source})", fmt_rate(rate));
    }
    if matches!(scenario.load, Load::Stream { .. }) {
        let _ = writeln!(
            out,
            "   latency columns: gaps between consecutive messages of the stream"
        );
    }
    let _ = writeln!(
        out,
        "{:<8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}  {:<26} {:<20}",
        "setup",
        scenario.unit(),
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "errors",
        format!("CPU ms/{} A+B (A/B)", scenario.per_what()),
        match scenario.load {
            Load::Streams { .. } => "RSS MiB A/B open·peak",
            _ => "peak RSS MiB A/B",
        }
    );
    for result in &scenario.setups {
        if let Some(text) = status_text(result) {
            let _ = writeln!(out, "{:<8} {text}", result.kind.name());
            continue;
        }
        let cpu = match result.cpu_per_1k() {
            Some(total) => format!(
                "{} ({})",
                fmt_sig(total * 1000.0),
                result
                    .sides
                    .iter()
                    .map(|s| fmt_sig(result.side_cpu_per_1k(s) * 1000.0))
                    .collect::<Vec<_>>()
                    .join("/")
            ),
            None => "-".into(),
        };
        let rss = if result.sides.is_empty() {
            "-".into()
        } else {
            result
                .sides
                .iter()
                .map(|s| match s.rss_streams_open {
                    Some(open) => format!("{}·{}", fmt_mib(open), fmt_mib(s.peak_rss)),
                    None => fmt_mib(s.peak_rss),
                })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let _ = writeln!(
            out,
            "{:<8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}  {:<26} {:<20}",
            result.kind.name(),
            fmt_rate(result.throughput()),
            fmt_ns(result.percentile_ns(50.0)),
            fmt_ns(result.percentile_ns(90.0)),
            fmt_ns(result.percentile_ns(99.0)),
            fmt_ns(result.percentile_ns(99.9)),
            fmt_ns(result.histogram.max()),
            result.errors,
            cpu,
            rss
        );
        if let Some(error) = &result.first_error {
            let _ = writeln!(out, "{:<8} first error: {error}", "");
        }
        if !result.stream_times.is_empty() {
            let times: Vec<String> = result
                .stream_times
                .iter()
                .map(|t| fmt_ns(nanos(*t)))
                .collect();
            let _ = writeln!(
                out,
                "{:<8} whole-stream time per round: {}",
                "",
                times.join(", ")
            );
        }
    }
    // The rest of the machine, for reading the figures: on a small machine the load generator
    // and the echo server compete with the proxies for the same cores.
    let others: Vec<String> = scenario
        .setups
        .iter()
        .filter(|r| r.ran())
        .map(|r| {
            let per_1k = |cpu: f64| fmt_sig(cpu / r.calls as f64 * 1e6);
            let lag = if r.start_lag.is_empty() {
                String::new()
            } else {
                let mean = r.start_lag.iter().sum::<Duration>() / r.start_lag.len() as u32;
                format!(", start lag {}", fmt_ns(nanos(mean)))
            };
            format!(
                "{} {}/{}{lag}",
                r.kind.name(),
                per_1k(r.loadgen_cpu),
                per_1k(r.echo_cpu)
            )
        })
        .collect();
    if !others.is_empty() {
        let _ = writeln!(
            out,
            "   load generator/echo server CPU ms/{}: {}",
            scenario.per_what(),
            others.join("; ")
        );
    }
    for line in ratio_lines(scenario) {
        let _ = writeln!(out, "   {line}");
    }
    out
}

/// Each setup's throughput on the lossy link as a share of its throughput on the same link
/// clean (same processes, same run): what loss costs each setup.
pub fn kept(lossy: &ScenarioResult, clean: &ScenarioResult, kind: SetupKind) -> Option<f64> {
    let (l, c) = (lossy.setup(kind)?, clean.setup(kind)?);
    (c.throughput() > 0.0).then(|| l.throughput() / c.throughput())
}

/// The "throughput kept" lines printed under a lossy scenario's table.
pub fn kept_lines(lossy: &ScenarioResult, clean: &ScenarioResult) -> Vec<String> {
    SetupKind::ALL
        .into_iter()
        .filter_map(|kind| {
            let share = kept(lossy, clean, kind)?;
            let (l, c) = (lossy.setup(kind)?, clean.setup(kind)?);
            Some(format!(
                "{:<8} kept {:.0}% of its clean-link throughput ({} vs {} calls/s); p99.9 {} vs {}",
                kind.name(),
                share * 100.0,
                fmt_rate(l.throughput()),
                fmt_rate(c.throughput()),
                fmt_ns(l.percentile_ns(99.9)),
                fmt_ns(c.percentile_ns(99.9)),
            ))
        })
        .collect()
}

fn clean_of<'a>(
    scenarios: &'a [ScenarioResult],
    lossy: &ScenarioResult,
) -> Option<&'a ScenarioResult> {
    let name = lossy.clean_counterpart.as_deref()?;
    scenarios.iter().find(|s| s.name == name)
}

/// The lossy-link results in one table (Markdown, as BENCHMARKS.md shows it): per lossy
/// scenario, latency percentiles, calls/s and throughput kept, one column per setup.
pub fn lossy_summary(scenarios: &[ScenarioResult]) -> String {
    let lossy: Vec<&ScenarioResult> = scenarios
        .iter()
        .filter(|s| matches!(s.link, Link::Lossy { .. }))
        .collect();
    let Some(first) = lossy.first() else {
        return String::new();
    };
    let kinds: Vec<SetupKind> = SetupKind::ALL
        .into_iter()
        .filter(|k| lossy.iter().any(|s| s.setup(*k).is_some()))
        .collect();
    let mut out = format!(
        "\n== lossy link ({} each way), summary\n",
        first.link.label()
    );
    let _ = writeln!(
        out,
        "| | {} |\n|---|{}",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(kinds.len())
    );
    for scenario in lossy {
        let clean = clean_of(scenarios, scenario);
        let cell = |f: &dyn Fn(&SetupResult) -> String| -> String {
            kinds
                .iter()
                .map(|k| scenario.setup(*k).map(f).unwrap_or_else(|| "-".into()))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let _ = writeln!(
            out,
            "| {}: p50 / p99 / p99.9 | {} |",
            scenario.name,
            cell(&|r| format!(
                "{} / {} / {}",
                fmt_ns(r.percentile_ns(50.0)),
                fmt_ns(r.percentile_ns(99.0)),
                fmt_ns(r.percentile_ns(99.9))
            ))
        );
        let _ = writeln!(
            out,
            "| {}: calls/s (clean link) | {} |",
            scenario.name,
            kinds
                .iter()
                .map(
                    |k| match (scenario.setup(*k), clean.and_then(|c| c.setup(*k))) {
                        (Some(l), Some(c)) => format!(
                            "{} ({})",
                            fmt_rate(l.throughput()),
                            fmt_rate(c.throughput())
                        ),
                        (Some(l), None) => fmt_rate(l.throughput()),
                        _ => "-".into(),
                    }
                )
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(
            out,
            "| {}: throughput kept vs clean link | {} |",
            scenario.name,
            kinds
                .iter()
                .map(|k| clean
                    .and_then(|c| kept(scenario, c, *k))
                    .map(|x| format!("{:.0}%", x * 100.0))
                    .unwrap_or_else(|| "-".into()))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(
            out,
            "| {}: calls measured, errors | {} |",
            scenario.name,
            cell(&|r| format!("{}, {}", r.calls, r.errors))
        );
    }
    out
}

/// Idle RSS of each proxy process right after start, from the first scenario that ran it.
pub fn idle_rss_table(scenarios: &[ScenarioResult]) -> String {
    let mut out = String::from("\n== idle RSS right after start (MiB)\n");
    for kind in [SetupKind::Sidecar, SetupKind::Haproxy, SetupKind::Nginx] {
        if let Some(result) = scenarios
            .iter()
            .flat_map(|s| &s.setups)
            .find(|r| r.kind == kind && matches!(r.status, Status::Ran))
        {
            let sides: Vec<String> = result
                .sides
                .iter()
                .map(|s| format!("{} {}", s.name, fmt_mib(s.idle_rss)))
                .collect();
            let _ = writeln!(out, "{:<8} {}", kind.name(), sides.join(", "));
        } else if let Some(result) = scenarios
            .iter()
            .flat_map(|s| &s.setups)
            .find(|r| r.kind == kind)
        {
            let _ = writeln!(
                out,
                "{:<8} {}",
                kind.name(),
                status_text(result).unwrap_or_default()
            );
        }
    }
    out
}

/// A target from the issue and whether this run met it.
pub struct Target {
    pub text: &'static str,
    pub verdict: Option<bool>,
    pub detail: String,
}

const MIB: u64 = 1024 * 1024;

const C1_TONIC: &str = "unary 256 B, c=1 (tonic generator): sidecar p50 ≤ direct p50 + 150 µs and ≤ HAProxy pair's p50, p99 ≤ 2× direct p99";
const C1_H2LOAD: &str = "unary 256 B, c=1 (h2load): sidecar p50 ≤ direct p50 + 150 µs and ≤ HAProxy pair's p50, p99 ≤ 2× direct p99";
const C128_TONIC: &str =
    "unary 256 B, c=128 (tonic generator): sidecar throughput ≥ 1.0× HAProxy pair and ≥ 0.5× direct";
const C128_H2LOAD: &str =
    "unary 256 B, c=128 (h2load): sidecar throughput ≥ 1.0× HAProxy pair and ≥ 0.5× direct";

/// The sidecar's, the direct setup's and HAProxy's results in one scenario, if it ran all three.
fn three_setups(
    scenario: Option<&ScenarioResult>,
) -> Option<(&SetupResult, &SetupResult, &SetupResult)> {
    let s = scenario?;
    Some((
        s.setup(SetupKind::Sidecar)?,
        s.setup(SetupKind::Direct)?,
        s.setup(SetupKind::Haproxy)?,
    ))
}

/// The c=1 latency target, judged on one scenario's results.
fn c1_target(scenario: Option<&ScenarioResult>, name: &str, text: &'static str) -> Target {
    let Some((side, direct, haproxy)) = three_setups(scenario) else {
        return Target {
            text,
            verdict: None,
            detail: format!("needs {name} with direct, sidecar and haproxy"),
        };
    };
    let p50 = |r: &SetupResult| r.percentile_ns(50.0) as i64;
    let added = p50(side) - p50(direct);
    let haproxy_added = p50(haproxy) - p50(direct);
    let p99 = side.percentile_ns(99.0) as f64 / direct.percentile_ns(99.0).max(1) as f64;
    Target {
        text,
        verdict: Some(added <= 150_000 && added <= haproxy_added && p99 <= 2.0),
        detail: format!(
            "p50 {} vs {} (adds {:.0} µs; HAProxy adds {:.0} µs); p99 {} vs {} ({p99:.2}×)",
            fmt_ns(side.percentile_ns(50.0)),
            fmt_ns(direct.percentile_ns(50.0)),
            added as f64 / 1e3,
            haproxy_added as f64 / 1e3,
            fmt_ns(side.percentile_ns(99.0)),
            fmt_ns(direct.percentile_ns(99.0)),
        ),
    }
}

/// The c=128 throughput target, judged on one scenario's results.
fn c128_target(scenario: Option<&ScenarioResult>, name: &str, text: &'static str) -> Target {
    let Some((side, direct, haproxy)) = three_setups(scenario) else {
        return Target {
            text,
            verdict: None,
            detail: format!("needs {name} with direct, sidecar and haproxy"),
        };
    };
    let vs_h = side.throughput() / haproxy.throughput();
    let vs_d = side.throughput() / direct.throughput();
    Target {
        text,
        verdict: Some(vs_h >= 1.0 && vs_d >= 0.5),
        detail: format!(
            "{} calls/s: {vs_h:.2}× haproxy ({}), {vs_d:.2}× direct ({})",
            fmt_rate(side.throughput()),
            fmt_rate(haproxy.throughput()),
            fmt_rate(direct.throughput()),
        ),
    }
}

/// Evaluates the issue's targets against the results; `None` where the run lacks the figures.
pub fn targets(scenarios: &[ScenarioResult]) -> Vec<Target> {
    let find = |name: &str| scenarios.iter().find(|s| s.name == name);
    let mut out = Vec::new();

    for (name, generator) in [
        ("unary-256B-c1", C1_TONIC),
        ("h2load-unary-256B-c1", C1_H2LOAD),
    ] {
        out.push(c1_target(find(name), name, generator));
    }
    for (name, generator) in [
        ("unary-256B-c128", C128_TONIC),
        ("h2load-unary-256B-c128", C128_H2LOAD),
    ] {
        out.push(c128_target(find(name), name, generator));
    }

    let mut t3 = Target {
        text: "each sidecar < 20 MiB RSS idle",
        verdict: None,
        detail: "needs a scenario with the sidecar".into(),
    };
    let idle: Vec<&SideResult> = scenarios
        .iter()
        .filter_map(|s| s.setup(SetupKind::Sidecar))
        .flat_map(|r| &r.sides)
        .collect();
    if !idle.is_empty() {
        let max = idle.iter().map(|s| s.idle_rss).max().unwrap_or(0);
        t3.verdict = Some(max < 20 * MIB);
        t3.detail = format!(
            "largest idle RSS over {} sidecar processes started: {} MiB",
            idle.len(),
            fmt_mib(max)
        );
    }
    out.push(t3);

    let mut t4 = Target {
        text: "each sidecar < 64 MiB RSS with 1,000 concurrent streams",
        verdict: None,
        detail: "needs the streams scenario with the sidecar".into(),
    };
    if let Some(s) = scenarios
        .iter()
        .find(|s| matches!(s.load, Load::Streams { .. }))
    {
        if let (Some(side), Load::Streams { idle, busy, .. }) =
            (s.setup(SetupKind::Sidecar), &s.load)
        {
            let peak = side.sides.iter().map(|x| x.peak_rss).max().unwrap_or(0);
            t4.verdict = Some(peak < 64 * MIB && idle + busy >= 1_000);
            t4.detail = format!(
                "peak RSS with {idle} idle + {busy} busy streams: {}",
                side.sides
                    .iter()
                    .map(|x| format!("{} {} MiB", x.name, fmt_mib(x.peak_rss)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    out.push(t4);

    // Issue 16: loss recovery tuned for pod networks, judged on a 1% lossy link.
    let lossy = |name: &str| find(name).filter(|s| matches!(s.link, Link::Lossy { per_mille: 10 }));
    let mut t5 = Target {
        text: "1% loss each way, unary 256 B, c=1: sidecar p99 < 5 ms and p99.9 < 10 ms",
        verdict: None,
        detail: "needs lossy-unary-256B-c1 with the sidecar at --loss-per-mille 10".into(),
    };
    if let Some(side) = lossy("lossy-unary-256B-c1").and_then(|s| s.setup(SetupKind::Sidecar)) {
        let (p99, p999) = (side.percentile_ns(99.0), side.percentile_ns(99.9));
        t5.verdict = Some(p99 < 5_000_000 && p999 < 10_000_000);
        t5.detail = format!(
            "p99 {}, p99.9 {} over {} calls",
            fmt_ns(p99),
            fmt_ns(p999),
            side.calls
        );
    }
    out.push(t5);

    let mut t6 = Target {
        text: "1% loss each way, unary 256 B, c=64: sidecar keeps ≥ 85% of its no-loss throughput, p99.9 < 10 ms",
        verdict: None,
        detail: "needs lossy-unary-256B-c64 (and its clean counterpart) with the sidecar at --loss-per-mille 10".into(),
    };
    if let Some(s) = lossy("lossy-unary-256B-c64") {
        if let (Some(side), Some(share)) = (
            s.setup(SetupKind::Sidecar),
            clean_of(scenarios, s).and_then(|c| kept(s, c, SetupKind::Sidecar)),
        ) {
            let p999 = side.percentile_ns(99.9);
            t6.verdict = Some(share >= 0.85 && p999 < 10_000_000);
            t6.detail = format!(
                "kept {:.0}% ({} calls/s), p99.9 {} over {} calls",
                share * 100.0,
                fmt_rate(side.throughput()),
                fmt_ns(p999),
                side.calls
            );
        }
    }
    out.push(t6);
    out
}

pub fn targets_text(targets: &[Target]) -> String {
    let mut out = String::from("\n== targets\n");
    for t in targets {
        let verdict = match t.verdict {
            Some(true) => "MET    ",
            Some(false) => "NOT MET",
            None => "n/a    ",
        };
        let _ = writeln!(out, "{verdict} {}\n        {}", t.text, t.detail);
    }
    out
}

/// Where curves start: the median (x = -log10(1 - 0.5)). Below it every setup is flat, and
/// the minimum would only stretch the latency axis.
const CURVE_START: f64 = std::f64::consts::LOG10_2;

/// Percentile curve points (x = -log10(1 - p), latency ns) from p50 up to what the sample
/// count supports: with n samples, percentiles beyond 1 - 1/n are the maximum.
fn curve(result: &SetupResult) -> Vec<(f64, u64)> {
    let n = result.histogram.len().max(1) as f64;
    let x_max = n.log10().clamp(1.0, 5.0);
    let steps = ((x_max - CURVE_START) * 40.0).ceil() as usize;
    (0..=steps)
        .map(|i| {
            let x = CURVE_START + (x_max - CURVE_START) * i as f64 / steps as f64;
            let p = (1.0 - 10f64.powf(-x)) * 100.0;
            (x, result.histogram.value_at_percentile(p))
        })
        .collect()
}

fn setup_json(result: &SetupResult) -> Value {
    let status = match &result.status {
        Status::Ran => "ran".to_owned(),
        Status::NotInstalled => "not installed".to_owned(),
        Status::Failed(why) => format!("failed: {why}"),
    };
    if !matches!(result.status, Status::Ran) {
        return json!({"setup": result.kind.name(), "status": status});
    }
    let mut latency = serde_json::Map::new();
    for (p, name) in PERCENTILES {
        latency.insert(name.to_owned(), json!(result.percentile_ns(p) as f64 / 1e3));
    }
    latency.insert("max".into(), json!(result.histogram.max() as f64 / 1e3));
    latency.insert("mean".into(), json!(result.histogram.mean() / 1e3));
    let sides: Vec<Value> = result
        .sides
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "cpu_seconds": s.cpu_seconds,
                "cpu_ms_per_1000": result.side_cpu_per_1k(s) * 1000.0,
                "idle_rss_bytes": s.idle_rss,
                "peak_rss_bytes": s.peak_rss,
                "rss_streams_open_bytes": s.rss_streams_open,
            })
        })
        .collect();
    json!({
        "setup": result.kind.name(),
        "status": status,
        "calls": result.calls,
        "errors": result.errors,
        "first_error": result.first_error,
        "measured_seconds": result.measured.as_secs_f64(),
        "throughput_per_second": result.throughput(),
        "latency_us": latency,
        "proxy_cpu_ms_per_1000": result.cpu_per_1k().map(|c| c * 1000.0),
        "sides": sides,
        "echo_server_cpu_seconds": result.echo_cpu,
        "load_generator_cpu_seconds": result.loadgen_cpu,
        "open_loop_mean_start_lag_us": (!result.start_lag.is_empty()).then(|| {
            result.start_lag.iter().map(|d| d.as_secs_f64() * 1e6).sum::<f64>()
                / result.start_lag.len() as f64
        }),
        "stream_seconds_per_round": result.stream_times.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "percentile_curve_us": curve(result)
            .into_iter()
            .map(|(x, ns)| json!([100.0 * (1.0 - 10f64.powf(-x)), ns as f64 / 1e3]))
            .collect::<Vec<_>>(),
    })
}

fn ratios_json(scenario: &ScenarioResult) -> Value {
    let mut out = serde_json::Map::new();
    let Some(sidecar) = scenario.setup(SetupKind::Sidecar) else {
        return Value::Object(out);
    };
    for kind in [SetupKind::Direct, SetupKind::Haproxy, SetupKind::Nginx] {
        if let Some(other) = scenario.setup(kind) {
            let r = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
            out.insert(
                format!("sidecar/{}", kind.name()),
                json!({
                    "throughput": r(sidecar.throughput(), other.throughput()),
                    "p50": r(sidecar.percentile_ns(50.0) as f64, other.percentile_ns(50.0) as f64),
                    "p99": r(sidecar.percentile_ns(99.0) as f64, other.percentile_ns(99.0) as f64),
                    "p99.9": r(sidecar.percentile_ns(99.9) as f64, other.percentile_ns(99.9) as f64),
                    "p50_added_us": (sidecar.percentile_ns(50.0) as f64 - other.percentile_ns(50.0) as f64) / 1e3,
                    "proxy_cpu_per_call": match (sidecar.cpu_per_1k(), other.cpu_per_1k()) {
                        (Some(a), Some(b)) => r(a, b),
                        _ => None,
                    },
                }),
            );
        }
    }
    Value::Object(out)
}

pub fn to_json(scenarios: &[ScenarioResult], header: Value, targets: &[Target]) -> Value {
    json!({
        "run": header,
        "scenarios": scenarios.iter().map(|s| json!({
            "name": s.name,
            "about": s.about,
            "load": format!("{:?}", s.load),
            "rate_per_second": s.rate,
            "rate_source": s.rate_source,
            "link": s.link.label(),
            "loss_per_mille": match s.link {
                Link::Lossy { per_mille } => Some(per_mille),
                Link::Clean => Some(0),
                Link::Loopback => None,
            },
            "clean_counterpart": s.clean_counterpart,
            "load_average_at_start": s.load_at_start,
            "throughput_kept": clean_of(scenarios, s).map(|clean| {
                SetupKind::ALL
                    .into_iter()
                    .filter_map(|k| Some((k.name().to_owned(), json!(kept(s, clean, k)?))))
                    .collect::<serde_json::Map<_, _>>()
            }),
            "setups": s.setups.iter().map(setup_json).collect::<Vec<_>>(),
            "ratios": ratios_json(s),
        })).collect::<Vec<_>>(),
        "targets": targets.iter().map(|t| json!({
            "target": t.text,
            "met": t.verdict,
            "detail": t.detail,
        })).collect::<Vec<_>>(),
    })
}

fn color(kind: SetupKind) -> &'static str {
    match kind {
        SetupKind::Direct => "#555555",
        SetupKind::Sidecar => "#1f6fd1",
        SetupKind::Haproxy => "#e07b00",
        SetupKind::Nginx => "#2a9d3a",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Latency ticks on a log axis: 1-2-5 steps per decade within [lo, hi] ns.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if t >= lo && t <= hi {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// The latency plot: one panel per scenario, percentile on the x axis (50, 90, 99, 99.9, ...
/// evenly spaced, i.e. -log10(1 - p)), latency on a log y axis, one line per setup.
pub fn svg(scenarios: &[ScenarioResult], subtitle: &str) -> String {
    let panels: Vec<&ScenarioResult> = scenarios
        .iter()
        .filter(|s| s.setups.iter().any(SetupResult::ran))
        .collect();
    let columns = 3usize.min(panels.len().max(1));
    let rows = panels.len().div_ceil(columns).max(1);
    let (pw, ph) = (440.0, 300.0);
    let (left, right, top, bottom) = (62.0, 26.0, 30.0, 40.0);
    let header = 64.0;
    let width = pw * columns as f64;
    let height = header + ph * rows as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="12" y="22" font-size="15" font-weight="bold">gRPC latency by percentile: direct vs locality-sidecar pair vs HAProxy pair vs nginx pair</text>"#
    );
    let _ = writeln!(
        out,
        r##"<text x="12" y="40" fill="#444">{}</text>"##,
        escape(subtitle)
    );
    let mut lx = 12.0;
    for kind in SetupKind::ALL {
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="54" x2="{}" y2="54" stroke="{}" stroke-width="2.5"/><text x="{}" y="58">{}</text>"#,
            lx + 22.0,
            color(kind),
            lx + 27.0,
            kind.name()
        );
        lx += 95.0;
    }
    for (index, scenario) in panels.iter().enumerate() {
        let ox = pw * (index % columns) as f64;
        let oy = header + ph * (index / columns) as f64;
        let (x0, x1) = (ox + left, ox + pw - right);
        let (y0, y1) = (oy + ph - bottom, oy + top);
        let ran: Vec<&SetupResult> = scenario.setups.iter().filter(|s| s.ran()).collect();
        let curves: Vec<(SetupKind, Vec<(f64, u64)>)> =
            ran.iter().map(|r| (r.kind, curve(r))).collect();
        let x_max = curves
            .iter()
            .filter_map(|(_, c)| c.last().map(|p| p.0))
            .fold(2.0f64, f64::max)
            .ceil();
        let lo = curves
            .iter()
            .flat_map(|(_, c)| c.iter().map(|p| p.1))
            .min()
            .unwrap_or(1)
            .max(1) as f64;
        let hi = curves
            .iter()
            .flat_map(|(_, c)| c.iter().map(|p| p.1))
            .max()
            .unwrap_or(10)
            .max(10) as f64;
        let (ly0, ly1) = ((lo * 0.8).log10(), (hi * 1.25).log10());
        let sx = |x: f64| x0 + (x1 - x0) * (x - CURVE_START) / (x_max - CURVE_START);
        let sy = |ns: f64| y0 - (y0 - y1) * (ns.max(1.0).log10() - ly0) / (ly1 - ly0);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
            x0,
            oy + 18.0,
            escape(&scenario.name)
        );
        if matches!(scenario.load, Load::Stream { .. }) {
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{}" fill="#555">(gaps between consecutive messages)</text>"##,
                x0 + 100.0,
                oy + 18.0
            );
        }
        let _ = writeln!(
            out,
            r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
            x1 - x0,
            y0 - y1
        );
        for tick in log_ticks(lo * 0.8, hi * 1.25) {
            let y = sy(tick);
            let _ = writeln!(
                out,
                r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#333">{}</text>"##,
                x0 - 4.0,
                y + 3.5,
                fmt_ns(tick as u64)
            );
        }
        let labels = ["90", "99", "99.9", "99.99", "99.999"];
        for (i, label) in labels.iter().enumerate().take(x_max as usize) {
            let x = sx(i as f64 + 1.0);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{y0}" stroke="#e4e4e4"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#333">{label}</text>"##,
                y0 + 14.0
            );
        }
        let _ = writeln!(
            out,
            r##"<text x="{x0}" y="{}" text-anchor="middle" fill="#333">50</text>"##,
            y0 + 14.0
        );
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">percentile</text>"##,
            (x0 + x1) / 2.0,
            y0 + 30.0
        );
        for (kind, points) in &curves {
            let path: Vec<String> = points
                .iter()
                .map(|(x, ns)| format!("{:.1},{:.1}", sx(*x), sy(*ns as f64)))
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.8" points="{}"/>"#,
                color(*kind),
                path.join(" ")
            );
        }
        let missing: Vec<&str> = scenario
            .setups
            .iter()
            .filter(|s| !s.ran())
            .map(|s| s.kind.name())
            .collect();
        if !missing.is_empty() {
            let _ = writeln!(
                out,
                r##"<text x="{}" y="{}" fill="#a00">no data: {}</text>"##,
                x0 + 6.0,
                y1 + 14.0,
                missing.join(", ")
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
