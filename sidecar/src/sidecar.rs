//! Start-up and shutdown. [`start`] runs four steps, each one job:
//!
//! 1. **bind**: load TLS and bind every socket, and check everything else that can be wrong with
//!    the config, before anything runs, so a bad certificate or a port in use is one error and
//!    nothing half-started;
//! 2. **build**: the state calls share (Kubernetes client, live policy, QUIC pool, upstreams);
//! 3. **spawn**: the background tasks that keep that state current (our zone, the tier order,
//!    live config, pool eviction);
//! 4. **serve**: the outbound, inbound and admin listeners.
//!
//! Every long-lived task started here is held in [`Running`], and [`Running::shutdown`] stops
//! them all: listeners first (they drain their open calls), then everything else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::AdminState;
use crate::config::live::{Applier, LivePolicy, PolicyWatch};
use crate::config::{Config, LocalityConfig};
use crate::endpoints;
use crate::endpoints::discovery::{self, DiscoveryError, NodeZones, ServiceRef};
use crate::endpoints::ranking::{spawn_ranking, Locality};
use crate::inbound::AppClient;
use crate::outbound::replay::{ReplayBudget, PER_PROCESS_LIMIT};
use crate::outbound::upstream::admission_gate;
use crate::outbound::upstream::{RetryThrottle, Upstream, UpstreamMetrics};
use crate::wire::quic::{self, ConnectionPool, TransportError};
use crate::wire::tls::{LiveTls, TlsError};

/// How long open calls may run on after a shutdown signal. Kubernetes' default termination
/// grace period is 30 s; 10 s leaves the app's own shutdown most of it.
const DRAIN: Duration = Duration::from_secs(10);
/// Extra time for a listener to finish its own cleanup after its drain, before it is aborted.
const DRAIN_MARGIN: Duration = Duration::from_secs(1);
/// How long closed QUIC connections may take to tell their peers, so they see a clean close
/// rather than an idle timeout.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{field} {address}: {source}")]
    Bind {
        field: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{field}: {source}")]
    Transport {
        field: String,
        source: TransportError,
    },
    #[error("{field}: {message}")]
    Unsupported { field: String, message: String },
    #[error("Kubernetes discovery: {0}")]
    Discovery(#[from] DiscoveryError),
}

/// Start-up settings that come from the command line rather than the config file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Kubeconfig for discovery; `None` means `KUBECONFIG` or the in-cluster service account.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The config file to watch for live changes.
    pub config_path: Option<std::path::PathBuf>,
    /// A ConfigMap (in the pod's namespace) whose `config.yaml` to watch for live changes.
    pub configmap: Option<String>,
}

