//! Live configuration: watches the config file (a mounted ConfigMap changes under it) and,
//! when asked, the ConfigMap itself through the API, and applies what can change without a
//! restart (retry policy, timeouts, outlier detection, locality tiers and spill-over) to new calls.
//!
//! A new version is validated whole first. An invalid one changes nothing: the last good config
//! stays, the error is logged with its field path, and `config_reloads_total{result="rejected"}`
//! counts it. Sections that need a restart (listeners, TLS paths, upstream list) are named in the
//! log instead of being half-applied.
//!
//! With `--configmap` there are two copies of one ConfigMap: the API's, and the file kubelet
//! mounts, which follows late (up to its sync period). Once the ConfigMap watch has delivered a
//! version it is the only source: a later file change would be an older version arriving late,
//! so it is ignored ([`applies`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
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

/// Where a config version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config file (in a cluster, kubelet's mounted copy of the ConfigMap).
    File,
    /// The ConfigMap itself, through the API.
    ConfigMap,
}

impl Source {
    /// The `source` label of `config_reloads_total`.
    pub fn label(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::ConfigMap => "configmap",
        }
    }
}

/// What is known about the ConfigMap source when an update arrives.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sources {
    /// A ConfigMap watch is running.
    pub configmap_watched: bool,
    /// That watch has delivered a version (valid or not) since it started.
    pub configmap_delivered: bool,
}

/// Whether an update from `source` may apply. The ConfigMap always may. The file may unless a
/// running ConfigMap watch has already delivered: the file is then a lagging copy of what the
/// watch saw first, and applying it could roll the config back to an older version. Before the
/// watch delivers (API slow, no RBAC for ConfigMaps) and after it ends, the file is all we have.
pub fn applies(source: Source, sources: Sources) -> bool {
    match source {
        Source::ConfigMap => true,
        Source::File => !(sources.configmap_watched && sources.configmap_delivered),
    }
}

#[derive(Debug, Default)]
struct SourceState {
    sources: Sources,
    /// File changes ignored since the ConfigMap took over have been logged (once is enough).
    file_ignored_logged: bool,
}

/// Applies validated config versions to the running sidecar.
#[derive(Clone)]
pub struct Applier {
    /// The config the sidecar started with: sections that need a restart are compared to it.
    started_with: Arc<Config>,
    policy: watch::Sender<Arc<LivePolicy>>,
    /// Shared by every clone: the file and ConfigMap watches each hold one.
    sources: Arc<Mutex<SourceState>>,
}

