//! The QUIC layer under h3: quinn's connection and streams behind h3's `quic` traits.
//!
//! Ours rather than h3-quinn's, for what a proxy needs from it:
//! - **Cancellation reaches the app at once.** A caller that gives up on a call whose request
//!   it has sent whole can only say so with STOP_SENDING on the stream we answer on. quinn
//!   reports that (`SendStream::stopped`), but h3 keeps the stream inside its `RequestStream`.
//!   So the serving side registers a watch for every request stream it accepts in
//!   [`StopWatches`], keyed by stream id, and the call's handler takes it: the app's call is
//!   cancelled when the caller cancels, not at the call's deadline.
//! - **Stopping a receive half is always safe.** Reads are polled on the stream itself, not
//!   through a boxed read future that owns it, so `stop_sending` works while a read is pending.
//! - **One write per frame.** h3 hands over a frame as its header and its payload; written as
//!   two slices, quinn copies each into its own buffer and locks the connection and wakes its
//!   driver twice. Gathered into one buffer here, quinn takes it as it is: one copy, one lock.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::stream::{self, Stream, StreamExt};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use quinn::VarInt;

/// A never-ending stream of quinn's accepted or opened streams: one allocation per connection
/// rather than one per stream.
type StreamsOf<T> = Pin<Box<dyn Stream<Item = Result<T, quinn::ConnectionError>> + Send + Sync>>;

/// Why a peer stopped wanting what we send on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// STOP_SENDING with this code.
    Stopped { code: u64 },
    /// The connection is gone: nothing sent on it can arrive any more.
    ConnectionLost,
}

/// Resolves when the peer stops wanting a stream's data; never when the stream ends normally.
pub type StopWatch = Pin<Box<dyn Future<Output = Stop> + Send>>;

/// The STOP_SENDING watches of one connection's accepted request streams, waiting for their
/// handlers to take them. An entry leaves when taken or when its stream's sending half is
/// dropped, so a stream h3 refuses before a handler sees it leaves nothing behind.
#[derive(Default)]
pub struct StopWatches {
    waiting: Mutex<HashMap<u64, StopWatch>>,
}

impl StopWatches {
    pub fn new() -> Arc<StopWatches> {
        Arc::new(StopWatches::default())
    }

    /// The watch for the request stream `id`, once.
    pub fn take(&self, id: StreamId) -> Option<StopWatch> {
        self.waiting().remove(&id.into_inner())
    }

    fn register(&self, id: u64, watch: StopWatch) {
        self.waiting().insert(id, watch);
    }

    fn forget(&self, id: u64) {
        self.waiting().remove(&id);
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<u64, StopWatch>> {
        // A panic elsewhere while the map was held leaves it consistent: each step is one call.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn watch_stop(send: &quinn::SendStream) -> StopWatch {
    let stopped = send.stopped();
    Box::pin(async move {
        match stopped.await {
            Ok(Some(code)) => Stop::Stopped {
                code: code.into_inner(),
            },
            // Finished and acknowledged: nothing left for the peer to refuse.
            Ok(None) => std::future::pending().await,
            Err(_) => Stop::ConnectionLost,
        }
    })
}

fn h3_stream_id(id: quinn::StreamId) -> Result<StreamId, ConnectionErrorIncoming> {
    StreamId::try_from(u64::from(id)).map_err(|error| {
        ConnectionErrorIncoming::InternalError(format!("QUIC stream id out of range: {error:?}"))
    })
}

fn connection_error(error: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose {
                error_code: close.error_code.into_inner(),
            }
        }
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn lost(error: quinn::ConnectionError) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: connection_error(error),
    }
}

