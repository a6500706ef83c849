//! Bounds what a peer can make the inbound side buffer before a request's headers are complete.
//!
//! h3 reads a request's HEADERS frame whole into memory before it decodes it, and checks the
//! header section's size only after decoding: a peer announcing a 4 MiB HEADERS frame and
//! trickling it in holds 4 MiB per stream, and flow control does not help because h3 keeps
//! reading (which grants the peer more window). [`GuardedConnection`] wraps the QUIC connection
//! h3 serves and reads the frame headers at the start of every request stream itself: a stream
//! whose frames before the end of its HEADERS frame would exceed the limit is refused the moment
//! the length is announced (STOP_SENDING and RESET_STREAM with H3_EXCESSIVE_LOAD), and the
//! bytes all of a connection's streams hold before their headers are complete share one budget.
//! After its HEADERS frame a stream passes through untouched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

use crate::wire::h3_quic::{QuicBidi, QuicConnection, QuicOpener, QuicRecv, QuicSend, StopWatches};

use crate::metrics::{metrics, LimitLabels};

/// HTTP/3's H3_EXCESSIVE_LOAD (RFC 9114, section 8.1): the peer is asking for too much.
pub const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// The HEADERS frame type.
const HEADERS: u64 = 0x1;

/// What one connection's request streams may hold before their headers are complete.
#[derive(Debug)]
pub struct HeaderBudget {
    /// Per stream: frame headers and payloads up to the end of the HEADERS frame.
    pub per_stream: u64,
    /// All streams of the connection together.
    pub per_connection: u64,
    pending: AtomicU64,
}

impl HeaderBudget {
    pub fn new(per_stream: u64, per_connection: u64) -> Arc<HeaderBudget> {
        Arc::new(HeaderBudget {
            per_stream,
            per_connection,
            pending: AtomicU64::new(0),
        })
    }

