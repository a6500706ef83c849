//! `locality-sidecar webhook`, the admission webhook, driven the way the API server drives it:
//! the real binary, AdmissionReview `admission.k8s.io/v1` JSON over HTTPS with a certificate
//! from `locality-sidecar certs`, and the returned JSON Patch applied by an independent RFC 6902
//! implementation (the `json-patch` crate) to see the pod the cluster would create.
//!
//! Covered: an annotated pod gets the native sidecar (HOST_IP from status.hostIP, the QUIC UDP
//! port) and stays schema-valid; a plain pod is allowed untouched; re-invocation adds nothing;
//! bad annotations are denied with the reason; garbage gets HTTP 400 and the next good request
//! is still served; a renewed certificate is served to new handshakes within 5 seconds.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use integration::harness::{free_tcp_addr, generate_certs, sidecar_binary, within, CertDir};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

/// The webhook process; killed when dropped.
struct Webhook {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Webhook {
    async fn start(dir: &Path, certs: &CertDir) -> Webhook {
        let addr = free_tcp_addr();
        let log = dir.join("webhook.log");
        let child = Command::new(sidecar_binary())
            .arg("webhook")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--cert")
            .arg(certs.cert())
            .arg("--key")
            .arg(certs.key())
            .env("RUST_LOG", "locality_sidecar=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the webhook log"))
            .spawn()
            .expect("start locality-sidecar webhook");
        let mut webhook = Webhook { child, addr, log };
        // Ready when it accepts connections; its exit ends the wait at once.
        within(LIMIT, "the webhook listening", async {
            loop {
                if let Ok(Some(status)) = webhook.child.try_wait() {
                    panic!("the webhook exited ({status}): {}", webhook.log_text());
                }
                if tokio::net::TcpStream::connect(webhook.addr).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        webhook
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on a new TLS connection that trusts `ca`: (status, body).
    async fn post(&self, ca: &Path, path: &str, body: Vec<u8>) -> Result<(u16, Bytes), String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
            roots
                .add(cert.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("locality-sidecar").map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = http::Request::post(path)
            .header(http::header::HOST, "locality-sidecar")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    /// Posts an AdmissionReview for `pod` and returns the review's `response`.
    async fn review(&self, ca: &Path, uid: &str, pod: &Value) -> Value {
        let (status, body) = within(
            LIMIT,
            "an AdmissionReview answer",
            self.post(
                ca,
                "/mutate",
                admission_review(uid, pod).to_string().into_bytes(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("POST /mutate: {e}\n{}", self.log_text()));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).expect("the answer is JSON");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
        assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
        assert_eq!(answer["response"]["uid"], uid, "{answer}");
        answer["response"].clone()
    }
}

/// An AdmissionReview as the API server sends it for a pod a ReplicaSet creates.
fn admission_review(uid: &str, pod: &Value) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "5d1c3c5e-1b1e-4e0a-9f5a-0d1f3c1e2b3a",
                "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": { "kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1" }
        }
    })
}

fn pod(annotations: Value) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "checkout-7d9f8b6c5-",
            "namespace": "shop",
            "labels": { "app": "checkout", "pod-template-hash": "7d9f8b6c5" },
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "checkout-7d9f8b6c5",
                "uid": "0f5c2a8e-3d4b-4c6a-8b1e-2f3a4b5c6d7e",
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "volumes": [{
                "name": "kube-api-access-x7k2p",
                "projected": { "sources": [{ "serviceAccountToken": { "path": "token" } }] }
            }],
            "containers": [{
                "name": "checkout",
                "image": "registry.example/checkout:1.4",
                "ports": [{ "name": "grpc", "containerPort": 50051, "protocol": "TCP" }],
                "resources": {},
                "volumeMounts": [{
                    "name": "kube-api-access-x7k2p",
                    "readOnly": true,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"
                }],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

/// The pod the API server would store: the response's patch (base64 JSON Patch) applied.
fn patched(pod: &Value, response: &Value) -> Value {
    assert_eq!(response["allowed"], true, "{response}");
    let mut pod = pod.clone();
    let Some(encoded) = response.get("patch") else {
        return pod;
    };
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.as_str().expect("the patch is a base64 string"))
        .expect("the patch is valid base64");
    let patch: json_patch::Patch =
        serde_json::from_slice(&bytes).expect("the patch is an RFC 6902 JSON Patch");
    json_patch::patch(&mut pod, &patch).unwrap_or_else(|e| {
        panic!(
            "the patch does not apply: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    pod
}

fn sidecars(pod: &Value) -> Vec<Value> {
    let count_in = |key: &str| -> Vec<Value> {
        pod["spec"][key]
            .as_array()
            .map(|containers| {
                containers
                    .iter()
                    .filter(|c| c["name"] == "locality-sidecar")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut all = count_in("initContainers");
    all.extend(count_in("containers"));
    all
}

/// The pod checked against the Kubernetes schemas (strict), as manifests_validate does.
fn assert_schema_valid(pod: &Value) {
    let script = "import json, sys, kubernetes_validate, kubernetes_validate.utils as u\n\
                  v = u.latest_version()\n\
                  kubernetes_validate.validate(json.load(sys.stdin), '.'.join(v.split('.')[:2]), strict=True)\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with `pip install kubernetes-validate`)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("python's stdin")
        .write_all(pod.to_string().as_bytes())
        .expect("write the pod to python");
    let output = child.wait_with_output().expect("wait for python3");
    assert!(
        output.status.success(),
        "the injected pod is not schema-valid (or kubernetes-validate is missing: pip install kubernetes-validate):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn annotated_pod_gets_the_native_sidecar_once_and_plain_pods_are_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = generate_certs(&dir.path().join("certs"), &[]);
    let webhook = Webhook::start(dir.path(), &certs).await;

    let annotated = pod(json!({
        "locality-sidecar.io/inject": "enabled",
        "locality-sidecar.io/app-port": "50051",
    }));
    let response = webhook
        .review(&certs.ca(), "7f3b9c1e-0001", &annotated)
        .await;
    let injected = patched(&annotated, &response);
    let found = sidecars(&injected);
    assert_eq!(found.len(), 1, "one sidecar: {injected:#}");
    let init = injected["spec"]["initContainers"]
        .as_array()
        .expect("initContainers");
    assert_eq!(init[0]["name"], "locality-sidecar", "first init container");
    assert_eq!(init[0]["restartPolicy"], "Always", "a native sidecar");
    let host_ip = init[0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|env| env["name"] == "HOST_IP")
        .expect("HOST_IP in the sidecar's env");
    assert_eq!(
        host_ip["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    assert!(
        init[0]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|port| port["protocol"] == "UDP" && port["containerPort"] == 15443),
        "the QUIC port, UDP: {:#}",
        init[0]["ports"]
    );
    assert!(
        init[0]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .any(|port| port["protocol"] == "TCP"
                && port["containerPort"] == 15443
                && port["name"] == "h2-fallback"),
        "the HTTP/2 fallback port, TCP at the same number: {:#}",
        init[0]["ports"]
    );
    // The app and everything it had are still there.
    assert_eq!(injected["spec"]["containers"][0]["name"], "checkout");
    assert_eq!(
        injected["spec"]["volumes"][0]["name"],
        "kube-api-access-x7k2p"
    );
    assert_eq!(
        injected["metadata"]["labels"]["locality-sidecar.io/injected"],
        "true"
    );
    assert_eq!(
        injected["metadata"]["annotations"]["locality-sidecar.io/app-port"],
        "50051"
    );
    assert_schema_valid(&injected);

    // Re-invocation (reinvocationPolicy: IfNeeded) on the injected pod: nothing more.
    let again = webhook
        .review(&certs.ca(), "7f3b9c1e-0002", &injected)
        .await;
    assert!(again.get("patch").is_none(), "no second patch: {again}");
    assert_eq!(patched(&injected, &again), injected);

    // A pod that did not ask: allowed, untouched.
    let plain = pod(json!({ "team": "payments" }));
    let response = webhook.review(&certs.ca(), "7f3b9c1e-0003", &plain).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    assert_eq!(patched(&plain, &response), plain);

    // A bad option is denied with the reason, not injected half-right.
    let bad = pod(json!({
        "locality-sidecar.io/inject": "enabled",
        "locality-sidecar.io/app-port": "grpc",
    }));
    let response = webhook.review(&certs.ca(), "7f3b9c1e-0004", &bad).await;
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("locality-sidecar.io/app-port") && message.contains("grpc"),
        "{response}"
    );
}

#[tokio::test]
async fn garbage_gets_400_and_the_webhook_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = generate_certs(&dir.path().join("certs"), &[]);
    let webhook = Webhook::start(dir.path(), &certs).await;

    let bodies: [&[u8]; 3] = [
        b"{\"apiVersion\": \"admission.k8s.io/v1\", \"kind\": \"Admission",
        b"\x00\xff not json at all",
        br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#,
    ];
    for body in bodies {
        let (status, answer) = within(
            LIMIT,
            "the answer to garbage",
            webhook.post(&certs.ca(), "/mutate", body.to_vec()),
        )
        .await
        .unwrap_or_else(|e| panic!("POST garbage: {e}\n{}", webhook.log_text()));
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("AdmissionReview"), "a message: {answer}");
    }

    let annotated = pod(json!({ "locality-sidecar.io/inject": "enabled" }));
    let response = webhook
        .review(&certs.ca(), "1e0c5d2a-0001", &annotated)
        .await;
    assert_eq!(sidecars(&patched(&annotated, &response)).len(), 1);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_within_five_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = generate_certs(&dir.path().join("first"), &[]);
    let second = generate_certs(&dir.path().join("second"), &[]);
    // The webhook serves from files of its own, which the test rewrites as a renewal would.
    let live = CertDir {
        dir: dir.path().join("live"),
    };
    std::fs::create_dir_all(&live.dir).expect("mkdir live");
    for (from, to) in [
        (first.cert(), live.cert()),
        (first.key(), live.key()),
        (first.ca(), live.ca()),
    ] {
        std::fs::copy(from, to).expect("copy the first certificate");
    }
    let webhook = Webhook::start(dir.path(), &live).await;
    let annotated = pod(json!({ "locality-sidecar.io/inject": "enabled" }));
    webhook
        .review(&first.ca(), "9a8b7c6d-0001", &annotated)
        .await;
    let body = admission_review("9a8b7c6d-0002", &annotated)
        .to_string()
        .into_bytes();
    let refused = webhook
        .post(&second.ca(), "/mutate", body.clone())
        .await
        .expect_err("a client trusting only the second CA refuses the first certificate");
    assert!(refused.contains("TLS handshake"), "{refused}");

    std::fs::copy(second.cert(), live.cert()).expect("renew tls.crt");
    std::fs::copy(second.key(), live.key()).expect("renew tls.key");
    let renewed = Instant::now();
    let deadline = renewed + Duration::from_secs(5);
    loop {
        match webhook.post(&second.ca(), "/mutate", body.clone()).await {
            Ok((200, _)) => break,
            outcome => assert!(
                Instant::now() < deadline,
                "the renewed certificate is not served 5 s after the files changed: {outcome:?}\n{}",
                webhook.log_text()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("renewed certificate served after {:?}", renewed.elapsed());
    // And the webhook still answers reviews under the new certificate.
    let response = webhook
        .review(&second.ca(), "9a8b7c6d-0003", &annotated)
        .await;
    assert_eq!(sidecars(&patched(&annotated, &response)).len(), 1);
}
