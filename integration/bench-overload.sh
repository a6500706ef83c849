#!/usr/bin/env bash
# Overload figures for BENCHMARKS.md ("Overload: memory per call and a burst"), by hand-free
# repetition of what issue 17's acceptance describes: client sidecar -> server sidecar -> echo
# app on loopback, h2load (Debian `nghttp2-client`) sending gRPC unary calls with a 256 B
# payload straight into the client sidecar's outbound listener.
#
#   integration/bench-overload.sh BIN_DIR burst            # 16,000 at once, default caps
#   integration/bench-overload.sh BIN_DIR per-call         # bytes per unary call in flight
#   integration/bench-overload.sh BIN_DIR per-stream       # bytes per server stream in flight
#
# BIN_DIR holds `locality-sidecar` and `echo-server` (target/release or target/debug).
# Extra h2load arguments and client `limits:` (as JSON) come from the environment:
# H2LOAD_ARGS (default per mode), LIMITS (default per mode), DELAY_MS (service time).
# Peak RSS is the client sidecar's VmHWM after the burst; "ordinary calls after" are 100
# sequential calls whose OK count is read from the client sidecar's own calls_total metric
# (h2load only sees HTTP 200; gRPC statuses travel in trailers).
set -euo pipefail

BIN=${1:?BIN_DIR (target/release or target/debug)}
MODE=${2:-burst}
BIN=$(cd "$BIN" && pwd)
WORK=$(mktemp -d /tmp/bench-overload.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
free_udp() { python3 -c 'import socket; s=socket.socket(type=socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A gRPC frame (uncompressed flag, 4-byte length, message) of echo.EchoRequest with a 256 B
# payload (field 1), delay_ms (field 3) and reply_count (field 7) when non-zero.
grpc_frame() {
    python3 - "$1" "$2" "$3" <<'EOF'
import struct, sys
out, delay, replies = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def varint(n):
    b = bytearray()
    while True:
        x = n & 0x7F; n >>= 7
        b.append(x | (0x80 if n else 0))
        if not n: return bytes(b)
msg = b"\x0a" + varint(256) + b"x" * 256
if delay: msg += b"\x18" + varint(delay)
if replies: msg += b"\x38" + varint(replies)
open(out, "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)
EOF
}
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
metric() { # sum of a metric's samples whose line contains $2 (or all)
    curl -s "http://127.0.0.1:$CLIENT_ADMIN/metrics" |
        awk -v m="$1" -v f="${2:-}" '(index($1, m "{") == 1 || $1 == m) && (f == "" || index($0, f)) { s += $NF } END { print s + 0 }'
}
wait_ready() {
    for _ in $(seq 1 200); do
        curl -sf "http://127.0.0.1:$1/ready" >/dev/null && return 0
        sleep 0.1
    done
    echo "sidecar on admin port $1 never became ready" >&2
    exit 1
}

# The server sidecar's caps toward its app (inbound.limits) stay at their defaults for the burst;
# the per-call modes raise them too, so every held call really is in flight end to end.
RAISED='{"maxCallsToApp":10000,"maxCallsPerPeer":10000}'
case $MODE in
burst) H2LOAD_ARGS=${H2LOAD_ARGS:--n 16000 -c 8 -m 2000}; LIMITS=${LIMITS:-{\}}; DELAY_MS=${DELAY_MS:-0}; REPLIES=0; PATH_=/echo.Echo/Unary; SERVER_LIMITS=${SERVER_LIMITS:-{\}} ;;
per-call) H2LOAD_ARGS=${H2LOAD_ARGS:--n 2000 -c 2 -m 1000}; LIMITS=${LIMITS:-{\"maxCallsInFlight\":10000,\"maxStreamsPerConnection\":2000\}}; DELAY_MS=${DELAY_MS:-5000}; REPLIES=0; PATH_=/echo.Echo/Unary; SERVER_LIMITS=${SERVER_LIMITS:-$RAISED} ;;
per-stream) H2LOAD_ARGS=${H2LOAD_ARGS:--n 1000 -c 1 -m 1000}; LIMITS=${LIMITS:-{\"maxCallsInFlight\":10000,\"maxStreamsPerConnection\":2000\}}; DELAY_MS=${DELAY_MS:-2500}; REPLIES=2; PATH_=/echo.Echo/ServerStream; SERVER_LIMITS=${SERVER_LIMITS:-$RAISED} ;;
*) echo "mode: burst | per-call | per-stream" >&2; exit 2 ;;
esac

"$BIN/locality-sidecar" certs --out "$WORK/certs" >/dev/null 2>&1
TLS="tls: {ca: $WORK/certs/ca.crt, cert: $WORK/certs/tls.crt, key: $WORK/certs/tls.key}"

ECHO_PORT=$(free_port)
"$BIN/echo-server" --listen "127.0.0.1:$ECHO_PORT" --name echo-1 >"$WORK/echo.log" 2>&1 &
PIDS+=($!)

QUIC_PORT=$(free_udp)
SERVER_ADMIN=$(free_port)
cat >"$WORK/server.yaml" <<EOF
inbound: {listen: "127.0.0.1:$QUIC_PORT", forward: "127.0.0.1:$ECHO_PORT", limits: $SERVER_LIMITS}
$TLS
admin: {listen: "127.0.0.1:$SERVER_ADMIN"}
EOF
"$BIN/locality-sidecar" run --config "$WORK/server.yaml" >"$WORK/server.log" 2>&1 &
PIDS+=($!)

APP_PORT=$(free_port)
CLIENT_ADMIN=$(free_port)
cat >"$WORK/client.yaml" <<EOF
outbound:
- listen: "127.0.0.1:$APP_PORT"
  name: echo
  endpoints: [{address: "127.0.0.1:$QUIC_PORT", node: node-a, zone: z1, pod: echo-1}]
$TLS
admin: {listen: "127.0.0.1:$CLIENT_ADMIN"}
limits: $LIMITS
EOF
"$BIN/locality-sidecar" run --config "$WORK/client.yaml" >"$WORK/client.log" 2>&1 &
CLIENT=$!
PIDS+=($CLIENT)
wait_ready "$SERVER_ADMIN"
wait_ready "$CLIENT_ADMIN"

grpc_frame "$WORK/req.bin" "$DELAY_MS" "$REPLIES"
grpc_frame "$WORK/plain.bin" 0 0
H2=(-H 'content-type: application/grpc' -H 'te: trailers')
URL="http://127.0.0.1:$APP_PORT"
# Warm the path (QUIC connection to the server sidecar, pools) the way a running pod is warm.
h2load -n 20 -c 1 -m 1 -d "$WORK/plain.bin" "${H2[@]}" "$URL/echo.Echo/Unary" >/dev/null
sleep 1
echo "binary: $BIN/locality-sidecar ($(stat -c %y "$BIN/locality-sidecar"))"
echo "server inbound.limits: $SERVER_LIMITS"
echo "client caps: process $(metric locality_sidecar_calls_in_flight_limit 'upstream="all"') calls in flight; limits: $LIMITS"
RSS0=$(status_kib $CLIENT VmRSS)
HWM0=$(status_kib $CLIENT VmHWM)
OK0=$(metric locality_sidecar_calls_total 'status="OK"')
ALL0=$(metric locality_sidecar_calls_total)
echo "before: VmRSS $RSS0 KiB, VmHWM $HWM0 KiB"

if [ "$MODE" = burst ]; then
    # shellcheck disable=SC2086
    h2load $H2LOAD_ARGS -d "$WORK/req.bin" "${H2[@]}" "$URL$PATH_" >"$WORK/h2load.txt" 2>&1 || true
    grep -E "^(finished in|requests:|status codes:)" "$WORK/h2load.txt"
else
    # Hold the calls in flight, sample RSS while they are (peak of the samples).
    # shellcheck disable=SC2086
    h2load $H2LOAD_ARGS -d "$WORK/req.bin" "${H2[@]}" "$URL$PATH_" >"$WORK/h2load.txt" 2>&1 &
    LOAD=$!
    PEAK_INFLIGHT=0
    PEAK_RSS=$RSS0
    while kill -0 $LOAD 2>/dev/null; do
        n=$(metric locality_sidecar_calls_in_flight 'upstream="all"')
        r=$(status_kib $CLIENT VmRSS)
        [ "${n%.*}" -gt "$PEAK_INFLIGHT" ] && PEAK_INFLIGHT=${n%.*}
        [ "$r" -gt "$PEAK_RSS" ] && PEAK_RSS=$r
        sleep 0.2
    done
    wait $LOAD || true
    grep -E "^(requests:|status codes:)" "$WORK/h2load.txt"
    echo "in flight at most: $PEAK_INFLIGHT calls; VmRSS $RSS0 -> $PEAK_RSS KiB"
    awk -v a="$RSS0" -v b="$PEAK_RSS" -v n="$PEAK_INFLIGHT" 'BEGIN { if (n > 0) printf "per call in flight: %.1f KiB\n", (b - a) / n }'
fi

kill -0 $CLIENT 2>/dev/null && echo "client sidecar: alive" || { echo "client sidecar: DEAD"; tail -20 "$WORK/client.log"; exit 1; }
HWM=$(status_kib $CLIENT VmHWM)
echo "after: VmRSS $(status_kib $CLIENT VmRSS) KiB, peak VmHWM $HWM KiB ($(awk -v k="$HWM" 'BEGIN { printf "%.1f", k / 1024 }') MiB)"
OK1=$(metric locality_sidecar_calls_total 'status="OK"')
ALL1=$(metric locality_sidecar_calls_total)
echo "calls during the load: $((${ALL1%.*} - ${ALL0%.*})) counted, $((${OK1%.*} - ${OK0%.*})) OK, shed $(metric locality_sidecar_calls_shed_total) (by limit: $(curl -s "http://127.0.0.1:$CLIENT_ADMIN/metrics" | grep '^locality_sidecar_calls_shed_total' | tr '\n' ' '))"

echo "server sidecar refusals toward its app: $(curl -s "http://127.0.0.1:$SERVER_ADMIN/metrics" | grep '^locality_sidecar_inbound_limited_total' | tr '\n' ' ')"
echo "final statuses since start: $(curl -s "http://127.0.0.1:$CLIENT_ADMIN/metrics" | awk '/^locality_sidecar_calls_total/ { match($0, /status="[A-Z_]+"/); st[substr($0, RSTART + 8, RLENGTH - 9)] += $NF } END { for (k in st) printf "%s=%d ", k, st[k] }')"
echo "attempts by status: $(curl -s "http://127.0.0.1:$CLIENT_ADMIN/metrics" | awk '/^locality_sidecar_attempts_total/ { match($0, /status="[A-Z_]+"/); st[substr($0, RSTART + 8, RLENGTH - 9)] += $NF } END { for (k in st) printf "%s=%d ", k, st[k] }')"
echo "connections declared dead (peer silent while calls waited): $(metric locality_sidecar_quic_dead_connections_total)"
h2load -n 100 -c 1 -m 1 -d "$WORK/plain.bin" "${H2[@]}" "$URL/echo.Echo/Unary" >"$WORK/after.txt" 2>&1 || true
OK2=$(metric locality_sidecar_calls_total 'status="OK"')
echo "100 ordinary calls right after: $((${OK2%.*} - ${OK1%.*})) OK ($(grep -E '^requests:' "$WORK/after.txt"))"
grep -iE "panic|oom" "$WORK/client.log" | head -3 || true
