//! One configured upstream and the state its calls share: the live ranking of its endpoints,
//! the QUIC pool, the live policy, the A6 retry-throttling bucket, the process's replay budget,
//! its caps on calls in flight, and its metric series, resolved once here rather than looked up
//! on every attempt.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::config::live::PolicyWatch;
use crate::config::service_config::ThrottlingPolicy;
use crate::config::Tier;
use crate::endpoints::ranking::RankingWatch;
use crate::limits::{admit, Gate, Permit};
use crate::metrics::{metrics, AttemptLabels, CallLabels, TierLabels};
use crate::outbound::admission::Shed;
use crate::outbound::replay::ReplayBudget;
use crate::wire::grpc::{status_name, Code};
use crate::wire::quic::ConnectionPool;

/// One configured upstream: its endpoints, the live policy, and how to reach them.
pub struct Upstream {
    pub name: Arc<str>,
    /// The name upstream certificates must carry; also the `:authority` of forwarded calls.
    pub server_name: Arc<str>,
    /// `server_name`, parsed once: every forwarded call carries it.
    pub authority: http::uri::Authority,
    pub ranking: RankingWatch,
    pub pool: Arc<ConnectionPool>,
    pub policy: PolicyWatch,
    pub throttle: RetryThrottle,
    pub replay_budget: Arc<ReplayBudget>,
    pub metrics: UpstreamMetrics,
    /// Calls in flight to this upstream against `limits.maxCallsPerUpstream`.
    pub admission: Arc<Gate>,
    /// Calls in flight over all upstreams against `limits.maxCallsInFlight` (shared).
    pub process_admission: Arc<Gate>,
}

impl Upstream {
    /// Admits a call under the live caps, or says which one is full.
    pub fn admit(&self) -> Result<Permit, Shed> {
        let limits = self.policy.borrow().limits;
        self.process_admission.set_limit(limits.process);
        self.admission.set_limit(limits.per_upstream);
        admit(&self.process_admission, &self.admission).map_err(Shed::from)
    }
}

/// The gate of calls in flight to upstream `name` (`"all"`: the process), its count and cap in
/// the `calls_in_flight` gauges.
pub fn admission_gate(name: &str, limit: usize) -> Arc<Gate> {
    let labels = crate::metrics::upstream(name);
    let all = metrics();
    Gate::with_gauges(
        limit,
        all.calls_in_flight.get_or_create(&labels).clone(),
        all.calls_in_flight_limit.get_or_create(&labels).clone(),
    )
}

/// This upstream's metric series. Counters and histograms are shared handles: incrementing a
/// clone increments the registered series.
///
/// The per-call series (`calls` and `attempts`) are labelled by status as well, so they cannot
/// all be resolved up front; the OK ones, which nearly every call ends in, are resolved on first
/// use and kept, because a family lookup hashes and compares every label on every call.
pub struct UpstreamMetrics {
    name: Arc<str>,
    pub retries: Counter,
    pub transparent_retries: Counter,
    pub retries_throttled: Counter,
    pub ejections: Counter,
    pub hedges: Counter,
    pub hedges_won: Counter,
    pub call_duration: Histogram,
    /// By tier: `[node, zone, any]`.
    fallthroughs: [Counter; 3],
    attempt_duration: [Histogram; 3],
    /// Attempts answered with response headers (status `OK`), by tier.
    attempts_ok: [OnceLock<Counter>; 3],
    /// By method label; bounded by the number of method labels (see `Metrics::method_label`).
    methods: Mutex<HashMap<Arc<str>, Arc<MethodSeries>>>,
}

/// The `calls` series of one upstream and method: its labels, and the counters of calls that
/// end OK by tier, resolved on first use.
pub struct MethodSeries {
    upstream: Arc<str>,
    method: Arc<str>,
    ok: [OnceLock<Counter>; 3],
}

impl MethodSeries {
    /// The record of a call answered from `tier` (`None`: by the sidecar itself).
    pub fn record(self: &Arc<Self>, tier: Option<Tier>) -> CallRecord {
        CallRecord {
            series: self.clone(),
            tier,
        }
    }

    fn labels(&self, tier: Option<Tier>, status: &'static str) -> CallLabels {
        CallLabels {
            upstream: self.upstream.clone(),
            method: self.method.clone(),
            status,
            tier: tier.map_or("none", Tier::as_str),
        }
    }
}

/// A call's place in the `calls` metric, counted once its final status is known (at the end of
/// a streamed body).
pub struct CallRecord {
    series: Arc<MethodSeries>,
    tier: Option<Tier>,
}

impl CallRecord {
    pub fn finish(self, code: u32) {
        let series = &self.series;
        match self.tier {
            // A call the sidecar answered itself (no tier) never ends OK.
            Some(tier) if code == Code::Ok as u32 => {
                series.ok[tier_index(tier)]
                    .get_or_init(|| {
                        metrics()
                            .calls
                            .get_or_create(&series.labels(Some(tier), "OK"))
                            .clone()
                    })
                    .inc();
            }
            tier => {
                let labels = series.labels(tier, status_name(code));
                metrics().calls.get_or_create(&labels).inc();
            }
        }
    }
}

fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::Node => 0,
        Tier::Zone => 1,
        Tier::Any => 2,
    }
}

impl UpstreamMetrics {
    /// Registers (at zero) and resolves the series of the upstream called `name`.
    pub fn resolve(name: &Arc<str>) -> UpstreamMetrics {
        let all = metrics();
        all.init_upstream(name);
        let labels = crate::metrics::upstream(name.clone());
        let by_tier = |tier: Tier| TierLabels {
            upstream: name.clone(),
            tier: tier.as_str(),
        };
        let tiers = [Tier::Node, Tier::Zone, Tier::Any];
        UpstreamMetrics {
            name: name.clone(),
            retries: all.retries.get_or_create(&labels).clone(),
            transparent_retries: all.transparent_retries.get_or_create(&labels).clone(),
            retries_throttled: all.retries_throttled.get_or_create(&labels).clone(),
            ejections: all.ejections.get_or_create(&labels).clone(),
            hedges: all.hedges.get_or_create(&labels).clone(),
            hedges_won: all.hedges_won.get_or_create(&labels).clone(),
            call_duration: all.call_duration.get_or_create(&labels).clone(),
            fallthroughs: tiers.map(|tier| all.fallthroughs.get_or_create(&by_tier(tier)).clone()),
            attempt_duration: tiers
                .map(|tier| all.attempt_duration.get_or_create(&by_tier(tier)).clone()),
            attempts_ok: Default::default(),
            methods: Mutex::new(HashMap::new()),
        }
    }

    /// The `calls` series of this upstream's calls to `path`.
    pub fn method(&self, path: &str) -> Arc<MethodSeries> {
        let mut methods = self
            .methods
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(series) = methods.get(path) {
            return series.clone();
        }
        // Keyed by label, not path: every path past the label cap shares `other`'s entry.
        let method = metrics().method_label(path);
        methods
            .entry(method.clone())
            .or_insert_with(|| {
                Arc::new(MethodSeries {
                    upstream: self.name.clone(),
                    method,
                    ok: Default::default(),
                })
            })
            .clone()
    }

    /// Counts an attempt to `tier` that ended with `status` (the `attempts` metric).
    pub fn count_attempt(&self, tier: Tier, status: &'static str) {
        let labels = || AttemptLabels {
            upstream: self.name.clone(),
            tier: tier.as_str(),
            status,
        };
        if status == "OK" {
            self.attempts_ok[tier_index(tier)]
                .get_or_init(|| metrics().attempts.get_or_create(&labels()).clone())
                .inc();
        } else {
            metrics().attempts.get_or_create(&labels()).inc();
        }
    }

    pub fn fallthrough(&self, tier: Tier) -> &Counter {
        &self.fallthroughs[tier_index(tier)]
    }

    pub fn attempt_duration(&self, tier: Tier) -> &Histogram {
        &self.attempt_duration[tier_index(tier)]
    }
}

/// A6 retry throttling for one upstream: a token bucket that failures drain and successes
/// refill; retries stop while it is at or below half full, so a fully failing upstream gets
/// about one attempt per call instead of `maxAttempts`. Tokens are kept in thousandths, as
/// gRPC's own implementations do, so the arithmetic is exact.
#[derive(Debug)]
pub struct RetryThrottle {
    /// `u32::MAX` until first used: the bucket starts full at whatever size the live policy says.
    milli_tokens: AtomicU32,
}

impl Default for RetryThrottle {
    fn default() -> Self {
        RetryThrottle {
            milli_tokens: AtomicU32::new(u32::MAX),
        }
    }
}

