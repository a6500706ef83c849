//! `locality-sidecar inject` on realistic workloads (`sidecar/testdata/workloads/`): the native
//! sidecar's spec, what must stay untouched, idempotence, errors that write nothing, and the
//! example manifest that is generated from `testdata/example-app.plain.yaml`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use locality_sidecar::tools::inject::{inject_documents, InjectError, InjectOptions, SIDECAR_NAME};
use serde::Deserialize;
use serde_yaml_ng::Value;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn workload_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(crate_dir().join("testdata/workloads"))
        .expect("testdata/workloads exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 7,
        "expected the workload fixtures, found {files:?}"
    );
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("valid YAML"))
        .filter(|value| !value.is_null())
        .collect()
}

fn inject(text: &str) -> String {
    inject_documents(text, &InjectOptions::default()).expect("inject succeeds")
}

fn kind(document: &Value) -> &str {
    document["kind"].as_str().unwrap_or("")
}

/// The pod template of a workload document (the object itself for a Pod).
fn pod_template(document: &Value) -> Option<&Value> {
    match kind(document) {
        "Pod" => Some(document),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            Some(&document["spec"]["template"])
        }
        "CronJob" => Some(&document["spec"]["jobTemplate"]["spec"]["template"]),
        _ => None,
    }
}

fn named<'a>(list: &'a Value, name: &str) -> Vec<&'a Value> {
    list.as_sequence()
        .map(|items| items.iter().filter(|item| item["name"] == name).collect())
        .unwrap_or_default()
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("test YAML parses")
}