/// Addresses the running sidecar actually bound (port 0 in the config becomes a real port).
#[derive(Debug, Clone)]
pub struct Bound {
    pub outbound: Vec<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// A long-lived task and the name it is reported under if it panicked.
type Task = (&'static str, JoinHandle<()>);

pub struct Running {
    pub bound: Bound,
    /// Publishes config changes that apply live (retry policy, outlier detection, tiers).
    pub policy: watch::Sender<Arc<LivePolicy>>,
    shutdown: watch::Sender<bool>,
    admin: Arc<AdminState>,
    pool: Option<Arc<ConnectionPool>>,
    inbound: Option<quinn::Endpoint>,
    /// The outbound and inbound listeners: on shutdown they stop taking calls and drain.
    listeners: Vec<Task>,
    /// Tasks that keep state current, and the admin listener (so `/ready` keeps answering 503
    /// while the listeners drain): stopped once the listeners are done.
    background: Vec<Task>,
}

/// Binds and starts everything the config describes.
pub async fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let tls = match &config.tls {
        Some(paths) => Some(LiveTls::load(paths)?),
        None => None,
    };
    let sockets = bind(&config, tls.as_ref()).await?;
    let (built, feeds) = build(&config, &options, tls.as_ref()).await?;
    let (shutdown, stop) = watch::channel(false);
    let mut background = spawn(&config, &options, &built, feeds, &stop);
    if let Some(tls) = tls {
        // Certificates rotate under a running sidecar: new handshakes use the files' current set.
        let task = crate::wire::tls::watch(tls, stop.clone());
        background.push(("certificate watch", tokio::spawn(task)));
    }
    Ok(serve(sockets, built, background, shutdown, stop))
}

// ---- 1. bind ----------------------------------------------------------------------------------

/// Every socket the config names, bound, with the local app's client for the inbound role.
struct Sockets {
    outbound: Vec<TcpListener>,
    admin: TcpListener,
    inbound: Option<Inbound>,
    bound: Bound,
}

/// The inbound role's sockets: QUIC, and TCP at the same port number for the HTTP/2 fallback.
struct Inbound {
    endpoint: quinn::Endpoint,
    tcp: TcpListener,
    tcp_tls: Arc<rustls::ServerConfig>,
    app: AppClient,
    guard: crate::inbound::Guard,
}

async fn bind(config: &Config, tls: Option<&Arc<LiveTls>>) -> Result<Sockets, StartError> {
    let mut outbound = Vec::new();
    let mut outbound_addresses = Vec::new();
    for (index, entry) in config.outbound.iter().enumerate() {
        let field = format!("outbound[{index}].listen");
        let (listener, address) = bind_tcp(field, entry.listen).await?;
        outbound.push(listener);
        outbound_addresses.push(address);
    }
    let (admin, admin_address) = bind_tcp("admin.listen".to_string(), config.admin.listen).await?;
    let inbound = match (&config.inbound, tls) {
        (Some(inbound), Some(tls)) => {
            let app = AppClient::new(inbound.forward).map_err(|error| StartError::Unsupported {
                field: "inbound.forward".to_string(),
                message: format!("{} cannot be an HTTP authority: {error}", inbound.forward),
            })?;
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls.quic_server_config()?));
            server.transport_config(quic::server_transport_config(
                inbound.limits.max_concurrent_streams,
            ));
            let (endpoint, tcp) = bind_inbound(inbound.listen, server, tls).await?;
            let budget_calls = config
                .limits
                .resolve(
                    *crate::limits::CGROUP_LIMIT.get_or_init(crate::limits::cgroup_memory_limit),
                )
                .process;
            let guard =
                crate::inbound::Guard::new(inbound.allow.as_deref(), &inbound.limits, budget_calls);
            Some(Inbound {
                endpoint,
                tcp,
                tcp_tls: tls.tcp_server_config()?,
                app,
                guard,
            })
        }
        // Validation requires `tls` with `inbound`.
        _ => None,
    };
    let bound = Bound {
        outbound: outbound_addresses,
        inbound: inbound
            .as_ref()
            .and_then(|inbound| inbound.endpoint.local_addr().ok()),
        admin: admin_address,
    };
    Ok(Sockets {
        outbound,
        admin,
        inbound,
        bound,
    })
}

/// Tries for a port free for both UDP and TCP when the config leaves the choice to us (port 0).
const INBOUND_PORT_TRIES: usize = 16;

