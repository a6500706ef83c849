//! The inbound role: peer sidecars' calls arrive over QUIC/HTTP/3 (mutual TLS checked by the
//! handshake), and each is handed to the local app over a pooled h2c connection. The app's
//! response, trailers-only or streamed, goes back unchanged.
//!
//! Where UDP is blocked between two nodes, peers call over HTTP/2 on TLS 1.3 instead, to a TCP
//! listener at the QUIC port's number ([`serve_tcp`], see [`crate::wire::h2_peer`]). Both
//! transports share one [`Guard`] and one call path ([`handle_call`], generic over the peer's
//! stream), so authorization, limits, deadlines and the identity header cannot drift apart.
//!
//! A call the app never processed (it was refused, or fell above the last-stream-id of the
//! app's GOAWAY while it restarts) is reset with H3_REQUEST_REJECTED, so the caller's sidecar
//! retries it elsewhere without the caller noticing. A caller that cancels (it stops or resets
//! the stream, on either transport) has the app's call cancelled at once, even when its request
//! was already sent whole: see [`crate::wire::h3_quic`]. On shutdown the listener refuses new
//! connections, sends HTTP/3 GOAWAY on the open ones and lets their calls finish, bounded.
//!
//! Authorization and hostile peers ([`Guard`]): a caller's identity is the SPIFFE ID its
//! certificate carries; with `inbound.allow` only listed identities reach the app, others get
//! PERMISSION_DENIED. The app learns the verified caller from [`PEER_IDENTITY_HEADER`] (a copy
//! the caller sent is dropped). What one peer can make us hold is bounded: connections per peer
//! address, request streams per connection, header bytes before a request's headers are complete
//! (per stream and per connection, see [`crate::wire::h3_guard`]) and the time to send them.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h3::error::Code as H3Code;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::Body;
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::config::InboundLimits;
use crate::limits::{admit, Full, Gate, Permit};
use crate::metrics::{metrics, DirectionLabels, LimitLabels, OpenPeerConnection, StatusLabels};
use crate::wire::body::{
    pump_body, pump_into_h2, start_pump, unless_cancelled_by, H2RecvBody, H3RecvBody, H3Send,
    PumpEnd,
};
use crate::wire::field_memory::ReceivedFields;
use crate::wire::grpc::strip_hop_by_hop;
use crate::wire::grpc::{self, Code};
use crate::wire::h2_peer::{peer_reason, H2PeerRecvBody, H2PeerSend};
use crate::wire::h3_guard::{GuardedConnection, HeaderBudget};
use crate::wire::h3_quic::{QuicSend, StopWatch, StopWatches};
use crate::wire::quic::HopConvention;

type PeerSend = h3::server::RequestStream<QuicSend<Bytes>, Bytes>;
type AppSender = h2::client::SendRequest<Bytes>;

/// HTTP/3's "no error" code (RFC 9114): a deliberate, clean close.
const H3_NO_ERROR: u32 = 0x100;
/// The request header that tells the app who called: the caller's verified SPIFFE ID. Absent
/// when the caller's certificate carries none. A copy sent by the caller is always removed.
pub const PEER_IDENTITY_HEADER: &str = "x-locality-sidecar-peer-identity";
/// [`PEER_IDENTITY_HEADER`] as a name: a lookup by `&str` parses the name on every call.
const PEER_IDENTITY_NAME: http::HeaderName = http::HeaderName::from_static(PEER_IDENTITY_HEADER);

/// Who calls over one peer connection, worked out once per connection rather than per call: the
/// SPIFFE ID its certificate carries (what `inbound.allow` checks) and that ID as the value of
/// [`PEER_IDENTITY_HEADER`].
struct Caller {
    identity: Option<Arc<str>>,
    header: Option<http::HeaderValue>,
    /// Whether a response on this connection said what this sidecar does for the caller's
    /// (see [`grpc::FEATURES`]); once per connection is enough.
    features_said: AtomicBool,
    /// Whether the handshake settled that both ends imply gRPC's usual fields (see
    /// [`grpc::imply_grpc_defaults`]).
    implies_grpc_defaults: bool,
    /// The path and user-agent slots of this connection, when both ends remember them (see
    /// [`crate::wire::field_memory`]).
    fields: Option<ReceivedFields>,
}

impl Caller {
    fn new(identity: Option<Arc<str>>, convention: HopConvention) -> Caller {
        let header = identity
            .as_deref()
            .and_then(|id| http::HeaderValue::from_str(id).ok());
        Caller {
            identity,
            header,
            features_said: AtomicBool::new(false),
            implies_grpc_defaults: convention.implies_grpc_defaults(),
            fields: convention.remembers_fields().then(ReceivedFields::default),
        }
    }
}

/// Who may call, and how much one peer may make us hold.
pub struct Guard {
    /// `inbound.allow`; `None` admits any peer of the CA.
    allow: Option<HashSet<String>>,
    limits: InboundLimits,
    /// Open connections per peer address.
    connections: Mutex<HashMap<IpAddr, u32>>,
    /// Set while connections are being refused, so a flood is logged once.
    refusing: AtomicBool,
    /// Calls at the local app over all peers, against `inbound.limits.maxCallsToApp`.
    to_app: Arc<Gate>,
    /// The cap on one peer connection's calls at the app (`maxCallsPerPeer`).
    per_peer: usize,
    /// Set once a call was refused for a full cap, so overload is logged once.
    overloaded: AtomicBool,
    /// Set while TCP peers fail their TLS handshake, so a run of them is logged once.
    tls_failing: AtomicBool,
}

/// Whether a caller may call, and if not, what it is told.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied(String),
}

impl Guard {
    /// `budget_calls` is the memory budget's cap on calls in flight, the default for
    /// `maxCallsToApp`.
    pub fn new(allow: Option<&[String]>, limits: &InboundLimits, budget_calls: usize) -> Guard {
        let to_app = limits.max_calls_to_app.unwrap_or(budget_calls).max(1);
        let labels = crate::metrics::upstream("inbound");
        Guard {
            allow: allow.map(|list| list.iter().cloned().collect()),
            limits: limits.clone(),
            connections: Mutex::new(HashMap::new()),
            refusing: AtomicBool::new(false),
            to_app: Gate::with_gauges(
                to_app,
                metrics().calls_in_flight.get_or_create(&labels).clone(),
                metrics()
                    .calls_in_flight_limit
                    .get_or_create(&labels)
                    .clone(),
            ),
            per_peer: limits.max_calls_per_peer.unwrap_or(to_app / 2).max(1),
            overloaded: AtomicBool::new(false),
            tls_failing: AtomicBool::new(false),
        }
    }

    /// A call's place at the app under the overall and its connection's cap; a refusal is
    /// counted and logged once, and the caller resets the stream as not processed.
    fn admit_call(&self, connection: &Arc<Gate>) -> Option<Permit> {
        match admit(&self.to_app, connection) {
            Ok(permit) => Some(permit),
            Err(full) => {
                let (limit, name, cap) = match full {
                    Full::Wide { limit } => ("calls_to_app", "maxCallsToApp", limit),
                    Full::Narrow { limit } => ("calls_per_peer", "maxCallsPerPeer", limit),
                };
                count_limited(limit);
                if !self.overloaded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(cap, "calls to the local app at inbound.limits.{name}: more are refused as not processed (the caller's sidecar retries them on another pod); logged once, counted in locality_sidecar_inbound_limited_total");
                }
                None
            }
        }
    }

    /// Decides on a caller by the identity its certificate carries.
    pub fn authorize(&self, identity: Option<&str>) -> Verdict {
        match (&self.allow, identity) {
            (None, _) => Verdict::Allowed,
            (Some(allow), Some(identity)) if allow.contains(identity) => Verdict::Allowed,
            (Some(_), identity) => Verdict::Denied(format!(
                "caller identity {} is not allowed by inbound.allow",
                identity.unwrap_or("(none: its certificate carries no SPIFFE ID)")
            )),
        }
    }

    /// Admits one more connection from `peer`, or `None` when it has the most allowed.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<PeerConnection> {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let open = connections.entry(peer).or_insert(0);
        if *open >= self.limits.max_connections_per_peer {
            return None;
        }
        *open += 1;
        Some(PeerConnection {
            guard: self.clone(),
            peer,
        })
    }
}