/// Checks every field the product contract fixes for the injected container and pod.
fn assert_injected(template: &Value, options: &InjectOptions) {
    let spec = &template["spec"];
    let sidecars = named(&spec["initContainers"], SIDECAR_NAME);
    assert_eq!(sidecars.len(), 1, "exactly one sidecar in {spec:?}");
    assert_eq!(
        spec["initContainers"][0]["name"], SIDECAR_NAME,
        "the sidecar starts first"
    );
    assert!(
        named(&spec["containers"], SIDECAR_NAME).is_empty(),
        "no regular container named {SIDECAR_NAME}"
    );
    let sidecar = sidecars[0];
    assert_eq!(sidecar["image"], options.image.as_str());
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(
        sidecar["args"],
        yaml(&format!(
            "[run, --config, /etc/locality-sidecar/config.yaml, --configmap, {}]",
            options.configmap
        ))
    );
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
        ("HOST_IP", "status.hostIP"),
        ("NODE_NAME", "spec.nodeName"),
    ] {
        let env = named(&sidecar["env"], name);
        assert_eq!(env.len(), 1, "env {name}");
        assert_eq!(
            env[0]["valueFrom"]["fieldRef"]["fieldPath"], field,
            "{name}"
        );
    }
    assert_eq!(
        named(&sidecar["env"], "LOCALITY_SIDECAR_CONFIG")[0]["value"],
        "/etc/locality-sidecar/config.yaml"
    );
    assert_eq!(
        sidecar["ports"],
        yaml(
            "[{name: grpc-h3, containerPort: 15443, protocol: UDP}, {name: h2-fallback, containerPort: 15443, protocol: TCP}, {name: admin, containerPort: 15090, protocol: TCP}]"
        )
    );
    for (probe, path) in [
        ("startupProbe", "/ready"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/live"),
    ] {
        assert_eq!(sidecar[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(sidecar[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    assert_eq!(
        sidecar["resources"],
        yaml("{requests: {cpu: 50m, memory: 32Mi}, limits: {memory: 128Mi}}")
    );
    assert_eq!(
        sidecar["securityContext"],
        yaml(
            "{runAsNonRoot: true, runAsUser: 65532, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}, seccompProfile: {type: RuntimeDefault}}"
        )
    );
    assert_eq!(
        sidecar["volumeMounts"],
        yaml(
            "[{name: locality-sidecar-certs, mountPath: /certs, readOnly: true}, {name: locality-sidecar-config, mountPath: /etc/locality-sidecar, readOnly: true}]"
        )
    );
    assert_eq!(
        named(&spec["volumes"], "locality-sidecar-certs"),
        [&yaml(&format!(
            "{{name: locality-sidecar-certs, secret: {{secretName: {}}}}}",
            options.secret
        ))]
    );
    assert_eq!(
        named(&spec["volumes"], "locality-sidecar-config"),
        [&yaml(&format!(
            "{{name: locality-sidecar-config, configMap: {{name: {}}}}}",
            options.configmap
        ))]
    );
    let metadata = &template["metadata"];
    assert_eq!(metadata["labels"]["locality-sidecar.io/injected"], "true");
    assert_eq!(metadata["annotations"]["prometheus.io/scrape"], "true");
    assert_eq!(metadata["annotations"]["prometheus.io/port"], "15090");
    assert_eq!(metadata["annotations"]["prometheus.io/path"], "/metrics");
}

#[test]
fn every_workload_gets_the_native_sidecar() {
    let options = InjectOptions::default();
    let mut templates = 0;
    for file in workload_files() {
        let output = inject(&read(&file));
        for document in documents(&output) {
            if let Some(template) = pod_template(&document) {
                assert_injected(template, &options);
                templates += 1;
            }
        }
    }
    // Deployment ×2, StatefulSet, DaemonSet, Job, CronJob, Pod.
    assert_eq!(templates, 7);
}

#[test]
fn app_containers_volumes_and_metadata_are_kept() {
    let file = crate_dir().join("testdata/workloads/deployment-two-containers.yaml");
    let input = documents(&read(&file)).remove(0);
    let output = documents(&inject(&read(&file))).remove(0);
    let (before, after) = (&input["spec"]["template"], &output["spec"]["template"]);
    assert_eq!(after["spec"]["containers"], before["spec"]["containers"]);
    // The sidecar goes first; the app's own init container follows unchanged.
    let init = after["spec"]["initContainers"].as_sequence().unwrap();
    assert_eq!(init.len(), 2);
    assert_eq!(init[1], before["spec"]["initContainers"][0]);
    // Existing volumes keep their place, the sidecar's come after them.
    let volumes = after["spec"]["volumes"].as_sequence().unwrap();
    let names: Vec<_> = volumes
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "tmp",
            "settings",
            "locality-sidecar-certs",
            "locality-sidecar-config"
        ]
    );
    assert_eq!(
        after["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "orders"
    );
    assert_eq!(after["metadata"]["labels"]["tier"], "backend");
    // Outside the template nothing changes.
    for key in ["replicas", "selector", "strategy"] {
        assert_eq!(output["spec"][key], input["spec"][key], "spec.{key}");
    }
    assert_eq!(output["metadata"], input["metadata"]);
    assert_eq!(
        after["spec"]["terminationGracePeriodSeconds"],
        before["spec"]["terminationGracePeriodSeconds"]
    );
}

#[test]
fn other_documents_pass_through_unchanged_in_order() {
    let text = read(&crate_dir().join("testdata/workloads/multi-doc.yaml"));
    let input = documents(&text);
    let output_text = inject(&text);
    let output = documents(&output_text);
    assert_eq!(output.len(), 3);
    assert_eq!(output[0], input[0], "the Service");
    assert_eq!(output[1], input[1], "the ConfigMap");
    assert_eq!(kind(&output[2]), "Deployment");
    // Key order survives re-serialization: the Service reads as written.
    let service_text = output_text.split("---\n").next().unwrap();
    let keys: Vec<_> = service_text
        .lines()
        .filter(|line| !line.starts_with(' '))
        .map(|line| line.split(':').next().unwrap())
        .collect();
    assert_eq!(keys, ["apiVersion", "kind", "metadata", "spec"]);
    assert!(
        output_text.contains("  replicas: '3'\n") || output_text.contains("  replicas: \"3\"\n"),
        "ConfigMap strings stay strings:\n{output_text}"
    );
}

#[test]
fn injecting_twice_is_byte_identical_to_once() {
    let options = InjectOptions {
        app_port: Some(50051),
        service_account: Some("locality-sidecar".to_string()),
        ..InjectOptions::default()
    };
    let mut inputs: Vec<String> = workload_files().iter().map(|f| read(f)).collect();
    inputs.push(read(&crate_dir().join("testdata/example-app.plain.yaml")));
    for input in inputs {
        let once = inject_documents(&input, &options).unwrap();
        let twice = inject_documents(&once, &options).unwrap();
        assert_eq!(twice, once);
    }
}

#[test]
fn options_land_in_the_pod() {
    let options = InjectOptions {
        image: "registry.example.com/locality-sidecar:dev".to_string(),
        configmap: "orders-sidecar".to_string(),
        secret: "orders-tls".to_string(),
        app_port: Some(50051),
        service_account: Some("orders".to_string()),
    };
    for file in ["deployment-two-containers.yaml", "cronjob.yaml"] {
        let text = read(&crate_dir().join("testdata/workloads").join(file));
        let output = documents(&inject_documents(&text, &options).unwrap()).remove(0);
        let template = pod_template(&output).unwrap();
        assert_injected(template, &options);
        assert_eq!(
            template["metadata"]["annotations"]["locality-sidecar.io/app-port"],
            "50051"
        );
        let expected_account = if file == "cronjob.yaml" {
            "reconciler" // named by the workload: kept
        } else {
            "orders"
        };
        assert_eq!(
            template["spec"]["serviceAccountName"], expected_account,
            "{file}"
        );
    }
}

const SMALL_DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - {name: web, image: web:1}
"#;

#[test]
fn existing_sidecar_is_updated_in_place() {
    let first = inject(SMALL_DEPLOYMENT);
    let newer = InjectOptions {
        image: "ghcr.io/locality-sidecar/locality-sidecar:0.2.0".to_string(),
        ..InjectOptions::default()
    };
    let second = inject_documents(&first, &newer).unwrap();
    let document = documents(&second).remove(0);
    let template = pod_template(&document).unwrap();
    assert_injected(template, &newer);
    assert_eq!(
        template["spec"]["initContainers"]
            .as_sequence()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn old_style_sidecar_container_is_replaced_by_the_native_one() {
    let text = SMALL_DEPLOYMENT.replace(
        "- {name: web, image: web:1}",
        "- {name: web, image: web:1}\n        - {name: locality-sidecar, image: old:1, args: [run]}",
    );
    let document = documents(&inject(&text)).remove(0);
    let template = pod_template(&document).unwrap();
    assert_injected(template, &InjectOptions::default());
    assert_eq!(
        template["spec"]["containers"],
        yaml("[{name: web, image: web:1}]")
    );
}

#[test]
fn a_pod_whose_only_container_is_the_old_sidecar_is_refused() {
    let text = SMALL_DEPLOYMENT.replace(
        "{name: web, image: web:1}",
        "{name: locality-sidecar, image: old:1}",
    );
    let error = inject_documents(&text, &InjectOptions::default()).unwrap_err();
    assert!(error.to_string().contains("no app container"), "{error}");
}

#[test]
fn the_apps_own_scrape_annotations_and_volumes_win() {
    let text = SMALL_DEPLOYMENT.replace(
        "      labels: {app: web}\n",
        "      labels: {app: web}\n      annotations: {prometheus.io/port: \"8080\"}\n",
    );
    let text = text.replace(
        "      containers:",
        "      volumes:\n        - {name: locality-sidecar-certs, csi: {driver: csi.cert-manager.io, readOnly: true}}\n      containers:",
    );
    let document = documents(&inject(&text)).remove(0);
    let template = pod_template(&document).unwrap();
    assert_eq!(
        template["metadata"]["annotations"]["prometheus.io/port"],
        "8080"
    );
    assert_eq!(
        template["metadata"]["annotations"]["prometheus.io/scrape"],
        Value::Null,
        "the app's partial scrape settings are not completed"
    );
    let certs = named(&template["spec"]["volumes"], "locality-sidecar-certs");
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0]["csi"]["driver"], "csi.cert-manager.io");
}

#[test]
fn kinds_from_other_api_groups_and_lists() {
    let custom = "apiVersion: batch.volcano.sh/v1alpha1\nkind: Job\nmetadata: {name: train}\nspec: {tasks: []}\n";
    assert_eq!(documents(&inject(custom)), documents(custom));
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}",
        SMALL_DEPLOYMENT
            .trim_start()
            .lines()
            .enumerate()
            .map(|(i, line)| format!("{} {line}\n", if i == 0 { "-" } else { " " }))
            .collect::<String>()
    );
    let document = documents(&inject(&list)).remove(0);
    assert_injected(
        pod_template(&document["items"][0]).unwrap(),
        &InjectOptions::default(),
    );
}

fn error_of(text: &str) -> InjectError {
    match inject_documents(text, &InjectOptions::default()) {
        Ok(output) => panic!("expected an error, got output:\n{output}"),
        Err(error) => error,
    }
}

#[test]
fn invalid_yaml_names_the_document() {
    let text = format!("{SMALL_DEPLOYMENT}---\nkind: [unclosed\n");
    let error = error_of(&text);
    assert!(
        matches!(error, InjectError::Yaml { index: 2, .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().starts_with("document 2: invalid YAML"),
        "{error}"
    );
}

#[test]
fn deployment_without_template_names_document_kind_name_and_field() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: broken}\nspec: {replicas: 1}\n";
    let error = error_of(text);
    assert_eq!(
        error.to_string(),
        "document 2 (Deployment/broken): spec.template: missing; a Deployment needs a pod template here"
    );
}

#[test]
fn containers_that_are_not_a_list_are_an_error() {
    let text = SMALL_DEPLOYMENT.replace("- {name: web, image: web:1}", "web: {image: web:1}");
    let error = error_of(&text).to_string();
    assert!(
        error.contains("document 1 (Deployment/web)")
            && error.contains("spec.template.spec.containers: expected a list, found a mapping"),
        "{error}"
    );
}

#[test]
fn a_port_the_sidecar_needs_is_an_error() {
    let text = SMALL_DEPLOYMENT.replace(
        "{name: web, image: web:1}",
        "{name: web, image: web:1, ports: [{containerPort: 15090}]}",
    );
    let error = error_of(&text).to_string();
    assert!(
        error.contains("containers[0].ports") && error.contains("TCP port 15090"),
        "{error}"
    );
    // The same number over the other protocol does not clash.
    let udp = text.replace(
        "{containerPort: 15090}",
        "{containerPort: 15090, protocol: UDP}",
    );
    inject(&udp);
}

#[test]
fn invalid_options_are_refused() {
    let options = InjectOptions {
        secret: "Not_A_Name".to_string(),
        ..InjectOptions::default()
    };
    let error = inject_documents(SMALL_DEPLOYMENT, &options).unwrap_err();
    assert!(error.to_string().starts_with("invalid --secret"), "{error}");
}

#[test]
fn empty_input_gives_empty_output() {
    assert_eq!(inject(""), "");
    assert_eq!(inject("---\n# only a comment\n"), "");
}

fn run_cli(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_locality-sidecar"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start locality-sidecar");
    // A process that refuses its flags exits without reading: a broken pipe here is expected.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

#[test]
fn cli_reads_stdin_or_a_file_and_prints_the_result() {
    let file = crate_dir().join("testdata/workloads/job.yaml");
    let expected = inject(&read(&file));
    let from_stdin = run_cli(&["inject"], &read(&file));
    assert!(from_stdin.status.success());
    assert_eq!(String::from_utf8(from_stdin.stdout).unwrap(), expected);
    let from_file = run_cli(&["inject", "-f", file.to_str().unwrap()], "");
    assert!(from_file.status.success());
    assert_eq!(String::from_utf8(from_file.stdout).unwrap(), expected);
}

#[test]
fn cli_error_is_one_line_exit_1_and_nothing_on_stdout() {
    // The first document is fine; the second is not: still nothing may be printed.
    let text = format!("{SMALL_DEPLOYMENT}---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: db}}\nspec: {{}}\n");
    let output = run_cli(&["inject", "-f", "-"], &text);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "stdout: {:?}", output.stdout);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("document 2 (StatefulSet/db)") && stderr.contains("spec.template"),
        "{stderr}"
    );
    let bad_yaml = run_cli(&["inject"], "a: [\n");
    assert_eq!(bad_yaml.status.code(), Some(1));
    assert!(bad_yaml.stdout.is_empty());
    let bad_port = run_cli(&["inject", "--app-port", "0"], SMALL_DEPLOYMENT);
    assert!(!bad_port.status.success());
    assert!(bad_port.stdout.is_empty());
}

