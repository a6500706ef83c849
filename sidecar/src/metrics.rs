//! Prometheus metrics, served at the admin listener's `/metrics`. One process-wide registry:
//! every component records into it through [`metrics()`] without threading handles around.
//!
//! Names follow Prometheus conventions: `locality_sidecar_` prefix, `_total` on counters, units
//! in names (`_seconds`), and label values drawn from small fixed sets (status names, tiers) or
//! from configuration (upstream names); method names are capped (see [`Metrics::method_label`]).

mod exposition;

pub use exposition::{negotiate, Format};

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub upstream: Arc<str>,
    pub method: Arc<str>,
    pub status: &'static str,
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub upstream: Arc<str>,
    pub tier: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub upstream: Arc<str>,
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub upstream: Arc<str>,
    /// The cap that was full: `process` or `upstream`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpillLabels {
    pub upstream: Arc<str>,
    /// `out` when a tier joins the candidates, `back` when one leaves.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `outbound` (we dialled) or `inbound` (a peer dialled us).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerConnectionLabels {
    /// `outbound` (we dialled) or `inbound` (a peer dialled us).
    pub direction: &'static str,
    /// `h3` (QUIC) or `h2` (HTTP/2 over TLS on TCP: the fallback when UDP is blocked).
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `file` or `configmap`.
    pub source: &'static str,
    /// `applied` or `rejected`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiscoveryLabels {
    pub upstream: String,
    /// `applied`, `deleted`, `relisted` or `error`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `applied` or `rejected`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// Which hostile-peer limit turned something away (see `inbound`).
    pub limit: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to ~26 s in doublings: loopback hops at the bottom, deadlines at the top.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    pub calls: Family<CallLabels, Counter>,
    pub attempts: Family<AttemptLabels, Counter>,
    pub retries: Family<UpstreamLabels, Counter>,
    pub fallthroughs: Family<TierLabels, Counter>,
    pub transparent_retries: Family<UpstreamLabels, Counter>,
    pub retries_throttled: Family<UpstreamLabels, Counter>,
    pub hedges: Family<UpstreamLabels, Counter>,
    pub hedges_won: Family<UpstreamLabels, Counter>,
    pub ejections: Family<UpstreamLabels, Counter>,
    pub ejected_endpoints: Family<UpstreamLabels, Gauge>,
    pub quic_connections_opened: Family<DirectionLabels, Counter>,
    /// Connections between sidecars open now, by direction and protocol.
    pub peer_connections: Family<PeerConnectionLabels, Gauge>,
    /// Outbound connections made over HTTP/2 because QUIC got no answer from the peer.
    pub h2_fallbacks: Counter,
    pub quic_connections_lost: Family<DirectionLabels, Counter>,
    /// Outbound connections a restarted peer reset (stateless reset).
    pub quic_connections_reset: Counter,
    /// Outbound connections declared dead: calls waited and the peer stayed silent.
    pub quic_dead_connections: Counter,
    pub call_duration: HistogramFamily<UpstreamLabels>,
    pub attempt_duration: HistogramFamily<TierLabels>,
    pub inbound_calls: Family<StatusLabels, Counter>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub discovery_events: Family<DiscoveryLabels, Counter>,
    pub discovery_last_event: Family<UpstreamLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub endpoints: Family<TierLabels, Gauge>,
    /// Tiers beyond the best one taking calls because of load (0: strict locality holds).
    pub spill_depth: Family<UpstreamLabels, Gauge>,
    /// Tiers joining (`out`) or leaving (`back`) the candidates as load crosses the band.
    pub spill_changes: Family<SpillLabels, Counter>,
    /// Calls waiting for an answer per healthy endpoint, by tier: the spill decision's input.
    pub tier_load: Family<TierLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// The app's calls in flight and their cap, per upstream (`upstream="all"`: the process).
    pub calls_in_flight: Family<UpstreamLabels, Gauge>,
    pub calls_in_flight_limit: Family<UpstreamLabels, Gauge>,
    /// Calls answered at once because a cap was full.
    pub calls_shed: Family<ShedLabels, Counter>,
    /// New certificate sets from the `tls` files, applied or rejected.
    pub tls_reloads: Family<ResultLabels, Counter>,
    /// Seconds until the current leaf certificate expires (negative once it has).
    pub tls_cert_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Inbound calls refused by `inbound.allow`.
    pub inbound_denied: Counter,
    /// Upstream attempts refused because the peer presented another identity.
    pub upstream_identity_mismatches: Counter,
    /// Streams and connections turned away by the inbound hostile-peer limits.
    pub inbound_limited: Family<LimitLabels, Counter>,
    seen_methods: Mutex<HashSet<Arc<str>>>,
    other_method: Arc<str>,
    /// `inbound_calls{status="FORWARDED"}`, what nearly every inbound call ends in, resolved on
    /// first use rather than looked up per call.
    inbound_forwarded: OnceLock<Counter>,
}

