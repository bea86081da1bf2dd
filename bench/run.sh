#!/usr/bin/env bash
# One-command throughput / CPU / memory benchmark of redis-entra-proxy against
# direct Redis (plaintext and TLS) and two byte-forwarding TLS proxies
# (stunnel, haproxy). See bench/README.md.
#
# Usage: bench/run.sh [--rounds N] [--quick]
#   --rounds N   interleaved rounds; medians are reported (default 3)
#   --quick      10x fewer requests per run (smoke test, numbers are noisy)
set -euo pipefail

ROUNDS=3
SCALE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --quick) SCALE=10; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (try --help)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PASS=benchpass
USER_NAME=bench
CLK_TCK="$(getconf CLK_TCK)"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- dependencies
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || need+=(stunnel4)
command -v haproxy >/dev/null || need+=(haproxy)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=()
    [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
    log "installing: ${need[*]}"
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's stunnel4 package's binary is /usr/bin/stunnel4 (and /usr/bin/stunnel on newer ones).
STUNNEL="$(command -v stunnel4 || command -v stunnel)"
command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"

log "building the proxy (cargo build --release)"
(cd "$REPO" && cargo build --release --quiet)
PROXY_BIN="$REPO/target/release/redis-entra-proxy"
[ -x "$PROXY_BIN" ] || die "no $PROXY_BIN after the build"

# ---------------------------------------------------------------- cleanup
WORK="$(mktemp -d -t redis-entra-bench.XXXXXX)"
PIDS=()
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local pid
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

# A free TCP port on 127.0.0.1 (nothing answers a connect to it).
USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$(( 20000 + RANDOM % 40000 ))
        case "$USED_PORTS" in *" $p "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS="$USED_PORTS$p "
            echo "$p"
            return
        fi
    done
}

# wait_ping NAME PID redis-cli-args...: until PING answers PONG (or the process died)
wait_ping() {
    local name="$1" pid="$2" _
    shift 2
    for _ in $(seq 1 100); do
        if [ "$(redis-cli "$@" PING 2>/dev/null)" = "PONG" ]; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2 || true; die "$name exited"; }
        sleep 0.1
    done
    cat "$WORK/$name.log" >&2 || true
    die "$name did not answer PING within 10s"
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
maxclients 10000
EOF
log "starting redis-server (plain :$PLAIN_PORT for the baseline, TLS :$TLS_PORT)"
redis-server "$WORK/redis.conf" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_ping redis "$REDIS_PID" -h 127.0.0.1 -p "$PLAIN_PORT" --user "$USER_NAME" --pass "$PASS" --no-auth-warning
wait_ping redis "$REDIS_PID" -h 127.0.0.1 -p "$TLS_PORT" --tls --cacert "$CA" --sni localhost \
    --user "$USER_NAME" --pass "$PASS" --no-auth-warning

# ---------------------------------------------------------------- stunnel
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
"$STUNNEL" "$WORK/stunnel.conf" >"$WORK/stunnel.log" 2>&1 &
STUNNEL_PID=$!
PIDS+=("$STUNNEL_PID")
wait_ping stunnel "$STUNNEL_PID" -h 127.0.0.1 -p "$STUNNEL_PORT" --user "$USER_NAME" --pass "$PASS" --no-auth-warning

# ---------------------------------------------------------------- haproxy
HAPROXY_PORT="$(free_port)"
cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m
listen redis
    bind 127.0.0.1:$HAPROXY_PORT
    server s 127.0.0.1:$TLS_PORT ssl verify required ca-file $CA sni str(localhost) verifyhost localhost
EOF
log "starting haproxy on :$HAPROXY_PORT"
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")
wait_ping haproxy "$HAPROXY_PID" -h 127.0.0.1 -p "$HAPROXY_PORT" --user "$USER_NAME" --pass "$PASS" --no-auth-warning

# ---------------------------------------------------------------- redis-entra-proxy
PROXY_PORT="$(free_port)"
log "starting redis-entra-proxy (access-key mode) on :$PROXY_PORT"
AZURE_REDIS_PASSWORD="$PASS" RUST_LOG=warn "$PROXY_BIN" \
    --upstream "127.0.0.1:$TLS_PORT" --tls-server-name localhost --ca-file "$CA" \
    --auth access-key --redis-username "$USER_NAME" \
    --listen "127.0.0.1:$PROXY_PORT" --admin-listen off \
    >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_ping proxy "$PROXY_PID" -h 127.0.0.1 -p "$PROXY_PORT"

