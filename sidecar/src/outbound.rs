//! The outbound role: the app's calls arrive on a loopback h2c listener, each is sent to one
//! upstream endpoint over HTTP/3, and the response streams back. Failures the sidecar itself
//! meets (no endpoint, connect failure, peer reset, deadline) become gRPC statuses.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h3::error::Code as H3Code;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::body::{pump_body, H3RecvBody, H3Send, PumpEnd, StreamFailure};
use crate::grpc::{self, Code};
use crate::pick::{InFlight, RankedEndpoint, RankingWatch};
use crate::transport::ConnectionPool;

type UpstreamRecv = h3::client::RequestStream<h3_quinn::RecvStream, Bytes>;

/// Headers that describe one HTTP hop, not the call; HTTP/2 and HTTP/3 both forbid them.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// One configured upstream: its endpoints and how to reach them.
pub struct Upstream {
    pub name: Arc<str>,
    /// The name upstream certificates must carry; also the `:authority` of forwarded calls.
    pub server_name: Arc<str>,
    pub ranking: RankingWatch,
    pub pool: Arc<ConnectionPool>,
}

/// A failure of the sidecar's own, sent to the app as a trailers-only gRPC status.
#[derive(Debug)]
struct CallFailure {
    code: Code,
    message: String,
}

impl CallFailure {
    fn into_response(self) -> Response<ResponseBody> {
        grpc::trailers_only_response(self.code, &self.message, ResponseBody::Empty)
    }
}

impl Upstream {
    /// Handles one call from the app; never fails at the HTTP level.
    pub async fn call(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let arrived = Instant::now();
        let deadline = request
            .headers()
            .get(grpc::GRPC_TIMEOUT)
            .and_then(grpc::parse_timeout)
            .map(|timeout| arrived + timeout);
        Ok(match self.forward(request, deadline).await {
            Ok(response) => response,
            Err(failure) => {
                tracing::debug!(upstream = %self.name, code = ?failure.code, message = %failure.message, "call failed in the sidecar");
                failure.into_response()
            }
        })
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        deadline: Option<Instant>,
    ) -> Result<Response<ResponseBody>, CallFailure> {
        let chosen = self.ranking.borrow().pick(&[]).ok_or_else(|| CallFailure {
            code: Code::Unavailable,
            message: format!("upstream {}: no ready endpoint", self.name),
        })?;
        let in_flight = chosen.start_call();
        let unavailable = |reason: String| CallFailure {
            code: Code::Unavailable,
            message: format!(
                "upstream {} endpoint {} ({}): {reason}",
                self.name, chosen.endpoint.pod, chosen.endpoint.address
            ),
        };

        let mut sender = within(
            deadline,
            self.pool.sender(chosen.endpoint.address, &self.server_name),
        )
        .await?
        .map_err(|e| unavailable(e.to_string()))?;
        let (parts, body) = request.into_parts();
        let upstream_request = self.upstream_request(parts, deadline)?;
        let stream = within(deadline, sender.send_request(upstream_request))
            .await?
            .map_err(|e| unavailable(format!("stream refused: {e}")))?;
        let (mut send, mut recv) = stream.split();

        // The response body tells the request pump when to stop: H3_NO_ERROR once the response
        // is complete, H3_REQUEST_CANCELLED when the app cancelled or the deadline passed.
        let (stop_sender, mut stop) = oneshot::channel::<H3Code>();
        let name = self.name.clone();
        tokio::spawn(async move {
            let ended = {
                let pump = pump_body(body, &mut send);
                tokio::pin!(pump);
                tokio::select! {
                    end = &mut pump => Ok(end),
                    code = &mut stop => Err(code.unwrap_or(H3Code::H3_REQUEST_CANCELLED)),
                }
            };
            match ended {
                Ok(PumpEnd::Complete) => {}
                Ok(end) => tracing::debug!(upstream = %name, ?end, "request body ended early"),
                Err(code) => send.reset(code),
            }
        });

        let head = match within(deadline, recv.recv_response()).await? {
            Ok(head) => head,
            Err(error) => {
                let failure = StreamFailure::from_stream_error(error);
                return Err(CallFailure {
                    code: failure.grpc_code(),
                    ..unavailable(failure.to_string())
                });
            }
        };
        let (mut parts, ()) = head.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = http::Version::HTTP_2;
        if parts.headers.contains_key(grpc::GRPC_STATUS) {
            // Trailers-only: the status came in the only HEADERS frame and nothing follows.
            let _ = stop_sender.send(H3Code::H3_NO_ERROR);
            return Ok(Response::from_parts(parts, ResponseBody::Empty));
        }
        let body = UpstreamBody {
            inner: H3RecvBody::new(recv),
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
            upstream: self.name.clone(),
            endpoint: chosen.clone(),
            stop: Some(stop_sender),
            _in_flight: in_flight,
            done: false,
        };
        Ok(Response::from_parts(
            parts,
            ResponseBody::Upstream(Box::new(body)),
        ))
    }

    /// The call as the upstream sidecar receives it: same method, path and metadata, the
    /// remaining deadline in `grpc-timeout`, and our server name as `:authority`.
    fn upstream_request(
        &self,
        mut parts: http::request::Parts,
        deadline: Option<Instant>,
    ) -> Result<Request<()>, CallFailure> {
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri = http::Uri::builder()
            .scheme("https")
            .authority(&*self.server_name)
            .path_and_query(path)
            .build()
            .map_err(|e| CallFailure {
                code: Code::Internal,
                message: format!("upstream {}: cannot forward path {path:?}: {e}", self.name),
            })?;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(deadline) = deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(deadline_exceeded());
            }
            parts
                .headers
                .insert(grpc::GRPC_TIMEOUT, grpc::format_timeout(remaining));
        }
        let mut request = Request::new(());
        *request.method_mut() = parts.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = parts.headers;
        Ok(request)
    }
}

fn deadline_exceeded() -> CallFailure {
    CallFailure {
        code: Code::DeadlineExceeded,
        message: "deadline exceeded in the sidecar before the upstream answered".to_string(),
    }
}

/// Runs `future` until the call's deadline, if it has one.
async fn within<F: std::future::Future>(
    deadline: Option<Instant>,
    future: F,
) -> Result<F::Output, CallFailure> {
    match deadline {
        None => Ok(future.await),
        Some(at) => tokio::time::timeout_at(at, future)
            .await
            .map_err(|_| deadline_exceeded()),
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
    done: bool,
}

type FramePoll = Poll<Option<Result<Frame<Bytes>, StreamFailure>>>;

impl UpstreamBody {
    fn finish(&mut self, code: H3Code) {
        self.done = true;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(code);
        }
    }

    fn status_trailers(&mut self, code: Code, message: String) -> FramePoll {
        self.finish(H3Code::H3_REQUEST_CANCELLED);
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
                this.finish(H3Code::H3_NO_ERROR);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    this.finish(H3Code::H3_NO_ERROR);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(failure))) if failure.is_cancel() => {
                // A cancel from the upstream goes to the app as an HTTP/2 cancel, which every
                // gRPC client reports as CANCELLED.
                this.finish(H3Code::H3_REQUEST_CANCELLED);
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
        self.finish(H3Code::H3_REQUEST_CANCELLED);
    }
}

/// Serves one outbound listener until `shutdown` fires, then lets open calls finish for up to
/// `drain`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    upstream: Arc<Upstream>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    crate::h2_settings::server(&mut builder);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(upstream = %upstream.name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        let service = hyper::service::service_fn(move |request| upstream.clone().call(request));
        let connection =
            graceful.watch(builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "app connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}
