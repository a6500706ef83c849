//! The admin listener: `/live` (the process is serving) and `/ready` (listeners bound and every
//! upstream's endpoint source has delivered its first full view), for Kubernetes probes;
//! `/endpoints` and `/metrics` for tools; and `/`, a self-contained status page for people (it
//! polls `/status.json`), because a live view should not need Prometheus and Grafana.

mod status;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::endpoints::ranking::{RankingWatch, SpillView};

/// The status page: one file with its styles and script inline, so it works offline.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// What the admin endpoints report on.
pub struct AdminState {
    pub started: AtomicBool,
    pub draining: AtomicBool,
    pub upstreams: Vec<(Arc<str>, RankingWatch)>,
    /// The live policy in force, for the status page's config version.
    pub policy: crate::config::live::PolicyWatch,
    /// The outbound connections, for how each endpoint is reached (`connection`).
    pub pool: Option<Arc<crate::wire::quic::ConnectionPool>>,
}

impl AdminState {
    /// Ready once started, not draining, and every upstream has synced its endpoints.
    pub fn not_ready_reason(&self) -> Option<String> {
        if !self.started.load(Ordering::Acquire) {
            return Some("starting".to_string());
        }
        if self.draining.load(Ordering::Acquire) {
            return Some("shutting down".to_string());
        }
        self.upstreams
            .iter()
            .find(|(_, ranking)| !ranking.borrow().synced)
            .map(|(name, _)| format!("upstream {name}: endpoints not synced yet"))
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn route(
    state: Arc<AdminState>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".to_string(),
        ));
    }
    Ok(match request.uri().path() {
        "/" => {
            let mut response = text(StatusCode::OK, STATUS_PAGE.to_string());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        "/status.json" => {
            refresh_gauges(&state);
            let mut response = json(StatusCode::OK, status_view(&state));
            // Always current: the page polls it.
            response.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            response
        }
        "/live" => text(StatusCode::OK, "live\n".to_string()),
        "/endpoints" if request.uri().query() == Some("summary") => {
            json(StatusCode::OK, endpoints_summary(&state))
        }
        "/endpoints" => json(StatusCode::OK, endpoints_view(&state)),
        "/metrics" => {
            refresh_gauges(&state);
            let accept = request
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|value| value.to_str().ok());
            let format = crate::metrics::negotiate(accept);
            let mut response = text(StatusCode::OK, crate::metrics::metrics().render(format));
            let headers = response.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(format.content_type()),
            );
            // Caches between scraper and sidecar must not hand one format to the other.
            headers.insert(http::header::VARY, http::HeaderValue::from_static("accept"));
            response
        }
        "/ready" => match state.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n".to_string()),
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try / (status page), /live, /ready, /endpoints, /metrics or /status.json\n"
                .to_string(),
        ),
    })
}

/// Gauges that describe current state are computed at scrape time: ejections end by
/// themselves and endpoint counts follow discovery, so a value set at event time would go stale.
fn refresh_gauges(state: &AdminState) {
    let metrics = crate::metrics::metrics();
    for (name, ranking) in &state.upstreams {
        let ranking = ranking.borrow().clone();
        metrics
            .ejected_endpoints
            .get_or_create(&crate::metrics::upstream(name.clone()))
            .set(ranking.ejected() as i64);
        let spill = ranking.spill_view();
        metrics
            .spill_depth
            .get_or_create(&crate::metrics::upstream(name.clone()))
            .set(spill.depth as i64);
        for load in &spill.tiers {
            metrics
                .tier_load
                .get_or_create(&crate::metrics::TierLabels {
                    upstream: name.clone(),
                    tier: load.tier.as_str(),
                })
                .set(load.per_endpoint());
        }
        for (tier, members) in &ranking.tiers {
            metrics
                .endpoints
                .get_or_create(&crate::metrics::TierLabels {
                    upstream: name.clone(),
                    tier: tier.as_str(),
                })
                .set(members.len() as i64);
        }
    }
}

/// Per upstream, how many endpoints each tier has: cheap to poll even for huge Services.
fn endpoints_summary(state: &AdminState) -> serde_json::Value {
    let upstreams: Vec<serde_json::Value> = state
        .upstreams
        .iter()
        .map(|(name, ranking)| {
            let ranking = ranking.borrow().clone();
            let tiers: serde_json::Map<String, serde_json::Value> = ranking
                .tiers
                .iter()
                .map(|(tier, members)| (tier.as_str().to_string(), members.len().into()))
                .collect();
            serde_json::json!({
                "upstream": &**name,
                "synced": ranking.synced,
                "endpoints": ranking.endpoints().count(),
                "ejected": ranking.ejected(),
                "tiers": tiers,
            })
        })
        .collect();
    serde_json::json!({ "upstreams": upstreams })
}

