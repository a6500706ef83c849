//! One call from the app, from arrival to answer: fix the policy it runs under, then loop
//! pick → attempt → decide until the decision is to respond.
//!
//! The rules live in [`crate::outbound::decide`]; this loop only does what they say: pick an
//! endpoint this call has not tried while any remains (best tier first, so a failed same-node
//! pod means the next attempt lands on another node), make the attempt, wait out backoffs, and
//! record metrics and endpoint health.

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::config::service_config::HedgingPolicy;
use crate::config::Tier;
use crate::endpoints::ranking::{RankedEndpoint, Ranking};
use crate::outbound::attempt::{attempt, AttemptOutcome, AttemptTarget, CallRequest, ResponseBody};
use crate::outbound::decide::{
    after_hedged_attempt, decide, CallPolicy, CallState, Decision, Facts, Health, HedgeStep, Next,
    Outcome,
};
use crate::outbound::replay::{RequestSource, PER_CALL_LIMIT};
use crate::outbound::upstream::{CallRecord, MethodSeries, Upstream};
use crate::wire::grpc::{self, Code};

fn failure_response(code: Code, message: &str) -> Response<ResponseBody> {
    grpc::trailers_only_response(code, message, ResponseBody::Empty)
}

/// The policy of a call arriving now: its method config under the live service config, and a
/// deadline from the app's `grpc-timeout` capped by the method's `timeout`.
fn call_policy(upstream: &Upstream, path: &str, headers: &http::HeaderMap) -> CallPolicy {
    let arrived = Instant::now();
    let live = upstream.policy.borrow().clone();
    let method = live.service_config.for_path(path);
    let client_deadline = headers
        .get(grpc::GRPC_TIMEOUT)
        .and_then(grpc::parse_timeout)
        .map(|t| arrived + t);
    let config_deadline = method.and_then(|m| m.timeout).map(|t| arrived + t);
    let deadline = match (client_deadline, config_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    CallPolicy {
        retry: method.and_then(|m| m.retry.clone()),
        hedging: method.and_then(|m| m.hedging.clone()),
        throttling: live.service_config.throttling.clone(),
        wait_for_ready: method.is_some_and(|m| m.wait_for_ready),
        deadline,
    }
}

/// Handles one call from the app to `upstream`; always answers with a gRPC response.
pub async fn handle_call(
    upstream: Arc<Upstream>,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let arrived = Instant::now();
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let policy = call_policy(&upstream, path.path(), &parts.headers);
    let outlier = upstream.policy.borrow().outlier.clone();
    let mut headers = parts.headers;
    grpc::strip_hop_by_hop(&mut headers);
    grpc::leave_te_off_the_hop(&mut headers);
    let call = CallRequest {
        method: parts.method,
        path,
        headers,
        deadline: policy.deadline,
    };
    let source = RequestSource::new(body, PER_CALL_LIMIT, upstream.replay_budget.clone());
    let method = upstream.metrics.method(call.path.path());

    if let Some(hedging) = &policy.hedging {
        return hedged_call(
            &upstream, &call, &source, &policy, hedging, &method, arrived,
        )
        .await;
    }

    let mut state = CallState::default();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut previous: Option<Arc<RankedEndpoint>> = None;
    // This call's own view of the ranking, so waiting for a change (waitForReady) cannot miss
    // one that happened between a pick and the wait.
    let mut rankings = upstream.ranking.clone();
    loop {
        let ranking = rankings.borrow_and_update().clone();
        let picked = ranking.pick_for_attempt(&tried);
        let (outcome, response, tier) = match &picked {
            None => {
                let message = format!("upstream {}: no ready endpoint", upstream.name);
                let response = failure_response(Code::Unavailable, &message);
                (Outcome::NoEndpoint, Some(response), None)
            }
            Some(endpoint) => {
                count_fallthrough(&upstream, previous.as_deref(), endpoint);
                if !tried.contains(&endpoint.endpoint.address) {
                    tried.push(endpoint.endpoint.address);
                }
                let may_move_on = ranking
                    .endpoints()
                    .any(|e| !tried.contains(&e.endpoint.address));
                let step = AttemptStep {
                    upstream: &upstream,
                    call: &call,
                    source: &source,
                    policy: &policy,
                    record: method.record(Some(endpoint.tier)),
                };
                let (outcome, response) = step
                    .run(endpoint.clone(), state.counted_attempts, may_move_on)
                    .await;
                (outcome, response, Some(endpoint.tier))
            }
        };
        previous = picked.clone();
        let untried_remains = ranking
            .endpoints()
            .any(|e| !tried.contains(&e.endpoint.address));
        let replayable = match outcome {
            // A committed call is never retried; no need to wait for its request pump.
            Outcome::Committed => false,
            _ => source.replayable().await,
        };
        let facts = Facts {
            now: Instant::now(),
            untried_remains,
            replayable,
            jitter: fastrand::f64(),
            throttle: &upstream.throttle,
        };
        let decision = decide(&mut state, &policy, outcome, facts);
        if let Some(endpoint) = &picked {
            record_health(&upstream, &ranking, endpoint, &decision, &outlier);
        }
        if decision.throttled {
            upstream.metrics.retries_throttled.inc();
        }
        match decision.next {
            Next::Respond => {
                return respond(&upstream, method.record(tier), arrived, response, outcome);
            }
            Next::RetryNow => {
                upstream.metrics.transparent_retries.inc();
                tracing::debug!(upstream = %upstream.name, "request never reached an upstream app; retrying transparently");
            }
            Next::RetryAfter(delay) => {
                tokio::time::sleep(delay).await;
                upstream.metrics.retries.inc();
            }
            Next::WaitForEndpoints => {
                let changed = async {
                    if rankings.changed().await.is_err() {
                        // Nothing will ever change: wait out the deadline rather than spin.
                        std::future::pending::<()>().await;
                    }
                };
                let waited = match policy.deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, changed).await.is_ok(),
                    None => {
                        changed.await;
                        true
                    }
                };
                if !waited {
                    let message = format!(
                        "deadline exceeded in the sidecar waiting for a ready endpoint of upstream {}",
                        upstream.name
                    );
                    let response = failure_response(Code::DeadlineExceeded, &message);
                    return respond(
                        &upstream,
                        method.record(None),
                        arrived,
                        Some(response),
                        Outcome::DeadlineExceeded,
                    );
                }
            }
        }
    }
}