    /// Takes `bytes` from the connection's budget; false (and nothing taken) when it is spent.
    fn take(&self, bytes: u64) -> bool {
        let mut current = self.pending.load(Ordering::Acquire);
        loop {
            let next = current.saturating_add(bytes);
            if next > self.per_connection {
                return false;
            }
            match self.pending.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    fn give_back(&self, bytes: u64) {
        self.pending.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Where a request stream is in its opening frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// More bytes are needed before the HEADERS frame ends.
    Pending,
    /// The HEADERS frame is complete: the rest of the stream is the body.
    Done,
    /// The frames before the end of the HEADERS frame exceed the per-stream limit.
    TooLarge { announced: u64 },
}

/// Follows the frames at the start of a request stream up to the end of its HEADERS frame,
/// counting bytes. A plain state machine over byte slices: no I/O.
#[derive(Debug, Clone, Default)]
pub struct HeaderScan {
    /// Bytes seen so far.
    seen: u64,
    /// The frame header being read (type and length varints), when one is incomplete: two
    /// varints of at most 8 bytes each, held inline so a scan allocates nothing.
    head: [u8; 16],
    /// How many bytes of `head` are filled.
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// Whether the current frame is the HEADERS frame.
    in_headers: bool,
}

/// Decodes one QUIC varint at the start of `bytes`: its value and length, or `None` if incomplete.
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let length = 1usize << (first >> 6);
    if bytes.len() < length {
        return None;
    }
    let mut value = u64::from(first & 0x3f);
    for byte in &bytes[1..length] {
        value = (value << 8) | u64::from(*byte);
    }
    Some((value, length))
}

impl HeaderScan {
    /// Takes in the next bytes of the stream; `limit` bounds everything up to the end of the
    /// HEADERS frame. Returns how many of `data`'s bytes belong before that end, and the scan's state.
    pub fn feed(&mut self, mut data: &[u8], limit: u64) -> (u64, Scan) {
        let mut counted = 0u64;
        loop {
            if self.left > 0 {
                let take = self.left.min(data.len() as u64);
                self.left -= take;
                self.seen += take;
                counted += take;
                data = &data[take as usize..];
                if self.left == 0 && self.in_headers {
                    return (counted, Scan::Done);
                }
                if data.is_empty() {
                    return (counted, Scan::Pending);
                }
                continue;
            }
            if data.is_empty() {
                return (counted, Scan::Pending);
            }
            // A frame header: type and length, at most 16 bytes; taken a byte at a time.
            // Both varints are complete by the 16th byte, so a slot is always free here.
            if let Some(slot) = self.head.get_mut(self.head_len) {
                *slot = data[0];
                self.head_len += 1;
            }
            data = &data[1..];
            self.seen += 1;
            counted += 1;
            let head = &self.head[..self.head_len];
            let Some((kind, used)) = varint(head) else {
                continue;
            };
            let Some((length, _)) = varint(&head[used..]) else {
                continue;
            };
            self.head_len = 0;
            let announced = self.seen.saturating_add(length);
            if announced > limit {
                return (counted, Scan::TooLarge { announced });
            }
            self.left = length;
            self.in_headers = kind == HEADERS;
            if self.in_headers && length == 0 {
                return (counted, Scan::Done);
            }
        }
    }
}

/// The receiving half of a request stream, counted until its headers are complete.
pub struct GuardedRecv {
    inner: QuicRecv,
    /// `None` once the headers are complete (or the stream was refused).
    scan: Option<HeaderScan>,
    budget: Arc<HeaderBudget>,
    /// Bytes taken from the connection's budget, given back when the headers complete.
    held: u64,
}

impl GuardedRecv {
    fn new(inner: QuicRecv, budget: Arc<HeaderBudget>, guarded: bool) -> Self {
        GuardedRecv {
            inner,
            scan: guarded.then(HeaderScan::default),
            budget,
            held: 0,
        }
    }

    fn release(&mut self) {
        self.budget.give_back(self.held);
        self.held = 0;
    }

    /// Checks a chunk against the limits; `Some(limit name)` when the stream must be refused.
    fn check(&mut self, chunk: &Bytes) -> Option<&'static str> {
        let scan = self.scan.as_mut()?;
        let (counted, state) = scan.feed(chunk, self.budget.per_stream);
        match state {
            Scan::TooLarge { .. } => Some("header_size"),
            _ if !self.budget.take(counted) => Some("pending_header_bytes"),
            Scan::Done => {
                self.held += counted;
                self.scan = None;
                self.release();
                None
            }
            Scan::Pending => {
                self.held += counted;
                None
            }
        }
    }
}

impl Drop for GuardedRecv {
    fn drop(&mut self) {
        self.release();
    }
}

impl quic::RecvStream for GuardedRecv {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        let chunk = ready!(self.inner.poll_data(cx))?;
        if let Some(chunk) = &chunk {
            if let Some(limit) = self.check(chunk) {
                metrics()
                    .inbound_limited
                    .get_or_create(&LimitLabels { limit })
                    .inc();
                tracing::debug!(limit, "peer request stream refused before its headers");
                self.scan = None;
                self.release();
                self.inner.stop_sending(H3_EXCESSIVE_LOAD);
                return Poll::Ready(Err(StreamErrorIncoming::StreamTerminated {
                    error_code: H3_EXCESSIVE_LOAD,
                }));
            }
        }
        Poll::Ready(Ok(chunk))
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

/// A request stream: the guarded receiving half and the plain sending half.
pub struct GuardedBidi<B: Buf> {
    send: QuicSend<B>,
    recv: GuardedRecv,
}

impl<B: Buf> quic::RecvStream for GuardedBidi<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        let polled = self.recv.poll_data(cx);
        if let Poll::Ready(Err(StreamErrorIncoming::StreamTerminated {
            error_code: H3_EXCESSIVE_LOAD,
        })) = &polled
        {
            // Refused: the response side goes too, so the peer hears it at once.
            quic::SendStream::reset(&mut self.send, H3_EXCESSIVE_LOAD);
        }
        polled
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for GuardedBidi<B> {
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
        self.send.send_id()
    }
}

impl<B: Buf> quic::BidiStream<B> for GuardedBidi<B> {
    type SendStream = QuicSend<B>;
    type RecvStream = GuardedRecv;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

/// The inbound request body reads through the guard (a pass-through once headers are complete).
impl crate::wire::body::H3Recv for h3::server::RequestStream<GuardedRecv, Bytes> {
    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, h3::error::StreamError>> {
        let chunk = ready!(self.poll_recv_data(cx))?;
        // `Bytes` chunks: a reference-count bump.
        Poll::Ready(Ok(chunk.map(|mut buf| buf.copy_to_bytes(buf.remaining()))))
    }

    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<http::HeaderMap>, h3::error::StreamError>> {
        self.poll_recv_trailers(cx)
    }
}

/// The QUIC connection h3 serves, with every peer-opened request stream guarded.
pub struct GuardedConnection {
    inner: QuicConnection,
    budget: Arc<HeaderBudget>,
}

impl GuardedConnection {
    /// `stops` receives each accepted request stream's STOP_SENDING watch.
    pub fn new(
        connection: quinn::Connection,
        budget: Arc<HeaderBudget>,
        stops: Arc<StopWatches>,
    ) -> Self {
        GuardedConnection {
            inner: QuicConnection::serving(connection, stops),
            budget,
        }
    }
}

fn guard<B: Buf>(stream: QuicBidi<B>, budget: &Arc<HeaderBudget>, guarded: bool) -> GuardedBidi<B> {
    let (send, recv) = quic::BidiStream::split(stream);
    GuardedBidi {
        send,
        recv: GuardedRecv::new(recv, budget.clone(), guarded),
    }
}

impl<B: Buf> quic::Connection<B> for GuardedConnection {
    type RecvStream = QuicRecv;
    type OpenStreams = GuardedOpener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<B>::poll_accept_recv(&mut self.inner, cx)
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let stream = ready!(quic::Connection::<B>::poll_accept_bidi(&mut self.inner, cx))?;
        Poll::Ready(Ok(guard(stream, &self.budget, true)))
    }

