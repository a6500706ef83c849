//! One configured upstream and the state its calls share: the live ranking of its endpoints,
//! the QUIC pool, the live policy, the A6 retry-throttling bucket and the process's replay budget.

use std::sync::{Arc, Mutex};

use crate::config::live::PolicyWatch;
use crate::config::service_config::ThrottlingPolicy;
use crate::endpoints::ranking::RankingWatch;
use crate::outbound::replay::ReplayBudget;
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
}

/// A6 retry throttling for one upstream: a token bucket that failures drain and successes
/// refill; retries stop while it is at or below half full, so a fully failing upstream gets
/// about one attempt per call instead of `maxAttempts`.
#[derive(Debug, Default)]
pub struct RetryThrottle {
    tokens: Mutex<Option<f64>>,
}

impl RetryThrottle {
    fn update(&self, policy: &ThrottlingPolicy, change: impl FnOnce(f64) -> f64) -> f64 {
        let mut tokens = self
            .tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = change(tokens.unwrap_or(policy.max_tokens)).clamp(0.0, policy.max_tokens);
        *tokens = Some(next);
        next
    }

    pub fn record_failure(&self, policy: &ThrottlingPolicy) {
        self.update(policy, |tokens| tokens - 1.0);
    }

    pub fn record_success(&self, policy: &ThrottlingPolicy) {
        self.update(policy, |tokens| tokens + policy.token_ratio);
    }

    pub fn allows_retry(&self, policy: &ThrottlingPolicy) -> bool {
        self.update(policy, |tokens| tokens) > policy.max_tokens / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_stops_retries_at_half_the_bucket_and_refills() {
        let policy = ThrottlingPolicy {
            max_tokens: 10.0,
            token_ratio: 0.5,
        };
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
}
