//! The load generator: tonic clients of the echo service driving one setup at a time.
//!
//! - **closed loop**: N tasks, each making unary calls back to back. Tasks share HTTP/2
//!   connections, one connection (tonic `Channel`) per [`STREAMS_PER_CONNECTION`] tasks, the way
//!   a busy gRPC client multiplexes calls; N = 1 is one connection with one call at a time.
//! - **open loop**: calls started on a fixed schedule by a dedicated OS thread, whatever the
//!   state of earlier calls. Latency runs from the *scheduled* start, so a stall counts against
//!   every call it delayed (no coordinated omission).
//! - **server stream**: one call that streams many small messages; throughput in messages/s.
//! - **idle and busy streams**: many bidi streams held open with nothing flowing, plus a few
//!   that ping-pong messages, whose round trips are measured.
//!
//! Each generator warms up first, then reports [`Mark::Start`] and [`Mark::End`] around its
//! measured part, so the caller can read the processes' CPU time exactly over that part.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt as _;
use integration::{
    echo_server::MAX_MESSAGE_SIZE,
    pb::{echo_client::EchoClient, EchoRequest},
};
use tokio::{sync::mpsc, task::JoinSet, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Calls (streams) multiplexed on one client HTTP/2 connection. Under HAProxy's default limit
/// of 100 concurrent streams per connection and nginx's 128, so no setup queues streams
/// client-side at the concurrencies used here.
pub const STREAMS_PER_CONNECTION: usize = 64;

/// Connections the open-loop generator spreads its calls over.
const OPEN_LOOP_CONNECTIONS: usize = 2;

/// Calls in flight beyond which the open-loop generator stops starting new ones and counts
/// them as dropped: a setup that cannot keep up must not make the benchmark run out of memory.
const OPEN_LOOP_MAX_IN_FLIGHT: u64 = 20_000;

/// A call that takes longer than this counts as an error; it keeps a hung setup from hanging
/// the benchmark.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Points in a run that the caller takes measurements at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Warm-up over; the measured part begins.
    Start,
    /// The measured part is over.
    End,
    /// Streams scenario: every idle stream is open end to end, nothing else running yet.
    StreamsOpen,
}

/// What one measured run produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Latencies of successful calls in the measured part, in nanoseconds (server stream: the
    /// gaps between consecutive messages).
    pub latencies_ns: Vec<u64>,
    /// Successful calls (server stream: messages) in the measured part.
    pub calls: u64,
    /// Failed, timed-out or (open loop) dropped calls in the measured part.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Length of the measured part.
    pub measured: Duration,
    /// Open loop: how late, on average, calls were started relative to their schedule.
    pub mean_start_lag: Option<Duration>,
    /// CPU seconds of a load generator that runs as its own process (h2load) over the measured
    /// part; `None` when the generator is this process, whose threads are read directly.
    pub loadgen_cpu_seconds: Option<f64>,
}

impl Outcome {
    fn error(&mut self, message: impl Into<String>) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(message.into());
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.latencies_ns.extend(other.latencies_ns);
        self.calls += other.calls;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn request(payload: &Bytes) -> EchoRequest {
    EchoRequest {
        payload: payload.clone(),
        ..Default::default()
    }
}

/// `count` separate HTTP/2 connections to `addr`.
pub async fn connect(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<EchoClient<Channel>>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        // One `connect` per client: tonic's Channel is one HTTP/2 connection.
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        clients.push(
            EchoClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        );
    }
    Ok(clients)
}

/// Closed loop: `concurrency` tasks doing unary calls back to back for `warmup` + `measure`.
pub async fn closed_loop(
    addr: SocketAddr,
    concurrency: usize,
    payload: Bytes,
    warmup: Duration,
    measure: Duration,
    marks: &mut dyn FnMut(Mark),
) -> anyhow::Result<Outcome> {
    let clients = connect(addr, concurrency.div_ceil(STREAMS_PER_CONNECTION)).await?;
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = JoinSet::new();
    for i in 0..concurrency {
        let mut client = clients[i % clients.len()].clone();
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut outcome = Outcome::default();
            loop {
                let begin = Instant::now();
                if begin >= end {
                    break;
                }
                let result = tokio::time::timeout(CALL_TIMEOUT, client.unary(request(&payload)));
                let result = result.await;
                let done = Instant::now();
                // Only calls started inside the window count, so calls/s is calls started per
                // second of window and every counted call's latency is whole.
                if begin < start {
                    continue;
                }
                match result {
                    Ok(Ok(_)) => {
                        outcome.calls += 1;
                        outcome.latencies_ns.push(nanos(done - begin));
                    }
                    Ok(Err(status)) => outcome.error(format!("{status:?}")),
                    Err(_) => outcome.error("call timed out"),
                }
            }
            outcome
        });
    }
    tokio::time::sleep_until(start).await;
    marks(Mark::Start);
    tokio::time::sleep_until(end).await;
    marks(Mark::End);
    let mut outcome = Outcome {
        measured: measure,
        ..Default::default()
    };
    while let Some(task) = tasks.join_next().await {
        outcome.merge(task.context("a load task panicked")?);
    }
    Ok(outcome)
}

