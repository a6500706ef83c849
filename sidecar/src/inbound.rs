//! The inbound role: peer sidecars' calls arrive over QUIC/HTTP/3 (mutual TLS checked by the
//! handshake), and each is handed to the local app over a pooled h2c connection. The app's
//! response, trailers-only or streamed, goes back unchanged.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h3::error::Code as H3Code;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::Body;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{pump_body, H3RecvBody, H3Send, PumpEnd};
use crate::grpc::{self, Code};
use crate::metrics::{metrics, DirectionLabels, StatusLabels};
use crate::outbound::strip_hop_by_hop;

type PeerRecv = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;
type PeerSend = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type AppSender = hyper::client::conn::http2::SendRequest<H3RecvBody<PeerRecv>>;

#[derive(Debug, thiserror::Error)]
#[error("local app at {address}: {reason}")]
pub struct AppError {
    address: SocketAddr,
    reason: String,
    /// True when the call certainly never reached the app (no connection could be made).
    not_sent: bool,
}

/// One multiplexed h2c connection to the local app, re-opened when it drops (app restart).
pub struct AppClient {
    address: SocketAddr,
    /// `address` as the `:authority` of every forwarded call, parsed once.
    authority: Authority,
    live: Mutex<Option<AppSender>>,
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

    fn current(&self) -> Option<AppSender> {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live.as_ref().filter(|sender| !sender.is_closed()).cloned()
    }

    async fn sender(&self) -> Result<AppSender, AppError> {
        if let Some(sender) = self.current() {
            return Ok(sender);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.current() {
            return Ok(sender);
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
        let mut builder =
            hyper::client::conn::http2::Builder::new(crate::h2_settings::BoxingExecutor);
        crate::h2_settings::client(&mut builder);
        let (sender, connection) = builder
            .handshake(hyper_util::rt::TokioIo::new(
                crate::batched_io::BatchedWrites::new(stream),
            ))
            .await
            .map_err(|e| failed(format!("HTTP/2 handshake failed: {e}")))?;
        let address = self.address;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::info!(%address, %error, "connection to the local app lost");
            }
        });
        *self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    async fn send(
        &self,
        request: Request<H3RecvBody<PeerRecv>>,
    ) -> Result<Response<Incoming>, AppError> {
        let mut sender = self.sender().await?;
        sender.send_request(request).await.map_err(|e| AppError {
            address: self.address,
            reason: e.to_string(),
            not_sent: false,
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
                    tracing::info!(%remote, reason = %crate::transport::describe_connection_error(&error), "refused peer connection");
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
    let app_request = Request::from_parts(parts, H3RecvBody::new(recv));

    // The app normally honours grpc-timeout itself; enforcing it here as well makes sure the app
    // sees a cancellation (RST_STREAM) when the deadline passes, even for a call whose client
    // side has already finished sending and so cannot be reset by the peer any more.
    let exchange = async {
        let response = match app.send(app_request).await {
            Ok(response) => response,
            Err(AppError {
                reason,
                not_sent: true,
                ..
            }) => {
                // The app never saw the call: H3_REQUEST_REJECTED tells the caller it is safe
                // to retry elsewhere (gRFC G2), which its sidecar does transparently.
                tracing::warn!(app = %app.address, %reason, "local app unreachable; call rejected");
                metrics()
                    .inbound_calls
                    .get_or_create(&StatusLabels { status: "REJECTED" })
                    .inc();
                send.reset(H3Code::H3_REQUEST_REJECTED);
                return;
            }
            Err(error) => {
                metrics()
                    .inbound_calls
                    .get_or_create(&StatusLabels {
                        status: "UNAVAILABLE",
                    })
                    .inc();
                send_status(&mut send, Code::Unavailable, &error.to_string()).await;
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

async fn send_status(send: &mut PeerSend, code: Code, message: &str) {
    let response = grpc::trailers_only_response(code, message, ());
    if send.send_response(response).await.is_ok() {
        let _ = send.finish().await;
    }
}
