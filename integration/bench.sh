#!/usr/bin/env bash
# Runs the benchmark: the locality-sidecar pair side by side with a direct call, an HAProxy pair
# and an nginx pair (see BENCHMARKS.md). Arguments go to the benchmark (`--quick`, `--only`,
# `--setups`, `--duration`, `--json`, `--svg`, `--allocations`, `--instructions`, `--help`).
#
# Builds every release binary (the sidecar and echo server are separate processes under test)
# and the profile-guided, BOLT-laid-out sidecar that ships (integration/pgo-build.sh; `--no-pgo`
# measures the plain release build instead, and LOCALITY_SIDECAR_BIN set by the caller picks any binary),
# installs HAProxy, nginx and h2load from Debian when they are missing and this shell may install
# packages, then runs target/release/bench. Without them the benchmark still runs: HAProxy's and
# nginx's columns say "not installed", and the h2load-* scenarios are left out.
set -euo pipefail

cd "$(dirname "$0")/.."

pgo=yes
args=()
for arg in "$@"; do
    if [ "$arg" = --no-pgo ]; then pgo=no; else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}

cargo build --release --workspace --bins

if [ "$pgo" = yes ] && [ -z "${LOCALITY_SIDECAR_BIN:-}" ]; then
    pgo_status=0
    pgo_line=$(./integration/pgo-build.sh | tail -n 1) || pgo_status=$?
    if [ "$pgo_status" -eq 0 ] && [ "${pgo_line%% *}" = pgo-binary ]; then
        export LOCALITY_SIDECAR_BIN="${pgo_line#pgo-binary }"
        echo "bench.sh: measuring the profile-guided sidecar $LOCALITY_SIDECAR_BIN" >&2
    elif [ "$pgo_status" -eq 3 ]; then
        echo "bench.sh: WARNING: no profile-guided build (see above); measuring the plain release sidecar" >&2
    else
        echo "bench.sh: integration/pgo-build.sh failed (exit $pgo_status); --no-pgo measures without it" >&2
        exit 1
    fi
fi

# program:Debian package; h2load (nghttp2-client) drives the h2load-* scenarios.
missing=()
for entry in haproxy:haproxy nginx:nginx h2load:nghttp2-client; do
  program="${entry%%:*}"
  if ! command -v "$program" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$program" ]; then
    missing+=("${entry#*:}")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench.sh: installing ${missing[*]} from Debian" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "bench.sh: installing ${missing[*]} from Debian (sudo)" >&2
    sudo apt-get update
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  else
    echo "bench.sh: ${missing[*]} not installed and cannot install here; those columns will read \"not installed\"" >&2
  fi
fi

exec "${CARGO_TARGET_DIR:-target}/release/bench" "$@"
