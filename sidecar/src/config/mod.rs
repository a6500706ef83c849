//! The sidecar's configuration file: its shape, parsing (YAML or JSON) and validation.
//!
//! Validation happens before anything starts, so a bad file is one error line naming the field
//! path, what was expected and what was found, never a half-started sidecar.

pub mod live;
pub mod service_config;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::service_config::ServiceConfig;

/// Every way a configuration can be wrong. Messages name the field path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {field}: {message}")]
    Parse {
        path: String,
        field: String,
        message: String,
    },
    #[error("config {path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

/// The whole configuration file. Every section is optional.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Listeners the local app dials, one per upstream.
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    /// The QUIC listener peers call, and where it forwards to.
    pub inbound: Option<InboundConfig>,
    /// Certificates for mutual TLS between sidecars.
    pub tls: Option<TlsPaths>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub locality: LocalityConfig,
    /// gRPC service config (gRFC A6), as written; parsed into `policy` by validation.
    pub service_config: Option<serde_json::Value>,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Caps on calls in flight (overload protection); live for new calls and connections.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The parsed `serviceConfig` (empty when absent: no timeout, no retries).
    #[serde(skip)]
    pub policy: ServiceConfig,
}

/// When an endpoint is taken out of rotation for failing, and for how long.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Connection failures or UNAVAILABLE answers in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further ejection of the same endpoint adds as much.
    #[serde(deserialize_with = "duration_string")]
    pub base_ejection_time: Duration,
    #[serde(deserialize_with = "duration_string")]
    pub max_ejection_time: Duration,
    /// Never eject more than this share of an upstream's endpoints at once.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(120),
            max_ejection_percent: 50,
        }
    }
}

fn duration_string<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    crate::config::service_config::parse_duration(&value, "duration")
        .map_err(|e| serde::de::Error::custom(e.message))
}

