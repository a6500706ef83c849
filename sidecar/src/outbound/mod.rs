//! The outbound role: the app's calls to one upstream, in the order they flow.
//!
//! [`serve`] accepts the app's h2c connections on loopback; each call goes to [`call`], which
//! runs gRFC A6 over attempts: [`decide`] says what happens after each attempt (a plain
//! function, no I/O), [`attempt`] makes one HTTP/3 exchange with one picked endpoint, and
//! [`replay`] keeps the request body so a retry can send it again. [`upstream`] holds the state
//! the calls to one upstream share.
//!
//! The listener speaks h2c with prior knowledge only, and says so: a connection's first bytes
//! are peeked, and one that is not the HTTP/2 preface gets an HTTP/1.1 answer naming what the
//! port expects ([`sniff`]) instead of a silently closed socket. Request metadata over
//! [`MAX_REQUEST_HEADERS`] gets a gRPC status the app can read (`RESOURCE_EXHAUSTED` naming the
//! limit): h2 itself would answer a bare HTTP 431 before our code sees the call, so its own
//! limit is set far higher and ours is enforced here.

pub mod admission;
pub mod attempt;
pub mod call;
pub mod decide;
pub mod replay;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use admission::AdmittedBody;
use bytes::Bytes;
use http_body_util::Full;
use upstream::Upstream;

use crate::metrics::{metrics, CallLabels};
use crate::wire::grpc::{self, Code};

/// Request metadata (HTTP/2 header list size: names, values and 32 bytes per field, pseudo-headers
/// included) a call may carry; above it the call is answered `RESOURCE_EXHAUSTED`. hyper's
/// previous default, so nothing that passed before is refused now; grpc-java and gRPC C++
/// servers accept no more than this either.
pub const MAX_REQUEST_HEADERS: usize = 16 * 1024;

/// h2's own limit, advertised in SETTINGS: above it h2 answers 431 and resets the stream before
/// any of our code runs, so it is set well above [`MAX_REQUEST_HEADERS`]. It bounds what one
/// header block may cost to decode (once, per connection, before the call is turned away).
const H2_HEADER_LIST_LIMIT: u32 = 1024 * 1024;

/// What every h2c prior-knowledge client sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say the app speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// The HTTP/2 preface, or as much of it as has arrived.
    H2,
    /// A TLS handshake: the app dials with TLS, but the sidecar's local side is plaintext.
    Tls,
    /// Anything else: HTTP/1.x (or garbage, which HTTP/1 parsing answers with 400).
    Other,
}

/// Classifies a connection by its first bytes (at least one).
pub fn sniff(first: &[u8]) -> Sniffed {
    let seen = first.len().min(H2_PREFACE.len());
    if first[..seen] == H2_PREFACE[..seen] {
        Sniffed::H2
    } else if first.first() == Some(&0x16) {
        // A TLS record of type handshake (a ClientHello).
        Sniffed::Tls
    } else {
        Sniffed::Other
    }
}

/// The size h2 counts a request's header list as (RFC 9113 section 6.5.2), pseudo-headers
/// included: what [`MAX_REQUEST_HEADERS`] limits.
pub fn header_list_size<B>(request: &http::Request<B>) -> usize {
    let field = |name: usize, value: usize| name + value + 32;
    let uri = request.uri();
    let mut size = field(":method".len(), request.method().as_str().len())
        + field(
            ":path".len(),
            uri.path_and_query().map_or(1, |path| path.as_str().len()),
        );
    if let Some(scheme) = uri.scheme_str() {
        size += field(":scheme".len(), scheme.len());
    }
    if let Some(authority) = uri.authority() {
        size += field(":authority".len(), authority.as_str().len());
    }
    size + request
        .headers()
        .iter()
        .map(|(name, value)| field(name.as_str().len(), value.len()))
        .sum::<usize>()
}

/// The message of a call refused for its metadata size.
pub fn headers_too_large_message(size: usize) -> String {
    format!(
        "request metadata is {size} bytes, over the sidecar's limit of {MAX_REQUEST_HEADERS} bytes \
         (HTTP/2 header list size: names plus values plus 32 bytes per entry)"
    )
}

