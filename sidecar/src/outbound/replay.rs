//! The request side of a call that may be retried: the app's request body is read once and
//! kept (up to a per-call and a per-process limit) so a later attempt can send it again.
//!
//! Only one attempt sends at a time; it holds the source's lock while it sends, first replaying
//! what earlier attempts read, then reading on from the app. Passing either limit drops the
//! kept bytes and marks the call committed: it can no longer be retried (gRFC A6). So does the
//! call committing to an attempt (response headers): from then on nothing is kept, and what
//! was kept is freed at once, even while that attempt's request stream goes on for hours.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

/// What the call keeps for replay, apart from the body's lock so that committing can free it
/// while an attempt is still sending.
struct KeptItems {
    items: Vec<Kept>,
    bytes: usize,
    /// A limit was passed or the call committed: nothing is kept any more and the call cannot
    /// be retried.
    closed: bool,
    per_call_limit: usize,
    budget: Arc<ReplayBudget>,
}

impl KeptItems {
    fn keep(&mut self, item: Kept, bytes: usize) {
        if self.closed {
            return;
        }
        if self.bytes + bytes > self.per_call_limit || !self.budget.reserve(bytes) {
            self.close();
            return;
        }
        self.bytes += bytes;
        self.items.push(item);
    }

    /// Frees everything kept and keeps nothing more.
    fn close(&mut self) {
        self.closed = true;
        self.budget.release(self.bytes);
        self.bytes = 0;
        self.items = Vec::new();
    }
}

impl Drop for KeptItems {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

struct SourceState {
    body: Incoming,
    /// The app's body has ended (and everything it sent is kept unless closed).
    ended: bool,
    /// The app's body failed (client cancelled); no attempt may send a truncated copy.
    failed: Option<H3Code>,
}

/// The app's request body, shared by the attempts of one call.
pub struct RequestSource {
    state: tokio::sync::Mutex<SourceState>,
    kept: Mutex<KeptItems>,
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
                ended: false,
                failed: None,
            }),
            kept: Mutex::new(KeptItems {
                items: Vec::new(),
                bytes: 0,
                closed: false,
                per_call_limit,
                budget,
            }),
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, KeptItems> {
        self.kept
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The call committed to an attempt: nothing will be replayed, so free what was kept.
    pub fn commit(&self) {
        self.kept().close();
    }

    /// Whether the request could still be sent whole to another attempt, as far as known
    /// without waiting for the attempt sending now (hedging asks while attempts run).
    pub fn not_closed(&self) -> bool {
        !self.kept().closed
    }

    /// Bytes kept for replay right now.
    pub fn kept_bytes(&self) -> usize {
        self.kept().bytes
    }

    /// Whether another attempt could send the whole request again. Waits for the current
    /// sender to let go, which it does as soon as its attempt is stopped.
    pub async fn replayable(&self) -> bool {
        let state = self.state.lock().await;
        state.failed.is_none() && !self.kept().closed
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
        let replay = {
            let kept = self.kept();
            if kept.closed {
                // Closing follows reading (a limit passed) or committing: what was read is gone,
                // and an attempt now would send a request with a gap. The decision step never
                // starts one; refuse anyway.
                send.reset(H3Code::H3_REQUEST_CANCELLED);
                return PumpEnd::SourceFailed(H3Code::H3_REQUEST_CANCELLED);
            }
            kept.items.clone()
        };
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
                        self.kept().keep(Kept::Data(data.clone()), len);
                        if let Err(error) = send.send_data(data).await {
                            return PumpEnd::PeerGone(error.to_string());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.kept().keep(Kept::Trailers(trailers.clone()), 0);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(per_call_limit: usize, budget: &Arc<ReplayBudget>) -> KeptItems {
        KeptItems {
            items: Vec::new(),
            bytes: 0,
            closed: false,
            per_call_limit,
            budget: budget.clone(),
        }
    }

    fn data(len: usize) -> Kept {
        Kept::Data(Bytes::from(vec![0u8; len]))
    }

    #[test]
    fn passing_the_per_call_limit_frees_everything_and_closes() {
        let budget = ReplayBudget::new(1000);
        let mut call = kept(100, &budget);
        call.keep(data(60), 60);
        assert_eq!(budget.used(), 60);
        call.keep(data(60), 60);
        assert!(call.closed);
        assert_eq!(budget.used(), 0, "the budget is returned at once");
        call.keep(data(1), 1);
        assert_eq!((call.bytes, call.items.len()), (0, 0), "nothing kept after");
    }

    #[test]
    fn the_process_budget_is_shared_and_returned() {
        let budget = ReplayBudget::new(100);
        let mut first = kept(1000, &budget);
        let mut second = kept(1000, &budget);
        first.keep(data(80), 80);
        second.keep(data(30), 30);
        assert!(second.closed, "80 + 30 passes the 100-byte process budget");
        assert!(!first.closed);
        drop(first);
        assert_eq!(budget.used(), 0, "a finished call returns what it kept");
        let mut third = kept(1000, &budget);
        third.keep(data(100), 100);
        assert!(!third.closed);
    }

    #[test]
    fn committing_frees_the_buffer_of_a_call_that_goes_on() {
        let budget = ReplayBudget::new(1000);
        let mut stream = kept(1000, &budget);
        stream.keep(data(500), 500);
        stream.close();
        assert_eq!(budget.used(), 0);
        // The stream keeps sending; none of it is kept any more.
        stream.keep(data(500), 500);
        assert_eq!(budget.used(), 0);
        let mut other = kept(1000, &budget);
        other.keep(data(1000), 1000);
        assert!(
            !other.closed,
            "the whole budget is available to other calls"
        );
    }
}