/// Distinct method label values kept before new ones are reported as `other`.
const MAX_METHODS: usize = 500;

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("locality_sidecar");
        let calls = Family::default();
        registry.register(
            "calls",
            "Calls from the local app, by final status and the tier of the endpoint that answered",
            calls.clone(),
        );
        let attempts = Family::default();
        registry.register(
            "attempts",
            "Attempts sent to upstream endpoints (first tries, retries and transparent retries)",
            attempts.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Retry attempts made under the retry policy",
            retries.clone(),
        );
        let fallthroughs = Family::default();
        registry.register("fallthroughs", "Retries that went to another node than the previous attempt, by the tier they landed in", fallthroughs.clone());
        let transparent_retries = Family::default();
        registry.register("transparent_retries", "Attempts repeated because the request never reached the upstream (not counted against maxAttempts)", transparent_retries.clone());
        let retries_throttled = Family::default();
        registry.register(
            "retries_throttled",
            "Retries not made because retry throttling had too few tokens",
            retries_throttled.clone(),
        );
        let ejections = Family::default();
        registry.register(
            "ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        let ejected_endpoints = Family::default();
        registry.register(
            "ejected_endpoints",
            "Endpoints currently ejected",
            ejected_endpoints.clone(),
        );
        let quic_connections_opened = Family::default();
        registry.register(
            "quic_connections_opened",
            "QUIC connections established",
            quic_connections_opened.clone(),
        );
        let peer_connections = Family::default();
        registry.register(
            "peer_connections",
            "Connections between sidecars open now, by direction and protocol (h3: QUIC; h2: HTTP/2 over TLS, the fallback when UDP is blocked)",
            peer_connections.clone(),
        );
        let h2_fallbacks = Counter::default();
        registry.register(
            "h2_fallbacks",
            "Outbound peer connections made over HTTP/2 on TCP because QUIC got no answer",
            h2_fallbacks.clone(),
        );
        let hedges = Family::default();
        registry.register(
            "hedges",
            "Hedged attempts sent (hedgingPolicy): attempts beyond a call's first",
            hedges.clone(),
        );
        let hedges_won = Family::default();
        registry.register(
            "hedges_won",
            "Calls answered by a hedged attempt rather than their first",
            hedges_won.clone(),
        );
        let quic_connections_reset = Counter::default();
        registry.register(
            "quic_connections_reset",
            "Outbound QUIC connections a restarted peer sidecar reset (stateless reset)",
            quic_connections_reset.clone(),
        );
        let quic_dead_connections = Counter::default();
        registry.register(
            "quic_dead_connections",
            "Outbound QUIC connections declared dead: calls waited and nothing arrived from the peer",
            quic_dead_connections.clone(),
        );
        let quic_connections_lost = Family::default();
        registry.register(
            "quic_connections_lost",
            "QUIC connections that ended with an error (not a clean close)",
            quic_connections_lost.clone(),
        );
        let call_duration: HistogramFamily<UpstreamLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "call_duration",
            "Whole-call latency until response headers or status, all attempts included",
            Unit::Seconds,
            call_duration.clone(),
        );
        let attempt_duration: HistogramFamily<TierLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "attempt_duration",
            "Per-attempt latency until response headers or status",
            Unit::Seconds,
            attempt_duration.clone(),
        );
        let inbound_calls = Family::default();
        registry.register(
            "inbound_calls",
            "Calls from peer sidecars handed to the local app, by status the sidecar saw",
            inbound_calls.clone(),
        );
        let config_reloads = Family::default();
        registry.register(
            "config_reloads",
            "Config changes seen after start-up, applied or rejected",
            config_reloads.clone(),
        );
        let discovery_events = Family::default();
        registry.register(
            "discovery_events",
            "Kubernetes watch events that changed an upstream's endpoints",
            discovery_events.clone(),
        );
        let discovery_last_event = Family::default();
        registry.register(
            "discovery_last_event_timestamp_seconds",
            "Unix time of the last discovery event per upstream (staleness = now - this)",
            discovery_last_event.clone(),
        );
        let endpoints = Family::default();
        registry.register(
            "endpoints",
            "Ready endpoints per upstream and locality tier",
            endpoints.clone(),
        );
        let tls_reloads = Family::default();
        registry.register(
            "tls_reloads",
            "Certificate sets read from the tls files, applied or rejected (the old set stays)",
            tls_reloads.clone(),
        );
        let tls_cert_expiry = Gauge::default();
        registry.register(
            "tls_cert_expiry_seconds",
            "Seconds until the current leaf certificate expires",
            tls_cert_expiry.clone(),
        );
        let inbound_denied = Counter::default();
        registry.register(
            "inbound_denied",
            "Inbound calls refused with PERMISSION_DENIED: the caller's identity is not in inbound.allow",
            inbound_denied.clone(),
        );
        let upstream_identity_mismatches = Counter::default();
        registry.register(
            "upstream_identity_mismatches",
            "Upstream attempts refused because the peer presented another identity than expected",
            upstream_identity_mismatches.clone(),
        );
        let inbound_limited = Family::default();
        registry.register(
            "inbound_limited",
            "Peer streams and connections turned away by a hostile-peer limit, by limit",
            inbound_limited.clone(),
        );
        let spill_depth = Family::default();
        registry.register(
            "spill_depth",
            "Locality tiers beyond the best one taking calls because the best one's load is above the band",
            spill_depth.clone(),
        );
        let spill_changes = Family::default();
        registry.register(
            "spill_changes",
            "Times a tier joined (out) or left (back) an upstream's candidates as load crossed the band",
            spill_changes.clone(),
        );
        let tier_load = Family::default();
        registry.register(
            "tier_load",
            "Calls waiting for response headers per healthy endpoint, by upstream and tier",
            tier_load.clone(),
        );
        let calls_in_flight = Family::default();
        registry.register(
            "calls_in_flight",
            "The app's calls in flight (admitted, response not ended), per upstream; upstream=\"all\" is the whole process",
            calls_in_flight.clone(),
        );
        let calls_in_flight_limit = Family::default();
        registry.register(
            "calls_in_flight_limit",
            "The cap on calls in flight (limits.maxCallsPerUpstream, or maxCallsInFlight for upstream=\"all\")",
            calls_in_flight_limit.clone(),
        );
        let calls_shed = Family::default();
        registry.register(
            "calls_shed",
            "Calls answered UNAVAILABLE at once because a cap on calls in flight was full, by cap",
            calls_shed.clone(),
        );
        Metrics {
            registry,
            calls_in_flight,
            calls_in_flight_limit,
            calls_shed,
            spill_depth,
            spill_changes,
            tier_load,
            tls_reloads,
            tls_cert_expiry,
            inbound_denied,
            upstream_identity_mismatches,
            inbound_limited,
            calls,
            attempts,
            retries,
            fallthroughs,
            transparent_retries,
            retries_throttled,
            ejections,
            ejected_endpoints,
            quic_connections_opened,
            peer_connections,
            h2_fallbacks,
            quic_connections_lost,
            quic_connections_reset,
            quic_dead_connections,
            hedges,
            hedges_won,
            call_duration,
            attempt_duration,
            inbound_calls,
            config_reloads,
            discovery_events,
            discovery_last_event,
            endpoints,
            seen_methods: Mutex::new(HashSet::new()),
            other_method: Arc::from("other"),
            inbound_forwarded: OnceLock::new(),
        }
    }

    /// The OpenMetrics text exposition (what `prometheus-client` renders).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The exposition in `format` (see [`negotiate`] for choosing one from a scrape's `Accept`).
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.encode(),
            Format::Classic => exposition::to_classic(&self.encode()),
        }
    }

    /// Counts an inbound call handed to the app (`inbound_calls{status="FORWARDED"}`).
    pub fn count_inbound_forwarded(&self) {
        self.inbound_forwarded
            .get_or_init(|| {
                self.inbound_calls
                    .get_or_create(&StatusLabels {
                        status: "FORWARDED",
                    })
                    .clone()
            })
            .inc();
    }

    /// The `method` label for a call path: the path itself while the number of distinct methods
    /// stays small, `other` beyond that, so a client sending random paths cannot blow up the
    /// metric's cardinality.
    pub fn method_label(&self, path: &str) -> Arc<str> {
        let mut seen = self
            .seen_methods
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(label) = seen.get(path) {
            return label.clone();
        }
        if seen.len() < MAX_METHODS && path.len() <= 200 {
            let label: Arc<str> = Arc::from(path);
            seen.insert(label.clone());
            return label;
        }
        self.other_method.clone()
    }
}

