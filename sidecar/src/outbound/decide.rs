//! The decision step of a call (gRFC A6 with locality fall-through), apart from the code that
//! sends: given how one attempt ended and what the call has spent so far, say what happens next.
//!
//! It is a plain synchronous function over plain values, so every rule is unit-tested without
//! sockets: retryable codes, `maxAttempts`, retry throttling, server pushback, the commit point,
//! the transparent-retry budget, the deadline left, `waitForReady`, `perAttemptRecvTimeout`,
//! and whether the attempt counts for or against its endpoint (outlier ejection).

use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use crate::config::service_config::{HedgingPolicy, RetryPolicy, ThrottlingPolicy};
use crate::outbound::upstream::RetryThrottle;
use crate::wire::grpc::Code;

/// Transparent retries of requests that never left this sidecar: enough to get past a few dead
/// endpoints, bounded so a call can never loop between endpoints that all refuse it.
pub const MAX_TRANSPARENT_RETRIES: u32 = 4;

/// `grpc-retry-pushback-ms`: the server's say on when (or whether) to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    None,
    After(Duration),
    /// A negative or malformed value: do not retry (A6).
    DoNotRetry,
}

impl Pushback {
    /// Parses the header as A6 says: a signed 32-bit count of milliseconds.
    pub fn parse(value: Option<&HeaderValue>) -> Pushback {
        let Some(value) = value else {
            return Pushback::None;
        };
        match value.to_str().ok().map(str::trim).map(str::parse::<i32>) {
            Some(Ok(ms)) if ms >= 0 => Pushback::After(Duration::from_millis(ms as u64)),
            _ => Pushback::DoNotRetry,
        }
    }
}

/// How one attempt ended, as far as deciding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No endpoint could be picked: the upstream has none ready.
    NoEndpoint,
    /// The request never left this sidecar: the connection or the stream could not be opened.
    /// `fresh` is false when another call already reported the same failure (a remembered
    /// failed connect): the endpoint is charged once per failure, not once per call.
    NotSent { fresh: bool },
    /// The connection carrying the attempt was lost before response headers (declared dead,
    /// reset by a restarted peer, closed): a transport loss, UNAVAILABLE. `fresh` as above.
    LinkLost { fresh: bool },
    /// The peer sidecar took the request but its app never saw it (refused stream, app
    /// unreachable, app going away). A6 allows one transparent retry of such a request.
    RefusedByPeer,
    /// A status before any response headers: a trailers-only answer from the app, or the
    /// sidecar's own status for a stream that failed.
    Status { code: Code, pushback: Pushback },
    /// No response headers within `perAttemptRecvTimeout`; the attempt was abandoned.
    AttemptTimedOut,
    /// The call's deadline passed before response headers.
    DeadlineExceeded,
    /// Response headers arrived: the call is committed to this attempt.
    Committed,
}

/// What the attempt says about its endpoint's health, for outlier ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The endpoint answered: its failure streak ends.
    Answered,
    /// A connection failure, a transport loss, a refusal or a timeout: counts toward ejection.
    Failed,
    /// Says nothing about the endpoint (none was tried).
    Unknown,
}

/// What the call does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Answer the app with this attempt's result (its response, or the status the sidecar made
    /// for it).
    Respond,
    /// Try again at once on another endpoint, outside `maxAttempts` (a transparent retry).
    RetryNow,
    /// Try again after this delay (a counted retry).
    RetryAfter(Duration),
    /// No endpoint is ready and the method waits for one (`waitForReady`): wait for the
    /// endpoint set to change, within the deadline.
    WaitForEndpoints,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub next: Next,
    pub health: Health,
    /// True when a retry was wanted but the upstream's throttle refused it.
    pub throttled: bool,
}

/// The policy one call runs under, fixed when it arrives (later config changes apply to new
/// calls only).
#[derive(Debug, Clone, Default)]
pub struct CallPolicy {
    pub retry: Option<RetryPolicy>,
    /// Exclusive with `retry` (validation sees to it).
    pub hedging: Option<HedgingPolicy>,
    pub throttling: Option<ThrottlingPolicy>,
    pub wait_for_ready: bool,
    /// The earlier of the app's `grpc-timeout` and the method config's `timeout`.
    pub deadline: Option<Instant>,
}

