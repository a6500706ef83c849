//! `bench`: the locality-sidecar pair side by side with a direct call, an HAProxy pair and an
//! nginx pair, in one run.
//!
//! Every setup carries the same gRPC calls from this program's load generator to the echo
//! server (a separate `echo-server` process): directly over h2c, or through two proxy processes
//! that talk to each other over an encrypted, mutually authenticated link (QUIC for the
//! sidecars, HTTP/2 over TLS for HAProxy and nginx). Each scenario starts fresh processes, then
//! runs a few short rounds that visit every setup in turn (rotating who goes first), so drift in
//! a shared machine's load hits all setups alike. Output: a table on the terminal, a JSON file
//! and an SVG percentile plot. `./integration/bench.sh` builds, installs the peers and runs it;
//! BENCHMARKS.md explains the figures.
//!
//! The `lossy-*` scenarios put the server side of every setup (echo server and server-side
//! proxy) in a network namespace across a veth link, and measure each setup twice per round:
//! with the link clean and with random loss on it (1% each way by default), so the share of
//! throughput a setup keeps under loss comes from the same processes in the same run.

#[path = "../bench/h2load.rs"]
mod h2load;
#[path = "../bench/load.rs"]
mod load;
#[path = "../bench/procs.rs"]
mod procs;
#[path = "../bench/report.rs"]
mod report;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use serde_json::{json, Value};

use integration::allocations;
use integration::netns::{Fault, NetNode};
use load::Mark;
use procs::{Context, EchoProcess, RunningSetup, SetupKind};
use report::{Link, Load, ScenarioResult, SetupResult, SideResult, Status};

