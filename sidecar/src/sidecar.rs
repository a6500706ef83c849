//! Start-up and shutdown: validates everything and binds every socket before serving anything
//! (so a bad certificate or a port in use is one error and nothing half-started), then runs the
//! outbound listeners, the inbound QUIC listener and the admin listener until told to stop.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::admin::AdminState;
use crate::config::live::{LivePolicy, PolicyWatch};
use crate::config::Config;
use crate::endpoints;
use crate::endpoints::discovery::{self, DiscoveryError, ServiceRef};
use crate::endpoints::ranking::{spawn_ranking, Locality, LocalityWatch};
use crate::inbound::AppClient;
use crate::outbound::replay::{ReplayBudget, PER_PROCESS_LIMIT};
use crate::outbound::upstream::RetryThrottle;
use crate::outbound::upstream::Upstream;
use crate::wire::quic::{self, ConnectionPool, TransportError};
use crate::wire::tls::{TlsError, TlsMaterial};

/// How long open calls may run on after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

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

pub struct Running {
    pub bound: Bound,
    /// Publishes config changes that apply live (retry policy, outlier detection, tiers).
    pub policy: tokio::sync::watch::Sender<Arc<LivePolicy>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    admin: Arc<AdminState>,
    pool: Option<Arc<ConnectionPool>>,
    inbound: Option<quinn::Endpoint>,
    outbound_tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn bind_tcp(field: String, address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            field,
            address,
            source,
        })
}

/// Binds and starts everything the config describes.
pub async fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let tls = match &config.tls {
        Some(paths) => Some(TlsMaterial::load(paths)?),
        None => None,
    };
    let here = Locality::from_env();

    // Bind every socket before serving anything.
    let mut outbound_listeners = Vec::new();
    for (index, outbound) in config.outbound.iter().enumerate() {
        outbound_listeners
            .push(bind_tcp(format!("outbound[{index}].listen"), outbound.listen).await?);
    }
    let admin_listener = bind_tcp("admin.listen".to_string(), config.admin.listen).await?;
    let inbound = match (&config.inbound, &tls) {
        (Some(inbound), Some(tls)) => {
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls.quic_server_config()?));
            server.transport_config(quic::transport_config());
            let endpoint = quic::endpoint(inbound.listen, Some(server)).map_err(|source| {
                StartError::Transport {
                    field: "inbound.listen".to_string(),
                    source,
                }
            })?;
            Some((endpoint, inbound.forward))
        }
        _ => None,
    };

    let pool = match &tls {
        Some(tls) if !config.outbound.is_empty() => {
            Some(Arc::new(ConnectionPool::new(tls.quic_client_config()?)))
        }
        _ => None,
    };
    let kube = if config
        .outbound
        .iter()
        .any(|outbound| outbound.service.is_some())
    {
        Some(discovery::client(options.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    let locality = locality_watch(here, kube.clone());
    let (policy_sender, policy) =
        tokio::sync::watch::channel(Arc::new(LivePolicy::from_config(&config)));
    let tiers = tiers_of(&policy);
    let replay_budget = ReplayBudget::new(PER_PROCESS_LIMIT);
    crate::metrics::metrics().init_process();
    let mut upstreams = Vec::new();
    for outbound in &config.outbound {
        let source = match (&outbound.endpoints, &outbound.service, &kube) {
            (Some(list), _, _) => endpoints::static_endpoints(list),
            (None, Some(service), Some(client)) => discovery::watch_service(
                client.clone(),
                ServiceRef::parse(service, &pod_namespace(client)),
                zones_of(&locality),
            ),
            // Validation guarantees one of `endpoints` and `service`, and a client exists
            // whenever a service is named.
            _ => continue,
        };
        let Some(pool) = pool.clone() else {
            return Err(StartError::Unsupported {
                field: "tls".to_string(),
                message: "outbound upstreams need TLS".to_string(),
            });
        };
        let server_name = outbound.server_name();
        let authority = http::uri::Authority::try_from(server_name).map_err(|error| {
            StartError::Unsupported {
                field: "outbound[].serverName".to_string(),
                message: format!("{server_name:?} cannot be an HTTP authority: {error}"),
            }
        })?;
        crate::metrics::metrics().init_upstream(&outbound.upstream_name());
        upstreams.push(Arc::new(Upstream {
            name: outbound.upstream_name().into(),
            server_name: server_name.into(),
            authority,
            ranking: spawn_ranking(source, locality.0.clone(), tiers.clone()),
            pool,
            policy: policy.clone(),
            throttle: RetryThrottle::default(),
            replay_budget: replay_budget.clone(),
        }));
    }

    let applier = crate::config::live::Applier::new(config.clone(), policy_sender.clone());
    if let Some(path) = &options.config_path {
        crate::config::live::watch_file(path.clone(), applier.clone());
    }
    if let (Some(name), Some(client)) = (&options.configmap, &kube) {
        crate::config::live::watch_configmap(
            client.clone(),
            pod_namespace(client),
            name.clone(),
            applier,
        );
    }

    let (shutdown, shutdown_watch) = tokio::sync::watch::channel(false);
    let mut bound = Bound {
        outbound: Vec::new(),
        inbound: None,
        admin: admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                field: "admin.listen".to_string(),
                address: config.admin.listen,
                source,
            })?,
    };
    let mut outbound_tasks = Vec::new();
    for (listener, upstream) in outbound_listeners.into_iter().zip(&upstreams) {
        if let Ok(address) = listener.local_addr() {
            bound.outbound.push(address);
            tracing::info!(upstream = %upstream.name, %address, "outbound listener serving");
        }
        outbound_tasks.push(tokio::spawn(crate::outbound::serve(
            listener,
            upstream.clone(),
            shutdown_watch.clone(),
            DRAIN,
        )));
    }
    let inbound_endpoint = match inbound {
        Some((endpoint, forward)) => {
            bound.inbound = endpoint.local_addr().ok();
            tracing::info!(listen = ?bound.inbound, %forward, "inbound QUIC listener serving");
            let app = AppClient::new(forward).map_err(|error| StartError::Unsupported {
                field: "inbound.forward".to_string(),
                message: format!("{forward} cannot be an HTTP authority: {error}"),
            })?;
            tokio::spawn(crate::inbound::serve(endpoint.clone(), Arc::new(app)));
            Some(endpoint)
        }
        None => None,
    };
    let admin = Arc::new(AdminState {
        started: Default::default(),
        draining: Default::default(),
        upstreams: upstreams
            .iter()
            .map(|u| (u.name.clone(), u.ranking.clone()))
            .collect(),
    });
    tokio::spawn(crate::admin::serve(admin_listener, admin.clone()));
    admin.started.store(true, Ordering::Release);
    tracing::info!(admin = %bound.admin, "sidecar started");
    Ok(Running {
        bound,
        policy: policy_sender,
        shutdown,
        admin,
        pool,
        inbound: inbound_endpoint,
        outbound_tasks,
    })
}

