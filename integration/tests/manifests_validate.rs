//! The Kubernetes YAML we ship, and what `locality-sidecar inject` writes, checked against the
//! official Kubernetes OpenAPI schemas (strict: unknown fields are errors) by the Python package
//! kubernetes-validate, through `python/validate_manifests.py`. There is no cluster to apply to,
//! so this is what stands between a typo in a manifest and a user's `kubectl apply`.
//!
//! Needs `pip install kubernetes-validate`; a missing module fails the test rather than
//! skipping it. Also checks that the Grafana dashboard queries only the metric names listed in
//! `manifests/dashboard-metrics.txt` (which other tests compare with the live `/metrics`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration::harness::sidecar_binary;

const INSTALL_HINT: &str = "run `pip install kubernetes-validate`";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the integration crate sits in the workspace")
        .to_path_buf()
}

fn check_python() {
    let probe = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is not available ({e}): install Python 3, then {INSTALL_HINT}")
        });
    assert!(
        probe.status.success(),
        "python3 cannot import kubernetes_validate: {INSTALL_HINT}\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
}

#[test]
fn manifests_and_injected_workloads_match_the_kubernetes_schemas() {
    let binary = sidecar_binary();
    check_python();
    let root = repo_root();
    let output = Command::new("python3")
        .arg(root.join("integration/python/validate_manifests.py"))
        .arg("--manifests")
        .arg(root.join("manifests"))
        .arg("--workloads")
        .arg(root.join("sidecar/testdata/workloads"))
        .arg("--binary")
        .arg(&binary)
        .output()
        .expect("run python3 validate_manifests.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schema validation failed ({}); {INSTALL_HINT} if the module is missing:\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout
            .lines()
            .any(|line| line.ends_with(" passed, 0 failed")),
        "unexpected summary from validate_manifests.py:\n{stdout}\n{stderr}"
    );
}

/// PromQL words that are not metric names where no `(` follows them: aggregations can take
/// `by (...)` before their argument (`sum by (le) (...)`).
const KEYWORDS: &[&str] = &[
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Metric names in a PromQL expression: identifiers that are not functions, keywords, label
/// names in `by (...)`-style lists, or inside `{...}` matchers and `[...]` ranges.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let skip_past = |from: usize, close: char| {
        chars[from + 1..]
            .iter()
            .position(|&c| c == close)
            .map_or(chars.len(), |offset| from + 1 + offset + 1)
    };
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_past(i, '}');
        } else if c == '[' {
            i = skip_past(i, ']');
        } else if c == '"' || c == '\'' {
            i = skip_past(i, c);
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (is_word(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_word(c) {
            let start = i;
            while i < chars.len() && is_word(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().position(|c| !c.is_whitespace());
            let next_is_paren = next.is_some_and(|offset| chars[i + offset] == '(');
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&word.as_str())
            {
                if let (true, Some(offset)) = (next_is_paren, next) {
                    i = skip_past(i + offset, ')');
                }
            } else if !next_is_paren && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

fn base_name(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

#[test]
fn promql_metric_name_extraction() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{tier="x y", le!="1"}[5m]))) / on (job) group_left b_total offset 1h"#
        ),
        ["a_seconds_bucket", "b_total"]
    );
}

#[test]
fn grafana_dashboard_queries_only_the_listed_metrics() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("manifests/grafana-dashboard.json"))
        .expect("read manifests/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let listed_text = std::fs::read_to_string(root.join("manifests/dashboard-metrics.txt"))
        .expect("read manifests/dashboard-metrics.txt");
    let listed: Vec<&str> = listed_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let listed_set: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(
        listed_set.len(),
        listed.len(),
        "duplicates in dashboard-metrics.txt"
    );
    for name in &listed {
        assert!(
            name.starts_with("locality_sidecar_") && base_name(name) == *name,
            "dashboard-metrics.txt: {name} is not a base locality_sidecar_ metric name"
        );
    }

    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 39),
        "schemaVersion"
    );
    assert!(dashboard["uid"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(dashboard["title"].as_str().is_some_and(|s| !s.is_empty()));
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );

    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        assert!(
            ["timeseries", "stat"].contains(&panel["type"].as_str().unwrap_or("")),
            "panel {title}: type {}",
            panel["type"]
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title} uses the datasource variable"
        );
        let targets = panel["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel {title} has no targets");
        for target in targets {
            let expr = target["expr"].as_str().expect("target expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {title}: no metric in {expr}");
            for name in names {
                let base = base_name(&name).to_string();
                assert!(
                    listed_set.contains(base.as_str()),
                    "panel {title}: {name} is not in dashboard-metrics.txt ({expr})"
                );
                used.insert(base);
            }
        }
    }
    let unused: Vec<_> = listed_set
        .iter()
        .filter(|name| !used.contains(**name))
        .collect();
    assert!(unused.is_empty(), "listed but not queried: {unused:?}");
}

