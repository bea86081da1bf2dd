#!/usr/bin/env bash
# One-command benchmark of redis-entra-proxy (1:1, and multiplexed with --multiplex N) against
# direct Redis (plaintext and TLS) and two byte-forwarding TLS proxies (stunnel, haproxy):
# throughput / CPU / memory, connection setup, memory per idle connection and per connection in
# its costliest state, and re-authentication of thousands of live connections. See
# bench/README.md.
#
# Usage: bench/run.sh [--rounds N] [--quick] [--only PARTS]
#   --rounds N     interleaved rounds; medians are reported (default 3)
#   --quick        fewer requests / connections / rotations (smoke test, numbers are noisy)
#   --only PARTS   comma-separated subset of: throughput,setup,idle,worst,reauth (default: all)
# Environment:
#   PROXY_BIN=/path   use this redis-entra-proxy binary (no cargo build); it is copied once at
#                     the start, so a rebuild under the run doesn't mix two builds
#   BENCH_RAW_OUT=f   also keep every single throughput measurement in f (and the
#                     multiplexed proxy's counts after each of its runs in f.mux)
#   IDLE_CONNS=N      idle connections for the idle and reauth parts (default 5000)
#   WORST_CONNS=N     connections held in their costliest state in the worst part (default 50)
#   REAUTH_ROTATIONS=N  token rotations to observe in the reauth part (default 2, quick 1)
#   MULTIPLEX=N       shared upstream connections of the multiplexed proxy (entra-proxy-mux,
#                     --multiplex N --cluster off) in the throughput part (default 4, 1..64)
#   PLACEMENT=P       which CPU each process runs on (taskset), for figures that don't depend
#                     on where the scheduler puts three busy processes on two cores: free (the
#                     scheduler's choice, default), beside-redis (redis-benchmark on CPU 0,
#                     redis-server and every proxy on CPU 1), beside-client (redis-benchmark and
#                     every proxy on CPU 0, redis-server on CPU 1); see bench/README.md
set -euo pipefail

ROUNDS=3
SCALE=1
QUICK=0
ONLY="throughput,setup,idle,worst,reauth"
COMMAND_LINE="bench/run.sh${*:+ $*}"
[ -z "${PROXY_BIN:-}" ] || COMMAND_LINE="PROXY_BIN=$PROXY_BIN $COMMAND_LINE"
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --quick) SCALE=10; QUICK=1; shift ;;
        --only) ONLY="$2"; shift 2 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (try --help)" >&2; exit 2 ;;
    esac
done
for part in ${ONLY//,/ }; do
    case "$part" in
        throughput|setup|idle|worst|reauth) ;;
        *) echo "unknown part in --only: $part (throughput,setup,idle,worst,reauth)" >&2; exit 2 ;;
    esac
done
want() { case ",$ONLY," in *",$1,"*) return 0 ;; esac; return 1; }

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
PASS=benchpass
USER_NAME=bench
CLK_TCK="$(getconf CLK_TCK)"
IDLE_CONNS="${IDLE_CONNS:-5000}"
MULTIPLEX="${MULTIPLEX:-4}"
case "$MULTIPLEX" in
    '' | *[!0-9]*) echo "MULTIPLEX must be a number from 1 to 64, not '$MULTIPLEX'" >&2; exit 2 ;;
esac
MULTIPLEX=$(( 10#$MULTIPLEX )) # "08" is 8, as the proxy reads it
PLACEMENT="${PLACEMENT:-free}"
# The CPUs of redis-benchmark, redis-server and the proxies (and the token issuers); empty: any.
case "$PLACEMENT" in
    free) CLIENT_CPU="" SERVER_CPU="" PROXY_CPU="" ;;
    beside-redis) CLIENT_CPU=0 SERVER_CPU=1 PROXY_CPU=1 ;;
    beside-client) CLIENT_CPU=0 SERVER_CPU=1 PROXY_CPU=0 ;;
    *) echo "PLACEMENT must be free, beside-redis or beside-client, not '$PLACEMENT'" >&2; exit 2 ;;
esac
[ "$PLACEMENT" = free ] || [ "$(nproc)" -ge 2 ] ||
    { echo "PLACEMENT=$PLACEMENT needs 2 CPUs, this machine has $(nproc)" >&2; exit 2; }
[ "$PLACEMENT" = free ] || COMMAND_LINE="PLACEMENT=$PLACEMENT $COMMAND_LINE"
# on_cpu CPU CMD...: CMD in the foreground on that CPU (any when CPU is empty)
on_cpu() {
    local cpu="$1"
    shift
    if [ -n "$cpu" ]; then taskset -c "$cpu" "$@"; else "$@"; fi
}
[ "$MULTIPLEX" -ge 1 ] && [ "$MULTIPLEX" -le 64 ] ||
    { echo "MULTIPLEX must be a number from 1 to 64, not '$MULTIPLEX'" >&2; exit 2; }
T_START="$(date +%s)"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# 5,000 client sockets + 5,000 upstream sockets in one process, and redis maxclients 20000
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $(( 2 * IDLE_CONNS + 200 )) ] ||
    die "ulimit -n is $(ulimit -n), need $(( 2 * IDLE_CONNS + 200 )) for IDLE_CONNS=$IDLE_CONNS"

# ---------------------------------------------------------------- dependencies
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || need+=(stunnel4)
command -v haproxy >/dev/null || need+=(haproxy)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=()
    [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
    log "installing: ${need[*]}"
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's stunnel4 package's binary is /usr/bin/stunnel4 (and /usr/bin/stunnel on newer ones).
STUNNEL="$(command -v stunnel4 || command -v stunnel)"

# ---------------------------------------------------------------- cleanup
WORK="$(mktemp -d -t redis-entra-bench.XXXXXX)"
PIDS=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local pid
    exec 7>&- 2>/dev/null || true
    touch "$WORK/stop" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the proxy binary
if [ -n "${PROXY_BIN:-}" ]; then
    # Someone else builds it (and may be rebuilding it right now): wait for it to exist.
    for _ in $(seq 1 120); do
        [ -x "$PROXY_BIN" ] && break
        log "waiting for $PROXY_BIN to exist (being rebuilt?)"
        sleep 5
    done
    [ -x "$PROXY_BIN" ] || die "no executable $PROXY_BIN after 10 minutes"
    SRC_BIN="$PROXY_BIN"
else
    command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs, or set PROXY_BIN)"
    log "building the proxy (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet)
    SRC_BIN="$REPO/target/release/redis-entra-proxy"
    [ -x "$SRC_BIN" ] || die "no $SRC_BIN after the build"
fi
# One snapshot for the whole run: every proxy process below runs the same build.
PROXY="$WORK/redis-entra-proxy"
for _ in 1 2 3 4 5; do
    cp "$SRC_BIN" "$PROXY" 2>/dev/null && "$PROXY" --version >/dev/null 2>&1 && break
    sleep 3
done
"$PROXY" --version >/dev/null 2>&1 || die "could not copy a working binary from $SRC_BIN"
PROXY_VERSION="$("$PROXY" --version 2>&1 | head -1)"
PROXY_SHA="$(sha256sum "$PROXY" | cut -c1-12)"
PROXY_MTIME="$(date -u -r "$SRC_BIN" '+%Y-%m-%d %H:%M:%S UTC')"
HAS_WARM=0
"$PROXY" --help 2>&1 | grep -q -- '--warm-connections' && HAS_WARM=1
log "proxy: $PROXY_VERSION, sha256 $PROXY_SHA, built $PROXY_MTIME, --warm-connections in --help: $HAS_WARM"

# A free TCP port on 127.0.0.1 (nothing answers a connect to it).
USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$(( 20000 + RANDOM % 12000 )) # below the ephemeral range (32768+)
        case "$USED_PORTS" in *" $p "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS="$USED_PORTS$p "
            echo "$p"
            return
        fi
    done
}

