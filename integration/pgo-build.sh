#!/usr/bin/env bash
# Builds the sidecar profile-guided (PGO), then lays it out with BOLT: an instrumented release
# build, a short training run of real calls through a sidecar pair (the benchmark's sidecar
# scenarios: unary calls of both sizes at several concurrencies, a server stream, idle and busy
# streams, and h2load's unary calls when h2load is installed), the release build again with the
# counts it collected, so the compiler lays out and inlines the call path the way calls take it;
# then BOLT instruments that binary, the same training runs again, and BOLT rewrites the binary
# so the blocks and functions calls run sit together (fewer taken branches and instruction-cache
# misses on every wake-up). Measured (BENCHMARKS.md, speed work): PGO takes 15-28% off the CPU
# per unary 256 B call of the plain release build at c=1 and c=128, 8-18% for 64 KiB; BOLT
# about 5% more. The code is the same; only the compiler's and BOLT's choices differ.
#
# Usage: integration/pgo-build.sh [--force] [--no-bolt]
#   --force    build and train again even when target/pgo/locality-sidecar is newer than the
#              plain release sidecar (which cargo rebuilds only when the sources change)
#   --no-bolt  stop after the profile-guided build
# Prints `pgo-binary PATH` on its last line (target/pgo/locality-sidecar, under CARGO_TARGET_DIR
# when that is set). Builds the release workspace binaries first (the benchmark and the echo
# server drive the training). Needs llvm-profdata from the LLVM that rustc uses (`rustc -vV`):
# found as llvm-profdata-<major>, through rustup's llvm-tools component, or installed from
# Debian (llvm-<major>) when this shell may. Exits 3 when it cannot be found, so callers can
# fall back to the plain release build. BOLT (llvm-bolt and merge-fdata, Debian's bolt-<major>,
# installed the same way) is optional: without it the binary is profile-guided only.
# Takes two more release builds of the sidecar than a plain build (~17 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

force=no
bolt=yes
for argument in "$@"; do
    case "$argument" in
        --force) force=yes ;;
        --no-bolt) bolt=no ;;
        -h|--help) sed -n '2,999p' "$0" | sed '/^set -euo/,$d'; exit 0 ;;
        *) echo "pgo-build.sh: unknown argument $argument (see --help)" >&2; exit 2 ;;
    esac
done

host=$(rustc -vV | sed -n 's/^host: //p')
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$host" ] && [ -n "$llvm_major" ] || { echo "pgo-build.sh: cannot read rustc's host and LLVM version from rustc -vV" >&2; exit 1; }

target_dir="${CARGO_TARGET_DIR:-$root/target}"
work="$target_dir/pgo"
raw="$work/raw"
mkdir -p "$work"

echo "== cargo build --release --workspace --bins (the benchmark and echo server for training)" >&2
cargo build --release --workspace --bins >&2

# BOLT reads the finished binary, so any version will do; the one of rustc's LLVM first.
find_bolt() {
    local candidate
    for candidate in "llvm-bolt-$llvm_major" "/usr/lib/llvm-$llvm_major/bin/llvm-bolt" llvm-bolt /usr/lib/llvm-*/bin/llvm-bolt; do
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}
# What the finished binary went through, written beside it: "pgo" or "pgo+bolt".
wanted_kind=pgo
[ "$bolt" = yes ] && find_bolt >/dev/null && wanted_kind=pgo+bolt
# Cargo touches the plain release sidecar only when its sources changed: a finished binary newer
# than it, made the way asked, was built from the same code.
if [ "$force" = no ] && [ "$work/locality-sidecar" -nt "$target_dir/release/locality-sidecar" ] &&
    [ "$(cat "$work/locality-sidecar.kind" 2>/dev/null)" = "$wanted_kind" ]; then
    echo "== the profile-guided sidecar ($wanted_kind) is up to date (--force builds it again)" >&2
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
# What is missing is installed from Debian when this shell may (root, or sudo without a password).
can_install=no
sudo=()
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then can_install=yes; elif sudo -n true 2>/dev/null; then can_install=yes; sudo=(sudo); fi
fi
profdata=$(find_profdata || true)
if [ -z "$profdata" ]; then
    if [ "$can_install" = yes ]; then
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
pids="$work/training-pids"
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
# The same calls train both stages. h2load's scenarios join when it is installed: the held-out
# load generator's frames (its header forms, its flow-control updates) take their own branches.
training_scenarios=unary-256B-c1,unary-256B-c16,unary-256B-c128,unary-64KiB-c1,unary-64KiB-c16,server-stream,streams-idle-busy
command -v h2load >/dev/null 2>&1 && training_scenarios="$training_scenarios,h2load-unary-256B-c1,h2load-unary-256B-c128"
# train NAME COMMAND...: the benchmark's sidecar scenarios with COMMAND (an instrumented sidecar
# and its environment) standing in for the sidecar.
train() {
    local name=$1
    shift
    local launcher="$work/$name-launcher"
    {
        echo '#!/usr/bin/env bash'
        printf '%q ' "$@"
        echo '"$@" &'
        echo "echo \$! >>'$pids'"
        echo 'wait $!'
    } >"$launcher"
    chmod +x "$launcher"
    : >"$pids"
    trap stop_training_sidecars EXIT
    echo "== training ($name): the benchmark's sidecar scenarios with the instrumented sidecar" >&2
    LOCALITY_SIDECAR_BIN="$launcher" "$target_dir/release/bench" --setups sidecar --rounds 1 --duration 3 \
        --only "$training_scenarios" --stream-messages 200000 \
        --json "$work/$name-training.json" --svg "$work/$name-training.svg" >"$work/$name-training.log" 2>&1 ||
        { echo "pgo-build.sh: the $name training run failed (log: $work/$name-training.log)" >&2; exit 1; }
    stop_training_sidecars
    trap - EXIT
}

