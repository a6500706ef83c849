#!/usr/bin/env bash
# The project's test command (README): set-up, formatting, lints, then every test.
# Needs only the Rust toolchain and python3 with pip; everything else is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing test peers (Python grpcio, Kubernetes schemas, Prometheus parsers)"
python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools kubernetes-validate cryptography aioquic prometheus_client

echo "== installing system packages (buildah: tests/image.rs; chromium: tests/status_page.rs; iproute2, nftables: tests/network_faults.rs)"
# One list: add a package here and it is installed when missing (Debian apt; CI runs as root).
apt_packages=(buildah chromium iproute2 nftables)
missing=()
for package in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# A one-shot check gains nothing from incremental caches but their disk (about 2 GiB).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== build (the end-to-end tests start the real binaries)"
cargo build --workspace --bins

echo "== tests"
# A whole-suite guard: every call and stream in the tests has its own bound, so this only
# fires if something hangs outside them; then CI fails with a reason instead of stalling.
# SUITE_TIMEOUT overrides it (coreutils `timeout` duration, e.g. 40m on a slow machine).
suite_timeout="${SUITE_TIMEOUT:-25m}"
status=0
timeout --kill-after=30s "$suite_timeout" cargo test --workspace || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "== tests did not finish within $suite_timeout: a test hangs (see the last test names above)" >&2
fi
exit "$status"