/// Runs the benchmark; see BENCHMARKS.md.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// Short runs and fewer scenarios, for development and smoke tests.
    #[arg(long)]
    quick: bool,
    /// Measured seconds per setup and scenario, split evenly over the rounds
    /// [default: 4.5, quick 1].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Rounds per scenario; each round visits every setup once [default: 3, quick 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Warm-up seconds before each setup's measured part of a round [default: 0.5, quick 0.3].
    #[arg(long, value_name = "SECS")]
    warmup: Option<f64>,
    /// Run only these scenarios (comma-separated names or name prefixes; see --list).
    #[arg(long, value_delimiter = ',', value_name = "SCENARIO")]
    only: Vec<String>,
    /// Setups to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,sidecar,haproxy,nginx"
    )]
    setups: Vec<String>,
    /// Where to write the JSON results [default: target/bench/results.json].
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where to write the SVG latency plot [default: target/bench/latency.svg].
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Open-loop rate in calls/s [default: 80% of the sidecar's unary-256B-c128 throughput].
    #[arg(long)]
    rate: Option<f64>,
    /// Without --rate: the open-loop rate as a fraction of the sidecar's unary-256B-c128
    /// throughput.
    #[arg(long, default_value_t = 0.8, value_name = "FRACTION")]
    rate_fraction: f64,
    /// Worker threads per sidecar process (LOCALITY_SIDECAR_WORKER_THREADS), and HAProxy's
    /// `nbthread` per side to match; nginx keeps one worker process.
    #[arg(long, default_value_t = 1)]
    sidecar_threads: usize,
    /// Runtime worker threads of the load generator (this process) [default: one per CPU].
    #[arg(long)]
    client_threads: Option<usize>,
    /// Messages in the server-stream scenario [default: 1000000, quick 100000].
    #[arg(long)]
    stream_messages: Option<u64>,
    /// Idle streams held open in the streams scenario.
    #[arg(long, default_value_t = 1000)]
    idle_streams: usize,
    /// Busy (measured) streams in the streams scenario.
    #[arg(long, default_value_t = 100)]
    busy_streams: usize,
    /// Random loss on the link of the `lossy-*` scenarios, in thousandths of packets dropped
    /// each way (10 = 1%).
    #[arg(long, default_value_t = 10, value_name = "N")]
    loss_per_mille: u32,
    /// Keep the temporary directory (configs and logs of every process) and print its path.
    #[arg(long)]
    keep_dir: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Instead of the scenarios: count heap allocations per call in each sidecar (uprobes on
    /// the allocator, read by `perf stat`; needs root and perf), for unary calls at c=1 and
    /// c=128 (256 B) and c=1 (64 KiB). Measures no time. `--duration` sets each count's window.
    #[arg(long, conflicts_with = "instructions")]
    allocations: bool,
    /// Instead of the scenarios: count user-space instructions per call in each sidecar, for
    /// the same call shapes, with the sidecars run under valgrind's callgrind (needs valgrind).
    /// Unlike CPU time on a shared machine, the count repeats within about a percent.
    #[arg(long)]
    instructions: bool,
}

/// Durations and sizes after defaults and --quick are applied.
struct Plan {
    rounds: usize,
    measure_per_round: Duration,
    warmup: Duration,
    setups: Vec<SetupKind>,
}

struct Scenario {
    name: String,
    about: String,
    load: Load,
    /// Across a veth link to a namespace, measured clean and lossy, instead of on loopback.
    lossy: bool,
}

/// Prefix of the scenarios that run across a lossy link.
const LOSSY_PREFIX: &str = "lossy-";

/// Prefix of the scenarios driven by h2load.
const H2LOAD_PREFIX: &str = "h2load-";

/// Why the lossy-link scenarios cannot run here (they need root, `ip` and `nft`), if so.
fn lossy_unavailable() -> Option<String> {
    if !integration::harness::running_as_root() {
        return Some("not root".into());
    }
    let missing: Vec<&str> = ["ip", "nft"]
        .into_iter()
        .filter(|p| procs::find_program(p).is_none())
        .collect();
    (!missing.is_empty()).then(|| format!("{} not installed", missing.join(" and ")))
}

const SMALL: usize = 256;
const LARGE: usize = 64 * 1024;
/// Payload of each server-stream message: small, so per-message cost dominates.
const STREAM_MESSAGE_SIZE: usize = 32;

fn scenarios(args: &Args) -> Vec<Scenario> {
    let mut list = Vec::new();
    for (size, label) in [(SMALL, "256B"), (LARGE, "64KiB")] {
        for concurrency in [1, 16, 128] {
            list.push(Scenario {
                name: format!("unary-{label}-c{concurrency}"),
                about: format!(
                    "closed loop, {concurrency} caller{} doing unary calls back to back, {} request and reply",
                    if concurrency == 1 { "" } else { "s" },
                    if size == SMALL { "256 B" } else { "64 KiB" }
                ),
                load: Load::Closed { concurrency, size },
                lossy: false,
            });
        }
    }
    for concurrency in [1, 128] {
        list.push(Scenario {
            name: format!("{H2LOAD_PREFIX}unary-256B-c{concurrency}"),
            about: format!(
                "the unary-256B-c{concurrency} closed loop driven by h2load (nghttp2's load generator, one thread) instead of this process; HTTP statuses checked, not gRPC's"
            ),
            load: Load::H2load {
                concurrency,
                size: SMALL,
            },
            lossy: false,
        });
    }
    list.push(Scenario {
        name: "open-loop-256B".into(),
        about: format!(
            "open loop: unary 256 B calls started at a fixed rate ({:.0}% of the sidecar's unary-256B-c128 throughput), latency from the scheduled start",
            args.rate_fraction * 100.0
        ),
        load: Load::Open {
            size: SMALL,
            fraction: args.rate_fraction,
        },
        lossy: false,
    });
    let messages = args
        .stream_messages
        .unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
    list.push(Scenario {
        name: "server-stream".into(),
        about: format!(
            "one server-streaming call of {messages} messages of {STREAM_MESSAGE_SIZE} B; throughput in messages/s"
        ),
        load: Load::Stream {
            messages,
            size: STREAM_MESSAGE_SIZE,
        },
        lossy: false,
    });
    list.push(Scenario {
        name: "streams-idle-busy".into(),
        about: format!(
            "{} idle bidi streams held open plus {} busy ones doing 256 B round trips (latency = round trip)",
            args.idle_streams, args.busy_streams
        ),
        load: Load::Streams {
            idle: args.idle_streams,
            busy: args.busy_streams,
            size: SMALL,
        },
        lossy: false,
    });
    for concurrency in [1, 64] {
        list.push(Scenario {
            name: format!("{LOSSY_PREFIX}unary-256B-c{concurrency}"),
            about: format!(
                "closed loop, {concurrency} caller{} doing unary 256 B calls, server side in a namespace across a veth link, measured with the link clean and with {} random loss each way",
                if concurrency == 1 { "" } else { "s" },
                report::fmt_per_mille(args.loss_per_mille)
            ),
            load: Load::Closed {
                concurrency,
                size: SMALL,
            },
            lossy: true,
        });
    }
    if args.only.is_empty() && !args.quick {
        // Namespaces and nftables need root: the full run includes the lossy link only where
        // it can build one (`main` says so when it leaves them out).
        if lossy_unavailable().is_some() {
            list.retain(|s| !s.lossy);
        }
        if h2load::program().is_none() {
            list.retain(|s| !matches!(s.load, Load::H2load { .. }));
        }
    }
    if args.quick && args.only.is_empty() {
        const QUICK: [&str; 6] = [
            "unary-256B-c1",
            "unary-256B-c128",
            "unary-64KiB-c16",
            "open-loop-256B",
            "server-stream",
            "streams-idle-busy",
        ];
        list.retain(|s| QUICK.contains(&s.name.as_str()));
    }
    if !args.only.is_empty() {
        // An exact name selects that scenario alone (unary-256B-c1 is also a prefix of
        // unary-256B-c128); anything else selects every scenario it is a prefix of.
        let names: Vec<String> = list.iter().map(|s| s.name.clone()).collect();
        list.retain(|s| {
            args.only
                .iter()
                .any(|o| s.name == *o || (!names.contains(o) && s.name.starts_with(o.as_str())))
        });
    }
    list
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the integration crate is inside the workspace")
        .to_path_buf()
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The machine the figures were taken on.
fn machine_info() -> Value {
    let model = std::process::Command::new("lscpu")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("Model name:").map(|m| m.trim().to_owned()))
        })
        .or_else(|| {
            std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
                c.lines()
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == "model name"))
                    .map(|(_, v)| v.trim().to_owned())
            })
        });
    let mem_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<f64>().ok())
            .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0)
    });
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
        "memory_gib": mem_gib,
        "load_average_at_start": read_trimmed("/proc/loadavg"),
    })
}

