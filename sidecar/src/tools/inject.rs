//! `locality-sidecar inject`: adds the sidecar to every pod template in multi-document Kubernetes
//! YAML, the way `istioctl kube-inject` or `linkerd inject` do, but without a webhook.
//!
//! What it touches, per pod template (Pod; Deployment, StatefulSet, DaemonSet, ReplicaSet in
//! `apps`; Job, CronJob in `batch`; ReplicationController; each item of a `v1` `List`):
//!
//! - `spec.initContainers`: a container named `locality-sidecar` with `restartPolicy: Always`, a
//!   *native sidecar* (Kubernetes 1.29+). It goes first, so it is started (its startup probe has
//!   passed: discovery has synced) before any other init container and the app, and it is stopped
//!   after them; a Job still completes when its app exits. The container is owned by this
//!   command: an existing one is replaced in place with the spec the options describe.
//! - A *regular* container named `locality-sidecar` (the pre-1.29 way) is removed from
//!   `spec.containers` and replaced by the native sidecar: two copies would fight over ports.
//! - `spec.volumes`: `locality-sidecar-certs` (the TLS Secret) and `locality-sidecar-config` (the
//!   ConfigMap), added only when no volume of that name exists. A volume the user already
//!   declared under that name is kept as written, which is how to supply certificates some other
//!   way (a projected volume, cert-manager's CSI driver).
//! - Pod template metadata: label `locality-sidecar.io/injected: "true"` (the PodMonitor selects
//!   on it), the `prometheus.io/*` scrape annotations when the pod has none of its own (an app's
//!   own scrape settings win; the PodMonitor covers the sidecar either way), and
//!   `locality-sidecar.io/app-port` when `--app-port` is given.
//! - `spec.serviceAccountName` when `--service-account` is given and the pod names none. The
//!   sidecar needs the service account token to watch the API, so a pod with
//!   `automountServiceAccountToken: false` must mount one another way.
//!
//! Everything else passes through unchanged, key order included; comments and anchors are not
//! kept (the YAML is re-serialized). Kinds of the same name in other API groups (custom
//! resources) are left alone. Running the command on its own output yields the same bytes.
//!
//! The whole output is built in memory, so an error leaves nothing half-written: the first
//! problem is reported with its document (1-based, counting every `---` section), the object's
//! kind/name and the field path.

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

/// The sidecar container's name, in `initContainers`.
pub const SIDECAR_NAME: &str = "locality-sidecar";
/// The image `inject` and `webhook` put in pods unless told otherwise: the name
/// `integration/build-image.sh` builds, so the path works as is on a cluster the image is loaded
/// into (kind, minikube, k3d); elsewhere push it and pass `--image` (README, deployment).
/// manifests/kustomization.yaml's `images:` entry names the same reference (a test checks).
pub const DEFAULT_IMAGE: &str = concat!("localhost/locality-sidecar:", env!("CARGO_PKG_VERSION"));
pub const DEFAULT_CONFIGMAP: &str = "locality-sidecar";
pub const DEFAULT_SECRET: &str = "locality-sidecar-tls";
/// Where the ConfigMap is mounted; its key `config.yaml` is the sidecar's config file.
pub const CONFIG_DIR: &str = "/etc/locality-sidecar";
pub const CONFIG_PATH: &str = "/etc/locality-sidecar/config.yaml";
/// Where the TLS Secret (`ca.crt`, `tls.crt`, `tls.key`) is mounted.
pub const CERTS_DIR: &str = "/certs";
/// The UDP port peers' sidecars dial (QUIC); discovery finds it by its name `grpc-h3`. The same
/// number over TCP is the HTTP/2 fallback for when UDP is blocked between nodes.
pub const QUIC_PORT: u16 = 15443;
/// The container port name of the HTTP/2 fallback (TCP at [`QUIC_PORT`]); port names are at
/// most 15 characters.
pub const H2_FALLBACK_PORT_NAME: &str = "h2-fallback";
/// `/live`, `/ready`, `/metrics`.
pub const ADMIN_PORT: u16 = 15090;
/// Pod template label marking injected pods; the PodMonitor selects on it.
pub const INJECTED_LABEL: &str = "locality-sidecar.io/injected";
/// Pod template annotation recording the app's gRPC port (`inbound.forward` in the config).
pub const APP_PORT_ANNOTATION: &str = "locality-sidecar.io/app-port";
pub const CERTS_VOLUME: &str = "locality-sidecar-certs";
pub const CONFIG_VOLUME: &str = "locality-sidecar-config";

