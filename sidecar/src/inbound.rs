//! The inbound role: peer sidecars' calls arrive over QUIC/HTTP/3 (mutual TLS checked by the
//! handshake), and each is handed to the local app over a pooled h2c connection. The app's
//! response, trailers-only or streamed, goes back unchanged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h3::error::Code as H3Code;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::Body;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::metrics::{metrics, DirectionLabels, StatusLabels};
use crate::wire::body::{
    pump_body, pump_into_h2, start_pump, H2RecvBody, H3RecvBody, H3Send, PumpEnd,
};
use crate::wire::grpc::strip_hop_by_hop;
use crate::wire::grpc::{self, Code};

type PeerRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;
type PeerSend = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type AppSender = h2::client::SendRequest<Bytes>;

#[derive(Debug, thiserror::Error)]
#[error("local app at {address}: {reason}")]
pub struct AppError {
    address: SocketAddr,
    reason: String,
    /// True when the call certainly never reached the app (no connection could be made).
    not_sent: bool,
}

struct AppConnection {
    sender: AppSender,
    /// Set when the connection's task ends: the app closed it or it failed.
    closed: Arc<AtomicBool>,
}

/// One multiplexed h2c connection to the local app, re-opened when it drops (app restart).
///
/// It speaks h2 directly rather than through hyper's client: a call then needs no hand-off to a
/// connection task and no extra task waiting for the response, which profiles showed per call.
pub struct AppClient {
    address: SocketAddr,
    /// `address` as the `:authority` of every forwarded call, parsed once.
    authority: Authority,
    live: Mutex<Option<AppConnection>>,
    connecting: tokio::sync::Mutex<()>,
}

impl AppClient {
    pub fn new(address: SocketAddr) -> Result<AppClient, http::uri::InvalidUri> {
        Ok(AppClient {
            address,
            authority: Authority::try_from(address.to_string().as_str())?,
            live: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// The pooled connection, unless it is known to be closed; with its `closed` flag.
    fn current(&self) -> Option<(AppSender, Arc<AtomicBool>)> {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live.as_ref()
            .filter(|connection| !connection.closed.load(Ordering::Acquire))
            .map(|connection| (connection.sender.clone(), connection.closed.clone()))
    }

    async fn sender(&self) -> Result<(AppSender, Arc<AtomicBool>), AppError> {
        if let Some(pooled) = self.current() {
            return Ok(pooled);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(pooled) = self.current() {
            return Ok(pooled);
        }
        let failed = |reason: String| AppError {
            address: self.address,
            reason,
            not_sent: true,
        };
        let stream = tokio::net::TcpStream::connect(self.address)
            .await
            .map_err(|e| failed(format!("connect failed: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = crate::wire::h2_settings::client()
            .handshake::<_, Bytes>(crate::wire::batched_io::BatchedWrites::new(stream))
            .await
            .map_err(|e| failed(format!("HTTP/2 handshake failed: {e}")))?;
        let address = self.address;
        let closed = Arc::new(AtomicBool::new(false));
        let closed_when_done = closed.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::info!(%address, %error, "connection to the local app lost");
            }
            closed_when_done.store(true, Ordering::Release);
        });
        *self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(AppConnection {
            sender: sender.clone(),
            closed: closed.clone(),
        });
        Ok((sender, closed))
    }

    /// Opens the call's stream to the app and queues its headers. Nothing has reached the app
    /// when this fails. A connection that turns out dead (the app restarted) is replaced once.
    async fn open(
        &self,
        request: Request<()>,
        end_of_stream: bool,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), AppError> {
        let failed = |error: h2::Error| AppError {
            address: self.address,
            reason: error.to_string(),
            not_sent: true,
        };
        let (sender, closed) = self.sender().await?;
        let mut ready = match sender.ready().await {
            Ok(ready) => ready,
            Err(_) => {
                // Marked rather than removed: a call racing this one may already have put a
                // new connection in its place.
                closed.store(true, Ordering::Release);
                let (sender, _) = self.sender().await?;
                sender.ready().await.map_err(failed)?
            }
        };
        ready.send_request(request, end_of_stream).map_err(failed)
    }

    /// The app's response headers. A stream the app refused never reached it (RFC 9113 §8.7).
    async fn response(
        &self,
        response: h2::client::ResponseFuture,
    ) -> Result<Response<h2::RecvStream>, AppError> {
        response.await.map_err(|error| AppError {
            address: self.address,
            not_sent: error.reason() == Some(h2::Reason::REFUSED_STREAM),
            reason: error.to_string(),
        })
    }
}

/// Accepts peer connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, app: Arc<AppClient>) {
    while let Some(incoming) = endpoint.accept().await {
        let app = app.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(error) => {
                    // Most often a peer without a certificate from our CA: worth seeing in logs.
                    tracing::info!(%remote, reason = %crate::wire::quic::describe_connection_error(&error), "refused peer connection");
                    return;
                }
            };
            let direction = DirectionLabels {
                direction: "inbound",
            };
            metrics()
                .quic_connections_opened
                .get_or_create(&direction)
                .inc();
            let watched = connection.clone();
            serve_connection(connection, app).await;
            if let Some(reason) = watched.close_reason() {
                let clean = matches!(&reason, quinn::ConnectionError::ApplicationClosed(close) if close.error_code.into_inner() == 0x100 || close.error_code.into_inner() == 0)
                    || matches!(reason, quinn::ConnectionError::LocallyClosed);
                if !clean {
                    metrics()
                        .quic_connections_lost
                        .get_or_create(&direction)
                        .inc();
                }
            }
        });
    }
}

