//! Caps on calls in flight, shared by both roles: the app's calls out (per process and per
//! upstream) and peers' calls in to the local app (in all, and per peer connection).
//!
//! Every call in flight costs memory (its streams on both sides, header maps, buffers), so a
//! burst with no limit ends with the kernel's OOM killer taking the whole pod's calls. The caps
//! come from a memory budget: the container's cgroup limit, `limits.memoryBudgetMiB`, or what
//! `inject` gives the container. A [`Gate`] counts calls against a cap that live config may
//! change; [`admit`] takes a place under two gates at once (a wide one and a narrow one) or
//! says which is full, and the [`Permit`] gives both places back when dropped.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;

/// Memory assumed for the sidecar when neither the cgroup nor the config says: the limit
/// `inject` gives the container.
pub const DEFAULT_BUDGET_BYTES: u64 = 128 * 1024 * 1024;
/// What the process needs besides calls in flight (runtime, TLS, pools, discovery caches),
/// measured idle at ~11 MiB, with room for a few thousand endpoints.
const BASE_BYTES: u64 = 24 * 1024 * 1024;
/// Memory one call in flight costs end to end (measured ~12 KiB for a unary call or a server
/// stream, release build: h2 and h3 stream state, header maps, tasks; see BENCHMARKS.md), with
/// margin for streaming calls' buffers and the allocator.
pub const BYTES_PER_CALL: u64 = 24 * 1024;
/// Half the budget left to calls: the rest covers fragmentation and bursts of buffered data.
const CALL_SHARE: f64 = 0.5;