/// What one app connection that is not h2c gets told, and what is logged once per listener.
struct Misuse {
    /// The listener's address and upstream, for the message.
    address: SocketAddr,
    upstream: Arc<str>,
    http1_logged: AtomicBool,
    tls_logged: AtomicBool,
}

impl Misuse {
    fn body(&self) -> String {
        format!(
            "This port speaks gRPC over HTTP/2 (h2c, prior knowledge), not HTTP/1.1.\n\
             It is locality-sidecar's outbound listener {address} for upstream {upstream}: point \
             a gRPC client at it in plaintext (no TLS), e.g. grpc.insecure_channel(\"{address}\") \
             in Python or Channel::from_static(\"http://{address}\") in Rust; with curl, use \
             --http2-prior-knowledge.\n",
            address = self.address,
            upstream = self.upstream,
        )
    }
}

/// Answers every HTTP/1.x request on the connection with 505 and an explanation, then closes.
async fn refuse_http1(stream: tokio::net::TcpStream, misuse: Arc<Misuse>) {
    if !misuse.http1_logged.swap(true, Ordering::Relaxed) {
        tracing::warn!(upstream = %misuse.upstream, listen = %misuse.address, "an app sent HTTP/1.x to an outbound listener, which speaks h2c only; answered 505 (logged once)");
    }
    let service = hyper::service::service_fn(move |_request| {
        let misuse = misuse.clone();
        async move {
            let mut response = http::Response::new(Full::new(Bytes::from(misuse.body())));
            *response.status_mut() = http::StatusCode::HTTP_VERSION_NOT_SUPPORTED;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
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
        hyper::server::conn::http2::Builder::new(crate::wire::h2_settings::BoxingExecutor);
    crate::wire::h2_settings::server(&mut builder);
    builder.max_header_list_size(H2_HEADER_LIST_LIMIT);
    let misuse = Arc::new(Misuse {
        address: listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
        upstream: upstream.name.clone(),
        http1_logged: AtomicBool::new(false),
        tls_logged: AtomicBool::new(false),
    });
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
        // Backpressure before shedding: a well-behaved client queues calls beyond this in its
        // own process. Read per connection, so a live change applies to new connections.
        let streams = upstream.policy.borrow().limits.streams_per_connection;
        let upstream = upstream.clone();
        let service = hyper::service::service_fn(move |request: http::Request<_>| {
            let upstream = upstream.clone();
            async move {
                let size = header_list_size(&request);
                if size > MAX_REQUEST_HEADERS {
                    let refused = refuse_headers(&upstream, &request, size);
                    return Ok::<_, Infallible>(refused.map(|body| AdmittedBody::new(body, None)));
                }
                let permit = match upstream.admit() {
                    Ok(permit) => permit,
                    Err(shed) => return Ok(shed_call(&upstream, &request, shed)),
                };
                let response = crate::outbound::call::handle_call(upstream, request).await;
                Ok::<_, Infallible>(response.map(|body| AdmittedBody::new(body, Some(permit))))
            }
        });
        let mut builder = builder.clone();
        builder.max_concurrent_streams(streams);
        let watcher = graceful.watcher();
        let misuse = misuse.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            // Nothing is read here: the bytes stay for hyper. An app that connects and stays
            // silent holds only this task, which ends with the listener.
            let mut first = [0u8; H2_PREFACE.len()];
            let peeked = tokio::select! {
                peeked = stream.peek(&mut first) => peeked,
                _ = stop.changed() => return,
            };
            let seen = match peeked {
                Ok(0) | Err(_) => return,
                Ok(seen) => seen,
            };
            match sniff(&first[..seen]) {
                Sniffed::H2 => {}
                Sniffed::Other => return refuse_http1(stream, misuse).await,
                Sniffed::Tls => {
                    if !misuse.tls_logged.swap(true, Ordering::Relaxed) {
                        tracing::warn!(upstream = %misuse.upstream, listen = %misuse.address, "an app opened TLS to an outbound listener, which speaks plaintext h2c (TLS is between the sidecars); connection closed (logged once)");
                    }
                    return;
                }
            }
            let connection = watcher.watch(builder.serve_connection(
                hyper_util::rt::TokioIo::new(crate::wire::batched_io::BatchedWrites::new(stream)),
                service,
            ));
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "app connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}

/// A call over a cap on calls in flight: answered at once, trailers-only `UNAVAILABLE` naming
/// the cap (see [`admission`] for why that status), counted, and logged once per cap.
fn shed_call<B>(
    upstream: &Upstream,
    request: &http::Request<B>,
    shed: admission::Shed,
) -> http::Response<AdmittedBody> {
    let all = metrics();
    all.calls_shed
        .get_or_create(&crate::metrics::ShedLabels {
            upstream: upstream.name.clone(),
            limit: shed.label(),
        })
        .inc();
    all.calls
        .get_or_create(&CallLabels {
            upstream: upstream.name.clone(),
            method: all.method_label(request.uri().path()),
            status: Code::Unavailable.name(),
            tier: "none",
        })
        .inc();
    static LOGGED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
    let index = usize::from(matches!(shed, admission::Shed::Upstream { .. }));
    if !LOGGED[index].swap(true, Ordering::Relaxed) {
        tracing::warn!(upstream = %upstream.name, cap = shed.label(), "{} (logged once; counted in locality_sidecar_calls_shed_total)", shed.message(&upstream.name));
    }
    grpc::trailers_only_response(
        Code::Unavailable,
        &shed.message(&upstream.name),
        AdmittedBody::new(attempt::ResponseBody::Empty, None),
    )
}

/// A call whose metadata is over [`MAX_REQUEST_HEADERS`]: answered trailers-only with
/// `RESOURCE_EXHAUSTED` naming the limit, and counted like any call the sidecar answered itself.
fn refuse_headers<B>(
    upstream: &Upstream,
    request: &http::Request<B>,
    size: usize,
) -> http::Response<attempt::ResponseBody> {
    metrics()
        .calls
        .get_or_create(&CallLabels {
            upstream: upstream.name.clone(),
            method: metrics().method_label(request.uri().path()),
            status: Code::ResourceExhausted.name(),
            tier: "none",
        })
        .inc();
    grpc::trailers_only_response(
        Code::ResourceExhausted,
        &headers_too_large_message(size),
        attempt::ResponseBody::Empty,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_h2_preface_is_served_as_h2() {
        assert_eq!(sniff(H2_PREFACE), Sniffed::H2);
        assert_eq!(
            sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"),
            Sniffed::H2
        );
        // A preface still arriving is given the benefit of the doubt; h2 checks the rest.
        assert_eq!(sniff(b"PRI * HT"), Sniffed::H2);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"POST /echo.Echo/Unary HTTP/1.1\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n"), Sniffed::Other);
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x02, 0x00]), Sniffed::Tls);
        assert_eq!(sniff(b"\0\0\0"), Sniffed::Other);
    }

    #[test]
    fn header_list_size_counts_names_values_and_32_per_field_pseudo_headers_included() {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://localhost:7001/echo.Echo/Unary")
            .header("te", "trailers")
            .header("x-big", "v".repeat(100))
            .body(())
            .unwrap();
        let expected = (7 + 4 + 32) // :method POST
            + (5 + "/echo.Echo/Unary".len() + 32)
            + (7 + 4 + 32) // :scheme http
            + (10 + "localhost:7001".len() + 32)
            + (2 + 8 + 32)
            + (5 + 100 + 32);
        assert_eq!(header_list_size(&request), expected);
    }

    #[test]
    fn the_refusal_names_the_size_and_the_limit() {
        let message = headers_too_large_message(20_000);
        assert!(message.contains("20000 bytes"), "{message}");
        assert!(message.contains("16384 bytes"), "{message}");
    }
}
