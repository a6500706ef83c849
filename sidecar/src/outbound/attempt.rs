//! One attempt: one exchange with one upstream endpoint, over HTTP/3 (or the HTTP/2 fallback on
//! TCP when UDP to the peer is blocked). It opens a stream on the endpoint's pooled connection, sends the request (replaying what earlier attempts sent),
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

use crate::config::service_config::ThrottlingPolicy;
use crate::endpoints::ranking::{InFlight, RankedEndpoint};
use crate::outbound::decide::Pushback;
use crate::outbound::replay::RequestSource;
use crate::outbound::upstream::CallRecord;
use crate::outbound::upstream::Upstream;
use crate::wire::body::{start_pump, H3RecvBody, H3Send, PumpEnd, StreamFailure};
use crate::wire::field_memory::Defined;
use crate::wire::grpc::{self, Code};
use crate::wire::h2_peer::{self, H2PeerRecvBody, H2PeerSend};
use crate::wire::h3_quic::QuicRecv;
use crate::wire::quic::Link;
use crate::wire::quic::{H3Sender, PeerSender};

type UpstreamRecv = h3::client::RequestStream<QuicRecv, Bytes>;

/// What every attempt of a call sends: method, path and metadata as the app sent them.
pub struct CallRequest {
    pub method: Method,
    pub path: PathAndQuery,
    pub headers: HeaderMap,
    pub deadline: Option<Instant>,
}

/// Where an attempt goes and how long it may wait for response headers.
pub struct AttemptTarget<'a> {
    pub upstream: &'a Arc<Upstream>,
    pub endpoint: Arc<RankedEndpoint>,
    /// The throttle policy the call runs under: an OK at the end of the body refills it.
    pub throttling: Option<ThrottlingPolicy>,
    /// Response headers must arrive by then: the call's deadline or `perAttemptRecvTimeout`.
    pub headers_by: Option<Instant>,
    /// True when `headers_by` is the per-attempt limit rather than the call's deadline.
    pub per_attempt: bool,
    /// How long to wait for a connect in progress: `Some` when the call has other endpoints to
    /// go to, `None` when this is its only one.
    pub connect_patience: Option<std::time::Duration>,
}

/// How an attempt ended, as far as retrying is concerned.
pub enum AttemptOutcome {
    /// Response headers arrived: the call is committed to this attempt (A6).
    Committed(Response<ResponseBody>),
    /// A trailers-only response: a status and nothing else. May be retried.
    Status {
        code: Code,
        response: Response<ResponseBody>,
        /// `grpc-retry-pushback-ms`: absent, a delay, or "do not retry" (negative/malformed).
        pushback: Pushback,
    },
    /// The request never left this sidecar: connect failure or the stream could not be opened.
    /// `fresh` is false when another call already reported this failure.
    NotSent { reason: String, fresh: bool },
    /// The connection was lost before response headers (dead, reset, closed).
    LinkLost { reason: String, fresh: bool },
    /// The peer sidecar took the request but its app never saw it (H3_REQUEST_REJECTED).
    RefusedByPeer(String),
    /// Failed after the request may have reached the app, before any response headers.
    Failed { code: Code, message: String },
    /// No response headers within `perAttemptRecvTimeout`.
    AttemptTimedOut(String),
    /// The call's deadline passed.
    DeadlineExceeded(String),
}

