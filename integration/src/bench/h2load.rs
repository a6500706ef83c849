//! A second, independent load generator for the closed-loop unary scenarios: nghttp2's
//! `h2load`, a single-threaded C client, run as a child process.
//!
//! Why a second one: the tonic generator in `load.rs` spends about as much CPU per call as a
//! proxy side and has an HTTP/2 client of its own kind, so on a small machine the client can
//! decide who wins. h2load costs a fraction of that, is what outside comparisons of gRPC
//! proxies commonly use, and is the generator of the held-out comparison in the speed issue;
//! the `h2load-*` scenarios repeat the unary closed loops with it so our numbers and theirs
//! are taken the same way.
//!
//! h2load sees HTTP statuses, not gRPC's: a 200 response whose trailers carry a non-zero
//! `grpc-status` counts as a success here. The echo server answers every one of these calls
//! with status 0, and the tonic scenarios check every call's status.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use integration::pb::EchoRequest;
use prost::Message as _;

use crate::load::{Mark, Outcome, STREAMS_PER_CONNECTION};
use crate::procs;

/// Debian package that ships h2load.
pub const PACKAGE: &str = "nghttp2-client";

/// How long past its measured duration h2load may run before it counts as hung and is killed.
const OVERRUN: Duration = Duration::from_secs(20);

/// How often the child's state is looked at while it runs.
const POLL: Duration = Duration::from_millis(5);

pub fn program() -> Option<PathBuf> {
    procs::find_program("h2load")
}

/// Connections and streams per connection for `concurrency` calls in flight: like the tonic
/// generator, one connection per [`STREAMS_PER_CONNECTION`] calls.
pub fn shape(concurrency: usize) -> anyhow::Result<(usize, usize)> {
    if concurrency == 0 {
        bail!("h2load needs at least one call in flight");
    }
    let connections = concurrency.div_ceil(STREAMS_PER_CONNECTION);
    if concurrency % connections != 0 {
        bail!("h2load spreads calls evenly: {concurrency} calls do not divide over {connections} connections");
    }
    Ok((connections, concurrency / connections))
}

/// The request body h2load sends on every call: one length-prefixed gRPC message.
pub fn grpc_body(payload: &Bytes) -> Vec<u8> {
    let message = EchoRequest {
        payload: payload.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0); // not compressed
    body.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    body.extend_from_slice(&message);
    body
}

/// One h2load log row: `start µs since epoch \t HTTP status \t µs until the response ended`,
/// status -1 for a stream that failed.
fn parse_log(text: &str, outcome: &mut Outcome) -> anyhow::Result<()> {
    for (number, line) in text.lines().enumerate() {
        let mut columns = line.split('\t');
        let (Some(_start), Some(status), Some(micros)) =
            (columns.next(), columns.next(), columns.next())
        else {
            bail!(
                "h2load log line {}: expected three columns: {line:?}",
                number + 1
            );
        };
        let status: i32 = status
            .trim()
            .parse()
            .with_context(|| format!("h2load log line {}: status {status:?}", number + 1))?;
        let micros: u64 = micros
            .trim()
            .parse()
            .with_context(|| format!("h2load log line {}: duration {micros:?}", number + 1))?;
        if status == 200 {
            outcome.calls += 1;
            outcome.latencies_ns.push(micros.saturating_mul(1000));
        } else {
            outcome.errors += 1;
            if outcome.first_error.is_none() {
                outcome.first_error = Some(if status < 0 {
                    "h2load: the stream failed (reset or connection lost)".into()
                } else {
                    format!("h2load: HTTP status {status}")
                });
            }
        }
    }
    Ok(())
}

/// What one h2load run is asked to do.
struct Run<'a> {
    program: &'a Path,
    target: SocketAddr,
    connections: usize,
    streams: usize,
    body: &'a Path,
    duration: Duration,
    log: Option<&'a Path>,
    output: &'a Path,
}

impl Run<'_> {
    fn command(&self) -> Command {
        let mut command = Command::new(self.program);
        command
            .arg(format!("--clients={}", self.connections))
            .arg(format!("--max-concurrent-streams={}", self.streams))
            .arg("--threads=1")
            .arg(format!("--duration={}ms", self.duration.as_millis().max(1)))
            .arg("--data")
            .arg(self.body)
            .args(["--header", "content-type: application/grpc"])
            .args(["--header", "te: trailers"]);
        if let Some(log) = self.log {
            command.arg("--log-file").arg(log);
        }
        command.arg(format!("http://{}/echo.Echo/Unary", self.target));
        command
    }

    /// Runs h2load to its end; returns the CPU seconds it used, read between its exit and the
    /// wait that reaps it.
    async fn run(&self, ticks: f64) -> anyhow::Result<f64> {
        let output = std::fs::File::create(self.output)
            .with_context(|| format!("create {}", self.output.display()))?;
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        let pid = child.id();
        let deadline = tokio::time::Instant::now() + self.duration + OVERRUN;
        let cpu;
        let status = loop {
            // Reaped only once seen exited, so its final CPU counts are read first. The child
            // is a zombie by then, so the wait returns at once.
            if let Some(seconds) = cpu_if_exited_unreaped(pid, ticks) {
                cpu = seconds;
                break child.wait()?;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "h2load still running {} s after its {} ms; killed",
                    OVERRUN.as_secs(),
                    self.duration.as_millis()
                );
            }
            tokio::time::sleep(POLL).await;
        };
        if !status.success() {
            let printed = std::fs::read_to_string(self.output).unwrap_or_default();
            let tail: Vec<&str> = printed.lines().rev().take(5).collect();
            bail!(
                "h2load exited with {status}: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        Ok(cpu)
    }
}