# start_bg NAME CMD...: start CMD in the background, output in $WORK/NAME.log; sets BG_PID
start_bg() {
    local name="$1" cpu="$PROXY_CPU"
    shift
    [ "$name" != redis ] || cpu="$SERVER_CPU"
    # taskset execs the command: $! stays the pid whose CPU time the bench reads
    [ -z "$cpu" ] || set -- taskset -c "$cpu" "$@"
    "$@" >"$WORK/$name.log" 2>&1 &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

# stop_bg PID: stop one process this script started, wait for it, and forget it (so that the
# cleanup never signals a recycled pid)
stop_bg() {
    local pid keep=()
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    for pid in "${PIDS[@]}"; do
        [ "$pid" = "$1" ] || keep+=("$pid")
    done
    PIDS=("${keep[@]}")
}

# wait_ping NAME PID redis-cli-args...: until PING answers PONG (or the process died)
wait_ping() {
    local name="$1" pid="$2" _
    shift 2
    for _ in $(seq 1 100); do
        if [ "$(timeout 5 redis-cli "$@" PING 2>/dev/null)" = "PONG" ]; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2 || true; die "$name exited"; }
        sleep 0.1
    done
    cat "$WORK/$name.log" >&2 || true
    die "$name did not answer PING within 10s"
}

# wait_file FILE SECONDS: until FILE exists and is not empty
wait_file() {
    local _
    for _ in $(seq 1 $(( $2 * 10 ))); do
        [ -s "$1" ] && return 0
        sleep 0.1
    done
    return 1
}

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }

# rcli ARGS...: redis-cli on the plaintext port as the admin user
rcli() { timeout 10 redis-cli -h 127.0.0.1 -p "$PLAIN_PORT" --user "$USER_NAME" --pass "$PASS" --no-auth-warning "$@"; }
redis_stat() { rcli INFO "$1" | tr -d '\r' | awk -F: -v k="$2" '$1==k{print $2}'; }

# metric ADMIN_ADDR NAME: one value from a proxy's /metrics (empty when absent)
metric() {
    python3 - "$1" "$2" <<'EOF'
import sys, urllib.request
try:
    body = urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode()
except OSError:
    sys.exit(0)
for line in body.splitlines():
    name, _, value = line.rpartition(" ")
    if name == sys.argv[2]:
        print(value)
        break
EOF
}

# mux_metrics ADMIN_ADDR: the multiplexing figures of a proxy's /metrics, one line:
# "upstream_connections shared_connections pinned_clients pins_total" (pins_total summed over
# its reasons; "? ? ? ?" when the endpoint does not answer)
mux_metrics() {
    python3 - "$1" <<'EOF'
import sys, urllib.request
try:
    body = urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode()
except OSError:
    print("? ? ? ?")
    sys.exit(0)
found = {}
pins = None
for line in body.splitlines():
    if line.startswith("#"):
        continue
    name, _, value = line.rpartition(" ")
    if name.startswith("redis_proxy_multiplex_pins_total{"):
        pins = (pins or 0) + float(value)
    else:
        found[name] = value
def get(name):
    v = found.get(name)
    return "?" if v is None else "%g" % float(v)
print(get("redis_proxy_upstream_connections"), get("redis_proxy_multiplex_shared_connections"),
      get('redis_proxy_multiplex_clients{state="pinned"}'), "?" if pins is None else "%g" % pins)
EOF
}

# ---------------------------------------------------------------- certificates
log "generating a CA and a server certificate in $WORK"
CA="$WORK/ca.pem"
(
    cd "$WORK"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench-ca" \
        -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -days 2 -extfile server.ext -out server.pem 2>/dev/null
)

# ---------------------------------------------------------------- redis-server
PLAIN_PORT="$(free_port)"
TLS_PORT="$(free_port)"
cat >"$WORK/redis.conf" <<EOF
bind 127.0.0.1
port $PLAIN_PORT
tls-port $TLS_PORT
tls-cert-file $WORK/server.pem
tls-key-file $WORK/server.key
tls-ca-cert-file $CA
tls-auth-clients no
user $USER_NAME on >$PASS ~* &* +@all
user default off
save ""
appendonly no
daemonize no
dir $WORK
maxclients 20000
EOF
log "starting redis-server (plain :$PLAIN_PORT for the baseline and the token issuer, TLS :$TLS_PORT)"
start_bg redis redis-server "$WORK/redis.conf"
REDIS_PID=$BG_PID
wait_ping redis "$REDIS_PID" -h 127.0.0.1 -p "$PLAIN_PORT" --user "$USER_NAME" --pass "$PASS" --no-auth-warning
wait_ping redis "$REDIS_PID" -h 127.0.0.1 -p "$TLS_PORT" --tls --cacert "$CA" --sni localhost \
    --user "$USER_NAME" --pass "$PASS" --no-auth-warning
REDIS_MAXCLIENTS="$(rcli CONFIG GET maxclients | tail -1)"
[ "$REDIS_MAXCLIENTS" -ge $(( 2 * IDLE_CONNS + 100 )) ] ||
    die "redis-server maxclients is $REDIS_MAXCLIENTS (ulimit -n too low?)"

# ---------------------------------------------------------------- token issuers
# start_issuer NAME LIFETIME_S OID: a managed identity endpoint minting tokens for OID; sets
# ISSUER_URL and BG_PID; $WORK/NAME.tokens gets one line per token served.
start_issuer() {
    local name="$1" lifetime="$2" oid="$3"
    start_bg "$name" python3 "$BENCH_DIR/token_issuer.py" --redis-port "$PLAIN_PORT" \
        --redis-user "$USER_NAME" --redis-password "$PASS" --oid "$oid" --lifetime "$lifetime" \
        --identity-header secret --port-file "$WORK/$name.port" --log-file "$WORK/$name.tokens"
    wait_file "$WORK/$name.port" 10 || { cat "$WORK/$name.log" >&2; die "$name did not start"; }
    ISSUER_URL="http://127.0.0.1:$(cat "$WORK/$name.port")/msi/token"
}

# ---------------------------------------------------------------- proxies
# start_key_proxy NAME PORT EXTRA-ARGS...: redis-entra-proxy in access-key mode; sets BG_PID
start_key_proxy() {
    local name="$1" port="$2"
    shift 2
    start_bg "$name" env AZURE_REDIS_PASSWORD="$PASS" RUST_LOG=warn "$PROXY" \
        --upstream "127.0.0.1:$TLS_PORT" --tls-server-name localhost --ca-file "$CA" \
        --auth access-key --redis-username "$USER_NAME" \
        --listen "127.0.0.1:$port" "$@"
    wait_ping "$name" "$BG_PID" -h 127.0.0.1 -p "$port"
}
# start_entra_proxy NAME PORT ISSUER_URL EXTRA-ARGS...: Entra mode, managed identity; sets BG_PID
start_entra_proxy() {
    local name="$1" port="$2" url="$3"
    shift 3
    start_bg "$name" env IDENTITY_ENDPOINT="$url" IDENTITY_HEADER=secret RUST_LOG=warn "$PROXY" \
        --upstream "127.0.0.1:$TLS_PORT" --tls-server-name localhost --ca-file "$CA" \
        --auth entra --credential managed-identity \
        --listen "127.0.0.1:$port" "$@"
    wait_ping "$name" "$BG_PID" -h 127.0.0.1 -p "$port"
}
# start_haproxy NAME PORT: sets BG_PID
start_haproxy() {
    cat >"$WORK/$1.cfg" <<EOF
global
    maxconn 9000
defaults
    mode tcp
    maxconn 9000
    timeout connect 5s
    timeout client 5m
    timeout server 5m
listen redis
    bind 127.0.0.1:$2
    server s 127.0.0.1:$TLS_PORT ssl verify required ca-file $CA sni str(localhost) verifyhost localhost
EOF
    start_bg "$1" haproxy -db -f "$WORK/$1.cfg"
    wait_ping "$1" "$BG_PID" -h 127.0.0.1 -p "$2" --user "$USER_NAME" --pass "$PASS" --no-auth-warning
}

