//! The limits of gRFC A6 retries, end to end through real sidecars: the replay buffer (1 MiB per
//! call, 16 MiB per process, returned when a call commits or ends), bidi calls retried before
//! their response headers and going on on the pod that answered, and the backoff starting again
//! from `initialBackoff` after server pushback.
//!
//! Where a call's attempts land can depend on load (the next tier joins when the same-node pod is
//! busy), so the replay tests make every pod fail and count the attempts the apps received:
//! `maxAttempts` of them when the request could be replayed, one when it could not.

use std::time::{Duration, Instant};

use bytes::Bytes;
use integration::cluster::{Cluster, ClusterSpec};
use integration::echo_server::BIDI_ANSWER_AFTER_FIRST_REQUEST;
use integration::harness::{echo_client, within};
use integration::pb::{EchoReply, EchoRequest};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Upper bound for any single call or stream step: only there so a hang fails the test with a
/// reason instead of stalling the suite.
const LIMIT: Duration = Duration::from_secs(60);

/// The sidecar's replay limits (README: 1 MiB per call, 16 MiB per process).
const PER_CALL_LIMIT: usize = 1024 * 1024;
const PER_PROCESS_LIMIT: usize = 16 * 1024 * 1024;

/// A payload that, framed as a gRPC message (5-byte prefix, protobuf field header and knobs),
/// stays under the per-call limit, while 16 of them stay under the process budget and 17 do
/// not.
const UNDER_ONE_MIB: usize = 1_000_000;

/// Three pods on three nodes, a retry policy on `echo.Echo` retrying UNAVAILABLE with tiny
/// backoffs, and no ejection, so every pod stays a candidate whatever a test makes fail.
fn spec(max_attempts: u32, retry_extra: serde_json::Value, timeout: &str) -> ClusterSpec {
    let mut retry = json!({
        "maxAttempts": max_attempts,
        "initialBackoff": "0.01s",
        "maxBackoff": "0.01s",
        "backoffMultiplier": 1,
        "retryableStatusCodes": ["UNAVAILABLE"],
    });
    for (key, value) in retry_extra.as_object().into_iter().flatten() {
        retry[key] = value.clone();
    }
    let mut spec = ClusterSpec::three_nodes(1);
    spec.service_config = Some(json!({"methodConfig": [{
        "name": [{"service": "echo.Echo"}],
        "timeout": timeout,
        "retryPolicy": retry,
    }]}));
    spec.client_extra = json!({"outlierDetection": {"consecutiveFailures": 100000, "baseEjectionTime": "1s", "maxEjectionTime": "1s", "maxEjectionPercent": 0}});
    spec
}

/// A request every pod (or the listed ones) fails with UNAVAILABLE, trailers-only.
fn failing(pods: &[&str], payload_len: usize) -> EchoRequest {
    EchoRequest {
        payload: Bytes::from(vec![7u8; payload_len]),
        status_code: tonic::Code::Unavailable as i32,
        status_message: "pod says no".to_string(),
        trailers_only: true,
        fail_on: pods.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

async fn call(cluster: &Cluster, request: EchoRequest) -> Result<EchoReply, tonic::Status> {
    let mut client = echo_client(cluster.app_addr).await;
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(30));
    within(LIMIT, "unary call", client.unary(request))
        .await
        .map(tonic::Response::into_inner)
}

/// Makes a call that every pod fails and returns how many attempts reached an app.
async fn attempts_of_failing_call(cluster: &Cluster, payload_len: usize) -> u64 {
    let before = cluster.app_calls();
    let status = call(cluster, failing(&[], payload_len))
        .await
        .expect_err("every pod fails");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "pod says no", "the app's own status");
    cluster.app_calls() - before
}

/// Request messages received by every pod's app so far (client-streaming and bidi calls).
fn stream_messages(cluster: &Cluster) -> u64 {
    cluster
        .pods
        .iter()
        .filter_map(|pod| pod.app.as_ref())
        .map(|app| app.state().stream_messages_received())
        .sum()
}