/// Per upstream, its endpoints in the order they are tried: best tier first.
fn endpoints_view(state: &AdminState) -> serde_json::Value {
    let upstreams: Vec<serde_json::Value> = state
        .upstreams
        .iter()
        .map(|(name, ranking)| {
            let ranking = ranking.borrow().clone();
            let spill = ranking.spill_view();
            let endpoints: Vec<serde_json::Value> = ranking
                .endpoints()
                .map(|ranked| {
                    let endpoint = &ranked.endpoint;
                    serde_json::json!({
                        "pod": endpoint.pod,
                        "address": endpoint.address.to_string(),
                        "node": endpoint.node,
                        "zone": endpoint.zone,
                        "hostIP": endpoint.host_ip.map(|ip| ip.to_string()),
                        "tier": ranked.tier.as_str(),
                        "inFlight": ranked.load.in_flight(),
                        "waiting": ranked.load.waiting(),
                        "latencyMs": ranked.load.latency().map(|l| l.as_secs_f64() * 1000.0),
                        "candidate": spill.tiers.iter().any(|t| t.tier == ranked.tier && t.candidate),
                        "ejected": ranked.load.is_ejected(),
                        "connection": state.pool.as_ref().and_then(|pool| pool.connection_state(endpoint.address)),
                    })
                })
                .collect();
            serde_json::json!({
                "upstream": &**name,
                "synced": ranking.synced,
                "spill": spill_json(&spill),
                "endpoints": endpoints,
            })
        })
        .collect();
    serde_json::json!({ "upstreams": upstreams })
}

/// The spill-over state and why: which tiers take calls, and the load that put them there.
fn spill_json(spill: &SpillView) -> serde_json::Value {
    let state = if !spill.enabled {
        "strict"
    } else if spill.depth == 0 {
        "local"
    } else {
        "spilling"
    };
    let tiers: Vec<serde_json::Value> = spill
        .tiers
        .iter()
        .map(|load| {
            serde_json::json!({
                "tier": load.tier.as_str(),
                "healthy": load.healthy,
                "waiting": load.waiting,
                "loadPerEndpoint": load.per_endpoint(),
                "candidate": load.candidate,
            })
        })
        .collect();
    let reason = if !spill.enabled {
        "locality.strict: the best tier takes every call while it has a healthy endpoint"
            .to_string()
    } else if spill.depth == 0 {
        format!(
            "load {:.2} waiting calls stays under the high mark {} per endpoint of the best tier",
            spill.offered, spill.high
        )
    } else {
        format!(
            "load {:.2} waiting calls went above {} per endpoint; the next tier leaves once it would stay under {}",
            spill.offered, spill.high, spill.low
        )
    };
    serde_json::json!({
        "state": state,
        "extraTiers": spill.depth,
        "offeredLoad": spill.offered,
        "band": {"low": spill.low, "high": spill.high},
        "reason": reason,
        "tiers": tiers,
    })
}

/// What the status page shows: per upstream the `/endpoints` snapshot (all of its fields) with
/// call statistics under `stats`, the config in force, certificate expiry, and the process's
/// other series.
fn status_view(state: &AdminState) -> serde_json::Value {
    let samples = status::parse_samples(&crate::metrics::metrics().encode());
    let mut view = endpoints_view(state);
    if let Some(upstreams) = view["upstreams"].as_array_mut() {
        for upstream in upstreams {
            let name = String::from(upstream["upstream"].as_str().unwrap_or_default());
            upstream["stats"] = status::upstream_stats(&samples, &name);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs_f64())
        .unwrap_or_default();
    let policy = state.policy.borrow().clone();
    view["sidecar"] = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pod": std::env::var("POD_NAME").ok(),
        "namespace": std::env::var("POD_NAMESPACE").ok(),
        "node": std::env::var("NODE_NAME").ok(),
        "notReadyReason": state.not_ready_reason(),
        "nowUnix": now,
    });
    view["config"] = status::config(&samples, &policy);
    view["certificates"] = status::certificates(&samples, now).into();
    view["process"] = serde_json::json!(status::series(&samples, None));
    view
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = text(status, format!("{value:#}\n"));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves the admin endpoints until aborted. Connections are owned here, so stopping this task
/// also stops any kept-alive scraper connection rather than leaving it behind.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    let mut connections = tokio::task::JoinSet::new();
    // Accept failures (out of file descriptors and the like) repeat while they last: logged
    // when they start and when they stop, not on every retry.
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "admin listener cannot accept connections");
                    failing = true;
                }
                // Back off instead of spinning on a condition that needs time to clear.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            tracing::info!("admin listener accepting connections again");
        }
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| route(state.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