/// Binds the inbound QUIC endpoint at `listen` and the HTTP/2 fallback's TCP listener at the
/// same IP and port number, since a peer knows one address for both. With port 0 the port is
/// the one UDP got, and another is tried if TCP's is taken.
async fn bind_inbound(
    listen: SocketAddr,
    server: quinn::ServerConfig,
    tls: &Arc<LiveTls>,
) -> Result<(quinn::Endpoint, TcpListener), StartError> {
    let field = "inbound.listen";
    let mut tries = 0;
    loop {
        tries += 1;
        let endpoint = quic::server_endpoint(listen, server.clone(), tls.reset_secret()).map_err(
            |source| StartError::Transport {
                field: field.to_string(),
                source,
            },
        )?;
        let address = endpoint.local_addr().map_err(|source| StartError::Bind {
            field: field.to_string(),
            address: listen,
            source,
        })?;
        match TcpListener::bind(address).await {
            Ok(tcp) => return Ok((endpoint, tcp)),
            Err(error)
                if listen.port() == 0
                    && error.kind() == std::io::ErrorKind::AddrInUse
                    && tries < INBOUND_PORT_TRIES =>
            {
                endpoint.close(quinn::VarInt::from_u32(0), b"");
            }
            Err(source) => {
                return Err(StartError::Bind {
                    field: format!("{field} (TCP, the HTTP/2 fallback at the QUIC port's number)"),
                    address,
                    source,
                })
            }
        }
    }
}

async fn bind_tcp(
    field: String,
    address: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind {
        field: field.clone(),
        address,
        source,
    };
    let listener = TcpListener::bind(address).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

// ---- 2. build ---------------------------------------------------------------------------------

/// The state calls share.
struct Built {
    pool: Option<Arc<ConnectionPool>>,
    kube: Option<kube::Client>,
    policy: watch::Sender<Arc<LivePolicy>>,
    /// One per `config.outbound` entry, in the same order as its listener.
    upstreams: Vec<Arc<Upstream>>,
}

/// What the spawn step runs to keep the built state current.
struct Feeds {
    /// Set when our zone comes from the Node watch.
    zone: Option<ZoneFeed>,
    tiers: TiersFeed,
}

/// What an outbound entry's upstream is named and reached by, checked before anything starts.
struct Target {
    name: Arc<str>,
    server_name: Arc<str>,
    authority: http::uri::Authority,
}

async fn build(
    config: &Config,
    options: &StartOptions,
    tls: Option<&Arc<LiveTls>>,
) -> Result<(Built, Feeds), StartError> {
    // Everything that can fail comes before the first upstream, whose discovery and ranking
    // tasks start as it is made.
    let targets = targets(config)?;
    let pool = match tls {
        Some(tls) if !config.outbound.is_empty() => Some(Arc::new(ConnectionPool::new(
            tls.quic_client_config()?,
            tls.tcp_client_config()?,
        ))),
        _ => None,
    };
    let discovers = config.outbound.iter().any(|entry| entry.service.is_some());
    let kube = if discovers || options.configmap.is_some() {
        Some(discovery::client(options.kubeconfig.as_deref()).await?)
    } else {
        None
    };

    let here = Locality::from_env();
    let (locality, zones, zone_feed) = match kube.as_ref().filter(|_| discovers) {
        Some(client) => {
            let zones = discovery::watch_node_zones(client.clone());
            let (sender, locality) = watch::channel(here.clone());
            let feed = ZoneFeed {
                here,
                zones: zones.clone(),
                locality: sender,
            };
            (locality, zones, Some(feed))
        }
        // Both stay as they are: their senders are gone, which rankings read as "fixed".
        None => (
            watch::channel(here).1,
            watch::channel(Default::default()).1,
            None,
        ),
    };
    let (policy_sender, mut policy) = watch::channel(Arc::new(LivePolicy::from_config(config)));
    let (tiers_sender, tiers) = watch::channel(policy.borrow_and_update().locality.clone());
    let tiers_feed = TiersFeed {
        policy: policy.clone(),
        tiers: tiers_sender,
    };

    let replay_budget = ReplayBudget::new(PER_PROCESS_LIMIT);
    let limits = policy.borrow().limits;
    let process_admission = admission_gate("all", limits.process);
    tracing::info!(
        max_calls_in_flight = limits.process,
        max_calls_per_upstream = limits.per_upstream,
        max_streams_per_connection = limits.streams_per_connection,
        cgroup_memory_limit = ?crate::limits::CGROUP_LIMIT.get().copied().flatten(),
        "caps on calls in flight"
    );
    crate::metrics::metrics().init_process();
    let mut upstreams = Vec::new();
    for (entry, target) in config.outbound.iter().zip(targets) {
        let (Some(pool), Some(source)) =
            (pool.clone(), endpoint_source(entry, kube.as_ref(), &zones))
        else {
            // Unreachable: `targets` refused entries without TLS or an endpoint source, and a
            // client exists whenever a Service is named.
            return Err(StartError::Unsupported {
                field: format!("outbound[{}]", upstreams.len()),
                message: "no TLS or no endpoint source".to_string(),
            });
        };
        let ranking = spawn_ranking(&target.name, source, locality.clone(), tiers.clone());
        let admission = admission_gate(&target.name, limits.per_upstream);
        upstreams.push(Arc::new(Upstream {
            metrics: UpstreamMetrics::resolve(&target.name),
            name: target.name,
            server_name: target.server_name,
            authority: target.authority,
            ranking,
            pool,
            policy: policy.clone(),
            throttle: RetryThrottle::default(),
            replay_budget: replay_budget.clone(),
            admission,
            process_admission: process_admission.clone(),
        }));
    }
    let built = Built {
        pool,
        kube,
        policy: policy_sender,
        upstreams,
    };
    let feeds = Feeds {
        zone: zone_feed,
        tiers: tiers_feed,
    };
    Ok((built, feeds))
}

/// Checks every outbound entry can become an upstream: TLS, an endpoint source, and a server
/// name that is a valid `:authority`.
fn targets(config: &Config) -> Result<Vec<Target>, StartError> {
    config
        .outbound
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let unsupported = |field: &str, message: String| StartError::Unsupported {
                field: format!("outbound[{index}].{field}"),
                message,
            };
            if config.tls.is_none() {
                return Err(StartError::Unsupported {
                    field: "tls".to_string(),
                    message: "outbound upstreams need TLS".to_string(),
                });
            }
            if entry.endpoints.is_none() && entry.service.is_none() {
                return Err(unsupported(
                    "service",
                    "expected `service` or `endpoints`, found neither".to_string(),
                ));
            }
            let server_name = entry.server_name();
            let authority = http::uri::Authority::try_from(server_name).map_err(|error| {
                unsupported(
                    "serverName",
                    format!("{server_name:?} cannot be an HTTP authority: {error}"),
                )
            })?;
            Ok(Target {
                name: entry.upstream_name().into(),
                server_name: server_name.into(),
                authority,
            })
        })
        .collect()
}