/// CPU seconds of every watched process, read at the marks.
#[derive(Default)]
struct CpuWindow {
    start: Vec<procs::ThreadCpu>,
    delta: Vec<f64>,
    rss_open: Vec<u64>,
}

/// `pids`: the proxy sides (nginx: with their workers), then the echo server, then this
/// process, whose children (every process under test) must not count as load generator.
fn cpu_now(pids: &[u32], ticks: f64) -> Vec<procs::ThreadCpu> {
    let own = std::process::id();
    pids.iter()
        .map(|pid| procs::thread_cpu(*pid, *pid != own, ticks))
        .collect()
}

/// Runs one load against one setup, with the CPU of `pids` read around its measured part.
/// `dir` is the scenario's directory, for files a generator needs (h2load's request and log).
async fn run_load(
    bench: &Bench<'_>,
    load: &Load,
    target: std::net::SocketAddr,
    rate: f64,
    pids: &[u32],
    side_count: usize,
    dir: &Path,
) -> anyhow::Result<(load::Outcome, CpuWindow)> {
    let (plan, ticks) = (bench.plan, bench.ticks);
    let mut window = CpuWindow::default();
    let mut marks = |mark: Mark| match mark {
        Mark::Start => window.start = cpu_now(pids, ticks),
        Mark::End => {
            window.delta = cpu_now(pids, ticks)
                .iter()
                .zip(&window.start)
                .map(|(end, start)| procs::cpu_between(start, end))
                .collect();
        }
        Mark::StreamsOpen => {
            window.rss_open = pids[..side_count]
                .iter()
                .map(|pid| procs::rss_bytes(*pid))
                .collect();
        }
    };
    let (warmup, measure) = (plan.warmup, plan.measure_per_round);
    let outcome = match *load {
        Load::Closed { concurrency, size } => {
            load::closed_loop(
                target,
                concurrency,
                payload(size),
                warmup,
                measure,
                &mut marks,
            )
            .await?
        }
        Load::H2load { concurrency, size } => {
            let program = h2load::program().with_context(|| {
                format!(
                    "h2load is not installed (apt-get install -y {}, or run ./integration/bench.sh)",
                    h2load::PACKAGE
                )
            })?;
            h2load::closed_loop(
                &program,
                target,
                concurrency,
                &payload(size),
                warmup,
                measure,
                dir,
                ticks,
                &mut marks,
            )
            .await?
        }
        Load::Open { size, .. } => {
            load::open_loop(target, rate, payload(size), warmup, measure, &mut marks).await?
        }
        Load::Stream { messages, size } => {
            load::server_stream(target, messages, payload(size), &mut marks).await?
        }
        Load::Streams { idle, busy, size } => {
            load::idle_and_busy(
                target,
                idle,
                busy,
                payload(size),
                warmup,
                measure,
                &mut marks,
            )
            .await?
        }
    };
    if let (Some(cpu), Some(own)) = (outcome.loadgen_cpu_seconds, window.delta.last_mut()) {
        // The generator was a child process: its CPU replaces this (idle) process's.
        *own = cpu;
    }
    Ok((outcome, window))
}

fn payload(size: usize) -> Bytes {
    integration::echo_server::pattern(size)
}

/// The open-loop rate: the flag, else a fraction of the sidecar's c=128 throughput measured
/// earlier in this run, else a short calibration run now.
async fn open_loop_rate(
    args: &Args,
    fraction: f64,
    earlier: &[ScenarioResult],
    running: &[(SetupKind, RunningSetup)],
) -> anyhow::Result<(f64, String)> {
    if let Some(rate) = args.rate {
        return Ok((rate, "set by --rate".into()));
    }
    if let Some(sidecar) = earlier
        .iter()
        .find(|s| s.name == "unary-256B-c128")
        .and_then(|s| s.setup(SetupKind::Sidecar))
    {
        return Ok((
            sidecar.throughput() * fraction,
            format!(
                "{:.0}% of the sidecar's unary-256B-c128 throughput, {:.0} calls/s",
                fraction * 100.0,
                sidecar.throughput()
            ),
        ));
    }
    let (kind, setup) = running
        .iter()
        .find(|(k, _)| *k == SetupKind::Sidecar)
        .or_else(|| running.first())
        .context("no setup is running to calibrate the open-loop rate against")?;
    let outcome = load::closed_loop(
        setup.target,
        128,
        payload(SMALL),
        Duration::from_millis(300),
        Duration::from_millis(1500),
        &mut |_| {},
    )
    .await?;
    let throughput = outcome.calls as f64 / outcome.measured.as_secs_f64();
    Ok((
        throughput * fraction,
        format!(
            "{:.0}% of {throughput:.0} calls/s, {}'s throughput in a 1.5 s calibration run at c=128",
            fraction * 100.0,
            kind.name()
        ),
    ))
}

