//! The UDP socket under QUIC, registered with the runtime for reading only.
//!
//! Why not quinn's own tokio socket: tokio registers every socket for reading and writing, and
//! Linux signals a UDP socket writable again each time a datagram it sent is handed on (on
//! loopback, during the send itself). Each packet sent therefore came back as a wake-up with
//! nothing to do, and quinn's read loop ended every batch with one more `recvmmsg` that found
//! the queue empty. At one call at a time that was two of the ten system calls each sidecar
//! made per call, one of them on the call's path. Here sends go straight to the socket; only
//! a send that finds the buffer full makes the connection wait for room, through a
//! registration made for that wait alone. A read that returns fewer datagrams than it had room
//! for has emptied the queue, so it ends the batch without asking again.

use std::{
    fmt,
    future::Future,
    io::{self, IoSliceMut},
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Instant,
};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};
use tokio::io::{unix::AsyncFd, Interest};

use crate::wire::quic::MAX_UDP_PAYLOAD;

/// The most bytes one segmentation-offload write may carry: the largest UDP payload over IPv4.
const MAX_OFFLOAD_WRITE: usize = 65_507;

/// quinn's tokio runtime with [`ReadRegisteredUdp`] sockets; timers and tasks are tokio's.
#[derive(Debug)]
pub struct SidecarQuicRuntime;

impl Runtime for SidecarQuicRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        TokioRuntime.spawn(future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(ReadRegisteredUdp::new(socket)?))
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// A non-blocking UDP socket watched for readability only.
pub struct ReadRegisteredUdp {
    socket: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// Set when a send found the buffer full; the connections then wait for room before they
    /// send again (see [`RoomWaiter`]).
    send_blocked: AtomicBool,
}

impl fmt::Debug for ReadRegisteredUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadRegisteredUdp")
            .field("socket", self.socket.get_ref())
            .finish_non_exhaustive()
    }
}

impl ReadRegisteredUdp {
    /// `socket` must already be non-blocking (see [`super::quic::bind_udp`]).
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Self {
            socket: register(socket, Interest::READABLE)?,
            state,
            send_blocked: AtomicBool::new(false),
        })
    }
}