STUNNEL_PID="" HAPROXY_PID="" PROXY_PID="" ENTRA_PID="" WARM_PID="" MUX_PID=""
if want throughput || want setup; then
    STUNNEL_PORT="$(free_port)"
    cat >"$WORK/stunnel.conf" <<EOF
foreground = yes
pid =
debug = 3
[redis]
client = yes
accept = 127.0.0.1:$STUNNEL_PORT
connect = 127.0.0.1:$TLS_PORT
sni = localhost
CAfile = $CA
verifyChain = yes
checkHost = localhost
EOF
    log "starting stunnel ($STUNNEL) on :$STUNNEL_PORT"
    start_bg stunnel "$STUNNEL" "$WORK/stunnel.conf"
    STUNNEL_PID=$BG_PID
    wait_ping stunnel "$STUNNEL_PID" -h 127.0.0.1 -p "$STUNNEL_PORT" --user "$USER_NAME" --pass "$PASS" --no-auth-warning

    HAPROXY_PORT="$(free_port)"
    log "starting haproxy on :$HAPROXY_PORT"
    start_haproxy haproxy "$HAPROXY_PORT"
    HAPROXY_PID=$BG_PID

    PROXY_PORT="$(free_port)"
    log "starting redis-entra-proxy (access-key mode) on :$PROXY_PORT"
    start_key_proxy proxy "$PROXY_PORT" --admin-listen off
    PROXY_PID=$BG_PID
fi
if want throughput; then
    start_issuer issuer-long 3600 "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"
    ENTRA_PORT="$(free_port)"
    log "starting redis-entra-proxy (Entra mode, managed identity, 1 h tokens from $ISSUER_URL) on :$ENTRA_PORT"
    start_entra_proxy proxy-entra "$ENTRA_PORT" "$ISSUER_URL" --admin-listen off
    ENTRA_PID=$BG_PID
fi
WARM_ACTIVE="-"
if want setup; then
    WARM_PORT="$(free_port)"
    WARM_ADMIN="127.0.0.1:$(free_port)"
    log "starting redis-entra-proxy (access-key mode, --warm-connections 8) on :$WARM_PORT"
    clients0="$(redis_stat clients connected_clients)"
    start_key_proxy proxy-warm "$WARM_PORT" --warm-connections 8 --admin-listen "$WARM_ADMIN"
    WARM_PID=$BG_PID
    sleep 1
    # With no client connected, a working pool holds 8 authenticated upstream connections: seen
    # in the proxy's gauge (if it counts pooled connections) and in redis-server's client count
    # (nothing else holds a connection to it now).
    WARM_IDLE="$(metric "$WARM_ADMIN" redis_proxy_upstream_connections)"
    WARM_IDLE="${WARM_IDLE:-?}"
    WARM_SERVER=$(( $(redis_stat clients connected_clients) - clients0 ))
    if { [ "$WARM_IDLE" != "?" ] && [ "${WARM_IDLE%.*}" -ge 8 ]; } || [ "$WARM_SERVER" -ge 8 ]; then
        WARM_ACTIVE="yes"
    else
        WARM_ACTIVE="NO, the flag is ignored by this build"
    fi
    WARM_ACTIVE="$WARM_ACTIVE (with no client: redis_proxy_upstream_connections $WARM_IDLE, $WARM_SERVER more connections on redis-server)"
    log "warm pool active: $WARM_ACTIVE"
fi
# The multiplexed proxy starts last: redis-server's connected_clients just before it starts is
# the baseline (the token issuers' connections, an idle warm pool, this script's INFO call), so
# connected_clients - MUX_CLIENTS0 after a run is what the multiplexed proxy holds.
if want throughput; then
    MUX_PORT="$(free_port)"
    MUX_ADMIN="127.0.0.1:$(free_port)"
    MUX_CLIENTS0="$(redis_stat clients connected_clients)"
    log "starting redis-entra-proxy (access-key mode, --multiplex $MULTIPLEX --cluster off) on :$MUX_PORT, admin $MUX_ADMIN"
    start_key_proxy proxy-mux "$MUX_PORT" --multiplex "$MULTIPLEX" --cluster off --admin-listen "$MUX_ADMIN"
    MUX_PID=$BG_PID
    log "entra-proxy-mux at start: $(mux_metrics "$MUX_ADMIN") (upstream shared pinned pins), $(( $(redis_stat clients connected_clients) - MUX_CLIENTS0 )) more connections on redis-server"
fi

# ---------------------------------------------------------------- paths
# redis-benchmark arguments that reach Redis through each path
path_args() {
    local auth=(--user "$USER_NAME" -a "$PASS")
    case "$1" in
        direct-plain) echo -h 127.0.0.1 -p "$PLAIN_PORT" "${auth[@]}" ;;
        direct-tls) echo -h 127.0.0.1 -p "$TLS_PORT" --tls --cacert "$CA" --sni localhost "${auth[@]}" ;;
        stunnel) echo -h 127.0.0.1 -p "$STUNNEL_PORT" "${auth[@]}" ;;
        haproxy) echo -h 127.0.0.1 -p "$HAPROXY_PORT" "${auth[@]}" ;;
        # the proxy authenticates upstream
        entra-proxy) echo -h 127.0.0.1 -p "$PROXY_PORT" ;;
        entra-proxy-entra) echo -h 127.0.0.1 -p "$ENTRA_PORT" ;;
        entra-proxy-warm) echo -h 127.0.0.1 -p "$WARM_PORT" ;;
        entra-proxy-mux) echo -h 127.0.0.1 -p "$MUX_PORT" ;;
    esac
}
path_pid() {
    case "$1" in
        stunnel) echo "$STUNNEL_PID" ;;
        haproxy) echo "$HAPROXY_PID" ;;
        entra-proxy) echo "$PROXY_PID" ;;
        entra-proxy-entra) echo "$ENTRA_PID" ;;
        entra-proxy-warm) echo "$WARM_PID" ;;
        entra-proxy-mux) echo "$MUX_PID" ;;
        *) echo "" ;;
    esac
}

# utime+stime of a whole process (all its threads), in clock ticks
cpu_ticks() {
    local stat
    stat="$(cat "/proc/$1/stat")"
    stat="${stat##*) }" # drop "pid (comm) "; fields now start at field 3 (state)
    # shellcheck disable=SC2086
    set -- $stat
    echo $(( ${12} + ${13} )) # utime = field 14, stime = field 15
}

SUMMARY="$WORK/summary.md" # rows of the final summary table, appended by each part
: >"$SUMMARY"
REPORT="$WORK/report.md" # the detailed tables, printed before the summary
: >"$REPORT"
BENCH_TIMEOUT=300 # no single redis-benchmark run may take longer

# ================================================================ 1. throughput
if want throughput; then
PATHS=(direct-plain direct-tls stunnel haproxy entra-proxy entra-proxy-entra entra-proxy-mux)
N_MAIN=$(( 100000 / SCALE ))
N_RT=$(( 20000 / SCALE ))
# Pipelined runs get 10x the requests: 100,000 at ~1M req/s is a 0.1-s run, where start-up and
# the 10-ms CPU tick decide the figure.
N_P16=$(( 1000000 / SCALE ))
WORKLOADS=(c50 c50-P16 c1-rtt)
workload_args() {
    case "$1" in
        c50) echo -c 50 -n "$N_MAIN" -t set,get -d 64 ;;
        c50-P16) echo -c 50 -n "$N_P16" -t set,get -d 64 -P 16 ;;
        c1-rtt) echo -c 1 -n "$N_RT" -t get -d 64 ;;
    esac
}