/// What one attempt needs besides its endpoint: the call and the policy it runs under.
struct AttemptStep<'a> {
    upstream: &'a Arc<Upstream>,
    call: &'a CallRequest,
    source: &'a Arc<RequestSource>,
    policy: &'a CallPolicy,
    record: CallRecord,
}

impl AttemptStep<'_> {
    /// Makes the attempt and records its metrics; `may_move_on` says the call has other
    /// endpoints to go to, so it need not wait long for a connect in progress.
    async fn run(
        self,
        endpoint: Arc<RankedEndpoint>,
        previous_attempts: u32,
        may_move_on: bool,
    ) -> (Outcome, Option<Response<ResponseBody>>) {
        let started = Instant::now();
        let (headers_by, per_attempt) = self.policy.attempt_deadline(started);
        let target = AttemptTarget {
            upstream: self.upstream,
            endpoint: endpoint.clone(),
            throttling: self.policy.throttling.clone(),
            headers_by,
            per_attempt,
            connect_patience: may_move_on.then_some(crate::wire::quic::CONNECT_PATIENCE),
        };
        // Boxed: a future holds every future it awaits inline, and each is copied whole when
        // built and moved, level by level (handle_call, this step, the listener's task). The
        // attempt is most of a call's state; boxed, it is copied once and the levels above stay
        // small (profiled at 128 calls in flight: such copies were ~4% of the sidecar's CPU).
        let result = Box::pin(attempt(
            target,
            self.call,
            self.source.clone(),
            previous_attempts,
            self.record,
        ))
        .await;
        self.upstream
            .metrics
            .attempt_duration(endpoint.tier)
            .observe(started.elapsed().as_secs_f64());
        self.upstream
            .metrics
            .count_attempt(endpoint.tier, result.status_label());
        classify(result)
    }
}

