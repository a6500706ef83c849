//! Per-method call policy from the gRPC service config (gRFC A6): which `methodConfig` applies
//! to a call, its timeout, its retry policy, and the upstream's retry throttling. Parsed and
//! validated as gRPC does, with errors that name the field path.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::wire::grpc::Code;

/// A6 caps attempts at 5 whatever the config says.
pub const MAX_ATTEMPTS_CAP: u32 = 5;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

/// The parsed service config. The default has no method configs: no timeout, no retries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceConfig {
    methods: Vec<MethodConfig>,
    pub throttling: Option<ThrottlingPolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MethodConfig {
    names: Vec<MethodName>,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub hedging: Option<HedgingPolicy>,
    /// `waitForReady`: with no ready endpoint, the call waits (within its deadline) for one
    /// instead of failing or retrying at once.
    pub wait_for_ready: bool,
}

/// `{service, method}`: both set matches one method, service alone a whole service, neither
/// every call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MethodName {
    service: Option<String>,
    method: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub backoff_multiplier: f64,
    /// Bit `n` set when status code `n` is retryable.
    retryable: u32,
    /// An attempt without response headers by then is abandoned and the call moves on.
    pub per_attempt_recv_timeout: Option<Duration>,
}

/// A6 hedging: the call is sent again to another endpoint every `delay` while no attempt has
/// response headers, up to `max_attempts` attempts; the first response headers win.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgingPolicy {
    pub max_attempts: u32,
    pub delay: Duration,
    /// Bit `n` set when status code `n` lets the other attempts go on (and the next one start).
    non_fatal: u32,
}

impl HedgingPolicy {
    pub fn is_non_fatal(&self, code: Code) -> bool {
        self.non_fatal & (1 << code as u32) != 0
    }
}

/// A6 retry throttling, in thousandths of a token: gRPC keeps the token ratio to three decimal
/// places (truncated), so integer arithmetic makes the bucket exact.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottlingPolicy {
    pub max_milli_tokens: u32,
    pub milli_token_ratio: u32,
}

impl RetryPolicy {
    pub fn is_retryable(&self, code: Code) -> bool {
        self.retryable & (1 << code as u32) != 0
    }

    /// A6's delay before retry `n` (1-based, counted from the last server pushback):
    /// `min(initialBackoff × multiplier^(n−1), maxBackoff) × jitter`, where `jitter` is uniform
    /// in [0.8, 1.2). `unit` is a uniform sample in [0, 1), passed in so tests can fix it.
    pub fn backoff(&self, n: u32, unit: f64) -> Duration {
        let exponent = n.saturating_sub(1).min(1024) as i32;
        let grown = self.initial_backoff.as_secs_f64() * self.backoff_multiplier.powi(exponent);
        let capped = grown.min(self.max_backoff.as_secs_f64());
        let jitter = 0.8 + 0.4 * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * jitter).max(0.0))
    }
}

impl ServiceConfig {
    /// Parses the `serviceConfig` section; `at` is its field path for error messages.
    pub fn parse(value: &Value, at: &str) -> Result<ServiceConfig, PolicyError> {
        let object = as_object(value, at)?;
        reject_unknown(
            object,
            at,
            &[
                "methodConfig",
                "retryThrottling",
                "loadBalancingConfig",
                "loadBalancingPolicy",
            ],
        )?;
        for key in ["loadBalancingConfig", "loadBalancingPolicy"] {
            if object.contains_key(key) {
                return Err(PolicyError {
                    field: format!("{at}.{key}"),
                    message: "not supported: the sidecar balances by locality tier and load \
                              (locality.tiers); remove this field"
                        .to_string(),
                });
            }
        }
        let mut methods = Vec::new();
        let mut seen_names = HashSet::new();
        if let Some(list) = object.get("methodConfig") {
            let list_at = format!("{at}.methodConfig");
            let list = list
                .as_array()
                .ok_or_else(|| error(&list_at, "expected a list", list))?;
            for (index, entry) in list.iter().enumerate() {
                let method = parse_method_config(entry, &format!("{list_at}[{index}]"))?;
                for (name_index, name) in method.names.iter().enumerate() {
                    if !seen_names.insert(name.clone()) {
                        return Err(PolicyError {
                            field: format!("{list_at}[{index}].name[{name_index}]"),
                            message: format!("duplicate name {}: each service/method may appear in one methodConfig only", describe(name)),
                        });
                    }
                }
                methods.push(method);
            }
        }
        let throttling = match object.get("retryThrottling") {
            None => None,
            Some(value) => Some(parse_throttling(value, &format!("{at}.retryThrottling"))?),
        };
        Ok(ServiceConfig {
            methods,
            throttling,
        })
    }

