//! Where an upstream's endpoints come from. A source publishes the current set on a watch
//! channel; everything downstream (ranking, picking, the admin view) only reads that channel, so
//! the static list used in development and Kubernetes discovery plug in the same way.

pub mod discovery;
pub mod ranking;
pub mod spill;

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
    /// The pod's Kubernetes service account as `<namespace>/<name>` (discovery only): with a
    /// trust domain it gives the identity the pod must present.
    pub service_account: Option<String>,
    /// The SPIFFE identity the peer must present; `None`: any peer of the CA.
    pub identity: Option<String>,
}

/// A snapshot of an upstream's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    /// False until the source has delivered its first complete view; `/ready` waits for it.
    pub synced: bool,
}

pub type EndpointWatch = watch::Receiver<Arc<EndpointSet>>;

/// Sets each endpoint's expected identity from its service account, in `trust_domain`, as
/// SPIFFE's Kubernetes form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
/// An endpoint without a known service account keeps what it had.
pub fn with_identities(mut set: EndpointSet, trust_domain: &str) -> EndpointSet {
    for endpoint in &mut set.endpoints {
        if let Some((namespace, account)) = endpoint
            .service_account
            .as_deref()
            .and_then(|account| account.split_once('/'))
        {
            endpoint.identity = Some(format!(
                "spiffe://{trust_domain}/ns/{namespace}/sa/{account}"
            ));
        }
    }
    set
}

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
            service_account: None,
            identity: entry.identity.clone(),
        })
        .collect();
    // The sender goes out of scope at once: readers keep the last value, which never changes.
    let (_sender, receiver) = watch::channel(Arc::new(EndpointSet {
        endpoints,
        synced: true,
    }));
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_come_from_service_accounts_in_the_trust_domain() {
        let endpoint = |account: Option<&str>| Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], 15443)),
            pod: "pod".to_string(),
            node: None,
            zone: None,
            host_ip: None,
            service_account: account.map(str::to_string),
            identity: None,
        };
        let set = EndpointSet {
            endpoints: vec![endpoint(Some("shop/echo")), endpoint(None)],
            synced: true,
        };
        let set = with_identities(set, "cluster.local");
        assert_eq!(
            set.endpoints[0].identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/echo")
        );
        assert_eq!(set.endpoints[1].identity, None);
    }
}