/// Open loop: unary calls started at `rate` per second for `warmup` + `measure`, latency from
/// each call's scheduled start.
pub async fn open_loop(
    addr: SocketAddr,
    rate: f64,
    payload: Bytes,
    warmup: Duration,
    measure: Duration,
    marks: &mut dyn FnMut(Mark),
) -> anyhow::Result<Outcome> {
    let clients = connect(addr, OPEN_LOOP_CONNECTIONS).await?;
    let t0 = Instant::now() + Duration::from_millis(10);
    let start = t0 + warmup;
    let end = start + measure;
    let collected = Arc::new(Mutex::new(Outcome::default()));
    let in_flight = Arc::new(AtomicU64::new(0));
    let lag_total_ns = Arc::new(AtomicU64::new(0));
    let lag_count = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Handle::current();
    let stop = Arc::new(AtomicBool::new(false));

    // The schedule runs on its own OS thread: a tokio timer has 1 ms resolution, which would
    // add up to a millisecond of "latency" to every call; a thread sleep is within tens of µs.
    let scheduler = {
        let collected = collected.clone();
        let in_flight = in_flight.clone();
        let lag_total_ns = lag_total_ns.clone();
        let lag_count = lag_count.clone();
        let stop = stop.clone();
        let (t0, start, end) = (t0.into_std(), start.into_std(), end.into_std());
        std::thread::Builder::new()
            .name("open-loop-schedule".into())
            .spawn(move || {
                let mut i: u64 = 0;
                loop {
                    let scheduled = t0 + Duration::from_secs_f64(i as f64 / rate);
                    if scheduled >= end || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let now = std::time::Instant::now();
                    if scheduled > now {
                        std::thread::sleep(scheduled - now);
                    }
                    i += 1;
                    let measured = scheduled >= start;
                    if in_flight.load(Ordering::Relaxed) >= OPEN_LOOP_MAX_IN_FLIGHT {
                        if measured {
                            collected
                                .lock()
                                .unwrap()
                                .error("dropped: too many calls in flight");
                        }
                        continue;
                    }
                    if measured {
                        let lag = std::time::Instant::now().saturating_duration_since(scheduled);
                        lag_total_ns.fetch_add(nanos(lag), Ordering::Relaxed);
                        lag_count.fetch_add(1, Ordering::Relaxed);
                    }
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let mut client = clients[(i as usize) % clients.len()].clone();
                    let payload = payload.clone();
                    let collected = collected.clone();
                    let in_flight = in_flight.clone();
                    runtime.spawn(async move {
                        let result =
                            tokio::time::timeout(CALL_TIMEOUT, client.unary(request(&payload)))
                                .await;
                        let latency = scheduled.elapsed();
                        if measured {
                            let mut outcome = collected.lock().unwrap();
                            match result {
                                Ok(Ok(_)) => {
                                    outcome.calls += 1;
                                    outcome.latencies_ns.push(nanos(latency));
                                }
                                Ok(Err(status)) => outcome.error(format!("{status:?}")),
                                Err(_) => outcome.error("call timed out"),
                            }
                        }
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            })?
    };
    tokio::time::sleep_until(start).await;
    marks(Mark::Start);
    tokio::time::sleep_until(end).await;
    marks(Mark::End);
    // Calls scheduled inside the window may still be running; they count, so wait for them.
    let deadline = Instant::now() + CALL_TIMEOUT + Duration::from_secs(1);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || scheduler.join()).await;
    let mut outcome = std::mem::take(&mut *collected.lock().unwrap());
    outcome.measured = measure;
    outcome.mean_start_lag = lag_total_ns
        .load(Ordering::Relaxed)
        .checked_div(lag_count.load(Ordering::Relaxed))
        .map(Duration::from_nanos);
    Ok(outcome)
}

/// Reads one whole server stream; returns (messages, gaps between messages in ns, duration).
async fn read_stream(
    client: &mut EchoClient<Channel>,
    messages: u64,
    payload: &Bytes,
    keep_gaps: bool,
) -> anyhow::Result<(u64, Vec<u64>, Duration)> {
    let begin = Instant::now();
    let mut stream = client
        .server_stream(EchoRequest {
            payload: payload.clone(),
            reply_count: messages,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut gaps = Vec::with_capacity(if keep_gaps { messages as usize } else { 0 });
    let mut last = begin;
    let mut count = 0u64;
    while let Some(_reply) = stream.message().await? {
        count += 1;
        if keep_gaps {
            let now = Instant::now();
            gaps.push(nanos(now - last));
            last = now;
        }
    }
    Ok((count, gaps, begin.elapsed()))
}

/// Server stream: one call streaming `messages` replies of `payload` each, after a short
/// warm-up stream on the same connection.
pub async fn server_stream(
    addr: SocketAddr,
    messages: u64,
    payload: Bytes,
    marks: &mut dyn FnMut(Mark),
) -> anyhow::Result<Outcome> {
    let mut client = connect(addr, 1).await?.remove(0);
    read_stream(
        &mut client,
        (messages / 20).clamp(1_000, 50_000),
        &payload,
        false,
    )
    .await?;
    marks(Mark::Start);
    let result = tokio::time::timeout(
        Duration::from_secs(600),
        read_stream(&mut client, messages, &payload, true),
    )
    .await;
    marks(Mark::End);
    let mut outcome = Outcome::default();
    match result {
        Ok(Ok((count, gaps, elapsed))) => {
            outcome.calls = count;
            outcome.latencies_ns = gaps;
            outcome.measured = elapsed;
            if count != messages {
                outcome.error(format!("stream ended after {count} of {messages} messages"));
            }
        }
        Ok(Err(error)) => outcome.error(format!("{error:#}")),
        Err(_) => outcome.error("stream timed out"),
    }
    Ok(outcome)
}

/// One bidi stream: its request sender and its reply stream.
type OpenStream = (
    mpsc::Sender<EchoRequest>,
    tonic::Streaming<integration::pb::EchoReply>,
);

/// Opens a bidi stream and completes one exchange on it, so that it is established through
/// every hop (a proxy may not open its upstream stream until data flows).
async fn open_bidi(mut client: EchoClient<Channel>, payload: Bytes) -> anyhow::Result<OpenStream> {
    let (sender, receiver) = mpsc::channel(2);
    sender.send(request(&payload)).await?;
    let mut replies = client
        .bidi(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    replies
        .message()
        .await?
        .context("bidi stream ended before its first reply")?;
    Ok((sender, replies))
}

/// Idle and busy streams: `idle` bidi streams opened and held with nothing flowing, then
/// `busy` bidi streams doing request/reply round trips for `warmup` + `measure`.
pub async fn idle_and_busy(
    addr: SocketAddr,
    idle: usize,
    busy: usize,
    payload: Bytes,
    warmup: Duration,
    measure: Duration,
    marks: &mut dyn FnMut(Mark),
) -> anyhow::Result<Outcome> {
    let clients = connect(addr, (idle + busy).div_ceil(STREAMS_PER_CONNECTION)).await?;
    // Opened 64 at a time: a burst of 1,000 stream openings is not what is being measured.
    let opening = futures::stream::iter(0..idle)
        .map(|i| open_bidi(clients[i % clients.len()].clone(), payload.clone()))
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let idle_streams = tokio::time::timeout(Duration::from_secs(60), opening)
        .await
        .context("opening the idle streams took over 60 s")?
        .into_iter()
        .collect::<anyhow::Result<Vec<OpenStream>>>()
        .context("opening an idle stream")?;
    marks(Mark::StreamsOpen);

    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = JoinSet::new();
    for j in 0..busy {
        let client = clients[(idle + j) % clients.len()].clone();
        let payload = payload.clone();
        tasks.spawn(async move {
            let mut outcome = Outcome::default();
            let (sender, mut replies) = match open_bidi(client, payload.clone()).await {
                Ok(stream) => stream,
                Err(error) => {
                    outcome.error(format!("{error:#}"));
                    return outcome;
                }
            };
            loop {
                let begin = Instant::now();
                if begin >= end {
                    break;
                }
                let exchange = async {
                    sender.send(request(&payload)).await?;
                    replies
                        .message()
                        .await?
                        .context("stream ended early")
                        .map(drop)
                };
                let result = tokio::time::timeout(CALL_TIMEOUT, exchange).await;
                let done = Instant::now();
                if begin < start {
                    continue;
                }
                match result {
                    Ok(Ok(())) => {
                        outcome.calls += 1;
                        outcome.latencies_ns.push(nanos(done - begin));
                    }
                    Ok(Err(error)) => {
                        outcome.error(format!("{error:#}"));
                        break;
                    }
                    Err(_) => {
                        outcome.error("round trip timed out");
                        break;
                    }
                }
            }
            outcome
        });
    }
    tokio::time::sleep_until(start).await;
    marks(Mark::Start);
    tokio::time::sleep_until(end).await;
    marks(Mark::End);
    let mut outcome = Outcome {
        measured: measure,
        ..Default::default()
    };
    while let Some(task) = tasks.join_next().await {
        outcome.merge(task.context("a stream task panicked")?);
    }
    // The idle streams must still be intact after the busy phase, or the proxy dropped them.
    let mut broken = 0;
    for (sender, mut replies) in idle_streams {
        let check = async {
            sender.send(request(&Bytes::new())).await?;
            replies.message().await?.context("stream ended")
        };
        if tokio::time::timeout(Duration::from_secs(5), check)
            .await
            .map_or(true, |r| r.is_err())
        {
            broken += 1;
        }
    }
    if broken > 0 {
        outcome.error(format!(
            "{broken} of {idle} idle streams broke while held open"
        ));
    }
    Ok(outcome)
}