impl Metrics {
    /// Creates an upstream's series at zero, so dashboards and alerts see 0 rather than a
    /// missing series before the first retry or ejection happens.
    pub fn init_upstream(&self, name: &str) {
        let labels = upstream(name);
        for family in [
            &self.retries,
            &self.transparent_retries,
            &self.retries_throttled,
            &self.ejections,
            &self.hedges,
            &self.hedges_won,
        ] {
            drop(family.get_or_create(&labels));
        }
        drop(self.ejected_endpoints.get_or_create(&labels));
        drop(self.spill_depth.get_or_create(&labels));
        drop(self.call_duration.get_or_create(&labels));
        for limit in ["process", "upstream"] {
            drop(self.calls_shed.get_or_create(&ShedLabels {
                upstream: name.into(),
                limit,
            }));
        }
        for direction in ["out", "back"] {
            drop(self.spill_changes.get_or_create(&SpillLabels {
                upstream: name.into(),
                direction,
            }));
        }
        for tier in ["node", "zone", "any"] {
            let labels = TierLabels {
                upstream: name.into(),
                tier,
            };
            drop(self.fallthroughs.get_or_create(&labels));
            drop(self.endpoints.get_or_create(&labels));
            drop(self.tier_load.get_or_create(&labels));
        }
        drop(self.discovery_events.get_or_create(&DiscoveryLabels {
            upstream: name.into(),
            kind: "applied",
        }));
    }