/// One admitted peer connection; leaving gives its place back.
struct PeerConnection {
    guard: Arc<Guard>,
    peer: IpAddr,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        let mut connections = self
            .guard
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(open) = connections.get_mut(&self.peer) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                connections.remove(&self.peer);
            }
        }
    }
}

fn count_limited(limit: &'static str) {
    metrics()
        .inbound_limited
        .get_or_create(&LimitLabels { limit })
        .inc();
}
/// The longest a draining connection stays open after its GOAWAY for requests the peer sent
/// before the GOAWAY reached it (see [`serve_connection`]); normally two round trips.
const MAX_SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("local app at {address}: {reason}")]
pub struct AppError {
    address: SocketAddr,
    reason: String,
    failure: AppFailure,
}

/// What the app's failure to answer a call means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppFailure {
    /// The app certainly did not process the call: safe to retry anywhere.
    NotProcessed,
    /// The stream was reset after the app may have started on it: the app's own word, so the
    /// caller sees the status gRPC's HTTP/2 mapping gives it, and no retry of work done.
    Reset(h2::Reason),
    /// The connection to the app failed under the call: a transport loss (UNAVAILABLE).
    Lost,
}

/// Classifies an error the app's h2 connection reports for a stream before its response.
///
/// The app did not process a stream when it refused it (REFUSED_STREAM, RFC 9113 §8.7) or when
/// the stream's id is above the last-stream-id of a GOAWAY it sent (§6.8, whatever its error
/// code). h2 reports the latter, and only the latter, as a GOAWAY error from the remote: for
/// streams at or below that id it reports the connection's later end (an I/O error) instead.
/// A REFUSED_STREAM that h2 itself produced is not the app's promise, so only remote ones count.
fn classify(error: &h2::Error) -> AppFailure {
    let refused = error.is_reset() && error.reason() == Some(h2::Reason::REFUSED_STREAM);
    if error.is_remote() && (error.is_go_away() || refused) {
        return AppFailure::NotProcessed;
    }
    match error.reason() {
        Some(reason) if error.is_reset() => AppFailure::Reset(reason),
        // I/O errors, a GOAWAY h2 sent over the app's protocol error, misuse: the connection.
        _ => AppFailure::Lost,
    }
}

struct AppConnection {
    sender: AppSender,
    /// Set when the connection's task ends: the app closed it or it failed.
    closed: Arc<AtomicBool>,
    /// The connection's task, stopped with the client.
    driver: AbortHandle,
}

/// Connections to the local app that calls are spread over, in turn.
///
/// More than one, because an app reads each HTTP/2 connection in one loop (hyper, Kestrel and
/// grpc-go alike): with every call on one connection the app's frame work runs on one core.
const APP_CONNECTIONS: usize = 2;

/// The most connections opened to the app. Past the first [`APP_CONNECTIONS`], one is opened
/// only when every open connection carries as many calls as the app allows on one (its
/// `SETTINGS_MAX_CONCURRENT_STREAMS`; Kestrel's default is 100): otherwise h2 would queue the
/// next call until one of those streams ended, which for a fan-out of long server streams is
/// never. 64 of Kestrel's connections hold 6,400 calls; beyond that calls do wait in h2.
const MAX_APP_CONNECTIONS: usize = 64;

/// The most calls put on one connection to the app, whatever it allows. Until the app's
/// SETTINGS frame arrives h2 assumes no limit, so a burst of calls at an app's start would all
/// land on the first connections and queue there; 100 is what RFC 9113 (section 6.5.2) asks
/// servers to allow at least, and Kestrel's default.
const CALLS_PER_APP_CONNECTION: usize = 100;

/// One connection to the app: opened on first use, re-opened when it drops.
#[derive(Default)]
struct AppSlot {
    live: Mutex<Option<AppConnection>>,
    connecting: tokio::sync::Mutex<()>,
    /// Calls that chose this slot and have not ended (see [`OnAppConnection`]). Counted from
    /// the choice on, so a burst that arrives while the connection is being opened is spread
    /// by the same count as later calls.
    in_flight: Arc<AtomicUsize>,
}

/// A slot's open connection, as a call uses it.
struct Pooled {
    sender: AppSender,
    closed: Arc<AtomicBool>,
}

impl AppSlot {
    /// The slot's connection, unless it is known to be closed.
    fn current(&self) -> Option<Pooled> {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        live.as_ref()
            .filter(|connection| !connection.closed.load(Ordering::Acquire))
            .map(|connection| Pooled {
                sender: connection.sender.clone(),
                closed: connection.closed.clone(),
            })
    }

    fn state(&self) -> SlotState {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        match live.as_ref() {
            Some(connection) if !connection.closed.load(Ordering::Acquire) => SlotState {
                open: true,
                in_flight,
                limit: connection
                    .sender
                    .current_max_send_streams()
                    .min(CALLS_PER_APP_CONNECTION),
            },
            _ => SlotState {
                open: false,
                in_flight,
                limit: CALLS_PER_APP_CONNECTION,
            },
        }
    }
}

/// What choosing a connection for a call needs to know of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotState {
    /// Whether a connection is open (else a call there opens one, or waits for the one being
    /// opened).
    open: bool,
    /// Calls that chose the slot and have not ended.
    in_flight: usize,
    /// The calls the app allows on one connection, at most [`CALLS_PER_APP_CONNECTION`].
    limit: usize,
}

impl SlotState {
    fn has_room(self) -> bool {
        self.in_flight < self.limit
    }
}

/// The slot (of `slots`) a call goes to, given its `turn` among the first [`APP_CONNECTIONS`]:
/// that slot while it has room; else an open connection with room; else the first slot not
/// open with room (a connection being opened, or a new one); else (every slot full) the turn's
/// slot, where h2 holds the call until a stream ends. Returned with the state it was chosen by.
/// `state_of` is asked about the turn's slot first and about the others only when it is full,
/// so a steady call looks at one slot, once.
fn choose_app_slot(
    slots: usize,
    turn: usize,
    state_of: impl Fn(usize) -> SlotState,
) -> (usize, SlotState) {
    let turn = turn % APP_CONNECTIONS.min(slots);
    let turn_state = state_of(turn);
    if turn_state.has_room() {
        return (turn, turn_state);
    }
    let mut first_unopened = None;
    for index in 0..slots {
        let state = state_of(index);
        if !state.has_room() {
            continue;
        }
        if state.open {
            return (index, state);
        }
        first_unopened.get_or_insert((index, state));
    }
    first_unopened.unwrap_or((turn, turn_state))
}

/// Held by a call for as long as it uses its connection to the app, so that connection's
/// count of calls in flight stays true.
struct OnAppConnection(Arc<AtomicUsize>);

impl OnAppConnection {
    fn new(in_flight: Arc<AtomicUsize>) -> OnAppConnection {
        in_flight.fetch_add(1, Ordering::Relaxed);
        OnAppConnection(in_flight)
    }

    /// Counts a call on a slot that has fewer than `limit`, in one step: with several runtime
    /// threads, two calls must not both take a slot's last room.
    fn within(in_flight: &Arc<AtomicUsize>, limit: usize) -> Option<OnAppConnection> {
        in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |calls| {
                (calls < limit).then_some(calls + 1)
            })
            .ok()
            .map(|_| OnAppConnection(in_flight.clone()))
    }
}