    /// The method config for a call to `path` (`/package.Service/Method`): an exact
    /// service+method match wins over a service match, which wins over the default `{}`.
    pub fn for_path(&self, path: &str) -> Option<&MethodConfig> {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let (service, method) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        let matches = |wanted: &dyn Fn(&MethodName) -> bool| {
            self.methods
                .iter()
                .find(|config| config.names.iter().any(wanted))
        };
        matches(&|name| {
            name.service.as_deref() == Some(service) && name.method.as_deref() == Some(method)
        })
        .or_else(|| {
            matches(&|name| name.service.as_deref() == Some(service) && name.method.is_none())
        })
        .or_else(|| matches(&|name| name.service.is_none() && name.method.is_none()))
    }
}

fn describe(name: &MethodName) -> String {
    match (&name.service, &name.method) {
        (Some(service), Some(method)) => format!("{service}/{method}"),
        (Some(service), None) => service.clone(),
        _ => "{} (the default)".to_string(),
    }
}

fn error(at: &str, expected: &str, found: &Value) -> PolicyError {
    PolicyError {
        field: at.to_string(),
        message: format!("{expected}, found {found}"),
    }
}

fn as_object<'a>(
    value: &'a Value,
    at: &str,
) -> Result<&'a serde_json::Map<String, Value>, PolicyError> {
    value
        .as_object()
        .ok_or_else(|| error(at, "expected a mapping", value))
}

fn reject_unknown(
    object: &serde_json::Map<String, Value>,
    at: &str,
    known: &[&str],
) -> Result<(), PolicyError> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => Err(PolicyError {
            field: format!("{at}.{key}"),
            message: format!("unknown field; expected one of {}", known.join(", ")),
        }),
        None => Ok(()),
    }
}

