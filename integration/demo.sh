#!/usr/bin/env bash
# The local demo cluster (README): builds the release binaries, then runs the demo, which starts
# a fake Kubernetes API server, per-pod sidecars and echo apps on 127.x addresses, shows where
# calls land as pods fail and recover, and stops everything by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
LOCALITY_SIDECAR_BIN="$PWD/target/release/locality-sidecar" exec target/release/demo "$@"
