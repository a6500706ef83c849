//! QUIC between sidecars: socket and transport settings sized for a pod network, and the
//! outbound connection pool (one multiplexed HTTP/3 connection per upstream endpoint,
//! re-established when lost, closed once its endpoint has left discovery and its calls are done).
//!
//! Gray failures are found here, fast: a restarted peer resets old connections at once (the
//! stateless-reset key is derived from the pod's own key, so the new process can prove it), a
//! frozen peer is declared dead when calls wait on it and nothing has arrived from it for
//! [`DEAD_AFTER`], one connect per endpoint is shared by every call that needs it, and a failed
//! connect is remembered for a moment so calls move to another endpoint at once instead of
//! queuing behind it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use bytes::Bytes;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{
    AckFrequencyConfig, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt,
};

use crate::endpoints::ranking::{EndpointLoad, RankingWatch};
use crate::metrics::{metrics, DirectionLabels, OpenPeerConnection};
use crate::wire::field_memory::SentFields;
use crate::wire::h2_peer;
use crate::wire::h3_quic::{QuicConnection, QuicOpener};
use crate::wire::udp::SidecarQuicRuntime;

/// The HTTP/3 request handle of one upstream connection; clones share the connection.
pub type H3Sender = h3::client::SendRequest<QuicOpener, Bytes>;

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
/// 1450, minus IPv6 and UDP headers 1402. quinn probes upward from here on its own (up to
/// [`MAX_UDP_PAYLOAD`]); starting at quinn's internet-safe 1200 would cost ~15% more packets
/// until discovery finishes.
const INITIAL_MTU: u16 = 1400;
/// The largest QUIC packet path-MTU discovery looks for, and that we accept. Pod networks with
/// jumbo frames (AWS VPC CNI's 9001, GKE and Calico set up for 8,896 and more) then carry a
/// 64 KiB message in 11 packets instead of 46, and per-packet work (encryption set-up, header
/// protection, acknowledgements, one datagram's trip through the kernel) is most of what large
/// messages cost. On 1500-byte paths the probes above 1452 are lost (the kernel refuses them
/// locally) and packets stay at 1452; quinn drops back if a path shrinks later (black-hole
/// detection). quinn's default stops at 1452. Not the 8,952 a 9000-byte frame would hold: quinn
/// hands the kernel up to ten packets in one segmentation-offload write (fewer if the socket
/// says so, see [`crate::wire::udp`]), and ten of 6,500 fit in one.
pub(crate) const MAX_UDP_PAYLOAD: u16 = 6_500;
/// Keep-alives keep conntrack entries of NATed pod networks alive and let the inbound side notice
/// a caller that vanished.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// The calling side pings an otherwise quiet connection this often, so a live peer always has
/// something to acknowledge: its silence then means it is gone or frozen (see [`DEAD_AFTER`]).
/// A PING and its ACK are ~50 bytes each; a few per second per upstream endpoint is nothing.
const CLIENT_KEEP_ALIVE: Duration = Duration::from_millis(150);
/// A connection nothing arrives on for this long closes by itself, calls waiting or not.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls are waiting on a connection and nothing at all has arrived from the peer for this long:
/// it is frozen, partitioned or gone. A live peer acknowledges a request or a PING within its
/// ACK delay (25 ms) plus the round trip; half a second leaves room for a busy node's scheduler
/// while moving the calls well inside a typical 1 s deadline.
pub const DEAD_AFTER: Duration = Duration::from_millis(500);
/// How often a connection's watchdog looks at what has arrived.
const WATCHDOG_TICK: Duration = Duration::from_millis(50);
/// The most one look counts toward a peer's silence. A look later than this means our own
/// process did not run meanwhile (a CPU-starved or throttled sidecar): the peer's packets may
/// be sitting unread in our socket, so that stall says nothing about the peer.
const MOST_COUNTED_PER_LOOK: Duration = Duration::from_millis(200);
/// How long a failed connect (or a connection declared dead) is remembered: calls that pick the
/// endpoint meanwhile are told at once, and go elsewhere, instead of each waiting out a connect.
const FAILURE_MEMORY: Duration = Duration::from_secs(1);
/// How long a call that has other endpoints to go to waits for a connect in progress before it
/// moves on (the connect goes on for the calls after it). A handshake in a cluster takes a few
/// milliseconds; 200 ms allows for a busy node without letting a dead one hold calls up.
pub const CONNECT_PATIENCE: Duration = Duration::from_millis(200);
/// The round-trip time assumed before the first measurement. quinn's default (333 ms, for the
/// internet) makes the first retransmission of a lost handshake packet wait about a second,
/// as long as the whole connect timeout; pod networks answer in well under a millisecond. At
/// 10 ms a lost handshake packet is resent after ~30 ms; a busy peer that takes longer than
/// that to answer costs a duplicate packet, nothing more.
const INITIAL_RTT: Duration = Duration::from_millis(10);
/// The kernel's default UDP buffers (~200 KiB) drop packets when a burst of streams lands at
/// once; drops turn into retransmits and latency spikes. The kernel caps this at net.core.rmem_max.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// How long a new connection may take before the call fails over or fails. A QUIC handshake
/// inside a cluster takes milliseconds; a peer that has not answered in a second is gone (UDP
/// gets no connection-refused), and the call is better off on another pod.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long QUIC has to connect before the HTTP/2 fallback on TCP races it. A QUIC handshake on
/// a pod network takes a few milliseconds, on a busy node tens: this never delays a working QUIC
/// peer, and costs a UDP-blocked one's first call this much plus a TCP and TLS handshake.
const H2_RACE_DELAY: Duration = Duration::from_millis(250);
/// How often a peer reached over the HTTP/2 fallback is tried over QUIC again.
const QUIC_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Ack-eliciting packets the peer may take in before it must send an ACK (QUIC's ACK frequency
/// extension; both ends are quinn). RFC 9000's default acknowledges every second packet, so a
/// request or response that spans two packets draws an ACK-only packet and with it a wake-up of
/// both sidecars; a call's own packets carry the ACKs instead. Ten still acknowledges a bulk
/// transfer every ~14 KB, often enough for congestion control on pod networks.
const ACK_ELICITING_THRESHOLD: u32 = 10;
/// The longest the peer may hold back an ACK (asked for through the ACK frequency extension).
/// QUIC's probe timeout adds it to the RTT: at the default 25 ms, a lost last packet of a
/// request or response (the common case for a unary call) is resent only after ~27 ms on a
/// sub-millisecond link, and that was our p99 under 1% loss. At 1 ms (quinn's floor, its timer
/// granularity) the probe fires after ~2-3 ms. On a clean link few ACK-only packets are added:
/// the threshold above still lets a call's own packets carry them, and a delayed ACK goes out
/// only when nothing else is sent for a millisecond.
const MAX_ACK_DELAY: Duration = Duration::from_millis(1);
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
    Arc::new(settings(KEEP_ALIVE))
}