/// Waits until the apps have received `count` stream messages in all.
async fn wait_stream_messages(cluster: &Cluster, count: u64) {
    within(
        LIMIT,
        &format!("{count} stream messages at the apps"),
        async {
            while stream_messages(cluster) < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_per_call_replay_limit_is_not_retried_and_one_under_it_is() {
    let cluster = Cluster::start(spec(3, json!({}), "30s")).await;
    const { assert!(UNDER_ONE_MIB + 100 < PER_CALL_LIMIT) };
    assert_eq!(
        attempts_of_failing_call(&cluster, UNDER_ONE_MIB).await,
        3,
        "a request the replay buffer kept whole is retried up to maxAttempts"
    );
    assert_eq!(
        attempts_of_failing_call(&cluster, PER_CALL_LIMIT + 100_000).await,
        1,
        "a request over 1 MiB cannot be replayed: the first attempt's status is the answer"
    );
    // Over the limit is no failure in itself: the call goes through whole, unretried.
    let payload = Bytes::from(
        (0..3 * PER_CALL_LIMIT)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<u8>>(),
    );
    let reply = call(
        &cluster,
        EchoRequest {
            payload: payload.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("a 3 MiB call passes through");
    assert!(
        reply.payload == payload,
        "the 3 MiB payload came back changed"
    );
    assert_eq!(reply.received_previous_rpc_attempts, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_replay_budget_is_shared_by_calls_and_returned_when_they_end() {
    let cluster = Cluster::start(spec(3, json!({}), "30s")).await;
    let client = echo_client(cluster.app_addr).await;
    // 16 client streams, each having sent ~1 MB it keeps for replay, held open: no response
    // headers come before a client stream ends, so none of them is committed.
    let held = PER_PROCESS_LIMIT / (UNDER_ONE_MIB + 9);
    assert_eq!(held, 16);
    let mut senders = Vec::new();
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..held {
        let (sender, receiver) = mpsc::channel::<EchoRequest>(2);
        sender
            .send(EchoRequest {
                payload: Bytes::from(vec![i as u8; UNDER_ONE_MIB]),
                ..Default::default()
            })
            .await
            .expect("the channel is open");
        senders.push(sender);
        let mut client = client.clone();
        streams.spawn(async move {
            let mut request = tonic::Request::new(ReceiverStream::new(receiver));
            request.set_timeout(Duration::from_secs(50));
            client.client_stream(request).await.map(|r| r.into_inner())
        });
    }
    // Every message reached an app, so the client sidecar has kept each of them.
    wait_stream_messages(&cluster, held as u64).await;

    // The budget left is less than one more such request: it cannot be kept, so its failure is
    // the answer.
    assert_eq!(
        attempts_of_failing_call(&cluster, UNDER_ONE_MIB).await,
        1,
        "with 16 MB kept by open calls, a 17th cannot be replayed"
    );

    // The streams end and answer; what they kept goes back to the budget.
    drop(senders);
    let mut answered = 0;
    while let Some(done) = within(LIMIT, "a held client stream's reply", streams.join_next()).await
    {
        let reply = done
            .expect("a stream task panicked")
            .expect("a held stream succeeds");
        assert_eq!(reply.sequence, 1, "one message per stream");
        assert_eq!(reply.payload.len(), UNDER_ONE_MIB);
        answered += 1;
    }
    assert_eq!(answered, held);
    assert_eq!(
        attempts_of_failing_call(&cluster, UNDER_ONE_MIB).await,
        3,
        "the finished calls returned their buffers: the same call is retried again"
    );
}

/// Opens a bidi call whose response headers wait for its first request, sends `first`, and
/// returns the request sender and the reply stream once the call has answered.
async fn bidi_after_first(
    cluster: &Cluster,
    first: EchoRequest,
) -> Result<(mpsc::Sender<EchoRequest>, tonic::Streaming<EchoReply>), tonic::Status> {
    let mut client = echo_client(cluster.app_addr).await;
    let (sender, receiver) = mpsc::channel::<EchoRequest>(4);
    sender.send(first).await.expect("the channel is open");
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    request.set_timeout(Duration::from_secs(50));
    request.metadata_mut().insert(
        BIDI_ANSWER_AFTER_FIRST_REQUEST,
        "yes".parse().expect("valid metadata"),
    );
    let replies = within(LIMIT, "bidi response headers", client.bidi(request))
        .await?
        .into_inner();
    Ok((sender, replies))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_call_returns_its_replay_buffer_at_once_while_it_goes_on() {
    let cluster = Cluster::start(spec(3, json!({}), "30s")).await;
    // 17 bidi calls, each kept ~1 MB until its response headers came: more than the process
    // budget if the committed ones still held theirs.
    let mut open = Vec::new();
    for i in 0..17u8 {
        let (sender, mut replies) = bidi_after_first(
            &cluster,
            EchoRequest {
                payload: Bytes::from(vec![i; UNDER_ONE_MIB]),
                ..Default::default()
            },
        )
        .await
        .expect("the bidi call answers");
        let reply = within(LIMIT, "first bidi reply", replies.message())
            .await
            .expect("a reply")
            .expect("not the end");
        assert_eq!(reply.payload.len(), UNDER_ONE_MIB);
        open.push((sender, replies));
    }
    assert_eq!(
        attempts_of_failing_call(&cluster, UNDER_ONE_MIB).await,
        3,
        "17 committed streams still open must not pin the replay budget"
    );
    // The streams go on after all that.
    for (sender, replies) in &mut open {
        sender
            .send(EchoRequest {
                payload: Bytes::from_static(b"still here"),
                ..Default::default()
            })
            .await
            .expect("the stream is open");
        let reply = within(LIMIT, "bidi reply", replies.message())
            .await
            .expect("a reply")
            .expect("not the end");
        assert_eq!(&reply.payload[..], b"still here");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidi_call_failing_before_its_response_headers_is_retried_on_the_next_tier_and_goes_on_there(
) {
    let cluster = Cluster::start(spec(3, json!({}), "30s")).await;
    // The client is on node-a (zone-1); node-b is in zone-1 too, node-c in zone-2.
    for (fail_on, answers, previous) in [
        (vec!["echo-a1"], "echo-b1", "1"),
        (vec!["echo-a1", "echo-b1"], "echo-c1", "2"),
    ] {
        let before = cluster.app_calls();
        let mut first = failing(&fail_on, 0);
        first.payload = Bytes::from_static(b"first");
        let (sender, mut replies) = bidi_after_first(&cluster, first)
            .await
            .expect("a later attempt answers");
        let reply = within(LIMIT, "first bidi reply", replies.message())
            .await
            .expect("a reply")
            .expect("not the end");
        assert_eq!(reply.server, answers, "failing on {fail_on:?}");
        assert_eq!(reply.received_previous_rpc_attempts, previous);
        assert_eq!(&reply.payload[..], b"first", "the replayed first message");
        assert_eq!(reply.sequence, 0);
        // The call goes on, message by message, on the pod that answered.
        for i in 1..=20u64 {
            let payload = Bytes::from(format!("message {i}"));
            sender
                .send(EchoRequest {
                    payload: payload.clone(),
                    ..Default::default()
                })
                .await
                .expect("the stream is open");
            let reply = within(LIMIT, "bidi reply", replies.message())
                .await
                .expect("a reply")
                .expect("not the end");
            assert_eq!(reply.server, answers);
            assert_eq!(reply.sequence, i);
            assert_eq!(reply.payload, payload);
        }
        drop(sender);
        let end = within(LIMIT, "the end of the bidi call", replies.message()).await;
        assert!(matches!(end, Ok(None)), "the call ends OK: {end:?}");
        assert_eq!(
            cluster.app_calls() - before,
            fail_on.len() as u64 + 1,
            "one attempt per failing pod, then the one that answered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_server_pushback_the_backoff_starts_again_from_initial_backoff() {
    // The n-th backoff is 0.05 s x 200^(n-1): the first ~50 ms, the second ~10 s, which the
    // method's 6 s timeout cannot fit, so a call whose backoff reaches its second step ends
    // there. Pushback resets the step (A6): the backoff after it is ~50 ms again.
    let cluster = Cluster::start(spec(
        4,
        json!({"initialBackoff": "0.05s", "maxBackoff": "30s", "backoffMultiplier": 200}),
        "6s",
    ))
    .await;

    // Without pushback: attempt, ~50 ms, attempt, then a 10 s backoff the deadline cuts off.
    let started = Instant::now();
    assert_eq!(attempts_of_failing_call(&cluster, 0).await, 2);
    eprintln!("without pushback: 2 attempts in {:?}", started.elapsed());

    // Attempts go echo-a1, echo-b1, echo-c1 (node, zone, any), then the best tier again. Only
    // echo-b1 pushes back (0 ms): echo-a1 fails, ~50 ms, echo-b1 pushes back, at once echo-c1
    // fails, ~50 ms (the backoff reset), the fourth attempt fails: maxAttempts.
    let before = cluster.app_calls();
    let mut request = failing(&[], 0);
    request.retry_pushback_ms = "0".to_string();
    request.pushback_on = vec!["echo-b1".to_string()];
    let started = Instant::now();
    let status = call(&cluster, request).await.expect_err("every pod fails");
    eprintln!(
        "with pushback from the second attempt: {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        cluster.app_calls() - before,
        4,
        "after the pushback the backoff started again from initialBackoff"
    );
}