impl AsyncUdpSocket for ReadRegisteredUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(RoomWaiter {
            udp: self,
            registration: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.state.send(self.socket.get_ref().into(), transmit);
        if matches!(&sent, Err(error) if error.kind() == io::ErrorKind::WouldBlock) {
            self.send_blocked.store(true, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let room = bufs.len().min(meta.len()).min(BATCH_SIZE);
        loop {
            let mut guard = ready!(self.socket.poll_read_ready(cx))?;
            match self.state.recv(self.socket.get_ref().into(), bufs, meta) {
                Ok(received) => {
                    if queue_emptied(received, room) {
                        // Cleared only if no newer readiness arrived since the guard was taken,
                        // so a datagram that came after the read still wakes us.
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(received));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        // The kernel refuses a longer write with EMSGSIZE, which quinn-udp drops silently (it
        // expects that only of MTU probes): every multi-packet burst would be lost.
        self.state
            .max_gso_segments()
            .min(MAX_OFFLOAD_WRITE / usize::from(MAX_UDP_PAYLOAD))
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// Registers `socket` with the runtime for `interest` only.
///
/// tokio 1.54 deprecates its safe constructors because a generic descriptor holder could hand
/// out a descriptor it does not own, which could be closed and reused while registered. A
/// standard-library socket owns its descriptor until it is dropped, and the `AsyncFd` owns the
/// socket, so that cannot happen here; the replacement constructor is `unsafe`, which this
/// crate forbids.
#[allow(deprecated)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}

/// Whether a read that returned `received` datagrams with room for `room` left the queue
/// empty: a non-blocking `recvmmsg` stops early only when nothing more is waiting.
fn queue_emptied(received: usize, room: usize) -> bool {
    received < room
}

/// A connection's wait for room in the send buffer: ready at once unless a send found the
/// buffer full; then ready once the socket is writable again.
struct RoomWaiter {
    udp: Arc<ReadRegisteredUdp>,
    /// A second descriptor of the same socket, registered for writability only while waiting.
    /// Registering it reports the socket's current state, so room freed between the failed
    /// send and the registration is not missed.
    registration: Option<AsyncFd<std::net::UdpSocket>>,
}

impl fmt::Debug for RoomWaiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomWaiter")
            .field("waiting", &self.registration.is_some())
            .finish_non_exhaustive()
    }
}

impl UdpPoller for RoomWaiter {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let registration = match &mut this.registration {
            Some(registration) => registration,
            None => {
                if !this.udp.send_blocked.load(Ordering::Relaxed) {
                    return Poll::Ready(Ok(()));
                }
                let duplicate = this.udp.socket.get_ref().try_clone()?;
                this.registration
                    .insert(register(duplicate, Interest::WRITABLE)?)
            }
        };
        // The guard is dropped with the registration it came from.
        let _writable = ready!(registration.poll_write_ready(cx))?;
        this.registration = None;
        this.udp.send_blocked.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_filled_every_buffer_may_have_left_datagrams_behind() {
        assert!(queue_emptied(0, BATCH_SIZE));
        assert!(queue_emptied(BATCH_SIZE - 1, BATCH_SIZE));
        assert!(!queue_emptied(BATCH_SIZE, BATCH_SIZE));
    }

    fn loopback_udp() -> Arc<ReadRegisteredUdp> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        Arc::new(ReadRegisteredUdp::new(socket).unwrap())
    }

    #[tokio::test]
    async fn a_connection_waits_for_room_only_after_a_send_found_the_buffer_full() {
        let udp = loopback_udp();
        let mut waiter = udp.clone().create_io_poller();
        let ready_now = std::future::poll_fn(|cx| Poll::Ready(waiter.as_mut().poll_writable(cx)));
        assert!(matches!(ready_now.await, Poll::Ready(Ok(()))));
        assert!(waiter_is_idle(&waiter));

        // What `try_send` records when the kernel says the buffer is full. The buffer has room,
        // so the wait registers, sees the socket writable and ends.
        udp.send_blocked.store(true, Ordering::Relaxed);
        std::future::poll_fn(|cx| waiter.as_mut().poll_writable(cx))
            .await
            .unwrap();
        assert!(!udp.send_blocked.load(Ordering::Relaxed));
        assert!(waiter_is_idle(&waiter));
    }

    fn waiter_is_idle(waiter: &Pin<Box<dyn UdpPoller>>) -> bool {
        format!("{waiter:?}").contains("waiting: false")
    }

    /// Reads until `want` numbers arrived; a lost wake-up fails it at the timeout.
    async fn read_numbers(receiver: &ReadRegisteredUdp, want: usize) -> Vec<u32> {
        let mut storage = vec![vec![0u8; 8192]; BATCH_SIZE];
        let mut numbers = Vec::new();
        let reading = async {
            while numbers.len() < want {
                let mut bufs: Vec<IoSliceMut> =
                    storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let mut meta = [RecvMeta::default(); BATCH_SIZE];
                let received =
                    std::future::poll_fn(|cx| receiver.poll_recv(cx, &mut bufs, &mut meta))
                        .await
                        .unwrap();
                for (buf, meta) in bufs.iter().zip(&meta).take(received) {
                    // Received offload may have merged several datagrams into one buffer.
                    for datagram in buf[..meta.len].chunks(meta.stride) {
                        numbers.push(u32::from_be_bytes(datagram.try_into().unwrap()));
                    }
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), reading)
            .await
            .expect("every datagram sent is read");
        numbers
    }

    #[tokio::test]
    async fn a_datagram_arriving_after_a_read_emptied_the_queue_still_wakes_the_reader() {
        let receiver = loopback_udp();
        let to = receiver.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // More than one batch, so one read fills every buffer and the next empties the queue.
        let first = (BATCH_SIZE * 2 + 3) as u32;
        for number in 0..first {
            sender.send_to(&number.to_be_bytes(), to).unwrap();
        }
        let mut numbers = read_numbers(&receiver, first as usize).await;
        numbers.sort_unstable();
        assert_eq!(numbers, (0..first).collect::<Vec<_>>());

        sender.send_to(&first.to_be_bytes(), to).unwrap();
        assert_eq!(read_numbers(&receiver, 1).await, vec![first]);
    }
}