RESULTS="$WORK/results.txt" # round workload path test rps avg_ms cpu_ticks requests
: >"$RESULTS"
MUX_RESULTS="$WORK/mux.txt" # round workload upstream shared pinned pins_in_run server_conns server_calls requests
: >"$WORK/vs.md" # rows of the proxies-against-haproxy table, written by the report below
: >"$MUX_RESULTS"
run_one() {
    local round="$1" wl="$2" path="$3" pid before after out ntests requests args m0="" calls0=0
    pid="$(path_pid "$path")"
    [ "$path" != entra-proxy-mux ] || { m0="$(mux_metrics "$MUX_ADMIN")"; calls0="$(redis_calls)"; }
    before=0
    [ -z "$pid" ] || before="$(cpu_ticks "$pid")"
    read -r -a args <<<"$(path_args "$path") $(workload_args "$wl")"
    if ! out="$(on_cpu "$CLIENT_CPU" timeout "$BENCH_TIMEOUT" redis-benchmark "${args[@]}" --csv 2>"$WORK/bench.err")"; then
        cat "$WORK/bench.err" >&2
        die "redis-benchmark failed on $path / $wl"
    fi
    after=0
    [ -z "$pid" ] || after="$(cpu_ticks "$pid")"
    # The multiplexed proxy right after the run: its upstream connections (its gauge, and what
    # redis-server counts beyond the baseline), the clients it pinned during the run, and the
    # commands that reached redis-server. (m0 and mux_metrics are 4 words each, split on purpose.)
    # shellcheck disable=SC2086,SC2046
    [ "$path" != entra-proxy-mux ] || mux_record "$round" "$wl" "$calls0" $m0 $(mux_metrics "$MUX_ADMIN")
    # CSV: "test","rps","avg_latency_ms",...; one row per test
    out="$(printf '%s\n' "$out" | tr -d '"' | awk -F, '$1=="SET"||$1=="GET"{print $1, $2, $3}')"
    ntests="$(printf '%s\n' "$out" | grep -c . || true)"
    case "$wl" in c1-rtt) [ "$ntests" -eq 1 ] ;; *) [ "$ntests" -eq 2 ] ;; esac ||
        { cat "$WORK/bench.err" >&2; die "unexpected redis-benchmark output on $path / $wl: $out"; }
    case "$wl" in c1-rtt) requests="$N_RT" ;; c50-P16) requests=$(( 2 * N_P16 )) ;; *) requests=$(( 2 * N_MAIN )) ;; esac
    printf '%s\n' "$out" | while read -r test rps avg; do
        echo "$round $wl $path $test $rps $avg $(( after - before )) $requests"
    done >>"$RESULTS"
}

# redis_calls: SET + GET calls redis-server has processed (INFO commandstats)
redis_calls() {
    rcli INFO commandstats | tr -d '\r' |
        awk -F'[:=,]' '$1 == "cmdstat_set" || $1 == "cmdstat_get" { n += $3 } END { print n + 0 }'
}
# mux_record ROUND WORKLOAD CALLS-BEFORE METRICS-BEFORE(4) METRICS-AFTER(4): one line of
# $MUX_RESULTS, with the SET/GET calls redis-server processed during the run (it must have
# processed them all: the multiplexed path relays every command) and the requests sent
mux_record() {
    local pins="?" requests conns calls
    case "$2" in c1-rtt) requests="$N_RT" ;; c50-P16) requests=$(( 2 * N_P16 )) ;; *) requests=$(( 2 * N_MAIN )) ;; esac
    [ "$7" = "?" ] || [ "${11}" = "?" ] || pins=$(( ${11%.*} - ${7%.*} ))
    conns=$(( $(redis_stat clients connected_clients) - MUX_CLIENTS0 ))
    calls=$(( $(redis_calls) - $3 ))
    echo "$1 $2 $8 $9 ${10} $pins $conns $calls $requests" >>"$MUX_RESULTS"
}

log "smoke run of every path"
for path in "${PATHS[@]}"; do
    read -r -a args <<<"$(path_args "$path")"
    timeout 60 redis-benchmark "${args[@]}" -c 4 -n 2000 -t set,get -d 64 --csv >"$WORK/smoke.out" 2>&1 ||
        { cat "$WORK/smoke.out" >&2; die "smoke run failed on $path"; }
    grep -q '^"GET"' "$WORK/smoke.out" || { cat "$WORK/smoke.out" >&2; die "smoke run failed on $path"; }
done