fn read_error(error: quinn::ReadError) -> StreamErrorIncoming {
    match error {
        quinn::ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::ReadError::ConnectionLost(error) => lost(error),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn write_error(error: quinn::WriteError) -> StreamErrorIncoming {
    match error {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(error) => lost(error),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn varint(code: u64) -> VarInt {
    VarInt::from_u64(code).unwrap_or(VarInt::MAX)
}

/// A QUIC connection as h3 sees it.
pub struct QuicConnection {
    opener: QuicOpener,
    incoming_bidi: StreamsOf<(quinn::SendStream, quinn::RecvStream)>,
    incoming_uni: StreamsOf<quinn::RecvStream>,
    /// Set on the serving side: accepted request streams' STOP_SENDING watches go here.
    stops: Option<Arc<StopWatches>>,
}

impl QuicConnection {
    /// The side that opens requests.
    pub fn new(connection: quinn::Connection) -> QuicConnection {
        QuicConnection {
            incoming_bidi: Box::pin(stream::unfold(connection.clone(), |connection| async {
                Some((connection.accept_bi().await, connection))
            })),
            incoming_uni: Box::pin(stream::unfold(connection.clone(), |connection| async {
                Some((connection.accept_uni().await, connection))
            })),
            opener: QuicOpener::new(connection),
            stops: None,
        }
    }

    /// The side that answers requests: each accepted request stream's STOP_SENDING is watched
    /// in `stops` until its handler takes the watch.
    pub fn serving(connection: quinn::Connection, stops: Arc<StopWatches>) -> QuicConnection {
        QuicConnection {
            stops: Some(stops),
            ..QuicConnection::new(connection)
        }
    }
}

/// A stream source that never ends: `None` would be a bug of ours, reported as h3 expects.
fn never_ended() -> ConnectionErrorIncoming {
    ConnectionErrorIncoming::InternalError("QUIC stream source ended".to_string())
}

impl<B: Buf> quic::Connection<B> for QuicConnection {
    type RecvStream = QuicRecv;
    type OpenStreams = QuicOpener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        let accepted = ready!(self.incoming_uni.poll_next_unpin(cx)).ok_or_else(never_ended)?;
        let recv = accepted.map_err(connection_error)?;
        Poll::Ready(QuicRecv::new(recv))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let accepted = ready!(self.incoming_bidi.poll_next_unpin(cx)).ok_or_else(never_ended)?;
        let (send, recv) = accepted.map_err(connection_error)?;
        let send = match &self.stops {
            Some(stops) => QuicSend::watched(send, stops.clone()),
            None => QuicSend::new(send),
        };
        Poll::Ready(Ok(QuicBidi {
            send: send?,
            recv: QuicRecv::new(recv)?,
        }))
    }

    fn opener(&self) -> Self::OpenStreams {
        self.opener.clone()
    }
}

impl<B: Buf> quic::OpenStreams<B> for QuicConnection {
    type BidiStream = QuicBidi<B>;
    type SendStream = QuicSend<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        self.opener.poll_open_bidi(cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.opener.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.opener, code, reason)
    }
}

/// Opens streams on a connection; h3 holds one per request sender.
pub struct QuicOpener {
    connection: quinn::Connection,
    opening_bidi: Option<StreamsOf<(quinn::SendStream, quinn::RecvStream)>>,
    opening_uni: Option<StreamsOf<quinn::SendStream>>,
}

impl QuicOpener {
    fn new(connection: quinn::Connection) -> QuicOpener {
        QuicOpener {
            connection,
            opening_bidi: None,
            opening_uni: None,
        }
    }

    fn poll_open_bidi<B: Buf>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<QuicBidi<B>, StreamErrorIncoming>> {
        let connection = &self.connection;
        // Made on first use: most openers (h3's control streams aside) open requests only.
        let opening = self.opening_bidi.get_or_insert_with(|| {
            Box::pin(stream::unfold(connection.clone(), |connection| async {
                Some((connection.open_bi().await, connection))
            }))
        });
        let opened = ready!(opening.poll_next_unpin(cx)).ok_or_else(lost_source)?;
        let (send, recv) = opened.map_err(lost)?;
        Poll::Ready(Ok(QuicBidi {
            send: QuicSend::new(send).map_err(stream_failure)?,
            recv: QuicRecv::new(recv).map_err(stream_failure)?,
        }))
    }

    fn poll_open_send<B: Buf>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<QuicSend<B>, StreamErrorIncoming>> {
        let connection = &self.connection;
        let opening = self.opening_uni.get_or_insert_with(|| {
            Box::pin(stream::unfold(connection.clone(), |connection| async {
                Some((connection.open_uni().await, connection))
            }))
        });
        let opened = ready!(opening.poll_next_unpin(cx)).ok_or_else(lost_source)?;
        let send = opened.map_err(lost)?;
        Poll::Ready(QuicSend::new(send).map_err(stream_failure))
    }
}

fn lost_source() -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: never_ended(),
    }
}

fn stream_failure(error: ConnectionErrorIncoming) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: error,
    }
}

impl Clone for QuicOpener {
    fn clone(&self) -> QuicOpener {
        QuicOpener::new(self.connection.clone())
    }
}

impl<B: Buf> quic::OpenStreams<B> for QuicOpener {
    type BidiStream = QuicBidi<B>;
    type SendStream = QuicSend<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        QuicOpener::poll_open_bidi(self, cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        QuicOpener::poll_open_send(self, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.connection.close(varint(u64::from(code)), reason);
    }
}

/// Both halves of a request stream.
pub struct QuicBidi<B: Buf> {
    send: QuicSend<B>,
    recv: QuicRecv,
}

impl<B: Buf> quic::BidiStream<B> for QuicBidi<B> {
    type SendStream = QuicSend<B>;
    type RecvStream = QuicRecv;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

impl<B: Buf> quic::RecvStream for QuicBidi<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.recv.id
    }
}

