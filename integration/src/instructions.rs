//! Instructions per call in each sidecar, counted by Valgrind's callgrind (`bench
//! --instructions`).
//!
//! On a shared or virtual machine CPU time per call moves by ±15% from run to run, and this one
//! has no hardware counters for `perf stat` to read, so a change worth a few percent of a call's
//! CPU cannot be seen in time. The number of instructions a call executes in user space barely
//! moves, so it can. It is not time: cache misses and the kernel's share (system calls, packet
//! handling) are not in it, which is why the timed scenarios stay the verdict and this count is
//! the tool for deciding whether a code change made a call cheaper.
//!
//! The sidecars run under `valgrind --tool=callgrind` with instrumentation off (about five times
//! slower), switched on for each measured window with `callgrind_control` and read back at its
//! end. Nothing in the sidecar is built differently for it.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// Why this mode cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let runs = crate::harness::tool_runs;
    (!runs("valgrind") || !runs("callgrind_control"))
        .then(|| "valgrind is not installed (Debian: apt-get install -y valgrind)".into())
}

/// Writes `DIR/locality-sidecar-under-callgrind`, a script that runs `sidecar` under callgrind
/// with instrumentation off, and returns its path: what the harness starts as the sidecar.
pub fn write_launcher(dir: &Path, sidecar: &Path) -> anyhow::Result<PathBuf> {
    let quote = |path: &Path| format!("'{}'", path.display().to_string().replace('\'', r"'\''"));
    let script = format!(
        "#!/bin/sh\nexec valgrind -q --tool=callgrind --instr-atstart=no --callgrind-out-file={} {} \"$@\"\n",
        quote(&dir.join("callgrind.out.%p")),
        quote(sidecar),
    );
    let path = dir.join("locality-sidecar-under-callgrind");
    std::fs::write(&path, script).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("make {} executable", path.display()))?;
    Ok(path)
}

/// One sidecar's instruction count over a window, switched through `callgrind_control`, which
/// returns once the process has carried out the command: a window starts and ends when the
/// switch has happened, not after a guessed delay.
pub struct Counter {
    pid: u32,
    counted: Option<u64>,
}

fn control(pid: u32, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .output()
        .context("cannot run callgrind_control")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    // It exits 0 on an unknown option too, with an error message.
    let refused = text.contains("No active callgrind runs") || text.starts_with("Error:");
    if !output.status.success() || refused {
        bail!(
            "callgrind_control {} {pid}: {}{}",
            args.join(" "),
            text.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(text)
}

impl Counter {
    pub fn new(pid: u32) -> Counter {
        Counter { pid, counted: None }
    }

    /// Switches instrumentation on and zeroes the counts.
    pub fn start(&mut self) -> anyhow::Result<()> {
        control(self.pid, &["--instr=on"])?;
        control(self.pid, &["--zero"])?;
        Ok(())
    }

    /// Reads the instructions executed since [`Counter::start`] and switches instrumentation off.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let text = control(self.pid, &["-e"])?;
        let total = total_instructions(&text).with_context(|| {
            format!("no instruction totals in callgrind_control's answer: {text:?}")
        })?;
        self.counted = Some(total);
        control(self.pid, &["--instr=off"])?;
        Ok(())
    }

    pub fn finish(self) -> anyhow::Result<u64> {
        self.counted.context("the window of this count never ended")
    }
}

/// The sum over threads of `callgrind_control -e` output (`Th N  1,234,567` lines under
/// `Totals:  Ir`); `None` when it has no thread line.
pub fn total_instructions(text: &str) -> Option<u64> {
    let counts: Vec<u64> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "Th").then_some(())?;
            words.next()?.parse::<u32>().ok()?;
            words.next()?.replace(',', "").parse::<u64>().ok()
        })
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_threads_instructions() {
        let text = "PID 32304: /tmp/thin/locality-sidecar run --config x.yaml\n\
            sending command status internal to pid 32304\n\n  Totals:        Ir \n   \
            Th 1  28,317,615 \n   Th 2      66,724 \n   Th 3     197,428 \n\n";
        assert_eq!(total_instructions(text), Some(28_581_767));
        assert_eq!(
            total_instructions("  No information available as instrumentation is switched off.\n"),
            None
        );
    }
}