    fn opener(&self) -> Self::OpenStreams {
        GuardedOpener {
            inner: quic::Connection::<B>::opener(&self.inner),
            budget: self.budget.clone(),
        }
    }
}

impl<B: Buf> quic::OpenStreams<B> for GuardedConnection {
    type BidiStream = GuardedBidi<B>;
    type SendStream = QuicSend<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let stream = ready!(quic::OpenStreams::<B>::poll_open_bidi(&mut self.inner, cx))?;
        Poll::Ready(Ok(guard(stream, &self.budget, false)))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.inner, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.inner, code, reason)
    }
}

/// The opener h3 uses for its own streams (control, QPACK): ours are not guarded.
pub struct GuardedOpener {
    inner: QuicOpener,
    budget: Arc<HeaderBudget>,
}

impl<B: Buf> quic::OpenStreams<B> for GuardedOpener {
    type BidiStream = GuardedBidi<B>;
    type SendStream = QuicSend<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let stream = ready!(quic::OpenStreams::<B>::poll_open_bidi(&mut self.inner, cx))?;
        Poll::Ready(Ok(guard(stream, &self.budget, false)))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.inner, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.inner, code, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame header: type and length as QUIC varints (two-byte and eight-byte forms).
    fn head(kind: u8, length: u64) -> Vec<u8> {
        let mut out = vec![kind];
        if length < 16384 {
            out.extend_from_slice(&(0x4000u16 | length as u16).to_be_bytes());
        } else {
            out.extend_from_slice(&(0xc000_0000_0000_0000u64 | length).to_be_bytes());
        }
        out
    }

    #[test]
    fn a_huge_announced_headers_frame_is_refused_from_its_first_bytes() {
        let mut scan = HeaderScan::default();
        let bytes = head(1, 4 * 1024 * 1024);
        // Fed a byte at a time, as a trickling peer would: refused once the length is known.
        for (index, byte) in bytes.iter().enumerate() {
            let (_, state) = scan.feed(&[*byte], 64 * 1024);
            if index + 1 < bytes.len() {
                assert_eq!(state, Scan::Pending);
            } else {
                assert!(matches!(state, Scan::TooLarge { .. }), "{state:?}");
            }
        }
    }

    #[test]
    fn a_small_headers_frame_completes_and_the_body_is_not_counted() {
        let mut scan = HeaderScan::default();
        let mut bytes = head(1, 100);
        bytes.extend(std::iter::repeat_n(7u8, 100));
        // The body's DATA frame follows in the same chunk.
        bytes.extend(head(0, 5000));
        bytes.extend(std::iter::repeat_n(9u8, 50));
        let (first, state) = scan.feed(&bytes[..40], 1024);
        assert_eq!((first, state), (40, Scan::Pending));
        let (rest, state) = scan.feed(&bytes[40..], 1024);
        assert_eq!(state, Scan::Done);
        assert_eq!(first + rest, 103, "only the HEADERS frame is counted");
    }

    #[test]
    fn unknown_frames_before_headers_count_toward_the_limit() {
        let mut scan = HeaderScan::default();
        let mut bytes = head(0x21, 900);
        bytes.extend(std::iter::repeat_n(0u8, 900));
        bytes.extend(head(1, 200));
        let (_, state) = scan.feed(&bytes, 1024);
        assert!(matches!(state, Scan::TooLarge { .. }), "{state:?}");
    }

    #[test]
    fn the_connection_budget_is_shared_and_given_back() {
        let budget = HeaderBudget::new(100, 250);
        assert!(budget.take(100));
        assert!(budget.take(100));
        assert!(!budget.take(100));
        budget.give_back(100);
        assert!(budget.take(100));
    }
}