/// The serving side's settings: [`transport_config`] with at most `max_streams` concurrent
/// request streams per peer connection (`inbound.limits.maxConcurrentStreams`), so one peer's
/// connection cannot hold more calls, and their buffers, than that.
pub fn server_transport_config(max_streams: u32) -> Arc<TransportConfig> {
    let mut config = settings(KEEP_ALIVE);
    config.max_concurrent_bidi_streams(VarInt::from_u32(max_streams));
    Arc::new(config)
}

fn settings(keep_alive: Duration) -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_CALLS))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .initial_mtu(INITIAL_MTU)
        .mtu_discovery_config(Some(path_mtu_discovery()))
        .keep_alive_interval(Some(keep_alive))
        .initial_rtt(INITIAL_RTT)
        // 10 s always fits a VarInt of milliseconds; the fallback is never taken.
        .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    let mut ack_frequency = AckFrequencyConfig::default();
    ack_frequency
        .ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD))
        .max_ack_delay(Some(MAX_ACK_DELAY));
    config.ack_frequency_config(Some(ack_frequency));
    config
}

/// quinn's path-MTU discovery, searching up to [`MAX_UDP_PAYLOAD`].
fn path_mtu_discovery() -> MtuDiscoveryConfig {
    let mut discovery = MtuDiscoveryConfig::default();
    discovery.upper_bound(MAX_UDP_PAYLOAD);
    discovery
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

/// The transport settings of the calling side: [`transport_config`] with the short keep-alive
/// that makes a frozen peer's silence visible.
fn client_transport_config() -> Arc<TransportConfig> {
    Arc::new(settings(CLIENT_KEEP_ALIVE))
}

/// The stateless-reset key of a serving endpoint, derived from `secret` (the pod's private key):
/// a peer sidecar restarted on the same address computes the same key, so its resets of
/// connections it no longer knows are accepted by their callers at once. With quinn's default
/// random key they are ignored and the callers wait for an idle timeout.
pub fn reset_key(secret: &[u8]) -> Arc<dyn quinn::crypto::HmacKey> {
    let derived = ring::digest::digest(
        &ring::digest::SHA256,
        &[
            b"locality-sidecar QUIC stateless reset v1\0".as_slice(),
            secret,
        ]
        .concat(),
    );
    Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        derived.as_ref(),
    ))
}

/// A quinn endpoint on `address`, serving when `server` is given.
pub fn endpoint(
    address: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    endpoint_with(address, server, EndpointConfig::default())
}

/// A serving endpoint whose stateless resets a restarted process can repeat (see [`reset_key`]).
pub fn server_endpoint(
    address: SocketAddr,
    server: quinn::ServerConfig,
    secret: &[u8],
) -> Result<quinn::Endpoint, TransportError> {
    endpoint_with(
        address,
        Some(server),
        EndpointConfig::new(reset_key(secret)),
    )
}

fn endpoint_with(
    address: SocketAddr,
    server: Option<quinn::ServerConfig>,
    mut config: EndpointConfig,
) -> Result<quinn::Endpoint, TransportError> {
    // Told to peers in the handshake: their discovery searches up to it too. A constant within
    // QUIC's range (1200..=65527), so the error is never returned.
    let _ = config.max_udp_payload_size(MAX_UDP_PAYLOAD);
    let socket = bind_udp(address)?;
    quinn::Endpoint::new(config, server, socket, Arc::new(SidecarQuicRuntime))
        .map_err(|source| TransportError::Bind { address, source })
}

/// A connection's liveness as the calls on it see it: how many wait for response headers (the
/// watchdog only judges silence while someone waits), and whether its loss was already counted
/// against the endpoint, so one dead connection is one failure, not one per call it carried.
/// Also what the peer sidecar said it does (see [`crate::wire::grpc::announces_te`]), and what
/// the handshake settled about the hop's headers ([`HopConvention`]).
#[derive(Debug, Default)]
pub struct Link {
    waiting: AtomicUsize,
    loss_reported: AtomicBool,
    peer_restores_te: AtomicBool,
    implies_grpc_defaults: bool,
    /// The path and user-agent slots of this connection, when both ends remember them.
    fields: Option<SentFields>,
}

impl Link {
    /// A connection whose handshake settled `convention`.
    pub fn new(convention: HopConvention) -> Link {
        Link {
            implies_grpc_defaults: convention.implies_grpc_defaults(),
            fields: convention.remembers_fields().then(SentFields::default),
            ..Link::default()
        }
    }