impl Drop for OnAppConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Multiplexed h2c connections to the local app ([`APP_CONNECTIONS`] in turn, up to
/// [`MAX_APP_CONNECTIONS`] when the app's per-connection stream limit is reached), each
/// re-opened when it drops (app restart).
///
/// It speaks h2 directly rather than through hyper's client: a call then needs no hand-off to a
/// connection task and no extra task waiting for the response, which profiles showed per call.
pub struct AppClient {
    address: SocketAddr,
    /// `address` as the `:authority` of every forwarded call, parsed once.
    authority: Authority,
    slots: Box<[AppSlot]>,
    /// Whose turn it is among the first [`APP_CONNECTIONS`] slots.
    next_slot: AtomicUsize,
    /// Set while calls are being rejected, so a restarting app is logged once, not per call.
    rejecting: AtomicBool,
    /// Set once a connection past the first [`APP_CONNECTIONS`] has been opened, so that is
    /// logged once.
    spread_further: AtomicBool,
}

impl Drop for AppClient {
    /// A replaced connection's task ends on its own (it is closed or going away); the current
    /// ones would idle on until the process exits.
    fn drop(&mut self) {
        for slot in self.slots.iter_mut() {
            let live = slot
                .live
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(connection) = live {
                connection.driver.abort();
            }
        }
    }
}

impl AppClient {
    pub fn new(address: SocketAddr) -> Result<AppClient, http::uri::InvalidUri> {
        Ok(AppClient {
            address,
            authority: Authority::try_from(address.to_string().as_str())?,
            slots: (0..MAX_APP_CONNECTIONS)
                .map(|_| AppSlot::default())
                .collect(),
            next_slot: AtomicUsize::new(0),
            rejecting: AtomicBool::new(false),
            spread_further: AtomicBool::new(false),
        })
    }

    /// The local app's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The slot the next call goes to (see [`choose_app_slot`]), counted there from now on.
    fn next_slot(&self) -> (&AppSlot, OnAppConnection) {
        let turn = self.next_slot.fetch_add(1, Ordering::Relaxed);
        // Looked at again only when another thread took the chosen slot's last room meanwhile.
        let mut tries = self.slots.len();
        loop {
            let (index, state) =
                choose_app_slot(self.slots.len(), turn, |index| self.slots[index].state());
            let chosen = &self.slots[index];
            tries -= 1;
            if !state.has_room() || tries == 0 {
                // Every slot is full: the call waits in h2 on this one for a stream to end.
                return (chosen, OnAppConnection::new(chosen.in_flight.clone()));
            }
            if let Some(counted) = OnAppConnection::within(&chosen.in_flight, state.limit) {
                if index >= APP_CONNECTIONS && !self.spread_further.load(Ordering::Relaxed) {
                    self.note_spread_further();
                }
                return (chosen, counted);
            }
        }
    }

    /// Logs, once, that calls now go past the first connections.
    fn note_spread_further(&self) {
        if !self.spread_further.swap(true, Ordering::Relaxed) {
            let limit = self.slots[0].state().limit;
            tracing::info!(app = %self.address, calls_per_connection = limit, most_connections = MAX_APP_CONNECTIONS, "the local app's connections are at its stream limit; opening more");
        }
    }

    async fn sender(&self, slot: &AppSlot) -> Result<Pooled, AppError> {
        if let Some(pooled) = slot.current() {
            return Ok(pooled);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(pooled) = slot.current() {
            return Ok(pooled);
        }
        let failed = |reason: String| AppError {
            address: self.address,
            reason,
            failure: AppFailure::NotProcessed,
        };
        let stream = tokio::net::TcpStream::connect(self.address)
            .await
            .map_err(|e| failed(format!("connect failed: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = crate::wire::h2_settings::client()
            .handshake::<_, Bytes>(crate::wire::batched_io::BatchedWrites::new(stream))
            .await
            .map_err(|e| failed(format!("HTTP/2 handshake failed: {e}")))?;
        let address = self.address;
        let closed = Arc::new(AtomicBool::new(false));
        let closed_when_done = closed.clone();
        let driver = tokio::spawn(async move {
            match connection.await {
                Ok(()) => tracing::debug!(%address, "local app closed its connection"),
                Err(error) => tracing::info!(%address, %error, "connection to the local app lost"),
            }
            closed_when_done.store(true, Ordering::Release);
        });
        *slot
            .live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(AppConnection {
            sender: sender.clone(),
            closed: closed.clone(),
            driver: driver.abort_handle(),
        });
        Ok(Pooled { sender, closed })
    }

    /// Opens the call's stream to the app and queues its headers. Nothing has reached the app
    /// when this fails. A connection that turns out dead or going away (the app restarted, or
    /// sent GOAWAY) is replaced once. The call holds the returned [`OnAppConnection`] until
    /// it ends.
    async fn open(
        &self,
        request: Request<()>,
        end_of_stream: bool,
    ) -> Result<
        (
            h2::client::ResponseFuture,
            h2::SendStream<Bytes>,
            OnAppConnection,
        ),
        AppError,
    > {
        let failed = |error: h2::Error| AppError {
            address: self.address,
            reason: error.to_string(),
            failure: AppFailure::NotProcessed,
        };
        let (slot, on_connection) = self.next_slot();
        let pooled = self.sender(slot).await?;
        let mut ready = match pooled.sender.ready().await {
            Ok(ready) => ready,
            Err(_) => {
                // Marked rather than removed: a call racing this one may already have put a
                // new connection in its place.
                pooled.closed.store(true, Ordering::Release);
                let pooled = self.sender(slot).await?;
                pooled.sender.ready().await.map_err(failed)?
            }
        };
        let (response, send) = ready.send_request(request, end_of_stream).map_err(failed)?;
        Ok((response, send, on_connection))
    }

    /// The app's response headers.
    async fn response(
        &self,
        response: h2::client::ResponseFuture,
    ) -> Result<Response<h2::RecvStream>, AppError> {
        response.await.map_err(|error| AppError {
            address: self.address,
            failure: classify(&error),
            reason: error.to_string(),
        })
    }

    /// Notes a call the app did not take; logs only the first of a run.
    fn note_rejected(&self, error: &AppError) {
        if !self.rejecting.swap(true, Ordering::AcqRel) {
            tracing::warn!(app = %self.address, reason = %error.reason, "local app not taking calls; rejecting them so callers retry elsewhere");
        }
    }

    /// Notes a call the app answered; ends a run of rejections.
    fn note_answered(&self) {
        // A load first: the common case stays a plain read, not a write to a shared line.
        if self.rejecting.load(Ordering::Acquire) && self.rejecting.swap(false, Ordering::AcqRel) {
            tracing::info!(app = %self.address, "local app taking calls again");
        }
    }
}

/// Accepts peer connections until `shutdown` fires (or the endpoint closes). Then it refuses new
/// connections, has every open one send GOAWAY and finish its calls, and after `drain` stops
/// the connections still open.
pub async fn serve(
    endpoint: quinn::Endpoint,
    app: Arc<AppClient>,
    guard: Arc<Guard>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let stop = shutdown.clone();
    let mut peers = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    let remote = incoming.remote_address();
                    match guard.admit(remote.ip()) {
                        Some(admitted) => {
                            guard.refusing.store(false, Ordering::Release);
                            peers.spawn(serve_peer(incoming, app.clone(), guard.clone(), admitted, stop.clone()));
                        }
                        None => {
                            count_limited("connections_per_peer");
                            if !guard.refusing.swap(true, Ordering::AcqRel) {
                                tracing::warn!(%remote, limit = guard.limits.max_connections_per_peer, "peer has too many connections open; refusing more (inbound.limits.maxConnectionsPerPeer)");
                            }
                            incoming.refuse();
                        }
                    }
                }
                None => return,
            },
            Some(ended) = peers.join_next() => report_panic(ended),
            // A dropped sender also means stop: nobody is left to say otherwise.
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }

    tracing::info!(connections = peers.len(), grace = ?drain, "inbound draining: refusing new peer connections");
    let deadline = Instant::now() + drain;
    let mut refused = 0u64;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                // Refused outright, so the peer moves on at once instead of timing out.
                Some(incoming) => {
                    refused += 1;
                    incoming.refuse();
                }
                None => break,
            },
            ended = peers.join_next() => match ended {
                Some(ended) => report_panic(ended),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(connections = peers.len(), grace = ?drain, "inbound drain time is up; closing connections with calls still open");
                break;
            }
        }
    }
    peers.shutdown().await;
    tracing::info!(refused, "inbound drained");
}

fn report_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(error) = ended {
        if error.is_panic() {
            tracing::error!(%error, "peer connection task panicked");
        }
    }
}

/// One peer connection: the handshake, its calls, and the metrics of how it ended.
async fn serve_peer(
    incoming: quinn::Incoming,
    app: Arc<AppClient>,
    guard: Arc<Guard>,
    admitted: PeerConnection,
    shutdown: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            // Most often a peer without a certificate from our CA: worth seeing in logs.
            tracing::info!(%remote, reason = %crate::wire::quic::describe_connection_error(&error), "refused peer connection");
            return;
        }
    };
    let direction = DirectionLabels {
        direction: "inbound",
    };
    metrics()
        .quic_connections_opened
        .get_or_create(&direction)
        .inc();
    let _open = OpenPeerConnection::new("inbound", "h3");
    let watched = connection.clone();
    let identity = crate::wire::quic::peer_identity(&connection).map(Arc::<str>::from);
    serve_connection(connection, app, guard, identity, shutdown).await;
    drop(admitted);
    if let Some(reason) = watched.close_reason() {
        let clean = matches!(&reason, quinn::ConnectionError::ApplicationClosed(close) if close.error_code.into_inner() == u64::from(H3_NO_ERROR) || close.error_code.into_inner() == 0)
            || matches!(reason, quinn::ConnectionError::LocallyClosed);
        if !clean {
            metrics()
                .quic_connections_lost
                .get_or_create(&direction)
                .inc();
        }
    }
}