# ---------------------------------------------------------------- the runs
PATHS=(direct-plain direct-tls stunnel haproxy entra-proxy)
# redis-benchmark arguments that reach Redis through each path
path_args() {
    local auth=(--user "$USER_NAME" -a "$PASS")
    case "$1" in
        direct-plain) echo -h 127.0.0.1 -p "$PLAIN_PORT" "${auth[@]}" ;;
        direct-tls) echo -h 127.0.0.1 -p "$TLS_PORT" --tls --cacert "$CA" --sni localhost "${auth[@]}" ;;
        stunnel) echo -h 127.0.0.1 -p "$STUNNEL_PORT" "${auth[@]}" ;;
        haproxy) echo -h 127.0.0.1 -p "$HAPROXY_PORT" "${auth[@]}" ;;
        entra-proxy) echo -h 127.0.0.1 -p "$PROXY_PORT" ;; # the proxy authenticates upstream
    esac
}
path_pid() {
    case "$1" in
        stunnel) echo "$STUNNEL_PID" ;;
        haproxy) echo "$HAPROXY_PID" ;;
        entra-proxy) echo "$PROXY_PID" ;;
        *) echo "" ;;
    esac
}
N_MAIN=$(( 100000 / SCALE ))
N_RT=$(( 20000 / SCALE ))
WORKLOADS=(c50 c50-P16 c1-rtt)
workload_args() {
    case "$1" in
        c50) echo -c 50 -n "$N_MAIN" -t set,get -d 64 ;;
        c50-P16) echo -c 50 -n "$N_MAIN" -t set,get -d 64 -P 16 ;;
        c1-rtt) echo -c 1 -n "$N_RT" -t get -d 64 ;;
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

RESULTS="$WORK/results.txt" # round workload path test rps avg_ms cpu_ticks requests
: >"$RESULTS"
run_one() {
    local round="$1" wl="$2" path="$3" pid before after out ntests requests args
    pid="$(path_pid "$path")"
    before=0
    [ -z "$pid" ] || before="$(cpu_ticks "$pid")"
    read -r -a args <<<"$(path_args "$path") $(workload_args "$wl")"
    if ! out="$(redis-benchmark "${args[@]}" --csv 2>"$WORK/bench.err")"; then
        cat "$WORK/bench.err" >&2
        die "redis-benchmark failed on $path / $wl"
    fi
    after=0
    [ -z "$pid" ] || after="$(cpu_ticks "$pid")"
    # CSV: "test","rps","avg_latency_ms",...; one row per test
    out="$(printf '%s\n' "$out" | tr -d '"' | awk -F, '$1=="SET"||$1=="GET"{print $1, $2, $3}')"
    ntests="$(printf '%s\n' "$out" | grep -c . || true)"
    case "$wl" in c1-rtt) [ "$ntests" -eq 1 ] ;; *) [ "$ntests" -eq 2 ] ;; esac ||
        { cat "$WORK/bench.err" >&2; die "unexpected redis-benchmark output on $path / $wl: $out"; }
    case "$wl" in c1-rtt) requests="$N_RT" ;; *) requests=$(( 2 * N_MAIN )) ;; esac
    printf '%s\n' "$out" | while read -r test rps avg; do
        echo "$round $wl $path $test $rps $avg $(( after - before )) $requests"
    done >>"$RESULTS"
}

log "smoke run of every path"
for path in "${PATHS[@]}"; do
    pid="$(path_pid "$path")"
    read -r -a args <<<"$(path_args "$path")"
    redis-benchmark "${args[@]}" -c 4 -n 2000 -t set,get -d 64 --csv >"$WORK/smoke.out" 2>&1 ||
        { cat "$WORK/smoke.out" >&2; die "smoke run failed on $path"; }
    grep -q '^"GET"' "$WORK/smoke.out" || { cat "$WORK/smoke.out" >&2; die "smoke run failed on $path"; }
done