fn parse_method_config(value: &Value, at: &str) -> Result<MethodConfig, PolicyError> {
    let object = as_object(value, at)?;
    reject_unknown(
        object,
        at,
        &[
            "name",
            "timeout",
            "retryPolicy",
            "waitForReady",
            "maxRequestMessageBytes",
            "maxResponseMessageBytes",
            "hedgingPolicy",
        ],
    )?;
    refuse_unsupported(object, at)?;
    let names_at = format!("{at}.name");
    let names_value = object.get("name").ok_or_else(|| PolicyError {
        field: names_at.clone(),
        message: "required: a list of {service, method} ([{}] for every call)".to_string(),
    })?;
    let list = names_value
        .as_array()
        .filter(|list| !list.is_empty())
        .ok_or_else(|| {
            error(
                &names_at,
                "expected a non-empty list of {service, method}",
                names_value,
            )
        })?;
    let mut names = Vec::new();
    for (index, name) in list.iter().enumerate() {
        let name_at = format!("{names_at}[{index}]");
        let object = as_object(name, &name_at)?;
        reject_unknown(object, &name_at, &["service", "method"])?;
        let text = |key: &str| -> Result<Option<String>, PolicyError> {
            match object.get(key) {
                None => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(error(
                    &format!("{name_at}.{key}"),
                    "expected a string",
                    other,
                )),
            }
        };
        let service = text("service")?;
        let method = text("method")?;
        if service.is_none() && method.is_some() {
            return Err(PolicyError {
                field: format!("{name_at}.method"),
                message: "a method needs its service".to_string(),
            });
        }
        names.push(MethodName { service, method });
    }
    let timeout = match object.get("timeout") {
        None => None,
        Some(value) => Some(parse_duration(value, &format!("{at}.timeout"))?),
    };
    let retry = match object.get("retryPolicy") {
        None => None,
        Some(value) => Some(parse_retry(value, &format!("{at}.retryPolicy"))?),
    };
    let hedging = match object.get("hedgingPolicy") {
        None => None,
        Some(_) if retry.is_some() => {
            return Err(PolicyError {
                field: format!("{at}.hedgingPolicy"),
                message: "retryPolicy and hedgingPolicy are exclusive in one methodConfig (gRFC A6); keep one"
                    .to_string(),
            })
        }
        Some(value) => Some(parse_hedging(value, &format!("{at}.hedgingPolicy"))?),
    };
    let wait_for_ready = match object.get("waitForReady") {
        None => false,
        Some(Value::Bool(flag)) => *flag,
        Some(other) => {
            return Err(error(
                &format!("{at}.waitForReady"),
                "expected true or false",
                other,
            ))
        }
    };
    Ok(MethodConfig {
        names,
        timeout,
        retry,
        hedging,
        wait_for_ready,
    })
}

/// Service-config fields gRPC defines that the sidecar does not act on. Accepting them silently
/// would let an operator believe a limit or policy is in force when it is not.
fn refuse_unsupported(
    object: &serde_json::Map<String, Value>,
    at: &str,
) -> Result<(), PolicyError> {
    const UNSUPPORTED: [(&str, &str); 2] = [
        (
            "maxRequestMessageBytes",
            "not enforced by the sidecar: message size limits belong to the app's gRPC library; remove this field",
        ),
        (
            "maxResponseMessageBytes",
            "not enforced by the sidecar: message size limits belong to the app's gRPC library; remove this field",
        ),
    ];
    for (key, why) in UNSUPPORTED {
        if object.contains_key(key) {
            return Err(PolicyError {
                field: format!("{at}.{key}"),
                message: why.to_string(),
            });
        }
    }
    Ok(())
}

fn field<'a>(
    object: &'a serde_json::Map<String, Value>,
    at: &str,
    key: &str,
) -> Result<&'a Value, PolicyError> {
    object.get(key).ok_or_else(|| PolicyError {
        field: format!("{at}.{key}"),
        message: "required".to_string(),
    })
}

fn parse_retry(value: &Value, at: &str) -> Result<RetryPolicy, PolicyError> {
    let object = as_object(value, at)?;
    reject_unknown(
        object,
        at,
        &[
            "maxAttempts",
            "initialBackoff",
            "maxBackoff",
            "backoffMultiplier",
            "retryableStatusCodes",
            "perAttemptRecvTimeout",
        ],
    )?;
    let attempts_at = format!("{at}.maxAttempts");
    let attempts_value = field(object, at, "maxAttempts")?;
    let max_attempts = number(attempts_value)
        .filter(|n| n.fract() == 0.0 && *n > 1.0)
        .ok_or_else(|| {
            error(
                &attempts_at,
                "expected an integer greater than 1",
                attempts_value,
            )
        })?;
    let initial_backoff = parse_duration(
        field(object, at, "initialBackoff")?,
        &format!("{at}.initialBackoff"),
    )?;
    let max_backoff = parse_duration(
        field(object, at, "maxBackoff")?,
        &format!("{at}.maxBackoff"),
    )?;
    let multiplier_value = field(object, at, "backoffMultiplier")?;
    let backoff_multiplier = number(multiplier_value)
        .filter(|n| *n > 0.0 && n.is_finite())
        .ok_or_else(|| {
            error(
                &format!("{at}.backoffMultiplier"),
                "expected a number greater than 0",
                multiplier_value,
            )
        })?;
    let codes_at = format!("{at}.retryableStatusCodes");
    let codes_value = field(object, at, "retryableStatusCodes")?;
    let codes = codes_value
        .as_array()
        .filter(|list| !list.is_empty())
        .ok_or_else(|| {
            error(
                &codes_at,
                "expected a non-empty list of status codes",
                codes_value,
            )
        })?;
    let mut retryable = 0u32;
    for (index, code) in codes.iter().enumerate() {
        retryable |= 1 << parse_status_code(code, &format!("{codes_at}[{index}]"))?;
    }
    let per_attempt_recv_timeout = match object.get("perAttemptRecvTimeout") {
        None => None,
        Some(value) => Some(parse_duration(
            value,
            &format!("{at}.perAttemptRecvTimeout"),
        )?),
    };
    Ok(RetryPolicy {
        max_attempts: (max_attempts as u32).min(MAX_ATTEMPTS_CAP),
        initial_backoff,
        max_backoff,
        backoff_multiplier,
        retryable,
        per_attempt_recv_timeout,
    })
}