/// Where an upstream's endpoints come from: its static list, or its Service's pods.
fn endpoint_source(
    entry: &crate::config::OutboundConfig,
    kube: Option<&kube::Client>,
    zones: &NodeZones,
) -> Option<endpoints::EndpointWatch> {
    match (&entry.endpoints, &entry.service, kube) {
        (Some(list), _, _) => Some(endpoints::static_endpoints(list)),
        (None, Some(service), Some(client)) => {
            let found = discovery::watch_service(
                client.clone(),
                ServiceRef::parse(service, &pod_namespace(client)),
                zones.clone(),
            );
            Some(match &entry.trust_domain {
                Some(domain) => expect_identities(found, domain.clone()),
                None => found,
            })
        }
        _ => None,
    }
}

/// The endpoint set of `found` with each pod's expected identity from its service account in
/// `trust_domain`. The task ends with the discovery feeding it.
fn expect_identities(
    mut found: endpoints::EndpointWatch,
    trust_domain: String,
) -> endpoints::EndpointWatch {
    let first = endpoints::with_identities((**found.borrow_and_update()).clone(), &trust_domain);
    let (sender, receiver) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        while found.changed().await.is_ok() {
            let next = (**found.borrow_and_update()).clone();
            if sender
                .send(Arc::new(endpoints::with_identities(next, &trust_domain)))
                .is_err()
            {
                return;
            }
        }
    });
    receiver
}

