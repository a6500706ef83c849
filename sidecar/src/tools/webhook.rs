//! `locality-sidecar webhook`: a Kubernetes mutating admission webhook that adds the sidecar to
//! pods annotated `locality-sidecar.io/inject: enabled`, so a user annotates a pod template and
//! the sidecar appears, the way Istio and Linkerd inject theirs. It makes exactly the change
//! `locality-sidecar inject` makes to a Pod (the same function, [`inject::inject_pod`]).
//!
//! Protocol: `POST /mutate` with an `admission.k8s.io/v1` AdmissionReview over HTTPS. The answer
//! carries the request's uid and, when the pod changes, a base64 RFC 6902 JSON Patch computed as
//! the difference between the pod as sent and the pod after injection. A pod that already has
//! the sidecar produces no difference, so the API server's re-invocation (`reinvocationPolicy:
//! IfNeeded`) never adds a second one. Pods without the annotation are allowed untouched.
//! A body that is not an AdmissionReview gets HTTP 400 with the reason; an annotated pod whose
//! options are invalid (a bad port, an unknown `inject` value) is *denied* with the reason, so
//! the user sees it when the pod is created instead of a pod running without its sidecar.
//!
//! Per-pod options come from annotations, each falling back to the webhook's own flags:
//! `locality-sidecar.io/app-port`, `.../image`, `.../configmap`, `.../secret`,
//! `.../service-account` (which, unlike inject's flag, also replaces the `default` account the
//! API server fills in before webhooks run).
//!
//! The serving certificate (cert-manager renews it) is re-read when its files change: a poll of
//! both files' modification time and length every second swaps the key for new handshakes;
//! connections already open keep theirs. A bad new pair is logged once and the old one stays.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::{json, Value as Json};

use super::inject::{self, InjectOptions, APP_PORT_ANNOTATION};

/// Set to `enabled` on a pod (template) to have the sidecar injected; `disabled` or absent
/// leaves the pod alone.
pub const INJECT_ANNOTATION: &str = "locality-sidecar.io/inject";
pub const IMAGE_ANNOTATION: &str = "locality-sidecar.io/image";
pub const CONFIGMAP_ANNOTATION: &str = "locality-sidecar.io/configmap";
pub const SECRET_ANNOTATION: &str = "locality-sidecar.io/secret";
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "locality-sidecar.io/service-account";
/// The AdmissionReview version served; the MutatingWebhookConfiguration asks for this one only.
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
/// An AdmissionReview carries the object and, for updates, its old version; etcd caps objects at
/// 1.5 MiB, so anything larger than this is not from an API server.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// How often the certificate files are checked for a change.
const CERT_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{path}: {reason}")]
    CertFile { path: PathBuf, reason: String },
    #[error("the key {key} does not belong to the certificate {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the webhook serves with.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// What a pod gets when its annotations say nothing else.
    pub defaults: InjectOptions,
}