impl CallPolicy {
    /// When the attempt starting now must have its response headers: the call's deadline,
    /// or sooner with `perAttemptRecvTimeout`. The bool is true when the per-attempt limit is
    /// the earlier one.
    pub fn attempt_deadline(&self, now: Instant) -> (Option<Instant>, bool) {
        let per_attempt = self
            .retry
            .as_ref()
            .and_then(|retry| retry.per_attempt_recv_timeout)
            .map(|timeout| now + timeout);
        match (self.deadline, per_attempt) {
            (Some(call), Some(attempt)) if attempt < call => (Some(attempt), true),
            (None, Some(attempt)) => (Some(attempt), true),
            (call, _) => (call, false),
        }
    }
}

/// What the call has spent so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallState {
    /// Attempts counted against `maxAttempts` (also `grpc-previous-rpc-attempts`).
    pub counted_attempts: u32,
    pub transparent_retries: u32,
    /// The one transparent retry A6 allows for a request that reached the peer but not its app.
    pub refused_retry_used: bool,
    /// Counted retries since the last server pushback: the exponent of A6's backoff.
    pub retries_since_pushback: u32,
}

/// Facts about the moment of deciding that the loop observes and the decision only reads.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub now: Instant,
    /// Another endpoint this call has not tried is available.
    pub untried_remains: bool,
    /// The whole request can still be sent again (the replay buffer kept all of it).
    pub replayable: bool,
    /// A uniform sample in [0, 1) for the backoff's jitter.
    pub jitter: f64,
    pub throttle: &'a RetryThrottle,
}

/// Decides what follows one attempt, updating the call's counts (and the upstream's throttle,
/// which A6 charges per attempt).
pub fn decide(
    state: &mut CallState,
    policy: &CallPolicy,
    outcome: Outcome,
    facts: Facts<'_>,
) -> Decision {
    let health = health_of(outcome);
    let respond = |health| Decision {
        next: Next::Respond,
        health,
        throttled: false,
    };
    let (code, pushback, always_retryable) = match outcome {
        // A6's success token is given when the call ends OK, not at its headers.
        Outcome::Committed | Outcome::DeadlineExceeded => return respond(health),
        Outcome::NoEndpoint if policy.wait_for_ready => {
            return Decision {
                next: Next::WaitForEndpoints,
                health,
                throttled: false,
            }
        }
        Outcome::NotSent { .. }
            if facts.untried_remains
                && facts.replayable
                && state.transparent_retries < MAX_TRANSPARENT_RETRIES =>
        {
            state.transparent_retries += 1;
            return Decision {
                next: Next::RetryNow,
                health,
                throttled: false,
            };
        }
        Outcome::RefusedByPeer if !state.refused_retry_used && facts.replayable => {
            state.refused_retry_used = true;
            return Decision {
                next: Next::RetryNow,
                health,
                throttled: false,
            };
        }
        // The attempt moves on whatever the retryable codes say: that is what the setting asks.
        Outcome::AttemptTimedOut => (Code::Unavailable, Pushback::None, true),
        Outcome::Status { code, pushback } => (code, pushback, false),
        Outcome::NoEndpoint
        | Outcome::NotSent { .. }
        | Outcome::RefusedByPeer
        | Outcome::LinkLost { .. } => (Code::Unavailable, Pushback::None, false),
    };

    // Under the retry policy from here: the attempt counts.
    state.counted_attempts += 1;
    let retryable = policy
        .retry
        .as_ref()
        .filter(|retry| always_retryable || retry.is_retryable(code));
    if let Some(throttling) = &policy.throttling {
        if code == Code::Ok {
            facts.throttle.record_success(throttling);
        } else if retryable.is_some() || pushback == Pushback::DoNotRetry {
            facts.throttle.record_failure(throttling);
        }
    }
    let Some(retry) = retryable else {
        return respond(health);
    };
    if pushback == Pushback::DoNotRetry || state.counted_attempts >= retry.max_attempts {
        return respond(health);
    }
    if let Some(throttling) = &policy.throttling {
        if !facts.throttle.allows_retry(throttling) {
            return Decision {
                next: Next::Respond,
                health,
                throttled: true,
            };
        }
    }
    if !facts.replayable {
        // More was sent than the replay buffer keeps: the call is committed (A6).
        return respond(health);
    }
    let delay = match pushback {
        Pushback::After(delay) => {
            state.retries_since_pushback = 0;
            delay
        }
        _ => {
            state.retries_since_pushback += 1;
            retry.backoff(state.retries_since_pushback, facts.jitter)
        }
    };
    if policy
        .deadline
        .is_some_and(|deadline| facts.now + delay >= deadline)
    {
        // Waiting would outlive the call: answer now with what this attempt got.
        return respond(health);
    }
    Decision {
        next: Next::RetryAfter(delay),
        health,
        throttled: false,
    }
}

