//! Where an upstream's endpoints come from. A source publishes the current set on a watch
//! channel; everything downstream (ranking, picking, the admin view) only reads that channel, so
//! the static list used in development and Kubernetes discovery plug in the same way.

pub mod discovery;
pub mod ranking;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::StaticEndpoint;

/// One upstream sidecar that can take calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The peer sidecar's QUIC address.
    pub address: SocketAddr,
    /// Pod name (or the address when the source has no pods).
    pub pod: String,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// The node's IP as the pod reports it (`status.hostIP`).
    pub host_ip: Option<IpAddr>,
}

/// A snapshot of an upstream's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    /// False until the source has delivered its first complete view; `/ready` waits for it.
    pub synced: bool,
}

pub type EndpointWatch = watch::Receiver<Arc<EndpointSet>>;

/// A fixed list from the config file: synced from the start and never changing.
pub fn static_endpoints(list: &[StaticEndpoint]) -> EndpointWatch {
    let endpoints = list
        .iter()
        .map(|entry| Endpoint {
            address: entry.address,
            pod: entry
                .pod
                .clone()
                .unwrap_or_else(|| entry.address.to_string()),
            node: entry.node.clone(),
            zone: entry.zone.clone(),
            host_ip: None,
        })
        .collect();
    // The sender goes out of scope at once: readers keep the last value, which never changes.
    let (_sender, receiver) = watch::channel(Arc::new(EndpointSet {
        endpoints,
        synced: true,
    }));
    receiver
}