fn parse_hedging(value: &Value, at: &str) -> Result<HedgingPolicy, PolicyError> {
    let object = as_object(value, at)?;
    reject_unknown(
        object,
        at,
        &["maxAttempts", "hedgingDelay", "nonFatalStatusCodes"],
    )?;
    let attempts_value = field(object, at, "maxAttempts")?;
    let max_attempts = number(attempts_value)
        .filter(|n| n.fract() == 0.0 && *n > 1.0)
        .ok_or_else(|| {
            error(
                &format!("{at}.maxAttempts"),
                "expected an integer greater than 1",
                attempts_value,
            )
        })?;
    let delay = match object.get("hedgingDelay") {
        None => Duration::ZERO,
        Some(Value::String(text)) if text.trim() == "0s" => Duration::ZERO,
        Some(value) => parse_duration(value, &format!("{at}.hedgingDelay"))?,
    };
    let mut non_fatal = 0u32;
    if let Some(codes) = object.get("nonFatalStatusCodes") {
        let codes_at = format!("{at}.nonFatalStatusCodes");
        let list = codes
            .as_array()
            .ok_or_else(|| error(&codes_at, "expected a list of status codes", codes))?;
        for (index, code) in list.iter().enumerate() {
            non_fatal |= 1 << parse_status_code(code, &format!("{codes_at}[{index}]"))?;
        }
    }
    Ok(HedgingPolicy {
        max_attempts: (max_attempts as u32).min(MAX_ATTEMPTS_CAP),
        delay,
        non_fatal,
    })
}

fn parse_status_code(value: &Value, at: &str) -> Result<u32, PolicyError> {
    let code = match value {
        Value::String(name) => Code::from_name(name),
        other => number(other)
            .filter(|n| n.fract() == 0.0 && *n >= 0.0 && *n <= 16.0)
            .map(|n| Code::from_u32(n as u32)),
    };
    match code.map(|code| code as u32) {
        Some(0) => Err(error(
            at,
            "OK is not a failure and cannot be retried; expected a status code such as UNAVAILABLE",
            value,
        )),
        Some(code) => Ok(code),
        None => Err(error(
            at,
            "expected a gRPC status code name (e.g. UNAVAILABLE) or number 1-16",
            value,
        )),
    }
}