/// Our namespace: `POD_NAMESPACE` (downward API), else the kubeconfig's default.
fn pod_namespace(client: &kube::Client) -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string())
}

// ---- 3. spawn ---------------------------------------------------------------------------------

/// Keeps our locality's zone in step with our node's zone label.
struct ZoneFeed {
    here: Locality,
    zones: NodeZones,
    locality: watch::Sender<Locality>,
}

/// Keeps the locality settings (tier order, spill-over band), as their own watch, in step with
/// the live policy, so rankings re-rank only when they change rather than on every config change.
struct TiersFeed {
    policy: PolicyWatch,
    tiers: watch::Sender<LocalityConfig>,
}

fn spawn(
    config: &Config,
    options: &StartOptions,
    built: &Built,
    feeds: Feeds,
    stop: &watch::Receiver<bool>,
) -> Vec<Task> {
    let mut tasks: Vec<Task> = Vec::new();
    if let Some(feed) = feeds.zone {
        tasks.push(("zone feed", tokio::spawn(follow_zone(feed))));
    }
    tasks.push(("tiers feed", tokio::spawn(follow_tiers(feeds.tiers))));
    if let Some(pool) = &built.pool {
        let rankings = built
            .upstreams
            .iter()
            .map(|upstream| upstream.ranking.clone())
            .collect();
        let task = quic::evict_departed(pool.clone(), rankings, stop.clone());
        tasks.push(("pool eviction", tokio::spawn(task)));
    }

    // These two spawn their own tasks, which therefore outlive shutdown (see config::live).
    let applier = Applier::new(config.clone(), built.policy.clone());
    if let Some(path) = &options.config_path {
        crate::config::live::watch_file(path.clone(), applier.clone());
    }
    if let (Some(name), Some(client)) = (&options.configmap, &built.kube) {
        crate::config::live::watch_configmap(
            client.clone(),
            pod_namespace(client),
            name.clone(),
            applier,
        );
    }
    tasks
}

async fn follow_zone(mut feed: ZoneFeed) {
    while feed.zones.changed().await.is_ok() {
        let zone = zone_of(&feed.here, &feed.zones.borrow_and_update());
        feed.locality.send_if_modified(|current| {
            let changed = current.zone != zone;
            current.zone = zone;
            changed
        });
    }
}

/// Our zone: `ZONE` when set explicitly, else our node's zone label as the Node watch sees it.
fn zone_of(here: &Locality, zones: &BTreeMap<String, String>) -> Option<String> {
    match (&here.zone, &here.node_name) {
        (Some(explicit), _) => Some(explicit.clone()),
        (None, Some(node)) => zones.get(node).cloned(),
        (None, None) => None,
    }
}

async fn follow_tiers(mut feed: TiersFeed) {
    while feed.policy.changed().await.is_ok() {
        let tiers = feed.policy.borrow_and_update().locality.clone();
        feed.tiers.send_if_modified(|current| {
            let changed = *current != tiers;
            *current = tiers;
            changed
        });
    }
}

// ---- 4. serve ---------------------------------------------------------------------------------

