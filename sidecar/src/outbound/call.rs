//! The retry loop of one call (gRFC A6 semantics) with locality fall-through.
//!
//! Each attempt picks an endpoint this call has not tried yet while any remains, best tier
//! first: a call whose same-node pod fails lands on another node next. Retries happen only for
//! the policy's retryable statuses, only before the call commits (response headers, or more
//! request bytes than the replay buffer keeps), with A6's jittered exponential backoff or the
//! server's pushback, within the call's deadline and the upstream's retry-throttling tokens.
//! Attempts that never reached an upstream app are retried at once, outside `maxAttempts`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::config::service_config::{status_name, RetryPolicy};
use crate::metrics::{self, metrics, AttemptLabels, CallLabels, TierLabels};
use crate::outbound::attempt::{
    attempt, AttemptOutcome, AttemptTarget, CallRecord, CallRequest, Pushback, ResponseBody,
};
use crate::outbound::replay::{RequestSource, PER_CALL_LIMIT};
use crate::outbound::upstream::Upstream;
use crate::wire::grpc::{self, Code};

/// Transparent retries per call: enough to get past a few dead endpoints, bounded so a call
/// can never loop between endpoints that all refuse it.
const MAX_TRANSPARENT_RETRIES: u32 = 4;

fn failure_response(code: Code, message: &str) -> Response<ResponseBody> {
    grpc::trailers_only_response(code, message, ResponseBody::Empty)
}

