//! What happens to the app's calls beyond the caps on calls in flight ([`crate::limits`]).
//!
//! Backpressure first, through the outbound listener's advertised
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (well-behaved gRPC clients queue in their own process),
//! then shedding: a call over the process-wide or per-upstream cap is answered at once with
//! `UNAVAILABLE` naming the limit. `UNAVAILABLE` because the call was not processed anywhere and
//! is safe to retry (gRPC's own load balancers answer drops the same way, and retry policies
//! list it), where `RESOURCE_EXHAUSTED` usually means a quota the caller should not retry into.
//! A permit is held from admission until the call's response ends, so open streams count.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::limits::{Full, Permit};
use crate::outbound::attempt::ResponseBody;
use crate::wire::body::StreamFailure;

/// Which cap turned a call away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    Process { limit: usize },
    Upstream { limit: usize },
}

impl From<Full> for Shed {
    fn from(full: Full) -> Shed {
        match full {
            Full::Wide { limit } => Shed::Process { limit },
            Full::Narrow { limit } => Shed::Upstream { limit },
        }
    }
}

impl Shed {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Shed::Process { .. } => "process",
            Shed::Upstream { .. } => "upstream",
        }
    }

    pub fn message(self, upstream: &str) -> String {
        match self {
            Shed::Process { limit } => format!(
                "locality-sidecar is overloaded: {limit} calls in flight over all upstreams \
                 (limits.maxCallsInFlight); call to {upstream} not sent, retry later"
            ),
            Shed::Upstream { limit } => format!(
                "locality-sidecar is overloaded: {limit} calls in flight to upstream {upstream} \
                 (limits.maxCallsPerUpstream); call not sent, retry later"
            ),
        }
    }
}

/// A response body that holds its call's permit until the body ends or is dropped.
pub struct AdmittedBody {
    inner: ResponseBody,
    permit: Option<Permit>,
}

impl AdmittedBody {
    pub fn new(inner: ResponseBody, permit: Option<Permit>) -> AdmittedBody {
        AdmittedBody { inner, permit }
    }
}

impl Body for AdmittedBody {
    type Data = Bytes;
    type Error = StreamFailure;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamFailure>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // The call is over: its place goes back now, not when hyper drops the stream.
            this.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shed_messages_name_the_limit() {
        let message = Shed::from(Full::Narrow { limit: 7 }).message("echo");
        assert!(message.contains("7 calls"), "{message}");
        assert!(message.contains("limits.maxCallsPerUpstream"), "{message}");
        let message = Shed::from(Full::Wide { limit: 9 }).message("echo");
        assert!(message.contains("limits.maxCallsInFlight"), "{message}");
    }
}
