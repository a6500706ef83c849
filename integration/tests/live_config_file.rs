//! Live config from the mounted file, end to end: the client sidecar runs without `--configmap`,
//! and its config file is swapped the way kubelet updates a mounted ConfigMap (a new directory,
//! then one atomic rename of the `..data` symlink). New calls see the new retry policy, tiers
//! and outlier settings; a broken version changes nothing; a changed listener is logged as
//! needing a restart while the rest applies.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration::cluster::{answers_by_pod, Cluster, ClusterSpec};
use integration::harness::{echo_client, http_get, metric_sum, within};
use integration::pb::{EchoReply, EchoRequest};
use serde_json::json;

/// Upper bound for any single call: only there so a hang fails the test with a reason.
const LIMIT: Duration = Duration::from_secs(60);

/// How long a config change may take to apply here. The contract is "within a second"; this
/// bound is generous because several sidecars share two cores. The time is printed.
const APPLY_LIMIT: Duration = Duration::from_secs(10);

/// The client sidecar's config file, mounted the way kubelet mounts a ConfigMap key:
/// `FILE -> DIR/..data/config.yaml`, `DIR/..data -> ..vN`.
struct MountedConfig {
    dir: PathBuf,
    config: serde_json::Value,
    version: u32,
}

impl MountedConfig {
    /// Turns the cluster's client config file into a kubelet-style mount with the same
    /// content (so the sidecar sees no change).
    fn mount(cluster: &Cluster) -> MountedConfig {
        let file = cluster.dir.path().join("client.yaml");
        let text = std::fs::read_to_string(&file).expect("read the client config");
        let config: serde_json::Value = serde_yaml_ng::from_str(&text).expect("config is YAML");
        let dir = cluster.dir.path().join("mounted-config");
        std::fs::create_dir(&dir).expect("create the mount directory");
        let mut mounted = MountedConfig {
            dir,
            config,
            version: 0,
        };
        mounted.write_version(&text);
        let link = cluster.dir.path().join("client.yaml.link");
        std::os::unix::fs::symlink(mounted.dir.join("..data").join("config.yaml"), &link)
            .expect("symlink the config file");
        std::fs::rename(&link, &file).expect("put the symlink in place of the file");
        mounted
    }

    /// Writes `text` as a new version and switches `..data` to it in one rename.
    fn write_version(&mut self, text: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).expect("create a version directory");
        std::fs::write(self.dir.join(&version).join("config.yaml"), text)
            .expect("write the version");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("symlink the version");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }

    /// Changes the config with `change` and publishes it as a new version.
    fn update(&mut self, change: impl FnOnce(&mut serde_json::Value)) {
        change(&mut self.config);
        let text = serde_yaml_ng::to_string(&self.config).expect("config serialises");
        self.write_version(&text);
    }
}

fn reloads(metrics: &str, result: &str) -> f64 {
    metric_sum(
        metrics,
        "locality_sidecar_config_reloads_total",
        &["source=\"file\"", &format!("result=\"{result}\"")],
    )
}