impl AttemptOutcome {
    /// The `status` label of the attempts metric.
    pub fn status_label(&self) -> &'static str {
        match self {
            AttemptOutcome::Committed(_) => "OK",
            AttemptOutcome::Status { code, .. } | AttemptOutcome::Failed { code, .. } => {
                code.name()
            }
            AttemptOutcome::NotSent { .. } | AttemptOutcome::RefusedByPeer(_) => "NOT_SENT",
            AttemptOutcome::LinkLost { .. } => "LINK_LOST",
            AttemptOutcome::AttemptTimedOut(_) => "ATTEMPT_TIMEOUT",
            AttemptOutcome::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
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
/// `grpc-previous-rpc-attempts` on retries, our server name as `:authority` (or, where both ends
/// remember fields, the slots it refers to: see [`crate::wire::field_memory`]), `te: trailers`
/// unless the peer said it restores it (see [`grpc::FEATURES`]), and gRPC's usual fields
/// implied where the connection's handshake settled that (see
/// [`grpc::imply_grpc_defaults`]).
fn upstream_request(
    call: &CallRequest,
    authority: &Authority,
    previous_attempts: u32,
    link: &Link,
) -> Result<(Request<()>, Defined), String> {
    let mut headers = call.headers.clone();
    let (authority, path, defined) = match link.fields() {
        Some(fields) => {
            let encoded = fields.encode(&call.path, &mut headers);
            (encoded.authority, encoded.path, encoded.defined)
        }
        None => (authority.clone(), call.path.clone(), Defined::default()),
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTPS);
    uri.authority = Some(authority);
    uri.path_and_query = Some(path);
    let mut request = Request::new(());
    *request.method_mut() = call.method.clone();
    // Scheme, authority and path were each parsed already, so only their combination is checked.
    *request.uri_mut() = http::Uri::from_parts(uri)
        .map_err(|e| format!("cannot forward path {:?}: {e}", call.path.as_str()))?;
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
    if !link.peer_restores_te() {
        grpc::require_trailers(&mut headers);
    }
    if link.implies_grpc_defaults() {
        grpc::imply_grpc_defaults(&mut headers);
    }
    *request.headers_mut() = headers;
    Ok((request, defined))
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
    let upstream = target.upstream;
    let endpoint = target.endpoint.clone();
    let mut in_flight = endpoint.start_call();
    let label = |reason: &dyn std::fmt::Display| {
        format!(
            "upstream {} endpoint {} ({}): {reason}",
            upstream.name, endpoint.endpoint.pod, endpoint.endpoint.address
        )
    };
    let timed_out = || {
        if target.per_attempt {
            AttemptOutcome::AttemptTimedOut(label(
                &"no response headers within the retry policy's perAttemptRecvTimeout",
            ))
        } else {
            AttemptOutcome::DeadlineExceeded(label(&"deadline exceeded in the sidecar"))
        }
    };
    let pooled = match within(
        target.headers_by,
        upstream.pool.sender(
            endpoint.endpoint.address,
            &upstream.server_name,
            endpoint.endpoint.identity.as_deref(),
            target.connect_patience,
        ),
    )
    .await
    {
        None => return timed_out(),
        Some(Err(error)) => {
            return AttemptOutcome::NotSent {
                reason: label(&error),
                fresh: error.fresh,
            }
        }
        Some(Ok(pooled)) => pooled,
    };
    let link = pooled.link;
    // Counted as waiting on the connection until response headers arrive: the connection's
    // watchdog judges the peer's silence only while someone waits.
    let waiting = link.waiting();
    let (request, defined) =
        match upstream_request(call, &upstream.authority, previous_attempts, &link) {
            Ok(prepared) => prepared,
            Err(reason) => {
                return AttemptOutcome::Failed {
                    code: Code::Internal,
                    message: label(&reason),
                }
            }
        };
    // The response side tells the request pump when to stop: H3_NO_ERROR once the response is
    // complete, H3_REQUEST_CANCELLED when the app cancelled, the deadline passed or the attempt
    // was abandoned for a retry.
    let (stop_sender, stop) = oneshot::channel::<H3Code>();
    let exchange = Exchange {
        source: source.clone(),
        stop,
        upstream_name: upstream.name.clone(),
    };
    // Boxed, like the attempt itself (see `AttemptStep::run`): the exchange is most of an
    // attempt's state, and `within` would otherwise move it twice more.
    let answer = match pooled.sender {
        PeerSender::H3(sender) => {
            within(
                target.headers_by,
                Box::pin(exchange.over_h3(sender, request)),
            )
            .await
        }
        PeerSender::H2(sender) => {
            within(
                target.headers_by,
                Box::pin(exchange.over_h2(sender, request)),
            )
            .await
        }
    };
    let (head, body) = match answer {
        None => {
            // Dropping the attempt would leave the request pump to notice on its own; stop it
            // now so the peer hears of the cancel at once.
            let _ = stop_sender.send(H3Code::H3_REQUEST_CANCELLED);
            return timed_out();
        }
        // The stream could not be opened: the connection closed or refused it, so the
        // request went nowhere.
        Some(Err(Unanswered::NotOpened(error))) => {
            return AttemptOutcome::NotSent {
                reason: label(&format!("stream refused: {error}")),
                fresh: link.first_to_report_loss(),
            }
        }
        Some(Err(Unanswered::Failed(failure))) => {
            if failure.peer_reset == Some(H3Code::H3_REQUEST_REJECTED) {
                return AttemptOutcome::RefusedByPeer(label(
                    &"the peer sidecar rejected the request before its app saw it",
                ));
            }
            if failure.peer_reset.is_none() {
                // Not the peer's answer but the connection's end: a transport loss.
                return AttemptOutcome::LinkLost {
                    reason: label(&failure),
                    fresh: link.first_to_report_loss(),
                };
            }
            return AttemptOutcome::Failed {
                code: failure.grpc_code(),
                message: label(&failure),
            };
        }
        Some(Ok(answer)) => answer,
    };
    drop(waiting);
    in_flight.answered();
    // The peer read this request's head before answering, so it holds what the head defined.
    if let Some(fields) = link.fields() {
        fields.confirm(defined);
    }
    let mut parts = head;
    if !link.peer_restores_te() && grpc::announces_te(&parts.headers) {
        link.note_peer_restores_te();
    }
    crate::wire::grpc::strip_hop_by_hop(&mut parts.headers);
    if link.implies_grpc_defaults() {
        grpc::restore_grpc_defaults(&mut parts.headers);
    }
    parts.version = http::Version::HTTP_2;
    if let Some(status) = parts.headers.get(grpc::GRPC_STATUS) {
        // Trailers-only: the status came in the only HEADERS frame and nothing follows.
        let code = Code::from_header(status);
        let pushback = Pushback::parse(parts.headers.get("grpc-retry-pushback-ms"));
        let _ = stop_sender.send(H3Code::H3_NO_ERROR);
        return AttemptOutcome::Status {
            code,
            pushback,
            response: Response::from_parts(parts, ResponseBody::Empty),
        };
    }
    // Committed (A6): no other attempt will ever send this request, so what the replay buffer
    // kept is freed now rather than when the call ends, which for a stream may be hours away.
    source.commit();
    let body = UpstreamBody {
        inner: body,
        deadline: call
            .deadline
            .map(|at| Box::pin(tokio::time::sleep_until(at))),
        upstream: upstream.clone(),
        throttling: target.throttling,
        endpoint,
        stop: Some(stop_sender),
        _in_flight: in_flight,
        record: Some(record),
        restores_ok_status: link.implies_grpc_defaults(),
        done: false,
    };
    AttemptOutcome::Committed(Response::from_parts(
        parts,
        ResponseBody::Upstream(Box::new(body)),
    ))
}

/// One request on its way to a peer, over whichever protocol the pool holds for it.
struct Exchange {
    source: Arc<RequestSource>,
    stop: oneshot::Receiver<H3Code>,
    upstream_name: Arc<str>,
}

/// Why an exchange got no response headers.
enum Unanswered {
    /// The stream never opened: the request went nowhere.
    NotOpened(String),
    Failed(StreamFailure),
}

type Answer = Result<(http::response::Parts, PeerBody), Unanswered>;

impl Exchange {
    async fn over_h3(self, mut sender: H3Sender, request: Request<()>) -> Answer {
        let stream = sender
            .send_request(request)
            .await
            .map_err(|error| Unanswered::NotOpened(error.to_string()))?;
        let (send, mut recv) = stream.split();
        self.start_request_pump(send).await;
        match recv.recv_response().await {
            Ok(head) => Ok((head.into_parts().0, PeerBody::H3(H3RecvBody::new(recv)))),
            Err(error) => Err(Unanswered::Failed(StreamFailure::from_stream_error(error))),
        }
    }

    /// The HTTP/2 fallback on TCP (see [`crate::wire::h2_peer`]).
    async fn over_h2(self, sender: h2::client::SendRequest<Bytes>, request: Request<()>) -> Answer {
        let mut sender = sender
            .ready()
            .await
            .map_err(|error| Unanswered::NotOpened(error.to_string()))?;
        let (response, send) = sender
            .send_request(request, false)
            .map_err(|error| Unanswered::NotOpened(error.to_string()))?;
        self.start_request_pump(H2PeerSend::new(send)).await;
        match response.await {
            Ok(response) => {
                let (parts, recv) = response.into_parts();
                Ok((parts, PeerBody::H2(H2PeerRecvBody::new(recv))))
            }
            Err(error) => Err(Unanswered::Failed(h2_peer::stream_failure(error))),
        }
    }

    /// Sends the request body (replaying what earlier attempts sent) until it ends or the
    /// response side says stop, which resets the stream with the code it gives.
    async fn start_request_pump<S: H3Send>(self, mut send: S) {
        let Exchange {
            source,
            mut stop,
            upstream_name,
        } = self;
        start_pump(Box::pin(async move {
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
                Ok(end) => {
                    tracing::debug!(upstream = %upstream_name, ?end, "request body ended early")
                }
                Err(code) => send.reset(code),
            }
        }))
        .await;
    }
}

/// A peer's response body, from either transport.
pub enum PeerBody {
    H3(H3RecvBody<UpstreamRecv>),
    H2(H2PeerRecvBody),
}

impl Body for PeerBody {
    type Data = Bytes;
    type Error = StreamFailure;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        match self.get_mut() {
            PeerBody::H3(body) => Pin::new(body).poll_frame(cx),
            PeerBody::H2(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PeerBody::H3(body) => body.is_end_stream(),
            PeerBody::H2(body) => body.is_end_stream(),
        }
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
    inner: PeerBody,
    deadline: Option<Pin<Box<Sleep>>>,
    upstream: Arc<Upstream>,
    throttling: Option<ThrottlingPolicy>,
    endpoint: Arc<RankedEndpoint>,
    stop: Option<oneshot::Sender<H3Code>>,
    _in_flight: InFlight,
    record: Option<CallRecord>,
    /// The peer implies `grpc-status: 0` in trailers (see [`grpc::imply_ok_status`]).
    restores_ok_status: bool,
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
            if status == Code::Ok as u32 {
                if let Some(throttling) = &self.throttling {
                    self.upstream.throttle.record_success(throttling);
                }
            }
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
                    this.upstream.name
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
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    if this.restores_ok_status {
                        grpc::restore_ok_status(trailers);
                    }
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
                    this.upstream.name, endpoint.pod, endpoint.address
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::quic::HopConvention;

    fn call() -> CallRequest {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("kept"));
        CallRequest {
            method: Method::POST,
            path: PathAndQuery::from_static("/echo.Echo/Unary"),
            headers,
            deadline: None,
        }
    }