/// Serves one peer connection's calls until the peer closes it, or, once `shutdown` fires,
/// until its calls have finished after our GOAWAY; then closes it cleanly.
async fn serve_connection(
    connection: quinn::Connection,
    app: Arc<AppClient>,
    guard: Arc<Guard>,
    identity: Option<Arc<str>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let caller = Arc::new(Caller::new(
        identity,
        crate::wire::quic::hop_convention(&connection),
    ));
    let remote = connection.remote_address();
    let limits = &guard.limits;
    let budget = HeaderBudget::new(
        u64::from(limits.max_header_bytes),
        u64::from(limits.max_pending_header_bytes),
    );
    let stops = StopWatches::new();
    let mut h3_connection = match h3::server::builder()
        .send_grease(false)
        // Advertised in SETTINGS; enforced before buffering by the guarded connection.
        .max_field_section_size(u64::from(limits.max_header_bytes))
        .build::<_, Bytes>(GuardedConnection::new(
            connection.clone(),
            budget,
            stops.clone(),
        ))
        .await
    {
        Ok(h3_connection) => h3_connection,
        Err(error) => {
            tracing::info!(%remote, %error, "HTTP/3 setup with peer failed");
            return;
        }
    };
    // This connection's calls at the app, against `maxCallsPerPeer`.
    let per_peer = Gate::new(guard.per_peer);
    // Every call holds a receiver: `closed()` resolves once none is open. Cheaper per call than
    // a JoinSet, which would wake this task each time a call ends.
    let (calls, _) = watch::channel(());
    // Set once our GOAWAY is out: from then on the connection ends when its calls are done.
    let mut settled: Option<Instant> = None;
    loop {
        let resolver = tokio::select! {
            accepted = h3_connection.accept() => match accepted {
                Ok(Some(resolver)) => resolver,
                Ok(None) => break,
                Err(error) => {
                    if !error.is_h3_no_error() {
                        tracing::debug!(%remote, %error, "peer connection ended");
                    }
                    break;
                }
            },
            // The wait's result borrows the channel: dropped here, before the GOAWAY is awaited.
            _ = async { shutdown.wait_for(|stop| *stop).await.map(drop) }, if settled.is_none() => {
                // Requests above the last one accepted are now refused by h3 with
                // H3_REQUEST_REJECTED, which the caller retries elsewhere.
                if let Err(error) = h3_connection.shutdown(0).await {
                    tracing::debug!(%remote, %error, "GOAWAY to peer failed");
                    break;
                }
                // A request the peer sent before our GOAWAY reached it may still be on its
                // way: stay open about two round trips so it is refused rather than lost.
                settled = Some(Instant::now() + (connection.rtt() * 2).min(MAX_SETTLE));
                continue;
            },
            _ = calls_done(&calls, settled), if settled.is_some() => break,
        };
        let app = app.clone();
        let guard = guard.clone();
        let caller = caller.clone();
        let open = calls.subscribe();
        let per_peer = per_peer.clone();
        let header_timeout = guard.limits.header_timeout;
        let stops = stops.clone();
        // Boxed: the call's future is 5 KiB, which a task would copy on spawn and again at its
        // end (see `h2_settings::BoxingExecutor`).
        tokio::spawn(Box::pin(async move {
            // Dropped unresolved when the headers take too long: the stream is stopped.
            match tokio::time::timeout(header_timeout, resolver.resolve_request()).await {
                Ok(Ok((request, stream))) => {
                    let stopped = stops.take(stream.id());
                    let (mut send, recv) = stream.split();
                    let Some(_place) = guard.admit_call(&per_peer) else {
                        // Not processed: the caller's sidecar retries it on another pod.
                        send.reset(H3Code::H3_REQUEST_REJECTED);
                        drop(open);
                        return;
                    };
                    let body = H3RecvBody::new(recv);
                    let send = H3Responder::new(send, stopped, caller.implies_grpc_defaults);
                    handle_call(request, send, body, &app, &guard, &caller).await;
                }
                Ok(Err(error)) => tracing::debug!(%remote, %error, "peer request unreadable"),
                Err(_) => {
                    count_limited("header_timeout");
                    tracing::debug!(%remote, "peer request headers incomplete in time; stream dropped");
                }
            }
            drop(open);
        }));
    }
    if settled.is_some() {
        connection.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"shutdown");
    }
}

/// Accepts peer connections on the HTTP/2 fallback's TCP listener until `shutdown` fires, under
/// the same [`Guard`] as QUIC (the per-peer connection cap counts both transports). Then it
/// stops accepting, has every open connection send GOAWAY and finish its calls, and after
/// `drain` stops the connections still open.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Arc<AppClient>,
    guard: Arc<Guard>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stop = shutdown.clone();
    let mut peers = JoinSet::new();
    // Set while accept fails (out of file descriptors, say), so the run is logged once.
    let mut accept_failing = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    accept_failing = false;
                    match guard.admit(remote.ip()) {
                        Some(admitted) => {
                            guard.refusing.store(false, Ordering::Release);
                            let peer = serve_tcp_peer(stream, remote, acceptor.clone(), app.clone(), guard.clone(), admitted, stop.clone());
                            peers.spawn(peer);
                        }
                        None => {
                            count_limited("connections_per_peer");
                            if !guard.refusing.swap(true, Ordering::AcqRel) {
                                tracing::warn!(%remote, limit = guard.limits.max_connections_per_peer, "peer has too many connections open; refusing more (inbound.limits.maxConnectionsPerPeer)");
                            }
                            // Closed at once, so the peer moves on instead of timing out.
                            drop(stream);
                        }
                    }
                }
                Err(error) => {
                    if !std::mem::replace(&mut accept_failing, true) {
                        tracing::warn!(%error, "accepting HTTP/2 fallback connections failing");
                    }
                    // Without a pause a persistent failure (no file descriptors) would spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(ended) = peers.join_next() => report_panic(ended),
            // The wait's result borrows the channel: dropped here, not held across the arms.
            _ = async { shutdown.wait_for(|stop| *stop).await.map(drop) } => break,
        }
    }
    // The listener closes here: new connections are refused by the kernel at once.
    drop(listener);
    tracing::info!(connections = peers.len(), grace = ?drain, "inbound HTTP/2 fallback draining");
    let deadline = Instant::now() + drain;
    loop {
        tokio::select! {
            ended = peers.join_next() => match ended {
                Some(ended) => report_panic(ended),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(connections = peers.len(), grace = ?drain, "inbound HTTP/2 fallback drain time is up; closing connections with calls still open");
                break;
            }
        }
    }
    peers.shutdown().await;
    tracing::info!("inbound HTTP/2 fallback drained");
}

/// One peer connection on the HTTP/2 fallback: TLS (bounded by the header timeout, as a
/// connection that never completes its handshake holds a place), HTTP/2 setup, then its calls.
async fn serve_tcp_peer(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Arc<AppClient>,
    guard: Arc<Guard>,
    admitted: PeerConnection,
    shutdown: watch::Receiver<bool>,
) {
    // Calls are small messages: sent at once, not held back for a fuller segment.
    let _ = stream.set_nodelay(true);
    let limits = &guard.limits;
    let tls = match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            if guard.tls_failing.swap(false, Ordering::AcqRel) {
                tracing::info!(%remote, "HTTP/2 fallback TLS handshakes succeeding again");
            }
            tls
        }
        Ok(Err(error)) => {
            // Most often a peer without a certificate from our CA: worth seeing in logs, once.
            if !guard.tls_failing.swap(true, Ordering::AcqRel) {
                tracing::info!(%remote, %error, "refused peer connection (HTTP/2 fallback TLS handshake failed); further failures are not logged until one succeeds");
            }
            return;
        }
        Err(_) => {
            count_limited("header_timeout");
            tracing::debug!(%remote, "peer did not complete its TLS handshake in time");
            return;
        }
    };
    let identity = crate::wire::h2_peer::tls_peer_identity(tls.get_ref().1).map(Arc::<str>::from);
    let builder = crate::wire::h2_peer::server_builder(
        limits.max_concurrent_streams,
        limits.max_header_bytes,
    );
    let connection = match tokio::time::timeout(limits.header_timeout, builder.handshake(tls)).await
    {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%remote, %error, "HTTP/2 setup with peer failed");
            return;
        }
        Err(_) => {
            count_limited("header_timeout");
            tracing::debug!(%remote, "peer did not set up HTTP/2 in time");
            return;
        }
    };
    let _open = OpenPeerConnection::new("inbound", "h2");
    serve_h2_connection(connection, remote, app, guard, identity, shutdown).await;
    drop(admitted);
}