/// One ended attempt of a hedged call, with where it went.
type Hedged = (Arc<RankedEndpoint>, Outcome, Option<Response<ResponseBody>>);

/// A call under a hedging policy (gRFC A6): the first attempt goes out at once, another to an
/// endpoint not tried yet (the ranking puts other nodes next) after every `hedgingDelay` without
/// response headers, or at once after a non-fatal status; the first response headers win and
/// the attempts still running are cancelled by being dropped.
async fn hedged_call(
    upstream: &Arc<Upstream>,
    call: &CallRequest,
    source: &Arc<RequestSource>,
    policy: &CallPolicy,
    hedging: &HedgingPolicy,
    method: &Arc<MethodSeries>,
    arrived: Instant,
) -> Response<ResponseBody> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let outlier = upstream.policy.borrow().outlier.clone();
    let ranking = upstream.ranking.borrow().clone();
    let mut running: FuturesUnordered<futures::future::BoxFuture<'_, Hedged>> =
        FuturesUnordered::new();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut first: Option<SocketAddr> = None;
    let mut sent = 0u32;
    let mut last: Option<(Outcome, Option<Response<ResponseBody>>, Tier)> = None;
    let mut next_hedge = Instant::now();
    loop {
        // Throttling and the replay buffer decide whether another attempt may go out at all.
        let throttle_allows = policy
            .throttling
            .as_ref()
            .is_none_or(|throttling| upstream.throttle.allows_retry(throttling));
        let candidate = ranking.pick(&tried);
        let can_send = candidate.is_some() && throttle_allows && source.not_closed();
        let timer_due = sent < hedging.max_attempts && can_send;
        tokio::select! {
            ended = running.next(), if !running.is_empty() => {
                let Some((endpoint, outcome, response)) = ended else { continue };
                let decision_health = crate::outbound::decide::health_of(outcome);
                apply_health(upstream, &ranking, &endpoint, decision_health, &outlier);
                if let Some(throttling) = &policy.throttling {
                    let (code, _) = crate::outbound::decide::hedged_status(outcome);
                    if code == Code::Ok {
                        upstream.throttle.record_success(throttling);
                    } else if outcome != Outcome::Committed && hedging.is_non_fatal(code) {
                        upstream.throttle.record_failure(throttling);
                    }
                }
                let tier = endpoint.tier;
                if outcome == Outcome::Committed {
                    if first != Some(endpoint.endpoint.address) {
                        upstream.metrics.hedges_won.inc();
                    }
                    return respond(upstream, method.record(Some(tier)), arrived, response, outcome);
                }
                let step = after_hedged_attempt(hedging, outcome, sent, running.len(), can_send);
                last = Some((outcome, response, tier));
                match step {
                    HedgeStep::Respond => break,
                    HedgeStep::Wait => {}
                    HedgeStep::SendAnother => next_hedge = Instant::now(),
                }
            }
            _ = tokio::time::sleep_until(next_hedge), if timer_due => {
                let Some(endpoint) = candidate else { continue };
                tried.push(endpoint.endpoint.address);
                first.get_or_insert(endpoint.endpoint.address);
                if sent > 0 {
                    upstream.metrics.hedges.inc();
                }
                let may_move_on = ranking.endpoints().any(|e| !tried.contains(&e.endpoint.address));
                let step = AttemptStep {
                    upstream,
                    call,
                    source,
                    policy,
                    record: method.record(Some(endpoint.tier)),
                };
                let previous_attempts = sent;
                running.push(Box::pin(async move {
                    let (outcome, response) =
                        step.run(endpoint.clone(), previous_attempts, may_move_on).await;
                    (endpoint, outcome, response)
                }));
                sent += 1;
                next_hedge = Instant::now() + hedging.delay;
            }
            else => break,
        }
    }
    match last {
        Some((outcome, response, tier)) => respond(
            upstream,
            method.record(Some(tier)),
            arrived,
            response,
            outcome,
        ),
        None => {
            let message = format!("upstream {}: no ready endpoint", upstream.name);
            respond(
                upstream,
                method.record(None),
                arrived,
                Some(failure_response(Code::Unavailable, &message)),
                Outcome::NoEndpoint,
            )
        }
    }
}

