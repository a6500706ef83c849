//! HTTP/2 over mutual TLS between sidecars: the fallback for when UDP, and so QUIC, cannot pass
//! between two pods (some NetworkPolicies, cloud firewalls and old CNIs block it).
//!
//! The inbound also listens on TCP at its QUIC port's number (ALPN `h2`, TLS 1.3, the same
//! certificates, identity and limits); the outbound connects there when a QUIC connect to a peer
//! gets no answer, and moves back to QUIC once a background connect succeeds (see
//! [`crate::wire::quic::ConnectionPool`]). Everything above this module sees one kind of stream:
//! resets carry HTTP/3 codes on both transports. A code with a standard HTTP/2 meaning travels
//! as that reason; the others (such as [`grpc::H3_APP_CONNECTION_LOST`]) travel as their HTTP/3
//! number, which HTTP/2 allows (RFC 9113 §7: unknown codes carry no special meaning), so the
//! caller's sidecar tells "the app's connection died" from "the app failed" on either transport.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h3::error::Code as H3Code;
use http::HeaderMap;
use http_body::{Body, Frame};
use rustls_pki_types::ServerName;

use crate::wire::body::{H2RecvBody, H3Send, StreamFailure};
use crate::wire::grpc;

/// The ALPN protocol of the TCP fallback.
pub const ALPN_H2: &[u8] = b"h2";

/// Per-stream and per-connection receive windows between sidecars: large enough for full speed
/// on a pod network's bandwidth-delay product, small enough to bound a stalled reader's memory.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Bytes one stream may queue beyond its peer's window before a send waits.
const SEND_BUFFER: usize = 256 * 1024;

/// The HTTP/2 reason a reset with HTTP/3 `code` travels as between sidecars.
pub fn peer_reason(code: H3Code) -> h2::Reason {
    if code == H3Code::H3_NO_ERROR {
        h2::Reason::NO_ERROR
    } else if code == H3Code::H3_REQUEST_CANCELLED {
        h2::Reason::CANCEL
    } else if code == H3Code::H3_REQUEST_REJECTED {
        h2::Reason::REFUSED_STREAM
    } else if code == H3Code::H3_EXCESSIVE_LOAD {
        h2::Reason::ENHANCE_YOUR_CALM
    } else if code == H3Code::H3_INTERNAL_ERROR {
        h2::Reason::INTERNAL_ERROR
    } else {
        // HTTP/3 codes start at 0x100, above every HTTP/2 one, so nothing is confused.
        h2::Reason::from(u32::try_from(u64::from(code)).unwrap_or(0x102))
    }
}

/// The HTTP/3 code a reset from a peer sidecar over HTTP/2 stands for (see [`peer_reason`]).
pub fn h3_code_from_peer(reason: h2::Reason) -> H3Code {
    let value = u32::from(reason);
    if value >= 0x100 {
        return H3Code::from(u64::from(value));
    }
    match reason {
        h2::Reason::NO_ERROR => H3Code::H3_NO_ERROR,
        other => grpc::h3_code_for_h2_reason(other),
    }
}

/// Why an HTTP/2 stream from a peer sidecar stopped: the peer's reset, or the connection's end.
pub fn stream_failure(error: h2::Error) -> StreamFailure {
    match error.reason() {
        Some(reason) if error.is_reset() && error.is_remote() => {
            let code = h3_code_from_peer(reason);
            StreamFailure::peer_reset(code, format!("peer reset the stream ({code})"))
        }
        _ => StreamFailure::transport(format!("HTTP/2 connection to peer failed: {error}")),
    }
}

/// The sending half of an HTTP/2 stream to or from a peer sidecar, within HTTP/2 flow control:
/// each write waits for window, so a stalled reader stalls the writer instead of a buffer.
pub struct H2PeerSend {
    stream: h2::SendStream<Bytes>,
    /// Trailers or an empty END_STREAM frame went out: nothing more may be sent.
    ended: bool,
}

impl H2PeerSend {
    pub fn new(stream: h2::SendStream<Bytes>) -> H2PeerSend {
        H2PeerSend {
            stream,
            ended: false,
        }
    }

    async fn write(&mut self, mut data: Bytes) -> Result<(), h2::Error> {
        while !data.is_empty() {
            self.stream.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| self.stream.poll_capacity(cx))
                .await
                .unwrap_or_else(|| Err(h2::Error::from(h2::Reason::CANCEL)))?;
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            self.stream.send_data(chunk, false)?;
        }
        Ok(())
    }
}

impl H3Send for H2PeerSend {
    type Error = h2::Error;

    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // A reset from the peer, or the connection's end.
        self.stream.poll_reset(cx).map(drop)
    }

    fn send_data(
        &mut self,
        data: Bytes,
    ) -> impl std::future::Future<Output = Result<(), h2::Error>> + Send {
        self.write(data)
    }

    fn send_trailers(
        &mut self,
        trailers: HeaderMap,
    ) -> impl std::future::Future<Output = Result<(), h2::Error>> + Send {
        self.ended = true;
        let sent = self.stream.send_trailers(trailers);
        async move { sent }
    }

    fn finish(&mut self) -> impl std::future::Future<Output = Result<(), h2::Error>> + Send {
        let sent = if self.ended {
            Ok(())
        } else {
            self.ended = true;
            self.stream.send_data(Bytes::new(), true)
        };
        async move { sent }
    }

    fn reset(&mut self, code: H3Code) {
        self.ended = true;
        self.stream.send_reset(peer_reason(code));
    }
}