type H2ServerConnection =
    h2::server::Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Bytes>;

/// Serves one HTTP/2 peer connection's calls until the peer closes it, or, once `shutdown`
/// fires, until its calls have finished after our GOAWAY. Polling `accept` is also what drives
/// the connection, so the loop runs until h2 reports the connection's end.
async fn serve_h2_connection(
    mut connection: H2ServerConnection,
    remote: SocketAddr,
    app: Arc<AppClient>,
    guard: Arc<Guard>,
    identity: Option<Arc<str>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let caller = Arc::new(Caller::new(identity, HopConvention::PlainH3));
    let per_peer = Gate::new(guard.per_peer);
    let mut draining = false;
    loop {
        let (request, mut respond) = tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok(call)) => call,
                Some(Err(error)) => {
                    if is_header_abuse(&error) {
                        // h2 ended the connection over a header block past every limit (a
                        // CONTINUATION flood, say); one it merely refused (431) never shows here.
                        count_limited("header_size");
                    }
                    if !error.is_go_away() || error.reason() != Some(h2::Reason::NO_ERROR) {
                        tracing::debug!(%remote, %error, "peer connection ended");
                    }
                    break;
                }
                None => break,
            },
            _ = async { shutdown.wait_for(|stop| *stop).await.map(drop) }, if !draining => {
                // h2 sends GOAWAY, refuses streams above the last one it accepted (the caller
                // retries those elsewhere) and ends the connection once the open ones finish.
                connection.graceful_shutdown();
                draining = true;
                continue;
            },
        };
        // Request headers are complete here; their size is bounded by max_header_list_size.
        let Some(place) = guard.admit_call(&per_peer) else {
            // Not processed: the caller's sidecar retries it on another pod.
            respond.send_reset(peer_reason(H3Code::H3_REQUEST_REJECTED));
            continue;
        };
        let app = app.clone();
        let guard = guard.clone();
        let caller = caller.clone();
        // Boxed like the QUIC path's calls: the future is large.
        tokio::spawn(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let request = Request::from_parts(parts, ());
            let send = H2Responder::new(respond);
            let body = H2PeerRecvBody::new(body);
            handle_call(request, send, body, &app, &guard, &caller).await;
            drop(place);
        }));
    }
}

/// Whether h2 itself ended a peer's connection over its header blocks.
fn is_header_abuse(error: &h2::Error) -> bool {
    error.is_library()
        && error.is_go_away()
        && matches!(
            error.reason(),
            Some(h2::Reason::ENHANCE_YOUR_CALM | h2::Reason::COMPRESSION_ERROR)
        )
}

/// Resolves once `settle` has passed and no call is open.
async fn calls_done(calls: &watch::Sender<()>, settle: Option<Instant>) {
    if let Some(settle) = settle {
        tokio::time::sleep_until(settle).await;
    }
    calls.closed().await;
}

/// The answering half of a peer's call, on either transport: its response headers, then the
/// body, trailers or a reset through [`H3Send`] (reset codes are HTTP/3's on both).
trait PeerResponder: H3Send {
    /// Sends the response headers; `end_of_stream` when nothing follows (trailers-only).
    fn send_response(
        &mut self,
        response: Response<()>,
        end_of_stream: bool,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send;
}

/// A peer's call over HTTP/3: the answering half of its stream, and the watch that tells
/// when the peer stops wanting the answer (h3 keeps the QUIC stream to itself).
struct H3Responder {
    stream: PeerSend,
    stop: PeerStop,
    /// Everything sent on this stream goes with gRPC's usual fields implied (see
    /// [`grpc::imply_grpc_defaults`]), whoever wrote it: the app or this sidecar.
    implies_grpc_defaults: bool,
}

impl H3Responder {
    fn new(
        stream: PeerSend,
        stopped: Option<StopWatch>,
        implies_grpc_defaults: bool,
    ) -> H3Responder {
        H3Responder {
            stream,
            stop: PeerStop {
                watch: stopped,
                stopped: false,
            },
            implies_grpc_defaults,
        }
    }
}

/// The peer's STOP_SENDING on a response stream, seen once.
struct PeerStop {
    watch: Option<StopWatch>,
    stopped: bool,
}

impl PeerStop {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.stopped {
            return Poll::Ready(());
        }
        let Some(watch) = &mut self.watch else {
            return Poll::Pending;
        };
        let stop = std::task::ready!(watch.as_mut().poll(cx));
        tracing::debug!(?stop, "peer cancelled its call");
        // The watch is done; polling it again would be a bug.
        self.watch = None;
        self.stopped = true;
        Poll::Ready(())
    }
}

/// Why a write to a peer's HTTP/3 stream did not happen.
#[derive(Debug, thiserror::Error)]
enum ResponderError {
    #[error(transparent)]
    Stream(#[from] h3::error::StreamError),
    #[error("the peer cancelled the stream")]
    PeerCancelled,
}

/// `write`, unless the peer stops the stream first. quinn reports a write blocked by the
/// connection's flow control before it looks at the stream's STOP_SENDING, and the caller's
/// sidecar may never lift that block once every stream it reads from is stopped: a write that
/// waited for it alone would keep the app's call open for good.
async fn unless_stopped(
    stop: &mut PeerStop,
    write: impl std::future::Future<Output = Result<(), h3::error::StreamError>>,
) -> Result<(), ResponderError> {
    match unless_cancelled_by(write, |cx| stop.poll(cx)).await {
        Some(written) => written.map_err(ResponderError::from),
        None => Err(ResponderError::PeerCancelled),
    }
}

impl H3Send for H3Responder {
    type Error = ResponderError;

    fn send_data(
        &mut self,
        data: Bytes,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        let write = H3Send::send_data(&mut self.stream, data);
        unless_stopped(&mut self.stop, write)
    }

    fn send_trailers(
        &mut self,
        mut trailers: http::HeaderMap,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        if self.implies_grpc_defaults {
            grpc::imply_ok_status(&mut trailers);
        }
        let write = H3Send::send_trailers(&mut self.stream, trailers);
        unless_stopped(&mut self.stop, write)
    }

    fn finish(&mut self) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        let write = H3Send::finish(&mut self.stream);
        unless_stopped(&mut self.stop, write)
    }

    fn reset(&mut self, code: H3Code) {
        H3Send::reset(&mut self.stream, code)
    }

    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.stop.poll(cx)
    }
}

impl PeerResponder for H3Responder {
    fn send_response(
        &mut self,
        mut response: Response<()>,
        _end_of_stream: bool,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send {
        if self.implies_grpc_defaults {
            grpc::imply_grpc_defaults(response.headers_mut());
        }
        // HTTP/3 ends a stream with a separate FIN, which the caller's `finish` sends.
        let write = self.stream.send_response(response);
        unless_stopped(&mut self.stop, write)
    }
}

/// A peer's call on the HTTP/2 fallback: the response handle until the headers are out, then
/// the flow-controlled body stream.
struct H2Responder {
    respond: h2::server::SendResponse<Bytes>,
    body: Option<H2PeerSend>,
    /// The response ended with its headers (trailers-only): `finish` has nothing left to do.
    ended: bool,
}

impl H2Responder {
    fn new(respond: h2::server::SendResponse<Bytes>) -> H2Responder {
        H2Responder {
            respond,
            body: None,
            ended: false,
        }
    }
}

/// A body or trailers before the response headers: a bug of ours, reported to the peer as an
/// internal error rather than a panic.
fn no_headers_yet() -> h2::Error {
    h2::Error::from(h2::Reason::INTERNAL_ERROR)
}

impl H3Send for H2Responder {
    type Error = h2::Error;

