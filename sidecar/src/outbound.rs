//! The outbound role's listener: the app's calls arrive on a loopback h2c listener and are
//! routed to the listener's upstream, where the retry loop ([`crate::retry`]) carries each one
//! over HTTP/3 to a picked endpoint.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

use crate::pick::RankingWatch;
use crate::policy::PolicyWatch;
use crate::replay::ReplayBudget;
use crate::retry::RetryThrottle;
use crate::transport::ConnectionPool;

/// Headers that describe one HTTP hop, not the call; HTTP/2 and HTTP/3 both forbid them.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// One configured upstream: its endpoints, the live policy, and how to reach them.
pub struct Upstream {
    pub name: Arc<str>,
    /// The name upstream certificates must carry; also the `:authority` of forwarded calls.
    pub server_name: Arc<str>,
    /// `server_name`, parsed once: every forwarded call carries it.
    pub authority: http::uri::Authority,
    pub ranking: RankingWatch,
    pub pool: Arc<ConnectionPool>,
    pub policy: PolicyWatch,
    pub throttle: RetryThrottle,
    pub replay_budget: Arc<ReplayBudget>,
}

/// Serves one outbound listener until `shutdown` fires, then lets open calls finish for up to
/// `drain`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    upstream: Arc<Upstream>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http2::Builder::new(crate::h2_settings::BoxingExecutor);
    crate::h2_settings::server(&mut builder);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(upstream = %upstream.name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        let service = hyper::service::service_fn(move |request| {
            let upstream = upstream.clone();
            async move { Ok::<_, Infallible>(crate::retry::handle_call(upstream, request).await) }
        });
        let connection = graceful.watch(builder.serve_connection(
            hyper_util::rt::TokioIo::new(crate::batched_io::BatchedWrites::new(stream)),
            service,
        ));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "app connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}