    /// Whether requests and responses on this connection carry gRPC's usual fields implied.
    pub fn implies_grpc_defaults(&self) -> bool {
        self.implies_grpc_defaults
    }

    /// The path and user-agent slots, when both ends remember them (see
    /// [`crate::wire::field_memory`]).
    pub fn fields(&self) -> Option<&SentFields> {
        self.fields.as_ref()
    }

    /// Marks one call as waiting for response headers until the guard is dropped.
    pub fn waiting(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(self.clone())
    }

    /// True for the first call to report this connection lost.
    pub fn first_to_report_loss(&self) -> bool {
        !self.loss_reported.swap(true, Ordering::AcqRel)
    }

    /// Whether the peer sidecar said it sets `te: trailers` for its app itself, so requests on
    /// this connection may leave it off.
    pub fn peer_restores_te(&self) -> bool {
        self.peer_restores_te.load(Ordering::Relaxed)
    }

    pub fn note_peer_restores_te(&self) {
        self.peer_restores_te.store(true, Ordering::Relaxed);
    }
}

/// One call waiting on a connection (see [`Link::waiting`]).
#[derive(Debug)]
pub struct Waiting(Arc<Link>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How calls reach a peer: QUIC, or HTTP/2 over TLS on TCP when QUIC gets no answer (UDP
/// blocked on the way; see [`crate::wire::h2_peer`]).
#[derive(Clone)]
pub enum PeerSender {
    H3(H3Sender),
    H2(h2::client::SendRequest<Bytes>),
}

/// A request handle on a pooled connection, with that connection's liveness.
#[derive(Clone)]
pub struct PooledSender {
    pub sender: PeerSender,
    pub link: Arc<Link>,
    /// The SPIFFE ID the peer presented in the handshake.
    pub peer_identity: Option<Arc<str>>,
}

/// Why a peer's certificate is not the one this call expects, or `None` when it is.
pub fn identity_mismatch(expected: Option<&str>, presented: Option<&str>) -> Option<String> {
    let expected = expected?;
    if presented == Some(expected) {
        return None;
    }
    Some(format!(
        "peer identity mismatch: expected {expected}, presented {}",
        presented.unwrap_or("no SPIFFE identity")
    ))
}

/// Why the pool has no connection for a call.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct PoolError {
    pub error: TransportError,
    /// False when the call learnt of a failure another call already saw (a remembered failed
    /// connect, or a connect still in progress): the endpoint is charged once per failure.
    pub fresh: bool,
}

struct LiveConnection {
    pooled: PooledSender,
    transport: LiveTransport,
}

/// The connection under a pooled sender, for its liveness and its close.
enum LiveTransport {
    Quic(quinn::Connection),
    /// Closed by dropping the last sender: the connection's task ends once its streams are done.
    H2(Arc<h2_peer::Closed>),
}

impl LiveTransport {
    fn is_open(&self) -> bool {
        match self {
            LiveTransport::Quic(connection) => connection.close_reason().is_none(),
            LiveTransport::H2(closed) => !closed.is_closed(),
        }
    }

    fn close(&self, reason: &'static [u8]) {
        if let LiveTransport::Quic(connection) = self {
            connection.close(VarInt::from_u32(H3_NO_ERROR), reason);
        }
    }
}

type ConnectResult = Result<PooledSender, String>;

enum SlotState {
    Empty,
    Live(LiveConnection),
    /// A connect in progress; its result is published to every call waiting for it.
    Connecting(watch::Receiver<Option<ConnectResult>>),
    /// The last connect failed, or the connection was declared dead, at `since`.
    Failed {
        since: Instant,
        reason: String,
    },
}

/// One upstream endpoint's connection and how it is doing.
struct Slot {
    state: Mutex<SlotState>,
    /// Set when the slot is dropped from the pool, so a connect finishing late closes its
    /// connection instead of leaving it open and unreachable.
    evicted: AtomicBool,
    /// A failed connect's waiters: only the first is charged (see [`PoolError::fresh`]).
    failure_reported: AtomicBool,
    /// Calls go over the HTTP/2 fallback (logged once per spell).
    on_fallback: AtomicBool,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            state: Mutex::new(SlotState::Empty),
            evicted: AtomicBool::new(false),
            failure_reported: AtomicBool::new(false),
            on_fallback: AtomicBool::new(false),
        }
    }
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Closes the connection, if any, with a clean application close; the slot is left empty.
    fn close(&self, reason: &'static [u8]) {
        self.evicted.store(true, Ordering::Release);
        let previous = std::mem::replace(&mut *self.state(), SlotState::Empty);
        if let SlotState::Live(live) = previous {
            live.transport.close(reason);
        }
    }

    /// True while the slot's live connection is an open HTTP/2 fallback.
    fn still_on_fallback(&self) -> bool {
        !self.evicted.load(Ordering::Acquire)
            && matches!(&*self.state(), SlotState::Live(LiveConnection { transport: LiveTransport::H2(closed), .. }) if !closed.is_closed())
    }

    /// Remembers that the endpoint cannot be reached right now.
    fn remember_failure(&self, reason: String) {
        *self.state() = SlotState::Failed {
            since: Instant::now(),
            reason,
        };
    }
}

/// What a call finds in a slot.
enum Found {
    Ready(PooledSender),
    Remembered(String),
    Wait(watch::Receiver<Option<ConnectResult>>),
}