/// The reply to one HTTP request body, decided without any I/O.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// HTTP 200 with this AdmissionReview.
    Review(Json),
    /// HTTP 400: the body is not an AdmissionReview this webhook can answer.
    BadRequest(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: String,
    kind: String,
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
struct RequestIn {
    uid: String,
    #[serde(default)]
    kind: Option<KindIn>,
    #[serde(default)]
    object: Option<Json>,
}

#[derive(Deserialize)]
struct KindIn {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// Answers one AdmissionReview body.
pub fn review(body: &[u8], defaults: &InjectOptions) -> Reply {
    let parsed: ReviewIn = match serde_json::from_slice(body) {
        Ok(parsed) => parsed,
        Err(error) => {
            return Reply::BadRequest(format!(
                "expected an AdmissionReview ({ADMISSION_API_VERSION}) as JSON: {error}"
            ))
        }
    };
    if parsed.api_version != ADMISSION_API_VERSION || parsed.kind != "AdmissionReview" {
        return Reply::BadRequest(format!(
            "expected apiVersion {ADMISSION_API_VERSION} kind AdmissionReview, found apiVersion {} kind {}",
            parsed.api_version, parsed.kind
        ));
    }
    let Some(request) = parsed.request else {
        return Reply::BadRequest("the AdmissionReview has no request".to_string());
    };
    if request.uid.is_empty() {
        return Reply::BadRequest("the AdmissionReview request has no uid".to_string());
    }
    let is_pod = request
        .kind
        .as_ref()
        .is_none_or(|kind| kind.group.is_empty() && kind.kind == "Pod");
    let outcome = match request.object {
        Some(pod) if is_pod => decide(&pod, defaults),
        // Deletions carry no object, and other kinds are not ours: the configuration only
        // sends pod creations, so these are allowed as they are.
        _ => Ok(None),
    };
    Reply::Review(response(&request.uid, outcome))
}

/// The patch for one pod: `Ok(None)` leaves it as it is, `Err` denies its creation.
pub fn decide(pod: &Json, defaults: &InjectOptions) -> Result<Option<Vec<Json>>, String> {
    let empty = serde_json::Map::new();
    let annotations = pod
        .pointer("/metadata/annotations")
        .and_then(Json::as_object)
        .unwrap_or(&empty);
    let Some(options) = pod_options(annotations, defaults)? else {
        return Ok(None);
    };
    let mut pod_in = pod.clone();
    if let Some(account) = &options.service_account {
        claim_default_service_account(&mut pod_in, account);
    }
    let mut injected: serde_yaml_ng::Value = serde_yaml_ng::to_value(&pod_in)
        .map_err(|error| format!("cannot read the pod as an object: {error}"))?;
    inject::inject_pod(&mut injected, &options).map_err(|error| error.to_string())?;
    let after = serde_json::to_value(&injected)
        .map_err(|error| format!("cannot write the injected pod: {error}"))?;
    let patch = diff(pod, &after);
    Ok((!patch.is_empty()).then_some(patch))
}

/// By the time a webhook sees a pod, the API server's ServiceAccount admission has named
/// `default` for a pod that named no account, so inject's "only where none is named" would never
/// apply the service-account annotation. An explicit annotation therefore also replaces
/// `default`; an account the pod names itself is kept.
fn claim_default_service_account(pod: &mut Json, account: &str) {
    let Some(spec) = pod.get_mut("spec").and_then(Json::as_object_mut) else {
        return;
    };
    let unnamed = ["serviceAccountName", "serviceAccount"]
        .iter()
        .all(|key| matches!(spec.get(*key), None | Some(Json::Null)) || spec[*key] == "default");
    if unnamed {
        spec.remove("serviceAccount");
        spec.insert(
            "serviceAccountName".to_string(),
            Json::String(account.to_string()),
        );
        // The deprecated alias must agree with the name, or the API server rejects the pod.
        spec.insert(
            "serviceAccount".to_string(),
            Json::String(account.to_string()),
        );
    }
}

/// The inject options an annotated pod asks for, or `None` when it does not ask for the sidecar.
fn pod_options(
    annotations: &serde_json::Map<String, Json>,
    defaults: &InjectOptions,
) -> Result<Option<InjectOptions>, String> {
    let get = |key: &str| -> Result<Option<&str>, String> {
        match annotations.get(key) {
            None => Ok(None),
            Some(Json::String(value)) => Ok(Some(value.as_str())),
            Some(other) => Err(format!(
                "annotation {key}: expected a string, found {other}"
            )),
        }
    };
    match get(INJECT_ANNOTATION)? {
        None | Some("disabled") => return Ok(None),
        Some("enabled") => {}
        Some(other) => {
            return Err(format!(
            "annotation {INJECT_ANNOTATION}: expected \"enabled\" or \"disabled\", found {other:?}"
        ))
        }
    }
    let mut options = defaults.clone();
    if let Some(port) = get(APP_PORT_ANNOTATION)? {
        options.app_port = Some(match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                return Err(format!(
                "annotation {APP_PORT_ANNOTATION}: expected a port from 1 to 65535, found {port:?}"
            ))
            }
        });
    }
    if let Some(image) = get(IMAGE_ANNOTATION)? {
        options.image = image.to_string();
    }
    if let Some(configmap) = get(CONFIGMAP_ANNOTATION)? {
        options.configmap = configmap.to_string();
    }
    if let Some(secret) = get(SECRET_ANNOTATION)? {
        options.secret = secret.to_string();
    }
    if let Some(account) = get(SERVICE_ACCOUNT_ANNOTATION)? {
        options.service_account = Some(account.to_string());
    }
    Ok(Some(options))
}

