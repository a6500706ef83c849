//! Moving gRPC message bytes between HTTP/2 (hyper) and HTTP/3 (h3) streams, in both
//! directions, without buffering beyond what flow control allows.
//!
//! - [`H3RecvBody`] turns the receiving half of an HTTP/3 stream into an `http_body::Body`, polled
//!   directly by hyper: bytes are read from QUIC only as fast as the HTTP/2 peer takes them, so a
//!   stalled reader stalls the QUIC stream (backpressure) instead of growing a buffer.
//! - [`pump_body`] copies an HTTP/2 body into the sending half of an HTTP/3 stream, awaiting
//!   QUIC flow control on every write.
//!
//! Cancellation drops the receive half (quinn then sends STOP_SENDING itself) and resets the
//! send half; the answering side learns of it through [`H3Send::poll_cancelled`], which
//! [`pump_body`] watches while it waits for the source.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h3::error::{Code as H3Code, StreamError};
use http::HeaderMap;
use http_body::{Body, Frame};

use crate::wire::grpc;
use crate::wire::h3_quic::{QuicRecv, QuicSend};

type ClientRecv = h3::client::RequestStream<QuicRecv, Bytes>;
type ServerRecv = h3::server::RequestStream<QuicRecv, Bytes>;
type ClientSend = h3::client::RequestStream<QuicSend<Bytes>, Bytes>;
type ServerSend = h3::server::RequestStream<QuicSend<Bytes>, Bytes>;

/// The receiving half of an HTTP/3 request stream, client or server side.
pub trait H3Recv: Send + Unpin + 'static {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamError>>;
    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, StreamError>>;
}