/// What to inject. `Default` gives the published image and the names the `manifests/` use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    /// The sidecar's container image.
    pub image: String,
    /// The ConfigMap holding `config.yaml`, mounted at [`CONFIG_DIR`].
    pub configmap: String,
    /// The Secret holding `ca.crt`, `tls.crt`, `tls.key`, mounted at [`CERTS_DIR`].
    pub secret: String,
    /// The app's gRPC port, recorded in the [`APP_PORT_ANNOTATION`] annotation. The sidecar
    /// reads the port from its config (`inbound.forward: 127.0.0.1:PORT`); the annotation tells
    /// readers of the pod which port that should be.
    pub app_port: Option<u16>,
    /// Set as `spec.serviceAccountName` where a pod template names no service account.
    pub service_account: Option<String>,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: DEFAULT_IMAGE.to_string(),
            configmap: DEFAULT_CONFIGMAP.to_string(),
            secret: DEFAULT_SECRET.to_string(),
            app_port: None,
            service_account: None,
        }
    }
}

/// Why injection failed. Nothing is output when any of these is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("invalid --{option}: {message}")]
    Option {
        option: &'static str,
        message: String,
    },
    #[error("document {index}: invalid YAML: {message}")]
    Yaml { index: usize, message: String },
    #[error("document {index} ({object}): {message}")]
    Document {
        /// 1-based position in the input.
        index: usize,
        /// `Kind/name` of the object (or what is known of it).
        object: String,
        message: String,
    },
    /// A single pod (the admission webhook's input) that cannot take the sidecar.
    #[error("{object}: {message}")]
    Pod { object: String, message: String },
}

/// Adds the sidecar to every pod template in `input` (multi-document YAML or JSON) and returns
/// the documents as YAML, separated by `---`. Empty documents are dropped.
pub fn inject_documents(input: &str, options: &InjectOptions) -> Result<String, InjectError> {
    validate_options(options)?;
    let sidecar = sidecar_container(options);
    let mut rendered = Vec::new();
    for (position, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let index = position + 1;
        let mut value = Value::deserialize(document).map_err(|error| InjectError::Yaml {
            index,
            message: error.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, options, &sidecar).map_err(|(object, problem)| {
            InjectError::Document {
                index,
                object,
                message: problem.to_string(),
            }
        })?;
        let text = serde_yaml_ng::to_string(&value).map_err(|error| InjectError::Document {
            index,
            object: object_label(&value),
            message: format!("cannot write the result as YAML: {error}"),
        })?;
        rendered.push(text);
    }
    Ok(rendered.join("---\n"))
}

/// Adds the sidecar to one Pod object (its `metadata` and `spec`), as [`inject_documents`] does
/// for a Pod document: the admission webhook's entry point, which receives pods one at a time.
/// Idempotent: a pod that already has the sidecar comes back unchanged. The error names the
/// field path and what is wrong there.
pub fn inject_pod(pod: &mut Value, options: &InjectOptions) -> Result<(), InjectError> {
    validate_options(options)?;
    let sidecar = sidecar_container(options);
    let label = object_label(pod);
    let Value::Mapping(template) = pod else {
        return Err(InjectError::Pod {
            object: label,
            message: Problem::expected("", "a Pod (a mapping)", Some(pod)).to_string(),
        });
    };
    inject_template(template, "", options, &sidecar).map_err(|problem| InjectError::Pod {
        object: label,
        message: problem.to_string(),
    })
}

/// One thing wrong at one field path of an object.
#[derive(Debug)]
struct Problem {
    path: String,
    message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl Problem {
    fn new(path: &str, message: impl Into<String>) -> Problem {
        Problem {
            path: path.to_string(),
            message: message.into(),
        }
    }

    fn expected(path: &str, what: &str, found: Option<&Value>) -> Problem {
        Problem::new(path, format!("expected {what}, found {}", describe(found)))
    }
}

fn describe(value: Option<&Value>) -> &'static str {
    match value {
        None => "nothing",
        Some(Value::Null) => "null",
        Some(Value::Bool(_)) => "a boolean",
        Some(Value::Number(_)) => "a number",
        Some(Value::String(_)) => "a string",
        Some(Value::Sequence(_)) => "a list",
        Some(Value::Mapping(_)) => "a mapping",
        Some(Value::Tagged(_)) => "a tagged value",
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// `Kind/name` for error messages, with whatever of it the object has.
fn object_label(object: &Value) -> String {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("(no kind)");
    let metadata = object.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            metadata
                .and_then(|m| m.get("generateName"))
                .and_then(Value::as_str)
                .map(|prefix| format!("{prefix}*"))
        });
    match name {
        Some(name) => format!("{kind}/{name}"),
        None => kind.to_string(),
    }
}

/// Where an object's pod template lives, if it is a workload this command knows.
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job")
        | ("", "ReplicationController") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn inject_object(
    object: &mut Value,
    options: &InjectOptions,
    sidecar: &Value,
) -> Result<(), (String, Problem)> {
    let label = object_label(object);
    let Value::Mapping(root) = object else {
        return Err((
            label,
            Problem::expected("", "a Kubernetes object (a mapping)", Some(object)),
        ));
    };
    let api_version = root
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let kind = root.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version == "v1" && kind == "List" {
        return inject_list(root, options, sidecar);
    }
    let Some(path) = template_path(&api_version, kind) else {
        return Ok(());
    };
    let kind = kind.to_string();
    let mut template = root;
    let mut at = String::new();
    for key in path {
        at = join(&at, key);
        template = match mapping_at(template, key, &at, Missing::Error("")) {
            Ok(next) => next,
            Err(mut problem) => {
                if problem.message.starts_with(MISSING) {
                    problem.message = format!("{MISSING}; a {kind} needs a pod template here");
                }
                return Err((label, problem));
            }
        };
    }
    inject_template(template, &at, options, sidecar).map_err(|problem| (label, problem))
}

/// `kubectl get -o yaml` wraps several objects in a `List`; each item is a document of its own.
fn inject_list(
    list: &mut Mapping,
    options: &InjectOptions,
    sidecar: &Value,
) -> Result<(), (String, Problem)> {
    let items = match list.get_mut("items") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Sequence(items)) => items,
        Some(other) => {
            let problem = Problem::expected("items", "a list", Some(other));
            return Err(("List".to_string(), problem));
        }
    };
    for (position, item) in items.iter_mut().enumerate() {
        inject_object(item, options, sidecar).map_err(|(object, mut problem)| {
            problem.path = join(&format!("items[{position}]"), &problem.path);
            (format!("List item {position}: {object}"), problem)
        })?;
    }
    Ok(())
}