/// The comment heading `manifests/example-app.yaml`; the rest of the file is inject's output.
const EXAMPLE_HEADER: &str = "\
# GENERATED: do not edit. The example app (sidecar/testdata/example-app.plain.yaml) after
#   locality-sidecar inject --app-port 50051 --service-account locality-sidecar
# Regenerate with: LOCALITY_SIDECAR_BLESS=1 cargo test -p locality-sidecar --test inject example_app
";

#[test]
fn example_app_manifest_is_the_injected_plain_example() {
    let plain = read(&crate_dir().join("testdata/example-app.plain.yaml"));
    let options = InjectOptions {
        app_port: Some(50051),
        service_account: Some("locality-sidecar".to_string()),
        ..InjectOptions::default()
    };
    let expected = format!(
        "{EXAMPLE_HEADER}{}",
        inject_documents(&plain, &options).unwrap()
    );
    let manifest = crate_dir().join("../manifests/example-app.yaml");
    if std::env::var_os("LOCALITY_SIDECAR_BLESS").is_some() {
        std::fs::write(&manifest, &expected).unwrap();
    }
    let actual = read(&manifest);
    assert!(
        actual == expected,
        "manifests/example-app.yaml is not the injected plain example; regenerate it with \
         LOCALITY_SIDECAR_BLESS=1 cargo test -p locality-sidecar --test inject example_app"
    );
}