impl Applier {
    pub fn new(started_with: Config, policy: watch::Sender<Arc<LivePolicy>>) -> Applier {
        Applier {
            started_with: Arc::new(started_with),
            policy,
            sources: Arc::new(Mutex::new(SourceState::default())),
        }
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, SourceState> {
        self.sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks a ConfigMap watch as running until the returned guard is dropped (when the watch
    /// ends or its task is aborted): from then on, the file yields once the watch delivers.
    pub fn configmap_watch(&self) -> ConfigMapWatchGuard {
        let mut state = self.sources();
        state.sources = Sources {
            configmap_watched: true,
            configmap_delivered: false,
        };
        state.file_ignored_logged = false;
        ConfigMapWatchGuard {
            sources: self.sources.clone(),
        }
    }

    /// Records that `source` delivered a version and says whether it may apply.
    fn admit(&self, source: Source, origin: &str) -> bool {
        let mut state = self.sources();
        if source == Source::ConfigMap && state.sources.configmap_watched {
            state.sources.configmap_delivered = true;
        }
        if applies(source, state.sources) {
            return true;
        }
        if !state.file_ignored_logged {
            state.file_ignored_logged = true;
            tracing::info!(%origin, "config file changed, ignored: the ConfigMap watch is the live source and the mounted file lags behind it (logged once)");
        }
        false
    }

    /// Validates `text` and applies it; `origin` names it in logs, `source` decides precedence
    /// and labels the metric. Returns whether it was applied (or already in force).
    pub fn apply(&self, text: &str, origin: &str, source: Source) -> bool {
        if !self.admit(source, origin) {
            return false;
        }
        let config = match Config::parse(text, origin) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%origin, %error, "config rejected; the last good config stays in force");
                count_reload(source, "rejected");
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
            tracing::info!(%origin, source = source.label(), "config applied to new calls");
            count_reload(source, "applied");
        }
        true
    }

    /// A version from `source` that could not even be read as config text.
    fn reject_unreadable(&self, source: Source, origin: &str, why: &str) {
        if self.admit(source, origin) {
            tracing::error!(%origin, reason = why, "config rejected; the last good config stays in force");
            count_reload(source, "rejected");
        }
    }
}

/// Keeps [`Sources::configmap_watched`] set while alive; see [`Applier::configmap_watch`].
pub struct ConfigMapWatchGuard {
    sources: Arc<Mutex<SourceState>>,
}

impl Drop for ConfigMapWatchGuard {
    fn drop(&mut self) {
        let mut state = self
            .sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.sources = Sources::default();
    }
}

fn count_reload(source: Source, result: &'static str) {
    metrics()
        .config_reloads
        .get_or_create(&ReloadLabels {
            source: source.label(),
            result,
        })
        .inc();
}

/// Re-reads `path` every second and applies each new version, on a task of its own.
pub fn watch_file(path: PathBuf, applier: Applier) {
    tokio::spawn(follow_file(path, applier));
}

/// Re-reads `path` every second and applies each new version; runs until dropped, so the
/// caller may own it as a task and stop it on shutdown.
pub async fn follow_file(path: PathBuf, applier: Applier) {
    let mut last = tokio::fs::read(&path).await.ok();
    let origin = path.display().to_string();
    loop {
        tokio::time::sleep(FILE_POLL).await;
        match tokio::fs::read(&path).await {
            Ok(contents) if Some(&contents) != last.as_ref() => {
                match std::str::from_utf8(&contents) {
                    Ok(text) => {
                        applier.apply(text, &origin, Source::File);
                    }
                    Err(_) => applier.reject_unreadable(Source::File, &origin, "not UTF-8 text"),
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
}

/// Watches the ConfigMap `namespace/name` and applies its `config.yaml` whenever it changes, on
/// a task of its own.
pub fn watch_configmap(client: Client, namespace: String, name: String, applier: Applier) {
    tokio::spawn(follow_configmap(client, namespace, name, applier));
}

/// Watches the ConfigMap `namespace/name` and applies its `config.yaml` whenever it changes;
/// runs until dropped. While it runs and once it has delivered, the config file is ignored.
pub async fn follow_configmap(client: Client, namespace: String, name: String, applier: Applier) {
    let _watching = applier.configmap_watch();
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
            applier.reject_unreadable(
                Source::ConfigMap,
                &origin,
                "the configmap has no config.yaml key",
            );
            last = None;
            continue;
        };
        if last.as_ref() == Some(&text) {
            continue;
        }
        applier.apply(&text, &origin, Source::ConfigMap);
        last = Some(text);
    }
}

/// The parts of the config that apply to new calls without a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct LivePolicy {
    pub service_config: crate::config::service_config::ServiceConfig,
    pub outlier: crate::config::OutlierDetection,
    pub locality: crate::config::LocalityConfig,
    /// The caps on calls in flight, resolved against the container's memory limit.
    pub limits: crate::limits::CallLimits,
}

impl LivePolicy {
    pub fn from_config(config: &crate::config::Config) -> LivePolicy {
        LivePolicy {
            service_config: config.policy.clone(),
            outlier: config.outlier_detection.clone(),
            locality: config.locality.clone(),
            limits: config.limits.resolve(
                *crate::limits::CGROUP_LIMIT.get_or_init(crate::limits::cgroup_memory_limit),
            ),
        }
    }
}

pub type PolicyWatch = tokio::sync::watch::Receiver<std::sync::Arc<LivePolicy>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Tier;

    const NODE_ANY: &str = "locality: {tiers: [node, any]}\n";
    const ANY_ONLY: &str = "locality: {tiers: [any]}\n";

    fn applier() -> (Applier, PolicyWatch) {
        let started = Config::default();
        let (sender, receiver) = watch::channel(Arc::new(LivePolicy::from_config(&started)));
        (Applier::new(started, sender), receiver)
    }

    fn tiers(policy: &PolicyWatch) -> Vec<Tier> {
        policy.borrow().locality.tiers.clone()
    }

    #[test]
    fn the_configmap_always_applies_and_the_file_until_the_watch_delivers() {
        let none = Sources::default();
        let watching = Sources {
            configmap_watched: true,
            configmap_delivered: false,
        };
        let delivered = Sources {
            configmap_watched: true,
            configmap_delivered: true,
        };
        for sources in [none, watching, delivered] {
            assert!(applies(Source::ConfigMap, sources), "{sources:?}");
        }
        assert!(applies(Source::File, none));
        assert!(applies(Source::File, watching));
        assert!(!applies(Source::File, delivered));
    }

    #[test]
    fn file_applies_without_a_configmap_watch() {
        let (applier, policy) = applier();
        assert!(applier.apply(NODE_ANY, "file", Source::File));
        assert_eq!(tiers(&policy), [Tier::Node, Tier::Any]);
        assert!(applier.apply(ANY_ONLY, "file", Source::File));
        assert_eq!(tiers(&policy), [Tier::Any]);
    }

    #[test]
    fn lagging_file_never_rolls_back_what_the_configmap_applied() {
        let (applier, policy) = applier();
        let _watch = applier.configmap_watch();
        // Before the watch delivers, the file is the only source.
        assert!(applier.apply(NODE_ANY, "file", Source::File));
        assert!(applier.apply(ANY_ONLY, "configmap", Source::ConfigMap));
        assert_eq!(tiers(&policy), [Tier::Any]);
        // Kubelet catches up late with an older version: ignored, every time.
        assert!(!applier.apply(NODE_ANY, "file", Source::File));
        assert!(!applier.apply(NODE_ANY, "file", Source::File));
        assert_eq!(tiers(&policy), [Tier::Any]);
    }

    #[test]
    fn a_rejected_configmap_version_still_makes_the_configmap_the_source() {
        let (applier, policy) = applier();
        let _watch = applier.configmap_watch();
        assert!(!applier.apply("locality: {tiers: []}\n", "configmap", Source::ConfigMap));
        // The file holds an older version of that same ConfigMap: it must not apply either.
        assert!(!applier.apply(NODE_ANY, "file", Source::File));
        assert_eq!(tiers(&policy), [Tier::Node, Tier::Zone, Tier::Any]);
    }

    #[test]
    fn file_applies_again_once_the_configmap_watch_ends() {
        let (applier, policy) = applier();
        let watch = applier.configmap_watch();
        assert!(applier.apply(ANY_ONLY, "configmap", Source::ConfigMap));
        assert!(!applier.apply(NODE_ANY, "file", Source::File));
        drop(watch);
        assert!(applier.apply(NODE_ANY, "file", Source::File));
        assert_eq!(tiers(&policy), [Tier::Node, Tier::Any]);
    }

    #[test]
    fn invalid_version_is_rejected_and_the_last_good_one_stays() {
        let (applier, policy) = applier();
        assert!(applier.apply(NODE_ANY, "file", Source::File));
        let mut seen = policy.clone();
        seen.borrow_and_update();
        assert!(!applier.apply("locality: {tiers: [node, node]}\n", "file", Source::File));
        assert!(!applier.apply("locality: [", "file", Source::File));
        assert_eq!(tiers(&policy), [Tier::Node, Tier::Any]);
        assert!(!seen.has_changed().unwrap(), "readers were not woken");
    }

    #[test]
    fn the_same_version_again_is_accepted_without_waking_readers() {
        let (applier, policy) = applier();
        assert!(applier.apply(NODE_ANY, "file", Source::File));
        let mut seen = policy.clone();
        seen.borrow_and_update();
        assert!(applier.apply(NODE_ANY, "configmap", Source::ConfigMap));
        assert!(!seen.has_changed().unwrap());
    }
}