const MISSING: &str = "missing";

/// What to do when a mapping or list an object should have is absent (or null).
#[derive(Clone, Copy)]
enum Missing {
    /// Report it as missing, with why it is needed.
    Error(&'static str),
    /// Create an empty one, placed before this key when present (else at the end), so the
    /// result reads in the usual order.
    CreateBefore(&'static str),
    CreateAtEnd,
}

fn is_absent(parent: &Mapping, key: &str) -> bool {
    matches!(parent.get(key), None | Some(Value::Null))
}

fn create(
    parent: &mut Mapping,
    key: &str,
    missing: Missing,
    empty: Value,
    path: &str,
) -> Result<(), Problem> {
    match missing {
        Missing::Error(why) => return Err(Problem::new(path, format!("{MISSING}; {why}"))),
        Missing::CreateAtEnd => {
            parent.insert(Value::from(key), empty);
        }
        Missing::CreateBefore(before) => insert_before(parent, before, key, empty),
    }
    Ok(())
}

fn mapping_at<'a>(
    parent: &'a mut Mapping,
    key: &str,
    path: &str,
    missing: Missing,
) -> Result<&'a mut Mapping, Problem> {
    if is_absent(parent, key) {
        create(parent, key, missing, Value::Mapping(Mapping::new()), path)?;
    }
    match parent.get_mut(key) {
        Some(Value::Mapping(mapping)) => Ok(mapping),
        other => Err(Problem::expected(path, "a mapping", other.map(|v| &*v))),
    }
}

fn sequence_at<'a>(
    parent: &'a mut Mapping,
    key: &str,
    path: &str,
    missing: Missing,
) -> Result<&'a mut Vec<Value>, Problem> {
    if is_absent(parent, key) {
        create(parent, key, missing, Value::Sequence(Vec::new()), path)?;
    }
    match parent.get_mut(key) {
        Some(Value::Sequence(items)) => Ok(items),
        other => Err(Problem::expected(path, "a list", other.map(|v| &*v))),
    }
}