/// Our locality, and the node zones it was derived from. Without Kubernetes both are fixed; with
/// it the zone of our node arrives from the Node watch (unless `ZONE` is set explicitly).
type LocalityParts = (LocalityWatch, Option<discovery::NodeZones>);

fn locality_watch(here: Locality, kube: Option<kube::Client>) -> LocalityParts {
    let Some(client) = kube else {
        return (tokio::sync::watch::channel(here).1, None);
    };
    let zones = discovery::watch_node_zones(client);
    let (sender, receiver) = tokio::sync::watch::channel(here.clone());
    let mut updates = zones.clone();
    tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            let zone = match (&here.zone, &here.node_name) {
                (Some(explicit), _) => Some(explicit.clone()),
                (None, Some(node)) => updates.borrow().get(node).cloned(),
                (None, None) => None,
            };
            sender.send_if_modified(|current| {
                let changed = current.zone != zone;
                current.zone = zone;
                changed
            });
        }
    });
    (receiver, Some(zones))
}

/// Our namespace: `POD_NAMESPACE` (downward API), else the kubeconfig's default.
fn pod_namespace(client: &kube::Client) -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string())
}

/// The tier order as its own watch, so rankings re-rank when live config changes it.
fn tiers_of(policy: &PolicyWatch) -> tokio::sync::watch::Receiver<Vec<crate::config::Tier>> {
    let mut updates = policy.clone();
    let (sender, receiver) = tokio::sync::watch::channel(updates.borrow_and_update().tiers.clone());
    tokio::spawn(async move {
        while updates.changed().await.is_ok() {
            let tiers = updates.borrow_and_update().tiers.clone();
            sender.send_if_modified(|current| {
                let changed = *current != tiers;
                *current = tiers;
                changed
            });
        }
    });
    receiver
}

fn zones_of(locality: &LocalityParts) -> discovery::NodeZones {
    match &locality.1 {
        Some(zones) => zones.clone(),
        None => tokio::sync::watch::channel(Default::default()).1,
    }
}

impl Running {
    /// Stops taking new calls, lets open ones finish (bounded), then closes QUIC connections so
    /// peers see a clean close rather than an idle timeout.
    pub async fn shutdown(self) {
        self.admin.draining.store(true, Ordering::Release);
        let _ = self.shutdown.send(true);
        for task in self.outbound_tasks {
            let _ = task.await;
        }
        if let Some(endpoint) = &self.inbound {
            endpoint.close(quinn::VarInt::from_u32(0x100), b"shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        if let Some(pool) = &self.pool {
            pool.close_all();
        }
    }
}
