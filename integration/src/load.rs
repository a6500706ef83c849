//! Closed-loop load with per-call latency and the pod that answered: the shape of a client
//! with a fixed number of calls outstanding (a worker pool, a streaming producer's fan-out).
//! Used by the load-aware locality tests and by `bench-locality`, which report who answered
//! and how long the calls took at several load levels.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tonic::transport::Channel;

use crate::pb::echo_client::EchoClient;
use crate::pb::EchoRequest;

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Answers per pod name.
    pub by_pod: BTreeMap<String, usize>,
    /// Latency of every answered call, sorted.
    pub latencies: Vec<Duration>,
    pub failures: Vec<tonic::Status>,
}

impl LoadReport {
    pub fn answered(&self) -> usize {
        self.latencies.len()
    }

    /// The share of answered calls that `pod` served.
    pub fn share_of(&self, pod: &str) -> f64 {
        if self.answered() == 0 {
            return 0.0;
        }
        *self.by_pod.get(pod).unwrap_or(&0) as f64 / self.answered() as f64
    }

    /// The `q` quantile (0..=1) of the answered calls' latency.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[index.min(self.latencies.len() - 1)]
    }
}

/// One unary call asking for `service_ms` of service time (10 s deadline): its latency and
/// the pod that answered.
async fn one_call(
    mut client: EchoClient<Channel>,
    service_ms: u32,
) -> (Duration, Result<String, tonic::Status>) {
    let mut request = tonic::Request::new(EchoRequest {
        payload: bytes::Bytes::from_static(b"load"),
        delay_ms: service_ms,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(10));
    let started = Instant::now();
    let answer = client
        .unary(request)
        .await
        .map(|reply| reply.into_inner().server);
    (started.elapsed(), answer)
}

/// Makes `calls` unary calls, `concurrency` outstanding at a time, each asking the server to
/// take `service_ms` (plus whatever its capacity makes it queue). Each call has a 10 s deadline.
pub async fn closed_loop(
    client: &EchoClient<Channel>,
    concurrency: usize,
    calls: usize,
    service_ms: u32,
) -> LoadReport {
    let results: Vec<(Duration, Result<String, tonic::Status>)> = futures::stream::iter(0..calls)
        .map(|_| one_call(client.clone(), service_ms))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut report = LoadReport::default();
    for (latency, answer) in results {
        match answer {
            Ok(pod) => {
                *report.by_pod.entry(pod).or_insert(0) += 1;
                report.latencies.push(latency);
            }
            Err(status) => report.failures.push(status),
        }
    }
    report.latencies.sort();
    report
}

/// Starts calls at a steady `rate` per second for `duration`, whatever the answers' latency
/// (an open loop: arrivals do not wait for answers, as with requests coming from users), each
/// asking for `service_ms`; returns once every call has ended.
pub async fn open_loop(
    client: &EchoClient<Channel>,
    rate: u32,
    duration: Duration,
    service_ms: u32,
) -> LoadReport {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        ticks.tick().await;
        calls.spawn(one_call(client.clone(), service_ms));
    }
    let mut report = LoadReport::default();
    while let Some(joined) = calls.join_next().await {
        match joined {
            Ok((latency, Ok(pod))) => {
                *report.by_pod.entry(pod).or_insert(0) += 1;
                report.latencies.push(latency);
            }
            Ok((_, Err(status))) => report.failures.push(status),
            Err(error) => report.failures.push(tonic::Status::internal(format!(
                "load task failed: {error}"
            ))),
        }
    }
    report.latencies.sort();
    report
}