/// What a slot offers a call arriving `now` (a pure function of the slot's state); `None` means
/// nothing usable: the call starts a connect.
fn inspect(state: &SlotState, now: Instant) -> Option<Found> {
    match state {
        SlotState::Live(live) if live.transport.is_open() => {
            Some(Found::Ready(live.pooled.clone()))
        }
        SlotState::Failed { since, reason } if now.duration_since(*since) < FAILURE_MEMORY => {
            Some(Found::Remembered(reason.clone()))
        }
        SlotState::Connecting(receiver) => Some(Found::Wait(receiver.clone())),
        _ => None,
    }
}

/// A peer address and the certificate name it must present.
type SlotKey = (SocketAddr, Arc<str>);

/// Outbound QUIC connections, one per (address, server name).
pub struct ConnectionPool {
    client_config: quinn::ClientConfig,
    /// TLS for the HTTP/2 fallback on TCP.
    tcp_config: Arc<rustls::ClientConfig>,
    /// Client endpoints per address family, created on first use.
    v4: OnceLock<quinn::Endpoint>,
    v6: OnceLock<quinn::Endpoint>,
    slots: Mutex<HashMap<SlotKey, Arc<Slot>>>,
}

impl ConnectionPool {
    pub fn new(crypto: QuicClientConfig, tcp_config: Arc<rustls::ClientConfig>) -> ConnectionPool {
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(client_transport_config());
        ConnectionPool {
            client_config,
            tcp_config,
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

    /// A request handle for `address`, connecting (once, shared by every call that needs it)
    /// when there is no live connection. With `patience`, a call that finds a connect in
    /// progress waits at most that long before it gives up (to move to another endpoint).
    pub async fn sender(
        &self,
        address: SocketAddr,
        server_name: &Arc<str>,
        identity: Option<&str>,
        patience: Option<Duration>,
    ) -> Result<PooledSender, PoolError> {
        let pooled = self.connection(address, server_name, patience).await?;
        // Checked on every call, not only at the connect: a connect may have been started by a
        // call that expected another identity, and a pod's address may be reused.
        match identity_mismatch(identity, pooled.peer_identity.as_deref()) {
            None => Ok(pooled),
            Some(reason) => {
                metrics().upstream_identity_mismatches.inc();
                Err(PoolError {
                    error: TransportError::Connect { address, reason },
                    fresh: true,
                })
            }
        }
    }

    async fn connection(
        &self,
        address: SocketAddr,
        server_name: &Arc<str>,
        patience: Option<Duration>,
    ) -> Result<PooledSender, PoolError> {
        let failed = |reason: String, fresh: bool| PoolError {
            error: TransportError::Connect { address, reason },
            fresh,
        };
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
        let (found, publish) = {
            let mut state = slot.state();
            match inspect(&state, Instant::now()) {
                Some(found) => (found, None),
                None => {
                    let (publish, receiver) = watch::channel(None);
                    *state = SlotState::Connecting(receiver.clone());
                    slot.failure_reported.store(false, Ordering::Release);
                    (Found::Wait(receiver), Some(publish))
                }
            }
        };
        let mut receiver = match found {
            Found::Ready(pooled) => return Ok(pooled),
            Found::Remembered(reason) => {
                return Err(failed(format!("{reason} (a moment ago)"), false))
            }
            Found::Wait(receiver) => receiver,
        };
        if let Some(publish) = publish {
            let endpoint = match self.client_endpoint(address) {
                Ok(endpoint) => endpoint.clone(),
                Err(error) => {
                    slot.remember_failure(error.to_string());
                    return Err(PoolError { error, fresh: true });
                }
            };
            tokio::spawn(connect_into(
                slot.clone(),
                QuicDialer {
                    endpoint,
                    config: self.client_config.clone(),
                    address,
                    server_name: server_name.clone(),
                },
                self.tcp_config.clone(),
                publish,
            ));
        }
        let outcome = async {
            loop {
                if let Some(result) = receiver.borrow_and_update().clone() {
                    return result;
                }
                if receiver.changed().await.is_err() {
                    return Err("the connect was abandoned".to_string());
                }
            }
        };
        let result = match patience {
            None => outcome.await,
            Some(patience) => match tokio::time::timeout(patience, outcome).await {
                Ok(result) => result,
                Err(_) => {
                    return Err(failed(
                        format!("still connecting after {} ms", patience.as_millis()),
                        false,
                    ))
                }
            },
        };
        result.map_err(|reason| {
            let fresh = !slot.failure_reported.swap(true, Ordering::AcqRel);
            failed(reason, fresh)
        })
    }

    /// How calls reach `address` now, for `/endpoints`: `h3` (QUIC), `h2` (the HTTP/2 fallback),
    /// `connecting`, `failed` (a connect failed a moment ago) or `None` (no connection yet).
    pub fn connection_state(&self, address: SocketAddr) -> Option<&'static str> {
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A peer is usually dialled under one server name; with several, the live one counts.
        let mut found = None;
        for ((slot_address, _), slot) in slots.iter() {
            if *slot_address != address {
                continue;
            }
            let state = match &*slot.state() {
                SlotState::Live(live) if live.transport.is_open() => match live.transport {
                    LiveTransport::Quic(_) => "h3",
                    LiveTransport::H2(_) => "h2",
                },
                SlotState::Connecting(_) => "connecting",
                SlotState::Failed { .. } => "failed",
                _ => continue,
            };
            if matches!(state, "h3" | "h2") {
                return Some(state);
            }
            found = Some(state);
        }
        found
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

/// What it takes to open a QUIC connection to one peer, again and again (the fallback's probes).
#[derive(Clone)]
struct QuicDialer {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    address: SocketAddr,
    server_name: Arc<str>,
}

/// Why a QUIC connect failed, and whether the peer answered at all: only silence (UDP lost on
/// the way) is a reason to try the HTTP/2 fallback; a peer that answered and refused would
/// refuse over TCP too.
struct DialFailure {
    reason: String,
    unanswered: bool,
}

impl QuicDialer {
    async fn dial(self) -> Result<(H3Sender, quinn::Connection), DialFailure> {
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect(&self.endpoint, self.config, self.address, &self.server_name),
        )
        .await
        {
            Ok(result) => result.map_err(|reason| DialFailure {
                reason,
                unanswered: false,
            }),
            Err(_) => Err(DialFailure {
                reason: format!("connect timed out after {} ms", CONNECT_TIMEOUT.as_millis()),
                unanswered: true,
            }),
        }
    }
}

type QuicDial = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<(H3Sender, quinn::Connection), DialFailure>> + Send,
    >,
>;

/// How the race between QUIC and the HTTP/2 fallback ended.
enum Raced {
    Quic(H3Sender, quinn::Connection),
    /// HTTP/2 connected first; QUIC's connect, when still running, goes on in the background.
    H2(h2_peer::H2Connection, Option<QuicDial>),
    Failed(String),
}

/// Connects to a peer the way browsers' happy eyeballs do: QUIC first, HTTP/2 over TLS on TCP
/// from [`H2_RACE_DELAY`] on, the first to connect wins. Where UDP passes, QUIC answers well
/// within the delay and TCP is never tried; where it is blocked, the first call waits the delay
/// and a TCP handshake instead of QUIC's whole connect timeout. Both end by [`CONNECT_TIMEOUT`],
/// so a peer down or frozen costs no longer than it did with QUIC alone.
async fn race(quic: QuicDialer, tcp_config: Arc<rustls::ClientConfig>) -> Raced {
    let address = quic.address;
    let server_name = quic.server_name.clone();
    let mut quic_dial: QuicDial = Box::pin(quic.dial());
    let h2_dial = async {
        tokio::time::sleep(H2_RACE_DELAY).await;
        let left = CONNECT_TIMEOUT.saturating_sub(H2_RACE_DELAY);
        h2_peer::connect(tcp_config, address, &server_name, left).await
    };
    tokio::pin!(h2_dial);
    let mut quic_failed: Option<String> = None;
    let mut h2_failed: Option<String> = None;
    loop {
        tokio::select! {
            dialled = &mut quic_dial, if quic_failed.is_none() => match dialled {
                Ok((sender, connection)) => return Raced::Quic(sender, connection),
                Err(failure) if !failure.unanswered => return Raced::Failed(failure.reason),
                Err(failure) => quic_failed = Some(failure.reason),
            },
            dialled = &mut h2_dial, if h2_failed.is_none() => match dialled {
                Ok(connection) => {
                    let pending = quic_failed.is_none().then_some(quic_dial);
                    return Raced::H2(connection, pending);
                }
                Err(reason) => h2_failed = Some(reason),
            },
        }
        if let (Some(quic), Some(h2)) = (&quic_failed, &h2_failed) {
            return Raced::Failed(describe_race_failure(quic, h2));
        }
    }
}

/// Why neither transport connected. QUIC's reason leads: it is the one the peer normally speaks,
/// and a peer that is down fails both the same way.
fn describe_race_failure(quic: &str, h2: &str) -> String {
    format!("{quic} (HTTP/2 fallback on TCP: {h2})")
}

/// Connects `slot` to its endpoint and publishes the result to the calls waiting for it.
async fn connect_into(
    slot: Arc<Slot>,
    quic: QuicDialer,
    tcp_config: Arc<rustls::ClientConfig>,
    publish: watch::Sender<Option<ConnectResult>>,
) {
    let address = quic.address;
    let result = match race(quic.clone(), tcp_config).await {
        Raced::Quic(sender, connection) => install_quic(&slot, sender, connection, address),
        Raced::H2(connection, pending) => {
            let installed = install_h2(&slot, connection, address);
            if installed.is_ok() {
                tokio::spawn(probe_quic(Arc::downgrade(&slot), quic, pending));
            }
            installed
        }
        Raced::Failed(reason) => {
            tracing::debug!(%address, %reason, "connect failed");
            slot.remember_failure(reason.clone());
            Err(reason)
        }
    };
    // No receiver left is fine: every waiting call gave up, and the slot holds the result.
    let _ = publish.send(Some(result));
}

/// Makes a new QUIC connection the slot's, watched for a silent peer.
fn install_quic(
    slot: &Arc<Slot>,
    sender: H3Sender,
    connection: quinn::Connection,
    address: SocketAddr,
) -> ConnectResult {
    let pooled = PooledSender {
        sender: PeerSender::H3(sender),
        link: Arc::new(Link::new(hop_convention(&connection))),
        peer_identity: peer_identity(&connection).map(Arc::from),
    };
    if slot.evicted.load(Ordering::Acquire) {
        connection.close(VarInt::from_u32(H3_NO_ERROR), b"endpoint left discovery");
        return Err("the endpoint left discovery".to_string());
    }
    tokio::spawn(watch_link(
        connection.clone(),
        pooled.link.clone(),
        Arc::downgrade(slot),
        address,
    ));
    *slot.state() = SlotState::Live(LiveConnection {
        pooled: pooled.clone(),
        transport: LiveTransport::Quic(connection),
    });
    Ok(pooled)
}

/// Makes an HTTP/2 fallback connection the slot's.
fn install_h2(
    slot: &Arc<Slot>,
    connection: h2_peer::H2Connection,
    address: SocketAddr,
) -> ConnectResult {
    if slot.evicted.load(Ordering::Acquire) {
        return Err("the endpoint left discovery".to_string());
    }
    metrics().h2_fallbacks.inc();
    if !slot.on_fallback.swap(true, Ordering::AcqRel) {
        tracing::warn!(%address, "QUIC to this peer gets no answer (UDP blocked?); calls go over HTTP/2 on TCP, and QUIC is retried in the background");
    }
    let pooled = PooledSender {
        sender: PeerSender::H2(connection.sender),
        link: Arc::new(Link::default()),
        peer_identity: connection.peer_identity.map(Arc::from),
    };
    if let Some(ping) = connection.ping {
        tokio::spawn(watch_h2_link(
            ping,
            connection.driver,
            connection.closed.clone(),
            pooled.link.clone(),
            Arc::downgrade(slot),
            address,
        ));
    }
    *slot.state() = SlotState::Live(LiveConnection {
        pooled: pooled.clone(),
        transport: LiveTransport::H2(connection.closed),
    });
    Ok(pooled)
}

/// While a slot's calls go over the HTTP/2 fallback, tries QUIC every [`QUIC_PROBE_INTERVAL`]
/// (after the race's own QUIC connect, if it was still running) and moves the slot back once it
/// connects. Calls already on HTTP/2 finish there. Ends when the slot is dropped, evicted, or
/// holds something else than its HTTP/2 connection (it failed and a new race took over).
async fn probe_quic(slot: Weak<Slot>, quic: QuicDialer, pending: Option<QuicDial>) {
    let address = quic.address;
    let mut dial = pending;
    loop {
        let connected = match dial.take() {
            Some(dial) => dial.await,
            None => {
                tokio::time::sleep(QUIC_PROBE_INTERVAL).await;
                let Some(slot) = slot.upgrade() else { return };
                if !slot.still_on_fallback() {
                    return;
                }
                quic.clone().dial().await
            }
        };
        let Some(slot) = slot.upgrade() else { return };
        if !slot.still_on_fallback() {
            if let Ok((_, connection)) = connected {
                connection.close(VarInt::from_u32(H3_NO_ERROR), b"not needed");
            }
            return;
        }
        if let Ok((sender, connection)) = connected {
            if install_quic(&slot, sender, connection, address).is_ok() {
                slot.on_fallback.store(false, Ordering::Release);
                tracing::info!(%address, "QUIC to this peer works again; new calls go over QUIC");
            }
            return;
        }
    }
}

/// The SPIFFE ID of a connection's peer, from the certificate it presented.
pub fn peer_identity(connection: &quinn::Connection) -> Option<String> {
    let chain = connection
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    crate::wire::tls::spiffe_id(&chain)
}

/// What both ends of a QUIC connection agreed in the handshake (ALPN) about the hop's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HopConvention {
    /// Plain HTTP/3: the peer is not a sidecar, or one older than the conventions below.
    #[default]
    PlainH3,
    /// [`crate::wire::tls::ALPN_H3_SIDECAR`]: gRPC's usual fields implied (see
    /// [`crate::wire::grpc::imply_grpc_defaults`]).
    GrpcDefaults,
    /// [`crate::wire::tls::ALPN_H3_SIDECAR_MEMORY`]: that, and each request's path and
    /// user-agent remembered per connection (see [`crate::wire::field_memory`]).
    GrpcDefaultsAndFieldMemory,
}

impl HopConvention {
    pub fn implies_grpc_defaults(self) -> bool {
        self != HopConvention::PlainH3
    }