log "$ROUNDS interleaved rounds x ${#WORKLOADS[@]} workloads x ${#PATHS[@]} paths"
for round in $(seq 1 "$ROUNDS"); do
    for wl in "${WORKLOADS[@]}"; do
        # rotate the order of the paths every round, so none always runs first
        for k in $(seq 0 $(( ${#PATHS[@]} - 1 ))); do
            path="${PATHS[$(( (k + round - 1) % ${#PATHS[@]} ))]}"
            run_one "$round" "$wl" "$path"
        done
    done
    log "round $round done"
done

# peak RSS of each proxy process, after everything
hwm() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }
RSS_STUNNEL="$(hwm "$STUNNEL_PID")"
RSS_HAPROXY="$(hwm "$HAPROXY_PID")"
RSS_PROXY="$(hwm "$PROXY_PID")"

# ---------------------------------------------------------------- report
echo
echo "redis-entra-proxy benchmark — $(date -u '+%Y-%m-%d %H:%M:%S UTC'), nproc=$(nproc), $(uname -sr)"
echo "$(redis-server --version | cut -d' ' -f1-3), $("$STUNNEL" -version 2>&1 | grep -m1 -o 'stunnel [0-9.]*'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(openssl version | cut -d' ' -f1-2)"
echo "rounds=$ROUNDS (medians), -d 64, no auth on the entra-proxy path; CPU = utime+stime of the proxy process"
echo
awk -v clk="$CLK_TCK" -v rounds="$ROUNDS" \
    -v rss_stunnel="$RSS_STUNNEL" -v rss_haproxy="$RSS_HAPROXY" -v rss_proxy="$RSS_PROXY" '
function median(key,   n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{
    round = $1; wl = $2; path = $3; test = $4
    k = wl SUBSEP path SUBSEP test
    vals[k] = vals[k] " " $5
    lat[k] = lat[k] " " $6
    # CPU per run (both tests of one run share it): count once per run
    if ($4 == "GET") { cpu[wl SUBSEP path] = cpu[wl SUBSEP path] " " ($7 / clk) / $8 * 100000 }
    if (!(wl in wlseen)) { wlseen[wl] = 1; wls[++nwl] = wl }
    if (!(path in pseen)) { pseen[path] = 1 }
}
END {
    np = split("direct-plain direct-tls stunnel haproxy entra-proxy", paths, " ")
    nt["c50"] = 2; tn["c50", 1] = "SET"; tn["c50", 2] = "GET"
    nt["c50-P16"] = 2; tn["c50-P16", 1] = "SET"; tn["c50-P16", 2] = "GET"
    nt["c1-rtt"] = 1; tn["c1-rtt", 1] = "GET"
    rss["stunnel"] = rss_stunnel; rss["haproxy"] = rss_haproxy; rss["entra-proxy"] = rss_proxy
    printf "%-22s %-13s %12s %8s %9s %10s %14s %12s\n", "workload", "path", "requests/s", "spread", "x TLS", "avg ms", "CPU s/100k", "CPU us/req"
    printf "%-22s %-13s %12s %8s %9s %10s %14s %12s\n", "--------", "----", "----------", "------", "-----", "------", "----------", "----------"
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
                }
                printf "%-22s %-13s %12.0f %7.0f%% %9.2f %10.3f %14s %12s\n", label, path, rps, spread(k), rps / tls, avg, cpus, cpuus
            }
        }
        # round trip: extra latency over direct TLS, from the request rate of one client
        if (wl == "c1-rtt") {
            tls = median(wl SUBSEP "direct-tls" SUBSEP "GET")
            printf "\nround trip (1 client, 1e6/rps) minus direct TLS:"
            for (p = 1; p <= np; p++) {
                path = paths[p]
                k = wl SUBSEP path SUBSEP "GET"
                if (!(k in vals) || path == "direct-tls") continue
                printf "  %s %+.1f us", path, 1e6 / median(k) - 1e6 / tls
            }
            printf "\n"
        }
        printf "\n"
    }
    printf "spread = (max - min) / median of requests/s over the rounds; x TLS = median / median of direct-tls\n"
    printf "CPU s/100k = proxy CPU seconds per 100,000 requests (SET+GET of one run together; the \" row repeats it)\n"
    printf "peak RSS (VmHWM) after all runs: stunnel %d KiB, haproxy %d KiB, entra-proxy %d KiB\n", rss["stunnel"], rss["haproxy"], rss["entra-proxy"]
}
function spread(key,   n, i, a, lo, hi) {
    n = split(vals[key], a, " "); lo = a[1]; hi = a[1]
    for (i = 2; i <= n; i++) { if (a[i] + 0 < lo + 0) lo = a[i]; if (a[i] + 0 > hi + 0) hi = a[i] }
    return 100 * (hi - lo) / median(key)
}
function median_lat(key,   save, m) { save = vals[key]; vals[key] = lat[key]; m = median(key); vals[key] = save; return m }
function median_cpu(key,   save, m) { save = vals[key]; vals[key] = cpu[key]; m = median(key); vals[key] = save; return m }
' "$RESULTS"

if [ -n "${BENCH_RAW_OUT:-}" ]; then
    cp "$RESULTS" "$BENCH_RAW_OUT"
    log "raw results (round workload path test rps avg_ms cpu_ticks requests) in $BENCH_RAW_OUT"
fi
exit 0