/// What every scenario runs with.
struct Bench<'a> {
    args: &'a Args,
    plan: &'a Plan,
    context: &'a Context,
    /// The temporary directory: configs and logs, one subdirectory per scenario.
    dir: &'a Path,
    echo_binary: &'a Path,
    ticks: f64,
}

/// The link states one scenario measures each setup under: loopback alone, or across a veth
/// link clean and then lossy (alternating which goes first by round).
fn links(scenario: &Scenario, loss_per_mille: u32) -> Vec<Link> {
    if scenario.lossy {
        vec![
            Link::Clean,
            Link::Lossy {
                per_mille: loss_per_mille,
            },
        ]
    } else {
        vec![Link::Loopback]
    }
}

/// The name of one link state's results: the scenario's own for loopback and for the lossy
/// link (the figure the scenario is about), `-noloss` appended for its clean counterpart.
fn result_name(scenario: &Scenario, link: Link) -> String {
    match link {
        Link::Clean => format!("{}-noloss", scenario.name),
        Link::Loopback | Link::Lossy { .. } => scenario.name.clone(),
    }
}

/// Runs one scenario: one result per link state (one for loopback scenarios, a clean and a
/// lossy one for `lossy-*`), clean counterpart first.
async fn run_scenario(
    bench: &Bench<'_>,
    scenario: &Scenario,
    earlier: &[ScenarioResult],
) -> anyhow::Result<Vec<ScenarioResult>> {
    let Bench {
        args,
        plan,
        context,
        dir,
        echo_binary,
        ticks: _,
    } = *bench;
    let dir = dir.join(&scenario.name);
    std::fs::create_dir_all(&dir)?;
    let load_at_start = read_trimmed("/proc/loadavg");
    let node = if scenario.lossy {
        Some(NetNode::create().context(
            "cannot build the namespace and veth link (lossy scenarios need root, iproute2 and nftables)",
        )?)
    } else {
        None
    };
    let links = links(scenario, args.loss_per_mille);
    let echo = EchoProcess::start(echo_binary, &dir, node.as_ref())?;
    // results[link][setup]
    let mut results: Vec<Vec<SetupResult>> = links.iter().map(|_| Vec::new()).collect();
    let mut running: Vec<(SetupKind, RunningSetup)> = Vec::new();
    for &kind in &plan.setups {
        if context.missing(kind).is_some() {
            for per_link in &mut results {
                per_link.push(SetupResult::new(kind, Status::NotInstalled));
            }
            continue;
        }
        match procs::start_setup(kind, context, &dir.join(kind.name()), &echo, node.as_ref()).await
        {
            Ok(setup) => {
                for per_link in &mut results {
                    let mut result = SetupResult::new(kind, Status::Ran);
                    result.sides = setup
                        .sides
                        .iter()
                        .map(|side| SideResult {
                            name: side.name,
                            cpu_seconds: 0.0,
                            idle_rss: side.idle_rss,
                            peak_rss: 0,
                            rss_streams_open: None,
                        })
                        .collect();
                    per_link.push(result);
                }
                running.push((kind, setup));
            }
            Err(error) => {
                eprintln!("{}: cannot start: {error:#}", kind.name());
                for per_link in &mut results {
                    per_link.push(SetupResult::new(kind, Status::Failed(format!("{error:#}"))));
                }
            }
        }
    }

    let (rate, rate_source) = match scenario.load {
        Load::Open { fraction, .. } => {
            let (rate, source) = open_loop_rate(args, fraction, earlier, &running).await?;
            (Some(rate), Some(source))
        }
        _ => (None, None),
    };

    let self_pid = std::process::id();
    for round in 0..plan.rounds {
        // Rotate the order so no setup always runs first (or right after a heavy neighbour).
        let count = running.len();
        for step in 0..count {
            let index = (step + round) % count;
            let (kind, setup) = &running[index];
            for offset in 0..links.len() {
                // Alternate which link state goes first, for the same reason.
                let link_index = (offset + round) % links.len();
                let link = links[link_index];
                let result = results[link_index]
                    .iter_mut()
                    .find(|r| r.kind == *kind)
                    .expect("every running setup has a result");
                if !matches!(result.status, Status::Ran) {
                    continue;
                }
                if let Some(node) = &node {
                    let fault = match link {
                        Link::Lossy { per_mille } => Fault::RandomLoss { per_mille },
                        Link::Clean | Link::Loopback => Fault::Clean,
                    };
                    node.set_fault(fault)
                        .context("set the link's loss rules in the namespace")?;
                }
                let mut pids: Vec<u32> = setup.sides.iter().map(|s| s.pid).collect();
                pids.extend([echo.pid(), self_pid]);
                eprint!(
                    "  {} round {}/{}: {:<8} {:<10}\r",
                    scenario.name,
                    round + 1,
                    plan.rounds,
                    kind.name(),
                    link.label()
                );
                let outcome = run_load(
                    bench,
                    &scenario.load,
                    setup.target,
                    rate.unwrap_or(0.0),
                    &pids,
                    setup.sides.len(),
                    &dir,
                )
                .await;
                record(result, outcome, scenario, &result_name(scenario, link));
            }
        }
    }
    eprint!("{:<70}\r", "");
    for (kind, setup) in &running {
        for per_link in &mut results {
            if let Some(result) = per_link.iter_mut().find(|r| r.kind == *kind) {
                for (side_result, side) in result.sides.iter_mut().zip(&setup.sides) {
                    side_result.peak_rss = procs::peak_rss_bytes(side.pid);
                }
            }
        }
    }
    // Stop the proxies before the echo server, as their owners would, and both before their
    // namespace goes.
    drop(running);
    drop(echo);
    drop(node);
    let clean_name = result_name(scenario, Link::Clean);
    Ok(links
        .iter()
        .zip(results)
        .map(|(&link, mut setups)| {
            // Keep the table's column order the same in every scenario.
            setups.sort_by_key(|r| SetupKind::ALL.iter().position(|k| *k == r.kind));
            ScenarioResult {
                name: result_name(scenario, link),
                about: match link {
                    Link::Clean => format!("{} — the clean-link counterpart", scenario.about),
                    _ => scenario.about.clone(),
                },
                load: scenario.load.clone(),
                rate,
                rate_source: rate_source.clone(),
                link,
                clean_counterpart: matches!(link, Link::Lossy { .. }).then(|| clean_name.clone()),
                load_at_start: load_at_start.clone(),
                setups,
            }
        })
        .collect())
}