async fn serve_connection(connection: quinn::Connection, app: Arc<AppClient>) {
    let remote = connection.remote_address();
    let mut h3_connection = match h3::server::builder()
        .send_grease(false)
        .build::<_, Bytes>(h3_quinn::Connection::new(connection))
        .await
    {
        Ok(h3_connection) => h3_connection,
        Err(error) => {
            tracing::info!(%remote, %error, "HTTP/3 setup with peer failed");
            return;
        }
    };
    loop {
        match h3_connection.accept().await {
            Ok(Some(resolver)) => {
                let app = app.clone();
                // Boxed: the call's future is 5 KiB, which a task would copy on spawn and again
                // at its end (see `h2_settings::BoxingExecutor`).
                tokio::spawn(Box::pin(async move {
                    match resolver.resolve_request().await {
                        Ok((request, stream)) => {
                            let (send, recv) = stream.split();
                            handle_call(request, send, recv, &app).await;
                        }
                        Err(error) => tracing::debug!(%remote, %error, "peer request unreadable"),
                    }
                }));
            }
            Ok(None) => break,
            Err(error) => {
                if !error.is_h3_no_error() {
                    tracing::debug!(%remote, %error, "peer connection ended");
                }
                break;
            }
        }
    }
}

async fn handle_call(request: Request<()>, mut send: PeerSend, recv: PeerRecv, app: &AppClient) {
    let arrived = Instant::now();
    let deadline = request
        .headers()
        .get(grpc::GRPC_TIMEOUT)
        .and_then(grpc::parse_timeout)
        .map(|timeout| arrived + timeout);
    let (mut parts, ()) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(app.authority.clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    let uri = match Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(error) => {
            let message = format!("cannot forward {}: {error}", parts.uri);
            send_status(&mut send, Code::Internal, &message).await;
            return;
        }
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_2;
    let app_request = Request::from_parts(parts, ());
    let request_body = H3RecvBody::new(recv);

    // The app normally honours grpc-timeout itself; enforcing it here as well makes sure the app
    // sees a cancellation (RST_STREAM) when the deadline passes, even for a call whose client
    // side has already finished sending and so cannot be reset by the peer any more.
    let exchange = async {
        let (response, mut app_send) = match app.open(app_request, false).await {
            Ok(opened) => opened,
            Err(error) => {
                reject(&mut send, app, error).await;
                return;
            }
        };
        // The request body flows to the app while the response is awaited. The pump stops,
        // resetting the app's stream, once this exchange ends or is abandoned.
        let (_stop_request, stop) = oneshot::channel::<()>();
        start_pump(async move {
            tokio::select! {
                end = pump_into_h2(request_body, &mut app_send) => {
                    if !matches!(end, PumpEnd::Complete) {
                        tracing::debug!(?end, "request to the app ended early");
                    }
                }
                _ = stop => app_send.send_reset(h2::Reason::CANCEL),
            }
        })
        .await;
        let response = match app.response(response).await {
            Ok(response) => response,
            Err(error) => {
                reject(&mut send, app, error).await;
                return;
            }
        };
        metrics()
            .inbound_calls
            .get_or_create(&StatusLabels {
                status: "FORWARDED",
            })
            .inc();
        let (parts, body) = response.into_parts();
        let body = H2RecvBody::new(body);
        let trailers_only = body.is_end_stream();
        if let Err(error) = send.send_response(Response::from_parts(parts, ())).await {
            tracing::debug!(%error, "peer went away before the response");
            return;
        }
        if trailers_only {
            let _ = send.finish().await;
            return;
        }
        match pump_body(body, &mut send, H3Code::H3_INTERNAL_ERROR).await {
            PumpEnd::Complete => {}
            end => tracing::debug!(?end, "response to peer ended early"),
        }
    };
    match deadline {
        None => exchange.await,
        Some(at) => {
            if tokio::time::timeout_at(at, exchange).await.is_err() {
                send.reset(H3Code::H3_REQUEST_CANCELLED);
            }
        }
    }
}

/// Answers a call the app did not take. One that never reached it is reset with
/// H3_REQUEST_REJECTED, which tells the caller it is safe to retry elsewhere (gRFC G2) and its
/// sidecar does so transparently; any other failure becomes an UNAVAILABLE status.
async fn reject(send: &mut PeerSend, app: &AppClient, error: AppError) {
    if error.not_sent {
        tracing::warn!(app = %app.address, reason = %error.reason, "local app unreachable; call rejected");
        metrics()
            .inbound_calls
            .get_or_create(&StatusLabels { status: "REJECTED" })
            .inc();
        send.reset(H3Code::H3_REQUEST_REJECTED);
        return;
    }
    metrics()
        .inbound_calls
        .get_or_create(&StatusLabels {
            status: "UNAVAILABLE",
        })
        .inc();
    send_status(send, Code::Unavailable, &error.to_string()).await;
}

async fn send_status(send: &mut PeerSend, code: Code, message: &str) {
    let response = grpc::trailers_only_response(code, message, ());
    if send.send_response(response).await.is_ok() {
        let _ = send.finish().await;
    }
}
