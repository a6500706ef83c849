//! QUIC between sidecars: socket and transport settings sized for a pod network, and the
//! outbound connection pool (one multiplexed HTTP/3 connection per upstream endpoint,
//! re-established when lost, closed once its endpoint has left discovery and its calls are done).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{AckFrequencyConfig, EndpointConfig, IdleTimeout, TransportConfig, VarInt};

use crate::endpoints::ranking::{EndpointLoad, RankingWatch};
use crate::metrics::{metrics, DirectionLabels};

/// The HTTP/3 request handle of one upstream connection; clones share the connection.
pub type H3Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// Concurrent calls one peer may have open on one connection. quinn's default of 100 would
/// queue the 101st call of a busy app; 1,000+ concurrent calls per endpoint must neither fail nor
/// serialize, and an idle stream slot costs nothing.
const MAX_CONCURRENT_CALLS: u32 = 8192;
/// Per-call receive window. Loopback and pod networks have sub-millisecond round trips, so 2 MiB
/// keeps a single stream at line rate while bounding what one stalled reader can make us buffer.
const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;
/// Whole-connection windows: many concurrent streams share these.
const CONNECTION_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;
const SEND_WINDOW: u64 = 64 * 1024 * 1024;
/// Fits inside every common pod network: 1500-byte links with a VXLAN or Geneve overlay leave
/// 1450, minus IPv6 and UDP headers 1402. quinn probes upward from here (to 1452) on its own;
/// starting at quinn's internet-safe 1200 would cost ~15% more packets until discovery finishes.
const INITIAL_MTU: u16 = 1400;
/// Keep-alives make a dead peer (node gone, pod killed without a close) visible within the idle
/// timeout instead of at the next call, and keep conntrack entries of NATed pod networks alive.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// The kernel's default UDP buffers (~200 KiB) drop packets when a burst of streams lands at
/// once; drops turn into retransmits and latency spikes. The kernel caps this at net.core.rmem_max.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// How long a new connection may take before the call fails over or fails. A QUIC handshake
/// inside a cluster takes milliseconds; a peer that has not answered in a second is gone (UDP
/// gets no connection-refused), and the call is better off on another pod.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Ack-eliciting packets the peer may take in before it must send an ACK (QUIC's ACK frequency
/// extension; both ends are quinn). RFC 9000's default acknowledges every second packet, so a
/// request or response that spans two packets draws an ACK-only packet and with it a wake-up of
/// both sidecars; a call's own packets carry the ACKs instead. Ten still acknowledges a bulk
/// transfer every ~14 KB, often enough for congestion control on pod networks.
const ACK_ELICITING_THRESHOLD: u32 = 10;
/// HTTP/3's "no error" code (RFC 9114, section 8.1): the application close a peer sees when we
/// close a connection on purpose, so its logs do not report a failure.
const H3_NO_ERROR: u32 = 0x100;
/// How often [`evict_departed`] looks again without a ranking change: to close a departed
/// endpoint's connection once its last call has ended, and to catch a slot a racing call
/// re-created after its endpoint left.
const EVICTION_RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind UDP {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {address} failed: {reason}")]
    Connect { address: SocketAddr, reason: String },
    #[error("connect to {address} timed out after {timeout:?}")]
    ConnectTimeout {
        address: SocketAddr,
        timeout: Duration,
    },
}

/// Transport settings shared by both directions.
pub fn transport_config() -> Arc<TransportConfig> {
    let mut config = TransportConfig::default();
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_CALLS))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .initial_mtu(INITIAL_MTU)
        .keep_alive_interval(Some(KEEP_ALIVE))
        // 20 s always fits a VarInt of milliseconds; the fallback is never taken.
        .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    let mut ack_frequency = AckFrequencyConfig::default();
    ack_frequency.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    config.ack_frequency_config(Some(ack_frequency));
    Arc::new(config)
}

/// Binds a UDP socket with large kernel buffers for a quinn endpoint.
pub fn bind_udp(address: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    let bind_error = |source| TransportError::Bind { address, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind_error)?;
    // Best effort: an unprivileged container may be capped lower, which is not worth failing for.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&address.into()).map_err(bind_error)?;
    Ok(socket.into())
}

/// A quinn endpoint on `address`, serving when `server` is given.
pub fn endpoint(
    address: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    let socket = bind_udp(address)?;
    quinn::Endpoint::new(
        EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { address, source })
}

struct LiveConnection {
    sender: H3Sender,
    connection: quinn::Connection,
}

