//! How many of the app's calls the sidecar holds at once, and what happens to the rest.
//!
//! Every call in flight costs memory (its streams on both sides, header maps, buffers), so a
//! burst with no limit ends with the kernel's OOM killer taking the whole pod's calls. Limits
//! come from a memory budget (the container's cgroup limit, or `limits.memoryBudgetMiB`):
//! backpressure first, through the outbound listener's advertised
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (well-behaved gRPC clients queue in their own process),
//! then shedding: a call over the process-wide or per-upstream cap is answered at once with
//! `UNAVAILABLE` naming the limit. `UNAVAILABLE` because the call was not processed anywhere and
//! is safe to retry (gRPC's own load balancers answer drops the same way, and retry policies
//! list it), where `RESOURCE_EXHAUSTED` usually means a quota the caller should not retry into.
//! A permit is held from admission until the call's response ends, so open streams count.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;

use crate::outbound::attempt::ResponseBody;
use crate::wire::body::StreamFailure;

/// Memory assumed for the sidecar when neither the cgroup nor the config says: the limit
/// `inject` gives the container.
pub const DEFAULT_BUDGET_BYTES: u64 = 128 * 1024 * 1024;
/// What the process needs besides calls in flight (runtime, TLS, pools, discovery caches),
/// measured idle at ~11 MiB, with room for a few thousand endpoints.
const BASE_BYTES: u64 = 24 * 1024 * 1024;
/// Memory one unary call in flight costs end to end (measured ~16 KiB: h2 and h3 stream state,
/// header maps, tasks), with margin for streaming calls' buffers.
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

/// Which cap turned a call away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    Process { limit: usize },
    Upstream { limit: usize },
}

impl Shed {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Shed::Process { .. } => "process",
            Shed::Upstream { .. } => "upstream",
        }
    }

    pub fn message(self, upstream: &str) -> String {
        match self {
            Shed::Process { limit } => format!(
                "locality-sidecar is overloaded: {limit} calls in flight over all upstreams \
                 (limits.maxCallsInFlight); call to {upstream} not sent, retry later"
            ),
            Shed::Upstream { limit } => format!(
                "locality-sidecar is overloaded: {limit} calls in flight to upstream {upstream} \
                 (limits.maxCallsPerUpstream); call not sent, retry later"
            ),
        }
    }
}

/// One admitted call's place under both caps, given back when dropped.
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

/// Admits a call under the process-wide and the upstream's cap, or says which one is full.
pub fn admit(process: &Arc<Gate>, upstream: &Arc<Gate>) -> Result<Permit, Shed> {
    if !process.try_enter() {
        return Err(Shed::Process {
            limit: process.limit(),
        });
    }
    if !upstream.try_enter() {
        process.leave();
        return Err(Shed::Upstream {
            limit: upstream.limit(),
        });
    }
    Ok(Permit {
        gates: [process.clone(), upstream.clone()],
    })
}

/// A response body that holds its call's permit until the body ends or is dropped.
pub struct AdmittedBody {
    inner: ResponseBody,
    permit: Option<Permit>,
}

impl AdmittedBody {
    pub fn new(inner: ResponseBody, permit: Option<Permit>) -> AdmittedBody {
        AdmittedBody { inner, permit }
    }
}

impl Body for AdmittedBody {
    type Data = Bytes;
    type Error = StreamFailure;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailure>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // The call is over: its place goes back now, not when hyper drops the stream.
            this.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
    fn a_full_gate_sheds_and_a_freed_place_admits_again() {
        let process = Gate::new(2);
        let upstream = Gate::new(10);
        let first = admit(&process, &upstream).expect("room");
        let _second = admit(&process, &upstream).expect("room");
        assert_eq!(
            admit(&process, &upstream).unwrap_err(),
            Shed::Process { limit: 2 }
        );
        assert_eq!(upstream.in_flight(), 2, "a shed call holds nothing");
        drop(first);
        assert!(admit(&process, &upstream).is_ok());
    }

    #[test]
    fn the_upstream_cap_gives_back_the_process_place() {
        let process = Gate::new(10);
        let upstream = Gate::new(1);
        let _held = admit(&process, &upstream).expect("room");
        assert_eq!(
            admit(&process, &upstream).unwrap_err(),
            Shed::Upstream { limit: 1 }
        );
        assert_eq!(process.in_flight(), 1);
    }

    #[test]
    fn a_lowered_limit_applies_to_the_next_call() {
        let process = Gate::new(10);
        let upstream = Gate::new(10);
        let _held = admit(&process, &upstream).expect("room");
        process.set_limit(1);
        assert!(admit(&process, &upstream).is_err());
        process.set_limit(2);
        assert!(admit(&process, &upstream).is_ok());
    }

    #[test]
    fn shed_messages_name_the_limit() {
        let message = Shed::Upstream { limit: 7 }.message("echo");
        assert!(message.contains("7 calls"), "{message}");
        assert!(message.contains("limits.maxCallsPerUpstream"), "{message}");
    }
}