/// Inserts `key` just before `before` (or at the end when `before` is absent). The mapping keeps
/// insertion order but has no positional insert, so it is rebuilt.
fn insert_before(map: &mut Mapping, before: &str, key: &str, value: Value) {
    if !map.contains_key(before) {
        map.insert(Value::from(key), value);
        return;
    }
    let mut value = Some(value);
    for (existing_key, existing_value) in std::mem::take(map) {
        if existing_key.as_str() == Some(before) {
            if let Some(value) = value.take() {
                map.insert(Value::from(key), value);
            }
        }
        map.insert(existing_key, existing_value);
    }
}

fn name_of(item: &Value) -> Option<&str> {
    item.get("name").and_then(Value::as_str)
}

fn inject_template(
    template: &mut Mapping,
    at: &str,
    options: &InjectOptions,
    sidecar: &Value,
) -> Result<(), Problem> {
    let metadata_path = join(at, "metadata");
    let metadata = mapping_at(
        template,
        "metadata",
        &metadata_path,
        Missing::CreateBefore("spec"),
    )?;
    let labels_path = join(&metadata_path, "labels");
    let labels = mapping_at(metadata, "labels", &labels_path, Missing::CreateAtEnd)?;
    labels.insert(Value::from(INJECTED_LABEL), Value::from("true"));
    let annotations_path = join(&metadata_path, "annotations");
    let annotations = mapping_at(
        metadata,
        "annotations",
        &annotations_path,
        Missing::CreateAtEnd,
    )?;
    let admin_port = ADMIN_PORT.to_string();
    let scrape = [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", admin_port.as_str()),
        ("prometheus.io/path", "/metrics"),
    ];
    // All or nothing: completing an app's partial set would point its scraper somewhere new.
    if !scrape.iter().any(|(key, _)| annotations.contains_key(*key)) {
        for (key, value) in scrape {
            annotations.insert(Value::from(key), Value::from(value));
        }
    }
    if let Some(port) = options.app_port {
        annotations.insert(
            Value::from(APP_PORT_ANNOTATION),
            Value::from(port.to_string()),
        );
    }

    let spec_path = join(at, "spec");
    let spec = mapping_at(
        template,
        "spec",
        &spec_path,
        Missing::Error("a pod needs a spec with its containers"),
    )?;
    inject_pod_spec(spec, &spec_path, options, sidecar)
}

fn inject_pod_spec(
    spec: &mut Mapping,
    at: &str,
    options: &InjectOptions,
    sidecar: &Value,
) -> Result<(), Problem> {
    let containers_path = join(at, "containers");
    let containers = sequence_at(
        spec,
        "containers",
        &containers_path,
        Missing::Error("a pod needs at least one container"),
    )?;
    for (position, container) in containers.iter().enumerate() {
        if !container.is_mapping() {
            let path = format!("{containers_path}[{position}]");
            return Err(Problem::expected(
                &path,
                "a container (a mapping)",
                Some(container),
            ));
        }
    }
    // An old-style sidecar (a regular container) is superseded by the native one below.
    containers.retain(|container| name_of(container) != Some(SIDECAR_NAME));
    if containers.is_empty() {
        return Err(Problem::new(
            &containers_path,
            "no app container (the only one is locality-sidecar); the sidecar needs an app next to it",
        ));
    }
    check_ports(containers, &containers_path)?;

    let init_path = join(at, "initContainers");
    let init = sequence_at(
        spec,
        "initContainers",
        &init_path,
        Missing::CreateBefore("containers"),
    )?;
    check_ports(init, &init_path)?;
    match init
        .iter()
        .position(|container| name_of(container) == Some(SIDECAR_NAME))
    {
        Some(existing) => init[existing] = sidecar.clone(),
        // First, so every other init container and the app can already call through it.
        None => init.insert(0, sidecar.clone()),
    }

    let volumes_path = join(at, "volumes");
    let volumes = sequence_at(spec, "volumes", &volumes_path, Missing::CreateAtEnd)?;
    for volume in sidecar_volumes(options) {
        if !volumes
            .iter()
            .any(|existing| name_of(existing) == name_of(&volume))
        {
            volumes.push(volume);
        }
    }

    if let Some(account) = &options.service_account {
        if is_absent(spec, "serviceAccountName") && is_absent(spec, "serviceAccount") {
            spec.insert(
                Value::from("serviceAccountName"),
                Value::from(account.as_str()),
            );
        }
    }
    Ok(())
}