    async fn send_data(&mut self, data: Bytes) -> Result<(), h2::Error> {
        match &mut self.body {
            Some(body) => body.send_data(data).await,
            None => Err(no_headers_yet()),
        }
    }

    async fn send_trailers(&mut self, trailers: http::HeaderMap) -> Result<(), h2::Error> {
        match &mut self.body {
            Some(body) => body.send_trailers(trailers).await,
            None => Err(no_headers_yet()),
        }
    }

    async fn finish(&mut self) -> Result<(), h2::Error> {
        if self.ended {
            return Ok(());
        }
        match &mut self.body {
            Some(body) => body.finish().await,
            None => Err(no_headers_yet()),
        }
    }

    fn reset(&mut self, code: H3Code) {
        self.ended = true;
        match &mut self.body {
            Some(body) => body.reset(code),
            None => self.respond.send_reset(peer_reason(code)),
        }
    }

    fn poll_cancelled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.body {
            Some(body) => body.poll_cancelled(cx),
            // A reset from the peer, or the connection's end.
            None => self.respond.poll_reset(cx).map(drop),
        }
    }
}

impl PeerResponder for H2Responder {
    fn send_response(
        &mut self,
        response: Response<()>,
        end_of_stream: bool,
    ) -> impl std::future::Future<Output = Result<(), h2::Error>> + Send {
        let sent = self.respond.send_response(response, end_of_stream);
        let sent = sent.map(|stream| {
            self.body = Some(H2PeerSend::new(stream));
            self.ended = end_of_stream;
        });
        async move { sent }
    }
}

/// Forwards one peer call to the app and its answer back, whichever transport it came over.
async fn handle_call<S, B>(
    request: Request<()>,
    mut send: S,
    request_body: B,
    app: &AppClient,
    guard: &Guard,
    caller: &Caller,
) where
    S: PeerResponder,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::error::Error + Send + 'static,
{
    // First, before any answer: the caller's sidecar takes any answer as proof that this
    // request's head, and the slots it defined, were read.
    let (mut head, ()) = request.into_parts();
    let remembered_path = match caller
        .fields
        .as_ref()
        .map(|fields| fields.restore(&head.uri, &mut head.headers))
    {
        None => None,
        Some(Ok(path)) => Some(path),
        Some(Err(error)) => {
            tracing::debug!(%error, "peer request head unreadable");
            send_status(&mut send, Code::Internal, &error.to_string()).await;
            return;
        }
    };
    if let Verdict::Denied(message) = guard.authorize(caller.identity.as_deref()) {
        metrics().inbound_denied.inc();
        metrics()
            .inbound_calls
            .get_or_create(&StatusLabels {
                status: "PERMISSION_DENIED",
            })
            .inc();
        send_status(&mut send, Code::PermissionDenied, &message).await;
        return;
    }
    let arrived = Instant::now();
    let deadline = head
        .headers
        .get(grpc::GRPC_TIMEOUT)
        .and_then(grpc::parse_timeout)
        .map(|timeout| arrived + timeout);
    let mut parts = head;
    strip_hop_by_hop(&mut parts.headers);
    if caller.implies_grpc_defaults {
        grpc::restore_grpc_defaults(&mut parts.headers);
    }
    grpc::require_trailers(&mut parts.headers);
    set_peer_identity(&mut parts.headers, caller.header.clone());
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(app.authority.clone());
    uri.path_and_query = Some(remembered_path.unwrap_or_else(|| {
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    }));
    let uri = match Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(error) => {
            let message = format!("cannot forward {}: {error}", parts.uri);
            send_status(&mut send, Code::Internal, &message).await;
            return;
        }
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_2;
    let app_request = Request::from_parts(parts, ());

    // The app normally honours grpc-timeout itself; enforcing it here as well makes sure the app
    // sees a cancellation (RST_STREAM) when the deadline passes, even for a call whose client
    // side has already finished sending and so cannot be reset by the peer any more.
    //
    // Boxed: the exchange is most of the call's state, and unboxed it would be copied whole into
    // this future and again into the deadline's timeout (see `outbound::call::AttemptStep::run`).
    let exchange = Box::pin(async {
        let Some(opened) = unless_cancelled(&mut send, app.open(app_request, false)).await else {
            return;
        };
        let (response, mut app_send, _on_app_connection) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                reject(&mut send, app, error).await;
                return;
            }
        };
        // The request body flows to the app while the response is awaited. The pump stops,
        // resetting the app's stream, once this exchange ends or is abandoned.
        let (_stop_request, stop) = oneshot::channel::<()>();
        start_pump(Box::pin(async move {
            tokio::select! {
                end = pump_into_h2(request_body, &mut app_send) => {
                    if !matches!(end, PumpEnd::Complete) {
                        tracing::debug!(?end, "request to the app ended early");
                    }
                }
                _ = stop => app_send.send_reset(h2::Reason::CANCEL),
            }
        }))
        .await;
        let Some(response) = unless_cancelled(&mut send, app.response(response)).await else {
            return;
        };
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                reject(&mut send, app, error).await;
                return;
            }
        };
        app.note_answered();
        metrics().count_inbound_forwarded();
        let (mut parts, body) = response.into_parts();
        // The caller's sidecar serves the app over HTTP/2 and dates the response itself when it
        // carries no Date (RFC 9110, section 6.6.1: a forwarding recipient appends one), from the
        // same kind of once-a-second clock the app used. Not sending the app's saves encoding,
        // compressing and decoding one header per call on the hop.
        parts.headers.remove(http::header::DATE);
        if !caller.features_said.swap(true, Ordering::Relaxed) {
            parts
                .headers
                .insert(grpc::FEATURES, grpc::FEATURE_RESTORES_TE);
        }
        let body = H2RecvBody::new(body);
        let trailers_only = body.is_end_stream();
        let response = Response::from_parts(parts, ());
        if let Err(error) = send.send_response(response, trailers_only).await {
            tracing::debug!(%error, "peer went away before the response");
            return;
        }
        if trailers_only {
            let _ = send.finish().await;
            return;
        }
        // A response cut off with no reason from the app means its connection died: a transport
        // loss, which the caller sees as UNAVAILABLE (an app reset keeps its own code).
        match pump_body(body, &mut send, grpc::H3_APP_CONNECTION_LOST).await {
            PumpEnd::Complete => {}
            end => tracing::debug!(?end, "response to peer ended early"),
        }
    });
    match deadline {
        None => exchange.await,
        Some(at) => {
            if tokio::time::timeout_at(at, exchange).await.is_err() {
                send.reset(H3Code::H3_REQUEST_CANCELLED);
            }
        }
    }
}

/// Awaits `work` unless the peer cancels the call first (`None`): the app's call is then
/// dropped, which resets its stream at the app. Counted once per cancelled call.
async fn unless_cancelled<S: H3Send, T>(
    send: &mut S,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let outcome = unless_cancelled_by(work, |cx| send.poll_cancelled(cx)).await;
    if outcome.is_none() {
        metrics()
            .inbound_calls
            .get_or_create(&StatusLabels {
                status: "CANCELLED",
            })
            .inc();
    }
    outcome
}

/// Puts the caller's verified identity in [`PEER_IDENTITY_HEADER`], replacing whatever the caller
/// sent under that name (every copy), so the app can trust it.
fn set_peer_identity(headers: &mut http::HeaderMap, identity: Option<http::HeaderValue>) {
    headers.remove(PEER_IDENTITY_NAME);
    if let Some(value) = identity {
        headers.insert(PEER_IDENTITY_NAME, value);
    }
}

/// Answers a call the app did not take. One it never processed is reset with
/// H3_REQUEST_REJECTED, which tells the caller it is safe to retry elsewhere (gRFC G2) and its
/// sidecar does so transparently. One the app reset is reset with the matching HTTP/3 code, so
/// the caller sees the status gRPC maps the app's reset to; a lost connection is UNAVAILABLE.
async fn reject<S: PeerResponder>(send: &mut S, app: &AppClient, error: AppError) {
    let status = match error.failure {
        AppFailure::NotProcessed => {
            app.note_rejected(&error);
            send.reset(H3Code::H3_REQUEST_REJECTED);
            "REJECTED"
        }
        AppFailure::Reset(reason) => {
            tracing::debug!(app = %app.address, %reason, "local app reset a call before answering");
            send.reset(grpc::h3_code_for_h2_reason(reason));
            "RESET"
        }
        AppFailure::Lost => {
            send_status(send, Code::Unavailable, &error.to_string()).await;
            "UNAVAILABLE"
        }
    };
    metrics()
        .inbound_calls
        .get_or_create(&StatusLabels { status })
        .inc();
}