/// What an attempt says about its endpoint, as [`decide`] judges it: a failure when the link or
/// the endpoint failed (once per failure), an answer when the app answered.
pub fn health_of(outcome: Outcome) -> Health {
    let charged = |fresh: bool| {
        if fresh {
            Health::Failed
        } else {
            Health::Unknown
        }
    };
    match outcome {
        Outcome::Committed => Health::Answered,
        Outcome::Status {
            code: Code::Unavailable,
            ..
        } => Health::Failed,
        Outcome::Status { .. } => Health::Answered,
        Outcome::NoEndpoint => Health::Unknown,
        Outcome::NotSent { fresh } | Outcome::LinkLost { fresh } => charged(fresh),
        Outcome::RefusedByPeer | Outcome::AttemptTimedOut | Outcome::DeadlineExceeded => {
            Health::Failed
        }
    }
}

/// What a hedged call does after one of its attempts ended without response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeStep {
    /// Answer the app with this attempt's result; the other attempts are cancelled.
    Respond,
    /// Let the other attempts (or the next hedging delay) go on.
    Wait,
    /// Send the next hedged attempt now (A6: a non-fatal status does not wait for the delay).
    SendAnother,
}

/// The status a hedged attempt's outcome stands for: the app's or the sidecar's own.
pub fn hedged_status(outcome: Outcome) -> (Code, Pushback) {
    match outcome {
        Outcome::Status { code, pushback } => (code, pushback),
        Outcome::DeadlineExceeded => (Code::DeadlineExceeded, Pushback::None),
        Outcome::Committed => (Code::Ok, Pushback::None),
        // Never reached an app, or the link or the attempt's time ran out: UNAVAILABLE.
        Outcome::NoEndpoint
        | Outcome::NotSent { .. }
        | Outcome::RefusedByPeer
        | Outcome::LinkLost { .. }
        | Outcome::AttemptTimedOut => (Code::Unavailable, Pushback::None),
    }
}