    #[test]
    fn te_goes_to_a_peer_until_it_says_it_restores_it() {
        let authority = Authority::from_static("locality-sidecar");
        let unknown_peer = Link::default();
        let restoring_peer = Link::default();
        restoring_peer.note_peer_restores_te();
        let to_unknown_peer = upstream_request(&call(), &authority, 0, &unknown_peer)
            .unwrap()
            .0;
        assert_eq!(
            to_unknown_peer.headers().get(http::header::TE),
            Some(&HeaderValue::from_static("trailers"))
        );
        let to_restoring_peer = upstream_request(&call(), &authority, 0, &restoring_peer)
            .unwrap()
            .0;
        assert!(!to_restoring_peer.headers().contains_key(http::header::TE));
        for request in [&to_unknown_peer, &to_restoring_peer] {
            assert_eq!(request.headers()["x-user"], "kept");
            assert_eq!(request.uri(), "https://locality-sidecar/echo.Echo/Unary");
        }
    }

    #[test]
    fn grpc_content_type_is_implied_only_where_the_handshake_settled_it() {
        let authority = Authority::from_static("locality-sidecar");
        let mut grpc_call = call();
        grpc_call.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let to_plain_h3 = upstream_request(
            &grpc_call,
            &authority,
            0,
            &Link::new(HopConvention::PlainH3),
        )
        .unwrap()
        .0;
        assert_eq!(
            to_plain_h3.headers()[http::header::CONTENT_TYPE],
            "application/grpc"
        );
        let to_sidecar_h3 = upstream_request(
            &grpc_call,
            &authority,
            0,
            &Link::new(HopConvention::GrpcDefaults),
        )
        .unwrap()
        .0;
        assert!(!to_sidecar_h3
            .headers()
            .contains_key(http::header::CONTENT_TYPE));
        assert_eq!(to_sidecar_h3.headers()["x-user"], "kept");
        // The call's own headers stay as the app sent them, for the next attempt.
        assert_eq!(
            grpc_call.headers[http::header::CONTENT_TYPE],
            "application/grpc"
        );
    }

