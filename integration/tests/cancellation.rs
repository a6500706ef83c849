//! A call the app cancels is cancelled at the upstream app at once, whatever its shape and
//! however far it got: in particular after its request was sent whole, when the only way to
//! tell the server side is STOP_SENDING on the stream it answers on (HTTP/3) or RST_STREAM
//! (HTTP/2). The echo app never enforces deadlines and every call here would run for a minute,
//! so a cancellation the app sees can only come from the sidecars, and it must come in well
//! under a second (the measured delay is printed; `--nocapture`).

use std::time::{Duration, Instant};

use integration::{
    cluster::{Cluster, ClusterSpec},
    echo_server::EchoState,
    harness::{echo_client, within, Pipeline},
    pb::{echo_client::EchoClient, EchoRequest},
};
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The app's service time: any cancellation seen before it is the sidecars' doing.
const SLOW_MS: u32 = 60_000;
/// How long a cancellation may take to reach the app: generous for a busy 2-core machine;
/// without a stop watch it arrives only at the call's deadline (here: never within the test).
const CANCEL_BOUND: Duration = Duration::from_secs(3);
const LIMIT: Duration = Duration::from_secs(30);

/// Runs `call` until the app has it, then drops it as a cancelling app would, and returns how
/// long the app took to see the cancellation.
async fn cancel_once_started<F>(pipeline: &Pipeline, call: F) -> Duration
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let state = pipeline.echo.state();
    let running = tokio::spawn(call);
    assert!(
        state.wait_for_calls_started(1, LIMIT).await,
        "the call never reached the app"
    );
    cancel_and_time(state, running).await
}

/// Aborts `running` (the app cancelling its call) and returns how long `app` took to see it.
async fn cancel_and_time(app: &EchoState, running: tokio::task::JoinHandle<()>) -> Duration {
    // Not a synchronisation: the cancel must arrive either way. This gives the request's end
    // (END_STREAM) time to reach the server side first, so the test exercises the case where
    // only STOP_SENDING can tell the server sidecar.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        app.calls_cancelled(),
        0,
        "the app's call ended before the cancel"
    );
    let cancelled_at = Instant::now();
    running.abort();
    assert!(
        app.wait_for_cancellations(1, CANCEL_BOUND).await,
        "the app's call was not cancelled within {CANCEL_BOUND:?} of the app cancelling"
    );
    app.last_cancellation()
        .expect("a cancellation was counted, so its time was kept")
        .saturating_duration_since(cancelled_at)
}

fn slow() -> EchoRequest {
    EchoRequest {
        delay_ms: SLOW_MS,
        ..Default::default()
    }
}

