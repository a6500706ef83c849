//! The outbound role: the app's calls to one upstream, in the order they flow.
//!
//! [`serve`] accepts the app's h2c connections on loopback; each call goes to [`call`], which
//! runs gRFC A6 over attempts: [`decide`] says what happens after each attempt (a plain
//! function, no I/O), [`attempt`] makes one HTTP/3 exchange with one picked endpoint, and
//! [`replay`] keeps the request body so a retry can send it again. [`upstream`] holds the state
//! the calls to one upstream share.

pub mod attempt;
pub mod call;
pub mod decide;
pub mod replay;
pub mod upstream;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use upstream::Upstream;

/// Serves one outbound listener until `shutdown` fires, then lets open calls finish for up to
/// `drain`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    upstream: Arc<Upstream>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder =
        hyper::server::conn::http2::Builder::new(crate::wire::h2_settings::BoxingExecutor);
    crate::wire::h2_settings::server(&mut builder);
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
            async move {
                Ok::<_, Infallible>(crate::outbound::call::handle_call(upstream, request).await)
            }
        });
        let connection = graceful.watch(builder.serve_connection(
            hyper_util::rt::TokioIo::new(crate::wire::batched_io::BatchedWrites::new(stream)),
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