/// The AdmissionReview answering request `uid`.
fn response(uid: &str, outcome: Result<Option<Vec<Json>>, String>) -> Json {
    let answer = match outcome {
        Ok(None) => json!({ "uid": uid, "allowed": true }),
        Ok(Some(patch)) => {
            let text = Json::Array(patch).to_string();
            json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(text),
            })
        }
        Err(message) => json!({
            "uid": uid,
            "allowed": false,
            "status": {
                "code": 400,
                "message": format!("locality-sidecar injection: {message}"),
            },
        }),
    };
    json!({
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "AdmissionReview",
        "response": answer,
    })
}

/// An RFC 6902 patch turning `before` into `after`: objects are compared key by key, anything
/// else (lists included) is replaced whole where it differs. Whole lists keep the patch short
/// and make no assumption about what other webhooks did to the list's order.
pub fn diff(before: &Json, after: &Json) -> Vec<Json> {
    let mut patch = Vec::new();
    diff_at(before, after, "", &mut patch);
    patch
}

fn diff_at(before: &Json, after: &Json, path: &str, patch: &mut Vec<Json>) {
    match (before, after) {
        (Json::Object(old), Json::Object(new)) => {
            for key in old.keys() {
                if !new.contains_key(key) {
                    patch.push(json!({ "op": "remove", "path": pointer(path, key) }));
                }
            }
            for (key, value) in new {
                let at = pointer(path, key);
                match old.get(key) {
                    None => patch.push(json!({ "op": "add", "path": at, "value": value })),
                    Some(previous) => diff_at(previous, value, &at, patch),
                }
            }
        }
        _ if before != after => {
            patch.push(json!({ "op": "replace", "path": path, "value": after }));
        }
        _ => {}
    }
}

/// `path` extended by one key, escaped as RFC 6901 says (`~` → `~0`, `/` → `~1`): annotation
/// and label keys contain slashes.
fn pointer(path: &str, key: &str) -> String {
    format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// The serving certificate, swapped when its files change.
#[derive(Debug)]
struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock only means a writer panicked mid-swap; the value is still a whole Arc.
        Some(match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        })
    }
}

/// Reads a certificate chain and its key, checking that they belong together.
fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, WebhookError> {
    let file_error = |path: &Path, reason: String| WebhookError::CertFile {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(cert, format!("expected PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no certificate in the file".to_string()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error(key, format!("expected a PEM private key: {e}")))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| file_error(key, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|_| WebhookError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })?;
    Ok(certified)
}

/// What identifies one version of a file without reading it.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Polls the files and swaps the key when they change. Runs until the process ends.
async fn watch_cert(resolver: Arc<ReloadingCert>, cert: PathBuf, key: PathBuf) {
    let mut seen = (stamp(&cert), stamp(&key));
    let mut ticker = tokio::time::interval(CERT_POLL);
    loop {
        ticker.tick().await;
        let now = (stamp(&cert), stamp(&key));
        if now == seen {
            continue;
        }
        // Seen even when loading fails: one log line per change, and the next write (the other
        // file of a pair written one after the other) is a change of its own.
        seen = now;
        match load_certified_key(&cert, &key) {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                match resolver.current.write() {
                    Ok(mut current) => *current = loaded,
                    Err(poisoned) => *poisoned.into_inner() = loaded,
                }
                tracing::info!(cert = %cert.display(), "webhook certificate reloaded");
            }
            Err(error) => {
                tracing::warn!(%error, "webhook certificate changed but cannot be used; keeping the previous one");
            }
        }
    }
}