    pub fn remembers_fields(self) -> bool {
        self == HopConvention::GrpcDefaultsAndFieldMemory
    }
}

/// The convention `connection`'s handshake settled.
pub fn hop_convention(connection: &quinn::Connection) -> HopConvention {
    let protocol = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    match protocol.as_deref() {
        Some(crate::wire::tls::ALPN_H3_SIDECAR_MEMORY) => HopConvention::GrpcDefaultsAndFieldMemory,
        Some(crate::wire::tls::ALPN_H3_SIDECAR) => HopConvention::GrpcDefaults,
        _ => HopConvention::PlainH3,
    }
}

/// One QUIC handshake and HTTP/3 set-up; spawns the task that drives the connection.
async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    address: SocketAddr,
    server_name: &str,
) -> Result<(H3Sender, quinn::Connection), String> {
    let connecting = endpoint
        .connect_with(config, address, server_name)
        .map_err(|e| e.to_string())?;
    let connection = connecting
        .await
        .map_err(|e| describe_connection_error(&e))?;
    let (mut driver, sender) = h3::client::builder()
        .send_grease(false)
        .build::<_, _, Bytes>(QuicConnection::new(connection.clone()))
        .await
        .map_err(|e| format!("HTTP/3 setup: {e}"))?;
    tracing::debug!(%address, server_name, "QUIC connection established");
    let direction = DirectionLabels {
        direction: "outbound",
    };
    metrics()
        .quic_connections_opened
        .get_or_create(&direction)
        .inc();
    let open = OpenPeerConnection::new("outbound", "h3");
    tokio::spawn(async move {
        let _open = open;
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

/// What a connection's watchdog concludes from one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Alive,
    Dead,
}

/// The watchdog's memory between looks: the datagrams received so far, and how long the peer
/// has been silent while calls waited (anything received, or nobody waiting, restarts it).
#[derive(Debug, Clone, Copy)]
struct Silence {
    datagrams: u64,
    silent_for: Duration,
    last_look: Instant,
}

impl Silence {
    fn new(datagrams: u64, now: Instant) -> Silence {
        Silence {
            datagrams,
            silent_for: Duration::ZERO,
            last_look: now,
        }
    }

    /// One look at `now`: `datagrams` received in all, `waiting` calls waiting for headers.
    /// Each look counts the time since the previous one, up to [`MOST_COUNTED_PER_LOOK`].
    fn look(&mut self, datagrams: u64, waiting: usize, now: Instant) -> Verdict {
        let since = now.saturating_duration_since(self.last_look);
        self.last_look = now;
        if datagrams != self.datagrams || waiting == 0 {
            self.datagrams = datagrams;
            self.silent_for = Duration::ZERO;
            return Verdict::Alive;
        }
        self.silent_for += since.min(MOST_COUNTED_PER_LOOK);
        if self.silent_for >= DEAD_AFTER {
            Verdict::Dead
        } else {
            Verdict::Alive
        }
    }
}

/// Watches one outbound connection until it closes: declares it dead when calls wait on it and
/// the peer has been silent for [`DEAD_AFTER`] (closing it fails those calls at once, so they
/// retry elsewhere, and the slot remembers the failure), and counts resets by a restarted peer.
async fn watch_link(
    connection: quinn::Connection,
    link: Arc<Link>,
    slot: Weak<Slot>,
    address: SocketAddr,
) {
    let mut silence = Silence::new(connection.stats().udp_rx.datagrams, Instant::now());
    let mut ticks = tokio::time::interval(WATCHDOG_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            reason = connection.closed() => {
                if matches!(reason, quinn::ConnectionError::Reset) {
                    metrics().quic_connections_reset.inc();
                    tracing::info!(%address, "peer sidecar restarted: it reset the old connection");
                }
                return;
            }
            _ = ticks.tick() => {}
        }
        let datagrams = connection.stats().udp_rx.datagrams;
        let waiting = link.waiting.load(Ordering::Acquire);
        if silence.look(datagrams, waiting, Instant::now()) == Verdict::Dead {
            metrics().quic_dead_connections.inc();
            tracing::warn!(%address, waiting, silent_ms = DEAD_AFTER.as_millis() as u64, "peer sidecar stopped answering; connection declared dead and its calls moved");
            if let Some(slot) = slot.upgrade() {
                slot.remember_failure(format!(
                    "peer stopped answering (nothing received for {} ms)",
                    DEAD_AFTER.as_millis()
                ));
            }
            connection.close(VarInt::from_u32(H3_NO_ERROR), b"peer unresponsive");
            return;
        }
    }
}

/// [`watch_link`] for the HTTP/2 fallback: while calls wait, PINGs the peer every tick (one at a
/// time); PONGs stand for QUIC's received datagrams. A peer silent for [`DEAD_AFTER`] while
/// calls wait has its connection ended at once, so they retry elsewhere; TCP alone would keep
/// them waiting for its retransmission timeouts.
async fn watch_h2_link(
    mut ping: h2::PingPong,
    driver: tokio::task::AbortHandle,
    closed: Arc<h2_peer::Closed>,
    link: Arc<Link>,
    slot: Weak<Slot>,
    address: SocketAddr,
) {
    let mut pongs = 0u64;
    let mut silence = Silence::new(pongs, Instant::now());
    let mut outstanding = false;
    let mut ticks = tokio::time::interval(WATCHDOG_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            pong = std::future::poll_fn(|cx| ping.poll_pong(cx)), if outstanding => match pong {
                Ok(_) => {
                    pongs += 1;
                    outstanding = false;
                }
                // The connection is gone: nothing left to watch.
                Err(_) => return,
            },
            _ = ticks.tick() => {}
        }
        if closed.is_closed() {
            return;
        }
        let waiting = link.waiting.load(Ordering::Acquire);
        if waiting > 0 && !outstanding {
            if ping.send_ping(h2::Ping::opaque()).is_err() {
                return;
            }
            outstanding = true;
        }
        if silence.look(pongs, waiting, Instant::now()) == Verdict::Dead {
            metrics().quic_dead_connections.inc();
            tracing::warn!(%address, waiting, silent_ms = DEAD_AFTER.as_millis() as u64, "peer sidecar stopped answering on the HTTP/2 fallback; connection ended and its calls moved");
            if let Some(slot) = slot.upgrade() {
                slot.remember_failure(format!(
                    "peer stopped answering (no PING answered for {} ms)",
                    DEAD_AFTER.as_millis()
                ));
            }
            driver.abort();
            return;
        }
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

/// The TLS alert a QUIC transport error code carries: QUIC sends TLS alerts as codes 0x100 +
/// alert (RFC 9001, section 4.8).
fn tls_alert(code: u64) -> Option<u64> {
    // `then`, not `then_some`: the subtraction must only run for codes in the range.
    (0x100..0x200).contains(&code).then(|| code - 0x100)
}

/// Turns quinn's connection errors into words an operator can act on.
pub fn describe_connection_error(error: &quinn::ConnectionError) -> String {
    let tls_alert = |code: quinn::TransportErrorCode| tls_alert(u64::from(code));
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
                service_account: None,
                identity: None,
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
        ConnectionPool::new(
            QuicClientConfig::try_from(crypto.clone()).expect("TLS 1.3 config"),
            Arc::new(crypto),
        )
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
    #[test]
    fn silence_only_counts_while_calls_wait() {
        let start = Instant::now();
        let mut silence = Silence::new(5, start);
        let later = |ms| start + Duration::from_millis(ms);
        // Idle for a long time: nobody waits, so nothing is judged.
        assert_eq!(silence.look(5, 0, later(5_000)), Verdict::Alive);
        // A call starts waiting; the clock runs from the last look.
        assert_eq!(silence.look(5, 1, later(5_100)), Verdict::Alive);
        assert_eq!(silence.look(5, 1, later(5_300)), Verdict::Alive);
        assert_eq!(silence.look(5, 1, later(5_450)), Verdict::Alive);
        assert_eq!(silence.look(5, 1, later(5_500)), Verdict::Dead);
    }

    #[test]
    fn a_stall_of_our_own_is_not_the_peers_silence() {
        let start = Instant::now();
        let mut silence = Silence::new(0, start);
        let later = |ms| start + Duration::from_millis(ms);
        assert_eq!(silence.look(0, 3, later(50)), Verdict::Alive);
        // Our process did not run for 2 s (starved): the peer's ACKs may be unread in our
        // socket, so that counts as one long look, not as 2 s of silence.
        assert_eq!(silence.look(0, 3, later(2_050)), Verdict::Alive);
        assert_eq!(
            silence.look(1, 3, later(2_100)),
            Verdict::Alive,
            "the ACKs were there"
        );
        // A peer that really went quiet is still found out, looks coming on time.
        for ms in [2_200, 2_300, 2_400, 2_500] {
            assert_eq!(silence.look(1, 3, later(ms)), Verdict::Alive);
        }
        assert_eq!(silence.look(1, 3, later(2_600)), Verdict::Dead);
    }

    #[test]
    fn anything_received_restarts_the_silence() {
        let start = Instant::now();
        let mut silence = Silence::new(0, start);
        let later = |ms| start + Duration::from_millis(ms);
        assert_eq!(silence.look(0, 3, later(200)), Verdict::Alive);
        assert_eq!(silence.look(0, 3, later(400)), Verdict::Alive);
        assert_eq!(
            silence.look(1, 3, later(450)),
            Verdict::Alive,
            "an ACK came"
        );
        for ms in [650, 850, 900] {
            assert_eq!(silence.look(1, 3, later(ms)), Verdict::Alive);
        }
        assert_eq!(silence.look(1, 3, later(950)), Verdict::Dead);
    }

    #[test]
    fn a_slot_offers_a_remembered_failure_only_for_a_moment_or_a_connect_to_join() {
        let now = Instant::now();
        assert!(inspect(&SlotState::Empty, now).is_none());
        let failed = SlotState::Failed {
            since: now,
            reason: "refused".to_string(),
        };
        assert!(matches!(
            inspect(&failed, now + Duration::from_millis(10)),
            Some(Found::Remembered(_))
        ));
        assert!(inspect(&failed, now + FAILURE_MEMORY).is_none());
        let (_publish, receiver) = watch::channel(None);
        assert!(matches!(
            inspect(&SlotState::Connecting(receiver), now),
            Some(Found::Wait(_))
        ));
    }

    #[test]
    fn a_dead_connection_is_charged_to_its_endpoint_once() {
        let link = Arc::new(Link::default());
        let guards: Vec<Waiting> = (0..3).map(|_| link.waiting()).collect();
        assert_eq!(link.waiting.load(Ordering::Acquire), 3);
        drop(guards);
        assert_eq!(link.waiting.load(Ordering::Acquire), 0);
        assert!(link.first_to_report_loss());
        assert!(!link.first_to_report_loss());
        assert!(!link.first_to_report_loss());
    }

    #[test]
    fn the_reset_key_is_the_same_for_the_same_secret_and_differs_otherwise() {
        let sign = |secret: &[u8]| {
            let key = reset_key(secret);
            let mut tag = vec![0u8; key.signature_len()];
            key.sign(b"connection id", &mut tag);
            tag
        };
        assert_eq!(
            sign(b"pod key"),
            sign(b"pod key"),
            "a restarted process agrees"
        );
        assert_ne!(sign(b"pod key"), sign(b"another pod key"));
    }

    #[tokio::test]
    async fn a_remembered_failure_is_told_at_once_and_not_charged_again() {
        let pool = pool();
        let address = address(9);
        let name: Arc<str> = Arc::from("peer");
        pool.slots
            .lock()
            .unwrap()
            .entry((address, name.clone()))
            .or_default()
            .remember_failure("connect timed out".to_string());
        let error = match pool.sender(address, &name, None, None).await {
            Err(error) => error,
            Ok(_) => panic!("a remembered failure must not connect"),
        };
        assert!(!error.fresh);
        assert!(error.to_string().contains("connect timed out"), "{error}");
    }

    #[test]
    fn an_upstream_must_present_the_expected_identity_when_one_is_expected() {
        let echo = "spiffe://td/ns/default/sa/echo";
        assert_eq!(identity_mismatch(None, None), None);
        assert_eq!(identity_mismatch(None, Some(echo)), None);
        assert_eq!(identity_mismatch(Some(echo), Some(echo)), None);
        let reason =
            identity_mismatch(Some(echo), Some("spiffe://td/ns/default/sa/other")).unwrap();
        assert!(
            reason.contains("expected spiffe://td/ns/default/sa/echo"),
            "{reason}"
        );
        assert!(
            reason.contains("presented spiffe://td/ns/default/sa/other"),
            "{reason}"
        );
        assert!(identity_mismatch(Some(echo), None)
            .unwrap()
            .contains("no SPIFFE identity"));
    }

    #[test]
    fn connection_errors_below_the_tls_range_are_described_without_panicking() {
        // A code below the TLS range once made the subtraction overflow (a panic in debug
        // builds) for any non-TLS transport error.
        assert_eq!(tls_alert(0x0a), None);
        assert_eq!(tls_alert(0x100 + 42), Some(42));
        assert_eq!(tls_alert(0x200), None);
        assert_eq!(
            describe_connection_error(&quinn::ConnectionError::TimedOut),
            "no answer from the peer (timed out)"
        );
    }
}