/// The CPU seconds of `pid` (every thread it ever had), if it has exited and not yet been
/// waited for: state `Z` in `/proc/PID/stat`, whose utime and stime then hold the whole
/// process's final counts. h2load's worker thread is gone by then, so its own counters (what
/// `procs::thread_cpu` reads) no longer exist.
fn cpu_if_exited_unreaped(pid: u32, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // fields[0] is field 3 (the state); utime and stime are fields 14 and 15.
    if fields.first() != Some(&"Z") {
        return None;
    }
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// Closed loop with h2load: a warm-up run, then the measured run with [`Mark::Start`] and
/// [`Mark::End`] around it. The outcome carries h2load's own CPU time as the load generator's.
#[allow(clippy::too_many_arguments)]
pub async fn closed_loop(
    program: &Path,
    target: SocketAddr,
    concurrency: usize,
    payload: &Bytes,
    warmup: Duration,
    measure: Duration,
    dir: &Path,
    ticks: f64,
    marks: &mut dyn FnMut(Mark),
) -> anyhow::Result<Outcome> {
    let (connections, streams) = shape(concurrency)?;
    let body = dir.join(format!("h2load-request-{}.bin", payload.len()));
    if !body.exists() {
        std::fs::write(&body, grpc_body(payload))
            .with_context(|| format!("write {}", body.display()))?;
    }
    let log = dir.join("h2load-requests.tsv");
    let mut run = Run {
        program,
        target,
        connections,
        streams,
        body: &body,
        duration: warmup,
        log: None,
        output: &dir.join("h2load-warmup.out"),
    };
    if !warmup.is_zero() {
        run.run(ticks).await.context("h2load warm-up")?;
    }
    let output = dir.join("h2load.out");
    // h2load appends to its log file: each measured run starts from an empty one.
    match std::fs::remove_file(&log) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("remove {}", log.display())),
    }
    run.duration = measure;
    run.log = Some(&log);
    run.output = &output;
    marks(Mark::Start);
    let cpu = run.run(ticks).await?;
    marks(Mark::End);
    let mut outcome = Outcome {
        measured: measure,
        loadgen_cpu_seconds: Some(cpu),
        ..Default::default()
    };
    let text = std::fs::read_to_string(&log).with_context(|| format!("read {}", log.display()))?;
    parse_log(&text, &mut outcome)?;
    if outcome.calls + outcome.errors == 0 {
        bail!(
            "h2load completed no call in {} ms (see {})",
            measure.as_millis(),
            output.display()
        );
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_in_flight_spread_over_connections_like_the_tonic_generator() {
        assert_eq!(shape(1).unwrap(), (1, 1));
        assert_eq!(shape(16).unwrap(), (1, 16));
        assert_eq!(shape(128).unwrap(), (2, 64));
        assert!(shape(0).is_err());
        assert!(
            shape(130).is_err(),
            "130 calls do not divide over 3 connections"
        );
    }

    #[test]
    fn the_request_body_is_one_uncompressed_grpc_message_with_the_payload() {
        let payload = Bytes::from_static(&[7u8; 256]);
        let body = grpc_body(&payload);
        assert_eq!(body[0], 0);
        let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!(length, body.len() - 5);
        let decoded = EchoRequest::decode(&body[5..]).unwrap();
        assert_eq!(decoded.payload, payload);
    }

    #[test]
    fn only_http_200_rows_count_as_calls_and_failed_streams_as_errors() {
        let mut outcome = Outcome::default();
        let log = "1795838568199868\t200\t352\n1795838568200292\t-1\t90\n\
                   1795838568200432\t200\t106\n1795838568200532\t503\t80\n";
        parse_log(log, &mut outcome).unwrap();
        assert_eq!(outcome.calls, 2);
        assert_eq!(outcome.latencies_ns, vec![352_000, 106_000]);
        assert_eq!(outcome.errors, 2);
        assert_eq!(
            outcome.first_error.as_deref(),
            Some("h2load: the stream failed (reset or connection lost)")
        );
        assert!(parse_log("1795838568199868\t200\n", &mut Outcome::default()).is_err());
        assert!(parse_log("1\tok\t3\n", &mut Outcome::default()).is_err());
    }
}