/// The sidecar binds these ports in the pod's network namespace; an app container declaring the
/// same port and protocol would make one of them fail to start, so say so now.
fn check_ports(containers: &[Value], at: &str) -> Result<(), Problem> {
    for (position, container) in containers.iter().enumerate() {
        if name_of(container) == Some(SIDECAR_NAME) {
            continue;
        }
        let Some(Value::Sequence(ports)) = container.get("ports") else {
            continue;
        };
        for port in ports {
            let number = port.get("containerPort").and_then(Value::as_u64);
            let protocol = port
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("TCP");
            let taken = match (number, protocol) {
                (Some(n), "UDP") => n == u64::from(QUIC_PORT),
                (Some(n), "TCP") => n == u64::from(ADMIN_PORT) || n == u64::from(QUIC_PORT),
                _ => false,
            };
            if taken {
                return Err(Problem::new(
                    &format!("{at}[{position}].ports"),
                    format!(
                        "container {} declares {protocol} port {}, which the sidecar uses",
                        name_of(container).unwrap_or("(unnamed)"),
                        number.unwrap_or_default()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_options(options: &InjectOptions) -> Result<(), InjectError> {
    if options.image.is_empty() || options.image.chars().any(char::is_whitespace) {
        return Err(InjectError::Option {
            option: "image",
            message: format!(
                "expected a container image reference, found {:?}",
                options.image
            ),
        });
    }
    let names = [
        ("configmap", Some(&options.configmap)),
        ("secret", Some(&options.secret)),
        ("service-account", options.service_account.as_ref()),
    ];
    for (option, name) in names {
        if let Some(name) = name {
            if !is_dns_subdomain(name) {
                return Err(InjectError::Option {
                    option,
                    message: format!(
                        "expected a Kubernetes object name (lowercase letters, digits, '-' and '.', at most 253), found {name:?}"
                    ),
                });
            }
        }
    }
    if options.app_port == Some(0) {
        return Err(InjectError::Option {
            option: "app-port",
            message: "expected a port from 1 to 65535, found 0".to_string(),
        });
    }
    Ok(())
}

/// RFC 1123 subdomain, the rule for ConfigMap, Secret and ServiceAccount names.
fn is_dns_subdomain(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(allowed)
        && name.starts_with(alphanumeric)
        && name.ends_with(alphanumeric)
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut mapping = Mapping::with_capacity(N);
    for (key, value) in entries {
        mapping.insert(Value::from(key), value);
    }
    Value::Mapping(mapping)
}

fn strings(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|item| Value::from(*item)).collect())
}

fn downward(name: &str, field_path: &str) -> Value {
    map([
        ("name", Value::from(name)),
        (
            "valueFrom",
            map([("fieldRef", map([("fieldPath", Value::from(field_path))]))]),
        ),
    ])
}

fn http_probe(path: &str, period_seconds: u64, failure_threshold: u64) -> Value {
    map([
        (
            "httpGet",
            map([("path", Value::from(path)), ("port", Value::from("admin"))]),
        ),
        ("periodSeconds", Value::from(period_seconds)),
        ("failureThreshold", Value::from(failure_threshold)),
    ])
}

/// The native sidecar container, as the options describe it.
fn sidecar_container(options: &InjectOptions) -> Value {
    map([
        ("name", Value::from(SIDECAR_NAME)),
        ("image", Value::from(options.image.as_str())),
        // In initContainers, this makes it a native sidecar: it keeps running (and is restarted)
        // alongside the app instead of having to exit before the app starts.
        ("restartPolicy", Value::from("Always")),
        // --configmap watches the ConfigMap through the API, so a change applies within a
        // second instead of when the kubelet next refreshes the mounted file (up to a minute).
        (
            "args",
            strings(&[
                "run",
                "--config",
                CONFIG_PATH,
                "--configmap",
                options.configmap.as_str(),
            ]),
        ),
        (
            "env",
            Value::Sequence(vec![
                downward("POD_NAME", "metadata.name"),
                downward("POD_NAMESPACE", "metadata.namespace"),
                downward("POD_IP", "status.podIP"),
                // Same-node ranking compares peers' hostIP with this one.
                downward("HOST_IP", "status.hostIP"),
                downward("NODE_NAME", "spec.nodeName"),
                map([
                    ("name", Value::from("LOCALITY_SIDECAR_CONFIG")),
                    ("value", Value::from(CONFIG_PATH)),
                ]),
            ]),
        ),
        (
            "ports",
            Value::Sequence(vec![
                map([
                    ("name", Value::from("grpc-h3")),
                    ("containerPort", Value::from(QUIC_PORT)),
                    ("protocol", Value::from("UDP")),
                ]),
                map([
                    ("name", Value::from(H2_FALLBACK_PORT_NAME)),
                    ("containerPort", Value::from(QUIC_PORT)),
                    ("protocol", Value::from("TCP")),
                ]),
                map([
                    ("name", Value::from("admin")),
                    ("containerPort", Value::from(ADMIN_PORT)),
                    ("protocol", Value::from("TCP")),
                ]),
            ]),
        ),
        // The app starts only once this passes, i.e. once discovery has its first full view, so
        // its first calls already have endpoints. Up to two minutes for a slow API server before
        // the kubelet restarts the sidecar.
        ("startupProbe", http_probe("/ready", 1, 120)),
        ("readinessProbe", http_probe("/ready", 5, 3)),
        ("livenessProbe", http_probe("/live", 10, 3)),
        (
            "resources",
            // No CPU limit on purpose: CFS quota throttling stalls a latency-sensitive proxy for
            // the rest of a 100 ms period once it bursts, adding tail latency to every call in
            // flight. The request still reserves its share; memory is limited because a leak
            // should restart the sidecar, not take the node's memory.
            map([
                (
                    "requests",
                    map([("cpu", Value::from("50m")), ("memory", Value::from("32Mi"))]),
                ),
                ("limits", map([("memory", Value::from("128Mi"))])),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsNonRoot", Value::from(true)),
                // The distroless "nonroot" user; the sidecar needs no privileges or writable files.
                ("runAsUser", Value::from(65532)),
                ("readOnlyRootFilesystem", Value::from(true)),
                ("allowPrivilegeEscalation", Value::from(false)),
                ("capabilities", map([("drop", strings(&["ALL"]))])),
                (
                    "seccompProfile",
                    map([("type", Value::from("RuntimeDefault"))]),
                ),
            ]),
        ),
        (
            "volumeMounts",
            Value::Sequence(vec![
                map([
                    ("name", Value::from(CERTS_VOLUME)),
                    ("mountPath", Value::from(CERTS_DIR)),
                    ("readOnly", Value::from(true)),
                ]),
                map([
                    ("name", Value::from(CONFIG_VOLUME)),
                    ("mountPath", Value::from(CONFIG_DIR)),
                    ("readOnly", Value::from(true)),
                ]),
            ]),
        ),
    ])
}

fn sidecar_volumes(options: &InjectOptions) -> [Value; 2] {
    [
        map([
            ("name", Value::from(CERTS_VOLUME)),
            (
                "secret",
                map([("secretName", Value::from(options.secret.as_str()))]),
            ),
        ]),
        map([
            ("name", Value::from(CONFIG_VOLUME)),
            (
                "configMap",
                map([("name", Value::from(options.configmap.as_str()))]),
            ),
        ]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_before_keeps_the_other_keys_in_order() {
        let mut map: Mapping = serde_yaml_ng::from_str("a: 1\nc: 3\nd: 4\n").unwrap();
        insert_before(&mut map, "c", "b", Value::from(2));
        insert_before(&mut map, "zz", "e", Value::from(5));
        let keys: Vec<_> = map.keys().filter_map(Value::as_str).collect();
        assert_eq!(keys, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn dns_subdomain_rule() {
        assert!(is_dns_subdomain("locality-sidecar.v2"));
        assert!(!is_dns_subdomain("Locality"));
        assert!(!is_dns_subdomain("-x"));
        assert!(!is_dns_subdomain(""));
    }

    #[test]
    fn only_kubernetes_groups_are_workloads() {
        assert!(template_path("apps/v1", "Deployment").is_some());
        assert!(template_path("v1", "Pod").is_some());
        assert!(template_path("batch.volcano.sh/v1alpha1", "Job").is_none());
        assert!(template_path("v1", "Service").is_none());
    }
}
