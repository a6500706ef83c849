#!/usr/bin/env python3
"""Validates the project's Kubernetes YAML against the official OpenAPI schemas.

Checked, with kubernetes-validate in strict mode (unknown fields are errors):
  * every manifest in manifests/ (custom resources it has no schema for, such as PodMonitor,
    Issuer and Certificate, are checked for apiVersion, kind and metadata.name only);
  * the output of `locality-sidecar inject` on every file in the workloads directory, with the
    default options and with --app-port/--service-account;
  * the ConfigMap's config.yaml, with `locality-sidecar check-config`;
  * that the files kustomization.yaml names exist.

Needs `pip install kubernetes-validate`. Prints one line per object and a closing
"N passed, N failed"; exits 1 when anything is invalid, 2 when it cannot run at all.
"""

import argparse
import os
import subprocess
import sys
import tempfile

INSTALL_HINT = "run `pip install kubernetes-validate`"
# The oldest Kubernetes with native sidecars (initContainers[].restartPolicy: Always) on by default.
MIN_KUBERNETES = (1, 29)
# Kinds from CRDs, which kubernetes-validate has no schema for.
CUSTOM_KINDS = {
    ("monitoring.coreos.com", "PodMonitor"),
    ("cert-manager.io", "Issuer"),
    ("cert-manager.io", "Certificate"),
}
WORKLOAD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}

try:
    import kubernetes_validate
    import kubernetes_validate.utils as kv_utils
    import yaml  # a dependency of kubernetes-validate
except ImportError as error:
    print(f"FATAL cannot import kubernetes_validate ({error}): {INSTALL_HINT}")
    sys.exit(2)


def version_tuple(version):
    return tuple(int(part) for part in version.split(".")[:2])


def pick_version(requested):
    available = kv_utils.all_versions()
    if requested:
        if not any(v.startswith(requested + ".") or v == requested for v in available):
            print(f"FATAL kubernetes-validate {kubernetes_validate.__version__} has no schemas "
                  f"for Kubernetes {requested}; it has {', '.join(available)}")
            sys.exit(2)
        return requested
    newest = kv_utils.latest_version()
    if version_tuple(newest) < MIN_KUBERNETES:
        print(f"FATAL kubernetes-validate {kubernetes_validate.__version__} only has schemas up "
              f"to Kubernetes {newest}; native sidecars need 1.29+: "
              "run `pip install --upgrade kubernetes-validate`")
        sys.exit(2)
    return ".".join(newest.split(".")[:2])


def group_of(api_version):
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def label(doc):
    metadata = doc.get("metadata") or {}
    return f"{doc.get('kind', '(no kind)')}/{metadata.get('name', '(no name)')}"


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def ok(self, where, what):
        self.passed += 1
        print(f"ok   {where}: {what}")

    def fail(self, where, what):
        self.failed += 1
        print(f"FAIL {where}: {what}")


def validate_doc(doc, where, version, report):
    if not isinstance(doc, dict):
        report.fail(where, f"expected a Kubernetes object (a mapping), found {type(doc).__name__}")
        return
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if (group_of(api_version or ""), kind) in CUSTOM_KINDS:
        missing = [field for field, value in (("apiVersion", api_version), ("kind", kind),
                   ("metadata.name", (doc.get("metadata") or {}).get("name")))
                   if not isinstance(value, str) or not value]
        if missing:
            report.fail(where, f"{label(doc)}: missing {', '.join(missing)}")
        else:
            report.ok(where, f"{label(doc)} (custom resource: well-formed, no schema)")
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        report.ok(where, f"{label(doc)} valid against Kubernetes {version} (strict)")
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(item) for item in error.path) or "(top level)"
        report.fail(where, f"{label(doc)}: {path}: {error.message}")
    except kubernetes_validate.SchemaNotFoundError as error:
        report.fail(where, f"{label(doc)}: {error.message}")


def load_all(text, where, report):
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        report.fail(where, f"invalid YAML: {error}")
        return []


def check_injected(docs, where, report):
    """inject's output must carry the native sidecar in every pod template."""
    for doc in docs:
        kind = doc.get("kind")
        if kind not in WORKLOAD_KINDS:
            continue
        template = doc
        if kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
        elif kind != "Pod":
            template = doc["spec"]["template"]
        init = template["spec"].get("initContainers") or []
        sidecars = [c for c in init if c.get("name") == "locality-sidecar"]
        if len(sidecars) != 1 or sidecars[0].get("restartPolicy") != "Always":
            report.fail(where, f"{label(doc)}: no native locality-sidecar init container")


def run_binary(binary, args):
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifests", required=True, help="the manifests/ directory")
    parser.add_argument("--workloads", required=True, help="YAML files to run inject on")
    parser.add_argument("--binary", required=True, help="the locality-sidecar binary")
    parser.add_argument("--kubernetes-version", help="schemas to use (default: the newest shipped)")
    args = parser.parse_args()

    version = pick_version(args.kubernetes_version)
    print(f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes schemas {version}")
    report = Report()

    manifest_files = sorted(f for f in os.listdir(args.manifests) if f.endswith(".yaml"))
    for name in manifest_files:
        path = os.path.join(args.manifests, name)
        with open(path) as file:
            text = file.read()
        if name == "kustomization.yaml":
            check_kustomization(yaml.safe_load(text), args.manifests, path, report)
            continue
        docs = load_all(text, path, report)
        for doc in docs:
            validate_doc(doc, path, version, report)
            if name == "configmap.yaml" and doc.get("kind") == "ConfigMap":
                check_config(doc, path, args.binary, report)
        if name == "example-app.yaml":
            check_injected(docs, path, report)

    workload_files = sorted(f for f in os.listdir(args.workloads) if f.endswith(".yaml"))
    if not workload_files:
        report.fail(args.workloads, "no workload files")
    option_sets = [[], ["--app-port", "50051", "--service-account", "locality-sidecar",
                        "--configmap", "custom-config", "--secret", "custom-tls"]]
    for name in workload_files:
        path = os.path.join(args.workloads, name)
        for options in option_sets:
            where = f"inject {' '.join(options + [name]) if options else name}"
            result = run_binary(args.binary, ["inject", "-f", path, *options])
            if result.returncode != 0:
                report.fail(where, f"exit {result.returncode}: {result.stderr.strip()}")
                continue
            docs = load_all(result.stdout, where, report)
            check_injected(docs, where, report)
            for doc in docs:
                validate_doc(doc, where, version, report)

    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


def check_kustomization(kustomization, directory, where, report):
    named = list(kustomization.get("resources") or [])
    for generator in kustomization.get("configMapGenerator") or []:
        named += [entry.split("=", 1)[-1] for entry in generator.get("files") or []]
    missing = [name for name in named if not os.path.exists(os.path.join(directory, name))]
    if missing:
        report.fail(where, f"names files that do not exist: {', '.join(missing)}")
    else:
        report.ok(where, f"all {len(named)} files it names exist")


def check_config(configmap, where, binary, report):
    text = (configmap.get("data") or {}).get("config.yaml")
    if not isinstance(text, str):
        report.fail(where, "ConfigMap has no data key config.yaml")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        file.write(text)
        path = file.name
    try:
        result = run_binary(binary, ["check-config", path])
    finally:
        os.unlink(path)
    if result.returncode == 0:
        report.ok(where, "config.yaml passes `locality-sidecar check-config`")
    else:
        report.fail(where, f"config.yaml: {result.stderr.strip()}")


if __name__ == "__main__":
    sys.exit(main())