rm -rf "$raw"
mkdir -p "$raw"
train pgo env "LLVM_PROFILE_FILE=$raw/sidecar-%p.profraw" "$instrumented"
shopt -s nullglob
profiles=("$raw"/*.profraw)
[ "${#profiles[@]}" -gt 0 ] || { echo "pgo-build.sh: the training wrote no profile (log: $work/pgo-training.log)" >&2; exit 1; }
"$profdata" merge -o "$work/sidecar.profdata" "${profiles[@]}" >&2
echo "== merged ${#profiles[@]} profiles into $work/sidecar.profdata" >&2

# --emit-relocs keeps the linker's relocations in the binary: BOLT needs them to move functions.
echo "== profile-guided build" >&2
RUSTFLAGS="-Cprofile-use=$work/sidecar.profdata -Clink-arg=-Wl,--emit-relocs" \
    cargo build --release -p locality-sidecar --bin locality-sidecar --target "$host" --target-dir "$work/use" >&2
pgo_only="$work/use/$host/release/locality-sidecar"

# A sidecar still running from the old binary keeps its file busy: the new one is renamed over it.
# finish BINARY KIND
finish() {
    cp "$1" "$work/locality-sidecar.new"
    mv -f "$work/locality-sidecar.new" "$work/locality-sidecar"
    echo "$2" >"$work/locality-sidecar.kind"
    echo "pgo-binary $work/locality-sidecar"
    exit 0
}
[ "$bolt" = yes ] || finish "$pgo_only" pgo

llvm_bolt=$(find_bolt || true)
if [ -z "$llvm_bolt" ] && [ "$can_install" = yes ]; then
    echo "== installing bolt-$llvm_major (apt) for llvm-bolt" >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "bolt-$llvm_major" >&2 || true
    llvm_bolt=$(find_bolt || true)
fi
merge_fdata="$(dirname "$llvm_bolt")/merge-fdata"
[ -x "$merge_fdata" ] || merge_fdata="$(dirname "$llvm_bolt")/merge-fdata-${llvm_bolt##*llvm-bolt-}"
if [ -z "$llvm_bolt" ] || [ ! -x "$merge_fdata" ]; then
    echo "pgo-build.sh: no llvm-bolt and merge-fdata (Debian: apt-get install bolt-$llvm_major); the sidecar is profile-guided without BOLT's layout" >&2
    finish "$pgo_only" pgo
fi

# BOLT lays the profile-guided binary out again from where its branches went in the same
# training: hot paths in straight lines, hot functions side by side, cold blocks moved away.
echo "== BOLT: instrumenting the profile-guided sidecar" >&2
bolt_dir="$work/bolt"
rm -rf "$bolt_dir"
mkdir -p "$bolt_dir"
"$llvm_bolt" "$pgo_only" -instrument -instrumentation-file="$bolt_dir/sidecar.fdata" \
    -instrumentation-file-append-pid -o "$bolt_dir/instrumented" >"$bolt_dir/instrument.log" 2>&1 ||
    { echo "pgo-build.sh: llvm-bolt -instrument failed (log: $bolt_dir/instrument.log)" >&2; exit 1; }
train bolt "$bolt_dir/instrumented"
branch_profiles=("$bolt_dir"/sidecar.fdata.*.fdata)
[ "${#branch_profiles[@]}" -gt 0 ] || { echo "pgo-build.sh: the BOLT training wrote no profile (log: $work/bolt-training.log)" >&2; exit 1; }
"$merge_fdata" "${branch_profiles[@]}" >"$bolt_dir/merged.fdata" 2>"$bolt_dir/merge.log"
echo "== BOLT: laying out the sidecar from ${#branch_profiles[@]} profiles" >&2
"$llvm_bolt" "$pgo_only" -data="$bolt_dir/merged.fdata" -o "$bolt_dir/locality-sidecar" \
    -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold -split-eh \
    -icf=1 -use-gnu-stack >"$bolt_dir/optimize.log" 2>&1 ||
    { echo "pgo-build.sh: llvm-bolt failed (log: $bolt_dir/optimize.log)" >&2; exit 1; }
"$bolt_dir/locality-sidecar" --version >/dev/null ||
    { echo "pgo-build.sh: the binary BOLT wrote does not start" >&2; exit 1; }
finish "$bolt_dir/locality-sidecar" pgo+bolt