/// Adds one measured run to a setup's result (or marks the setup failed).
fn record(
    result: &mut SetupResult,
    outcome: anyhow::Result<(load::Outcome, CpuWindow)>,
    scenario: &Scenario,
    name: &str,
) {
    match outcome {
        Ok((outcome, window)) => {
            for ns in &outcome.latencies_ns {
                result.histogram.saturating_record(*ns);
            }
            result.calls += outcome.calls;
            result.errors += outcome.errors;
            if result.first_error.is_none() {
                result.first_error = outcome.first_error;
            }
            result.measured += outcome.measured;
            if let Load::Stream { .. } = scenario.load {
                result.stream_times.push(outcome.measured);
            }
            result.start_lag.extend(outcome.mean_start_lag);
            let sides = result.sides.len();
            for (side, cpu) in result.sides.iter_mut().zip(&window.delta) {
                side.cpu_seconds += cpu;
            }
            if window.delta.len() == sides + 2 {
                result.echo_cpu += window.delta[sides];
                result.loadgen_cpu += window.delta[sides + 1];
            }
            for (side, rss) in result.sides.iter_mut().zip(&window.rss_open) {
                side.rss_streams_open = Some(side.rss_streams_open.unwrap_or(0).max(*rss));
            }
        }
        Err(error) => {
            eprintln!("{name}: {} failed: {error:#}", result.kind.name());
            result.status = Status::Failed(format!("{error:#}"));
        }
    }
}

/// The JSON name of what `--allocations` or `--instructions` counts.
fn count_key(args: &Args) -> &'static str {
    if args.instructions {
        "instructions_per_call"
    } else {
        "allocations_per_call"
    }
}

/// What `--allocations` or `--instructions` counts in each sidecar.
enum Meter {
    /// Heap allocations: uprobes on the allocator, read by `perf stat`.
    Allocations(allocations::Probes),
    /// Instructions: the sidecars run under callgrind.
    Instructions,
}

/// One sidecar's count over one call shape's measured window.
enum WindowCounter {
    Perf(allocations::Counter),
    Callgrind(integration::instructions::Counter),
}

impl WindowCounter {
    fn start(&mut self) -> anyhow::Result<()> {
        match self {
            WindowCounter::Perf(counter) => counter.switch("enable"),
            WindowCounter::Callgrind(counter) => counter.start(),
        }
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            WindowCounter::Perf(counter) => counter.switch("disable"),
            WindowCounter::Callgrind(counter) => counter.stop(),
        }
    }

    fn finish(self) -> anyhow::Result<u64> {
        match self {
            WindowCounter::Perf(counter) => counter.finish(),
            WindowCounter::Callgrind(counter) => counter.finish(),
        }
    }
}