async fn send_status<S: PeerResponder>(send: &mut S, code: Code, message: &str) {
    let response = grpc::trailers_only_response(code, message, ());
    if send.send_response(response, true).await.is_ok() {
        let _ = send.finish().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An empty SETTINGS frame: the server's connection preface.
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

    fn go_away(last_stream_id: u8, reason: h2::Reason) -> Vec<u8> {
        let mut frame = vec![0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, last_stream_id];
        frame.extend_from_slice(&u32::from(reason).to_be_bytes());
        frame
    }

    fn reset_stream_1(reason: h2::Reason) -> Vec<u8> {
        let mut frame = vec![0, 0, 4, 3, 0, 0, 0, 0, 1];
        frame.extend_from_slice(&u32::from(reason).to_be_bytes());
        frame
    }

    /// Sends one request (stream 1) through a real h2 client to a scripted app that answers
    /// with `frames` and then, if `hang_up`, closes the connection; returns how h2 reports the
    /// stream's end to the caller.
    async fn stream_error(frames: Vec<u8>, hang_up: bool) -> h2::Error {
        let (client_io, mut app_io) = tokio::io::duplex(1 << 16);
        let (mut sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let request = Request::post("http://app/echo.Echo/Get").body(()).unwrap();
        let (response, _body) = sender.send_request(request, false).unwrap();
        app_io.write_all(&SETTINGS).await.unwrap();
        // Answered only once the request is there: h2 takes a reset of a stream it has not
        // opened yet as a protocol error.
        read_until_headers(&mut app_io).await;
        app_io.write_all(&frames).await.unwrap();
        // Kept open unless the script hangs up: an end of the connection is news of its own.
        let app_io = (!hang_up).then_some(app_io);
        let error = response.await.unwrap_err();
        drop(app_io);
        error
    }

    /// Reads the client's preface and frames up to its first HEADERS frame.
    async fn read_until_headers(io: &mut tokio::io::DuplexStream) {
        let mut preface = [0; 24];
        io.read_exact(&mut preface).await.unwrap();
        loop {
            let mut header = [0; 9];
            io.read_exact(&mut header).await.unwrap();
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0; length];
            io.read_exact(&mut payload).await.unwrap();
            if header[3] == 1 {
                return;
            }
        }
    }

    #[tokio::test]
    async fn streams_above_the_apps_goaway_were_not_processed() {
        let error = stream_error(go_away(0, h2::Reason::NO_ERROR), false).await;
        assert_eq!(classify(&error), AppFailure::NotProcessed, "{error:?}");
        // Whatever the GOAWAY's error code (RFC 9113 §6.8).
        let error = stream_error(go_away(0, h2::Reason::INTERNAL_ERROR), false).await;
        assert_eq!(classify(&error), AppFailure::NotProcessed, "{error:?}");
    }

    #[tokio::test]
    async fn a_stream_within_the_goaway_that_then_loses_its_connection_was_maybe_processed() {
        let error = stream_error(go_away(1, h2::Reason::NO_ERROR), true).await;
        assert_eq!(classify(&error), AppFailure::Lost, "{error:?}");
    }

    #[tokio::test]
    async fn a_stream_the_app_refused_was_not_processed() {
        let error = stream_error(reset_stream_1(h2::Reason::REFUSED_STREAM), false).await;
        assert_eq!(classify(&error), AppFailure::NotProcessed, "{error:?}");
    }

    #[tokio::test]
    async fn other_resets_from_the_app_keep_their_reason() {
        for reason in [
            h2::Reason::CANCEL,
            h2::Reason::INTERNAL_ERROR,
            h2::Reason::ENHANCE_YOUR_CALM,
        ] {
            let error = stream_error(reset_stream_1(reason), false).await;
            assert_eq!(classify(&error), AppFailure::Reset(reason), "{error:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_that_just_ends_is_a_transport_loss() {
        let error = stream_error(Vec::new(), true).await;
        assert_eq!(classify(&error), AppFailure::Lost, "{error:?}");
    }

    #[test]
    fn only_listed_identities_are_allowed_when_a_list_is_given() {
        let limits = InboundLimits::default();
        let open = Guard::new(None, &limits, 100);
        assert_eq!(open.authorize(None), Verdict::Allowed);
        let frontend = "spiffe://td/ns/default/sa/frontend".to_string();
        let listed = Guard::new(Some(std::slice::from_ref(&frontend)), &limits, 100);
        assert_eq!(listed.authorize(Some(&frontend)), Verdict::Allowed);
        let Verdict::Denied(message) = listed.authorize(Some("spiffe://td/ns/default/sa/other"))
        else {
            panic!("an unlisted caller must be denied");
        };
        assert!(
            message.contains("spiffe://td/ns/default/sa/other"),
            "{message}"
        );
        assert!(matches!(listed.authorize(None), Verdict::Denied(_)));
    }

    #[test]
    fn the_identity_header_is_ours_alone() {
        let mut headers = http::HeaderMap::new();
        headers.append(PEER_IDENTITY_HEADER, "spiffe://forged/a".parse().unwrap());
        headers.append(PEER_IDENTITY_HEADER, "spiffe://forged/b".parse().unwrap());
        let caller = Caller::new(
            Some(Arc::from("spiffe://td/ns/x/sa/y")),
            HopConvention::PlainH3,
        );
        set_peer_identity(&mut headers, caller.header.clone());
        let values: Vec<_> = headers.get_all(PEER_IDENTITY_HEADER).iter().collect();
        assert_eq!(values, vec!["spiffe://td/ns/x/sa/y"]);
        set_peer_identity(&mut headers, None);
        assert!(headers.get(PEER_IDENTITY_HEADER).is_none());
    }

    #[test]
    fn one_peer_connection_gets_at_most_its_share_of_the_app() {
        let limits = InboundLimits {
            max_calls_to_app: Some(4),
            ..InboundLimits::default()
        };
        let guard = Guard::new(None, &limits, 100);
        let (hot, other) = (Gate::new(guard.per_peer), Gate::new(guard.per_peer));
        let held: Vec<Permit> = (0..2).filter_map(|_| guard.admit_call(&hot)).collect();
        assert_eq!(held.len(), 2, "half of 4");
        assert!(
            guard.admit_call(&hot).is_none(),
            "the hot caller is over its share"
        );
        let others: Vec<Permit> = (0..3).filter_map(|_| guard.admit_call(&other)).collect();
        assert_eq!(
            others.len(),
            2,
            "the others still get in, up to the overall cap"
        );
        drop(held);
        assert!(guard.admit_call(&hot).is_some());
    }

    #[test]
    fn connections_per_peer_are_capped_and_given_back() {
        let limits = InboundLimits {
            max_connections_per_peer: 2,
            ..InboundLimits::default()
        };
        let guard = Arc::new(Guard::new(None, &limits, 100));
        let peer = IpAddr::from([127, 0, 0, 9]);
        let first = guard.admit(peer).unwrap();
        let _second = guard.admit(peer).unwrap();
        assert!(guard.admit(peer).is_none());
        assert!(
            guard.admit(IpAddr::from([127, 0, 0, 10])).is_some(),
            "another peer"
        );
        drop(first);
        assert!(guard.admit(peer).is_some());
    }

    /// A real h2 client and server over an in-memory pipe: the server's end of each request
    /// the client sends, as the HTTP/2 fallback's inbound receives it.
    async fn h2_pair() -> (
        h2::client::SendRequest<Bytes>,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(h2::server::handshake(server_io));
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        (sender, server.await.unwrap().unwrap())
    }

    /// An h2c app on a real socket that answers every request with 200, counts the connections
    /// it accepted, and closes all of them when told to (as a restarting app would).
    async fn counting_app() -> (
        SocketAddr,
        Arc<std::sync::atomic::AtomicUsize>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let (hang_up, hung_up) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut hung_up = hung_up.clone();
                tokio::spawn(async move {
                    let mut connection = h2::server::handshake(stream).await.unwrap();
                    loop {
                        tokio::select! {
                            request = connection.accept() => match request {
                                Some(Ok((_, mut respond))) => {
                                    let _ = respond.send_response(Response::new(()), true);
                                }
                                _ => break,
                            },
                            _ = hung_up.wait_for(|hung_up| *hung_up) => break,
                        }
                    }
                });
            }
        });
        (address, accepted, hang_up)
    }

    #[tokio::test]
    async fn calls_to_the_app_are_spread_over_its_connections_and_each_is_reopened_after_a_loss() {
        let (address, accepted, hang_up) = counting_app().await;
        let app = AppClient::new(address).unwrap();
        let call = || async {
            let request = Request::post(format!("http://{address}/echo.Echo/Unary"))
                .body(())
                .unwrap();
            let (response, _, _) = app.open(request, true).await.unwrap();
            app.response(response).await.unwrap().status()
        };
        for _ in 0..(3 * APP_CONNECTIONS) {
            assert_eq!(call().await, http::StatusCode::OK);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), APP_CONNECTIONS);

        // The app closes every connection; once the client has seen each one end, every slot
        // opens a new one.
        hang_up.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), async {
            while app.slots.iter().any(|slot| slot.current().is_some()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the client sees the app's connections end");
        hang_up.send_replace(false);
        for _ in 0..(3 * APP_CONNECTIONS) {
            assert_eq!(call().await, http::StatusCode::OK);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2 * APP_CONNECTIONS);
    }

    fn open_with(in_flight: usize) -> SlotState {
        SlotState {
            open: true,
            in_flight,
            limit: 100,
        }
    }

    fn unopened_with(in_flight: usize) -> SlotState {
        SlotState {
            open: false,
            in_flight,
            limit: 100,
        }
    }

    #[test]
    fn a_call_takes_its_turn_among_the_first_connections_while_that_one_has_room() {
        let states = [open_with(10), open_with(99), unopened_with(0)];
        let chosen = |turn| choose_app_slot(states.len(), turn, |index| states[index]).0;
        assert_eq!((chosen(0), chosen(1), chosen(2), chosen(3)), (0, 1, 0, 1));
        // A connection not opened yet (or lost) has room while fewer calls wait for it than
        // one connection takes: the call opens it, or waits for the one being opened.
        let states = [unopened_with(99), open_with(3)];
        assert_eq!(choose_app_slot(2, 0, |index| states[index]).0, 0);
    }

    #[test]
    fn a_call_whose_connection_is_full_goes_to_one_with_room_and_only_then_to_a_new_one() {
        let states = [
            open_with(100),
            open_with(100),
            unopened_with(0),
            open_with(40),
        ];
        assert_eq!(choose_app_slot(states.len(), 0, |index| states[index]).0, 3);
        let states = [open_with(100), open_with(100), unopened_with(0)];
        assert_eq!(choose_app_slot(states.len(), 1, |index| states[index]).0, 2);
        // A burst while the connections are still being opened: the first two take 100 each,
        // the next one the rest.
        let states = [unopened_with(100), unopened_with(100), unopened_with(7)];
        assert_eq!(choose_app_slot(states.len(), 0, |index| states[index]).0, 2);
        // Every slot full: the call waits its turn in h2.
        let states = [open_with(100), open_with(100), open_with(100)];
        assert_eq!(choose_app_slot(states.len(), 1, |index| states[index]).0, 1);
        // An app that allows no calls right now gets none put on that connection.
        let states = [
            SlotState {
                open: true,
                in_flight: 0,
                limit: 0,
            },
            open_with(0),
        ];
        assert_eq!(choose_app_slot(states.len(), 0, |index| states[index]).0, 1);
    }

    #[test]
    fn a_slot_counts_calls_only_up_to_its_limit_and_each_ended_call_frees_one() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let first = OnAppConnection::within(&in_flight, 2).expect("room for the first");
        let second = OnAppConnection::within(&in_flight, 2).expect("room for the second");
        assert!(OnAppConnection::within(&in_flight, 2).is_none());
        assert_eq!(in_flight.load(Ordering::Relaxed), 2);
        drop(first);
        let third = OnAppConnection::within(&in_flight, 2).expect("room once one ended");
        drop((second, third));
        assert_eq!(in_flight.load(Ordering::Relaxed), 0);
        // Eight threads racing for 100 places get exactly 100 of them.
        let taken: Vec<OnAppConnection> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        (0..50)
                            .filter_map(|_| OnAppConnection::within(&in_flight, 100))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            racers
                .into_iter()
                .flat_map(|racer| racer.join().expect("racer"))
                .collect()
        });
        assert_eq!(taken.len(), 100);
        assert_eq!(in_flight.load(Ordering::Relaxed), 100);
    }

    #[tokio::test]
    async fn calls_past_the_apps_stream_limit_on_every_connection_get_a_new_connection_instead_of_waiting(
    ) {
        // An app that allows 100 streams per connection (Kestrel's default) and holds every call
        // open, as a fan-out of long server streams does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let arrived = arrived.clone();
                tokio::spawn(async move {
                    let mut connection = h2::server::Builder::new()
                        .max_concurrent_streams(100)
                        .handshake::<_, Bytes>(stream)
                        .await
                        .unwrap();
                    let mut held = Vec::new();
                    while let Some(Ok(call)) = connection.accept().await {
                        held.push(call);
                        let _ = arrived.send(());
                    }
                });
            }
        });
        let app = AppClient::new(address).unwrap();
        const CALLS: usize = 250;
        let mut calls = Vec::new();
        for _ in 0..CALLS {
            let request = Request::post(format!("http://{address}/echo.Echo/Subscribe"))
                .body(())
                .unwrap();
            calls.push(app.open(request, false).await.unwrap());
        }
        /// How many of the next `want` calls the app receives within 10 s.
        async fn reached(
            arrivals: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
            want: usize,
        ) -> usize {
            let mut reached = 0;
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                while reached < want && arrivals.recv().await.is_some() {
                    reached += 1;
                }
            })
            .await;
            reached
        }
        assert_eq!(
            reached(&mut arrivals, CALLS).await,
            CALLS,
            "calls that reached the app"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "connections the app accepted"
        );

        // Calls that end give their room back: the last 100 (25 on each of the first two
        // connections, 50 on the third) end, and the 150 after them fit on the same three.
        calls.truncate(CALLS - 100);
        for _ in 0..150 {
            let request = Request::post(format!("http://{address}/echo.Echo/Subscribe"))
                .body(())
                .unwrap();
            calls.push(app.open(request, false).await.unwrap());
        }
        assert_eq!(
            reached(&mut arrivals, 150).await,
            150,
            "later calls that reached the app"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "connections the app accepted"
        );
    }

    #[tokio::test]
    async fn a_call_refused_on_the_http2_fallback_reaches_the_caller_as_refused_stream() {
        let (sender, mut server) = h2_pair().await;
        let request = Request::post("https://peer/echo.Echo/Unary")
            .body(())
            .unwrap();
        let (response, _body) = sender
            .ready()
            .await
            .unwrap()
            .send_request(request, true)
            .unwrap();
        let (_, respond) = server.accept().await.unwrap().unwrap();
        H2Responder::new(respond).reset(H3Code::H3_REQUEST_REJECTED);
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let error = response.await.unwrap_err();
        assert!(error.is_remote(), "{error:?}");
        // What the caller's sidecar retries elsewhere, the call not having been processed.
        assert_eq!(error.reason(), Some(h2::Reason::REFUSED_STREAM));
    }

    #[tokio::test]
    async fn a_status_on_the_http2_fallback_is_one_trailers_only_headers_frame() {
        let (sender, mut server) = h2_pair().await;
        let request = Request::post("https://peer/echo.Echo/Unary")
            .body(())
            .unwrap();
        let (response, _body) = sender
            .ready()
            .await
            .unwrap()
            .send_request(request, true)
            .unwrap();
        let (_, respond) = server.accept().await.unwrap().unwrap();
        let mut send = H2Responder::new(respond);
        send_status(&mut send, Code::PermissionDenied, "not on the list").await;
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let response = response.await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "7");
        assert!(
            response.body().is_end_stream(),
            "nothing follows the headers"
        );
    }

    #[test]
    fn a_refusal_the_app_did_not_send_promises_nothing() {
        let local = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert_eq!(classify(&local), AppFailure::Lost);
    }
}