    #[test]
    fn where_both_ends_remember_fields_a_confirmed_path_and_agent_leave_the_hop() {
        let authority = Authority::from_static("locality-sidecar");
        let mut app_call = call();
        app_call.headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static("grpc-dotnet/2.66"),
        );
        let link = Link::new(HopConvention::GrpcDefaultsAndFieldMemory);
        let (first, defined) = upstream_request(&app_call, &authority, 0, &link).unwrap();
        assert_eq!(first.uri(), "https://q0v0/echo.Echo/Unary");
        assert_eq!(
            first.headers()[http::header::USER_AGENT],
            "grpc-dotnet/2.66"
        );
        link.fields().unwrap().confirm(defined);
        let (steady, _) = upstream_request(&app_call, &authority, 0, &link).unwrap();
        assert_eq!(steady.uri(), "https://p0u0/");
        assert!(!steady.headers().contains_key(http::header::USER_AGENT));
        assert_eq!(steady.headers()["x-user"], "kept");
        // The call's own headers stay as the app sent them, for the next attempt.
        assert_eq!(
            app_call.headers[http::header::USER_AGENT],
            "grpc-dotnet/2.66"
        );
        let older_peer = Link::new(HopConvention::GrpcDefaults);
        let (plain, _) = upstream_request(&app_call, &authority, 0, &older_peer).unwrap();
        assert_eq!(plain.uri(), "https://locality-sidecar/echo.Echo/Unary");
    }
}
