#!/usr/bin/env bash
# The project's test command (README): set-up, formatting, lints, then every test.
# Needs only the Rust toolchain and python3 with pip; everything else is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing test peers (Python grpcio, Kubernetes schemas)"
python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools kubernetes-validate

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== build (the end-to-end tests start the real binaries)"
cargo build --workspace --bins

echo "== tests"
cargo test --workspace
