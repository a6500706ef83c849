#!/usr/bin/env bash
# Builds the container images, offline (nothing is pulled from any registry):
#   localhost/locality-sidecar:<version>   the sidecar (and the admission webhook)
#   localhost/echo-server:<version>        the example app of manifests/example-app.yaml
# from the Containerfile at the repository root: FROM scratch, the stripped binary, the glibc
# libraries `ldd` says it needs, and a passwd/group with the non-root user 65532.
# <version> is what the built binary reports (`locality-sidecar --version`), i.e. Cargo's.
#
# Usage: integration/build-image.sh [--profile release|debug] [--no-build] [--no-pgo] [--only NAME]
#   --profile  which cargo profile's binaries go in (default release, what ships; the tests use
#              debug, already built by the test command, because a release build takes 10+ minutes
#              on a 2-core machine; a stripped debug binary still fits under 40 MiB), tagged
#              <version>-debug so it never replaces the release image
#   --no-build use the binaries already in target/<profile> instead of running cargo build
#              (and a profile-guided sidecar already in target/pgo, if there is one)
#   --no-pgo   release only: the plain release sidecar instead of the profile-guided, BOLT-laid-out
#              one that integration/pgo-build.sh makes (18-30% less CPU per call; ~17 more
#              minutes of build). Without llvm-profdata for rustc's LLVM the plain build goes in,
#              with a warning
#   --only     build one image: locality-sidecar or echo-server
# Prints `image NAME REF` per image built. Installs buildah with apt when it is missing.
# Push with e.g. `buildah push localhost/locality-sidecar:0.1.0 docker://REGISTRY/locality-sidecar:0.1.0`
# (README, deployment).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

profile=release
build=yes
pgo=yes
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs release or debug}"; shift 2 ;;
        --no-build) build=no; shift ;;
        --no-pgo) pgo=no; shift ;;
        --only) only="${2:?--only needs locality-sidecar or echo-server}"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$profile" in
    release) cargo_flags=(--release) ;;
    debug) cargo_flags=() ;;
    *) echo "build-image.sh: --profile must be release or debug, not $profile" >&2; exit 2 ;;
esac
case "$only" in
    "") images=(locality-sidecar echo-server) ;;
    locality-sidecar|echo-server) images=("$only") ;;
    *) echo "build-image.sh: --only must be locality-sidecar or echo-server, not $only" >&2; exit 2 ;;
esac

if ! command -v buildah >/dev/null; then
    echo "== installing buildah (apt)" >&2
    if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends buildah >&2 \
        || { "${sudo[@]}" apt-get update >&2 \
             && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends buildah >&2; }
fi
command -v strip >/dev/null || { echo "build-image.sh: needs strip (binutils)" >&2; exit 1; }

if [ "$build" = yes ]; then
    # Both images' binaries (both packages, as in the test command's `--workspace --bins`, so
    # features resolve the same and the build cache is shared); not the other tools.
    bins=()
    for name in locality-sidecar echo-server; do bins+=(--bin "$name"); done
    echo "== cargo build ${cargo_flags[*]} ${bins[*]}" >&2
    cargo build "${cargo_flags[@]}" "${bins[@]}" >&2
fi
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin_dir="$target_dir/$profile"
declare -A binary
for name in locality-sidecar echo-server; do binary[$name]="$bin_dir/$name"; done
# What ships is the profile-guided sidecar: same code, laid out for the call path.
if [ "$profile" = release ] && [ "$pgo" = yes ] && [[ " ${images[*]} " == *" locality-sidecar "* ]]; then
    pgo_binary="$target_dir/pgo/locality-sidecar"
    if [ "$build" = yes ]; then
        pgo_status=0
        "$root/integration/pgo-build.sh" >&2 || pgo_status=$?
        if [ "$pgo_status" -eq 3 ]; then
            echo "build-image.sh: WARNING: no profile-guided build (see above); the image gets the plain release sidecar" >&2
            pgo_binary=""
        elif [ "$pgo_status" -ne 0 ]; then
            echo "build-image.sh: integration/pgo-build.sh failed (exit $pgo_status); --no-pgo builds without it" >&2
            exit 1
        fi
    elif [ ! -x "$pgo_binary" ]; then
        echo "build-image.sh: no profile-guided sidecar at $pgo_binary; the image gets the plain release one" >&2
        pgo_binary=""
    elif [ "$pgo_binary" -ot "${binary[locality-sidecar]}" ]; then
        # Built before the current release binary: from older code.
        echo "build-image.sh: $pgo_binary is older than ${binary[locality-sidecar]}; the image gets the plain release one (run integration/pgo-build.sh)" >&2
        pgo_binary=""
    fi
    [ -n "$pgo_binary" ] && binary[locality-sidecar]="$pgo_binary"
fi
for name in "${images[@]}" locality-sidecar; do
    [ -x "${binary[$name]}" ] || { echo "build-image.sh: ${binary[$name]} is missing: build it or drop --no-build" >&2; exit 1; }
done
version=$("${binary[locality-sidecar]}" --version | awk '{print $2}')
[ -n "$version" ] || { echo "build-image.sh: cannot read the version from ${binary[locality-sidecar]} --version" >&2; exit 1; }

# The build context: only what the images contain.
context="$root/target/image/context"
rm -rf "$context"
mkdir -p "$context/bin" "$context/rootfs/etc"
for name in "${images[@]}"; do
    strip --strip-all -o "$context/bin/$name" "${binary[$name]}"
done
# Shared libraries and the loader, at the paths the binaries ask for (`ldd` prints
# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)").
# A static binary prints "not a dynamic executable" and needs none.
for name in "${images[@]}"; do
    { ldd "$context/bin/$name" 2>/dev/null || true; } | awk '
        $2 == "=>" && $3 ~ /^\// { print $3 }
        $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
    mkdir -p "$context/rootfs$(dirname "$lib")"
    cp -L "$lib" "$context/rootfs$lib"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' \
    >"$context/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$context/rootfs/etc/group"

for name in "${images[@]}"; do
    # A debug build is tagged apart, so a test run never replaces the release image.
    if [ "$profile" = debug ]; then ref="localhost/$name:$version-debug"; else ref="localhost/$name:$version"; fi
    echo "== buildah build $ref ($profile)" >&2
    previous=$(buildah images --quiet --no-trunc "$ref" 2>/dev/null || true)
    # --pull=never: FROM scratch needs nothing, and this must never reach for a registry.
    buildah build --quiet --pull=never --layers=false --target "$name" \
        --file "$root/Containerfile" --tag "$ref" "$context" >&2
    # The tag moved: drop the image it named, or every rebuild (each test run) leaves ~30 MB.
    current=$(buildah images --quiet --no-trunc "$ref")
    if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
        buildah rmi "$previous" >/dev/null 2>&1 || true
    fi
    echo "image $name $ref"
done
