//! The echo test service: a plain h2c gRPC server implementing `echo.Echo` that behaves like a
//! real application on demand (reply size, delay, error status on all or some servers, server
//! pushback, stream length, trailers-only errors, metadata echo, the retry-attempt header it
//! received) and records what it observed, so tests can assert on what the
//! application side saw: how many calls arrived, how many were cancelled under it, and how much
//! streaming data it was allowed to produce.
//!
//! It is served with hyper directly rather than through `tonic::transport::Server`, because
//! tonic's server enforces `grpc-timeout` itself. A real application may or may not do that; this
//! one deliberately does not, so a cancelled call observed here can only have been cancelled by
//! the peer (the sidecar), which is what the deadline and cancellation tests need to prove.
//!
//! Metadata echo and cancellation accounting live in a thin HTTP wrapper ([`EchoHttp`]) around
//! the generated tonic service, because tonic's handler API cannot add trailers to a successful
//! unary reply, and because a drop guard at the HTTP level sees every way a call can end early
//! (handler future dropped, response body dropped, connection gone).

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, task::JoinSet};
use tonic::{codegen::Service as _, metadata::MetadataMap, Code, Status, Streaming};

use crate::pb::{
    echo_server::{Echo, EchoServer},
    EchoReply, EchoRequest,
};

/// Largest gRPC message the server accepts or sends; tests use 16 MiB messages.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Request metadata keys with this prefix are sent back as response headers and as trailers.
pub const ECHO_METADATA_PREFIX: &str = "x-echo-";
/// A request carrying this header gets its path (`echo-path`) and every `user-agent` value it
/// arrived with (`echo-user-agent`, in order) back in the response headers and trailers.
pub const ECHO_REQUEST_HEAD: &str = "echo-request-head";

/// Bidi calls carrying this metadata key read their first request before sending response
/// headers, so a status that request asks for comes trailers-only, before the call commits.
pub const BIDI_ANSWER_AFTER_FIRST_REQUEST: &str = "echo-answer-after-first-request";

/// ClientStream replies with the concatenated payloads only up to this total; beyond it the
/// reply payload is empty, so a long client stream cannot make the server buffer without bound.
pub const CLIENT_STREAM_CONCAT_LIMIT: usize = 16 * 1024 * 1024;

/// The bytes a reply carries when `reply_size` is set: byte `i` is `i % 251`. A prime period
/// means a dropped, duplicated or shifted chunk shows up as a mismatch.
pub fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// What the server observed; shared with the test through an `Arc`.
#[derive(Debug, Default)]
pub struct EchoState {
    calls_started: AtomicU64,
    calls_cancelled: AtomicU64,
    /// Calls whose request lacked `te: trailers`, which gRPC over HTTP/2 requires (some stacks,
    /// gRPC C-core among them, refuse such calls).
    calls_without_te_trailers: AtomicU64,
    /// The `content-type` values of each call that did not carry exactly one
    /// `application/grpc`, in arrival order (an empty list: none at all).
    other_content_types: std::sync::Mutex<Vec<Vec<String>>>,
    /// When the last cancellation was seen, so a test can tell how long it took to arrive.
    last_cancellation: std::sync::Mutex<Option<std::time::Instant>>,
    stream_bytes: AtomicU64,
    stream_messages: AtomicU64,
    /// Unary calls served at a time, the rest queue (a pod of limited capacity); none: unlimited.
    capacity: std::sync::Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// Extra service time added to every unary call, settable while serving (a pod gone slow).
    slowdown_ms: AtomicU64,
    /// The HTTP/2 stream limit each new connection announces; 0: none.
    streams_per_connection: AtomicU32,
}

impl EchoState {
    /// Calls that reached the server (any method, counted when the request headers arrive).
    pub fn calls_started(&self) -> u64 {
        self.calls_started.load(Ordering::SeqCst)
    }

    /// Calls that arrived without `te: trailers`: a proxy in front dropped it.
    pub fn calls_without_te_trailers(&self) -> u64 {
        self.calls_without_te_trailers.load(Ordering::SeqCst)
    }

