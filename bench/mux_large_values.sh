#!/usr/bin/env bash
# What one large value costs everyone else when clients share upstream connections: how N in
# `--multiplex N` trades throughput for isolation. On a shared connection, replies come back in
# the order the commands were written, so a client's 4 MiB reply holds up every reply queued
# behind it on that connection; with N connections it holds up about 1/N of the clients.
#
# Measures 49 clients' GETs of a 3-byte value (redis-benchmark: requests/s, p50, p99) directly
# over TLS, through the 1:1 relay and through `--multiplex 1`, `2` and `4` (one build, one
# redis-server), first alone and then while one more client GETs a 4 MiB value in a loop (and
# reads it). The 1:1 row shows the share of the proxy's one thread the large reader takes;
# the multiplexed rows add the order on a shared connection.
#
# Usage: bench/mux_large_values.sh
# Environment: PROXY_BIN=/path (default: cargo build --release), REQUESTS (default 200000),
# BIG_MIB (default 4).
# Needs redis-server, redis-benchmark, openssl, python3 (Debian: redis-server redis-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

requests="${REQUESTS:-200000}"
big_mib="${BIG_MIB:-4}"
case "$big_mib" in '' | *[!0-9]*) echo "BIG_MIB must be a number of MiB, not '$big_mib'" >&2; exit 2 ;; esac
if [ -z "${PROXY_BIN:-}" ]; then
    cargo build --release --quiet
    PROXY_BIN=target/release/redis-entra-proxy
fi
work="$(mktemp -d /tmp/mux-large.XXXXXX)"
pids=()
loader=""
cleanup() {
    [ -z "$loader" ] || kill "$loader" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=bench/tls_redis.sh
. bench/tls_redis.sh
start_tls_redis
direct=(--tls --cacert "$work/ca.pem" --sni localhost -a bench-key -p "$tls_port")
for _ in $(seq 100); do
    redis-cli "${direct[@]}" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
done

declare -A port
for n in 0 1 2 4; do
    port[$n]="$(free_port)"
    mux=()
    [ "$n" = 0 ] || mux=(--multiplex "$n")
    AZURE_REDIS_PASSWORD=bench-key RUST_LOG=warn "$PROXY_BIN" --upstream "127.0.0.1:$tls_port" \
        --tls-server-name localhost --ca-file "$work/ca.pem" --auth access-key \
        --listen "127.0.0.1:${port[$n]}" --admin-listen off "${mux[@]}" --cluster off \
        >"$work/proxy-$n.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        redis-cli -p "${port[$n]}" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
done
redis-cli "${direct[@]}" set small abc 2>/dev/null | grep -q OK
python3 - "${port[1]}" "$big_mib" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
value = b"x" * (int(sys.argv[2]) << 20)
s.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n" % (len(value), value))
assert s.recv(16) == b"+OK\r\n"
PY

# measure ARGS...: "requests/s p50 p99" of 49 clients' GETs of the small value.
measure() {
    timeout 300 redis-benchmark "$@" -c 49 -n "$requests" GET small 2>/dev/null | tr '\r' '\n' |
        awk '/throughput summary/ {rps = $3} /latency summary/ {getline; getline; print rps, $3, $5}' |
        tail -1
}

# The large reader: one client, GET big in a loop, every reply read (redis-benchmark -c 1).
start_loader() {
    timeout 600 redis-benchmark "$@" -c 1 -n 100000000 GET big >/dev/null 2>&1 &
    loader=$!
    sleep 0.5
}
stop_loader() {
    kill "$loader" 2>/dev/null || true
    wait "$loader" 2>/dev/null || true
    loader=""
}

echo "## 49 clients' GETs of a small value, alone and beside one client reading a ${big_mib} MiB value in a loop"
echo
echo "| path | alone: req/s | p50 ms | p99 ms | beside the large reader: req/s | p50 ms | p99 ms |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for path in direct-tls 0 1 2 4; do
    if [ "$path" = direct-tls ]; then args=("${direct[@]}"); label="direct TLS"
    elif [ "$path" = 0 ]; then args=(-p "${port[0]}"); label="1:1 (no --multiplex)"
    else args=(-p "${port[$path]}"); label="--multiplex $path"; fi
    read -r a_rps a_p50 a_p99 <<<"$(measure "${args[@]}")"
    start_loader "${args[@]}"
    read -r b_rps b_p50 b_p99 <<<"$(measure "${args[@]}")"
    stop_loader
    echo "| $label | $a_rps | $a_p50 | $a_p99 | $b_rps | $b_p50 | $b_p99 |"
done
echo
echo "(command: bench/mux_large_values.sh, REQUESTS=$requests, BIG_MIB=$big_mib, proxy $PROXY_BIN)"
for n in 0 1 2 4; do
    if [ -s "$work/proxy-$n.log" ]; then echo "--multiplex $n warnings:"; sed 's/^/  /' "$work/proxy-$n.log"; fi
done