/// `--allocations` and `--instructions`: a count per call in each sidecar, for a few call
/// shapes, each counted over `duration` seconds of a closed loop after the warm-up. With
/// `--instructions` the sidecar binary is already the callgrind launcher (see `main`).
async fn count_per_call(
    args: &Args,
    context: &Context,
    dir: &Path,
    sidecar_binary: &Path,
    echo_binary: &Path,
    duration: f64,
) -> anyhow::Result<Value> {
    let warmup = Duration::from_secs_f64(args.warmup.unwrap_or(0.5));
    let measure = Duration::from_secs_f64(duration);
    let echo = EchoProcess::start(echo_binary, dir, None)?;
    let setup = procs::start_setup(
        SetupKind::Sidecar,
        context,
        &dir.join("sidecar"),
        &echo,
        None,
    )
    .await?;
    let unit = count_key(args);
    let meter = if args.instructions {
        println!(
            "instructions per call in each sidecar (user space, counted by valgrind's callgrind over {:.1} s per row; the sidecars run about five times slower under it, so no time is measured)",
            measure.as_secs_f64()
        );
        Meter::Instructions
    } else {
        if let Some(why) = allocations::unavailable() {
            bail!("--allocations cannot run here: {why}");
        }
        let probes = allocations::Probes::add(sidecar_binary)?;
        println!(
            "heap allocations per call in each sidecar ({} uprobes in {}, counted by perf stat over {:.1} s per row; calls slow down under the probes, so no time is measured)",
            allocations::ENTRY_POINTS.join(", "),
            sidecar_binary.display(),
            measure.as_secs_f64()
        );
        Meter::Allocations(probes)
    };
    println!(
        "call shape              calls   {}",
        setup
            .sides
            .iter()
            .map(|s| format!("{:>18}", s.name))
            .collect::<String>()
    );
    let mut rows = Vec::new();
    for (label, concurrency, size) in [
        ("unary 256 B, c=1", 1, SMALL),
        ("unary 256 B, c=128", 128, SMALL),
        ("unary 64 KiB, c=1", 1, LARGE),
    ] {
        let mut counters = Vec::new();
        for side in &setup.sides {
            counters.push(match &meter {
                Meter::Allocations(probes) => WindowCounter::Perf(allocations::Counter::attach(
                    side.pid,
                    &probes.events(),
                    dir,
                    side.name,
                )?),
                Meter::Instructions => {
                    WindowCounter::Callgrind(integration::instructions::Counter::new(side.pid))
                }
            });
        }
        let mut switch_failure = None;
        let outcome = load::closed_loop(
            setup.target,
            concurrency,
            payload(size),
            warmup,
            measure,
            &mut |mark| {
                for counter in &mut counters {
                    let switched = match mark {
                        Mark::Start => counter.start(),
                        Mark::End => counter.stop(),
                        Mark::StreamsOpen => Ok(()),
                    };
                    if let Err(error) = switched {
                        switch_failure.get_or_insert(error);
                    }
                }
            },
        )
        .await?;
        if let Some(error) = switch_failure {
            return Err(error.context(format!("{label}: switching the counters")));
        }
        if outcome.errors > 0 || outcome.calls == 0 {
            bail!(
                "{label}: {} calls, {} failed ({})",
                outcome.calls,
                outcome.errors,
                outcome.first_error.unwrap_or_default()
            );
        }
        let mut per_side = Vec::new();
        for (counter, side) in counters.into_iter().zip(&setup.sides) {
            let counted = counter.finish()?;
            per_side.push((side.name, counted as f64 / outcome.calls as f64));
        }
        let width = if args.instructions { 0 } else { 1 };
        println!(
            "{label:<20} {:>9}   {}",
            outcome.calls,
            per_side
                .iter()
                .map(|(_, per_call)| format!("{per_call:>18.width$}"))
                .collect::<String>()
        );
        rows.push(json!({
            "shape": label,
            "concurrency": concurrency,
            "size": size,
            "calls": outcome.calls,
            "per_side": per_side
                .iter()
                .map(|(name, per_call)| json!({"side": name, unit: per_call}))
                .collect::<Vec<_>>(),
        }));
    }
    Ok(Value::Array(rows))
}