macro_rules! impl_h3_recv {
    ($stream:ty) => {
        impl H3Recv for $stream {
            fn poll_data(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<Bytes>, StreamError>> {
                let chunk = ready!(self.poll_recv_data(cx))?;
                // Our QUIC layer hands out `Bytes` chunks, for which this is a reference-count bump.
                Poll::Ready(Ok(chunk.map(|mut buf| buf.copy_to_bytes(buf.remaining()))))
            }
            fn poll_trailers(
                &mut self,
                cx: &mut Context<'_>,
            ) -> Poll<Result<Option<HeaderMap>, StreamError>> {
                self.poll_recv_trailers(cx)
            }
        }
    };
}
impl_h3_recv!(ClientRecv);
impl_h3_recv!(ServerRecv);

/// The sending half of a stream between sidecars: HTTP/3 (client or server side), or HTTP/2 on
/// the TCP fallback ([`crate::wire::h2_peer::H2PeerSend`]). Reset codes are HTTP/3's in both.
pub trait H3Send: Send + 'static {
    type Error: std::fmt::Display;
    fn send_data(&mut self, data: Bytes) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn send_trailers(
        &mut self,
        trailers: HeaderMap,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn finish(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn reset(&mut self, code: H3Code);
    /// Ready once the receiving peer no longer wants the stream (it stopped or reset it, or
    /// its connection is gone), so whatever feeds the stream can be cancelled at once. Stays
    /// pending for a sender that cannot tell.
    fn poll_cancelled(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
}

macro_rules! impl_h3_send {
    ($stream:ty) => {
        impl H3Send for $stream {
            type Error = StreamError;
            fn send_data(
                &mut self,
                data: Bytes,
            ) -> impl Future<Output = Result<(), StreamError>> + Send {
                <$stream>::send_data(self, data)
            }
            fn send_trailers(
                &mut self,
                trailers: HeaderMap,
            ) -> impl Future<Output = Result<(), StreamError>> + Send {
                <$stream>::send_trailers(self, trailers)
            }
            fn finish(&mut self) -> impl Future<Output = Result<(), StreamError>> + Send {
                <$stream>::finish(self)
            }
            fn reset(&mut self, code: H3Code) {
                self.stop_stream(code)
            }
        }
    };
}
impl_h3_send!(ClientSend);
impl_h3_send!(ServerSend);

/// Why an HTTP/3 stream stopped delivering: the peer reset it, or the connection failed.
#[derive(Debug, thiserror::Error)]
#[error("{description}")]
pub struct StreamFailure {
    /// The peer's reset code, when the peer reset the stream.
    pub peer_reset: Option<H3Code>,
    pub description: String,
    /// hyper looks for an `h2::Error` among an error's sources to choose the RST_STREAM reason
    /// it sends on, so a peer's cancel reaches the HTTP/2 side as a cancel.
    #[source]
    reason: h2::Error,
}

impl StreamFailure {
    pub fn from_stream_error(error: StreamError) -> StreamFailure {
        let (peer_reset, description) = match &error {
            StreamError::RemoteTerminate { code, .. } => {
                (Some(*code), format!("peer reset the stream ({code})"))
            }
            other => (None, other.to_string()),
        };
        let reason = match peer_reset {
            Some(code) => grpc::h2_reason_for_h3_code(code),
            None => h2::Reason::INTERNAL_ERROR,
        };
        StreamFailure {
            peer_reset,
            description,
            reason: reason.into(),
        }
    }

    /// The peer reset the stream with `code`.
    pub fn peer_reset(code: H3Code, description: String) -> StreamFailure {
        StreamFailure {
            peer_reset: Some(code),
            description,
            reason: grpc::h2_reason_for_h3_code(code).into(),
        }
    }

    /// The connection under the stream failed.
    pub fn transport(description: String) -> StreamFailure {
        StreamFailure {
            peer_reset: None,
            description,
            reason: h2::Reason::INTERNAL_ERROR.into(),
        }
    }

    /// The gRPC status a client should see for this failure.
    pub fn grpc_code(&self) -> grpc::Code {
        match self.peer_reset {
            Some(code) => grpc::code_for_h3_reset(code),
            None => grpc::Code::Unavailable,
        }
    }

    pub fn is_cancel(&self) -> bool {
        self.peer_reset == Some(H3Code::H3_REQUEST_CANCELLED)
    }
}

enum RecvState {
    Data,
    Trailers,
    Done,
}

/// At most this many already-received bytes are merged into one DATA frame for the HTTP/2 side.
const GATHER_LIMIT: usize = 64 * 1024;

type DataPoll = Result<Option<Bytes>, StreamError>;

/// An HTTP/3 stream's incoming body (DATA frames, then trailers) as an `http_body::Body`.
///
/// QUIC hands data over in packet-sized chunks (~1.2 KiB). Passed on one by one, each would
/// become its own HTTP/2 DATA frame and socket write, about 50 for a 64 KiB message; so the
/// chunks that have already arrived are merged into one frame. Nothing waits for more data.
pub struct H3RecvBody<R> {
    recv: R,
    state: RecvState,
    /// What the stream said after the last merged chunk (its end, or an error), due next.
    stashed: Option<DataPoll>,
}

impl<R: H3Recv> H3RecvBody<R> {
    pub fn new(recv: R) -> Self {
        H3RecvBody {
            recv,
            state: RecvState::Data,
            stashed: None,
        }
    }

    /// `first`, followed by whatever further data is already buffered, up to [`GATHER_LIMIT`].
    fn gather(&mut self, first: Bytes, cx: &mut Context<'_>) -> Bytes {
        let mut merged: Option<BytesMut> = None;
        loop {
            let size = merged.as_ref().map_or(first.len(), |m| m.len());
            if size >= GATHER_LIMIT {
                break;
            }
            match self.recv.poll_data(cx) {
                Poll::Pending => break,
                Poll::Ready(Ok(Some(more))) => {
                    let merged = merged.get_or_insert_with(|| {
                        // Room for a few more chunks; a longer run grows it by doubling.
                        let room = (4 * (size + more.len())).min(GATHER_LIMIT);
                        let mut buffer = BytesMut::with_capacity(room);
                        buffer.extend_from_slice(&first);
                        buffer
                    });
                    merged.extend_from_slice(&more);
                }
                Poll::Ready(end) => {
                    self.stashed = Some(end);
                    break;
                }
            }
        }
        match merged {
            Some(merged) => merged.freeze(),
            None => first,
        }
    }
}

impl<R: H3Recv> Body for H3RecvBody<R> {
    type Data = Bytes;
    type Error = StreamFailure;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailure>>> {
        let this = self.get_mut();
        loop {
            match this.state {
                RecvState::Data => {
                    let next = match this.stashed.take() {
                        Some(stashed) => stashed,
                        None => ready!(this.recv.poll_data(cx)),
                    };
                    match next {
                        Ok(Some(data)) if data.is_empty() => continue,
                        Ok(Some(data)) => {
                            let data = this.gather(data, cx);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(None) => this.state = RecvState::Trailers,
                        Err(error) => {
                            this.state = RecvState::Done;
                            return Poll::Ready(Some(Err(StreamFailure::from_stream_error(error))));
                        }
                    }
                }
                RecvState::Trailers => {
                    let trailers = ready!(this.recv.poll_trailers(cx));
                    this.state = RecvState::Done;
                    return Poll::Ready(match trailers {
                        Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
                        Ok(None) => None,
                        Err(error) => Some(Err(StreamFailure::from_stream_error(error))),
                    });
                }
                RecvState::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, RecvState::Done)
    }
}

/// How copying a body into an HTTP/3 stream ended.
#[derive(Debug)]
pub enum PumpEnd {
    /// Everything, trailers included, was sent and the stream finished.
    Complete,
    /// The source body failed (its sender reset or went away); the HTTP/3 stream was reset with
    /// the matching code so the peer sees the abort rather than a clean end.
    SourceFailed(H3Code),
    /// The HTTP/3 peer stopped or reset the stream, or the connection was lost.
    PeerGone(String),
}

/// `work`'s output, or `None` if `cancelled` is ready first. `work` is polled first, so work
/// that is done wins over a cancel that came at the same time.
pub async fn unless_cancelled_by<T>(
    work: impl Future<Output = T>,
    mut cancelled: impl FnMut(&mut Context<'_>) -> Poll<()>,
) -> Option<T> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        cancelled(cx).map(|()| None)
    })
    .await
}

/// Copies `body` (DATA frames, then trailers) into `send` and finishes the stream. Never leaves
/// the stream half-written: on a source failure it resets the stream, because quinn finishes a
/// dropped send stream cleanly, which would pass a truncated body off as complete.
///
/// `unexplained` is the reset code when the failure carries no HTTP/2 reason (the source's
/// connection died): a cancel for a client that went away, an internal error for an app that did.
pub async fn pump_body<B, S>(mut body: B, send: &mut S, unexplained: H3Code) -> PumpEnd
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
    S: H3Send,
{
    loop {
        // The next frame, or the peer's cancel while waiting for it: a source that sends
        // rarely (a quiet server stream) must not keep the call alive after the peer left.
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
        let next = unless_cancelled_by(frame, |cx| send.poll_cancelled(cx)).await;
        let Some(next) = next else {
            return PumpEnd::PeerGone("the peer cancelled the stream".to_string());
        };
        match next {
            None => {
                return match send.finish().await {
                    Ok(()) => PumpEnd::Complete,
                    Err(e) => PumpEnd::PeerGone(e.to_string()),
                }
            }
            Some(Ok(frame)) => {
                let result = match frame.into_data() {
                    Ok(data) if data.is_empty() => Ok(()),
                    Ok(data) => send.send_data(data).await,
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => match send.send_trailers(trailers).await {
                            Ok(()) => {
                                return match send.finish().await {
                                    Ok(()) => PumpEnd::Complete,
                                    Err(e) => PumpEnd::PeerGone(e.to_string()),
                                }
                            }
                            Err(e) => Err(e),
                        },
                        // Frame kinds other than data and trailers do not exist in gRPC.
                        Err(_) => Ok(()),
                    },
                };
                if let Err(error) = result {
                    return PumpEnd::PeerGone(error.to_string());
                }
            }
            Some(Err(error)) => {
                let code = h3_code_for_body_error(&error, unexplained);
                send.reset(code);
                return PumpEnd::SourceFailed(code);
            }
        }
    }
}

/// The HTTP/3 reset code for a failed HTTP/2 body: the HTTP/2 reason when the error carries one.
pub fn h3_code_for_body_error(
    error: &(dyn std::error::Error + 'static),
    unexplained: H3Code,
) -> H3Code {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = cause {
        if let Some(h2_error) = err.downcast_ref::<h2::Error>() {
            if let Some(reason) = h2_error.reason() {
                return grpc::h3_code_for_h2_reason(reason);
            }
        }
        if let Some(failure) = err.downcast_ref::<StreamFailure>() {
            if let Some(code) = failure.peer_reset {
                return code;
            }
        }
        cause = err.source();
    }
    unexplained
}

/// The app's response body as the raw h2 client delivers it, as an `http_body::Body`. Each chunk
/// taken is handed back to HTTP/2 flow control at once; backpressure comes from the consumer,
/// which takes the next chunk only after the previous one was written to QUIC.
pub struct H2RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl H2RecvBody {
    pub fn new(recv: h2::RecvStream) -> H2RecvBody {
        let done = recv.is_end_stream();
        H2RecvBody {
            recv,
            data_done: done,
            done,
        }
    }
}

impl Body for H2RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Only fails when the stream is already gone, which the next poll reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(error)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Runs a request pump: polled once right here, in the caller's task, then spawned only if it
/// still has work. A request whose body has already arrived (most unary calls) is then written
/// before the caller yields, so it leaves with its headers in one packet and needs no task.
///
/// The pump comes boxed by the caller: built straight into its box, it is copied once, where a
/// pump passed by value would be copied into this future and then again into a box.
pub async fn start_pump(mut pump: Pin<Box<dyn Future<Output = ()> + Send>>) {
    let finished = std::future::poll_fn(|cx| Poll::Ready(pump.as_mut().poll(cx).is_ready())).await;
    if !finished {
        tokio::spawn(pump);
    }
}

/// What the request pump does next.
enum Next<E> {
    /// The source has nothing more for now: send what is held.
    Idle,
    Frame(Option<Result<Frame<Bytes>, E>>),
}

/// The reset code for a peer's request body that failed: the peer's own code when it reset the
/// stream, otherwise (its connection died) a cancel, as the caller is gone.
fn source_failure_code(error: &(dyn std::error::Error + 'static)) -> H3Code {
    match error.downcast_ref::<StreamFailure>() {
        Some(failure) => failure.peer_reset.unwrap_or(H3Code::H3_REQUEST_CANCELLED),
        None => h3_code_for_body_error(error, H3Code::H3_REQUEST_CANCELLED),
    }
}

/// Copies a peer's request body into the app's HTTP/2 stream, within HTTP/2 flow control. The
/// last DATA frame carries END_STREAM (one frame less per unary call), so one chunk is held back
/// until the next poll shows whether more follows. A failed source (the caller cancelled) resets
/// the app's stream with the matching reason, so the app never takes a truncated request whole.
///
/// `body` is a peer's request body on either transport: [`H3RecvBody`] over QUIC, or
/// [`crate::wire::h2_peer::H2PeerRecvBody`] on the HTTP/2 fallback.
pub async fn pump_into_h2<B>(mut body: B, send: &mut h2::SendStream<Bytes>) -> PumpEnd
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    let mut held: Option<Bytes> = None;
    loop {
        let next = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Pending if held.is_some() => Poll::Ready(Next::Idle),
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => Poll::Ready(Next::Frame(frame)),
        })
        .await;
        let sent = match next {
            Next::Idle => match held.take() {
                Some(data) => send_within_window(send, data, false).await,
                None => Ok(()),
            },
            Next::Frame(None) => {
                let last = held.take().unwrap_or_default();
                return match send_within_window(send, last, true).await {
                    Ok(()) => PumpEnd::Complete,
                    Err(reason) => PumpEnd::PeerGone(reason),
                };
            }
            Next::Frame(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if data.is_empty() => Ok(()),
                Ok(data) => match held.replace(data) {
                    Some(previous) => send_within_window(send, previous, false).await,
                    None => Ok(()),
                },
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    if let Some(previous) = held.take() {
                        if let Err(reason) = send_within_window(send, previous, false).await {
                            return PumpEnd::PeerGone(reason);
                        }
                    }
                    return match send.send_trailers(trailers) {
                        Ok(()) => PumpEnd::Complete,
                        Err(error) => PumpEnd::PeerGone(error.to_string()),
                    };
                }
            },
            Next::Frame(Some(Err(failure))) => {
                let code = source_failure_code(&failure);
                send.send_reset(grpc::h2_reason_for_h3_code(code));
                return PumpEnd::SourceFailed(code);
            }
        };
        if let Err(reason) = sent {
            return PumpEnd::PeerGone(reason);
        }
    }
}

/// Sends `data` as the app's flow-control window allows, waiting for window updates.
///
/// The last chunk goes to h2 at once: it is already in memory and nothing follows it, so
/// there is nothing to hold back, and h2 queues what the window does not yet allow (it never
/// sends past the window). Waiting for capacity first cost a scheduler turn, and with it a task
/// of its own for nearly every unary call's request pump.
async fn send_within_window(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end_of_stream: bool,
) -> Result<(), String> {
    if end_of_stream {
        return send.send_data(data, true).map_err(|e| e.to_string());
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let available = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(available)) => available,
            Some(Err(error)) => return Err(error.to_string()),
            None => return Err("the app closed the stream".to_string()),
        };
        if available == 0 {
            continue;
        }
        let chunk = data.split_to(available.min(data.len()));
        send.send_data(chunk, false).map_err(|e| e.to_string())?;
    }
    Ok(())
}
