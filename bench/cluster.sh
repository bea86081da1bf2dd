#!/usr/bin/env bash
# bench/cluster.sh: throughput of a cluster client (redis-benchmark --cluster) against a real
# TLS-only Redis Cluster of 3 masters, directly (TLS, SNI cache.test, access key) and through the
# proxy's cluster mode (plaintext, no password), rounds interleaved in one run. Prints markdown.
#
#   bench/cluster.sh                 # 3 rounds, 100k requests per run
#   bench/cluster.sh --quick         # 1 round, 20k requests: a smoke test, noisy numbers
#   PROXY_BIN=/path bench/cluster.sh # a build made elsewhere (else cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."

args="$*"
rounds=3
requests=100000
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) rounds=1; requests=20000 ;;
    --rounds) rounds="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

need() { command -v "$1" >/dev/null 2>&1; }
if ! need redis-server || ! need redis-benchmark || ! need openssl; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server redis-tools openssl >/dev/null
fi
if [ -z "${PROXY_BIN:-}" ]; then
  cargo build --release --quiet
  PROXY_BIN=target/release/redis-entra-proxy
fi

tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
cp "$PROXY_BIN" "$tmp/proxy"

# A CA and a certificate for cache.test only (no IP), as Azure's names only the host.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=cache.test -keyout "$tmp/server.key" \
  -out "$tmp/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:cache.test\nextendedKeyUsage=serverAuth,clientAuth\n' > "$tmp/ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
  -CAcreateserial -days 2 -extfile "$tmp/ext" -out "$tmp/server.pem" 2>/dev/null
key="$(openssl rand -hex 16)"

# A free port below 50000: a cluster node also listens on its port + 10000 (the bus).
free_port() {
  python3 -c '
import random, socket
while True:
    p = random.randint(20000, 50000)
    try:
        for q in (p, p + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
        print(p); break
    except OSError:
        pass'
}
ports=()
for i in 0 1 2; do
  p="$(free_port)"; ports+=("$p"); mkdir -p "$tmp/n$i"
  redis-server --port 0 --tls-port "$p" --tls-cluster yes --tls-replication yes \
    --tls-cert-file "$tmp/server.pem" --tls-key-file "$tmp/server.key" \
    --tls-ca-cert-file "$tmp/ca.pem" --tls-auth-clients no \
    --cluster-enabled yes --cluster-config-file "$tmp/n$i/nodes.conf" \
    --cluster-announce-ip 127.0.0.1 --requirepass "$key" --masterauth "$key" \
    --save '' --appendonly no --dir "$tmp/n$i" --logfile "$tmp/n$i/log" &
  pids+=("$!")
done
tls=(--tls --cacert "$tmp/ca.pem" --sni cache.test)
for p in "${ports[@]}"; do
  timeout 10 bash -c "until redis-cli -p $p ${tls[*]} -a $key --no-auth-warning ping >/dev/null 2>&1; do sleep 0.1; done"
done
timeout 60 redis-cli "${tls[@]}" -a "$key" --no-auth-warning --cluster create \
  "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" "127.0.0.1:${ports[2]}" --cluster-yes >/dev/null
timeout 30 bash -c "until redis-cli -p ${ports[0]} ${tls[*]} -a $key --no-auth-warning cluster info | grep -q cluster_state:ok; do sleep 0.2; done"

listen="$(free_port)"
AZURE_REDIS_PASSWORD="$key" "$tmp/proxy" --upstream "127.0.0.1:${ports[0]}" \
  --tls-server-name cache.test --ca-file "$tmp/ca.pem" --auth access-key --cluster on \
  --listen "127.0.0.1:$listen" --cluster-ports "$((listen + 1))-$((listen + 20))" \
  --admin-listen off > "$tmp/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
timeout 20 bash -c "until grep -q 'cluster mode: on' $tmp/proxy.log; do sleep 0.1; done"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$proxy_pid/stat"; }
hz="$(getconf CLK_TCK)"
declare -A results cpu
run() { # mode pipeline -> appends "set get" rps
  local mode="$1" pipe="$2" out
  if [ "$mode" = direct ]; then
    out="$(timeout 300 redis-benchmark --cluster -h 127.0.0.1 -p "${ports[0]}" "${tls[@]}" -a "$key" \
      -t set,get -n "$requests" -c 50 -P "$pipe" -r 100000 --csv 2>/dev/null)"
  else
    local before after
    before="$(cpu_ticks)"
    out="$(timeout 300 redis-benchmark --cluster -h 127.0.0.1 -p "$listen" \
      -t set,get -n "$requests" -c 50 -P "$pipe" -r 100000 --csv 2>/dev/null)"
    after="$(cpu_ticks)"
    cpu["$pipe"]+="$(( after - before )) "
  fi
  local set get
  set="$(printf '%s\n' "$out" | awk -F'"' '$2=="SET" {print $4}')"
  get="$(printf '%s\n' "$out" | awk -F'"' '$2=="GET" {print $4}')"
  if [ -z "$set" ] || [ -z "$get" ]; then
    echo "redis-benchmark ($mode, -P $pipe) gave no figures:" >&2
    printf '%s\n' "$out" >&2
    tail -20 "$tmp/proxy.log" >&2
    exit 1
  fi
  results["$mode,$pipe,SET"]+="$set "
  results["$mode,$pipe,GET"]+="$get "
}
for r in $(seq "$rounds"); do
  for pipe in 1 16; do
    run direct "$pipe"
    run proxy "$pipe"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "## Cluster throughput ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "\`bench/cluster.sh $args\` — $rounds round(s), $requests requests per run, 50 clients, 3 TLS masters, $(nproc) cores, $(redis-server --version | awk '{print $3}'), proxy sha256 $(sha256sum "$tmp/proxy" | cut -c1-12)"
echo
echo "| test | direct TLS req/s | through the proxy req/s | proxy / direct | proxy CPU per request |"
echo "| --- | ---: | ---: | ---: | ---: |"
for pipe in 1 16; do
  total_cpu=0
  for t in ${cpu[$pipe]}; do total_cpu=$((total_cpu + t)); done
  for cmd in SET GET; do
    d="$(echo "${results[direct,$pipe,$cmd]}" | median)"
    p="$(echo "${results[proxy,$pipe,$cmd]}" | median)"
    us="$(awk -v t="$total_cpu" -v hz="$hz" -v n="$requests" -v r="$rounds" 'BEGIN {printf "%.1f us", t / hz * 1e6 / (2 * n * r)}')"
    ratio="$(awk -v p="$p" -v d="$d" 'BEGIN {printf "%.2f", p / d}')"
    echo "| -c 50 -P $pipe $cmd | $d | $p | $ratio | $us |"
  done
done
echo
echo "CPU per request: the proxy's user+system time over the SET and GET runs of that pipeline depth, divided by their requests."
