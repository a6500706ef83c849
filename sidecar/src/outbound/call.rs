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

use crate::endpoints::ranking::{RankedEndpoint, Ranking};
use crate::metrics::{metrics, AttemptLabels, CallLabels};
use crate::outbound::attempt::{
    attempt, AttemptOutcome, AttemptTarget, CallRecord, CallRequest, ResponseBody,
};
use crate::outbound::decide::{
    decide, CallPolicy, CallState, Decision, Facts, Health, Next, Outcome,
};
use crate::outbound::replay::{RequestSource, PER_CALL_LIMIT};
use crate::outbound::upstream::Upstream;
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
    let call = CallRequest {
        method: parts.method,
        path,
        headers,
        deadline: policy.deadline,
    };
    let source = RequestSource::new(body, PER_CALL_LIMIT, upstream.replay_budget.clone());
    let method_label = metrics().method_label(call.path.path());
    let labels = |tier: &'static str| CallLabels {
        upstream: upstream.name.clone(),
        method: method_label.clone(),
        status: "OK",
        tier,
    };

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
                (Outcome::NoEndpoint, Some(response), "none")
            }
            Some(endpoint) => {
                count_fallthrough(&upstream, previous.as_deref(), endpoint);
                if !tried.contains(&endpoint.endpoint.address) {
                    tried.push(endpoint.endpoint.address);
                }
                let started = Instant::now();
                let (headers_by, per_attempt) = policy.attempt_deadline(started);
                let may_move_on = ranking
                    .endpoints()
                    .any(|e| !tried.contains(&e.endpoint.address));
                let target = AttemptTarget {
                    upstream: &upstream,
                    endpoint: endpoint.clone(),
                    throttling: policy.throttling.clone(),
                    headers_by,
                    per_attempt,
                    connect_patience: may_move_on.then_some(crate::wire::quic::CONNECT_PATIENCE),
                };
                let result = attempt(
                    target,
                    &call,
                    source.clone(),
                    state.counted_attempts,
                    CallRecord {
                        labels: labels(endpoint.tier.as_str()),
                    },
                )
                .await;
                upstream
                    .metrics
                    .attempt_duration(endpoint.tier)
                    .observe(started.elapsed().as_secs_f64());
                let tier = endpoint.tier.as_str();
                count_attempt(&upstream.name, tier, result.status_label());
                let (outcome, response) = classify(result);
                (outcome, response, tier)
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
                return respond(&upstream, &labels(tier), arrived, response, outcome);
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
                        &labels("none"),
                        arrived,
                        Some(response),
                        Outcome::DeadlineExceeded,
                    );
                }
            }
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
    match decision.health {
        Health::Answered => endpoint.load.record_success(),
        Health::Failed => {
            if ranking.record_failure(endpoint, outlier) {
                upstream.metrics.ejections.inc();
            }
        }
        Health::Unknown => {}
    }
}

fn count_attempt(upstream: &Arc<str>, tier: &'static str, status: &'static str) {
    metrics()
        .attempts
        .get_or_create(&AttemptLabels {
            upstream: upstream.clone(),
            tier,
            status,
        })
        .inc();
}

/// Answers the app. A streamed response records its call when its body ends; anything else is
/// recorded here.
fn respond(
    upstream: &Upstream,
    labels: &CallLabels,
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
        CallRecord {
            labels: labels.clone(),
        }
        .finish(code as u32);
    }
    response
}
