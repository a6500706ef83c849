//! One attempt: one HTTP/3 exchange with one upstream endpoint. It opens a stream on the
//! endpoint's pooled QUIC connection, sends the request (replaying what earlier attempts sent),
//! and classifies how it went, which is what the retry loop decides on: committed (response
//! headers arrived), a trailers-only status, never sent (safe to retry transparently), or failed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use h3::error::Code as H3Code;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body::{Body, Frame};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::config::service_config::status_name;
use crate::endpoints::ranking::{InFlight, RankedEndpoint};
use crate::metrics::{metrics, CallLabels};
use crate::outbound::replay::RequestSource;
use crate::wire::body::{start_pump, H3RecvBody, H3Send, PumpEnd, StreamFailure};
use crate::wire::grpc::{self, Code};
use crate::wire::quic::ConnectionPool;

type UpstreamRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

/// What every attempt of a call sends: method, path and metadata as the app sent them.
pub struct CallRequest {
    pub method: Method,
    pub path: PathAndQuery,
    pub headers: HeaderMap,
    pub deadline: Option<Instant>,
}

/// Who is calling whom, for messages, metrics and the connection pool.
pub struct AttemptTarget<'a> {
    pub upstream: &'a Arc<str>,
    pub server_name: &'a Arc<str>,
    pub authority: &'a Authority,
    pub pool: &'a ConnectionPool,
    pub endpoint: Arc<RankedEndpoint>,
}

/// How an attempt ended, as far as retrying is concerned.
pub enum AttemptOutcome {
    /// Response headers arrived: the call is committed to this attempt (A6).
    Committed(Response<ResponseBody>),
    /// A trailers-only response: a status and nothing else. May be retried.
    Status {
        code: u32,
        response: Response<ResponseBody>,
        /// `grpc-retry-pushback-ms`: absent, a delay, or "do not retry" (negative/malformed).
        pushback: Pushback,
    },
    /// The request never reached the upstream app: connect failure, stream refused, or the
    /// peer sidecar rejected it before the app saw it. Safe to retry elsewhere at once.
    NotSent(String),
    /// Failed after the request may have reached the app, before any response headers.
    Failed { code: Code, message: String },
    /// The call's deadline passed.
    DeadlineExceeded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    None,
    After(std::time::Duration),
    DoNotRetry,
}

impl Pushback {
    fn from_headers(headers: &HeaderMap) -> Pushback {
        match headers.get("grpc-retry-pushback-ms") {
            None => Pushback::None,
            Some(value) => match value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
            {
                Some(ms) if ms >= 0 => Pushback::After(std::time::Duration::from_millis(ms as u64)),
                _ => Pushback::DoNotRetry,
            },
        }
    }
}

/// Runs `future` until the call's deadline, if it has one; `None` when the deadline passed.
async fn within<F: Future>(deadline: Option<Instant>, future: F) -> Option<F::Output> {
    match deadline {
        None => Some(future.await),
        Some(at) => tokio::time::timeout_at(at, future).await.ok(),
    }
}

/// The request as the upstream sidecar receives it: the remaining deadline in `grpc-timeout`,
/// `grpc-previous-rpc-attempts` on retries, our server name as `:authority`.
fn upstream_request(
    call: &CallRequest,
    authority: &Authority,
    previous_attempts: u32,
) -> Result<Request<()>, String> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTPS);
    uri.authority = Some(authority.clone());
    uri.path_and_query = Some(call.path.clone());
    let mut request = Request::new(());
    *request.method_mut() = call.method.clone();
    // Scheme, authority and path were each parsed already, so only their combination is checked.
    *request.uri_mut() = http::Uri::from_parts(uri)
        .map_err(|e| format!("cannot forward path {:?}: {e}", call.path.as_str()))?;
    let mut headers = call.headers.clone();
    if let Some(deadline) = call.deadline {
        let remaining = deadline.saturating_duration_since(Instant::now());
        headers.insert(grpc::GRPC_TIMEOUT, grpc::format_timeout(remaining));
    }
    if previous_attempts > 0 {
        headers.insert(
            "grpc-previous-rpc-attempts",
            HeaderValue::from(previous_attempts),
        );
    }
    *request.headers_mut() = headers;
    Ok(request)
}