fn parse_throttling(value: &Value, at: &str) -> Result<ThrottlingPolicy, PolicyError> {
    let object = as_object(value, at)?;
    reject_unknown(object, at, &["maxTokens", "tokenRatio"])?;
    let tokens_value = field(object, at, "maxTokens")?;
    let max_tokens = number(tokens_value)
        .filter(|n| *n > 0.0 && *n <= 1000.0 && n.fract() == 0.0)
        .ok_or_else(|| {
            error(
                &format!("{at}.maxTokens"),
                "expected an integer from 1 to 1000",
                tokens_value,
            )
        })?;
    let ratio_value = field(object, at, "tokenRatio")?;
    let token_ratio = number(ratio_value)
        .filter(|n| *n > 0.0 && n.is_finite())
        .ok_or_else(|| {
            error(
                &format!("{at}.tokenRatio"),
                "expected a number greater than 0",
                ratio_value,
            )
        })?;
    Ok(ThrottlingPolicy {
        max_milli_tokens: max_tokens as u32 * 1000,
        milli_token_ratio: milli_ratio(token_ratio),
    })
}

/// The token ratio in thousandths, truncated as gRPC does (0.1239 is 0.123). The tiny nudge keeps
/// binary floating point from truncating 0.57 (stored as 0.56999...) to 0.569.
fn milli_ratio(ratio: f64) -> u32 {
    let scaled = (ratio * 1000.0 * (1.0 + 1e-12)).trunc();
    // Validation bounds the ratio above zero; a ratio of 0.0004 still refills, just slowly.
    scaled.clamp(1.0, f64::from(u32::MAX)) as u32
}

