//! Allocations per call in each sidecar, counted from outside the process (`bench
//! --allocations`).
//!
//! On a shared or virtual machine CPU time per call moves by ±15% from run to run, so small
//! savings cannot be seen in it; the number of heap allocations a call costs does not move, and
//! each one is work (the allocator, and the copy or map that usually comes with it). The kernel
//! does the counting: uprobes on the allocator's entry points in the sidecar binary, read by
//! `perf stat` around the measured window of a closed loop. Nothing in the sidecar changes for
//! it. Each probe hit traps into the kernel, so this mode measures no time.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context as _};

/// What every Rust allocation in the sidecar goes through: the `mimalloc` crate calls the
/// aligned entry points for `alloc`, `alloc_zeroed` and `realloc`.
pub const ENTRY_POINTS: [&str; 3] = [
    "mi_malloc_aligned",
    "mi_zalloc_aligned",
    "mi_realloc_aligned",
];
/// The uprobe group; one set of probes serves every process of the same binary.
const GROUP: &str = "locality_alloc";
/// How long `perf stat` may take to start and open its control pipes.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

/// Why this mode cannot run here, if it cannot: uprobes need root and `perf`.
pub fn unavailable() -> Option<String> {
    if !crate::harness::running_as_root() {
        return Some("uprobes need root".into());
    }
    (!crate::harness::tool_runs("perf"))
        .then(|| "perf is not installed (Debian: apt-get install -y linux-perf)".into())
}

fn perf_probe(args: &[&str], binary: Option<&Path>) -> anyhow::Result<()> {
    let mut command = Command::new("perf");
    command.args(["probe", "-q"]);
    if let Some(binary) = binary {
        command.arg("-x").arg(binary);
    }
    let output = command
        .args(args)
        .output()
        .context("cannot run perf probe")?;
    if !output.status.success() {
        bail!(
            "perf probe {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The allocator probes on one binary, removed again when dropped.
pub struct Probes;

impl Probes {
    pub fn add(binary: &Path) -> anyhow::Result<Probes> {
        // Left over by an interrupted run, or absent: either way the group starts empty.
        let _ = perf_probe(&["-d", &format!("{GROUP}:*")], None);
        for symbol in ENTRY_POINTS {
            perf_probe(&["-a", &format!("{GROUP}:{symbol}={symbol}")], Some(binary)).with_context(
                || {
                    format!(
                        "cannot probe {symbol} in {} (is it built with mimalloc?)",
                        binary.display()
                    )
                },
            )?;
        }
        Ok(Probes)
    }

    pub fn events(&self) -> String {
        ENTRY_POINTS
            .map(|symbol| format!("{GROUP}:{symbol}"))
            .join(",")
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        let _ = perf_probe(&["-d", &format!("{GROUP}:*")], None);
    }
}

/// `perf stat` attached to one process with its counters off, switched on and off through
/// its control pipe (`--control`), which acknowledges each switch: a window's count starts
/// and ends when the switch has happened, not after a guessed delay.
pub struct Counter {
    perf: Child,
    control: File,
    acks: BufReader<File>,
    output: PathBuf,
}

fn make_fifo(path: &Path) -> anyhow::Result<()> {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .context("cannot run mkfifo")?;
    if !status.success() {
        bail!("mkfifo {} failed", path.display());
    }
    Ok(())
}

impl Counter {
    pub fn attach(pid: u32, events: &str, dir: &Path, label: &str) -> anyhow::Result<Counter> {
        let control_path = dir.join(format!("{label}.perf-control"));
        let ack_path = dir.join(format!("{label}.perf-ack"));
        let output = dir.join(format!("{label}.perf-stat"));
        for fifo in [&control_path, &ack_path] {
            let _ = std::fs::remove_file(fifo);
            make_fifo(fifo)?;
        }
        let mut perf = Command::new("perf")
            .args(["stat", "-x,", "-e", events, "-p", &pid.to_string()])
            .args(["-D", "-1", "--control"])
            .arg(format!(
                "fifo:{},{}",
                control_path.display(),
                ack_path.display()
            ))
            .arg("-o")
            .arg(&output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join(format!("{label}.perf-log")))?)
            .spawn()
            .context("cannot start perf stat")?;
        // Opening one end of a FIFO waits for the other end: perf opens both as it starts.
        // The opens run on a thread so that a perf that fails to start is noticed instead.
        let (opened, pipes) = mpsc::channel();
        let (control_at, ack_at) = (control_path.clone(), ack_path.clone());
        std::thread::spawn(move || {
            let pair = std::fs::OpenOptions::new()
                .write(true)
                .open(&control_at)
                .and_then(|control| Ok((control, File::open(&ack_at)?)));
            let _ = opened.send(pair);
        });
        let deadline = std::time::Instant::now() + ATTACH_TIMEOUT;
        let (control, acks) = loop {
            match pipes.recv_timeout(Duration::from_millis(50)) {
                Ok(pair) => break pair.context("cannot open perf's control pipes")?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = perf.try_wait()? {
                        bail!(
                            "perf stat on pid {pid} exited at start ({status}); see its log in {}",
                            dir.display()
                        );
                    }
                    if std::time::Instant::now() > deadline {
                        let _ = perf.kill();
                        bail!("perf stat on pid {pid} did not open its control pipes within {ATTACH_TIMEOUT:?}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the thread opening perf's control pipes ended without an answer")
                }
            }
        };
        Ok(Counter {
            perf,
            control,
            acks: BufReader::new(acks),
            output,
        })
    }

    /// Sends `enable` or `disable` and waits for perf to acknowledge it.
    pub fn switch(&mut self, command: &str) -> anyhow::Result<()> {
        writeln!(self.control, "{command}").context("cannot write to perf's control pipe")?;
        let mut ack = String::new();
        self.acks
            .read_line(&mut ack)
            .context("cannot read perf's acknowledgement")?;
        // perf writes its answer with the string's terminating NUL, which the next line starts
        // with.
        if ack.trim_matches(|c: char| c == '\0' || c.is_whitespace()) != "ack" {
            bail!("perf answered {ack:?} to {command}");
        }
        Ok(())
    }

    /// Stops perf and returns the events it counted while enabled.
    pub fn finish(mut self) -> anyhow::Result<u64> {
        // SIGINT makes perf stat print its counts and exit.
        let _ = Command::new("kill")
            .args(["-INT", &self.perf.id().to_string()])
            .status();
        self.perf.wait().context("perf stat did not exit")?;
        let text = std::fs::read_to_string(&self.output)
            .with_context(|| format!("cannot read {}", self.output.display()))?;
        Ok(count_events(&text))
    }
}

/// The sum of the counts in `perf stat -x,` output (events that never fired read
/// `<not counted>` and add nothing).
pub fn count_events(text: &str) -> u64 {
    let event_prefix = format!("{GROUP}:");
    text.lines()
        .filter(|line| line.contains(&event_prefix))
        .filter_map(|line| line.split(',').next()?.trim().parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_counted_events_and_skips_the_rest() {
        let text = "# started on Fri Nov 27 16:42:34 2026\n\n\
            1200,,locality_alloc:mi_malloc_aligned,1000,100.00,,\n\
            <not counted>,,locality_alloc:mi_zalloc_aligned,0,100.00,,\n\
            34,,locality_alloc:mi_realloc_aligned,1000,100.00,,\n\
            Events enabled\nEvents disabled\n";
        assert_eq!(count_events(text), 1234);
    }
}