/// A peer sidecar's HTTP/2 body with its failures as [`StreamFailure`]s, as on HTTP/3.
pub struct H2PeerRecvBody(H2RecvBody);

impl H2PeerRecvBody {
    pub fn new(recv: h2::RecvStream) -> H2PeerRecvBody {
        H2PeerRecvBody(H2RecvBody::new(recv))
    }
}

impl Body for H2PeerRecvBody {
    type Data = Bytes;
    type Error = StreamFailure;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailure>>> {
        Pin::new(&mut self.get_mut().0)
            .poll_frame(cx)
            .map(|frame| frame.map(|frame| frame.map_err(stream_failure)))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// The SPIFFE ID in the certificate chain a TLS peer presented.
pub fn tls_peer_identity(session: &rustls::CommonState) -> Option<String> {
    crate::wire::tls::spiffe_id(session.peer_certificates()?)
}

/// An HTTP/2 connection's end, as its driver task saw it.
#[derive(Debug, Default)]
pub struct Closed(AtomicBool);

impl Closed {
    pub fn is_closed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Marks a connection closed when its driver task ends, however it ends.
struct CloseMarker(Arc<Closed>);

impl Drop for CloseMarker {
    fn drop(&mut self) {
        (self.0).0.store(true, Ordering::Release);
    }
}

/// A new HTTP/2 connection to a peer sidecar.
pub struct H2Connection {
    pub sender: h2::client::SendRequest<Bytes>,
    pub peer_identity: Option<String>,
    pub closed: Arc<Closed>,
    /// PINGs, for telling a silent peer from a slow one (the pool's watchdog).
    pub ping: Option<h2::PingPong>,
    /// Ends the connection at once: every call on it fails, so it can go elsewhere.
    pub driver: tokio::task::AbortHandle,
}

/// Connects to `address` over TCP, TLS 1.3 (mutual, `h2`) and HTTP/2, within `timeout`, and
/// spawns the task that drives the connection.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    address: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<H2Connection, String> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("invalid server name {server_name:?}: {e}"))?;
    let connecting = async {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("TCP connect: {e}"))?;
        // Calls are small messages: sent at once, not held back for a fuller segment.
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            return Err("the peer does not offer HTTP/2 (ALPN h2) on TCP".to_string());
        }
        let peer_identity = tls_peer_identity(session);
        let (sender, connection) = client_builder()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| format!("HTTP/2 setup: {e}"))?;
        Ok((sender, connection, peer_identity))
    };
    let (sender, mut connection, peer_identity) = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| format!("TCP connect timed out after {} ms", timeout.as_millis()))??;
    let ping = connection.ping_pong();
    let closed = Arc::new(Closed::default());
    let driver_closed = closed.clone();
    let open = crate::metrics::OpenPeerConnection::new("outbound", "h2");
    // Set on every way out, an abort included (the flag lives in the task's state).
    let marker = CloseMarker(driver_closed);
    let driver = tokio::spawn(async move {
        let _open = open;
        let _marker = marker;
        if let Err(error) = connection.await {
            tracing::debug!(%address, %error, "HTTP/2 connection to peer ended");
        }
    });
    Ok(H2Connection {
        sender,
        peer_identity,
        closed,
        ping,
        driver: driver.abort_handle(),
    })
}

/// The outbound side's HTTP/2 client settings towards peer sidecars.
fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .enable_push(false)
        .max_send_buffer_size(SEND_BUFFER)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
    builder
}

/// The inbound side's HTTP/2 server settings for peer sidecars: `max_streams` concurrent calls
/// per connection and `max_header_bytes` of request headers, as on QUIC.
pub fn server_builder(max_streams: u32, max_header_bytes: u32) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(max_streams)
        .max_header_list_size(max_header_bytes)
        .max_send_buffer_size(SEND_BUFFER)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_codes_survive_the_http2_hop_between_sidecars() {
        for code in [
            H3Code::H3_NO_ERROR,
            H3Code::H3_REQUEST_CANCELLED,
            H3Code::H3_REQUEST_REJECTED,
            H3Code::H3_EXCESSIVE_LOAD,
            H3Code::H3_INTERNAL_ERROR,
            grpc::H3_APP_CONNECTION_LOST,
        ] {
            assert_eq!(h3_code_from_peer(peer_reason(code)), code, "{code}");
        }
    }

    #[test]
    fn standard_http2_reasons_keep_their_meaning() {
        assert_eq!(
            h3_code_from_peer(h2::Reason::REFUSED_STREAM),
            H3Code::H3_REQUEST_REJECTED
        );
        assert_eq!(
            h3_code_from_peer(h2::Reason::CANCEL),
            H3Code::H3_REQUEST_CANCELLED
        );
        assert_eq!(
            h3_code_from_peer(h2::Reason::PROTOCOL_ERROR),
            H3Code::H3_INTERNAL_ERROR
        );
    }
}