/// A number given as a number or as a numeric string (YAML users write both).
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A protobuf JSON duration: decimal seconds with an `s` suffix ("0.1s", "5s"), greater than 0.
pub fn parse_duration(value: &Value, at: &str) -> Result<Duration, PolicyError> {
    let parsed = value
        .as_str()
        .and_then(|text| text.strip_suffix('s'))
        .filter(|seconds| {
            !seconds.is_empty() && seconds.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .and_then(|seconds| seconds.parse::<f64>().ok())
        .filter(|seconds| *seconds > 0.0 && seconds.is_finite() && *seconds < 315_576_000_000.0);
    parsed.map(Duration::from_secs_f64).ok_or_else(|| {
        error(
            at,
            "expected a duration greater than 0 as seconds with an s suffix, like \"0.1s\"",
            value,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn retry_config(policy: Value) -> Value {
        json!({"methodConfig": [{"name": [{"service": "echo.Echo"}], "retryPolicy": policy}]})
    }

    fn good_policy() -> Value {
        json!({"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "resource_exhausted", 4]})
    }

    fn parse_err(value: Value) -> String {
        ServiceConfig::parse(&value, "serviceConfig")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn design_example_parses() {
        let mut config = retry_config(good_policy());
        config["retryThrottling"] = json!({"maxTokens": 10, "tokenRatio": 0.1});
        let parsed = ServiceConfig::parse(&config, "serviceConfig").unwrap();
        let retry = parsed
            .for_path("/echo.Echo/Unary")
            .unwrap()
            .retry
            .clone()
            .unwrap();
        assert_eq!(retry.max_attempts, 4);
        assert!(
            retry.is_retryable(Code::Unavailable)
                && retry.is_retryable(Code::ResourceExhausted)
                && retry.is_retryable(Code::DeadlineExceeded)
        );
        assert!(!retry.is_retryable(Code::InvalidArgument));
        assert_eq!(retry.per_attempt_recv_timeout, None);
        let throttling = parsed.throttling.unwrap();
        assert_eq!(throttling.max_milli_tokens, 10_000);
        assert_eq!(throttling.milli_token_ratio, 100);
    }

    #[test]
    fn max_attempts_above_five_is_capped() {
        let mut policy = good_policy();
        policy["maxAttempts"] = json!(9);
        let parsed = ServiceConfig::parse(&retry_config(policy), "s").unwrap();
        assert_eq!(
            parsed
                .for_path("/echo.Echo/X")
                .unwrap()
                .retry
                .as_ref()
                .unwrap()
                .max_attempts,
            5
        );
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            ("maxAttempts", json!(1), "retryPolicy.maxAttempts"),
            ("initialBackoff", json!("0s"), "retryPolicy.initialBackoff"),
            ("maxBackoff", json!("1"), "retryPolicy.maxBackoff"),
            (
                "backoffMultiplier",
                json!(0),
                "retryPolicy.backoffMultiplier",
            ),
            (
                "retryableStatusCodes",
                json!([]),
                "retryPolicy.retryableStatusCodes",
            ),
            (
                "retryableStatusCodes",
                json!(["NOPE"]),
                "retryPolicy.retryableStatusCodes[0]",
            ),
            (
                "retryableStatusCodes",
                json!(["OK"]),
                "retryPolicy.retryableStatusCodes[0]",
            ),
        ];
        for (key, bad, path) in cases {
            let mut policy = good_policy();
            policy[key] = bad;
            let err = parse_err(retry_config(policy));
            assert!(
                err.starts_with(&format!("serviceConfig.methodConfig[0].{path}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_field_is_reported() {
        let mut policy = good_policy();
        policy.as_object_mut().unwrap().remove("maxBackoff");
        assert!(parse_err(retry_config(policy)).contains("retryPolicy.maxBackoff: required"));
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let config = json!({"methodConfig": [
            {"name": [{"service": "a.A"}]},
            {"name": [{"service": "b.B"}, {"service": "a.A"}]}
        ]});
        assert!(parse_err(config).contains("methodConfig[1].name[1]"));
    }

    #[test]
    fn most_specific_name_wins() {
        let config = json!({"methodConfig": [
            {"name": [{}], "timeout": "1s"},
            {"name": [{"service": "a.A"}], "timeout": "2s"},
            {"name": [{"service": "a.A", "method": "M"}], "timeout": "3s"}
        ]});
        let parsed = ServiceConfig::parse(&config, "s").unwrap();
        let timeout = |path| parsed.for_path(path).unwrap().timeout.unwrap().as_secs();
        assert_eq!(timeout("/a.A/M"), 3);
        assert_eq!(timeout("/a.A/Other"), 2);
        assert_eq!(timeout("/b.B/M"), 1);
    }

    #[test]
    fn throttling_is_validated() {
        let err = parse_err(json!({"retryThrottling": {"maxTokens": 0, "tokenRatio": 0.1}}));
        assert!(err.contains("retryThrottling.maxTokens"), "{err}");
        let err = parse_err(json!({"retryThrottling": {"maxTokens": 10}}));
        assert!(
            err.contains("retryThrottling.tokenRatio: required"),
            "{err}"
        );
    }

    #[test]
    fn backoff_stays_within_a6_bounds() {
        let policy = ServiceConfig::parse(&retry_config(good_policy()), "s")
            .unwrap()
            .for_path("/echo.Echo/U")
            .unwrap()
            .retry
            .clone()
            .unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        for n in 1..=8u32 {
            let base = (0.05 * 2f64.powi(n as i32 - 1)).min(1.0);
            for _ in 0..1000 {
                let delay = policy.backoff(n, rng.f64()).as_secs_f64();
                assert!(
                    delay >= base * 0.8 - 1e-9 && delay < base * 1.2 + 1e-9,
                    "retry {n}: {delay}"
                );
            }
        }
        assert_eq!(policy.backoff(1, 0.5), Duration::from_millis(50));
        assert_eq!(policy.backoff(10, 0.0), Duration::from_millis(800));
    }

    #[test]
    fn token_ratio_is_truncated_to_three_decimals() {
        for (ratio, milli) in [(0.1239, 123), (0.57, 570), (1.0, 1000), (0.0005, 1)] {
            let config = json!({"retryThrottling": {"maxTokens": 5, "tokenRatio": ratio}});
            let parsed = ServiceConfig::parse(&config, "s").unwrap();
            assert_eq!(
                parsed.throttling.unwrap().milli_token_ratio,
                milli,
                "{ratio}"
            );
        }
    }

    #[test]
    fn per_attempt_recv_timeout_and_wait_for_ready_are_parsed() {
        let mut policy = good_policy();
        policy["perAttemptRecvTimeout"] = json!("0.3s");
        let mut config = retry_config(policy);
        config["methodConfig"][0]["waitForReady"] = json!(true);
        let parsed = ServiceConfig::parse(&config, "s").unwrap();
        let method = parsed.for_path("/echo.Echo/Unary").unwrap();
        assert!(method.wait_for_ready);
        assert_eq!(
            method.retry.as_ref().unwrap().per_attempt_recv_timeout,
            Some(Duration::from_millis(300))
        );
        let mut bad = good_policy();
        bad["perAttemptRecvTimeout"] = json!("soon");
        assert!(parse_err(retry_config(bad)).contains("retryPolicy.perAttemptRecvTimeout"));
        let mut config = retry_config(good_policy());
        config["methodConfig"][0]["waitForReady"] = json!("yes");
        assert!(parse_err(config).contains("methodConfig[0].waitForReady"));
    }

    #[test]
    fn hedging_policy_parses_and_excludes_retry() {
        let config = json!({"methodConfig": [{"name": [{}], "hedgingPolicy":
            {"maxAttempts": 9, "hedgingDelay": "0.05s", "nonFatalStatusCodes": ["UNAVAILABLE"]}}]});
        let parsed = ServiceConfig::parse(&config, "s").unwrap();
        let hedging = parsed.for_path("/a.A/M").unwrap().hedging.clone().unwrap();
        assert_eq!(hedging.max_attempts, 5, "capped as maxAttempts always is");
        assert_eq!(hedging.delay, Duration::from_millis(50));
        assert!(hedging.is_non_fatal(Code::Unavailable));
        assert!(!hedging.is_non_fatal(Code::Internal));
        let config = json!({"methodConfig": [{"name": [{}], "hedgingPolicy": {"maxAttempts": 2}}]});
        let parsed = ServiceConfig::parse(&config, "s").unwrap();
        assert_eq!(
            parsed
                .for_path("/a.A/M")
                .unwrap()
                .hedging
                .as_ref()
                .unwrap()
                .delay,
            Duration::ZERO
        );
        let mut both = retry_config(good_policy());
        both["methodConfig"][0]["hedgingPolicy"] = json!({"maxAttempts": 2});
        assert!(parse_err(both).contains("exclusive"));
    }

    #[test]
    fn fields_the_sidecar_does_not_enforce_are_refused_by_name() {
        for (key, value, says) in [
            ("maxRequestMessageBytes", json!(1024), "not enforced"),
            ("maxResponseMessageBytes", json!(1024), "not enforced"),
        ] {
            let mut config = retry_config(good_policy());
            config["methodConfig"][0][key] = value;
            let message = parse_err(config);
            assert!(
                message.contains(&format!("methodConfig[0].{key}")) && message.contains(says),
                "{message}"
            );
        }
    }

    #[test]
    fn load_balancing_fields_are_refused() {
        for key in ["loadBalancingConfig", "loadBalancingPolicy"] {
            let mut config = retry_config(good_policy());
            config[key] = json!("round_robin");
            let message = parse_err(config);
            assert!(
                message.contains(&format!("serviceConfig.{key}"))
                    && message.contains("not supported"),
                "{message}"
            );
        }
    }

    #[test]
    fn status_codes_parse_by_any_case_name_or_number() {
        let mut policy = good_policy();
        policy["retryableStatusCodes"] = json!(["data_loss", "Aborted", 16]);
        let parsed = ServiceConfig::parse(&retry_config(policy), "s").unwrap();
        let retry = parsed
            .for_path("/echo.Echo/X")
            .unwrap()
            .retry
            .clone()
            .unwrap();
        for code in [Code::DataLoss, Code::Aborted, Code::Unauthenticated] {
            assert!(retry.is_retryable(code), "{code}");
        }
        assert!(!retry.is_retryable(Code::Unavailable));
    }
}