/// One upstream: a loopback h2c listener and where its calls go.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundConfig {
    pub listen: SocketAddr,
    /// Kubernetes Service name (`name` or `name.namespace`).
    pub service: Option<String>,
    /// Upstream name used in logs, metrics and error messages when `endpoints` is static.
    pub name: Option<String>,
    /// Static endpoints (development, tests, demo) instead of `service`.
    pub endpoints: Option<Vec<StaticEndpoint>>,
    /// The DNS name the upstream sidecars' certificates must carry.
    pub server_name: Option<String>,
    /// SPIFFE trust domain of a Kubernetes upstream: each pod must present
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<its service account>`. Absent: any peer of the CA.
    pub trust_domain: Option<String>,
}

/// An upstream sidecar's QUIC address with its place in the topology.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticEndpoint {
    pub address: SocketAddr,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// A name for logs and the admin view; defaults to the address.
    pub pod: Option<String>,
    /// The SPIFFE identity (URI SAN) the endpoint must present; absent: any peer of the CA.
    pub identity: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundConfig {
    /// UDP address of the QUIC/HTTP/3 listener.
    pub listen: SocketAddr,
    /// The local app's h2c gRPC address; loopback unless `allow_non_loopback_forward`.
    pub forward: SocketAddr,
    /// Lets `forward` leave the pod's loopback (an app in another container's network, a
    /// test rig). Off by default: the inbound listener terminates mutual TLS, and forwarding
    /// its plaintext over the network would hand authenticated calls to whoever sits there.
    #[serde(default)]
    pub allow_non_loopback_forward: bool,
    /// Caller identities (SPIFFE URIs) allowed to call; absent: any peer with a certificate
    /// from the CA. Others get PERMISSION_DENIED.
    pub allow: Option<Vec<String>>,
    /// Limits that bound what one peer can make this sidecar hold.
    #[serde(default)]
    pub limits: InboundLimits,
}

/// What one peer may make the inbound side hold, whatever it sends. Unset fields keep their
/// defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct InboundLimits {
    /// Largest request header section (HTTP/3 SETTINGS_MAX_FIELD_SECTION_SIZE), and the most
    /// bytes a request stream may carry before its headers are complete.
    pub max_header_bytes: u32,
    /// Time a request may take to deliver its headers.
    #[serde(deserialize_with = "duration_string")]
    pub header_timeout: Duration,
    /// Bytes of incomplete request headers one connection may have in flight over all its
    /// streams.
    pub max_pending_header_bytes: u32,
    /// Concurrent request streams per connection.
    pub max_concurrent_streams: u32,
    /// Open connections per peer IP address.
    pub max_connections_per_peer: u32,
    /// Calls handed to the local app at once over all peers (default: the memory budget's cap
    /// on calls in flight, as `limits.maxCallsInFlight`).
    pub max_calls_to_app: Option<usize>,
    /// Calls one peer connection may have at the local app at once (default: half of
    /// `maxCallsToApp`), so one hot caller cannot take every place.
    pub max_calls_per_peer: Option<usize>,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            max_header_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(10),
            max_pending_header_bytes: 1024 * 1024,
            max_concurrent_streams: 4096,
            max_connections_per_peer: 16,
            max_calls_to_app: None,
            max_calls_per_peer: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 15090)),
        }
    }
}

/// The order in which locality tiers are tried.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Node,
    Zone,
    Any,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Node => "node",
            Tier::Zone => "zone",
            Tier::Any => "any",
        }
    }
}

/// Caps on the app's calls in flight. Unset caps derive from the memory budget: the
/// container's cgroup limit, `memoryBudgetMiB`, or 128 MiB (what `inject` gives the container).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LimitsConfig {
    #[serde(rename = "memoryBudgetMiB")]
    pub memory_budget_mib: Option<u64>,
    pub max_calls_in_flight: Option<usize>,
    pub max_calls_per_upstream: Option<usize>,
    pub max_streams_per_connection: Option<u32>,
}

impl LimitsConfig {
    /// The caps in force, given the container's memory limit if it has one.
    pub fn resolve(&self, cgroup_limit: Option<u64>) -> crate::limits::CallLimits {
        use crate::limits::{limits_for_budget, DEFAULT_BUDGET_BYTES};
        let budget = self
            .memory_budget_mib
            .map(|mib| mib.saturating_mul(1024 * 1024))
            .or(cgroup_limit)
            .unwrap_or(DEFAULT_BUDGET_BYTES);
        let derived = limits_for_budget(budget);
        let process = self.max_calls_in_flight.unwrap_or(derived.process);
        crate::limits::CallLimits {
            process,
            per_upstream: self.max_calls_per_upstream.unwrap_or(process),
            streams_per_connection: self
                .max_streams_per_connection
                .unwrap_or(crate::limits::streams_per_connection(process)),
        }
    }
}

/// Where calls go: tiers in order, and when load lets the next tier join (live-tunable).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LocalityConfig {
    pub tiers: Vec<Tier>,
    /// The best tier takes every call while it has a healthy endpoint, whatever its load.
    pub strict: bool,
    pub spill_over: SpillOverConfig,
}

impl Default for LocalityConfig {
    fn default() -> Self {
        LocalityConfig {
            tiers: vec![Tier::Node, Tier::Zone, Tier::Any],
            strict: false,
            spill_over: SpillOverConfig::default(),
        }
    }
}

impl LocalityConfig {
    pub fn band(&self) -> crate::endpoints::spill::SpillBand {
        crate::endpoints::spill::SpillBand {
            enabled: !self.strict,
            low: self.spill_over.low,
            high: self.spill_over.high,
        }
    }
}

/// The band of calls waiting per endpoint: above `high` the next tier joins the candidates,
/// below `low` (judged as if it had left) it leaves again.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SpillOverConfig {
    pub low: f64,
    pub high: f64,
}

impl Default for SpillOverConfig {
    fn default() -> Self {
        let band = crate::endpoints::spill::SpillBand::default();
        SpillOverConfig {
            low: band.low,
            high: band.high,
        }
    }
}

/// Checks a SPIFFE ID's shape: `spiffe://<trust domain>/<path>`.
fn check_spiffe(identity: &str) -> Result<(), String> {
    let rest = identity.strip_prefix("spiffe://").ok_or_else(|| {
        format!("expected a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>), found {identity:?}")
    })?;
    let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
    if !domain_ok || path.is_empty() || identity.chars().any(char::is_whitespace) {
        return Err(format!(
            "expected a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>), found {identity:?}"
        ));
    }
    Ok(())
}