/// The limits in force (derived or configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// Calls in flight over all upstreams.
    pub process: usize,
    /// Calls in flight to one upstream.
    pub per_upstream: usize,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` of the outbound listeners' connections.
    pub streams_per_connection: u32,
}

/// The caps a memory budget allows: half of what is left after the base, at
/// [`BYTES_PER_CALL`] each; never under 64 calls, so a tiny budget still serves.
pub fn limits_for_budget(budget_bytes: u64) -> CallLimits {
    let for_calls = (budget_bytes.saturating_sub(BASE_BYTES) as f64 * CALL_SHARE) as u64;
    let calls = usize::try_from(for_calls / BYTES_PER_CALL)
        .unwrap_or(usize::MAX)
        .max(64);
    CallLimits {
        process: calls,
        per_upstream: calls,
        streams_per_connection: streams_per_connection(calls),
    }
}

/// Streams one app connection may hold at once: a quarter of the process cap, between 64 and
/// 1024. Streams cost memory even when their call is shed at once (h2 holds them until the
/// service answers), so a client that opens thousands on each connection must queue the rest
/// in its own process: measured with 8 connections x 2,000 streams, peak memory was 105 MB
/// with no per-connection cap, 81 MB at 1024 and 54 MB at 512. An app with more long-lived
/// streams than this on one connection should let its client open more connections (grpc-dotnet
/// does by default) or raise `limits.maxStreamsPerConnection`.
pub fn streams_per_connection(process_cap: usize) -> u32 {
    u32::try_from((process_cap / 4).clamp(64, 1024)).unwrap_or(1024)
}

/// The container's memory limit, read once per process.
pub static CGROUP_LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

/// The container's memory limit from its cgroup (v2 `memory.max`, else v1), if it has one.
pub fn cgroup_memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let parse = |text: String| text.trim().parse::<u64>().ok();
    let limit = read("/sys/fs/cgroup/memory.max")
        .and_then(parse)
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes").and_then(parse))?;
    // "max" does not parse; v1 reports "no limit" as a huge page-aligned number.
    (limit < 1 << 50).then_some(limit)
}

/// A count of calls in flight against a limit that live config may change. Both live in
/// metric gauges, so `/metrics` and the status page show calls in flight against their cap
/// without another counter to keep in step.
#[derive(Debug)]
pub struct Gate {
    in_flight: Gauge,
    limit: Gauge,
}

impl Gate {
    pub fn new(limit: usize) -> Arc<Gate> {
        Gate::with_gauges(limit, Gauge::default(), Gauge::default())
    }

    /// A gate whose count and limit are these (registered) gauges.
    pub fn with_gauges(limit: usize, in_flight: Gauge, limit_gauge: Gauge) -> Arc<Gate> {
        limit_gauge.set(i64::try_from(limit).unwrap_or(i64::MAX));
        Arc::new(Gate {
            in_flight,
            limit: limit_gauge,
        })
    }

    pub fn in_flight(&self) -> usize {
        usize::try_from(self.in_flight.get()).unwrap_or(0)
    }

    pub fn limit(&self) -> usize {
        usize::try_from(self.limit.get()).unwrap_or(0)
    }

    pub fn set_limit(&self, limit: usize) {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        if self.limit.get() != limit {
            self.limit.set(limit);
        }
    }

    fn try_enter(&self) -> bool {
        let limit = self.limit.get();
        if self.in_flight.inc() < limit {
            return true;
        }
        self.in_flight.dec();
        false
    }

    fn leave(&self) {
        self.in_flight.dec();
    }
}

/// One admitted call's place under both gates, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    gates: [Arc<Gate>; 2],
}

impl Drop for Permit {
    fn drop(&mut self) {
        for gate in &self.gates {
            gate.leave();
        }
    }
}

/// Which of the two gates was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The wide one (the process, or all calls to the app), with its limit.
    Wide { limit: usize },
    /// The narrow one (one upstream, or one peer connection), with its limit.
    Narrow { limit: usize },
}

/// Admits a call under a wide and a narrow cap, or says which one is full; a refused call
/// holds nothing.
pub fn admit(wide: &Arc<Gate>, narrow: &Arc<Gate>) -> Result<Permit, Full> {
    if !wide.try_enter() {
        return Err(Full::Wide {
            limit: wide.limit(),
        });
    }
    if !narrow.try_enter() {
        wide.leave();
        return Err(Full::Narrow {
            limit: narrow.limit(),
        });
    }
    Ok(Permit {
        gates: [wide.clone(), narrow.clone()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_give_caps_that_fit_them() {
        let inject_default = limits_for_budget(DEFAULT_BUDGET_BYTES);
        assert_eq!(inject_default.process, 2218);
        assert_eq!(inject_default.streams_per_connection, 554);
        // The caps' worst case stays well inside the budget.
        let worst = BASE_BYTES + inject_default.process as u64 * BYTES_PER_CALL;
        assert!(worst < DEFAULT_BUDGET_BYTES, "{worst}");
        assert_eq!(limits_for_budget(16 * 1024 * 1024).process, 64, "floor");
        assert!(limits_for_budget(1 << 30).process > 20_000);
    }

    #[test]
    fn a_full_gate_refuses_and_a_freed_place_admits_again() {
        let wide = Gate::new(2);
        let narrow = Gate::new(10);
        let first = admit(&wide, &narrow).expect("room");
        let _second = admit(&wide, &narrow).expect("room");
        assert_eq!(admit(&wide, &narrow).unwrap_err(), Full::Wide { limit: 2 });
        assert_eq!(narrow.in_flight(), 2, "a refused call holds nothing");
        drop(first);
        assert!(admit(&wide, &narrow).is_ok());
    }

    #[test]
    fn the_narrow_cap_gives_back_the_wide_place() {
        let wide = Gate::new(10);
        let narrow = Gate::new(1);
        let _held = admit(&wide, &narrow).expect("room");
        assert_eq!(
            admit(&wide, &narrow).unwrap_err(),
            Full::Narrow { limit: 1 }
        );
        assert_eq!(wide.in_flight(), 1);
    }

    #[test]
    fn a_lowered_limit_applies_to_the_next_call() {
        let wide = Gate::new(10);
        let narrow = Gate::new(10);
        let _held = admit(&wide, &narrow).expect("room");
        wide.set_limit(1);
        assert!(admit(&wide, &narrow).is_err());
        wide.set_limit(2);
        assert!(admit(&wide, &narrow).is_ok());
    }
}