/// One upstream endpoint's connection, and a lock so concurrent calls share one handshake.
#[derive(Default)]
struct Slot {
    live: Mutex<Option<LiveConnection>>,
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    /// Closes the connection, if any, with a clean application close; the slot is left empty.
    fn close(&self, reason: &'static [u8]) {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(live) = live {
            live.connection.close(VarInt::from_u32(H3_NO_ERROR), reason);
        }
    }

    fn current(&self) -> Option<H3Sender> {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*live {
            Some(conn) if conn.connection.close_reason().is_none() => Some(conn.sender.clone()),
            _ => None,
        }
    }
}

/// A peer address and the certificate name it must present.
type SlotKey = (SocketAddr, Arc<str>);

/// Outbound QUIC connections, one per (address, server name).
pub struct ConnectionPool {
    client_config: quinn::ClientConfig,
    /// Client endpoints per address family, created on first use.
    v4: OnceLock<quinn::Endpoint>,
    v6: OnceLock<quinn::Endpoint>,
    slots: Mutex<HashMap<SlotKey, Arc<Slot>>>,
}

impl ConnectionPool {
    pub fn new(crypto: QuicClientConfig) -> ConnectionPool {
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(transport_config());
        ConnectionPool {
            client_config,
            v4: OnceLock::new(),
            v6: OnceLock::new(),
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn client_endpoint(&self, target: SocketAddr) -> Result<&quinn::Endpoint, TransportError> {
        let (cell, any) = if target.is_ipv4() {
            (&self.v4, SocketAddr::from(([0, 0, 0, 0], 0)))
        } else {
            (&self.v6, SocketAddr::from(([0u16; 8], 0)))
        };
        if let Some(endpoint) = cell.get() {
            return Ok(endpoint);
        }
        let created = endpoint(any, None)?;
        // A concurrent caller may have won the race; its endpoint is used and ours is dropped.
        Ok(cell.get_or_init(|| created))
    }

    /// A request handle for `address`, connecting (once, shared by concurrent callers) when
    /// there is no live connection.
    pub async fn sender(
        &self,
        address: SocketAddr,
        server_name: &Arc<str>,
    ) -> Result<H3Sender, TransportError> {
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            slots
                .entry((address, server_name.clone()))
                .or_default()
                .clone()
        };
        if let Some(sender) = slot.current() {
            return Ok(sender);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(sender) = slot.current() {
            return Ok(sender);
        }
        let (sender, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, self.connect(address, server_name))
                .await
                .map_err(|_| TransportError::ConnectTimeout {
                    address,
                    timeout: CONNECT_TIMEOUT,
                })??;
        *slot
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(LiveConnection {
            sender: sender.clone(),
            connection,
        });
        Ok(sender)
    }

    async fn connect(
        &self,
        address: SocketAddr,
        server_name: &str,
    ) -> Result<(H3Sender, quinn::Connection), TransportError> {
        let failed = |reason: String| TransportError::Connect { address, reason };
        let connecting = self
            .client_endpoint(address)?
            .connect_with(self.client_config.clone(), address, server_name)
            .map_err(|e| failed(e.to_string()))?;
        let connection = connecting
            .await
            .map_err(|e| failed(describe_connection_error(&e)))?;
        let (mut driver, sender) = h3::client::builder()
            .send_grease(false)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(connection.clone()))
            .await
            .map_err(|e| failed(format!("HTTP/3 setup: {e}")))?;
        tracing::debug!(%address, server_name, "QUIC connection established");
        let direction = DirectionLabels {
            direction: "outbound",
        };
        metrics()
            .quic_connections_opened
            .get_or_create(&direction)
            .inc();
        tokio::spawn(async move {
            let closed = futures::future::poll_fn(|cx| driver.poll_close(cx)).await;
            if closed.is_h3_no_error() {
                tracing::debug!(%address, "QUIC connection closed");
            } else {
                metrics()
                    .quic_connections_lost
                    .get_or_create(&direction)
                    .inc();
                tracing::info!(%address, error = %closed, "QUIC connection lost");
            }
        });
        Ok((sender, connection))
    }

    /// Closes every connection (shutdown): peers see a clean close instead of an idle timeout.
    pub fn close_all(&self) {
        for endpoint in [self.v4.get(), self.v6.get()].into_iter().flatten() {
            endpoint.close(VarInt::from_u32(H3_NO_ERROR), b"shutdown");
        }
    }

    /// Closes and forgets every connection whose peer address is not in `keep`; returns how many
    /// slots went. The close is immediate (quinn waits for no stream), so calls still running on
    /// such a connection fail: callers put addresses with calls in flight into `keep`, as
    /// [`evict_departed`] does.
    pub fn retain_only(&self, keep: &HashSet<SocketAddr>) -> usize {
        let evicted: Vec<(SlotKey, Arc<Slot>)> = {
            let mut slots = self
                .slots
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            slots_to_evict(slots.keys(), keep)
                .into_iter()
                .filter_map(|key| slots.remove(&key).map(|slot| (key, slot)))
                .collect()
        };
        // Closed outside the map's lock: closing wakes quinn's driver, no reason to hold calls up.
        for ((address, server_name), slot) in &evicted {
            slot.close(b"endpoint left discovery");
            tracing::debug!(%address, %server_name, "closed the connection to an endpoint that left discovery");
        }
        evicted.len()
    }
}

/// The pool slots whose peer address is not in `keep`.
fn slots_to_evict<'a>(
    slots: impl IntoIterator<Item = &'a SlotKey>,
    keep: &HashSet<SocketAddr>,
) -> Vec<SlotKey> {
    slots
        .into_iter()
        .filter(|(address, _)| !keep.contains(address))
        .cloned()
        .collect()
}