async fn run(args: Args, sidecar_binary: PathBuf, echo_binary: PathBuf) -> anyhow::Result<bool> {
    let plan = Plan {
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        measure_per_round: Duration::ZERO,
        warmup: Duration::from_secs_f64(args.warmup.unwrap_or(if args.quick { 0.3 } else { 0.5 })),
        setups: Vec::new(),
    };
    let duration = args.duration.unwrap_or(if args.quick { 1.0 } else { 4.5 });
    if !(duration > 0.0 && duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if !(args.rate_fraction > 0.0 && args.rate_fraction.is_finite())
        || args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite()))
    {
        bail!("--rate and --rate-fraction must be positive numbers");
    }
    if args.loss_per_mille > 1000 {
        bail!("--loss-per-mille is in thousandths: at most 1000");
    }
    let mut setups = Vec::new();
    for name in &args.setups {
        let kind = SetupKind::parse(name.trim()).with_context(|| {
            format!("unknown setup {name:?} in --setups (expected direct, sidecar, haproxy, nginx)")
        })?;
        if !setups.contains(&kind) {
            setups.push(kind);
        }
    }
    let plan = Plan {
        measure_per_round: Duration::from_secs_f64(duration / plan.rounds as f64),
        setups,
        ..plan
    };
    let scenarios = scenarios(&args);
    if scenarios.is_empty() {
        bail!("--only {:?} matches no scenario (see --list)", args.only);
    }

    let dir = tempfile::Builder::new()
        .prefix("locality-bench-")
        .tempdir()?;
    let certs = integration::harness::generate_certs(&dir.path().join("certs"), &[]);
    let context = Context::new(certs, args.sidecar_threads)?;
    if args.allocations || args.instructions {
        let key = count_key(&args);
        let counts = count_per_call(
            &args,
            &context,
            dir.path(),
            &sidecar_binary,
            &echo_binary,
            duration,
        )
        .await?;
        if let Some(path) = &args.json {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let document = json!({
                "machine": machine_info(),
                "args": std::env::args().skip(1).collect::<Vec<_>>(),
                key: counts,
            });
            std::fs::write(path, serde_json::to_string_pretty(&document)? + "\n")
                .with_context(|| format!("write {}", path.display()))?;
            println!("\nwrote {}", path.display());
        }
        return Ok(true);
    }
    let ticks = procs::clock_ticks_per_second();

    let machine = machine_info();
    let versions = json!({
        "locality-sidecar": procs::first_output_line(&sidecar_binary, &["--version"]),
        "haproxy": context.haproxy.as_deref().and_then(|p| procs::first_output_line(p, &["-v"])),
        "nginx": context.nginx.as_deref().and_then(|p| procs::first_output_line(p, &["-v"])),
    });
    println!("locality-sidecar benchmark");
    println!(
        "machine: {} CPUs ({}), kernel {}, {} GiB memory, load average at start {}",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        machine["memory_gib"],
        machine["load_average_at_start"].as_str().unwrap_or("?"),
    );
    println!(
        "plan: {} round(s) × {:.2} s measured (+{:.2} s warm-up) per setup and scenario; sidecars with {} runtime worker(s); HAProxy nbthread {}; nginx worker_processes 1",
        plan.rounds,
        plan.measure_per_round.as_secs_f64(),
        plan.warmup.as_secs_f64(),
        args.sidecar_threads,
        args.sidecar_threads
    );
    println!(
        "load generator: this process (tonic; one HTTP/2 connection per {} concurrent calls), h2load for the h2load-* scenarios (the same connections and streams); echo server: separate echo-server process",
        load::STREAMS_PER_CONNECTION
    );
    if args.only.is_empty() && !args.quick {
        if let Some(why) = lossy_unavailable() {
            println!(
                "NOTE: the lossy-link scenarios are left out ({why}; they need root, iproute2 and nftables)"
            );
        }
        if h2load::program().is_none() {
            println!(
                "NOTE: the h2load-* scenarios are left out: h2load is not installed (apt-get install -y {}, or run ./integration/bench.sh)",
                h2load::PACKAGE
            );
        }
    }
    for kind in &plan.setups {
        if context.missing(*kind).is_some() {
            println!(
                "NOTE: {} is not installed: its column reads \"not installed\" (install it with `apt-get install -y {}`, or run ./integration/bench.sh)",
                kind.name(),
                kind.name()
            );
        }
    }
    println!(
        "scenarios: {}",
        scenarios
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let bench = Bench {
        args: &args,
        plan: &plan,
        context: &context,
        dir: dir.path(),
        echo_binary: &echo_binary,
        ticks,
    };
    let mut results: Vec<ScenarioResult> = Vec::new();
    for scenario in &scenarios {
        let produced = run_scenario(&bench, scenario, &results)
            .await
            .with_context(|| format!("scenario {}", scenario.name))?;
        for result in produced {
            print!("{}", report::scenario_table(&result));
            if let Some(clean) = result
                .clean_counterpart
                .as_deref()
                .and_then(|name| results.iter().find(|r| r.name == name))
            {
                for line in report::kept_lines(&result, clean) {
                    println!("   {line}");
                }
            }
            results.push(result);
        }
    }
    print!("{}", report::idle_rss_table(&results));
    print!("{}", report::lossy_summary(&results));
    let targets = report::targets(&results);
    print!("{}", report::targets_text(&targets));

    let header = json!({
        "machine": machine,
        "versions": versions,
        "args": std::env::args().skip(1).collect::<Vec<_>>(),
        "rounds": plan.rounds,
        "measured_seconds_per_round": plan.measure_per_round.as_secs_f64(),
        "warmup_seconds": plan.warmup.as_secs_f64(),
        "sidecar_threads": args.sidecar_threads,
        "streams_per_connection": load::STREAMS_PER_CONNECTION,
        "loss_per_mille": args.loss_per_mille,
        "load_average_at_end": read_trimmed("/proc/loadavg"),
        "finished_unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/results.json"));
    let svg_path = args
        .svg
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/latency.svg"));
    for path in [&json_path, &svg_path] {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
    }
    let document = report::to_json(&results, header, &targets);
    std::fs::write(&json_path, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    let subtitle = format!(
        "{} CPUs ({}), kernel {}; {} round(s) × {:.1} s per setup; sidecars {} worker thread(s), HAProxy nbthread {}, nginx 1 worker",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        plan.rounds,
        plan.measure_per_round.as_secs_f64(),
        args.sidecar_threads,
        args.sidecar_threads
    );
    std::fs::write(&svg_path, report::svg(&results, &subtitle))
        .with_context(|| format!("write {}", svg_path.display()))?;
    println!("\nwrote {} and {}", json_path.display(), svg_path.display());
    if args.keep_dir {
        let kept = dir.keep();
        println!("kept configs and logs in {}", kept.display());
    }
    Ok(results
        .iter()
        .flat_map(|s| &s.setups)
        .all(|r| !matches!(r.status, Status::Failed(_))))
}

/// `--instructions`: a launcher that runs `sidecar` under callgrind, in a directory of its own
/// that must outlive the run.
fn callgrind_launcher(sidecar: &Path) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    if let Some(why) = integration::instructions::unavailable() {
        bail!("--instructions cannot run here: {why}");
    }
    let dir = tempfile::Builder::new()
        .prefix("locality-callgrind-")
        .tempdir()?;
    let launcher = integration::instructions::write_launcher(dir.path(), sidecar)?;
    Ok((dir, launcher))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for scenario in scenarios(&Args {
            only: Vec::new(),
            quick: false,
            ..args
        }) {
            println!("{:<20} {}", scenario.name, scenario.about);
        }
        return ExitCode::SUCCESS;
    }
    // The sidecar and the echo server are the release binaries next to this one; the harness
    // finds the sidecar through LOCALITY_SIDECAR_BIN. Set before any thread exists.
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    if std::env::var_os("LOCALITY_SIDECAR_BIN").is_none() {
        std::env::set_var("LOCALITY_SIDECAR_BIN", exe_dir.join("locality-sidecar"));
    }
    let sidecar_binary =
        PathBuf::from(std::env::var_os("LOCALITY_SIDECAR_BIN").unwrap_or_default());
    let echo_binary = exe_dir.join("echo-server");
    for binary in [&sidecar_binary, &echo_binary] {
        if !binary.is_file() {
            eprintln!(
                "bench: {} does not exist; build the binaries first: cargo build --release --workspace --bins (./integration/bench.sh does)",
                binary.display()
            );
            return ExitCode::FAILURE;
        }
    }
    // --instructions: the harness starts the sidecar through a launcher that runs it under
    // callgrind. Set, like the variable above, before any thread exists; the directory holding
    // the launcher lives until the run ends.
    let mut _launcher_dir = None;
    let sidecar_binary = if args.instructions {
        match callgrind_launcher(&sidecar_binary) {
            Ok((dir, launcher)) => {
                std::env::set_var("LOCALITY_SIDECAR_BIN", &launcher);
                _launcher_dir = Some(dir);
                launcher
            }
            Err(error) => {
                eprintln!("bench: {error:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        sidecar_binary
    };
    if !exe_dir.ends_with("release") {
        eprintln!(
            "bench: WARNING: not a release build ({}); figures will not mean much",
            exe_dir.display()
        );
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.client_threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // A signal ends the run by dropping it, which stops every process it started (sidecars,
    // proxies, echo servers) and removes its namespaces; dying on the signal would leave them
    // running (Ctrl-C reaches them as a process group, `kill` does not).
    let interrupted = runtime.block_on(async {
        tokio::select! {
            result = run(args, sidecar_binary, echo_binary) => Ok(result),
            signal = stop_signal() => Err(signal),
        }
    });
    let finished = match interrupted {
        Ok(finished) => finished,
        Err(signal) => {
            eprintln!("bench: stopped by {signal}; the processes it started were stopped");
            return ExitCode::FAILURE;
        }
    };
    match finished {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: some setups failed (see the table)");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGTERM or SIGINT and names it.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action stays: the signal ends the process.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}