/// Splits an attempt's result into what the decision needs and the response the app gets if
/// this attempt's result is the answer.
fn classify(result: AttemptOutcome) -> (Outcome, Option<Response<ResponseBody>>) {
    match result {
        AttemptOutcome::Committed(response) => (Outcome::Committed, Some(response)),
        AttemptOutcome::Status {
            code,
            response,
            pushback,
        } => (Outcome::Status { code, pushback }, Some(response)),
        AttemptOutcome::NotSent { reason, fresh } => (
            Outcome::NotSent { fresh },
            Some(failure_response(Code::Unavailable, &reason)),
        ),
        AttemptOutcome::LinkLost { reason, fresh } => (
            Outcome::LinkLost { fresh },
            Some(failure_response(Code::Unavailable, &reason)),
        ),
        AttemptOutcome::RefusedByPeer(reason) => (
            Outcome::RefusedByPeer,
            Some(failure_response(Code::Unavailable, &reason)),
        ),
        AttemptOutcome::Failed { code, message } => (
            Outcome::Status {
                code,
                pushback: crate::outbound::decide::Pushback::None,
            },
            Some(failure_response(code, &message)),
        ),
        AttemptOutcome::AttemptTimedOut(message) => (
            Outcome::AttemptTimedOut,
            Some(failure_response(Code::Unavailable, &message)),
        ),
        AttemptOutcome::DeadlineExceeded(message) => (
            Outcome::DeadlineExceeded,
            Some(failure_response(Code::DeadlineExceeded, &message)),
        ),
    }
}

/// A fall-through: this attempt goes to another node than the one before it.
fn count_fallthrough(
    upstream: &Upstream,
    previous: Option<&RankedEndpoint>,
    next: &RankedEndpoint,
) {
    if let Some(previous) = previous {
        if previous.endpoint.node.is_none() || previous.endpoint.node != next.endpoint.node {
            upstream.metrics.fallthrough(next.tier).inc();
        }
    }
}

fn record_health(
    upstream: &Upstream,
    ranking: &Ranking,
    endpoint: &RankedEndpoint,
    decision: &Decision,
    outlier: &crate::config::OutlierDetection,
) {
    apply_health(upstream, ranking, endpoint, decision.health, outlier);
}

fn apply_health(
    upstream: &Upstream,
    ranking: &Ranking,
    endpoint: &RankedEndpoint,
    health: Health,
    outlier: &crate::config::OutlierDetection,
) {
    match health {
        Health::Answered => endpoint.load.record_success(),
        Health::Failed => {
            if ranking.record_failure(endpoint, outlier) {
                upstream.metrics.ejections.inc();
            }
        }
        Health::Unknown => {}
    }
}

/// Answers the app. A streamed response records its call when its body ends; anything else is
/// recorded here.
fn respond(
    upstream: &Upstream,
    record: CallRecord,
    arrived: Instant,
    response: Option<Response<ResponseBody>>,
    outcome: Outcome,
) -> Response<ResponseBody> {
    upstream
        .metrics
        .call_duration
        .observe(arrived.elapsed().as_secs_f64());
    let response = response.unwrap_or_else(|| {
        // Every outcome carries its response; this only guards against a future variant.
        failure_response(Code::Internal, "the sidecar lost the response of this call")
    });
    if !matches!(outcome, Outcome::Committed) {
        let code = response
            .headers()
            .get(grpc::GRPC_STATUS)
            .map_or(Code::Unknown, Code::from_header);
        record.finish(code as u32);
    }
    response
}