/// The certificate name checked on upstream sidecars when the config names none.
pub const DEFAULT_SERVER_NAME: &str = "locality-sidecar";

impl OutboundConfig {
    /// The upstream's name for logs, metrics and error messages.
    pub fn upstream_name(&self) -> String {
        match (&self.service, &self.name) {
            (Some(service), _) => service.clone(),
            (None, Some(name)) => name.clone(),
            (None, None) => format!("static:{}", self.listen),
        }
    }

    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(DEFAULT_SERVER_NAME)
    }
}

impl Config {
    /// The sections that only take effect at start-up (sockets, certificates, upstream list),
    /// named when `other` differs from `self` in them.
    pub fn restart_needed(&self, other: &Config) -> Vec<&'static str> {
        let mut sections = Vec::new();
        if self.outbound != other.outbound {
            sections.push("outbound");
        }
        if self.inbound != other.inbound {
            sections.push("inbound");
        }
        if self.tls != other.tls {
            sections.push("tls");
        }
        if self.admin != other.admin {
            sections.push("admin");
        }
        sections
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors (a path or a ConfigMap).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        // YAML is a superset of JSON, so one parser takes both.
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let field = err.path().to_string();
            ConfigError::Parse {
                path: origin.to_string(),
                field: if field == "." {
                    "(top level)".to_string()
                } else {
                    field
                },
                message: err.into_inner().to_string(),
            }
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&mut self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            field,
            message,
        };
        if let Some(raw) = &self.service_config {
            self.policy = ServiceConfig::parse(raw, "serviceConfig")
                .map_err(|e| invalid(e.field, e.message))?;
        }
        let outlier = &self.outlier_detection;
        if outlier.consecutive_failures == 0 {
            return Err(invalid(
                "outlierDetection.consecutiveFailures".to_string(),
                "expected at least 1".to_string(),
            ));
        }
        if outlier.max_ejection_percent > 100 {
            return Err(invalid(
                "outlierDetection.maxEjectionPercent".to_string(),
                format!("expected 0 to 100, found {}", outlier.max_ejection_percent),
            ));
        }
        if outlier.max_ejection_time < outlier.base_ejection_time {
            return Err(invalid(
                "outlierDetection.maxEjectionTime".to_string(),
                "expected at least baseEjectionTime".to_string(),
            ));
        }
        let mut listens = HashSet::new();
        for (index, outbound) in self.outbound.iter().enumerate() {
            let at = format!("outbound[{index}]");
            if !outbound.listen.ip().is_loopback() {
                return Err(invalid(
                    format!("{at}.listen"),
                    format!(
                        "expected a loopback address (the app's calls must not be reachable from the network), found {}",
                        outbound.listen
                    ),
                ));
            }
            if !listens.insert(outbound.listen) {
                return Err(invalid(
                    format!("{at}.listen"),
                    format!(
                        "{} is already used by another outbound entry",
                        outbound.listen
                    ),
                ));
            }
            match (&outbound.service, &outbound.endpoints) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        at,
                        "expected either `service` or `endpoints`, found both".to_string(),
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        at,
                        "expected `service` (a Kubernetes Service) or `endpoints` (a static list), found neither"
                            .to_string(),
                    ))
                }
                (Some(service), None) => {
                    if service.is_empty() || service.split('.').count() > 2 {
                        return Err(invalid(
                            format!("{at}.service"),
                            format!("expected NAME or NAME.NAMESPACE, found {service:?}"),
                        ));
                    }
                }
                (None, Some(endpoints)) => {
                    if endpoints.is_empty() {
                        return Err(invalid(
                            format!("{at}.endpoints"),
                            "expected at least one endpoint, found an empty list".to_string(),
                        ));
                    }
                }
            }
            for (index, endpoint) in outbound.endpoints.iter().flatten().enumerate() {
                if let Some(identity) = &endpoint.identity {
                    check_spiffe(identity).map_err(|message| {
                        invalid(format!("{at}.endpoints[{index}].identity"), message)
                    })?;
                }
            }
            if let Some(domain) = &outbound.trust_domain {
                check_spiffe(&format!("spiffe://{domain}/ns/x/sa/x"))
                    .map_err(|message| invalid(format!("{at}.trustDomain"), message))?;
            }
            if let Some(name) = &outbound.server_name {
                if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                    return Err(invalid(
                        format!("{at}.serverName"),
                        format!("expected a DNS name or IP address, found {name:?}"),
                    ));
                }
            }
        }
        if let Some(inbound) = &self.inbound {
            if !inbound.forward.ip().is_loopback() && !inbound.allow_non_loopback_forward {
                return Err(invalid(
                    "inbound.forward".to_string(),
                    format!(
                        "expected a loopback address (verified calls leave the sidecar as plaintext h2c), found {}; set inbound.allowNonLoopbackForward: true to allow it",
                        inbound.forward
                    ),
                ));
            }
            for (index, identity) in inbound.allow.iter().flatten().enumerate() {
                check_spiffe(identity)
                    .map_err(|message| invalid(format!("inbound.allow[{index}]"), message))?;
            }
            let limits = &inbound.limits;
            if limits.max_header_bytes < 1024
                || limits.max_pending_header_bytes < limits.max_header_bytes
                || limits.max_concurrent_streams == 0
                || limits.max_connections_per_peer == 0
                || limits.header_timeout.is_zero()
            {
                return Err(invalid(
                    "inbound.limits".to_string(),
                    "expected maxHeaderBytes >= 1024, maxPendingHeaderBytes >= maxHeaderBytes, and the other limits above zero".to_string(),
                ));
            }
            if listens.contains(&inbound.forward) {
                return Err(invalid(
                    "inbound.forward".to_string(),
                    format!(
                        "{} is an outbound listener of this sidecar; forwarding there would loop",
                        inbound.forward
                    ),
                ));
            }
        }
        if (self.inbound.is_some() || !self.outbound.is_empty()) && self.tls.is_none() {
            return Err(invalid(
                "tls".to_string(),
                "expected {ca, cert, key}: peers talk mutual TLS, found no tls section".to_string(),
            ));
        }
        if self.locality.tiers.is_empty() {
            return Err(invalid(
                "locality.tiers".to_string(),
                "expected at least one of node, zone, any".to_string(),
            ));
        }
        let limits = &self.limits;
        for (field, value) in [
            (
                "limits.memoryBudgetMiB",
                limits.memory_budget_mib.map(|v| v as usize),
            ),
            ("limits.maxCallsInFlight", limits.max_calls_in_flight),
            ("limits.maxCallsPerUpstream", limits.max_calls_per_upstream),
            (
                "limits.maxStreamsPerConnection",
                limits.max_streams_per_connection.map(|v| v as usize),
            ),
        ] {
            if value == Some(0) {
                return Err(invalid(
                    field.to_string(),
                    "expected a number above 0 (leave it out to derive it from the memory budget), found 0".to_string(),
                ));
            }
        }
        let band = &self.locality.spill_over;
        if !(band.low.is_finite() && band.low >= 0.0) {
            return Err(invalid(
                "locality.spillOver.low".to_string(),
                format!(
                    "expected a number of waiting calls per endpoint, 0 or more, found {}",
                    band.low
                ),
            ));
        }
        if !(band.high.is_finite() && band.high > band.low) {
            return Err(invalid(
                "locality.spillOver.high".to_string(),
                format!(
                    "expected a number above low ({}): the band needs room to stop flapping, found {}",
                    band.low, band.high
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (index, tier) in self.locality.tiers.iter().enumerate() {
            if !seen.insert(*tier) {
                return Err(invalid(
                    format!("locality.tiers[{index}]"),
                    format!("{} appears twice", tier.as_str()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
outbound:
  - listen: 127.0.0.1:7001
    name: echo
    endpoints: [{address: 127.0.0.2:15443, node: node-a, zone: z1}]
inbound: {listen: 0.0.0.0:15443, forward: 127.0.0.1:50051}
tls: {ca: /certs/ca.crt, cert: /certs/tls.crt, key: /certs/tls.key}
admin: {listen: 0.0.0.0:15090}
locality: {tiers: [node, zone, any]}
"#;

    fn error_of(text: &str) -> String {
        match Config::parse(text, "test.yaml") {
            Ok(_) => panic!("expected an error for {text}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn identities_must_be_spiffe_ids_and_limits_sane() {
        let with = |extra_inbound: &str, endpoint: &str| {
            GOOD.replace(
                "forward: 127.0.0.1:50051}",
                &format!("forward: 127.0.0.1:50051{extra_inbound}}}"),
            )
            .replace("zone: z1}", &format!("zone: z1{endpoint}}}"))
        };
        let config = Config::parse(
            &with(
                ", allow: [\"spiffe://td/ns/a/sa/b\"], limits: {headerTimeout: 2s}",
                ", identity: \"spiffe://td/ns/x/sa/y\"",
            ),
            "t",
        )
        .unwrap();
        let inbound = config.inbound.unwrap();
        assert_eq!(inbound.allow.unwrap(), vec!["spiffe://td/ns/a/sa/b"]);
        assert_eq!(inbound.limits.header_timeout, Duration::from_secs(2));
        assert_eq!(
            inbound.limits.max_header_bytes,
            64 * 1024,
            "unset limits keep defaults"
        );
        let err = error_of(&with(", allow: [\"frontend\"]", ""));
        assert!(
            err.contains("inbound.allow[0]") && err.contains("SPIFFE"),
            "{err}"
        );
        let err = error_of(&with("", ", identity: \"https://x/y\""));
        assert!(err.contains("outbound[0].endpoints[0].identity"), "{err}");
        let err = error_of(&with(", limits: {maxHeaderBytes: 10}", ""));
        assert!(err.contains("inbound.limits"), "{err}");
    }

    #[test]
    fn good_config_parses_with_every_section() {
        let config = Config::parse(GOOD, "test.yaml").unwrap();
        assert_eq!(config.outbound.len(), 1);
        assert_eq!(config.outbound[0].upstream_name(), "echo");
        assert_eq!(config.outbound[0].server_name(), DEFAULT_SERVER_NAME);
        assert_eq!(config.inbound.unwrap().forward.port(), 50051);
    }

    #[test]
    fn service_config_errors_carry_the_full_field_path() {
        let text = format!(
            "{GOOD}serviceConfig:\n  methodConfig:\n    - name: [{{service: echo.Echo}}]\n      retryPolicy: {{maxAttempts: 1, initialBackoff: 0.1s, maxBackoff: 1s, backoffMultiplier: 2, retryableStatusCodes: [UNAVAILABLE]}}\n"
        );
        let err = error_of(&text);
        assert!(
            err.contains("serviceConfig.methodConfig[0].retryPolicy.maxAttempts"),
            "{err}"
        );
    }

    #[test]
    fn outlier_durations_parse() {
        let text = format!("{GOOD}outlierDetection: {{consecutiveFailures: 3, baseEjectionTime: 0.5s, maxEjectionTime: 5s, maxEjectionPercent: 30}}\n");
        let config = Config::parse(&text, "t").unwrap();
        assert_eq!(
            config.outlier_detection.base_ejection_time,
            Duration::from_millis(500)
        );
        let err = error_of(&text.replace("0.5s", "soon"));
        assert!(err.contains("outlierDetection.baseEjectionTime"), "{err}");
    }

    #[test]
    fn json_is_accepted() {
        let config = Config::parse(r#"{"admin": {"listen": "127.0.0.1:9"}}"#, "t.json").unwrap();
        assert_eq!(config.admin.listen.port(), 9);
    }

    #[test]
    fn bad_address_names_the_field_path() {
        let err = error_of(&GOOD.replace("127.0.0.2:15443", "not-an-address"));
        assert!(err.contains("outbound[0].endpoints[0].address"), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_path() {
        let err = error_of(&GOOD.replace("forward:", "forwrd:"));
        assert!(err.contains("inbound") && err.contains("forwrd"), "{err}");
    }

    #[test]
    fn outbound_must_listen_on_loopback() {
        let err = error_of(&GOOD.replace("127.0.0.1:7001", "0.0.0.0:7001"));
        assert!(
            err.contains("outbound[0].listen") && err.contains("loopback"),
            "{err}"
        );
    }

    #[test]
    fn inbound_forward_must_be_loopback() {
        let err = error_of(&GOOD.replace("forward: 127.0.0.1:50051", "forward: 10.0.0.7:50051"));
        assert_eq!(
            err,
            "config test.yaml: inbound.forward: expected a loopback address (verified calls leave the sidecar as plaintext h2c), found 10.0.0.7:50051; set inbound.allowNonLoopbackForward: true to allow it"
        );
        let err = error_of(&GOOD.replace("forward: 127.0.0.1:50051", "forward: 0.0.0.0:50051"));
        assert!(
            err.contains("inbound.forward") && err.contains("found 0.0.0.0:50051"),
            "{err}"
        );
    }

    #[test]
    fn ipv6_loopback_forward_is_accepted() {
        let config = Config::parse(
            &GOOD.replace("forward: 127.0.0.1:50051", "forward: \"[::1]:50051\""),
            "t",
        )
        .unwrap();
        assert!(config.inbound.unwrap().forward.ip().is_loopback());
    }

    #[test]
    fn non_loopback_forward_is_accepted_when_explicitly_allowed() {
        let text = GOOD.replace(
            "forward: 127.0.0.1:50051}",
            "forward: 10.0.0.7:50051, allowNonLoopbackForward: true}",
        );
        let inbound = Config::parse(&text, "t").unwrap().inbound.unwrap();
        assert!(inbound.allow_non_loopback_forward);
        assert_eq!(inbound.forward, "10.0.0.7:50051".parse().unwrap());
        // Off by default, and the flag must be a boolean.
        assert!(
            !Config::parse(GOOD, "t")
                .unwrap()
                .inbound
                .unwrap()
                .allow_non_loopback_forward
        );
        let err = error_of(&text.replace(
            "allowNonLoopbackForward: true",
            "allowNonLoopbackForward: sure",
        ));
        assert!(err.contains("inbound.allowNonLoopbackForward"), "{err}");
    }

    #[test]
    fn service_and_endpoints_are_exclusive() {
        let err = error_of(&GOOD.replace("name: echo", "service: echo"));
        assert!(err.contains("found both"), "{err}");
    }

    #[test]
    fn tls_is_required_when_peers_are_involved() {
        let err = error_of(&GOOD.replace(
            "tls: {ca: /certs/ca.crt, cert: /certs/tls.crt, key: /certs/tls.key}",
            "",
        ));
        assert!(err.contains("tls"), "{err}");
    }

    #[test]
    fn duplicate_tier_is_rejected() {
        let err = error_of(&GOOD.replace("[node, zone, any]", "[node, node]"));
        assert!(err.contains("locality.tiers[1]"), "{err}");
    }

    #[test]
    fn unknown_tier_is_rejected() {
        let err = error_of(&GOOD.replace("[node, zone, any]", "[rack]"));
        assert!(err.contains("locality.tiers"), "{err}");
    }
}