log "throughput: $ROUNDS interleaved rounds x ${#WORKLOADS[@]} workloads x ${#PATHS[@]} paths"
for round in $(seq 1 "$ROUNDS"); do
    for wl in "${WORKLOADS[@]}"; do
        # rotate the order of the paths every round, so none always runs first
        for k in $(seq 0 $(( ${#PATHS[@]} - 1 ))); do
            path="${PATHS[$(( (k + round - 1) % ${#PATHS[@]} ))]}"
            run_one "$round" "$wl" "$path"
        done
    done
    log "throughput round $round done"
done

# peak RSS of each proxy process, after the throughput runs
RSS_STUNNEL="$(hwm "$STUNNEL_PID")"
RSS_HAPROXY="$(hwm "$HAPROXY_PID")"
RSS_PROXY="$(hwm "$PROXY_PID")"
RSS_ENTRA="$(hwm "$ENTRA_PID")"
RSS_MUX="$(hwm "$MUX_PID")"
ENTRA_TOKENS="$(wc -l <"$WORK/issuer-long.tokens")"

{
echo "### Throughput (redis-benchmark, $ROUNDS interleaved rounds, medians, -d 64)"
echo
awk -v clk="$CLK_TCK" -v summary="$SUMMARY" -v vs="$WORK/vs.md" -v mux_n="$MULTIPLEX" \
    -v rss_stunnel="$RSS_STUNNEL" -v rss_haproxy="$RSS_HAPROXY" -v rss_proxy="$RSS_PROXY" -v rss_entra="$RSS_ENTRA" -v rss_mux="$RSS_MUX" '
function median(key,   n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    wl = $2; path = $3; test = $4
    k = wl SUBSEP path SUBSEP test
    vals[k] = vals[k] " " $5
    lat[k] = lat[k] " " $6
    # CPU per run (both tests of one run share it): count once per run
    if ($4 == "GET") { cpu[wl SUBSEP path] = cpu[wl SUBSEP path] " " ($7 / clk) / $8 * 100000 }
    wlseen[wl] = 1
}
END {
    np = split("direct-plain direct-tls stunnel haproxy entra-proxy entra-proxy-entra entra-proxy-mux", paths, " ")
    nt["c50"] = 2; tn["c50", 1] = "SET"; tn["c50", 2] = "GET"
    nt["c50-P16"] = 2; tn["c50-P16", 1] = "SET"; tn["c50-P16", 2] = "GET"
    nt["c1-rtt"] = 1; tn["c1-rtt", 1] = "GET"
    rss["stunnel"] = rss_stunnel; rss["haproxy"] = rss_haproxy; rss["entra-proxy"] = rss_proxy; rss["entra-proxy-entra"] = rss_entra; rss["entra-proxy-mux"] = rss_mux
    print "| workload | path | requests/s | spread | x TLS | avg ms | CPU s/100k | CPU us/req |"
    print "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    split("c50 c50-P16 c1-rtt", order, " ")
    for (w = 1; w <= 3; w++) {
        wl = order[w]
        if (!(wl in wlseen)) continue
        for (t = 1; t <= nt[wl]; t++) {
            test = tn[wl, t]
            label = (wl == "c50" ? "-c 50" : wl == "c50-P16" ? "-c 50 -P 16" : "-c 1 (round trip)") " " test
            tls = median(wl SUBSEP "direct-tls" SUBSEP test)
            for (p = 1; p <= np; p++) {
                path = paths[p]
                k = wl SUBSEP path SUBSEP test
                if (!(k in vals)) continue
                rps = median(k)
                avg = median_lat(k)
                cpus = "-"; cpuus = "-"
                if (path in rss) {
                    c = median_cpu(wl SUBSEP path)
                    cpus = sprintf("%.3f", c); cpuus = sprintf("%.1f", c * 10)
                    if (t > 1) { cpus = "\""; cpuus = "\"" }
                    else if (wl == "c50" && path ~ /^entra-proxy/) printf "| CPU per request, -c 50 | %s | %.1f us | <= 10 us |\n", path, c * 10 >> summary
                }
                printf "| %s | %s | %.0f | %.0f%% | %.2f | %.3f | %s | %s |\n", label, path, rps, spread(k), rps / tls, avg, cpus, cpuus
                # every proxy against haproxy: requests/s, and CPU per request (one per run)
                hk = wl SUBSEP "haproxy" SUBSEP test
                if ((path in rss) && (hk in vals)) {
                    hrps = median(hk); hc = median_cpu(wl SUBSEP "haproxy")
                    cx = "-"; cu = "-"
                    if (t == 1) { cu = sprintf("%.1f", c * 10); cx = (hc > 0 ? sprintf("%.2f", c / hc) : "-") }
                    else { cu = "\""; cx = "\"" }
                    printf "| %s | %s | %.0f | %.2f | %.2f | %s | %s |\n", label, path, rps, rps / tls, rps / hrps, cu, cx >> vs
                    if (path == "entra-proxy-mux" && wl != "c1-rtt") {
                        wll = (wl == "c50" ? "-c 50" : "-c 50 -P 16")
                        printf "| throughput %s %s, x haproxy | %s (--multiplex %s) | %.2f (x TLS %.2f) | - |\n", wll, test, path, mux_n, rps / hrps, rps / tls >> summary
                        if (t == 1 && hc > 0)
                            printf "| CPU per request %s, x haproxy | %s (--multiplex %s) | %.1f us vs %.1f us: %.2f | - |\n", wll, path, mux_n, c * 10, hc * 10, c / hc >> summary
                    }
                }
                if (path ~ /^entra-proxy/ && test == "GET" && wl != "c1-rtt")
                    printf "| throughput %s GET, x direct TLS | %s | %.2f | >= %s |\n", (wl == "c50" ? "-c 50" : "-c 50 -P 16"), path, rps / tls, (wl == "c50" ? "0.80" : "0.70") >> summary
            }
        }
    }
    # round trip: extra latency over direct TLS, from the request rate of one client
    if ("c1-rtt" in wlseen) {
        tls = median("c1-rtt" SUBSEP "direct-tls" SUBSEP "GET")
        printf "\nRound trip (1 client, 1e6/rps) minus direct TLS:"
        for (p = 1; p <= np; p++) {
            path = paths[p]
            k = "c1-rtt" SUBSEP path SUBSEP "GET"
            if (!(k in vals) || path == "direct-tls") continue
            printf " %s %+.1f us;", path, 1e6 / median(k) - 1e6 / tls
            if (path ~ /^entra-proxy/) printf "| one-client round trip minus direct TLS | %s | %+.1f us | <= +20 us |\n", path, 1e6 / median(k) - 1e6 / tls >> summary
        }
        printf "\n"
    }
    printf "\nspread = (max - min) / median of requests/s over the rounds; x TLS = median / median of direct-tls.\n"
    printf "CPU s/100k = proxy CPU seconds per 100,000 requests (SET+GET of one run together; the \" row repeats it).\n"
    printf "Peak RSS (VmHWM) after the throughput runs: stunnel %d KiB, haproxy %d KiB, entra-proxy %d KiB, entra-proxy-entra %d KiB, entra-proxy-mux %d KiB.\n", rss["stunnel"], rss["haproxy"], rss["entra-proxy"], rss["entra-proxy-entra"], rss["entra-proxy-mux"]
}
function spread(key,   n, i, a, lo, hi) {
    n = split(vals[key], a, " "); lo = a[1]; hi = a[1]
    for (i = 2; i <= n; i++) { if (a[i] + 0 < lo + 0) lo = a[i]; if (a[i] + 0 > hi + 0) hi = a[i] }
    return 100 * (hi - lo) / median(key)
}
function median_lat(key,   save, m) { save = vals[key]; vals[key] = lat[key]; m = median(key); vals[key] = save; return m }
function median_cpu(key,   save, m) { save = vals[key]; vals[key] = cpu[key]; m = median(key); vals[key] = save; return m }
' "$RESULTS"
echo "entra-proxy-entra fetched $ENTRA_TOKENS token(s) from the local managed identity endpoint (1 h lifetime: no refresh during the runs)."
echo
echo "#### The proxies against haproxy (same medians)"
echo
echo "| workload | path | requests/s | x TLS | x haproxy | CPU us/req | CPU x haproxy |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
cat "$WORK/vs.md"
echo
echo "x haproxy = the path's median requests/s / haproxy's; CPU x haproxy = the proxy's CPU per request / haproxy's (one figure per run, the \" row repeats it)."
echo
echo "#### entra-proxy-mux (--multiplex $MULTIPLEX --cluster off): upstream connections"
echo
echo "Read right after each of its runs: \`redis_proxy_upstream_connections\` and \`redis_proxy_multiplex_shared_connections\` on its \`/metrics\`, redis-server's \`connected_clients\` minus the count just before this proxy started (the token issuers, an idle warm pool and the INFO call itself), the clients it pinned to a connection of their own during the run (\`redis_proxy_multiplex_pins_total\`, all reasons: none, since redis-benchmark's \`CONFIG GET\` is shared), and the SET + GET calls redis-server processed during the run (\`INFO commandstats\`): every request sent must be there."
echo
echo "| round | workload | redis_proxy_upstream_connections | shared connections | pinned clients now | clients pinned in the run | redis-server connections beyond the baseline | SET+GET calls on redis-server in the run / requests sent |"
echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
awk '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s / %s |\n", $1, ($2 == "c50" ? "-c 50" : $2 == "c50-P16" ? "-c 50 -P 16" : "-c 1"), $3, $4, $5, $6, $7, $8, $9 }' "$MUX_RESULTS"
echo
MUX_UP="$(awk '$2 == "c50" { print $3 }' "$MUX_RESULTS" | sort -u | paste -sd/ -)"
MUX_SERVER="$(awk '$2 == "c50" { print $7 }' "$MUX_RESULTS" | sort -u | paste -sd/ -)"
MUX_OK=yes
[ "$MUX_UP" = "$MULTIPLEX" ] && [ "$MUX_SERVER" = "$MULTIPLEX" ] || MUX_OK=NO
echo "After the -c 50 runs: redis_proxy_upstream_connections $MUX_UP, redis-server connections beyond the baseline $MUX_SERVER (expected $MULTIPLEX: $MUX_OK)."
echo
# the proxies' own logs (RUST_LOG=warn): anything there is a warning or an error
for name in proxy proxy-entra proxy-mux; do
    n="$(grep -c . "$WORK/$name.log" || true)"
    echo "$name.log (RUST_LOG=warn): $n line(s)."
    if [ "$n" -gt 0 ]; then
        echo
        echo '```'
        head -5 "$WORK/$name.log" | cut -c1-300
        echo '```'
    fi
    echo
done
} >>"$REPORT"
echo "| upstream connections after -c 50 (gauge / redis-server) | entra-proxy-mux (--multiplex $MULTIPLEX) | $MUX_UP / $MUX_SERVER | = $MULTIPLEX |" >>"$SUMMARY"
[ "$MUX_OK" = yes ] || log "WARNING: entra-proxy-mux had $MUX_UP (gauge) / $MUX_SERVER (redis-server) upstream connections after -c 50, expected $MULTIPLEX"
# every command sent through the multiplexed proxy must have reached redis-server
awk '$8 < $9 { bad = 1 } END { exit bad }' "$MUX_RESULTS" ||
    die "redis-server processed fewer SET/GET calls than were sent through entra-proxy-mux: $(cat "$MUX_RESULTS")"

if [ -n "${BENCH_RAW_OUT:-}" ]; then
    cp "$RESULTS" "$BENCH_RAW_OUT"
    log "raw results (round workload path test rps avg_ms cpu_ticks requests) in $BENCH_RAW_OUT"
    cp "$MUX_RESULTS" "$BENCH_RAW_OUT.mux"
    log "entra-proxy-mux after each run (round workload upstream shared pinned pins_in_run server_conns server_calls requests) in $BENCH_RAW_OUT.mux"
fi
fi

# ================================================================ 2. connection setup
if want setup; then
SETUP_PATHS=(direct-plain direct-tls stunnel haproxy entra-proxy entra-proxy-warm)
N_SETUP=2000
[ "$QUICK" -eq 0 ] || N_SETUP=500
SETUP_RESULTS="$WORK/setup.txt" # round path ms_per_conn upstream_conns_per_conn
: >"$SETUP_RESULTS"
# One client, a new connection for every request (-k 0): connect, (AUTH,) PING, close.
setup_one() {
    local round="$1" path="$2" args out rps c0 c1
    read -r -a args <<<"$(path_args "$path")"
    c0="$(redis_stat stats total_connections_received)"
    if ! out="$(timeout "$BENCH_TIMEOUT" redis-benchmark "${args[@]}" -c 1 -n "$N_SETUP" -k 0 --csv ping 2>"$WORK/bench.err")"; then
        cat "$WORK/bench.err" >&2
        die "redis-benchmark -k 0 failed on $path"
    fi
    c1="$(redis_stat stats total_connections_received)"
    rps="$(printf '%s\n' "$out" | tr -d '"' | awk -F, '$1=="ping"{print $2}')"
    [ -n "$rps" ] || { printf '%s\n' "$out" >&2; die "unexpected redis-benchmark output on $path (setup)"; }
    # connections redis-server received per client connection (the 2 extra: the admin INFO call
    # and redis-benchmark's CONFIG GET at start): 1.0 proves -k 0 reconnects, and that the
    # proxies dial one upstream connection per client
    echo "$round $path $(awk -v r="$rps" 'BEGIN{printf "%.4f", 1000 / r}') $(awk -v a="$c0" -v b="$c1" -v n="$N_SETUP" 'BEGIN{printf "%.2f", (b - a - 2) / n}')" >>"$SETUP_RESULTS"
}
# Paced: connect, (AUTH,) PING, close, then 25 ms of nothing (a warm pool refills), N_PACED
# times; the latency of each connection is measured by connect_latency.py.
N_PACED=200
[ "$QUICK" -eq 0 ] || N_PACED=60
PACED_RESULTS="$WORK/paced.txt" # round path median_ms p90_ms p99_ms min_ms
: >"$PACED_RESULTS"
paced_one() {
    local round="$1" path="$2" args out
    case "$path" in
        direct-plain) args=(--port "$PLAIN_PORT" --user "$USER_NAME" --password "$PASS") ;;
        direct-tls) args=(--port "$TLS_PORT" --tls --cafile "$CA" --sni localhost --user "$USER_NAME" --password "$PASS") ;;
        stunnel) args=(--port "$STUNNEL_PORT" --user "$USER_NAME" --password "$PASS") ;;
        haproxy) args=(--port "$HAPROXY_PORT" --user "$USER_NAME" --password "$PASS") ;;
        entra-proxy) args=(--port "$PROXY_PORT") ;;
        entra-proxy-warm) args=(--port "$WARM_PORT") ;;
    esac
    out="$(timeout 120 python3 "$BENCH_DIR/connect_latency.py" "${args[@]}" -n "$N_PACED" --gap-ms 25)" ||
        die "paced connection setup failed on $path"
    echo "$round $path $out" >>"$PACED_RESULTS"
}
log "connection setup: $ROUNDS interleaved rounds x ${#SETUP_PATHS[@]} paths x ($N_SETUP back-to-back + $N_PACED paced connections)"
for round in $(seq 1 "$ROUNDS"); do
    for k in $(seq 0 $(( ${#SETUP_PATHS[@]} - 1 ))); do
        path="${SETUP_PATHS[$(( (k + round - 1) % ${#SETUP_PATHS[@]} ))]}"
        setup_one "$round" "$path"
        paced_one "$round" "$path"
    done
    log "setup round $round done"
done
# -k 0 must really reconnect: the direct paths must show one server connection per request
awk '$2 ~ /^direct/ && $4 < 0.95 { bad = 1 } END { exit bad }' "$SETUP_RESULTS" ||
    die "redis-benchmark -k 0 did not reconnect for every request: $(cat "$SETUP_RESULTS")"
{
echo "### Connection setup (one client: connect, AUTH where the path needs it, PING, close; $ROUNDS rounds, medians)"
echo
echo "Back-to-back: \`redis-benchmark -c 1 -n $N_SETUP -k 0 ping\`, ms per connection = 1000 / rps. Paced: $N_PACED connections 25 ms apart (connect_latency.py), latency from connect() to the PONG."
echo
awk -v summary="$SUMMARY" -v warm="$WARM_ACTIVE" -v paced="$PACED_RESULTS" '
function median(s,   n, i, j, t, a) {
    n = split(s, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ ms[$2] = ms[$2] " " $3; up[$2] = up[$2] " " $4; if (min[$2] == "" || $3 < min[$2]) min[$2] = $3; if ($3 > max[$2]) max[$2] = $3 }
END {
    while ((getline line < paced) > 0) {
        split(line, f, " ")
        pm[f[2]] = pm[f[2]] " " f[3]; p90[f[2]] = p90[f[2]] " " f[4]; p99[f[2]] = p99[f[2]] " " f[5]
    }
    print "| path | back-to-back ms per connection | min..max over rounds | x direct TLS | server connections per client connection | paced median ms | paced p90 ms | paced p99 ms |"
    print "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    np = split("direct-plain direct-tls stunnel haproxy entra-proxy entra-proxy-warm", paths, " ")
    tls = median(ms["direct-tls"])
    for (p = 1; p <= np; p++) {
        path = paths[p]
        if (!(path in ms)) continue
        m = median(ms[path])
        printf "| %s | %.3f | %.3f..%.3f | %.2f | %.2f | %.3f | %.3f | %.3f |\n", path, m, min[path], max[path], m / tls, median(up[path]), median(pm[path]), median(p90[path]), median(p99[path])
    }
    w = (warm ~ /^yes/ ? "yes" : "NO")
    printf "| connect + PING, back-to-back (ms per connection) | entra-proxy-warm (--warm-connections 8, pool active: %s) | %.3f ms | <= 0.25 ms |\n", w, median(ms["entra-proxy-warm"]) >> summary
    printf "| connect + PING, back-to-back (ms per connection) | entra-proxy (no pool) / direct-plain (floor) | %.3f / %.3f ms | - |\n", median(ms["entra-proxy"]), median(ms["direct-plain"]) >> summary
    printf "| connect + PING, paced (median ms) | entra-proxy-warm / entra-proxy / direct-plain (floor) | %.3f / %.3f / %.3f ms | - |\n", median(pm["entra-proxy-warm"]), median(pm["entra-proxy"]), median(pm["direct-plain"]) >> summary
    printf "| connect + AUTH + PING, back-to-back (ms per connection) | haproxy / direct TLS | %.3f / %.3f ms | - |\n", median(ms["haproxy"]), tls >> summary
    printf "\nentra-proxy-warm: pool active: %s.\n", warm
}' "$SETUP_RESULTS"
echo
} >>"$REPORT"
fi

# The throughput and setup processes are not needed any more: less noise for what follows.
for pid in "$STUNNEL_PID" "$HAPROXY_PID" "$PROXY_PID" "$ENTRA_PID" "$WARM_PID" "$MUX_PID"; do
    [ -z "$pid" ] || stop_bg "$pid"
done

# ---------------------------------------------------------------- idle clients
# hold_idle PORT [--user U --password P]: opens IDLE_CONNS connections, PING on each (through a
# proxy, that makes every upstream connection exist); returns once they are all answered. Sets
# HOLDER_PID and IDLE_OK; the holder reads commands from fd 7 (see idle_clients.py).
hold_idle() {
    local port="$1" line
    shift
    rm -f "$WORK/idle.ctl" "$WORK/idle.out"
    mkfifo "$WORK/idle.ctl"
    python3 "$BENCH_DIR/idle_clients.py" --port "$port" -n "$IDLE_CONNS" --timeout 120 "$@" \
        <"$WORK/idle.ctl" >"$WORK/idle.out" 2>"$WORK/idle.err" &
    HOLDER_PID=$!
    PIDS+=("$HOLDER_PID")
    exec 7>"$WORK/idle.ctl"
    wait_file "$WORK/idle.out" 150 || { cat "$WORK/idle.err" >&2; die "idle clients did not get ready"; }
    line="$(head -1 "$WORK/idle.out")"
    log "idle clients: $line (ready ok failed seconds)"
    # shellcheck disable=SC2086
    set -- $line
    IDLE_OK="$2"
    [ "$3" -eq 0 ] || die "$3 of $IDLE_CONNS idle connections failed on :$port (see the proxy log)"
}
# ping_idle: PING every idle connection again; sets PONG_OK PONG_FAILED
ping_idle() {
    local line _
    # (a write to the fifo of a dead holder would kill this shell with SIGPIPE, cleanup unrun)
    kill -0 "$HOLDER_PID" 2>/dev/null || { cat "$WORK/idle.err" >&2; die "the idle clients exited"; }
    echo ping >&7
    for _ in $(seq 1 1500); do
        line="$(grep '^pong' "$WORK/idle.out" | tail -1 || true)"
        [ -z "$line" ] || break
        sleep 0.1
    done
    [ -n "$line" ] || die "idle clients did not answer the ping command"
    # shellcheck disable=SC2086
    set -- $line
    PONG_OK="$2"
    PONG_FAILED="$3"
}
release_idle() {
    exec 7>&-
    stop_bg "$HOLDER_PID"
}
# idle_rss NAME PID PORT [holder args]: KiB of RSS per idle connection held through PID
idle_rss() {
    local name="$1" pid="$2" port="$3" before after
    shift 3
    before="$(rss_kib "$pid")"
    hold_idle "$port" "$@"
    sleep 1
    after="$(rss_kib "$pid")"
    IDLE_KIB="$(awk -v a="$before" -v b="$after" -v n="$IDLE_OK" 'BEGIN{printf "%.1f", (b - a) / n}')"
    log "$name: RSS $before KiB -> $after KiB with $IDLE_OK idle connections: $IDLE_KIB KiB each"
    echo "| $name | $before | $after | $IDLE_OK | $IDLE_KIB |" >>"$WORK/idle.rows"
    release_idle
}

# ================================================================ 3. idle connection memory
if want idle; then
: >"$WORK/idle.rows"
IDLE_PORT="$(free_port)"
log "idle memory: a fresh redis-entra-proxy (access key) with $IDLE_CONNS idle connections"
start_key_proxy proxy-idle "$IDLE_PORT" --admin-listen off
IDLE_PID=$BG_PID
idle_rss entra-proxy "$IDLE_PID" "$IDLE_PORT"
PROXY_IDLE_KIB="$IDLE_KIB"
stop_bg "$IDLE_PID"
HAPROXY_IDLE_PORT="$(free_port)"
log "idle memory: a fresh haproxy with $IDLE_CONNS idle connections (AUTH + PING each)"
start_haproxy haproxy-idle "$HAPROXY_IDLE_PORT"
HAPROXY_IDLE_PID=$BG_PID
idle_rss haproxy "$HAPROXY_IDLE_PID" "$HAPROXY_IDLE_PORT" --user "$USER_NAME" --password "$PASS"
stop_bg "$HAPROXY_IDLE_PID"
{
echo "### Idle connection memory ($IDLE_CONNS clients connected, one PING answered on each, then idle)"
echo
echo "| process (fresh) | RSS before, KiB | RSS with the idle clients, KiB | connections | KiB per idle connection |"
echo "| --- | ---: | ---: | ---: | ---: |"
cat "$WORK/idle.rows"
echo
echo "RSS = VmRSS of the process (1 s after the last PONG) minus VmRSS before the clients connected; each client connection has its own upstream TLS connection."
echo
} >>"$REPORT"
echo "| RSS per idle client connection ($IDLE_CONNS held) | entra-proxy (haproxy: $IDLE_KIB KiB) | $PROXY_IDLE_KIB KiB | <= 16 KiB |" >>"$SUMMARY"
fi

# ================================================================ 3b. worst-case connection memory
# What the default --max-connections of the chart and the injector is derived from: RSS per
# connection held in the state that costs the proxy the most (see worst_clients.py).
if want worst; then
WORST_CONNS="${WORST_CONNS:-50}"
WORST_PORT="$(free_port)"
log "worst-case memory: a fresh redis-entra-proxy (access key) with $WORST_CONNS connections in their costliest state"
start_key_proxy proxy-worst "$WORST_PORT" --admin-listen off
WORST_PID=$BG_PID
WORST_BEFORE="$(rss_kib "$WORST_PID")"
rm -f "$WORK/worst.ctl" "$WORK/worst.out"
mkfifo "$WORK/worst.ctl"
python3 "$BENCH_DIR/worst_clients.py" --port "$WORST_PORT" -n "$WORST_CONNS" \
    <"$WORK/worst.ctl" >"$WORK/worst.out" 2>"$WORK/worst.err" &
HOLDER_PID=$!
PIDS+=("$HOLDER_PID")
exec 7>"$WORK/worst.ctl"
wait_file "$WORK/worst.out" 180 || { cat "$WORK/worst.err" >&2; die "worst-case clients did not get ready"; }
# shellcheck disable=SC2046
set -- $(head -1 "$WORK/worst.out")
WORST_OK="$2"
[ "$3" -eq 0 ] || die "$3 of $WORST_CONNS worst-case connections failed (see the proxy log)"
WORST_AFTER="$(rss_kib "$WORST_PID")"
WORST_HWM="$(hwm "$WORST_PID")"
WORST_KIB="$(awk -v a="$WORST_BEFORE" -v b="$WORST_AFTER" -v n="$WORST_OK" 'BEGIN{printf "%.0f", (b - a) / n}')"
log "worst case: RSS $WORST_BEFORE KiB -> $WORST_AFTER KiB (peak $WORST_HWM) with $WORST_OK connections: $WORST_KIB KiB each"
release_idle
stop_bg "$WORST_PID"
{
echo "### Memory per connection, worst case ($WORST_OK connections)"
echo
echo "Each connection has four unread replies of a 1 MiB value queued, 16,384 PINGs pipelined behind them, and a 1 MiB - 1 KiB \`CLIENT SETNAME\` (a command the proxy must hold whole) sent but for its last bytes (\`bench/worst_clients.py\`)."
echo
echo "| process (fresh) | RSS before, KiB | RSS with the connections, KiB | peak RSS, KiB | KiB per connection |"
echo "| --- | ---: | ---: | ---: | ---: |"
echo "| entra-proxy | $WORST_BEFORE | $WORST_AFTER | $WORST_HWM | $WORST_KIB |"
echo
} >>"$REPORT"
echo "| RSS per connection, worst case ($WORST_OK held) | entra-proxy | $WORST_KIB KiB (at rest: $WORST_BEFORE KiB) | - |" >>"$SUMMARY"
fi

# ================================================================ 4. re-authentication
if want reauth; then
LIFETIME=30
ROTATIONS=2
[ "$QUICK" -eq 0 ] || { LIFETIME=20; ROTATIONS=1; }
ROTATIONS="${REAUTH_ROTATIONS:-$ROTATIONS}"
LOAD_C=10
N_WIN=$(( 20000 / (QUICK ? 2 : 1) ))
start_issuer issuer-short "$LIFETIME" "4a5b6c7d-1111-4222-8333-944455556666"
REAUTH_PORT="$(free_port)"
REAUTH_ADMIN="127.0.0.1:$(free_port)"
log "reauth: redis-entra-proxy (Entra mode, ${LIFETIME}s tokens, --token-refresh-at 0.5) on :$REAUTH_PORT"
start_entra_proxy proxy-reauth "$REAUTH_PORT" "$ISSUER_URL" --token-refresh-at 0.5 --admin-listen "$REAUTH_ADMIN"
REAUTH_PID=$BG_PID
rss0="$(rss_kib "$REAUTH_PID")"
hold_idle "$REAUTH_PORT"
rss1="$(rss_kib "$REAUTH_PID")"
REAUTH_IDLE_OK="$IDLE_OK"
log "reauth: $IDLE_OK idle connections, RSS $rss0 -> $rss1 KiB"

start_bg metrics python3 "$BENCH_DIR/metrics_poll.py" "$REAUTH_ADMIN" --interval 0.025 --duration 300
POLL_PID=$BG_PID
# The load: back-to-back redis-benchmark windows of N_WIN GETs over LOAD_C connections; each
# window's start/end (unix ms) and its CSV row go to windows.txt
read -r -a load_args <<<"$(echo -h 127.0.0.1 -p "$REAUTH_PORT" -c "$LOAD_C" -n "$N_WIN" -t get -d 64)"
rm -f "$WORK/stop"
LOAD_T0="$(date +%s.%N)" # before the first window starts: no window is left out of the analysis
(
    while [ ! -e "$WORK/stop" ]; do
        t0="$(date +%s.%N)"
        out="$(timeout 60 redis-benchmark "${load_args[@]}" --csv 2>/dev/null | tr -d '"' | awk -F, '$1=="GET"' || true)"
        t1="$(date +%s.%N)"
        [ -z "$out" ] || echo "$t0 $t1 $out"
    done
) >"$WORK/windows.txt" 2>/dev/null &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
# Wait for ROTATIONS token refreshes that start after the load did, then for the re-auth
# deadline of the last one (a quarter of the lifetime), bounded.
log "reauth: load running; waiting for $ROTATIONS token refresh(es) (one every $(( LIFETIME / 2 ))s)"
limit=$(( $(date +%s) + ROTATIONS * LIFETIME / 2 + LIFETIME + 30 ))
while :; do
    n="$(awk -v t="$LOAD_T0" '$1 > t' "$WORK/issuer-short.tokens" | wc -l)"
    [ "$n" -lt "$ROTATIONS" ] || break
    [ "$(date +%s)" -lt "$limit" ] || die "no token refresh within the time limit (see $WORK/proxy-reauth.log)"
    kill -0 "$REAUTH_PID" 2>/dev/null || { cat "$WORK/proxy-reauth.log" >&2; die "the reauth proxy exited"; }
    sleep 0.5
done
sleep $(( LIFETIME / 4 + 2 ))
LOAD_T1="$(date +%s.%N)"
touch "$WORK/stop"
wait "$LOAD_PID" 2>/dev/null || true
stop_bg "$LOAD_PID"
stop_bg "$POLL_PID"
ping_idle
log "reauth: after the rotation(s) $PONG_OK idle connections answered PING, $PONG_FAILED failed"
release_idle
stop_bg "$REAUTH_PID"
python3 "$BENCH_DIR/reauth_report.py" --tokens "$WORK/issuer-short.tokens" --metrics "$WORK/metrics.log" \
    --windows "$WORK/windows.txt" --after "$LOAD_T0" --until "$LOAD_T1" --idle "$REAUTH_IDLE_OK" --md "$WORK/reauth.md" >"$WORK/reauth.kv" ||
    { cat "$WORK/reauth.kv" >&2; die "reauth analysis failed"; }
# shellcheck disable=SC1091
. "$WORK/reauth.kv"
{
echo "### Re-authentication of $REAUTH_IDLE_OK idle connections + a $LOAD_C-connection GET load (Entra mode, ${LIFETIME}s tokens, --token-refresh-at 0.5)"
echo
cat "$WORK/reauth.md"
echo
echo "After the rotation(s) $PONG_OK of $REAUTH_IDLE_OK idle connections still answered PING ($PONG_FAILED failed). RSS of this proxy: $rss0 KiB before the idle clients, $rss1 KiB with them ($(awk -v a="$rss0" -v b="$rss1" -v n="$REAUTH_IDLE_OK" 'BEGIN{printf "%.1f", (b - a) / n}') KiB each, Entra mode)."
echo
} >>"$REPORT"
{
    echo "| time to re-authenticate all $REAUTH_IDLE_OK idle connections after a refresh | entra-proxy (Entra) | $REAUTH_ALL_MS ms | - |"
    echo "| load p99 with rotation / without (window medians) | entra-proxy (Entra) | $P99_ROT / $P99_QUIET ms | - |"
    echo "| load p99 difference, rotation - no rotation | entra-proxy (Entra) | $P99_DIFF ms | < 1 ms |"
} >>"$SUMMARY"
[ "$PONG_FAILED" -eq 0 ] || die "$PONG_FAILED idle connections broke during re-authentication"
fi

# ---------------------------------------------------------------- report
CPU_MODEL="$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)"
echo
echo "## redis-entra-proxy benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo
echo "* command: \`$COMMAND_LINE\` (rounds=$ROUNDS, quick=$QUICK, parts=$ONLY), $(( $(date +%s) - T_START )) s"
echo "* machine: nproc=$(nproc), ${CPU_MODEL:-unknown CPU}, $(uname -sr)"
echo "* placement: $PLACEMENT (redis-benchmark on CPU ${CLIENT_CPU:-any}, redis-server on ${SERVER_CPU:-any}, the proxies on ${PROXY_CPU:-any})"
echo "* $(redis-server --version | cut -d' ' -f1-3), $("$STUNNEL" -version 2>&1 | grep -m1 -o 'stunnel [0-9.]*'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(openssl version | cut -d' ' -f1-2), Python $(python3 -c 'import platform; print(platform.python_version())')"
echo "* proxy: $PROXY_VERSION, sha256 $PROXY_SHA, built $PROXY_MTIME ($SRC_BIN)"
echo
cat "$REPORT"
echo "### Summary"
echo
echo "| measurement | path | value | target |"
echo "| --- | --- | ---: | ---: |"
cat "$SUMMARY"
exit 0
