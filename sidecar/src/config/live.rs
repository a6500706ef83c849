//! Live configuration: watches the config file (a mounted ConfigMap changes under it) and,
//! when asked, the ConfigMap itself through the API, and applies what can change without a
//! restart (retry policy, timeouts, outlier detection, locality tiers) to new calls.
//!
//! A new version is validated whole first. An invalid one changes nothing: the last good config
//! stays, the error is logged with its field path, and `config_reloads_total{result="rejected"}`
//! counts it. Sections that need a restart (listeners, TLS paths, upstream list) are named in the
//! log instead of being half-applied.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::{metrics, ReloadLabels};

/// The ConfigMap key that holds the config, as in the design's manifests.
pub const CONFIGMAP_KEY: &str = "config.yaml";
/// How often the config file is re-read. Kubelet updates mounted ConfigMaps by swapping a
/// symlink, which file-event watchers often miss; reading a small file once a second is cheap
/// and always right.
const FILE_POLL: Duration = Duration::from_secs(1);

/// Applies validated config versions to the running sidecar.
#[derive(Clone)]
pub struct Applier {
    /// The config the sidecar started with: sections that need a restart are compared to it.
    started_with: Arc<Config>,
    policy: watch::Sender<Arc<LivePolicy>>,
}

impl Applier {
    pub fn new(started_with: Config, policy: watch::Sender<Arc<LivePolicy>>) -> Applier {
        Applier {
            started_with: Arc::new(started_with),
            policy,
        }
    }

    /// Validates `text` and applies it; `origin` names it in logs, `source` labels the metric.
    /// Returns whether it was applied.
    pub fn apply(&self, text: &str, origin: &str, source: &'static str) -> bool {
        let config = match Config::parse(text, origin) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%origin, %error, "config rejected; the last good config stays in force");
                metrics()
                    .config_reloads
                    .get_or_create(&ReloadLabels {
                        source,
                        result: "rejected",
                    })
                    .inc();
                return false;
            }
        };
        let restart = self.started_with.restart_needed(&config);
        if !restart.is_empty() {
            tracing::warn!(%origin, sections = ?restart, "these sections changed but only take effect after a restart; the rest is applied");
        }
        let next = LivePolicy::from_config(&config);
        let changed = self.policy.send_if_modified(|current| {
            if **current == next {
                false
            } else {
                *current = Arc::new(next);
                true
            }
        });
        if changed {
            tracing::info!(%origin, "config applied to new calls");
            metrics()
                .config_reloads
                .get_or_create(&ReloadLabels {
                    source,
                    result: "applied",
                })
                .inc();
        }
        true
    }
}

/// Re-reads `path` every second and applies each new version.
pub fn watch_file(path: PathBuf, applier: Applier) {
    tokio::spawn(async move {
        let mut last = tokio::fs::read(&path).await.ok();
        let origin = path.display().to_string();
        loop {
            tokio::time::sleep(FILE_POLL).await;
            match tokio::fs::read(&path).await {
                Ok(contents) if Some(&contents) != last.as_ref() => {
                    match std::str::from_utf8(&contents) {
                        Ok(text) => {
                            applier.apply(text, &origin, "file");
                        }
                        Err(_) => {
                            tracing::error!(%origin, "config rejected: not UTF-8 text");
                            metrics()
                                .config_reloads
                                .get_or_create(&ReloadLabels {
                                    source: "file",
                                    result: "rejected",
                                })
                                .inc();
                        }
                    }
                    last = Some(contents);
                }
                Ok(_) => {}
                // Mid-swap or briefly missing: keep the config and look again next time.
                Err(error) => {
                    tracing::debug!(%origin, %error, "config file unreadable; keeping the current config")
                }
            }
        }
    });
}

/// Watches the ConfigMap `namespace/name` and applies its `config.yaml` whenever it changes.
pub fn watch_configmap(client: Client, namespace: String, name: String, applier: Applier) {
    tokio::spawn(async move {
        let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher::watcher(api, config)
            .backoff(crate::endpoints::discovery::api_backoff())
            .boxed();
        let origin = format!("configmap {namespace}/{name} key {CONFIGMAP_KEY}");
        let mut last: Option<String> = None;
        while let Some(event) = events.next().await {
            let configmap = match event {
                Ok(Event::Apply(configmap) | Event::InitApply(configmap)) => configmap,
                Ok(Event::Delete(_)) => {
                    tracing::warn!(%origin, "configmap deleted; the last good config stays in force");
                    continue;
                }
                Ok(Event::Init | Event::InitDone) => continue,
                Err(error) => {
                    tracing::warn!(%origin, %error, "configmap watch failed; retrying with backoff");
                    continue;
                }
            };
            let Some(text) = configmap
                .data
                .as_ref()
                .and_then(|data| data.get(CONFIGMAP_KEY))
                .cloned()
            else {
                tracing::error!(%origin, "config rejected: the configmap has no {CONFIGMAP_KEY} key");
                metrics()
                    .config_reloads
                    .get_or_create(&ReloadLabels {
                        source: "configmap",
                        result: "rejected",
                    })
                    .inc();
                continue;
            };
            if last.as_ref() == Some(&text) {
                continue;
            }
            applier.apply(&text, &origin, "configmap");
            last = Some(text);
        }
    });
}

/// The parts of the config that apply to new calls without a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct LivePolicy {
    pub service_config: crate::config::service_config::ServiceConfig,
    pub outlier: crate::config::OutlierDetection,
    pub tiers: Vec<crate::config::Tier>,
}

impl LivePolicy {
    pub fn from_config(config: &crate::config::Config) -> LivePolicy {
        LivePolicy {
            service_config: config.policy.clone(),
            outlier: config.outlier_detection.clone(),
            tiers: config.locality.tiers.clone(),
        }
    }
}

pub type PolicyWatch = tokio::sync::watch::Receiver<std::sync::Arc<LivePolicy>>;