/// Serves until the process ends. Fails only at start-up (certificate, bind).
pub async fn serve(options: WebhookOptions) -> Result<(), WebhookError> {
    let first = load_certified_key(&options.cert, &options.key)?;
    let resolver = Arc::new(ReloadingCert {
        current: RwLock::new(Arc::new(first)),
    });
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: options.listen,
            source,
        })?;
    let local = listener.local_addr().unwrap_or(options.listen);
    tracing::info!(listen = %local, image = %options.defaults.image, "admission webhook serving /mutate");
    tokio::spawn(watch_cert(
        resolver,
        options.cert.clone(),
        options.key.clone(),
    ));
    let defaults = Arc::new(options.defaults);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let defaults = defaults.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                };
            let service = hyper::service::service_fn(move |request| {
                let defaults = defaults.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(request, &defaults).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %error, "webhook connection ended with an error");
            }
        });
    }
}

async fn handle(request: Request<Incoming>, defaults: &InjectOptions) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".to_string()),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(error) => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                        "cannot read the request body (at most {MAX_BODY_BYTES} bytes): {error}\n"
                    ),
                    )
                }
            };
            match review(&body, defaults) {
                Reply::Review(answer) => {
                    log_answer(&answer);
                    let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    response
                }
                Reply::BadRequest(message) => {
                    // Warn once (a misconfigured caller repeats itself); the rest at debug.
                    static WARNED: std::sync::atomic::AtomicBool =
                        std::sync::atomic::AtomicBool::new(false);
                    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::debug!(%message, "webhook: malformed AdmissionReview");
                    } else {
                        tracing::warn!(%message, "webhook: malformed AdmissionReview (further ones are logged at debug level)");
                    }
                    text(StatusCode::BAD_REQUEST, format!("{message}\n"))
                }
            }
        }
        (_, "/mutate") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview to /mutate\n".to_string(),
        ),
        (_, path) => text(
            StatusCode::NOT_FOUND,
            format!("no {path} here: POST an AdmissionReview to /mutate\n"),
        ),
    }
}