impl<B: Buf> quic::SendStream<B> for QuicBidi<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.send.id
    }
}

/// The receiving half of a stream.
pub struct QuicRecv {
    stream: quinn::RecvStream,
    id: StreamId,
}

impl QuicRecv {
    fn new(stream: quinn::RecvStream) -> Result<QuicRecv, ConnectionErrorIncoming> {
        Ok(QuicRecv {
            id: h3_stream_id(stream.id())?,
            stream,
        })
    }
}

impl quic::RecvStream for QuicRecv {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        // `read_chunk`'s future only borrows the stream and keeps no state between polls, so
        // a fresh one per poll is the same as polling one future: no box owning the stream.
        let read = std::pin::pin!(self.stream.read_chunk(usize::MAX, true));
        let chunk = ready!(read.poll(cx)).map_err(read_error)?;
        Poll::Ready(Ok(chunk.map(|chunk| chunk.bytes)))
    }

    fn stop_sending(&mut self, error_code: u64) {
        // Already finished or stopped: nothing to tell the peer.
        let _ = self.stream.stop(varint(error_code));
    }

    fn recv_id(&self) -> StreamId {
        self.id
    }
}

/// The sending half of a stream: one h3 frame at a time, written as QUIC flow control allows.
pub struct QuicSend<B: Buf> {
    stream: quinn::SendStream,
    id: StreamId,
    /// What is left of the frame h3 handed over, which `poll_ready` is still writing.
    writing: Option<Bytes>,
    /// h3's frame payload type, copied into `writing` as it arrives.
    payload: std::marker::PhantomData<fn(B)>,
    /// Where this stream's STOP_SENDING watch waits, removed when the stream is dropped.
    watched_in: Option<Arc<StopWatches>>,
}

impl<B: Buf> QuicSend<B> {
    fn new(stream: quinn::SendStream) -> Result<QuicSend<B>, ConnectionErrorIncoming> {
        Ok(QuicSend {
            id: h3_stream_id(stream.id())?,
            stream,
            writing: None,
            payload: std::marker::PhantomData,
            watched_in: None,
        })
    }

    fn watched(
        stream: quinn::SendStream,
        stops: Arc<StopWatches>,
    ) -> Result<QuicSend<B>, ConnectionErrorIncoming> {
        let mut send = QuicSend::new(stream)?;
        stops.register(send.id.into_inner(), watch_stop(&send.stream));
        send.watched_in = Some(stops);
        Ok(send)
    }
}

impl<B: Buf> Drop for QuicSend<B> {
    fn drop(&mut self) {
        if let Some(stops) = &self.watched_in {
            stops.forget(self.id.into_inner());
        }
    }
}

impl<B: Buf> quic::SendStream<B> for QuicSend<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(frame) = &mut self.writing {
            while !frame.is_empty() {
                // quinn leaves in the chunk what flow control did not take, and writes nothing
                // when it returns pending, so polling a fresh write each time loses nothing.
                let mut chunks = [std::mem::take(frame)];
                let polled = std::pin::pin!(self.stream.write_chunks(&mut chunks)).poll(cx);
                *frame = std::mem::take(&mut chunks[0]);
                ready!(polled).map_err(write_error)?;
            }
            self.writing = None;
        }
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            // h3 always waits for `poll_ready` first; a second frame here would be its bug.
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "a frame handed over before the previous one was written".to_string(),
                ),
            });
        }
        let mut frame: WriteBuf<B> = data.into();
        self.writing = Some(frame.copy_to_bytes(frame.remaining()));
        Ok(())
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|error| StreamErrorIncoming::Unknown(Box::new(error))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        // Already finished or reset: the peer has its answer.
        let _ = self.stream.reset(varint(reset_code));
    }

    fn send_id(&self) -> StreamId {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> StopWatch {
        Box::pin(std::future::pending())
    }

    fn id(raw: u64) -> StreamId {
        StreamId::try_from(raw).expect("a small stream id")
    }

    #[test]
    fn a_watch_is_taken_once_by_its_own_stream() {
        let stops = StopWatches::new();
        stops.register(0, never());
        stops.register(4, never());
        assert!(
            stops.take(id(8)).is_none(),
            "no watch for a stream never accepted"
        );
        assert!(stops.take(id(4)).is_some());
        assert!(stops.take(id(4)).is_none(), "taken once");
        assert_eq!(stops.waiting().len(), 1);
    }

    #[test]
    fn a_stream_dropped_before_its_handler_leaves_nothing_behind() {
        let stops = StopWatches::new();
        stops.register(0, never());
        // What `QuicSend`'s drop does for a stream h3 refused before any handler saw it.
        stops.forget(0);
        assert!(stops.waiting().is_empty());
        assert!(stops.take(id(0)).is_none());
    }
}
