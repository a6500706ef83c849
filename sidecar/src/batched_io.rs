//! Fewer, larger writes on the local HTTP/2 hops.
//!
//! h2 flushes its frame buffer every time its connection task runs, and that task is woken by
//! every call that queues a frame. With many calls in flight the socket then sees roughly one
//! `writev` per call, and each loopback write also runs the receiver's TCP stack and wakes it.
//! [`BatchedWrites`] makes the first write attempt of each turn yield once: the connection task
//! goes to the back of the run queue, the other calls that are ready queue their frames, and one
//! write carries them all. A lone call waits only for one pass over an empty run queue.
//! Large payloads still go out as their own writes, without being copied.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream whose writes are deferred by one scheduler turn so they can be merged.
pub struct BatchedWrites<T> {
    io: T,
    /// The writer already yielded once for the bytes it is now offering.
    yielded: bool,
}

impl<T> BatchedWrites<T> {
    pub fn new(io: T) -> BatchedWrites<T> {
        BatchedWrites { io, yielded: false }
    }

    /// Yields once before each write: wakes itself so it runs again after the tasks that are
    /// already queued.
    fn defer(&mut self, cx: &mut Context<'_>) -> bool {
        if self.yielded {
            self.yielded = false;
            false
        } else {
            self.yielded = true;
            cx.waker().wake_by_ref();
            true
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.defer(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.defer(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    /// Reporting no vectored writes is what lets small messages share a write: h2 then copies
    /// DATA payloads of up to 1 KiB into its 16 KiB frame buffer. With vectored writes it keeps
    /// every payload over 256 bytes (a 256 B gRPC message is 261) as a separate buffer and stops
    /// filling the frame buffer until that one is written, so each call costs a `writev`.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