fn log_answer(answer: &Json) {
    let field = |name: &str| answer.pointer(&format!("/response/{name}")).cloned();
    let uid = field("uid").unwrap_or_default();
    if field("allowed") == Some(Json::Bool(false)) {
        let message = field("status").and_then(|s| s.get("message").cloned());
        tracing::info!(%uid, message = %message.unwrap_or_default(), "webhook denied a pod");
    } else if field("patch").is_some() {
        tracing::info!(%uid, "webhook injected the sidecar");
    } else {
        tracing::debug!(%uid, "webhook allowed a pod unchanged");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: Json) -> Json {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "generateName": "app-", "annotations": annotations },
            "spec": { "containers": [ { "name": "app", "image": "app:1" } ] }
        })
    }

    fn apply(mut value: Json, patch: &[Json]) -> Json {
        // Just enough of RFC 6902 for what `diff` emits, to check it round-trips.
        for op in patch {
            let path = op["path"].as_str().unwrap();
            let (parent, key) = path.rsplit_once('/').unwrap();
            let key = key.replace("~1", "/").replace("~0", "~");
            let target = value.pointer_mut(parent).unwrap().as_object_mut().unwrap();
            match op["op"].as_str().unwrap() {
                "remove" => {
                    target.remove(&key);
                }
                _ => {
                    target.insert(key, op["value"].clone());
                }
            }
        }
        value
    }

    #[test]
    fn diff_round_trips_and_escapes_keys() {
        let before = json!({"a": {"x/y": 1, "gone": 2}, "l": [1, 2]});
        let after = json!({"a": {"x/y": 3, "new~": 4}, "l": [0, 1, 2]});
        let patch = diff(&before, &after);
        assert!(patch.iter().any(|op| op["path"] == "/a/x~1y"));
        assert!(patch.iter().any(|op| op["path"] == "/a/new~0"));
        assert_eq!(apply(before, &patch), after);
        assert!(diff(&after, &after).is_empty());
    }

    #[test]
    fn unannotated_and_disabled_pods_are_left_alone() {
        let defaults = InjectOptions::default();
        assert_eq!(decide(&pod(json!({})), &defaults), Ok(None));
        let disabled = pod(json!({ INJECT_ANNOTATION: "disabled" }));
        assert_eq!(decide(&disabled, &defaults), Ok(None));
    }

    #[test]
    fn annotated_pod_is_injected_once() {
        let defaults = InjectOptions::default();
        let original = pod(json!({ INJECT_ANNOTATION: "enabled", APP_PORT_ANNOTATION: "8080" }));
        let patch = decide(&original, &defaults).unwrap().unwrap();
        let injected = apply(original, &patch);
        let init = injected["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init.len(), 1);
        assert_eq!(init[0]["restartPolicy"], "Always");
        assert_eq!(init[0]["image"], inject::DEFAULT_IMAGE);
        assert_eq!(decide(&injected, &defaults), Ok(None), "re-invocation");
    }

    #[test]
    fn annotations_override_the_defaults() {
        let annotated = pod(json!({
            INJECT_ANNOTATION: "enabled",
            IMAGE_ANNOTATION: "registry.example/ls:2",
            SECRET_ANNOTATION: "other-tls",
        }));
        let patch = decide(&annotated, &InjectOptions::default())
            .unwrap()
            .unwrap();
        let injected = apply(annotated, &patch);
        assert_eq!(
            injected["spec"]["initContainers"][0]["image"],
            "registry.example/ls:2"
        );
        let volumes = injected["spec"]["volumes"].to_string();
        assert!(volumes.contains("other-tls"), "{volumes}");
    }

    #[test]
    fn the_service_account_annotation_replaces_only_the_default_account() {
        let mut defaulted = pod(json!({
            INJECT_ANNOTATION: "enabled",
            SERVICE_ACCOUNT_ANNOTATION: "locality-sidecar",
        }));
        defaulted["spec"]["serviceAccountName"] = json!("default");
        defaulted["spec"]["serviceAccount"] = json!("default");
        let patch = decide(&defaulted, &InjectOptions::default())
            .unwrap()
            .unwrap();
        let injected = apply(defaulted.clone(), &patch);
        assert_eq!(injected["spec"]["serviceAccountName"], "locality-sidecar");
        assert_eq!(injected["spec"]["serviceAccount"], "locality-sidecar");

        let mut own = defaulted;
        own["spec"]["serviceAccountName"] = json!("payments");
        own["spec"]["serviceAccount"] = json!("payments");
        let patch = decide(&own, &InjectOptions::default()).unwrap().unwrap();
        assert_eq!(apply(own, &patch)["spec"]["serviceAccountName"], "payments");
    }

    #[test]
    fn bad_annotations_deny_with_the_reason() {
        let defaults = InjectOptions::default();
        let port = pod(json!({ INJECT_ANNOTATION: "enabled", APP_PORT_ANNOTATION: "http" }));
        let message = decide(&port, &defaults).unwrap_err();
        assert!(message.contains(APP_PORT_ANNOTATION), "{message}");
        let value = pod(json!({ INJECT_ANNOTATION: "true" }));
        let message = decide(&value, &defaults).unwrap_err();
        assert!(message.contains("\"enabled\""), "{message}");
    }

    #[test]
    fn malformed_reviews_are_bad_requests() {
        let defaults = InjectOptions::default();
        for body in [
            &b"not json"[..],
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u"}}"#,
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        ] {
            assert!(
                matches!(review(body, &defaults), Reply::BadRequest(_)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_answer_carries_the_uid_and_a_base64_patch() {
        let body = json!({
            "apiVersion": ADMISSION_API_VERSION,
            "kind": "AdmissionReview",
            "request": {
                "uid": "abc-123",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "object": pod(json!({ INJECT_ANNOTATION: "enabled" })),
            }
        });
        let Reply::Review(answer) = review(body.to_string().as_bytes(), &Default::default()) else {
            panic!("expected a review");
        };
        assert_eq!(answer["response"]["uid"], "abc-123");
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().unwrap())
            .unwrap();
        let patch: Vec<Json> = serde_json::from_slice(&patch).unwrap();
        assert!(!patch.is_empty());
    }
}