fn yaml_file(path: &Path) -> serde_yaml_ng::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `kubectl apply -k manifests/` deploys what kustomization.yaml lists: a manifest left out of it
/// is validated above but never reaches a cluster.
#[test]
fn kustomization_lists_every_manifest() {
    let root = repo_root().join("manifests");
    let kustomization = yaml_file(&root.join("kustomization.yaml"));
    let listed: BTreeSet<&str> = kustomization["resources"]
        .as_sequence()
        .expect("kustomization.yaml has resources")
        .iter()
        .filter_map(serde_yaml_ng::Value::as_str)
        .collect();
    // Cluster-scoped RBAC the README leaves to the cluster admin on purpose.
    let left_to_the_admin = ["kustomization.yaml", "rbac-nodes.yaml"];
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&root).expect("read manifests/") {
        let name = entry.expect("list manifests/").file_name();
        let name = name.to_string_lossy().into_owned();
        if name.ends_with(".yaml")
            && !left_to_the_admin.contains(&name.as_str())
            && !listed.contains(name.as_str())
        {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "manifests/kustomization.yaml does not list {missing:?}"
    );
}

/// One image setting: kustomization.yaml's `images:` entry for the sidecar names exactly the
/// image `locality-sidecar inject` (and so the webhook, by default) puts in pods, and every
/// manifest that runs the sidecar image refers to it by that entry's name.
#[test]
fn the_sidecar_image_is_set_in_one_place() {
    let root = repo_root().join("manifests");
    let kustomization = yaml_file(&root.join("kustomization.yaml"));
    let images = kustomization["images"]
        .as_sequence()
        .expect("kustomization.yaml has an images: list");
    let sidecar = images
        .iter()
        .find(|image| {
            image["name"]
                .as_str()
                .is_some_and(|name| name.ends_with("/locality-sidecar"))
        })
        .expect("an images: entry for the locality-sidecar image");
    let name = sidecar["name"].as_str().unwrap_or_default();
    let configured = format!(
        "{}:{}",
        sidecar["newName"].as_str().unwrap_or(name),
        sidecar["newTag"]
            .as_str()
            .expect("the sidecar's images: entry has a newTag")
    );

    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: app, image: app}]}\n";
    let mut child = Command::new(sidecar_binary())
        .args(["inject", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run locality-sidecar inject");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("inject's stdin")
        .write_all(pod.as_bytes())
        .expect("write to inject");
    let output = child.wait_with_output().expect("wait for inject");
    assert!(output.status.success(), "inject failed: {output:?}");
    let injected: serde_yaml_ng::Value =
        serde_yaml_ng::from_slice(&output.stdout).expect("inject prints YAML");
    let default_image = injected["spec"]["initContainers"][0]["image"]
        .as_str()
        .expect("the injected sidecar has an image");
    assert_eq!(
        default_image, configured,
        "inject's default --image and kustomization.yaml's images: entry must name the same image"
    );

    // Manifests name the image by the entry's name, so kustomize rewrites every one.
    let mut references = 0;
    for file in ["example-app.yaml", "webhook.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).expect("read a manifest");
        for line in text.lines() {
            let line = line.trim();
            if let Some(image) = line.strip_prefix("image:") {
                let image = image.trim();
                if image.contains("locality-sidecar:") {
                    references += 1;
                    assert!(
                        image.starts_with(&format!("{name}:")),
                        "{file}: {image} is not the images: entry {name}"
                    );
                }
            }
        }
    }
    assert!(
        references >= 2,
        "expected the sidecar image in example-app.yaml and webhook.yaml"
    );
}