    /// The `content-type` values of the calls that did not carry exactly one `application/grpc`.
    pub fn other_content_types(&self) -> Vec<Vec<String>> {
        self.other_content_types
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Calls that ended before the server finished its response: the handler or the response
    /// body was dropped because the peer reset the stream or the connection went away.
    pub fn calls_cancelled(&self) -> u64 {
        self.calls_cancelled.load(Ordering::SeqCst)
    }

    /// When the server last saw a call cancelled under it.
    pub fn last_cancellation(&self) -> Option<std::time::Instant> {
        *self
            .last_cancellation
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Payload bytes generated by ServerStream replies so far. Replies are generated only when
    /// the HTTP/2 layer asks for more data, so this measures how far backpressure let it run.
    pub fn stream_bytes(&self) -> u64 {
        self.stream_bytes.load(Ordering::SeqCst)
    }

    /// Request messages received by ClientStream and Bidi calls so far. A message counted here
    /// went through every proxy in front of the server, so a test can tell how far a request
    /// stream has got without sleeping.
    pub fn stream_messages_received(&self) -> u64 {
        self.stream_messages.load(Ordering::SeqCst)
    }

    /// Serves at most `calls` unary calls at a time (the others wait their turn, as on a pod
    /// with a fixed worker pool); `None` lifts the limit. Applies to calls arriving from now on.
    pub fn limit_capacity(&self, calls: Option<usize>) {
        let semaphore = calls.map(|calls| Arc::new(tokio::sync::Semaphore::new(calls)));
        *self
            .capacity
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = semaphore;
    }

    /// Announces at most `streams` concurrent calls on each connection accepted from now on
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`, as Kestrel does with 100); `None`: no limit.
    pub fn limit_streams_per_connection(&self, streams: Option<u32>) {
        self.streams_per_connection
            .store(streams.unwrap_or(0), Ordering::SeqCst);
    }

    /// Adds `ms` of service time to every unary call from now on (0: back to normal).
    pub fn slow_down(&self, ms: u64) {
        self.slowdown_ms.store(ms, Ordering::SeqCst);
    }

    /// Holds a capacity slot (if limited) for the call's whole service time.
    async fn serve_unary_time(&self, delay_ms: u32) {
        let semaphore = self
            .capacity
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone();
        let _slot = match &semaphore {
            Some(semaphore) => semaphore.acquire().await.ok(),
            None => None,
        };
        let extra = self.slowdown_ms.load(Ordering::SeqCst);
        let total = u64::from(delay_ms).saturating_add(extra);
        if total > 0 {
            tokio::time::sleep(Duration::from_millis(total)).await;
        }
    }

    /// Waits until at least `count` calls have reached the server; false if `timeout` passed first.
    pub async fn wait_for_calls_started(&self, count: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.calls_started() < count {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Waits until at least `count` calls were cancelled; false if `timeout` passed first.
    pub async fn wait_for_cancellations(&self, count: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.calls_cancelled() >= count {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Marks that an error status must be sent after response headers rather than trailers-only.
/// tonic always turns a handler error into a trailers-only response, so the handler sets this
/// flag and [`EchoHttp`] reshapes the response.
#[derive(Debug, Clone, Default)]
struct HeadersFirst(Arc<AtomicBool>);

impl HeadersFirst {
    fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The gRPC handlers.
#[derive(Debug, Clone)]
struct EchoService {
    name: Arc<str>,
    state: Arc<EchoState>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send + 'static>>;

fn received_grpc_timeout(metadata: &MetadataMap) -> String {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn received_previous_attempts(metadata: &MetadataMap) -> String {
    metadata
        .get("grpc-previous-rpc-attempts")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The status `req` asks this server (`name`) to fail with, with its pushback header if any.
fn requested_status(req: &EchoRequest, name: &str) -> Option<Status> {
    if req.status_code == 0 || !(req.fail_on.is_empty() || req.fail_on.iter().any(|n| n == name)) {
        return None;
    }
    let mut status = Status::with_details(
        Code::from_i32(req.status_code),
        req.status_message.clone(),
        req.status_details.clone(),
    );
    let pushes_back = req.pushback_on.is_empty() || req.pushback_on.iter().any(|n| n == name);
    if !req.retry_pushback_ms.is_empty() && pushes_back {
        // A value that is no valid header is a test bug; send none rather than fail the call.
        if let Ok(value) = req.retry_pushback_ms.parse() {
            status
                .metadata_mut()
                .insert("grpc-retry-pushback-ms", value);
        }
    }
    Some(status)
}

fn reply_payload(req: &EchoRequest) -> Bytes {
    if req.reply_size > 0 {
        pattern(req.reply_size as usize)
    } else {
        req.payload.clone()
    }
}

async fn delay(ms: u32) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
    }
}

/// Fails a single-reply call with the requested status, in the requested shape.
fn fail(status: Status, trailers_only: bool, headers_first: Option<&HeadersFirst>) -> Status {
    if !trailers_only {
        if let Some(flag) = headers_first {
            flag.request();
        }
    }
    status
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let timeout = received_grpc_timeout(request.metadata());
        let attempts = received_previous_attempts(request.metadata());
        let headers_first = request.extensions().get::<HeadersFirst>().cloned();
        let req = request.into_inner();
        self.state.serve_unary_time(req.delay_ms).await;
        if let Some(status) = requested_status(&req, &self.name) {
            return Err(fail(status, req.trailers_only, headers_first.as_ref()));
        }
        Ok(tonic::Response::new(EchoReply {
            payload: reply_payload(&req),
            server: self.name.to_string(),
            sequence: 0,
            received_grpc_timeout: timeout,
            received_previous_rpc_attempts: attempts,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, Status> {
        let timeout = received_grpc_timeout(request.metadata());
        let attempts = received_previous_attempts(request.metadata());
        let req = request.into_inner();
        let status = requested_status(&req, &self.name);
        if req.trailers_only {
            if let Some(status) = status {
                return Err(status);
            }
        }
        let count = req.reply_count.max(1);
        // One buffer shared by every reply: a 1 GiB stream must not cost 1 GiB of allocations.
        let payload = reply_payload(&req);
        let name = self.name.clone();
        let state = self.state.clone();
        let delay_ms = req.delay_ms;
        // `unfold` produces a reply only when polled, i.e. when HTTP/2 flow control has room.
        let replies = futures::stream::unfold((0u64, status), move |(sequence, status)| {
            let payload = payload.clone();
            let name = name.clone();
            let state = state.clone();
            let timeout = timeout.clone();
            let attempts = attempts.clone();
            async move {
                if sequence < count {
                    delay(delay_ms).await;
                    state
                        .stream_bytes
                        .fetch_add(payload.len() as u64, Ordering::SeqCst);
                    let reply = EchoReply {
                        payload,
                        server: name.to_string(),
                        sequence,
                        received_grpc_timeout: timeout,
                        received_previous_rpc_attempts: attempts,
                    };
                    Some((Ok(reply), (sequence + 1, status)))
                } else {
                    status.map(|status| (Err(status), (sequence, None)))
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(replies)))
    }

    async fn client_stream(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let timeout = received_grpc_timeout(request.metadata());
        let attempts = received_previous_attempts(request.metadata());
        let headers_first = request.extensions().get::<HeadersFirst>().cloned();
        let mut requests = request.into_inner();
        let mut received = 0u64;
        let mut concatenated = BytesMut::new();
        let mut over_limit = false;
        // Knobs come from the last request, so a client can decide how the call ends late.
        let mut last = EchoRequest::default();
        while let Some(req) = requests.message().await? {
            self.state.stream_messages.fetch_add(1, Ordering::SeqCst);
            received += 1;
            if !over_limit {
                if concatenated.len() + req.payload.len() <= CLIENT_STREAM_CONCAT_LIMIT {
                    concatenated.extend_from_slice(&req.payload);
                } else {
                    over_limit = true;
                    concatenated = BytesMut::new();
                }
            }
            last = req;
        }
        delay(last.delay_ms).await;
        if let Some(status) = requested_status(&last, &self.name) {
            return Err(fail(status, last.trailers_only, headers_first.as_ref()));
        }
        let payload = if last.reply_size > 0 {
            pattern(last.reply_size as usize)
        } else {
            concatenated.freeze()
        };
        Ok(tonic::Response::new(EchoReply {
            payload,
            server: self.name.to_string(),
            sequence: received,
            received_grpc_timeout: timeout,
            received_previous_rpc_attempts: attempts,
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Self::BidiStream>, Status> {
        let timeout = received_grpc_timeout(request.metadata());
        let attempts = received_previous_attempts(request.metadata());
        let after_first = request
            .metadata()
            .contains_key(BIDI_ANSWER_AFTER_FIRST_REQUEST);
        let mut requests = request.into_inner();
        let name = self.name.clone();
        let state = self.state.clone();
        let reply_to = {
            let name = name.clone();
            let timeout = timeout.clone();
            let attempts = attempts.clone();
            move |req: &EchoRequest, sequence: u64| EchoReply {
                payload: reply_payload(req),
                server: name.to_string(),
                sequence,
                received_grpc_timeout: timeout.clone(),
                received_previous_rpc_attempts: attempts.clone(),
            }
        };
        // Normally bidi answers as soon as the call starts (it never waits for a first
        // request), so it cannot be trailers-only: a request with status_code ends the stream
        // after the replies sent so far, in trailers. On request it reads the first request
        // first, and a status asked for there is a handler error, which tonic sends
        // trailers-only.
        let mut first = None;
        if after_first {
            if let Some(req) = requests.message().await? {
                state.stream_messages.fetch_add(1, Ordering::SeqCst);
                delay(req.delay_ms).await;
                if let Some(status) = requested_status(&req, &name) {
                    return Err(status);
                }
                first = Some(Ok(reply_to(&req, 0)));
            }
        }
        let next_sequence = u64::from(first.is_some());
        let replies = futures::stream::unfold(
            (requests, next_sequence, false),
            move |(mut requests, sequence, finished)| {
                let name = name.clone();
                let state = state.clone();
                let reply_to = reply_to.clone();
                async move {
                    if finished {
                        return None;
                    }
                    match requests.message().await {
                        Ok(Some(req)) => {
                            state.stream_messages.fetch_add(1, Ordering::SeqCst);
                            delay(req.delay_ms).await;
                            if let Some(status) = requested_status(&req, &name) {
                                return Some((Err(status), (requests, sequence, true)));
                            }
                            let reply = reply_to(&req, sequence);
                            Some((Ok(reply), (requests, sequence + 1, false)))
                        }
                        Ok(None) => None,
                        Err(status) => Some((Err(status), (requests, sequence, true))),
                    }
                }
            },
        );
        Ok(tonic::Response::new(Box::pin(
            futures::stream::iter(first).chain(replies),
        )))
    }
}

/// Counts a call as cancelled unless it was marked complete before being dropped.
struct CallGuard {
    state: Arc<EchoState>,
    complete: bool,
}

impl CallGuard {
    fn new(state: Arc<EchoState>) -> Self {
        state.calls_started.fetch_add(1, Ordering::SeqCst);
        Self {
            state,
            complete: false,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.complete {
            *self
                .state
                .last_cancellation
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()) = Some(std::time::Instant::now());
            self.state.calls_cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Response body: the tonic body plus the echoed metadata appended to its trailers.
pub struct EchoBody {
    inner: tonic::body::Body,
    echoed: Vec<(HeaderName, HeaderValue)>,
    guard: Option<CallGuard>,
}

impl EchoBody {
    fn finish(&mut self) {
        if let Some(guard) = self.guard.as_mut() {
            guard.complete = true;
        }
    }
}

impl HttpBody for EchoBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        Poll::Ready(match frame {
            Some(Ok(frame)) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    for (name, value) in &this.echoed {
                        trailers.append(name.clone(), value.clone());
                    }
                    this.finish();
                    Some(Ok(Frame::trailers(trailers)))
                }
                Err(frame) => Some(Ok(frame)),
            },
            // An error here is the server's own failure (e.g. an encoding error), not the peer
            // going away, so it does not count as an observed cancellation.
            Some(Err(status)) => {
                this.finish();
                Some(Err(status))
            }
            None => {
                this.finish();
                None
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The HTTP/2 service: metadata echo and call accounting around the generated gRPC service.
#[derive(Clone)]
struct EchoHttp {
    grpc: EchoServer<EchoService>,
    state: Arc<EchoState>,
}

/// Turns a trailers-only response into response headers followed by a trailers frame.
fn headers_then_trailers(parts: &mut http::response::Parts) -> tonic::body::Body {
    let mut trailers = HeaderMap::new();
    let headers = std::mem::take(&mut parts.headers);
    let mut last_name = None;
    for (name, value) in headers {
        // `HeaderMap::into_iter` yields the name only for the first of repeated values.
        let name = match name {
            Some(name) => {
                last_name = Some(name.clone());
                name
            }
            None => last_name.clone().expect("first header has a name"),
        };
        if name == http::header::CONTENT_TYPE {
            parts.headers.append(name, value);
        } else {
            trailers.append(name, value);
        }
    }
    let frames = futures::stream::iter([Ok::<_, Infallible>(Frame::trailers(trailers))]);
    tonic::body::Body::new(http_body_util::StreamBody::new(frames))
}

impl hyper::service::Service<http::Request<Incoming>> for EchoHttp {
    type Response = http::Response<EchoBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        let mut guard = CallGuard::new(self.state.clone());
        if request
            .headers()
            .get(http::header::TE)
            .map(|te| te.as_bytes())
            != Some(b"trailers")
        {
            self.state
                .calls_without_te_trailers
                .fetch_add(1, Ordering::SeqCst);
        }
        let content_types: Vec<String> = request
            .headers()
            .get_all(http::header::CONTENT_TYPE)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        if content_types != ["application/grpc"] {
            self.state
                .other_content_types
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(content_types);
        }
        let mut echoed: Vec<(HeaderName, HeaderValue)> = request
            .headers()
            .iter()
            .filter(|(name, _)| name.as_str().starts_with(ECHO_METADATA_PREFIX))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        // Asked for by tests of what the sidecars remember per connection: the path and the
        // user-agents exactly as the app received them.
        if request.headers().contains_key(ECHO_REQUEST_HEAD) {
            let mut head = vec![(
                HeaderName::from_static("echo-path"),
                HeaderValue::from_str(request.uri().path())
                    .unwrap_or(HeaderValue::from_static("?")),
            )];
            for agent in request.headers().get_all(http::header::USER_AGENT) {
                head.push((HeaderName::from_static("echo-user-agent"), agent.clone()));
            }
            echoed.extend(head);
        }
        let headers_first = HeadersFirst::default();
        request.extensions_mut().insert(headers_first.clone());
        let mut grpc = self.grpc.clone();
        Box::pin(async move {
            let response = grpc.call(request).await?;
            let (mut parts, mut body) = response.into_parts();
            if parts.headers.contains_key("grpc-status") && headers_first.requested() {
                body = headers_then_trailers(&mut parts);
            }
            for (name, value) in &echoed {
                parts.headers.append(name.clone(), value.clone());
            }
            let trailers_only = parts.headers.contains_key("grpc-status");
            if trailers_only {
                // The headers carry the status; there is nothing left that could be cut short.
                guard.complete = true;
            }
            let body = EchoBody {
                inner: body,
                echoed: if trailers_only { Vec::new() } else { echoed },
                guard: Some(guard),
            };
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// A running echo server. Dropping it (or calling [`EchoServerHandle::abort`]) stops it
/// abruptly: the listener and every open connection close at once, as when a process dies.
pub struct EchoServerHandle {
    addr: SocketAddr,
    state: Arc<EchoState>,
    task: tokio::task::JoinHandle<()>,
    /// Tells the server task to close everything and end, for [`EchoServerHandle::kill`].
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl EchoServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server has observed so far.
    pub fn state(&self) -> &Arc<EchoState> {
        &self.state
    }

    /// Kills the server and all its connections without any graceful shutdown.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Kills the server like [`EchoServerHandle::abort`] and returns once it is gone: the
    /// listener and every connection are closed, so a test can go on knowing the app is down.
    pub async fn kill(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Runs until the server task ends (it only ends when aborted).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for EchoServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts an echo server on `addr` (port 0 picks a free port) that reports `name` in replies.
pub async fn spawn_echo_server(addr: SocketAddr, name: &str) -> std::io::Result<EchoServerHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(EchoState::default());
    let service = EchoService {
        name: name.into(),
        state: state.clone(),
    };
    let http = EchoHttp {
        grpc: EchoServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
        state: state.clone(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(accept_loop(listener, http, stopped));
    Ok(EchoServerHandle {
        addr,
        state,
        task,
        stop: Some(stop),
    })
}

async fn accept_loop(
    listener: TcpListener,
    http: EchoHttp,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    // Connections live in this JoinSet so that aborting the accept task drops them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => {
                drop(listener);
                // Aborts every connection task and waits until each one is gone.
                connections.shutdown().await;
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let http = http.clone();
                    connections.spawn(async move {
                        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                        // Like tonic's server, no stream limit unless a test asks for one, so
                        // that limits under test are the sidecar's own.
                        let streams = http.state.streams_per_connection.load(Ordering::SeqCst);
                        builder.max_concurrent_streams((streams > 0).then_some(streams));
                        let _ = builder.serve_connection(TokioIo::new(stream), http).await;
                    });
                }
                // Out of file descriptors and the like: keep serving the connections we have.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