fn serve(
    sockets: Sockets,
    built: Built,
    mut background: Vec<Task>,
    shutdown: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
) -> Running {
    let mut listeners: Vec<Task> = Vec::new();
    for ((listener, upstream), address) in sockets
        .outbound
        .into_iter()
        .zip(&built.upstreams)
        .zip(&sockets.bound.outbound)
    {
        tracing::info!(upstream = %upstream.name, %address, "outbound listener serving");
        let task = crate::outbound::serve(listener, upstream.clone(), stop.clone(), DRAIN);
        listeners.push(("outbound listener", tokio::spawn(task)));
    }
    let inbound = sockets.inbound.map(|inbound| {
        let Inbound {
            endpoint,
            tcp,
            tcp_tls,
            app,
            guard,
        } = inbound;
        tracing::info!(listen = ?sockets.bound.inbound, forward = %app.address(), "inbound QUIC listener serving, with the HTTP/2 fallback on TCP at the same port");
        let (app, guard) = (Arc::new(app), Arc::new(guard));
        let task = crate::inbound::serve(
            endpoint.clone(),
            app.clone(),
            guard.clone(),
            stop.clone(),
            DRAIN,
        );
        listeners.push(("inbound listener", tokio::spawn(task)));
        let task = crate::inbound::serve_tcp(tcp, tcp_tls, app, guard, stop.clone(), DRAIN);
        listeners.push(("inbound HTTP/2 fallback listener", tokio::spawn(task)));
        endpoint
    });
    let admin = Arc::new(AdminState {
        started: Default::default(),
        draining: Default::default(),
        upstreams: built
            .upstreams
            .iter()
            .map(|upstream| (upstream.name.clone(), upstream.ranking.clone()))
            .collect(),
        policy: built.policy.subscribe(),
        pool: built.pool.clone(),
    });
    let task = crate::admin::serve(sockets.admin, admin.clone());
    background.push(("admin listener", tokio::spawn(task)));
    admin.started.store(true, Ordering::Release);
    tracing::info!(admin = %sockets.bound.admin, "sidecar started");
    Running {
        bound: sockets.bound,
        policy: built.policy,
        shutdown,
        admin,
        pool: built.pool,
        inbound,
        listeners,
        background,
    }
}

impl Running {
    /// Stops taking new calls, lets open ones finish (bounded by [`DRAIN`]), closes QUIC
    /// connections so peers see a clean close rather than an idle timeout, then stops every
    /// other task.
    pub async fn shutdown(self) {
        // From here on `/ready` answers 503, so Kubernetes stops sending new work our way.
        self.admin.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);

        // The listeners drain side by side, so the whole drain takes DRAIN, not DRAIN each.
        let aborts: Vec<_> = self
            .listeners
            .iter()
            .map(|(_, handle)| handle.abort_handle())
            .collect();
        let drained = futures::future::join_all(self.listeners.into_iter().map(join));
        if tokio::time::timeout(DRAIN + DRAIN_MARGIN, drained)
            .await
            .is_err()
        {
            tracing::warn!(grace = ?DRAIN, "listeners still busy after the drain; stopping them");
            aborts.iter().for_each(|abort| abort.abort());
        }

        if let Some(endpoint) = &self.inbound {
            endpoint.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"shutdown");
            let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
        }
        if let Some(pool) = &self.pool {
            pool.close_all();
        }
        for (_, handle) in &self.background {
            handle.abort();
        }
        futures::future::join_all(self.background.into_iter().map(join)).await;
    }
}

/// HTTP/3's "no error" code (RFC 9114): a deliberate, clean close.
const H3_NO_ERROR: u32 = 0x100;

/// Waits for a task to end, reporting a panic (an abort is how shutdown stops it, not news).
async fn join((name, handle): Task) {
    if let Err(error) = handle.await {
        if error.is_panic() {
            tracing::error!(task = name, %error, "task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locality(node: Option<&str>, zone: Option<&str>) -> Locality {
        Locality {
            node_name: node.map(str::to_string),
            host_ip: None,
            zone: zone.map(str::to_string),
        }
    }

    #[test]
    fn zone_comes_from_our_node_unless_set_explicitly() {
        let zones: BTreeMap<String, String> = [("node-a".to_string(), "z1".to_string())].into();
        assert_eq!(
            zone_of(&locality(Some("node-a"), None), &zones).as_deref(),
            Some("z1")
        );
        assert_eq!(
            zone_of(&locality(Some("node-a"), Some("z9")), &zones).as_deref(),
            Some("z9")
        );
        assert_eq!(zone_of(&locality(Some("node-b"), None), &zones), None);
        assert_eq!(zone_of(&locality(None, None), &zones), None);
    }
}