impl RetryThrottle {
    fn update(&self, policy: &ThrottlingPolicy, change: impl Fn(u32) -> u32) -> u32 {
        let mut next = 0;
        // fetch_update only fails when the closure returns None, which this one never does.
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                let current = current.min(policy.max_milli_tokens);
                next = change(current).min(policy.max_milli_tokens);
                Some(next)
            });
        next
    }

    /// An attempt failed with a retryable status or a "do not retry" pushback.
    pub fn record_failure(&self, policy: &ThrottlingPolicy) {
        self.update(policy, |tokens| tokens.saturating_sub(1000));
    }

    /// A call ended OK.
    pub fn record_success(&self, policy: &ThrottlingPolicy) {
        self.update(policy, |tokens| {
            tokens.saturating_add(policy.milli_token_ratio)
        });
    }

    pub fn allows_retry(&self, policy: &ThrottlingPolicy) -> bool {
        self.update(policy, |tokens| tokens) > policy.max_milli_tokens / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition lines of `calls` and `attempts` for upstream `name`.
    fn series_of(name: &str) -> Vec<String> {
        let needle = format!("upstream=\"{name}\"");
        metrics()
            .encode()
            .lines()
            .filter(|line| {
                (line.starts_with("locality_sidecar_calls_total")
                    || line.starts_with("locality_sidecar_attempts_total"))
                    && line.contains(&needle)
            })
            .map(str::to_owned)
            .collect()
    }

    fn has(series: &[String], wanted: &[&str], value: &str) -> bool {
        series.iter().any(|line| {
            wanted.iter().all(|label| line.contains(label)) && line.ends_with(&format!(" {value}"))
        })
    }

    #[test]
    fn resolved_ok_counters_and_looked_up_statuses_land_in_the_same_series() {
        let name: Arc<str> = Arc::from("resolved-series-test");
        let upstream = UpstreamMetrics::resolve(&name);
        let method = upstream.method("/echo.Echo/Unary");
        assert!(Arc::ptr_eq(&method, &upstream.method("/echo.Echo/Unary")));
        // Nothing is created before a call ends in it.
        assert!(series_of(&name).is_empty(), "{:?}", series_of(&name));

        method.record(Some(Tier::Node)).finish(Code::Ok as u32);
        method.record(Some(Tier::Node)).finish(Code::Ok as u32);
        method
            .record(Some(Tier::Zone))
            .finish(Code::Unavailable as u32);
        method.record(None).finish(Code::DeadlineExceeded as u32);
        upstream.count_attempt(Tier::Node, "OK");
        upstream.count_attempt(Tier::Node, "OK");
        upstream.count_attempt(Tier::Any, "NOT_SENT");

        let series = series_of(&name);
        let counted = |metric: &str, status: &str, tier: &str, value: &str| {
            let labels = [
                metric.to_string(),
                format!("status=\"{status}\""),
                format!("tier=\"{tier}\""),
            ];
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            has(&series, &labels, value)
        };
        let call =
            |status, tier, value| counted("locality_sidecar_calls_total", status, tier, value);
        assert!(call("OK", "node", "2"), "{series:?}");
        assert!(call("UNAVAILABLE", "zone", "1"), "{series:?}");
        assert!(call("DEADLINE_EXCEEDED", "none", "1"), "{series:?}");
        assert!(
            series
                .iter()
                .filter(|line| line.starts_with("locality_sidecar_calls_total"))
                .all(|line| line.contains("method=\"/echo.Echo/Unary\"")),
            "{series:?}"
        );
        let attempt =
            |status, tier, value| counted("locality_sidecar_attempts_total", status, tier, value);
        assert!(attempt("OK", "node", "2"), "{series:?}");
        assert!(attempt("NOT_SENT", "any", "1"), "{series:?}");
        assert_eq!(series.len(), 5, "no other series: {series:?}");
    }

    fn policy(max_tokens: u32, milli_ratio: u32) -> ThrottlingPolicy {
        ThrottlingPolicy {
            max_milli_tokens: max_tokens * 1000,
            milli_token_ratio: milli_ratio,
        }
    }

    #[test]
    fn throttle_stops_retries_at_half_the_bucket_and_refills() {
        let policy = policy(10, 500);
        let throttle = RetryThrottle::default();
        assert!(throttle.allows_retry(&policy));
        for _ in 0..5 {
            throttle.record_failure(&policy);
        }
        // 10 - 5 = 5, which is not above 10 / 2.
        assert!(!throttle.allows_retry(&policy));
        throttle.record_success(&policy);
        assert!(throttle.allows_retry(&policy));
        for _ in 0..100 {
            throttle.record_success(&policy);
        }
        for _ in 0..4 {
            throttle.record_failure(&policy);
        }
        assert!(
            throttle.allows_retry(&policy),
            "refilled to the cap, not beyond"
        );
        throttle.record_failure(&policy);
        assert!(!throttle.allows_retry(&policy));
    }

    #[test]
    fn thousandths_add_up_exactly() {
        // Ten successes at 0.1 must give back exactly one token; in f64 they sum to 0.9999...
        let policy = policy(4, 100);
        let throttle = RetryThrottle::default();
        for _ in 0..3 {
            throttle.record_failure(&policy);
        }
        assert!(!throttle.allows_retry(&policy), "1 token of 4");
        for _ in 0..10 {
            throttle.record_success(&policy);
        }
        assert!(!throttle.allows_retry(&policy), "2 tokens is not above 2");
        for _ in 0..1 {
            throttle.record_success(&policy);
        }
        assert!(throttle.allows_retry(&policy), "2.1 tokens is above 2");
    }

    #[test]
    fn bucket_never_goes_below_empty_and_follows_a_smaller_live_policy() {
        let throttle = RetryThrottle::default();
        let big = policy(10, 1000);
        for _ in 0..50 {
            throttle.record_failure(&big);
        }
        throttle.record_success(&big);
        assert!(
            !throttle.allows_retry(&big),
            "one token after any number of failures"
        );
        let small = policy(2, 1000);
        throttle.record_success(&small);
        assert!(throttle.allows_retry(&small), "2 of 2 tokens");
    }
}