/// Handles one call from the app to `upstream`; always answers with a gRPC response.
pub async fn handle_call(
    upstream: Arc<Upstream>,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let arrived = Instant::now();
    let (parts, body) = request.into_parts();
    let live = upstream.policy.borrow().clone();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let method_config = live.service_config.for_path(path.path());
    let retry_policy: Option<RetryPolicy> = method_config.and_then(|config| config.retry.clone());
    let throttling = live.service_config.throttling.clone();
    let client_deadline = parts
        .headers
        .get(grpc::GRPC_TIMEOUT)
        .and_then(grpc::parse_timeout)
        .map(|t| arrived + t);
    let config_deadline = method_config
        .and_then(|config| config.timeout)
        .map(|t| arrived + t);
    let deadline = match (client_deadline, config_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut headers = parts.headers;
    crate::wire::grpc::strip_hop_by_hop(&mut headers);
    let call = CallRequest {
        method: parts.method,
        path,
        headers,
        deadline,
    };
    let source = RequestSource::new(body, PER_CALL_LIMIT, upstream.replay_budget.clone());
    let metrics = metrics();
    let method_label = metrics.method_label(call.path.path());
    let upstream_label = metrics::upstream(upstream.name.clone());

    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut counted_attempts = 0u32;
    let mut transparent_retries = 0u32;
    let mut retries_since_pushback = 0u32;
    let mut previous_node: Option<Option<String>> = None;
    loop {
        let ranking = upstream.ranking.borrow().clone();
        let Some(endpoint) = ranking.pick_for_attempt(&tried) else {
            let message = format!("upstream {}: no ready endpoint", upstream.name);
            return finish(
                &upstream,
                &method_label,
                "none",
                arrived,
                failure_response(Code::Unavailable, &message),
                Code::Unavailable as u32,
            );
        };
        let tier = endpoint.tier.as_str();
        // A fall-through: this attempt goes to another node than the one before it.
        if let Some(previous) = &previous_node {
            if previous.is_none() || *previous != endpoint.endpoint.node {
                metrics
                    .fallthroughs
                    .get_or_create(&TierLabels {
                        upstream: upstream.name.clone(),
                        tier,
                    })
                    .inc();
            }
        }
        previous_node = Some(endpoint.endpoint.node.clone());
        if !tried.contains(&endpoint.endpoint.address) {
            tried.push(endpoint.endpoint.address);
        }
        let record = CallRecord {
            labels: CallLabels {
                upstream: upstream.name.clone(),
                method: method_label.clone(),
                status: "OK",
                tier,
            },
        };
        let started = Instant::now();
        let target = AttemptTarget {
            upstream: &upstream.name,
            server_name: &upstream.server_name,
            authority: &upstream.authority,
            pool: &upstream.pool,
            endpoint: endpoint.clone(),
        };
        let outcome = attempt(target, &call, source.clone(), counted_attempts, record).await;
        metrics
            .attempt_duration
            .get_or_create(&TierLabels {
                upstream: upstream.name.clone(),
                tier,
            })
            .observe(started.elapsed().as_secs_f64());

        let (code, response, pushback) = match outcome {
            AttemptOutcome::Committed(response) => {
                count_attempt(&upstream.name, tier, "OK");
                endpoint.load.record_success();
                if let Some(throttling) = &throttling {
                    upstream.throttle.record_success(throttling);
                }
                metrics
                    .call_duration
                    .get_or_create(&upstream_label)
                    .observe(arrived.elapsed().as_secs_f64());
                return response;
            }
            AttemptOutcome::DeadlineExceeded => {
                count_attempt(&upstream.name, tier, "DEADLINE_EXCEEDED");
                let message = format!(
                    "deadline exceeded in the sidecar while calling upstream {}",
                    upstream.name
                );
                return finish(
                    &upstream,
                    &method_label,
                    tier,
                    arrived,
                    failure_response(Code::DeadlineExceeded, &message),
                    Code::DeadlineExceeded as u32,
                );
            }
            AttemptOutcome::NotSent(reason) => {
                count_attempt(&upstream.name, tier, "NOT_SENT");
                if ranking.record_failure(&endpoint, &live.outlier) {
                    metrics.ejections.get_or_create(&upstream_label).inc();
                }
                transparent_retries += 1;
                // Only another endpoint can help: retrying the one that just failed to connect
                // would spend the caller's deadline on the same dead address.
                let untried_remains = ranking
                    .endpoints()
                    .any(|e| !tried.contains(&e.endpoint.address));
                if untried_remains
                    && transparent_retries <= MAX_TRANSPARENT_RETRIES
                    && source.replayable().await
                {
                    metrics
                        .transparent_retries
                        .get_or_create(&upstream_label)
                        .inc();
                    tracing::debug!(upstream = %upstream.name, %reason, "request never reached the upstream; retrying transparently");
                    continue;
                }
                let response = failure_response(Code::Unavailable, &reason);
                return finish(
                    &upstream,
                    &method_label,
                    tier,
                    arrived,
                    response,
                    Code::Unavailable as u32,
                );
            }
            AttemptOutcome::Failed { code, message } => (
                code as u32,
                failure_response(code, &message),
                Pushback::None,
            ),
            AttemptOutcome::Status {
                code,
                response,
                pushback,
            } => (code, response, pushback),
        };

        count_attempt(&upstream.name, tier, status_name(code));
        if code == Code::Unavailable as u32 {
            if ranking.record_failure(&endpoint, &live.outlier) {
                metrics.ejections.get_or_create(&upstream_label).inc();
            }
        } else {
            // The app answered: whatever it said, the link and the pod work.
            endpoint.load.record_success();
        }
        counted_attempts += 1;
        let retryable = retry_policy
            .as_ref()
            .filter(|policy| policy.is_retryable(code));
        let Some(policy) = retryable else {
            if let Some(throttling) = &throttling {
                upstream.throttle.record_success(throttling);
            }
            return finish(&upstream, &method_label, tier, arrived, response, code);
        };
        if let Some(throttling) = &throttling {
            upstream.throttle.record_failure(throttling);
        }
        if counted_attempts >= policy.max_attempts || pushback == Pushback::DoNotRetry {
            return finish(&upstream, &method_label, tier, arrived, response, code);
        }
        if let Some(throttling) = &throttling {
            if !upstream.throttle.allows_retry(throttling) {
                metrics
                    .retries_throttled
                    .get_or_create(&upstream_label)
                    .inc();
                return finish(&upstream, &method_label, tier, arrived, response, code);
            }
        }
        if !source.replayable().await {
            // More was sent than the replay buffer keeps: the call is committed (A6).
            return finish(&upstream, &method_label, tier, arrived, response, code);
        }
        let delay = match pushback {
            Pushback::After(delay) => {
                retries_since_pushback = 0;
                delay
            }
            _ => {
                retries_since_pushback += 1;
                policy.backoff(retries_since_pushback, fastrand::f64())
            }
        };
        let resume = Instant::now() + delay;
        if deadline.is_some_and(|deadline| resume >= deadline) {
            // Waiting would outlive the call: answer now with what the upstream said.
            return finish(&upstream, &method_label, tier, arrived, response, code);
        }
        tokio::time::sleep_until(resume).await;
        metrics.retries.get_or_create(&upstream_label).inc();
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

/// Records a call that ends with a status the sidecar returns without streaming a body.
fn finish(
    upstream: &Upstream,
    method: &Arc<str>,
    tier: &'static str,
    arrived: Instant,
    response: Response<ResponseBody>,
    code: u32,
) -> Response<ResponseBody> {
    let metrics = metrics();
    metrics
        .call_duration
        .get_or_create(&metrics::upstream(upstream.name.clone()))
        .observe(arrived.elapsed().as_secs_f64());
    CallRecord {
        labels: CallLabels {
            upstream: upstream.name.clone(),
            method: method.clone(),
            status: "OK",
            tier,
        },
    }
    .finish(code);
    response
}