async fn client(pipeline: &Pipeline) -> EchoClient<Channel> {
    pipeline.client().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_unary_call_is_cancelled_at_the_app_at_once() {
    let pipeline = Pipeline::start().await;
    let mut client = client(&pipeline).await;
    let delay = cancel_once_started(&pipeline, async move {
        let _ = client.unary(slow()).await;
    })
    .await;
    println!("unary: the app saw the cancel {delay:?} after the app cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_server_stream_before_its_first_reply_is_cancelled_at_the_app_at_once() {
    let pipeline = Pipeline::start().await;
    let mut client = client(&pipeline).await;
    let delay = cancel_once_started(&pipeline, async move {
        let request = EchoRequest {
            reply_count: 3,
            ..slow()
        };
        if let Ok(stream) = client.server_stream(request).await {
            let mut stream = stream.into_inner();
            while let Ok(Some(_)) = stream.message().await {}
        }
    })
    .await;
    println!("server stream, no reply yet: the app saw the cancel {delay:?} after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_client_stream_sent_whole_is_cancelled_at_the_app_at_once() {
    let pipeline = Pipeline::start().await;
    let mut client = client(&pipeline).await;
    let delay = cancel_once_started(&pipeline, async move {
        let requests = vec![EchoRequest::default(), EchoRequest::default(), slow()];
        let _ = client.client_stream(tokio_stream::iter(requests)).await;
    })
    .await;
    println!("client stream sent whole: the app saw the cancel {delay:?} after");
}

/// The response has started and the app is quiet between messages: the cancel must not wait
/// for the app's next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_bidi_stream_waiting_on_a_quiet_app_is_cancelled_at_once() {
    let pipeline = Pipeline::start().await;
    let mut client = client(&pipeline).await;
    let state = pipeline.echo.state();
    let running = tokio::spawn(async move {
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let _ = sender.send(EchoRequest::default()).await;
        let Ok(replies) = client.bidi(ReceiverStream::new(receiver)).await else {
            return;
        };
        let mut replies = replies.into_inner();
        if let Ok(Some(_)) = replies.message().await {
            // The next reply takes a minute; the request side then closes (sent whole).
            let _ = sender.send(slow()).await;
            drop(sender);
            while let Ok(Some(_)) = replies.message().await {}
        }
    });
    let deadline = Instant::now() + LIMIT;
    while state.stream_messages_received() < 2 {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the app"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delay = cancel_and_time(state, running).await;
    println!("bidi waiting on a quiet app: the app saw the cancel {delay:?} after");
}

/// Many cancelled calls leave no stop watch behind in the server sidecar and do not disturb
/// the calls that follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_cancelled_calls_all_reach_the_app_and_later_calls_succeed() {
    let pipeline = Pipeline::start().await;
    let mut client = client(&pipeline).await;
    let state = pipeline.echo.state();
    let mut running = Vec::new();
    for _ in 0..50 {
        let mut client = client.clone();
        running.push(tokio::spawn(async move {
            let _ = client.unary(slow()).await;
        }));
    }
    assert!(
        state.wait_for_calls_started(50, LIMIT).await,
        "not every call reached the app"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    for call in running {
        call.abort();
    }
    assert!(
        state
            .wait_for_cancellations(50, Duration::from_secs(10))
            .await,
        "{} of 50 cancelled calls were cancelled at the app",
        state.calls_cancelled()
    );
    for _ in 0..20 {
        let reply = within(
            LIMIT,
            "a call after the cancels",
            client.unary(EchoRequest::default()),
        )
        .await
        .expect("a call after the cancelled ones succeeds");
        assert_eq!(reply.into_inner().sequence, 0);
    }
}

/// A hedged call answered by another pod has its losing attempt cancelled at the slow pod's
/// app at once, not left running there until its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_losing_hedge_is_cancelled_at_its_app_at_once() {
    let mut spec = ClusterSpec::three_nodes(1);
    spec.service_config = Some(json!({"methodConfig": [{"name": [{"service": "echo.Echo"}],
        "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.1s"}}]}));
    let cluster = Cluster::start(spec).await;
    let mut client = echo_client(cluster.app_addr).await;
    let same_node = &cluster.spec.pods[0].0;
    let slow_app = cluster
        .pod(same_node)
        .app
        .as_ref()
        .expect("the same-node pod's app runs")
        .state()
        .clone();
    // The first attempt goes to the same-node pod: a minute there, so the hedge answers.
    slow_app.slow_down(u64::from(SLOW_MS));
    let reply = within(LIMIT, "a hedged call", client.unary(EchoRequest::default()))
        .await
        .expect("the hedge answers")
        .into_inner();
    let answered_at = Instant::now();
    assert_ne!(
        &reply.server, same_node,
        "the slow pod cannot have answered"
    );
    assert_eq!(
        slow_app.calls_started(),
        1,
        "the first attempt reached the slow pod"
    );
    assert!(
        slow_app.wait_for_cancellations(1, CANCEL_BOUND).await,
        "the losing attempt was not cancelled at its app within {CANCEL_BOUND:?}"
    );
    let delay = slow_app
        .last_cancellation()
        .expect("a cancellation was counted, so its time was kept")
        .saturating_duration_since(answered_at);
    println!("losing hedge: its app saw the cancel {delay:?} after the winner answered");
}

/// A server stream whose caller stopped reading, cancelled while the QUIC connection it shares
/// is blocked by connection-wide flow control: enough such streams filled the caller's window.
/// quinn reports that block before the stream's STOP_SENDING, and the caller's sidecar returns
/// one stream's worth of credit without raising the window, so only the stop watch can end the
/// app's call (before it did, about one run in fifty of the 200-stream test below lost one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_server_stream_behind_a_full_connection_window_is_cancelled_at_once() {
    // 48 streams × 2 MiB per-stream window is more than the connection's 64 MiB.
    const STREAMS: usize = 48;
    let pipeline = Pipeline::start().await;
    let state = pipeline.echo.state();
    let client = client(&pipeline).await;
    // All opened before the first reply: once the connection's window is full, a new stream's
    // response headers would wait behind it too. The app's pause before each reply keeps the
    // window empty until then.
    let opening = (0..STREAMS).map(|_| {
        let mut client = client.clone();
        let request = EchoRequest {
            reply_size: 1024 * 1024,
            reply_count: 1_000,
            delay_ms: 300,
            ..Default::default()
        };
        async move { client.server_stream(request).await }
    });
    // Held unread from here: the replies pile up in every window on the way.
    let held: Vec<_> = within(
        LIMIT,
        "opening the streams",
        futures::future::join_all(opening),
    )
    .await
    .into_iter()
    .map(|opened| opened.expect("server stream").into_inner())
    .collect();
    // Full once the app has produced nothing new for a while: every window is then used up.
    let deadline = Instant::now() + LIMIT;
    let mut produced = state.stream_bytes();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(1) {
        assert!(
            Instant::now() < deadline,
            "the replies never stopped flowing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = state.stream_bytes();
        if now != produced {
            produced = now;
            quiet_since = Instant::now();
        }
    }
    assert!(
        produced > 64 * 1024 * 1024,
        "only {produced} bytes were produced: the connection's window cannot be full"
    );
    assert_eq!(state.calls_cancelled(), 0, "a call ended before the cancel");
    let mut held = held;
    drop(held.pop());
    assert!(
        state.wait_for_cancellations(1, CANCEL_BOUND).await,
        "the app's call was not cancelled within {CANCEL_BOUND:?} of the app cancelling"
    );
    drop(held);
    assert!(
        state.wait_for_cancellations(STREAMS as u64, LIMIT).await,
        "only {} of {STREAMS} cancelled streams were cancelled at the app",
        state.calls_cancelled()
    );
}