/// Waits until the client sidecar counts one more file reload with `result` than `before`;
/// returns how long after `since` it saw it.
async fn wait_reload(cluster: &Cluster, result: &str, before: f64, since: Instant) -> Duration {
    within(APPLY_LIMIT, &format!("a file reload {result}"), async {
        while reloads(&cluster.metrics().await, result) <= before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let took = since.elapsed();
    eprintln!("config file version {result} after {took:?}");
    took
}

/// Publishes `change` as a new version of the mounted file and waits until it is applied.
async fn change_and_wait(
    cluster: &Cluster,
    mounted: &mut MountedConfig,
    change: impl FnOnce(&mut serde_json::Value),
) {
    let before = reloads(&cluster.metrics().await, "applied");
    let changed = Instant::now();
    mounted.update(change);
    wait_reload(cluster, "applied", before, changed).await;
}

fn retry_policy(max_attempts: u32) -> serde_json::Value {
    json!({"methodConfig": [{
        "name": [{"service": "echo.Echo"}],
        "timeout": "10s",
        "retryPolicy": {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.01s",
            "backoffMultiplier": 1,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    }]})
}

fn spec(max_attempts: u32) -> ClusterSpec {
    let mut spec = ClusterSpec::three_nodes(1);
    spec.service_config = Some(retry_policy(max_attempts));
    // No ejection, so every pod stays a candidate whatever a test makes fail.
    spec.client_extra = json!({"outlierDetection": {"consecutiveFailures": 100000, "baseEjectionTime": "1s", "maxEjectionTime": "1s", "maxEjectionPercent": 0}});
    spec
}

fn failing(pods: &[&str]) -> EchoRequest {
    EchoRequest {
        status_code: tonic::Code::Unavailable as i32,
        status_message: "pod says no".to_string(),
        trailers_only: true,
        fail_on: pods.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

async fn call(cluster: &Cluster, request: EchoRequest) -> Result<EchoReply, tonic::Status> {
    let mut client = echo_client(cluster.app_addr).await;
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(10));
    within(LIMIT, "unary call", client.unary(request))
        .await
        .map(tonic::Response::into_inner)
}

/// Attempts the apps received for one call that every pod fails.
async fn attempts_of_one_failing_call(cluster: &Cluster) -> u64 {
    let before = cluster.app_calls();
    let status = call(cluster, failing(&[]))
        .await
        .expect_err("every pod fails");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    cluster.app_calls() - before
}

fn set_max_attempts(attempts: serde_json::Value) -> impl FnOnce(&mut serde_json::Value) {
    move |config| {
        config["serviceConfig"]["methodConfig"][0]["retryPolicy"]["maxAttempts"] = attempts
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_config_file_applies_to_new_calls_and_a_broken_one_changes_nothing() {
    let cluster = Cluster::start(spec(2)).await;
    let mut mounted = MountedConfig::mount(&cluster);
    assert_eq!(attempts_of_one_failing_call(&cluster).await, 2);

    change_and_wait(&cluster, &mut mounted, set_max_attempts(json!(5))).await;
    assert_eq!(
        attempts_of_one_failing_call(&cluster).await,
        5,
        "new calls run under the new policy"
    );

    // maxAttempts 1 is invalid (A6: more than 1): rejected whole, the last good one stays.
    let before = reloads(&cluster.metrics().await, "rejected");
    let changed = Instant::now();
    mounted.update(set_max_attempts(json!(1)));
    wait_reload(&cluster, "rejected", before, changed).await;
    let log = cluster.client.log_text();
    assert!(
        log.contains("serviceConfig.methodConfig[0].retryPolicy.maxAttempts"),
        "the rejection names the field: {log}"
    );
    assert_eq!(
        attempts_of_one_failing_call(&cluster).await,
        5,
        "the last good config stays in force"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listener_is_logged_as_needing_a_restart_and_the_rest_applies() {
    let cluster = Cluster::start(spec(2)).await;
    let mut mounted = MountedConfig::mount(&cluster);
    let old_admin = cluster.client.admin_addr();
    let new_admin = integration::harness::free_tcp_addr();
    change_and_wait(&cluster, &mut mounted, |config| {
        config["admin"]["listen"] = json!(new_admin.to_string());
        config["serviceConfig"]["methodConfig"][0]["retryPolicy"]["maxAttempts"] = json!(3);
    })
    .await;
    let log = cluster.client.log_text();
    let warning = log
        .lines()
        .find(|line| line.contains("only take effect after a restart"))
        .unwrap_or_else(|| panic!("no restart-needed warning in the log:\n{log}"));
    assert!(
        warning.contains("admin"),
        "the warning names the section: {warning}"
    );
    assert!(
        !warning.contains("outbound"),
        "only admin changed: {warning}"
    );
    // The listener stays where it was until a restart; the retry policy changed at once.
    let (status, _) = http_get(old_admin, "/ready")
        .await
        .expect("old admin answers");
    assert_eq!(status, 200);
    assert!(
        http_get(new_admin, "/ready").await.is_err(),
        "nothing listens on the new admin address before a restart"
    );
    assert_eq!(attempts_of_one_failing_call(&cluster).await, 3);
}

/// Waits until the client sidecar ranks echo-a1 in tier `tier`.
async fn wait_tier_of_a1(cluster: &Cluster, tier: &str) {
    within(APPLY_LIMIT, &format!("echo-a1 ranked {tier}"), async {
        loop {
            let ranked = cluster.ranked_pods().await;
            if ranked.iter().any(|(pod, t)| pod == "echo-a1" && t == tier) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_locality_tiers_apply_to_new_calls() {
    // Tiers [any]: no locality, calls spread over the three pods.
    let mut spec = spec(2);
    spec.client_extra["locality"] = json!({"tiers": ["any"]});
    let cluster = Cluster::start(spec).await;
    let mut mounted = MountedConfig::mount(&cluster);
    let client = echo_client(cluster.app_addr).await;
    let (spread, failures) = answers_by_pod(&client, 60, 1).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        spread.len() >= 2,
        "without locality calls spread: {spread:?}"
    );

    change_and_wait(&cluster, &mut mounted, |config| {
        config["locality"]["tiers"] = json!(["node", "zone", "any"]);
    })
    .await;
    wait_tier_of_a1(&cluster, "node").await;
    let (local, failures) = answers_by_pod(&client, 50, 1).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        local.get("echo-a1"),
        Some(&50),
        "same node first now: {local:?}"
    );

    // And back: the same-node pod loses its preference again.
    change_and_wait(&cluster, &mut mounted, |config| {
        config["locality"]["tiers"] = json!(["any"]);
    })
    .await;
    wait_tier_of_a1(&cluster, "any").await;
    let (spread, failures) = answers_by_pod(&client, 60, 1).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        spread.len() >= 2,
        "without locality calls spread: {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_outlier_settings_apply_to_new_calls() {
    let cluster = Cluster::start(spec(3)).await;
    let mut mounted = MountedConfig::mount(&cluster);
    let ejected = || async {
        let view = cluster.endpoints_view().await;
        view["upstreams"][0]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["ejected"] == json!(true))
            .count()
    };
    // Ejection off in effect: echo-a1 fails ten calls' first attempts and stays in.
    for _ in 0..10 {
        let reply = call(&cluster, failing(&["echo-a1"]))
            .await
            .expect("another pod answers");
        assert_eq!(reply.server, "echo-b1");
    }
    assert_eq!(ejected().await, 0);

    change_and_wait(&cluster, &mut mounted, |config| {
        config["outlierDetection"] = json!({
            "consecutiveFailures": 2,
            "baseEjectionTime": "60s",
            "maxEjectionTime": "60s",
            "maxEjectionPercent": 50,
        });
    })
    .await;
    let mut calls = 0;
    while ejected().await == 0 {
        calls += 1;
        assert!(
            calls <= 2,
            "echo-a1 not ejected after {calls} failures under the new settings"
        );
        call(&cluster, failing(&["echo-a1"]))
            .await
            .expect("another pod answers");
    }
    // Ejected: new calls go elsewhere first, echo-a1's app sees no more attempts.
    let a1 = cluster
        .pod("echo-a1")
        .app
        .as_ref()
        .expect("app")
        .state()
        .clone();
    let a1_before = a1.calls_started();
    for _ in 0..10 {
        let reply = call(&cluster, failing(&["echo-a1"]))
            .await
            .expect("another pod answers");
        assert_eq!(
            reply.received_previous_rpc_attempts, "",
            "first attempt answered"
        );
    }
    assert_eq!(a1.calls_started(), a1_before);
}
