//! HTTP/2 settings for the local hops (app → outbound listener, inbound → app), both on loopback.
//!
//! hyper's defaults suit the internet; on loopback the limits that matter are how many calls one
//! app connection may multiplex (a busy client must not queue behind 200 streams) and how many
//! bytes one call may have in flight (enough for full speed, small enough to bound memory when
//! the reader stalls).

use hyper_util::rt::TokioExecutor;

const MAX_CONCURRENT_STREAMS: u32 = 8192;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Larger DATA frames mean fewer frame headers and wake-ups per MiB of message.
const MAX_FRAME_SIZE: u32 = 256 * 1024;

pub fn server(builder: &mut hyper::server::conn::http2::Builder<TokioExecutor>) {
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
}

pub fn client(builder: &mut hyper::client::conn::http2::Builder<TokioExecutor>) {
    builder
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
}