/// The endpoints whose connections stay open: every one in the current rankings, and those that
/// left discovery while calls to them still run (closing under them would fail those calls, and
/// a pod that left is usually draining, not dead).
#[derive(Default)]
struct Retention {
    /// Load counters by address: the current endpoints' and the busy departed ones'. An address
    /// may appear in several upstreams, hence several counters.
    loads: HashMap<SocketAddr, Vec<Arc<EndpointLoad>>>,
}

impl Retention {
    /// Takes in the current endpoints and returns the addresses to keep connections to.
    fn update(
        &mut self,
        current: impl IntoIterator<Item = (SocketAddr, Arc<EndpointLoad>)>,
    ) -> HashSet<SocketAddr> {
        let mut next: HashMap<SocketAddr, Vec<Arc<EndpointLoad>>> = HashMap::new();
        for (address, load) in current {
            next.entry(address).or_default().push(load);
        }
        for (address, loads) in self.loads.drain() {
            if !next.contains_key(&address) && loads.iter().any(|load| load.in_flight() > 0) {
                next.insert(address, loads);
            }
        }
        self.loads = next;
        self.loads.keys().copied().collect()
    }
}

/// Closes pooled connections to endpoints that left discovery, so the pool does not keep
/// connections (and keep-alives) to every pod ever seen. `rankings` are every upstream that
/// shares `pool`: an address stays while any of them has it, or while calls to it are in
/// flight. Runs until `shutdown` turns true (or its sender is dropped).
pub async fn evict_departed(
    pool: Arc<ConnectionPool>,
    rankings: Vec<RankingWatch>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use futures::StreamExt;
    let mut changes = futures::stream::select_all(rankings.iter().cloned().map(|ranking| {
        Box::pin(futures::stream::unfold(ranking, |mut ranking| async move {
            ranking.changed().await.ok().map(|()| ((), ranking))
        }))
    }));
    let mut changes_open = !rankings.is_empty();
    let mut recheck = tokio::time::interval(EVICTION_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retention = Retention::default();
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let current: Vec<(SocketAddr, Arc<EndpointLoad>)> = rankings
            .iter()
            .flat_map(|ranking| {
                ranking
                    .borrow()
                    .endpoints()
                    .map(|ranked| (ranked.endpoint.address, ranked.load.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let keep = retention.update(current);
        let closed = pool.retain_only(&keep);
        if closed > 0 {
            tracing::info!(
                closed,
                kept = keep.len(),
                "closed connections to endpoints that left discovery"
            );
        }
        tokio::select! {
            changed = changes.next(), if changes_open => {
                // Every ranking has ended: their last endpoints stand, rechecks go on.
                changes_open = changed.is_some();
            }
            _ = recheck.tick() => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Turns quinn's connection errors into words an operator can act on.
pub fn describe_connection_error(error: &quinn::ConnectionError) -> String {
    // QUIC carries TLS alerts as transport codes 0x100 + alert (RFC 9001, section 4.8).
    let tls_alert = |code: quinn::TransportErrorCode| {
        let code = u64::from(code);
        (0x100..0x200).contains(&code).then_some(code - 0x100)
    };
    match error {
        quinn::ConnectionError::TransportError(local) => match tls_alert(local.code) {
            Some(_) => format!("TLS handshake failed: {}", local.reason),
            None => local.to_string(),
        },
        quinn::ConnectionError::ConnectionClosed(close) => match tls_alert(close.error_code) {
            Some(alert) => format!(
                "TLS handshake refused by the peer (alert {alert}): {}",
                String::from_utf8_lossy(&close.reason)
            ),
            None => format!("peer closed the connection: {close}"),
        },
        quinn::ConnectionError::TimedOut => "no answer from the peer (timed out)".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Tier;
    use crate::endpoints::ranking::RankedEndpoint;
    use crate::endpoints::Endpoint;

    fn address(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 15443))
    }

    fn key(last: u8, name: &str) -> SlotKey {
        (address(last), Arc::from(name))
    }

    fn ranked(last: u8) -> RankedEndpoint {
        RankedEndpoint {
            endpoint: Endpoint {
                address: address(last),
                pod: format!("pod-{last}"),
                node: None,
                zone: None,
                host_ip: None,
            },
            tier: Tier::Any,
            load: Arc::new(EndpointLoad::default()),
        }
    }

    fn sorted(set: HashSet<SocketAddr>) -> Vec<SocketAddr> {
        let mut list: Vec<_> = set.into_iter().collect();
        list.sort();
        list
    }

    #[test]
    fn slots_of_departed_addresses_are_evicted_for_every_server_name() {
        let slots = [key(1, "a"), key(2, "a"), key(2, "b"), key(3, "a")];
        let keep = HashSet::from([address(1), address(3)]);
        let mut gone = slots_to_evict(slots.iter(), &keep);
        gone.sort();
        assert_eq!(gone, vec![key(2, "a"), key(2, "b")]);
        assert!(slots_to_evict(
            slots.iter(),
            &HashSet::from([address(1), address(2), address(3)])
        )
        .is_empty());
    }

    #[test]
    fn retention_keeps_current_endpoints_and_drops_departed_idle_ones() {
        let (one, two) = (ranked(1), ranked(2));
        let mut retention = Retention::default();
        let keep = retention.update([
            (one.endpoint.address, one.load.clone()),
            (two.endpoint.address, two.load.clone()),
        ]);
        assert_eq!(sorted(keep), vec![address(1), address(2)]);
        let keep = retention.update([(one.endpoint.address, one.load.clone())]);
        assert_eq!(sorted(keep), vec![address(1)]);
    }

    #[test]
    fn retention_keeps_a_departed_endpoint_until_its_last_call_ends() {
        let (one, two) = (ranked(1), ranked(2));
        let mut retention = Retention::default();
        retention.update([
            (one.endpoint.address, one.load.clone()),
            (two.endpoint.address, two.load.clone()),
        ]);
        let call = two.start_call();
        let keep = retention.update([(one.endpoint.address, one.load.clone())]);
        assert_eq!(
            sorted(keep),
            vec![address(1), address(2)],
            "a call still runs on 2"
        );
        // A recheck without a ranking change still keeps it while the call runs.
        let keep = retention.update([(one.endpoint.address, one.load.clone())]);
        assert!(keep.contains(&address(2)));
        drop(call);
        let keep = retention.update([(one.endpoint.address, one.load.clone())]);
        assert_eq!(sorted(keep), vec![address(1)]);
    }

    #[test]
    fn retention_forgets_the_old_counter_of_an_address_that_returns() {
        let old = ranked(2);
        let mut retention = Retention::default();
        retention.update([(old.endpoint.address, old.load.clone())]);
        let _call = old.start_call();
        retention.update([]);
        // The pod came back (same address, a fresh counter from the ranking): it is current.
        let fresh = ranked(2);
        let keep = retention.update([(fresh.endpoint.address, fresh.load.clone())]);
        assert_eq!(sorted(keep), vec![address(2)]);
        assert_eq!(retention.loads[&address(2)].len(), 1);
    }

    fn pool() -> ConnectionPool {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let crypto = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        ConnectionPool::new(QuicClientConfig::try_from(crypto).expect("TLS 1.3 config"))
    }

    #[test]
    fn retain_only_removes_exactly_the_slots_not_kept() {
        let pool = pool();
        {
            let mut slots = pool.slots.lock().unwrap();
            for key in [key(1, "a"), key(2, "a"), key(2, "b")] {
                slots.insert(key, Arc::new(Slot::default()));
            }
        }
        assert_eq!(pool.retain_only(&HashSet::from([address(1)])), 2);
        let slots = pool.slots.lock().unwrap();
        assert_eq!(slots.keys().cloned().collect::<Vec<_>>(), vec![key(1, "a")]);
    }
}
