#!/usr/bin/env bash
# Does a client that never reads its replies slow the others down when clients share upstream
# connections (--multiplex)? Measures the latency of 10 clients' GETs (redis-benchmark's p50 / p99)
# through `--multiplex 1` (every client on the one shared connection, the worst case) alone, and
# then while one more client asks for 200 MiB of replies (200 GETs of a 1 MiB value) and reads
# none of them; then checks that the proxy closed that client alone.
#
# Usage: bench/mux_sluggard.sh
# Environment: PROXY_BIN=/path (default: cargo build --release), REQUESTS (default 200000).
# Needs redis-server, redis-benchmark, openssl, python3 (Debian: redis-server redis-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

requests="${REQUESTS:-200000}"
if [ -z "${PROXY_BIN:-}" ]; then
    cargo build --release --quiet
    PROXY_BIN=target/release/redis-entra-proxy
fi
work="$(mktemp -d /tmp/mux-sluggard.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=bench/tls_redis.sh
. bench/tls_redis.sh
start_tls_redis
listen_port="$(free_port)"
AZURE_REDIS_PASSWORD=bench-key RUST_LOG=warn "$PROXY_BIN" --upstream "127.0.0.1:$tls_port" \
    --tls-server-name localhost --ca-file "$work/ca.pem" --auth access-key \
    --listen "127.0.0.1:$listen_port" --admin-listen off --multiplex 1 --cluster off \
    >"$work/proxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    redis-cli -p "$listen_port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
python3 - "$listen_port" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
value = b"x" * (1 << 20)
s.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n" % (len(value), value))
assert s.recv(16) == b"+OK\r\n"
EOF

# redis-benchmark's "latency summary" line: avg min p50 p95 p99 max (ms).
measure() {
    redis-benchmark -p "$listen_port" -c 10 -n "$requests" -t get 2>/dev/null | tr '\r' '\n' |
        awk '/latency summary/ {getline; getline; print $3, $5, $6}' | tail -1
}

read -r alone_p50 alone_p99 alone_max <<<"$(measure)"

# The sluggard: 200 GETs of 1 MiB, none read, connection held open until the end. (Whether it
# was closed is read from the proxy's log: with its receive window shut, the kernel's persist
# timer backs off, so the client itself may take minutes to reach the FIN behind 4 MB of data.)
python3 - "$listen_port" <<'EOF' &
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 200)
time.sleep(120)
EOF
pids+=($!)
sleep 0.5
read -r busy_p50 busy_p99 busy_max <<<"$(measure)"

closed_by_proxy="no"
grep -q "closing a shared client" "$work/proxy.log" && closed_by_proxy="yes"
echo "## --multiplex 1: 10 clients' GET latency, alone and beside a client that reads nothing"
echo
echo "| | p50 ms | p99 ms | max ms |"
echo "| --- | ---: | ---: | ---: |"
echo "| alone | $alone_p50 | $alone_p99 | $alone_max |"
echo "| while one client leaves 200 MiB unread | $busy_p50 | $busy_p99 | $busy_max |"
echo
echo "the non-reading client was closed by the proxy (\"closing a shared client\" logged): $closed_by_proxy"
echo "(command: bench/mux_sluggard.sh, REQUESTS=$requests, proxy $PROXY_BIN)"
echo
echo "proxy warnings:"
sed 's/^/  /' "$work/proxy.log"