/// Makes one attempt. `source` supplies the request body; `record` describes the call for the
/// final metrics when this attempt's response streams to the app.
pub async fn attempt(
    target: AttemptTarget<'_>,
    call: &CallRequest,
    source: Arc<RequestSource>,
    previous_attempts: u32,
    record: CallRecord,
) -> AttemptOutcome {
    let endpoint = target.endpoint.clone();
    let in_flight = endpoint.start_call();
    let label = |reason: &dyn std::fmt::Display| {
        format!(
            "upstream {} endpoint {} ({}): {reason}",
            target.upstream, endpoint.endpoint.pod, endpoint.endpoint.address
        )
    };
    let mut sender = match within(
        call.deadline,
        target
            .pool
            .sender(endpoint.endpoint.address, target.server_name),
    )
    .await
    {
        None => return AttemptOutcome::DeadlineExceeded,
        Some(Err(error)) => return AttemptOutcome::NotSent(label(&error)),
        Some(Ok(sender)) => sender,
    };
    let request = match upstream_request(call, target.authority, previous_attempts) {
        Ok(request) => request,
        Err(reason) => {
            return AttemptOutcome::Failed {
                code: Code::Internal,
                message: label(&reason),
            }
        }
    };
    let stream = match within(call.deadline, sender.send_request(request)).await {
        None => return AttemptOutcome::DeadlineExceeded,
        // The stream could not be opened: the connection closed or refused it, so the
        // request went nowhere.
        Some(Err(error)) => {
            return AttemptOutcome::NotSent(label(&format!("stream refused: {error}")))
        }
        Some(Ok(stream)) => stream,
    };
    let (mut send, mut recv) = stream.split();

    // The response side tells the request pump when to stop: H3_NO_ERROR once the response is
    // complete, H3_REQUEST_CANCELLED when the app cancelled, the deadline passed or the attempt
    // was abandoned for a retry.
    let (stop_sender, mut stop) = oneshot::channel::<H3Code>();
    let upstream_name = target.upstream.clone();
    start_pump(async move {
        let ended = {
            let pump = source.send_into(&mut send);
            tokio::pin!(pump);
            tokio::select! {
                end = &mut pump => Ok(end),
                code = &mut stop => Err(code.unwrap_or(H3Code::H3_REQUEST_CANCELLED)),
            }
        };
        match ended {
            Ok(PumpEnd::Complete) => {}
            Ok(end) => tracing::debug!(upstream = %upstream_name, ?end, "request body ended early"),
            Err(code) => send.reset(code),
        }
    })
    .await;

    let head = match within(call.deadline, recv.recv_response()).await {
        None => return AttemptOutcome::DeadlineExceeded,
        Some(Err(error)) => {
            let failure = StreamFailure::from_stream_error(error);
            if failure.peer_reset == Some(H3Code::H3_REQUEST_REJECTED) {
                return AttemptOutcome::NotSent(label(
                    &"the peer sidecar rejected the request before its app saw it",
                ));
            }
            return AttemptOutcome::Failed {
                code: failure.grpc_code(),
                message: label(&failure),
            };
        }
        Some(Ok(head)) => head,
    };
    let (mut parts, ()) = head.into_parts();
    crate::wire::grpc::strip_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_2;
    if let Some(status) = parts.headers.get(grpc::GRPC_STATUS) {
        // Trailers-only: the status came in the only HEADERS frame and nothing follows.
        let code = status
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(Code::Unknown as u32);
        let pushback = Pushback::from_headers(&parts.headers);
        let _ = stop_sender.send(H3Code::H3_NO_ERROR);
        return AttemptOutcome::Status {
            code,
            pushback,
            response: Response::from_parts(parts, ResponseBody::Empty),
        };
    }
    let body = UpstreamBody {
        inner: H3RecvBody::new(recv),
        deadline: call
            .deadline
            .map(|at| Box::pin(tokio::time::sleep_until(at))),
        upstream: target.upstream.clone(),
        endpoint,
        stop: Some(stop_sender),
        _in_flight: in_flight,
        record: Some(record),
        done: false,
    };
    AttemptOutcome::Committed(Response::from_parts(
        parts,
        ResponseBody::Upstream(Box::new(body)),
    ))
}

/// The call's labels, recorded once its final status is known (at the end of a streamed body).
pub struct CallRecord {
    pub labels: CallLabels,
}

impl CallRecord {
    pub fn finish(mut self, code: u32) {
        self.labels.status = status_name(code);
        metrics().calls.get_or_create(&self.labels).inc();
    }
}

/// The body of a response to the app.
pub enum ResponseBody {
    /// Trailers-only responses: everything is in the headers.
    Empty,
    Upstream(Box<UpstreamBody>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = StreamFailure;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailure>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Upstream(body) => Pin::new(body.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Upstream(body) => body.done,
        }
    }
}

/// An upstream's response body on its way to the app. It enforces the call's deadline, turns
/// upstream failures into gRPC statuses, and keeps the call counted against its endpoint.
pub struct UpstreamBody {
    inner: H3RecvBody<UpstreamRecv>,
    deadline: Option<Pin<Box<Sleep>>>,
    upstream: Arc<str>,
    endpoint: Arc<RankedEndpoint>,
    stop: Option<oneshot::Sender<H3Code>>,
    _in_flight: InFlight,
    record: Option<CallRecord>,
    done: bool,
}

type FramePoll = Poll<Option<Result<Frame<Bytes>, StreamFailure>>>;

impl UpstreamBody {
    fn finish(&mut self, code: H3Code, status: u32) {
        self.done = true;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(code);
        }
        if let Some(record) = self.record.take() {
            record.finish(status);
        }
    }

    fn status_trailers(&mut self, code: Code, message: String) -> FramePoll {
        self.finish(H3Code::H3_REQUEST_CANCELLED, code as u32);
        Poll::Ready(Some(Ok(Frame::trailers(grpc::status_headers(
            code, &message,
        )))))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = StreamFailure;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                let message = format!(
                    "deadline exceeded in the sidecar while streaming from upstream {}",
                    this.upstream
                );
                return this.status_trailers(Code::DeadlineExceeded, message);
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                // A response that ends without trailers has no status; clients call it UNKNOWN.
                this.finish(H3Code::H3_NO_ERROR, Code::Unknown as u32);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let status = trailers
                        .get(grpc::GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(Code::Unknown as u32);
                    this.finish(H3Code::H3_NO_ERROR, status);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(failure))) if failure.is_cancel() => {
                // A cancel from the upstream goes to the app as an HTTP/2 cancel, which every
                // gRPC client reports as CANCELLED.
                this.finish(H3Code::H3_REQUEST_CANCELLED, Code::Cancelled as u32);
                Poll::Ready(Some(Err(failure)))
            }
            Poll::Ready(Some(Err(failure))) => {
                let endpoint = &this.endpoint.endpoint;
                let message = format!(
                    "upstream {} endpoint {} ({}): {failure}",
                    this.upstream, endpoint.pod, endpoint.address
                );
                this.status_trailers(failure.grpc_code(), message)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Dropped before the end: the app cancelled, so the upstream must hear of it.
        self.finish(H3Code::H3_REQUEST_CANCELLED, Code::Cancelled as u32);
    }
}