/// A6's rules for one ended hedged attempt. `sent` attempts were started, `running` of them
/// are still going; `can_send` says an endpoint is left, the request can be replayed and the
/// upstream's throttle allows more. A fatal status (anything not in `nonFatalStatusCodes`)
/// is the answer; requests that never reached an app count as non-fatal, as A6's transparent
/// retries would have it.
pub fn after_hedged_attempt(
    policy: &HedgingPolicy,
    outcome: Outcome,
    sent: u32,
    running: usize,
    can_send: bool,
) -> HedgeStep {
    let (code, pushback) = hedged_status(outcome);
    let transport = !matches!(outcome, Outcome::Status { .. });
    let fatal = !(transport || policy.is_non_fatal(code));
    if outcome == Outcome::DeadlineExceeded || fatal {
        return HedgeStep::Respond;
    }
    let more = sent < policy.max_attempts && can_send && pushback != Pushback::DoNotRetry;
    match (more, running) {
        (true, _) => HedgeStep::SendAnother,
        (false, 0) => HedgeStep::Respond,
        (false, _) => HedgeStep::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::service_config::ServiceConfig;
    use serde_json::json;

    fn retry(extra: serde_json::Value) -> RetryPolicy {
        let mut policy = json!({"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]});
        if let (Some(target), Some(source)) = (policy.as_object_mut(), extra.as_object()) {
            target.extend(source.clone());
        }
        let config = json!({"methodConfig": [{"name": [{}], "retryPolicy": policy}]});
        ServiceConfig::parse(&config, "t")
            .unwrap()
            .for_path("/a.A/M")
            .unwrap()
            .retry
            .clone()
            .unwrap()
    }

    fn policy() -> CallPolicy {
        CallPolicy {
            retry: Some(retry(json!({}))),
            ..CallPolicy::default()
        }
    }

    struct Run {
        state: CallState,
        policy: CallPolicy,
        throttle: RetryThrottle,
        now: Instant,
        untried_remains: bool,
        replayable: bool,
    }

    impl Run {
        fn new(policy: CallPolicy) -> Run {
            Run {
                state: CallState::default(),
                policy,
                throttle: RetryThrottle::default(),
                now: Instant::now(),
                untried_remains: true,
                replayable: true,
            }
        }

        fn after(&mut self, outcome: Outcome) -> Decision {
            let facts = Facts {
                now: self.now,
                untried_remains: self.untried_remains,
                replayable: self.replayable,
                // Mid-range jitter: exactly 1.0x the nominal backoff.
                jitter: 0.5,
                throttle: &self.throttle,
            };
            decide(&mut self.state, &self.policy, outcome, facts)
        }
    }

    fn status(code: Code) -> Outcome {
        Outcome::Status {
            code,
            pushback: Pushback::None,
        }
    }

    fn millis(ms: u64) -> Next {
        Next::RetryAfter(Duration::from_millis(ms))
    }

    #[test]
    fn retryable_status_backs_off_exponentially_until_max_attempts() {
        let mut run = Run::new(policy());
        assert_eq!(run.after(status(Code::Unavailable)).next, millis(100));
        assert_eq!(run.after(status(Code::Unavailable)).next, millis(200));
        assert_eq!(run.after(status(Code::Unavailable)).next, millis(400));
        let last = run.after(status(Code::Unavailable));
        assert_eq!(last.next, Next::Respond, "4 attempts is maxAttempts");
        assert_eq!(run.state.counted_attempts, 4);
    }

    #[test]
    fn backoff_is_capped_by_max_backoff() {
        let mut run = Run::new(CallPolicy {
            retry: Some(retry(json!({"maxAttempts": 5, "initialBackoff": "0.4s"}))),
            ..CallPolicy::default()
        });
        let delays: Vec<Next> = (0..5)
            .map(|_| run.after(status(Code::Unavailable)).next)
            .collect();
        assert_eq!(
            delays,
            [
                millis(400),
                millis(800),
                millis(1000),
                millis(1000),
                Next::Respond
            ]
        );
    }

    #[test]
    fn non_retryable_status_is_answered_at_once() {
        for code in [
            Code::InvalidArgument,
            Code::Internal,
            Code::DeadlineExceeded,
        ] {
            let mut run = Run::new(policy());
            let decision = run.after(status(code));
            assert_eq!(decision.next, Next::Respond, "{code}");
            assert_eq!(decision.health, Health::Answered, "the app answered {code}");
        }
    }

    #[test]
    fn without_a_retry_policy_nothing_is_retried_but_never_sent_requests_are() {
        let mut run = Run::new(CallPolicy::default());
        assert_eq!(
            run.after(Outcome::NotSent { fresh: true }).next,
            Next::RetryNow
        );
        assert_eq!(run.after(status(Code::Unavailable)).next, Next::Respond);
        let mut run = Run::new(CallPolicy::default());
        assert_eq!(run.after(Outcome::NoEndpoint).next, Next::Respond);
    }

    #[test]
    fn committed_and_ok_calls_are_answered() {
        let mut run = Run::new(policy());
        let decision = run.after(Outcome::Committed);
        assert_eq!(decision.next, Next::Respond);
        assert_eq!(decision.health, Health::Answered);
        assert_eq!(run.after(status(Code::Ok)).next, Next::Respond);
    }

    #[test]
    fn unavailable_counts_against_the_endpoint_other_statuses_for_it() {
        let mut run = Run::new(policy());
        assert_eq!(run.after(status(Code::Unavailable)).health, Health::Failed);
        assert_eq!(run.after(status(Code::NotFound)).health, Health::Answered);
        assert_eq!(run.after(Outcome::NoEndpoint).health, Health::Unknown);
        let mut run = Run::new(policy());
        assert_eq!(run.after(Outcome::AttemptTimedOut).health, Health::Failed);
        assert_eq!(run.after(Outcome::DeadlineExceeded).health, Health::Failed);
    }

    #[test]
    fn pushback_delay_replaces_backoff_and_resets_its_exponent() {
        let mut run = Run::new(policy());
        assert_eq!(run.after(status(Code::Unavailable)).next, millis(100));
        assert_eq!(run.after(status(Code::Unavailable)).next, millis(200));
        let pushed = Outcome::Status {
            code: Code::Unavailable,
            pushback: Pushback::After(Duration::from_millis(750)),
        };
        assert_eq!(run.after(pushed).next, millis(750));
        let mut run = Run::new(CallPolicy {
            retry: Some(retry(json!({"maxAttempts": 5}))),
            ..CallPolicy::default()
        });
        run.after(status(Code::Unavailable));
        run.after(pushed);
        assert_eq!(
            run.after(status(Code::Unavailable)).next,
            millis(100),
            "after a pushback, backoff starts again from initialBackoff"
        );
    }

    #[test]
    fn pushback_of_a_non_retryable_status_does_not_make_it_retryable() {
        let mut run = Run::new(policy());
        let outcome = Outcome::Status {
            code: Code::InvalidArgument,
            pushback: Pushback::After(Duration::from_millis(5)),
        };
        assert_eq!(run.after(outcome).next, Next::Respond);
    }

    #[test]
    fn do_not_retry_pushback_stops_and_drains_the_throttle() {
        let mut run = Run::new(CallPolicy {
            throttling: Some(ThrottlingPolicy {
                max_milli_tokens: 2000,
                milli_token_ratio: 100,
            }),
            ..policy()
        });
        let refused = Outcome::Status {
            code: Code::InvalidArgument,
            pushback: Pushback::DoNotRetry,
        };
        assert_eq!(run.after(refused).next, Next::Respond);
        // 2 - 1 = 1 token left, not above half of 2: the next retryable failure is throttled.
        let decision = run.after(status(Code::Unavailable));
        assert_eq!(decision.next, Next::Respond);
        assert!(decision.throttled);
    }

    #[test]
    fn pushback_header_is_a_signed_32_bit_count() {
        let parse = |text: &'static str| Pushback::parse(Some(&HeaderValue::from_static(text)));
        assert_eq!(Pushback::parse(None), Pushback::None);
        assert_eq!(parse("0"), Pushback::After(Duration::ZERO));
        assert_eq!(parse("250"), Pushback::After(Duration::from_millis(250)));
        assert_eq!(
            parse("2147483647"),
            Pushback::After(Duration::from_millis(2_147_483_647))
        );
        for bad in ["-1", "2147483648", "1.5", "soon", ""] {
            assert_eq!(parse(bad), Pushback::DoNotRetry, "{bad:?}");
        }
    }

    #[test]
    fn throttle_counts_retryable_failures_and_ok_only() {
        let throttling = ThrottlingPolicy {
            max_milli_tokens: 3000,
            milli_token_ratio: 1000,
        };
        let mut run = Run::new(CallPolicy {
            throttling: Some(throttling.clone()),
            ..policy()
        });
        // Non-retryable, non-OK statuses neither drain nor refill the bucket.
        for _ in 0..5 {
            run.after(status(Code::NotFound));
        }
        assert!(run.throttle.allows_retry(&throttling));
        run.state = CallState::default();
        assert_eq!(run.after(status(Code::Unavailable)).next, millis(100));
        let throttled = run.after(status(Code::Unavailable));
        assert!(throttled.throttled, "3 - 2 = 1 token is not above 1.5");
        run.after(status(Code::Ok));
        assert!(
            run.throttle.allows_retry(&throttling),
            "OK gave a token back"
        );
    }

    #[test]
    fn a_retry_that_would_outlive_the_deadline_is_not_made() {
        let mut run = Run::new(policy());
        run.policy.deadline = Some(run.now + Duration::from_millis(150));
        assert_eq!(run.after(status(Code::Unavailable)).next, millis(100));
        assert_eq!(
            run.after(status(Code::Unavailable)).next,
            Next::Respond,
            "a 200 ms backoff ends after the deadline"
        );
    }

    #[test]
    fn a_request_the_replay_buffer_could_not_keep_is_committed() {
        let mut run = Run::new(policy());
        run.replayable = false;
        assert_eq!(run.after(status(Code::Unavailable)).next, Next::Respond);
        assert_eq!(
            run.after(Outcome::NotSent { fresh: true }).next,
            Next::Respond
        );
        assert_eq!(run.after(Outcome::RefusedByPeer).next, Next::Respond);
    }

    #[test]
    fn never_sent_requests_retry_transparently_while_untried_endpoints_remain() {
        let mut run = Run::new(policy());
        for _ in 0..MAX_TRANSPARENT_RETRIES {
            assert_eq!(
                run.after(Outcome::NotSent { fresh: true }).next,
                Next::RetryNow
            );
        }
        assert_eq!(
            run.state.counted_attempts, 0,
            "transparent retries are free"
        );
        // The budget is spent: the call goes on under the retry policy, with backoff.
        assert_eq!(
            run.after(Outcome::NotSent { fresh: true }).next,
            millis(100)
        );
        assert_eq!(run.state.counted_attempts, 1);
    }

    #[test]
    fn with_no_untried_endpoint_a_never_sent_request_falls_to_the_policy() {
        let mut run = Run::new(policy());
        run.untried_remains = false;
        assert_eq!(
            run.after(Outcome::NotSent { fresh: true }).next,
            millis(100)
        );
        assert_eq!(
            run.after(Outcome::NotSent { fresh: true }).next,
            millis(200)
        );
    }

    #[test]
    fn a_request_refused_by_the_peer_is_retried_transparently_once() {
        let mut run = Run::new(policy());
        run.untried_remains = false;
        assert_eq!(run.after(Outcome::RefusedByPeer).next, Next::RetryNow);
        assert_eq!(run.after(Outcome::RefusedByPeer).next, millis(100));
        assert_eq!(run.state.counted_attempts, 1);
    }

    #[test]
    fn no_ready_endpoint_is_retried_with_backoff_under_the_policy() {
        let mut run = Run::new(policy());
        assert_eq!(run.after(Outcome::NoEndpoint).next, millis(100));
        assert_eq!(run.after(Outcome::NoEndpoint).next, millis(200));
        assert_eq!(run.after(Outcome::NoEndpoint).next, millis(400));
        assert_eq!(run.after(Outcome::NoEndpoint).next, Next::Respond);
    }

    #[test]
    fn wait_for_ready_waits_for_endpoints_without_spending_attempts() {
        let mut run = Run::new(CallPolicy {
            wait_for_ready: true,
            ..policy()
        });
        for _ in 0..10 {
            assert_eq!(run.after(Outcome::NoEndpoint).next, Next::WaitForEndpoints);
        }
        assert_eq!(run.state.counted_attempts, 0);
    }

    #[test]
    fn an_attempt_timeout_moves_on_whatever_the_retryable_codes() {
        let mut run = Run::new(CallPolicy {
            retry: Some(retry(
                json!({"retryableStatusCodes": ["RESOURCE_EXHAUSTED"], "maxAttempts": 2}),
            )),
            ..CallPolicy::default()
        });
        assert_eq!(run.after(Outcome::AttemptTimedOut).next, millis(100));
        assert_eq!(run.after(Outcome::AttemptTimedOut).next, Next::Respond);
    }

    #[test]
    fn a_failure_another_call_already_reported_is_not_charged_again() {
        let mut run = Run::new(policy());
        let first = run.after(Outcome::NotSent { fresh: true });
        let again = run.after(Outcome::NotSent { fresh: false });
        assert_eq!((first.next, again.next), (Next::RetryNow, Next::RetryNow));
        assert_eq!(
            (first.health, again.health),
            (Health::Failed, Health::Unknown)
        );
        let lost = run.after(Outcome::LinkLost { fresh: true });
        let lost_again = run.after(Outcome::LinkLost { fresh: false });
        assert_eq!(
            (lost.health, lost_again.health),
            (Health::Failed, Health::Unknown)
        );
    }

    #[test]
    fn a_lost_link_is_retried_under_the_policy_as_unavailable() {
        let mut run = Run::new(policy());
        assert_eq!(
            run.after(Outcome::LinkLost { fresh: true }).next,
            millis(100)
        );
        assert_eq!(run.state.counted_attempts, 1);
        let mut run = Run::new(CallPolicy::default());
        assert_eq!(
            run.after(Outcome::LinkLost { fresh: true }).next,
            Next::Respond,
            "without a policy the app hears UNAVAILABLE"
        );
    }

    #[test]
    fn deadline_exceeded_is_final() {
        let mut run = Run::new(policy());
        assert_eq!(run.after(Outcome::DeadlineExceeded).next, Next::Respond);
        assert_eq!(run.state.counted_attempts, 0);
    }

    #[test]
    fn attempt_deadline_is_the_earlier_of_call_and_per_attempt_limits() {
        let now = Instant::now();
        let mut policy = CallPolicy {
            retry: Some(retry(json!({"perAttemptRecvTimeout": "0.3s"}))),
            ..CallPolicy::default()
        };
        assert_eq!(
            policy.attempt_deadline(now),
            (Some(now + Duration::from_millis(300)), true)
        );
        policy.deadline = Some(now + Duration::from_millis(100));
        assert_eq!(policy.attempt_deadline(now), (policy.deadline, false));
        policy.deadline = Some(now + Duration::from_secs(5));
        assert_eq!(
            policy.attempt_deadline(now),
            (Some(now + Duration::from_millis(300)), true)
        );
        let plain = CallPolicy::default();
        assert_eq!(plain.attempt_deadline(now), (None, false));
    }

    fn hedging(non_fatal: &[&str]) -> HedgingPolicy {
        let config = json!({"methodConfig": [{"name": [{}], "hedgingPolicy":
            {"maxAttempts": 3, "hedgingDelay": "0.05s", "nonFatalStatusCodes": non_fatal}}]});
        ServiceConfig::parse(&config, "t")
            .unwrap()
            .for_path("/a.A/M")
            .unwrap()
            .hedging
            .clone()
            .unwrap()
    }

    #[test]
    fn a_fatal_status_ends_a_hedged_call_at_once() {
        let policy = hedging(&["UNAVAILABLE"]);
        for code in [Code::Ok, Code::InvalidArgument, Code::Internal] {
            assert_eq!(
                after_hedged_attempt(&policy, status(code), 1, 2, true),
                HedgeStep::Respond,
                "{code}"
            );
        }
        assert_eq!(
            after_hedged_attempt(&policy, Outcome::DeadlineExceeded, 1, 1, true),
            HedgeStep::Respond
        );
    }

    #[test]
    fn a_non_fatal_status_sends_the_next_hedge_at_once_while_attempts_remain() {
        let policy = hedging(&["UNAVAILABLE"]);
        let unavailable = status(Code::Unavailable);
        assert_eq!(
            after_hedged_attempt(&policy, unavailable, 1, 0, true),
            HedgeStep::SendAnother
        );
        assert_eq!(
            after_hedged_attempt(&policy, unavailable, 3, 1, true),
            HedgeStep::Wait,
            "maxAttempts sent: wait for the one still running"
        );
        assert_eq!(
            after_hedged_attempt(&policy, unavailable, 3, 0, true),
            HedgeStep::Respond,
            "nothing left running or to send: answer"
        );
        assert_eq!(
            after_hedged_attempt(&policy, unavailable, 1, 1, false),
            HedgeStep::Wait,
            "throttled or nowhere to send: no new hedge"
        );
    }

    #[test]
    fn do_not_retry_pushback_stops_new_hedges() {
        let policy = hedging(&["UNAVAILABLE"]);
        let refused = Outcome::Status {
            code: Code::Unavailable,
            pushback: Pushback::DoNotRetry,
        };
        assert_eq!(
            after_hedged_attempt(&policy, refused, 1, 1, true),
            HedgeStep::Wait
        );
        assert_eq!(
            after_hedged_attempt(&policy, refused, 1, 0, true),
            HedgeStep::Respond
        );
    }

    #[test]
    fn requests_that_never_reached_an_app_are_non_fatal_for_hedging() {
        let policy = hedging(&[]);
        for outcome in [
            Outcome::NotSent { fresh: true },
            Outcome::RefusedByPeer,
            Outcome::LinkLost { fresh: true },
            Outcome::AttemptTimedOut,
        ] {
            assert_eq!(
                after_hedged_attempt(&policy, outcome, 1, 0, true),
                HedgeStep::SendAnother,
                "{outcome:?}"
            );
        }
        assert_eq!(
            after_hedged_attempt(&policy, status(Code::Unavailable), 1, 1, true),
            HedgeStep::Respond,
            "UNAVAILABLE from the app is fatal unless listed"
        );
    }
}