    /// Creates the process-wide series at zero (see [`Metrics::init_upstream`]).
    pub fn init_process(&self) {
        for direction in ["outbound", "inbound"] {
            for protocol in ["h3", "h2"] {
                drop(self.peer_connections.get_or_create(&PeerConnectionLabels {
                    direction,
                    protocol,
                }));
            }
            drop(
                self.quic_connections_opened
                    .get_or_create(&DirectionLabels { direction }),
            );
            drop(
                self.quic_connections_lost
                    .get_or_create(&DirectionLabels { direction }),
            );
        }
        for source in ["file", "configmap"] {
            for result in ["applied", "rejected"] {
                drop(
                    self.config_reloads
                        .get_or_create(&ReloadLabels { source, result }),
                );
            }
        }
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

pub fn upstream(name: impl Into<Arc<str>>) -> UpstreamLabels {
    UpstreamLabels {
        upstream: name.into(),
    }
}

/// One open connection between sidecars, counted in `peer_connections` until dropped.
pub struct OpenPeerConnection(Gauge);

impl OpenPeerConnection {
    pub fn new(direction: &'static str, protocol: &'static str) -> OpenPeerConnection {
        let gauge = metrics()
            .peer_connections
            .get_or_create(&PeerConnectionLabels {
                direction,
                protocol,
            })
            .clone();
        gauge.inc();
        OpenPeerConnection(gauge)
    }
}

impl Drop for OpenPeerConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
