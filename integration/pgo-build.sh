#!/usr/bin/env bash
# Builds the sidecar profile-guided (PGO): an instrumented release build, a short training run
# of real calls through a sidecar pair (the benchmark's sidecar scenarios: unary calls of both
# sizes at several concurrencies, a server stream, idle and busy streams), then the release build
# again with the counts it collected, so the compiler lays out and inlines the call path the way
# calls take it. Measured (BENCHMARKS.md, speed work): 15-28% less CPU per unary 256 B call than
# the plain release build at c=1 and c=128, 8-18% for 64 KiB. The code is the same; only the
# compiler's choices differ.
#
# Usage: integration/pgo-build.sh [--force]
#   --force  build and train again even when target/pgo/locality-sidecar is newer than the plain
#            release sidecar (which cargo rebuilds only when the sources change)
# Prints `pgo-binary PATH` on its last line (target/pgo/locality-sidecar, under CARGO_TARGET_DIR
# when that is set). Builds the release workspace binaries first (the benchmark and the echo
# server drive the training). Needs llvm-profdata from the LLVM that rustc uses (`rustc -vV`):
# found as llvm-profdata-<major>, through rustup's llvm-tools component, or installed from
# Debian (llvm-<major>) when this shell may. Exits 3 when it cannot be found, so callers can
# fall back to the plain release build.
# Takes two more release builds of the sidecar than a plain build (~15 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

force=no
case "${1:-}" in
    "") ;;
    --force) force=yes ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "pgo-build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac

host=$(rustc -vV | sed -n 's/^host: //p')
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$host" ] && [ -n "$llvm_major" ] || { echo "pgo-build.sh: cannot read rustc's host and LLVM version from rustc -vV" >&2; exit 1; }

target_dir="${CARGO_TARGET_DIR:-$root/target}"
work="$target_dir/pgo"
raw="$work/raw"
mkdir -p "$work"

echo "== cargo build --release --workspace --bins (the benchmark and echo server for training)" >&2
cargo build --release --workspace --bins >&2

# Cargo touches the plain release sidecar only when its sources changed: a profile-guided
# binary newer than it was built from the same code.
if [ "$force" = no ] && [ "$work/locality-sidecar" -nt "$target_dir/release/locality-sidecar" ]; then
    echo "== the profile-guided sidecar is up to date (--force builds it again)" >&2
    echo "pgo-binary $work/locality-sidecar"
    exit 0
fi

# llvm-profdata must read the raw profiles the instrumented binary writes, whose format follows
# rustc's LLVM: take one of the same major version.
find_profdata() {
    local candidate
    for candidate in "llvm-profdata-$llvm_major" \
        "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" \
        "/usr/lib/llvm-$llvm_major/bin/llvm-profdata" llvm-profdata; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" --version 2>/dev/null | grep -Eq "LLVM version $llvm_major\."; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}
profdata=$(find_profdata || true)
if [ -z "$profdata" ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo); else sudo=(none); fi
    if [ "${sudo[0]:-}" != none ]; then
        echo "== installing llvm-$llvm_major (apt) for llvm-profdata" >&2
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "llvm-$llvm_major" >&2 ||
            { "${sudo[@]}" apt-get update -qq >&2 &&
                DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "llvm-$llvm_major" >&2; } || true
        profdata=$(find_profdata || true)
    fi
fi
if [ -z "$profdata" ]; then
    echo "pgo-build.sh: no llvm-profdata of LLVM $llvm_major (rustc's); install it (Debian: apt-get install llvm-$llvm_major; rustup: rustup component add llvm-tools)" >&2
    exit 3
fi

# --target keeps RUSTFLAGS off build scripts and proc macros (they would be instrumented too and
# write profiles while the crate builds); separate target dirs keep target/release untouched.
echo "== instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$raw" cargo build --release -p locality-sidecar --bin locality-sidecar \
    --target "$host" --target-dir "$work/generate" >&2
instrumented="$work/generate/$host/release/locality-sidecar"

# The benchmark stops its sidecars with SIGKILL, and an instrumented process writes its counts
# only when it exits: the launcher keeps each sidecar as its own child, so killing the launcher
# leaves it running, and the sidecars are stopped with SIGTERM once training is over.
rm -rf "$raw"
mkdir -p "$raw"
pids="$work/training-pids"
: >"$pids"
launcher="$work/training-launcher"
cat >"$launcher" <<EOF
#!/bin/sh
LLVM_PROFILE_FILE='$raw/sidecar-%p.profraw' '$instrumented' "\$@" &
echo \$! >>'$pids'
wait \$!
EOF
chmod +x "$launcher"
stop_training_sidecars() {
    local pid
    while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done <"$pids"
    for _ in $(seq 1 150); do
        local running=0
        while read -r pid; do kill -0 "$pid" 2>/dev/null && running=1; done <"$pids"
        [ "$running" = 0 ] && return 0
        sleep 0.2
    done
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$pids"
}
trap stop_training_sidecars EXIT

echo "== training: the benchmark's sidecar scenarios with the instrumented sidecar" >&2
LOCALITY_SIDECAR_BIN="$launcher" "$target_dir/release/bench" --setups sidecar --rounds 1 --duration 3 \
    --only unary-256B-c1,unary-256B-c16,unary-256B-c128,unary-64KiB-c1,unary-64KiB-c16,server-stream,streams-idle-busy \
    --stream-messages 200000 --json "$work/training.json" --svg "$work/training.svg" >"$work/training.log" 2>&1 ||
    { echo "pgo-build.sh: the training run failed (log: $work/training.log)" >&2; exit 1; }
stop_training_sidecars
trap - EXIT
shopt -s nullglob
profiles=("$raw"/*.profraw)
[ "${#profiles[@]}" -gt 0 ] || { echo "pgo-build.sh: the training wrote no profile (log: $work/training.log)" >&2; exit 1; }
"$profdata" merge -o "$work/sidecar.profdata" "${profiles[@]}" >&2
echo "== merged ${#profiles[@]} profiles into $work/sidecar.profdata" >&2

echo "== profile-guided build" >&2
RUSTFLAGS="-Cprofile-use=$work/sidecar.profdata" cargo build --release -p locality-sidecar --bin locality-sidecar \
    --target "$host" --target-dir "$work/use" >&2
cp "$work/use/$host/release/locality-sidecar" "$work/locality-sidecar"
echo "pgo-binary $work/locality-sidecar"
