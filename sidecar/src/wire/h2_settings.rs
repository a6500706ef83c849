//! HTTP/2 settings for the local hops (app → outbound listener, inbound → app), both on loopback.
//!
//! hyper's defaults suit the internet; on loopback the limits that matter are how many calls one
//! app connection may multiplex (a busy client must not queue behind 200 streams) and how many
//! bytes one call may have in flight (enough for full speed, small enough to bound memory when
//! the reader stalls).

const MAX_CONCURRENT_STREAMS: u32 = 8192;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Larger DATA frames mean fewer frame headers and wake-ups per MiB of message.
const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Bytes one call may queue for the app beyond what its window takes (hyper's client default).
const SEND_BUFFER: usize = 1024 * 1024;

pub fn server(builder: &mut hyper::server::conn::http2::Builder<BoxingExecutor>) {
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
}

/// The inbound side's h2 client towards the app (used without hyper, see `inbound`). Server push
/// is refused, as hyper's client does.
pub fn client() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .enable_push(false)
        .max_send_buffer_size(SEND_BUFFER)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
    builder
}

/// Runs hyper's per-call tasks (one per stream of the outbound listener) boxed.
///
/// A tokio task stores its future inline and copies all of it on spawn and again when it
/// completes. hyper's server stream task holds our whole call (11 KiB), and those copies were a
/// leading cost in profiles. Boxed, the task holds a pointer and the future is written once.
#[derive(Clone, Copy, Debug, Default)]
pub struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}
