//! The request side of a call that may be retried: the app's request body is read once and
//! kept (up to a per-call and a per-process limit) so a later attempt can send it again.
//!
//! Only one attempt sends at a time; it holds the source's lock while it sends, first replaying
//! what earlier attempts read, then reading on from the app. Passing either limit drops the
//! kept bytes and marks the call committed: it can no longer be retried (gRFC A6).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use h3::error::Code as H3Code;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::wire::body::{H3Send, PumpEnd};

/// A6's defaults, as in gRPC's own implementations.
pub const PER_CALL_LIMIT: usize = 1024 * 1024;
pub const PER_PROCESS_LIMIT: usize = 16 * 1024 * 1024;

/// Bytes kept for replay across all calls of the process.
#[derive(Debug, Default)]
pub struct ReplayBudget {
    used: AtomicUsize,
    limit: usize,
}

impl ReplayBudget {
    pub fn new(limit: usize) -> Arc<ReplayBudget> {
        Arc::new(ReplayBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    fn reserve(&self, bytes: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used + bytes > self.limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

struct SourceState {
    body: Incoming,
    kept: Vec<Kept>,
    kept_bytes: usize,
    /// A limit was passed: nothing is kept any more and the call cannot be retried.
    overflowed: bool,
    /// The app's body has ended (and everything it sent is in `kept` unless overflowed).
    ended: bool,
    /// The app's body failed (client cancelled); no attempt may send a truncated copy.
    failed: Option<H3Code>,
    per_call_limit: usize,
    budget: Arc<ReplayBudget>,
}

impl SourceState {
    fn keep(&mut self, item: Kept, bytes: usize) {
        if self.overflowed {
            return;
        }
        if self.kept_bytes + bytes > self.per_call_limit || !self.budget.reserve(bytes) {
            self.overflowed = true;
            self.budget.release(self.kept_bytes);
            self.kept_bytes = 0;
            self.kept = Vec::new();
            return;
        }
        self.kept_bytes += bytes;
        self.kept.push(item);
    }
}

impl Drop for SourceState {
    fn drop(&mut self) {
        self.budget.release(self.kept_bytes);
    }
}

/// The app's request body, shared by the attempts of one call.
pub struct RequestSource {
    state: tokio::sync::Mutex<SourceState>,
}

impl RequestSource {
    pub fn new(
        body: Incoming,
        per_call_limit: usize,
        budget: Arc<ReplayBudget>,
    ) -> Arc<RequestSource> {
        Arc::new(RequestSource {
            state: tokio::sync::Mutex::new(SourceState {
                body,
                kept: Vec::new(),
                kept_bytes: 0,
                overflowed: false,
                ended: false,
                failed: None,
                per_call_limit,
                budget,
            }),
        })
    }

    /// Whether another attempt could send the whole request again. Waits for the current
    /// sender to let go, which it does as soon as its attempt is stopped.
    pub async fn replayable(&self) -> bool {
        let state = self.state.lock().await;
        !state.overflowed && state.failed.is_none()
    }

    /// Sends the request into one attempt's stream: what earlier attempts read, then the rest
    /// from the app. Resets the stream if the app's body fails, so the peer never takes a
    /// truncated request for a whole one.
    pub async fn send_into<S: H3Send>(&self, send: &mut S) -> PumpEnd {
        let mut state = self.state.lock().await;
        if let Some(code) = state.failed {
            send.reset(code);
            return PumpEnd::SourceFailed(code);
        }
        if state.overflowed && !state.kept.is_empty() {
            // Unreachable by construction (overflow clears what was kept); never send a gap.
            send.reset(H3Code::H3_REQUEST_CANCELLED);
            return PumpEnd::SourceFailed(H3Code::H3_REQUEST_CANCELLED);
        }
        let replay = state.kept.clone();
        for item in replay {
            let sent = match item {
                Kept::Data(data) => send.send_data(data).await,
                Kept::Trailers(trailers) => send.send_trailers(trailers).await,
            };
            if let Err(error) = sent {
                return PumpEnd::PeerGone(error.to_string());
            }
        }
        loop {
            if state.ended {
                return match send.finish().await {
                    Ok(()) => PumpEnd::Complete,
                    Err(error) => PumpEnd::PeerGone(error.to_string()),
                };
            }
            match state.body.frame().await {
                None => state.ended = true,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        let len = data.len();
                        state.keep(Kept::Data(data.clone()), len);
                        if let Err(error) = send.send_data(data).await {
                            return PumpEnd::PeerGone(error.to_string());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            state.keep(Kept::Trailers(trailers.clone()), 0);
                            state.ended = true;
                            if let Err(error) = send.send_trailers(trailers).await {
                                return PumpEnd::PeerGone(error.to_string());
                            }
                        }
                    }
                },
                Some(Err(error)) => {
                    let code = crate::wire::body::h3_code_for_body_error(
                        &error,
                        H3Code::H3_REQUEST_CANCELLED,
                    );
                    state.failed = Some(code);
                    send.reset(code);
                    return PumpEnd::SourceFailed(code);
                }
            }
        }
    }
}
